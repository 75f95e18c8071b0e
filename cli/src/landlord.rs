//! `landlordctl`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use leasehold_dbus_api::LandlordProxy;

use crate::boundary::{
    emit_check, emit_info, explain_result, in_document, info_json, parse_duration, read_document,
    unix_time_text, ExplainArgs,
};
use crate::output::{
    change_text, emit, emit_change, emit_done, node_info_json, node_info_text, note, volume_json,
    volume_text,
};
use crate::progress::{bounded, bounded_with};
use crate::{
    emit_public_key, exit, read_pem_file, run_main, with_confirmation, with_confirmation_or,
    CliError, GlobalArgs, EXIT_CODES_HELP,
};

/// Command line of `landlordctl`.
#[derive(Debug, Parser)]
#[command(name = "landlordctl", version, about = "Manage a Leasehold node as its landlord", after_help = EXIT_CODES_HELP)]
pub struct Args {
    /// --host, --quiet, --no-pager (shared with tenantctl).
    #[command(flatten)]
    pub global: GlobalArgs,
    /// Print JSON instead of text.
    ///
    /// One value per command (`monitor`: one object per line); failures
    /// as `{"error": {"name", "exit", "message"}}` with the same exit
    /// status. The schema of every command is a stable API: docs/json.md
    /// (installed as /usr/share/doc/leasehold/json.md).
    #[arg(long, global = true)]
    pub json: bool,
    /// Confirm operations that destroy data, without asking.
    #[arg(long, short = 'y', global = true)]
    pub yes: bool,
    /// Stop waiting for the node after this long (e.g. 90s, 30m, 2h; 0: no
    /// limit): a long operation (volume init, rotate, rekey, release, assign,
    /// volume forget), and every other call and the connection. The node may
    /// still finish it: `volume status`, `info`.
    #[arg(long, global = true, value_name = "DURATION", default_value = crate::progress::DEFAULT_TIMEOUT, value_parser = crate::progress::parse_timeout)]
    pub timeout: crate::progress::Timeout,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
// Each subcommand's arguments are built only when it is used
// (docs/cli.md, "Start-up"); so in every enum below.
#[command(defer = true)]
pub enum Command {
    /// Show node id, TPM, key generations and fingerprints, assigned tenant.
    Info,
    /// Print a public key (UL or UT) as PEM.
    Pubkey {
        /// Whose key.
        #[arg(value_parser = ["landlord", "tenant"], default_value = "landlord")]
        role: String,
        /// Write the PEM to FILE instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Assign the node to a tenant: new tenant key pair and KT (destroys a previous tenant's data).
    Assign {
        /// Tenant name.
        name: String,
        /// The tenant console's public key (PEM) to register.
        #[arg(long, value_name = "FILE")]
        console_key: Option<PathBuf>,
    },
    /// Release the node: crypto-erase the tenant's keys and data.
    Release,
    /// New landlord key pair and KL: all tenant data becomes unreadable.
    Rotate,
    /// New landlord key pair, KL kept (no data lost).
    Rekey,
    /// Register a landlord console's public key (replies can be sealed to it).
    RegisterConsole {
        /// Console name.
        name: String,
        /// Public key PEM file.
        pem: PathBuf,
    },
    /// Reboot the node.
    Reboot,
    /// Power the node off.
    Poweroff,
    /// Suspend the node.
    Suspend,
    /// The cluster boundary (nftables): who the node may talk to.
    #[command(subcommand)]
    Boundary(BoundaryCommand),
    /// The tenant's encrypted volume (dm-crypt keyed by KL and KT).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// The tenant's budget: CPU, memory, pids and I/O of all its engines
    /// together, and what they use of it.
    #[command(subcommand)]
    Budget(crate::budget::BudgetCommand),
    /// Print the node's TPM-held signing key (verifies erase receipts) as PEM.
    ReceiptKey {
        /// Write the PEM to FILE instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Verify an erase receipt and that the node's key signed it.
    ///
    /// The receipt: --json of rotate/release/assign, or of `receipts show`.
    /// Prints the signer's fingerprint. Exit status 1: the signature does
    /// not match; 7: the node's key did not sign it.
    VerifyReceipt(crate::receipts::VerifyArgs),
    /// One overview of the node; exit status 1 when something is wrong.
    ///
    /// Problems: TPM failed, volume failed, boundary drift not repaired,
    /// a critical or stuck health fault.
    Status,
    /// The node's health: sensors, disks, links, and their faults.
    ///
    /// A fresh report (up to the slowest source's deadline). Exit status 1
    /// when a fault is critical or stuck; warnings exit 0.
    Health,
    /// Challenge the node's TPM: a quote of a fresh nonce, verified here.
    ///
    /// Proves the node id, boot id, key generations and fingerprints, and
    /// the PCRs. The attestation key is pinned on first use (known_nodes);
    /// exit status 7 when it changed, 1 when the quote is refused.
    Attest(crate::attest::AttestArgs),
    /// Print the agent's signals, one line each, until Ctrl-C.
    ///
    /// Key changes (with receipts), boundary restored or reverted; JSON
    /// lines with --json.
    Monitor,
    /// The erase receipts of the landlord's changes (assign, release, rotate).
    #[command(subcommand)]
    Receipts(crate::receipts::ReceiptsCommand),
    /// Alertmanager webhook receiver: turn alerts into corrective actions.
    ///
    /// Serves POST /alerts (bearer token) and maps each firing alert, by
    /// its `instance` and `alertname` labels and the inventory, to notify,
    /// reboot, poweroff (over SSH + D-Bus, like --host) or a hook; once per
    /// alert, within per-node and fleet-wide rate limits kept in a state
    /// file. One record line per decision and per action on stdout (JSON
    /// lines with --json). Runs until SIGINT or SIGTERM.
    Act(crate::act::ActArgs),
    /// Write man page and shell completions into DIR.
    #[command(hide = true)]
    Generate {
        /// Output directory.
        dir: PathBuf,
    },
}

/// `landlordctl volume ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum VolumeCommand {
    /// Make DEVICE the tenant's encrypted volume (erases it). Refuses a
    /// mounted device, the root disk, and a device with a filesystem or
    /// partition table (unless --force).
    Init {
        /// Block device (a /dev/disk/by-id path is stable across reboots).
        device: String,
        /// Overwrite a device that carries a filesystem or partition table.
        #[arg(long)]
        force: bool,
    },
    /// Show the volume: device, size, use, key generations, open or not.
    /// Exits 1 when the volume is failed, saying what to do next.
    Status,
    /// Drop the record of a failed or stuck volume (needs --yes or a typed
    /// yes). The device is not written; what it holds is lost. A usable
    /// volume is refused (a destroying key change empties it).
    Forget,
}

/// `landlordctl boundary ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum BoundaryCommand {
    /// Set the cluster boundary from a TOML or JSON document (applied at once).
    Set {
        /// Document file (.toml or .json).
        file: PathBuf,
        /// Revert to the previous boundary unless `boundary confirm` comes
        /// within this time (2s-1h; e.g. 60s, 5m). The pending revert
        /// survives an agent restart.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        confirm_within: Option<u32>,
    },
    /// Keep a boundary set with --confirm-within (cancels the revert).
    Confirm,
    /// Validate a document and show what setting it would change (entries,
    /// peers, flows newly denied), without applying it.
    Check {
        /// Document file (.toml or .json).
        file: PathBuf,
    },
    /// Show the boundaries, failsafe and enforcement state.
    Show,
    /// Add peers (CIDRs or addresses) to an allow entry or a group (@name).
    AddPeer {
        /// Entry name or @group.
        target: String,
        /// Peers to add.
        #[arg(required = true)]
        peers: Vec<String>,
    },
    /// Remove peers (as listed) from an allow entry or a group (@name).
    RemovePeer {
        /// Entry name or @group.
        target: String,
        /// Peers to remove.
        #[arg(required = true)]
        peers: Vec<String>,
    },
    /// Replace the failsafe entries (document with [[failsafe]] entries only; empty file: none).
    Failsafe {
        /// Document file.
        file: PathBuf,
    },
    /// Explain whether a flow is allowed and which entries decide.
    Explain(ExplainArgs),
    /// Lift every boundary (removes the nftables table and the stored policy).
    // `remove` was this verb's name before both CLIs said `clear`: kept,
    // hidden, so scripts do not break.
    #[command(alias = "remove")]
    Clear,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let args = match crate::parse_kept::<Args>(&argv, crate::leak) {
        Ok(a) => a,
        Err(e) => return crate::usage_exit("landlordctl", e),
    };
    args.global.apply();
    run_main("landlordctl", args.json, run(args))
}

/// Runs one command.
pub async fn run(args: Args) -> Result<(), CliError> {
    if let Command::Generate { dir } = &args.command {
        return crate::generate(Args::command(), dir);
    }
    if let Command::Act(a) = &args.command {
        // act reaches each node as its inventory says, never --host's.
        if args.global.host.is_some() {
            return Err(CliError::new(
                exit::USAGE,
                "act: --host does not apply; each node's host is in the inventory",
            ));
        }
        return crate::act::run(a, args.json).await;
    }
    if let Command::VerifyReceipt(a) = &args.command {
        let global = args.global.clone();
        let timeout = args.timeout;
        return crate::receipts::verify(args.json, a, || async move {
            Ok((global.connect(timeout).await?, true))
        })
        .await;
    }
    match &args.command {
        Command::Assign { name, .. } => crate::check_name("tenant name", name)?,
        Command::Volume(VolumeCommand::Init { device, .. }) => check_device_arg(device)?,
        Command::RegisterConsole { name, pem } => {
            crate::check_name("console name", name)?;
            // Checked before connecting: a wrong or private key file never
            // gets near the bus (read again, and checked again, below).
            read_pem_file("console key", pem)?;
        }
        _ => {}
    }
    let conn = args.global.connect(args.timeout).await?;
    let p = LandlordProxy::new(&conn)
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    let json = args.json;
    let timeout = args.timeout;
    match args.command {
        Command::Info => {
            let i = p.node_info().await?;
            emit(json, node_info_json(&i), || node_info_text(&i));
        }
        Command::Pubkey { role, out } => {
            emit_public_key(json, &p.get_public_key(&role).await?, out.as_deref())?;
        }
        Command::Assign { name, console_key } => {
            let key = match console_key {
                Some(path) => read_pem_file("console key", &path)?,
                None => String::new(),
            };
            let c = with_confirmation(
                args.yes,
                &format!("assign the node to {name} and erase the current tenant's keys and data"),
                |ok| {
                    bounded(
                        "assign the node",
                        "landlordctl info",
                        timeout,
                        p.assign_tenant(&name, &key, ok),
                    )
                },
            )
            .await?;
            emit_change(json, &c, || change_text(&c));
        }
        Command::Release => {
            let c = with_confirmation(
                args.yes,
                "release the node and erase the tenant's data",
                |ok| {
                    bounded(
                        "release the node",
                        "landlordctl info",
                        timeout,
                        p.release_tenant(ok),
                    )
                },
            )
            .await?;
            emit_change(json, &c, || {
                if c.generation_before.is_none() {
                    "no tenant was assigned; nothing to release".to_owned()
                } else {
                    change_text(&c)
                }
            });
        }
        Command::Rotate => {
            let c = with_confirmation(
                args.yes,
                "rotate the landlord keys and make all tenant data unreadable",
                |ok| {
                    bounded(
                        "rotate the landlord keys",
                        "landlordctl info",
                        timeout,
                        p.rotate_keys(ok),
                    )
                },
            )
            .await?;
            emit_change(json, &c, || change_text(&c));
        }
        Command::Rekey => {
            let c = bounded(
                "re-key the landlord keys",
                "landlordctl info",
                timeout,
                p.rekey_keys(),
            )
            .await?;
            emit_change(json, &c, || change_text(&c));
        }
        Command::RegisterConsole { name, pem } => {
            let text = read_pem_file("console key", &pem)?;
            let fp = p.register_console_key(&name, &text).await?;
            emit_done(
                json,
                serde_json::json!({"name": name, "fingerprint": fp}),
                || format!("registered landlord console {name} ({fp})"),
            );
        }
        Command::Reboot => {
            p.reboot().await?;
            emit_done(json, serde_json::json!({"requested": "reboot"}), || {
                "reboot requested".into()
            });
        }
        Command::Poweroff => {
            p.power_off().await?;
            emit_done(json, serde_json::json!({"requested": "poweroff"}), || {
                "power-off requested".into()
            });
        }
        Command::Suspend => {
            p.suspend().await?;
            emit_done(json, serde_json::json!({"requested": "suspend"}), || {
                "suspend requested".into()
            });
        }
        Command::Boundary(b) => boundary(&p, b, json, args.yes).await?,
        Command::Budget(b) => crate::budget::run(&p, b, json).await?,
        Command::Volume(VolumeCommand::Init { device, force }) => {
            // The call without confirmation makes the agent run every check
            // (device, dm-crypt, mkfs) first: a device that cannot become
            // the volume is refused before anyone is asked.
            let v = with_confirmation(
                args.yes,
                &format!("erase {device} and make it the tenant's encrypted volume"),
                |ok| {
                    bounded_with(
                        "initialize the volume",
                        "landlordctl volume status",
                        timeout,
                        p.init_volume(&device, force, ok),
                        // The fill's progress, from the status (reads
                        // never wait behind the init).
                        || async { p.volume_status().await.ok().and_then(|v| v.progress) },
                    )
                },
            )
            .await?;
            emit_done(json, volume_json(&v), || volume_text(&v));
        }
        Command::Volume(VolumeCommand::Status) => {
            let v = p.volume_status().await?;
            emit(json, volume_json(&v), || volume_text(&v));
            crate::output::volume_exit(&v)?;
        }
        Command::Volume(VolumeCommand::Forget) => {
            let v = with_confirmation(args.yes, "forget the failed volume", |ok| {
                bounded(
                    "forget the volume",
                    "landlordctl volume status",
                    timeout,
                    p.forget_volume(ok),
                )
            })
            .await?;
            emit_done(json, volume_json(&v), || {
                "the volume's record is gone: volume none (landlordctl volume init DEVICE)".into()
            });
        }
        Command::ReceiptKey { out } => {
            emit_public_key(json, &p.get_receipt_key().await?, out.as_deref())?;
        }
        Command::VerifyReceipt(_) => unreachable!("handled above"),
        Command::Status => crate::status::landlord_status(&conn, json).await?,
        Command::Health => crate::health::run(&conn, json).await?,
        Command::Attest(a) => {
            let target = args.global.host.as_deref().unwrap_or("local");
            let proved =
                crate::attest::attest(&conn, target, crate::attest::Level::Landlord, &a).await?;
            crate::output::emit(json, crate::attest::proved_json(&proved), || {
                crate::attest::proved_text(&proved)
            });
        }
        Command::Monitor => crate::status::landlord_monitor(&conn, json).await?,
        Command::Receipts(cmd) => {
            crate::receipts::run(crate::receipts::Node::Landlord(&conn), json, cmd).await?;
        }
        Command::Generate { .. } | Command::Act(_) => unreachable!("handled above"),
    }
    Ok(())
}

async fn boundary(
    p: &LandlordProxy<'_>,
    cmd: BoundaryCommand,
    json: bool,
    yes: bool,
) -> Result<(), CliError> {
    // Show is a query; every other listing printed below follows a change.
    let query = matches!(cmd, BoundaryCommand::Show);
    let info = match cmd {
        BoundaryCommand::Set {
            file,
            confirm_within,
        } => {
            let (text, format) = read_document(&file)?;
            let secs = confirm_within.unwrap_or(0);
            // Plain SetBoundary first unless confirmed or timed; a document
            // that denies everything is refused by the agent until confirmed.
            let info = with_confirmation_or(yes, "apply it", exit::USAGE, |ok| {
                let text = text.clone();
                async move {
                    if ok || secs > 0 {
                        p.set_boundary_with_revert(&text, format, secs, ok).await
                    } else {
                        p.set_boundary(&text, format).await
                    }
                }
            })
            .await
            .map_err(in_document(&file, ""))?;
            if let Some(at) = info.revert_at {
                note(&format!(
                    "reverts to the previous boundary at {} unless `landlordctl boundary confirm`",
                    unix_time_text(at)
                ));
            }
            info
        }
        BoundaryCommand::Confirm => {
            let info = p.confirm_boundary().await?;
            let v = if json {
                info_json(&info)?
            } else {
                serde_json::Value::Null
            };
            emit_done(json, v, || {
                "confirmed: the boundary stays (no revert)".into()
            });
            return Ok(());
        }
        BoundaryCommand::Check { file } => {
            let (text, format) = read_document(&file)?;
            let out = p
                .check_boundary(&text, format)
                .await
                .map_err(in_document(&file, ""))?;
            return emit_check(json, &out);
        }
        BoundaryCommand::Show => p.get_boundary().await?,
        BoundaryCommand::AddPeer { target, peers } => {
            let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
            p.add_peers(&target, &peers).await?
        }
        BoundaryCommand::RemovePeer { target, peers } => {
            let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
            p.remove_peers(&target, &peers).await?
        }
        BoundaryCommand::Failsafe { file } => {
            let (text, format) = read_document(&file)?;
            with_confirmation_or(yes, "apply it", exit::USAGE, |ok| {
                let text = text.clone();
                async move {
                    if ok {
                        p.set_failsafe_confirmed(&text, format, true).await
                    } else {
                        p.set_failsafe(&text, format).await
                    }
                }
            })
            .await
            .map_err(in_document(&file, ""))?
        }
        BoundaryCommand::Explain(a) => {
            let port = a.port()?;
            let v = p
                .explain_flow(&a.direction, &a.peer, &a.proto, port)
                .await?;
            return explain_result(json, &v);
        }
        BoundaryCommand::Clear => {
            with_confirmation(yes, "lift every boundary on this node", |ok| {
                p.remove_boundary(ok)
            })
            .await?;
            emit_done(json, serde_json::json!({"removed": true}), || {
                "boundary removed: the node is no longer fenced".into()
            });
            return Ok(());
        }
    };
    emit_info(json, query, &info)
}

/// What the CLI can tell about a device argument without the node: it
/// names a path under /dev. The agent checks the rest (exists, is a block
/// device, not in use, dm-crypt usable, …) before anyone is asked to
/// confirm, where it will act (and where it runs, /dev may differ).
fn check_device_arg(device: &str) -> Result<(), CliError> {
    if device.starts_with("/dev/") && device.len() > "/dev/".len() {
        return Ok(());
    }
    Err(CliError::new(
        exit::INVALID,
        format!(
            "invalid argument: device {device:?}: give the block device's path under /dev (e.g. /dev/disk/by-id/…); nothing was done"
        ),
    ))
}
