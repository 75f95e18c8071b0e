//! Disk health through `smartctl --json -n standby -H -A DEVICE`: one
//! process per disk, all in parallel, each killed (with its process group)
//! at the per-disk timeout; standby disks are not woken. `-H` (the
//! self-assessment; NVMe: the critical warning) and `-A` (attributes; NVMe:
//! the SMART/health log with `critical_warning` and the temperature) are
//! needed: without them smartctl only opens the device and reads nothing
//! (smartmontools 7.3: "NVMe device successfully opened … Use smartctl -a").

use std::ffi::OsStr;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use serde::Deserialize;

use crate::read::{short, Reader};
use crate::run::{run_bounded, RunError, Stderr};
use crate::types::*;

/// Largest smartctl output read per disk (a SATA disk's full `-a` JSON is
/// ~40 KiB; this reads only the health and temperature).
pub const MAX_SMARTCTL_OUTPUT: usize = 1 << 20;
/// Most disks checked at once (one process each).
pub const MAX_DISKS: usize = 64;
/// smartctl's exit status bits (smartctl(8) "RETURN VALUES").
const EXIT_PARSE: i32 = 1;
const EXIT_OPEN_OR_STANDBY: i32 = 2;
const EXIT_DISK_FAILING: i32 = 8;

#[derive(Debug, Default, Deserialize)]
struct Out {
    #[serde(default)]
    smartctl: Option<Meta>,
    #[serde(default)]
    smart_status: Option<Status>,
    #[serde(default)]
    nvme_smart_health_information_log: Option<NvmeLog>,
    #[serde(default)]
    temperature: Option<Temperature>,
}

#[derive(Debug, Default, Deserialize)]
struct Meta {
    #[serde(default)]
    messages: Vec<Message>,
}

#[derive(Debug, Default, Deserialize)]
struct Message {
    #[serde(default)]
    string: String,
}

#[derive(Debug, Default, Deserialize)]
struct Status {
    passed: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct NvmeLog {
    critical_warning: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct Temperature {
    current: Option<i64>,
}

/// Reads smartctl's JSON and exit status into a verdict. Pure.
pub fn parse(disk: &str, exit_status: i32, stdout: &[u8]) -> DiskHealth {
    let mut h = DiskHealth {
        disk: disk.to_owned(),
        state: DiskState::Unknown,
        critical_warning: None,
        temperature_c: None,
        exit_status: Some(exit_status),
        message: None,
    };
    let out: Out = match serde_json::from_slice(stdout) {
        Ok(o) => o,
        Err(e) => {
            h.state = DiskState::Error;
            h.message = Some(format!("smartctl output is not its JSON: {e}"));
            return h;
        }
    };
    let first_message = out
        .smartctl
        .as_ref()
        .and_then(|m| m.messages.first())
        .map(|m| short(&m.string));
    h.message.clone_from(&first_message);
    // With `-n standby` smartctl exits with bit 1 and says which power mode
    // it found instead of waking the disk.
    let says_standby = out.smartctl.as_ref().is_some_and(|m| {
        m.messages.iter().any(|m| {
            let s = m.string.to_ascii_uppercase();
            s.contains("STANDBY") || s.contains("SLEEP")
        })
    });
    if exit_status & EXIT_OPEN_OR_STANDBY != 0 && says_standby {
        h.state = DiskState::Standby;
        return h;
    }
    if exit_status & (EXIT_PARSE | EXIT_OPEN_OR_STANDBY) != 0 {
        h.state = DiskState::Error;
        h.message = Some(format!(
            "smartctl could not check it (exit status {exit_status}): {}",
            first_message.as_deref().unwrap_or("no message")
        ));
        return h;
    }
    h.critical_warning = out
        .nvme_smart_health_information_log
        .and_then(|l| l.critical_warning);
    h.temperature_c = out.temperature.and_then(|t| t.current);
    h.state = match out.smart_status.and_then(|s| s.passed) {
        Some(false) => DiskState::Failed,
        _ if exit_status & EXIT_DISK_FAILING != 0 => DiskState::Failed,
        Some(true) => DiskState::Passed,
        None => DiskState::Unknown,
    };
    h
}

/// Runs smartctl on every disk in parallel, each bounded by `timeout`.
pub fn smart(
    r: &dyn Reader,
    sys: &Path,
    dev: &Path,
    smartctl: &Path,
    timeout: Duration,
) -> (Readings, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut disks = crate::sources::disks(r, sys, &mut problems);
    if disks.len() > MAX_DISKS {
        disks.truncate(MAX_DISKS);
        problems.push(Problem {
            subject: "smart".into(),
            message: format!("more than {MAX_DISKS} disks; the first {MAX_DISKS} are checked"),
        });
    }
    let (tx, rx) = mpsc::channel();
    for (i, disk) in disks.iter().enumerate() {
        let thread_tx = tx.clone();
        let (disk, device, smartctl) = (disk.clone(), dev.join(disk), smartctl.to_owned());
        let spawned = std::thread::Builder::new()
            .name(format!("smart-{disk}"))
            .spawn(move || {
                let h = check(&disk, &smartctl, &device, timeout);
                let _ = thread_tx.send((i, h));
            });
        if let Err(e) = spawned {
            let _ = tx.send((i, error(&disks[i], format!("no thread for smartctl: {e}"))));
        }
    }
    drop(tx);
    // Each check ends by its own timeout (it kills smartctl), so this
    // returns when the slowest disk's does.
    let mut out: Vec<(usize, DiskHealth)> = rx.iter().collect();
    out.sort_by_key(|(i, _)| *i);
    (
        Readings::Smart(out.into_iter().map(|(_, h)| h).collect()),
        problems,
    )
}

fn error(disk: &str, message: String) -> DiskHealth {
    DiskHealth {
        disk: disk.to_owned(),
        state: DiskState::Error,
        critical_warning: None,
        temperature_c: None,
        exit_status: None,
        message: Some(message),
    }
}

/// One disk: smartctl in a process group of its own, its output read up to
/// [`MAX_SMARTCTL_OUTPUT`], killed at `timeout`.
fn check(disk: &str, smartctl: &Path, device: &Path, timeout: Duration) -> DiskHealth {
    let args = [
        OsStr::new("--json"),
        OsStr::new("-n"),
        OsStr::new("standby"),
        OsStr::new("-H"),
        OsStr::new("-A"),
        device.as_os_str(),
    ];
    match run_bounded(smartctl, &args, timeout, MAX_SMARTCTL_OUTPUT, Stderr::Null) {
        Ok((code, buf)) => parse(disk, code, &buf),
        Err(RunError::Timeout) => DiskHealth {
            state: DiskState::Timeout,
            message: Some(format!(
                "smartctl did not finish within {} ms; killed",
                timeout.as_millis()
            )),
            ..error(disk, String::new())
        },
        Err(RunError::TooLarge) => error(
            disk,
            format!("smartctl printed more than {MAX_SMARTCTL_OUTPUT} bytes; killed"),
        ),
        Err(RunError::Start(m) | RunError::Io(m)) => error(disk, m),
    }
}
