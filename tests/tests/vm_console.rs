//! T0: the console the VM lab runs on the host (support/console.rs,
//! docs/lab.md "The console") is configured from the shipped files: the
//! scrape config, rules and route with the lab's timings pass `promtool
//! check config` and `amtool check-config`, say what the lab claims, and a
//! shipped file that no longer has a value the lab replaces is an error
//! naming it (never a run with other settings than printed).

#[path = "support/console.rs"]
#[allow(dead_code)]
mod console;

use std::fs;
use std::path::Path;
use std::process::Command;

use leasehold_tests::workspace_root;

fn tool(path: &str, package: &str) -> String {
    assert!(
        Path::new(path).exists(),
        "{path} is not installed: apt-get install {package} (scripts/install-deps)"
    );
    path.to_owned()
}

#[track_caller]
fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn shipped(name: &str) -> String {
    fs::read_to_string(workspace_root().join("dist/prometheus").join(name)).unwrap()
}

#[test]
fn lab_console_configs_pass_promtool_and_amtool() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    let t = &console::LAB_TIMING;
    let token = d.join("token");
    fs::write(&token, "0123456789abcdef0123\n").unwrap();
    let rules = d.join("rules.yml");
    let r = console::rules_yml(&shipped("leasehold-rules.yml"), t).unwrap();
    assert!(
        r.contains("expr: up{job=\"leasehold\"} == 0\n        for: 1s\n"),
        "{r}"
    );
    fs::write(&rules, r).unwrap();
    let p = console::prometheus_yml(
        &shipped("leasehold.yml"),
        "127.0.0.1:40000",
        &token,
        &rules,
        "127.0.0.1:40001",
        t,
    )
    .unwrap();
    for want in [
        "  scrape_interval: 1s\n  evaluation_interval: 1s\n",
        "    scrape_interval: 1s\n    scrape_timeout: 1s\n",
        "- 127.0.0.1:40000\n        labels:\n          instance: lab-node1:9464\n",
        "targets: [\"127.0.0.1:40001\"]",
    ] {
        assert!(p.contains(want), "{want:?} not in:\n{p}");
    }
    assert!(
        p.contains(&format!("credentials_file: {}", token.display())),
        "{p}"
    );
    fs::write(d.join("prometheus.yml"), &p).unwrap();
    run_ok(
        Command::new(tool("/usr/bin/promtool", "prometheus"))
            .args(["check", "config"])
            .arg(d.join("prometheus.yml")),
    );
    let a = console::alertmanager_yml(&shipped("alertmanager.yml"), "127.0.0.1:40002", &token, t)
        .unwrap();
    for want in [
        "url: http://127.0.0.1:40002/alerts",
        "group_wait: 0s",
        "group_interval: 1s",
        "repeat_interval: 2s",
    ] {
        assert!(a.contains(want), "{want:?} not in:\n{a}");
    }
    fs::write(d.join("alertmanager.yml"), &a).unwrap();
    run_ok(
        Command::new(tool("/usr/bin/amtool", "prometheus-alertmanager"))
            .arg("check-config")
            .arg(d.join("alertmanager.yml")),
    );
}

#[test]
fn a_shipped_file_without_the_value_replaced_is_named() {
    let t = &console::LAB_TIMING;
    let e = console::rules_yml("groups: []\n", t).unwrap_err();
    assert!(
        e.contains("dist/prometheus/leasehold-rules.yml") && e.contains("for: 1m"),
        "{e}"
    );
    let changed = shipped("leasehold.yml").replace("scrape_timeout: 25s", "scrape_timeout: 20s");
    let p = Path::new("/t");
    let e = console::prometheus_yml(&changed, "h:1", p, p, "h:2", t).unwrap_err();
    assert!(
        e.contains("dist/prometheus/leasehold.yml") && e.contains("scrape_timeout: 25s"),
        "{e}"
    );
    let e = console::alertmanager_yml("route: {}\n", "h:1", p, t).unwrap_err();
    assert!(e.contains("dist/prometheus/alertmanager.yml"), "{e}");
}

/// A stand-in for the node's metrics endpoint on the host: answers every
/// request with the drift counter until stopped (then the port refuses,
/// like a killed QEMU's forward).
struct FakeNode {
    port: u16,
    drifts: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeNode {
    fn start() -> FakeNode {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let drifts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, s) = (drifts.clone(), stop.clone());
        std::thread::spawn(move || {
            // The listener is closed when this thread ends.
            while !s.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        let _ = c.read(&mut buf);
                        let body = format!(
                            "leasehold_boundary_drifts_total {}\nleasehold_boundary_enforced 1\n",
                            d.load(Ordering::SeqCst)
                        );
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        FakeNode { port, drifts, stop }
    }
}

/// The console of the VM lab on the host, against a stand-in node: the
/// lab's drift alert reaches `act` as a notification, and a node that
/// stops answering reaches it as `LeaseholdNodeDown` within 5 s (the VM
/// lab's `node-down` asserts the same against a killed QEMU, under TCG).
#[test]
#[ignore = "needs the workspace's binaries (cargo build --workspace --bins) and the prometheus packages; scripts/test runs it"]
fn lab_console_on_the_host_times_node_down() {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};
    let node = FakeNode::start();
    let mut c = console::Console::start(
        &format!("127.0.0.1:{}", node.port),
        "0123456789abcdef0123",
        // act never reaches it: no alert here maps to an action on the node.
        "ll@127.0.0.1:1",
        "ssh",
        &leasehold_tests::bin("landlordctl"),
    );
    let up = format!("up{{job=\"leasehold\",instance=\"{}\"}}", console::INSTANCE);
    c.wait_value(60, &up, |v| v == Some(1.0));
    c.wait_value(60, "leasehold_boundary_drifts_total", |v| v == Some(0.0));
    let t0 = Instant::now();
    node.drifts.store(1, Ordering::SeqCst);
    let n = c.act_wait(60, "the lab's drift alert", |v| {
        v["event"] == "decided" && v["alertname"] == console::LAB_DRIFT_ALERT
    });
    assert_eq!(n["action"], "notify", "{n}");
    assert_eq!(n["instance"], console::INSTANCE, "{n}");
    eprintln!("drift -> act: {} ms", t0.elapsed().as_millis());
    let killed = Instant::now();
    node.stop.store(true, Ordering::SeqCst);
    let d = c.act_wait(60, "node down", |v| {
        v["event"] == "decided" && v["alertname"] == "LeaseholdNodeDown"
    });
    let t = killed.elapsed();
    eprintln!("endpoint closed -> node down at act: {} ms", t.as_millis());
    assert_eq!(d["action"], "notify", "{d}");
    assert!(t <= Duration::from_secs(5), "{} ms", t.as_millis());
}
