//! The state directory: a manifest naming the current key blobs, and the
//! blobs. Writes are atomic (temp file, fsync, rename, fsync dir); a key set
//! is switched by replacing the manifest, so a crash leaves the old or the
//! new set, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{KeyError, Result};
use crate::hierarchy::MAX_CONSOLES;
use crate::types::Role;

/// Manifest format this build writes. Format 2 added the node signing key;
/// format 3 the epoch and the change intent; format 4 the standby generation
/// of a level; format 5 the attestation key. Formats 1 to 4 are still read
/// and upgraded at open. An older build refuses a newer format by its
/// version rather than by the unknown field (or, for a standby, by its
/// unexplained NV index). `attestation` is not refused in older formats:
/// the key is checked against the TPM at open whatever the format says.
pub(crate) const FORMAT: u32 = 5;
/// First format with `epoch` and `intent`.
pub(crate) const EPOCH_FORMAT: u32 = 3;
/// First format with `standby`.
pub(crate) const STANDBY_FORMAT: u32 = 4;
/// Oldest manifest format this build reads.
pub(crate) const MIN_FORMAT: u32 = 1;
const MANIFEST: &str = "keys.json";
const BLOB_SUFFIXES: [&str; 3] = [".pair", ".sealed", ".tmp"];

/// The current key set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub format: u32,
    /// Random node id, hex; part of the disk-key derivation.
    pub node_id: String,
    /// Hash of the TPM storage primary's public area: the TPM this state belongs to.
    pub tpm_id: String,
    pub landlord: LevelState,
    pub tenant: Option<LevelState>,
    #[serde(default)]
    pub consoles: Vec<ConsoleKey>,
    /// The node signing key (erase receipts). Absent in format 1 manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<SigningKeyState>,
    /// The attestation key (restricted signing key for quotes): same shape
    /// as the signing key, its own blob. Absent before quotes existed; the
    /// agent then makes it at the next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<SigningKeyState>,
    /// Format 2 only: set while a destroying rotation of this level ran.
    /// Format 3 records that in `intent`; this build never writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasing: Option<Role>,
    /// Value of the TPM epoch counter this manifest goes with (format 3).
    /// Each write sets it to counter + 1 and then increments the counter, so
    /// an older copy of the directory no longer matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// The change under way, recorded before the TPM is touched: the only
    /// NV indices the agent may define or undefine beyond those named above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Intent>,
}

/// What an intent is for (logs and checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum IntentKind {
    /// Destroying rotation: the intent itself commits the erase.
    Rotate,
    /// Re-key.
    Rekey,
    /// Assignment (over an existing tenant or not).
    Assign,
    /// Release.
    Release,
    /// Upgrade of a manifest without an epoch: defines the epoch counter.
    Migrate,
    /// First start: the manifest has no landlord level yet (generation 0).
    Init,
    /// Making a level's standby generation (and discarding a stale one).
    Standby,
}

impl IntentKind {
    /// Its name in errors and logs (as in the manifest).
    pub fn as_str(self) -> &'static str {
        match self {
            IntentKind::Rotate => "rotate",
            IntentKind::Rekey => "rekey",
            IntentKind::Assign => "assign",
            IntentKind::Release => "release",
            IntentKind::Migrate => "migrate",
            IntentKind::Init => "init",
            IntentKind::Standby => "standby",
        }
    }
}

/// A change recorded in the manifest before the TPM is touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Intent {
    pub kind: IntentKind,
    /// Whose keys (`Migrate`: landlord).
    pub role: Role,
    /// NV indices the change defines.
    pub creates: Vec<u32>,
    /// NV indices the change undefines once committed (for `Rotate`: at once).
    pub retires: Vec<u32>,
}

impl Intent {
    /// Indices the intent explains.
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.creates.iter().chain(&self.retires).copied()
    }
}

impl Manifest {
    pub fn level(&self, role: Role) -> Option<&LevelState> {
        match role {
            Role::Landlord => Some(&self.landlord),
            Role::Tenant => self.tenant.as_ref(),
        }
    }

    pub fn level_mut(&mut self, role: Role) -> Option<&mut LevelState> {
        match role {
            Role::Landlord => Some(&mut self.landlord),
            Role::Tenant => self.tenant.as_mut(),
        }
    }

    /// Whether `role` may register console `name`: always when it has that
    /// name (the key is replaced), else while it has fewer than
    /// [`MAX_CONSOLES`]. A manifest from before the cap may hold more; it
    /// is not refused, only its new names are.
    pub fn check_console_room(&self, role: Role, name: &str) -> Result<()> {
        let mut count = 0;
        for c in self.consoles.iter().filter(|c| c.role == role) {
            if c.name == name {
                return Ok(());
            }
            count += 1;
        }
        if count >= MAX_CONSOLES {
            return Err(KeyError::TooManyConsoles {
                role,
                count,
                max: MAX_CONSOLES,
            });
        }
        Ok(())
    }

    fn levels(&self) -> impl Iterator<Item = &LevelState> {
        std::iter::once(&self.landlord).chain(self.tenant.as_ref())
    }

    /// Blob files the manifest refers to (levels, their standbys, signing key).
    pub fn files(&self) -> Vec<String> {
        let mut v = Vec::new();
        for l in self.levels() {
            v.push(l.pair_file.clone());
            v.push(l.sealed_file.clone());
            if let Some(s) = &l.standby {
                v.push(s.pair_file.clone());
                v.push(s.sealed_file.clone());
            }
        }
        for k in self.signing.iter().chain(&self.attestation) {
            v.push(k.key_file.clone());
        }
        v
    }

    /// NV indices the manifest refers to (levels and their standbys).
    pub fn nv_indices(&self) -> Vec<u32> {
        let mut v = Vec::new();
        for l in self.levels() {
            v.push(l.nv_index);
            if let Some(s) = &l.standby {
                v.push(s.nv_index);
            }
        }
        v
    }
}

/// One level's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LevelState {
    /// Key-pair generation: incremented by every rotation and re-key.
    pub generation: u64,
    /// Symmetric-key generation: incremented only when the key is replaced.
    pub key_generation: u64,
    /// NV index holding this generation's secret.
    pub nv_index: u32,
    pub pair_file: String,
    pub sealed_file: String,
    pub public_pem: String,
    pub fingerprint: String,
    /// PCRs the sealed key is bound to (empty: none).
    #[serde(default)]
    pub seal_pcrs: Vec<u8>,
    /// Name the level's holder was given (the tenant's name at assignment).
    #[serde(default)]
    pub name: Option<String>,
    /// Set once the holder made its own pair (tenant rotation or re-key by
    /// the tenant): from then on only the holder is given the public key (R8).
    #[serde(default)]
    pub owned: bool,
    /// The next generation, made ahead of time so that a destroying
    /// rotation only has to promote it (format 4; absent before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbyState>,
}

/// A level's next generation, complete in the TPM and on disk but not in
/// use: generation and key generation one above the level's, a fresh pair
/// and a fresh random symmetric key. Its public key is never handed out
/// before it is promoted (R8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StandbyState {
    pub generation: u64,
    pub key_generation: u64,
    pub nv_index: u32,
    pub pair_file: String,
    pub sealed_file: String,
    pub public_pem: String,
    pub fingerprint: String,
    #[serde(default)]
    pub seal_pcrs: Vec<u8>,
}

impl StandbyState {
    /// Keeps a freshly made generation as a standby.
    pub fn from_level(l: LevelState) -> Self {
        Self {
            generation: l.generation,
            key_generation: l.key_generation,
            nv_index: l.nv_index,
            pair_file: l.pair_file,
            sealed_file: l.sealed_file,
            public_pem: l.public_pem,
            fingerprint: l.fingerprint,
            seal_pcrs: l.seal_pcrs,
        }
    }

    /// The level it becomes, carrying over the holder's name and ownership.
    pub fn promote(self, name: Option<String>, owned: bool) -> LevelState {
        LevelState {
            generation: self.generation,
            key_generation: self.key_generation,
            nv_index: self.nv_index,
            pair_file: self.pair_file,
            sealed_file: self.sealed_file,
            public_pem: self.public_pem,
            fingerprint: self.fingerprint,
            seal_pcrs: self.seal_pcrs,
            name,
            owned,
            standby: None,
        }
    }
}

/// The node signing key. It depends on no generation secret, so it stays
/// the same across every rotation, re-key, assignment and release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SigningKeyState {
    /// Blob file (TPM2B_PUBLIC and TPM2B_PRIVATE) in the state directory.
    pub key_file: String,
    pub public_pem: String,
    /// SHA-256 of the SubjectPublicKeyInfo DER, lower-case hex.
    pub fingerprint: String,
}

/// A console's registered public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsoleKey {
    pub role: Role,
    pub name: String,
    pub pem: String,
    pub fingerprint: String,
}

/// A TPM object as stored: marshalled public area and private blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Blob {
    #[serde(with = "b64")]
    pub public: Vec<u8>,
    #[serde(with = "b64")]
    pub private: Vec<u8>,
}

mod b64 {
    use super::*;
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    root: PathBuf,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> KeyError + 'a {
    move |source| KeyError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Opens an existing state file for reading without following a link.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
}

fn is_eloop(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32)
}

/// Reads a state file; a symbolic link in its place is refused.
fn read_nofollow(path: &Path, op: &'static str) -> Result<Option<Vec<u8>>> {
    let mut f = match open_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if is_eloop(&e) => {
            return Err(KeyError::SymlinkInState {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(op, path)(e)),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(io_err(op, path))?;
    Ok(Some(bytes))
}

impl StateDir {
    /// Looks at the directory without changing anything: it may be missing
    /// (see [`Self::prepare`]); a symbolic link or a non-directory is refused.
    pub fn new(root: &Path) -> Result<Self> {
        match fs::symlink_metadata(root) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat state directory", root)(e)),
            Ok(meta) if meta.file_type().is_symlink() => {
                // A link can be re-pointed under the agent (and a typo'd
                // target looks like a first start): bind-mount instead.
                return Err(KeyError::SymlinkInState {
                    path: root.to_path_buf(),
                });
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(KeyError::CorruptState {
                    path: root.to_path_buf(),
                    reason: "not a directory".into(),
                })
            }
            Ok(_) => {}
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Creates the directory (0700) if missing and restricts its mode.
    /// Called only once the state has been found consistent.
    pub fn prepare(&self) -> Result<()> {
        let root = &self.root;
        if fs::symlink_metadata(root).is_err() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(io_err("create state directory", root))?;
        }
        let meta = fs::symlink_metadata(root).map_err(io_err("stat state directory", root))?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(root, fs::Permissions::from_mode(0o700))
                .map_err(io_err("restrict permissions of", root))?;
        }
        Ok(())
    }

    /// Opens or creates the directory with mode 0700.
    #[cfg(test)]
    pub fn open(root: &Path) -> Result<Self> {
        let d = Self::new(root)?;
        d.prepare()?;
        Ok(d)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.path(MANIFEST)
    }

    /// Names in the directory (none if it does not exist).
    pub fn entries(&self) -> Result<Vec<String>> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &self.root)(e)),
        };
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(io_err("list", &self.root))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    /// Key blob and temp files in the directory.
    pub fn blob_files(&self) -> Result<Vec<String>> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|n| BLOB_SUFFIXES.iter().any(|s| n.ends_with(s)))
            .collect())
    }

    /// The manifest; `None` if the directory or `keys.json` does not exist.
    /// A link in its place is refused (it is not a first start).
    pub fn read_manifest(&self) -> Result<Option<Manifest>> {
        let path = self.manifest_path();
        let Some(bytes) = read_nofollow(&path, "read")? else {
            return Ok(None);
        };
        // Check the version before the shape, so a newer format gets the right error.
        #[derive(Deserialize)]
        struct Version {
            format: u32,
        }
        let v: Version = serde_json::from_slice(&bytes).map_err(|e| KeyError::CorruptState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if v.format > FORMAT {
            return Err(KeyError::UnsupportedStateFormat {
                path,
                found: v.format,
                supported: FORMAT,
            });
        }
        if v.format < MIN_FORMAT {
            return Err(KeyError::CorruptState {
                path,
                reason: format!("unknown format version {}", v.format),
            });
        }
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| KeyError::CorruptState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // The fields belong to their formats: a mix is not something we wrote.
        let modern = m.format >= EPOCH_FORMAT;
        let standby = m.levels().any(|l| l.standby.is_some());
        if (!modern && (m.epoch.is_some() || m.intent.is_some()))
            || (modern && m.erasing.is_some())
            || (m.format < STANDBY_FORMAT && standby)
        {
            return Err(KeyError::CorruptState {
                path,
                reason: format!("fields of another format in a format {} manifest", m.format),
            });
        }
        Ok(Some(m))
    }

    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(m).map_err(|e| KeyError::CorruptState {
            path: self.manifest_path(),
            reason: e.to_string(),
        })?;
        self.write_atomic(MANIFEST, &bytes)
    }

    pub fn write_blob(&self, name: &str, blob: &Blob) -> Result<()> {
        let bytes = serde_json::to_vec(blob).map_err(|e| KeyError::CorruptState {
            path: self.path(name),
            reason: e.to_string(),
        })?;
        self.write_atomic(name, &bytes)
    }

    pub fn read_blob(&self, name: &str) -> Result<Blob> {
        let path = self.path(name);
        let bytes = read_nofollow(&path, "read key blob")?.ok_or_else(|| KeyError::Io {
            op: "read key blob",
            path: path.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| KeyError::CorruptState {
            path,
            reason: e.to_string(),
        })
    }

    /// temp file (0600, created anew: never through a link) → write → fsync
    /// → rename (replaces a link in place of `name`, never its target) →
    /// fsync directory.
    fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.path(&format!("{name}.tmp"));
        let dst = self.path(name);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale", &tmp)(e)),
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &dst).map_err(io_err("rename into place", &dst))?;
        self.sync_dir()
    }

    pub fn sync_dir(&self) -> Result<()> {
        File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", &self.root))
    }

    /// Overwrites a regular file with zeros, fsyncs, and unlinks it. Best
    /// effort on the overwrite (flash translation layers may keep old pages;
    /// the TPM NV secret is what makes the erase real). Works on the entry
    /// itself: a link is unlinked, never its target overwritten.
    pub fn shred(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        let meta = match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("stat", &path)(e)),
            Ok(meta) => meta,
        };
        if meta.is_dir() {
            tracing::warn!(path = %path.display(), "not removing a directory with a key-file name");
            return Ok(());
        }
        if meta.is_file() {
            let len = usize::try_from(meta.len())
                .unwrap_or(usize::MAX)
                .min(1 << 20);
            // O_NOFOLLOW: the entry could have been swapped for a link since the stat.
            let mut f = OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&path)
                .map_err(io_err("open for overwrite", &path))?;
            f.write_all(&vec![0u8; len])
                .map_err(io_err("overwrite", &path))?;
            f.sync_all().map_err(io_err("fsync", &path))?;
        }
        fs::remove_file(&path).map_err(io_err("unlink", &path))?;
        self.sync_dir()
    }

    /// Shreds blob files and temp files that `keep` does not name: leftovers
    /// of an interrupted change.
    pub fn collect_garbage(&self, keep: &[String]) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for name in self.blob_files()? {
            if !keep.contains(&name) {
                self.shred(&name)?;
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT,
            node_id: "00".into(),
            tpm_id: "t".into(),
            landlord: LevelState {
                generation: 1,
                key_generation: 1,
                nv_index: 0x014c4801,
                pair_file: "landlord-g1.pair".into(),
                sealed_file: "landlord-g1.sealed".into(),
                public_pem: "pem".into(),
                fingerprint: "fp".into(),
                seal_pcrs: vec![],
                name: None,
                owned: false,
                standby: None,
            },
            tenant: None,
            consoles: vec![],
            signing: Some(SigningKeyState {
                key_file: "signing.pair".into(),
                public_pem: "pem".into(),
                fingerprint: "fp".into(),
            }),
            attestation: Some(SigningKeyState {
                key_file: "attest.pair".into(),
                public_pem: "pem".into(),
                fingerprint: "fp2".into(),
            }),
            erasing: None,
            epoch: Some(7),
            intent: None,
        }
    }

    #[test]
    fn manifest_round_trip_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("state");
        let s = StateDir::open(&root).unwrap();
        assert_eq!(
            fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(s.read_manifest().unwrap().is_none());
        s.write_manifest(&sample()).unwrap();
        assert_eq!(s.read_manifest().unwrap().unwrap(), sample());
        assert_eq!(
            fs::metadata(s.manifest_path())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }

    #[test]
    fn newer_format_is_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        fs::write(s.manifest_path(), br#"{"format": 7}"#).unwrap();
        assert!(matches!(
            s.read_manifest(),
            Err(KeyError::UnsupportedStateFormat { found: 7, .. })
        ));
        fs::write(s.manifest_path(), b"{").unwrap();
        assert!(matches!(
            s.read_manifest(),
            Err(KeyError::CorruptState { .. })
        ));
    }

    #[test]
    fn format_1_manifest_without_signing_key_loads() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let mut v = serde_json::to_value(sample()).unwrap();
        v["format"] = 1.into();
        v.as_object_mut().unwrap().remove("signing");
        v.as_object_mut().unwrap().remove("attestation");
        v.as_object_mut().unwrap().remove("epoch");
        fs::write(s.manifest_path(), v.to_string()).unwrap();
        let m = s.read_manifest().unwrap().unwrap();
        assert_eq!(m.format, 1);
        assert!(m.signing.is_none());
        assert_eq!(m.files(), vec!["landlord-g1.pair", "landlord-g1.sealed"]);
        // Unknown fields are still refused.
        v["surprise"] = true.into();
        fs::write(s.manifest_path(), v.to_string()).unwrap();
        assert!(matches!(
            s.read_manifest(),
            Err(KeyError::CorruptState { .. })
        ));
        v.as_object_mut().unwrap().remove("surprise");
        v["format"] = 0.into();
        fs::write(s.manifest_path(), v.to_string()).unwrap();
        assert!(matches!(
            s.read_manifest(),
            Err(KeyError::CorruptState { .. })
        ));
    }

    #[test]
    fn manifest_names_the_signing_key_blob() {
        let m = sample();
        assert!(m.files().contains(&"signing.pair".to_string()));
        assert!(m.files().contains(&"attest.pair".to_string()));
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"signing\""), "{text}");
    }

    #[test]
    fn garbage_collection_keeps_named_files() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let blob = Blob {
            public: vec![1],
            private: vec![2],
        };
        s.write_blob("a.pair", &blob).unwrap();
        s.write_blob("b.pair", &blob).unwrap();
        fs::write(s.path("other.txt"), b"x").unwrap();
        let removed = s.collect_garbage(&["a.pair".into()]).unwrap();
        assert_eq!(removed, vec!["b.pair".to_string()]);
        assert!(s.path("a.pair").exists());
        assert!(s.path("other.txt").exists());
    }

    #[test]
    fn links_are_never_followed() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(&d.path().join("state")).unwrap();
        let outside = d.path().join("outside.pair");
        fs::write(&outside, b"precious").unwrap();

        // keys.json as a link, dangling or not: refused, not a first start.
        symlink(d.path().join("nowhere"), s.manifest_path()).unwrap();
        assert!(matches!(
            s.read_manifest(),
            Err(KeyError::SymlinkInState { .. })
        ));
        fs::remove_file(s.manifest_path()).unwrap();
        symlink(&outside, s.manifest_path()).unwrap();
        assert!(matches!(
            s.read_manifest(),
            Err(KeyError::SymlinkInState { .. })
        ));
        // A blob as a link is refused on read.
        symlink(&outside, s.path("x.pair")).unwrap();
        assert!(matches!(
            s.read_blob("x.pair"),
            Err(KeyError::SymlinkInState { .. })
        ));
        // Writing replaces the link itself; the target is untouched.
        s.write_manifest(&sample()).unwrap();
        assert!(!fs::symlink_metadata(s.manifest_path())
            .unwrap()
            .file_type()
            .is_symlink());
        // A temp file planted as a link is removed, not written through.
        symlink(&outside, s.path("keys.json.tmp")).unwrap();
        s.write_manifest(&sample()).unwrap();
        // Shred and garbage collection unlink links, never their targets.
        symlink(&outside, s.path("y.sealed")).unwrap();
        s.shred("x.pair").unwrap();
        assert!(fs::symlink_metadata(s.path("x.pair")).is_err());
        let removed = s.collect_garbage(&[]).unwrap();
        assert_eq!(removed, vec!["y.sealed".to_string()]);
        assert_eq!(fs::read(&outside).unwrap(), b"precious");
    }

    #[test]
    fn state_dir_as_link_is_refused_and_nothing_is_created() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        fs::create_dir(&real).unwrap();
        symlink(&real, d.path().join("link")).unwrap();
        assert!(matches!(
            StateDir::new(&d.path().join("link")),
            Err(KeyError::SymlinkInState { .. })
        ));
        let missing = StateDir::new(&d.path().join("missing")).unwrap();
        assert!(missing.read_manifest().unwrap().is_none());
        assert!(missing.entries().unwrap().is_empty());
        assert!(!d.path().join("missing").exists());
    }

    fn with_standby() -> Manifest {
        let mut m = sample();
        m.landlord.standby = Some(StandbyState {
            generation: 2,
            key_generation: 2,
            nv_index: 0x014c4802,
            pair_file: "landlord-g2.pair".into(),
            sealed_file: "landlord-g2.sealed".into(),
            public_pem: "pem2".into(),
            fingerprint: "fp2".into(),
            seal_pcrs: vec![],
        });
        m
    }

    #[test]
    fn standby_is_named_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let m = with_standby();
        assert_eq!(m.nv_indices(), vec![0x014c4801, 0x014c4802]);
        assert!(m.files().contains(&"landlord-g2.sealed".to_string()));
        s.write_manifest(&m).unwrap();
        assert_eq!(s.read_manifest().unwrap().unwrap(), m);
        // Without a standby the field is not written at all.
        let text = serde_json::to_string(&sample()).unwrap();
        assert!(!text.contains("standby"), "{text}");
    }

    #[test]
    fn format_3_manifest_loads_and_may_not_carry_a_standby() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let mut v = serde_json::to_value(sample()).unwrap();
        v["format"] = 3.into();
        fs::write(s.manifest_path(), v.to_string()).unwrap();
        let m = s.read_manifest().unwrap().unwrap();
        assert_eq!(m.format, 3);
        assert!(m.landlord.standby.is_none());
        let mut v = serde_json::to_value(with_standby()).unwrap();
        v["format"] = 3.into();
        fs::write(s.manifest_path(), v.to_string()).unwrap();
        assert!(matches!(
            s.read_manifest(),
            Err(KeyError::CorruptState { .. })
        ));
    }

    #[test]
    fn promoted_standby_keeps_holder_and_drops_nothing_else() {
        let s = with_standby().landlord.standby.unwrap();
        let l = s.clone().promote(Some("acme".into()), true);
        assert_eq!(
            (l.generation, l.key_generation, l.nv_index),
            (2, 2, 0x014c4802)
        );
        assert_eq!((l.name.as_deref(), l.owned), (Some("acme"), true));
        assert!(l.standby.is_none());
        assert_eq!(StandbyState::from_level(l), s);
    }

    #[test]
    fn fields_of_another_format_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let mut v = serde_json::to_value(sample()).unwrap();
        v["format"] = 2.into();
        fs::write(s.manifest_path(), v.to_string()).unwrap();
        assert!(matches!(
            s.read_manifest(),
            Err(KeyError::CorruptState { .. })
        ));
        let mut v = serde_json::to_value(sample()).unwrap();
        v["erasing"] = "tenant".into();
        fs::write(s.manifest_path(), v.to_string()).unwrap();
        assert!(matches!(
            s.read_manifest(),
            Err(KeyError::CorruptState { .. })
        ));
    }

    fn console(role: Role, name: &str) -> ConsoleKey {
        ConsoleKey {
            role,
            name: name.to_owned(),
            pem: "pem".into(),
            fingerprint: "fp".into(),
        }
    }

    #[test]
    fn console_keys_are_capped_per_role() {
        let mut m = sample();
        m.consoles = (0..MAX_CONSOLES - 1)
            .map(|i| console(Role::Landlord, &format!("ops-{i}")))
            .collect();
        m.consoles.push(console(Role::Tenant, "t-0"));
        assert!(m.check_console_room(Role::Landlord, "ops-new").is_ok());
        m.consoles.push(console(Role::Landlord, "ops-last"));
        // At the cap: a new name is refused, naming the role and the cap.
        let e = m.check_console_room(Role::Landlord, "ops-new").unwrap_err();
        assert!(
            matches!(
                e,
                KeyError::TooManyConsoles {
                    role: Role::Landlord,
                    count: MAX_CONSOLES,
                    max: MAX_CONSOLES,
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("landlord has 32 console keys"),
            "{e}"
        );
        assert!(e.to_string().contains("(32)"), "{e}");
        // A registered name may be registered again (its key replaced).
        assert!(m.check_console_room(Role::Landlord, "ops-0").is_ok());
        assert!(m.check_console_room(Role::Landlord, "ops-last").is_ok());
        // The other role has its own allowance, and a landlord name is not
        // the tenant's.
        assert!(m.check_console_room(Role::Tenant, "t-1").is_ok());
        assert!(m.check_console_room(Role::Tenant, "ops-new").is_ok());
    }

    /// A manifest from before the cap, holding more consoles than it
    /// allows, still loads whole; only new names are refused.
    #[test]
    fn manifest_over_the_console_cap_still_loads() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        let mut m = sample();
        m.consoles = (0..MAX_CONSOLES + 8)
            .map(|i| console(Role::Landlord, &format!("ops-{i}")))
            .collect();
        s.write_manifest(&m).unwrap();
        let back = s.read_manifest().unwrap().unwrap();
        assert_eq!(back, m);
        assert!(back.check_console_room(Role::Landlord, "ops-39").is_ok());
        assert!(matches!(
            back.check_console_room(Role::Landlord, "ops-new"),
            Err(KeyError::TooManyConsoles { count: 40, .. })
        ));
    }
}
