//! T1 (root), issue 16 (R5): DHCP through the boundary, in network
//! namespaces: a switch (a bridge), the node, the landlord's DHCP server
//! (dnsmasq) and a rogue one (dnsmasq, another namespace on the same
//! bridge), the node's client busybox `udhcpc` (systemd-networkd cannot run
//! in a namespace). The boundaries are applied with the agent's enforcer in
//! the node's namespace.
//!
//! Without `dhcp_servers` (the failsafe example of docs/netpolicy.md) the
//! node gets its lease from the landlord's server, and with only a rogue up
//! the rogue's: DHCP clients read offers on a packet socket, which the
//! kernel serves before the `input` hook. With `dhcp_servers` the table's
//! ingress chains drop the rogue's replies (counted) before any socket sees
//! them: with both servers answering, every lease is the landlord's; with
//! only the rogue, none. A rogue spoofing the landlord's address gets
//! through an address-only entry and not one pinned to the landlord's MAC.

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use leasehold_health::net::NetWatch;
use leasehold_netpolicy::enforce::{Change, Enforcer};
use leasehold_netpolicy::nft::{self, Ruleset};
use leasehold_netpolicy::BoundaryDoc;
use leasehold_tests::require_root;

/// Without `dhcp_servers`: the failsafe example of docs/netpolicy.md
/// ("DHCP", without `dhcp_servers`), with the landlord's server.
const FAILSAFE: &str = r#"
[[failsafe]]
name = "dhcp-broadcast"
peers = ["255.255.255.255"]
direction = "out"
protocols = [{ proto = "udp", ports = [67] }]

[[failsafe]]
name = "dhcp-server-in"
peers = ["10.77.0.1"]
direction = "in"
protocols = [{ proto = "udp", ports = [68] }]

[[failsafe]]
name = "dhcp-server-out"
peers = ["10.77.0.1"]
direction = "out"
protocols = [{ proto = "udp", ports = [67] }]
"#;

/// The documented example (docs/netpolicy.md, "DHCP"): the landlord's
/// server by address, every other flow denied (an allow entry open to all
/// udp would not let a rogue's reply in either: see the nft unit test).
const SERVERS: &str = r#"
dhcp_servers = ["10.77.0.1"]

[[allow]]
name = "web"
peers = ["0.0.0.0/0"]
direction = "both"
protocols = [{ proto = "udp" }]
"#;

struct Namespaces {
    prefix: String,
    children: Vec<Child>,
    /// dnsmasq's lease and pid files, the client's script.
    dir: tempfile::TempDir,
}

impl Namespaces {
    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in ["sw", "node", "land", "rogue"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .status();
        }
    }
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(o.status.success(), "ip {args:?}: {o:?}");
}

/// Waits (on rtnetlink events, in `ns`) until every link of `names` is
/// operationally up: until then the kernel drops what they send.
fn wait_up(ns: &str, names: &[&str]) {
    let ns = ns.to_owned();
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let w = NetWatch::start().unwrap();
        let rx = w.subscribe();
        loop {
            let links = w.snapshot().links;
            if names
                .iter()
                .all(|n| links.iter().any(|l| &l.iface == n && l.operstate == "up"))
            {
                return;
            }
            rx.recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{ns}: {names:?} not up: {e}: {links:?}"));
        }
    })
    .join()
    .unwrap();
}

/// dnsmasq as a DHCP server only, in `ns`; returns once it serves, with
/// a receiver of its DHCPOFFER log lines.
fn dnsmasq(n: &mut Namespaces, which: &str, range: &str) -> (usize, mpsc::Receiver<String>) {
    let ns = n.ns(which);
    let mut c = Command::new("ip")
        .args(["netns", "exec", &ns, "dnsmasq", "--no-daemon", "--port=0"])
        .args(["--interface=e0", "--bind-interfaces", "--log-facility=-"])
        .arg("--no-ping")
        .arg(format!("--dhcp-range={range},1h"))
        .arg(format!(
            "--dhcp-leasefile={}/{ns}-{range}.leases",
            n.dir.path().display()
        ))
        .arg(format!("--pid-file={}/{ns}.pid", n.dir.path().display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("dnsmasq (package dnsmasq-base)");
    let mut lines = BufReader::new(c.stderr.take().unwrap()).lines();
    loop {
        let l = lines
            .next()
            .unwrap_or_else(|| panic!("dnsmasq in {ns} ended before serving"))
            .unwrap();
        if l.contains("DHCP, IP range") {
            break;
        }
    }
    // Its later lines must not fill the pipe; offers go to the test.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if l.contains("DHCPOFFER") {
                let _ = tx.send(l);
            }
        }
    });
    n.children.push(c);
    (n.children.len() - 1, rx)
}

fn stop(n: &mut Namespaces, i: usize) {
    let _ = n.children[i].kill();
    let _ = n.children[i].wait();
}

/// A lease taken: the server id and the address.
#[derive(Debug, PartialEq, Eq)]
struct Lease {
    server: String,
    ip: String,
}

/// One DHCP exchange from the node: the lease taken, if any.
fn lease(n: &Namespaces, script: &std::path::Path) -> Option<Lease> {
    let o = Command::new("ip")
        .args(["netns", "exec", &n.ns("node"), "busybox", "udhcpc"])
        .args(["-i", "e0", "-f", "-q", "-n", "-t", "3", "-T", "1", "-s"])
        .arg(script)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines().find_map(|l| {
        let rest = l.strip_prefix("BOUND serverid=")?;
        let (server, ip) = rest.split_once(" ip=")?;
        Some(Lease {
            server: server.to_owned(),
            ip: ip.to_owned(),
        })
    })
}

fn in_range(l: &Lease, lo: u8, hi: u8) -> bool {
    l.ip.strip_prefix("10.77.0.")
        .and_then(|h| h.parse::<u8>().ok())
        .is_some_and(|h| (lo..=hi).contains(&h))
}

/// The packets counted in the table's `deny_dhcp` counter: the rogue's
/// replies arrive on e0 and are dropped by its ingress chain before the
/// input chain could count them again (this thread is in the node's
/// namespace; nft inherits it).
fn dropped_at_ingress() -> u64 {
    let o = Command::new("nft")
        .args(["list", "counter", "inet", "leasehold", "deny_dhcp"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    text.split("packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no deny_dhcp counter: {text}"))
}

fn apply(e: &mut Enforcer, doc: &str) {
    let boundary = BoundaryDoc::from_toml(doc).unwrap().validate(true).unwrap();
    let (devices, left) = nft::ingress_devices().unwrap();
    assert_eq!(
        (devices.as_slice(), left.as_slice()),
        (&["e0".to_owned()][..], &[][..])
    );
    let options = nft::Options {
        dhcp_devices: devices,
        ..nft::Options::default()
    };
    assert_eq!(
        e.apply(Ruleset::build_with(&boundary, None, &options))
            .unwrap(),
        Change::Full
    );
    assert_eq!(e.check().unwrap(), None, "the table reads back as applied");
}

/// Waits for one DHCPOFFER line of a server (its log: the offer was sent).
fn offered(rx: &mpsc::Receiver<String>, who: &str) {
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{who} made no offer: {e}"));
}

#[test]
#[ignore = "needs root: network namespaces, nftables, dnsmasq"]
fn dhcp_servers_keep_a_rogue_out_and_the_landlords_lease_comes_through() {
    require_root();
    if Command::new("dnsmasq").arg("--version").output().is_err() {
        panic!("dnsmasq missing: scripts/install-deps installs dnsmasq-base");
    }
    let mut n = Namespaces {
        prefix: format!("lhd{}", std::process::id()),
        children: Vec::new(),
        dir: tempfile::tempdir().unwrap(),
    };
    for x in ["sw", "node", "land", "rogue"] {
        ip(&["netns", "add", &n.ns(x)]);
        ip(&["-n", &n.ns(x), "link", "set", "lo", "up"]);
    }
    let sw = n.ns("sw");
    ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &sw, "link", "set", "br0", "up"]);
    for (x, mac) in [
        ("node", "52:54:00:77:00:0a"),
        ("land", "52:54:00:77:00:01"),
        ("rogue", "52:54:00:77:00:66"),
    ] {
        let port = format!("s-{x}");
        ip(&[
            "-n",
            &sw,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "e0",
            "netns",
            &n.ns(x),
        ]);
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", &n.ns(x), "link", "set", "e0", "address", mac]);
        ip(&["-n", &n.ns(x), "link", "set", "e0", "up"]);
    }
    ip(&[
        "-n",
        &n.ns("land"),
        "addr",
        "add",
        "10.77.0.1/24",
        "dev",
        "e0",
    ]);
    ip(&[
        "-n",
        &n.ns("rogue"),
        "addr",
        "add",
        "10.77.0.66/24",
        "dev",
        "e0",
    ]);
    wait_up(&sw, &["br0", "s-node", "s-land", "s-rogue"]);
    for x in ["node", "land", "rogue"] {
        wait_up(&n.ns(x), &["e0"]);
    }
    let script = n.dir.path().join("udhcpc.script");
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"BOUND serverid=$serverid ip=$ip\"\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    // This thread moves to the node's namespace: the enforcer, nft and the
    // interface listing work there.
    {
        let f = std::fs::File::open(format!("/run/netns/{}", n.ns("node"))).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    }
    let mut e = Enforcer::new(Vec::new());

    // 1. Without dhcp_servers (the failsafe example): the landlord's lease
    //    comes through…
    apply(&mut e, FAILSAFE);
    let (land, _) = dnsmasq(&mut n, "land", "10.77.0.100,10.77.0.150");
    let l = lease(&n, &script).expect("a lease from the landlord's server");
    assert_eq!(l.server, "10.77.0.1");
    stop(&mut n, land);
    //    …and so does a rogue's: the input chains never see the offer the
    //    client reads on its packet socket (the limit dhcp_servers lifts).
    let (rogue, rogue_offers) = dnsmasq(&mut n, "rogue", "10.77.0.200,10.77.0.210");
    assert_eq!(
        lease(&n, &script).map(|l| l.server).as_deref(),
        Some("10.77.0.66"),
        "without dhcp_servers a rogue's lease is taken (docs/netpolicy.md, DHCP)"
    );
    while rogue_offers.try_recv().is_ok() {}

    // 2. dhcp_servers (the documented example): with only the rogue up the
    //    node takes no lease, and the rogue's replies are dropped, counted.
    apply(&mut e, SERVERS);
    let before = dropped_at_ingress();
    assert_eq!(lease(&n, &script), None);
    offered(&rogue_offers, "the rogue");
    let after = dropped_at_ingress();
    assert!(after > before, "rogue offers dropped: {before} → {after}");

    // 3. Both answer: every lease is the landlord's, the rogue's offers
    //    dropped all along.
    let (land, land_offers) = dnsmasq(&mut n, "land", "10.77.0.100,10.77.0.150");
    for _ in 0..3 {
        let l = lease(&n, &script).expect("the landlord's lease with a rogue answering");
        assert_eq!(l.server, "10.77.0.1");
        assert!(in_range(&l, 100, 150), "{l:?}");
        offered(&land_offers, "the landlord");
        offered(&rogue_offers, "the rogue");
    }
    // dnsmasq logs an offer before it sends it: the last may still be on
    // its way, the two before it have arrived.
    let dropped = dropped_at_ingress() - after;
    assert!(
        dropped >= 2,
        "rogue offers dropped while both answered: {dropped}"
    );
    stop(&mut n, rogue);
    stop(&mut n, land);

    // 4. A rogue spoofing the landlord's address (same L2): an
    //    address-only entry lets its offer through…
    let rogue_ns = n.ns("rogue");
    ip(&["-n", &rogue_ns, "addr", "flush", "dev", "e0"]);
    ip(&["-n", &rogue_ns, "addr", "add", "10.77.0.1/24", "dev", "e0"]);
    let (spoof, spoof_offers) = dnsmasq(&mut n, "rogue", "10.77.0.200,10.77.0.210");
    let l = lease(&n, &script).expect("the spoofer's lease through an address-only entry");
    assert_eq!(l.server, "10.77.0.1");
    assert!(in_range(&l, 200, 210), "the spoofer's address: {l:?}");
    while spoof_offers.try_recv().is_ok() {}
    //    …one pinned to the landlord's MAC does not,
    apply(
        &mut e,
        &SERVERS.replace(
            "dhcp_servers = [\"10.77.0.1\"]",
            "dhcp_servers = [{ addr = \"10.77.0.1\", mac = \"52:54:00:77:00:01\" }]",
        ),
    );
    let before = dropped_at_ingress();
    assert_eq!(lease(&n, &script), None);
    offered(&spoof_offers, "the spoofer");
    assert!(dropped_at_ingress() > before);
    //    and the landlord's lease comes through beside the spoofer.
    let (_land, land_offers) = dnsmasq(&mut n, "land", "10.77.0.100,10.77.0.150");
    let l = lease(&n, &script).expect("the landlord's lease beside a spoofer");
    assert!(in_range(&l, 100, 150), "{l:?}");
    offered(&land_offers, "the landlord");
    stop(&mut n, spoof);
}
