//! The engine runtime: node's [`Engines`] and [`EngineView`] over
//! `leasehold-engines` (issue 14, first slice; docs/engines.md, "Runtime").
//!
//! One thread owns every engine: a [`Supervisor`] each, their live
//! instances (a launched shim, watched through its pidfd), their timers.
//! The controller's calls are messages to that thread, answered within a
//! deadline; exits come from one waiter thread per instance that blocks on
//! a duplicate of the shim's pidfd (no polling). After every message the
//! thread publishes a snapshot that [`EngineView`] reads without waiting.
//!
//! Where things are:
//! - images: `<volume>/<images_dir>/inbox/<file>` (the tenant's inbox);
//!   roots `<volume>/<images_dir>/<engine>/v<N>/rootfs`, data dirs
//!   `<volume>/<images_dir>/<engine>/data/<dir>`: always on the tenant's
//!   encrypted volume; with no volume mounted, deploy is refused.
//! - cgroups: `<subtree>/<engine>/i<N>` under the cgroup root.
//! - run directories (`spec.json`, `shim.pid`, `exit.json`):
//!   `<run_dir>/<engine>/i<N>`.
//! - state (no secrets): `<state>/engines.json`, written atomically.
//!
//! Both the cgroup manager ([`Cgroups`]) and the launcher ([`Spawner`]) are
//! injected, so the tests run the whole runtime on fakes.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use leasehold_engines::backoff::wants_restart;
use leasehold_engines::budget::{self, Budget};
use leasehold_engines::cgroup::{CgroupError, CgroupPath, Cgroups, Controller};
use leasehold_engines::image::{unpack_image_abortable, ImageError, Limits as ImageLimits};

/// An image from the tenant's inbox under `base` (the engines' directory
/// on the volume): an archive file only, on the volume's own filesystem
/// (both checked on the opened descriptor, not only on the path before it).
fn inbox_image_limits(base: &Path) -> ImageLimits {
    use std::os::unix::fs::MetadataExt as _;
    ImageLimits {
        archive_file_only: true,
        // Unknown: nothing matches (closed).
        on_device: Some(std::fs::metadata(base).map_or(u64::MAX, |m| m.dev())),
        ..ImageLimits::default()
    }
}
use leasehold_engines::launch::{self, DataDir, LaunchError, LaunchSpec, SecretBytes};
use leasehold_engines::probe::NotifyMessage;
use leasehold_engines::spec::{Probe, Spec, User, MAX_ENV, MAX_EXEC_BYTES, RESERVED_ENV};
use leasehold_engines::supervisor::{
    Action, Event, Exit, Input, InstanceId, Notify, Respawn, Settled, Supervisor, TimerId,
    VersionId,
};
use leasehold_netpolicy::nft::EngineEgress;
use leasehold_netpolicy::Boundary;
use leasehold_node::{
    BudgetApplied, Confinement, EngineProbe, EngineStatus, EngineView, Engines, Failure,
    FailureKind, NotStopped, StopReport, TenantView,
};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

/// The state file under the state directory.
pub const STATE_FILE: &str = "engines.json";
/// In an instance's run directory once the agent signals it to end (a
/// stop, a restart, a failure's restart): the exit its shim then records
/// is not the engine's own, for the next agent.
const STOPPING_MARK: &str = "stopping";
/// Longest wait for a command's answer (an image unpack included).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// After the grace of `stop_all`: how long the kill is given to show.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// Most engines one tenant may deploy (issue 14 asks for 100 idle engines
/// on a 2-vCPU node; docs/benchmarks.md measures them).
pub const MAX_ENGINES: usize = 128;
/// Names no engine takes: the directories beside the engines' own on the
/// tenant volume (`inbox/` belongs to the tenant's login).
pub const RESERVED_NAMES: [&str; 1] = ["inbox"];
/// Events kept per engine for `status`.
const MAX_EVENTS: usize = 32;
/// Engine event log lines per engine per [`LOG_WINDOW`].
const LOG_LINES: u32 = 20;
/// The window of [`LOG_LINES`].
const LOG_WINDOW: Duration = Duration::from_secs(60);
/// Size of each engine's private /tmp.
const TMP_SIZE: u64 = 64 << 20;
/// `PATH` used to find `command[0]` when the image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The runtime's settings (`[engines]` in agentd.toml).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The cgroup v2 mount.
    pub cgroup_root: PathBuf,
    /// The tenant's subtree, relative to `cgroup_root`.
    pub subtree: String,
    /// Directory on the tenant volume for the inbox, roots and data dirs.
    pub images_dir: String,
    /// Run directories of the shims (tmpfs).
    pub run_dir: PathBuf,
    /// First host uid (and gid) given to engines; each engine has its own.
    pub uid_base: u32,
    /// The agent's state directory (`engines.json`).
    pub state_dir: PathBuf,
    /// Bytes of output kept per engine (both log files).
    pub log_max_bytes: u64,
    /// Where an engine's `on_failure = ["reboot-node"]` goes (engine,
    /// why): the corrective actions' rate-limited reboot. None: the
    /// landlord does not allow it (`[engines] allow_reboot_node`), and the
    /// supervisors never plan it.
    pub reboot_node: Option<tokio::sync::mpsc::Sender<(String, String)>>,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), recorded
    /// in the state: a runtime that finds its own boot's record knows the
    /// agent restarted, not the node, and leaves engines that had come to
    /// rest (exited by themselves, or given up) as they were. None
    /// (unreadable): every start is taken for a boot, and engines marked
    /// to run are started.
    pub boot_id: Option<String>,
    /// Probe runs a second the whole node may start (`[engines]
    /// probe_rate`, [`probe_gate`]).
    pub probe_rate: u32,
    /// Probe runs at once (`[engines] probe_concurrency`).
    pub probe_concurrency: u32,
    /// systemd's store for the instances' notify sockets (off outside
    /// systemd): kept across an agent restart.
    pub fdstore: Arc<crate::fdstore::FdStore>,
}

/// Errors of the runtime; each names the engine, path or step.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No tenant volume is mounted: images are never unpacked elsewhere.
    #[error("no tenant volume is mounted: engine images are only kept on the encrypted volume (volume init, or open it first)")]
    NoVolume,
    /// The cgroup v2 tree cannot hold engines.
    #[error("cgroup v2 is not usable for engines under {}: {source}", root.display())]
    Cgroup {
        /// The cgroup root.
        root: PathBuf,
        /// What failed.
        #[source]
        source: CgroupError,
    },
    /// The image could not be verified or unpacked.
    #[error("image {}: {source}", path.display())]
    Image {
        /// The archive.
        path: PathBuf,
        /// What failed.
        #[source]
        source: ImageError,
    },
    /// The image is not a file in the inbox.
    #[error("image {}: not a regular file in the tenant's inbox", .0.display())]
    NotInInbox(PathBuf),
    /// A file or directory operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The state file does not parse.
    #[error("{}: {detail}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// No such engine.
    #[error("no engine named {0:?}")]
    NotFound(String),
    /// The name is in use.
    #[error("an engine named {0:?} is already deployed")]
    Exists(String),
    /// Too many engines.
    #[error("at most {MAX_ENGINES} engines")]
    TooMany,
    /// Still running.
    #[error("engine {name:?} is {phase}: stop it first")]
    Running {
        /// The engine.
        name: String,
        /// Its phase.
        phase: &'static str,
    },
    /// The command cannot run now.
    #[error("engine {name:?}: {reason}")]
    Refused {
        /// The engine.
        name: String,
        /// Why.
        reason: String,
    },
    /// The spec cannot be resolved against the image.
    #[error("engine {name:?}: {field}: {reason}")]
    Resolve {
        /// The engine.
        name: String,
        /// The spec field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The runtime thread did not answer in time or is gone.
    #[error("the engine runtime did not answer ({0})")]
    NoAnswer(&'static str),
    /// The engine's egress rules could not be installed or removed.
    #[error("engine {name:?}: egress rules: {reason}")]
    Egress {
        /// The engine.
        name: String,
        /// Why.
        reason: String,
    },
}

impl RuntimeError {
    fn kind(&self) -> FailureKind {
        match self {
            RuntimeError::NoVolume | RuntimeError::Cgroup { .. } => FailureKind::Unavailable,
            RuntimeError::NotFound(_) => FailureKind::NotFound,
            RuntimeError::Image { .. }
            | RuntimeError::NotInInbox(_)
            | RuntimeError::Exists(_)
            | RuntimeError::TooMany
            | RuntimeError::Running { .. }
            | RuntimeError::Refused { .. }
            | RuntimeError::Resolve { .. } => FailureKind::Invalid,
            RuntimeError::Io { .. }
            | RuntimeError::State { .. }
            | RuntimeError::NoAnswer(_)
            | RuntimeError::Egress { .. } => FailureKind::Failed,
        }
    }
}

impl From<RuntimeError> for Failure {
    fn from(e: RuntimeError) -> Self {
        Failure::new(e.kind(), e.to_string())
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// What is injected.

/// Where an engine's rules go: the boundary owner, the one writer of the
/// agent's nftables table (docs/engines.md, "Egress"; docs/netpolicy.md,
/// "The node guard").
pub trait EgressRules: Send + Sync + 'static {
    /// Installs (`Some((cgroup directory, egress boundary))`: the node
    /// guard, and the egress if any) or removes (`None`) engine `engine`'s
    /// rules; "already so" is success.
    fn set(&self, engine: &str, rules: Option<(PathBuf, Option<Boundary>)>) -> Result<(), String>;
}

impl EgressRules for crate::boundary::Boundaries {
    fn set(&self, engine: &str, rules: Option<(PathBuf, Option<Boundary>)>) -> Result<(), String> {
        let rules = match rules {
            None => None,
            Some((dir, b)) => Some(egress_rules(engine, &dir, b)?),
        };
        self.set_engine_egress(engine, rules)
            .map_err(|e| e.to_string())
    }
}

/// Engine `engine`'s rules for nft: its cgroup directory `dir` on the
/// cgroup2 mount holding it; the node guard, and its egress if any.
fn egress_rules(engine: &str, dir: &Path, b: Option<Boundary>) -> Result<EngineEgress, String> {
    let mount = cgroup2_mount_of(dir)
        .ok_or_else(|| format!("{} is not on a cgroup2 mount", dir.display()))?;
    let mut rules = match b {
        Some(b) => EngineEgress::new(engine, &mount, dir, b),
        None => EngineEgress::guard_only(engine, &mount, dir),
    }
    .map_err(|e| e.to_string())?;
    // The cgroups as they are now: ones made again under the same names
    // (the engines' unit restarted) get their rules loaded again.
    let ino = |d: &Path| {
        std::fs::metadata(d)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .map_err(|e| format!("{}: {e}", d.display()))
    };
    rules.cgroup_id = ino(dir)?;
    rules.subtree_id = ino(dir.parent().unwrap_or(dir))?;
    Ok(rules)
}

/// Most bytes of `engines.json` read at start for the egress rules
/// ([`MAX_ENGINES`] specs of at most 1 MiB each, with room for the rest).
const MAX_STATE_BYTES: u64 = (MAX_ENGINES as u64 + 1) * (2 << 20);

/// At start, before the first table is loaded: the egress rules of every
/// engine `engines.json` records with instances (running when the last
/// agent wrote it, so perhaps still running, held only by the tenant's
/// sub-boundary until the runtime re-adopts it). Its cgroup is
/// `<cgroup_root>/<subtree>/<engine>`; an engine whose cgroup is gone has
/// nothing running (a node reboot) and is left out (nft cannot name a
/// missing cgroup). What cannot be read is logged and left out: the
/// runtime then refuses to start (a damaged state file) or kills an
/// instance it cannot hold to its egress when it re-adopts it.
pub fn recorded_egress(cgroup_root: &Path, subtree: &str, state_dir: &Path) -> Vec<EngineEgress> {
    recorded_egress_dirs(cgroup_root, subtree, state_dir)
        .into_iter()
        .filter_map(|(name, dir, b)| {
            egress_rules(&name, &dir, b)
                .inspect_err(
                    |e| tracing::error!(engine = name, error = %e, "recorded egress not preloaded"),
                )
                .ok()
        })
        .collect()
}

/// [`recorded_egress`] before the rules are made: (engine, its cgroup
/// directory, its egress boundary if any: every engine gets the node
/// guard).
fn recorded_egress_dirs(
    cgroup_root: &Path,
    subtree: &str,
    state_dir: &Path,
) -> Vec<(String, PathBuf, Option<Boundary>)> {
    let path = state_dir.join(STATE_FILE);
    let read = std::fs::File::open(&path).and_then(|f| {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_STATE_BYTES + 1), &mut buf)?;
        Ok(buf)
    });
    let bytes = match read {
        Ok(b) if b.len() as u64 > MAX_STATE_BYTES => {
            tracing::error!(path = %path.display(), max = MAX_STATE_BYTES, "engine state too large to read for the egress rules");
            return Vec::new();
        }
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the engine state for the egress rules");
            return Vec::new();
        }
    };
    let state: StateFile = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "damaged engine state: no egress rules preloaded");
            return Vec::new();
        }
    };
    let Ok(sub) = CgroupPath::new(subtree) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for r in state.engines.iter().filter(|r| !r.instances.is_empty()) {
        let b = match Spec::from_stored_json(&r.current.spec).map(|s| s.egress_boundary()) {
            Ok(Ok(b)) => b,
            // Its egress cannot be made: the guard at least (the runtime
            // refuses the instance when it re-adopts it without its egress).
            Ok(Err(e)) => {
                tracing::error!(engine = r.name, error = %e, "recorded egress not preloaded");
                None
            }
            Err(e) => {
                tracing::error!(engine = r.name, error = %e, "recorded spec not preloaded");
                None
            }
        };
        let Ok(cg) = sub.child(&r.name) else {
            continue;
        };
        let dir = cgroup_root.join(cg.as_path());
        if !dir.is_dir() {
            continue;
        }
        out.push((r.name.clone(), dir, b));
    }
    out
}

/// No boundary owner (tests of other things): an engine with egress
/// cannot be confined, so it is refused (fails closed); the node guard
/// alone is taken as done, and removing is trivially done.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub struct NoEgress;

#[cfg(test)]
impl EgressRules for NoEgress {
    fn set(&self, _engine: &str, rules: Option<(PathBuf, Option<Boundary>)>) -> Result<(), String> {
        match rules {
            None | Some((_, None)) => Ok(()),
            Some(_) => Err("no boundary owner to enforce the egress in".into()),
        }
    }
}

/// The cgroup v2 mount holding `dir` (the longest mount point above it):
/// the level of a `socket cgroupv2` match counts from there.
fn cgroup2_mount_of(dir: &Path) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match (f.get(1), f.get(2)) {
                (Some(m), Some(&"cgroup2")) => Some(PathBuf::from(m)),
                _ => None,
            }
        })
        .filter(|m| dir.starts_with(m))
        .max_by_key(|m| m.components().count())
}

/// Where the tenant volume is mounted, if it is.
pub trait VolumeDir: Send + Sync + 'static {
    /// The mount point, only while the volume is open and mounted.
    fn mounted(&self) -> Option<PathBuf>;
    /// Unmounts since the agent started, counted once each is done: which
    /// mount a holder of descriptors on the volume was given.
    fn unmounts(&self) -> u64 {
        0
    }
}

impl VolumeDir for crate::volume::Volume {
    fn mounted(&self) -> Option<PathBuf> {
        let (_, rt, _) = self.status().ok()?;
        let at = self.mount_point();
        (rt.open && leasehold_storage::fs::is_mounted(at)).then(|| at.to_owned())
    }
    fn unmounts(&self) -> u64 {
        crate::volume::Volume::unmounts(self)
    }
}

/// A launched instance.
pub trait Proc: Send {
    /// The pid shown in `status` (the shim's: the engine's init).
    fn pid(&self) -> u32;
    /// Sends a signal (the shim forwards SIGTERM; SIGKILL ends the engine).
    fn signal(&self, sig: Signal) -> Result<(), LaunchError>;
    /// A function that blocks until the instance has exited (run on a
    /// thread of its own), for a `Proc` without [`Proc::exit_fd`].
    fn exit_waiter(&self) -> Result<Box<dyn FnOnce() + Send>, LaunchError> {
        Err(LaunchError::Io {
            op: "watch the exit of",
            path: PathBuf::from("the instance"),
            source: std::io::ErrorKind::Unsupported.into(),
        })
    }
    /// A descriptor readable once the instance has exited (a pidfd),
    /// watched by the one I/O thread instead of a waiter thread per
    /// instance; `None`: use [`Proc::exit_waiter`].
    fn exit_fd(&self) -> Option<Result<OwnedFd, LaunchError>> {
        None
    }
    /// After the waiter returned: how it ended.
    fn reap(&mut self) -> launch::Exit;
    /// Lets a spawned instance go on once the state names it (it waits
    /// until then: [`launch::Launcher::start_held`]); a no-op for an
    /// adopted one.
    fn release(&mut self) {}
    /// The read ends of its output FIFOs, once (`None`: not captured).
    fn take_output(&mut self) -> Option<output::Output> {
        None
    }
    /// The read end of its status FIFO, once (`None`: none here). Read
    /// only with [`Proc::exit_fd`]; the shim uses its grant whenever the
    /// FIFO is in its run directory.
    fn take_status(&mut self) -> Option<OwnedFd> {
        None
    }
}

/// Starts and re-adopts instances.
pub trait Spawner: Send + Sync + 'static {
    /// Starts one instance (blocking, bounded); its output is appended to
    /// `stdout.log` and `stderr.log` in `log_dir`.
    /// `secrets` are the bytes of `spec.secrets`, in order (handed over:
    /// the launcher's thread writes them after the move). The instance
    /// waits until [`Proc::release`]; reaped or dropped unreleased, it
    /// fails closed without running the engine.
    fn spawn(
        &self,
        spec: &LaunchSpec,
        run_dir: &Path,
        log_dir: &Path,
        secrets: Vec<SecretBytes>,
    ) -> Result<Box<dyn Proc>, LaunchError>;
    /// Finds a running instance again after an agent restart.
    fn adopt(&self, run_dir: &Path) -> Result<Box<dyn Proc>, LaunchError>;
    /// How the engine of an instance that is gone (not adoptable) ended,
    /// as its shim recorded it (`None`: no record — the shim was killed,
    /// or the engine never ran).
    fn recorded_exit(&self, run_dir: &Path) -> Option<launch::Exit>;
    /// Runs an `exec` probe inside the running instance of `run_dir`,
    /// held to `timeout` (blocking: called on a probe thread).
    fn exec_probe(&self, run_dir: &Path, argv: &[String], timeout: Duration) -> launch::ProbeExit;
    /// Every engine is being stopped (before the tenant volume changes):
    /// nothing prepared ahead may hold the volume's mounts.
    fn quiesce(&self) {}
}

/// Opens the tenant's secrets for engines (the agent: the node's secret
/// store under the key derived from the disk key).
pub trait SecretSource: Send + Sync + 'static {
    /// Whether a secret of this name is stored (deploy checks names).
    fn exists(&self, name: &str) -> Result<bool, String>;
    /// The secret's bytes (zeroized when dropped).
    fn open(&self, name: &str) -> Result<SecretBytes, String>;
}

/// No secret store: every name is missing (tests that need none).
#[cfg(test)]
#[derive(Debug)]
pub struct NoSecrets;

#[cfg(test)]
impl SecretSource for NoSecrets {
    fn exists(&self, _: &str) -> Result<bool, String> {
        Ok(false)
    }
    fn open(&self, name: &str) -> Result<SecretBytes, String> {
        Err(format!("no secret named {name:?}"))
    }
}

/// The node's secret store, opened with the key the store's writes use.
pub struct TenantSecrets {
    /// The key thread (derives the store's key on each open; the key is
    /// dropped, zeroized, right after).
    pub keys: crate::keys::KeyBackend,
    /// The store.
    pub store: crate::secrets::SecretStore,
}

impl SecretSource for TenantSecrets {
    fn exists(&self, name: &str) -> Result<bool, String> {
        let list = self.store.list().map_err(|e| e.to_string())?;
        Ok(list.iter().any(|e| e.name == name))
    }
    fn open(&self, name: &str) -> Result<SecretBytes, String> {
        use leasehold_node::backend::KeyStore;
        let mut keys = crate::keys::KeyBackend(self.keys.0.clone());
        let key = keys
            .data_key(leasehold_node::SECRET_STORE_PURPOSE)
            .map_err(|e| format!("the secret store's key: {e}"))?;
        let mut plain = self.store.get(&key, name).map_err(|e| e.to_string())?;
        // Moved out (the buffer, not a copy); the emptied wrapper zeroizes
        // nothing more.
        Ok(SecretBytes::new(std::mem::take(&mut *plain)))
    }
}

/// The real launcher (`engines::launch`).
#[derive(Debug)]
pub struct ShimSpawner(pub launch::Launcher);

struct ShimProc(launch::Running, Option<output::Output>, Option<OwnedFd>);

impl Proc for ShimProc {
    fn pid(&self) -> u32 {
        self.0.shim_pid()
    }
    fn signal(&self, sig: Signal) -> Result<(), LaunchError> {
        self.0.signal(sig)
    }
    fn exit_fd(&self) -> Option<Result<OwnedFd, LaunchError>> {
        Some(
            self.0
                .pidfd()
                .try_clone_to_owned()
                .map_err(|source| LaunchError::Io {
                    op: "dup",
                    path: PathBuf::from("pidfd"),
                    source,
                }),
        )
    }
    fn take_output(&mut self) -> Option<output::Output> {
        self.1.take()
    }
    fn take_status(&mut self) -> Option<OwnedFd> {
        self.2.take()
    }
    fn release(&mut self) {
        self.0.release();
    }
    fn reap(&mut self) -> launch::Exit {
        match self.0.wait(Some(Duration::from_secs(1))) {
            Ok(Some(e)) => e,
            Ok(None) => {
                launch::Exit::ShimLost("the shim's pidfd was readable but it had not exited".into())
            }
            Err(e) => launch::Exit::ShimLost(e.to_string()),
        }
    }
}

impl Spawner for ShimSpawner {
    fn spawn(
        &self,
        spec: &LaunchSpec,
        run_dir: &Path,
        log_dir: &Path,
        secrets: Vec<SecretBytes>,
    ) -> Result<Box<dyn Proc>, LaunchError> {
        let _ = log_dir; // the log writer makes it, under the mounted volume only
        std::fs::create_dir_all(run_dir).map_err(|source| LaunchError::Io {
            op: "mkdir",
            path: run_dir.to_owned(),
            source,
        })?;
        // FIFOs, not files: the agent stamps, splits and bounds each line;
        // not pipes: the shim holds the FIFOs open, so the engine's output
        // outlives an agent restart (docs/engines.md, "Logs").
        let (out, stdout, stderr) = output::make_fifos(run_dir)?;
        let status = output::make_status_fifo(run_dir)?;
        // Held until the runtime has recorded the instance (`launch`).
        let r = self
            .0
            .start_held_fds(spec, run_dir, stdout.into(), stderr.into(), secrets)?;
        Ok(Box::new(ShimProc(r, Some(out), Some(status))))
    }
    fn recorded_exit(&self, run_dir: &Path) -> Option<launch::Exit> {
        launch::recorded_exit(run_dir)
    }
    fn adopt(&self, run_dir: &Path) -> Result<Box<dyn Proc>, LaunchError> {
        let r = launch::Running::adopt(run_dir)?;
        Ok(Box::new(ShimProc(
            r,
            output::reopen_fifos(run_dir),
            output::reopen_status_fifo(run_dir),
        )))
    }
    fn exec_probe(&self, run_dir: &Path, argv: &[String], timeout: Duration) -> launch::ProbeExit {
        self.0.probe(run_dir, argv, timeout)
    }
    fn quiesce(&self) {
        self.0.discard_warm();
    }
}

// ---------------------------------------------------------------------------
// State on disk.

#[derive(Debug, Clone, Serialize, Deserialize)]
struct VersionRec {
    id: u64,
    image: String,
    /// The spec as JSON (re-validated with `Spec::from_json` on load).
    spec: String,
    /// The launch spec resolved against the image (cgroup filled per
    /// instance).
    launch: LaunchSpec,
    /// The image's config digest (its ID) as unpacked: a fresh root
    /// (`on_failure = ["reload"]`) is made only from an image that
    /// verifies to it again. None: recorded by an older agent.
    #[serde(default)]
    digest: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EngineRec {
    name: String,
    uid: u32,
    enabled: bool,
    current: VersionRec,
    /// Instances alive when last written: (id, shim pid), run dirs under
    /// `<run_dir>/<name>/i<id>` (their `shim.pid` holds pid + start time).
    #[serde(default)]
    instances: Vec<(u64, u32)>,
    next_instance: u64,
    next_version: u64,
    /// Enabled, nothing alive, nothing pending (exited and not restarted
    /// by its policy, or given up) when last written. Read back only within
    /// the same boot ([`StateFile::boot_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    settled: Option<SettledRec>,
}

/// An engine at rest as it was recorded (see [`Supervisor::settled`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SettledRec {
    state: Settled,
    last_exit: Option<Exit>,
    restarts: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    /// The boot it was written in (None: unknown, or an older agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
    engines: Vec<EngineRec>,
}

// ---------------------------------------------------------------------------
// The runtime thread.

struct Live {
    /// Its directory name (`i<N>`) for the cgroup and the run directory.
    dir_name: u64,
    proc: Box<dyn Proc>,
    cg: CgroupPath,
    run_dir: PathBuf,
    oom_kills: u64,
    /// The notify socket's reader (heartbeat on); ends when dropped.
    _notifier: Option<notify::Notifier>,
    /// Its shim's confinement report, read by `status` once it is there.
    confinement: Arc<ConfinementCell>,
}

/// An instance's confinement as its shim reported it (`report.json`,
/// written once the shim is confined, before its engine starts; the same
/// for every engine it starts in place). Read by the view, which answers
/// `status` from a snapshot taken at the runtime's last step: the report
/// usually comes after that step, with no step of its own.
struct ConfinementCell {
    run_dir: PathBuf,
    read: std::sync::OnceLock<Option<Confinement>>,
}

impl ConfinementCell {
    /// The report once written, then kept (`None` before; a failed
    /// confinement is none: its engine did not run).
    fn get(&self) -> Option<Confinement> {
        if let Some(c) = self.read.get() {
            return c.clone();
        }
        let r = launch::read_report(&self.run_dir)?;
        let c = r.result.is_ok().then_some(Confinement {
            landlock_abi: r.landlock_abi,
            landlock: r.landlock,
            seccomp: r.seccomp,
        });
        self.read.get_or_init(|| c).clone()
    }
}

/// The last result of one probe, for `status`.
#[derive(Debug, Clone)]
struct ProbeSeen {
    ok: bool,
    detail: String,
    at: SystemTime,
}

/// Numbers each `Engine` made by this agent: a name can be removed and
/// deployed again while a probe of the old one still runs, and instances
/// are numbered from 1 again.
static INCARNATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn incarnation() -> u64 {
    INCARNATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

struct Engine {
    name: String,
    /// Which engine of this name (`incarnation()`): a late probe result
    /// of a removed one is not taken for the new one's.
    incarnation: u64,
    uid: u32,
    sup: Supervisor,
    versions: BTreeMap<VersionId, VersionRec>,
    live: BTreeMap<InstanceId, Live>,
    /// An instance found alive at start (with its directory name), taken
    /// by the supervisor's first launch instead of a new one.
    adoptable: Option<(Box<dyn Proc>, u64)>,
    /// Directory names of this run's instances are `id_base + id`: above
    /// every name an earlier agent used (no clash with an adopted one).
    id_base: u64,
    /// One more than the highest directory name used.
    next_name: u64,
    /// Instance cgroups of ended instances that could not be removed yet
    /// (processes left): read back before the engine is called stopped.
    leftover: Vec<CgroupPath>,
    /// Log rate limit: window start, lines logged, lines suppressed.
    log_window: Instant,
    log_lines: u32,
    log_suppressed: u32,
    next_version: u64,
    events: VecDeque<String>,
    /// Probes running now (instance, index): one at a time each.
    probing: std::collections::BTreeSet<(InstanceId, usize)>,
    /// Probe runs that waited for the node's bound (status).
    probes_delayed: u64,
    /// The last result of each probe of the current spec, by index.
    probes_seen: BTreeMap<usize, ProbeSeen>,
    /// Why the last `on_failure = ["reload"]` had no fresh root (status).
    fresh_note: Option<String>,
    /// Marked to run but not started by this agent: why (status; gone at
    /// its next launch).
    held_note: Option<&'static str>,
}

/// Refuses engine uids another account may own: the `MAX_ENGINES` uids
/// and gids from `base` against the user and group databases (NSS, so
/// directory users too) and the subordinate ranges of `/etc/subuid` and
/// `/etc/subgid` (rootless containers run as those). An engine sharing a
/// uid with any of them could read that account's files, and it could
/// read the engine's. Err names the first conflict, or what could not be
/// read (a lookup that fails is not taken for "no such account").
pub fn check_uid_range(base: u32) -> Result<(), String> {
    use nix::unistd::{Gid, Group, Uid, User};
    let read = |p: &str| match std::fs::read_to_string(p) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!(
            "engines.uid_base: cannot read {p} to check the engines' ids against it: {e}"
        )),
    };
    let lookup = |what: &str, id: u32, e: nix::Error| {
        format!("engines.uid_base: cannot look up {what} {id} in the account databases: {e}")
    };
    let (subuid, subgid) = (read("/etc/subuid")?, read("/etc/subgid")?);
    uid_range_conflict(
        base,
        u32::try_from(MAX_ENGINES).unwrap_or(u32::MAX),
        |u| {
            User::from_uid(Uid::from_raw(u))
                .map(|o| o.map(|u| u.name))
                .map_err(|e| lookup("uid", u, e))
        },
        |g| {
            Group::from_gid(Gid::from_raw(g))
                .map(|o| o.map(|g| g.name))
                .map_err(|e| lookup("gid", g, e))
        },
        &[("/etc/subuid", &subuid), ("/etc/subgid", &subgid)],
    )
}

/// [`check_uid_range`] over given lookups and subordinate-id files
/// (`(path, text)`; lines `name:start:count`, others skipped).
fn uid_range_conflict(
    base: u32,
    count: u32,
    user: impl Fn(u32) -> Result<Option<String>, String>,
    group: impl Fn(u32) -> Result<Option<String>, String>,
    subordinate: &[(&str, &str)],
) -> Result<(), String> {
    let end = u64::from(base) + u64::from(count);
    let range = format!("{base}..{end}");
    for id in base..base.saturating_add(count) {
        if let Some(name) = user(id)? {
            return Err(format!(
                "engines.uid_base: uid {id} (in the engines' range {range}) belongs to user {name:?}; choose a uid_base whose {count} ids no account uses"
            ));
        }
        if let Some(name) = group(id)? {
            return Err(format!(
                "engines.uid_base: gid {id} (in the engines' range {range}) belongs to group {name:?}; choose a uid_base whose {count} ids no account uses"
            ));
        }
    }
    for (path, text) in subordinate {
        for line in text.lines() {
            let mut f = line.trim().split(':');
            let (Some(name), Some(start), Some(n), None) = (f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            let (Ok(start), Ok(n)) = (start.parse::<u64>(), n.parse::<u64>()) else {
                continue;
            };
            if n > 0 && start < end && u64::from(base) < start.saturating_add(n) {
                return Err(format!(
                    "engines.uid_base: the engines' range {range} overlaps {name:?}'s subordinate ids {start}..{} in {path}; choose a uid_base outside every subordinate range",
                    start.saturating_add(n)
                ));
            }
        }
    }
    Ok(())
}

/// Why an unpack or a tenant command gave way to a stop of every engine.
const STOPPING_ALL: &str =
    "every engine is being stopped (a change of keys or tenancy, or a corrective action)";

/// [`Runtime::abort`]: raised once for each stop of every engine (or
/// forget) sent, lowered once as each is read; up while any is on its way.
#[derive(Default)]
pub(crate) struct AbortUnpacks {
    /// Read by the unpacker on every read.
    flag: std::sync::atomic::AtomicBool,
    /// Stops sent and not yet read (the flag is set under this lock).
    pending: Mutex<u64>,
}

impl AbortUnpacks {
    fn raise(&self) {
        let mut n = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn lower(&self) {
        let mut n = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.flag.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn raised(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// [`Engine::held_note`] when no tenant volume was mounted at the load.
const HELD_NO_VOLUME: &str = "marked to run, not started: no tenant volume was mounted when the agent started (it starts with `engine start`, or with the next agent start that finds the volume)";

enum Cmd {
    Deploy(String, String, Box<Spec>),
    Start(String),
    Stop(String, Option<Duration>),
    Restart(String),
    Reload(String, Option<String>, Option<Box<Spec>>),
    Rm(String),
    StopAll(Duration),
    ForgetAll,
    /// Sent by the handle's stop fallback after it set `halted`: read
    /// after the late `StopAll` (the same queue), so launches go on again
    /// once that stop was carried out, whatever follows (a rollback's
    /// restarts, a corrective stop).
    Unhalt,
}

enum Reply {
    Status(Result<EngineStatus, RuntimeError>),
    Unit(Result<(), RuntimeError>),
    Stopped(StopReport),
    Forgot(Result<usize, RuntimeError>),
}

enum Msg {
    Cmd(Cmd, SyncSender<Reply>),
    Exited(String, InstanceId),
    /// The shim's status records: the engine exited and will be started
    /// again in place; it is being started now.
    /// (With the OOM-kill count of its cgroup read at the record.)
    Respawning(String, InstanceId, launch::Exit, Option<u64>),
    Respawned(String, InstanceId),
    /// A probe finished: `Ok` healthy, `Err` why not.
    Probed(String, u64, InstanceId, usize, Result<String, String>),
    /// A message on an instance's notify socket (its uid checked).
    Notified(String, InstanceId, NotifyMessage),
    /// The agent is going away: the thread ends, the engines run on (the
    /// next agent re-adopts them).
    Shutdown,
}

struct PendingStop {
    deadline: Instant,
    names: Vec<String>,
    reply: SyncSender<Reply>,
}

/// Each engine's status at the runtime's last step, with its running
/// instance's confinement report (read when asked: see
/// [`ConfinementCell`]).
type Snapshot = Arc<RwLock<BTreeMap<String, (EngineStatus, Option<Arc<ConfinementCell>>)>>>;

struct Runtime {
    cfg: RuntimeConfig,
    /// Set by the handle's stop fallback (the tenant's cgroups killed for
    /// an erase while this thread was busy): nothing is launched until the
    /// engines are forgotten (`ForgetAll`), so work this thread finishes
    /// late (a fresh root, a restart timer) starts nothing on a volume
    /// being erased.
    halted: Arc<std::sync::atomic::AtomicBool>,
    /// Raised by the handle as it sends a stop of every engine or a
    /// forget: an unpack in progress (deploy, reload, fresh root) stops at
    /// once and leaves nothing, so it neither writes on the volume about
    /// to be erased nor holds that stop for minutes, and tenant commands
    /// queued before the stop are refused, not carried out. Lowered as
    /// this thread reads the last such command sent.
    abort: Arc<AbortUnpacks>,
    cgroups: Arc<dyn Cgroups>,
    spawner: Arc<dyn Spawner>,
    volume: Arc<dyn VolumeDir>,
    secrets: Arc<dyn SecretSource>,
    egress: Arc<dyn EgressRules>,
    engines: BTreeMap<String, Engine>,
    timers: BTreeMap<(Instant, String, TimerId), ()>,
    tx: Sender<Msg>,
    snapshot: Snapshot,
    /// Snapshots published (`publish`); read by tests.
    published: Arc<std::sync::atomic::AtomicU64>,
    stop_all: Option<PendingStop>,
    killed: Vec<String>,
    /// The node's bound on probe runs: due runs wait here past it.
    probes: probe_gate::ProbeGate,
    logs: output::LogSink,
    events: output::Events,
    tenant: Arc<tenant::Shared>,
    /// What the last save wrote: its bytes and the file's [`FileStamp`]
    /// then.
    saved: std::cell::RefCell<Option<(Vec<u8>, FileStamp)>>,
}

/// The name of instance `n`'s cgroup and run directory: `i<N>`.
fn instance_dir(n: u64) -> String {
    format!("i{n}")
}

/// `N` of a name exactly as `instance_dir` writes it (no sign, no leading
/// zero): anything else is not an instance's.
fn instance_number(name: &str) -> Option<u64> {
    let n = name.strip_prefix('i')?.parse::<u64>().ok()?;
    (instance_dir(n) == name).then_some(n)
}

/// Leaves [`STOPPING_MARK`] in `run_dir` (tmpfs, no sync: it matters
/// only to an agent of the same boot). Best effort: without it an
/// interrupted stop reads as the engine's own exit.
fn mark_stopping(run_dir: &Path) {
    if let Err(e) = std::fs::write(run_dir.join(STOPPING_MARK), b"") {
        tracing::warn!(run_dir = %run_dir.display(), error = %e, "stop mark not written");
    }
}

fn subtree(cfg: &RuntimeConfig) -> Result<CgroupPath, RuntimeError> {
    CgroupPath::new(&cfg.subtree).map_err(|source| RuntimeError::Cgroup {
        root: cfg.cgroup_root.clone(),
        source,
    })
}

/// Which file a path names and its last change: device, inode, size and
/// ctime (which any write, rename or chmod moves on), so that a file
/// removed and made again (even on a reused inode) or rewritten in place
/// is told apart from the one written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp(u64, u64, u64, i64, i64);

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(FileStamp(
            m.dev(),
            m.ino(),
            m.size(),
            m.ctime(),
            m.ctime_nsec(),
        ))
    }
}

impl Runtime {
    fn cg_err(&self) -> impl FnOnce(CgroupError) -> RuntimeError {
        let root = self.cfg.cgroup_root.clone();
        move |source| RuntimeError::Cgroup { root, source }
    }

    /// The engine's cgroup under the tenant's subtree, every controller
    /// enabled from the subtree down. The subtree's parent is the
    /// delegation's (the engines unit, docs/engines.md): it must exist and
    /// is never created here (a missing one is `Absent`, naming it); its
    /// controllers are enabled if they are not yet (nothing is written when
    /// they are). At the root of the mount the subtree is made directly.
    fn engine_cgroup(&self, engine: &str) -> Result<CgroupPath, RuntimeError> {
        // The landlord's budget is written on the subtree first: no
        // engine runs in a subtree without it.
        let sub = self.tenant.tenant_cgroup()?;
        let cg = sub.child(engine).map_err(self.cg_err())?;
        self.cgroups.create(&cg).map_err(self.cg_err())?;
        self.cgroups
            .enable_controllers(&cg, &Controller::ALL)
            .map_err(self.cg_err())?;
        Ok(cg)
    }

    fn volume_dir(&self) -> Result<PathBuf, RuntimeError> {
        let v = self.volume.mounted().ok_or(RuntimeError::NoVolume)?;
        let dir = v.join(&self.cfg.images_dir);
        // The volume's root is writable by the tenant's users: never follow
        // something planted in place of the agent's directory.
        leasehold_storage::fs::ensure_own_dir(&dir).map_err(io("check", &dir))?;
        Ok(dir)
    }

    /// Removes the staging roots of unpacks an earlier agent did not
    /// finish (killed mid-deploy: up to the unpack cap each, on the tenant
    /// volume, which nothing else removes). Only `<engine>/v<N>/.*.unpacking-*`
    /// directories: never a data dir, never a version.
    fn sweep_staging(&self) {
        let Ok(base) = self.volume_dir() else { return };
        let dirs = |p: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        };
        for engine in dirs(&base) {
            // Not below the tenant's own directory.
            if engine
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| RESERVED_NAMES.contains(&n))
            {
                continue;
            }
            for v in dirs(&engine) {
                let version = v.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if version
                    .strip_prefix('v')
                    .is_none_or(|n| n.parse::<u64>().is_err())
                {
                    continue;
                }
                for staging in dirs(&v) {
                    let n = staging.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if n.starts_with('.') && n.contains(".unpacking-") {
                        match std::fs::remove_dir_all(&staging) {
                            Ok(()) => {
                                tracing::info!(path = %staging.display(), "removed an unfinished unpack")
                            }
                            Err(e) => {
                                tracing::warn!(path = %staging.display(), error = %e, "cannot remove an unfinished unpack")
                            }
                        }
                    }
                }
            }
        }
    }

    fn run_dir(&self, engine: &str, dir_name: u64) -> PathBuf {
        self.cfg.run_dir.join(engine).join(instance_dir(dir_name))
    }

    fn publish(&self) {
        let mut m = BTreeMap::new();
        for (n, e) in &self.engines {
            m.insert(n.clone(), (status_of(e), confinement_cell(e)));
        }
        self.tenant.set_engine_limits(
            self.engines
                .values()
                .map(|e| e.sup.spec().limits.clone())
                .collect(),
        );
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = m;
        self.published
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn save(&self) -> Result<(), RuntimeError> {
        let st = StateFile {
            format: 1,
            boot_id: self.cfg.boot_id.clone(),
            engines: self
                .engines
                .values()
                .map(|e| EngineRec {
                    name: e.name.clone(),
                    uid: e.uid,
                    enabled: e.sup.enabled(),
                    current: e.versions[&e.sup.version()].clone(),
                    instances: e
                        .live
                        .values()
                        .map(|l| (l.dir_name, l.proc.pid()))
                        .collect(),
                    next_instance: e.next_name,
                    next_version: e.next_version,
                    settled: e.sup.settled().filter(|_| e.live.is_empty()).map(|state| {
                        let st = e.sup.status();
                        SettledRec {
                            state,
                            last_exit: st.last_exit,
                            restarts: st.restarts,
                        }
                    }),
                })
                .collect(),
        };
        let path = self.cfg.state_dir.join(STATE_FILE);
        let text = serde_json::to_vec_pretty(&st).map_err(|e| RuntimeError::State {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        // A start saves before its release and again after, mostly the
        // same bytes: each write is a temporary file, fsync and rename
        // (13 ms under the lab's TCG). Skipped only while the file is still
        // the one this runtime wrote (a removed, replaced or rewritten
        // file is written again).
        if let Some((bytes, stamp)) = &*self.saved.borrow() {
            if *bytes == text && FileStamp::of(&path).as_ref() == Some(stamp) {
                return Ok(());
            }
        }
        // Forgotten first: a failed write leaves no claim to what is there.
        self.saved.replace(None);
        crate::fsutil::write_atomic(&self.cfg.state_dir, STATE_FILE, &text)
            .map_err(io("write", &path))?;
        self.saved
            .replace(FileStamp::of(&path).map(|stamp| (text, stamp)));
        Ok(())
    }

    fn save_logged(&self) {
        if let Err(e) = self.save() {
            tracing::error!(error = %e, "cannot record the engines' state");
        }
    }

    fn get(&mut self, name: &str) -> Result<&mut Engine, RuntimeError> {
        self.engines
            .get_mut(name)
            .ok_or_else(|| RuntimeError::NotFound(name.to_owned()))
    }

    /// Feeds `input` to `name`'s supervisor and carries out what it asks.
    fn step(&mut self, name: &str, input: Input) -> Result<(), RuntimeError> {
        self.steps(name, VecDeque::from([input]))
    }

    /// Carries out `actions` (the supervisor's, from a call other than
    /// [`Supervisor::step`]), then feeds what they report back.
    fn carry_out(&mut self, name: &str, actions: Vec<Action>) -> Result<(), RuntimeError> {
        let mut queue = VecDeque::new();
        for a in actions {
            if let Some(next) = self.act(name, a) {
                queue.push_back(next);
            }
        }
        self.steps(name, queue)
    }

    fn steps(&mut self, name: &str, mut queue: VecDeque<Input>) -> Result<(), RuntimeError> {
        while let Some(input) = queue.pop_front() {
            let now = Instant::now();
            let e = self.get(name)?;
            let actions = e.sup.step(now, input).map_err(|r| RuntimeError::Refused {
                name: name.to_owned(),
                reason: r.to_string(),
            })?;
            for a in actions {
                if let Some(next) = self.act(name, a) {
                    queue.push_back(next);
                }
            }
        }
        Ok(())
    }

    fn act(&mut self, name: &str, a: Action) -> Option<Input> {
        match a {
            Action::Launch {
                instance,
                version,
                fresh_root,
                respawn,
            } => Some(self.launch(name, instance, version, fresh_root, respawn)),
            Action::Terminate { instance } => {
                let e = self.engines.get(name)?;
                if let Some(l) = e.live.get(&instance) {
                    mark_stopping(&l.run_dir);
                    if let Err(err) = l.proc.signal(Signal::SIGTERM) {
                        tracing::warn!(engine = name, %instance, error = %err, "SIGTERM");
                    }
                }
                None
            }
            Action::Kill { instance } => {
                if self.stop_all.is_some() && !self.killed.iter().any(|n| n == name) {
                    self.killed.push(name.to_owned());
                }
                let e = self.engines.get(name)?;
                if let Some(l) = e.live.get(&instance) {
                    mark_stopping(&l.run_dir);
                    if let Err(err) = self.cgroups.kill(&l.cg) {
                        tracing::warn!(engine = name, %instance, error = %err, "cgroup.kill");
                    }
                    if let Err(err) = l.proc.signal(Signal::SIGKILL) {
                        tracing::warn!(engine = name, %instance, error = %err, "SIGKILL");
                    }
                }
                None
            }
            Action::RunProbe {
                instance, probe, ..
            } => {
                self.run_probe(name, instance, probe);
                None
            }
            Action::Schedule { timer, at } => {
                self.timers.insert((at, name.to_owned(), timer), ());
                None
            }
            Action::Cancel(t) => {
                self.timers.retain(|(_, n, id), _| !(n == name && *id == t));
                None
            }
            Action::RebootNode { failure } => {
                // The supervisor plans it only when allowed; the cooldown,
                // record and logind call are the corrective actions'.
                match &self.cfg.reboot_node {
                    Some(tx) => {
                        tracing::warn!(engine = name, %failure, "the engine asks for a node reboot");
                        // Bounded: requests past a few queued are the
                        // same request (one reboot an hour at most).
                        if tx.try_send((name.to_owned(), failure.to_string())).is_err() {
                            tracing::warn!(
                                engine = name,
                                "a node reboot is already asked for; this request is dropped"
                            );
                        }
                    }
                    None => {
                        tracing::warn!(engine = name, %failure, "the engine asks for a node reboot; not allowed, ignored")
                    }
                }
                None
            }
            Action::Emit(ev) => {
                if let Event::ReloadFailed { .. } = ev {
                    // The running version's limits back: the failed one's
                    // were written at its instance's launch.
                    let current = self
                        .engines
                        .get(name)
                        .and_then(|e| e.versions.get(&e.sup.version()))
                        .map(|v| v.spec.clone());
                    if let Some(json) = current {
                        let written = subtree(&self.cfg)
                            .and_then(|s| s.child(name).map_err(self.cg_err()))
                            .and_then(|cg| self.set_version_limits(name, &json, &cg));
                        if let Err(err) = written {
                            tracing::warn!(engine = name, error = %err, "the running version's limits not written back after a failed reload");
                        }
                    }
                }
                if let Some(e) = self.engines.get_mut(name) {
                    // The tenant's spec decides how often events happen (a
                    // 1 ms restart loop): their log lines are rate-limited.
                    let now = Instant::now();
                    if now.saturating_duration_since(e.log_window) >= LOG_WINDOW {
                        if e.log_suppressed > 0 {
                            tracing::warn!(
                                engine = name,
                                suppressed = e.log_suppressed,
                                "engine event lines suppressed in the last minute"
                            );
                        }
                        e.log_window = now;
                        e.log_lines = 0;
                        e.log_suppressed = 0;
                    }
                    if e.log_lines < LOG_LINES {
                        e.log_lines += 1;
                        // Its kind only: details can carry the tenant's
                        // secret and image names, its commands' text.
                        tracing::info!(engine = name, event = ev.name(), "engine event");
                    } else {
                        e.log_suppressed = e.log_suppressed.saturating_add(1);
                    }
                    if e.events.len() >= MAX_EVENTS {
                        e.events.pop_front();
                    }
                    e.events.push_back(ev.name().to_owned());
                    self.events
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(name, &ev);
                }
                None
            }
        }
    }

    /// `on_failure = ["reload"]`: a fresh root for `version` of engine
    /// `name`, unpacked from its image in the inbox (verified again: the
    /// archive's chain of digests, then its config digest against the one
    /// recorded at deploy) next to the current root, as
    /// `v<N>/rootfs-i<dir>`. Nothing is switched here: the caller launches
    /// from it and makes it the version's root once the instance runs.
    /// Err: why not (the caller runs from the root the engine had).
    fn fresh_root(&self, name: &str, version: VersionId, dir: u64) -> Result<PathBuf, String> {
        let e = self.engines.get(name).ok_or("engine gone")?;
        let v = e.versions.get(&version).ok_or("unknown version")?;
        let base = self.volume_dir().map_err(|e| e.to_string())?;
        let input = base.join("inbox").join(&v.image);
        let Some(want) = v.digest.as_deref() else {
            return Err(format!(
                "no image digest recorded for version {version} (deployed by an older agent): the image cannot be verified"
            ));
        };
        match std::fs::symlink_metadata(&input) {
            Ok(m) if m.is_file() => {}
            _ => {
                return Err(format!(
                    "the stored image {:?} is gone from the inbox",
                    v.image
                ))
            }
        }
        let vdir = v
            .launch
            .rootfs
            .parent()
            .ok_or("no version directory above the root")?
            .to_owned();
        if !vdir.starts_with(&base) {
            return Err("the root is not on the tenant volume".into());
        }
        // Fresh roots an earlier try or agent left (never the current one).
        if let Ok(rd) = std::fs::read_dir(&vdir) {
            for d in rd.flatten() {
                let p = d.path();
                if d.file_name().to_string_lossy().starts_with("rootfs-i") && p != v.launch.rootfs {
                    let _ = std::fs::remove_dir_all(&p);
                }
            }
        }
        let root = vdir.join(format!("rootfs-i{dir}"));
        let u = unpack_image_abortable(&input, &root, &inbox_image_limits(&base), &self.abort.flag)
            .map_err(|e| match e {
                ImageError::Aborted => format!(
                    "the stored image {:?} was not unpacked: {STOPPING_ALL}",
                    v.image
                ),
                e => format!("the stored image {:?} fails verification: {e}", v.image),
            })?;
        if u.config_digest != want {
            let _ = std::fs::remove_dir_all(&root);
            return Err(format!(
                "the stored image {:?} is not the one deployed (config {} instead of {want})",
                v.image, u.config_digest
            ));
        }
        Ok(root)
    }

    fn launch(
        &mut self,
        name: &str,
        instance: InstanceId,
        version: VersionId,
        fresh_root: bool,
        respawn: Option<Respawn>,
    ) -> Input {
        let failed = |reason: String| Input::LaunchFailed { instance, reason };
        if self.halted.load(std::sync::atomic::Ordering::SeqCst) {
            return failed(
                "not started: the tenant's engines were killed for an erase while the runtime was busy"
                    .into(),
            );
        }
        // An engine an older agent let take a reserved name: its directory
        // is the tenant login's own (a planted data/ link would be mounted).
        if RESERVED_NAMES.contains(&name) {
            return failed(format!(
                "the name {name} is reserved since 2026-12-06 (the tenant's inbox); deploy the engine under another name"
            ));
        }
        let Some(e) = self.engines.get_mut(name) else {
            return failed("engine gone".into());
        };
        let Some(v) = e.versions.get(&version) else {
            return failed(format!("unknown version {version}"));
        };
        let mut spec = v.launch.clone();
        // Only in this instance's spec.json, never in the version's record.
        spec.respawn = respawn.map(|r| launch::Respawn {
            delay_ms: u64::try_from(r.delay.as_millis())
                .unwrap_or(launch::MAX_RESPAWN_DELAY_MS)
                .min(launch::MAX_RESPAWN_DELAY_MS),
            on_clean_exit: r.on_clean_exit,
        });
        let spec_text = v.spec.clone();
        let mut notify_sock = None;
        // The socket came back from systemd's store (already in it).
        let mut sock_kept = false;
        e.held_note = None;
        let adopted = e.adoptable.take();
        let adopted_here = adopted.is_some();
        let dir_name = adopted
            .as_ref()
            .map_or(e.id_base.saturating_add(instance.0), |(_, n)| *n);
        e.next_name = e.next_name.max(dir_name.saturating_add(1));
        // `on_failure = ["reload"]`: a fresh root from the verified image,
        // or, when there is none to be had, the root it had (said so).
        let mut fresh = None;
        if fresh_root && adopted.is_none() {
            match self.fresh_root(name, version, dir_name) {
                Ok(root) => {
                    spec.rootfs = root.clone();
                    fresh = Some(root);
                }
                Err(reason) => {
                    let reason = format!("{reason}; running from the previous root");
                    self.note_fresh_root(name, Some(reason.clone()));
                    self.act(
                        name,
                        Action::Emit(Event::ImageReloadFailed { instance, reason }),
                    );
                }
            }
        }
        // A fresh root that did not get to run goes; the old one stays.
        let failed = |reason: String| {
            if let Some(r) = &fresh {
                let _ = std::fs::remove_dir_all(r);
            }
            failed(reason)
        };
        // An adopted instance already runs in its cgroup: nothing to create
        // (and a failure here must not lose track of it).
        let ecg = match adopted {
            Some(_) => subtree(&self.cfg).and_then(|s| s.child(name).map_err(self.cg_err())),
            // Every launch writes the limits of the version it starts
            // (review): a reboot empties cgroupfs, and engines marked to
            // start came back with no limit of their own; a reload's come
            // with its instance, not before it was accepted.
            None => self
                .engine_cgroup(name)
                .and_then(|cg| self.set_version_limits(name, &spec_text, &cg).map(|()| cg)),
        };
        let (cg, run_dir, proc) = match ecg {
            Err(err) => return failed(err.to_string()),
            Ok(ecg) => {
                // Before the engine runs (or, adopted, goes on running):
                // never unconfined when its rules cannot be installed.
                if let Err(err) = self.install_egress(name, &spec_text, &ecg) {
                    if let Some((p, _)) = adopted {
                        let _ = p.signal(Signal::SIGKILL);
                    }
                    return failed(err.to_string());
                }
                let Ok(cg) = ecg.child(&instance_dir(dir_name)) else {
                    if let Some((p, _)) = adopted {
                        let _ = p.signal(Signal::SIGKILL);
                    }
                    return failed("instance cgroup name".into());
                };
                let rd = self.run_dir(name, dir_name);
                if let Some((p, _)) = adopted {
                    // The engine still sends to the same path: the socket
                    // systemd kept (with what came while no agent ran), or
                    // a new one there, is heard by this agent.
                    if heartbeat(&spec) {
                        match notify::kept_or_bind(&rd, spec.uid, &self.cfg.fdstore) {
                            Ok((sock, kept)) => {
                                notify_sock = Some(sock);
                                sock_kept = kept;
                            }
                            Err(err) => {
                                tracing::error!(engine = name, %instance, error = %err, "the re-adopted engine's notify socket")
                            }
                        }
                    }
                    (cg, rd, Ok(p))
                } else if !self
                    .volume
                    .mounted()
                    .is_some_and(|m| spec.rootfs.starts_with(m))
                {
                    // Never run a root that is not on the mounted volume.
                    return failed(RuntimeError::NoVolume.to_string());
                } else {
                    // Opened at each launch (never kept by the agent), in
                    // the spec's order; a missing one names itself.
                    let mut secrets = Vec::with_capacity(spec.secrets.len());
                    for (i, s) in spec.secrets.iter().enumerate() {
                        match self.secrets.open(s) {
                            Ok(b) => secrets.push(b),
                            Err(err) => return failed(format!("secrets[{i}] {s:?}: {err}")),
                        }
                    }
                    if let Err(err) = self.cgroups.create(&cg) {
                        return failed(err.to_string());
                    }
                    spec.cgroup = Some(self.cgroups.dir(&cg));
                    // Output goes to the volume (the tenant's space), never
                    // to /run: an engine cannot fill the node's tmpfs.
                    let logs = spec
                        .rootfs
                        .parent()
                        .and_then(Path::parent)
                        .map_or_else(|| rd.clone(), |d| d.join("logs"));
                    // The heartbeat's socket, in place before the shim binds
                    // its directory into the engine.
                    if heartbeat(&spec) {
                        let bound = notify::bind(&rd, spec.uid)
                            .map_err(|e| format!("notify socket in {}: {e}", rd.display()))
                            .and_then(|b| {
                                notify::record_readiness(&rd).map(|()| b).map_err(|e| {
                                    format!("readiness record in {}: {e}", rd.display())
                                })
                            });
                        match bound {
                            Ok((dir, sock)) => {
                                spec.notify_dir = Some(dir);
                                notify_sock = Some(sock);
                            }
                            Err(reason) => {
                                let _ = self.cgroups.remove(&cg);
                                return failed(reason);
                            }
                        }
                    }
                    let r = self.spawner.spawn(&spec, &rd, &logs, secrets);
                    (cg, rd, r)
                }
            }
        };
        let mut proc = match proc {
            Ok(p) => p,
            Err(err) => {
                let _ = self.cgroups.remove(&cg);
                return failed(err.to_string());
            }
        };
        let tx = self.tx.clone();
        let n = name.to_owned();
        let done: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = tx.send(Msg::Exited(n, instance));
        });
        // The notify reader passes READY=1 once per engine: the shim's
        // records (read first, on the same I/O thread) hold it back while
        // no engine runs and let the new engine's through.
        let ready = if heartbeat(&spec) {
            let gate = notify::ReadyGate::recorded(&run_dir);
            // In systemd's store while its engine has not said READY=1.
            let store_name = crate::fdstore::notify_name(&run_dir);
            match (notify_sock.as_ref(), store_name) {
                (Some(sock), Some(n)) if self.cfg.fdstore.is_on() => match sock.try_clone() {
                    Ok(copy) => gate.with_keep(
                        notify::Keep::new(self.cfg.fdstore.clone(), n, copy.into()),
                        sock_kept,
                    ),
                    Err(err) => {
                        tracing::warn!(engine = name, %instance, error = %err, "the notify socket is not kept across an agent restart");
                        if sock_kept {
                            // Nothing would take it out once READY=1 is
                            // heard.
                            self.cfg.fdstore.remove(&n);
                        }
                        gate
                    }
                },
                _ => gate,
            }
        } else {
            notify::ReadyGate::default()
        };
        let ready_gate = ready.clone();
        let mut status = proc.take_status().map(|fd| {
            let (tx, n, ready) = (self.tx.clone(), name.to_owned(), ready.clone());
            let (cgroups, icg) = (self.cgroups.clone(), cg.clone());
            output::StatusReader::new(fd, format!("{name}-{instance}"), move |r| match r {
                launch::StatusRecord::Exited { exit } => {
                    ready.hold();
                    // Read now, before the new engine can be OOM-killed.
                    let kills = cgroups.usage(&icg).map(|u| u.oom_kills).ok();
                    let _ = tx.send(Msg::Respawning(n.clone(), instance, exit, kills));
                }
                launch::StatusRecord::Respawned => {
                    ready.open();
                    let _ = tx.send(Msg::Respawned(n.clone(), instance));
                }
            })
        });
        if adopted_here {
            // Records written while no agent read them (the shim does not
            // wait for one): stepped right after the adoption's Launched,
            // before its readiness below.
            if let Some(s) = status.as_mut() {
                s.drain_now();
            }
            // Decided here, while this thread is the gate's only user: the
            // I/O thread gets the instance's records and socket only below,
            // so an exit it reads later cannot fall between the mark's
            // check and the gate, and this message is in the channel
            // before any of its own.
            if let Some(sock) = notify_sock.as_ref().filter(|_| sock_kept) {
                // An engine exited while no agent ran: what waits in the
                // kept socket may be its READY=1, not the running one's.
                if ready_gate.cycled() {
                    let n = notify::discard_queued(sock);
                    if n > 0 {
                        tracing::info!(engine = name, %instance, discarded = n, "notify messages of an engine that exited while no agent ran: discarded");
                    }
                }
            }
            if notify_sock.is_some() {
                if ready_gate.readopted_ready(&run_dir) {
                    // Its READY=1 (which an engine sends once) came to an
                    // earlier agent: ready; the watchdog, if any, still
                    // catches a hung one.
                    let m = NotifyMessage {
                        ready: true,
                        watchdog: false,
                    };
                    let _ = self.tx.send(Msg::Notified(name.to_owned(), instance, m));
                } else {
                    // Not ready yet: it still is to say so, on the new
                    // socket, within `heartbeat.ready_timeout` from now.
                    tracing::info!(engine = name, %instance, "re-adopted before its READY=1; waiting for it");
                }
            }
        }
        // A copy of the shim's pidfd ends the output's reading with the
        // instance (a FIFO's write end passed to another engine would keep
        // it, and the agent's descriptors, open).
        let mut end = None;
        let watched = match proc.exit_fd() {
            Some(Ok(fd)) => {
                end = fd.try_clone().ok();
                self.logs
                    .watch_exit(fd, done, status)
                    .map_err(|e| format!("cannot watch the instance: {e}"))
            }
            Some(Err(e)) => Err(format!("cannot watch the instance: {e}")),
            None => match proc.exit_waiter() {
                Ok(waiter) => std::thread::Builder::new()
                    .name(format!("engine-wait-{instance}"))
                    .spawn(move || {
                        waiter();
                        done();
                    })
                    .map(drop)
                    .map_err(|e| format!("cannot start the exit watcher: {e}")),
                Err(e) => Err(format!("cannot watch the instance: {e}")),
            },
        };
        if let Err(err) = watched {
            self.end_unreleased(name, instance, proc.as_mut(), &cg, &run_dir);
            return failed(err);
        }
        if let Some(out) = proc.take_output() {
            // <images_dir>/<engine>/v<N>/rootfs → <images_dir>/<engine>/logs
            let dir = spec
                .rootfs
                .parent()
                .and_then(Path::parent)
                .map(|d| d.join("logs"));
            let started = dir
                .ok_or_else(|| std::io::Error::other("no engine directory above the root"))
                .and_then(|d| output::capture(self.logs.clone(), name, d, out, end));
            if let Err(err) = started {
                // The engine runs on; its output stays in the FIFO (and
                // blocks it once full): said loudly, not hidden.
                tracing::error!(engine = name, %instance, error = %err, "the engine's output is not captured");
            }
        }
        let notifier = match notify_sock {
            None => None,
            Some(sock) => {
                let tx = self.tx.clone();
                let n = name.to_owned();
                let watched = notify::watch(
                    &self.logs,
                    sock,
                    spec.uid,
                    format!("{name}-{instance}"),
                    ready,
                    move |m| tx.send(Msg::Notified(n.clone(), instance, m)).is_ok(),
                );
                match watched {
                    Ok(w) => Some(w),
                    Err(err) => {
                        self.end_unreleased(name, instance, proc.as_mut(), &cg, &run_dir);
                        return failed(format!("cannot start the notify reader: {err}"));
                    }
                }
            }
        };
        let oom_kills = self.cgroups.usage(&cg).map(|u| u.oom_kills).unwrap_or(0);
        let pid = proc.pid();
        let mut replaced = None;
        if let Some(root) = fresh {
            // The instance runs from the fresh root: it becomes the
            // version's; the root it replaces goes once engines.json names
            // the new one (below), so no state ever names a deleted root.
            replaced = self
                .engines
                .get_mut(name)
                .and_then(|e| e.versions.get_mut(&version))
                .map(|v| std::mem::replace(&mut v.launch.rootfs, root));
        }
        if let Some(e) = self.engines.get_mut(name) {
            e.live.insert(
                instance,
                Live {
                    dir_name,
                    proc,
                    cg,
                    confinement: Arc::new(ConfinementCell {
                        run_dir: run_dir.clone(),
                        read: std::sync::OnceLock::new(),
                    }),
                    run_dir,
                    oom_kills,
                    _notifier: notifier,
                },
            );
        }
        // The instance goes on only once engines.json names it: an agent
        // killed before that leaves a shim that sees its pipe end and
        // fails closed, never an engine the next agent cannot adopt.
        if !adopted_here {
            crate::crashpoint::crash_point("engine:spawned");
        }
        let saved = self.save();
        if !adopted_here && saved.is_ok() {
            crate::crashpoint::crash_point("engine:saved");
        }
        if let Some(l) = self
            .engines
            .get_mut(name)
            .and_then(|e| e.live.get_mut(&instance))
        {
            if saved.is_ok() || adopted_here {
                l.proc.release();
            }
        }
        match (saved, replaced) {
            (Ok(()), Some(old)) => {
                self.note_fresh_root(name, None);
                self.act(name, Action::Emit(Event::ImageReloaded { instance }));
                if let Err(err) = std::fs::remove_dir_all(&old) {
                    tracing::warn!(engine = name, root = %old.display(), error = %err, "the replaced root was not removed");
                }
            }
            (Ok(()), None) => {}
            (Err(e), old) => {
                tracing::error!(engine = name, %instance, error = %e, "cannot record the engines' state");
                if !adopted_here {
                    // Unreleased, it never ran: ended here, reported as not
                    // started (its exit watch finds no instance later).
                    if let Some(mut l) = self
                        .engines
                        .get_mut(name)
                        .and_then(|e| e.live.remove(&instance))
                    {
                        self.end_unreleased(name, instance, l.proc.as_mut(), &l.cg, &l.run_dir);
                    }
                    // A fresh root that did not get to run goes; the
                    // version names the old one again.
                    if let Some(old) = old {
                        if let Some(v) = self
                            .engines
                            .get_mut(name)
                            .and_then(|e| e.versions.get_mut(&version))
                        {
                            let fresh = std::mem::replace(&mut v.launch.rootfs, old);
                            let _ = std::fs::remove_dir_all(fresh);
                        }
                    }
                    return Input::LaunchFailed {
                        instance,
                        reason: format!("cannot record the engines' state: {e}"),
                    };
                }
            }
        }
        Input::Launched { instance, pid }
    }

    /// What `status` says of the last fresh root (`on_failure =
    /// ["reload"]`): why there was none, or nothing once one runs.
    fn note_fresh_root(&mut self, name: &str, why: Option<String>) {
        if let Some(e) = self.engines.get_mut(name) {
            // Bounded: shown in every status and list (the text can quote
            // the tenant's archive).
            e.fresh_note = why.map(|w| output::cut_to(format!("reload image: {w}"), 1024));
        }
    }

    /// Whether `instance` of `name` is still one of the runtime's: a late
    /// report about one that ended changes nothing.
    fn is_live(&self, name: &str, instance: InstanceId) -> bool {
        self.engines
            .get(name)
            .is_some_and(|e| e.live.contains_key(&instance))
    }

    /// The shim is starting the engine again now.
    fn respawned(&mut self, name: &str, instance: InstanceId) {
        if !self.is_live(name, instance) {
            return;
        }
        if let Err(err) = self.step(name, Input::Respawned { instance }) {
            tracing::warn!(engine = name, error = %err, "respawn report");
        }
    }

    /// The engine exited and its shim will start it again after the
    /// delay: an OOM kill is told by `memory.events` against the
    /// baseline, which then moves on for the new engine.
    fn respawning(
        &mut self,
        name: &str,
        instance: InstanceId,
        how: launch::Exit,
        kills: Option<u64>,
    ) {
        let Some(e) = self.engines.get_mut(name) else {
            return;
        };
        let Some(l) = e.live.get_mut(&instance) else {
            return;
        };
        let oom = kills.is_some_and(|k| k > l.oom_kills);
        if let Some(k) = kills {
            l.oom_kills = k;
        }
        let exit = match how {
            _ if oom => Exit::Oom,
            launch::Exit::Code(c) => Exit::Code(c),
            launch::Exit::Signal(s) => Exit::Signal(s),
            // The shim writes only the two above.
            other => {
                tracing::warn!(engine = name, %instance, exit = ?other, "unexpected exit in a respawn record");
                Exit::Signal(Signal::SIGKILL as i32)
            }
        };
        if let Err(err) = self.step(name, Input::Respawning { instance, exit }) {
            tracing::warn!(engine = name, error = %err, "respawn report");
        }
    }

    fn exited(&mut self, name: &str, instance: InstanceId) {
        let Some(e) = self.engines.get_mut(name) else {
            return;
        };
        let Some(mut l) = e.live.remove(&instance) else {
            return;
        };
        let how = l.proc.reap();
        let oom = self
            .cgroups
            .usage(&l.cg)
            .is_ok_and(|u| u.oom_kills > l.oom_kills);
        let exit = match how {
            _ if oom => Exit::Oom,
            launch::Exit::Code(c) => Exit::Code(c),
            launch::Exit::Signal(s) => Exit::Signal(s),
            launch::Exit::LaunchFailed(r) => {
                // Quoted (`?`): the reason can carry the spec's command,
                // the tenant's text, and a newline would forge a line in
                // plain-text logging.
                tracing::warn!(engine = name, %instance, reason = ?r, "the engine did not start");
                Exit::NotStarted
            }
            launch::Exit::ShimLost(r) => {
                tracing::warn!(engine = name, %instance, reason = ?r, "the engine's shim ended without a status");
                Exit::Signal(Signal::SIGKILL as i32)
            }
        };
        self.clear_instance(name, instance, &l.cg, &l.run_dir);
        if let Err(err) = self.step(name, Input::Exited { instance, exit }) {
            tracing::warn!(engine = name, error = %err, "exit report");
        }
        self.save_logged();
    }

    /// Ends an instance that was never let go on (or could not be
    /// watched): killed, reaped, then cleared as after an exit.
    fn end_unreleased(
        &mut self,
        name: &str,
        instance: InstanceId,
        proc: &mut dyn Proc,
        cg: &CgroupPath,
        run_dir: &Path,
    ) {
        let _ = proc.signal(Signal::SIGKILL);
        let _ = proc.reap();
        self.clear_instance(name, instance, cg, run_dir);
    }

    /// After an instance ended: what is left in its cgroup killed, the
    /// cgroup removed (or retried later), its run directory removed.
    fn clear_instance(
        &mut self,
        name: &str,
        instance: InstanceId,
        cg: &CgroupPath,
        run_dir: &Path,
    ) {
        if !self.cgroups.pids(cg).is_ok_and(|p| p.is_empty()) {
            let _ = self.cgroups.kill(cg);
        }
        if let Err(err) = self.cgroups.remove(cg) {
            // Processes may outlive the shim for a moment after the kill:
            // read back again before claiming the engine stopped.
            tracing::warn!(engine = name, %instance, error = %err, "the instance's cgroup was not removed");
            if let Some(e) = self.engines.get_mut(name) {
                e.leftover.push(cg.clone());
            }
        }
        if self.cfg.fdstore.is_on() && run_dir.join("notify").exists() {
            self.cfg.fdstore.remove_instance(run_dir);
        }
        let _ = std::fs::remove_dir_all(run_dir);
    }

    /// `spec.probes[n]` of the instance came due: offered to the node's
    /// bound, which starts it now or after others ([`Runtime::start_probes`]).
    /// A probe still running or waiting when it is due again is not doubled.
    /// Its timeout is read from the spec when it starts.
    fn run_probe(&mut self, name: &str, instance: InstanceId, n: usize) {
        let Some(e) = self.engines.get(name) else {
            return;
        };
        if e.sup.spec().probes.get(n).is_none()
            || !e.live.contains_key(&instance)
            || e.probing.contains(&(instance, n))
        {
            return;
        }
        self.probes.offer(probe_gate::Due {
            engine: name.to_owned(),
            incarnation: e.incarnation,
            instance,
            probe: n,
        });
    }

    /// Starts the probe runs the node's bound lets through, each on a
    /// thread of its own (held to its timeout there); each result comes
    /// back as `Msg::Probed`. Runs that began to wait are counted in their
    /// engine's status, which shows them with its next change (a
    /// publication for the count alone would come as often as the probes).
    fn start_probes(&mut self) {
        let engines = &self.engines;
        let taken = self.probes.take(Instant::now(), |d| {
            engines.get(&d.engine).is_some_and(|e| {
                e.incarnation == d.incarnation
                    && e.sup.status().instance == Some(d.instance)
                    && e.live.contains_key(&d.instance)
                    && e.sup.spec().probes.get(d.probe).is_some()
                    && !e.probing.contains(&(d.instance, d.probe))
            })
        });
        for (name, n) in taken.waiting {
            if let Some(e) = self.engines.get_mut(&name) {
                e.probes_delayed += n;
            }
        }
        for d in taken.start {
            let spawner = self.spawner.clone();
            let tx = self.tx.clone();
            let Some(e) = self.engines.get_mut(&d.engine) else {
                self.probes.finished();
                continue;
            };
            let (Some(probe), Some(l)) = (
                e.sup.spec().probes.get(d.probe).cloned(),
                e.live.get(&d.instance),
            ) else {
                self.probes.finished();
                continue;
            };
            e.probing.insert((d.instance, d.probe));
            let run_dir = l.run_dir.clone();
            let timeout = probe.timeout.0;
            let (label, inc, instance, n) = (d.engine.clone(), d.incarnation, d.instance, d.probe);
            let spawned = std::thread::Builder::new()
                .name(format!("engine-probe-{instance}-{n}"))
                .spawn(move || {
                    // A result always comes back: it frees the run's slot
                    // in the node's bound.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_one_probe(spawner.as_ref(), &run_dir, &probe, timeout)
                    }))
                    .unwrap_or_else(|_| Err("the probe's thread panicked".into()));
                    let _ = tx.send(Msg::Probed(label, inc, instance, n, r));
                });
            if let Err(err) = spawned {
                // Counted as a failure: a node out of threads is not healthy.
                let _ = self.tx.send(Msg::Probed(
                    d.engine,
                    inc,
                    instance,
                    n,
                    Err(format!("cannot start the probe thread: {err}")),
                ));
            }
        }
    }

    fn probed(
        &mut self,
        name: &str,
        incarnation: u64,
        instance: InstanceId,
        n: usize,
        r: Result<String, String>,
    ) {
        // Every run the bound let through ends here, whoever it was for.
        self.probes.finished();
        let Some(e) = self.engines.get_mut(name) else {
            return;
        };
        // A probe of an engine removed since, whose name was deployed
        // again: its instance numbers start over, so the number alone
        // would take the old result for the new instance's.
        if e.incarnation != incarnation {
            return;
        }
        e.probing.remove(&(instance, n));
        // Only results about the engine's current instance are shown.
        if e.sup.status().instance != Some(instance) {
            return;
        }
        let ok = r.is_ok();
        e.probes_seen.insert(
            n,
            ProbeSeen {
                ok,
                detail: r.unwrap_or_else(|e| e),
                at: SystemTime::now(),
            },
        );
        if let Err(err) = self.step(
            name,
            Input::Probe {
                instance,
                probe: n,
                ok,
            },
        ) {
            tracing::warn!(engine = name, error = %err, "probe result");
        }
    }

    /// Whether what `status` shows of the engine changed.
    fn notified(&mut self, name: &str, instance: InstanceId, m: NotifyMessage) -> bool {
        if !self.is_live(name, instance) {
            return false;
        }
        let before = self.engines.get(name).map(shown);
        for (yes, notify) in [(m.ready, Notify::Ready), (m.watchdog, Notify::Watchdog)] {
            if yes {
                if let Err(err) = self.step(name, Input::Heartbeat { instance, notify }) {
                    tracing::warn!(engine = name, error = %err, "notify message");
                }
            }
        }
        self.engines.get(name).map(shown) != before
    }

    /// Every secret the spec names is in the store (deploy, reload): a
    /// missing one is refused naming it.
    fn check_secrets(&self, name: &str, spec: &Spec) -> Result<(), RuntimeError> {
        for (i, s) in spec.secrets.iter().enumerate() {
            let field = "secrets";
            match self.secrets.exists(s) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(RuntimeError::Resolve {
                        name: name.to_owned(),
                        field,
                        reason: format!(
                            "[{i}] {s:?}: no secret of that name is stored (tenantctl secret put)"
                        ),
                    })
                }
                Err(err) => {
                    return Err(RuntimeError::Resolve {
                        name: name.to_owned(),
                        field,
                        reason: format!("[{i}] {s:?}: the secret store cannot be read: {err}"),
                    })
                }
            }
        }
        Ok(())
    }

    /// Whether a timer that fired changed what `status` shows (a
    /// watchdog re-armed by each heartbeat leaves its earlier timers to
    /// fire for nothing).
    fn fire_timers(&mut self) -> bool {
        let now = Instant::now();
        let mut changed = false;
        while let Some(((at, name, t), ())) = self.timers.first_key_value() {
            if *at > now {
                break;
            }
            let (name, t) = (name.clone(), *t);
            self.timers.pop_first();
            let before = self.engines.get(&name).map(shown);
            if let Err(err) = self.step(&name, Input::Timer(t)) {
                tracing::warn!(engine = name, error = %err, "timer");
            }
            changed |= self.engines.get(&name).map(shown) != before;
        }
        changed
    }

    fn deploy(
        &mut self,
        name: &str,
        image: &str,
        spec: &Spec,
    ) -> Result<EngineStatus, RuntimeError> {
        if self.engines.contains_key(name) {
            return Err(RuntimeError::Exists(name.to_owned()));
        }
        // The controller checked the name with the node's rule; it becomes
        // a path component, so never trust that alone.
        if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
            return Err(RuntimeError::Refused {
                name: name.to_owned(),
                reason: "not a plain engine name".into(),
            });
        }
        // Engines and the inbox share one directory: an engine named so
        // would have the tenant's login-owned inbox as its own directory.
        if RESERVED_NAMES.contains(&name) {
            return Err(RuntimeError::Refused {
                name: name.to_owned(),
                reason: format!(
                    "the names {} are reserved (the agent's own directories)",
                    RESERVED_NAMES.join(", ")
                ),
            });
        }
        if self.engines.len() >= MAX_ENGINES {
            return Err(RuntimeError::TooMany);
        }
        let base = self.volume_dir()?;
        self.check_secrets(name, spec)?;
        self.check_budget(name, spec)?;
        // The cgroup tree first: a host without it refuses before any unpack.
        let cg = self.engine_cgroup(name)?;
        let uid = (0..)
            .map(|n: u32| self.cfg.uid_base.saturating_add(n))
            .find(|u| !self.engines.values().any(|e| e.uid == *u))
            .unwrap_or(self.cfg.uid_base);
        let dir = base.join(name);
        let v = self.unpack(name, image, spec, &base, &dir, 1, uid)?;
        if let Err(e) = self.set_limits(&cg, spec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let mut versions = BTreeMap::new();
        versions.insert(VersionId(1), v);
        let e = Engine {
            name: name.to_owned(),
            uid,
            sup: {
                let mut sup = Supervisor::new(VersionId(1), spec.clone());
                sup.set_reboot_allowed(self.cfg.reboot_node.is_some());
                sup
            },
            versions,
            live: BTreeMap::new(),
            adoptable: None,
            id_base: 0,
            next_name: 0,
            leftover: Vec::new(),
            log_window: Instant::now(),
            log_lines: 0,
            log_suppressed: 0,
            next_version: 2,
            events: VecDeque::new(),
            probing: Default::default(),
            probes_delayed: 0,
            incarnation: incarnation(),
            probes_seen: BTreeMap::new(),
            fresh_note: None,
            held_note: None,
        };
        let st = status_of(&e);
        self.engines.insert(name.to_owned(), e);
        self.save()?;
        Ok(st)
    }

    fn set_limits(&self, cg: &CgroupPath, spec: &Spec) -> Result<(), RuntimeError> {
        let files = budget::engine_files(&spec.limits);
        self.cgroups.set_limits(cg, &files).map_err(self.cg_err())
    }

    /// The limits of a version's spec (its stored JSON) on the engine's
    /// cgroup.
    fn set_version_limits(
        &self,
        name: &str,
        spec_json: &str,
        cg: &CgroupPath,
    ) -> Result<(), RuntimeError> {
        let spec = Spec::from_stored_json(spec_json).map_err(|e| RuntimeError::Refused {
            name: name.to_owned(),
            reason: format!("its stored spec: {e}"),
        })?;
        self.set_limits(cg, &spec)
    }

    /// The controller checked the spec against the budget when the command
    /// was sent; checked again here, as the landlord may have lowered the
    /// budget while the command waited (behind an unpack, say).
    fn check_budget(&self, name: &str, spec: &Spec) -> Result<(), RuntimeError> {
        budget::check(&spec.limits, &self.tenant.budget()).map_err(|excess| RuntimeError::Refused {
            name: name.to_owned(),
            reason: excess
                .0
                .iter()
                .map(|o| {
                    format!(
                        "{}: {} is above the tenant budget {}",
                        o.field, o.engine, o.budget
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn unpack(
        &self,
        name: &str,
        image: &str,
        spec: &Spec,
        base: &Path,
        dir: &Path,
        version: u64,
        uid: u32,
    ) -> Result<VersionRec, RuntimeError> {
        if RESERVED_NAMES.contains(&name) {
            return Err(RuntimeError::Refused {
                name: name.to_owned(),
                reason: "the name is reserved (the tenant's inbox); deploy the engine under another name".into(),
            });
        }
        let input = base.join("inbox").join(image);
        if image.is_empty()
            || image.len() > leasehold_node::MAX_IMAGE_REF
            || image.starts_with('.')
            || image.contains(['/', '\0'])
        {
            return Err(RuntimeError::NotInInbox(input));
        }
        match std::fs::symlink_metadata(&input) {
            Ok(m) if m.is_file() => {}
            _ => return Err(RuntimeError::NotInInbox(input)),
        }
        let vdir = dir.join(format!("v{version}"));
        // Only the agent writes here (the tenant only in inbox/): a symlink
        // on the way would send the unpack off the volume.
        for p in [base, dir, &vdir] {
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(RuntimeError::Io {
                    op: "refuse",
                    path: p.to_owned(),
                    source: std::io::Error::other("a symlink where the agent keeps engines"),
                });
            }
        }
        std::fs::create_dir_all(&vdir).map_err(io("mkdir", &vdir))?;
        let root = vdir.join("rootfs");
        let unpacked = match unpack_image_abortable(
            &input,
            &root,
            &inbox_image_limits(base),
            &self.abort.flag,
        ) {
            Ok(u) => u,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&vdir);
                if matches!(source, ImageError::Aborted) {
                    return Err(RuntimeError::Refused {
                        name: name.to_owned(),
                        reason: format!("not deployed: the image's unpack was stopped, nothing was kept: {STOPPING_ALL}"),
                    });
                }
                return Err(RuntimeError::Image {
                    path: input,
                    source,
                });
            }
        };
        let launch = match resolve(name, spec, &unpacked.config, &root, dir, uid) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&vdir);
                return Err(e);
            }
        };
        // Below data/ the engine writes (an earlier version's data dir may
        // hold this one): made and chowned through descriptors, never
        // through a link it planted (leasehold_engines::datadir).
        for d in &launch.data_dirs {
            let made = leasehold_engines::datadir::open(d, true)
                .map_err(|e| match e {
                    LaunchError::Io { op, path, source } => RuntimeError::Io { op, path, source },
                    e => RuntimeError::Resolve {
                        name: name.to_owned(),
                        field: "data_dirs",
                        reason: e.to_string(),
                    },
                })
                .and_then(|fd| {
                    std::os::unix::fs::fchown(&fd, Some(uid), Some(uid))
                        .map_err(io("chown", &d.host))
                });
            if let Err(e) = made {
                let _ = std::fs::remove_dir_all(&vdir);
                return Err(e);
            }
        }
        let spec_json = serde_json::to_string(spec).map_err(|e| RuntimeError::Resolve {
            name: name.to_owned(),
            field: "spec",
            reason: e.to_string(),
        })?;
        Ok(VersionRec {
            id: version,
            image: image.to_owned(),
            spec: spec_json,
            launch,
            digest: Some(unpacked.config_digest),
        })
    }

    fn cmd(&mut self, c: Cmd, reply: SyncSender<Reply>) {
        // Sent before a stop of every engine that is on its way: refused
        // (said so), not carried out ahead of it, so that stop is not held
        // behind them (an `rm` of a large root, a launch).
        if self.abort.raised() {
            let name = match &c {
                Cmd::Deploy(n, ..)
                | Cmd::Start(n)
                | Cmd::Stop(n, _)
                | Cmd::Restart(n)
                | Cmd::Reload(n, ..)
                | Cmd::Rm(n) => Some(n.clone()),
                _ => None,
            };
            if let Some(name) = name {
                let err = RuntimeError::Refused {
                    name,
                    reason: format!("not carried out: {STOPPING_ALL}; try again after it"),
                };
                let _ = reply.send(match c {
                    Cmd::Rm(_) => Reply::Unit(Err(err)),
                    _ => Reply::Status(Err(err)),
                });
                return;
            }
        }
        let r = match c {
            Cmd::Deploy(n, i, s) => Reply::Status(self.deploy(&n, &i, &s)),
            Cmd::Start(n) => Reply::Status(self.simple(&n, Input::Start)),
            Cmd::Stop(n, grace) => Reply::Status(self.simple(&n, Input::Stop { grace })),
            Cmd::Restart(n) => Reply::Status(self.simple(&n, Input::Restart)),
            Cmd::Reload(n, i, s) => Reply::Status(self.reload(&n, i.as_deref(), s)),
            Cmd::Rm(n) => Reply::Unit(self.rm(&n)),
            Cmd::ForgetAll => {
                self.abort.lower();
                Reply::Forgot(self.forget_all())
            }
            Cmd::Unhalt => {
                self.halted
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                Reply::Unit(Ok(()))
            }
            Cmd::StopAll(grace) => {
                // Commands sent after this stop are carried out again.
                self.abort.lower();
                // The warm shim's mount namespace goes before the volume.
                self.spawner.quiesce();
                // Pending first, so kills made while stopping are counted.
                self.killed.clear();
                self.stop_all = Some(PendingStop {
                    deadline: Instant::now(),
                    names: Vec::new(),
                    reply,
                });
                let mut names = Vec::new();
                let mut bound = Duration::ZERO;
                let list: Vec<String> = self.engines.keys().cloned().collect();
                for n in list {
                    let Some(e) = self.engines.get(&n) else {
                        continue;
                    };
                    let running = !e.live.is_empty();
                    let g = e.sup.spec().stop_grace.0.min(grace);
                    bound = bound.max(g);
                    if let Err(err) = self.step(&n, Input::Stop { grace: Some(g) }) {
                        tracing::warn!(engine = n, error = %err, "stop");
                    }
                    if running {
                        names.push(n);
                    }
                }
                self.save_logged();
                if let Some(p) = self.stop_all.as_mut() {
                    p.deadline = Instant::now() + bound + KILL_WAIT;
                    p.names = names;
                }
                self.check_stop_all();
                return;
            }
        };
        // The view shows the change before the caller hears of it.
        self.publish();
        let _ = reply.send(r);
    }

    fn check_stop_all(&mut self) {
        let Some(p) = self.stop_all.as_ref() else {
            return;
        };
        let names = p.names.clone();
        for n in &names {
            self.reap_leftovers(n);
        }
        let gone =
            |e: Option<&Engine>| e.is_none_or(|e| e.live.is_empty() && e.leftover.is_empty());
        let Some(p) = self.stop_all.as_ref() else {
            return;
        };
        let all_gone = p.names.iter().all(|n| gone(self.engines.get(n)));
        if !all_gone && Instant::now() < p.deadline {
            return;
        }
        let Some(p) = self.stop_all.take() else {
            return;
        };
        let mut r = StopReport::default();
        for n in p.names {
            match self.engines.get(&n) {
                Some(e) if !e.live.is_empty() => r.not_stopped.push(NotStopped {
                    name: n.clone(),
                    reason: format!(
                        "{} instance(s) still alive after the grace and the kill",
                        e.live.len()
                    ),
                }),
                Some(e) if !e.leftover.is_empty() => r.not_stopped.push(NotStopped {
                    name: n.clone(),
                    reason: format!(
                        "processes left in {} after the kill",
                        e.leftover
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }),
                _ => {
                    if self.killed.contains(&n) {
                        r.killed.push(n.clone());
                    }
                    r.stopped.push(n);
                }
            }
        }
        self.publish();
        let _ = p.reply.send(Reply::Stopped(r));
    }

    /// How instance `dir` of `name`, recorded and now gone, ended while no
    /// agent watched: its shim's record, OOM when its cgroup counted an OOM
    /// kill (each instance has its own cgroup). None: no record.
    fn recorded_exit(&self, name: &str, dir: u64) -> Option<Exit> {
        let run_dir = self.run_dir(name, dir);
        // The agent itself was stopping it (a restart, a failure's restart,
        // a stop_all): not the engine's own end, and the relaunch the agent
        // meant is what the next one does (started, as after a crash).
        if run_dir.join(STOPPING_MARK).exists() {
            return None;
        }
        let how = self.spawner.recorded_exit(&run_dir)?;
        let oom = subtree(&self.cfg)
            .and_then(|s| s.child(name).map_err(self.cg_err()))
            .and_then(|e| e.child(&instance_dir(dir)).map_err(self.cg_err()))
            .is_ok_and(|cg| self.cgroups.usage(&cg).is_ok_and(|u| u.oom_kills > 0));
        match how {
            _ if oom => Some(Exit::Oom),
            launch::Exit::Code(c) => Some(Exit::Code(c)),
            launch::Exit::Signal(s) => Some(Exit::Signal(s)),
            launch::Exit::LaunchFailed(_) | launch::Exit::ShimLost(_) => None,
        }
    }

    /// At load, before any start: the instance cgroups and run directories
    /// of engine `name` other than the re-adopted one are killed and
    /// removed. They are what no running agent accounts for: a shim an
    /// agent killed before its save left held (it fails closed at once), a
    /// recorded instance that ended while no agent ran, and a recorded one
    /// that could not be re-adopted although it may still run (`recorded`;
    /// killed rather than left unsupervised beside a new copy on the same
    /// data). New instance names start above every name found, so a new
    /// instance never joins a cgroup something may still run in; a cgroup
    /// that does not go at once is retried (`reap_leftovers`).
    fn sweep_unrecorded(&mut self, name: &str, recorded: &[u64]) {
        let Some(e) = self.engines.get(name) else {
            return;
        };
        let keep = e.adoptable.as_ref().map(|(_, n)| *n);
        let mut highest = None;
        match subtree(&self.cfg).and_then(|s| s.child(name).map_err(self.cg_err())) {
            Err(err) => tracing::warn!(engine = name, error = %err, "instance cgroups not swept"),
            Ok(ecg) => match self.cgroups.children(&ecg) {
                Err(err) => {
                    tracing::warn!(engine = name, error = %err, "instance cgroups not swept")
                }
                Ok(children) => {
                    for f in children {
                        let Some(n) = instance_number(&f).filter(|n| Some(*n) != keep) else {
                            continue;
                        };
                        let Ok(cg) = ecg.child(&f) else { continue };
                        highest = highest.max(Some(n));
                        if recorded.contains(&n) {
                            tracing::warn!(
                                engine = name,
                                cgroup = f,
                                "a recorded instance not re-adopted: killed and removed"
                            );
                        } else {
                            tracing::warn!(
                                engine = name,
                                cgroup = f,
                                "an instance no state names: killed and removed"
                            );
                        }
                        let _ = self.cgroups.kill(&cg);
                        if self.cgroups.remove(&cg).is_err() {
                            if let Some(e) = self.engines.get_mut(name) {
                                e.leftover.push(cg);
                            }
                        }
                    }
                }
            },
        }
        if let Ok(dirs) = std::fs::read_dir(self.cfg.run_dir.join(name)) {
            for d in dirs.flatten() {
                let n = d.file_name().to_str().and_then(instance_number);
                if n.is_some_and(|n| Some(n) != keep) {
                    highest = highest.max(n);
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
        }
        if let (Some(h), Some(e)) = (highest, self.engines.get_mut(name)) {
            let above = h.saturating_add(1);
            e.id_base = e.id_base.max(above);
            e.next_name = e.next_name.max(above);
        }
    }

    /// Kills and removes again the cgroups an ended instance left.
    fn reap_leftovers(&mut self, name: &str) {
        let Some(e) = self.engines.get_mut(name) else {
            return;
        };
        let cgroups = self.cgroups.clone();
        e.leftover.retain(|cg| {
            let _ = cgroups.kill(cg);
            cgroups.remove(cg).is_err()
        });
    }

    fn simple(&mut self, name: &str, input: Input) -> Result<EngineStatus, RuntimeError> {
        let starts = matches!(input, Input::Start | Input::Restart);
        self.get(name)?;
        if starts {
            // Refuse clearly where engines cannot run at all.
            self.volume_dir()?;
            self.engine_cgroup(name)?;
        }
        self.step(name, input)?;
        self.save()?;
        Ok(status_of(self.get(name)?))
    }

    fn reload(
        &mut self,
        name: &str,
        image: Option<&str>,
        spec: Option<Box<Spec>>,
    ) -> Result<EngineStatus, RuntimeError> {
        self.get(name)?;
        let base = self.volume_dir()?;
        let e = self.get(name)?;
        let cur = e.versions[&e.sup.version()].clone();
        // A new spec is checked against the budget, as the controller did;
        // the kept one is not (review: an engine above a lowered budget —
        // allowed, counted — could then not get a new image).
        let (spec, new_spec) = match spec {
            Some(s) => (*s, true),
            None => (e.sup.spec().clone(), false),
        };
        let (uid, n) = (e.uid, e.next_version);
        let image = image.unwrap_or(&cur.image).to_owned();
        self.check_secrets(name, &spec)?;
        if new_spec {
            self.check_budget(name, &spec)?;
        }
        self.engine_cgroup(name)?;
        let v = self.unpack(name, &image, &spec, &base, &base.join(name), n, uid)?;
        // Its limits are written when its instance is launched (the
        // running version keeps its own until then, and if it is refused
        // or fails).
        let e = self.get(name)?;
        e.next_version = n + 1;
        e.versions.insert(VersionId(n), v);
        // The probes may differ: results of the old ones are not shown.
        e.probes_seen.clear();
        e.fresh_note = None;
        self.step(
            name,
            Input::Reload {
                version: VersionId(n),
                spec: Box::new(spec),
            },
        )?;
        self.save()?;
        Ok(status_of(self.get(name)?))
    }

    /// Installs the rules of engine `name` for its spec (JSON) matching
    /// its cgroup `ecg`: the node guard, and its egress if the spec has
    /// one.
    fn install_egress(
        &self,
        name: &str,
        spec_json: &str,
        ecg: &CgroupPath,
    ) -> Result<(), RuntimeError> {
        let err = |reason: String| RuntimeError::Egress {
            name: name.to_owned(),
            reason,
        };
        let spec = Spec::from_stored_json(spec_json).map_err(|e| err(format!("spec: {e}")))?;
        let b = spec.egress_boundary().map_err(|e| err(e.to_string()))?;
        self.egress
            .set(name, Some((self.cgroups.dir(ecg), b)))
            .map_err(err)
    }

    fn rm(&mut self, name: &str) -> Result<(), RuntimeError> {
        let e = self.get(name)?;
        if !e.sup.instances().is_empty() || !e.live.is_empty() {
            return Err(RuntimeError::Running {
                name: name.to_owned(),
                phase: e.sup.phase().name(),
            });
        }
        // Its image, data and logs are on the volume: without it, nothing
        // is removed (review: the record went and they stayed, outside
        // every bound, for a later engine of the name to find).
        let v = self.volume.mounted().ok_or(RuntimeError::NoVolume)?;
        let cg = subtree(&self.cfg)?.child(name).map_err(self.cg_err())?;
        // The rules name the cgroup: they go first (a table naming a
        // removed cgroup could not be loaded again).
        self.egress
            .set(name, None)
            .map_err(|reason| RuntimeError::Egress {
                name: name.to_owned(),
                reason,
            })?;
        // Instance cgroups that did not go when they ended go now, or the
        // engine's cannot.
        self.reap_leftovers(name);
        self.cgroups.remove(&cg).map_err(self.cg_err())?;
        let dir = v.join(&self.cfg.images_dir).join(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &dir)(e)),
        }
        self.engines.remove(name);
        self.timers.retain(|(_, n, _), _| n != name);
        self.save()
    }

    fn forget_all(&mut self) -> Result<usize, RuntimeError> {
        // The engines are gone with the erase: launches may go on again.
        self.halted
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let n = self.engines.len();
        let sub = subtree(&self.cfg)?;
        for (name, e) in std::mem::take(&mut self.engines) {
            for l in e.live.values() {
                let _ = self.cgroups.kill(&l.cg);
                // Their exits find no engine (no clear_instance): out of
                // systemd's store here.
                self.cfg.fdstore.remove_instance(&l.run_dir);
            }
            if let Err(reason) = self.egress.set(&name, None) {
                tracing::warn!(engine = name, %reason, "egress rules not removed");
            }
            if let Ok(cg) = sub.child(&name) {
                let _ = self.cgroups.remove(&cg);
            }
        }
        self.timers.clear();
        self.probes.clear();
        // Names, pids, exits and failure reasons of the tenancy that ends.
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.save()?;
        Ok(n)
    }

    fn run(mut self, rx: Receiver<Msg>) {
        // What `ls` and `status` read is rebuilt after every message but
        // a heartbeat that changed nothing shown: an engine may send 40 a
        // second, and each rebuild is every engine's status.
        let mut changed = true;
        loop {
            if changed {
                self.publish();
            }
            changed = true;
            let next = self
                .timers
                .keys()
                .next()
                .map(|(at, _, _)| *at)
                .into_iter()
                .chain(self.stop_all.as_ref().map(|p| p.deadline))
                .chain(self.probes.wake_at(Instant::now()))
                .min();
            let msg = match next {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                },
            };
            match msg {
                Some(Msg::Cmd(c, reply)) => self.cmd(c, reply),
                Some(Msg::Exited(n, i)) => self.exited(&n, i),
                Some(Msg::Respawning(n, i, x, k)) => self.respawning(&n, i, x, k),
                Some(Msg::Respawned(n, i)) => self.respawned(&n, i),
                Some(Msg::Probed(n, inc, i, p, r)) => self.probed(&n, inc, i, p, r),
                Some(Msg::Notified(n, i, m)) => changed = self.notified(&n, i, m),
                Some(Msg::Shutdown) => return,
                // Woken for a timer: what it did decides.
                None => changed = false,
            }
            changed |= self.fire_timers();
            self.start_probes();
            changed |= self.stop_all.is_some();
            self.check_stop_all();
        }
    }
}

/// The spec resolved against the image: argv, environment, working
/// directory, uid, data dirs.
fn resolve(
    name: &str,
    spec: &Spec,
    image: &leasehold_engines::image::ImageRuntimeConfig,
    root: &Path,
    dir: &Path,
    uid: u32,
) -> Result<LaunchSpec, RuntimeError> {
    let bad = |field: &'static str, reason: String| RuntimeError::Resolve {
        name: name.to_owned(),
        field,
        reason,
    };
    if matches!(spec.user, Some(User::Name(_))) {
        return Err(bad(
            "user",
            "user names are not resolved yet; give uid:gid".into(),
        ));
    }
    let mut env: BTreeMap<String, String> = image
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    // The notify variables are the agent's (an image's own would point
    // the engine at a socket nobody reads).
    env.retain(|k, _| !RESERVED_ENV.contains(&k.as_str()));
    env.extend(spec.env.clone());
    if spec.heartbeat.enabled {
        env.insert(
            "NOTIFY_SOCKET".into(),
            format!("{}/{}", launch::NOTIFY_DIR, launch::NOTIFY_NAME),
        );
        if let Some(w) = spec.heartbeat.watchdog {
            env.insert("WATCHDOG_USEC".into(), w.0.as_micros().to_string());
        }
    }
    // The image's Env is bounded only by its config's size (4 MiB): held
    // to the spec's exec bound once merged, as it is stored with the
    // engine and handed to exec (E2BIG past the kernel's limit).
    let mut argv: Vec<String> = spec.command.iter().chain(&spec.args).cloned().collect();
    let bytes: usize = argv.iter().map(|a| a.len() + 1).sum::<usize>()
        + env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>();
    if env.len() > 2 * MAX_ENV || bytes > MAX_EXEC_BYTES {
        return Err(bad(
            "env",
            format!(
                "the image's Env with the spec's env: {} variables, {bytes} bytes with the command; at most {} and {MAX_EXEC_BYTES}",
                env.len(),
                2 * MAX_ENV
            ),
        ));
    }
    if env
        .iter()
        .any(|(k, v)| k.is_empty() || k.contains('\0') || v.contains('\0'))
    {
        return Err(bad(
            "env",
            "the image's Env has an empty name or a NUL byte".into(),
        ));
    }
    if !argv[0].starts_with('/') {
        let path = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
        // Looked up inside the root as the engine will see it (`..` and
        // absolute links stay in it): the agent runs as root, and the
        // deploy's outcome must not tell whether a host path exists.
        let in_root = rustix::fs::open(
            root,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ok();
        let exists = |p: &str| {
            in_root.as_ref().is_some_and(|r| {
                rustix::fs::openat2(
                    r,
                    p.trim_start_matches('/'),
                    rustix::fs::OFlags::PATH
                        | rustix::fs::OFlags::NOFOLLOW
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                    rustix::fs::ResolveFlags::IN_ROOT | rustix::fs::ResolveFlags::NO_MAGICLINKS,
                )
                .is_ok()
            })
        };
        let found = path
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| format!("{}/{}", d.trim_end_matches('/'), argv[0]))
            .find(|p| exists(p));
        match found {
            Some(p) => argv[0] = p,
            None => {
                return Err(bad(
                    "command[0]",
                    format!("{:?} is not in the image's PATH", argv[0]),
                ))
            }
        }
    }
    let cwd = spec
        .working_dir
        .clone()
        .or_else(|| Some(image.working_dir.clone()).filter(|w| w.starts_with('/')))
        .unwrap_or_else(|| "/".into());
    let data_dirs = spec
        .data_dirs
        .iter()
        .map(|d| DataDir {
            host: dir.join("data").join(d),
            target: Path::new("/").join(d),
        })
        .collect();
    Ok(LaunchSpec {
        name: name.to_owned(),
        rootfs: root.to_owned(),
        argv,
        env: env.into_iter().collect(),
        cwd: PathBuf::from(cwd),
        // Each engine runs as a host uid of its own (no user namespace
        // yet): the image's or the spec's user is not applied.
        uid,
        gid: uid,
        cgroup: None,
        data_dirs,
        tmp_size: TMP_SIZE,
        secrets: spec.secrets.clone(),
        notify_dir: None,
        // Granted per launch (`Runtime::launch`), never recorded.
        respawn: None,
    })
}

/// Whether the instance gets a notify socket: `NOTIFY_SOCKET` is only ever
/// set by [`resolve`] (the spec cannot, and the image's is dropped), and
/// only for `heartbeat.enabled`.
fn heartbeat(spec: &LaunchSpec) -> bool {
    spec.env.iter().any(|(k, _)| k == "NOTIFY_SOCKET")
}

/// One probe, bounded by `timeout`: `Ok` with what was seen, `Err` why it
/// failed.
fn run_one_probe(
    spawner: &dyn Spawner,
    run_dir: &Path,
    probe: &Probe,
    timeout: Duration,
) -> Result<String, String> {
    use leasehold_engines::probe;
    if let Some(argv) = &probe.exec {
        return match spawner.exec_probe(run_dir, argv, timeout) {
            launch::ProbeExit::Code(0) => Ok("exit code 0".into()),
            launch::ProbeExit::Code(c) => Err(format!("exit code {c}")),
            launch::ProbeExit::TimedOut => Err(format!("timed out after {timeout:?}")),
            launch::ProbeExit::NotRun(r) => Err(format!("not run: {r}")),
        };
    }
    if let Some(port) = probe.tcp {
        return probe::tcp(port, timeout, probe_mark())
            .map(|()| "connected".into())
            .map_err(|e| e.to_string());
    }
    if let Some(h) = &probe.http {
        return probe::http(h.port, &h.path, timeout, probe_mark())
            .map(|c| format!("HTTP status {c}"))
            .map_err(|e| e.to_string());
    }
    Err("no probe kind".into())
}

/// The mark of the agent's `tcp` and `http` probes: the node guard checks
/// them as an engine's connections (an engine's listener only). Root only
/// (`SO_MARK` needs CAP_NET_ADMIN; an agent that is not root loads no
/// guard either).
fn probe_mark() -> leasehold_engines::probe::Mark {
    leasehold_engines::probe::Mark(
        nix::unistd::geteuid()
            .is_root()
            .then_some(leasehold_netpolicy::nft::PROBE_MARK),
    )
}

/// How a probe is shown: `exec /bin/check`, `tcp 5432`, `http 8080 /healthz`.
fn probe_label(p: &Probe) -> String {
    if let Some(argv) = &p.exec {
        // From a bounded prefix: an argv may hold 256 KiB, and this runs
        // for every status rebuilt.
        let mut l = String::from("exec");
        for a in argv {
            if l.len() > 64 {
                break;
            }
            l.push(' ');
            l.push_str(
                a.char_indices()
                    .nth(65)
                    .map_or(a.as_str(), |(i, _)| &a[..i]),
            );
        }
        if l.len() > 64 {
            let mut cut = 61;
            while !l.is_char_boundary(cut) {
                cut -= 1;
            }
            l.truncate(cut);
            l.push_str("...");
        }
        l
    } else if let Some(port) = p.tcp {
        format!("tcp {port}")
    } else if let Some(h) = &p.http {
        format!("http {} {}", h.port, h.path)
    } else {
        "none".into()
    }
}

/// The current instance's confinement report, while it runs.
fn confinement_cell(e: &Engine) -> Option<Arc<ConfinementCell>> {
    use leasehold_engines::supervisor::Phase;
    let s = e.sup.status();
    if !matches!(s.phase, Phase::Running | Phase::Ready) {
        return None;
    }
    Some(e.live.get(&s.instance?)?.confinement.clone())
}

/// What `status` shows of an engine, to tell whether a step changed it:
/// without `started_at`, which is worked out from the clock at each call
/// (it differs by nanoseconds every time; a new instance changes the pid
/// and the phase too).
fn shown(e: &Engine) -> EngineStatus {
    EngineStatus {
        started_at: None,
        ..status_of(e)
    }
}

fn status_of(e: &Engine) -> EngineStatus {
    let s = e.sup.status();
    let image = e
        .versions
        .get(&s.version)
        .map(|v| v.image.clone())
        .unwrap_or_default();
    let started_at = s.since.map(|t| {
        SystemTime::now()
            .checked_sub(Instant::now().saturating_duration_since(t))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    });
    EngineStatus {
        name: e.name.clone(),
        image,
        phase: s.phase,
        enabled: e.sup.enabled(),
        pid: s.pid,
        started_at,
        restarts: s.restarts,
        last_exit: s.last_exit,
        probes_delayed: e.probes_delayed,
        // Filled in by the view (ConfinementCell).
        confinement: None,
        notes: e
            .held_note
            .filter(|_| e.sup.enabled())
            .map(str::to_owned)
            .into_iter()
            .chain(e.fresh_note.iter().cloned())
            .collect(),
        probes: e
            .sup
            .spec()
            .probes
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let seen = e.probes_seen.get(&i);
                EngineProbe {
                    probe: probe_label(p),
                    failures: s.probe_failures.get(i).copied().unwrap_or(0),
                    ok: seen.map(|r| r.ok),
                    detail: seen.map(|r| r.detail.clone()),
                    at: seen.map(|r| r.at),
                }
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------
// The controller's side.

/// The engine runtime, as the node controller holds it.
pub struct EngineRuntime {
    tx: Sender<Msg>,
    view: Arc<SnapshotView>,
    logs: output::LogSink,
    /// The tenant's cgroup subtree, killed from here when the runtime
    /// thread does not answer a stop before an erase (busy unpacking, or
    /// gone): no engine keeps running on a volume being erased.
    fallback: Option<(Arc<dyn Cgroups>, CgroupPath)>,
    /// Shared with the runtime thread (`Runtime::halted`).
    halted: Arc<std::sync::atomic::AtomicBool>,
    /// Shared with the runtime thread (`Runtime::abort`).
    abort: Arc<AbortUnpacks>,
    /// Shared with the runtime thread (`Runtime::published`).
    #[cfg_attr(not(test), allow(dead_code))]
    published: Arc<std::sync::atomic::AtomicU64>,
}

impl fmt::Debug for EngineRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EngineRuntime")
    }
}

struct SnapshotView {
    snapshot: Snapshot,
    tenant: Arc<tenant::Shared>,
    volume: Arc<dyn VolumeDir>,
    images_dir: String,
    events: output::Events,
}

fn with_confinement((s, cell): &(EngineStatus, Option<Arc<ConfinementCell>>)) -> EngineStatus {
    EngineStatus {
        confinement: cell.as_ref().and_then(|c| c.get()),
        ..s.clone()
    }
}

impl fmt::Debug for SnapshotView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SnapshotView")
    }
}

impl EngineView for SnapshotView {
    fn list(&self) -> Vec<EngineStatus> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(with_confinement)
            .collect()
    }
    fn status(&self, name: &str) -> Option<EngineStatus> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(with_confinement)
    }
    fn logs(
        &self,
        name: &str,
        since_ms: u64,
        max_lines: usize,
    ) -> Result<Vec<leasehold_engines::logs::Record>, Failure> {
        if self.status(name).is_none() {
            return Err(RuntimeError::NotFound(name.to_owned()).into());
        }
        let Some(v) = self.volume.mounted() else {
            return Err(Failure::new(
                FailureKind::Unavailable,
                "no tenant volume is mounted: engine logs are kept only on it",
            ));
        };
        let dir = v.join(&self.images_dir).join(name).join("logs");
        leasehold_engines::logs::read(&dir, since_ms, max_lines)
            .map_err(|e| Failure::new(FailureKind::Failed, format!("engine {name:?}: {e}")))
    }
    fn events(&self, after: u64, max: usize) -> Vec<leasehold_node::EngineEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .after(after, max.min(leasehold_node::MAX_EVENTS_READ))
    }
    fn tenant(&self) -> TenantView {
        self.tenant.view(&self.list())
    }
    fn throttles(&self) -> leasehold_node::Throttles {
        self.tenant.throttles()
    }
}

impl EngineRuntime {
    /// Loads `engines.json`, re-adopts the instances still running and
    /// starts engines marked to start, then runs the runtime thread.
    #[cfg(test)]
    pub fn start(
        cfg: RuntimeConfig,
        cgroups: Arc<dyn Cgroups>,
        spawner: Arc<dyn Spawner>,
        volume: Arc<dyn VolumeDir>,
    ) -> Result<Self, RuntimeError> {
        Self::start_with(cfg, cgroups, spawner, volume, Arc::new(NoSecrets))
    }

    /// [`EngineRuntime::start_with`] without a boundary owner ([`NoEgress`]).
    #[cfg(test)]
    pub fn start_with(
        cfg: RuntimeConfig,
        cgroups: Arc<dyn Cgroups>,
        spawner: Arc<dyn Spawner>,
        volume: Arc<dyn VolumeDir>,
        secrets: Arc<dyn SecretSource>,
    ) -> Result<Self, RuntimeError> {
        Self::start_full(cfg, cgroups, spawner, volume, secrets, Arc::new(NoEgress))
    }

    /// [`EngineRuntime::start`] with the tenant's secrets for the engines
    /// and the boundary owner for their egress rules.
    pub fn start_full(
        cfg: RuntimeConfig,
        cgroups: Arc<dyn Cgroups>,
        spawner: Arc<dyn Spawner>,
        volume: Arc<dyn VolumeDir>,
        secrets: Arc<dyn SecretSource>,
        egress: Arc<dyn EgressRules>,
    ) -> Result<Self, RuntimeError> {
        let path = cfg.state_dir.join(STATE_FILE);
        let state: StateFile = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| RuntimeError::State {
                path: path.clone(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(io("read", &path)(e)),
        };
        let tenant = Arc::new(tenant::Shared::new(
            &cfg,
            cgroups.clone(),
            tenant::load(&cfg.state_dir)?,
            tenant::load_throttles(&cfg.state_dir)?,
        ));
        let (tx, rx) = mpsc::channel();
        let snapshot: Snapshot = Arc::default();
        let published = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let logs = output::LogSink::start(volume.clone(), cfg.log_max_bytes, output::QUEUE_BYTES)
            .map_err(io("spawn", Path::new("engine-logs thread")))?;
        let events = output::EventRing::new();
        let logs_handle = logs.clone();
        let view_cfg = (volume.clone(), cfg.images_dir.clone());
        let fallback = subtree(&cfg).ok().map(|p| (cgroups.clone(), p));
        let halted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let abort = Arc::new(AbortUnpacks::default());
        let probes =
            probe_gate::ProbeGate::new(cfg.probe_rate, cfg.probe_concurrency, Instant::now());
        let mut rt = Runtime {
            cfg,
            halted: halted.clone(),
            abort: abort.clone(),
            cgroups,
            spawner,
            volume,
            secrets,
            egress,
            engines: BTreeMap::new(),
            timers: BTreeMap::new(),
            tx: tx.clone(),
            snapshot: snapshot.clone(),
            published: published.clone(),
            stop_all: None,
            killed: Vec::new(),
            probes,
            logs,
            events: events.clone(),
            tenant: tenant.clone(),
            saved: std::cell::RefCell::new(None),
        };
        // Before any engine is started again (adopted ones run already).
        rt.tenant.write_budget_at_start();
        rt.sweep_staging();
        // The agent restarted within the boot the state was written in
        // (not the node): what had come to rest stays at rest, and what
        // ended while no agent watched goes through its restart policy.
        let same_boot = rt.cfg.boot_id.is_some() && state.boot_id == rt.cfg.boot_id;
        let mut to_start = Vec::new();
        let mut to_resume = Vec::new();
        for r in state.engines {
            let spec =
                Spec::from_stored_json(&r.current.spec).map_err(|e| RuntimeError::State {
                    path: path.clone(),
                    detail: format!("engine {:?}: {e}", r.name),
                })?;
            let version = VersionId(r.current.id);
            let spec_policy = spec.restart.policy;
            let mut sup = Supervisor::new(version, spec);
            sup.set_reboot_allowed(rt.cfg.reboot_node.is_some());
            let mut adoptable = None;
            let recorded: Vec<u64> = r.instances.iter().map(|(i, _)| *i).collect();
            for (i, pid) in &r.instances {
                let rd = rt.run_dir(&r.name, *i);
                match rt.spawner.adopt(&rd) {
                    Ok(p) if adoptable.is_none() => {
                        tracing::info!(engine = r.name, pid, "re-adopted a running engine");
                        adoptable = Some((p, *i));
                    }
                    Ok(p) => {
                        tracing::warn!(
                            engine = r.name,
                            pid,
                            "a second instance (an unfinished reload) is killed"
                        );
                        let _ = p.signal(Signal::SIGKILL);
                    }
                    Err(e) => {
                        tracing::info!(engine = r.name, pid, error = %e, "a recorded instance is gone")
                    }
                }
            }
            let mut versions = BTreeMap::new();
            versions.insert(version, r.current.clone());
            let mut held = None;
            // One instance recorded and gone: how it ended, if its shim
            // recorded it (read before the sweep removes its directory).
            let ended = match r.instances.as_slice() {
                [(i, _)] if same_boot && r.enabled && adoptable.is_none() => {
                    rt.recorded_exit(&r.name, *i)
                }
                _ => None,
            };
            if adoptable.is_some() {
                to_start.push(r.name.clone());
            } else if let Some(st) = r
                .settled
                .as_ref()
                .filter(|_| same_boot && r.enabled && r.instances.is_empty())
            {
                tracing::info!(
                    engine = r.name,
                    state = ?st.state,
                    "at rest before the agent restarted: left so (not started again)"
                );
                sup.restore_settled(st.state, st.last_exit, st.restarts);
            } else if let Some(exit) = ended.filter(|_| rt.volume.mounted().is_some()) {
                tracing::info!(
                    engine = r.name,
                    %exit,
                    "ended while no agent watched: its restart policy decides"
                );
                to_resume.push((r.name.clone(), exit));
            } else if let Some(exit) = ended.filter(|e| !wants_restart(spec_policy, e.clean())) {
                // Ended by itself, not to be restarted, while no volume is
                // mounted: at rest, as it would have been.
                sup.restore_settled(Settled::Exited, Some(exit), 0);
            } else if r.enabled && rt.volume.mounted().is_none() {
                // The mark stays (recorded again as it was): the next agent
                // that finds the volume starts it, as after a reboot.
                tracing::error!(
                    engine = r.name,
                    "marked to start, but no tenant volume is mounted: left stopped, still marked to run"
                );
                sup.keep_wanted();
                held = Some(HELD_NO_VOLUME);
            } else if r.enabled {
                to_start.push(r.name.clone());
            }
            let name = r.name.clone();
            rt.engines.insert(
                r.name.clone(),
                Engine {
                    name: r.name,
                    uid: r.uid,
                    sup,
                    versions,
                    live: BTreeMap::new(),
                    adoptable,
                    id_base: r.next_instance,
                    next_name: r.next_instance,
                    leftover: Vec::new(),
                    log_window: Instant::now(),
                    log_lines: 0,
                    log_suppressed: 0,
                    next_version: r.next_version,
                    events: VecDeque::new(),
                    probing: Default::default(),
                    probes_delayed: 0,
                    incarnation: incarnation(),
                    probes_seen: BTreeMap::new(),
                    fresh_note: None,
                    held_note: held,
                },
            );
            rt.sweep_unrecorded(&name, &recorded);
        }
        for n in to_start {
            if let Err(e) = rt.step(&n, Input::Start) {
                tracing::error!(engine = n, error = %e, "the engine was not started again");
            }
        }
        // Every instance still running is adopted by now: a socket systemd
        // kept for one that is gone is dropped from its store.
        let released = rt.cfg.fdstore.release_unclaimed();
        if !released.is_empty() {
            tracing::info!(sockets = ?released, "notify sockets kept for instances that are gone: released");
        }
        for (n, exit) in to_resume {
            let actions = match rt.engines.get_mut(&n) {
                Some(e) => e.sup.resume_after_exit(Instant::now(), exit),
                None => continue,
            };
            if let Err(e) = rt.carry_out(&n, actions) {
                tracing::error!(engine = n, error = %e, "the engine's exit was not acted on");
            }
        }
        rt.save_logged();
        let view = Arc::new(SnapshotView {
            snapshot,
            tenant,
            volume: view_cfg.0,
            images_dir: view_cfg.1,
            events,
        });
        rt.publish();
        std::thread::Builder::new()
            .name("engines".into())
            .spawn(move || rt.run(rx))
            .map_err(io("spawn", Path::new("engines thread")))?;
        Ok(EngineRuntime {
            tx,
            view,
            logs: logs_handle,
            fallback,
            halted,
            abort,
            published,
        })
    }

    fn call(&self, c: Cmd, timeout: Duration) -> Result<Reply, RuntimeError> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Cmd(c, rtx))
            .map_err(|_| RuntimeError::NoAnswer("the runtime thread is gone"))?;
        rrx.recv_timeout(timeout)
            .map_err(|_| RuntimeError::NoAnswer("no answer within the deadline"))
    }

    fn status_call(&self, c: Cmd) -> Result<EngineStatus, Failure> {
        match self.call(c, CALL_TIMEOUT)? {
            Reply::Status(r) => Ok(r?),
            _ => Err(RuntimeError::NoAnswer("unexpected answer").into()),
        }
    }
}

/// An answer sent to `rrx`, awaited until `deadline` (one already there is
/// taken even past it).
fn answer_by(rrx: &Receiver<Reply>, deadline: Instant) -> Result<Option<EngineStatus>, Failure> {
    match rrx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(Reply::Status(r)) => Ok(Some(r?)),
        Ok(Reply::Unit(r)) => Ok(r.map(|()| None)?),
        Ok(_) => Err(RuntimeError::NoAnswer("unexpected answer").into()),
        Err(_) => Err(RuntimeError::NoAnswer("no answer within the deadline").into()),
    }
}

impl Drop for EngineRuntime {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
        // As when the agent's process ends: the captures let go of the
        // FIFOs, and what the engines write next waits there for the next
        // runtime.
        self.logs.stop();
    }
}

impl Engines for EngineRuntime {
    fn budget(&mut self) -> Result<Budget, Failure> {
        // The controller is the only writer (`set_budget`, below),
        // so what is recorded is what the check must use.
        Ok(self.view.tenant.budget())
    }
    // On the caller's thread, not the runtime's (which may be unpacking
    // a tenant's image): the landlord's change never waits for the tenant.
    fn set_budget(&mut self, budget: &Budget) -> Result<BudgetApplied, Failure> {
        Ok(self.view.tenant.set_budget(*budget)?)
    }
    fn set_throttles(
        &mut self,
        throttles: &leasehold_node::Throttles,
    ) -> Result<leasehold_node::ThrottleApplied, Failure> {
        Ok(self.view.tenant.set_throttles(throttles.clone())?)
    }
    fn deploy(&mut self, name: &str, image: &str, spec: &Spec) -> Result<EngineStatus, Failure> {
        self.status_call(Cmd::Deploy(
            name.into(),
            image.into(),
            Box::new(spec.clone()),
        ))
    }
    fn start(&mut self, name: &str) -> Result<EngineStatus, Failure> {
        self.status_call(Cmd::Start(name.into()))
    }
    fn stop(&mut self, name: &str, grace: Option<Duration>) -> Result<EngineStatus, Failure> {
        self.status_call(Cmd::Stop(name.into(), grace))
    }
    fn restart(&mut self, name: &str) -> Result<EngineStatus, Failure> {
        self.status_call(Cmd::Restart(name.into()))
    }
    fn reload(
        &mut self,
        name: &str,
        image: Option<&str>,
        spec: Option<&Spec>,
    ) -> Result<EngineStatus, Failure> {
        self.status_call(Cmd::Reload(
            name.into(),
            image.map(str::to_owned),
            spec.map(|s| Box::new(s.clone())),
        ))
    }
    fn rm(&mut self, name: &str) -> Result<(), Failure> {
        match self.call(Cmd::Rm(name.into()), CALL_TIMEOUT)? {
            Reply::Unit(r) => Ok(r?),
            _ => Err(RuntimeError::NoAnswer("unexpected answer").into()),
        }
    }
    fn send(&mut self, c: &leasehold_node::EngineCommand) -> leasehold_node::EngineAnswer {
        use leasehold_node::EngineCommand as E;
        let cmd = match c {
            E::Deploy { name, image, spec } => {
                Cmd::Deploy(name.clone(), image.clone(), spec.clone())
            }
            E::Start { name } => Cmd::Start(name.clone()),
            E::Stop { name, grace } => Cmd::Stop(name.clone(), *grace),
            E::Restart { name } => Cmd::Restart(name.clone()),
            E::Reload { name, image, spec } => {
                Cmd::Reload(name.clone(), image.clone(), spec.clone())
            }
            E::Rm { name } => Cmd::Rm(name.clone()),
        };
        // Sent now, in the controller's order; answered in that order.
        let (rtx, rrx) = mpsc::sync_channel(1);
        let sent = self.tx.send(Msg::Cmd(cmd, rtx)).is_ok();
        // The deadline runs from the send, not from when the answer is
        // first awaited: answers are awaited one after another, so a
        // stuck runtime would otherwise hold the last of 16 for 16 times
        // the bound.
        let deadline = Instant::now() + CALL_TIMEOUT;
        Box::new(move || {
            if !sent {
                return Err(RuntimeError::NoAnswer("the runtime thread is gone").into());
            }
            answer_by(&rrx, deadline)
        })
    }
    fn stop_all(&mut self, grace: Duration) -> Result<StopReport, Failure> {
        let bound = grace + KILL_WAIT + Duration::from_secs(5);
        // An unpack the thread is busy with stops first; tenant commands
        // queued before the stop are refused.
        self.abort.raise();
        match self.call(Cmd::StopAll(grace), bound) {
            Ok(Reply::Stopped(r)) => Ok(r),
            Ok(_) => Err(RuntimeError::NoAnswer("unexpected answer").into()),
            Err(e) => {
                // The thread is busy (a long unpack) or gone: the stop it
                // will still carry out is too late for the erase that
                // follows. Every process of the tenant's subtree is killed
                // from here; nothing is claimed stopped by name.
                self.halted.store(true, std::sync::atomic::Ordering::SeqCst);
                // Lifted by the thread once it has carried out the late
                // stop (queued before this).
                let (utx, _) = mpsc::sync_channel(1);
                let _ = self.tx.send(Msg::Cmd(Cmd::Unhalt, utx));
                let killed = match &self.fallback {
                    Some((cgroups, tree)) => cgroups
                        .kill(tree)
                        .map(|()| {
                            format!(
                                "every process in the tenant's cgroups ({}) was killed (cgroup.kill)",
                                cgroups.dir(tree).display()
                            )
                        })
                        .unwrap_or_else(|k| format!("the tenant's cgroups could not be killed: {k}")),
                    None => "the tenant's cgroups are not known".into(),
                };
                tracing::error!(error = %e, %killed, "the engine runtime did not answer the stop before an erase");
                Ok(StopReport {
                    error: Some(format!("{e}; {killed}")),
                    ..StopReport::default()
                })
            }
        }
    }
    fn forget_all(&mut self) -> Result<usize, Failure> {
        self.abort.raise();
        let r = self.call(Cmd::ForgetAll, CALL_TIMEOUT);
        if r.is_err() {
            // The thread forgets them when it gets to it; the next tenant
            // must not read this tenancy's events meanwhile.
            self.view
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        match r? {
            Reply::Forgot(r) => Ok(r?),
            _ => Err(RuntimeError::NoAnswer("unexpected answer").into()),
        }
    }
    fn view(&self) -> Arc<dyn EngineView> {
        self.view.clone()
    }
}

mod notify;
mod output;
pub mod probe_gate;
#[cfg(feature = "bench-stand-ins")]
pub mod stand_in;
mod tenant;

#[cfg(test)]
mod tests;
