//! RSA public keys as Leasehold names them: SubjectPublicKeyInfo PEM and the
//! SHA-256 fingerprint of its DER.

use rsa::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPublicKey};
use sha2::{Digest, Sha256};

use crate::error::EnvelopeError;

/// Smallest accepted RSA key (recipients and signing keys).
pub const MIN_RSA_BITS: usize = 2048;

/// Parses an RSA SubjectPublicKeyInfo PEM of at least [`MIN_RSA_BITS`]; the
/// error is the reason, for the caller's own error type.
pub(crate) fn parse_rsa_pem(pem: &str) -> Result<RsaPublicKey, String> {
    let key = RsaPublicKey::from_public_key_pem(pem.trim())
        .map_err(|e| format!("not an RSA SubjectPublicKeyInfo PEM: {e}"))?;
    if key.size() * 8 < MIN_RSA_BITS {
        return Err(format!(
            "RSA key has {} bits; at least {MIN_RSA_BITS} are required",
            key.size() * 8
        ));
    }
    Ok(key)
}

/// An RSA public key as used by Leasehold: PEM plus fingerprint.
#[derive(Debug, Clone)]
pub struct RecipientKey {
    key: RsaPublicKey,
    fingerprint: [u8; 32],
}

impl RecipientKey {
    /// Parses a SubjectPublicKeyInfo PEM holding an RSA key of at least 2048 bits.
    pub fn from_pem(pem: &str) -> Result<Self, EnvelopeError> {
        Self::from_key(parse_rsa_pem(pem).map_err(EnvelopeError::InvalidPublicKey)?)
    }

    /// Builds the key from modulus and exponent (as read from a TPM public area).
    pub fn from_components(modulus: &[u8], exponent: u32) -> Result<Self, EnvelopeError> {
        let key = RsaPublicKey::new(BigUint::from_bytes_be(modulus), BigUint::from(exponent))
            .map_err(|e| EnvelopeError::InvalidPublicKey(e.to_string()))?;
        Self::from_key(key)
    }

    fn from_key(key: RsaPublicKey) -> Result<Self, EnvelopeError> {
        let der = key
            .to_public_key_der()
            .map_err(|e| EnvelopeError::InvalidPublicKey(e.to_string()))?;
        let fingerprint = Sha256::digest(der.as_bytes()).into();
        Ok(Self { key, fingerprint })
    }

    /// SubjectPublicKeyInfo PEM.
    pub fn to_pem(&self) -> String {
        self.key
            .to_public_key_pem(LineEnding::LF)
            // Encoding an in-memory RSA key cannot fail; keep a clear message anyway.
            .unwrap_or_else(|e| format!("<unencodable key: {e}>"))
    }

    /// SHA-256 of the SubjectPublicKeyInfo DER, lower-case hex.
    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.fingerprint)
    }

    /// Raw fingerprint bytes.
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }

    pub(crate) fn rsa(&self) -> &RsaPublicKey {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::RsaPrivateKey;

    #[test]
    fn fingerprint_is_sha256_of_the_der_and_survives_pem_round_trip() {
        let sk = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let pk = sk.to_public_key();
        let der = pk.to_public_key_der().unwrap();
        let pem = pk.to_public_key_pem(LineEnding::LF).unwrap();
        let k = RecipientKey::from_pem(&format!("\n  {pem}\n")).unwrap();
        assert_eq!(
            k.fingerprint_hex(),
            hex::encode(Sha256::digest(der.as_bytes()))
        );
        assert_eq!(k.rsa().size() * 8, 2048);
        let again = RecipientKey::from_pem(&k.to_pem()).unwrap();
        assert_eq!(again.fingerprint(), k.fingerprint());
        let n = pk.n().to_bytes_be();
        assert_eq!(pk.e(), &BigUint::from(65537u32));
        let from_parts = RecipientKey::from_components(&n, 65537).unwrap();
        assert_eq!(from_parts.fingerprint(), k.fingerprint());
    }

    #[test]
    fn small_and_garbage_keys_are_refused_with_the_reason() {
        let small = RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
        let pem = small
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        match RecipientKey::from_pem(&pem) {
            Err(EnvelopeError::InvalidPublicKey(m)) => assert!(m.contains("1024 bits"), "{m}"),
            other => panic!("expected InvalidPublicKey, got {other:?}"),
        }
        match RecipientKey::from_pem("garbage") {
            Err(EnvelopeError::InvalidPublicKey(m)) => {
                assert!(m.contains("SubjectPublicKeyInfo"), "{m}")
            }
            other => panic!("expected InvalidPublicKey, got {other:?}"),
        }
    }
}
