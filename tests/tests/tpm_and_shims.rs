//! T1 (root): the agent's TPM on swtpm while engine shims are spawned.
//!
//! libtss2's `swtpm:` TCTI connects to swtpm once per TPM command, without
//! close-on-exec, and swtpm serves one connection at a time. A long-lived
//! child spawned while a command is in flight inherits that connection; if
//! it kept it open, swtpm would never accept the next command and the
//! agent's key thread would wait forever (docs/engines.md, "No descriptor
//! of the agent's"). Here: warm shims (the agent's long-lived children) are
//! spawned from a second thread while the first runs TPM commands, as the
//! agent does at every start. With a shim that kept what it inherited this
//! hung within a few commands.

use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_tests::bin;
use leasehold_tpm::swtpm::Swtpm;
use leasehold_tpm::KeyHierarchy;

/// How many shims are spawned.
const SHIMS: usize = 300;

/// No TPM command finishing for this long is the hang.
const STALL: Duration = Duration::from_secs(10);

type Kept = Arc<Mutex<Vec<(Child, std::os::unix::net::UnixStream)>>>;

#[test]
#[ignore = "needs root: engine shims (namespaces)"]
fn tpm_commands_go_on_while_shims_are_spawned() {
    let shim = bin("leasehold-engine-shim");
    let tmp = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&tmp.path().join("tpm")).unwrap();
    let (mut keys, _) = KeyHierarchy::open(&swtpm.key_config(tmp.path().join("state"))).unwrap();
    // Each warm shim waits on its stdin (a socket whose other end is
    // kept here) as the agent's does; dropping that end ends it.
    let kept: Kept = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let spawner = {
        let (kept, done) = (kept.clone(), done.clone());
        std::thread::spawn(move || {
            for _ in 0..SHIMS {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
                let child = Command::new(&shim)
                    // leasehold_engines::launch::WARM (that crate is not
                    // a dependency of this one).
                    .arg("--warm")
                    .stdin(Stdio::from(OwnedFd::from(theirs)))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                kept.lock().unwrap().push((child, ours));
                // Spread over the TPM commands of the other thread.
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // The watchdog: commands stalled for STALL is the hang; ending every
    // shim then lets swtpm go on, so the test fails saying so instead of
    // hanging.
    let finished = Arc::new(AtomicU64::new(0));
    let stalled = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (kept, done, finished, stalled) = (
            kept.clone(),
            done.clone(),
            finished.clone(),
            stalled.clone(),
        );
        std::thread::spawn(move || {
            let mut last = u64::MAX;
            while !done.load(Ordering::Relaxed) {
                std::thread::park_timeout(STALL);
                let now = finished.load(Ordering::Relaxed);
                if now == last && !done.load(Ordering::Relaxed) {
                    stalled.store(true, Ordering::Relaxed);
                    done.store(true, Ordering::Relaxed);
                    kept.lock().unwrap().clear();
                    return;
                }
                last = now;
            }
        })
    };
    while !spawner.is_finished() {
        keys.ping().unwrap();
        finished.fetch_add(1, Ordering::Relaxed);
    }
    done.store(true, Ordering::Relaxed);
    watchdog.thread().unpark();
    watchdog.join().unwrap();
    spawner.join().unwrap();
    let shims = kept.lock().unwrap().len();
    kept.lock().unwrap().clear();
    keys.shutdown().unwrap();
    swtpm.stop().unwrap();
    assert!(
        !stalled.load(Ordering::Relaxed),
        "no TPM command finished for {STALL:?} while shims were spawned (after {}): a shim kept the TPM connection it inherited",
        finished.load(Ordering::Relaxed)
    );
    eprintln!(
        "{} TPM commands while {shims} warm shims were spawned",
        finished.load(Ordering::Relaxed)
    );
}
