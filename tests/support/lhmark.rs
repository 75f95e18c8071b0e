//! The marker of the engines benchmark (tests/benches/engines_vm.rs): one
//! static binary that every launcher runs from the same root filesystem.
//! Its first action is to read the wall clock (CLOCK_REALTIME through the
//! vDSO: the same clock in every namespace of the node) and print it.
//! Built by the bench with `rustc -C target-feature=+crt-static` (no cargo
//! target: it must not link anything but libc, statically).
//!
//! lhmark engine           print `first NS`, exit 0
//! lhmark idle             print `first NS`, then sleep until killed
//! lhmark restart FLAG     print `first NS`; if FLAG exists, remove it and
//!                         sleep until killed; else create it, print
//!                         `exit NS` and exit 1 (the next instance is the
//!                         restart)
//! lhmark spawn CMD ARG..  print `t0 NS`, then exec CMD (the client whose
//!                         call starts the engine: t0 is just before it)
//! lhmark exit             print `first NS`, then `exit NS`, exit 1
//! lhmark count FILE       append one byte to FILE, exit 0 (probe_cost's
//!                         exec probe: FILE's size is the runs)
//! lhmark floor N [FILE]   N + 1 times: run `lhmark exit`, wait for it,
//!                         run `lhmark engine`, wait for it — the restart
//!                         of a bare supervisor (no confinement, no delay),
//!                         the floor an in-place restart is measured against;
//!                         their lines appended to FILE if given (inside an
//!                         engine, through the shim's probe, stdout is null)

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn idle() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() {
    let t = now_ns();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map_or("engine", String::as_str);
    let mut out = std::io::stdout().lock();
    if mode == "spawn" {
        let _ = writeln!(out, "t0 {t}");
        let _ = out.flush();
        drop(out);
        let Some(cmd) = args.get(1) else {
            eprintln!("lhmark spawn: no command");
            std::process::exit(2);
        };
        let e = std::process::Command::new(cmd).args(&args[2..]).exec();
        eprintln!("lhmark spawn {cmd}: {e}");
        std::process::exit(127);
    }
    if mode == "floor" {
        drop(out);
        let n: u32 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(20);
        let me = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
        let file = match args.get(2) {
            Some(f) => match std::fs::OpenOptions::new().append(true).create(true).open(f) {
                Ok(file) => Some(file),
                Err(e) => {
                    eprintln!("lhmark floor {f}: {e}");
                    std::process::exit(2);
                }
            },
            None => None,
        };
        for _ in 0..=n {
            for m in ["exit", "engine"] {
                let mut cmd = std::process::Command::new(&me);
                if let Some(f) = &file {
                    match f.try_clone() {
                        Ok(f) => cmd.stdout(f),
                        Err(e) => {
                            eprintln!("lhmark floor: {e}");
                            std::process::exit(2);
                        }
                    };
                }
                if let Err(e) = cmd.arg(m).status() {
                    eprintln!("lhmark floor: {e}");
                    std::process::exit(2);
                }
            }
        }
        return;
    }
    let _ = writeln!(out, "first {t}");
    let _ = out.flush();
    match mode {
        "engine" => {}
        "exit" => {
            let _ = writeln!(out, "exit {}", now_ns());
            let _ = out.flush();
            std::process::exit(1);
        }
        "idle" => idle(),
        "count" => {
            let file = args.get(1).map_or("/data/runs", String::as_str);
            let r = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(file)
                .and_then(|mut f| f.write_all(b"."));
            if let Err(e) = r {
                eprintln!("lhmark count {file}: {e}");
                std::process::exit(2);
            }
        }
        "restart" => {
            let flag = args.get(1).map_or("/data/flag", String::as_str);
            if std::fs::remove_file(flag).is_ok() {
                idle();
            }
            if let Err(e) = std::fs::write(flag, b"1") {
                eprintln!("lhmark restart {flag}: {e}");
                std::process::exit(2);
            }
            let _ = writeln!(out, "exit {}", now_ns());
            let _ = out.flush();
            std::process::exit(1);
        }
        m => {
            eprintln!("lhmark: unknown mode {m:?}");
            std::process::exit(2);
        }
    }
}
