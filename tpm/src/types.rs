//! Small types shared across the crate: roles, secrets, public keys.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// A management level. Ordered from the widest powers to the narrowest; a
/// sub-tenant level (R12) would be added after `Tenant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The party that owns and operates the node.
    Landlord,
    /// The party that rents the node.
    Tenant,
}

impl Role {
    /// Both roles, widest first.
    pub const ALL: [Role; 2] = [Role::Landlord, Role::Tenant];

    /// Lower-case name, used in file names, logs and the disk-key info.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Landlord => "landlord",
            Role::Tenant => "tenant",
        }
    }

    /// Index used to place this role's NV secrets in the NV handle range.
    pub(crate) fn index(self) -> u32 {
        match self {
            Role::Landlord => 0,
            Role::Tenant => 1,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "landlord" => Ok(Role::Landlord),
            "tenant" => Ok(Role::Tenant),
            other => Err(format!(
                "unknown role {other:?} (expected landlord or tenant)"
            )),
        }
    }
}

/// Whether the caller explicitly confirmed an operation that destroys data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// The caller did not confirm; destroying operations are refused.
    No,
    /// The caller confirmed that data under the current keys may be destroyed.
    DestroyData,
}

macro_rules! secret_newtype {
    ($(#[$doc:meta])* $vis:vis $name:ident, $len:expr) => {
        $(#[$doc])*
        // No Clone (one owner of key material at a time) and no PartialEq
        // (`==` on byte arrays is not constant-time): see `ct_eq`.
        #[derive(Zeroize, ZeroizeOnDrop)]
        $vis struct $name([u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// Wraps raw bytes. The caller's copy should be zeroized; prefer
            /// [`Self::from_zeroizing`].
            #[allow(dead_code)] // not every kind of secret needs every method
            pub fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            /// Copies the bytes out of a zeroizing buffer, which wipes its own
            /// copy when dropped: no stray copy is left on the stack.
            pub fn from_zeroizing(bytes: &Zeroizing<[u8; $len]>) -> Self {
                let mut out = Self([0u8; $len]);
                out.0.copy_from_slice(&bytes[..]);
                out
            }

            /// The key bytes. This is the one way to reach them.
            pub fn expose_secret(&self) -> &[u8; $len] {
                &self.0
            }

            /// Constant-time equality (the time taken does not depend on
            /// where the keys differ).
            #[allow(dead_code)]
            pub fn ct_eq(&self, other: &Self) -> bool {
                bool::from(subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret_newtype!(
    /// A 256-bit symmetric key of one level (KL, KT, ...).
    pub SymmetricKey,
    32
);
secret_newtype!(
    /// The 512-bit dm-crypt key for aes-xts-plain64.
    pub DiskKey,
    64
);
secret_newtype!(
    /// A per-generation secret held in a TPM NV index. Keys of that
    /// generation depend on it, so undefining the index erases them.
    pub(crate) GenerationSecret,
    32
);

/// A role's public key as handed to consoles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeyInfo {
    /// Whose key.
    pub role: Role,
    /// Pair generation (incremented by every rotation or re-key).
    pub generation: u64,
    /// SubjectPublicKeyInfo PEM.
    pub pem: String,
    /// SHA-256 of the SubjectPublicKeyInfo DER, lower-case hex.
    pub fingerprint: String,
}

/// The node signing key's public half: what a verifier of erase receipts
/// needs. Unlike [`PublicKeyInfo`] it belongs to no role and has no
/// generation: it stays the same for the node's lifetime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKeyInfo {
    /// SubjectPublicKeyInfo PEM of the RSA-2048 key.
    pub pem: String,
    /// SHA-256 of the SubjectPublicKeyInfo DER, lower-case hex.
    pub fingerprint: String,
}

/// What kind of TPM the node uses. A software TPM gives no hardware
/// protection and is reported as such everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TpmKind {
    /// A TPM chip or firmware TPM.
    Hardware,
    /// swtpm or another emulator.
    Software,
}

impl fmt::Display for TpmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TpmKind::Hardware => "hardware TPM",
            TpmKind::Software => "software TPM",
        })
    }
}
