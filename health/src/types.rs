//! The report: what each source read, and the faults found in it.

use serde::{Deserialize, Serialize};

/// How bad a fault is. `Stuck`: a source (or one disk) did not answer
/// within its deadline, so nothing is known about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Nothing wrong.
    Ok,
    /// Worth a look (corrected errors rising, a link down, a read error).
    Warning,
    /// Act now (uncorrected memory errors, a failing disk, a critical
    /// temperature).
    Critical,
    /// The source did not answer within its deadline.
    Stuck,
}

impl Severity {
    /// The name used in JSON and text.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
            Severity::Stuck => "stuck",
        }
    }
}

/// A sensor source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Memory controllers' error counters (EDAC).
    Edac,
    /// Hardware monitoring chips' temperatures.
    Hwmon,
    /// Thermal zones and their trip points.
    Thermal,
    /// Block devices' I/O error counters.
    Block,
    /// Disk health through `smartctl --json`.
    Smart,
    /// Network interfaces' link state.
    Net,
    /// The agent's own check: the TPM answers a command through the key
    /// thread.
    Tpm,
    /// The agent's own check: its nftables table is in the kernel as it
    /// applied it.
    Boundary,
    /// The agent's own check: the tenant volume is mounted when it should
    /// be.
    Volume,
    /// The agent's own check: the tenant's engines (counts only).
    Engines,
}

impl Source {
    /// Every sensor source, in report order (the agent's own checks,
    /// [`Source::CHECKS`], follow them).
    pub const ALL: [Source; 6] = [
        Source::Edac,
        Source::Hwmon,
        Source::Thermal,
        Source::Block,
        Source::Smart,
        Source::Net,
    ];

    /// The name used in JSON, text and the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Edac => "edac",
            Source::Hwmon => "hwmon",
            Source::Thermal => "thermal",
            Source::Block => "block",
            Source::Smart => "smart",
            Source::Net => "net",
            Source::Tpm => "tpm",
            Source::Boundary => "boundary",
            Source::Volume => "volume",
            Source::Engines => "engines",
        }
    }

    /// The agent's own checks, in report order (after the sensors): run
    /// only by a [`crate::Monitor`] given [`crate::SelfChecks`].
    pub const CHECKS: [Source; 4] = [
        Source::Tpm,
        Source::Boundary,
        Source::Volume,
        Source::Engines,
    ];
}

/// One fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// How bad.
    pub severity: Severity,
    /// Which source found it.
    pub source: Source,
    /// What it is about: `mc0`, `hwmon1/temp2`, `sda`, `eth0`, or the
    /// source's name for the source itself.
    pub subject: String,
    /// What is wrong, for a person.
    pub message: String,
}

/// How a source's read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceStatus {
    /// It returned within its deadline (its readings may still list
    /// problems).
    Ok,
    /// It did not return within its deadline, or its previous read has
    /// not returned yet.
    Stuck,
    /// Turned off in the configuration.
    Disabled,
    /// It could not be started (no thread), or its read ended without an
    /// answer (panicked).
    Failed,
}

/// A reading that could not be made (unreadable file, oversize input, too
/// many entries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// What it is about.
    pub subject: String,
    /// What went wrong (names the file).
    pub message: String,
}

/// One memory controller (`/sys/devices/system/edac/mc/mcN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdacMc {
    /// `mc0`, …
    pub mc: String,
    /// Corrected errors since boot (`ce_count`).
    pub corrected: u64,
    /// Uncorrected errors since boot (`ue_count`).
    pub uncorrected: u64,
}

/// One hwmon temperature (`/sys/class/hwmon/hwmonN/tempM_*`), in
/// millidegrees Celsius as the kernel gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TempSensor {
    /// `hwmon0/temp1`.
    pub sensor: String,
    /// The chip's `name` (`coretemp`, `nvme`, …).
    pub chip: Option<String>,
    /// `tempM_label` (`Package id 0`, …).
    pub label: Option<String>,
    /// `tempM_input`.
    pub milli_c: i64,
    /// `tempM_max`.
    pub max_milli_c: Option<i64>,
    /// `tempM_crit`.
    pub crit_milli_c: Option<i64>,
}

/// One trip point of a thermal zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trip {
    /// `critical`, `hot`, `passive` or `active`.
    pub kind: String,
    /// Its temperature (millidegrees).
    pub milli_c: i64,
}

/// One thermal zone (`/sys/class/thermal/thermal_zoneN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThermalZone {
    /// `thermal_zone0`.
    pub zone: String,
    /// Its `type` (`x86_pkg_temp`, `acpitz`, …).
    pub kind: Option<String>,
    /// `temp` (millidegrees).
    pub milli_c: i64,
    /// Its trip points.
    pub trips: Vec<Trip>,
}

/// One block device's I/O error counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockIo {
    /// `sda`, `nvme0n1`.
    pub disk: String,
    /// `device/ioerr_cnt` (SCSI disks: commands that ended in an error);
    /// absent where the kernel has no such counter.
    pub io_errors: Option<u64>,
}

/// What `smartctl` said about a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    /// The overall self-assessment passed.
    Passed,
    /// The overall self-assessment failed.
    Failed,
    /// Spun down: not woken, not checked (`-n standby`).
    Standby,
    /// smartctl answered but gave no self-assessment.
    Unknown,
    /// smartctl could not check it (not installed, cannot open the device,
    /// output not JSON or too large).
    Error,
    /// smartctl did not finish within the per-disk timeout (killed).
    Timeout,
}

/// One disk's health from `smartctl --json -n standby -H -A`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHealth {
    /// `sda`, `nvme0n1`.
    pub disk: String,
    /// The verdict.
    pub state: DiskState,
    /// NVMe `critical_warning` bits (0: none).
    pub critical_warning: Option<u64>,
    /// Current temperature (°C).
    pub temperature_c: Option<i64>,
    /// smartctl's exit status.
    pub exit_status: Option<i32>,
    /// Why, for `error` and `timeout`; smartctl's message otherwise.
    pub message: Option<String>,
}

/// One network interface (`/sys/class/net/IFACE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// `eth0`.
    pub iface: String,
    /// `operstate` (`up`, `down`, `unknown`, …).
    pub operstate: String,
    /// Administratively up (`flags` & IFF_UP).
    pub admin_up: bool,
    /// `carrier` (absent while the interface is administratively down).
    pub carrier: Option<bool>,
    /// `carrier_changes` since the interface was created.
    pub carrier_changes: Option<u64>,
}

/// The TPM check: one cheap command (`GetRandom`) through the key thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmCheck {
    /// The TPM answered.
    pub answered: bool,
    /// Why not.
    pub error: Option<String>,
}

/// The boundary check: the agent's nftables table as its drift check last
/// found it (that check runs on every foreign nftables commit and on its
/// timer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundaryCheck {
    /// A cluster boundary is stored (so its table should be in the kernel).
    pub stored: bool,
    /// The agent's table is in the kernel.
    pub enforced: bool,
    /// Set elements in the kernel table.
    pub elements: Option<u64>,
    /// Times the table was found changed behind the agent's back since it
    /// started.
    pub drifts: u64,
    /// Seconds since the last such finding (absent: none since start).
    pub last_drift_age_secs: Option<u64>,
    /// Why the last drift could not be undone (absent: it was, or none).
    pub unrepaired: Option<String>,
}

/// The volume check. Nothing of the volume's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeCheck {
    /// `none`, `open`, `closed`, `error`, `working` (being made or
    /// remade).
    pub state: String,
    /// A volume exists and is not being worked on: it should be mounted.
    pub expected: bool,
    /// Its filesystem is in the host's mount table at the mount point.
    pub mounted: bool,
    /// Why it is not open, as the agent recorded it.
    pub error: Option<String>,
}

/// The engines check: counts only, no engine names (the landlord sees no
/// tenant workload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnginesCheck {
    /// Engines deployed.
    pub deployed: u64,
    /// Running (or ready).
    pub running: u64,
    /// Crash-looping: waiting to be restarted after exiting (backing off).
    pub crash_looping: u64,
    /// Given up on after too many restarts.
    pub gave_up: u64,
    /// Supervisor restarts of the deployed engines, summed.
    pub restarts: u64,
    /// Engines whose last run of some probe failed (the tenant's probes:
    /// `exec`, `tcp`, `http`). Absent from older agents' reports: 0.
    #[serde(default)]
    pub probe_failing: u64,
}

/// What a source read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "items", rename_all = "lowercase")]
pub enum Readings {
    /// [`Source::Edac`].
    Edac(Vec<EdacMc>),
    /// [`Source::Hwmon`].
    Hwmon(Vec<TempSensor>),
    /// [`Source::Thermal`].
    Thermal(Vec<ThermalZone>),
    /// [`Source::Block`].
    Block(Vec<BlockIo>),
    /// [`Source::Smart`].
    Smart(Vec<DiskHealth>),
    /// [`Source::Net`].
    Net(Vec<Link>),
    /// [`Source::Tpm`] (one item).
    Tpm(Vec<TpmCheck>),
    /// [`Source::Boundary`] (one item).
    Boundary(Vec<BoundaryCheck>),
    /// [`Source::Volume`] (one item).
    Volume(Vec<VolumeCheck>),
    /// [`Source::Engines`] (one item).
    Engines(Vec<EnginesCheck>),
}

/// One source's part of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceReport {
    /// Which source.
    pub source: Source,
    /// How its read ended.
    pub status: SourceStatus,
    /// Its deadline (ms).
    pub deadline_ms: u64,
    /// How long it took (ms; the deadline when stuck).
    pub elapsed_ms: u64,
    /// What it read (absent unless `ok`).
    pub readings: Option<Readings>,
    /// Readings that could not be made.
    pub problems: Vec<Problem>,
}

/// The health report (`org.leasehold.Health1.Report`, `landlordctl health`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// When it was taken (unix seconds).
    pub taken_at: u64,
    /// The worst fault's severity (`ok` when there is none).
    pub severity: Severity,
    /// Every source, enabled or not.
    pub sources: Vec<SourceReport>,
    /// Every fault, worst first.
    pub faults: Vec<Fault>,
    /// Links, addresses, default routes, leases and recent link events
    /// (rtnetlink); null when the watcher is turned off.
    #[serde(default)]
    pub network: Option<crate::net::Network>,
}
