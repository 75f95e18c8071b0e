//! Leasehold's node key hierarchy (R8–R12, R15).
//!
//! Each management level (landlord, tenant; more can follow) has an RSA-2048
//! decryption key pair created in the TPM (fixedTPM | fixedParent) and a
//! 256-bit symmetric key (KL, KT) stored as a TPM sealed data object. Every
//! generation of a level depends on a secret in a TPM NV index, and a
//! rotation undefines that index: old blobs, even from a backup, are then
//! useless. The disk key is derived from the chain KL → KT (→ ...).
//!
//! [`envelope::seal`] runs without a TPM; [`KeyHierarchy::open_envelope`]
//! decrypts inside it. The envelope format itself is the pure-Rust crate
//! `leasehold-envelope` (re-exported in [`envelope`]), so consoles need no
//! libtss2.
//!
//! A node signing key (RSA-2048, RSASSA-PKCS1-v1_5 SHA-256), independent of
//! the levels, signs erase receipts ([`KeyHierarchy::sign`]); anyone with its
//! public PEM verifies them with [`verify_signature`] (from
//! `leasehold-envelope`), no TPM needed.

#![warn(missing_docs)]

pub mod chain;
pub mod envelope;
mod error;
mod hierarchy;
mod state;
pub mod swtpm;
mod sys;
#[cfg(feature = "testing")]
pub mod testing;
mod types;

pub use error::{EnvelopeError, KeyError, Result, SignatureError};
pub use hierarchy::{
    valid_name, ChangeKind, FaultPoint, KeyChange, KeyConfig, KeyHierarchy, LevelStatus, Opened,
    Quote, Status, MAX_CONSOLES,
};
pub use leasehold_envelope::{attest, verify_signature};
pub use types::{Confirm, DiskKey, PublicKeyInfo, Role, SigningKeyInfo, SymmetricKey, TpmKind};

/// Validates a TCTI string without connecting (for config checks).
pub fn validate_tcti(tcti: &str) -> Result<()> {
    sys::parse_tcti(tcti).map(|_| ())
}

/// Validates a PCR list without connecting (for config checks).
pub fn validate_pcrs(pcrs: &[u8]) -> Result<()> {
    sys::normalise_pcrs(pcrs).map(|_| ())
}
