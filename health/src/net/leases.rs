//! DHCP leases as systemd-networkd keeps them (`/run/systemd/netif/leases/IFINDEX`,
//! `KEY=VALUE` lines). networkd calls the format private, so it is read
//! defensively: known keys only, every address parsed, every value and
//! file bounded, anything else a problem naming the file.

use std::io::Read;
use std::net::IpAddr;
use std::path::Path;
use std::time::UNIX_EPOCH;

use super::Lease;
use crate::Problem;

/// Most lease files read.
pub const MAX_LEASE_FILES: usize = 64;
/// Largest lease file read.
pub const MAX_LEASE_BYTES: usize = 16 * 1024;
/// Most routers or DNS servers kept per lease.
pub const MAX_LIST: usize = 8;
/// Longest domain name kept.
const MAX_NAME: usize = 253;

/// Reads every lease under `dir`; `name_of` gives an interface index's
/// name. A missing directory is no lease (networkd not in use).
pub fn read_leases(
    dir: &Path,
    name_of: &dyn Fn(u32) -> Option<String>,
) -> (Vec<Lease>, Vec<Problem>) {
    let mut leases = Vec::new();
    let mut problems = Vec::new();
    let problem = |subject: &Path, message: String| Problem {
        subject: "leases".into(),
        message: format!("{}: {message}", subject.display()),
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (leases, problems),
        Err(e) => {
            problems.push(problem(dir, e.to_string()));
            return (leases, problems);
        }
    };
    let mut names: Vec<(u32, std::path::PathBuf)> = Vec::new();
    for e in entries.take(MAX_LEASE_FILES * 4) {
        let Ok(e) = e else { continue };
        let name = e.file_name();
        // Lease files are named by interface index; anything else (a
        // temporary file being renamed into place) is not a lease.
        if let Some(i) = name.to_str().and_then(|n| n.parse::<u32>().ok()) {
            names.push((i, e.path()));
        }
    }
    names.sort();
    if names.len() > MAX_LEASE_FILES {
        problems.push(problem(
            dir,
            format!("more than {MAX_LEASE_FILES} lease files; the rest unread"),
        ));
        names.truncate(MAX_LEASE_FILES);
    }
    for (index, path) in names {
        match read_one(&path) {
            Ok((text, mtime)) => match parse(&text) {
                Ok(mut l) => {
                    l.ifindex = index;
                    l.iface = name_of(index);
                    l.written_at = mtime;
                    leases.push(l);
                }
                Err(m) => problems.push(problem(&path, m)),
            },
            Err(m) => problems.push(problem(&path, m)),
        }
    }
    (leases, problems)
}

fn read_one(path: &Path) -> Result<(String, Option<u64>), String> {
    use std::os::unix::fs::OpenOptionsExt;
    // Not following a link, not waiting on a FIFO's writer: the open of a
    // FIFO (or a link to a tty) in the directory blocked every report
    // (review); the type is checked on what was opened.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut buf = Vec::new();
    f.take(u64::try_from(MAX_LEASE_BYTES).unwrap_or(u64::MAX) + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() > MAX_LEASE_BYTES {
        return Err(format!("larger than {MAX_LEASE_BYTES} bytes; not read"));
    }
    let text = String::from_utf8(buf).map_err(|_| "not UTF-8".to_string())?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    Ok((text, mtime))
}

fn quote(v: &str) -> String {
    v.chars().take(40).collect()
}

fn ip(key: &str, v: &str) -> Result<IpAddr, String> {
    v.parse()
        .map_err(|_| format!("{key}: {:?} is not an address", quote(v)))
}

fn ips(key: &str, v: &str) -> Result<Vec<IpAddr>, String> {
    v.split_whitespace()
        .take(MAX_LIST)
        .map(|x| ip(key, x))
        .collect()
}

fn secs(key: &str, v: &str) -> Result<u32, String> {
    v.parse()
        .map_err(|_| format!("{key}: {:?} is not a number of seconds", quote(v)))
}

/// One lease file's text. Unknown keys are skipped (networkd adds some
/// with each release); a known key with a bad value refuses the file.
pub fn parse(text: &str) -> Result<Lease, String> {
    let mut l = Lease::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {:?} is not KEY=VALUE", quote(line)));
        };
        let v = v.trim();
        match k {
            "ADDRESS" => l.address = Some(ip(k, v)?.to_string()),
            "NETMASK" => {
                let m = ip(k, v)?;
                let IpAddr::V4(m) = m else {
                    return Err(format!("{k}: {v} is not an IPv4 mask"));
                };
                let bits = u32::from(m);
                if bits.leading_ones() + bits.trailing_zeros() != 32 {
                    return Err(format!("{k}: {v} is not a contiguous mask"));
                }
                l.prefix_len = u8::try_from(bits.leading_ones()).ok();
            }
            "ROUTER" => l.routers = ips(k, v)?.iter().map(ToString::to_string).collect(),
            "SERVER_ADDRESS" => l.server = Some(ip(k, v)?.to_string()),
            "DNS" => l.dns = ips(k, v)?.iter().map(ToString::to_string).collect(),
            "LIFETIME" => l.lifetime_s = Some(secs(k, v)?),
            "T1" => l.t1_s = Some(secs(k, v)?),
            "T2" => l.t2_s = Some(secs(k, v)?),
            "DOMAINNAME" => {
                if v.len() > MAX_NAME
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    return Err(format!("{k}: {:?} is not a domain name", quote(v)));
                }
                l.domain = Some(v.to_owned());
            }
            _ => {}
        }
    }
    if l.address.is_none() {
        return Err("no ADDRESS".into());
    }
    Ok(l)
}

/// `O_NOFOLLOW | O_NONBLOCK` for the lease files' open.
fn libc_flags() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETWORKD: &str = "# This is private data. Do not parse.\n\
        ADDRESS=192.168.50.23\nNETMASK=255.255.255.0\nROUTER=192.168.50.1\n\
        SERVER_ADDRESS=192.168.50.1\nNEXT_SERVER=0.0.0.0\nBROADCAST=192.168.50.255\n\
        T1=1800\nT2=3150\nLIFETIME=3600\nDNS=192.168.50.1 9.9.9.9\nDOMAINNAME=lab.example\n\
        CLIENTID=ff2c1e7b3c00020000ab11\n";

    #[test]
    fn a_networkd_lease_is_read_and_unknown_keys_are_skipped() {
        let l = parse(NETWORKD).unwrap();
        assert_eq!(l.address.as_deref(), Some("192.168.50.23"));
        assert_eq!(l.prefix_len, Some(24));
        assert_eq!(l.routers, vec!["192.168.50.1"]);
        assert_eq!(l.server.as_deref(), Some("192.168.50.1"));
        assert_eq!(l.dns, vec!["192.168.50.1", "9.9.9.9"]);
        assert_eq!(
            (l.lifetime_s, l.t1_s, l.t2_s),
            (Some(3600), Some(1800), Some(3150))
        );
        assert_eq!(l.domain.as_deref(), Some("lab.example"));
    }

    #[test]
    fn bad_values_name_the_key_and_files_are_bounded() {
        for (text, want) in [
            (
                "ADDRESS=1.2.3.999",
                "ADDRESS: \"1.2.3.999\" is not an address",
            ),
            (
                "ADDRESS=1.2.3.4\nNETMASK=255.0.255.0",
                "not a contiguous mask",
            ),
            (
                "ADDRESS=1.2.3.4\nLIFETIME=-1",
                "LIFETIME: \"-1\" is not a number",
            ),
            ("ADDRESS=1.2.3.4\nDOMAINNAME=a;rm -rf", "DOMAINNAME"),
            ("NETMASK=255.255.255.0", "no ADDRESS"),
            ("garbage", "is not KEY=VALUE"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let long = "DNS=".to_owned() + &"1.1.1.1 ".repeat(100) + "\nADDRESS=1.2.3.4";
        assert_eq!(parse(&long).unwrap().dns.len(), MAX_LIST);

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("2"), NETWORKD).unwrap();
        std::fs::write(dir.path().join("3"), "x".repeat(MAX_LEASE_BYTES + 1)).unwrap();
        std::fs::write(dir.path().join("4"), [0xff, 0xfe]).unwrap();
        std::fs::write(dir.path().join(".#2abc"), NETWORKD).unwrap();
        let (leases, problems) = read_leases(dir.path(), &|i| (i == 2).then(|| "eth0".into()));
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].iface.as_deref(), Some("eth0"));
        assert_eq!(leases[0].ifindex, 2);
        assert!(leases[0].written_at.is_some());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].message.contains("/3: larger than"),
            "{problems:?}"
        );
        assert!(
            problems[1].message.contains("/4: not UTF-8"),
            "{problems:?}"
        );
        let (l, p) = read_leases(&dir.path().join("missing"), &|_| None);
        assert!(l.is_empty() && p.is_empty());
    }

    /// A FIFO (no writer) and a symbolic link in the directory are
    /// problems named by file, and the read does not wait (review: the
    /// open of a FIFO blocked every report for good).
    #[test]
    fn fifos_and_links_are_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("2"), NETWORKD).unwrap();
        nix::unistd::mkfifo(&dir.path().join("5"), nix::sys::stat::Mode::S_IRUSR).unwrap();
        std::os::unix::fs::symlink(dir.path().join("2"), dir.path().join("6")).unwrap();
        let path = dir.path().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_leases(&path, &|_| None));
        });
        let (leases, problems) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the read waited on the FIFO");
        assert_eq!(leases.len(), 1);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].message.contains("/5: not a regular file"),
            "{problems:?}"
        );
        assert!(problems[1].message.contains("/6: "), "{problems:?}");
    }
}
