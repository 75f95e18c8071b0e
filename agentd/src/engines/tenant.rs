//! The landlord's budget on the tenant's cgroup subtree, and what the
//! landlord may see of that subtree (docs/engines.md, "Budget").
//!
//! The budget is recorded in `<state>/budget.json` (atomically, before the
//! kernel is touched: the record is what every later launch writes) and
//! written on `<subtree>` at start, on every change and before every
//! engine launch, so an engine never runs in a subtree without it (a launch
//! whose budget write fails is refused).

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use leasehold_engines::budget::{self, Budget};
use leasehold_engines::cgroup::{CgroupError, CgroupPath, Cgroups, Controller};
use leasehold_engines::spec::Limits;
use leasehold_node::{BudgetApplied, EngineStatus, TenantView, ThrottleApplied, Throttles};
use serde::{Deserialize, Serialize};

use super::{io, subtree, RuntimeConfig, RuntimeError};

/// The budget's file under the state directory.
pub const BUDGET_FILE: &str = "budget.json";
/// The corrective throttles' file under the state directory.
pub const THROTTLE_FILE: &str = "throttle.json";
/// Largest budget or throttle file read at start (a budget document is at
/// most 4 KiB; 16 throttles are under 2 KiB).
const MAX_FILE: u64 = 64 << 10;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThrottleFile {
    format: u32,
    throttles: Throttles,
}

/// The node's CPUs, the base of a throttle when the budget sets no
/// `cpu_max` (what the agent may run on; at least 1).
pub(super) fn node_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetFile {
    format: u32,
    budget: Budget,
}

/// The budget as recorded, and whether the last write reached the subtree.
#[derive(Debug, Clone, Default)]
struct State {
    budget: Budget,
    throttles: Throttles,
    written: bool,
    error: Option<String>,
}

impl State {
    /// The subtree's files: the budget's, `cpu.max` lowered while a
    /// throttle is in force.
    fn files(&self) -> Vec<(budget::CgroupFile, String)> {
        budget::throttled_budget_files(&self.budget, self.throttles.cpu_percent(), node_cpus())
    }

    fn cpu_max(&self) -> String {
        self.files()
            .into_iter()
            .find(|(f, _)| *f == "cpu.max")
            .map(|(_, v)| v)
            .unwrap_or_default()
    }
}

/// Shared between the runtime thread (which writes the subtree before a
/// launch), the controller's thread (which sets the budget and the
/// throttles here, without waiting for the runtime thread: it may be busy
/// unpacking a tenant's image) and the view (which reads from any thread).
pub(super) struct Shared {
    cgroups: Arc<dyn Cgroups>,
    subtree: Result<CgroupPath, String>,
    state: RwLock<State>,
    cfg: RuntimeConfig,
    /// Held by each record-and-write of the subtree, so writes from both
    /// threads apply in turn, each the state it read.
    write: Mutex<()>,
    /// Each engine's own limits, as the runtime thread last published them.
    limits: RwLock<Vec<Limits>>,
}

impl Shared {
    pub(super) fn new(
        cfg: &RuntimeConfig,
        cgroups: Arc<dyn Cgroups>,
        b: Budget,
        throttles: Throttles,
    ) -> Self {
        Shared {
            cgroups,
            subtree: subtree(cfg).map_err(|e| e.to_string()),
            state: RwLock::new(State {
                budget: b,
                throttles,
                ..State::default()
            }),
            cfg: cfg.clone(),
            write: Mutex::new(()),
            limits: RwLock::new(Vec::new()),
        }
    }

    /// The engines' own limits (the runtime thread, as it publishes).
    pub(super) fn set_engine_limits(&self, limits: Vec<Limits>) {
        *self.limits.write().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    pub(super) fn budget(&self) -> Budget {
        self.state.read().unwrap_or_else(|p| p.into_inner()).budget
    }

    pub(super) fn throttles(&self) -> Throttles {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .throttles
            .clone()
    }

    /// Budget, counts and the subtree's own counters: aggregates only,
    /// whatever `engines` holds (names are dropped here).
    pub(super) fn view(&self, engines: &[EngineStatus]) -> TenantView {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner()).clone();
        let throttled_cpu_max = st.throttles.cpu_percent().map(|_| st.cpu_max());
        let usage = self
            .subtree
            .clone()
            .and_then(|s| self.cgroups.usage(&s).map_err(|e| e.to_string()));
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        TenantView {
            budget: st.budget,
            written: st.written,
            error: st.error,
            engines: count(engines.len()),
            running: count(engines.iter().filter(|e| e.pid.is_some()).count()),
            usage,
            throttled_cpu_max,
            throttles: st.throttles,
        }
    }
}

/// Reads the recorded budget (none recorded: the empty budget). A file
/// that does not parse or holds an invalid budget stops the agent, naming
/// it: guessing would run the tenant without the landlord's limits.
pub(super) fn load(state_dir: &Path) -> Result<Budget, RuntimeError> {
    let path = state_dir.join(BUDGET_FILE);
    let bad = |detail: String| RuntimeError::State {
        path: path.clone(),
        detail,
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Budget::default()),
        Err(e) => return Err(io("read", &path)(e)),
    };
    if !meta.is_file() || meta.len() > MAX_FILE {
        return Err(bad(format!(
            "not a regular file of at most {MAX_FILE} bytes"
        )));
    }
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    let f: BudgetFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if f.format != 1 {
        return Err(bad(format!("unknown format {}", f.format)));
    }
    f.budget.validate().map_err(|e| bad(e.to_string()))?;
    Ok(f.budget)
}

/// Reads the corrective throttles in force (none recorded: none). Like the
/// budget, a file that does not parse stops the agent, naming it: guessing
/// could lift a throttle while its fault persists.
pub(super) fn load_throttles(state_dir: &Path) -> Result<Throttles, RuntimeError> {
    let path = state_dir.join(THROTTLE_FILE);
    let bad = |detail: String| RuntimeError::State {
        path: path.clone(),
        detail,
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Throttles::default()),
        Err(e) => return Err(io("read", &path)(e)),
    };
    if !meta.is_file() || meta.len() > MAX_FILE {
        return Err(bad(format!(
            "not a regular file of at most {MAX_FILE} bytes"
        )));
    }
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    let f: ThrottleFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if f.format != 1 {
        return Err(bad(format!("unknown format {}", f.format)));
    }
    f.throttles.validate().map_err(bad)?;
    Ok(f.throttles)
}

impl Shared {
    fn cg_err(&self) -> impl FnOnce(CgroupError) -> RuntimeError {
        let root = self.cfg.cgroup_root.clone();
        move |source| RuntimeError::Cgroup { root, source }
    }

    /// The tenant's subtree with the budget written on it: the delegated
    /// parent's controllers enabled (the parent is never created), the
    /// subtree created with every controller enabled, then every budget
    /// file written. Records the outcome for the view.
    pub(super) fn tenant_cgroup(&self) -> Result<CgroupPath, RuntimeError> {
        let _turn = self.write.lock().unwrap_or_else(|p| p.into_inner());
        self.tenant_cgroup_held()
    }

    fn tenant_cgroup_held(&self) -> Result<CgroupPath, RuntimeError> {
        let r = self.write_tenant_cgroup();
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        st.written = r.is_ok();
        st.error = r.as_ref().err().map(ToString::to_string);
        r
    }

    fn write_tenant_cgroup(&self) -> Result<CgroupPath, RuntimeError> {
        let sub = subtree(&self.cfg)?;
        if let Some(parent) = sub.as_path().parent().filter(|p| !p.as_os_str().is_empty()) {
            let parent = CgroupPath::new(parent).map_err(self.cg_err())?;
            self.cgroups
                .enable_controllers(&parent, &Controller::ALL)
                .map_err(self.cg_err())?;
        }
        self.cgroups.create(&sub).map_err(self.cg_err())?;
        self.cgroups
            .enable_controllers(&sub, &Controller::ALL)
            .map_err(self.cg_err())?;
        let files = self.state.read().unwrap_or_else(|p| p.into_inner()).files();
        self.cgroups
            .set_limits(&sub, &files)
            .map_err(self.cg_err())?;
        Ok(sub)
    }

    /// The corrective throttles in force: recorded first (atomically: an
    /// agent restart keeps them, so it neither forgets to restore nor
    /// restores while the fault lasts), then the subtree's files written
    /// with `cpu.max` lowered (or the budget's exactly when none is left).
    /// A budget change keeps them: every write of the subtree applies both.
    pub(super) fn set_throttles(&self, t: Throttles) -> Result<ThrottleApplied, RuntimeError> {
        let _turn = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.cfg.state_dir.join(THROTTLE_FILE);
        t.validate().map_err(|detail| RuntimeError::State {
            path: path.clone(),
            detail,
        })?;
        let text = serde_json::to_vec_pretty(&ThrottleFile {
            format: 1,
            throttles: t.clone(),
        })
        .map_err(|e| RuntimeError::State {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        crate::fsutil::write_atomic(&self.cfg.state_dir, THROTTLE_FILE, &text)
            .map_err(io("write", &path))?;
        let cpu_max = {
            let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
            st.throttles = t.clone();
            st.cpu_max()
        };
        let r = self.tenant_cgroup_held();
        Ok(ThrottleApplied {
            throttles: t,
            cpu_max,
            written: r.is_ok(),
            error: r.err().map(|e| e.to_string()),
        })
    }

    /// At start: the recorded budget onto the subtree. A failure is logged
    /// (launches try again and are refused while it fails).
    pub(super) fn write_budget_at_start(&self) {
        match self.tenant_cgroup() {
            Ok(_) => tracing::info!("tenant budget written on the subtree"),
            Err(e) if self.budget() == Budget::default() => {
                tracing::debug!(error = %e, "no tenant budget set; the subtree is not usable yet")
            }
            Err(e) => tracing::warn!(
                error = %e,
                "the tenant budget cannot be written yet; no engine is launched until it is"
            ),
        }
    }

    /// The landlord's new budget: recorded first (atomically), then written
    /// on the subtree. Engines whose own limits are above it are counted,
    /// not stopped: the kernel holds the subtree to it.
    pub(super) fn set_budget(&self, b: Budget) -> Result<BudgetApplied, RuntimeError> {
        let _turn = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.cfg.state_dir.join(BUDGET_FILE);
        let text = serde_json::to_vec_pretty(&BudgetFile {
            format: 1,
            budget: b,
        })
        .map_err(|e| RuntimeError::State {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        crate::fsutil::write_atomic(&self.cfg.state_dir, BUDGET_FILE, &text)
            .map_err(io("write", &path))?;
        self.state.write().unwrap_or_else(|p| p.into_inner()).budget = b;
        let r = self.tenant_cgroup_held();
        let above = self
            .limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| budget::check(l, &b).is_err())
            .count();
        Ok(BudgetApplied {
            budget: b,
            written: r.is_ok(),
            error: r.err().map(|e| e.to_string()),
            engines_above: u32::try_from(above).unwrap_or(u32::MAX),
        })
    }
}
