//! T1: a real Alertmanager (Debian package prometheus-alertmanager,
//! scripts/install-deps) with the shipped route sends its webhook to
//! `landlordctl act`, which acts on the lab's node over SSH + D-Bus
//! (sshd on loopback, like `--host`): a reboot reaches logind once however
//! often Alertmanager repeats the alert, and not again after `act`
//! restarts; a second disruptive alert on the same node is held by the
//! node's rate limit; an unmapped alert is a notification; `--dry-run`
//! records the reboot it would make and makes none.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use leasehold_tests::json_doc::JsonDoc;
use leasehold_tests::{bin, workspace_root, Lab, Ssh, Who};

const AM: &str = "/usr/bin/prometheus-alertmanager";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `landlordctl --json act`, its record lines read as they come.
struct Act {
    child: Child,
    lines: mpsc::Receiver<Result<serde_json::Value, String>>,
    seen: Vec<serde_json::Value>,
}

impl Act {
    fn start(lab: &Lab, ssh: &Ssh, listen: &str, inventory: &Path, dry_run: bool) -> Act {
        let mut cmd = lab.command(Who::Root, &bin("landlordctl"));
        // The node is reached over SSH only: no local bus.
        cmd.env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            "unix:path=/nonexistent/leasehold-bus",
        )
        .env("LEASEHOLD_SSH", &ssh.command)
        .args(["--json", "act", "--listen", listen, "--inventory"])
        .arg(inventory)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        if dry_run {
            cmd.arg("--dry-run");
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let doc = JsonDoc::load();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // Every record has the shape docs/json.md gives.
                let v = serde_json::from_str::<serde_json::Value>(&line)
                    .map_err(|e| format!("not JSON ({e})"))
                    .and_then(|v| doc.check_command("landlordctl act", &v).map(|()| v))
                    .map_err(|e| format!("{e}: {line}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let mut act = Act {
            child,
            lines: rx,
            seen: Vec::new(),
        };
        act.wait_for("listening", |v| v["event"] == "listening");
        act
    }

    /// The next record matching `pred` (records before it are kept in
    /// `seen`); panics after 60 s, printing what came.
    #[track_caller]
    fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Err(e)) => panic!("act printed a bad record: {e}"),
                Ok(Ok(v)) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!("act never printed {what}; it printed {:#?}", self.seen),
            }
        }
    }

    fn stop(mut self) -> Vec<serde_json::Value> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "act exited {st} on SIGTERM");
        for v in self.lines.try_iter() {
            self.seen
                .push(v.unwrap_or_else(|e| panic!("act printed a bad record: {e}")));
        }
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Act {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is(v: &serde_json::Value, event: &str, alertname: &str) -> bool {
    v["event"] == event && v["alertname"] == alertname
}

fn post_alert(am_port: u16, alertname: &str) {
    let body = serde_json::json!([{
        "labels": {"alertname": alertname, "instance": "lab-node:9464", "job": "leasehold", "severity": "critical"},
        "annotations": {"summary": format!("{alertname} on the lab node")},
    }]);
    // curl retries while Alertmanager is still starting (connection refused).
    let out = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "--retry",
            "30",
            "--retry-connrefused",
            "--retry-max-time",
            "60",
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(body.to_string())
        .arg(format!("http://127.0.0.1:{am_port}/api/v2/alerts"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "posting {alertname}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs root: the harness Lab with sshd, and the prometheus-alertmanager package"]
fn act_alertmanager_webhook_reboots_once_over_ssh() {
    assert!(
        Path::new(AM).exists(),
        "prometheus-alertmanager is not installed: apt-get install prometheus-alertmanager (scripts/install-deps)"
    );
    let mut lab = Lab::start();
    let ssh = lab.start_sshd(&[Who::Landlord]);
    let dir = tempfile::Builder::new()
        .prefix("lh-act-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let token = d.join("token");
    fs::write(&token, "act-token-0123456789abcdef\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let state = d.join("act-state.json");
    let inventory = d.join("act.toml");
    fs::write(
        &inventory,
        format!(
            r#"token_file = "{token}"
state_file = "{state}"
[limits]
node_burst = 1
node_refill_secs = 3600
[[node]]
name = "lab"
instance = "lab-node:9464"
host = "lhtest-landlord@127.0.0.1:{port}"
[[rule]]
alertname = "LeaseholdMemoryUncorrected"
action = "reboot"
[[rule]]
alertname = "LeaseholdThermalCritical"
action = "poweroff"
"#,
            token = token.display(),
            state = state.display(),
            port = ssh.port
        ),
    )
    .unwrap();

    // The shipped route, pointed at this act, with the lab's token, and
    // repeats every second so the test sees several of them.
    let act_port = free_port();
    let listen = format!("127.0.0.1:{act_port}");
    let shipped =
        fs::read_to_string(workspace_root().join("dist/prometheus/alertmanager.yml")).unwrap();
    let conf = shipped
        .replace("127.0.0.1:9465", &listen)
        .replace(
            "/etc/prometheus/leasehold-act.token",
            token.to_str().unwrap(),
        )
        .replace("group_wait: 10s", "group_wait: 0s")
        .replace("group_interval: 1m", "group_interval: 1s")
        .replace("repeat_interval: 1h", "repeat_interval: 1s");
    assert!(conf.contains(&listen) && conf.contains("repeat_interval: 1s"));
    fs::write(d.join("alertmanager.yml"), conf).unwrap();

    let mut act = Act::start(&lab, &ssh, &listen, &inventory, false);
    let am_port = free_port();
    let mut am = Command::new(AM)
        .arg(format!(
            "--config.file={}",
            d.join("alertmanager.yml").display()
        ))
        .arg(format!("--storage.path={}", d.join("am-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
        // No gossip port: one Alertmanager, and other tests on this machine.
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(fs::File::create(d.join("alertmanager.log")).unwrap())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _am = Kill(&mut am);

    // 1. Uncorrected memory errors: one reboot, through SSH, D-Bus,
    //    polkit (the landlord) and the agent, to the lab's logind.
    let posted = Instant::now();
    post_alert(am_port, "LeaseholdMemoryUncorrected");
    let decided = act.wait_for("the reboot decided", |v| {
        is(v, "decided", "LeaseholdMemoryUncorrected")
    });
    assert_eq!(decided["decision"], "acted", "{decided}");
    assert_eq!(decided["node"], "lab");
    assert_eq!(decided["action"], "reboot");
    let done = act.wait_for("the reboot done", |v| {
        is(v, "done", "LeaseholdMemoryUncorrected")
    });
    assert_eq!(done["result"], "ok", "{done}");
    eprintln!(
        "alert posted to Alertmanager -> reboot done on the node: {} ms",
        posted.elapsed().as_millis()
    );
    let fingerprint = decided["fingerprint"].clone();
    // Alertmanager repeats the alert (repeat_interval 1s): acted on once.
    for _ in 0..2 {
        let again = act.wait_for("a repeat of the reboot alert", |v| {
            is(v, "decided", "LeaseholdMemoryUncorrected")
        });
        assert_eq!(again["decision"], "already-acted", "{again}");
        assert_eq!(again["fingerprint"], fingerprint);
    }
    assert_eq!(lab.power.take(), ["reboot"]);

    // 2. A second disruptive alert on the same node within the hour: the
    //    node's bucket is empty, so no power-off (however often repeated).
    post_alert(am_port, "LeaseholdThermalCritical");
    for _ in 0..2 {
        let held = act.wait_for("the power-off held", |v| {
            is(v, "decided", "LeaseholdThermalCritical")
        });
        assert_eq!(held["decision"], "rate-limited", "{held}");
        assert_eq!(held["limit"], "node");
    }

    // 3. An alert with no rule: a notification (no token, no node call).
    post_alert(am_port, "LeaseholdDiskIoErrors");
    let n = act.wait_for("the notification", |v| {
        is(v, "decided", "LeaseholdDiskIoErrors")
    });
    assert_eq!(n["decision"], "acted", "{n}");
    assert_eq!(n["action"], "notify");
    let n = act.wait_for("the notification done", |v| {
        is(v, "done", "LeaseholdDiskIoErrors")
    });
    assert_eq!(n["result"], "ok");
    let seen = act.stop();
    assert!(
        !seen
            .iter()
            .any(|v| v["event"] == "done" && v["action"] == "poweroff"),
        "{seen:#?}"
    );

    // 4. act restarts: the state file remembers the reboot.
    let mut act = Act::start(&lab, &ssh, &listen, &inventory, false);
    let again = act.wait_for("a repeat after the restart", |v| {
        is(v, "decided", "LeaseholdMemoryUncorrected")
    });
    assert_eq!(again["decision"], "already-acted", "{again}");
    act.stop();

    // 5. A dry run (its own state file): the reboot is decided and
    //    recorded as what it would do, and logind hears nothing.
    let mut act = Act::start(&lab, &ssh, &listen, &inventory, true);
    // Its bucket is fresh: whichever of the two disruptive alerts
    // Alertmanager repeats first takes the node's one token.
    let dry = act.wait_for("a dry-run reboot or power-off", |v| {
        v["event"] == "dry-run" && (v["action"] == "reboot" || v["action"] == "poweroff")
    });
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["node"], "lab");
    let would = format!(
        "would {} lab (lhtest-landlord@127.0.0.1:{})",
        dry["action"].as_str().unwrap(),
        ssh.port
    );
    assert_eq!(dry["would"], would.as_str(), "{dry}");
    let name = dry["alertname"].as_str().unwrap().to_owned();
    let again = act.wait_for("a repeat in the dry run", |v| is(v, "decided", &name));
    assert_eq!(again["decision"], "already-acted", "{again}");
    act.stop();
    assert!(lab.power.take().is_empty());
    assert!(d.join("act-state.json.dry-run").exists());
    let kept: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&state).unwrap()).unwrap();
    let acted = kept["acted"].as_object().unwrap();
    let reboots: Vec<_> = acted.values().filter(|a| a["action"] == "reboot").collect();
    assert_eq!(reboots.len(), 1, "{kept:#}");
    assert_eq!(reboots[0]["result"], "ok");
}
