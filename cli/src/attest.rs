//! `attest` (both CLIs) and `tenantctl secret put --attest`: a TPM quote
//! of the node, verified here offline (`leasehold_envelope::attest`) against
//! the node's attestation key, pinned on first use per connection target
//! like SSH's known_hosts. docs/attest.md.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use leasehold_dbus_api::AttestProxy;
use leasehold_envelope::attest::{verify_quote, Answer, AttestError, Challenge, VerifiedQuote};
use leasehold_envelope::RecipientKey;
use rand::RngCore as _;
use serde_json::{json, Value};
use zbus::Connection;

use crate::{exit, CliError};

/// PCRs quoted unless `--pcrs` says otherwise (firmware, its config, Secure Boot).
pub const DEFAULT_PCRS: &str = "0,1,7";
/// Nonce length the CLIs use (the node accepts 8..=64).
const NONCE_LEN: usize = 32;

// Options of `attest`. No doc comment: the arguments of its subcommand are
// deferred, and once built the struct's about would replace the variant's
// (docs/cli.md, "Start-up").
#[allow(missing_docs)]
#[derive(Debug, Clone, clap::Args)]
pub struct AttestArgs {
    /// PCRs to quote (sha256 bank), comma-separated, each 0..=23.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = DEFAULT_PCRS)]
    pub pcrs: Vec<u32>,
    /// Pinned attestation keys (default: $XDG_CONFIG_HOME/leasehold/known_nodes,
    /// else ~/.config/leasehold/known_nodes).
    #[arg(long, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
    /// Refuse the quote unless PCR N has this sha256 value (hex); repeatable.
    #[arg(long = "expect-pcr", value_name = "N=HEX")]
    pub expect_pcr: Vec<String>,
    /// Refuse the quote unless the caller's level key (UT for tenantctl,
    /// UL for landlordctl) has this fingerprint, e.g. the one sealed to.
    #[arg(long = "expect-key", value_name = "FINGERPRINT")]
    pub expect_key: Option<String>,
}

impl Default for AttestArgs {
    fn default() -> Self {
        Self {
            pcrs: vec![0, 1, 7],
            pin_file: None,
            expect_pcr: Vec::new(),
            expect_key: None,
        }
    }
}

/// Whose CLI asks: picks the level `--expect-key` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// landlordctl.
    Landlord,
    /// tenantctl.
    Tenant,
}

/// A quote that verified, with how its key was pinned.
#[derive(Debug)]
pub struct Proved {
    /// What the quote proves.
    pub quote: VerifiedQuote,
    /// AK fingerprint.
    pub ak_fingerprint: String,
    /// Whether this run pinned the key (first use).
    pub newly_pinned: bool,
    /// The pin file.
    pub pin_file: PathBuf,
}

fn refused(e: AttestError) -> CliError {
    CliError::new(exit::FAILURE, format!("quote refused: {e}"))
}

fn default_pin_file() -> Result<PathBuf, CliError> {
    let base =
        match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            Some(x) => PathBuf::from(x),
            None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                Some(h) => PathBuf::from(h).join(".config"),
                None => return Err(CliError::new(
                    exit::INVALID,
                    "--pin-file: no HOME or XDG_CONFIG_HOME to find known_nodes in; name the file",
                )),
            },
        };
    Ok(base.join("leasehold").join("known_nodes"))
}

/// One line of the pin file: `TARGET NODE_ID AK_FINGERPRINT`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pin {
    target: String,
    node_id: String,
    fingerprint: String,
}

fn read_pins(path: &Path) -> Result<Vec<Pin>, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(CliError::new(
                exit::FAILURE,
                format!("{}: {e}", path.display()),
            ))
        }
    };
    let mut pins = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [t, n, fp] => pins.push(Pin {
                target: (*t).to_owned(),
                node_id: (*n).to_owned(),
                fingerprint: (*fp).to_owned(),
            }),
            _ => {
                return Err(CliError::new(
                    exit::INVALID,
                    format!(
                        "{}, line {}: expected \"TARGET NODE_ID AK_FINGERPRINT\"",
                        path.display(),
                        i + 1
                    ),
                ))
            }
        }
    }
    Ok(pins)
}

/// Appends a pin: the file is rewritten whole to a temporary file and
/// renamed over the old one, so a crash leaves the old or the new file.
fn add_pin(path: &Path, pin: &Pin) -> Result<(), CliError> {
    let err = |e: std::io::Error| CliError::new(exit::FAILURE, format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Leasehold attestation keys pinned on first use: TARGET NODE_ID AK_FINGERPRINT\n"
                .to_owned()
        }
        Err(e) => return Err(err(e)),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!(
        "{} {} {}\n",
        pin.target, pin.node_id, pin.fingerprint
    ));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn parse_expect_pcr(s: &str) -> Result<(u8, [u8; 32]), CliError> {
    let bad = || {
        CliError::new(
            exit::INVALID,
            format!("--expect-pcr {s:?}: expected N=HEX (PCR 0..=23, 64 hex digits)"),
        )
    };
    let (n, hex_value) = s.split_once('=').ok_or_else(bad)?;
    let n: u8 = n.parse().ok().filter(|n| *n <= 23).ok_or_else(bad)?;
    let v = hex::decode(hex_value.to_ascii_lowercase()).map_err(|_| bad())?;
    let v: [u8; 32] = v.try_into().map_err(|_| bad())?;
    Ok((n, v))
}

/// Asks the node for a quote of a fresh nonce and verifies it: the AK
/// pinned for `target` (pinned now if new), the signature, the nonce, the
/// PCR digest, and the expectations given. Exit 7 when the node's AK or
/// node id differs from the pinned one; 1 when the quote is refused.
pub async fn attest(
    conn: &Connection,
    target: &str,
    level: Level,
    args: &AttestArgs,
) -> Result<Proved, CliError> {
    let expect_pcrs = args
        .expect_pcr
        .iter()
        .map(|s| parse_expect_pcr(s))
        .collect::<Result<Vec<_>, _>>()?;
    let pin_file = match &args.pin_file {
        Some(p) => p.clone(),
        None => default_pin_file()?,
    };
    let pins = read_pins(&pin_file)?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    // Bounds checked before the node is asked.
    leasehold_envelope::attest::check_request(&nonce, &args.pcrs)
        .map_err(|e| CliError::new(exit::INVALID, format!("--pcrs: {e}")))?;

    let p = AttestProxy::new(conn)
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    let ak_pem = p.attestation_key().await?;
    let (attest, signature, pcr_values, context) = p.attest(&nonce, &args.pcrs).await?;
    let ak_fp = RecipientKey::from_pem(&ak_pem)
        .map_err(|e| CliError::new(exit::FAILURE, format!("the node's attestation key: {e}")))?
        .fingerprint_hex();

    let pinned = pins.iter().find(|p| p.target == target);
    if let Some(pin) = pinned {
        if pin.fingerprint != ak_fp {
            return Err(CliError::new(
                exit::NOT_NODE_KEY,
                format!(
                    "WARNING: THE ATTESTATION KEY OF {target} HAS CHANGED: pinned {} (node {}), the node now presents {ak_fp}. \
                     Another node, or the node was re-initialised. Nothing was trusted. \
                     If the change is expected, remove the line for {target} from {}",
                    pin.fingerprint,
                    pin.node_id,
                    pin_file.display()
                ),
            ));
        }
    }
    let challenge = Challenge {
        ak_pem: &ak_pem,
        nonce: &nonce,
        pcrs: &args.pcrs,
    };
    let answer = Answer {
        attest: &attest,
        signature: &signature,
        pcr_values: &pcr_values,
        context: &context,
    };
    let quote = verify_quote(&challenge, &answer).map_err(refused)?;
    if let Some(pin) = pinned {
        if pin.node_id != quote.context.node_id {
            return Err(CliError::new(
                exit::NOT_NODE_KEY,
                format!(
                    "WARNING: {target} was pinned as node {}, but its TPM quotes node {}; refusing. See {}",
                    pin.node_id,
                    quote.context.node_id,
                    pin_file.display()
                ),
            ));
        }
    }
    for (n, v) in &expect_pcrs {
        match quote.pcrs.iter().find(|(p, _)| p == n) {
            Some((_, got)) if got == v => {}
            Some((_, got)) => {
                return Err(CliError::new(
                    exit::FAILURE,
                    format!(
                        "quote refused: PCR {n} is {}, expected {} (a changed boot chain)",
                        hex::encode(got),
                        hex::encode(v)
                    ),
                ))
            }
            None => {
                return Err(CliError::new(
                    exit::INVALID,
                    format!("--expect-pcr {n}: PCR {n} is not in --pcrs"),
                ))
            }
        }
    }
    if let Some(want) = &args.expect_key {
        let (name, keys) = match level {
            Level::Landlord => ("landlord", Some(&quote.context.landlord)),
            Level::Tenant => ("tenant", quote.context.tenant.as_ref()),
        };
        let got = keys.map(|k| k.fingerprint.as_str());
        if got != Some(want.to_ascii_lowercase().as_str()) {
            return Err(CliError::new(
                exit::FAILURE,
                format!(
                    "quote refused: the node's current {name} key is {}, not the expected {want} (the key was rotated or re-keyed)",
                    got.unwrap_or("none")
                ),
            ));
        }
    }
    let newly_pinned = pinned.is_none();
    if newly_pinned {
        add_pin(
            &pin_file,
            &Pin {
                target: target.to_owned(),
                node_id: quote.context.node_id.clone(),
                fingerprint: ak_fp.clone(),
            },
        )?;
        crate::output::note(&format!(
            "pinned the attestation key {ak_fp} of {target} (node {}) in {}",
            quote.context.node_id,
            pin_file.display()
        ));
    }
    Ok(Proved {
        quote,
        ak_fingerprint: ak_fp,
        newly_pinned,
        pin_file,
    })
}

/// `--json` of `attest` (docs/json.md).
pub fn proved_json(p: &Proved) -> Value {
    let c = &p.quote.context;
    let level = |l: &leasehold_envelope::attest::LevelKeys| json!({"generation": l.generation, "key_generation": l.key_generation, "fingerprint": l.fingerprint});
    let pcrs: serde_json::Map<String, Value> = p
        .quote
        .pcrs
        .iter()
        .map(|(n, v)| (n.to_string(), Value::from(hex::encode(v))))
        .collect();
    let clock = &p.quote.clock;
    json!({
        "verified": true,
        "node_id": c.node_id,
        "boot_id": c.boot_id,
        "attestation_key": p.ak_fingerprint,
        "newly_pinned": p.newly_pinned,
        "pin_file": p.pin_file,
        "landlord": level(&c.landlord),
        "tenant": c.tenant.as_ref().map(level),
        "pcrs": pcrs,
        "clock": {
            "clock_ms": clock.clock,
            "reset_count": clock.reset_count,
            "restart_count": clock.restart_count,
            "safe": clock.safe,
            "firmware_version": format!("{:016x}", clock.firmware_version),
        },
    })
}

/// Text of `attest`: what the quote proved.
pub fn proved_text(p: &Proved) -> String {
    let c = &p.quote.context;
    let level = |l: Option<&leasehold_envelope::attest::LevelKeys>| match l {
        Some(l) => format!(
            "generation {}, key generation {}, key {}",
            l.generation, l.key_generation, l.fingerprint
        ),
        None => "none".to_owned(),
    };
    let mut out = vec![
        format!(
            "verified: a fresh TPM quote by attestation key {}{}",
            p.ak_fingerprint,
            if p.newly_pinned {
                " (pinned now: first use)"
            } else {
                " (pinned)"
            }
        ),
        format!("node      {}", c.node_id),
        format!("boot      {}", c.boot_id),
        format!("landlord  {}", level(Some(&c.landlord))),
        format!("tenant    {}", level(c.tenant.as_ref())),
    ];
    for (n, v) in &p.quote.pcrs {
        out.push(format!("pcr {n:<5} {}", hex::encode(v)));
    }
    let clock = &p.quote.clock;
    out.push(format!(
        "tpm       clock {} ms, resets {}, restarts {}, firmware {:016x} (informative)",
        clock.clock, clock.reset_count, clock.restart_count, clock.firmware_version
    ));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_round_trip_and_bad_lines_are_named() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("sub/known_nodes");
        assert!(read_pins(&f).unwrap().is_empty());
        let pin = Pin {
            target: "local".into(),
            node_id: "ab".into(),
            fingerprint: "cd".into(),
        };
        add_pin(&f, &pin).unwrap();
        add_pin(
            &f,
            &Pin {
                target: "h2".into(),
                ..pin.clone()
            },
        )
        .unwrap();
        let pins = read_pins(&f).unwrap();
        assert_eq!(pins.len(), 2);
        assert_eq!(pins[0], pin);
        std::fs::write(&f, "local ab\n").unwrap();
        let e = read_pins(&f).unwrap_err();
        assert!(e.message.contains("line 1"), "{}", e.message);
        assert_eq!(e.code, exit::INVALID);
    }

    #[test]
    fn expect_pcr_is_checked() {
        let (n, v) = parse_expect_pcr(&format!("7={}", "AB".repeat(32))).unwrap();
        assert_eq!((n, v), (7, [0xab; 32]));
        for bad in ["7", "24=00", "x=00", "7=zz", "7=00"] {
            assert_eq!(
                parse_expect_pcr(bad).unwrap_err().code,
                exit::INVALID,
                "{bad}"
            );
        }
    }
}
