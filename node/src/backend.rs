//! What the controller drives: one trait per single-owner actor (keys,
//! volume, boundaries, secret store, engines) and the event sink. The agent
//! implements them over the TPM key thread, device-mapper, nftables and the
//! state directory; `fake` implements them in memory for T0 tests.
//!
//! Every method is blocking: the controller runs on its own thread and
//! calls one backend at a time, in the order of its workflows.

use std::fmt;

use leasehold_netpolicy::model::EntryDoc;
use leasehold_netpolicy::{Boundary, BoundaryDoc};
use leasehold_tpm::{
    Confirm, DiskKey, KeyChange, KeyError, PublicKeyInfo, Role, SigningKeyInfo, Status,
    SymmetricKey,
};
use serde::Serialize;
use zeroize::Zeroizing;

/// How a backend failed, so the adapter can name the D-Bus error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The request does not fit (bad argument, refused by a check).
    Invalid,
    /// A named object does not exist.
    NotFound,
    /// A system service or the kernel facility is missing.
    Unavailable,
    /// Anything else; details in the message and the log.
    Failed,
    /// The change needs the caller's confirmation (e.g. a boundary that
    /// denies everything).
    Unconfirmed,
}

/// A backend's error, already rendered (backends own their error types).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Which D-Bus error it maps to.
    pub kind: FailureKind,
    /// What happened, naming the device, path or field.
    pub message: String,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A `Failed` failure.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(FailureKind::Failed, message)
    }
}

/// The disk key and what it was made from. Not `Clone`: it moves from the
/// key thread to the one backend call that needs it and is zeroized when
/// dropped.
pub struct DiskKeyInfo {
    /// Node id (hex).
    pub node_id: String,
    /// The key.
    pub key: DiskKey,
    /// Key generation per link of the chain, widest first.
    pub generations: Vec<(String, u64)>,
}

impl fmt::Debug for DiskKeyInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskKeyInfo")
            .field("node_id", &self.node_id)
            .field("key", &"<redacted>")
            .field("generations", &self.generations)
            .finish()
    }
}

/// The key hierarchy (the TPM key thread in the agent).
pub trait KeyStore: Send + 'static {
    /// Generations, fingerprints, tenant, consoles.
    fn status(&mut self) -> Result<Status, KeyError>;
    /// A level's public key (no role check: the controller does it).
    fn public_key(&mut self, role: Role) -> Result<PublicKeyInfo, KeyError>;
    /// Whether the level's holder has made its own pair (R8).
    fn owned(&mut self, role: Role) -> Result<bool, KeyError>;
    /// The node signing key's public half.
    fn signing_key(&mut self) -> Result<SigningKeyInfo, KeyError>;
    /// Destroying rotation of `target`'s keys (erase first).
    fn rotate(&mut self, caller: Role, target: Role) -> Result<KeyChange, KeyError>;
    /// Finishes a key change that failed part-way, as the next start
    /// would: a rotation whose erase was recorded gets its new generation,
    /// anything else is completed or rolled back. `Ok(false)`: nothing was
    /// pending.
    fn finish_interrupted(&mut self) -> Result<bool, KeyError>;
    /// Routine re-key (data kept).
    fn rekey(&mut self, caller: Role, target: Role) -> Result<KeyChange, KeyError>;
    /// Assigns the node; the console key, if any, is registered in the same
    /// commit.
    fn assign(
        &mut self,
        name: &str,
        console_key: Option<&str>,
        confirm: Confirm,
    ) -> Result<KeyChange, KeyError>;
    /// Releases the node (`None`: nobody was assigned).
    fn release(&mut self, confirm: Confirm) -> Result<Option<KeyChange>, KeyError>;
    /// Registers a console key under `role`; returns its fingerprint.
    fn register_console(&mut self, role: Role, name: &str, pem: &str) -> Result<String, KeyError>;
    /// Opens an envelope sealed to `role`'s current key.
    fn open_envelope(
        &mut self,
        role: Role,
        envelope: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError>;
    /// A key for one kind of tenant data, derived from the disk key.
    fn data_key(&mut self, purpose: &str) -> Result<SymmetricKey, KeyError>;
    /// The disk key.
    fn disk_key(&mut self) -> Result<DiskKeyInfo, KeyError>;
    /// Signs with the node signing key.
    fn sign(&mut self, data: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// Makes the pre-generated next key generations that are missing, so a
    /// rotation waits for no key generation. Returns how many were made.
    fn prepare_standby(&mut self) -> Result<usize, KeyError> {
        Ok(0)
    }
}

/// What wiping the kernel's copy of the disk key found, read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Wiped {
    /// No volume was ever initialized.
    NoVolume,
    /// The volume was not mapped: the kernel held no key.
    NotMapped,
    /// The crypt table was replaced and read back without a key.
    Wiped,
}

/// Result of a remake after a key change, for the erase receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Remade {
    /// Volume id.
    pub id: String,
    /// Device.
    pub device: String,
    /// Key generations before.
    pub before: Vec<(String, u64)>,
    /// Key generations after.
    pub after: Vec<(String, u64)>,
    /// Milliseconds from the start of the teardown to the mounted new filesystem.
    pub millis: u64,
    /// The old mapping was still held open (its key is wiped; removal deferred).
    pub deferred: bool,
}

/// The tenant's encrypted volume.
pub trait VolumeStore: Send + 'static {
    /// Marks the volume before a key change that may replace the disk key.
    fn begin_key_change(&mut self) -> Result<(), Failure>;
    /// The key change failed or kept the disk key: back to ready.
    fn end_key_change(&mut self) -> Result<(), Failure>;
    /// Wipes the kernel's copy of the disk key and reads the table back.
    /// Fails unless the key is provably gone.
    fn wipe(&mut self) -> Result<Wiped, Failure>;
    /// After a failed key change: opens the volume again if `k` is still its key.
    fn reopen(&mut self, k: &DiskKeyInfo) -> Result<(), Failure>;
    /// After the disk key changed: a new empty filesystem under `k`.
    fn remake(&mut self, k: &DiskKeyInfo, reason: &str) -> Result<Option<Remade>, Failure>;
    /// Initializes `device` under `k`.
    fn init(&mut self, device: &str, force: bool, k: &DiskKeyInfo) -> Result<(), Failure>;
    /// Id and device of the initialized volume (None: none).
    fn describe(&mut self) -> Result<Option<(String, String)>, Failure>;
    /// Checks, writing nothing, everything `init` needs (the device, the
    /// kernel's dm-crypt, the filesystem tools); returns what `init` would
    /// erase, in words ("/dev/vdb (512 MiB)"). Runs before the caller is
    /// asked to confirm.
    fn check_init(&mut self, device: &str, force: bool) -> Result<String, Failure>;
    /// Why the volume is failed or stuck (recorded but not usable: an
    /// initialization that never finished, a remake or open that failed),
    /// or None (no volume, or a usable one).
    fn failed(&mut self) -> Result<Option<String>, Failure>;
    /// Drops the record of a failed or stuck volume; a mapping left of it
    /// is removed first (its key wiped), the device is not written.
    /// Returns the device it named (None: there was no volume).
    fn forget(&mut self) -> Result<Option<String>, Failure>;
}

/// One change of the boundaries (documents already parsed).
#[derive(Debug, Clone)]
pub enum BoundaryChange {
    /// Landlord: replace the cluster boundary.
    SetCluster(BoundaryDoc),
    /// Landlord: replace the failsafe entries.
    SetFailsafe(Vec<EntryDoc>),
    /// Landlord: add or remove peers of an entry or group.
    EditPeers {
        /// `entry` or `@group`.
        target: String,
        /// Peers.
        peers: Vec<String>,
        /// Add (true) or remove.
        add: bool,
    },
    /// Landlord: lift every boundary (refused unless confirmed).
    Remove {
        /// The caller confirmed the node is left unfenced.
        confirm: bool,
    },
    /// Landlord: replace the cluster boundary; a document that denies
    /// everything (no allow entry, no failsafe) needs `confirm`; with
    /// `revert_after` (seconds) the previous boundary comes back unless
    /// [`BoundaryChange::ConfirmPending`] arrives in time.
    SetClusterWith {
        /// The document.
        doc: BoundaryDoc,
        /// The caller confirmed a change that denies everything.
        confirm: bool,
        /// Revert unless confirmed within this many seconds.
        revert_after: Option<u32>,
    },
    /// Landlord: replace the failsafe entries; removing every one (or
    /// leaving a boundary that denies everything) needs `confirm`.
    SetFailsafeWith {
        /// The entries.
        entries: Vec<EntryDoc>,
        /// The caller confirmed.
        confirm: bool,
    },
    /// Landlord: keep the boundary set with a revert deadline.
    ConfirmPending,
    /// The agent: the revert deadline (unix seconds) it armed has come.
    RevertPending {
        /// The deadline the timer was armed for (a later set re-arms).
        deadline: u64,
    },
    /// Tenant: set the sub-boundary, narrowing it to fit if asked.
    SetSub {
        /// The document.
        doc: BoundaryDoc,
        /// Narrow instead of refusing.
        narrow: bool,
    },
    /// Tenant (or a change of tenant): drop the sub-boundary.
    ClearSub,
}

/// What a boundary change did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoundaryApplied {
    /// Warnings (e.g. an SSH session the change cuts).
    pub warnings: Vec<String>,
    /// What narrowing cut from a sub-boundary.
    pub cut: Vec<String>,
    /// Peers added or removed.
    pub peers_changed: Option<usize>,
}

/// The boundaries (nftables in the agent).
pub trait BoundaryStore: Send + 'static {
    /// Applies and stores one change; nothing changes unless all of it does.
    fn change(&mut self, c: BoundaryChange) -> Result<BoundaryApplied, Failure>;

    /// What an engine's egress sub-boundary must lie inside: the tenant's
    /// sub-boundary, or the cluster boundary when the tenant has none
    /// (`None`: no boundary is enforced, so nothing can widen it). The
    /// default cannot tell, and a spec with `egress` is refused until the
    /// backend implements it (fails closed).
    fn engine_egress_limit(&mut self) -> Result<Option<Boundary>, Failure> {
        Err(Failure::new(
            FailureKind::Unavailable,
            "the boundary backend cannot say the tenant's sub-boundary yet, so an engine's egress cannot be checked",
        ))
    }
}

/// A stored secret's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEntry {
    /// Name.
    pub name: String,
    /// Payload bytes.
    pub size: u64,
    /// Seconds since the epoch.
    pub stored_at: u64,
}

/// The tenant's secret store.
pub trait SecretStore: Send + 'static {
    /// Encrypts and stores (replaces) a secret.
    fn put(
        &mut self,
        key: &SymmetricKey,
        name: &str,
        payload: &[u8],
    ) -> Result<SecretEntry, Failure>;
    /// Removes one (`NotFound` if absent).
    fn remove(&mut self, name: &str) -> Result<(), Failure>;
    /// Removes every secret; returns how many there were.
    fn purge(&mut self) -> Result<usize, Failure>;
    /// Removes the secrets stored under another key than `key`, the
    /// store's key now (left by a destroying change cut short between its
    /// commit and its purge); returns how many.
    fn purge_stale(&mut self, key: &SymmetricKey) -> Result<usize, Failure>;
    /// Every stored secret.
    fn list(&self) -> Result<Vec<SecretEntry>, Failure>;
}

/// Where the controller reports committed changes (D-Bus signals in the agent).
pub trait Events: Send + 'static {
    /// Keeps a signed receipt (the agent writes it under `receipts/`).
    fn store_receipt(&mut self, receipt: &crate::SignedReceipt) -> Result<(), Failure>;
    /// A key change committed (whether or not everything after it worked).
    fn keys_changed(&mut self, report: &crate::ChangeReport);
    /// Records, durably, that a change of tenancy is about to be made
    /// (before the TPM change): an agent killed before the cleanup after
    /// it finds the record at start ([`Events::pending_tenancy_change`]).
    /// A failure stops the change before anything changed.
    fn begin_tenancy_change(&mut self, change: &TenancyChange) -> Result<(), Failure>;
    /// The change and everything after it ran (or it did not commit):
    /// the record goes.
    fn end_tenancy_change(&mut self);
    /// The record an earlier agent left, if any.
    fn pending_tenancy_change(&mut self) -> Option<TenancyChange>;
    /// A change of tenancy finished at start: the tenant's record of
    /// which receipts are its own is made anew (as `keys_changed` does).
    fn tenancy_recorded(&mut self, assigned: bool);
}

/// A change of tenancy (assignment or release) on its way, kept in the
/// agent's state dir from before the TPM change until everything after it
/// ran. An agent that finds it at start and whose tenant is no longer
/// `tenant_before` finishes what the killed one may not have: the previous
/// tenancy's secrets, sub-boundary, engine records and receipt record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TenancyChange {
    /// "assign" or "release".
    pub kind: String,
    /// The tenant key's fingerprint before the change (None: no tenant).
    pub tenant_before: Option<String>,
    /// The TPM change committed (the record is rewritten right after it).
    #[serde(default)]
    pub committed: bool,
    /// With `committed`: the tenant key's fingerprint after the change
    /// (None: released). A start finishes the change only while the keys
    /// are still so; changed again since, the record is stale and nothing
    /// is destroyed.
    #[serde(default)]
    pub tenant_after: Option<String>,
}

/// The backends of one node.
pub struct Backends {
    /// Keys.
    pub keys: Box<dyn KeyStore>,
    /// Volume.
    pub volume: Box<dyn VolumeStore>,
    /// Boundaries.
    pub boundaries: Box<dyn BoundaryStore>,
    /// Secret store.
    pub secrets: Box<dyn SecretStore>,
    /// Event sink.
    pub events: Box<dyn Events>,
    /// The tenant's engines ([`crate::NoEngines`] without an engine runtime).
    pub engines: Box<dyn crate::Engines>,
}
