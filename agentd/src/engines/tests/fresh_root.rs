//! `on_failure = ["reload"]`: a fresh root from the engine's stored,
//! verified image, switched to once the new instance runs; without a
//! usable image, the previous root, said so in events and status.

use super::*;

const RELOAD_SPEC: &str = "command = [\"/bin/app\"]\non_failure = [\"reload\"]\n\
    [[probes]]\nexec = [\"/bin/check\"]\ninterval = \"100ms\"\ntimeout = \"50ms\"\nthreshold = 1\n";

/// Makes the probe fail until one more instance is spawned, then pass
/// again; returns that instance's root.
fn fail_once(f: &Fix, rt: &EngineRuntime) -> PathBuf {
    let n = f.sp.spawned.lock().unwrap().len();
    *f.sp.probe_exit.lock().unwrap() = Some(launch::ProbeExit::Code(1));
    let end = Instant::now() + Duration::from_secs(10);
    while f.sp.spawned.lock().unwrap().len() <= n {
        assert!(Instant::now() < end, "no new instance");
        std::thread::sleep(Duration::from_millis(5));
    }
    *f.sp.probe_exit.lock().unwrap() = None;
    until(rt, "web", |s| s.phase == Phase::Ready);
    let s = f.sp.spawned.lock().unwrap();
    s.last().unwrap().0.rootfs.clone()
}

fn other_image() -> Vec<u8> {
    image_with(b"#!/bin/sh\necho v2\n")
}

fn last_event(rt: &EngineRuntime, kind: &str) -> Option<String> {
    rt.view()
        .events(0, 1000)
        .into_iter()
        .rev()
        .find(|e| e.kind == kind)
        .map(|e| e.detail)
}

fn roots(v1: &Path) -> Vec<String> {
    let mut r: Vec<String> = std::fs::read_dir(v1)
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("rootfs"))
        .collect();
    r.sort();
    r
}

#[test]
fn on_failure_reload_runs_from_a_fresh_verified_root_or_says_why_not() {
    let f = fixture(false);
    let mut rt = f.runtime();
    rt.deploy("web", "app.tar", &spec(RELOAD_SPEC)).unwrap();
    rt.start("web").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    let v1 = f.tmp.path().join("vol/engines/web/v1");
    let first = f.sp.spawned.lock().unwrap()[0].0.rootfs.clone();
    assert_eq!(first, v1.join("rootfs"));
    let data = f.tmp.path().join("vol/engines/web/data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("kept"), "x").unwrap();
    // Something the engine wrote into its root: a fresh root has none.
    std::fs::write(first.join("scribbled"), "x").unwrap();

    // Failed: a fresh root, unpacked and verified again, is the new
    // instance's; the old root goes once the instance runs.
    let root = fail_once(&f, &rt);
    assert_ne!(root, first);
    assert!(
        root.starts_with(&v1) && root.join("bin/app").is_file(),
        "{root:?}"
    );
    assert!(!root.join("scribbled").exists(), "fresh");
    assert!(!first.exists(), "the replaced root is gone");
    assert_eq!(roots(&v1), [root.file_name().unwrap().to_string_lossy()]);
    assert!(data.join("kept").exists(), "data dirs are kept");
    let d = last_event(&rt, "image-reloaded").expect("an image-reloaded event");
    assert!(d.contains("fresh root of the verified image"), "{d}");
    assert!(rt.view().status("web").unwrap().notes.is_empty());
    // Recorded: a new agent launches from the new root.
    let state = std::fs::read_to_string(f.cfg.state_dir.join(STATE_FILE)).unwrap();
    assert!(state.contains(&*root.to_string_lossy()), "{state}");

    // The image is replaced by something that does not verify: the
    // previous root, said so.
    let inbox = f.tmp.path().join("vol/engines/inbox/app.tar");
    std::fs::write(&inbox, b"not an image").unwrap();
    let again = fail_once(&f, &rt);
    assert_eq!(again, root, "the previous root");
    let d = last_event(&rt, "image-reload-failed").expect("an image-reload-failed event");
    assert!(
        d.contains("the stored image \"app.tar\" fails verification"),
        "{d}"
    );
    assert!(d.ends_with("; running from the previous root"), "{d}");
    let notes = rt.view().status("web").unwrap().notes;
    assert!(
        notes.len() == 1 && notes[0].starts_with("reload image: the stored image"),
        "{notes:?}"
    );
    assert_eq!(
        roots(&v1),
        [root.file_name().unwrap().to_string_lossy()],
        "nothing left behind"
    );

    // Gone from the inbox: the same.
    std::fs::remove_file(&inbox).unwrap();
    let again = fail_once(&f, &rt);
    assert_eq!(again, root);
    let d = last_event(&rt, "image-reload-failed").unwrap();
    assert!(
        d.contains("the stored image \"app.tar\" is gone from the inbox"),
        "{d}"
    );

    // Another valid image under the same name is not the one deployed.
    std::fs::write(&inbox, other_image()).unwrap();
    let again = fail_once(&f, &rt);
    assert_eq!(again, root);
    let d = last_event(&rt, "image-reload-failed").unwrap();
    assert!(d.contains("is not the one deployed (config sha256:"), "{d}");
    assert_eq!(roots(&v1), [root.file_name().unwrap().to_string_lossy()]);

    // The right image back: fresh again, and the note is cleared.
    std::fs::write(&inbox, image_archive()).unwrap();
    let fresh = fail_once(&f, &rt);
    assert_ne!(fresh, root);
    assert!(!root.exists());
    assert!(rt.view().status("web").unwrap().notes.is_empty());
    rt.stop("web", Some(Duration::ZERO)).unwrap();
}

/// T1 (root, busybox, the shim built): the real launcher and shim. A file
/// planted in the engine's root makes its exec probe fail; with
/// `on_failure = ["reload"]` the next instance runs from a fresh root of
/// the verified image (the planted file gone, the probe passing inside
/// it, the data dir kept) and the old root is removed.
#[test]
#[ignore = "needs root, /bin/busybox (busybox-static) and the engine shim (cargo build --workspace --bins)"]
fn real_shim_reload_image_runs_from_a_fresh_root() {
    let shim = real_shim();
    let f = fixture(false);
    write_busybox_image(&f);
    let mut rt = real_runtime(&f, &shim);
    // A uuid names each run: both instances' shells are the same pid in
    // pid namespaces of their own, and may start within the same second.
    let text = "command = [\"/bin/busybox\", \"sh\", \"-c\", \"B=/bin/busybox; $B touch /var/lib/app/run-$($B cat /proc/sys/kernel/random/uuid); [ -e /planted ] && echo planted || echo clean; exec $B sleep 1000\"]\n\
         data_dirs = [\"var/lib/app\"]\n\
         on_failure = [\"reload\"]\n\
         stop_grace = \"0ms\"\n\
         [[probes]]\n\
         exec = [\"/bin/busybox\", \"sh\", \"-c\", \"[ ! -e /planted ]\"]\n\
         interval = \"200ms\"\ntimeout = \"150ms\"\nthreshold = 1\n";
    rt.deploy("bb", "bb.tar", &spec(text)).unwrap();
    rt.start("bb").unwrap();
    until_longer(&rt, "bb", |s| s.probes[0].ok == Some(true));
    let v1 = f.tmp.path().join("vol/engines/bb/v1");
    std::fs::write(v1.join("rootfs/planted"), "x").unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while last_event(&rt, "image-reloaded").is_none() {
        assert!(Instant::now() < end, "no image-reloaded event");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = until_longer(&rt, "bb", |s| {
        s.phase == Phase::Ready && s.probes[0].ok == Some(true)
    });
    assert_eq!(s.restarts, 1, "{s:?}");
    let r = roots(&v1);
    assert!(r.len() == 1 && r[0].starts_with("rootfs-i"), "{r:?}");
    assert!(!v1.join(&r[0]).join("planted").exists());
    // The probe can pass before the second instance's shell has touched
    // its file and printed: its line is the sign both are done.
    let logs = || -> Vec<String> {
        rt.view()
            .logs("bb", 0, 100)
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(&r.text).into_owned())
            .collect()
    };
    let end = Instant::now() + Duration::from_secs(30);
    while logs().len() < 2 {
        assert!(
            Instant::now() < end,
            "the second instance never printed: {:?}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        logs(),
        ["clean", "clean"],
        "the second instance saw a clean root"
    );
    let runs = std::fs::read_dir(f.tmp.path().join("vol/engines/bb/data/var/lib/app"))
        .unwrap()
        .count();
    assert_eq!(runs, 2, "the data dir is kept across the fresh root");
    rt.stop("bb", Some(Duration::ZERO)).unwrap();
    until_longer(&rt, "bb", |s| s.phase == Phase::Stopped);
}
