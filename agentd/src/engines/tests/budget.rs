//! T0: the landlord's budget on the tenant subtree: recorded, written at
//! start, on change and before every launch; what the landlord sees.

use super::*;

fn budget(text: &str) -> Budget {
    Budget::from_toml(text).unwrap()
}

fn tenant_files(f: &Fix) -> BTreeMap<String, String> {
    f.cg.limits
        .lock()
        .unwrap()
        .iter()
        .filter(|((cg, _), _)| cg == Path::new("leasehold/tenant"))
        .map(|((_, file), v)| (file.clone(), v.clone()))
        .collect()
}

#[test]
fn budget_is_recorded_written_and_survives_a_restart() {
    let f = fixture(false);
    let mut rt = f.runtime();
    // None set: the subtree's files say max (the empty budget).
    assert_eq!(rt.budget().unwrap(), Budget::default());
    assert_eq!(
        tenant_files(&f).get("memory.max").map(String::as_str),
        Some("max")
    );
    let b = budget(
        "cpu_max = \"200000 100000\"\nmemory_max = \"1G\"\npids_max = 100\nio_weight = 50\n",
    );
    let a = rt.set_budget(&b).unwrap();
    assert!(a.written && a.error.is_none(), "{a:?}");
    assert_eq!(a.engines_above, 0);
    let files = tenant_files(&f);
    assert_eq!(files["cpu.max"], "200000 100000");
    assert_eq!(files["memory.max"], "1073741824");
    assert_eq!(files["pids.max"], "100");
    assert_eq!(files["io.weight"], "default 50");
    assert_eq!(files["cpu.weight"], "100");
    assert_eq!(rt.budget().unwrap(), b, "the controller's check reads it");
    let st = std::fs::read_to_string(f.cfg.state_dir.join(tenant::BUDGET_FILE)).unwrap();
    assert!(st.contains("\"pids_max\": 100"), "{st}");

    // The landlord's view: counts and sums, the budget, no names.
    let v = rt.view().tenant();
    assert_eq!((v.engines, v.running, v.budget), (0, 0, b));
    assert!(v.written && v.usage.is_ok(), "{v:?}");
    drop(rt);

    // A new agent reads it back and writes it before anything runs.
    f.cg.limits.lock().unwrap().clear();
    let mut rt = f.runtime();
    assert_eq!(rt.budget().unwrap(), b);
    assert_eq!(tenant_files(&f)["pids.max"], "100");
    // Lifting every limit writes max again.
    rt.set_budget(&Budget::default()).unwrap();
    assert_eq!(tenant_files(&f)["pids.max"], "max");
    assert_eq!(tenant_files(&f)["cpu.max"], "max 100000");
}

#[test]
fn lowering_below_a_running_engine_counts_it_and_the_kernel_holds_it() {
    let f = fixture(false);
    let mut rt = f.runtime();
    let s = spec("command = [\"/bin/app\"]\n[limits]\nmemory_max = \"512M\"\n");
    rt.deploy("web", "app.tar", &s).unwrap();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    let a = rt.set_budget(&budget("memory_max = \"256M\"")).unwrap();
    assert_eq!(a.engines_above, 1, "{a:?}");
    assert!(a.written);
    // Accepted and running on: the subtree holds it to 256M.
    assert_eq!(tenant_files(&f)["memory.max"], "268435456");
    let st = rt.view().status("web").unwrap();
    assert_eq!(st.phase, Phase::Ready);
    let v = rt.view().tenant();
    assert_eq!((v.engines, v.running), (1, 1));
    // Every launch writes the budget on the subtree first.
    f.cg.limits.lock().unwrap().clear();
    rt.restart("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready && s.restarts == 0);
    let end = Instant::now() + Duration::from_secs(10);
    while !tenant_files(&f).contains_key("memory.max") {
        assert!(Instant::now() < end, "budget not written before the launch");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(tenant_files(&f)["memory.max"], "268435456");
}

/// A cgroup v2 directory as the kernel shows it, in a tempdir, its
/// controllers already enabled for its children (a file cannot act out the
/// kernel's `+cpu` syntax).
fn cgroup_dir(dir: &Path, controllers: &str, limits: bool) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
    std::fs::write(dir.join("cgroup.subtree_control"), controllers).unwrap();
    if limits {
        for file in [
            "cpu.max",
            "cpu.weight",
            "memory.max",
            "memory.high",
            "pids.max",
            "io.weight",
        ] {
            std::fs::write(dir.join(file), "").unwrap();
        }
        std::fs::write(dir.join("cpu.stat"), "usage_usec 2500000\nuser_usec 1\n").unwrap();
        std::fs::write(dir.join("memory.current"), "33554432\n").unwrap();
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(dir.join("pids.current"), "9\n").unwrap();
        std::fs::write(
            dir.join("io.stat"),
            "259:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n8:0 rbytes=1 wbytes=1 rios=1 wios=1\n",
        )
        .unwrap();
    }
}

#[test]
fn budget_files_on_a_real_cgroupfs_and_usage_read_from_the_subtree() {
    let f = fixture(false);
    let root = f.cfg.cgroup_root.clone();
    cgroup_dir(&root.join("leasehold"), "cpu memory io pids", false);
    cgroup_dir(&root.join("leasehold/tenant"), "cpu memory io pids", true);
    let mut rt = EngineRuntime::start(
        f.cfg.clone(),
        Arc::new(CgroupFs::with_root(Some(&root))),
        f.sp.clone(),
        f.vol.clone(),
    )
    .unwrap();
    let a = rt
        .set_budget(&budget(
            "cpu_max = \"50000 100000\"\nmemory_max = \"2G\"\npids_max = 4096\ncpu_weight = 300\n",
        ))
        .unwrap();
    assert!(a.written, "{a:?}");
    let read = |f: &str| std::fs::read_to_string(root.join("leasehold/tenant").join(f)).unwrap();
    assert_eq!(read("cpu.max"), "50000 100000");
    assert_eq!(read("cpu.weight"), "300");
    assert_eq!(read("memory.max"), "2147483648");
    assert_eq!(read("memory.high"), "max");
    assert_eq!(read("pids.max"), "4096");
    assert_eq!(read("io.weight"), "default 100");
    let u = rt.view().tenant().usage.unwrap();
    assert_eq!(
        (
            u.cpu_usage_usec,
            u.memory_current,
            u.pids_current,
            u.oom_kills
        ),
        (2_500_000, 32 << 20, 9, 1)
    );
    assert_eq!(u.io.iter().map(|s| s.wbytes).sum::<u64>(), 8193);
}

#[test]
fn a_budget_that_cannot_be_written_is_recorded_and_no_engine_launches() {
    let f = fixture(false);
    let root = f.cfg.cgroup_root.clone();
    // The host's case: cgroup v2 without controllers.
    cgroup_dir(&root.join("leasehold"), "", false);
    let mut rt = EngineRuntime::start(
        f.cfg.clone(),
        Arc::new(CgroupFs::with_root(Some(&root))),
        f.sp.clone(),
        f.vol.clone(),
    )
    .unwrap();
    let b = budget("pids_max = 10");
    let a = rt.set_budget(&b).unwrap();
    assert!(!a.written, "{a:?}");
    let err = a.error.unwrap();
    assert!(err.contains("cgroup.controllers"), "{err}");
    assert_eq!(rt.budget().unwrap(), b, "recorded all the same");
    let v = rt.view().tenant();
    assert!(!v.written && v.error.is_some());
    assert!(v.usage.is_err(), "no subtree to read: {v:?}");
    let e = rt
        .deploy("web", "app.tar", &spec(r#"command = ["/bin/app"]"#))
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Unavailable, "{e}");
    assert!(f.sp.spawned.lock().unwrap().is_empty());
}

#[test]
fn a_damaged_budget_record_stops_the_runtime_naming_it() {
    let f = fixture(false);
    let path = f.cfg.state_dir.join(tenant::BUDGET_FILE);
    for bad in [
        "{",
        r#"{"format": 1, "budget": {"pids_max": 0}}"#,
        r#"{"format": 2, "budget": {}}"#,
        r#"{"format": 1, "budget": {"memory": "1G"}}"#,
    ] {
        std::fs::write(&path, bad).unwrap();
        let e = EngineRuntime::start(f.cfg.clone(), f.cg.clone(), f.sp.clone(), f.vol.clone())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("budget.json"), "{bad}: {e}");
    }
}

fn throttles(entries: &[(&str, u8, u64)]) -> leasehold_node::Throttles {
    leasehold_node::Throttles(
        entries
            .iter()
            .map(|(n, p, s)| {
                (
                    (*n).to_owned(),
                    leasehold_node::Throttle {
                        cpu_percent: *p,
                        since: *s,
                    },
                )
            })
            .collect(),
    )
}

/// `throttle-engines` on a cgroupfs fixture (the injectable cgroup root):
/// the subtree's cpu.max lowered and nothing else, persisted across a
/// restart, kept through a budget change, restored exactly.
#[test]
fn a_throttle_lowers_cpu_max_survives_a_restart_and_a_budget_change_and_restores_exactly() {
    let f = fixture(false);
    let root = f.cfg.cgroup_root.clone();
    cgroup_dir(&root.join("leasehold"), "cpu memory io pids", false);
    cgroup_dir(&root.join("leasehold/tenant"), "cpu memory io pids", true);
    // A sibling cgroup the throttle must never touch.
    cgroup_dir(&root.join("other"), "cpu memory io pids", true);
    std::fs::write(root.join("other/cpu.max"), "max 100000").unwrap();
    let start = || {
        EngineRuntime::start(
            f.cfg.clone(),
            Arc::new(CgroupFs::with_root(Some(&root))),
            f.sp.clone(),
            f.vol.clone(),
        )
        .unwrap()
    };
    let read = |f: &str| std::fs::read_to_string(root.join("leasehold/tenant").join(f)).unwrap();
    let mut rt = start();
    rt.set_budget(&budget("cpu_max = \"200000 100000\"\nmemory_max = \"1G\""))
        .unwrap();
    let a = rt.set_throttles(&throttles(&[("hot", 50, 1000)])).unwrap();
    assert!(a.written, "{a:?}");
    assert_eq!(a.cpu_max, "100000 100000");
    assert_eq!(read("cpu.max"), "100000 100000");
    assert_eq!(read("memory.max"), "1073741824", "the rest is the budget's");
    let v = rt.view().tenant();
    assert_eq!(v.throttles.cpu_percent(), Some(50));
    assert_eq!(v.throttled_cpu_max.as_deref(), Some("100000 100000"));
    assert_eq!(rt.view().throttles(), a.throttles);
    drop(rt);

    // A new agent (a restart or a crash) reads it back and writes it
    // before anything runs.
    std::fs::write(root.join("leasehold/tenant/cpu.max"), "").unwrap();
    let mut rt = start();
    assert_eq!(read("cpu.max"), "100000 100000");
    assert_eq!(rt.view().throttles(), throttles(&[("hot", 50, 1000)]));

    // A budget change during the throttle: still throttled, of the new
    // budget; a second, lower throttle binds.
    rt.set_budget(&budget("cpu_max = \"400000 100000\""))
        .unwrap();
    assert_eq!(read("cpu.max"), "200000 100000");
    rt.set_throttles(&throttles(&[("hot", 50, 1000), ("crit", 10, 2000)]))
        .unwrap();
    assert_eq!(read("cpu.max"), "40000 100000");

    // The fault clears: exactly the (new) budget's value.
    let a = rt.set_throttles(&throttles(&[])).unwrap();
    assert_eq!(a.cpu_max, "400000 100000");
    assert_eq!(read("cpu.max"), "400000 100000");
    assert_eq!(rt.view().tenant().throttled_cpu_max, None);
    // No budget cpu_max: a fraction of the node's CPUs, then "max".
    rt.set_budget(&Budget::default()).unwrap();
    rt.set_throttles(&throttles(&[("hot", 50, 3000)])).unwrap();
    let cpus = u64::from(tenant::node_cpus());
    assert_eq!(read("cpu.max"), format!("{} 100000", cpus * 50_000));
    rt.set_throttles(&throttles(&[])).unwrap();
    assert_eq!(read("cpu.max"), "max 100000");
    drop(rt);
    let rt = start();
    assert_eq!(read("cpu.max"), "max 100000", "nothing restored twice");
    assert!(rt.view().throttles().0.is_empty());
    assert_eq!(
        std::fs::read_to_string(root.join("other/cpu.max")).unwrap(),
        "max 100000",
        "no other cgroup touched"
    );
}

#[test]
fn a_damaged_throttle_record_stops_the_runtime_and_bad_throttles_are_refused() {
    let f = fixture(false);
    let path = f.cfg.state_dir.join(tenant::THROTTLE_FILE);
    for bad in [
        "{",
        r#"{"format": 1, "throttles": {"hot": {"cpu_percent": 0, "since": 1}}}"#,
        r#"{"format": 2, "throttles": {}}"#,
    ] {
        std::fs::write(&path, bad).unwrap();
        let e = EngineRuntime::start(f.cfg.clone(), f.cg.clone(), f.sp.clone(), f.vol.clone())
            .unwrap_err();
        assert!(e.to_string().contains("throttle.json"), "{e}");
    }
    std::fs::remove_file(&path).unwrap();
    let mut rt = f.runtime();
    let e = rt
        .set_throttles(&throttles(&[("hot", 101, 1)]))
        .unwrap_err();
    assert!(e.message.contains("hot.cpu_percent: 101"), "{e}");
    assert!(!path.exists(), "nothing recorded");
}

/// An engine's own `memory.max` as last written.
fn engine_memory_max(f: &Fix) -> Option<String> {
    f.cg.limits
        .lock()
        .unwrap()
        .iter()
        .find(|((cg, file), _)| cg == Path::new("leasehold/tenant/web") && file == "memory.max")
        .map(|(_, v)| v.clone())
}

fn until_memory_max(f: &Fix, want: &str) {
    let end = Instant::now() + Duration::from_secs(10);
    while engine_memory_max(f).as_deref() != Some(want) {
        assert!(
            Instant::now() < end,
            "memory.max {:?}, not {want}",
            engine_memory_max(f)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An engine's own limits are written at each launch of the version it
/// starts (review): after a reboot (cgroupfs empty) an engine marked to
/// start got none of its own; a reload's came before it was accepted and
/// stayed on the running version when its instance failed. A deploy and
/// a reload check the budget again in the runtime (it may have been
/// lowered while the command waited).
#[test]
fn an_engines_limits_follow_the_version_it_launches() {
    let f = fixture(false);
    let mut rt = f.runtime();
    let limited = |m: &str| {
        spec(&format!(
            "command = [\"/bin/app\"]\n[limits]\nmemory_max = \"{m}\"\n"
        ))
    };
    rt.deploy("web", "app.tar", &limited("64M")).unwrap();
    // As after a reboot: nothing in cgroupfs.
    f.cg.limits.lock().unwrap().clear();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    until_memory_max(&f, "67108864");
    // A reload whose instance cannot start: the running version's limits
    // are back once it has failed.
    *f.sp.fail_spawn.lock().unwrap() = true;
    let _ = rt.reload("web", None, Some(&limited("128M")));
    let end = Instant::now() + Duration::from_secs(10);
    while !event_kinds(&rt).iter().any(|k| k == "reload-failed") {
        assert!(Instant::now() < end, "{:?}", event_kinds(&rt));
        std::thread::sleep(Duration::from_millis(5));
    }
    until_memory_max(&f, "67108864");
    // One that starts: its limits.
    *f.sp.fail_spawn.lock().unwrap() = false;
    rt.reload("web", None, Some(&limited("128M"))).unwrap();
    until_memory_max(&f, "134217728");
    // The budget lowered meanwhile: the runtime refuses what is above it.
    rt.set_budget(&budget("memory_max = \"100M\"")).unwrap();
    let e = rt.deploy("db", "app.tar", &limited("128M")).unwrap_err();
    assert!(e.to_string().contains("above the tenant budget"), "{e}");
    let e = rt.reload("web", None, Some(&limited("200M"))).unwrap_err();
    assert!(e.to_string().contains("above the tenant budget"), "{e}");
    assert!(e.to_string().contains("memory_max"), "names the field: {e}");
    assert!(rt.view().status("db").is_none());
    // Its kept spec is not checked: a new image for an engine above the
    // lowered budget (allowed, counted) is still taken.
    rt.reload("web", None, None).unwrap();
    rt.stop("web", Some(Duration::ZERO)).unwrap();
}
