//! The landlord's console for the VM lab (issue 16, T2; docs/lab.md
//! "The console"): a real Prometheus and Alertmanager (Debian packages
//! `prometheus`, `prometheus-alertmanager`; scripts/install-deps) on the
//! host, run with the shipped scrape config, alert rules and route
//! (dist/prometheus/), and `landlordctl act` as Alertmanager's webhook.
//! Only the timings are the lab's own (`LAB_TIMING`): the shipped ones are
//! for a fleet, not for a test that waits for them.
//!
//! The configuration text is built by plain functions so that T0
//! (tests/tests/vm_sections.rs) checks it with promtool and amtool without
//! a VM.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

/// The lab node as the console names it: the `instance` label of its
/// series and alerts, which `act`'s inventory maps to the node. Fixed,
/// whatever host port QEMU forwards (it changes when the node restarts).
pub const INSTANCE: &str = "lab-node1:9464";

/// The lab's timings, replacing the shipped ones (measured in docs/lab.md).
pub struct Timing {
    /// Prometheus's scrape and rule-evaluation interval, and scrape timeout.
    pub scrape: &'static str,
    /// `for:` of `LeaseholdNodeDown` (shipped: 1m).
    pub node_down_for: &'static str,
    /// Alertmanager's group_wait, group_interval, repeat_interval.
    pub group_wait: &'static str,
    pub group_interval: &'static str,
    pub repeat_interval: &'static str,
}

pub const LAB_TIMING: Timing = Timing {
    scrape: "1s",
    node_down_for: "1s",
    group_wait: "0s",
    group_interval: "1s",
    repeat_interval: "2s",
};

/// Replaces `from` by `to` in `text`, failing (naming the file) if the
/// shipped file no longer has `from`: a changed shipped file must not
/// silently leave the test with other settings than it claims.
fn swap(file: &str, text: String, from: &str, to: &str) -> Result<String, String> {
    if !text.contains(from) {
        return Err(format!("{file}: no {from:?} to replace"));
    }
    Ok(text.replace(from, to))
}

/// dist/prometheus/leasehold.yml pointed at the lab node (`target`, the
/// host port QEMU forwards to the node's 9464), with the lab's timing, the
/// rules and the Alertmanager.
pub fn prometheus_yml(
    shipped: &str,
    target: &str,
    token: &Path,
    rules: &Path,
    alertmanager: &str,
    t: &Timing,
) -> Result<String, String> {
    const F: &str = "dist/prometheus/leasehold.yml";
    let s = swap(
        F,
        shipped.to_owned(),
        "global:\n  scrape_interval: 30s\n",
        &format!(
            "global:\n  scrape_interval: {0}\n  evaluation_interval: {0}\n",
            t.scrape
        ),
    )?;
    let s = swap(
        F,
        s,
        "    scrape_interval: 30s\n",
        &format!("    scrape_interval: {}\n", t.scrape),
    )?;
    let s = swap(
        F,
        s,
        "scrape_timeout: 25s",
        &format!("scrape_timeout: {}", t.scrape),
    )?;
    let s = swap(
        F,
        s,
        "/etc/prometheus/leasehold.token",
        token.to_str().unwrap(),
    )?;
    let s = swap(
        F,
        s,
        "          - node1.example:9464\n",
        &format!("          - {target}\n        labels:\n          instance: {INSTANCE}\n"),
    )?;
    Ok(format!(
        "{s}rule_files:\n  - {}\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"{alertmanager}\"]\n",
        rules.display()
    ))
}

/// The lab's own alert, for the fault-to-notification benchmark: a drift
/// in the last 5 s, so each drift is a new alert (a new `startsAt`); the
/// shipped `LeaseholdBoundaryDrift` stays firing for 10 minutes after one.
pub const LAB_DRIFT_ALERT: &str = "LeaseholdLabDriftNow";

/// dist/prometheus/leasehold-rules.yml with the lab's `for:` on node down,
/// and a group with the lab's own alert.
pub fn rules_yml(shipped: &str, t: &Timing) -> Result<String, String> {
    let s = swap(
        "dist/prometheus/leasehold-rules.yml",
        shipped.to_owned(),
        "expr: up{job=\"leasehold\"} == 0\n        for: 1m\n",
        &format!(
            "expr: up{{job=\"leasehold\"}} == 0\n        for: {}\n",
            t.node_down_for
        ),
    )?;
    Ok(format!(
        "{s}\n  - name: leasehold-lab\n    rules:\n      - alert: {LAB_DRIFT_ALERT}\n        expr: increase(leasehold_boundary_drifts_total[5s]) > 0\n        labels:\n          severity: warning\n"
    ))
}

/// dist/prometheus/alertmanager.yml sending to the lab's `act`.
pub fn alertmanager_yml(
    shipped: &str,
    act_listen: &str,
    token: &Path,
    t: &Timing,
) -> Result<String, String> {
    const F: &str = "dist/prometheus/alertmanager.yml";
    let s = swap(
        F,
        shipped.to_owned(),
        "127.0.0.1:9465/alerts",
        &format!("{act_listen}/alerts"),
    )?;
    let s = swap(
        F,
        s,
        "/etc/prometheus/leasehold-act.token",
        token.to_str().unwrap(),
    )?;
    let s = swap(
        F,
        s,
        "group_wait: 10s",
        &format!("group_wait: {}", t.group_wait),
    )?;
    let s = swap(
        F,
        s,
        "group_interval: 1m",
        &format!("group_interval: {}", t.group_interval),
    )?;
    swap(
        F,
        s,
        "repeat_interval: 1h",
        &format!("repeat_interval: {}", t.repeat_interval),
    )
}

/// `act`'s inventory: the lab node by its instance and SSH, a boundary
/// drift mapped to a reboot (node down: a notification, the default).
pub fn inventory(token: &Path, state: &Path, ssh_host: &str) -> String {
    format!(
        "token_file = \"{}\"\nstate_file = \"{}\"\n[limits]\nnode_burst = 1\nnode_refill_secs = 3600\n\
         [[node]]\nname = \"node1\"\ninstance = \"{INSTANCE}\"\nhost = \"{ssh_host}\"\n\
         [[rule]]\nalertname = \"LeaseholdBoundaryDrift\"\naction = \"reboot\"\n",
        token.display(),
        state.display()
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn secret_file(path: &Path, text: &str) {
    fs::write(path, format!("{text}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// Writes `d`/prometheus.yml (the token and rules are in `d`).
fn write_prometheus_yml(d: &Path, target: &str, am_port: u16) {
    let root = leasehold_tests::workspace_root();
    let conf = prometheus_yml(
        &fs::read_to_string(root.join("dist/prometheus/leasehold.yml")).unwrap(),
        target,
        &d.join("metrics.token"),
        &d.join("leasehold-rules.yml"),
        &format!("127.0.0.1:{am_port}"),
        &LAB_TIMING,
    )
    .unwrap();
    fs::write(d.join("prometheus.yml"), conf).unwrap();
}

/// Kills a child the console started, by its handle.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prometheus, Alertmanager and `act`, running on the host.
pub struct Console {
    pub dir: tempfile::TempDir,
    pub prom_port: u16,
    pub am_port: u16,
    _prom: Proc,
    _am: Proc,
    _act: Proc,
    act_lines: mpsc::Receiver<Result<serde_json::Value, String>>,
    /// Every record `act` printed so far, in order.
    pub seen: Vec<serde_json::Value>,
}

impl Console {
    /// Starts the three on the host: Prometheus scrapes `target` with the
    /// bearer `metrics_token`; `act` reaches the node as `ssh_host` with
    /// `ssh_command` (LEASEHOLD_SSH).
    pub fn start(
        target: &str,
        metrics_token: &str,
        ssh_host: &str,
        ssh_command: &str,
        landlordctl: &Path,
    ) -> Console {
        for (p, pkg) in [
            (PROMETHEUS, "prometheus"),
            (ALERTMANAGER, "prometheus-alertmanager"),
        ] {
            assert!(
                Path::new(p).exists(),
                "{p} is missing: apt-get install {pkg} (scripts/install-deps)"
            );
        }
        let root = leasehold_tests::workspace_root();
        let dir = tempfile::Builder::new()
            .prefix("lh-vm-console-")
            .tempdir()
            .unwrap();
        let d = dir.path().to_owned();
        secret_file(&d.join("metrics.token"), metrics_token);
        let act_token = d.join("act.token");
        let act_secret: String = {
            use rand::Rng;
            let mut r = rand::thread_rng();
            (0..32)
                .map(|_| char::from(b"0123456789abcdef"[r.gen_range(0..16)]))
                .collect()
        };
        secret_file(&act_token, &act_secret);
        let act_listen = format!("127.0.0.1:{}", free_port());
        let (prom_port, am_port) = (free_port(), free_port());

        let inv = d.join("act.toml");
        fs::write(
            &inv,
            inventory(&act_token, &d.join("act-state.json"), ssh_host),
        )
        .unwrap();
        let act = Command::new(landlordctl)
            // The node is reached over SSH only: no local bus.
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                "unix:path=/nonexistent/leasehold-bus",
            )
            .env("LEASEHOLD_SSH", ssh_command)
            .args(["--json", "act", "--listen", &act_listen, "--inventory"])
            .arg(&inv)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(d.join("act.log")).unwrap())
            .spawn()
            .unwrap();
        let mut act = Proc(act);
        let out = act.0.stdout.take().unwrap();
        let (tx, act_lines) = mpsc::channel();
        std::thread::spawn(move || {
            let doc = leasehold_tests::json_doc::JsonDoc::load();
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

        let read = |p: &str| fs::read_to_string(root.join(p)).unwrap();
        let am_conf = d.join("alertmanager.yml");
        fs::write(
            &am_conf,
            alertmanager_yml(
                &read("dist/prometheus/alertmanager.yml"),
                &act_listen,
                &act_token,
                &LAB_TIMING,
            )
            .unwrap(),
        )
        .unwrap();
        let am = Command::new(ALERTMANAGER)
            .arg(format!("--config.file={}", am_conf.display()))
            .arg(format!("--storage.path={}", d.join("am-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
            // No gossip port: one Alertmanager, and other tests on this machine.
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("alertmanager.log")).unwrap())
            .spawn()
            .unwrap();

        let rules = d.join("leasehold-rules.yml");
        fs::write(
            &rules,
            rules_yml(&read("dist/prometheus/leasehold-rules.yml"), &LAB_TIMING).unwrap(),
        )
        .unwrap();
        write_prometheus_yml(&d, target, am_port);
        let prom = Command::new(PROMETHEUS)
            .arg(format!(
                "--config.file={}",
                d.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                d.join("prom-data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            // POST /-/reload when the node's forwarded port changes.
            .arg("--web.enable-lifecycle")
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        let mut c = Console {
            dir,
            prom_port,
            am_port,
            _prom: Proc(prom),
            _am: Proc(am),
            _act: act,
            act_lines,
            seen: Vec::new(),
        };
        c.act_wait(60, "act listening", |v| v["event"] == "listening");
        c
    }

    /// Points Prometheus at a new forwarded port (the node restarted).
    pub fn retarget(&self, target: &str) {
        write_prometheus_yml(self.dir.path(), target, self.am_port);
        let out = Command::new("curl")
            .args(["-sS", "-f", "--max-time", "30", "-X", "POST"])
            .arg(format!("http://127.0.0.1:{}/-/reload", self.prom_port))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "prometheus reload: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    /// The result vector of an instant query (empty while Prometheus is
    /// starting or the series are absent).
    pub fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-G", "--data-urlencode"])
            .arg(format!("query={q}"))
            .arg(format!("http://127.0.0.1:{}/api/v1/query", self.prom_port))
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    }

    /// The first sample's value of an instant query, if any.
    pub fn value(&self, q: &str) -> Option<f64> {
        self.query(q)
            .first()
            .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse().ok()))
    }

    /// Polls Prometheus's query API (it has no event to wait on) until
    /// `done` holds for the query's first value, at most `secs`.
    #[track_caller]
    pub fn wait_value(&self, secs: u64, q: &str, done: impl Fn(Option<f64>) -> bool) -> Duration {
        let t0 = Instant::now();
        loop {
            let v = self.value(q);
            if done(v) {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "prometheus: {q} is {v:?} after {secs} s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Alertmanager's active alerts named `alertname` (its API v2).
    pub fn am_alerts(&self, alertname: &str) -> Vec<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .arg(format!(
                "http://127.0.0.1:{}/api/v2/alerts?active=true&filter=alertname%3D%22{alertname}%22",
                self.am_port
            ))
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// The next `act` record within `wait` (kept in `seen`), if any.
    pub fn act_next(&mut self, wait: Duration) -> Option<serde_json::Value> {
        match self.act_lines.recv_timeout(wait) {
            Ok(Ok(v)) => {
                self.seen.push(v.clone());
                Some(v)
            }
            Ok(Err(e)) => panic!("act printed a bad record: {e}"),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("act exited; it printed {:#?}\n{}", self.seen, self.logs())
            }
        }
    }

    /// The next `act` record matching `pred`, within `secs`.
    #[track_caller]
    pub fn act_wait(
        &mut self,
        secs: u64,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "act never printed {what} within {secs} s; it printed {:#?}\n{}",
                self.seen,
                self.logs()
            );
            if let Some(v) = self.act_next(left) {
                if pred(&v) {
                    return v;
                }
            }
        }
    }

    /// act's state file: the alerts it acted on.
    pub fn act_state(&self) -> serde_json::Value {
        let p = self.dir.path().join("act-state.json");
        serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap()
    }

    /// The tails of the three's logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["prometheus.log", "alertmanager.log", "act.log"] {
            let text = fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            s.push_str(&format!("--- {f} (last 15 lines) ---\n{tail}\n"));
        }
        s
    }
}
