//! Launcher (placeholder).
