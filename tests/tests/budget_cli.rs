//! Issue 14, "What the landlord sets and sees", on the host harness (T1:
//! real bus, polkitd with the shipped policy, agentd --dev on swtpm, the
//! CLIs as the test users): the landlord sets and shows the tenant budget
//! (flags and documents, field errors, recorded across an agent restart),
//! the tenant cannot, and a tenant deploy above it is refused naming the
//! field. This host has no cgroup v2 controllers for engines: the budget is
//! recorded and reported as not written, which is also checked.

use leasehold_tests::{Lab, Who};
use serde_json::Value;

fn landlord(lab: &Lab, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    lab.run(Who::Landlord, "landlordctl", &a).ok().json()
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn budget_set_show_refusals_and_restart() {
    let mut lab = Lab::start();
    lab.run(Who::Landlord, "landlordctl", &["--yes", "assign", "acme"])
        .ok();

    // Nothing set: no limits; counts, and why usage cannot be read here.
    let b = landlord(&lab, &["budget", "show"]);
    assert_eq!(b["limits"]["memory_max"], Value::Null, "{b}");
    assert_eq!(b["engines"], 0, "{b}");
    assert_eq!(b["engines_above"], Value::Null, "{b}");

    // Flags.
    let b = landlord(
        &lab,
        &[
            "budget",
            "set",
            "--memory-max",
            "1G",
            "--pids-max",
            "100",
            "--cpu-max",
            "200000 100000",
        ],
    );
    assert_eq!(b["limits"]["memory_max"], 1u64 << 30, "{b}");
    assert_eq!(b["limits"]["pids_max"], 100, "{b}");
    assert_eq!(b["limits"]["cpu_max"], "200000 100000", "{b}");
    assert_eq!(b["engines_above"], 0, "{b}");
    // No engines' cgroup tree on this host: recorded, said not written.
    assert_eq!(b["written"], false, "{b}");
    assert!(
        b["write_error"]
            .as_str()
            .is_some_and(|e| e.contains("leasehold-engines.service")),
        "{b}"
    );
    let r = lab
        .run(
            Who::Landlord,
            "landlordctl",
            &[
                "budget",
                "set",
                "--memory-max",
                "1G",
                "--pids-max",
                "100",
                "--cpu-max",
                "200000 100000",
            ],
        )
        .ok();
    assert!(
        r.stderr
            .contains("warning: the budget is recorded but not written"),
        "{r:?}"
    );
    let text = lab
        .run(Who::Landlord, "landlordctl", &["budget", "show"])
        .ok()
        .stdout;
    assert!(
        text.contains("memory 1G") && text.contains("pids 100") && text.contains("2 CPUs"),
        "{text}"
    );

    // Bad input: field-path errors, nothing changed.
    let bad = lab.write_file("budget.toml", b"memory_max = \"1X\"\n");
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["budget", "set", bad.to_str().unwrap()],
    );
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("memory_max"), "{r:?}");
    assert!(r.stderr.contains("budget.toml"), "names the file: {r:?}");
    let unknown = lab.write_file("unknown.json", br#"{"memory": "1G"}"#);
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["budget", "set", unknown.to_str().unwrap()],
    );
    assert_eq!(r.code, 6, "{r:?}");
    let big = lab.write_file("big.toml", &vec![b'#'; 8192]);
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["budget", "set", big.to_str().unwrap()],
    );
    assert_eq!(r.code, 6, "{r:?}");
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["budget", "set", "--pids-max", "0"],
    );
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("budget.pids_max"), "{r:?}");
    let r = lab.run(Who::Landlord, "landlordctl", &["budget", "set"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(
        landlord(&lab, &["budget", "show"])["limits"]["pids_max"],
        100
    );

    // The tenant may not set it (polkit), outsiders never reach the agent.
    let r = lab.run(
        Who::Tenant,
        "landlordctl",
        &["budget", "set", "--pids-max", "100000"],
    );
    assert_eq!(r.code, 3, "{r:?}");
    let r = lab.run(Who::Outsider, "landlordctl", &["budget", "show"]);
    assert_eq!(r.code, 69, "{r:?}");

    // A tenant engine above the budget is refused, naming the field and
    // both values, before any image or volume is looked at.
    let spec = lab.write_file(
        "engine.toml",
        b"command = [\"/bin/app\"]\n[limits]\nmemory_max = \"2G\"\npids_max = 500\n",
    );
    let r = lab.run(
        Who::Tenant,
        "tenantctl",
        &[
            "engine",
            "deploy",
            "web",
            "app.tar",
            "--spec",
            spec.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 6, "{r:?}");
    assert!(
        r.stderr
            .contains("limits.memory_max: 2G is above the tenant budget 1G")
            && r.stderr
                .contains("limits.pids_max: 500 is above the tenant budget 100"),
        "{r:?}"
    );

    // `status` carries it.
    let st = landlord(&lab, &["status"]);
    assert_eq!(st["budget"]["limits"]["pids_max"], 100, "{st}");
    let text = lab.run(Who::Landlord, "landlordctl", &["status"]).stdout;
    assert!(
        text.contains("budget:") && text.contains("tenant usage:"),
        "{text}"
    );

    // The change is in the agent's log; recorded: a new agent has it.
    assert!(lab.agent_log().contains("tenant budget set"));
    lab.stop_agent();
    lab.start_agent();
    let b = landlord(&lab, &["budget", "show"]);
    assert_eq!(b["limits"]["pids_max"], 100, "{b}");

    // Cleared.
    let b = landlord(&lab, &["budget", "clear"]);
    assert_eq!(b["limits"]["pids_max"], Value::Null, "{b}");
}
