//! What the agent keeps about the volume, in its state directory (never on
//! the device): identity and size of the device, the mapping's parameters,
//! the key generations the disk key was made from, a key check value, the
//! filesystem, and the state of the last lifecycle step (crash recovery).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Metadata format this build writes.
pub const FORMAT: u32 = 1;

/// Where the volume is in its lifecycle. Written before and after each
/// step that changes the device, so a restart knows what to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// A fresh filesystem is being made under the recorded key (init, or
    /// after a destroying key change); the device holds nothing yet.
    Initializing,
    /// Made; holds the tenant's data.
    Ready,
    /// Holds the tenant's data, and a key change that replaces the disk
    /// key has begun: if the agent stops now and the key did change, the
    /// volume is made again (empty) at the next start. Only this state
    /// allows that: metadata whose key does not match is otherwise refused
    /// and the device left alone (copied or stale metadata).
    Rekeying,
}

/// `volume.json` in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMeta {
    /// [`FORMAT`].
    pub format: u32,
    /// Random id (hex): names the keyring key, part of the check value.
    pub id: String,
    /// The node it was made on (the key hierarchy's node id).
    pub node_id: String,
    /// The device as recorded (a stable /dev/disk/by-id path if there is one).
    pub device: String,
    /// Device size in bytes when it was made.
    pub size_bytes: u64,
    /// dm-crypt sector size (4096 where the device allows, else 512).
    pub sector_size: u32,
    /// dm-crypt cipher.
    pub cipher: String,
    /// Key size in bytes.
    pub key_bytes: u32,
    /// dm-crypt optional parameters in use.
    pub options: Vec<String>,
    /// Filesystem made on the mapping.
    pub filesystem: String,
    /// Key generation of each link of the disk-key chain ("landlord",
    /// "tenant", …) the current disk key was made from.
    pub key_generations: Vec<(String, u64)>,
    /// Key check value of the disk key (see [`kcv`]).
    pub kcv: String,
    /// Lifecycle state.
    pub state: VolumeState,
    /// Unix time the device was first initialized.
    pub created: u64,
    /// Unix time the current filesystem was made.
    pub made: u64,
    /// Why the current filesystem was made ("initialized", "recreated
    /// empty after …", "an interrupted initialization was finished …").
    #[serde(default)]
    pub made_by: Option<String>,
    /// Whether `init_signature` was recorded (volumes made since
    /// 2026-12-07): a remake then refuses a signature other than it.
    // Written only when set: an older agent (which refuses fields it does
    // not know) can still read the volumes made before (review).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub signatures_checked: bool,
    /// What `blkid` found on the device at `init` (a forced init over a
    /// filesystem or RAID label); None: nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_signature: Option<String>,
    /// SHA-256 (hex) of the random bytes written at init over the device's
    /// last [`crate::mark::MARK_BYTES`] (volumes made since 2026-12-08;
    /// None before: mapped whole, not checked). The mapping ends before
    /// them, and every mapping checks them first. Written only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_mark: Option<String>,
}

impl VolumeMeta {
    /// Bytes the mapping covers: the device less its mark, if it has one.
    pub fn mapped_bytes(&self) -> u64 {
        match self.tail_mark {
            Some(_) => self.size_bytes.saturating_sub(crate::mark::MARK_BYTES),
            None => self.size_bytes,
        }
    }

    /// The generations as text ("landlord 3, tenant 2").
    pub fn generations_text(&self) -> String {
        generations_text(&self.key_generations)
    }

    /// Refuses a disk key that is not this volume's (checked before the
    /// device is mapped, so a wrong key never writes anything). `now`: the
    /// key generations the offered key was made from, for the message.
    pub fn check_key(&self, disk_key: &[u8], now: &[(String, u64)]) -> crate::Result<()> {
        if kcv(disk_key, &self.id) == self.kcv {
            return Ok(());
        }
        Err(crate::StorageError::WrongKey(format!(
            "the disk key does not match the volume's key check value (volume {} on {}, made with key generations {}; now {})",
            self.id,
            self.device,
            self.generations_text(),
            generations_text(now)
        )))
    }
}

/// "landlord 3, tenant 2".
pub fn generations_text(g: &[(String, u64)]) -> String {
    g.iter()
        .map(|(l, n)| format!("{l} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Key check value: HMAC-SHA256 keyed with the disk key over a fixed label
/// and the volume id, first 16 bytes, hex. It tells whether a disk key is
/// the volume's before anything is mapped or mounted, and reveals nothing
/// about the key (a one-way function of it; different per volume).
pub fn kcv(disk_key: &[u8], volume_id: &str) -> String {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(disk_key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(b"leasehold/kcv/v1\0");
    mac.update(volume_id.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_depends_on_key_and_volume() {
        let a = kcv(&[1u8; 64], "v1");
        assert_eq!(a.len(), 32);
        assert_eq!(a, kcv(&[1u8; 64], "v1"));
        assert_ne!(a, kcv(&[2u8; 64], "v1"));
        assert_ne!(a, kcv(&[1u8; 64], "v2"));
    }

    #[test]
    fn metadata_round_trips_and_refuses_unknown_fields() {
        let m = VolumeMeta {
            signatures_checked: false,
            init_signature: None,
            tail_mark: None,
            format: FORMAT,
            id: "ab".into(),
            node_id: "cd".into(),
            device: "/dev/disk/by-id/virtio-x".into(),
            size_bytes: 1 << 30,
            sector_size: 4096,
            cipher: "aes-xts-plain64".into(),
            key_bytes: 64,
            options: vec!["sector_size:4096".into()],
            filesystem: "ext4".into(),
            key_generations: vec![("landlord".into(), 1), ("tenant".into(), 2)],
            kcv: kcv(&[0; 64], "ab"),
            state: VolumeState::Ready,
            created: 1,
            made: 2,
            made_by: None,
        };
        let s = serde_json::to_string(&m).unwrap();
        assert!(s.contains("\"state\":\"ready\""), "{s}");
        assert_eq!(serde_json::from_str::<VolumeMeta>(&s).unwrap(), m);
        assert_eq!(m.generations_text(), "landlord 1, tenant 2");
        let bad = s.replacen("\"format\"", "\"extra\":1,\"format\"", 1);
        assert!(serde_json::from_str::<VolumeMeta>(&bad).is_err());
        // The signature fields only when set: an older agent (unknown
        // fields refused) still reads a volume made before them.
        assert!(
            !s.contains("signatures_checked")
                && !s.contains("init_signature")
                && !s.contains("tail_mark"),
            "{s}"
        );
        // No mark: mapped whole (as made before marks); a mark: not it.
        assert_eq!(m.mapped_bytes(), 1 << 30);
        let mut marked = m.clone();
        marked.tail_mark = Some("00".repeat(32));
        assert_eq!(marked.mapped_bytes(), (1 << 30) - 4096);
        let t = serde_json::to_string(&marked).unwrap();
        assert_eq!(serde_json::from_str::<VolumeMeta>(&t).unwrap(), marked);
        let mut forced = m.clone();
        forced.signatures_checked = true;
        forced.init_signature = Some("a gpt partition table".into());
        let f = serde_json::to_string(&forced).unwrap();
        assert!(f.contains("\"signatures_checked\":true"), "{f}");
        assert_eq!(serde_json::from_str::<VolumeMeta>(&f).unwrap(), forced);
    }
}
