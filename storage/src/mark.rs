//! The volume's mark: random bytes written over the device's last
//! [`MARK_BYTES`] at init, outside the mapping (the filesystem never covers
//! them), whose digest the metadata records. Every later mapping of the
//! recorded device reads them first: a device name that now designates
//! another disk (`/dev/vdb` renumbered by a reboot; a disk without a serial
//! has no by-id name) is refused before anything is written to it. Random
//! like the ciphertext beside it, so the device still shows nothing.

use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::{io, Result, StorageError};

/// Bytes at the device's end that hold the mark (one 4 KiB block: aligned
/// for every sector size dm-crypt uses here).
pub const MARK_BYTES: u64 = 4096;
/// [`MARK_BYTES`] as a length.
pub const MARK_LEN: usize = 4096;
const _: () = assert!(MARK_LEN as u64 == MARK_BYTES);

/// Where the mark starts on a device of `size_bytes`.
fn offset(dev: &Path, size_bytes: u64) -> Result<u64> {
    size_bytes
        .checked_sub(MARK_BYTES)
        .filter(|o| *o > 0)
        .ok_or_else(|| {
            StorageError::Unavailable(format!(
                "{}: {size_bytes} bytes leave no room for the volume's mark",
                dev.display()
            ))
        })
}

fn digest(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Writes `bytes` (random, [`MARK_BYTES`] of them) over the last
/// [`MARK_BYTES`] of `dev` (of `size_bytes`), synced; returns their digest
/// for the metadata.
pub fn write(dev: &Path, size_bytes: u64, bytes: &[u8; MARK_LEN]) -> Result<String> {
    let at = offset(dev, size_bytes)?;
    // Exclusive: a block device mounted or claimed since the checks is
    // refused (EBUSY), not written (review).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
        .open(dev)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::EBUSY) {
                StorageError::InUse {
                    path: dev.display().to_string(),
                    holders: "the kernel (an exclusive open is refused)".into(),
                }
            } else {
                StorageError::Io {
                    what: format!("open {}", dev.display()),
                    source: e,
                }
            }
        })?;
    f.write_all_at(bytes, at)
        .map_err(io(format!("write the volume's mark on {}", dev.display())))?;
    f.sync_all()
        .map_err(io(format!("flush {}", dev.display())))?;
    Ok(digest(bytes))
}

/// Refuses `dev` unless its last [`MARK_BYTES`] have the digest `want`
/// (reads only).
pub fn check(dev: &Path, size_bytes: u64, want: &str) -> Result<()> {
    let at = offset(dev, size_bytes)?;
    let f = std::fs::File::open(dev).map_err(io(format!("open {}", dev.display())))?;
    let mut b = vec![0u8; MARK_LEN];
    f.read_exact_at(&mut b, at)
        .map_err(io(format!("read the volume's mark on {}", dev.display())))?;
    if digest(&b) == want {
        return Ok(());
    }
    Err(StorageError::NotThisVolume {
        path: dev.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_found_where_written_and_nowhere_else() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let size = 1 << 20;
        for p in [&a, &b] {
            std::fs::File::create(p).unwrap().set_len(size).unwrap();
        }
        let mut bytes = [0u8; MARK_LEN];
        bytes[..5].copy_from_slice(b"mark1");
        let want = write(&a, size, &bytes).unwrap();
        check(&a, size, &want).unwrap();
        // Only the last block was written.
        let on = std::fs::read(&a).unwrap();
        let (fs_part, tail) = on.split_at(on.len() - MARK_LEN);
        assert!(fs_part.iter().all(|x| *x == 0));
        assert_eq!(tail, &bytes[..]);
        // Another device of the same size, blank or marked otherwise.
        let e = check(&b, size, &want).unwrap_err().to_string();
        assert!(
            e.contains(&b.display().to_string()) && e.contains("not this volume's"),
            "{e}"
        );
        bytes[0] = b'M';
        write(&b, size, &bytes).unwrap();
        assert!(check(&b, size, &want).is_err());
        // A device too small for it is refused by name, nothing written.
        let tiny = d.path().join("tiny");
        std::fs::File::create(&tiny)
            .unwrap()
            .set_len(MARK_BYTES)
            .unwrap();
        let e = write(&tiny, MARK_BYTES, &bytes).unwrap_err().to_string();
        assert!(e.contains("no room"), "{e}");
        assert!(std::fs::read(&tiny).unwrap().iter().all(|x| *x == 0));
    }
}
