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
            Readings::Tpm(checks) => {
                for t in checks.iter().filter(|t| !t.answered) {
                    fault(
                        Severity::Critical,
                        "tpm",
                        format!(
                            "the TPM did not answer: {} (keys, the disk key and quotes are unavailable)",
                            t.error.as_deref().unwrap_or("no reason given")
                        ),
                    );
                }
            }
            Readings::Boundary(checks) => {
                for b in checks {
                    check_boundary(b, &mut fault);
                }
            }
            Readings::Volume(checks) => {
                for v in checks {
                    check_volume(v, &mut fault);
                }
            }
            Readings::Engines(checks) => {
                // Warnings: an engine is the tenant's workload; the node is
                // sound, and no landlord action (a reboot) should follow.
                for e in checks {
                    if e.crash_looping > 0 {
                        fault(
                            Severity::Warning,
                            "engines",
                            format!(
                                "{} of {} engines crash-looping (exited, restarting after a back-off)",
                                e.crash_looping, e.deployed
                            ),
                        );
                    }
                    if e.probe_failing > 0 {
                        fault(
                            Severity::Warning,
                            "engines",
                            format!(
                                "{} of {} engines failing a health probe (the supervisor acts on its threshold)",
                                e.probe_failing, e.deployed
                            ),
                        );
                    }
                    if e.gave_up > 0 {
                        fault(
                            Severity::Warning,
                            "engines",
                            format!(
                                "{} of {} engines given up on after repeated crashes (the tenant must start them)",
                                e.gave_up, e.deployed
                            ),
                        );
                    }
                }
            }
        }
    }
    faults.sort_by_key(|f| std::cmp::Reverse(f.severity));
    (faults, next)
}

/// A drift is reported for this long after it was found (and restored):
/// long enough for a person or a scrape to see it, whichever report comes
/// first (a periodic collection in between does not hide it).
pub const DRIFT_RECENT_SECS: u64 = 3600;

fn check_boundary(b: &BoundaryCheck, fault: &mut impl FnMut(Severity, &str, String)) {
    if b.stored && !b.enforced {
        fault(
            Severity::Critical,
            "nftables",
            "a boundary is stored but the agent's nftables table is not in the kernel: traffic is not filtered as set".into(),
        );
    }
    if let Some(why) = &b.unrepaired {
        fault(
            Severity::Critical,
            "nftables",
            format!(
                "the table was changed behind the agent's back and could not be restored: {why}"
            ),
        );
    } else if let Some(age) = b.last_drift_age_secs.filter(|a| *a < DRIFT_RECENT_SECS) {
        fault(
            Severity::Warning,
            "nftables",
            format!(
                "the table was changed behind the agent's back {age} s ago and restored ({} times since the agent started)",
                b.drifts
            ),
        );
    }
}

fn check_volume(v: &VolumeCheck, fault: &mut impl FnMut(Severity, &str, String)) {
    let why = v
        .error
        .as_deref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    if v.expected && v.state != "open" {
        fault(
            Severity::Critical,
            "volume",
            format!("the tenant volume is {}, not open{why}", v.state),
        );
    } else if v.expected && !v.mounted {
        fault(
            Severity::Critical,
            "volume",
            "the tenant volume is open but its filesystem is not mounted at the mount point".into(),
        );
    }
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

    fn one(source: Source, r: Readings) -> Vec<Fault> {
        evaluate(
            &[src(source, SourceStatus::Ok, Some(r))],
            &Baseline::default(),
        )
        .0
    }

    fn boundary() -> BoundaryCheck {
        BoundaryCheck {
            stored: true,
            enforced: true,
            elements: Some(3),
            drifts: 0,
            last_drift_age_secs: None,
            unrepaired: None,
        }
    }

    #[test]
    fn tpm_check_faults_when_unanswered() {
        let ok = TpmCheck {
            answered: true,
            error: None,
        };
        assert!(one(Source::Tpm, Readings::Tpm(vec![ok])).is_empty());
        let f = one(
            Source::Tpm,
            Readings::Tpm(vec![TpmCheck {
                answered: false,
                error: Some("connection refused".into()),
            }]),
        );
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].severity, f[0].source),
            (Severity::Critical, Source::Tpm)
        );
        assert!(f[0].message.contains("connection refused"), "{f:?}");
    }

    #[test]
    fn boundary_check_drift_unenforced_unrepaired() {
        assert!(one(Source::Boundary, Readings::Boundary(vec![boundary()])).is_empty());
        // No boundary stored: nothing to enforce.
        let none = BoundaryCheck {
            stored: false,
            enforced: false,
            elements: None,
            ..boundary()
        };
        assert!(one(Source::Boundary, Readings::Boundary(vec![none])).is_empty());
        let gone = BoundaryCheck {
            enforced: false,
            ..boundary()
        };
        let f = one(Source::Boundary, Readings::Boundary(vec![gone]));
        assert_eq!(f[0].severity, Severity::Critical);
        assert!(f[0].message.contains("not in the kernel"), "{f:?}");
        let drifted = BoundaryCheck {
            drifts: 2,
            last_drift_age_secs: Some(5),
            ..boundary()
        };
        let f = one(Source::Boundary, Readings::Boundary(vec![drifted.clone()]));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Warning);
        assert!(
            f[0].message.contains("5 s ago and restored (2 times"),
            "{f:?}"
        );
        let old = BoundaryCheck {
            last_drift_age_secs: Some(DRIFT_RECENT_SECS),
            ..drifted.clone()
        };
        assert!(one(Source::Boundary, Readings::Boundary(vec![old])).is_empty());
        let stuck = BoundaryCheck {
            unrepaired: Some("nft: permission denied".into()),
            ..drifted
        };
        let f = one(Source::Boundary, Readings::Boundary(vec![stuck]));
        assert_eq!(f.len(), 1, "the unrepaired drift only: {f:?}");
        assert_eq!(f[0].severity, Severity::Critical);
        assert!(f[0].message.contains("permission denied"), "{f:?}");
    }

    #[test]
    fn volume_check_expected_but_not_mounted() {
        let v = |state: &str, expected, mounted| VolumeCheck {
            state: state.into(),
            expected,
            mounted,
            error: (state == "error").then(|| "no disk key".into()),
        };
        for ok in [
            v("none", false, false),
            v("open", true, true),
            v("working", false, false),
        ] {
            assert!(
                one(Source::Volume, Readings::Volume(vec![ok.clone()])).is_empty(),
                "{ok:?}"
            );
        }
        let f = one(
            Source::Volume,
            Readings::Volume(vec![v("error", true, false)]),
        );
        assert_eq!(f[0].severity, Severity::Critical);
        assert!(
            f[0].message.contains("error, not open: no disk key"),
            "{f:?}"
        );
        let f = one(
            Source::Volume,
            Readings::Volume(vec![v("open", true, false)]),
        );
        assert!(f[0].message.contains("not mounted"), "{f:?}");
    }

    #[test]
    fn engines_check_counts_are_warnings_without_names() {
        let e = EnginesCheck {
            deployed: 4,
            running: 1,
            crash_looping: 2,
            gave_up: 1,
            restarts: 9,
            probe_failing: 3,
        };
        let f = one(Source::Engines, Readings::Engines(vec![e.clone()]));
        assert_eq!(f.len(), 3);
        assert!(f
            .iter()
            .all(|f| f.severity == Severity::Warning && f.subject == "engines"));
        assert!(
            f[0].message.contains("2 of 4 engines crash-looping"),
            "{f:?}"
        );
        assert!(
            f[1].message
                .contains("3 of 4 engines failing a health probe"),
            "{f:?}"
        );
        assert!(f[2].message.contains("1 of 4 engines given up"), "{f:?}");
        let calm = EnginesCheck {
            crash_looping: 0,
            gave_up: 0,
            probe_failing: 0,
            ..e
        };
        assert!(one(Source::Engines, Readings::Engines(vec![calm])).is_empty());
    }

    #[test]
    fn temperatures_print_in_degrees() {
        assert_eq!(c(45_500), "45.5");
        assert_eq!(c(-1_500), "-1.5");
        assert_eq!(c(100_000), "100.0");
    }
}
