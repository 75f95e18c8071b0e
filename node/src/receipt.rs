//! The signed statement of what a key change destroyed (docs/storage.md).

use serde::Serialize;

use crate::backend::Wiped;

/// Version of the receipt body. Format 1 (until 2026-12) waited for the
/// new filesystem and described it in `volume`; format 2 is signed as soon
/// as the old key is gone and describes the erased volume.
pub const RECEIPT_FORMAT: u32 = 2;

/// The volume whose data the change destroyed.
#[derive(Debug, Clone, Serialize)]
pub struct ErasedVolume {
    /// Volume id.
    pub id: String,
    /// Device.
    pub device: String,
    /// What became of dm-crypt's copy of the old disk key (read back).
    pub kernel_key: Wiped,
    /// The new empty filesystem under the new disk key is made after this
    /// receipt is signed (`VolumeStatus` reports it).
    pub remade: &'static str,
    /// Set when the volume was failed or stuck before the change (why):
    /// it held no usable filesystem, and it is made again after the change
    /// only if the node can. An added field of format 2 (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// The body of an erase receipt. Field order and names are the wire format.
#[derive(Debug, Clone, Serialize)]
pub struct Receipt {
    /// [`RECEIPT_FORMAT`].
    pub format: u32,
    /// Node id.
    pub node_id: String,
    /// rotate, assign, release.
    pub change: String,
    /// Whose keys.
    pub role: String,
    /// Seconds since the epoch.
    pub time: u64,
    /// What is gone, in words.
    pub destroyed: Vec<String>,
    /// Key generations before.
    pub key_generations_before: Vec<(String, u64)>,
    /// Key generations after.
    pub key_generations_after: Vec<(String, u64)>,
    /// The erased volume (None: no volume was initialized).
    pub volume: Option<ErasedVolume>,
    /// The tenant's engines, stopped before the erase. Absent from
    /// receipts of agents without engines (and of format 2 before
    /// 2026-12); an added field, so readers of format 2 read it or skip it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engines: Option<crate::StopReport>,
    /// Milliseconds from the request to the moment the old data was
    /// unrecoverable: the kernel's copy of the disk key wiped and the TPM
    /// secret of the old key generation undefined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub erased_ms: Option<u64>,
    /// Fingerprint of the node signing key.
    pub signer: String,
}

/// A receipt body and its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedReceipt {
    /// The JSON body, exactly as signed.
    pub body: String,
    /// RSASSA-PKCS1-v1_5 SHA-256 signature, base64.
    pub signature: String,
    /// File name under which the agent keeps it (`receipts/`).
    pub file_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(engines: Option<crate::StopReport>) -> Receipt {
        Receipt {
            format: RECEIPT_FORMAT,
            node_id: "00".into(),
            change: "release".into(),
            role: "tenant".into(),
            time: 1,
            destroyed: vec!["disk key".into()],
            key_generations_before: vec![("landlord".into(), 1), ("tenant".into(), 1)],
            key_generations_after: vec![("landlord".into(), 1)],
            volume: None,
            engines,
            erased_ms: None,
            signer: "node".into(),
        }
    }

    /// `engines` is an added field: without it the body is byte for byte
    /// what format 2 signed before engines; with it, every format-2 field
    /// is unchanged.
    #[test]
    fn engines_is_an_added_field_of_format_2() {
        let old = r#"{"format":2,"node_id":"00","change":"release","role":"tenant","time":1,"destroyed":["disk key"],"key_generations_before":[["landlord",1],["tenant",1]],"key_generations_after":[["landlord",1]],"volume":null,"signer":"node"}"#;
        assert_eq!(serde_json::to_string(&receipt(None)).unwrap(), old);
        let with = serde_json::to_value(receipt(Some(crate::StopReport {
            stopped: vec!["web".into()],
            ..Default::default()
        })))
        .unwrap();
        let old: serde_json::Value = serde_json::from_str(old).unwrap();
        for (k, v) in old.as_object().unwrap() {
            assert_eq!(&with[k], v, "{k}");
        }
        assert_eq!(with["engines"], serde_json::json!({"stopped": ["web"]}));
    }
}
