//! `leasehold-engine-shim --hold`: the main process of
//! `leasehold-engines.service` (Delegate=yes), the unit whose cgroup holds
//! the tenant's engines (docs/engines.md, "The engines unit").
//!
//! cgroup v2's no-internal-processes rule: a cgroup that distributes
//! controllers to its children holds no process. So the holder first moves
//! itself to `holder/` of the unit's cgroup, then enables the controllers
//! in the unit's `cgroup.subtree_control`, creates `tenant/` (the agent
//! makes `tenant/<engine>/` in it) and waits, doing nothing, until the unit
//! is stopped. It is never restarted on an upgrade: on systemd 252 a
//! restarted Delegate=yes unit kills what runs in its cgroup.

use std::path::{Path, PathBuf};

use crate::cgroup::{CgroupError, CgroupFs, CgroupPath, Cgroups, Controller};

/// The leaf the holder moves itself into.
pub const HOLDER_LEAF: &str = "holder";
/// The tenant's subtree under the unit's cgroup (the agent's
/// `engines.cgroup_subtree` ends with it).
pub const TENANT_SUBTREE: &str = "tenant";

/// Why the holder could not set the tree up.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// Not started as a unit's main process (its own cgroup is the root).
    #[error("the holder's own cgroup is the root of the hierarchy: start it as leasehold-engines.service (Delegate=yes)")]
    AtRoot,
    /// Already in a `holder/` leaf: another holder set this cgroup up.
    #[error("already in {0}: the unit's cgroup was set up by another holder")]
    AlreadyHeld(PathBuf),
    /// A cgroupfs step failed (the error names the file).
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// The unit's cgroup (relative to the mount) from the holder's own,
/// `/system.slice/leasehold-engines.service`.
pub fn unit_cgroup(own: &Path) -> Result<CgroupPath, HoldError> {
    let rel = own.strip_prefix("/").unwrap_or(own);
    if rel.as_os_str().is_empty() {
        return Err(HoldError::AtRoot);
    }
    if rel.file_name().is_some_and(|n| n == HOLDER_LEAF) {
        return Err(HoldError::AlreadyHeld(own.to_path_buf()));
    }
    Ok(CgroupPath::new(rel)?)
}

/// Sets the unit's tree up: `pid` (the holder) into `holder/` first, then
/// the controllers in the unit's subtree, then `tenant/` with the same
/// controllers. Each step is read back by [`Cgroups`]; an absent
/// controller is an error naming the file, never skipped.
pub fn prepare(cg: &impl Cgroups, unit: &CgroupPath, pid: u32) -> Result<CgroupPath, HoldError> {
    let holder = unit.child(HOLDER_LEAF)?;
    cg.create(&holder)?;
    cg.add_pid(&holder, pid)?;
    cg.enable_controllers(unit, &Controller::ALL)?;
    let tenant = unit.child(TENANT_SUBTREE)?;
    cg.create(&tenant)?;
    cg.enable_controllers(&tenant, &Controller::ALL)?;
    Ok(tenant)
}

/// Tells systemd the tree is ready (Type=notify), so the agent, ordered
/// after this unit, never finds it half made. No `NOTIFY_SOCKET`: nothing
/// to do (started by hand).
fn notify_ready() -> std::io::Result<()> {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(b"READY=1", &addr)?;
    } else {
        sock.send_to(b"READY=1", Path::new(&path))?;
    }
    Ok(())
}

/// `leasehold-engine-shim --hold`; returns only on failure (exit code).
pub fn hold_main() -> i32 {
    let cg = CgroupFs::with_root(None);
    let set_up = CgroupFs::own_cgroup()
        .map_err(HoldError::from)
        .and_then(|own| unit_cgroup(&own))
        .and_then(|unit| prepare(&cg, &unit, std::process::id()));
    let tenant = match set_up {
        Ok(t) => t,
        Err(e) => {
            eprintln!("leasehold-engine-shim --hold: {e}");
            return 1;
        }
    };
    eprintln!(
        "leasehold-engine-shim --hold: holding {}: controllers cpu memory io pids enabled",
        cg.dir(&tenant).display()
    );
    if let Err(e) = notify_ready() {
        eprintln!("leasehold-engine-shim --hold: NOTIFY_SOCKET: {e}");
        return 1;
    }
    // Nothing else to do: the unit's cgroup lives as long as this process
    // (SIGTERM, the default action, ends it when the unit stops).
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{Action, Usage};
    use std::sync::Mutex;

    /// Records every call in order; `absent` makes enabling that
    /// controller fail as the kernel's missing controller would.
    #[derive(Default)]
    struct Rec {
        log: Mutex<Vec<String>>,
        absent: Option<Controller>,
    }

    impl Rec {
        fn push(&self, s: String) {
            self.log.lock().unwrap().push(s);
        }
    }

    impl Cgroups for Rec {
        fn create(&self, cg: &CgroupPath) -> Result<Action, CgroupError> {
            self.push(format!("mkdir {cg}"));
            Ok(Action::Done)
        }
        fn enable_controllers(
            &self,
            cg: &CgroupPath,
            controllers: &[Controller],
        ) -> Result<Action, CgroupError> {
            if let Some(c) = self.absent.filter(|c| controllers.contains(c)) {
                return Err(CgroupError::ControllerAbsent {
                    cgroup: cg.as_path().to_path_buf(),
                    controller: c,
                });
            }
            let names: Vec<&str> = controllers.iter().map(|c| c.name()).collect();
            self.push(format!("enable {cg} {}", names.join(" ")));
            Ok(Action::Done)
        }
        fn set_limits(&self, _: &CgroupPath, _: &[(&str, String)]) -> Result<(), CgroupError> {
            unreachable!("the holder sets no limit")
        }
        fn usage(&self, _: &CgroupPath) -> Result<Usage, CgroupError> {
            unreachable!()
        }
        fn add_pid(&self, cg: &CgroupPath, pid: u32) -> Result<(), CgroupError> {
            self.push(format!("move {pid} {cg}"));
            Ok(())
        }
        fn pids(&self, _: &CgroupPath) -> Result<Vec<u32>, CgroupError> {
            unreachable!()
        }
        fn kill(&self, _: &CgroupPath) -> Result<(), CgroupError> {
            unreachable!("the holder kills nothing")
        }
        fn remove(&self, _: &CgroupPath) -> Result<Action, CgroupError> {
            unreachable!("the holder removes nothing")
        }
        fn dir(&self, cg: &CgroupPath) -> PathBuf {
            cg.as_path().to_path_buf()
        }
    }

    #[test]
    fn unit_cgroup_from_own_path() {
        let u = unit_cgroup(Path::new("/system.slice/leasehold-engines.service")).unwrap();
        assert_eq!(
            u.as_path(),
            Path::new("system.slice/leasehold-engines.service")
        );
        assert!(matches!(
            unit_cgroup(Path::new("/")),
            Err(HoldError::AtRoot)
        ));
        assert!(matches!(
            unit_cgroup(Path::new("/system.slice/x.service/holder")),
            Err(HoldError::AlreadyHeld(_))
        ));
    }

    /// The order that matters: the holder is in `holder/` before the
    /// unit's `subtree_control` is written (cgroupfs refuses that write
    /// with EBUSY while a process is in the unit's own cgroup), and
    /// `tenant/` is made after, so it is offered the controllers.
    #[test]
    fn holder_moves_first_then_controllers_then_tenant() {
        let rec = Rec::default();
        let unit = unit_cgroup(Path::new("/system.slice/leasehold-engines.service")).unwrap();
        let tenant = prepare(&rec, &unit, 4242).unwrap();
        let u = "system.slice/leasehold-engines.service";
        assert_eq!(tenant.as_path(), Path::new(&format!("{u}/tenant")));
        assert_eq!(
            *rec.log.lock().unwrap(),
            [
                format!("mkdir {u}/holder"),
                format!("move 4242 {u}/holder"),
                format!("enable {u} cpu memory io pids"),
                format!("mkdir {u}/tenant"),
                format!("enable {u}/tenant cpu memory io pids"),
            ]
        );
    }

    #[test]
    fn an_absent_controller_is_an_error_naming_the_cgroup() {
        let rec = Rec {
            absent: Some(Controller::Io),
            ..Rec::default()
        };
        let unit = unit_cgroup(Path::new("/u.service")).unwrap();
        let e = prepare(&rec, &unit, 1).unwrap_err().to_string();
        assert!(e.contains("u.service") && e.contains("io"), "{e}");
        // No tenant/ made.
        assert!(!rec.log.lock().unwrap().iter().any(|l| l.contains("tenant")));
    }
}
