//! TPM health: a periodic round trip through the key thread, so a TPM the
//! agent lost (a dev swtpm killed, a resource manager gone) shows in
//! `NodeInfo` instead of only in the next key operation's error.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{error, info};

use crate::keys::Keys;

/// A check that has not come back within this time counts as failed (a
/// hung TPM never answers; a long key change ahead of it takes seconds).
const CHECK_DEADLINE: Duration = Duration::from_secs(60);

/// Signed only for the round trip; the signature is thrown away.
const CHECK_DATA: &[u8] = b"leasehold tpm health check";

/// The last check's result, read by `NodeInfo`.
#[derive(Debug, Default)]
pub struct TpmHealth(Mutex<Option<String>>);

impl TpmHealth {
    /// `None` while healthy, else what failed.
    pub fn error(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, now: Option<String>) {
        let mut cur = self.0.lock().unwrap_or_else(|p| p.into_inner());
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
