//! NVMe SMART/health events (docs/health.md "SMART events").
//!
//! An NVMe controller tells its host when a SMART critical warning appears
//! (spare below threshold, temperature, reliability degraded, read-only,
//! volatile backup failed) with an Asynchronous Event, if the host enabled
//! those events. Linux enables only the notice events (namespace attribute,
//! firmware activation, ANA, discovery: `NVME_AEN_SUPPORTED` in
//! drivers/nvme/host/core.c), so out of the box a SMART warning is seen
//! only by the next poll. The agent turns the SMART bits of the Async Event
//! Configuration feature (0x0b) on with nvme-cli (`get-feature`, then
//! `set-feature` with the kernel's bits kept), and listens for the
//! kernel's `change` uevent on the controller carrying `NVME_AEN=…`: the
//! smart source is then read at once. A controller reset sets the feature
//! back to the kernel's (its uevent says `NVME_EVENT=connected`): the bits
//! are set again. The controller holds further SMART events until the
//! SMART log is read, which the smart source's smartctl run does.

use std::path::Path;
use std::time::Duration;

use crate::run::{run_bounded, RunError, Stderr};

/// The Async Event Configuration feature, as nvme-cli's long option (the
/// short ones changed meaning: since nvme-cli 2.7 `-v` is `--verbose` and
/// the value is `-V`; the long ones are the same in every version).
pub const FEATURE_AEC: &str = "--feature-id=0x0b";
/// AEC bits 0-4: an event for each SMART critical warning bit defined
/// since NVMe 1.2 (bit 5, PMR, is 1.4 and refused by older controllers).
pub const SMART_AEC_BITS: u32 = 0x1f;
/// Async event type SMART/health (the low three bits of `NVME_AEN`).
pub const AER_TYPE_SMART: u32 = 1;
/// nvme-cli's output read at most (one line is expected).
pub const MAX_NVME_OUTPUT: usize = 16 << 10;
/// A uevent is read into this much: the kernel's variables are at most
/// 2048 bytes (UEVENT_BUFFER_SIZE), the `action@devpath` header comes on
/// top; a longer message is not one of the kernel's and is dropped.
pub const UEVENT_MAX: usize = 8192;

/// A kernel uevent: `ACTION@DEVPATH` then `KEY=VALUE` strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// `add`, `change`, `remove`, …
    pub action: String,
    /// The device's path under /sys.
    pub devpath: String,
    /// The variables, in order.
    pub vars: Vec<(String, String)>,
}

impl Uevent {
    /// A variable's value.
    pub fn var(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one message of the kernel's uevent group. `None` for anything
/// else (udevd's rebroadcasts start with `libudev`, never read here), or
/// at [`UEVENT_MAX`] or past it (it may have been cut).
pub fn parse_uevent(buf: &[u8]) -> Option<Uevent> {
    if buf.len() >= UEVENT_MAX {
        return None;
    }
    let mut parts = buf.split(|b| *b == 0).filter(|p| !p.is_empty());
    let head = std::str::from_utf8(parts.next()?).ok()?;
    let (action, devpath) = head.split_once('@')?;
    if action.is_empty() || !devpath.starts_with('/') {
        return None;
    }
    let vars = parts
        .filter_map(|p| std::str::from_utf8(p).ok())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Some(Uevent {
        action: action.to_owned(),
        devpath: devpath.to_owned(),
        vars,
    })
}

/// What a uevent means for the smart source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NvmeEvent {
    /// The controller raised a SMART/health event (`NVME_AEN` of type 1):
    /// read the disks now.
    Smart {
        /// `nvme0`.
        ctrl: String,
        /// The event's result dword (type, info, log page).
        aen: u32,
    },
    /// The controller (re)started (`NVME_EVENT=connected`, or added): its
    /// event configuration is the kernel's again.
    Connected {
        /// `nvme0`.
        ctrl: String,
    },
}

/// Whether `name` is a controller's name (`nvme` and digits): never a
/// path, whatever a message says.
pub fn is_ctrl_name(name: &str) -> bool {
    name.strip_prefix("nvme")
        .is_some_and(|n| !n.is_empty() && n.len() <= 6 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The uevents of NVMe controllers that matter; `None` for the others.
pub fn classify(u: &Uevent) -> Option<NvmeEvent> {
    if u.var("SUBSYSTEM") != Some("nvme") {
        return None;
    }
    let ctrl = u.devpath.rsplit('/').next().filter(|c| is_ctrl_name(c))?;
    let ctrl = ctrl.to_owned();
    if u.action == "add" {
        return Some(NvmeEvent::Connected { ctrl });
    }
    if u.action != "change" {
        return None;
    }
    if let Some(v) = u.var("NVME_AEN") {
        let aen = parse_hex(v)?;
        return (aen & 0x7 == AER_TYPE_SMART).then_some(NvmeEvent::Smart { ctrl, aen });
    }
    (u.var("NVME_EVENT") == Some("connected")).then_some(NvmeEvent::Connected { ctrl })
}

fn parse_hex(v: &str) -> Option<u32> {
    let v = v.trim();
    let digits = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"))?;
    u32::from_str_radix(digits, 16).ok()
}

/// The value in nvme-cli's `get-feature` line (`get-feature:0x0b (Async
/// Event Configuration), Current value:0x00000100`).
pub fn parse_current(text: &str) -> Option<u32> {
    let (_, rest) = text.split_once("Current value:")?;
    parse_hex(rest.split_whitespace().next()?.trim_end_matches(','))
}

/// What enabling did on one controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enabled {
    /// The bits were on already.
    Already(u32),
    /// Set: the value before and the value read back after.
    Set {
        /// Before.
        before: u32,
        /// After (read back).
        after: u32,
    },
}

/// Turns the SMART event bits on for controller `ctrl` (`nvme0`) with the
/// nvme-cli binary `nvme`, keeping the bits already set (the kernel's);
/// each run bounded by `timeout`. Read back: an `Ok` means the controller
/// holds the bits.
pub fn enable_smart_events(
    nvme: &Path,
    dev: &Path,
    ctrl: &str,
    timeout: Duration,
) -> Result<Enabled, String> {
    if !is_ctrl_name(ctrl) {
        return Err(format!("{ctrl:?} is not an NVMe controller's name"));
    }
    let device = dev.join(ctrl);
    let get = || -> Result<u32, String> {
        let out = run(nvme, &["get-feature", path(&device)?, FEATURE_AEC], timeout)?;
        parse_current(&out).ok_or_else(|| {
            format!(
                "nvme get-feature printed no current value: {:?}",
                crate::read::short(&out)
            )
        })
    };
    let before = get()?;
    if before & SMART_AEC_BITS == SMART_AEC_BITS {
        return Ok(Enabled::Already(before));
    }
    let set = |v: u32| {
        let value = format!("--value={v:#x}");
        run(
            nvme,
            &["set-feature", path(&device)?, FEATURE_AEC, &value],
            timeout,
        )
    };
    let want = before | SMART_AEC_BITS;
    set(want)?;
    let after = get()?;
    let kernels_kept = after & before == before;
    if kernels_kept && after & SMART_AEC_BITS != 0 {
        // Some SMART bits may be missing (a controller without that
        // warning): the ones held still give events; `after` says which.
        return Ok(Enabled::Set { before, after });
    }
    // The kernel's bits are put back if they went (best effort): a failed
    // try must not cost the kernel its notices (namespace changes, ANA).
    let undo = match (kernels_kept, || set(before)) {
        (true, _) => String::new(),
        (false, put) => match put() {
            Ok(_) => format!("; {before:#x} put back"),
            Err(e) => format!("; putting {before:#x} back failed: {e}"),
        },
    };
    Err(format!(
        "the controller holds {after:#x} after set-feature {want:#x} (was {before:#x}){undo}"
    ))
}

/// nvme-cli's last non-empty line (its error: `NVMe status: …`, a failed
/// open), at most 300 characters.
fn last_line(out: &str) -> String {
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    line.chars().take(300).collect()
}

fn path(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))
}

fn run(nvme: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
    let what = || format!("nvme {}", args.join(" "));
    match run_bounded(nvme, args, timeout, MAX_NVME_OUTPUT, Stderr::Merged) {
        Ok((0, out)) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Ok((code, out)) => Err(format!(
            "{} exited with {code}: {:?}",
            what(),
            last_line(&String::from_utf8_lossy(&out))
        )),
        Err(RunError::Timeout) => Err(format!(
            "{} did not finish within {} ms; killed",
            what(),
            timeout.as_millis()
        )),
        Err(RunError::TooLarge) => Err(format!(
            "{} printed more than {MAX_NVME_OUTPUT} bytes; killed",
            what()
        )),
        Err(RunError::Start(m) | RunError::Io(m)) => Err(m),
    }
}

/// The NVMe controllers under `sys` (`class/nvme/nvme*`), sorted.
pub fn controllers(sys: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(sys.join("class/nvme"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_ctrl_name(n))
        .collect();
    out.sort();
    out
}

/// A socket on the kernel's uevent group (group 1; not udevd's), so the
/// events come from the kernel itself.
pub fn subscribe() -> std::io::Result<netlink_sys::Socket> {
    use netlink_sys::{protocols::NETLINK_KOBJECT_UEVENT, Socket, SocketAddr};
    let mut sock = Socket::new(NETLINK_KOBJECT_UEVENT)?;
    sock.bind(&SocketAddr::new(0, 1))?;
    // Bursts (a hot-plug of many devices, `udevadm trigger`) queue here:
    // forced past `net.core.rmem_max` (root), else as much as it allows.
    // What overflows anyway is an ENOBUFS, which `watch` reports.
    const RCVBUF: usize = 1 << 20;
    if nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &RCVBUF).is_err()
    {
        sock.set_rx_buf_sz(RCVBUF)?;
    }
    Ok(sock)
}

/// What [`watch`] hands on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// An NVMe event.
    Event(NvmeEvent),
    /// Messages were lost (ENOBUFS: the socket's buffer overflowed): an
    /// event may be among them. The caller reads the disks and sets every
    /// controller's bits again, as if each had sent one.
    Lost,
}

/// Reads uevents until an error other than a lost burst, calling `on` with
/// each NVMe event. Only messages from the kernel (port 0) are taken.
pub fn watch(sock: &netlink_sys::Socket, mut on: impl FnMut(Watched)) -> std::io::Error {
    let mut buf: Vec<u8> = Vec::with_capacity(UEVENT_MAX);
    loop {
        buf.clear();
        match sock.recv_from(&mut buf, 0) {
            Ok((_, from)) if from.port_number() != 0 => {}
            Ok(_) => {
                if let Some(e) = parse_uevent(&buf).as_ref().and_then(classify) {
                    on(Watched::Event(e));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => on(Watched::Lost),
            Err(e) => return e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(parts: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for p in parts {
            v.extend_from_slice(p.as_bytes());
            v.push(0);
        }
        v
    }

    const DEV: &str = "/devices/pci0000:00/0000:00:05.0/nvme/nvme0";

    #[test]
    fn a_smart_aen_from_the_lab_is_a_smart_event() {
        // As the lab's guest printed it (udevadm monitor --kernel).
        let m = msg(&[
            &format!("change@{DEV}"),
            "ACTION=change",
            &format!("DEVPATH={DEV}"),
            "SUBSYSTEM=nvme",
            "NVME_AEN=0x020001",
            "DEVNAME=/dev/nvme0",
            "NVME_TRTYPE=pcie",
            "SEQNUM=1914",
        ]);
        let u = parse_uevent(&m).unwrap();
        assert_eq!(u.action, "change");
        assert_eq!(u.var("NVME_AEN"), Some("0x020001"));
        assert_eq!(
            classify(&u),
            Some(NvmeEvent::Smart {
                ctrl: "nvme0".into(),
                aen: 0x020001
            })
        );
    }

    #[test]
    fn a_reset_or_an_add_is_connected_and_other_events_are_not_smart() {
        let connected = msg(&[
            &format!("change@{DEV}"),
            "SUBSYSTEM=nvme",
            "NVME_EVENT=connected",
        ]);
        assert_eq!(
            classify(&parse_uevent(&connected).unwrap()),
            Some(NvmeEvent::Connected {
                ctrl: "nvme0".into()
            })
        );
        let add = msg(&[&format!("add@{DEV}"), "SUBSYSTEM=nvme"]);
        assert_eq!(
            classify(&parse_uevent(&add).unwrap()),
            Some(NvmeEvent::Connected {
                ctrl: "nvme0".into()
            })
        );
        // A notice (type 2: namespace attribute changed) is not SMART.
        let notice = msg(&[
            &format!("change@{DEV}"),
            "SUBSYSTEM=nvme",
            "NVME_AEN=0x040002",
        ]);
        assert_eq!(classify(&parse_uevent(&notice).unwrap()), None);
        // Another subsystem, a namespace's block device, a removal.
        for m in [
            msg(&[
                &format!("change@{DEV}"),
                "SUBSYSTEM=block",
                "NVME_AEN=0x020001",
            ]),
            msg(&[
                &format!("change@{DEV}/nvme0n1"),
                "SUBSYSTEM=nvme",
                "NVME_AEN=0x020001",
            ]),
            msg(&[&format!("remove@{DEV}"), "SUBSYSTEM=nvme"]),
        ] {
            assert_eq!(classify(&parse_uevent(&m).unwrap()), None, "{m:?}");
        }
    }

    #[test]
    fn odd_messages_are_refused_without_a_panic() {
        for m in [
            b"".to_vec(),
            b"\0\0".to_vec(),
            b"libudev\0\xfe\xed\xca\xfe".to_vec(),
            b"change@relative/path\0SUBSYSTEM=nvme\0".to_vec(),
            b"@/devices\0".to_vec(),
            vec![b'a'; UEVENT_MAX + 1],
            b"\xff\xfe@/x\0".to_vec(),
        ] {
            assert_eq!(parse_uevent(&m), None, "{m:?}");
        }
        // A controller name that is a path, or a bad AEN value.
        for (path, aen) in [
            ("/devices/x/nvme/../../etc", "0x020001"),
            ("/devices/x/nvme/nvme", "0x020001"),
            ("/devices/x/nvme/nvme1234567", "0x020001"),
            (DEV, "020001"),
            (DEV, "0xzz"),
            (DEV, "0x1ffffffff"),
        ] {
            let m = msg(&[
                &format!("change@{path}"),
                "SUBSYSTEM=nvme",
                &format!("NVME_AEN={aen}"),
            ]);
            assert_eq!(classify(&parse_uevent(&m).unwrap()), None, "{path} {aen}");
        }
    }

    #[test]
    fn nvme_cli_current_value_is_read() {
        assert_eq!(
            parse_current(
                "get-feature:0x0b (Async Event Configuration), Current value:0x00000100\n"
            ),
            Some(0x100)
        );
        assert_eq!(
            parse_current("get-feature:0x0b, Current value:0x1ff, x"),
            Some(0x1ff)
        );
        assert_eq!(parse_current("NVMe status: INVALID_FIELD"), None);
        assert_eq!(parse_current("Current value:"), None);
    }
}
