//! The dm-crypt mapping, through the devicemapper crate (ioctls, with udev
//! synchronisation so /dev/mapper/NAME exists when `open` returns).
//!
//! Table: `aes-xts-plain64 :64:logon:leasehold:<id> 0 <device> 0 <n>
//! <options>`: the key is named, not written (see [`crate::keyring`]).
//! Closing first replaces the table with an `error` target, so the key
//! leaves kernel memory even if something still holds the device open
//! (the removal is then deferred to the last close).

use std::path::{Path, PathBuf};

use devicemapper::{DevId, DmFlags, DmName, DmOptions, DmUuid, DM};

use crate::{Result, StorageError};

/// Mapping name (/dev/mapper/leasehold-tenant).
pub const NAME: &str = "leasehold-tenant";
/// Cipher: XTS needs a double-length key.
pub const CIPHER: &str = "aes-xts-plain64";
/// Key size in bytes.
pub const KEY_BYTES: usize = 64;

/// Parameters of the crypt target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptTable {
    /// The backing device node.
    pub device: PathBuf,
    /// Length in 512-byte sectors.
    pub sectors: u64,
    /// Keyring description of the key (`leasehold:<id>`).
    pub key_description: String,
    /// Optional parameters (sector_size:4096, no_read_workqueue, …).
    pub options: Vec<String>,
}

/// Optional dm-crypt parameters for a sector size and the two switches.
pub fn options(sector_size: u32, bypass_workqueues: bool, discards: bool) -> Vec<String> {
    let mut o = Vec::new();
    if discards {
        o.push("allow_discards".to_owned());
    }
    if bypass_workqueues {
        o.push("no_read_workqueue".to_owned());
        o.push("no_write_workqueue".to_owned());
    }
    if sector_size != 512 {
        o.push(format!("sector_size:{sector_size}"));
    }
    o
}

impl CryptTable {
    /// The target's parameter string, as the kernel shows it back.
    pub fn params(&self) -> String {
        let mut s = format!(
            "{CIPHER} :{KEY_BYTES}:logon:{} 0 {} 0",
            self.key_description,
            self.device.display()
        );
        if !self.options.is_empty() {
            s.push_str(&format!(
                " {} {}",
                self.options.len(),
                self.options.join(" ")
            ));
        }
        s
    }
}

/// Whether device-mapper is in the running kernel: its control device is
/// listed in /proc/misc once dm_mod is loaded (or built in). Without it no
/// mapping can exist, so no disk key can be in a dm table: that is what
/// lets a key change go ahead on a host without device-mapper.
pub fn kernel_has_dm() -> Result<bool> {
    // Fail closed: if /proc/misc cannot be read, nothing is proven.
    let misc = std::fs::read_to_string("/proc/misc").map_err(crate::io("read /proc/misc"))?;
    Ok(misc_has_dm(&misc))
}

fn misc_has_dm(misc: &str) -> bool {
    misc.lines()
        .any(|l| l.split_whitespace().nth(1) == Some("device-mapper"))
}

/// Checks, writing nothing, that a dm-crypt mapping can be made: the
/// kernel has device-mapper, its control device opens, and the `crypt`
/// target is loaded (after `modprobe dm_crypt` if it was not). `volume
/// init` runs this before it records or writes anything.
pub fn check_crypt_usable() -> Result<()> {
    if !kernel_has_dm()? {
        return Err(StorageError::Unavailable(
            "device-mapper is not in this kernel (no device-mapper in /proc/misc): load it with `modprobe dm_crypt` (or use a kernel with CONFIG_DM_CRYPT) and try again (nothing was written)".into(),
        ));
    }
    let dm = DM::new().map_err(|e| {
        StorageError::Unavailable(format!(
            "device-mapper: cannot open /dev/mapper/control: {e} (nothing was written)"
        ))
    })?;
    let has_crypt = |dm: &DM| {
        dm.list_versions()
            .map(|v| v.iter().any(|t| t.0 == "crypt"))
            .map_err(|e| StorageError::Dm(format!("list the loaded targets: {e}")))
    };
    if has_crypt(&dm)? {
        return Ok(());
    }
    // The kernel would load it at the first table load too; asking now
    // makes a missing module an error before anything is written.
    let _ = std::process::Command::new("modprobe")
        .args(["-q", "dm_crypt"])
        .status();
    if has_crypt(&dm)? || crypt_module_installed() {
        // Not loaded and this process may not load modules (the agent's
        // unit has no CAP_SYS_MODULE): the kernel loads an installed module
        // itself at the first table that names `crypt`.
        return Ok(());
    }
    Err(StorageError::Unavailable(
        "the dm-crypt target is not available (`modprobe dm_crypt` failed; is the module installed?) (nothing was written)".into(),
    ))
}

/// Whether the running kernel has dm-crypt as an installed module or built
/// in (`modules.dep` / `modules.builtin` of its release).
fn crypt_module_installed() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let dir = Path::new("/lib/modules").join(release.trim());
    ["modules.dep", "modules.builtin"].iter().any(|f| {
        std::fs::read_to_string(dir.join(f)).is_ok_and(|list| {
            list.lines().filter_map(|l| l.split(':').next()).any(|m| {
                m.rsplit('/')
                    .next()
                    .is_some_and(|b| b.starts_with("dm-crypt.ko"))
            })
        })
    })
}

fn dm() -> Result<DM> {
    DM::new().map_err(|e| StorageError::Dm(format!("cannot open /dev/mapper/control: {e}")))
}

fn name(n: &str) -> Result<&DmName> {
    DmName::new(n).map_err(|e| StorageError::Dm(format!("mapping name {n:?}: {e}")))
}

/// /dev/mapper/NAME.
pub fn devnode(n: &str) -> PathBuf {
    Path::new("/dev/mapper").join(n)
}

/// Whether the mapping exists (never, without device-mapper).
pub fn exists(n: &str) -> Result<bool> {
    if !kernel_has_dm()? {
        return Ok(false);
    }
    devicemapper::device_exists(&dm()?, name(n)?)
        .map_err(|e| StorageError::Dm(format!("looking up {n}: {e}")))
}

/// Creates the mapping with `table` (its key must be in the process
/// keyring) and activates it. Nothing is left behind on failure.
pub fn open(n: &str, uuid: &str, table: &CryptTable) -> Result<PathBuf> {
    let dm = dm()?;
    let dn = name(n)?;
    let du = DmUuid::new(uuid).map_err(|e| StorageError::Dm(format!("uuid {uuid:?}: {e}")))?;
    dm.device_create(dn, Some(du), DmOptions::default())
        .map_err(|e| StorageError::Dm(format!("create {n}: {e}")))?;
    let id = DevId::Name(dn);
    let line = [(0, table.sectors, "crypt".to_owned(), table.params())];
    let r = dm
        .table_load(&id, &line, DmOptions::default())
        .map_err(|e| StorageError::Dm(format!("load the crypt table of {n}: {e}")))
        .and_then(|_| {
            dm.device_suspend(&id, DmOptions::default())
                .map_err(|e| StorageError::Dm(format!("activate {n}: {e}")))
        });
    if let Err(e) = r {
        let _ = dm.device_remove(&id, DmOptions::default());
        return Err(e);
    }
    Ok(devnode(n))
}

/// How a close ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// There was no mapping.
    Absent,
    /// Removed.
    Removed,
    /// The key is gone (error table) but something still holds the device;
    /// the kernel removes it at the last close.
    Deferred,
}

/// Wipes the key from the kernel: an `error` table replaces the crypt
/// table, so dm-crypt frees its key even while something still holds the
/// device. The filesystem on it is not frozen or flushed first (nothing
/// more is written under this key; I/O in flight fails), so this takes
/// one table swap whatever is mounted. Returns whether the mapping existed.
pub fn wipe_key(n: &str) -> Result<bool> {
    if !kernel_has_dm()? {
        // No device-mapper, no mapping: the kernel holds no key.
        return Ok(false);
    }
    let dm = dm()?;
    let dn = name(n)?;
    if !devicemapper::device_exists(&dm, dn)
        .map_err(|e| StorageError::Dm(format!("looking up {n}: {e}")))?
    {
        return Ok(false);
    }
    let id = DevId::Name(dn);
    // Fail closed: a table that cannot be read, or has no length, is not
    // a table whose key was wiped.
    let sectors = read_table(&dm, &id, n)?
        .iter()
        .map(|l| l.0 + l.1)
        .max()
        .unwrap_or(0);
    if sectors == 0 {
        return Err(StorageError::Dm(format!(
            "{n}: the mapping has an empty table; its key was not wiped"
        )));
    }
    let line = [(0, sectors, "error".to_owned(), String::new())];
    // Resume with the new table; no fs freeze, in-flight I/O requeued
    // to `error` rather than waited for.
    dm.table_load(&id, &line, DmOptions::default())
        .and_then(|_| {
            dm.device_suspend(
                &id,
                DmOptions::default().set_flags(DmFlags::DM_SKIP_LOCKFS | DmFlags::DM_NOFLUSH),
            )
        })
        .map_err(|e| StorageError::Dm(format!("replace the crypt table of {n}: {e}")))?;
    // Read back: the live table must be `error` only, with no key left.
    let live = read_table(&dm, &id, n)?;
    if live.is_empty() || live.iter().any(|l| l.2 != "error") {
        return Err(StorageError::Dm(format!(
            "{n}: the live table is still {:?} after the swap; its key may still be in the kernel",
            live.iter().map(|l| l.2.as_str()).collect::<Vec<_>>()
        )));
    }
    Ok(true)
}

type TableLines = Vec<(u64, u64, String, String)>;

fn read_table(dm: &DM, id: &DevId<'_>, n: &str) -> Result<TableLines> {
    dm.table_status(id, DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE))
        .map(|(_, t)| t)
        .map_err(|e| StorageError::Dm(format!("read the table of {n}: {e}")))
}

/// Wipes the key from the kernel (`wipe_key`) and removes the mapping.
pub fn close(n: &str) -> Result<Closed> {
    let wiped = match wipe_key(n) {
        Ok(false) => return Ok(Closed::Absent),
        Ok(true) => Ok(()),
        Err(e) => Err(e),
    };
    let dm = dm()?;
    let id = DevId::Name(name(n)?);
    if let Err(e) = wiped {
        // A mapping whose table could not be swapped (e.g. none was ever
        // made live) still goes: removing the device drops every table it
        // holds, key included. Only an immediate removal counts.
        return dm
            .device_remove(&id, DmOptions::default())
            .map(|_| Closed::Removed)
            .map_err(|_| e);
    }
    match dm.device_remove(&id, DmOptions::default()) {
        Ok(_) => Ok(Closed::Removed),
        Err(_) => {
            dm.device_remove(
                &id,
                DmOptions::default().set_flags(DmFlags::DM_DEFERRED_REMOVE),
            )
            .map_err(|e| StorageError::Dm(format!("remove {n}: {e}")))?;
            // Its name is freed for the next mapping (the remake right
            // after): the device goes when its last holder lets go, under
            // another name. Before, a tenant's shell left in the volume
            // during a key change made the remake fail ("exists") until
            // the holder exited and the agent restarted (review).
            let gone = gone_name(n);
            match name(&gone) {
                Ok(g) => {
                    if let Err(e) = dm.device_rename(name(n)?, &DevId::Name(g)) {
                        tracing::warn!(mapping = n, error = %e, "the wiped mapping awaiting removal could not be renamed: its name stays taken until its holder lets go");
                    }
                }
                Err(e) => tracing::warn!(mapping = n, error = %e, "no name for the wiped mapping"),
            }
            Ok(Closed::Deferred)
        }
    }
}

/// Every mapping whose table has a `crypt` line keyed by the logon key
/// `description` (whatever its name: an operator may have renamed it).
pub fn keyed_by(description: &str) -> Result<Vec<String>> {
    if !kernel_has_dm()? {
        return Ok(Vec::new());
    }
    let dm = dm()?;
    let key = format!(":logon:{description} ");
    let mut found = Vec::new();
    let devices = dm
        .list_devices()
        .map_err(|e| StorageError::Dm(format!("list the mappings: {e}")))?;
    for (dn, _, _) in devices {
        let n = dn.to_string();
        let lines = match read_table(&dm, &DevId::Name(&dn), &n) {
            Ok(l) => l,
            // Gone meanwhile: not keyed by it. Still there but unreadable:
            // it may hold the key, so no answer (fail closed).
            Err(e) => {
                if devicemapper::device_exists(&dm, &dn).unwrap_or(true) {
                    return Err(e);
                }
                continue;
            }
        };
        if lines
            .iter()
            .any(|l| l.2 == "crypt" && format!("{} ", l.3).contains(&key))
        {
            found.push(n);
        }
    }
    Ok(found)
}

/// The name a wiped mapping awaiting removal takes: `NAME.gone.NANOS`
/// (unique; dm names are at most 127 bytes).
fn gone_name(n: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{n}.gone.{nanos}")
}

/// The active table's lines as `type params` (what `dmsetup table
/// --showkeys` prints after the start and length).
pub fn table(n: &str) -> Result<Option<Vec<String>>> {
    if !kernel_has_dm()? {
        return Ok(None);
    }
    let dm = dm()?;
    let dn = name(n)?;
    if !devicemapper::device_exists(&dm, dn)
        .map_err(|e| StorageError::Dm(format!("looking up {n}: {e}")))?
    {
        return Ok(None);
    }
    let (_, lines) = dm
        .table_status(
            &DevId::Name(dn),
            DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
        )
        .map_err(|e| StorageError::Dm(format!("read the table of {n}: {e}")))?;
    Ok(Some(
        lines
            .into_iter()
            .map(|l| format!("{} {}", l.2, l.3))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wiped_mappings_new_name_is_a_valid_dm_name_of_its_own() {
        let a = gone_name(NAME);
        assert!(
            a.starts_with("leasehold-tenant.gone.") && a.len() <= 127,
            "{a}"
        );
        assert!(name(&a).is_ok());
        assert_ne!(a, NAME);
    }

    #[test]
    fn device_mapper_is_found_in_proc_misc() {
        assert!(misc_has_dm(" 58 rfkill\n236 device-mapper\n"));
        assert!(!misc_has_dm("237 loop-control\n229 fuse\n"));
        assert!(!misc_has_dm(""));
    }

    #[test]
    fn table_names_the_key_and_carries_options() {
        let t = CryptTable {
            device: "/dev/vdb".into(),
            sectors: 2_097_152,
            key_description: "leasehold:ab12".into(),
            options: options(4096, true, false),
        };
        assert_eq!(
            t.params(),
            "aes-xts-plain64 :64:logon:leasehold:ab12 0 /dev/vdb 0 3 no_read_workqueue no_write_workqueue sector_size:4096"
        );
        let t = CryptTable {
            options: options(512, false, false),
            ..t
        };
        assert_eq!(
            t.params(),
            "aes-xts-plain64 :64:logon:leasehold:ab12 0 /dev/vdb 0"
        );
    }
}
