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
                    "no answer from the TPM within {} s",
                    CHECK_DEADLINE.as_secs()
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
