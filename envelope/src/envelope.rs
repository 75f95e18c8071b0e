//! Sealed envelopes (R9), format version 1.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "LHEV"
//! 4       1     version (1)
//! 5       1     flags (0)
//! 6       32    recipient fingerprint: SHA-256 of the SubjectPublicKeyInfo DER
//! 38      2     length W of the wrapped content key, big endian (256..=512)
//! 40      W     RSA-OAEP-SHA256(recipient, content key), no label
//! 40+W    12    AES-GCM nonce
//! 52+W    ...   AES-256-GCM(content key, nonce, aad = bytes 0..52+W, payload) || tag
//! ```
//!
//! Sealing needs only the recipient's public key, so it runs anywhere (the
//! CLIs use it). Opening needs the private key, which lives in the TPM: the
//! caller unwraps [`ParsedEnvelope::wrapped_key`] there and hands the content
//! key to [`ParsedEnvelope::decrypt`].

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use rsa::Oaep;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::EnvelopeError;
use crate::key::RecipientKey;

/// Magic bytes at the start of every envelope.
pub const MAGIC: &[u8; 4] = b"LHEV";
/// The envelope version this build writes and reads.
pub const VERSION: u8 = 1;
/// Largest payload an envelope may carry (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;
const MIN_WRAPPED: usize = 256;
const MAX_WRAPPED: usize = 512;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const FIXED_HEADER: usize = 40;
/// Largest envelope accepted for parsing.
pub const MAX_ENVELOPE: usize = FIXED_HEADER + MAX_WRAPPED + NONCE_LEN + MAX_PAYLOAD + TAG_LEN;

/// Seals `payload` to the holder of `recipient_pem`. Needs no TPM.
pub fn seal(recipient_pem: &str, payload: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    seal_to(&RecipientKey::from_pem(recipient_pem)?, payload)
}

/// Seals `payload` to an already parsed recipient key.
pub fn seal_to(recipient: &RecipientKey, payload: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(EnvelopeError::TooLarge {
            what: "payload",
            size: payload.len(),
            max: MAX_PAYLOAD,
        });
    }
    let mut rng = rand::rngs::OsRng;
    let mut content_key = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(content_key.as_mut());
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);

    let wrapped = recipient
        .rsa()
        .encrypt(&mut rng, Oaep::new::<Sha256>(), content_key.as_ref())
        .map_err(|e| EnvelopeError::InvalidPublicKey(format!("RSA-OAEP encryption failed: {e}")))?;
    let wrapped_len = u16::try_from(wrapped.len())
        .ok()
        .filter(|l| usize::from(*l) <= MAX_WRAPPED)
        .ok_or_else(|| {
            EnvelopeError::InvalidPublicKey("RSA keys above 4096 bits are not supported".into())
        })?;

    let mut out =
        Vec::with_capacity(FIXED_HEADER + wrapped.len() + NONCE_LEN + payload.len() + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(0);
    out.extend_from_slice(recipient.fingerprint());
    out.extend_from_slice(&wrapped_len.to_be_bytes());
    out.extend_from_slice(&wrapped);
    out.extend_from_slice(&nonce);

    let cipher = Aes256Gcm::new_from_slice(content_key.as_ref())
        .map_err(|_| EnvelopeError::Malformed("content key length"))?;
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: payload,
                aad: &out,
            },
        )
        .map_err(|_| EnvelopeError::Malformed("payload too large for AES-GCM"))?;
    out.extend_from_slice(&ct);
    Ok(out)
}

/// A parsed (not yet opened) envelope.
#[derive(Debug)]
pub struct ParsedEnvelope<'a> {
    header: &'a [u8],
    fingerprint: [u8; 32],
    wrapped_key: &'a [u8],
    nonce: &'a [u8],
    ciphertext: &'a [u8],
}

impl<'a> ParsedEnvelope<'a> {
    /// Parses and bounds-checks an envelope without decrypting anything.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE {
            return Err(EnvelopeError::TooLarge {
                what: "envelope",
                size: bytes.len(),
                max: MAX_ENVELOPE,
            });
        }
        if bytes.len() < 5 || &bytes[..4] != MAGIC {
            return Err(if bytes.len() >= 4 && &bytes[..4] == MAGIC {
                EnvelopeError::Malformed("missing version")
            } else {
                EnvelopeError::BadMagic
            });
        }
        if bytes[4] != VERSION {
            return Err(EnvelopeError::UnsupportedVersion {
                found: bytes[4],
                supported: VERSION,
            });
        }
        if bytes.len() < FIXED_HEADER {
            return Err(EnvelopeError::Malformed("header shorter than 40 bytes"));
        }
        if bytes[5] != 0 {
            return Err(EnvelopeError::Malformed("unknown flags set"));
        }
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&bytes[6..38]);
        let wrapped_len = usize::from(u16::from_be_bytes([bytes[38], bytes[39]]));
        if !(MIN_WRAPPED..=MAX_WRAPPED).contains(&wrapped_len) {
            return Err(EnvelopeError::Malformed("wrapped key length out of range"));
        }
        let header_len = FIXED_HEADER + wrapped_len + NONCE_LEN;
        if bytes.len() < header_len + TAG_LEN {
            return Err(EnvelopeError::Malformed(
                "envelope ends before the ciphertext tag",
            ));
        }
        Ok(Self {
            header: &bytes[..header_len],
            fingerprint,
            wrapped_key: &bytes[FIXED_HEADER..FIXED_HEADER + wrapped_len],
            nonce: &bytes[FIXED_HEADER + wrapped_len..header_len],
            ciphertext: &bytes[header_len..],
        })
    }

    /// Fingerprint of the key the envelope is sealed to.
    pub fn recipient_fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }

    /// The RSA-OAEP ciphertext of the content key.
    pub fn wrapped_key(&self) -> &[u8] {
        self.wrapped_key
    }

    /// Decrypts the payload with a content key unwrapped by the caller.
    pub fn decrypt(&self, content_key: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let cipher = Aes256Gcm::new_from_slice(content_key)
            .map_err(|_| EnvelopeError::Malformed("content key is not 32 bytes"))?;
        cipher
            .decrypt(
                Nonce::from_slice(self.nonce),
                Payload {
                    msg: self.ciphertext,
                    aad: self.header,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| EnvelopeError::AuthenticationFailed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use rsa::RsaPrivateKey;
    use std::sync::OnceLock;

    fn test_key() -> &'static (RsaPrivateKey, String) {
        static KEY: OnceLock<(RsaPrivateKey, String)> = OnceLock::new();
        KEY.get_or_init(|| {
            let sk = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
            let pem = sk
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap();
            (sk, pem)
        })
    }

    /// Opens with the private key in memory, in the order the TPM path uses:
    /// parse, check the recipient, unwrap, decrypt.
    fn open_soft(env: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let (sk, pem) = test_key();
        let parsed = ParsedEnvelope::parse(env)?;
        let rk = RecipientKey::from_pem(pem).unwrap();
        if parsed.recipient_fingerprint() != rk.fingerprint() {
            return Err(EnvelopeError::Malformed("fingerprint"));
        }
        let ck = sk
            .decrypt(Oaep::new::<Sha256>(), parsed.wrapped_key())
            .map_err(|_| EnvelopeError::Malformed("unwrap"))?;
        parsed.decrypt(&ck).map(|z| z.to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip(payload in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let env = seal(&test_key().1, &payload).unwrap();
            prop_assert_eq!(open_soft(&env).unwrap(), payload);
        }

        #[test]
        fn any_flipped_bit_is_rejected(payload in proptest::collection::vec(any::<u8>(), 0..256), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut env = seal(&test_key().1, &payload).unwrap();
            let i = pos.index(env.len());
            env[i] ^= 1 << bit;
            prop_assert!(open_soft(&env).is_err());
        }

        #[test]
        fn truncation_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..256), cut in any::<prop::sample::Index>()) {
            let env = seal(&test_key().1, &payload).unwrap();
            let n = cut.index(env.len());
            prop_assert!(open_soft(&env[..n]).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = ParsedEnvelope::parse(&bytes);
        }
    }

    #[test]
    fn layout_matches_the_documented_offsets() {
        let (_, pem) = test_key();
        let env = seal(pem, b"abc").unwrap();
        let rk = RecipientKey::from_pem(pem).unwrap();
        assert_eq!(&env[..4], b"LHEV");
        assert_eq!(env[4..6], [1, 0]);
        assert_eq!(&env[6..38], rk.fingerprint());
        assert_eq!(u16::from_be_bytes([env[38], env[39]]), 256);
        // 40 + W + 12 nonce + 3 payload + 16 tag
        assert_eq!(env.len(), 40 + 256 + 12 + 3 + 16);
        let parsed = ParsedEnvelope::parse(&env).unwrap();
        assert_eq!(parsed.wrapped_key(), &env[40..296]);
    }

    #[test]
    fn rejects_bad_version_and_size() {
        let mut env = seal(&test_key().1, b"x").unwrap();
        env[4] = 9;
        assert_eq!(
            ParsedEnvelope::parse(&env).unwrap_err(),
            EnvelopeError::UnsupportedVersion {
                found: 9,
                supported: 1
            }
        );
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert!(matches!(
            seal(&test_key().1, &big),
            Err(EnvelopeError::TooLarge {
                what: "payload",
                ..
            })
        ));
        let huge = vec![0u8; MAX_ENVELOPE + 1];
        assert!(matches!(
            ParsedEnvelope::parse(&huge),
            Err(EnvelopeError::TooLarge {
                what: "envelope",
                ..
            })
        ));
        assert_eq!(
            ParsedEnvelope::parse(b"nope").unwrap_err(),
            EnvelopeError::BadMagic
        );
    }

    #[test]
    fn max_payload_fits() {
        let payload = vec![7u8; MAX_PAYLOAD];
        let env = seal(&test_key().1, &payload).unwrap();
        assert!(env.len() <= MAX_ENVELOPE);
        assert_eq!(open_soft(&env).unwrap(), payload);
    }

    #[test]
    fn small_keys_are_refused() {
        let sk = RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
        let pem = sk
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        assert!(matches!(
            seal(&pem, b"x"),
            Err(EnvelopeError::InvalidPublicKey(_))
        ));
        assert!(matches!(
            seal("garbage", b"x"),
            Err(EnvelopeError::InvalidPublicKey(_))
        ));
    }
}
