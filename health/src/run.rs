//! A helper program run with a deadline and a bound on what it prints:
//! smartctl per disk, nvme-cli for the SMART events. The program runs in
//! a process group of its own, killed (the group) at the deadline or past
//! the output bound, so nothing it started holds the pipe open.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Why a run gave no output to judge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// Not started (`cannot run …`, `no thread for …`).
    Start(String),
    /// Still running at the deadline: killed.
    Timeout,
    /// Printed more than the bound: killed.
    TooLarge,
    /// Its output or its exit could not be read.
    Io(String),
}

/// Runs `program args…` (stdin and stderr null); its exit code (-1: a
/// signal) and stdout, within `timeout` and at most `max_out` bytes.
pub fn run_bounded<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    timeout: Duration,
    max_out: usize,
) -> Result<(i32, Vec<u8>), RunError> {
    let name = program.file_name().map_or_else(
        || program.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| RunError::Start(format!("cannot run {}: {e}", program.display())))?;
    let kill = |child: &mut std::process::Child| {
        // The group, not only the program: anything it started would hold
        // the pipe open. The child is not yet reaped, so its pid (the group
        // id) cannot have been reused.
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.wait();
    };
    let Some(stdout) = child.stdout.take() else {
        kill(&mut child);
        return Err(RunError::Start(format!("{name} has no output pipe")));
    };
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::Builder::new()
        .name(format!("{name}-out"))
        .spawn(move || {
            let mut buf = Vec::new();
            let r = stdout.take(max_out as u64 + 1).read_to_end(&mut buf);
            let _ = tx.send(r.map(|_| buf));
        });
    if let Err(e) = reader {
        kill(&mut child);
        return Err(RunError::Start(format!(
            "no thread for {name}'s output: {e}"
        )));
    }
    let buf = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(Ok(buf)) if buf.len() > max_out => {
            kill(&mut child);
            return Err(RunError::TooLarge);
        }
        Ok(Ok(buf)) => buf,
        Ok(Err(e)) => {
            kill(&mut child);
            return Err(RunError::Io(format!("reading {name}'s output: {e}")));
        }
        Err(_) => {
            kill(&mut child);
            return Err(RunError::Timeout);
        }
    };
    // Its output ended; its exit follows. No event for a child's exit here
    // without a pidfd, so poll, briefly, up to the deadline.
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok((status.code().unwrap_or(-1), buf)),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None) => {
                kill(&mut child);
                return Err(RunError::Timeout);
            }
            Err(e) => {
                kill(&mut child);
                return Err(RunError::Io(format!("waiting for {name}: {e}")));
            }
        }
    }
}
