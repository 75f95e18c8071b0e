//! nftables ruleset for a node: one table `inet leasehold`, the landlord's
//! and the tenant's boundaries in separate base chains on the same hooks,
//! so a packet must pass both (the kernel enforces the intersection too).
//!
//! Peers live in two kinds of sets per entry and family: single hosts in a
//! hash set (`…_h4`/`…_h6`), prefixes and ranges, merged, in an interval
//! set (`…_n4`/`…_n6`). Measured with nft 1.0.6 at 100k peers (docs/
//! netpolicy.md): the nft tool reads an interval set back before changing
//! one element (≈1.2 s), but not a hash set (<10 ms); loading 100k hosts
//! into a hash set is also faster than into an interval set. So adding or
//! removing a host costs the same at 10 or 100,000 peers; a prefix change
//! costs in the number of prefixes of that entry.
//!
//! Every change is one `nft -f -` transaction: the whole table (delete and
//! re-create, atomic: the old ruleset stays if anything is refused), or,
//! when only set contents differ, element additions and removals.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use crate::model::{to_cidrs, Action, Boundary, Direction, Entry, Family, Proto};

/// Name of the table.
pub const TABLE: &str = "leasehold";

/// One named set of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SetDef {
    family: Family,
    interval: bool,
    elements: BTreeSet<Elem>,
}

/// One set element. Hosts are kept as addresses, not text: comparing two
/// sets of 100k hosts (the one-peer change) is then a walk over plain
/// values, ≈10× faster than over strings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Elem {
    Host(IpAddr),
    Net(String),
}

impl std::fmt::Display for Elem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Elem::Host(a) => a.fmt(f),
            Elem::Net(n) => f.write_str(n),
        }
    }
}

fn joined(elements: &BTreeSet<Elem>) -> String {
    let mut s = String::with_capacity(elements.len() * 16);
    for (i, el) in elements.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{el}");
    }
    s
}

/// The table for one (cluster, sub-boundary) pair: its sets and the text of
/// its chains. Two rulesets with equal chains differ only in set elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    sets: BTreeMap<String, SetDef>,
    chains: String,
    /// Appended to every set name (see [`Ruleset::with_suffix`]).
    suffix: String,
}

fn ports_expr(ports: &crate::ranges::Ranges) -> Option<String> {
    if *ports == crate::model::all_ports() {
        return None;
    }
    Some(format!("{{ {} }}", ports.to_strings().join(", ")))
}

fn host_addr(f: Family, v: u128) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(u32::MAX))),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// Set names of one entry: `<level><a|f><index>_<h|n><4|6>`; the index
/// keeps names unique whatever the entry names are (they go in comments).
fn entry_sets(
    sets: &mut BTreeMap<String, SetDef>,
    prefix: &str,
    e: &Entry,
) -> Vec<(Family, String)> {
    let mut used = Vec::new();
    for fam in [Family::V4, Family::V6] {
        let n = if fam == Family::V4 { '4' } else { '6' };
        let hosts: BTreeSet<Elem> = e
            .hosts
            .iter()
            .filter(|(f, _)| *f == fam)
            .map(|&(f, v)| Elem::Host(host_addr(f, v)))
            .collect();
        if !hosts.is_empty() {
            let name = format!("{prefix}_h{n}");
            sets.insert(
                name.clone(),
                SetDef {
                    family: fam,
                    interval: false,
                    elements: hosts,
                },
            );
            used.push((fam, name));
        }
        let nets = e.nets.family(fam);
        if !nets.is_empty() {
            let name = format!("{prefix}_n{n}");
            sets.insert(
                name.clone(),
                SetDef {
                    family: fam,
                    interval: true,
                    elements: to_cidrs(fam, nets).into_iter().map(Elem::Net).collect(),
                },
            );
            used.push((fam, name));
        }
    }
    used
}

/// Rules of one entry for one hook direction.
fn entry_rules(out: &mut String, e: &Entry, sets: &[(Family, String)], dir: Direction) {
    if !e.directions.contains(&dir) {
        return;
    }
    for (fam, set) in sets {
        let (ipkw, icmpkw) = if *fam == Family::V4 {
            ("ip", "icmp")
        } else {
            ("ip6", "icmpv6")
        };
        let addr = if dir == Direction::In {
            "saddr"
        } else {
            "daddr"
        };
        // Every protocol with every port: one rule without a protocol match.
        if Proto::ALL
            .iter()
            .all(|p| e.protocols.get(p) == Some(&crate::model::all_ports()))
        {
            let _ = writeln!(
                out,
                "    {ipkw} {addr} @{set} accept comment \"{}\"",
                e.name
            );
            continue;
        }
        for (proto, ports) in &e.protocols {
            let l4 = match proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
                Proto::Icmp => icmpkw,
                Proto::Other => "!= { tcp, udp, icmp, ipv6-icmp }",
            };
            let port_part = match (proto.has_ports(), ports_expr(ports)) {
                (false, _) | (_, None) => String::new(),
                (true, Some(p)) => format!(" {l4} dport {p}"),
            };
            let _ = writeln!(
                out,
                "    {ipkw} {addr} @{set} meta l4proto {l4}{port_part} accept comment \"{}\"",
                e.name
            );
        }
    }
}

type Rules<'a> = Vec<(&'a Entry, Vec<(Family, String)>)>;

fn chain(
    out: &mut String,
    name: &str,
    hook: &str,
    prio: i32,
    action: Action,
    failsafe: &Rules<'_>,
    allow: &Rules<'_>,
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
    for (e, sets) in failsafe.iter().chain(allow) {
        entry_rules(out, e, sets, dir);
    }
    let last = match action {
        Action::Drop => "counter drop comment \"leasehold: denied\"".to_owned(),
        Action::Reject => {
            "meta l4proto tcp counter reject with tcp reset comment \"leasehold: denied\"\n    counter reject with icmpx type admin-prohibited comment \"leasehold: denied\"".to_owned()
        }
    };
    let _ = writeln!(out, "    {last}\n  }}");
}

fn collect_rules<'a>(sets: &mut BTreeMap<String, SetDef>, tag: &str, es: &'a [Entry]) -> Rules<'a> {
    es.iter()
        .enumerate()
        .map(|(i, e)| (e, entry_sets(sets, &format!("{tag}{i}"), e)))
        .collect()
}

impl Ruleset {
    /// The table enforcing `cluster` (with its failsafe entries, which also
    /// open the tenant's chains) and, if any, the tenant's sub-boundary.
    pub fn build(cluster: &Boundary, sub: Option<&Boundary>) -> Ruleset {
        let mut sets = BTreeMap::new();

        let failsafe = collect_rules(&mut sets, "llf", &cluster.failsafe);
        let allow = collect_rules(&mut sets, "lla", &cluster.allow);
        let mut chains = String::new();
        chain(
            &mut chains,
            "landlord_in",
            "input",
            -10,
            cluster.action,
            &failsafe,
            &allow,
        );
        chain(
            &mut chains,
            "landlord_out",
            "output",
            -10,
            cluster.action,
            &failsafe,
            &allow,
        );
        if let Some(t) = sub {
            let tallow = collect_rules(&mut sets, "tta", &t.allow);
            chain(
                &mut chains,
                "tenant_in",
                "input",
                -5,
                t.action,
                &failsafe,
                &tallow,
            );
            chain(
                &mut chains,
                "tenant_out",
                "output",
                -5,
                t.action,
                &failsafe,
                &tallow,
            );
        }
        Ruleset {
            sets,
            chains,
            suffix: String::new(),
        }
    }

    /// The same ruleset with its sets named `<set><suffix>` (in the sets and
    /// in the rules that look them up). A staged full apply fills sets of a
    /// new generation next to the live ones, then switches the chains over
    /// in one transaction; the suffix tells the generations apart.
    pub fn with_suffix(mut self, suffix: &str) -> Ruleset {
        if self.suffix == suffix {
            return self;
        }
        let old = std::mem::take(&mut self.suffix);
        let base = |n: &str| n.strip_suffix(old.as_str()).unwrap_or(n).to_owned();
        self.sets = std::mem::take(&mut self.sets)
            .into_iter()
            .map(|(n, d)| (format!("{}{suffix}", base(&n)), d))
            .collect();
        // Set references are `@name` followed by a space or line end.
        let mut chains = String::with_capacity(self.chains.len() + 64);
        let mut rest = self.chains.as_str();
        while let Some(at) = rest.find('@') {
            chains.push_str(&rest[..=at]);
            rest = &rest[at + 1..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let b = base(&rest[..end]);
            if self.sets.contains_key(&format!("{b}{suffix}")) {
                chains.push_str(&b);
                chains.push_str(suffix);
            } else {
                chains.push_str(&rest[..end]);
            }
            rest = &rest[end..];
        }
        chains.push_str(rest);
        self.chains = chains;
        self.suffix = suffix.to_owned();
        self
    }

    /// The suffix of the set names (empty as built).
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// Elements in hash sets (single hosts).
    pub fn hash_elements(&self) -> usize {
        self.sets
            .values()
            .filter(|d| !d.interval)
            .map(|d| d.elements.len())
            .sum()
    }

    /// First step of a staged apply: create this ruleset's sets (refused
    /// if one exists), interval sets with their elements. No rule uses
    /// them yet, so nothing changes for packets.
    pub fn stage_script(&self) -> String {
        let mut s = format!("table inet {TABLE}\n");
        for (name, d) in &self.sets {
            let ty = if d.family == Family::V4 {
                "ipv4_addr"
            } else {
                "ipv6_addr"
            };
            let flags = if d.interval { " flags interval;" } else { "" };
            let _ = writeln!(s, "create set inet {TABLE} {name} {{ type {ty};{flags} }}");
            if d.interval && !d.elements.is_empty() {
                let _ = writeln!(
                    s,
                    "add element inet {TABLE} {name} {{ {} }}",
                    joined(&d.elements)
                );
            }
        }
        s
    }

    /// Second step: the hash sets' elements, to send over netlink.
    pub fn hash_fill(&self) -> Vec<crate::netlink::ElemChange> {
        self.sets
            .iter()
            .filter(|(_, d)| !d.interval && !d.elements.is_empty())
            .map(|(name, d)| crate::netlink::ElemChange {
                set: name.clone(),
                add: true,
                addrs: d
                    .elements
                    .iter()
                    .filter_map(|x| match x {
                        Elem::Host(a) => Some(*a),
                        Elem::Net(_) => None,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Last step, one transaction: empty the table's chains, delete the
    /// chains and sets (`old_chains`, `old_sets`: what the kernel has) that
    /// this ruleset does not have, and fill the chains with this ruleset's
    /// rules, which use the staged sets.
    pub fn switch_script(&self, old_chains: &[String], old_sets: &[String]) -> String {
        let mut s = format!("flush table inet {TABLE}\n");
        let counts = self.rule_counts();
        for c in old_chains.iter().filter(|c| !counts.contains_key(*c)) {
            let _ = writeln!(s, "delete chain inet {TABLE} {c}");
        }
        for set in old_sets.iter().filter(|n| !self.sets.contains_key(*n)) {
            let _ = writeln!(s, "delete set inet {TABLE} {set}");
        }
        let _ = write!(s, "table inet {TABLE} {{\n{}}}\n", self.chains);
        s
    }

    /// The sets whose elements differ between `old` and `self`, as
    /// (name, new, old), or None when the chains or the sets themselves
    /// differ (then only a full apply will do).
    fn changed_sets<'a>(
        &'a self,
        old: &'a Ruleset,
    ) -> Option<Vec<(&'a String, &'a SetDef, &'a SetDef)>> {
        if self.chains != old.chains || self.sets.len() != old.sets.len() {
            return None;
        }
        let mut out = Vec::new();
        for ((n1, new), (n2, old)) in self.sets.iter().zip(&old.sets) {
            if n1 != n2 || new.family != old.family || new.interval != old.interval {
                return None;
            }
            if new.elements != old.elements {
                out.push((n1, new, old));
            }
        }
        Some(out)
    }

    /// The hash-set element changes that turn `old` into `self`, or None
    /// when anything else differs (chains, sets, interval-set contents).
    pub fn element_delta(&self, old: &Ruleset) -> Option<Vec<crate::netlink::ElemChange>> {
        let mut out = Vec::new();
        for (name, new, old) in self.changed_sets(old)? {
            if new.interval {
                return None;
            }
            for (add, from, minus) in [(false, old, new), (true, new, old)] {
                let addrs = from
                    .elements
                    .difference(&minus.elements)
                    .map(|x| match x {
                        Elem::Host(a) => Some(*a),
                        Elem::Net(_) => None,
                    })
                    .collect::<Option<Vec<IpAddr>>>()?;
                if !addrs.is_empty() {
                    out.push(crate::netlink::ElemChange {
                        set: name.clone(),
                        add,
                        addrs,
                    });
                }
            }
        }
        Some(out)
    }

    /// Every set's elements as the kernel lists them.
    pub fn set_elements(&self) -> impl Iterator<Item = (&String, BTreeSet<String>)> {
        self.sets
            .iter()
            .map(|(n, d)| (n, d.elements.iter().map(Elem::to_string).collect()))
    }

    /// Number of rules per chain, from the generated text (one rule per
    /// line), to check what the kernel lists against.
    pub fn rule_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in self.chains.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("chain ") {
                let name = rest.trim_end_matches('{').trim().to_owned();
                counts.insert(name.clone(), 0);
                current = Some(name);
            } else if line == "}" {
                current = None;
            } else if !line.starts_with("type filter hook") {
                if let Some(c) = &current {
                    *counts.entry(c.clone()).or_default() += 1;
                }
            }
        }
        counts
    }

    /// Number of set elements (hosts plus CIDRs).
    pub fn elements(&self) -> usize {
        self.sets.values().map(|s| s.elements.len()).sum()
    }

    /// The complete transaction: (re)create the table. Deleting and
    /// re-adding the table in one `nft -f` is atomic.
    pub fn full_script(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
        );
        for (name, d) in &self.sets {
            let ty = if d.family == Family::V4 {
                "ipv4_addr"
            } else {
                "ipv6_addr"
            };
            let flags = if d.interval {
                "\n    flags interval"
            } else {
                ""
            };
            let _ = writeln!(s, "  set {name} {{\n    type {ty}{flags}");
            // nft refuses an empty `elements = { }`.
            if !d.elements.is_empty() {
                s.push_str("    elements = { ");
                s.push_str(&joined(&d.elements));
                s.push_str(" }\n");
            }
            s.push_str("  }\n");
        }
        s.push_str(&self.chains);
        s.push_str("}\n");
        s
    }

    /// The transaction that turns `old` (what is in the kernel) into `self`
    /// by changing set elements only, or None when the chains or the sets
    /// themselves differ (then [`Ruleset::full_script`] is needed). An
    /// empty string means nothing to do.
    pub fn update_script(&self, old: &Ruleset) -> Option<String> {
        let mut s = String::new();
        for (name, new, old) in self.changed_sets(old)? {
            if new.interval {
                // Elements of an interval set are merged ranges: one more
                // prefix can swallow others, so the set is refilled (in the
                // same transaction; cost grows with this set's prefixes).
                let _ = writeln!(s, "flush set inet {TABLE} {name}");
                let _ = writeln!(
                    s,
                    "add element inet {TABLE} {name} {{ {} }}",
                    joined(&new.elements)
                );
                continue;
            }
            for (verb, from, minus) in [("delete", old, new), ("add", new, old)] {
                let list: Vec<String> = from
                    .elements
                    .difference(&minus.elements)
                    .map(Elem::to_string)
                    .collect();
                if !list.is_empty() {
                    let _ = writeln!(
                        s,
                        "{verb} element inet {TABLE} {name} {{ {} }}",
                        list.join(", ")
                    );
                }
            }
        }
        Some(s)
    }
}

/// The full transaction for `cluster` and `sub` (see [`Ruleset::build`]).
pub fn ruleset(cluster: &Boundary, sub: Option<&Boundary>) -> String {
    Ruleset::build(cluster, sub).full_script()
}

/// The script that removes the table (lifting every boundary).
pub fn remove_script() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
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

fn nft(prefix: &[&str], args: &[&str]) -> Command {
    let (prog, rest): (&str, Vec<&str>) = match prefix.split_first() {
        Some((p, rest)) => (
            p,
            rest.iter()
                .copied()
                .chain(["nft"])
                .chain(args.iter().copied())
                .collect(),
        ),
        None => ("nft", args.to_vec()),
    };
    let mut c = Command::new(prog);
    c.args(rest);
    c
}

/// `nft [extra] -s list table inet leasehold`, or None when there is no
/// such table.
fn list_table(prefix: &[&str], extra: &[&str]) -> Result<Option<String>, ApplyError> {
    let mut args = extra.to_vec();
    args.extend(["-s", "list", "table", "inet", TABLE]);
    let out = nft(prefix, &args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("No such file or directory") {
        Ok(None)
    } else {
        Err(ApplyError::Refused(err.trim().to_owned()))
    }
}

/// The table as the kernel has it, without counters (`nft -s list table`),
/// or None when there is no such table.
pub fn current(prefix: &[&str]) -> Result<Option<String>, ApplyError> {
    list_table(prefix, &[])
}

/// The same as JSON (`nft -j -s list table`): what the agent compares to
/// notice changes made behind its back.
pub fn current_json(prefix: &[&str]) -> Result<Option<String>, ApplyError> {
    list_table(prefix, &["-j"])
}

/// Names of the table's chains and sets, without reading set elements
/// (`nft -j list chains` and `nft -j -t list sets`, a few ms each; listing
/// the table reads every element: ≈0.7 s at 100k). Empty when the table
/// is absent.
pub fn objects(prefix: &[&str]) -> Result<(Vec<String>, Vec<String>), ApplyError> {
    let mut out = (Vec::new(), Vec::new());
    for (kind, args) in [
        ("chain", &["-j", "list", "chains", "inet"][..]),
        ("set", &["-j", "-t", "list", "sets", "inet"][..]),
    ] {
        let o = nft(prefix, args).stdin(Stdio::null()).output()?;
        if !o.status.success() {
            return Err(ApplyError::Refused(
                String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            ));
        }
        let doc: serde_json::Value = serde_json::from_slice(&o.stdout)
            .map_err(|e| ApplyError::Refused(format!("cannot parse nft -j output: {e}")))?;
        let names = doc
            .get("nftables")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|x| x.get(kind))
            .filter(|x| x.get("table").and_then(serde_json::Value::as_str) == Some(TABLE))
            .filter_map(|x| x.get("name").and_then(serde_json::Value::as_str))
            .map(str::to_owned);
        if kind == "chain" {
            out.0.extend(names);
        } else {
            out.1.extend(names);
        }
    }
    Ok(out)
}

/// Starts `nft monitor` on ruleset changes (tables, chains, rules, sets,
/// elements); each line of its stdout is one change notification from the
/// kernel's nftables netlink group.
pub fn monitor(prefix: &[&str]) -> std::io::Result<std::process::Child> {
    nft(prefix, &["monitor", "ruleset"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
}

/// Applies a script with `nft -f -` (optionally prefixed, e.g. with
/// `ip netns exec NS` in tests).
pub fn apply(script: &str, prefix: &[&str]) -> Result<(), ApplyError> {
    if script.is_empty() {
        return Ok(());
    }
    let mut child = nft(prefix, &["-f", "-"])
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
        assert!(r.contains("ip saddr @tta0_n4 meta l4proto tcp tcp dport { 443 } accept"));
        assert!(r.contains("reject with tcp reset"));
        assert!(!r.contains("tta0_n6") && !r.contains("tta0_h4"));
        let counts = Ruleset::build(&c, Some(&t)).rule_counts();
        assert_eq!(counts.len(), 4, "{counts:?}");
        // established, lo, ND, failsafe (none), "cluster" (every protocol: one rule per v4 and v6 set), drop.
        assert_eq!(counts["landlord_in"], 3 + 2 + 1, "{r}");
        // established, lo, ND, tcp/443 (v4), two reject rules.
        assert_eq!(counts["tenant_in"], 3 + 1 + 2, "{r}");
    }

    fn hosts(n: u32) -> Boundary {
        let peers: Vec<String> = (0..n)
            .map(|i| format!("\"{}\"", Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        BoundaryDoc::from_toml(&format!(
            "[[allow]]\nname = \"hosts\"\npeers = [{}, \"192.168.0.0/16\"]\n",
            peers.join(", ")
        ))
        .unwrap()
        .validate(true)
        .unwrap()
    }

    #[test]
    fn adjacent_hosts_stay_single_elements_in_a_hash_set() {
        let r = Ruleset::build(&hosts(3), None);
        let s = r.full_script();
        assert!(s.contains("set lla0_h4 {\n    type ipv4_addr\n    elements = { 10.0.0.0, 10.0.0.1, 10.0.0.2 }"), "{s}");
        assert!(s.contains("set lla0_n4 {\n    type ipv4_addr\n    flags interval\n    elements = { 192.168.0.0/16 }"), "{s}");
        assert_eq!(r.elements(), 4);
    }

    #[test]
    fn a_generation_suffix_renames_sets_and_lookups() {
        let r = Ruleset::build(&hosts(3), None).with_suffix("_g2");
        assert_eq!(r.suffix(), "_g2");
        let names: Vec<&String> = r.set_elements().map(|(n, _)| n).collect();
        assert_eq!(names, ["lla0_h4_g2", "lla0_n4_g2"]);
        assert!(
            r.chains.contains("ip saddr @lla0_h4_g2 accept"),
            "{}",
            r.chains
        );
        assert!(!r.chains.contains("@lla0_h4 "));
        // Renaming again replaces the suffix; back to none is as built.
        let back = r.with_suffix("_g3").with_suffix("");
        assert_eq!(back, Ruleset::build(&hosts(3), None));
        let r = Ruleset::build(&hosts(3), None).with_suffix("_g5");
        assert_eq!(r.hash_elements(), 3);
        let stage = r.stage_script();
        assert!(
            stage.contains("create set inet leasehold lla0_h4_g5 { type ipv4_addr; }"),
            "{stage}"
        );
        assert!(
            stage.contains("add element inet leasehold lla0_n4_g5 { 192.168.0.0/16 }"),
            "{stage}"
        );
        assert!(
            !stage.contains("10.0.0.1"),
            "hosts go over netlink: {stage}"
        );
        assert_eq!(r.hash_fill()[0].addrs.len(), 3);
        let switch = r.switch_script(
            &["landlord_in".into(), "tenant_in".into()],
            &["lla0_h4_g4".into(), "lla0_h4_g5".into()],
        );
        assert!(switch.starts_with("flush table inet leasehold\ndelete chain inet leasehold tenant_in\ndelete set inet leasehold lla0_h4_g4\ntable inet leasehold {\n"), "{switch}");
        assert!(!switch.contains("delete set inet leasehold lla0_h4_g5"));
    }

    #[test]
    fn one_host_more_is_one_element_added() {
        let old = Ruleset::build(&hosts(1000), None);
        let new = Ruleset::build(&hosts(1001), None);
        assert_eq!(
            new.update_script(&old).unwrap(),
            "add element inet leasehold lla0_h4 { 10.0.3.232 }\n"
        );
        assert_eq!(
            old.update_script(&new).unwrap(),
            "delete element inet leasehold lla0_h4 { 10.0.3.232 }\n"
        );
        assert_eq!(old.update_script(&old).unwrap(), "");
        // A new entry changes the chains: a full apply is needed.
        let c = BoundaryDoc::from_toml(
            "[[allow]]\nname = \"x\"\npeers = [\"10.0.0.1\"]\ndirection = \"in\"\n",
        )
        .unwrap()
        .validate(true)
        .unwrap();
        assert!(Ruleset::build(&c, None).update_script(&old).is_none());
    }
}
