//! Leasehold engines (R2, R6, R9, R11, R14): the tenant's workloads.
//!
//! - [`spec`]: what a tenant asks for (command, limits, restart policy,
//!   probes, secrets), validated with field-path errors;
//! - [`budget`]: the landlord's budget for the tenant's cgroup subtree and
//!   the "can only narrow" rule for engine limits;
//! - [`backoff`]: the restart schedule, driven by an injectable clock;
//! - [`supervisor`]: the per-engine supervision state machine (states,
//!   events, probes, heartbeat, reload), pure over injected instants;
//! - [`image`]: OCI image archives verified by digest and unpacked into a
//!   root filesystem;
//! - [`probe`]: the tcp and http probes and the notify-socket parser;
//! - [`logs`]: each engine's output as timestamped lines in two rotated
//!   files on the tenant volume;
//! - [`cgroup`] and [`launch`]: cgroupfs behind a trait with an injectable
//!   root, and the launcher that confines an engine.
//!
//! No zbus, no clap: the node controller drives this crate.

#![warn(missing_docs)]

pub mod backoff;
pub mod budget;
pub mod cgroup;
pub mod datadir;
pub mod holder;
pub mod image;
pub mod launch;
pub mod logs;
pub mod probe;
pub mod spec;
pub mod supervisor;
