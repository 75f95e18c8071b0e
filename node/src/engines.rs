//! The tenant's engines as the controller sees them: the commands, the
//! backend trait the engine runtime implements (launcher, supervisors,
//! cgroups), its read-only view, and what stopping every engine reports.
//!
//! State-changing calls go through the controller, one at a time like
//! every other change. Reads (`list`, `status`) go to the runtime's
//! [`EngineView`], which any thread may call: it answers from the runtime's
//! own snapshot and never waits behind a change.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use leasehold_engines::budget::Budget;
use leasehold_engines::cgroup::Usage;
use leasehold_engines::logs::Record;
use leasehold_engines::spec::Spec;
use leasehold_engines::supervisor::{Exit, Phase};
use serde::{Deserialize, Serialize};

use crate::backend::{Failure, FailureKind};

/// Each engine's grace when a destroying change (rotation, assignment over
/// a tenant, release) stops every engine: its own `stop_grace`, at most
/// this. Its data is about to be erased; the change should not wait
/// minutes for it.
pub const ERASE_STOP_GRACE: Duration = Duration::from_secs(5);

/// Longest image reference (a file name in the tenant's image inbox).
pub const MAX_IMAGE_REF: usize = 255;

/// The wait for the answer to an engine command ([`Engines::send`]):
/// the engine's status, `None` for a removal.
pub type EngineAnswer = Box<dyn FnOnce() -> Result<Option<EngineStatus>, Failure> + Send>;

/// Carries `c` out with the one-call methods of `engines` (what
/// [`Engines::send`] does by default).
pub fn carry_out<E: Engines + ?Sized>(
    engines: &mut E,
    c: &EngineCommand,
) -> Result<Option<EngineStatus>, Failure> {
    match c {
        EngineCommand::Deploy { name, image, spec } => engines.deploy(name, image, spec).map(Some),
        EngineCommand::Start { name } => engines.start(name).map(Some),
        EngineCommand::Stop { name, grace } => engines.stop(name, *grace).map(Some),
        EngineCommand::Restart { name } => engines.restart(name).map(Some),
        EngineCommand::Reload { name, image, spec } => engines
            .reload(name, image.as_deref(), spec.as_deref())
            .map(Some),
        EngineCommand::Rm { name } => engines.rm(name).map(|()| None),
    }
}

/// A tenant's engine command.
#[derive(Debug, Clone)]
pub enum EngineCommand {
    /// Deploy a new engine (stopped) from an image archive in the tenant's
    /// inbox, with a validated spec.
    Deploy {
        /// Engine name (the node's name rule).
        name: String,
        /// The image archive's file name in the tenant's inbox.
        image: String,
        /// The spec.
        spec: Box<Spec>,
    },
    /// Start it (a manual start forgets the backoff).
    Start {
        /// Engine name.
        name: String,
    },
    /// Stop it: SIGTERM, SIGKILL after the grace (`None`: the spec's).
    /// Returns once the engine is stopping; `status` shows the rest.
    Stop {
        /// Engine name.
        name: String,
        /// Grace before the kill.
        grace: Option<Duration>,
    },
    /// Stop, then start again.
    Restart {
        /// Engine name.
        name: String,
    },
    /// Run a new image or spec (or a fresh root of the same): the old
    /// instance runs until the new one is ready.
    Reload {
        /// Engine name.
        name: String,
        /// A new image archive (None: the same image).
        image: Option<String>,
        /// A new spec (None: the same spec).
        spec: Option<Box<Spec>>,
    },
    /// Remove a stopped engine (its root; data dirs too).
    Rm {
        /// Engine name.
        name: String,
    },
}

impl EngineCommand {
    /// Short name for logs and `Busy` messages.
    pub fn name(&self) -> &'static str {
        match self {
            EngineCommand::Deploy { .. } => "engine-deploy",
            EngineCommand::Start { .. } => "engine-start",
            EngineCommand::Stop { .. } => "engine-stop",
            EngineCommand::Restart { .. } => "engine-restart",
            EngineCommand::Reload { .. } => "engine-reload",
            EngineCommand::Rm { .. } => "engine-rm",
        }
    }

    /// The engine it names.
    pub fn engine(&self) -> &str {
        match self {
            EngineCommand::Deploy { name, .. }
            | EngineCommand::Start { name }
            | EngineCommand::Stop { name, .. }
            | EngineCommand::Restart { name }
            | EngineCommand::Reload { name, .. }
            | EngineCommand::Rm { name } => name,
        }
    }
}

/// One engine as `ls` and `status` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStatus {
    /// Name.
    pub name: String,
    /// The image archive it runs.
    pub image: String,
    /// Supervision state.
    pub phase: Phase,
    /// Marked to start (started and not stopped since): started again
    /// after a node reboot.
    pub enabled: bool,
    /// Main pid of the current instance.
    pub pid: Option<u32>,
    /// When the current instance exec'd.
    pub started_at: Option<SystemTime>,
    /// Restarts by the supervisor since deploy.
    pub restarts: u32,
    /// How the last instance ended.
    pub last_exit: Option<Exit>,
    /// Each probe of the spec, in order, with its last result.
    pub probes: Vec<EngineProbe>,
    /// Probe runs that had to wait for the node's bound on probe work
    /// (the landlord's `[engines] probe_rate` and `probe_concurrency`),
    /// since the agent started: each started later than its interval
    /// said, or not at all (its instance ended first).
    pub probes_delayed: u64,
    /// What the runtime has to say about it (`reload image: the stored
    /// image "app.tar" is gone from the inbox; running from the previous
    /// root`); empty mostly.
    pub notes: Vec<String>,
    /// How the current instance is confined, as its shim reported it once
    /// confined (`None`: no instance running, or not confined yet).
    pub confinement: Option<Confinement>,
}

/// What an engine's shim reached (its `report.json`): the parts of the
/// confinement that depend on the node's kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// Landlock ABI in force (0: none; the lab's 6.1 reaches 2; the
    /// scopes for abstract unix sockets and signals need 6).
    pub landlock_abi: u32,
    /// The ruleset "full", "partial" (the kernel lacks some of what it
    /// asks for) or "none".
    pub landlock: String,
    /// The seccomp filter is installed.
    pub seccomp: bool,
}

/// One probe as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineProbe {
    /// What it checks: `exec /bin/check`, `tcp 5432`, `http 8080 /healthz`.
    pub probe: String,
    /// Failures in a row (reset by a success and when the threshold acts).
    pub failures: u32,
    /// The last result: healthy or not (`None`: not run yet).
    pub ok: Option<bool>,
    /// What the last run saw (`HTTP status 200`, `exit code 3`, `timed
    /// out after 1s`).
    pub detail: Option<String>,
    /// When the last run ended.
    pub at: Option<SystemTime>,
}

/// An engine `stop_all` could not show stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotStopped {
    /// Engine name.
    pub name: String,
    /// Why (what was read back).
    pub reason: String,
}

/// What stopping every engine did (in the outcome and the erase receipt).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StopReport {
    /// Engines that were running and were read back gone (no process left
    /// in their cgroups), in the order stopped.
    pub stopped: Vec<String>,
    /// Of those, the ones killed after the grace.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub killed: Vec<String>,
    /// Engines not shown stopped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_stopped: Vec<NotStopped>,
    /// The call itself failed (the runtime did not answer): nothing is
    /// known about the engines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StopReport {
    /// Every engine was shown stopped.
    pub fn complete(&self) -> bool {
        self.not_stopped.is_empty() && self.error.is_none()
    }

    /// The warning a destroying change reports when not every engine was
    /// shown stopped before its erase.
    pub fn warning(&self) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(format!(
                "the engines could not be stopped before the erase ({e}); the erase went ahead: the volume's key is gone, whatever still runs can read nothing more from it"
            ));
        }
        if self.not_stopped.is_empty() {
            return None;
        }
        let names: Vec<String> = self
            .not_stopped
            .iter()
            .map(|n| format!("{} ({})", n.name, n.reason))
            .collect();
        Some(format!(
            "engines not shown stopped before the erase: {}; the erase went ahead: the volume's key is gone, whatever still runs can read nothing more from it",
            names.join(", ")
        ))
    }
}

/// What setting the landlord's budget did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetApplied {
    /// The budget now recorded (it stands even if `error` is set).
    pub budget: Budget,
    /// The budget was written on the tenant's cgroup subtree.
    pub written: bool,
    /// Why it could not be written (no cgroup v2 tree for engines yet):
    /// every engine launch writes it first and is refused while it cannot.
    pub error: Option<String>,
    /// How many deployed engines have a limit of their own above the new
    /// budget (a count: the landlord sees no engine names). They keep
    /// running, held by the kernel to the budget.
    pub engines_above: u32,
}

/// Longest name of a corrective rule (`[[health.action]]` names).
pub const MAX_THROTTLE_RULE: usize = 64;
/// Most throttles in force at once (one per rule; rules are at most 16).
pub const MAX_THROTTLES: usize = 16;

/// One corrective throttle in force (docs/health.md, `throttle-engines`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Throttle {
    /// Percent (1..=100) of the budget's CPU (or of the node's CPUs when
    /// the budget sets none) the subtree keeps.
    pub cpu_percent: u8,
    /// When it began, unix seconds.
    pub since: u64,
}

/// The corrective throttles in force on the tenant subtree, by the rule
/// that made each; the lowest percent binds. Empty: none, the budget's
/// `cpu.max` exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Throttles(pub BTreeMap<String, Throttle>);

impl Throttles {
    /// The percent that binds (the lowest), None when none is in force.
    pub fn cpu_percent(&self) -> Option<u8> {
        self.0.values().map(|t| t.cpu_percent).min()
    }

    /// When the earliest in force began.
    pub fn since(&self) -> Option<u64> {
        self.0.values().map(|t| t.since).min()
    }

    /// Checks what a state file or a caller gives: at most
    /// [`MAX_THROTTLES`], rule names of 1 to [`MAX_THROTTLE_RULE`] of
    /// `A-Z a-z 0-9 - _`, percents 1..=100. The message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.0.len() > MAX_THROTTLES {
            return Err(format!(
                "{} throttles, at most {MAX_THROTTLES}",
                self.0.len()
            ));
        }
        for (rule, t) in &self.0 {
            if rule.is_empty()
                || rule.len() > MAX_THROTTLE_RULE
                || !rule
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            {
                return Err(format!(
                    "rule {}: 1 to {MAX_THROTTLE_RULE} of A-Z a-z 0-9 - _",
                    crate::shown(rule)
                ));
            }
            if !(1..=100).contains(&t.cpu_percent) {
                return Err(format!(
                    "{rule}.cpu_percent: {} is outside 1..=100",
                    t.cpu_percent
                ));
            }
        }
        Ok(())
    }
}

/// What setting the corrective throttles did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleApplied {
    /// The throttles now recorded (they stand even if `error` is set).
    pub throttles: Throttles,
    /// The subtree's `cpu.max` they make ("QUOTA PERIOD" or "max PERIOD").
    pub cpu_max: String,
    /// It was written on the tenant's cgroup subtree.
    pub written: bool,
    /// Why it could not be written (every engine launch writes it first).
    pub error: Option<String>,
}

/// The tenant's subtree as the landlord may see it: the budget, counts and
/// the subtree's own cgroup counters (aggregates of every engine; never a
/// name, a per-engine figure, a log or data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantView {
    /// The recorded budget.
    pub budget: Budget,
    /// The budget was written on the subtree (last attempt).
    pub written: bool,
    /// Why it was not.
    pub error: Option<String>,
    /// Engines deployed.
    pub engines: u32,
    /// Engines with a live instance.
    pub running: u32,
    /// The subtree's counters (cpu.stat, memory.current, memory.events,
    /// pids.current, io.stat), or why they cannot be read.
    pub usage: Result<Usage, String>,
    /// Corrective throttles in force (docs/health.md, `throttle-engines`).
    pub throttles: Throttles,
    /// With a throttle in force: the subtree's lowered `cpu.max`.
    pub throttled_cpu_max: Option<String>,
}

/// Most events one [`EngineView::events`] call returns.
pub const MAX_EVENTS_READ: usize = 1000;

/// One supervision event for the tenant (`tenantctl engine events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEvent {
    /// Increasing across the runtime's life and, since it starts from the
    /// clock in microseconds, across agent restarts too: a follower asks
    /// for the events after the last one it saw.
    pub seq: u64,
    /// When, unix milliseconds.
    pub time_ms: u64,
    /// The engine.
    pub engine: String,
    /// `started`, `exited`, `restarted`, `gave-up`, … (docs/engines.md).
    pub kind: String,
    /// One line: exit code or signal, delay, reason.
    pub detail: String,
}

/// Read-only view of the engines, callable from any thread; answers from
/// the runtime's own snapshot and never waits behind a change.
pub trait EngineView: Send + Sync + fmt::Debug + 'static {
    /// Every engine, by name.
    fn list(&self) -> Vec<EngineStatus>;
    /// One engine (None: no such engine).
    fn status(&self, name: &str) -> Option<EngineStatus>;
    /// The last `max_lines` lines (at most
    /// [`leasehold_engines::logs::MAX_READ_LINES`]) of one engine's output
    /// stamped at or after `since_ms`, oldest first. Blocking (reads the
    /// tenant volume): call it off the async threads.
    fn logs(&self, name: &str, since_ms: u64, max_lines: usize) -> Result<Vec<Record>, Failure> {
        let _ = (name, since_ms, max_lines);
        Err(unavailable())
    }
    /// The events kept (the runtime keeps the last few hundred) with a
    /// sequence number above `after`, oldest first, at most `max` (at most
    /// [`MAX_EVENTS_READ`]).
    fn events(&self, after: u64, max: usize) -> Vec<EngineEvent> {
        let _ = (after, max);
        Vec::new()
    }
    /// The tenant's subtree for the landlord: budget, counts, aggregate
    /// usage. Reads a few cgroup files; call it off the async threads.
    fn tenant(&self) -> TenantView {
        TenantView {
            budget: Budget::default(),
            written: false,
            error: None,
            engines: 0,
            running: 0,
            usage: Err(unavailable().message),
            throttles: Throttles::default(),
            throttled_cpu_max: None,
        }
    }
    /// The corrective throttles in force (no cgroup read).
    fn throttles(&self) -> Throttles {
        Throttles::default()
    }
}

/// The engine runtime (launcher, one supervisor per engine, the tenant's
/// cgroup subtree). Every method is blocking and bounded; the state
/// changes return once the supervisor has taken them (a stop returns while
/// the engine is stopping), except [`Engines::stop_all`], which returns
/// only when every engine is shown gone or its bound has passed.
pub trait Engines: Send + 'static {
    /// The landlord's budget on the tenant's cgroup subtree.
    fn budget(&mut self) -> Result<Budget, Failure>;
    /// Records the landlord's budget (atomically) and writes it on the
    /// tenant's subtree. Engines whose own limits are above it keep
    /// running: the kernel holds the subtree to it.
    fn set_budget(&mut self, budget: &Budget) -> Result<BudgetApplied, Failure> {
        let _ = budget;
        Err(unavailable())
    }
    /// Records the corrective throttles in force (atomically; an agent
    /// restart keeps them) and writes the `cpu.max` they make on the
    /// tenant's subtree: the lowest percent of the budget's CPU, the
    /// budget's own value when none is left. Only the subtree is touched.
    fn set_throttles(&mut self, throttles: &Throttles) -> Result<ThrottleApplied, Failure> {
        let _ = throttles;
        Err(unavailable())
    }
    /// Unpacks the image and records the engine, stopped. Refuses a name
    /// in use (`Invalid`).
    fn deploy(&mut self, name: &str, image: &str, spec: &Spec) -> Result<EngineStatus, Failure>;
    /// Starts it (`NotFound` if absent; already running: its status).
    fn start(&mut self, name: &str) -> Result<EngineStatus, Failure>;
    /// Stops it (already stopped: its status).
    fn stop(&mut self, name: &str, grace: Option<Duration>) -> Result<EngineStatus, Failure>;
    /// Stops, then starts it.
    fn restart(&mut self, name: &str) -> Result<EngineStatus, Failure>;
    /// Runs a new image or spec; the old instance runs until the new one is
    /// ready (a reload already running: `Invalid`).
    fn reload(
        &mut self,
        name: &str,
        image: Option<&str>,
        spec: Option<&Spec>,
    ) -> Result<EngineStatus, Failure>;
    /// Removes a stopped engine (running: `Invalid`, stop it first).
    fn rm(&mut self, name: &str) -> Result<(), Failure>;
    /// Sends a tenant's engine command (checked by the controller) and
    /// hands back the wait for its answer, to be waited for off the
    /// controller's thread: the controller goes on with the next change
    /// (the landlord's boundary revert, a release) while an image is
    /// unpacked. Commands are taken in the order they are sent, before a
    /// later `stop_all` or `forget_all`, which refuses those not yet carried
    /// out (said so in their answer) rather than wait for them. `None`:
    /// removed.
    /// Default: carried out here, at once.
    fn send(&mut self, c: &EngineCommand) -> EngineAnswer {
        let r = carry_out(self, c);
        Box::new(move || r)
    }
    /// Stops every engine (SIGTERM; SIGKILL after its grace, at most
    /// `grace`), marks each not to start, and waits until each is read back
    /// gone (no process left in its cgroup) or the bound (`grace` plus the
    /// runtime's kill wait) has passed: those are `not_stopped`.
    fn stop_all(&mut self, grace: Duration) -> Result<StopReport, Failure>;
    /// After an erase: forgets every engine (their images, roots and data
    /// dirs were on the erased volume). Returns how many.
    fn forget_all(&mut self) -> Result<usize, Failure>;
    /// The read-only view.
    fn view(&self) -> Arc<dyn EngineView>;
}

/// The engines backend of a node without an engine runtime: nothing can be
/// deployed, so there is never anything to stop.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEngines;

#[derive(Debug)]
struct NoView;

impl EngineView for NoView {
    fn list(&self) -> Vec<EngineStatus> {
        Vec::new()
    }
    fn status(&self, _name: &str) -> Option<EngineStatus> {
        None
    }
}

fn unavailable() -> Failure {
    Failure::new(
        FailureKind::Unavailable,
        "engines are not available on this node yet (no engine runtime)",
    )
}

impl Engines for NoEngines {
    fn budget(&mut self) -> Result<Budget, Failure> {
        Err(unavailable())
    }
    fn deploy(&mut self, _: &str, _: &str, _: &Spec) -> Result<EngineStatus, Failure> {
        Err(unavailable())
    }
    fn start(&mut self, _: &str) -> Result<EngineStatus, Failure> {
        Err(unavailable())
    }
    fn stop(&mut self, _: &str, _: Option<Duration>) -> Result<EngineStatus, Failure> {
        Err(unavailable())
    }
    fn restart(&mut self, _: &str) -> Result<EngineStatus, Failure> {
        Err(unavailable())
    }
    fn reload(
        &mut self,
        _: &str,
        _: Option<&str>,
        _: Option<&Spec>,
    ) -> Result<EngineStatus, Failure> {
        Err(unavailable())
    }
    fn rm(&mut self, _: &str) -> Result<(), Failure> {
        Err(unavailable())
    }
    fn stop_all(&mut self, _: Duration) -> Result<StopReport, Failure> {
        // Nothing can have been deployed: truthfully, nothing ran.
        Ok(StopReport::default())
    }
    fn forget_all(&mut self) -> Result<usize, Failure> {
        Ok(0)
    }
    fn view(&self) -> Arc<dyn EngineView> {
        Arc::new(NoView)
    }
}
