//! The D-Bus API of `agentd`, shared by the daemon and the CLIs.
//!
//! Bus name [`BUS_NAME`] at [`OBJECT_PATH`] with two interfaces:
//! `org.leasehold.Landlord1` and `org.leasehold.Tenant1`. The major version is
//! in the interface name: a breaking change adds `...2`, it never edits a
//! shipped interface. Results are `a{sv}` dictionaries so fields can be added.

#![warn(missing_docs)]

use zbus::{DeserializeDict, SerializeDict, Type};

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
    /// Landlord: reboot the node.
    pub const LANDLORD_REBOOT: &str = "org.leasehold.landlord.power.reboot";
    /// Landlord: power the node off.
    pub const LANDLORD_POWEROFF: &str = "org.leasehold.landlord.power.poweroff";
    /// Landlord: suspend the node.
    pub const LANDLORD_SUSPEND: &str = "org.leasehold.landlord.power.suspend";
    /// Tenant: node info as the tenant sees it, own public key.
    pub const TENANT_READ: &str = "org.leasehold.tenant.read";
    /// Tenant: rotate / re-key tenant keys, register tenant consoles.
    pub const TENANT_KEYS: &str = "org.leasehold.tenant.keys";
    /// Tenant: the secret store.
    pub const TENANT_SECRETS: &str = "org.leasehold.tenant.secrets";

    /// Every action, landlord first.
    pub const ALL: &[&str] = &[
        LANDLORD_READ,
        LANDLORD_KEYS,
        LANDLORD_ASSIGN,
        LANDLORD_REBOOT,
        LANDLORD_POWEROFF,
        LANDLORD_SUSPEND,
        TENANT_READ,
        TENANT_KEYS,
        TENANT_SECRETS,
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
        /// Interface version.
        #[zbus(property)]
        fn version(&self) -> zbus::Result<u32>;
        /// Emitted after every key change.
        #[zbus(signal)]
        fn keys_changed(&self, change: KeyChange) -> zbus::Result<()>;
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
        /// Interface version.
        #[zbus(property)]
        fn version(&self) -> zbus::Result<u32>;
        /// Emitted after every change of tenant keys.
        #[zbus(signal)]
        fn keys_changed(&self, change: KeyChange) -> zbus::Result<()>;
    }
}
