//! Sealed envelopes (R9): the format, sealing and [`RecipientKey`] live in
//! the pure-Rust crate `leasehold-envelope` (the CLIs use it without a TPM)
//! and are re-exported here. What needs the TPM stays in this crate:
//! [`crate::KeyHierarchy::open_envelope`] checks the recipient, unwraps the
//! content key with TPM2_RSA_Decrypt and decrypts with
//! [`ParsedEnvelope::decrypt`].

pub use leasehold_envelope::{
    seal, seal_to, ParsedEnvelope, RecipientKey, MAGIC, MAX_ENVELOPE, MAX_PAYLOAD, MIN_RSA_BITS,
    VERSION,
};
