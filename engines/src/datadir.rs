//! An engine's data directories on the host, reached one component at a
//! time from the engine's `data/` directory without following a symlink.
//!
//! A data directory is the engine's own: its uid writes anything there,
//! symlinks included. A later version of the same engine may name a data
//! directory below an earlier one's (`a/b` after `a`), so every component
//! below `data/` is written by the engine, not by the agent: a path-based
//! `mkdir -p`, `chown` or bind mount would follow a link the engine
//! planted there (`a/b -> /etc`) and hand it a host directory. Both the
//! agent (creating and chowning) and the shim (bind mounting) go through
//! [`open`] and work on the descriptor (docs/engines.md, "Data
//! directories").

use std::os::fd::OwnedFd;
use std::path::{Component, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::launch::{DataDir, LaunchError};

/// Splits `d` into the directory the agent made (`…/data`) and the part
/// below it (the target without its `/`): the host path must be the one
/// the agent builds, `data/` + the target.
fn split(d: &DataDir) -> Result<(PathBuf, Vec<&std::ffi::OsStr>), LaunchError> {
    let bad = || LaunchError::InvalidSpec("a data dir's host path must end with its target");
    let mut rel = Vec::new();
    for c in d.target.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => rel.push(p),
            _ => return Err(bad()),
        }
    }
    if rel.is_empty() {
        return Err(bad());
    }
    let base = d.host.ancestors().nth(rel.len()).ok_or_else(bad)?;
    if base.as_os_str().is_empty()
        || base.join(d.target.strip_prefix("/").map_err(|_| bad())?) != d.host
    {
        return Err(bad());
    }
    Ok((base.to_path_buf(), rel))
}

/// Opens data directory `d` (read-only, close-on-exec), creating missing
/// components (mode 0700, owned by the caller; `data/` itself too) when
/// `create`. Refuses a
/// component that is a symlink or not a directory: `SymlinkDataDir` names
/// the path up to it. The agent's `data/` itself is opened by path (it and
/// the directories above are the agent's and the landlord's).
pub fn open(d: &DataDir, create: bool) -> Result<OwnedFd, LaunchError> {
    let (base, rel) = split(d)?;
    if create {
        // data/ itself: the agent's, in the engine's directory.
        std::fs::create_dir_all(&base).map_err(|e| LaunchError::Io {
            op: "mkdir",
            path: base.clone(),
            source: e,
        })?;
    }
    let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut fd =
        rustix::fs::open(&base, dir_flags, Mode::empty()).map_err(|e| LaunchError::Io {
            op: "open",
            path: base.clone(),
            source: e.into(),
        })?;
    let mut at = base;
    for part in rel {
        at.push(part);
        let next = |fd: &OwnedFd| {
            rustix::fs::openat(fd, part, dir_flags | OFlags::NOFOLLOW, Mode::empty())
        };
        let opened = match next(&fd) {
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&fd, part, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => next(&fd),
                    Err(e) => Err(e),
                }
            }
            r => r,
        };
        fd = match opened {
            Ok(f) => f,
            // O_NOFOLLOW on a symlink: ELOOP; a file: ENOTDIR.
            Err(Errno::LOOP | Errno::NOTDIR) => return Err(LaunchError::SymlinkDataDir(at)),
            Err(e) => {
                return Err(LaunchError::Io {
                    op: "open",
                    path: at,
                    source: e.into(),
                })
            }
        };
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn dd(base: &Path, rel: &str) -> DataDir {
        DataDir {
            host: base.join("data").join(rel),
            target: Path::new("/").join(rel),
        }
    }

    #[test]
    fn missing_components_are_created_and_the_leaf_opened() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("data")).unwrap();
        let fd = open(&dd(t.path(), "var/lib/db"), true).unwrap();
        let leaf = t.path().join("data/var/lib/db");
        assert_eq!(
            rustix::fs::fstat(&fd).unwrap().st_ino,
            std::fs::metadata(&leaf).unwrap().ino()
        );
        // Opening without create finds it again; a missing one is an error.
        open(&dd(t.path(), "var/lib/db"), false).unwrap();
        assert!(matches!(
            open(&dd(t.path(), "var/other"), false),
            Err(LaunchError::Io { .. })
        ));
    }

    #[test]
    fn a_symlink_anywhere_below_data_is_refused_and_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir_all(t.path().join("data/a")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        // What an engine with data dir "a" can plant for a later "a/b".
        std::os::unix::fs::symlink(&outside, t.path().join("data/a/b")).unwrap();
        for rel in ["a/b", "a/b/c"] {
            match open(&dd(t.path(), rel), true) {
                Err(LaunchError::SymlinkDataDir(p)) => {
                    assert_eq!(p, t.path().join("data/a/b"), "{rel}")
                }
                other => panic!("{rel}: {other:?}"),
            }
        }
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing made through the link"
        );
        // A file where a directory is expected: refused the same way.
        std::fs::write(t.path().join("data/a/f"), b"").unwrap();
        assert!(matches!(
            open(&dd(t.path(), "a/f"), true),
            Err(LaunchError::SymlinkDataDir(_))
        ));
        // The agent's own data/ may sit behind the landlord's symlink.
        let real = t.path().join("real");
        std::fs::create_dir_all(real.join("data/x")).unwrap();
        let linked = t.path().join("linked");
        std::os::unix::fs::symlink(&real, &linked).unwrap();
        open(&dd(&linked, "x"), false).unwrap();
    }

    #[test]
    fn a_host_path_that_is_not_data_plus_the_target_is_refused() {
        for (host, target) in [
            ("/srv/e/data/a", "/b"),
            ("/srv/e/data/a", "/"),
            ("/srv/e/data/a", "/a/../a"),
            ("a", "/a"),
        ] {
            let d = DataDir {
                host: host.into(),
                target: target.into(),
            };
            assert!(
                matches!(open(&d, true), Err(LaunchError::InvalidSpec(_))),
                "{host} {target}"
            );
        }
    }
}
