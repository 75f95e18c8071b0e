//! Issue 14's start and restart figures off emulation: the agent's whole
//! start path — `tenantctl` → dbus-daemon → polkitd → agentd (controller,
//! runtime) → the shim → the engine — on this host, side by side with
//! `crun run`, the same static marker and the same root filesystem as
//! engines_vm (tests/src/engine_bench.rs). Writes the "engines_host"
//! section of docs/benchmarks.md.
//!
//! The host has no device-mapper and no cgroup v2 controllers, so agentd is
//! a build with the feature `bench-stand-ins` (agentd/src/engines/stand_in.rs):
//! a plain directory stands for the tenant volume, and the engines' cgroups
//! are real cgroup v2 directories (the shim's join is a real migration)
//! without controllers or limits. Everything else is what the tests run:
//! the lab's dbus-daemon and polkitd with the shipped policy, agentd
//! `--dev` on swtpm, the CLIs as the test users. No systemd on this host:
//! no `systemd-run` rows (engines_vm has them, on the lab node).
//!
//! Needs root, crun and rustc. Builds its binaries itself, release profile,
//! into `target/bench-stand-ins` (apart from every other build: no other
//! agentd ever has the stand-ins). `LH_BENCH_STARTS` (default 100) and
//! `LH_BENCH_RESTARTS` (50) size the run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use leasehold_tests::engine_bench::{
    build_stand_ins as build, cells, cgroup2_mount, env_n, ms, ok, pct, sorted, stand_in_lab,
    started_split, CgroupUnit,
};
use leasehold_tests::{require_root, workspace_root, Lab, Who};

/// The numbers after `key` at the start of lines (`t0 NS`, `first NS`).
fn stamps(text: &str, key: &str) -> Vec<u128> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .collect()
}

/// `KIND NS` lines of an engine's log (`… out first NS`), in log order.
fn log_stamps(log: &str, kind: &str) -> Vec<u128> {
    let pat = format!(" out {kind} ");
    log.lines()
        .filter_map(|l| l.split_once(&pat)?.1.trim().parse().ok())
        .collect()
}

/// Each exit paired with the first instruction that follows it, in time
/// order (an instance's first line not after an exit, A's own, is skipped).
fn exit_first_pairs(exits: Vec<u128>, firsts: Vec<u128>) -> Vec<(u128, u128)> {
    let mut ev: Vec<(u128, bool)> = exits
        .into_iter()
        .map(|t| (t, true))
        .chain(firsts.into_iter().map(|t| (t, false)))
        .collect();
    ev.sort_unstable();
    let mut out = Vec::new();
    let mut exit = None;
    for (t, is_exit) in ev {
        match (is_exit, exit) {
            (true, _) => exit = Some(t),
            (false, Some(e)) => {
                out.push((e, t));
                exit = None;
            }
            _ => {}
        }
    }
    out
}

/// After a start's call returns, the bench reads nothing (no client
/// process, no D-Bus call) for this long: the start being measured (a few
/// ms here) has the CPU to itself, as crun's has.
const SETTLE: Duration = Duration::from_millis(100);
/// Then the engine's state is read this often.
const POLL: Duration = Duration::from_millis(20);

struct Bench {
    lab: Lab,
    bin: PathBuf,
    stage: PathBuf,
    /// The process whose mount namespace crun runs in (its pid).
    cg2_ns: Option<u32>,
}

/// What a run leaves unless removed, removed also when the bench panics:
/// dropped after the lab (agentd stopped first, so nothing restarts an
/// engine): the crun namespace's process, then the bench's cgroup subtree
/// (`CgroupUnit`).
struct Leftovers {
    cg2_ns: Option<std::process::Child>,
    _unit: CgroupUnit,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if let Some(mut c) = self.cg2_ns.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Bench {
    fn tenant(&self, args: &[&str]) -> Output {
        ok(self
            .lab
            .command(Who::Tenant, &self.bin.join("tenantctl"))
            .args(args))
    }

    fn text(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.tenant(args).stdout).into_owned()
    }

    /// The agent's engine events it still keeps, by number.
    fn events(&self) -> Vec<(u64, serde_json::Value)> {
        self.text(&["--json", "engine", "events"])
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|e| Some((e["seq"].as_u64()?, e)))
            .collect()
    }

    /// Waits (bounded) until the engine's JSON status shows `state`.
    fn until_state(&self, engine: &str, state: &str) {
        let t = Instant::now();
        let want = format!("\"state\":\"{state}\"");
        while !self
            .text(&["--json", "engine", "status", engine])
            .contains(&want)
        {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{engine} never {state}: {}",
                self.text(&["engine", "status", engine])
            );
            std::thread::sleep(POLL);
        }
    }

    /// Waits (bounded) until the engine's log holds `n` `first` lines.
    fn until_firsts(&self, engine: &str, n: usize) -> String {
        let t = Instant::now();
        loop {
            let log = self.text(&["engine", "logs", engine]);
            if log_stamps(&log, "first").len() >= n {
                return log;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{engine}: fewer than {n} starts in its log"
            );
            std::thread::sleep(POLL);
        }
    }

    /// `args` as root; where this host's `/sys/fs/cgroup` is not the cgroup
    /// v2 hierarchy (crun 1.8 refuses the hybrid layout), in the mount
    /// namespace of `cg2_ns`, which has it there. Entered, not made per
    /// run: a cgroup2 mount (or its teardown) lets the next migration on
    /// the node skip its RCU grace period (measured here: 1.5 ms instead of
    /// 7-20), which would flatter the agent's next start.
    fn crun(&self, args: &[&str]) -> Command {
        let mut c = match self.cg2_ns {
            None => self.lab.command(Who::Root, Path::new(args[0])),
            Some(holder) => {
                let mut c = self.lab.command(Who::Root, Path::new("nsenter"));
                c.arg(format!("--mount=/proc/{holder}/ns/mnt"))
                    .arg("--")
                    .arg(args[0]);
                c
            }
        };
        c.args(&args[1..]);
        c
    }
}

/// A process whose mount namespace has the cgroup v2 hierarchy on
/// `/sys/fs/cgroup` (None where the host has it there already).
fn cgroup2_namespace(cg2: &Path) -> Option<std::process::Child> {
    if cg2 == Path::new("/sys/fs/cgroup") {
        return None;
    }
    let mut c = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t cgroup2 none /sys/fs/cgroup && echo ready && exec sleep infinity",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(c.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready", "the cgroup2 namespace for crun");
    Some(c)
}

fn main() {
    require_root();
    let n = env_n("LH_BENCH_STARTS", 100) as usize;
    let r = env_n("LH_BENCH_RESTARTS", 50) as usize;
    let bin = build();
    let stage = workspace_root().join("target/engines-host");
    leasehold_tests::engine_bench::stage(&stage, &stage.join("rootfs"));
    // The tenant's tenantctl reads the archive and the specs.
    ok(Command::new("chmod").args(["-R", "a+rX"]).arg(&stage));
    let cg2 = cgroup2_mount();
    let run = tempfile::Builder::new()
        .prefix("lh-engines-host-")
        .tempdir()
        .unwrap();
    let vol = run.path().join("volume");
    std::fs::create_dir(&vol).unwrap();
    // The engines' subtree's parent stands for the engines unit's cgroup.
    let unit = format!("lh-engines-host-{}", std::process::id());
    std::fs::create_dir(cg2.join(&unit)).unwrap();
    let leftovers = Leftovers {
        cg2_ns: cgroup2_namespace(&cg2),
        _unit: CgroupUnit(cg2.join(&unit)),
    };
    let config = format!(
        "{}[engines]\ncgroup_root = {:?}\ncgroup_subtree = \"{unit}/tenant\"\nrun_dir = {:?}\n",
        leasehold_tests::PATIENT_AUTH_CONFIG,
        cg2.display().to_string(),
        run.path().join("run").display().to_string(),
    );
    let lab = stand_in_lab(config, &bin, &vol);
    let log = lab.agent_log();
    assert!(
        log.contains("bench stand-in: the tenant volume is the plain directory")
            && log.contains("bench stand-in: engine cgroups without controllers"),
        "agentd did not take the stand-ins (a build without bench-stand-ins?): {log}"
    );
    let b = Bench {
        lab,
        bin,
        stage,
        cg2_ns: leftovers.cg2_ns.as_ref().map(std::process::Child::id),
    };
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    ok(b.lab
        .command(Who::Landlord, &b.bin.join("landlordctl"))
        .args(["--yes", "assign", "bench"]));
    let archive = b.stage.join("bb.tar");
    let archive = archive.to_str().unwrap();
    let spec = |name: &str| b.stage.join(name).display().to_string();
    for (engine, spec_file) in [
        ("s", "start.toml"),
        ("p", "start.toml"),
        ("r", "restart.toml"),
    ] {
        b.tenant(&[
            "engine",
            "deploy",
            engine,
            archive,
            "--spec",
            &spec(spec_file),
        ]);
    }
    let marker = b.stage.join("lhmark");
    let root_marker = b.stage.join("rootfs/lhmark");

    // 1. Starts, interleaved round by round (round 0 a warm-up).
    let mut agent_t0 = Vec::new();
    let mut crun_pairs = Vec::new();
    let mut exec_pairs = Vec::new();
    let mut fails = Vec::new();
    let mut events = std::collections::BTreeMap::new();
    for i in 0..=n {
        let o = ok(b
            .lab
            .command(Who::Tenant, &marker)
            .arg("spawn")
            .arg(b.bin.join("tenantctl"))
            .args(["engine", "start", "s"]));
        agent_t0.extend(stamps(&String::from_utf8_lossy(&o.stdout), "t0 "));
        std::thread::sleep(SETTLE);
        b.until_firsts("s", i + 1);
        b.until_state("s", "exited");
        // The agent keeps a bounded list of events: read them each round.
        events.extend(b.events());

        let id = format!("lhh-{i}");
        let bundle = b.stage.join("bundle");
        let o = b
            .crun(&[marker.to_str().unwrap(), "spawn", "crun"])
            .args(["--cgroup-manager=cgroupfs", "run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        match (&stamps(&out, "t0 ")[..], &stamps(&out, "first ")[..]) {
            ([t0], [first]) if o.status.success() => crun_pairs.push((*t0, *first)),
            _ => fails.push(format!(
                "crun round {i}: {} {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
        }
        let _ = b.crun(&["crun", "delete", "-f", &id]).output();

        // The marker exec'ing the marker: the exec alone, no launcher.
        let o = ok(b
            .lab
            .command(Who::Root, &marker)
            .arg("spawn")
            .arg(&root_marker)
            .arg("engine"));
        let out = String::from_utf8_lossy(&o.stdout);
        if let ([t0], [first]) = (&stamps(&out, "t0 ")[..], &stamps(&out, "first ")[..]) {
            exec_pairs.push((*t0, *first));
        }
    }
    let agent_first = log_stamps(&b.text(&["engine", "logs", "s"]), "first");

    // 1b. From one kept connection (no client start; polkit's yes reused).
    let o = ok(b
        .lab
        .command(Who::Tenant, &b.bin.join("lh-dbus-probe"))
        .args([
            "starts",
            &(n + 1).to_string(),
            "p",
            &SETTLE.as_millis().to_string(),
        ]));
    let out = String::from_utf8_lossy(&o.stdout);
    fails.extend(
        out.lines()
            .filter(|l| l.starts_with("fail"))
            .map(|l| format!("probe: {l}")),
    );
    let probe_t0 = stamps(&out, "t0 ");
    let probe_first = log_stamps(&b.text(&["engine", "logs", "p"]), "first");

    // The agent's `started` events (the runtime has the shim's pid), to
    // split each start (event times are milliseconds).
    events.extend(b.events());
    let started = |engine: &str| -> Vec<u128> {
        events
            .values()
            .filter(|e| e["engine"] == engine && e["kind"] == "started")
            .filter_map(|e| e["time_ms"].as_u64().map(u128::from))
            .collect()
    };
    let (agent_started, probe_started) = (started("s"), started("p"));

    // 2. Exit → first restart: A exits 1, the shim restarts it in place
    // (always, initial 1 ms), B stays; a stop, so each start is a first.
    for i in 0..=r {
        b.tenant(&["engine", "start", "r"]);
        std::thread::sleep(SETTLE);
        b.until_firsts("r", 2 * (i + 1));
        b.tenant(&["engine", "stop", "r"]);
        b.until_state("r", "stopped");
    }
    // By the marker's own clock: two instances' lines reach the log through
    // two pipes.
    let log = b.text(&["engine", "logs", "r"]);
    let restart_pairs = exit_first_pairs(log_stamps(&log, "exit"), log_stamps(&log, "first"));
    let o = ok(Command::new(&marker).args(["floor", &r.to_string()]));
    let out = String::from_utf8_lossy(&o.stdout);
    let floor_pairs = exit_first_pairs(stamps(&out, "exit "), stamps(&out, "first "));
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    for e in ["s", "p", "r"] {
        b.tenant(&["--yes", "engine", "rm", e]);
    }
    drop(b);
    // Killed, then removed (also when anything above panicked).
    drop(leftovers);

    // The report.
    // A start whose stamp is missing would shift every later pair: such a
    // row is left empty (and said so) rather than mis-paired.
    let paired = |what: &str, t0: &[u128], first: &[u128], fails: &mut Vec<String>| {
        if t0.len() == first.len() {
            t0.iter().copied().zip(first.iter().copied()).collect()
        } else {
            fails.push(format!(
                "{what}: {} t0 for {} first instructions, not paired",
                t0.len(),
                first.len()
            ));
            Vec::new()
        }
    };
    let agent_pairs: Vec<(u128, u128)> = paired("agent", &agent_t0, &agent_first, &mut fails);
    let probe_pairs: Vec<(u128, u128)> =
        paired("kept connection", &probe_t0, &probe_first, &mut fails);
    let pairs_ms = |p: &[(u128, u128)]| sorted(p.iter().skip(1).map(|&(a, f)| ms(a, f)).collect());
    let mut s = String::new();
    writeln!(s, "## Engines on this host, not emulated: the agent's whole start path and first restart (issue 14)\n").unwrap();
    let controllers = std::fs::read_to_string(cg2.join("cgroup.controllers")).unwrap_or_default();
    let systemd = Path::new("/run/systemd/system").is_dir();
    writeln!(s, "`cargo bench -p leasehold-tests --bench engines_host` (root; builds its own release binaries, agentd with the feature `bench-stand-ins`, into `target/bench-stand-ins`). Unlike engines_vm this runs on the host's CPU, not under TCG: the lab's dbus-daemon and polkitd with the shipped policy, agentd `--dev` on swtpm, `tenantctl` as the tenant. Stood in for: a plain directory for the tenant volume (the bench needs no device-mapper), and the engines' cgroups are real cgroup v2 directories (the shim's join is a real migration) without controllers or limits (this host's cgroup v2 root offers: `{}`). {} After each start's call the bench reads nothing for {} ms (then the engine's state every {} ms), so that the start has the CPU to itself, as crun's has.\n",
        controllers.trim(),
        if systemd { "systemd runs here, but the bench has no `systemd-run` rows (engines_vm has them)." } else { "No systemd on this host: no `systemd-run` rows (engines_vm has them)." },
        SETTLE.as_millis(),
        POLL.as_millis(),
    ).unwrap();
    s.push_str(&leasehold_tests::markdown::machine());
    writeln!(
        s,
        "- load average before / after: {} / {}\n- cgroup v2 at `{}`; {}; the release profile of the .deb (opt-level \"s\", fat LTO), the shim and `tenantctl` dynamically linked (the .deb's are static)\n- marker and root filesystem: engines_vm's (`tests/support/lhmark.rs`, static; `lhmark spawn CLIENT …` stamps t0 just before it execs the client, so every row includes starting its client)\n",
        load0.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        load1.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        cgroup2_mount().display(),
        String::from_utf8_lossy(&Command::new("crun").arg("--version").output().map(|o| o.stdout).unwrap_or_default()).lines().next().unwrap_or("crun ?"),
    )
    .unwrap();
    writeln!(s, "### Start: client call → the engine's first instruction (host), {n} starts each (one warm-up dropped), interleaved round by round\n").unwrap();
    writeln!(
        s,
        "| launcher (host) | client | confinement | n | p50 | p99 | max |"
    )
    .unwrap();
    writeln!(s, "|---|---|---|---|---|---|---|").unwrap();
    let agent = pairs_ms(&agent_pairs);
    let probe = pairs_ms(&probe_pairs);
    let crun = pairs_ms(&crun_pairs);
    let exec = pairs_ms(&exec_pairs);
    for (label, client, conf, v) in [
        ("agent: `TenantEngines1.Start`", "`tenantctl engine start` as the tenant (new connection, polkit check)", "the shim: namespaces, pivot_root, Landlock, seccomp, no capabilities, own cgroup (joined: a migration)", &agent),
        ("agent: the same call from one kept connection", "`lh-dbus-probe starts` as the tenant (release build; polkit's yes reused on the connection), after the rounds above", "the shim, as above", &probe),
        ("`crun run`", "`crun` as root, cgroupfs manager", "namespaces, read-only root, seccomp deny-list, no capabilities, own cgroup (`clone3` into it)", &crun),
        ("no launcher: the marker execs the marker", "—", "none", &exec),
    ] {
        writeln!(s, "| {label} | {client} | {conf} | {} |", cells(v, 2)).unwrap();
    }
    writeln!(s, "\nRecorded (warm-up included): agent {} t0, {} first; kept connection {} t0, {} first; crun {} pairs; exec {} pairs. p99 is nearest-rank.", agent_t0.len(), agent_first.len(), probe_t0.len(), probe_first.len(), crun_pairs.len(), exec_pairs.len()).unwrap();
    // t0 → `started` (client, bus, polkit, controller, cgroups, the shim
    // spawned) and `started` → first instruction (the shim's part).
    s.push_str(&started_split(
        "`tenantctl engine start`",
        &agent_pairs,
        &agent_started,
        true,
    ));
    s.push_str(&started_split(
        "one kept connection",
        &probe_pairs,
        &probe_started,
        true,
    ));
    let rs = pairs_ms(&restart_pairs);
    let fl = pairs_ms(&floor_pairs);
    writeln!(
        s,
        "\n### Exit → first restart (host), {} samples (one warm-up dropped)\n",
        rs.len()
    )
    .unwrap();
    writeln!(s, "engines_vm's restart spec (`restart.policy = \"always\"`, `initial = \"1ms\"`): instance A prints its first instruction, creates a flag in its data dir, prints the time and exits 1; the shim restarts it in place; B finds the flag and stays; a stop and a start between samples, so each is a first restart.\n").unwrap();
    writeln!(s, "| interval (host) | n | p50 | p99 | max |").unwrap();
    writeln!(s, "|---|---|---|---|---|").unwrap();
    for (label, v) in [
        ("A's last instruction → B's first instruction (the agent's engine)", &rs),
        ("baseline: a bare parent (`lhmark floor`, as root) waits for the marker's exit and spawns it again — no confinement, no agent", &fl),
    ] {
        writeln!(s, "| {label} | {} |", cells(v, 2)).unwrap();
    }
    let met = |b: bool| if b { "met" } else { "**not met**" };
    writeln!(
        s,
        "\n### Against issue 14's goals, off emulation (this host)\n"
    )
    .unwrap();
    writeln!(
        s,
        "- start p50 at or below `systemd-run --scope`'s: no systemd here; against `crun run`'s p50 instead: {:.2} vs {:.2} ms, {} (from one kept connection: {:.2} ms, {})\n- start p99 below `crun run`'s p50: {:.2} vs {:.2} ms, {} (from one kept connection: {:.2} ms, {})\n- first restart within 20 ms of the exit: p50 {:.2} ms, p99 {:.2} ms, {}",
        pct(&agent, 50),
        pct(&crun, 50),
        met(pct(&agent, 50) <= pct(&crun, 50)),
        pct(&probe, 50),
        met(pct(&probe, 50) <= pct(&crun, 50)),
        pct(&agent, 99),
        pct(&crun, 50),
        met(pct(&agent, 99) < pct(&crun, 50)),
        pct(&probe, 99),
        met(pct(&probe, 99) < pct(&crun, 50)),
        pct(&rs, 50),
        pct(&rs, 99),
        met(pct(&rs, 99) <= 20.0),
    )
    .unwrap();
    if !fails.is_empty() {
        writeln!(s, "\nFailures during the run (samples missing):\n").unwrap();
        for f in &fails {
            writeln!(s, "- `{f}`").unwrap();
        }
    }
    print!("{s}");
    leasehold_tests::markdown::write_section("engines_host", &s);
}
