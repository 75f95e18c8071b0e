//! The disk key's way into dm-crypt: a `logon` key in the agent's process
//! keyring. The kernel never hands a logon key's payload back to user space
//! (KEYCTL_READ is refused for the type), and the dm table names the key
//! (`:64:logon:leasehold:<id>`) instead of containing it, so neither
//! `dmsetup table --showkeys` nor /proc shows key bytes.
//!
//! dm-crypt copies the payload into its own kernel memory when the table is
//! loaded, so the agent invalidates the keyring key right after; it never
//! outlives the mapping (nor a crash of the agent: the process keyring dies
//! with the process).

use keyutils::keytypes::logon::{Description, Logon};
use keyutils::{Key, Keyring, SpecialKeyring};

use crate::{Result, StorageError};

/// Key type and subtype as the dm table names them.
pub const SUBTYPE: &str = "leasehold";

/// `leasehold:<name>`: the description of the logon key `name` (what a
/// dm table references).
pub fn description(name: &str) -> String {
    format!("{SUBTYPE}:{name}")
}

/// A logon key in this process's keyring; invalidated on drop.
#[derive(Debug)]
pub struct LogonKey {
    key: Option<Key>,
    description: String,
}

fn err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Keyring(e.to_string())
}

impl LogonKey {
    /// Adds `payload` as logon key `leasehold:<name>` to the process
    /// keyring (created if the process has none yet).
    pub fn add(name: &str, payload: &[u8]) -> Result<LogonKey> {
        let mut ring = Keyring::attach_or_create(SpecialKeyring::Process).map_err(err)?;
        let key = ring
            .add_key::<Logon, _, _>(
                Description {
                    subtype: SUBTYPE.into(),
                    description: name.to_owned().into(),
                },
                payload,
            )
            .map_err(err)?;
        Ok(LogonKey {
            key: Some(key),
            description: description(name),
        })
    }

    /// `leasehold:<name>`, as the dm table references it.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Removes the key from the kernel now.
    pub fn invalidate(mut self) -> Result<()> {
        match self.key.take() {
            Some(k) => k.invalidate().map_err(err),
            None => Ok(()),
        }
    }

    #[cfg(test)]
    fn read(&self) -> std::result::Result<Vec<u8>, String> {
        self.key
            .as_ref()
            .ok_or_else(|| "gone".to_owned())?
            .read()
            .map_err(|e| e.to_string())
    }
}

impl Drop for LogonKey {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            if let Err(e) = k.invalidate() {
                tracing::warn!(error = %e, key = %self.description, "cannot invalidate a keyring key");
            }
        }
    }
}

/// Whether a live key (not invalidated, revoked or dead) with this
/// description is in /proc/keys (which lists what the caller may view).
/// An invalidated key stays listed until the kernel's key collector runs.
pub fn listed(description: &str) -> bool {
    std::fs::read_to_string("/proc/keys")
        .map(|s| {
            s.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let live = f.get(1).is_some_and(|fl| !fl.contains(['i', 'R', 'D']));
                live && f.iter().any(|w| w.trim_end_matches(':') == description)
            })
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logon_key_cannot_be_read_back_and_is_gone_after_invalidate() {
        let name = format!("test-{}", std::process::id());
        let k = LogonKey::add(&name, &[7u8; 64]).unwrap();
        assert_eq!(k.description(), format!("leasehold:{name}"));
        assert!(listed(k.description()), "the key is listed in /proc/keys");
        let read = k.read();
        assert!(read.is_err(), "user space read a logon key: {read:?}");
        let d = k.description().to_owned();
        k.invalidate().unwrap();
        assert!(!listed(&d), "still listed after invalidate");
        // Dropping invalidates too.
        let k = LogonKey::add(&name, &[8u8; 64]).unwrap();
        let d = k.description().to_owned();
        drop(k);
        assert!(!listed(&d));
    }
}
