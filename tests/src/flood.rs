//! Landlord and tenant calls measured while an outsider floods the agent
//! (`lh-dbus-probe flood`): shared by the host test and the latency bench.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;

use crate::{bin, Lab, Who};

/// Shape of the outsider's flood.
#[derive(Debug, Clone, Copy)]
pub struct Flood {
    /// Connections the outsider opens.
    pub conns: usize,
    /// Concurrent calls per connection in each wave.
    pub per_conn: usize,
    /// Size of each big message (two in flight all the time), MiB.
    pub big_mib: usize,
}

impl Flood {
    /// 2,000 concurrent calls from 40 connections, plus 8 MiB messages.
    pub const DEFAULT: Flood = Flood {
        conns: 40,
        per_conn: 50,
        big_mib: 8,
    };
}

/// What one run measured.
#[derive(Debug)]
pub struct FloodRun {
    /// `lh-dbus-probe bench` JSON of the landlord's calls.
    pub landlord: serde_json::Value,
    /// The same for the tenant's calls (none when the tenant floods: its
    /// own calls share its in-flight bound).
    pub tenant: Option<serde_json::Value>,
    /// The parts of a landlord call timed alone by other landlord clients
    /// at the same time: the bus's own round trip (GetId), the agent's
    /// connection without polkit (Peer.Ping), polkit's CheckAuthorization.
    pub floors: Vec<(&'static str, serde_json::Value)>,
    /// The flood's own report: waves, outcome counts.
    pub flood: serde_json::Value,
    /// agentd's resident set before and at the end of the flood, KiB.
    pub agent_rss_kib: (u64, u64),
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `calls` sequential NodeInfo calls as the landlord and, at the same
/// time, as the tenant, while the outsider floods. The node must be
/// assigned (the tenant's NodeInfo needs a tenant).
pub fn during_outsider_flood(lab: &Lab, calls: usize, flood: Flood) -> FloodRun {
    during_flood(lab, Who::Outsider, calls, flood)
}

/// Like [`during_outsider_flood`], with `flooder` flooding (the tenant's
/// calls are measured only when someone else floods).
pub fn during_flood(lab: &Lab, flooder: Who, calls: usize, flood: Flood) -> FloodRun {
    let pid = lab.agent_pid().expect("agent running");
    let before = rss_kib(pid);
    let mut f = lab
        .command(flooder, &bin("lh-dbus-probe"))
        .args([
            "flood",
            &flood.conns.to_string(),
            &flood.per_conn.to_string(),
            &flood.big_mib.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(f.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    // The first wave is on its way: the flood's readiness event.
    assert_eq!(line.trim(), "READY", "flood did not start");
    let n = calls.to_string();
    let (landlord, tenant, floors) = std::thread::scope(|s| {
        let l = s.spawn(|| lab.run(Who::Landlord, "lh-dbus-probe", &["bench", &n, "1"]));
        let t = (flooder != Who::Tenant).then(|| {
            s.spawn(|| lab.run(Who::Tenant, "lh-dbus-probe", &["bench", &n, "1", "tenant"]))
        });
        let floors: Vec<_> = [
            (
                "landlord NodeInfo, a new connection per call (one CLI run each)",
                "landlord-fresh",
            ),
            ("bus round trip (GetId)", "bus"),
            ("agent round trip, no polkit (Peer.Ping)", "ping"),
            ("polkit CheckAuthorization alone", "polkit"),
        ]
        .into_iter()
        .map(|(label, target)| {
            let n = &n;
            (
                label,
                s.spawn(move || {
                    lab.run(Who::Landlord, "lh-dbus-probe", &["bench", n, "1", target])
                }),
            )
        })
        .collect();
        (
            l.join().unwrap().ok().json(),
            t.map(|t| t.join().unwrap().ok().json()),
            floors
                .into_iter()
                .map(|(label, h)| (label, h.join().unwrap().ok().json()))
                .collect(),
        )
    });
    let after = rss_kib(pid);
    // Closing stdin ends the flood; it then reports.
    let mut stdin = f.stdin.take().unwrap();
    stdin.flush().unwrap();
    drop(stdin);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let st = f.wait().unwrap();
    assert!(st.success(), "flood exited with {st}: {rest}");
    FloodRun {
        landlord,
        tenant,
        floors,
        flood: serde_json::from_str(rest.trim())
            .unwrap_or_else(|e| panic!("flood report not JSON ({e}): {rest}")),
        agent_rss_kib: (before, after),
    }
}
