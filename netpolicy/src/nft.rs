//! nftables ruleset for a node: one table `inet leasehold`, the landlord's
//! and the tenant's boundaries in separate base chains on the same hooks
//! (input, output, and two at forward), so a packet must pass both (the
//! kernel enforces the intersection too). See [`Ruleset::build_with`].
//!
//! Entries sharing a signature (directions, protocols, ports) share their
//! sets and rules: single hosts in a hash set (`…_h4`/`…_h6`), prefixes
//! and ranges, merged, in an interval set (`…_n4`/`…_n6`), so sets and
//! rules grow with the signatures, not the entries. Measured with nft
//! 1.0.6 at 100k peers (docs/netpolicy.md): the nft tool reads an interval
//! set back before changing one element (≈1.2 s), but not a hash set
//! (<10 ms); loading 100k hosts into a hash set is also faster than into
//! an interval set. So adding or removing a host costs the same at 10 or
//! 100,000 peers; a prefix change costs in the prefixes of that signature.
//!
//! Every change is one `nft -f -` transaction: the whole table (delete and
//! re-create, atomic: the old ruleset stays if anything is refused), or,
//! when only set contents differ, element additions and removals.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use crate::model::{to_cidrs, Action, Boundary, DhcpServer, Direction, Entry, Family, Proto};

/// Name of the table.
pub const TABLE: &str = "leasehold";

/// The classes of the table's deny rules, each counted by a named counter
/// object `deny_<class>` (docs/netpolicy.md "Deny counters"): the last rule
/// of each base chain of both levels, the engines' chains together (no
/// engine is told apart), engines' connections to the node's own
/// services (`engines_node`), router control, and DHCP replies from anyone but
/// the cluster boundary's `dhcp_servers` (input and ingress chains
/// together). A fixed set: every table
/// declares all of them, so a reader finds each, 0 included, and reads
/// them without listing rules or set elements.
pub const DENY_CLASSES: [&str; 12] = [
    "landlord_in",
    "landlord_out",
    "landlord_fwd_in",
    "landlord_fwd_out",
    "tenant_in",
    "tenant_out",
    "tenant_fwd_in",
    "tenant_fwd_out",
    "engines_out",
    "engines_node",
    "router",
    "dhcp",
];

/// Prefix of the deny counters' object names.
pub const DENY_COUNTER_PREFIX: &str = "deny_";

/// The counter statement of a deny rule of `class` (one of
/// [`DENY_CLASSES`]).
fn deny_counter(class: &str) -> String {
    format!("counter name \"{DENY_COUNTER_PREFIX}{class}\"")
}

/// The declarations of every deny counter, for a `table { … }` block.
/// Declaring one that exists is a no-op in the kernel (its values stay).
fn deny_counter_decls() -> String {
    let mut s = String::new();
    for c in DENY_CLASSES {
        let _ = writeln!(s, "  counter {DENY_COUNTER_PREFIX}{c} {{\n  }}");
    }
    s
}

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

/// Networks of the node's own side of forwarded traffic (e.g. a tenant's
/// engine subnet): a forwarded packet from such a source skips the inbound
/// check, one to such a destination skips the outbound check. Empty by
/// default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// The internal networks.
    pub internal: crate::model::Peers,
    /// Engines with an egress boundary of their own (see [`EngineEgress`]).
    pub engines: Vec<EngineEgress>,
    /// The interfaces that get an ingress chain keeping DHCP replies from
    /// anyone but the cluster's `dhcp_servers` away from packet sockets
    /// (only when `dhcp_servers` is set). See [`ingress_devices`].
    pub dhcp_devices: Vec<String>,
}

/// Most interfaces given a DHCP ingress chain (one chain each).
pub const DHCP_DEVICES_MAX: usize = 256;

/// Whether nft can be given `name` as an interface: 1–15 characters of
/// `[A-Za-z0-9._@+-]` (Linux allows more; such an interface gets no
/// ingress chain and is named by [`ingress_devices`]).
pub fn device_name_ok(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b))
}

/// The interfaces of this network namespace that get a DHCP ingress chain
/// (every one but `lo`, sorted, at most [`DHCP_DEVICES_MAX`]), and those
/// left out (a name nft cannot be given, or beyond the limit).
pub fn ingress_devices() -> std::io::Result<(Vec<String>, Vec<String>)> {
    let mut names: Vec<String> = nix::net::if_::if_nameindex()
        .map_err(std::io::Error::from)?
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.dedup();
    let (mut ok, mut left): (Vec<String>, Vec<String>) =
        names.into_iter().partition(|n| device_name_ok(n));
    if ok.len() > DHCP_DEVICES_MAX {
        left.extend(ok.split_off(DHCP_DEVICES_MAX));
    }
    Ok((ok, left))
}

/// Most engines with an egress boundary in one table: each adds a chain
/// and its sets, and every engine packet walks the jump rules in turn.
pub const ENGINES_MAX: usize = 256;

/// Where nft resolves a `socket cgroupv2` path (fixed in nft 1.0.6).
pub const CGROUP2_BASE: &str = "/sys/fs/cgroup";

/// The bit of the conntrack mark that says a connection over `lo` was
/// opened by an engine (set in `engines_out`, read in `engines_in`).
pub const ENGINE_LO_MARK: u32 = 0x1000_0000;

/// The packet mark (`SO_MARK`) of the agent's `tcp` and `http` probes of
/// engines: `engines_out` sends them through the engines' checks, so a
/// probe, run by the agent as root, reaches an engine's listener and no
/// service of the node's (a tenant would otherwise scan the node's ports,
/// read their banners and hold their connections through its spec).
pub const PROBE_MARK: u32 = ENGINE_LO_MARK;

/// An engine's rules, enforced on the packets of sockets in its cgroup
/// (the engines share the node's network namespace): the node guard
/// (every engine: its connections to the node's own addresses reach only
/// engines' sockets) and, if it has one, its egress boundary. nft turns the
/// path into the cgroup's id when the table is loaded, so the directory
/// must exist then, and a cgroup made again under the same name is a new
/// id: the agent keeps the engine's cgroup for as long as the rules name
/// it (docs/netpolicy.md, "Engines").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEgress {
    /// The engine (rule comments).
    pub name: String,
    /// Its cgroup below [`CGROUP2_BASE`], as nft resolves it.
    pub cgroup: String,
    /// Depth of that cgroup in the cgroup v2 hierarchy (1: a child of the
    /// root): the rule matches a socket whose cgroup has this ancestor at
    /// that level, so every instance below the engine's cgroup is covered.
    pub level: u32,
    /// The engine's egress boundary (its outbound entries are enforced);
    /// `None`: the node guard only.
    pub boundary: Option<Boundary>,
    /// The cgroup directory's inode when the rules were made (0: not
    /// read). nft resolves the path once, at load: a cgroup made again
    /// under the same name (the engines' unit restarted) is a new one, and
    /// rules for it that compare equal to the old ones would never be
    /// loaded again.
    pub cgroup_id: u64,
    /// The same for its parent, the tenant's subtree (0: not read).
    pub subtree_id: u64,
}

/// Why an [`EngineEgress`] cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EgressError {
    /// The cgroup is not below [`CGROUP2_BASE`] or not a plain path.
    #[error("engine {engine}: cgroup {cgroup} cannot be named to nft: {reason}")]
    Cgroup {
        /// The engine.
        engine: String,
        /// The path given.
        cgroup: String,
        /// Why.
        reason: &'static str,
    },
}

impl EngineEgress {
    /// The rules for engine `name` whose cgroup is the directory `dir` of
    /// the cgroup v2 mount `mount` (nft reads paths below [`CGROUP2_BASE`],
    /// so `dir` must be there; `mount` gives the level): the node guard
    /// and the egress `boundary`.
    pub fn new(
        name: &str,
        mount: &std::path::Path,
        dir: &std::path::Path,
        boundary: Boundary,
    ) -> Result<EngineEgress, EgressError> {
        EngineEgress::with(name, mount, dir, Some(boundary))
    }

    /// [`EngineEgress::new`] for an engine without an egress boundary:
    /// the node guard only.
    pub fn guard_only(
        name: &str,
        mount: &std::path::Path,
        dir: &std::path::Path,
    ) -> Result<EngineEgress, EgressError> {
        EngineEgress::with(name, mount, dir, None)
    }

    /// The tenant's subtree holding the engine's cgroup (its parent):
    /// `(level, path)` as nft names it.
    pub fn subtree(&self) -> (u32, String) {
        let parent = self
            .cgroup
            .rsplit_once('/')
            .map_or(String::new(), |(p, _)| p.to_owned());
        (self.level.saturating_sub(1), parent)
    }

    fn with(
        name: &str,
        mount: &std::path::Path,
        dir: &std::path::Path,
        boundary: Option<Boundary>,
    ) -> Result<EngineEgress, EgressError> {
        let bad = |reason| EgressError::Cgroup {
            engine: name.to_owned(),
            cgroup: dir.display().to_string(),
            reason,
        };
        let rel = dir
            .strip_prefix(CGROUP2_BASE)
            .map_err(|_| bad("not below /sys/fs/cgroup"))?;
        let depth = dir
            .strip_prefix(mount)
            .map_err(|_| bad("not below the cgroup v2 mount"))?
            .components()
            .count();
        let mut parts = Vec::new();
        for c in rel.components() {
            match c {
                std::path::Component::Normal(s) => match s.to_str() {
                    Some(s)
                        if s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
                    {
                        parts.push(s)
                    }
                    _ => return Err(bad("a part is not [A-Za-z0-9._-]")),
                },
                _ => return Err(bad("not a plain path")),
            }
        }
        if depth == 0 {
            return Err(bad("the root of the hierarchy is every process"));
        }
        // The node guard matches the engines' parent (the tenant's
        // subtree): the root would be every process.
        if depth == 1 {
            return Err(bad(
                "its parent is the root of the hierarchy (every process), not a subtree of engines",
            ));
        }
        // The name goes into rule comments (nft: 128 bytes, quoted).
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(bad("the engine name is not 1-64 of [A-Za-z0-9._-]"));
        }
        Ok(EngineEgress {
            name: name.to_owned(),
            cgroup: parts.join("/"),
            level: u32::try_from(depth).map_err(|_| bad("too deep"))?,
            boundary,
            cgroup_id: 0,
            subtree_id: 0,
        })
    }
}

/// What entries sharing sets have in common: directions and protocols
/// with ports. Entries with the same signature (at one level, failsafe
/// apart from allow) share their sets and rules, so the number of sets and
/// rules grows with the signatures, not the entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Sig {
    directions: Vec<Direction>,
    protocols: BTreeMap<Proto, crate::ranges::Ranges>,
}

/// Entries of one signature: their names (for the rule comment), hosts
/// and prefixes per family.
struct Group<'a> {
    sig: Sig,
    names: Vec<&'a str>,
    hosts: [BTreeSet<Elem>; 2],
    nets: [Vec<(u128, u128)>; 2],
    /// Set names used, per family.
    sets: Vec<(Family, String)>,
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

fn fam_index(f: Family) -> usize {
    usize::from(f == Family::V6)
}

/// Groups `es` by signature, in the order signatures first appear (so a
/// set's name, `<tag><signature index>_<h|n><4|6>`, stays the same when
/// hosts are added to or removed from existing entries), and defines
/// their sets: hosts as written in a hash set, prefixes merged in an
/// interval set.
/// The signature index of each entry, numbered in order of first
/// appearance (the `<i>` of its set names).
fn signature_indices(es: &[Entry]) -> (Vec<usize>, Vec<Sig>) {
    let mut index: std::collections::HashMap<Sig, usize> = std::collections::HashMap::new();
    let mut sigs = Vec::new();
    let of = es
        .iter()
        .map(|e| {
            let sig = Sig {
                directions: e.directions.clone(),
                protocols: e.protocols.clone(),
            };
            *index.entry(sig.clone()).or_insert_with(|| {
                sigs.push(sig);
                sigs.len() - 1
            })
        })
        .collect();
    (of, sigs)
}

fn groups<'a>(sets: &mut BTreeMap<String, SetDef>, tag: &str, es: &'a [Entry]) -> Vec<Group<'a>> {
    let (of, sigs) = signature_indices(es);
    let mut out: Vec<Group<'a>> = sigs
        .into_iter()
        .map(|sig| Group {
            sig,
            names: Vec::new(),
            hosts: [BTreeSet::new(), BTreeSet::new()],
            nets: [Vec::new(), Vec::new()],
            sets: Vec::new(),
        })
        .collect();
    for (e, &i) in es.iter().zip(&of) {
        let g = &mut out[i];
        g.names.push(&e.name);
        for &(f, v) in &e.hosts {
            g.hosts[fam_index(f)].insert(Elem::Host(host_addr(f, v)));
        }
        for f in FAMILIES {
            g.nets[fam_index(f)].extend_from_slice(e.nets.family(f).intervals());
        }
    }
    for (i, g) in out.iter_mut().enumerate() {
        for f in FAMILIES {
            let n = if f == Family::V4 { '4' } else { '6' };
            let hosts = std::mem::take(&mut g.hosts[fam_index(f)]);
            if !hosts.is_empty() {
                let name = format!("{tag}{i}_h{n}");
                sets.insert(
                    name.clone(),
                    SetDef {
                        family: f,
                        interval: false,
                        elements: hosts,
                    },
                );
                g.sets.push((f, name));
            }
            let nets =
                crate::ranges::Ranges::from_intervals(std::mem::take(&mut g.nets[fam_index(f)]));
            if !nets.is_empty() {
                let name = format!("{tag}{i}_n{n}");
                sets.insert(
                    name.clone(),
                    SetDef {
                        family: f,
                        interval: true,
                        elements: to_cidrs(f, &nets).into_iter().map(Elem::Net).collect(),
                    },
                );
                g.sets.push((f, name));
            }
        }
    }
    out
}

/// nft's limit for a rule comment, in bytes.
const COMMENT_MAX: usize = 128;

/// The entry names of a rule's comment, cut to nft's limit with a count
/// of the names left out (names are `[A-Za-z0-9._-]`, no quoting needed).
fn comment(names: &[&str]) -> String {
    let full = names.join(", ");
    if full.len() <= COMMENT_MAX {
        return full;
    }
    let mut s = String::new();
    for (i, n) in names.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        // This name fits if the count of those after it still does.
        let tail = format!(" +{} more", names.len() - i - 1);
        if s.len() + sep.len() + n.len() + tail.len() > COMMENT_MAX {
            let _ = write!(s, " +{} more", names.len() - i);
            return s;
        }
        s.push_str(sep);
        s.push_str(n);
    }
    s
}

/// The hook and the address a chain checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// input: the peer is the source.
    Input,
    /// output: the peer is the destination.
    Output,
    /// forward, checked as inbound for the source.
    FwdIn,
    /// forward, checked as outbound for the destination.
    FwdOut,
}

impl Hook {
    fn dir(self) -> Direction {
        match self {
            Hook::Input | Hook::FwdIn => Direction::In,
            Hook::Output | Hook::FwdOut => Direction::Out,
        }
    }
    fn addr(self) -> &'static str {
        match self.dir() {
            Direction::In => "saddr",
            _ => "daddr",
        }
    }
    fn nft(self) -> &'static str {
        match self {
            Hook::Input => "input",
            Hook::Output => "output",
            Hook::FwdIn | Hook::FwdOut => "forward",
        }
    }
}

/// The rules matching a group's peers (`addr`: saddr/daddr) and its
/// protocols and destination ports.
fn set_rules(out: &mut String, g: &Group<'_>, addr: &str, note: &str) {
    let every = Proto::ALL
        .iter()
        .all(|p| g.sig.protocols.get(p) == Some(&crate::model::all_ports()));
    for (fam, set) in &g.sets {
        let (ipkw, icmpkw) = if *fam == Family::V4 {
            ("ip", "icmp")
        } else {
            ("ip6", "icmpv6")
        };
        // Every protocol with every port: one rule without a protocol match.
        if every {
            let _ = writeln!(out, "    {ipkw} {addr} @{set} accept comment \"{note}\"");
            continue;
        }
        for (proto, ports) in &g.sig.protocols {
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
                "    {ipkw} {addr} @{set} meta l4proto {l4}{port_part} accept comment \"{note}\""
            );
        }
    }
}

/// Rules of one signature group for one chain.
fn group_rules(out: &mut String, g: &Group<'_>, hook: Hook) {
    if !g.sig.directions.contains(&hook.dir()) {
        return;
    }
    set_rules(out, g, hook.addr(), &comment(&g.names));
}

/// The other half of a failsafe flow without conntrack state: in the
/// output chain the node's packets *from* the ports of an inbound failsafe
/// entry to its peers (and in the input chain the peers' packets from the
/// ports of an outbound one). Conntrack picks up a flow it has no entry for
/// (the table just loaded, an entry cut) from whichever packet comes first:
/// if that is the node's reply, an SSH session to the node would otherwise
/// look like a new outbound flow from port 22 and be refused, killing the
/// session the failsafe entry exists for.
///
/// Only TCP segments without SYN: a picked-up session is mid-stream, and
/// without a SYN no new connection can be opened through the rule (review:
/// the rule took every protocol of the entry, so an outbound `udp 53`
/// failsafe let anyone who spoofs the resolver reach every UDP service of
/// the node, an outbound `tcp 443` let any host connect from port 443 to
/// sshd, and an entry without `protocols` became both-ways). UDP and the
/// rest need none: their conntrack entry is made by the first packet, which
/// the entry's own direction admits, and the cut keeps failsafe flows.
/// Cost: the node may send non-SYN segments from a failsafe port to a
/// failsafe peer.
fn failsafe_reverse_rules(out: &mut String, g: &Group<'_>, hook: Hook) {
    let back = match hook {
        Hook::Input => Direction::Out,
        Hook::Output => Direction::In,
        Hook::FwdIn | Hook::FwdOut => return,
    };
    if !g.sig.directions.contains(&back) {
        return;
    }
    let Some(ports) = g.sig.protocols.get(&Proto::Tcp) else {
        return;
    };
    let port_part = ports_expr(ports).map_or_else(String::new, |p| format!(" tcp sport {p}"));
    let addr = hook.addr();
    for (fam, set) in &g.sets {
        let ipkw = if *fam == Family::V4 { "ip" } else { "ip6" };
        let _ = writeln!(
            out,
            "    {ipkw} {addr} @{set} meta l4proto tcp{port_part} tcp flags & syn == 0 accept comment \"leasehold: failsafe reply\""
        );
    }
}

/// Addresses of one family as an anonymous nft set, or None when empty.
fn anon(f: Family, r: &crate::ranges::Ranges) -> Option<String> {
    (!r.is_empty()).then(|| format!("{{ {} }}", to_cidrs(f, r).join(", ")))
}

/// What every chain of a table shares: the failsafe groups, the routers
/// and the internal networks.
struct Common<'a> {
    failsafe: &'a [Group<'a>],
    routers: &'a crate::model::Peers,
    internal: &'a crate::model::Peers,
    dhcp: Option<&'a BTreeSet<DhcpServer>>,
}

/// DHCP (v4) and DHCPv6: (family, server port, client port, address
/// keyword, nfproto, where clients send).
const DHCP_FAMILIES: [(Family, u16, u16, &str, &str, &str); 2] = [
    (Family::V4, 67, 68, "ip", "ipv4", "255.255.255.255"),
    (Family::V6, 547, 546, "ip6", "ipv6", "ff02::1:2"),
];

/// Rules letting DHCP replies through only from `servers` (the address,
/// and the Ethernet source where pinned), the others dropped, counted:
/// the input chains and the ingress chains. A family without a listed
/// server has every reply dropped.
fn dhcp_reply_rules(out: &mut String, servers: &BTreeSet<DhcpServer>) {
    for (fam, sp, cp, kw, proto, _) in DHCP_FAMILIES {
        let of_fam = || servers.iter().filter(move |s| s.family == fam);
        let plain: Vec<String> = of_fam()
            .filter(|s| s.mac.is_none())
            .map(|s| s.ip().to_string())
            .collect();
        if !plain.is_empty() {
            let _ = writeln!(
                out,
                "    udp sport {sp} udp dport {cp} {kw} saddr {{ {} }} accept comment \"leasehold: dhcp server\"",
                plain.join(", ")
            );
        }
        for s in of_fam() {
            if let Some(mac) = s.mac_text() {
                let _ = writeln!(
                    out,
                    "    udp sport {sp} udp dport {cp} {kw} saddr {} ether saddr {mac} accept comment \"leasehold: dhcp server\"",
                    s.ip()
                );
            }
        }
        let _ = writeln!(
            out,
            "    meta nfproto {proto} udp sport {sp} udp dport {cp} {} drop comment \"leasehold: not a dhcp server\"",
            deny_counter("dhcp")
        );
    }
}

/// The node's DHCP client requests (broadcast or multicast, and unicast
/// renewals to the servers): output chains.
fn dhcp_request_rules(out: &mut String, servers: &BTreeSet<DhcpServer>) {
    for (fam, sp, cp, kw, _, all) in DHCP_FAMILIES {
        let mut to: Vec<String> = servers
            .iter()
            .filter(|s| s.family == fam)
            .map(|s| s.ip().to_string())
            .collect();
        if to.is_empty() {
            continue;
        }
        to.sort();
        to.dedup();
        to.insert(0, all.to_owned());
        let _ = writeln!(
            out,
            "    udp sport {cp} udp dport {sp} {kw} daddr {{ {} }} accept comment \"leasehold: dhcp client\"",
            to.join(", ")
        );
    }
}

/// One ingress chain per interface (priority -500, before the packet
/// sockets of DHCP clients see a frame): DHCP replies only from the
/// servers. Everything else passes (the input chains decide).
fn dhcp_ingress(out: &mut String, servers: &BTreeSet<DhcpServer>, devices: &[String]) {
    for (k, dev) in devices
        .iter()
        .filter(|d| device_name_ok(d))
        .take(DHCP_DEVICES_MAX)
        .enumerate()
    {
        let _ = writeln!(
            out,
            "  chain dhcp_ingress{k} {{\n    type filter hook ingress device \"{dev}\" priority -500; policy accept;"
        );
        dhcp_reply_rules(out, servers);
        out.push_str("  }\n");
    }
}

fn chain(
    out: &mut String,
    name: &str,
    hook: Hook,
    prio: i32,
    action: Action,
    common: &Common<'_>,
    allow: &[Group<'_>],
) {
    let _ = writeln!(
        out,
        "  chain {name} {{\n    type filter hook {} priority {prio}; policy accept;",
        hook.nft()
    );
    match hook {
        Hook::Input => {
            // Established flows first (the common packet); then router
            // control, before "related" (an ICMP redirect about an
            // established flow is related): router advertisements and
            // redirects only from the named routers, whoever else sends
            // them, allowed peers included.
            let _ = writeln!(out, "    ct state established accept");
            if let Some(r) = anon(Family::V6, &common.routers.v6) {
                let _ = writeln!(
                    out,
                    "    ip6 saddr {r} icmpv6 type {{ nd-router-advert, nd-redirect }} accept"
                );
            }
            let _ = writeln!(
                out,
                "    icmpv6 type {{ nd-router-advert, nd-redirect }} {} drop comment \"leasehold: not a named router\"",
                deny_counter("router")
            );
            if let Some(r) = anon(Family::V4, &common.routers.v4) {
                let _ = writeln!(out, "    ip saddr {r} icmp type redirect accept");
            }
            let _ = writeln!(
                out,
                "    icmp type redirect {} drop comment \"leasehold: not a named router\"",
                deny_counter("router")
            );
            // DHCP replies only from the named servers, allowed peers
            // included (kernel-socket clients; packet-socket clients are
            // served by the ingress chains).
            if let Some(d) = common.dhcp {
                dhcp_reply_rules(out, d);
            }
            let _ = writeln!(out, "    ct state related accept\n    iif \"lo\" accept");
            // IPv6 cannot work without neighbour discovery.
            let _ = writeln!(
                out,
                "    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept"
            );
        }
        Hook::Output => {
            let _ = writeln!(
                out,
                "    ct state established,related accept\n    oif \"lo\" accept"
            );
            let _ = writeln!(
                out,
                "    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept"
            );
            if let Some(d) = common.dhcp {
                dhcp_request_rules(out, d);
            }
        }
        Hook::FwdIn | Hook::FwdOut => {
            let _ = writeln!(out, "    ct state established,related accept");
            let addr = hook.addr();
            if let Some(n) = anon(Family::V4, &common.internal.v4) {
                let _ = writeln!(out, "    ip {addr} {n} accept comment \"internal\"");
            }
            if let Some(n) = anon(Family::V6, &common.internal.v6) {
                let _ = writeln!(out, "    ip6 {addr} {n} accept comment \"internal\"");
            }
        }
    }
    for g in common.failsafe.iter().chain(allow) {
        group_rules(out, g, hook);
    }
    for g in common.failsafe {
        failsafe_reverse_rules(out, g, hook);
    }
    let last = denial(action, &deny_counter(name), "leasehold: denied");
    let _ = writeln!(out, "    {last}\n  }}");
}

/// The last rule (or two) of a chain that denies: `action`, counted by
/// `counter`, commented `note`; a reject answers TCP with a reset and the
/// rest with ICMP admin-prohibited.
fn denial(action: Action, counter: &str, note: &str) -> String {
    match action {
        Action::Drop => format!("{counter} drop comment \"{note}\""),
        Action::Reject => format!(
            "meta l4proto tcp {counter} reject with tcp reset comment \"{note}\"\n    {counter} reject with icmpx type admin-prohibited comment \"{note}\""
        ),
    }
}

/// The four base chains of one level: input and output, and two at the
/// forward hook (see [`Ruleset::build_with`]).
fn level(
    out: &mut String,
    who: &str,
    prio: i32,
    action: Action,
    common: &Common<'_>,
    allow: &[Group<'_>],
) {
    for (suffix, hook, p) in [
        ("in", Hook::Input, prio),
        ("out", Hook::Output, prio),
        ("fwd_in", Hook::FwdIn, prio),
        ("fwd_out", Hook::FwdOut, prio + 1),
    ] {
        chain(
            out,
            &format!("{who}_{suffix}"),
            hook,
            p,
            action,
            common,
            allow,
        );
    }
}

/// The engines' rules (see [`Ruleset::build_with`]).
///
/// Output, chain `engines_out` at priority -3 (after the landlord's and
/// the tenant's, so a packet must pass all three): a packet of a socket in
/// the tenant's subtree goes to `engines_sub` (one socket lookup; every
/// other process's packets pass, and a new flow of theirs over `lo` has
/// the engine bit cleared: a stale entry an engine left on the same tuple
/// must not get a node's own packet refused at input). In `engines_sub`
/// every new flow of an engine is marked in conntrack ([`ENGINE_LO_MARK`]),
/// so what reaches the node's own sockets (over `lo`, or as the local copy
/// of a broadcast or multicast) is checked at input; over `lo`, a packet
/// in the original direction of a flow the engine did not open (a host
/// flow's tuple reused) and an untracked one are dropped, the rest passes;
/// elsewhere replies pass and the rest goes to the engine's own chain if
/// it has an egress boundary: what its outbound entries allow passes, the
/// rest meets its action, counted.
///
/// Input, chain `engines_in` (priority -3): a new flow with the engine bit
/// reaches only a socket in the tenant's subtree (itself, another engine);
/// a service of the node (sshd, the agent's metrics, a resolver on
/// 127.0.0.53) is refused and counted (`deny_engines_node`). Packets
/// without a socket (the kernel's own, neighbour discovery) pass both.
fn engines(out: &mut String, sets: &mut BTreeMap<String, SetDef>, es: &[EngineEgress]) {
    if es.is_empty() {
        return;
    }
    // Per subtree, the inodes its engines saw it with, in the rules'
    // comments: nft resolved the path when the table was loaded, so a
    // subtree made again must change the text, or the enforcer would find
    // the same table and never load it again.
    let mut subtrees: BTreeMap<(u32, String), BTreeSet<u64>> = BTreeMap::new();
    for e in es {
        subtrees
            .entry(e.subtree())
            .or_default()
            .insert(e.subtree_id);
    }
    let seen = |ids: &BTreeSet<u64>| {
        ids.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, id| {
            (h ^ id).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let m = format!("{ENGINE_LO_MARK:#010x}");
    let clear = format!("{:#010x}", !ENGINE_LO_MARK);
    let node = deny_counter("engines_node");
    let _ = writeln!(
        out,
        "  chain engines_out {{\n    type filter hook output priority -3; policy accept;"
    );
    // One rule per subtree: `verdict`, and the subtree's inodes in the
    // comment `what (…)`.
    let per_subtree = |out: &mut String, verdict: &str, what: &str| {
        for ((level, path), ids) in &subtrees {
            let _ = writeln!(
                out,
                "    socket cgroupv2 level {level} \"{path}\" {verdict} comment \"{what} ({:016x})\"",
                seen(ids)
            );
        }
    };
    per_subtree(out, "jump engines_sub", "the tenant's engines");
    let _ = writeln!(
        out,
        "    meta mark and {probe:#010x} == {probe:#010x} jump engines_sub comment \"the agent's probes of engines\"",
        probe = PROBE_MARK
    );
    let _ = writeln!(
        out,
        "    ct state new ct mark and {m} == {m} ct mark set ct mark and {clear} comment \"not an engine's flow\"\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain engines_sub {{\n    ct state new ct mark set ct mark or {m} comment \"opened by an engine: checked at input\"\n    oif \"lo\" ct state untracked,invalid {node} drop comment \"leasehold: an engine's untracked or invalid packet to the node denied\"\n    oif \"lo\" ct direction original ct mark and {m} != {m} {node} drop comment \"leasehold: an engine's packet in a flow it did not open denied\"\n    oif \"lo\" accept\n    ct state established,related accept"
    );
    // Numbered among the engines with egress only: an engine with the
    // guard alone changes no other engine's chain (nor the table, when its
    // subtree is already guarded).
    let egress: Vec<(&EngineEgress, &Boundary)> = es
        .iter()
        .filter_map(|e| Some((e, e.boundary.as_ref()?)))
        .collect();
    for (k, (e, _)) in egress.iter().enumerate() {
        let _ = writeln!(
            out,
            "    socket cgroupv2 level {} \"{}\" jump engine{k} comment \"engine {} ({:x})\"",
            e.level, e.cgroup, e.name, e.cgroup_id
        );
    }
    // An engine with the guard alone (no chain of its own) ends here, its
    // flow marked: returning to `engines_out` would meet the rule that
    // clears the mark of a flow that is not an engine's, and the local
    // copy of its broadcast or multicast would then reach the node's
    // sockets unchecked (review).
    out.push_str("    accept comment \"an engine's flow: checked at input\"\n  }\n");
    // The first packet of a flow; and, but for TCP, every packet in the
    // direction the engine sent it: a UDP flow refused at its first packet
    // must not become established by another engine answering it from
    // the service's port. (TCP's later packets may meet a request socket,
    // which a cgroup lookup does not match; a refused SYN is answered
    // with a reset, and no one else can complete its handshake.)
    let _ = writeln!(
        out,
        "  chain engines_in {{\n    type filter hook input priority -3; policy accept;\n    ct state new ct mark and {m} == {m} jump engines_node\n    ct direction original ct mark and {m} == {m} meta l4proto != tcp jump engines_node\n  }}"
    );
    // Broadcast and multicast go to every socket bound to them, while the
    // lookup finds one: an engine's never reaches the node's sockets.
    let _ = writeln!(
        out,
        "  chain engines_node {{\n    fib daddr type {{ broadcast, multicast }} {node} drop comment \"leasehold: an engine's broadcast or multicast to the node denied\""
    );
    // This chain's lookup takes a packet over `lo` as arriving by `lo`;
    // delivery takes it as arriving by the interface of the address it is
    // sent to. A node socket bound to that interface (SO_BINDTODEVICE)
    // is seen by delivery only, and wins over an engine's socket on the
    // same port (UDP with SO_REUSEADDR on both): the check would pass the
    // engine's and delivery reach the node's. Only loopback addresses
    // are on `lo`, so an engine's datagrams to the node go there only.
    // TCP cannot share a listening port across users unless the two
    // listeners are bound to different devices, which an engine can do
    // only by an IPv6 link-local address's scope id (SO_BINDTODEVICE is
    // refused by its seccomp filter): nothing of an engine's goes to a
    // link-local address of the node.
    let note = "leasehold: an engine's connection to a link-local address of the node denied";
    let _ = writeln!(
        out,
        "    ip6 daddr fe80::/10 meta l4proto tcp {node} reject with tcp reset comment \"{note}\"\n    ip6 daddr fe80::/10 {node} reject with icmpx type admin-prohibited comment \"{note}\""
    );
    for (family, loopback) in [("ip", "127.0.0.0/8"), ("ip6", "::1")] {
        let _ = writeln!(
            out,
            "    meta l4proto != tcp {family} daddr != {loopback} {node} reject with icmpx type admin-prohibited comment \"leasehold: an engine's datagram to an interface address of the node denied\""
        );
    }
    per_subtree(out, "accept", "an engine's socket");
    let last = denial(
        Action::Reject,
        &node,
        "leasehold: an engine's connection to the node denied",
    );
    let _ = writeln!(out, "    {last}\n  }}");
    for (k, (e, b)) in egress.iter().enumerate() {
        let allow = groups(sets, &format!("e{k}a"), &b.allow);
        let _ = writeln!(out, "  chain engine{k} {{");
        for g in &allow {
            group_rules(out, g, Hook::Output);
        }
        let note = format!("leasehold: engine {} denied", e.name);
        // One counter for every engine: the landlord reads it, and which
        // engine is denied what is the tenant's business.
        let last = denial(b.action, &deny_counter("engines_out"), &note);
        let _ = writeln!(out, "    {last}\n  }}");
    }
}

/// From this many hosts on a hash set is created with a size: the kernel
/// then takes a fixed-size hash table instead of one that grows as
/// elements come (measured: 100k elements over netlink 150-280 ms into a
/// growing table, see docs/netpolicy.md).
const SIZED_MIN: usize = 4096;

/// ` size N;` for a hash set of `n` hosts (room for as many again; an
/// element change beyond it is refused by the kernel, and the agent then
/// re-applies the whole table with a new size), or nothing for small sets.
fn hash_size(n: usize) -> String {
    if n < SIZED_MIN {
        return String::new();
    }
    format!(" size {};", (2 * n).next_power_of_two())
}

impl Ruleset {
    /// The table enforcing `cluster` (with its failsafe entries, which also
    /// open the tenant's chains) and, if any, the tenant's sub-boundary.
    pub fn build(cluster: &Boundary, sub: Option<&Boundary>) -> Ruleset {
        Ruleset::build_with(cluster, sub, &Options::default())
    }

    /// [`Ruleset::build`] with options.
    ///
    /// Chains per level (landlord at priority -10, tenant at -5, so a
    /// packet must pass both): `*_in` (input: the source must be allowed
    /// inbound), `*_out` (output: the destination allowed outbound), and
    /// for routed traffic two chains at the forward hook: `*_fwd_in`
    /// (priority -10 / -5) admits a forwarded packet as inbound for its
    /// source, `*_fwd_out` (-9 / -4) as outbound for its destination; a
    /// forwarded packet must pass both, so it needs an inbound entry for
    /// its source and an outbound entry for its destination (at each
    /// level). Every chain accepts established/related first and lets
    /// failsafe entries through. A source in `options.internal` skips the
    /// inbound check, a destination there the outbound check.
    ///
    /// Router control (input chains, before conntrack): ICMPv6 router
    /// advertisements and redirects and IPv4 ICMP redirects are accepted
    /// from the cluster's `routers` only and dropped from anyone else,
    /// allowed peers included. Neighbour solicitations and advertisements
    /// pass both ways; the node may send router solicitations.
    ///
    /// DHCP, when the cluster names `dhcp_servers`: replies (udp 67→68,
    /// DHCPv6 547→546) are accepted from those servers only (address, and
    /// Ethernet source where pinned) and dropped, counted, from anyone
    /// else, in the input chains (after established flows, before the
    /// entries) and in one ingress chain per interface of
    /// `options.dhcp_devices` (`dhcp_ingress<k>`, priority -500), which
    /// runs before the packet sockets DHCP clients read offers on; the
    /// output chains let the client's requests go to the broadcast or
    /// multicast address and to the servers.
    pub fn build_with(cluster: &Boundary, sub: Option<&Boundary>, options: &Options) -> Ruleset {
        let mut sets = BTreeMap::new();
        let failsafe = groups(&mut sets, "llf", &cluster.failsafe);
        let allow = groups(&mut sets, "lla", &cluster.allow);
        let mut routers = crate::model::Peers::default();
        let (mut r4, mut r6) = (Vec::new(), Vec::new());
        for &(f, v) in &cluster.routers {
            match f {
                Family::V4 => r4.push((v, v)),
                Family::V6 => r6.push((v, v)),
            }
        }
        routers.v4 = crate::ranges::Ranges::from_intervals(r4);
        routers.v6 = crate::ranges::Ranges::from_intervals(r6);
        let common = Common {
            failsafe: &failsafe,
            routers: &routers,
            internal: &options.internal,
            dhcp: cluster.dhcp_servers.as_ref(),
        };
        let mut chains = String::new();
        level(
            &mut chains,
            "landlord",
            -10,
            cluster.action,
            &common,
            &allow,
        );
        if let Some(t) = sub {
            let tallow = groups(&mut sets, "tta", &t.allow);
            level(&mut chains, "tenant", -5, t.action, &common, &tallow);
        }
        engines(&mut chains, &mut sets, &options.engines);
        if let Some(d) = &cluster.dhcp_servers {
            dhcp_ingress(&mut chains, d, &options.dhcp_devices);
        }
        Ruleset {
            sets,
            chains,
            suffix: String::new(),
        }
    }

    /// The table when no node boundary is set but engines have egress rules
    /// (None without engines): only the engines' chains (see
    /// [`Ruleset::build_with`]). A boundary removed while engines run is
    /// replaced by this in the same transaction (the full script deletes
    /// and re-creates the table atomically), so an engine's egress never
    /// lapses with the landlord's boundary.
    pub fn engines_only(options: &Options) -> Option<Ruleset> {
        if options.engines.is_empty() {
            return None;
        }
        let mut sets = BTreeMap::new();
        let mut chains = String::new();
        engines(&mut chains, &mut sets, &options.engines);
        Some(Ruleset {
            sets,
            chains,
            suffix: String::new(),
        })
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
            let flags = if d.interval {
                " flags interval;".to_owned()
            } else {
                hash_size(d.elements.len())
            };
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

    /// The sets of `listed` (what the kernel has) this ruleset does not use.
    pub fn unused(&self, listed: &[String]) -> Vec<String> {
        listed
            .iter()
            .filter(|n| !self.sets.contains_key(*n))
            .cloned()
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
        let _ = write!(
            s,
            "table inet {TABLE} {{\n{}{}}}\n",
            deny_counter_decls(),
            self.chains
        );
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

    /// A change of single cluster hosts made in place: `cluster` is the
    /// boundary after the edit, `hosts` the addresses whose membership may
    /// have changed. Returns the hash-set element changes, with this
    /// ruleset edited to equal `Ruleset::build` of the new boundary; None,
    /// with nothing changed, when a set would appear or disappear (build
    /// the ruleset again). Cost in `hosts` × entries, not in peers: the
    /// one-peer change at 100k peers skips rebuilding and diffing 100k-host
    /// sets.
    pub fn edit_cluster_hosts(
        &mut self,
        cluster: &Boundary,
        hosts: &[(Family, u128)],
    ) -> Option<Vec<crate::netlink::ElemChange>> {
        let hosts: BTreeSet<(Family, u128)> = hosts.iter().copied().collect();
        // (set, add) -> addresses
        let mut plan: BTreeMap<(String, bool), Vec<IpAddr>> = BTreeMap::new();
        let mut size: BTreeMap<String, isize> = BTreeMap::new();
        for (tag, es) in [("llf", &cluster.failsafe), ("lla", &cluster.allow)] {
            let (of, sigs) = signature_indices(es);
            for &(f, v) in &hosts {
                let mut want = vec![false; sigs.len()];
                for (e, &i) in es.iter().zip(&of) {
                    if e.hosts.contains(&(f, v)) {
                        want[i] = true;
                    }
                }
                let n = if f == Family::V4 { '4' } else { '6' };
                let addr = host_addr(f, v);
                for (i, &want) in want.iter().enumerate() {
                    let name = format!("{tag}{i}_h{n}{}", self.suffix);
                    match self.sets.get(&name) {
                        Some(d) if d.elements.contains(&Elem::Host(addr)) != want => {
                            plan.entry((name.clone(), want)).or_default().push(addr);
                            *size.entry(name).or_insert(0) += if want { 1 } else { -1 };
                        }
                        None if want => return None,
                        _ => {}
                    }
                }
            }
        }
        // A set emptied by the edit is not in the built ruleset (nor its rule).
        for (name, delta) in &size {
            let len = self.sets.get(name).map_or(0, |d| d.elements.len());
            if isize::try_from(len).unwrap_or(isize::MAX) + delta <= 0 {
                return None;
            }
        }
        let mut out = Vec::new();
        for ((set, add), addrs) in plan {
            if let Some(d) = self.sets.get_mut(&set) {
                for a in &addrs {
                    if add {
                        d.elements.insert(Elem::Host(*a));
                    } else {
                        d.elements.remove(&Elem::Host(*a));
                    }
                }
            }
            out.push(crate::netlink::ElemChange { set, add, addrs });
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

    /// Every set's addresses as numbers, to compare with a netlink
    /// listing.
    pub fn expected_sets(&self) -> Vec<ExpectedSet<'_>> {
        self.sets
            .iter()
            .map(|(n, d)| {
                let mut v: Vec<(u128, u128)> = d
                    .elements
                    .iter()
                    .filter_map(|e| match e {
                        Elem::Host(IpAddr::V4(a)) => {
                            let x = u128::from(u32::from(*a));
                            Some((x, x))
                        }
                        Elem::Host(IpAddr::V6(a)) => {
                            let x = u128::from(*a);
                            Some((x, x))
                        }
                        Elem::Net(c) => {
                            crate::model::parse_cidr(c).ok().map(|(_, lo, hi)| (lo, hi))
                        }
                    })
                    .collect();
                v.sort_unstable();
                if d.interval {
                    v = merge(v);
                }
                let max = match d.family {
                    Family::V4 => u128::from(u32::MAX),
                    Family::V6 => u128::MAX,
                };
                ExpectedSet {
                    name: n.as_str(),
                    interval: d.interval,
                    max,
                    ranges: v,
                }
            })
            .collect()
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

    /// The interfaces this ruleset has a DHCP ingress chain for, in order.
    pub fn dhcp_devices(&self) -> Vec<String> {
        self.chains
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("type filter hook ingress device \"")?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .collect()
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
        s.push_str(&deny_counter_decls());
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

/// One set's expected contents (see [`Ruleset::expected_sets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedSet<'a> {
    /// Set name.
    pub name: &'a str,
    /// An interval set (prefixes) rather than a hash set (hosts).
    pub interval: bool,
    /// The family's highest address.
    pub max: u128,
    /// Hosts as (a, a) in order; an interval set's prefixes as merged
    /// inclusive ranges.
    pub ranges: Vec<(u128, u128)>,
}

/// Sorted inclusive ranges with adjacent and overlapping ones joined.
pub fn merge(v: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if last.1 == u128::MAX || lo <= last.1 + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
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

/// The table's named counters as (name, packets, bytes), through the nft
/// tool (`nft -j list counters table inet leasehold`; the agent reads them
/// over netlink, this is for a prefix such as `ip netns exec NS`). Empty
/// when the table is absent; at most `limit` kept.
pub fn counters(prefix: &[&str], limit: usize) -> Result<Vec<(String, u64, u64)>, ApplyError> {
    let o = nft(prefix, &["-j", "list", "counters", "table", "inet", TABLE])
        .stdin(Stdio::null())
        .output()?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("No such file or directory") {
            return Ok(Vec::new());
        }
        return Err(ApplyError::Refused(err.trim().to_owned()));
    }
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout)
        .map_err(|e| ApplyError::Refused(format!("cannot parse nft -j output: {e}")))?;
    Ok(doc
        .get("nftables")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|x| x.get("counter"))
        .filter(|c| c.get("table").and_then(serde_json::Value::as_str) == Some(TABLE))
        .filter_map(|c| {
            let n = |k: &str| c.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            Some((
                c.get("name")?.as_str()?.to_owned(),
                n("packets"),
                n("bytes"),
            ))
        })
        .take(limit)
        .collect())
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

    /// Three entries (two share a signature) and a group over hosts
    /// 10.0.0.0..8 and fd00::0..8; `pick` chooses each entry's hosts.
    fn edited(pick: &[Vec<u8>; 4]) -> Boundary {
        let list = |v: &Vec<u8>| {
            v.iter()
                .map(|h| {
                    if h % 2 == 0 {
                        format!("\"10.0.0.{h}\"")
                    } else {
                        format!("\"fd00::{h}\"")
                    }
                })
                .chain(std::iter::once("\"192.168.0.0/16\"".to_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        BoundaryDoc::from_toml(&format!(
            "[groups]\ng = [{}]\n[[allow]]\nname = \"a\"\npeers = [{}]\n[[allow]]\nname = \"b\"\npeers = [{}, \"@g\"]\n[[allow]]\nname = \"web\"\npeers = [{}]\ndirection = \"in\"\nprotocols = [{{ proto = \"tcp\", ports = [443] }}]\n[[failsafe]]\nname = \"ssh\"\npeers = [\"10.0.0.2\"]\ndirection = \"in\"\nprotocols = [{{ proto = \"tcp\", ports = [22] }}]\n",
            list(&pick[0]),
            list(&pick[1]),
            list(&pick[2]),
            list(&pick[3])
        ))
        .unwrap()
        .validate(true)
        .unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// The in-place host edit gives the ruleset a rebuild gives, and the
        /// element changes the diff of the two gives (or declines).
        #[test]
        fn host_edits_in_place_equal_a_rebuild(
            before in proptest::array::uniform4(proptest::collection::vec(0u8..8, 0..5)),
            after in proptest::array::uniform4(proptest::collection::vec(0u8..8, 0..5)),
        ) {
            let (b0, b1) = (edited(&before), edited(&after));
            let hosts: Vec<(Family, u128)> = (0u8..8)
                .map(|h| if h % 2 == 0 { (Family::V4, 0x0a00_0000 + u128::from(h)) } else { (Family::V6, (0xfd00u128 << 112) + u128::from(h)) })
                .collect();
            let r0 = Ruleset::build(&b0, None).with_suffix("_g3");
            let r1 = Ruleset::build(&b1, None).with_suffix("_g3");
            let mut edited = r0.clone();
            match edited.edit_cluster_hosts(&b1, &hosts) {
                Some(delta) => {
                    proptest::prop_assert_eq!(&edited, &r1);
                    let mut want = r1.element_delta(&r0).unwrap();
                    let mut got = delta;
                    for d in want.iter_mut().chain(got.iter_mut()) {
                        d.addrs.sort();
                    }
                    let key = |d: &crate::netlink::ElemChange| (d.set.clone(), d.add);
                    want.sort_by_key(key);
                    got.sort_by_key(key);
                    let flat = |v: &[crate::netlink::ElemChange]| v.iter().map(|d| (d.set.clone(), d.add, d.addrs.clone())).collect::<Vec<_>>();
                    proptest::prop_assert_eq!(flat(&got), flat(&want));
                }
                None => {
                    proptest::prop_assert_eq!(&edited, &r0);
                    // Declined only when the sets themselves differ.
                    let names = |r: &Ruleset| r.sets.keys().cloned().collect::<Vec<_>>();
                    proptest::prop_assert_ne!(names(&r0), names(&r1));
                }
            }
        }
    }

    #[test]
    fn engine_egress_jumps_by_cgroup_to_its_own_chain() {
        let c = doc("action = \"drop\"\n[[allow]]\nname = \"all\"\npeers = [\"0.0.0.0/0\"]\n");
        let egress = BoundaryDoc::from_toml(
            "action = \"drop\"\n[[allow]]\nname = \"db\"\npeers = [\"10.1.2.3\"]\ndirection = \"out\"\nprotocols = [{ proto = \"tcp\", ports = [5432] }]\n",
        )
        .unwrap()
        .validate(false)
        .unwrap();
        let mount = std::path::Path::new("/sys/fs/cgroup");
        let e = EngineEgress::new(
            "web",
            mount,
            &mount.join("leasehold.slice/tenant/web"),
            egress.clone(),
        )
        .unwrap();
        assert_eq!(
            (e.cgroup.as_str(), e.level),
            ("leasehold.slice/tenant/web", 3)
        );
        let opts = Options {
            engines: vec![e],
            ..Options::default()
        };
        let rs = Ruleset::build_with(&c, None, &opts);
        let text = rs.full_script();
        assert!(
            text.contains(
                "chain engines_out {\n    type filter hook output priority -3; policy accept;"
            ),
            "{text}"
        );
        // One lookup for the tenant's subtree in the output chain; the
        // engine's own jump behind it.
        assert!(text.contains("socket cgroupv2 level 2 \"leasehold.slice/tenant\" jump engines_sub comment \"the tenant's engines ("), "{text}");
        assert!(text.contains("socket cgroupv2 level 3 \"leasehold.slice/tenant/web\" jump engine0 comment \"engine web (0)\""), "{text}");
        // The node guard: marked at output, checked at input.
        assert!(
            text.contains(
                "chain engines_sub {\n    ct state new ct mark set ct mark or 0x10000000"
            ),
            "{text}"
        );
        assert!(
            text.contains("oif \"lo\" ct direction original ct mark and 0x10000000 != 0x10000000 counter name \"deny_engines_node\" drop"),
            "{text}"
        );
        assert!(
            text.contains("\n    ct state new ct mark and 0x10000000 == 0x10000000 ct mark set ct mark and 0xefffffff"),
            "{text}"
        );
        assert!(
            text.contains(
                "chain engines_in {\n    type filter hook input priority -3; policy accept;\n    ct state new ct mark and 0x10000000 == 0x10000000 jump engines_node\n    ct direction original ct mark and 0x10000000 == 0x10000000 meta l4proto != tcp jump engines_node"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "chain engines_node {\n    fib daddr type { broadcast, multicast } counter name \"deny_engines_node\" drop comment \"leasehold: an engine's broadcast or multicast to the node denied\"\n    ip6 daddr fe80::/10 meta l4proto tcp counter name \"deny_engines_node\" reject with tcp reset comment \"leasehold: an engine's connection to a link-local address of the node denied\"\n    ip6 daddr fe80::/10 counter name \"deny_engines_node\" reject with icmpx type admin-prohibited comment \"leasehold: an engine's connection to a link-local address of the node denied\"\n    meta l4proto != tcp ip daddr != 127.0.0.0/8 counter name \"deny_engines_node\" reject with icmpx type admin-prohibited comment \"leasehold: an engine's datagram to an interface address of the node denied\"\n    meta l4proto != tcp ip6 daddr != ::1 counter name \"deny_engines_node\" reject with icmpx type admin-prohibited comment \"leasehold: an engine's datagram to an interface address of the node denied\"\n    socket cgroupv2 level 2 \"leasehold.slice/tenant\" accept"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "meta l4proto tcp counter name \"deny_engines_node\" reject with tcp reset"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "ip daddr @e0a0_h4 meta l4proto tcp tcp dport { 5432 } accept comment \"db\""
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "counter name \"deny_engines_out\" drop comment \"leasehold: engine web denied\""
            ),
            "{text}"
        );
        assert!(
            text.contains("set e0a0_h4 {\n    type ipv4_addr\n    elements = { 10.1.2.3 }"),
            "{text}"
        );
        let counts = rs.rule_counts();
        assert_eq!(counts.get("engines_out"), Some(&3));
        assert_eq!(counts.get("engines_sub"), Some(&7));
        assert_eq!(counts.get("engines_in"), Some(&2));
        assert_eq!(counts.get("engines_node"), Some(&8));
        assert_eq!(counts.get("engine0"), Some(&2));
        // An engine without egress: the guard, no chain of its own; two
        // engines of one subtree, one lookup.
        let db = EngineEgress::guard_only("db", mount, &mount.join("leasehold.slice/tenant/db"))
            .unwrap();
        assert_eq!(db.boundary, None);
        let both = Options {
            engines: vec![db.clone(), opts.engines[0].clone()],
            ..Options::default()
        };
        let text2 = Ruleset::build_with(&c, None, &both).full_script();
        // One for the subtree, one for the agent's probes.
        assert_eq!(text2.matches("jump engines_sub").count(), 2, "{text2}");
        assert!(
            text2.contains("jump engine0 comment \"engine web (0)\""),
            "{text2}"
        );
        assert!(!text2.contains("engine1"), "{text2}");
        assert!(!text2.contains("engine db"), "{text2}");
        let guard = Ruleset::engines_only(&Options {
            engines: vec![db],
            ..Options::default()
        })
        .unwrap();
        let counts = guard.rule_counts();
        assert_eq!(counts.get("engines_sub"), Some(&6));
        assert_eq!(counts.get("engines_node"), Some(&8));
        assert!(!guard.full_script().contains("chain engine0"));
        // A subtree made again (another inode) changes the text, so the
        // enforcer loads it again (nft resolved the old cgroup).
        let mut again = both.clone();
        for e in &mut again.engines {
            e.subtree_id = 7;
        }
        assert_ne!(
            Ruleset::build_with(&c, None, &again).full_script(),
            text2,
            "a new subtree inode must change the table"
        );
        let counts = rs.rule_counts();
        // Suffixed generations rename the engine's sets too.
        assert!(rs
            .clone()
            .with_suffix("_g1")
            .full_script()
            .contains("@e0a0_h4_g1"));
        // Without a boundary: the engines' chains alone, nothing else.
        let only = Ruleset::engines_only(&opts).unwrap();
        let text = only.full_script();
        assert!(text.contains("jump engine0"), "{text}");
        assert!(
            !text.contains("chain landlord") && !text.contains("chain tenant_"),
            "{text}"
        );
        assert_eq!(only.rule_counts(), {
            let mut c = counts.clone();
            c.retain(|k, _| k.starts_with("engine"));
            c
        });
        assert_eq!(Ruleset::engines_only(&Options::default()), None);
        // Without engines nothing of this is in the table (but the
        // engines' deny counters, declared in every table).
        let bare = Ruleset::build(&c, None)
            .full_script()
            .replace("deny_engines_out", "")
            .replace("deny_engines_node", "");
        assert!(!bare.contains("engine"), "{bare}");
        // Paths nft cannot be given are refused by name, before any table.
        for (dir, mnt) in [
            ("/tmp/x/web", "/tmp/x"),
            ("/sys/fs/cgroup/a\"b/web", "/sys/fs/cgroup"),
            ("/sys/fs/cgroup/../web", "/sys/fs/cgroup"),
            ("/sys/fs/cgroup", "/sys/fs/cgroup"),
            // Its parent would be the root: the guard would match every
            // process.
            ("/sys/fs/cgroup/web", "/sys/fs/cgroup"),
        ] {
            let err = EngineEgress::new(
                "web",
                std::path::Path::new(mnt),
                std::path::Path::new(dir),
                egress.clone(),
            )
            .unwrap_err();
            assert!(err.to_string().starts_with("engine web: cgroup "), "{err}");
        }
        // A hybrid host: the cgroup2 mount below the base, level from the mount.
        let e = EngineEgress::new(
            "web",
            std::path::Path::new("/sys/fs/cgroup/unified"),
            std::path::Path::new("/sys/fs/cgroup/unified/t/web"),
            egress,
        )
        .unwrap();
        assert_eq!((e.cgroup.as_str(), e.level), ("unified/t/web", 2));
        assert_eq!(e.subtree(), (1, "unified/t".to_owned()));
    }

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
        assert_eq!(counts.len(), 8, "{counts:?}");
        // established, router control (2: no router named), related, lo,
        // ND, failsafe (none), "cluster" (every protocol: one rule per v4
        // and v6 set), drop.
        assert_eq!(counts["landlord_in"], 1 + 2 + 3 + 2 + 1, "{r}");
        // established, router control, related, lo, ND, tcp/443 (v4), two
        // reject rules.
        assert_eq!(counts["tenant_in"], 1 + 2 + 3 + 1 + 2, "{r}");
        // Forward: established, the entries, the last rule.
        assert_eq!(counts["landlord_fwd_in"], 1 + 2 + 1, "{r}");
        assert_eq!(counts["tenant_fwd_in"], 1 + 1 + 2, "{r}");
        assert_eq!(counts["tenant_fwd_out"], 1 + 2, "in only: {r}");
        assert!(r.contains("chain landlord_fwd_out {\n    type filter hook forward priority -9;"));
        assert!(r.contains("chain tenant_fwd_in {\n    type filter hook forward priority -5;"));
        assert!(r.contains("ip daddr @lla0_n4 accept"));
    }

    #[test]
    fn every_deny_rule_counts_in_its_class_counter_declared_in_every_table() {
        let c = doc(
            "dhcp_servers = [\"10.0.0.1\"]\n[[allow]]\nname = \"all\"\npeers = [\"10.0.0.0/8\"]\n",
        );
        let t = BoundaryDoc::from_toml(
            "action = \"reject\"\n[[allow]]\nname = \"x\"\npeers = [\"10.0.0.0/24\"]\n",
        )
        .unwrap()
        .validate(false)
        .unwrap();
        let o = Options {
            dhcp_devices: vec!["e0".into()],
            ..Options::default()
        };
        let rs = Ruleset::build_with(&c, Some(&t), &o);
        let full = rs.full_script();
        let switch = rs.switch_script(&[], &[]);
        // Rogue DHCP replies: in both input chains and the ingress chain,
        // both families, one class.
        assert_eq!(full.matches("counter name \"deny_dhcp\" drop").count(), 6);
        for class in DENY_CLASSES {
            let decl = format!("  counter deny_{class} {{\n  }}\n");
            assert!(full.contains(&decl), "{class}: {full}");
            assert!(switch.contains(&decl), "{class}: {switch}");
        }
        // Each chain's last rules count in its own class, nowhere else; no
        // anonymous counter is left on a deny rule.
        for ch in [
            "landlord_in",
            "landlord_out",
            "landlord_fwd_in",
            "landlord_fwd_out",
            "tenant_in",
            "tenant_out",
            "tenant_fwd_in",
            "tenant_fwd_out",
        ] {
            let body = full.split(&format!("chain {ch} {{")).nth(1).unwrap();
            let body = &body[..body.find("\n  }").unwrap()];
            let last = body.lines().last().unwrap().trim();
            assert!(
                last.starts_with(&format!("counter name \"deny_{ch}\" ")),
                "{ch}: {body}"
            );
        }
        for line in full.lines().map(str::trim) {
            let denies = line.contains(" drop") || line.contains(" reject");
            assert!(!denies || line.contains("counter name \"deny_"), "{line}");
            assert!(!line.contains("counter drop") && !line.contains("counter reject"));
        }
        // The tenant level rejects: both reject rules share the counter.
        assert_eq!(
            full.matches("counter name \"deny_tenant_in\" reject")
                .count(),
            2
        );
        // Counter declarations are not rules: the drift check's counts hold
        // (eight base chains and the ingress chain).
        assert_eq!(rs.rule_counts().len(), 9);
    }

    fn doc(text: &str) -> Boundary {
        BoundaryDoc::from_toml(text)
            .unwrap()
            .validate(true)
            .unwrap()
    }

    #[test]
    fn entries_of_one_signature_share_sets_and_rules() {
        let mut t = String::new();
        for i in 0..300 {
            let _ = write!(
                t,
                "[[allow]]\nname = \"peer-{i:03}\"\npeers = [\"10.1.{}.{}\", \"10.2.{}.0/24\"]\ndirection = \"in\"\nprotocols = [{{ proto = \"tcp\", ports = [{}] }}]\n",
                i / 256,
                i % 256,
                i / 2,
                443 + (i % 2)
            );
        }
        t.push_str("[[failsafe]]\nname = \"ssh\"\npeers = [\"10.9.0.1\"]\ndirection = \"in\"\nprotocols = [{ proto = \"tcp\", ports = [443] }]\n");
        let r = Ruleset::build(&doc(&t), None);
        let names: Vec<&String> = r.set_elements().map(|(n, _)| n).collect();
        // Two signatures (tcp/443 in, tcp/444 in), failsafe apart.
        assert_eq!(
            names,
            ["lla0_h4", "lla0_n4", "lla1_h4", "lla1_n4", "llf0_h4"]
        );
        assert_eq!(r.sets["lla0_h4"].elements.len(), 150);
        // 150 /24s each, adjacent ones merged (10.2.0.0/24 .. 10.2.149.0/24).
        assert_eq!(
            r.sets["lla0_n4"]
                .elements
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [
                "10.2.0.0/17",
                "10.2.128.0/20",
                "10.2.144.0/22",
                "10.2.148.0/23"
            ]
        );
        let counts = r.rule_counts();
        assert_eq!(counts["landlord_in"], 1 + 2 + 3 + 1 + 4 + 1);
        // The comment lists names up to nft's 128 bytes, then a count.
        let line = r
            .chains
            .lines()
            .find(|l| l.contains("@lla0_h4"))
            .unwrap()
            .to_owned();
        let c = line
            .split("comment \"")
            .nth(1)
            .unwrap()
            .trim_end_matches('"');
        assert!(
            c.len() <= COMMENT_MAX && c.starts_with("peer-000, peer-002, "),
            "{c}"
        );
        assert!(c.ends_with(" more"), "{c}");
        let shown = c.matches("peer-").count();
        let more: usize = c
            .rsplit(" +")
            .next()
            .unwrap()
            .trim_end_matches(" more")
            .parse()
            .unwrap();
        assert_eq!(shown + more, 150, "{c}");
        assert_eq!(comment(&["a", "b"]), "a, b");
        // Adding a host to an existing entry is an element change.
        let t2 = t.replacen("\"10.1.0.0\"", "\"10.1.0.0\", \"10.3.0.1\"", 1);
        let r2 = Ruleset::build(&doc(&t2), None);
        let d = r2.element_delta(&r).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].set, "lla0_h4");
        assert_eq!(d[0].addrs, ["10.3.0.1".parse::<IpAddr>().unwrap()]);
    }

    /// Reverse rules of failsafe entries: TCP without SYN, from the
    /// entry's TCP ports only (review: every protocol of the entry, and an
    /// entry without `protocols` became both-ways).
    #[test]
    fn failsafe_replies_are_tcp_segments_without_syn_only() {
        let c = doc("[[failsafe]]\nname = \"out\"\npeers = [\"10.9.0.53\"]\ndirection = \"out\"\nprotocols = [{ proto = \"udp\", ports = [53] }, { proto = \"tcp\", ports = [443] }]\n[[failsafe]]\nname = \"dns\"\npeers = [\"10.9.0.54\"]\ndirection = \"out\"\nprotocols = [{ proto = \"udp\", ports = [53] }]\n[[failsafe]]\nname = \"any\"\npeers = [\"10.9.0.7\"]\ndirection = \"out\"\n[[failsafe]]\nname = \"ssh\"\npeers = [\"10.9.0.1\"]\ndirection = \"in\"\nprotocols = [{ proto = \"tcp\", ports = [22] }]\n");
        let r = Ruleset::build(&c, None);
        let replies: Vec<&str> = r
            .chains
            .lines()
            .filter(|l| l.contains("failsafe reply"))
            .collect();
        // out (tcp/443), any (every tcp port), ssh (tcp/22); none for dns.
        assert_eq!(replies.len(), 3, "{replies:#?}");
        for l in &replies {
            assert!(
                l.contains("meta l4proto tcp") && l.contains("tcp flags & syn == 0 accept"),
                "{l}"
            );
            assert!(!l.contains("udp") && !l.contains("dport"), "{l}");
        }
        assert!(replies.iter().any(|l| l.contains("tcp sport { 443 }")));
        assert!(replies.iter().any(|l| l.contains("tcp sport { 22 }")));
        assert!(replies.iter().any(|l| !l.contains("sport")));
    }

    #[test]
    fn dhcp_servers_alone_answer_dhcp_in_input_and_ingress_chains() {
        let c = doc("dhcp_servers = [\"10.77.0.1\", { addr = \"10.77.0.2\", mac = \"52:54:00:00:00:02\" }]\n[[allow]]\nname = \"all\"\npeers = [\"0.0.0.0/0\"]\n");
        let t = BoundaryDoc::from_toml("[[allow]]\nname = \"x\"\npeers = [\"0.0.0.0/0\"]\n")
            .unwrap()
            .validate(false)
            .unwrap();
        let o = Options {
            dhcp_devices: vec!["e0".into(), "bad name".into(), "e1".into()],
            ..Options::default()
        };
        let r = Ruleset::build_with(&c, Some(&t), &o);
        let text = r.full_script();
        let replies = "    udp sport 67 udp dport 68 ip saddr { 10.77.0.1 } accept comment \"leasehold: dhcp server\"\n    udp sport 67 udp dport 68 ip saddr 10.77.0.2 ether saddr 52:54:00:00:00:02 accept comment \"leasehold: dhcp server\"\n    meta nfproto ipv4 udp sport 67 udp dport 68 counter name \"deny_dhcp\" drop comment \"leasehold: not a dhcp server\"\n    meta nfproto ipv6 udp sport 547 udp dport 546 counter name \"deny_dhcp\" drop comment \"leasehold: not a dhcp server\"\n";
        // Input chains of both levels: after router control, before the
        // entries (an allow entry for everyone does not let a rogue in).
        for ch in ["landlord_in", "tenant_in"] {
            let body = text.split(&format!("chain {ch} {{")).nth(1).unwrap();
            let body = &body[..body.find("\n  }").unwrap()];
            let at = body.find(replies).unwrap_or_else(|| panic!("{body}"));
            assert!(
                at > body
                    .find("icmp type redirect counter name \"deny_router\" drop")
                    .unwrap()
            );
            assert!(at < body.find("ct state related accept").unwrap());
        }
        for ch in ["landlord_out", "tenant_out"] {
            let body = text.split(&format!("chain {ch} {{")).nth(1).unwrap();
            assert!(body.contains("    udp sport 68 udp dport 67 ip daddr { 255.255.255.255, 10.77.0.1, 10.77.0.2 } accept comment \"leasehold: dhcp client\"\n"), "{body}");
            assert!(
                !body[..body.find("\n  }").unwrap()].contains("dport 547"),
                "no DHCPv6 server: no request rule"
            );
        }
        // One ingress chain per nameable interface.
        for (k, dev) in [(0, "e0"), (1, "e1")] {
            let head = format!("  chain dhcp_ingress{k} {{\n    type filter hook ingress device \"{dev}\" priority -500; policy accept;\n{replies}  }}\n");
            assert!(text.contains(&head), "{text}");
        }
        assert!(!text.contains("dhcp_ingress2"));
        assert_eq!(r.dhcp_devices(), ["e0", "e1"]);
        assert_eq!(r.rule_counts()["dhcp_ingress0"], 4);
        // Without dhcp_servers nothing of it, whatever the devices.
        let plain = doc("[[allow]]\nname = \"all\"\npeers = [\"0.0.0.0/0\"]\n");
        let text = Ruleset::build_with(&plain, None, &o)
            .full_script()
            .replace("counter deny_dhcp ", "");
        assert!(!text.contains("dhcp"), "{text}");
        assert!(!text.contains("sport 67"), "{text}");
        // Names nft can be given.
        assert!(device_name_ok("eth0.100") && device_name_ok("br-1@x"));
        assert!(!device_name_ok("") && !device_name_ok("a\"b") && !device_name_ok(&"e".repeat(16)));
    }

    #[test]
    fn routers_alone_send_router_advertisements_and_redirects() {
        let c = doc("routers = [\"fe80::1\", \"10.0.0.254\"]\n[[allow]]\nname = \"all\"\npeers = [\"::/0\"]\n");
        let t = BoundaryDoc::from_toml("[[allow]]\nname = \"x\"\npeers = [\"::/0\"]\n")
            .unwrap()
            .validate(false)
            .unwrap();
        let r = ruleset(&c, Some(&t));
        for ch in ["landlord_in", "tenant_in"] {
            let body = r.split(&format!("chain {ch} {{")).nth(1).unwrap();
            let body = &body[..body.find("\n  }").unwrap()];
            let lines: Vec<&str> = body.lines().map(str::trim).collect();
            assert_eq!(lines[2], "ct state established accept", "{body}");
            assert_eq!(
                lines[3],
                "ip6 saddr { fe80::1/128 } icmpv6 type { nd-router-advert, nd-redirect } accept",
                "{body}"
            );
            assert!(
                lines[4].starts_with(
                    "icmpv6 type { nd-router-advert, nd-redirect } counter name \"deny_router\" drop"
                ),
                "{body}"
            );
            assert_eq!(
                lines[5],
                "ip saddr { 10.0.0.254/32 } icmp type redirect accept"
            );
            assert!(
                lines[6].starts_with("icmp type redirect counter name \"deny_router\" drop"),
                "{body}"
            );
            assert_eq!(lines[7], "ct state related accept");
            assert_eq!(
                lines[9],
                "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept"
            );
        }
        assert!(r.contains(
            "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept"
        ));
        assert!(!r.contains("nd-router-advert } accept"));
    }

    #[test]
    fn internal_networks_skip_their_side_of_the_forward_check() {
        let c = doc("[[allow]]\nname = \"all\"\npeers = [\"10.0.0.2\"]\n");
        let mut o = Options::default();
        o.internal.v4 = crate::ranges::Ranges::interval(0x0a4e_0000, 0x0a4e_00ff);
        let r = Ruleset::build_with(&c, None, &o).full_script();
        let fin = r.split("chain landlord_fwd_in {").nth(1).unwrap();
        assert!(
            fin.contains("ip saddr { 10.78.0.0/24 } accept comment \"internal\""),
            "{r}"
        );
        let fout = r.split("chain landlord_fwd_out {").nth(1).unwrap();
        assert!(
            fout.contains("ip daddr { 10.78.0.0/24 } accept comment \"internal\""),
            "{r}"
        );
        assert!(!r
            .split("chain landlord_in {")
            .nth(1)
            .unwrap()
            .split("chain")
            .next()
            .unwrap()
            .contains("internal"));
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
