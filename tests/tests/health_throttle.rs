//! Issue 16, `throttle-engines`, on the host harness (T1: real bus,
//! polkitd with the shipped policy, agentd --dev on swtpm, the CLIs as the
//! test users) with a fixture sysfs tree (one thermal zone) and a fixture
//! cgroup root (the host's cgroup2 has no controllers): a passive trip
//! point reached lowers the tenant subtree's cpu.max to half the budget,
//! the throttle survives an agent restart with the fault present and a
//! budget change, the fault clearing restores the new budget exactly, the
//! landlord sees it as an aggregate and the tenant reads and verifies the
//! two signed records.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use leasehold_tests::{Lab, LabOptions, Who};
use serde_json::Value;

fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

const ZONE: &str = "class/thermal/thermal_zone0";

/// One thermal zone at 40 °C, passive trip point 90 °C.
fn sysfs(sys: &Path) {
    put(sys, &format!("{ZONE}/type"), "acpitz\n");
    put(sys, &format!("{ZONE}/temp"), "40000\n");
    put(sys, &format!("{ZONE}/trip_point_0_type"), "passive\n");
    put(sys, &format!("{ZONE}/trip_point_0_temp"), "90000\n");
}

/// A cgroup v2 directory as the kernel shows it, its controllers enabled
/// for its children (a file cannot act out the kernel's `+cpu` syntax).
fn cgroup_dir(dir: &Path, limits: bool) {
    let c = "cpu memory io pids";
    put(dir, "cgroup.controllers", c);
    put(dir, "cgroup.subtree_control", c);
    if limits {
        for f in [
            "cpu.max",
            "cpu.weight",
            "memory.max",
            "memory.high",
            "pids.max",
            "io.weight",
        ] {
            put(dir, f, "");
        }
        put(dir, "cpu.stat", "usage_usec 1\n");
        put(dir, "memory.current", "1\n");
        put(dir, "memory.events", "oom_kill 0\n");
        put(dir, "pids.current", "0\n");
        put(dir, "io.stat", "");
    }
}

/// Sets the zone's temperature, then waits for the `FaultsChanged` that
/// reports the thermal fault there (`hot`) or gone.
fn set_temp_and_wait(lab: &Lab, sys: &Path, milli_c: u32, hot: bool) {
    lab.block_on(async {
        let h = leasehold_dbus_api::HealthProxy::new(lab.conn())
            .await
            .unwrap();
        let mut changed = h.receive_faults_changed().await.unwrap();
        put(sys, &format!("{ZONE}/temp"), &format!("{milli_c}\n"));
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let s = changed.next().await.unwrap();
                let a = s.args().unwrap();
                if a.faults().contains("\"thermal\"") == hot {
                    return;
                }
            }
        })
        .await
        .expect("FaultsChanged within 30 s");
    });
}

/// The cgroup file has no event: poll it (bounded).
fn wait_file(path: &Path, want: &str) {
    let t0 = Instant::now();
    loop {
        let now = fs::read_to_string(path).unwrap_or_default();
        if now == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} is {now:?}, wanted {want:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn landlord(lab: &Lab, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    lab.run(Who::Landlord, "landlordctl", &a).ok().json()
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn thermal_throttle_lowers_cpu_max_survives_a_restart_and_restores_the_budget() {
    let fx = tempfile::Builder::new()
        .prefix("lh-throttle-")
        .tempdir()
        .unwrap();
    let sys = fx.path().join("sys");
    sysfs(&sys);
    let cg = fx.path().join("cgroup");
    cgroup_dir(&cg.join("leasehold"), false);
    cgroup_dir(&cg.join("leasehold/tenant"), true);
    cgroup_dir(&cg.join("other"), true);
    put(&cg, "other/cpu.max", "max 100000");
    let cpu_max = cg.join("leasehold/tenant/cpu.max");
    let hook_out = fx.path().join("hook.out");
    let config = format!(
        r#"[health]
sys_root = "{sys}"
smart = false
interval_secs = 2

[[health.action]]
name = "warm-throttle"
source = "thermal"
severity = "warning"
action = "throttle-engines"
cpu_percent = 50
cooldown_secs = 0

[[health.action]]
name = "warm-seen"
source = "thermal"
severity = "warning"
action = "hook"
command = ["/bin/sh", "-c", "echo seen >> {out}"]
cooldown_secs = 0

[engines]
cgroup_root = "{cg}"
cgroup_subtree = "leasehold/tenant"
"#,
        sys = sys.display(),
        cg = cg.display(),
        out = hook_out.display()
    );
    let mut lab = Lab::start_with_options(LabOptions {
        agent_config: Some(config),
        ..LabOptions::default()
    });
    lab.run(Who::Landlord, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
    let b = landlord(&lab, &["budget", "set", "--cpu-max", "200000 100000"]);
    assert_eq!(b["written"], true, "{b}");
    assert_eq!(b["throttle"], Value::Null, "{b}");
    wait_file(&cpu_max, "200000 100000");

    // The passive trip point: half the budget.
    let t0 = Instant::now();
    set_temp_and_wait(&lab, &sys, 95_000, true);
    wait_file(&cpu_max, "100000 100000");
    eprintln!(
        "fault written -> cpu.max throttled: {:?} (interval 2 s)",
        t0.elapsed()
    );
    let b = landlord(&lab, &["budget", "show"]);
    assert_eq!(b["throttle"]["cpu_percent"], 50, "{b}");
    assert_eq!(b["throttle"]["cpu_max"], "100000 100000", "{b}");
    assert_eq!(b["limits"]["cpu_max"], "200000 100000", "the budget stands");
    let text = lab
        .run(Who::Landlord, "landlordctl", &["budget", "show"])
        .ok()
        .stdout;
    assert!(text.contains("throttled:"), "{text}");
    assert!(!text.contains("warm-throttle"), "aggregate only: {text}");
    let text = lab
        .run(Who::Landlord, "landlordctl", &["status"])
        .ok()
        .stdout;
    assert!(text.contains("throttled:"), "{text}");

    // A restart with the fault present: written again at start, kept by
    // the first report (the hook's second line shows that report ran).
    lab.stop_agent();
    fs::write(&cpu_max, "").unwrap();
    lab.start_agent();
    wait_file(&cpu_max, "100000 100000");
    let t = Instant::now();
    while fs::read_to_string(&hook_out)
        .unwrap_or_default()
        .lines()
        .count()
        < 2
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no report after the restart"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::read_to_string(&cpu_max).unwrap(), "100000 100000");

    // A budget change during the throttle: throttled in turn.
    let b = landlord(&lab, &["budget", "set", "--cpu-max", "400000 100000"]);
    assert_eq!(b["throttle"]["cpu_max"], "200000 100000", "{b}");
    assert_eq!(fs::read_to_string(&cpu_max).unwrap(), "200000 100000");

    // The fault clears: exactly the new budget.
    set_temp_and_wait(&lab, &sys, 40_000, false);
    wait_file(&cpu_max, "400000 100000");
    let b = landlord(&lab, &["budget", "show"]);
    assert_eq!(b["throttle"], Value::Null, "{b}");
    assert_eq!(
        fs::read_to_string(cg.join("other/cpu.max")).unwrap(),
        "max 100000",
        "no other cgroup touched"
    );
    // The journal line (this agent's log: since the restart).
    let log = lab.agent_log();
    assert!(log.contains("tenant throttle lifted"), "the journal line");

    // The tenant reads two records and verifies the throttle's.
    let list = lab
        .run(Who::Tenant, "tenantctl", &["--json", "actions", "list"])
        .ok()
        .json();
    let recs = list.as_array().unwrap();
    let roles: Vec<&str> = recs.iter().map(|r| r["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["throttle-engines", "unthrottle-engines"], "{list}");
    let out = fx.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(fx.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let file = out.join("record.json");
    let id = recs[0]["id"].as_str().unwrap().to_owned();
    let show = lab
        .run(
            Who::Tenant,
            "tenantctl",
            &[
                "--json",
                "actions",
                "show",
                &id,
                "--out",
                file.to_str().unwrap(),
            ],
        )
        .ok()
        .json();
    assert_eq!(show["receipt"]["rule"], "warm-throttle", "{show}");
    assert_eq!(show["receipt"]["cpu_percent"], 50, "{show}");
    assert_eq!(show["receipt"]["cpu_max"], "100000 100000", "{show}");
    assert_eq!(
        show["receipt"]["faults"][0]["subject"], "thermal_zone0",
        "{show}"
    );
    let v = lab
        .run(
            Who::Tenant,
            "tenantctl",
            &["--json", "verify-receipt", file.to_str().unwrap()],
        )
        .ok()
        .json();
    assert_eq!(v["verified"], true, "{v}");
    let id = recs[1]["id"].as_str().unwrap().to_owned();
    let show = lab
        .run(
            Who::Tenant,
            "tenantctl",
            &["--json", "actions", "show", &id],
        )
        .ok()
        .json();
    assert_eq!(show["receipt"]["cpu_max"], "400000 100000", "{show}");
}
