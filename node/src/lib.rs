//! The node controller: the one sequencer of a Leasehold node's state.
//!
//! Callers (the agent's D-Bus adapters) send a [`Command`] and get a typed
//! [`Outcome`]. State-changing commands run one at a time, in arrival
//! order, on the controller's own thread; the actors they drive (keys,
//! volume, boundaries, secret store — see [`backend`]) each keep their own
//! state. Reads are answered from a [`Snapshot`] that the controller
//! replaces after every command, so a read never waits behind a change.
//!
//! While a change runs, at most [`QUEUE_DEPTH`] further changes wait
//! behind it; one more is refused at once with [`NodeError::Busy`]. See
//! docs/agentd.md ("The node controller") for every workflow's order.

#![warn(missing_docs)]

pub mod backend;
mod controller;
mod engines;
#[cfg(feature = "testing")]
pub mod fake;
mod receipt;

use std::time::SystemTime;

use leasehold_tpm::{KeyChange, KeyError, PublicKeyInfo, Role, SigningKeyInfo, Status};

pub use backend::{
    Backends, BoundaryApplied, BoundaryChange, DiskKeyInfo, Failure, FailureKind, Remade,
    SecretEntry, TenancyChange, Wiped,
};
pub use controller::{Node, MAX_ENGINE_ANSWERS_AWAITED};
pub use engines::{
    BudgetApplied, Confinement, EngineAnswer, EngineCommand, EngineEvent, EngineProbe,
    EngineStatus, EngineView, Engines, NoEngines, NotStopped, StopReport, TenantView, Throttle,
    ThrottleApplied, Throttles, ERASE_STOP_GRACE, MAX_EVENTS_READ, MAX_IMAGE_REF, MAX_THROTTLES,
    MAX_THROTTLE_RULE,
};
pub use receipt::{ErasedVolume, Receipt, SignedReceipt, RECEIPT_FORMAT};

/// State-changing commands that may wait behind the running one.
pub const QUEUE_DEPTH: usize = 16;
/// Most secrets the tenant may store.
pub const MAX_SECRETS: usize = 128;
/// Most bytes of secret payloads the tenant may store in total.
pub const MAX_SECRET_BYTES: u64 = 16 << 20;
/// Largest secret payload `PutSecret` keeps: what the engine shim gives an
/// engine (`leasehold_engines::launch::MAX_SECRET_BYTES`, checked equal in
/// agentd). A larger one (an envelope sealed by another tool) was stored
/// and then refused at every start of an engine naming it.
pub const MAX_SECRET_PAYLOAD: usize = 1 << 20;
/// Largest envelope `PutSecret` accepts (1 MiB payload plus headers).
pub const MAX_ENVELOPE_BYTES: usize = (1 << 20) + 600;
/// Label of the secret store's key (derived from the disk key).
pub const SECRET_STORE_PURPOSE: &str = "secret-store";
/// Longest piece of caller input echoed back in an error.
pub const ECHO_LIMIT: usize = 64;

/// Who asks (already authorized by the adapter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The role the caller acts in.
    pub role: Role,
    /// The caller's uid, for the log.
    pub uid: u32,
}

/// A state change.
#[derive(Debug, Clone)]
pub enum Command {
    /// Landlord: assign the node to a tenant (new tenant pair and KT).
    Assign {
        /// Tenant name.
        name: String,
        /// The tenant console's public key (PEM), registered in the same commit.
        console_key: Option<String>,
        /// The caller confirmed that a previous tenant's data is destroyed.
        confirm: bool,
    },
    /// Landlord: release the node (the tenant's keys and data erased).
    Release {
        /// Confirmed.
        confirm: bool,
    },
    /// Destroying rotation of `role`'s keys.
    Rotate {
        /// Whose keys.
        role: Role,
        /// Confirmed.
        confirm: bool,
    },
    /// Routine re-key of `role`'s pair (data kept).
    Rekey {
        /// Whose keys.
        role: Role,
    },
    /// Register a console key under the caller's role.
    RegisterConsole {
        /// Console name.
        name: String,
        /// Public key (PEM).
        pem: String,
    },
    /// Tenant: store a secret sealed to UT.
    PutSecret {
        /// Name.
        name: String,
        /// The envelope.
        envelope: Vec<u8>,
    },
    /// Tenant: remove a secret.
    RemoveSecret {
        /// Name.
        name: String,
    },
    /// Landlord: initialize the tenant volume on a device.
    InitVolume {
        /// Block device.
        device: String,
        /// Overwrite a device that has a signature.
        force: bool,
        /// Confirmed.
        confirm: bool,
    },
    /// Landlord: drop the record of a failed or stuck volume.
    ForgetVolume {
        /// Confirmed.
        confirm: bool,
    },
    /// A boundary change.
    Boundary(BoundaryChange),
    /// Tenant: an engine command.
    Engine(EngineCommand),
    /// Landlord: the tenant's budget (cgroup limits of its subtree).
    SetBudget {
        /// The new budget (validated again by the controller).
        budget: leasehold_engines::budget::Budget,
    },
    /// The agent itself: sign the body of a corrective action's record
    /// with the node's receipt key (docs/health.md "Corrective actions on the node").
    /// Never reachable from a D-Bus caller's input.
    SignRecord {
        /// The JSON body, signed as given.
        body: String,
    },
    /// The agent itself: stop every engine (a corrective action), as a
    /// rotation stops them.
    StopEngines,
    /// The agent itself: the corrective throttles in force on the tenant
    /// subtree (`throttle-engines`), the whole set each time. Never
    /// reachable from a D-Bus caller's input.
    ThrottleEngines {
        /// Every throttle in force (empty: restore the budget's cpu.max).
        throttles: Throttles,
    },
}

impl Command {
    /// Whether the controller runs it before changes queued earlier (and
    /// takes it when the queue is full, within `URGENT_RESERVE`): the
    /// landlord's boundary revert, the safety net of a change that may
    /// have locked the landlord out, which tenant work must not hold back,
    /// and the landlord's confirmation of that change; and the agent's own
    /// corrective actions (signing an action's record, stopping or
    /// throttling the engines), which a tenant keeping the queue full
    /// with its own calls must not hold off (review: each was refused
    /// `Busy` then, so a flood kept the tenant unthrottled and, without a
    /// signed record, the node from rebooting). Only the agent sends those
    /// three (no D-Bus method makes them), one at a time.
    pub fn is_urgent(&self) -> bool {
        // The landlord's confirmation too: queued before the deadline, it
        // must not be overtaken by the revert it answers (urgent changes
        // keep their order among themselves).
        matches!(
            self,
            Command::Boundary(
                crate::backend::BoundaryChange::RevertPending { .. }
                    | crate::backend::BoundaryChange::ConfirmPending
            ) | Command::SignRecord { .. }
                | Command::StopEngines
                | Command::ThrottleEngines { .. }
        )
    }

    /// Short name for logs and `Busy` messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Assign { .. } => "assign",
            Command::Release { .. } => "release",
            Command::Rotate { .. } => "rotate",
            Command::Rekey { .. } => "rekey",
            Command::RegisterConsole { .. } => "register-console",
            Command::PutSecret { .. } => "put-secret",
            Command::RemoveSecret { .. } => "remove-secret",
            Command::InitVolume { .. } => "init-volume",
            Command::ForgetVolume { .. } => "forget-volume",
            Command::Boundary(_) => "boundary",
            Command::Engine(c) => c.name(),
            Command::SetBudget { .. } => "set-budget",
            Command::SignRecord { .. } => "sign-record",
            Command::StopEngines => "stop-engines",
            Command::ThrottleEngines { .. } => "throttle-engines",
        }
    }
}

/// A command with its caller and arrival time.
#[derive(Debug, Clone)]
pub struct Request {
    /// Who.
    pub caller: Caller,
    /// What.
    pub command: Command,
    /// When the request reached the agent (before authorization): erase
    /// times in receipts count from here.
    pub received: SystemTime,
}

/// A committed key change and everything after it.
#[derive(Debug, Clone)]
pub struct ChangeReport {
    /// What changed in the TPM.
    pub change: KeyChange,
    /// The signed erase receipt: only when the change replaced the disk key
    /// and the kernel's copy of the old one was read back gone.
    pub receipt: Option<SignedReceipt>,
    /// What did not work after the commit (the change itself stands).
    pub warnings: Vec<String>,
    /// Who asked.
    pub caller: Caller,
    /// The engines stopped before the erase (None: the change kept the
    /// disk key, so no engine was stopped).
    pub engines: Option<StopReport>,
}

/// What a command did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A key change committed.
    Changed(ChangeReport),
    /// Release with no tenant: nothing to do.
    AlreadyReleased,
    /// A console key registered; its fingerprint.
    ConsoleRegistered(String),
    /// A secret stored.
    SecretStored(SecretEntry),
    /// A secret removed.
    SecretRemoved,
    /// The volume initialized.
    VolumeInitialized,
    /// A failed volume's record dropped: the device it named (None: there
    /// was no volume, nothing to do).
    VolumeForgotten(Option<String>),
    /// A boundary change applied.
    Boundary(BoundaryApplied),
    /// An engine deployed (stopped); `notes` say which budget limits it
    /// inherits (`limits.memory_max: not set, the tenant budget 1G
    /// applies`).
    EngineDeployed {
        /// Its status.
        status: EngineStatus,
        /// Budget notes.
        notes: Vec<String>,
    },
    /// An engine started, stopping, restarted or reloading: its status as
    /// the supervisor took the command.
    Engine(EngineStatus),
    /// An engine removed.
    EngineRemoved,
    /// The tenant budget recorded (and written, or why not).
    BudgetSet(BudgetApplied),
    /// A record signed: RSASSA-PKCS1-v1_5 SHA-256, base64.
    Signed {
        /// The signature.
        signature: String,
    },
    /// Every engine asked to stop (what stopped, what did not).
    EnginesStopped(StopReport),
    /// The corrective throttles recorded (and written, or why not).
    Throttled(ThrottleApplied),
}

/// Why a command failed. Nothing changed unless the variant says so.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The queue of changes is full.
    #[error("{0}")]
    Busy(String),
    /// A destroying command without confirmation.
    #[error("{0}")]
    ConfirmationRequired(String),
    /// Bad input; names the field.
    #[error("{field}: {reason}")]
    Invalid {
        /// Field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The key hierarchy refused or failed.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// A backend refused or failed.
    #[error("{what}: {source}")]
    Backend {
        /// Which backend and step.
        what: &'static str,
        /// Its error.
        #[source]
        source: Failure,
    },
    /// The controller has stopped (agent shutting down).
    #[error("the node controller has stopped")]
    Stopped,
}

impl NodeError {
    pub(crate) fn backend(what: &'static str) -> impl FnOnce(Failure) -> NodeError {
        move |source| NodeError::Backend { what, source }
    }
}

/// What reads are answered from. Replaced after every command.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Key status.
    pub status: Status,
    /// Public key and whether its holder made it, per level, widest first.
    pub keys: Vec<(PublicKeyInfo, bool)>,
    /// The receipt signing key.
    pub receipt_key: SigningKeyInfo,
    /// Set when the last refresh failed (the TPM or key thread is not
    /// answering): the rest is the last good state.
    pub stale: Option<String>,
}

impl Snapshot {
    /// `role`'s public key as `caller` may see it: a wider level sees a
    /// narrower level's key only until that level has made its own (R8).
    pub fn public_key_as(&self, caller: Role, role: Role) -> Result<PublicKeyInfo, KeyError> {
        let (pk, owned) = self
            .keys
            .iter()
            .find(|(k, _)| k.role == role)
            .ok_or(KeyError::NotAssigned)?;
        if caller < role && *owned {
            return Err(KeyError::NotPermitted {
                caller,
                action: "read this public key: its holder has made its own key pair",
            });
        }
        if caller > role {
            return Err(KeyError::NotPermitted {
                caller,
                action: "read this public key",
            });
        }
        Ok(pk.clone())
    }

    /// Key generation of each link of the disk-key chain, widest first.
    pub fn generations(&self) -> Vec<(String, u64)> {
        generations(&self.status)
    }
}

/// Key generation of each link of the disk-key chain in `st`, widest first.
pub fn generations(st: &Status) -> Vec<(String, u64)> {
    let mut g = vec![(Role::Landlord.to_string(), st.landlord.key_generation)];
    if let Some(t) = &st.tenant {
        g.push((Role::Tenant.to_string(), t.key_generation));
    }
    g
}

/// The wire name of a change kind ("rotate", "rekey", "assign", "release").
pub fn kind_name(k: leasehold_tpm::ChangeKind) -> &'static str {
    use leasehold_tpm::ChangeKind;
    match k {
        ChangeKind::Rotate => "rotate",
        ChangeKind::Rekey => "rekey",
        ChangeKind::Assign => "assign",
        ChangeKind::Release => "release",
    }
}

/// Caller input as shown in an error: at most [`ECHO_LIMIT`] characters.
pub fn shown(s: &str) -> String {
    if s.chars().count() <= ECHO_LIMIT {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(ECHO_LIMIT).collect();
    format!("{head:?}… ({} bytes)", s.len())
}

/// Checks a tenant, console or secret name.
pub fn check_name(field: &'static str, name: &str) -> Result<(), NodeError> {
    if leasehold_tpm::valid_name(name) {
        Ok(())
    } else {
        Err(NodeError::Invalid {
            field,
            reason: format!(
                "{}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with . or -)",
                shown(name)
            ),
        })
    }
}

/// `PutSecret`'s arguments: a valid name, an envelope within
/// [`MAX_ENVELOPE_BYTES`]. Run by the controller, and by the D-Bus handler
/// before the call waits in the queue (review: an oversized envelope was
/// held there until its turn, up to the bus's message size per call).
pub fn check_put_secret(name: &str, envelope: &[u8]) -> Result<(), NodeError> {
    check_name("name", name)?;
    if envelope.len() > MAX_ENVELOPE_BYTES {
        return Err(NodeError::Invalid {
            field: "envelope",
            reason: format!(
                "{} bytes; the limit is {MAX_ENVELOPE_BYTES} bytes",
                envelope.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_input_is_echoed_truncated() {
        let long = "x".repeat(1 << 20);
        let e = check_name("name", &long).unwrap_err().to_string();
        assert!(e.len() < 300, "{} bytes", e.len());
        assert!(e.starts_with("name: "), "{e}");
        assert!(e.contains("(1048576 bytes)"), "{e}");
        assert!(check_name("name", "db-password").is_ok());
    }
}
