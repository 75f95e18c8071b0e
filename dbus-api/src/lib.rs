//! The D-Bus API of `agentd`, shared by the daemon and the CLIs.
//!
//! Bus name [`BUS_NAME`] at [`OBJECT_PATH`] with two interfaces:
//! `org.leasehold.Landlord1` and `org.leasehold.Tenant1`. The major version is
//! in the interface name: a breaking change adds `...2`, it never edits a
//! shipped interface. Results are `a{sv}` dictionaries so fields can be added.

#![warn(missing_docs)]

use zbus::{DeserializeDict, SerializeDict, Type};

pub use attest::AttestProxy;
pub use health::HealthProxy;
pub use landlord::LandlordProxy;
pub use tenant::TenantProxy;

/// Well-known bus name of the agent.
pub const BUS_NAME: &str = "org.leasehold.Agent1";
/// Object path of the agent.
pub const OBJECT_PATH: &str = "/org/leasehold/Agent1";
/// Landlord interface.
pub const LANDLORD_INTERFACE: &str = "org.leasehold.Landlord1";
/// Tenant interface.
pub const TENANT_INTERFACE: &str = "org.leasehold.Tenant1";
/// The tenant's engines interface (its own major version: see docs/dbus.md).
pub const TENANT_ENGINES_INTERFACE: &str = "org.leasehold.TenantEngines1";
/// The landlord's health interface (its own major version: docs/health.md).
pub const HEALTH_INTERFACE: &str = "org.leasehold.Health1";
/// Value of `org.leasehold.Health1`'s `Version` property.
pub const HEALTH_API_VERSION: u32 = 1;
/// The attestation interface, for both roles (its own major version:
/// docs/attest.md).
pub const ATTEST_INTERFACE: &str = "org.leasehold.Attest1";
/// Value of `org.leasehold.Attest1`'s `Version` property.
pub const ATTEST_API_VERSION: u32 = 1;
/// Longest spec text `Deploy` and `Reload` take (the spec's own cap).
pub const MAX_SPEC_TEXT: usize = 1 << 20;
/// Value of the `Version` property of both interfaces (minor revisions).
pub const API_VERSION: u32 = 1;
/// Largest envelope `PutSecret` accepts (1 MiB payload plus headers).
pub const MAX_ENVELOPE_BYTES: usize = (1 << 20) + 600;

/// polkit action ids. One action per verb group; see `dist/polkit/`.
pub mod actions {
    /// Landlord: node info and public keys.
    pub const LANDLORD_READ: &str = "org.leasehold.landlord.read";
    /// Landlord: rotate / re-key landlord keys, register landlord consoles.
    pub const LANDLORD_KEYS: &str = "org.leasehold.landlord.keys";
    /// Landlord: assign the node to a tenant, release it.
    pub const LANDLORD_ASSIGN: &str = "org.leasehold.landlord.assign";
    /// Landlord: change the cluster boundary, its peers and failsafe.
    pub const LANDLORD_BOUNDARY: &str = "org.leasehold.landlord.boundary";
    /// Landlord: initialize the tenant's encrypted volume on a device, or
    /// forget the record of a failed one.
    pub const LANDLORD_VOLUME: &str = "org.leasehold.landlord.volume";
    /// Landlord: reboot the node.
    pub const LANDLORD_REBOOT: &str = "org.leasehold.landlord.power.reboot";
    /// Landlord: power the node off.
    pub const LANDLORD_POWEROFF: &str = "org.leasehold.landlord.power.poweroff";
    /// Landlord: suspend the node.
    pub const LANDLORD_SUSPEND: &str = "org.leasehold.landlord.power.suspend";
    /// Landlord: the node's health report (sensors, disks, links). Its own
    /// action so a monitoring account can be granted it alone.
    pub const LANDLORD_HEALTH: &str = "org.leasehold.landlord.health";
    /// Landlord: TPM quotes (Attest1) and the attestation key.
    pub const LANDLORD_ATTEST: &str = "org.leasehold.landlord.attest";
    /// Landlord: set the tenant's budget (cgroup limits of its subtree).
    pub const LANDLORD_BUDGET: &str = "org.leasehold.landlord.budget";
    /// Tenant: node info as the tenant sees it, own public key.
    pub const TENANT_READ: &str = "org.leasehold.tenant.read";
    /// Tenant: rotate / re-key tenant keys, register tenant consoles.
    pub const TENANT_KEYS: &str = "org.leasehold.tenant.keys";
    /// Tenant: the secret store.
    pub const TENANT_SECRETS: &str = "org.leasehold.tenant.secrets";
    /// Tenant: change the sub-boundary.
    pub const TENANT_BOUNDARY: &str = "org.leasehold.tenant.boundary";
    /// Tenant: install, replace and remove engines (Deploy, Reload, Remove).
    pub const TENANT_ENGINE_DEPLOY: &str = "org.leasehold.tenant.engine-deploy";
    /// Tenant: run engines (Start, Stop, Restart).
    pub const TENANT_ENGINE_CONTROL: &str = "org.leasehold.tenant.engine-control";
    /// Tenant: see engines (List, Status, Logs, Events).
    pub const TENANT_ENGINE_READ: &str = "org.leasehold.tenant.engine-read";
    /// Tenant: TPM quotes (Attest1) and the attestation key.
    pub const TENANT_ATTEST: &str = "org.leasehold.tenant.attest";

    /// Every action, landlord first.
    pub const ALL: &[&str] = &[
        LANDLORD_READ,
        LANDLORD_KEYS,
        LANDLORD_ASSIGN,
        LANDLORD_BOUNDARY,
        LANDLORD_VOLUME,
        LANDLORD_REBOOT,
        LANDLORD_POWEROFF,
        LANDLORD_SUSPEND,
        LANDLORD_HEALTH,
        LANDLORD_ATTEST,
        LANDLORD_BUDGET,
        TENANT_READ,
        TENANT_KEYS,
        TENANT_SECRETS,
        TENANT_BOUNDARY,
        TENANT_ENGINE_DEPLOY,
        TENANT_ENGINE_CONTROL,
        TENANT_ENGINE_READ,
        TENANT_ATTEST,
    ];
}

/// Errors on the wire, named `org.leasehold.Error.<Variant>`; each carries a
/// human-readable message.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.leasehold.Error")]
pub enum Error {
    /// A transport error (client side only).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The caller's role may not call this method (polkit said no, or polkit
    /// could not be asked).
    NotAuthorized(String),
    /// An argument is malformed; the message names it.
    InvalidArgument(String),
    /// The call destroys data and `confirm` was false.
    ConfirmationRequired(String),
    /// Another operation is in progress.
    Busy(String),
    /// The node has no tenant.
    NotAssigned(String),
    /// A named object (secret, console) does not exist.
    NotFound(String),
    /// A system service the agent needs is not available.
    Unavailable(String),
    /// The agent failed; details are in its log.
    Failed(String),
}

impl Error {
    /// The message without the error name.
    pub fn message(&self) -> String {
        match self {
            Error::ZBus(e) => e.to_string(),
            Error::NotAuthorized(m)
            | Error::InvalidArgument(m)
            | Error::ConfirmationRequired(m)
            | Error::Busy(m)
            | Error::NotAssigned(m)
            | Error::NotFound(m)
            | Error::Unavailable(m)
            | Error::Failed(m) => m.clone(),
        }
    }
}

/// Node information. Landlord and tenant see different subsets.
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct NodeInfo {
    /// Node id (hex).
    pub node_id: Option<String>,
    /// "hardware" or "software".
    pub tpm_kind: Option<String>,
    /// Landlord key-pair generation.
    pub landlord_generation: Option<u64>,
    /// Landlord public-key fingerprint.
    pub landlord_fingerprint: Option<String>,
    /// Whether a tenant is assigned.
    pub assigned: Option<bool>,
    /// Tenant name given at assignment.
    pub tenant_name: Option<String>,
    /// Tenant key-pair generation.
    pub tenant_generation: Option<u64>,
    /// Tenant symmetric-key generation.
    pub tenant_key_generation: Option<u64>,
    /// Tenant public-key fingerprint.
    pub tenant_fingerprint: Option<String>,
    /// Consoles registered by the caller's role: "name fingerprint".
    pub consoles: Option<Vec<String>>,
    /// API version.
    pub api_version: Option<u32>,
    /// The change the node is working on now, if any (a rotation, or the
    /// volume remake and standby keys that follow one); absent when idle.
    /// The rest of the dictionary is the state before that change.
    pub running: Option<String>,
    /// "ok", or "failed" when the agent's last check of the TPM failed
    /// (the TPM or its connection is lost: key operations fail). Absent
    /// from agents older than this field.
    pub tpm_health: Option<String>,
    /// Why the last TPM check failed; absent while healthy.
    pub tpm_error: Option<String>,
    /// The agent's version (its package version). Absent from older agents.
    pub agent_version: Option<String>,
    /// How many engines the tenant has deployed (a count only: the
    /// landlord sees no engine's name or state). Absent from older agents.
    pub engine_count: Option<u32>,
}

/// The tenant's budget and the aggregate use of its cgroup subtree
/// (`SetBudget`, `GetBudget`): counts and sums only, never an engine's name
/// or its own figures. A limit absent from the dictionary is not set (the
/// kernel's `max`; weights: 100).
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct BudgetInfo {
    /// `cpu.max` of the subtree, "QUOTA PERIOD" in µs.
    pub cpu_max: Option<String>,
    /// `cpu.weight` of the subtree.
    pub cpu_weight: Option<u32>,
    /// `memory.max` of the subtree, bytes.
    pub memory_max: Option<u64>,
    /// `pids.max` of the subtree.
    pub pids_max: Option<u64>,
    /// `io.weight` of the subtree.
    pub io_weight: Option<u32>,
    /// The budget was written on the subtree (last attempt).
    pub written: Option<bool>,
    /// Why it was not (no cgroup v2 tree for engines yet); every engine
    /// launch writes it first and is refused while it cannot.
    pub write_error: Option<String>,
    /// `SetBudget` only: engines whose own limits are above the new
    /// budget (they keep running, held to it by the kernel).
    pub engines_above: Option<u32>,
    /// Engines deployed.
    pub engines: Option<u32>,
    /// Engines with a running instance.
    pub engines_running: Option<u32>,
    /// The subtree's `cpu.stat` `usage_usec`.
    pub cpu_usage_usec: Option<u64>,
    /// The subtree's `memory.current`, bytes.
    pub memory_current: Option<u64>,
    /// The subtree's `pids.current`.
    pub pids_current: Option<u64>,
    /// The subtree's `memory.events` `oom_kill`.
    pub oom_kills: Option<u64>,
    /// The subtree's `io.stat`, summed over devices: bytes read.
    pub io_read_bytes: Option<u64>,
    /// Bytes written.
    pub io_write_bytes: Option<u64>,
    /// Read operations.
    pub io_reads: Option<u64>,
    /// Write operations.
    pub io_writes: Option<u64>,
    /// Why the usage fields are absent (the subtree cannot be read).
    pub usage_error: Option<String>,
    /// A corrective throttle is in force (`throttle-engines`,
    /// docs/health.md): the percent of the budget's CPU (or the node's)
    /// the subtree keeps (the lowest of the rules in force). Absent: none
    /// (or an older agent).
    pub throttle_cpu_percent: Option<u32>,
    /// With a throttle: the subtree's lowered `cpu.max`, "QUOTA PERIOD".
    pub throttled_cpu_max: Option<String>,
    /// With a throttle: when the earliest in force began, unix seconds.
    pub throttled_since: Option<u64>,
}

/// A public key.
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct PublicKey {
    /// "landlord" or "tenant".
    pub role: Option<String>,
    /// Key-pair generation.
    pub generation: Option<u64>,
    /// SubjectPublicKeyInfo PEM.
    pub pem: Option<String>,
    /// SHA-256 of the DER, hex.
    pub fingerprint: Option<String>,
}

/// A completed key change (also the body of the `KeysChanged` signal).
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct KeyChange {
    /// "rotate", "rekey", "assign", "release".
    pub kind: Option<String>,
    /// Whose keys.
    pub role: Option<String>,
    /// Pair generation before.
    pub generation_before: Option<u64>,
    /// Pair generation after (absent: erased).
    pub generation_after: Option<u64>,
    /// Whether data under the previous keys became unreadable.
    pub data_destroyed: Option<bool>,
    /// New public-key fingerprint.
    pub fingerprint: Option<String>,
    /// Erase receipt (a JSON document, exactly the bytes signed) when
    /// the change destroyed data.
    pub receipt: Option<String>,
    /// PKCS#1 v1.5 SHA-256 signature of `Receipt` by the node's
    /// TPM-held signing key (`GetReceiptKey`), base64.
    pub receipt_signature: Option<String>,
    /// What did not work after the change committed (the change stands):
    /// e.g. the volume could not be remade, or no receipt could be signed.
    pub warnings: Option<Vec<String>>,
}

/// The tenant's encrypted volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct VolumeInfo {
    /// "none" (not initialized), "open", "closed" or "error".
    pub state: Option<String>,
    /// The device as recorded (stable path).
    pub device: Option<String>,
    /// Device size in bytes.
    pub size: Option<u64>,
    /// Filesystem bytes used and total (when open).
    pub used: Option<u64>,
    /// Filesystem size in bytes (when open).
    pub total: Option<u64>,
    /// Where it is mounted.
    pub mount: Option<String>,
    /// Filesystem type.
    pub filesystem: Option<String>,
    /// dm-crypt cipher, key size and options ("aes-xts-plain64, 512-bit key, sector_size:4096").
    pub mapping: Option<String>,
    /// Key generations of the disk key ("landlord 1, tenant 2").
    pub generations: Option<String>,
    /// Unix time the device was initialized.
    pub created: Option<u64>,
    /// Unix time the current (empty at the time) filesystem was made.
    pub made: Option<u64>,
    /// Why it was made ("initialized", "recreated empty after …", "an
    /// interrupted initialization was finished …"); kept across restarts.
    pub made_by: Option<String>,
    /// The last lifecycle event ("opened", "recreated empty after …").
    pub event: Option<String>,
    /// Why it is not open.
    pub error: Option<String>,
    /// What to do about a failed or stuck volume (absent when it is fine).
    pub next: Option<String>,
    /// While a filesystem is being made (init, remake): the step
    /// ("filling the device: 12% (…)"); absent otherwise.
    pub progress: Option<String>,
}

/// A stored secret (never its value).
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct SecretInfo {
    /// Name.
    pub name: Option<String>,
    /// Payload size in bytes.
    pub size: Option<u64>,
    /// Unix time it was stored.
    pub stored_at: Option<u64>,
}

/// One engine (`TenantEngines1`).
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct EngineInfo {
    /// Name.
    pub name: Option<String>,
    /// The image archive (file name in the inbox).
    pub image: Option<String>,
    /// Supervision state (`stopped`, `starting`, `running`, `ready`,
    /// `stopping`, `exited`, `backing-off`, `gave-up`).
    pub state: Option<String>,
    /// Marked to start (also after a node reboot).
    pub enabled: Option<bool>,
    /// Main pid of the current instance (the engine's init).
    pub pid: Option<u32>,
    /// Unix time the current instance started.
    pub started_at: Option<u64>,
    /// Restarts by the supervisor since deploy.
    pub restarts: Option<u32>,
    /// How the last instance ended (`exit code 1`, `signal 9`,
    /// `OOM-killed`, `not started`).
    pub last_exit: Option<String>,
    /// Deploy: the budget limits the engine inherits.
    pub notes: Option<Vec<String>>,
    /// Each probe of the spec, in order: (what it checks, failures in a
    /// row, last result `ok` / `failed` / empty when not run yet, what the
    /// last run saw, unix time it ended or 0).
    pub probes: Option<Vec<ProbeResult>>,
    /// Probe runs that had to wait for the node's bound on probe work
    /// (`[engines] probe_rate`, `probe_concurrency`), since the agent
    /// started: each started later than its interval said, or not at all.
    pub probes_delayed: Option<u64>,
    /// How the running instance is confined, as its shim reported it
    /// (absent: not running, or not confined yet): the Landlock ABI in
    /// force (0: none; scopes for abstract unix sockets and signals from
    /// 6) ...
    pub landlock_abi: Option<u32>,
    /// ... whether the Landlock ruleset is `full`, `partial` (the kernel
    /// lacks part of it) or `none` ...
    pub landlock: Option<String>,
    /// ... and whether the seccomp filter is installed.
    pub seccomp: Option<bool>,
}

/// One probe in [`EngineInfo::probes`]: (what it checks, failures in a
/// row, `ok` / `failed` / empty, what the last run saw, unix time or 0).
pub type ProbeResult = (String, u32, String, String, u64);

/// Boundaries as the caller may see them. Documents are JSON (the same
/// shape as the TOML/JSON files `boundary set` takes).
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct BoundaryInfo {
    /// The cluster boundary document (landlord only).
    pub cluster: Option<String>,
    /// The tenant's stored sub-boundary document.
    pub sub: Option<String>,
    /// The sub-boundary as enforced (intersection with the cluster boundary), JSON list of entries.
    pub effective: Option<String>,
    /// Failsafe entries, one line each (shown in every listing).
    pub failsafe: Option<Vec<String>>,
    /// Whether the agent's table is in the kernel.
    pub enforced: Option<bool>,
    /// Number of set elements (hosts and CIDRs) in the kernel table.
    pub elements: Option<u64>,
    /// How the last change reached the kernel: "full", "elements", "unchanged", "removed".
    pub change: Option<String>,
    /// What narrowing cut, one line each.
    pub cut: Option<Vec<String>>,
    /// Warnings (e.g. a boundary that cuts an open SSH session).
    pub warnings: Option<Vec<String>>,
    /// Peers added or removed by AddPeers/RemovePeers.
    pub peers_changed: Option<u32>,
    /// The last change made behind the agent's back that it undid.
    pub last_drift: Option<String>,
    /// How many times the agent found its table changed behind its back
    /// since it started (restored or not). Absent from older agents.
    pub drift_count: Option<u64>,
    /// Unix time of the last such finding (absent: none since start).
    pub last_drift_at: Option<u64>,
    /// Set while the last drift found could not be undone (why): the
    /// kernel does not hold the boundary the agent stores.
    pub drift_unrepaired: Option<String>,
    /// A boundary set with a revert deadline is pending: the deadline
    /// (unix seconds) after which the previous boundary comes back unless
    /// `ConfirmBoundary` is called (landlord only).
    pub revert_at: Option<u64>,
}

/// An erase receipt the agent keeps (`ListReceipts`, `GetReceipt`). Who
/// sees which: docs/dbus.md "Receipts".
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct ReceiptInfo {
    /// Id (`GetReceipt` takes it): the stored file's name without `.json`.
    pub id: Option<String>,
    /// Unix time the receipt was signed.
    pub time: Option<u64>,
    /// "rotate", "assign" or "release".
    pub change: Option<String>,
    /// Whose keys changed ("landlord" or "tenant").
    pub role: Option<String>,
    /// Fingerprint of the signing key, as the body states it.
    pub signer: Option<String>,
    /// `GetReceipt` only: the JSON body, exactly the bytes signed.
    pub receipt: Option<String>,
    /// `GetReceipt` only: the signature of `Receipt` (as in [`KeyChange`]).
    pub receipt_signature: Option<String>,
}

/// The JSON form of a signed receipt, one spelling everywhere: the files
/// under the agent's `receipts/`, `--json` of key changes and `receipts
/// show`, and what `verify-receipt` reads.
pub mod receipt_json {
    /// The body: in the agent's files a JSON document as a string, exactly
    /// the bytes signed; in the CLIs' `--json` the same document as an
    /// object, which written back compactly is those bytes (docs/json.md).
    pub const BODY: &str = "receipt";
    /// The base64 signature of the body.
    pub const SIGNATURE: &str = "receipt_signature";
    /// The name agents before 2026-12 wrote in `receipts/` files; still read.
    pub const LEGACY_SIGNATURE: &str = "signature";
}

/// The verdict on one flow.
#[derive(Debug, Clone, Default, PartialEq, Eq, SerializeDict, DeserializeDict, Type)]
#[zbus(signature = "a{sv}", rename_all = "PascalCase")]
pub struct FlowVerdict {
    /// Allowed or denied.
    pub allowed: Option<bool>,
    /// The failsafe entry that allows it.
    pub failsafe: Option<String>,
    /// The cluster entry that allows it (absent: the cluster denies it). Landlord only.
    pub cluster: Option<String>,
    /// The sub-boundary entry that allows it; "" when the sub-boundary denies it; absent without a sub-boundary.
    pub sub: Option<String>,
    /// One line for humans.
    pub reason: Option<String>,
}

/// Proxy of the landlord interface.
pub mod landlord {
    use super::*;

    /// Client proxy of `org.leasehold.Landlord1`.
    #[zbus::proxy(
        interface = "org.leasehold.Landlord1",
        default_service = "org.leasehold.Agent1",
        default_path = "/org/leasehold/Agent1"
    )]
    pub trait Landlord {
        /// Node info as the landlord sees it.
        fn node_info(&self) -> Result<NodeInfo, Error>;
        /// UL or UT ("landlord" / "tenant").
        fn get_public_key(&self, role: &str) -> Result<PublicKey, Error>;
        /// Assigns the node to a tenant: new tenant pair and KT. `console_key`
        /// (PEM, may be empty) is registered as the tenant's first console.
        fn assign_tenant(
            &self,
            name: &str,
            console_key: &str,
            confirm: bool,
        ) -> Result<KeyChange, Error>;
        /// Erases the tenant's keys (crypto-erase).
        fn release_tenant(&self, confirm: bool) -> Result<KeyChange, Error>;
        /// New landlord pair and KL: all tenant data becomes unreadable.
        fn rotate_keys(&self, confirm: bool) -> Result<KeyChange, Error>;
        /// New landlord pair, KL kept.
        fn rekey_keys(&self) -> Result<KeyChange, Error>;
        /// Registers a landlord console's public key; returns its fingerprint.
        fn register_console_key(&self, name: &str, pem: &str) -> Result<String, Error>;
        /// Reboots the node (through logind).
        fn reboot(&self) -> Result<(), Error>;
        /// Powers the node off (through logind).
        fn power_off(&self) -> Result<(), Error>;
        /// Suspends the node (through logind).
        fn suspend(&self) -> Result<(), Error>;
        /// Sets the cluster boundary from a TOML or JSON document (`format`
        /// "toml", "json" or "" to detect); applies it at once.
        fn set_boundary(&self, document: &str, format: &str) -> Result<BoundaryInfo, Error>;
        /// The boundaries, failsafe and enforcement state.
        fn get_boundary(&self) -> Result<BoundaryInfo, Error>;
        /// Adds peers to an allow entry (name) or group (`@name`).
        fn add_peers(&self, target: &str, peers: &[&str]) -> Result<BoundaryInfo, Error>;
        /// Removes peers (as listed) from an allow entry or group.
        fn remove_peers(&self, target: &str, peers: &[&str]) -> Result<BoundaryInfo, Error>;
        /// Replaces the failsafe entries (a document with `[[failsafe]]` entries; none: no failsafe).
        fn set_failsafe(&self, document: &str, format: &str) -> Result<BoundaryInfo, Error>;
        /// Explains a flow: direction "in"/"out", peer address, "tcp"/"udp"/"icmp", port.
        fn explain_flow(
            &self,
            direction: &str,
            peer: &str,
            proto: &str,
            port: u16,
        ) -> Result<FlowVerdict, Error>;
        /// Lifts every boundary (removes the table and the stored policy).
        fn remove_boundary(&self, confirm: bool) -> Result<(), Error>;
        /// Sets the cluster boundary; `confirm` allows a document that
        /// denies everything; `seconds` (0: none, else 2-3600) reverts to
        /// the previous boundary unless `ConfirmBoundary` comes in time.
        fn set_boundary_with_revert(
            &self,
            document: &str,
            format: &str,
            seconds: u32,
            confirm: bool,
        ) -> Result<BoundaryInfo, Error>;
        /// Keeps a boundary set with a revert deadline.
        fn confirm_boundary(&self) -> Result<BoundaryInfo, Error>;
        /// Sets the failsafe entries; `confirm` allows removing every one.
        fn set_failsafe_confirmed(
            &self,
            document: &str,
            format: &str,
            confirm: bool,
        ) -> Result<BoundaryInfo, Error>;
        /// Validates a cluster document and compares it with what is
        /// enforced, without applying it: JSON (docs/dbus.md).
        fn check_boundary(&self, document: &str, format: &str) -> Result<String, Error>;
        /// Initializes the tenant's encrypted volume on `device` (destroys
        /// what is on it: needs `confirm`; a device with a signature also
        /// needs `force`).
        fn init_volume(
            &self,
            device: &str,
            force: bool,
            confirm: bool,
        ) -> Result<VolumeInfo, Error>;
        /// The volume's state.
        fn volume_status(&self) -> Result<VolumeInfo, Error>;
        /// Drops the record of a failed or stuck volume (needs `confirm`;
        /// a usable volume is refused; no volume: nothing to do). The
        /// device is not written. Returns the state after ("none").
        fn forget_volume(&self, confirm: bool) -> Result<VolumeInfo, Error>;
        /// The node's TPM-held signing key (verifies erase receipts).
        fn get_receipt_key(&self) -> Result<PublicKey, Error>;
        /// The erase receipts of changes the landlord made (assign,
        /// release, landlord rotations), oldest first, without bodies.
        fn list_receipts(&self) -> Result<Vec<ReceiptInfo>, Error>;
        /// One receipt of `ListReceipts` with its body and signature.
        fn get_receipt(&self, id: &str) -> Result<ReceiptInfo, Error>;
        /// Sets the tenant's budget from a TOML or JSON document (format
        /// "toml", "json" or "" to guess), recorded and written on the
        /// tenant's cgroup subtree. Returns it with the aggregate usage.
        fn set_budget(&self, document: &str, format: &str) -> Result<BudgetInfo, Error>;
        /// The tenant's budget and the aggregate usage of its subtree.
        fn get_budget(&self) -> Result<BudgetInfo, Error>;
        /// Interface version.
        #[zbus(property)]
        fn version(&self) -> zbus::Result<u32>;
        /// Emitted after every key change.
        #[zbus(signal)]
        fn keys_changed(&self, change: KeyChange) -> zbus::Result<()>;
        /// Emitted when the agent found its table changed or removed behind
        /// its back and restored it.
        #[zbus(signal)]
        fn boundary_restored(&self, what: String) -> zbus::Result<()>;
        /// A boundary set with a revert deadline was not confirmed in time
        /// and the previous one was put back.
        #[zbus(signal)]
        fn boundary_reverted(&self, what: String) -> zbus::Result<()>;
    }
}

/// Proxy of the tenant interface.
pub mod tenant {
    use super::*;

    /// Client proxy of `org.leasehold.Tenant1`.
    #[zbus::proxy(
        interface = "org.leasehold.Tenant1",
        default_service = "org.leasehold.Agent1",
        default_path = "/org/leasehold/Agent1"
    )]
    pub trait Tenant {
        /// Node info as the tenant sees it.
        fn node_info(&self) -> Result<NodeInfo, Error>;
        /// UT.
        fn get_public_key(&self) -> Result<PublicKey, Error>;
        /// New tenant pair and KT (take ownership): destroys tenant data.
        fn rotate_keys(&self, confirm: bool) -> Result<KeyChange, Error>;
        /// New tenant pair, KT kept.
        fn rekey_keys(&self) -> Result<KeyChange, Error>;
        /// Registers a tenant console's public key; returns its fingerprint.
        fn register_console_key(&self, name: &str, pem: &str) -> Result<String, Error>;
        /// Opens an envelope sealed to UT and stores its payload as secret `name`.
        fn put_secret(&self, name: &str, envelope: &[u8]) -> Result<SecretInfo, Error>;
        /// Lists stored secrets (names and sizes only).
        fn list_secrets(&self) -> Result<Vec<SecretInfo>, Error>;
        /// Removes a secret.
        fn remove_secret(&self, name: &str) -> Result<(), Error>;
        /// Sets the sub-boundary. Wider than the cluster boundary: refused
        /// with the reason, or with `narrow` the intersection is stored.
        fn set_sub_boundary(
            &self,
            document: &str,
            format: &str,
            narrow: bool,
        ) -> Result<BoundaryInfo, Error>;
        /// The sub-boundary, the effective policy and the failsafe.
        fn get_boundary(&self) -> Result<BoundaryInfo, Error>;
        /// The volume's state.
        fn volume_status(&self) -> Result<VolumeInfo, Error>;
        /// The node's TPM-held signing key (verifies erase receipts).
        fn get_receipt_key(&self) -> Result<PublicKey, Error>;
        /// Explains a flow (see the landlord's ExplainFlow).
        fn explain_flow(
            &self,
            direction: &str,
            peer: &str,
            proto: &str,
            port: u16,
        ) -> Result<FlowVerdict, Error>;
        /// Removes the sub-boundary (the cluster boundary stays).
        fn remove_sub_boundary(&self) -> Result<BoundaryInfo, Error>;
        /// Validates a sub-boundary document and compares it with the
        /// stored one, without applying it: JSON (docs/dbus.md).
        fn check_sub_boundary(&self, document: &str, format: &str) -> Result<String, Error>;
        /// The erase receipts of the current tenancy (tenant and landlord
        /// rotations since the assignment), oldest first, without bodies.
        fn list_receipts(&self) -> Result<Vec<ReceiptInfo>, Error>;
        /// One receipt of `ListReceipts` with its body and signature.
        fn get_receipt(&self, id: &str) -> Result<ReceiptInfo, Error>;
        /// Interface version.
        #[zbus(property)]
        fn version(&self) -> zbus::Result<u32>;
        /// Emitted after every change of tenant keys.
        #[zbus(signal)]
        fn keys_changed(&self, change: KeyChange) -> zbus::Result<()>;
    }
}

/// Proxy of the tenant's engines interface.
pub mod tenant_engines {
    use super::*;

    /// Client proxy of `org.leasehold.TenantEngines1`.
    #[zbus::proxy(
        interface = "org.leasehold.TenantEngines1",
        default_service = "org.leasehold.Agent1",
        default_path = "/org/leasehold/Agent1"
    )]
    pub trait TenantEngines {
        /// Deploys engine `name` (stopped) from `image`, an archive's file
        /// name in the tenant's inbox, with `spec` (TOML, or JSON when it
        /// starts with `{`).
        fn deploy(&self, name: &str, image: &str, spec: &str) -> Result<EngineInfo, Error>;
        /// Starts it.
        fn start(&self, name: &str) -> Result<EngineInfo, Error>;
        /// Stops it (SIGTERM, SIGKILL after the spec's grace); returns once
        /// it is stopping.
        fn stop(&self, name: &str) -> Result<EngineInfo, Error>;
        /// Stops, then starts it.
        fn restart(&self, name: &str) -> Result<EngineInfo, Error>;
        /// Runs a new image and/or spec ("" keeps the current one).
        fn reload(&self, name: &str, image: &str, spec: &str) -> Result<EngineInfo, Error>;
        /// Removes a stopped engine with its root and data dirs (`confirm`
        /// required).
        fn remove(&self, name: &str, confirm: bool) -> Result<(), Error>;
        /// Every engine.
        fn list(&self) -> Result<Vec<EngineInfo>, Error>;
        /// One engine.
        fn status(&self, name: &str) -> Result<EngineInfo, Error>;
        /// One engine's output: the last `max_lines` (1-10000) lines stamped
        /// at or after `since_unix_ms`, oldest first: (unix ms, stream
        /// `out`/`err`/`agent`, text, partial: the line goes on in the next
        /// entry). At most 8 MiB of text (the newest lines).
        fn logs(
            &self,
            name: &str,
            since_unix_ms: u64,
            max_lines: u32,
        ) -> Result<Vec<(u64, String, String, bool)>, Error>;
        /// Supervision events numbered above `after_seq` (0: every event
        /// kept), oldest first, at most `max` (1-1000): (seq, unix ms,
        /// engine, kind, detail). Numbers keep increasing across agent
        /// restarts.
        fn events(
            &self,
            after_seq: u64,
            max: u32,
        ) -> Result<Vec<(u64, u64, String, String, String)>, Error>;
        /// The signed records of the landlord's corrective actions that
        /// touched this tenant's workloads (stop-engines, reboot,
        /// poweroff: docs/health.md "Corrective actions on the node"), oldest first,
        /// at most 256, each with its body and signature: `Id`, `Time`,
        /// `Change` ("health-action"), `Role` (the action), `Signer`,
        /// `Receipt`, `ReceiptSignature`. `verify-receipt` checks them.
        fn list_action_records(&self) -> Result<Vec<ReceiptInfo>, Error>;
        /// Begins an upload of an image archive of `size` bytes whose
        /// sha256 is `sha256` (64 hex digits) into the tenant's inbox as
        /// `name` (a file name, as `Deploy`'s `image`); returns its id.
        fn begin_upload(&self, name: &str, size: u64, sha256: &str) -> Result<String, Error>;
        /// Appends `data` (at most [`MAX_UPLOAD_CHUNK`] bytes) at `offset`,
        /// which must be the bytes received so far; returns that count.
        fn upload_chunk(
            &self,
            upload_id: &str,
            offset: u64,
            data: &serde_bytes::Bytes,
        ) -> Result<u64, Error>;
        /// Checks the size and sha256, then puts the file in place under
        /// its name; returns the name.
        fn commit_upload(&self, upload_id: &str) -> Result<String, Error>;
        /// Abandons an upload (its temp file is removed).
        fn abort_upload(&self, upload_id: &str) -> Result<(), Error>;
        /// Interface version.
        #[zbus(property)]
        fn version(&self) -> zbus::Result<u32>;
    }
}

/// Most bytes one `UploadChunk` carries (4 MiB).
pub const MAX_UPLOAD_CHUNK: usize = 4 << 20;

/// Proxy of the landlord's health interface.
pub mod health {
    use super::*;

    /// Client proxy of `org.leasehold.Health1`.
    #[zbus::proxy(
        interface = "org.leasehold.Health1",
        default_service = "org.leasehold.Agent1",
        default_path = "/org/leasehold/Agent1"
    )]
    pub trait Health {
        /// A fresh health report: JSON (docs/health.md "Report"). Takes up
        /// to the longest source deadline (smartctl: `health.smart_timeout_ms`
        /// plus `health.deadline_ms`).
        fn report(&self) -> Result<String, Error>;
        /// Interface version.
        #[zbus(property)]
        fn version(&self) -> zbus::Result<u32>;
        /// The agent's periodic report found a different set of faults
        /// (severity, source, subject) than the previous one: the worst
        /// severity and the faults as JSON (docs/json.md `HealthFault`).
        /// Landlord only (the bus policy).
        #[zbus(signal)]
        fn faults_changed(&self, severity: String, faults: String) -> zbus::Result<()>;
    }
}

/// Proxy of the attestation interface (landlord and tenant).
pub mod attest {
    use super::*;

    /// Client proxy of `org.leasehold.Attest1`.
    #[zbus::proxy(
        interface = "org.leasehold.Attest1",
        default_service = "org.leasehold.Agent1",
        default_path = "/org/leasehold/Agent1"
    )]
    pub trait Attest {
        /// A TPM quote by the attestation key over `pcrs` (sha256 bank,
        /// 1..=24 indices in 0..=23) with qualifying data SHA-256 of the
        /// `nonce` (8..=64 bytes) and the returned context (node id, boot id,
        /// key generations and fingerprints). Returns the marshalled
        /// TPMS_ATTEST, its RSASSA-PKCS1-v1_5 SHA-256 signature, the PCR
        /// values and the context text (docs/attest.md).
        #[allow(clippy::type_complexity)]
        fn attest(
            &self,
            nonce: &[u8],
            pcrs: &[u32],
        ) -> Result<(Vec<u8>, Vec<u8>, Vec<(u32, Vec<u8>)>, String), Error>;
        /// The attestation key's public half (SubjectPublicKeyInfo PEM).
        fn attestation_key(&self) -> Result<String, Error>;
        /// Interface version.
        #[zbus(property)]
        fn version(&self) -> zbus::Result<u32>;
    }
}
