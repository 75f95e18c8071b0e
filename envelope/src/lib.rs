//! What a Leasehold console needs without a TPM: the envelope format (R9),
//! recipient keys and their fingerprints, and the check of a node's
//! signature on an erase receipt.
//!
//! [`seal`] encrypts to a node's public key (UT, UL) anywhere; opening
//! needs the private half, which never leaves the node's TPM, so this crate
//! only parses ([`ParsedEnvelope`]) and decrypts with a content key the
//! caller unwrapped (`leasehold-tpm` does that inside the TPM).
//! [`verify_signature`] checks an erase receipt against the node's signing
//! key PEM. [`valid_name`] is the rule for tenant, console and secret names,
//! which the node enforces and the CLIs check before they connect.
//!
//! [`attest::verify_quote`] checks a TPM quote (R13 challenges) against the
//! node's pinned attestation key.
//!
//! Pure Rust (RustCrypto): `tenantctl` links this crate instead of
//! `leasehold-tpm`, so it builds without libtss2.

#![warn(missing_docs)]

pub mod attest;
mod envelope;
mod error;
mod key;
mod name;
mod signature;

pub use envelope::{seal, seal_to, ParsedEnvelope, MAGIC, MAX_ENVELOPE, MAX_PAYLOAD, VERSION};
pub use error::{EnvelopeError, SignatureError};
pub use key::{RecipientKey, MIN_RSA_BITS};
pub use name::{valid_name, NAME_RULE};
pub use signature::verify_signature;
