//! TPM health: a periodic round trip through the key thread, so a TPM the
//! agent lost (a dev swtpm killed, a resource manager gone) shows in
//! `NodeInfo` instead of only in the next key operation's error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{error, info};

use crate::keys::Keys;

/// A check that has not come back within this time counts as failed (a
/// hung TPM never answers; a long key change ahead of it takes seconds).
const CHECK_DEADLINE: Duration = Duration::from_secs(60);

/// Signed only for the round trip; the signature is thrown away.
const CHECK_DATA: &[u8] = b"leasehold tpm health check";

/// The last check's result, read by `NodeInfo`, and the agent's heartbeat
/// for the metrics: when a check last came back answered, and how often
/// checks run (an alert rule compares the two, so a hung key thread or
/// watcher is seen even while the endpoint still answers).
#[derive(Debug, Default)]
pub struct TpmHealth {
    error: Mutex<Option<String>>,
    /// Unix seconds of the last answered check; 0: none yet.
    answered_at: AtomicU64,
    interval_secs: AtomicU64,
}

impl TpmHealth {
    /// `None` while healthy, else what failed.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Unix seconds of the last check the TPM answered, and the checks'
    /// interval in seconds; None before the first answer.
    pub fn heartbeat(&self) -> Option<(u64, u64)> {
        match self.answered_at.load(Ordering::Relaxed) {
            0 => None,
            at => Some((at, self.interval_secs.load(Ordering::Relaxed))),
        }
    }

    fn set(&self, now: Option<String>) {
        if now.is_none() {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.answered_at.store(secs, Ordering::Relaxed);
        }
        let mut cur = self.error.lock().unwrap_or_else(|p| p.into_inner());
        // Log transitions only: one line per outage, not one per check.
        match (&*cur, &now) {
            (None, Some(e)) => error!(error = %e, "the TPM does not answer: reported as unhealthy"),
            (Some(_), None) => info!("the TPM answers again"),
            _ => {}
        }
        *cur = now;
    }
}

/// Checks the TPM every `interval` until the key thread stops.
pub async fn watch(keys: Arc<Keys>, health: Arc<TpmHealth>, interval: Duration) {
    health
        .interval_secs
        .store(interval.as_secs(), Ordering::Relaxed);
    loop {
        let check = keys.call(|k| k.sign(CHECK_DATA).map(|_| ()));
        tokio::pin!(check);
        let result = match tokio::time::timeout(CHECK_DEADLINE, &mut check).await {
            Ok(r) => r,
            Err(_) => {
                health.set(Some(format!(
                    "no answer from the TPM within {} s{}",
                    CHECK_DEADLINE.as_secs(),
                    keys.running_note()
                )));
                check.await
            }
        };
        match result {
            Ok(Ok(())) => health.set(None),
            Ok(Err(e)) => health.set(Some(e.to_string())),
            // The key thread stopped: the agent is shutting down.
            Err(_) => return,
        }
        tokio::time::sleep(interval).await;
    }
}

/// The agent's own checks in the health report (`tpm`, `boundary`,
/// `volume`, `engines`): each reads what the agent already owns. Called
/// on the health monitor's threads, under its deadlines.
pub struct AgentChecks {
    pub keys: Arc<Keys>,
    pub boundaries: Arc<crate::boundary::Boundaries>,
    pub volume: Arc<crate::volume::Volume>,
    pub node: Arc<leasehold_node::Node>,
}

impl leasehold_health::SelfChecks for AgentChecks {
    fn tpm(&self) -> leasehold_health::TpmCheck {
        // Behind whatever the key thread is doing: a hung TPM command
        // makes this check miss its deadline (stuck), as it should.
        let r = self.keys.call_blocking(|k| k.ping());
        let error = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        leasehold_health::TpmCheck {
            answered: error.is_none(),
            error,
        }
    }

    fn stuck_detail(&self, source: leasehold_health::Source) -> Option<String> {
        let (what, took) = match source {
            leasehold_health::Source::Tpm => self.keys.running()?,
            _ => return None,
        };
        Some(format!(
            "the key thread has run one job for {} s: {what}",
            took.as_secs()
        ))
    }

    fn boundary(&self) -> leasehold_health::BoundaryCheck {
        // The drift check's record: it reads the table back on every
        // foreign nftables commit and on its timer, so no second read here
        // (≈1 s of nft at 100k peers).
        let st = self.boundaries.status();
        leasehold_health::BoundaryCheck {
            stored: self.boundaries.has_cluster(),
            enforced: st.enforced.unwrap_or(false),
            elements: st.elements,
            drifts: st.drift_count.unwrap_or(0),
            last_drift_age_secs: st
                .last_drift_at
                .map(|at| crate::boundary::revert::now_unix().saturating_sub(at)),
            unrepaired: st.drift_unrepaired,
        }
    }

    fn volume(&self) -> leasehold_health::VolumeCheck {
        let (meta, rt, _) = match self.volume.status() {
            Ok(parts) => parts,
            Err(e) => {
                return leasehold_health::VolumeCheck {
                    state: "error".into(),
                    expected: true,
                    mounted: false,
                    error: Some(e.to_string()),
                }
            }
        };
        let state = match &meta {
            None => "none",
            Some(_) if rt.working => "working",
            Some(_) if rt.open => "open",
            Some(m)
                if rt.error.is_some()
                    || m.state == leasehold_storage::VolumeState::Initializing =>
            {
                "error"
            }
            Some(_) => "closed",
        };
        leasehold_health::VolumeCheck {
            state: state.into(),
            // A volume exists and nothing is making it: engines and the
            // tenant expect to find it mounted.
            expected: meta.is_some() && !rt.working,
            mounted: meta.is_some() && leasehold_storage::fs::is_mounted(self.volume.mount_point()),
            error: rt.error,
        }
    }

    fn engines(&self) -> leasehold_health::EnginesCheck {
        use leasehold_engines::supervisor::Phase;
        let list = self.node.engines();
        let count = |p: &[Phase]| list.iter().filter(|e| p.contains(&e.phase)).count() as u64;
        leasehold_health::EnginesCheck {
            deployed: list.len() as u64,
            running: count(&[Phase::Running, Phase::Ready]),
            crash_looping: count(&[Phase::BackingOff]),
            gave_up: count(&[Phase::GaveUp]),
            restarts: list.iter().map(|e| u64::from(e.restarts)).sum(),
            probe_failing: list.iter().filter(|e| probe_failing(e)).count() as u64,
        }
    }
}

/// A running engine some probe of which failed its last run. Probes act
/// on running instances only, and their last results outlive the
/// instance: a stopped, exited or given-up engine is not counted (it is in
/// its own count), nor is a probe not run yet.
pub fn probe_failing(e: &leasehold_node::EngineStatus) -> bool {
    use leasehold_engines::supervisor::Phase;
    matches!(e.phase, Phase::Running | Phase::Ready) && e.probes.iter().any(|p| p.ok == Some(false))
}
