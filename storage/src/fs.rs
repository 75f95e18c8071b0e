//! The filesystem on the mapping: made fresh (init, and after every
//! destroying key change), mounted for the tenant, usage for `status`.
//!
//! Mounts are made in the host's mount namespace. Under systemd the agent
//! runs in a namespace of its own (ProtectSystem=, PrivateTmp=), where a
//! mount would stay invisible to the tenant; so when the agent's namespace
//! is not PID 1's, `mount` and `umount` run through `nsenter -t 1 -m` (a
//! child process: a threaded process cannot setns() into another mount
//! namespace). Everything else is done in this process on the host's view
//! of the path, `/proc/1/root/...`, and the host's `/proc/1/mountinfo`:
//! each command spared is a process start (≈0.1 s on an emulated CPU).

use std::path::{Path, PathBuf};
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

/// `p` as the host's mount namespace sees it.
fn host_path(p: &Path) -> PathBuf {
    if in_host_namespace() {
        p.to_owned()
    } else {
        Path::new("/proc/1/root").join(p.strip_prefix("/").unwrap_or(p))
    }
}

/// Mount points in a mountinfo text (field 5, octal escapes decoded).
fn mount_points(mountinfo: &str) -> impl Iterator<Item = String> + '_ {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_octal)
}

/// Decodes the kernel's `\ooo` escapes (space, tab, newline, backslash).
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push(d.iter().fold(0u8, |a, c| a.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

/// The least device size a filesystem is made on: ext4 works from a few
/// MiB, mkfs.xfs refuses less than 300 MiB.
pub fn min_size(fstype: &str) -> u64 {
    match fstype {
        "xfs" => 300 << 20,
        _ => 16 << 20,
    }
}

/// Checks, writing nothing, that `fstype` is supported and its mkfs is
/// installed (in PATH).
pub fn check_mkfs(fstype: &str) -> Result<()> {
    if !SUPPORTED.contains(&fstype) {
        return Err(StorageError::Unavailable(format!(
            "storage.filesystem: unsupported filesystem {fstype:?} (use one of {SUPPORTED:?}) (nothing was written)"
        )));
    }
    let tool = format!("mkfs.{fstype}");
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    if std::env::split_paths(&path).any(|d| d.join(&tool).is_file()) {
        return Ok(());
    }
    Err(StorageError::Unavailable(format!(
        "{tool} is not installed (e2fsprogs or xfsprogs) (nothing was written)"
    )))
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
/// land as ciphertext) and flushes. `progress` is told the bytes written
/// so far after every chunk (4 MiB).
pub fn fill_zeros(dev: &Path, bytes: u64, mut progress: impl FnMut(u64)) -> Result<()> {
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
        progress(bytes - left);
    }
    f.sync_all().map_err(io(format!("flush {}", dev.display())))
}

/// Mounts `dev` at `at` (created if missing) without device files or
/// set-uid programs, then gives the mount's root to `owner` (uid, gid)
/// with `mode`.
pub fn mount(dev: &Path, at: &Path, fstype: &str, owner: (u32, u32), mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let hp = host_path(at);
    make_dirs_searchable(&hp).map_err(io(format!("create {}", at.display())))?;
    let mut c = host("mount");
    c.args(["-t", fstype, "-o", "nodev,nosuid"])
        .arg(dev)
        .arg(at);
    run(c, "mount")?;
    // The root of the mounted filesystem, seen through the host's root.
    std::os::unix::fs::chown(&hp, Some(owner.0), Some(owner.1))
        .map_err(io(format!("chown {}", at.display())))?;
    std::fs::set_permissions(&hp, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", at.display())))
}

/// Creates `dir` and its missing parents with mode 0755 whatever the
/// process umask (the agent's unit has `UMask=0077`: a 0700 `/srv/leasehold`
/// would keep the tenant's users out of their own volume; the mount's root
/// mode decides who gets in). Existing directories are left as they are.
pub fn make_dirs_searchable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.exists() {
        missing.push(d.to_owned());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    for m in missing.iter().rev() {
        match std::fs::create_dir(m) {
            Ok(()) => std::fs::set_permissions(m, std::fs::Permissions::from_mode(0o755))?,
            // Made meanwhile by someone else: theirs to decide.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes sure `dir` is a real directory (not a symlink) owned by this
/// process's user that nobody else may write, creating it 0755 if missing.
/// For the agent's own directories on the tenant volume, whose root the
/// tenant's users may write: a symlink or directory a tenant planted there
/// must never be followed by the agent (root), so it is refused, named.
pub fn ensure_own_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let me = nix::unistd::geteuid().as_raw();
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        }
        Err(e) => Err(e),
        Ok(m) if m.file_type().is_dir() && m.uid() == me && m.mode() & 0o022 == 0 => Ok(()),
        Ok(m) => Err(std::io::Error::other(format!(
            "{} is not the agent's directory ({}, owner uid {}, mode {:o}): refused, not followed; move it aside",
            dir.display(),
            if m.file_type().is_symlink() {
                "a symlink"
            } else if m.file_type().is_dir() {
                "a directory"
            } else {
                "not a directory"
            },
            m.uid(),
            m.mode() & 0o7777
        ))),
    }
}

/// The existing directories above `dir` that others cannot search (no
/// `o+x`): the tenant's users cannot reach a volume mounted below one.
pub fn unsearchable_ancestors(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    dir.ancestors()
        .skip(1)
        .filter(|d| {
            std::fs::metadata(d).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o001 == 0)
        })
        .map(Path::to_owned)
        .collect()
}

/// Whether something is mounted exactly at `at` (host namespace).
pub fn is_mounted(at: &Path) -> bool {
    let info = if in_host_namespace() {
        "/proc/self/mountinfo"
    } else {
        "/proc/1/mountinfo"
    };
    let Ok(text) = std::fs::read_to_string(info) else {
        return false;
    };
    let at = at.to_string_lossy();
    let at = match at.trim_end_matches('/') {
        "" => "/",
        t => t,
    };
    let found = mount_points(&text).any(|m| m == at);
    found
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
    // Busy: what was written so far goes to the device first (`syncfs`),
    // since the mapping is then swapped for an error table without a
    // flush, and buffered writes would be lost (review). Best effort: after
    // a key wipe the device fails every write anyway.
    // Bounded: on a hung device syncfs waits for good (in D state: no
    // signal ends it, so `timeout` would wait too), and the key's wipe
    // after it must not (review): after 10 s it is left to finish, reaped
    // by a thread of its own.
    let mut c = host("sync");
    c.arg("-f")
        .arg(at)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    match c.spawn() {
        Ok(mut child) => {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(st)) if !st.success() => {
                        tracing::warn!(mount = %at.display(), status = %st, "the busy volume could not be synced before its detach");
                        break;
                    }
                    Ok(Some(_)) => break,
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Ok(None) => {
                        tracing::warn!(mount = %at.display(), "the busy volume's sync takes over 10 s (a hung device?): detached without waiting for it");
                        std::thread::spawn(move || {
                            let _ = child.wait();
                        });
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(mount = %at.display(), error = %e, "the busy volume's sync could not be waited for");
                        break;
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(mount = %at.display(), error = %e, "the busy volume could not be synced before its detach");
        }
    }
    let mut c = host("umount");
    c.arg("-l").arg(at);
    run(c, "umount -l")?;
    Ok(true)
}

/// Discards the free blocks of the filesystem mounted at `at` (`fstrim`);
/// returns what fstrim reported.
pub fn trim(at: &Path) -> Result<String> {
    let mut c = host("fstrim");
    c.arg("-v").arg(at);
    run(c, "fstrim").map(|o| o.trim().to_owned())
}

/// (used, total) bytes of the filesystem mounted at `at`.
pub fn usage(at: &Path) -> Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(&host_path(at))
        .map_err(|e| io(format!("statfs {}", at.display()))(e.into()))?;
    let bs = st.fragment_size();
    let (total, free) = (st.blocks(), st.blocks_free());
    Ok(((total - free.min(total)) * bs, total * bs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_points_are_unescaped() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 253:0 / /srv/lease\\040hold\\134x rw - ext4 /dev/dm-0 rw\n";
        let v: Vec<String> = mount_points(text).collect();
        assert_eq!(v, ["/", "/srv/lease hold\\x"]);
        assert_eq!(unescape_octal("a\\04"), "a\\04", "a cut escape stays as is");
    }

    #[test]
    fn root_is_mounted_and_has_usage() {
        assert!(is_mounted(Path::new("/")));
        assert!(!is_mounted(Path::new("/definitely/not/a/mount")));
        let (used, total) = usage(Path::new("/")).unwrap();
        assert!(total > 0 && used <= total);
    }
}
