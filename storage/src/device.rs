//! The block device under the volume: what it is (kernel name, size, block
//! size, a stable /dev/disk/by-id name) and whether `volume init` may
//! write to it. Refused: a device that is mounted (or a partition of it,
//! or used as swap), held by another kernel user (device-mapper, md), the
//! disk holding the root filesystem, and — unless forced — one carrying a
//! filesystem, partition table or other signature (blkid). Read-only: the
//! checks never write.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{io, Result, StorageError};

/// A block device as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// The path as given.
    pub given: PathBuf,
    /// The device node (symlinks resolved), e.g. /dev/vdb.
    pub node: PathBuf,
    /// Kernel name (vdb, sdb1).
    pub name: String,
    /// Major and minor number.
    pub devno: (u64, u64),
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size in bytes.
    pub logical_block: u32,
    /// A /dev/disk/by-id name for it, if udev made one.
    pub stable: Option<PathBuf>,
}

impl BlockDevice {
    /// The stable name if there is one, else the node.
    pub fn preferred(&self) -> &Path {
        self.stable.as_deref().unwrap_or(&self.node)
    }

    fn sys(&self) -> PathBuf {
        sys_dir(self.devno)
    }

    /// dm-crypt sector size: 4096 where the device allows (size a multiple
    /// of 4096 and a logical block no larger), else 512.
    pub fn crypt_sector_size(&self) -> u32 {
        if self.size_bytes.is_multiple_of(4096) && self.logical_block <= 4096 {
            4096
        } else {
            512
        }
    }
}

fn sys_dir(devno: (u64, u64)) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{}:{}", devno.0, devno.1))
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn parse_devno(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Looks the device up. `path` may be a symlink (by-id, by-path).
pub fn probe(path: &Path) -> Result<BlockDevice> {
    let given = path.display().to_string();
    let not = |reason: String| StorageError::NotABlockDevice {
        path: given.clone(),
        reason,
    };
    let node = std::fs::canonicalize(path).map_err(|e| not(e.to_string()))?;
    let md = std::fs::metadata(&node).map_err(|e| not(e.to_string()))?;
    if !md.file_type().is_block_device() {
        return Err(not("not a block device".into()));
    }
    let rdev = md.rdev();
    let devno = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let sys = sys_dir(devno);
    let name = std::fs::canonicalize(&sys)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| not(format!("no {} in sysfs", sys.display())))?;
    let sectors: u64 = read_trim(&sys.join("size"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| not("cannot read its size from sysfs".into()))?;
    // A partition has no queue/ of its own: its disk's applies.
    let logical_block = read_trim(&sys.join("queue/logical_block_size"))
        .or_else(|| read_trim(&sys.join("../queue/logical_block_size")))
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let stable = std::fs::read_dir("/dev/disk/by-id").ok().and_then(|d| {
        let mut names: Vec<PathBuf> = d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| std::fs::canonicalize(p).ok().as_ref() == Some(&node))
            .collect();
        // wwn- names are less readable than bus-serial ones.
        names.sort_by_key(|p| (p.to_string_lossy().contains("/wwn-"), p.clone()));
        names.into_iter().next()
    });
    Ok(BlockDevice {
        given: path.to_owned(),
        node,
        name,
        devno,
        size_bytes: sectors * 512,
        logical_block,
        stable,
    })
}

/// The device and its partitions (major:minor).
fn with_partitions(dev: &BlockDevice) -> BTreeSet<(u64, u64)> {
    let mut out = BTreeSet::from([dev.devno]);
    if let Ok(d) = std::fs::read_dir(dev.sys()) {
        for e in d.flatten() {
            let p = e.path();
            if p.join("partition").exists() {
                if let Some(n) = read_trim(&p.join("dev")).and_then(|s| parse_devno(&s)) {
                    out.insert(n);
                }
            }
        }
    }
    out
}

/// The whole disks a device lives on: through device-mapper/md slaves
/// down to disks, partitions up to their disk.
fn base_disks(devno: (u64, u64), depth: u32) -> BTreeSet<(u64, u64)> {
    let sys = sys_dir(devno);
    let mut out = BTreeSet::new();
    if depth > 8 {
        return out;
    }
    let slaves: Vec<(u64, u64)> = std::fs::read_dir(sys.join("slaves"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| read_trim(&e.path().join("dev")).and_then(|s| parse_devno(&s)))
                .collect()
        })
        .unwrap_or_default();
    if !slaves.is_empty() {
        for s in slaves {
            out.extend(base_disks(s, depth + 1));
        }
    } else if sys.join("partition").exists() {
        if let Some(n) = read_trim(&sys.join("../dev")).and_then(|s| parse_devno(&s)) {
            out.insert(n);
        }
    } else {
        out.insert(devno);
    }
    out
}

/// Mount points by device number, from /proc/self/mountinfo. Fails
/// closed: unreadable is not "nothing mounted" (review).
fn mounts() -> Result<Vec<((u64, u64), String)>> {
    Ok(std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("read /proc/self/mountinfo"))?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((parse_devno(f.get(2)?)?, (*f.get(4)?).to_owned()))
        })
        .collect())
}

/// Refuses a device that is mounted, used as swap or held by another
/// kernel user.
pub fn check_unused(dev: &BlockDevice) -> Result<()> {
    let path = dev.given.display().to_string();
    let mine = with_partitions(dev);
    if let Some((_, at)) = mounts()?.into_iter().find(|(n, _)| mine.contains(n)) {
        return Err(StorageError::Mounted {
            path,
            mountpoint: at,
        });
    }
    let swaps = std::fs::read_to_string("/proc/swaps").map_err(io("read /proc/swaps"))?;
    for l in swaps.lines().skip(1) {
        if let Some(p) = l.split_whitespace().next() {
            if let Ok(Some(n)) = probe(Path::new(p)).map(|d| Some(d.devno)) {
                if mine.contains(&n) {
                    return Err(StorageError::Mounted {
                        path,
                        mountpoint: "swap".into(),
                    });
                }
            }
        }
    }
    let mut holders = Vec::new();
    for n in &mine {
        if let Ok(d) = std::fs::read_dir(sys_dir(*n).join("holders")) {
            holders.extend(
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
    }
    if !holders.is_empty() {
        return Err(StorageError::InUse {
            path,
            holders: holders.join(", "),
        });
    }
    // The kernel's own answer last: an exclusive open is refused (EBUSY)
    // while anything has the device, or a partition of it, claimed — a
    // filesystem whose device number mountinfo does not show (btrfs, ZFS:
    // an anonymous one), a mount in another mount namespace, an exclusive
    // opener. The lists above only name the usual holders (review: a
    // btrfs root disk passed them).
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
        .open(&dev.node)
    {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => Err(StorageError::InUse {
            path,
            holders: "the kernel (an exclusive open is refused: mounted in another namespace, a btrfs or ZFS member, or held open exclusively)".into(),
        }),
        Err(e) => Err(StorageError::Io {
            what: format!("open {} exclusively", dev.node.display()),
            source: e,
        }),
    }
}

/// Refuses the disk (or a partition of the disk) that holds `/`.
pub fn check_not_root(dev: &BlockDevice) -> Result<()> {
    let root = std::fs::metadata("/").map_err(io("stat /"))?.dev();
    let root = (nix::sys::stat::major(root), nix::sys::stat::minor(root));
    let root_disks = base_disks(root, 0);
    let mine = base_disks(dev.devno, 0);
    if root_disks.iter().any(|d| mine.contains(d)) || root == dev.devno {
        return Err(StorageError::RootDisk {
            path: dev.given.display().to_string(),
        });
    }
    Ok(())
}

/// What blkid finds on the device (a filesystem, partition table, RAID or
/// LVM member …), or None. Low-level probing (`-p`): the cache is not
/// trusted.
pub fn signature(dev: &BlockDevice) -> Result<Option<String>> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(&dev.node)
        .output()
        .map_err(io("run blkid"))?;
    match out.status.code() {
        Some(0) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let get = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_owned))
            };
            let what = match (get("TYPE"), get("PTTYPE")) {
                (_, Some(pt)) => format!("a {pt} partition table"),
                (Some(t), None) => format!("a {t} signature"),
                (None, None) => "a signature blkid recognises".to_owned(),
            };
            Ok(Some(what))
        }
        // 2: nothing found.
        Some(2) => Ok(None),
        _ => Err(StorageError::Command {
            cmd: "blkid".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

/// Every check `volume init` makes before writing: not mounted or held,
/// not the root disk, and no signature unless `force`.
pub fn check_for_init(dev: &BlockDevice, force: bool) -> Result<()> {
    // The root disk first: "mounted at /" would be true but less telling.
    check_not_root(dev)?;
    check_unused(dev)?;
    if let Some(what) = signature(dev)? {
        if !force {
            return Err(StorageError::Signature {
                path: dev.given.display().to_string(),
                what,
            });
        }
        tracing::warn!(device = %dev.given.display(), %what, "overwriting a device that carries a signature (forced)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_block_device_is_named() {
        let e = probe(Path::new("/etc/hostname")).unwrap_err().to_string();
        assert_eq!(e, "/etc/hostname: not a block device");
        let e = probe(Path::new("/dev/nonexistent-x"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/dev/nonexistent-x: No such file"), "{e}");
    }

    #[test]
    fn devno_parsing() {
        assert_eq!(parse_devno("253:0"), Some((253, 0)));
        assert_eq!(parse_devno("x"), None);
    }
}
