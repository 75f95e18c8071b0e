//! The disk-key chain (R10, R12). Pure functions; see docs/keys.md.
//!
//! ```text
//! c0 = HKDF-Extract(salt = "leasehold/chain/v1", ikm = K0)            K0 = KL
//! ci = HKDF-Extract(salt = c(i-1), ikm = AES-KW(kek = c(i-1), Ki))    K1 = KT, K2 = sub-tenant ...
//! disk key = HKDF-Expand(prk = cn, info, 64)
//! info = "leasehold/disk-key/v1" || len(node_id) as u8 || node_id
//!        || for each link: len(label) as u8 || label || key generation as u64 BE
//! ```
//!
//! Each link's key is wrapped under the chain value so far, so no level's
//! key alone (nor any strict subset of the links) yields the disk key.

use aes_kw::KekAes256;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::types::{DiskKey, SymmetricKey};

const CHAIN_SALT: &[u8] = b"leasehold/chain/v1";
const INFO_PREFIX: &[u8] = b"leasehold/disk-key/v1";

/// One link of the chain: a level's symmetric key and its generation.
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    /// Level name ("landlord", "tenant", ...); part of the derivation.
    pub label: &'a str,
    /// Generation of the symmetric key (not of the key pair).
    pub key_generation: u64,
    /// The key.
    pub key: &'a SymmetricKey,
}

/// Derives the 64-byte disk key from the chain. `links` is ordered from the
/// widest level (landlord) to the narrowest and must not be empty.
///
/// # Panics
/// Never for valid input; an empty chain is a programming error reported by
/// returning `None`.
pub fn derive_disk_key(node_id: &[u8], links: &[Link<'_>]) -> Option<DiskKey> {
    let (first, rest) = links.split_first()?;
    let (prk, _) = Hkdf::<Sha256>::extract(Some(CHAIN_SALT), first.key.expose_secret());
    let mut chain = Zeroizing::new([0u8; 32]);
    chain.copy_from_slice(&prk);
    for link in rest {
        let kek = KekAes256::from(*chain);
        let mut wrapped = Zeroizing::new([0u8; 40]);
        // Wrapping 32 bytes into a 40-byte buffer cannot fail.
        kek.wrap(link.key.expose_secret(), wrapped.as_mut()).ok()?;
        let (next, _) = Hkdf::<Sha256>::extract(Some(chain.as_ref()), wrapped.as_ref());
        chain.copy_from_slice(&next);
    }
    let mut info = Vec::with_capacity(64);
    info.extend_from_slice(INFO_PREFIX);
    push_lv(&mut info, node_id);
    for link in links {
        push_lv(&mut info, link.label.as_bytes());
        info.extend_from_slice(&link.key_generation.to_be_bytes());
    }
    let hk = Hkdf::<Sha256>::from_prk(chain.as_ref()).ok()?;
    let mut out = Zeroizing::new([0u8; 64]);
    hk.expand(&info, out.as_mut()).ok()?;
    Some(DiskKey::from_zeroizing(&out))
}

fn push_lv(buf: &mut Vec<u8>, bytes: &[u8]) {
    // Labels and node ids are short; longer input is cut at 255 bytes in the
    // length byte only, which still keeps the encoding injective for our inputs.
    buf.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    buf.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: [u8; 32]) -> SymmetricKey {
        SymmetricKey::from_bytes(b)
    }

    fn derive(node: &[u8], ks: &[([u8; 32], u64)]) -> [u8; 64] {
        let keys: Vec<SymmetricKey> = ks.iter().map(|(k, _)| key(*k)).collect();
        let labels = ["landlord", "tenant", "subtenant"];
        let links: Vec<Link<'_>> = keys
            .iter()
            .zip(ks)
            .enumerate()
            .map(|(i, (k, (_, g)))| Link {
                label: labels[i],
                key_generation: *g,
                key: k,
            })
            .collect();
        *derive_disk_key(node, &links).unwrap().expose_secret()
    }

    #[test]
    fn empty_chain_is_none() {
        assert!(derive_disk_key(b"n", &[]).is_none());
    }

    #[test]
    fn known_answer_is_stable() {
        // Pins the construction: changing it would make every volume unreadable.
        let k = derive(b"node", &[([1; 32], 1), ([2; 32], 1)]);
        assert_eq!(
            hex::encode(&k[..16]),
            KNOWN_PREFIX,
            "disk-key construction changed; this breaks existing volumes"
        );
    }
    // Computed independently with Python (hmac, cryptography.keywrap); see docs/keys.md.
    const KNOWN_PREFIX: &str = "a7f3b983f8d76082a93902558c530b05";

    proptest! {
        #[test]
        fn deterministic(node in proptest::collection::vec(any::<u8>(), 1..32), kl in any::<[u8; 32]>(), kt in any::<[u8; 32]>(), g1 in any::<u64>(), g2 in any::<u64>()) {
            prop_assert_eq!(derive(&node, &[(kl, g1), (kt, g2)]), derive(&node, &[(kl, g1), (kt, g2)]));
        }

        #[test]
        fn any_link_change_changes_key(
            node in proptest::collection::vec(any::<u8>(), 1..32),
            ks in proptest::collection::vec((any::<[u8; 32]>(), any::<u64>()), 1..4),
            which in any::<prop::sample::Index>(),
            field in 0u8..3,
            flip in 1u8..=255,
        ) {
            let base = derive(&node, &ks);
            let mut ks2 = ks.clone();
            let mut node2 = node.clone();
            let i = which.index(ks.len());
            match field {
                0 => ks2[i].0[usize::from(flip) % 32] ^= flip,
                1 => ks2[i].1 ^= u64::from(flip),
                _ => node2[0] ^= flip,
            }
            prop_assert_ne!(base, derive(&node2, &ks2));
        }

        #[test]
        fn adding_or_dropping_a_link_changes_key(node in proptest::collection::vec(any::<u8>(), 1..32), kl in any::<[u8; 32]>(), kt in any::<[u8; 32]>(), ks in any::<[u8; 32]>()) {
            let one = derive(&node, &[(kl, 1)]);
            let two = derive(&node, &[(kl, 1), (kt, 1)]);
            let three = derive(&node, &[(kl, 1), (kt, 1), (ks, 1)]);
            prop_assert_ne!(one, two);
            prop_assert_ne!(two, three);
            prop_assert_ne!(one, three);
        }
    }
}
