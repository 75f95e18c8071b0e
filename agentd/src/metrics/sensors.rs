//! Sensor readings and the boundary's deny counters as metrics
//! (docs/health.md, "What is exported").
//!
//! Sensor series carry the names the kernel gives (hwmon chip and sensor,
//! thermal zone and type, memory controller, disk): landlord hardware data,
//! never the tenant's (disks are `block/*` entries with a device, never dm
//! mappings such as the tenant's volume; no serial number is read). Each
//! label value is cut to [`MAX_LABEL_CHARS`] characters of printable text,
//! and each source keeps at most [`MAX_SERIES`] items: the rest are counted
//! in `leasehold_health_readings_omitted`. Deny counters are labelled by a
//! fixed class word only (no engine, peer or entry name).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use leasehold_health::{DiskState, Readings, Report, Source, SourceStatus};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Most items one source contributes (per metric family).
pub const MAX_SERIES: usize = 64;
/// Longest label value taken from the kernel (characters).
pub const MAX_LABEL_CHARS: usize = 64;

/// SMART states, one-hot per disk.
const DISK_STATES: [(DiskState, &str); 6] = [
    (DiskState::Passed, "passed"),
    (DiskState::Failed, "failed"),
    (DiskState::Standby, "standby"),
    (DiskState::Unknown, "unknown"),
    (DiskState::Error, "error"),
    (DiskState::Timeout, "timeout"),
];

/// One hwmon temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct HwmonTemp {
    pub chip: String,
    pub sensor: String,
    pub label: String,
    pub celsius: f64,
    pub max_celsius: Option<f64>,
    pub crit_celsius: Option<f64>,
}

/// One disk's SMART answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SmartDisk {
    pub disk: String,
    pub state: &'static str,
    pub temperature_c: Option<i64>,
    pub critical_warning: Option<u64>,
}

/// The readings of one report, bounded, as metric values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sensors {
    pub hwmon: Vec<HwmonTemp>,
    /// (zone, type, °C).
    pub thermal: Vec<(String, String, f64)>,
    /// (controller, corrected, uncorrected).
    pub edac: Vec<(String, u64, u64)>,
    pub smart: Vec<SmartDisk>,
    /// (disk, I/O errors) where the kernel counts them.
    pub block: Vec<(String, u64)>,
    /// Items left out past [`MAX_SERIES`], by source.
    pub omitted: BTreeMap<&'static str, u64>,
}

/// A kernel-given name as a label value: printable characters only (others
/// become `_`), at most [`MAX_LABEL_CHARS`].
pub fn label_value(s: &str) -> String {
    s.chars()
        .take(MAX_LABEL_CHARS)
        .map(|c| if c.is_control() { '_' } else { c })
        .collect()
}

fn celsius(milli: i64) -> f64 {
    // Sensor values are far inside f64's exact integers.
    #[allow(clippy::cast_precision_loss)]
    let v = milli as f64;
    v / 1000.0
}

/// The first [`MAX_SERIES`] of `items`, the rest counted for `source`.
fn capped<'a, T>(
    omitted: &mut BTreeMap<&'static str, u64>,
    source: Source,
    items: &'a [T],
) -> &'a [T] {
    let over = items.len().saturating_sub(MAX_SERIES);
    *omitted.entry(source.as_str()).or_default() += over as u64;
    &items[..items.len().min(MAX_SERIES)]
}

impl Sensors {
    /// The readings of the report's sources that answered.
    pub fn of(report: &Report) -> Self {
        let mut s = Sensors::default();
        for src in &report.sources {
            if src.status != SourceStatus::Ok {
                continue;
            }
            let Some(r) = &src.readings else {
                continue;
            };
            let om = &mut s.omitted;
            match r {
                Readings::Hwmon(v) => {
                    s.hwmon = capped(om, Source::Hwmon, v)
                        .iter()
                        .map(|t| HwmonTemp {
                            chip: label_value(t.chip.as_deref().unwrap_or("")),
                            sensor: label_value(&t.sensor),
                            label: label_value(t.label.as_deref().unwrap_or("")),
                            celsius: celsius(t.milli_c),
                            max_celsius: t.max_milli_c.map(celsius),
                            crit_celsius: t.crit_milli_c.map(celsius),
                        })
                        .collect();
                }
                Readings::Thermal(v) => {
                    s.thermal = capped(om, Source::Thermal, v)
                        .iter()
                        .map(|z| {
                            (
                                label_value(&z.zone),
                                label_value(z.kind.as_deref().unwrap_or("")),
                                celsius(z.milli_c),
                            )
                        })
                        .collect();
                }
                Readings::Edac(v) => {
                    s.edac = capped(om, Source::Edac, v)
                        .iter()
                        .map(|m| (label_value(&m.mc), m.corrected, m.uncorrected))
                        .collect();
                }
                Readings::Smart(v) => {
                    s.smart = capped(om, Source::Smart, v)
                        .iter()
                        .map(|d| SmartDisk {
                            disk: label_value(&d.disk),
                            state: DISK_STATES
                                .iter()
                                .find(|(k, _)| *k == d.state)
                                .map_or("unknown", |(_, n)| n),
                            temperature_c: d.temperature_c,
                            critical_warning: d.critical_warning,
                        })
                        .collect();
                }
                Readings::Block(v) => {
                    // Only disks with a counter are items here.
                    let with: Vec<(String, u64)> = v
                        .iter()
                        .filter_map(|b| Some((label_value(&b.disk), b.io_errors?)))
                        .collect();
                    s.block = capped(om, Source::Block, &with).to_vec();
                }
                _ => {}
            }
        }
        s
    }
}

type Labels = Vec<(&'static str, String)>;

/// Registers the sensor families that have items (an absent source, or
/// one that did not answer, has no series).
pub fn encode(r: &mut Registry, s: &Sensors) {
    if !s.hwmon.is_empty() {
        let temp = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let max = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let crit = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for t in &s.hwmon {
            let l: Labels = vec![
                ("chip", t.chip.clone()),
                ("sensor", t.sensor.clone()),
                ("label", t.label.clone()),
            ];
            temp.get_or_create(&l).set(t.celsius);
            if let Some(v) = t.max_celsius {
                max.get_or_create(&l).set(v);
            }
            if let Some(v) = t.crit_celsius {
                crit.get_or_create(&l).set(v);
            }
        }
        r.register(
            "hwmon_temperature_celsius",
            "Temperature of a hardware monitoring sensor (hwmon tempN_input)",
            temp,
        );
        r.register(
            "hwmon_temperature_max_celsius",
            "The sensor's high limit (tempN_max), where the chip has one",
            max,
        );
        r.register(
            "hwmon_temperature_crit_celsius",
            "The sensor's critical limit (tempN_crit), where the chip has one",
            crit,
        );
    }
    if !s.thermal.is_empty() {
        let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (zone, kind, c) in &s.thermal {
            f.get_or_create(&vec![("zone", zone.clone()), ("type", kind.clone())])
                .set(*c);
        }
        r.register(
            "thermal_zone_temperature_celsius",
            "Temperature of a thermal zone (thermal_zoneN/temp)",
            f,
        );
    }
    if !s.edac.is_empty() {
        let ce = Family::<Labels, Counter>::default();
        let ue = Family::<Labels, Counter>::default();
        for (mc, c, u) in &s.edac {
            let l: Labels = vec![("mc", mc.clone())];
            ce.get_or_create(&l).inc_by(*c);
            ue.get_or_create(&l).inc_by(*u);
        }
        r.register(
            "edac_corrected_errors",
            "Corrected memory errors of a memory controller since boot (EDAC ce_count)",
            ce,
        );
        r.register(
            "edac_uncorrected_errors",
            "Uncorrected memory errors of a memory controller since boot (EDAC ue_count)",
            ue,
        );
    }
    if !s.smart.is_empty() {
        let state = Family::<Labels, Gauge>::default();
        let temp = Family::<Labels, Gauge>::default();
        let warn = Family::<Labels, Gauge>::default();
        for d in &s.smart {
            for (_, name) in DISK_STATES {
                state
                    .get_or_create(&vec![("disk", d.disk.clone()), ("state", name.to_owned())])
                    .set(i64::from(name == d.state));
            }
            let l: Labels = vec![("disk", d.disk.clone())];
            if let Some(t) = d.temperature_c {
                temp.get_or_create(&l).set(t);
            }
            if let Some(w) = d.critical_warning {
                warn.get_or_create(&l)
                    .set(i64::try_from(w).unwrap_or(i64::MAX));
            }
        }
        r.register(
            "disk_smart_state",
            "smartctl's verdict on the disk, one-hot (passed, failed, standby, unknown, error, timeout)",
            state,
        );
        r.register(
            "disk_temperature_celsius",
            "The disk's temperature as smartctl reads it",
            temp,
        );
        r.register(
            "disk_nvme_critical_warning",
            "NVMe critical_warning bits (0: none)",
            warn,
        );
    }
    if !s.block.is_empty() {
        let f = Family::<Labels, Counter>::default();
        for (disk, n) in &s.block {
            f.get_or_create(&vec![("disk", disk.clone())]).inc_by(*n);
        }
        r.register(
            "disk_io_errors",
            "Commands of the disk that ended in an error since boot (device/ioerr_cnt)",
            f,
        );
    }
    let om = Family::<[(&'static str, &'static str); 1], Gauge>::default();
    for src in [
        Source::Hwmon,
        Source::Thermal,
        Source::Edac,
        Source::Smart,
        Source::Block,
    ] {
        let n = s.omitted.get(src.as_str()).copied().unwrap_or(0);
        om.get_or_create(&[("source", src.as_str())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register(
        "health_readings_omitted",
        "Readings of a source left out of these metrics past the per-source cap",
        om,
    );
}

/// Registers the boundary's deny counters: packets and bytes by class,
/// every class listed.
pub fn encode_deny(r: &mut Registry, deny: &[(&'static str, u64, u64)]) {
    let packets = Family::<[(&'static str, &'static str); 1], Counter>::default();
    let bytes = Family::<[(&'static str, &'static str); 1], Counter>::default();
    for (class, p, b) in deny {
        packets.get_or_create(&[("class", *class)]).inc_by(*p);
        bytes.get_or_create(&[("class", *class)]).inc_by(*b);
    }
    r.register(
        "boundary_denied_packets",
        "Packets the boundary's rules dropped or rejected, by rule class (nftables named counters), since the agent started",
        packets,
    );
    r.register("boundary_denied_bytes", "Bytes of those packets", bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_health::{
        BlockIo, DiskHealth, EdacMc, Severity, SourceReport, TempSensor, ThermalZone,
    };

    fn src(source: Source, status: SourceStatus, readings: Readings) -> SourceReport {
        SourceReport {
            source,
            status,
            deadline_ms: 10,
            elapsed_ms: 1,
            readings: Some(readings),
            problems: vec![],
        }
    }

    fn temp(i: usize, label: Option<&str>) -> TempSensor {
        TempSensor {
            sensor: format!("hwmon0/temp{i}"),
            chip: Some("coretemp".into()),
            label: label.map(str::to_owned),
            milli_c: 41_500,
            max_milli_c: (i == 1).then_some(80_000),
            crit_milli_c: (i == 1).then_some(100_000),
        }
    }

    fn report() -> Report {
        let mut hw: Vec<TempSensor> = (1..=70).map(|i| temp(i, None)).collect();
        hw[0].label = Some("Package id 0".into());
        // A driver's odd label: a newline and quotes, and far too long.
        hw[1].label = Some(format!("bad\n\"x\"{}", "y".repeat(200)));
        Report {
            taken_at: 1,
            severity: Severity::Ok,
            sources: vec![
                src(
                    Source::Edac,
                    SourceStatus::Ok,
                    Readings::Edac(vec![EdacMc {
                        mc: "mc0".into(),
                        corrected: 3,
                        uncorrected: 1,
                    }]),
                ),
                src(Source::Hwmon, SourceStatus::Ok, Readings::Hwmon(hw)),
                src(
                    Source::Thermal,
                    SourceStatus::Ok,
                    Readings::Thermal(vec![ThermalZone {
                        zone: "thermal_zone0".into(),
                        kind: Some("acpitz".into()),
                        milli_c: -5_000,
                        trips: vec![],
                    }]),
                ),
                src(
                    Source::Block,
                    SourceStatus::Ok,
                    Readings::Block(vec![
                        BlockIo {
                            disk: "sda".into(),
                            io_errors: Some(7),
                        },
                        BlockIo {
                            disk: "nvme0n1".into(),
                            io_errors: None,
                        },
                    ]),
                ),
                src(
                    Source::Smart,
                    SourceStatus::Ok,
                    Readings::Smart(vec![
                        DiskHealth {
                            disk: "sda".into(),
                            state: DiskState::Passed,
                            critical_warning: None,
                            temperature_c: Some(33),
                            exit_status: Some(0),
                            message: Some("private message".into()),
                        },
                        DiskHealth {
                            disk: "nvme0n1".into(),
                            state: DiskState::Failed,
                            critical_warning: Some(4),
                            temperature_c: None,
                            exit_status: Some(8),
                            message: None,
                        },
                    ]),
                ),
            ],
            faults: vec![],
            network: None,
        }
    }

    fn text(s: &Sensors, deny: Option<&[(&'static str, u64, u64)]>) -> String {
        let mut r = Registry::with_prefix("leasehold");
        encode(&mut r, s);
        if let Some(d) = deny {
            encode_deny(&mut r, d);
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn readings_encode_with_kernel_names_bounded() {
        let s = Sensors::of(&report());
        assert_eq!(s.hwmon.len(), MAX_SERIES);
        assert_eq!(s.omitted["hwmon"], 70 - MAX_SERIES as u64);
        let t = text(&s, None);
        for line in [
            "leasehold_hwmon_temperature_celsius{chip=\"coretemp\",sensor=\"hwmon0/temp1\",label=\"Package id 0\"} 41.5",
            "leasehold_hwmon_temperature_max_celsius{chip=\"coretemp\",sensor=\"hwmon0/temp1\",label=\"Package id 0\"} 80.0",
            "leasehold_hwmon_temperature_crit_celsius{chip=\"coretemp\",sensor=\"hwmon0/temp1\",label=\"Package id 0\"} 100.0",
            "leasehold_hwmon_temperature_celsius{chip=\"coretemp\",sensor=\"hwmon0/temp64\",label=\"\"} 41.5",
            "leasehold_thermal_zone_temperature_celsius{zone=\"thermal_zone0\",type=\"acpitz\"} -5.0",
            "leasehold_edac_corrected_errors_total{mc=\"mc0\"} 3",
            "leasehold_edac_uncorrected_errors_total{mc=\"mc0\"} 1",
            "leasehold_disk_io_errors_total{disk=\"sda\"} 7",
            "leasehold_disk_smart_state{disk=\"sda\",state=\"passed\"} 1",
            "leasehold_disk_smart_state{disk=\"sda\",state=\"failed\"} 0",
            "leasehold_disk_smart_state{disk=\"nvme0n1\",state=\"failed\"} 1",
            "leasehold_disk_temperature_celsius{disk=\"sda\"} 33",
            "leasehold_disk_nvme_critical_warning{disk=\"nvme0n1\"} 4",
            "leasehold_health_readings_omitted{source=\"hwmon\"} 6",
            "leasehold_health_readings_omitted{source=\"smart\"} 0",
            "# TYPE leasehold_edac_corrected_errors_total counter",
            "# TYPE leasehold_disk_io_errors_total counter",
        ] {
            assert!(t.lines().any(|l| l == line), "no {line:?} in\n{t}");
        }
        // Past the cap: not there; limits only where the chip has them; a
        // disk without a counter has no I/O error series; no message.
        assert!(!t.contains("hwmon0/temp65\""), "{t}");
        assert!(!t.contains("max_celsius{chip=\"coretemp\",sensor=\"hwmon0/temp2\""));
        assert!(!t.contains("disk_io_errors_total{disk=\"nvme0n1\"}"), "{t}");
        assert!(!t.contains("private message"), "{t}");
        // The odd label: one line per sample, cut to the bound.
        let odd = t
            .lines()
            .find(|l| l.contains("sensor=\"hwmon0/temp2\"") && !l.starts_with('#'))
            .unwrap();
        assert!(odd.contains("label=\"bad_\\\"x\\\"yyy"), "{odd}");
        assert!(odd.len() < 200, "{odd}");
        for l in t.lines() {
            assert!(l.starts_with('#') || l.starts_with("leasehold_"), "{l:?}");
        }
    }

    #[test]
    fn sources_that_did_not_answer_have_no_series() {
        let mut r = report();
        for s in &mut r.sources {
            s.status = SourceStatus::Stuck;
        }
        let s = Sensors::of(&r);
        assert_eq!(s, Sensors::default());
        let t = text(&s, None);
        for family in ["celsius", "leasehold_edac_", "leasehold_disk_"] {
            assert!(!t.contains(family), "{family} in\n{t}");
        }
        // The omitted counts are listed all the same (0).
        assert!(t.contains("leasehold_health_readings_omitted{source=\"edac\"} 0"));
    }

    #[test]
    fn deny_counters_by_class_only() {
        let d = [("landlord_in", 3, 252), ("engines_out", 2, 120)];
        let t = text(&Sensors::default(), Some(&d));
        for line in [
            "leasehold_boundary_denied_packets_total{class=\"landlord_in\"} 3",
            "leasehold_boundary_denied_bytes_total{class=\"landlord_in\"} 252",
            "leasehold_boundary_denied_packets_total{class=\"engines_out\"} 2",
            "# TYPE leasehold_boundary_denied_packets_total counter",
        ] {
            assert!(t.lines().any(|l| l == line), "no {line:?} in\n{t}");
        }
    }
}
