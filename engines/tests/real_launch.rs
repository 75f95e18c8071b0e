//! T1 (root): the launcher on the host's kernel. Ignored unless run with
//! `--ignored` or `--include-ignored` (scripts/test does, as root); then
//! each `real_…` test prints "skipped: <reason>" when a facility of the
//! host's kernel is missing (cgroup2, a controller, cgroup.kill), and
//! FAILS when root or something scripts/install-deps installs (busybox) is
//! missing; none passes silently.
//!
//! No libtest harness: this binary is also the engine that probes its own
//! confinement (`real_launch --probe …`, copied into the test rootfs with
//! its shared libraries).

use std::fs;
use std::io::Read;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use leasehold_engines::cgroup::{CgroupError, CgroupFs, CgroupPath, Cgroups, Controller};
use leasehold_engines::launch::{
    read_report, DataDir, Exit, LaunchError, LaunchSpec, Launcher, ProbeExit, Respawn, Running,
    SecretBytes, CONFINE_FAILED, LAUNCHER_JOINS, SECRETS_AFTER_JOIN, STATUS_FIFO, WARM,
};

const SHIM: &str = env!("CARGO_BIN_EXE_leasehold-engine-shim");
const ENGINE_UID: u32 = 61_234;
const ENGINE_GID: u32 = 61_234;

enum Outcome {
    Passed,
    Skipped(String),
}

type Test = fn() -> Outcome;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--probe") {
        std::process::exit(probe(&args[2..]));
    }
    if args.get(1).map(String::as_str) == Some("--in-engine") {
        std::process::exit(in_engine(&args[2]));
    }
    if args.get(1).map(String::as_str) == Some("--hog") {
        std::process::exit(hog());
    }
    if args.get(1).map(String::as_str) == Some("--forks") {
        std::process::exit(forks());
    }
    if args.get(1).map(String::as_str) == Some("--agent") {
        let s = spec(
            Path::new(&args[3]),
            &[
                "/bin/sh",
                "-c",
                "trap 'exit 5' TERM; while :; do sleep 1; done",
            ],
        );
        let r = Launcher::new(SHIM)
            .start(
                &s,
                Path::new(&args[2]),
                Stdio::null(),
                Stdio::null(),
                vec![],
            )
            .unwrap();
        println!("{}", r.shim_pid());
        return;
    }
    // As the agent does (its unit's LimitNOFILE): the engines must start
    // with 1024 again all the same.
    raise_open_files();
    let tests: &[(&str, Test)] = &[
        ("real_confined_engine", real_confined_engine),
        ("real_confined_engine_warm", real_confined_engine_warm),
        ("real_exit_status_and_signals", real_exit_status_and_signals),
        (
            "real_data_dir_through_a_link_is_not_mounted",
            real_data_dir_through_a_link_is_not_mounted,
        ),
        ("real_respawn_in_place", real_respawn_in_place),
        ("real_exec_probe", real_exec_probe),
        (
            "real_engine_outlives_its_launcher",
            real_engine_outlives_its_launcher,
        ),
        ("real_cgroup_join_kill_remove", real_cgroup_join_kill_remove),
        (
            "real_cgroup_join_fails_closed",
            real_cgroup_join_fails_closed,
        ),
        ("real_held_start", real_held_start),
        ("real_secrets_follow_the_word", real_secrets_follow_the_word),
        ("real_warm_shim", real_warm_shim),
        (
            "real_shim_keeps_no_descriptor_of_the_agents",
            real_shim_keeps_no_descriptor_of_the_agents,
        ),
        (
            "real_warm_shim_and_the_agents_mounts",
            real_warm_shim_and_the_agents_mounts,
        ),
        (
            "real_warm_shim_hand_off_refused",
            real_warm_shim_hand_off_refused,
        ),
        ("real_cgroup_limits", real_cgroup_limits),
    ];
    let (mut skip, mut filters) = (Vec::new(), Vec::new());
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--skip" => skip.extend(it.next().cloned()),
            "--test-threads" | "--format" | "--color" | "-Z" | "--logfile" => {
                it.next();
            }
            s if s.starts_with('-') => {}
            s => filters.push(s.to_string()),
        }
    }
    // libtest's listing and ignored-only modes: none of these is ignored.
    if args.iter().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return;
    }
    let selected = |name: &str| {
        !skip.iter().any(|s| name.contains(s.as_str()))
            && (filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
    };
    // All of these need root: ignored, as libtest ignores, unless asked for
    // (scripts/test runs them as root with --include-ignored).
    if !args
        .iter()
        .any(|a| a == "--ignored" || a == "--include-ignored")
    {
        let mut ignored = 0;
        for (name, _) in tests.iter().filter(|(n, _)| selected(n)) {
            println!("test {name} ... ignored, needs root (namespaces, mounts, setuid)");
            ignored += 1;
        }
        println!("0 passed, 0 failed, 0 skipped, {ignored} ignored");
        return;
    }
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (name, test) in tests {
        if !selected(name) {
            continue;
        }
        match std::panic::catch_unwind(test) {
            Ok(Outcome::Passed) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Ok(Outcome::Skipped(why)) => {
                println!("test {name} ... skipped: {why}");
                skipped += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        std::process::exit(101);
    }
}

/// Root is what running the ignored tests asks for: without it they
/// fail (as `require_root()` does in the libtest tests), never skip.
fn need_root() -> Option<Outcome> {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root (namespaces, mounts, setuid): run as root with --include-ignored (scripts/test does)"
    );
    None
}

/// busybox-static is installed by scripts/install-deps: missing, the test
/// fails, naming it.
fn need_busybox(fs_: &Rootfs) {
    assert!(
        fs_.busybox,
        "/bin/busybox is missing: scripts/install-deps installs busybox-static"
    );
}

/// A rootfs with this test binary as `/probe` (and its shared libraries),
/// busybox as `/bin/busybox` and `/bin/sh` if installed.
struct Rootfs {
    _dir: tempfile::TempDir,
    root: PathBuf,
    busybox: bool,
}

fn rootfs() -> Rootfs {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("bin")).unwrap();
    for d in [dir.path(), &root] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let exe = std::env::current_exe().unwrap();
    fs::copy(&exe, root.join("probe")).unwrap();
    let ldd = Command::new("ldd").arg(&exe).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let lib = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(lib) = lib {
            let dst = root.join(lib.strip_prefix("/").unwrap());
            fs::create_dir_all(dst.parent().unwrap()).unwrap();
            fs::copy(&lib, &dst).unwrap();
        }
    }
    let busybox = Path::new("/bin/busybox").exists();
    if busybox {
        fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    }
    Rootfs {
        _dir: dir,
        root,
        busybox,
    }
}

fn spec(root: &Path, argv: &[&str]) -> LaunchSpec {
    LaunchSpec {
        name: "probe".into(),
        rootfs: root.to_path_buf(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/bin".into())],
        cwd: "/".into(),
        uid: ENGINE_UID,
        gid: ENGINE_GID,
        cgroup: None,
        data_dirs: vec![],
        tmp_size: 1 << 20,
        secrets: vec![],
        notify_dir: None,
        respawn: None,
    }
}

fn wait(running: &mut Running) -> Exit {
    match running.wait(Some(Duration::from_secs(20))).unwrap() {
        Some(exit) => exit,
        None => {
            let _ = running.signal(nix::sys::signal::Signal::SIGKILL);
            panic!("engine did not exit within 20 s");
        }
    }
}

/// Lines "key=value" of the probe's output.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in probe output:\n{out}"))
}

fn real_confined_engine() -> Outcome {
    if let Some(skip) = need_root() {
        return skip;
    }
    confined_engine(None);
    Outcome::Passed
}

/// [`real_confined_engine`] through a warm shim (handed a held start in a
/// cgroup; its /proc and /dev made while it waited): the same confinement.
fn real_confined_engine_warm() -> Outcome {
    let (_fs, cg) = match cgroup_setup() {
        Ok(x) => x,
        Err(skip) => return skip,
    };
    let (_, [path], _gone) = scratch_cgroups(&cg, "cwarm", [""]);
    confined_engine(Some(cg.dir(&path)));
    Outcome::Passed
}

/// `fs.suid_dumpable` set for the guard's life, restored on drop (also on
/// a failed assertion's unwind).
struct SuidDumpable(Option<String>);

impl SuidDumpable {
    const PATH: &'static str = "/proc/sys/fs/suid_dumpable";
    fn set(v: &str) -> Self {
        let old = fs::read_to_string(Self::PATH).ok();
        if old.is_some() {
            fs::write(Self::PATH, v).unwrap();
        }
        SuidDumpable(old)
    }
}

impl Drop for SuidDumpable {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = fs::write(Self::PATH, old.trim());
        }
    }
}

/// Starts the probe engine (spawned; or, given a cgroup, through a warm
/// shim) and checks every part of its confinement from inside.
fn confined_engine(warm_in: Option<PathBuf>) {
    // At 1 the kernel leaves a process dumpable across its uid change (at
    // Debian's 0 it does not): only the shim's own prctl then makes it not
    // dumpable, which the engine checks below.
    let _dumpable = SuidDumpable::set("1");
    // A node service on an abstract unix socket (root's, outside).
    let node_service = {
        use std::os::linux::net::SocketAddrExt;
        let a = std::os::unix::net::SocketAddr::from_abstract_name(ABSTRACT).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&a).unwrap()
    };
    let fs_ = rootfs();
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("host-secret");
    fs::write(&secret, "not for engines").unwrap();
    let data = work.path().join("data");
    fs::create_dir(&data).unwrap();
    chown(&data, Some(ENGINE_UID), Some(ENGINE_GID)).unwrap();
    let out_path = work.path().join("out");
    let mut s = spec(&fs_.root, &["/probe", "--probe", secret.to_str().unwrap()]);
    s.data_dirs = vec![DataDir {
        host: data.clone(),
        target: "/data".into(),
    }];
    let out = fs::File::create(&out_path).unwrap();
    let err = out.try_clone().unwrap();
    s.secrets = vec!["db-password".into()];
    // As the agent runs: no transparent huge pages for itself, a flag its
    // children inherit; the engine must not.
    nix::sys::prctl::set_thp_disable(true).unwrap();
    let secret_bytes = vec![SecretBytes::new(b"test-secret-value".to_vec())];
    let mut running = match warm_in {
        None => Launcher::new(SHIM)
            .start(
                &s,
                &work.path().join("run"),
                out.into(),
                err.into(),
                secret_bytes,
            )
            .unwrap(),
        Some(cgroup) => {
            s.cgroup = Some(cgroup);
            let l = Launcher::new(SHIM).with_warm_shim();
            l.warm_up().unwrap();
            let warm = l.warm_pid().unwrap();
            let info = || fs::read_to_string(format!("/proc/{warm}/mountinfo")).unwrap_or_default();
            // Staged before the start, so the start uses what it staged.
            assert!(until(
                || info().contains("/shm/proc ") && info().contains("/shm/dev ")
            ));
            let mut r = l
                .start_held_fds(
                    &s,
                    &work.path().join("run"),
                    out.into(),
                    err.into(),
                    secret_bytes,
                )
                .unwrap();
            assert_eq!(r.shim_pid(), warm, "handed the warm shim");
            // Confined: what it staged moved into the engine's root.
            assert!(
                until(|| r.report().is_some_and(|p| p.seccomp)),
                "{:?}",
                r.report()
            );
            assert!(!info().contains("/shm/"), "left staged: {}", info());
            assert!(
                info().contains(" /proc ") && info().contains(" /dev "),
                "{}",
                info()
            );
            r.release();
            r
        }
    };
    let exit = wait(&mut running);
    let out = fs::read_to_string(&out_path).unwrap();
    assert_eq!(exit, Exit::Code(7), "probe output:\n{out}");
    println!("probe output:\n{out}");

    // Its own unprivileged uid/gid, no supplementary group.
    let id = format!("{ENGINE_UID},{ENGINE_UID},{ENGINE_UID}");
    assert_eq!(field(&out, "uid"), id);
    assert_eq!(field(&out, "gid"), id);
    assert_eq!(field(&out, "groups"), "0");
    // No capability in any set; no_new_privs; seccomp filter mode.
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&out, set), "0000000000000000", "{set}");
    }
    assert_eq!(field(&out, "NoNewPrivs"), "1");
    // Nothing inherited but stdio.
    assert_eq!(field(&out, "extra_fds"), "");
    assert_eq!(field(&out, "Seccomp"), "2");
    // The node's huge page policy, not the agent's.
    assert_eq!(field(&out, "thp_disable"), "false");
    // Pid 2 of its own pid namespace: the shim is 1, and has no other
    // task (no signal thread); its own hostname (uts namespace).
    assert_eq!(field(&out, "pid"), "2");
    // Its own cgroup namespace, rooted at its cgroup: no path of the
    // node's hierarchy.
    assert_eq!(field(&out, "cgroup_path"), "0::/");
    // No core dump (the node's core_pattern is the landlord's), and no
    // way to raise the limit.
    assert_eq!(field(&out, "core_limit"), "0,0");
    // A service's soft limit on descriptors, not the agent's raised one.
    assert_eq!(field(&out, "open_files"), engine_open_files());
    // The shim handles the signals it forwards; the engine starts with
    // none blocked. (What it ignores is its own: this probe is a Rust
    // program, whose runtime ignores SIGPIPE.)
    assert_eq!(field(&out, "SigBlk"), "0000000000000000");
    assert_eq!(field(&out, "hostname"), "probe");
    // Root read-only; private /tmp and the data dir writable.
    assert_eq!(field(&out, "write_root"), "EROFS");
    // The minimal /dev works.
    assert_eq!(field(&out, "dev_null_read"), "ok");
    assert_eq!(field(&out, "dev_null_write"), "ok");
    assert_eq!(field(&out, "dev_urandom_read"), "ok");
    assert_eq!(field(&out, "write_tmp"), "ok");
    assert_eq!(field(&out, "write_data"), "ok");
    assert_eq!(fs::read_to_string(data.join("f")).unwrap(), "data");
    let opts: Vec<&str> = field(&out, "data_mount").split(',').collect();
    for o in ["rw", "nosuid", "nodev"] {
        assert!(opts.contains(&o), "data dir mount {opts:?} lacks {o}");
    }
    // Denied by seccomp (EPERM) where the kernel would otherwise allow or
    // answer differently: TRACEME always succeeds, an unprivileged user
    // namespace is allowed on Debian.
    assert_eq!(field(&out, "mount"), "EPERM");
    assert_eq!(field(&out, "ptrace_traceme"), "EPERM");
    // Binding a socket to a device (allowed unprivileged since 5.7; the
    // node guard's socket check assumes no engine socket does).
    assert_eq!(field(&out, "bind_to_device"), "EPERM");
    // The shim, its pid 1 under the same uid, is not dumpable (/proc/1 is
    // root's): the engine cannot open its memory to forge the status it
    // writes for the agent, whatever the node's fs.suid_dumpable.
    assert_eq!(field(&out, "shim_proc_owner"), "0");
    assert_eq!(field(&out, "unshare_user"), "EPERM");
    assert_eq!(field(&out, "setuid0"), "EPERM");
    // No host path: neither the test's file nor the agent's state.
    assert_eq!(field(&out, "read_host_secret"), "ENOENT");
    assert_eq!(field(&out, "var_lib_leasehold"), "absent");
    // The secret: a 0400 file of the engine's on a read-only tmpfs, not in
    // the environment, not in the run directory.
    assert_eq!(
        field(&out, "secret"),
        format!("test-secret-value mode=400 uid={ENGINE_UID} fs=tmpfs")
    );
    assert_eq!(field(&out, "secret_write"), "EROFS");
    assert_eq!(field(&out, "env_has_secret"), "no");
    for f in fs::read_dir(work.path().join("run")).unwrap() {
        let f = f.unwrap().path();
        let text = fs::read(&f).unwrap();
        assert!(
            !text.windows(17).any(|w| w == b"test-secret-value"),
            "secret in {}",
            f.display()
        );
    }
    // Kernel-wide /proc files masked (empty or absent), /proc/sys read-only.
    assert_eq!(field(&out, "proc_keys"), "empty");
    assert_eq!(field(&out, "proc_timer_list"), "empty");
    assert_ne!(field(&out, "proc_sys_ro"), "ok");
    assert_ne!(field(&out, "proc_1_root_secret"), "ok");

    let report = running.report().expect("report.json");
    assert_eq!(report.result, Ok(()));
    assert!(report.seccomp);
    println!("report: {report:?}");
    if report.landlock_abi > 0 {
        // The ruleset asks for ABI 6 (truncate from 3, scopes from 6):
        // below that it is only partly enforced, and must say so.
        let expected = if report.landlock_abi >= 6 {
            "full"
        } else {
            "partial"
        };
        assert_eq!(report.landlock, expected, "{report:?}");
        println!(
            "landlock: ABI {} reached, {}",
            report.landlock_abi, report.landlock
        );
        // The node's abstract unix socket: out of the engine's Landlock
        // domain from ABI 6 (scopes); below, reached (the documented gap of
        // engines sharing the node's network namespace on 6.1).
        if report.landlock_abi >= 6 {
            assert_eq!(field(&out, "abstract_connect"), "EPERM");
        } else {
            assert_eq!(field(&out, "abstract_connect"), "ok");
            println!("note: Landlock ABI {} has no scopes: the engine reached the node's abstract unix socket (docs/engines.md)", report.landlock_abi);
        }
        // Proof that the ruleset is in force: /proc/self/comm is the
        // engine's own (DAC allows the write); only "/" being read-only in
        // the ruleset denies it.
        assert_eq!(field(&out, "write_proc_comm"), "EACCES");
    } else {
        // securityfs is often not mounted: the report is what we have.
        println!("note: Landlock not available on this kernel: not asserted");
    }
    drop(node_service);
}

fn real_exit_status_and_signals() -> Outcome {
    if let Some(skip) = need_root() {
        return skip;
    }
    let fs_ = rootfs();
    need_busybox(&fs_);
    let work = tempfile::tempdir().unwrap();
    let launcher = Launcher::new(SHIM);
    let run = |argv: &[&str], name: &str| {
        launcher
            .start(
                &spec(&fs_.root, argv),
                &work.path().join(name),
                Stdio::null(),
                Stdio::inherit(),
                vec![],
            )
            .unwrap()
    };
    let mut r = run(&["/bin/sh", "-c", "exit 3"], "code");
    assert_eq!(wait(&mut r), Exit::Code(3));

    // SIGTERM to the shim reaches the engine (which handles it: pid 1
    // ignores signals it has no handler for).
    let mut r = run(
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 42' TERM; while :; do sleep 1; done",
        ],
        "term",
    );
    std::thread::sleep(Duration::from_millis(300));
    r.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(wait(&mut r), Exit::Code(42));

    // SIGKILL on the shim takes the engine with it (parent-death signal).
    let mut r = run(&["/bin/sh", "-c", "while :; do sleep 1; done"], "kill");
    let t = Instant::now();
    while r.engine_pid().is_none() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let engine = r.engine_pid().expect("engine.pid");
    r.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(matches!(wait(&mut r), Exit::ShimLost(_)));
    let t = Instant::now();
    while Path::new(&format!("/proc/{engine}")).exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let state = fs::read_to_string(format!("/proc/{engine}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z"),
        "engine {engine} survived: {state}"
    );

    // A confinement failure is reported, not run: a missing program.
    let mut r = run(&["/nonexistent"], "fail");
    match wait(&mut r) {
        Exit::LaunchFailed(why) => assert!(why.contains("/nonexistent"), "{why}"),
        other => panic!("{other:?}"),
    }
    Outcome::Passed
}

/// A data dir whose host path has a symlink below `data/` (what an engine
/// can plant in its own data dir) is not mounted: the start fails, naming
/// it, and the link's target is neither shown to the engine nor touched.
fn real_data_dir_through_a_link_is_not_mounted() -> Outcome {
    if let Some(skip) = need_root() {
        return skip;
    }
    let fs_ = rootfs();
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("host-file"), "host").unwrap();
    let data = work.path().join("data");
    fs::create_dir_all(data.join("a")).unwrap();
    std::os::unix::fs::symlink(&outside, data.join("a/b")).unwrap();
    // The engine would list the directory; it never runs.
    let mut s = spec(&fs_.root, &["/probe", "--probe", "/nonexistent"]);
    s.data_dirs = vec![DataDir {
        host: data.join("a/b"),
        target: "/a/b".into(),
    }];
    let out = work.path().join("out");
    let o = fs::File::create(&out).unwrap();
    let mut r = Launcher::new(SHIM)
        .start(
            &s,
            &work.path().join("run"),
            o.try_clone().unwrap().into(),
            o.into(),
            vec![],
        )
        .unwrap();
    match wait(&mut r) {
        Exit::LaunchFailed(why) => assert!(
            why.contains("symlink or not a directory") && why.contains("a/b"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        1,
        "nothing made through the link"
    );
    Outcome::Passed
}

/// The shim's grant: one respawn, told on the status FIFO before the new
/// engine runs; none after a clean exit unless granted; none when a
/// SIGTERM comes during the delay (the stop is never lost between two
/// engines).
fn real_respawn_in_place() -> Outcome {
    if let Some(skip) = need_root() {
        return skip;
    }
    let fs_ = rootfs();
    need_busybox(&fs_);
    let work = tempfile::tempdir().unwrap();
    let launcher = Launcher::new(SHIM);
    // The agent's side: the FIFO and its read end, made before the start.
    let run = |argv: &[&str], name: &str, grant: Option<Respawn>| {
        let dir = work.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        nix::unistd::mkfifo(
            &dir.join(STATUS_FIFO),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let status = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(dir.join(STATUS_FIFO))
                .unwrap()
        };
        let mut s = spec(&fs_.root, argv);
        s.respawn = grant;
        let r = launcher
            .start(&s, &dir, Stdio::null(), Stdio::inherit(), vec![])
            .unwrap();
        (r, status)
    };
    let records = |mut f: fs::File| {
        let mut text = String::new();
        match f.read_to_string(&mut text) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("status FIFO: {e}"),
        }
        text
    };
    let grant = |delay_ms, on_clean_exit| {
        Some(Respawn {
            delay_ms,
            on_clean_exit,
        })
    };
    // Twice "exit 3": one respawn, then the shim ends with the second exit.
    let (mut r, st) = run(&["/bin/sh", "-c", "exit 3"], "once", grant(1, false));
    assert_eq!(wait(&mut r), Exit::Code(3));
    assert_eq!(
        records(st),
        "{\"exited\":{\"exit\":{\"Code\":3}}}\n\"respawned\"\n"
    );
    // Exit code 0 is not a failure: no respawn unless granted for it.
    let (mut r, st) = run(&["/bin/sh", "-c", "exit 0"], "clean", grant(1, false));
    assert_eq!(wait(&mut r), Exit::Code(0));
    assert_eq!(records(st), "");
    let (mut r, st) = run(&["/bin/sh", "-c", "exit 0"], "always", grant(1, true));
    assert_eq!(wait(&mut r), Exit::Code(0));
    assert_eq!(records(st).lines().count(), 2);
    // A stop during the delay: no respawn, the shim ends at once (the
    // exit was told, the respawn never).
    let (mut r, st) = run(
        &["/bin/sh", "-c", "exit 1"],
        "stopped",
        grant(60_000, false),
    );
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    r.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(wait(&mut r), Exit::Code(1));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(records(st), "{\"exited\":{\"exit\":{\"Code\":1}}}\n");
    // Without the FIFO the grant is not used (nothing could tell the
    // agent).
    let dir = work.path().join("nofifo");
    let mut s = spec(&fs_.root, &["/bin/sh", "-c", "exit 4"]);
    s.respawn = grant(1, false);
    let mut r = launcher
        .start(&s, &dir, Stdio::null(), Stdio::inherit(), vec![])
        .unwrap();
    assert_eq!(wait(&mut r), Exit::Code(4));
    Outcome::Passed
}

/// `Launcher::probe` on its own (agentd tests it through the agent): a
/// command run inside a running engine (its mount, pid, ipc and uts
/// namespaces, its uid, no_new_privs, seccomp, Landlock) — what exec
/// probes do; its exit code, its timeout with what it started, and a
/// refusal once the engine is gone.
fn real_exec_probe() -> Outcome {
    if let Some(skip) = need_root() {
        return skip;
    }
    let fs_ = rootfs();
    need_busybox(&fs_);
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    fs::create_dir(&data).unwrap();
    chown(&data, Some(ENGINE_UID), Some(ENGINE_GID)).unwrap();
    let mut s = spec(
        &fs_.root,
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM; while :; do sleep 1; done",
        ],
    );
    s.data_dirs = vec![DataDir {
        host: data.clone(),
        target: "/data".into(),
    }];
    // As the agent runs: huge pages off for itself, a flag its children
    // inherit; a probe, like the engine, must have the node's policy.
    nix::sys::prctl::set_thp_disable(true).unwrap();
    let launcher = Launcher::new(SHIM);
    let run_dir = work.path().join("run");
    let mut r = launcher
        .start(&s, &run_dir, Stdio::null(), Stdio::null(), vec![])
        .unwrap();
    // A failed assertion must not leave the engine running (through a
    // pidfd of the shim: never another process that got its pid).
    struct KillOnDrop(std::os::fd::OwnedFd);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = rustix::process::pidfd_send_signal(&self.0, rustix::process::Signal::KILL);
        }
    }
    let _kill = KillOnDrop(r.pidfd().try_clone_to_owned().unwrap());
    let t = Instant::now();
    while r.engine_pid().is_none() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let engine = r.engine_pid().expect("engine.pid");
    // A probe is refused until the shim's report is written (after
    // confinement); the engine's pid shows before that.
    while read_report(&run_dir).is_none() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let probe = |argv: &[&str], timeout_ms| {
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        launcher.probe(&run_dir, &argv, Duration::from_millis(timeout_ms))
    };

    assert_eq!(
        probe(&["/probe", "--in-engine", "/data/probe.out"], 10_000),
        ProbeExit::Code(0)
    );
    let out = fs::read_to_string(data.join("probe.out")).unwrap();
    println!("exec probe:\n{out}");
    let ns = |kind: &str| {
        fs::read_link(format!("/proc/{engine}/ns/{kind}"))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    for kind in ["mnt", "pid", "ipc", "uts", "cgroup"] {
        assert_eq!(field(&out, kind), ns(kind), "{kind} namespace");
        let host = fs::read_link(format!("/proc/self/ns/{kind}")).unwrap();
        assert_ne!(
            field(&out, kind),
            host.to_string_lossy(),
            "{kind}: the host's"
        );
    }
    assert_eq!(field(&out, "cgroup_path"), "0::/");
    // No core dump (the node's core_pattern is the landlord's), and no
    // way to raise the limit.
    assert_eq!(field(&out, "core_limit"), "0,0");
    // A service's soft limit on descriptors, not the agent's raised one.
    assert_eq!(field(&out, "open_files"), engine_open_files());
    let id = format!("{ENGINE_UID},{ENGINE_UID},{ENGINE_UID}");
    assert_eq!(field(&out, "uid"), id);
    assert_eq!(field(&out, "NoNewPrivs"), "1");
    assert_eq!(field(&out, "Seccomp"), "2");
    assert_eq!(field(&out, "CapEff"), "0000000000000000");
    assert_eq!(field(&out, "hostname"), "probe");
    assert_eq!(field(&out, "thp_disable"), "false");

    // Its exit code is the probe's result.
    assert_eq!(
        probe(&["/bin/sh", "-c", "exit 3"], 10_000),
        ProbeExit::Code(3)
    );
    // Not entered while the shim has not said it is confined (no report
    // yet: before its pivot_root the namespaces' root is the node's), nor
    // when the root it would enter is not the image's (review).
    let report = run_dir.join("report.json");
    let saved = fs::read(&report).unwrap();
    fs::write(&report, b"").unwrap();
    match probe(&["/bin/sh", "-c", "exit 0"], 10_000) {
        ProbeExit::NotRun(why) => assert!(why.contains("not confined yet"), "{why}"),
        other => panic!("probed before the report: {other:?}"),
    }
    fs::write(&report, &saved).unwrap();
    let spec_file = run_dir.join("spec.json");
    let spec_text = fs::read_to_string(&spec_file).unwrap();
    let mut other: serde_json::Value = serde_json::from_str(&spec_text).unwrap();
    other["rootfs"] = serde_json::Value::String(data.display().to_string());
    fs::write(&spec_file, other.to_string()).unwrap();
    match probe(&["/bin/sh", "-c", "exit 0"], 10_000) {
        ProbeExit::NotRun(why) => assert!(why.contains("not confined yet"), "{why}"),
        other => panic!("probed into a root that is not the spec's: {other:?}"),
    }
    fs::write(&spec_file, &spec_text).unwrap();
    assert_eq!(
        probe(&["/bin/sh", "-c", "exit 0"], 10_000),
        ProbeExit::Code(0)
    );
    // Past its timeout the shim kills it, with what it started (its
    // process group): the time is the probe's 2 s, not this call's
    // backstop (3 s), and afterwards the engine's init has the engine as
    // its only child — a background sleep left behind would be
    // re-parented to it.
    let t = Instant::now();
    let sleeper = [
        "/bin/sh",
        "-c",
        "/bin/busybox sleep 30 & /bin/busybox sleep 30",
    ];
    assert_eq!(probe(&sleeper, 2_000), ProbeExit::TimedOut);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(2_800),
        "{took:?}"
    );
    let shim = r.shim_pid();
    let children = || fs::read_to_string(format!("/proc/{shim}/task/{shim}/children")).unwrap();
    let t = Instant::now();
    while children().trim() != engine.to_string() && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(children().trim(), engine.to_string(), "left in the engine");

    r.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(wait(&mut r), Exit::Code(0));
    match probe(&["/bin/sh", "-c", "exit 0"], 10_000) {
        ProbeExit::NotRun(why) => assert!(why.contains("gone"), "{why}"),
        other => panic!("probe into an ended engine: {other:?}"),
    }
    Outcome::Passed
}

fn real_engine_outlives_its_launcher() -> Outcome {
    if let Some(skip) = need_root() {
        return skip;
    }
    let fs_ = rootfs();
    need_busybox(&fs_);
    let work = tempfile::tempdir().unwrap();
    let run_dir = work.path().join("run");
    // A stand-in agent: a child process that starts the engine and exits
    // (as the agent does on restart); the shim is re-parented.
    let agent = Command::new(std::env::current_exe().unwrap())
        .args([
            "--agent",
            run_dir.to_str().unwrap(),
            fs_.root.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(agent.status.success(), "{agent:?}");
    let shim: u32 = String::from_utf8_lossy(&agent.stdout)
        .trim()
        .parse()
        .unwrap();
    let stat = fs::read_to_string(format!("/proc/{shim}/stat")).unwrap();
    let ppid = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert_ne!(ppid, std::process::id().to_string());
    // Re-adopted from the run directory alone; not our child.
    let mut adopted = Running::adopt(&run_dir).unwrap();
    assert_eq!(adopted.shim_pid(), shim);
    assert_eq!(
        adopted.wait(Some(Duration::from_millis(200))).unwrap(),
        None,
        "still running"
    );
    adopted.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    // Exit seen through the pidfd of a process that is not our child, the
    // status from exit.json.
    assert_eq!(wait(&mut adopted), Exit::Code(5));
    let t = Instant::now();
    while Path::new(&format!("/proc/{shim}")).exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(Running::adopt(&run_dir).is_err(), "gone after exit");
    Outcome::Passed
}

fn real_cgroup_join_kill_remove() -> Outcome {
    let (fs_, cg) = match cgroup_setup() {
        Ok(x) => x,
        Err(skip) => return skip,
    };
    let (base, [engine], _gone) = scratch_cgroups(&cg, "join", ["engine"]);

    // On this host the cgroup2 hierarchy has no controller: enabling one
    // must fail, naming the file (cgroups-rs would skip it silently).
    let controllers = fs::read_to_string(cg.dir(&base).join("cgroup.controllers")).unwrap();
    if !controllers.contains("memory") {
        let err = cg
            .enable_controllers(&base, &[Controller::Memory])
            .unwrap_err();
        assert!(matches!(err, CgroupError::ControllerAbsent { .. }), "{err}");
        let err = cg
            .set_limits(&engine, &[("memory.max", "1048576".into())])
            .unwrap_err();
        assert!(matches!(err, CgroupError::Absent { .. }), "{err}");
        assert!(err.to_string().contains("memory.max"), "{err}");
    }

    let work = tempfile::tempdir().unwrap();
    // A secret larger than a pipe's buffer: it follows the launcher's
    // word on the same pipe (the moving thread writes both, the shim
    // reads them unbuffered).
    let big: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut s = spec(
        &fs_.root,
        &[
            "/bin/sh",
            "-c",
            "wc -c < /run/secrets/big; while :; do sleep 1; done",
        ],
    );
    s.cgroup = Some(cg.dir(&engine));
    s.secrets = vec!["big".into()];
    let out = work.path().join("out");
    let mut r = Launcher::new(SHIM)
        .start(
            &s,
            &work.path().join("run"),
            Stdio::from(fs::File::create(&out).unwrap()),
            Stdio::null(),
            vec![SecretBytes::new(big.clone())],
        )
        .unwrap();
    in_cgroup(&cg, &engine, &r);
    let t = Instant::now();
    while fs::read_to_string(&out).unwrap().is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fs::read_to_string(&out).unwrap().trim(), "100000");
    if !cg.dir(&engine).join("cgroup.kill").exists() {
        let _ = r.signal(nix::sys::signal::Signal::SIGKILL);
        wait(&mut r);
        return Outcome::Skipped("no cgroup.kill (kernel < 5.14)".into());
    }
    cg.kill(&engine).unwrap();
    assert!(matches!(wait(&mut r), Exit::ShimLost(_)));
    let t = Instant::now();
    while !cg.pids(&engine).unwrap().is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(cg.pids(&engine).unwrap(), Vec::<u32>::new());
    assert_eq!(
        cg.remove(&engine).unwrap(),
        leasehold_engines::cgroup::Action::Done
    );

    // The way before the launcher moved the shim: the shim joins by itself
    // (kept for an older agent's calls and for the benches' comparison).
    cg.create(&engine).unwrap();
    s.secrets = vec![];
    let mut r = Launcher::new(SHIM)
        .shim_joins_cgroup()
        .start(
            &s,
            &work.path().join("run2"),
            Stdio::null(),
            Stdio::null(),
            vec![],
        )
        .unwrap();
    in_cgroup(&cg, &engine, &r);
    cg.kill(&engine).unwrap();
    assert!(matches!(wait(&mut r), Exit::ShimLost(_)));
    Outcome::Passed
}

/// The launcher moves the shim into its cgroup while it starts up; the
/// shim starts nothing before the launcher's word. A move the kernel
/// refuses (the cgroup is gone), and a launcher that ends before its word
/// (the pipe's end), or sends another, each fail the start closed: the
/// engine never runs, the report says why.
fn real_cgroup_join_fails_closed() -> Outcome {
    let (fs_, cg) = match cgroup_setup() {
        Ok(x) => x,
        Err(skip) => return skip,
    };
    let gone = CgroupPath::new(format!("leasehold-test-gone-{}", std::process::id())).unwrap();
    assert!(!cg.dir(&gone).exists());
    let work = tempfile::tempdir().unwrap();
    // The engine would print: its output must stay empty. With a secret:
    // after a failed move none is written (the reason ends the pipe).
    let mut s = spec(&fs_.root, &["/bin/echo", "ran"]);
    s.cgroup = Some(cg.dir(&gone));
    s.secrets = vec!["never-read".into()];
    let out = work.path().join("out");
    let mut r = Launcher::new(SHIM)
        .start(
            &s,
            &work.path().join("run"),
            Stdio::from(fs::File::create(&out).unwrap()),
            Stdio::null(),
            vec![SecretBytes::new(b"never read".to_vec())],
        )
        .unwrap();
    s.secrets = vec![];
    match wait(&mut r) {
        Exit::LaunchFailed(why) => {
            assert!(why.contains("did not move the shim"), "{why}");
            // The launcher's own reason, from its write.
            assert!(why.contains("writing its pid there"), "{why}");
            assert!(why.contains(&gone.to_string()), "{why}");
            assert!(why.contains("cgroup.procs"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    let report = r.report().expect("report.json");
    assert!(report.result.is_err(), "{report:?}");
    assert!(!report.seccomp, "{report:?}");
    assert_eq!(fs::read_to_string(&out).unwrap(), "");

    // The shim by hand, told to wait for the launcher's word: the end of
    // stdin, or a byte that is not the word, and it stops there; the same
    // after the word on the move, for the word to go on (then confined
    // already, the engine not started).
    for (i, (stdin, reason, confined)) in [
        (&b""[..], "ended before its word", false),
        (&b"?"[..], "word 0x3f is not one the shim knows", false),
        (
            &b"+"[..],
            "did not let the engine start: it ended before its word to go on",
            true,
        ),
        (
            &b"+?"[..],
            "did not let the engine start: its word 0x3f",
            true,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let run = work.path().join(format!("by-hand-{i}"));
        let mut shim = shim_by_hand(&run, &s, AGENT_ORDER);
        {
            use std::io::Write;
            let mut pipe = shim.stdin.take().unwrap();
            pipe.write_all(stdin).unwrap();
        }
        let status = shim.wait().unwrap();
        assert_eq!(status.code(), Some(CONFINE_FAILED), "{status}");
        let report = fs::read_to_string(run.join("report.json")).unwrap();
        assert!(report.contains(reason), "{report}");
        assert_eq!(report.contains("\"seccomp\":true"), confined, "{report}");
        let exit = fs::read_to_string(run.join("exit.json")).unwrap();
        assert!(exit.contains("LaunchFailed"), "{exit}");
    }

    // The shim waits for the word: with stdin open and no word, it starts
    // nothing and reports nothing; moved (by hand here) and told, it
    // starts the engine in that cgroup.
    let (_, [held], _gone) = scratch_cgroups(&cg, "held", [""]);
    let run = work.path().join("held");
    let mut s = spec(&fs_.root, &["/bin/sh", "-c", "while :; do sleep 1; done"]);
    s.cgroup = Some(cg.dir(&held));
    let mut shim = shim_by_hand(&run, &s, AGENT_ORDER);
    let pid = shim.id();
    let children = || fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    // A negative: nothing to wait for but time (the engine would start
    // within milliseconds of the shim's start-up).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        children(),
        "",
        "the shim started the engine without the word"
    );
    assert_eq!(fs::read_to_string(run.join("report.json")).unwrap(), "");
    assert!(shim.try_wait().unwrap().is_none());
    fs::write(cg.dir(&held).join("cgroup.procs"), pid.to_string()).unwrap();
    let mut stdin = shim.stdin.take().unwrap();
    {
        use std::io::Write;
        stdin.write_all(b"+").unwrap();
    }
    // Moved: it confines itself, reports so, and still starts nothing
    // until the word to go on.
    let report = run.join("report.json");
    let t = Instant::now();
    while !fs::read_to_string(&report)
        .unwrap()
        .contains("\"seccomp\":true")
        && t.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let text = fs::read_to_string(&report).unwrap();
    let r: leasehold_engines::launch::Report = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not confined within 5 s: report.json {text:?}: {e}"));
    assert!(r.result.is_ok() && r.seccomp, "{r:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        children(),
        "",
        "the engine started before the word to go on"
    );
    {
        use std::io::Write;
        stdin.write_all(b">").unwrap();
    }
    drop(stdin);
    let t = Instant::now();
    while children().is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let engine: u32 = children().trim().parse().expect("the engine started");
    let pids = cg.pids(&held).unwrap();
    assert!(pids.contains(&pid) && pids.contains(&engine), "{pids:?}");
    cg.kill(&held).unwrap();
    shim.wait().unwrap();
    Outcome::Passed
}

/// The secrets come after the word on the move (so the shim reads them into
/// memory charged to the engine's cgroup): the shim by hand, with the
/// agent's flags, takes a secret's first byte where the word belongs for
/// an unknown word and fails closed before reading any secret; told `+`,
/// then the secret, then `>`, it starts the engine with the secret in
/// place. An older agent's order (the secret first) still works with its
/// flag. The launcher end to end, with secrets: `real_cgroup_join_kill_remove`.
fn real_secrets_follow_the_word() -> Outcome {
    let (fs_, cg) = match cgroup_setup() {
        Ok(x) => x,
        Err(skip) => return skip,
    };
    let work = tempfile::tempdir().unwrap();
    let frame = |bytes: &[u8]| {
        let mut f = u32::try_from(bytes.len()).unwrap().to_le_bytes().to_vec();
        f.extend_from_slice(bytes);
        f
    };
    let secret = frame(b"hello");
    let mut s = spec(
        &fs_.root,
        &[
            "/bin/sh",
            "-c",
            "cat /run/secrets/s; echo; while :; do sleep 1; done",
        ],
    );
    s.secrets = vec!["s".into()];

    // The secret where the word belongs: 0x05 (its length's first byte).
    let (_, [held], _gone) = scratch_cgroups(&cg, "order", [""]);
    s.cgroup = Some(cg.dir(&held));
    let run = work.path().join("secret-first");
    let mut shim = shim_by_hand(&run, &s, AGENT_ORDER);
    fs::write(cg.dir(&held).join("cgroup.procs"), shim.id().to_string()).unwrap();
    let mut stdin = shim.stdin.take().unwrap();
    {
        use std::io::Write;
        stdin.write_all(&secret).unwrap();
    }
    // Stdin stays open: only the byte read as the word can end the shim.
    let t = Instant::now();
    let status = loop {
        if let Some(st) = shim.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(5) {
            let _ = shim.kill();
            panic!(
                "the shim took a secret for its word's place and waited: report {:?}",
                fs::read_to_string(run.join("report.json"))
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(stdin);
    assert_eq!(status.code(), Some(CONFINE_FAILED), "{status}");
    let report = fs::read_to_string(run.join("report.json")).unwrap();
    assert!(
        report.contains("word 0x05 is not one the shim knows"),
        "{report}"
    );

    // Each order with its flags: moved by hand, told, the secret, let go.
    for (name, flags, stdin_bytes) in [
        ("agent", AGENT_ORDER, [&b"+"[..], &secret, b">"].concat()),
        ("older", OLDER_ORDER, [&secret[..], b"+", b">"].concat()),
    ] {
        let run = work.path().join(name);
        let out = work.path().join(format!("{name}.out"));
        fs::create_dir(&run).unwrap();
        fs::write(run.join("spec.json"), serde_json::to_vec(&s).unwrap()).unwrap();
        let mut shim = Command::new(SHIM)
            .args(flags)
            .arg(&run)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(fs::File::create(&out).unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        fs::write(cg.dir(&held).join("cgroup.procs"), shim.id().to_string()).unwrap();
        {
            use std::io::Write;
            let mut stdin = shim.stdin.take().unwrap();
            stdin.write_all(&stdin_bytes).unwrap();
        }
        // Until the whole line (cat and echo write apart).
        let t = Instant::now();
        while !fs::read_to_string(&out).unwrap().ends_with('\n')
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            fs::read_to_string(&out).unwrap(),
            "hello\n",
            "{name} order: report {:?}",
            fs::read_to_string(run.join("report.json"))
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(shim.id()).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        );
        shim.wait().unwrap();
    }
    Outcome::Passed
}

/// `Launcher::start_held`: the shim, moved into its cgroup, starts nothing
/// until `release`; waited on unreleased, it fails closed and the engine
/// never runs. Refused without a cgroup (nothing would hold the shim).
fn real_held_start() -> Outcome {
    let (fs_, cg) = match cgroup_setup() {
        Ok(x) => x,
        Err(skip) => return skip,
    };
    let work = tempfile::tempdir().unwrap();
    let l = Launcher::new(SHIM);
    let plain = spec(&fs_.root, &["/bin/echo", "ran"]);
    let err = l
        .start_held(
            &plain,
            &work.path().join("no-cg"),
            Stdio::null(),
            Stdio::null(),
            vec![],
        )
        .unwrap_err();
    assert!(matches!(err, LaunchError::InvalidSpec(_)), "{err}");
    assert!(
        !work.path().join("no-cg/spec.json").exists(),
        "refused before anything"
    );

    let (_, [held, dropped], _gone) = scratch_cgroups(&cg, "hold", ["held", "dropped"]);

    // Held: moved, but nothing runs until the release.
    let mut s = spec(
        &fs_.root,
        &["/bin/sh", "-c", "echo ran; while :; do sleep 1; done"],
    );
    s.cgroup = Some(cg.dir(&held));
    let out = work.path().join("out");
    let mut r = l
        .start_held(
            &s,
            &work.path().join("held"),
            Stdio::from(fs::File::create(&out).unwrap()),
            Stdio::null(),
            vec![],
        )
        .unwrap();
    let t = Instant::now();
    while !cg.pids(&held).unwrap().contains(&r.shim_pid()) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(cg.pids(&held).unwrap(), vec![r.shim_pid()], "moved, alone");
    // Moved, it confines itself meanwhile (its report says so).
    let t = Instant::now();
    while !r.report().is_some_and(|p| p.seccomp) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let p = r.report().expect("report.json");
    assert!(
        p.result.is_ok() && p.seccomp,
        "confined before the release: {p:?}"
    );
    // A negative: nothing to wait for but time (unheld, the engine starts
    // within milliseconds of its confinement).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        r.engine_pid(),
        None,
        "the engine started before the release"
    );
    assert_eq!(fs::read_to_string(&out).unwrap(), "");
    r.release();
    in_cgroup(&cg, &held, &r);
    let t = Instant::now();
    while fs::read_to_string(&out).unwrap().is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fs::read_to_string(&out).unwrap(), "ran\n");
    r.release(); // once only: a second is nothing
    let _ = r.signal(nix::sys::signal::Signal::SIGKILL);
    wait(&mut r);

    // Never released (the caller could not record it): waited on, the
    // start is abandoned, the shim fails closed, the engine never ran.
    s.cgroup = Some(cg.dir(&dropped));
    let out = work.path().join("out-dropped");
    let mut r = l
        .start_held(
            &s,
            &work.path().join("dropped"),
            Stdio::from(fs::File::create(&out).unwrap()),
            Stdio::null(),
            vec![],
        )
        .unwrap();
    match wait(&mut r) {
        // Moved and confined meanwhile: it waited for the word to go on.
        Exit::LaunchFailed(why) => assert!(why.contains("ended before its word to go on"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fs::read_to_string(&out).unwrap(), "");
    Outcome::Passed
}

/// Until `done` holds, 5 s at most (the state polled: no event for it).
fn until(mut done: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// The warm shim: spawned ahead in a pid namespace of its own, outside
/// the engine's cgroup; handed a held start with a secret, it is the
/// engine's shim (moved, confined, the secret in place, nothing run before
/// the release); the release spawns the next one; one that died is not
/// used (the start spawns its shim); the last launcher dropped ends it.
fn real_warm_shim() -> Outcome {
    let (fs_, cg) = match cgroup_setup() {
        Ok(x) => x,
        Err(skip) => return skip,
    };
    let work = tempfile::tempdir().unwrap();
    let (_, [first, second], _gone) = scratch_cgroups(&cg, "warm", ["first", "second"]);

    let l = Launcher::new(SHIM).with_warm_shim();
    l.warm_up().unwrap();
    let warm = l.warm_pid().expect("a warm shim after warm_up");
    let status = fs::read_to_string(format!("/proc/{warm}/status")).unwrap();
    assert_eq!(
        status_field(&status, "NSpid").split_whitespace().last(),
        Some("1"),
        "pid 1 of a namespace of its own: {status}"
    );
    assert!(
        !cg.pids(&first).unwrap().contains(&warm),
        "not in an engine's cgroup yet"
    );
    l.warm_up().unwrap();
    assert_eq!(l.warm_pid(), Some(warm), "one only");
    // While it waits it stages the engine's /proc and /dev in a mount
    // namespace of its own; the host's mounts do not change.
    let staged = |mi: &str| mi.contains("/shm/proc ") && mi.contains("/shm/dev ");
    assert!(
        until(|| fs::read_to_string(format!("/proc/{warm}/mountinfo")).is_ok_and(|m| staged(&m))),
        "staged: {:?}",
        fs::read_to_string(format!("/proc/{warm}/mountinfo"))
    );
    assert!(!staged(
        &fs::read_to_string("/proc/self/mountinfo").unwrap()
    ));

    let mut s = spec(
        &fs_.root,
        &[
            "/bin/sh",
            "-c",
            "cat /run/secrets/s; echo; while :; do sleep 1; done",
        ],
    );
    s.secrets = vec!["s".into()];
    s.cgroup = Some(cg.dir(&first));
    let out = work.path().join("first.out");
    let fd = |p: &Path| std::os::fd::OwnedFd::from(fs::File::create(p).unwrap());
    let mut r = l
        .start_held_fds(
            &s,
            &work.path().join("first"),
            fd(&out),
            fd(&work.path().join("first.err")),
            vec![SecretBytes::new(b"warm secret".to_vec())],
        )
        .unwrap();
    assert_eq!(r.shim_pid(), warm, "handed the warm shim");
    assert_eq!(l.warm_pid(), None, "taken");
    assert!(
        until(|| r.report().is_some_and(|p| p.seccomp)),
        "confined: {:?}",
        r.report()
    );
    assert!(r.report().unwrap().result.is_ok(), "{:?}", r.report());
    assert_eq!(
        cg.pids(&first).unwrap(),
        vec![warm],
        "moved, alone, nothing run"
    );
    assert_eq!(fs::read_to_string(&out).unwrap(), "");
    r.release();
    assert!(until(|| fs::read_to_string(&out).unwrap().ends_with('\n')));
    assert_eq!(fs::read_to_string(&out).unwrap(), "warm secret\n");
    in_cgroup(&cg, &first, &r);
    assert!(
        until(|| l.warm_pid().is_some()),
        "the release spawns the next warm shim"
    );
    let next = l.warm_pid().unwrap();
    assert_ne!(next, warm);

    // Stopped (alive, but it cannot acknowledge): not handed the start,
    // which spawns its shim after the acknowledgement's bound; ended.
    let stopped = nix::unistd::Pid::from_raw(i32::try_from(next).unwrap());
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGSTOP).unwrap();
    s.cgroup = Some(cg.dir(&second));
    let mut r2 = l
        .start_held_fds(
            &s,
            &work.path().join("stopped"),
            fd(&work.path().join("stopped.out")),
            fd(&work.path().join("stopped.err")),
            vec![SecretBytes::new(b"x".to_vec())],
        )
        .unwrap();
    assert_ne!(
        r2.shim_pid(),
        next,
        "a warm shim that never acknowledged got the start"
    );
    assert!(
        !Path::new(&format!("/proc/{next}")).exists(),
        "the stopped warm shim was left"
    );
    r2.release();
    let _ = r2.signal(nix::sys::signal::Signal::SIGKILL);
    wait(&mut r2);
    assert!(until(|| l.warm_pid().is_some()), "refilled");
    let next = l.warm_pid().unwrap();

    // Dead before the start (a zombie: the launcher reaps it): not handed
    // anything; a shim is spawned.
    let dead = nix::unistd::Pid::from_raw(i32::try_from(next).unwrap());
    nix::sys::signal::kill(dead, nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(until(|| fs::read_to_string(format!("/proc/{next}/stat"))
        .is_ok_and(
            |st| st[st.rfind(')').unwrap() + 2..].starts_with('Z')
        )));
    let out2 = work.path().join("second.out");
    let mut r2 = l
        .start_held_fds(
            &s,
            &work.path().join("second"),
            fd(&out2),
            fd(&work.path().join("second.err")),
            vec![SecretBytes::new(b"cold".to_vec())],
        )
        .unwrap();
    assert_ne!(
        r2.shim_pid(),
        next,
        "a dead warm shim is never handed a start"
    );
    r2.release();
    assert!(until(|| fs::read_to_string(&out2).unwrap().ends_with('\n')));
    assert_eq!(fs::read_to_string(&out2).unwrap(), "cold\n");
    in_cgroup(&cg, &second, &r2);
    assert!(
        until(|| l.warm_pid().is_some()),
        "refilled after a cold start"
    );
    let last = l.warm_pid().unwrap();
    for r in [&mut r, &mut r2] {
        let _ = r.signal(nix::sys::signal::Signal::SIGKILL);
        wait(r);
    }
    drop((r, r2));
    drop(l);
    // Dropped with the last launcher (a refill thread may hold the place a
    // moment longer): ended and reaped.
    assert!(
        until(|| !Path::new(&format!("/proc/{last}")).exists()),
        "the warm shim outlived its launcher"
    );
    Outcome::Passed
}

/// A shim keeps no descriptor of the agent's, even while it lives on
/// (here a warm one, waiting): one inherited without close-on-exec, as
/// the TSS library's per-command socket to swtpm is, is closed as the
/// shim starts — its peer reads the end while the shim still waits. Kept,
/// swtpm (one connection at a time) would never answer the agent again.
fn real_shim_keeps_no_descriptor_of_the_agents() -> Outcome {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::empty(),
    )
    .unwrap();
    // Only `theirs` is inherited.
    fcntl(ours.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
    let l = Launcher::new(SHIM).with_warm_shim();
    l.warm_up().unwrap();
    let warm = l.warm_pid().expect("a warm shim after warm_up");
    drop(theirs);
    let mut peer = std::os::unix::net::UnixStream::from(ours);
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut byte = [0u8; 1];
    let got = peer.read(&mut byte);
    assert!(
        matches!(got, Ok(0)),
        "the warm shim holds the agent's descriptor: {got:?}"
    );
    // Alive, not a zombie (a shim that died closes it too); it may still
    // be staging (running) or already waiting.
    assert_eq!(l.warm_pid(), Some(warm), "still waiting");
    let stat = fs::read_to_string(format!("/proc/{warm}/stat")).unwrap();
    let state = stat[stat.rfind(')').unwrap() + 2..].chars().next();
    assert!(
        matches!(state, Some('R' | 'S' | 'D')),
        "the warm shim is not alive: {stat}"
    );
    drop(l);
    assert!(
        until(|| !Path::new(&format!("/proc/{warm}")).exists()),
        "the warm shim outlived its launcher"
    );
    Outcome::Passed
}

/// Mounts the test made, detached when it ends (passed or not), the
/// last made first.
struct Unmount(Vec<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A waiting warm shim's mounts follow the agent's (slaves): a mount made
/// under a shared mount after its spawn shows in its namespace, and goes
/// from it when unmounted (so it never holds the tenant volume open);
/// `discard_warm` ends it. A start whose root the warm shim cannot see (a
/// mount that did not propagate) is not handed to it: a shim is spawned.
fn real_warm_shim_and_the_agents_mounts() -> Outcome {
    use nix::mount::{mount, MsFlags};
    let (fs_, cg) = match cgroup_setup() {
        Ok(x) => x,
        Err(skip) => return skip,
    };
    let work = tempfile::tempdir().unwrap();
    let (shared, private) = (work.path().join("shared"), work.path().join("private"));
    let mut mounts = Unmount(Vec::new());
    // Two mounts of the test's own, whatever /tmp's propagation is.
    for (dir, kind) in [
        (&shared, MsFlags::MS_SHARED),
        (&private, MsFlags::MS_PRIVATE),
    ] {
        fs::create_dir(dir).unwrap();
        mount(
            Some(dir.as_path()),
            dir.as_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        mounts.0.push(dir.clone());
        mount(
            None::<&str>,
            dir.as_path(),
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        mount(
            None::<&str>,
            dir.as_path(),
            None::<&str>,
            kind,
            None::<&str>,
        )
        .unwrap();
    }
    let l = Launcher::new(SHIM).with_warm_shim();
    l.warm_up().unwrap();
    let warm = l.warm_pid().unwrap();
    let info = || fs::read_to_string(format!("/proc/{warm}/mountinfo")).unwrap_or_default();
    assert!(until(|| info().contains("/shm/dev ")), "staged: {}", info());
    let sub = shared.join("sub");
    fs::create_dir(&sub).unwrap();
    mount(
        Some("tmpfs"),
        sub.as_path(),
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=4k"),
    )
    .unwrap();
    mounts.0.push(sub.clone());
    let shown = format!(" {} ", sub.display());
    assert!(
        until(|| info().contains(&shown)),
        "a mount made since: {}",
        info()
    );
    nix::mount::umount2(sub.as_path(), nix::mount::MntFlags::empty()).unwrap();
    mounts.0.pop();
    assert!(until(|| !info().contains(&shown)), "an unmount: {}", info());

    let (_, [path], _gone) = scratch_cgroups(&cg, "wmounts", [""]);
    let fd = |p: &Path| std::os::fd::OwnedFd::from(fs::File::create(p).unwrap());
    // The image's root bound at `under/NAME` (made after the warm shim's
    // spawn, under the private mount: not in its namespace), started with
    // the root seen as `seen/NAME`: a spawned shim, not the warm one,
    // starts it, and its engine runs.
    let mut cold_start = |name: &str, seen: &Path, why: &str| {
        let warm = l.warm_pid().expect("a warm shim");
        let bound = private.join(name);
        fs::create_dir(&bound).unwrap();
        mount(
            Some(fs_.root.as_path()),
            bound.as_path(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .unwrap();
        mounts.0.push(bound);
        let mut s = spec(
            &seen.join(name),
            &["/bin/sh", "-c", "echo ran; while :; do sleep 1; done"],
        );
        s.cgroup = Some(cg.dir(&path));
        let out = work.path().join(format!("{name}.out"));
        let mut r = l
            .start_held_fds(
                &s,
                &work.path().join(format!("{name}.run")),
                fd(&out),
                fd(&work.path().join(format!("{name}.err"))),
                vec![],
            )
            .unwrap();
        assert_ne!(r.shim_pid(), warm, "{why}");
        assert!(
            !Path::new(&format!("/proc/{warm}")).exists(),
            "that warm shim was left"
        );
        r.release();
        assert!(
            until(|| fs::read_to_string(&out).unwrap() == "ran\n"),
            "the spawned shim's engine ran"
        );
        let _ = r.signal(nix::sys::signal::Signal::SIGKILL);
        wait(&mut r);
        assert!(until(|| l.warm_pid().is_some()), "refilled");
    };
    cold_start("root", &private, "handed a start whose root it cannot see");
    // The same through an absolute symlink: resolved in the warm shim's
    // root, not the test's, the root it would see is the empty directory.
    let link = work.path().join("link");
    std::os::unix::fs::symlink(&private, &link).unwrap();
    cold_start(
        "root2",
        &link,
        "handed through a symlink it resolves elsewhere",
    );

    // Ended before a volume change.
    let next = l.warm_pid().unwrap();
    l.discard_warm();
    assert_eq!(l.warm_pid(), None);
    assert!(
        !Path::new(&format!("/proc/{next}")).exists(),
        "discarded, not ended"
    );
    drop(l);
    Outcome::Passed
}

/// A warm shim driven by hand: whatever is not a whole hand-off (another
/// word, an empty, relative or cut path, no descriptors, one, or three)
/// fails it closed, saying why, before it acknowledges, opens or makes
/// anything; the end of its stdin, or SIGTERM while it waits, ends it
/// quietly.
fn real_warm_shim_hand_off_refused() -> Outcome {
    if let Some(skip) = need_root() {
        return skip;
    }
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    let work = tempfile::tempdir().unwrap();
    let run = work.path().join("run");
    fs::create_dir(&run).unwrap();
    let path = run.as_os_str().as_encoded_bytes().to_vec();
    let header = |word: u8, p: &[u8]| {
        let mut m = vec![word];
        m.extend(u16::try_from(p.len()).unwrap().to_le_bytes());
        m.extend(p);
        m
    };
    let mut cut = header(b'@', &path);
    cut.truncate(cut.len() - 2);
    let null = fs::File::open("/dev/null").unwrap();
    let n = null.as_raw_fd();
    // (case, bytes, descriptors sent with them, exit code, reason on stderr)
    type Case = (&'static str, Option<Vec<u8>>, Vec<i32>, i32, &'static str);
    let cases: Vec<Case> = vec![
        ("the end of stdin", None, vec![], 0, ""),
        (
            "another word",
            Some(header(b'+', &path)),
            vec![n, n],
            CONFINE_FAILED,
            "the word 0x2b is not a hand-off",
        ),
        (
            "an empty path",
            Some(header(b'@', b"")),
            vec![n, n],
            CONFINE_FAILED,
            "a run directory of 0 bytes",
        ),
        (
            "a relative path",
            Some(header(b'@', b"run")),
            vec![n, n],
            CONFINE_FAILED,
            "run is not an absolute path",
        ),
        (
            "a cut path",
            Some(cut),
            vec![n, n],
            CONFINE_FAILED,
            "its run directory",
        ),
        (
            "half a header",
            Some(b"@".to_vec()),
            vec![n, n],
            CONFINE_FAILED,
            "its header",
        ),
        (
            "no descriptors",
            Some(header(b'@', &path)),
            vec![],
            CONFINE_FAILED,
            "0 descriptors, not 2",
        ),
        (
            "one descriptor",
            Some(header(b'@', &path)),
            vec![n],
            CONFINE_FAILED,
            "1 descriptors, not 2",
        ),
        (
            "three descriptors",
            Some(header(b'@', &path)),
            vec![n, n, n],
            CONFINE_FAILED,
            "more than 2 descriptors",
        ),
        ("SIGTERM while waiting", None, vec![], 0, ""),
    ];
    for (what, bytes, fds, code, reason) in cases {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let err = work.path().join("stderr");
        let mut shim = Command::new(SHIM)
            .arg(WARM)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(&err).unwrap()))
            .spawn()
            .unwrap();
        if what.starts_with("SIGTERM") {
            // Once it waits (its handlers are in place): its session is its own.
            let pid = nix::unistd::Pid::from_raw(i32::try_from(shim.id()).unwrap());
            assert!(
                until(|| nix::unistd::getsid(Some(pid)) == Ok(pid)),
                "{what}: never ready"
            );
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        }
        if let Some(b) = bytes {
            let rights = [ControlMessage::ScmRights(&fds)];
            let sent = sendmsg::<()>(
                ours.as_raw_fd(),
                &[std::io::IoSlice::new(&b)],
                if fds.is_empty() { &[] } else { &rights },
                MsgFlags::empty(),
                None,
            )
            .unwrap();
            assert_eq!(sent, b.len());
        }
        if !what.starts_with("SIGTERM") {
            ours.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let t = Instant::now();
        let status = loop {
            if let Some(st) = shim.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > Duration::from_secs(5) {
                let _ = shim.kill();
                panic!("{what}: the warm shim did not end");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(code), "{what}: {status}");
        let said = fs::read_to_string(&err).unwrap();
        assert!(said.contains(reason), "{what}: {said:?}");
        // What it sent back before it ended (it left bytes unread: the end
        // is a reset, after anything it wrote).
        let mut ack = Vec::new();
        match (&ours).read_to_end(&mut ack) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            r => {
                r.unwrap();
            }
        }
        assert!(ack.is_empty(), "{what}: acknowledged {ack:?}");
        assert_eq!(
            fs::read_dir(&run).unwrap().count(),
            0,
            "{what}: it made something"
        );
    }
    Outcome::Passed
}

/// The shim's flags as this agent passes them: the word on the move, then
/// the secrets.
const AGENT_ORDER: &[&str] = &[LAUNCHER_JOINS, SECRETS_AFTER_JOIN];
/// As an older agent passed them: the secrets, then the word.
const OLDER_ORDER: &[&str] = &[LAUNCHER_JOINS];

/// The shim started directly, as the launcher would with `flags`: `run`
/// made with `spec` as its `spec.json`; stdin a pipe the test writes the
/// launcher's words (and secrets) to, or closes.
fn shim_by_hand(run: &Path, spec: &LaunchSpec, flags: &[&str]) -> std::process::Child {
    fs::create_dir(run).unwrap();
    fs::write(run.join("spec.json"), serde_json::to_vec(spec).unwrap()).unwrap();
    Command::new(SHIM)
        .args(flags)
        .arg(run)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The test's cgroup `leasehold-test-TAG-PID` and the cgroups `names`
/// under it (`""`: that one itself), created; with the guard that kills and
/// removes them all when the test ends.
fn scratch_cgroups<const N: usize>(
    cg: &CgroupFs,
    tag: &str,
    names: [&str; N],
) -> (CgroupPath, [CgroupPath; N], CgroupsGone) {
    let base = CgroupPath::new(format!("leasehold-test-{tag}-{}", std::process::id())).unwrap();
    let made = names.map(|n| {
        if n.is_empty() {
            base.clone()
        } else {
            base.child(n).unwrap()
        }
    });
    for c in &made {
        cg.create(c).unwrap();
    }
    let mut all: Vec<CgroupPath> = made.to_vec();
    if !all.contains(&base) {
        all.push(base.clone());
    }
    let gone = CgroupsGone(cg.clone(), all);
    (base, made, gone)
}

/// A test's cgroups, killed and removed when the test ends, passed or
/// not; children listed before their parents.
struct CgroupsGone(CgroupFs, Vec<CgroupPath>);

impl Drop for CgroupsGone {
    fn drop(&mut self) {
        for c in &self.1 {
            let _ = self.0.kill(c);
        }
        // A clean-up, not a check: a moment for the killed to go.
        std::thread::sleep(Duration::from_millis(200));
        for c in &self.1 {
            let _ = self.0.remove(c);
        }
    }
}

/// What every cgroup test needs: root, a cgroup2 mount, the test rootfs
/// with busybox and the cgroup manager; or why it is skipped.
fn cgroup_setup() -> Result<(Rootfs, CgroupFs), Outcome> {
    if let Some(skip) = need_root() {
        return Err(skip);
    }
    let Some(mount) = cgroup2_mount() else {
        return Err(Outcome::Skipped("no cgroup2 mount".into()));
    };
    let fs_ = rootfs();
    need_busybox(&fs_);
    Ok((fs_, engine_cgroups(&mount)))
}

/// Waits (5 s at most) until `cg` holds the shim and a shell engine with
/// its `sleep` (three processes), then checks the shim and the engine are
/// there.
fn in_cgroup(cg: &CgroupFs, path: &CgroupPath, r: &Running) {
    let t = Instant::now();
    while cg.pids(path).unwrap().len() < 3 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let pids = cg.pids(path).unwrap();
    assert!(pids.contains(&r.shim_pid()), "{pids:?}");
    assert!(pids.contains(&r.engine_pid().unwrap()), "{pids:?}");
}

/// Real controllers (the lab node; skipped where the cgroup2 hierarchy has
/// none, as on the host): `pids.max` holds a fork loop, a memory hog over
/// `memory.max` is OOM-killed and `memory.events` counts it.
fn real_cgroup_limits() -> Outcome {
    let (fs_, cg) = match cgroup_setup() {
        Ok(x) => x,
        Err(skip) => return skip,
    };
    let base = CgroupPath::new(format!("leasehold-limits-{}", std::process::id())).unwrap();
    cg.create(&base).unwrap();
    let available = fs::read_to_string(cg.dir(&base).join("cgroup.controllers")).unwrap();
    let wanted: Vec<Controller> = Controller::ALL
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == c.name()))
        .collect();
    if !wanted.contains(&Controller::Memory) || !wanted.contains(&Controller::Pids) {
        let _ = cg.remove(&base);
        return Outcome::Skipped(format!(
            "no memory and pids controllers in {} (cgroup.controllers: {:?}; \
             in a unit with Delegate=yes set LEASEHOLD_TEST_DELEGATED=1)",
            cg.dir(&base).display(),
            available.trim()
        ));
    }
    let forks = base.child("forks").unwrap();
    let hog = base.child("hog").unwrap();
    let _gone = CgroupsGone(cg.clone(), vec![forks.clone(), hog.clone(), base.clone()]);
    cg.enable_controllers(&base, &wanted).unwrap();
    let work = tempfile::tempdir().unwrap();
    let read = |c: &CgroupPath, f: &str| fs::read_to_string(cg.dir(c).join(f)).unwrap();
    let key = |text: &str, k: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.trim().parse().ok())
            .unwrap_or(0)
    };

    // pids.max = 8 holds a loop of 40 forks (the probe counts its
    // refusals and keeps what it got, so the count is read while held).
    cg.create(&forks).unwrap();
    cg.set_limits(&forks, &[("pids.max", "8".into())]).unwrap();
    assert_eq!(read(&forks, "pids.max").trim(), "8");
    let mut s = spec(&fs_.root, &["/probe", "--forks"]);
    s.cgroup = Some(cg.dir(&forks));
    let out_path = work.path().join("forks.out");
    let out = fs::File::create(&out_path).unwrap();
    let mut r = Launcher::new(SHIM)
        .start(
            &s,
            &work.path().join("forks"),
            out.into(),
            Stdio::inherit(),
            vec![],
        )
        .unwrap();
    let t = Instant::now();
    while !fs::read_to_string(&out_path).unwrap().contains("refused=")
        && t.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = fs::read_to_string(&out_path).unwrap();
    let refused = key(&read(&forks, "pids.events"), "max ");
    let current: u64 = read(&forks, "pids.current").trim().parse().unwrap();
    println!(
        "pids.max=8, a loop of 40 forks: {}; pids.current={current}, pids.events max={refused}",
        out.trim()
    );
    assert!(out.contains("refused="), "probe: {out}");
    assert!(!out.contains("refused=0 "), "no fork refused: {out}");
    assert!(refused >= 1, "pids.events: no fork refused");
    assert!(current <= 8, "pids.current {current}");
    cg.kill(&forks).unwrap();
    wait(&mut r);

    // memory.max = 32 MiB: a hog that touches 1 GiB is OOM-killed.
    cg.create(&hog).unwrap();
    let mut limits = vec![("memory.max", (32u64 << 20).to_string())];
    if cg.dir(&hog).join("memory.swap.max").exists() {
        limits.push(("memory.swap.max", "0".into()));
    }
    cg.set_limits(&hog, &limits).unwrap();
    assert_eq!(read(&hog, "memory.max").trim(), (32u64 << 20).to_string());
    let mut s = spec(&fs_.root, &["/probe", "--hog"]);
    s.cgroup = Some(cg.dir(&hog));
    let mut r = Launcher::new(SHIM)
        .start(
            &s,
            &work.path().join("hog"),
            Stdio::null(),
            Stdio::inherit(),
            vec![],
        )
        .unwrap();
    let exit = wait(&mut r);
    let events = read(&hog, "memory.events");
    println!(
        "memory.max=32M, hog: {exit:?}; memory.events: {}",
        events.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    assert_eq!(exit, Exit::Signal(9));
    if wanted.len() == Controller::ALL.len() {
        let usage = cg.usage(&hog).unwrap();
        assert!(usage.oom_kills >= 1, "{usage:?}");
    } else {
        assert!(key(&events, "oom_kill ") >= 1, "{events}");
    }
    Outcome::Passed
}

/// The manager engines' cgroups are made under. With
/// `LEASEHOLD_TEST_DELEGATED=1` the test runs in a cgroup delegated to it
/// (a unit or scope with `Delegate=yes`, as the engines unit will be): it
/// moves itself to the leaf `<own>/runner` (no internal processes) and
/// enables the engines' controllers on `<own>`, as the holder will. Without
/// it, the root of the cgroup2 mount (T1 on the host).
fn engine_cgroups(mount: &Path) -> CgroupFs {
    static DELEGATED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if std::env::var_os("LEASEHOLD_TEST_DELEGATED").is_none() {
        return CgroupFs::with_root(Some(mount));
    }
    let root = DELEGATED.get_or_init(|| {
        let own = CgroupFs::own_cgroup().unwrap();
        let unit = mount.join(own.strip_prefix("/").unwrap());
        let cg = CgroupFs::with_root(Some(&unit));
        let runner = CgroupPath::new("runner").unwrap();
        cg.create(&runner).unwrap();
        // Every thread of this process (cgroup.procs moves the group).
        cg.add_pid(&runner, std::process::id()).unwrap();
        let available = fs::read_to_string(unit.join("cgroup.controllers")).unwrap();
        let wanted: Vec<Controller> = Controller::ALL
            .into_iter()
            .filter(|c| available.split_whitespace().any(|a| a == c.name()))
            .collect();
        // The unit's own cgroup, seen from its parent (a path is relative).
        let parent = CgroupFs::with_root(unit.parent());
        let name = CgroupPath::new(unit.file_name().unwrap()).unwrap();
        parent.enable_controllers(&name, &wanted).unwrap();
        println!(
            "delegated cgroup {}: controllers {wanted:?}",
            unit.display()
        );
        unit
    });
    CgroupFs::with_root(Some(root))
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

// ---------------------------------------------------------------------------
// Inside the engine.

/// Starts 40 `sleep 30` children, counts the starts the kernel refused,
/// then holds the others (the test reads the cgroup meanwhile).
fn forks() -> i32 {
    let (mut held, mut refused, mut last) = (Vec::new(), 0, String::new());
    for _ in 0..40 {
        match Command::new("/bin/busybox").args(["sleep", "30"]).spawn() {
            Ok(c) => held.push(c),
            Err(e) => {
                refused += 1;
                last = errno_of(Err(e));
            }
        }
    }
    println!("started={} refused={refused} ({last})", held.len());
    std::thread::sleep(Duration::from_secs(30));
    0
}

/// Touches memory 1 MiB at a time up to 1 GiB (exit 0 if never stopped).
fn hog() -> i32 {
    let mut held: Vec<Vec<u8>> = Vec::new();
    for _ in 0..1024 {
        held.push(vec![1u8; 1 << 20]);
    }
    println!("hog: {} MiB held", held.len());
    0
}

fn errno_of(r: std::io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => e
            .raw_os_error()
            .map(|n| format!("{:?}", nix::Error::from_raw(n)))
            .unwrap_or_else(|| e.to_string()),
    }
}

fn nix_errno(r: nix::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("{e:?}"),
    }
}

/// A "Key:\tvalue" line's value in /proc/PID/status, "?" when absent.
fn status_field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or("?")
        .trim()
}

/// `--in-engine OUT`: what an exec probe sees, as "key=value" lines in
/// OUT (its output is not kept by `Launcher::probe`).
fn in_engine(out: &str) -> i32 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut text = String::new();
    let r = nix::unistd::getresuid().unwrap();
    text += &format!("uid={},{},{}\n", r.real, r.effective, r.saved);
    for key in ["NoNewPrivs", "Seccomp", "CapEff"] {
        let v = status_field(&status, key);
        text += &format!("{key}={v}\n");
    }
    for kind in ["mnt", "pid", "ipc", "uts", "cgroup"] {
        let link = fs::read_link(format!("/proc/self/ns/{kind}"))
            .map_or_else(|e| e.to_string(), |l| l.to_string_lossy().into_owned());
        text += &format!("{kind}={link}\n");
    }
    text += &format!("cgroup_path={}\n", unified_cgroup());
    text += &format!("core_limit={}\n", core_limit());
    text += &format!("open_files={}\n", open_files_limit());
    let host = nix::unistd::gethostname().unwrap_or_default();
    text += &format!("hostname={}\n", host.to_string_lossy());
    text += &format!(
        "thp_disable={}\n",
        nix::sys::prctl::get_thp_disable().map_or_else(|e| e.to_string(), |d| d.to_string())
    );
    match fs::write(out, text) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{out}: {e}");
            1
        }
    }
}

/// The cgroup v2 line of /proc/self/cgroup ("0::PATH"), as this process's
/// cgroup namespace shows it.
fn unified_cgroup() -> String {
    fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("0::"))
        .unwrap_or("none")
        .to_owned()
}

/// The abstract unix socket a node process listens on during the
/// confined-engine tests (the test binds it, as root, outside the engine).
const ABSTRACT: &[u8] = b"leasehold-real-launch-node-service";

/// A connection to the node's [`ABSTRACT`] socket from inside the engine:
/// abstract names belong to the network namespace, which engines share
/// with the node, and no nftables rule sees them; Landlock's scope (ABI 6,
/// Linux 6.12) denies it, nothing does below (docs/engines.md).
fn abstract_connect() -> String {
    use std::os::linux::net::SocketAddrExt;
    match std::os::unix::net::SocketAddr::from_abstract_name(ABSTRACT) {
        Ok(a) => errno_of(std::os::unix::net::UnixStream::connect_addr(&a).map(|_| ())),
        Err(e) => format!("address: {e}"),
    }
}

/// `SO_BINDTODEVICE` to `lo` on a fresh UDP socket: allowed without
/// privilege since Linux 5.7, denied by the engine's seccomp filter.
fn bind_to_device() -> String {
    use nix::sys::socket::{setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType};
    match socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(fd) => nix_errno(setsockopt(
            &fd,
            sockopt::BindToDevice,
            &std::ffi::OsString::from("lo"),
        )),
        Err(e) => format!("socket: {e:?}"),
    }
}

/// Raises this runner's soft limit on open descriptors to its hard limit,
/// as the agent does (raising the hard limit needs CAP_SYS_RESOURCE, which
/// this host's root lacks).
fn raise_open_files() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let max = getrlimit(Resource::Nofile).maximum;
    let l = Rlimit {
        current: max,
        maximum: max,
    };
    setrlimit(Resource::Nofile, l).expect("raise RLIMIT_NOFILE's soft limit");
}

/// What an engine must see: 1024 (or less, the hard limit), and the hard
/// limit kept.
fn engine_open_files() -> String {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .map_or("unlimited".to_owned(), |m| m.to_string());
    let soft = hard.parse::<u64>().map_or(1024, |h| h.min(1024));
    format!("{soft},{hard}")
}

/// "SOFT,HARD" of "Max open files" in /proc/self/limits.
fn open_files_limit() -> String {
    limit_of("Max open files")
}

/// "SOFT,HARD" of "Max core file size" in /proc/self/limits.
fn core_limit() -> String {
    limit_of("Max core file size")
}

fn limit_of(name: &str) -> String {
    fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let v: Vec<&str> = rest.split_whitespace().collect();
            Some(format!("{},{}", v.first()?, v.get(1)?))
        })
        .unwrap_or_else(|| "none".into())
}

fn probe(args: &[String]) -> i32 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let r = nix::unistd::getresuid().unwrap();
    println!("uid={},{},{}", r.real, r.effective, r.saved);
    let g = nix::unistd::getresgid().unwrap();
    println!("gid={},{},{}", g.real, g.effective, g.saved);
    println!(
        "groups={}",
        nix::unistd::getgroups().map(|g| g.len()).unwrap_or(99)
    );
    for key in [
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
        "SigBlk",
    ] {
        let v = status_field(&status, key);
        println!("{key}={v}");
    }
    println!("pid={}", std::process::id());
    println!("cgroup_path={}", unified_cgroup());
    println!("core_limit={}", core_limit());
    println!("open_files={}", open_files_limit());
    println!(
        "thp_disable={}",
        nix::sys::prctl::get_thp_disable().map_or_else(|e| e.to_string(), |d| d.to_string())
    );
    // Open descriptors other than stdio (read_dir's own fd excluded by
    // reading the list first): a leaked one could reach the host.
    let fds: Vec<String> = fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let extra: Vec<String> = fds
        .into_iter()
        .filter(|f| !["0", "1", "2"].contains(&f.as_str()))
        .filter(|f| fs::read_link(format!("/proc/self/fd/{f}")).is_ok())
        .map(|f| {
            format!(
                "{f}->{}",
                fs::read_link(format!("/proc/self/fd/{f}"))
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )
        })
        .collect();
    println!("extra_fds={}", extra.join(","));
    println!(
        "hostname={}",
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    println!("write_root={}", errno_of(fs::write("/probe-write", "x")));
    println!(
        "dev_null_read={}",
        errno_of(fs::File::open("/dev/null").map(drop))
    );
    println!("dev_null_write={}", errno_of(fs::write("/dev/null", "x")));
    println!(
        "dev_urandom_read={}",
        errno_of(fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut [0u8; 8])))
    );
    println!("write_tmp={}", errno_of(fs::write("/tmp/x", "x")));
    println!("write_data={}", errno_of(fs::write("/data/f", "data")));
    // The data dir's mount (a clone of the shim's descriptor since
    // 2026-12-06): its per-mount options.
    let data_mount = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4) == Some(&"/data")).then(|| f.get(5).map(|o| (*o).to_owned()))?
        })
        .unwrap_or_default();
    println!("data_mount={data_mount}");
    println!(
        "write_proc_comm={}",
        errno_of(fs::write("/proc/self/comm", "x"))
    );
    println!(
        "mount={}",
        nix_errno(nix::mount::mount(
            Some("tmpfs"),
            "/tmp",
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>
        ))
    );
    println!("ptrace_traceme={}", nix_errno(nix::sys::ptrace::traceme()));
    println!("bind_to_device={}", bind_to_device());
    println!("abstract_connect={}", abstract_connect());
    // The shim (pid 1) is not dumpable: its /proc files (not the
    // directory, which shows the euid always) are root's.
    println!(
        "shim_proc_owner={}",
        fs::metadata("/proc/1/mem").map_or_else(
            |e| format!("{:?}", e.kind()),
            |m| { std::os::unix::fs::MetadataExt::uid(&m).to_string() }
        )
    );
    println!(
        "unshare_user={}",
        nix_errno(nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER))
    );
    let root = nix::unistd::Uid::from_raw(0);
    println!(
        "setuid0={}",
        nix_errno(nix::unistd::setresuid(root, root, root))
    );
    let secret = args.first().cloned().unwrap_or_default();
    println!(
        "read_host_secret={}",
        errno_of(
            fs::File::open(&secret)
                .and_then(|mut f| f.read_to_string(&mut String::new()))
                .map(drop)
        )
    );
    println!(
        "proc_1_root_secret={}",
        errno_of(fs::File::open(format!("/proc/1/root{secret}")).map(drop))
    );
    for (key, path) in [
        ("proc_keys", "/proc/keys"),
        ("proc_timer_list", "/proc/timer_list"),
    ] {
        let v = match fs::read(path) {
            Ok(b) if b.is_empty() => "empty".to_string(),
            Ok(b) => format!("{} bytes", b.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "empty".to_string(),
            Err(e) => errno_of(Err(e)),
        };
        println!("{key}={v}");
    }
    println!(
        "proc_sys_ro={}",
        errno_of(fs::write("/proc/sys/kernel/hostname", "x"))
    );
    {
        use std::os::unix::fs::MetadataExt;
        let path = "/run/secrets/db-password";
        let secret = match (fs::read_to_string(path), fs::metadata(path)) {
            (Ok(v), Ok(m)) => {
                let fs_type = nix::sys::statfs::statfs(path)
                    .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
                    .unwrap_or(false);
                format!(
                    "{v} mode={:o} uid={} fs={}",
                    m.mode() & 0o7777,
                    m.uid(),
                    if fs_type { "tmpfs" } else { "other" }
                )
            }
            (Err(e), _) | (_, Err(e)) => errno_of(Err(e)),
        };
        println!("secret={secret}");
        println!(
            "secret_write={}",
            errno_of(fs::write("/run/secrets/new", "x"))
        );
        let in_env = std::env::vars_os().any(|(k, v)| {
            k.to_string_lossy().contains("test-secret")
                || v.to_string_lossy().contains("test-secret")
        });
        println!("env_has_secret={}", if in_env { "yes" } else { "no" });
    }
    println!(
        "var_lib_leasehold={}",
        if Path::new("/var/lib/leasehold").exists() {
            "present"
        } else {
            "absent"
        }
    );
    7
}
