//! What the engine benchmarks share (tests/benches/engines_vm.rs on a lab
//! node, tests/benches/engines_host.rs on this host): the staged marker,
//! root filesystem, crun bundle, OCI archive and specs, and the statistics.

use std::path::Path;
use std::process::{Command, Output};

use crate::workspace_root;

/// Nearest-rank percentile (p in 0..=100) of sorted samples.
pub fn pct(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len()).div_ceil(100);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A table row's statistics of sorted samples (milliseconds) with
/// `digits` decimals: `n | p50 ms | p99 ms | max ms`.
pub fn cells(v: &[f64], digits: usize) -> String {
    format!(
        "{} | {:.digits$} ms | {:.digits$} ms | {:.digits$} ms",
        v.len(),
        pct(v, 50),
        pct(v, 99),
        v.last().copied().unwrap_or(f64::NAN)
    )
}

/// The samples in ascending order.
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Milliseconds from `a` to `b` (nanosecond timestamps).
pub fn ms(a: u128, b: u128) -> f64 {
    (b as f64 - a as f64) / 1e6
}

/// crun's bundle: the same namespaces, read-only root, no capabilities,
/// no_new_privs and deny-list as the agent's shim (no Landlock: crun has
/// none), an unprivileged uid, the root filesystem at `rootfs` (where the
/// node running crun has it).
pub fn crun_config(rootfs: &Path) -> serde_json::Value {
    // The launcher's own deny-list, by name (libseccomp 2.5 of Debian 12,
    // crun's, does not know open_tree_attr, which it could not deny).
    let syscalls: Vec<serde_json::Value> = leasehold_engines::launch::DENIED_SYSCALLS
        .iter()
        .map(|s| s.0)
        .filter(|n| *n != "open_tree_attr")
        .map(|s| serde_json::json!({"names": [s], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}))
        .collect();
    serde_json::json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": 2_000_999, "gid": 2_000_999},
            "args": ["/lhmark", "engine"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": true},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=1m"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": syscalls},
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Runs `c`, which must succeed; its output.
pub fn ok(c: &mut Command) -> Output {
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(
        o.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A size from the environment (`LH_BENCH_…`), else `default`.
pub fn env_n(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The report's paragraph (blank line before and after) splitting the agent's starts (`(t0, first)`
/// nanoseconds, warm-up first) at their `started` events (`started_ms`,
/// whole milliseconds, one per start): t0 → `started`, `started` → first
/// instruction. `mid_ms`: take each event at the middle of its millisecond
/// (for sub-10 ms starts; the kernel's time is truncated to the ms).
pub fn started_split(
    what: &str,
    starts: &[(u128, u128)],
    started_ms: &[u128],
    mid_ms: bool,
) -> String {
    if started_ms.len() != starts.len() {
        return format!(
            "\n({what}: {} `started` events for {} samples, no split.)\n",
            started_ms.len(),
            starts.len()
        );
    }
    if starts.is_empty() {
        return String::new();
    }
    let at = |e: u128| e * 1_000_000 + if mid_ms { 500_000 } else { 0 };
    let a = sorted(
        starts
            .iter()
            .zip(started_ms)
            .skip(1)
            .map(|(&(t0, _), &e)| ms(t0, at(e)))
            .collect(),
    );
    let b = sorted(
        starts
            .iter()
            .zip(started_ms)
            .skip(1)
            .map(|(&(_, first), &e)| ms(at(e), first))
            .collect(),
    );
    let times = if mid_ms {
        "event times are whole milliseconds, each taken at the middle of its millisecond: each part ±0.5 ms"
    } else {
        "event times are milliseconds"
    };
    format!(
        "\nThe agent's start ({what}) split at its `started` event ({times}): t0 → `started` (client start if any, D-Bus, polkit, the controller, the engine's cgroups, the shim spawned) p50 {:.1} ms, p99 {:.1} ms; `started` → first instruction (the shim's confinement and exec) p50 {:.1} ms, p99 {:.1} ms.\n",
        pct(&a, 50),
        pct(&a, 99),
        pct(&b, 50),
        pct(&b, 99)
    )
}

/// The files both engine benches use, under `stage` (made anew): the
/// marker (`tests/support/lhmark.rs`, static), its root filesystem
/// (`rootfs/`: the marker and empty mount points), crun's bundle (`bundle/`,
/// its root at `bundle_rootfs`), the same root as an OCI archive for the
/// agent (`bb.tar`) and the engine specs (`start.toml`, `idle.toml`,
/// `restart.toml`).
pub fn stage(stage: &Path, bundle_rootfs: &Path) {
    let _ = std::fs::remove_dir_all(stage);
    let root = stage.join("rootfs");
    for d in ["proc", "dev", "tmp", "data"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let marker = stage.join("lhmark");
    ok(Command::new("rustc")
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
            "-C",
            "panic=abort",
        ])
        .arg(workspace_root().join("tests/support/lhmark.rs"))
        .arg("-o")
        .arg(&marker));
    std::fs::copy(&marker, root.join("lhmark")).unwrap();
    // Next to the stage, not in it (the VM bench copies the stage whole).
    let mut oci = stage.as_os_str().to_owned();
    oci.push("-oci");
    let image = crate::oci::archive(Path::new(&oci), &root);
    std::fs::copy(image, stage.join("bb.tar")).unwrap();
    std::fs::create_dir_all(stage.join("bundle")).unwrap();
    std::fs::write(
        stage.join("bundle/config.json"),
        serde_json::to_vec_pretty(&crun_config(bundle_rootfs)).unwrap(),
    )
    .unwrap();
    let never = "stop_grace = \"3s\"\n[restart]\npolicy = \"never\"\n";
    std::fs::write(
        stage.join("start.toml"),
        format!("command = [\"/lhmark\", \"engine\"]\n{never}"),
    )
    .unwrap();
    std::fs::write(
        stage.join("idle.toml"),
        format!("command = [\"/lhmark\", \"idle\"]\n{never}"),
    )
    .unwrap();
    std::fs::write(
        stage.join("restart.toml"),
        "command = [\"/lhmark\", \"restart\", \"/data/flag\"]\nstop_grace = \"3s\"\ndata_dirs = [\"data\"]\n[restart]\npolicy = \"always\"\ninitial = \"1ms\"\n",
    )
    .unwrap();
}

/// The release binaries with the bench stand-ins (agentd's feature
/// `bench-stand-ins`), in a target directory of their own: no other
/// agentd ever has them. engines_host and probe_cost run these.
pub fn build_stand_ins() -> std::path::PathBuf {
    let target = workspace_root().join("target/bench-stand-ins");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    ok(Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target)
        .args([
            "-p",
            "leasehold-agentd",
            "-p",
            "leasehold-cli",
            "-p",
            "leasehold-engines",
            "-p",
            "leasehold-tests",
            "--features",
            "leasehold-agentd/bench-stand-ins",
            "--bins",
        ]));
    target.join("release")
}

/// The cgroup v2 mount: `/sys/fs/cgroup` on a v2-only host, `…/unified`
/// on a hybrid one.
pub fn cgroup2_mount() -> std::path::PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
        })
        .expect("a cgroup2 mount")
}

/// A bench's cgroup subtree (standing for the engines unit's cgroup):
/// when dropped, every process in it is killed (engines outlive the
/// agent) and the subtree removed — also when the bench panics. Drop it
/// after the lab (agentd stopped first, so nothing restarts an engine).
pub struct CgroupUnit(pub std::path::PathBuf);

impl Drop for CgroupUnit {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        let t = std::time::Instant::now();
        while std::fs::read_to_string(self.0.join("cgroup.events"))
            .is_ok_and(|e| e.contains("populated 1"))
            && t.elapsed() < std::time::Duration::from_secs(10)
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        remove_tree(&self.0);
    }
}

/// Removes a cgroup directory and its children, deepest first (cgroupfs
/// takes only rmdir); what cannot be removed is reported.
fn remove_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        eprintln!("left {}: {e}", dir.display());
    }
}

/// The lab (dbus-daemon, polkitd, agentd `--dev` on swtpm) with the
/// stand-ins' agent from `bin` ([`build_stand_ins`]): `vol` a plain
/// directory for the tenant volume, engine cgroups without controllers.
pub fn stand_in_lab(config: String, bin: &Path, vol: &Path) -> crate::Lab {
    crate::Lab::start_with_options(crate::LabOptions {
        agent_config: Some(config),
        agentd: Some(bin.join("agentd")),
        agent_env: vec![
            (
                "LEASEHOLD_BENCH_VOLUME_DIR".into(),
                vol.display().to_string(),
            ),
            ("LEASEHOLD_BENCH_NO_CONTROLLERS".into(), "1".into()),
        ],
        // No CPU slices: the harness would move each client into one (a
        // cgroup migration), and a migration just before the shim's join
        // lets the join skip its RCU grace period — a node's tenant runs
        // its commands in its login's cgroup, with no migration per command.
        flat_cpu: true,
        ..crate::LabOptions::default()
    })
}
