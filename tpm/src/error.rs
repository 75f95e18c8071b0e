//! Errors of the key hierarchy. Variants carry context (role, path, field);
//! none carries key material.

use std::path::PathBuf;

use crate::types::Role;

/// Everything that can go wrong in the key hierarchy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The TCTI string in the configuration is not one we accept.
    #[error("invalid tpm.tcti {tcti:?}: {reason}")]
    InvalidTcti {
        /// The offending string.
        tcti: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The state directory was created with another TPM (or the TPM was cleared).
    #[error("state directory {path} belongs to a different TPM (or this TPM was cleared): its keys cannot be loaded here")]
    DifferentTpm {
        /// Manifest path.
        path: PathBuf,
    },
    /// A PCR index outside 0..=23 was configured.
    #[error("invalid tpm.seal_pcrs entry {0}: PCR indices are 0..=23")]
    InvalidPcr(u8),
    /// The TPM could not be reached.
    #[error("cannot connect to the TPM via {tcti:?}: {source}")]
    Connect {
        /// TCTI used.
        tcti: String,
        /// Underlying error.
        #[source]
        source: tss_esapi::Error,
    },
    /// A TPM command failed.
    #[error("TPM command {op} failed: {source}")]
    Tpm {
        /// What we were doing.
        op: &'static str,
        /// Underlying error.
        #[source]
        source: tss_esapi::Error,
    },
    /// A key blob could not be loaded into this TPM: it was made by another
    /// TPM (or under another owner seed), or it is corrupt.
    #[error("the {role} {what} blob does not load into this TPM: it was created by a different TPM or is corrupt ({source})")]
    ForeignOrCorruptBlob {
        /// Whose key.
        role: Role,
        /// Which object ("key pair", "sealed key").
        what: &'static str,
        /// Underlying TPM error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The node signing key blob could not be loaded into this TPM.
    #[error("the node signing key blob {path} does not load into this TPM: it was created by a different TPM or is corrupt ({source})")]
    SigningKeyUnusable {
        /// The blob file.
        path: PathBuf,
        /// Underlying TPM error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The attestation key blob could not be loaded into this TPM.
    #[error("the attestation key blob {path} does not load into this TPM: it was created by a different TPM or is corrupt ({source})")]
    AttestationKeyUnusable {
        /// The blob file.
        path: PathBuf,
        /// Underlying TPM error.
        #[source]
        source: tss_esapi::Error,
    },
    /// A quote request's nonce or PCR list is out of bounds.
    #[error("invalid quote request: {field}: {reason}")]
    InvalidQuote {
        /// `nonce` or `pcrs`.
        field: &'static str,
        /// What is wrong, with the bounds.
        reason: String,
    },
    /// The per-generation secret that a key depends on is gone from the TPM:
    /// the key was erased by a rotation (e.g. a state directory restored from
    /// a backup) or the TPM was cleared.
    #[error("the {role} key of generation {generation} has been erased from this TPM (its NV secret 0x{nv_index:08x} no longer exists); restoring old state cannot bring it back")]
    KeyErased {
        /// Whose key.
        role: Role,
        /// Pair generation of the erased key.
        generation: u64,
        /// The NV index that is missing.
        nv_index: u32,
    },
    /// The state directory has no manifest, but the TPM holds Leasehold NV
    /// indices or the directory holds key blobs: the keys of an existing
    /// node. Nothing was changed.
    #[error("state directory {dir} has no keys.json, but the TPM holds {nv_indices} Leasehold NV indices (and the directory {files} key files): they belong to an existing node, so nothing was changed. If state.dir is wrong or its file system is not mounted yet, fix that and restart. To destroy those keys and initialise a new node, start once with `agentd --init-erase-tpm` on an empty or missing state directory")]
    StateMissing {
        /// The state directory.
        dir: PathBuf,
        /// Leasehold NV indices (secrets and epoch counter) in the TPM.
        nv_indices: usize,
        /// Key blob and temp files in the directory.
        files: usize,
    },
    /// Initialising over existing TPM keys was asked for, but the state
    /// directory is not empty. Nothing was changed.
    #[error("refusing to erase the TPM's Leasehold keys: state directory {dir} is not empty ({entries} entries); the erase is allowed only when it is empty or missing")]
    EraseRefused {
        /// The state directory.
        dir: PathBuf,
        /// Number of entries found.
        entries: usize,
    },
    /// The TPM holds a Leasehold NV index that the manifest neither names
    /// nor records as part of a change. Nothing was changed.
    #[error("the TPM holds Leasehold NV index 0x{nv_index:08x}, which {path} neither names nor records as part of a change (edited or replaced manifest?): nothing was changed")]
    UnknownNvIndex {
        /// Manifest path.
        path: PathBuf,
        /// The unexplained index.
        nv_index: u32,
    },
    /// The manifest is older or newer than the TPM's state (a restored
    /// backup, or a copy from elsewhere). Nothing was changed.
    #[error("{path} is at epoch {} but the TPM's Leasehold epoch counter is at {}: it is a restored backup or a copy of another state, not the node's current state; nothing was changed. Restore the current state directory", fmt_epoch(*manifest_epoch), fmt_epoch(*tpm_epoch))]
    StaleState {
        /// Manifest path.
        path: PathBuf,
        /// The manifest's epoch (`None`: written before epochs existed).
        manifest_epoch: Option<u64>,
        /// The TPM counter's value (`None`: no counter).
        tpm_epoch: Option<u64>,
    },
    /// The manifest names a standby generation whose NV secret the TPM does
    /// not hold: only the agent undefines it, and only after the manifest
    /// stops naming it, so something else did.
    #[error("{path} names a standby {role} key of generation {generation}, but its NV secret 0x{nv_index:08x} no longer exists in this TPM: nothing was changed")]
    StandbyErased {
        /// Manifest path.
        path: PathBuf,
        /// Whose standby.
        role: Role,
        /// The standby's pair generation.
        generation: u64,
        /// The NV index that is missing.
        nv_index: u32,
    },
    /// A change failed part-way in this process and its intent is still
    /// recorded; a new change would overwrite it. Restarting the agent
    /// finishes or rolls back the recorded change.
    #[error("a {kind} of the {role} keys is unfinished (it failed part-way); restart the agent to finish it before another key change")]
    ChangeUnfinished {
        /// The unfinished change (e.g. "rotate").
        kind: &'static str,
        /// Whose keys.
        role: Role,
    },
    /// A state file or the state directory is a symbolic link.
    #[error("{path} is a symbolic link; Leasehold state files are never followed through links: nothing was changed")]
    SymlinkInState {
        /// The link.
        path: PathBuf,
    },
    /// A manifest from an older build records an interrupted change, or NV
    /// indices it does not name; the older build has to finish it.
    #[error("{path} (format {format}, before epochs) records an unfinished key change or the TPM holds NV indices it does not name; start the previous agentd version once to finish it: nothing was changed")]
    UnfinishedLegacyChange {
        /// Manifest path.
        path: PathBuf,
        /// The manifest's format version.
        format: u32,
    },
    /// The sealed symmetric key is bound to PCR values that have changed.
    #[error("cannot unseal the {role} symmetric key: PCRs {pcrs:?} no longer hold the values it was sealed to (boot chain or firmware changed)")]
    PcrMismatch {
        /// Whose key.
        role: Role,
        /// The PCRs in the policy.
        pcrs: Vec<u8>,
    },
    /// No tenant is assigned, so there is no tenant key.
    #[error("the node has no tenant keys (not assigned to a tenant)")]
    NotAssigned,
    /// The caller's role may not perform this operation.
    #[error("a {caller} may not {action}")]
    NotPermitted {
        /// Who asked.
        caller: Role,
        /// What was asked.
        action: &'static str,
    },
    /// The operation destroys data and was not confirmed.
    #[error("{action} destroys data encrypted under the current keys; confirm it explicitly")]
    ConfirmationRequired {
        /// What was asked.
        action: &'static str,
    },
    /// An envelope could not be parsed or opened.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// A signature did not verify, or its key is unusable.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// A console public key is not usable.
    #[error("invalid console key {name:?}: {reason}")]
    InvalidConsoleKey {
        /// Console name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A tenant or console name is not acceptable.
    #[error("invalid {what} {name:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with . or -)")]
    InvalidName {
        /// "tenant name", "console name".
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// A role already has the most console keys it may register
    /// ([`crate::MAX_CONSOLES`]); names it has may still be registered again.
    #[error("the {role} has {count} console keys, the most a role may register ({max}); register one of those names again to replace its key")]
    TooManyConsoles {
        /// Whose consoles.
        role: Role,
        /// How many it has.
        count: usize,
        /// The cap.
        max: usize,
    },
    /// A console name is not known.
    #[error("no {role} console named {name:?} is registered")]
    UnknownConsole {
        /// Role the console was looked up under.
        role: Role,
        /// Name asked for.
        name: String,
    },
    /// State directory I/O failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// File or directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The state directory holds something we cannot read.
    #[error("state file {path} is invalid: {reason}")]
    CorruptState {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The state was written by a newer version of Leasehold.
    #[error("state directory {path} has format version {found}; this agentd understands up to {supported}")]
    UnsupportedStateFormat {
        /// Manifest path.
        path: PathBuf,
        /// Version found.
        found: u32,
        /// Highest version this build reads.
        supported: u32,
    },
    /// The TPM returned a value of the wrong shape.
    #[error("the TPM returned an unexpected {0}")]
    UnexpectedTpmResponse(&'static str),
    /// A fault injected by a test (feature `testing`).
    #[error("injected fault at {0:?}")]
    InjectedFault(crate::hierarchy::FaultPoint),
}

/// Errors of the envelope format and of opening an envelope.
///
/// The format errors mirror `leasehold_envelope::EnvelopeError` variant for
/// variant, with the same messages, so matches on this type keep working;
/// [`EnvelopeError::WrongRecipient`] and [`EnvelopeError::UnwrapFailed`] are
/// the failures of opening with a key in the TPM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
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
    /// The envelope ends early or a length field is inconsistent.
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
    /// The envelope is addressed to a key this node does not hold (now).
    #[error("envelope is sealed to key {envelope_fingerprint}, but the node's current {role} key is {current_fingerprint}; it was sealed to another node or to a key that has been rotated away")]
    WrongRecipient {
        /// Role asked to open.
        role: Role,
        /// Fingerprint in the envelope.
        envelope_fingerprint: String,
        /// Fingerprint of the current key.
        current_fingerprint: String,
    },
    /// RSA-OAEP unwrapping of the content key failed.
    #[error("the content key could not be unwrapped with the {0} key")]
    UnwrapFailed(Role),
    /// AES-GCM authentication failed: the envelope was modified.
    #[error("envelope authentication failed: ciphertext or header was modified")]
    AuthenticationFailed,
    /// The recipient public key is not usable for sealing.
    #[error("invalid recipient public key: {0}")]
    InvalidPublicKey(String),
}

/// Errors of verifying a node signature (an erase receipt); defined with
/// [`crate::verify_signature`] in `leasehold-envelope`.
pub use leasehold_envelope::SignatureError;

impl From<leasehold_envelope::EnvelopeError> for EnvelopeError {
    fn from(e: leasehold_envelope::EnvelopeError) -> Self {
        use leasehold_envelope::EnvelopeError as F;
        // Exhaustive on purpose: a new format error must be mapped here.
        match e {
            F::BadMagic => Self::BadMagic,
            F::UnsupportedVersion { found, supported } => {
                Self::UnsupportedVersion { found, supported }
            }
            F::Malformed(field) => Self::Malformed(field),
            F::TooLarge { what, size, max } => Self::TooLarge { what, size, max },
            F::AuthenticationFailed => Self::AuthenticationFailed,
            F::InvalidPublicKey(reason) => Self::InvalidPublicKey(reason),
        }
    }
}

impl From<leasehold_envelope::EnvelopeError> for KeyError {
    fn from(e: leasehold_envelope::EnvelopeError) -> Self {
        Self::Envelope(e.into())
    }
}

fn fmt_epoch(e: Option<u64>) -> String {
    e.map_or_else(|| "none".to_owned(), |e| e.to_string())
}

/// Result alias for this crate.
pub type Result<T, E = KeyError> = std::result::Result<T, E>;
