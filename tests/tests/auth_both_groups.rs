//! T1: a user in both Leasehold groups (issue 15, point 7) through the real
//! bus and polkitd: the shipped rules would give them both roles; the agent
//! refuses every call, says why, and logs it once per connection.

use leasehold_tests::matrix::{
    Expect, BOTH_GROUPS, BOTH_GROUPS_REASON, BOUNDARY_DOC, FAILSAFE_DOC, MATRIX, SPEC_DOC, SUB_DOC,
};
use leasehold_tests::{both_user, console_pem, Lab, Who};

/// The agent's log line for a refused user in both groups.
const LOG_LINE: &str = "is in both leasehold-landlord and leasehold-tenant";

fn both_lines(lab: &Lab) -> usize {
    lab.agent_log()
        .lines()
        .filter(|l| l.contains(LOG_LINE))
        .count()
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn auth_both_groups_user_is_refused_every_call_and_logged_once_per_connection() {
    let lab = Lab::start();
    let uid = both_user().uid;

    // One connection, 12 calls at once: all refused, one log line.
    assert_eq!(both_lines(&lab), 0);
    let burst = lab.run(Who::Both, "lh-dbus-probe", &["burst", "12"]).ok();
    let outcomes = burst.json();
    let outcomes = outcomes.as_object().unwrap();
    assert_eq!(
        outcomes.keys().collect::<Vec<_>>(),
        ["org.leasehold.Error.NotAuthorized"],
        "{burst:?}"
    );
    assert_eq!(outcomes["org.leasehold.Error.NotAuthorized"]["count"], 12);
    // The line is written before the reply is sent.
    assert_eq!(
        both_lines(&lab),
        1,
        "once per connection:\n{}",
        lab.agent_log()
    );

    // The refusal on the tenant interface says why, naming the uid.
    let r = lab.run(Who::Both, "lh-dbus-probe", &["tenant-info"]);
    assert!(
        r.stdout
            .starts_with("ERR org.leasehold.Error.NotAuthorized ")
            && r.stdout.contains(BOTH_GROUPS_REASON)
            && r.stdout.contains(&format!("uid {uid}")),
        "{r:?}"
    );
    assert_eq!(both_lines(&lab), 2, "a second connection logs again");

    // Every method of every interface, through the real CLIs.
    let pem = lab.write_file("console.pem", console_pem().as_bytes());
    let secret = lab.write_file("secret.txt", b"correct horse battery staple");
    let bdoc = lab.write_file("boundary.toml", BOUNDARY_DOC.as_bytes());
    let fdoc = lab.write_file("failsafe.toml", FAILSAFE_DOC.as_bytes());
    let sdoc = lab.write_file("sub.toml", SUB_DOC.as_bytes());
    let spec = lab.write_file("spec.toml", SPEC_DOC.as_bytes());
    let empty = lab.write_file("empty", b"");
    let mut failures = Vec::new();
    for c in MATRIX {
        let args: Vec<&str> = c
            .args
            .iter()
            .map(|a| match *a {
                "@PEM" => pem.to_str().unwrap(),
                "@SECRET" => secret.to_str().unwrap(),
                "@BOUNDARY" => bdoc.to_str().unwrap(),
                "@FAILSAFE" => fdoc.to_str().unwrap(),
                "@SUB" => sdoc.to_str().unwrap(),
                "@SPEC" => spec.to_str().unwrap(),
                "@EMPTY" => empty.to_str().unwrap(),
                other => other,
            })
            .collect();
        let r = lab.run(Who::Both, c.program, &args);
        let refused = BOTH_GROUPS.matches(c.allowed_code, r.code, &r.stderr)
            && r.stderr.contains(BOTH_GROUPS_REASON);
        if !refused {
            failures.push(format!(
                "{}.{}: expected {:?} ({BOTH_GROUPS_REASON}), got {r:?}",
                c.interface,
                c.method,
                Expect::Deny
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "calls of a user in both groups:\n{}",
        failures.join("\n")
    );

    // Nothing happened: no power action, no tenant assigned.
    assert!(lab.power.take().is_empty());
    let info = lab
        .run(Who::Root, "landlordctl", &["--json", "info"])
        .ok()
        .json();
    assert_eq!(info["assigned"], serde_json::json!(false), "{info}");
    // The real roles are unaffected.
    lab.run(Who::Landlord, "landlordctl", &["info"]).ok();
}
