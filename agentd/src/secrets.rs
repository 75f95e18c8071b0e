//! The tenant's secret store: payloads of envelopes the tenant sent, kept
//! under a key derived from the disk key (so every destroying rotation
//! erases them too). Values are never returned over D-Bus; engines get
//! them as files on a private tmpfs (`engines::TenantSecrets`).
//!
//! A file names the key it was stored under (a key id: 8 bytes of a
//! domain-separated SHA-256 of the key, which tells nothing of the key).
//! A destroying change purges the store after its TPM commit; an agent
//! killed in between leaves files under a key that is gone, and the next
//! start removes them by that id (`purge_stale`) rather than trying each.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use leasehold_tpm::SymmetricKey;
use rand::RngCore;

/// Files of the first format: magic, nonce, ciphertext (no key id). Still
/// read; `purge_stale` tells their key by trying to open them.
const MAGIC_V1: &[u8; 5] = b"LHSS1";
/// Magic, key id, nonce, ciphertext (with its 16-byte tag).
const MAGIC: &[u8; 5] = b"LHSS2";
const KEY_ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const SUFFIX: &str = ".secret";

/// Which key a file was stored under, without revealing the key.
fn key_id(key: &SymmetricKey) -> [u8; KEY_ID_LEN] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"leasehold/secret-store/key-id/v1\0");
    h.update(key.expose_secret());
    let d = h.finalize();
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&d[..KEY_ID_LEN]);
    id
}

/// A stored file's layout: where its nonce starts, and its key id (none in
/// the first format).
struct Layout {
    nonce_at: usize,
    key_id: Option<[u8; KEY_ID_LEN]>,
}

impl Layout {
    fn overhead(&self) -> usize {
        self.nonce_at + NONCE_LEN + TAG_LEN
    }

    /// From a file's first bytes; `None`: not a secret file of any format.
    fn of(head: &[u8]) -> Option<Layout> {
        let magic = head.get(..MAGIC.len())?;
        if magic == MAGIC_V1 {
            return Some(Layout {
                nonce_at: MAGIC_V1.len(),
                key_id: None,
            });
        }
        if magic != MAGIC {
            return None;
        }
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(head.get(MAGIC.len()..MAGIC.len() + KEY_ID_LEN)?);
        Some(Layout {
            nonce_at: MAGIC.len() + KEY_ID_LEN,
            key_id: Some(id),
        })
    }
}

/// The payload of a stored file under `key`, if it opens (its tag checks).
fn decrypt(
    key: &SymmetricKey,
    name: &str,
    bytes: &[u8],
    layout: &Layout,
) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let (nonce, ct) = bytes.get(layout.nonce_at..)?.split_at_checked(NONCE_LEN)?;
    let cipher = Aes256Gcm::new_from_slice(key.expose_secret()).ok()?;
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ct,
                aad: name.as_bytes(),
            },
        )
        .ok()
        .map(zeroize::Zeroizing::new)
}

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
    /// An I/O failure: `path` is the store's directory, never a secret's
    /// file, whose name is the tenant's (review: a failed purge put the
    /// names in the landlord's reply and journal).
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encrypt the secret")]
    Crypto,
    #[error("the secret {0:?} cannot be opened: it is damaged")]
    Damaged(String),
    #[error(
        "the secret {0:?} was stored under a key a destroying key change replaced; store it again"
    )]
    Stale(String),
    #[error("the secret {0:?} cannot be opened with the store's key (damaged, or stored under a key since replaced)")]
    Unopened(String),
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
        let mut nonce = [0u8; NONCE_LEN];
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
        let mut bytes = Vec::with_capacity(MAGIC.len() + KEY_ID_LEN + nonce.len() + ct.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&key_id(key));
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&ct);
        let file = format!("{name}{SUFFIX}");
        crate::fsutil::write_atomic(&self.dir, &file, &bytes)
            .map_err(io("write a file in", &self.dir))?;
        self.entry(name)
    }

    /// A file's layout and metadata (one open: its head and its size).
    /// Opens a stored file: non-blocking (a FIFO put there by hand must
    /// not hang the store); `None` for anything but a regular file (a
    /// directory must not fail every listing either).
    fn open_file(&self, name: &str) -> Result<(Option<fs::File>, fs::Metadata), SecretError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path(name);
        let failed = |e: std::io::Error, op| match e.kind() {
            std::io::ErrorKind::NotFound => SecretError::NotFound(name.to_owned()),
            _ => SecretError::Io {
                op,
                path: self.dir.clone(),
                source: e,
            },
        };
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| failed(e, "open a file in"))?;
        let meta = f.metadata().map_err(|e| failed(e, "stat a file in"))?;
        Ok((meta.is_file().then_some(f), meta))
    }

    /// A file's layout (none: not a secret file of a known format) and
    /// metadata, from one open.
    fn head(&self, name: &str) -> Result<(Option<Layout>, fs::Metadata), SecretError> {
        use std::io::Read;
        let (f, meta) = self.open_file(name)?;
        let Some(f) = f else {
            return Ok((None, meta));
        };
        let mut head = [0u8; MAGIC.len() + KEY_ID_LEN];
        let mut n = 0;
        let mut r = f.take(head.len() as u64);
        loop {
            match r.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(SecretError::Io {
                        op: "read a file in",
                        path: self.dir.clone(),
                        source: e,
                    })
                }
            }
        }
        Ok((Layout::of(&head[..n]), meta))
    }

    fn entry(&self, name: &str) -> Result<Entry, SecretError> {
        let (layout, meta) = self.head(name)?;
        let overhead = layout.map_or(MAGIC.len() + KEY_ID_LEN + NONCE_LEN + TAG_LEN, |l| {
            l.overhead()
        }) as u64;
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
        let (bytes, layout) = self.read_file(name)?;
        // Tried whatever the id says: damage in the id itself must not
        // make a good secret stale.
        decrypt(key, name, &bytes, &layout).ok_or_else(|| match layout.key_id {
            Some(id) if id != key_id(key) => SecretError::Stale(name.to_owned()),
            // Its key is the one given: the file is what failed.
            Some(_) => SecretError::Damaged(name.to_owned()),
            None => SecretError::Unopened(name.to_owned()),
        })
    }

    /// A stored file whole (at most the largest a payload makes), with its
    /// layout; `Damaged` if it has none or is larger.
    fn read_file(&self, name: &str) -> Result<(Vec<u8>, Layout), SecretError> {
        use std::io::Read;
        let most =
            leasehold_node::MAX_SECRET_PAYLOAD + MAGIC.len() + KEY_ID_LEN + NONCE_LEN + TAG_LEN;
        let (f, _) = self.open_file(name)?;
        let Some(f) = f else {
            return Err(SecretError::Damaged(name.to_owned()));
        };
        let mut bytes = Vec::new();
        f.take(most as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| SecretError::Io {
                op: "read a file in",
                path: self.dir.clone(),
                source: e,
            })?;
        match Layout::of(&bytes) {
            Some(l) if bytes.len() >= l.overhead() && bytes.len() <= most => Ok((bytes, l)),
            _ => Err(SecretError::Damaged(name.to_owned())),
        }
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
            Err(e) => Err(io("remove a file in", &self.dir)(e)),
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
    /// By the directory's names alone (a file that cannot be read is
    /// removed too), temp files of interrupted writes included (they hold
    /// a name of the tenancy); one that cannot be removed does not stop
    /// the others: the first error comes back once every file was tried.
    pub fn purge(&self) -> Result<usize, SecretError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io("list", &self.dir)(e)),
        };
        let mut files = Vec::new();
        for e in rd {
            let e = e.map_err(io("list", &self.dir))?;
            let Ok(fname) = e.file_name().into_string() else {
                continue;
            };
            let secret = fname.ends_with(SUFFIX) && !fname.starts_with('.');
            let temp = fname.starts_with('.') && fname.ends_with(&format!("{SUFFIX}.tmp"));
            if secret || temp {
                files.push(fname);
            }
        }
        if !files.is_empty() {
            crate::crashpoint::crash_point("secrets:purge");
        }
        let (mut n, mut first) = (0, None);
        for f in &files {
            match fs::remove_file(self.dir.join(f)) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    first.get_or_insert(io("remove a file in", &self.dir)(e));
                }
            }
        }
        if n > 0 {
            self.sync_dir()?;
        }
        match first {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Unlinks each named secret (one gone meanwhile is not counted), then
    /// syncs the directory once if any went; returns how many.
    fn unlink_synced<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<usize, SecretError> {
        let mut n = 0;
        for name in names {
            match self.unlink(name) {
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

    /// Removes the secrets stored under another key than `key` (the store's
    /// key now): what a destroying change left when the agent was killed
    /// between its TPM commit and its purge. Their key is gone; they could
    /// only fail launches and hold names and room against the caps. A file
    /// under `key` stays, damaged or not; so does a file of no known format
    /// (not ours to judge). First-format files, which name no key, go if
    /// `key` cannot open them.
    pub fn purge_stale(&self, key: &SymmetricKey) -> Result<usize, SecretError> {
        let current = key_id(key);
        let mut stale_names = Vec::new();
        // By name: one file that cannot be read is kept, and does not keep
        // the others from their purge (review).
        let names = match fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|f| {
                    f.strip_suffix(SUFFIX)
                        .filter(|n| !n.starts_with('.'))
                        .map(str::to_owned)
                })
                .collect::<Vec<String>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io("list", &self.dir)(e)),
        };
        for name in names {
            let stale = match self.head(&name) {
                Ok((
                    Some(Layout {
                        key_id: Some(id), ..
                    }),
                    _,
                )) if id == current => false,
                // Another key's id (or damage in the id itself), or the
                // first format: stale only if the store's key cannot open
                // it (read whole only then).
                Ok((Some(_), _)) => matches!(
                    self.get(key, &name),
                    Err(SecretError::Stale(_) | SecretError::Unopened(_))
                ),
                Ok((None, _)) | Err(_) => false,
            };
            if stale {
                stale_names.push(name);
            }
        }
        self.unlink_synced(stale_names.iter().map(String::as_str))
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
    fn purge_stale(&mut self, key: &SymmetricKey) -> Result<usize, leasehold_node::Failure> {
        SecretStore::purge_stale(self, key).map_err(failure)
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

    /// A first-format file (no key id), as an agent before the key id wrote.
    fn put_v1(s: &SecretStore, key: &SymmetricKey, name: &str, payload: &[u8]) {
        let nonce = [9u8; NONCE_LEN];
        let ct = Aes256Gcm::new_from_slice(key.expose_secret())
            .unwrap()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: payload,
                    aad: name.as_bytes(),
                },
            )
            .unwrap();
        let mut bytes = MAGIC_V1.to_vec();
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&ct);
        fs::write(s.path(name), bytes).unwrap();
    }

    #[test]
    fn secrets_of_a_replaced_key_are_told_and_purged_the_rest_kept() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::new(d.path().join("secrets"));
        let (old, new) = (
            SymmetricKey::from_bytes([3; 32]),
            SymmetricKey::from_bytes([4; 32]),
        );
        s.put(&old, "old-a", b"1").unwrap();
        s.put(&old, "old-b", b"22").unwrap();
        put_v1(&s, &old, "old-v1", b"333");
        s.put(&new, "new-a", b"4444").unwrap();
        put_v1(&s, &new, "new-v1", b"55555");
        // Damaged under the current key: kept (not a key change's leftover).
        s.put(&new, "new-bad", b"666666").unwrap();
        let bad = s.path("new-bad");
        let mut raw = fs::read(&bad).unwrap();
        *raw.last_mut().unwrap() ^= 1;
        fs::write(&bad, raw).unwrap();
        // Damage in the key id of a file under the current key: it still
        // opens, so it is neither stale nor removed.
        s.put(&new, "new-id-bit", b"7777777").unwrap();
        let hit = s.path("new-id-bit");
        let mut raw = fs::read(&hit).unwrap();
        raw[MAGIC.len()] ^= 0x80;
        fs::write(&hit, raw).unwrap();
        // Not a secret file of any format: kept.
        fs::write(s.path("foreign"), b"not ours").unwrap();
        let sizes: Vec<(String, u64)> = s
            .list()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.size))
            .collect();
        let want = [
            ("foreign", 0),
            ("new-a", 4),
            ("new-bad", 6),
            ("new-id-bit", 7),
            ("new-v1", 5),
            ("old-a", 1),
            ("old-b", 2),
            ("old-v1", 3),
        ];
        assert_eq!(
            sizes,
            want.map(|(n, z)| (n.to_owned(), z)).to_vec(),
            "sizes of both formats"
        );
        assert!(matches!(s.get(&new, "old-a"), Err(SecretError::Stale(_))));
        assert!(matches!(
            s.get(&new, "new-bad"),
            Err(SecretError::Damaged(_))
        ));
        assert!(matches!(
            s.get(&new, "old-v1"),
            Err(SecretError::Unopened(_))
        ));
        assert!(matches!(
            s.get(&new, "foreign"),
            Err(SecretError::Damaged(_))
        ));
        assert_eq!(&s.get(&new, "new-v1").unwrap()[..], b"55555");
        assert_eq!(&s.get(&new, "new-id-bit").unwrap()[..], b"7777777");

        assert_eq!(s.purge_stale(&new).unwrap(), 3);
        let left: Vec<String> = s.list().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(
            left,
            ["foreign", "new-a", "new-bad", "new-id-bit", "new-v1"]
        );
        assert_eq!(&s.get(&new, "new-a").unwrap()[..], b"4444");
        // Again: nothing more (the same key's files are never stale).
        assert_eq!(s.purge_stale(&new).unwrap(), 0);
        // An empty or missing store.
        let e = SecretStore::new(d.path().join("none"));
        assert_eq!(e.purge_stale(&new).unwrap(), 0);
    }

    #[test]
    fn a_directory_or_fifo_under_a_secret_name_neither_fails_nor_hangs_the_store() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::new(d.path().to_owned());
        let k = SymmetricKey::from_bytes([3; 32]);
        s.put(&k, "good", b"1").unwrap();
        fs::create_dir(s.path("dir")).unwrap();
        nix::unistd::mkfifo(
            &s.path("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let names: Vec<String> = s.list().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["dir", "fifo", "good"]);
        assert!(matches!(s.get(&k, "fifo"), Err(SecretError::Damaged(_))));
        assert!(matches!(s.get(&k, "dir"), Err(SecretError::Damaged(_))));
        assert_eq!(s.purge_stale(&k).unwrap(), 0);
        assert_eq!(&s.get(&k, "good").unwrap()[..], b"1");
    }

    /// The store's failures never name a secret (its name is the
    /// tenant's, and they reach the landlord's reply and journal); a
    /// failed write leaves no temp file; purge removes by name what it
    /// finds, temp files included, past a file it cannot remove.
    #[test]
    fn failures_name_no_secret_and_purge_takes_every_file() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::new(d.path().to_owned());
        let k = SymmetricKey::from_bytes([3; 32]);
        s.put(&k, "good", b"1").unwrap();
        // A non-empty directory where the file goes: the rename fails.
        fs::create_dir(s.path("db-password")).unwrap();
        fs::write(s.path("db-password").join("x"), b"").unwrap();
        let e = s
            .put(&k, "db-password", b"hunter2")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("db-password"), "{e}");
        assert!(
            !d.path().join(".db-password.secret.tmp").exists(),
            "temp file left"
        );
        // A kill mid-write leaves one: purge takes it, and the rest, and
        // says it could not remove the directory without naming it.
        fs::write(d.path().join(".api-token.secret.tmp"), b"ciphertext").unwrap();
        fs::write(d.path().join("unknown-format.secret"), b"not ours").unwrap();
        let e = s.purge().unwrap_err().to_string();
        assert!(!e.contains("db-password"), "{e}");
        let left: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["db-password.secret"], "everything else removed");
    }

    #[test]
    fn the_key_id_names_the_key_and_reveals_nothing_of_it() {
        let k = SymmetricKey::from_bytes([3; 32]);
        assert_eq!(key_id(&k), key_id(&SymmetricKey::from_bytes([3; 32])));
        assert_ne!(key_id(&k), key_id(&SymmetricKey::from_bytes([4; 32])));
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::new(d.path().to_owned());
        s.put(&k, "x", b"payload").unwrap();
        let raw = fs::read(s.path("x")).unwrap();
        assert_eq!(&raw[..MAGIC.len()], MAGIC);
        assert_eq!(&raw[MAGIC.len()..MAGIC.len() + KEY_ID_LEN], key_id(&k));
        assert!(!raw.windows(8).any(|w| w == [3u8; 8]), "key bytes on disk");
    }
}
