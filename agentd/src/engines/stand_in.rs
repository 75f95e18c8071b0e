//! Stand-ins for what a development host lacks, so that the whole start
//! path (a tenant's call, the bus, polkit, the controller, the runtime, the
//! shim) can be measured there: feature `bench-stand-ins`, never in a
//! package (scripts/build-deb refuses it; docs/engines.md, "The whole path
//! off emulation"). Each is chosen at start by an environment variable, only
//! in development mode (`--dev`), and announced on the agent's standard
//! output and log.
//!
//! - `LEASEHOLD_BENCH_VOLUME_DIR=DIR`: DIR (a plain directory, NOT
//!   encrypted) stands for the mounted tenant volume; the host has no
//!   device-mapper.
//! - `LEASEHOLD_BENCH_NO_CONTROLLERS=1`: the engines' cgroups are real
//!   cgroup v2 directories (the shim's join is a real migration) but no
//!   controller is enabled and no limit written: the host's cgroup v2 has
//!   none (they are bound to v1). Usage reads zero.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use leasehold_engines::cgroup::{
    Action, CgroupError, CgroupFs, CgroupPath, Cgroups, Controller, Usage,
};

use super::VolumeDir;

/// A plain directory in place of the mounted tenant volume.
struct PlainVolume(PathBuf);

impl VolumeDir for PlainVolume {
    fn mounted(&self) -> Option<PathBuf> {
        Some(self.0.clone())
    }
}

/// cgroupfs without controllers: every other operation is the real one.
struct NoControllers(CgroupFs);

impl Cgroups for NoControllers {
    fn create(&self, cg: &CgroupPath) -> Result<Action, CgroupError> {
        self.0.create(cg)
    }
    fn enable_controllers(&self, _: &CgroupPath, _: &[Controller]) -> Result<Action, CgroupError> {
        Ok(Action::Identity)
    }
    fn set_limits(&self, _: &CgroupPath, _: &[(&str, String)]) -> Result<(), CgroupError> {
        Ok(())
    }
    fn usage(&self, _: &CgroupPath) -> Result<Usage, CgroupError> {
        Ok(Usage::default())
    }
    fn add_pid(&self, cg: &CgroupPath, pid: u32) -> Result<(), CgroupError> {
        self.0.add_pid(cg, pid)
    }
    fn pids(&self, cg: &CgroupPath) -> Result<Vec<u32>, CgroupError> {
        self.0.pids(cg)
    }
    fn kill(&self, cg: &CgroupPath) -> Result<(), CgroupError> {
        self.0.kill(cg)
    }
    fn remove(&self, cg: &CgroupPath) -> Result<Action, CgroupError> {
        self.0.remove(cg)
    }
    fn dir(&self, cg: &CgroupPath) -> PathBuf {
        self.0.dir(cg)
    }
}

fn announce(what: &str) {
    println!("bench stand-in:       {what}");
    tracing::warn!("bench stand-in: {what}");
}

/// The volume the runtime and uploads use: `volume`, or the stand-in
/// (development mode only).
pub fn volume(volume: Arc<dyn VolumeDir>, dev: bool) -> Arc<dyn VolumeDir> {
    match std::env::var_os("LEASEHOLD_BENCH_VOLUME_DIR") {
        Some(_) if !dev => {
            announce("LEASEHOLD_BENCH_VOLUME_DIR ignored: only with --dev");
            volume
        }
        Some(dir) if Path::new(&dir).is_absolute() => {
            let dir = PathBuf::from(dir);
            announce(&format!(
                "the tenant volume is the plain directory {} (not encrypted)",
                dir.display()
            ));
            Arc::new(PlainVolume(dir))
        }
        Some(dir) => {
            announce(&format!(
                "LEASEHOLD_BENCH_VOLUME_DIR {dir:?} is not absolute: ignored"
            ));
            volume
        }
        None => volume,
    }
}

/// The engines' cgroups: `fs`, or the same without controllers
/// (development mode only).
pub fn cgroups(fs: CgroupFs, dev: bool) -> Arc<dyn Cgroups> {
    if std::env::var_os("LEASEHOLD_BENCH_NO_CONTROLLERS").is_some_and(|v| v == "1") {
        if dev {
            announce("engine cgroups without controllers: no limit is enforced");
            return Arc::new(NoControllers(fs));
        }
        announce("LEASEHOLD_BENCH_NO_CONTROLLERS ignored: only with --dev");
    }
    Arc::new(fs)
}
