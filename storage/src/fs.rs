//! The filesystem on the mapping: made fresh (init, and after every
//! destroying key change), mounted for the tenant, usage for `status`.
//!
//! Mounts are made in the host's mount namespace. Under systemd the agent
//! runs in a namespace of its own (ProtectSystem=, PrivateTmp=), where a
//! mount would stay invisible to the tenant; so when the agent's namespace
//! is not PID 1's, mount, unmount and the mount-point commands run through
//! `nsenter -t 1 -m` (a child process: a threaded process cannot setns()
//! into another mount namespace).

use std::path::Path;
use std::process::Command;

use crate::{io, Result, StorageError};

/// Filesystems `make` knows.
pub const SUPPORTED: [&str; 2] = ["ext4", "xfs"];

fn run(mut c: Command, what: &str) -> Result<String> {
    let out = c.output().map_err(io(format!("run {what}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(StorageError::Command {
            cmd: what.to_owned(),
            detail: if err.is_empty() {
                out.status.to_string()
            } else {
                err
            },
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process shares PID 1's mount namespace.
fn in_host_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(a), Ok(b)) => a == b,
        // Cannot tell (no access to PID 1): act here.
        _ => true,
    }
}

/// `prog` in the host's mount namespace.
fn host(prog: &str) -> Command {
    if in_host_namespace() {
        Command::new(prog)
    } else {
        let mut c = Command::new("nsenter");
        c.args(["-t", "1", "-m", "--", prog]);
        c
    }
}

/// Makes an empty filesystem. ext4's inode tables and journal are
/// initialised lazily (after mount) and nothing is discarded, so this
/// takes about a second whatever the size: the device under a new key
/// reads as random anyway.
pub fn make(dev: &Path, fstype: &str) -> Result<()> {
    let mut c = match fstype {
        "ext4" => {
            let mut c = Command::new("mkfs.ext4");
            c.args([
                "-q",
                "-F",
                "-L",
                "leasehold",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ]);
            c
        }
        "xfs" => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-q", "-f", "-K", "-L", "leasehold"]);
            c
        }
        other => {
            return Err(StorageError::Command {
                cmd: "mkfs".into(),
                detail: format!("unsupported filesystem {other:?} (use one of {SUPPORTED:?})"),
            })
        }
    };
    c.arg(dev);
    run(c, &format!("mkfs.{fstype}")).map(drop)
}

/// Writes zeros over the first `bytes` of `dev` (through a mapping: they
/// land as ciphertext) and flushes.
pub fn fill_zeros(dev: &Path, bytes: u64) -> Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(io(format!("open {}", dev.display())))?;
    let chunk = vec![0u8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        f.write_all(&chunk[..n])
            .map_err(io(format!("fill {}", dev.display())))?;
        left -= n as u64;
    }
    f.sync_all().map_err(io(format!("flush {}", dev.display())))
}

/// Mounts `dev` at `at` (created if missing) without device files or
/// set-uid programs, then gives the mount's root to `owner` (uid, gid)
/// with `mode`.
pub fn mount(dev: &Path, at: &Path, fstype: &str, owner: (u32, u32), mode: u32) -> Result<()> {
    let mut c = host("mkdir");
    c.arg("-p").arg(at);
    run(c, "mkdir")?;
    let mut c = host("mount");
    c.args(["-t", fstype, "-o", "nodev,nosuid"])
        .arg(dev)
        .arg(at);
    run(c, "mount")?;
    let mut c = host("chown");
    c.arg(format!("{}:{}", owner.0, owner.1)).arg(at);
    run(c, "chown")?;
    let mut c = host("chmod");
    c.arg(format!("{mode:o}")).arg(at);
    run(c, "chmod").map(drop)
}

/// Whether something is mounted exactly at `at` (host namespace).
pub fn is_mounted(at: &Path) -> bool {
    let mut c = host("findmnt");
    c.args(["-n", "-o", "TARGET", "--mountpoint"]).arg(at);
    c.output().is_ok_and(|o| o.status.success())
}

/// Unmounts `at`; if busy, detaches it (lazy) so the mapping can be wiped
/// regardless. Returns whether it had to detach.
pub fn unmount(at: &Path) -> Result<bool> {
    if !is_mounted(at) {
        return Ok(false);
    }
    let mut c = host("umount");
    c.arg(at);
    if run(c, "umount").is_ok() {
        return Ok(false);
    }
    let mut c = host("umount");
    c.arg("-l").arg(at);
    run(c, "umount -l")?;
    Ok(true)
}

/// (used, total) bytes of the filesystem mounted at `at`.
pub fn usage(at: &Path) -> Result<(u64, u64)> {
    let mut c = host("stat");
    c.args(["-f", "-c", "%S %b %f"]).arg(at);
    let out = run(c, "stat -f")?;
    let v: Vec<u64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match v[..] {
        [bs, total, free] => Ok(((total - free.min(total)) * bs, total * bs)),
        _ => Err(StorageError::Command {
            cmd: "stat -f".into(),
            detail: format!("unexpected output {out:?}"),
        }),
    }
}
