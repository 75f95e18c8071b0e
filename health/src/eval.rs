//! Fault evaluation: a pure function of what the sources read and the
//! counters of the previous report.

use std::collections::BTreeMap;

use crate::types::*;

/// Counters from the previous report (corrected memory errors, I/O errors,
/// carrier changes), keyed by source and subject: "rising" means higher
/// than there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baseline(BTreeMap<(Source, String), u64>);

impl Baseline {
    fn rose(&self, next: &mut Baseline, source: Source, subject: &str, now: u64) -> Option<u64> {
        let key = (source, subject.to_owned());
        let before = self.0.get(&key).copied();
        next.0.insert(key, now);
        before.filter(|b| now > *b)
    }
}

/// NVMe `critical_warning` bits (NVMe base specification, SMART / Health
/// Information log, byte 0).
const NVME_WARNINGS: [&str; 6] = [
    "spare capacity below threshold",
    "temperature beyond threshold",
    "reliability degraded (media or internal errors)",
    "media read-only",
    "volatile memory backup failed",
    "persistent memory region read-only",
];

fn c(milli: i64) -> String {
    // Millidegrees to one decimal: 45500 -> "45.5".
    let sign = if milli < 0 { "-" } else { "" };
    let m = milli.unsigned_abs();
    format!("{sign}{}.{}", m / 1000, (m % 1000) / 100)
}

/// The faults in `sources`, worst first, and the counters to compare the
/// next report with. Counters of sources that did not answer are kept.
pub fn evaluate(sources: &[SourceReport], prev: &Baseline) -> (Vec<Fault>, Baseline) {
    let mut next = prev.clone();
    let mut faults = Vec::new();
    for s in sources {
        let mut fault = |severity, subject: &str, message: String| {
            faults.push(Fault {
                severity,
                source: s.source,
                subject: subject.to_owned(),
                message,
            })
        };
        match s.status {
            SourceStatus::Ok | SourceStatus::Disabled => {}
            SourceStatus::Stuck => fault(
                Severity::Stuck,
                s.source.as_str(),
                format!(
                    "no answer within {} ms: nothing is known about it",
                    s.deadline_ms
                ),
            ),
            // Nothing is known about it either: as bad as stuck.
            SourceStatus::Failed => fault(
                Severity::Stuck,
                s.source.as_str(),
                "could not be read: nothing is known about it".into(),
            ),
        }
        for p in &s.problems {
            fault(Severity::Warning, &p.subject, p.message.clone());
        }
        let Some(readings) = &s.readings else {
            continue;
        };
        match readings {
            Readings::Edac(mcs) => {
                for m in mcs {
                    if m.uncorrected > 0 {
                        fault(
                            Severity::Critical,
                            &m.mc,
                            format!("{} uncorrected memory errors since boot", m.uncorrected),
                        );
                    }
                    if let Some(b) = prev.rose(&mut next, s.source, &m.mc, m.corrected) {
                        fault(
                            Severity::Warning,
                            &m.mc,
                            format!(
                                "corrected memory errors rose from {b} to {} since the last report",
                                m.corrected
                            ),
                        );
                    }
                }
            }
            Readings::Hwmon(temps) => {
                for t in temps {
                    let what = match (&t.chip, &t.label) {
                        (Some(n), Some(l)) => format!("{n} {l}"),
                        (Some(n), None) => n.clone(),
                        (None, Some(l)) => l.clone(),
                        (None, None) => t.sensor.clone(),
                    };
                    if let Some(crit) = t.crit_milli_c.filter(|v| t.milli_c >= *v) {
                        fault(
                            Severity::Critical,
                            &t.sensor,
                            format!(
                                "{what}: {} °C, at or above its critical {} °C",
                                c(t.milli_c),
                                c(crit)
                            ),
                        );
                    } else if let Some(max) = t.max_milli_c.filter(|v| t.milli_c >= *v) {
                        fault(
                            Severity::Warning,
                            &t.sensor,
                            format!(
                                "{what}: {} °C, at or above its maximum {} °C",
                                c(t.milli_c),
                                c(max)
                            ),
                        );
                    }
                }
            }
            Readings::Thermal(zones) => {
                for z in zones {
                    // The worst trip point reached decides.
                    let reached = |kind: &str| {
                        z.trips
                            .iter()
                            .filter(|t| t.kind == kind && z.milli_c >= t.milli_c)
                            .map(|t| t.milli_c)
                            .min()
                    };
                    let what = z.kind.as_deref().unwrap_or(&z.zone);
                    if let Some(t) = reached("critical") {
                        fault(
                            Severity::Critical,
                            &z.zone,
                            format!(
                                "{what}: {} °C, at or above its critical trip point {} °C (the kernel shuts down)",
                                c(z.milli_c),
                                c(t)
                            ),
                        );
                    } else if let Some((kind, t)) = ["hot", "passive"]
                        .into_iter()
                        .find_map(|k| reached(k).map(|t| (k, t)))
                    {
                        fault(
                            Severity::Warning,
                            &z.zone,
                            format!(
                                "{what}: {} °C, at or above its {kind} trip point {} °C",
                                c(z.milli_c),
                                c(t)
                            ),
                        );
                    }
                }
            }
            Readings::Block(disks) => {
                for d in disks {
                    let Some(n) = d.io_errors else { continue };
                    let rose = prev.rose(&mut next, s.source, &d.disk, n);
                    if n > 0 {
                        let since = rose
                            .map(|b| format!(", up from {b} at the last report"))
                            .unwrap_or_default();
                        fault(
                            Severity::Warning,
                            &d.disk,
                            format!("{n} I/O errors since boot{since}"),
                        );
                    }
                }
            }
            Readings::Smart(disks) => {
                for d in disks {
                    let why = d.message.as_deref().unwrap_or("no reason given");
                    match d.state {
                        DiskState::Failed => fault(
                            Severity::Critical,
                            &d.disk,
                            "SMART overall health self-assessment FAILED: replace the disk".into(),
                        ),
                        DiskState::Error => fault(Severity::Warning, &d.disk, why.to_owned()),
                        DiskState::Timeout => fault(Severity::Stuck, &d.disk, why.to_owned()),
                        DiskState::Passed | DiskState::Standby | DiskState::Unknown => {}
                    }
                    if let Some(w) = d.critical_warning.filter(|w| *w != 0) {
                        let bits: Vec<&str> = NVME_WARNINGS
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| w & (1 << i) != 0)
                            .map(|(_, s)| *s)
                            .collect();
                        fault(
                            Severity::Critical,
                            &d.disk,
                            format!(
                                "NVMe critical warning 0x{w:02x}: {}",
                                if bits.is_empty() {
                                    "unknown bits".to_owned()
                                } else {
                                    bits.join(", ")
                                }
                            ),
                        );
                    }
                }
            }
            Readings::Net(links) => {
                for l in links {
                    if let Some(n) = l.carrier_changes {
                        if let Some(b) = prev.rose(&mut next, s.source, &l.iface, n) {
                            fault(
                                Severity::Warning,
                                &l.iface,
                                format!(
                                    "link flapped: {} carrier changes since the last report",
                                    n - b
                                ),
                            );
                        }
                    }
                    // Down on purpose (administratively) is not a fault.
                    if l.admin_up && l.carrier == Some(false) {
                        fault(
                            Severity::Warning,
                            &l.iface,
                            format!("link down (no carrier; operstate {})", l.operstate),
                        );
                    }
                }
            }
        }
    }
    faults.sort_by_key(|f| std::cmp::Reverse(f.severity));
    (faults, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(source: Source, status: SourceStatus, readings: Option<Readings>) -> SourceReport {
        SourceReport {
            source,
            status,
            deadline_ms: 2000,
            elapsed_ms: 1,
            readings,
            problems: Vec::new(),
        }
    }

    fn edac(ce: u64, ue: u64) -> Option<Readings> {
        Some(Readings::Edac(vec![EdacMc {
            mc: "mc0".into(),
            corrected: ce,
            uncorrected: ue,
        }]))
    }

    #[test]
    fn stuck_source_is_a_stuck_fault_and_keeps_its_baseline() {
        let (f, b1) = evaluate(
            &[src(Source::Edac, SourceStatus::Ok, edac(5, 0))],
            &Baseline::default(),
        );
        assert!(f.is_empty(), "{f:?}");
        let (f, b2) = evaluate(&[src(Source::Edac, SourceStatus::Stuck, None)], &b1);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Stuck);
        assert_eq!(f[0].subject, "edac");
        assert!(f[0].message.contains("2000 ms"));
        assert_eq!(b2, b1, "nothing read: the counters stay");
        let (f, _) = evaluate(&[src(Source::Edac, SourceStatus::Ok, edac(7, 0))], &b2);
        assert!(f[0].message.contains("rose from 5 to 7"), "{f:?}");
    }

    #[test]
    fn worst_first_and_disabled_is_silent() {
        let (f, _) = evaluate(
            &[
                src(
                    Source::Net,
                    SourceStatus::Ok,
                    Some(Readings::Net(vec![Link {
                        iface: "eth0".into(),
                        operstate: "down".into(),
                        admin_up: true,
                        carrier: Some(false),
                        carrier_changes: None,
                    }])),
                ),
                src(Source::Smart, SourceStatus::Disabled, None),
                src(Source::Edac, SourceStatus::Ok, edac(0, 1)),
                src(Source::Hwmon, SourceStatus::Failed, None),
            ],
            &Baseline::default(),
        );
        let sev: Vec<Severity> = f.iter().map(|f| f.severity).collect();
        assert_eq!(
            sev,
            [Severity::Stuck, Severity::Critical, Severity::Warning]
        );
    }

    #[test]
    fn temperatures_print_in_degrees() {
        assert_eq!(c(45_500), "45.5");
        assert_eq!(c(-1_500), "-1.5");
        assert_eq!(c(100_000), "100.0");
    }
}
