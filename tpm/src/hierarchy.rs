//! The node's key hierarchy: one key pair and one symmetric key per level,
//! each generation tied to a secret in a TPM NV index (see docs/keys.md).

use std::path::PathBuf;

use hkdf::Hkdf;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::chain::{derive_disk_key, Link};
use crate::envelope::{seal_to, ParsedEnvelope, RecipientKey};
use crate::error::{EnvelopeError, KeyError, Result};
use crate::state::{
    ConsoleKey, Intent, IntentKind, LevelState, Manifest, SigningKeyState, StandbyState, StateDir,
    EPOCH_FORMAT, FORMAT,
};
use crate::sys::{self, Tpm, NV_BASE, NV_EPOCH};
use leasehold_envelope::attest::{
    check_request, qualifying_data, AttestContext, AttestError, LevelKeys,
};

use crate::types::{
    Confirm, DiskKey, GenerationSecret, PublicKeyInfo, Role, SigningKeyInfo, SymmetricKey, TpmKind,
};

/// Where and how to keep the keys.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// TCTI: `device:/dev/tpmrm0` in production, `swtpm:host=127.0.0.1,port=N` in tests.
    pub tcti: String,
    /// State directory (created 0700 if missing).
    pub state_dir: PathBuf,
    /// PCRs new sealed keys are bound to (empty: none).
    pub seal_pcrs: Vec<u8>,
    /// Initialise a new node even though the TPM holds Leasehold NV indices
    /// (the keys of an earlier node), destroying them. Honoured only when the
    /// state directory is empty or missing; ignored when it holds a manifest.
    pub erase_existing: bool,
}

/// Steps of a key change where a test can simulate a crash (feature `testing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// The change's first manifest write is on disk (epoch = counter + 1);
    /// the TPM epoch counter is not incremented yet.
    BeforeEpochIncrement,
    /// Re-key, assignment, standby: the intent (indices to create and
    /// retire) is recorded and the epoch counter incremented; the TPM is
    /// untouched (a standby the change discards is still there).
    AfterIntentRecorded,
    /// Destroying rotation: the manifest records the erase (intent) and the
    /// epoch counter is incremented; the old NV secret still exists.
    AfterEraseMarked,
    /// New NV secret defined; nothing else written.
    AfterNvDefine,
    /// New blobs written and fsynced; manifest still old.
    AfterBlobsWritten,
    /// Manifest replaced; old NV secret and blobs still present.
    AfterManifestReplaced,
    /// Old NV secret undefined; old blob files still present.
    AfterOldNvUndefined,
}

impl FaultPoint {
    /// The fault points of a change that creates a level before it drops
    /// the old one (re-key, assignment), in order.
    pub const ALL: [FaultPoint; 6] = [
        FaultPoint::BeforeEpochIncrement,
        FaultPoint::AfterIntentRecorded,
        FaultPoint::AfterNvDefine,
        FaultPoint::AfterBlobsWritten,
        FaultPoint::AfterManifestReplaced,
        FaultPoint::AfterOldNvUndefined,
    ];
    /// The fault points of making a standby generation, in order. The last
    /// step, the manifest naming the standby, is also its commit.
    pub const STANDBY: [FaultPoint; 4] = [
        FaultPoint::BeforeEpochIncrement,
        FaultPoint::AfterIntentRecorded,
        FaultPoint::AfterNvDefine,
        FaultPoint::AfterBlobsWritten,
    ];
    /// The fault points of a destroying rotation that promotes a standby
    /// (no new secret or blobs are made), in order.
    pub const ROTATE_STANDBY: [FaultPoint; 4] = [
        FaultPoint::BeforeEpochIncrement,
        FaultPoint::AfterEraseMarked,
        FaultPoint::AfterOldNvUndefined,
        FaultPoint::AfterManifestReplaced,
    ];
    /// The fault points of a destroying rotation (erase first), in order.
    pub const ROTATE: [FaultPoint; 6] = [
        FaultPoint::BeforeEpochIncrement,
        FaultPoint::AfterEraseMarked,
        FaultPoint::AfterOldNvUndefined,
        FaultPoint::AfterNvDefine,
        FaultPoint::AfterBlobsWritten,
        FaultPoint::AfterManifestReplaced,
    ];
}

/// What `KeyHierarchy::open` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// No state existed: the landlord pair and KL were created.
    Initialised,
    /// Existing state loaded; `recovered` leftovers of an interrupted change were removed.
    Loaded {
        /// Number of stale NV indices and files cleaned up.
        recovered: usize,
    },
}

/// The kind of key change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// New pair and new symmetric key: data under the old key is gone.
    Rotate,
    /// New pair, same symmetric key (re-wrapped): data kept.
    Rekey,
    /// Node assigned to a (new) tenant: new tenant pair and KT.
    Assign,
    /// Tenant material erased.
    Release,
}

/// A completed key change, for logs and receipts. Holds no key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyChange {
    /// Which change.
    pub kind: ChangeKind,
    /// Whose keys.
    pub role: Role,
    /// Pair generation before (`None`: there was none).
    pub generation_before: Option<u64>,
    /// Pair generation after (`None`: erased).
    pub generation_after: Option<u64>,
    /// Symmetric-key generation before.
    pub key_generation_before: Option<u64>,
    /// Symmetric-key generation after.
    pub key_generation_after: Option<u64>,
    /// Whether data encrypted under the previous disk key became unreadable.
    pub data_destroyed: bool,
    /// Fingerprint of the new public key.
    pub fingerprint_after: Option<String>,
    /// When the previous key became unrecoverable (its NV secret undefined),
    /// for a rotation, which destroys it before making the new one.
    #[serde(skip)]
    pub erased_at: Option<std::time::SystemTime>,
}

impl std::fmt::Display for KeyChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |v: Option<u64>| v.map_or_else(|| "none".to_owned(), |g| g.to_string());
        write!(
            f,
            "{:?} of {} keys: generation {} -> {}, key generation {} -> {}{}",
            self.kind,
            self.role,
            g(self.generation_before),
            g(self.generation_after),
            g(self.key_generation_before),
            g(self.key_generation_after),
            if self.data_destroyed {
                " (previous data destroyed)"
            } else {
                ""
            }
        )
    }
}

/// Status of one level, safe to show to anyone allowed to read node info.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LevelStatus {
    /// Pair generation.
    pub generation: u64,
    /// Symmetric-key generation.
    pub key_generation: u64,
    /// Public-key fingerprint.
    pub fingerprint: String,
    /// PCRs the symmetric key is sealed to.
    pub seal_pcrs: Vec<u8>,
    /// Holder's name (the tenant's name).
    pub name: Option<String>,
}

/// A quote by the attestation key: everything a verifier needs besides the
/// AK public key and its own nonce (`leasehold_envelope::attest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// Marshalled TPMS_ATTEST (ATTEST_QUOTE).
    pub attest: Vec<u8>,
    /// RSASSA-PKCS1-v1_5 SHA-256 signature over `attest`.
    pub signature: Vec<u8>,
    /// (PCR, sha256 value), ascending.
    pub pcr_values: Vec<(u32, Vec<u8>)>,
    /// The context text whose hash (with the nonce) is the quote's extraData.
    pub context: String,
}

/// Status of the hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// Node id (hex).
    pub node_id: String,
    /// Hardware or software TPM.
    pub tpm_kind: TpmKind,
    /// Landlord level.
    pub landlord: LevelStatus,
    /// Tenant level, if assigned.
    pub tenant: Option<LevelStatus>,
    /// Registered consoles: (role, name, fingerprint).
    pub consoles: Vec<(Role, String, String)>,
}

/// The key hierarchy of one node. One owner at a time: callers serialise
/// access (the daemon keeps it in a single task).
#[derive(Debug)]
pub struct KeyHierarchy {
    tpm: Tpm,
    dir: StateDir,
    manifest: Manifest,
    seal_pcrs: Vec<u8>,
    tpm_id: String,
    /// The TPM epoch counter's value as last read or incremented.
    epoch: u64,
    /// The step to fail at, and whether as a crash (`true`) or as an error
    /// the process survives (`false`).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    fault: Option<(FaultPoint, bool)>,
    /// Key pairs this instance generated in the TPM (tests: a rotation that
    /// promotes a standby generates none).
    #[cfg(feature = "testing")]
    pairs_created: u64,
}

/// Secrets derived from a generation secret. Each has its own label so no
/// value is reused for two purposes.
fn derive32(g: &GenerationSecret, label: &str) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(None, g.expose_secret());
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's output limit.
    let _ = hk.expand(label.as_bytes(), out.as_mut());
    out
}
const RSA_AUTH: &str = "leasehold/rsa-auth/v1";
const SEAL_AUTH: &str = "leasehold/seal-auth/v1";
const SEAL_MASK: &str = "leasehold/seal-mask/v1";
/// Blob file of the node signing key (".pair" so leftovers of an interrupted
/// creation are garbage-collected like other blobs).
const SIGNING_KEY_FILE: &str = "signing.pair";
/// Blob file of the attestation key (".pair": garbage-collected likewise).
const ATTEST_KEY_FILE: &str = "attest.pair";

fn nv_index_for(role: Role, generation: u64) -> u32 {
    NV_BASE + role.index() * 0x100 + u32::try_from(generation & 0xff).unwrap_or(0)
}

fn xor32(a: &[u8; 32], b: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b)) {
        *o = x ^ y;
    }
    out
}

/// What the read-only checks at open found to be finished.
#[derive(Debug, Default)]
struct Plan {
    /// The manifest is one write ahead of the counter (crash between the
    /// two): increment it.
    increment_epoch: bool,
    /// The manifest has no epoch yet (formats 1, 2, or an interrupted
    /// upgrade): define the counter and record its value.
    migrate: bool,
}

/// A file name the manifest may refer to: a plain name inside the state
/// directory.
fn plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

impl KeyHierarchy {
    /// Connects to the TPM, loads the state (or creates the landlord level on
    /// first start) and finishes any interrupted change. Whatever it cannot
    /// explain (no manifest while the TPM holds Leasehold keys, an NV index
    /// the manifest does not account for, a manifest older or newer than the
    /// TPM's epoch counter, a link in place of a state file, an unusable
    /// signing key) is refused before anything is changed.
    pub fn open(cfg: &KeyConfig) -> Result<(Self, Opened)> {
        let seal_pcrs = sys::normalise_pcrs(&cfg.seal_pcrs)?;
        let dir = StateDir::new(&cfg.state_dir)?;
        let mut tpm = Tpm::connect(&cfg.tcti)?;
        let tpm_id = tpm.identity();
        match dir.read_manifest()? {
            Some(manifest) => {
                if manifest.tpm_id != tpm_id {
                    return Err(KeyError::DifferentTpm {
                        path: dir.manifest_path(),
                    });
                }
                if cfg.erase_existing {
                    tracing::warn!(dir = %dir.root().display(), "ignoring the request to erase the TPM's keys: the state directory holds a manifest");
                }
                let mut me = Self {
                    tpm,
                    dir,
                    manifest,
                    seal_pcrs,
                    tpm_id,
                    epoch: 0,
                    fault: None,
                    #[cfg(feature = "testing")]
                    pairs_created: 0,
                };
                let plan = me.check()?;
                let initialising = me.intent_kind() == Some(IntentKind::Init);
                // Everything is explained: from here on changes are allowed.
                me.dir.prepare()?;
                let recovered = me.recover(plan)?;
                if initialising {
                    return Ok((me, Opened::Initialised));
                }
                // A state directory from before the signing key existed
                // (format 1) gets one now, committed like any other change.
                if me.manifest.signing.is_none() {
                    let signing = me.create_signing_key()?;
                    let mut next = me.manifest.clone();
                    next.signing = Some(signing);
                    me.commit_manifest(next)?;
                    tracing::info!("created the node signing key");
                }
                // Likewise the attestation key, for state from before quotes.
                if me.manifest.attestation.is_none() {
                    let ak = me.create_attestation_key()?;
                    let mut next = me.manifest.clone();
                    next.attestation = Some(ak);
                    me.commit_manifest(next)?;
                    tracing::info!("created the attestation key");
                }
                Ok((me, Opened::Loaded { recovered }))
            }
            None => {
                let indices = tpm.nv_indices()?;
                let files = dir.blob_files()?;
                if !indices.is_empty() || !files.is_empty() {
                    if !cfg.erase_existing {
                        return Err(KeyError::StateMissing {
                            dir: dir.root().to_path_buf(),
                            nv_indices: indices.len(),
                            files: files.len(),
                        });
                    }
                    let entries = dir.entries()?;
                    if !entries.is_empty() {
                        return Err(KeyError::EraseRefused {
                            dir: dir.root().to_path_buf(),
                            entries: entries.len(),
                        });
                    }
                    // Confirmed by the operator (--init-erase-tpm) on an
                    // empty directory: the only way the agent erases keys no
                    // manifest accounts for.
                    tracing::warn!(
                        dir = %dir.root().display(),
                        count = indices.len(),
                        "erasing the TPM's Leasehold NV indices as asked, to initialise a new node"
                    );
                    for idx in indices {
                        tpm.nv_undefine(idx)?;
                    }
                }
                dir.prepare()?;
                // The first manifest is written before the TPM is touched: it
                // records the first start as an intent (create the epoch
                // counter), so a crash at any step is finished at the next
                // start instead of leaving keys no manifest accounts for.
                let node_id = hex::encode(&tpm.random(16)?[..]);
                let genesis = Manifest {
                    format: FORMAT,
                    node_id,
                    tpm_id: tpm_id.clone(),
                    landlord: placeholder_level(),
                    tenant: None,
                    consoles: Vec::new(),
                    signing: None,
                    attestation: None,
                    erasing: None,
                    epoch: None,
                    intent: Some(Intent {
                        kind: IntentKind::Init,
                        role: Role::Landlord,
                        creates: vec![NV_EPOCH],
                        retires: Vec::new(),
                    }),
                };
                dir.write_manifest(&genesis)?;
                let mut me = Self {
                    tpm,
                    dir,
                    manifest: genesis,
                    seal_pcrs,
                    tpm_id,
                    epoch: 0,
                    fault: None,
                    #[cfg(feature = "testing")]
                    pairs_created: 0,
                };
                me.initialise()?;
                Ok((me, Opened::Initialised))
            }
        }
    }

    /// Read-only checks of the loaded manifest against the TPM: nothing is
    /// changed here, so a refusal leaves everything as it was.
    fn check(&mut self) -> Result<Plan> {
        let path = self.dir.manifest_path();
        let m = self.manifest.clone();
        let mut plan = Plan::default();
        let initialising = self.intent_kind() == Some(IntentKind::Init);
        if initialising {
            // An interrupted first start: nothing but the intent is recorded.
            if m.landlord.generation != 0
                || m.tenant.is_some()
                || m.signing.is_some()
                || m.attestation.is_some()
            {
                return Err(KeyError::CorruptState {
                    path,
                    reason: "a first start's manifest that names keys".into(),
                });
            }
        }
        let levels: Vec<(Role, &LevelState)> = Role::ALL
            .into_iter()
            .filter_map(|r| m.level(r).map(|l| (r, l)))
            .filter(|_| !initialising)
            .collect();

        for name in m.files().into_iter().filter(|_| !initialising) {
            if !plain_file_name(&name) {
                return Err(KeyError::CorruptState {
                    path,
                    reason: format!(
                        "file name {name:?} is not a plain name in the state directory"
                    ),
                });
            }
        }
        for &(role, l) in &levels {
            if let Some(s) = &l.standby {
                // A standby is exactly the level's next generation.
                if s.generation != l.generation + 1
                    || s.key_generation != l.key_generation + 1
                    || s.nv_index != nv_index_for(role, s.generation)
                {
                    return Err(KeyError::CorruptState {
                        path,
                        reason: format!(
                            "the {role} level of generation {} (key generation {}) names a standby of generation {}, key generation {}, NV index 0x{:08x}",
                            l.generation, l.key_generation, s.generation, s.key_generation, s.nv_index
                        ),
                    });
                }
            }
            {
                if l.nv_index != nv_index_for(role, l.generation) {
                    return Err(KeyError::CorruptState {
                        path,
                        reason: format!(
                            "the {role} level of generation {} names NV index 0x{:08x}, not 0x{:08x}",
                            l.generation,
                            l.nv_index,
                            nv_index_for(role, l.generation)
                        ),
                    });
                }
            }
        }

        let defined = self.tpm.nv_indices()?;
        let migrating = self.intent_kind() == Some(IntentKind::Migrate);
        // An interrupted upgrade or first start may have left the counter
        // defined but never written (unreadable); they redo it.
        let unsure_counter = (migrating || initialising) && m.epoch.is_none();
        let counter = if unsure_counter {
            self.tpm.epoch_read().ok().flatten()
        } else {
            self.tpm.epoch_read()?
        };
        let legacy = m.format < EPOCH_FORMAT;
        match (m.epoch, counter) {
            (Some(e), Some(c)) if e == c => self.epoch = c,
            (Some(e), Some(c)) if c.checked_add(1) == Some(e) => {
                plan.increment_epoch = true;
                self.epoch = c;
            }
            // Before epochs: the counter does not exist yet.
            (None, None) if legacy => plan.migrate = true,
            // An upgrade interrupted after its intent was recorded.
            (None, _) if migrating => plan.migrate = true,
            // A first start interrupted before the counter was committed;
            // the check of NV indices below makes sure that is all it is.
            (None, _) if initialising => {}
            (e, c) => {
                return Err(KeyError::StaleState {
                    path,
                    manifest_epoch: e,
                    tpm_epoch: c,
                })
            }
        }

        let secrets: Vec<u32> = defined.iter().copied().filter(|i| *i != NV_EPOCH).collect();
        let named: Vec<u32> = levels
            .iter()
            .flat_map(|(_, l)| {
                std::iter::once(l.nv_index).chain(l.standby.iter().map(|s| s.nv_index))
            })
            .collect();
        if legacy {
            // Without an epoch a stale copy cannot be told from an
            // interrupted change, so only a clean state is upgraded.
            if m.erasing.is_some() || secrets.iter().any(|i| !named.contains(i)) {
                return Err(KeyError::UnfinishedLegacyChange {
                    path,
                    format: m.format,
                });
            }
        } else {
            let explained = |i: &u32| {
                named.contains(i)
                    || m.intent
                        .as_ref()
                        .is_some_and(|t| t.indices().any(|x| x == *i))
            };
            if let Some(&idx) = secrets.iter().find(|i| !explained(i)) {
                return Err(KeyError::UnknownNvIndex {
                    path,
                    nv_index: idx,
                });
            }
        }
        for &(role, level) in &levels {
            if defined.contains(&level.nv_index) {
                continue;
            }
            // An erase-first rotation may already have undefined it.
            let being_erased = m.intent.as_ref().is_some_and(|t| {
                t.kind == IntentKind::Rotate
                    && t.role == role
                    && t.retires.contains(&level.nv_index)
            });
            if !being_erased {
                return Err(KeyError::KeyErased {
                    role,
                    generation: level.generation,
                    nv_index: level.nv_index,
                });
            }
        }
        for &(role, level) in &levels {
            // No change undefines a standby while the manifest names it.
            if let Some(s) = level
                .standby
                .as_ref()
                .filter(|s| !defined.contains(&s.nv_index))
            {
                return Err(KeyError::StandbyErased {
                    path,
                    role,
                    generation: s.generation,
                    nv_index: s.nv_index,
                });
            }
        }

        // The signing key is needed after every destroying change (the
        // receipt): load it now rather than find it broken after an erase.
        if let Some(k) = &m.signing {
            let file = self.dir.path(&k.key_file);
            let blob = match self.dir.read_blob(&k.key_file) {
                Err(KeyError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Err(KeyError::CorruptState {
                        path: file,
                        reason:
                            "keys.json names this node signing key, but the file does not exist"
                                .into(),
                    })
                }
                r => r?,
            };
            let fp = self.tpm.signing_fingerprint(&blob, &file)?;
            if fp != k.fingerprint {
                return Err(KeyError::CorruptState {
                    path: file,
                    reason: format!(
                        "the TPM loads a key with fingerprint {fp} from it, but keys.json records {}",
                        k.fingerprint
                    ),
                });
            }
        }
        if let Some(k) = &m.attestation {
            let file = self.dir.path(&k.key_file);
            let blob = match self.dir.read_blob(&k.key_file) {
                Err(KeyError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Err(KeyError::CorruptState {
                        path: file,
                        reason: "keys.json names this attestation key, but the file does not exist"
                            .into(),
                    })
                }
                r => r?,
            };
            let (fp, restricted) = self.tpm.attestation_fingerprint(&blob, &file)?;
            // A quote is worth something only from a restricted key.
            if fp != k.fingerprint || !restricted {
                return Err(KeyError::CorruptState {
                    path: file,
                    reason: format!(
                        "the TPM loads a key with fingerprint {fp} (restricted: {restricted}) from it, but keys.json records the restricted key {}",
                        k.fingerprint
                    ),
                });
            }
        }
        Ok(plan)
    }

    /// Finishes what `check` found interrupted: the epoch increment, the
    /// upgrade to epochs, and the change recorded in the manifest's intent.
    /// Only indices that intent names are undefined.
    fn recover(&mut self, plan: Plan) -> Result<usize> {
        let mut n = 0;
        if plan.increment_epoch {
            self.tpm.epoch_increment()?;
            self.epoch += 1;
            tracing::info!(epoch = self.epoch, "finished an interrupted manifest write");
            n += 1;
        }
        if plan.migrate {
            self.migrate()?;
        }
        if let Some(intent) = self
            .manifest
            .intent
            .clone()
            .filter(|i| i.kind == IntentKind::Init)
        {
            // What the interrupted first start created is dropped and made
            // again; the epoch counter is kept.
            n += self.settle(&intent)?;
            n += self.dir.collect_garbage(&[])?.len();
            self.initialise()?;
            tracing::info!("finished an interrupted first start");
            return Ok(n + 1);
        }
        if let Some(intent) = self.manifest.intent.clone() {
            let unfinished_erase = intent.kind == IntentKind::Rotate
                && self
                    .manifest
                    .level(intent.role)
                    .is_some_and(|l| intent.retires.contains(&l.nv_index));
            if unfinished_erase {
                // The erase was committed by the intent: finish it with a
                // new generation, never by bringing the old key back.
                self.finish_erase(intent.role)?;
                tracing::info!(role = %intent.role, "finished an interrupted destroying rotation");
            } else {
                n += self.settle(&intent)?;
                let mut done = self.manifest.clone();
                done.intent = None;
                self.commit_manifest(done)?;
                tracing::info!(kind = ?intent.kind, role = %intent.role, "finished an interrupted key change");
            }
            n += 1;
        }
        n += self.dir.collect_garbage(&self.manifest.files())?.len();
        if n > 0 {
            tracing::info!(count = n, "recovered from an interrupted key change");
        }
        Ok(n)
    }

    /// Undefines the indices of `intent` that the manifest does not name:
    /// created but not committed (rolled back), or committed as retired.
    fn settle(&mut self, intent: &Intent) -> Result<usize> {
        let defined = self.tpm.nv_indices()?;
        let named = self.manifest.nv_indices();
        let mut n = 0;
        for idx in intent.indices() {
            if idx != NV_EPOCH && defined.contains(&idx) && !named.contains(&idx) {
                self.tpm.nv_undefine(idx)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Defines the epoch counter, or takes over the one an interrupted
    /// upgrade or first start left (its intent names it). Returns its value.
    fn ensure_epoch_counter(&mut self) -> Result<u64> {
        if self.tpm.nv_indices()?.contains(&NV_EPOCH) {
            // Incrementing first also makes a counter that was defined but
            // never written readable.
            self.tpm.epoch_increment()?;
            self.tpm
                .epoch_read()?
                .ok_or(KeyError::UnexpectedTpmResponse("epoch counter vanished"))
        } else {
            self.tpm.epoch_define()
        }
    }

    /// First start, from the genesis manifest on disk (placeholder landlord,
    /// intent Init): epoch counter, then the landlord level and the signing
    /// key under an intent naming the landlord's index, then the commit.
    fn initialise(&mut self) -> Result<()> {
        if self.manifest.epoch.is_none() {
            self.epoch = self.ensure_epoch_counter()?;
        }
        let idx = nv_index_for(Role::Landlord, 1);
        self.record_intent(
            self.manifest.clone(),
            IntentKind::Init,
            Role::Landlord,
            vec![idx],
            Vec::new(),
        )?;
        let kl = SymmetricKey::from_zeroizing(&self.tpm.random32()?);
        let level = self.create_level(Role::Landlord, 1, 1, &kl)?;
        let mut first = self.manifest.clone();
        first.landlord = level;
        first.signing = Some(self.create_signing_key()?);
        first.attestation = Some(self.create_attestation_key()?);
        first.intent = None;
        self.commit_manifest(first)
    }

    fn intent_kind(&self) -> Option<IntentKind> {
        self.manifest.intent.as_ref().map(|i| i.kind)
    }

    /// Upgrade to epochs: record the intent, define the counter, commit.
    fn migrate(&mut self) -> Result<()> {
        if self.manifest.intent.is_none() {
            let mut next = self.manifest.clone();
            next.format = FORMAT;
            next.intent = Some(Intent {
                kind: IntentKind::Migrate,
                role: Role::Landlord,
                creates: vec![NV_EPOCH],
                retires: Vec::new(),
            });
            self.dir.write_manifest(&next)?;
            self.manifest = next;
        }
        self.epoch = self.ensure_epoch_counter()?;
        let mut next = self.manifest.clone();
        next.intent = None;
        self.commit_manifest(next)?;
        tracing::info!(
            epoch = self.epoch,
            "state directory upgraded to manifest format {FORMAT}"
        );
        Ok(())
    }

    /// Writes `next` with epoch = counter + 1, then increments the counter.
    /// Every manifest write goes through here, so the manifest on disk is
    /// always at the counter's value or one ahead (a crash in between).
    fn commit_manifest(&mut self, mut next: Manifest) -> Result<()> {
        let epoch = self
            .epoch
            .checked_add(1)
            .ok_or(KeyError::UnexpectedTpmResponse(
                "epoch counter at its maximum",
            ))?;
        next.format = FORMAT;
        next.epoch = Some(epoch);
        self.dir.write_manifest(&next)?;
        self.manifest = next;
        self.checkpoint(FaultPoint::BeforeEpochIncrement)?;
        self.tpm.epoch_increment()?;
        self.epoch = epoch;
        Ok(())
    }

    /// Records the change about to be made (the indices it will create and
    /// retire) before the TPM is touched.
    fn record_intent(
        &mut self,
        mut next: Manifest,
        kind: IntentKind,
        role: Role,
        creates: Vec<u32>,
        retires: Vec<u32>,
    ) -> Result<()> {
        next.intent = Some(Intent {
            kind,
            role,
            creates,
            retires,
        });
        self.commit_manifest(next)
    }

    #[allow(unused_variables)]
    fn checkpoint(&mut self, p: FaultPoint) -> Result<()> {
        #[cfg(feature = "testing")]
        if let Some((at, crash)) = self.fault.filter(|(at, _)| *at == p) {
            self.fault = None;
            if crash {
                return Err(KeyError::InjectedFault(at));
            }
            return Err(KeyError::Io {
                op: "injected failure",
                path: self.dir.manifest_path(),
                source: std::io::Error::other(format!("{at:?}")),
            });
        }
        Ok(())
    }

    /// Makes the next key change fail at `p`, as if the process died there.
    #[cfg(feature = "testing")]
    pub fn inject_fault(&mut self, p: FaultPoint) {
        self.fault = Some((p, true));
    }

    /// Makes the next key change fail at `p` with an I/O error the process
    /// survives (a TPM or disk error rather than a crash).
    #[cfg(feature = "testing")]
    pub fn inject_error(&mut self, p: FaultPoint) {
        self.fault = Some((p, false));
    }

    /// Creates the NV secret, key pair and sealed key of one level generation
    /// and writes their blobs. The manifest is not touched.
    fn create_level(
        &mut self,
        role: Role,
        generation: u64,
        key_generation: u64,
        key: &SymmetricKey,
    ) -> Result<LevelState> {
        let nv_index = nv_index_for(role, generation);
        let g = GenerationSecret::from_zeroizing(&self.tpm.random32()?);
        self.tpm.nv_define_secret(nv_index, &g)?;
        self.checkpoint(FaultPoint::AfterNvDefine)?;

        let (pair_blob, recipient) = self.tpm.create_decrypt_key(&derive32(&g, RSA_AUTH))?;
        #[cfg(feature = "testing")]
        {
            self.pairs_created += 1;
        }
        let masked = xor32(key.expose_secret(), &derive32(&g, SEAL_MASK));
        let pcrs = self.seal_pcrs.clone();
        let sealed_blob = self
            .tpm
            .create_sealed(&masked, &derive32(&g, SEAL_AUTH), &pcrs)?;
        let pair_file = format!("{role}-g{generation}.pair");
        let sealed_file = format!("{role}-g{generation}.sealed");
        self.dir.write_blob(&pair_file, &pair_blob)?;
        self.dir.write_blob(&sealed_file, &sealed_blob)?;
        self.checkpoint(FaultPoint::AfterBlobsWritten)?;
        Ok(LevelState {
            generation,
            key_generation,
            nv_index,
            pair_file,
            sealed_file,
            public_pem: recipient.to_pem(),
            fingerprint: recipient.fingerprint_hex(),
            seal_pcrs: pcrs,
            name: None,
            owned: false,
            standby: None,
        })
    }

    /// Creates the node signing key and writes its blob. The manifest is not
    /// touched: until it names the blob, a crash leaves a stray file that the
    /// next start removes.
    fn create_signing_key(&mut self) -> Result<SigningKeyState> {
        let (blob, public) = self.tpm.create_signing_key()?;
        self.dir.write_blob(SIGNING_KEY_FILE, &blob)?;
        Ok(SigningKeyState {
            key_file: SIGNING_KEY_FILE.to_owned(),
            public_pem: public.to_pem(),
            fingerprint: public.fingerprint_hex(),
        })
    }

    /// Creates the attestation key and writes its blob. The manifest is not
    /// changed here: the caller commits it.
    fn create_attestation_key(&mut self) -> Result<SigningKeyState> {
        let (blob, public) = self.tpm.create_attestation_key()?;
        self.dir.write_blob(ATTEST_KEY_FILE, &blob)?;
        Ok(SigningKeyState {
            key_file: ATTEST_KEY_FILE.to_owned(),
            public_pem: public.to_pem(),
            fingerprint: public.fingerprint_hex(),
        })
    }

    fn attestation_state(&self) -> Result<&SigningKeyState> {
        self.recorded_key(self.manifest.attestation.as_ref(), "attestation key")
    }

    /// A key `open` always records (so missing means a broken invariant).
    fn recorded_key<'a>(
        &self,
        k: Option<&'a SigningKeyState>,
        what: &str,
    ) -> Result<&'a SigningKeyState> {
        k.ok_or_else(|| KeyError::CorruptState {
            path: self.dir.manifest_path(),
            reason: format!("the manifest names no {what}"),
        })
    }

    /// The attestation key's public half (PEM and fingerprint). Made once
    /// per node; unchanged by every key change. Any role may read it.
    pub fn attestation_key(&self) -> Result<SigningKeyInfo> {
        self.attestation_state().map(SigningKeyState::info)
    }

    /// The context a quote binds now: node id, `boot_id`, and each level's
    /// generations and fingerprint.
    pub fn attest_context(&self, boot_id: &str) -> AttestContext {
        let lv = |l: &LevelState| LevelKeys {
            generation: l.generation,
            key_generation: l.key_generation,
            fingerprint: l.fingerprint.clone(),
        };
        AttestContext {
            node_id: self.manifest.node_id.clone(),
            boot_id: boot_id.to_owned(),
            landlord: lv(&self.manifest.landlord),
            tenant: self.manifest.tenant.as_ref().map(lv),
        }
    }

    /// TPM2_Quote by the attestation key over `pcrs` (sha256 bank) with
    /// qualifying data SHA-256(nonce, context): the quote proves the PCRs
    /// and the node's current key state at the time of this nonce. Nonce
    /// 8..=64 bytes, PCRs 1..=24 distinct indices in 0..=23. Any role may
    /// ask: a quote reveals no secret.
    pub fn quote(&mut self, nonce: &[u8], pcrs: &[u32], boot_id: &str) -> Result<Quote> {
        let pcrs = check_request(nonce, pcrs).map_err(|e| match e {
            AttestError::InvalidNonce { .. } => KeyError::InvalidQuote {
                field: "nonce",
                reason: e.to_string(),
            },
            other => KeyError::InvalidQuote {
                field: "pcrs",
                reason: other.to_string(),
            },
        })?;
        let context = self.attest_context(boot_id);
        // The context is made by the agent; parse it back so a bad boot id
        // is refused here instead of producing a quote no one can verify.
        let text = context.render();
        AttestContext::parse(&text).map_err(|e| KeyError::InvalidQuote {
            field: "context",
            reason: e.to_string(),
        })?;
        let qualifying = qualifying_data(nonce, &text);
        let file = self.attestation_state()?.key_file.clone();
        let blob = self.dir.read_blob(&file)?;
        let q = self
            .tpm
            .quote(&blob, &self.dir.path(&file), &qualifying, &pcrs)?;
        Ok(Quote {
            attest: q.attest,
            signature: q.signature,
            pcr_values: q
                .pcr_values
                .into_iter()
                .map(|(p, v)| (u32::from(p), v))
                .collect(),
            context: text,
        })
    }

    fn signing_state(&self) -> Result<&SigningKeyState> {
        self.recorded_key(self.manifest.signing.as_ref(), "node signing key")
    }

    /// The node signing key's public half (PEM and fingerprint). It does not
    /// change with rotations, re-keys, assignment or release. Any role may
    /// read it.
    pub fn signing_key(&self) -> Result<SigningKeyInfo> {
        self.signing_state().map(SigningKeyState::info)
    }

    /// Signs `data` with the node signing key: SHA-256 in software, then
    /// RSASSA-PKCS1-v1_5 in the TPM. Returns the 256-byte signature, which
    /// [`crate::verify_signature`] checks against [`Self::signing_key`]'s PEM.
    /// Any role may ask: a signature reveals no secret.
    pub fn sign(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        let file = self.signing_state()?.key_file.clone();
        let blob = self.dir.read_blob(&file)?;
        let digest: [u8; 32] = Sha256::digest(data).into();
        self.tpm.sign_digest(&blob, &self.dir.path(&file), &digest)
    }

    /// Switches to `next` (which carries the change's intent) and then
    /// erases the discarded levels, which that intent names as retired, and
    /// clears the intent.
    fn commit(&mut self, next: Manifest, discarded: Vec<LevelState>) -> Result<()> {
        debug_assert!(next
            .intent
            .as_ref()
            .is_some_and(|i| discarded.iter().all(|d| i.retires.contains(&d.nv_index))));
        self.commit_manifest(next)?;
        self.checkpoint(FaultPoint::AfterManifestReplaced)?;
        for old in &discarded {
            self.tpm.nv_undefine(old.nv_index)?;
        }
        self.checkpoint(FaultPoint::AfterOldNvUndefined)?;
        for old in &discarded {
            self.dir.shred(&old.pair_file)?;
            self.dir.shred(&old.sealed_file)?;
        }
        self.clear_intent()
    }

    fn clear_intent(&mut self) -> Result<()> {
        let mut done = self.manifest.clone();
        done.intent = None;
        self.commit_manifest(done)
    }

    /// Second half of a destroying rotation (also run by `recover` after
    /// a crash): the marked level's secret is undefined if still there, the
    /// level's standby is promoted (or, without one, a new generation with a
    /// new symmetric key is made) and committed, the old blobs are shredded.
    /// Returns the new level. Both indices it may undefine are in the
    /// rotation's recorded intent.
    fn finish_erase(&mut self, role: Role) -> Result<LevelState> {
        let old = self.level(role)?.clone();
        let defined = self.tpm.nv_indices()?;
        // The old secret, and a new one a crash left before the commit.
        let next_index = nv_index_for(role, old.generation + 1);
        debug_assert!(self
            .manifest
            .intent
            .as_ref()
            .is_some_and(|i| i.kind == IntentKind::Rotate
                && i.retires.contains(&old.nv_index)
                && i.creates.contains(&next_index)));
        if defined.contains(&old.nv_index) {
            self.tpm.nv_undefine(old.nv_index)?;
        }
        let mut new = match old.standby.clone() {
            // The manifest names a standby only once it is complete: promote
            // it, so the rotation generates no key.
            Some(standby) => standby.promote(None, false),
            None => {
                // A new secret a crash left before the commit.
                if defined.contains(&next_index) {
                    self.tpm.nv_undefine(next_index)?;
                }
                let key = SymmetricKey::from_zeroizing(&self.tpm.random32()?);
                self.create_level(role, old.generation + 1, old.key_generation + 1, &key)?
            }
        };
        new.name.clone_from(&old.name);
        new.owned = old.owned;
        let next = self.replace_level(role, Some(new.clone()));
        self.commit_manifest(next)?;
        self.checkpoint(FaultPoint::AfterManifestReplaced)?;
        self.dir.shred(&old.pair_file)?;
        self.dir.shred(&old.sealed_file)?;
        self.clear_intent()?;
        Ok(new)
    }

    /// Finishes a change that failed part-way in this process the way the
    /// next start would (`check`, then `recover`): a destroying rotation
    /// whose erase was recorded gets its new generation (never the old key
    /// back), any other change is completed or rolled back by its intent,
    /// and a manifest written ahead of the epoch counter has the counter
    /// catch up. `Ok(false)`: nothing was pending. The controller calls it
    /// after a rotation failed, so that a change the crate already counts
    /// as made is not reported as not made (review).
    pub fn finish_interrupted(&mut self) -> Result<bool> {
        if self.manifest.intent.is_none() && self.manifest.epoch == Some(self.epoch) {
            return Ok(false);
        }
        let plan = self.check()?;
        Ok(self.recover(plan)? > 0)
    }

    /// A change recorded but unfinished (it failed part-way in this
    /// process) must not have its intent overwritten by another: that
    /// intent is what explains an undefined secret at the next start
    /// (review: a re-key after a failed rotation cleared it, and the agent
    /// then refused to start).
    fn refuse_unfinished(&self) -> Result<()> {
        match &self.manifest.intent {
            Some(i) => Err(KeyError::ChangeUnfinished {
                kind: i.kind.as_str(),
                role: i.role,
            }),
            None => Ok(()),
        }
    }

    /// Makes the standby generation of every level that has none (or whose
    /// standby is sealed under other PCRs than configured now), so that the
    /// next destroying rotation of that level only promotes it and generates
    /// no key in the TPM. Each standby is a recorded change of its own: a
    /// crash leaves none or a complete one. Returns how many were made.
    ///
    /// Generating a pair takes up to seconds: the agent calls this at start
    /// and after it has replied to any key change (rotation, re-key,
    /// assignment, release), off the caller's path. A failure leaves the
    /// keys in use untouched; rotations then make their pair inline.
    pub fn prepare_standby(&mut self) -> Result<usize> {
        let mut made = 0;
        for role in Role::ALL {
            if self.prepare_standby_for(role)? {
                made += 1;
            }
        }
        Ok(made)
    }

    /// Whether `role`'s next destroying rotation can promote a standby.
    pub fn standby_ready(&self, role: Role) -> bool {
        self.manifest
            .level(role)
            .and_then(|l| l.standby.as_ref())
            .is_some_and(|s| s.seal_pcrs == self.seal_pcrs)
    }

    fn prepare_standby_for(&mut self, role: Role) -> Result<bool> {
        // A change that failed part-way in this process keeps its intent,
        // which a new intent would overwrite: leave it to the next start.
        self.refuse_unfinished()?;
        let made = self.make_standby(role);
        // A failure the process survives is rolled back now, so the next
        // re-key or assignment does not find the standby's index taken. A
        // crash (and its simulation) is left to the next start.
        if made
            .as_ref()
            .is_err_and(|e| !matches!(e, KeyError::InjectedFault(_)))
            && self.intent_kind() == Some(IntentKind::Standby)
        {
            match self.abandon_standby() {
                Ok(n) => {
                    tracing::warn!(%role, undefined = n, "rolled back a standby that failed part-way")
                }
                Err(e) => {
                    tracing::warn!(%role, error = %e, "could not roll back a standby that failed part-way; the next start will")
                }
            }
        }
        made
    }

    /// Rolls back a standby that failed part-way, as the next start would:
    /// the intent manifest is written again (so the disk says what memory
    /// says, e.g. after a failed directory fsync), then what the intent
    /// created and the manifest does not name is undefined and shredded,
    /// then the intent is cleared.
    fn abandon_standby(&mut self) -> Result<usize> {
        let Some(intent) = self.manifest.intent.clone() else {
            return Ok(0);
        };
        self.commit_manifest(self.manifest.clone())?;
        let n = self.settle(&intent)?;
        self.dir.collect_garbage(&self.manifest.files())?;
        self.clear_intent()?;
        Ok(n)
    }

    fn make_standby(&mut self, role: Role) -> Result<bool> {
        let Some(level) = self.manifest.level(role).cloned() else {
            return Ok(false);
        };
        if self.standby_ready(role) {
            return Ok(false);
        }
        let generation = level.generation + 1;
        let (base, stale) = self.without_standby(role);
        self.record_intent(
            base,
            IntentKind::Standby,
            role,
            vec![nv_index_for(role, generation)],
            Vec::new(),
        )?;
        self.checkpoint(FaultPoint::AfterIntentRecorded)?;
        if let Some(s) = stale {
            self.drop_standby(&s)?;
        }
        // Fresh random: a rotation replaces the symmetric key anyway.
        let key = SymmetricKey::from_zeroizing(&self.tpm.random32()?);
        let made = self.create_level(role, generation, level.key_generation + 1, &key)?;
        let mut next = self.manifest.clone();
        if let Some(l) = next.level_mut(role) {
            l.standby = Some(StandbyState::from_level(made));
        }
        // Nothing to retire, so one write both names the standby and clears
        // the intent.
        next.intent = None;
        self.commit_manifest(next)?;
        tracing::info!(%role, generation, "standby key generation made");
        Ok(true)
    }

    /// The current manifest with `role`'s standby taken out, and that
    /// standby: the base of a change that discards it.
    fn without_standby(&self, role: Role) -> (Manifest, Option<StandbyState>) {
        let mut next = self.manifest.clone();
        let standby = next.level_mut(role).and_then(|l| l.standby.take());
        (next, standby)
    }

    /// Undefines a discarded standby's secret and shreds its blobs. Called
    /// only once the manifest no longer names it and the change's recorded
    /// intent names its index.
    fn drop_standby(&mut self, s: &StandbyState) -> Result<()> {
        debug_assert!(self
            .manifest
            .intent
            .as_ref()
            .is_some_and(|i| i.indices().any(|x| x == s.nv_index)));
        if self.tpm.nv_indices()?.contains(&s.nv_index) {
            self.tpm.nv_undefine(s.nv_index)?;
        }
        self.dir.shred(&s.pair_file)?;
        self.dir.shred(&s.sealed_file)
    }

    fn level(&self, role: Role) -> Result<&LevelState> {
        self.manifest.level(role).ok_or(KeyError::NotAssigned)
    }

    fn secret(&mut self, level: &LevelState, role: Role) -> Result<GenerationSecret> {
        self.tpm
            .nv_read_secret(level.nv_index)?
            .ok_or(KeyError::KeyErased {
                role,
                generation: level.generation,
                nv_index: level.nv_index,
            })
    }

    /// Node id (hex).
    pub fn node_id(&self) -> &str {
        &self.manifest.node_id
    }

    /// One cheap TPM command (8 random bytes, thrown away): whether the
    /// TPM answers, for the agent's health check.
    pub fn ping(&mut self) -> Result<()> {
        self.tpm.random(8).map(drop)
    }

    /// Hardware or software TPM.
    pub fn tpm_kind(&self) -> TpmKind {
        self.tpm.kind()
    }

    /// Current status (no secrets).
    pub fn status(&self) -> Status {
        let lv = |l: &LevelState| LevelStatus {
            generation: l.generation,
            key_generation: l.key_generation,
            fingerprint: l.fingerprint.clone(),
            seal_pcrs: l.seal_pcrs.clone(),
            name: l.name.clone(),
        };
        Status {
            node_id: self.manifest.node_id.clone(),
            tpm_kind: self.tpm.kind(),
            landlord: lv(&self.manifest.landlord),
            tenant: self.manifest.tenant.as_ref().map(lv),
            consoles: self
                .manifest
                .consoles
                .iter()
                .map(|c| (c.role, c.name.clone(), c.fingerprint.clone()))
                .collect(),
        }
    }

    /// A level's public key as `caller` may see it: a wider level is given a
    /// narrower level's key only until that level has made its own pair
    /// (R8: after the tenant's rotation only the tenant knows UT).
    pub fn public_key_as(&self, caller: Role, role: Role) -> Result<PublicKeyInfo> {
        let l = self.level(role)?;
        if caller < role && l.owned {
            return Err(KeyError::NotPermitted {
                caller,
                action: "read this public key: its holder has made its own key pair",
            });
        }
        Self::authorize(caller, role, "read this public key")?;
        self.public_key(role)
    }

    /// A level's public key.
    pub fn public_key(&self, role: Role) -> Result<PublicKeyInfo> {
        let l = self.level(role)?;
        Ok(PublicKeyInfo {
            role,
            generation: l.generation,
            pem: l.public_pem.clone(),
            fingerprint: l.fingerprint.clone(),
        })
    }

    /// Opens an envelope addressed to `role`'s current public key; the
    /// content key is unwrapped inside the TPM.
    pub fn open_envelope(&mut self, role: Role, envelope: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let parsed = ParsedEnvelope::parse(envelope)?;
        let level = self.level(role)?.clone();
        let fp = hex::encode(parsed.recipient_fingerprint());
        if fp != level.fingerprint {
            return Err(EnvelopeError::WrongRecipient {
                role,
                envelope_fingerprint: fp,
                current_fingerprint: level.fingerprint.clone(),
            }
            .into());
        }
        let g = self.secret(&level, role)?;
        let blob = self.dir.read_blob(&level.pair_file)?;
        let content_key =
            self.tpm
                .rsa_decrypt(&blob, &derive32(&g, RSA_AUTH), parsed.wrapped_key(), role)?;
        Ok(parsed.decrypt(&content_key)?)
    }

    /// Unseals a level's symmetric key (KL, KT) into zeroizing memory.
    pub fn symmetric_key(&mut self, role: Role) -> Result<SymmetricKey> {
        let level = self.level(role)?.clone();
        let g = self.secret(&level, role)?;
        let blob = self.dir.read_blob(&level.sealed_file)?;
        let masked = self
            .tpm
            .unseal(&blob, &derive32(&g, SEAL_AUTH), &level.seal_pcrs, role)?;
        let masked: &[u8; 32] = masked[..]
            .try_into()
            .map_err(|_| KeyError::UnexpectedTpmResponse("sealed key of the wrong size"))?;
        Ok(SymmetricKey::from_zeroizing(&xor32(
            masked,
            &derive32(&g, SEAL_MASK),
        )))
    }

    /// The disk key: from KL alone, or from KL and KT once a tenant exists.
    pub fn disk_key(&mut self) -> Result<DiskKey> {
        let kl = self.symmetric_key(Role::Landlord)?;
        let kt = match self.manifest.tenant {
            Some(_) => Some(self.symmetric_key(Role::Tenant)?),
            None => None,
        };
        let mut links = vec![Link {
            label: Role::Landlord.as_str(),
            key_generation: self.manifest.landlord.key_generation,
            key: &kl,
        }];
        if let (Some(kt), Some(t)) = (&kt, &self.manifest.tenant) {
            links.push(Link {
                label: Role::Tenant.as_str(),
                key_generation: t.key_generation,
                key: kt,
            });
        }
        let node_id = hex::decode(&self.manifest.node_id).map_err(|e| KeyError::CorruptState {
            path: self.dir.manifest_path(),
            reason: format!("node_id: {e}"),
        })?;
        derive_disk_key(&node_id, &links).ok_or(KeyError::UnexpectedTpmResponse("empty key chain"))
    }

    /// A 256-bit key for one kind of tenant data (e.g. the secret store),
    /// derived from the disk key: it changes exactly when the disk key does,
    /// so every destroying rotation also erases data under it.
    pub fn data_key(&mut self, purpose: &str) -> Result<SymmetricKey> {
        let disk = self.disk_key()?;
        let hk = Hkdf::<Sha256>::new(Some(b"leasehold/data-key/v1"), disk.expose_secret());
        let mut out = Zeroizing::new([0u8; 32]);
        hk.expand(purpose.as_bytes(), out.as_mut())
            .map_err(|_| KeyError::UnexpectedTpmResponse("data-key length"))?;
        Ok(SymmetricKey::from_zeroizing(&out))
    }

    fn authorize(caller: Role, target: Role, action: &'static str) -> Result<()> {
        // A level may act on its own keys and on narrower levels' keys (R8).
        if caller > target {
            return Err(KeyError::NotPermitted { caller, action });
        }
        Ok(())
    }

    fn replace_level(&self, role: Role, level: Option<LevelState>) -> Manifest {
        let mut next = self.manifest.clone();
        match role {
            Role::Landlord => {
                if let Some(l) = level {
                    next.landlord = l;
                }
            }
            Role::Tenant => next.tenant = level,
        }
        next
    }

    /// Destroying rotation: new pair and new symmetric key for `target`.
    /// Landlord rotation replaces KL; tenant rotation replaces KT. Either
    /// changes the disk key, so it needs `Confirm::DestroyData`.
    pub fn rotate(&mut self, caller: Role, target: Role, confirm: Confirm) -> Result<KeyChange> {
        Self::authorize(caller, target, "rotate these keys")?;
        let old = self.level(target)?.clone();
        if confirm != Confirm::DestroyData {
            return Err(KeyError::ConfirmationRequired {
                action: "rotating a key pair with its symmetric key",
            });
        }
        self.refuse_unfinished()?;
        // Erase first: the old generation's secret goes before the new pair
        // is generated (seconds on some TPMs), so the erase never waits for
        // it. The mark in the manifest lets `recover` finish a rotation
        // interrupted in between.
        let mut level = old.clone();
        level.owned = old.owned || caller == target;
        // A standby sealed under other PCRs than configured now is not
        // promoted: it is dropped and the rotation makes its level inline.
        let stale = if level
            .standby
            .as_ref()
            .is_some_and(|s| s.seal_pcrs != self.seal_pcrs)
        {
            level.standby.take()
        } else {
            None
        };
        // The intent names the old index (retired at once: the caller
        // confirmed the erase) and the new one (the standby's, if any).
        let marked = self.replace_level(target, Some(level));
        self.record_intent(
            marked,
            IntentKind::Rotate,
            target,
            vec![nv_index_for(target, old.generation + 1)],
            vec![old.nv_index],
        )?;
        self.checkpoint(FaultPoint::AfterEraseMarked)?;
        self.tpm.nv_undefine(old.nv_index)?;
        let erased_at = std::time::SystemTime::now();
        self.checkpoint(FaultPoint::AfterOldNvUndefined)?;
        if let Some(s) = stale {
            self.drop_standby(&s)?;
        }
        let new = self.finish_erase(target)?;
        let change = KeyChange {
            kind: ChangeKind::Rotate,
            role: target,
            generation_before: Some(old.generation),
            generation_after: Some(new.generation),
            key_generation_before: Some(old.key_generation),
            key_generation_after: Some(new.key_generation),
            data_destroyed: true,
            fingerprint_after: Some(new.fingerprint.clone()),
            erased_at: Some(erased_at),
        };
        tracing::info!(%change, "keys rotated");
        Ok(change)
    }

    /// Routine re-key: new pair, the symmetric key re-sealed under the new
    /// generation; the disk key does not change.
    pub fn rekey(&mut self, caller: Role, target: Role) -> Result<KeyChange> {
        Self::authorize(caller, target, "re-key these keys")?;
        let old = self.level(target)?.clone();
        self.refuse_unfinished()?;
        let key = self.symmetric_key(target)?;
        let generation = old.generation + 1;
        // The new generation takes the standby's NV index: the standby is
        // discarded by this change (its index is the one the intent creates).
        let (base, standby) = self.without_standby(target);
        self.record_intent(
            base,
            IntentKind::Rekey,
            target,
            vec![nv_index_for(target, generation)],
            vec![old.nv_index],
        )?;
        self.checkpoint(FaultPoint::AfterIntentRecorded)?;
        if let Some(s) = standby {
            self.drop_standby(&s)?;
        }
        let mut new = self.create_level(target, generation, old.key_generation, &key)?;
        new.name.clone_from(&old.name);
        new.owned = old.owned || caller == target;
        let change = KeyChange {
            kind: ChangeKind::Rekey,
            role: target,
            generation_before: Some(old.generation),
            generation_after: Some(new.generation),
            key_generation_before: Some(old.key_generation),
            key_generation_after: Some(new.key_generation),
            data_destroyed: false,
            fingerprint_after: Some(new.fingerprint.clone()),
            erased_at: None,
        };
        let next = self.replace_level(target, Some(new));
        self.commit(next, vec![old])?;
        tracing::info!(%change, "keys re-keyed");
        Ok(change)
    }

    /// Assigns the node to a (new) tenant: a fresh tenant pair and KT. If a
    /// tenant already has keys they are destroyed, which needs confirmation.
    /// The previous tenant's consoles are forgotten.
    pub fn assign_tenant(
        &mut self,
        caller: Role,
        name: &str,
        confirm: Confirm,
    ) -> Result<KeyChange> {
        self.assign_tenant_with_console(caller, name, None, confirm)
    }

    /// Like [`Self::assign_tenant`], and registers the tenant console's key
    /// (as console `initial`) in the same manifest commit: the assignment
    /// and the console key exist together or not at all. The key is checked
    /// before anything changes.
    pub fn assign_tenant_with_console(
        &mut self,
        caller: Role,
        name: &str,
        console_pem: Option<&str>,
        confirm: Confirm,
    ) -> Result<KeyChange> {
        if caller != Role::Landlord {
            return Err(KeyError::NotPermitted {
                caller,
                action: "assign the node",
            });
        }
        if !valid_name(name) {
            return Err(KeyError::InvalidName {
                what: "tenant name",
                name: name.to_owned(),
            });
        }
        let old = self.manifest.tenant.clone();
        if old.is_some() && confirm != Confirm::DestroyData {
            return Err(KeyError::ConfirmationRequired {
                action: "assigning the node to a new tenant",
            });
        }
        self.refuse_unfinished()?;
        let console = console_pem
            .map(|pem| {
                RecipientKey::from_pem(pem).map_err(|e| KeyError::InvalidConsoleKey {
                    name: "initial".to_owned(),
                    reason: e.to_string(),
                })
            })
            .transpose()?;
        let (generation, key_generation) = old
            .as_ref()
            .map_or((1, 1), |o| (o.generation + 1, o.key_generation + 1));
        let key = SymmetricKey::from_zeroizing(&self.tpm.random32()?);
        // The previous tenant's standby goes with it (its index is the one
        // the new tenant level takes); the new tenant has none until prepared.
        let (base, standby) = self.without_standby(Role::Tenant);
        self.record_intent(
            base,
            IntentKind::Assign,
            Role::Tenant,
            vec![nv_index_for(Role::Tenant, generation)],
            old.iter().map(|o| o.nv_index).collect(),
        )?;
        self.checkpoint(FaultPoint::AfterIntentRecorded)?;
        if let Some(s) = standby {
            self.drop_standby(&s)?;
        }
        let mut new = self.create_level(Role::Tenant, generation, key_generation, &key)?;
        new.name = Some(name.to_owned());
        let change = KeyChange {
            kind: ChangeKind::Assign,
            role: Role::Tenant,
            generation_before: old.as_ref().map(|o| o.generation),
            generation_after: Some(new.generation),
            key_generation_before: old.as_ref().map(|o| o.key_generation),
            key_generation_after: Some(new.key_generation),
            // A first assignment destroys nothing: the disk key it replaces
            // was made from KL alone, which stays (review).
            data_destroyed: old.is_some(),
            fingerprint_after: Some(new.fingerprint.clone()),
            erased_at: None,
        };
        let mut next = self.replace_level(Role::Tenant, Some(new));
        next.consoles.retain(|c| c.role != Role::Tenant);
        if let Some(key) = console {
            next.consoles.push(ConsoleKey {
                role: Role::Tenant,
                name: "initial".to_owned(),
                pem: key.to_pem(),
                fingerprint: key.fingerprint_hex(),
            });
        }
        self.commit(next, old.into_iter().collect())?;
        tracing::info!(%change, "node assigned");
        Ok(change)
    }

    /// Releases the node: erases the tenant pair and KT. Idempotent when no
    /// tenant is assigned (`Ok(None)`).
    pub fn release_tenant(&mut self, caller: Role, confirm: Confirm) -> Result<Option<KeyChange>> {
        if caller != Role::Landlord {
            return Err(KeyError::NotPermitted {
                caller,
                action: "release the node",
            });
        }
        let Some(old) = self.manifest.tenant.clone() else {
            return Ok(None);
        };
        if confirm != Confirm::DestroyData {
            return Err(KeyError::ConfirmationRequired {
                action: "releasing the node",
            });
        }
        self.refuse_unfinished()?;
        let change = KeyChange {
            kind: ChangeKind::Release,
            role: Role::Tenant,
            generation_before: Some(old.generation),
            generation_after: None,
            key_generation_before: Some(old.key_generation),
            key_generation_after: None,
            data_destroyed: true,
            fingerprint_after: None,
            erased_at: None,
        };
        let mut next = self.replace_level(Role::Tenant, None);
        next.consoles.retain(|c| c.role != Role::Tenant);
        // The tenant's standby is retired with it.
        let mut discarded = vec![old.clone()];
        if let Some(s) = old.standby.clone() {
            discarded.push(s.promote(None, false));
        }
        // Nothing to create: the commit itself records the retirement.
        next.intent = Some(Intent {
            kind: IntentKind::Release,
            role: Role::Tenant,
            creates: Vec::new(),
            retires: discarded.iter().map(|d| d.nv_index).collect(),
        });
        self.commit(next, discarded)?;
        tracing::info!(%change, "node released");
        Ok(Some(change))
    }

    /// Registers (or replaces) a console's public key under the caller's role:
    /// a new name only while the role has fewer than [`MAX_CONSOLES`].
    pub fn register_console(&mut self, caller: Role, name: &str, pem: &str) -> Result<String> {
        if !valid_name(name) {
            return Err(KeyError::InvalidName {
                what: "console name",
                name: name.to_owned(),
            });
        }
        if caller == Role::Tenant && self.manifest.tenant.is_none() {
            return Err(KeyError::NotAssigned);
        }
        self.manifest.check_console_room(caller, name)?;
        let key = RecipientKey::from_pem(pem).map_err(|e| KeyError::InvalidConsoleKey {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
        let mut next = self.manifest.clone();
        next.consoles
            .retain(|c| !(c.role == caller && c.name == name));
        next.consoles.push(ConsoleKey {
            role: caller,
            name: name.to_owned(),
            pem: key.to_pem(),
            fingerprint: key.fingerprint_hex(),
        });
        self.commit_manifest(next)?;
        Ok(key.fingerprint_hex())
    }

    /// Seals a reply to a registered console of `role`.
    pub fn seal_to_console(&self, role: Role, name: &str, payload: &[u8]) -> Result<Vec<u8>> {
        let c = self
            .manifest
            .consoles
            .iter()
            .find(|c| c.role == role && c.name == name)
            .ok_or_else(|| KeyError::UnknownConsole {
                role,
                name: name.to_owned(),
            })?;
        let key = RecipientKey::from_pem(&c.pem)?;
        Ok(seal_to(&key, payload)?)
    }

    /// Identity of the TPM (hash of the storage primary's public area).
    pub fn tpm_id(&self) -> &str {
        &self.tpm_id
    }

    /// Reads a level's key-pair public area back from the TPM (tests assert
    /// its attributes).
    #[cfg(feature = "testing")]
    pub fn key_pair_public(&mut self, role: Role) -> Result<tss_esapi::structures::Public> {
        let l = self.level(role)?.clone();
        let blob = self.dir.read_blob(&l.pair_file)?;
        self.tpm.read_public(&blob, role)
    }

    /// Reads a level's sealed-object public area back from the TPM.
    #[cfg(feature = "testing")]
    pub fn sealed_public(&mut self, role: Role) -> Result<tss_esapi::structures::Public> {
        let l = self.level(role)?.clone();
        let blob = self.dir.read_blob(&l.sealed_file)?;
        self.tpm.read_public(&blob, role)
    }

    /// Reads the node signing key's public area back from the TPM.
    #[cfg(feature = "testing")]
    pub fn signing_key_public(&mut self) -> Result<tss_esapi::structures::Public> {
        let file = self.signing_state()?.key_file.clone();
        let blob = self.dir.read_blob(&file)?;
        self.tpm.read_signing_public(&blob, &self.dir.path(&file))
    }

    /// Loads an arbitrary key-pair blob file into this TPM (tests: a blob
    /// made by another TPM must fail clearly).
    #[cfg(feature = "testing")]
    pub fn load_foreign_pair(&mut self, path: &std::path::Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Io {
            op: "read",
            path: path.to_path_buf(),
            source,
        })?;
        let blob: crate::state::Blob =
            serde_json::from_slice(&bytes).map_err(|e| KeyError::CorruptState {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        self.tpm.read_public(&blob, Role::Landlord).map(|_| ())
    }

    /// Key pairs this instance has generated in the TPM.
    #[cfg(feature = "testing")]
    pub fn key_pairs_created(&self) -> u64 {
        self.pairs_created
    }

    /// Fingerprint of `role`'s standby public key, if it has one (tests:
    /// the promoted key is the standby's). Never given out otherwise (R8).
    #[cfg(feature = "testing")]
    pub fn standby_fingerprint(&self, role: Role) -> Option<String> {
        self.manifest
            .level(role)
            .and_then(|l| l.standby.as_ref())
            .map(|s| s.fingerprint.clone())
    }

    /// Creates a key pair in the TPM and discards it (benchmarks).
    #[cfg(feature = "testing")]
    pub fn bench_create_key_pair(&mut self) -> Result<()> {
        self.tpm.create_decrypt_key(&[7u8; 32]).map(|_| ())
    }

    /// Extends a PCR (tests: simulate a changed boot chain).
    #[cfg(feature = "testing")]
    pub fn extend_pcr(&mut self, pcr: u8, data: &[u8]) -> Result<()> {
        self.tpm.pcr_extend(pcr, data)
    }

    /// Orderly shutdown: flush and TPM2_Shutdown.
    pub fn shutdown(self) -> Result<()> {
        self.tpm.shutdown()
    }
}

fn placeholder_level() -> LevelState {
    LevelState {
        generation: 0,
        key_generation: 0,
        nv_index: 0,
        pair_file: String::new(),
        sealed_file: String::new(),
        public_pem: String::new(),
        fingerprint: String::new(),
        seal_pcrs: Vec::new(),
        name: None,
        owned: false,
        standby: None,
    }
}

// The name rule is shared with the CLIs, which check it without a TPM.
pub use leasehold_envelope::valid_name;

/// Most console keys one role may register. Each registration rewrites the
/// whole manifest (which also holds the other role's keys) and every status
/// carries the list, so it stays small. A manifest written before the cap
/// may hold more: it loads and its consoles keep working; new names are
/// refused until the role is below the cap, and a registered name may always
/// be registered again (its key replaced).
pub const MAX_CONSOLES: usize = 32;

impl SigningKeyState {
    /// Its public half, as callers see it.
    fn info(&self) -> SigningKeyInfo {
        SigningKeyInfo {
            pem: self.public_pem.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}
