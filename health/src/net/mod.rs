//! Links, addresses and default routes watched through rtnetlink (R5): a
//! thread reads the kernel's notifications (link, IPv4/IPv6 address and
//! route groups) as they come, keeps the current state, and turns each
//! change into an event stamped when it was read. Link flaps and address
//! changes are thus events within milliseconds, not something seen at the
//! next report. DHCP leases are read from systemd-networkd's files when a
//! report is taken ([`leases`]).
//!
//! The state is built from a dump taken after subscribing, so no change
//! falls between the two; notifications already in the dump are applied
//! again harmlessly (each carries the whole object). When the socket
//! overflows (ENOBUFS: notifications lost), the state is dumped again and
//! the difference becomes the events.

pub mod leases;
mod msg;
mod table;

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use serde::{Deserialize, Serialize};

use crate::Problem;
pub use table::{Change, Table, MAX_ADDRESSES, MAX_LINKS, MAX_ROUTES};

/// Events kept for the report.
pub const MAX_RECENT: usize = 64;
/// Events queued per subscriber; past it that subscriber misses events.
pub const SUBSCRIBER_QUEUE: usize = 1024;

// RTNLGRP_*: group numbers for NETLINK_ADD_MEMBERSHIP.
const GROUPS: [u32; 5] = [1, 5, 7, 9, 11];
/// Notifications arrive in bursts (an interface with many addresses).
const RCVBUF: usize = 1 << 20;
/// How often the reader looks at its stop flag.
const POLL: Duration = Duration::from_millis(500);
/// A dump that has not ended by then is given up.
const DUMP_DEADLINE: Duration = Duration::from_secs(5);

/// One link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    /// `eth0`.
    pub iface: String,
    /// The kernel's interface index.
    pub index: u32,
    /// Administratively up (IFF_UP).
    pub admin_up: bool,
    /// The driver has a carrier (IFF_LOWER_UP).
    pub carrier: bool,
    /// RFC 2863 operational state (`up`, `down`, `lowerlayerdown`, …).
    pub operstate: String,
    /// MTU.
    pub mtu: Option<u32>,
    /// Link-layer address, `aa:bb:…`.
    pub mac: Option<String>,
}

/// One address of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAddress {
    /// The interface (`#INDEX` if its link is not known).
    pub iface: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// The address.
    pub address: String,
    /// Its prefix length.
    pub prefix_len: u8,
    /// `global`, `site`, `link`, `host`, `other`.
    pub scope: String,
    /// It has a lifetime (DHCP, SLAAC), not set for good.
    pub dynamic: bool,
    /// Seconds of validity left when it was last announced; null: forever.
    pub valid_lft_s: Option<u32>,
    /// Seconds it stays preferred; null: forever.
    pub preferred_lft_s: Option<u32>,
}

/// One default route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultRoute {
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// The gateway; null for a route straight onto a link.
    pub gateway: Option<String>,
    /// The outgoing interface.
    pub iface: Option<String>,
    /// Its metric (lower wins).
    pub metric: u32,
    /// Who installed it: `dhcp`, `ra`, `static`, `boot`, `kernel`, `other`.
    pub protocol: String,
    /// Routing table (254: main).
    pub table: u32,
}

/// A DHCP lease (systemd-networkd).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The interface, if its index names a known link.
    pub iface: Option<String>,
    /// Its index (the lease file's name).
    pub ifindex: u32,
    /// The leased address.
    pub address: Option<String>,
    /// From the lease's netmask.
    pub prefix_len: Option<u8>,
    /// Routers offered (at most 8).
    pub routers: Vec<String>,
    /// The DHCP server that granted it.
    pub server: Option<String>,
    /// DNS servers offered (at most 8).
    pub dns: Vec<String>,
    /// Domain name offered.
    pub domain: Option<String>,
    /// Lease time (s).
    pub lifetime_s: Option<u32>,
    /// Renewal time T1 (s).
    pub t1_s: Option<u32>,
    /// Rebinding time T2 (s).
    pub t2_s: Option<u32>,
    /// When the file was written (unix seconds): the lease ends
    /// `lifetime_s` after it.
    pub written_at: Option<u64>,
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetEventKind {
    /// A new interface.
    LinkAdded,
    /// An interface went away.
    LinkRemoved,
    /// Set administratively up.
    AdminUp,
    /// Set administratively down.
    AdminDown,
    /// Carrier gained.
    CarrierUp,
    /// Carrier lost (cable, peer, or the link set down).
    CarrierDown,
    /// An address added.
    AddressAdded,
    /// An address removed (also a lease that ran out).
    AddressRemoved,
    /// A default route added.
    DefaultRouteAdded,
    /// A default route removed.
    DefaultRouteRemoved,
}

impl NetEventKind {
    /// The name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NetEventKind::LinkAdded => "link-added",
            NetEventKind::LinkRemoved => "link-removed",
            NetEventKind::AdminUp => "admin-up",
            NetEventKind::AdminDown => "admin-down",
            NetEventKind::CarrierUp => "carrier-up",
            NetEventKind::CarrierDown => "carrier-down",
            NetEventKind::AddressAdded => "address-added",
            NetEventKind::AddressRemoved => "address-removed",
            NetEventKind::DefaultRouteAdded => "default-route-added",
            NetEventKind::DefaultRouteRemoved => "default-route-removed",
        }
    }
}

/// One event as the report lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetEvent {
    /// When the watcher read it (unix milliseconds).
    pub at_ms: u64,
    /// What changed.
    pub kind: NetEventKind,
    /// The interface.
    pub iface: String,
    /// The address, or the route's gateway.
    pub detail: Option<String>,
}

/// An event with the monotonic instant the watcher read it (subscribers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamped {
    /// When the datagram carrying it was read.
    pub at: Instant,
    /// The event.
    pub event: NetEvent,
}

/// The network part of the health report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// The watcher runs (false: see `error`; the rest is empty or old).
    pub watching: bool,
    /// Why the watcher does not run.
    pub error: Option<String>,
    /// Links, by index.
    pub links: Vec<LinkState>,
    /// Addresses.
    pub addresses: Vec<NetAddress>,
    /// Default routes.
    pub default_routes: Vec<DefaultRoute>,
    /// DHCP leases (systemd-networkd).
    pub leases: Vec<Lease>,
    /// The last events, oldest first (at most 64).
    pub recent_events: Vec<NetEvent>,
    /// Events since the agent started.
    pub events_total: u64,
    /// Times notifications were lost and the state read again.
    pub resyncs: u64,
    /// Links, addresses or routes left out past their bounds.
    pub dropped: u64,
    /// Lease files that could not be read.
    pub problems: Vec<Problem>,
}

struct Shared {
    table: Table,
    error: Option<String>,
    recent: VecDeque<NetEvent>,
    events_total: u64,
    resyncs: u64,
    subs: Vec<mpsc::SyncSender<Stamped>>,
}

/// The watcher: one thread reading notifications for the network namespace
/// it was started in. Stops (within half a second) when dropped.
pub struct NetWatch {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for NetWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetWatch").finish_non_exhaustive()
    }
}

impl Drop for NetWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn timeval(d: Duration) -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        i64::from(d.subsec_micros()),
    )
}

/// A socket in the caller's namespace, subscribed to the groups.
fn subscribe() -> std::io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    for g in GROUPS {
        sock.add_membership(g)?;
    }
    if nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &RCVBUF).is_err()
    {
        sock.set_rx_buf_sz(RCVBUF)?;
    }
    nix::sys::socket::setsockopt(
        &sock,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &timeval(POLL),
    )?;
    Ok(sock)
}

/// The whole state now, from dumps on a socket of its own (in the
/// caller's namespace).
pub fn dump() -> std::io::Result<Table> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    nix::sys::socket::setsockopt(
        &sock,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &timeval(Duration::from_secs(1)),
    )?;
    // A dump interrupted by a change (NLM_F_DUMP_INTR) is taken again.
    for _ in 0..3 {
        if let Some(t) = dump_once(&sock)? {
            return Ok(t);
        }
    }
    Err(std::io::Error::other(
        "rtnetlink dump interrupted by changes three times",
    ))
}

fn dump_once(sock: &Socket) -> std::io::Result<Option<Table>> {
    let mut t = Table::default();
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let mut consistent = true;
    for (seq, ty) in [msg::RTM_GETLINK, msg::RTM_GETADDR, msg::RTM_GETROUTE]
        .into_iter()
        .enumerate()
    {
        let seq = u32::try_from(seq).unwrap_or(0) + 1;
        sock.send(&msg::dump_request(ty, seq), 0)?;
        'dump: loop {
            if start.elapsed() > DUMP_DEADLINE {
                return Err(std::io::Error::other("rtnetlink dump did not end in time"));
            }
            let n = match nix::sys::socket::recv(
                sock.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for f in msg::frames(&buf[..n]) {
                if f.seq != seq {
                    continue;
                }
                if f.flags & msg::NLM_F_DUMP_INTR != 0 {
                    consistent = false;
                }
                match f.ty {
                    msg::NLMSG_DONE => break 'dump,
                    msg::NLMSG_ERROR => {
                        let code = f
                            .body
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        return Err(std::io::Error::from_raw_os_error(-code));
                    }
                    ty => {
                        t.apply(msg::decode(ty, f.body));
                    }
                }
            }
        }
    }
    Ok(consistent.then_some(t))
}

impl NetWatch {
    /// Subscribes in the caller's network namespace, reads the current
    /// state, and starts the reader thread.
    pub fn start() -> std::io::Result<NetWatch> {
        let sock = subscribe()?;
        let table = dump()?;
        let shared = Arc::new(Mutex::new(Shared {
            table,
            error: None,
            recent: VecDeque::new(),
            events_total: 0,
            resyncs: 0,
            subs: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("health-netlink".into())
            .spawn(move || run(sock, &s, &st))?;
        Ok(NetWatch { shared, stop })
    }

    /// A stream of events from now on.
    pub fn subscribe(&self) -> mpsc::Receiver<Stamped> {
        let (tx, rx) = mpsc::sync_channel(SUBSCRIBER_QUEUE);
        lock(&self.shared).subs.push(tx);
        rx
    }

    /// The current state and the last events (leases not included).
    pub fn snapshot(&self) -> Network {
        let s = lock(&self.shared);
        Network {
            watching: s.error.is_none(),
            error: s.error.clone(),
            links: s.table.links(),
            addresses: s.table.addresses(),
            default_routes: s.table.default_routes(),
            leases: Vec::new(),
            recent_events: s.recent.iter().cloned().collect(),
            events_total: s.events_total,
            resyncs: s.resyncs,
            dropped: s.table.dropped,
            problems: Vec::new(),
        }
    }

    /// The name of interface `index`, if known.
    pub fn name_of(&self, index: u32) -> Option<String> {
        lock(&self.shared).table.name_of(index).map(str::to_owned)
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records changes read at `at`: the report's ring, the counters, and
/// every subscriber (one that is full or gone misses them).
fn publish(s: &mut Shared, changes: Vec<Change>, at: Instant, wall: SystemTime) {
    for c in changes {
        let event = NetEvent {
            at_ms: unix_ms(wall),
            kind: c.kind,
            iface: c.iface,
            detail: c.detail,
        };
        s.events_total += 1;
        if s.recent.len() == MAX_RECENT {
            s.recent.pop_front();
        }
        s.recent.push_back(event.clone());
        s.subs.retain(|tx| {
            !matches!(
                tx.try_send(Stamped {
                    at,
                    event: event.clone()
                }),
                Err(mpsc::TrySendError::Disconnected(_))
            )
        });
    }
}

fn run(sock: Socket, shared: &Mutex<Shared>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Acquire) {
        let r = nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        );
        // The watcher's own timestamp: when the notification was read.
        let (at, wall) = (Instant::now(), SystemTime::now());
        match r {
            Ok(n) => {
                let mut s = lock(shared);
                let mut changes = Vec::new();
                for f in msg::frames(&buf[..n]) {
                    changes.extend(s.table.apply(msg::decode(f.ty, f.body)));
                }
                publish(&mut s, changes, at, wall);
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::ENOBUFS) => {
                // Notifications were lost: read the state again and report
                // what differs.
                match dump() {
                    Ok(fresh) => {
                        let mut s = lock(shared);
                        let changes = s.table.diff(&fresh);
                        s.table = fresh;
                        s.resyncs += 1;
                        s.error = None;
                        publish(&mut s, changes, Instant::now(), SystemTime::now());
                    }
                    Err(e) => lock(shared).error = Some(format!("rtnetlink resync: {e}")),
                }
            }
            Err(e) => {
                lock(shared).error = Some(format!("rtnetlink: {e}"));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::msg::{build, decode, frames, Msg};
    use super::msg::{
        RTM_DELADDR, RTM_DELLINK, RTM_DELROUTE, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE,
    };
    use super::*;
    use std::net::IpAddr;

    fn feed(t: &mut Table, datagram: &[u8]) -> Vec<(NetEventKind, String, Option<String>)> {
        frames(datagram)
            .into_iter()
            .flat_map(|f| t.apply(decode(f.ty, f.body)))
            .map(|c| (c.kind, c.iface, c.detail))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    use NetEventKind as K;

    #[test]
    fn link_flaps_and_address_changes_are_events_and_repeats_are_not() {
        let mut t = Table::default();
        let mut d = build::link(RTM_NEWLINK, 2, "eth0", true, true);
        d.extend(build::addr(RTM_NEWADDR, 2, ip("10.0.0.2"), 24, Some(3600)));
        d.extend(build::route(RTM_NEWROUTE, ip("10.0.0.1"), 2, 0, 100));
        // Not a default route: not kept.
        d.extend(build::route(RTM_NEWROUTE, ip("10.0.0.1"), 2, 16, 100));
        let ev = feed(&mut t, &d);
        assert_eq!(
            ev,
            vec![
                (K::LinkAdded, "eth0".into(), None),
                (K::AddressAdded, "eth0".into(), Some("10.0.0.2/24".into())),
                (
                    K::DefaultRouteAdded,
                    "eth0".into(),
                    Some("via 10.0.0.1".into())
                ),
            ]
        );
        // The kernel repeats a link's state and refreshes lifetimes: no
        // event for either.
        let mut d = build::link(RTM_NEWLINK, 2, "eth0", true, true);
        d.extend(build::addr(RTM_NEWADDR, 2, ip("10.0.0.2"), 24, Some(1800)));
        assert!(feed(&mut t, &d).is_empty());
        assert_eq!(t.addresses()[0].valid_lft_s, Some(1800));
        assert!(t.addresses()[0].dynamic);
        // Carrier lost, then the link set down, then up with carrier.
        let ev = feed(&mut t, &build::link(RTM_NEWLINK, 2, "eth0", true, false));
        assert_eq!(ev, vec![(K::CarrierDown, "eth0".into(), None)]);
        let ev = feed(&mut t, &build::link(RTM_NEWLINK, 2, "eth0", false, false));
        assert_eq!(ev, vec![(K::AdminDown, "eth0".into(), None)]);
        let ev = feed(&mut t, &build::link(RTM_NEWLINK, 2, "eth0", true, true));
        assert_eq!(
            ev,
            vec![
                (K::AdminUp, "eth0".into(), None),
                (K::CarrierUp, "eth0".into(), None)
            ]
        );
        let links = t.links();
        assert_eq!(links[0].operstate, "up");
        assert_eq!(links[0].mac.as_deref(), Some("02:00:00:00:00:01"));
        assert_eq!(links[0].mtu, Some(1500));
        // IPv6, permanent; removal of an address never seen is no event.
        let ev = feed(
            &mut t,
            &build::addr(RTM_NEWADDR, 2, ip("fd00::2"), 64, None),
        );
        assert_eq!(
            ev,
            vec![(K::AddressAdded, "eth0".into(), Some("fd00::2/64".into()))]
        );
        assert!(!t.addresses()[1].dynamic);
        assert_eq!(t.addresses()[1].valid_lft_s, None);
        assert!(feed(
            &mut t,
            &build::addr(RTM_DELADDR, 2, ip("fd00::9"), 64, None)
        )
        .is_empty());
        let ev = feed(
            &mut t,
            &build::addr(RTM_DELADDR, 2, ip("10.0.0.2"), 24, Some(0)),
        );
        assert_eq!(
            ev,
            vec![(K::AddressRemoved, "eth0".into(), Some("10.0.0.2/24".into()))]
        );
        let ev = feed(
            &mut t,
            &build::route(RTM_DELROUTE, ip("10.0.0.1"), 2, 0, 100),
        );
        assert_eq!(
            ev,
            vec![(
                K::DefaultRouteRemoved,
                "eth0".into(),
                Some("via 10.0.0.1".into())
            )]
        );
    }

    #[test]
    fn a_flap_inside_one_linkwatch_batch_is_told_by_the_counters() {
        let mut t = Table::default();
        feed(
            &mut t,
            &build::link_counted(RTM_NEWLINK, 3, "eth1", true, true, Some((1, 0))),
        );
        // Down and up again before the kernel announced either: same
        // flags, counters risen.
        let ev = feed(
            &mut t,
            &build::link_counted(RTM_NEWLINK, 3, "eth1", true, true, Some((2, 1))),
        );
        assert_eq!(
            ev,
            vec![
                (K::CarrierDown, "eth1".into(), None),
                (K::CarrierUp, "eth1".into(), None)
            ]
        );
        // Lost, regained, lost: one message.
        let ev = feed(
            &mut t,
            &build::link_counted(RTM_NEWLINK, 3, "eth1", true, false, Some((3, 3))),
        );
        assert_eq!(
            ev.iter().map(|e| e.0).collect::<Vec<_>>(),
            [K::CarrierDown, K::CarrierUp, K::CarrierDown]
        );
        let ev = feed(
            &mut t,
            &build::link_counted(RTM_NEWLINK, 3, "eth1", true, false, Some((3, 3))),
        );
        assert!(ev.is_empty());
        // Two flaps in one batch: each told.
        let ev = feed(
            &mut t,
            &build::link_counted(RTM_NEWLINK, 3, "eth1", true, false, Some((5, 5))),
        );
        assert_eq!(
            ev.iter().map(|e| e.0).collect::<Vec<_>>(),
            [K::CarrierUp, K::CarrierDown, K::CarrierUp, K::CarrierDown]
        );
        // A counter that jumped (a wrap, or a link flapping for minutes
        // unread) is told up to the bound.
        let ev = feed(
            &mut t,
            &build::link_counted(RTM_NEWLINK, 3, "eth1", true, true, Some((6, 10_000))),
        );
        assert_eq!(
            ev.len(),
            usize::try_from(super::table::MAX_FLAPS_TOLD).unwrap()
        );
        assert_eq!(ev.last().unwrap().0, K::CarrierUp);
    }

    #[test]
    fn a_link_removed_takes_its_addresses_and_routes_along() {
        let mut t = Table::default();
        let mut d = build::link(RTM_NEWLINK, 7, "veth0", true, true);
        d.extend(build::addr(RTM_NEWADDR, 7, ip("192.0.2.1"), 24, None));
        d.extend(build::route(RTM_NEWROUTE, ip("fe80::1"), 7, 0, 1024));
        feed(&mut t, &d);
        let ev = feed(&mut t, &build::link(RTM_DELLINK, 7, "veth0", false, false));
        assert_eq!(
            ev.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![K::AddressRemoved, K::DefaultRouteRemoved, K::LinkRemoved]
        );
        assert!(t.links().is_empty() && t.addresses().is_empty() && t.default_routes().is_empty());
    }

    #[test]
    fn a_resync_reports_the_difference() {
        let mut old = Table::default();
        let mut d = build::link(RTM_NEWLINK, 2, "eth0", true, true);
        d.extend(build::link(RTM_NEWLINK, 3, "eth1", true, true));
        d.extend(build::addr(RTM_NEWADDR, 2, ip("10.0.0.2"), 24, None));
        feed(&mut old, &d);
        let mut new = Table::default();
        let mut d = build::link(RTM_NEWLINK, 2, "eth0", true, false);
        d.extend(build::link(RTM_NEWLINK, 4, "eth2", true, true));
        d.extend(build::addr(RTM_NEWADDR, 2, ip("10.0.0.3"), 24, None));
        feed(&mut new, &d);
        let ev: Vec<_> = old
            .diff(&new)
            .into_iter()
            .map(|c| (c.kind, c.iface))
            .collect();
        assert_eq!(
            ev,
            vec![
                (K::AddressRemoved, "eth0".into()),
                (K::CarrierDown, "eth0".into()),
                (K::LinkRemoved, "eth1".into()),
                (K::LinkAdded, "eth2".into()),
                (K::AddressAdded, "eth0".into()),
            ]
        );
        assert!(new.diff(&new.clone()).is_empty());
    }

    #[test]
    fn malformed_messages_are_no_state_and_never_panic() {
        let mut t = Table::default();
        let whole = build::link(RTM_NEWLINK, 2, "eth0", true, true);
        for cut in 0..whole.len() {
            let _ = feed(&mut t, &whole[..cut]);
        }
        // A body cut inside the fixed header, with a frame length that
        // claims it whole.
        for ty in [RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE, RTM_DELLINK] {
            for n in 0..20 {
                assert_eq!(decode(ty, &vec![0xa5; n][..n.min(7)]), Msg::Other);
            }
        }
        // A name longer than the kernel allows, and an empty one.
        assert_eq!(
            decode(
                RTM_NEWLINK,
                &build::link(RTM_NEWLINK, 2, "a-very-long-name0", true, true)[16..]
            ),
            Msg::Other
        );
        assert_eq!(
            decode(
                RTM_NEWLINK,
                &build::link(RTM_NEWLINK, 2, "", true, true)[16..]
            ),
            Msg::Other
        );
        // An address before its link is named by index.
        let ev = feed(
            &mut t,
            &build::addr(RTM_NEWADDR, 9, ip("10.1.1.1"), 8, None),
        );
        assert_eq!(ev[0].1, "#9");
        // Bridge-port messages (AF_BRIDGE) do not remove the link.
        let mut d = build::link(RTM_DELLINK, 2, "eth0", true, true);
        d[16] = 7;
        assert!(feed(&mut t, &d).is_empty());
    }

    #[test]
    fn tables_are_bounded() {
        let mut t = Table::default();
        let mut d = Vec::new();
        for i in 0..(MAX_LINKS + 5) {
            d.extend(build::link(
                RTM_NEWLINK,
                u32::try_from(i).unwrap() + 1,
                &format!("d{i}"),
                true,
                true,
            ));
        }
        feed(&mut t, &d);
        assert_eq!(t.links().len(), MAX_LINKS);
        assert_eq!(t.dropped, 5);
    }

    #[test]
    fn events_reach_the_ring_and_subscribers_and_a_full_one_misses_them() {
        let mut s = Shared {
            table: Table::default(),
            error: None,
            recent: VecDeque::new(),
            events_total: 0,
            resyncs: 0,
            subs: Vec::new(),
        };
        let (tx, rx) = mpsc::sync_channel(2);
        s.subs.push(tx);
        // A subscriber that went away.
        let (gone, dropped) = mpsc::sync_channel::<Stamped>(1);
        drop(dropped);
        s.subs.push(gone);
        let now = Instant::now();
        let changes: Vec<Change> = (0..(MAX_RECENT + 3))
            .map(|i| Change {
                kind: K::AddressAdded,
                iface: format!("e{i}"),
                detail: None,
            })
            .collect();
        publish(&mut s, changes, now, SystemTime::now());
        assert_eq!(s.events_total, u64::try_from(MAX_RECENT + 3).unwrap());
        assert_eq!(s.recent.len(), MAX_RECENT);
        assert_eq!(s.recent[0].iface, "e3");
        // The subscriber that went away is dropped; the slow one keeps
        // the first events it had room for.
        assert_eq!(s.subs.len(), 1);
        assert_eq!(
            rx.try_iter().map(|e| e.event.iface).collect::<Vec<_>>(),
            vec!["e0", "e1"]
        );
    }
}
