//! T0: the temp name, rename, size and digest rules of uploads, on a
//! tempdir standing in for the mounted tenant volume.

use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::RwLock;

/// The mount point, and the unmounts done.
struct FakeVolume(RwLock<Option<PathBuf>>, AtomicU64);

impl VolumeDir for FakeVolume {
    fn mounted(&self) -> Option<PathBuf> {
        self.0.read().unwrap().clone()
    }
    fn unmounts(&self) -> u64 {
        self.1.load(Ordering::SeqCst)
    }
}

struct Fixture {
    tmp: tempfile::TempDir,
    vol: Arc<FakeVolume>,
    up: Uploads,
}

fn me() -> u32 {
    rustix::process::getuid().as_raw()
}

fn fixture_with(max: u64) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let v = tmp.path().join("vol");
    std::fs::create_dir(&v).unwrap();
    let vol = Arc::new(FakeVolume(RwLock::new(Some(v)), AtomicU64::new(0)));
    let up = Uploads::new(vol.clone(), "engines".into(), max);
    Fixture { tmp, vol, up }
}

fn fixture() -> Fixture {
    fixture_with(DEFAULT_MAX_BYTES)
}

impl Fixture {
    fn inbox(&self) -> PathBuf {
        self.tmp.path().join("vol/engines/inbox")
    }
    /// Names in the inbox, sorted.
    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.inbox())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Sends `data` in chunks of `n`.
fn send(up: &Uploads, id: &str, data: &[u8], n: usize) {
    let mut off = 0u64;
    for c in data.chunks(n) {
        off = up.chunk(me(), id, off, c).unwrap();
    }
    assert_eq!(off, data.len() as u64);
}

#[test]
fn upload_lands_under_its_name_only_when_complete() {
    let f = fixture();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let id =
        f.up.begin(me(), "app.tar", data.len() as u64, &sha(&data))
            .unwrap();
    // The inbox was made for the caller, 0700.
    let m = std::fs::metadata(f.inbox()).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o700);
    assert_eq!(m.uid(), me());
    send(&f.up, &id, &data[..50_000], 7_000);
    // Half-way: only the temp name exists.
    assert_eq!(f.listing(), [temp_name(&id)]);
    let mut off = 50_000;
    for c in data[50_000..].chunks(9_999) {
        off = f.up.chunk(me(), &id, off, c).unwrap();
    }
    assert_eq!(f.up.commit(me(), &id).unwrap(), "app.tar");
    assert_eq!(f.listing(), ["app.tar"]);
    assert_eq!(std::fs::read(f.inbox().join("app.tar")).unwrap(), data);
    let m = std::fs::metadata(f.inbox().join("app.tar")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    assert_eq!(m.uid(), me());
    // Done: the id is gone.
    assert!(matches!(
        f.up.commit(me(), &id),
        Err(UploadError::NotFound(_))
    ));
}

#[test]
fn short_or_wrong_digest_upload_is_discarded() {
    let f = fixture();
    let data = b"the image bytes".to_vec();
    std::fs::create_dir_all(f.inbox()).unwrap();
    std::fs::write(f.inbox().join("app.tar"), b"old").unwrap();
    // Short.
    let id = f.up.begin(me(), "app.tar", 100, &sha(&data)).unwrap();
    f.up.chunk(me(), &id, 0, &data).unwrap();
    let e = f.up.commit(me(), &id).unwrap_err();
    assert!(
        matches!(e, UploadError::Invalid { field: "size", .. }),
        "{e}"
    );
    // Wrong digest (the client's hash of other bytes).
    let id =
        f.up.begin(me(), "app.tar", data.len() as u64, &sha(b"something else"))
            .unwrap();
    f.up.chunk(me(), &id, 0, &data).unwrap();
    let e = f.up.commit(me(), &id).unwrap_err();
    assert!(
        matches!(
            e,
            UploadError::Invalid {
                field: "sha256",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains(&sha(&data)), "{e}");
    // Neither left a temp file nor touched the older image.
    assert_eq!(f.listing(), ["app.tar"]);
    assert_eq!(std::fs::read(f.inbox().join("app.tar")).unwrap(), b"old");
}

#[test]
fn chunks_are_bounded_and_in_order() {
    let f = fixture();
    let id = f.up.begin(me(), "a.tar", 10, &sha(b"0123456789")).unwrap();
    let e = f.up.chunk(me(), &id, 3, b"xyz").unwrap_err();
    assert!(
        matches!(
            e,
            UploadError::Invalid {
                field: "offset",
                ..
            }
        ),
        "{e}"
    );
    let e = f.up.chunk(me(), &id, 0, b"0123456789X").unwrap_err();
    assert!(
        matches!(e, UploadError::Invalid { field: "data", .. }),
        "{e}"
    );
    let big = vec![0u8; MAX_CHUNK + 1];
    let e = f.up.chunk(me(), &id, 0, &big).unwrap_err();
    assert!(
        matches!(e, UploadError::Invalid { field: "data", .. }),
        "{e}"
    );
    // Refused chunks changed nothing: the upload still completes.
    assert_eq!(f.up.chunk(me(), &id, 0, b"01234").unwrap(), 5);
    assert_eq!(f.up.chunk(me(), &id, 5, b"56789").unwrap(), 10);
    assert_eq!(f.up.commit(me(), &id).unwrap(), "a.tar");
    // Someone else's upload does not exist for the caller.
    let id = f.up.begin(me(), "b.tar", 1, &sha(b"x")).unwrap();
    assert!(matches!(
        f.up.chunk(me() + 1, &id, 0, b"x"),
        Err(UploadError::NotFound(_))
    ));
}

#[test]
fn bad_names_sizes_and_digests_are_refused_naming_the_field() {
    let f = fixture_with(1000);
    let good = sha(b"");
    for bad in ["", "a/b", "..", "../x", ".hidden", "a\0b", &"x".repeat(256)] {
        let e = f.up.begin(me(), bad, 1, &good).unwrap_err();
        assert!(
            matches!(e, UploadError::Invalid { field: "name", .. }),
            "{bad:?}: {e}"
        );
        assert!(e.to_string().starts_with("name: "), "{e}");
    }
    let e = f.up.begin(me(), "a.tar", 1001, &good).unwrap_err();
    assert!(
        matches!(e, UploadError::Invalid { field: "size", .. }),
        "{e}"
    );
    assert!(e.to_string().contains("engines.upload_max_bytes"), "{e}");
    for bad in ["", "sha512:00", &"A".repeat(64), &"0".repeat(63)] {
        let e = f.up.begin(me(), "a.tar", 1, bad).unwrap_err();
        assert!(
            matches!(
                e,
                UploadError::Invalid {
                    field: "sha256",
                    ..
                }
            ),
            "{e}"
        );
    }
    assert!(f
        .up
        .begin(me(), "a.tar", 0, &format!("sha256:{good}"))
        .is_ok());
    // Nothing was written for the refused ones.
    assert_eq!(f.listing().len(), 1);
}

/// An unknown 1 MiB id comes back shortened in the error.
#[test]
fn a_long_unknown_id_is_echoed_truncated() {
    let f = fixture();
    let long = "x".repeat(1 << 20);
    for e in [
        f.up.chunk(me(), &long, 0, b"x").unwrap_err(),
        f.up.commit(me(), &long).unwrap_err(),
        f.up.abort(me(), &long).unwrap_err(),
    ] {
        assert!(matches!(e, UploadError::NotFound(_)), "{e}");
        let e = e.to_string();
        assert!(e.len() < 300, "{} bytes", e.len());
        assert!(e.starts_with("no upload \"xxx"), "{e}");
        assert!(e.contains("(1048576 bytes) in progress"), "{e}");
    }
}

#[test]
fn no_volume_is_refused_before_anything_is_written() {
    let f = fixture();
    *f.vol.0.write().unwrap() = None;
    let e = f.up.begin(me(), "a.tar", 1, &sha(b"x")).unwrap_err();
    assert!(matches!(e, UploadError::NoVolume), "{e}");
    assert!(!f.tmp.path().join("vol/engines").exists());
}

#[test]
fn interrupted_upload_leaves_no_image_and_its_temp_file_goes() {
    let f = fixture();
    let id =
        f.up.begin(me(), "app.tar", 10, &sha(b"0123456789"))
            .unwrap();
    f.up.chunk(me(), &id, 0, b"01234").unwrap();
    // The agent goes away mid-upload; a new one starts on the same volume.
    let again = Uploads::new(f.vol.clone(), "engines".into(), DEFAULT_MAX_BYTES);
    assert_eq!(again.sweep_at_start(), 1);
    assert!(f.listing().is_empty());
    // The next upload also removes temp files nobody owns, but not those
    // of uploads in progress.
    let live = f.up.begin(me(), "b.tar", 1, &sha(b"b")).unwrap();
    std::fs::write(f.inbox().join(".upload-dead.part"), b"partial").unwrap();
    let other = f.up.begin(me(), "c.tar", 1, &sha(b"c")).unwrap();
    assert_eq!(f.listing(), {
        let mut v = vec![temp_name(&live), temp_name(&other)];
        v.sort();
        v
    });
    f.up.abort(me(), &live).unwrap();
    assert_eq!(f.listing(), [temp_name(&other)]);
    assert!(matches!(
        f.up.chunk(me(), &live, 0, b"b"),
        Err(UploadError::NotFound(_))
    ));
}

/// A sweep is bounded: at most MAX_SWEEP_REMOVALS temp files go each
/// time, the rest at the next sweeps; other files are left alone.
#[test]
fn a_sweep_removes_a_bounded_number_of_leftovers() {
    let f = fixture();
    // The inbox exists once an upload began.
    let id = f.up.begin(me(), "a.tar", 1, &sha(b"a")).unwrap();
    f.up.abort(me(), &id).unwrap();
    let n = MAX_SWEEP_REMOVALS + 500;
    for i in 0..n {
        std::fs::write(f.inbox().join(format!(".upload-{i:06}.part")), b"").unwrap();
    }
    std::fs::write(f.inbox().join("keep.tar"), b"x").unwrap();
    assert_eq!(f.up.sweep_at_start(), MAX_SWEEP_REMOVALS);
    assert_eq!(f.up.sweep_at_start(), 500);
    assert_eq!(f.up.sweep_at_start(), 0);
    assert_eq!(f.listing(), ["keep.tar"]);
}

#[test]
fn concurrent_uploads_of_one_name_do_not_mix() {
    let f = Arc::new(fixture());
    let a: Vec<u8> = vec![b'a'; 300_000];
    let b: Vec<u8> = vec![b'b'; 200_000];
    let ia =
        f.up.begin(me(), "same.tar", a.len() as u64, &sha(&a))
            .unwrap();
    let ib =
        f.up.begin(me(), "same.tar", b.len() as u64, &sha(&b))
            .unwrap();
    let threads: Vec<_> = [(ia, a.clone()), (ib.clone(), b.clone())]
        .into_iter()
        .map(|(id, data)| {
            let f = f.clone();
            std::thread::spawn(move || {
                send(&f.up, &id, &data, 4096);
                id
            })
        })
        .collect();
    let ids: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // Each commit puts one whole archive in place; the last one wins.
    assert_eq!(f.up.commit(me(), &ids[0]).unwrap(), "same.tar");
    assert_eq!(std::fs::read(f.inbox().join("same.tar")).unwrap(), a);
    assert_eq!(f.up.commit(me(), &ids[1]).unwrap(), "same.tar");
    assert_eq!(std::fs::read(f.inbox().join("same.tar")).unwrap(), b);
    assert_eq!(f.listing(), ["same.tar"]);
}

#[test]
fn symlinks_in_the_inbox_are_never_followed() {
    let f = fixture();
    let outside = f.tmp.path().join("outside");
    std::fs::write(&outside, b"agent's file").unwrap();
    std::fs::create_dir_all(f.inbox()).unwrap();
    std::os::unix::fs::symlink(&outside, f.inbox().join("app.tar")).unwrap();
    let id = f.up.begin(me(), "app.tar", 3, &sha(b"new")).unwrap();
    f.up.chunk(me(), &id, 0, b"new").unwrap();
    f.up.commit(me(), &id).unwrap();
    // The symlink was replaced, its target untouched.
    assert_eq!(std::fs::read(&outside).unwrap(), b"agent's file");
    assert!(std::fs::symlink_metadata(f.inbox().join("app.tar"))
        .unwrap()
        .is_file());
    // An inbox that is itself a symlink, or that others may write, is refused.
    std::fs::remove_dir_all(f.inbox()).unwrap();
    std::os::unix::fs::symlink(f.tmp.path(), f.inbox()).unwrap();
    let e = f.up.begin(me(), "a.tar", 1, &sha(b"x")).unwrap_err();
    assert!(matches!(e, UploadError::Inbox { .. }), "{e}");
    std::fs::remove_file(f.inbox()).unwrap();
    std::fs::create_dir(f.inbox()).unwrap();
    std::fs::set_permissions(f.inbox(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = f.up.begin(me(), "a.tar", 1, &sha(b"x")).unwrap_err();
    assert!(e.to_string().contains("o-w"), "{e}");
}

/// Each caller (uid) has [`MAX_ACTIVE`] uploads at once; refused, it is
/// told which are its own (to abort one), and another caller is not held
/// up by it. Empty chunks do not keep an upload from its idle drop.
#[test]
fn uploads_in_progress_are_bounded_per_caller() {
    let f = fixture();
    let ids: Vec<String> = (0..MAX_ACTIVE)
        .map(|i| {
            f.up.begin(me(), &format!("{i}.tar"), 1, &sha(b"x"))
                .unwrap()
        })
        .collect();
    match f.up.begin(me(), "more.tar", 1, &sha(b"x")) {
        Err(UploadError::Busy(m)) => {
            for id in &ids {
                assert!(m.contains(id.as_str()), "{m}");
            }
            assert!(m.contains("upload-abort"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // Another caller begins all the same.
    let other = f.up.begin(me() + 1, "theirs.tar", 1, &sha(b"x")).unwrap();
    f.up.abort(me() + 1, &other).unwrap();
    f.up.abort(me(), &ids[0]).unwrap();
    f.up.begin(me(), "more.tar", 1, &sha(b"x")).unwrap();
    // An empty chunk is no sign of life.
    let last = |id: &str| f.up.active()[id].up.lock().unwrap().last;
    let before = last(&ids[1]);
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(f.up.chunk(me(), &ids[1], 0, b"").unwrap(), 0);
    assert_eq!(last(&ids[1]), before, "kept alive by an empty chunk");
    f.up.chunk(me(), &ids[1], 0, b"x").unwrap();
    assert!(last(&ids[1]) > before);
}

/// A directory at the name is refused at begin, naming the field, not
/// after the whole transfer at the commit's rename.
#[test]
fn a_directory_at_the_name_is_refused_at_begin() {
    let f = fixture();
    let id = f.up.begin(me(), "first.tar", 1, &sha(b"x")).unwrap();
    f.up.abort(me(), &id).unwrap();
    std::fs::create_dir(f.inbox().join("app.tar")).unwrap();
    match f.up.begin(me(), "app.tar", 1, &sha(b"x")) {
        Err(UploadError::Invalid {
            field: "name",
            reason,
        }) => {
            assert!(reason.contains("directory"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

/// A full volume, on a real (tiny) tmpfs: refused at begin when the size
/// does not fit, and a write that hits ENOSPC ends the upload cleanly.
#[test]
#[ignore = "needs root: mounts a 1 MiB tmpfs"]
fn real_full_volume_fails_cleanly_naming_it() {
    let f = fixture();
    let mnt = f.tmp.path().join("vol");
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Umount(mnt.clone());
    let e = f.up.begin(me(), "big.tar", 4 << 20, &sha(b"")).unwrap_err();
    assert!(matches!(e, UploadError::NoSpace { .. }), "{e}");
    assert!(e.to_string().contains(mnt.to_str().unwrap()), "{e}");
    // Fits at begin; then something else fills the volume.
    let data = vec![7u8; 600 << 10];
    let id =
        f.up.begin(me(), "img.tar", data.len() as u64, &sha(&data))
            .unwrap();
    // A second upload begun now cannot count the space the first will
    // still write (nothing of it is on disk yet).
    let e =
        f.up.begin(me(), "second.tar", 600 << 10, &sha(b"x"))
            .unwrap_err();
    assert!(matches!(e, UploadError::NoSpace { .. }), "{e}");
    std::fs::write(mnt.join("filler"), vec![0u8; 700 << 10]).ok();
    let mut err = None;
    let mut off = 0;
    for c in data.chunks(64 << 10) {
        match f.up.chunk(me(), &id, off, c) {
            Ok(n) => off = n,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("the volume filled up");
    assert!(matches!(e, UploadError::NoSpace { .. }), "{e}");
    assert!(f.listing().is_empty(), "{:?}", f.listing());
    assert!(matches!(
        f.up.commit(me(), &id),
        Err(UploadError::NotFound(_))
    ));
}

/// Descriptors of this process open on `path`'s directory entries below
/// it (files and directories of the inbox).
fn open_below(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.starts_with(path))
        .count()
}

/// Before the volume is unmounted (a key change's teardown), every upload
/// in progress lets go of it: its files close, its client's next call is
/// NotFound. An upload left open kept the filesystem busy, and the volume
/// made again under the new key could not take the mapping's name.
#[test]
fn uploads_are_dropped_before_the_volume_unmounts() {
    let f = fixture();
    let data = vec![7u8; 10_000];
    let id =
        f.up.begin(me(), "app.tar", data.len() as u64, &sha(&data))
            .unwrap();
    send(&f.up, &id, &data[..5_000], 5_000);
    let vol = f.tmp.path().join("vol");
    assert!(
        open_below(&vol) >= 2,
        "the temp file and the inbox are open"
    );
    assert_eq!(f.up.drop_all(), 1);
    assert_eq!(open_below(&vol), 0, "nothing of the volume left open");
    assert!(matches!(
        f.up.chunk(me(), &id, 5_000, &data[5_000..]),
        Err(UploadError::NoVolume)
    ));
    // Once the unmount is done: gone.
    f.vol.1.fetch_add(1, Ordering::SeqCst);
    assert!(matches!(
        f.up.chunk(me(), &id, 5_000, &data[5_000..]),
        Err(UploadError::NotFound(_))
    ));
    assert_eq!(f.up.drop_all(), 0);
}

/// From the drop before an unmount until the unmount is done, every call
/// is refused, though the volume still shows as mounted: a descriptor
/// opened then would keep the filesystem busy. After it, uploads go on
/// (into the next mount).
#[test]
fn no_upload_begins_between_the_drop_and_the_unmount() {
    let f = fixture();
    let id = f.up.begin(me(), "a.tar", 2, &sha(b"xy")).unwrap();
    assert_eq!(f.up.drop_all(), 1);
    assert!(f.vol.mounted().is_some(), "still shown as mounted");
    assert!(matches!(
        f.up.begin(me(), "b.tar", 1, &sha(b"x")),
        Err(UploadError::NoVolume)
    ));
    assert!(matches!(
        f.up.chunk(me(), &id, 0, b"x"),
        Err(UploadError::NoVolume)
    ));
    assert_eq!(f.up.sweep_at_start(), 0);
    assert_eq!(open_below(&f.tmp.path().join("vol")), 0);
    // The unmount done (and the volume mounted again).
    f.vol.1.fetch_add(1, Ordering::SeqCst);
    let id = f.up.begin(me(), "b.tar", 1, &sha(b"x")).unwrap();
    f.up.chunk(me(), &id, 0, b"x").unwrap();
    assert_eq!(f.up.commit(me(), &id).unwrap(), "b.tar");
}

/// Callers beginning and sending while the volume's drop comes: once the
/// drop returns, nothing of the volume is open, whatever was in flight
/// (before, a begin past its inbox check registered after the drop).
#[test]
fn calls_in_flight_end_before_the_drop_returns() {
    for round in 0..20u64 {
        let f = fixture();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let vol = f.tmp.path().join("vol");
        std::thread::scope(|s| {
            for t in 0..3u32 {
                let (up, stop) = (&f.up, &stop);
                s.spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        if let Ok(id) = up.begin(me() + t, &format!("{t}-{i}.tar"), 1, &sha(b"x")) {
                            let _ = up.chunk(me() + t, &id, 0, b"x");
                            if i % 2 == 0 {
                                let _ = up.abort(me() + t, &id);
                            }
                        }
                    }
                });
            }
            let t0 = Instant::now();
            while f.up.active().is_empty() {
                assert!(t0.elapsed() < Duration::from_secs(10), "no upload began");
                std::thread::yield_now();
            }
            f.up.drop_all();
            let left = open_below(&vol);
            stop.store(true, Ordering::SeqCst);
            assert_eq!(
                left, 0,
                "round {round}: descriptors of the volume after the drop"
            );
            assert!(f.up.active().is_empty(), "round {round}");
        });
    }
}
