//! Link and address changes to events (issue 16, R5): in a network
//! namespace of its own, a veth pair; `ip` sets one end down and up and
//! adds and removes an address, 20 times each; every change is waited for
//! on the watcher's event channel (never slept for) and timed from just
//! before `ip` starts to the watcher's own stamp (when it read the
//! notification). The peer's carrier is announced by the kernel's
//! linkwatch, which batches carrier changes (at most one run a second),
//! so it has a row of its own. Needs root.
//!
//! `cargo bench -p leasehold-tests --bench netlink_events --profile dev`
//! (the time is the kernel's and `ip`'s, not the agent's code: no release
//! build needed); writes the `netlink` section of docs/benchmarks.md.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use leasehold_health::net::{NetEventKind, NetWatch, Stamped};

const ROUNDS: usize = 20;

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(o.status.success(), "ip {args:?}: {o:?}");
}

/// Runs `ip args`, waits for every `(kind, iface)` of `want` and returns
/// each one's time from just before `ip` started.
fn change(rx: &Receiver<Stamped>, args: &[&str], want: &[(NetEventKind, &str)]) -> Vec<Duration> {
    let t0 = Instant::now();
    ip(args);
    let mut got: Vec<Option<Duration>> = vec![None; want.len()];
    let deadline = t0 + Duration::from_secs(5);
    while got.iter().any(Option::is_none) {
        let s = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|e| panic!("ip {args:?}: {e}; waiting for {want:?}, got {got:?}"));
        for (i, (k, iface)) in want.iter().enumerate() {
            if got[i].is_none() && s.event.kind == *k && s.event.iface == *iface {
                got[i] = Some(s.at.saturating_duration_since(t0));
                break;
            }
        }
    }
    got.into_iter().map(Option::unwrap).collect()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn row(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    format!(
        "| {name} | {} | {} | {} | {} |\n",
        v.len(),
        ms(at(50)),
        ms(at(99)),
        ms(v[v.len() - 1])
    )
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("netlink_events: needs root (network namespaces); skipped");
        return;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    ip(&["link", "set", "lo", "up"]);
    ip(&[
        "link", "add", "lhb0", "type", "veth", "peer", "name", "lhb1",
    ]);
    ip(&["link", "set", "lhb1", "up"]);
    let w = NetWatch::start().unwrap();
    let rx = w.subscribe();
    use NetEventKind as K;
    let mut rows: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut exec = Vec::new();
    for i in 0..ROUNDS {
        let t = change(
            &rx,
            &["link", "set", "lhb0", "up"],
            &[(K::AdminUp, "lhb0"), (K::CarrierUp, "lhb1")],
        );
        rows.entry("a. link set up → admin-up")
            .or_default()
            .push(t[0]);
        rows.entry("e. peer carrier-up (linkwatch)")
            .or_default()
            .push(t[1]);
        let a = format!("10.97.{i}.1/24");
        let t = change(
            &rx,
            &["addr", "add", &a, "dev", "lhb0"],
            &[(K::AddressAdded, "lhb0")],
        );
        rows.entry("c. addr add → address-added")
            .or_default()
            .push(t[0]);
        let t = change(
            &rx,
            &["addr", "del", &a, "dev", "lhb0"],
            &[(K::AddressRemoved, "lhb0")],
        );
        rows.entry("d. addr del → address-removed")
            .or_default()
            .push(t[0]);
        let t = change(
            &rx,
            &["link", "set", "lhb0", "down"],
            &[(K::AdminDown, "lhb0"), (K::CarrierDown, "lhb1")],
        );
        rows.entry("b. link set down → admin-down")
            .or_default()
            .push(t[0]);
        rows.entry("f. peer carrier-down (linkwatch)")
            .or_default()
            .push(t[1]);
        // What running `ip` costs by itself (fork, exec, netlink request).
        let t0 = Instant::now();
        ip(&["link", "show", "lo"]);
        exec.push(t0.elapsed());
    }
    let snap = w.snapshot();
    assert_eq!(snap.resyncs, 0, "notifications were lost");

    let mut out = String::from(
        "## Link and address events (rtnetlink)\n\n`cargo bench -p leasehold-tests --bench netlink_events --profile dev`\n\n",
    );
    out.push_str(&leasehold_tests::markdown::machine());
    out.push_str(
        "- stack: the health crate's `NetWatch` in a network namespace of its own, a veth pair; each change made by `ip` and waited for on the event channel; time from just before `ip` starts to the watcher's stamp (when it read the notification); debug build\n\n",
    );
    out.push_str("| change → event | n | p50 | p99 | max |\n|---|---|---|---|---|\n");
    for (name, v) in rows {
        out.push_str(&row(&name[3..], v));
    }
    out.push_str(&row(
        "`ip link show lo` alone (fork + exec + one request)",
        exec,
    ));
    out.push_str(&format!(
        "\n{} events in all, no notification lost. Changes made on the link itself are announced by the kernel as they are made: the time is mostly `ip`'s own start (last row). The peer's carrier is announced through linkwatch, which the kernel may hold back up to a second when carrier changes come close together; here each change was waited for before the next. Flapping back to back (the T1 test `netlink_flaps_and_address_changes_are_events`), several flaps came as one message; the carrier counters (IFLA_CARRIER_UP_COUNT/DOWN_COUNT) make them into as many events.\n",
        snap.events_total
    ));
    leasehold_tests::markdown::write_section("netlink", &out);
}
