//! cgroup v2 for engines: cgroupfs behind a small trait with an injectable
//! root directory (the idea of youki's
//! `create_cgroup_manager_with_root(Option<&Path>)`).
//!
//! # The tree
//!
//! ```text
//! <delegated unit cgroup>/                 Delegate=yes; subtree_control: +cpu +memory +io +pids
//! ├── agent/                               the process(es) that own the unit (leaf)
//! └── tenant/                              the landlord's budget; subtree_control: same controllers
//!     ├── <engine>/                        one leaf per engine: its shim, its pid 1, its children
//!     └── <engine>/
//! ```
//!
//! cgroup v2's no-internal-processes rule: a cgroup that distributes a
//! controller to its children (non-empty `cgroup.subtree_control`) holds no
//! process itself. So processes live only in leaves (`agent/`, each engine),
//! and `tenant/` only carries the budget. Writing a pid into a cgroup whose
//! `subtree_control` is non-empty fails with `EBUSY`; that is why the
//! process that systemd starts in the unit's own cgroup must move to
//! `agent/` *before* controllers are enabled on the unit cgroup, and why
//! (see docs/engines.md, "Launcher") the unit that holds engines must not be
//! the one that is restarted on an agent upgrade.
//!
//! # Why not cgroups-rs
//!
//! cgroups-rs 0.5 pulls in zbus 5 (the workspace is on zbus 6: two D-Bus
//! stacks in one binary) and, when a controller is not enabled, skips the
//! limit silently. Here an absent controller or limit file is an error
//! ([`CgroupError::ControllerAbsent`], [`CgroupError::Absent`]): an engine
//! must never start believing it is limited when it is not. What engines need
//! is a dozen file writes; they sit behind [`Cgroups`], with [`CgroupFs`]
//! the one implementation (pointed at `/sys/fs/cgroup/...` in production, at a
//! tempdir fixture in T0 tests).

use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// A cgroup v2 controller engines use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Controller {
    /// `cpu`: cpu.max, cpu.weight, cpu.stat.
    Cpu,
    /// `memory`: memory.max, memory.high, memory.current, memory.events.
    Memory,
    /// `io`: io.weight, io.max, io.stat.
    Io,
    /// `pids`: pids.max, pids.current.
    Pids,
}

impl Controller {
    /// Every controller engines need, in the order they are enabled.
    pub const ALL: [Controller; 4] = [
        Controller::Cpu,
        Controller::Memory,
        Controller::Io,
        Controller::Pids,
    ];

    /// The name in `cgroup.controllers` and `cgroup.subtree_control`.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Memory => "memory",
            Controller::Io => "io",
            Controller::Pids => "pids",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A cgroup below the manager's root: relative, only normal components.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CgroupPath(PathBuf);

impl CgroupPath {
    /// Validates `path`: relative, not empty, no `..`, `.` or root component.
    pub fn new(path: impl AsRef<Path>) -> Result<Self, CgroupError> {
        let path = path.as_ref();
        let ok = path.components().next().is_some()
            && path.components().all(|c| matches!(c, Component::Normal(_)));
        if ok {
            Ok(CgroupPath(path.to_path_buf()))
        } else {
            Err(CgroupError::InvalidPath(path.to_path_buf()))
        }
    }

    /// The child `name` of this cgroup (`name` must be one normal component).
    pub fn child(&self, name: &str) -> Result<Self, CgroupError> {
        let p = Path::new(name);
        if p.components().count() != 1
            || !matches!(p.components().next(), Some(Component::Normal(_)))
        {
            return Err(CgroupError::InvalidPath(self.0.join(name)));
        }
        Ok(CgroupPath(self.0.join(name)))
    }

    /// The relative path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// "Already so" is a result, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The state was changed.
    Done,
    /// The state was already as asked.
    Identity,
}

/// One line of `io.stat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoStat {
    /// `MAJ:MIN` of the device.
    pub device: String,
    /// Bytes read.
    pub rbytes: u64,
    /// Bytes written.
    pub wbytes: u64,
    /// Read operations.
    pub rios: u64,
    /// Write operations.
    pub wios: u64,
}

/// What an engine's cgroup has used, read from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// `cpu.stat` `usage_usec`.
    pub cpu_usage_usec: u64,
    /// `memory.current`, bytes.
    pub memory_current: u64,
    /// `memory.events` `oom_kill`.
    pub oom_kills: u64,
    /// `pids.current`.
    pub pids_current: u64,
    /// `io.stat`, one entry per device.
    pub io: Vec<IoStat>,
}

/// Errors of the cgroup module; each names the file or cgroup concerned.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// Not a relative path of normal components.
    #[error("invalid cgroup path {0:?}: must be relative, without '..'")]
    InvalidPath(PathBuf),
    /// A limit file name that is not a plain `<controller>.<key>` file.
    #[error("invalid cgroup file name {0:?}")]
    InvalidFile(String),
    /// A controller is not available where it was asked for.
    #[error("controller {controller} is not available in {}/cgroup.controllers", cgroup.display())]
    ControllerAbsent {
        /// The cgroup directory.
        cgroup: PathBuf,
        /// The missing controller.
        controller: Controller,
    },
    /// A file or cgroup that should exist does not (controller not enabled,
    /// cgroup not created, kernel without the feature).
    #[error("{} does not exist", path.display())]
    Absent {
        /// The file or directory.
        path: PathBuf,
    },
    /// A read or write failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// "read", "write", "mkdir", "rmdir".
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A file's content could not be parsed.
    #[error("cannot parse {}: {detail}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A write was accepted but reading back shows something else.
    #[error("{} reads {found:?} after writing {wanted:?}", path.display())]
    NotApplied {
        /// The file.
        path: PathBuf,
        /// What was written.
        wanted: String,
        /// What was read back.
        found: String,
    },
    /// `cgroup.procs` still lists processes.
    #[error("{} still holds {count} process(es)", cgroup.display())]
    NotEmpty {
        /// The cgroup directory.
        cgroup: PathBuf,
        /// How many processes.
        count: usize,
    },
}

/// cgroup operations engines need. Paths are relative to the manager's root.
pub trait Cgroups: Send + Sync {
    /// Creates `cg` (and missing parents).
    fn create(&self, cg: &CgroupPath) -> Result<Action, CgroupError>;
    /// Enables `controllers` in `cg`'s `cgroup.subtree_control` (each must
    /// be listed in `cg`'s `cgroup.controllers`) and reads it back.
    fn enable_controllers(
        &self,
        cg: &CgroupPath,
        controllers: &[Controller],
    ) -> Result<Action, CgroupError>;
    /// Writes limit files, e.g. `("memory.max", "268435456")`; each file
    /// must exist (its controller enabled by the parent).
    fn set_limits(&self, cg: &CgroupPath, limits: &[(&str, String)]) -> Result<(), CgroupError>;
    /// Reads usage counters.
    fn usage(&self, cg: &CgroupPath) -> Result<Usage, CgroupError>;
    /// Moves process `pid` into `cg`.
    fn add_pid(&self, cg: &CgroupPath, pid: u32) -> Result<(), CgroupError>;
    /// The pids in `cg` (not its children).
    fn pids(&self, cg: &CgroupPath) -> Result<Vec<u32>, CgroupError>;
    /// Kills every process in `cg` and its children (`cgroup.kill`).
    fn kill(&self, cg: &CgroupPath) -> Result<(), CgroupError>;
    /// Removes `cg`; it must be empty. `Identity` if already gone.
    fn remove(&self, cg: &CgroupPath) -> Result<Action, CgroupError>;
    /// The absolute directory of `cg` (the launch spec names it; the launcher moves the shim into it).
    fn dir(&self, cg: &CgroupPath) -> PathBuf;
    /// The names of `cg`'s child cgroups (its subdirectories); none when
    /// `cg` does not exist.
    fn children(&self, cg: &CgroupPath) -> Result<Vec<String>, CgroupError> {
        let dir = self.dir(cg);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &dir, e)),
        };
        let mut names = Vec::new();
        for d in rd {
            let d = d.map_err(|e| io_err("read", &dir, e))?;
            if d.file_type().is_ok_and(|t| t.is_dir()) {
                if let Ok(n) = d.file_name().into_string() {
                    names.push(n);
                }
            }
        }
        names.sort();
        Ok(names)
    }
}

/// cgroupfs at a root directory: `/sys/fs/cgroup/<unit cgroup>` in
/// production, a tempdir fixture in tests.
#[derive(Debug, Clone)]
pub struct CgroupFs {
    root: PathBuf,
}

/// The standard cgroup v2 mount point.
pub const CGROUP2_MOUNT: &str = "/sys/fs/cgroup";

impl CgroupFs {
    /// A manager rooted at `root`, or at [`CGROUP2_MOUNT`] if `None`.
    pub fn with_root(root: Option<&Path>) -> Self {
        CgroupFs {
            root: root.map_or_else(|| PathBuf::from(CGROUP2_MOUNT), Path::to_path_buf),
        }
    }

    /// The process's own cgroup v2 path from `/proc/self/cgroup` (the
    /// `0::` line), e.g. `/system.slice/leasehold-agentd.service`.
    pub fn own_cgroup() -> Result<PathBuf, CgroupError> {
        let path = PathBuf::from("/proc/self/cgroup");
        let text = read(&path)?;
        parse_own_cgroup(&text).ok_or(CgroupError::Parse {
            path,
            detail: "no cgroup v2 (0::) line".into(),
        })
    }

    fn file(&self, cg: &CgroupPath, name: &str) -> PathBuf {
        self.dir(cg).join(name)
    }

    fn read_u64(&self, cg: &CgroupPath, name: &str) -> Result<u64, CgroupError> {
        let path = self.file(cg, name);
        let text = read(&path)?;
        text.trim().parse().map_err(|e| CgroupError::Parse {
            path,
            detail: format!("{e}"),
        })
    }

    fn read_key(&self, cg: &CgroupPath, name: &str, key: &str) -> Result<u64, CgroupError> {
        let path = self.file(cg, name);
        let text = read(&path)?;
        flat_keyed(&text, key).ok_or_else(|| CgroupError::Parse {
            path,
            detail: format!("no numeric {key:?} line"),
        })
    }
}

fn parse_own_cgroup(text: &str) -> Option<PathBuf> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(PathBuf::from)
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|e| io_err("read", path, e))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    // No create: a limit file that is not there is a controller that is
    // not enabled, which must be an error. Truncate so fixtures behave like
    // cgroupfs (which ignores it).
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_err("write", path, e))?;
    io::Write::write_all(&mut f, value.as_bytes()).map_err(|e| io_err("write", path, e))
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> CgroupError {
    if source.kind() == io::ErrorKind::NotFound {
        CgroupError::Absent {
            path: path.to_path_buf(),
        }
    } else {
        CgroupError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A "key value" line of a flat-keyed file (cpu.stat, memory.events).
fn flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

fn parse_io_stat(text: &str) -> Option<Vec<IoStat>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut it = l.split_whitespace();
            let mut s = IoStat {
                device: it.next()?.to_string(),
                ..IoStat::default()
            };
            for kv in it {
                let (k, v) = kv.split_once('=')?;
                let v: u64 = v.parse().ok()?;
                match k {
                    "rbytes" => s.rbytes = v,
                    "wbytes" => s.wbytes = v,
                    "rios" => s.rios = v,
                    "wios" => s.wios = v,
                    _ => {}
                }
            }
            Some(s)
        })
        .collect()
}

/// A limit file: `<controller>.<key>` of a controller engines use.
fn valid_limit_file(name: &str) -> bool {
    let Some((ctl, key)) = name.split_once('.') else {
        return false;
    };
    Controller::ALL.iter().any(|c| c.name() == ctl)
        && !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
}

impl Cgroups for CgroupFs {
    fn create(&self, cg: &CgroupPath) -> Result<Action, CgroupError> {
        let dir = self.dir(cg);
        if dir.is_dir() {
            return Ok(Action::Identity);
        }
        fs::create_dir_all(&dir).map_err(|e| io_err("mkdir", &dir, e))?;
        Ok(Action::Done)
    }

    fn enable_controllers(
        &self,
        cg: &CgroupPath,
        controllers: &[Controller],
    ) -> Result<Action, CgroupError> {
        let dir = self.dir(cg);
        let available = read(&dir.join("cgroup.controllers"))?;
        for &c in controllers {
            if !available.split_whitespace().any(|a| a == c.name()) {
                return Err(CgroupError::ControllerAbsent {
                    cgroup: dir,
                    controller: c,
                });
            }
        }
        let path = dir.join("cgroup.subtree_control");
        let enabled = |text: &str, c: Controller| text.split_whitespace().any(|a| a == c.name());
        let before = read(&path)?;
        let missing: Vec<Controller> = controllers
            .iter()
            .copied()
            .filter(|&c| !enabled(&before, c))
            .collect();
        if missing.is_empty() {
            return Ok(Action::Identity);
        }
        let wanted = missing
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        write(&path, &wanted)?;
        let after = read(&path)?;
        if let Some(c) = controllers.iter().find(|&&c| !enabled(&after, c)) {
            return Err(CgroupError::NotApplied {
                path,
                wanted: format!("+{c}"),
                found: after.trim().to_string(),
            });
        }
        Ok(Action::Done)
    }

    fn set_limits(&self, cg: &CgroupPath, limits: &[(&str, String)]) -> Result<(), CgroupError> {
        // Validate every name before writing anything.
        if let Some((bad, _)) = limits.iter().find(|(f, _)| !valid_limit_file(f)) {
            return Err(CgroupError::InvalidFile((*bad).to_string()));
        }
        for (file, value) in limits {
            write(&self.file(cg, file), value)?;
        }
        Ok(())
    }

    fn usage(&self, cg: &CgroupPath) -> Result<Usage, CgroupError> {
        let io_path = self.file(cg, "io.stat");
        let io_text = read(&io_path)?;
        Ok(Usage {
            cpu_usage_usec: self.read_key(cg, "cpu.stat", "usage_usec")?,
            memory_current: self.read_u64(cg, "memory.current")?,
            oom_kills: self.read_key(cg, "memory.events", "oom_kill")?,
            pids_current: self.read_u64(cg, "pids.current")?,
            io: parse_io_stat(&io_text).ok_or(CgroupError::Parse {
                path: io_path,
                detail: "expected MAJ:MIN key=value ...".into(),
            })?,
        })
    }

    fn add_pid(&self, cg: &CgroupPath, pid: u32) -> Result<(), CgroupError> {
        let path = self.file(cg, "cgroup.procs");
        if !path.exists() {
            return Err(CgroupError::Absent { path });
        }
        // cgroup.procs takes one pid per write(2); no truncate needed on
        // cgroupfs, but fixtures are plain files.
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_err("write", &path, e))?;
        io::Write::write_all(&mut f, format!("{pid}\n").as_bytes())
            .map_err(|e| io_err("write", &path, e))
    }

    fn pids(&self, cg: &CgroupPath) -> Result<Vec<u32>, CgroupError> {
        let path = self.file(cg, "cgroup.procs");
        let text = read(&path)?;
        text.split_whitespace()
            .map(|p| {
                p.parse().map_err(|e| CgroupError::Parse {
                    path: path.clone(),
                    detail: format!("{p:?}: {e}"),
                })
            })
            .collect()
    }

    fn kill(&self, cg: &CgroupPath) -> Result<(), CgroupError> {
        write(&self.file(cg, "cgroup.kill"), "1")
    }

    fn remove(&self, cg: &CgroupPath) -> Result<Action, CgroupError> {
        let dir = self.dir(cg);
        if !dir.exists() {
            return Ok(Action::Identity);
        }
        let procs = dir.join("cgroup.procs");
        if procs.exists() {
            let count = self.pids(cg)?.len();
            if count > 0 {
                return Err(CgroupError::NotEmpty { cgroup: dir, count });
            }
        }
        // cgroupfs removes a cgroup with rmdir even though it "contains"
        // its interface files; a fixture directory needs them removed.
        match fs::remove_dir(&dir) {
            Ok(()) => Ok(Action::Done),
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty && !is_cgroupfs(&dir) => {
                fs::remove_dir_all(&dir).map_err(|e| io_err("rmdir", &dir, e))?;
                Ok(Action::Done)
            }
            Err(e) => Err(io_err("rmdir", &dir, e)),
        }
    }

    fn dir(&self, cg: &CgroupPath) -> PathBuf {
        self.root.join(cg.as_path())
    }
}

/// Whether `dir` is on a cgroup2 filesystem (never remove_dir_all there).
fn is_cgroupfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture cgroup directory with the files the kernel would create.
    fn fixture_cgroup(dir: &Path, controllers: &str) {
        fs::create_dir_all(dir).unwrap();
        for (f, v) in [
            ("cgroup.controllers", controllers),
            ("cgroup.subtree_control", ""),
            ("cgroup.procs", ""),
            ("cgroup.kill", ""),
            ("cpu.max", "max 100000\n"),
            ("cpu.weight", "100\n"),
            ("memory.max", "max\n"),
            ("memory.high", "max\n"),
            ("pids.max", "max\n"),
            ("io.weight", "default 100\n"),
            (
                "cpu.stat",
                "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n",
            ),
            ("memory.current", "4096\n"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
            ),
            ("pids.current", "2\n"),
            (
                "io.stat",
                "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
            ),
        ] {
            fs::write(dir.join(f), v).unwrap();
        }
    }

    fn setup() -> (tempfile::TempDir, CgroupFs, CgroupPath) {
        let tmp = tempfile::tempdir().unwrap();
        let cg = CgroupFs::with_root(Some(tmp.path()));
        fixture_cgroup(tmp.path(), "cpuset cpu io memory pids");
        let tenant = CgroupPath::new("tenant").unwrap();
        fixture_cgroup(&tmp.path().join("tenant"), "cpu io memory pids");
        (tmp, cg, tenant)
    }

    #[test]
    fn paths_are_relative_and_plain() {
        assert!(CgroupPath::new("tenant/web").is_ok());
        for bad in ["", "/tenant", "../x", "tenant/../x", "./x"] {
            assert!(
                matches!(CgroupPath::new(bad), Err(CgroupError::InvalidPath(_))),
                "{bad:?}"
            );
        }
        let t = CgroupPath::new("tenant").unwrap();
        assert!(t.child("web").is_ok());
        for bad in ["a/b", "..", "", "/x"] {
            assert!(t.child(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_cgroup_line() {
        let text = "12:pids:/x\n0::/system.slice/leasehold-agentd.service\n";
        assert_eq!(
            parse_own_cgroup(text),
            Some(PathBuf::from("/system.slice/leasehold-agentd.service"))
        );
        assert_eq!(parse_own_cgroup("1:name=systemd:/\n"), None);
    }

    #[test]
    fn create_is_idempotent() {
        let (tmp, cg, tenant) = setup();
        let web = tenant.child("web").unwrap();
        assert_eq!(cg.create(&web).unwrap(), Action::Done);
        assert!(tmp.path().join("tenant/web").is_dir());
        assert_eq!(cg.create(&web).unwrap(), Action::Identity);
    }

    #[test]
    fn enable_controllers_writes_and_reads_back() {
        let (tmp, cg, tenant) = setup();
        assert_eq!(
            cg.enable_controllers(&tenant, &Controller::ALL)
                .unwrap_err()
                .to_string(),
            // The fixture file does not echo "+cpu" as "cpu": reading back
            // finds the write, not an enabled list.
            format!(
                "{} reads \"+cpu +memory +io +pids\" after writing \"+cpu\"",
                tmp.path().join("tenant/cgroup.subtree_control").display()
            )
        );
        // As the kernel would show it:
        fs::write(
            tmp.path().join("tenant/cgroup.subtree_control"),
            "cpu io memory pids\n",
        )
        .unwrap();
        assert_eq!(
            cg.enable_controllers(&tenant, &Controller::ALL).unwrap(),
            Action::Identity
        );
    }

    #[test]
    fn absent_controller_is_an_error() {
        let (tmp, cg, tenant) = setup();
        fs::write(tmp.path().join("tenant/cgroup.controllers"), "cpu memory\n").unwrap();
        let err = cg
            .enable_controllers(&tenant, &Controller::ALL)
            .unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::ControllerAbsent {
                    controller: Controller::Io,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("tenant/cgroup.controllers"),
            "{err}"
        );
        // Nothing was written.
        assert_eq!(
            fs::read_to_string(tmp.path().join("tenant/cgroup.subtree_control")).unwrap(),
            ""
        );
    }

    #[test]
    fn limits_are_written_and_absent_files_named() {
        let (tmp, cg, tenant) = setup();
        cg.set_limits(
            &tenant,
            &[
                ("memory.max", "268435456".to_string()),
                ("cpu.max", "50000 100000".to_string()),
                ("pids.max", "64".to_string()),
            ],
        )
        .unwrap();
        let read = |f: &str| fs::read_to_string(tmp.path().join("tenant").join(f)).unwrap();
        assert_eq!(read("memory.max"), "268435456");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("pids.max"), "64");

        // A controller not enabled by the parent: its files are absent.
        fs::remove_file(tmp.path().join("tenant/io.weight")).unwrap();
        let err = cg
            .set_limits(&tenant, &[("io.weight", "default 50".to_string())])
            .unwrap_err();
        assert!(matches!(err, CgroupError::Absent { .. }), "{err}");
        assert!(err.to_string().contains("tenant/io.weight"), "{err}");
        assert!(!tmp.path().join("tenant/io.weight").exists(), "not created");
    }

    #[test]
    fn only_controller_files_are_limits() {
        let (_tmp, cg, tenant) = setup();
        for bad in [
            "cgroup.procs",
            "cgroup.kill",
            "../memory.max",
            "memory",
            "memory.",
            "foo.max",
            "memory.max/x",
        ] {
            let err = cg
                .set_limits(&tenant, &[(bad, "1".to_string())])
                .unwrap_err();
            assert!(matches!(err, CgroupError::InvalidFile(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn usage_is_parsed() {
        let (_tmp, cg, tenant) = setup();
        let u = cg.usage(&tenant).unwrap();
        assert_eq!(
            u,
            Usage {
                cpu_usage_usec: 1234,
                memory_current: 4096,
                oom_kills: 1,
                pids_current: 2,
                io: vec![IoStat {
                    device: "8:0".into(),
                    rbytes: 4096,
                    wbytes: 8192,
                    rios: 1,
                    wios: 2
                }],
            }
        );
    }

    #[test]
    fn usage_errors_name_the_file() {
        let (tmp, cg, tenant) = setup();
        fs::write(tmp.path().join("tenant/cpu.stat"), "user_usec 3\n").unwrap();
        let err = cg.usage(&tenant).unwrap_err();
        assert!(err.to_string().contains("tenant/cpu.stat"), "{err}");
        fs::remove_file(tmp.path().join("tenant/memory.events")).unwrap();
        fs::write(tmp.path().join("tenant/cpu.stat"), "usage_usec 3\n").unwrap();
        let err = cg.usage(&tenant).unwrap_err();
        assert!(matches!(err, CgroupError::Absent { .. }), "{err}");
        assert!(err.to_string().contains("tenant/memory.events"), "{err}");
    }

    #[test]
    fn pids_kill_and_remove() {
        let (tmp, cg, tenant) = setup();
        let web = tenant.child("web").unwrap();
        fixture_cgroup(&tmp.path().join("tenant/web"), "cpu io memory pids");
        cg.add_pid(&web, 42).unwrap();
        cg.add_pid(&web, 43).unwrap();
        assert_eq!(cg.pids(&web).unwrap(), vec![42, 43]);
        let err = cg.remove(&web).unwrap_err();
        assert!(
            matches!(err, CgroupError::NotEmpty { count: 2, .. }),
            "{err}"
        );
        cg.kill(&web).unwrap();
        assert_eq!(
            fs::read_to_string(tmp.path().join("tenant/web/cgroup.kill")).unwrap(),
            "1"
        );
        fs::write(tmp.path().join("tenant/web/cgroup.procs"), "").unwrap();
        assert_eq!(cg.remove(&web).unwrap(), Action::Done);
        assert_eq!(cg.remove(&web).unwrap(), Action::Identity);

        let gone = tenant.child("gone").unwrap();
        let err = cg.add_pid(&gone, 1).unwrap_err();
        assert!(matches!(err, CgroupError::Absent { .. }), "{err}");
        assert!(
            err.to_string().contains("tenant/gone/cgroup.procs"),
            "{err}"
        );
    }
}
