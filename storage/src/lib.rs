//! The tenant's encrypted volume (R10, R11): a dm-crypt mapping keyed by
//! the disk key (from KL and KT, see `leasehold-tpm`), with the key passed
//! to the kernel through the kernel keyring (a `logon` key, never readable
//! from user space, never in the dm table), the device checks that keep
//! `volume init` from destroying something, the metadata kept in the
//! agent's state directory (never on the device, which stays
//! indistinguishable from random data), and the filesystem on top.
//!
//! Everything but [`mapping`] and [`fs`] runs without root; those two need
//! root and a kernel with device-mapper (the VM lab).

pub mod device;
pub mod fs;
pub mod keyring;
pub mod mapping;
pub mod mark;
pub mod meta;

pub use meta::{kcv, VolumeMeta, VolumeState};

/// Why a volume operation failed. Messages name the device or the field.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The path is not a block device (or does not exist).
    #[error("{path}: {reason}")]
    NotABlockDevice {
        /// As given.
        path: String,
        /// Why.
        reason: String,
    },
    /// Mounted, or a partition of it is.
    #[error("{path} is mounted at {mountpoint}: unmount it first (nothing was written)")]
    Mounted {
        /// As given.
        path: String,
        /// Where.
        mountpoint: String,
    },
    /// Held by another kernel user (device-mapper, md, …).
    #[error("{path} is in use by {holders} (nothing was written)")]
    InUse {
        /// As given.
        path: String,
        /// Holder device names.
        holders: String,
    },
    /// The disk holding the root filesystem.
    #[error("{path} holds the root filesystem (nothing was written)")]
    RootDisk {
        /// As given.
        path: String,
    },
    /// Carries a filesystem, partition table or other signature.
    #[error("{path} carries {what}; use --force to overwrite it (nothing was written)")]
    Signature {
        /// As given.
        path: String,
        /// What blkid found.
        what: String,
    },
    /// Too small for the filesystem.
    #[error("{path} has {size_bytes} bytes; a {filesystem} volume needs at least {min_bytes} (nothing was written)")]
    TooSmall {
        /// As given.
        path: String,
        /// Its size.
        size_bytes: u64,
        /// The filesystem.
        filesystem: String,
        /// The least it needs.
        min_bytes: u64,
    },
    /// The device does not carry this volume's mark ([`mark`]).
    #[error("{path}: its last 4096 bytes are not this volume's mark (random bytes written there at init, outside the filesystem): it is another disk, or they were written over (device names can change across reboots); nothing was written. Check the device: `landlordctl volume forget --yes` and `volume init` make a volume again")]
    NotThisVolume {
        /// The device as recorded.
        path: String,
    },
    /// A kernel facility or helper program the volume needs is missing.
    #[error("{0}")]
    Unavailable(String),
    /// The key does not match the volume's key check value.
    #[error("{0} (nothing was written to the device)")]
    WrongKey(String),
    /// Device-mapper refused.
    #[error("device-mapper: {0}")]
    Dm(String),
    /// The kernel keyring refused.
    #[error("kernel keyring: {0}")]
    Keyring(String),
    /// A helper program failed.
    #[error("{cmd} failed: {detail}")]
    Command {
        /// Program.
        cmd: String,
        /// Its stderr or exit status.
        detail: String,
    },
    /// Other I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, StorageError>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StorageError {
    let what = what.into();
    move |source| StorageError::Io { what, source }
}
