//! T1: the node controller under concurrent callers on the real stack
//! (private dbus-daemon, real polkitd, agentd --dev on swtpm): 2 landlord
//! callers, 6 tenant callers and 8 readers hammer rotate / rekey /
//! put-secret / info for a minute (LEASEHOLD_HAMMER_SECS overrides).
//! Every call is answered, the agent survives, the final state is
//! consistent, and every destroying change has exactly one receipt.

use std::collections::BTreeMap;
use std::process::Stdio;

use leasehold_tests::{bin, Lab, Who};

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn dbus_sixteen_concurrent_callers_stay_consistent() {
    let mut lab = Lab::start();
    // About ordering and truthful outcomes under load, not the bound.
    lab.stop_agent();
    lab.agent_config = Some(leasehold_tests::PATIENT_AUTH_CONFIG.into());
    lab.start_agent();
    lab.run(Who::Root, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
    let secs: u64 = std::env::var("LEASEHOLD_HAMMER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let callers: &[(Who, &str)] = &[
        (Who::Landlord, "landlord-rotate"),
        (Who::Landlord, "landlord-rekey"),
        (Who::Tenant, "tenant-rotate"),
        (Who::Tenant, "tenant-rotate"),
        (Who::Tenant, "tenant-rekey"),
        (Who::Tenant, "tenant-rekey"),
        (Who::Tenant, "tenant-put"),
        (Who::Tenant, "tenant-put"),
        (Who::Root, "landlord-info"),
        (Who::Root, "landlord-info"),
        (Who::Root, "landlord-info"),
        (Who::Root, "landlord-info"),
        (Who::Landlord, "landlord-info"),
        (Who::Landlord, "landlord-info"),
        (Who::Tenant, "tenant-info"),
        (Who::Tenant, "tenant-info"),
    ];
    let children: Vec<_> = callers
        .iter()
        .map(|(who, op)| {
            lab.command(*who, &bin("lh-dbus-probe"))
                .args(["hammer", op, &secs.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut results = Vec::new();
    for ((who, op), child) in callers.iter().zip(children) {
        // A caller whose call is never answered never exits: the test
        // harness's own time limit is the bound.
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{who:?} {op}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{op}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        eprintln!("{who:?} {v}");
        results.push((*op, v));
    }
    assert!(lab.agent_alive(), "agentd died:\n{}", lab.agent_log());

    let sum = |op: &str, field: &str| -> u64 {
        results
            .iter()
            .filter(|(o, _)| *o == op)
            .map(|(_, v)| v[field].as_u64().unwrap())
            .sum()
    };
    for (op, v) in &results {
        assert!(v["calls"].as_u64().unwrap() > 0, "{op}: no call made");
        let errors: BTreeMap<String, u64> = serde_json::from_value(v["errors"].clone()).unwrap();
        for name in errors.keys() {
            // Busy is an answer (the queue or the caller's bound was full);
            // an envelope sealed to a key rotated away meanwhile is bad input.
            let expected = name == "org.leasehold.Error.Busy"
                || (*op == "tenant-put" && name == "org.leasehold.Error.InvalidArgument");
            assert!(
                expected,
                "{op}: unexpected {name} errors: {v}\nagent warnings:\n{}",
                warnings_of(&lab.agent_log())
            );
        }
        assert_eq!(
            v["warnings"], 0,
            "{op}: a change committed with warnings: {v}"
        );
    }
    // Destroying changes: each one that succeeded carried a receipt, and
    // the node stored exactly that many.
    let rotations_l = sum("landlord-rotate", "ok");
    let rotations_t = sum("tenant-rotate", "ok");
    assert_eq!(sum("landlord-rotate", "receipts"), rotations_l);
    assert_eq!(sum("tenant-rotate", "receipts"), rotations_t);
    assert!(
        rotations_l > 0 && rotations_t > 0,
        "no rotation went through"
    );
    let stored = std::fs::read_dir(lab.path("agent").join("state/receipts"))
        .unwrap()
        .count() as u64;
    // The assignment at the start is a first one: it destroys nothing and
    // has no receipt.
    assert_eq!(stored, rotations_l + rotations_t, "receipts on disk");
    // The final state is what those changes add up to.
    let info = lab
        .run(Who::Root, "landlordctl", &["--json", "info"])
        .ok()
        .json();
    assert_eq!(
        info["tenant_key_generation"].as_u64().unwrap(),
        1 + rotations_t,
        "{info}"
    );
    assert_eq!(
        info["landlord_generation"].as_u64().unwrap(),
        1 + rotations_l + sum("landlord-rekey", "ok"),
        "{info}"
    );
    assert_eq!(
        info["tenant_generation"].as_u64().unwrap(),
        1 + rotations_t + sum("tenant-rekey", "ok"),
        "{info}"
    );
    let readers: Vec<f64> = results
        .iter()
        .filter(|(o, _)| o.ends_with("-info"))
        .map(|(_, v)| v["p99_ms"].as_f64().unwrap())
        .collect();
    eprintln!("reader p99 (ms) during the run: {readers:?}");
    lab.stop_agent();
}

/// A change that committed but could not finish something afterwards is
/// reported as done (exit 0) with the warning on stderr and in `--json`,
/// with its receipt, and signalled like any other.
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn dbus_committed_change_with_a_failed_step_reports_a_warning() {
    let lab = Lab::start();
    lab.run(Who::Root, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
    // Something the secret purge cannot remove: a directory in the store.
    let store = lab.path("agent").join("state/secrets");
    std::fs::create_dir_all(store.join("stuck.secret")).unwrap();
    let before = lab
        .run(Who::Tenant, "tenantctl", &["--json", "info"])
        .ok()
        .json();
    let r = lab.run(Who::Tenant, "tenantctl", &["--yes", "--json", "rotate"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .contains("warning: the secret store was not emptied"),
        "{r:?}"
    );
    let v = r.json();
    assert!(v["receipt"].is_object(), "{v}");
    assert_eq!(v["warnings"].as_array().unwrap().len(), 1, "{v}");
    let after = lab
        .run(Who::Tenant, "tenantctl", &["--json", "info"])
        .ok()
        .json();
    assert_eq!(
        after["tenant_key_generation"].as_u64().unwrap(),
        before["tenant_key_generation"].as_u64().unwrap() + 1,
        "the rotation committed"
    );
}

/// The agent's warning and error lines (at most the last 40).
fn warnings_of(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
