//! The tenant's secret store: payloads of envelopes the tenant sent, kept
//! under a key derived from the disk key (so every destroying rotation
//! erases them too). Values are never returned over D-Bus; engines get
//! them as files on a private tmpfs (`engines::TenantSecrets`).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use leasehold_tpm::SymmetricKey;
use rand::RngCore;

const MAGIC: &[u8; 5] = b"LHSS1";
const SUFFIX: &str = ".secret";

/// Metadata of a stored secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    pub stored_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("no secret named {0:?}")]
    NotFound(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encrypt the secret")]
    Crypto,
}

#[derive(Debug, Clone)]
pub struct SecretStore {
    dir: PathBuf,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SecretError + 'a {
    move |source| SecretError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl SecretStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{SUFFIX}"))
    }

    /// Encrypts and stores `payload` atomically. `name` must be valid
    /// (checked by the caller with `leasehold_tpm::valid_name`).
    pub fn put(
        &self,
        key: &SymmetricKey,
        name: &str,
        payload: &[u8],
    ) -> Result<Entry, SecretError> {
        if !self.dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(io("create", &self.dir))?;
        }
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let cipher =
            Aes256Gcm::new_from_slice(key.expose_secret()).map_err(|_| SecretError::Crypto)?;
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: payload,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Crypto)?;
        let mut bytes = Vec::with_capacity(MAGIC.len() + nonce.len() + ct.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&ct);
        let file = format!("{name}{SUFFIX}");
        crate::fsutil::write_atomic(&self.dir, &file, &bytes)
            .map_err(io("write", &self.path(name)))?;
        self.entry(name)
    }

    fn entry(&self, name: &str) -> Result<Entry, SecretError> {
        let path = self.path(name);
        let meta = fs::metadata(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SecretError::NotFound(name.to_owned()),
            _ => SecretError::Io {
                op: "stat",
                path: path.clone(),
                source: e,
            },
        })?;
        let overhead = (MAGIC.len() + 12 + 16) as u64;
        Ok(Entry {
            name: name.to_owned(),
            size: meta.len().saturating_sub(overhead),
            stored_at: meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs()),
        })
    }

    /// Names and sizes, sorted by name.
    pub fn list(&self) -> Result<Vec<Entry>, SecretError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("list", &self.dir)(e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(io("list", &self.dir))?;
            let Ok(fname) = e.file_name().into_string() else {
                continue;
            };
            if let Some(name) = fname.strip_suffix(SUFFIX) {
                if !name.starts_with('.') {
                    match self.entry(name) {
                        Ok(e) => out.push(e),
                        // Removed since the directory was read.
                        Err(SecretError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Decrypts a secret (for an engine's launch).
    pub fn get(
        &self,
        key: &SymmetricKey,
        name: &str,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, SecretError> {
        let path = self.path(name);
        let bytes = fs::read(&path).map_err(|_| SecretError::NotFound(name.to_owned()))?;
        if bytes.len() < MAGIC.len() + 12 + 16 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(SecretError::Crypto);
        }
        let (nonce, ct) = bytes[MAGIC.len()..].split_at(12);
        let cipher =
            Aes256Gcm::new_from_slice(key.expose_secret()).map_err(|_| SecretError::Crypto)?;
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: name.as_bytes(),
                },
            )
            .map(zeroize::Zeroizing::new)
            .map_err(|_| SecretError::Crypto)
    }

    /// Removes one secret, durably (the directory synced: a removal
    /// reported done does not come back after a power loss).
    pub fn remove(&self, name: &str) -> Result<(), SecretError> {
        self.unlink(name)?;
        self.sync_dir()
    }

    fn unlink(&self, name: &str) -> Result<(), SecretError> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SecretError::NotFound(name.to_owned()))
            }
            Err(e) => Err(io("remove", &path)(e)),
        }
    }

    fn sync_dir(&self) -> Result<(), SecretError> {
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &self.dir))
    }

    /// Removes every secret (after a destroying key change their key is gone
    /// anyway; this frees the space and the names), then syncs the
    /// directory once: the previous tenancy's names do not come back after
    /// a power loss.
    pub fn purge(&self) -> Result<usize, SecretError> {
        let entries = self.list()?;
        let mut n = 0;
        for e in &entries {
            match self.unlink(&e.name) {
                Ok(()) => n += 1,
                Err(SecretError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if n > 0 {
            self.sync_dir()?;
        }
        Ok(n)
    }
}

fn failure(e: SecretError) -> leasehold_node::Failure {
    use leasehold_node::{Failure, FailureKind};
    let kind = match &e {
        SecretError::NotFound(_) => FailureKind::NotFound,
        _ => FailureKind::Failed,
    };
    Failure::new(kind, e.to_string())
}

fn entry(e: Entry) -> leasehold_node::SecretEntry {
    leasehold_node::SecretEntry {
        name: e.name,
        size: e.size,
        stored_at: e.stored_at,
    }
}

impl leasehold_node::backend::SecretStore for SecretStore {
    fn put(
        &mut self,
        key: &SymmetricKey,
        name: &str,
        payload: &[u8],
    ) -> Result<leasehold_node::SecretEntry, leasehold_node::Failure> {
        SecretStore::put(self, key, name, payload)
            .map(entry)
            .map_err(failure)
    }
    fn remove(&mut self, name: &str) -> Result<(), leasehold_node::Failure> {
        SecretStore::remove(self, name).map_err(failure)
    }
    fn purge(&mut self) -> Result<usize, leasehold_node::Failure> {
        SecretStore::purge(self).map_err(failure)
    }
    fn list(&self) -> Result<Vec<leasehold_node::SecretEntry>, leasehold_node::Failure> {
        SecretStore::list(self)
            .map(|l| l.into_iter().map(entry).collect())
            .map_err(failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_list_get_remove() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::new(d.path().join("secrets"));
        let k = SymmetricKey::from_bytes([3; 32]);
        assert!(s.list().unwrap().is_empty());
        let e = s.put(&k, "db-password", b"hunter2").unwrap();
        assert_eq!(e.size, 7);
        assert_eq!(s.list().unwrap(), vec![e]);
        assert_eq!(&s.get(&k, "db-password").unwrap()[..], b"hunter2");
        // Ciphertext on disk, not the payload.
        let raw = fs::read(d.path().join("secrets/db-password.secret")).unwrap();
        assert!(!raw.windows(7).any(|w| w == b"hunter2"));
        // Another key cannot read it.
        assert!(s
            .get(&SymmetricKey::from_bytes([4; 32]), "db-password")
            .is_err());
        s.remove("db-password").unwrap();
        assert!(matches!(
            s.remove("db-password"),
            Err(SecretError::NotFound(_))
        ));
        s.put(&k, "a", b"1").unwrap();
        s.put(&k, "b", b"2").unwrap();
        assert_eq!(s.purge().unwrap(), 2);
        assert!(s.list().unwrap().is_empty());
    }
}
