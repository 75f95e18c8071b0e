//! Decoding rtnetlink messages (include/uapi/linux/rtnetlink.h,
//! if_link.h, if_addr.h): only the fields the report shows. Hand-decoded
//! like the nftables and conntrack messages in `netpolicy`: three fixed
//! headers and a dozen attributes do not need a netlink framework.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(crate) const RTM_NEWLINK: u16 = 16;
pub(crate) const RTM_DELLINK: u16 = 17;
pub(crate) const RTM_GETLINK: u16 = 18;
pub(crate) const RTM_NEWADDR: u16 = 20;
pub(crate) const RTM_DELADDR: u16 = 21;
pub(crate) const RTM_GETADDR: u16 = 22;
pub(crate) const RTM_NEWROUTE: u16 = 24;
pub(crate) const RTM_DELROUTE: u16 = 25;
pub(crate) const RTM_GETROUTE: u16 = 26;
pub(crate) const AF_INET: u8 = 2;
pub(crate) const AF_INET6: u8 = 10;
const AF_BRIDGE: u8 = 7;
const IFF_UP: u32 = 0x1;
const IFF_LOWER_UP: u32 = 0x1_0000;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_OPERSTATE: u16 = 16;
const IFLA_CARRIER_UP_COUNT: u16 = 47;
const IFLA_CARRIER_DOWN_COUNT: u16 = 48;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_CACHEINFO: u16 = 6;
const IFA_FLAGS: u16 = 8;
const IFA_F_PERMANENT: u32 = 0x80;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_TABLE: u16 = 15;
const RTN_UNICAST: u8 = 1;
/// Longest interface name the kernel allows (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// A link as RTM_NEWLINK describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkMsg {
    pub index: u32,
    pub name: String,
    pub admin_up: bool,
    /// IFF_LOWER_UP: the driver has a carrier.
    pub lower_up: bool,
    pub operstate: &'static str,
    pub mtu: Option<u32>,
    pub mac: Option<String>,
    /// Carrier gains and losses since the link was created (Linux ≥ 4.16):
    /// the kernel reports carrier changes through linkwatch, batched up to
    /// a second, so a loss and a gain inside one batch leave the flags as
    /// they were and only these counters tell.
    pub carrier_ups: Option<u32>,
    pub carrier_downs: Option<u32>,
}

/// An address as RTM_NEWADDR/RTM_DELADDR describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrMsg {
    pub index: u32,
    pub address: IpAddr,
    pub prefix_len: u8,
    pub scope: &'static str,
    /// Not IFA_F_PERMANENT: from DHCP, SLAAC or with a lifetime.
    pub dynamic: bool,
    /// Seconds left; None: forever.
    pub valid_lft: Option<u32>,
    pub preferred_lft: Option<u32>,
}

/// A route as RTM_NEWROUTE/RTM_DELROUTE describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMsg {
    pub family: u8,
    pub dst_len: u8,
    pub kind: u8,
    pub table: u32,
    pub protocol: &'static str,
    pub metric: u32,
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
}

impl RouteMsg {
    /// A unicast route to everywhere (0.0.0.0/0, ::/0).
    pub fn is_default(&self) -> bool {
        self.dst_len == 0 && self.kind == RTN_UNICAST
    }
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    NewLink(LinkMsg),
    DelLink(u32),
    NewAddr(AddrMsg),
    DelAddr(AddrMsg),
    NewRoute(RouteMsg),
    DelRoute(RouteMsg),
    /// Anything else, or a message too short or malformed to use.
    Other,
}

/// One framed message: (type, flags, seq, body).
pub(crate) struct Frame<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub body: &'a [u8],
}

/// The messages of one datagram; a cut or malformed tail is left out.
pub(crate) fn frames(mut b: &[u8]) -> Vec<Frame<'_>> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            break;
        }
        out.push(Frame {
            ty: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
            body: &b[NLMSG_HDRLEN..len],
        });
        let step = (len + 3) & !3;
        if step >= b.len() {
            break;
        }
        b = &b[step..];
    }
    out
}

/// The attributes of a message body after its fixed header: (type, payload).
fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        let step = (len + 3) & !3;
        if step >= b.len() {
            break;
        }
        b = &b[step..];
    }
    out
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn ip_of(family: u8, v: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(v.get(..4)?).ok()?,
        ))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(v.get(..16)?).ok()?,
        ))),
        _ => None,
    }
}

fn operstate(v: u8) -> &'static str {
    // IF_OPER_* (RFC 2863), as /sys/class/net/*/operstate names them.
    match v {
        1 => "notpresent",
        2 => "down",
        3 => "lowerlayerdown",
        4 => "testing",
        5 => "dormant",
        6 => "up",
        _ => "unknown",
    }
}

fn scope(v: u8) -> &'static str {
    match v {
        0 => "global",
        200 => "site",
        253 => "link",
        254 => "host",
        _ => "other",
    }
}

fn protocol(v: u8) -> &'static str {
    // RTPROT_*: who installed the route.
    match v {
        2 => "kernel",
        3 => "boot",
        4 => "static",
        9 => "ra",
        16 => "dhcp",
        _ => "other",
    }
}

/// Decodes one message of type `ty`.
pub(crate) fn decode(ty: u16, body: &[u8]) -> Msg {
    decode_opt(ty, body).unwrap_or(Msg::Other)
}

fn decode_opt(ty: u16, body: &[u8]) -> Option<Msg> {
    match ty {
        RTM_NEWLINK | RTM_DELLINK => {
            let h = body.get(..16)?;
            // Bridge port messages describe a port's bridge state, not
            // the link (a DELLINK there is a port leaving its bridge).
            if h[0] == AF_BRIDGE {
                return Some(Msg::Other);
            }
            let index = u32::from_ne_bytes(h[4..8].try_into().ok()?);
            if ty == RTM_DELLINK {
                return Some(Msg::DelLink(index));
            }
            let flags = u32::from_ne_bytes(h[8..12].try_into().ok()?);
            let attrs = attributes(&body[16..]);
            let get = |t: u16| attrs.iter().find(|(a, _)| *a == t).map(|(_, v)| *v);
            let name = get(IFLA_IFNAME)?;
            let name = name.split(|c| *c == 0).next().unwrap_or(name);
            if name.is_empty() || name.len() > MAX_IFNAME {
                return None;
            }
            let mac = get(IFLA_ADDRESS)
                .filter(|m| !m.is_empty() && m.len() <= 32)
                .map(|m| {
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                });
            Some(Msg::NewLink(LinkMsg {
                index,
                name: String::from_utf8_lossy(name).into_owned(),
                admin_up: flags & IFF_UP != 0,
                lower_up: flags & IFF_LOWER_UP != 0,
                operstate: get(IFLA_OPERSTATE)
                    .and_then(|v| v.first())
                    .map_or("unknown", |v| operstate(*v)),
                mtu: get(IFLA_MTU).and_then(u32_of),
                mac,
                carrier_ups: get(IFLA_CARRIER_UP_COUNT).and_then(u32_of),
                carrier_downs: get(IFLA_CARRIER_DOWN_COUNT).and_then(u32_of),
            }))
        }
        RTM_NEWADDR | RTM_DELADDR => {
            let h = body.get(..8)?;
            let family = h[0];
            let attrs = attributes(&body[8..]);
            let get = |t: u16| attrs.iter().find(|(a, _)| *a == t).map(|(_, v)| *v);
            // IFA_LOCAL is the node's own address (IFA_ADDRESS is the peer
            // on point-to-point links); IPv6 has only IFA_ADDRESS.
            let address = get(IFA_LOCAL)
                .or_else(|| get(IFA_ADDRESS))
                .and_then(|v| ip_of(family, v))?;
            let flags = get(IFA_FLAGS).and_then(u32_of).unwrap_or(u32::from(h[2]));
            let (preferred, valid) = get(IFA_CACHEINFO)
                .and_then(|v| Some((u32_of(v)?, u32_of(v.get(4..)?)?)))
                .unwrap_or((u32::MAX, u32::MAX));
            let forever = |s: u32| (s != u32::MAX).then_some(s);
            let a = AddrMsg {
                index: u32::from_ne_bytes(h[4..8].try_into().ok()?),
                address,
                prefix_len: h[1],
                scope: scope(h[3]),
                dynamic: flags & IFA_F_PERMANENT == 0,
                valid_lft: forever(valid),
                preferred_lft: forever(preferred),
            };
            Some(if ty == RTM_NEWADDR {
                Msg::NewAddr(a)
            } else {
                Msg::DelAddr(a)
            })
        }
        RTM_NEWROUTE | RTM_DELROUTE => {
            let h = body.get(..12)?;
            let family = h[0];
            if family != AF_INET && family != AF_INET6 {
                return Some(Msg::Other);
            }
            let attrs = attributes(&body[12..]);
            let get = |t: u16| attrs.iter().find(|(a, _)| *a == t).map(|(_, v)| *v);
            let r = RouteMsg {
                family,
                dst_len: if get(RTA_DST).is_some() { h[1] } else { 0 },
                kind: h[7],
                table: get(RTA_TABLE).and_then(u32_of).unwrap_or(u32::from(h[4])),
                protocol: protocol(h[5]),
                metric: get(RTA_PRIORITY).and_then(u32_of).unwrap_or(0),
                oif: get(RTA_OIF).and_then(u32_of),
                gateway: get(RTA_GATEWAY).and_then(|v| ip_of(family, v)),
            };
            Some(if ty == RTM_NEWROUTE {
                Msg::NewRoute(r)
            } else {
                Msg::DelRoute(r)
            })
        }
        _ => Some(Msg::Other),
    }
}

/// A dump request for `ty` (RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE) of
/// every family.
pub(crate) fn dump_request(ty: u16, seq: u32) -> Vec<u8> {
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    let body_len = match ty {
        RTM_GETLINK => 16,
        RTM_GETADDR => 8,
        _ => 12,
    };
    let len = NLMSG_HDRLEN + body_len;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.resize(len, 0);
    m
}

/// Message builders for tests: messages framed as the kernel frames them.
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    fn attrs(body: &mut Vec<u8>, attrs: &[(u16, Vec<u8>)]) {
        for (t, v) in attrs {
            body.extend_from_slice(&u16::try_from(4 + v.len()).unwrap().to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(v);
            while !body.len().is_multiple_of(4) {
                body.push(0);
            }
        }
    }

    pub fn frame(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(
            &u32::try_from(NLMSG_HDRLEN + body.len())
                .unwrap()
                .to_ne_bytes(),
        );
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m
    }

    pub fn link(ty: u16, index: u32, name: &str, up: bool, carrier: bool) -> Vec<u8> {
        link_counted(ty, index, name, up, carrier, None)
    }

    /// A link with its carrier (ups, downs) counters.
    pub fn link_counted(
        ty: u16,
        index: u32,
        name: &str,
        up: bool,
        carrier: bool,
        counts: Option<(u32, u32)>,
    ) -> Vec<u8> {
        let flags = if up { IFF_UP } else { 0 } | if carrier { IFF_LOWER_UP } else { 0 };
        let mut body = vec![0u8, 0, 1, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&flags.to_ne_bytes());
        body.extend_from_slice(&0xffff_ffffu32.to_ne_bytes());
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        let mut list = vec![
            (IFLA_IFNAME, n),
            (IFLA_MTU, 1500u32.to_ne_bytes().to_vec()),
            (IFLA_OPERSTATE, vec![if carrier && up { 6 } else { 2 }]),
            (IFLA_ADDRESS, vec![2, 0, 0, 0, 0, 1]),
        ];
        if let Some((ups, downs)) = counts {
            list.push((IFLA_CARRIER_UP_COUNT, ups.to_ne_bytes().to_vec()));
            list.push((IFLA_CARRIER_DOWN_COUNT, downs.to_ne_bytes().to_vec()));
        }
        attrs(&mut body, &list);
        frame(ty, &body)
    }

    pub fn addr(ty: u16, index: u32, a: IpAddr, prefix: u8, valid: Option<u32>) -> Vec<u8> {
        let (family, bytes) = match a {
            IpAddr::V4(v) => (AF_INET, v.octets().to_vec()),
            IpAddr::V6(v) => (AF_INET6, v.octets().to_vec()),
        };
        let flags: u32 = if valid.is_some() { 0 } else { IFA_F_PERMANENT };
        let mut body = vec![family, prefix, 0, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        let mut cache = Vec::new();
        let v = valid.unwrap_or(u32::MAX);
        cache.extend_from_slice(&v.to_ne_bytes());
        cache.extend_from_slice(&v.to_ne_bytes());
        cache.extend_from_slice(&[0; 8]);
        let mut list = vec![(IFA_ADDRESS, bytes.clone())];
        if family == AF_INET {
            list.push((IFA_LOCAL, bytes));
        }
        list.push((IFA_CACHEINFO, cache));
        list.push((IFA_FLAGS, flags.to_ne_bytes().to_vec()));
        attrs(&mut body, &list);
        frame(ty, &body)
    }

    pub fn route(ty: u16, gw: IpAddr, oif: u32, dst_len: u8, metric: u32) -> Vec<u8> {
        let (family, bytes, dst) = match gw {
            IpAddr::V4(v) => (AF_INET, v.octets().to_vec(), vec![10, 9, 0, 0]),
            IpAddr::V6(v) => (AF_INET6, v.octets().to_vec(), vec![0xfd; 16]),
        };
        let mut body = vec![family, dst_len, 0, 0, 254, 16, 0, RTN_UNICAST];
        body.extend_from_slice(&0u32.to_ne_bytes());
        let mut list = vec![
            (RTA_TABLE, 254u32.to_ne_bytes().to_vec()),
            (RTA_OIF, oif.to_ne_bytes().to_vec()),
            (RTA_GATEWAY, bytes),
            (RTA_PRIORITY, metric.to_ne_bytes().to_vec()),
        ];
        if dst_len > 0 {
            list.push((RTA_DST, dst));
        }
        attrs(&mut body, &list);
        frame(ty, &body)
    }
}
