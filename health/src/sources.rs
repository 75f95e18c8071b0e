//! The sysfs sources. Each is a plain function of a [`Reader`] and the sysfs
//! root: what it read and what it could not.

use std::path::Path;

use crate::read::{count, entries, int, text, Reader};
use crate::types::*;

/// Most trip points read per thermal zone (drivers have a handful).
pub const MAX_TRIPS: usize = 32;

/// A reading error about `subject`.
fn problem(problems: &mut Vec<Problem>, subject: &str, message: String) {
    problems.push(Problem {
        subject: subject.to_owned(),
        message,
    });
}

/// `/sys/devices/system/edac/mc/mc*/{ce_count,ue_count}`.
pub fn edac(r: &dyn Reader, sys: &Path) -> (Readings, Vec<Problem>) {
    let mut problems = Vec::new();
    let dir = sys.join("devices/system/edac/mc");
    let mut out = Vec::new();
    for mc in entries(r, &dir, "mc", &mut problems) {
        let d = dir.join(&mc);
        let ce = count(r, &d.join("ce_count"));
        let ue = count(r, &d.join("ue_count"));
        match (ce, ue) {
            (Ok(Some(corrected)), Ok(Some(uncorrected))) => out.push(EdacMc {
                mc,
                corrected,
                uncorrected,
            }),
            (Ok(None), _) | (_, Ok(None)) => problem(
                &mut problems,
                &mc,
                format!("{}: no ce_count or ue_count", d.display()),
            ),
            (Err(e), _) | (_, Err(e)) => problem(&mut problems, &mc, e),
        }
    }
    (Readings::Edac(out), problems)
}

/// `/sys/class/hwmon/hwmon*/temp*_input` with `_max`, `_crit`, `_label`
/// and the chip's `name`.
pub fn hwmon(r: &dyn Reader, sys: &Path) -> (Readings, Vec<Problem>) {
    let mut problems = Vec::new();
    let dir = sys.join("class/hwmon");
    let mut out = Vec::new();
    let mut seen = 0usize;
    for chip in entries(r, &dir, "hwmon", &mut problems) {
        let d = dir.join(&chip);
        let name = text(r, &d.join("name")).ok().flatten();
        let mut inputs = entries(r, &d, "temp", &mut problems);
        inputs.retain(|n| n.ends_with("_input"));
        for input in inputs {
            // Sensors tried, read or not: unreadable ones cost reads too.
            seen += 1;
            if seen > crate::read::MAX_ITEMS {
                problem(
                    &mut problems,
                    &chip,
                    format!(
                        "more than {} sensors; the rest are not read",
                        crate::read::MAX_ITEMS
                    ),
                );
                return (Readings::Hwmon(out), problems);
            }
            let base = input.trim_end_matches("_input").to_owned();
            let sensor = format!("{chip}/{base}");
            let attr = |suffix: &str| d.join(format!("{base}_{suffix}"));
            match int(r, &attr("input")) {
                Ok(Some(milli_c)) => {
                    let mut limit = |suffix: &str| match int(r, &attr(suffix)) {
                        Ok(v) => v,
                        Err(e) => {
                            problem(&mut problems, &sensor, e);
                            None
                        }
                    };
                    let max_milli_c = limit("max");
                    let crit_milli_c = limit("crit");
                    out.push(TempSensor {
                        label: text(r, &attr("label")).ok().flatten(),
                        sensor,
                        chip: name.clone(),
                        milli_c,
                        max_milli_c,
                        crit_milli_c,
                    });
                }
                Ok(None) => {}
                Err(e) => problem(&mut problems, &sensor, e),
            }
        }
    }
    (Readings::Hwmon(out), problems)
}

/// `/sys/class/thermal/thermal_zone*/{temp,type,trip_point_N_{type,temp}}`.
pub fn thermal(r: &dyn Reader, sys: &Path) -> (Readings, Vec<Problem>) {
    let mut problems = Vec::new();
    let dir = sys.join("class/thermal");
    let mut out = Vec::new();
    for zone in entries(r, &dir, "thermal_zone", &mut problems) {
        let d = dir.join(&zone);
        let milli_c = match int(r, &d.join("temp")) {
            Ok(Some(t)) => t,
            // A zone without a temperature (disabled) has nothing to judge.
            Ok(None) => continue,
            Err(e) => {
                problem(&mut problems, &zone, e);
                continue;
            }
        };
        let mut trip_files = entries(r, &d, "trip_point_", &mut problems);
        trip_files.retain(|n| n.ends_with("_type"));
        if trip_files.len() > MAX_TRIPS {
            trip_files.truncate(MAX_TRIPS);
            problem(
                &mut problems,
                &zone,
                format!("more than {MAX_TRIPS} trip points; the first {MAX_TRIPS} are read"),
            );
        }
        let mut trips = Vec::new();
        for t in trip_files {
            let base = t.trim_end_matches("_type");
            match (
                text(r, &d.join(&t)),
                int(r, &d.join(format!("{base}_temp"))),
            ) {
                (Ok(Some(kind)), Ok(Some(milli_c))) => trips.push(Trip { kind, milli_c }),
                (Err(e), _) | (_, Err(e)) => problem(&mut problems, &zone, e),
                _ => {}
            }
        }
        out.push(ThermalZone {
            kind: text(r, &d.join("type")).ok().flatten(),
            zone,
            milli_c,
            trips,
        });
    }
    (Readings::Thermal(out), problems)
}

/// The disks: `/sys/block/*` with a `device` (loop, dm, zram, md and ram
/// devices have none).
pub fn disks(r: &dyn Reader, sys: &Path, problems: &mut Vec<Problem>) -> Vec<String> {
    let dir = sys.join("block");
    entries(r, &dir, "", problems)
        .into_iter()
        .filter(|d| r.exists(&dir.join(d).join("device")))
        .collect()
}

/// `/sys/block/*/device/ioerr_cnt` where present.
pub fn block(r: &dyn Reader, sys: &Path) -> (Readings, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for disk in disks(r, sys, &mut problems) {
        let path = sys.join("block").join(&disk).join("device/ioerr_cnt");
        match count(r, &path) {
            Ok(io_errors) => out.push(BlockIo { disk, io_errors }),
            Err(e) => problem(&mut problems, &disk, e),
        }
    }
    (Readings::Block(out), problems)
}

/// `/sys/class/net/*/{operstate,flags,carrier,carrier_changes}`, without
/// `lo`.
pub fn net(r: &dyn Reader, sys: &Path) -> (Readings, Vec<Problem>) {
    let mut problems = Vec::new();
    let dir = sys.join("class/net");
    let mut out = Vec::new();
    for iface in entries(r, &dir, "", &mut problems) {
        if iface == "lo" {
            continue;
        }
        let d = dir.join(&iface);
        // Not an interface (bonding_masters, …).
        if !r.exists(&d.join("operstate")) {
            continue;
        }
        let operstate = match text(r, &d.join("operstate")) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                problem(&mut problems, &iface, e);
                continue;
            }
        };
        let admin_up = match int(r, &d.join("flags")) {
            Ok(f) => f.is_some_and(|f| f & 1 != 0),
            Err(e) => {
                problem(&mut problems, &iface, e);
                false
            }
        };
        // `carrier` reads fail with EINVAL while the interface is down.
        let carrier = int(r, &d.join("carrier")).ok().flatten().map(|c| c != 0);
        let carrier_changes = match count(r, &d.join("carrier_changes")) {
            Ok(c) => c,
            Err(e) => {
                problem(&mut problems, &iface, e);
                None
            }
        };
        out.push(Link {
            iface,
            operstate,
            admin_up,
            carrier,
            carrier_changes,
        });
    }
    (Readings::Net(out), problems)
}
