//! Atomic file replacement for state: temp file (0600), fsync, rename,
//! fsync of the directory, so a crash leaves the old or the new file.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `dir/name` atomically.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // A failed write leaves no temp file (its name can be the tenant's: a
    // secret's), only a kill does (review).
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, dir.join(name)));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::File::open(dir)?.sync_all()
}

/// `create_dir_all`, every directory it makes given `mode` whatever the
/// umask (the agent runs with 0077: a directory others must traverse, as
/// to the landlord's metrics socket, is made readable on purpose). Existing
/// directories are left as they are.
pub fn create_dir_all_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at {
        if p.as_os_str().is_empty() || p.exists() {
            break;
        }
        missing.push(p);
        at = p.parent();
    }
    for p in missing.into_iter().rev() {
        match std::fs::create_dir(p) {
            Ok(()) => std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod mode_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn made_directories_get_the_mode_existing_ones_keep_theirs() {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let leaf = t.path().join("a/b/c");
        create_dir_all_mode(&leaf, 0o755).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            let m = std::fs::metadata(t.path().join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(m & 0o777, 0o755, "{d}");
        }
        let m = std::fs::metadata(t.path()).unwrap().permissions().mode();
        assert_eq!(m & 0o777, 0o711, "an existing one is left");
        create_dir_all_mode(&leaf, 0o700).unwrap();
        let m = std::fs::metadata(&leaf).unwrap().permissions().mode();
        assert_eq!(m & 0o777, 0o755, "made before: left");
    }
}
