//! Latency of a read-only D-Bus call (Landlord1.NodeInfo, polkit-checked)
//! through the real stack: dbus-daemon, polkitd with the shipped rules,
//! agentd --dev on swtpm. The client runs as the landlord test user.
//! Run as root: `cargo bench -p leasehold-tests --bench dbus_latency`.

use std::fmt::Write as _;

use leasehold_tests::{Lab, LabOptions, Who};

fn main() {
    let lab = Lab::start();
    // The tenant's NodeInfo needs an assigned node (flood row).
    lab.run(Who::Landlord, "landlordctl", &["assign", "acme"])
        .ok();
    let mut out = String::new();
    writeln!(out, "## D-Bus call latency (NodeInfo, polkit-authorized)\n").unwrap();
    writeln!(
        out,
        "`cargo bench -p leasehold-tests --bench dbus_latency`\n"
    )
    .unwrap();
    out.push_str(&leasehold_tests::markdown::machine());
    // The host is shared: say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    writeln!(out, "- load average at start: {}", load.join(" ")).unwrap();
    writeln!(
        out,
        "- stack: private dbus-daemon (system config), polkitd 122 with the shipped rules, agentd --dev (swtpm); \
         client as a member of leasehold-landlord; every call = polkit CheckAuthorization about the caller's process \
         (pid, start time, the bus's uid) + key-thread round trip (uid and pid cached per connection: one \
         GetConnectionCredentials per client; polkit's yes reused on the same connection for 5 s, \
         `[dbus] auth_reuse_ms`, so a client on one connection asks polkit about once per 5 s; the \
         \"new connection per call\" row asks it every call, like one CLI run each)\n"
    )
    .unwrap();
    writeln!(out, "| load | calls | p50 | p99 | max | throughput |").unwrap();
    writeln!(out, "|---|---|---|---|---|---|").unwrap();
    let broker_lab = Lab::start_with_options(LabOptions {
        dbus_broker: true,
        ..LabOptions::default()
    });
    broker_lab
        .run(Who::Landlord, "landlordctl", &["assign", "acme"])
        .ok();
    for (label, lab, n, clients, target) in [
        (
            "1,000 sequential calls, 1 client",
            &lab,
            1000,
            1,
            "landlord",
        ),
        ("8 concurrent clients x 250 calls", &lab, 250, 8, "landlord"),
        (
            "1,000 sequential calls, a new connection per call (one CLI run each)",
            &lab,
            1000,
            1,
            "landlord-fresh",
        ),
        (
            "1,000 sequential calls, 1 client, dbus-broker",
            &broker_lab,
            1000,
            1,
            "landlord",
        ),
        (
            "1,000 sequential calls, a new connection per call, dbus-broker",
            &broker_lab,
            1000,
            1,
            "landlord-fresh",
        ),
    ] {
        let r = lab
            .run(
                Who::Landlord,
                "lh-dbus-probe",
                &["bench", &n.to_string(), &clients.to_string(), target],
            )
            .ok();
        let v = r.json();
        assert_eq!(
            v["errors"].as_array().map(Vec::len),
            Some(0),
            "{label}: {v}"
        );
        out.push_str(&row(label, &v));
    }
    // An outsider floods (waves of 2,000 concurrent calls from 40
    // connections, plus two 8 MiB messages at a time) while the landlord
    // and the tenant each make sequential calls, and the landlord times the
    // bus's own round trip. Once with the CPU groups of a systemd node
    // (the lab's default), once flat (the baseline, its own lab).
    let flood = leasehold_tests::flood::Flood::DEFAULT;
    let layout = lab.cpu_layout();
    let run = leasehold_tests::flood::during_outsider_flood(&lab, 1000, flood);
    let flat_lab = Lab::start_flat();
    flat_lab
        .run(Who::Landlord, "landlordctl", &["assign", "acme"])
        .ok();
    let flat = leasehold_tests::flood::during_outsider_flood(&flat_lab, 1000, flood);
    let flat_layout = flat_lab.cpu_layout();
    drop(flat_lab);
    // The same flood with dbus-broker as the bus (docs/dbus.md "Bus
    // implementation"), CPU groups as on a node.
    let broker = leasehold_tests::flood::during_outsider_flood(&broker_lab, 1000, flood);
    drop(broker_lab);
    writeln!(
        out,
        "\n| during an outsider flood, 1 client each, run together | calls | p50 | p99 | max | throughput |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    for (layout_label, r) in [
        ("CPU groups", &run),
        ("flat (baseline)", &flat),
        ("dbus-broker, CPU groups", &broker),
    ] {
        let rows = [
            ("landlord NodeInfo", &r.landlord),
            ("tenant NodeInfo", r.tenant.as_ref().unwrap()),
        ]
        .into_iter()
        .chain(r.floors.iter().map(|(l, v)| (*l, v)));
        for (who, v) in rows {
            assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
            out.push_str(&row(&format!("{who}, {layout_label}"), v));
        }
    }
    writeln!(
        out,
        "\nOutsider flood: waves of {} concurrent calls from {} connections plus two {} MiB messages at a time, \
         refused by the bus policy (none reached the agent). CPU groups: {layout}; {} waves, outcomes {}, \
         agentd RSS {} KiB before, {} KiB after. Flat: {flat_layout}; {} waves, outcomes {}. \
         dbus-broker (the same bus configuration, CPU groups): {} waves, outcomes {}. \
         On a node the groups are systemd's: the agent's unit delegates its cgroup, which turns the cpu \
         controller on from the root down, so user.slice (every login, the outsider's included) and \
         system.slice (bus, polkitd, agentd) share the CPU as two groups.",
        flood.conns * flood.per_conn,
        flood.conns,
        flood.big_mib,
        run.flood["waves"],
        run.flood["results"],
        run.agent_rss_kib.0,
        run.agent_rss_kib.1,
        flat.flood["waves"],
        flat.flood["results"],
        broker.flood["waves"],
        broker.flood["results"],
    )
    .unwrap();
    // The same flood from a member of leasehold-tenant: it passes the bus
    // policy and reaches the agent, which answers Busy beyond 16 in flight.
    let member = leasehold_tests::flood::during_flood(&lab, Who::Tenant, 1000, flood);
    let v = &member.landlord;
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
    writeln!(
        out,
        "\n| load | calls | p50 | p99 | max | throughput |\n|---|---|---|---|---|---|\n{}\n\
         Member flood: {} waves; outcomes {} (reached the agent; Busy beyond 16 calls in flight). \
         agentd RSS {} KiB before, {} KiB after.",
        row(
            "landlord calls during the same flood by a leasehold-tenant member, 1 client",
            v
        ),
        member.flood["waves"],
        member.flood["results"],
        member.agent_rss_kib.0,
        member.agent_rss_kib.1,
    )
    .unwrap();
    print!("{out}");
    leasehold_tests::markdown::write_section("dbus", &out);
}

/// One table row from `lh-dbus-probe bench`'s JSON.
fn row(label: &str, v: &serde_json::Value) -> String {
    format!(
        "| {label} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.0}/s |\n",
        v["calls"],
        v["p50_ms"].as_f64().unwrap(),
        v["p99_ms"].as_f64().unwrap(),
        v["max_ms"].as_f64().unwrap(),
        v["throughput_per_s"].as_f64().unwrap()
    )
}
