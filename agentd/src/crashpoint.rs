//! Test hook for the crash tests (feature `fault-injection`, never in the
//! package users install): `LEASEHOLD_CRASH_AT=<step>` kills the agent
//! (SIGKILL, no clean-up) when it reaches that step: the volume's steps
//! are listed in docs/storage.md, the engines' in docs/engines.md.

#[cfg(feature = "fault-injection")]
pub fn crash_point(step: &str) {
    if std::env::var("LEASEHOLD_CRASH_AT").as_deref() == Ok(step) {
        tracing::warn!(step, "LEASEHOLD_CRASH_AT: killing the agent here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(not(feature = "fault-injection"))]
pub fn crash_point(_step: &str) {}
