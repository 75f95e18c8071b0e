//! The tenant's encrypted volume, wired to the keys (see the `storage`
//! crate for the parts, docs/storage.md for the design).
//!
//! Lifecycle and crash recovery. `volume.json` in the state dir records
//! the volume and the state of the last step that changes the device:
//!
//! - init: every check (the device, the kernel's dm-crypt, mkfs; nothing
//!   written, also run before the caller is asked to confirm) → random
//!   bytes over the device's last block (its mark, outside the mapping;
//!   every later mapping checks it first: the name may be another disk
//!   after a reboot) → metadata `initializing` → mapping, mkfs, mount →
//!   `ready`. If a step after the
//!   metadata fails, the mapping goes and so does the metadata: no volume
//!   (or, if the mapping cannot be removed, the record stays, failed).
//! - a key change that changes the disk key (tenant or landlord rotation,
//!   assignment, release): the keys change first (atomic in the TPM
//!   crate) → the old mapping is wiped and removed → metadata
//!   `initializing` with the new key's check value and generations →
//!   mapping, mkfs, mount → `ready`.
//! - before such a key change the metadata says `rekeying`; after a
//!   change that kept the disk key (or failed), `ready` again.
//! - at start: no metadata → no volume. Otherwise the disk key's check
//!   value decides: equal and `ready` or `rekeying` → open the old volume
//!   (data intact); equal and `initializing` → make it again (it held
//!   nothing yet); different and `rekeying` → the keys changed during a
//!   key change of this agent (killed before the remake): the old data is
//!   gone with the old key, so make it again, empty; different and
//!   `initializing` → it never held data (a key change came while it was
//!   failed or stuck): make it again, empty; different otherwise,
//!   or another node's metadata → refuse, touch nothing (metadata copied
//!   from elsewhere or restored from an old backup).
//!
//! So after a crash at any point the volume is the old one (intact) or a
//! new empty one, and `status` says which.
//!
//! A volume that is recorded but not usable (an initialization that never
//! finished, a failed open or remake) is *failed*: `status` says so and what
//! to do, key changes go ahead past it (a host without device-mapper holds
//! no key in the kernel: `wipe` proves that from /proc/misc), and the
//! landlord may drop its record (`forget`, confirmed).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use leasehold_node::{DiskKeyInfo, Remade, Wiped};
use leasehold_storage::{
    device, fs, keyring, mapping, mark, meta, StorageError, VolumeMeta, VolumeState,
};
use serde::Serialize;

use crate::config::StorageSection;
use crate::fsutil::write_atomic;

const META: &str = "volume.json";

/// Written by the package's postinst before it restarts the agent for an
/// upgrade: `<boot id> <pid>` of the agent to restart. That agent, and no
/// other (a stale file names another boot or process), leaves the volume
/// mapped and mounted when it stops, so the tenant's running work keeps its
/// files; the next agent adopts the mapping (`open_at_start`).
pub const KEEP_OPEN: &str = "volume.keep-open";

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Refused by a check, or the kernel refused.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The request does not fit the current state.
    #[error("{0}")]
    Invalid(String),
    /// A step failed and so did cleaning up after it (the record stays).
    #[error("{0}")]
    Failed(String),
    /// State file.
    #[error("volume metadata {path}: {reason}")]
    Meta {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// How the last open or remake went, for status and logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Runtime {
    /// Mapped and mounted.
    pub open: bool,
    /// Why it is not open, if it should be.
    pub error: Option<String>,
    /// The last lifecycle event ("opened", "recreated empty: …").
    pub event: Option<String>,
    /// A filesystem is being made right now (init or remake): a record in
    /// `initializing` is then work in progress, not a failure.
    pub working: bool,
    /// While working: the step, for `status` ("filling the device: 12%").
    pub progress: Option<String>,
}

/// Metadata (None: no volume), runtime state, (used, total) bytes when open.
pub type StatusParts = (Option<VolumeMeta>, Runtime, Option<(u64, u64)>);

/// The volume.
#[derive(Debug)]
pub struct Volume {
    cfg: StorageSection,
    dir: PathBuf,
    rt: Mutex<Runtime>,
    before_unmount: Hooks,
    /// Unmounts done (or tried) since the agent started.
    unmounts: std::sync::atomic::AtomicU64,
}

/// What holds files open on the mounted volume and must let go before it
/// is unmounted (the image uploads in progress).
type Hook = Box<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct Hooks(Mutex<Vec<Hook>>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |h| h.len());
        write!(f, "Hooks({n})")
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

use crate::crashpoint::crash_point;

/// Test hook (feature `fault-injection`): `LEASEHOLD_FAIL_AT=<step>` makes
/// that step fail as if the kernel had refused it.
#[cfg(feature = "fault-injection")]
fn fail_point(step: &str) -> Result<(), VolumeError> {
    if std::env::var("LEASEHOLD_FAIL_AT").as_deref() == Ok(step) {
        tracing::warn!(step, "LEASEHOLD_FAIL_AT: failing this step");
        return Err(VolumeError::Storage(StorageError::Dm(format!(
            "{step}: injected failure (LEASEHOLD_FAIL_AT)"
        ))));
    }
    Ok(())
}

#[cfg(not(feature = "fault-injection"))]
fn fail_point(_step: &str) -> Result<(), VolumeError> {
    Ok(())
}

impl Volume {
    /// The volume of the state dir `dir`.
    pub fn new(cfg: StorageSection, dir: &Path) -> Self {
        Volume {
            cfg,
            dir: dir.to_owned(),
            rt: Mutex::new(Runtime::default()),
            before_unmount: Hooks::default(),
            unmounts: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Unmounts done (or tried) since the agent started: counted right
    /// after each, the hooks having run before it.
    pub fn unmounts(&self) -> u64 {
        self.unmounts.load(std::sync::atomic::Ordering::Acquire)
    }

    /// `f` runs before every unmount (a key change's teardown, the
    /// agent's close): what it holds open on the volume, it lets go of.
    /// An upload left open kept the old filesystem busy: the unmount was
    /// lazy, the mapping's removal deferred, and the remade volume could
    /// not take the mapping's name (review, 2026-12-06).
    pub fn before_unmount(&self, f: Hook) {
        self.before_unmount
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(f);
    }

    fn rt(&self) -> std::sync::MutexGuard<'_, Runtime> {
        self.rt.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, open: bool, error: Option<String>, event: Option<String>) {
        let mut r = self.rt();
        r.open = open;
        r.error = error;
        if event.is_some() {
            r.event = event;
        }
    }

    /// The stored metadata, if a volume was initialized.
    pub fn meta(&self) -> Result<Option<VolumeMeta>, VolumeError> {
        let path = self.dir.join(META);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| VolumeError::Meta {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(VolumeError::Meta {
                path,
                reason: e.to_string(),
            }),
        }
    }

    fn save(&self, m: &VolumeMeta) -> Result<(), VolumeError> {
        let bytes = serde_json::to_vec_pretty(m).map_err(|e| VolumeError::Meta {
            path: self.dir.join(META),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir, META, &bytes).map_err(|e| VolumeError::Meta {
            path: self.dir.join(META),
            reason: e.to_string(),
        })
    }

    /// Every check `init` makes before it records or writes anything: the
    /// state, the device (exists, is a block device, is the configured one,
    /// not the root disk, not mounted or held, no signature unless `force`,
    /// big enough), the kernel's dm-crypt and the mkfs program.
    /// `teardown`: remove the mapping a failed initialization left first
    /// (only once the caller confirmed; unconfirmed, that mapping's hold
    /// on the device is not counted against it).
    fn prerequisites(
        &self,
        device_path: &str,
        force: bool,
        teardown: bool,
    ) -> Result<(device::BlockDevice, Option<VolumeMeta>), VolumeError> {
        let previous = self.meta()?;
        if let Some(m) = &previous {
            if m.state != VolumeState::Initializing {
                let hint = if self.failed()?.is_some() {
                    "; it is failed: `landlordctl volume forget` drops its record first"
                } else {
                    "; a destroying key rotation empties it"
                };
                return Err(VolumeError::Invalid(format!(
                    "a volume already exists on {} (made {}){hint}",
                    m.device, m.made
                )));
            }
        }
        if device_path.is_empty() {
            return Err(VolumeError::Invalid("device: give a block device".into()));
        }
        let dev = device::probe(Path::new(device_path))?;
        if let Some(cfg_dev) = self.cfg.device.as_deref().filter(|d| !d.is_empty()) {
            let want = device::probe(Path::new(cfg_dev))?;
            if want.devno != dev.devno {
                return Err(VolumeError::Invalid(format!(
                    "device: {device_path} is not the device named by storage.device in the configuration ({cfg_dev})"
                )));
            }
        }
        // The mark takes the device's last block; the filesystem the rest.
        let min = fs::min_size(&self.cfg.filesystem) + mark::MARK_BYTES;
        if dev.size_bytes < min {
            return Err(StorageError::TooSmall {
                path: device_path.to_owned(),
                size_bytes: dev.size_bytes,
                filesystem: self.cfg.filesystem.clone(),
                min_bytes: min,
            }
            .into());
        }
        // The mapping of an interrupted init may hold the device (also
        // under a name an operator gave it: the teardown finds it by key).
        let own_mapping = previous.is_some() && mapping::exists(mapping::NAME)?;
        if previous.is_some() && teardown {
            self.teardown()?;
        }
        if own_mapping && !teardown {
            // Held by our own stale mapping, which the confirmed call
            // removes before it checks again.
            device::check_not_root(&dev)?;
            if let Some(what) = device::signature(&dev)?.filter(|_| !force) {
                return Err(StorageError::Signature {
                    path: device_path.to_owned(),
                    what,
                }
                .into());
            }
        } else {
            device::check_for_init(&dev, force)?;
        }
        mapping::check_crypt_usable()?;
        fs::check_mkfs(&self.cfg.filesystem)?;
        Ok((dev, previous))
    }

    /// Runs every check of `init`, writing nothing; returns what it would
    /// erase, in words, for the confirmation.
    pub fn check_init(&self, device_path: &str, force: bool) -> Result<String, VolumeError> {
        let (dev, previous) = self.prerequisites(device_path, force, false)?;
        let mut what = dev.given.display().to_string();
        if dev.node != dev.given {
            what.push_str(&format!(" = {}", dev.node.display()));
        }
        what.push_str(&format!(" ({} MiB)", dev.size_bytes >> 20));
        if let Some(m) = previous {
            what.push_str(&format!(
                ", and replaces the record of the volume that never finished on {}",
                m.device
            ));
        }
        Ok(what)
    }

    /// Initializes `device` under the current disk key: checks, then a
    /// fresh filesystem, mounted.
    pub fn init(
        &self,
        device_path: &str,
        force: bool,
        k: &DiskKeyInfo,
    ) -> Result<VolumeMeta, VolumeError> {
        let (dev, previous) = self.prerequisites(device_path, force, true)?;
        crash_point("init:checked");
        // A record of an init that never finished (it never held data)
        // goes first, durably: it names the old mark, and once the new one
        // is written the next start would find that record failed, blaming
        // another disk, instead of finishing it (review).
        if previous.is_some() {
            self.remove_meta()?;
            // Its error is not the new init's (status showed it all along).
            *self.rt() = Runtime::default();
        }
        let sector_size = dev.crypt_sector_size();
        let id = hex_id();
        // What a forced init writes over (the checks ran above): a remake
        // accepts it, and refuses any other signature.
        let init_signature = device::signature(&dev)?;
        // The mark goes on the device before the record names it: a record
        // always finds its mark (an interrupted init is finished at start).
        let mut bytes = [0u8; mark::MARK_LEN];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
        let tail_mark = Some(mark::write(&dev.node, dev.size_bytes, &bytes)?);
        crash_point("init:marked");
        let m = VolumeMeta {
            tail_mark,
            signatures_checked: true,
            init_signature,
            format: meta::FORMAT,
            kcv: leasehold_storage::kcv(k.key.expose_secret(), &id),
            id,
            node_id: k.node_id.clone(),
            device: dev.preferred().display().to_string(),
            size_bytes: dev.size_bytes,
            sector_size,
            cipher: mapping::CIPHER.into(),
            key_bytes: u32::try_from(mapping::KEY_BYTES).unwrap_or(64),
            options: mapping::options(sector_size, self.cfg.bypass_workqueues, self.cfg.discards),
            filesystem: self.cfg.filesystem.clone(),
            key_generations: k.generations.clone(),
            state: VolumeState::Initializing,
            created: now(),
            made: now(),
            made_by: Some("initialized".into()),
        };
        self.save(&m)?;
        crash_point("init:meta");
        let device = m.device.clone();
        let m = match self.make(m, k, "init") {
            Ok(m) => m,
            Err(e) => return Err(self.init_failed(&device, e)),
        };
        tracing::info!(device = %m.device, id = %m.id, size = m.size_bytes, "volume initialized");
        self.set(true, None, Some(format!("initialized on {}", m.device)));
        Ok(m)
    }

    fn progress(&self, step: &str) {
        self.rt().progress = Some(step.to_owned());
    }

    /// An init that failed after its metadata was written: the mapping and
    /// then the metadata go (no volume, as before). If the mapping cannot
    /// be removed the record stays, failed, so nothing is left unnamed.
    fn init_failed(&self, device: &str, e: VolumeError) -> VolumeError {
        tracing::error!(error = %e, device, "volume initialization failed");
        match self.teardown().and_then(|_| self.remove_meta()) {
            Ok(()) => {
                self.set(
                    false,
                    None,
                    Some(format!("initialization on {device} failed: {e}")),
                );
                e
            }
            Err(e2) => {
                let msg =
                    format!("initialization on {device} failed: {e}; cleaning up failed too: {e2}");
                self.set(false, Some(msg.clone()), None);
                VolumeError::Failed(msg)
            }
        }
    }

    fn remove_meta(&self) -> Result<(), VolumeError> {
        let path = self.dir.join(META);
        let meta_err = |e: std::io::Error| VolumeError::Meta {
            path: path.clone(),
            reason: e.to_string(),
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(meta_err(e)),
        }
        // The removal is durable before it is reported.
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(meta_err)
    }

    /// Why the volume is failed or stuck (recorded, not open, and either
    /// an error on record or an initialization that never finished).
    pub fn failed(&self) -> Result<Option<String>, VolumeError> {
        let Some(m) = self.meta()? else {
            return Ok(None);
        };
        let rt = self.rt().clone();
        if rt.open || rt.working {
            return Ok(None);
        }
        Ok(match (rt.error, m.state) {
            (Some(e), _) => Some(e),
            (None, VolumeState::Initializing) => {
                Some(format!("its initialization on {} never finished", m.device))
            }
            (None, _) => None,
        })
    }

    /// Drops the record of the volume (the controller allows it for a
    /// failed one only): its mapping, if any, is removed first (key
    /// wiped); the device is not written. Returns the device it named.
    pub fn forget(&self) -> Result<Option<String>, VolumeError> {
        let Some(m) = self.meta()? else {
            return Ok(None);
        };
        self.teardown()?;
        self.remove_meta()?;
        let event = format!("forgotten: the record of volume {} on {}", m.id, m.device);
        tracing::warn!(id = %m.id, device = %m.device, "{event}");
        *self.rt() = Runtime {
            event: Some(event),
            ..Runtime::default()
        };
        Ok(Some(m.device))
    }

    /// What to do about the volume's state, for `status` (None: nothing).
    pub fn next_step(&self, m: &VolumeMeta, rt: &Runtime) -> Option<String> {
        if rt.open || rt.working {
            return None;
        }
        let forget = "or drop the record with `landlordctl volume forget --yes` (whatever the volume holds is then lost) and run `landlordctl volume init` again";
        let e = rt.error.as_deref();
        if e.is_some_and(|e| e.contains("device-mapper") || e.contains("dm-crypt")) {
            return Some(format!(
                "load device-mapper (`modprobe dm_crypt`) and restart the agent (`systemctl restart leasehold-agentd`), {forget}"
            ));
        }
        if e.is_some_and(|e| e.contains("key check value") || e.contains("belongs to node")) {
            return Some(format!(
                "the metadata is not this volume's (copied or restored from elsewhere): put back the right {}, {forget}",
                self.dir.join(META).display()
            ));
        }
        if e.is_some() {
            return Some(format!(
                "fix what the error names (is {} attached?) and restart the agent, {forget}",
                m.device
            ));
        }
        (m.state == VolumeState::Initializing).then(|| {
            format!("the initialization never finished: restart the agent to finish it, {forget}")
        })
    }

    /// Maps `m` with `k`, makes a filesystem, mounts it, records `ready`.
    /// `phase` names the crash points ("init", "erase").
    fn make(&self, m: VolumeMeta, k: &DiskKeyInfo, phase: &str) -> Result<VolumeMeta, VolumeError> {
        self.rt().working = true;
        let r = self.make_inner(m, k, phase);
        let mut rt = self.rt();
        rt.working = false;
        rt.progress = None;
        r
    }

    fn make_inner(
        &self,
        mut m: VolumeMeta,
        k: &DiskKeyInfo,
        phase: &str,
    ) -> Result<VolumeMeta, VolumeError> {
        if phase != "init" {
            self.check_still_ours(&m)?;
        }
        self.progress("mapping the device");
        self.map(&m, k)?;
        crash_point(&format!("{phase}:mapped"));
        let node = mapping::devnode(mapping::NAME);
        if phase == "init" && self.cfg.fill_on_init {
            // Every block becomes ciphertext: the device then looks random
            // throughout and shows no trace of which blocks the tenant uses.
            let t = Instant::now();
            let total = m.mapped_bytes().max(1);
            let mut shown = u64::MAX;
            fs::fill_zeros(&node, m.mapped_bytes(), |done| {
                let pct = done.saturating_mul(100) / total;
                // One lock per percent, not per chunk.
                if pct != shown {
                    shown = pct;
                    self.progress(&format!(
                        "filling the device: {pct}% ({} of {} MiB)",
                        done >> 20,
                        total >> 20
                    ));
                }
            })?;
            let millis = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
            tracing::info!(bytes = m.mapped_bytes(), millis, "volume filled");
        }
        self.progress("making the filesystem");
        fs::make(&node, &m.filesystem)?;
        crash_point(&format!("{phase}:made"));
        self.progress("mounting");
        self.mount(&m)?;
        m.state = VolumeState::Ready;
        self.save(&m)?;
        Ok(m)
    }

    /// Before a remake (after a key change, or at start), which writes the
    /// recorded device without asking: the checks of `init` again, and a
    /// signature refused unless it is the one a forced `init` wrote over
    /// (recorded then; this volume's ciphertext carries none; review: any
    /// signature was refused, which broke the remake after a forced init
    /// with `fill_on_init = false` and the finish of an interrupted one). A device name can now be another disk (`/dev/vdb`
    /// renumbered by a reboot, a disk without a serial has no by-id name):
    /// only the size was checked, and a remake would have overwritten any
    /// unmounted disk of the same size (review).
    fn check_still_ours(&self, m: &VolumeMeta) -> Result<(), VolumeError> {
        let dev = device::probe(Path::new(&m.device))?;
        device::check_not_root(&dev)?;
        device::check_unused(&dev)?;
        self.check_mark(m, &dev)?;
        let found = device::signature(&dev)?;
        // A volume made before the signature was recorded is not checked
        // (a forced init may have left one that mkfs did not cover).
        if let Some(what) =
            found.filter(|w| m.signatures_checked && m.init_signature.as_ref() != Some(w))
        {
            return Err(VolumeError::Invalid(format!(
                "{}: carries {what}, which this volume's ciphertext never does: it may no longer be this volume's disk (device names can change across reboots); nothing was written. Check the device; `landlordctl volume forget --yes` and `volume init` make a volume again",
                m.device
            )));
        }
        Ok(())
    }

    /// Refuses a device whose size or mark ([`mark`], volumes made since
    /// 2026-12-08) is not this volume's, reading only: the device name can
    /// designate another disk since (a reboot renumbered `/dev/vdX`; a disk
    /// without a serial has no by-id name), and a same-size one passed the
    /// other checks (a blank one, or one of the same kind), to be written
    /// over by a remake (review of session 37).
    fn check_mark(&self, m: &VolumeMeta, dev: &device::BlockDevice) -> Result<(), VolumeError> {
        if dev.size_bytes != m.size_bytes {
            return Err(VolumeError::Invalid(format!(
                "{}: size is {} bytes, the volume was made on {} bytes",
                m.device, dev.size_bytes, m.size_bytes
            )));
        }
        if let Some(want) = &m.tail_mark {
            mark::check(&dev.node, m.size_bytes, want).map_err(|e| match e {
                StorageError::NotThisVolume { .. } => StorageError::NotThisVolume {
                    path: m.device.clone(),
                },
                e => e,
            })?;
        }
        Ok(())
    }

    /// Whether the live mapping is this volume's: one `crypt` line keyed
    /// by this volume's logon key, on the recorded device.
    fn mapping_is_ours(&self, m: &VolumeMeta) -> Result<bool, VolumeError> {
        let Some(lines) = mapping::table(mapping::NAME)? else {
            return Ok(false);
        };
        let dev = device::probe(Path::new(&m.device)).ok();
        // The kernel shows the key by description and the device by number.
        let key = format!(":logon:leasehold:{} ", m.id);
        Ok(match lines.as_slice() {
            [line] => {
                line.starts_with("crypt ")
                    && line.contains(&key)
                    && dev.is_some_and(|d| line.contains(&format!(" {}:{} ", d.devno.0, d.devno.1)))
            }
            _ => false,
        })
    }

    /// Creates the mapping after checking the key against the check value.
    fn map(&self, m: &VolumeMeta, k: &DiskKeyInfo) -> Result<(), VolumeError> {
        m.check_key(k.key.expose_secret(), &k.generations)?;
        let dev = device::probe(Path::new(&m.device))?;
        self.check_mark(m, &dev)?;
        self.check_not_mapped_elsewhere(m)?;
        let key = keyring::LogonKey::add(&m.id, k.key.expose_secret())?;
        let table = mapping::CryptTable {
            device: dev.node.clone(),
            // Up to the mark: the filesystem never reaches it.
            sectors: m.mapped_bytes() / 512,
            key_description: key.description().to_owned(),
            options: m.options.clone(),
        };
        // A dm uuid is unique like a name, and a wiped mapping of this
        // volume may still await its removal under another name: each
        // mapping's own.
        let uuid = format!("LEASEHOLD-{}-{}", m.id, &hex_id()[..8]);
        let r = mapping::open(mapping::NAME, &uuid, &table);
        // dm-crypt holds its own copy now (or failed): the keyring key goes.
        key.invalidate()?;
        r?;
        Ok(())
    }

    fn mount(&self, m: &VolumeMeta) -> Result<(), VolumeError> {
        let at = &self.cfg.mount;
        for d in fs::unsearchable_ancestors(at) {
            tracing::warn!(
                directory = %d.display(),
                mount = %at.display(),
                "the tenant's users cannot reach the volume: this directory above the mount point is not searchable by others (chmod o+x)"
            );
        }
        if !fs::is_mounted(at) {
            // Tenant processes (engines) make their own directories in it.
            let gid = nix::unistd::Group::from_name("leasehold-tenant")
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw());
            // No set-gid bit: the unit's RestrictSUIDSGID= refuses it.
            // Sticky: a tenant's user may add entries but not rename or
            // remove the agent's (its `engines/` directory).
            let mode = if gid.is_some() { 0o1770 } else { 0o700 };
            fs::mount(
                &mapping::devnode(mapping::NAME),
                at,
                &m.filesystem,
                (0, gid.unwrap_or(0)),
                mode,
            )?;
        }
        Ok(())
    }

    /// Unmounts (detaching if busy) and wipes and removes the mapping.
    /// Returns whether the removal had to be deferred.
    /// Wipes and removes every mapping of another name keyed by this
    /// volume's key (an operator's `dmsetup rename`); whether there was one.
    fn close_others(&self, m: &VolumeMeta) -> Result<bool, VolumeError> {
        let mut any = false;
        for other in mapping::keyed_by(&keyring::description(&m.id))? {
            if other != mapping::NAME {
                tracing::warn!(mapping = %other, "a mapping of another name held the volume's key: wiped and removed");
                any |= mapping::close(&other)? != mapping::Closed::Absent;
            }
        }
        Ok(any)
    }

    /// Refuses to map the volume while a mapping of another name holds its
    /// key (an operator renamed it, and it may still be mounted): two
    /// writable mappings of one disk (review).
    fn check_not_mapped_elsewhere(&self, m: &VolumeMeta) -> Result<(), VolumeError> {
        match mapping::keyed_by(&keyring::description(&m.id))?
            .into_iter()
            .find(|n| n != mapping::NAME)
        {
            Some(other) => Err(VolumeError::Invalid(format!(
                "the mapping {other} holds this volume's key (renamed from {}?): not mapped a second time. Rename it back (`dmsetup rename {other} {}`) and restart the agent, or unmount it and `dmsetup remove {other}`",
                mapping::NAME,
                mapping::NAME
            ))),
            None => Ok(()),
        }
    }

    fn teardown(&self) -> Result<bool, VolumeError> {
        for hook in self
            .before_unmount
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            hook();
        }
        let unmounted = fs::unmount(&self.cfg.mount);
        // Counted once done (or failed: the old mount is then all there
        // is): the uploads refuse every call from their drop until here.
        self.unmounts
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let detached = match unmounted {
            Ok(d) => d,
            Err(e) => {
                // Not even detached: the key still goes from the kernel
                // (review: the agent stopped with the crypt table live).
                if let Err(c) = mapping::close(mapping::NAME) {
                    tracing::error!(error = %c, "the volume could not be unmounted, and its mapping not closed");
                }
                if let Ok(Some(m)) = self.meta() {
                    if let Err(c) = self.close_others(&m) {
                        tracing::error!(error = %c, "a renamed mapping of the volume could not be closed");
                    }
                }
                return Err(e.into());
            }
        };
        let closed = mapping::close(mapping::NAME)?;
        // A renamed mapping of the volume goes too (agent stop, forget, a
        // failed init): its key must not outlive the record (review).
        if let Some(m) = self.meta()? {
            self.close_others(&m)?;
        }
        Ok(detached || closed == mapping::Closed::Deferred)
    }

    /// At agent start: opens the volume, finishes an interrupted step, or
    /// says why not (see the module comment); why not is kept for `status`.
    pub fn open_at_start(&self, k: &DiskKeyInfo) -> Result<Option<String>, VolumeError> {
        let r = self.open_at_start_inner(k);
        if let Err(e) = &r {
            self.set(false, Some(e.to_string()), None);
        }
        r
    }

    fn open_at_start_inner(&self, k: &DiskKeyInfo) -> Result<Option<String>, VolumeError> {
        let Some(m) = self.meta()? else {
            return Ok(None);
        };
        if m.node_id != k.node_id {
            let e = format!(
                "the volume metadata belongs to node {}, this is node {}: not opened (nothing was written to {})",
                m.node_id, k.node_id, m.device
            );
            self.set(false, Some(e.clone()), None);
            return Err(VolumeError::Invalid(e));
        }
        let same_key = leasehold_storage::kcv(k.key.expose_secret(), &m.id) == m.kcv;
        let mut m = m;
        let mut interrupted = false;
        if same_key && m.state == VolumeState::Rekeying {
            // The key change did not take effect: the data is intact.
            m.state = VolumeState::Ready;
            self.save(&m)?;
            interrupted = true;
        }
        let event = if same_key && m.state == VolumeState::Ready && interrupted {
            // A mapping left by the killed agent is made again.
            self.teardown()?;
            self.map(&m, k)?;
            self.mount(&m)?;
            "opened (a key change was interrupted before it took effect)".to_owned()
        } else if same_key && m.state == VolumeState::Ready {
            if mapping::exists(mapping::NAME)? && self.mapping_is_ours(&m)? {
                // Still mapped (the agent was killed): adopt it.
                self.mount(&m)?;
                "opened (the mapping was still active)".to_owned()
            } else if mapping::exists(mapping::NAME)? {
                // A mapping of that name that is not this volume's crypt
                // mapping (a wiped one whose removal was deferred, or
                // another's): removed (its key wiped), then mapped anew
                // (review: it was mounted as the tenant's volume).
                tracing::warn!(
                    name = mapping::NAME,
                    "a mapping of the volume's name is not this volume's crypt mapping: removed and made again"
                );
                self.teardown()?;
                self.map(&m, k)?;
                self.mount(&m)?;
                "opened (a stale mapping of its name was removed first)".to_owned()
            } else {
                self.map(&m, k)?;
                self.mount(&m)?;
                "opened".to_owned()
            }
        } else if same_key {
            self.teardown()?;
            let event = "an interrupted initialization was finished: the volume is new and empty"
                .to_owned();
            let mut m = m;
            m.made_by = Some(event.clone());
            self.make(m, k, "start")?;
            event
        } else if matches!(m.state, VolumeState::Rekeying | VolumeState::Initializing) {
            // Initializing: it never held data, and the keys changed while
            // it was failed (the remake after that change did not happen).
            self.teardown()?;
            let event = if m.state == VolumeState::Initializing {
                format!(
                    "made again, empty, under the current key (key generations {}): its initialization never finished and the keys changed since",
                    meta::generations_text(&k.generations)
                )
            } else {
                format!(
                    "recreated empty: the keys changed after the volume was made (key generations {} -> {}); the old data is gone with the old key",
                    m.generations_text(),
                    meta::generations_text(&k.generations)
                )
            };
            let mut m = self.remeta(m, k);
            m.made_by = Some(event.clone());
            self.save(&m)?;
            self.make(m, k, "start")?;
            event
        } else {
            // Not this volume's key, and no key change of this agent was
            // under way: copied or stale metadata. Refused, device untouched.
            let e = m
                .check_key(k.key.expose_secret(), &k.generations)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            self.set(false, Some(e.clone()), None);
            return Err(VolumeError::Invalid(e));
        };
        tracing::info!(event = %event, "volume");
        self.set(true, None, Some(event.clone()));
        Ok(Some(event))
    }

    fn remeta(&self, mut m: VolumeMeta, k: &DiskKeyInfo) -> VolumeMeta {
        m.kcv = leasehold_storage::kcv(k.key.expose_secret(), &m.id);
        m.key_generations = k.generations.clone();
        m.state = VolumeState::Initializing;
        m.made = now();
        m
    }

    /// Before a key change that may replace the disk key: marks the volume
    /// `rekeying` (see [`VolumeState::Rekeying`]).
    pub fn begin_key_change(&self) -> Result<(), VolumeError> {
        if let Some(mut m) = self.meta()? {
            if m.state == VolumeState::Ready {
                m.state = VolumeState::Rekeying;
                self.save(&m)?;
            }
        }
        Ok(())
    }

    /// The key change failed or kept the disk key: back to `ready`.
    pub fn end_key_change(&self) -> Result<(), VolumeError> {
        if let Some(mut m) = self.meta()? {
            if m.state == VolumeState::Rekeying {
                m.state = VolumeState::Ready;
                self.save(&m)?;
            }
        }
        Ok(())
    }

    /// Before a destroying rotation: dm-crypt's copy of the key is wiped at
    /// once (the mapping then fails all I/O; the filesystem is not synced:
    /// its data is about to be destroyed). Unmount and removal follow in
    /// `remake`, or `reopen` if the rotation fails before its erase.
    /// Fails unless the key is provably gone (the table read back).
    pub fn wipe(&self) -> Result<Wiped, VolumeError> {
        let Some(m) = self.meta()? else {
            return Ok(Wiped::NoVolume);
        };
        fail_point("erase:wipe")?;
        let t = Instant::now();
        let mut wiped = mapping::wipe_key(mapping::NAME)?;
        // Also under another name: a mapping an operator renamed (`dmsetup
        // rename`) still holds this volume's key, and the receipt said
        // "not mapped" (review). Found by its key's description; wiped and
        // removed (deferred while its filesystem is still mounted).
        wiped |= self.close_others(&m)?;
        if !wiped {
            return Ok(Wiped::NotMapped);
        }
        let millis = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(millis, "volume key wiped for a key change");
        self.set(false, None, Some("closed for a key change".into()));
        crash_point("erase:closed");
        Ok(Wiped::Wiped)
    }

    /// After a key change that failed: opens the volume again if `k` is
    /// still its key (checked before anything is mapped), back to `ready`.
    pub fn reopen(&self, k: &DiskKeyInfo) -> Result<(), VolumeError> {
        let Some(mut m) = self.meta()? else {
            return Ok(());
        };
        // The wiped mapping (error table) and its mount go first.
        self.teardown()?;
        self.map(&m, k)?;
        if m.state == VolumeState::Rekeying {
            m.state = VolumeState::Ready;
            self.save(&m)?;
        }
        self.mount(&m)?;
        self.set(
            true,
            None,
            Some("reopened after a failed key change".into()),
        );
        Ok(())
    }

    /// After a key change that changed the disk key: wipe the old mapping,
    /// make a new empty filesystem under the new key. None without a volume.
    pub fn remake(&self, k: &DiskKeyInfo, reason: &str) -> Result<Option<Remade>, VolumeError> {
        let Some(m) = self.meta()? else {
            return Ok(None);
        };
        let t = Instant::now();
        crash_point("erase:keys");
        let before = m.key_generations.clone();
        // The record follows the new key first: whatever fails below, the
        // next start finds `initializing` under the current key and makes
        // it again, never a check value of a key that no longer exists.
        let mut m = self.remeta(m, k);
        m.made_by = Some(format!("recreated empty after {reason}"));
        self.save(&m)?;
        crash_point("erase:meta");
        let deferred = match self.teardown() {
            Ok(d) => d,
            Err(e) => {
                self.set(false, Some(e.to_string()), None);
                return Err(e);
            }
        };
        self.set(false, None, None);
        // Its own name: it shared `erase:closed` with the wipe's, so the
        // tests never reached this window (review).
        crash_point("erase:torn-down");
        let r = self.make(m, k, "erase");
        let m = match r {
            Ok(m) => m,
            Err(e) => {
                self.set(false, Some(e.to_string()), None);
                return Err(e);
            }
        };
        let millis = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
        if m.options.iter().any(|o| o == "allow_discards") {
            self.trim_in_background();
        }
        let event = format!("recreated empty after {reason}");
        tracing::info!(id = %m.id, millis, deferred, "{event}");
        self.set(true, None, Some(event));
        Ok(Some(Remade {
            id: m.id,
            device: m.device,
            before,
            after: m.key_generations,
            millis,
            deferred,
        }))
    }

    /// With `storage.discards`: after a remake, the new filesystem's free
    /// blocks (all but its metadata, so nearly all the old ciphertext) are
    /// discarded in the background; the device may then reclaim them. Not
    /// part of the erase (the old key is already gone), so not waited for.
    fn trim_in_background(&self) {
        let at = self.cfg.mount.clone();
        let r = std::thread::Builder::new()
            .name("volume-trim".into())
            .spawn(move || {
                let t = Instant::now();
                match fs::trim(&at) {
                    Ok(out) => tracing::info!(
                        millis = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
                        "discarded the old blocks: {out}"
                    ),
                    Err(e) => tracing::warn!(error = %e, "discarding the old blocks failed"),
                }
            });
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot start the discard");
        }
    }

    /// At stop: unmount and wipe the mapping (the data stays on the device
    /// under its key), unless this stop is a restart for a package upgrade
    /// (see [`KEEP_OPEN`]) or `engines_running` (names of engines still
    /// running from the volume) is not empty.
    pub fn close(&self, engines_running: &[String]) -> Result<(), VolumeError> {
        let Some(m) = self.meta()? else {
            return Ok(());
        };
        // Read (and consumed) whatever else decides.
        let upgrade = self.keep_open_requested();
        // Only a volume that is open and in no key change is left open: the
        // next agent adopts a `ready` mapping as it is, anything else is
        // closed as usual (fail closed).
        let keepable = m.state == VolumeState::Ready && self.rt().open;
        if keepable && upgrade {
            tracing::info!(
                mount = %self.cfg.mount.display(),
                "restart for a package upgrade: the volume stays mapped and mounted for the next agent"
            );
            return Ok(());
        }
        if keepable && !engines_running.is_empty() {
            tracing::info!(
                mount = %self.cfg.mount.display(),
                engines = engines_running.len(),
                "engines still run from the volume: it stays mapped and mounted for the next agent (stop them first to close it)"
            );
            return Ok(());
        }
        let deferred = self.teardown()?;
        if deferred {
            tracing::warn!(
                "the volume was still in use: detached, its key wiped, removal deferred"
            );
        }
        self.set(false, None, Some("closed".into()));
        Ok(())
    }

    /// Whether the package asked this agent to leave the volume open (the
    /// request is consumed: a later stop closes it again).
    fn keep_open_requested(&self) -> bool {
        let path = self.dir.join(KEEP_OPEN);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return false;
        };
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the keep-open request");
        }
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let ok = keep_open_matches(&text, boot.trim(), std::process::id());
        if !ok {
            tracing::warn!(path = %path.display(), "a keep-open request for another boot or process: ignored, the volume is closed");
        }
        ok
    }

    /// Status for the interfaces.
    pub fn status(&self) -> Result<StatusParts, VolumeError> {
        let m = self.meta()?;
        let rt = self.rt().clone();
        let usage = if rt.open {
            fs::usage(&self.cfg.mount).ok()
        } else {
            None
        };
        Ok((m, rt, usage))
    }

    /// Where the filesystem is mounted.
    pub fn mount_point(&self) -> &Path {
        &self.cfg.mount
    }
}

/// `text` (a [`KEEP_OPEN`] file) names this boot and this process.
fn keep_open_matches(text: &str, boot_id: &str, pid: u32) -> bool {
    let mut f = text.split_whitespace();
    match (f.next(), f.next(), f.next()) {
        (Some(b), Some(p), None) => !boot_id.is_empty() && b == boot_id && p.parse() == Ok(pid),
        _ => false,
    }
}

fn hex_id() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn failure(e: VolumeError) -> leasehold_node::Failure {
    use leasehold_node::{Failure, FailureKind};
    let kind = match &e {
        VolumeError::Invalid(_)
        | VolumeError::Storage(
            StorageError::NotABlockDevice { .. }
            | StorageError::Mounted { .. }
            | StorageError::InUse { .. }
            | StorageError::RootDisk { .. }
            | StorageError::Signature { .. }
            | StorageError::TooSmall { .. }
            | StorageError::NotThisVolume { .. }
            | StorageError::WrongKey(_),
        ) => FailureKind::Invalid,
        VolumeError::Storage(StorageError::Unavailable(_)) => FailureKind::Unavailable,
        _ => FailureKind::Failed,
    };
    Failure::new(kind, e.to_string())
}

/// The volume as the node controller's backend.
#[derive(Debug, Clone)]
pub struct VolumeBackend(pub std::sync::Arc<Volume>);

impl leasehold_node::backend::VolumeStore for VolumeBackend {
    fn begin_key_change(&mut self) -> Result<(), leasehold_node::Failure> {
        self.0.begin_key_change().map_err(failure)
    }
    fn end_key_change(&mut self) -> Result<(), leasehold_node::Failure> {
        self.0.end_key_change().map_err(failure)
    }
    fn wipe(&mut self) -> Result<Wiped, leasehold_node::Failure> {
        self.0.wipe().map_err(failure)
    }
    fn reopen(&mut self, k: &DiskKeyInfo) -> Result<(), leasehold_node::Failure> {
        self.0.reopen(k).map_err(failure)
    }
    fn remake(
        &mut self,
        k: &DiskKeyInfo,
        reason: &str,
    ) -> Result<Option<Remade>, leasehold_node::Failure> {
        self.0.remake(k, reason).map_err(failure)
    }
    fn describe(&mut self) -> Result<Option<(String, String)>, leasehold_node::Failure> {
        Ok(self.0.meta().map_err(failure)?.map(|m| (m.id, m.device)))
    }
    fn check_init(&mut self, device: &str, force: bool) -> Result<String, leasehold_node::Failure> {
        self.0.check_init(device, force).map_err(failure)
    }
    fn failed(&mut self) -> Result<Option<String>, leasehold_node::Failure> {
        self.0.failed().map_err(failure)
    }
    fn forget(&mut self) -> Result<Option<String>, leasehold_node::Failure> {
        self.0.forget().map_err(failure)
    }
    fn init(
        &mut self,
        device: &str,
        force: bool,
        k: &DiskKeyInfo,
    ) -> Result<(), leasehold_node::Failure> {
        if device.is_empty() {
            return Err(failure(VolumeError::Invalid(
                "device: give a block device".into(),
            )));
        }
        self.0.init(device, force, k).map(|_| ()).map_err(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::keep_open_matches;

    #[test]
    fn keep_open_only_for_this_boot_and_process() {
        let boot = "0b7c9f1e-4a43-4d36-9a83-4e4c1f1d2a10";
        assert!(keep_open_matches(&format!("{boot} 4242\n"), boot, 4242));
        // Another process, another boot, garbage, or no boot id to compare.
        assert!(!keep_open_matches(&format!("{boot} 4243\n"), boot, 4242));
        assert!(!keep_open_matches(
            "1b7c9f1e-4a43-4d36-9a83-4e4c1f1d2a10 4242",
            boot,
            4242
        ));
        assert!(!keep_open_matches(
            &format!("{boot} 4242 extra"),
            boot,
            4242
        ));
        assert!(!keep_open_matches(boot, boot, 4242));
        assert!(!keep_open_matches("", boot, 4242));
        assert!(!keep_open_matches(" 4242", "", 4242));
    }
}
