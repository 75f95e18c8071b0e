//! Verifying node signatures (erase receipts) without a TPM.
//!
//! The node signs with RSASSA-PKCS1-v1_5 and SHA-256 over the exact bytes
//! given; the key's private half never leaves the node's TPM
//! (`leasehold_tpm::KeyHierarchy::sign`).

use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::signature::Verifier;
use sha2::Sha256;

use crate::error::SignatureError;
use crate::key::parse_rsa_pem;

/// Checks `signature` (RSASSA-PKCS1-v1_5, SHA-256) over `data` against the
/// RSA SubjectPublicKeyInfo PEM `public_pem` (the node's receipt key, as
/// `landlordctl receipt-key` prints it). Needs no TPM.
pub fn verify_signature(
    public_pem: &str,
    data: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let key = parse_rsa_pem(public_pem).map_err(SignatureError::InvalidPublicKey)?;
    let signature = Signature::try_from(signature).map_err(|_| SignatureError::Mismatch)?;
    VerifyingKey::<Sha256>::new(key)
        .verify(data, &signature)
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use rsa::pkcs1v15::SigningKey;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use rsa::signature::{RandomizedSigner, SignatureEncoding, Signer};
    use rsa::RsaPrivateKey;

    use super::*;

    fn pem_of(key: &RsaPrivateKey) -> String {
        key.to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    #[test]
    fn verifies_rsa_crate_signatures_and_rejects_tampering() {
        let sk = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let pem = pem_of(&sk);
        let data = b"erase receipt: tenant generation 3 -> 4";
        let sig = SigningKey::<Sha256>::new(sk.clone()).sign(data).to_vec();
        assert_eq!(sig.len(), 256);
        assert_eq!(verify_signature(&pem, data, &sig), Ok(()));

        let mut bad_data = data.to_vec();
        bad_data[0] ^= 1;
        assert_eq!(
            verify_signature(&pem, &bad_data, &sig),
            Err(SignatureError::Mismatch)
        );
        let mut bad_sig = sig.clone();
        bad_sig[100] ^= 0x10;
        assert_eq!(
            verify_signature(&pem, data, &bad_sig),
            Err(SignatureError::Mismatch)
        );
        for cut in [0, 1, 255] {
            assert_eq!(
                verify_signature(&pem, data, &sig[..cut]),
                Err(SignatureError::Mismatch),
                "cut at {cut}"
            );
        }
        let mut long = sig.clone();
        long.push(0);
        assert_eq!(
            verify_signature(&pem, data, &long),
            Err(SignatureError::Mismatch)
        );

        // A PSS signature by the same key is not accepted (another scheme).
        let pss = rsa::pss::SigningKey::<Sha256>::new(sk)
            .sign_with_rng(&mut rand::rngs::OsRng, data)
            .to_vec();
        assert_eq!(
            verify_signature(&pem, data, &pss),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_bad_and_small_keys() {
        assert!(matches!(
            verify_signature("not a key", b"x", &[0; 256]),
            Err(SignatureError::InvalidPublicKey(_))
        ));
        let small = RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
        match verify_signature(&pem_of(&small), b"x", &[0; 128]) {
            Err(SignatureError::InvalidPublicKey(m)) => assert!(m.contains("1024 bits"), "{m}"),
            other => panic!("expected InvalidPublicKey, got {other:?}"),
        }
    }
}
