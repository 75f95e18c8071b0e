//! Issue 16, metrics, on the host harness (T1: real bus, polkitd with the
//! shipped policy, agentd --dev on swtpm, the CLIs and curl as the test
//! users): agentd with `[metrics] socket` serves the Prometheus text format
//! on a unix socket only root and `leasehold-landlord` can read; D-Bus call
//! counters move after a landlord call and a refused tenant call; the
//! tenant's name never appears. With `prometheus` installed (Debian package,
//! scripts/install-deps), a real Prometheus scrapes the TCP endpoint with
//! the bearer token and its API answers a query for one metric.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use leasehold_tests::{Lab, LabOptions, Who};

/// The response's body, as root over the socket.
fn scrape(socket: &Path) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// The value of the sample whose line starts with `series` (exact labels).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

const NODE_INFO_OK: &str = "leasehold_dbus_calls_total{interface=\"org.leasehold.Landlord1\",method=\"NodeInfo\",outcome=\"authorized\"}";
const NODE_INFO_DENIED: &str = "leasehold_dbus_calls_total{interface=\"org.leasehold.Landlord1\",method=\"NodeInfo\",outcome=\"denied\"}";

/// curl as `who` on the socket: (exit code, HTTP status or "000").
fn curl_as(lab: &Lab, who: Who, socket: &Path) -> (i32, String) {
    let out = lab
        .command(who, Path::new("/usr/bin/curl"))
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(socket)
        .arg("http://localhost/metrics")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn metrics_socket_landlord_only_counters_move_no_tenant_data() {
    let dir = tempfile::Builder::new()
        .prefix("lh-metrics-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("run/metrics.sock");
    let lab = Lab::start_with_options(LabOptions {
        agent_config: Some(format!(
            "{}[metrics]\nsocket = \"{}\"\n",
            leasehold_tests::PATIENT_AUTH_CONFIG,
            socket.display()
        )),
        ..LabOptions::default()
    });
    let meta = fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let before = scrape(&socket);
    assert_eq!(value(&before, "leasehold_assigned"), 0.0);
    assert_eq!(value(&before, "leasehold_landlord_key_generation"), 1.0);
    assert_eq!(
        value(&before, "leasehold_volume_state{state=\"none\"}"),
        1.0
    );
    assert_eq!(value(&before, "leasehold_engines{state=\"ready\"}"), 0.0);

    lab.run(
        Who::Landlord,
        "landlordctl",
        &["--yes", "assign", "acme-private-co"],
    )
    .ok();
    lab.run(Who::Landlord, "landlordctl", &["status"]).ok();
    let refused = lab.run(Who::Tenant, "landlordctl", &["status"]);
    assert_ne!(refused.code, 0, "{refused:?}");

    let t0 = Instant::now();
    let after = scrape(&socket);
    eprintln!(
        "scrape: {:?}, {} bytes, {} samples",
        t0.elapsed(),
        after.len(),
        after.lines().filter(|l| !l.starts_with('#')).count()
    );
    assert!(
        value(&after, NODE_INFO_OK) >= 1.0 + after_or_zero(&before, NODE_INFO_OK),
        "{after}"
    );
    assert!(value(&after, NODE_INFO_DENIED) >= 1.0, "{after}");
    assert!(
        value(
            &after,
            "leasehold_dbus_call_duration_seconds_count{interface=\"org.leasehold.Landlord1\",method=\"NodeInfo\"}"
        ) >= 2.0,
        "{after}"
    );
    assert_eq!(value(&after, "leasehold_assigned"), 1.0);
    assert_eq!(value(&after, "leasehold_tenant_key_generation"), 1.0);
    // The heartbeat: the first periodic TPM check went through the key
    // thread before the assign's key work (it is queued first at start).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let beat = value(&after, "leasehold_heartbeat_timestamp_seconds");
    assert!(beat <= now + 1.0 && now - beat < 300.0, "{beat} vs {now}");
    assert_eq!(value(&after, "leasehold_heartbeat_interval_seconds"), 30.0);
    assert!(
        !after.contains("acme"),
        "the tenant's name leaked:\n{after}"
    );

    // What a scrape costs the agent (CPU time from /proc, in clock ticks).
    let cpu = || {
        let stat = fs::read_to_string(format!("/proc/{}/stat", lab.agent_pid().unwrap())).unwrap();
        let f: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
            .split(' ')
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let (ticks, t0) = (cpu(), Instant::now());
    const N: u64 = 50;
    for _ in 0..N {
        scrape(&socket);
    }
    eprintln!(
        "{N} scrapes in {:?}: agent CPU {:.1} ms per scrape",
        t0.elapsed(),
        (cpu() - ticks) as f64 * 10.0 / N as f64
    );

    // Permissions: the landlord reads it; the tenant and an outsider cannot
    // even connect (curl exit 7).
    assert_eq!(curl_as(&lab, Who::Landlord, &socket), (0, "200".into()));
    for who in [Who::Tenant, Who::Outsider] {
        let (code, status) = curl_as(&lab, who, &socket);
        assert!(code == 7 && status == "000", "{who:?}: {code} {status}");
    }

    // Bad requests get a status, and the endpoint keeps serving.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(b"POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(&vec![b'A'; 10_000]).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    scrape(&socket);
}

fn after_or_zero(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// Runs `cmd` in the agent's network namespace.
fn in_agent_netns(lab: &Lab, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/proc/{}/ns/net", lab.agent_pid().unwrap()))
        .arg(program);
    c
}

#[test]
#[ignore = "needs root: the harness Lab, and the prometheus package"]
fn metrics_real_prometheus_scrapes_with_the_token() {
    let Some(prom) = ["/usr/bin/prometheus"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        panic!("prometheus is not installed: apt-get install prometheus (scripts/install-deps)");
    };
    let dir = tempfile::Builder::new()
        .prefix("lh-prom-")
        .tempdir()
        .unwrap();
    let token = dir.path().join("token");
    fs::write(&token, "lab-token-0123456789abcdef\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o640)).unwrap();
    let lab = Lab::start_with_options(LabOptions {
        agent_config: Some(format!(
            "[metrics]\nlisten = \"127.0.0.1:9464\"\ntoken_file = \"{}\"\n",
            token.display()
        )),
        ..LabOptions::default()
    });
    // Without the token: 401.
    let out = in_agent_netns(&lab, "curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:9464/metrics",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");

    // The shipped scrape config, pointed at the lab's agent.
    let shipped =
        fs::read_to_string(leasehold_tests::workspace_root().join("dist/prometheus/leasehold.yml"))
            .unwrap();
    let conf = shipped
        .replace("/etc/prometheus/leasehold.token", token.to_str().unwrap())
        .replace("scrape_interval: 30s", "scrape_interval: 1s")
        .replace("scrape_timeout: 25s", "scrape_timeout: 1s")
        .replace("node1.example:9464", "127.0.0.1:9464");
    fs::write(dir.path().join("prometheus.yml"), conf).unwrap();
    let mut p = in_agent_netns(&lab, prom)
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:9090")
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    // Prometheus has no readiness event to wait on here: poll its API, bounded.
    let started = Instant::now();
    let (found, last) = loop {
        let out = in_agent_netns(&lab, "curl")
            .args([
                "-s",
                "http://127.0.0.1:9090/api/v1/query?query=leasehold_landlord_key_generation",
            ])
            .output()
            .unwrap();
        let last = String::from_utf8_lossy(&out.stdout).into_owned();
        if last.contains("\"value\":[") {
            break (true, last);
        }
        if started.elapsed() > Duration::from_secs(60) {
            break (false, last);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = p.kill();
    let _ = p.wait();
    assert!(
        found,
        "prometheus never had the metric: {last}\n{}",
        fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
    assert!(last.contains("\"job\":\"leasehold\""), "{last}");
    assert!(last.contains(",\"1\"]"), "generation 1: {last}");
}

/// Idle TCP connections (any local user can open them, from any 127.x
/// address) never keep a scrape with the token out: a connection takes a
/// serving slot only once it has shown the token, and past 64 waiting the
/// oldest is ended. Before (review), 2 idle connections from 127.0.0.1
/// filled that address's share and every scrape through the console's SSH
/// tunnel got 503: the console saw the node down.
#[test]
#[ignore = "needs root: the harness Lab"]
fn metrics_idle_connections_do_not_keep_the_scrape_out() {
    let dir = tempfile::Builder::new()
        .prefix("lh-idle-")
        .tempdir()
        .unwrap();
    let token = dir.path().join("token");
    fs::write(&token, "lab-token-0123456789abcdef\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o640)).unwrap();
    let lab = Lab::start_with_options(LabOptions {
        agent_config: Some(format!(
            "[metrics]\nlisten = \"127.0.0.1:9464\"\ntoken_file = \"{}\"\n",
            token.display()
        )),
        ..LabOptions::default()
    });
    // From a thread moved into the agent's network namespace (setns is
    // per thread); the sockets stay usable from here. 80 idle ones.
    let ns = fs::File::open(format!("/proc/{}/ns/net", lab.agent_pid().unwrap())).unwrap();
    let idle: Vec<std::net::TcpStream> = std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        (0..80)
            .map(|_| std::net::TcpStream::connect("127.0.0.1:9464").unwrap())
            .collect()
    })
    .join()
    .unwrap();
    let scrape = || {
        let out = in_agent_netns(&lab, "curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Authorization: Bearer lab-token-0123456789abcdef",
                "http://127.0.0.1:9464/metrics",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for i in 0..3 {
        assert_eq!(scrape(), "200", "scrape {i} with 80 idle connections open");
    }
    drop(idle);
}

/// A network namespace of the test's own, removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("lh-{tag}-{}", std::process::id());
        leasehold_tests::sh(&["ip", "netns", "add", &name]);
        leasehold_tests::sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

/// A fixture sysfs tree (one memory controller with errors, a hwmon chip,
/// a thermal zone, a disk with I/O errors) and a fake smartctl that passes
/// the disk at 33 °C.
fn sensor_fixture(dir: &Path) {
    let sys = dir.join("sys");
    put(&sys, "devices/system/edac/mc/mc0/ce_count", "5\n");
    put(&sys, "devices/system/edac/mc/mc0/ue_count", "0\n");
    put(&sys, "class/hwmon/hwmon0/name", "coretemp\n");
    put(&sys, "class/hwmon/hwmon0/temp1_input", "41500\n");
    put(&sys, "class/hwmon/hwmon0/temp1_label", "Package id 0\n");
    put(&sys, "class/hwmon/hwmon0/temp1_crit", "100000\n");
    put(&sys, "class/thermal/thermal_zone0/type", "acpitz\n");
    put(&sys, "class/thermal/thermal_zone0/temp", "40000\n");
    put(&sys, "block/sda/device/ioerr_cnt", "0x2\n");
    let script = dir.join("smartctl");
    fs::write(
        &script,
        "#!/bin/sh\necho '{\"smartctl\":{\"exit_status\":0},\"smart_status\":{\"passed\":true},\"temperature\":{\"current\":33}}'\n",
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A cluster boundary that allows one address the test never uses: what
/// the peer sends, and what the node sends to it, is denied.
fn deny_doc(action: &str) -> String {
    format!("action = \"{action}\"\n[[allow]]\nname = \"other\"\npeers = [\"10.9.9.9\"]\n")
}

const DENIED_IN: &str = "leasehold_boundary_denied_packets_total{class=\"landlord_in\"}";
const DENIED_IN_BYTES: &str = "leasehold_boundary_denied_bytes_total{class=\"landlord_in\"}";
const DENIED_OUT: &str = "leasehold_boundary_denied_packets_total{class=\"landlord_out\"}";

/// `n` pings from `ns` (`ip netns exec`) to `addr`, each given 0.3 s:
/// they are denied, so none is answered.
fn pings(ns: &str, addr: &str, n: u32) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c", &n.to_string()])
        .args(["-i", "0.2", "-W", "0.3", addr])
        .output()
        .unwrap();
    assert!(!out.status.success(), "answered: {out:?}");
}

/// Sensors from a fixture sysfs and the boundary's deny counters, read by
/// the agent and scraped by a real Prometheus; denied packets in a network
/// namespace move the counters, which survive a full re-apply of the table.
#[test]
#[ignore = "needs root: the harness Lab, network namespaces and the prometheus package"]
fn metrics_sensors_and_deny_counters_scraped_by_prometheus() {
    let prom = Path::new("/usr/bin/prometheus");
    assert!(
        prom.exists(),
        "prometheus is not installed: apt-get install prometheus (scripts/install-deps)"
    );
    let dir = tempfile::Builder::new()
        .prefix("lh-promsens-")
        .tempdir()
        .unwrap();
    sensor_fixture(dir.path());
    let token = dir.path().join("token");
    fs::write(&token, "lab-token-0123456789abcdef\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o640)).unwrap();
    let node = Netns::new("msn");
    let peer = Netns::new("msp");
    let lab = Lab::start_in_with_options(
        &node.0,
        LabOptions {
            agent_config: Some(format!(
                "[health]\ninterval_secs = 2\nsys_root = \"{}\"\nsmartctl = \"{}\"\n\
                 [metrics]\nsocket = \"{}\"\nlisten = \"127.0.0.1:9464\"\ntoken_file = \"{}\"\n",
                dir.path().join("sys").display(),
                dir.path().join("smartctl").display(),
                dir.path().join("m.sock").display(),
                token.display()
            )),
            ..LabOptions::default()
        },
    );
    let socket = dir.path().join("m.sock");
    // A veth pair: the node's end 10.78.0.1, the peer's 10.78.0.2.
    leasehold_tests::sh(&[
        "ip", "-n", &node.0, "link", "add", "lhm0", "type", "veth", "peer", "name", "lhm1",
        "netns", &peer.0,
    ]);
    for (ns, dev, addr) in [
        (&node.0, "lhm0", "10.78.0.1/24"),
        (&peer.0, "lhm1", "10.78.0.2/24"),
    ] {
        // No IPv6 on the link: its MLD reports and router solicitations
        // would be denied too, and counted.
        leasehold_tests::sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{dev}.disable_ipv6=1"),
        ]);
        leasehold_tests::sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
        leasehold_tests::sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }

    // No boundary yet: every class listed, at 0.
    let body = scrape(&socket);
    assert_eq!(value(&body, DENIED_IN), 0.0, "{body}");
    assert_eq!(
        value(
            &body,
            "leasehold_boundary_denied_packets_total{class=\"engines_out\"}"
        ),
        0.0
    );
    // The sensors, with the kernel's names.
    for (series, want) in [
        (
            "leasehold_hwmon_temperature_celsius{chip=\"coretemp\",sensor=\"hwmon0/temp1\",label=\"Package id 0\"}",
            41.5,
        ),
        (
            "leasehold_hwmon_temperature_crit_celsius{chip=\"coretemp\",sensor=\"hwmon0/temp1\",label=\"Package id 0\"}",
            100.0,
        ),
        (
            "leasehold_thermal_zone_temperature_celsius{zone=\"thermal_zone0\",type=\"acpitz\"}",
            40.0,
        ),
        ("leasehold_edac_corrected_errors_total{mc=\"mc0\"}", 5.0),
        ("leasehold_edac_uncorrected_errors_total{mc=\"mc0\"}", 0.0),
        ("leasehold_disk_io_errors_total{disk=\"sda\"}", 2.0),
        ("leasehold_disk_smart_state{disk=\"sda\",state=\"passed\"}", 1.0),
        ("leasehold_disk_smart_state{disk=\"sda\",state=\"failed\"}", 0.0),
        ("leasehold_disk_temperature_celsius{disk=\"sda\"}", 33.0),
    ] {
        assert_eq!(value(&body, series), want, "{series}");
    }

    // The boundary: the peer's pings are dropped on input, the node's on
    // output; each denied packet counts once, in its class.
    let doc = lab.write_file("deny.toml", deny_doc("drop").as_bytes());
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "set", doc.to_str().unwrap()],
    )
    .ok();
    pings(&peer.0, "10.78.0.1", 3);
    pings(&node.0, "10.78.0.2", 2);
    let body = scrape(&socket);
    assert_eq!(value(&body, DENIED_IN), 3.0, "{body}");
    // 84 bytes: an echo request of ping's default 56-byte payload.
    assert_eq!(value(&body, DENIED_IN_BYTES), 3.0 * 84.0, "{body}");
    assert_eq!(value(&body, DENIED_OUT), 2.0, "{body}");
    assert_eq!(
        value(
            &body,
            "leasehold_boundary_denied_packets_total{class=\"tenant_in\"}"
        ),
        0.0
    );

    // Reject instead of drop: other chains, so the whole table is replaced
    // (deleted and re-created): the counts so far are carried.
    let doc = lab.write_file("reject.toml", deny_doc("reject").as_bytes());
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "set", doc.to_str().unwrap()],
    )
    .ok();
    let body = scrape(&socket);
    assert_eq!(value(&body, DENIED_IN), 3.0, "carried: {body}");
    pings(&peer.0, "10.78.0.1", 2);
    let body = scrape(&socket);
    assert_eq!(value(&body, DENIED_IN), 5.0, "{body}");

    // A real Prometheus scrapes it all with the shipped config.
    let shipped =
        fs::read_to_string(leasehold_tests::workspace_root().join("dist/prometheus/leasehold.yml"))
            .unwrap();
    let conf = shipped
        .replace("/etc/prometheus/leasehold.token", token.to_str().unwrap())
        .replace("scrape_interval: 30s", "scrape_interval: 1s")
        .replace("scrape_timeout: 25s", "scrape_timeout: 1s")
        .replace("node1.example:9464", "127.0.0.1:9464");
    fs::write(dir.path().join("prometheus.yml"), conf).unwrap();
    let mut p = in_agent_netns(&lab, prom.to_str().unwrap())
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:9090")
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let query = |q: &str| -> String {
        let out = in_agent_netns(&lab, "curl")
            .args(["-s", "-G", "http://127.0.0.1:9090/api/v1/query"])
            .args(["--data-urlencode", &format!("query={q}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Prometheus has no readiness event to wait on here: poll its API, bounded.
    let started = Instant::now();
    let checks = [
        (
            "leasehold_boundary_denied_packets_total{class=\"landlord_in\"}",
            "\"5\"]",
        ),
        (
            "leasehold_boundary_denied_packets_total{class=\"landlord_out\"}",
            "\"2\"]",
        ),
        (
            "leasehold_hwmon_temperature_celsius{chip=\"coretemp\"}",
            "\"41.5\"]",
        ),
        (
            "leasehold_disk_smart_state{disk=\"sda\",state=\"passed\"}",
            "\"1\"]",
        ),
        (
            "leasehold_edac_corrected_errors_total{mc=\"mc0\"}",
            "\"5\"]",
        ),
        (
            "leasehold_thermal_zone_temperature_celsius{type=\"acpitz\"}",
            "\"40\"]",
        ),
    ];
    let (ok, answers) = loop {
        let answers: Vec<String> = checks.iter().map(|(q, _)| query(q)).collect();
        if checks
            .iter()
            .zip(&answers)
            .all(|((_, want), got)| got.contains(want) && got.contains("\"job\":\"leasehold\""))
        {
            break (true, answers);
        }
        if started.elapsed() > Duration::from_secs(60) {
            break (false, answers);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = p.kill();
    let _ = p.wait();
    assert!(
        ok,
        "prometheus answers: {answers:#?}\n{}",
        fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
}
