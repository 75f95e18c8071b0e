//! Issue 15, points 4-6, on the host harness (T1: real bus, polkitd,
//! agentd --dev on swtpm, the CLIs as the test users). This host has no
//! device-mapper, which is the failure the issue met: `volume init` must
//! refuse before it records anything or asks; a stuck volume record (as
//! the old agent left one) must be reported as an error with what to do,
//! must not block any key change, and must be droppable with `volume
//! forget`. The dm-crypt success paths are the VM lab's (tests/tests/vm_lab.rs).

use std::path::{Path, PathBuf};
use std::process::Command;

use leasehold_storage::meta::{VolumeMeta, VolumeState, FORMAT};
use leasehold_tests::{Lab, Run, Who};

fn dm_in_kernel() -> bool {
    std::fs::read_to_string("/proc/misc")
        .unwrap()
        .lines()
        .any(|l| l.ends_with(" device-mapper"))
}

/// A loop device over a sparse file in the lab dir; detached on drop.
struct Loop(String);

impl Loop {
    fn new(file: &Path, bytes: u64) -> Loop {
        let f = std::fs::File::create(file).unwrap();
        f.set_len(bytes).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn meta_path(lab: &Lab) -> PathBuf {
    lab.path("agent").join("state").join("volume.json")
}

fn no_prompt(r: &Run) {
    assert!(
        !r.stderr.contains("confirmation required") && !r.stderr.contains("Type 'yes'"),
        "asked before checking: {}",
        r.stderr
    );
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn volume_cli_init_checks_everything_before_asking_or_recording() {
    assert!(
        !dm_in_kernel(),
        "this test is for a host without device-mapper (the VM lab covers the other case)"
    );
    let lab = Lab::start();
    // Not a path under /dev: refused by the CLI, nothing sent.
    let r = lab.run(Who::Landlord, "landlordctl", &["volume", "init", "vdb"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(r.stderr.contains("device \"vdb\""), "{}", r.stderr);
    // Missing: the agent's check refuses it, before any confirmation.
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["volume", "init", "/dev/nonexistent"],
    );
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stderr.contains("/dev/nonexistent: No such file"),
        "{}",
        r.stderr
    );
    no_prompt(&r);
    // A real, unused block device, but no device-mapper: refused (69,
    // unavailable) naming what is missing, with --yes and without.
    let dev = Loop::new(&lab.path("disk.img"), 64 << 20);
    for args in [
        &["volume", "init", dev.0.as_str()][..],
        &["--yes", "volume", "init", dev.0.as_str()],
    ] {
        let r = lab.run(Who::Landlord, "landlordctl", args);
        assert_eq!(r.code, 69, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr
                .contains("device-mapper is not in this kernel (no device-mapper in /proc/misc)")
                && r.stderr.contains("modprobe dm_crypt")
                && r.stderr.contains("nothing was written"),
            "{args:?}: {}",
            r.stderr
        );
        no_prompt(&r);
    }
    // Claimed by another kernel user that no list shows (here an exclusive
    // opener; a mount in another namespace, a btrfs member alike): the
    // kernel's refusal of an exclusive open says so, before anything else.
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let _claim = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(&dev.0)
            .unwrap();
        let r = lab.run(Who::Landlord, "landlordctl", &["volume", "init", &dev.0]);
        assert_eq!(r.code, 6, "{}", r.stderr);
        assert!(
            r.stderr
                .contains("is in use by the kernel (an exclusive open is refused"),
            "{}",
            r.stderr
        );
        no_prompt(&r);
    }
    // Too small for a filesystem: refused first, naming the sizes.
    let small = Loop::new(&lab.path("small.img"), 4 << 20);
    let r = lab.run(Who::Landlord, "landlordctl", &["volume", "init", &small.0]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("has 4194304 bytes; a ext4 volume needs at least 16781312"),
        "{}",
        r.stderr
    );
    // Nothing recorded, status honest.
    assert!(
        !meta_path(&lab).exists(),
        "metadata written by a refused init"
    );
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["--json", "volume", "status"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["state"], "none", "{}", r.stdout);
    // A bad --timeout is a usage error.
    let r = lab.run(Who::Landlord, "landlordctl", &["--timeout", "soon", "info"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

/// A lab whose node is assigned to tenant "acme", and the node's id.
fn assigned_lab() -> (Lab, String) {
    let lab = Lab::start();
    lab.run(Who::Landlord, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
    let node_id = lab
        .run(Who::Landlord, "landlordctl", &["--json", "info"])
        .json()["node_id"]
        .as_str()
        .unwrap()
        .to_owned();
    (lab, node_id)
}

/// The record the old agent left after `volume init` failed on this host,
/// with a key check value of another key (a key change came after it).
fn stuck_record(node_id: &str) -> String {
    serde_json::to_string_pretty(&stuck_meta(node_id)).unwrap()
}

/// [`stuck_record`] as a value, to vary.
fn stuck_meta(node_id: &str) -> VolumeMeta {
    VolumeMeta {
        signatures_checked: false,
        init_signature: None,
        tail_mark: None,
        format: FORMAT,
        id: "00112233445566778899aabbccddeeff".into(),
        node_id: node_id.into(),
        device: "/dev/leasehold-gone".into(),
        size_bytes: 64 << 20,
        sector_size: 4096,
        cipher: "aes-xts-plain64".into(),
        key_bytes: 64,
        options: vec!["sector_size:4096".into()],
        filesystem: "ext4".into(),
        key_generations: vec![("landlord".into(), 1), ("tenant".into(), 1)],
        kcv: "ffffffffffffffffffffffffffffffff".into(),
        state: VolumeState::Initializing,
        created: 1,
        made: 1,
        made_by: Some("initialized".into()),
    }
}

fn warned_but_done(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what}: {}", r.stderr);
    assert!(
        r.stderr
            .contains("warning: the volume was failed before this change"),
        "{what}: {}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("note: the key change itself was done (exit status 0)"),
        "{what}: {}",
        r.stderr
    );
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn volume_cli_stuck_volume_is_an_error_blocks_no_key_change_and_can_be_forgotten() {
    let (mut lab, node_id) = assigned_lab();
    lab.stop_agent();
    std::fs::write(meta_path(&lab), stuck_record(&node_id)).unwrap();
    lab.start_agent();

    // Status: an error, exit 1, saying what to do, for both roles.
    let r = lab.run(Who::Landlord, "landlordctl", &["volume", "status"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with("volume:      error"), "{}", r.stdout);
    assert!(r.stdout.contains("/dev/leasehold-gone"), "{}", r.stdout);
    assert!(
        r.stdout.contains("next:") && r.stdout.contains("landlordctl volume forget --yes"),
        "{}",
        r.stdout
    );
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["--json", "volume", "status"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["state"], "error", "{v}");
    assert!(v["error"].is_string() && v["next"].is_string(), "{v}");
    let r = lab.run(Who::Tenant, "tenantctl", &["volume", "status"]);
    assert_eq!(r.code, 1, "{}", r.stdout);

    // The prompts name the tenant and the volume (no terminal: exit 4).
    let r = lab.run(Who::Landlord, "landlordctl", &["release"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(
        r.stderr.contains("tenant \"acme\"") && r.stderr.contains("/dev/leasehold-gone"),
        "{}",
        r.stderr
    );

    // Both rotations go ahead, say what failed on stderr, exit 0; and
    // again (the first one's remake failed too).
    for _ in 0..2 {
        let r = lab.run(Who::Tenant, "tenantctl", &["--yes", "rotate"]);
        warned_but_done(&r, "tenant rotation");
        let r = lab.run(Who::Landlord, "landlordctl", &["--yes", "rotate"]);
        warned_but_done(&r, "landlord rotation");
    }
    // Release: the receipt says the kernel held no key and the volume
    // was failed.
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["--yes", "--json", "release"],
    );
    warned_but_done(&r, "release");
    let receipt = r.json()["receipt"].clone();
    assert!(receipt.is_object(), "{receipt}");
    assert_eq!(receipt["volume"]["kernel_key"], "not_mapped", "{receipt}");
    assert!(receipt["volume"]["failed"].is_string(), "{receipt}");
    let r = lab.run(Who::Landlord, "landlordctl", &["--yes", "assign", "beta"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // A restart does not turn it into a refusal ("key check value").
    lab.stop_agent();
    lab.start_agent();
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["--json", "volume", "status"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = r.json();
    assert!(
        !v["error"].as_str().unwrap().contains("key check value"),
        "{v}"
    );
    let r = lab.run(Who::Tenant, "tenantctl", &["--yes", "rotate"]);
    warned_but_done(&r, "tenant rotation after a restart");

    // Forget: asks (naming the device), refuses the tenant, then drops it.
    let r = lab.run(Who::Landlord, "landlordctl", &["volume", "forget"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("/dev/leasehold-gone"), "{}", r.stderr);
    assert!(meta_path(&lab).exists());
    let r = lab.run(Who::Tenant, "landlordctl", &["--yes", "volume", "forget"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let r = lab.run(Who::Landlord, "landlordctl", &["--yes", "volume", "forget"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("volume none"), "{}", r.stdout);
    assert!(!meta_path(&lab).exists());
    let r = lab.run(Who::Landlord, "landlordctl", &["volume", "status"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("volume: none"), "{}", r.stdout);
    // Nothing left to forget: a result, not an error.
    let r = lab.run(Who::Landlord, "landlordctl", &["--yes", "volume", "forget"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // And a key change is quiet again.
    let r = lab.run(Who::Tenant, "tenantctl", &["--yes", "rotate"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

/// The recorded device name now designates another disk of the same size
/// (a reboot renumbered `/dev/vdX`; a disk without a serial has no by-id
/// name): the remake at start and a key change's remake refuse it by its
/// missing mark before anything is written to it. (On this host the
/// mapping would fail anyway, for want of device-mapper: the message shows
/// which check refused; the VM lab's `volume` section shows the write it
/// prevents.)
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn volume_cli_a_remake_refuses_a_disk_without_the_volumes_mark() {
    let (mut lab, node_id) = assigned_lab();
    lab.stop_agent();
    let img = lab.path("other.img");
    let other = Loop::new(&img, 64 << 20);
    let mut m = stuck_meta(&node_id);
    m.device = other.0.clone();
    m.tail_mark = Some("ab".repeat(32));
    std::fs::write(meta_path(&lab), serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let blank = |what: &str| {
        let b = std::fs::read(&img).unwrap();
        assert!(b.iter().all(|x| *x == 0), "{what}: {img:?} was written");
    };
    lab.start_agent();
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["--json", "volume", "status"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["state"], "error", "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains(&other.0) && e.contains("not this volume's mark"),
        "{v}"
    );
    blank("the remake at start");
    // A key change goes ahead past the failed volume; its remake refuses
    // the disk the same way.
    let r = lab.run(Who::Tenant, "tenantctl", &["--yes", "rotate"]);
    warned_but_done(&r, "tenant rotation");
    // The remake runs after the reply: its record (made again under the
    // new key), then its own refusal.
    let t = std::time::Instant::now();
    loop {
        let v = lab
            .run(
                Who::Landlord,
                "landlordctl",
                &["--json", "volume", "status"],
            )
            .json();
        let remade = v["made_by"]
            .as_str()
            .is_some_and(|m| m.contains("recreated empty"));
        if remade && v["error"].is_string() {
            let e = v["error"].as_str().unwrap();
            assert!(e.contains("not this volume's mark"), "{v}");
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "the remake never ended: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    blank("a key change's remake");
}

/// SIGCONTs polkitd when dropped (a stopped process ignores the lab's
/// SIGTERM).
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        leasehold_tests::sh(&["kill", "-STOP", &pid.to_string()]);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// A long call (here: polkitd frozen, so the agent holds the call for its
/// 5 s authorization bound): `--timeout` ends the wait and says the node
/// may still act; on a terminal a progress line shows the wait, and
/// without one nothing is printed but the outcome.
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn volume_cli_long_calls_time_out_and_show_progress_only_on_a_terminal() {
    let lab = Lab::start();
    lab.run(Who::Landlord, "landlordctl", &["info"]).ok();
    let frozen = Frozen::new(lab.polkit_pid().expect("polkitd running"));
    let start = std::time::Instant::now();
    let r = lab.run(
        Who::Landlord,
        "landlordctl",
        &["--yes", "--timeout", "2s", "rotate"],
    );
    let took = start.elapsed();
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("timed out after 2s waiting for the node to rotate the landlord keys (--timeout); the node may still be doing it: see `landlordctl info`"),
        "{r:?}"
    );
    // The client's deadline, not the agent's 5 s polkit bound.
    assert!(
        took >= std::time::Duration::from_secs(2) && took < std::time::Duration::from_secs(4),
        "{took:?}"
    );
    assert!(!r.stderr.contains("waiting for the node,"), "{r:?}");
    // On a terminal (script(1) gives the CLI a pty for stdout and stderr).
    let cmd = format!(
        "{} --yes --timeout 3s rotate",
        leasehold_tests::bin("landlordctl").display()
    );
    let out = lab
        .command(Who::Landlord, Path::new("/usr/bin/script"))
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(
        // Each update rewrites the line; the line is erased at the end.
        tty.contains("\r\x1b[2Krotate the landlord keys: waiting for the node, 1s")
            // The last update may say 2s or, on a loaded host, 3s.
            && tty.contains("\r\x1b[2Klandlordctl: failed: timed out after 3s"),
        "{tty:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(frozen);
    // Nothing was rotated (polkit never answered: the agent refused).
    let info = lab
        .run(Who::Landlord, "landlordctl", &["--json", "info"])
        .ok()
        .json();
    assert_eq!(info["landlord_generation"], 1, "{info}");
}
