//! T1 (root): the generated ruleset on a real kernel, with real packets, in
//! network namespaces: a switch (bridge) and three hosts — the node, an
//! allowed peer and a denied peer — over IPv4 and IPv6.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use leasehold_netpolicy::nft;
use leasehold_netpolicy::BoundaryDoc;

struct Net {
    tag: String,
    server: Option<Child>,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    fn ns(&self, host: &str) -> String {
        format!("lh{}-{host}", self.tag)
    }

    fn new() -> Net {
        let tag = format!("{}", std::process::id() % 100_000);
        let net = Net { tag, server: None };
        let sw = net.ns("sw");
        run(&["ip", "netns", "add", &sw]);
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        for (i, host) in ["node", "ok", "bad"].iter().enumerate() {
            let ns = net.ns(host);
            run(&["ip", "netns", "add", &ns]);
            let (a, b) = (format!("v{i}h{}", net.tag), format!("v{i}s{}", net.tag));
            run(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
            run(&["ip", "link", "set", &a, "netns", &ns]);
            run(&["ip", "link", "set", &b, "netns", &sw]);
            run(&["ip", "-n", &sw, "link", "set", &b, "master", "br0", "up"]);
            run(&["ip", "-n", &ns, "link", "set", &a, "name", "eth0"]);
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{}/24", i + 1),
                "dev",
                "eth0",
            ]);
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("fd77::{}/64", i + 1),
                "dev",
                "eth0",
                "nodad",
            ]);
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// TCP listeners on 80 and 443 in the node (v4 and v6); returns when listening.
    fn serve(&mut self) {
        let code = r#"
import socket, threading
def srv(fam, addr, port):
    s = socket.socket(fam)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    s.listen(64)
    return s
ss = [srv(socket.AF_INET, "0.0.0.0", p) for p in (80, 443)] + [srv(socket.AF_INET6, "::", p) for p in (80, 443)]
print("ready", flush=True)
def loop(s):
    while True:
        c, _ = s.accept()
        c.close()
for s in ss:
    threading.Thread(target=loop, args=(s,), daemon=True).start()
threading.Event().wait()
"#;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns("node"), "python3", "-c", code])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        self.server = Some(child);
    }

    /// "open", "refused" (RST / ICMP unreachable) or "timeout" (dropped).
    fn tcp(&self, from: &str, addr: &str, port: u16) -> String {
        let code = format!(
            r#"
import socket
try:
    socket.create_connection(("{addr}", {port}), timeout=1.5)
    print("open")
except socket.timeout:
    print("timeout")
except OSError:
    print("refused")
"#
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(from), "python3", "-c", &code])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn ping(&self, from: &str, addr: &str) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(from),
                "ping",
                "-c1",
                "-W1",
                "-q",
                addr,
            ])
            .output()
            .unwrap()
            .status
            .success()
    }

    fn apply(&self, script: &str) -> Result<(), nft::ApplyError> {
        let ns = self.ns("node");
        nft::apply(script, &["ip", "netns", "exec", &ns])
    }

    fn ruleset(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("node"), "nft", "list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for h in ["node", "ok", "bad", "sw"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(h)])
                .output();
        }
    }
}

#[test]
fn netns_boundaries_hold_for_real_packets_v4_and_v6() {
    leasehold_netpolicy_root_check();
    let mut net = Net::new();
    net.serve();
    // Baseline: everything reaches everything.
    for a in ["10.77.0.1", "fd77::1"] {
        assert!(net.ping("ok", a) && net.ping("bad", a), "baseline {a}");
        assert_eq!(net.tcp("bad", a, 443), "open");
    }

    let cluster = BoundaryDoc::from_toml(
        r#"
action = "drop"
[groups]
tenant-a = ["10.77.0.2/32", "fd77::2/128"]
[[allow]]
name = "cluster"
peers = ["@tenant-a"]
"#,
    )
    .unwrap()
    .validate(true)
    .unwrap();
    net.apply(&nft::ruleset(&cluster, None)).unwrap();
    for (v4, v6) in [("10.77.0.1", "fd77::1")] {
        for a in [v4, v6] {
            assert!(net.ping("ok", a), "allowed peer pings {a}");
            assert!(!net.ping("bad", a), "denied peer must not ping {a}");
            assert_eq!(net.tcp("ok", a, 80), "open");
            assert_eq!(
                net.tcp("bad", a, 443),
                "timeout",
                "drop: the sender times out"
            );
        }
    }
    assert!(
        net.ping("node", "10.77.0.2") && !net.ping("node", "10.77.0.3"),
        "outbound too"
    );
    assert!(net.ping("node", "fd77::2") && !net.ping("node", "fd77::3"));

    // Tenant sub-boundary: only tcp/443 in from the allowed peer, rejecting the rest.
    let sub = BoundaryDoc::from_toml(
        r#"
action = "reject"
[[allow]]
name = "https-in"
peers = ["10.77.0.2/32", "fd77::2/128"]
direction = "in"
protocols = [{ proto = "tcp", ports = [443] }]
"#,
    )
    .unwrap()
    .validate(false)
    .unwrap();
    assert!(leasehold_netpolicy::excess(&sub, &cluster).is_empty());
    net.apply(&nft::ruleset(&cluster, Some(&sub))).unwrap();
    for a in ["10.77.0.1", "fd77::1"] {
        assert_eq!(net.tcp("ok", a, 443), "open", "{a}:443");
        assert_eq!(
            net.tcp("ok", a, 80),
            "refused",
            "reject: the sender is told ({a}:80)"
        );
        assert!(!net.ping("ok", a), "sub-boundary allows only tcp/443 ({a})");
        assert_eq!(
            net.tcp("bad", a, 443),
            "timeout",
            "the landlord's drop still applies ({a})"
        );
    }
    // One direction only: the node may not open connections to the peer.
    assert!(!net.ping("node", "10.77.0.2"));

    // A refused transaction leaves the previous ruleset in force.
    let before = net.ruleset();
    let broken = nft::ruleset(&cluster, Some(&sub)).replace("counter drop", "counter dropp");
    assert!(net.apply(&broken).is_err());
    assert_eq!(net.ruleset(), before);
    assert_eq!(net.tcp("ok", "10.77.0.1", 443), "open");
    assert_eq!(net.tcp("bad", "10.77.0.1", 443), "timeout");
}

fn leasehold_netpolicy_root_check() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        uid, "0",
        "network-namespace tests must run as root (scripts/test and CI do)"
    );
}
