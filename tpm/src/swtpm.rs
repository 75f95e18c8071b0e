//! Starts and stops an swtpm process: the software TPM used by tests and by
//! `agentd --dev`. Never used in production.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

/// A running swtpm listening on 127.0.0.1.
#[derive(Debug)]
pub struct Swtpm {
    state_dir: PathBuf,
    port: u16,
    pid: Option<u32>,
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.join("swtpm.pid")
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            // A zombie (state Z) has exited.
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
}

fn wait_gone(pid: u32, limit: Duration) -> bool {
    // swtpm is not our child once daemonised, so there is no wait(); poll /proc.
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

impl Swtpm {
    /// Starts swtpm with its TPM state in `state_dir` (created if missing).
    /// A previous instance left running on the same directory is stopped
    /// first (its state is saved by swtpm on SIGTERM).
    pub fn start(state_dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        if let Ok(old) = std::fs::read_to_string(pid_file(state_dir)) {
            if let Ok(pid) = old.trim().parse::<u32>() {
                if alive(pid) {
                    let _ = Command::new("kill").arg(pid.to_string()).status();
                    wait_gone(pid, Duration::from_secs(5));
                }
            }
        }
        let mut last_err = None;
        for _ in 0..20 {
            let port = free_port_pair()?;
            // --daemon: the foreground process exits only once the sockets are
            // bound, so its exit is our readiness event.
            let out = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", state_dir.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .arg("--pid")
                .arg(format!("file={}", pid_file(state_dir).display()))
                .arg("--daemon")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot run swtpm (is the swtpm package installed?): {e}"),
                    )
                })?;
            if out.status.success() {
                let pid = std::fs::read_to_string(pid_file(state_dir))?
                    .trim()
                    .parse::<u32>()
                    .map_err(|e| io::Error::other(format!("swtpm pid file: {e}")))?;
                return Ok(Self {
                    state_dir: state_dir.to_path_buf(),
                    port,
                    pid: Some(pid),
                });
            }
            // Most likely another process took the port between our check and swtpm's bind.
            last_err = Some(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Err(io::Error::other(format!(
            "swtpm did not start: {}",
            last_err.unwrap_or_default()
        )))
    }

    /// The key hierarchy's configuration on this swtpm, its state in
    /// `state_dir`: no PCR sealing, existing state kept (what tests and
    /// benchmarks open).
    pub fn key_config(&self, state_dir: impl Into<PathBuf>) -> crate::KeyConfig {
        crate::KeyConfig {
            tcti: self.tcti(),
            state_dir: state_dir.into(),
            seal_pcrs: Vec::new(),
            erase_existing: false,
        }
    }

    /// TCTI string for tss-esapi.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Directory holding the TPM state.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Stops swtpm cleanly (CMD_SHUTDOWN over the control channel) and waits
    /// until it has exited, so the state directory can be reused at once.
    /// Callers should have sent TPM2_Shutdown first (`KeyHierarchy::shutdown`).
    pub fn stop(mut self) -> io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> io::Result<()> {
        let Some(pid) = self.pid.take() else {
            return Ok(());
        };
        let status = Command::new("swtpm_ioctl")
            .arg("--tcp")
            .arg(format!("127.0.0.1:{}", self.port + 1))
            .arg("-s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        if wait_gone(pid, Duration::from_secs(10)) {
            Ok(())
        } else {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            Err(io::Error::other(format!("swtpm (pid {pid}) did not exit")))
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Finds P such that P and P+1 are free on 127.0.0.1 (the swtpm TCTI uses
/// port+1 for the control channel).
fn free_port_pair() -> io::Result<u16> {
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let p: u16 = rng.gen_range(20000..60000);
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, p));
        let b = TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1));
        if a.is_ok() && b.is_ok() {
            return Ok(p);
        }
    }
    Err(io::Error::other(
        "no free pair of TCP ports found on 127.0.0.1",
    ))
}
