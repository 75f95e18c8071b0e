//! The D-Bus interfaces: adapters. Each method authorizes (one place,
//! polkit), then either submits a command to the node controller or reads
//! its snapshot or a backend's status, and converts the result. Errors are
//! mapped to `org.leasehold.Error.*` only here.

use std::sync::Arc;
use std::time::SystemTime;

use leasehold_dbus_api::{
    actions, BoundaryInfo, BudgetInfo, EngineInfo, Error, FlowVerdict, KeyChange, NodeInfo,
    PublicKey, ReceiptInfo, SecretInfo, VolumeInfo, API_VERSION, ATTEST_API_VERSION,
    HEALTH_API_VERSION, MAX_SPEC_TEXT, OBJECT_PATH,
};
use leasehold_engines::budget::Budget;
use leasehold_engines::spec::Spec;
use leasehold_netpolicy::policy::parse_doc;
use leasehold_netpolicy::BoundaryDoc;
use leasehold_node::backend::Events;
use leasehold_node::kind_name;
use leasehold_node::{
    BoundaryApplied, BoundaryChange, Caller, ChangeReport, Command, EngineCommand, EngineStatus,
    FailureKind, Node, NodeError, Outcome, Request, SignedReceipt,
};
use leasehold_tpm::{KeyError, Role};
use zbus::message::Header;
use zbus::{interface, Connection};

use crate::auth::Authorizer;
use crate::boundary::{parse_flow, Boundaries, BoundaryError};
use crate::power::{self, PowerAction};
use crate::secrets::SecretStore;
use crate::volume::Volume;

/// What both interfaces share.
#[derive(Debug)]
pub struct Ctx {
    /// The controller: every state change goes through it.
    pub node: Arc<Node>,
    /// polkit.
    pub auth: Authorizer,
    /// Boundary reads (status, explain).
    pub boundaries: Arc<Boundaries>,
    /// Volume reads (status).
    pub volume: Arc<Volume>,
    /// Secret reads (list).
    pub secrets: SecretStore,
    /// The last TPM health check (NodeInfo).
    pub tpm_health: Arc<crate::health::TpmHealth>,
    /// The corrective actions' records (ListActionRecords).
    pub action_records: crate::actions::RecordStore,
    /// Receipt reads (ListReceipts, GetReceipt).
    pub receipts: crate::receipts::ReceiptStore,
    /// Health reports (Health1.Report).
    pub health: Arc<leasehold_health::Monitor>,
    /// How often the agent collects a report by itself (metrics read the
    /// last one while it is this fresh).
    pub health_interval: std::time::Duration,
    /// Image uploads into the tenant's inbox.
    pub uploads: Arc<crate::upload::Uploads>,
    /// The key thread, for quotes (Attest1): reads that change nothing, so
    /// they skip the controller's queue.
    pub keys: Arc<crate::keys::Keys>,
}

fn key_error(e: KeyError) -> Error {
    let msg = e.to_string();
    match e {
        KeyError::NotPermitted { .. } => Error::NotAuthorized(msg),
        KeyError::ConfirmationRequired { .. } => Error::ConfirmationRequired(msg),
        KeyError::NotAssigned => Error::NotAssigned(msg),
        KeyError::Envelope(_)
        | KeyError::InvalidQuote { .. }
        | KeyError::InvalidName { .. }
        | KeyError::InvalidConsoleKey { .. } => Error::InvalidArgument(msg),
        KeyError::UnknownConsole { .. } => Error::NotFound(msg),
        KeyError::Connect { .. } => Error::Unavailable(msg),
        other => {
            tracing::error!(error = %other, "key operation failed");
            Error::Failed(msg)
        }
    }
}

/// The one conversion of controller errors to the wire.
fn node_error(e: NodeError) -> Error {
    let msg = e.to_string();
    match e {
        NodeError::Busy(_) => Error::Busy(msg),
        NodeError::ConfirmationRequired(_) => Error::ConfirmationRequired(msg),
        NodeError::Invalid { .. } => Error::InvalidArgument(msg),
        NodeError::Keys(k) => key_error(k),
        NodeError::Backend { source, .. } => match source.kind {
            FailureKind::Invalid => Error::InvalidArgument(msg),
            FailureKind::NotFound => Error::NotFound(msg),
            FailureKind::Unavailable => Error::Unavailable(msg),
            FailureKind::Unconfirmed => Error::ConfirmationRequired(msg),
            FailureKind::Failed => {
                tracing::error!(error = %msg, "operation failed");
                Error::Failed(msg)
            }
        },
        NodeError::Stopped => Error::Unavailable(msg),
    }
}

fn boundary_error(e: BoundaryError) -> Error {
    let msg = e.to_string();
    match e {
        BoundaryError::Invalid(_) => Error::InvalidArgument(msg),
        BoundaryError::Unconfirmed(_) => Error::ConfirmationRequired(msg),
        BoundaryError::NoPending => Error::NotFound(msg),
        other => {
            tracing::error!(error = %other, "boundary read failed");
            Error::Failed(msg)
        }
    }
}

fn unexpected(o: &Outcome) -> Error {
    tracing::error!(outcome = ?o, "the controller answered another command");
    Error::Failed("internal error: unexpected outcome".into())
}

/// A key change on the wire (method result and `KeysChanged` body).
fn change_dict(r: &ChangeReport) -> KeyChange {
    let c = &r.change;
    KeyChange {
        kind: Some(kind_name(c.kind).to_owned()),
        role: Some(c.role.to_string()),
        generation_before: c.generation_before,
        generation_after: c.generation_after,
        data_destroyed: Some(c.data_destroyed),
        fingerprint: c.fingerprint_after.clone(),
        receipt: r.receipt.as_ref().map(|s| s.body.clone()),
        receipt_signature: r.receipt.as_ref().map(|s| s.signature.clone()),
        warnings: Some(r.warnings.clone()),
    }
}

/// `KeysChanged` for each interface that gets it: landlords see every
/// change; tenants see changes of tenant keys (delivery is restricted to
/// the roles by the bus policy). Each copy carries what that role's
/// `ListReceipts` shows (docs/dbus.md, "Receipts"):
/// - the landlord's copy of a tenant's own rotation has no receipt and no
///   warnings: the receipt names the tenant's engines, and so can a
///   warning (an engine not shown stopped);
/// - the tenant's copy of an assignment or a release has no receipt and
///   no warnings: it is the previous tenancy's erase, or the one that
///   ended, and a warning can name that tenancy's engines or its
///   sub-boundary (review).
fn signal_copies(change: KeyChange, role: Role) -> Vec<(&'static str, KeyChange)> {
    let kind = change.kind.clone().unwrap_or_default();
    let tenancy = kind == "assign" || kind == "release";
    let mut landlords = change.clone();
    if role == Role::Tenant && !tenancy {
        landlords.receipt = None;
        landlords.receipt_signature = None;
        landlords.warnings = None;
    }
    let mut copies = vec![(leasehold_dbus_api::LANDLORD_INTERFACE, landlords)];
    if role == Role::Tenant {
        let mut theirs = change;
        if tenancy {
            theirs.receipt = None;
            theirs.receipt_signature = None;
            theirs.warnings = None;
        }
        copies.push((leasehold_dbus_api::TENANT_INTERFACE, theirs));
    }
    copies
}

/// A stored receipt on the wire; the body and signature only for
/// `GetReceipt`.
fn receipt_dict(r: crate::receipts::Stored, with_body: bool) -> ReceiptInfo {
    ReceiptInfo {
        id: Some(r.id),
        time: Some(r.time),
        change: Some(r.change),
        role: Some(r.role),
        signer: Some(r.signer),
        receipt: with_body.then_some(r.body),
        receipt_signature: with_body.then_some(r.signature),
    }
}

fn receipt_error(e: crate::receipts::ReceiptError) -> Error {
    match e {
        crate::receipts::ReceiptError::NotFound(_) => Error::NotFound(e.to_string()),
        crate::receipts::ReceiptError::Io { .. } => {
            tracing::error!(error = %e, "cannot read receipts");
            Error::Failed(e.to_string())
        }
    }
}

impl Ctx {
    async fn receipts(&self, reader: crate::receipts::Reader) -> Result<Vec<ReceiptInfo>, Error> {
        let store = self.receipts.clone();
        blocking(move || {
            store
                .list(reader)
                .map(|v| v.into_iter().map(|r| receipt_dict(r, false)).collect())
                .map_err(receipt_error)
        })
        .await
    }

    async fn receipt(
        &self,
        reader: crate::receipts::Reader,
        id: &str,
    ) -> Result<ReceiptInfo, Error> {
        let store = self.receipts.clone();
        let id = id.to_owned();
        blocking(move || {
            store
                .get(reader, &id)
                .map(|r| receipt_dict(r, true))
                .map_err(receipt_error)
        })
        .await
    }
}

fn boundary_doc(document: &str, format: &str) -> Result<BoundaryDoc, Error> {
    parse_doc(document, format).map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// A budget document: TOML or JSON (`format` "toml", "json", or "" to
/// tell by its first character), at most `MAX_BUDGET_BYTES`.
fn budget_doc(document: &str, format: &str) -> Result<Budget, Error> {
    let json = match format {
        "json" => true,
        "toml" => false,
        "" => document.trim_start().starts_with('{'),
        other => {
            return Err(Error::InvalidArgument(format!(
                "format: {}: \"toml\", \"json\" or \"\"",
                leasehold_node::shown(other)
            )))
        }
    };
    let parsed = if json {
        Budget::from_json(document)
    } else {
        Budget::from_toml(document)
    };
    parsed.map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// The landlord's view of the tenant subtree on the wire: sums and counts.
fn budget_dict(v: leasehold_node::TenantView, above: Option<u32>) -> BudgetInfo {
    let b = v.budget;
    let mut i = BudgetInfo {
        cpu_max: b.cpu_max.map(|c| c.to_string()),
        cpu_weight: b.cpu_weight.map(u32::from),
        memory_max: b.memory_max.map(|m| m.0),
        pids_max: b.pids_max,
        io_weight: b.io_weight.map(u32::from),
        written: Some(v.written),
        write_error: v.error,
        engines_above: above,
        engines: Some(v.engines),
        engines_running: Some(v.running),
        // Aggregate only: the percent that binds, not the rules.
        throttle_cpu_percent: v.throttles.cpu_percent().map(u32::from),
        throttled_cpu_max: v.throttled_cpu_max,
        throttled_since: v.throttles.since(),
        ..BudgetInfo::default()
    };
    match v.usage {
        Ok(u) => {
            let sum = |f: fn(&leasehold_engines::cgroup::IoStat) -> u64| {
                Some(u.io.iter().map(f).fold(0u64, u64::saturating_add))
            };
            i.cpu_usage_usec = Some(u.cpu_usage_usec);
            i.memory_current = Some(u.memory_current);
            i.pids_current = Some(u.pids_current);
            i.oom_kills = Some(u.oom_kills);
            i.io_read_bytes = sum(|s| s.rbytes);
            i.io_write_bytes = sum(|s| s.wbytes);
            i.io_reads = sum(|s| s.rios);
            i.io_writes = sum(|s| s.wios);
        }
        Err(e) => i.usage_error = Some(e),
    }
    i
}

/// Runs blocking work (file I/O, nft, big documents) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Failed(format!("worker task: {e}")))?
}

/// Reports committed changes on the bus and keeps receipts on disk.
#[derive(Debug)]
pub struct BusEvents {
    /// The agent's bus connection.
    pub conn: Connection,
    /// Runtime to emit from (the controller thread is not a runtime thread).
    pub rt: tokio::runtime::Handle,
    /// `<state dir>/receipts` and the tenancy record.
    pub receipts: crate::receipts::ReceiptStore,
}

impl Events for BusEvents {
    fn store_receipt(&mut self, r: &SignedReceipt) -> Result<(), leasehold_node::Failure> {
        self.receipts
            .store(r)
            .map_err(|e| leasehold_node::Failure::failed(format!("receipts/{}: {e}", r.file_name)))
    }

    fn begin_tenancy_change(
        &mut self,
        change: &leasehold_node::TenancyChange,
    ) -> Result<(), leasehold_node::Failure> {
        self.receipts.begin_change(change).map_err(|e| {
            leasehold_node::Failure::failed(format!(
                "cannot record the change of tenancy ({}): {e}",
                crate::receipts::CHANGE_FILE
            ))
        })
    }

    fn end_tenancy_change(&mut self) {
        if let Err(e) = self.receipts.end_change() {
            // The next start finds it and checks the keys: it finishes a
            // change that committed (again: each step is idempotent) or
            // drops one that did not.
            tracing::error!(error = %e, "cannot remove the record of a change of tenancy");
        }
    }

    fn pending_tenancy_change(&mut self) -> Option<leasehold_node::TenancyChange> {
        self.receipts.pending_change()
    }

    fn tenancy_recorded(&mut self, assigned: bool) {
        if let Err(e) = self.receipts.tenancy_changed(assigned) {
            tracing::error!(error = %e, "cannot record the tenancy; the tenant sees no receipt until the next assignment");
        }
    }

    fn keys_changed(&mut self, report: &ChangeReport) {
        let change = change_dict(report);
        // A tenancy starts or ends: the receipts so far are not the
        // (next) tenant's. Before the signal, so a reader woken by it sees
        // the new record.
        let kind = kind_name(report.change.kind);
        if kind == "assign" || kind == "release" {
            if let Err(e) = self.receipts.tenancy_changed(kind == "assign") {
                tracing::error!(error = %e, "cannot record the tenancy; the tenant sees no receipt until the next assignment");
            }
        }
        let ifaces = signal_copies(change, report.change.role);
        let conn = self.conn.clone();
        self.rt.spawn(async move {
            for (iface, change) in ifaces {
                if let Err(e) = conn
                    .emit_signal(None::<&str>, OBJECT_PATH, iface, "KeysChanged", &(&change,))
                    .await
                {
                    tracing::warn!(error = %e, "cannot emit KeysChanged");
                }
            }
        });
    }
}

/// A caller's value as a polkit detail: as given, so a local rule's
/// `action.lookup("secret") == "db"` matches (review: details were quoted
/// and cut to 64 characters, so such a rule never matched, and two long
/// device paths gave the same detail); only a value longer than any valid
/// one (4096 bytes: a path) is cut, and then names its length.
fn detail(v: &str) -> String {
    if v.len() <= 4096 {
        v.to_owned()
    } else {
        leasehold_node::shown(v)
    }
}

impl Ctx {
    /// The one place calls are authorized: polkit with the method name and
    /// call-specific details. Root may act only as the landlord.
    async fn authorize(
        &self,
        hdr: &Header<'_>,
        role: Role,
        action: &str,
        method: &str,
        extra: &[(&str, &str)],
    ) -> Result<Caller, Error> {
        let mut details = vec![("method", method)];
        details.extend_from_slice(extra);
        // The in-flight permit stays with the call until it is answered.
        let uid = self
            .auth
            .check(hdr, action, &details, role == Role::Landlord)
            .await?
            .hold()?;
        Ok(Caller { role, uid })
    }

    /// Submits a change to the controller.
    async fn submit(
        &self,
        caller: Caller,
        received: SystemTime,
        command: Command,
    ) -> Result<Outcome, Error> {
        self.node
            .submit(Request {
                caller,
                command,
                received,
            })
            .await
            .map_err(node_error)
    }

    async fn key_change(
        &self,
        caller: Caller,
        received: SystemTime,
        command: Command,
    ) -> Result<KeyChange, Error> {
        match self.submit(caller, received, command).await? {
            Outcome::Changed(r) => Ok(change_dict(&r)),
            // Already so: an idempotent result, not an error.
            Outcome::AlreadyReleased => Ok(KeyChange {
                kind: Some("release".into()),
                role: Some("tenant".into()),
                data_destroyed: Some(false),
                ..Default::default()
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Waits for a revert deadline (unix seconds), then asks the controller
    /// to put the previous boundary back (a no-op if the change was
    /// confirmed or re-armed meanwhile) and announces it with the
    /// `BoundaryReverted` signal. Armed after `SetBoundaryWithRevert` and at
    /// start for a revert pending in the state dir (at once if its deadline
    /// passed while the agent was down).
    pub async fn revert_at(self: Arc<Self>, conn: Connection, deadline: u64) {
        let now = crate::boundary::revert::now_unix();
        let wait = std::time::Duration::from_secs(deadline.saturating_sub(now))
            + std::time::Duration::from_millis(200);
        tokio::time::sleep(wait).await;
        let caller = Caller {
            role: Role::Landlord,
            uid: 0,
        };
        // Until it is done or no longer pending: the revert is the
        // landlord's way back in, so it is never given up (before, 30
        // tries 2 s apart, after which the bad boundary stayed until the
        // agent restarted). 2 s doubling to 60 s between tries.
        let mut pause = std::time::Duration::from_secs(2);
        for attempt in 0u64.. {
            let r = self
                .submit(
                    caller,
                    SystemTime::now(),
                    Command::Boundary(BoundaryChange::RevertPending { deadline }),
                )
                .await;
            match r {
                Ok(Outcome::Boundary(a)) => {
                    for what in a.warnings {
                        if let Err(e) = conn
                            .emit_signal(
                                None::<&str>,
                                OBJECT_PATH,
                                leasehold_dbus_api::LANDLORD_INTERFACE,
                                "BoundaryReverted",
                                &(what,),
                            )
                            .await
                        {
                            tracing::warn!(error = %e, "cannot emit BoundaryReverted");
                        }
                    }
                    return;
                }
                Ok(other) => {
                    let _ = unexpected(&other);
                    return;
                }
                Err(e) => {
                    // Busy or a failed apply: the revert stays pending; try again.
                    tracing::error!(error = %e.message(), attempt, retry_in_s = pause.as_secs(), "boundary revert failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(60));
                }
            }
        }
    }

    async fn boundary_change(
        &self,
        caller: Caller,
        change: BoundaryChange,
    ) -> Result<BoundaryInfo, Error> {
        let landlord = caller.role == Role::Landlord;
        match self
            .submit(caller, SystemTime::now(), Command::Boundary(change))
            .await?
        {
            Outcome::Boundary(a) => self.boundary_info(landlord, a).await,
            other => Err(unexpected(&other)),
        }
    }

    /// The budget and aggregate usage (reads cgroup files: off the async
    /// workers).
    pub(crate) async fn budget_info(&self, above: Option<u32>) -> Result<BudgetInfo, Error> {
        let node = self.node.clone();
        blocking(move || Ok(budget_dict(node.tenant_usage(), above))).await
    }

    fn require_tenant(&self) -> Result<(), Error> {
        if self.node.snapshot().status.tenant.is_none() {
            return Err(key_error(KeyError::NotAssigned));
        }
        Ok(())
    }

    async fn boundary_info(
        &self,
        landlord: bool,
        a: BoundaryApplied,
    ) -> Result<BoundaryInfo, Error> {
        let b = self.boundaries.clone();
        // A peer change answers with the status only: the documents of a
        // 100k-peer boundary are megabytes (GetBoundary has them).
        let peers = a.peers_changed.is_some();
        let mut info =
            blocking(move || Ok(if peers { b.status() } else { b.info(landlord) })).await?;
        info.warnings = Some(a.warnings);
        if peers && landlord {
            info.revert_at = self.boundaries.pending_deadline();
        }
        info.cut = (!landlord).then_some(a.cut);
        info.peers_changed = a
            .peers_changed
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        Ok(info)
    }

    async fn explain(
        &self,
        direction: String,
        peer: String,
        proto: String,
        port: u16,
        landlord: bool,
    ) -> Result<FlowVerdict, Error> {
        let flow = parse_flow(&direction, &peer, &proto, port)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let b = self.boundaries.clone();
        blocking(move || b.explain(&flow, landlord).map_err(boundary_error)).await
    }

    fn node_info(&self, role: Role) -> NodeInfo {
        let snap = self.node.snapshot();
        let st = &snap.status;
        let mut info = NodeInfo {
            node_id: Some(st.node_id.clone()),
            tpm_kind: Some(
                match st.tpm_kind {
                    leasehold_tpm::TpmKind::Hardware => "hardware",
                    leasehold_tpm::TpmKind::Software => "software",
                }
                .into(),
            ),
            landlord_fingerprint: Some(st.landlord.fingerprint.clone()),
            assigned: Some(st.tenant.is_some()),
            api_version: Some(API_VERSION),
            consoles: Some(
                st.consoles
                    .iter()
                    .filter(|(r, _, _)| *r == role)
                    .map(|(_, n, fp)| format!("{n} {fp}"))
                    .collect(),
            ),
            ..Default::default()
        };
        if role == Role::Landlord {
            info.landlord_generation = Some(st.landlord.generation);
        }
        info.running = self.node.running().map(str::to_owned);
        info.agent_version = Some(env!("CARGO_PKG_VERSION").to_owned());
        info.engine_count = Some(u32::try_from(self.node.engines().len()).unwrap_or(u32::MAX));
        info.tpm_error = self.tpm_health.error();
        info.tpm_health = Some(
            if info.tpm_error.is_some() {
                "failed"
            } else {
                "ok"
            }
            .into(),
        );
        if let Some(t) = &st.tenant {
            info.tenant_name.clone_from(&t.name);
            info.tenant_generation = Some(t.generation);
            info.tenant_key_generation = Some(t.key_generation);
            info.tenant_fingerprint = Some(t.fingerprint.clone());
        }
        info
    }

    fn public_key(&self, caller: Role, role: Role) -> Result<PublicKey, Error> {
        let pk = self
            .node
            .snapshot()
            .public_key_as(caller, role)
            .map_err(key_error)?;
        Ok(PublicKey {
            role: Some(role.to_string()),
            generation: Some(pk.generation),
            pem: Some(pk.pem),
            fingerprint: Some(pk.fingerprint),
        })
    }

    fn receipt_key(&self) -> PublicKey {
        let k = &self.node.snapshot().receipt_key;
        PublicKey {
            role: Some("node".into()),
            generation: None,
            pem: Some(k.pem.clone()),
            fingerprint: Some(k.fingerprint.clone()),
        }
    }

    pub(crate) async fn volume_info(&self) -> Result<VolumeInfo, Error> {
        let v = self.volume.clone();
        let (m, rt, usage) =
            blocking(move || v.status().map_err(|e| Error::Failed(e.to_string()))).await?;
        let Some(m) = m else {
            return Ok(VolumeInfo {
                state: Some("none".into()),
                ..Default::default()
            });
        };
        let state = if rt.open {
            "open"
        } else if rt.error.is_some()
            || (m.state == leasehold_storage::VolumeState::Initializing && !rt.working)
        {
            // An initialization that never finished is not "closed".
            "error"
        } else {
            "closed"
        };
        let mut mapping = format!("{}, {}-bit key", m.cipher, m.key_bytes * 8);
        for o in &m.options {
            mapping.push_str(", ");
            mapping.push_str(o);
        }
        Ok(VolumeInfo {
            state: Some(state.into()),
            device: Some(m.device.clone()),
            size: Some(m.size_bytes),
            used: usage.map(|u| u.0),
            total: usage.map(|u| u.1),
            mount: Some(self.volume.mount_point().display().to_string()),
            filesystem: Some(m.filesystem.clone()),
            mapping: Some(mapping),
            generations: Some(m.generations_text()),
            created: Some(m.created),
            made: Some(m.made),
            made_by: m.made_by.clone(),
            next: self.volume.next_step(&m, &rt),
            progress: rt.progress.clone(),
            event: rt.event,
            error: rt.error,
        })
    }

    // Methods both interfaces have, for `role`'s interface.

    async fn rotate_keys(
        &self,
        hdr: &Header<'_>,
        role: Role,
        action: &str,
        confirm: bool,
    ) -> Result<KeyChange, Error> {
        let received = SystemTime::now();
        let caller = self.authorize(hdr, role, action, "RotateKeys", &[]).await?;
        self.key_change(caller, received, Command::Rotate { role, confirm })
            .await
    }

    async fn rekey_keys(
        &self,
        hdr: &Header<'_>,
        role: Role,
        action: &str,
    ) -> Result<KeyChange, Error> {
        let received = SystemTime::now();
        let caller = self.authorize(hdr, role, action, "RekeyKeys", &[]).await?;
        self.key_change(caller, received, Command::Rekey { role })
            .await
    }

    async fn register_console_key(
        &self,
        hdr: &Header<'_>,
        role: Role,
        action: &str,
        name: String,
        pem: String,
    ) -> Result<String, Error> {
        let caller = self
            .authorize(
                hdr,
                role,
                action,
                "RegisterConsoleKey",
                &[("console", &detail(&name))],
            )
            .await?;
        match self
            .submit(
                caller,
                SystemTime::now(),
                Command::RegisterConsole { name, pem },
            )
            .await?
        {
            Outcome::ConsoleRegistered(fp) => Ok(fp),
            other => Err(unexpected(&other)),
        }
    }
}

/// `org.leasehold.Landlord1`
pub struct LandlordApi(pub Arc<Ctx>);

impl LandlordApi {
    async fn auth(
        &self,
        hdr: &Header<'_>,
        action: &str,
        method: &str,
        extra: &[(&str, &str)],
    ) -> Result<Caller, Error> {
        self.0
            .authorize(hdr, Role::Landlord, action, method, extra)
            .await
    }

    async fn edit_peers(
        &self,
        hdr: Header<'_>,
        target: String,
        peers: Vec<String>,
        add: bool,
    ) -> Result<BoundaryInfo, Error> {
        let method = if add { "AddPeers" } else { "RemovePeers" };
        let caller = self
            .auth(
                &hdr,
                actions::LANDLORD_BOUNDARY,
                method,
                &[("target", &detail(&target))],
            )
            .await?;
        self.0
            .boundary_change(caller, BoundaryChange::EditPeers { target, peers, add })
            .await
    }

    async fn power(
        &self,
        hdr: Header<'_>,
        conn: &Connection,
        action: &str,
        method: &str,
        what: PowerAction,
    ) -> Result<(), Error> {
        let caller = self.auth(&hdr, action, method, &[]).await?;
        tracing::warn!(
            uid = caller.uid,
            method,
            "power action requested by the landlord"
        );
        power::run(conn, what).await
    }
}

#[interface(name = "org.leasehold.Landlord1")]
impl LandlordApi {
    async fn node_info(&self, #[zbus(header)] hdr: Header<'_>) -> Result<NodeInfo, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "NodeInfo", &[])
            .await?;
        Ok(self.0.node_info(Role::Landlord))
    }

    async fn get_public_key(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        role: String,
    ) -> Result<PublicKey, Error> {
        self.auth(
            &hdr,
            actions::LANDLORD_READ,
            "GetPublicKey",
            &[("role", &detail(&role))],
        )
        .await?;
        let role: Role = role.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "role: {}: use landlord or tenant",
                leasehold_node::shown(&role)
            ))
        })?;
        self.0.public_key(Role::Landlord, role)
    }

    async fn assign_tenant(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        console_key: String,
        confirm: bool,
    ) -> Result<KeyChange, Error> {
        let received = SystemTime::now();
        let caller = self
            .auth(
                &hdr,
                actions::LANDLORD_ASSIGN,
                "AssignTenant",
                &[("tenant", &detail(&name))],
            )
            .await?;
        let console_key = (!console_key.is_empty()).then_some(console_key);
        self.0
            .key_change(
                caller,
                received,
                Command::Assign {
                    name,
                    console_key,
                    confirm,
                },
            )
            .await
    }

    async fn release_tenant(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        confirm: bool,
    ) -> Result<KeyChange, Error> {
        let received = SystemTime::now();
        let caller = self
            .auth(&hdr, actions::LANDLORD_ASSIGN, "ReleaseTenant", &[])
            .await?;
        self.0
            .key_change(caller, received, Command::Release { confirm })
            .await
    }

    async fn rotate_keys(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        confirm: bool,
    ) -> Result<KeyChange, Error> {
        self.0
            .rotate_keys(&hdr, Role::Landlord, actions::LANDLORD_KEYS, confirm)
            .await
    }

    async fn rekey_keys(&self, #[zbus(header)] hdr: Header<'_>) -> Result<KeyChange, Error> {
        self.0
            .rekey_keys(&hdr, Role::Landlord, actions::LANDLORD_KEYS)
            .await
    }

    async fn register_console_key(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        pem: String,
    ) -> Result<String, Error> {
        self.0
            .register_console_key(&hdr, Role::Landlord, actions::LANDLORD_KEYS, name, pem)
            .await
    }

    async fn reboot(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.power(
            hdr,
            conn,
            actions::LANDLORD_REBOOT,
            "Reboot",
            PowerAction::Reboot,
        )
        .await
    }

    async fn power_off(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.power(
            hdr,
            conn,
            actions::LANDLORD_POWEROFF,
            "PowerOff",
            PowerAction::PowerOff,
        )
        .await
    }

    async fn suspend(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.power(
            hdr,
            conn,
            actions::LANDLORD_SUSPEND,
            "Suspend",
            PowerAction::Suspend,
        )
        .await
    }

    async fn set_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        document: String,
        format: String,
    ) -> Result<BoundaryInfo, Error> {
        let caller = self
            .auth(&hdr, actions::LANDLORD_BOUNDARY, "SetBoundary", &[])
            .await?;
        let doc = blocking(move || boundary_doc(&document, &format)).await?;
        self.0
            .boundary_change(caller, BoundaryChange::SetCluster(doc))
            .await
    }

    async fn get_boundary(&self, #[zbus(header)] hdr: Header<'_>) -> Result<BoundaryInfo, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "GetBoundary", &[])
            .await?;
        self.0.boundary_info(true, BoundaryApplied::default()).await
    }

    async fn add_peers(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        target: String,
        peers: Vec<String>,
    ) -> Result<BoundaryInfo, Error> {
        self.edit_peers(hdr, target, peers, true).await
    }

    async fn remove_peers(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        target: String,
        peers: Vec<String>,
    ) -> Result<BoundaryInfo, Error> {
        self.edit_peers(hdr, target, peers, false).await
    }

    async fn set_failsafe(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        document: String,
        format: String,
    ) -> Result<BoundaryInfo, Error> {
        let caller = self
            .auth(&hdr, actions::LANDLORD_BOUNDARY, "SetFailsafe", &[])
            .await?;
        let doc = blocking(move || boundary_doc(&document, &format)).await?;
        if !doc.allow.is_empty() || !doc.groups.is_empty() {
            return Err(Error::InvalidArgument(
                "document: a failsafe document has only [[failsafe]] entries".into(),
            ));
        }
        self.0
            .boundary_change(caller, BoundaryChange::SetFailsafe(doc.failsafe))
            .await
    }

    async fn explain_flow(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        direction: String,
        peer: String,
        proto: String,
        port: u16,
    ) -> Result<FlowVerdict, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "ExplainFlow", &[])
            .await?;
        self.0.explain(direction, peer, proto, port, true).await
    }

    async fn init_volume(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        device: String,
        force: bool,
        confirm: bool,
    ) -> Result<VolumeInfo, Error> {
        let caller = self
            .auth(
                &hdr,
                actions::LANDLORD_VOLUME,
                "InitVolume",
                &[("device", &detail(&device))],
            )
            .await?;
        match self
            .0
            .submit(
                caller,
                SystemTime::now(),
                Command::InitVolume {
                    device,
                    force,
                    confirm,
                },
            )
            .await?
        {
            Outcome::VolumeInitialized => self.0.volume_info().await,
            other => Err(unexpected(&other)),
        }
    }

    async fn volume_status(&self, #[zbus(header)] hdr: Header<'_>) -> Result<VolumeInfo, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "VolumeStatus", &[])
            .await?;
        self.0.volume_info().await
    }

    async fn forget_volume(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        confirm: bool,
    ) -> Result<VolumeInfo, Error> {
        let caller = self
            .auth(&hdr, actions::LANDLORD_VOLUME, "ForgetVolume", &[])
            .await?;
        match self
            .0
            .submit(caller, SystemTime::now(), Command::ForgetVolume { confirm })
            .await?
        {
            Outcome::VolumeForgotten(_) => self.0.volume_info().await,
            other => Err(unexpected(&other)),
        }
    }

    async fn get_receipt_key(&self, #[zbus(header)] hdr: Header<'_>) -> Result<PublicKey, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "GetReceiptKey", &[])
            .await?;
        Ok(self.0.receipt_key())
    }

    async fn list_receipts(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<ReceiptInfo>, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "ListReceipts", &[])
            .await?;
        self.0.receipts(crate::receipts::Reader::Landlord).await
    }

    async fn get_receipt(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        id: &str,
    ) -> Result<ReceiptInfo, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "GetReceipt", &[])
            .await?;
        self.0.receipt(crate::receipts::Reader::Landlord, id).await
    }

    async fn remove_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        confirm: bool,
    ) -> Result<(), Error> {
        let caller = self
            .auth(&hdr, actions::LANDLORD_BOUNDARY, "RemoveBoundary", &[])
            .await?;
        self.0
            .boundary_change(caller, BoundaryChange::Remove { confirm })
            .await?;
        tracing::warn!(uid = caller.uid, "boundary removed: the node is unfenced");
        Ok(())
    }

    async fn set_boundary_with_revert(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        document: String,
        format: String,
        seconds: u32,
        confirm: bool,
    ) -> Result<BoundaryInfo, Error> {
        let caller = self
            .auth(
                &hdr,
                actions::LANDLORD_BOUNDARY,
                "SetBoundaryWithRevert",
                &[
                    ("seconds", &seconds.to_string()),
                    ("confirm", if confirm { "true" } else { "false" }),
                ],
            )
            .await?;
        let revert_after = crate::boundary::revert::check_seconds(seconds)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let doc = blocking(move || boundary_doc(&document, &format)).await?;
        let info = self
            .0
            .boundary_change(
                caller,
                BoundaryChange::SetClusterWith {
                    doc,
                    confirm,
                    revert_after,
                },
            )
            .await?;
        if revert_after.is_some() {
            if let Some(deadline) = info.revert_at {
                tokio::spawn(self.0.clone().revert_at(conn.clone(), deadline));
            }
        }
        Ok(info)
    }

    async fn confirm_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<BoundaryInfo, Error> {
        let caller = self
            .auth(&hdr, actions::LANDLORD_BOUNDARY, "ConfirmBoundary", &[])
            .await?;
        self.0
            .boundary_change(caller, BoundaryChange::ConfirmPending)
            .await
    }

    async fn set_failsafe_confirmed(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        document: String,
        format: String,
        confirm: bool,
    ) -> Result<BoundaryInfo, Error> {
        let caller = self
            .auth(
                &hdr,
                actions::LANDLORD_BOUNDARY,
                "SetFailsafeConfirmed",
                &[("confirm", if confirm { "true" } else { "false" })],
            )
            .await?;
        let doc = blocking(move || boundary_doc(&document, &format)).await?;
        if !doc.allow.is_empty() || !doc.groups.is_empty() {
            return Err(Error::InvalidArgument(
                "document: a failsafe document has only [[failsafe]] entries".into(),
            ));
        }
        self.0
            .boundary_change(
                caller,
                BoundaryChange::SetFailsafeWith {
                    entries: doc.failsafe,
                    confirm,
                },
            )
            .await
    }

    async fn check_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        document: String,
        format: String,
    ) -> Result<String, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "CheckBoundary", &[])
            .await?;
        let b = self.0.boundaries.clone();
        blocking(move || {
            let doc = boundary_doc(&document, &format)?;
            b.check_cluster(doc).map_err(boundary_error)
        })
        .await
    }

    async fn set_budget(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        document: String,
        format: String,
    ) -> Result<BudgetInfo, Error> {
        let received = SystemTime::now();
        let caller = self
            .auth(&hdr, actions::LANDLORD_BUDGET, "SetBudget", &[])
            .await?;
        let budget = budget_doc(&document, &format)?;
        let applied = match self
            .0
            .submit(caller, received, Command::SetBudget { budget })
            .await?
        {
            Outcome::BudgetSet(a) => a,
            other => return Err(unexpected(&other)),
        };
        self.0.budget_info(Some(applied.engines_above)).await
    }

    async fn get_budget(&self, #[zbus(header)] hdr: Header<'_>) -> Result<BudgetInfo, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "GetBudget", &[])
            .await?;
        self.0.budget_info(None).await
    }

    #[zbus(signal)]
    async fn boundary_reverted(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        what: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn boundary_restored(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        what: &str,
    ) -> zbus::Result<()>;

    #[zbus(property)]
    fn version(&self) -> u32 {
        API_VERSION
    }
}

/// `org.leasehold.Tenant1`
pub struct TenantApi(pub Arc<Ctx>);

impl TenantApi {
    async fn auth(
        &self,
        hdr: &Header<'_>,
        action: &str,
        method: &str,
        extra: &[(&str, &str)],
    ) -> Result<Caller, Error> {
        self.0
            .authorize(hdr, Role::Tenant, action, method, extra)
            .await
    }
}

#[interface(name = "org.leasehold.Tenant1")]
impl TenantApi {
    async fn node_info(&self, #[zbus(header)] hdr: Header<'_>) -> Result<NodeInfo, Error> {
        self.auth(&hdr, actions::TENANT_READ, "NodeInfo", &[])
            .await?;
        Ok(self.0.node_info(Role::Tenant))
    }

    async fn get_public_key(&self, #[zbus(header)] hdr: Header<'_>) -> Result<PublicKey, Error> {
        self.auth(&hdr, actions::TENANT_READ, "GetPublicKey", &[])
            .await?;
        self.0.public_key(Role::Tenant, Role::Tenant)
    }

    async fn volume_status(&self, #[zbus(header)] hdr: Header<'_>) -> Result<VolumeInfo, Error> {
        self.auth(&hdr, actions::TENANT_READ, "VolumeStatus", &[])
            .await?;
        self.0.require_tenant()?;
        self.0.volume_info().await
    }

    async fn get_receipt_key(&self, #[zbus(header)] hdr: Header<'_>) -> Result<PublicKey, Error> {
        self.auth(&hdr, actions::TENANT_READ, "GetReceiptKey", &[])
            .await?;
        Ok(self.0.receipt_key())
    }

    async fn list_receipts(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<ReceiptInfo>, Error> {
        self.auth(&hdr, actions::TENANT_READ, "ListReceipts", &[])
            .await?;
        self.0.receipts(crate::receipts::Reader::Tenant).await
    }

    async fn get_receipt(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        id: &str,
    ) -> Result<ReceiptInfo, Error> {
        self.auth(&hdr, actions::TENANT_READ, "GetReceipt", &[])
            .await?;
        self.0.receipt(crate::receipts::Reader::Tenant, id).await
    }

    async fn rotate_keys(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        confirm: bool,
    ) -> Result<KeyChange, Error> {
        self.0
            .rotate_keys(&hdr, Role::Tenant, actions::TENANT_KEYS, confirm)
            .await
    }

    async fn rekey_keys(&self, #[zbus(header)] hdr: Header<'_>) -> Result<KeyChange, Error> {
        self.0
            .rekey_keys(&hdr, Role::Tenant, actions::TENANT_KEYS)
            .await
    }

    async fn register_console_key(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        pem: String,
    ) -> Result<String, Error> {
        self.0
            .register_console_key(&hdr, Role::Tenant, actions::TENANT_KEYS, name, pem)
            .await
    }

    async fn put_secret(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        envelope: Vec<u8>,
    ) -> Result<SecretInfo, Error> {
        let caller = self
            .auth(
                &hdr,
                actions::TENANT_SECRETS,
                "PutSecret",
                &[("secret", &detail(&name))],
            )
            .await?;
        leasehold_node::check_put_secret(&name, &envelope).map_err(node_error)?;
        match self
            .0
            .submit(
                caller,
                SystemTime::now(),
                Command::PutSecret { name, envelope },
            )
            .await?
        {
            Outcome::SecretStored(e) => Ok(SecretInfo {
                name: Some(e.name),
                size: Some(e.size),
                stored_at: Some(e.stored_at),
            }),
            other => Err(unexpected(&other)),
        }
    }

    async fn list_secrets(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<SecretInfo>, Error> {
        self.auth(&hdr, actions::TENANT_SECRETS, "ListSecrets", &[])
            .await?;
        // Listing requires a tenant, like every tenant call.
        self.0.require_tenant()?;
        let store = self.0.secrets.clone();
        let list = blocking(move || store.list().map_err(|e| Error::Failed(e.to_string()))).await?;
        Ok(list
            .into_iter()
            .map(|e| SecretInfo {
                name: Some(e.name),
                size: Some(e.size),
                stored_at: Some(e.stored_at),
            })
            .collect())
    }

    async fn remove_secret(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<(), Error> {
        let caller = self
            .auth(
                &hdr,
                actions::TENANT_SECRETS,
                "RemoveSecret",
                &[("secret", &detail(&name))],
            )
            .await?;
        match self
            .0
            .submit(caller, SystemTime::now(), Command::RemoveSecret { name })
            .await?
        {
            Outcome::SecretRemoved => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn set_sub_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        document: String,
        format: String,
        narrow: bool,
    ) -> Result<BoundaryInfo, Error> {
        let caller = self
            .auth(
                &hdr,
                actions::TENANT_BOUNDARY,
                "SetSubBoundary",
                &[("narrow", if narrow { "true" } else { "false" })],
            )
            .await?;
        self.0.require_tenant()?;
        let doc = blocking(move || boundary_doc(&document, &format)).await?;
        self.0
            .boundary_change(caller, BoundaryChange::SetSub { doc, narrow })
            .await
    }

    async fn get_boundary(&self, #[zbus(header)] hdr: Header<'_>) -> Result<BoundaryInfo, Error> {
        self.auth(&hdr, actions::TENANT_READ, "GetBoundary", &[])
            .await?;
        self.0
            .boundary_info(false, BoundaryApplied::default())
            .await
    }

    async fn explain_flow(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        direction: String,
        peer: String,
        proto: String,
        port: u16,
    ) -> Result<FlowVerdict, Error> {
        self.auth(&hdr, actions::TENANT_READ, "ExplainFlow", &[])
            .await?;
        self.0.explain(direction, peer, proto, port, false).await
    }

    async fn check_sub_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        document: String,
        format: String,
    ) -> Result<String, Error> {
        self.auth(&hdr, actions::TENANT_READ, "CheckSubBoundary", &[])
            .await?;
        self.0.require_tenant()?;
        let b = self.0.boundaries.clone();
        blocking(move || {
            let doc = boundary_doc(&document, &format)?;
            b.check_sub(doc).map_err(boundary_error)
        })
        .await
    }

    async fn remove_sub_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<BoundaryInfo, Error> {
        let caller = self
            .auth(&hdr, actions::TENANT_BOUNDARY, "RemoveSubBoundary", &[])
            .await?;
        self.0
            .boundary_change(caller, BoundaryChange::ClearSub)
            .await
    }

    #[zbus(property)]
    fn version(&self) -> u32 {
        API_VERSION
    }
}

// ---------------------------------------------------------------------------
// org.leasehold.TenantEngines1

/// An engine on the wire.
fn engine_info(s: EngineStatus, notes: Option<Vec<String>>) -> EngineInfo {
    // Deploy's notes (the budget), else what the runtime says of it.
    let notes = notes.or_else(|| (!s.notes.is_empty()).then(|| s.notes.clone()));
    EngineInfo {
        name: Some(s.name),
        image: Some(s.image),
        state: Some(s.phase.name().to_owned()),
        enabled: Some(s.enabled),
        pid: s.pid,
        started_at: s
            .started_at
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        restarts: Some(s.restarts),
        last_exit: s.last_exit.map(|e| e.to_string()),
        probes_delayed: Some(s.probes_delayed),
        landlock_abi: s.confinement.as_ref().map(|c| c.landlock_abi),
        landlock: s.confinement.as_ref().map(|c| c.landlock.clone()),
        seccomp: s.confinement.as_ref().map(|c| c.seccomp),
        notes,
        probes: Some(
            s.probes
                .into_iter()
                .map(|p| {
                    let result = match p.ok {
                        Some(true) => "ok",
                        Some(false) => "failed",
                        None => "",
                    };
                    let at =
                        p.at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_secs());
                    (
                        p.probe,
                        p.failures,
                        result.to_owned(),
                        p.detail.unwrap_or_default(),
                        at,
                    )
                })
                .collect(),
        ),
    }
}

/// A spec from the wire: JSON when it starts with `{`, else TOML; the
/// size is checked before parsing.
fn engine_spec(text: &str) -> Result<Box<Spec>, Error> {
    if text.len() > MAX_SPEC_TEXT {
        return Err(Error::InvalidArgument(format!(
            "spec: {} bytes, more than {MAX_SPEC_TEXT}",
            text.len()
        )));
    }
    let parsed = if text.trim_start().starts_with('{') {
        Spec::from_json(text)
    } else {
        Spec::from_toml(text)
    };
    parsed
        .map(Box::new)
        .map_err(|e| Error::InvalidArgument(format!("spec: {e}")))
}

/// Most text one `Logs` reply carries (the system bus refuses messages
/// over 32 MiB by default): the newest lines that fit.
pub const MAX_LOG_REPLY_BYTES: usize = leasehold_engines::logs::MAX_READ_BYTES;

/// Engine log reads running at once (`Logs`); the others wait their turn.
static LOG_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Lines on the wire: `(unix ms, stream, text, partial)`, the newest
/// [`MAX_LOG_REPLY_BYTES`] of them. Text is made UTF-8 (invalid bytes
/// become U+FFFD) without NUL, which a D-Bus string cannot hold.
fn log_lines(records: Vec<leasehold_engines::logs::Record>) -> Vec<(u64, String, String, bool)> {
    let mut out = Vec::with_capacity(records.len());
    let mut bytes = 0usize;
    for r in records.into_iter().rev() {
        let text = String::from_utf8_lossy(&r.text).replace('\0', "\u{fffd}");
        bytes += text.len() + 16;
        if bytes > MAX_LOG_REPLY_BYTES {
            break;
        }
        out.push((r.time_ms, r.stream.name().to_owned(), text, r.partial));
    }
    out.reverse();
    out
}

/// `org.leasehold.TenantEngines1`
pub struct TenantEnginesApi(pub Arc<Ctx>);

impl TenantEnginesApi {
    async fn auth(
        &self,
        hdr: &Header<'_>,
        action: &str,
        method: &str,
        name: &str,
    ) -> Result<Caller, Error> {
        let shown = detail(name);
        let extra: &[(&str, &str)] = if name.is_empty() {
            &[]
        } else {
            &[("engine", &shown)]
        };
        self.0
            .authorize(hdr, Role::Tenant, action, method, extra)
            .await
    }

    async fn command(&self, caller: Caller, command: EngineCommand) -> Result<EngineInfo, Error> {
        match self
            .0
            .submit(caller, SystemTime::now(), Command::Engine(command))
            .await?
        {
            Outcome::EngineDeployed { status, notes } => Ok(engine_info(status, Some(notes))),
            Outcome::Engine(status) => Ok(engine_info(status, None)),
            other => Err(unexpected(&other)),
        }
    }

    async fn deploy_method(
        &self,
        hdr: &Header<'_>,
        name: String,
        image: String,
        spec: String,
    ) -> Result<EngineInfo, Error> {
        let caller = self
            .auth(hdr, actions::TENANT_ENGINE_DEPLOY, "Deploy", &name)
            .await?;
        let spec = blocking(move || engine_spec(&spec)).await?;
        self.command(caller, EngineCommand::Deploy { name, image, spec })
            .await
    }

    async fn reload_method(
        &self,
        hdr: &Header<'_>,
        name: String,
        image: String,
        spec: String,
    ) -> Result<EngineInfo, Error> {
        let caller = self
            .auth(hdr, actions::TENANT_ENGINE_DEPLOY, "Reload", &name)
            .await?;
        let spec = if spec.is_empty() {
            None
        } else {
            Some(blocking(move || engine_spec(&spec)).await?)
        };
        let image = Some(image).filter(|i| !i.is_empty());
        self.command(caller, EngineCommand::Reload { name, image, spec })
            .await
    }

    async fn remove_method(
        &self,
        hdr: &Header<'_>,
        name: String,
        confirm: bool,
    ) -> Result<(), Error> {
        let caller = self
            .auth(hdr, actions::TENANT_ENGINE_DEPLOY, "Remove", &name)
            .await?;
        if !confirm {
            return Err(Error::ConfirmationRequired(format!(
                "removing engine {} deletes its root and its data dirs on the volume; confirm to go ahead",
                leasehold_node::shown(&name)
            )));
        }
        match self
            .0
            .submit(
                caller,
                SystemTime::now(),
                Command::Engine(EngineCommand::Rm { name }),
            )
            .await?
        {
            Outcome::EngineRemoved => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn control(
        &self,
        hdr: &Header<'_>,
        method: &str,
        command: EngineCommand,
    ) -> Result<EngineInfo, Error> {
        let caller = self
            .auth(
                hdr,
                actions::TENANT_ENGINE_CONTROL,
                method,
                command.engine(),
            )
            .await?;
        self.command(caller, command).await
    }
}

fn upload_error(e: crate::upload::UploadError) -> Error {
    use crate::upload::UploadError as U;
    let msg = e.to_string();
    match e {
        U::Invalid { .. } | U::Inbox { .. } => Error::InvalidArgument(msg),
        U::NotFound(_) => Error::NotFound(msg),
        U::Busy(_) => Error::Busy(msg),
        U::NoVolume => Error::Unavailable(msg),
        U::NoSpace { .. } => Error::Failed(msg),
        U::Io { op, ref source, .. } => {
            // Not the path: it ends in the tenant's file name (the caller
            // gets the whole message). What the tenant can cause in its
            // inbox (a file removed, a directory put in the way) at debug:
            // in a loop it would flood the journal (review); the device's
            // own errors (EIO, EROFS, …) at warn.
            use rustix::io::Errno;
            let tenants = [
                Errno::NOENT,
                Errno::ISDIR,
                Errno::NOTDIR,
                Errno::EXIST,
                Errno::STALE,
                Errno::ACCESS,
                Errno::PERM,
                Errno::NOTEMPTY,
                Errno::INVAL,
            ];
            if source
                .raw_os_error()
                .is_some_and(|n| tenants.iter().any(|e| e.raw_os_error() == n))
            {
                tracing::debug!(op, error = %source, "image upload failed");
            } else {
                tracing::warn!(op, error = %source, "image upload failed");
            }
            Error::Failed(msg)
        }
    }
}

impl TenantEnginesApi {
    /// Authorizes an upload call (the deploy action: an upload only
    /// prepares a deploy) and runs it off the async workers.
    async fn upload<T: Send + 'static>(
        &self,
        hdr: &Header<'_>,
        method: &str,
        f: impl FnOnce(&crate::upload::Uploads, u32) -> Result<T, crate::upload::UploadError>
            + Send
            + 'static,
    ) -> Result<T, Error> {
        let caller = self
            .auth(hdr, actions::TENANT_ENGINE_DEPLOY, method, "")
            .await?;
        self.0.require_tenant()?;
        let uploads = self.0.uploads.clone();
        blocking(move || f(&uploads, caller.uid).map_err(upload_error)).await
    }
}

#[interface(name = "org.leasehold.TenantEngines1")]
impl TenantEnginesApi {
    async fn begin_upload(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        size: u64,
        sha256: String,
    ) -> Result<String, Error> {
        self.upload(&hdr, "BeginUpload", move |u, uid| {
            u.begin(uid, &name, size, &sha256)
        })
        .await
    }

    async fn upload_chunk(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        upload_id: String,
        offset: u64,
        // One block, not byte by byte: chunks are up to 4 MiB.
        data: serde_bytes::ByteBuf,
    ) -> Result<u64, Error> {
        self.upload(&hdr, "UploadChunk", move |u, uid| {
            u.chunk(uid, &upload_id, offset, &data)
        })
        .await
    }

    async fn commit_upload(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        upload_id: String,
    ) -> Result<String, Error> {
        self.upload(&hdr, "CommitUpload", move |u, uid| {
            u.commit(uid, &upload_id)
        })
        .await
    }

    async fn abort_upload(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        upload_id: String,
    ) -> Result<(), Error> {
        self.upload(&hdr, "AbortUpload", move |u, uid| u.abort(uid, &upload_id))
            .await
    }

    async fn deploy(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        image: String,
        spec: String,
    ) -> Result<EngineInfo, Error> {
        self.deploy_method(&hdr, name, image, spec).await
    }

    async fn start(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<EngineInfo, Error> {
        self.control(&hdr, "Start", EngineCommand::Start { name })
            .await
    }

    async fn stop(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<EngineInfo, Error> {
        self.control(&hdr, "Stop", EngineCommand::Stop { name, grace: None })
            .await
    }

    async fn restart(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<EngineInfo, Error> {
        self.control(&hdr, "Restart", EngineCommand::Restart { name })
            .await
    }

    async fn reload(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        image: String,
        spec: String,
    ) -> Result<EngineInfo, Error> {
        self.reload_method(&hdr, name, image, spec).await
    }

    async fn remove(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        confirm: bool,
    ) -> Result<(), Error> {
        self.remove_method(&hdr, name, confirm).await
    }

    async fn list_action_records(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<ReceiptInfo>, Error> {
        self.auth(&hdr, actions::TENANT_ENGINE_READ, "ListActionRecords", "")
            .await?;
        self.0.require_tenant()?;
        // The tenant of now: records made for an earlier tenant (or with
        // no tenant) are never shown.
        let Some(key) = self
            .0
            .node
            .snapshot()
            .status
            .tenant
            .as_ref()
            .map(|t| t.fingerprint.clone())
        else {
            return Ok(Vec::new());
        };
        let store = self.0.action_records.clone();
        blocking(move || {
            store
                .list_for(&key)
                .map(|v| {
                    v.into_iter()
                        .map(|r| ReceiptInfo {
                            id: Some(r.id),
                            time: Some(r.time),
                            change: Some("health-action".into()),
                            role: Some(r.action),
                            signer: Some(r.signer),
                            receipt: Some(r.body),
                            receipt_signature: Some(r.signature),
                        })
                        .collect()
                })
                .map_err(|e| Error::Failed(e.to_string()))
        })
        .await
    }

    async fn list(&self, #[zbus(header)] hdr: Header<'_>) -> Result<Vec<EngineInfo>, Error> {
        self.auth(&hdr, actions::TENANT_ENGINE_READ, "List", "")
            .await?;
        self.0.require_tenant()?;
        Ok(self
            .0
            .node
            .engines()
            .into_iter()
            .map(|s| engine_info(s, None))
            .collect())
    }

    async fn status(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<EngineInfo, Error> {
        self.auth(&hdr, actions::TENANT_ENGINE_READ, "Status", &name)
            .await?;
        self.0.require_tenant()?;
        Ok(engine_info(
            self.0.node.engine(&name).map_err(node_error)?,
            None,
        ))
    }

    /// One engine's output: the last `max_lines` (1-10000) lines stamped
    /// at or after `since_unix_ms`, oldest first, as (unix ms, stream
    /// "out"/"err"/"agent", text, partial).
    async fn logs(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        since_unix_ms: u64,
        max_lines: u32,
    ) -> Result<Vec<(u64, String, String, bool)>, Error> {
        self.auth(&hdr, actions::TENANT_ENGINE_READ, "Logs", &name)
            .await?;
        self.0.require_tenant()?;
        let max = usize::try_from(max_lines).unwrap_or(usize::MAX);
        if !(1..=leasehold_engines::logs::MAX_READ_LINES).contains(&max) {
            return Err(Error::InvalidArgument(format!(
                "max_lines: {max_lines} is outside 1..={}",
                leasehold_engines::logs::MAX_READ_LINES
            )));
        }
        // At most two reads at a time, node-wide: each streams up to two
        // files of half the log budget (512 MiB each at the largest) and
        // holds up to 8 MiB of lines; 16 calls in flight per uid, and
        // followers polling, would otherwise multiply both.
        let _permit = LOG_READS
            .acquire()
            .await
            .map_err(|_| Error::Failed("log reads are closed".into()))?;
        let node = self.0.node.clone();
        blocking(move || {
            node.engine_logs(&name, since_unix_ms, max)
                .map(log_lines)
                .map_err(node_error)
        })
        .await
    }

    /// The engines' events numbered above `after_seq`, oldest first, at
    /// most `max` (1-1000), as (seq, unix ms, engine, kind, detail).
    async fn events(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        after_seq: u64,
        max: u32,
    ) -> Result<Vec<(u64, u64, String, String, String)>, Error> {
        self.auth(&hdr, actions::TENANT_ENGINE_READ, "Events", "")
            .await?;
        self.0.require_tenant()?;
        let n = usize::try_from(max).unwrap_or(usize::MAX);
        if !(1..=leasehold_node::MAX_EVENTS_READ).contains(&n) {
            return Err(Error::InvalidArgument(format!(
                "max: {max} is outside 1..={}",
                leasehold_node::MAX_EVENTS_READ
            )));
        }
        Ok(self
            .0
            .node
            .engine_events(after_seq, n)
            .into_iter()
            .map(|e| (e.seq, e.time_ms, e.engine, e.kind, e.detail))
            .collect())
    }

    #[zbus(property)]
    fn version(&self) -> u32 {
        API_VERSION
    }
}

/// `org.leasehold.Health1`: the landlord's health report.
pub struct HealthApi(pub Arc<Ctx>);

impl HealthApi {
    async fn report_method(&self, hdr: &Header<'_>) -> Result<String, Error> {
        self.0
            .authorize(hdr, Role::Landlord, actions::LANDLORD_HEALTH, "Report", &[])
            .await?;
        let monitor = self.0.health.clone();
        // Blocks for at most the longest source deadline. A call that
        // arrives while a report is being taken gets that one.
        let asked = std::time::Instant::now();
        let report = blocking(move || Ok(monitor.report_asked_at(asked))).await?;
        serde_json::to_string(&report).map_err(|e| Error::Failed(format!("health report: {e}")))
    }
}

#[interface(name = "org.leasehold.Health1")]
impl HealthApi {
    async fn report(&self, #[zbus(header)] hdr: Header<'_>) -> Result<String, Error> {
        self.report_method(&hdr).await
    }

    #[zbus(property)]
    fn version(&self) -> u32 {
        HEALTH_API_VERSION
    }

    /// Declared for introspection; emitted by the periodic collection
    /// (`collect::run`), which has no interface reference of its own.
    #[zbus(signal)]
    async fn faults_changed(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        severity: &str,
        faults: &str,
    ) -> zbus::Result<()>;
}

/// `org.leasehold.Attest1`: TPM quotes for both roles (R13 challenges).
/// The caller's role picks the polkit action (landlord or tenant attest).
pub struct AttestApi(pub Arc<Ctx>);

/// Where the kernel names this boot; a quote binds it.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The role's attest action, after its authorization.
impl AttestApi {
    async fn authorize(&self, hdr: &Header<'_>, method: &str) -> Result<Caller, Error> {
        let role = self.0.auth.role_of(hdr).await?;
        let action = match role {
            Role::Landlord => actions::LANDLORD_ATTEST,
            Role::Tenant => actions::TENANT_ATTEST,
        };
        self.0.authorize(hdr, role, action, method, &[]).await
    }

    async fn attest_method(
        &self,
        hdr: &Header<'_>,
        nonce: Vec<u8>,
        pcrs: Vec<u32>,
    ) -> Result<AttestReply, Error> {
        let caller = self.authorize(hdr, "Attest").await?;
        // Bounds before any TPM work (the key thread checks them again).
        leasehold_tpm::attest::check_request(&nonce, &pcrs)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let boot_id = std::fs::read_to_string(BOOT_ID)
            .map_err(|e| Error::Unavailable(format!("{BOOT_ID}: {e}")))?;
        let boot_id = boot_id.trim().to_owned();
        let q = self
            .0
            .keys
            .call(move |k| k.quote(&nonce, &pcrs, &boot_id))
            .await
            .map_err(|e| key_error(e.into()))?
            .map_err(key_error)?;
        // Debug only: any tenant may ask, and log lines it can trigger are
        // rate-limited or left out (STYLE.md).
        tracing::debug!(role = %caller.role, uid = caller.uid, "quote given");
        Ok((q.attest, q.signature, q.pcr_values, q.context))
    }

    async fn attestation_key_method(&self, hdr: &Header<'_>) -> Result<String, Error> {
        self.authorize(hdr, "AttestationKey").await?;
        self.0
            .keys
            .call(|k| k.attestation_key())
            .await
            .map_err(|e| key_error(e.into()))?
            .map(|k| k.pem)
            .map_err(key_error)
    }
}

/// Attest's reply: (TPMS_ATTEST, signature, PCR values, context).
type AttestReply = (Vec<u8>, Vec<u8>, Vec<(u32, Vec<u8>)>, String);

#[interface(name = "org.leasehold.Attest1")]
impl AttestApi {
    async fn attest(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        nonce: Vec<u8>,
        pcrs: Vec<u32>,
    ) -> Result<AttestReply, Error> {
        self.attest_method(&hdr, nonce, pcrs).await
    }

    async fn attestation_key(&self, #[zbus(header)] hdr: Header<'_>) -> Result<String, Error> {
        self.attestation_key_method(&hdr).await
    }

    #[zbus(property)]
    fn version(&self) -> u32 {
        ATTEST_API_VERSION
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(kind: &str, role: Role) -> KeyChange {
        KeyChange {
            kind: Some(kind.into()),
            role: Some(role.to_string()),
            receipt: Some(r#"{"engines":{"stopped":["db"]}}"#.into()),
            receipt_signature: Some("sig".into()),
            warnings: Some(vec!["engines not shown stopped: db".into()]),
            ..KeyChange::default()
        }
    }

    /// Each role's copy of `KeysChanged` carries only the receipts its
    /// `ListReceipts` shows it (receipts.rs `list`).
    #[test]
    fn each_roles_key_change_signal_carries_only_its_own_receipts() {
        let (l, t) = (
            leasehold_dbus_api::LANDLORD_INTERFACE,
            leasehold_dbus_api::TENANT_INTERFACE,
        );
        // (kind, role) → receipt in the landlord's copy, in the tenant's
        // (None: no tenant copy).
        for (kind, role, landlord_sees, tenant_sees) in [
            ("rotate", Role::Tenant, false, Some(true)),
            ("rekey", Role::Tenant, false, Some(true)),
            ("assign", Role::Tenant, true, Some(false)),
            ("release", Role::Tenant, true, Some(false)),
            ("rotate", Role::Landlord, true, None),
        ] {
            let copies = signal_copies(change(kind, role), role);
            let of = |iface: &str| copies.iter().find(|(i, _)| *i == iface).map(|(_, c)| c);
            let ll = of(l).expect("the landlord always gets it");
            assert_eq!(ll.receipt.is_some(), landlord_sees, "{kind} {role}");
            assert_eq!(ll.receipt_signature.is_some(), landlord_sees);
            assert_eq!(ll.warnings.is_some(), landlord_sees, "{kind} {role}");
            assert_eq!(ll.kind.as_deref(), Some(kind), "the change itself is shown");
            assert_eq!(
                of(t).map(|c| c.receipt.is_some()),
                tenant_sees,
                "{kind} {role}"
            );
            // A warning may name the engines the receipt names.
            assert_eq!(
                of(t).map(|c| c.warnings.is_some()),
                tenant_sees,
                "{kind} {role}"
            );
        }
    }
}
