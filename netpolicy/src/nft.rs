//! nftables ruleset for a node: one table `inet leasehold`, the landlord's
//! and the tenant's boundaries in separate base chains on the same hooks,
//! so a packet must pass both (the kernel enforces the intersection too).
//! Peers live in interval sets (merged, so no overlapping elements), one
//! per entry and family. The whole table is replaced in one transaction.
//!
//! This first backend writes nft's text syntax and applies it with
//! `nft -f -`; the performance targets (one-peer change at 100k
//! peers) will decide between this, the JSON API and netlink.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::model::{to_cidrs, Action, Boundary, Direction, Entry, Family, Proto};

/// Name of the table.
pub const TABLE: &str = "leasehold";

fn set_name(level: &str, entry: &Entry, fam: Family) -> String {
    let fam = if fam == Family::V4 { "v4" } else { "v6" };
    // Entry names are [A-Za-z0-9._-]; nft identifiers take [A-Za-z0-9_].
    let clean: String = entry
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{level}_{clean}_{fam}")
}

fn ports_expr(ports: &crate::ranges::Ranges) -> Option<String> {
    if *ports == crate::model::all_ports() {
        return None;
    }
    Some(format!("{{ {} }}", ports.to_strings().join(", ")))
}

/// Rules of one entry for one hook direction.
fn entry_rules(out: &mut String, level: &str, e: &Entry, dir: Direction) {
    if !e.directions.contains(&dir) {
        return;
    }
    for fam in [Family::V4, Family::V6] {
        if e.peers.family(fam).is_empty() {
            continue;
        }
        let (ipkw, icmpkw) = if fam == Family::V4 {
            ("ip", "icmp")
        } else {
            ("ip6", "icmpv6")
        };
        let addr = if dir == Direction::In {
            "saddr"
        } else {
            "daddr"
        };
        let set = set_name(level, e, fam);
        for (proto, ports) in &e.protocols {
            let l4 = match proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
                Proto::Icmp => icmpkw,
            };
            let port_part = match (proto, ports_expr(ports)) {
                (Proto::Icmp, _) | (_, None) => String::new(),
                (_, Some(p)) => format!(" {l4} dport {p}"),
            };
            let _ = writeln!(
                out,
                "    {ipkw} {addr} @{set} meta l4proto {l4}{port_part} accept comment \"{}\"",
                e.name
            );
        }
    }
}

fn sets(out: &mut String, level: &str, b: &Boundary) {
    for e in b.allow.iter().chain(&b.failsafe) {
        for fam in [Family::V4, Family::V6] {
            let r = e.peers.family(fam);
            if r.is_empty() {
                continue;
            }
            let ty = if fam == Family::V4 {
                "ipv4_addr"
            } else {
                "ipv6_addr"
            };
            let _ = writeln!(
                out,
                "  set {} {{\n    type {ty}\n    flags interval\n    elements = {{ {} }}\n  }}",
                set_name(level, e, fam),
                to_cidrs(fam, r).join(", ")
            );
        }
    }
}

fn chain(
    out: &mut String,
    name: &str,
    hook: &str,
    prio: i32,
    level: &str,
    b: &Boundary,
    failsafe: &[(String, &Entry)],
) {
    let dir = if hook == "input" {
        Direction::In
    } else {
        Direction::Out
    };
    let lo = if hook == "input" { "iif" } else { "oif" };
    let _ = writeln!(
        out,
        "  chain {name} {{\n    type filter hook {hook} priority {prio}; policy accept;"
    );
    let _ = writeln!(
        out,
        "    ct state established,related accept\n    {lo} \"lo\" accept"
    );
    // IPv6 cannot work without neighbour discovery.
    let _ = writeln!(
        out,
        "    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert }} accept"
    );
    for (flevel, e) in failsafe {
        entry_rules(out, flevel, e, dir);
    }
    for e in &b.allow {
        entry_rules(out, level, e, dir);
    }
    let last = match b.action {
        Action::Drop => "counter drop comment \"leasehold: denied\"".to_owned(),
        Action::Reject => {
            "meta l4proto tcp counter reject with tcp reset comment \"leasehold: denied\"\n    counter reject with icmpx type admin-prohibited comment \"leasehold: denied\"".to_owned()
        }
    };
    let _ = writeln!(out, "    {last}\n  }}");
}

/// The complete transaction: (re)create the table with both boundaries.
/// Deleting and re-adding the table in one `nft -f` is atomic: the old
/// ruleset stays in force if anything in the new one is refused.
pub fn ruleset(cluster: &Boundary, sub: Option<&Boundary>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
    );
    sets(&mut s, "ll", cluster);
    if let Some(t) = sub {
        sets(&mut s, "tt", t);
    }
    let failsafe: Vec<(String, &Entry)> = cluster
        .failsafe
        .iter()
        .map(|e| ("ll".to_owned(), e))
        .collect();
    chain(
        &mut s,
        "landlord_in",
        "input",
        -10,
        "ll",
        cluster,
        &failsafe,
    );
    chain(
        &mut s,
        "landlord_out",
        "output",
        -10,
        "ll",
        cluster,
        &failsafe,
    );
    if let Some(t) = sub {
        chain(&mut s, "tenant_in", "input", -5, "tt", t, &failsafe);
        chain(&mut s, "tenant_out", "output", -5, "tt", t, &failsafe);
    }
    s.push_str("}\n");
    s
}

/// Why applying failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// nft could not be run.
    #[error("cannot run nft: {0}")]
    Spawn(#[from] std::io::Error),
    /// nft refused the transaction (nothing changed).
    #[error("nft refused the ruleset (the previous ruleset stays in force): {0}")]
    Refused(String),
}

/// Applies the ruleset with `nft -f -` (optionally prefixed, e.g. with
/// `ip netns exec NS` in tests).
pub fn apply(script: &str, prefix: &[&str]) -> Result<(), ApplyError> {
    let (prog, args): (&str, Vec<&str>) = match prefix.split_first() {
        Some((p, rest)) => (p, rest.iter().copied().chain(["nft", "-f", "-"]).collect()),
        None => ("nft", vec!["-f", "-"]),
    };
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("nft stdin"))?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ApplyError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BoundaryDoc;

    #[test]
    fn ruleset_has_both_levels_and_merged_sets() {
        let c = BoundaryDoc::from_toml(
            "[[allow]]\nname = \"cluster\"\npeers = [\"10.0.0.0/25\", \"10.0.0.128/25\", \"fd00::/64\"]\n",
        )
        .unwrap()
        .validate(true)
        .unwrap();
        let t = BoundaryDoc::from_toml(
            "action = \"reject\"\n[[allow]]\nname = \"https\"\npeers = [\"10.0.0.0/24\"]\ndirection = \"in\"\nprotocols = [{ proto = \"tcp\", ports = [443] }]\n",
        )
        .unwrap()
        .validate(false)
        .unwrap();
        let r = ruleset(&c, Some(&t));
        assert!(r.contains("elements = { 10.0.0.0/24 }"), "{r}");
        assert!(r.contains("hook input priority -10") && r.contains("hook input priority -5"));
        assert!(r.contains("ip saddr @tt_https_v4 meta l4proto tcp tcp dport { 443 } accept"));
        assert!(r.contains("reject with tcp reset"));
        assert!(!r.contains("tt_https_v6"));
    }
}
