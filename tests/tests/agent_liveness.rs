//! T1: the agent's liveness and its own health checks (issue 16), on the
//! host harness: private bus, real polkitd, agentd --dev on swtpm.
//!
//! The host has no systemd as PID 1, so a datagram socket of the test's own
//! stands in for systemd's (`NOTIFY_SOCKET`, `WATCHDOG_USEC`): READY=1 once
//! the agent serves, WATCHDOG=1 every half of WATCHDOG_USEC, none while the
//! key thread is held by a TPM that does not answer (swtpm SIGSTOPped),
//! pings again once it answers, STOPPING=1 on SIGTERM. The checks: a hung
//! TPM is a `stuck` tpm fault within the deadline; a flushed nftables
//! table (restored by the agent) is a boundary drift warning in the report,
//! in `landlordctl health`'s text and in the metrics.

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use leasehold_tests::matrix::BOUNDARY_DOC;
use leasehold_tests::{sh, Lab, Who};

/// SIGCONTs the process when dropped, so a failed assertion leaves no
/// frozen swtpm behind (the agent could not stop cleanly).
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        sh(&["kill", "-STOP", &pid.to_string()]);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// The next notification, or None when none comes within `within`.
fn next(sock: &UnixDatagram, within: Duration) -> Option<String> {
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => return Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            // A signal (the harness's SIGCHLD handler): wait on.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
}

/// WATCHDOG_USEC the test gives the agent: pings every 1 s.
const WATCHDOG: Duration = Duration::from_secs(2);

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn liveness_ready_watchdog_pings_stop_while_the_key_thread_hangs() {
    let mut lab = Lab::start();
    lab.stop_agent();
    let path = lab.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    lab.agent_env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        ("WATCHDOG_USEC".into(), WATCHDOG.as_micros().to_string()),
    ];
    // The TPM check of a report gives up after 1 s.
    lab.agent_config = Some("[health]\ndeadline_ms = 1000\n".into());
    lab.start_agent();

    // READY=1 first: start_agent saw the name, and READY follows it.
    assert_eq!(
        next(&sock, Duration::from_secs(10)).as_deref(),
        Some("READY=1")
    );
    // Pings every half of WATCHDOG_USEC.
    let mut at = Vec::new();
    while at.len() < 4 {
        let m = next(&sock, WATCHDOG * 2).expect("a watchdog ping within WATCHDOG_USEC");
        assert_eq!(m, "WATCHDOG=1");
        at.push(Instant::now());
    }
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("watchdog ping gaps: {gaps:?}");
    for g in &gaps {
        assert!(
            *g > Duration::from_millis(500) && *g < Duration::from_millis(1800),
            "{gaps:?}"
        );
    }

    // A TPM that does not answer: the report's TPM check holds the key
    // thread. The report still answers, within its deadline, `stuck`.
    let frozen = Frozen::new(lab.swtpm_pid().expect("the dev swtpm runs"));
    let started = Instant::now();
    let r = lab.run(Who::Landlord, "landlordctl", &["health", "--json"]);
    let took = started.elapsed();
    assert_eq!(r.code, 1, "a stuck fault exits 1: {r:?}");
    let rep = r.json();
    let tpm = rep["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "tpm")
        .unwrap_or_else(|| panic!("no tpm check: {rep}"));
    assert_eq!(tpm["status"], "stuck", "{rep}");
    assert!(
        rep["faults"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["source"] == "tpm" && f["severity"] == "stuck"),
        "{rep}"
    );
    assert!(took < Duration::from_secs(5), "report took {took:?}");
    eprintln!("report with a hung TPM answered in {took:?}");

    // The key thread has been held for over a second: no probe can be
    // answered any more. One ping may still be on its way (a probe
    // answered just before); then none for 4 intervals.
    let quiet_from = Instant::now() + Duration::from_millis(1500);
    while let Some(m) = next(&sock, quiet_from.saturating_duration_since(Instant::now())) {
        assert_eq!(m, "WATCHDOG=1");
    }
    let window = Duration::from_secs(4);
    let got = next(&sock, window);
    assert_eq!(got, None, "no ping while the key thread hangs");
    eprintln!("no watchdog ping for {window:?} while swtpm was stopped");

    // The TPM answers again: the key thread finishes, pings resume.
    drop(frozen);
    let resumed = Instant::now();
    assert_eq!(
        next(&sock, Duration::from_secs(10)).as_deref(),
        Some("WATCHDOG=1"),
        "pings resume once the key thread answers"
    );
    eprintln!("pings resumed {:?} after SIGCONT", resumed.elapsed());

    // SIGTERM: STOPPING=1 (after any pings still queued).
    lab.stop_agent();
    let mut rest = Vec::new();
    while let Some(m) = next(&sock, Duration::from_millis(200)) {
        rest.push(m);
    }
    assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");
    assert!(
        rest.iter().all(|m| m == "STOPPING=1" || m == "WATCHDOG=1"),
        "{rest:?}"
    );
}

/// A network namespace of the test's own, removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("lh-{tag}-{}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn source<'a>(r: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    r["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == name)
        .unwrap_or_else(|| panic!("no {name} in {r}"))
}

/// The metrics body, as root over the socket.
fn scrape(socket: &Path) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    body.to_owned()
}

/// A frozen agent (SIGSTOP: the bus takes the calls, nothing answers):
/// every CLI call ends at `--timeout` with exit 1, saying so — a query and
/// a long call alike — and the same calls answer once it runs again.
/// Meanwhile the harness's hang report (what a CLI call that outlives the
/// harness's bound fails with) shows the agent's stopped threads and their
/// stacks.
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn cli_calls_to_a_frozen_agent_end_at_the_timeout() {
    let lab = Lab::start();
    let frozen = Frozen::new(lab.agent_pid().expect("the agent runs"));
    for (who, cli, args, says) in [
        (
            Who::Tenant,
            "tenantctl",
            &["--timeout", "2s", "info"][..],
            "no answer from the agent within --timeout",
        ),
        (
            Who::Landlord,
            "landlordctl",
            &["--timeout", "2s", "--json", "status"][..],
            "no answer from the agent within --timeout",
        ),
        (
            Who::Tenant,
            "tenantctl",
            &["--timeout", "2s", "engine", "ls"][..],
            "no answer from the agent within --timeout",
        ),
        (
            Who::Landlord,
            "landlordctl",
            &["--timeout", "2s", "rekey"][..],
            "timed out after 2s waiting for the node to re-key the landlord keys",
        ),
    ] {
        let r = lab.run(who, cli, args);
        assert_eq!(r.code, 1, "{cli} {args:?}: {r:?}");
        assert!(r.stderr.contains(says), "{cli} {args:?}: {r:?}");
    }
    // What the harness reports when a CLI call outlives its bound: the
    // agent's threads, stopped here, and their stacks, read from the live
    // process.
    let pid = lab.agent_pid().unwrap();
    let report = lab.hang_report();
    assert!(
        report.contains(&format!("agentd (pid {pid}) threads")),
        "{report}"
    );
    assert!(
        report
            .lines()
            .any(|l| l.trim_start().split(' ').nth(1) == Some("keys")
                && l.split(' ').any(|f| f == "T")),
        "the key thread, stopped: {report}"
    );
    assert!(report.contains("swtpm (pid"), "{report}");
    assert!(report.contains("bus: dbus-daemon (pid"), "{report}");
    assert!(
        report.contains("agentd's stacks (gdb)") && report.contains("agentd::keys::"),
        "{report}"
    );
    drop(frozen);
    lab.run(Who::Tenant, "tenantctl", &["--timeout", "30s", "info"])
        .ok();
    lab.run(Who::Landlord, "landlordctl", &["--timeout", "30s", "info"])
        .ok();
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn health_checks_tpm_volume_engines_and_boundary_drift() {
    let ns = Netns::new("hchk");
    let mut lab = Lab::start_in(&ns.0);
    lab.stop_agent();
    let socket = lab.path("metrics.sock");
    // Collected every 2 s: the metrics read the agent's own report.
    lab.agent_config = Some(format!(
        "[health]\ninterval_secs = 2\n[metrics]\nsocket = \"{}\"\n",
        socket.display()
    ));
    lab.start_agent();
    let bdoc = lab.write_file("boundary.toml", BOUNDARY_DOC.as_bytes());
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "set", bdoc.to_str().unwrap()],
    )
    .ok();

    // The agent's checks, healthy: the TPM answers, the boundary is
    // enforced, no volume (none expected), no engines.
    let r = lab
        .run(Who::Landlord, "landlordctl", &["health", "--json"])
        .json();
    for s in ["tpm", "boundary", "volume", "engines"] {
        assert_eq!(source(&r, s)["status"], "ok", "{s}: {r}");
    }
    let item = |r: &serde_json::Value, s: &str| source(r, s)["readings"]["items"][0].clone();
    assert_eq!(item(&r, "tpm")["answered"], true, "{r}");
    let b = item(&r, "boundary");
    assert_eq!(
        (b["stored"].clone(), b["enforced"].clone()),
        (true.into(), true.into()),
        "{r}"
    );
    assert_eq!(b["drifts"], 0, "{r}");
    assert_eq!(item(&r, "volume")["state"], "none", "{r}");
    assert_eq!(item(&r, "volume")["expected"], false, "{r}");
    assert_eq!(item(&r, "engines")["deployed"], 0, "{r}");
    let agent_faults = |r: &serde_json::Value| -> Vec<serde_json::Value> {
        r["faults"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| {
                ["tpm", "boundary", "volume", "engines"].contains(&f["source"].as_str().unwrap())
            })
            .cloned()
            .collect()
    };
    assert_eq!(agent_faults(&r), Vec::<serde_json::Value>::new(), "{r}");

    // Someone flushes the agent's table in its namespace: the agent
    // restores it (BoundaryRestored), and its next periodic report has the
    // drift (FaultsChanged, within the 2 s interval).
    let changed_after = lab.block_on(async {
        let p = leasehold_dbus_api::LandlordProxy::new(lab.conn())
            .await
            .unwrap();
        let h = leasehold_dbus_api::HealthProxy::new(lab.conn())
            .await
            .unwrap();
        let mut sig = p.receive_boundary_restored().await.unwrap();
        let mut changed = h.receive_faults_changed().await.unwrap();
        sh(&["ip", "netns", "exec", &ns.0, "nft", "flush", "ruleset"]);
        tokio::time::timeout(Duration::from_secs(60), sig.next())
            .await
            .expect("BoundaryRestored within 60 s");
        let restored = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let s = changed.next().await.unwrap();
                let a = s.args().unwrap();
                if a.faults().contains("\"boundary\"") {
                    assert_eq!(a.severity(), "warning", "{}", a.faults());
                    return;
                }
            }
        })
        .await
        .expect("FaultsChanged with the drift within 30 s");
        restored.elapsed()
    });
    eprintln!("FaultsChanged {changed_after:?} after BoundaryRestored (interval 2 s)");
    let r = lab
        .run(Who::Landlord, "landlordctl", &["health", "--json"])
        .json();
    let f = agent_faults(&r);
    assert_eq!(f.len(), 1, "{r}");
    assert_eq!(f[0]["source"], "boundary");
    assert_eq!(f[0]["severity"], "warning");
    assert_eq!(f[0]["subject"], "nftables");
    assert!(
        f[0]["message"]
            .as_str()
            .unwrap()
            .contains("behind the agent's back"),
        "{r}"
    );
    assert_eq!(item(&r, "boundary")["drifts"], 1, "{r}");
    assert_eq!(item(&r, "boundary")["enforced"], true, "restored: {r}");
    let t = lab.run(Who::Landlord, "landlordctl", &["health"]);
    assert!(
        t.stdout.contains("enforced, ") && t.stdout.contains("1 drifts since start"),
        "{t:?}"
    );
    assert!(t.stdout.contains("warning   boundary nftables"), "{t:?}");

    // The metrics carry it: the scrape reads the periodic report (or,
    // while one is being taken, a report of its own).
    let body = scrape(&socket);
    assert!(
        body.lines()
            .any(|l| l == "leasehold_health_faults{source=\"boundary\",severity=\"warning\"} 1"),
        "{body}"
    );
    let age: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("leasehold_health_report_age_seconds "))
        .expect("report age")
        .parse()
        .unwrap();
    eprintln!("scraped report age {age} s");
    assert!((0.0..30.0).contains(&age), "{age}");
    assert!(body.contains("leasehold_health_faults{source=\"tpm\",severity=\"stuck\"} 0"));
}
