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
    image_with(b"#!/bin/sh\n")
}

/// The same with `bin/app` holding `app` (another image ID).
fn image_with(app: &[u8]) -> Vec<u8> {
    oci_archive(
        &[("bin/app", app, 0o755)],
        serde_json::json!({"Env": ["PATH=/bin"], "WorkingDir": "/srv"}),
    )
}

/// An oci-archive of one layer holding `files`; `run` is the image's run
/// configuration (`null` for none).
fn oci_archive(files: &[(&str, &[u8], u32)], run: serde_json::Value) -> Vec<u8> {
    let layer = tar_of(files);
    let mut config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]}
    });
    if !run.is_null() {
        config["config"] = run;
    }
    let config = serde_json::to_vec(&config).unwrap();
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
    fn children(&self, cg: &CgroupPath) -> Result<Vec<String>, CgroupError> {
        Ok(self
            .dirs
            .lock()
            .unwrap()
            .iter()
            .filter(|d| d.parent() == Some(cg.as_path()))
            .filter_map(|d| Some(d.file_name()?.to_str()?.to_owned()))
            .collect())
    }
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
    /// engines.json as it was when the instance was let go on (`None`:
    /// never released).
    released_with: Mutex<Option<String>>,
    /// The state file's inode at the release.
    released_ino: Mutex<Option<u64>>,
    /// The state file the fake reads at its release.
    state_file: PathBuf,
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
    fn release(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let state = std::fs::read_to_string(&self.ctl.state_file).unwrap_or_default();
        *self.ctl.released_with.lock().unwrap() = Some(state);
        *self.ctl.released_ino.lock().unwrap() = std::fs::metadata(&self.ctl.state_file)
            .ok()
            .map(|m| m.ino());
    }
}

#[derive(Default)]
struct FakeSpawner {
    spawned: Mutex<Vec<(LaunchSpec, PathBuf, Arc<Ctl>)>>,
    /// Run dirs `adopt` finds alive.
    alive: Mutex<BTreeMap<PathBuf, Arc<Ctl>>>,
    ignore_term: bool,
    /// What `exec` probes return (`None`: exit code 0), and the argv of
    /// each run.
    probe_exit: Mutex<Option<launch::ProbeExit>>,
    probes_run: Mutex<Vec<Vec<String>>>,
    /// The secrets' bytes each spawn was given.
    secrets_given: Mutex<Vec<Vec<Vec<u8>>>>,
    /// The runtime's engines.json (read by each instance at its release).
    state_file: PathBuf,
    /// How many times every engine was to be stopped (`quiesce`).
    quiesced: std::sync::atomic::AtomicUsize,
    /// Every spawn fails (a launch the node could not make).
    fail_spawn: Mutex<bool>,
    /// The next `exec` probe waits here for what it returns (a probe
    /// hung while its engine is removed).
    probe_hold: Mutex<Option<std::sync::mpsc::Receiver<launch::ProbeExit>>>,
}

impl Spawner for FakeSpawner {
    fn spawn(
        &self,
        spec: &LaunchSpec,
        run_dir: &Path,
        log_dir: &Path,
        secrets: Vec<SecretBytes>,
    ) -> Result<Box<dyn Proc>, LaunchError> {
        if *self.fail_spawn.lock().unwrap() {
            return Err(LaunchError::InvalidSpec("the fake's spawn fails"));
        }
        assert!(log_dir.ends_with("logs"), "{log_dir:?}");
        assert_eq!(secrets.len(), spec.secrets.len());
        // As the real spawner: the run directory is there once spawned.
        std::fs::create_dir_all(run_dir).unwrap();
        self.secrets_given
            .lock()
            .unwrap()
            .push(secrets.iter().map(|b| b.expose().to_vec()).collect());
        assert!(log_dir.starts_with(spec.rootfs.parent().unwrap().parent().unwrap()));
        let ctl = Arc::new(Ctl {
            ignore_term: self.ignore_term,
            state_file: self.state_file.clone(),
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
    fn quiesce(&self) {
        self.quiesced
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn exec_probe(&self, _: &Path, argv: &[String], _: Duration) -> launch::ProbeExit {
        self.probes_run.lock().unwrap().push(argv.to_vec());
        let held = self.probe_hold.lock().unwrap().take();
        if let Some(rx) = held {
            return rx.recv().unwrap_or(launch::ProbeExit::Code(0));
        }
        self.probe_exit
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(launch::ProbeExit::Code(0))
    }
    fn recorded_exit(&self, run_dir: &Path) -> Option<launch::Exit> {
        // What a real shim leaves in its run directory (gone with it): its
        // engine's exit, once it ended.
        if !run_dir.exists() {
            return None;
        }
        match self
            .alive
            .lock()
            .unwrap()
            .get(run_dir)?
            .exit
            .lock()
            .unwrap()
            .clone()?
        {
            e @ (launch::Exit::Code(_) | launch::Exit::Signal(_)) => Some(e),
            _ => None,
        }
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
        state_dir: state.clone(),
        log_max_bytes: leasehold_engines::logs::DEFAULT_MAX_BYTES,
        reboot_node: None,
        boot_id: Some("boot-1".into()),
        probe_rate: probe_gate::DEFAULT_RATE,
        probe_concurrency: probe_gate::DEFAULT_CONCURRENCY,
        fdstore: Arc::new(crate::fdstore::FdStore::off()),
    };
    Fix {
        tmp,
        cfg,
        cg: Arc::default(),
        sp: Arc::new(FakeSpawner {
            ignore_term,
            state_file: state.join(STATE_FILE),
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

/// `web` deployed (`command = ["/bin/app"]`), started, and ready.
fn ready_web(f: &Fix) -> EngineRuntime {
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    rt
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

/// The kinds of the runtime's first 100 events, oldest first.
fn event_kinds(rt: &EngineRuntime) -> Vec<String> {
    rt.view()
        .events(0, 100)
        .into_iter()
        .map(|e| e.kind)
        .collect()
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
    // Without the volume (its image, data and logs are there): refused,
    // nothing removed.
    *f.vol.0.lock().unwrap() = None;
    let e = rt.rm("web").unwrap_err();
    assert_eq!(e.kind, FailureKind::Unavailable, "{e}");
    assert!(rt.view().status("web").is_some());
    assert!(f
        .cg
        .dirs
        .lock()
        .unwrap()
        .iter()
        .any(|d| d.ends_with("tenant/web")));
    *f.vol.0.lock().unwrap() = Some(f.tmp.path().join("vol"));
    rt.rm("web").unwrap();
    assert!(rt.view().status("web").is_none());
    assert!(!f.tmp.path().join("vol/engines/web").exists());
    let st = std::fs::read_to_string(f.cfg.state_dir.join(STATE_FILE)).unwrap();
    assert!(!st.contains("\"web\""), "{st}");
}

#[test]
fn a_crash_is_restarted_after_the_backoff() {
    let f = fixture(false);
    let rt = ready_web(&f);
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
    let quiesced = || f.sp.quiesced.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(quiesced(), 0);
    let t = Instant::now();
    let r = rt.stop_all(Duration::from_millis(200)).unwrap();
    // The spawner drops what it prepared ahead (the warm shim's mount
    // namespace) before the volume may change.
    assert_eq!(quiesced(), 1);
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
    let last = rt.view().events(0, 1000);
    assert!(last.iter().any(|e| e.engine == "a"), "{last:?}");
    assert_eq!(rt.forget_all().unwrap(), 2);
    assert!(rt.view().list().is_empty());
    // The next tenancy reads none of this one's events.
    assert_eq!(rt.view().events(0, 1000), vec![]);
}

#[test]
fn a_running_engine_is_readopted_by_a_new_runtime() {
    let f = fixture(false);
    let rt = ready_web(&f);
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
fn a_new_runtime_sweeps_instances_no_state_names() {
    // What an agent killed between a shim's spawn and its save leaves (an
    // instance cgroup and run directory no state names), beside a recorded
    // instance that still runs: the next runtime kills and removes the
    // first and keeps the second, before anything is started.
    let f = fixture(false);
    let rt = ready_web(&f);
    drop(rt);
    let running = f.sp.spawned.lock().unwrap()[0].1.clone();
    let kept = Path::new("leasehold/tenant/web").join(running.file_name().unwrap());
    assert!(f.cg.dirs.lock().unwrap().contains(&kept));
    let stray = PathBuf::from("leasehold/tenant/web/i99");
    f.cg.dirs.lock().unwrap().insert(stray.clone());
    let stray_run = running.with_file_name("i99");
    std::fs::create_dir_all(&stray_run).unwrap();
    let rt2 = f.runtime();
    until(&rt2, "web", |s| s.pid == Some(4242));
    let killed = f.cg.killed.lock().unwrap().clone();
    assert_eq!(killed, vec![stray.clone()]);
    let dirs = f.cg.dirs.lock().unwrap().clone();
    assert!(!dirs.contains(&stray) && dirs.contains(&kept), "{dirs:?}");
    assert!(!stray_run.exists() && running.exists());
    assert_eq!(f.sp.spawned.lock().unwrap().len(), 1);
    // New instances are named above every name found.
    let mut rt2 = rt2;
    rt2.restart("web").unwrap();
    until(&rt2, "web", |s| {
        s.phase == Phase::Ready && s.pid != Some(4242)
    });
    let newest = f.sp.spawned.lock().unwrap().last().unwrap().1.clone();
    assert!(number_of(&newest) > 99, "{newest:?}");
}

#[test]
fn only_names_as_written_are_instances() {
    assert_eq!(instance_number(&instance_dir(7)), Some(7));
    for other in [
        "i",
        "i07",
        "i+7",
        "i-7",
        "7",
        "x7",
        "i7 ",
        "i18446744073709551616",
    ] {
        assert_eq!(instance_number(other), None, "{other}");
    }
}

/// `N` of an instance's run directory `…/i<N>`.
fn number_of(run_dir: &Path) -> u64 {
    instance_number(run_dir.file_name().unwrap().to_str().unwrap()).unwrap()
}

#[test]
fn a_swept_cgroup_that_stays_is_never_joined_and_goes_before_rm() {
    // The killed stray's cgroup does not go at once (its process still
    // exiting): the next instance gets a name above it, and `rm` retries it
    // before the engine's own cgroup.
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    drop(rt);
    let stray = PathBuf::from("leasehold/tenant/web/i0");
    f.cg.dirs.lock().unwrap().insert(stray.clone());
    *f.cg.stuck.lock().unwrap() = 1;
    let mut rt2 = f.runtime();
    assert!(
        f.cg.dirs.lock().unwrap().contains(&stray),
        "not yet removed"
    );
    rt2.start("web").unwrap();
    until(&rt2, "web", |s| s.phase == Phase::Ready);
    let run = f.sp.spawned.lock().unwrap()[0].1.clone();
    assert!(number_of(&run) > 0, "{run:?}");
    rt2.stop("web", None).unwrap();
    until(&rt2, "web", |s| s.phase == Phase::Stopped);
    rt2.rm("web").unwrap();
    let dirs = f.cg.dirs.lock().unwrap().clone();
    assert!(
        !dirs.iter().any(|d| d.starts_with("leasehold/tenant/web")),
        "{dirs:?}"
    );
}

#[test]
fn an_enabled_engine_whose_instance_is_gone_starts_again() {
    let f = fixture(false);
    let rt = ready_web(&f);
    drop(rt);
    f.sp.alive.lock().unwrap().clear(); // a node reboot
    let rt2 = f.runtime();
    until(&rt2, "web", |s| s.phase == Phase::Ready);
    assert_eq!(f.sp.spawned.lock().unwrap().len(), 2);
}

/// `name` deployed with `extra` after its command, started and running.
fn running(f: &Fix, name: &str, extra: &str) -> EngineRuntime {
    let mut rt = f.runtime();
    rt.deploy(
        name,
        "app.tar",
        &spec(&format!("command = [\"/bin/app\"]\n{extra}")),
    )
    .unwrap();
    rt.start(name).unwrap();
    until(&rt, name, |s| s.phase == Phase::Ready);
    rt
}

/// The fake instance `n` (0: the first spawned).
fn instance(f: &Fix, n: usize) -> Arc<Ctl> {
    f.sp.spawned.lock().unwrap()[n].2.clone()
}

fn spawned(f: &Fix) -> usize {
    f.sp.spawned.lock().unwrap().len()
}

#[test]
fn an_engine_at_rest_stays_so_across_an_agent_restart_but_not_a_reboot() {
    // A batch engine (`restart = "never"`) ran and exited by itself: an
    // agent restart or upgrade within the same boot leaves it exited (it
    // was run again at every agent restart before); a node reboot starts
    // it, as every engine marked to run.
    let mut f = fixture(false);
    let rt = running(&f, "job", "[restart]\npolicy = \"never\"");
    instance(&f, 0).end(launch::Exit::Code(0));
    until(&rt, "job", |s| s.phase == Phase::Exited);
    drop(rt);
    let st = std::fs::read_to_string(f.cfg.state_dir.join(STATE_FILE)).unwrap();
    assert!(
        st.contains("\"boot-1\"") && st.contains("\"settled\""),
        "{st}"
    );
    let rt = f.runtime();
    let s = rt.view().status("job").unwrap();
    assert_eq!(s.phase, Phase::Exited, "{s:?}");
    assert_eq!(s.last_exit, Some(Exit::Code(0)));
    assert_eq!(spawned(&f), 1, "not run again");
    // Still the tenant's to start.
    let mut rt = rt;
    rt.start("job").unwrap();
    until(&rt, "job", |s| s.phase == Phase::Ready);
    assert_eq!(spawned(&f), 2);
    instance(&f, 1).end(launch::Exit::Code(0));
    until(&rt, "job", |s| s.phase == Phase::Exited);
    drop(rt);
    // Another boot: /run is empty, the engine is marked to run.
    f.sp.alive.lock().unwrap().clear();
    f.cfg.boot_id = Some("boot-2".into());
    let rt = f.runtime();
    until(&rt, "job", |s| s.phase == Phase::Ready);
    assert_eq!(spawned(&f), 3);
    drop(rt);
    // A state written by an older agent (no boot recorded): as a boot.
    instance(&f, 2).end(launch::Exit::Code(0));
    let rt = f.runtime();
    until(&rt, "job", |s| s.phase == Phase::Exited);
    drop(rt);
    let path = f.cfg.state_dir.join(STATE_FILE);
    let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    st.as_object_mut().unwrap().remove("boot_id").unwrap();
    assert!(st["engines"][0]["settled"].is_object(), "{st}");
    std::fs::write(&path, serde_json::to_vec(&st).unwrap()).unwrap();
    let rt = f.runtime();
    until(&rt, "job", |s| s.phase == Phase::Ready);
    assert_eq!(spawned(&f), 4);
    drop(rt);
    // This agent's boot unknown (boot_id unreadable): as a boot.
    instance(&f, 3).end(launch::Exit::Code(0));
    f.cfg.boot_id = None;
    let rt = f.runtime();
    until(&rt, "job", |s| s.phase == Phase::Ready);
    assert_eq!(spawned(&f), 5);
}

#[test]
fn a_stop_the_agent_began_is_not_taken_for_the_engines_own_exit() {
    // A tenant's restart sends SIGTERM and the agent restarts within the
    // grace: the shim records signal 15, which a `never` engine would not
    // be restarted after — but the agent meant to launch it again, and
    // the next agent does (the run directory's stop mark says so).
    let f = fixture(true);
    let mut rt = running(&f, "job", "[restart]\npolicy = \"never\"");
    rt.restart("job").unwrap();
    let ctl = instance(&f, 0);
    let end = Instant::now() + Duration::from_secs(10);
    while !ctl.signals.lock().unwrap().contains(&Signal::SIGTERM) {
        assert!(Instant::now() < end, "no SIGTERM");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(rt);
    ctl.end(launch::Exit::Signal(15));
    let rt = f.runtime();
    until(&rt, "job", |s| s.phase == Phase::Ready);
    assert_eq!(spawned(&f), 2);
}

#[test]
fn a_launch_that_failed_is_tried_again_by_the_next_agent() {
    // Not the engine's own end (here: the spawn fails): not at rest, so
    // an agent restart tries again.
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy(
        "job",
        "app.tar",
        &spec("command = [\"/bin/app\"]\n[restart]\npolicy = \"never\""),
    )
    .unwrap();
    *f.sp.fail_spawn.lock().unwrap() = true;
    let _ = rt.start("job");
    until(&rt, "job", |s| s.phase == Phase::Exited);
    assert_eq!(
        rt.view().status("job").unwrap().last_exit,
        Some(Exit::NotStarted)
    );
    drop(rt);
    *f.sp.fail_spawn.lock().unwrap() = false;
    let rt = f.runtime();
    until(&rt, "job", |s| s.phase == Phase::Ready);
}

#[test]
fn a_stopped_or_given_up_engine_is_as_it_was_after_an_agent_restart() {
    let f = fixture(false);
    let rt = running(
        &f,
        "web",
        "[restart]\npolicy = \"always\"\ninitial = \"1ms\"\n[restart.give_up]\nrestarts = 1\nwithin = \"60s\"",
    );
    instance(&f, 0).end(launch::Exit::Code(1));
    until(&rt, "web", |s| s.restarts == 1 && s.phase == Phase::Ready);
    instance(&f, 1).end(launch::Exit::Code(2));
    until(&rt, "web", |s| s.phase == Phase::GaveUp);
    drop(rt);
    let mut rt2 = running(&f, "api", "");
    rt2.stop("api", None).unwrap();
    until(&rt2, "api", |s| s.phase == Phase::Stopped);
    drop(rt2);
    let rt = f.runtime();
    let s = rt.view().status("web").unwrap();
    assert_eq!(
        (s.phase, s.last_exit, s.restarts),
        (Phase::GaveUp, Some(Exit::Code(2)), 1),
        "{s:?}"
    );
    assert_eq!(rt.view().status("api").unwrap().phase, Phase::Stopped);
    assert_eq!(spawned(&f), 3, "nothing started");
}

#[test]
fn an_exit_while_no_agent_watched_goes_through_the_restart_policy() {
    // The engine ended between the agent's stop and its next start: its
    // shim recorded how. The next agent does what it would have done at
    // the exit: a policy that does not restart leaves it exited, one that
    // does restarts it after the backoff's delay.
    for (policy, code, restarted) in [
        ("never", 3, false),
        ("on-failure", 0, false),
        ("on-failure", 3, true),
        ("always", 0, true),
    ] {
        let f = fixture(false);
        let rt = running(&f, "job", &format!("[restart]\npolicy = {policy:?}"));
        drop(rt);
        instance(&f, 0).end(launch::Exit::Code(code));
        let rt = f.runtime();
        let s = if restarted {
            until(&rt, "job", |s| s.phase == Phase::Ready && s.restarts == 1)
        } else {
            // No timer, no launch: what the load decided is final.
            let s = rt.view().status("job").unwrap();
            assert_eq!(s.phase, Phase::Exited, "{policy} {code}: {s:?}");
            s
        };
        assert_eq!(s.last_exit, Some(Exit::Code(code)), "{policy} {code}");
        assert_eq!(spawned(&f), 1 + usize::from(restarted), "{policy} {code}");
        let kinds = event_kinds(&rt);
        assert_eq!(
            kinds.first().map(String::as_str),
            Some("exited"),
            "{kinds:?}"
        );
        // Recorded at rest for the next agent too.
        drop(rt);
        if !restarted {
            let st = std::fs::read_to_string(f.cfg.state_dir.join(STATE_FILE)).unwrap();
            assert!(st.contains("\"settled\""), "{st}");
        }
    }
}

#[test]
fn unsupported_spec_parts_are_refused_by_field() {
    let f = fixture(false);
    let mut rt = f.runtime();
    // No secret store here: a named secret is missing, and says which.
    let e = rt
        .deploy(
            "web",
            "app.tar",
            &spec("command = [\"/bin/app\"]\nsecrets = [\"db\"]\n"),
        )
        .unwrap_err();
    assert!(e.message.contains("secrets: [0] \"db\""), "{e}");
    let e = rt
        .deploy("web", "app.tar", &spec("command = [\"nothere\"]\n"))
        .unwrap_err();
    assert!(e.message.contains("command[0]"), "{e}");
    assert!(!f.tmp.path().join("vol/engines/web/v1").exists());
}

#[test]
fn after_readoption_new_instances_never_reuse_a_directory() {
    let f = fixture(false);
    let rt = ready_web(&f);
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
fn an_engine_named_inbox_is_refused() {
    let f = fixture(false);
    let mut rt = f.runtime();
    // What the tenant's login could plant in its own inbox beforehand.
    let outside = f.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, f.tmp.path().join("vol/engines/inbox/data")).unwrap();
    let e = rt
        .deploy(
            "inbox",
            "app.tar",
            &spec("command = [\"/bin/app\"]\ndata_dirs = [\"etc\"]"),
        )
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Invalid, "{e}");
    assert!(e.message.contains("reserved"), "{e}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert!(rt.view().list().is_empty());
}

#[test]
fn a_data_dir_through_a_link_the_engine_planted_is_refused_and_not_followed() {
    use std::os::unix::fs::MetadataExt;
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy(
        "web",
        "app.tar",
        &spec("command = [\"/bin/app\"]\ndata_dirs = [\"a\"]"),
    )
    .unwrap();
    let data = f.tmp.path().join("vol/engines/web/data");
    assert_eq!(std::fs::metadata(data.join("a")).unwrap().uid(), 200_000);
    // The engine owns data/a: it links a/b to a host directory.
    let outside = f.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let owner = std::fs::metadata(&outside).unwrap().uid();
    std::os::unix::fs::symlink(&outside, data.join("a/b")).unwrap();
    for dirs in ["a/b", "a/b/c"] {
        let e = rt
            .reload(
                "web",
                None,
                Some(&spec(&format!(
                    "command = [\"/bin/app\"]\ndata_dirs = [{dirs:?}]"
                ))),
            )
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::Invalid, "{dirs}: {e}");
        assert!(
            e.message.contains("data_dirs") && e.message.contains("symlink"),
            "{dirs}: {e}"
        );
        assert_eq!(std::fs::metadata(&outside).unwrap().uid(), owner, "{dirs}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "{dirs}");
        assert!(
            !f.tmp.path().join("vol/engines/web/v2").exists(),
            "{dirs}: no version left behind"
        );
    }
    // A real directory below the earlier data dir is fine (the engine
    // owns it anyway).
    std::fs::remove_file(data.join("a/b")).unwrap();
    rt.reload(
        "web",
        None,
        Some(&spec("command = [\"/bin/app\"]\ndata_dirs = [\"a/b\"]")),
    )
    .unwrap();
    assert_eq!(std::fs::metadata(data.join("a/b")).unwrap().uid(), 200_000);
}

#[test]
fn an_image_env_past_the_exec_bound_is_refused_naming_it() {
    let f = fixture(false);
    let inbox = f.tmp.path().join("vol/engines/inbox");
    // 600 variables of 1 KiB: far past 512 and 256 KiB (a config may be
    // 4 MiB); then one with a NUL byte.
    let big: Vec<String> = (0..600)
        .map(|i| format!("V{i}={}", "x".repeat(1024)))
        .collect();
    std::fs::write(
        inbox.join("big.tar"),
        oci_archive(
            &[("bin/app", b"#!/bin/sh\n", 0o755)],
            serde_json::json!({ "Env": big }),
        ),
    )
    .unwrap();
    std::fs::write(
        inbox.join("nul.tar"),
        oci_archive(
            &[("bin/app", b"#!/bin/sh\n", 0o755)],
            serde_json::json!({ "Env": ["A=b\0c"] }),
        ),
    )
    .unwrap();
    let mut rt = f.runtime();
    for (image, says) in [("big.tar", "at most 512"), ("nul.tar", "NUL")] {
        let e = rt
            .deploy("web", image, &spec(r#"command = ["/bin/app"]"#))
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::Invalid, "{image}: {e}");
        assert!(
            e.message.contains("env") && e.message.contains(says),
            "{image}: {e}"
        );
        assert!(e.message.len() < 400, "{image}: {} bytes", e.message.len());
        assert!(rt.view().list().is_empty());
        assert!(!f.tmp.path().join("vol/engines/web/v1").exists(), "{image}");
    }
}

#[test]
fn the_command_is_looked_up_inside_the_image_only() {
    let f = fixture(false);
    // A host file the image's PATH climbs to (as root, a plain lookup
    // would find it and the deploy would say so).
    let host = f.tmp.path().join("hostdir");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("tool"), b"").unwrap();
    let climb = format!("/../../../../../../../..{}", host.display());
    std::fs::write(
        f.tmp.path().join("vol/engines/inbox/climb.tar"),
        oci_archive(
            &[("bin/app", b"#!/bin/sh\n", 0o755)],
            serde_json::json!({ "Env": [format!("PATH={climb}:/bin")] }),
        ),
    )
    .unwrap();
    let mut rt = f.runtime();
    let e = rt
        .deploy("web", "climb.tar", &spec(r#"command = ["tool"]"#))
        .unwrap_err();
    assert!(e.message.contains("not in the image's PATH"), "{e}");
    // The image's own PATH still works.
    rt.deploy("web", "climb.tar", &spec(r#"command = ["app"]"#))
        .unwrap();
    assert_eq!(
        rt.view().status("web").unwrap().image,
        "climb.tar",
        "deployed"
    );
}

#[test]
fn an_unpack_an_earlier_agent_did_not_finish_is_swept_at_start() {
    let f = fixture(false);
    let vol = f.tmp.path().join("vol/engines");
    let staging = vol.join("web/v1/.rootfs.unpacking-99-12345");
    std::fs::create_dir_all(staging.join("usr/bin")).unwrap();
    std::fs::write(staging.join("usr/bin/x"), b"partial").unwrap();
    // Never touched: data, a version's root, something else hidden.
    std::fs::create_dir_all(vol.join("web/data/db")).unwrap();
    std::fs::create_dir_all(vol.join("web/v1/rootfs")).unwrap();
    std::fs::create_dir_all(vol.join("web/v1/.other")).unwrap();
    let _rt = f.runtime();
    assert!(!staging.exists());
    for kept in [
        "web/data/db",
        "web/v1/rootfs",
        "web/v1/.other",
        "inbox/app.tar",
    ] {
        assert!(vol.join(kept).exists(), "{kept}");
    }
}

#[test]
fn a_stop_the_runtime_does_not_answer_kills_the_tenants_cgroups() {
    let f = fixture(false);
    let mut rt = running(&f, "web", "");
    // The runtime thread ends (as if stuck: a call gets no answer).
    rt.tx.send(Msg::Shutdown).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while rt.tx.send(Msg::Shutdown).is_ok() {
        assert!(Instant::now() < end, "the runtime thread did not end");
        std::thread::yield_now();
    }
    let r = rt.stop_all(Duration::ZERO).unwrap();
    assert!(
        r.stopped.is_empty(),
        "nothing claimed stopped by name: {r:?}"
    );
    let why = r.error.unwrap();
    assert!(why.contains("cgroup.kill"), "{why}");
    let killed = f.cg.killed.lock().unwrap().clone();
    assert!(
        killed.contains(&PathBuf::from("leasehold/tenant")),
        "the subtree was killed: {killed:?}"
    );
    // Work the thread finishes late launches nothing until the engines
    // are forgotten.
    assert!(rt.halted.load(std::sync::atomic::Ordering::SeqCst));
}

#[test]
fn while_halted_for_an_erase_nothing_is_launched_until_the_late_stop_is_done() {
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    // As the stop fallback leaves it (the thread was busy).
    rt.halted.store(true, std::sync::atomic::Ordering::SeqCst);
    rt.start("web").unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !rt
        .view()
        .events(0, 1000)
        .iter()
        .any(|e| e.detail.contains("killed for an erase"))
    {
        assert!(
            Instant::now() < end,
            "no launch failure: {:?}",
            rt.view().events(0, 1000)
        );
        std::thread::yield_now();
    }
    let s = rt.view().status("web").unwrap();
    assert_eq!(spawned(&f), 0, "nothing launched: {s:?}");
    rt.stop("web", None).unwrap();
    // What the fallback queues after the late stop lifts it.
    match rt.call(Cmd::Unhalt, Duration::from_secs(10)) {
        Ok(Reply::Unit(Ok(()))) => {}
        _ => panic!("no answer to Unhalt"),
    }
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    assert_eq!(spawned(&f), 1);
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
fn an_instance_goes_on_only_once_the_state_names_it() {
    // An agent killed between the spawn and the save must not leave an
    // engine running that the next agent cannot adopt: the shim waits
    // (launch::Launcher::start_held) until engines.json names it.
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    rt.start("web").unwrap();
    let s = until(&rt, "web", |s| s.phase == Phase::Ready);
    let pid = s.pid.unwrap();
    let ctl = f.sp.spawned.lock().unwrap()[0].2.clone();
    let state = ctl.released_with.lock().unwrap().clone().expect("released");
    let st: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        st["engines"][0]["instances"][0][1], pid,
        "the state at the release names the instance: {state}"
    );
    // And a restart's new instance too.
    ctl.end(launch::Exit::Code(1));
    until(&rt, "web", |s| s.restarts == 1 && s.phase == Phase::Ready);
    let ctl = f.sp.spawned.lock().unwrap()[1].2.clone();
    let state = ctl.released_with.lock().unwrap().clone().expect("released");
    let pid = rt.view().status("web").unwrap().pid.unwrap();
    assert!(state.contains(&pid.to_string()), "{state}");
}

#[test]
fn a_start_writes_the_state_once_unless_it_changes_or_goes() {
    use std::os::unix::fs::MetadataExt;
    let f = fixture(false);
    let state = f.cfg.state_dir.join(STATE_FILE);
    let ino = || std::fs::metadata(&state).unwrap().ino();
    let mut rt = ready_web(&f);
    // The save after the release wrote the same bytes: not again.
    let ctl = f.sp.spawned.lock().unwrap()[0].2.clone();
    let released = ctl.released_ino.lock().unwrap().expect("released");
    assert_eq!(ino(), released, "engines.json rewritten after the release");
    // A change is written; so is a state file someone removed, even when
    // the runtime's own record did not change.
    rt.stop("web", None).unwrap();
    until(&rt, "web", |s| s.pid.is_none());
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(st["engines"][0]["enabled"], false, "{st}");
    assert_ne!(ino(), released);
    std::fs::remove_file(&state).unwrap();
    rt.stop("web", None).unwrap();
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(st["engines"][0]["enabled"], false, "{st}");
}

#[test]
fn an_instance_the_state_cannot_name_never_goes_on() {
    // engines.json cannot be written: the spawned shim is never let go
    // on, is killed, and the start is reported as not started.
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy(
        "web",
        "app.tar",
        &spec("command = [\"/bin/app\"]\n[restart]\npolicy = \"never\"\n"),
    )
    .unwrap();
    std::fs::remove_dir_all(&f.cfg.state_dir).unwrap();
    std::fs::write(&f.cfg.state_dir, "not a directory").unwrap();
    let _ = rt.start("web");
    until(&rt, "web", |s| s.last_exit == Some(Exit::NotStarted));
    let spawned = f.sp.spawned.lock().unwrap().clone();
    assert_eq!(spawned.len(), 1);
    let ctl = &spawned[0].2;
    assert!(
        ctl.released_with.lock().unwrap().is_none(),
        "never released"
    );
    assert_eq!(*ctl.signals.lock().unwrap(), vec![Signal::SIGKILL]);
    let s = rt.view().status("web").unwrap();
    assert!(s.pid.is_none(), "{s:?}");
    // Cleaned up as after an exit: no instance cgroup, no run directory.
    assert!(!spawned[0].1.exists(), "{:?}", spawned[0].1);
    let dirs = f.cg.dirs.lock().unwrap().clone();
    assert!(
        !dirs.contains(Path::new("leasehold/tenant/web/i1")),
        "{dirs:?}"
    );
}

#[test]
fn without_the_volume_nothing_is_launched() {
    let f = fixture(false);
    let mut rt = ready_web(&f);
    // The volume goes away under a running engine, which then crashes:
    // its restart is not launched from wherever the mount point leads.
    *f.vol.0.lock().unwrap() = None;
    let ctl = f.sp.spawned.lock().unwrap()[0].2.clone();
    ctl.end(launch::Exit::Code(1));
    until(&rt, "web", |s| s.last_exit == Some(Exit::NotStarted));
    assert_eq!(f.sp.spawned.lock().unwrap().len(), 1);
    let e = rt.start("web").unwrap_err();
    assert_eq!(e.kind, FailureKind::Unavailable, "{e}");
    // A new agent without the volume (a reboot whose volume did not open)
    // leaves the engine stopped — what it decides at its load is final —
    // but still marked to run, saying why: the next agent that finds the
    // volume starts it (before, the mark was lost with the first save).
    drop(rt);
    f.sp.alive.lock().unwrap().clear();
    let rt2 = f.runtime();
    let s = rt2.view().status("web").unwrap();
    assert_eq!((s.phase, s.enabled), (Phase::Stopped, true), "{s:?}");
    assert!(
        s.notes.iter().any(|n| n.contains("no tenant volume")),
        "{s:?}"
    );
    assert_eq!(f.sp.spawned.lock().unwrap().len(), 1);
    drop(rt2);
    *f.vol.0.lock().unwrap() = Some(f.tmp.path().join("vol"));
    let rt3 = f.runtime();
    let s = until(&rt3, "web", |s| s.phase == Phase::Ready);
    assert!(s.notes.is_empty(), "{s:?}");
    assert_eq!(f.sp.spawned.lock().unwrap().len(), 2);
    // Held again, then stopped by the tenant: no longer marked, no note.
    drop(rt3);
    f.sp.alive.lock().unwrap().clear();
    *f.vol.0.lock().unwrap() = None;
    let mut rt4 = f.runtime();
    rt4.stop("web", None).unwrap();
    let s = rt4.view().status("web").unwrap();
    assert_eq!((s.phase, s.enabled), (Phase::Stopped, false), "{s:?}");
    assert!(s.notes.is_empty(), "{s:?}");
}

#[test]
fn an_exit_while_no_agent_watched_and_no_volume_is_kept_when_not_restarted() {
    // `never`, ended by itself while no agent ran, and the next agent has
    // no volume: exited (not held to run), so the agent after it, with the
    // volume, does not run it again.
    let f = fixture(false);
    let rt = running(&f, "job", "[restart]\npolicy = \"never\"");
    drop(rt);
    instance(&f, 0).end(launch::Exit::Code(3));
    *f.vol.0.lock().unwrap() = None;
    let rt = f.runtime();
    let s = rt.view().status("job").unwrap();
    assert_eq!(
        (s.phase, s.last_exit, s.notes.len()),
        (Phase::Exited, Some(Exit::Code(3)), 0),
        "{s:?}"
    );
    drop(rt);
    *f.vol.0.lock().unwrap() = Some(f.tmp.path().join("vol"));
    let rt = f.runtime();
    assert_eq!(rt.view().status("job").unwrap().phase, Phase::Exited);
    assert_eq!(spawned(&f), 1);
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
    // The packaged agent runs with UMask=0077 (its unit, and main() sets
    // it): the real engines run under it here too, so a path an engine
    // needs that is left to the umask fails here, not first on a node.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
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
        "{} is missing: build it first (cargo build --workspace --bins; scripts/test builds them)",
        shim.display()
    );
    shim
}

/// The runtime on the fixture with the real launcher (`shim`, keeping a
/// warm shim as the agent does by default) and a directory standing in
/// for the cgroup tree (T1 on the host).
fn real_runtime(f: &Fix, shim: &Path) -> EngineRuntime {
    let launcher = launch::Launcher::new(shim).with_warm_shim();
    launcher.warm_up().unwrap();
    EngineRuntime::start(
        f.cfg.clone(),
        Arc::new(DirCg(f.tmp.path().join("cgroup"))),
        Arc::new(ShimSpawner(launcher)),
        f.vol.clone(),
    )
    .unwrap()
}

/// Writes an OCI archive holding only /bin/busybox into the inbox as
/// `bb.tar`.
fn write_busybox_image(f: &Fix) {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let archive = oci_archive(&[("bin/busybox", &busybox, 0o755)], serde_json::Value::Null);
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
    let mut rt = real_runtime(&f, &shim);
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
    // Its confinement as the shim reported it: seccomp, and Landlock at
    // the ABI this kernel offers (the ruleset asks for 6: full from 6).
    let c = view.status("bb").unwrap().confinement.expect("confinement");
    assert!(c.seccomp, "{c:?}");
    let want = match c.landlock_abi {
        0 => "none",
        1..=5 => "partial",
        _ => "full",
    };
    assert_eq!(c.landlock, want, "{c:?}");
    println!("confinement: {c:?}");
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

/// Host pids of the processes in the pid namespace `pid` heads.
fn in_pid_ns_of(pid: u32) -> Vec<u32> {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| std::fs::read_link(format!("/proc/{p}/ns/pid")).is_ok_and(|n| n == ns))
        .collect()
}

/// T1 (root, busybox, the shim built): the first restart is made by the
/// shim in place (same instance and shim pid, the old engine's leftovers
/// killed, /tmp kept) and reported as a restart; a later exit goes
/// through the agent's schedule as before (a new instance).
#[test]
#[ignore = "needs root, /bin/busybox (busybox-static) and the engine shim (cargo build --workspace --bins)"]
fn real_first_restart_is_made_in_place_by_the_shim() {
    let shim = real_shim();
    let f = fixture(false);
    write_busybox_image(&f);
    let mut rt = real_runtime(&f, &shim);
    let script = "if [ -e /var/lib/app/third ]; then echo third; exec /bin/busybox sleep 1000; fi; \
                  if [ -e /tmp/ran ]; then echo second; /bin/busybox touch /var/lib/app/third; exec /bin/busybox sleep 1000; fi; \
                  /bin/busybox touch /tmp/ran; /bin/busybox sleep 1000 & echo first; exit 3";
    rt.deploy(
        "bb",
        "bb.tar",
        &spec(&format!(
            "command = [\"/bin/busybox\", \"sh\", \"-c\", {script:?}]\n\
             data_dirs = [\"var/lib/app\"]\n\
             [restart]\npolicy = \"on-failure\"\ninitial = \"1ms\"\n"
        )),
    )
    .unwrap();
    let shim_pid = rt.start("bb").unwrap().pid.expect("the shim's pid");
    let view = rt.view();
    let logged = |want: &[u8]| {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let l = view.logs("bb", 0, 100).unwrap();
            if l.iter().any(|r| r.text == want) {
                return;
            }
            assert!(Instant::now() < end, "timed out; log so far {l:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    logged(b"second");
    let st = until(&rt, "bb", |s| s.restarts == 1 && s.phase == Phase::Ready);
    assert_eq!(st.pid, Some(shim_pid), "the same shim: restarted in place");
    assert_eq!(st.last_exit, Some(Exit::Code(3)));
    // The shim and the new engine only: the old one's background sleep
    // was killed before the new engine started. (The new engine's shell
    // runs `touch` before it execs its sleep: wait for that to settle; a
    // surviving leftover keeps the count at 3 and fails.)
    let end = Instant::now() + Duration::from_secs(10);
    let procs = loop {
        let procs = in_pid_ns_of(shim_pid);
        if procs.len() == 2 || Instant::now() > end {
            break procs;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(procs.len(), 2, "shim and engine only: {procs:?}");
    let kinds: Vec<String> = view.events(0, 100).into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            "started",
            "ready",
            "exited",
            "backing-off",
            "restarted",
            "started",
            "ready"
        ],
        "the events of a restart, one instance"
    );
    // The shim respawns once: the next exit ends it, and the agent's
    // schedule restarts the engine as a new instance.
    let engine = *procs.iter().find(|p| **p != shim_pid).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(engine as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    logged(b"third");
    let st = until(&rt, "bb", |s| s.restarts == 2 && s.phase == Phase::Ready);
    assert_ne!(st.pid, Some(shim_pid), "a new instance");
    assert_eq!(st.last_exit, Some(Exit::Signal(9)));
    let kinds: Vec<String> = view.events(0, 100).into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds[7..],
        ["exited", "backing-off", "restarted", "started", "ready"]
    );
    // A stop ends the new one, and nothing restarts it.
    rt.stop("bb", None).unwrap();
    let st = until(&rt, "bb", |s| s.phase == Phase::Stopped);
    assert_eq!(st.restarts, 2);
}

/// T1: a respawn made while no agent runs is told to the next agent,
/// which reads the shim's records when it re-adopts the instance.
#[test]
#[ignore = "needs root, /bin/busybox (busybox-static) and the engine shim (cargo build --workspace --bins)"]
fn real_respawn_while_no_agent_runs_is_read_on_adoption() {
    let shim = real_shim();
    let f = fixture(false);
    write_busybox_image(&f);
    let start = || real_runtime(&f, &shim);
    let data = f.tmp.path().join("vol/engines/bb/data/var/lib/app");
    let script = "if [ -e /tmp/ran ]; then /bin/busybox touch /var/lib/app/second; exec /bin/busybox sleep 1000; fi; \
                  /bin/busybox touch /tmp/ran; while [ ! -e /var/lib/app/go ]; do /bin/busybox sleep 0.02; done; exit 3";
    let mut rt = start();
    deploy_bb_script(
        &mut rt,
        script,
        "policy = \"on-failure\"\ninitial = \"1ms\"",
    );
    let shim_pid = rt.start("bb").unwrap().pid.unwrap();
    until(&rt, "bb", |s| s.phase == Phase::Ready);
    drop(rt);
    std::fs::write(data.join("go"), b"").unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !data.join("second").exists() {
        assert!(Instant::now() < end, "no respawn without an agent");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rt = start();
    let st = until(&rt, "bb", |s| s.restarts == 1 && s.phase == Phase::Ready);
    assert_eq!(st.pid, Some(shim_pid), "re-adopted, restarted in place");
    assert_eq!(st.last_exit, Some(Exit::Code(3)));
    let kinds = event_kinds(&rt);
    assert!(
        kinds.ends_with(&[
            "exited".to_string(),
            "backing-off".into(),
            "restarted".into(),
            "started".into(),
            "ready".into()
        ]),
        "{kinds:?}"
    );
    // Nothing left running after the test.
    rt.stop("bb", None).unwrap();
    until(&rt, "bb", |s| s.phase == Phase::Stopped);
}

/// T1: with systemd's descriptor store (a stand-in), an engine that says
/// READY=1 while no agent runs and then exits — the shim restarts it in
/// place, and the new engine says nothing — is not taken as ready by the
/// next agent: the old engine's READY=1, waiting in the kept socket, is
/// discarded, and the new engine's ready timeout acts.
#[test]
#[ignore = "needs root, /bin/busybox (busybox-static), socat and the engine shim (cargo build --workspace --bins)"]
fn real_ready_of_an_engine_that_exited_while_no_agent_ran_is_not_the_new_ones() {
    use std::os::unix::net::UnixDatagram;
    let shim = real_shim();
    let mut f = fixture(false);
    write_busybox_socat_image(&f);
    let systemd_path = f.tmp.path().join("systemd-notify");
    let systemd = UnixDatagram::bind(&systemd_path).unwrap();
    f.cfg.fdstore = Arc::new(crate::fdstore::FdStore::to_socket(
        &systemd_path,
        Default::default(),
    ));
    let data = f.tmp.path().join("vol/engines/bb/data/var/lib/app");
    let script = "B=/bin/busybox; if [ -e /tmp/ran ]; then $B touch /var/lib/app/second; exec $B sleep 1000; fi; \
                  $B touch /tmp/ran; while [ ! -e /var/lib/app/go ]; do $B sleep 0.02; done; \
                  echo -n READY=1 | /usr/bin/socat - UNIX-SENDTO:$NOTIFY_SOCKET && $B touch /var/lib/app/sent; exit 3";
    let text = format!(
        "command = [\"/bin/busybox\", \"sh\", \"-c\", {script:?}]\n\
         data_dirs = [\"var/lib/app\"]\n\
         stop_grace = \"0ms\"\n\
         [heartbeat]\nenabled = true\nready_timeout = \"2s\"\n\
         [restart]\npolicy = \"on-failure\"\ninitial = \"1ms\"\n"
    );
    let mut rt = real_runtime(&f, &shim);
    rt.deploy("bb", "bbs.tar", &spec(&text)).unwrap();
    let shim_pid = rt.start("bb").unwrap().pid.unwrap();
    // What systemd would hold: the stored copy of the socket.
    let mut kept = None;
    let end = Instant::now() + Duration::from_secs(10);
    while kept.is_none() {
        assert!(Instant::now() < end, "the socket was not stored");
        match crate::fdstore::received(&systemd) {
            Some((t, mut fds)) if t.starts_with("FDSTORE=1\n") => {
                kept = Some((
                    t.trim_start_matches("FDSTORE=1\nFDNAME=").to_owned(),
                    fds.remove(0),
                ))
            }
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let (name, kept) = kept.unwrap();
    assert_eq!(rt.view().status("bb").unwrap().phase, Phase::Running);
    drop(rt);
    std::fs::write(data.join("go"), b"").unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !data.join("second").exists() {
        assert!(Instant::now() < end, "no respawn without an agent");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        data.join("sent").exists(),
        "the old engine's READY=1 was refused"
    );
    f.cfg.fdstore = Arc::new(crate::fdstore::FdStore::to_socket(
        &systemd_path,
        std::collections::BTreeMap::from([(name, kept)]),
    ));
    let mut rt = real_runtime(&f, &shim);
    let st = until_longer(&rt, "bb", |s| s.restarts >= 2);
    let kinds = event_kinds(&rt);
    assert!(kinds.iter().any(|k| k == "ready-timeout"), "{kinds:?}");
    assert!(
        !kinds.iter().any(|k| k == "ready"),
        "the old engine's READY=1 taken for the new one's: {kinds:?}"
    );
    assert!(st.pid.is_some());
    let _ = shim_pid;
    rt.stop("bb", None).unwrap();
    until(&rt, "bb", |s| s.phase == Phase::Stopped);
}

/// Deploys `bb` (the busybox image) running `sh -c script`, with the data
/// dir `/var/lib/app` and `restart` as its `[restart]` table's lines.
fn deploy_bb_script(rt: &mut EngineRuntime, script: &str, restart: &str) {
    rt.deploy(
        "bb",
        "bb.tar",
        &spec(&format!(
            "command = [\"/bin/busybox\", \"sh\", \"-c\", {script:?}]\n\
             data_dirs = [\"var/lib/app\"]\n\
             [restart]\n{restart}\n"
        )),
    )
    .unwrap();
}

/// T1: an engine that ended by itself while no agent ran, with a policy
/// that does not restart it, is read from its shim's record by the next
/// agent and left exited with its code; the agent after that (same boot)
/// leaves it so too.
#[test]
#[ignore = "root: needs the real shim, namespaces and cgroups (--include-ignored)"]
fn real_exit_while_no_agent_runs_is_not_restarted_by_never() {
    let shim = real_shim();
    let f = fixture(false);
    write_busybox_image(&f);
    let start = || real_runtime(&f, &shim);
    let data = f.tmp.path().join("vol/engines/bb/data/var/lib/app");
    let script = "while [ ! -e /var/lib/app/go ]; do /bin/busybox sleep 0.02; done; exit 7";
    let mut rt = start();
    deploy_bb_script(&mut rt, script, "policy = \"never\"");
    let shim_pid = rt.start("bb").unwrap().pid.unwrap();
    until(&rt, "bb", |s| s.phase == Phase::Ready);
    drop(rt);
    std::fs::write(data.join("go"), b"").unwrap();
    // The shim records the exit (then ends; a zombie of this test process).
    let run = f.cfg.run_dir.join("bb");
    let end = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .any(|d| std::fs::metadata(d.path().join("exit.json")).is_ok_and(|m| m.len() > 0))
    {
        assert!(Instant::now() < end, "no exit recorded by shim {shim_pid}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // And ended (it writes the record, then exits): an agent starting in
    // between adopts it running and sees its exit a moment later, which
    // the reads below would not wait for (failed once so, under load).
    let ended = || {
        std::fs::read_to_string(format!("/proc/{shim_pid}/stat")).map_or(true, |st| {
            st.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    while !ended() {
        assert!(Instant::now() < end, "shim {shim_pid} did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    for round in 0..2 {
        let rt = start();
        let s = rt.view().status("bb").unwrap();
        assert_eq!(s.phase, Phase::Exited, "round {round}: {s:?}");
        assert_eq!(s.last_exit, Some(Exit::Code(7)), "round {round}");
        assert_eq!(s.pid, None, "round {round}");
        drop(rt);
    }
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
    let mut rt = real_runtime(&f, &shim);
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
    let start = || real_runtime(&f, &shim);
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

// ------------------------------------------------ probes, heartbeat, secrets

struct FakeSecrets(BTreeMap<String, Vec<u8>>);

impl SecretSource for FakeSecrets {
    fn exists(&self, name: &str) -> Result<bool, String> {
        Ok(self.0.contains_key(name))
    }
    fn open(&self, name: &str) -> Result<SecretBytes, String> {
        self.0
            .get(name)
            .map(|b| SecretBytes::new(b.clone()))
            .ok_or_else(|| format!("no secret named {name:?}"))
    }
}

impl Fix {
    fn runtime_with_secrets(&self, secrets: &[(&str, &[u8])]) -> EngineRuntime {
        EngineRuntime::start_with(
            self.cfg.clone(),
            self.cg.clone(),
            self.sp.clone(),
            self.vol.clone(),
            Arc::new(FakeSecrets(
                secrets
                    .iter()
                    .map(|(n, b)| ((*n).to_owned(), b.to_vec()))
                    .collect(),
            )),
        )
        .unwrap()
    }
}

/// Probes run once the engine is ready, their results show in `status`,
/// and a probe failing `threshold` times in a row restarts the engine.
#[test]
fn probes_run_show_in_status_and_failing_ones_restart_the_engine() {
    let f = fixture(false);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut rt = f.runtime();
    rt.deploy(
        "web",
        "app.tar",
        &spec(&format!(
            "command = [\"/bin/app\"]\n\
             [[probes]]\nexec = [\"/bin/app\", \"check\"]\ninterval = \"100ms\"\ntimeout = \"50ms\"\nthreshold = 2\n\
             [[probes]]\ntcp = {port}\ninterval = \"100ms\"\ntimeout = \"50ms\"\n"
        )),
    )
    .unwrap();
    let s = rt.view().status("web").unwrap();
    assert_eq!(s.probes.len(), 2);
    assert_eq!(s.probes[0].probe, "exec /bin/app check");
    assert_eq!(s.probes[1].probe, format!("tcp {port}"));
    assert_eq!(s.probes[0].ok, None, "not run before the engine runs");
    rt.start("web").unwrap();
    let s = until(&rt, "web", |s| s.probes.iter().all(|p| p.ok == Some(true)));
    assert_eq!(s.probes[0].detail.as_deref(), Some("exit code 0"));
    assert_eq!(s.probes[1].detail.as_deref(), Some("connected"));
    assert_eq!(
        f.sp.probes_run.lock().unwrap()[0],
        vec!["/bin/app".to_owned(), "check".to_owned()]
    );
    // The exec probe starts failing: after two in a row the engine is
    // restarted (SIGTERM to the first instance, a second spawn).
    *f.sp.probe_exit.lock().unwrap() = Some(launch::ProbeExit::Code(3));
    let s = until(&rt, "web", |s| {
        s.probes[0].ok == Some(false) && s.probes[0].failures >= 1
    });
    assert_eq!(s.probes[0].detail.as_deref(), Some("exit code 3"));
    until(&rt, "web", |s| s.restarts >= 1);
    assert!(f.sp.spawned.lock().unwrap().len() >= 2);
    let first = f.sp.spawned.lock().unwrap()[0].2.clone();
    assert!(first.signals.lock().unwrap().contains(&Signal::SIGTERM));
    let kinds = event_kinds(&rt);
    assert!(kinds.iter().any(|k| k == "probe-failed"), "{kinds:?}");
    // The tcp probe fails once nothing listens.
    drop(listener);
    until(&rt, "web", |s| s.probes[1].ok == Some(false));
    rt.stop("web", Some(Duration::ZERO)).unwrap();
}

/// With `heartbeat.enabled` the instance gets its own notify socket: the
/// engine is `running` until `READY=1` arrives on it from the engine's
/// uid, and a missed `WATCHDOG=1` makes it failed.
#[test]
fn heartbeat_comes_from_the_instances_socket_and_the_watchdog_acts() {
    let mut f = fixture(false);
    // The engine's uid is this process's, so the test can send as it.
    f.cfg.uid_base = nix::unistd::getuid().as_raw();
    let mut rt = f.runtime();
    rt.deploy(
        "web",
        "app.tar",
        &spec(
            "command = [\"/bin/app\"]\n\
             [heartbeat]\nenabled = true\nwatchdog = \"300ms\"\n",
        ),
    )
    .unwrap();
    rt.start("web").unwrap();
    let s = until(&rt, "web", |s| s.pid.is_some());
    assert_eq!(s.phase, Phase::Running, "not ready before READY=1");
    let (ls, run_dir, _) = f.sp.spawned.lock().unwrap()[0].clone();
    let env: BTreeMap<_, _> = ls.env.iter().cloned().collect();
    assert_eq!(
        env.get("NOTIFY_SOCKET").map(String::as_str),
        Some("/run/leasehold-notify/notify")
    );
    assert_eq!(env.get("WATCHDOG_USEC").map(String::as_str), Some("300000"));
    let dir = ls.notify_dir.clone().unwrap();
    assert_eq!(dir, run_dir.join("notify"));
    let sock = dir.join(launch::NOTIFY_NAME);
    let c = std::os::unix::net::UnixDatagram::unbound().unwrap();
    c.send_to(b"STATUS=warming up", &sock).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rt.view().status("web").unwrap().phase, Phase::Running);
    c.send_to(b"READY=1", &sock).unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    // Pings keep it ready past several watchdog periods.
    let published = || rt.published.load(std::sync::atomic::Ordering::Relaxed);
    let before = published();
    let end = Instant::now() + Duration::from_millis(900);
    let mut pings = 0;
    while Instant::now() < end {
        c.send_to(b"WATCHDOG=1", &sock).unwrap();
        pings += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rt.view().status("web").unwrap().restarts, 0);
    // A ping that changes nothing shown publishes nothing (every engine's
    // status was rebuilt for each before).
    let during = published() - before;
    assert!(
        pings >= 8 && during <= 2,
        "{during} publications for {pings} pings"
    );
    // Silence: the watchdog expires and the engine is restarted.
    until(&rt, "web", |s| s.restarts >= 1);
    let kinds = event_kinds(&rt);
    assert!(kinds.iter().any(|k| k == "watchdog-expired"), "{kinds:?}");
    // The first instance's socket went with it; the new one has its own.
    let second = f.sp.spawned.lock().unwrap()[1]
        .0
        .notify_dir
        .clone()
        .unwrap();
    assert_ne!(second, dir);
    rt.stop("web", Some(Duration::ZERO)).unwrap();
}

/// An engine sends `READY=1` once: a re-adopted instance is ready only if
/// its engine said so to an earlier agent (the run directory's mark). One
/// adopted before its `READY=1` waits for it on the new socket, within
/// `heartbeat.ready_timeout` from the adoption (before 2026-12-07 it was
/// taken as ready).
/// Deploys and starts `web` with a heartbeat and `ready_timeout`; its
/// instance runs, not yet ready. Returns the runtime and the run dir.
fn start_heartbeat_web(f: &Fix, ready_timeout: &str) -> (EngineRuntime, PathBuf) {
    let hb = format!(
        "command = [\"/bin/app\"]\n[heartbeat]\nenabled = true\nready_timeout = \"{ready_timeout}\"\n"
    );
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(&hb)).unwrap();
    rt.start("web").unwrap();
    let s = until(&rt, "web", |s| s.pid.is_some());
    assert_eq!(s.phase, Phase::Running);
    let (_, run_dir, _) = f.sp.spawned.lock().unwrap()[0].clone();
    (rt, run_dir)
}

#[test]
fn a_readopted_instance_is_ready_only_if_its_engine_said_so() {
    let mut f = fixture(false);
    // The engine's uid is this process's, so the test can send as it.
    f.cfg.uid_base = nix::unistd::getuid().as_raw();
    let (rt, run_dir) = start_heartbeat_web(&f, "1s");
    assert!(run_dir.join(notify::READY_RECORDED).exists());
    assert!(!run_dir.join(notify::READY_MARK).exists());
    drop(rt);
    // Adopted before its READY=1: running, and the new socket hears it.
    // (A start of a running engine changes nothing, and its answer comes
    // after whatever the adoption queued: one queue.)
    let mut rt = f.runtime();
    let s = rt.start("web").unwrap();
    assert!(s.pid.is_some());
    assert_eq!(s.phase, Phase::Running, "not ready before READY=1");
    let sock = run_dir.join("notify").join(launch::NOTIFY_NAME);
    let c = std::os::unix::net::UnixDatagram::unbound().unwrap();
    c.send_to(b"READY=1", &sock).unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    assert!(run_dir.join(notify::READY_MARK).exists(), "recorded");
    drop(rt);
    // Adopted after it: ready with nothing sent.
    let rt = f.runtime();
    let s = until(&rt, "web", |s| s.phase == Phase::Ready);
    assert_eq!(s.restarts, 0);
    drop(rt);
    // Adopted before it, and it never comes: the ready timeout acts
    // (taken as ready, it never would).
    std::fs::remove_file(run_dir.join(notify::READY_MARK)).unwrap();
    let rt = f.runtime();
    until(&rt, "web", |s| s.restarts >= 1);
    let kinds = event_kinds(&rt);
    assert!(kinds.iter().any(|k| k == "ready-timeout"), "{kinds:?}");
    assert!(!kinds.iter().any(|k| k == "ready"), "{kinds:?}");
    let mut rt = rt;
    rt.stop("web", Some(Duration::ZERO)).unwrap();
}

/// With systemd's descriptor store (a stand-in here: its notify socket,
/// read by the test), the instance's notify socket outlives the agent: a
/// `READY=1` the engine sends while no agent runs waits in it (before the
/// store: refused, and the engine restarted at `ready_timeout`), and the
/// next agent, given the socket back, hears it — ready with nothing sent
/// again. The store drops the socket as the instance ends; a socket kept
/// for an instance that is gone is released at the next start.
#[test]
fn a_ready_sent_while_no_agent_runs_waits_in_the_kept_socket() {
    use std::os::unix::net::UnixDatagram;
    let mut f = fixture(false);
    f.cfg.uid_base = nix::unistd::getuid().as_raw();
    let systemd_path = f.tmp.path().join("systemd-notify");
    let systemd = UnixDatagram::bind(&systemd_path).unwrap();
    let store = |passed| Arc::new(crate::fdstore::FdStore::to_socket(&systemd_path, passed));
    f.cfg.fdstore = store(Default::default());
    let (rt, run_dir) = start_heartbeat_web(&f, "60s");
    let name = crate::fdstore::notify_name(&run_dir).unwrap();
    // Whatever the store held under the name goes first (a socket bound
    // at the same path before: not this one).
    let (text, _) = crate::fdstore::received(&systemd).expect("cleared");
    assert_eq!(text, format!("FDSTOREREMOVE=1\nFDNAME={name}"));
    let (text, mut fds) = crate::fdstore::received(&systemd).expect("stored");
    assert_eq!(text, format!("FDSTORE=1\nFDNAME={name}"));
    assert_eq!(fds.len(), 1);
    let kept = fds.remove(0);
    drop(rt);
    assert!(
        crate::fdstore::received(&systemd).is_none(),
        "an agent going away keeps its engines' sockets stored"
    );
    // No agent: the engine says READY=1 (once), into the kept socket.
    let sock = run_dir.join("notify").join(launch::NOTIFY_NAME);
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"READY=1", &sock)
        .expect("heard by no agent, but kept");
    // The next agent, given it back by name (and one of an instance that
    // is gone): ready from what waited, nothing sent again.
    let (gone, _) = UnixDatagram::pair().unwrap();
    f.cfg.fdstore = store(std::collections::BTreeMap::from([
        (name.clone(), kept),
        ("notify/run/gone/i9".to_owned(), gone.into()),
    ]));
    let mut rt = f.runtime();
    let s = until(&rt, "web", |s| s.phase == Phase::Ready);
    assert_eq!(s.restarts, 0);
    assert!(run_dir.join(notify::READY_MARK).exists(), "recorded");
    // The socket of an instance that is gone released (the runtime
    // thread), the kept one out of the store once READY=1 is heard (the
    // I/O thread: either order), never stored twice.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 && Instant::now() < deadline {
        match crate::fdstore::received(&systemd) {
            Some((t, _)) => {
                seen.insert(t);
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert_eq!(
        seen,
        std::collections::BTreeSet::from([
            "FDSTOREREMOVE=1\nFDNAME=notify/run/gone/i9".to_owned(),
            format!("FDSTOREREMOVE=1\nFDNAME={name}"),
        ])
    );
    assert!(crate::fdstore::received(&systemd).is_none());
    // Its end drops it from the store.
    rt.stop("web", Some(Duration::ZERO)).unwrap();
    until(&rt, "web", |s| s.pid.is_none());
    assert_eq!(
        crate::fdstore::received(&systemd).map(|(t, _)| t),
        Some(format!("FDSTOREREMOVE=1\nFDNAME={name}"))
    );
}

/// Secrets named in the spec must be stored at deploy (a missing one is
/// named), are opened at each launch and handed to the launcher only: the
/// state file holds their names, never their bytes.
#[test]
fn secrets_are_opened_at_launch_and_never_recorded() {
    let f = fixture(false);
    let mut rt = f.runtime_with_secrets(&[("db", b"hunter2"), ("tls.key", b"-----KEY-----")]);
    let e = rt
        .deploy(
            "web",
            "app.tar",
            &spec("command = [\"/bin/app\"]\nsecrets = [\"db\", \"api-token\"]\n"),
        )
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Invalid);
    assert!(e.message.contains("secrets: [1] \"api-token\""), "{e}");
    assert!(
        !f.tmp.path().join("vol/engines/web").exists(),
        "nothing unpacked"
    );
    rt.deploy(
        "web",
        "app.tar",
        &spec("command = [\"/bin/app\"]\nsecrets = [\"tls.key\", \"db\"]\n"),
    )
    .unwrap();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.pid.is_some());
    let given = f.sp.secrets_given.lock().unwrap().clone();
    assert_eq!(
        given,
        vec![vec![b"-----KEY-----".to_vec(), b"hunter2".to_vec()]]
    );
    let ls = f.sp.spawned.lock().unwrap()[0].0.clone();
    assert_eq!(ls.secrets, vec!["tls.key".to_owned(), "db".to_owned()]);
    assert!(ls.env.iter().all(|(_, v)| !v.contains("hunter2")));
    let state = std::fs::read(f.cfg.state_dir.join(STATE_FILE)).unwrap();
    assert!(!state.windows(7).any(|w| w == b"hunter2"));
    rt.stop("web", Some(Duration::ZERO)).unwrap();
}

/// A secret removed after deploy: the launch fails naming it, nothing is
/// spawned.
#[test]
fn a_secret_gone_at_launch_fails_the_launch_naming_it() {
    let f = fixture(false);
    let mut rt = f.runtime_with_secrets(&[("db", b"x")]);
    rt.deploy(
        "web",
        "app.tar",
        &spec("command = [\"/bin/app\"]\nsecrets = [\"db\"]\n[restart]\npolicy = \"never\"\n"),
    )
    .unwrap();
    drop(rt);
    let mut rt = f.runtime_with_secrets(&[]);
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Exited);
    assert!(f.sp.spawned.lock().unwrap().is_empty());
    let ev = rt.view().events(0, 100);
    let failed = ev.iter().find(|e| e.kind == "launch-failed").unwrap();
    assert!(failed.detail.contains("secrets[0] \"db\""), "{failed:?}");
}

/// An OCI archive with busybox and `socat` (with the libraries `ldd`
/// names, at their host paths) as `bbs.tar`: socat sends the engine's
/// `READY=1` as a real sd_notify client would.
fn write_busybox_socat_image(f: &Fix) {
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("bin/busybox".into(), std::fs::read("/bin/busybox").unwrap()),
        (
            "usr/bin/socat".into(),
            std::fs::read("/usr/bin/socat").unwrap(),
        ),
    ];
    let ldd = std::process::Command::new("ldd")
        .arg("/usr/bin/socat")
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(str::to_owned);
        if let Some(p) = path {
            files.push((
                p.trim_start_matches('/').to_owned(),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
    let entries: Vec<(&str, &[u8], u32)> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice(), 0o755))
        .collect();
    let archive = oci_archive(&entries, serde_json::Value::Null);
    std::fs::write(f.tmp.path().join("vol/engines/inbox/bbs.tar"), archive).unwrap();
}

/// T1 (root, busybox, socat, the shim built): through the real launcher
/// and shim, a secret appears as a 0400 file of the engine's uid on its
/// private tmpfs (not in its environment, not in the state or run
/// directory); `READY=1` sent by socat inside the engine reaches the
/// agent through the bind-mounted notify socket; an `exec` probe runs in
/// the engine's mount namespace as its uid (it sees the engine's private
/// /tmp), and once it fails twice in a row the engine is restarted.
#[test]
#[ignore = "needs root, /bin/busybox (busybox-static), /usr/bin/socat and the engine shim (cargo build --workspace --bins)"]
fn real_shim_secrets_heartbeat_and_exec_probe() {
    let shim = real_shim();
    let f = fixture(false);
    write_busybox_socat_image(&f);
    let mut rt = EngineRuntime::start_with(
        f.cfg.clone(),
        Arc::new(DirCg(f.tmp.path().join("cgroup"))),
        Arc::new(ShimSpawner(launch::Launcher::new(shim).with_warm_shim())),
        f.vol.clone(),
        Arc::new(FakeSecrets(
            [("db".to_owned(), b"hunter2".to_vec())]
                .into_iter()
                .collect(),
        )),
    )
    .unwrap();
    let script = "B=/bin/busybox; \
        echo secret=$($B cat /run/secrets/db) mode=$($B stat -c %a:%u /run/secrets/db); \
        $B env | $B grep -q \"$($B cat /run/secrets/db)\" && echo secret-in-env; \
        $B touch /tmp/healthy; \
        echo -n READY=1 | /usr/bin/socat - UNIX-SENDTO:$NOTIFY_SOCKET || echo socat-failed; \
        while [ ! -e /var/lib/app/sick ]; do $B sleep 0.02; done; \
        $B rm /tmp/healthy; exec $B sleep 1000";
    let text = format!(
        "command = [\"/bin/busybox\", \"sh\", \"-c\", {script:?}]\n\
         data_dirs = [\"var/lib/app\"]\n\
         secrets = [\"db\"]\n\
         stop_grace = \"0ms\"\n\
         [heartbeat]\nenabled = true\n\
         [[probes]]\n\
         exec = [\"/bin/busybox\", \"sh\", \"-c\", \"[ $(/bin/busybox id -u) = 200000 ] && [ -e /tmp/healthy ]\"]\n\
         interval = \"200ms\"\ntimeout = \"150ms\"\nthreshold = 2\n"
    );
    rt.deploy("bb", "bbs.tar", &spec(&text)).unwrap();
    rt.start("bb").unwrap();
    let s = until_longer(&rt, "bb", |s| s.phase == Phase::Ready);
    assert_eq!(s.restarts, 0);
    let view = rt.view();
    let out: Vec<String> = view
        .logs("bb", 0, 100)
        .unwrap()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.text).into_owned())
        .collect();
    assert!(
        out.contains(&"secret=hunter2 mode=400:200000".to_owned()),
        "{out:?}"
    );
    assert!(
        !out.iter()
            .any(|l| l == "secret-in-env" || l == "socat-failed"),
        "{out:?}"
    );
    // The probe passes inside the engine (its /tmp, its uid).
    let s = until_longer(&rt, "bb", |s| s.probes[0].ok == Some(true));
    assert_eq!(s.probes[0].detail.as_deref(), Some("exit code 0"));
    assert!(
        !Path::new("/tmp/healthy").exists(),
        "the host's /tmp must not satisfy it"
    );
    // Nothing of the secret outside the engine's tmpfs.
    let state = std::fs::read(f.cfg.state_dir.join(STATE_FILE)).unwrap();
    assert!(!state.windows(7).any(|w| w == b"hunter2"));
    let mut stack = vec![f.cfg.run_dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let b = std::fs::read(e.path()).unwrap();
                assert!(!b.windows(7).any(|w| w == b"hunter2"), "{:?}", e.path());
            }
        }
    }
    // Unhealthy: two failed probes in a row restart it.
    std::fs::write(
        f.tmp.path().join("vol/engines/bb/data/var/lib/app/sick"),
        b"",
    )
    .unwrap();
    let s = until_longer(&rt, "bb", |s| s.restarts >= 1);
    assert!(s.probes[0].failures <= 2);
    let ev = view.events(0, 200);
    let pf = ev.iter().find(|e| e.kind == "probe-failed").unwrap();
    assert!(pf.detail.contains("probes[0] failed"), "{pf:?}");
    rt.stop("bb", Some(Duration::ZERO)).unwrap();
    until_longer(&rt, "bb", |s| s.phase == Phase::Stopped);
}

/// T1 (root, busybox, the shim built): the real `exec` probe reports the
/// command's exit code, is held to its timeout (the command killed), and
/// names why it could not run; prints how long one probe takes.
#[test]
#[ignore = "needs root, /bin/busybox (busybox-static) and the engine shim (cargo build --workspace --bins)"]
fn real_exec_probe_codes_timeout_and_reasons() {
    let shim = real_shim();
    let f = fixture(false);
    write_busybox_image(&f);
    let mut rt = real_runtime(&f, &shim);
    rt.deploy(
        "bb",
        "bb.tar",
        &spec("command = [\"/bin/busybox\", \"sleep\", \"1000\"]\nstop_grace = \"0ms\"\n"),
    )
    .unwrap();
    rt.start("bb").unwrap();
    // Probed once confined (the shim's report written): a probe before
    // that is refused (its own test), and under load the engine's pid
    // shows before the report does.
    until(&rt, "bb", |s| s.pid.is_some() && s.confinement.is_some());
    let run = std::fs::read_dir(f.cfg.run_dir.join("bb"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let l = launch::Launcher::new(shim);
    let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let t = Duration::from_secs(2);
    let mut took = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        assert_eq!(
            l.probe(&run, &argv(&["/bin/busybox", "true"]), t),
            launch::ProbeExit::Code(0)
        );
        took.push(t0.elapsed());
    }
    took.sort();
    println!(
        "exec probe (busybox true): median {:?}, max {:?}",
        took[5], took[9]
    );
    assert_eq!(
        l.probe(&run, &argv(&["/bin/busybox", "sh", "-c", "exit 3"]), t),
        launch::ProbeExit::Code(3)
    );
    // Its hostname is the engine's (uts namespace entered).
    assert_eq!(
        l.probe(
            &run,
            &argv(&[
                "/bin/busybox",
                "sh",
                "-c",
                "[ $(/bin/busybox hostname) = bb ]"
            ]),
            t
        ),
        launch::ProbeExit::Code(0)
    );
    let t0 = Instant::now();
    assert_eq!(
        l.probe(
            &run,
            &argv(&["/bin/busybox", "sleep", "5"]),
            Duration::from_millis(200)
        ),
        launch::ProbeExit::TimedOut
    );
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t0.elapsed()
    );
    match l.probe(&run, &argv(&["/bin/nothere"]), t) {
        launch::ProbeExit::NotRun(r) => assert!(r.contains("/bin/nothere"), "{r}"),
        other => panic!("{other:?}"),
    }
    // A run directory whose shim is gone is refused, not entered.
    let gone = f.tmp.path().join("gone");
    std::fs::create_dir_all(&gone).unwrap();
    assert!(matches!(
        l.probe(&gone, &argv(&["/bin/busybox", "true"]), t),
        launch::ProbeExit::NotRun(_)
    ));
    rt.stop("bb", Some(Duration::ZERO)).unwrap();
}

/// T1 (root, busybox, the shim built): the network probes reach a server
/// inside an engine on 127.0.0.1 (engines share the node's network
/// namespace): an http probe answered 200, one answered 404 (failed, with
/// the status), a tcp probe connected.
#[test]
#[ignore = "needs root, /bin/busybox (busybox-static) and the engine shim (cargo build --workspace --bins)"]
fn real_network_probes_reach_an_engines_server() {
    let shim = real_shim();
    let f = fixture(false);
    write_busybox_image(&f);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut rt = real_runtime(&f, &shim);
    let text = format!(
        "command = [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"127.0.0.1:{port}\", \"-h\", \"/srv/www\"]\n\
         data_dirs = [\"srv/www\"]\n\
         stop_grace = \"0ms\"\n\
         [[probes]]\nhttp = {{ port = {port}, path = \"/ok.txt\" }}\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\
         [[probes]]\nhttp = {{ port = {port}, path = \"/missing\" }}\ninterval = \"200ms\"\ntimeout = \"150ms\"\nthreshold = 100\n\
         [[probes]]\ntcp = {port}\ninterval = \"200ms\"\ntimeout = \"150ms\"\n"
    );
    rt.deploy("web", "bb.tar", &spec(&text)).unwrap();
    let ok = f.tmp.path().join("vol/engines/web/data/srv/www/ok.txt");
    std::fs::write(&ok, b"ok\n").unwrap();
    // Written by root under the agent's umask (0600): readable to httpd.
    std::fs::set_permissions(&ok, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    rt.start("web").unwrap();
    let s = until_longer(&rt, "web", |s| s.probes.iter().all(|p| p.ok.is_some()));
    assert_eq!(s.probes[0].ok, Some(true), "{s:?}");
    assert_eq!(s.probes[0].detail.as_deref(), Some("HTTP status 200"));
    assert_eq!(s.probes[1].ok, Some(false));
    assert_eq!(s.probes[1].detail.as_deref(), Some("HTTP status 404"));
    assert_eq!(s.probes[2].detail.as_deref(), Some("connected"));
    assert_eq!(s.restarts, 0);
    rt.stop("web", Some(Duration::ZERO)).unwrap();
}

mod budget;
mod egress;
mod fresh_root;

/// Records the rules asked for (every launch: the node guard, and the
/// egress if any) and how many engines were spawned by then; refuses
/// every install while `fail` is set.
struct FakeEgress {
    sp: Arc<FakeSpawner>,
    calls: Mutex<Vec<(String, Option<PathBuf>, usize)>>,
    fail: bool,
}

impl EgressRules for FakeEgress {
    fn set(&self, engine: &str, rules: Option<(PathBuf, Option<Boundary>)>) -> Result<(), String> {
        let spawned = self.sp.spawned.lock().unwrap().len();
        let dir = rules.as_ref().map(|(d, _)| d.clone());
        self.calls
            .lock()
            .unwrap()
            .push((engine.to_owned(), dir, spawned));
        if self.fail && rules.is_some() {
            return Err("nft refused".into());
        }
        Ok(())
    }
}

impl Fix {
    fn runtime_with_egress(&self, egress: Arc<FakeEgress>) -> EngineRuntime {
        EngineRuntime::start_full(
            self.cfg.clone(),
            self.cg.clone(),
            self.sp.clone(),
            self.vol.clone(),
            Arc::new(NoSecrets),
            egress,
        )
        .unwrap()
    }
}

const EGRESS_SPEC: &str = "command = [\"/bin/app\"]\n[egress]\naction = \"drop\"\n[[egress.allow]]\nname = \"db\"\npeers = [\"10.1.2.3\"]\ndirection = \"out\"\n";

/// Issue 14: an engine's egress rules, for its own cgroup (every
/// instance below it), are installed before its first instance is
/// spawned and removed at rm before its cgroup goes.
#[test]
fn egress_rules_go_in_before_the_engine_runs_and_out_at_rm() {
    let f = fixture(false);
    let eg = Arc::new(FakeEgress {
        sp: f.sp.clone(),
        calls: Mutex::default(),
        fail: false,
    });
    let mut rt = f.runtime_with_egress(eg.clone());
    rt.deploy("web", "app.tar", &spec(EGRESS_SPEC)).unwrap();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    assert_eq!(
        eg.calls.lock().unwrap().clone(),
        [(
            "web".to_owned(),
            Some(PathBuf::from("/fake-cgroup/leasehold/tenant/web")),
            0
        )],
        "installed once, for the engine's cgroup, before anything ran"
    );
    rt.stop("web", None).unwrap();
    until(&rt, "web", |s| s.phase == Phase::Stopped);
    rt.rm("web").unwrap();
    let calls = eg.calls.lock().unwrap().clone();
    assert_eq!(calls.last().unwrap().0, "web");
    assert_eq!(calls.last().unwrap().1, None, "removed at rm: {calls:?}");
}

/// A refused install fails the launch (launch-failed names the reason)
/// and nothing is spawned: the engine never runs unconfined.
#[test]
fn a_refused_egress_install_fails_the_launch_closed() {
    let f = fixture(false);
    let eg = Arc::new(FakeEgress {
        sp: f.sp.clone(),
        calls: Mutex::default(),
        fail: true,
    });
    let mut rt = f.runtime_with_egress(eg.clone());
    rt.deploy("web", "app.tar", &spec(EGRESS_SPEC)).unwrap();
    rt.start("web").unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let ev = loop {
        let evs = rt.view().events(0, 100);
        if let Some(e) = evs.into_iter().find(|e| e.kind == "launch-failed") {
            break e;
        }
        assert!(Instant::now() < end, "no launch-failed event");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        ev.detail.contains("egress rules: nft refused"),
        "{}",
        ev.detail
    );
    assert!(f.sp.spawned.lock().unwrap().is_empty(), "nothing ran");
    // Without egress in the spec the runtime still asks for the node
    // guard (docs/netpolicy.md, "The node guard"), before the spawn; a
    // refused guard fails the launch closed as well.
    for fail in [true, false] {
        let f2 = fixture(false);
        let eg2 = Arc::new(FakeEgress {
            sp: f2.sp.clone(),
            calls: Mutex::default(),
            fail,
        });
        let mut rt2 = f2.runtime_with_egress(eg2.clone());
        rt2.deploy("web", "app.tar", &spec("command = [\"/bin/app\"]\n"))
            .unwrap();
        rt2.start("web").unwrap();
        if fail {
            let end = Instant::now() + Duration::from_secs(10);
            while !rt2
                .view()
                .events(0, 100)
                .iter()
                .any(|e| e.kind == "launch-failed")
            {
                assert!(Instant::now() < end, "no launch-failed event");
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(f2.sp.spawned.lock().unwrap().is_empty(), "nothing ran");
        } else {
            until(&rt2, "web", |s| s.phase == Phase::Ready);
        }
        let calls = eg2.calls.lock().unwrap().clone();
        let web_dir = PathBuf::from("/fake-cgroup/leasehold/tenant/web");
        assert_eq!(calls.first(), Some(&("web".to_owned(), Some(web_dir), 0)));
    }
}

/// Writes `big.tar` to the inbox: an image of `files` small files
/// (seconds to unpack).
fn write_big(f: &Fix, files: usize) {
    let names: Vec<String> = (0..files).map(|i| format!("d/f{i}")).collect();
    let files: Vec<(&str, &[u8], u32)> = names
        .iter()
        .map(|n| (n.as_str(), &b"x"[..], 0o644))
        .collect();
    let big = oci_archive(&files, serde_json::json!({"Env": ["PATH=/bin"]}));
    std::fs::write(f.tmp.path().join("vol/engines/inbox/big.tar"), big).unwrap();
}

/// Sends the deploy of engine `big` from `big.tar` without waiting; the
/// answer comes on the receiver.
fn send_deploy_big(rt: &EngineRuntime) -> mpsc::Receiver<Reply> {
    let (dtx, drx) = mpsc::sync_channel(1);
    rt.tx
        .send(Msg::Cmd(
            Cmd::Deploy(
                "big".into(),
                "big.tar".into(),
                Box::new(spec(r#"command = ["/bin/app"]"#)),
            ),
            dtx,
        ))
        .unwrap();
    drx
}

/// [`write_big`] then [`send_deploy_big`].
fn deploy_big(f: &Fix, rt: &EngineRuntime, files: usize) -> mpsc::Receiver<Reply> {
    write_big(f, files);
    send_deploy_big(rt)
}

/// A stop of every engine (before an erase) stops a deploy whose image is
/// being unpacked: the deploy is refused saying why, nothing of it is
/// left, and the stop is answered by the thread (no cgroup.kill fallback).
#[test]
fn a_stop_before_an_erase_stops_an_unpack_in_progress() {
    let f = fixture(false);
    let vol = f.tmp.path().join("vol/engines");
    let mut rt = f.runtime();
    write_big(&f, 50_000);
    // The unpack has begun when it opens the archive (inotify, no sleep):
    // the stop must end it in progress, not refuse it before it starts.
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(&fd, vol.join("inbox/big.tar"), inotify::WatchFlags::OPEN).unwrap();
    let drx = send_deploy_big(&rt);
    let mut buf = [std::mem::MaybeUninit::uninit(); 1024];
    inotify::Reader::new(&fd, &mut buf).next().unwrap();
    let r = rt.stop_all(Duration::ZERO).unwrap();
    assert_eq!(r.error, None, "answered by the thread: {r:?}");
    match drx.recv_timeout(Duration::from_secs(60)) {
        Ok(Reply::Status(Err(e))) => {
            let e = e.to_string();
            assert!(e.contains("the image's unpack was stopped"), "{e}");
            assert!(e.contains("every engine is being stopped"), "{e}");
        }
        Ok(Reply::Status(Ok(s))) => panic!("deployed before the stop: {s:?}"),
        _ => panic!("no answer to the deploy"),
    }
    assert!(rt.view().status("big").is_none());
    assert!(!vol.join("big").join("v1").exists(), "nothing kept");
    // The next tenancy's deploys unpack again.
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
}

/// While a stop of every engine is on its way, tenant commands queued
/// before it are refused saying so, not carried out ahead of it; once
/// it is read, commands are carried out again.
#[test]
fn tenant_commands_queued_before_a_stop_of_every_engine_are_refused() {
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap();
    rt.abort.raise();
    let e = rt.start("web").unwrap_err().to_string();
    assert!(
        e.contains("not carried out: every engine is being stopped"),
        "{e}"
    );
    let e = rt.rm("web").unwrap_err().to_string();
    assert!(e.contains("not carried out"), "{e}");
    assert_eq!(spawned(&f), 0);
    // As the thread does when it reads that stop.
    rt.abort.lower();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    // A stop of every engine raises and lowers it once.
    rt.stop_all(Duration::from_secs(1)).unwrap();
    rt.start("web").unwrap();
}

/// The landlord's budget is set without waiting for the runtime thread,
/// here busy unpacking a tenant's image: the budget is answered, recorded
/// and on the subtree while the deploy is still unanswered.
#[test]
fn the_budget_is_set_while_the_runtime_unpacks() {
    let f = fixture(false);
    let mut rt = f.runtime();
    let drx = deploy_big(&f, &rt, 20_000);
    let b = Budget::from_toml("memory_max = \"1G\"\npids_max = 100").unwrap();
    let applied = rt.set_budget(&b).unwrap();
    assert!(applied.written, "{applied:?}");
    assert!(
        matches!(drx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the budget waited for the deploy"
    );
    assert_eq!(rt.budget().unwrap(), b);
    assert_eq!(rt.view().tenant().budget, b);
    let path = f.tmp.path().join("state").join(tenant::BUDGET_FILE);
    assert!(std::fs::read_to_string(path).unwrap().contains("pids_max"));
    match drx.recv_timeout(Duration::from_secs(120)) {
        Ok(Reply::Status(Ok(_))) => {}
        _ => panic!("the deploy did not finish"),
    }
    // The deployed engine is counted against a narrower budget.
    let narrow = Budget::from_toml("pids_max = 10").unwrap();
    let with_limits = spec("command = [\"/bin/app\"]\n[limits]\npids_max = 50");
    rt.deploy("web", "app.tar", &with_limits).unwrap();
    assert_eq!(rt.set_budget(&narrow).unwrap().engines_above, 1);
}

/// Engine ids another account owns are refused, naming the first: a user
/// or a group (NSS) in the range, or a subordinate range that overlaps
/// it; ranges that only touch it, empty ranges and malformed lines are
/// not conflicts; a lookup that fails is an error, not "no account".
#[test]
fn engine_uids_another_account_owns_are_refused() {
    let none = |_: u32| Ok(None);
    let sub = "alice:100000:65536\n# comment\nbad line\nbob:2000128:65536\nempty:2000010:0\n";
    assert_eq!(
        uid_range_conflict(2_000_000, 128, none, none, &[("/etc/subuid", sub)]),
        Ok(())
    );
    let e = uid_range_conflict(2_000_000, 129, none, none, &[("/etc/subuid", sub)]).unwrap_err();
    assert!(
        e.contains("\"bob\"'s subordinate ids 2000128..2065664 in /etc/subuid"),
        "{e}"
    );
    assert!(e.starts_with("engines.uid_base:"), "{e}");
    let e = uid_range_conflict(150_000, 128, none, none, &[("/etc/subgid", sub)]).unwrap_err();
    assert!(e.contains("\"alice\"") && e.contains("/etc/subgid"), "{e}");
    let user = |u: u32| Ok((u == 2_000_005).then(|| "svc".to_owned()));
    let e = uid_range_conflict(2_000_000, 128, user, none, &[]).unwrap_err();
    assert!(
        e.contains("uid 2000005") && e.contains("user \"svc\""),
        "{e}"
    );
    let group = |g: u32| Ok((g == 2_000_127).then(|| "ops".to_owned()));
    let e = uid_range_conflict(2_000_000, 128, none, group, &[]).unwrap_err();
    assert!(
        e.contains("gid 2000127") && e.contains("group \"ops\""),
        "{e}"
    );
    let down = |_: u32| {
        Err("engines.uid_base: cannot look up uid 2000000 in the account databases: EIO".to_owned())
    };
    let e = uid_range_conflict(2_000_000, 128, down, none, &[]).unwrap_err();
    assert!(e.contains("cannot look up"), "{e}");
}

/// Answers are awaited one after another; each waits until its own
/// deadline, set when it was sent, so a stuck runtime does not make the
/// last of many wait the bound once per answer before it.
#[test]
fn an_answer_waits_until_the_deadline_set_at_its_send() {
    let (tx, rx) = mpsc::sync_channel::<Reply>(1);
    // Past its deadline with nothing sent: refused at once.
    let t = Instant::now();
    let e = answer_by(&rx, Instant::now() - Duration::from_secs(1)).unwrap_err();
    assert!(
        e.to_string().contains("no answer within the deadline"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // An answer already there is taken even past the deadline.
    tx.send(Reply::Unit(Ok(()))).unwrap();
    assert!(answer_by(&rx, Instant::now() - Duration::from_secs(1))
        .unwrap()
        .is_none());
    // One that comes while it waits is taken.
    let late = std::thread::spawn(move || tx.send(Reply::Unit(Ok(()))).is_ok());
    assert!(answer_by(&rx, Instant::now() + Duration::from_secs(60))
        .unwrap()
        .is_none());
    assert!(late.join().unwrap());
}

#[test]
fn a_probe_label_is_cut_from_a_bounded_prefix_as_before() {
    let probe = |argv: Vec<String>| {
        serde_json::from_value::<Probe>(serde_json::json!({ "exec": argv })).unwrap()
    };
    let short = probe(vec!["/bin/check".into(), "--fast".into()]);
    assert_eq!(probe_label(&short), "exec /bin/check --fast");
    // What joining the whole argv and cutting it gave.
    let cut = |argv: &[String]| {
        let mut l = format!("exec {}", argv.join(" "));
        if l.len() > 64 {
            let mut at = 61;
            while !l.is_char_boundary(at) {
                at -= 1;
            }
            l.truncate(at);
            l.push_str("...");
        }
        l
    };
    for argv in [
        vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            "x".repeat(256 * 1024),
        ],
        vec!["é".repeat(100)],
        (0..5000).map(|i| format!("arg{i}")).collect(),
        vec!["a".repeat(60), "b".repeat(3)],
    ] {
        let l = probe_label(&probe(argv.clone()));
        assert_eq!(l, cut(&argv));
        assert!(l.len() <= 64, "{l}");
    }
}

/// A probe still running when its engine is removed, and answering after
/// an engine of the same name was deployed and started: its instance
/// number is the new one's too (they start from 1), yet its result is not
/// taken for the new engine's.
#[test]
fn a_removed_engines_late_probe_is_not_the_new_ones() {
    let f = fixture(false);
    let mut rt = f.runtime();
    let web = spec(
        "command = [\"/bin/app\"]\n\
         [[probes]]\nexec = [\"/bin/app\", \"check\"]\ninterval = \"100ms\"\ntimeout = \"50ms\"\nthreshold = 1\n",
    );
    let (tx, rx) = std::sync::mpsc::channel();
    *f.sp.probe_hold.lock().unwrap() = Some(rx);
    rt.deploy("web", "app.tar", &web).unwrap();
    rt.start("web").unwrap();
    let ran = || f.sp.probes_run.lock().unwrap().len();
    let t = Instant::now();
    while ran() == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "no probe ran");
        std::thread::yield_now();
    }
    rt.stop("web", Some(Duration::ZERO)).unwrap();
    rt.rm("web").unwrap();
    rt.deploy("web", "app.tar", &web).unwrap();
    rt.start("web").unwrap();
    let s = until(&rt, "web", |s| s.probes[0].ok == Some(true));
    assert_eq!(s.restarts, 0);
    // The old probe answers now: a failure, which with threshold 1 would
    // restart the engine it was taken for.
    tx.send(launch::ProbeExit::Code(3)).unwrap();
    let seen = ran();
    let t = Instant::now();
    while ran() < seen + 3 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the new probe stopped"
        );
        std::thread::yield_now();
    }
    let s = until(&rt, "web", |s| s.probes[0].ok.is_some());
    assert_eq!(s.probes[0].ok, Some(true), "{:?}", s.probes[0]);
    assert_eq!(s.restarts, 0, "restarted for the old engine's probe");
    let kinds: Vec<String> = rt
        .view()
        .events(0, 1000)
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(!kinds.iter().any(|k| k == "probe-failed"), "{kinds:?}");
    rt.stop("web", Some(Duration::ZERO)).unwrap();
}

/// The shim's confinement report (Landlock ABI and enforcement, seccomp)
/// is in `status` while an instance runs, also when the shim writes it
/// after the runtime's last step (the view reads it when asked), and goes
/// with the instance. A report of a failed confinement shows none.
#[test]
fn status_shows_the_running_instances_confinement() {
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec("command = [\"/bin/app\"]\n"))
        .unwrap();
    assert_eq!(rt.view().status("web").unwrap().confinement, None);
    rt.start("web").unwrap();
    let s = until(&rt, "web", |s| s.pid.is_some());
    assert_eq!(s.confinement, None, "no report yet");
    // Written by the shim now, with no step of the runtime after it.
    let run_dir = f.sp.spawned.lock().unwrap()[0].1.clone();
    let report = |result: Result<(), String>| {
        serde_json::to_vec(&launch::Report {
            result,
            landlock_abi: 2,
            landlock: "partial".into(),
            seccomp: true,
        })
        .unwrap()
    };
    std::fs::write(run_dir.join("report.json"), report(Ok(()))).unwrap();
    let want = Some(leasehold_node::Confinement {
        landlock_abi: 2,
        landlock: "partial".into(),
        seccomp: true,
    });
    assert_eq!(rt.view().status("web").unwrap().confinement, want);
    assert_eq!(rt.view().list()[0].confinement, want);
    // Kept once read: the instance's confinement does not change.
    std::fs::write(run_dir.join("report.json"), report(Err("late".into()))).unwrap();
    assert_eq!(rt.view().status("web").unwrap().confinement, want);
    rt.stop("web", Some(Duration::ZERO)).unwrap();
    let s = until(&rt, "web", |s| s.phase == Phase::Stopped);
    assert_eq!(s.confinement, None);
    // A failed confinement is none.
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.pid.is_some());
    let run_dir = f.sp.spawned.lock().unwrap()[1].1.clone();
    std::fs::write(
        run_dir.join("report.json"),
        report(Err("landlock restrict_self: EPERM".into())),
    )
    .unwrap();
    assert_eq!(rt.view().status("web").unwrap().confinement, None);
    rt.stop("web", Some(Duration::ZERO)).unwrap();
}

/// The node's bound on probe work (`[engines] probe_rate`): an engine
/// asking for 8 probes every 100 ms (80 runs a second) gets the node's
/// rate, not its own, and a calm engine beside it still has its probe run
/// in turn. The runs that waited show in the busy engine's status.
#[test]
fn probe_runs_are_held_to_the_nodes_rate_and_engines_take_turns() {
    let mut f = fixture(false);
    f.cfg.probe_rate = 8;
    let t0 = Instant::now();
    let mut rt = f.runtime();
    let mut busy = String::from("command = [\"/bin/app\"]\n");
    for i in 0..8 {
        busy.push_str(&format!(
            "[[probes]]\nexec = [\"/bin/busy\", \"{i}\"]\ninterval = \"100ms\"\ntimeout = \"50ms\"\n"
        ));
    }
    rt.deploy("busy", "app.tar", &spec(&busy)).unwrap();
    rt.deploy(
        "calm",
        "app.tar",
        &spec(
            "command = [\"/bin/app\"]\n\
             [[probes]]\nexec = [\"/bin/calm\"]\ninterval = \"100ms\"\ntimeout = \"50ms\"\n",
        ),
    )
    .unwrap();
    rt.start("busy").unwrap();
    rt.start("calm").unwrap();
    let ran = || f.sp.probes_run.lock().unwrap().clone();
    let end = Instant::now() + Duration::from_secs(20);
    while ran().len() < 24 {
        assert!(Instant::now() < end, "probes stopped: {:?}", ran());
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = until(&rt, "busy", |s| s.probes_delayed >= 4);
    let runs = ran();
    let secs = t0.elapsed().as_secs_f64();
    // A second's worth at once, then the rate: without the bound this
    // is about 90 a second.
    assert!(
        runs.len() as f64 <= 8.0 + 8.0 * secs + 1.0,
        "{} runs in {secs:.2} s",
        runs.len()
    );
    let calm = runs.iter().filter(|a| a[0] == "/bin/calm").count();
    assert!(
        calm * 3 >= runs.len(),
        "calm got {calm} of {} runs: engines take turns",
        runs.len()
    );
    assert!(s.probes.iter().all(|p| p.failures == 0), "{s:?}");
    assert_eq!(rt.view().status("calm").unwrap().restarts, 0);
    rt.stop("busy", Some(Duration::ZERO)).unwrap();
    rt.stop("calm", Some(Duration::ZERO)).unwrap();
}

/// At most `[engines] probe_concurrency` runs at once: a probe hung in its
/// engine holds its slot, and nothing else starts until it answers.
#[test]
fn probe_runs_at_once_are_held_to_the_concurrency() {
    let mut f = fixture(false);
    f.cfg.probe_concurrency = 1;
    let mut rt = f.runtime();
    let (tx, rx) = std::sync::mpsc::channel();
    *f.sp.probe_hold.lock().unwrap() = Some(rx);
    rt.deploy(
        "web",
        "app.tar",
        &spec(
            "command = [\"/bin/app\"]\n\
             [[probes]]\nexec = [\"/bin/app\", \"a\"]\ninterval = \"100ms\"\ntimeout = \"90ms\"\n\
             [[probes]]\nexec = [\"/bin/app\", \"b\"]\ninterval = \"100ms\"\ntimeout = \"90ms\"\n",
        ),
    )
    .unwrap();
    rt.start("web").unwrap();
    let ran = || f.sp.probes_run.lock().unwrap().len();
    let end = Instant::now() + Duration::from_secs(10);
    while ran() == 0 {
        assert!(Instant::now() < end, "no probe ran");
        std::thread::yield_now();
    }
    // Five of the other probe's intervals: none of its runs may start
    // while the held one has the only slot.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ran(), 1, "a second run started beside the held one");
    tx.send(launch::ProbeExit::Code(0)).unwrap();
    let s = until(&rt, "web", |s| {
        s.probes.iter().all(|p| p.ok == Some(true)) && s.probes_delayed >= 1
    });
    assert_eq!(s.restarts, 0);
    rt.stop("web", Some(Duration::ZERO)).unwrap();
}
