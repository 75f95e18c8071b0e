//! systemd readiness and watchdog (docs/health.md, "Liveness").
//!
//! `READY=1` once the bus name is owned, `STOPPING=1` when a stop begins,
//! and `WATCHDOG=1` every half of `WATCHDOG_USEC` — but only while the key
//! thread answers a no-op within that half. A hung TPM command (a driver or
//! TPM that never answers) holds the key thread, every key operation
//! queues behind it, and the agent cannot serve: the pings stop and
//! systemd restarts it. Without `NOTIFY_SOCKET` (dev mode, tests) nothing
//! is sent.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{error, info, warn};

use crate::keys::Keys;

/// Tells systemd the agent serves the bus (unit `Type=notify`).
pub fn ready() {
    send(&[NotifyState::Ready], "READY=1");
}

/// Tells systemd the agent is stopping (no restart is waited for).
pub fn stopping() {
    send(&[NotifyState::Stopping], "STOPPING=1");
}

fn send(state: &[NotifyState], what: &str) {
    // The socket is systemd's; a failure is worth a line, not a stop: the
    // agent keeps serving, and systemd's own timeout decides.
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, what, "cannot notify systemd");
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this
/// process: `WATCHDOG_PID`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Pings systemd's watchdog every `interval` (half of `WATCHDOG_USEC`)
/// while the key thread answers a no-op within `interval`; never returns
/// (the task is dropped with the runtime).
pub async fn watchdog(keys: Arc<Keys>, interval: Duration) {
    info!(
        interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        "systemd watchdog on: pinging while the key thread answers"
    );
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The probe still waiting from an earlier tick: a hung key thread is
    // asked once, not once per tick.
    let mut waiting: Option<tokio::sync::oneshot::Receiver<()>> = None;
    let mut hung = false;
    loop {
        ticks.tick().await;
        let mut probe = match waiting.take() {
            Some(p) => p,
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let keys = keys.clone();
                tokio::spawn(async move {
                    if keys.call(|_| ()).await.is_ok() {
                        let _ = tx.send(());
                    }
                });
                rx
            }
        };
        match tokio::time::timeout(interval, &mut probe).await {
            Ok(Ok(())) => {
                if hung {
                    info!("the key thread answers again: watchdog pings resume");
                    hung = false;
                }
                send(&[NotifyState::Watchdog], "WATCHDOG=1");
            }
            Ok(Err(_)) => {
                // The key thread stopped: only during shutdown, which
                // sent STOPPING=1 already.
                return;
            }
            Err(_) => {
                if !hung {
                    error!(
                        bound_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                        "the key thread did not answer a no-op in time: watchdog pings stop (systemd restarts the agent if it stays hung)"
                    );
                    hung = true;
                }
                waiting = Some(probe);
            }
        }
    }
}
