//! The D-Bus interfaces. Handlers are thin: authorize in one place, run the
//! operation on the key thread, convert the result. Errors are mapped to
//! `org.leasehold.Error.*` only here.

use std::sync::Arc;

use leasehold_dbus_api::{
    actions, BoundaryInfo, Error, FlowVerdict, KeyChange, NodeInfo, PublicKey, SecretInfo,
    VolumeInfo, API_VERSION, OBJECT_PATH,
};
use leasehold_tpm::{Confirm, KeyError, Role};
use zbus::message::Header;
use zbus::{interface, Connection};

use crate::auth::Authorizer;
use crate::boundary::{parse_flow, Boundaries, BoundaryError};
use crate::keys::{Keys, KeysGone};
use crate::power::{self, PowerAction};
use crate::secrets::{SecretError, SecretStore};
use crate::volume::{DiskKeyInfo, Volume, VolumeError};
use leasehold_netpolicy::policy::parse_doc;

/// State shared by both interfaces.
#[derive(Debug)]
pub struct Ctx {
    pub keys: Arc<Keys>,
    pub auth: Authorizer,
    pub secrets: SecretStore,
    pub boundaries: Arc<crate::boundary::Boundaries>,
    pub volume: Arc<Volume>,
    pub state_dir: std::path::PathBuf,
}

/// Key generation of each link of the disk-key chain, widest first.
fn generations(st: &leasehold_tpm::Status) -> Vec<(String, u64)> {
    let mut g = vec![(Role::Landlord.to_string(), st.landlord.key_generation)];
    if let Some(t) = &st.tenant {
        g.push((Role::Tenant.to_string(), t.key_generation));
    }
    g
}

/// The disk key and what it was made from, from the key thread.
pub async fn disk_key_info(keys: &Keys) -> Result<DiskKeyInfo, ApiError> {
    let r = keys
        .call(|k| {
            let st = k.status();
            k.disk_key().map(|d| DiskKeyInfo {
                node_id: st.node_id.clone(),
                key: zeroize::Zeroizing::new(d.expose_secret().to_vec()),
                generations: generations(&st),
            })
        })
        .await??;
    Ok(r)
}

impl From<VolumeError> for ApiError {
    fn from(e: VolumeError) -> Self {
        let msg = e.to_string();
        ApiError(match e {
            VolumeError::Invalid(_) => Error::InvalidArgument(msg),
            VolumeError::Storage(
                leasehold_storage::StorageError::NotABlockDevice { .. }
                | leasehold_storage::StorageError::Mounted { .. }
                | leasehold_storage::StorageError::InUse { .. }
                | leasehold_storage::StorageError::RootDisk { .. }
                | leasehold_storage::StorageError::Signature { .. }
                | leasehold_storage::StorageError::WrongKey(_),
            ) => Error::InvalidArgument(format!("device: {msg}")),
            other => {
                tracing::error!(error = %other, "volume operation failed");
                Error::Failed(msg)
            }
        })
    }
}

/// The signed statement of what a key change destroyed (docs/storage.md).
#[derive(Debug, serde::Serialize)]
struct Receipt {
    format: u32,
    node_id: String,
    change: String,
    role: String,
    time: u64,
    destroyed: Vec<String>,
    key_generations_before: Vec<(String, u64)>,
    key_generations_after: Vec<(String, u64)>,
    volume: Option<crate::volume::Remade>,
    volume_error: Option<String>,
    /// Milliseconds from the request to the moment the old data was
    /// unrecoverable: the volume closed (the kernel's copy of the disk key
    /// wiped) and the TPM secret of the old key generation undefined.
    #[serde(skip_serializing_if = "Option::is_none")]
    erased_ms: Option<u64>,
    signer: String,
}

impl From<KeysGone> for ApiError {
    fn from(e: KeysGone) -> Self {
        ApiError(Error::Unavailable(e.to_string()))
    }
}

/// Local wrapper so conversions live in this module.
pub struct ApiError(pub Error);

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Self {
        e.0
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        let msg = e.to_string();
        ApiError(match e {
            KeyError::NotPermitted { .. } => Error::NotAuthorized(msg),
            KeyError::ConfirmationRequired { .. } => Error::ConfirmationRequired(msg),
            KeyError::NotAssigned => Error::NotAssigned(msg),
            KeyError::Envelope(_)
            | KeyError::InvalidName { .. }
            | KeyError::InvalidConsoleKey { .. } => Error::InvalidArgument(msg),
            KeyError::UnknownConsole { .. } => Error::NotFound(msg),
            KeyError::Connect { .. } => Error::Unavailable(msg),
            other => {
                tracing::error!(error = %other, "key operation failed");
                Error::Failed(msg)
            }
        })
    }
}

impl From<SecretError> for ApiError {
    fn from(e: SecretError) -> Self {
        ApiError(match e {
            SecretError::NotFound(_) => Error::NotFound(e.to_string()),
            other => {
                tracing::error!(error = %other, "secret store failed");
                Error::Failed(other.to_string())
            }
        })
    }
}

impl From<BoundaryError> for ApiError {
    fn from(e: BoundaryError) -> Self {
        let msg = e.to_string();
        ApiError(match e {
            BoundaryError::Invalid(_) => Error::InvalidArgument(msg),
            BoundaryError::Nft(leasehold_netpolicy::nft::ApplyError::Spawn(_)) => {
                Error::Unavailable(msg)
            }
            other => {
                tracing::error!(error = %other, "boundary operation failed");
                Error::Failed(msg)
            }
        })
    }
}

fn to_confirm(b: bool) -> Confirm {
    if b {
        Confirm::DestroyData
    } else {
        Confirm::No
    }
}

fn change_dict(c: &leasehold_tpm::KeyChange) -> KeyChange {
    KeyChange {
        kind: Some(
            match c.kind {
                leasehold_tpm::ChangeKind::Rotate => "rotate",
                leasehold_tpm::ChangeKind::Rekey => "rekey",
                leasehold_tpm::ChangeKind::Assign => "assign",
                leasehold_tpm::ChangeKind::Release => "release",
            }
            .to_owned(),
        ),
        role: Some(c.role.to_string()),
        generation_before: c.generation_before,
        generation_after: c.generation_after,
        data_destroyed: Some(c.data_destroyed),
        fingerprint: c.fingerprint_after.clone(),
        ..Default::default()
    }
}

fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if leasehold_tpm::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError(Error::InvalidArgument(format!(
            "{what} {name:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with . or -)"
        ))))
    }
}

async fn emit(conn: &Connection, change: &KeyChange) {
    // Landlords see every change; tenants see changes of tenant keys.
    let mut ifaces = vec![leasehold_dbus_api::LANDLORD_INTERFACE];
    if change.role.as_deref() == Some("tenant") {
        ifaces.push(leasehold_dbus_api::TENANT_INTERFACE);
    }
    for iface in ifaces {
        if let Err(e) = conn
            .emit_signal(None::<&str>, OBJECT_PATH, iface, "KeysChanged", &(change,))
            .await
        {
            tracing::warn!(error = %e, "cannot emit KeysChanged");
        }
    }
}

impl Ctx {
    /// Runs a boundary operation off the async threads (it runs nft).
    async fn boundary<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Boundaries) -> Result<T, BoundaryError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let b = self.boundaries.clone();
        tokio::task::spawn_blocking(move || f(&b))
            .await
            .map_err(|e| ApiError(Error::Failed(format!("boundary task: {e}"))))?
            .map_err(ApiError::from)
    }

    /// Refuses tenant calls while the node has no tenant.
    async fn require_tenant(&self) -> Result<(), ApiError> {
        let st = self.keys.call(|k| k.status()).await?;
        if st.tenant.is_none() {
            return Err(ApiError(Error::NotAssigned(
                "the node is not assigned to a tenant".into(),
            )));
        }
        Ok(())
    }

    /// After an assignment or a release the sub-boundary belonged to the
    /// previous tenant.
    async fn tenant_changed(&self) {
        if let Err(e) = self.boundary(|b| b.clear_sub()).await {
            tracing::error!(error = %e.0.message(), "cannot clear the previous tenant's sub-boundary");
        }
    }

    async fn boundary_info(
        &self,
        landlord: bool,
        warnings: Vec<String>,
        cut: Option<Vec<String>>,
        peers_changed: Option<u32>,
    ) -> Result<BoundaryInfo, ApiError> {
        let mut info = self.boundary(move |b| Ok(b.info(landlord))).await?;
        info.warnings = Some(warnings);
        info.cut = cut;
        info.peers_changed = peers_changed;
        Ok(info)
    }

    async fn explain(
        &self,
        direction: String,
        peer: String,
        proto: String,
        port: u16,
        landlord: bool,
    ) -> Result<FlowVerdict, ApiError> {
        let flow = parse_flow(&direction, &peer, &proto, port).map_err(BoundaryError::from)?;
        self.boundary(move |b| b.explain(&flow, landlord)).await
    }

    /// The one place calls are authorized: polkit with the method name and
    /// call-specific details.
    async fn authorize(
        &self,
        hdr: &Header<'_>,
        action: &str,
        method: &str,
        extra: &[(&str, &str)],
        allow_root: bool,
    ) -> Result<u32, Error> {
        let mut details = vec![("method", method)];
        details.extend_from_slice(extra);
        // The in-flight permit stays with the call until it is answered.
        self.auth
            .check(hdr, action, &details, allow_root)
            .await?
            .hold()
    }

    async fn register_console(
        &self,
        role: Role,
        name: String,
        pem: String,
    ) -> Result<String, ApiError> {
        self.keys
            .call(move |k| k.register_console(role, &name, &pem))
            .await?
            .map_err(ApiError::from)
    }

    async fn node_info(&self, role: Role) -> Result<NodeInfo, ApiError> {
        let st = self.keys.call(|k| k.status()).await?;
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
        if let Some(t) = &st.tenant {
            info.tenant_name.clone_from(&t.name);
            info.tenant_generation = Some(t.generation);
            info.tenant_key_generation = Some(t.key_generation);
            info.tenant_fingerprint = Some(t.fingerprint.clone());
        }
        Ok(info)
    }

    async fn public_key(&self, caller: Role, role: Role) -> Result<PublicKey, ApiError> {
        let pk = self
            .keys
            .call(move |k| k.public_key_as(caller, role))
            .await??;
        Ok(PublicKey {
            role: Some(role.to_string()),
            generation: Some(pk.generation),
            pem: Some(pk.pem),
            fingerprint: Some(pk.fingerprint),
        })
    }

    /// Runs a key change, purges tenant secrets if it destroyed data, logs
    /// and signals it.
    async fn change(
        &self,
        conn: &Connection,
        caller_uid: u32,
        f: impl FnOnce(&mut leasehold_tpm::KeyHierarchy) -> Result<leasehold_tpm::KeyChange, KeyError>
            + Send
            + 'static,
    ) -> Result<KeyChange, ApiError> {
        self.volume_key_change(true).await?;
        let r = self
            .keys
            .call(move |k| {
                let before = generations(&k.status());
                (before, f(k))
            })
            .await;
        let (before, c) = match r {
            Ok((before, Ok(c))) => (before, c),
            Ok((_, Err(e))) => {
                self.volume_key_change(false).await?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        self.changed(conn, caller_uid, &c, before, None).await
    }

    /// A destroying rotation of `role`'s keys, erase first: the volume is
    /// closed (dm-crypt's copy of the disk key wiped) before the TPM
    /// undefines the old generation's secret, which it does before it
    /// generates the new pair; so the old data is unrecoverable within the
    /// time of a few TPM commands, whatever key generation costs.
    async fn rotate(
        &self,
        conn: &Connection,
        caller_uid: u32,
        role: Role,
        confirm: bool,
        requested: std::time::SystemTime,
    ) -> Result<KeyChange, ApiError> {
        if !confirm {
            // Refused before the volume is touched.
            return Err(KeyError::ConfirmationRequired {
                action: "rotating a key pair with its symmetric key",
            }
            .into());
        }
        if role == Role::Tenant && self.keys.call(|k| k.status().tenant.is_none()).await? {
            return Err(KeyError::NotAssigned.into());
        }
        let v = self.volume.clone();
        let wiped = tokio::task::spawn_blocking(move || {
            v.begin_key_change()?;
            v.wipe()
        })
        .await
        .map_err(|e| ApiError(Error::Failed(format!("volume task: {e}"))))?;
        match wiped {
            Ok(()) => {}
            Err(e) => {
                self.reopen_volume().await;
                return Err(e.into());
            }
        };
        let r = self
            .keys
            .call(move |k| {
                let before = generations(&k.status());
                (before, k.rotate(role, role, Confirm::DestroyData))
            })
            .await;
        let (before, c) = match r {
            Ok((before, Ok(c))) => (before, c),
            Ok((_, Err(e))) => {
                self.reopen_volume().await;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        self.changed(conn, caller_uid, &c, before, Some(requested))
            .await
    }

    /// After a rotation failed: the volume opens again under the disk key
    /// if it is still the old one. If the old key was already erased, it
    /// stays closed and marked `rekeying`: the next start finishes the
    /// rotation and makes it new.
    async fn reopen_volume(&self) {
        let k = match disk_key_info(&self.keys).await {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e.0, "the volume stays closed after a failed key change");
                return;
            }
        };
        let v = self.volume.clone();
        let r = tokio::task::spawn_blocking(move || v.reopen(&k)).await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the volume stays closed after a failed key change")
            }
            Err(e) => tracing::error!(error = %e, "volume task"),
        }
    }

    /// Marks the volume before a key change that may replace the disk key
    /// (`begin`), or back to ready after one that did not.
    async fn volume_key_change(&self, begin: bool) -> Result<(), ApiError> {
        let v = self.volume.clone();
        tokio::task::spawn_blocking(move || {
            if begin {
                v.begin_key_change()
            } else {
                v.end_key_change()
            }
        })
        .await
        .map_err(|e| ApiError(Error::Failed(format!("volume task: {e}"))))?
        .map_err(ApiError::from)
    }

    /// After a key change: purges tenant secrets if it destroyed data,
    /// remakes the volume if the disk key changed, signs an erase receipt,
    /// logs and signals it.
    async fn changed(
        &self,
        conn: &Connection,
        caller_uid: u32,
        c: &leasehold_tpm::KeyChange,
        before: Vec<(String, u64)>,
        requested: Option<std::time::SystemTime>,
    ) -> Result<KeyChange, ApiError> {
        if c.data_destroyed {
            let n = self.secrets.purge()?;
            if n > 0 {
                tracing::info!(
                    count = n,
                    "purged tenant secrets after a destroying key change"
                );
            }
        }
        tracing::info!(uid = caller_uid, change = %c, "key change");
        let mut d = change_dict(c);
        let disk_key_changed = c.data_destroyed
            || matches!(
                c.kind,
                leasehold_tpm::ChangeKind::Assign | leasehold_tpm::ChangeKind::Release
            );
        if disk_key_changed {
            let (receipt, sig) = self.erase_receipt(c, before, requested).await?;
            d.receipt = Some(receipt);
            d.receipt_signature = Some(sig);
        } else {
            self.volume_key_change(false).await?;
        }
        emit(conn, &d).await;
        Ok(d)
    }

    /// Remakes the volume under the new disk key and signs what was
    /// destroyed. The receipt is also kept in the state dir (receipts/).
    async fn erase_receipt(
        &self,
        c: &leasehold_tpm::KeyChange,
        before: Vec<(String, u64)>,
        requested: Option<std::time::SystemTime>,
    ) -> Result<(String, String), ApiError> {
        // The erase is complete when both the TPM secret and the kernel's
        // copy of the key are gone; a rotation closed the volume first.
        let erased_ms = requested.map(|r| {
            let at = c.erased_at.unwrap_or_else(std::time::SystemTime::now);
            at.duration_since(r)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        });
        if let Some(ms) = erased_ms {
            tracing::info!(
                millis = ms,
                "old data unrecoverable (volume closed, TPM secret undefined)"
            );
        }
        let k = disk_key_info(&self.keys).await?;
        let after = k.generations.clone();
        let node_id = k.node_id.clone();
        let kind = change_dict(c).kind.unwrap_or_default();
        let reason = format!("{kind} of {} keys", c.role);
        let v = self.volume.clone();
        let remade = tokio::task::spawn_blocking(move || v.remake(&k, &reason))
            .await
            .map_err(|e| ApiError(Error::Failed(format!("volume task: {e}"))))?;
        let (volume, volume_error) = match remade {
            Ok(r) => (r, None),
            Err(e) => {
                tracing::error!(error = %e, "the volume was not remade after the key change");
                (None, Some(e.to_string()))
            }
        };
        let mut destroyed = Vec::new();
        let gens = |g: &[(String, u64)]| leasehold_storage::meta::generations_text(g);
        if let Some(g) = c.key_generation_before.filter(|_| c.data_destroyed) {
            destroyed.push(format!(
                "{} key of key generation {g}: its TPM sealed object and the generation secret it depends on (NV index undefined)",
                c.role
            ));
        }
        destroyed.push(format!(
            "disk key made from key generations {}",
            gens(&before)
        ));
        if let Some(r) = &volume {
            destroyed.push(format!(
                "volume {} on {}: mapping wiped, new empty filesystem under the new disk key",
                r.id, r.device
            ));
        }
        if c.data_destroyed {
            destroyed.push("the tenant's secret store".into());
        }
        let signer = self
            .keys
            .call(|k| k.signing_key().map(|s| s.fingerprint))
            .await??;
        let receipt = Receipt {
            format: 1,
            node_id,
            change: kind,
            role: c.role.to_string(),
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            destroyed,
            key_generations_before: before,
            key_generations_after: after,
            volume,
            volume_error,
            erased_ms,
            signer,
        };
        let body = serde_json::to_string(&receipt)
            .map_err(|e| ApiError(Error::Failed(format!("receipt: {e}"))))?;
        let bytes = body.clone().into_bytes();
        let sig = self.keys.call(move |k| k.sign(&bytes)).await??;
        use base64::Engine as _;
        let sig = base64::engine::general_purpose::STANDARD.encode(sig);
        let dir = self.state_dir.join("receipts");
        let stored = serde_json::json!({ "receipt": body, "signature": sig }).to_string();
        let name = format!("{}-{}-{}.json", receipt.time, receipt.change, receipt.role);
        if let Err(e) = std::fs::create_dir_all(&dir)
            .and_then(|()| crate::fsutil::write_atomic(&dir, &name, stored.as_bytes()))
        {
            tracing::error!(error = %e, "cannot store the erase receipt");
        }
        tracing::info!(receipt = %body, "erase receipt");
        Ok((body, sig))
    }

    async fn volume_info(&self) -> Result<VolumeInfo, ApiError> {
        let v = self.volume.clone();
        let (m, rt, usage) = tokio::task::spawn_blocking(move || v.status())
            .await
            .map_err(|e| ApiError(Error::Failed(format!("volume task: {e}"))))??;
        let Some(m) = m else {
            return Ok(VolumeInfo {
                state: Some("none".into()),
                ..Default::default()
            });
        };
        let state = if rt.open {
            "open"
        } else if rt.error.is_some() {
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
            event: rt.event,
            error: rt.error,
        })
    }

    async fn receipt_key(&self) -> Result<PublicKey, ApiError> {
        let k = self.keys.call(|k| k.signing_key()).await??;
        Ok(PublicKey {
            role: Some("node".into()),
            generation: None,
            pem: Some(k.pem),
            fingerprint: Some(k.fingerprint),
        })
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
    ) -> Result<u32, Error> {
        self.0.authorize(hdr, action, method, extra, true).await
    }

    async fn edit_peers(
        &self,
        hdr: Header<'_>,
        target: String,
        peers: Vec<String>,
        add: bool,
    ) -> Result<BoundaryInfo, Error> {
        let method = if add { "AddPeers" } else { "RemovePeers" };
        let uid = self
            .auth(
                &hdr,
                actions::LANDLORD_BOUNDARY,
                method,
                &[("target", &target)],
            )
            .await?;
        let (n, warnings) = self
            .0
            .boundary(move |b| {
                b.update(|p| {
                    if add {
                        p.add_peers(&target, &peers)
                    } else {
                        p.remove_peers(&target, &peers)
                    }
                })
            })
            .await?;
        tracing::info!(uid, method, peers = n, "cluster boundary peers changed");
        Ok(self
            .0
            .boundary_info(
                true,
                warnings,
                None,
                Some(u32::try_from(n).unwrap_or(u32::MAX)),
            )
            .await?)
    }
}

#[interface(name = "org.leasehold.Landlord1")]
impl LandlordApi {
    async fn node_info(&self, #[zbus(header)] hdr: Header<'_>) -> Result<NodeInfo, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "NodeInfo", &[])
            .await?;
        Ok(self.0.node_info(Role::Landlord).await?)
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
            &[("role", &role)],
        )
        .await?;
        let role: Role = role
            .parse()
            .map_err(|e: String| Error::InvalidArgument(format!("role: {e}")))?;
        Ok(self.0.public_key(Role::Landlord, role).await?)
    }

    async fn assign_tenant(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        console_key: String,
        confirm: bool,
    ) -> Result<KeyChange, Error> {
        let uid = self
            .auth(
                &hdr,
                actions::LANDLORD_ASSIGN,
                "AssignTenant",
                &[("tenant", &name)],
            )
            .await?;
        check_name("name", &name)?;
        if !console_key.is_empty() {
            // Validate before anything changes: no partial state.
            leasehold_tpm::envelope::RecipientKey::from_pem(&console_key)
                .map_err(|e| Error::InvalidArgument(format!("console_key: {e}")))?;
        }
        let c = to_confirm(confirm);
        let change = self
            .0
            .change(conn, uid, move |k| {
                let change = k.assign_tenant(Role::Landlord, &name, c)?;
                if !console_key.is_empty() {
                    // The key was validated above; registration can only fail on I/O.
                    k.register_console(Role::Tenant, "initial", &console_key)?;
                }
                Ok(change)
            })
            .await?;
        self.0.tenant_changed().await;
        Ok(change)
    }

    async fn release_tenant(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        confirm: bool,
    ) -> Result<KeyChange, Error> {
        let uid = self
            .auth(&hdr, actions::LANDLORD_ASSIGN, "ReleaseTenant", &[])
            .await?;
        let c = to_confirm(confirm);
        self.0.volume_key_change(true).await?;
        let (before, r) = self
            .0
            .keys
            .call(move |k| {
                let before = generations(&k.status());
                (before, k.release_tenant(Role::Landlord, c))
            })
            .await
            .map_err(ApiError::from)?;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                self.0.volume_key_change(false).await?;
                return Err(ApiError::from(e).into());
            }
        };
        if r.is_none() {
            self.0.volume_key_change(false).await?;
        }
        match r {
            Some(change) => {
                self.0.secrets.purge().map_err(ApiError::from)?;
                self.0.tenant_changed().await;
                Ok(self.0.changed(conn, uid, &change, before, None).await?)
            }
            // Already released: an idempotent result, not an error.
            None => Ok(KeyChange {
                kind: Some("release".into()),
                role: Some("tenant".into()),
                data_destroyed: Some(false),
                ..Default::default()
            }),
        }
    }

    async fn rotate_keys(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        confirm: bool,
    ) -> Result<KeyChange, Error> {
        let requested = std::time::SystemTime::now();
        let uid = self
            .auth(&hdr, actions::LANDLORD_KEYS, "RotateKeys", &[])
            .await?;
        Ok(self
            .0
            .rotate(conn, uid, Role::Landlord, confirm, requested)
            .await?)
    }

    async fn rekey_keys(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<KeyChange, Error> {
        let uid = self
            .auth(&hdr, actions::LANDLORD_KEYS, "RekeyKeys", &[])
            .await?;
        Ok(self
            .0
            .change(conn, uid, |k| k.rekey(Role::Landlord, Role::Landlord))
            .await?)
    }

    async fn register_console_key(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        pem: String,
    ) -> Result<String, Error> {
        self.auth(
            &hdr,
            actions::LANDLORD_KEYS,
            "RegisterConsoleKey",
            &[("console", &name)],
        )
        .await?;
        Ok(self.0.register_console(Role::Landlord, name, pem).await?)
    }

    async fn reboot(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let uid = self
            .auth(&hdr, actions::LANDLORD_REBOOT, "Reboot", &[])
            .await?;
        tracing::warn!(uid, "reboot requested by the landlord");
        power::run(conn, PowerAction::Reboot).await
    }

    async fn power_off(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let uid = self
            .auth(&hdr, actions::LANDLORD_POWEROFF, "PowerOff", &[])
            .await?;
        tracing::warn!(uid, "power-off requested by the landlord");
        power::run(conn, PowerAction::PowerOff).await
    }

    async fn suspend(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let uid = self
            .auth(&hdr, actions::LANDLORD_SUSPEND, "Suspend", &[])
            .await?;
        tracing::warn!(uid, "suspend requested by the landlord");
        power::run(conn, PowerAction::Suspend).await
    }

    async fn set_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        document: String,
        format: String,
    ) -> Result<BoundaryInfo, Error> {
        let uid = self
            .auth(&hdr, actions::LANDLORD_BOUNDARY, "SetBoundary", &[])
            .await?;
        let doc =
            parse_doc(&document, &format).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let warnings = self
            .0
            .boundary(move |b| Ok(b.update(|p| p.set_cluster(doc))?.1))
            .await?;
        tracing::info!(uid, "cluster boundary set");
        Ok(self.0.boundary_info(true, warnings, None, None).await?)
    }

    async fn get_boundary(&self, #[zbus(header)] hdr: Header<'_>) -> Result<BoundaryInfo, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "GetBoundary", &[])
            .await?;
        Ok(self.0.boundary_info(true, Vec::new(), None, None).await?)
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
        let uid = self
            .auth(&hdr, actions::LANDLORD_BOUNDARY, "SetFailsafe", &[])
            .await?;
        let doc =
            parse_doc(&document, &format).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if !doc.allow.is_empty() || !doc.groups.is_empty() {
            return Err(Error::InvalidArgument(
                "document: a failsafe document has only [[failsafe]] entries".into(),
            ));
        }
        let warnings = self
            .0
            .boundary(move |b| Ok(b.update(|p| p.set_failsafe(doc.failsafe))?.1))
            .await?;
        tracing::info!(uid, "failsafe set");
        Ok(self.0.boundary_info(true, warnings, None, None).await?)
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
        Ok(self.0.explain(direction, peer, proto, port, true).await?)
    }

    async fn init_volume(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        device: String,
        force: bool,
        confirm: bool,
    ) -> Result<VolumeInfo, Error> {
        let uid = self
            .auth(
                &hdr,
                actions::LANDLORD_VOLUME,
                "InitVolume",
                &[("device", &device)],
            )
            .await?;
        if !confirm {
            return Err(Error::ConfirmationRequired(format!(
                "initializing the volume overwrites {device}: everything on it is lost"
            )));
        }
        let k = disk_key_info(&self.0.keys).await?;
        let v = self.0.volume.clone();
        let d = device.clone();
        tokio::task::spawn_blocking(move || v.init(&d, force, &k))
            .await
            .map_err(|e| Error::Failed(format!("volume task: {e}")))?
            .map_err(ApiError::from)?;
        tracing::info!(uid, device, force, "volume initialized");
        Ok(self.0.volume_info().await?)
    }

    async fn volume_status(&self, #[zbus(header)] hdr: Header<'_>) -> Result<VolumeInfo, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "VolumeStatus", &[])
            .await?;
        Ok(self.0.volume_info().await?)
    }

    async fn get_receipt_key(&self, #[zbus(header)] hdr: Header<'_>) -> Result<PublicKey, Error> {
        self.auth(&hdr, actions::LANDLORD_READ, "GetReceiptKey", &[])
            .await?;
        Ok(self.0.receipt_key().await?)
    }

    async fn remove_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        confirm: bool,
    ) -> Result<(), Error> {
        let uid = self
            .auth(&hdr, actions::LANDLORD_BOUNDARY, "RemoveBoundary", &[])
            .await?;
        if !confirm {
            return Err(Error::ConfirmationRequired(
                "removing the boundary lifts every network restriction on this node (cluster boundary, sub-boundary and failsafe)".into(),
            ));
        }
        self.0.boundary(|b| b.remove()).await?;
        tracing::warn!(uid, "boundary removed: the node is unfenced");
        Ok(())
    }

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
    ) -> Result<u32, Error> {
        self.0.authorize(hdr, action, method, extra, false).await
    }
}

#[interface(name = "org.leasehold.Tenant1")]
impl TenantApi {
    async fn node_info(&self, #[zbus(header)] hdr: Header<'_>) -> Result<NodeInfo, Error> {
        self.auth(&hdr, actions::TENANT_READ, "NodeInfo", &[])
            .await?;
        Ok(self.0.node_info(Role::Tenant).await?)
    }

    async fn get_public_key(&self, #[zbus(header)] hdr: Header<'_>) -> Result<PublicKey, Error> {
        self.auth(&hdr, actions::TENANT_READ, "GetPublicKey", &[])
            .await?;
        Ok(self.0.public_key(Role::Tenant, Role::Tenant).await?)
    }

    async fn volume_status(&self, #[zbus(header)] hdr: Header<'_>) -> Result<VolumeInfo, Error> {
        self.auth(&hdr, actions::TENANT_READ, "VolumeStatus", &[])
            .await?;
        self.0.require_tenant().await?;
        Ok(self.0.volume_info().await?)
    }

    async fn get_receipt_key(&self, #[zbus(header)] hdr: Header<'_>) -> Result<PublicKey, Error> {
        self.auth(&hdr, actions::TENANT_READ, "GetReceiptKey", &[])
            .await?;
        Ok(self.0.receipt_key().await?)
    }

    async fn rotate_keys(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        confirm: bool,
    ) -> Result<KeyChange, Error> {
        let requested = std::time::SystemTime::now();
        let uid = self
            .auth(&hdr, actions::TENANT_KEYS, "RotateKeys", &[])
            .await?;
        Ok(self
            .0
            .rotate(conn, uid, Role::Tenant, confirm, requested)
            .await?)
    }

    async fn rekey_keys(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<KeyChange, Error> {
        let uid = self
            .auth(&hdr, actions::TENANT_KEYS, "RekeyKeys", &[])
            .await?;
        Ok(self
            .0
            .change(conn, uid, |k| k.rekey(Role::Tenant, Role::Tenant))
            .await?)
    }

    async fn register_console_key(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        pem: String,
    ) -> Result<String, Error> {
        self.auth(
            &hdr,
            actions::TENANT_KEYS,
            "RegisterConsoleKey",
            &[("console", &name)],
        )
        .await?;
        Ok(self.0.register_console(Role::Tenant, name, pem).await?)
    }

    async fn put_secret(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
        envelope: Vec<u8>,
    ) -> Result<SecretInfo, Error> {
        let uid = self
            .auth(
                &hdr,
                actions::TENANT_SECRETS,
                "PutSecret",
                &[("secret", &name)],
            )
            .await?;
        check_name("name", &name)?;
        if envelope.len() > leasehold_dbus_api::MAX_ENVELOPE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "envelope: {} bytes; the limit is {} bytes",
                envelope.len(),
                leasehold_dbus_api::MAX_ENVELOPE_BYTES
            )));
        }
        let store = self.0.secrets.clone();
        let n = name.clone();
        let entry = self
            .0
            .keys
            .call(move |k| -> Result<_, ApiError> {
                let payload = k
                    .open_envelope(Role::Tenant, &envelope)
                    .map_err(|e| match e {
                        KeyError::Envelope(e) => {
                            ApiError(Error::InvalidArgument(format!("envelope: {e}")))
                        }
                        other => ApiError::from(other),
                    })?;
                let key = k.data_key(crate::secrets::PURPOSE)?;
                Ok(store.put(&key, &n, &payload)?)
            })
            .await
            .map_err(ApiError::from)??;
        tracing::info!(uid, secret = %name, size = entry.size, "tenant secret stored");
        Ok(SecretInfo {
            name: Some(entry.name),
            size: Some(entry.size),
            stored_at: Some(entry.stored_at),
        })
    }

    async fn list_secrets(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<SecretInfo>, Error> {
        self.auth(&hdr, actions::TENANT_SECRETS, "ListSecrets", &[])
            .await?;
        // Listing requires a tenant, like every tenant call.
        self.0
            .keys
            .call(|k| k.public_key(Role::Tenant))
            .await
            .map_err(ApiError::from)?
            .map_err(ApiError::from)?;
        let list = self.0.secrets.list().map_err(ApiError::from)?;
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
        let uid = self
            .auth(
                &hdr,
                actions::TENANT_SECRETS,
                "RemoveSecret",
                &[("secret", &name)],
            )
            .await?;
        check_name("name", &name)?;
        self.0.secrets.remove(&name).map_err(ApiError::from)?;
        tracing::info!(uid, secret = %name, "tenant secret removed");
        Ok(())
    }

    async fn set_sub_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        document: String,
        format: String,
        narrow: bool,
    ) -> Result<BoundaryInfo, Error> {
        let uid = self
            .auth(
                &hdr,
                actions::TENANT_BOUNDARY,
                "SetSubBoundary",
                &[("narrow", if narrow { "true" } else { "false" })],
            )
            .await?;
        self.0.require_tenant().await?;
        let doc =
            parse_doc(&document, &format).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let (cut, warnings) = self
            .0
            .boundary(move |b| b.update(|p| p.set_sub(doc, narrow)))
            .await?;
        let cut: Vec<String> = cut.cut.iter().map(ToString::to_string).collect();
        tracing::info!(uid, narrowed = cut.len(), "sub-boundary set");
        Ok(self
            .0
            .boundary_info(false, warnings, Some(cut), None)
            .await?)
    }

    async fn get_boundary(&self, #[zbus(header)] hdr: Header<'_>) -> Result<BoundaryInfo, Error> {
        self.auth(&hdr, actions::TENANT_READ, "GetBoundary", &[])
            .await?;
        Ok(self.0.boundary_info(false, Vec::new(), None, None).await?)
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
        Ok(self.0.explain(direction, peer, proto, port, false).await?)
    }

    async fn remove_sub_boundary(
        &self,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<BoundaryInfo, Error> {
        let uid = self
            .auth(&hdr, actions::TENANT_BOUNDARY, "RemoveSubBoundary", &[])
            .await?;
        self.0.require_tenant().await?;
        self.0.boundary(|b| b.clear_sub()).await?;
        tracing::info!(uid, "sub-boundary removed");
        Ok(self.0.boundary_info(false, Vec::new(), None, None).await?)
    }

    #[zbus(property)]
    fn version(&self) -> u32 {
        API_VERSION
    }
}
