//! `/etc/leasehold/agentd.toml`. Unknown keys are errors; every error names
//! the key it is about.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default configuration file.
pub const DEFAULT_PATH: &str = "/etc/leasehold/agentd.toml";

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TPM access.
    #[serde(default)]
    pub tpm: TpmSection,
    /// State directory.
    #[serde(default)]
    pub state: StateSection,
    /// Network boundaries.
    #[serde(default)]
    pub boundary: BoundarySection,
    /// The tenant's encrypted volume.
    #[serde(default)]
    pub storage: StorageSection,
    /// The D-Bus service.
    #[serde(default)]
    pub dbus: DbusSection,
    /// The tenant's engines.
    #[serde(default)]
    pub engines: EnginesSection,
    /// Health sensors (docs/health.md).
    #[serde(default)]
    pub health: HealthSection,
    /// Prometheus metrics (docs/health.md, "Metrics"); off by default.
    #[serde(default)]
    pub metrics: MetricsSection,
}

/// `[metrics]`: where the Prometheus endpoint listens. Neither `socket`
/// nor `listen`: no endpoint.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Unix socket, mode 0660, group `leasehold-landlord`: local readers.
    pub socket: Option<PathBuf>,
    /// TCP address; every request must carry the bearer token of
    /// `token_file` (a port is open to every local user).
    pub listen: Option<std::net::SocketAddr>,
    /// The bearer token for `listen`.
    pub token_file: Option<PathBuf>,
    /// Connections served at once, per listener (on TCP, those that have
    /// shown the token).
    #[serde(default = "default_metrics_connections")]
    pub max_connections: usize,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            socket: None,
            listen: None,
            token_file: None,
            max_connections: default_metrics_connections(),
        }
    }
}

fn default_metrics_connections() -> usize {
    4
}

/// `[health]`: which sources the health report reads and how long each
/// may take.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// EDAC memory error counters.
    #[serde(default = "default_true")]
    pub edac: bool,
    /// hwmon temperatures.
    #[serde(default = "default_true")]
    pub hwmon: bool,
    /// Thermal zones.
    #[serde(default = "default_true")]
    pub thermal: bool,
    /// Block devices' I/O error counters.
    #[serde(default = "default_true")]
    pub block: bool,
    /// Disk health through smartctl.
    #[serde(default = "default_true")]
    pub smart: bool,
    /// NIC link state.
    #[serde(default = "default_true")]
    pub net: bool,
    /// Deadline of each sysfs source (ms).
    #[serde(default = "default_health_deadline_ms")]
    pub deadline_ms: u64,
    /// Deadline of one smartctl run (ms); the disk is reported stuck and
    /// smartctl killed past it.
    #[serde(default = "default_smart_timeout_ms")]
    pub smart_timeout_ms: u64,
    /// The smartctl binary (package smartmontools).
    #[serde(default = "default_smartctl")]
    pub smartctl: PathBuf,
    /// NVMe SMART events: turn the SMART bits of each controller's Async
    /// Event Configuration on and read the disks at once on an event
    /// (docs/health.md "SMART events"); with `smart` only.
    #[serde(default = "default_true")]
    pub nvme_events: bool,
    /// The nvme-cli binary (package nvme-cli).
    #[serde(default = "default_nvme")]
    pub nvme: PathBuf,
    /// sysfs root the sources read (another root: tests, fixtures).
    #[serde(default = "default_sys_root")]
    pub sys_root: PathBuf,
    /// Seconds between the agent's own reports (metrics, `FaultsChanged`).
    #[serde(default = "default_health_interval")]
    pub interval_secs: u64,
    /// Watch links, addresses and default routes through rtnetlink (the
    /// report's `network`).
    #[serde(default = "default_true")]
    pub netlink: bool,
    /// systemd-networkd's DHCP lease files.
    #[serde(default = "default_leases_dir")]
    pub leases_dir: PathBuf,
    /// Corrective actions (`[[health.action]]`, docs/health.md
    /// "Corrective actions on the node"); none by default.
    #[serde(default)]
    pub action: Vec<crate::actions::Rule>,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            edac: true,
            hwmon: true,
            thermal: true,
            block: true,
            smart: true,
            net: true,
            deadline_ms: default_health_deadline_ms(),
            smart_timeout_ms: default_smart_timeout_ms(),
            smartctl: default_smartctl(),
            nvme_events: true,
            nvme: default_nvme(),
            sys_root: default_sys_root(),
            interval_secs: default_health_interval(),
            netlink: true,
            leases_dir: default_leases_dir(),
            action: Vec::new(),
        }
    }
}

fn default_health_interval() -> u64 {
    60
}

fn default_leases_dir() -> PathBuf {
    "/run/systemd/netif/leases".into()
}

fn default_health_deadline_ms() -> u64 {
    2000
}

fn default_smart_timeout_ms() -> u64 {
    10_000
}

fn default_smartctl() -> PathBuf {
    "/usr/sbin/smartctl".into()
}

fn default_nvme() -> PathBuf {
    "/usr/sbin/nvme".into()
}

fn default_sys_root() -> PathBuf {
    "/sys".into()
}

impl HealthSection {
    /// The health crate's settings.
    pub fn settings(&self) -> leasehold_health::Settings {
        use leasehold_health::Source;
        let on = [
            (Source::Edac, self.edac),
            (Source::Hwmon, self.hwmon),
            (Source::Thermal, self.thermal),
            (Source::Block, self.block),
            (Source::Smart, self.smart),
            (Source::Net, self.net),
        ];
        leasehold_health::Settings {
            roots: leasehold_health::Roots {
                sys: self.sys_root.clone(),
                ..Default::default()
            },
            enabled: on
                .into_iter()
                .filter(|(_, on)| *on)
                .map(|(s, _)| s)
                .collect(),
            deadline: std::time::Duration::from_millis(self.deadline_ms),
            smart_timeout: std::time::Duration::from_millis(self.smart_timeout_ms),
            smartctl: self.smartctl.clone(),
            leases_dir: self.leases_dir.clone(),
        }
    }
}

/// `[engines]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnginesSection {
    /// The cgroup v2 mount.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: PathBuf,
    /// The tenant's cgroup subtree, relative to `cgroup_root`.
    #[serde(default = "default_subtree")]
    pub cgroup_subtree: String,
    /// Directory on the tenant volume (relative to `storage.mount`) for the
    /// image inbox, the unpacked roots and the data dirs.
    #[serde(default = "default_images_dir")]
    pub images_dir: String,
    /// Run directories of the engines' shims (tmpfs).
    #[serde(default = "default_engine_run_dir")]
    pub run_dir: PathBuf,
    /// The `leasehold-engine-shim` binary (absent: next to the agent's
    /// executable).
    #[serde(default)]
    pub shim: Option<PathBuf>,
    /// First host uid (and gid) given to engines, one each.
    #[serde(default = "default_uid_base")]
    pub uid_base: u32,
    /// Bytes of output kept per engine on the tenant volume (two rotated
    /// files together).
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
    /// Most bytes of one image upload into the inbox (`BeginUpload`).
    #[serde(default = "default_upload_max_bytes")]
    pub upload_max_bytes: u64,
    /// Whether the tenant's engines may reboot the node
    /// (`on_failure = ["reboot-node"]`), at most once an hour, with a
    /// signed record (docs/engines.md). Off: logged and ignored.
    #[serde(default)]
    pub allow_reboot_node: bool,
    /// Keep one shim spawned ahead, handed the next start (docs/engines.md,
    /// "The warm shim"): a start then skips the shim's exec and start-up.
    #[serde(default = "default_warm_shim")]
    pub warm_shim: bool,
    /// Probe runs a second the node starts for all engines together
    /// (docs/engines.md, "What probes may cost the node"); runs past it
    /// wait, engines taking turns.
    #[serde(default = "default_probe_rate")]
    pub probe_rate: u32,
    /// Probe runs at once for all engines together.
    #[serde(default = "default_probe_concurrency")]
    pub probe_concurrency: u32,
}

impl Default for EnginesSection {
    fn default() -> Self {
        Self {
            cgroup_root: default_cgroup_root(),
            cgroup_subtree: default_subtree(),
            images_dir: default_images_dir(),
            run_dir: default_engine_run_dir(),
            shim: None,
            uid_base: default_uid_base(),
            log_max_bytes: default_log_max_bytes(),
            upload_max_bytes: default_upload_max_bytes(),
            allow_reboot_node: false,
            warm_shim: default_warm_shim(),
            probe_rate: default_probe_rate(),
            probe_concurrency: default_probe_concurrency(),
        }
    }
}

fn default_probe_rate() -> u32 {
    crate::engines::probe_gate::DEFAULT_RATE
}

fn default_probe_concurrency() -> u32 {
    crate::engines::probe_gate::DEFAULT_CONCURRENCY
}

fn default_warm_shim() -> bool {
    true
}

fn default_cgroup_root() -> PathBuf {
    "/sys/fs/cgroup".into()
}

fn default_subtree() -> String {
    // Under the engines unit docs/engines.md proposes (Delegate=yes, not
    // restarted on upgrades); until it exists, deploy refuses naming it.
    "system.slice/leasehold-engines.service/tenant".into()
}

fn default_images_dir() -> String {
    "engines".into()
}

fn default_engine_run_dir() -> PathBuf {
    "/run/leasehold/engines".into()
}

fn default_uid_base() -> u32 {
    2_000_000
}

fn default_log_max_bytes() -> u64 {
    leasehold_engines::logs::DEFAULT_MAX_BYTES
}

fn default_upload_max_bytes() -> u64 {
    crate::upload::DEFAULT_MAX_BYTES
}

/// A relative path of plain components (`a/b`), for keys that name a
/// place beneath another.
fn plain_relative(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

/// `[dbus]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DbusSection {
    /// Bound on authorizing one call (caller identity, group look-up,
    /// polkit); past it the call is refused with `NotAuthorized`.
    #[serde(default = "default_auth_timeout_ms")]
    pub auth_timeout_ms: u64,
    /// How long polkit's yes is reused for the same connection, action and
    /// details (0: ask polkit every call). At most the group cache's 10 s,
    /// which already bounds how long a removed group member keeps access.
    #[serde(default = "default_auth_reuse_ms")]
    pub auth_reuse_ms: u64,
}

impl Default for DbusSection {
    fn default() -> Self {
        Self {
            auth_timeout_ms: default_auth_timeout_ms(),
            auth_reuse_ms: default_auth_reuse_ms(),
        }
    }
}

fn default_auth_reuse_ms() -> u64 {
    u64::try_from(crate::auth::AUTH_REUSE.as_millis()).unwrap_or(5000)
}

fn default_auth_timeout_ms() -> u64 {
    u64::try_from(crate::auth::AUTH_TIMEOUT.as_millis()).unwrap_or(5000)
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// The block device for the volume (a /dev/disk/by-id path is stable
    /// across reboots). If set, `volume init` must name this device.
    #[serde(default)]
    pub device: Option<String>,
    /// Where the volume is mounted for the tenant.
    #[serde(default = "default_mount")]
    pub mount: PathBuf,
    /// Filesystem made on the volume: "ext4" or "xfs".
    #[serde(default = "default_filesystem")]
    pub filesystem: String,
    /// dm-crypt `no_read_workqueue no_write_workqueue`: encrypt and decrypt
    /// in the submitting context instead of kernel workqueues.
    // Off by default: docs/benchmarks.md "volume" measured the kernel
    // workqueues faster on the lab node (2 vCPU).
    #[serde(default)]
    pub bypass_workqueues: bool,
    /// Pass discards (TRIM) through dm-crypt (reveals which blocks are
    /// unused).
    #[serde(default)]
    pub discards: bool,
    /// At `volume init`, write the whole device through the new mapping so
    /// every block is ciphertext (time in the device size; off: blocks
    /// never written keep what they held).
    #[serde(default = "default_true")]
    pub fill_on_init: bool,
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            device: None,
            mount: default_mount(),
            filesystem: default_filesystem(),
            bypass_workqueues: false,
            discards: false,
            fill_on_init: true,
        }
    }
}

fn default_mount() -> PathBuf {
    "/srv/leasehold/tenant".into()
}

fn default_filesystem() -> String {
    "ext4".into()
}

fn default_true() -> bool {
    true
}

/// `[boundary]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BoundarySection {
    /// Seconds between checks of the kernel table (besides the checks on
    /// every nftables change notification). Each check reads the table
    /// back: about 1 s of nft time at 100k peers.
    #[serde(default = "default_check_interval")]
    pub check_interval_secs: u64,
}

impl Default for BoundarySection {
    fn default() -> Self {
        Self {
            check_interval_secs: default_check_interval(),
        }
    }
}

fn default_check_interval() -> u64 {
    30
}

/// `[tpm]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TpmSection {
    /// TCTI string.
    #[serde(default = "default_tcti")]
    pub tcti: String,
    /// PCRs sealed keys are bound to.
    #[serde(default)]
    pub seal_pcrs: Vec<u8>,
    /// Seconds between health checks of the TPM (one signature each): a
    /// lost TPM shows in `NodeInfo` within this time.
    #[serde(default = "default_check_interval")]
    pub check_interval_secs: u64,
}

impl Default for TpmSection {
    fn default() -> Self {
        Self {
            tcti: default_tcti(),
            seal_pcrs: Vec::new(),
            check_interval_secs: default_check_interval(),
        }
    }
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".into()
}

/// `[state]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    /// Directory for keys and state.
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

impl Default for StateSection {
    fn default() -> Self {
        Self {
            dir: default_state_dir(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/leasehold")
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or shape error (the message names key and line).
    #[error("invalid config {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A value is valid but conflicts with the host (the reason names
    /// the key).
    #[error("invalid config {path}: {reason}")]
    Check {
        /// File.
        path: PathBuf,
        /// What conflicts, naming the key.
        reason: String,
    },
    /// A value is out of range.
    #[error("invalid config {path}: {key}: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Dotted key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` is used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        // serde_path_to_error adds the dotted key to type and range errors.
        let de = toml::Deserializer::new(text);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let mut message = String::new();
            if let Some(l) = line {
                message.push_str(&format!("line {l}: "));
            }
            if key != "." && !key.is_empty() {
                message.push_str(&format!("{key}: "));
            }
            message.push_str(inner.message().trim());
            ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        leasehold_tpm::validate_tcti(&self.tpm.tcti)
            .map_err(|e| invalid("tpm.tcti", e.to_string()))?;
        leasehold_tpm::validate_pcrs(&self.tpm.seal_pcrs)
            .map_err(|e| invalid("tpm.seal_pcrs", e.to_string()))?;
        if !self.state.dir.is_absolute() {
            return Err(invalid(
                "state.dir",
                format!("{} is not an absolute path", self.state.dir.display()),
            ));
        }
        if !self.storage.mount.is_absolute() {
            return Err(invalid(
                "storage.mount",
                format!("{} is not an absolute path", self.storage.mount.display()),
            ));
        }
        if !leasehold_storage::fs::SUPPORTED.contains(&self.storage.filesystem.as_str()) {
            return Err(invalid(
                "storage.filesystem",
                format!(
                    "{:?} is not one of {:?}",
                    self.storage.filesystem,
                    leasehold_storage::fs::SUPPORTED
                ),
            ));
        }
        if let Some(d) = &self.storage.device {
            if !d.starts_with("/dev/") {
                return Err(invalid(
                    "storage.device",
                    format!("{d} is not a device path under /dev"),
                ));
            }
        }
        if !(1..=86_400).contains(&self.tpm.check_interval_secs) {
            return Err(invalid(
                "tpm.check_interval_secs",
                format!("{} is outside 1..=86400", self.tpm.check_interval_secs),
            ));
        }
        if !(1..=86_400).contains(&self.boundary.check_interval_secs) {
            return Err(invalid(
                "boundary.check_interval_secs",
                format!("{} is outside 1..=86400", self.boundary.check_interval_secs),
            ));
        }
        let e = &self.engines;
        for (key, p) in [
            ("engines.cgroup_root", &e.cgroup_root),
            ("engines.run_dir", &e.run_dir),
        ]
        .into_iter()
        .chain(e.shim.iter().map(|s| ("engines.shim", s)))
        {
            if !p.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        for (key, v) in [
            ("engines.cgroup_subtree", &e.cgroup_subtree),
            ("engines.images_dir", &e.images_dir),
        ] {
            if !plain_relative(v) {
                return Err(invalid(
                    key,
                    format!("{v:?} is not a relative path of plain components (A-Z a-z 0-9 . _ -)"),
                ));
            }
        }
        // The engines' subtree is theirs alone: its cgroup is what the node
        // guard takes for "the tenant's engines" (docs/netpolicy.md), so a
        // systemd unit's own cgroup (system.slice: every service) would
        // let them reach the node's services, and tie those services'
        // loopback flows to the guard.
        let last = e.cgroup_subtree.rsplit('/').next().unwrap_or_default();
        if let Some(unit) = [".slice", ".service", ".scope", ".socket", ".mount", ".swap"]
            .into_iter()
            .find(|u| last.ends_with(u))
        {
            return Err(invalid(
                "engines.cgroup_subtree",
                format!(
                    "{:?} is a systemd unit's cgroup ({unit}), shared with its processes: name a subtree of the engines' own below the engines' unit (default {:?})",
                    e.cgroup_subtree,
                    default_subtree()
                ),
            ));
        }
        if !(65_536..=4_000_000_000).contains(&e.uid_base) {
            return Err(invalid(
                "engines.uid_base",
                format!(
                    "{} is outside 65536..=4000000000 (above every login and image uid)",
                    e.uid_base
                ),
            ));
        }
        {
            use leasehold_engines::logs::{MAX_MAX_BYTES, MIN_MAX_BYTES};
            if !(MIN_MAX_BYTES..=MAX_MAX_BYTES).contains(&e.log_max_bytes) {
                return Err(invalid(
                    "engines.log_max_bytes",
                    format!(
                        "{} is outside {MIN_MAX_BYTES}..={MAX_MAX_BYTES} (bytes, both files together)",
                        e.log_max_bytes
                    ),
                ));
            }
        }
        {
            use crate::upload::{MAX_CHUNK, MAX_MAX_BYTES};
            let min = MAX_CHUNK as u64;
            if !(min..=MAX_MAX_BYTES).contains(&e.upload_max_bytes) {
                return Err(invalid(
                    "engines.upload_max_bytes",
                    format!(
                        "{} is outside {min}..={MAX_MAX_BYTES} (bytes of one image upload; the unpacker refuses archives above 8 GiB)",
                        e.upload_max_bytes
                    ),
                ));
            }
        }
        {
            use crate::engines::probe_gate::{CONCURRENCY_RANGE, RATE_RANGE};
            for (field, value, range, what) in [
                (
                    "engines.probe_rate",
                    e.probe_rate,
                    RATE_RANGE,
                    "probe runs a second",
                ),
                (
                    "engines.probe_concurrency",
                    e.probe_concurrency,
                    CONCURRENCY_RANGE,
                    "probe runs at once",
                ),
            ] {
                if !range.contains(&value) {
                    return Err(invalid(
                        field,
                        format!(
                            "{value} is outside {}..={} ({what}, all engines together)",
                            range.start(),
                            range.end()
                        ),
                    ));
                }
            }
        }
        // Together at most 23 s: a report always answers within D-Bus's
        // default 25 s call timeout.
        let h = &self.health;
        if !(10..=5_000).contains(&h.deadline_ms) {
            return Err(invalid(
                "health.deadline_ms",
                format!("{} is outside 10..=5000", h.deadline_ms),
            ));
        }
        if !(100..=18_000).contains(&h.smart_timeout_ms) {
            return Err(invalid(
                "health.smart_timeout_ms",
                format!("{} is outside 100..=18000", h.smart_timeout_ms),
            ));
        }
        // A report runs smartctl on every disk: not more often than every
        // 2 s; at least hourly, or the signal and metrics say little.
        if !(2..=3_600).contains(&h.interval_secs) {
            return Err(invalid(
                "health.interval_secs",
                format!("{} is outside 2..=3600", h.interval_secs),
            ));
        }
        crate::actions::validate(&h.action).map_err(|e| invalid("health.action", e))?;
        for (key, p) in [
            ("health.smartctl", &h.smartctl),
            ("health.nvme", &h.nvme),
            ("health.sys_root", &h.sys_root),
            ("health.leases_dir", &h.leases_dir),
        ] {
            if !p.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        if self.dbus.auth_reuse_ms > 10_000 {
            return Err(invalid(
                "dbus.auth_reuse_ms",
                format!(
                    "{} is outside 0..=10000 (never longer than the 10 s group cache)",
                    self.dbus.auth_reuse_ms
                ),
            ));
        }
        let m = &self.metrics;
        if let Some(p) = &m.socket {
            if !p.is_absolute() {
                return Err(invalid(
                    "metrics.socket",
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        match (&m.listen, &m.token_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "metrics.token_file",
                    "is required with metrics.listen: a TCP port is open to every local user"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "metrics.token_file",
                    "is only used with metrics.listen".into(),
                ))
            }
            (Some(_), Some(p)) if !p.is_absolute() => {
                return Err(invalid(
                    "metrics.token_file",
                    format!("{} is not an absolute path", p.display()),
                ))
            }
            _ => {}
        }
        if !(1..=64).contains(&m.max_connections) {
            return Err(invalid(
                "metrics.max_connections",
                format!("{} is outside 1..=64", m.max_connections),
            ));
        }
        if !(100..=60_000).contains(&self.dbus.auth_timeout_ms) {
            return Err(invalid(
                "dbus.auth_timeout_ms",
                format!("{} is outside 100..=60000", self.dbus.auth_timeout_ms),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("agentd.toml"), t)
    }

    #[test]
    fn metrics_off_by_default_and_checked() {
        let c = parse("").unwrap();
        assert_eq!(c.metrics.socket, None);
        assert_eq!(c.metrics.listen, None);
        let c = parse("[metrics]\nsocket = \"/run/m.sock\"\nlisten = \"127.0.0.1:9464\"\ntoken_file = \"/etc/t\"\n").unwrap();
        assert_eq!(c.metrics.listen.unwrap().port(), 9464);
        assert_eq!(c.metrics.max_connections, 4);
        for (text, key) in [
            ("socket = \"m.sock\"", "metrics.socket"),
            ("listen = \"127.0.0.1:9464\"", "metrics.token_file"),
            ("token_file = \"/etc/t\"", "metrics.token_file"),
            (
                "listen = \"127.0.0.1:1\"\ntoken_file = \"t\"",
                "metrics.token_file",
            ),
            ("max_connections = 0", "metrics.max_connections"),
            ("listen = \"localhost\"", "metrics.listen"),
        ] {
            let e = parse(&format!("[metrics]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn empty_file_gives_production_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.tpm.tcti, "device:/dev/tpmrm0");
        assert_eq!(c.state.dir, PathBuf::from("/var/lib/leasehold"));
        assert!(c.tpm.seal_pcrs.is_empty());
    }

    #[test]
    fn tpm_check_interval_default_and_range() {
        assert_eq!(parse("").unwrap().tpm.check_interval_secs, 30);
        assert_eq!(
            parse("[tpm]\ncheck_interval_secs = 1\n")
                .unwrap()
                .tpm
                .check_interval_secs,
            1
        );
        let e = parse("[tpm]\ncheck_interval_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tpm.check_interval_secs: 0 is outside 1..=86400"),
            "{e}"
        );
    }

    #[test]
    fn storage_section_defaults_and_errors_name_the_key() {
        let c = parse("").unwrap();
        assert_eq!(c.storage.mount, PathBuf::from("/srv/leasehold/tenant"));
        assert_eq!(c.storage.filesystem, "ext4");
        assert!(!c.storage.bypass_workqueues && !c.storage.discards);
        let e = parse("[storage]\nfilesystem = \"btrfs\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("storage.filesystem: \"btrfs\" is not one of"),
            "{e}"
        );
        let e = parse("[storage]\nmount = \"srv\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("storage.mount: srv is not an absolute path"),
            "{e}"
        );
        let e = parse("[storage]\ndevice = \"vdb\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("storage.device: vdb is not a device path"),
            "{e}"
        );
        let e = parse("[storage]\nsize = 1\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `size`"), "{e}");
    }

    #[test]
    fn engines_section_defaults_and_errors_name_the_key() {
        let c = parse("").unwrap();
        assert_eq!(c.engines.cgroup_root, PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(
            c.engines.cgroup_subtree,
            "system.slice/leasehold-engines.service/tenant"
        );
        assert_eq!(c.engines.images_dir, "engines");
        assert_eq!(c.engines.run_dir, PathBuf::from("/run/leasehold/engines"));
        assert_eq!(c.engines.shim, None);
        assert_eq!(c.engines.uid_base, 2_000_000);
        assert_eq!(c.engines.upload_max_bytes, 4 << 30);
        for (text, want) in [
            (
                "cgroup_root = \"sys\"",
                "engines.cgroup_root: sys is not an absolute path",
            ),
            (
                "shim = \"shim\"",
                "engines.shim: shim is not an absolute path",
            ),
            (
                "cgroup_subtree = \"../x\"",
                "engines.cgroup_subtree: \"../x\" is not a relative",
            ),
            (
                "cgroup_subtree = \"system.slice\"",
                "engines.cgroup_subtree: \"system.slice\" is a systemd unit's cgroup (.slice)",
            ),
            (
                "cgroup_subtree = \"system.slice/leasehold-engines.service\"",
                "engines.cgroup_subtree: \"system.slice/leasehold-engines.service\" is a systemd unit's cgroup (.service)",
            ),
            (
                "images_dir = \"/abs\"",
                "engines.images_dir: \"/abs\" is not a relative",
            ),
            ("uid_base = 1000", "engines.uid_base: 1000 is outside"),
            (
                "log_max_bytes = 1000",
                "engines.log_max_bytes: 1000 is outside",
            ),
            (
                "upload_max_bytes = 1000",
                "engines.upload_max_bytes: 1000 is outside",
            ),
            (
                "upload_max_bytes = 9000000000",
                "engines.upload_max_bytes: 9000000000 is outside",
            ),
            ("probe_rate = 0", "engines.probe_rate: 0 is outside 1..=10000"),
            (
                "probe_rate = 10001",
                "engines.probe_rate: 10001 is outside",
            ),
            (
                "probe_concurrency = 0",
                "engines.probe_concurrency: 0 is outside 1..=1024",
            ),
            (
                "probe_concurrency = 5000",
                "engines.probe_concurrency: 5000 is outside",
            ),
            ("probe_rate = -1", "probe_rate"),
        ] {
            let e = parse(&format!("[engines]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn shipped_file_parses_to_the_defaults() {
        let shipped = parse(include_str!("../../dist/agentd.toml")).unwrap();
        assert_eq!(shipped, parse("").unwrap());
    }

    #[test]
    fn dbus_section_default_and_range() {
        assert_eq!(parse("").unwrap().dbus.auth_timeout_ms, 5000);
        assert_eq!(parse("").unwrap().dbus.auth_reuse_ms, 5000);
        assert_eq!(
            parse("[dbus]\nauth_reuse_ms = 0\n")
                .unwrap()
                .dbus
                .auth_reuse_ms,
            0
        );
        let e = parse("[dbus]\nauth_reuse_ms = 10001\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dbus.auth_reuse_ms"), "{e}");
        let c = parse("[dbus]\nauth_timeout_ms = 2500\n").unwrap();
        assert_eq!(c.dbus.auth_timeout_ms, 2500);
        let e = parse("[dbus]\nauth_timeout_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dbus.auth_timeout_ms: 0 is outside"), "{e}");
    }

    #[test]
    fn health_section_defaults_and_errors_name_the_key() {
        let c = parse("").unwrap();
        assert_eq!(c.health.interval_secs, 60);
        let s = c.health.settings();
        assert_eq!(s, leasehold_health::Settings::default());
        let c = parse("[health]\nsmart = false\nnet = false\ndeadline_ms = 500\n").unwrap();
        let s = c.health.settings();
        assert_eq!(s.enabled.len(), 4);
        assert!(!s.enabled.contains(&leasehold_health::Source::Smart));
        assert_eq!(s.deadline, std::time::Duration::from_millis(500));
        assert!(c.health.netlink);
        let c = parse("[health]\nnetlink = false\nleases_dir = \"/tmp/l\"\n").unwrap();
        assert!(!c.health.netlink);
        assert_eq!(c.health.settings().leases_dir, Path::new("/tmp/l"));
        for (text, want) in [
            (
                "deadline_ms = 5",
                "health.deadline_ms: 5 is outside 10..=5000",
            ),
            (
                "smart_timeout_ms = 0",
                "health.smart_timeout_ms: 0 is outside 100..=18000",
            ),
            (
                "interval_secs = 1",
                "health.interval_secs: 1 is outside 2..=3600",
            ),
            (
                "smartctl = \"smartctl\"",
                "health.smartctl: smartctl is not an absolute path",
            ),
            (
                "nvme = \"nvme\"",
                "health.nvme: nvme is not an absolute path",
            ),
            ("nvme_events = 1", "health.nvme_events: invalid type"),
            (
                "sys_root = \"sys\"",
                "health.sys_root: sys is not an absolute path",
            ),
            (
                "leases_dir = \"leases\"",
                "health.leases_dir: leases is not an absolute path",
            ),
            ("edac = \"yes\"", "health.edac: invalid type"),
            ("sensors = []", "unknown field `sensors`"),
        ] {
            let e = parse(&format!("[health]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn health_actions_errors_name_the_rule_and_field() {
        let c = parse("[[health.action]]\nname = \"hot\"\nsource = \"thermal\"\nseverity = \"critical\"\naction = \"reboot\"\n[engines]\nallow_reboot_node = true\n").unwrap();
        assert_eq!(c.health.action.len(), 1);
        assert_eq!(c.health.action[0].cooldown(), 3600);
        assert!(c.engines.allow_reboot_node);
        assert!(parse("").unwrap().health.action.is_empty());
        assert!(!parse("").unwrap().engines.allow_reboot_node);
        let rule = |extra: &str| {
            format!("[[health.action]]\nname = \"r\"\nseverity = \"critical\"\n{extra}\n")
        };
        for (text, want) in [
            (
                rule("action = \"explode\""),
                "health.action[0].action: unknown variant `explode`",
            ),
            (
                rule("action = \"notify\"\nsource = \"cpu\""),
                "health.action[0].source: unknown variant `cpu`",
            ),
            (
                rule("action = \"notify\"\nwhen = 1"),
                "unknown field `when`",
            ),
            (
                rule("action = \"poweroff\"\ncooldown_secs = 5"),
                "health.action: [0] (\"r\").cooldown_secs: 5 is below 600",
            ),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn full_file_parses() {
        let c = parse("[tpm]\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\nseal_pcrs = [7]\n[state]\ndir = \"/tmp/x\"\n").unwrap();
        assert_eq!(c.tpm.seal_pcrs, vec![7]);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("[tpm]\ntctl = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("tctl"), "{e}");
        let e = parse("[tpm]\ntcti = \"usb:foo\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tpm.tcti"), "{e}");
        let e = parse("[tpm]\nseal_pcrs = [30]\n").unwrap_err().to_string();
        assert!(e.contains("tpm.seal_pcrs"), "{e}");
        let e = parse("[tpm]\nseal_pcrs = [300]\n").unwrap_err().to_string();
        assert!(e.contains("seal_pcrs"), "{e}");
        let e = parse("[state]\ndir = \"relative\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("state.dir"), "{e}");
        let e = parse("[tpm\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
