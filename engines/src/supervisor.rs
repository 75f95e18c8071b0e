//! Supervision of one engine: a pure state machine over injected instants.
//!
//! The runtime (launcher, pidfd watcher, notify socket, probe runner,
//! timers) feeds [`Input`]s with the time they happened and carries out the
//! [`Action`]s it gets back: launch an instance, signal it, run a probe,
//! arm or cancel a timer, emit an event. Nothing here sleeps, reads a
//! clock or touches the system, so the tests drive it with made-up instants
//! (as [`crate::backoff`]).
//!
//! An **instance** is one launched process tree of one **version** (an
//! image and a [`Spec`]); a restart or a reload makes a new instance. Every
//! observation names its instance, so a late report about an instance that
//! is gone is ignored. Outside a reload at most one instance is alive; a
//! reload starts the new version's instance beside the old one and stops
//! the old one only once the new one is ready. Timers are named by
//! [`TimerId`]: a timer that fires after it stopped mattering (a restart
//! after a `stop`, a kill after the exit) is ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backoff::{wants_restart, Backoff, Decision, Schedule};
use crate::spec::{FailureAction, RestartPolicy, Spec};

/// One launched process tree of an engine (its own cgroup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(pub u64);

/// One version of an engine (image and spec); the runtime keeps what each
/// names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VersionId(pub u64);

/// A timer the supervisor asked for ([`Action::Schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerId(pub u64);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "i{}", self.0)
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// How an instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal (not the OOM killer).
    Signal(i32),
    /// Killed by the kernel's OOM killer (`oom_kill` in the cgroup's
    /// `memory.events` went up).
    Oom,
    /// Never ran: the launch failed (image, exec, confinement).
    NotStarted,
}

impl Exit {
    /// Exit code 0: what `on-failure` does not restart.
    pub fn clean(&self) -> bool {
        matches!(self, Exit::Code(0))
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
            Exit::Oom => f.write_str("OOM-killed"),
            Exit::NotStarted => f.write_str("not started"),
        }
    }
}

/// Where an engine the tenant wants running came to rest with nothing
/// alive and nothing pending: what an agent restart within the same boot
/// must leave as it is (the runtime records it; see
/// [`Supervisor::settled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Settled {
    /// Exited and its restart policy does not restart it.
    Exited,
    /// Too many restarts: left exited until a command.
    GaveUp,
}

/// The engine's state as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Deployed and not running: never started, or stopped by the tenant.
    Stopped,
    /// Launch asked, no process yet.
    Starting,
    /// Exec'd, waiting for `READY=1` (heartbeat enabled).
    Running,
    /// Ready: `READY=1` received, or exec'd without a heartbeat. Probes
    /// and the watchdog run from here.
    Ready,
    /// Asked to stop (SIGTERM), killed after the grace.
    Stopping,
    /// Exited and the policy does not restart it.
    Exited,
    /// Exited; the restart waits for the backoff delay.
    BackingOff,
    /// Too many restarts: left exited until a command.
    GaveUp,
}

impl Phase {
    /// The wire name.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Ready => "ready",
            Phase::Stopping => "stopping",
            Phase::Exited => "exited",
            Phase::BackingOff => "backing-off",
            Phase::GaveUp => "gave-up",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A message on the engine's notify socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// `READY=1`.
    Ready,
    /// `WATCHDOG=1`.
    Watchdog,
}

/// What happened, with the instant it happened passed beside it.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Tenant: start (a manual start forgets the backoff).
    Start,
    /// Tenant: stop. SIGTERM, SIGKILL after `grace` (`None`: the spec's
    /// `stop_grace`); cancels a pending restart.
    Stop {
        /// Grace before the kill.
        grace: Option<Duration>,
    },
    /// Tenant: stop (with the spec's grace), then start again.
    Restart,
    /// Tenant: run a new version; the old instance keeps running until the
    /// new one is ready.
    Reload {
        /// The new version's id (the runtime knows its image).
        version: VersionId,
        /// Its spec.
        spec: Box<Spec>,
    },
    /// The runtime: the instance exec'd as `pid`.
    Launched {
        /// Which.
        instance: InstanceId,
        /// Its main pid.
        pid: u32,
    },
    /// The runtime: the instance could not be launched.
    LaunchFailed {
        /// Which.
        instance: InstanceId,
        /// Why (for the event).
        reason: String,
    },
    /// The runtime: the instance's main process exited (pidfd).
    Exited {
        /// Which.
        instance: InstanceId,
        /// How.
        exit: Exit,
    },
    /// The runtime: the instance's engine exited and its shim is using
    /// its [`Respawn`] grant (the engine comes back after the delay, same
    /// instance, pid and cgroup, unless a stop ends the shim first).
    Respawning {
        /// Which.
        instance: InstanceId,
        /// How the engine ended.
        exit: Exit,
    },
    /// The runtime: the shim is starting the engine again now.
    Respawned {
        /// Which.
        instance: InstanceId,
    },
    /// The runtime: a probe the supervisor asked for finished.
    Probe {
        /// Which instance.
        instance: InstanceId,
        /// Index in `spec.probes`.
        probe: usize,
        /// Healthy.
        ok: bool,
    },
    /// The runtime: a message on the instance's notify socket.
    Heartbeat {
        /// Which instance.
        instance: InstanceId,
        /// What.
        notify: Notify,
    },
    /// The runtime: a timer fired.
    Timer(TimerId),
}

/// Why an engine failed (probe threshold, watchdog, ready timeout, give-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// `spec.probes[probe]` failed `failures` times in a row.
    Probe {
        /// Index in `spec.probes`.
        probe: usize,
        /// Failures in a row (the threshold).
        failures: u32,
    },
    /// No `WATCHDOG=1` within the watchdog interval.
    Watchdog,
    /// No `READY=1` within `heartbeat.ready_timeout`.
    ReadyTimeout,
    /// Restarts gave up.
    GaveUp {
        /// Restarts made within the window.
        restarts: u32,
        /// The window.
        within: Duration,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Probe { probe, failures } => {
                write!(f, "probes[{probe}] failed {failures} times in a row")
            }
            Failure::Watchdog => f.write_str("no WATCHDOG=1 within the watchdog interval"),
            Failure::ReadyTimeout => f.write_str("no READY=1 within heartbeat.ready_timeout"),
            Failure::GaveUp { restarts, within } => {
                write!(f, "gave up after {restarts} restarts within {within:?}")
            }
        }
    }
}

/// An event for the tenant's stream (`tenantctl engine events -f`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An instance exec'd.
    Started {
        /// Which.
        instance: InstanceId,
        /// Its main pid.
        pid: u32,
        /// Its version.
        version: VersionId,
    },
    /// `READY=1` (or exec'd without a heartbeat).
    Ready {
        /// Which.
        instance: InstanceId,
    },
    /// An instance ended (code, signal, OOM, or its launch failed).
    Exited {
        /// Which.
        instance: InstanceId,
        /// How.
        exit: Exit,
    },
    /// The launch failed.
    LaunchFailed {
        /// Which.
        instance: InstanceId,
        /// Why.
        reason: String,
    },
    /// Sent with `Exited` when the OOM killer ended the instance.
    OomKilled {
        /// Which.
        instance: InstanceId,
    },
    /// One probe failed.
    ProbeFailed {
        /// Which instance.
        instance: InstanceId,
        /// Index in `spec.probes`.
        probe: usize,
        /// Failures in a row so far.
        failures: u32,
        /// The probe's threshold.
        threshold: u32,
    },
    /// The watchdog expired.
    WatchdogExpired {
        /// Which.
        instance: InstanceId,
    },
    /// No `READY=1` in time: the instance is killed.
    ReadyTimeout {
        /// Which.
        instance: InstanceId,
    },
    /// `on_failure = ["notify", …]`: the engine failed.
    Failed {
        /// Why.
        failure: Failure,
    },
    /// The next restart waits `delay` (attempt `attempt` since the last
    /// reset).
    BackingOff {
        /// Delay.
        delay: Duration,
        /// Attempt.
        attempt: u32,
    },
    /// A restart by the supervisor (after the backoff delay).
    Restarted {
        /// The new instance.
        instance: InstanceId,
        /// Attempt since the last reset.
        attempt: u32,
        /// How long it waited.
        delay: Duration,
    },
    /// Too many restarts within the window; left exited.
    GaveUp {
        /// Restarts made within the window.
        restarts: u32,
        /// The window.
        within: Duration,
    },
    /// SIGKILL after the grace.
    Killed {
        /// Which.
        instance: InstanceId,
    },
    /// Stopped as asked.
    Stopped,
    /// A reload began: `to` starts beside the running version.
    Reloading {
        /// The running version.
        from: VersionId,
        /// The new one.
        to: VersionId,
    },
    /// The new version is the engine's (its instance ready, or nothing was
    /// running).
    Reloaded {
        /// The new version.
        version: VersionId,
    },
    /// The new version's instance did not become ready: the old version
    /// stays.
    ReloadFailed {
        /// The version given up.
        version: VersionId,
        /// Why.
        reason: String,
    },
    /// `on_failure = ["reload"]`: the instance runs from a fresh root
    /// unpacked from the engine's image (verified again); the previous
    /// root is gone (emitted by the runtime, which unpacks).
    ImageReloaded {
        /// The instance running from it.
        instance: InstanceId,
    },
    /// `on_failure = ["reload"]` could not give the instance a fresh root
    /// (the image is gone, fails verification, or instances launched from
    /// fresh roots failed [`MAX_FRESH_ROOT_TRIES`] times in a row): it runs
    /// from the root it had.
    ImageReloadFailed {
        /// The instance (launched from the previous root, or the last that
        /// failed).
        instance: InstanceId,
        /// Why.
        reason: String,
    },
}

/// Launches from a fresh root (`on_failure = ["reload"]`) that fail in a
/// row before the supervisor restarts from the root the engine had (each
/// through the backoff schedule).
pub const MAX_FRESH_ROOT_TRIES: u32 = 3;

impl Event {
    /// The wire name (`started`, `exited`, `oom-killed`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::Ready { .. } => "ready",
            Event::Exited { .. } => "exited",
            Event::LaunchFailed { .. } => "launch-failed",
            Event::OomKilled { .. } => "oom-killed",
            Event::ProbeFailed { .. } => "probe-failed",
            Event::WatchdogExpired { .. } => "watchdog-expired",
            Event::ReadyTimeout { .. } => "ready-timeout",
            Event::Failed { .. } => "failed",
            Event::BackingOff { .. } => "backing-off",
            Event::Restarted { .. } => "restarted",
            Event::GaveUp { .. } => "gave-up",
            Event::Killed { .. } => "killed",
            Event::Stopped => "stopped",
            Event::Reloading { .. } => "reloading",
            Event::Reloaded { .. } => "reloaded",
            Event::ReloadFailed { .. } => "reload-failed",
            Event::ImageReloaded { .. } => "image-reloaded",
            Event::ImageReloadFailed { .. } => "image-reload-failed",
        }
    }
}

/// What an instance's shim may do by itself when its engine exits: start
/// it again once, in place, after `delay` (docs/engines.md, "The first
/// restart in place"). Granted only when that exit is sure to get exactly
/// this restart from the schedule ([`Backoff::sure_first_restart`]), so the
/// supervisor learns of it after the fact ([`Input::Respawned`]) and agrees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Respawn {
    /// The backoff's first delay.
    pub delay: Duration,
    /// Also after exit code 0 (`restart.policy = "always"`).
    pub on_clean_exit: bool,
}

/// What the runtime must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Launch a new instance of `version` (a fresh root from its image
    /// first if `fresh_root`: `on_failure = ["reload"]`).
    Launch {
        /// The new instance's id.
        instance: InstanceId,
        /// Which version.
        version: VersionId,
        /// Unpack the root again (data dirs kept).
        fresh_root: bool,
        /// The shim may restart the engine once by itself.
        respawn: Option<Respawn>,
    },
    /// SIGTERM to the instance's main process.
    Terminate {
        /// Which.
        instance: InstanceId,
    },
    /// SIGKILL to every process of the instance (`cgroup.kill`).
    Kill {
        /// Which.
        instance: InstanceId,
    },
    /// Run `spec.probes[probe]` against the instance, report
    /// [`Input::Probe`] (a probe past `timeout` failed).
    RunProbe {
        /// Which instance.
        instance: InstanceId,
        /// Index in `spec.probes`.
        probe: usize,
        /// Its timeout.
        timeout: Duration,
    },
    /// Fire [`Input::Timer`] at `at`.
    Schedule {
        /// Name to report.
        timer: TimerId,
        /// When.
        at: Instant,
    },
    /// The timer no longer matters (firing it anyway is harmless).
    Cancel(TimerId),
    /// `on_failure = ["reboot-node"]`, and the landlord's policy allowed it
    /// when the plan was made: ask the node controller.
    RebootNode {
        /// Why.
        failure: Failure,
    },
    /// Put the event on the tenant's stream.
    Emit(Event),
}

/// A command the supervisor refuses (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Another reload has not finished (its instance is not ready, or the
    /// old instance is still stopping).
    #[error("a reload is in progress ({0}); wait for it or stop the engine")]
    ReloadInProgress(VersionId),
}

/// What `status` shows of the supervision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// State.
    pub phase: Phase,
    /// The engine's version.
    pub version: VersionId,
    /// The version a reload is starting.
    pub reloading: Option<VersionId>,
    /// The current instance.
    pub instance: Option<InstanceId>,
    /// Its main pid.
    pub pid: Option<u32>,
    /// When it exec'd (uptime).
    pub since: Option<Instant>,
    /// Restarts made by the supervisor since deploy.
    pub restarts: u32,
    /// How the last instance of the engine ended.
    pub last_exit: Option<Exit>,
    /// Failures in a row of each probe.
    pub probe_failures: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IPhase {
    Launching,
    Running,
    Ready,
    Stopping,
    /// Its engine exited; the shim starts it again after `delay` (the
    /// schedule's restart `attempt`, due `at`).
    Respawning {
        attempt: u32,
        delay: Duration,
        at: Instant,
    },
}

/// Why an instance is being stopped, i.e. what its exit leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopWhy {
    /// A stop or restart command (`relaunch` says which).
    Asked,
    /// The failure plan: restart through the backoff schedule.
    Failure { fresh_root: bool },
    /// No `READY=1` in time: a failed exit for the restart policy.
    ReadyTimeout,
    /// The other instance of a reload.
    Retire,
}

#[derive(Debug, Clone)]
struct Instance {
    id: InstanceId,
    version: VersionId,
    pid: Option<u32>,
    phase: IPhase,
    launched_at: Option<Instant>,
    probe_failures: Vec<u32>,
    watchdog: Option<Instant>,
    stop: Option<StopWhy>,
    killed: bool,
    /// Launched from a fresh root (`on_failure = ["reload"]`).
    fresh_root: bool,
    /// Its engine's exit was reported from the shim's record (not again
    /// when the shim then ends without a respawn).
    exit_reported: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    Restart { fresh_root: bool },
    Kill(InstanceId),
    ReadyTimeout(InstanceId),
    Watchdog(InstanceId),
    Probe(InstanceId, usize),
}

impl TimerKind {
    fn instance(&self) -> Option<InstanceId> {
        match *self {
            TimerKind::Restart { .. } => None,
            TimerKind::Kill(i)
            | TimerKind::ReadyTimeout(i)
            | TimerKind::Watchdog(i)
            | TimerKind::Probe(i, _) => Some(i),
        }
    }
}

/// The engine's state when no current instance is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    Stopped,
    Exited,
    BackingOff {
        timer: TimerId,
        delay: Duration,
        fresh_root: bool,
    },
    GaveUp,
}

/// Where an instance lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Current,
    Incoming,
    Retiring(usize),
}

/// The supervision state of one engine.
#[derive(Debug, Clone)]
pub struct Supervisor {
    version: VersionId,
    spec: Spec,
    /// A reload's version, until its instance is ready.
    next: Option<(VersionId, Spec)>,
    current: Option<Instance>,
    incoming: Option<Instance>,
    retiring: Vec<Instance>,
    idle: Idle,
    /// The tenant wants it running (start, restart; cleared by stop).
    enabled: bool,
    /// Launch again once the current instance's stop completes.
    relaunch: bool,
    backoff: Backoff,
    reboot_allowed: bool,
    timers: BTreeMap<TimerId, TimerKind>,
    next_instance: u64,
    next_timer: u64,
    restarts: u32,
    last_exit: Option<Exit>,
    /// Launches from a fresh root in a row that did not start (reset when
    /// one does): bounded by [`MAX_FRESH_ROOT_TRIES`].
    fresh_tries: u32,
}

fn find(i: &Option<Instance>, id: InstanceId) -> bool {
    i.as_ref().is_some_and(|i| i.id == id)
}

impl Supervisor {
    /// A deployed engine, stopped, running `version` with `spec` (validated).
    pub fn new(version: VersionId, spec: Spec) -> Self {
        let backoff = Backoff::new(Schedule::from(&spec.restart));
        Supervisor {
            version,
            spec,
            next: None,
            current: None,
            incoming: None,
            retiring: Vec::new(),
            idle: Idle::Stopped,
            enabled: false,
            relaunch: false,
            backoff,
            reboot_allowed: false,
            timers: BTreeMap::new(),
            next_instance: 1,
            next_timer: 1,
            restarts: 0,
            last_exit: None,
            fresh_tries: 0,
        }
    }

    /// Whether the landlord's policy lets this tenant reboot the node
    /// (read when a failure plan is made; default no).
    pub fn set_reboot_allowed(&mut self, allowed: bool) {
        self.reboot_allowed = allowed;
    }

    /// The engine's current spec.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The engine's current version.
    pub fn version(&self) -> VersionId {
        self.version
    }

    /// The state `status` shows.
    pub fn phase(&self) -> Phase {
        match self.current.as_ref().or(self.incoming.as_ref()) {
            Some(i) => match i.phase {
                IPhase::Launching => Phase::Starting,
                IPhase::Running => Phase::Running,
                IPhase::Ready => Phase::Ready,
                IPhase::Stopping => Phase::Stopping,
                IPhase::Respawning { .. } => Phase::BackingOff,
            },
            None => match self.idle {
                Idle::Stopped => Phase::Stopped,
                Idle::Exited => Phase::Exited,
                Idle::BackingOff { .. } => Phase::BackingOff,
                Idle::GaveUp => Phase::GaveUp,
            },
        }
    }

    /// A reload has instances alive: the new one not ready yet, or the old
    /// one (or a failed new one) still stopping. Only then may two
    /// instances be alive.
    pub fn reloading(&self) -> bool {
        self.incoming.is_some() || !self.retiring.is_empty()
    }

    /// Whether the tenant wants it running (started and not stopped since).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `Some` when the tenant wants it running but it came to rest: no
    /// instance alive, no restart pending, exited (its policy does not
    /// restart it) or given up. An agent restart within the same boot
    /// restores it with [`Supervisor::restore_settled`] instead of
    /// starting it again (a `restart = "never"` batch engine would
    /// otherwise run again at every agent upgrade).
    pub fn settled(&self) -> Option<Settled> {
        // A launch that failed on the node's side (rules, cgroup, state
        // disk, confinement) is not the engine's own end: the next agent
        // tries again, as before.
        if !self.enabled
            || self.current.is_some()
            || self.reloading()
            || self.last_exit == Some(Exit::NotStarted)
        {
            return None;
        }
        match self.idle {
            Idle::Exited => Some(Settled::Exited),
            Idle::GaveUp => Some(Settled::GaveUp),
            Idle::Stopped | Idle::BackingOff { .. } => None,
        }
    }

    /// After an agent restart within the boot `settled` was recorded in:
    /// the engine is as it was (wanted running, at rest, its last exit and
    /// restart count), and nothing is launched. Only on a supervisor with
    /// nothing alive (a new one); otherwise ignored.
    pub fn restore_settled(&mut self, settled: Settled, last_exit: Option<Exit>, restarts: u32) {
        if self.current.is_some() || self.reloading() {
            return;
        }
        self.enabled = true;
        self.idle = match settled {
            Settled::Exited => Idle::Exited,
            Settled::GaveUp => Idle::GaveUp,
        };
        self.last_exit = last_exit;
        self.restarts = restarts;
    }

    /// After an agent restart that cannot start it (no tenant volume):
    /// still wanted running — so recorded, for the next agent — but
    /// stopped; a `start` runs it. Only on a supervisor with nothing alive
    /// (a new one); otherwise ignored.
    pub fn keep_wanted(&mut self) {
        if self.current.is_none() && !self.reloading() {
            self.enabled = true;
        }
    }

    /// After an agent restart: the engine was wanted running and its
    /// instance ended while no agent watched (`exit`, as its shim recorded
    /// it). As after that exit: the events, the last exit, then the
    /// restart policy through the backoff (a restart is a timer; nothing is
    /// launched here). Only on a supervisor with nothing alive (a new one);
    /// otherwise no action.
    pub fn resume_after_exit(&mut self, now: Instant, exit: Exit) -> Vec<Action> {
        let mut out = Vec::new();
        if self.current.is_some() || self.reloading() {
            return out;
        }
        self.enabled = true;
        // A number of its own: the events name an instance as every
        // exit's do (the gone one's number belonged to the last agent).
        let instance = InstanceId(self.next_instance);
        self.next_instance += 1;
        out.push(Action::Emit(Event::Exited { instance, exit }));
        if exit == Exit::Oom {
            out.push(Action::Emit(Event::OomKilled { instance }));
        }
        self.last_exit = Some(exit);
        self.after_exit(now, exit.clean(), None, &mut out);
        out
    }

    /// Instances alive (launched and not seen to end), current first.
    pub fn instances(&self) -> Vec<InstanceId> {
        self.current
            .iter()
            .chain(&self.incoming)
            .chain(&self.retiring)
            .map(|i| i.id)
            .collect()
    }

    /// What `status` shows.
    pub fn status(&self) -> Status {
        let cur = self.current.as_ref();
        Status {
            phase: self.phase(),
            version: self.version,
            reloading: self.next.as_ref().map(|(v, _)| *v),
            instance: cur.map(|i| i.id),
            // While the shim waits to respawn, no engine runs.
            pid: cur
                .filter(|i| !matches!(i.phase, IPhase::Respawning { .. }))
                .and_then(|i| i.pid),
            since: cur.and_then(|i| i.launched_at),
            restarts: self.restarts,
            last_exit: self.last_exit,
            probe_failures: cur.map(|i| i.probe_failures.clone()).unwrap_or_default(),
        }
    }

    /// Applies one input that happened at `now`; returns what to do, in
    /// order. Only commands are refused (nothing changed then); an
    /// observation about an instance or timer that no longer matters is
    /// ignored (no actions).
    pub fn step(&mut self, now: Instant, input: Input) -> Result<Vec<Action>, Refused> {
        let mut out = Vec::new();
        match input {
            Input::Start => self.start(now, &mut out),
            Input::Stop { grace } => self.stop(now, grace, &mut out),
            Input::Restart => self.restart(now, &mut out)?,
            Input::Reload { version, spec } => self.reload(now, version, *spec, &mut out)?,
            Input::Launched { instance, pid } => self.launched(now, instance, pid, &mut out),
            Input::LaunchFailed { instance, reason } => {
                if let Some(slot) = self.slot(instance) {
                    out.push(Action::Emit(Event::LaunchFailed { instance, reason }));
                    self.gone(now, slot, Exit::NotStarted, &mut out);
                }
            }
            Input::Exited { instance, exit } => {
                if let Some(slot) = self.slot(instance) {
                    self.gone(now, slot, exit, &mut out);
                }
            }
            Input::Respawning { instance, exit } => self.respawning(now, instance, exit, &mut out),
            Input::Respawned { instance } => self.respawned(now, instance, &mut out),
            Input::Probe {
                instance,
                probe,
                ok,
            } => self.probe(now, instance, probe, ok, &mut out),
            Input::Heartbeat { instance, notify } => {
                self.heartbeat(now, instance, notify, &mut out)
            }
            Input::Timer(t) => self.timer(now, t, &mut out),
        }
        Ok(out)
    }

    // -- helpers ------------------------------------------------------------

    fn slot(&self, id: InstanceId) -> Option<Slot> {
        if find(&self.current, id) {
            Some(Slot::Current)
        } else if find(&self.incoming, id) {
            Some(Slot::Incoming)
        } else {
            self.retiring
                .iter()
                .position(|i| i.id == id)
                .map(Slot::Retiring)
        }
    }

    fn get(&mut self, slot: Slot) -> Option<&mut Instance> {
        match slot {
            Slot::Current => self.current.as_mut(),
            Slot::Incoming => self.incoming.as_mut(),
            Slot::Retiring(n) => self.retiring.get_mut(n),
        }
    }

    fn take(&mut self, slot: Slot) -> Option<Instance> {
        match slot {
            Slot::Current => self.current.take(),
            Slot::Incoming => self.incoming.take(),
            Slot::Retiring(n) => (n < self.retiring.len()).then(|| self.retiring.remove(n)),
        }
    }

    fn spec_of(&self, v: VersionId) -> &Spec {
        match &self.next {
            Some((nv, s)) if *nv == v => s,
            _ => &self.spec,
        }
    }

    fn arm(&mut self, kind: TimerKind, at: Instant, out: &mut Vec<Action>) -> TimerId {
        let t = TimerId(self.next_timer);
        self.next_timer += 1;
        self.timers.insert(t, kind);
        out.push(Action::Schedule { timer: t, at });
        t
    }

    fn disarm(&mut self, t: TimerId, out: &mut Vec<Action>) {
        if self.timers.remove(&t).is_some() {
            out.push(Action::Cancel(t));
        }
    }

    /// Cancels the instance's timers (all of them, or all but its kill).
    fn disarm_instance(&mut self, id: InstanceId, keep_kill: bool, out: &mut Vec<Action>) {
        let gone: Vec<TimerId> = self
            .timers
            .iter()
            .filter(|(_, k)| k.instance() == Some(id) && !(keep_kill && **k == TimerKind::Kill(id)))
            .map(|(t, _)| *t)
            .collect();
        for t in gone {
            self.disarm(t, out);
        }
    }

    fn cancel_backoff(&mut self, out: &mut Vec<Action>) {
        if let Idle::BackingOff { timer, .. } = self.idle {
            self.disarm(timer, out);
            self.idle = Idle::Exited;
        }
    }

    /// Launches a new current instance of the engine's version.
    fn launch(&mut self, fresh_root: bool, out: &mut Vec<Action>) -> InstanceId {
        let mut id = self.new_instance(self.version);
        id.fresh_root = fresh_root;
        if fresh_root {
            self.fresh_tries = self.fresh_tries.saturating_add(1);
        }
        let respawn = self.respawn_grant();
        out.push(Action::Launch {
            instance: id.id,
            version: self.version,
            fresh_root,
            respawn,
        });
        let iid = id.id;
        self.current = Some(id);
        iid
    }

    /// The grant of a current instance launched now (see [`Respawn`]).
    fn respawn_grant(&self) -> Option<Respawn> {
        let policy = self.spec.restart.policy;
        if policy == RestartPolicy::Never {
            return None;
        }
        let delay = self.backoff.sure_first_restart()?;
        Some(Respawn {
            delay,
            on_clean_exit: policy == RestartPolicy::Always,
        })
    }

    fn new_instance(&mut self, version: VersionId) -> Instance {
        let id = InstanceId(self.next_instance);
        self.next_instance += 1;
        Instance {
            id,
            version,
            pid: None,
            phase: IPhase::Launching,
            launched_at: None,
            probe_failures: vec![0; self.spec_of(version).probes.len()],
            watchdog: None,
            stop: None,
            killed: false,
            fresh_root: false,
            exit_reported: false,
        }
    }

    /// SIGTERM (once there is a process), SIGKILL after `grace`.
    fn begin_stop(
        &mut self,
        now: Instant,
        slot: Slot,
        why: StopWhy,
        grace: Duration,
        out: &mut Vec<Action>,
    ) {
        let Some(i) = self.get(slot) else { return };
        let id = i.id;
        if i.phase == IPhase::Stopping {
            // Already on its way down: only what its exit leads to changes
            // (a stop asked outranks a failure restart).
            if why == StopWhy::Asked || i.stop != Some(StopWhy::Asked) {
                i.stop = Some(why);
            }
            return;
        }
        i.phase = IPhase::Stopping;
        i.stop = Some(why);
        i.watchdog = None;
        let has_pid = i.pid.is_some();
        self.disarm_instance(id, false, out);
        if grace.is_zero() {
            self.kill(slot, out);
            return;
        }
        if has_pid {
            out.push(Action::Terminate { instance: id });
        }
        self.arm(TimerKind::Kill(id), now + grace, out);
    }

    fn kill(&mut self, slot: Slot, out: &mut Vec<Action>) {
        if let Some(i) = self.get(slot) {
            if !i.killed {
                i.killed = true;
                let id = i.id;
                out.push(Action::Kill { instance: id });
            }
        }
    }

    // -- commands -----------------------------------------------------------

    fn start(&mut self, _now: Instant, out: &mut Vec<Action>) {
        self.enabled = true;
        if let Some(i) = &self.current {
            if i.phase == IPhase::Stopping && i.stop == Some(StopWhy::Asked) {
                self.relaunch = true;
            }
            return;
        }
        if self.incoming.is_some() {
            // The old instance died during a reload; the new one is coming.
            return;
        }
        self.cancel_backoff(out);
        self.backoff.reset();
        self.launch(false, out);
    }

    fn stop(&mut self, now: Instant, grace: Option<Duration>, out: &mut Vec<Action>) {
        self.enabled = false;
        self.relaunch = false;
        if let Some(mut inc) = self.incoming.take() {
            // The reload is abandoned: its instance is stopped too.
            let v = self.next.take().map_or(inc.version, |(v, _)| v);
            inc.stop = None;
            self.retiring.push(inc);
            let n = self.retiring.len() - 1;
            let g = grace.unwrap_or(self.spec.stop_grace.0);
            self.begin_stop(now, Slot::Retiring(n), StopWhy::Retire, g, out);
            out.push(Action::Emit(Event::ReloadFailed {
                version: v,
                reason: "stopped".into(),
            }));
        }
        if self.current.is_some() {
            let g = grace.unwrap_or(self.spec.stop_grace.0);
            self.begin_stop(now, Slot::Current, StopWhy::Asked, g, out);
            return;
        }
        if self.idle != Idle::Stopped {
            self.cancel_backoff(out);
            self.idle = Idle::Stopped;
            out.push(Action::Emit(Event::Stopped));
        }
    }

    fn restart(&mut self, now: Instant, out: &mut Vec<Action>) -> Result<(), Refused> {
        if let Some((v, _)) = &self.next {
            return Err(Refused::ReloadInProgress(*v));
        }
        self.enabled = true;
        self.backoff.reset();
        if self.current.is_some() {
            self.relaunch = true;
            let g = self.spec.stop_grace.0;
            self.begin_stop(now, Slot::Current, StopWhy::Asked, g, out);
            return Ok(());
        }
        self.cancel_backoff(out);
        self.launch(false, out);
        Ok(())
    }

    fn reload(
        &mut self,
        now: Instant,
        version: VersionId,
        spec: Spec,
        out: &mut Vec<Action>,
    ) -> Result<(), Refused> {
        if let Some((v, _)) = &self.next {
            return Err(Refused::ReloadInProgress(*v));
        }
        if !self.retiring.is_empty() {
            return Err(Refused::ReloadInProgress(self.version));
        }
        if self
            .current
            .as_ref()
            .is_some_and(|i| matches!(i.phase, IPhase::Respawning { .. }))
        {
            // No engine runs (its shim waits to respawn the old version):
            // as for an engine backing off, the new version starts at once
            // — the shim is ended and a new instance launched.
            self.adopt(version, spec);
            out.push(Action::Emit(Event::Reloaded { version }));
            self.relaunch = true;
            self.begin_stop(now, Slot::Current, StopWhy::Asked, Duration::ZERO, out);
            return Ok(());
        }
        let running = self
            .current
            .as_ref()
            .is_some_and(|i| i.phase != IPhase::Stopping);
        if running {
            // Two instances: the new one starts beside the old one.
            let from = self.version;
            self.next = Some((version, spec));
            let inc = self.new_instance(version);
            // No respawn grant: a reload's instance that ends before it
            // is ready fails the reload.
            out.push(Action::Launch {
                instance: inc.id,
                version,
                fresh_root: false,
                respawn: None,
            });
            self.incoming = Some(inc);
            out.push(Action::Emit(Event::Reloading { from, to: version }));
            return Ok(());
        }
        // Nothing running to keep: the new version replaces the old one at
        // once (a stopping instance's relaunch, if any, uses it).
        self.adopt(version, spec);
        out.push(Action::Emit(Event::Reloaded { version }));
        if self.current.is_none() && self.idle != Idle::Stopped {
            // Exited, gave up or backing off: the tenant wants it running,
            // and a new version is a reason to try again now. A stopped
            // engine stays stopped.
            self.enabled = true;
            self.cancel_backoff(out);
            self.launch(false, out);
        }
        let _ = now;
        Ok(())
    }

    fn adopt(&mut self, version: VersionId, spec: Spec) {
        self.version = version;
        self.backoff = Backoff::new(Schedule::from(&spec.restart));
        self.spec = spec;
    }

    // -- observations -------------------------------------------------------

    fn launched(&mut self, now: Instant, id: InstanceId, pid: u32, out: &mut Vec<Action>) {
        let Some(slot) = self.slot(id) else { return };
        let Some(i) = self.get(slot) else { return };
        if i.pid.is_some() {
            return;
        }
        i.pid = Some(pid);
        i.launched_at = Some(now);
        let version = i.version;
        let phase = i.phase;
        out.push(Action::Emit(Event::Started {
            instance: id,
            pid,
            version,
        }));
        if slot == Slot::Current {
            self.backoff.started(now);
            if self.current.as_ref().is_some_and(|i| i.fresh_root) {
                self.fresh_tries = 0;
            }
        }
        if phase == IPhase::Stopping {
            // Stop asked before the process existed.
            if !self.get(slot).is_some_and(|i| i.killed) {
                out.push(Action::Terminate { instance: id });
            }
            return;
        }
        let hb = self.spec_of(version).heartbeat;
        if hb.enabled {
            if let Some(i) = self.get(slot) {
                i.phase = IPhase::Running;
            }
            self.arm(TimerKind::ReadyTimeout(id), now + hb.ready_timeout.0, out);
        } else {
            self.ready(now, slot, out);
        }
    }

    /// The engine exited and its shim will start it again after the
    /// granted delay: the events of an exit the schedule restarts
    /// (exited, backing-off); the instance's timers end, probe results and
    /// heartbeats are ignored until [`Input::Respawned`].
    fn respawning(&mut self, now: Instant, id: InstanceId, exit: Exit, out: &mut Vec<Action>) {
        let Some(slot) = self.slot(id) else { return };
        let Some(i) = self.get(slot) else { return };
        // Launched is stepped before any report of the instance (a
        // re-adopted one's are read before it, stepped after); one exit
        // per engine.
        if i.pid.is_none() || i.exit_reported {
            return;
        }
        i.exit_reported = true;
        let phase = i.phase;
        out.push(Action::Emit(Event::Exited { instance: id, exit }));
        if exit == Exit::Oom {
            out.push(Action::Emit(Event::OomKilled { instance: id }));
        }
        if slot == Slot::Current {
            self.last_exit = Some(exit);
        }
        if phase == IPhase::Stopping {
            // A stop is on its way: the shim ends without the respawn,
            // or (the stop after the spawn) the new engine gets it.
            return;
        }
        self.disarm_instance(id, false, out);
        if self.incoming.is_some() {
            // During a reload an exit is not restarted: the new version
            // takes over when ready (as without the grant), so the shim
            // is ended now (its report adds no second `exited`).
            self.begin_stop(now, slot, StopWhy::Retire, Duration::ZERO, out);
            return;
        }
        let (delay, attempt, at) = match self.backoff.exited(now) {
            Decision::Restart { delay, attempt, at } => (delay, attempt, at),
            // Not reached: a grant is only given when this exit is sure to
            // restart (`Backoff::sure_first_restart`).
            Decision::GiveUp { .. } => (Duration::ZERO, self.backoff.attempt(), now),
        };
        out.push(Action::Emit(Event::BackingOff { delay, attempt }));
        if let Some(i) = self.get(slot) {
            i.phase = IPhase::Respawning { attempt, delay, at };
            i.launched_at = None;
            i.watchdog = None;
            i.probe_failures.iter_mut().for_each(|f| *f = 0);
        }
    }

    /// The shim is starting the engine again: `restarted`, then `started`
    /// for the same instance and pid, and readiness, probes and the
    /// watchdog as after a launch.
    fn respawned(&mut self, now: Instant, id: InstanceId, out: &mut Vec<Action>) {
        let Some(slot) = self.slot(id) else { return };
        let Some(i) = self.get(slot) else { return };
        let (Some(pid), true) = (i.pid, i.exit_reported) else {
            return;
        };
        i.exit_reported = false;
        let version = i.version;
        match i.phase {
            IPhase::Respawning { attempt, delay, .. } => {
                i.pid = None;
                i.phase = IPhase::Launching;
                self.restarts = self.restarts.saturating_add(1);
                out.push(Action::Emit(Event::Restarted {
                    instance: id,
                    attempt,
                    delay,
                }));
                self.launched(now, id, pid, out);
            }
            // The stop came after the shim's check: the new engine gets it
            // (forwarded) or the kill; said as it is.
            _ => out.push(Action::Emit(Event::Started {
                instance: id,
                pid,
                version,
            })),
        }
    }

    fn ready(&mut self, now: Instant, slot: Slot, out: &mut Vec<Action>) {
        let Some(i) = self.get(slot) else { return };
        i.phase = IPhase::Ready;
        let id = i.id;
        self.disarm_instance(id, false, out);
        out.push(Action::Emit(Event::Ready { instance: id }));
        if slot == Slot::Incoming {
            self.promote(now, out);
        }
        if !find(&self.current, id) {
            return;
        }
        for (n, p) in self.spec.probes.clone().iter().enumerate() {
            self.arm(TimerKind::Probe(id, n), now + p.interval.0, out);
        }
        if let Some(w) = self.spec.heartbeat.watchdog {
            let at = now + w.0;
            if let Some(i) = self.current.as_mut() {
                i.watchdog = Some(at);
            }
            self.arm(TimerKind::Watchdog(id), at, out);
        }
    }

    /// The reload's instance is ready: it becomes current, the old one is
    /// stopped.
    fn promote(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some((version, spec)) = self.next.take() else {
            return;
        };
        let old_grace = self.spec.stop_grace.0;
        let inc = self.incoming.take();
        let old = std::mem::replace(&mut self.current, inc);
        self.adopt(version, spec);
        if let Some(t) = self.current.as_ref().and_then(|i| i.launched_at) {
            self.backoff.started(t);
        }
        if let Some(old) = old {
            self.retiring.push(old);
            let n = self.retiring.len() - 1;
            self.begin_stop(now, Slot::Retiring(n), StopWhy::Retire, old_grace, out);
        }
        out.push(Action::Emit(Event::Reloaded { version }));
    }

    fn heartbeat(&mut self, now: Instant, id: InstanceId, n: Notify, out: &mut Vec<Action>) {
        let Some(slot) = self.slot(id) else { return };
        let Some(phase) = self.get(slot).map(|i| i.phase) else {
            return;
        };
        let watchdog = self.spec.heartbeat.watchdog;
        match (n, phase) {
            (Notify::Ready, IPhase::Running) => self.ready(now, slot, out),
            (Notify::Watchdog, IPhase::Ready) if slot == Slot::Current => {
                if let (Some(w), Some(i)) = (watchdog, self.current.as_mut()) {
                    // The armed timer re-arms itself at the new deadline.
                    i.watchdog = Some(now + w.0);
                }
            }
            _ => {}
        }
    }

    fn probe(&mut self, now: Instant, id: InstanceId, n: usize, ok: bool, out: &mut Vec<Action>) {
        let Some(threshold) = self.spec.probes.get(n).map(|p| p.threshold) else {
            return;
        };
        let Some(i) = self.current.as_mut().filter(|i| i.id == id) else {
            return;
        };
        if i.phase != IPhase::Ready {
            return;
        }
        let Some(f) = i.probe_failures.get_mut(n) else {
            return;
        };
        if ok {
            *f = 0;
            return;
        }
        *f += 1;
        let failures = *f;
        out.push(Action::Emit(Event::ProbeFailed {
            instance: id,
            probe: n,
            failures,
            threshold,
        }));
        if failures >= threshold {
            *f = 0;
            self.fail(now, Failure::Probe { probe: n, failures }, out);
        }
    }

    /// The current instance failed: the spec's `on_failure` plan.
    fn fail(&mut self, now: Instant, failure: Failure, out: &mut Vec<Action>) {
        for a in self.spec.failure_plan(self.reboot_allowed, false) {
            match a {
                FailureAction::Notify => out.push(Action::Emit(Event::Failed { failure })),
                FailureAction::RebootNode => out.push(Action::RebootNode { failure }),
                FailureAction::Restart | FailureAction::Reload => {
                    let fresh_root = a == FailureAction::Reload;
                    let g = self.spec.stop_grace.0;
                    self.begin_stop(now, Slot::Current, StopWhy::Failure { fresh_root }, g, out);
                }
            }
        }
    }

    fn timer(&mut self, now: Instant, t: TimerId, out: &mut Vec<Action>) {
        let Some(kind) = self.timers.remove(&t) else {
            return;
        };
        match kind {
            TimerKind::Restart { fresh_root } => {
                let Idle::BackingOff { timer, delay, .. } = self.idle else {
                    return;
                };
                if timer != t || self.current.is_some() || !self.enabled {
                    return;
                }
                self.idle = Idle::Exited;
                self.restarts = self.restarts.saturating_add(1);
                let instance = self.launch(fresh_root, out);
                out.push(Action::Emit(Event::Restarted {
                    instance,
                    attempt: self.backoff.attempt(),
                    delay,
                }));
            }
            TimerKind::Kill(id) => {
                if let Some(slot) = self.slot(id) {
                    if self.get(slot).is_some_and(|i| !i.killed) {
                        self.kill(slot, out);
                        out.push(Action::Emit(Event::Killed { instance: id }));
                    }
                }
            }
            TimerKind::ReadyTimeout(id) => {
                let Some(slot) = self.slot(id) else { return };
                if !self.get(slot).is_some_and(|i| i.phase == IPhase::Running) {
                    return;
                }
                out.push(Action::Emit(Event::ReadyTimeout { instance: id }));
                if slot == Slot::Incoming {
                    self.reload_failed(now, "no READY=1 within heartbeat.ready_timeout", out);
                } else {
                    self.begin_stop(now, slot, StopWhy::ReadyTimeout, Duration::ZERO, out);
                }
            }
            TimerKind::Watchdog(id) => {
                let Some(i) = self.current.as_ref().filter(|i| i.id == id) else {
                    return;
                };
                let Some(deadline) = i.watchdog else { return };
                if now < deadline {
                    self.arm(TimerKind::Watchdog(id), deadline, out);
                    return;
                }
                if let Some(i) = self.current.as_mut() {
                    i.watchdog = None;
                }
                out.push(Action::Emit(Event::WatchdogExpired { instance: id }));
                self.fail(now, Failure::Watchdog, out);
            }
            TimerKind::Probe(id, n) => {
                let ready = self
                    .current
                    .as_ref()
                    .is_some_and(|i| i.id == id && i.phase == IPhase::Ready);
                let Some(p) = self.spec.probes.get(n).filter(|_| ready) else {
                    return;
                };
                let (timeout, interval) = (p.timeout.0, p.interval.0);
                out.push(Action::RunProbe {
                    instance: id,
                    probe: n,
                    timeout,
                });
                self.arm(TimerKind::Probe(id, n), now + interval, out);
            }
        }
    }

    /// The reload's instance will not be ready: it is killed, the old
    /// version stays.
    fn reload_failed(&mut self, now: Instant, reason: &str, out: &mut Vec<Action>) {
        let Some(mut inc) = self.incoming.take() else {
            return;
        };
        let version = inc.version;
        self.next = None;
        inc.stop = None;
        self.retiring.push(inc);
        let n = self.retiring.len() - 1;
        self.begin_stop(now, Slot::Retiring(n), StopWhy::Retire, Duration::ZERO, out);
        out.push(Action::Emit(Event::ReloadFailed {
            version,
            reason: reason.to_owned(),
        }));
        self.old_version_back(now, out);
    }

    /// After a failed reload: if the old instance died meanwhile, its
    /// version goes through the restart policy as after a failed exit.
    fn old_version_back(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.current.is_none() && self.idle == Idle::Exited && self.enabled {
            self.after_exit(now, false, None, out);
        }
    }

    /// The instance in `slot` ended.
    fn gone(&mut self, now: Instant, slot: Slot, exit: Exit, out: &mut Vec<Action>) {
        let Some(i) = self.take(slot) else { return };
        self.disarm_instance(i.id, false, out);
        if !i.exit_reported {
            out.push(Action::Emit(Event::Exited {
                instance: i.id,
                exit,
            }));
            if exit == Exit::Oom {
                out.push(Action::Emit(Event::OomKilled { instance: i.id }));
            }
        }
        match slot {
            Slot::Retiring(_) => {}
            Slot::Incoming => {
                if !i.exit_reported {
                    self.last_exit = Some(exit);
                }
                let version = i.version;
                self.next = None;
                out.push(Action::Emit(Event::ReloadFailed {
                    version,
                    reason: format!("the new instance ended before it was ready: {exit}"),
                }));
                self.old_version_back(now, out);
            }
            Slot::Current => {
                // The engine's own exit, not how its shim then ended.
                if !i.exit_reported {
                    self.last_exit = Some(exit);
                }
                if self.incoming.is_some() && i.stop != Some(StopWhy::Asked) {
                    // Ended during a reload: the new instance takes over
                    // when ready (or the old version comes back).
                    self.idle = Idle::Exited;
                    return;
                }
                match i.stop {
                    Some(StopWhy::Asked) => {
                        if self.relaunch && self.enabled {
                            self.relaunch = false;
                            self.launch(false, out);
                        } else {
                            self.idle = Idle::Stopped;
                            out.push(Action::Emit(Event::Stopped));
                        }
                    }
                    Some(StopWhy::Failure { fresh_root }) => {
                        self.after_exit(now, false, Some(fresh_root), out)
                    }
                    Some(StopWhy::ReadyTimeout) | Some(StopWhy::Retire) => {
                        self.after_exit(now, false, None, out)
                    }
                    // A fresh root's instance that never started: the
                    // reload again through the backoff, a bounded number
                    // of times, then from the root the engine had.
                    None if i.fresh_root && i.pid.is_none() && self.enabled => {
                        let again = self.fresh_tries < MAX_FRESH_ROOT_TRIES;
                        if !again {
                            self.fresh_tries = 0;
                            out.push(Action::Emit(Event::ImageReloadFailed {
                                instance: i.id,
                                reason: format!(
                                    "{MAX_FRESH_ROOT_TRIES} launches from a fresh root failed in a row; restarting from the previous root"
                                ),
                            }));
                        }
                        self.after_exit(now, false, Some(again), out)
                    }
                    // The shim ended while it waited to respawn (killed
                    // by someone else): the restart the exit already got
                    // from the schedule is made by the agent instead, at
                    // the same time, not counted twice.
                    None if self.enabled => match i.phase {
                        IPhase::Respawning { delay, at, .. } => {
                            let timer = self.arm(
                                TimerKind::Restart { fresh_root: false },
                                at.max(now),
                                out,
                            );
                            self.idle = Idle::BackingOff {
                                timer,
                                delay,
                                fresh_root: false,
                            };
                        }
                        _ => self.after_exit(now, exit.clean(), None, out),
                    },
                    None => self.after_exit(now, exit.clean(), None, out),
                }
            }
        }
    }

    /// After the current instance's exit: restart through the backoff
    /// schedule if the policy (or, with `forced`, the failure plan) wants
    /// it, else leave it exited.
    fn after_exit(
        &mut self,
        now: Instant,
        clean: bool,
        forced: Option<bool>,
        out: &mut Vec<Action>,
    ) {
        self.idle = Idle::Exited;
        let wanted = forced.is_some() || wants_restart(self.spec.restart.policy, clean);
        if !wanted || !self.enabled {
            return;
        }
        match self.backoff.exited(now) {
            Decision::Restart { at, delay, attempt } => {
                let fresh_root = forced.unwrap_or(false);
                let timer = self.arm(TimerKind::Restart { fresh_root }, at, out);
                self.idle = Idle::BackingOff {
                    timer,
                    delay,
                    fresh_root,
                };
                out.push(Action::Emit(Event::BackingOff { delay, attempt }));
            }
            Decision::GiveUp { restarts, within } => {
                self.idle = Idle::GaveUp;
                out.push(Action::Emit(Event::GaveUp { restarts, within }));
                let failure = Failure::GaveUp { restarts, within };
                for a in self.spec.failure_plan(self.reboot_allowed, true) {
                    match a {
                        FailureAction::Notify => out.push(Action::Emit(Event::Failed { failure })),
                        FailureAction::RebootNode => out.push(Action::RebootNode { failure }),
                        FailureAction::Restart | FailureAction::Reload => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
