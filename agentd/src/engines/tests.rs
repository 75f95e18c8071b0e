//! T0: the engine runtime on fakes (cgroups, launcher, volume) with a real
//! image unpacked from an archive built here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Condvar, Mutex};

use leasehold_engines::cgroup::{Action as CgAction, CgroupFs, Usage};
use leasehold_engines::logs::Stream;
use leasehold_engines::supervisor::Phase;
use sha2::{Digest, Sha256};

use super::*;

// ------------------------------------------------------------ fixtures

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn desc(media: &str, b: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media, "digest": sha256(b), "size": b.len()})
}

fn tar_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data, mode) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// An oci-archive with one layer holding `bin/app`.
fn image_archive() -> Vec<u8> {
    let layer = tar_of(&[("bin/app", b"#!/bin/sh\n", 0o755)]);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": [desc("application/vnd.oci.image.layer.v1.tar", &layer)],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [desc("application/vnd.oci.image.manifest.v1+json", &manifest)],
    }))
    .unwrap();
    let blob = |b: &[u8]| format!("blobs/sha256/{}", &sha256(b)[7..]);
    let (l, c, m) = (blob(&layer), blob(&config), blob(&manifest));
    tar_of(&[
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644),
        ("index.json", &index, 0o644),
        (&m, &manifest, 0o644),
        (&c, &config, 0o644),
        (&l, &layer, 0o644),
    ])
}

struct FakeVolume(Mutex<Option<PathBuf>>);

impl VolumeDir for FakeVolume {
    fn mounted(&self) -> Option<PathBuf> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Default)]
struct FakeCg {
    dirs: Mutex<BTreeSet<PathBuf>>,
    limits: Mutex<BTreeMap<(PathBuf, String), String>>,
    killed: Mutex<Vec<PathBuf>>,
    /// Instance cgroups (`i<N>`) refuse this many removals (processes left).
    stuck: Mutex<u32>,
}

impl Cgroups for FakeCg {
    fn create(&self, cg: &CgroupPath) -> Result<CgAction, CgroupError> {
        let new = self.dirs.lock().unwrap().insert(cg.as_path().to_owned());
        Ok(if new {
            CgAction::Done
        } else {
            CgAction::Identity
        })
    }
    fn enable_controllers(
        &self,
        _: &CgroupPath,
        _: &[Controller],
    ) -> Result<CgAction, CgroupError> {
        Ok(CgAction::Identity)
    }
    fn set_limits(&self, cg: &CgroupPath, limits: &[(&str, String)]) -> Result<(), CgroupError> {
        let mut l = self.limits.lock().unwrap();
        for (f, v) in limits {
            l.insert((cg.as_path().to_owned(), (*f).to_owned()), v.clone());
        }
        Ok(())
    }
    fn usage(&self, _: &CgroupPath) -> Result<Usage, CgroupError> {
        Ok(Usage::default())
    }
    fn add_pid(&self, _: &CgroupPath, _: u32) -> Result<(), CgroupError> {
        Ok(())
    }
    fn pids(&self, _: &CgroupPath) -> Result<Vec<u32>, CgroupError> {
        Ok(Vec::new())
    }
    fn kill(&self, cg: &CgroupPath) -> Result<(), CgroupError> {
        self.killed.lock().unwrap().push(cg.as_path().to_owned());
        Ok(())
    }
    fn remove(&self, cg: &CgroupPath) -> Result<CgAction, CgroupError> {
        let instance = cg
            .as_path()
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('i'));
        let mut stuck = self.stuck.lock().unwrap();
        if instance && *stuck > 0 {
            *stuck -= 1;
            return Err(CgroupError::NotEmpty {
                cgroup: cg.as_path().to_owned(),
                count: 1,
            });
        }
        drop(stuck);
        let had = self.dirs.lock().unwrap().remove(cg.as_path());
        Ok(if had {
            CgAction::Done
        } else {
            CgAction::Identity
        })
    }
    fn dir(&self, cg: &CgroupPath) -> PathBuf {
        Path::new("/fake-cgroup").join(cg.as_path())
    }
}

/// One fake instance: exits when told, or on a signal it heeds.
#[derive(Default)]
struct Ctl {
    exit: Mutex<Option<launch::Exit>>,
    cv: Condvar,
    ignore_term: bool,
    signals: Mutex<Vec<Signal>>,
}

impl Ctl {
    fn end(&self, e: launch::Exit) {
        let mut x = self.exit.lock().unwrap();
        if x.is_none() {
            *x = Some(e);
        }
        self.cv.notify_all();
    }
}

struct FakeProc {
    pid: u32,
    ctl: Arc<Ctl>,
}

impl Proc for FakeProc {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn signal(&self, sig: Signal) -> Result<(), LaunchError> {
        self.ctl.signals.lock().unwrap().push(sig);
        match sig {
            Signal::SIGTERM if !self.ctl.ignore_term => self.ctl.end(launch::Exit::Signal(15)),
            Signal::SIGKILL => self.ctl.end(launch::Exit::Signal(9)),
            _ => {}
        }
        Ok(())
    }
    fn exit_waiter(&self) -> Result<Box<dyn FnOnce() + Send>, LaunchError> {
        let ctl = self.ctl.clone();
        Ok(Box::new(move || {
            let mut x = ctl.exit.lock().unwrap();
            while x.is_none() {
                x = ctl.cv.wait(x).unwrap();
            }
        }))
    }
    fn reap(&mut self) -> launch::Exit {
        self.ctl.exit.lock().unwrap().clone().unwrap()
    }
}

#[derive(Default)]
struct FakeSpawner {
    spawned: Mutex<Vec<(LaunchSpec, PathBuf, Arc<Ctl>)>>,
    /// Run dirs `adopt` finds alive.
    alive: Mutex<BTreeMap<PathBuf, Arc<Ctl>>>,
    ignore_term: bool,
}

impl Spawner for FakeSpawner {
    fn spawn(
        &self,
        spec: &LaunchSpec,
        run_dir: &Path,
        log_dir: &Path,
    ) -> Result<Box<dyn Proc>, LaunchError> {
        assert!(log_dir.ends_with("logs"), "{log_dir:?}");
        assert!(log_dir.starts_with(spec.rootfs.parent().unwrap().parent().unwrap()));
        let ctl = Arc::new(Ctl {
            ignore_term: self.ignore_term,
            ..Ctl::default()
        });
        let mut s = self.spawned.lock().unwrap();
        s.push((spec.clone(), run_dir.to_owned(), ctl.clone()));
        self.alive
            .lock()
            .unwrap()
            .insert(run_dir.to_owned(), ctl.clone());
        Ok(Box::new(FakeProc {
            pid: 1000 + u32::try_from(s.len()).unwrap(),
            ctl,
        }))
    }
    fn adopt(&self, run_dir: &Path) -> Result<Box<dyn Proc>, LaunchError> {
        match self.alive.lock().unwrap().get(run_dir) {
            Some(ctl) if ctl.exit.lock().unwrap().is_none() => Ok(Box::new(FakeProc {
                pid: 4242,
                ctl: ctl.clone(),
            })),
            _ => Err(LaunchError::ShimGone {
                pid: 0,
                run_dir: run_dir.to_owned(),
            }),
        }
    }
}

struct Fix {
    tmp: tempfile::TempDir,
    cfg: RuntimeConfig,
    cg: Arc<FakeCg>,
    sp: Arc<FakeSpawner>,
    vol: Arc<FakeVolume>,
}

fn fixture(ignore_term: bool) -> Fix {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol");
    let inbox = vol.join("engines/inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::write(inbox.join("app.tar"), image_archive()).unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let cfg = RuntimeConfig {
        cgroup_root: tmp.path().join("cgroup"),
        subtree: "leasehold/tenant".into(),
        images_dir: "engines".into(),
        run_dir: tmp.path().join("run"),
        uid_base: 200_000,
        state_dir: state,
        log_max_bytes: leasehold_engines::logs::DEFAULT_MAX_BYTES,
    };
    Fix {
        tmp,
        cfg,
        cg: Arc::default(),
        sp: Arc::new(FakeSpawner {
            ignore_term,
            ..FakeSpawner::default()
        }),
        vol: Arc::new(FakeVolume(Mutex::new(Some(vol)))),
    }
}

impl Fix {
    fn runtime(&self) -> EngineRuntime {
        EngineRuntime::start(
            self.cfg.clone(),
            self.cg.clone(),
            self.sp.clone(),
            self.vol.clone(),
        )
        .unwrap()
    }
}

fn spec(text: &str) -> Spec {
    Spec::from_toml(text).unwrap()
}

/// Waits (bounded) until `f` holds for the engine's status.
fn until(rt: &EngineRuntime, name: &str, f: impl Fn(&EngineStatus) -> bool) -> EngineStatus {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let s = rt.view().status(name).unwrap();
        if f(&s) {
            return s;
        }
        assert!(Instant::now() < end, "timed out; last status {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn deploy_without_a_volume_is_refused_and_unpacks_nothing() {
    let f = fixture(false);
    *f.vol.0.lock().unwrap() = None;
    let mut rt = f.runtime();
    let e = rt
        .deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Unavailable);
    assert!(e.message.contains("no tenant volume is mounted"), "{e}");
    assert!(!f.tmp.path().join("vol/engines/web").exists());
    assert!(rt.view().list().is_empty());
}

#[test]
fn deploy_without_cgroup_controllers_names_the_root() {
    let f = fixture(false);
    std::fs::create_dir_all(&f.cfg.cgroup_root).unwrap();
    std::fs::write(f.cfg.cgroup_root.join("cgroup.controllers"), "").unwrap();
    let mut rt = EngineRuntime::start(
        f.cfg.clone(),
        Arc::new(CgroupFs::with_root(Some(&f.cfg.cgroup_root))),
        f.sp.clone(),
        f.vol.clone(),
    )
    .unwrap();
    let e = rt
        .deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Unavailable);
    let root = f.cfg.cgroup_root.display().to_string();
    assert!(
        e.message.contains("cgroup v2 is not usable") && e.message.contains(&root),
        "{e}"
    );
    assert!(!f.tmp.path().join("vol/engines/web").exists());
}

#[test]
fn image_outside_the_inbox_is_refused() {
    let f = fixture(false);
    let mut rt = f.runtime();
    for bad in ["missing.tar", "../inbox/app.tar"] {
        let e = rt
            .deploy("web", bad, &spec(r#"command = ["/bin/app"]"#))
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::Invalid, "{bad}: {e}");
    }
}

#[test]
fn deploy_start_stop_rm() {
    let f = fixture(false);
    let mut rt = f.runtime();
    let s = rt
        .deploy(
            "web",
            "app.tar",
            &spec("command = [\"app\", \"--serve\"]\n[limits]\nmemory_max = \"64M\"\n"),
        )
        .unwrap();
    assert_eq!(s.phase, Phase::Stopped);
    assert!(!s.enabled);
    let root = f.tmp.path().join("vol/engines/web/v1/rootfs");
    assert!(root.join("bin/app").is_file(), "unpacked on the volume");
    let lim = f.cg.limits.lock().unwrap().clone();
    assert_eq!(
        lim.get(&(PathBuf::from("leasehold/tenant/web"), "memory.max".into())),
        Some(&"67108864".to_owned())
    );
    assert!(rt
        .deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .is_err());

    rt.start("web").unwrap();
    let s = until(&rt, "web", |s| s.phase == Phase::Ready);
    assert!(s.enabled && s.pid.is_some() && s.started_at.is_some());
    let (ls, _, _) = f.sp.spawned.lock().unwrap()[0].clone();
    assert_eq!(
        ls.argv,
        vec!["/bin/app", "--serve"],
        "found in the image's PATH"
    );
    assert_eq!(ls.cwd, Path::new("/srv"));
    assert_eq!((ls.uid, ls.gid), (200_000, 200_000));
    assert_eq!(ls.rootfs, root);
    assert!(ls.cgroup.unwrap().ends_with("leasehold/tenant/web/i1"));

    let e = rt.rm("web").unwrap_err();
    assert_eq!(e.kind, FailureKind::Invalid, "{e}");

    rt.stop("web", None).unwrap();
    let s = until(&rt, "web", |s| s.phase == Phase::Stopped);
    assert!(!s.enabled);
    rt.rm("web").unwrap();
    assert!(rt.view().status("web").is_none());
    assert!(!f.tmp.path().join("vol/engines/web").exists());
    let st = std::fs::read_to_string(f.cfg.state_dir.join(STATE_FILE)).unwrap();
    assert!(!st.contains("\"web\""), "{st}");
}

#[test]
fn a_crash_is_restarted_after_the_backoff() {
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    let ctl = f.sp.spawned.lock().unwrap()[0].2.clone();
    let crashed = Instant::now();
    ctl.end(launch::Exit::Code(3));
    let s = until(&rt, "web", |s| s.restarts == 1 && s.phase == Phase::Ready);
    assert!(
        crashed.elapsed() >= Duration::from_millis(100),
        "waited the first delay"
    );
    assert_eq!(s.last_exit, Some(Exit::Code(3)));
    assert_eq!(f.sp.spawned.lock().unwrap().len(), 2);
}

#[test]
fn stop_all_kills_after_the_grace_and_reports_it() {
    let f = fixture(true);
    let mut rt = f.runtime();
    for n in ["a", "b"] {
        rt.deploy(n, "app.tar", &spec(r#"command = ["/bin/app"]"#))
            .unwrap();
    }
    rt.start("a").unwrap();
    until(&rt, "a", |s| s.phase == Phase::Ready);
    let t = Instant::now();
    let r = rt.stop_all(Duration::from_millis(200)).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(r.stopped, vec!["a"]);
    assert_eq!(r.killed, vec!["a"]);
    assert!(r.complete());
    let sigs = f.sp.spawned.lock().unwrap()[0]
        .2
        .signals
        .lock()
        .unwrap()
        .clone();
    assert_eq!(sigs, vec![Signal::SIGTERM, Signal::SIGKILL]);
    assert!(!f.cg.killed.lock().unwrap().is_empty(), "cgroup.kill too");
    for n in ["a", "b"] {
        assert!(
            !rt.view().status(n).unwrap().enabled,
            "{n} marked not to start"
        );
    }
    assert_eq!(rt.forget_all().unwrap(), 2);
    assert!(rt.view().list().is_empty());
}

#[test]
fn a_running_engine_is_readopted_by_a_new_runtime() {
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    drop(rt);
    // A new agent on the same state: the shim is found, nothing launched.
    let rt2 = f.runtime();
    let s = until(&rt2, "web", |s| s.phase == Phase::Ready);
    assert_eq!(s.pid, Some(4242));
    assert_eq!(f.sp.spawned.lock().unwrap().len(), 1);
    // Its exit is still seen.
    let ctl = f.sp.spawned.lock().unwrap()[0].2.clone();
    ctl.end(launch::Exit::Code(0));
    until(&rt2, "web", |s| s.last_exit == Some(Exit::Code(0)));
}

#[test]
fn an_enabled_engine_whose_instance_is_gone_starts_again() {
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    drop(rt);
    f.sp.alive.lock().unwrap().clear(); // a node reboot
    let rt2 = f.runtime();
    until(&rt2, "web", |s| s.phase == Phase::Ready);
    assert_eq!(f.sp.spawned.lock().unwrap().len(), 2);
}

#[test]
fn unsupported_spec_parts_are_refused_by_field() {
    let f = fixture(false);
    let mut rt = f.runtime();
    let e = rt
        .deploy(
            "web",
            "app.tar",
            &spec("command = [\"/bin/app\"]\nsecrets = [\"db\"]\n"),
        )
        .unwrap_err();
    assert!(e.message.contains("secrets:"), "{e}");
    let e = rt
        .deploy("web", "app.tar", &spec("command = [\"nothere\"]\n"))
        .unwrap_err();
    assert!(e.message.contains("command[0]"), "{e}");
    assert!(!f.tmp.path().join("vol/engines/web/v1").exists());
}

#[test]
fn after_readoption_new_instances_never_reuse_a_directory() {
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    drop(rt);
    let mut rt2 = f.runtime();
    until(&rt2, "web", |s| s.pid == Some(4242));
    rt2.restart("web").unwrap();
    until(&rt2, "web", |s| {
        s.phase == Phase::Ready && s.pid != Some(4242)
    });
    let spawned = f.sp.spawned.lock().unwrap();
    let dirs: BTreeSet<&PathBuf> = spawned.iter().map(|(_, d, _)| d).collect();
    assert_eq!(dirs.len(), spawned.len(), "{dirs:?}");
}

#[test]
fn a_symlink_where_roots_are_kept_is_refused() {
    let f = fixture(false);
    let outside = f.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, f.tmp.path().join("vol/engines/web")).unwrap();
    let mut rt = f.runtime();
    let e = rt
        .deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap_err();
    assert!(e.message.contains("symlink"), "{e}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn stop_all_reads_back_the_cgroups_before_claiming_stopped() {
    for (stuck, shown_stopped) in [(1, true), (1000, false)] {
        let f = fixture(false);
        let mut rt = f.runtime();
        rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
            .unwrap();
        rt.start("web").unwrap();
        until(&rt, "web", |s| s.phase == Phase::Ready);
        *f.cg.stuck.lock().unwrap() = stuck;
        let r = rt.stop_all(Duration::from_millis(100)).unwrap();
        if shown_stopped {
            assert_eq!(r.stopped, vec!["web"], "{r:?}");
            assert!(r.complete());
        } else {
            assert!(r.stopped.is_empty(), "{r:?}");
            assert_eq!(r.not_stopped.len(), 1, "{r:?}");
            assert!(
                r.not_stopped[0]
                    .reason
                    .contains("processes left in leasehold/tenant/web/i1"),
                "{r:?}"
            );
        }
    }
}

#[test]
fn without_the_volume_nothing_is_launched() {
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    // The volume goes away under a running engine, which then crashes:
    // its restart is not launched from wherever the mount point leads.
    *f.vol.0.lock().unwrap() = None;
    let ctl = f.sp.spawned.lock().unwrap()[0].2.clone();
    ctl.end(launch::Exit::Code(1));
    until(&rt, "web", |s| s.last_exit == Some(Exit::NotStarted));
    assert_eq!(f.sp.spawned.lock().unwrap().len(), 1);
    let e = rt.start("web").unwrap_err();
    assert_eq!(e.kind, FailureKind::Unavailable, "{e}");
    // A new agent without the volume leaves the engine stopped.
    f.sp.alive.lock().unwrap().clear();
    let rt2 = f.runtime();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rt2.view().status("web").unwrap().phase, Phase::Stopped);
    assert_eq!(f.sp.spawned.lock().unwrap().len(), 1);
}

/// A cgroup manager over plain directories: the shim "joins" by writing to
/// a regular `cgroup.procs` (this host has no cgroup v2 controllers).
struct DirCg(PathBuf);

impl Cgroups for DirCg {
    fn create(&self, cg: &CgroupPath) -> Result<CgAction, CgroupError> {
        let d = self.dir(cg);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cgroup.procs"), "").unwrap();
        Ok(CgAction::Done)
    }
    fn enable_controllers(
        &self,
        _: &CgroupPath,
        _: &[Controller],
    ) -> Result<CgAction, CgroupError> {
        Ok(CgAction::Identity)
    }
    fn set_limits(&self, _: &CgroupPath, _: &[(&str, String)]) -> Result<(), CgroupError> {
        Ok(())
    }
    fn usage(&self, _: &CgroupPath) -> Result<Usage, CgroupError> {
        Ok(Usage::default())
    }
    fn add_pid(&self, _: &CgroupPath, _: u32) -> Result<(), CgroupError> {
        Ok(())
    }
    fn pids(&self, _: &CgroupPath) -> Result<Vec<u32>, CgroupError> {
        Ok(Vec::new())
    }
    fn kill(&self, _: &CgroupPath) -> Result<(), CgroupError> {
        Ok(())
    }
    fn remove(&self, cg: &CgroupPath) -> Result<CgAction, CgroupError> {
        let _ = std::fs::remove_dir_all(self.dir(cg));
        Ok(CgAction::Done)
    }
    fn dir(&self, cg: &CgroupPath) -> PathBuf {
        self.0.join(cg.as_path())
    }
}

/// The shim next to the test binary. The real tests are ignored (listed as
/// such) in a plain `cargo test`; run with `--include-ignored` (scripts/test,
/// as root) they fail, never pass, when a prerequisite is missing:
/// busybox-static comes from scripts/install-deps, the shim from
/// `cargo build --workspace --bins`.
fn real_shim() -> PathBuf {
    let shim = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("leasehold-engine-shim");
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root: run it as root with --include-ignored (scripts/test does)"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: scripts/install-deps installs busybox-static"
    );
    assert!(
        shim.exists(),
        "{} is missing: build it first (cargo build --workspace --bins; scripts/test does)",
        shim.display()
    );
    shim
}

/// Writes an OCI archive holding only /bin/busybox into the inbox as
/// `bb.tar`.
fn write_busybox_image(f: &Fix) {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let layer = tar_of(&[("bin/busybox", &busybox, 0o755)]);
    // The fixture's archive with this layer instead.
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config),
        "layers": [desc("application/vnd.oci.image.layer.v1.tar", &layer)],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [desc("application/vnd.oci.image.manifest.v1+json", &manifest)],
    }))
    .unwrap();
    let blob = |b: &[u8]| format!("blobs/sha256/{}", &sha256(b)[7..]);
    let (l, c, m) = (blob(&layer), blob(&config), blob(&manifest));
    let archive = tar_of(&[
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644),
        ("index.json", &index, 0o644),
        (&m, &manifest, 0o644),
        (&c, &config, 0o644),
        (&l, &layer, 0o644),
    ]);
    std::fs::write(f.tmp.path().join("vol/engines/inbox/bb.tar"), archive).unwrap();
}

/// T1 (root, busybox, the shim built): the runtime with the real launcher
/// runs an engine from an image archive, sees its exit through the pidfd
/// and keeps its output on the volume.
#[test]
#[ignore = "needs root, /bin/busybox (busybox-static) and the engine shim (cargo build --workspace --bins)"]
fn real_shim_runs_an_engine_from_an_image() {
    let shim = real_shim();
    let f = fixture(false);
    write_busybox_image(&f);
    let mut rt = EngineRuntime::start(
        f.cfg.clone(),
        Arc::new(DirCg(f.tmp.path().join("cgroup"))),
        Arc::new(ShimSpawner(launch::Launcher::new(shim))),
        f.vol.clone(),
    )
    .unwrap();
    rt.deploy(
        "bb",
        "bb.tar",
        &spec(
            "command = [\"/bin/busybox\", \"sh\", \"-c\", \"echo hello from $(/bin/busybox id -u); echo oops >&2; while [ ! -e /var/lib/app/go ]; do /bin/busybox sleep 0.02; done; exit 7\"]\n\
             data_dirs = [\"var/lib/app\"]\n\
             [restart]\npolicy = \"never\"\n",
        ),
    )
    .unwrap();
    rt.start("bb").unwrap();
    let view = rt.view();
    let lines = |want: usize| {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let l = view.logs("bb", 0, 100).unwrap();
            if l.len() >= want {
                return l;
            }
            assert!(Instant::now() < end, "timed out; log so far {l:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let mut got = lines(2);
    got.sort_by_key(|r| r.stream.name());
    assert_eq!(got[0].stream, Stream::Err);
    assert_eq!(got[0].text, b"oops");
    assert_eq!(got[1].stream, Stream::Out);
    assert_eq!(got[1].text, b"hello from 200000");
    // The shim holds its stdout FIFO open for reading too (besides its
    // stdout): the engine's output outlives an agent restart.
    let pid = view.status("bb").unwrap().pid.unwrap();
    let run = std::fs::read_dir(f.cfg.run_dir.join("bb"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    use std::os::unix::fs::MetadataExt;
    let fifo = std::fs::symlink_metadata(run.join(launch::STDOUT_FIFO))
        .unwrap()
        .ino();
    let held = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
        .filter(|m| m.ino() == fifo)
        .count();
    assert_eq!(held, 2, "the shim's stdout and its held read end");
    std::fs::write(f.tmp.path().join("vol/engines/bb/data/var/lib/app/go"), b"").unwrap();
    let s = until(&rt, "bb", |s| s.phase == Phase::Exited);
    assert_eq!(s.last_exit, Some(Exit::Code(7)));
    let logs = f.tmp.path().join("vol/engines/bb/logs");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(logs.join("output.log"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // The events a follower sees: started, then exited with the code.
    let ev = view.events(0, 100);
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds.starts_with(&["started"]), "{ev:?}");
    let exited = ev.iter().find(|e| e.kind == "exited").unwrap();
    assert!(exited.detail.ends_with("exit code 7"), "{exited:?}");
}

#[test]
fn the_delegated_parent_is_never_created() {
    let f = fixture(false);
    let mut cfg = f.cfg.clone();
    cfg.subtree = "system.slice/leasehold-engines.service/tenant".into();
    std::fs::create_dir_all(&cfg.cgroup_root).unwrap();
    let mut rt = EngineRuntime::start(
        cfg.clone(),
        Arc::new(CgroupFs::with_root(Some(&cfg.cgroup_root))),
        f.sp.clone(),
        f.vol.clone(),
    )
    .unwrap();
    let e = rt
        .deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Unavailable);
    assert!(e.message.contains("leasehold-engines.service"), "{e}");
    assert!(!cfg.cgroup_root.join("system.slice").exists());
}

/// T1 (root, busybox, the shim built): a line of 100 000 bytes is stored
/// in 16 KiB pieces marked partial; an engine flooding its stdout (about
/// 24 MB as fast as busybox writes) is never blocked by its log: it ends
/// on its own, the log stays within its budget, and whatever the writer
/// could not keep up with is counted in a note.
#[test]
#[ignore = "needs root, /bin/busybox (busybox-static) and the engine shim (cargo build --workspace --bins)"]
fn real_flooding_engine_is_not_blocked_and_its_log_stays_bounded() {
    use leasehold_engines::logs::LINE_MAX;
    let shim = real_shim();
    let f = fixture(false);
    write_busybox_image(&f);
    let mut rt = EngineRuntime::start(
        f.cfg.clone(),
        Arc::new(DirCg(f.tmp.path().join("cgroup"))),
        Arc::new(ShimSpawner(launch::Launcher::new(shim))),
        f.vol.clone(),
    )
    .unwrap();
    let sh = |script: &str| {
        spec(&format!(
            "command = [\"/bin/busybox\", \"sh\", \"-c\", {script:?}]\n[restart]\npolicy = \"never\"\n"
        ))
    };
    rt.deploy(
        "long",
        "bb.tar",
        &sh("/bin/busybox head -c 100000 /dev/zero | /bin/busybox tr '\\0' x; echo; echo done"),
    )
    .unwrap();
    rt.deploy(
        "flood",
        "bb.tar",
        &sh("/bin/busybox yes 0123456789012345678901234567890123456789012345678901234567 | /bin/busybox head -n 400000; echo done"),
    )
    .unwrap();
    let view = rt.view();
    let until_done = |name: &str| {
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            // The capture is over when the last record is the engine's
            // last line, or the note of what was dropped at the end (a
            // note is otherwise always followed by the batch it heads).
            let l = view.logs(name, 0, 10).unwrap();
            if l.last()
                .is_some_and(|r| r.text == b"done" || r.stream == Stream::Agent)
            {
                return;
            }
            assert!(Instant::now() < end, "timed out; {name} log ends {l:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    rt.start("long").unwrap();
    until(&rt, "long", |s| s.phase == Phase::Exited);
    until_done("long");
    let l = view.logs("long", 0, 100).unwrap();
    let pieces: Vec<(bool, usize)> = l.iter().map(|r| (r.partial, r.text.len())).collect();
    let mut want = vec![(true, LINE_MAX); 100_000 / LINE_MAX];
    want.push((false, 100_000 % LINE_MAX));
    want.push((false, 4));
    assert_eq!(pieces, want);

    let t = Instant::now();
    rt.start("flood").unwrap();
    let s = until_longer(&rt, "flood", |s| s.phase == Phase::Exited);
    let ran = t.elapsed();
    assert_eq!(s.last_exit, Some(Exit::Code(0)));
    until_done("flood");
    let stored = t.elapsed();
    let dir = f.tmp.path().join("vol/engines/flood/logs");
    let size: u64 = ["output.log", "output.log.1"]
        .iter()
        .map(|n| std::fs::metadata(dir.join(n)).map_or(0, |m| m.len()))
        .sum();
    assert!(size <= f.cfg.log_max_bytes, "{size}");
    let kept = view
        .logs("flood", 0, leasehold_engines::logs::MAX_READ_LINES)
        .unwrap();
    let dropped: u64 = kept
        .iter()
        .filter(|r| r.stream == Stream::Agent)
        .filter_map(|r| {
            String::from_utf8_lossy(&r.text)
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    println!(
        "flood: 400001 lines (24.0 MB) written in {ran:?} (engine start to exit seen), stored by {stored:?}; \
         log {size} bytes in 2 files (budget {}); {dropped} lines dropped by the notes in the last {} records",
        f.cfg.log_max_bytes,
        kept.len()
    );
}

/// `until` with a longer bound, for the flood.
fn until_longer(rt: &EngineRuntime, name: &str, f: impl Fn(&EngineStatus) -> bool) -> EngineStatus {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let s = rt.view().status(name).unwrap();
        if f(&s) {
            return s;
        }
        assert!(Instant::now() < end, "timed out; last status {s:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// T1 (root, busybox, the shim built): an engine's output survives an agent
/// restart. The first runtime stores a line and ends (its captures let go
/// of the FIFOs, as the agent's process would); the engine writes a line
/// while no runtime reads; the next runtime re-adopts the engine, reads
/// that line from the FIFO the shim kept open, then the rest, and sees the
/// exit. Every line is in the log once.
#[test]
#[ignore = "needs root, /bin/busybox (busybox-static) and the engine shim (cargo build --workspace --bins)"]
fn real_output_survives_an_agent_restart() {
    let shim = real_shim();
    let f = fixture(false);
    write_busybox_image(&f);
    let start = || {
        EngineRuntime::start(
            f.cfg.clone(),
            Arc::new(DirCg(f.tmp.path().join("cgroup"))),
            Arc::new(ShimSpawner(launch::Launcher::new(shim.clone()))),
            f.vol.clone(),
        )
        .unwrap()
    };
    let data = f.tmp.path().join("vol/engines/bb/data/var/lib/app");
    // The engine waits on files the test makes in its data dir (the only
    // place both see), and says when it has written.
    let wait =
        |n: &str| format!("while [ ! -e /var/lib/app/{n} ]; do /bin/busybox sleep 0.02; done");
    let script = format!(
        "echo one; {}; echo two; /bin/busybox touch /var/lib/app/wrote; {}; echo three; exit 3",
        wait("go1"),
        wait("go2")
    );
    let mut rt = start();
    rt.deploy(
        "bb",
        "bb.tar",
        &spec(&format!(
            "command = [\"/bin/busybox\", \"sh\", \"-c\", {script:?}]\ndata_dirs = [\"var/lib/app\"]\n[restart]\npolicy = \"never\"\n"
        )),
    )
    .unwrap();
    rt.start("bb").unwrap();
    let texts = |rt: &EngineRuntime| -> Vec<String> {
        rt.view()
            .logs("bb", 0, 100)
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(&r.text).into_owned())
            .collect()
    };
    let wait_for = |what: &dyn Fn() -> bool, why: &str| {
        let end = Instant::now() + Duration::from_secs(20);
        while !what() {
            assert!(Instant::now() < end, "timed out: {why}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(&|| texts(&rt) == ["one"], "the first line stored");
    let run = std::fs::read_dir(f.cfg.run_dir.join("bb"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    use std::os::unix::fs::MetadataExt;
    let fifo = std::fs::symlink_metadata(run.join(launch::STDOUT_FIFO))
        .unwrap()
        .ino();
    let agent_holds_fifo = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
            .any(|m| m.ino() == fifo)
    };
    assert!(agent_holds_fifo());
    drop(rt);
    wait_for(
        &|| !agent_holds_fifo(),
        "the first runtime's capture let go",
    );
    std::fs::write(data.join("go1"), b"").unwrap();
    wait_for(
        &|| data.join("wrote").exists(),
        "the engine wrote with no reader",
    );
    let rt = start();
    assert!(rt.view().status("bb").unwrap().pid.is_some(), "re-adopted");
    wait_for(
        &|| texts(&rt) == ["one", "two"],
        "the line written meanwhile",
    );
    std::fs::write(data.join("go2"), b"").unwrap();
    let s = until(&rt, "bb", |s| s.phase == Phase::Exited);
    assert_eq!(s.last_exit, Some(Exit::Code(3)));
    wait_for(&|| texts(&rt) == ["one", "two", "three"], "every line once");
}

/// An archive uploaded in chunks (`crate::upload`) is deployed by its
/// name: the upload and the runtime agree on where the inbox is.
#[test]
fn uploaded_image_deploys_by_its_name() {
    let f = fixture(false);
    let up = crate::upload::Uploads::new(
        f.vol.clone(),
        f.cfg.images_dir.clone(),
        crate::upload::DEFAULT_MAX_BYTES,
    );
    let archive = image_archive();
    let uid = rustix::process::getuid().as_raw();
    let id = up
        .begin(uid, "up.tar", archive.len() as u64, &sha256(&archive))
        .unwrap();
    let mut off = 0;
    for c in archive.chunks(1000) {
        off = up.chunk(uid, &id, off, c).unwrap();
    }
    assert_eq!(up.commit(uid, &id).unwrap(), "up.tar");
    let mut rt = f.runtime();
    let st = rt
        .deploy("web", "up.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    assert_eq!(st.image, "up.tar");
    assert!(f
        .tmp
        .path()
        .join("vol/engines/web/v1/rootfs/bin/app")
        .is_file());
}

mod budget;
