//! The per-instance `sd_notify` socket (docs/engines.md, "Runtime"):
//! a datagram socket the agent binds in the instance's run directory,
//! `<run_dir>/notify/notify`, whose directory the shim binds into the
//! engine at `/run/leasehold-notify` (`NOTIFY_SOCKET`). The agent's one
//! engine I/O thread reads every instance's socket, takes `READY=1` and
//! `WATCHDOG=1` from the engine's uid only (the kernel's
//! `SCM_CREDENTIALS`, not what the sender claims) and posts them to the
//! runtime; an instance's reading ends when its [`Notifier`] is dropped.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_engines::launch::NOTIFY_NAME;
use leasehold_engines::probe::{parse_notify, NotifyMessage, MAX_NOTIFY_DATAGRAM};
use nix::sys::socket::{
    recvmsg, setsockopt, sockopt::PassCred, ControlMessageOwned, MsgFlags, UnixAddr,
};

/// A `WATCHDOG=1` this soon after the last one passed on is dropped: an
/// engine pinging in a loop cannot keep the runtime thread busy (the
/// shortest watchdog is 100 ms).
const WATCHDOG_SPACING: Duration = Duration::from_millis(25);

/// Held by the runtime for a live instance; dropping it ends the reader.
pub struct Notifier {
    /// Write end of a pipe the I/O thread watches: closed on drop, seen
    /// as HUP.
    _stop: OwnedFd,
}

/// Makes `<run_dir>/notify/` (0755, root's) and binds the socket in it
/// (owned by `uid`, 0600: only the engine may send), replacing a stale one
/// (an instance re-adopted after an agent restart: the engine sends to the
/// same path and reaches the new socket). Returns the directory.
pub fn bind(run_dir: &Path, uid: u32) -> std::io::Result<(PathBuf, UnixDatagram)> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    // The run directory is the shim's (0700, root's); made here when the
    // socket comes first.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)?;
    let dir = run_dir.join("notify");
    match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // The unit's UMask=0077 masks the mode above to 0700: the engine's
    // uid could not reach the socket through it.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let path = dir.join(NOTIFY_NAME);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let sock = UnixDatagram::bind(&path)?;
    std::os::unix::fs::chown(&path, Some(uid), Some(uid))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    setsockopt(&sock, PassCred, &true).map_err(std::io::Error::from)?;
    Ok((dir, sock))
}

/// A re-adopted instance's socket: the one an earlier agent bound, if
/// systemd kept it across the restart ([`crate::fdstore`]) and it is still
/// the datagram socket bound at the instance's path — with whatever the
/// engine sent while no agent ran — else a new one ([`bind`]). The flag
/// says which (kept: already in the store).
pub fn kept_or_bind(
    run_dir: &Path,
    uid: u32,
    store: &crate::fdstore::FdStore,
) -> std::io::Result<(UnixDatagram, bool)> {
    if let Some(name) = crate::fdstore::notify_name(run_dir) {
        if let Some(fd) = store.take(&name) {
            let path = run_dir.join("notify").join(NOTIFY_NAME);
            let is_it = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
                .is_ok_and(|t| t == nix::sys::socket::SockType::Datagram)
                && nix::sys::socket::getsockname::<UnixAddr>(fd.as_raw_fd())
                    .ok()
                    .and_then(|a| a.path().map(Path::to_path_buf))
                    .is_some_and(|p| p == path);
            if is_it {
                let sock = UnixDatagram::from(fd);
                match setsockopt(&sock, PassCred, &true) {
                    Ok(()) => return Ok((sock, true)),
                    Err(e) => {
                        // Not read without credentials: out of the store.
                        store.remove(&name);
                        return Err(e.into());
                    }
                }
            }
            tracing::warn!(
                name,
                "the socket systemd kept is not the instance's: bound anew"
            );
            store.remove(&name);
        }
    }
    bind(run_dir, uid).map(|(_, sock)| (sock, false))
}

/// Discards what waits in a kept socket: sent by an engine that has since
/// exited (the shim restarted it while no agent ran), so its `READY=1` is
/// not the running engine's. Bounded; returns how many.
pub fn discard_queued(sock: &UnixDatagram) -> usize {
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 100_000 {
        match nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(_) => n += 1,
            Err(_) => break,
        }
    }
    n
}

/// Starts reading `sock` on the agent's engine I/O thread (`io`): each
/// accepted message goes to `post`; dropping the [`Notifier`] ends it.
pub fn watch(
    io: &super::output::LogSink,
    sock: UnixDatagram,
    uid: u32,
    label: String,
    ready: ReadyGate,
    post: impl Fn(NotifyMessage) -> bool + Send + 'static,
) -> std::io::Result<Notifier> {
    let (stop_r, stop_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    sock.set_nonblocking(true)?;
    io.watch_notify(
        NotifyReader {
            sock,
            uid,
            label,
            post: Box::new(post),
            last_watchdog: None,
            ready,
            refused: 0,
        },
        stop_r,
    )?;
    Ok(Notifier { _stop: stop_w })
}

/// In an instance's run directory (root's, 0700: out of the engine's
/// reach), since 2026-12-07: made at launch with a heartbeat, it says the
/// agent records the engine's `READY=1` in [`READY_MARK`]. An instance
/// without it was started by an older agent.
pub const READY_RECORDED: &str = "ready-recorded";
/// Present while the instance's current engine has sent `READY=1` (as the
/// agent heard it): made when the first one is passed on, removed when the
/// shim reports the engine's exit. A new agent re-adopting the instance
/// reads it (an engine sends `READY=1` once).
pub const READY_MARK: &str = "ready";

/// Makes [`READY_RECORDED`] in a new instance's run directory.
pub fn record_readiness(run_dir: &Path) -> std::io::Result<()> {
    std::fs::File::create(run_dir.join(READY_RECORDED)).map(drop)
}

/// Whether a READY=1 is passed on: once per engine. The shim's records
/// (a respawn) hold it from the old engine's exit (a late READY=1 of the
/// old engine is not the new one's) and open it again just before the new
/// engine starts. With a mark ([`ReadyGate::recorded`]) the engine's
/// readiness is also kept in its run directory, for the next agent.
#[derive(Debug, Clone, Default)]
pub struct ReadyGate {
    state: Arc<AtomicU8>,
    /// Held at least once: an engine of the instance exited.
    cycled: Arc<std::sync::atomic::AtomicBool>,
    /// The socket in systemd's store while the engine has not said
    /// `READY=1` ([`Keep`]).
    keep: Option<Arc<Keep>>,
    /// `<run_dir>/ready` ([`READY_MARK`]).
    mark: Option<Arc<Path>>,
}

const GATE_OPEN: u8 = 0;
const GATE_PASSED: u8 = 1;
const GATE_HELD: u8 = 2;

impl ReadyGate {
    /// A gate that keeps [`READY_MARK`] in `run_dir` (heartbeat on).
    pub fn recorded(run_dir: &Path) -> Self {
        Self {
            state: Arc::default(),
            cycled: Arc::default(),
            keep: None,
            mark: Some(run_dir.join(READY_MARK).into()),
        }
    }

    /// Keeps the instance's socket in systemd's store while its engine
    /// has not said `READY=1`: from now (unless `keep` came back from the
    /// store), again from each new engine's start, out of it once it is
    /// said.
    pub fn with_keep(mut self, keep: Keep, in_store: bool) -> Self {
        if !in_store {
            keep.put_fresh();
        }
        self.keep = Some(Arc::new(keep));
        self
    }

    /// A READY=1 came: pass it on (the first since the gate opened)? The
    /// mark is made before it is passed on: an agent killed in between
    /// leaves a ready engine unmarked (the next agent waits for a
    /// `READY=1` that will not come, and the ready timeout restarts it),
    /// never an unready one marked.
    fn pass(&self) -> bool {
        let passed = self
            .state
            .compare_exchange(GATE_OPEN, GATE_PASSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if passed {
            if let Some(m) = &self.mark {
                if let Err(err) = std::fs::File::create(m) {
                    tracing::error!(path = %m.display(), error = %err, "cannot record the engine's READY=1");
                }
            }
            if let Some(k) = &self.keep {
                k.take_out();
            }
        }
        passed
    }
    /// The engine exited: no READY=1 until [`ReadyGate::open`], and its
    /// mark goes.
    pub fn hold(&self) {
        self.state.store(GATE_HELD, Ordering::Release);
        self.cycled.store(true, Ordering::Release);
        // From the exit on, the next engine's READY=1 is awaited: an agent
        // restarted during the respawn's delay must not lose it.
        if let Some(k) = &self.keep {
            k.put();
        }
        if let Some(m) = &self.mark {
            match std::fs::remove_file(m) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::error!(path = %m.display(), error = %err, "cannot remove the engine's READY=1 record")
                }
            }
        }
    }
    /// Whether an engine of the instance has exited since the gate was
    /// made (for a re-adopted instance: while no agent ran, its records
    /// stepped).
    pub fn cycled(&self) -> bool {
        self.cycled.load(Ordering::Acquire)
    }

    /// A new engine starts: its first READY=1 is passed on.
    pub fn open(&self) {
        self.state.store(GATE_OPEN, Ordering::Release);
        if let Some(k) = &self.keep {
            k.put();
        }
    }

    /// A re-adopted instance (its unread shim records already stepped):
    /// had its running engine sent `READY=1` under an earlier agent? Yes
    /// when [`READY_MARK`] is there, or when the instance predates the
    /// record ([`READY_RECORDED`] absent: taken as ready, as agents did
    /// before it); then the gate counts it as passed. No when the engine
    /// exited meanwhile (held). Called before the instance's reader
    /// starts, so the gate is this thread's alone.
    pub fn readopted_ready(&self, run_dir: &Path) -> bool {
        let was = !run_dir.join(READY_RECORDED).exists()
            || self.mark.as_ref().is_some_and(|m| m.exists());
        let ready = was
            && self
                .state
                .compare_exchange(GATE_OPEN, GATE_PASSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if ready {
            if let Some(k) = &self.keep {
                k.take_out();
            }
        }
        ready
    }
}

/// An instance's notify socket in systemd's descriptor store
/// ([`crate::fdstore`]) while its engine has not said `READY=1`, the one
/// message a later agent needs (it is sent once). Out of the store once
/// said: the watchdog's pings, sent while no agent runs, are refused as
/// before rather than queued — a kept socket's queue is short
/// (`net.unix.max_dgram_qlen`, 10 on Linux 6.1), and a full one would
/// block an engine's blocking send until an agent reads it.
#[derive(Debug)]
pub struct Keep {
    store: Arc<crate::fdstore::FdStore>,
    name: String,
    /// A copy of the socket (the reader has its own).
    sock: OwnedFd,
}

impl Keep {
    pub fn new(store: Arc<crate::fdstore::FdStore>, name: String, sock: OwnedFd) -> Self {
        Self { store, name, sock }
    }

    /// Stored (systemd keeps one copy of the same socket however often).
    fn put(&self) {
        use std::os::fd::AsFd;
        self.store.store(&self.name, self.sock.as_fd());
    }

    /// Stored in place of whatever the store holds under the name (a
    /// socket bound at the same path before: not this one).
    fn put_fresh(&self) {
        self.store.remove(&self.name);
        self.put();
    }

    fn take_out(&self) {
        self.store.remove(&self.name);
    }
}

/// One instance's socket and what was passed on so far.
pub struct NotifyReader {
    sock: UnixDatagram,
    uid: u32,
    label: String,
    post: Box<dyn Fn(NotifyMessage) -> bool + Send>,
    last_watchdog: Option<Instant>,
    ready: ReadyGate,
    refused: u32,
}

impl NotifyReader {
    /// The socket (the I/O thread waits for it to be readable).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.sock.as_fd()
    }

    /// Takes one datagram if there is one (`buf`: any scratch space; one
    /// byte over [`MAX_NOTIFY_DATAGRAM`] of it is used). `false`: the
    /// reader is done (the runtime is gone, or the socket failed).
    pub fn read_one(&mut self, buf: &mut [u8]) -> bool {
        // One byte over the cap: a longer datagram shows as truncated.
        let cap = (MAX_NOTIFY_DATAGRAM + 1).min(buf.len());
        let buf = &mut buf[..cap];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let mut iov = [IoSliceMut::new(buf)];
        let (len, sender, truncated) = match recvmsg::<UnixAddr>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => {
                let sender = m.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|c| match c {
                        ControlMessageOwned::ScmCredentials(cr) => Some(cr.uid()),
                        _ => None,
                    })
                });
                (m.bytes, sender, m.flags.contains(MsgFlags::MSG_TRUNC))
            }
            Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => return true,
            Err(_) => return false,
        };
        let buf: &[u8] = &iov[0];
        if sender != Some(self.uid) {
            // Only the engine's uid can open the socket; anything else is
            // a bug or an attack: counted, logged once in a while.
            self.refused = self.refused.saturating_add(1);
            if self.refused.is_power_of_two() {
                tracing::warn!(
                    engine = self.label,
                    ?sender,
                    refused = self.refused,
                    "notify message from another uid ignored"
                );
            }
            return true;
        }
        let Some(mut m) = parse_notify(&buf[..len.min(buf.len())]).filter(|_| !truncated) else {
            return true;
        };
        if m.ready && !self.ready.pass() {
            m.ready = false;
        }
        if m.watchdog {
            let now = Instant::now();
            if self
                .last_watchdog
                .is_some_and(|t| now.duration_since(t) < WATCHDOG_SPACING)
            {
                m.watchdog = false;
            } else {
                self.last_watchdog = Some(now);
            }
        }
        if !m.ready && !m.watchdog {
            return true;
        }
        (self.post)(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Nowhere;
    impl crate::engines::VolumeDir for Nowhere {
        fn mounted(&self) -> Option<PathBuf> {
            None
        }
    }

    fn sink() -> super::super::output::LogSink {
        super::super::output::LogSink::start(
            std::sync::Arc::new(Nowhere),
            leasehold_engines::logs::MIN_MAX_BYTES,
            1 << 20,
        )
        .unwrap()
    }

    /// A kept socket's queue from an engine that exited while no agent
    /// ran: the gate says an engine cycled, and what waited is discarded
    /// (its READY=1 is not the running engine's); a kept socket that is
    /// not the instance's is replaced by a new one at the path.
    #[test]
    fn what_an_exited_engine_left_in_a_kept_socket_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let g = ReadyGate::recorded(dir.path());
        assert!(!g.cycled());
        g.hold();
        g.open();
        assert!(g.cycled(), "an exit and a respawn: cycled");
        let (_, sock) = bind(dir.path(), nix::unistd::getuid().as_raw()).unwrap();
        let path = dir.path().join("notify").join(NOTIFY_NAME);
        let c = UnixDatagram::unbound().unwrap();
        for m in [&b"READY=1"[..], b"WATCHDOG=1", b"READY=1"] {
            c.send_to(m, &path).unwrap();
        }
        sock.set_nonblocking(true).unwrap();
        assert_eq!(discard_queued(&sock), 3);
        assert_eq!(discard_queued(&sock), 0);

        // Kept: the same socket comes back (what is sent to the path
        // reaches it); one bound elsewhere does not.
        let name = crate::fdstore::notify_name(dir.path()).unwrap();
        let other = UnixDatagram::bind(dir.path().join("elsewhere")).unwrap();
        let store = crate::fdstore::FdStore::to_socket(
            &dir.path().join("no-systemd"),
            std::collections::BTreeMap::from([(name.clone(), OwnedFd::from(sock))]),
        );
        let (kept, was_kept) = kept_or_bind(dir.path(), 0, &store).unwrap();
        assert!(was_kept);
        c.send_to(b"READY=1", &path).unwrap();
        kept.set_nonblocking(true).unwrap();
        assert_eq!(discard_queued(&kept), 1);
        let store = crate::fdstore::FdStore::to_socket(
            &dir.path().join("no-systemd"),
            std::collections::BTreeMap::from([(name, OwnedFd::from(other))]),
        );
        let (_new, was_kept) =
            kept_or_bind(dir.path(), nix::unistd::getuid().as_raw(), &store).unwrap();
        assert!(!was_kept, "a socket bound elsewhere is not the instance's");
    }

    /// In systemd's store (a stand-in) exactly while the current engine
    /// has not said READY=1: stored fresh at the start, out once said,
    /// in again at a new engine's start, out when a re-adopted engine had
    /// said it.
    #[test]
    fn the_socket_is_stored_while_ready_is_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let systemd = UnixDatagram::bind(dir.path().join("systemd")).unwrap();
        let store = Arc::new(crate::fdstore::FdStore::to_socket(
            &dir.path().join("systemd"),
            Default::default(),
        ));
        let (_, sock) = bind(dir.path(), nix::unistd::getuid().as_raw()).unwrap();
        let keep = |s: &UnixDatagram| {
            Keep::new(
                store.clone(),
                "notify/x".into(),
                s.try_clone().unwrap().into(),
            )
        };
        let next = || crate::fdstore::received(&systemd).map(|(t, fds)| (t, fds.len()));
        let stored = Some(("FDSTORE=1\nFDNAME=notify/x".to_owned(), 1));
        let removed = Some(("FDSTOREREMOVE=1\nFDNAME=notify/x".to_owned(), 0));
        record_readiness(dir.path()).unwrap();
        let g = ReadyGate::recorded(dir.path()).with_keep(keep(&sock), false);
        assert_eq!(
            (next(), next(), next()),
            (removed.clone(), stored.clone(), None)
        );
        assert!(g.pass());
        assert_eq!((next(), next()), (removed.clone(), None));
        assert!(!g.pass(), "once per engine");
        assert_eq!(next(), None);
        g.hold();
        assert_eq!(
            (next(), next()),
            (stored.clone(), None),
            "from an exit on, the next engine's READY=1 is awaited"
        );
        g.open();
        assert_eq!((next(), next()), (stored.clone(), None));
        // Re-adopted, came back from the store: nothing stored again; its
        // READY=1 heard: out.
        let g = ReadyGate::recorded(dir.path()).with_keep(keep(&sock), true);
        assert_eq!(next(), None);
        assert!(g.pass());
        assert_eq!((next(), next()), (removed.clone(), None));
        // Its READY=1 heard by an earlier agent (the mark): out at once.
        let g = ReadyGate::recorded(dir.path()).with_keep(keep(&sock), true);
        assert!(g.readopted_ready(dir.path()));
        assert_eq!((next(), next()), (removed, None));
    }

    #[test]
    fn the_ready_mark_follows_the_current_engines_ready() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join(READY_MARK);
        record_readiness(dir.path()).unwrap();
        let g = ReadyGate::recorded(dir.path());
        assert!(!mark.exists());
        assert!(g.pass());
        assert!(mark.exists(), "made when READY=1 is passed on");
        g.hold();
        assert!(!mark.exists(), "gone with the engine's exit");
        g.open();
        assert!(!mark.exists(), "the new engine has not said READY=1");
        // A new agent: a fresh gate on the same directory.
        let g2 = ReadyGate::recorded(dir.path());
        assert!(!g2.readopted_ready(dir.path()), "not ready: no mark");
        assert!(g2.pass(), "its READY=1 still passes");
        let g3 = ReadyGate::recorded(dir.path());
        assert!(g3.readopted_ready(dir.path()), "marked");
        assert!(!g3.pass(), "counted as passed");
        // Held (an exit read on adoption): not ready, the mark gone with
        // it; and held with a mark there still (the gate decides).
        let g4 = ReadyGate::recorded(dir.path());
        std::fs::File::create(&mark).unwrap();
        g4.hold();
        assert!(!mark.exists());
        assert!(!g4.readopted_ready(dir.path()));
        std::fs::File::create(&mark).unwrap();
        assert!(!g4.readopted_ready(dir.path()), "held");
        std::fs::remove_file(&mark).unwrap();
        // An instance an older agent started: taken as ready.
        std::fs::remove_file(dir.path().join(READY_RECORDED)).unwrap();
        assert!(ReadyGate::recorded(dir.path()).readopted_ready(dir.path()));
    }

    #[test]
    fn the_ready_gate_passes_one_ready_per_engine() {
        let g = ReadyGate::default();
        assert!(g.pass());
        assert!(!g.pass(), "once");
        g.hold();
        assert!(!g.pass(), "no engine runs (a late READY=1 of the old one)");
        let shared = g.clone();
        shared.open();
        assert!(g.pass(), "the new engine's");
        assert!(!g.pass());
    }

    #[test]
    fn only_the_engines_uid_is_heard_and_floods_are_thinned() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::getuid().as_raw();
        let (d, sock) = bind(dir.path(), me).unwrap();
        let path = d.join(NOTIFY_NAME);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let (tx, rx) = mpsc::channel();
        let io = sink();
        let n = watch(&io, sock, me, "t".into(), ReadyGate::default(), move |m| {
            tx.send(m).is_ok()
        })
        .unwrap();
        let c = UnixDatagram::unbound().unwrap();
        c.send_to(b"STATUS=starting", &path).unwrap();
        c.send_to(b"READY=1\nSTATUS=up", &path).unwrap();
        let m = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(m.ready && !m.watchdog, "{m:?}");
        // A burst of pings: the first passes, the rest within the spacing
        // are dropped; a second READY=1 is not passed on.
        for _ in 0..50 {
            c.send_to(b"WATCHDOG=1\nREADY=1", &path).unwrap();
        }
        let m = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(m.watchdog && !m.ready, "{m:?}");
        // An oversized datagram is dropped whole.
        let mut big = b"WATCHDOG=1\n".to_vec();
        big.resize(MAX_NOTIFY_DATAGRAM + 10, b'x');
        std::thread::sleep(WATCHDOG_SPACING * 2);
        c.send_to(&big, &path).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        std::thread::sleep(WATCHDOG_SPACING * 2);
        c.send_to(b"WATCHDOG=1", &path).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap().watchdog);
        drop(n);
    }

    #[test]
    fn another_uid_is_not_heard() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::getuid().as_raw();
        // The socket is bound for another uid: this process's messages
        // (its real credentials) are refused.
        let (d, sock) = bind(dir.path(), me).unwrap();
        let (tx, rx) = mpsc::channel();
        let io = sink();
        let _n = watch(
            &io,
            sock,
            me.wrapping_add(1),
            "t".into(),
            ReadyGate::default(),
            move |m| tx.send(m).is_ok(),
        )
        .unwrap();
        let c = UnixDatagram::unbound().unwrap();
        c.send_to(b"READY=1", d.join(NOTIFY_NAME)).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    }
}
