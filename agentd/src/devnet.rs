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
    /// Kept as started (`--dev-keep-netns`: the caller made it for the
    /// agent, e.g. the test harness's `unshare --net` or `ip netns exec`, so
    /// a named namespace keeps its table across restarts).
    Kept,
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

/// Whether this process shares init's network namespace. `None` when
/// /proc/1/ns/net cannot be read (not root, or init is in an ancestor user
/// namespace, as in some containers).
fn in_init_netns() -> Option<bool> {
    let own = std::fs::metadata("/proc/self/ns/net").ok()?;
    let init = std::fs::metadata("/proc/1/ns/net").ok()?;
    Some((init.dev(), init.ino()) == (own.dev(), own.ino()))
}

/// Moves the process into a new network namespace, or with `keep` stays
/// in the one it was started in unless that is visibly init's. Must run
/// while the process has one thread: `unshare` moves only the calling
/// thread, and threads started later inherit its namespace.
pub fn isolate(keep: bool) -> Result<DevNet, DevNetError> {
    if keep {
        // Fail closed: "keep" is for namespaces made for the agent.
        if in_init_netns() == Some(true) {
            return Err(err("--dev-keep-netns")(io::Error::other(
                "agentd was started in the host's network namespace",
            )));
        }
        return Ok(DevNet::Kept);
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWNET)
        .map_err(|e| err("unshare(CLONE_NEWNET) (root only)")(io::Error::from(e)))?;
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
