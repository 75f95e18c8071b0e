//! The launcher: starts an engine confined, without unsafe code, through a
//! small shim process (see docs/engines.md, "Launcher", for the choice
//! against crun and the measurements).
//!
//! ```text
//! agent: a short-lived thread unshare(CLONE_NEWPID)s, then spawns
//!  └─ shim (pid 1 of the new pid ns, root; spawned at the start, or
//!       ahead as the warm shim and handed the start)
//!       setsid; unshare(NEWNS|NEWIPC|NEWUTS); private mounts; rootfs
//!       bound + /proc, /dev, /tmp, data dirs; waits until the launcher has
//!       moved it into the engine's cgroup; the secrets (read then) on a
//!       tmpfs; the root read-only;
//!       pivot_root; hostname; the node's huge page policy back (the agent
//!       turns it off for itself); no_new_privs; Landlock; drop every capability,
//!       groups, uid/gid; seccomp deny-list — then spawns
//!        └─ engine (pid 2), inheriting all of it
//! ```
//!
//! Without unsafe code there is no fork without exec (no `pre_exec`), so
//! confinement is applied to the shim itself and inherited by the engine.
//! `CLONE_NEWPID` only applies to the children of the calling thread, and
//! only once per thread: hence a fresh thread per start in the agent (the
//! agent's own namespaces do not change); `unshare` of a mount namespace
//! needs a single-threaded caller: the shim, which never starts a thread
//! (its signals come through a self-pipe it polls).
//!
//! The shim is the engine's init and supervisor: it forwards SIGTERM,
//! SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to the engine (an engine as pid 1
//! would ignore a SIGTERM it has no handler for), reaps orphans, writes the
//! engine's exit status to `exit.json` and exits, which kills whatever is
//! left in the pid namespace. SIGKILL on the shim kills the engine the same
//! way. The agent watches the shim through a pidfd (readable when it exits:
//! no polling) and reads `exit.json`. The shim is the agent's child only
//! until the agent exits: it is then re-parented (to init, or the nearest
//! subreaper), the engine runs on, and [`Running::adopt`] finds the shim
//! again from `shim.pid` (pid and start time, so a recycled pid is not
//! taken for it).
//!
//! The launcher, not the shim, moves the shim into the engine's cgroup,
//! from a thread of its own, as soon as the shim is spawned: the move waits
//! for an RCU grace period (`cgroup_threadgroup_rwsem` taken for writing;
//! 7-20 ms on a real CPU, ~19 ms under the lab's TCG), and that wait now
//! overlaps the shim's start-up (loader, descriptors, spec) instead of
//! following it. The shim reads no secret, takes no privilege away and
//! starts nothing before the launcher's word on its stdin that it is in
//! its cgroup: the secrets' bytes (read from the pipe after the word) and
//! their tmpfs pages are charged to the engine's cgroup, and a failed move
//! or a launcher gone before it (end of stdin) fails the start closed.
//! Moved, the shim confines itself whole (namespaces, root, Landlock, no
//! privileges, seccomp) and then waits for a second word, [`GO`], before it
//! starts the engine: a held start ([`Launcher::start_held`]) writes it at
//! [`Running::release`], once the caller has recorded the instance, so the
//! confinement runs while the caller records instead of after it. A shim
//! that never gets the word has run nothing of the engine's and exits
//! (its namespaces and mounts go with it).
//! In that order (`--launcher-joins --secrets-after-join`) the shim makes
//! its namespaces and every mount of the engine's root but the secrets'
//! tmpfs before the word on the move, while the move waits for its grace
//! period; the secrets, their tmpfs, the root made read-only and
//! `pivot_root` come after it (the mount objects, a few KiB of kernel
//! memory, are then charged to the agent's cgroup; docs/engines.md, "The
//! warm shim").
//!
//! A launcher [`Launcher::with_warm_shim`] keeps one shim spawned ahead
//! (`shim --warm`: its own pid namespace, the agent's cgroup, stdin a
//! socket): it prepares what needs no engine (signal handlers, inherited
//! descriptors, its session, the seccomp program, and — [`stage`] — its
//! namespaces with the engine's /proc and /dev, moved into the engine's
//! root at the start; its mounts slaves of the agent's meanwhile, and it
//! is discarded before the tenant volume changes, so it never holds the
//! volume open) and waits. A held start
//! hands it the run directory and the engine's stdout and stderr
//! ([`HAND_OFF`], the descriptors as SCM_RIGHTS); it then goes on exactly
//! as a spawned shim in that order, and the start skips the shim's exec
//! and start-up. The release spawns the next one; a warm shim that died
//! is never handed a start (one is spawned instead); the end of its stdin
//! (the last launcher dropped, the agent gone) ends it, having made
//! nothing.
//! `shim RUN_DIR` without [`LAUNCHER_JOINS`] (an older agent's call, or
//! [`Launcher::shim_joins_cgroup`]) joins by itself, as before. The other
//! way round, an older shim given the flag prints its usage and exits 2
//! without a report (the agent sees a lost shim): the agent and the shim
//! ship in one package and are upgraded together. The shim is reaped only
//! through [`Running::wait`], after the moving thread ended; an unreaped
//! shim stays a zombie, which keeps its pid from being reused meanwhile —
//! never reap it elsewhere without joining that thread first.
//!
//! With a [`Respawn`] grant the shim starts the engine once more after its
//! first exit instead (the first restart of a series, in place: same pid
//! namespace, cgroup and confinement), telling the agent first on
//! [`STATUS_FIFO`].
//!
//! The run directory (on /run, tmpfs; mode 0700) holds: `spec.json` and
//! `shim.pid` (written by the agent); `report.json` (the shim, once
//! confined, before it waits for [`GO`]: the confinement reached, or why
//! it failed — rewritten if it fails after that) and
//! `exit.json` (the shim, when the engine ended), both opened by the shim
//! before pivot_root; the output FIFOs and `status.fifo` (made by the
//! agent).

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What the shim needs to start one engine (written to `spec.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// Engine name: the hostname inside the engine.
    pub name: String,
    /// The unpacked image root (mounted read-only).
    pub rootfs: PathBuf,
    /// argv; `argv[0]` is an absolute path inside the rootfs.
    pub argv: Vec<String>,
    /// The whole environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory inside the rootfs.
    pub cwd: PathBuf,
    /// The engine's own uid (never 0).
    pub uid: u32,
    /// The engine's own gid (never 0).
    pub gid: u32,
    /// The engine's cgroup directory (absolute); `None` only where the host
    /// has no usable cgroup v2 (T1 on hybrid hosts).
    pub cgroup: Option<PathBuf>,
    /// Read-write directories bound into the rootfs.
    pub data_dirs: Vec<DataDir>,
    /// Size of the private /tmp, bytes.
    pub tmp_size: u64,
    /// Names of the secrets, in the order their bytes are handed to
    /// [`Launcher::start`]; each appears as `/run/secrets/NAME` (0400, the
    /// engine's uid) on a private read-only tmpfs. Names only: the bytes
    /// never touch the run directory.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// A host directory holding the instance's notify socket (made by the
    /// agent), bound into the engine at [`NOTIFY_DIR`]; `None`: no
    /// heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_dir: Option<PathBuf>,
    /// The agent's grant to start the engine again once, in place, when
    /// it exits (the supervisor's `Respawn`); `None`: every exit ends the
    /// shim. Used only with a [`STATUS_FIFO`] in the run directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respawn: Option<Respawn>,
}

/// Start the engine again once after its exit: the first restart of a
/// series, in place (docs/engines.md, "The first restart in place").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Respawn {
    /// Wait this long after the exit (the backoff's first delay).
    pub delay_ms: u64,
    /// Also after exit code 0.
    pub on_clean_exit: bool,
}

/// Longest [`Respawn::delay_ms`] (the longest backoff delay a spec takes).
pub const MAX_RESPAWN_DELAY_MS: u64 = 3_600_000;

/// The FIFO in the run directory through which the shim tells the agent
/// what it did by itself (made by the agent; the shim holds it open
/// read-write, so a record never waits for a reader).
pub const STATUS_FIFO: &str = "status.fifo";

/// One line (JSON) on [`STATUS_FIFO`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusRecord {
    /// The engine ended with `exit` and the shim is using its grant:
    /// leftovers killed, then the delay, then [`StatusRecord::Respawned`]
    /// (or, if a stop comes first, the shim's own exit). Written at once,
    /// so the agent stops probing and watching an engine that is gone.
    Exited {
        /// How the engine ended.
        exit: Exit,
    },
    /// The shim is starting the engine again now (written just before the
    /// spawn: the agent reads it before anything the new engine does).
    Respawned,
}

/// Where the notify socket's directory appears inside an engine.
pub const NOTIFY_DIR: &str = "/run/leasehold-notify";
/// The socket's file name in it (`NOTIFY_SOCKET` is
/// `/run/leasehold-notify/notify`).
pub const NOTIFY_NAME: &str = "notify";

/// Largest secret handed to an engine.
pub const MAX_SECRET_BYTES: usize = 1 << 20;

/// The shim's first argument when the launcher moves it into its cgroup
/// (`shim --launcher-joins --secrets-after-join RUN_DIR`): the shim then
/// waits for the launcher's word on stdin — [`JOINED`], or [`NOT_JOINED`]
/// and why — instead of writing `cgroup.procs` itself, and once confined,
/// for its word [`GO`] before it starts the engine.
pub const LAUNCHER_JOINS: &str = "--launcher-joins";
/// The second argument with [`LAUNCHER_JOINS`]: the secrets come after
/// the word on the move (`+`, the secrets, `>`), so the shim reads them
/// into memory charged to the engine's cgroup, never to the agent's. An
/// older agent's call without it has them first (the secrets, `+`, `>`);
/// the shim reads either, by its arguments.
pub const SECRETS_AFTER_JOIN: &str = "--secrets-after-join";
/// The launcher's word: the shim is in its cgroup.
const JOINED: u8 = b'+';
/// The launcher's second word: the instance is recorded, start the engine
/// ([`Running::release`]; the end of the pipe instead fails it closed).
const GO: u8 = b'>';
/// The launcher's word: it could not move the shim; the reason follows
/// (at most [`MAX_JOIN_REASON`] bytes), then the end of the pipe.
const NOT_JOINED: u8 = b'-';
const MAX_JOIN_REASON: usize = 512;
/// The argument of a warm shim (`shim --warm`, [`Launcher::with_warm_shim`]):
/// started before any engine is asked for, it waits on stdin for
/// [`HAND_OFF`], then goes on as `--launcher-joins --secrets-after-join`.
pub const WARM: &str = "--warm";
/// The launcher's hand-off to a warm shim: the run directory (its length
/// as a little-endian u16, then the path) with the engine's stdout and
/// stderr as descriptors.
const HAND_OFF: u8 = b'@';
/// Longest run directory a hand-off carries (Linux's `PATH_MAX`).
pub const MAX_RUN_DIR: usize = 4096;

/// A secret's bytes on their way into an engine: Debug redacted, zeroized
/// on drop, reached through [`SecretBytes::expose`] only.
pub struct SecretBytes(zeroize::Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Wraps `bytes` (taken, not copied).
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(zeroize::Zeroizing::new(bytes))
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes(<redacted>, {} bytes)", self.0.len())
    }
}

/// A read-write directory bound into the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDir {
    /// Directory on the host (on the tenant volume).
    pub host: PathBuf,
    /// Absolute path inside the engine.
    pub target: PathBuf,
}

/// What the shim reached, written once it is confined (before the word to
/// go on, when it waits for one), and again if it fails after that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `Ok` if everything below is in force and the engine is next.
    pub result: Result<(), String>,
    /// Landlock ABI in force (0: none), and whether the ruleset is fully,
    /// partially or not enforced.
    pub landlock_abi: u32,
    /// "full", "partial" or "none".
    pub landlock: String,
    /// Seccomp filters installed.
    pub seccomp: bool,
}

/// What the shim of `run_dir` reported ([`Report`]), once written.
pub fn read_report(run_dir: &Path) -> Option<Report> {
    read_json(&run_dir.join("report.json")).ok()
}

/// How an engine ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Confinement failed before exec (the reason from `report.json`).
    LaunchFailed(String),
    /// The shim failed or was killed without writing a status.
    ShimLost(String),
}

/// Launcher errors; each names the file or the step.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// Reading or writing a run-directory file.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// "read", "write", "mkdir", "spawn".
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A run-directory file does not parse.
    #[error("cannot parse {}: {detail}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The spec is refused before anything starts.
    #[error("invalid launch spec: {0}")]
    InvalidSpec(&'static str),
    /// A system call of the launcher failed.
    #[error("{step}: {source}")]
    Sys {
        /// What was being done.
        step: String,
        /// The error.
        #[source]
        source: nix::Error,
    },
    /// A mount point inside the image is a symlink (refused, not followed).
    #[error("mount point {} in the image is a symlink", .0.display())]
    SymlinkMountPoint(PathBuf),
    /// A data directory's path on the host has a symlink, or a file, where
    /// a directory belongs (an engine's own doing: refused, not followed).
    #[error("data dir {} is a symlink or not a directory (refused, not followed)", .0.display())]
    SymlinkDataDir(PathBuf),
    /// A probe of an engine whose shim has not finished its confinement
    /// (no report yet, or its root is not the image's): not entered.
    #[error("the engine is not confined yet (its launcher has not finished): not probed")]
    NotConfinedYet,
    /// The thread that spawns the shim could not be started, or panicked.
    #[error("the engine-spawn thread panicked")]
    SpawnThread,
    /// The launcher did not let the confined shim start the engine (it
    /// ended first, or sent a word the shim does not know): not started.
    #[error("the launcher did not let the engine start: {reason}")]
    NotLetGo {
        /// That the launcher ended first, or the word it sent.
        reason: String,
    },
    /// The launcher did not move the shim into the engine's cgroup: the
    /// engine is not started.
    #[error("the launcher did not move the shim into its cgroup ({}): {reason}", procs.display())]
    NotJoined {
        /// The cgroup's `cgroup.procs`.
        procs: PathBuf,
        /// What the launcher said, or that it ended first.
        reason: String,
    },
    /// `shim.pid` names a process that is not this shim any more.
    #[error("shim {pid} in {} is gone or was replaced", run_dir.display())]
    ShimGone {
        /// The recorded pid.
        pid: u32,
        /// The run directory.
        run_dir: PathBuf,
    },
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> LaunchError {
    LaunchError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn sys(step: impl Into<String>) -> impl FnOnce(nix::Error) -> LaunchError {
    let step = step.into();
    move |source| LaunchError::Sys { step, source }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), LaunchError> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string(value).map_err(|e| LaunchError::Parse {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    fs::write(&tmp, text).map_err(|e| io_err("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err("write", path, e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, LaunchError> {
    let text = fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
    serde_json::from_str(&text).map_err(|e| LaunchError::Parse {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Starts engines through the shim binary at a given path.
#[derive(Debug, Clone)]
pub struct Launcher {
    shim: PathBuf,
    /// The shim writes its own `cgroup.procs` after its start-up (the way
    /// before 2026-12-05; benches compare it), instead of the launcher
    /// moving it during its start-up.
    shim_joins: bool,
    /// The warm shim's place, shared by the launcher's clones (one per
    /// started engine, which refills it at its release); `None`: every
    /// start spawns its shim.
    warm: Option<std::sync::Arc<std::sync::Mutex<Place>>>,
}

/// The place of a warm shim ([`Launcher::with_warm_shim`]).
#[derive(Debug, Default)]
enum Slot {
    #[default]
    Empty,
    /// A thread is spawning one, for this claim (a place emptied and
    /// claimed again meanwhile takes no shim spawned for an older one).
    Filling(u64),
    Ready(Warm),
}

/// A warm shim: spawned (`shim --warm`, its own pid namespace, the
/// agent's cgroup), waiting for its hand-off on `sock` (its stdin).
#[derive(Debug)]
struct Warm {
    child: Child,
    sock: fs::File,
}

impl Warm {
    /// Ends it (it runs nothing: it is only waiting) and reaps it.
    fn discard(mut self) {
        // Killed before its stdin ends: one that took a hand-off late
        // must not go on to say anything (the end of its stdin would be a
        // failed start in the engine's log).
        let _ = self.child.kill();
        drop(self.sock);
        let _ = self.child.wait();
    }
}

/// The slot behind the launchers' shared lock, and its next claim's
/// number: a warm shim left when the last launcher goes is ended with it.
#[derive(Debug, Default)]
struct Place(Slot, u64);

impl Place {
    /// Marks the place as being filled, by a new claim.
    fn claim(&mut self) -> u64 {
        let claim = self.1;
        self.1 = self.1.wrapping_add(1);
        self.0 = Slot::Filling(claim);
        claim
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Slot::Ready(warm) = std::mem::take(&mut self.0) {
            warm.discard();
        }
    }
}

/// The engine's stdout and stderr for a start.
enum Output {
    /// Given to a spawned shim as they are.
    Stdio(Stdio, Stdio),
    /// Descriptors: handed to a warm shim with its run directory, or given
    /// to a spawned one.
    Fds(OwnedFd, OwnedFd),
}

impl Output {
    fn into_stdio(self) -> (Stdio, Stdio) {
        match self {
            Output::Stdio(out, err) => (out, err),
            Output::Fds(out, err) => (Stdio::from(out), Stdio::from(err)),
        }
    }
}

/// A started engine, watched through its shim's pidfd.
#[derive(Debug)]
pub struct Running {
    run_dir: PathBuf,
    shim_pid: u32,
    pidfd: OwnedFd,
    /// Present when this process spawned the shim (it reaps it).
    child: Option<Child>,
    /// The thread moving the shim into its cgroup, while it may still
    /// run: joined before the shim is reaped, so the pid it writes can
    /// never be a recycled one.
    joiner: Option<std::thread::JoinHandle<()>>,
    /// The shim's word, held until [`Running::release`] ([`Launcher::start_held`]).
    word: Option<Word>,
    /// The launcher whose warm shim to refill at the release.
    refill: Option<Launcher>,
}

/// A held word to go on: what [`Running::release`] does.
#[derive(Debug)]
enum Word {
    /// Tell the moving thread (it writes [`GO`] after its word on the move).
    Thread(std::sync::mpsc::SyncSender<()>),
    /// Write [`GO`] here: the launcher moved the shim and said so itself.
    Pipe(fs::File),
}

#[derive(Debug, Serialize, Deserialize)]
struct ShimPid {
    pid: u32,
    start_time: u64,
}

/// Field 22 of /proc/<pid>/stat: start time in clock ticks since boot
/// (with the pid, what names one process: the agent's polkit checks use
/// it too).
pub fn start_time(pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// [`start_time`] from the text of a `/proc/PID/stat`.
fn parse_start_time(stat: &str) -> Option<u64> {
    after_comm(stat)?.split_whitespace().nth(19)?.parse().ok()
}

/// [`start_time`] of a process that has not exited: None for a zombie
/// (state `Z`, or `X` while it is reaped). A shim that ended while no
/// agent watched can stay a zombie for a moment before its new parent
/// reaps it; it is gone, not adoptable (its record says how it ended).
fn live_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = after_comm(&stat)?.split_whitespace();
    match fields.next()? {
        "Z" | "X" | "x" => None,
        _ => fields.nth(18)?.parse().ok(),
    }
}

/// A `/proc/PID/stat` after the command name (which may hold spaces and
/// parentheses: cut after the last `)`), from the state field on.
fn after_comm(stat: &str) -> Option<&str> {
    stat.get(stat.rfind(')')? + 2..)
}

impl Launcher {
    /// A launcher running `shim` (the `leasehold-engine-shim` binary, or
    /// the agent's own executable once it has a shim subcommand).
    pub fn new(shim: impl Into<PathBuf>) -> Self {
        Launcher {
            shim: shim.into(),
            shim_joins: false,
            warm: None,
        }
    }

    /// The same launcher, keeping one warm shim: spawned ahead (at
    /// [`Launcher::refill`], and again at each release), so a held start
    /// with descriptors ([`Launcher::start_held_fds`]) hands it its run
    /// directory instead of spawning one, and its exec and start-up are
    /// off the start's path (docs/engines.md, "The warm shim"). A warm
    /// shim ends when the last clone of the launcher is dropped (its stdin
    /// ends) or the process exits.
    pub fn with_warm_shim(mut self) -> Self {
        self.warm = Some(std::sync::Arc::default());
        self
    }

    /// Spawns a warm shim now if this launcher keeps one and has none
    /// (blocking: a thread and the spawn); replaces one that died.
    pub fn warm_up(&self) -> Result<(), LaunchError> {
        let Some(slot) = &self.warm else {
            return Ok(());
        };
        let claim = {
            let mut place = lock(slot);
            if let Slot::Ready(w) = &mut place.0 {
                if matches!(w.child.try_wait(), Ok(None)) {
                    return Ok(());
                }
            }
            if matches!(place.0, Slot::Filling(_)) {
                return Ok(());
            }
            if let Slot::Ready(dead) = std::mem::take(&mut place.0) {
                dead.discard();
            }
            place.claim()
        };
        match self.spawn_warm() {
            Ok(w) => {
                settle(slot, claim, Some(w));
                Ok(())
            }
            Err(e) => {
                settle(slot, claim, None);
                Err(e)
            }
        }
    }

    /// Ends the warm shim, if one waits, and any being spawned: before the
    /// tenant volume changes (every engine stopped), so no mount namespace
    /// made before the change holds the old volume's mounts. The next
    /// start spawns its shim, and its release refills.
    pub fn discard_warm(&self) {
        let Some(slot) = &self.warm else {
            return;
        };
        let old = std::mem::take(&mut lock(slot).0);
        if let Slot::Ready(w) = old {
            w.discard();
        }
    }

    /// [`Launcher::warm_up`] on a thread of its own, if the place is
    /// empty; a failure leaves it empty (the next start spawns its shim,
    /// and refills again).
    pub fn refill(&self) {
        let Some(slot) = &self.warm else {
            return;
        };
        let claim = {
            let mut place = lock(slot);
            if !matches!(place.0, Slot::Empty) {
                return;
            }
            place.claim()
        };
        // The place weakly: dropped meanwhile (the agent stopping), no
        // shim is spawned for it.
        let place = std::sync::Arc::downgrade(slot);
        let spawner = Launcher {
            warm: None,
            ..self.clone()
        };
        let spawned = std::thread::Builder::new()
            .name("shim-warm".into())
            .spawn(move || {
                let Some(slot) = place.upgrade() else {
                    return;
                };
                // Given up meanwhile (discard_warm): nothing to fill.
                if !matches!(lock(&slot).0, Slot::Filling(c) if c == claim) {
                    return;
                }
                settle(&slot, claim, spawner.spawn_warm().ok());
            });
        if spawned.is_err() {
            settle(slot, claim, None);
        }
    }

    /// The warm shim's pid, if one waits (for tests).
    pub fn warm_pid(&self) -> Option<u32> {
        match &lock(self.warm.as_ref()?).0 {
            Slot::Ready(w) => Some(w.child.id()),
            _ => None,
        }
    }

    fn spawn_warm(&self) -> Result<Warm, LaunchError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| io_err("socketpair", &self.shim, e))?;
        let child = self.spawn_shim(
            &[std::ffi::OsStr::new(WARM)],
            Stdio::from(OwnedFd::from(theirs)),
            Stdio::null(),
            Stdio::null(),
        )?;
        Ok(Warm {
            child,
            sock: fs::File::from(OwnedFd::from(ours)),
        })
    }

    /// The shim with `args`, in a pid namespace of its own (from a thread
    /// of its own: unshare(CLONE_NEWPID) changes the pid namespace of this
    /// thread's later children, once per thread).
    fn spawn_shim(
        &self,
        args: &[&std::ffi::OsStr],
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<Child, LaunchError> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("shim-spawn".into())
                .spawn_scoped(scope, move || {
                    unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unshare(CLONE_NEWPID)"))?;
                    Command::new(&self.shim)
                        .args(args)
                        .stdin(stdin)
                        .stdout(stdout)
                        .stderr(stderr)
                        .env_clear()
                        .spawn()
                        .map_err(|e| io_err("spawn", &self.shim, e))
                })
                .map_err(|_| LaunchError::SpawnThread)?
                .join()
                .map_err(|_| LaunchError::SpawnThread)?
        })
    }

    /// The warm shim, handed `run_dir` and the engine's output; `None`
    /// (none waits, it died, it cannot see a path of the start, or the
    /// hand-off failed): spawn one.
    fn hand_off(
        &self,
        spec: &LaunchSpec,
        run_dir: &Path,
        out: &OwnedFd,
        err: &OwnedFd,
    ) -> Option<(Child, fs::File)> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let mut warm = {
            let mut place = lock(self.warm.as_ref()?);
            match std::mem::take(&mut place.0) {
                Slot::Ready(w) => w,
                other => {
                    place.0 = other;
                    return None;
                }
            }
        };
        let path = run_dir.as_os_str().as_encoded_bytes();
        let len = u16::try_from(path.len())
            .ok()
            .filter(|&l| usize::from(l) <= MAX_RUN_DIR && l > 0 && run_dir.is_absolute());
        // Every host path of the start, as the warm shim's mount
        // namespace (copied when it was spawned) shows it: a volume
        // mounted since that did not propagate into it is not handed.
        let pid = warm.child.id();
        // The same file (device and inode) as here: a mount point's
        // empty directory under a mount that did not come in is not it.
        // Resolved inside its root (RESOLVE_IN_ROOT): an absolute symlink
        // on the way is its, not the agent's.
        let visible = {
            use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
            use std::os::unix::fs::MetadataExt;
            let flags = OFlags::PATH | OFlags::CLOEXEC;
            let root = rustix::fs::open(
                format!("/proc/{pid}/root"),
                flags | OFlags::DIRECTORY,
                Mode::empty(),
            );
            let sees = |p: &Path| {
                let Ok(root) = &root else {
                    return false;
                };
                let theirs = openat2(root, p, flags, Mode::empty(), ResolveFlags::IN_ROOT)
                    .and_then(rustix::fs::fstat);
                match (fs::metadata(p), theirs) {
                    (Ok(a), Ok(b)) => a.dev() == b.st_dev && a.ino() == b.st_ino,
                    _ => false,
                }
            };
            [run_dir, &spec.rootfs]
                .into_iter()
                .chain(spec.data_dirs.iter().map(|d| d.host.as_path()))
                .chain(spec.notify_dir.as_deref())
                .all(sees)
        };
        let (Some(len), Ok(None), true) = (len, warm.child.try_wait(), visible) else {
            warm.discard();
            return None;
        };
        let mut msg = vec![HAND_OFF];
        msg.extend(len.to_le_bytes());
        msg.extend(path);
        let fds = [out.as_raw_fd(), err.as_raw_fd()];
        let sent = sendmsg::<()>(
            warm.sock.as_raw_fd(),
            &[io::IoSlice::new(&msg)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
        // Its acknowledgement, bounded: a shim that was dying, or refused
        // the hand-off, is never given the start (this one spawns a shim
        // with the same descriptors instead).
        if sent != Ok(msg.len()) || !acknowledged(&warm.sock) {
            warm.discard();
            // What it may have written before it was killed (its files,
            // opened after a late acknowledgement) goes: only a shim that
            // was sent the run directory can have.
            for stale in ["exit.json", "report.json"] {
                let _ = fs::remove_file(run_dir.join(stale));
            }
            return None;
        }
        let Warm { child, sock } = warm;
        Some((child, sock))
    }

    /// The same launcher, but the shim moves itself into its cgroup after
    /// its start-up, as it did before the launcher did it during the
    /// start-up: for benches that compare the two.
    pub fn shim_joins_cgroup(mut self) -> Self {
        self.shim_joins = true;
        self
    }

    /// Writes `spec.json` into `run_dir` (created, mode 0700) and starts the
    /// shim with `stdout`/`stderr` (files, or the write ends of the run
    /// directory's [`STDOUT_FIFO`] and [`STDERR_FIFO`], which the shim holds
    /// open for reading: a pipe read only by the agent would kill the engine
    /// with SIGPIPE once the agent restarts). Returns once the shim
    /// runs; the engine's own start is reported in `report.json`.
    /// `secrets` are the bytes of `spec.secrets`, in order: they go to the
    /// shim through a pipe (its stdin), never through a file.
    /// With `spec.cgroup`, a thread moves the shim into it meanwhile and
    /// tells the shim on the same pipe, before the secrets, which it is
    /// given (see the module's notes); a failed move shows as the shim's
    /// `report.json` and exit, as any failed confinement.
    /// Blocking (a thread is spawned and joined, the secrets are written to
    /// a pipe; the moving thread outlives the call, until both its words
    /// are written): from async code, call it through `spawn_blocking`.
    pub fn start(
        &self,
        spec: &LaunchSpec,
        run_dir: &Path,
        stdout: Stdio,
        stderr: Stdio,
        secrets: Vec<SecretBytes>,
    ) -> Result<Running, LaunchError> {
        let mut r = self.launch(spec, run_dir, Output::Stdio(stdout, stderr), secrets, false)?;
        r.release();
        Ok(r)
    }

    /// [`Launcher::start`], but the shim, moved and confined, starts the
    /// engine only at [`Running::release`]: the caller records the
    /// instance first, so an engine never runs that it could not find
    /// again after a crash. Unreleased (dropped, killed, or the caller
    /// gone), the shim sees its pipe end and fails closed. Only a shim the
    /// launcher moves into a cgroup waits for a word, so a spec without a
    /// cgroup (or [`Launcher::shim_joins_cgroup`]) is refused.
    pub fn start_held(
        &self,
        spec: &LaunchSpec,
        run_dir: &Path,
        stdout: Stdio,
        stderr: Stdio,
        secrets: Vec<SecretBytes>,
    ) -> Result<Running, LaunchError> {
        self.launch(spec, run_dir, Output::Stdio(stdout, stderr), secrets, true)
    }

    /// [`Launcher::start_held`] with the output as descriptors: the warm
    /// shim, if this launcher keeps one and one waits, is handed the start
    /// (else one is spawned, as there); the release refills it.
    pub fn start_held_fds(
        &self,
        spec: &LaunchSpec,
        run_dir: &Path,
        stdout: OwnedFd,
        stderr: OwnedFd,
        secrets: Vec<SecretBytes>,
    ) -> Result<Running, LaunchError> {
        self.launch(spec, run_dir, Output::Fds(stdout, stderr), secrets, true)
    }

    fn launch(
        &self,
        spec: &LaunchSpec,
        run_dir: &Path,
        output: Output,
        secrets: Vec<SecretBytes>,
        held: bool,
    ) -> Result<Running, LaunchError> {
        validate(spec)?;
        if held && (spec.cgroup.is_none() || self.shim_joins) {
            return Err(LaunchError::InvalidSpec(
                "a held start needs a cgroup the launcher moves the shim into",
            ));
        }
        if secrets.len() != spec.secrets.len() {
            return Err(LaunchError::InvalidSpec(
                "one secret's bytes per name in spec.secrets",
            ));
        }
        if secrets.iter().any(|s| s.expose().len() > MAX_SECRET_BYTES) {
            return Err(LaunchError::InvalidSpec("a secret is larger than 1 MiB"));
        }
        fs::create_dir_all(run_dir).map_err(|e| io_err("mkdir", run_dir, e))?;
        fs::set_permissions(run_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| io_err("write", run_dir, e))?;
        for stale in ["exit.json", "report.json"] {
            let _ = fs::remove_file(run_dir.join(stale));
        }
        write_json(&run_dir.join("spec.json"), spec)?;
        let procs = spec.cgroup.as_ref().map(|cg| cg.join("cgroup.procs"));
        let launcher_joins = procs.is_some() && !self.shim_joins;
        // The warm shim (it then reads its spec as a spawned one would),
        // or a spawned one.
        let fds_output = matches!(output, Output::Fds(..));
        let warm = match &output {
            Output::Fds(out, err) if launcher_joins => self.hand_off(spec, run_dir, out, err),
            _ => None,
        };
        let (child, pipe) = match warm {
            Some(handed) => handed,
            None => {
                // Close-on-exec: no other child of the agent may hold the
                // write end (the shim would never see EOF); the read end
                // becomes the shim's stdin through dup2, which clears the
                // flag there.
                let (secrets_r, secrets_w) =
                    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe2"))?;
                let mut args = Vec::with_capacity(3);
                if launcher_joins {
                    args.extend([LAUNCHER_JOINS, SECRETS_AFTER_JOIN].map(std::ffi::OsStr::new));
                }
                args.push(run_dir.as_os_str());
                let (stdout, stderr) = output.into_stdio();
                let child = self.spawn_shim(&args, Stdio::from(secrets_r), stdout, stderr)?;
                (child, fs::File::from(secrets_w))
            }
        };
        let pid = child.id();
        // The move first (its grace period runs while the shim starts up
        // and reads its spec), then its word to the shim, then the secrets
        // (the shim reads them into memory charged to the engine's
        // cgroup): the shim then confines itself while the caller records
        // the instance, and starts the engine only on the word to go on.
        // A thread of its own moves it and writes all three, so the
        // launcher (the agent's runtime) goes on at once.
        let mut join = Join::None;
        if let Some(procs) = procs.filter(|_| launcher_joins) {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(fs::File, Vec<SecretBytes>)>(1);
            let (go_tx, go_rx) = std::sync::mpsc::sync_channel::<()>(1);
            let moved = procs.clone();
            join = match std::thread::Builder::new()
                .name("shim-join".into())
                .spawn(move || {
                    let result = move_into(&moved, pid);
                    if let Ok((pipe, secrets)) = rx.recv() {
                        if tell_joined(&pipe, result)
                            && write_secrets_to(&pipe, &secrets)
                            && go_rx.recv().is_ok()
                        {
                            tell_go(&pipe);
                        }
                    }
                }) {
                Ok(handle) => Join::Thread(handle, tx, go_tx),
                // No thread to be had: the move here.
                Err(_) => Join::Inline(procs),
            };
        }
        // Not moved by a thread: the word (if moved here) and the secrets
        // now; none after a failed move (the shim fails closed on the
        // reason it reads).
        let joined = match &join {
            Join::Inline(procs) => {
                tell_joined(&pipe, move_into(procs, pid)) && write_secrets_to(&pipe, &secrets)
            }
            Join::None => {
                write_secrets_to(&pipe, &secrets);
                true
            }
            Join::Thread(..) => true,
        };
        // The shim is tracked (pidfd, shim.pid) before it may go on: an
        // engine never runs that the agent could not find again.
        let tracked = pidfd_open(pid).and_then(|pidfd| {
            let start_time = start_time(pid).ok_or(LaunchError::ShimGone {
                pid,
                run_dir: run_dir.to_path_buf(),
            })?;
            write_json(&run_dir.join("shim.pid"), &ShimPid { pid, start_time })?;
            Ok(pidfd)
        });
        let pidfd = match tracked {
            Ok(pidfd) => pidfd,
            Err(e) => {
                // No word: the end of the pipe fails the shim closed.
                drop(pipe);
                let mut child = child;
                let _ = child.kill();
                if let Join::Thread(handle, tx, go) = join {
                    drop((tx, go));
                    let _ = handle.join();
                }
                let _ = child.wait();
                return Err(e);
            }
        };
        let (joiner, word) = match join {
            // No word: the shim goes on by itself (its pipe closes here).
            Join::None => (None, None),
            // The pipe and the secrets to the thread now: its word on the
            // move goes as soon as the move is done, the secrets after it;
            // a failed send (the thread gone) drops the pipe, and the shim
            // fails closed.
            Join::Thread(handle, tx, go) => {
                let _ = tx.send((pipe, secrets));
                (Some(handle), Some(Word::Thread(go)))
            }
            // Said already; the word to go on at the release. Not moved:
            // the pipe ends here, after the reason.
            Join::Inline(_) => (None, joined.then_some(Word::Pipe(pipe))),
        };
        Ok(Running {
            run_dir: run_dir.to_path_buf(),
            shim_pid: pid,
            pidfd,
            child: Some(child),
            joiner,
            word,
            // Only a start that could have had it: one with stdio never does.
            refill: (self.warm.is_some() && fds_output).then(|| self.clone()),
        })
    }
}

/// Puts a freshly spawned warm shim (or none, the spawn failed) in the
/// place it was spawned for, if that still waits for it (`Filling` by
/// the same claim); else (given up meanwhile, perhaps claimed again since
/// — before a volume change, say) it is ended.
fn settle(place: &std::sync::Mutex<Place>, claim: u64, warm: Option<Warm>) {
    let mut p = lock(place);
    let ours = matches!(p.0, Slot::Filling(c) if c == claim);
    match warm {
        Some(w) if ours => p.0 = Slot::Ready(w),
        None if ours => p.0 = Slot::Empty,
        Some(w) => {
            drop(p);
            w.discard();
        }
        None => {}
    }
}

/// Longest wait for a warm shim's acknowledgement of its hand-off: it has
/// to wake up (well under a millisecond natively, a few under the lab's
/// emulation), or, handed a start right after its spawn, first finish
/// its own preparation (tens of milliseconds under emulation). A shim
/// that acknowledges just past it is killed and reaped before the
/// spawned one starts; what it opened is made again.
const ACK_BOUND: Duration = Duration::from_secs(2);

/// Whether the warm shim on `sock` acknowledged its hand-off within
/// [`ACK_BOUND`].
fn acknowledged(sock: &fs::File) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let end = std::time::Instant::now() + ACK_BOUND;
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let timeout = Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(sock, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => return false,
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
    let mut ack = [0u8; 1];
    matches!(io::Read::read(&mut &*sock, &mut ack), Ok(1)) && ack[0] == HAND_OFF
}

fn lock(place: &std::sync::Mutex<Place>) -> std::sync::MutexGuard<'_, Place> {
    // A panic while holding it leaves a valid slot (each change is one
    // assignment).
    place
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Who moves a spawned shim into its cgroup (see [`Launcher::start`]).
enum Join {
    /// No cgroup, or the shim joins by itself.
    None,
    /// A thread, handed the pipe and the secrets once the shim is
    /// tracked, and told at the release.
    Thread(
        std::thread::JoinHandle<()>,
        std::sync::mpsc::SyncSender<(fs::File, Vec<SecretBytes>)>,
        std::sync::mpsc::SyncSender<()>,
    ),
    /// The launcher itself, at once (no thread to be had).
    Inline(PathBuf),
}

/// Moves process `pid` (the shim, all of it) into the cgroup of `procs`.
fn move_into(procs: &Path, pid: u32) -> Result<(), String> {
    // Never created: a path that is not a cgroup fails.
    fs::OpenOptions::new()
        .write(true)
        .open(procs)
        .and_then(|mut f| f.write_all(format!("{pid}\n").as_bytes()))
        .map_err(|e| format!("writing its pid there: {e}"))
}

/// The launcher's word to the shim on its move (one write; the reason
/// bounded). True if it said [`JOINED`] and the write went into the pipe;
/// a shim already gone: EPIPE, false (its report says why it went).
fn tell_joined(mut pipe: &fs::File, result: Result<(), String>) -> bool {
    let (word, joined) = match result {
        Ok(()) => (vec![JOINED], true),
        Err(reason) => {
            let mut word = vec![NOT_JOINED];
            word.extend(reason.bytes().take(MAX_JOIN_REASON));
            (word, false)
        }
    };
    pipe.write_all(&word).is_ok() && joined
}

/// The secrets on the shim's stdin (per secret a little-endian u32 length,
/// then the bytes), after the word on the move. False if the pipe broke (a
/// shim that already failed says why in report.json).
fn write_secrets_to(mut pipe: &fs::File, secrets: &[SecretBytes]) -> bool {
    secrets.iter().all(|s| {
        let len = u32::try_from(s.expose().len()).unwrap_or(u32::MAX);
        pipe.write_all(&len.to_le_bytes()).is_ok() && pipe.write_all(s.expose()).is_ok()
    })
}

/// The launcher's word to go on, after [`tell_joined`]'s (the caller then
/// drops the pipe).
fn tell_go(mut pipe: &fs::File) {
    let _ = pipe.write_all(&[GO]);
}

/// How an `exec` probe ended (see [`Launcher::probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeExit {
    /// The probe command exited with this code (128 + N: killed by
    /// signal N).
    Code(i32),
    /// Not done within its timeout (killed).
    TimedOut,
    /// The probe could not enter the engine (the shim's reason).
    NotRun(String),
}

/// Exit code of the probe shim when the probe passed its timeout.
pub const PROBE_TIMED_OUT: i32 = 124;
/// Most bytes of the probe shim's stderr kept for the reason.
const PROBE_REASON_BYTES: usize = 1024;
/// Added to the probe's timeout before the agent kills the probe shim
/// itself (the shim holds the command to the timeout; this bounds a shim
/// that hangs while entering the engine).
const PROBE_BACKSTOP: Duration = Duration::from_secs(1);

impl Launcher {
    /// Runs `argv` inside the running engine of `run_dir` — its mount,
    /// pid, ipc and uts namespaces and its cgroup, as its uid, under the
    /// same no_new_privs, Landlock and seccomp — through the shim
    /// (`shim --probe RUN_DIR TIMEOUT_MS ARGV…`: entering a mount
    /// namespace needs a single-threaded process, which the agent is not).
    /// The command gets the engine's environment and working directory,
    /// no stdin and no output, in a process group of its own, which is
    /// killed when it ends (what it started in the background goes with
    /// it). Held to `timeout` by the shim (SIGKILL to the group), and the
    /// shim to `timeout` + 1 s by this call. Blocking.
    pub fn probe(&self, run_dir: &Path, argv: &[String], timeout: Duration) -> ProbeExit {
        use std::io::Read;
        if !argv.first().is_some_and(|a| a.starts_with('/'))
            || argv.iter().any(|a| a.contains('\0'))
        {
            return ProbeExit::NotRun("argv[0] must be an absolute path, no NUL".into());
        }
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let child = Command::new(&self.shim)
            .arg("--probe")
            .arg(run_dir)
            .arg(ms.to_string())
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_clear()
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return ProbeExit::NotRun(format!("spawn {}: {e}", self.shim.display())),
        };
        let done = pidfd_open(child.id()).and_then(|fd| {
            let r = Running {
                run_dir: run_dir.to_path_buf(),
                shim_pid: child.id(),
                pidfd: fd,
                child: None,
                joiner: None,
                word: None,
                refill: None,
            };
            // Only the pidfd's readiness is used here, not exit.json.
            r.wait_readable(Some(timeout + PROBE_BACKSTOP))
        });
        if !matches!(done, Ok(true)) {
            let _ = child.kill();
        }
        let status = match child.wait() {
            Ok(s) => s,
            Err(e) => return ProbeExit::NotRun(format!("wait for the probe shim: {e}")),
        };
        let mut reason = Vec::new();
        if let Some(err) = child.stderr.take() {
            let _ = err.take(PROBE_REASON_BYTES as u64).read_to_end(&mut reason);
        }
        if !matches!(done, Ok(true)) {
            return ProbeExit::TimedOut;
        }
        match status.code() {
            Some(PROBE_TIMED_OUT) => ProbeExit::TimedOut,
            Some(CONFINE_FAILED) if !reason.is_empty() => ProbeExit::NotRun(
                String::from_utf8_lossy(&reason)
                    .trim()
                    .trim_start_matches("leasehold-engine-shim: ")
                    .to_owned(),
            ),
            Some(c) => ProbeExit::Code(c),
            None => ProbeExit::NotRun(format!("the probe shim ended with {status}")),
        }
    }
}

fn validate(spec: &LaunchSpec) -> Result<(), LaunchError> {
    if spec.uid == 0 || spec.gid == 0 {
        return Err(LaunchError::InvalidSpec(
            "an engine never runs as uid or gid 0",
        ));
    }
    if !spec.argv.first().is_some_and(|a| a.starts_with('/')) {
        return Err(LaunchError::InvalidSpec("argv[0] must be an absolute path"));
    }
    if !spec.rootfs.is_absolute() || !spec.cwd.is_absolute() {
        return Err(LaunchError::InvalidSpec("rootfs and cwd must be absolute"));
    }
    if spec
        .secrets
        .iter()
        .any(|n| n.is_empty() || n == "." || n == ".." || n.contains('/') || n.contains('\0'))
    {
        return Err(LaunchError::InvalidSpec(
            "a secret name must be one plain file name",
        ));
    }
    if spec
        .respawn
        .is_some_and(|r| r.delay_ms > MAX_RESPAWN_DELAY_MS)
    {
        return Err(LaunchError::InvalidSpec(
            "respawn.delay_ms is above 3600000",
        ));
    }
    if spec.data_dirs.iter().any(|d| {
        !d.target.is_absolute()
            || d.target
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
    }) {
        return Err(LaunchError::InvalidSpec(
            "data dir targets must be absolute, without '..'",
        ));
    }
    // The launcher's own mount points are made as root: never inside a
    // directory the engine writes (a spec from before this check).
    let mounts = [Path::new(crate::spec::SECRETS_DIR), Path::new(NOTIFY_DIR)];
    if spec.data_dirs.iter().any(|d| {
        mounts
            .iter()
            .any(|m| m.starts_with(&d.target) || d.target.starts_with(m))
    }) {
        return Err(LaunchError::InvalidSpec(
            "a data dir may not hold or lie under /run/secrets or /run/leasehold-notify",
        ));
    }
    Ok(())
}

fn pidfd_open(pid: u32) -> Result<OwnedFd, LaunchError> {
    let raw = i32::try_from(pid).map_err(|_| LaunchError::InvalidSpec("pid out of range"))?;
    let pid = rustix::process::Pid::from_raw(raw).ok_or(LaunchError::InvalidSpec("pid 0"))?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).map_err(|e| {
        LaunchError::Sys {
            step: format!("pidfd_open({raw})"),
            source: nix::Error::from_raw(e.raw_os_error()),
        }
    })
}

/// How the engine of a shim that is gone ended, as the shim recorded it
/// in the run directory's `exit.json` (the engine's own exit code or
/// signal). `None` when there is no such record: the shim was killed
/// first, or the engine never ran (the shim opens the file empty before
/// anything else and fills it only after the engine's exit).
pub fn recorded_exit(run_dir: &Path) -> Option<Exit> {
    match read_json::<Exit>(&run_dir.join("exit.json")) {
        Ok(e @ (Exit::Code(_) | Exit::Signal(_))) => Some(e),
        _ => None,
    }
}

impl Running {
    /// Finds the shim of `run_dir` again (after an agent restart): checks
    /// that `shim.pid` still names the same process (start time) and opens
    /// a pidfd on it. `ShimGone` if it has exited (read `exit.json`).
    pub fn adopt(run_dir: &Path) -> Result<Running, LaunchError> {
        let rec: ShimPid = read_json(&run_dir.join("shim.pid"))?;
        let gone = || LaunchError::ShimGone {
            pid: rec.pid,
            run_dir: run_dir.to_path_buf(),
        };
        let pidfd = pidfd_open(rec.pid).map_err(|_| gone())?;
        // Checked after opening the pidfd: the pidfd now pins this process.
        if live_start_time(rec.pid) != Some(rec.start_time) {
            return Err(gone());
        }
        Ok(Running {
            run_dir: run_dir.to_path_buf(),
            shim_pid: rec.pid,
            pidfd,
            child: None,
            joiner: None,
            word: None,
            refill: None,
        })
    }

    /// The shim's pid.
    pub fn shim_pid(&self) -> u32 {
        self.shim_pid
    }

    /// The engine's pid in the host's pid namespace, once started (the
    /// shim's first child).
    pub fn engine_pid(&self) -> Option<u32> {
        let pid = self.shim_pid;
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The pidfd of the shim: readable once it exited. For the agent's
    /// event loop (e.g. tokio's `AsyncFd`).
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Blocks until the pidfd is readable (the shim exited: `true`) or
    /// `timeout` passed (`false`).
    fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool, LaunchError> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let ts = timeout.map(|t| Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        loop {
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            match poll(&mut fds, ts.as_ref()) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(LaunchError::Sys {
                        step: format!("poll(pidfd of {})", self.shim_pid),
                        source: nix::Error::from_raw(e.raw_os_error()),
                    })
                }
            }
        }
    }

    /// What the shim reported, once written.
    pub fn report(&self) -> Option<Report> {
        read_report(&self.run_dir)
    }

    /// Lets a shim started with [`Launcher::start_held`] start its engine:
    /// its word to go on is written once the move into its cgroup is done
    /// and said (the shim may be confined by then, waiting for it). Once
    /// only; a no-op for any other `Running`.
    pub fn release(&mut self) {
        match self.word.take() {
            // A send fails only if the thread ended without it (the move
            // failed, or the shim is gone): the shim fails closed anyway.
            Some(Word::Thread(go)) => {
                let _ = go.send(());
            }
            Some(Word::Pipe(pipe)) => tell_go(&pipe),
            None => {}
        }
        // At once: back-to-back starts (a tenant's script, a crash loop)
        // find it ready. A delay, to keep its exec off the engine's start,
        // made most such starts spawn their own shim beside the refill
        // (measured under TCG: docs/engines.md, "The warm shim").
        if let Some(launcher) = self.refill.take() {
            launcher.refill();
        }
    }

    /// Sends `signal` to the shim, which forwards SIGTERM, SIGINT, SIGHUP,
    /// SIGUSR1 and SIGUSR2 to the engine; SIGKILL kills the shim, and the
    /// engine with it (the pid namespace ends with its init). Through the pidfd: never a
    /// recycled pid.
    pub fn signal(&self, signal: Signal) -> Result<(), LaunchError> {
        let sig = rustix::process::Signal::from_named_raw(signal as i32)
            .ok_or(LaunchError::InvalidSpec("unknown signal"))?;
        rustix::process::pidfd_send_signal(&self.pidfd, sig).map_err(|e| LaunchError::Sys {
            step: format!("pidfd_send_signal({}, {signal})", self.shim_pid),
            source: nix::Error::from_raw(e.raw_os_error()),
        })
    }

    /// Waits until the shim exits (pidfd readable) or `timeout` passes
    /// (`None`: no limit), then returns how the engine ended (a start held
    /// and never released is abandoned first: [`Running::release`]). Once
    /// the shim has exited, the thread moving it into its cgroup is joined first:
    /// that can add up to one RCU grace period to `timeout` (its write
    /// waits for one), and keeps the pid from being reused under it.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Option<Exit>, LaunchError> {
        // A start never released is abandoned: the shim sees its pipe end
        // and fails closed (the moving thread stops waiting for the word to
        // go on and drops the pipe).
        self.word = None;
        if !self.wait_readable(timeout)? {
            return Ok(None);
        }
        // Its write is done (or failed) before the pid can be reused.
        if let Some(joiner) = self.joiner.take() {
            let _ = joiner.join();
        }
        let shim_status = match self.child.as_mut() {
            Some(c) => Some(c.wait().map_err(|e| io_err("wait", Path::new("shim"), e))?),
            None => None,
        };
        let exit_path = self.run_dir.join("exit.json");
        match read_json::<Exit>(&exit_path) {
            Ok(exit) => Ok(Some(exit)),
            Err(e) => Ok(Some(Exit::ShimLost(match shim_status {
                Some(s) => format!("shim ended with {s} and no status: {e}"),
                None => format!("shim ended with no status: {e}"),
            }))),
        }
    }
}

// ---------------------------------------------------------------------------
// The shim (runs as its own process: `leasehold-engine-shim [--launcher-joins [--secrets-after-join]] RUN_DIR`, pid 1
// of a new pid namespace).

/// The FIFO in the run directory that carries the engine's stdout to the
/// agent (made by the agent; the shim holds it open for reading).
pub const STDOUT_FIFO: &str = "stdout.fifo";
/// The same for stderr.
pub const STDERR_FIFO: &str = "stderr.fifo";

/// Exit code of the shim when confinement failed before the engine ran.
pub const CONFINE_FAILED: i32 = 126;

/// Signals the shim forwards to the engine (an engine that were itself
/// pid 1 would ignore a SIGTERM it has no handler for).
const FORWARDED: [Signal; 5] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The shim's signals, read by its only thread from a self-pipe
/// (`signal-hook`'s delivery, which its handlers write to): SIGCHLD (a
/// child ended) and [`FORWARDED`]. Handlers, not a blocked mask: a pid
/// namespace's init drops the signals it has no handler for, and a mask
/// would be inherited by the engine (std's spawn keeps it). Exec resets
/// handlers, so the engine starts with the default ones. No signal
/// thread: a task less per engine in the pids budget, one thread
/// creation less per start.
struct ShimSignals {
    delivery: signal_hook::iterator::backend::SignalDelivery<
        std::os::unix::net::UnixStream,
        signal_hook::iterator::exfiltrator::SignalOnly,
    >,
    /// A SIGTERM or SIGINT came (which): no respawn.
    stop: Option<Signal>,
}

impl ShimSignals {
    fn install() -> Result<Self, LaunchError> {
        use signal_hook::iterator::backend::SignalDelivery;
        use signal_hook::iterator::exfiltrator::SignalOnly;
        let err = |e| io_err("install", Path::new("signal handlers"), e);
        let (read, write) = std::os::unix::net::UnixStream::pair().map_err(err)?;
        let signals = FORWARDED
            .iter()
            .chain(&[Signal::SIGCHLD])
            .map(|&s| s as libc::c_int);
        let delivery = SignalDelivery::with_pipe(read, write, SignalOnly, signals).map_err(err)?;
        Ok(ShimSignals {
            delivery,
            stop: None,
        })
    }

    /// Waits for a signal, at most `timeout` (None: no limit); false when
    /// the time ran out.
    fn wait(&self, timeout: Option<Duration>) -> Result<bool, LaunchError> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let timeout = timeout.map(|t| Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut fds = [PollFd::new(self.delivery.get_read(), PollFlags::IN)];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(n) => Ok(n > 0),
            Err(rustix::io::Errno::INTR) => Ok(true),
            Err(e) => Err(LaunchError::Sys {
                step: "poll(signal pipe)".into(),
                source: nix::Error::from_raw(e.raw_os_error()),
            }),
        }
    }

    /// Takes every signal that came: notes a stop, and forwards all but
    /// SIGCHLD to `engine` when there is one.
    fn drain(&mut self, engine: Option<Pid>) {
        for sig in self.delivery.pending() {
            let Ok(sig) = Signal::try_from(sig) else {
                continue;
            };
            if sig == Signal::SIGCHLD {
                continue;
            }
            if sig == Signal::SIGTERM || sig == Signal::SIGINT {
                self.stop.get_or_insert(sig);
            }
            if let Some(pid) = engine {
                let _ = nix::sys::signal::kill(pid, sig);
            }
        }
    }

    /// pid 1: orphans of the engine are reparented here; reaps them all
    /// until the engine itself ends, forwarding signals to it, and returns
    /// how it did. Leaving the shim then kills what remains in the
    /// namespace.
    fn reap_until(&mut self, engine: Pid) -> Result<Exit, LaunchError> {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        loop {
            // Everything that ended, then sleep until a signal: a child
            // ending in between leaves its SIGCHLD byte in the pipe.
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == engine => {
                        return Ok(Exit::Code(code))
                    }
                    Ok(WaitStatus::Signaled(pid, sig, _)) if pid == engine => {
                        return Ok(Exit::Signal(sig as i32))
                    }
                    Ok(WaitStatus::StillAlive) => break,
                    Ok(_) | Err(nix::Error::EINTR) => {}
                    Err(e) => return Err(sys("waitpid")(e)),
                }
            }
            self.wait(None)?;
            self.drain(Some(engine));
        }
    }
}

/// Entry point of the shim binary: `shim [--launcher-joins [--secrets-after-join]] RUN_DIR`. Returns the process
/// exit code: the engine's (128 + signal if killed), or [`CONFINE_FAILED`].
pub fn shim_main(args: &[OsString]) -> i32 {
    // First of all, in every mode: nothing of the agent's held (below), and
    // no core dump of the shim (it holds the engine's secrets for a moment)
    // or of anything it starts.
    let inherited = close_inherited();
    if let Err(e) = no_core_dumps() {
        eprintln!("leasehold-engine-shim: {e}");
        return CONFINE_FAILED;
    }
    default_open_files();
    if args.get(1).is_some_and(|a| a == "--probe") {
        return match inherited.and_then(|()| probe_main(&args[2..])) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("leasehold-engine-shim: {e}");
                CONFINE_FAILED
            }
        };
    }
    if args.len() == 2 && args[1] == WARM {
        return warm_main(inherited);
    }
    let (join, run_dir) = match args {
        [_, run_dir] => (JoinOrder::Itself, run_dir),
        [_, flag, run_dir] if flag == LAUNCHER_JOINS => (JoinOrder::SecretsFirst, run_dir),
        [_, flag, order, run_dir] if flag == LAUNCHER_JOINS && order == SECRETS_AFTER_JOIN => {
            (JoinOrder::WordFirst, run_dir)
        }
        _ => {
            eprintln!(
                "usage: leasehold-engine-shim [{LAUNCHER_JOINS} [{SECRETS_AFTER_JOIN}]] RUN_DIR | {WARM}"
            );
            return 2;
        }
    };
    serve(Path::new(run_dir), join, Prepared::now(inherited))
}

/// Closes every descriptor above stderr the shim was started with. Called
/// first, when none of the shim's own is open: each one above 2 is the
/// agent's. Close-on-exec would keep them from the engine, but the shim
/// itself lives as long as its engine, a warm one until its start. The
/// agent's TSS library opens its connection to swtpm once per TPM command,
/// without close-on-exec, and swtpm serves one connection at a time: a
/// shim spawned while a command was in flight, holding its copy, would
/// leave every later TPM command of the agent waiting forever (the likely
/// cause of a `landlordctl assign` that hung in CI right after the start).
/// One pass: on Linux a close releases the descriptor whatever it returns
/// (EBADF: the listing's own, closed since). A /proc that cannot be listed
/// is returned, and fails the start (or probe) closed with a report where
/// it would be written ([`Prepared::now`]); everything the shim opens
/// itself is close-on-exec (std, nix and rustix open so).
fn close_inherited() -> Result<(), LaunchError> {
    let dir = Path::new("/proc/self/fd");
    let fds: Vec<i32> = fs::read_dir(dir)
        .map_err(|e| io_err("read", dir, e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// RLIMIT_CORE 0, soft and hard, inherited by the engine (which, without
/// CAP_SYS_RESOURCE, cannot raise it). A node's `core_pattern` is the
/// landlord's: a pipe to systemd-coredump would store an engine's memory —
/// the tenant's data, its secrets — on the node's disk, outside the
/// encrypted volume. The kernel runs a pipe whatever the limit, but
/// systemd-coredump stores nothing for a limit below a page, and a file
/// pattern writes nothing at 0.
fn no_core_dumps() -> Result<(), LaunchError> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| LaunchError::Sys {
        step: "setrlimit(RLIMIT_CORE, 0)".into(),
        source: nix::Error::from_raw(e.raw_os_error()),
    })
}

/// The soft limit on open descriptors an engine starts with: what a
/// systemd service gets (programs using `select` fail on descriptors of
/// 1024 and above), not the agent's raised one. The hard limit is kept:
/// an engine may raise its own.
const ENGINE_OPEN_FILES: u64 = 1024;

fn default_open_files() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current.is_none_or(|cur| cur > ENGINE_OPEN_FILES) {
        // Best effort: lowering a soft limit cannot fail but for EINVAL.
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(ENGINE_OPEN_FILES),
                maximum: now.maximum,
            },
        );
    }
}

/// `shim --warm`: what needs no run directory, then waits on stdin (a
/// socket) for the launcher's hand-off ([`Launcher::with_warm_shim`]) and
/// starts that engine as `--launcher-joins --secrets-after-join RUN_DIR`
/// would. The end of stdin before it (the agent stopped, or dropped its
/// warm shim): exits 0, having made nothing.
fn warm_main(inherited: Result<(), LaunchError>) -> i32 {
    // Nothing prepared, nothing handed: the launcher sees it gone (or no
    // acknowledgement) and spawns a shim for its start instead.
    let mut prepared = match Prepared::now(inherited) {
        Ok(p) => p,
        Err(_) => return CONFINE_FAILED,
    };
    prepared.staged = stage();
    match await_hand_off(&mut prepared.signals) {
        Ok(Some(run_dir)) => serve(&run_dir, JoinOrder::WordFirst, Ok(prepared)),
        // The end of stdin, or stopped while waiting: made nothing.
        Ok(None) => 0,
        // Its stderr is the null device unless the hand-off came whole: the
        // launcher sees no acknowledgement and spawns a shim instead.
        Err(e) => {
            eprintln!("leasehold-engine-shim: {e}");
            CONFINE_FAILED
        }
    }
}

/// What the shim does before it knows its engine: its signal handlers,
/// the inherited descriptors, its own session, the seccomp program built.
/// A warm shim does it while it waits; a cold one first thing.
struct Prepared {
    signals: ShimSignals,
    filter: Vec<seccompiler::sock_filter>,
    /// What a warm shim made of the engine's root ahead (nothing for a
    /// spawned one).
    staged: Staged,
}

impl Prepared {
    /// `inherited`: how [`close_inherited`] went, first thing.
    fn now(inherited: Result<(), LaunchError>) -> Result<Self, LaunchError> {
        inherited?;
        let signals = ShimSignals::install()?;
        // Out of the agent's session: no terminal signal reaches the engine.
        nix::unistd::setsid().map_err(sys("setsid"))?;
        Ok(Prepared {
            signals,
            filter: seccomp_program()?,
            staged: Staged::default(),
        })
    }
}

/// The warm shim's hand-off on stdin: [`HAND_OFF`], the run directory's
/// length (u16, little-endian, at most [`MAX_RUN_DIR`]) and path, with the
/// engine's stdout and stderr as two descriptors (SCM_RIGHTS), which
/// become the shim's own 1 and 2; then one byte back ([`HAND_OFF`]), the
/// acknowledgement the launcher waits for before it goes on. `None` at the
/// end of stdin, or on SIGTERM or SIGINT while waiting (a warm shim is
/// pid 1 of its namespace: without the handlers it would ignore them).
fn await_hand_off(signals: &mut ShimSignals) -> Result<Option<PathBuf>, LaunchError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::unix::ffi::OsStringExt;
    let bad = |why: String| LaunchError::NotJoined {
        procs: PathBuf::from("(the warm shim's hand-off)"),
        reason: why,
    };
    loop {
        use rustix::event::{poll, PollFd, PollFlags};
        let stdin = io::stdin();
        let mut fds = [
            PollFd::new(&stdin, PollFlags::IN),
            PollFd::new(signals.delivery.get_read(), PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(LaunchError::Sys {
                    step: "poll(stdin, signal pipe)".into(),
                    source: nix::Error::from_raw(e.raw_os_error()),
                })
            }
        }
        let (input, signalled) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if signalled {
            signals.drain(None);
            if signals.stop.is_some() {
                return Ok(None);
            }
        }
        if input {
            break;
        }
    }
    let mut head = [0u8; 3];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let (got, fds) = loop {
        let mut iov = [io::IoSliceMut::new(&mut head)];
        match recvmsg::<()>(
            libc::STDIN_FILENO,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                // More descriptors than it has room for (nix then gives
                // none of them: they are close-on-exec, and this shim ends).
                if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    return Err(bad("more than 2 descriptors".into()));
                }
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(sys("recvmsg: its descriptors"))? {
                    if let ControlMessageOwned::ScmRights(rights) = c {
                        fds.extend(rights);
                    }
                }
                break (msg.bytes, fds);
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(sys("recvmsg(stdin)")(e)),
        }
    };
    // Closed on every way out but the one that takes them as 1 and 2.
    let close_all = |fds: &[std::os::fd::RawFd]| {
        for &fd in fds {
            let _ = nix::unistd::close(fd);
        }
    };
    if got == 0 {
        close_all(&fds);
        return Ok(None);
    }
    let checked = io::Read::read_exact(&mut RawStdin, &mut head[got..])
        .map_err(|e| bad(format!("its header: {e}")))
        .and_then(|()| match (head[0], fds.as_slice()) {
            (HAND_OFF, &[out, err]) => Ok((out, err)),
            (HAND_OFF, fds) => Err(bad(format!("{} descriptors, not 2", fds.len()))),
            (byte, _) => Err(bad(format!("the word {byte:#04x} is not a hand-off"))),
        })
        .and_then(|fds| {
            let len = usize::from(u16::from_le_bytes([head[1], head[2]]));
            if len == 0 || len > MAX_RUN_DIR {
                return Err(bad(format!("a run directory of {len} bytes")));
            }
            let mut path = vec![0u8; len];
            io::Read::read_exact(&mut RawStdin, &mut path)
                .map_err(|e| bad(format!("its run directory: {e}")))?;
            let path = PathBuf::from(OsString::from_vec(path));
            if !path.is_absolute() || path.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(bad(format!("{} is not an absolute path", path.display())));
            }
            Ok((fds, path))
        });
    let ((out, err), run_dir) = match checked {
        Ok(c) => c,
        Err(e) => {
            close_all(&fds);
            return Err(e);
        }
    };
    let taken = nix::unistd::dup2(out, libc::STDOUT_FILENO)
        .and_then(|_| nix::unistd::dup2(err, libc::STDERR_FILENO));
    close_all(&fds);
    taken.map_err(sys("dup2(its stdout and stderr)"))?;
    // The acknowledgement: from here on the start is this shim's, and
    // whatever fails is in its report.
    nix::unistd::write(io::stdin(), &[HAND_OFF]).map_err(sys("write(the acknowledgement)"))?;
    Ok(Some(run_dir))
}

/// The shim for one engine, from its run directory on; returns the exit
/// code.
fn serve(run_dir: &Path, join: JoinOrder, prepared: Result<Prepared, LaunchError>) -> i32 {
    // Both opened before pivot_root (the run directory is not visible
    // afterwards) and as root (the engine's uid cannot open them).
    let files = fs::File::create(run_dir.join("report.json"))
        .and_then(|r| Ok((r, fs::File::create(run_dir.join("exit.json"))?)));
    let (report_file, exit_file) = match files {
        Ok(f) => f,
        Err(e) => {
            eprintln!("leasehold-engine-shim: {}: {e}", run_dir.display());
            return CONFINE_FAILED;
        }
    };
    // The status FIFO, when the agent made one: read-write (a record
    // never waits for the agent, which may be restarting), non-blocking
    // (one record per respawn: the pipe never fills), before pivot_root.
    let status = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(run_dir.join(STATUS_FIFO))
            .ok()
    };
    // The output FIFOs the agent reads (when it made them): held open for
    // reading, never read, as long as the shim lives, so the engine's
    // writes never meet a FIFO without a reader (EPIPE, SIGPIPE) while the
    // agent restarts; what it writes meanwhile waits in the pipe for the
    // next agent (docs/engines.md, "Logs").
    let _held: Vec<fs::File> = [STDOUT_FIFO, STDERR_FIFO]
        .iter()
        .filter_map(|n| {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(run_dir.join(n))
                .ok()
        })
        .collect();
    let mut report = Report {
        result: Ok(()),
        landlock_abi: 0,
        landlock: "none".into(),
        seccomp: false,
    };
    let ran = prepared.and_then(|prepared| {
        run(
            run_dir,
            join,
            prepared,
            &report_file,
            status.as_ref(),
            &mut report,
        )
    });
    let exit = match ran {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("leasehold-engine-shim: {e}");
            report.result = Err(e.to_string());
            write_file(&report_file, &report);
            Exit::LaunchFailed(e.to_string())
        }
    };
    write_file(&exit_file, &exit);
    match exit {
        Exit::Code(c) => c,
        Exit::Signal(s) => 128 + s,
        _ => CONFINE_FAILED,
    }
}

/// Confines this process, starts the engine as its child (pid 2), forwards
/// signals, reaps orphans and returns how the engine ended; with a respawn
/// grant and a status FIFO, starts it once more first (see [`Respawn`]).
fn run(
    run_dir: &Path,
    join: JoinOrder,
    prepared: Prepared,
    report_file: &fs::File,
    status: Option<&fs::File>,
    report: &mut Report,
) -> Result<Exit, LaunchError> {
    let Prepared {
        mut signals,
        filter,
        mut staged,
    } = prepared;
    let spec: LaunchSpec = read_json(&run_dir.join("spec.json"))?;
    // An older agent's order: the secrets before its word on the move.
    let early = match join {
        JoinOrder::SecretsFirst => Some(read_secrets(&spec)?),
        JoinOrder::Itself | JoinOrder::WordFirst => None,
    };
    // The current order: the namespaces and mounts while the launcher's
    // move waits for its grace period (the critical path of a warm shim's
    // start); the other orders join first, as they did.
    let ahead = join == JoinOrder::WordFirst;
    if ahead {
        enter_root(&spec, &mut staged)?;
    }
    join_cgroup(&spec, join)?;
    if !ahead {
        enter_root(&spec, &mut staged)?;
    }
    // In the engine's cgroup now: the secrets' pages are the engine's.
    let secrets = match early {
        Some(secrets) => secrets,
        None => read_secrets(&spec)?,
    };
    let mut cmd = confine(&spec, &secrets, &filter, report)?;
    drop(secrets);
    write_file(report_file, report);
    // Confined, the engine not started: the launcher's word to go on comes
    // once the agent has recorded this instance (`Running::release`).
    if join != JoinOrder::Itself {
        await_go()?;
    }
    // What came while the shim confined itself: a stop means no engine at
    // all; any other signal is dropped (it was meant for an engine that
    // did not run yet, and SIGHUP or SIGUSR1 would kill one that has no
    // handler in place yet — before the handlers, the kernel dropped them).
    signals.drain(None);
    if let Some(sig) = signals.stop {
        return Ok(Exit::Signal(sig as i32));
    }
    let spawn = |cmd: &mut Command| {
        let child = cmd.spawn().map_err(|e| LaunchError::Io {
            op: "exec",
            path: PathBuf::from(&spec.argv[0]),
            source: e,
        })?;
        Ok::<_, LaunchError>(Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)))
    };
    let mut engine = spawn(&mut cmd)?;
    let mut respawn = spec.respawn.zip(status);
    loop {
        let exit = signals.reap_until(engine)?;
        let Some((grant, status)) = respawn.take() else {
            return Ok(exit);
        };
        // kill(-1) is only ever meant for the shim's own pid namespace.
        let pid1 = nix::unistd::getpid().as_raw() == 1;
        if !pid1 || (exit == Exit::Code(0) && !grant.on_clean_exit) {
            return Ok(exit);
        }
        // A stop that came with the exit counts: no respawn.
        signals.drain(None);
        if signals.stop.is_some() {
            return Ok(exit);
        }
        write_file_line(status, &StatusRecord::Exited { exit: exit.clone() });
        // The new engine starts alone: what the old one left (its uid's
        // processes; pid 1 itself is spared by kill(-1)) goes first.
        let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGKILL);
        reap_all(Duration::from_secs(2));
        // The delay, cut short by a stop.
        let end = std::time::Instant::now() + Duration::from_millis(grant.delay_ms);
        loop {
            signals.drain(None);
            if signals.stop.is_some() {
                return Ok(exit);
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || !signals.wait(Some(left))? {
                break;
            }
        }
        // Before the spawn: the agent reads it before anything the new
        // engine does (its READY=1, its exit). A stop from now on is
        // forwarded to the new engine (it waits in the pipe until the next
        // drain, after the spawn): never lost between the two.
        write_file_line(status, &StatusRecord::Respawned);
        engine = spawn(&mut cmd)?;
    }
}

/// Reaps every child that is left, for at most `bound` (a process stuck
/// in the kernel is not waited for longer; it was sent SIGKILL).
fn reap_all(bound: Duration) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let end = std::time::Instant::now() + bound;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if std::time::Instant::now() >= end {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(_) => return, // ECHILD: none left
        }
    }
}

/// `--probe RUN_DIR TIMEOUT_MS ARGV…`: enters the running engine of
/// `RUN_DIR` (see [`Launcher::probe`]), runs ARGV there and returns its
/// exit code (128 + signal), or [`PROBE_TIMED_OUT`] after killing it.
fn probe_main(args: &[OsString]) -> Result<i32, LaunchError> {
    let bad = || LaunchError::InvalidSpec("usage: --probe RUN_DIR TIMEOUT_MS ARGV...");
    let [run_dir, ms, argv @ ..] = args else {
        return Err(bad());
    };
    let timeout = Duration::from_millis(ms.to_str().and_then(|m| m.parse().ok()).ok_or_else(bad)?);
    if argv.is_empty() {
        return Err(bad());
    }
    let run_dir = Path::new(run_dir);
    let spec: LaunchSpec = read_json(&run_dir.join("spec.json"))?;
    // As the shim does: never a uid 0 or a path the launcher refuses.
    validate(&spec)?;
    // The engine's init, pinned by its pidfd and checked by start time: a
    // recycled pid is never entered.
    let init = Running::adopt(run_dir)?;
    // Only a shim that has finished its confinement (its report written:
    // after pivot_root) is entered; before that its namespaces' root is
    // the agent's own view of the node, and the tenant's probe command
    // ran there (review). The root entered is checked to be the image's.
    if read_report(run_dir).is_none_or(|r| r.result.is_err()) {
        return Err(LaunchError::NotConfinedYet);
    }
    let image_root = fs::metadata(&spec.rootfs).map_err(|e| io_err("stat", &spec.rootfs, e))?;
    if let Some(cg) = &spec.cgroup {
        let procs = cg.join("cgroup.procs");
        fs::write(&procs, "0\n").map_err(|e| io_err("write", &procs, e))?;
    }
    // One call, through the pidfd: all five namespaces of that process
    // (an engine started before cgroup namespaces shares the agent's, and
    // joining it changes nothing). The mount namespace also sets root and
    // cwd to its root (the image).
    nix::sched::setns(
        &init.pidfd,
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .map_err(sys(format!("setns(pidfd of {})", init.shim_pid)))?;
    drop(init);
    std::env::set_current_dir("/").map_err(|e| io_err("chdir", Path::new("/"), e))?;
    {
        use std::os::unix::fs::MetadataExt;
        let root = fs::metadata("/").map_err(|e| io_err("stat", Path::new("/"), e))?;
        if (root.dev(), root.ino()) != (image_root.dev(), image_root.ino()) {
            return Err(LaunchError::NotConfinedYet);
        }
    }
    thp_as_node();
    nix::sys::prctl::set_no_new_privs().map_err(sys("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    let mut report = Report {
        result: Ok(()),
        landlock_abi: 0,
        landlock: "none".into(),
        seccomp: false,
    };
    landlock(&spec, &mut report)?;
    drop_privileges(&spec)?;
    seccomp(&seccomp_program()?)?;
    // A process group of its own: what the probe starts (a shell's
    // children) ends with it, timed out or not.
    let mut child = std::os::unix::process::CommandExt::process_group(
        Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        0,
    )
    .env_clear()
    .envs(spec.env.iter().map(|(k, v)| (k, v)))
    .current_dir(&spec.cwd)
    .spawn()
    .map_err(|e| io_err("exec", Path::new(&argv[0]), e))?;
    let probe = Running {
        run_dir: run_dir.to_path_buf(),
        shim_pid: child.id(),
        pidfd: pidfd_open(child.id())?,
        child: None,
        joiner: None,
        word: None,
        refill: None,
    };
    let done = probe.wait_readable(Some(timeout))?;
    // Before the leader is reaped: its pid, the group's id, cannot have
    // been reused.
    let group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
    let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
    if !done {
        let _ = child.wait();
        return Ok(PROBE_TIMED_OUT);
    }
    let status = child
        .wait()
        .map_err(|e| io_err("wait", Path::new(&argv[0]), e))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(CONFINE_FAILED))
}

/// The shim's stdin, unbuffered: std's `Stdin` would read up to 8 KiB
/// ahead into a buffer of its own, which is never zeroized and would keep
/// secret bytes that came with a word for the shim's whole life; and each
/// read here takes only what its caller asked for.
struct RawStdin;

impl io::Read for RawStdin {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        nix::unistd::read(libc::STDIN_FILENO, buf).map_err(io::Error::from)
    }
}

/// The secrets' bytes from stdin: per secret a little-endian u32 length,
/// then the bytes.
fn read_secrets(spec: &LaunchSpec) -> Result<Vec<SecretBytes>, LaunchError> {
    let mut stdin = RawStdin;
    let stdin_err = |e| io_err("read", Path::new("secrets pipe (stdin)"), e);
    let mut out = Vec::with_capacity(spec.secrets.len());
    for _ in &spec.secrets {
        let mut len = [0u8; 4];
        io::Read::read_exact(&mut stdin, &mut len).map_err(stdin_err)?;
        let len = usize::try_from(u32::from_le_bytes(len)).unwrap_or(usize::MAX);
        if len > MAX_SECRET_BYTES {
            return Err(LaunchError::InvalidSpec("a secret is larger than 1 MiB"));
        }
        let mut bytes = SecretBytes::new(vec![0; len]);
        io::Read::read_exact(&mut stdin, &mut bytes.0).map_err(stdin_err)?;
        out.push(bytes);
    }
    Ok(out)
}

/// Waits for the launcher's word on stdin (before the secrets) that this
/// process is in the cgroup of `procs`; anything else fails the start
/// closed: the reason it sends, or the pipe's end (the launcher is gone).
fn await_join(procs: &Path) -> Result<(), LaunchError> {
    use io::Read;
    match read_word()? {
        Some(JOINED) => Ok(()),
        Some(NOT_JOINED) => {
            let mut reason = Vec::new();
            let limit = u64::try_from(MAX_JOIN_REASON).unwrap_or(u64::MAX);
            let _ = RawStdin.take(limit).read_to_end(&mut reason);
            Err(LaunchError::NotJoined {
                procs: procs.to_path_buf(),
                reason: String::from_utf8_lossy(&reason).into_owned(),
            })
        }
        None => Err(LaunchError::NotJoined {
            procs: procs.to_path_buf(),
            reason: "the launcher ended before its word".into(),
        }),
        Some(byte) => Err(LaunchError::NotJoined {
            procs: procs.to_path_buf(),
            reason: format!("the launcher's word {byte:#04x} is not one the shim knows"),
        }),
    }
}

/// Waits for the launcher's word to go on ([`GO`], after [`JOINED`]);
/// anything else, or the pipe's end (the agent never recorded this
/// instance, or is gone), fails the start closed.
fn await_go() -> Result<(), LaunchError> {
    match read_word()? {
        Some(GO) => Ok(()),
        None => Err(LaunchError::NotLetGo {
            reason: "it ended before its word to go on".into(),
        }),
        Some(byte) => Err(LaunchError::NotLetGo {
            reason: format!("its word {byte:#04x} is not one the shim knows"),
        }),
    }
}

/// One byte of the launcher's words on stdin; `None` at the pipe's end.
fn read_word() -> Result<Option<u8>, LaunchError> {
    use io::Read;
    let mut stdin = RawStdin;
    let mut word = [0u8; 1];
    loop {
        match stdin.read(&mut word) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(word[0])),
            Err(e) => return Err(io_err("read", Path::new("the launcher's word (stdin)"), e)),
        }
    }
}

/// Appends `value` as one JSON line to `file` (a FIFO: one write, far
/// below `PIPE_BUF`, so a reader never sees half a record).
fn write_file_line<T: Serialize>(mut file: &fs::File, value: &T) {
    if let Ok(mut text) = serde_json::to_string(value) {
        text.push('\n');
        let _ = file.write_all(text.as_bytes());
    }
}

/// Rewrites `file` (opened before pivot_root) with `value` as JSON.
fn write_file<T: Serialize>(mut file: &fs::File, value: &T) {
    let _ = file.set_len(0);
    let _ = io::Seek::seek(&mut file, io::SeekFrom::Start(0));
    if let Ok(text) = serde_json::to_string(value) {
        let _ = file.write_all(text.as_bytes());
    }
}

/// Who moves the shim into its cgroup, and where its secrets come on
/// stdin (the shim's arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JoinOrder {
    /// No flag: the shim writes `cgroup.procs` itself, then reads them.
    Itself,
    /// [`LAUNCHER_JOINS`] alone (an older agent): the secrets, then the
    /// word on the move.
    SecretsFirst,
    /// [`LAUNCHER_JOINS`] [`SECRETS_AFTER_JOIN`]: the word, then the
    /// secrets.
    WordFirst,
}

/// Out of the agent's session and into the engine's cgroup (moved by the
/// launcher, or by the shim itself), before anything is made for the
/// engine.
fn join_cgroup(spec: &LaunchSpec, join: JoinOrder) -> Result<(), LaunchError> {
    match (&spec.cgroup, join) {
        (None, JoinOrder::Itself) => {}
        (None, _) => {
            return Err(LaunchError::InvalidSpec(
                "--launcher-joins without a cgroup in the spec",
            ))
        }
        (Some(cg), JoinOrder::Itself) => {
            let procs = cg.join("cgroup.procs");
            // "0": the writing process (our pid differs between namespaces).
            fs::write(&procs, "0\n").map_err(|e| io_err("write", &procs, e))?;
        }
        (Some(cg), _) => await_join(&cg.join("cgroup.procs"))?,
    }
    Ok(())
}

/// The engine's namespaces and every mount of its root but the secrets'
/// (they come after the move): before the move's word in the current
/// order, so they overlap its grace period. The mount and namespace
/// objects, kernel memory of a few KiB, are then the agent's, not the
/// engine's (docs/engines.md, "The warm shim").
fn enter_root(spec: &LaunchSpec, staged: &mut Staged) -> Result<(), LaunchError> {
    if !staged.unshared {
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
            .map_err(sys("unshare(NEWNS|NEWIPC|NEWUTS)"))?;
    }
    setup_root(spec, staged)
}

/// Every confinement step after the move, in order, [`enter_root`]
/// done; returns the engine's command.
fn confine(
    spec: &LaunchSpec,
    secrets: &[SecretBytes],
    filter: &[seccompiler::sock_filter],
    report: &mut Report,
) -> Result<Command, LaunchError> {
    // In the engine's cgroup by now (the move, or its own join): a cgroup
    // namespace rooted there, so the engine reads its cgroup as "/" and
    // not the node's hierarchy (the agent's unit, the tenant's subtree,
    // the other engines' names under it), as container runtimes do on
    // cgroup v2.
    unshare(CloneFlags::CLONE_NEWCGROUP).map_err(sys("unshare(CLONE_NEWCGROUP)"))?;
    finish_root(spec, secrets)?;
    nix::unistd::sethostname(&spec.name).map_err(sys("sethostname"))?;
    thp_as_node();
    nix::sys::prctl::set_no_new_privs().map_err(sys("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    landlock(spec, report)?;
    drop_privileges(spec)?;
    seccomp(filter)?;
    report.seccomp = true;
    // The engine's working directory is the shim's own, entered here as
    // the engine's uid (the same check the child's chdir made): a command
    // with a directory of its own makes the static shim's std fall back
    // from posix_spawn (a vfork) to a whole fork, since a static glibc
    // cannot resolve posix_spawn_file_actions_addchdir_np; under the lab's
    // emulated CPU a fork's copied page tables cost every start and every
    // restart in place (docs/engines.md, "The engine's spawn").
    std::env::set_current_dir(&spec.cwd).map_err(|e| io_err("chdir", &spec.cwd, e))?;
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .stdin(Stdio::null())
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)));
    Ok(cmd)
}

/// Gives the engine the node's transparent huge page policy: the agent
/// turns huge pages off for itself (`PR_SET_THP_DISABLE`, docs/engines.md,
/// "The agent's memory"), and that flag is inherited by every child and
/// kept across exec; an engine (a database, say) must not lose them for it.
/// Best effort, as the agent's own setting: a kernel without the prctl has
/// nothing to clear, and huge pages are no reason to refuse a start.
fn thp_as_node() {
    let _ = nix::sys::prctl::set_thp_disable(false);
}

fn bind(src: &Path, dst: &Path, flags: MsFlags) -> Result<(), LaunchError> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | flags,
        None::<&str>,
    )
    .map_err(sys(format!("bind {} on {}", src.display(), dst.display())))
}

/// A bind mount of the directory open at `src` (`host`: its path, for the
/// error) on `dst`: a clone of it (`open_tree`), moved into place.
fn bind_fd(src: &OwnedFd, host: &Path, dst: &Path) -> Result<(), LaunchError> {
    use rustix::mount::{MoveMountFlags, OpenTreeFlags};
    let step = |e: rustix::io::Errno| LaunchError::Sys {
        step: format!("bind {} on {}", host.display(), dst.display()),
        source: nix::Error::from_raw(e.raw_os_error()),
    };
    let tree = rustix::mount::open_tree(
        src,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(step)?;
    rustix::mount::move_mount(
        &tree,
        "",
        rustix::fs::CWD,
        dst,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(step)
}

fn remount(dst: &Path, flags: MsFlags) -> Result<(), LaunchError> {
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .map_err(sys(format!("remount {} {flags:?}", dst.display())))
}

fn tmpfs(dst: &Path, options: &str) -> Result<(), LaunchError> {
    mount(
        Some("tmpfs"),
        dst,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options),
    )
    .map_err(sys(format!("tmpfs on {}", dst.display())))
}

/// A mount point inside the rootfs: created (as root, before the rootfs is
/// read-only) when the image lacks it.
fn mountpoint(root: &Path, target: &Path, dir: bool) -> Result<PathBuf, LaunchError> {
    use rustix::fs::{fchmod, fstat, mkdirat, openat, FileType, Mode, OFlags};
    // Every component is checked, created if missing, and must not be a
    // symlink: a link planted in the image ("var -> /root") would otherwise
    // make the shim create directories or mount on the host's paths. Walked
    // by descriptor (openat without following, mkdirat, fchmod): a mount
    // point below another data dir lies in that data dir, which an old
    // version of the engine still running beside a reload can change, and
    // by path a directory swapped for a link between the mkdir and the
    // chmod made the root shim chmod a path of the node (review).
    let mut path = root.to_path_buf();
    let parts: Vec<_> = target
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut cur = rustix::fs::open(root, flags | OFlags::DIRECTORY, Mode::empty())
        .map_err(|e| io_err("open", root, e.into()))?;
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let want_dir = dir || i + 1 < parts.len();
        let name = part.as_os_str();
        match openat(&cur, name, flags, Mode::empty()) {
            Ok(fd) => {
                let st = fstat(&fd).map_err(|e| io_err("stat", &path, e.into()))?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                    return Err(LaunchError::SymlinkMountPoint(path));
                }
                cur = fd;
            }
            Err(rustix::io::Errno::NOENT) if want_dir => {
                mkdirat(&cur, name, Mode::from_raw_mode(0o755))
                    .map_err(|e| io_err("mkdir", &path, e.into()))?;
                // Opened without following: a link swapped in is refused.
                let fd = openat(
                    &cur,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| match e {
                    rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                        LaunchError::SymlinkMountPoint(path.clone())
                    }
                    e => io_err("open", &path, e.into()),
                })?;
                // 0755 whatever the umask: the agent's unit has
                // UMask=0077, which made a created `/run` 0700 root and
                // the engine's `/run/secrets` unreachable to its uid.
                fchmod(&fd, Mode::from_raw_mode(0o755))
                    .map_err(|e| io_err("chmod", &path, e.into()))?;
                cur = fd;
            }
            Err(rustix::io::Errno::NOENT) => {
                cur = openat(
                    &cur,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o644),
                )
                .map_err(|e| io_err("write", &path, e.into()))?;
            }
            Err(e) => return Err(io_err("read", &path, e.into())),
        }
    }
    Ok(path)
}

/// Every mount of this (new) namespace private: nothing made here
/// propagates back to the host's.
fn make_private() -> Result<(), LaunchError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("make / private"))
}

/// Moves the mount at `src` (with the mounts under it) to `dst`.
fn move_mount(src: &Path, dst: &Path) -> Result<(), LaunchError> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(sys(format!(
        "move {} to {}",
        src.display(),
        dst.display()
    )))
}

/// The engine's /proc at `at`: this pid namespace's, masked as container
/// runtimes mask it.
fn mount_proc(at: &Path) -> Result<(), LaunchError> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        Some("proc"),
        at,
        Some("proc"),
        nodev | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(sys("mount proc"))?;
    // As container runtimes do: kernel-wide information in this /proc
    // that a pid namespace does not narrow, masked; the rest of /proc/sys
    // and friends read-only (the engine's uid could not write them anyway).
    for masked in PROC_MASKED {
        let dst = at.join(masked);
        match fs::symlink_metadata(&dst) {
            Ok(m) if m.is_dir() => {
                mount(
                    Some("tmpfs"),
                    &dst,
                    Some("tmpfs"),
                    nodev | MsFlags::MS_RDONLY,
                    Some("size=0"),
                )
                .map_err(sys(format!("mask {}", dst.display())))?;
            }
            Ok(_) => bind(Path::new("/dev/null"), &dst, MsFlags::empty())?,
            Err(_) => {}
        }
    }
    for ro in PROC_READ_ONLY {
        let dst = at.join(ro);
        if dst.exists() {
            bind(&dst, &dst, MsFlags::MS_REC)?;
            remount(&dst, nodev | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY)?;
        }
    }
    Ok(())
}

/// The engine's /dev at `at`: a small read-only tmpfs with the five
/// harmless device nodes bound from the host's.
fn mount_dev(at: &Path) -> Result<(), LaunchError> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    tmpfs(at, "mode=0755,size=64k,nr_inodes=64")?;
    for node in ["null", "zero", "full", "random", "urandom"] {
        let dst = at.join(node);
        fs::File::create(&dst).map_err(|e| io_err("write", &dst, e))?;
        bind(&Path::new("/dev").join(node), &dst, MsFlags::empty())?;
        // Not nodev: these mounts are the device nodes themselves.
        remount(&dst, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;
    }
    remount(at, nodev | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY)
}

/// What a warm shim made ahead, before it knows its engine ([`stage`]).
#[derive(Debug, Default)]
struct Staged {
    /// Its namespaces are its own already, its mounts private.
    unshared: bool,
    /// The engine's /proc, ready to be moved into its root.
    proc: Option<PathBuf>,
    /// The engine's /dev, likewise.
    dev: Option<PathBuf>,
}

/// Where a warm shim stages the engine's /proc and /dev: a tmpfs of its
/// own over this directory, in its own mount namespace only (the host's
/// /dev/shm is untouched; the shim needs nothing under it).
const STAGE: &str = "/dev/shm";

/// A warm shim's confinement that depends on no engine, made while it
/// waits: its namespaces (mount, IPC, UTS), its mounts slaves of the
/// agent's, and the
/// engine's /proc (its pid namespace's, masked) and /dev on a staging
/// tmpfs, moved into the engine's root at its start. Best effort: what
/// failed is made at the start as a spawned shim makes it (a failure
/// there then fails the start, with its reason).
fn stage() -> Staged {
    let mut staged = Staged::default();
    if unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
        .is_err()
    {
        return staged;
    }
    // Slaves, not private, while it waits: what the agent unmounts (the
    // tenant volume, before a key change) goes from this copy too, so a
    // waiting shim never holds it open, and what it mounts comes in;
    // nothing made here goes back. setup_root makes them private at the
    // start. Not done, mounts made here could propagate to the agent's:
    // the start unshares again and makes them private (or fails closed).
    if mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .is_err()
    {
        return staged;
    }
    // From here on the start does not unshare again.
    staged.unshared = true;
    let stage = Path::new(STAGE);
    if tmpfs(stage, "mode=0700,size=64k,nr_inodes=16").is_err() {
        return staged;
    }
    let (proc_dir, dev) = (stage.join("proc"), stage.join("dev"));
    if fs::create_dir(&proc_dir).is_ok() && mount_proc(&proc_dir).is_ok() {
        staged.proc = Some(proc_dir);
    }
    if fs::create_dir(&dev).is_ok() && mount_dev(&dev).is_ok() {
        staged.dev = Some(dev);
    }
    staged
}

/// Masked in the engine's /proc (crun's default `maskedPaths`).
const PROC_MASKED: [&str; 9] = [
    "acpi",
    "asound",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "scsi",
];
/// Read-only in the engine's /proc (crun's default `readonlyPaths`).
const PROC_READ_ONLY: [&str; 5] = ["bus", "fs", "irq", "sys", "sysrq-trigger"];

fn setup_root(spec: &LaunchSpec, staged: &mut Staged) -> Result<(), LaunchError> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    make_private()?;
    let root = spec.rootfs.as_path();
    bind(root, root, MsFlags::MS_REC)?;

    let proc_dir = mountpoint(root, Path::new("/proc"), true)?;
    match staged.proc.take() {
        Some(ready) => move_mount(&ready, &proc_dir)?,
        None => mount_proc(&proc_dir)?,
    }
    let dev = mountpoint(root, Path::new("/dev"), true)?;
    match staged.dev.take() {
        Some(ready) => move_mount(&ready, &dev)?,
        None => mount_dev(&dev)?,
    }

    let tmp = mountpoint(root, Path::new("/tmp"), true)?;
    tmpfs(&tmp, &format!("mode=1777,size={}", spec.tmp_size))?;

    for d in &spec.data_dirs {
        // Opened without following a link (the engine writes below its
        // data/), and mounted from the descriptor: no path is resolved
        // again between the check and the mount.
        let src = crate::datadir::open(d, false)?;
        let dst = mountpoint(root, &d.target, true)?;
        bind_fd(&src, &d.host, &dst)?;
        remount(&dst, nodev)?;
    }

    if let Some(host) = &spec.notify_dir {
        // Only the socket's directory: the engine reaches the agent's end
        // and nothing else of the run directory.
        let dst = mountpoint(root, Path::new(NOTIFY_DIR), true)?;
        bind(host, &dst, MsFlags::empty())?;
        remount(&dst, nodev | MsFlags::MS_NOEXEC)?;
    }
    Ok(())
}

/// The secrets' tmpfs (read in the engine's cgroup), then the root
/// read-only and entered.
fn finish_root(spec: &LaunchSpec, secrets: &[SecretBytes]) -> Result<(), LaunchError> {
    let root = spec.rootfs.as_path();
    if !spec.secrets.is_empty() {
        write_secrets(spec, secrets, root)?;
    }
    remount(
        root,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
    )?;
    std::env::set_current_dir(root).map_err(|e| io_err("chdir", root, e))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root"))?;
    // The old root is stacked under the new one: detach it.
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("umount old root"))?;
    std::env::set_current_dir("/").map_err(|e| io_err("chdir", Path::new("/"), e))?;
    Ok(())
}

/// `/run/secrets/NAME`, 0400, owned by the engine, on a tmpfs of their
/// size, then read-only.
fn write_secrets(
    spec: &LaunchSpec,
    secrets: &[SecretBytes],
    root: &Path,
) -> Result<(), LaunchError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = mountpoint(root, Path::new("/run/secrets"), true)?;
    let pages: usize = secrets.iter().map(|s| s.expose().len() / 4096 + 1).sum();
    tmpfs(
        &dir,
        &format!(
            "mode=0500,uid={},gid={},size={},nr_inodes={}",
            spec.uid,
            spec.gid,
            pages * 4096,
            secrets.len() + 1
        ),
    )?;
    for (name, bytes) in spec.secrets.iter().zip(secrets) {
        let path = dir.join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&path)
            .map_err(|e| io_err("write", &path, e))?;
        f.write_all(bytes.expose())
            .map_err(|e| io_err("write", &path, e))?;
        std::os::unix::fs::fchown(&f, Some(spec.uid), Some(spec.gid))
            .map_err(|e| io_err("chown", &path, e))?;
    }
    remount(
        &dir,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
    )
}

fn landlock(spec: &LaunchSpec, report: &mut Report) -> Result<(), LaunchError> {
    use landlock::{
        Access, AccessFs, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd, Ruleset,
        RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    let ll = |step: &str| {
        let step = step.to_string();
        move |e: landlock::RulesetError| LaunchError::Sys {
            step: format!("landlock {step}: {e}"),
            source: nix::Error::EPERM,
        }
    };
    let abi = ABI::V6;
    let read = AccessFs::from_read(abi);
    let all = AccessFs::from_all(abi);
    let mut rules: Vec<(PathBuf, _)> = vec![
        (PathBuf::from("/"), read),
        (PathBuf::from("/tmp"), all),
        (
            PathBuf::from("/dev"),
            read | AccessFs::WriteFile | AccessFs::Truncate,
        ),
    ];
    for d in &spec.data_dirs {
        rules.push((d.target.clone(), all));
    }
    let mut created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(ll("handle_access"))?
        .scope(Scope::from_all(abi))
        .map_err(ll("scope"))?
        .create()
        .map_err(ll("create"))?;
    for (path, access) in rules {
        let fd = PathFd::new(&path).map_err(|e| LaunchError::Sys {
            step: format!("landlock open {}: {e}", path.display()),
            source: nix::Error::ENOENT,
        })?;
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(ll("add_rule"))?;
    }
    let status = created.restrict_self().map_err(ll("restrict_self"))?;
    report.landlock = match status.ruleset {
        RulesetStatus::FullyEnforced => "full",
        RulesetStatus::PartiallyEnforced => "partial",
        _ => "none",
    }
    .into();
    report.landlock_abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => (effective_abi as u32).min(abi as u32),
        _ => 0,
    };
    Ok(())
}

fn drop_privileges(spec: &LaunchSpec) -> Result<(), LaunchError> {
    use caps::CapSet;
    let capserr = |set: &str| {
        let set = set.to_string();
        move |e: caps::errors::CapsError| LaunchError::Sys {
            step: format!("clear {set} capabilities: {e}"),
            source: nix::Error::EPERM,
        }
    };
    // The bounding set first (needs CAP_SETPCAP, still held).
    caps::clear(None, CapSet::Bounding).map_err(capserr("bounding"))?;
    caps::clear(None, CapSet::Ambient).map_err(capserr("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(capserr("inheritable"))?;
    nix::unistd::setgroups(&[]).map_err(sys("setgroups([])"))?;
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    nix::unistd::setresgid(gid, gid, gid).map_err(sys(format!("setresgid({gid})")))?;
    // From uid 0 to non-zero without SECBIT_KEEP_CAPS: the kernel clears
    // permitted and effective capabilities.
    nix::unistd::setresuid(uid, uid, uid).map_err(sys(format!("setresuid({uid})")))?;
    for set in [CapSet::Effective, CapSet::Permitted] {
        let held = caps::read(None, set).map_err(capserr("read"))?;
        if !held.is_empty() {
            return Err(LaunchError::Sys {
                step: format!("{set:?} capabilities still held after setresuid: {held:?}"),
                source: nix::Error::EPERM,
            });
        }
    }
    // Not dumpable, whatever the node's fs.suid_dumpable: the shim stays
    // as the engine's pid 1 under the engine's uid, holding the agent's
    // status FIFO and report files; dumpable, the engine (same uid) could
    // open /proc/1/mem and forge what the agent reads. The kernel sets it
    // from fs.suid_dumpable at the uid change: dumpable only at 1.
    // The engine's own exec makes it dumpable again (its own memory).
    nix::sys::prctl::set_dumpable(false).map_err(sys("prctl(PR_SET_DUMPABLE, 0)"))?;
    Ok(())
}

/// Syscalls denied (EPERM) to every engine, by name and number: the
/// default list of container runtimes, minus those already useless without
/// capabilities. Public for the benchmarks, which give crun the same list
/// by name (one list: theirs had fallen behind this one).
pub const DENIED_SYSCALLS: &[(&str, i64)] = &[
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("reboot", libc::SYS_reboot),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    // open_tree_attr (Linux 6.15; one number on every architecture of
    // the shared table, not in libc yet): the new mount API's.
    ("open_tree_attr", 467),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("syslog", libc::SYS_syslog),
    ("vhangup", libc::SYS_vhangup),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    // io_uring: a kernel attack surface of its own (Docker's default
    // profile refuses it since 25.0); programs fall back to plain I/O.
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    // The caller's own LDT, a.out libraries (x86_64 only): nothing an
    // engine needs (review).
    #[cfg(target_arch = "x86_64")]
    ("modify_ldt", libc::SYS_modify_ldt),
    #[cfg(target_arch = "x86_64")]
    ("uselib", libc::SYS_uselib),
];

fn denied_syscalls() -> Vec<i64> {
    DENIED_SYSCALLS.iter().map(|s| s.1).collect()
}

/// `clone` flags that create a namespace (an unprivileged user namespace
/// above all, which Debian allows): `clone` with any of them is denied.
const CLONE_NS_FLAGS: u32 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP)
    .unsigned_abs();

/// `SOL_SOCKET` options denied by `setsockopt`: binding a socket to a
/// device. Allowed without privilege since Linux 5.7, a socket bound to
/// `lo` wins the lookup over a node socket bound to another device on the
/// same port, where the node guard's check and the delivery may disagree
/// (docs/netpolicy.md, "The node guard"); no engine needs it.
const DENIED_SOCKET_OPTIONS: [i32; 2] = [libc::SO_BINDTODEVICE, libc::SO_BINDTOIFINDEX];

/// `AUDIT_ARCH_*` of the architecture the shim runs on: a system call made
/// under another ABI (i386's `int 0x80` from a 64-bit process) kills the
/// process, as every container runtime's filter does.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
// The program reads the low half of a 64-bit argument at its address.
#[cfg(target_endian = "big")]
compile_error!("the engine seccomp program assumes a little-endian target");
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Where a check of the engine's seccomp program goes (see
/// [`seccomp_program`]).
#[derive(Clone, Copy, Debug)]
enum Jump {
    /// The next instruction.
    Next,
    /// The instruction at this index.
    To(usize),
    Allow,
    Eperm,
    Enosys,
    /// The checks after the deny list (`clone3`, `clone`).
    Rest,
}

/// One instruction before its jumps are resolved.
type Op = (u32, u32, Jump, Jump);

const BPF_LD_ABS: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const BPF_JEQ: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const BPF_JGE: u32 = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;
const BPF_RET: u32 = libc::BPF_RET | libc::BPF_K;

/// The deny list as a binary search over the sorted numbers (leaves of
/// at most three equality checks, the last one's miss going on to
/// [`Jump::Rest`]): a system call is decided in about six comparisons
/// instead of one per denied call.
fn deny_tree(code: &mut Vec<Op>, nrs: &[u32]) {
    if nrs.len() <= 3 {
        for (i, &n) in nrs.iter().enumerate() {
            let miss = if i + 1 == nrs.len() {
                Jump::Rest
            } else {
                Jump::Next
            };
            code.push((BPF_JEQ, n, Jump::Eperm, miss));
        }
        return;
    }
    let mid = nrs.len() / 2;
    let at = code.len();
    code.push((BPF_JGE, nrs[mid], Jump::Next, Jump::Next));
    deny_tree(code, &nrs[..mid]);
    code[at].2 = Jump::To(code.len());
    deny_tree(code, &nrs[mid..]);
}

/// The engine's seccomp program (classic BPF), decided by: a foreign
/// architecture kills the process; on x86_64 an x32 system call (number
/// with bit 30 set) gets ENOSYS, as on a kernel without x32; each of
/// [`denied_syscalls`] EPERM; `clone` with any of [`CLONE_NS_FLAGS`]
/// EPERM; `setsockopt` of one of [`DENIED_SOCKET_OPTIONS`] EPERM; `clone3`
/// ENOSYS (its flags are in memory, out of a filter's reach: libc falls
/// back to `clone`, checked here); everything else is allowed.
///
/// Assembled here rather than by `seccompiler` (which still installs it):
/// seccompiler makes five instructions of each unconditional rule and nine
/// of each 64-bit argument check, one program per action, tested one after
/// the other — 305 instructions in two filters, where this is one filter
/// of about 80 searched as a tree. At install the kernel runs the program
/// once per system call number to fill its cache, so the cost follows the
/// path length (docs/engines.md, "Seccomp"). The unit test runs both
/// through an interpreter and requires the same decision for every
/// system call number.
fn seccomp_program() -> Result<Vec<seccompiler::sock_filter>, LaunchError> {
    use std::mem::offset_of;
    let field = |at: usize| u32::try_from(at).map_err(|_| seccomp_err("field offset", 0));
    let nr = field(offset_of!(libc::seccomp_data, nr))?;
    let arch = field(offset_of!(libc::seccomp_data, arch))?;
    // The low half of the first argument (little-endian): every
    // namespace flag is below bit 32.
    let arg0 = field(offset_of!(libc::seccomp_data, args))?;
    let mut code: Vec<Op> = vec![
        (BPF_LD_ABS, arch, Jump::Next, Jump::Next),
        (BPF_JEQ, AUDIT_ARCH, Jump::To(3), Jump::Next),
        (
            BPF_RET,
            libc::SECCOMP_RET_KILL_PROCESS,
            Jump::Next,
            Jump::Next,
        ),
        (BPF_LD_ABS, nr, Jump::Next, Jump::Next),
    ];
    #[cfg(target_arch = "x86_64")]
    code.push((BPF_JGE, 0x4000_0000, Jump::Enosys, Jump::Next)); // __X32_SYSCALL_BIT
    let mut nrs = denied_syscalls()
        .into_iter()
        .map(|n| u32::try_from(n).map_err(|_| seccomp_err("system call number", n)))
        .collect::<Result<Vec<u32>, _>>()?;
    nrs.sort_unstable();
    nrs.dedup();
    deny_tree(&mut code, &nrs);
    let rest = code.len();
    let number = |n: i64| u32::try_from(n).map_err(|_| seccomp_err("system call number", n));
    let int = |n: i32| n.unsigned_abs();
    code.push((BPF_JEQ, number(libc::SYS_clone3)?, Jump::Enosys, Jump::Next));
    // clone's flags are checked after setsockopt's (the jump set there).
    let clone_at = code.len();
    code.push((BPF_JEQ, number(libc::SYS_clone)?, Jump::Next, Jump::Next));
    // setsockopt(_, SOL_SOCKET, SO_BINDTODEVICE | SO_BINDTOIFINDEX, …):
    // level and option are C ints, so the low halves are what the kernel
    // reads.
    code.push((
        BPF_JEQ,
        number(libc::SYS_setsockopt)?,
        Jump::Next,
        Jump::Allow,
    ));
    code.push((BPF_LD_ABS, arg0 + 8, Jump::Next, Jump::Next));
    code.push((BPF_JEQ, int(libc::SOL_SOCKET), Jump::Next, Jump::Allow));
    code.push((BPF_LD_ABS, arg0 + 16, Jump::Next, Jump::Next));
    for (i, option) in DENIED_SOCKET_OPTIONS.iter().enumerate() {
        let miss = if i + 1 == DENIED_SOCKET_OPTIONS.len() {
            Jump::Allow
        } else {
            Jump::Next
        };
        code.push((BPF_JEQ, int(*option), Jump::Eperm, miss));
    }
    code[clone_at].2 = Jump::To(code.len());
    code.push((BPF_LD_ABS, arg0, Jump::Next, Jump::Next));
    let jset = libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K;
    code.push((jset, CLONE_NS_FLAGS, Jump::Eperm, Jump::Allow));
    let allow = code.len();
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | (e.unsigned_abs() & 0xffff);
    code.push((BPF_RET, libc::SECCOMP_RET_ALLOW, Jump::Next, Jump::Next));
    code.push((BPF_RET, errno(libc::EPERM), Jump::Next, Jump::Next));
    code.push((BPF_RET, errno(libc::ENOSYS), Jump::Next, Jump::Next));
    let mut prog = Vec::with_capacity(code.len());
    for (i, &(op, k, jt, jf)) in code.iter().enumerate() {
        // Classic BPF jumps only forward, at most 255 instructions.
        let offset = |j: Jump| {
            let to = match j {
                Jump::Next => i + 1,
                Jump::To(t) => t,
                Jump::Allow => allow,
                Jump::Eperm => allow + 1,
                Jump::Enosys => allow + 2,
                Jump::Rest => rest,
            };
            to.checked_sub(i + 1)
                .and_then(|d| u8::try_from(d).ok())
                .ok_or_else(|| seccomp_err("jump out of range at", i as i64))
        };
        prog.push(seccompiler::sock_filter {
            code: u16::try_from(op).map_err(|_| seccomp_err("opcode at", i as i64))?,
            jt: offset(jt)?,
            jf: offset(jf)?,
            k,
        });
    }
    Ok(prog)
}

fn seccomp_err(what: &'static str, n: i64) -> LaunchError {
    LaunchError::Sys {
        step: format!("seccomp program: {what} {n}"),
        source: nix::Error::EINVAL,
    }
}

fn seccomp(filter: &[seccompiler::sock_filter]) -> Result<(), LaunchError> {
    seccompiler::apply_filter(filter).map_err(|e| LaunchError::Sys {
        step: format!("seccomp install: {e}"),
        source: nix::Error::EPERM,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refill spawned for a claim that was given up (every engine
    /// stopped before a volume change) and claimed again before it
    /// settles: its shim is ended, the newer claim keeps the place.
    #[test]
    fn a_warm_shim_spawned_for_an_older_claim_is_not_kept() {
        let place = std::sync::Mutex::new(Place::default());
        let old = lock(&place).claim();
        let _ = std::mem::take(&mut lock(&place).0);
        let new = lock(&place).claim();
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let sock = fs::File::from(OwnedFd::from(ours));
        settle(&place, old, Some(Warm { child, sock }));
        assert!(matches!(lock(&place).0, Slot::Filling(c) if c == new));
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the older claim's shim is ended and reaped"
        );
        settle(&place, old, None);
        assert!(matches!(lock(&place).0, Slot::Filling(c) if c == new));
        settle(&place, new, None);
        assert!(matches!(lock(&place).0, Slot::Empty));
    }

    fn spec() -> LaunchSpec {
        LaunchSpec {
            name: "web".into(),
            rootfs: "/var/lib/leasehold/images/web".into(),
            argv: vec!["/bin/sh".into()],
            env: vec![],
            cwd: "/".into(),
            uid: 60001,
            gid: 60001,
            cgroup: None,
            data_dirs: vec![],
            tmp_size: 1 << 20,
            secrets: vec![],
            notify_dir: None,
            respawn: None,
        }
    }

    #[test]
    fn a_respawn_delay_is_bounded_and_the_grant_is_optional_on_disk() {
        let mut s = spec();
        s.respawn = Some(Respawn {
            delay_ms: MAX_RESPAWN_DELAY_MS + 1,
            on_clean_exit: false,
        });
        assert!(matches!(
            validate(&s),
            Err(LaunchError::InvalidSpec(m)) if m.contains("respawn.delay_ms")
        ));
        s.respawn = Some(Respawn {
            delay_ms: MAX_RESPAWN_DELAY_MS,
            on_clean_exit: true,
        });
        assert!(validate(&s).is_ok());
        // A spec.json written before respawns (no field) still reads.
        let old = serde_json::to_value(spec()).unwrap();
        assert!(old.get("respawn").is_none(), "not written when absent");
        let back: LaunchSpec = serde_json::from_value(old).unwrap();
        assert_eq!(back.respawn, None);
        let rec = StatusRecord::Exited {
            exit: Exit::Code(3),
        };
        assert_eq!(
            serde_json::to_string(&rec).unwrap(),
            r#"{"exited":{"exit":{"Code":3}}}"#
        );
        assert_eq!(
            serde_json::to_string(&StatusRecord::Respawned).unwrap(),
            r#""respawned""#
        );
    }

    #[test]
    fn spec_is_checked_before_starting() {
        assert!(validate(&spec()).is_ok());
        let bad = [
            LaunchSpec { uid: 0, ..spec() },
            LaunchSpec { gid: 0, ..spec() },
            LaunchSpec {
                argv: vec!["sh".into()],
                ..spec()
            },
            LaunchSpec {
                argv: vec![],
                ..spec()
            },
            LaunchSpec {
                rootfs: "images/web".into(),
                ..spec()
            },
            LaunchSpec {
                secrets: vec!["../x".into()],
                ..spec()
            },
            LaunchSpec {
                secrets: vec!["..".into()],
                ..spec()
            },
            LaunchSpec {
                data_dirs: vec![DataDir {
                    host: "/d".into(),
                    target: "/data/../../etc".into(),
                }],
                ..spec()
            },
        ];
        for s in bad {
            assert!(
                matches!(validate(&s), Err(LaunchError::InvalidSpec(_))),
                "{s:?}"
            );
        }
    }

    #[test]
    fn mount_points_never_follow_image_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let host = dir.path().join("host");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&host).unwrap();
        std::os::unix::fs::symlink(&host, root.join("var")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("tmp")).unwrap();
        for target in ["/var/data", "/tmp", "/var"] {
            let err = mountpoint(&root, Path::new(target), true).unwrap_err();
            assert!(
                matches!(err, LaunchError::SymlinkMountPoint(_)),
                "{target}: {err}"
            );
        }
        assert_eq!(
            fs::read_dir(&host).unwrap().count(),
            0,
            "nothing created on the host"
        );
        let p = mountpoint(&root, Path::new("/srv/data"), true).unwrap();
        assert_eq!(p, root.join("srv/data"));
        assert!(p.is_dir());
        // 0755 (under this test's umask it would be so without the
        // fchmod too: the unit's UMask=0077 case is the VM engines
        // section's, whose engines reach /run/secrets).
        use std::os::unix::fs::PermissionsExt;
        for made in [root.join("srv"), p.clone()] {
            let mode = fs::metadata(&made).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o755, "{}", made.display());
        }
        // An existing directory is walked through, not made again.
        assert_eq!(mountpoint(&root, Path::new("/srv/data"), true).unwrap(), p);
        let f = mountpoint(&root, Path::new("/dev/null"), false).unwrap();
        assert!(f.is_file());
    }

    #[test]
    fn secret_bytes_are_not_printed() {
        let s = SecretBytes::new(b"hunter2".to_vec());
        assert_eq!(format!("{s:?}"), "SecretBytes(<redacted>, 7 bytes)");
        assert_eq!(s.expose(), b"hunter2");
    }

    #[test]
    fn start_time_of_self() {
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX).is_none());
        assert_eq!(
            live_start_time(std::process::id()),
            start_time(std::process::id())
        );
    }

    #[test]
    fn a_start_time_is_read_past_any_name() {
        // A name with spaces and parentheses (field 22 is 4242).
        let stat = "77 (a) b (c) S 1 77 77 0 -1 4194560 90 0 0 0 1 2 0 0 20 0 1 0 4242 1000 10";
        assert_eq!(parse_start_time(stat), Some(4242));
        assert_eq!(parse_start_time("77 (x"), None);
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn a_zombie_has_no_live_start_time() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited, not reaped: a zombie until the wait below.
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while start_time(pid).is_some() && live_start_time(pid).is_some() {
            assert!(std::time::Instant::now() < end, "never a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(start_time(pid).is_some(), "still there (a zombie)");
        assert_eq!(live_start_time(pid), None);
        child.wait().unwrap();
    }

    #[test]
    fn seccomp_list_has_no_duplicates_and_spares_exec() {
        let list = denied_syscalls();
        let set: std::collections::BTreeSet<_> = list.iter().collect();
        assert_eq!(set.len(), list.len());
        for needed in [
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_wait4,
            libc::SYS_exit_group,
        ] {
            assert!(!set.contains(&needed));
        }
    }

    /// Runs a classic BPF seccomp program on one system call, as the
    /// kernel would (the instructions these programs use only).
    fn bpf_run(prog: &[seccompiler::sock_filter], nr: u32, arch: u32, args: [u64; 3]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, arg) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_le_bytes());
        }
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = &prog[pc];
            let jump = |taken: bool| pc + 1 + usize::from(if taken { i.jt } else { i.jf });
            let code = u32::from(i.code);
            pc = match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    let at = i.k as usize;
                    a = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                    pc + 1
                }
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => jump(a == i.k),
                c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => jump(a >= i.k),
                c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => jump(a & i.k != 0),
                c if c == libc::BPF_JMP => pc + 1 + i.k as usize, // JA
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => {
                    a &= i.k;
                    pc + 1
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c => panic!("instruction {c:#x} at {pc} not interpreted"),
            };
        }
    }

    /// The same rules compiled by `seccompiler` (as the shim did until
    /// 2026-12-05): the deny list, `clone` with any namespace flag (one
    /// 64-bit masked check per flag), `setsockopt` of a denied option (the
    /// low halves of level and option), and `clone3` in a second filter;
    /// the kernel takes the most severe answer of the two (here: never
    /// both an errno).
    fn seccompiler_programs() -> Vec<seccompiler::BpfProgram> {
        use seccompiler::{
            SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
            SeccompRule, TargetArch,
        };
        let arch: TargetArch = std::env::consts::ARCH.try_into().unwrap();
        let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
            denied_syscalls().into_iter().map(|s| (s, vec![])).collect();
        let clone_rules = (0..32)
            .map(|b| 1u64 << b)
            .filter(|f| CLONE_NS_FLAGS as u64 & f != 0)
            .map(|f| {
                let cond =
                    SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(f), f)
                        .unwrap();
                SeccompRule::new(vec![cond]).unwrap()
            })
            .collect();
        rules.insert(libc::SYS_clone, clone_rules);
        let int = |n: i32| u64::from(n.unsigned_abs());
        let sockopt_rules = DENIED_SOCKET_OPTIONS
            .iter()
            .map(|&o| {
                let eq = |arg, v| {
                    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                        .unwrap()
                };
                SeccompRule::new(vec![eq(1, int(libc::SOL_SOCKET)), eq(2, int(o))]).unwrap()
            })
            .collect();
        rules.insert(libc::SYS_setsockopt, sockopt_rules);
        let eperm = SeccompAction::Errno(libc::EPERM.unsigned_abs());
        let deny = SeccompFilter::new(rules, SeccompAction::Allow, eperm, arch).unwrap();
        let enosys = SeccompAction::Errno(libc::ENOSYS.unsigned_abs());
        let clone3 = [(libc::SYS_clone3, vec![])].into_iter().collect();
        let clone3 = SeccompFilter::new(clone3, SeccompAction::Allow, enosys, arch).unwrap();
        vec![deny.try_into().unwrap(), clone3.try_into().unwrap()]
    }

    #[test]
    fn seccomp_program_decides_as_seccompiler_and_refuses_x32() {
        let prog = seccomp_program().unwrap();
        assert!(prog.len() < 100, "{} instructions", prog.len());
        let old = seccompiler_programs();
        let old_len: usize = old.iter().map(Vec::len).sum();
        // 356 vs 89 (4 to 1) since 2026-12-07's four more calls.
        assert!(old_len >= 4 * prog.len(), "{old_len} vs {}", prog.len());
        let allow = libc::SECCOMP_RET_ALLOW;
        let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        let kill = libc::SECCOMP_RET_KILL_PROCESS;
        // Both filters of seccompiler's pair answer; the kernel keeps the
        // most severe (kill > errno > allow).
        let old_run = |nr, arch, args| {
            let answers: Vec<u32> = old.iter().map(|p| bpf_run(p, nr, arch, args)).collect();
            if answers.contains(&kill) {
                kill
            } else {
                answers.into_iter().find(|&a| a != allow).unwrap_or(allow)
            }
        };
        let sys = |n: i64| u32::try_from(n).unwrap();
        let clone = sys(libc::SYS_clone);
        let setsockopt = sys(libc::SYS_setsockopt);
        let thread_flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        let mut clone_args = vec![0, thread_flags, libc::SIGCHLD as u64, 1 << 40];
        for bit in 0..32 {
            let f = 1u64 << bit;
            if CLONE_NS_FLAGS as u64 & f != 0 {
                clone_args.extend([f, f | thread_flags, f | libc::SIGCHLD as u64]);
            }
        }
        let clone_args: Vec<[u64; 3]> = clone_args.into_iter().map(|a| [a, 0, 0]).collect();
        // Levels and options around the denied pair, with high halves set
        // (the kernel reads C ints: still the denied pair).
        let int = |n: i32| u64::from(n.unsigned_abs());
        let high = 1u64 << 32;
        let levels = [
            int(libc::SOL_SOCKET),
            int(libc::SOL_SOCKET) | high,
            int(libc::IPPROTO_IP),
            int(libc::IPPROTO_TCP),
            int(libc::IPPROTO_IPV6),
        ];
        let options = [
            int(libc::SO_BINDTODEVICE),
            int(libc::SO_BINDTOIFINDEX),
            int(libc::SO_BINDTODEVICE) | high,
            int(libc::SO_REUSEADDR),
            int(libc::SO_MARK),
            0,
        ];
        let sockopt_args: Vec<[u64; 3]> = levels
            .iter()
            .flat_map(|&l| options.iter().map(move |&o| [3, l, o]))
            .collect();
        let plain = [[0, 0, 0], [u64::MAX; 3]];
        let mut denied = 0;
        for nr in 0..1024u32 {
            let cases = match nr {
                n if n == clone => &clone_args[..],
                n if n == setsockopt => &sockopt_args[..],
                _ => &plain[..],
            };
            for &args in cases {
                let new = bpf_run(&prog, nr, AUDIT_ARCH, args);
                assert_eq!(
                    new,
                    old_run(nr, AUDIT_ARCH, args),
                    "nr {nr}, args {args:#x?}"
                );
                denied += usize::from(new != allow);
                // Under another architecture: killed.
                assert_eq!(bpf_run(&prog, nr, 0x4000_0003, args), kill);
                assert_eq!(old_run(nr, 0x4000_0003, args), kill);
            }
        }
        assert!(denied > denied_syscalls().len(), "{denied}");
        // clone: any namespace flag denied, threads and forks allowed.
        assert_eq!(
            bpf_run(&prog, clone, AUDIT_ARCH, [thread_flags, 0, 0]),
            allow
        );
        assert_eq!(
            bpf_run(&prog, clone, AUDIT_ARCH, [libc::SIGCHLD as u64, 0, 0]),
            allow
        );
        let user = libc::CLONE_NEWUSER as u64 | libc::SIGCHLD as u64;
        assert_eq!(bpf_run(&prog, clone, AUDIT_ARCH, [user, 0, 0]), eperm);
        let clone3 = sys(libc::SYS_clone3);
        assert_eq!(bpf_run(&prog, clone3, AUDIT_ARCH, [0; 3]), enosys);
        assert_eq!(
            bpf_run(&prog, sys(libc::SYS_mount), AUDIT_ARCH, [0; 3]),
            eperm
        );
        // setsockopt: binding to a device denied (whatever the high
        // halves), every other option allowed.
        let sol = int(libc::SOL_SOCKET);
        for (level, option, answer) in [
            (sol, int(libc::SO_BINDTODEVICE), eperm),
            (sol, int(libc::SO_BINDTOIFINDEX), eperm),
            (sol | high, int(libc::SO_BINDTODEVICE) | high, eperm),
            (sol, int(libc::SO_REUSEADDR), allow),
            (int(libc::IPPROTO_TCP), int(libc::SO_BINDTODEVICE), allow),
        ] {
            let args = [3, level, option];
            assert_eq!(
                bpf_run(&prog, setsockopt, AUDIT_ARCH, args),
                answer,
                "{args:?}"
            );
        }
        // x32 (bit 30 of the number, same architecture): this program
        // refuses every such call, seccompiler's let them all through.
        #[cfg(target_arch = "x86_64")]
        for nr in [0, sys(libc::SYS_mount), sys(libc::SYS_unshare), clone] {
            let x32 = nr | 0x4000_0000;
            assert_eq!(
                bpf_run(&prog, x32, AUDIT_ARCH, [u64::MAX; 3]),
                enosys,
                "x32 {nr}"
            );
            assert_eq!(old_run(x32, AUDIT_ARCH, [u64::MAX; 3]), allow, "x32 {nr}");
        }
    }

    #[test]
    fn exit_and_report_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exit.json");
        for e in [
            Exit::Code(3),
            Exit::Signal(9),
            Exit::LaunchFailed("x".into()),
        ] {
            write_json(&p, &e).unwrap();
            assert_eq!(read_json::<Exit>(&p).unwrap(), e);
        }
    }
}
