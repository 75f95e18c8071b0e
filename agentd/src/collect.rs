//! Periodic health collection (docs/health.md, "Periodic collection"):
//! a report every `[health] interval_secs`, so the metrics and the
//! landlord's `FaultsChanged` signal follow the node without a caller.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_dbus_api::{HEALTH_INTERFACE, OBJECT_PATH};
use leasehold_health::{Fault, Monitor, Report, Severity, Source};
use tracing::{info, warn};

/// What makes two reports' faults "the same": severity, source and
/// subject. Messages carry counts and ages (a drift's "12 s ago") that
/// change every report; comparing them would signal every collection.
type FaultKey = (Severity, Source, String);

fn keys(faults: &[Fault]) -> BTreeSet<FaultKey> {
    faults
        .iter()
        .map(|f| (f.severity, f.source, f.subject.clone()))
        .collect()
}

/// Whether `next` must be signalled after `prev` (None: the first
/// collection, the baseline; its state is what `Report` tells).
pub fn changed(prev: Option<&[Fault]>, next: &[Fault]) -> bool {
    prev.is_some_and(|p| keys(p) != keys(next))
}

/// The body of `FaultsChanged`: the worst severity and the faults as
/// JSON (docs/json.md `HealthFault`, worst first).
pub fn signal_body(r: &Report) -> (String, String) {
    (
        r.severity.as_str().to_owned(),
        serde_json::to_string(&r.faults).unwrap_or_else(|_| "[]".into()),
    )
}

/// How long an early report waits after the wake-up: the events of one
/// change (a carrier lost, the addresses going with it) make one report.
const SETTLE: Duration = Duration::from_millis(50);

/// The least time between the starts of an early report and the report
/// before it: a flapping link costs at most two link reads (sysfs, a few
/// milliseconds) a second, whatever its rate.
const EARLY_SPACING: Duration = Duration::from_millis(500);

/// When a report woken early may be taken: `SETTLE` after the wake-up, and
/// not before `EARLY_SPACING` after the previous report started.
fn early_at(woken: Instant, previous: Option<Instant>) -> Instant {
    let settled = woken + SETTLE;
    previous.map_or(settled, |p| settled.max(p + EARLY_SPACING))
}

/// What wakes the collection before its tick: a link event, an NVMe SMART
/// event. Each re-reads its source only (`Monitor::report_only`).
pub struct Wakes {
    /// A carrier or an interface lost or back.
    pub links: Arc<tokio::sync::Notify>,
    /// A disk's SMART state changed (an NVMe event).
    pub smart: Arc<tokio::sync::Notify>,
}

/// Takes a report every `interval` until the runtime stops, and early
/// when one of `wakes` is notified (a link or SMART event: docs/health.md "Periodic
/// collection"); emits
/// `FaultsChanged` on the landlord's health interface when the set of
/// faults changed since the previous collection.
/// Each report then goes to the corrective actions (`crate::actions`).
pub async fn run(
    monitor: Arc<Monitor>,
    interval: Duration,
    wakes: Wakes,
    conn: zbus::Connection,
    actions: Arc<tokio::sync::Mutex<crate::actions::Actions>>,
) {
    let mut ticks = tokio::time::interval(interval);
    // A report can take up to 23 s (smartctl): the next one starts an
    // interval after, never piled up.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev: Option<Vec<Fault>> = None;
    let mut started: Option<Instant> = None;
    loop {
        let only = tokio::select! {
            _ = ticks.tick() => None,
            () = wakes.links.notified() => Some(Source::Net),
            () = wakes.smart.notified() => Some(Source::Smart),
        };
        if only.is_some() {
            let at = early_at(Instant::now(), started);
            tokio::time::sleep_until(at.into()).await;
        }
        let m = monitor.clone();
        let asked = Instant::now();
        started = Some(asked);
        // An event re-reads its source only (the links; the disks); the
        // periodic reports stay on their ticks (the other sources' faults
        // are as old as ever).
        // Rises judged against this loop's own previous report: an
        // on-demand report in between must not take them (review).
        let Ok(report) = tokio::task::spawn_blocking(move || m.collector_report(asked, only)).await
        else {
            warn!("the periodic health report failed (a bug: see above)");
            continue;
        };
        if changed(prev.as_deref(), &report.faults) {
            let (severity, faults) = signal_body(&report);
            info!(
                event = "health-faults-changed",
                severity = %severity,
                faults = report.faults.len(),
                "the node's health faults changed"
            );
            if let Err(e) = conn
                .emit_signal(
                    None::<&str>,
                    OBJECT_PATH,
                    HEALTH_INTERFACE,
                    "FaultsChanged",
                    &(severity, faults),
                )
                .await
            {
                warn!(error = %e, "cannot emit FaultsChanged");
            }
        }
        actions.lock().await.on_report(&report.faults).await;
        prev = Some(report.faults);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(sev: Severity, source: Source, subject: &str, message: &str) -> Fault {
        Fault {
            severity: sev,
            source,
            subject: subject.into(),
            message: message.into(),
        }
    }

    #[test]
    fn early_reports_settle_and_keep_their_spacing() {
        let t = Instant::now();
        assert_eq!(early_at(t, None), t + SETTLE);
        // Long after the previous report: only the settling wait.
        let long_ago = t.checked_sub(Duration::from_secs(60)).unwrap_or(t);
        if long_ago + EARLY_SPACING <= t {
            assert_eq!(early_at(t, Some(long_ago)), t + SETTLE);
        }
        // Right after one: not before the spacing is over.
        assert_eq!(early_at(t, Some(t)), t + EARLY_SPACING);
        let half = t + EARLY_SPACING / 2;
        assert_eq!(early_at(half, Some(t)), t + EARLY_SPACING);
    }

    #[test]
    fn first_collection_is_the_baseline_and_messages_do_not_count() {
        let drift = fault(Severity::Warning, Source::Boundary, "nftables", "5 s ago");
        assert!(!changed(None, std::slice::from_ref(&drift)));
        assert!(changed(Some(&[]), std::slice::from_ref(&drift)));
        let later = fault(Severity::Warning, Source::Boundary, "nftables", "65 s ago");
        assert!(!changed(Some(std::slice::from_ref(&drift)), &[later]));
        let worse = fault(Severity::Critical, Source::Boundary, "nftables", "gone");
        assert!(changed(Some(std::slice::from_ref(&drift)), &[worse]));
        assert!(changed(Some(&[drift]), &[]));
    }

    #[test]
    fn signal_body_is_severity_and_fault_json() {
        let r = Report {
            taken_at: 1,
            severity: Severity::Stuck,
            sources: vec![],
            faults: vec![fault(Severity::Stuck, Source::Tpm, "tpm", "no answer")],
            network: None,
        };
        let (sev, json) = signal_body(&r);
        assert_eq!(sev, "stuck");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["source"], "tpm");
        assert_eq!(v[0]["severity"], "stuck");
    }
}
