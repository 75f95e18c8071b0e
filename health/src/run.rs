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

/// What the program's stderr becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stderr {
    /// /dev/null (smartctl: its JSON on stdout says it all).
    Null,
    /// The same pipe as stdout (nvme-cli: its errors are on stderr and
    /// belong in the message; its stdout is buffered, so stderr may come
    /// first).
    Merged,
}

/// Runs `program args…` (stdin null); its exit code (-1: a signal) and
/// stdout (with `Stderr::Merged`, stderr too), within `timeout` and at
/// most `max_out` bytes.
pub fn run_bounded<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    timeout: Duration,
    max_out: usize,
    stderr: Stderr,
) -> Result<(i32, Vec<u8>), RunError> {
    let name = program.file_name().map_or_else(
        || program.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let deadline = Instant::now() + timeout;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).process_group(0);
    let merged = match stderr {
        Stderr::Null => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::null());
            None
        }
        Stderr::Merged => {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| RunError::Start(format!("no pipe for {name}: {e}")))?;
            let w2 = w
                .try_clone()
                .map_err(|e| RunError::Start(format!("no pipe for {name}: {e}")))?;
            cmd.stdout(Stdio::from(w)).stderr(Stdio::from(w2));
            Some(std::fs::File::from(r))
        }
    };
    let spawned = cmd.spawn();
    // The command holds the pipe's write ends: gone now, so the read end
    // sees the end when the program (and what it started) closes them.
    drop(cmd);
    let mut child =
        spawned.map_err(|e| RunError::Start(format!("cannot run {}: {e}", program.display())))?;
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
    let stdout: Box<dyn Read + Send> = match (merged, child.stdout.take()) {
        (Some(f), _) => Box::new(f),
        (None, Some(p)) => Box::new(p),
        (None, None) => {
            kill(&mut child);
            return Err(RunError::Start(format!("{name} has no output pipe")));
        }
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
