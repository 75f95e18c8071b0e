//! `lh-dev-node`: the local node `scripts/dev-agent` runs. The test
//! harness's stack, not a copy of it ([`Lab`]): a private system-like
//! dbus-daemon, polkitd with the shipped policy and rules, a stand-in logind
//! (power actions are printed, never done), the test users, and
//! `agentd --dev DIR` in a network namespace of its own; `--ssh` adds sshd
//! on loopback for `tenantctl --host`. It writes `DIR/node.env` for
//! `scripts/dev-agent shell` and runs until SIGINT, SIGTERM or SIGHUP, then
//! stops everything and removes all but DIR's keys (docs/agentd.md,
//! "Development mode").

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use leasehold_tests::{bin, Lab, LabOptions, Who};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "usage: lh-dev-node --dir DIR [--ssh] [--config FILE]";

struct Args {
    dir: PathBuf,
    ssh: bool,
    config: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut dir = None;
    let mut ssh = false;
    let mut config = None;
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--dir") => dir = it.next().map(PathBuf::from),
            Some("--ssh") => ssh = true,
            Some("--config") => config = it.next().map(PathBuf::from),
            Some("-h" | "--help") => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    let dir = dir.ok_or_else(|| format!("--dir is required\n{USAGE}"))?;
    let dir = std::path::absolute(&dir).map_err(|e| format!("--dir {}: {e}", dir.display()))?;
    Ok(Args { dir, ssh, config })
}

/// Single-quoted for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn write_env(path: &Path, vars: &[(&str, String)]) -> std::io::Result<()> {
    let mut text = String::from("# Written by lh-dev-node while it runs; removed when it stops.\n");
    for (k, v) in vars {
        let _ = writeln!(text, "{k}={}", quote(v));
    }
    // Atomic: `scripts/dev-agent shell` never reads half a file.
    let tmp = path.with_extension("env.tmp");
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lh-dev-node: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match &args.config {
        Some(f) => match fs::read_to_string(f) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("lh-dev-node: --config {}: {e}", f.display());
                return ExitCode::from(66);
            }
        },
        None => None,
    };
    let env_file = args.dir.join("node.env");
    if env_file.exists() {
        // The agent's directory lock says whether that node still runs;
        // a stale file from a killed run is replaced below.
        eprintln!(
            "lh-dev-node: {} exists (a node running, or left by a killed one); agentd decides",
            env_file.display()
        );
    }
    // The harness asserts rather than returning errors: a failed start
    // ends here with its message, and what it started is stopped on unwind.
    let mut lab = Lab::start_with_options(LabOptions {
        agent_dir: Some(args.dir.clone()),
        agent_config: config,
        agent_host_netns: true,
        agent_log_to_stderr: true,
        ..LabOptions::default()
    });
    // The test users cannot always reach the build tree (a home directory
    // is 0700): they get copies in the lab's directory, removed on stop.
    let bindir = lab.path("bin");
    fs::create_dir_all(&bindir).expect("create the lab's bin directory");
    for b in ["landlordctl", "tenantctl"] {
        fs::copy(bin(b), bindir.join(b)).expect("copy the CLIs");
        fs::set_permissions(bindir.join(b), fs::Permissions::from_mode(0o755))
            .expect("chmod the CLIs");
    }
    let user = |w: Who| w.user().expect("test user").name.to_owned();
    let mut vars = vec![
        ("LEASEHOLD_DEV_PID", std::process::id().to_string()),
        ("DBUS_SYSTEM_BUS_ADDRESS", lab.address.clone()),
        ("LEASEHOLD_DEV_BIN", bindir.display().to_string()),
        ("LEASEHOLD_DEV_WORK", lab.path("work").display().to_string()),
        ("LEASEHOLD_DEV_LANDLORD", user(Who::Landlord)),
        ("LEASEHOLD_DEV_TENANT", user(Who::Tenant)),
    ];
    if args.ssh {
        let ssh = lab.start_sshd(&[Who::Landlord, Who::Tenant]);
        vars.push(("LEASEHOLD_SSH", ssh.command.clone()));
        vars.push((
            "LEASEHOLD_DEV_NODE",
            format!("{}@127.0.0.1:{}", user(Who::Tenant), ssh.port),
        ));
    }
    if let Err(e) = write_env(&env_file, &vars) {
        eprintln!("lh-dev-node: cannot write {}: {e}", env_file.display());
        return ExitCode::from(74);
    }
    println!();
    println!(
        "Leasehold dev node running: agentd pid {}, keys in {}.",
        lab.agent_pid().unwrap_or(0),
        args.dir.display()
    );
    println!("In another terminal (as root, in this checkout):");
    println!(
        "  scripts/dev-agent shell landlord   # as {}: landlordctl info, landlordctl assign acme",
        user(Who::Landlord)
    );
    println!(
        "  scripts/dev-agent shell tenant     # as {}: tenantctl info, tenantctl rotate --yes",
        user(Who::Tenant)
    );
    if args.ssh {
        println!("  scripts/dev-agent shell console    # a remote console: tenantctl --host \"$NODE\" info");
    }
    println!("Ctrl-C stops the node and removes all of it but the keys.");
    // The readiness event for tests and scripts.
    println!("dev node ready");

    // A runtime of its own: the loop below needs the lab mutably.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lh-dev-node: cannot start a runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let why = rt.block_on(async {
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return "cannot install signal handlers";
        };
        // The power stand-in's calls are shown, and the agent's exit
        // noticed, once a second.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = int.recv() => return "SIGINT",
                _ = term.recv() => return "SIGTERM",
                // The terminal went away: nobody can drive the node.
                _ = hup.recv() => return "SIGHUP",
                _ = tick.tick() => {}
            }
            for a in lab.power.take() {
                println!("dev node: the agent asked logind to {a} (stand-in: nothing happens)");
            }
            if !lab.agent_alive() {
                return "agentd exited";
            }
        }
    });
    eprintln!("lh-dev-node: {why}: stopping the node");
    let _ = fs::remove_file(&env_file);
    let failed = why == "agentd exited" || why == "cannot install signal handlers";
    // Stops sshd, agentd (TPM2_Shutdown, swtpm), polkitd, the bus, and
    // removes the lab's directory.
    drop(lab);
    eprintln!("lh-dev-node: stopped");
    ExitCode::from(if failed { 1 } else { 0 })
}
