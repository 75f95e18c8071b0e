//! Errors of the envelope format and of signature checks. Variants carry
//! context (field, size, version); none carries key material or plaintext.

/// Errors of parsing, sealing and decrypting an envelope.
///
/// Deliberately not `#[non_exhaustive]`: `leasehold-tpm` maps every variant
/// into its own error (which adds the TPM-side failures), and a new variant
/// here should break that match rather than be mapped blindly.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not an envelope at all.
    #[error("not a Leasehold envelope (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("unsupported envelope version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version byte found.
        found: u8,
        /// Version supported.
        supported: u8,
    },
    /// The envelope ends early or a field is inconsistent; names the field.
    #[error("envelope truncated or malformed: {0}")]
    Malformed(&'static str),
    /// The payload or envelope exceeds the size limit.
    #[error("envelope {what} is {size} bytes; the limit is {max} bytes")]
    TooLarge {
        /// "payload" or "envelope".
        what: &'static str,
        /// Actual size.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// AES-GCM authentication failed: the envelope was modified (or the
    /// content key is not the one it was sealed with).
    #[error("envelope authentication failed: ciphertext or header was modified")]
    AuthenticationFailed,
    /// The recipient public key is not usable for sealing.
    #[error("invalid recipient public key: {0}")]
    InvalidPublicKey(String),
}

/// Errors of verifying a node signature (an erase receipt).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureError {
    /// The public key is not an RSA SubjectPublicKeyInfo PEM of at least 2048 bits.
    #[error("invalid signing public key: {0}")]
    InvalidPublicKey(String),
    /// The signature does not match the data under this key.
    #[error("signature verification failed: the data or the signature was modified, or it was made by another key")]
    Mismatch,
}
