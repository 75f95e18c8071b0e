//! One agent per state directory: an exclusive `flock` on the directory
//! itself, held for the life of the process (the kernel drops it when the
//! process ends, however it ends).
//!
//! The directory, not a lock file in it: the key hierarchy refuses a start
//! over files it cannot explain (and `--init-erase-tpm` wants an empty
//! directory), and the shipped unit makes only the state directory
//! writable, so there is no place for a lock file beside it.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Why the directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("state directory {} is in use by agentd pid {}", dir.display(), pid.map_or_else(|| "(unknown)".to_owned(), |p| p.to_string()))]
    InUse {
        /// The directory.
        dir: PathBuf,
        /// The holder, from /proc/locks.
        pid: Option<u32>,
    },
    /// The directory could not be created, opened or locked.
    #[error("cannot lock state directory {}: {source}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct DirLock {
    _lock: Flock<File>,
}

/// Locks `dir`, creating it (mode 0700, like the key hierarchy would) if
/// it is missing. Never waits: a second agent stops at once.
pub fn lock_dir(dir: &Path) -> Result<DirLock, LockError> {
    let io_err = |source| LockError::Io {
        dir: dir.to_owned(),
        source,
    };
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
    }
    // std opens with O_CLOEXEC: no child (swtpm, the engine shims) inherits
    // the lock and outlives us holding it.
    let f = File::open(dir).map_err(io_err)?;
    let meta = f.metadata().map_err(io_err)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(DirLock { _lock: lock }),
        Err((_, Errno::EWOULDBLOCK)) => Err(LockError::InUse {
            dir: dir.to_owned(),
            pid: holder(&meta),
        }),
        Err((_, e)) => Err(io_err(io::Error::from(e))),
    }
}

/// The pid holding a flock on the file `meta` describes, from /proc/locks
/// ("1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF").
fn holder(meta: &std::fs::Metadata) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // A waiter's line starts "1: ->"; only the holder's has FLOCK second.
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        let first = lock_dir(&dir).unwrap();
        let err = lock_dir(&dir).unwrap_err();
        // flock locks belong to the open file: the same process is refused
        // too, and /proc/locks names it.
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "state directory {} is in use by agentd pid {}",
                dir.display(),
                std::process::id()
            )),
            "{msg}"
        );
        drop(first);
        lock_dir(&dir).unwrap();
    }

    #[test]
    fn proc_locks_lines() {
        let dev = nix::sys::stat::makedev(0xfd, 1);
        let locks = "1: POSIX  ADVISORY  WRITE 10 fd:01:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 fd:01:77 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4343 fd:01:77 0 EOF\n";
        assert_eq!(holder_in(locks, dev, 77), Some(4242));
        assert_eq!(holder_in(locks, dev, 78), None);
    }
}
