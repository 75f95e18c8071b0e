//! Public key files named on the command line (console keys, `seal --to`,
//! `secret put --to`, `verify-receipt --key`): checked here, before any
//! call, so a wrong file is refused naming the file and what is wrong with
//! it, and a private key is never sent anywhere (nor echoed: no message
//! quotes the file's content).
//!
//! Accepted: exactly one `-----BEGIN PUBLIC KEY-----` block
//! (SubjectPublicKeyInfo) holding an RSA key of 2048 to 4096 bits, the
//! keys the node reads. What is passed on is that block re-encoded, so
//! comments or other text around it never reach the node.

use std::io::Read;
use std::path::Path;

use leasehold_envelope::{RecipientKey, MIN_RSA_BITS};
use rsa::pkcs1::RsaPublicKey as Pkcs1PublicKey;
use rsa::pkcs8::der::asn1::ObjectIdentifier;
use rsa::pkcs8::der::{pem, Decode};
use rsa::pkcs8::spki::SubjectPublicKeyInfoRef;
use zeroize::Zeroizing;

use crate::{exit, CliError};

/// Largest key file read (a 4096-bit key's PEM is about 800 bytes; room
/// for comments around it).
pub const MAX_KEY_FILE: u64 = 64 * 1024;
/// Largest RSA key the node accepts (the `rsa` crate's limit).
pub const MAX_RSA_BITS: usize = rsa::RsaPublicKey::MAX_SIZE;

const RSA_OID: &str = "1.2.840.113549.1.1.1";

/// Why a key file is refused (the file is named by [`read_public_key`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be read.
    #[error("{0}")]
    Io(String),
    /// Over [`MAX_KEY_FILE`].
    #[error("{0} bytes or more: too large for a public key file (at most {MAX_KEY_FILE})")]
    TooLarge(u64),
    /// Empty, or only white space.
    #[error("empty file; expected a PEM public key (-----BEGIN PUBLIC KEY-----)")]
    Empty,
    /// A private key (PEM label or OpenSSH/PuTTY format): never sent.
    #[error(
        "holds a private key ({0}); it was not sent and must never leave its owner. \
         Give the public half instead, e.g. `openssl pkey -in FILE -pubout -out FILE.pub`"
    )]
    PrivateKey(String),
    /// Not PEM, with a hint at what it is.
    #[error("not a PEM public key: {0}")]
    NotPem(String),
    /// A PEM block that is not `PUBLIC KEY`.
    #[error("{0}")]
    WrongBlock(String),
    /// More than one `PUBLIC KEY` block.
    #[error("{0} public keys; give one per file")]
    SeveralKeys(usize),
    /// The block does not decode (base64, framing) or is not a
    /// SubjectPublicKeyInfo.
    #[error("malformed PUBLIC KEY block: {0}")]
    Malformed(String),
    /// A key of another algorithm.
    #[error(
        "{name} key (algorithm OID {oid}); Leasehold needs an RSA key \
         (rsaEncryption, OID {RSA_OID}) of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
    )]
    WrongAlgorithm {
        /// Algorithm as a person calls it (`EC (P-256)`, `Ed25519`).
        name: String,
        /// Its OID.
        oid: String,
    },
    /// An RSA key of a size the node refuses.
    #[error("RSA key of {0} bits; {MIN_RSA_BITS} to {MAX_RSA_BITS} bits are accepted")]
    BadSize(usize),
}

/// Reads and checks a public key file; `what` names its role in messages
/// (`console key`, `public key`, `node key`). Returns the key as canonical
/// PEM. Every refusal exits 6 (invalid argument) and names the file.
pub fn read_public_key(what: &str, path: &Path) -> Result<String, CliError> {
    read_file(path)
        .and_then(|bytes| check_public_key(&bytes))
        .map_err(|e| CliError::new(exit::INVALID, format!("{what} {}: {e}", path.display())))
}

fn read_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let f = std::fs::File::open(path).map_err(|e| KeyFileError::Io(e.to_string()))?;
    // The file may hold a private key: its bytes are wiped when dropped.
    let mut bytes = Zeroizing::new(Vec::new());
    f.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| KeyFileError::Io(e.to_string()))?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(KeyFileError::TooLarge(MAX_KEY_FILE + 1));
    }
    Ok(bytes)
}

/// The checks of [`read_public_key`] on the file's bytes.
pub fn check_public_key(bytes: &[u8]) -> Result<String, KeyFileError> {
    let text = String::from_utf8_lossy(bytes);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(KeyFileError::Empty);
    }
    let labels = pem_labels(&text);
    // Private keys first, before anything is decoded: whatever else the
    // file holds, it is not sent.
    if let Some(l) = labels.iter().find(|l| l.contains("PRIVATE KEY")) {
        return Err(KeyFileError::PrivateKey(format!("-----BEGIN {l}-----")));
    }
    if trimmed.starts_with("PuTTY-User-Key-File") {
        return Err(KeyFileError::PrivateKey("PuTTY .ppk".into()));
    }
    if labels.is_empty() {
        return Err(KeyFileError::NotPem(not_pem_hint(bytes, trimmed)));
    }
    let public: Vec<&String> = labels.iter().filter(|l| *l == "PUBLIC KEY").collect();
    match public.len() {
        0 => return Err(KeyFileError::WrongBlock(wrong_block(&labels[0]))),
        1 => {}
        n => return Err(KeyFileError::SeveralKeys(n)),
    }
    let block = public_key_block(&text)
        .ok_or_else(|| KeyFileError::Malformed("no -----END PUBLIC KEY----- line".into()))?;
    let (_, der) =
        pem::decode_vec(block.as_bytes()).map_err(|e| KeyFileError::Malformed(e.to_string()))?;
    let spki = SubjectPublicKeyInfoRef::from_der(&der)
        .map_err(|e| KeyFileError::Malformed(format!("not a SubjectPublicKeyInfo: {e}")))?;
    let oid = spki.algorithm.oid;
    if oid.to_string() != RSA_OID {
        let curve = spki
            .algorithm
            .parameters
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        return Err(KeyFileError::WrongAlgorithm {
            name: algorithm_name(&oid.to_string(), curve.map(|c| c.to_string()).as_deref()),
            oid: oid.to_string(),
        });
    }
    let rsa = Pkcs1PublicKey::from_der(spki.subject_public_key.raw_bytes())
        .map_err(|e| KeyFileError::Malformed(format!("not an RSA public key: {e}")))?;
    let bits = bit_len(rsa.modulus.as_bytes());
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(KeyFileError::BadSize(bits));
    }
    let canonical = pem::encode_string("PUBLIC KEY", pem::LineEnding::LF, &der)
        .map_err(|e| KeyFileError::Malformed(e.to_string()))?;
    // The node's own parser has the last word, so the CLI never accepts
    // what the node would refuse.
    RecipientKey::from_pem(&canonical).map_err(|e| KeyFileError::Malformed(e.to_string()))?;
    Ok(canonical)
}

/// Labels of the `-----BEGIN LABEL-----` lines, in order.
fn pem_labels(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("-----BEGIN ")
                .and_then(|r| r.strip_suffix("-----"))
                .map(str::to_owned)
        })
        .collect()
}

/// The `PUBLIC KEY` block, from its BEGIN line to its END line.
fn public_key_block(text: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line == "-----BEGIN PUBLIC KEY-----" {
            inside = true;
        }
        if inside {
            out.push(line);
            if line == "-----END PUBLIC KEY-----" {
                out.push("");
                return Some(out.join("\n"));
            }
        }
    }
    None
}

/// What a file without PEM blocks probably is, and how to convert it.
fn not_pem_hint(bytes: &[u8], trimmed: &str) -> String {
    let ssh = ["ssh-rsa ", "ssh-ed25519 ", "ecdsa-sha2-", "ssh-dss ", "sk-"];
    if ssh.iter().any(|p| trimmed.starts_with(p)) {
        "an OpenSSH public key; convert it: `ssh-keygen -e -m PKCS8 -f FILE > FILE.pem`".into()
    } else if bytes.first() == Some(&0x30) {
        "binary DER; convert it: `openssl pkey -pubin -inform DER -in FILE -out FILE.pem` \
         (a DER private key is refused the same way: give the public half)"
            .into()
    } else if bytes.contains(&0) || std::str::from_utf8(bytes).is_err() {
        "binary data, no -----BEGIN PUBLIC KEY----- line".into()
    } else {
        "no -----BEGIN PUBLIC KEY----- line".into()
    }
}

/// Why a PEM block that is not `PUBLIC KEY` is refused.
fn wrong_block(label: &str) -> String {
    match label {
        "RSA PUBLIC KEY" => "a PKCS#1 RSA PUBLIC KEY; Leasehold reads SubjectPublicKeyInfo \
             (-----BEGIN PUBLIC KEY-----): `openssl rsa -RSAPublicKey_in -in FILE -pubout -out FILE.pem`"
            .into(),
        "CERTIFICATE" => "a certificate, not a public key; extract the key: \
             `openssl x509 -in FILE -pubkey -noout > FILE.pem`"
            .into(),
        other => format!("a PEM {other:?} block; expected -----BEGIN PUBLIC KEY-----"),
    }
}

/// Names of the algorithms people are likely to give by mistake.
fn algorithm_name(oid: &str, param: Option<&str>) -> String {
    match oid {
        "1.2.840.10045.2.1" => {
            let curve = match param {
                Some("1.2.840.10045.3.1.7") => "P-256",
                Some("1.3.132.0.34") => "P-384",
                Some("1.3.132.0.35") => "P-521",
                Some("1.3.132.0.10") => "secp256k1",
                Some(other) => other,
                None => "unknown curve",
            };
            format!("an EC ({curve})")
        }
        "1.3.101.112" => "an Ed25519".into(),
        "1.3.101.113" => "an Ed448".into(),
        "1.3.101.110" => "an X25519".into(),
        "1.3.101.111" => "an X448".into(),
        "1.2.840.10040.4.1" => "a DSA".into(),
        "1.2.840.113549.1.1.10" => "an RSASSA-PSS (RSA restricted to PSS signatures)".into(),
        "1.2.840.113549.1.3.1" => "a Diffie-Hellman".into(),
        _ => "an unknown".into(),
    }
}

/// Bits of a big-endian unsigned integer (leading zero bytes allowed).
fn bit_len(be: &[u8]) -> usize {
    let be = match be.iter().position(|b| *b != 0) {
        Some(i) => &be[i..],
        None => return 0,
    };
    be.len() * 8 - be[0].leading_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs1::EncodeRsaPublicKey;
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

    fn key(bits: usize) -> rsa::RsaPrivateKey {
        rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).unwrap()
    }

    #[test]
    fn an_rsa_public_key_is_accepted_and_canonical() {
        let pk = key(2048).to_public_key();
        let pem = pk.to_public_key_pem(LineEnding::LF).unwrap();
        assert_eq!(check_public_key(pem.as_bytes()).unwrap(), pem);
        // Comments around the block and CRLF line ends are not sent on.
        let noisy = format!(
            "# ops console\r\n{}\r\ntrailing\r\n",
            pem.replace('\n', "\r\n")
        );
        assert_eq!(check_public_key(noisy.as_bytes()).unwrap(), pem);
    }

    #[test]
    fn private_keys_are_refused_without_decoding_or_echo() {
        let sk = key(2048);
        let pkcs8 = sk.to_pkcs8_pem(LineEnding::LF).unwrap();
        let both = format!(
            "{}{}",
            sk.to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
            *pkcs8
        );
        for text in [pkcs8.to_string(), both] {
            let e = check_public_key(text.as_bytes()).unwrap_err();
            assert!(matches!(e, KeyFileError::PrivateKey(_)), "{e}");
            let shown = e.to_string();
            let body_line = pkcs8.lines().nth(1).unwrap();
            assert!(!shown.contains(body_line), "{shown}");
            assert!(shown.contains("-----BEGIN PRIVATE KEY-----"), "{shown}");
        }
        for label in [
            "RSA PRIVATE KEY",
            "EC PRIVATE KEY",
            "OPENSSH PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY",
        ] {
            let text = format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
            assert!(matches!(
                check_public_key(text.as_bytes()),
                Err(KeyFileError::PrivateKey(_))
            ));
        }
    }

    #[test]
    fn garbage_and_other_formats_say_what_they_are() {
        let e = check_public_key(b"\0\x01\x02garbage").unwrap_err();
        assert!(e.to_string().contains("binary data"), "{e}");
        assert_eq!(check_public_key(b" \n").unwrap_err(), KeyFileError::Empty);
        let e = check_public_key(b"ssh-ed25519 AAAAC3Nza me@host\n").unwrap_err();
        assert!(e.to_string().contains("OpenSSH public key"), "{e}");
        let pk = key(2048).to_public_key();
        let der = pk.to_public_key_der().unwrap();
        let e = check_public_key(der.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("binary DER"), "{e}");
        let pkcs1 = pk.to_pkcs1_pem(LineEnding::LF).unwrap();
        let e = check_public_key(pkcs1.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("PKCS#1"), "{e}");
        let one = pk.to_public_key_pem(LineEnding::LF).unwrap();
        let e = check_public_key(format!("{one}{one}").as_bytes()).unwrap_err();
        assert_eq!(e, KeyFileError::SeveralKeys(2));
        let e = check_public_key(b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n")
            .unwrap_err();
        assert!(matches!(e, KeyFileError::Malformed(_)), "{e}");
    }

    #[test]
    fn small_rsa_keys_are_refused_with_their_size() {
        let pem = key(1024)
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        assert_eq!(
            check_public_key(pem.as_bytes()).unwrap_err(),
            KeyFileError::BadSize(1024)
        );
    }

    #[test]
    fn algorithm_names() {
        assert_eq!(
            algorithm_name("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")),
            "an EC (P-256)"
        );
        assert_eq!(algorithm_name("1.3.101.112", None), "an Ed25519");
        assert_eq!(bit_len(&[0, 0x01, 0xff]), 9);
        assert_eq!(bit_len(&[0x80, 0]), 16);
    }
}
