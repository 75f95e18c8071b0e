//! T0: each source against fixture trees made here, a hung smartctl, a hung
//! sysfs read (injected reader), oversize and too-many inputs.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold_health::read::{FsReader, Reader, MAX_FILE_BYTES, MAX_ITEMS};
use leasehold_health::*;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
        };
        fs::create_dir_all(f.sys()).unwrap();
        fs::create_dir_all(f.dev()).unwrap();
        f
    }
    fn sys(&self) -> PathBuf {
        self.dir.path().join("sys")
    }
    fn dev(&self) -> PathBuf {
        self.dir.path().join("dev")
    }
    /// Writes `sys/<rel>` (parents made).
    fn put(&self, rel: &str, text: &str) {
        let p = self.sys().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    fn settings(&self, only: &[Source]) -> Settings {
        Settings {
            roots: Roots {
                sys: self.sys(),
                dev: self.dev(),
            },
            enabled: only.to_vec(),
            deadline: Duration::from_secs(5),
            smart_timeout: Duration::from_secs(5),
            smartctl: self.dir.path().join("no-smartctl"),
            leases_dir: self.dir.path().join("leases"),
        }
    }
}

fn source(r: &Report, s: Source) -> &SourceReport {
    r.sources.iter().find(|x| x.source == s).unwrap()
}

fn faults_of<'a>(r: &'a Report, subject: &str) -> Vec<&'a Fault> {
    r.faults.iter().filter(|f| f.subject == subject).collect()
}

#[test]
fn edac_uncorrected_is_critical_and_corrected_rising_a_warning() {
    let f = Fixture::new();
    f.put("devices/system/edac/mc/mc0/ce_count", "0\n");
    f.put("devices/system/edac/mc/mc0/ue_count", "0\n");
    f.put("devices/system/edac/mc/mc1/ce_count", "4\n");
    f.put("devices/system/edac/mc/mc1/ue_count", "2\n");
    let m = Monitor::new(f.settings(&[Source::Edac]));
    let r = m.report();
    assert_eq!(source(&r, Source::Edac).status, SourceStatus::Ok);
    assert_eq!(
        source(&r, Source::Edac).readings,
        Some(Readings::Edac(vec![
            EdacMc {
                mc: "mc0".into(),
                corrected: 0,
                uncorrected: 0
            },
            EdacMc {
                mc: "mc1".into(),
                corrected: 4,
                uncorrected: 2
            },
        ]))
    );
    assert_eq!(r.severity, Severity::Critical);
    assert_eq!(r.faults.len(), 1, "{:?}", r.faults);
    assert_eq!(r.faults[0].subject, "mc1");
    assert!(r.faults[0].message.contains("2 uncorrected"));
    // Corrected errors: the first report is the baseline; a rise is a warning.
    f.put("devices/system/edac/mc/mc0/ce_count", "3\n");
    let r = m.report();
    let mc0 = faults_of(&r, "mc0");
    assert_eq!(mc0.len(), 1, "{:?}", r.faults);
    assert_eq!(mc0[0].severity, Severity::Warning);
    assert!(mc0[0].message.contains("rose from 0 to 3"), "{mc0:?}");
    // No further rise: no warning.
    assert!(faults_of(&m.report(), "mc0").is_empty());
}

/// A rise seen first by an on-demand report (`landlordctl health`, a
/// scrape) is still a fault of the periodic collector's next report, and
/// only of that one (review: the on-demand report took it, and the
/// collection, its signal and its actions never saw it).
#[test]
fn the_collector_sees_a_rise_an_on_demand_report_saw_first() {
    let f = Fixture::new();
    f.put("devices/system/edac/mc/mc0/ce_count", "0\n");
    f.put("devices/system/edac/mc/mc0/ue_count", "0\n");
    let m = Monitor::new(f.settings(&[Source::Edac]));
    assert!(m.collector_report(Instant::now(), None).faults.is_empty());
    f.put("devices/system/edac/mc/mc0/ce_count", "5\n");
    assert_eq!(faults_of(&m.report(), "mc0").len(), 1, "on demand");
    assert!(faults_of(&m.report(), "mc0").is_empty(), "on demand, again");
    let r = m.collector_report(Instant::now(), None);
    let mc0 = faults_of(&r, "mc0");
    assert_eq!(mc0.len(), 1, "the collector: {:?}", r.faults);
    assert!(mc0[0].message.contains("rose from 0 to 5"), "{mc0:?}");
    assert_eq!(r.severity, Severity::Warning);
    assert!(faults_of(&m.collector_report(Instant::now(), None), "mc0").is_empty());
    // An event's report of one source is judged the same way.
    f.put("devices/system/edac/mc/mc0/ce_count", "6\n");
    assert_eq!(faults_of(&m.report(), "mc0").len(), 1);
    let r = m.collector_report(Instant::now(), Some(Source::Edac));
    assert_eq!(faults_of(&r, "mc0").len(), 1, "{:?}", r.faults);
}

#[test]
fn edac_bad_values_are_problems_naming_the_file() {
    let f = Fixture::new();
    f.put("devices/system/edac/mc/mc0/ce_count", "lots\n");
    f.put("devices/system/edac/mc/mc0/ue_count", "0\n");
    f.put("devices/system/edac/mc/mc1/ce_count", "-1\n");
    f.put("devices/system/edac/mc/mc1/ue_count", "0\n");
    let r = Monitor::new(f.settings(&[Source::Edac])).report();
    let msgs: Vec<&str> = r.faults.iter().map(|f| f.message.as_str()).collect();
    assert_eq!(r.severity, Severity::Warning, "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.contains("mc0/ce_count") && m.contains("\"lots\" is not an integer")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("mc1/ce_count") && m.contains("negative")),
        "{msgs:?}"
    );
}

#[test]
fn no_driver_means_no_readings_and_no_faults() {
    let f = Fixture::new();
    let r = Monitor::new(f.settings(&[Source::Edac, Source::Hwmon, Source::Thermal, Source::Net]))
        .report();
    assert_eq!(r.severity, Severity::Ok, "{:?}", r.faults);
    assert!(r.faults.is_empty());
    assert_eq!(
        source(&r, Source::Edac).readings,
        Some(Readings::Edac(vec![]))
    );
    // Turned off: listed as disabled, not read.
    assert_eq!(source(&r, Source::Smart).status, SourceStatus::Disabled);
    assert_eq!(source(&r, Source::Smart).readings, None);
}

#[test]
fn hwmon_crit_is_critical_max_a_warning() {
    let f = Fixture::new();
    f.put("class/hwmon/hwmon0/name", "coretemp\n");
    f.put("class/hwmon/hwmon0/temp1_input", "45000\n");
    f.put("class/hwmon/hwmon0/temp1_max", "80000\n");
    f.put("class/hwmon/hwmon0/temp1_crit", "100000\n");
    f.put("class/hwmon/hwmon0/temp1_label", "Package id 0\n");
    f.put("class/hwmon/hwmon0/temp2_input", "85500\n");
    f.put("class/hwmon/hwmon0/temp2_max", "80000\n");
    f.put("class/hwmon/hwmon0/temp2_crit", "100000\n");
    f.put("class/hwmon/hwmon1/name", "nvme\n");
    f.put("class/hwmon/hwmon1/temp1_input", "101000\n");
    f.put("class/hwmon/hwmon1/temp1_crit", "100000\n");
    // No limits: read, never judged.
    f.put("class/hwmon/hwmon2/temp1_input", "120000\n");
    let r = Monitor::new(f.settings(&[Source::Hwmon])).report();
    let Some(Readings::Hwmon(t)) = &source(&r, Source::Hwmon).readings else {
        panic!("{r:?}")
    };
    assert_eq!(t.len(), 4);
    assert_eq!(t[0].sensor, "hwmon0/temp1");
    assert_eq!(t[0].chip.as_deref(), Some("coretemp"));
    assert_eq!(t[0].label.as_deref(), Some("Package id 0"));
    assert_eq!(t[0].max_milli_c, Some(80_000));
    assert!(faults_of(&r, "hwmon0/temp1").is_empty());
    let w = faults_of(&r, "hwmon0/temp2");
    assert_eq!(w[0].severity, Severity::Warning);
    assert!(
        w[0].message
            .contains("85.5 °C, at or above its maximum 80.0 °C"),
        "{w:?}"
    );
    let c = faults_of(&r, "hwmon1/temp1");
    assert_eq!(c[0].severity, Severity::Critical);
    assert!(c[0].message.starts_with("nvme: 101.0 °C"), "{c:?}");
    assert!(faults_of(&r, "hwmon2/temp1").is_empty());
    assert_eq!(r.faults[0].severity, Severity::Critical, "worst first");
}

#[test]
fn thermal_trip_points_decide() {
    let f = Fixture::new();
    let zone = |n: u32, temp: &str, trips: &[(&str, &str)]| {
        let d = format!("class/thermal/thermal_zone{n}");
        f.put(&format!("{d}/type"), "acpitz\n");
        f.put(&format!("{d}/temp"), temp);
        for (i, (kind, t)) in trips.iter().enumerate() {
            f.put(&format!("{d}/trip_point_{i}_type"), kind);
            f.put(&format!("{d}/trip_point_{i}_temp"), t);
        }
    };
    zone(0, "40000", &[("passive", "90000"), ("critical", "105000")]);
    zone(1, "95000", &[("passive", "90000"), ("critical", "105000")]);
    zone(2, "106000", &[("hot", "95000"), ("critical", "105000")]);
    // cooling devices live in the same directory: not zones.
    f.put("class/thermal/cooling_device0/type", "Processor\n");
    let r = Monitor::new(f.settings(&[Source::Thermal])).report();
    let Some(Readings::Thermal(z)) = &source(&r, Source::Thermal).readings else {
        panic!("{r:?}")
    };
    assert_eq!(z.len(), 3);
    assert_eq!(z[0].trips.len(), 2);
    assert!(faults_of(&r, "thermal_zone0").is_empty());
    let w = faults_of(&r, "thermal_zone1");
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].severity, Severity::Warning);
    assert!(w[0].message.contains("passive trip point 90.0 °C"), "{w:?}");
    let c = faults_of(&r, "thermal_zone2");
    assert_eq!(c.len(), 1, "the worst trip point only");
    assert_eq!(c[0].severity, Severity::Critical);
}

#[test]
fn block_io_errors_of_disks_only() {
    let f = Fixture::new();
    f.put("block/sda/device/ioerr_cnt", "0x3\n");
    f.put("block/sdb/device/ioerr_cnt", "0x0\n");
    f.put("block/nvme0n1/device/model", "x\n");
    f.put("block/loop0/size", "0\n");
    let m = Monitor::new(f.settings(&[Source::Block]));
    let r = m.report();
    assert_eq!(
        source(&r, Source::Block).readings,
        Some(Readings::Block(vec![
            BlockIo {
                disk: "nvme0n1".into(),
                io_errors: None
            },
            BlockIo {
                disk: "sda".into(),
                io_errors: Some(3)
            },
            BlockIo {
                disk: "sdb".into(),
                io_errors: Some(0)
            },
        ]))
    );
    let w = faults_of(&r, "sda");
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].severity, Severity::Warning);
    assert_eq!(w[0].message, "3 I/O errors since boot");
    f.put("block/sda/device/ioerr_cnt", "0x5\n");
    let w = m.report();
    assert!(
        faults_of(&w, "sda")[0].message.contains("up from 3"),
        "{w:?}"
    );
}

#[test]
fn net_link_down_and_flaps() {
    let f = Fixture::new();
    let link = |name: &str, oper: &str, flags: &str, carrier: Option<&str>, changes: &str| {
        let d = format!("class/net/{name}");
        f.put(&format!("{d}/operstate"), oper);
        f.put(&format!("{d}/flags"), flags);
        if let Some(c) = carrier {
            f.put(&format!("{d}/carrier"), c);
        }
        f.put(&format!("{d}/carrier_changes"), changes);
    };
    link("lo", "unknown", "0x9", Some("1"), "0");
    link("eth0", "up", "0x1003", Some("1"), "2");
    link("eth1", "down", "0x1003", Some("0"), "1");
    link("eth2", "down", "0x1002", None, "0");
    f.put("class/net/bonding_masters", "\n");
    let m = Monitor::new(f.settings(&[Source::Net]));
    let r = m.report();
    let Some(Readings::Net(l)) = &source(&r, Source::Net).readings else {
        panic!("{r:?}")
    };
    let names: Vec<&str> = l.iter().map(|l| l.iface.as_str()).collect();
    assert_eq!(names, ["eth0", "eth1", "eth2"], "no lo, no bonding_masters");
    assert!(l[0].admin_up && l[0].carrier == Some(true));
    assert!(!l[2].admin_up && l[2].carrier.is_none());
    assert_eq!(r.faults.len(), 1, "{:?}", r.faults);
    assert_eq!(r.faults[0].subject, "eth1");
    assert!(r.faults[0].message.contains("link down"));
    // eth0 flapped between two reports.
    f.put("class/net/eth0/carrier_changes", "6");
    let r = m.report();
    let w = faults_of(&r, "eth0");
    assert_eq!(w.len(), 1);
    assert!(w[0].message.contains("4 carrier changes"), "{w:?}");
}

#[test]
fn oversize_file_is_a_problem_naming_it() {
    let f = Fixture::new();
    f.put(
        "devices/system/edac/mc/mc0/ce_count",
        &"1".repeat(MAX_FILE_BYTES + 1),
    );
    f.put("devices/system/edac/mc/mc0/ue_count", "0");
    let r = Monitor::new(f.settings(&[Source::Edac])).report();
    assert_eq!(r.faults.len(), 1, "{:?}", r.faults);
    assert_eq!(r.faults[0].severity, Severity::Warning);
    assert!(
        r.faults[0]
            .message
            .contains("mc0/ce_count: larger than 4096 bytes"),
        "{:?}",
        r.faults
    );
}

#[test]
fn too_many_entries_are_cut_and_said() {
    let f = Fixture::new();
    for i in 0..MAX_ITEMS + 4 {
        f.put(&format!("devices/system/edac/mc/mc{i}/ce_count"), "0");
        f.put(&format!("devices/system/edac/mc/mc{i}/ue_count"), "0");
    }
    let r = Monitor::new(f.settings(&[Source::Edac])).report();
    let Some(Readings::Edac(mcs)) = &source(&r, Source::Edac).readings else {
        panic!()
    };
    assert_eq!(mcs.len(), MAX_ITEMS);
    assert_eq!(mcs[10].mc, "mc10", "natural order");
    assert!(
        r.faults
            .iter()
            .any(|f| f.message.contains("more than 256 mc* entries")),
        "{:?}",
        r.faults
    );
}

/// Blocks every read under a path containing `trap` until released.
struct HangingReader {
    trap: &'static str,
    release: Mutex<mpsc::Receiver<()>>,
}

impl Reader for HangingReader {
    fn read(&self, path: &Path, limit: usize) -> io::Result<Vec<u8>> {
        if path.to_string_lossy().contains(self.trap) {
            let _ = self.release.lock().unwrap().recv();
        }
        FsReader.read(path, limit)
    }
    fn list(&self, dir: &Path, limit: usize) -> io::Result<Vec<String>> {
        FsReader.list(dir, limit)
    }
    fn exists(&self, path: &Path) -> bool {
        FsReader.exists(path)
    }
}

#[test]
fn hung_sysfs_read_is_stuck_and_blocks_nothing_else() {
    let f = Fixture::new();
    f.put("devices/system/edac/mc/mc0/ce_count", "0");
    f.put("devices/system/edac/mc/mc0/ue_count", "0");
    f.put("class/hwmon/hwmon0/temp1_input", "40000");
    f.put("class/net/eth0/operstate", "up");
    f.put("class/net/eth0/flags", "0x1003");
    f.put("class/net/eth0/carrier", "1");
    let (release, rx) = mpsc::channel();
    let reader = Arc::new(HangingReader {
        trap: "edac/mc/mc0",
        release: Mutex::new(rx),
    });
    let mut s = f.settings(&[Source::Edac, Source::Hwmon, Source::Net]);
    s.deadline = Duration::from_millis(300);
    let m = Monitor::with_reader(s, reader);
    let t = Instant::now();
    let r = m.report();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(
        took < Duration::from_secs(2),
        "bounded by the deadline: {took:?}"
    );
    assert_eq!(source(&r, Source::Edac).status, SourceStatus::Stuck);
    assert_eq!(source(&r, Source::Hwmon).status, SourceStatus::Ok);
    assert_eq!(source(&r, Source::Net).status, SourceStatus::Ok);
    assert_eq!(r.severity, Severity::Stuck);
    assert_eq!(r.faults.len(), 1, "{:?}", r.faults);
    assert_eq!(r.faults[0].source, Source::Edac);
    assert!(r.faults[0].message.contains("no answer within 300 ms"));

    // Still hung: not started again (no second thread piles up), stuck at once.
    let t = Instant::now();
    let r = m.report();
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let e = source(&r, Source::Edac);
    assert_eq!(e.status, SourceStatus::Stuck);
    assert!(e.problems[0]
        .message
        .contains("previous read has not returned"));

    // Released: the old thread finishes; the next report reads it again.
    // Until the old thread has cleared its flag, a report says at once that
    // the previous read has not returned (no wait): ask until it has.
    drop(release);
    let mut r = m.report();
    for _ in 0..10_000 {
        let e = source(&r, Source::Edac);
        if e.status == SourceStatus::Ok {
            break;
        }
        assert!(
            e.problems[0]
                .message
                .contains("previous read has not returned"),
            "{e:?}"
        );
        std::thread::yield_now();
        r = m.report();
    }
    assert_eq!(source(&r, Source::Edac).status, SourceStatus::Ok, "{r:?}");
    assert_eq!(r.severity, Severity::Ok, "{:?}", r.faults);
}

const PASSED: &str = r#"{"smartctl":{"version":[7,3],"exit_status":0},"device":{"name":"/dev/sda"},"smart_status":{"passed":true},"temperature":{"current":34}}"#;
const NVME_WARN: &str = r#"{"smartctl":{"exit_status":0},"smart_status":{"passed":true,"nvme":{"value":4}},"nvme_smart_health_information_log":{"critical_warning":4,"temperature":51},"temperature":{"current":51}}"#;
const FAILING: &str = r#"{"smartctl":{"exit_status":8},"smart_status":{"passed":false},"temperature":{"current":40}}"#;
const STANDBY: &str = r#"{"smartctl":{"exit_status":2,"messages":[{"string":"Device is in STANDBY mode, exit(2)","severity":"information"}]}}"#;
const NO_OPEN: &str = r#"{"smartctl":{"exit_status":2,"messages":[{"string":"Smartctl open device: /dev/sdx failed: No such device","severity":"error"}]}}"#;

/// A fake smartctl: prints `<dir>/<disk>.json`, exits with
/// `<dir>/<disk>.code`; hangs (with a child holding its stdout) where
/// `<disk>.hang` exists; prints 2 MiB where `<disk>.big` exists.
fn fake_smartctl(f: &Fixture) -> PathBuf {
    let dir = f.dir.path().join("smart");
    fs::create_dir_all(&dir).unwrap();
    let script = f.dir.path().join("smartctl");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             [ \"$1 $2 $3 $4 $5\" = \"--json -n standby -H -A\" ] || {{ echo bad args >&2; exit 1; }}\n\
             d=$(basename \"$6\")\n\
             if [ -e {dir}/$d.hang ]; then sleep 1000; fi\n\
             if [ -e {dir}/$d.big ]; then head -c 2097152 /dev/zero; exit 0; fi\n\
             cat {dir}/$d.json\n\
             exit $(cat {dir}/$d.code)\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn smart_disk(f: &Fixture, disk: &str, json: &str, code: i32) {
    f.put(&format!("block/{disk}/device/model"), "fixture");
    let dir = f.dir.path().join("smart");
    fs::write(dir.join(format!("{disk}.json")), json).unwrap();
    fs::write(dir.join(format!("{disk}.code")), code.to_string()).unwrap();
}

fn disk<'a>(r: &'a Report, name: &str) -> &'a DiskHealth {
    let Some(Readings::Smart(d)) = &source(r, Source::Smart).readings else {
        panic!("{r:?}")
    };
    d.iter().find(|d| d.disk == name).unwrap()
}

#[test]
fn smartctl_verdicts_from_fixture_json() {
    let f = Fixture::new();
    let mut s = f.settings(&[Source::Smart]);
    s.smartctl = fake_smartctl(&f);
    smart_disk(&f, "sda", PASSED, 0);
    smart_disk(&f, "nvme0n1", NVME_WARN, 0);
    smart_disk(&f, "sdb", FAILING, 8);
    smart_disk(&f, "sdc", STANDBY, 2);
    smart_disk(&f, "sdd", NO_OPEN, 2);
    smart_disk(&f, "sde", "not json", 0);
    let r = Monitor::new(s).report();
    let sda = disk(&r, "sda");
    assert_eq!(sda.state, DiskState::Passed);
    assert_eq!(sda.temperature_c, Some(34));
    assert!(faults_of(&r, "sda").is_empty());
    let nvme = faults_of(&r, "nvme0n1");
    assert_eq!(nvme.len(), 1, "{nvme:?}");
    assert_eq!(nvme[0].severity, Severity::Critical);
    assert!(
        nvme[0].message.contains("0x04: reliability degraded"),
        "{nvme:?}"
    );
    assert_eq!(disk(&r, "sdb").state, DiskState::Failed);
    assert_eq!(faults_of(&r, "sdb")[0].severity, Severity::Critical);
    assert_eq!(disk(&r, "sdc").state, DiskState::Standby);
    assert!(
        faults_of(&r, "sdc").is_empty(),
        "a standby disk is not a fault"
    );
    assert_eq!(disk(&r, "sdd").state, DiskState::Error);
    let w = faults_of(&r, "sdd");
    assert_eq!(w[0].severity, Severity::Warning);
    assert!(w[0].message.contains("open device"), "{w:?}");
    assert_eq!(disk(&r, "sde").state, DiskState::Error);
    assert!(disk(&r, "sde")
        .message
        .as_deref()
        .unwrap()
        .contains("not its JSON"));
}

#[test]
fn hung_smartctl_is_killed_at_its_timeout_others_answer() {
    let f = Fixture::new();
    let mut s = f.settings(&[Source::Smart]);
    s.smartctl = fake_smartctl(&f);
    s.smart_timeout = Duration::from_millis(500);
    smart_disk(&f, "sda", PASSED, 0);
    smart_disk(&f, "sdb", PASSED, 0);
    fs::write(f.dir.path().join("smart/sdb.hang"), "").unwrap();
    smart_disk(&f, "sdc", PASSED, 0);
    fs::write(f.dir.path().join("smart/sdc.big"), "").unwrap();
    let t = Instant::now();
    let r = Monitor::new(s).report();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(source(&r, Source::Smart).status, SourceStatus::Ok);
    assert_eq!(disk(&r, "sda").state, DiskState::Passed);
    assert_eq!(disk(&r, "sdb").state, DiskState::Timeout);
    let stuck = faults_of(&r, "sdb");
    assert_eq!(stuck[0].severity, Severity::Stuck);
    assert!(
        stuck[0].message.contains("within 500 ms; killed"),
        "{stuck:?}"
    );
    let big = disk(&r, "sdc");
    assert_eq!(big.state, DiskState::Error);
    assert!(
        big.message
            .as_deref()
            .unwrap()
            .contains("more than 1048576 bytes"),
        "{big:?}"
    );
    assert_eq!(r.severity, Severity::Stuck);
}

#[test]
fn missing_smartctl_is_a_warning_per_disk() {
    let f = Fixture::new();
    f.put("block/sda/device/model", "x");
    let r = Monitor::new(f.settings(&[Source::Smart])).report();
    let w = faults_of(&r, "sda");
    assert_eq!(w[0].severity, Severity::Warning);
    assert!(w[0].message.contains("cannot run"), "{w:?}");
    assert!(w[0].message.contains("no-smartctl"), "{w:?}");
}

#[test]
fn report_json_shape() {
    let f = Fixture::new();
    f.put("devices/system/edac/mc/mc0/ce_count", "0");
    f.put("devices/system/edac/mc/mc0/ue_count", "1");
    let r = Monitor::new(f.settings(&[Source::Edac])).report();
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["severity"], "critical");
    assert_eq!(v["faults"][0]["source"], "edac");
    assert_eq!(v["faults"][0]["subject"], "mc0");
    assert_eq!(v["sources"][0]["source"], "edac");
    assert_eq!(v["sources"][0]["status"], "ok");
    assert_eq!(v["sources"][0]["readings"]["kind"], "edac");
    assert_eq!(v["sources"][0]["readings"]["items"][0]["uncorrected"], 1);
    assert_eq!(v["sources"].as_array().unwrap().len(), 6);
    let back: Report = serde_json::from_value(v).unwrap();
    assert_eq!(back, r);
}

/// Counts reads of files under a path containing `watch`, each taking
/// until released (like a slow sysfs).
struct SlowReader {
    watch: &'static str,
    reads: std::sync::atomic::AtomicUsize,
    release: Mutex<mpsc::Receiver<()>>,
}

impl Reader for SlowReader {
    fn read(&self, path: &Path, limit: usize) -> io::Result<Vec<u8>> {
        if path.to_string_lossy().contains(self.watch) {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = self.release.lock().unwrap().recv();
        }
        FsReader.read(path, limit)
    }
    fn list(&self, dir: &Path, limit: usize) -> io::Result<Vec<String>> {
        FsReader.list(dir, limit)
    }
    fn exists(&self, path: &Path) -> bool {
        FsReader.exists(path)
    }
}

#[test]
fn callers_during_a_report_share_it() {
    let f = Fixture::new();
    f.put("devices/system/edac/mc/mc0/ce_count", "0");
    f.put("devices/system/edac/mc/mc0/ue_count", "0");
    let (release, rx) = mpsc::channel();
    let reader = Arc::new(SlowReader {
        watch: "ce_count",
        reads: Default::default(),
        release: Mutex::new(rx),
    });
    let m = Arc::new(Monitor::with_reader(
        f.settings(&[Source::Edac]),
        reader.clone(),
    ));
    let first = {
        let m = m.clone();
        std::thread::spawn(move || m.report())
    };
    // The first report is reading (its ce_count read has begun); then a
    // second caller asks (the time of asking is what counts: passed in, so
    // the test does not depend on when its thread reaches the lock).
    while reader.reads.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let asked = Instant::now();
    let second = {
        let m = m.clone();
        std::thread::spawn(move || m.report_asked_at(asked))
    };
    release.send(()).unwrap();
    let (a, b) = (first.join().unwrap(), second.join().unwrap());
    assert_eq!(a, b);
    assert_eq!(a.severity, Severity::Ok, "{a:?}");
    assert_eq!(
        reader.reads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one read for both callers"
    );
    // A caller after that gets a new report.
    drop(release);
    m.report();
    assert_eq!(reader.reads.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Panics on every read (a bug in a source).
struct PanickingReader;

impl Reader for PanickingReader {
    fn read(&self, _: &Path, _: usize) -> io::Result<Vec<u8>> {
        panic!("injected: a source's bug");
    }
    fn list(&self, dir: &Path, limit: usize) -> io::Result<Vec<String>> {
        FsReader.list(dir, limit)
    }
    fn exists(&self, path: &Path) -> bool {
        FsReader.exists(path)
    }
}

#[test]
fn a_panicking_source_is_stuck_and_tried_again() {
    let f = Fixture::new();
    f.put("devices/system/edac/mc/mc0/ce_count", "0");
    let mut s = f.settings(&[Source::Edac]);
    // Far above the panic's own cost: with RUST_BACKTRACE set (CI) the
    // panicking thread symbolizes a backtrace first, which took over 200 ms
    // on a loaded 2-core CI host (the report then said Stuck). Failed
    // before the deadline is what shows it was known at once.
    s.deadline = Duration::from_secs(10);
    let m = Monitor::with_reader(s, Arc::new(PanickingReader));
    for _ in 0..2 {
        let r = m.report();
        let e = source(&r, Source::Edac);
        // Known at once (its thread answers even so), not at the deadline.
        assert_eq!(e.status, SourceStatus::Failed);
        assert_eq!(e.problems.len(), 1, "{e:?}");
        // Not "its previous read has not returned": the panicked thread
        // cleared its flag, so each report tries again.
        assert!(e.problems[0].message.contains("its read panicked"), "{e:?}");
        assert_eq!(r.severity, Severity::Stuck);
    }
}

/// The sources on this machine's real /sys (whatever drivers it has): every
/// one answers within its deadline, and the report says what it took.
#[test]
fn real_sysfs_answers_within_the_deadlines() {
    let m = Monitor::new(Settings::default());
    let t = Instant::now();
    let r = m.report();
    let took = t.elapsed();
    for s in &r.sources {
        assert_eq!(s.status, SourceStatus::Ok, "{s:?}");
        eprintln!(
            "real {}: {} ms, {} items, {} problems",
            s.source.as_str(),
            s.elapsed_ms,
            match &s.readings {
                Some(Readings::Edac(v)) => v.len(),
                Some(Readings::Hwmon(v)) => v.len(),
                Some(Readings::Thermal(v)) => v.len(),
                Some(Readings::Block(v)) => v.len(),
                Some(Readings::Smart(v)) => v.len(),
                Some(Readings::Net(v)) => v.len(),
                Some(Readings::Tpm(v)) => v.len(),
                Some(Readings::Boundary(v)) => v.len(),
                Some(Readings::Volume(v)) => v.len(),
                Some(Readings::Engines(v)) => v.len(),
                None => 0,
            },
            s.problems.len()
        );
    }
    assert!(
        took < Settings::default().deadline_of(Source::Smart),
        "{took:?}"
    );
    let json = serde_json::to_string(&r).unwrap();
    eprintln!(
        "real report: {took:?}, {} bytes of JSON, severity {}",
        json.len(),
        r.severity.as_str()
    );
}

#[test]
fn problems_and_trip_points_are_bounded() {
    let f = Fixture::new();
    // 100 unreadable memory controllers: 63 listed, then one line for the rest.
    for i in 0..100 {
        f.put(&format!("devices/system/edac/mc/mc{i}/ce_count"), "x");
        f.put(&format!("devices/system/edac/mc/mc{i}/ue_count"), "0");
    }
    for i in 0..40 {
        f.put(
            &format!("class/thermal/thermal_zone0/trip_point_{i}_type"),
            "active",
        );
        f.put(
            &format!("class/thermal/thermal_zone0/trip_point_{i}_temp"),
            "90000",
        );
    }
    f.put("class/thermal/thermal_zone0/temp", "40000");
    let r = Monitor::new(f.settings(&[Source::Edac, Source::Thermal])).report();
    let e = source(&r, Source::Edac);
    assert_eq!(e.problems.len(), read::MAX_PROBLEMS);
    assert_eq!(
        e.problems.last().unwrap().message,
        "37 more unreadable entries not listed"
    );
    let Some(Readings::Thermal(z)) = &source(&r, Source::Thermal).readings else {
        panic!()
    };
    assert_eq!(z[0].trips.len(), sources::MAX_TRIPS);
    assert!(source(&r, Source::Thermal).problems[0]
        .message
        .contains("more than 32 trip points"));
}

/// The agent's checks, faked: the TPM check blocks until released.
struct FakeChecks {
    tpm_gate: Mutex<mpsc::Receiver<()>>,
    tpm_calls: std::sync::atomic::AtomicU32,
    drifted: bool,
}

impl SelfChecks for FakeChecks {
    fn tpm(&self) -> TpmCheck {
        self.tpm_calls
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Blocks like a key thread held by a TPM that does not answer.
        let _ = self.tpm_gate.lock().unwrap().recv();
        TpmCheck {
            answered: true,
            error: None,
        }
    }
    fn boundary(&self) -> BoundaryCheck {
        BoundaryCheck {
            stored: true,
            enforced: true,
            elements: Some(2),
            drifts: u64::from(self.drifted),
            last_drift_age_secs: self.drifted.then_some(3),
            unrepaired: None,
        }
    }
    fn volume(&self) -> VolumeCheck {
        VolumeCheck {
            state: "error".into(),
            expected: true,
            mounted: false,
            error: Some("no disk key".into()),
        }
    }
    fn engines(&self) -> EnginesCheck {
        EnginesCheck {
            deployed: 2,
            running: 0,
            crash_looping: 1,
            gave_up: 1,
            restarts: 5,
            probe_failing: 0,
        }
    }
    fn stuck_detail(&self, source: Source) -> Option<String> {
        (source == Source::Tpm).then(|| "the key thread has run one job for 9 s: fake::job".into())
    }
}

#[test]
fn agent_checks_follow_the_sensors_and_a_hung_one_is_stuck() {
    let f = Fixture::new();
    let mut settings = f.settings(&[Source::Edac]);
    settings.deadline = Duration::from_millis(300);
    let (release, gate) = mpsc::channel();
    let checks = Arc::new(FakeChecks {
        tpm_gate: Mutex::new(gate),
        tpm_calls: Default::default(),
        drifted: true,
    });
    let m = Monitor::new(settings).with_checks(checks.clone());
    let t = Instant::now();
    let r = m.report();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    let order: Vec<&str> = r.sources.iter().map(|s| s.source.as_str()).collect();
    assert_eq!(
        order,
        [
            "edac", "hwmon", "thermal", "block", "smart", "net", "tpm", "boundary", "volume",
            "engines"
        ]
    );
    // The hung TPM check: stuck within its deadline; the others answered.
    assert_eq!(source(&r, Source::Tpm).status, SourceStatus::Stuck);
    for s in [Source::Boundary, Source::Volume, Source::Engines] {
        assert_eq!(source(&r, s).status, SourceStatus::Ok, "{s:?}");
    }
    let by = |src: Source| -> Vec<(Severity, String)> {
        r.faults
            .iter()
            .filter(|f| f.source == src)
            .map(|f| (f.severity, f.message.clone()))
            .collect()
    };
    // Stuck, and what the agent knows of it (the key thread's job): only
    // for the stuck source.
    assert_eq!(
        by(Source::Tpm),
        [
            (
                Severity::Stuck,
                "no answer within 300 ms: nothing is known about it".to_owned()
            ),
            (
                Severity::Warning,
                "the key thread has run one job for 9 s: fake::job".to_owned()
            )
        ]
    );
    assert_eq!(by(Source::Volume)[0].0, Severity::Critical);
    assert!(by(Source::Volume)[0].1.contains("no disk key"));
    assert_eq!(by(Source::Boundary)[0].0, Severity::Warning);
    assert_eq!(by(Source::Engines).len(), 2);
    assert_eq!(r.severity, Severity::Stuck);
    // No engine name anywhere: the check has none to give.
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("\"kind\":\"engines\""), "{json}");

    // Still hung: said at once, not called again.
    let r = m.report();
    assert_eq!(source(&r, Source::Tpm).status, SourceStatus::Stuck);
    assert!(source(&r, Source::Tpm).problems[0]
        .message
        .contains("has not returned yet"));
    assert!(source(&r, Source::Tpm).problems[1]
        .message
        .contains("fake::job"));
    assert_eq!(
        checks.tpm_calls.load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // Released: the next report calls it again and it answers.
    // Dropped: the blocked call returns, later ones do not block.
    drop(release);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = m.report();
        if source(&r, Source::Tpm).status == SourceStatus::Ok {
            assert!(r.faults.iter().all(|f| f.source != Source::Tpm), "{r:?}");
            break;
        }
        // The released thread clears its flag as it returns: a report
        // can come just before.
        assert!(Instant::now() < deadline, "tpm check never ran again");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn without_checks_no_agent_sources() {
    let f = Fixture::new();
    let r = Monitor::new(f.settings(&[])).report();
    assert_eq!(r.sources.len(), Source::ALL.len());
    assert!(r
        .sources
        .iter()
        .all(|s| !Source::CHECKS.contains(&s.source)));
}

/// A link event's report reads `net` again and takes every other source
/// from the last report: a link down is known without waiting for a hung
/// smartctl, and the disk's fault is still there.
#[test]
fn a_link_report_reads_links_only_and_keeps_the_other_faults() {
    let f = Fixture::new();
    let mut s = f.settings(&[Source::Net, Source::Smart]);
    s.smartctl = fake_smartctl(&f);
    s.smart_timeout = Duration::from_millis(1500);
    smart_disk(&f, "sda", PASSED, 0);
    fs::write(f.dir.path().join("smart/sda.hang"), "").unwrap();
    let link = |carrier: &str, changes: &str| {
        f.put(
            "class/net/eth1/operstate",
            if carrier == "1" { "up" } else { "down" },
        );
        f.put("class/net/eth1/flags", "0x1003");
        f.put("class/net/eth1/carrier", carrier);
        f.put("class/net/eth1/carrier_changes", changes);
    };
    link("1", "0");
    let m = Monitor::new(s);
    // Before any report: a full one (smartctl's timeout included).
    let t = Instant::now();
    let first = m.report_links();
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert!(faults_of(&first, "eth1").is_empty());
    assert_eq!(faults_of(&first, "sda")[0].severity, Severity::Stuck);
    link("0", "1");
    let t = Instant::now();
    let r = m.report_links();
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    let down = faults_of(&r, "eth1");
    assert!(
        down.iter().any(|f| f.message.contains("link down")),
        "{down:?}"
    );
    assert_eq!(faults_of(&r, "sda")[0].severity, Severity::Stuck, "kept");
    assert_eq!(r.severity, Severity::Stuck);
    assert_eq!(disk(&r, "sda").state, DiskState::Timeout, "readings kept");
    // Back up: the flap counted once, then nothing; the full report agrees.
    link("1", "2");
    let r = m.report_links();
    assert!(faults_of(&r, "eth1")[0]
        .message
        .contains("1 carrier changes"));
    let r = m.report();
    assert!(faults_of(&r, "eth1").is_empty(), "{:?}", r.faults);
}

/// An NVMe SMART event re-reads the disks only: the link fault the last
/// report had is kept (the links are not read again), the new SMART state
/// is judged at once, and no fault is doubled.
#[test]
fn a_smart_event_reads_the_disks_only() {
    let f = Fixture::new();
    let mut s = f.settings(&[Source::Net, Source::Smart]);
    s.smartctl = fake_smartctl(&f);
    smart_disk(&f, "nvme0n1", PASSED, 0);
    f.put("class/net/eth1/operstate", "down");
    f.put("class/net/eth1/flags", "0x1003");
    f.put("class/net/eth1/carrier", "0");
    f.put("class/net/eth1/carrier_changes", "1");
    // Links not watched: the rtnetlink fault, which every report adds.
    let m = Monitor::new(s).with_network(Err("test: not watching".into()));
    let first = m.report();
    assert_eq!(faults_of(&first, "eth1").len(), 1, "{:?}", first.faults);
    assert_eq!(
        faults_of(&first, "rtnetlink").len(),
        1,
        "{:?}",
        first.faults
    );
    assert!(faults_of(&first, "nvme0n1").is_empty());
    // The disk warns; the link came back meanwhile, unseen by this report.
    smart_disk(&f, "nvme0n1", NVME_WARN, 0);
    f.put("class/net/eth1/operstate", "up");
    f.put("class/net/eth1/carrier", "1");
    let before = Instant::now();
    let r = m.report_only(Source::Smart);
    // Its age is its oldest part's (the full report before), so a caller
    // asking for a fresh report is not handed this one.
    assert!(m.last().unwrap().age >= before.elapsed());
    assert_eq!(
        faults_of(&r, "rtnetlink").len(),
        1,
        "not doubled: {:?}",
        r.faults
    );
    let warn = faults_of(&r, "nvme0n1");
    assert_eq!(warn.len(), 1, "{:?}", r.faults);
    assert_eq!(warn[0].severity, Severity::Critical);
    assert_eq!(faults_of(&r, "eth1").len(), 1, "kept from the last report");
    assert_eq!(r.faults.len(), first.faults.len() + 1, "{:?}", r.faults);
    // The next full report reads both again.
    let r = m.report();
    assert!(faults_of(&r, "eth1").is_empty(), "{:?}", r.faults);
    assert_eq!(faults_of(&r, "nvme0n1").len(), 1);
}
