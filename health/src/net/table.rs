//! The node's links, addresses and default routes as rtnetlink tells them,
//! and the events a change makes. No socket here: [`Table::apply`] takes
//! one decoded message, so the logic is tested with constructed messages.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::msg::{AddrMsg, LinkMsg, Msg, RouteMsg};
use super::{DefaultRoute, LinkState, NetAddress, NetEventKind};

/// Most links kept; more are counted in [`Table::dropped`].
pub const MAX_LINKS: usize = 1024;
/// Most addresses kept.
pub const MAX_ADDRESSES: usize = 4096;
/// Most default routes kept.
pub const MAX_ROUTES: usize = 256;
/// Most carrier events made of one message's counters (a link flapping
/// faster than linkwatch reports it).
pub const MAX_FLAPS_TOLD: u32 = 32;

/// One change, before it is stamped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub kind: NetEventKind,
    /// The interface (its index when the name is not known).
    pub iface: String,
    /// The address (`10.0.0.2/24`) or the gateway, when there is one.
    pub detail: Option<String>,
}

type AddrKey = (u32, IpAddr, u8);
/// (family, table, metric, interface, gateway): what tells two default
/// routes apart (the kernel's key is table, prefix, tos and metric; the
/// interface and gateway tell the next hops of equal-metric routes apart).
type RouteKey = (u8, u32, u32, u32, Option<IpAddr>);

/// Links by index, addresses and default routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    links: BTreeMap<u32, LinkMsg>,
    addrs: BTreeMap<AddrKey, AddrMsg>,
    routes: BTreeMap<RouteKey, RouteMsg>,
    /// Entries not kept because a bound was reached.
    pub dropped: u64,
}

fn iface_of(links: &BTreeMap<u32, LinkMsg>, index: u32) -> String {
    links
        .get(&index)
        .map_or_else(|| format!("#{index}"), |l| l.name.clone())
}

fn addr_key(a: &AddrMsg) -> AddrKey {
    (a.index, a.address, a.prefix_len)
}

fn route_key(r: &RouteMsg) -> RouteKey {
    (r.family, r.table, r.metric, r.oif.unwrap_or(0), r.gateway)
}

fn change(kind: NetEventKind, iface: String, detail: Option<String>) -> Change {
    Change {
        kind,
        iface,
        detail,
    }
}

/// The events between two states of one link.
fn link_changes(old: Option<&LinkMsg>, new: Option<&LinkMsg>, out: &mut Vec<Change>) {
    match (old, new) {
        (None, None) => {}
        (None, Some(n)) => out.push(change(NetEventKind::LinkAdded, n.name.clone(), None)),
        (Some(o), None) => out.push(change(NetEventKind::LinkRemoved, o.name.clone(), None)),
        (Some(o), Some(n)) => {
            if o.admin_up != n.admin_up {
                let k = if n.admin_up {
                    NetEventKind::AdminUp
                } else {
                    NetEventKind::AdminDown
                };
                out.push(change(k, n.name.clone(), None));
            }
            // Carrier transitions the counters saw (linkwatch batches
            // them: several flaps can come as one message).
            let rose = |a: Option<u32>, b: Option<u32>| match (a, b) {
                (Some(a), Some(b)) => b.wrapping_sub(a),
                _ => 0,
            };
            let seen = rose(o.carrier_ups, n.carrier_ups)
                .saturating_add(rose(o.carrier_downs, n.carrier_downs))
                .min(MAX_FLAPS_TOLD);
            let kind = |up: bool| {
                if up {
                    NetEventKind::CarrierUp
                } else {
                    NetEventKind::CarrierDown
                }
            };
            if seen > 0 {
                // Alternating, ending in the state the link shows.
                for k in (0..seen).rev() {
                    let up = n.lower_up == (k % 2 == 0);
                    out.push(change(kind(up), n.name.clone(), None));
                }
            } else if o.lower_up != n.lower_up {
                out.push(change(kind(n.lower_up), n.name.clone(), None));
            }
        }
    }
}

fn addr_detail(a: &AddrMsg) -> Option<String> {
    Some(format!("{}/{}", a.address, a.prefix_len))
}

fn route_detail(r: &RouteMsg) -> Option<String> {
    Some(
        r.gateway
            .map_or_else(|| "no gateway".into(), |g| format!("via {g}")),
    )
}

impl Table {
    /// Applies one message; returns what changed.
    pub fn apply(&mut self, m: Msg) -> Vec<Change> {
        let mut out = Vec::new();
        match m {
            Msg::NewLink(l) => {
                if !self.links.contains_key(&l.index) && self.links.len() >= MAX_LINKS {
                    self.dropped += 1;
                    return out;
                }
                let old = self.links.insert(l.index, l.clone());
                link_changes(old.as_ref(), Some(&l), &mut out);
            }
            Msg::DelLink(index) => {
                // Its addresses and routes went with it (the kernel sends
                // their removals too, but not always before the link's).
                let old = self.links.get(&index).cloned();
                let gone: Vec<AddrKey> = self
                    .addrs
                    .keys()
                    .filter(|k| k.0 == index)
                    .copied()
                    .collect();
                for k in gone {
                    if let Some(a) = self.addrs.remove(&k) {
                        out.push(change(
                            NetEventKind::AddressRemoved,
                            iface_of(&self.links, index),
                            addr_detail(&a),
                        ));
                    }
                }
                let gone: Vec<RouteKey> = self
                    .routes
                    .keys()
                    .filter(|k| k.3 == index)
                    .copied()
                    .collect();
                for k in gone {
                    if let Some(r) = self.routes.remove(&k) {
                        out.push(change(
                            NetEventKind::DefaultRouteRemoved,
                            iface_of(&self.links, index),
                            route_detail(&r),
                        ));
                    }
                }
                self.links.remove(&index);
                link_changes(old.as_ref(), None, &mut out);
            }
            Msg::NewAddr(a) => {
                let k = addr_key(&a);
                if !self.addrs.contains_key(&k) && self.addrs.len() >= MAX_ADDRESSES {
                    self.dropped += 1;
                    return out;
                }
                let detail = addr_detail(&a);
                // A lifetime refresh is the same address: no event.
                if self.addrs.insert(k, a).is_none() {
                    out.push(change(
                        NetEventKind::AddressAdded,
                        iface_of(&self.links, k.0),
                        detail,
                    ));
                }
            }
            Msg::DelAddr(a) => {
                if let Some(old) = self.addrs.remove(&addr_key(&a)) {
                    out.push(change(
                        NetEventKind::AddressRemoved,
                        iface_of(&self.links, old.index),
                        addr_detail(&old),
                    ));
                }
            }
            Msg::NewRoute(r) => {
                if !r.is_default() {
                    return out;
                }
                let k = route_key(&r);
                if !self.routes.contains_key(&k) && self.routes.len() >= MAX_ROUTES {
                    self.dropped += 1;
                    return out;
                }
                let detail = route_detail(&r);
                if self.routes.insert(k, r).is_none() {
                    out.push(change(
                        NetEventKind::DefaultRouteAdded,
                        iface_of(&self.links, k.3),
                        detail,
                    ));
                }
            }
            Msg::DelRoute(r) => {
                if let Some(old) = self.routes.remove(&route_key(&r)) {
                    out.push(change(
                        NetEventKind::DefaultRouteRemoved,
                        iface_of(&self.links, k3(&old)),
                        route_detail(&old),
                    ));
                }
            }
            Msg::Other => {}
        }
        out
    }

    /// What changed from `self` to `newer` (after notifications were lost
    /// and the state was read again).
    pub fn diff(&self, newer: &Table) -> Vec<Change> {
        let mut out = Vec::new();
        for (k, a) in &self.addrs {
            if !newer.addrs.contains_key(k) {
                out.push(change(
                    NetEventKind::AddressRemoved,
                    iface_of(&self.links, k.0),
                    addr_detail(a),
                ));
            }
        }
        for (k, r) in &self.routes {
            if !newer.routes.contains_key(k) {
                out.push(change(
                    NetEventKind::DefaultRouteRemoved,
                    iface_of(&self.links, k.3),
                    route_detail(r),
                ));
            }
        }
        let mut indices: Vec<u32> = self.links.keys().copied().collect();
        indices.extend(newer.links.keys().filter(|i| !self.links.contains_key(i)));
        for i in indices {
            link_changes(self.links.get(&i), newer.links.get(&i), &mut out);
        }
        for (k, a) in &newer.addrs {
            if !self.addrs.contains_key(k) {
                out.push(change(
                    NetEventKind::AddressAdded,
                    iface_of(&newer.links, k.0),
                    addr_detail(a),
                ));
            }
        }
        for (k, r) in &newer.routes {
            if !self.routes.contains_key(k) {
                out.push(change(
                    NetEventKind::DefaultRouteAdded,
                    iface_of(&newer.links, k.3),
                    route_detail(r),
                ));
            }
        }
        out
    }

    /// The name of link `index`, if known.
    pub fn name_of(&self, index: u32) -> Option<&str> {
        self.links.get(&index).map(|l| l.name.as_str())
    }

    /// The links, by index.
    pub fn links(&self) -> Vec<LinkState> {
        self.links
            .values()
            .map(|l| LinkState {
                iface: l.name.clone(),
                index: l.index,
                admin_up: l.admin_up,
                carrier: l.lower_up,
                operstate: l.operstate.to_owned(),
                mtu: l.mtu,
                mac: l.mac.clone(),
            })
            .collect()
    }

    /// The addresses, by interface index.
    pub fn addresses(&self) -> Vec<NetAddress> {
        self.addrs
            .values()
            .map(|a| NetAddress {
                iface: iface_of(&self.links, a.index),
                family: family_name(a.address),
                address: a.address.to_string(),
                prefix_len: a.prefix_len,
                scope: a.scope.to_owned(),
                dynamic: a.dynamic,
                valid_lft_s: a.valid_lft,
                preferred_lft_s: a.preferred_lft,
            })
            .collect()
    }

    /// The default routes.
    pub fn default_routes(&self) -> Vec<DefaultRoute> {
        self.routes
            .values()
            .map(|r| DefaultRoute {
                family: if r.family == super::msg::AF_INET6 {
                    "ipv6"
                } else {
                    "ipv4"
                }
                .into(),
                gateway: r.gateway.map(|g| g.to_string()),
                iface: r.oif.map(|i| iface_of(&self.links, i)),
                metric: r.metric,
                protocol: r.protocol.to_owned(),
                table: r.table,
            })
            .collect()
    }
}

fn k3(r: &RouteMsg) -> u32 {
    r.oif.unwrap_or(0)
}

fn family_name(a: IpAddr) -> String {
    match a {
        IpAddr::V4(_) => "ipv4",
        IpAddr::V6(_) => "ipv6",
    }
    .into()
}
