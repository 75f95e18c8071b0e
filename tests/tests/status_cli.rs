//! Issue 15, points 12 and 13, on the host harness (T1: real bus, polkitd,
//! agentd --dev on swtpm in a network namespace of the test's own, the
//! CLIs as the test users): `status` of both roles and its exit status,
//! `monitor` following real signals (a boundary drift the agent undoes, a
//! rotation), `receipts list/show` by role (a tenant never sees another
//! tenancy's receipt), and `verify-receipt` (signer fingerprint, exit 7 on
//! a key that is not the node's).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use leasehold_storage::meta::{VolumeMeta, VolumeState, FORMAT};
use leasehold_tests::matrix::BOUNDARY_DOC;
use leasehold_tests::{bin, console_pem, sh, Lab, LabOptions, Run, Who};
use serde_json::Value;

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

/// A running `monitor`: its stdout lines arrive on a channel; killed on drop.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Monitor {
    /// Starts `program [args] monitor` as `who` and waits for its ready
    /// line on stderr (printed once it is subscribed).
    fn start(lab: &Lab, who: Who, program: &str, args: &[&str]) -> Monitor {
        let mut child = lab
            .command(who, &bin(program))
            .args(args)
            .arg("monitor")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert!(ready.starts_with("monitoring "), "{program}: {ready:?}");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Monitor { child, lines }
    }

    /// The next event line (bounded wait: the signal is the event).
    fn next(&self, what: &str) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no {what} line within 60 s: {e}"))
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(r: &Run) -> Value {
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {r:?}"))
}

fn ids(r: Run) -> Vec<String> {
    json(&r.ok())
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_owned())
        .collect()
}

/// `status` of both roles on a healthy node (exit 0), the drift the agent
/// undid (count and time, also seen live by `landlordctl monitor`), a
/// rotation seen by both monitors, a failed volume (exit 1, named), and
/// an unreachable agent (exit 69).
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn status_and_monitor_follow_the_node() {
    let ns = Netns::new("st");
    let mut lab = Lab::start_in(&ns.0);

    let t0 = std::time::Instant::now();
    let s = json(
        &lab.run(Who::Landlord, "landlordctl", &["--json", "status"])
            .ok(),
    );
    eprintln!("landlordctl status: {:?}", t0.elapsed());
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(s["agent"]["api_version"], leasehold_dbus_api::API_VERSION);
    assert!(s["agent"]["version"].is_string(), "{s}");
    assert_eq!(s["tpm"]["kind"], "software");
    assert_eq!(s["tpm"]["health"], "ok");
    assert_eq!(s["keys"]["landlord"]["generation"], 1);
    assert_eq!(s["tenant"]["assigned"], false);
    assert_eq!(s["boundary"]["set"], false);
    assert_eq!(s["boundary"]["drift_count"], 0);
    assert_eq!(s["volume"]["state"], "none");
    assert_eq!(s["engines"]["count"], 0);
    // The tenant before any assignment: no tenancy is not a problem.
    let t = json(
        &lab.run(Who::Tenant, "tenantctl", &["--json", "status"])
            .ok(),
    );
    assert_eq!(t["tenant"]["assigned"], false, "{t}");
    assert!(
        t["volume"].is_null() && t["keys"]["tenant"].is_null(),
        "{t}"
    );

    lab.run(Who::Landlord, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
    let bdoc = lab.write_file("boundary.toml", BOUNDARY_DOC.as_bytes());
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "set", bdoc.to_str().unwrap()],
    )
    .ok();
    let t = json(
        &lab.run(Who::Tenant, "tenantctl", &["--json", "status"])
            .ok(),
    );
    assert_eq!(t["ok"], true, "{t}");
    assert_eq!(t["tenant"]["name"], "acme");
    assert_eq!(t["keys"]["tenant"]["generation"], 1, "{t}");
    // The tenant is not shown the landlord's generation.
    assert!(t["keys"]["landlord"]["generation"].is_null(), "{t}");
    assert_eq!(t["engines"]["list"], serde_json::json!([]));
    let text = lab.run(Who::Tenant, "tenantctl", &["status"]).ok();
    assert!(
        text.stdout.contains("tenant:        acme"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.ends_with("status:        ok\n"),
        "{}",
        text.stdout
    );

    // Drift: the table removed behind the agent's back; the landlord's
    // monitor prints the restoration, status counts it.
    let lmon = Monitor::start(&lab, Who::Landlord, "landlordctl", &["--json"]);
    let tmon = Monitor::start(&lab, Who::Tenant, "tenantctl", &["--json"]);
    let t0 = std::time::Instant::now();
    sh(&["ip", "netns", "exec", &ns.0, "nft", "flush", "ruleset"]);
    let ev: Value = serde_json::from_str(&lmon.next("BoundaryRestored")).unwrap();
    eprintln!("drift to the monitor's line: {:?}", t0.elapsed());
    assert_eq!(ev["event"], "BoundaryRestored", "{ev}");
    assert!(ev["what"].as_str().unwrap().contains("missing"), "{ev}");
    let s = json(
        &lab.run(Who::Landlord, "landlordctl", &["--json", "status"])
            .ok(),
    );
    assert_eq!(s["ok"], true, "a repaired drift is not a problem: {s}");
    assert_eq!(s["boundary"]["enforced"], true);
    assert_eq!(s["boundary"]["drift_count"], 1, "{s}");
    assert!(s["boundary"]["last_drift_at"].as_u64().unwrap() > 0, "{s}");
    let text = lab.run(Who::Landlord, "landlordctl", &["status"]).ok();
    assert!(
        text.stdout.contains("drift 1 time since"),
        "{}",
        text.stdout
    );

    // A rotation: both monitors print it; the tenant's with its receipt,
    // the landlord's without (it names the tenant's engines: the
    // landlord's ListReceipts does not show it either).
    let t0 = std::time::Instant::now();
    lab.run(Who::Tenant, "tenantctl", &["--yes", "rotate"]).ok();
    eprintln!("tenant rotate (until the CLI returned): {:?}", t0.elapsed());
    for (who, m) in [("tenant", &tmon), ("landlord", &lmon)] {
        let ev: Value = serde_json::from_str(&m.next("KeysChanged")).unwrap();
        assert_eq!(ev["event"], "KeysChanged", "{who}: {ev}");
        assert_eq!(ev["change"]["kind"], "rotate", "{who}: {ev}");
        assert_eq!(ev["change"]["role"], "tenant", "{who}: {ev}");
        assert_eq!(ev["change"]["data_destroyed"], true, "{who}: {ev}");
        let receipt = &ev["change"]["receipt"];
        if who == "tenant" {
            assert!(receipt.is_object(), "{who}: {ev}");
        } else {
            assert!(receipt.is_null(), "{who}: {ev}");
            assert!(ev["change"]["receipt_signature"].is_null(), "{who}: {ev}");
        }
    }
    drop((lmon, tmon));
    // Text lines: one per event.
    let lmon = Monitor::start(&lab, Who::Landlord, "landlordctl", &[]);
    lab.run(Who::Landlord, "landlordctl", &["rekey"]).ok();
    let line = lmon.next("KeysChanged");
    assert!(
        line.contains(" KeysChanged: rekey of landlord keys: generation 1 -> 2"),
        "{line}"
    );
    drop(lmon);

    // A failed volume: exit 1, the problem named, for both roles.
    let node_id = s["node_id"].as_str().unwrap().to_owned();
    lab.stop_agent();
    std::fs::write(
        lab.path("agent").join("state").join("volume.json"),
        stuck_record(&node_id),
    )
    .unwrap();
    lab.start_agent();
    for (who, program) in [(Who::Landlord, "landlordctl"), (Who::Tenant, "tenantctl")] {
        let r = lab.run(who, program, &["status"]);
        assert_eq!(r.code, 1, "{program}: {r:?}");
        assert!(
            r.stdout.contains("PROBLEM:       volume failed"),
            "{}",
            r.stdout
        );
        assert!(
            r.stdout.contains("status:        1 problem"),
            "{}",
            r.stdout
        );
        let r = lab.run(who, program, &["--json", "status"]);
        assert_eq!(r.code, 1, "{program}: {r:?}");
        let v = json(&r);
        assert_eq!(v["ok"], false);
        assert!(v["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("volume failed"));
    }

    // The agent unreachable: 69, for status and monitor.
    lab.stop_agent();
    let r = lab.run(Who::Landlord, "landlordctl", &["status"]);
    assert_eq!(r.code, 69, "{r:?}");
    let r = lab.run(Who::Tenant, "tenantctl", &["status"]);
    assert_eq!(r.code, 69, "{r:?}");
}

/// Receipts by role: the landlord sees its assign/release/rotate
/// receipts, the tenant the rotations of its own tenancy only (never the
/// previous tenant's, never an assignment's); `show` gives the document
/// `verify-receipt` checks; the stored files use the one signature name.
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn receipts_by_role_and_verify() {
    let lab = Lab::start();
    let work = lab.path("work");
    let p = |name: &str| work.join(name).to_str().unwrap().to_owned();

    assert!(ids(lab.run(
        Who::Landlord,
        "landlordctl",
        &["--json", "receipts", "list"]
    ))
    .is_empty());
    let lmon = Monitor::start(&lab, Who::Landlord, "landlordctl", &["--json"]);
    let tmon = Monitor::start(&lab, Who::Tenant, "tenantctl", &["--json"]);
    // A first assignment destroys nothing (the unassigned disk key is made
    // from KL alone, which stays): no receipt for anyone.
    lab.run(Who::Landlord, "landlordctl", &["assign", "acme"])
        .ok();
    for (who, m) in [("landlord", &lmon), ("tenant", &tmon)] {
        let ev: Value = serde_json::from_str(&m.next("KeysChanged")).unwrap();
        assert_eq!(ev["change"]["kind"], "assign", "{who}: {ev}");
        assert_eq!(ev["change"]["data_destroyed"], false, "{who}: {ev}");
        assert!(ev["change"]["receipt"].is_null(), "{who}: {ev}");
    }
    assert!(ids(lab.run(
        Who::Landlord,
        "landlordctl",
        &["--json", "receipts", "list"]
    ))
    .is_empty());
    // Assigned again over that tenant: the signal as ListReceipts: the
    // landlord's carries the assignment's receipt (the previous tenancy's
    // erase), the tenant's does not.
    lab.run(Who::Landlord, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
    for (who, m, receipt) in [("landlord", &lmon, true), ("tenant", &tmon, false)] {
        let ev: Value = serde_json::from_str(&m.next("KeysChanged")).unwrap();
        assert_eq!(ev["change"]["kind"], "assign", "{who}: {ev}");
        assert_eq!(ev["change"]["receipt"].is_object(), receipt, "{who}: {ev}");
        assert_eq!(
            ev["change"]
                .get("receipt_signature")
                .is_some_and(|v| !v.is_null()),
            receipt,
            "{who}: {ev}"
        );
    }
    drop((lmon, tmon));
    let landlord = ids(lab.run(
        Who::Landlord,
        "landlordctl",
        &["--json", "receipts", "list"],
    ));
    assert_eq!(landlord.len(), 1, "{landlord:?}");
    assert!(landlord[0].contains("-assign-"), "{landlord:?}");
    // The assignment erased what came before: not the new tenant's.
    assert!(ids(lab.run(Who::Tenant, "tenantctl", &["--json", "receipts", "list"])).is_empty());

    lab.run(Who::Tenant, "tenantctl", &["--yes", "rotate"]).ok();
    let tenant = ids(lab.run(Who::Tenant, "tenantctl", &["--json", "receipts", "list"]));
    assert_eq!(tenant.len(), 1, "{tenant:?}");
    assert!(tenant[0].contains("-rotate-tenant-"), "{tenant:?}");
    let rid = tenant[0].clone();
    // The tenant's own erase is not the landlord's to read.
    assert_eq!(
        ids(lab.run(
            Who::Landlord,
            "landlordctl",
            &["--json", "receipts", "list"]
        )),
        landlord
    );
    let r = lab.run(Who::Landlord, "landlordctl", &["receipts", "show", &rid]);
    assert_eq!(r.code, 5, "{r:?}");
    let r = lab.run(
        Who::Tenant,
        "tenantctl",
        &["receipts", "show", &landlord[0]],
    );
    assert_eq!(r.code, 5, "{r:?}");
    // An id is looked up, never used as a path.
    for id in ["../tenancy", "../receipts/x", "/etc/passwd", ""] {
        let r = lab.run(Who::Tenant, "tenantctl", &["receipts", "show", id]);
        assert_eq!(r.code, 5, "{id:?}: {r:?}");
    }
    let text = lab
        .run(Who::Tenant, "tenantctl", &["receipts", "list"])
        .ok();
    assert!(text.stdout.starts_with(&rid), "{}", text.stdout);

    // show: the document, to a file; verify-receipt fetches the node's key.
    let doc = json(
        &lab.run(
            Who::Tenant,
            "tenantctl",
            &["--json", "receipts", "show", &rid, "--out", &p("r.json")],
        )
        .ok(),
    );
    assert_eq!(doc["id"], rid.as_str());
    assert!(doc["receipt_signature"].is_string(), "{doc}");
    assert!(doc["receipt"].is_object(), "{doc}");
    assert!(doc.get("signature").is_none(), "{doc}");
    let key = json(
        &lab.run(Who::Tenant, "tenantctl", &["--json", "receipt-key"])
            .ok(),
    );
    let node_fp = key["fingerprint"].as_str().unwrap().to_owned();
    let v = json(
        &lab.run(
            Who::Tenant,
            "tenantctl",
            &["--json", "verify-receipt", &p("r.json")],
        )
        .ok(),
    );
    assert_eq!(v["verified"], true);
    assert_eq!(v["signer"], node_fp.as_str());
    let text = lab
        .run(
            Who::Landlord,
            "landlordctl",
            &["verify-receipt", &p("r.json")],
        )
        .ok();
    assert!(
        text.stdout.starts_with(&format!(
            "receipt verified: signed by the node's key {node_fp}"
        )),
        "{}",
        text.stdout
    );
    // Offline, with the key file and the expected fingerprint.
    lab.run(
        Who::Tenant,
        "tenantctl",
        &["receipt-key", "--out", &p("node.pem")],
    )
    .ok();
    lab.run(
        Who::Tenant,
        "tenantctl",
        &[
            "verify-receipt",
            &p("r.json"),
            "--key",
            &p("node.pem"),
            "--node-fingerprint",
            &node_fp,
        ],
    )
    .ok();
    // Not the node's key: exit 7, with a fingerprint or with a key file.
    let other = "ab".repeat(32);
    let r = lab.run(
        Who::Tenant,
        "tenantctl",
        &["verify-receipt", &p("r.json"), "--node-fingerprint", &other],
    );
    assert_eq!(r.code, 7, "{r:?}");
    assert!(
        r.stderr.contains("NOT signed by the node's key"),
        "{}",
        r.stderr
    );
    let r = lab.run(
        Who::Tenant,
        "tenantctl",
        &[
            "--json",
            "verify-receipt",
            &p("r.json"),
            "--node-fingerprint",
            &other,
        ],
    );
    assert_eq!(r.code, 7, "{r:?}");
    assert_eq!(json(&r)["error"]["name"], "not-node-key", "{r:?}");
    let console = lab.write_file("console.pem", console_pem().as_bytes());
    let r = lab.run(
        Who::Tenant,
        "tenantctl",
        &[
            "verify-receipt",
            &p("r.json"),
            "--key",
            console.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 7, "{r:?}");
    // A modified body: 1.
    let mut bad = doc.clone();
    bad["receipt"]["role"] = Value::String("tenent".into());
    std::fs::write(p("bad.json"), bad.to_string()).unwrap();
    let r = lab.run(
        Who::Tenant,
        "tenantctl",
        &["verify-receipt", &p("bad.json")],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("does NOT verify"), "{}", r.stderr);
    // The form older CLIs printed and the agent's files keep (the body as
    // a string) and the signature's older name are still read.
    let legacy = serde_json::json!({"receipt": doc["receipt"].to_string(), "signature": doc["receipt_signature"]});
    std::fs::write(p("legacy.json"), legacy.to_string()).unwrap();
    lab.run(
        Who::Tenant,
        "tenantctl",
        &["verify-receipt", &p("legacy.json")],
    )
    .ok();
    // The agent's own files use the one name.
    let dir = lab.path("agent").join("state").join("receipts");
    let stored: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{rid}.json"))).unwrap()).unwrap();
    assert_eq!(stored["receipt_signature"], doc["receipt_signature"]);

    // A new tenancy: the previous tenant's receipts are gone from view.
    lab.run(Who::Landlord, "landlordctl", &["--yes", "release"])
        .ok();
    assert!(ids(lab.run(Who::Tenant, "tenantctl", &["--json", "receipts", "list"])).is_empty());
    lab.run(Who::Landlord, "landlordctl", &["--yes", "assign", "next"])
        .ok();
    assert!(ids(lab.run(Who::Tenant, "tenantctl", &["--json", "receipts", "list"])).is_empty());
    let r = lab.run(Who::Tenant, "tenantctl", &["receipts", "show", &rid]);
    assert_eq!(r.code, 5, "{r:?}");
    let landlord = ids(lab.run(
        Who::Landlord,
        "landlordctl",
        &["--json", "receipts", "list"],
    ));
    // The assignment over a tenant and the release; the assignment after
    // the release, like the very first, destroyed nothing: no receipt.
    assert_eq!(
        landlord.len(),
        2,
        "assign over a tenant, release: {landlord:?}"
    );
    assert!(landlord[1].contains("-release-"), "{landlord:?}");
    // The landlord's rotation during this tenancy destroyed the tenant's
    // data: both see its receipt.
    lab.run(Who::Landlord, "landlordctl", &["--yes", "rotate"])
        .ok();
    let tenant = ids(lab.run(Who::Tenant, "tenantctl", &["--json", "receipts", "list"]));
    assert_eq!(tenant.len(), 1, "{tenant:?}");
    assert!(tenant[0].contains("-rotate-landlord-"), "{tenant:?}");
    let landlord2 = ids(lab.run(
        Who::Landlord,
        "landlordctl",
        &["--json", "receipts", "list"],
    ));
    assert_eq!(landlord2.last(), tenant.last());
}

/// A lost TPM (swtpm killed) makes `status` exit 1 for both roles, naming
/// it. Polled, bounded: no signal announces a health change (the agent
/// checks every second here).
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn status_reports_a_failed_tpm() {
    let lab = Lab::start_with_options(LabOptions {
        agent_config: Some("[tpm]\ncheck_interval_secs = 1\n".into()),
        ..LabOptions::default()
    });
    lab.run(Who::Landlord, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
    lab.run(Who::Landlord, "landlordctl", &["status"]).ok();
    let pid = std::fs::read_to_string(lab.agent_dir().join("tpm/swtpm.pid")).unwrap();
    sh(&["kill", "-KILL", pid.trim()]);
    let start = std::time::Instant::now();
    let r = loop {
        let r = lab.run(Who::Landlord, "landlordctl", &["--json", "status"]);
        // The health report's own TPM check can fail `status` first; the
        // TPM watch (NodeInfo's `tpm_health`) follows within a second.
        if r.code != 0 && json(&r)["tpm"]["health"] == "failed" {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "status still ok 30 s after swtpm died: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(r.code, 1, "{r:?}");
    let v = json(&r);
    assert_eq!(v["tpm"]["health"], "failed", "{v}");
    assert!(
        v["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("TPM failed: "),
        "{v}"
    );
    let r = lab.run(Who::Tenant, "tenantctl", &["status"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("PROBLEM:       TPM failed"),
        "{}",
        r.stdout
    );
}

/// The record an old agent left after `volume init` failed (see
/// volume_cli.rs): a failed volume.
fn stuck_record(node_id: &str) -> String {
    let m = VolumeMeta {
        signatures_checked: false,
        init_signature: None,
        tail_mark: None,
        format: FORMAT,
        id: "00112233445566778899aabbccddeeff".into(),
        node_id: node_id.into(),
        device: "/dev/leasehold-gone".into(),
        size_bytes: 64 << 20,
        sector_size: 4096,
        cipher: "aes-xts-plain64".into(),
        key_bytes: 64,
        options: vec!["sector_size:4096".into()],
        filesystem: "ext4".into(),
        key_generations: vec![("landlord".into(), 1), ("tenant".into(), 1)],
        kcv: "ffffffffffffffffffffffffffffffff".into(),
        state: VolumeState::Initializing,
        created: 1,
        made: 1,
        made_by: Some("initialized".into()),
    };
    serde_json::to_string_pretty(&m).unwrap()
}
