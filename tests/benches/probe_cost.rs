//! What engines' probes cost the node, with the node's bound on probe
//! work (`[engines] probe_rate`, `probe_concurrency`; docs/engines.md,
//! "What probes may cost the node") at its defaults and opened to its
//! maxima, side by side in one run: the same engines, each with 8 exec
//! probes every 100 ms (the most a spec may ask for). Writes the
//! "probe_cost" section of docs/benchmarks.md.
//!
//! On this host, not emulated, with engines_host's stand-ins (a plain
//! directory for the tenant volume, cgroups without controllers; agentd
//! built with `bench-stand-ins` into `target/bench-stand-ins`). Each probe
//! is `lhmark count /data/runs` in the engine (one byte appended to a file
//! in its data dir), so the files' sizes are the runs. The agent's CPU is
//! its own and its reaped children's (the probe shims, and through them
//! the probe commands): `/proc/PID/stat` utime + stime + cutime + cstime.
//!
//! Needs root and rustc. `LH_BENCH_PROBE_ENGINES` (default 16) and
//! `LH_BENCH_PROBE_SECS` (10) size the run.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use leasehold_tests::engine_bench::{
    build_stand_ins, cells, cgroup2_mount, env_n, ok, sorted, stand_in_lab, CgroupUnit,
};
use leasehold_tests::{require_root, workspace_root, Lab, Who};

const PROBES: usize = 8;
const INTERVAL_MS: usize = 100;

/// One row's measurements.
struct Row {
    label: &'static str,
    rate: String,
    runs_per_s: f64,
    agent_cpu: f64,
    node_cpu: f64,
    threads: u64,
    ls_ms: Vec<f64>,
    delayed: u64,
    secs: f64,
}

struct Sample {
    at: Instant,
    runs: u64,
    agent_ticks: u64,
    busy: u64,
    total: u64,
}

fn ticks_per_s() -> f64 {
    leasehold_tests::markdown::cmd("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0)
}

/// utime + stime + cutime + cstime of `pid`.
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14-17 of proc(5), counted from the state (field 3) here.
    f[11..15].iter().map(|v| v.parse::<u64>().unwrap()).sum()
}

/// The node's busy and total CPU ticks (`/proc/stat`, all CPUs).
fn node_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    (total - idle, total)
}

/// Bytes in every file named `runs` under `dir`: the probe runs so far.
fn runs(dir: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                n += runs(&e.path());
            } else if e.file_name() == "runs" {
                n += e.metadata().map_or(0, |m| m.len());
            }
        }
    }
    n
}

fn sample(pid: u32, vol: &Path) -> Sample {
    let (busy, total) = node_ticks();
    Sample {
        at: Instant::now(),
        runs: runs(vol),
        agent_ticks: process_ticks(pid),
        busy,
        total,
    }
}

fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn tenant(lab: &Lab, bin: &Path, args: &[&str]) -> String {
    let o = ok(lab.command(Who::Tenant, &bin.join("tenantctl")).args(args));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn run_row(
    row: usize,
    label: &'static str,
    gate: Option<(u32, u32)>,
    bin: &Path,
    stage: &Path,
    engines: usize,
    window: Duration,
) -> Row {
    let cg2 = cgroup2_mount();
    let run = tempfile::Builder::new()
        .prefix("lh-probe-cost-")
        .tempdir()
        .unwrap();
    let vol = run.path().join("volume");
    std::fs::create_dir(&vol).unwrap();
    // A name per row: one left behind does not stop the next.
    let unit = format!("lh-probe-cost-{}-{row}", std::process::id());
    std::fs::create_dir(cg2.join(&unit)).unwrap();
    let subtree = CgroupUnit(cg2.join(&unit));
    let mut config = format!(
        "{}[engines]\ncgroup_root = {:?}\ncgroup_subtree = \"{unit}/tenant\"\nrun_dir = {:?}\n",
        leasehold_tests::PATIENT_AUTH_CONFIG,
        cg2.display().to_string(),
        run.path().join("run").display().to_string(),
    );
    if let Some((rate, at_once)) = gate {
        writeln!(config, "probe_rate = {rate}\nprobe_concurrency = {at_once}").unwrap();
    }
    let lab = stand_in_lab(config, bin, &vol);
    ok(lab
        .command(Who::Landlord, &bin.join("landlordctl"))
        .args(["--yes", "assign", "bench"]));
    let archive = stage.join("bb.tar").display().to_string();
    let spec = stage.join("probes.toml").display().to_string();
    let names: Vec<String> = (0..engines).map(|i| format!("q{i}")).collect();
    for n in &names {
        tenant(
            &lab,
            bin,
            &["engine", "deploy", n, &archive, "--spec", &spec],
        );
        tenant(&lab, bin, &["engine", "start", n]);
    }
    let t = Instant::now();
    for n in &names {
        while !tenant(&lab, bin, &["--json", "engine", "status", n]).contains("\"state\":\"ready\"")
        {
            assert!(t.elapsed() < Duration::from_secs(60), "{n} never ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let pid = lab.agent_pid().expect("the agent's pid");
    let delayed = || -> u64 {
        let status: serde_json::Value =
            serde_json::from_str(&tenant(&lab, bin, &["--json", "engine", "status", "q0"]))
                .unwrap();
        status["probes_delayed"].as_u64().unwrap_or(0)
    };
    // Past the first second's burst and every engine's first interval.
    std::thread::sleep(Duration::from_secs(2));
    let delayed_a = delayed();
    let a = sample(pid, &vol);
    std::thread::sleep(window);
    let b = sample(pid, &vol);
    let th = threads(pid);
    let delayed_b = delayed();
    // How the agent answers while it probes: a client call each.
    let mut ls_ms = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        tenant(&lab, bin, &["engine", "ls"]);
        ls_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let hz = ticks_per_s();
    drop(lab);
    drop(subtree);
    Row {
        label,
        // agentd's DEFAULT_RATE and DEFAULT_CONCURRENCY (a binary crate).
        rate: gate.map_or("defaults: 32 a second, 32 at once".to_owned(), |(r, c)| {
            format!("{r} a second, {c} at once")
        }),
        runs_per_s: (b.runs - a.runs) as f64 / secs,
        agent_cpu: (b.agent_ticks - a.agent_ticks) as f64 / hz / secs * 100.0,
        node_cpu: (b.busy - a.busy) as f64 / (b.total - a.total) as f64 * 100.0,
        threads: th,
        ls_ms: sorted(ls_ms),
        delayed: delayed_b.saturating_sub(delayed_a),
        secs,
    }
}

fn main() {
    require_root();
    let engines = env_n("LH_BENCH_PROBE_ENGINES", 16) as usize;
    let window = Duration::from_secs(u64::from(env_n("LH_BENCH_PROBE_SECS", 10)));
    let bin = build_stand_ins();
    let stage = workspace_root().join("target/probe-cost");
    leasehold_tests::engine_bench::stage(&stage, &stage.join("rootfs"));
    let mut spec = String::from(
        "command = [\"/lhmark\", \"idle\"]\nstop_grace = \"1s\"\ndata_dirs = [\"data\"]\n[restart]\npolicy = \"never\"\n",
    );
    for _ in 0..PROBES {
        write!(
            spec,
            "[[probes]]\nexec = [\"/lhmark\", \"count\", \"/data/runs\"]\ninterval = \"{INTERVAL_MS}ms\"\ntimeout = \"90ms\"\nthreshold = 100\n"
        )
        .unwrap();
    }
    std::fs::write(stage.join("probes.toml"), &spec).unwrap();
    ok(Command::new("chmod").args(["-R", "a+rX"]).arg(&stage));
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rows = [
        run_row(
            0,
            "bound at its defaults",
            None,
            &bin,
            &stage,
            engines,
            window,
        ),
        run_row(
            1,
            "bound at 128 a second (its first default)",
            Some((128, 32)),
            &bin,
            &stage,
            engines,
            window,
        ),
        run_row(
            2,
            "bound opened to its maxima",
            Some((10_000, 1024)),
            &bin,
            &stage,
            engines,
            window,
        ),
    ];
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let demand = engines * PROBES * 1000 / INTERVAL_MS;
    let mut s = String::new();
    writeln!(
        s,
        "## What probes cost the node, with its bound on probe work and without\n"
    )
    .unwrap();
    writeln!(s, "`cargo bench -p leasehold-tests --bench probe_cost` (root). On this host's CPU, not TCG; engines_host's stand-ins (a plain directory for the tenant volume, cgroups without controllers), the lab's dbus-daemon and polkitd, agentd `--dev` on swtpm, release build. {engines} engines (`lhmark idle`), each with {PROBES} exec probes every {INTERVAL_MS} ms (the most a spec may ask for): {demand} runs a second asked for. Each probe runs `lhmark count /data/runs` in its engine (a byte appended in its data dir: the files' sizes are the runs). Measured over {} s after every engine was ready and 2 s more; one agent per row, rows one after the other. Agent CPU: its own and its reaped children's (the probe shims and, through them, the probe commands; `/proc/PID/stat`), % of one CPU; node CPU from `/proc/stat` ticks (sampled differently: the two do not add up exactly). Runs that timed out (90 ms) append nothing and are not counted. `probes_delayed`: q0's runs that began to wait during the window. `tenantctl engine ls`: 10 calls right after the window, the probes still running.\n", window.as_secs()).unwrap();
    s.push_str(&leasehold_tests::markdown::machine());
    writeln!(
        s,
        "- load average before / after: {} / {}\n",
        load0
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load1
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
    .unwrap();
    writeln!(s, "| row | `[engines] probe_rate`, `probe_concurrency` | probe runs a second | agent CPU (with its probes) | node CPU busy (all CPUs) | agent threads at the end | q0's runs that waited | `tenantctl engine ls`: n | p50 | p99 | max |").unwrap();
    writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|").unwrap();
    for r in &rows {
        writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} % | {:.0} % | {} | {} | {} |",
            r.label,
            r.rate,
            r.runs_per_s,
            r.agent_cpu,
            r.node_cpu,
            r.threads,
            r.delayed,
            cells(&r.ls_ms, 1)
        )
        .unwrap();
    }
    writeln!(
        s,
        "\nWindows: {}.",
        rows.iter()
            .map(|r| format!("{:.1} s", r.secs))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .unwrap();
    print!("{s}");
    leasehold_tests::markdown::write_section("probe_cost", &s);
}
