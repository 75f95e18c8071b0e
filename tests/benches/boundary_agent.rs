//! One-peer boundary changes through the agent (issue 13, point 6): the
//! landlord's AddPeers / RemovePeers of one host over D-Bus (polkit
//! checked) against a cluster boundary of N hosts, on the real stack:
//! dbus-daemon, polkitd with the shipped rules, agentd --dev in a network
//! namespace of its own, nftables in that namespace, boundary.json on the
//! lab's disk. Each sample is call → reply; the agent replies after the
//! kernel has the element (checked once per size with `nft get element`).
//! Run as root: `cargo bench -p leasehold-tests --bench boundary_agent`.

use std::fmt::Write as _;
use std::process::Command;

use leasehold_tests::{Lab, Who};

struct NsGuard(String);

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn doc(hosts: usize) -> String {
    let peers: Vec<String> = (0..hosts)
        .map(|i| {
            format!(
                "\"10.{}.{}.{}\"",
                1 + i / 62_500,
                (i / 250) % 250,
                i % 250 + 1
            )
        })
        .collect();
    format!(
        "{{\"allow\": [{{\"name\": \"bulk\", \"peers\": [{}]}}], \
         \"failsafe\": [{{\"name\": \"ssh\", \"peers\": [\"192.0.2.10\"], \"direction\": \"in\", \
         \"protocols\": [{{\"proto\": \"tcp\", \"ports\": [22]}}]}}]}}",
        peers.join(",")
    )
}

/// The agent's peer-change log lines, ANSI colour codes removed.
fn phase_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("boundary-peers"))
        .map(|l| {
            let mut out = String::new();
            let mut chars = l.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            out
        })
        .collect()
}

/// Per call: reply time minus save and cut (what follows the kernel's
/// change), as "min / median / p99 / max" for adds and for removals.
fn reply_minus_after_kernel(v: &serde_json::Value, lines: &[String]) -> [String; 2] {
    [("add_us", true), ("remove_us", false)].map(|(key, add)| {
        let replies: Vec<u64> = v[key]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect();
        let after: Vec<u64> = lines
            .iter()
            .filter(|l| l.contains(&format!("add={add}")))
            .map(|l| field(l, "save_us").unwrap_or(0) + field(l, "cut_us").unwrap_or(0))
            .collect();
        assert_eq!(replies.len(), after.len(), "one log line per call ({key})");
        let mut d: Vec<u64> = replies
            .iter()
            .zip(&after)
            .map(|(r, a)| r.saturating_sub(*a))
            .collect();
        d.sort_unstable();
        let ms = |i: usize| format!("{:.2}", d[i] as f64 / 1e3);
        let last = d.len() - 1;
        format!(
            "{} / {} / {} / {}",
            ms(0),
            ms(last / 2),
            ms(last * 99 / 100),
            ms(last)
        )
    })
}

fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn main() {
    let ns = format!("lhbench{}", std::process::id());
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    let _guard = NsGuard(ns.clone());
    Command::new("ip")
        .args(["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])
        .status()
        .unwrap();
    let lab = Lab::start_in(&ns);
    let calls: usize = std::env::var("LH_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut out = String::new();
    writeln!(
        out,
        "## Boundary: one-peer change through the agent (AddPeers/RemovePeers, polkit-authorized)\n"
    )
    .unwrap();
    writeln!(
        out,
        "`cargo bench -p leasehold-tests --bench boundary_agent` (LH_BENCH_CALLS={calls} add + remove pairs per size)\n"
    )
    .unwrap();
    out.push_str(&leasehold_tests::markdown::machine());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    writeln!(out, "- load average at start: {}", load.join(" ")).unwrap();
    writeln!(
        out,
        "- stack: private dbus-daemon, polkitd 122 with the shipped rules, agentd --dev in its own network namespace; \
         client (lh-dbus-probe) as a member of leasehold-landlord, one connection; each sample = one call → reply \
         (authorization: polkit's yes reused on the connection for 5 s, `[dbus] auth_reuse_ms`; controller, peer edit, kernel element change over netlink, the edit stored on ext4 \
         as a journal record, fdatasync'd; a removal also cuts the removed peer's connections); the reply comes after the kernel has the element\n"
    )
    .unwrap();
    writeln!(
        out,
        "| peers | call | samples | min | median | p99 | max | change |"
    )
    .unwrap();
    writeln!(out, "|---|---|---|---|---|---|---|---|").unwrap();
    let sizes: Vec<usize> = std::env::var("LH_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 100_000]);
    let mut phases: Vec<(usize, Vec<String>)> = Vec::new();
    let mut to_kernel: Vec<(usize, [String; 2])> = Vec::new();
    for n in sizes {
        let file = lab.write_file("bulk.json", doc(n).as_bytes());
        lab.run(
            Who::Landlord,
            "landlordctl",
            &["boundary", "set", file.to_str().unwrap()],
        )
        .ok();
        // The kernel has the element when the reply returns.
        lab.run(
            Who::Landlord,
            "landlordctl",
            &["boundary", "add-peer", "bulk", "10.251.0.1"],
        )
        .ok();
        let sets = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-t", "list", "sets", "inet"])
            .output()
            .unwrap();
        let sets = String::from_utf8_lossy(&sets.stdout);
        let set = sets
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("set lla0_h4")
                    .map(|rest| format!("lla0_h4{}", rest.trim_end_matches('{').trim()))
            })
            .expect("hash set of entry 0");
        let got = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "nft",
                "get",
                "element",
                "inet",
                "leasehold",
                &set,
                "{ 10.251.0.1 }",
            ])
            .status()
            .unwrap();
        assert!(got.success(), "the kernel has the added element");
        let before = phase_lines(&lab.agent_log()).len();
        let r = lab
            .run(
                Who::Landlord,
                "lh-dbus-probe",
                &["peers", &calls.to_string(), "bulk"],
            )
            .ok();
        let lines = phase_lines(&lab.agent_log());
        phases.push((n, lines[before..].to_vec()));
        let v = r.json();
        to_kernel.push((n, reply_minus_after_kernel(&v, &lines[before..])));
        assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
        for what in ["add", "remove"] {
            let s = &v[what];
            writeln!(
                out,
                "| {n} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} |",
                if what == "add" {
                    "AddPeers"
                } else {
                    "RemovePeers"
                },
                s["calls"],
                s["min_ms"].as_f64().unwrap(),
                s["p50_ms"].as_f64().unwrap(),
                s["p99_ms"].as_f64().unwrap(),
                s["max_ms"].as_f64().unwrap(),
                v["changes"]
            )
            .unwrap();
        }
    }
    writeln!(
        out,
        "\nInside the agent (its `event=boundary-peers` log line per change; median / p99 over the same calls, µs): \
         lock wait = waiting for the boundary lock (a drift check reading the table back holds it), edit = policy edit + incremental boundary update under the lock, \
         warn = the warnings (a removal looks up the removed peers' open SSH sessions in the conntrack mirror), kernel = the enforcer's element change over netlink (single hosts), \
         apply = a full ruleset apply (only when the change is not single hosts), save = a journal record appended and fdatasync'd (every 256th edit: boundary.json rewritten, fsync, rename, fsync dir), \
         cut = cutting the removed peers' open connections, found in the conntrack mirror (removals only, after the commit, outside the lock, before the reply).\n"
    )
    .unwrap();
    writeln!(
        out,
        "| peers | call | lock wait | edit | warn | kernel | apply | save | cut |"
    )
    .unwrap();
    writeln!(out, "|---|---|---|---|---|---|---|---|---|").unwrap();
    for (n, lines) in &phases {
        for (call, add) in [("AddPeers", true), ("RemovePeers", false)] {
            let col = |k: &str| {
                let mut v: Vec<u64> = lines
                    .iter()
                    .filter(|l| l.contains(&format!("add={add}")))
                    .filter_map(|l| field(l, k))
                    .collect();
                v.sort_unstable();
                if v.is_empty() {
                    return "?".to_owned();
                }
                format!("{} / {}", v[(v.len() - 1) / 2], v[(v.len() - 1) * 99 / 100])
            };
            writeln!(
                out,
                "| {n} | {call} | {} | {} | {} | {} | {} | {} | {} |",
                col("lock_us"),
                col("edit_us"),
                col("warn_us"),
                col("build_us"),
                col("apply_us"),
                col("save_us"),
                col("cut_us")
            )
            .unwrap();
        }
    }
    writeln!(
        out,
        "\nCall → kernel, per call: the client's call → reply time minus what the agent does after \
         the kernel has the change (save and cut, from the same call's log line; calls and lines \
         paired in order). min / median / p99 / max, ms.\n\n| peers | AddPeers | RemovePeers |\n|---|---|---|"
    )
    .unwrap();
    for (n, [add, remove]) in &to_kernel {
        writeln!(out, "| {n} | {add} | {remove} |").unwrap();
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    writeln!(out, "\nLoad average at the end: {}.", load.join(" ")).unwrap();
    print!("{out}");
    leasehold_tests::markdown::write_section("boundary_agent", &out);
}
