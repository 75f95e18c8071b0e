//! Latency of a read-only D-Bus call (Landlord1.NodeInfo, polkit-checked)
//! through the real stack: dbus-daemon, polkitd with the shipped rules,
//! agentd --dev on swtpm. The client runs as the landlord test user.
//! Run as root: `cargo bench -p leasehold-tests --bench dbus_latency`.

use std::fmt::Write as _;

use leasehold_tests::{Lab, Who};

fn main() {
    let lab = Lab::start();
    let mut out = String::new();
    writeln!(out, "## D-Bus call latency (NodeInfo, polkit-authorized)\n").unwrap();
    writeln!(
        out,
        "`cargo bench -p leasehold-tests --bench dbus_latency`\n"
    )
    .unwrap();
    out.push_str(&leasehold_tests::markdown::machine());
    writeln!(
        out,
        "- stack: private dbus-daemon (system config), polkitd 122 with the shipped rules, agentd --dev (swtpm); \
         client as a member of leasehold-landlord; every call = GetConnectionUnixUser + polkit CheckAuthorization + key-thread round trip\n"
    )
    .unwrap();
    writeln!(out, "| load | calls | p50 | p99 | max | throughput |").unwrap();
    writeln!(out, "|---|---|---|---|---|---|").unwrap();
    for (label, n, clients) in [
        ("1,000 sequential calls, 1 client", 1000, 1),
        ("8 concurrent clients x 250 calls", 250, 8),
    ] {
        let r = lab
            .run(
                Who::Landlord,
                "lh-dbus-probe",
                &["bench", &n.to_string(), &clients.to_string()],
            )
            .ok();
        let v = r.json();
        writeln!(
            out,
            "| {label} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.0}/s |",
            v["calls"],
            v["p50_ms"].as_f64().unwrap(),
            v["p99_ms"].as_f64().unwrap(),
            v["max_ms"].as_f64().unwrap(),
            v["throughput_per_s"].as_f64().unwrap()
        )
        .unwrap();
    }
    print!("{out}");
    leasehold_tests::markdown::write_section("dbus", &out);
}
