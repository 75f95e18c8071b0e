//! The erase receipts the agent keeps under `<state dir>/receipts/`, and who
//! may read which (docs/dbus.md "Receipts").
//!
//! The landlord reads the receipts of the changes it makes: assignments,
//! releases and landlord rotations. The tenant reads the receipts of its
//! own tenancy: rotations (its own and the landlord's) made since the node
//! was assigned to it. A receipt made before that (a previous tenant's
//! rotation, the assignment that erased the previous tenant) is never
//! shown to it. The tenancy's start is recorded when the assignment is
//! reported (`tenancy.json` next to `receipts/`: the receipts that existed
//! then); with no record (an agent that predates it, or a failed write)
//! the tenant sees none: fail closed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use leasehold_dbus_api::receipt_json;
use leasehold_node::SignedReceipt;
use serde::{Deserialize, Serialize};

/// Who asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// The landlord (or root).
    Landlord,
    /// The tenant.
    Tenant,
}

/// One stored receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// File name without `.json`.
    pub id: String,
    /// Body fields shown in listings.
    pub time: u64,
    /// "rotate", "assign", "release".
    pub change: String,
    /// Whose keys.
    pub role: String,
    /// Signing key fingerprint (as the body says).
    pub signer: String,
    /// The body, exactly as signed.
    pub body: String,
    /// Base64 signature.
    pub signature: String,
}

/// Errors of reading receipts.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// The directory cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No receipt with this id that the caller may see.
    #[error("no receipt {0:?} (see ListReceipts)")]
    NotFound(String),
}

/// The start of the current tenancy.
#[derive(Debug, Serialize, Deserialize)]
struct Tenancy {
    /// Whether a tenant is assigned (false after a release).
    assigned: bool,
    /// Receipt ids that existed when it started: never the tenant's.
    earlier: BTreeSet<String>,
}

/// The record of a change of tenancy on its way, in the state dir.
pub const CHANGE_FILE: &str = "tenancy-change.json";

/// The receipts directory and the tenancy record.
#[derive(Debug, Clone)]
pub struct ReceiptStore {
    dir: PathBuf,
    tenancy: PathBuf,
}

impl ReceiptStore {
    /// `<state_dir>/receipts` and `<state_dir>/tenancy.json`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("receipts"),
            tenancy: state_dir.join("tenancy.json"),
        }
    }

    /// `<state_dir>/tenancy-change.json`: a change of tenancy on its way
    /// (`leasehold_node::TenancyChange`), beside the tenancy record.
    fn change_path(&self) -> PathBuf {
        self.tenancy.with_file_name(CHANGE_FILE)
    }

    /// Writes the record of a change of tenancy on its way (atomic, and
    /// durable before the TPM change).
    pub fn begin_change(&self, change: &leasehold_node::TenancyChange) -> std::io::Result<()> {
        let doc = serde_json::to_vec(change).map_err(std::io::Error::other)?;
        let path = self.change_path();
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)?;
        crate::fsutil::write_atomic(dir, CHANGE_FILE, &doc)
    }

    /// Removes that record (durably: the directory is synced).
    pub fn end_change(&self) -> std::io::Result<()> {
        let path = self.change_path();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        std::fs::File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
    }

    /// The record an earlier agent left. One that does not parse (written
    /// atomically, so only a damaged disk) is logged and left alone: not
    /// knowing whether the change committed, the start destroys nothing.
    pub fn pending_change(&self) -> Option<leasehold_node::TenancyChange> {
        let path = self.change_path();
        let text = std::fs::read(&path).ok()?;
        serde_json::from_slice(&text)
            .map_err(|e| {
                tracing::error!(path = %path.display(), error = %e, "the record of a change of tenancy does not parse; left as it is");
            })
            .ok()
    }

    /// Keeps a signed receipt (atomic write), in the one JSON spelling
    /// (`receipt_json`).
    pub fn store(&self, r: &SignedReceipt) -> std::io::Result<()> {
        let mut doc = serde_json::Map::new();
        doc.insert(receipt_json::BODY.into(), r.body.clone().into());
        doc.insert(receipt_json::SIGNATURE.into(), r.signature.clone().into());
        let stored = serde_json::Value::Object(doc).to_string();
        std::fs::create_dir_all(&self.dir)?;
        crate::fsutil::write_atomic(&self.dir, &r.file_name, stored.as_bytes())
    }

    /// Records that a tenancy started (`assigned`) or ended: every receipt
    /// stored so far belongs to an earlier one. The old record goes first,
    /// so a failed write leaves none (the tenant then sees no receipt).
    pub fn tenancy_changed(&self, assigned: bool) -> Result<(), ReceiptError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ReceiptError::Io { path, source }
        };
        match std::fs::remove_file(&self.tenancy) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&self.tenancy)(e)),
        }
        let earlier = self.read_all()?.into_iter().map(|r| r.id).collect();
        let doc = serde_json::to_vec(&Tenancy { assigned, earlier })
            .map_err(|e| io(&self.tenancy)(std::io::Error::other(e)))?;
        let dir = self.tenancy.parent().unwrap_or(Path::new("/"));
        let name = self
            .tenancy
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("tenancy.json");
        crate::fsutil::write_atomic(dir, name, &doc).map_err(io(&self.tenancy))
    }

    /// The receipts `reader` may see, oldest first.
    pub fn list(&self, reader: Reader) -> Result<Vec<Stored>, ReceiptError> {
        let all = self.read_all()?;
        Ok(match reader {
            Reader::Landlord => all
                .into_iter()
                .filter(|r| r.role == "landlord" || r.change == "assign" || r.change == "release")
                .collect(),
            Reader::Tenant => {
                let Some(t) = self.tenancy() else {
                    return Ok(Vec::new());
                };
                if !t.assigned {
                    return Ok(Vec::new());
                }
                all.into_iter()
                    .filter(|r| r.change == "rotate" && !t.earlier.contains(&r.id))
                    .collect()
            }
        })
    }

    /// One receipt `reader` may see; the same error for one that does not
    /// exist and one of another party (no oracle).
    pub fn get(&self, reader: Reader, id: &str) -> Result<Stored, ReceiptError> {
        self.list(reader)?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| ReceiptError::NotFound(id.chars().take(120).collect()))
    }

    fn tenancy(&self) -> Option<Tenancy> {
        let text = match std::fs::read(&self.tenancy) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.tenancy.display(), error = %e, "cannot read the tenancy record; the tenant sees no receipt");
                return None;
            }
        };
        match serde_json::from_slice(&text) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(path = %self.tenancy.display(), error = %e, "invalid tenancy record; the tenant sees no receipt");
                None
            }
        }
    }

    /// Every readable receipt; a file that is not one is skipped with a
    /// warning (it is shown to no one).
    fn read_all(&self) -> Result<Vec<Stored>, ReceiptError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(ReceiptError::Io {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| ReceiptError::Io {
                path: self.dir.clone(),
                source,
            })?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            // Atomic writes leave temporary files only while writing.
            let Some(id) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) else {
                continue;
            };
            match std::fs::read(entry.path())
                .map_err(|e| e.to_string())
                .and_then(|t| parse(id, &t))
            {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "not a receipt; skipped")
                }
            }
        }
        out.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        Ok(out)
    }
}

/// Reads a stored receipt file (the current or the legacy signature name).
fn parse(id: &str, text: &[u8]) -> Result<Stored, String> {
    let doc: serde_json::Value = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let field = |k: &str| doc.get(k).and_then(serde_json::Value::as_str);
    let body = field(receipt_json::BODY).ok_or("no receipt body")?;
    let signature = field(receipt_json::SIGNATURE)
        .or_else(|| field(receipt_json::LEGACY_SIGNATURE))
        .ok_or("no signature")?;
    let b: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("body: {e}"))?;
    let s = |k: &str| {
        b.get(k)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("body: no {k}"))
    };
    Ok(Stored {
        id: id.to_owned(),
        time: b
            .get("time")
            .and_then(serde_json::Value::as_u64)
            .ok_or("body: no time")?,
        change: s("change")?,
        role: s("role")?,
        signer: s("signer")?,
        body: body.to_owned(),
        signature: signature.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(store: &ReceiptStore, time: u64, change: &str, role: &str) -> String {
        let body = serde_json::json!({"format": 2, "time": time, "change": change, "role": role, "signer": "ab"}).to_string();
        let file_name = format!("{time}-{change}-{role}.json");
        store
            .store(&SignedReceipt {
                body,
                signature: "c2ln".into(),
                file_name: file_name.clone(),
            })
            .unwrap();
        file_name.trim_end_matches(".json").to_owned()
    }

    fn ids(v: Vec<Stored>) -> Vec<String> {
        v.into_iter().map(|r| r.id).collect()
    }

    /// A tenant sees the rotations of its own tenancy only, never a
    /// previous tenant's nor the assignment that erased one; the landlord
    /// sees what it did, never a tenant's own rotation.
    #[test]
    fn who_sees_which() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReceiptStore::new(dir.path());
        assert!(s.list(Reader::Tenant).unwrap().is_empty());
        let a1 = receipt(&s, 1, "assign", "tenant");
        s.tenancy_changed(true).unwrap();
        let t1 = receipt(&s, 2, "rotate", "tenant");
        let l1 = receipt(&s, 3, "rotate", "landlord");
        assert_eq!(
            ids(s.list(Reader::Tenant).unwrap()),
            [t1.clone(), l1.clone()]
        );
        let r1 = receipt(&s, 4, "release", "tenant");
        s.tenancy_changed(false).unwrap();
        assert!(s.list(Reader::Tenant).unwrap().is_empty());
        let a2 = receipt(&s, 5, "assign", "tenant");
        s.tenancy_changed(true).unwrap();
        assert!(s.list(Reader::Tenant).unwrap().is_empty());
        assert!(matches!(
            s.get(Reader::Tenant, &t1),
            Err(ReceiptError::NotFound(_))
        ));
        let t2 = receipt(&s, 6, "rotate", "tenant");
        assert_eq!(
            ids(s.list(Reader::Tenant).unwrap()),
            std::slice::from_ref(&t2)
        );
        assert_eq!(
            ids(s.list(Reader::Landlord).unwrap()),
            [a1, l1, r1, a2.clone()]
        );
        assert!(s.get(Reader::Landlord, &t2).is_err());
        assert_eq!(s.get(Reader::Landlord, &a2).unwrap().signature, "c2ln");
        // No record (an older agent's tenancy): the tenant sees none.
        std::fs::remove_file(dir.path().join("tenancy.json")).unwrap();
        assert!(s.list(Reader::Tenant).unwrap().is_empty());
    }

    /// Files of agents before 2026-12 name the signature "signature".
    #[test]
    fn reads_the_legacy_signature_name() {
        let body = r#"{"time":1,"change":"release","role":"tenant","signer":"ab"}"#;
        let old = serde_json::json!({"receipt": body, "signature": "c2ln"}).to_string();
        let r = parse("x", old.as_bytes()).unwrap();
        assert_eq!((r.signature.as_str(), r.time), ("c2ln", 1));
        assert!(parse("x", b"{}").is_err());
    }
}
