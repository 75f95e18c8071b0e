//! TPM quotes (R13 challenges), checked without a TPM.
//!
//! The node's attestation key (AK) is a restricted RSA-2048 signing key in
//! its TPM: the TPM signs with it only structures it made itself, so a valid
//! signature over a TPMS_ATTEST of type ATTEST_QUOTE proves the TPM quoted
//! those PCRs with that extraData. The node sets extraData to
//! [`qualifying_data`]: SHA-256 over the verifier's nonce and the node's
//! [`AttestContext`] (node id, boot id, key generations and fingerprints),
//! so a quote answers one challenge and states the node's current keys.
//! See docs/attest.md.

use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

use crate::signature::verify_signature;

/// Shortest nonce accepted (bytes).
pub const NONCE_MIN: usize = 8;
/// Longest nonce accepted (bytes).
pub const NONCE_MAX: usize = 64;
/// Highest PCR index that may be quoted (PC client TPMs have 24).
pub const MAX_PCR: u8 = 23;
/// First line of every context; changes with the context's format.
pub const CONTEXT_TAG: &str = "leasehold-attest-v1";
/// Domain label of [`qualifying_data`].
const QUALIFYING_LABEL: &[u8] = b"leasehold/attest/v1\0";

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const TPM_ALG_SHA256: u16 = 0x000b;

/// Why a quote or a quote request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// The nonce is too short or too long.
    #[error("nonce: {len} bytes; a nonce has {NONCE_MIN}..={NONCE_MAX} bytes")]
    InvalidNonce {
        /// Its length.
        len: usize,
    },
    /// The PCR list is empty or names a PCR above [`MAX_PCR`].
    #[error("pcrs: {0}")]
    InvalidPcrs(String),
    /// The AK public key is not a usable RSA key.
    #[error("attestation key: {0}")]
    InvalidKey(String),
    /// The signature does not verify with the pinned AK: another node's (or
    /// another key's) quote, or altered bytes.
    #[error(
        "the quote is not signed by this node's attestation key (another node's quote, or altered)"
    )]
    BadSignature,
    /// The quote structure is malformed (truncated, trailing bytes).
    #[error("quote structure: {0}")]
    Malformed(String),
    /// A signed structure that is not a TPM-generated quote.
    #[error("quote structure: not a TPM-generated quote ({0})")]
    NotAQuote(String),
    /// extraData is not SHA-256(nonce, context): a replayed quote (another
    /// nonce) or a context that is not the one the TPM quoted.
    #[error("the quote does not answer this challenge: its qualifying data is not this nonce and key state (replayed quote, or a changed context)")]
    QualifyingData,
    /// The quoted PCR selection is not the one asked for.
    #[error("the quote covers PCRs {quoted:?}, not the requested {requested:?}")]
    PcrSelection {
        /// PCRs in the quote.
        quoted: Vec<u8>,
        /// PCRs asked for.
        requested: Vec<u8>,
    },
    /// The PCR values given do not hash to the quoted PCR digest.
    #[error("the PCR values given do not match the quoted PCR digest (a PCR value was changed)")]
    PcrDigest,
    /// The context text is malformed.
    #[error("context, line {line}: {reason}")]
    InvalidContext {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// One level's key state as bound into a quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelKeys {
    /// Pair generation.
    pub generation: u64,
    /// Symmetric-key generation.
    pub key_generation: u64,
    /// SHA-256 of the public key's SubjectPublicKeyInfo DER, lower-case hex.
    pub fingerprint: String,
}

/// What a quote proves beyond the PCRs: who answered and with which keys.
/// Sent as text ([`AttestContext::render`]) next to the quote; the TPM
/// signed its hash (through [`qualifying_data`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestContext {
    /// The node id (hex).
    pub node_id: String,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// The landlord level.
    pub landlord: LevelKeys,
    /// The tenant level, if the node is assigned.
    pub tenant: Option<LevelKeys>,
}

fn is_hex(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.len()) && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_boot_id(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => matches!(b, b'0'..=b'9' | b'a'..=b'f'),
        })
}

impl AttestContext {
    /// The canonical text: one field per line, fixed order, `\n` endings.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{CONTEXT_TAG}\nnode_id {}\nboot_id {}\n",
            self.node_id, self.boot_id
        );
        let level = |s: &mut String, name: &str, l: Option<&LevelKeys>| {
            let _ = match l {
                Some(l) => writeln!(
                    s,
                    "{name} {} {} {}",
                    l.generation, l.key_generation, l.fingerprint
                ),
                None => writeln!(s, "{name} none"),
            };
        };
        level(&mut s, "landlord", Some(&self.landlord));
        level(&mut s, "tenant", self.tenant.as_ref());
        s
    }

    /// Parses the text of [`Self::render`]; anything but its exact output
    /// (extra spaces, other order, unknown lines) is refused, so one state
    /// has one text and one hash.
    pub fn parse(text: &str) -> Result<Self, AttestError> {
        let bad = |line: usize, reason: &str| AttestError::InvalidContext {
            line,
            reason: reason.to_owned(),
        };
        if text.len() > 1024 {
            return Err(bad(1, "longer than 1024 bytes"));
        }
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| bad(1, "does not end with a newline"))?;
        let lines: Vec<&str> = body.split('\n').collect();
        if lines.len() != 5 {
            return Err(bad(
                lines.len().min(6),
                &format!("{} lines; a context has 5", lines.len()),
            ));
        }
        if lines[0] != CONTEXT_TAG {
            return Err(bad(1, &format!("expected {CONTEXT_TAG:?}")));
        }
        let field = |i: usize, name: &str| -> Result<&str, AttestError> {
            lines[i]
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix(' '))
                .ok_or_else(|| bad(i + 1, &format!("expected \"{name} ...\"")))
        };
        let node_id = field(1, "node_id")?;
        if !is_hex(node_id, 1, 64) {
            return Err(bad(2, "node_id is not lower-case hex of 1..=64 digits"));
        }
        let boot_id = field(2, "boot_id")?;
        if !is_boot_id(boot_id) {
            return Err(bad(3, "boot_id is not a lower-case UUID"));
        }
        let level = |i: usize, name: &str| -> Result<Option<LevelKeys>, AttestError> {
            let v = field(i, name)?;
            if v == "none" {
                return Ok(None);
            }
            let parts: Vec<&str> = v.split(' ').collect();
            let num = |s: &str| {
                s.parse::<u64>()
                    .ok()
                    .filter(|n| n.to_string() == s)
                    .ok_or_else(|| bad(i + 1, &format!("{name}: {s:?} is not a generation")))
            };
            match parts.as_slice() {
                [g, k, fp] if is_hex(fp, 64, 64) => Ok(Some(LevelKeys {
                    generation: num(g)?,
                    key_generation: num(k)?,
                    fingerprint: (*fp).to_owned(),
                })),
                _ => Err(bad(
                    i + 1,
                    &format!("expected \"{name} GENERATION KEY_GENERATION FINGERPRINT\" or \"{name} none\""),
                )),
            }
        };
        let landlord =
            level(3, "landlord")?.ok_or_else(|| bad(4, "the landlord level is never none"))?;
        let tenant = level(4, "tenant")?;
        let me = Self {
            node_id: node_id.to_owned(),
            boot_id: boot_id.to_owned(),
            landlord,
            tenant,
        };
        if me.render() != text {
            return Err(bad(1, "not in canonical form"));
        }
        Ok(me)
    }
}

/// The quote's extraData: SHA-256 of a label, the nonce (length-prefixed)
/// and the context text.
pub fn qualifying_data(nonce: &[u8], context: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(QUALIFYING_LABEL);
    // The nonce is at most 64 bytes (checked by `check_request`).
    h.update([u8::try_from(nonce.len()).unwrap_or(u8::MAX)]);
    h.update(nonce);
    h.update(context.as_bytes());
    h.finalize().into()
}

/// Checks a quote request's bounds; returns the PCRs sorted and
/// deduplicated.
pub fn check_request(nonce: &[u8], pcrs: &[u32]) -> Result<Vec<u8>, AttestError> {
    if !(NONCE_MIN..=NONCE_MAX).contains(&nonce.len()) {
        return Err(AttestError::InvalidNonce { len: nonce.len() });
    }
    if pcrs.is_empty() {
        return Err(AttestError::InvalidPcrs(format!(
            "empty; name at least one PCR of 0..={MAX_PCR}"
        )));
    }
    if pcrs.len() > 64 {
        return Err(AttestError::InvalidPcrs(format!(
            "{} entries; at most 64",
            pcrs.len()
        )));
    }
    let mut v = Vec::with_capacity(pcrs.len());
    for &p in pcrs {
        match u8::try_from(p) {
            Ok(p) if p <= MAX_PCR => v.push(p),
            _ => {
                return Err(AttestError::InvalidPcrs(format!(
                    "PCR {p} is out of range 0..={MAX_PCR}"
                )))
            }
        }
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Informative fields of the quote (the TPM's clock and firmware). Not
/// checked: they prove nothing a verifier without history can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteClock {
    /// Milliseconds the TPM has been powered (TPMS_CLOCK_INFO.clock).
    pub clock: u64,
    /// TPM resets (reboots) since it was cleared.
    pub reset_count: u32,
    /// TPM restarts (resume from hibernation) since the last reset.
    pub restart_count: u32,
    /// Whether the clock never went back.
    pub safe: bool,
    /// TPM firmware version.
    pub firmware_version: u64,
}

/// A quote that verified: what it proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedQuote {
    /// Node id, boot id and key state, as the TPM signed them.
    pub context: AttestContext,
    /// (PCR, sha256 value), ascending, as the TPM quoted them.
    pub pcrs: Vec<(u8, [u8; 32])>,
    /// Clock and firmware (informative).
    pub clock: QuoteClock,
}

/// The parts of a TPMS_ATTEST of type ATTEST_QUOTE a verifier needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedQuote {
    pub extra_data: Vec<u8>,
    pub clock: QuoteClock,
    /// (hash algorithm, selected PCRs) per bank.
    pub selection: Vec<(u16, Vec<u8>)>,
    pub pcr_digest: Vec<u8>,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], AttestError> {
        if self.buf.len() < n {
            return Err(AttestError::Malformed(format!(
                "truncated in {field} ({} bytes left, {n} needed)",
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self, field: &str) -> Result<u8, AttestError> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: &str) -> Result<u16, AttestError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, field: &str) -> Result<u32, AttestError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, field: &str) -> Result<u64, AttestError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn sized(&mut self, field: &str) -> Result<&'a [u8], AttestError> {
        let n = self.u16(field)?;
        self.take(usize::from(n), field)
    }
}

/// Parses a marshalled TPMS_ATTEST that must be a TPM-generated quote.
pub(crate) fn parse_quote(attest: &[u8]) -> Result<ParsedQuote, AttestError> {
    let mut r = Reader { buf: attest };
    let magic = r.u32("magic")?;
    if magic != TPM_GENERATED_VALUE {
        return Err(AttestError::NotAQuote(format!("magic 0x{magic:08x}")));
    }
    let ty = r.u16("type")?;
    if ty != TPM_ST_ATTEST_QUOTE {
        return Err(AttestError::NotAQuote(format!("type 0x{ty:04x}")));
    }
    r.sized("qualifiedSigner")?;
    let extra_data = r.sized("extraData")?.to_vec();
    let clock = r.u64("clockInfo.clock")?;
    let reset_count = r.u32("clockInfo.resetCount")?;
    let restart_count = r.u32("clockInfo.restartCount")?;
    let safe = r.u8("clockInfo.safe")? != 0;
    let firmware_version = r.u64("firmwareVersion")?;
    let count = r.u32("pcrSelect.count")?;
    if count > 16 {
        return Err(AttestError::Malformed(format!(
            "{count} PCR banks selected"
        )));
    }
    let mut selection = Vec::new();
    for _ in 0..count {
        let hash = r.u16("pcrSelect.hash")?;
        let size = r.u8("pcrSelect.sizeofSelect")?;
        let bits = r.take(usize::from(size), "pcrSelect.pcrSelect")?;
        let mut pcrs = Vec::new();
        for (i, byte) in bits.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    // i < 256: sizeofSelect is a u8.
                    pcrs.push(u8::try_from(i * 8 + bit).unwrap_or(u8::MAX));
                }
            }
        }
        selection.push((hash, pcrs));
    }
    let pcr_digest = r.sized("pcrDigest")?.to_vec();
    if !r.buf.is_empty() {
        return Err(AttestError::Malformed(format!(
            "{} bytes after the structure",
            r.buf.len()
        )));
    }
    Ok(ParsedQuote {
        extra_data,
        clock: QuoteClock {
            clock,
            reset_count,
            restart_count,
            safe,
            firmware_version,
        },
        selection,
        pcr_digest,
    })
}

/// What a verifier checks a quote against.
#[derive(Debug, Clone, Copy)]
pub struct Challenge<'a> {
    /// The AK public key (SubjectPublicKeyInfo PEM), pinned by the verifier.
    pub ak_pem: &'a str,
    /// The nonce the verifier made for this request.
    pub nonce: &'a [u8],
    /// The PCRs it asked for.
    pub pcrs: &'a [u32],
}

/// What the node answered.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// Marshalled TPMS_ATTEST.
    pub attest: &'a [u8],
    /// RSASSA-PKCS1-v1_5 SHA-256 signature over `attest`.
    pub signature: &'a [u8],
    /// (PCR, sha256 value) as the node read them.
    pub pcr_values: &'a [(u32, Vec<u8>)],
    /// The context text ([`AttestContext::render`]).
    pub context: &'a str,
}

/// Verifies a quote offline: the AK's signature, that it is a TPM-made
/// quote, that extraData is [`qualifying_data`] of this nonce and this
/// context, that it covers exactly the requested sha256 PCRs, and that the
/// PCR values given hash to the quoted digest. The signature is checked
/// before anything in the structure is believed.
pub fn verify_quote(c: &Challenge<'_>, a: &Answer<'_>) -> Result<VerifiedQuote, AttestError> {
    let requested = check_request(c.nonce, c.pcrs)?;
    match verify_signature(c.ak_pem, a.attest, a.signature) {
        Ok(()) => {}
        Err(crate::SignatureError::InvalidPublicKey(m)) => return Err(AttestError::InvalidKey(m)),
        Err(crate::SignatureError::Mismatch) => return Err(AttestError::BadSignature),
    }
    let q = parse_quote(a.attest)?;
    let context = AttestContext::parse(a.context)?;
    let expected = qualifying_data(c.nonce, a.context);
    if q.extra_data != expected {
        return Err(AttestError::QualifyingData);
    }
    let quoted: Vec<u8> = match q.selection.as_slice() {
        [(TPM_ALG_SHA256, pcrs)] => pcrs.clone(),
        other => {
            return Err(AttestError::NotAQuote(format!(
                "{} PCR banks, expected the sha256 bank alone",
                other.len()
            )))
        }
    };
    if quoted != requested {
        return Err(AttestError::PcrSelection { quoted, requested });
    }
    let mut given: Vec<(u32, &Vec<u8>)> = a.pcr_values.iter().map(|(p, v)| (*p, v)).collect();
    given.sort_by_key(|(p, _)| *p);
    if given.len() != requested.len()
        || given
            .iter()
            .zip(&requested)
            .any(|((p, _), r)| *p != u32::from(*r))
    {
        return Err(AttestError::PcrSelection {
            quoted: given
                .iter()
                .map(|(p, _)| u8::try_from(*p).unwrap_or(u8::MAX))
                .collect(),
            requested,
        });
    }
    let mut h = Sha256::new();
    let mut pcrs = Vec::with_capacity(given.len());
    for ((_, v), p) in given.iter().zip(&requested) {
        let value: [u8; 32] = v
            .as_slice()
            .try_into()
            .map_err(|_| AttestError::PcrDigest)?;
        h.update(value);
        pcrs.push((*p, value));
    }
    if h.finalize().as_slice() != q.pcr_digest.as_slice() {
        return Err(AttestError::PcrDigest);
    }
    Ok(VerifiedQuote {
        context,
        pcrs,
        clock: q.clock,
    })
}

#[cfg(test)]
mod tests {
    use rsa::pkcs1v15::SigningKey;
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use rsa::signature::{SignatureEncoding, Signer};
    use rsa::RsaPrivateKey;

    use super::*;

    fn ctx(tenant_gen: u64) -> AttestContext {
        AttestContext {
            node_id: "0123456789abcdef0123456789abcdef".into(),
            boot_id: "6f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
            landlord: LevelKeys {
                generation: 1,
                key_generation: 1,
                fingerprint: "a".repeat(64),
            },
            tenant: Some(LevelKeys {
                generation: tenant_gen,
                key_generation: tenant_gen,
                fingerprint: format!("{tenant_gen:064x}"),
            }),
        }
    }

    /// A TPMS_ATTEST as a TPM marshals it (TPM 2.0 Part 2, 10.12.12).
    fn attest_bytes(extra: &[u8], pcrs: &[u8], digest: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&TPM_GENERATED_VALUE.to_be_bytes());
        v.extend_from_slice(&TPM_ST_ATTEST_QUOTE.to_be_bytes());
        v.extend_from_slice(&34u16.to_be_bytes());
        v.extend_from_slice(&[0x00, 0x0b]);
        v.extend_from_slice(&[7u8; 32]);
        v.extend_from_slice(&u16::try_from(extra.len()).unwrap().to_be_bytes());
        v.extend_from_slice(extra);
        v.extend_from_slice(&123_456u64.to_be_bytes());
        v.extend_from_slice(&3u32.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.push(1);
        v.extend_from_slice(&0x2019_1023_0016_3100u64.to_be_bytes());
        v.extend_from_slice(&1u32.to_be_bytes());
        v.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        v.push(3);
        let mut bits = [0u8; 3];
        for p in pcrs {
            bits[usize::from(*p / 8)] |= 1 << (p % 8);
        }
        v.extend_from_slice(&bits);
        v.extend_from_slice(&u16::try_from(digest.len()).unwrap().to_be_bytes());
        v.extend_from_slice(digest);
        v
    }

    struct Node {
        sk: RsaPrivateKey,
        pem: String,
    }

    impl Node {
        fn new() -> Self {
            let sk = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
            let pem = sk
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap();
            Self { sk, pem }
        }
        /// What an honest node answers.
        fn quote(&self, nonce: &[u8], c: &AttestContext, pcrs: &[(u32, Vec<u8>)]) -> Quote {
            let context = c.render();
            let mut h = Sha256::new();
            for (_, v) in pcrs {
                h.update(v);
            }
            let sel: Vec<u8> = pcrs
                .iter()
                .map(|(p, _)| u8::try_from(*p).unwrap())
                .collect();
            let attest = attest_bytes(&qualifying_data(nonce, &context), &sel, &h.finalize());
            self.sign(attest, pcrs.to_vec(), context)
        }
        fn sign(&self, attest: Vec<u8>, pcr_values: Vec<(u32, Vec<u8>)>, context: String) -> Quote {
            let signature = SigningKey::<Sha256>::new(self.sk.clone())
                .sign(&attest)
                .to_vec();
            Quote {
                attest,
                signature,
                pcr_values,
                context,
            }
        }
    }

    #[derive(Clone)]
    struct Quote {
        attest: Vec<u8>,
        signature: Vec<u8>,
        pcr_values: Vec<(u32, Vec<u8>)>,
        context: String,
    }

    impl Quote {
        fn answer(&self) -> Answer<'_> {
            Answer {
                attest: &self.attest,
                signature: &self.signature,
                pcr_values: &self.pcr_values,
                context: &self.context,
            }
        }
    }

    fn pcrs() -> Vec<(u32, Vec<u8>)> {
        vec![(0, vec![0u8; 32]), (1, vec![1u8; 32]), (7, vec![7u8; 32])]
    }

    #[test]
    fn honest_quote_verifies_and_states_what_it_proves() {
        let n = Node::new();
        let nonce = b"fresh-nonce-0001";
        let q = n.quote(nonce, &ctx(2), &pcrs());
        let c = Challenge {
            ak_pem: &n.pem,
            nonce,
            pcrs: &[7, 0, 1, 1],
        };
        let v = verify_quote(&c, &q.answer()).unwrap();
        assert_eq!(v.context, ctx(2));
        assert_eq!(v.pcrs.len(), 3);
        assert_eq!(v.pcrs[2], (7, [7u8; 32]));
        assert_eq!(v.clock.reset_count, 3);
        assert!(v.clock.safe);
    }

    #[test]
    fn replayed_other_node_changed_pcr_rotated_key_and_garbage_are_refused() {
        let n = Node::new();
        let other = Node::new();
        let nonce = b"verifier-nonce-2";
        let ch = Challenge {
            ak_pem: &n.pem,
            nonce,
            pcrs: &[0, 1, 7],
        };
        // Replayed: an answer to an earlier nonce.
        let old = n.quote(b"earlier-nonce-01", &ctx(2), &pcrs());
        assert_eq!(
            verify_quote(&ch, &old.answer()),
            Err(AttestError::QualifyingData)
        );
        // Another node's quote of this very nonce.
        let theirs = other.quote(nonce, &ctx(2), &pcrs());
        assert_eq!(
            verify_quote(&ch, &theirs.answer()),
            Err(AttestError::BadSignature)
        );
        // A PCR value changed after the quote.
        let mut changed = n.quote(nonce, &ctx(2), &pcrs());
        changed.pcr_values[1].1[0] ^= 1;
        assert_eq!(
            verify_quote(&ch, &changed.answer()),
            Err(AttestError::PcrDigest)
        );
        // A different PCR set from the one asked for.
        let fewer = n.quote(nonce, &ctx(2), &pcrs()[..2]);
        assert!(matches!(
            verify_quote(&ch, &fewer.answer()),
            Err(AttestError::PcrSelection { .. })
        ));
        // A key rotated: the context claims the old tenant key, but the TPM
        // quoted the new one (or the other way round).
        let mut rotated = n.quote(nonce, &ctx(3), &pcrs());
        rotated.context = ctx(2).render();
        assert_eq!(
            verify_quote(&ch, &rotated.answer()),
            Err(AttestError::QualifyingData)
        );
        // Truncated, extended and garbage structures (signed, so the parser is reached).
        let good = n.quote(nonce, &ctx(2), &pcrs());
        for cut in [0, 3, 5, 40, good.attest.len() - 1] {
            let q = n.sign(good.attest[..cut].to_vec(), pcrs(), ctx(2).render());
            assert!(
                matches!(
                    verify_quote(&ch, &q.answer()),
                    Err(AttestError::Malformed(_) | AttestError::NotAQuote(_))
                ),
                "cut at {cut}"
            );
        }
        let mut long = good.attest.clone();
        long.push(0);
        let q = n.sign(long, pcrs(), ctx(2).render());
        assert!(matches!(
            verify_quote(&ch, &q.answer()),
            Err(AttestError::Malformed(_))
        ));
        let q = n.sign(vec![0xa5; 200], pcrs(), ctx(2).render());
        assert!(matches!(
            verify_quote(&ch, &q.answer()),
            Err(AttestError::NotAQuote(_))
        ));
        // Unsigned garbage and a truncated signature.
        let mut g = good.clone();
        g.attest = vec![1, 2, 3];
        assert_eq!(
            verify_quote(&ch, &g.answer()),
            Err(AttestError::BadSignature)
        );
        let mut g = good.clone();
        g.signature.truncate(100);
        assert_eq!(
            verify_quote(&ch, &g.answer()),
            Err(AttestError::BadSignature)
        );
        // A context that is not canonical.
        let mut g = good.clone();
        g.context = g.context.replace("node_id ", "node_id  ");
        assert!(matches!(
            verify_quote(&ch, &g.answer()),
            Err(AttestError::InvalidContext { .. })
        ));
    }

    #[test]
    fn request_bounds() {
        assert_eq!(check_request(&[0; 8], &[7, 0, 7]), Ok(vec![0, 7]));
        assert!(check_request(&[0; 64], &[23]).is_ok());
        assert_eq!(
            check_request(&[0; 7], &[0]),
            Err(AttestError::InvalidNonce { len: 7 })
        );
        assert_eq!(
            check_request(&[0; 65], &[0]),
            Err(AttestError::InvalidNonce { len: 65 })
        );
        assert!(matches!(
            check_request(&[0; 8], &[]),
            Err(AttestError::InvalidPcrs(_))
        ));
        assert!(
            matches!(check_request(&[0; 8], &[24]), Err(AttestError::InvalidPcrs(m)) if m.contains("24"))
        );
        assert!(matches!(
            check_request(&[0; 8], &[u32::MAX]),
            Err(AttestError::InvalidPcrs(_))
        ));
    }

    #[test]
    fn context_round_trip_and_refusals() {
        for c in [
            ctx(1),
            AttestContext {
                tenant: None,
                ..ctx(1)
            },
        ] {
            assert_eq!(AttestContext::parse(&c.render()), Ok(c));
        }
        let good = ctx(4).render();
        for bad in [
            String::new(),
            good.trim_end().to_owned(),
            good.replace("leasehold-attest-v1", "leasehold-attest-v2"),
            good.replace("tenant 4 4", "tenant 04 4"),
            good.replace("tenant", "tenants"),
            good.replace("6f1e2d3c", "6F1E2D3C"),
            format!("{good}extra\n"),
            good.replace("landlord 1 1 ", "landlord 1 1  "),
        ] {
            assert!(AttestContext::parse(&bad).is_err(), "{bad:?}");
        }
        let no_landlord =
            good.replace(&format!("landlord 1 1 {}", "a".repeat(64)), "landlord none");
        assert!(AttestContext::parse(&no_landlord).is_err());
    }
}
