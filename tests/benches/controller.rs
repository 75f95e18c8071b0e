//! Reads while the node controller runs destroying changes: Landlord1
//! NodeInfo latency (polkit-authorized, answered from the controller's
//! snapshot) with nothing else running, then while a tenant rotates its
//! keys back to back (each rotation: key wipe, TPM erase, new pair on swtpm,
//! receipt signed), measured side by side in the same run.
//! Run as root: `cargo bench -p leasehold-tests --bench controller`.

use std::fmt::Write as _;
use std::process::Stdio;

use leasehold_tests::{bin, Lab, Who};

const SECS: &str = "20";

fn hammer(lab: &Lab, who: Who, op: &str) -> std::process::Child {
    lab.command(who, &bin("lh-dbus-probe"))
        .args(["hammer", op, SECS])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn result(c: std::process::Child) -> serde_json::Value {
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

fn row(out: &mut String, label: &str, v: &serde_json::Value) {
    writeln!(
        out,
        "| {label} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
        v["calls"],
        v["p50_ms"].as_f64().unwrap(),
        v["p99_ms"].as_f64().unwrap(),
        v["max_ms"].as_f64().unwrap()
    )
    .unwrap();
}

fn main() {
    let lab = Lab::start();
    lab.run(Who::Root, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
    let mut out = String::new();
    writeln!(out, "## Node controller: reads during destroying changes\n").unwrap();
    writeln!(out, "`cargo bench -p leasehold-tests --bench controller`\n").unwrap();
    out.push_str(&leasehold_tests::markdown::machine());
    writeln!(
        out,
        "- stack: private dbus-daemon, polkitd with the shipped rules, agentd --dev (swtpm, no volume); \
         one landlord client calling NodeInfo back to back for {SECS} s; each row measured in the same run\n"
    )
    .unwrap();
    writeln!(out, "| load | calls | p50 | p99 | max |").unwrap();
    writeln!(out, "|---|---|---|---|---|").unwrap();
    let idle = result(hammer(&lab, Who::Landlord, "landlord-info"));
    row(&mut out, "landlord NodeInfo, node idle", &idle);
    let rotator = hammer(&lab, Who::Tenant, "tenant-rotate");
    let busy = result(hammer(&lab, Who::Landlord, "landlord-info"));
    let rot = result(rotator);
    row(
        &mut out,
        "landlord NodeInfo, tenant rotating back to back",
        &busy,
    );
    row(
        &mut out,
        "the tenant's RotateKeys (call to signed receipt)",
        &rot,
    );
    let again = result(hammer(&lab, Who::Landlord, "landlord-info"));
    row(&mut out, "landlord NodeInfo, node idle again", &again);
    print!("{out}");
    leasehold_tests::markdown::write_section("controller", &out);
}
