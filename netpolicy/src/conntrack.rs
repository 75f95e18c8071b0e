//! Cutting open connections a new policy would not admit (issue 13).
//!
//! Every chain accepts `ct state established,related` before any peer
//! check, so a flow admitted under an old policy keeps passing after the
//! policy changes. After each committed change the agent dumps the
//! connection-tracking table and deletes every entry whose flow the new
//! policy would not admit as new; the next packet of such a flow is then
//! tracked afresh (NEW, also mid-stream with `nf_conntrack_tcp_loose=1`)
//! and meets the rules. No per-packet cost: the rules are unchanged.
//! Before the entries go, the node's own TCP sockets of the cut flows are
//! aborted (SOCK_DESTROY, as `ss -K` does; the RST still leaves through
//! the old entry): otherwise, when the new policy lets the peer open any
//! port inbound, the peer's next mid-stream packet of a cut outbound flow
//! is tracked as a NEW inbound flow the rules admit, and the flow resumes
//! re-oriented (seen in tests/tests/boundary_revocation.rs).
//!
//! Direction of an entry, from its original tuple (the first packet): an
//! original source that is an address of this namespace is an outbound
//! flow to the original destination; an original destination that is
//! local (or multicast/broadcast) is an inbound flow from the source; a
//! flow between two local addresses or over loopback is always kept; a
//! flow with neither end local (forwarded) must be admitted inbound from
//! its source and outbound to its destination. The port is the original
//! destination port (TCP/UDP); ICMP and every other protocol have none.
//!
//! Hand-encoded ctnetlink (include/uapi/linux/netfilter/nfnetlink_conntrack.h):
//! `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP` (family AF_UNSPEC: both families),
//! then `IPCTNL_MSG_CT_DELETE` per entry carrying the entry's own
//! `CTA_TUPLE_ORIG` bytes as dumped (so any protocol's tuple, and a tuple
//! zone, goes back exactly), its `CTA_ZONE` and its `CTA_ID` (the kernel
//! then deletes only that very entry, never a newer one with the same
//! tuple). A delete always carries `CTA_TUPLE_ORIG`: without a tuple the
//! kernel flushes the whole table. No crate fits: `conntrack` (crates.io)
//! only dumps and brings the `neli` netlink stack; `nlink` is an async
//! netlink framework on tokio; the three messages here (dump, delete,
//! SOCK_DESTROY) are ≈150 lines on the `netlink-sys` socket the crate
//! already uses (see [`crate::netlink`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::check::Flow;
use crate::model::{Direction, Family, Proto};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const IPPROTO_TCP: u8 = 6;

/// Delete messages sent in one datagram. Only the last asks for an ack;
/// the kernel answers the others only on error, in order, so the ack of the
/// last closes the batch. Each answer is a socket buffer of its own
/// (≈0.7 KiB of receive buffer): 128 answers always fit the default 208 KiB
/// (512 acked deletions overflowed it: ENOBUFS).
const DELETE_BATCH: usize = 128;

/// Why cutting failed. The policy change itself is committed either way.
#[derive(Debug, thiserror::Error)]
pub enum CutError {
    /// A socket call failed.
    #[error("conntrack netlink {what}: {source}")]
    Io {
        /// Which call.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the dump or some deletions.
    #[error("conntrack: the kernel refused {what}: {source} ({cut} connections were cut)")]
    Refused {
        /// The dump, or how many deletions.
        what: String,
        /// The first error.
        #[source]
        source: std::io::Error,
        /// Deleted before or despite the error.
        cut: usize,
    },
}

/// One conntrack entry as dumped: the original tuple, parsed for the
/// decision and kept as bytes for the deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Address family (AF_INET, AF_INET6).
    pub family: u8,
    /// Original source.
    pub src: IpAddr,
    /// Original destination.
    pub dst: IpAddr,
    /// IP protocol number.
    pub l4proto: u8,
    /// Original source port (TCP, UDP, SCTP, …; 0 when none).
    pub sport: u16,
    /// Original destination port (TCP, UDP, SCTP, …; 0 when none).
    pub dport: u16,
    /// `CTA_TUPLE_ORIG`, `CTA_ZONE` and `CTA_ID` as dumped (headers
    /// included, aligned): the body of the delete message.
    key: Vec<u8>,
}

/// What a cut did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cut {
    /// Entries in the table (a scoped cut: entries of the scope).
    pub seen: usize,
    /// Entries deleted.
    pub cut: usize,
    /// Local TCP sockets of cut flows aborted (an RST to the peer).
    pub reset: usize,
    /// Decided from the [`Tracker`]'s mirror (no dump of the table).
    pub from_mirror: bool,
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends a message: header, nfgenmsg, body.
fn message(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, body: &[u8]) {
    let len = 16 + 4 + body.len();
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | ty).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&0u16.to_be_bytes());
    buf.extend_from_slice(body);
}

/// The request dumping the whole table (both families).
pub fn encode_dump(seq: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(20);
    message(
        &mut buf,
        IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        0,
        &[],
    );
    buf
}

/// Appends the request deleting `e` (by its original tuple, zone and id);
/// `ack`: answered on success too.
pub fn encode_delete(buf: &mut Vec<u8>, e: &Entry, seq: u32, ack: bool) {
    message(
        buf,
        IPCTNL_MSG_CT_DELETE,
        if ack {
            NLM_F_REQUEST | NLM_F_ACK
        } else {
            NLM_F_REQUEST
        },
        seq,
        e.family,
        &e.key,
    );
}

/// Attributes of `data`: (type without flags, payload, whole attribute
/// with padding). Stops at the first malformed one.
fn attrs(data: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*data.get(at)?, *data.get(at + 1)?]));
        let ty = u16::from_ne_bytes([*data.get(at + 2)?, *data.get(at + 3)?]) & NLA_TYPE_MASK;
        if len < 4 || at + len > data.len() {
            return None;
        }
        let whole = &data[at..(at + align(len)).min(data.len())];
        let payload = &data[at + 4..at + len];
        at += align(len);
        Some((ty, payload, whole))
    })
}

fn find(data: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(data).find(|(t, _, _)| *t == ty).map(|(_, p, _)| p)
}

fn addr(p: &[u8]) -> Option<IpAddr> {
    match p.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(p).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(p).ok()?))),
        _ => None,
    }
}

/// Parses one dumped entry: the message after its nlmsghdr (nfgenmsg,
/// then attributes). None: not an entry this module understands (kept).
pub fn parse_entry(msg: &[u8]) -> Option<Entry> {
    let family = *msg.first()?;
    let body = msg.get(4..)?;
    // The key in one order (tuple, zone, id) whatever the message's, so
    // that an entry from a dump and the same entry from an event compare
    // equal (see [`Tracker`]).
    let (mut orig, mut zone, mut id) = (None, None, None);
    for (ty, payload, whole) in attrs(body) {
        match ty {
            CTA_TUPLE_ORIG => orig = Some((payload, whole)),
            CTA_ZONE => zone = Some(whole),
            CTA_ID => id = Some(whole),
            _ => {}
        }
    }
    let (orig, orig_whole) = orig?;
    let mut key = orig_whole.to_vec();
    key.extend_from_slice(zone.unwrap_or_default());
    key.extend_from_slice(id.unwrap_or_default());
    let ip = find(orig, CTA_TUPLE_IP)?;
    let (src, dst) = match family {
        AF_INET => (CTA_IP_V4_SRC, CTA_IP_V4_DST),
        AF_INET6 => (CTA_IP_V6_SRC, CTA_IP_V6_DST),
        _ => return None,
    };
    let src = addr(find(ip, src)?)?;
    let dst = addr(find(ip, dst)?)?;
    let proto = find(orig, CTA_TUPLE_PROTO)?;
    let l4proto = *find(proto, CTA_PROTO_NUM)?.first()?;
    let port = |ty| {
        find(proto, ty)
            .and_then(|p| <[u8; 2]>::try_from(p).ok())
            .map_or(0, u16::from_be_bytes)
    };
    let (sport, dport) = (port(CTA_PROTO_SRC_PORT), port(CTA_PROTO_DST_PORT));
    Some(Entry {
        family,
        src,
        dst,
        l4proto,
        sport,
        dport,
        key,
    })
}

/// The protocol of the policy model for an IP protocol number.
pub fn proto_of(l4proto: u8) -> Proto {
    match l4proto {
        6 => Proto::Tcp,
        17 => Proto::Udp,
        1 | 58 => Proto::Icmp,
        _ => Proto::Other,
    }
}

/// ICMP of the other family (IPv4 packets of protocol 58, IPv6 packets of
/// protocol 1): the ruleset's `icmp` rules are IPv4's, its `icmpv6` rules
/// IPv6's, and "other" leaves out both numbers, so no rule admits such a
/// flow; the cut must not keep one either (review: it took both as ICMP in
/// either family).
fn no_rule_admits(e: &Entry) -> bool {
    matches!((e.src, e.l4proto), (IpAddr::V4(_), 58) | (IpAddr::V6(_), 1))
}

/// The addresses of this network namespace (and its broadcast addresses).
pub fn local_addrs() -> Result<HashSet<IpAddr>, CutError> {
    let mut out = HashSet::new();
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| CutError::Io {
        what: "getifaddrs",
        source: e.into(),
    })?;
    for ifa in addrs {
        for a in [ifa.address, ifa.broadcast].into_iter().flatten() {
            if let Some(v4) = a.as_sockaddr_in() {
                out.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = a.as_sockaddr_in6() {
                out.insert(IpAddr::V6(v6.ip()));
            }
        }
    }
    Ok(out)
}

fn is_local_dst(a: IpAddr, locals: &HashSet<IpAddr>) -> bool {
    locals.contains(&a) || a.is_multicast() || matches!(a, IpAddr::V4(v4) if v4.is_broadcast())
}

/// Whether the new policy admits `e` as a new flow, `admits` deciding one
/// flow as seen from the node. Loopback and local-to-local flows always.
pub fn keeps(e: &Entry, locals: &HashSet<IpAddr>, admits: &impl Fn(&Flow) -> bool) -> bool {
    keeps_with(e, locals, admits, &|_: &Flow| false)
}

/// [`keeps`], also keeping an entry whose *reversed* orientation
/// `reversed` accepts: a flow conntrack picked up mid-stream from the
/// node's side (the node's reply seen first, `nf_conntrack_tcp_loose`) is
/// oriented node → peer; for failsafe flows (an SSH session to the node
/// while the table was replaced) the reverse is the real one, and the
/// ruleset passes such packets statelessly (see `nft`).
pub fn keeps_with(
    e: &Entry,
    locals: &HashSet<IpAddr>,
    admits: &impl Fn(&Flow) -> bool,
    reversed: &impl Fn(&Flow) -> bool,
) -> bool {
    if no_rule_admits(e) {
        return keeps_oriented(e, locals, admits);
    }
    let proto = proto_of(e.l4proto);
    let sport = if proto.has_ports() { e.sport } else { 0 };
    let src_local = locals.contains(&e.src);
    let dst_local = is_local_dst(e.dst, locals);
    let back = match (src_local, dst_local) {
        (true, false) => Some(Flow {
            direction: Direction::In,
            peer: e.dst,
            proto,
            port: sport,
        }),
        (false, true) => Some(Flow {
            direction: Direction::Out,
            peer: e.src,
            proto,
            port: sport,
        }),
        _ => None,
    };
    // TCP only: the ruleset's stateless reverse rules pass TCP segments
    // without SYN only (a session picked up mid-stream); a UDP or other
    // flow's first packet made its entry, oriented as it was admitted, so
    // its reversed orientation proves nothing (review).
    if proto == Proto::Tcp && back.is_some_and(|f| reversed(&f)) {
        return true;
    }
    keeps_oriented(e, locals, admits)
}

fn keeps_oriented(e: &Entry, locals: &HashSet<IpAddr>, admits: &impl Fn(&Flow) -> bool) -> bool {
    let proto = proto_of(e.l4proto);
    let port = if proto.has_ports() { e.dport } else { 0 };
    let flow = |direction, peer| Flow {
        direction,
        peer,
        proto,
        port,
    };
    let src_local = locals.contains(&e.src);
    let dst_local = is_local_dst(e.dst, locals);
    if e.src.is_loopback() || e.dst.is_loopback() || (src_local && dst_local) {
        return true;
    }
    if no_rule_admits(e) {
        return false;
    }
    match (src_local, dst_local) {
        (true, _) => admits(&flow(Direction::Out, e.dst)),
        (false, true) => admits(&flow(Direction::In, e.src)),
        (false, false) => {
            admits(&flow(Direction::In, e.src)) && admits(&flow(Direction::Out, e.dst))
        }
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> CutError {
    move |source| CutError::Io { what, source }
}

fn open() -> Result<Socket, CutError> {
    socket(NETLINK_NETFILTER)
}

/// A netlink socket of `protocol`, connected to the kernel, with a 5 s
/// receive bound. Error answers carry only the header of the refused
/// request (cap_ack).
fn socket(protocol: isize) -> Result<Socket, CutError> {
    let mut sock = Socket::new(protocol).map_err(io("socket"))?;
    sock.bind_auto().map_err(io("bind"))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(io("connect"))?;
    sock.set_cap_ack(true).map_err(io("cap_ack"))?;
    nix::sys::socket::setsockopt(
        &sock,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(5, 0),
    )
    .map_err(|e| CutError::Io {
        what: "timeout",
        source: e.into(),
    })?;
    Ok(sock)
}

/// Receive buffer: the kernel sizes dump messages by the reader's buffer.
const RECV_BUF: usize = 256 * 1024;

fn recv(sock: &Socket, buf: &mut [u8]) -> Result<usize, CutError> {
    nix::sys::socket::recv(sock.as_raw_fd(), buf, nix::sys::socket::MsgFlags::empty()).map_err(
        |e| CutError::Io {
            what: "receive",
            source: e.into(),
        },
    )
}

/// The messages of one datagram: (type, seq, message after the header).
fn messages(data: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let h = data.get(at..at + 16)?;
        let len = usize::try_from(u32::from_ne_bytes(h[0..4].try_into().ok()?)).ok()?;
        let ty = u16::from_ne_bytes([h[4], h[5]]);
        let seq = u32::from_ne_bytes(h[8..12].try_into().ok()?);
        if len < 16 || at + len > data.len() {
            return None;
        }
        let m = &data[at + 16..at + len];
        at += align(len);
        Some((ty, seq, m))
    })
}

fn errno(m: &[u8]) -> i32 {
    m.get(0..4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i32::from_ne_bytes)
}

/// A TCP socket's local and remote (address, port).
type Ends = ((IpAddr, u16), (IpAddr, u16));

/// The local end (address, port) and the remote end of a TCP entry with
/// a local end: the socket to abort.
fn socket_of(e: &Entry, locals: &HashSet<IpAddr>) -> Option<Ends> {
    if e.l4proto != IPPROTO_TCP {
        return None;
    }
    if locals.contains(&e.src) {
        Some(((e.src, e.sport), (e.dst, e.dport)))
    } else if locals.contains(&e.dst) {
        Some(((e.dst, e.dport), (e.src, e.sport)))
    } else {
        None
    }
}

fn words(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Appends a NETLINK_SOCK_DIAG request about one TCP socket (`struct
/// inet_diag_req_v2`, linux/inet_diag.h): `local` <-> `remote`, any
/// interface, `cookie` (all ones: none).
fn diag_request(
    buf: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    (local, remote): Ends,
    cookie: [u8; 8],
    seq: u32,
) {
    let len: u32 = 16 + 56;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(if local.0.is_ipv4() { AF_INET } else { AF_INET6 });
    buf.push(IPPROTO_TCP);
    buf.extend_from_slice(&[0, 0]); // idiag_ext, pad
    buf.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    buf.extend_from_slice(&local.1.to_be_bytes());
    buf.extend_from_slice(&remote.1.to_be_bytes());
    buf.extend_from_slice(&words(local.0));
    buf.extend_from_slice(&words(remote.0));
    buf.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    buf.extend_from_slice(&cookie);
}

/// Appends the lookup of one TCP socket (SOCK_DIAG_BY_FAMILY, exact: the
/// kernel answers with its `inet_diag_msg` or ENOENT).
pub fn encode_lookup(buf: &mut Vec<u8>, ends: Ends, seq: u32) {
    diag_request(
        buf,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST,
        ends,
        [0xff; 8],
        seq,
    );
}

/// Appends the abort of the socket the lookup answered with `cookie`
/// (SOCK_DESTROY; the cookie pins that very socket).
pub fn encode_destroy(buf: &mut Vec<u8>, ends: Ends, cookie: [u8; 8], seq: u32) {
    diag_request(
        buf,
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        ends,
        cookie,
        seq,
    );
}

/// From a lookup's answer (`struct inet_diag_msg`): the cookie, if it is
/// the connection's own socket in a state that still sends. A lookup by
/// four-tuple falls back to the *listening* socket of the local port when
/// the connection's socket is gone: that one must never be aborted (nor a
/// TIME_WAIT or closed one, which sends nothing).
pub fn abortable(m: &[u8], remote_port: u16) -> Option<[u8; 8]> {
    const TCP_TIME_WAIT: u8 = 6;
    const TCP_CLOSE: u8 = 7;
    const TCP_LISTEN: u8 = 10;
    let state = *m.get(1)?;
    let dport = u16::from_be_bytes(m.get(6..8)?.try_into().ok()?);
    let cookie: [u8; 8] = m.get(44..52)?.try_into().ok()?;
    (!matches!(state, TCP_TIME_WAIT | TCP_CLOSE | TCP_LISTEN) && dport == remote_port)
        .then_some(cookie)
}

fn diag_socket() -> Result<Socket, CutError> {
    socket(netlink_sys::protocols::NETLINK_SOCK_DIAG)
}

/// One answer: message type and the message after its header.
type Answer = (u16, Vec<u8>);

/// Sends `out` and returns the one answer each of `n` requests (numbered
/// by seq from 0) gets: (type, message) by request.
fn exchange(
    sock: &Socket,
    buf: &mut [u8],
    out: &[u8],
    n: usize,
) -> Result<Vec<Option<Answer>>, CutError> {
    sock.send(out, 0).map_err(io("send"))?;
    let mut answers = vec![None; n];
    let mut pending = n;
    while pending > 0 {
        let got = recv(sock, buf)?;
        for (ty, s, m) in messages(&buf[..got.min(buf.len())]) {
            let Some(slot) = usize::try_from(s).ok().and_then(|i| answers.get_mut(i)) else {
                continue;
            };
            if slot.is_none() {
                *slot = Some((ty, m.to_vec()));
                pending -= 1;
            }
        }
    }
    Ok(answers)
}

/// Aborts the local TCP sockets of the doomed entries, before their
/// entries go: the abort's RST still leaves through the old entry, so the
/// peer drops the connection too. Without it a peer that the new policy
/// still lets open any port inbound resumes a cut outbound flow: its next
/// mid-stream packet is tracked as a NEW inbound flow (tcp_loose) that the
/// rules admit, and the node's packets become its replies. Each socket is
/// looked up first and aborted by its cookie only if it is the
/// connection's own (see [`abortable`]). A socket already gone, or a
/// kernel without CONFIG_INET_DIAG_DESTROY, leaves only the conntrack cut.
fn abort_sockets(doomed: &[Entry], locals: &HashSet<IpAddr>) -> Result<usize, CutError> {
    let ends: Vec<_> = doomed.iter().filter_map(|e| socket_of(e, locals)).collect();
    if ends.is_empty() {
        return Ok(0);
    }
    let sock = diag_socket()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut reset = 0;
    for chunk in ends.chunks(DELETE_BATCH) {
        let found = lookup_open(&sock, &mut buf, chunk)?;
        if found.is_empty() {
            continue;
        }
        let mut out = Vec::with_capacity(found.len() * 72);
        for (i, (e, cookie)) in found.iter().enumerate() {
            encode_destroy(&mut out, *e, *cookie, u32::try_from(i).unwrap_or(u32::MAX));
        }
        reset += exchange(&sock, &mut buf, &out, found.len())?
            .iter()
            .filter(|a| matches!(a, Some((NLMSG_ERROR, m)) if errno(m) == 0))
            .count();
    }
    Ok(reset)
}

/// Of the TCP sockets `ends` (at most [`DELETE_BATCH`]), those open and
/// still sending (see [`abortable`]), with their cookies.
fn lookup_open(
    sock: &Socket,
    buf: &mut [u8],
    ends: &[Ends],
) -> Result<Vec<(Ends, [u8; 8])>, CutError> {
    let mut out = Vec::with_capacity(ends.len() * 72);
    for (i, e) in ends.iter().enumerate() {
        encode_lookup(&mut out, *e, u32::try_from(i).unwrap_or(u32::MAX));
    }
    Ok(exchange(sock, buf, &out, ends.len())?
        .into_iter()
        .zip(ends)
        .filter_map(|(a, e)| match a {
            Some((SOCK_DIAG_BY_FAMILY, m)) => abortable(&m, e.1 .1).map(|c| (*e, c)),
            _ => None,
        })
        .collect())
}

/// Dumps the table and deletes every entry `admits` does not keep (see
/// [`keeps`]). In the caller's network namespace; needs CAP_NET_ADMIN.
pub fn cut(admits: impl Fn(&Flow) -> bool) -> Result<Cut, CutError> {
    cut_with(admits, |_: &Flow| false)
}

/// [`cut`] keeping also what [`keeps_with`] keeps for `reversed`.
pub fn cut_with(
    admits: impl Fn(&Flow) -> bool,
    reversed: impl Fn(&Flow) -> bool,
) -> Result<Cut, CutError> {
    let locals = local_addrs()?;
    let sock = open()?;
    let mut buf = vec![0u8; RECV_BUF];
    let (seen, entries) = dump(&sock, &mut buf)?;
    let doomed: Vec<Entry> = entries
        .into_iter()
        .filter(|e| !keeps_with(e, &locals, &admits, &reversed))
        .collect();
    let (cut, reset) = delete(&sock, &mut buf, &doomed, &locals)?;
    Ok(Cut {
        seen,
        cut,
        reset,
        from_mirror: false,
    })
}

/// Dumps the whole table: (messages seen, entries understood). The
/// kernel walks its whole conntrack hash for it (every namespace's
/// buckets: ≈3.6 ms for the default 262,144 buckets even when this
/// namespace tracks nothing), whatever the dump asks for.
fn dump(sock: &Socket, buf: &mut [u8]) -> Result<(usize, Vec<Entry>), CutError> {
    let seq = 1;
    sock.send(&encode_dump(seq), 0).map_err(io("send"))?;
    let mut seen = 0;
    let mut entries = Vec::new();
    loop {
        let n = recv(sock, buf)?;
        for (ty, s, m) in messages(&buf[..n.min(buf.len())]) {
            if s != seq {
                continue;
            }
            match ty {
                NLMSG_DONE => return Ok((seen, entries)),
                NLMSG_ERROR => {
                    let code = errno(m);
                    if code != 0 {
                        return Err(CutError::Refused {
                            what: "the dump".into(),
                            source: std::io::Error::from_raw_os_error(-code),
                            cut: 0,
                        });
                    }
                }
                _ => {
                    seen += 1;
                    entries.extend(parse_entry(m));
                }
            }
        }
    }
}

/// Aborts the local TCP sockets of `doomed`, then deletes their entries:
/// (entries deleted, sockets aborted).
fn delete(
    sock: &Socket,
    buf: &mut [u8],
    doomed: &[Entry],
    locals: &HashSet<IpAddr>,
) -> Result<(usize, usize), CutError> {
    let reset = abort_sockets(doomed, locals).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot abort the local sockets of cut connections");
        0
    });
    let mut cut = 0;
    let mut failed = 0;
    let mut first_error = None;
    let mut next_seq: u32 = 1;
    for chunk in doomed.chunks(DELETE_BATCH) {
        let mut out = Vec::with_capacity(chunk.len() * 128);
        let first = next_seq.wrapping_add(1);
        for (i, e) in chunk.iter().enumerate() {
            next_seq = next_seq.wrapping_add(1);
            encode_delete(&mut out, e, next_seq, i + 1 == chunk.len());
        }
        let last = next_seq;
        sock.send(&out, 0).map_err(io("send"))?;
        let mut unanswered = chunk.len();
        'batch: loop {
            let n = recv(sock, buf)?;
            for (ty, s, m) in messages(&buf[..n.min(buf.len())]) {
                let ours = usize::try_from(s.wrapping_sub(first)).is_ok_and(|i| i < chunk.len());
                if ty != NLMSG_ERROR || !ours {
                    continue;
                }
                match errno(m) {
                    0 => {}
                    // Gone meanwhile (timed out, closed): nothing to cut.
                    c if -c == nix::libc::ENOENT => unanswered -= 1,
                    c => {
                        unanswered -= 1;
                        failed += 1;
                        first_error.get_or_insert(c);
                    }
                }
                if s == last {
                    break 'batch;
                }
            }
        }
        // The last one's ack (code 0) and every silent success.
        cut += unanswered;
    }
    match first_error {
        None => Ok((cut, reset)),
        Some(c) => Err(CutError::Refused {
            what: format!("{failed} of {} deletions", doomed.len()),
            source: std::io::Error::from_raw_os_error(-c),
            cut,
        }),
    }
}

/// Conntrack multicast groups (enum nfnetlink_groups).
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
/// Receive buffer of the event socket (the kernel doubles it); when it
/// overflows the kernel drops events and the next cut dumps the table.
const EVENT_BUF: usize = 32 << 20;
/// How often the event queue is drained between cuts…
const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// …and while events keep coming.
const DRAIN_BURST: Duration = Duration::from_millis(2);

/// The addresses a cut scoped to peer range `lo..=hi` of `family` (a
/// parsed CIDR, see [`crate::model::parse_cidr`]) looks at: the range
/// itself and its IPv4-mapped IPv6 twin (an IPv4 range), or the IPv4
/// addresses an IPv6 range maps (its part in `::ffff:0:0/96`), so that a
/// flow is found whichever form its tuple carries.
pub fn scope_of(family: Family, lo: u128, hi: u128) -> Vec<(IpAddr, IpAddr)> {
    const MAPPED: u128 = 0xffff_0000_0000;
    let v4 = |a: u128| IpAddr::V4(Ipv4Addr::from(u32::try_from(a & 0xffff_ffff).unwrap_or(0)));
    let v6 = |a: u128| IpAddr::V6(Ipv6Addr::from(a));
    match family {
        Family::V4 => {
            let (lo, hi) = (lo.min(0xffff_ffff), hi.min(0xffff_ffff));
            vec![(v4(lo), v4(hi)), (v6(MAPPED | lo), v6(MAPPED | hi))]
        }
        Family::V6 => {
            let mut out = vec![(v6(lo), v6(hi))];
            let (mlo, mhi) = (lo.max(MAPPED), hi.min(MAPPED | 0xffff_ffff));
            if mlo <= mhi {
                out.push((v4(mlo), v4(mhi)));
            }
            out
        }
    }
}

/// The tracked entries of this namespace, by key and by address (each
/// end of the original tuple), for a cut that looks only at some peers.
#[derive(Debug, Default)]
pub struct Mirror {
    entries: HashMap<Vec<u8>, Entry>,
    by_addr: BTreeMap<IpAddr, HashSet<Vec<u8>>>,
}

impl Mirror {
    /// Adds `e` (again: no change).
    pub fn insert(&mut self, e: Entry) {
        for a in [e.src, e.dst] {
            self.by_addr.entry(a).or_default().insert(e.key.clone());
        }
        self.entries.insert(e.key.clone(), e);
    }

    /// Removes the entry with `key` (absent: no change).
    pub fn remove(&mut self, key: &[u8]) {
        let Some(e) = self.entries.remove(key) else {
            return;
        };
        for a in [e.src, e.dst] {
            if let Some(keys) = self.by_addr.get_mut(&a) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_addr.remove(&a);
                }
            }
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Each entry with an end of its original tuple in one of `ranges`
    /// (inclusive), once.
    pub fn within(&self, ranges: &[(IpAddr, IpAddr)]) -> Vec<&Entry> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (lo, hi) in ranges {
            if lo > hi {
                continue;
            }
            for keys in self.by_addr.range(*lo..=*hi).map(|(_, k)| k) {
                for k in keys {
                    if let Some(e) = self.entries.get(k).filter(|_| seen.insert(k)) {
                        out.push(e);
                    }
                }
            }
        }
        out
    }

    /// Applies one conntrack event (message type, message after the
    /// header): a new entry is added, a destroyed one removed.
    pub fn apply(&mut self, ty: u16, m: &[u8]) {
        if ty >> 8 != NFNL_SUBSYS_CTNETLINK {
            return;
        }
        let Some(e) = parse_entry(m) else {
            return;
        };
        match ty & 0xff {
            IPCTNL_MSG_CT_NEW => self.insert(e),
            IPCTNL_MSG_CT_DELETE => self.remove(&e.key),
            _ => {}
        }
    }
}

impl FromIterator<Entry> for Mirror {
    fn from_iter<I: IntoIterator<Item = Entry>>(it: I) -> Self {
        let mut m = Mirror::default();
        for e in it {
            m.insert(e);
        }
        m
    }
}

#[derive(Debug)]
struct Tracked {
    mirror: Mirror,
    /// The mirror holds every entry of the table: set by a full dump,
    /// cleared when events were lost (ENOBUFS) or a cut failed.
    synced: bool,
    /// Event receive buffer.
    buf: Vec<u8>,
    /// The ctnetlink socket of dumps and deletions, kept open: closing a
    /// netfilter netlink socket waits for the kernel's nftables clean-up
    /// (an RCU grace period: ≈1 ms idle, more under load). Dropped after
    /// an error, so no stale answer meets the next request.
    ctl: Option<(Socket, Vec<u8>)>,
}

/// Keeps a [`Mirror`] of the namespace's conntrack table current from the
/// kernel's events (new and destroyed entries), so that removing a few
/// peers cuts their flows without the dump: a dump walks the kernel's
/// whole conntrack hash (every namespace's buckets), ≈4 ms even for an
/// empty table, far more under load.
///
/// Why the mirror holds every flow a scoped cut must find: the event
/// socket subscribes before the first full dump, which replaces the
/// mirror (events queued during the dump are applied after it, in order:
/// a destroy after the dump removes what the dump returned); the kernel
/// reports each entry when it is confirmed; a cut first drains every event
/// queued until then, under the same lock the drain takes. When it cannot
/// be sure (events lost: ENOBUFS; conntrack events off in this namespace:
/// `nf_conntrack_events` 0; a failed cut; no full dump yet) the cut dumps
/// the whole table instead, and that re-syncs the mirror. Not covered: a
/// ruleset elsewhere that masks the events of some flows (`ct event set`,
/// the CT target's `--ctevents`), which needs CAP_NET_ADMIN in the
/// namespace — enough to insert any conntrack entry after a cut anyway.
#[derive(Debug)]
pub struct Tracker {
    events: Socket,
    state: Mutex<Tracked>,
}

impl Tracker {
    /// Subscribes to the conntrack events of the caller's network
    /// namespace and drains them every [`DRAIN_EVERY`] on a thread of its
    /// own (which ends with the last `Arc`). Not synced until the first
    /// full cut. Needs CAP_NET_ADMIN.
    pub fn start() -> Result<Arc<Tracker>, CutError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(io("socket"))?;
        sock.bind_auto().map_err(io("bind"))?;
        let forced =
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &EVENT_BUF);
        if forced.is_err() {
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBuf, &EVENT_BUF)
                .map_err(|e| CutError::Io {
                    what: "event buffer",
                    source: e.into(),
                })?;
        }
        for g in [NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY] {
            sock.add_membership(g).map_err(io("subscribe"))?;
        }
        sock.set_non_blocking(true).map_err(io("non-blocking"))?;
        let t = Arc::new(Tracker {
            events: sock,
            state: Mutex::new(Tracked {
                mirror: Mirror::default(),
                synced: false,
                buf: vec![0u8; 64 * 1024],
                ctl: None,
            }),
        });
        let weak = Arc::downgrade(&t);
        std::thread::Builder::new()
            .name("conntrack-events".into())
            .spawn(move || {
                let mut pause = DRAIN_EVERY;
                loop {
                    std::thread::sleep(pause);
                    let Some(t) = weak.upgrade() else { return };
                    let mut st = t.lock();
                    // A burst of new connections: drain again soon.
                    pause = if t.drain(&mut st) > 0 {
                        DRAIN_BURST
                    } else {
                        DRAIN_EVERY
                    };
                }
            })
            .map_err(io("drain thread"))?;
        Ok(t)
    }

    fn lock(&self) -> MutexGuard<'_, Tracked> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies every queued event. Only called with the lock held, so an
    /// event is either still queued or in the mirror.
    fn drain(&self, st: &mut Tracked) -> usize {
        let mut read = 0;
        loop {
            match nix::sys::socket::recv(
                self.events.as_raw_fd(),
                &mut st.buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => return read,
                Ok(n) => {
                    read += 1;
                    let n = n.min(st.buf.len());
                    let Tracked { mirror, buf, .. } = st;
                    for (ty, _, m) in messages(&buf[..n]) {
                        mirror.apply(ty, m);
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return read,
                Err(nix::errno::Errno::EINTR) => {}
                // Events were dropped: read on, but dump at the next cut.
                Err(nix::errno::Errno::ENOBUFS) => st.synced = false,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read conntrack events");
                    st.synced = false;
                    return read;
                }
            }
        }
    }

    /// The peers with an address in `ranges` of the open TCP connections
    /// to local port `port` (either orientation: a session picked up from
    /// the node's side is oriented from it), from the mirror, each socket
    /// checked open with a lookup; None when the mirror is not synced (see
    /// [`Tracker::cut`]). Costs in the flows of `ranges`, not in the
    /// node's connections (a read of /proc/net/tcp walks the kernel's whole
    /// TCP hash: ≈3 ms).
    pub fn open_at_port(
        &self,
        port: u16,
        ranges: &[(IpAddr, IpAddr)],
    ) -> Result<Option<Vec<IpAddr>>, CutError> {
        let mut st = self.lock();
        self.drain(&mut st);
        if !st.synced || !events_on() {
            return Ok(None);
        }
        let locals = local_addrs()?;
        let ends: Vec<Ends> = st
            .mirror
            .within(ranges)
            .into_iter()
            .filter_map(|e| socket_of(e, &locals))
            .filter(|(local, remote)| local.1 == port && !remote.0.is_loopback())
            .collect();
        drop(st);
        let mut peers = Vec::new();
        if !ends.is_empty() {
            let sock = diag_socket()?;
            let mut buf = vec![0u8; 64 * 1024];
            for chunk in ends.chunks(DELETE_BATCH) {
                peers.extend(
                    lookup_open(&sock, &mut buf, chunk)?
                        .into_iter()
                        .map(|((_, remote), _)| remote.0),
                );
            }
        }
        peers.sort_unstable();
        peers.dedup();
        Ok(Some(peers))
    }

    /// Entries in the mirror.
    pub fn tracked(&self) -> usize {
        self.lock().mirror.len()
    }

    /// Like [`cut_with`]. `scope`: only entries with an end in one of
    /// these ranges (see [`scope_of`]) can have lost admission — a removal
    /// of those peers — so only those are decided, from the mirror, when
    /// it is synced; otherwise (and with `None`) the whole table is dumped
    /// and decided, which re-syncs the mirror.
    pub fn cut(
        &self,
        scope: Option<&[(IpAddr, IpAddr)]>,
        admits: impl Fn(&Flow) -> bool,
        reversed: impl Fn(&Flow) -> bool,
    ) -> Result<Cut, CutError> {
        let mut st = self.lock();
        self.drain(&mut st);
        let done = Self::cut_locked(&mut st, scope, admits, reversed);
        if done.is_err() {
            // Some flows may be left: the next cut looks at all of them.
            st.synced = false;
            st.ctl = None;
        }
        done
    }

    /// The kept ctnetlink socket and its receive buffer, opened if needed.
    fn ctl(ctl: &mut Option<(Socket, Vec<u8>)>) -> Result<(&Socket, &mut [u8]), CutError> {
        if ctl.is_none() {
            *ctl = Some((open()?, vec![0u8; RECV_BUF]));
        }
        let (sock, buf) = ctl.as_mut().ok_or_else(|| CutError::Io {
            what: "socket",
            source: std::io::Error::other("not open"),
        })?;
        Ok((sock, buf))
    }

    fn cut_locked(
        st: &mut Tracked,
        scope: Option<&[(IpAddr, IpAddr)]>,
        admits: impl Fn(&Flow) -> bool,
        reversed: impl Fn(&Flow) -> bool,
    ) -> Result<Cut, CutError> {
        let locals = local_addrs()?;
        let scoped = scope.filter(|_| st.synced && events_on());
        let (seen, doomed) = match scoped {
            Some(ranges) => {
                let found = st.mirror.within(ranges);
                let doomed: Vec<Entry> = found
                    .iter()
                    .filter(|e| !keeps_with(e, &locals, &admits, &reversed))
                    .map(|e| (*e).clone())
                    .collect();
                if doomed.is_empty() {
                    return Ok(Cut {
                        seen: found.len(),
                        from_mirror: true,
                        ..Cut::default()
                    });
                }
                (found.len(), doomed)
            }
            None => {
                let (sock, buf) = Self::ctl(&mut st.ctl)?;
                let (seen, entries) = dump(sock, buf)?;
                let doomed = entries
                    .iter()
                    .filter(|e| !keeps_with(e, &locals, &admits, &reversed))
                    .cloned()
                    .collect();
                // Events queued during the dump stay queued: the next
                // drain applies them on top.
                st.mirror = entries.into_iter().collect();
                st.synced = true;
                (seen, doomed)
            }
        };
        let done = match Self::ctl(&mut st.ctl) {
            Ok((sock, buf)) => delete(sock, buf, &doomed, &locals),
            Err(e) => Err(e),
        };
        for e in &doomed {
            st.mirror.remove(&e.key);
        }
        let (cut, reset) = done?;
        Ok(Cut {
            seen,
            cut,
            reset,
            from_mirror: scoped.is_some(),
        })
    }
}

/// Whether this namespace reports conntrack events (`nf_conntrack_events`
/// 1, or 2: while someone listens, as the [`Tracker`] does).
fn events_on() -> bool {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_events")
        .is_ok_and(|v| matches!(v.trim(), "1" | "2"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dumped IPv4 TCP entry 10.0.0.1:50000 -> 10.0.0.2:22 in zone 5,
    /// written out by hand from nfnetlink_conntrack.h (little-endian host;
    /// attribute types of nests carry NLA_F_NESTED as the kernel sends).
    const ORIG: [u8; 52] = [
        52, 0, 0x01, 0x80, // CTA_TUPLE_ORIG, nested
        20, 0, 0x01, 0x80, // CTA_TUPLE_IP, nested
        8, 0, 1, 0, 10, 0, 0, 1, // CTA_IP_V4_SRC
        8, 0, 2, 0, 10, 0, 0, 2, // CTA_IP_V4_DST
        28, 0, 0x02, 0x80, // CTA_TUPLE_PROTO, nested
        5, 0, 1, 0, 6, 0, 0, 0, // CTA_PROTO_NUM tcp, padded
        6, 0, 2, 0, 0xc3, 0x50, 0, 0, // CTA_PROTO_SRC_PORT 50000
        6, 0, 3, 0, 0, 22, 0, 0, // CTA_PROTO_DST_PORT 22
    ];

    fn dumped() -> Vec<u8> {
        let mut m = vec![AF_INET, 0, 0, 0];
        m.extend_from_slice(&ORIG);
        // CTA_TUPLE_REPLY (ignored), CTA_STATUS, CTA_ID, CTA_ZONE.
        m.extend_from_slice(&[12, 0, 0x02, 0x80, 8, 0, 0x01, 0x80, 4, 0, 1, 0]);
        m.extend_from_slice(&[8, 0, 3, 0, 0, 0, 0x01, 0x8e]);
        m.extend_from_slice(&[8, 0, 12, 0, 0x11, 0x22, 0x33, 0x44]);
        m.extend_from_slice(&[6, 0, 18, 0, 0, 5, 0, 0]);
        m
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn dump_request_bytes() {
        assert_eq!(
            encode_dump(7),
            [
                20, 0, 0, 0, // length
                0x01, 0x01, // IPCTNL_MSG_CT_GET of subsystem 1
                0x01, 0x03, // NLM_F_REQUEST | NLM_F_DUMP
                7, 0, 0, 0, 0, 0, 0, 0, // seq, pid
                0, 0, 0, 0, // AF_UNSPEC, version 0, res_id 0
            ]
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_an_entry_and_deletes_it_by_tuple_zone_and_id() {
        let e = parse_entry(&dumped()).unwrap();
        assert_eq!(e.family, AF_INET);
        assert_eq!(e.src, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(e.dst, IpAddr::from([10, 0, 0, 2]));
        assert_eq!((e.l4proto, e.sport, e.dport), (6, 50000, 22));
        let mut buf = Vec::new();
        encode_delete(&mut buf, &e, 9, true);
        let mut silent = Vec::new();
        encode_delete(&mut silent, &e, 9, false);
        assert_eq!(silent[6..8], [0x01, 0x00]); // NLM_F_REQUEST only
        assert_eq!(silent[..6], buf[..6]);
        assert_eq!(silent[8..], buf[8..]);
        let mut want = vec![
            20 + 52 + 8 + 8,
            0,
            0,
            0,
            0x02,
            0x01, // IPCTNL_MSG_CT_DELETE
            0x05,
            0x00, // NLM_F_REQUEST | NLM_F_ACK
            9,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            AF_INET,
            0,
            0,
            0,
        ];
        want.extend_from_slice(&ORIG);
        // Tuple, zone, id: one order whatever the message's.
        want.extend_from_slice(&[6, 0, 18, 0, 0, 5, 0, 0]);
        want.extend_from_slice(&[8, 0, 12, 0, 0x11, 0x22, 0x33, 0x44]);
        assert_eq!(buf, want);
    }

    /// `dumped()` with the zone before the id and other attributes
    /// between, as an event carries them.
    fn as_event() -> Vec<u8> {
        let mut m = vec![AF_INET, 0, 0, 0];
        m.extend_from_slice(&ORIG);
        m.extend_from_slice(&[6, 0, 18, 0, 0, 5, 0, 0]);
        m.extend_from_slice(&[8, 0, 3, 0, 0, 0, 0x01, 0x8e]);
        m.extend_from_slice(&[8, 0, 12, 0, 0x11, 0x22, 0x33, 0x44]);
        m
    }

    #[test]
    fn an_entry_has_one_key_in_a_dump_and_in_an_event() {
        let (d, e) = (
            parse_entry(&dumped()).unwrap(),
            parse_entry(&as_event()).unwrap(),
        );
        assert_eq!(d, e);
        // Another id is another entry (same tuple, a newer connection).
        let mut other = as_event();
        let n = other.len();
        other[n - 1] = 0x45;
        assert_ne!(parse_entry(&other).unwrap().key, d.key);
    }

    fn keyed(src: &str, dst: &str, id: u8) -> Entry {
        let mut e = entry(src, dst, 6, 22);
        e.key = vec![id];
        e
    }

    fn addr_range(lo: &str, hi: &str) -> (IpAddr, IpAddr) {
        (lo.parse().unwrap(), hi.parse().unwrap())
    }

    #[test]
    fn the_mirror_finds_entries_by_either_end_once() {
        let mut m: Mirror = [
            keyed("10.0.0.1", "10.0.0.2", 1),
            keyed("10.0.0.3", "10.0.0.1", 2),
            keyed("10.0.0.2", "10.0.0.4", 3),
            keyed("fd00::2", "fd00::1", 4),
            keyed("10.0.0.2", "10.0.0.2", 5),
        ]
        .into_iter()
        .collect();
        assert_eq!(m.len(), 5);
        let ids = |m: &Mirror, r: &[(IpAddr, IpAddr)]| {
            let mut v: Vec<u8> = m.within(r).iter().map(|e| e.key[0]).collect();
            v.sort_unstable();
            v
        };
        let two = addr_range("10.0.0.2", "10.0.0.2");
        assert_eq!(ids(&m, &[two]), [1, 3, 5]);
        // Overlapping ranges: each entry once.
        assert_eq!(
            ids(&m, &[addr_range("10.0.0.0", "10.0.0.3"), two]),
            [1, 2, 3, 5]
        );
        // IPv4 and IPv6 ranges do not mix; an inverted range finds nothing.
        assert_eq!(ids(&m, &[addr_range("fd00::", "fd00::ffff")]), [4]);
        assert_eq!(
            ids(&m, &[addr_range("0.0.0.0", "255.255.255.255")]),
            [1, 2, 3, 5]
        );
        assert!(ids(&m, &[addr_range("10.0.0.9", "10.0.0.1")]).is_empty());
        // Again: no duplicate; removal from both ends; absent: no change.
        m.insert(keyed("10.0.0.1", "10.0.0.2", 1));
        m.remove(&[3]);
        m.remove(&[9]);
        assert_eq!(ids(&m, &[two]), [1, 5]);
        assert_eq!(
            ids(&m, &[addr_range("10.0.0.4", "10.0.0.4")]),
            Vec::<u8>::new()
        );
        assert_eq!(m.len(), 4);
        for k in 1..=5 {
            m.remove(&[k]);
        }
        assert!(m.is_empty() && m.by_addr.is_empty());
    }

    #[test]
    fn events_add_and_remove_mirrored_entries() {
        let new = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW;
        let destroy = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE;
        let mut m = Mirror::default();
        m.apply(new, &as_event());
        let found = m.within(&[addr_range("10.0.0.2", "10.0.0.2")]);
        assert_eq!(found, [&parse_entry(&dumped()).unwrap()]);
        // An expectation event (another subsystem) or garbage: ignored.
        m.apply((2 << 8) | IPCTNL_MSG_CT_DELETE, &as_event());
        m.apply(destroy, &as_event()[..30]);
        assert_eq!(m.len(), 1);
        // The destroy event of the entry a dump returned removes it.
        m.apply(destroy, &as_event());
        assert!(m.is_empty());
    }

    #[test]
    fn a_removed_range_is_looked_up_in_both_address_forms() {
        let v4 = |s: &str| {
            let (f, lo, hi) = crate::model::parse_cidr(s).unwrap();
            scope_of(f, lo, hi)
        };
        assert_eq!(
            v4("10.0.0.1"),
            [
                addr_range("10.0.0.1", "10.0.0.1"),
                addr_range("::ffff:10.0.0.1", "::ffff:10.0.0.1")
            ]
        );
        assert_eq!(
            v4("10.0.0.0/24"),
            [
                addr_range("10.0.0.0", "10.0.0.255"),
                addr_range("::ffff:10.0.0.0", "::ffff:10.0.0.255")
            ]
        );
        assert_eq!(
            v4("fd00::/64"),
            [addr_range("fd00::", "fd00::ffff:ffff:ffff:ffff")]
        );
        assert_eq!(
            v4("::ffff:10.0.0.0/120"),
            [
                addr_range("::ffff:10.0.0.0", "::ffff:10.0.0.255"),
                addr_range("10.0.0.0", "10.0.0.255")
            ]
        );
        assert_eq!(
            v4("::/0"),
            [
                addr_range("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
                addr_range("0.0.0.0", "255.255.255.255")
            ]
        );
        assert_eq!(v4("::1"), [addr_range("::1", "::1")]);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn socket_abort_request_bytes() {
        let ends = (
            (IpAddr::from([10, 0, 0, 1]), 22),
            (IpAddr::from([10, 0, 0, 2]), 50000),
        );
        let mut buf = Vec::new();
        encode_destroy(&mut buf, ends, [1, 2, 3, 4, 5, 6, 7, 8], 3);
        let mut want = vec![
            72, 0, 0, 0, // length: header and struct inet_diag_req_v2
            21, 0, // SOCK_DESTROY
            5, 0, // NLM_F_REQUEST | NLM_F_ACK
            3, 0, 0, 0, 0, 0, 0, 0, // seq, pid
            AF_INET, 6, 0, 0, // family, IPPROTO_TCP, ext, pad
            0xff, 0xff, 0xff, 0xff, // every state
            0, 22, 0xc3, 0x50, // local port 22, remote port 50000 (big-endian)
        ];
        want.extend_from_slice(&[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 0]); // any interface
        want.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]); // the lookup's cookie
        assert_eq!(buf, want);
        // The lookup: SOCK_DIAG_BY_FAMILY, no ack, no cookie.
        let mut lookup = Vec::new();
        encode_lookup(&mut lookup, ends, 3);
        assert_eq!(lookup[4..8], [20, 0, 1, 0]);
        assert_eq!(lookup[8..64], want[8..64]);
        assert_eq!(lookup[64..], [0xff; 8]);
        // Its answer (struct inet_diag_msg): only the connection's own
        // socket, in a state that sends, is aborted; never the listener
        // a four-tuple lookup falls back to.
        let answer = |state: u8, dport: u16| {
            let mut m = vec![AF_INET, state, 0, 0, 0, 22];
            m.extend_from_slice(&dport.to_be_bytes());
            m.extend_from_slice(&[0; 36]);
            m.extend_from_slice(&[9; 8]);
            m.extend_from_slice(&[0; 20]);
            m
        };
        assert_eq!(abortable(&answer(1, 50000), 50000), Some([9; 8]));
        assert_eq!(abortable(&answer(10, 0), 50000), None); // LISTEN
        assert_eq!(abortable(&answer(1, 50001), 50000), None);
        assert_eq!(abortable(&answer(6, 50000), 50000), None); // TIME_WAIT
        assert_eq!(abortable(&answer(1, 50000)[..40], 50000), None);
        // Which end is the node's: outbound from the source, inbound to
        // the destination; TCP only.
        let locals: HashSet<IpAddr> = [IpAddr::from([10, 0, 0, 1])].into();
        let out = entry("10.0.0.1", "10.0.0.2", 6, 7000);
        assert_eq!(
            socket_of(&out, &locals),
            Some(((out.src, 40000), (out.dst, 7000)))
        );
        let inb = entry("10.0.0.2", "10.0.0.1", 6, 22);
        assert_eq!(
            socket_of(&inb, &locals),
            Some(((inb.dst, 22), (inb.src, 40000)))
        );
        assert_eq!(
            socket_of(&entry("10.0.0.2", "10.0.0.1", 17, 53), &locals),
            None
        );
        assert_eq!(
            socket_of(&entry("10.0.0.2", "10.0.0.3", 6, 22), &locals),
            None
        );
    }

    #[test]
    fn an_entry_without_an_original_tuple_is_never_deleted() {
        // A delete without CTA_TUPLE_ORIG would flush the whole table.
        let mut m = vec![AF_INET, 0, 0, 0];
        m.extend_from_slice(&[8, 0, 12, 0, 0x11, 0x22, 0x33, 0x44]);
        assert_eq!(parse_entry(&m), None);
        // Truncated and garbage input.
        let d = dumped();
        for n in 0..d.len() {
            let _ = parse_entry(&d[..n]);
        }
        assert_eq!(parse_entry(&d[..30]), None);
    }

    #[test]
    fn icmpv6_and_other_protocols_have_no_port() {
        let mut m = vec![AF_INET6, 0, 0, 0];
        let mut ip = Vec::new();
        for (ty, a) in [(CTA_IP_V6_SRC, [0xfd, 0, 1]), (CTA_IP_V6_DST, [0xfd, 0, 2])] {
            ip.extend_from_slice(&[20, 0, u8::try_from(ty).unwrap(), 0]);
            let mut b = [0u8; 16];
            b[0] = a[0];
            b[15] = a[2];
            ip.extend_from_slice(&b);
        }
        let proto = [5, 0, 1, 0, 58, 0, 0, 0, 6, 0, 7, 0, 0, 9, 0, 0];
        let orig_len = 4 + 4 + ip.len() + 4 + proto.len();
        m.extend_from_slice(&[u8::try_from(orig_len).unwrap(), 0, 1, 0x80]);
        m.extend_from_slice(&[u8::try_from(4 + ip.len()).unwrap(), 0, 1, 0x80]);
        m.extend_from_slice(&ip);
        m.extend_from_slice(&[u8::try_from(4 + proto.len()).unwrap(), 0, 2, 0x80]);
        m.extend_from_slice(&proto);
        let e = parse_entry(&m).unwrap();
        assert_eq!(e.dst, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!((e.l4proto, e.dport), (58, 0));
        assert_eq!(proto_of(58), Proto::Icmp);
        assert_eq!(proto_of(1), Proto::Icmp);
        assert_eq!(proto_of(47), Proto::Other);
        assert_eq!(proto_of(132), Proto::Other);
    }

    fn entry(src: &str, dst: &str, l4proto: u8, dport: u16) -> Entry {
        let src: IpAddr = src.parse().unwrap();
        Entry {
            family: if src.is_ipv4() { AF_INET } else { AF_INET6 },
            src,
            dst: dst.parse().unwrap(),
            l4proto,
            sport: 40000,
            dport,
            key: Vec::new(),
        }
    }

    /// A flow is kept for its reversed orientation (a session picked up
    /// from the node's side) only if it is TCP, as the ruleset's reverse
    /// rules are.
    #[test]
    fn only_tcp_is_kept_for_its_reversed_orientation() {
        let locals: HashSet<IpAddr> = ["10.0.0.1"].iter().map(|a| a.parse().unwrap()).collect();
        let none = |_: &Flow| false;
        let failsafe = |f: &Flow| f.direction == Direction::In && f.port == 40000;
        // Oriented node -> peer, from the node's port 40000 (sport).
        let mut tcp = entry("10.0.0.1", "10.0.0.2", 6, 55555);
        tcp.sport = 40000;
        assert!(keeps_with(&tcp, &locals, &none, &failsafe));
        let mut udp = entry("10.0.0.1", "10.0.0.2", 17, 55555);
        udp.sport = 40000;
        assert!(!keeps_with(&udp, &locals, &none, &failsafe));
    }

    /// ICMP numbers of the other family are admitted by no rule: not kept,
    /// whatever the policy admits (review).
    #[test]
    fn icmp_of_the_other_family_is_never_kept() {
        let locals: HashSet<IpAddr> = ["10.0.0.1", "fd00::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let all = |_: &Flow| true;
        assert!(keeps(&entry("10.0.0.2", "10.0.0.1", 1, 0), &locals, &all));
        assert!(keeps(&entry("fd00::2", "fd00::1", 58, 0), &locals, &all));
        assert!(!keeps(&entry("10.0.0.2", "10.0.0.1", 58, 0), &locals, &all));
        assert!(!keeps(&entry("fd00::2", "fd00::1", 1, 0), &locals, &all));
        assert!(!keeps_with(
            &entry("10.0.0.1", "10.0.0.2", 58, 0),
            &locals,
            &all,
            &all
        ));
        // Loopback passes whatever it carries, as in the ruleset.
        assert!(keeps(
            &entry("127.0.0.1", "127.0.0.1", 58, 0),
            &locals,
            &all
        ));
    }

    #[test]
    fn direction_comes_from_the_local_end() {
        let locals: HashSet<IpAddr> = ["10.0.0.1", "fd00::1", "10.0.0.255"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let asked = std::cell::RefCell::new(Vec::new());
        let admits = |f: &Flow| {
            asked.borrow_mut().push(*f);
            f.peer == "10.0.0.2".parse::<IpAddr>().unwrap()
        };
        let flow = |direction, peer: &str, proto, port| Flow {
            direction,
            peer: peer.parse().unwrap(),
            proto,
            port,
        };
        let run = |e: Entry| {
            asked.borrow_mut().clear();
            let k = keeps(&e, &locals, &admits);
            (k, asked.borrow().clone())
        };
        // Outbound: peer and port from the destination.
        assert_eq!(
            run(entry("10.0.0.1", "10.0.0.3", 6, 443)),
            (
                false,
                vec![flow(Direction::Out, "10.0.0.3", Proto::Tcp, 443)]
            )
        );
        // Inbound: peer is the source, port the local destination port.
        assert_eq!(
            run(entry("10.0.0.2", "10.0.0.1", 6, 22)),
            (true, vec![flow(Direction::In, "10.0.0.2", Proto::Tcp, 22)])
        );
        assert_eq!(
            run(entry("fd00::9", "fd00::1", 58, 0)),
            (false, vec![flow(Direction::In, "fd00::9", Proto::Icmp, 0)])
        );
        // Ports only for protocols that have them in the model.
        assert_eq!(
            run(entry("10.0.0.1", "10.0.0.2", 132, 9)).1,
            vec![flow(Direction::Out, "10.0.0.2", Proto::Other, 0)]
        );
        // Broadcast and multicast destinations are inbound.
        assert_eq!(
            run(entry("10.0.0.2", "10.0.0.255", 17, 67)),
            (true, vec![flow(Direction::In, "10.0.0.2", Proto::Udp, 67)])
        );
        assert_eq!(
            run(entry("10.0.0.7", "224.0.0.251", 17, 5353)).1,
            vec![flow(Direction::In, "10.0.0.7", Proto::Udp, 5353)]
        );
        // Loopback and local-to-local: kept without asking.
        assert_eq!(run(entry("127.0.0.1", "127.0.0.1", 6, 1)), (true, vec![]));
        assert_eq!(run(entry("::1", "::1", 17, 1)), (true, vec![]));
        assert_eq!(run(entry("10.0.0.1", "10.0.0.1", 6, 1)), (true, vec![]));
        // Forwarded: inbound from the source and outbound to the destination.
        assert_eq!(
            run(entry("10.0.0.2", "10.9.9.9", 17, 53)),
            (
                false,
                vec![
                    flow(Direction::In, "10.0.0.2", Proto::Udp, 53),
                    flow(Direction::Out, "10.9.9.9", Proto::Udp, 53)
                ]
            )
        );
    }
}
