//! T0: envelopes written before this crate existed still open, and new ones
//! have the same header. `data/v1.lhev` was sealed by the original
//! `leasehold_tpm::envelope::seal` to the throw-away key in `data/`.

use leasehold_envelope::{seal, EnvelopeError, ParsedEnvelope, RecipientKey};
use rsa::pkcs8::DecodePrivateKey;
use rsa::{Oaep, RsaPrivateKey};
use sha2::Sha256;

fn data(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text(name: &str) -> String {
    String::from_utf8(data(name)).unwrap()
}

fn open(sk: &RsaPrivateKey, env: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let parsed = ParsedEnvelope::parse(env)?;
    let ck = sk
        .decrypt(Oaep::new::<Sha256>(), parsed.wrapped_key())
        .map_err(|_| EnvelopeError::Malformed("unwrap"))?;
    parsed.decrypt(&ck).map(|p| p.to_vec())
}

#[test]
fn envelope_sealed_by_the_old_code_opens() {
    let sk = RsaPrivateKey::from_pkcs8_pem(&text("recipient.key.pem")).unwrap();
    let rk = RecipientKey::from_pem(&text("recipient.pub.pem")).unwrap();
    assert_eq!(rk.fingerprint_hex(), text("recipient.fingerprint").trim());

    let env = data("v1.lhev");
    let parsed = ParsedEnvelope::parse(&env).unwrap();
    assert_eq!(parsed.recipient_fingerprint(), rk.fingerprint());
    assert_eq!(open(&sk, &env).unwrap(), data("v1.payload"));

    // The golden file is authenticated: one flipped payload bit fails.
    let mut bad = env.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(open(&sk, &bad), Err(EnvelopeError::AuthenticationFailed));
}

#[test]
fn new_envelopes_have_the_old_header_and_length() {
    let sk = RsaPrivateKey::from_pkcs8_pem(&text("recipient.key.pem")).unwrap();
    let old = data("v1.lhev");
    let payload = data("v1.payload");
    let new = seal(&text("recipient.pub.pem"), &payload).unwrap();
    // magic, version, flags, fingerprint, wrapped-key length: all fixed for
    // one key; the rest is random (content key, OAEP seed, nonce).
    assert_eq!(new[..40], old[..40]);
    assert_eq!(new.len(), old.len());
    assert_eq!(open(&sk, &new).unwrap(), payload);
}
