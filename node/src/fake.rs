//! In-memory backends for tests of the controller and the layers above
//! (feature `testing`). They share one [`World`]: its state, an ordered
//! log of every backend call, faults to inject by step name, and steps to
//! hold (so a test can act while a change is half-way).
//!
//! The real paths are tested on swtpm, dm-crypt (VM lab) and nftables.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use leasehold_tpm::{
    ChangeKind, Confirm, DiskKey, KeyChange, KeyError, LevelStatus, PublicKeyInfo, Role,
    SigningKeyInfo, Status, SymmetricKey, TpmKind,
};
use zeroize::Zeroizing;

use leasehold_engines::budget::Budget;
use leasehold_engines::spec::Spec;
use leasehold_engines::supervisor::Phase;
use leasehold_netpolicy::Boundary;

use crate::backend::{
    Backends, BoundaryApplied, BoundaryChange, BoundaryStore, DiskKeyInfo, Events, Failure,
    FailureKind, KeyStore, Remade, SecretEntry, SecretStore, VolumeStore, Wiped,
};
use crate::{
    ChangeReport, EngineStatus, EngineView, Engines, NotStopped, SignedReceipt, StopReport,
};

/// One key level in the fake TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLevel {
    /// Pair generation.
    pub generation: u64,
    /// Symmetric-key generation.
    pub key_generation: u64,
    /// Holder made its own pair.
    pub owned: bool,
    /// Tenant name.
    pub name: Option<String>,
}

/// The fake volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeVolume {
    /// `ready`, `rekeying`; `initializing` or `failed` for a volume that
    /// is recorded but not usable.
    pub state: &'static str,
    /// Key generations of the key it was made under.
    pub generations: Vec<(String, u64)>,
    /// Key generations of the key dm-crypt holds (None: no key in the kernel).
    pub kernel_key: Option<Vec<(String, u64)>>,
    /// Files on it.
    pub files: u32,
}

/// One engine in the fake runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeEngine {
    /// Image reference.
    pub image: String,
    /// Spec.
    pub spec: Spec,
    /// A process is alive.
    pub running: bool,
    /// Marked to start.
    pub enabled: bool,
    /// Survives `stop_all` (a runtime that cannot show it gone).
    pub stubborn: bool,
}

/// Everything the fakes share.
#[derive(Debug, Default)]
pub struct World {
    /// Engines by name.
    pub engines: BTreeMap<String, FakeEngine>,
    /// The tenant budget the engine runtime reports.
    pub budget: Budget,
    /// What the boundary backend says an engine's egress must lie inside
    /// (None: no boundary enforced).
    pub egress_limit: Option<Boundary>,
    /// Landlord level.
    pub landlord: Option<FakeLevel>,
    /// Tenant level.
    pub tenant: Option<FakeLevel>,
    /// A rotation failed after its erase: keys fail until restart.
    pub erasing: Option<Role>,
    /// (role, name) of registered consoles.
    pub consoles: BTreeSet<(Role, String)>,
    /// The volume, once initialized.
    pub volume: Option<FakeVolume>,
    /// Secrets: name → size.
    pub secrets: BTreeMap<String, u64>,
    /// The first byte of the key each secret was stored under (the fake's
    /// data key follows the key generations; absent: never stale).
    pub secret_keys: BTreeMap<String, u8>,
    /// A sub-boundary is set.
    pub sub_boundary: bool,
    /// Cluster boundary changes applied.
    pub boundary_changes: u32,
    /// Every backend call, in order.
    pub log: Vec<String>,
    /// The change of tenancy on its way (`Events::begin_tenancy_change`;
    /// on "disk": it outlives a controller).
    pub tenancy_change: Option<crate::backend::TenancyChange>,
    /// Tenancy records made by a start that finished such a change.
    pub tenancy_recorded: Vec<bool>,
    /// Step names that fail (`keys.rotate`, `keys.rotate.after_erase`,
    /// `volume.wipe`, `volume.remake`, `secrets.purge`, `keys.sign`,
    /// `boundary.clear_sub`, `keys.register_console`, …). Each fires once.
    pub faults: BTreeSet<String>,
    /// Reports signalled.
    pub signals: Vec<ChangeReport>,
    /// Receipts stored.
    pub receipts: Vec<SignedReceipt>,
    /// Receipts whose signing found the old disk key still in the kernel.
    pub unproven_receipts: u32,
    /// A step that panics (a backend bug), to test that the controller's
    /// end is noticed.
    pub panic_at: Option<String>,
    /// A step that waits for a message before it runs (tests of reads and
    /// of the queue while a change runs).
    pub hold: Option<(String, std::sync::mpsc::Receiver<()>)>,
    /// Answers of engine commands wait until it opens (the command itself
    /// is carried out when sent): an engine runtime busy unpacking.
    pub answers: Option<Gate>,
}

/// Closed until [`Gate::open`].
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    /// Lets every waiter through, now and later.
    pub fn open(&self) {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.0 .1.notify_all();
    }

    fn wait(&self) {
        let mut open = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = self.0 .1.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Handle to a shared world.
#[derive(Debug, Clone, Default)]
pub struct Fake(pub Arc<Mutex<World>>);

/// One backend call: the world, locked for its duration.
pub struct Op<'a> {
    w: MutexGuard<'a, World>,
}

impl std::ops::Deref for Op<'_> {
    type Target = World;
    fn deref(&self) -> &World {
        &self.w
    }
}
impl std::ops::DerefMut for Op<'_> {
    fn deref_mut(&mut self) -> &mut World {
        &mut self.w
    }
}

impl Fake {
    /// A node with a landlord level and nothing else.
    pub fn new() -> Self {
        let f = Fake::default();
        f.world().landlord = Some(FakeLevel {
            generation: 1,
            key_generation: 1,
            owned: true,
            name: None,
        });
        f
    }

    /// The world, for setup and assertions.
    pub fn world(&self) -> MutexGuard<'_, World> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes step `name` fail once.
    pub fn fail(&self, name: &str) {
        self.world().faults.insert(name.to_owned());
    }

    /// Backends over this world.
    pub fn backends(&self) -> Backends {
        Backends {
            keys: Box::new(self.clone()),
            volume: Box::new(FakeVol(self.clone())),
            boundaries: Box::new(FakeBoundary(self.clone())),
            secrets: Box::new(FakeSecrets(self.clone())),
            events: Box::new(FakeEvents(self.clone())),
            engines: Box::new(FakeEngines(self.clone())),
        }
    }

    /// What an agent restart does: an interrupted rotation is finished
    /// (new generation), a volume marked `rekeying` under another key is
    /// made new, one under its own key reopens.
    pub fn restart(&self) {
        let mut w = self.world();
        if let Some(role) = w.erasing.take() {
            let l = level_mut(&mut w, role).expect("level");
            l.generation += 1;
            l.key_generation += 1;
        }
        let gens = generations(&w);
        if let Some(v) = &mut w.volume {
            if v.generations != gens {
                if v.state == "rekeying" {
                    v.generations = gens.clone();
                    v.files = 0;
                    v.state = "ready";
                    v.kernel_key = Some(gens);
                } else {
                    v.kernel_key = None;
                }
            } else {
                v.state = "ready";
                v.kernel_key = Some(gens);
            }
        }
    }

    /// Makes the answers of engine commands wait until the gate opens.
    pub fn hold_answers(&self) -> Gate {
        let g = Gate::default();
        self.world().answers = Some(g.clone());
        g
    }

    /// Makes step `name` wait until the returned sender sends (or drops).
    pub fn hold(&self, name: &str) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.world().hold = Some((name.to_owned(), rx));
        tx
    }

    fn op(&self, name: impl Into<String>) -> Result<Op<'_>, String> {
        let name = name.into();
        let mut w = self.world();
        if w.hold.as_ref().is_some_and(|(n, _)| *n == name) {
            let (_, rx) = w.hold.take().expect("checked");
            drop(w);
            let _ = rx.recv();
            w = self.world();
        }
        w.log.push(name.clone());
        if w.panic_at.as_deref() == Some(name.as_str()) {
            drop(w);
            panic!("injected panic at {name}");
        }
        if w.faults.remove(&name) {
            return Err(format!("injected fault at {name}"));
        }
        Ok(Op { w })
    }
}

/// The fake's data key, one byte repeated: changes with every key
/// generation and with the tenant's presence, as the real one.
fn data_key_id(w: &World) -> u8 {
    let l = w.landlord.as_ref().map_or(0, |l| l.key_generation);
    let t = w.tenant.as_ref().map_or(0, |t| t.key_generation + 1);
    u8::try_from((l * 31 + t * 7 + 1) % 256).unwrap_or(0)
}

fn generations(w: &World) -> Vec<(String, u64)> {
    let mut g = Vec::new();
    if let Some(l) = &w.landlord {
        g.push(("landlord".to_owned(), l.key_generation));
    }
    if let Some(t) = &w.tenant {
        g.push(("tenant".to_owned(), t.key_generation));
    }
    g
}

fn level_mut(w: &mut World, role: Role) -> Option<&mut FakeLevel> {
    match role {
        Role::Landlord => w.landlord.as_mut(),
        Role::Tenant => w.tenant.as_mut(),
    }
}

fn injected(msg: String) -> KeyError {
    KeyError::UnexpectedTpmResponse(Box::leak(msg.into_boxed_str()))
}

fn fingerprint(role: Role, generation: u64) -> String {
    format!("{role}-{generation}")
}

fn change(
    kind: ChangeKind,
    role: Role,
    before: Option<&FakeLevel>,
    after: Option<&FakeLevel>,
    destroyed: bool,
) -> KeyChange {
    KeyChange {
        kind,
        role,
        generation_before: before.map(|l| l.generation),
        generation_after: after.map(|l| l.generation),
        key_generation_before: before.map(|l| l.key_generation),
        key_generation_after: after.map(|l| l.key_generation),
        data_destroyed: destroyed,
        fingerprint_after: after.map(|l| fingerprint(role, l.generation)),
        erased_at: None,
    }
}

fn check_erasing(w: &World) -> Result<(), KeyError> {
    match w.erasing {
        Some(role) => Err(KeyError::KeyErased {
            role,
            generation: 0,
            nv_index: 0,
        }),
        None => Ok(()),
    }
}

impl KeyStore for Fake {
    fn status(&mut self) -> Result<Status, KeyError> {
        let w = self.op("keys.status").map_err(injected)?;
        let lv = |role: Role, l: &FakeLevel| LevelStatus {
            generation: l.generation,
            key_generation: l.key_generation,
            fingerprint: fingerprint(role, l.generation),
            seal_pcrs: Vec::new(),
            name: l.name.clone(),
        };
        let landlord = w.landlord.as_ref().ok_or(KeyError::NotAssigned)?;
        Ok(Status {
            node_id: "00".repeat(16),
            tpm_kind: TpmKind::Software,
            landlord: lv(Role::Landlord, landlord),
            tenant: w.tenant.as_ref().map(|t| lv(Role::Tenant, t)),
            consoles: w
                .consoles
                .iter()
                .map(|(r, n)| (*r, n.clone(), format!("console-{n}")))
                .collect(),
        })
    }

    fn public_key(&mut self, role: Role) -> Result<PublicKeyInfo, KeyError> {
        let mut w = self.op("keys.public_key").map_err(injected)?;
        let l = level_mut(&mut w, role).ok_or(KeyError::NotAssigned)?;
        Ok(PublicKeyInfo {
            role,
            generation: l.generation,
            pem: format!("PEM {role} {}", l.generation),
            fingerprint: fingerprint(role, l.generation),
        })
    }

    fn owned(&mut self, role: Role) -> Result<bool, KeyError> {
        let mut w = self.op("keys.owned").map_err(injected)?;
        Ok(level_mut(&mut w, role).ok_or(KeyError::NotAssigned)?.owned)
    }

    fn signing_key(&mut self) -> Result<SigningKeyInfo, KeyError> {
        let _w = self.op("keys.signing_key").map_err(injected)?;
        Ok(SigningKeyInfo {
            pem: "PEM node".into(),
            fingerprint: "node".into(),
        })
    }

    fn finish_interrupted(&mut self) -> Result<bool, KeyError> {
        let mut w = self.op("keys.finish_interrupted").map_err(injected)?;
        Ok(match w.erasing.take() {
            Some(role) => {
                let l = level_mut(&mut w, role).expect("level");
                l.generation += 1;
                l.key_generation += 1;
                true
            }
            None => false,
        })
    }

    fn rotate(&mut self, caller: Role, target: Role) -> Result<KeyChange, KeyError> {
        let mut w = self.op(format!("keys.rotate {target}")).map_err(injected)?;
        check_erasing(&w)?;
        if caller > target {
            return Err(KeyError::NotPermitted {
                caller,
                action: "rotate",
            });
        }
        let old = level_mut(&mut w, target)
            .ok_or(KeyError::NotAssigned)?
            .clone();
        if w.faults.remove("keys.rotate.before_erase") {
            return Err(injected("injected fault before the erase".into()));
        }
        if w.faults.remove("keys.rotate.after_erase") {
            w.erasing = Some(target);
            return Err(injected("injected fault after the erase".into()));
        }
        let l = level_mut(&mut w, target).expect("checked");
        l.generation += 1;
        l.key_generation += 1;
        l.owned = l.owned || caller == target;
        let new = l.clone();
        // A step after the commit failing (the old files' removal, the
        // intent's clearing): committed, yet reported as an error.
        if w.faults.remove("keys.rotate.after_commit") {
            return Err(injected("injected fault after the commit".into()));
        }
        let mut c = change(ChangeKind::Rotate, target, Some(&old), Some(&new), true);
        c.erased_at = Some(std::time::SystemTime::now());
        Ok(c)
    }

    fn rekey(&mut self, caller: Role, target: Role) -> Result<KeyChange, KeyError> {
        let mut w = self.op(format!("keys.rekey {target}")).map_err(injected)?;
        check_erasing(&w)?;
        if caller > target {
            return Err(KeyError::NotPermitted {
                caller,
                action: "rekey",
            });
        }
        let l = level_mut(&mut w, target).ok_or(KeyError::NotAssigned)?;
        let old = l.clone();
        l.generation += 1;
        l.owned = l.owned || caller == target;
        let new = l.clone();
        Ok(change(
            ChangeKind::Rekey,
            target,
            Some(&old),
            Some(&new),
            false,
        ))
    }

    fn assign(
        &mut self,
        name: &str,
        console_key: Option<&str>,
        confirm: Confirm,
    ) -> Result<KeyChange, KeyError> {
        let mut w = self.op("keys.assign").map_err(injected)?;
        check_erasing(&w)?;
        let old = w.tenant.clone();
        if old.is_some() && confirm != Confirm::DestroyData {
            return Err(KeyError::ConfirmationRequired { action: "assign" });
        }
        let (g, kg) = old
            .as_ref()
            .map_or((1, 1), |o| (o.generation + 1, o.key_generation + 1));
        let new = FakeLevel {
            generation: g,
            key_generation: kg,
            owned: false,
            name: Some(name.to_owned()),
        };
        w.tenant = Some(new.clone());
        w.consoles.retain(|(r, _)| *r != Role::Tenant);
        if console_key.is_some() {
            w.consoles.insert((Role::Tenant, "initial".into()));
        }
        // A step after the manifest's commit failing (the old slot's
        // undefine, say): committed, yet reported as an error.
        if w.faults.remove("keys.assign after commit") {
            return Err(injected("injected fault after the commit".into()));
        }
        Ok(change(
            ChangeKind::Assign,
            Role::Tenant,
            old.as_ref(),
            Some(&new),
            old.is_some(),
        ))
    }

    fn release(&mut self, confirm: Confirm) -> Result<Option<KeyChange>, KeyError> {
        let mut w = self.op("keys.release").map_err(injected)?;
        check_erasing(&w)?;
        let Some(old) = w.tenant.clone() else {
            return Ok(None);
        };
        if confirm != Confirm::DestroyData {
            return Err(KeyError::ConfirmationRequired { action: "release" });
        }
        w.tenant = None;
        w.consoles.retain(|(r, _)| *r != Role::Tenant);
        Ok(Some(change(
            ChangeKind::Release,
            Role::Tenant,
            Some(&old),
            None,
            true,
        )))
    }

    fn register_console(&mut self, role: Role, name: &str, _pem: &str) -> Result<String, KeyError> {
        let mut w = self.op("keys.register_console").map_err(injected)?;
        if role == Role::Tenant && w.tenant.is_none() {
            return Err(KeyError::NotAssigned);
        }
        w.consoles.insert((role, name.to_owned()));
        Ok(format!("console-{name}"))
    }

    fn open_envelope(
        &mut self,
        role: Role,
        envelope: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let mut w = self.op("keys.open_envelope").map_err(injected)?;
        check_erasing(&w)?;
        level_mut(&mut w, role).ok_or(KeyError::NotAssigned)?;
        // The fake's "envelope" is the payload itself.
        Ok(Zeroizing::new(envelope.to_vec()))
    }

    fn data_key(&mut self, _purpose: &str) -> Result<SymmetricKey, KeyError> {
        let w = self.op("keys.data_key").map_err(injected)?;
        check_erasing(&w)?;
        Ok(SymmetricKey::from_bytes([data_key_id(&w); 32]))
    }

    fn disk_key(&mut self) -> Result<DiskKeyInfo, KeyError> {
        let w = self.op("keys.disk_key").map_err(injected)?;
        check_erasing(&w)?;
        let generations = generations(&w);
        let mut key = [0u8; 64];
        for (i, (_, g)) in generations.iter().enumerate() {
            key[i] = u8::try_from(*g % 256).unwrap_or(0);
        }
        Ok(DiskKeyInfo {
            node_id: "00".repeat(16),
            key: DiskKey::from_bytes(key),
            generations,
        })
    }

    fn prepare_standby(&mut self) -> Result<usize, KeyError> {
        let _w = self.op("keys.prepare_standby").map_err(injected)?;
        Ok(0)
    }

    fn sign(&mut self, data: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut w = self.op("keys.sign").map_err(injected)?;
        // A receipt is only true if no old disk key is left in the kernel.
        let gens = generations(&w);
        if let Some(v) = &w.volume {
            if v.kernel_key.as_ref().is_some_and(|k| *k != gens) {
                w.unproven_receipts += 1;
            }
        }
        Ok(data.iter().rev().copied().collect())
    }
}

/// The fake volume backend.
#[derive(Debug, Clone)]
pub struct FakeVol(pub Fake);

fn vfail(msg: String) -> Failure {
    Failure::failed(msg)
}

impl VolumeStore for FakeVol {
    fn begin_key_change(&mut self) -> Result<(), Failure> {
        let mut w = self.0.op("volume.begin").map_err(vfail)?;
        if let Some(v) = &mut w.volume {
            if v.state == "ready" {
                v.state = "rekeying";
            }
        }
        Ok(())
    }

    fn end_key_change(&mut self) -> Result<(), Failure> {
        let mut w = self.0.op("volume.end").map_err(vfail)?;
        if let Some(v) = &mut w.volume {
            if v.state == "rekeying" {
                v.state = "ready";
            }
        }
        Ok(())
    }

    fn wipe(&mut self) -> Result<Wiped, Failure> {
        let mut w = self.0.op("volume.wipe").map_err(vfail)?;
        Ok(match &mut w.volume {
            None => Wiped::NoVolume,
            Some(v) if v.kernel_key.is_none() => Wiped::NotMapped,
            Some(v) => {
                v.kernel_key = None;
                Wiped::Wiped
            }
        })
    }

    fn reopen(&mut self, k: &DiskKeyInfo) -> Result<(), Failure> {
        let mut w = self.0.op("volume.reopen").map_err(vfail)?;
        if let Some(v) = &mut w.volume {
            if v.generations != k.generations {
                return Err(Failure::new(FailureKind::Invalid, "wrong key"));
            }
            v.kernel_key = Some(k.generations.clone());
            v.state = "ready";
        }
        Ok(())
    }

    fn remake(&mut self, k: &DiskKeyInfo, _reason: &str) -> Result<Option<Remade>, Failure> {
        let mut w = self.0.op("volume.remake").map_err(vfail)?;
        let Some(v) = &mut w.volume else {
            return Ok(None);
        };
        let before = std::mem::replace(&mut v.generations, k.generations.clone());
        v.kernel_key = Some(k.generations.clone());
        v.files = 0;
        v.state = "ready";
        Ok(Some(Remade {
            id: "vol".into(),
            device: "/dev/fake".into(),
            before,
            after: k.generations.clone(),
            millis: 1,
            deferred: false,
        }))
    }

    fn describe(&mut self) -> Result<Option<(String, String)>, Failure> {
        let w = self.0.op("volume.describe").map_err(vfail)?;
        Ok(w.volume
            .as_ref()
            .map(|_| ("vol".into(), "/dev/fake".into())))
    }

    fn check_init(&mut self, device: &str, _force: bool) -> Result<String, Failure> {
        let w = self.0.op("volume.check").map_err(vfail)?;
        if !device.starts_with("/dev/") {
            return Err(Failure::new(
                FailureKind::Invalid,
                format!("{device}: no such block device"),
            ));
        }
        if w.volume.as_ref().is_some_and(|v| v.state == "ready") {
            return Err(Failure::new(FailureKind::Invalid, "a volume exists"));
        }
        Ok(format!("{device} (1 GiB)"))
    }

    fn failed(&mut self) -> Result<Option<String>, Failure> {
        let w = self.0.op("volume.failed").map_err(vfail)?;
        Ok(w.volume
            .as_ref()
            .filter(|v| v.state == "failed" || v.state == "initializing")
            .map(|v| format!("{}: device-mapper is missing", v.state)))
    }

    fn forget(&mut self) -> Result<Option<String>, Failure> {
        let mut w = self.0.op("volume.forget").map_err(vfail)?;
        Ok(w.volume.take().map(|_| "/dev/fake".to_owned()))
    }

    fn init(&mut self, device: &str, _force: bool, k: &DiskKeyInfo) -> Result<(), Failure> {
        let mut w = self.0.op("volume.init").map_err(vfail)?;
        if device.is_empty() {
            return Err(Failure::new(FailureKind::Invalid, "device: empty"));
        }
        if w.volume.as_ref().is_some_and(|v| v.state == "ready") {
            return Err(Failure::new(FailureKind::Invalid, "a volume exists"));
        }
        w.volume = Some(FakeVolume {
            state: "ready",
            generations: k.generations.clone(),
            kernel_key: Some(k.generations.clone()),
            files: 0,
        });
        Ok(())
    }
}

/// The fake boundary backend.
#[derive(Debug, Clone)]
pub struct FakeBoundary(pub Fake);

impl BoundaryStore for FakeBoundary {
    fn change(&mut self, c: BoundaryChange) -> Result<BoundaryApplied, Failure> {
        let name = match &c {
            BoundaryChange::ClearSub => "boundary.clear_sub",
            BoundaryChange::SetSub { .. } => "boundary.set_sub",
            BoundaryChange::ConfirmPending => "boundary.confirm",
            BoundaryChange::RevertPending { .. } => "boundary.revert",
            _ => "boundary.cluster",
        };
        let mut w = self.0.op(name).map_err(vfail)?;
        match c {
            BoundaryChange::ClearSub => w.sub_boundary = false,
            BoundaryChange::SetSub { .. } => w.sub_boundary = true,
            _ => w.boundary_changes += 1,
        }
        Ok(BoundaryApplied::default())
    }

    fn engine_egress_limit(&mut self) -> Result<Option<Boundary>, Failure> {
        let w = self.0.op("boundary.egress_limit").map_err(vfail)?;
        Ok(w.egress_limit.clone())
    }
}

/// The fake secret store.
#[derive(Debug, Clone)]
pub struct FakeSecrets(pub Fake);

impl SecretStore for FakeSecrets {
    fn put(
        &mut self,
        key: &SymmetricKey,
        name: &str,
        payload: &[u8],
    ) -> Result<SecretEntry, Failure> {
        let mut w = self.0.op("secrets.put").map_err(vfail)?;
        w.secrets.insert(name.to_owned(), payload.len() as u64);
        w.secret_keys
            .insert(name.to_owned(), key.expose_secret()[0]);
        Ok(SecretEntry {
            name: name.to_owned(),
            size: payload.len() as u64,
            stored_at: 0,
        })
    }

    fn remove(&mut self, name: &str) -> Result<(), Failure> {
        let mut w = self.0.op("secrets.remove").map_err(vfail)?;
        w.secret_keys.remove(name);
        w.secrets
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Failure::new(FailureKind::NotFound, format!("no secret named {name:?}")))
    }

    fn purge(&mut self) -> Result<usize, Failure> {
        let mut w = self.0.op("secrets.purge").map_err(vfail)?;
        let n = w.secrets.len();
        w.secrets.clear();
        w.secret_keys.clear();
        Ok(n)
    }

    fn purge_stale(&mut self, key: &SymmetricKey) -> Result<usize, Failure> {
        let mut w = self.0.op("secrets.purge_stale").map_err(vfail)?;
        let now = key.expose_secret()[0];
        let stale: Vec<String> = w
            .secrets
            .keys()
            .filter(|n| w.secret_keys.get(*n).copied().unwrap_or(now) != now)
            .cloned()
            .collect();
        for n in &stale {
            w.secrets.remove(n);
            w.secret_keys.remove(n);
        }
        Ok(stale.len())
    }

    fn list(&self) -> Result<Vec<SecretEntry>, Failure> {
        let w = self.0.op("secrets.list").map_err(vfail)?;
        Ok(w.secrets
            .iter()
            .map(|(n, s)| SecretEntry {
                name: n.clone(),
                size: *s,
                stored_at: 0,
            })
            .collect())
    }
}

/// The fake event sink.
#[derive(Debug, Clone)]
pub struct FakeEvents(pub Fake);

impl Events for FakeEvents {
    fn store_receipt(&mut self, r: &SignedReceipt) -> Result<(), Failure> {
        let mut w = self.0.op("events.store_receipt").map_err(vfail)?;
        w.receipts.push(r.clone());
        Ok(())
    }

    fn keys_changed(&mut self, report: &ChangeReport) {
        // Signals go out after the change; not a backend step that can fail.
        let mut w = self.0.world();
        w.signals.push(report.clone());
    }

    fn begin_tenancy_change(
        &mut self,
        change: &crate::backend::TenancyChange,
    ) -> Result<(), Failure> {
        let mut w = self.0.op("events.begin_tenancy_change").map_err(vfail)?;
        w.tenancy_change = Some(change.clone());
        Ok(())
    }

    fn end_tenancy_change(&mut self) {
        self.0.world().tenancy_change = None;
    }

    fn pending_tenancy_change(&mut self) -> Option<crate::backend::TenancyChange> {
        self.0.world().tenancy_change.clone()
    }

    fn tenancy_recorded(&mut self, assigned: bool) {
        self.0.world().tenancy_recorded.push(assigned);
    }
}

/// The fake engine runtime: engines start and stop at once; a `stubborn`
/// one survives `stop_all`.
#[derive(Debug, Clone)]
pub struct FakeEngines(pub Fake);

fn engine_status(name: &str, e: &FakeEngine) -> EngineStatus {
    EngineStatus {
        name: name.to_owned(),
        image: e.image.clone(),
        phase: if e.running {
            Phase::Ready
        } else {
            Phase::Stopped
        },
        enabled: e.enabled,
        pid: e.running.then_some(4242),
        started_at: None,
        restarts: 0,
        last_exit: None,
        probes: Vec::new(),
        probes_delayed: 0,
        notes: Vec::new(),
        confinement: None,
    }
}

fn no_engine(name: &str) -> Failure {
    Failure::new(FailureKind::NotFound, format!("no engine named {name:?}"))
}

impl FakeEngines {
    fn set(&mut self, step: &str, name: &str, running: bool) -> Result<EngineStatus, Failure> {
        let mut w = self.0.op(format!("{step} {name}")).map_err(vfail)?;
        let e = w.engines.get_mut(name).ok_or_else(|| no_engine(name))?;
        e.running = running;
        e.enabled = running;
        Ok(engine_status(name, e))
    }
}

impl Engines for FakeEngines {
    fn budget(&mut self) -> Result<Budget, Failure> {
        let w = self.0.op("engines.budget").map_err(vfail)?;
        Ok(w.budget)
    }

    fn set_budget(&mut self, budget: &Budget) -> Result<crate::BudgetApplied, Failure> {
        let mut w = self.0.op("engines.set_budget").map_err(vfail)?;
        w.budget = *budget;
        let above = w
            .engines
            .values()
            .filter(|e| leasehold_engines::budget::check(&e.spec.limits, budget).is_err())
            .count();
        Ok(crate::BudgetApplied {
            budget: *budget,
            written: true,
            error: None,
            engines_above: u32::try_from(above).unwrap_or(u32::MAX),
        })
    }

    fn send(&mut self, c: &crate::EngineCommand) -> crate::EngineAnswer {
        let r = crate::engines::carry_out(self, c);
        let gate = self.0.world().answers.clone();
        Box::new(move || {
            if let Some(g) = gate {
                g.wait();
            }
            r
        })
    }

    fn deploy(&mut self, name: &str, image: &str, spec: &Spec) -> Result<EngineStatus, Failure> {
        let mut w = self.0.op(format!("engines.deploy {name}")).map_err(vfail)?;
        if w.engines.contains_key(name) {
            return Err(Failure::new(
                FailureKind::Invalid,
                format!("an engine named {name:?} exists; reload or rm it"),
            ));
        }
        let e = FakeEngine {
            image: image.to_owned(),
            spec: spec.clone(),
            running: false,
            enabled: false,
            stubborn: false,
        };
        let st = engine_status(name, &e);
        w.engines.insert(name.to_owned(), e);
        Ok(st)
    }

    fn start(&mut self, name: &str) -> Result<EngineStatus, Failure> {
        self.set("engines.start", name, true)
    }

    fn stop(
        &mut self,
        name: &str,
        _grace: Option<std::time::Duration>,
    ) -> Result<EngineStatus, Failure> {
        self.set("engines.stop", name, false)
    }

    fn restart(&mut self, name: &str) -> Result<EngineStatus, Failure> {
        self.set("engines.restart", name, true)
    }

    fn reload(
        &mut self,
        name: &str,
        image: Option<&str>,
        spec: Option<&Spec>,
    ) -> Result<EngineStatus, Failure> {
        let mut w = self.0.op(format!("engines.reload {name}")).map_err(vfail)?;
        let e = w.engines.get_mut(name).ok_or_else(|| no_engine(name))?;
        if let Some(i) = image {
            e.image = i.to_owned();
        }
        if let Some(s) = spec {
            e.spec = s.clone();
        }
        Ok(engine_status(name, e))
    }

    fn rm(&mut self, name: &str) -> Result<(), Failure> {
        let mut w = self.0.op(format!("engines.rm {name}")).map_err(vfail)?;
        match w.engines.get(name) {
            None => Err(no_engine(name)),
            Some(e) if e.running => Err(Failure::new(
                FailureKind::Invalid,
                format!("engine {name:?} is running; stop it first"),
            )),
            Some(_) => {
                w.engines.remove(name);
                Ok(())
            }
        }
    }

    fn stop_all(&mut self, _grace: std::time::Duration) -> Result<StopReport, Failure> {
        let mut w = self.0.op("engines.stop_all").map_err(vfail)?;
        let mut r = StopReport::default();
        for (name, e) in w.engines.iter_mut() {
            e.enabled = false;
            if !e.running {
                continue;
            }
            if e.stubborn {
                r.not_stopped.push(NotStopped {
                    name: name.clone(),
                    reason: "processes left in its cgroup after the kill".into(),
                });
            } else {
                e.running = false;
                r.stopped.push(name.clone());
            }
        }
        Ok(r)
    }

    fn forget_all(&mut self) -> Result<usize, Failure> {
        let mut w = self.0.op("engines.forget_all").map_err(vfail)?;
        let n = w.engines.len();
        w.engines.clear();
        Ok(n)
    }

    fn view(&self) -> std::sync::Arc<dyn EngineView> {
        std::sync::Arc::new(FakeEngineView(self.0.clone()))
    }
}

/// The fake runtime's read-only view (reads are not backend steps: not
/// logged, never held).
#[derive(Debug)]
pub struct FakeEngineView(pub Fake);

impl EngineView for FakeEngineView {
    fn list(&self) -> Vec<EngineStatus> {
        let w = self.0.world();
        w.engines.iter().map(|(n, e)| engine_status(n, e)).collect()
    }

    fn status(&self, name: &str) -> Option<EngineStatus> {
        let w = self.0.world();
        w.engines.get(name).map(|e| engine_status(name, e))
    }

    fn tenant(&self) -> crate::TenantView {
        let w = self.0.world();
        crate::TenantView {
            budget: w.budget,
            written: true,
            error: None,
            engines: u32::try_from(w.engines.len()).unwrap_or(u32::MAX),
            running: u32::try_from(w.engines.values().filter(|e| e.running).count())
                .unwrap_or(u32::MAX),
            usage: Ok(leasehold_engines::cgroup::Usage::default()),
            throttles: crate::Throttles::default(),
            throttled_cpu_max: None,
        }
    }
}
