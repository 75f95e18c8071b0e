//! Cost of the restrictiveness check (issue 13): `excess`, `narrow` and
//! `Policy::effective` with 10 / 1k / 10k / 100k scattered landlord peers
//! (random single hosts, 90 % IPv4 and 10 % IPv6, over ten entries with
//! different protocols), against a tenant asking everything (0.0.0.0/0 and
//! ::/0) and a tenant asking 300 scattered hosts (half of them the
//! landlord's). Pure computation, no root.
//!
//! `cargo bench -p leasehold-tests --bench boundary_check` (release profile);
//! writes the `check` section of docs/benchmarks.md.

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use leasehold_netpolicy::check::{admits, intersection, Admitter};
use leasehold_netpolicy::model::Family;
use leasehold_netpolicy::policy::Policy;
use leasehold_netpolicy::{excess, narrow, Boundary, BoundaryDoc, Direction, Flow, Proto};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZES: [usize; 4] = [10, 1_000, 10_000, 100_000];
const RUNS: usize = 7;
const ENTRIES: usize = 10;

fn host(rng: &mut StdRng) -> String {
    if rng.gen_range(0..10) == 0 {
        Ipv6Addr::from(0xfd00_u128 << 112 | rng.gen_range(0..1u128 << 64)).to_string()
    } else {
        Ipv4Addr::from(rng.gen::<u32>()).to_string()
    }
}

/// The landlord's document: `hosts` spread over ten entries (all
/// protocols; tcp 22,443,8000-8080 in; udp 53 both ways; alternating).
fn cluster_doc(hosts: &[String]) -> BoundaryDoc {
    let mut toml = String::new();
    for i in 0..ENTRIES {
        let mine: Vec<String> = hosts
            .iter()
            .skip(i)
            .step_by(ENTRIES)
            .map(|h| format!("\"{h}\""))
            .collect();
        if mine.is_empty() {
            continue;
        }
        writeln!(
            toml,
            "[[allow]]\nname = \"e{i}\"\npeers = [{}]",
            mine.join(",")
        )
        .unwrap();
        match i % 3 {
            0 => {}
            1 => toml.push_str(
                "direction = \"in\"\nprotocols = [{ proto = \"tcp\", ports = [22, 443, \"8000-8080\"] }]\n",
            ),
            _ => toml.push_str("protocols = [{ proto = \"udp\", ports = [53] }]\n"),
        }
    }
    BoundaryDoc::from_toml(&toml).unwrap()
}

fn tenant_all() -> BoundaryDoc {
    BoundaryDoc::from_toml("[[allow]]\nname = \"all\"\npeers = [\"0.0.0.0/0\", \"::/0\"]\n")
        .unwrap()
}

fn tenant_some(hosts: &[String], rng: &mut StdRng) -> BoundaryDoc {
    let mut list: Vec<String> = (0..150)
        .map(|_| hosts[rng.gen_range(0..hosts.len())].clone())
        .collect();
    list.extend((0..150).map(|_| host(rng)));
    list.sort();
    list.dedup();
    let quoted: Vec<String> = list.iter().map(|p| format!("\"{p}\"")).collect();
    BoundaryDoc::from_toml(&format!(
        "[[allow]]\nname = \"some\"\npeers = [{}]\nprotocols = [{{ proto = \"tcp\", ports = [443, 8080] }}, {{ proto = \"udp\" }}]\n",
        quoted.join(",")
    ))
    .unwrap()
}

/// Nanoseconds per `admits` call; milliseconds to build an `Admitter` and
/// nanoseconds per `Admitter::admits` (medians of RUNS runs over 1M flows).
fn admits_cost(cluster: &Boundary, sub: &Boundary, rng: &mut StdRng) -> (f64, f64, f64) {
    let hosts: Vec<IpAddr> = cluster
        .allow
        .iter()
        .flat_map(|e| e.hosts.iter())
        .map(|&(f, v)| match f {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap())),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
        })
        .collect();
    let flows: Vec<Flow> = (0..1_000_000)
        .map(|i| Flow {
            direction: if i % 3 == 0 {
                Direction::Out
            } else {
                Direction::In
            },
            peer: if i % 2 == 0 {
                hosts[rng.gen_range(0..hosts.len())]
            } else {
                IpAddr::V4(Ipv4Addr::from(rng.gen::<u32>()))
            },
            proto: Proto::ALL[i % 4],
            port: rng.gen(),
        })
        .collect();
    let t = time(|| {
        flows
            .iter()
            .filter(|f| admits(cluster, Some(sub), f))
            .count()
    });
    let build = time(|| Admitter::new(cluster, Some(sub)));
    let a = Admitter::new(cluster, Some(sub));
    assert!(flows
        .iter()
        .take(10_000)
        .all(|f| a.admits(f) == admits(cluster, Some(sub), f)));
    let prebuilt = time(|| flows.iter().filter(|f| a.admits(f)).count());
    let per = |t: [Duration; 4]| t[1].as_secs_f64() * 1e9 / flows.len() as f64;
    (per(t), build[1].as_secs_f64() * 1e3, per(prebuilt))
}

/// This thread's CPU time (unlike wall time, not inflated while other jobs
/// hold the shared cores).
fn cpu_now() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    Duration::from(t)
}

/// Min / median / max wall time and median CPU time of RUNS runs.
fn time<T>(mut f: impl FnMut() -> T) -> [Duration; 4] {
    let (mut wall, mut cpu): (Vec<Duration>, Vec<Duration>) = (0..RUNS)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_now());
            black_box(f());
            (t.elapsed(), cpu_now() - c)
        })
        .unzip();
    wall.sort();
    cpu.sort();
    [wall[0], wall[RUNS / 2], wall[RUNS - 1], cpu[RUNS / 2]]
}

fn cell(t: [Duration; 4]) -> String {
    let ms = |d: Duration| {
        let x = d.as_secs_f64() * 1e3;
        if x < 1.0 {
            format!("{x:.3}")
        } else {
            format!("{x:.1}")
        }
    };
    format!("{} / {} / {} ({})", ms(t[0]), ms(t[1]), ms(t[2]), ms(t[3]))
}

fn main() {
    let mut out = String::new();
    writeln!(
        out,
        "## Boundaries: restrictiveness check (excess, narrow, effective)\n"
    )
    .unwrap();
    writeln!(
        out,
        "`cargo bench -p leasehold-tests --bench boundary_check` (release; pure computation)\n"
    )
    .unwrap();
    out.push_str(&leasehold_tests::markdown::machine());
    let virt = std::process::Command::new("systemd-detect-virt")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let hypervisor = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    writeln!(
        out,
        "- virtualisation: `systemd-detect-virt`: {virt}; CPU flag `hypervisor`: {} (hardware-assisted VM, not TCG)\n\
         - load average at start: {} (the cores are shared with other jobs: expect noise)\n",
        if hypervisor { "yes" } else { "no" },
        load.join(" ")
    )
    .unwrap();
    writeln!(
        out,
        "Landlord: N random single hosts (90 % IPv4, 10 % IPv6 in fd00::/16) over {ENTRIES} entries \
         (all protocols both ways / tcp 22,443,8000-8080 in / udp 53 both ways). Tenant \"all\": one entry \
         0.0.0.0/0 + ::/0, every protocol; tenant \"300\": 300 hosts, half of them the landlord's, \
         tcp 443,8080 and udp. `excess` and `narrow` take validated boundaries; `effective` is \
         `Policy::effective()` with the sub-boundary stored (it validates both documents, then \
         intersects, or gives the sub-boundary's own entries when it lies inside); tenant \"none\": no sub-boundary, `effective` is the cluster boundary. Milliseconds of wall time, min / median / max of {RUNS} runs, and in parentheses the median of the thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), which the other jobs on the shared cores do not inflate. Before issue 13 (quadratic \
         check) excess + narrow took 10 s at 32k and 81 s at 100k hosts, effective 24 s at 100k.\n"
    )
    .unwrap();
    writeln!(
        out,
        "| landlord peers | tenant | validate cluster (ms) | excess (ms) | narrow (ms) | effective (ms) | excess parts | narrowed entries (peers) |"
    )
    .unwrap();
    writeln!(out, "|---|---|---|---|---|---|---|---|").unwrap();
    let mut rng = StdRng::seed_from_u64(13);
    // LH_CHECK_SIZES=100000: only those rows (printed, the document is not written).
    let only: Option<Vec<usize>> = std::env::var("LH_CHECK_SIZES")
        .ok()
        .map(|v| v.split(',').map(|n| n.parse().unwrap()).collect());
    let mut admits_ns = Vec::new();
    for n in only.clone().unwrap_or(SIZES.to_vec()) {
        let hosts: Vec<String> = (0..n).map(|_| host(&mut rng)).collect();
        let cdoc = cluster_doc(&hosts);
        let validate = time(|| cdoc.validate(true).unwrap());
        let cluster: Boundary = cdoc.validate(true).unwrap();
        // No sub-boundary: effective is the cluster boundary (intersected
        // with itself, which resolves its groups).
        let policy = Policy {
            format: leasehold_netpolicy::policy::FORMAT,
            cluster: Some(cdoc.clone()),
            sub: None,
        };
        let eff = time(|| policy.effective().unwrap());
        let entries = policy.effective().unwrap().unwrap();
        let peers: usize = entries.iter().map(|e| e.peers.len()).sum();
        writeln!(
            out,
            "| {n} | none | {} | – | – | {} | – | {} ({peers}) |",
            cell(validate),
            cell(eff),
            entries.len()
        )
        .unwrap();
        let tenants = [
            ("all", tenant_all()),
            ("300", tenant_some(&hosts, &mut rng)),
        ];
        for (label, sdoc) in tenants {
            if label == "300" && n < 1_000 {
                continue;
            }
            let sub = sdoc.validate(false).unwrap();
            let ex = time(|| excess(&sub, &cluster));
            let na = time(|| narrow(&sub, &cluster));
            let policy = Policy {
                format: leasehold_netpolicy::policy::FORMAT,
                cluster: Some(cdoc.clone()),
                sub: Some(sdoc.clone()),
            };
            let eff = time(|| policy.effective().unwrap());
            if label == "all" {
                admits_ns.push((n, admits_cost(&cluster, &sub, &mut rng)));
            }
            let parts = excess(&sub, &cluster).len();
            let entries = intersection(&sub, &cluster);
            let peers: usize = entries.iter().map(|e| e.peers.len()).sum();
            eprintln!("{n} {label}: excess {ex:?} narrow {na:?} effective {eff:?}");
            writeln!(
                out,
                "| {n} | {label} | {} | {} | {} | {} | {parts} | {} ({peers}) |",
                cell(validate),
                cell(ex),
                cell(na),
                cell(eff),
                entries.len()
            )
            .unwrap();
        }
    }
    writeln!(
        out,
        "\nTesting flows (the conntrack cut; tenant \"all\"; 1M random flows, half of them from the \
         landlord's hosts; medians of {RUNS} runs): `admits(cluster, Some(sub), flow)` / \
         `Admitter::new(cluster, Some(sub))` once / `Admitter::admits(flow)`:\n"
    )
    .unwrap();
    for (n, (plain, build, pre)) in &admits_ns {
        writeln!(
            out,
            "- {n} peers: {plain:.0} ns per flow / built in {build:.1} ms / {pre:.0} ns per flow"
        )
        .unwrap();
    }
    if only.is_some() {
        println!("{out}");
        return;
    }
    leasehold_tests::markdown::write_section("check", &out);
}
