//! Start latency of an engine (root): from the call to the engine's first
//! output byte on a pipe (a static busybox `echo`), p50/p99 over N starts
//! of each candidate, interleaved so that load from other work on the
//! machine falls on all of them alike.
//!
//! `cargo bench -p leasehold-engines --bench launch_latency [-- N]`
//!
//! Candidates, same rootfs (busybox-static only) and engine:
//! - `Command` (floor): busybox started directly, no confinement;
//! - `unshare(1)`: mount+pid+ipc+uts namespaces, nothing else;
//! - the launcher (`leasehold-engine-shim`): full confinement;
//! - `crun run`: OCI config with the same namespaces, read-only root,
//!   proc/dev/tmp, uid, no capabilities, no_new_privs, the same seccomp
//!   deny-list (no Landlock: crun has none);
//! - `systemd-run --scope` and `systemd-run --pipe --wait` (a transient
//!   service), where systemd runs (the lab node), busybox without
//!   confinement: what systemd's own path costs.
//!
//! Also: from the engine's output to its shim's exit seen on the pidfd
//! (the engine exits right after writing; exit detection, no polling).
//!
//! `LEASEHOLD_BENCH_BASELINE_SHIM=PATH`: one more row, the launcher with
//! that shim binary (an older build, say) and no cgroup, interleaved with
//! the others: a change to the shim measured side by side in one run.
//!
//! `LEASEHOLD_TEST_DELEGATED=1` (in a unit or scope with `Delegate=yes`):
//! the bench moves itself to `<own cgroup>/runner`, enables the controllers
//! on its own cgroup and creates the engines' cgroups there, as the engines
//! unit will; otherwise at the root of the cgroup2 mount.

use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use leasehold_engines::cgroup::{CgroupFs, CgroupPath, Cgroups};
use leasehold_engines::launch::{LaunchSpec, Launcher, Respawn, STATUS_FIFO};

const SHIM: &str = env!("CARGO_BIN_EXE_leasehold-engine-shim");
const UID: u32 = 61_234;

fn pipe() -> (fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
    (fs::File::from(r), w)
}

/// Time until the first byte on `r` (the writer end already handed over).
fn first_byte(start: Instant, mut r: fs::File) -> Duration {
    let mut b = [0u8; 1];
    let n = r.read(&mut b).expect("read engine output");
    assert_eq!(n, 1, "engine wrote nothing");
    start.elapsed()
}

/// One start without a cgroup: the call → the engine's first output byte;
/// waits for the engine's exit and checks the confinement report.
fn start_sample(launcher: &Launcher, spec: &LaunchSpec, run_dir: &Path) -> Duration {
    let (r, w) = pipe();
    let t = Instant::now();
    let mut running = launcher
        .start(spec, run_dir, Stdio::from(w), Stdio::inherit(), vec![])
        .unwrap();
    let d = first_byte(t, r);
    running
        .wait(Some(Duration::from_secs(10)))
        .unwrap()
        .expect("engine exit");
    assert_eq!(running.report().map(|r| r.result), Some(Ok(())));
    d
}

/// One start as the agent makes it: the engine's cgroup created, then the
/// launcher started (`tag` names the cgroup and run directory). Returns
/// the call → the first output byte, and that byte → the shim's exit seen
/// on its pidfd; the cgroup is removed again.
fn cgroup_sample(
    launcher: &Launcher,
    spec: &LaunchSpec,
    cgroups: &CgroupFs,
    run: &Path,
    tag: &str,
) -> (Duration, Duration) {
    // Migrations close together share one RCU grace period (the kernel's
    // rcu_sync stays warm for one more after a writer): without a pause,
    // a row right after another's migration would skip its wait.
    std::thread::sleep(Duration::from_millis(50));
    let (r, w) = pipe();
    let cg = CgroupPath::new(format!("lh-bench-{}-{tag}", std::process::id())).unwrap();
    let t = Instant::now();
    cgroups.create(&cg).unwrap();
    let mut spec_cg = spec.clone();
    spec_cg.cgroup = Some(cgroups.dir(&cg));
    let mut running = launcher
        .start(
            &spec_cg,
            &run.join(format!("run{tag}")),
            Stdio::from(w),
            Stdio::inherit(),
            vec![],
        )
        .unwrap();
    let d = first_byte(t, r);
    let out = Instant::now();
    running
        .wait(Some(Duration::from_secs(10)))
        .unwrap()
        .expect("engine exit");
    let e = out.elapsed();
    assert_eq!(running.report().map(|r| r.result), Some(Ok(())));
    cgroups.remove(&cg).unwrap();
    (d, e)
}

/// The first restart in place: the engine prints "x" and exits 1; the
/// shim's grant (no delay) starts it once more, which prints "x" again and
/// exits. Time from the first "x" to the second, as the pipe shows them.
fn respawn_sample(launcher: &Launcher, spec: &LaunchSpec, run_dir: &Path) -> Duration {
    use std::os::unix::fs::OpenOptionsExt;
    fs::create_dir_all(run_dir).unwrap();
    nix::unistd::mkfifo(
        &run_dir.join(STATUS_FIFO),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    // The agent's read end, open before the start (the grant needs it).
    let _status = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(run_dir.join(STATUS_FIFO))
        .unwrap();
    let mut s = spec.clone();
    s.argv = ["/bin/busybox", "sh", "-c", "echo x; exit 1"]
        .map(String::from)
        .to_vec();
    s.respawn = Some(Respawn {
        delay_ms: 0,
        on_clean_exit: false,
    });
    let (mut r, w) = pipe();
    let mut running = launcher
        .start(&s, run_dir, Stdio::from(w), Stdio::inherit(), vec![])
        .unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    while seen.len() < 2 {
        match r.read(&mut b) {
            Ok(1) if b[0] == b'x' => seen.push(Instant::now()),
            Ok(1) => {}
            other => panic!("respawn: engine output ended: {other:?}"),
        }
    }
    running
        .wait(Some(Duration::from_secs(10)))
        .unwrap()
        .expect("engine exit");
    seen[1] - seen[0]
}

fn crun_config(root: &Path) -> serde_json::Value {
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
            "user": {"uid": UID, "gid": UID},
            "args": ["/bin/busybox", "echo", "x"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "noNewPrivileges": true
        },
        "root": {"path": root, "readonly": true},
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

fn cgroup2_only() -> nix::Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    if fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/cgroup") && !l.contains(" cgroup2 "))
    {
        umount2("/sys/fs/cgroup", MntFlags::MNT_DETACH)?;
        mount(
            Some("cgroup2"),
            "/sys/fs/cgroup",
            Some("cgroup2"),
            MsFlags::empty(),
            None::<&str>,
        )?;
    }
    Ok(())
}

/// Where the engines' cgroups go: see the module comment.
fn bench_cgroups() -> Result<CgroupFs, leasehold_engines::cgroup::CgroupError> {
    use leasehold_engines::cgroup::Controller;
    if std::env::var_os("LEASEHOLD_TEST_DELEGATED").is_none() {
        return Ok(CgroupFs::with_root(None));
    }
    let own = CgroupFs::own_cgroup()?;
    let unit = Path::new("/sys/fs/cgroup").join(own.strip_prefix("/").unwrap_or(&own));
    let cg = CgroupFs::with_root(Some(&unit));
    let runner = CgroupPath::new("runner")?;
    cg.create(&runner)?;
    cg.add_pid(&runner, std::process::id())?;
    let available = fs::read_to_string(unit.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<Controller> = Controller::ALL
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == c.name()))
        .collect();
    let parent = CgroupFs::with_root(unit.parent());
    let name = CgroupPath::new(unit.file_name().unwrap_or_default())?;
    parent.enable_controllers(&name, &wanted)?;
    Ok(cg)
}

struct Stats {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Stats {
    fn pct(&self, p: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        // Nearest rank: the smallest sample with at least p of them at or below.
        let rank = (1..=s.len())
            .find(|&k| k as f64 >= p * s.len() as f64)
            .unwrap_or(s.len());
        s[rank - 1]
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("skipped: launch_latency needs root");
        return;
    }
    // crun 1.8 refuses a hybrid cgroup layout (this host: v1 controllers
    // plus an empty cgroup2 at /sys/fs/cgroup/unified). In a private mount
    // namespace, /sys/fs/cgroup becomes the cgroup2 hierarchy alone, for
    // every candidate alike.
    if let Err(e) = cgroup2_only() {
        println!("skipped: cannot set up a cgroup2-only /sys/fs/cgroup: {e}");
        return;
    }
    let cgroups = match bench_cgroups() {
        Ok(c) => c,
        Err(e) => {
            println!("skipped: cannot set up the delegated cgroup: {e}");
            return;
        }
    };
    let systemd = Path::new("/run/systemd/system").is_dir();
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("bin")).unwrap();
    for d in [dir.path(), &root] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    if fs::copy("/bin/busybox", root.join("bin/busybox")).is_err() {
        println!("skipped: /bin/busybox absent (apt-get install busybox-static)");
        return;
    }
    // Run directories on tmpfs, as /run/leasehold/engines in production.
    let run = tempfile::tempdir_in("/run").unwrap();
    let bundle = dir.path().join("bundle");
    fs::create_dir_all(&bundle).unwrap();
    fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&crun_config(&root)).unwrap(),
    )
    .unwrap();
    let crun = Command::new("crun").arg("--version").output().is_ok();
    let busybox = root.join("bin/busybox");
    let launcher = Launcher::new(SHIM);
    let spec = LaunchSpec {
        name: "bench".into(),
        rootfs: root.clone(),
        argv: vec!["/bin/busybox".into(), "echo".into(), "x".into()],
        env: vec![("PATH".into(), "/bin".into())],
        cwd: "/".into(),
        uid: UID,
        gid: UID,
        cgroup: None,
        data_dirs: vec![],
        tmp_size: 1 << 20,
        secrets: vec![],
        notify_dir: None,
        respawn: None,
    };

    let mut floor = Stats {
        name: "`Command` (floor, no confinement)",
        samples: vec![],
    };
    let mut unshare = Stats {
        name: "`unshare -m -p -i -u -f` (namespaces only)",
        samples: vec![],
    };
    let mut ours = Stats {
        name: "launcher: cgroup created, the launcher moves the shim into it during its start-up",
        samples: vec![],
    };
    let shim_joins = Launcher::new(SHIM).shim_joins_cgroup();
    let mut ours_shim_joins = Stats {
        name: "launcher: cgroup created, the shim joins it after its start-up (before 2026-12-05)",
        samples: vec![],
    };
    let mut ours_nocg = Stats {
        name: "launcher: no cgroup",
        samples: vec![],
    };
    let baseline = std::env::var_os("LEASEHOLD_BENCH_BASELINE_SHIM").map(|p| {
        let name = format!("launcher with {}: no cgroup", Path::new(&p).display());
        (Launcher::new(p), name)
    });
    let mut baseline_nocg = Stats {
        name: "launcher with the baseline shim: no cgroup",
        samples: vec![],
    };
    let mut respawn = Stats {
        name:
            "first restart in place: first instance's output → the next one's (no delay, no cgroup)",
        samples: vec![],
    };
    let mut baseline_respawn = Stats {
        name: "the same with the baseline shim",
        samples: vec![],
    };
    let mut crun_s = Stats {
        name: "`crun run`: cgroup created (clone3 CLONE_INTO_CGROUP)",
        samples: vec![],
    };
    let mut crun_nocg = Stats {
        name: "`crun --cgroup-manager=disabled run`",
        samples: vec![],
    };
    let mut scope = Stats {
        name: "`systemd-run --scope` (no confinement)",
        samples: vec![],
    };
    let mut service = Stats {
        name: "`systemd-run --pipe --wait` (service, no confinement)",
        samples: vec![],
    };
    let mut exit_seen = Stats {
        name: "launcher: engine's output → shim exit seen on the pidfd",
        samples: vec![],
    };
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // One warm-up round, not counted.
    for i in 0..=n {
        let count = i > 0;

        let (r, w) = pipe();
        let t = Instant::now();
        let mut c = Command::new(&busybox)
            .args(["echo", "x"])
            .stdout(Stdio::from(w))
            .spawn()
            .unwrap();
        let d = first_byte(t, r);
        c.wait().unwrap();
        if count {
            floor.samples.push(d);
        }

        let (r, w) = pipe();
        let t = Instant::now();
        let mut c = Command::new("unshare")
            .args(["-m", "-p", "-i", "-u", "-f"])
            .arg(&busybox)
            .args(["echo", "x"])
            .stdout(Stdio::from(w))
            .spawn()
            .unwrap();
        let d = first_byte(t, r);
        c.wait().unwrap();
        if count {
            unshare.samples.push(d);
        }

        let (d, e) = cgroup_sample(&launcher, &spec, &cgroups, run.path(), &format!("{i}"));
        if count {
            ours.samples.push(d);
            exit_seen.samples.push(e);
        }
        let (d, _) = cgroup_sample(&shim_joins, &spec, &cgroups, run.path(), &format!("s{i}"));
        if count {
            ours_shim_joins.samples.push(d);
        }

        let d = start_sample(&launcher, &spec, &run.path().join(format!("nocg{i}")));
        if count {
            ours_nocg.samples.push(d);
        }

        let d = respawn_sample(&launcher, &spec, &run.path().join(format!("re{i}")));
        if count {
            respawn.samples.push(d);
        }
        if let Some((base, _)) = &baseline {
            let d = respawn_sample(base, &spec, &run.path().join(format!("basere{i}")));
            if count {
                baseline_respawn.samples.push(d);
            }
            let d = start_sample(base, &spec, &run.path().join(format!("base{i}")));
            if count {
                baseline_nocg.samples.push(d);
            }
        }

        for (args, stats) in [
            (&["--scope"][..], &mut scope),
            (&["--pipe", "--wait", "--collect"][..], &mut service),
        ] {
            if !systemd {
                break;
            }
            let (r, w) = pipe();
            let t = Instant::now();
            let mut c = Command::new("systemd-run")
                .arg("--quiet")
                .args(args)
                .arg(&busybox)
                .args(["echo", "x"])
                .stdin(Stdio::null())
                .stdout(Stdio::from(w))
                .spawn()
                .unwrap();
            let d = first_byte(t, r);
            let st = c.wait().unwrap();
            assert!(st.success(), "systemd-run {args:?}: {st}");
            if count {
                stats.samples.push(d);
            }
        }

        for (manager, stats) in [("cgroupfs", &mut crun_s), ("disabled", &mut crun_nocg)] {
            if !crun {
                break;
            }
            let (r, w) = pipe();
            let id = format!("lh-bench-{}-{manager}-{i}", std::process::id());
            let t = Instant::now();
            let mut c = Command::new("crun")
                .arg(format!("--cgroup-manager={manager}"))
                .args(["run", "--bundle"])
                .arg(&bundle)
                .arg(&id)
                .stdin(Stdio::null())
                .stdout(Stdio::from(w))
                .spawn()
                .unwrap();
            let d = first_byte(t, r);
            let st = c.wait().unwrap();
            assert!(st.success(), "crun run: {st}");
            let _ = Command::new("crun").args(["delete", "-f", &id]).output();
            if count {
                stats.samples.push(d);
            }
        }
    }

    println!(
        "- date: {}",
        String::from_utf8_lossy(
            &Command::new("date")
                .args(["-u", "+%Y-%m-%d %H:%M UTC"])
                .output()
                .unwrap()
                .stdout
        )
        .trim()
    );
    println!(
        "- kernel: {}",
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "- load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("- starts per candidate: {n} (interleaved, after one warm-up round)");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    println!(
        "- cgroup2: {}",
        mounts
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("/sys/fs/cgroup"))
            .unwrap_or("?")
    );
    println!(
        "- engines' cgroups under: {}",
        cgroups
            .dir(&CgroupPath::new("x").unwrap())
            .parent()
            .unwrap()
            .display()
    );
    if let Some((_, name)) = &baseline {
        println!("- baseline row: {name}");
    }
    println!();
    println!("| candidate | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for s in [
        &floor,
        &unshare,
        &ours,
        &ours_shim_joins,
        &ours_nocg,
        &baseline_nocg,
        &respawn,
        &baseline_respawn,
        &crun_s,
        &crun_nocg,
        &scope,
        &service,
        &exit_seen,
    ] {
        let base_row = std::ptr::eq(s, &baseline_nocg) || std::ptr::eq(s, &baseline_respawn);
        if base_row && baseline.is_none() {
            continue;
        }
        if s.samples.is_empty() {
            println!("| {} | skipped: not installed here | | |", s.name);
            continue;
        }
        println!(
            "| {} | {} | {} | {} |",
            s.name,
            ms(s.pct(0.5)),
            ms(s.pct(0.99)),
            ms(s.pct(1.0))
        );
    }
}
