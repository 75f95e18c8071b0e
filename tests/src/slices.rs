//! The lab's processes in CPU groups shaped like a systemd node's: the bus,
//! polkitd and agentd in `system.slice`, every user's commands in
//! `user.slice`. On a node, systemd turns the cpu controller on at the root
//! as soon as one unit needs it (the agent's unit delegates, which does), so
//! a local user's processes share the CPU with the system services as one
//! group, not thread by thread. Without this the host harness measures a
//! machine no node is: an outsider with two busy threads gets two thirds of
//! the CPU and the services the last third.
//!
//! The host has cgroup v1's cpu hierarchy (hybrid layout); a pure cgroup v2
//! host is used when its root already delegates cpu. Elsewhere the lab runs
//! flat and says so ([`Slices::describe`]).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// One lab's groups; removed on drop (once their processes are gone).
#[derive(Debug)]
pub struct Slices {
    root: PathBuf,
    system: PathBuf,
    user: PathBuf,
    kind: &'static str,
}

/// A cpu hierarchy this host offers, and its name for [`Slices::describe`].
fn hierarchy() -> Option<(PathBuf, &'static str)> {
    let v2 = PathBuf::from("/sys/fs/cgroup");
    let root_on = |f: &str| {
        fs::read_to_string(v2.join(f))
            .map(|s| s.split_whitespace().any(|c| c == "cpu"))
            .unwrap_or(false)
    };
    if root_on("cgroup.subtree_control") {
        return Some((v2, "cgroup v2"));
    }
    let v1 = PathBuf::from("/sys/fs/cgroup/cpu");
    v1.join("cpu.shares")
        .exists()
        .then_some((v1, "cgroup v1 cpu"))
}

impl Slices {
    /// Creates `lh-lab-<pid>-<n>/{system,user}.slice` with equal weights;
    /// None when the host has no usable cpu hierarchy (not root, no
    /// controller).
    pub fn create() -> Option<Slices> {
        static N: AtomicU32 = AtomicU32::new(0);
        let (base, kind) = hierarchy()?;
        // Groups left by a killed run (its process is gone): empty ones
        // go, busy ones stay. A live process's groups may be empty for a
        // moment (just made), so they are never touched.
        if let Ok(rd) = fs::read_dir(&base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let owner = name
                    .strip_prefix("lh-lab-")
                    .and_then(|r| r.split('-').next())
                    .and_then(|p| p.parse::<u32>().ok());
                if owner.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    if let Ok(units) = fs::read_dir(e.path().join("system.slice")) {
                        for u in units.flatten().filter(|u| u.path().is_dir()) {
                            let _ = fs::remove_dir(u.path());
                        }
                    }
                    for s in ["system.slice", "user.slice"] {
                        let _ = fs::remove_dir(e.path().join(s));
                    }
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        let root = base.join(format!(
            "lh-lab-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&root).ok()?;
        if kind == "cgroup v2" {
            // Children of the lab's group compete by weight.
            fs::write(root.join("cgroup.subtree_control"), "+cpu").ok()?;
        }
        let mut procs = Vec::new();
        for s in ["system.slice", "user.slice"] {
            let d = root.join(s);
            fs::create_dir(&d).ok()?;
            // systemd's default weight for every slice (v1: the default
            // 1024 shares); written so the layout is explicit.
            let (file, weight) = if kind == "cgroup v2" {
                ("cpu.weight", "100")
            } else {
                ("cpu.shares", "1024")
            };
            fs::write(d.join(file), weight).ok()?;
            if kind == "cgroup v2" && s == "system.slice" {
                fs::write(d.join("cgroup.subtree_control"), "+cpu").ok()?;
            }
            procs.push(d.join("cgroup.procs"));
        }
        let user = procs.pop()?;
        let system = procs.pop()?;
        Some(Slices {
            root,
            system,
            user,
            kind,
        })
    }

    /// For the benchmark's machine line.
    pub fn describe(&self) -> String {
        format!(
            "{}: dbus.service, polkit.service, leasehold-agentd.service in system.slice, users' commands in user.slice (equal weights, like systemd)",
            self.kind
        )
    }

    /// `program` to be started as `unit` (e.g. `dbus.service`) in
    /// system.slice, a group of its own like systemd gives each service
    /// once a sibling needs the cpu controller.
    pub fn service(&self, unit: &str, program: impl AsRef<OsStr>) -> Command {
        let dir = self.root.join("system.slice").join(unit);
        let procs = match fs::create_dir(&dir) {
            Ok(()) => {
                let _ = fs::write(dir.join(self.weight_file()), self.default_weight());
                dir.join("cgroup.procs")
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => dir.join("cgroup.procs"),
            // The slice itself then.
            Err(_) => self.system.clone(),
        };
        enter(&procs, program.as_ref())
    }

    fn weight_file(&self) -> &'static str {
        if self.kind == "cgroup v2" {
            "cpu.weight"
        } else {
            "cpu.shares"
        }
    }

    /// systemd's default weight (v1: the default 1024 shares).
    fn default_weight(&self) -> &'static str {
        if self.kind == "cgroup v2" {
            "100"
        } else {
            "1024"
        }
    }

    /// `program` to be started in user.slice.
    pub fn user(&self, program: impl AsRef<OsStr>) -> Command {
        enter(&self.user, program.as_ref())
    }
}

/// `program` started inside the group whose `cgroup.procs` is `procs`:
/// a shell moves itself there (writing 0 moves the writer), then execs the
/// program, so the pid is the program's and all it forks starts there.
/// Arguments added to the returned command go to `program`.
fn enter(procs: &Path, program: &OsStr) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", "echo 0 >\"$0\" && exec \"$@\""])
        .arg(procs)
        .arg(program);
    c
}

impl Drop for Slices {
    fn drop(&mut self) {
        if let Ok(rd) = fs::read_dir(self.root.join("system.slice")) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        for s in ["system.slice", "user.slice"] {
            let _ = fs::remove_dir(self.root.join(s));
        }
        let _ = fs::remove_dir(&self.root);
    }
}
