//! T1: quotes by the attestation key on a real swtpm, verified by the pure
//! Rust verifier in `leasehold-envelope` (what `tenantctl attest` runs).
//! The quotes here are the fixtures of the verifier's negative cases:
//! replayed nonce, another node's quote, a changed PCR, a rotated key.

use std::path::PathBuf;
use std::time::Instant;

use leasehold_tpm::attest::{verify_quote, Answer, AttestError, Challenge};
use leasehold_tpm::swtpm::Swtpm;
use leasehold_tpm::{Confirm, KeyError, KeyHierarchy, Quote, Role};

const BOOT_ID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

struct Node {
    tmp: tempfile::TempDir,
    swtpm: Option<Swtpm>,
}

impl Node {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let swtpm = Swtpm::start(&tmp.path().join("tpm")).expect("start swtpm");
        Self {
            tmp,
            swtpm: Some(swtpm),
        }
    }
    fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("state")
    }
    fn open(&self) -> KeyHierarchy {
        KeyHierarchy::open(&self.swtpm.as_ref().unwrap().key_config(self.state_dir()))
            .expect("open key hierarchy")
            .0
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.swtpm.take() {
            let _ = s.stop();
        }
    }
}

fn answer(q: &Quote) -> Answer<'_> {
    Answer {
        attest: &q.attest,
        signature: &q.signature,
        pcr_values: &q.pcr_values,
        context: &q.context,
    }
}

#[test]
fn swtpm_quote_verifies_offline_and_each_forgery_is_refused() {
    let a = Node::new();
    let b = Node::new();
    let mut ha = a.open();
    let mut hb = b.open();
    ha.assign_tenant(Role::Landlord, "acme", Confirm::No)
        .unwrap();
    let ak = ha.attestation_key().unwrap();
    let pcrs = [0u32, 1, 7, 16];
    let nonce = b"verifier-made-nonce-0001";
    let ch = Challenge {
        ak_pem: &ak.pem,
        nonce,
        pcrs: &pcrs,
    };

    let t = Instant::now();
    let q = ha.quote(nonce, &pcrs, BOOT_ID).unwrap();
    eprintln!(
        "figure: swtpm quote (load AK, Quote, 4 x PCR_Read) {:?}",
        t.elapsed()
    );
    let v = verify_quote(&ch, &answer(&q)).expect("an honest quote verifies");
    let st = ha.status();
    assert_eq!(v.context.node_id, st.node_id);
    assert_eq!(v.context.boot_id, BOOT_ID);
    assert_eq!(v.context.landlord.fingerprint, st.landlord.fingerprint);
    let tenant = st.tenant.clone().unwrap();
    assert_eq!(
        v.context.tenant.as_ref().unwrap().generation,
        tenant.generation
    );
    assert_eq!(
        v.pcrs.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        [0, 1, 7, 16]
    );

    // Replayed: the answer to this nonce does not answer the next one.
    let next = Challenge {
        nonce: b"verifier-made-nonce-0002",
        ..ch
    };
    assert_eq!(
        verify_quote(&next, &answer(&q)),
        Err(AttestError::QualifyingData)
    );

    // Another node's quote of the same nonce, checked against A's AK.
    let qb = hb.quote(nonce, &pcrs, BOOT_ID).unwrap();
    assert_eq!(
        verify_quote(&ch, &answer(&qb)),
        Err(AttestError::BadSignature)
    );
    assert_ne!(hb.attestation_key().unwrap().fingerprint, ak.fingerprint);

    // A changed PCR: the TPM's new quote carries the new value; passing the
    // old value with it, or the new value with the old quote, is refused.
    ha.extend_pcr(16, b"another boot chain").unwrap();
    let q2 = ha.quote(nonce, &pcrs, BOOT_ID).unwrap();
    let v2 = verify_quote(&ch, &answer(&q2)).unwrap();
    assert_ne!(v2.pcrs[3], v.pcrs[3], "PCR 16 changed");
    let mut stale = q2.clone();
    stale.pcr_values = q.pcr_values.clone();
    assert_eq!(
        verify_quote(&ch, &answer(&stale)),
        Err(AttestError::PcrDigest)
    );

    // A rotated tenant key: the quote states the new generation and
    // fingerprint; the pre-rotation context with the new quote is refused.
    ha.rotate(Role::Tenant, Role::Tenant, Confirm::DestroyData)
        .unwrap();
    let q3 = ha.quote(nonce, &pcrs, BOOT_ID).unwrap();
    let v3 = verify_quote(&ch, &answer(&q3)).unwrap();
    let t3 = v3.context.tenant.clone().unwrap();
    assert_eq!(t3.generation, tenant.generation + 1);
    assert_ne!(t3.fingerprint, tenant.fingerprint);
    let mut old_ctx = q3.clone();
    old_ctx.context = q2.context.clone();
    assert_eq!(
        verify_quote(&ch, &answer(&old_ctx)),
        Err(AttestError::QualifyingData)
    );

    // Truncated and garbage structures.
    let mut cut = q.clone();
    cut.attest.truncate(cut.attest.len() / 2);
    assert_eq!(
        verify_quote(&ch, &answer(&cut)),
        Err(AttestError::BadSignature)
    );

    ha.shutdown().unwrap();
    hb.shutdown().unwrap();
}

#[test]
fn swtpm_attestation_key_is_restricted_and_stable_across_restarts() {
    let node = Node::new();
    let mut h = node.open();
    let ak = h.attestation_key().unwrap();
    assert_ne!(ak.fingerprint, h.signing_key().unwrap().fingerprint);
    // Request bounds, refused before the TPM is asked.
    for (nonce, pcrs, field) in [
        (&[0u8; 7][..], &[0u32][..], "nonce"),
        (&[0u8; 65][..], &[0u32][..], "nonce"),
        (&[0u8; 8][..], &[][..], "pcrs"),
        (&[0u8; 8][..], &[24u32][..], "pcrs"),
    ] {
        match h.quote(nonce, pcrs, BOOT_ID) {
            Err(KeyError::InvalidQuote { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected InvalidQuote({field}), got {other:?}"),
        }
    }
    match h.quote(&[0u8; 8], &[0], "not-a-boot-id") {
        Err(KeyError::InvalidQuote { field, .. }) => assert_eq!(field, "context"),
        other => panic!("expected InvalidQuote(context), got {other:?}"),
    }
    h.shutdown().unwrap();
    let h = node.open();
    assert_eq!(h.attestation_key().unwrap(), ak);
    h.shutdown().unwrap();

    // The manifest records the AK; a blob that is not it is refused at open.
    let state = node.state_dir();
    std::fs::copy(state.join("signing.pair"), state.join("attest.pair")).unwrap();
    match KeyHierarchy::open(&node.swtpm.as_ref().unwrap().key_config(state)) {
        Err(e @ KeyError::CorruptState { .. }) => {
            assert!(e.to_string().contains("attest.pair"), "{e}")
        }
        other => panic!("expected CorruptState, got {other:?}"),
    }
}

#[test]
fn swtpm_state_from_before_quotes_gets_its_attestation_key_at_open() {
    let node = Node::new();
    let mut h = node.open();
    h.assign_tenant(Role::Landlord, "acme", Confirm::No)
        .unwrap();
    let status = h.status();
    h.shutdown().unwrap();
    // keys.json as the previous build wrote it: format 4, no attestation key.
    let manifest = node.state_dir().join("keys.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(v["format"], 5);
    assert!(v.as_object_mut().unwrap().remove("attestation").is_some());
    v["format"] = 4.into();
    std::fs::write(&manifest, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    std::fs::remove_file(node.state_dir().join("attest.pair")).unwrap();

    let mut h = node.open();
    assert_eq!(h.status(), status, "the other keys are untouched");
    let ak = h.attestation_key().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(v["format"], 5);
    assert_eq!(v["attestation"]["fingerprint"], ak.fingerprint.as_str());
    let nonce = b"after-the-upgrade";
    let q = h.quote(nonce, &[0], BOOT_ID).unwrap();
    let ch = Challenge {
        ak_pem: &ak.pem,
        nonce,
        pcrs: &[0],
    };
    verify_quote(&ch, &answer(&q)).unwrap();
    h.shutdown().unwrap();
}
