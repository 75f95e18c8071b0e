//! `agentd`: the Leasehold node agent.
//!
//! Owns the key hierarchy (one thread), serves `org.leasehold.Agent1` on the
//! system bus with a landlord and a tenant interface, authorizes every call
//! through polkit, and shuts the TPM down cleanly on SIGTERM or SIGINT
//! (SIGHUP is logged and ignored). See docs/agentd.md for options and exit
//! codes.

mod actions;
mod api;
mod auth;
mod boundary;
mod collect;
mod config;
mod crashpoint;
mod devnet;
mod engines;
mod fdstore;
mod fsutil;
mod health;
mod keys;
mod liveness;
mod lock;
mod logging;
mod metrics;
mod peer_index;
mod power;
mod receipts;
mod secrets;
mod upload;
mod volume;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use leasehold_dbus_api::{BUS_NAME, OBJECT_PATH};
use leasehold_tpm::swtpm::Swtpm;
use leasehold_tpm::{KeyConfig, KeyError, Opened, TpmKind};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::keys::Keys;

/// Exit codes (sysexits.h), documented in docs/agentd.md.
mod exit {
    pub const OK: u8 = 0;
    pub const DATA: u8 = 65;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const IO: u8 = 74;
    pub const TEMPFAIL: u8 = 75;
    pub const NOPERM: u8 = 77;
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

    /// With --dev: stay in the network namespace agentd was started in,
    /// which the caller made for it (never the host's). Without it, --dev
    /// makes a new one.
    #[arg(long, requires = "dev")]
    dev_keep_netns: bool,

    /// Initialise or load the keys, print the node summary and exit (no D-Bus).
    #[arg(long)]
    oneshot: bool,

    /// ERASES the Leasehold keys the TPM holds (landlord and tenant NV
    /// secrets: their data becomes unreadable) and initialises a new node.
    /// Only with an empty or missing state directory; without this flag the
    /// agent refuses to start over keys it has no manifest for.
    #[arg(long)]
    init_erase_tpm: bool,
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
    #[error("cannot serve {BUS_NAME} on the system bus: {0}")]
    Bus(zbus::Error),
    #[error(transparent)]
    Boundary(#[from] boundary::BoundaryError),
    #[error("cannot start the node controller: {0}")]
    Node(String),
    #[error("cannot start the engine runtime: {0}")]
    Engines(String),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    DevNet(#[from] devnet::DevNetError),
    #[error("cannot serve the metrics: {0}")]
    Metrics(#[from] metrics::MetricsError),
}

impl AgentError {
    fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) => exit::CONFIG,
            AgentError::DevTpm(_) | AgentError::Bus(_) => exit::UNAVAILABLE,
            AgentError::Signals(_) | AgentError::Node(_) => exit::SOFTWARE,
            AgentError::Boundary(_) | AgentError::Engines(_) => exit::DATA,
            AgentError::Lock(lock::LockError::InUse { .. }) => exit::TEMPFAIL,
            AgentError::Lock(lock::LockError::Io { .. }) => exit::IO,
            AgentError::DevNet(e) if e.is_permission() => exit::NOPERM,
            AgentError::DevNet(_) => exit::UNAVAILABLE,
            AgentError::Metrics(e) if e.is_config() => exit::CONFIG,
            AgentError::Metrics(_) => exit::UNAVAILABLE,
            AgentError::Keys(k) => match k {
                KeyError::InvalidTcti { .. } | KeyError::InvalidPcr(_) => exit::CONFIG,
                KeyError::Connect { .. } => exit::UNAVAILABLE,
                KeyError::Io { .. } => exit::IO,
                KeyError::CorruptState { .. }
                | KeyError::UnsupportedStateFormat { .. }
                | KeyError::DifferentTpm { .. }
                | KeyError::KeyErased { .. }
                | KeyError::ForeignOrCorruptBlob { .. }
                | KeyError::PcrMismatch { .. }
                | KeyError::StateMissing { .. }
                | KeyError::EraseRefused { .. }
                | KeyError::UnknownNvIndex { .. }
                | KeyError::StaleState { .. }
                | KeyError::SymlinkInState { .. }
                | KeyError::UnfinishedLegacyChange { .. }
                | KeyError::SigningKeyUnusable { .. }
                | KeyError::StandbyErased { .. } => exit::DATA,
                _ => exit::SOFTWARE,
            },
        }
    }
}

/// The agent's soft limit on open descriptors, raised to this (or the hard
/// limit, if lower). An instance holds about seven (its FIFOs, status
/// FIFO, pidfds, notify socket and stop pipe): 100 idle engines measured
/// 727 in all, so [`engines::MAX_ENGINES`] during reloads would come near the 1024
/// a systemd unit gets by default, and every later open (D-Bus
/// connections, the landlord's calls too) would fail. The unit sets
/// `LimitNOFILE` to the same; engines get 1024 back from the shim.
const OPEN_FILES: u64 = 65_536;

// What PutSecret keeps is what the shim can hand an engine.
const _: () =
    assert!(leasehold_node::MAX_SECRET_PAYLOAD == leasehold_engines::launch::MAX_SECRET_BYTES);

/// No core dump of the agent (the unit says `LimitCORE=0` too): it holds
/// the disk key, the secret store's key and secrets in clear for moments,
/// and a dump would put them on the node's disk, outside the encrypted
/// volume, past a release. As the shim does for engines.
fn no_core_dumps() {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let zero = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = setrlimit(Resource::Core, zero) {
        warn!("cannot turn core dumps off for the agent: {e}");
    }
}

fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let want = now.maximum.map_or(OPEN_FILES, |max| max.min(OPEN_FILES));
    if now.current.is_some_and(|cur| cur >= want) {
        return;
    }
    let raised = Rlimit {
        current: Some(want),
        maximum: now.maximum,
    };
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        warn!("cannot raise the open files limit to {want}: {e}");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The unit's UMask=0077, also when started otherwise (tests, --dev):
    // files the agent makes are private unless it says so, and paths an
    // engine must reach get their mode set explicitly (a mode left to the
    // umask broke engines on the packaged node only).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // The TSS C library prints its own warnings for every TPM error code;
    // we report errors ourselves, with context, so keep it quiet by default.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    let log_to = logging::init();
    info!(
        version = env!("CARGO_PKG_VERSION"),
        log = log_to,
        "agentd starting"
    );
    // First, before any thread of the agent's opens a descriptor: the
    // notify sockets systemd kept across a restart are numbers from 3 on.
    let fdstore = Arc::new(fdstore::FdStore::from_env());
    raise_open_files_limit();
    no_core_dumps();
    // No transparent huge pages for the agent: with the kernel's "always"
    // (Debian's default) a few 2 MiB pages made a third of its resident
    // memory (docs/engines.md, "The agent's memory"). Engines get the
    // node's policy back in the shim.
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        warn!("cannot turn transparent huge pages off for the agent: {e}");
    }
    // Before the runtime starts its threads: unshare moves only this one.
    if args.dev.is_some() {
        match devnet::isolate(args.dev_keep_netns) {
            Ok(devnet::DevNet::Own) => {
                info!("development mode: in a network namespace of its own (only lo); the host's firewall is never touched")
            }
            Ok(devnet::DevNet::Kept) => {
                info!("development mode: staying in the network namespace agentd was started in (--dev-keep-netns)")
            }
            Err(e) => {
                let e = AgentError::from(e);
                error!("{e}");
                return ExitCode::from(e.exit_code());
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    match rt.block_on(run(&args, fdstore)) {
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

async fn run(args: &Args, fdstore: Arc<fdstore::FdStore>) -> Result<(), AgentError> {
    let cfg = load_config(args)?;
    // Before anything is touched (the TPM, the volume, engines still
    // running from an earlier agent): ids of engines another account owns
    // stop the agent here, naming the conflict (exit 78, not restarted).
    info!(
        uid_base = cfg.engines.uid_base,
        "checking the engines' ids against the account databases and subordinate ranges"
    );
    let base = cfg.engines.uid_base;
    tokio::task::spawn_blocking(move || engines::check_uid_range(base))
        .await
        .map_err(|e| AgentError::Engines(e.to_string()))?
        .map_err(|reason| {
            AgentError::Config(config::ConfigError::Check {
                path: args.config.clone(),
                reason,
            })
        })?;
    let metrics_setup = metrics::Setup::new(&cfg.metrics)?;
    // Install handlers before touching the TPM so a SIGTERM during start-up
    // still ends in an orderly TPM shutdown.
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    // SIGHUP's default would end the agent with no TPM shutdown (and, in
    // dev mode, orphan swtpm). Nothing is reloaded: the configuration
    // shapes the key thread, the volume and the bus connections, which are
    // only safe to rebuild through a restart.
    let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!(
                signal = "SIGHUP",
                "ignored: agentd reloads nothing; restart it to apply a changed configuration"
            );
        }
    });

    // One agent per state directory, locked before anything in it (or, in
    // dev mode, its swtpm) is touched: a second agent stops here.
    let lock_path = match &args.dev {
        Some(dir) => std::path::absolute(dir).map_err(AgentError::DevTpm)?,
        None => cfg.state.dir.clone(),
    };
    let _lock = lock::lock_dir(&lock_path)?;

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
                erase_existing: args.init_erase_tpm,
            };
            (Some(swtpm), key_cfg)
        }
        None => (
            None,
            KeyConfig {
                tcti: cfg.tpm.tcti.clone(),
                state_dir: cfg.state.dir.clone(),
                seal_pcrs: cfg.tpm.seal_pcrs.clone(),
                erase_existing: args.init_erase_tpm,
            },
        ),
    };

    let intervals = Intervals {
        boundary: std::time::Duration::from_secs(cfg.boundary.check_interval_secs),
        tpm: std::time::Duration::from_secs(cfg.tpm.check_interval_secs),
        auth_timeout: std::time::Duration::from_millis(cfg.dbus.auth_timeout_ms),
        auth_reuse: std::time::Duration::from_millis(cfg.dbus.auth_reuse_ms),
        health: std::time::Duration::from_secs(cfg.health.interval_secs),
    };
    let result = serve(
        key_cfg,
        cfg.storage.clone(),
        cfg.engines.clone(),
        cfg.health.clone(),
        metrics_setup,
        args.oneshot,
        args.dev.is_some(),
        intervals,
        fdstore,
        async move {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        },
    )
    .await;
    if let Some(swtpm) = swtpm {
        if let Err(e) = tokio::task::spawn_blocking(move || swtpm.stop())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        {
            warn!("stopping the development TPM: {e}");
        }
    }
    result
}

/// The agent's timers, from the configuration.
#[derive(Debug, Clone, Copy)]
struct Intervals {
    boundary: std::time::Duration,
    tpm: std::time::Duration,
    auth_timeout: std::time::Duration,
    auth_reuse: std::time::Duration,
    /// Periodic health collection.
    health: std::time::Duration,
}

// The configuration's sections, each for its own part: a struct would
// only rename them.
#[allow(clippy::too_many_arguments)]
async fn serve(
    key_cfg: KeyConfig,
    storage: config::StorageSection,
    engines_cfg: config::EnginesSection,
    health: config::HealthSection,
    metrics_setup: metrics::Setup,
    oneshot: bool,
    dev: bool,
    intervals: Intervals,
    fdstore: Arc<fdstore::FdStore>,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<(), AgentError> {
    let state_dir = key_cfg.state_dir.clone();
    let (keys, opened) = tokio::task::spawn_blocking(move || Keys::start(key_cfg))
        .await
        .map_err(|e| {
            KeyError::UnexpectedTpmResponse(if e.is_panic() {
                "key thread panicked"
            } else {
                "key thread cancelled"
            })
        })??;
    let status = keys
        .call(|k| k.status())
        .await
        .map_err(|_| KeyError::UnexpectedTpmResponse("key thread"))?;
    match &opened {
        Opened::Initialised => {
            info!(node_id = %status.node_id, "initialised the key hierarchy (landlord pair and KL)")
        }
        Opened::Loaded { recovered } => {
            info!(node_id = %status.node_id, recovered, "loaded the key hierarchy")
        }
    }
    if status.tpm_kind == TpmKind::Software {
        warn!("running on a software TPM: keys have no hardware protection");
    }
    println!("node id:              {}", status.node_id);
    println!("TPM:                  {}", status.tpm_kind);
    println!("landlord generation:  {}", status.landlord.generation);
    println!("landlord fingerprint: {}", status.landlord.fingerprint);
    match &status.tenant {
        Some(t) => println!(
            "tenant:               {} (generation {}, fingerprint {})",
            t.name.as_deref().unwrap_or("?"),
            t.generation,
            t.fingerprint
        ),
        None => println!("tenant:               not assigned"),
    }

    // Boundaries are enforced before the bus is served, and stay in the
    // kernel whatever happens next (fail closed).
    let boundaries = Arc::new(boundary::Boundaries::load(&state_dir)?);
    // Engines recorded as running may still be (the agent restarted, they
    // did not): their egress rules go into that same first table, one
    // transaction with the boundary, before anything else runs; the engine
    // runtime re-adopts them later (docs/engines.md, "Egress at start").
    boundaries.preload_engine_egress(engines::recorded_egress(
        &engines_cfg.cgroup_root,
        &engines_cfg.cgroup_subtree,
        &state_dir,
    ));
    {
        let b = boundaries.clone();
        match tokio::task::spawn_blocking(move || b.apply_stored()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "cannot apply the stored boundary; the kernel keeps what it has")
            }
            Err(e) => error!(error = %e, "boundary task failed"),
        }
    }
    let info = boundaries.info(true);
    match (info.elements, info.cluster.is_some()) {
        (Some(n), _) => println!("boundary:             enforced ({n} set elements)"),
        (None, true) => println!("boundary:             stored but NOT enforced (see the log)"),
        (None, false) => println!("boundary:             none"),
    }

    // The volume opens before the bus is served (engines and the tenant
    // find their data there), and closes after the bus is released.
    let volume = Arc::new(volume::Volume::new(storage, &state_dir));
    let keys = Arc::new(keys);
    if oneshot {
        match volume.meta() {
            Ok(Some(m)) => println!("volume:               {} (not opened: --oneshot)", m.device),
            Ok(None) => println!("volume:               none"),
            Err(e) => println!("volume:               {e}"),
        }
    } else {
        match keys
            .call(keys::disk_key)
            .await
            .map_err(KeyError::from)
            .and_then(|r| r)
        {
            Ok(k) => {
                let v = volume.clone();
                match tokio::task::spawn_blocking(move || v.open_at_start(&k)).await {
                    Ok(Ok(Some(event))) => println!("volume:               {event}"),
                    Ok(Ok(None)) => println!("volume:               none"),
                    Ok(Err(e)) => {
                        error!(error = %e, "the volume was not opened");
                        println!("volume:               NOT opened: {e}");
                    }
                    Err(e) => error!(error = %e, "volume task failed"),
                }
            }
            Err(e) => {
                error!(error = %e, "no disk key: the volume was not opened");
                println!("volume:               NOT opened: no disk key");
            }
        }
    }
    // What the engines run, read at stop: engines still running from the
    // volume keep it open (below).
    let mut engine_view: Option<Arc<dyn leasehold_node::EngineView>> = None;
    let result = if oneshot {
        Ok(())
    } else {
        // After the volume: the engines run from it.
        let engine_volume = engine_volume(volume.clone(), dev);
        let uploads = Arc::new(upload::Uploads::new(
            engine_volume.clone(),
            engines_cfg.images_dir.clone(),
            engines_cfg.upload_max_bytes,
        ));
        {
            let u = uploads.clone();
            volume.before_unmount(Box::new(move || {
                let n = u.drop_all();
                if n > 0 {
                    info!(
                        uploads = n,
                        "image uploads in progress dropped: the volume is unmounted"
                    );
                }
            }));
        }
        {
            // Temp files in the inbox are uploads an earlier agent never
            // finished: nobody can finish them now.
            // In the background: the inbox is the tenant's to fill, and the
            // agent serves meanwhile (review: awaited, before the bus).
            let u = uploads.clone();
            tokio::spawn(async move {
                if let Ok(n) = tokio::task::spawn_blocking(move || u.sweep_at_start()).await {
                    if n > 0 {
                        info!(files = n, "removed unfinished image uploads");
                    }
                }
            });
        }
        let (reboot_tx, reboot_rx) = tokio::sync::mpsc::channel(4);
        let engines = start_engines(
            engines_cfg,
            &state_dir,
            engine_volume,
            keys.clone(),
            boundaries.clone(),
            reboot_tx,
            dev,
            fdstore,
        )
        .await?;
        engine_view = Some(leasehold_node::Engines::view(&engines));
        serve_bus(
            keys.clone(),
            boundaries,
            volume.clone(),
            uploads,
            engines,
            reboot_rx,
            health,
            metrics_setup,
            intervals,
            &state_dir,
            stop,
        )
        .await
    };
    if !oneshot {
        // Engines outlive the agent (their unit holds them); closing the
        // volume under them would take their files away mid-write. While
        // one runs, the volume stays mapped and mounted and the next agent
        // adopts it, as after an upgrade (docs/engines.md).
        let running: Vec<String> = engine_view
            .map(|v| {
                v.list()
                    .into_iter()
                    .filter(|e| e.pid.is_some())
                    .map(|e| e.name)
                    .collect()
            })
            .unwrap_or_default();
        let v = volume.clone();
        match tokio::task::spawn_blocking(move || v.close(&running)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "closing the volume"),
            Err(e) => error!(error = %e, "volume task failed"),
        }
    }
    keys.shutdown().await?;
    info!("TPM shut down cleanly");
    result
}

/// Where engines and uploads live: the tenant volume (or, in a build for
/// the host's whole-path bench, a stand-in: engines/stand_in.rs).
/// The stand-ins act only in development mode (`--dev`).
fn engine_volume(volume: Arc<volume::Volume>, dev: bool) -> Arc<dyn engines::VolumeDir> {
    #[cfg(feature = "bench-stand-ins")]
    return engines::stand_in::volume(volume, dev);
    #[cfg(not(feature = "bench-stand-ins"))]
    {
        let _ = dev;
        volume
    }
}

fn engine_cgroups(
    fs: leasehold_engines::cgroup::CgroupFs,
    dev: bool,
) -> Arc<dyn leasehold_engines::cgroup::Cgroups> {
    #[cfg(feature = "bench-stand-ins")]
    return engines::stand_in::cgroups(fs, dev);
    #[cfg(not(feature = "bench-stand-ins"))]
    {
        let _ = dev;
        Arc::new(fs)
    }
}

/// The engine runtime: re-adopts the engines still running, starts those
/// marked to start. Where cgroup v2 or the volume is missing it still runs
/// (deploy and start then refuse, naming what is missing).
// Each argument is a different owner's handle: a struct would only rename
// them.
#[allow(clippy::too_many_arguments)]
async fn start_engines(
    c: config::EnginesSection,
    state_dir: &Path,
    volume: Arc<dyn engines::VolumeDir>,
    keys: Arc<Keys>,
    boundaries: Arc<boundary::Boundaries>,
    reboot_node: tokio::sync::mpsc::Sender<(String, String)>,
    dev: bool,
    fdstore: Arc<fdstore::FdStore>,
) -> Result<engines::EngineRuntime, AgentError> {
    // Next to the agent (a build tree), else where the package puts it.
    let shim = c.shim.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("leasehold-engine-shim")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("/usr/lib/leasehold/leasehold-engine-shim"))
    });
    let cfg = engines::RuntimeConfig {
        cgroup_root: c.cgroup_root.clone(),
        subtree: c.cgroup_subtree,
        images_dir: c.images_dir,
        run_dir: c.run_dir,
        uid_base: c.uid_base,
        state_dir: state_dir.to_owned(),
        log_max_bytes: c.log_max_bytes,
        reboot_node: c.allow_reboot_node.then_some(reboot_node),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|b| b.trim().to_owned())
            .filter(|b| !b.is_empty()),
        probe_rate: c.probe_rate,
        probe_concurrency: c.probe_concurrency,
        fdstore,
    };
    let cgroups = engine_cgroups(
        leasehold_engines::cgroup::CgroupFs::with_root(Some(&c.cgroup_root)),
        dev,
    );
    let mut launcher = leasehold_engines::launch::Launcher::new(shim);
    if c.warm_shim {
        launcher = launcher.with_warm_shim();
        // In the background: the first start finds it waiting.
        launcher.refill();
    }
    let spawner = Arc::new(engines::ShimSpawner(launcher));
    // The same store and key as the tenant's `secret put` (SecretPut).
    let secrets = Arc::new(engines::TenantSecrets {
        keys: keys::KeyBackend(keys),
        store: secrets::SecretStore::new(state_dir.join("secrets")),
    });
    tokio::task::spawn_blocking(move || {
        engines::EngineRuntime::start_full(cfg, cgroups, spawner, volume, secrets, boundaries)
    })
    .await
    .map_err(|e| AgentError::Engines(e.to_string()))?
    .map_err(|e| AgentError::Engines(e.to_string()))
}

/// The health monitor, with the rtnetlink watcher when `[health] netlink`
/// is on. A watcher that cannot start is a fault in every report, not a
/// reason to stop the agent: the rest of its work does not depend on it.
/// Link events that can change the faults (a carrier or an interface
/// lost or back) wake `wake`: the collection then takes a report at once
/// instead of at its next tick (`collect::run`).
fn health_monitor(
    cfg: &config::HealthSection,
    wake: Arc<tokio::sync::Notify>,
    smart_wake: Arc<tokio::sync::Notify>,
) -> leasehold_health::Monitor {
    let m = leasehold_health::Monitor::new(cfg.settings());
    if cfg.smart && cfg.nvme_events {
        let (nvme, roots) = (cfg.nvme.clone(), cfg.settings().roots);
        let spawned = std::thread::Builder::new()
            .name("nvme-events".into())
            .spawn(move || nvme_events(&nvme, &roots, &smart_wake));
        if let Err(e) = spawned {
            warn!(error = %e, "NVMe SMART events are not watched");
        }
    }
    if !cfg.netlink {
        return m;
    }
    let watch = leasehold_health::net::NetWatch::start().map_err(|e| e.to_string());
    match &watch {
        Ok(w) => {
            let events = w.subscribe();
            // Logged from a thread of its own, rate-limited: a flapping
            // cable must not flood the journal.
            let spawned = std::thread::Builder::new()
                .name("netlink-log".into())
                .spawn(move || log_net_events(&events, &wake));
            if let Err(e) = spawned {
                warn!(error = %e, "link events are not logged");
            }
        }
        Err(e) => error!(error = %e, "links and addresses are not watched (rtnetlink)"),
    }
    m.with_network(watch.map(Arc::new))
}

/// Bound of one nvme-cli run.
const NVME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// NVMe SMART events (docs/health.md "SMART events"): every controller's
/// SMART event bits turned on, again after a controller reset; a SMART
/// event wakes `smart_wake` (the disks read at once). Without nvme-cli,
/// or where a controller refuses, its SMART state is seen by the periodic
/// report only, as before.
fn nvme_events(
    nvme: &std::path::Path,
    roots: &leasehold_health::Roots,
    smart_wake: &tokio::sync::Notify,
) {
    use leasehold_health::nvme::{self, NvmeEvent, Watched};
    let ctrls = nvme::controllers(&roots.sys);
    if !nvme.exists() {
        if !ctrls.is_empty() {
            warn!(nvme = %nvme.display(), "nvme-cli is not installed: NVMe SMART warnings are seen at the periodic health report only");
        }
        return;
    }
    // Listening first: a reset while the bits are being set is not missed.
    let sock = match nvme::subscribe() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "NVMe SMART events are not watched (uevent socket)");
            return;
        }
    };
    // Setting the bits takes up to three nvme-cli runs per controller: on a
    // thread of its own, so the uevent reader never stops reading. `None`:
    // every controller (at start, and after lost messages).
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    let (nvme, roots_c) = (nvme.to_owned(), roots.clone());
    let spawned = std::thread::Builder::new()
        .name("nvme-enable".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                // What queued meanwhile is merged into one pass: a storm of
                // resets or lost messages costs one run per controller.
                let mut which: Option<std::collections::BTreeSet<String>> =
                    Some(Default::default());
                for w in std::iter::once(first).chain(rx.try_iter()) {
                    match (w, which.as_mut()) {
                        (Some(c), Some(set)) => {
                            set.insert(c);
                        }
                        _ => which = None,
                    }
                }
                let ctrls: Vec<String> = match which {
                    Some(set) => set.into_iter().collect(),
                    None => nvme::controllers(&roots_c.sys),
                };
                for ctrl in &ctrls {
                    enable_nvme_events(&nvme, &roots_c.dev, ctrl);
                }
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "NVMe SMART events are not turned on");
        return;
    }
    let _ = tx.send(None);
    let err = nvme::watch(&sock, |w| match w {
        Watched::Event(NvmeEvent::Smart { ctrl, aen }) => {
            info!(event = "nvme-smart-event", ctrl, aen = %format!("{aen:#08x}"), "NVMe SMART event: reading the disks");
            smart_wake.notify_one();
        }
        Watched::Event(NvmeEvent::Connected { ctrl }) => {
            let _ = tx.send(Some(ctrl));
        }
        Watched::Lost => {
            warn!("uevents were lost (socket buffer full): reading the disks and turning NVMe SMART events on again");
            smart_wake.notify_one();
            let _ = tx.send(None);
        }
    });
    error!(error = %err, "NVMe SMART events are no longer watched");
}

/// Turns controller `ctrl`'s SMART events on, logged either way.
fn enable_nvme_events(nvme: &std::path::Path, dev: &std::path::Path, ctrl: &str) {
    use leasehold_health::nvme::{self, Enabled};
    match nvme::enable_smart_events(nvme, dev, ctrl, NVME_TIMEOUT) {
        Ok(Enabled::Set { before, after }) => info!(
            event = "nvme-smart-events",
            ctrl,
            before = %format!("{before:#x}"),
            after = %format!("{after:#x}"),
            "NVMe SMART events turned on"
        ),
        Ok(Enabled::Already(v)) => {
            info!(event = "nvme-smart-events", ctrl, value = %format!("{v:#x}"), "NVMe SMART events were on")
        }
        Err(e) => warn!(
            ctrl,
            error = %e,
            "NVMe SMART events are off for this controller: its SMART state is seen at the periodic health report only"
        ),
    }
}

/// Logs link and address events: at most 20 a minute, then how many were
/// left out. Wakes the collection for those that can change a fault
/// (every one, unlike the log, whatever the rate: `Notify` keeps one
/// wake-up however many come).
fn log_net_events(
    events: &std::sync::mpsc::Receiver<leasehold_health::net::Stamped>,
    wake: &tokio::sync::Notify,
) {
    use leasehold_health::net::NetEventKind as K;
    const PER_MINUTE: u32 = 20;
    let mut window = std::time::Instant::now();
    let (mut logged, mut skipped) = (0u32, 0u64);
    for s in events {
        if matches!(
            s.event.kind,
            K::CarrierDown
                | K::CarrierUp
                | K::AdminDown
                | K::AdminUp
                | K::LinkAdded
                | K::LinkRemoved
        ) {
            wake.notify_one();
        }
        if window.elapsed() >= std::time::Duration::from_secs(60) {
            if skipped > 0 {
                warn!(skipped, "link and address events not logged (rate limit)");
            }
            window = std::time::Instant::now();
            (logged, skipped) = (0, 0);
        }
        if logged == PER_MINUTE {
            skipped += 1;
            continue;
        }
        logged += 1;
        let e = s.event;
        info!(event = e.kind.as_str(), iface = %e.iface, detail = e.detail.as_deref().unwrap_or(""), "network");
    }
}

/// Serves both interfaces until `stop` resolves. The name is requested only
/// after the interfaces are in place, so no call can see a half-built agent.
// The agent's parts, each built by `serve`: a struct would only rename them.
#[allow(clippy::too_many_arguments)]
async fn serve_bus(
    keys: Arc<Keys>,
    boundaries: Arc<boundary::Boundaries>,
    volume: Arc<volume::Volume>,
    uploads: Arc<upload::Uploads>,
    engines: engines::EngineRuntime,
    mut reboot_rx: tokio::sync::mpsc::Receiver<(String, String)>,
    health: config::HealthSection,
    metrics_setup: metrics::Setup,
    intervals: Intervals,
    state_dir: &Path,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<(), AgentError> {
    let conn = zbus::connection::Builder::system()
        .build()
        .await
        .map_err(AgentError::Bus)?;
    // The watcher reads nftables notifications on a socket of its own (no
    // long-lived child: one spawned while a TPM command is in flight would
    // inherit the TSS library's socket, which has no close-on-exec, and
    // swtpm serves one connection at a time).
    let (restored_tx, mut restored_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    boundaries.watch(intervals.boundary, restored_tx);
    let secrets = secrets::SecretStore::new(state_dir.join("secrets"));
    let backends = leasehold_node::Backends {
        keys: Box::new(keys::KeyBackend(keys.clone())),
        volume: Box::new(volume::VolumeBackend(volume.clone())),
        boundaries: Box::new(boundary::BoundaryBackend(boundaries.clone())),
        secrets: Box::new(secrets.clone()),
        events: Box::new(api::BusEvents {
            conn: conn.clone(),
            rt: tokio::runtime::Handle::current(),
            receipts: receipts::ReceiptStore::new(state_dir),
        }),
        engines: Box::new(engines),
    };
    let node = tokio::task::spawn_blocking(move || leasehold_node::Node::start(backends))
        .await
        .map_err(|e| AgentError::Node(e.to_string()))?
        .map_err(|e| AgentError::Node(e.to_string()))?;
    let node = Arc::new(node);
    // Authorization asks the bus and polkit over a connection of its own:
    // their answers never queue behind the calls callers send the agent.
    let auth_conn = zbus::connection::Builder::system()
        .build()
        .await
        .map_err(AgentError::Bus)?;
    // Starting the watcher reads the links, addresses and routes (a few
    // netlink round trips): off the runtime's threads.
    let wake = Arc::new(tokio::sync::Notify::new());
    let smart_wake = Arc::new(tokio::sync::Notify::new());
    let monitor = {
        let (health, wake, smart_wake) = (health.clone(), wake.clone(), smart_wake.clone());
        tokio::task::spawn_blocking(move || health_monitor(&health, wake, smart_wake))
    }
    .await
    .map_err(|e| AgentError::Node(e.to_string()))?;
    let tpm_health = Arc::new(health::TpmHealth::default());
    tokio::spawn(health::watch(
        keys.clone(),
        tpm_health.clone(),
        intervals.tpm,
    ));
    let keys_for_watchdog = keys.clone();
    let health_monitor = Arc::new(monitor.with_checks(Arc::new(health::AgentChecks {
        keys: keys.clone(),
        boundaries: boundaries.clone(),
        volume: volume.clone(),
        node: node.clone(),
    })));
    let ctx = Arc::new(api::Ctx {
        node: node.clone(),
        auth: auth::Authorizer::new(auth_conn, intervals.auth_timeout, intervals.auth_reuse),
        secrets,
        boundaries: boundaries.clone(),
        volume: volume.clone(),
        uploads,
        tpm_health,
        receipts: receipts::ReceiptStore::new(state_dir),
        action_records: actions::RecordStore::new(state_dir),
        health: health_monitor.clone(),
        health_interval: intervals.health,
        keys,
    });
    {
        let ctx = ctx.clone();
        tokio::spawn(async move { ctx.auth.forget_grants_on_policy_changes().await });
    }
    {
        let conn = conn.clone();
        tokio::spawn(async move {
            while let Some(what) = restored_rx.recv().await {
                if let Err(e) = conn
                    .emit_signal(
                        None::<&str>,
                        OBJECT_PATH,
                        leasehold_dbus_api::LANDLORD_INTERFACE,
                        "BoundaryRestored",
                        &(what,),
                    )
                    .await
                {
                    warn!(error = %e, "cannot emit BoundaryRestored");
                }
            }
        });
    }
    // A boundary change that was waiting for confirmation when the agent
    // stopped: reverted at once if its deadline passed, else timed again.
    if let Some(deadline) = boundaries.pending_deadline() {
        info!(deadline, "a boundary change awaits confirmation");
        tokio::spawn(ctx.clone().revert_at(conn.clone(), deadline));
    }
    let dbus_metrics = Arc::new(metrics::DbusMetrics::default());
    // Before the name is requested: a bad token file stops the start.
    let metrics_socket = metrics::start(metrics_setup, ctx.clone(), dbus_metrics.clone()).await?;
    let server = conn.object_server();
    let m = &dbus_metrics;
    server
        .at(
            OBJECT_PATH,
            auth::Bounded(api::LandlordApi(ctx.clone()), m.clone()),
        )
        .await
        .map_err(AgentError::Bus)?;
    server
        .at(
            OBJECT_PATH,
            auth::Bounded(api::TenantApi(ctx.clone()), m.clone()),
        )
        .await
        .map_err(AgentError::Bus)?;
    server
        .at(
            OBJECT_PATH,
            auth::Bounded(api::TenantEnginesApi(ctx.clone()), m.clone()),
        )
        .await
        .map_err(AgentError::Bus)?;
    server
        .at(
            OBJECT_PATH,
            auth::Bounded(api::HealthApi(ctx.clone()), m.clone()),
        )
        .await
        .map_err(AgentError::Bus)?;
    server
        .at(OBJECT_PATH, auth::Bounded(api::AttestApi(ctx), m.clone()))
        .await
        .map_err(AgentError::Bus)?;
    conn.request_name(BUS_NAME).await.map_err(AgentError::Bus)?;
    info!(name = BUS_NAME, "serving on the system bus");
    let corrective = Arc::new(tokio::sync::Mutex::new(actions::Actions::new(
        health.action.clone(),
        state_dir,
        actions::Runner {
            node: node.clone(),
            conn: conn.clone(),
            records: actions::RecordStore::new(state_dir),
        },
    )));
    {
        let corrective = corrective.clone();
        tokio::spawn(async move {
            while let Some((engine, why)) = reboot_rx.recv().await {
                corrective.lock().await.engine_reboot(&engine, &why).await;
            }
        });
    }
    tokio::spawn(collect::run(
        health_monitor,
        intervals.health,
        collect::Wakes {
            links: wake,
            smart: smart_wake,
        },
        conn.clone(),
        corrective,
    ));
    // The unit is Type=notify: this is the one place the agent starts
    // serving, so every start that serves says so.
    liveness::ready();
    if let Some(w) = liveness::watchdog_interval() {
        tokio::spawn(liveness::watchdog(keys_for_watchdog, w / 2));
    }
    let died = tokio::select! {
        sig = stop => {
            info!(signal = sig, "stopping");
            false
        }
        () = node.ended() => {
            error!("the node controller stopped (a backend failed hard); exiting so the service restarts");
            true
        }
    };
    liveness::stopping();
    // Release the name first so no new call starts, then let queued
    // changes finish before the volume closes and the keys shut down.
    let _ = conn.release_name(BUS_NAME).await;
    if let Some(p) = metrics_socket {
        let _ = std::fs::remove_file(p);
    }
    let _ = tokio::task::spawn_blocking(move || node.stop()).await;
    if died {
        return Err(AgentError::Node("the controller thread ended".into()));
    }
    Ok(())
}
