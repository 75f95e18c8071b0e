//! Development mode never runs in the host's network namespace: a stored
//! boundary applied there would replace the developer's firewall (and cut
//! the machine off outside the boundary). The bus, polkit and the state
//! directory are reached by path, so a namespace of its own costs the dev
//! agent nothing; its swtpm, started afterwards, shares it.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use nix::sched::CloneFlags;

/// Where the dev agent's network namespace came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevNet {
    /// Started outside the host's namespace already (the test harness, `ip
    /// netns exec`): kept, so a named namespace keeps its table.
    Inherited,
    /// A new, empty namespace (only `lo`), gone when the agent exits.
    Own,
}

/// Why the namespace could not be made.
#[derive(Debug, thiserror::Error)]
#[error("development mode runs agentd in a network namespace of its own (a boundary must never reach the host's firewall) and could not make one: {step}: {source}")]
pub struct DevNetError {
    step: &'static str,
    #[source]
    source: io::Error,
}

impl DevNetError {
    /// Refused by the kernel for lack of privilege (not root).
    pub fn is_permission(&self) -> bool {
        self.source.kind() == io::ErrorKind::PermissionDenied
    }
}

fn err(step: &'static str) -> impl FnOnce(io::Error) -> DevNetError {
    move |source| DevNetError { step, source }
}

/// Moves the process into a network namespace of its own unless it is
/// already outside init's. Must run while the process has one thread:
/// `unshare` moves only the calling thread, and threads started later
/// inherit its namespace.
pub fn isolate() -> Result<DevNet, DevNetError> {
    let own = std::fs::metadata("/proc/self/ns/net").map_err(err("stat /proc/self/ns/net"))?;
    // Unreadable (not root): assume the host's, and let unshare decide.
    if let Ok(init) = std::fs::metadata("/proc/1/ns/net") {
        if (init.dev(), init.ino()) != (own.dev(), own.ino()) {
            return Ok(DevNet::Inherited);
        }
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|e| err("unshare(CLONE_NEWNET)")(io::Error::from(e)))?;
    // swtpm listens on 127.0.0.1: loopback must be up.
    let out = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .map_err(err("run ip link set lo up (package iproute2)"))?;
    if !out.status.success() {
        return Err(err("ip link set lo up")(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )));
    }
    Ok(DevNet::Own)
}
