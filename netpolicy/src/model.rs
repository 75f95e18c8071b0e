//! Boundary documents (TOML or JSON) and their validated form.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::doc::{shown, unique_keys, ECHO_LIMIT};
use crate::ranges::Ranges;

/// Longest entry or group name (characters of A-Z a-z 0-9 . _ -).
pub const MAX_NAME: usize = 64;

// Limits on a document, checked before any costly work; a document over
// one is refused naming the field (`allow: 10001 entries, at most 10000`).
// They allow 100k peers with room to spare.

/// Largest document (TOML or JSON text), in bytes.
pub const MAX_DOC_BYTES: usize = 8 << 20;
/// Most entries in `allow`, and in `failsafe`.
pub const MAX_ENTRIES: usize = 10_000;
/// Most peers written in one entry (CIDRs, addresses and `@group`s).
pub const MAX_PEERS_PER_ENTRY: usize = 100_000;
/// Most peers in a document with every `@group` expanded (all entries).
pub const MAX_PEERS_TOTAL: usize = 200_000;
/// Most groups.
pub const MAX_GROUPS: usize = 1_000;
/// Most members of one group.
pub const MAX_GROUP_MEMBERS: usize = 100_000;
/// Most items in one entry's `protocols`.
pub const MAX_PROTOCOLS: usize = 16;
/// Most port specs (ports or ranges) of one protocol item.
pub const MAX_PORT_SPECS: usize = 1_000;
/// Most routers.
pub const MAX_ROUTERS: usize = 16;
/// Most DHCP servers (`dhcp_servers`).
pub const MAX_DHCP_SERVERS: usize = 16;

/// What happens to traffic no entry allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Silently dropped (the sender times out).
    #[default]
    Drop,
    /// Rejected: TCP reset or ICMP unreachable (the sender is told).
    Reject,
}

/// Direction of a flow as seen from the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Peer → node.
    In,
    /// Node → peer.
    Out,
    /// Both.
    Both,
}

/// A transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP and ICMPv6 (no ports).
    Icmp,
    /// Every other IP protocol (GRE, ESP, SCTP, VRRP, …; no ports). An
    /// entry without `protocols` covers it too.
    Other,
}

impl Proto {
    /// All protocols: an entry without `protocols` allows each of these.
    pub const ALL: [Proto; 4] = [Proto::Tcp, Proto::Udp, Proto::Icmp, Proto::Other];

    /// The name as written in documents.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Other => "other",
        }
    }

    /// Whether the protocol has ports (tcp, udp).
    pub fn has_ports(self) -> bool {
        matches!(self, Proto::Tcp | Proto::Udp)
    }
}

/// A port or port range as written: `443`, `"443"`, `"8000-8080"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    /// One port.
    Num(u16),
    /// A port or range as text.
    Text(String),
}

/// `{ proto = "tcp", ports = [80, 443] }`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtoDoc {
    /// Protocol.
    pub proto: Proto,
    /// Ports (tcp/udp only); absent: all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
}

/// One allow entry as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryDoc {
    /// Name, used in reasons and explanations.
    pub name: String,
    /// CIDRs, addresses, or `@group`.
    pub peers: Vec<String>,
    /// Direction (default both).
    #[serde(default = "both")]
    pub direction: Direction,
    /// Protocols and ports; absent: everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<ProtoDoc>>,
}

fn both() -> Direction {
    Direction::Both
}

/// A boundary document: the landlord's cluster boundary or the tenant's sub-boundary.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundaryDoc {
    /// Drop or reject what is not allowed.
    #[serde(default)]
    pub action: Action,
    /// Named peer groups (a name given twice is refused).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_keys"
    )]
    pub groups: BTreeMap<String, Vec<String>>,
    /// Allow entries.
    #[serde(default)]
    pub allow: Vec<EntryDoc>,
    /// Management traffic no boundary can cut (cluster boundary only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failsafe: Vec<EntryDoc>,
    /// Routers (single addresses, usually IPv6 link-local) whose router
    /// advertisements and redirects the node accepts (cluster boundary
    /// only). Absent: none, from anyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routers: Vec<String>,
    /// The landlord's DHCP servers (cluster boundary only): when present,
    /// DHCP replies (udp 67→68, DHCPv6 547→546) are accepted only from
    /// these, before any packet socket sees them (an ingress chain per
    /// interface), and the node's client requests go out. Absent: DHCP is
    /// whatever the entries allow (docs/netpolicy.md, "DHCP").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_servers: Option<Vec<DhcpServerDoc>>,
}

/// One DHCP server as written: `"10.77.0.1"`, or
/// `{ addr = "10.77.0.1", mac = "52:54:00:12:34:56" }` to accept its replies
/// only from that Ethernet source address as well.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "an address, or { addr = ADDRESS, mac = MAC }"
)]
pub enum DhcpServerDoc {
    /// The address its replies come from (the server's, or its relay's).
    Addr(String),
    /// The address and the MAC its replies come from.
    Pinned {
        /// Address.
        addr: String,
        /// Ethernet source address (`aa:bb:cc:dd:ee:ff`).
        mac: String,
    },
}

/// A validated DHCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DhcpServer {
    /// Family of the address (IPv4: DHCP, IPv6: DHCPv6).
    pub family: Family,
    /// The address its replies come from.
    pub addr: u128,
    /// The Ethernet source address its replies must come from, if pinned.
    pub mac: Option<[u8; 6]>,
}

impl DhcpServer {
    /// The address.
    pub fn ip(&self) -> IpAddr {
        match self.family {
            Family::V4 => IpAddr::V4(std::net::Ipv4Addr::from(
                u32::try_from(self.addr).unwrap_or(u32::MAX),
            )),
            Family::V6 => IpAddr::V6(std::net::Ipv6Addr::from(self.addr)),
        }
    }

    /// The MAC as nft writes it (`52:54:00:12:34:56`).
    pub fn mac_text(&self) -> Option<String> {
        self.mac.map(|m| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
    }
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`): a unicast, non-zero Ethernet address.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let mut m = [0u8; 6];
    if parts.len() != 6 || s.len() != 17 {
        return Err(format!(
            "{} is not a MAC address (aa:bb:cc:dd:ee:ff)",
            shown(s)
        ));
    }
    for (b, p) in m.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("{} is not a MAC address (aa:bb:cc:dd:ee:ff)", shown(s)))?;
    }
    if m == [0; 6] || m[0] & 1 == 1 {
        return Err(format!(
            "{}: a server's MAC is a unicast address, not zero, multicast or broadcast",
            shown(s)
        ));
    }
    Ok(m)
}

/// A DHCP server's address: one unicast address.
fn parse_server_addr(s: &str) -> Result<(Family, u128), String> {
    let (f, lo, hi) = parse_cidr(s)?;
    if lo != hi {
        return Err(format!(
            "{}: a DHCP server is one address, not a prefix",
            shown(s)
        ));
    }
    let ip = match f {
        Family::V4 => IpAddr::V4(std::net::Ipv4Addr::from(
            u32::try_from(lo).unwrap_or(u32::MAX),
        )),
        Family::V6 => IpAddr::V6(std::net::Ipv6Addr::from(lo)),
    };
    let bad = ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_loopback()
        || ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST);
    if bad {
        return Err(format!(
            "{}: a DHCP server's address is a unicast address",
            shown(s)
        ));
    }
    Ok((f, lo))
}

pub use crate::doc::{DocError, Location};

fn err(field: impl Into<String>, reason: impl Into<String>) -> DocError {
    DocError::new(field, reason)
}

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4 (values 0..2^32).
    V4,
    /// IPv6.
    V6,
}

/// A set of peer addresses, per family.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Peers {
    /// IPv4 addresses as u32 values.
    pub v4: Ranges,
    /// IPv6 addresses as u128 values.
    pub v6: Ranges,
}

impl Peers {
    /// Addresses of one family.
    pub fn family(&self, f: Family) -> &Ranges {
        match f {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    /// Union.
    pub fn union(&self, o: &Peers) -> Peers {
        Peers {
            v4: self.v4.union(&o.v4),
            v6: self.v6.union(&o.v6),
        }
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// Parses `10.0.0.0/8`, `10.1.2.3`, `fd00::/64`, `::1`.
pub fn parse_cidr(s: &str) -> Result<(Family, u128, u128), String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{} is not an IP address or CIDR", shown(s)))?;
    let (family, bits, value) = match ip {
        IpAddr::V4(v4) => (Family::V4, 32u32, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (Family::V6, 128u32, u128::from(v6)),
    };
    let len: u32 = match len {
        None => bits,
        Some(l) => l
            .trim()
            .parse()
            .ok()
            .filter(|l| *l <= bits)
            .ok_or_else(|| format!("{}: prefix length must be 0-{bits}", shown(s)))?,
    };
    let host_bits = bits - len;
    let mask: u128 = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    if value & mask != 0 {
        return Err(format!(
            "{}: host bits set (did you mean {}?)",
            shown(s),
            format_cidr(family, value & !mask, len)
        ));
    }
    Ok((family, value, value | mask))
}

/// Formats a network address and prefix length.
pub fn format_cidr(f: Family, value: u128, len: u32) -> String {
    // By hand for IPv4: narrowing 100k hosts formats 100k of them.
    fn push_dec(s: &mut String, n: u32) {
        if n >= 10 {
            push_dec(s, n / 10);
        }
        s.push(char::from(b'0' + u8::try_from(n % 10).unwrap_or(0)));
    }
    let mut s = String::with_capacity(20);
    match f {
        Family::V4 => {
            let v = u32::try_from(value).unwrap_or(u32::MAX);
            for (i, octet) in v.to_be_bytes().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                push_dec(&mut s, u32::from(octet));
            }
        }
        Family::V6 => {
            use std::fmt::Write as _;
            let _ = write!(s, "{}", std::net::Ipv6Addr::from(value));
        }
    }
    s.push('/');
    push_dec(&mut s, len);
    s
}

/// Splits a set of addresses into the fewest CIDRs.
pub fn to_cidrs(f: Family, r: &Ranges) -> Vec<String> {
    cidr_blocks(f, r)
        .map(|(net, len)| format_cidr(f, net, len))
        .collect()
}

/// The fewest CIDR blocks that make up `r`, in order, as (network, prefix
/// length); lazy, so a caller can list the first few of a huge set.
pub fn cidr_blocks(f: Family, r: &Ranges) -> impl Iterator<Item = (u128, u32)> + '_ {
    let bits: u32 = if f == Family::V4 { 32 } else { 128 };
    r.intervals().iter().flat_map(move |&(lo, hi)| {
        let mut next = Some(lo);
        std::iter::from_fn(move || {
            let cur = next?;
            // Largest aligned block starting at cur that fits in [cur, hi]
            // (cur is a multiple of the block size, so `last` cannot overflow).
            let mut size_bits = cur.trailing_zeros().min(bits);
            let last = loop {
                let last = if size_bits == 128 {
                    u128::MAX
                } else {
                    cur + ((1u128 << size_bits) - 1)
                };
                if last <= hi {
                    break last;
                }
                size_bits -= 1;
            };
            next = (last < hi).then(|| last + 1);
            Some((cur, bits - size_bits))
        })
    })
}

/// Parses `80`, `"80"`, `"8000-8080"`.
pub fn parse_port(p: &PortSpec) -> Result<(u128, u128), String> {
    match p {
        PortSpec::Num(n) => Ok((u128::from(*n), u128::from(*n))),
        PortSpec::Text(t) => {
            let parse = |x: &str| {
                x.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("{} is not a port (0-65535) or range", shown(t)))
            };
            let (a, b) = match t.split_once('-') {
                Some((a, b)) => (parse(a)?, parse(b)?),
                None => {
                    let a = parse(t)?;
                    (a, a)
                }
            };
            if a > b {
                return Err(format!("{}: range is backwards", shown(t)));
            }
            Ok((u128::from(a), u128::from(b)))
        }
    }
}

/// All ports.
pub fn all_ports() -> Ranges {
    Ranges::interval(0, 65535)
}

/// A validated entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Name.
    pub name: String,
    /// Peers.
    pub peers: Peers,
    /// The single addresses among the peers as written (not merged), which
    /// the nftables backend keeps in hash sets so adding or removing one
    /// host is one element change whatever the number of peers.
    pub hosts: BTreeSet<(Family, u128)>,
    /// The prefixes and ranges among the peers, merged.
    pub nets: Peers,
    /// Directions covered (In and/or Out).
    pub directions: Vec<Direction>,
    /// Per protocol, the ports (ICMP: all ports, meaning "any").
    pub protocols: BTreeMap<Proto, Ranges>,
}

/// A validated boundary.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Boundary {
    /// Drop or reject.
    pub action: Action,
    /// Allow entries.
    pub allow: Vec<Entry>,
    /// Failsafe entries.
    pub failsafe: Vec<Entry>,
    /// Routers whose RAs and redirects are accepted (cluster boundary only).
    pub routers: BTreeSet<(Family, u128)>,
    /// The only sources of DHCP replies (cluster boundary only); None: DHCP
    /// is not fenced apart from the entries.
    pub dhcp_servers: Option<BTreeSet<DhcpServer>>,
}

/// Validates `dhcp_servers` (already counted): each one unicast address,
/// the MAC if given a unicast Ethernet address; the list may be empty
/// (then no DHCP reply is accepted from anyone), a server given twice is
/// refused.
fn dhcp_servers(list: &[DhcpServerDoc]) -> Result<BTreeSet<DhcpServer>, DocError> {
    let mut out = BTreeSet::new();
    for (i, d) in list.iter().enumerate() {
        let at = format!("dhcp_servers[{i}]");
        let (addr, mac, addr_at) = match d {
            DhcpServerDoc::Addr(a) => (a, None, at.clone()),
            DhcpServerDoc::Pinned { addr, mac } => (addr, Some(mac), format!("{at}.addr")),
        };
        let (family, addr) = parse_server_addr(addr).map_err(|e| err(addr_at, e))?;
        let mac = mac
            .map(|m| parse_mac(m).map_err(|e| err(format!("{at}.mac"), e)))
            .transpose()?;
        if !out.insert(DhcpServer { family, addr, mac }) {
            return Err(err(at, "this server is listed twice"));
        }
    }
    Ok(out)
}

/// Refuses a DHCP server address listed both with and without a MAC: its
/// address-only rule accepts a reply from any MAC, which the pin was there
/// to refuse (review). Two pins of one address (two servers sharing it)
/// stay allowed. Checked when a document is set, not when a stored one is
/// read: a stored document refused at start would leave the node with no
/// table at all.
pub fn check_dhcp_pins(doc: &BoundaryDoc) -> Result<(), DocError> {
    let Some(list) = &doc.dhcp_servers else {
        return Ok(());
    };
    let addr_of = |d: &DhcpServerDoc| match d {
        DhcpServerDoc::Addr(a) => (a.clone(), false),
        DhcpServerDoc::Pinned { addr, .. } => (addr.clone(), true),
    };
    for (i, d) in list.iter().enumerate() {
        let (a, pinned) = addr_of(d);
        let Ok(parsed) = parse_server_addr(&a) else {
            continue;
        };
        let clash = list[..i].iter().any(|o| {
            let (b, other_pinned) = addr_of(o);
            pinned != other_pinned && parse_server_addr(&b).is_ok_and(|p| p == parsed)
        });
        if clash {
            return Err(err(
                format!("dhcp_servers[{i}]"),
                "this server's address is also listed with another MAC pin or none; an address-only entry accepts replies from any MAC: list it pinned only",
            ));
        }
    }
    Ok(())
}

impl BoundaryDoc {
    /// Parses a TOML document; errors name the field, and the line and
    /// column for errors in the text ([`crate::doc`]).
    pub fn from_toml(text: &str) -> Result<Self, DocError> {
        crate::doc::from_toml(text, MAX_DOC_BYTES)
    }

    /// Parses a JSON document (one, and nothing after it but white space);
    /// errors name the field, and the line and column for errors in the text.
    pub fn from_json(text: &str) -> Result<Self, DocError> {
        crate::doc::from_json(text, MAX_DOC_BYTES)
    }

    /// Peers of the allow and failsafe entries with groups expanded: what
    /// [`MAX_PEERS_TOTAL`] bounds.
    pub fn expanded_peers(&self) -> usize {
        self.allow
            .iter()
            .chain(&self.failsafe)
            .flat_map(|e| &e.peers)
            .map(|p| {
                p.strip_prefix('@')
                    .and_then(|g| self.groups.get(g))
                    .map_or(1, Vec::len)
            })
            .fold(0usize, usize::saturating_add)
    }

    /// How many times entries name `@group`.
    pub fn references(&self, group: &str) -> usize {
        self.allow
            .iter()
            .chain(&self.failsafe)
            .flat_map(|e| &e.peers)
            .filter(|p| p.strip_prefix('@') == Some(group))
            .count()
    }

    /// Refuses a document over one of the limits (`MAX_*`), naming the
    /// field; counts only, so it runs before any parsing of peers.
    fn check_limits(&self) -> Result<(), DocError> {
        let over = |field: String, n: usize, what: &str, max: usize| {
            if n > max {
                Err(err(field, format!("{n} {what}, at most {max}")))
            } else {
                Ok(())
            }
        };
        over("groups".into(), self.groups.len(), "groups", MAX_GROUPS)?;
        for (g, members) in &self.groups {
            over(group_at(g), members.len(), "members", MAX_GROUP_MEMBERS)?;
        }
        over("routers".into(), self.routers.len(), "routers", MAX_ROUTERS)?;
        if let Some(d) = &self.dhcp_servers {
            over("dhcp_servers".into(), d.len(), "servers", MAX_DHCP_SERVERS)?;
        }
        for (section, list) in [("allow", &self.allow), ("failsafe", &self.failsafe)] {
            over(section.into(), list.len(), "entries", MAX_ENTRIES)?;
            for (i, e) in list.iter().enumerate() {
                let at = format!("{section}[{i}]");
                over(
                    format!("{at}.peers"),
                    e.peers.len(),
                    "peers",
                    MAX_PEERS_PER_ENTRY,
                )?;
                let protocols = e.protocols.as_deref().unwrap_or_default();
                over(
                    format!("{at}.protocols"),
                    protocols.len(),
                    "protocols",
                    MAX_PROTOCOLS,
                )?;
                for (k, p) in protocols.iter().enumerate() {
                    let n = p.ports.as_ref().map_or(0, Vec::len);
                    over(
                        format!("{at}.protocols[{k}].ports"),
                        n,
                        "port specs",
                        MAX_PORT_SPECS,
                    )?;
                }
            }
        }
        over(
            "document".into(),
            self.expanded_peers(),
            "peers with groups expanded",
            MAX_PEERS_TOTAL,
        )
    }

    /// Validates and resolves groups. `allow_failsafe` is false for tenant documents.
    pub fn validate(&self, allow_failsafe: bool) -> Result<Boundary, DocError> {
        self.check_limits()?;
        for (g, members) in &self.groups {
            check_name(&group_at(g), g)?;
            if members.is_empty() {
                return Err(err(group_at(g), "a group needs at least one member"));
            }
        }
        if !allow_failsafe && !self.failsafe.is_empty() {
            return Err(err(
                "failsafe",
                "only the landlord's cluster boundary may define failsafe entries",
            ));
        }
        if !allow_failsafe && !self.routers.is_empty() {
            return Err(err(
                "routers",
                "only the landlord's cluster boundary may name routers",
            ));
        }
        let mut routers = BTreeSet::new();
        for (i, r) in self.routers.iter().enumerate() {
            let (f, lo, hi) = parse_cidr(r).map_err(|e| err(format!("routers[{i}]"), e))?;
            if lo != hi {
                return Err(err(
                    format!("routers[{i}]"),
                    format!("{}: a router is one address, not a prefix", shown(r)),
                ));
            }
            routers.insert((f, lo));
        }
        if !allow_failsafe && self.dhcp_servers.is_some() {
            return Err(err(
                "dhcp_servers",
                "only the landlord's cluster boundary may name DHCP servers",
            ));
        }
        let dhcp_servers = self
            .dhcp_servers
            .as_ref()
            .map(|list| dhcp_servers(list))
            .transpose()?;
        let allow = self.entries("allow", &self.allow)?;
        let failsafe = self.entries("failsafe", &self.failsafe)?;
        Ok(Boundary {
            action: self.action,
            allow,
            failsafe,
            routers,
            dhcp_servers,
        })
    }

    fn entries(&self, section: &str, docs: &[EntryDoc]) -> Result<Vec<Entry>, DocError> {
        let mut names = std::collections::BTreeSet::new();
        docs.iter()
            .enumerate()
            .map(|(i, e)| {
                let at = format!("{section}[{i}]");
                check_name(&format!("{at}.name"), &e.name)?;
                if !names.insert(e.name.clone()) {
                    return Err(err(
                        format!("{at}.name"),
                        format!("duplicate entry name {}", shown(&e.name)),
                    ));
                }
                self.entry(&at, e)
            })
            .collect()
    }

    fn entry(&self, at: &str, e: &EntryDoc) -> Result<Entry, DocError> {
        if e.peers.is_empty() {
            return Err(err(
                format!("{at}.peers"),
                "at least one peer (CIDR, address or @group) is required",
            ));
        }
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let mut hosts = Vec::new();
        let (mut n4, mut n6) = (Vec::new(), Vec::new());
        for (j, p) in e.peers.iter().enumerate() {
            // The field is named only on error (100k peers: no string each).
            let field = || format!("{at}.peers[{j}]");
            let members: &[String] = match p.strip_prefix('@') {
                Some(g) => self
                    .groups
                    .get(g)
                    .ok_or_else(|| err(field(), format!("unknown group {}", shown(g))))?,
                None => std::slice::from_ref(p),
            };
            for m in members {
                let (f, lo, hi) = parse_cidr(m).map_err(|r| err(field(), r))?;
                match f {
                    Family::V4 => v4.push((lo, hi)),
                    Family::V6 => v6.push((lo, hi)),
                }
                if lo == hi {
                    hosts.push((f, lo));
                } else if f == Family::V4 {
                    n4.push((lo, hi));
                } else {
                    n6.push((lo, hi));
                }
            }
        }
        // Collecting sorts once and builds the tree in bulk.
        let hosts: BTreeSet<(Family, u128)> = hosts.into_iter().collect();
        let mut protocols = BTreeMap::new();
        match &e.protocols {
            None => {
                for p in Proto::ALL {
                    protocols.insert(p, all_ports());
                }
            }
            Some(list) => {
                if list.is_empty() {
                    return Err(err(
                        format!("{at}.protocols"),
                        "empty list; omit the key to allow all protocols",
                    ));
                }
                for (k, pd) in list.iter().enumerate() {
                    let field = format!("{at}.protocols[{k}]");
                    let ports = match (&pd.ports, pd.proto) {
                        (None, _) => all_ports(),
                        (Some(_), p) if !p.has_ports() => {
                            return Err(err(
                                format!("{field}.ports"),
                                format!("{} has no ports", p.name()),
                            ))
                        }
                        (Some(ps), _) => {
                            if ps.is_empty() {
                                return Err(err(
                                    format!("{field}.ports"),
                                    "empty list; omit the key for all ports",
                                ));
                            }
                            let mut v = Vec::new();
                            for (n, p) in ps.iter().enumerate() {
                                v.push(
                                    parse_port(p)
                                        .map_err(|r| err(format!("{field}.ports[{n}]"), r))?,
                                );
                            }
                            Ranges::from_intervals(v)
                        }
                    };
                    let merged = protocols
                        .get(&pd.proto)
                        .map_or(ports.clone(), |old: &Ranges| old.union(&ports));
                    protocols.insert(pd.proto, merged);
                }
            }
        }
        let directions = match e.direction {
            Direction::Both => vec![Direction::In, Direction::Out],
            d => vec![d],
        };
        Ok(Entry {
            name: e.name.clone(),
            peers: Peers {
                v4: Ranges::from_intervals(v4),
                v6: Ranges::from_intervals(v6),
            },
            hosts,
            nets: Peers {
                v4: Ranges::from_intervals(n4),
                v6: Ranges::from_intervals(n6),
            },
            directions,
            protocols,
        })
    }
}

/// Refuses a document text over [`MAX_DOC_BYTES`] (field "document").
pub fn check_doc_size(text: &str) -> Result<(), DocError> {
    crate::doc::check_size(text, MAX_DOC_BYTES)
}

fn check_name(field: &str, name: &str) -> Result<(), DocError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!("{}: use 1-64 characters of A-Z a-z 0-9 . _ -", shown(name)),
        ))
    }
}

/// The field of group `g`: its name cut to [`ECHO_LIMIT`] characters (a
/// name that long is refused anyway; the error need not echo it whole).
fn group_at(g: &str) -> String {
    if g.chars().count() <= ECHO_LIMIT {
        format!("groups.{g}")
    } else {
        format!("groups.{}…", g.chars().take(ECHO_LIMIT).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_strings_are_echoed_cut_short() {
        let long = "x".repeat(100_000);
        for text in [
            format!("[[allow]]\nname = \"x\"\npeers = [\"{long}\"]\n"),
            format!("[[allow]]\nname = \"x\"\npeers = [\"@{long}\"]\n"),
            format!("[[allow]]\nname = \"x\"\npeers = [\"::/0\"]\nprotocols = [{{ proto = \"tcp\", ports = [\"{long}\"] }}]\n"),
            format!("[[allow]]\nname = \"{long}\"\npeers = [\"::/0\"]\n"),
            format!("routers = [\"{long}\"]\n"),
            format!("[groups]\n{long} = [\"10.0.0.1\"]\n[[allow]]\nname = \"x\"\npeers = [\"10.0.0.1\"]\n"),
        ] {
            let e = BoundaryDoc::from_toml(&text)
                .and_then(|d| d.validate(true))
                .unwrap_err();
            let shown = format!("{}: {}", e.field, e.reason);
            assert!(shown.len() < 400, "{} bytes: {}", shown.len(), &shown[..400]);
            assert!(shown.contains("100000 bytes") || e.field.ends_with('…'), "{shown}");
        }
    }

    #[test]
    fn cidrs_format_as_std() {
        for v in [
            0u32,
            1,
            9,
            10,
            99,
            100,
            255,
            0x0a00_0001,
            0xc0a8_6401,
            u32::MAX,
        ] {
            for len in [0, 8, 24, 32] {
                let want = format!("{}/{len}", std::net::Ipv4Addr::from(v));
                assert_eq!(format_cidr(Family::V4, u128::from(v), len), want);
            }
        }
        assert_eq!(format_cidr(Family::V6, 0xfd00 << 112, 16), "fd00::/16");
    }

    #[test]
    fn cidrs_parse_and_round_trip() {
        assert_eq!(
            parse_cidr("10.0.0.0/8").unwrap(),
            (Family::V4, 0x0a00_0000, 0x0aff_ffff)
        );
        assert_eq!(parse_cidr("10.1.2.3").unwrap().1, 0x0a01_0203);
        assert!(parse_cidr("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nonsense").is_err());
        assert_eq!(parse_cidr("::/0").unwrap(), (Family::V6, 0, u128::MAX));
        let r = Ranges::interval(0x0a00_0000, 0x0aff_ffff);
        assert_eq!(to_cidrs(Family::V4, &r), vec!["10.0.0.0/8"]);
        let r = Ranges::interval(0x0a00_0001, 0x0a00_0006);
        assert_eq!(
            to_cidrs(Family::V4, &r),
            vec!["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
        assert_eq!(
            to_cidrs(Family::V6, &Ranges::interval(0, u128::MAX)),
            vec!["::/0"]
        );
        assert_eq!(
            to_cidrs(Family::V4, &Ranges::interval(0, u128::from(u32::MAX))),
            vec!["0.0.0.0/0"]
        );
    }

    #[test]
    fn documents_validate_with_field_paths() {
        let doc = BoundaryDoc::from_toml(
            r#"
action = "reject"
[groups]
a = ["10.0.1.0/24", "fd00:a::/64"]
[[allow]]
name = "cluster"
peers = ["@a"]
[[allow]]
name = "web"
peers = ["0.0.0.0/0"]
direction = "in"
protocols = [{ proto = "tcp", ports = [80, "443", "8000-8080"] }]
"#,
        )
        .unwrap();
        let b = doc.validate(true).unwrap();
        assert_eq!(b.action, Action::Reject);
        assert_eq!(b.allow[0].directions, vec![Direction::In, Direction::Out]);
        assert_eq!(
            b.allow[1].protocols[&Proto::Tcp].intervals(),
            &[(80, 80), (443, 443), (8000, 8080)]
        );

        let bad = |t: &str| {
            BoundaryDoc::from_toml(t)
                .and_then(|d| d.validate(false))
                .unwrap_err()
                .field
        };
        assert_eq!(
            bad("[[allow]]\nname = \"x\"\npeers = [\"10.0.0.0/33\"]\n"),
            "allow[0].peers[0]"
        );
        assert_eq!(
            bad("[[allow]]\nname = \"x\"\npeers = [\"@nope\"]\n"),
            "allow[0].peers[0]"
        );
        assert_eq!(
            bad("[[allow]]\nname = \"x\"\npeers = [\"::/0\"]\nprotocols = [{ proto = \"tcp\", ports = [\"99999\"] }]\n"),
            "allow[0].protocols[0].ports[0]"
        );
        assert_eq!(
            bad("[[allow]]\nname = \"x\"\npeers = [\"::/0\"]\ndirection = \"sideways\"\n"),
            "allow[0].direction"
        );
        assert_eq!(
            bad("[[failsafe]]\nname = \"x\"\npeers = [\"::/0\"]\n"),
            "failsafe"
        );
        assert_eq!(
            bad("[[allow]]\nname = \"x\"\npeers = []\n"),
            "allow[0].peers"
        );
        let e = BoundaryDoc::from_json(r#"{"allow": [{"name": "x", "peers": "10.0.0.0/8"}]}"#)
            .unwrap_err();
        assert_eq!(e.field, "allow[0].peers");
    }

    fn entry(name: &str, peers: Vec<String>) -> EntryDoc {
        EntryDoc {
            name: name.into(),
            peers,
            direction: Direction::Both,
            protocols: None,
        }
    }

    /// `validate`'s error for a document whose peers are all invalid: the
    /// limit when over it (checked before the peers are parsed), else the
    /// first peer.
    fn refusal(doc: &BoundaryDoc, allow_failsafe: bool) -> DocError {
        doc.validate(allow_failsafe).unwrap_err()
    }

    #[test]
    fn limits_refuse_just_over_and_accept_at_the_cap() {
        let bad = || "bad".to_owned();
        // Entries per section.
        let mut d = BoundaryDoc {
            allow: (0..MAX_ENTRIES)
                .map(|i| entry(&format!("e{i}"), vec![bad()]))
                .collect(),
            ..Default::default()
        };
        assert_eq!(refusal(&d, false).field, "allow[0].peers[0]");
        d.allow.push(entry("one-more", vec![bad()]));
        let e = refusal(&d, false);
        assert_eq!(
            e.to_string(),
            format!("allow: {} entries, at most {MAX_ENTRIES}", MAX_ENTRIES + 1)
        );
        let mut d = BoundaryDoc {
            failsafe: (0..=MAX_ENTRIES)
                .map(|i| entry(&format!("e{i}"), vec![bad()]))
                .collect(),
            ..Default::default()
        };
        assert_eq!(refusal(&d, true).field, "failsafe");
        d.failsafe.pop();
        assert_eq!(refusal(&d, true).field, "failsafe[0].peers[0]");

        // Peers per entry, and in all (groups expanded).
        let mut d = BoundaryDoc {
            allow: vec![entry("x", vec![bad(); MAX_PEERS_PER_ENTRY])],
            ..Default::default()
        };
        assert_eq!(refusal(&d, false).field, "allow[0].peers[0]");
        d.allow[0].peers.push(bad());
        assert_eq!(refusal(&d, false).field, "allow[0].peers");
        let group = |n: usize| BTreeMap::from([("g".to_owned(), vec![bad(); n])]);
        let mut d = BoundaryDoc {
            groups: group(MAX_GROUP_MEMBERS),
            allow: vec![entry("x", vec!["@g".into(), "@g".into()])],
            ..Default::default()
        };
        assert_eq!(MAX_PEERS_TOTAL, 2 * MAX_GROUP_MEMBERS);
        assert_eq!(refusal(&d, false).field, "allow[0].peers[0]");
        d.allow.push(entry("y", vec![bad()]));
        let e = refusal(&d, false);
        assert_eq!(e.field, "document");
        assert!(
            e.reason.contains(&format!("{} peers", MAX_PEERS_TOTAL + 1)),
            "{e}"
        );
        d.allow.pop();
        d.groups = group(MAX_GROUP_MEMBERS + 1);
        assert_eq!(refusal(&d, false).field, "groups.g");

        // Groups.
        let groups = |n: usize| (0..n).map(|i| (format!("g{i}"), vec![bad()])).collect();
        let d = BoundaryDoc {
            groups: groups(MAX_GROUPS + 1),
            ..Default::default()
        };
        assert_eq!(
            refusal(&d, false).to_string(),
            format!("groups: {} groups, at most {MAX_GROUPS}", MAX_GROUPS + 1)
        );
        let d = BoundaryDoc {
            groups: groups(MAX_GROUPS),
            ..Default::default()
        };
        assert!(
            d.validate(false).is_ok(),
            "groups are parsed where they are used"
        );

        // Protocols and port specs.
        let tcp = |n: usize| ProtoDoc {
            proto: Proto::Tcp,
            ports: Some(vec![PortSpec::Text("x".into()); n]),
        };
        let mut d = BoundaryDoc {
            allow: vec![EntryDoc {
                protocols: Some(vec![tcp(MAX_PORT_SPECS)]),
                ..entry("x", vec!["::/0".into()])
            }],
            ..Default::default()
        };
        assert_eq!(refusal(&d, false).field, "allow[0].protocols[0].ports[0]");
        d.allow[0].protocols = Some(vec![tcp(MAX_PORT_SPECS + 1)]);
        assert_eq!(refusal(&d, false).field, "allow[0].protocols[0].ports");
        d.allow[0].protocols = Some(vec![tcp(1); MAX_PROTOCOLS + 1]);
        assert_eq!(refusal(&d, false).field, "allow[0].protocols");
        d.allow[0].protocols = Some(vec![tcp(1); MAX_PROTOCOLS]);
        assert_eq!(refusal(&d, false).field, "allow[0].protocols[0].ports[0]");

        // Routers.
        let mut d = BoundaryDoc {
            routers: vec![bad(); MAX_ROUTERS],
            ..Default::default()
        };
        assert_eq!(refusal(&d, true).field, "routers[0]");
        d.routers.push(bad());
        assert_eq!(refusal(&d, true).field, "routers");

        // Document bytes, before parsing.
        let at_cap = format!("{{}}{}", " ".repeat(MAX_DOC_BYTES - 2));
        assert!(BoundaryDoc::from_json(&at_cap).is_ok());
        let over = format!("{at_cap} ");
        assert_eq!(BoundaryDoc::from_json(&over).unwrap_err().field, "document");
        let at_cap = format!("#{}", "x".repeat(MAX_DOC_BYTES - 1));
        assert!(BoundaryDoc::from_toml(&at_cap).is_ok());
        let e = BoundaryDoc::from_toml(&format!("{at_cap}x")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "document: {} bytes, at most {MAX_DOC_BYTES}",
                MAX_DOC_BYTES + 1
            )
        );
    }

    #[test]
    fn json_trailing_content_and_duplicate_keys_are_refused() {
        for text in [r#"{}{"allow":[]}"#, "{} x", "{}\n{}"] {
            let e = BoundaryDoc::from_json(text).unwrap_err();
            assert_eq!(e.field, "document", "{text}: {e}");
        }
        assert!(BoundaryDoc::from_json("{}\n\t ").is_ok());
        let e = BoundaryDoc::from_json(r#"{"groups": {"a": ["10.0.0.1"], "a": ["10.0.0.2"]}}"#)
            .unwrap_err();
        assert!(
            e.field.starts_with("groups") && e.reason.contains("\"a\""),
            "{e}"
        );
        let e = BoundaryDoc::from_json(r#"{"allow": [], "allow": []}"#).unwrap_err();
        assert!(e.reason.contains("duplicate field"), "{e}");
        let e =
            BoundaryDoc::from_json(r#"{"allow": [{"name": "x", "name": "y", "peers": ["::/0"]}]}"#)
                .unwrap_err();
        assert!(e.reason.contains("duplicate field"), "{e}");
        // TOML parsers refuse a key given twice themselves.
        assert!(
            BoundaryDoc::from_toml("[groups]\na = [\"10.0.0.1\"]\na = [\"10.0.0.2\"]\n").is_err()
        );
        assert!(BoundaryDoc::from_toml("action = \"drop\"\naction = \"reject\"\n").is_err());
        assert!(BoundaryDoc::from_toml(
            "[groups]\na = [\"10.0.0.1\"]\n[groups]\nb = [\"10.0.0.2\"]\n"
        )
        .is_err());
    }

    #[test]
    fn ipv4_mapped_peers_are_ipv6_peers() {
        // As in nftables: `::ffff:10.0.0.1` goes in the ip6 set and matches
        // IPv6 packets only; it is not 10.0.0.1.
        assert_eq!(
            parse_cidr("::ffff:10.0.0.1").unwrap(),
            (Family::V6, 0xffff_0a00_0001, 0xffff_0a00_0001)
        );
        let b =
            BoundaryDoc::from_toml("[[allow]]\nname = \"m\"\npeers = [\"::ffff:10.0.0.0/120\"]\n")
                .unwrap()
                .validate(false)
                .unwrap();
        assert!(b.allow[0].peers.v4.is_empty());
        assert_eq!(
            b.allow[0].peers.v6.intervals(),
            &[(0xffff_0a00_0000, 0xffff_0a00_00ff)]
        );
    }

    #[test]
    fn dhcp_servers_are_checked_naming_the_field() {
        let v = |t: &str, cluster: bool| {
            BoundaryDoc::from_toml(t)
                .map_err(|e| e.to_string())
                .and_then(|d| d.validate(cluster).map_err(|e| e.to_string()))
        };
        let b = v(
            "dhcp_servers = [\"10.77.0.1\", { addr = \"fe80::1\", mac = \"52:54:00:AB:cd:01\" }]\n",
            true,
        )
        .unwrap();
        let d: Vec<DhcpServer> = b.dhcp_servers.unwrap().into_iter().collect();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].ip().to_string(), "10.77.0.1");
        assert_eq!(d[0].mac, None);
        assert_eq!(d[1].ip().to_string(), "fe80::1");
        assert_eq!(d[1].mac_text().as_deref(), Some("52:54:00:ab:cd:01"));
        // Absent and empty differ: empty accepts DHCP replies from no one.
        assert_eq!(v("", true).unwrap().dhcp_servers, None);
        assert_eq!(
            v("dhcp_servers = []\n", true).unwrap().dhcp_servers,
            Some(BTreeSet::new())
        );
        for (t, want) in [
            ("dhcp_servers = [\"10.0.0.0/24\"]", "dhcp_servers[0]: \"10.0.0.0/24\": a DHCP server is one address, not a prefix"),
            ("dhcp_servers = [\"255.255.255.255\"]", "dhcp_servers[0]: \"255.255.255.255\": a DHCP server's address is a unicast address"),
            ("dhcp_servers = [\"ff02::1:2\"]", "dhcp_servers[0]: \"ff02::1:2\": a DHCP server's address is a unicast address"),
            ("dhcp_servers = [\"x\"]", "dhcp_servers[0]: \"x\" is not an IP address or CIDR"),
            ("dhcp_servers = [\"10.0.0.1\", \"10.0.0.1\"]", "dhcp_servers[1]: this server is listed twice"),
            ("dhcp_servers = [{ addr = \"10.0.0.1\", mac = \"52:54:00:00:00\" }]", "dhcp_servers[0].mac: \"52:54:00:00:00\" is not a MAC address (aa:bb:cc:dd:ee:ff)"),
            ("dhcp_servers = [{ addr = \"10.0.0.1\", mac = \"ff:ff:ff:ff:ff:ff\" }]", "dhcp_servers[0].mac: \"ff:ff:ff:ff:ff:ff\": a server's MAC is a unicast address, not zero, multicast or broadcast"),
            ("dhcp_servers = [{ addr = \"10.0.0.x\", mac = \"52:54:00:00:00:01\" }]", "dhcp_servers[0].addr: \"10.0.0.x\" is not an IP address or CIDR"),
        ] {
            assert_eq!(v(t, true).unwrap_err(), want, "{t}");
        }
        // A table with a key it does not know, or without addr.
        let e = v("dhcp_servers = [{ addr = \"10.0.0.1\", vlan = 3 }]", true).unwrap_err();
        assert!(e.contains("dhcp_servers[0]"), "{e}");
        // A sub-boundary may not name any (not even fewer).
        assert_eq!(
            v("dhcp_servers = [\"10.77.0.1\"]", false).unwrap_err(),
            "dhcp_servers: only the landlord's cluster boundary may name DHCP servers"
        );
        assert!(v("dhcp_servers = []", false).is_err());
        // Bounded, counted before parsing.
        let d = BoundaryDoc {
            dhcp_servers: Some(vec![DhcpServerDoc::Addr("x".into()); MAX_DHCP_SERVERS + 1]),
            ..Default::default()
        };
        assert_eq!(refusal(&d, true).field, "dhcp_servers");
        // JSON: both shapes, and back.
        let j = BoundaryDoc::from_json(
            r#"{"dhcp_servers": ["10.77.0.1", {"addr": "10.77.0.2", "mac": "52:54:00:00:00:02"}]}"#,
        )
        .unwrap();
        let again = BoundaryDoc::from_json(&serde_json::to_string(&j).unwrap()).unwrap();
        assert_eq!(j, again);
        assert_eq!(j.validate(true).unwrap().dhcp_servers.unwrap().len(), 2);
    }

    /// Every TOML example of docs/netpolicy.md is a valid cluster
    /// boundary (the document example, the DHCP ones).
    #[test]
    fn documented_examples_validate() {
        let md = include_str!("../../docs/netpolicy.md");
        let mut n = 0;
        for block in md.split("```toml\n").skip(1) {
            let text = block.split("```").next().unwrap();
            let d = BoundaryDoc::from_toml(text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
            d.validate(true).unwrap_or_else(|e| panic!("{e}:\n{text}"));
            n += 1;
        }
        assert!(n >= 3, "{n} examples");
        let dhcp = md.split("## DHCP").nth(1).unwrap();
        let first = dhcp
            .split("```toml\n")
            .nth(1)
            .unwrap()
            .split("```")
            .next()
            .unwrap();
        let b = BoundaryDoc::from_toml(first)
            .unwrap()
            .validate(true)
            .unwrap();
        assert_eq!(b.dhcp_servers.unwrap().len(), 1);
    }
}
