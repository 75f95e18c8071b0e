//! `agentd`: the Leasehold node agent.
//!
//! This first version owns the key hierarchy: it opens the TPM, creates the
//! landlord pair and KL on first start, reloads them later, and shuts the
//! TPM down cleanly on SIGTERM. See docs/agentd.md for exit codes.

mod config;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use leasehold_tpm::swtpm::Swtpm;
use leasehold_tpm::{KeyConfig, KeyError, KeyHierarchy, Opened, TpmKind};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};

/// Exit codes (sysexits.h), documented in docs/agentd.md.
mod exit {
    pub const OK: u8 = 0;
    pub const DATA: u8 = 65;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const IO: u8 = 74;
    pub const CONFIG: u8 = 78;
}

#[derive(Debug, Parser)]
#[command(name = "agentd", version, about = "Leasehold node agent")]
struct Args {
    /// Configuration file.
    #[arg(long, value_name = "FILE", default_value = config::DEFAULT_PATH)]
    config: PathBuf,

    /// Development mode: start a private software TPM (swtpm) with its state
    /// and the agent's state under DIR. Never for production: keys are only
    /// as safe as DIR.
    #[arg(long, value_name = "DIR")]
    dev: Option<PathBuf>,

    /// Initialise or load the keys, print the node summary and exit.
    #[arg(long)]
    oneshot: bool,
}

#[derive(Debug, thiserror::Error)]
enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the development TPM: {0}")]
    DevTpm(std::io::Error),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

impl AgentError {
    fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) => exit::CONFIG,
            AgentError::DevTpm(_) => exit::UNAVAILABLE,
            AgentError::Signals(_) => exit::SOFTWARE,
            AgentError::Keys(k) => match k {
                KeyError::InvalidTcti { .. } | KeyError::InvalidPcr(_) => exit::CONFIG,
                KeyError::Connect { .. } => exit::UNAVAILABLE,
                KeyError::Io { .. } => exit::IO,
                KeyError::CorruptState { .. }
                | KeyError::UnsupportedStateFormat { .. }
                | KeyError::DifferentTpm { .. }
                | KeyError::KeyErased { .. }
                | KeyError::ForeignOrCorruptBlob { .. }
                | KeyError::PcrMismatch { .. } => exit::DATA,
                _ => exit::SOFTWARE,
            },
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The TSS C library prints its own warnings for every TPM error code;
    // we report errors ourselves, with context, so keep it quiet by default.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tss_esapi=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(&args) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn load_config(args: &Args) -> Result<Config, AgentError> {
    // In dev mode a missing default config is fine: defaults are used.
    if args.dev.is_some() && args.config == Path::new(config::DEFAULT_PATH) && !args.config.exists()
    {
        return Ok(Config::parse(&args.config, "")?);
    }
    Ok(Config::load(&args.config)?)
}

fn run(args: &Args) -> Result<(), AgentError> {
    let cfg = load_config(args)?;
    // Install handlers before touching the TPM so a SIGTERM during start-up
    // still ends in an orderly TPM shutdown.
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(AgentError::Signals)?;

    let (swtpm, key_cfg) = match &args.dev {
        Some(dir) => {
            let dir = std::path::absolute(dir).map_err(AgentError::DevTpm)?;
            warn!(
                dir = %dir.display(),
                "DEVELOPMENT MODE: using a software TPM (swtpm); keys are only as safe as this directory"
            );
            let swtpm = Swtpm::start(&dir.join("tpm")).map_err(AgentError::DevTpm)?;
            let key_cfg = KeyConfig {
                tcti: swtpm.tcti(),
                state_dir: dir.join("state"),
                seal_pcrs: cfg.tpm.seal_pcrs.clone(),
            };
            (Some(swtpm), key_cfg)
        }
        None => (
            None,
            KeyConfig {
                tcti: cfg.tpm.tcti.clone(),
                state_dir: cfg.state.dir.clone(),
                seal_pcrs: cfg.tpm.seal_pcrs.clone(),
            },
        ),
    };

    let result = serve(&key_cfg, args.oneshot, &mut signals);
    if let Some(swtpm) = swtpm {
        if let Err(e) = swtpm.stop() {
            warn!("stopping the development TPM: {e}");
        }
    }
    result
}

fn serve(key_cfg: &KeyConfig, oneshot: bool, signals: &mut Signals) -> Result<(), AgentError> {
    let (keys, opened) = KeyHierarchy::open(key_cfg)?;
    let status = keys.status();
    match &opened {
        Opened::Initialised => {
            info!(node_id = %status.node_id, "initialised the key hierarchy (landlord pair and KL)")
        }
        Opened::Loaded { recovered } => info!(
            node_id = %status.node_id,
            recovered,
            "loaded the key hierarchy"
        ),
    }
    if status.tpm_kind == TpmKind::Software {
        warn!("running on a software TPM: keys have no hardware protection");
    }
    info!(
        tpm = %status.tpm_kind,
        landlord_generation = status.landlord.generation,
        landlord_fingerprint = %status.landlord.fingerprint,
        tenant_assigned = status.tenant.is_some(),
        "agent ready"
    );
    println!("node id:              {}", status.node_id);
    println!("TPM:                  {}", status.tpm_kind);
    println!("landlord generation:  {}", status.landlord.generation);
    println!("landlord fingerprint: {}", status.landlord.fingerprint);
    match &status.tenant {
        Some(t) => println!(
            "tenant fingerprint:   {} (generation {})",
            t.fingerprint, t.generation
        ),
        None => println!("tenant:               not assigned"),
    }

    if !oneshot {
        // Block until SIGTERM or SIGINT: the only events this version serves.
        if let Some(sig) = signals.forever().next() {
            info!(signal = sig, "stopping");
        }
    }
    keys.shutdown()?;
    info!("TPM shut down cleanly");
    Ok(())
}
