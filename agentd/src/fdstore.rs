//! systemd's file descriptor store (`FDSTORE=1`, `FileDescriptorStoreMax=`
//! in the unit): the engines' notify sockets kept by the service manager
//! across an agent restart, so a `READY=1` an engine sends while no agent
//! runs waits in its socket for the next agent instead of being refused
//! (docs/engines.md, "Heartbeat"). systemd keeps the store while the unit
//! runs or has a job queued (a restart, an upgrade's restart, a restart
//! after a crash or the watchdog) and closes it when the unit stops; the
//! next agent gets the descriptors back as `LISTEN_FDS`, by name.
//!
//! Without `NOTIFY_SOCKET` (development mode, tests) the store is off and
//! every call is a no-op.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Mutex;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

/// systemd's bound on a descriptor's name (`FDNAME_MAX`).
const MAX_NAME: usize = 255;
/// The prefix of every name the agent stores: what it takes back.
const PREFIX: &str = "notify";

/// The agent's side of the store.
#[derive(Debug, Default)]
pub struct FdStore {
    /// `NOTIFY_SOCKET`'s address; None: off.
    socket: Option<UnixAddr>,
    /// What the service manager passed back at start, by name, until a
    /// re-adopted instance takes its own.
    passed: Mutex<BTreeMap<String, OwnedFd>>,
}

/// The store's name for the notify socket of the instance in `run_dir`:
/// `notify` and the path. None when systemd would refuse it (over 255
/// bytes, a ':' or a byte that is not printable ASCII): that socket is
/// not kept, as before the store.
pub fn notify_name(run_dir: &Path) -> Option<String> {
    let path = run_dir.as_os_str().as_bytes();
    let ok = path.iter().all(|&b| b.is_ascii_graphic() && b != b':')
        && PREFIX.len() + path.len() <= MAX_NAME;
    ok.then(|| format!("{PREFIX}{}", run_dir.display()))
}

impl FdStore {
    /// Off: nothing stored, nothing passed back.
    pub fn off() -> Self {
        Self::default()
    }

    /// Under systemd (`NOTIFY_SOCKET`): on, with the descriptors it passed
    /// back (`LISTEN_FDS`, `LISTEN_FDNAMES`; checked against
    /// `LISTEN_PID`). Call before any other descriptor is opened by a
    /// thread of the agent's (the passed ones are numbers from 3 on).
    pub fn from_env() -> Self {
        let Some(addr) = std::env::var_os("NOTIFY_SOCKET").and_then(|s| notify_addr(&s)) else {
            return Self::off();
        };
        let listed = match sd_notify::listen_fds_with_names() {
            Ok(fds) => fds.collect(),
            Err(e) => {
                tracing::warn!(error = %e, "the descriptors passed by systemd could not be read");
                Vec::new()
            }
        };
        let (passed, dropped) = taken(listed, own_all);
        let store = Self {
            socket: Some(addr),
            passed: Mutex::new(passed),
        };
        // Not usable: dropped from the store, so it does not come back at
        // every start.
        for n in &dropped {
            store.remove(n);
        }
        let kept = lock(&store.passed).len();
        if kept > 0 || !dropped.is_empty() {
            tracing::info!(
                kept,
                dropped = ?dropped,
                "notify sockets kept across the restart by systemd"
            );
        }
        store
    }

    /// A store that sends to `socket` (tests: a stand-in for systemd).
    #[cfg(test)]
    pub fn to_socket(socket: &Path, passed: BTreeMap<String, OwnedFd>) -> Self {
        Self {
            socket: UnixAddr::new(socket).ok(),
            passed: Mutex::new(passed),
        }
    }

    /// Whether descriptors are stored at all.
    pub fn is_on(&self) -> bool {
        self.socket.is_some()
    }

    /// Stores `fd` under `name`. A send that fails is logged; systemd
    /// says nothing back (a full store, `NotifyAccess`): then the engine's
    /// `READY=1` sent while no agent runs is lost, as before the store.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) {
        if let Err(e) = self.send(&format!("FDSTORE=1\nFDNAME={name}"), Some(fd)) {
            tracing::warn!(name, error = %e, "systemd did not take the notify socket");
        }
    }

    /// Drops `name` from the store (the instance ended).
    pub fn remove(&self, name: &str) {
        if let Err(e) = self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None) {
            tracing::warn!(name, error = %e, "the notify socket was not dropped from systemd's store");
        }
    }

    /// Drops the notify socket of the instance in `run_dir` from the store
    /// (its instance ended); nothing when off.
    pub fn remove_instance(&self, run_dir: &Path) {
        if let Some(n) = notify_name(run_dir).filter(|_| self.is_on()) {
            self.remove(&n);
        }
    }

    /// The descriptor passed back under `name`, once.
    pub fn take(&self, name: &str) -> Option<OwnedFd> {
        lock(&self.passed).remove(name)
    }

    /// Every passed-back descriptor no instance took (its instance is
    /// gone): dropped from the store and closed. Returns their names.
    pub fn release_unclaimed(&self) -> Vec<String> {
        let left = std::mem::take(&mut *lock(&self.passed));
        let names: Vec<String> = left.into_keys().collect();
        for n in &names {
            self.remove(n);
        }
        names
    }

    fn send(&self, state: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        let Some(addr) = &self.socket else {
            return Ok(());
        };
        let sock = UnixDatagram::unbound()?;
        let iov = [IoSlice::new(state.as_bytes())];
        let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        // Never waits: the caller may be the engine I/O thread, and PID 1
        // may be busy (a daemon-reload); a full queue is logged as a
        // failed send.
        sendmsg(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
            Some(addr),
        )?;
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `NOTIFY_SOCKET`: a path, or `@name` for the abstract namespace.
fn notify_addr(s: &std::ffi::OsStr) -> Option<UnixAddr> {
    let b = s.as_bytes();
    match b.first()? {
        b'/' => UnixAddr::new(Path::new(s)).ok(),
        b'@' => UnixAddr::new_abstract(&b[1..]).ok(),
        _ => None,
    }
}

/// What systemd passed back, sorted: the agent's by name, and the names
/// not to use (each dropped from the store). A name passed twice (a
/// socket bound anew at the same path while the old one stayed stored)
/// cannot say which copy the engine reaches: neither is used, and the
/// instance binds a new socket.
fn taken(
    listed: Vec<(i32, String)>,
    own_all: impl FnOnce(Vec<i32>) -> Vec<std::io::Result<OwnedFd>>,
) -> (BTreeMap<String, OwnedFd>, Vec<String>) {
    let (raws, names): (Vec<i32>, Vec<String>) = listed.into_iter().unzip();
    let mut passed = BTreeMap::new();
    let mut dropped = std::collections::BTreeSet::new();
    for (fd, name) in own_all(raws).into_iter().zip(names) {
        match fd {
            Err(e) => {
                tracing::warn!(name, error = %e, "a descriptor passed by systemd could not be taken");
                dropped.insert(name);
            }
            Ok(_) if !name.starts_with(PREFIX) => {
                tracing::warn!(
                    name,
                    "a descriptor passed by systemd that is not the agent's: closed"
                );
                dropped.insert(name);
            }
            Ok(fd) => {
                if passed.insert(name.clone(), fd).is_some() {
                    dropped.insert(name);
                }
            }
        }
    }
    for n in &dropped {
        passed.remove(n);
    }
    (passed, dropped.into_iter().collect())
}

/// Owned copies of descriptor numbers of this process that systemd passed
/// (nothing else owns them), each number closed whatever happens. Through
/// `pidfd_getfd` on the agent's own pidfd: the safe way to own a number
/// (the workspace forbids `unsafe`).
fn own_all(raws: Vec<i32>) -> Vec<std::io::Result<OwnedFd>> {
    use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};
    let me = pidfd_open(getpid(), PidfdFlags::empty());
    raws.into_iter()
        .map(|raw| {
            let fd = match &me {
                Ok(me) => pidfd_getfd(me, raw, PidfdGetfdFlags::empty()).map_err(Into::into),
                Err(e) => Err(std::io::Error::from(*e)),
            };
            let _ = nix::unistd::close(raw);
            fd
        })
        .collect()
}

#[cfg(test)]
fn own(raw: i32) -> std::io::Result<OwnedFd> {
    own_all(vec![raw]).remove(0)
}

/// One message a stand-in for systemd's notify socket received: its text
/// and descriptors (tests; non-blocking: None when nothing waits).
#[cfg(test)]
pub(crate) fn received(sock: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    let mut buf = [0u8; 1024];
    let mut cmsg = nix::cmsg_space!([i32; 4]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let m = recvmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    let mut fds = Vec::new();
    for c in m.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(r) = c {
            for raw in r {
                fds.push(own(raw).ok()?);
            }
        }
    }
    let n = m.bytes;
    Some((String::from_utf8_lossy(&buf[..n]).into_owned(), fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The agent's by name; a name passed twice, one not the agent's and
    /// one that could not be taken are dropped (to be removed from the
    /// store), never used.
    #[test]
    fn what_systemd_passed_is_sorted() {
        let pair = || OwnedFd::from(UnixDatagram::pair().unwrap().0);
        let listed = vec![
            (10, "notify/run/e/i1".to_owned()),
            (11, "notify/run/e/i2".to_owned()),
            (12, "notify/run/e/i2".to_owned()),
            (13, "other".to_owned()),
            (14, "notify/run/e/i3".to_owned()),
        ];
        let (passed, dropped) = taken(listed, |raws| {
            assert_eq!(raws, [10, 11, 12, 13, 14]);
            vec![
                Ok(pair()),
                Ok(pair()),
                Ok(pair()),
                Ok(pair()),
                Err(std::io::Error::from_raw_os_error(nix::libc::EBADF)),
            ]
        });
        assert_eq!(passed.keys().collect::<Vec<_>>(), ["notify/run/e/i1"]);
        assert_eq!(dropped, ["notify/run/e/i2", "notify/run/e/i3", "other"]);
    }

    #[test]
    fn names_are_what_systemd_takes() {
        assert_eq!(
            notify_name(Path::new("/run/leasehold/engines/web/i3")).as_deref(),
            Some("notify/run/leasehold/engines/web/i3")
        );
        assert_eq!(notify_name(Path::new("/run/a:b")), None);
        assert_eq!(notify_name(Path::new("/run/a b")), None);
        assert_eq!(notify_name(Path::new("/run/a\nb")), None);
        let long = format!("/{}", "x".repeat(MAX_NAME - PREFIX.len() - 1));
        assert!(notify_name(Path::new(&long)).is_some());
        let longer = format!("/{}", "x".repeat(MAX_NAME - PREFIX.len()));
        assert_eq!(notify_name(Path::new(&longer)), None);
    }

    /// Stored with its name and the descriptor itself (the same socket:
    /// a datagram sent to the original arrives on the copy systemd
    /// holds); removed by name; off, nothing is sent.
    #[test]
    fn stores_and_removes_through_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let systemd = UnixDatagram::bind(dir.path().join("notify")).unwrap();
        let store = FdStore::to_socket(&dir.path().join("notify"), BTreeMap::new());
        assert!(store.is_on());
        let engine_side = dir.path().join("engine.sock");
        let sock = UnixDatagram::bind(&engine_side).unwrap();
        store.store("notify/run/x/i1", sock.as_fd());
        let (text, fds) = received(&systemd).unwrap();
        assert_eq!(text, "FDSTORE=1\nFDNAME=notify/run/x/i1");
        assert_eq!(fds.len(), 1);
        let kept = UnixDatagram::from(fds.into_iter().next().unwrap());
        drop(sock);
        UnixDatagram::unbound()
            .unwrap()
            .send_to(b"READY=1", &engine_side)
            .unwrap();
        let mut buf = [0u8; 16];
        let n = kept.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        store.remove("notify/run/x/i1");
        let (text, fds) = received(&systemd).unwrap();
        assert_eq!(text, "FDSTOREREMOVE=1\nFDNAME=notify/run/x/i1");
        assert!(fds.is_empty());

        let off = FdStore::off();
        assert!(!off.is_on());
        off.store("notify/run/x/i2", kept.as_fd());
        off.remove("notify/run/x/i2");
        assert!(received(&systemd).is_none(), "an off store sent something");
    }

    /// What systemd passed back is taken once by name; the rest is
    /// dropped from the store and closed.
    #[test]
    fn passed_descriptors_are_taken_once_and_the_rest_released() {
        let dir = tempfile::tempdir().unwrap();
        let systemd = UnixDatagram::bind(dir.path().join("notify")).unwrap();
        let (a, _) = UnixDatagram::pair().unwrap();
        let (b, _) = UnixDatagram::pair().unwrap();
        let passed = BTreeMap::from([
            ("notify/run/e/i1".to_owned(), OwnedFd::from(a)),
            ("notify/run/e/i2".to_owned(), OwnedFd::from(b)),
        ]);
        let store = FdStore::to_socket(&dir.path().join("notify"), passed);
        assert!(store.take("notify/run/e/i1").is_some());
        assert!(store.take("notify/run/e/i1").is_none());
        assert_eq!(store.release_unclaimed(), ["notify/run/e/i2"]);
        let (text, _) = received(&systemd).unwrap();
        assert_eq!(text, "FDSTOREREMOVE=1\nFDNAME=notify/run/e/i2");
        assert!(store.take("notify/run/e/i2").is_none());
        assert!(store.release_unclaimed().is_empty());
    }

    /// A number this process holds becomes an owned descriptor of the
    /// same file (whether the number was closed is not checked here: a
    /// test running beside this one may be given it at once).
    #[test]
    fn a_passed_number_is_owned() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let raw = nix::unistd::dup(a.as_raw_fd()).unwrap();
        let owned = UnixDatagram::from(own(raw).unwrap());
        assert_ne!(owned.as_raw_fd(), raw);
        b.send(b"x").unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(owned.recv(&mut buf).unwrap(), 1);
    }
}
