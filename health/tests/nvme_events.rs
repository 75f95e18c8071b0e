//! Turning NVMe SMART events on through a fake nvme-cli (docs/health.md
//! "SMART events"): the kernel's bits kept, read back, refusals named, a
//! hung nvme killed at its timeout.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use leasehold_health::nvme::{controllers, enable_smart_events, Enabled};

/// A fake `nvme`: the feature's value lives in `<dir>/aec`; `set-feature`
/// writes it (with `<dir>/stubborn`: keeps only the low two bits of
/// anything but 0x100, a controller that takes the value as something
/// else); only the long options are accepted; `<dir>/hang` hangs it.
fn fake_nvme(dir: &Path) -> PathBuf {
    let script = dir.join("nvme");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             d={dir}\n\
             echo \"$@\" >> $d/calls\n\
             if [ -e $d/hang ]; then sleep 1000; fi\n\
             [ \"$2\" = /dev/nvme0 ] && [ \"$3\" = --feature-id=0x0b ] || {{ echo bad args >&2; exit 22; }}\n\
             case $1 in\n\
             get-feature) [ $# = 3 ] || exit 22; printf 'get-feature:0x0b (Async Event Configuration), Current value:0x%08x\\n' $(cat $d/aec) ;;\n\
             set-feature) case $4 in --value=0x*) ;; *) exit 22 ;; esac; [ $# = 4 ] || exit 22\n\
               v=${{4#--value=}}; if [ -e $d/stubborn ] && [ $v != 0x100 ]; then printf '%d' $(( $v & 0x3 )) > $d/aec; elif [ -e $d/partial ]; then printf '%d' $(( $v & ~0x10 )) > $d/aec; else printf '%d' $v > $d/aec; fi; echo set-feature:0x0b ;;\n\
             *) exit 22 ;;\n\
             esac\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn calls(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

const T: Duration = Duration::from_secs(5);

#[test]
fn smart_bits_are_added_to_the_kernels_and_read_back() {
    let d = tempfile::tempdir().unwrap();
    let nvme = fake_nvme(d.path());
    fs::write(d.path().join("aec"), "256").unwrap(); // the kernel's 0x100
    let r = enable_smart_events(&nvme, Path::new("/dev"), "nvme0", T).unwrap();
    assert_eq!(
        r,
        Enabled::Set {
            before: 0x100,
            after: 0x11f
        }
    );
    assert_eq!(
        calls(d.path()),
        [
            "get-feature /dev/nvme0 --feature-id=0x0b",
            "set-feature /dev/nvme0 --feature-id=0x0b --value=0x11f",
            "get-feature /dev/nvme0 --feature-id=0x0b"
        ]
    );
    // Again: on already, nothing set.
    let r = enable_smart_events(&nvme, Path::new("/dev"), "nvme0", T).unwrap();
    assert_eq!(r, Enabled::Already(0x11f));
    assert_eq!(calls(d.path()).len(), 4);
}

#[test]
fn a_controller_that_keeps_its_value_or_fails_is_an_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let nvme = fake_nvme(d.path());
    fs::write(d.path().join("aec"), "256").unwrap();
    fs::write(d.path().join("stubborn"), "").unwrap();
    // A controller that takes the value as something else (here: only its
    // low two bits): refused, and the kernel's value put back.
    let e = enable_smart_events(&nvme, Path::new("/dev"), "nvme0", T).unwrap_err();
    assert!(
        e.contains("holds 0x3 after set-feature 0x11f (was 0x100); 0x100 put back"),
        "{e}"
    );
    assert_eq!(fs::read_to_string(d.path().join("aec")).unwrap(), "256");
    assert_eq!(
        calls(d.path()).last().unwrap(),
        "set-feature /dev/nvme0 --feature-id=0x0b --value=0x100"
    );
    // nvme-cli refusing (another device): the command, its exit code and
    // what it said on stderr.
    let e = enable_smart_events(&nvme, Path::new("/dev"), "nvme1", T).unwrap_err();
    assert!(
        e.contains("nvme get-feature /dev/nvme1 --feature-id=0x0b exited with 22: \"bad args"),
        "{e}"
    );
    // Not a controller's name: nothing run.
    let before = calls(d.path()).len();
    for bad in ["../sda", "nvme0n1", "sda", ""] {
        let e = enable_smart_events(&nvme, Path::new("/dev"), bad, T).unwrap_err();
        assert!(e.contains("not an NVMe controller"), "{e}");
    }
    assert_eq!(calls(d.path()).len(), before);
    // No nvme-cli installed.
    let e =
        enable_smart_events(&d.path().join("absent"), Path::new("/dev"), "nvme0", T).unwrap_err();
    assert!(e.contains("cannot run"), "{e}");
}

#[test]
fn a_controller_without_one_warning_keeps_the_others() {
    let d = tempfile::tempdir().unwrap();
    let nvme = fake_nvme(d.path());
    fs::write(d.path().join("aec"), "256").unwrap();
    fs::write(d.path().join("partial"), "").unwrap();
    let r = enable_smart_events(&nvme, Path::new("/dev"), "nvme0", T).unwrap();
    assert_eq!(
        r,
        Enabled::Set {
            before: 0x100,
            after: 0x10f
        }
    );
}

#[test]
fn a_hung_nvme_is_killed_at_its_timeout() {
    let d = tempfile::tempdir().unwrap();
    let nvme = fake_nvme(d.path());
    fs::write(d.path().join("aec"), "256").unwrap();
    fs::write(d.path().join("hang"), "").unwrap();
    let t0 = Instant::now();
    let e = enable_smart_events(
        &nvme,
        Path::new("/dev"),
        "nvme0",
        Duration::from_millis(300),
    )
    .unwrap_err();
    assert!(e.contains("did not finish within 300 ms"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn controllers_are_listed_from_sysfs_and_namespaces_left_out() {
    let d = tempfile::tempdir().unwrap();
    for n in ["nvme1", "nvme0", "nvme-subsys0", "nvme0n1"] {
        fs::create_dir_all(d.path().join("class/nvme").join(n)).unwrap();
    }
    assert_eq!(controllers(d.path()), ["nvme0", "nvme1"]);
    assert!(controllers(&d.path().join("absent")).is_empty());
}
