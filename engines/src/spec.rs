//! The engine spec (TOML or JSON): what a tenant asks to run and how it is
//! supervised. Errors name the field (`limits.memory_max`,
//! `probes[1].interval`); every count, size and string length has a cap
//! (`MAX_*`) refused before any costly work. Defaults are the safe choice
//! and are documented on each field; docs/engines.md ("Spec") is the
//! reference with an example.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use leasehold_netpolicy::doc::{shown, unique_keys};
use leasehold_netpolicy::{Boundary, BoundaryDoc};
use serde::{Deserialize, Serialize};

// Caps: a spec over one is refused naming the field (`env: 257 variables,
// at most 256`). The argv and environment caps keep an engine far below
// the kernel's ARG_MAX (2 MiB with the default stack limit).

/// Largest spec (TOML or JSON text), in bytes (the egress sub-boundary is
/// part of it).
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// Most entries in `command` and `args` together, and in a probe's `exec`.
pub const MAX_ARGV: usize = 256;
/// Longest argument (bytes), in `command`, `args` and a probe's `exec`.
pub const MAX_ARG_BYTES: usize = 4096;
/// Most environment variables.
pub const MAX_ENV: usize = 256;
/// Longest environment variable name (bytes).
pub const MAX_ENV_NAME: usize = 128;
/// Longest environment variable value (bytes).
pub const MAX_ENV_VALUE: usize = 8192;
/// Most bytes of argv and environment together (each string counted with
/// its terminating NUL, each variable as `NAME=value`); also of a probe's
/// `exec` argv.
pub const MAX_EXEC_BYTES: usize = 256 << 10;
/// Longest path (`working_dir`, a data dir, an http probe's path), bytes.
pub const MAX_PATH: usize = 1024;
/// Longest path component (bytes), the kernel's `NAME_MAX`.
pub const MAX_COMPONENT: usize = 255;
/// Most probes.
pub const MAX_PROBES: usize = 8;
/// Most data dirs.
pub const MAX_DATA_DIRS: usize = 32;
/// Most secrets an engine may name (the node's secret store keeps at most
/// as many).
pub const MAX_SECRETS: usize = 128;
/// Longest user name (as `useradd`).
pub const MAX_USER_NAME: usize = 32;
/// Highest uid or gid inside the engine (65534 is `nobody`). It assumes
/// the launcher maps 65536 ids (0-65535) into each engine's user
/// namespace and keeps 65535 (-1 in 16-bit id calls) unused; widen it
/// with the launcher if that changes.
pub const MAX_ID: u32 = 65534;
/// Longest duration anywhere in a spec (a day).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Highest `restart.max` (an hour; a longer pause is "give up").
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Highest `restart.factor`.
pub const MAX_FACTOR: f64 = 16.0;
/// Most restarts `restart.give_up.restarts` may allow.
pub const MAX_GIVE_UP_RESTARTS: u32 = 10_000;
/// Shortest probe interval and watchdog interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Highest probe `threshold`.
pub const MAX_THRESHOLD: u32 = 100;
/// Longest `stop_grace` (five minutes).
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(300);
/// Smallest `memory_max` / `memory_high` (1 MiB: below it an engine
/// cannot even exec).
pub const MIN_MEMORY: u64 = 1 << 20;
/// Largest memory size written (1 PiB; cgroup files take u64 bytes).
pub const MAX_MEMORY: u64 = 1 << 50;
/// Highest `pids_max` (the kernel's `pid_max` ceiling, 2^22).
pub const MAX_PIDS: u64 = 1 << 22;
/// Highest `cpus` (1024 CPUs).
pub const MAX_CPUS: f64 = 1024.0;
/// Range of `cpu_weight` and `io_weight` (as cgroup v2 `cpu.weight`,
/// `io.weight`).
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u16> = 1..=10_000;
pub use leasehold_netpolicy::doc::ECHO_LIMIT;
/// Environment variables the agent sets itself (heartbeat socket,
/// watchdog); a spec may not set them.
pub const RESERVED_ENV: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];
/// Where secrets appear inside an engine (`/run/secrets/NAME`, 0400, on a
/// private tmpfs); no data dir may lie there.
pub const SECRETS_DIR: &str = "/run/secrets";

/// Why a spec was refused; `field` is a path like `probes[1].interval`
/// (`document` for the text as a whole), with the line and column for
/// errors in the text. The same type as a boundary document's error: the
/// scaffolding (size cap, field paths, locations) is
/// [`leasehold_netpolicy::doc`]'s.
pub type SpecError = leasehold_netpolicy::doc::DocError;

pub use leasehold_netpolicy::doc::MAX_FIELD;

fn err(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::new(field, reason)
}

// ---------------------------------------------------------------------------
// Value types: durations, sizes, cpu.max. Each parses from text with a
// reason naming the accepted forms; serde puts the field path around it.

/// A duration written as a whole number and a unit: `"500ms"`, `"10s"`,
/// `"5m"`, `"1h"` (no fractions, no spaces, at most [`MAX_DURATION`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

/// Parses a [`Dur`]'s text.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const FORMS: &str =
        "write a whole number and a unit (ms, s, m or h), e.g. \"500ms\", \"10s\", \"5m\"";
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!("{}: {FORMS}", shown(s)));
    }
    let ms_per: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("{}: a duration needs a unit; {FORMS}", shown(s))),
        u if u.starts_with('.') => {
            return Err(format!(
                "{}: no fractions; use a smaller unit (\"1500ms\", not \"1.5s\")",
                shown(s)
            ))
        }
        _ => return Err(format!("{}: {FORMS}", shown(s))),
    };
    let too_long = || format!("{}: longer than {}", shown(s), Dur(MAX_DURATION));
    let n: u64 = num.parse().map_err(|_| too_long())?;
    let ms = n.checked_mul(ms_per).ok_or_else(too_long)?;
    let d = Duration::from_millis(ms);
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

impl fmt::Display for Dur {
    /// In the largest unit that is exact: `90s`, `2m`, `1500ms`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 => write!(f, "0ms"),
            _ if ms.is_multiple_of(3_600_000) => write!(f, "{}h", ms / 3_600_000),
            _ if ms.is_multiple_of(60_000) => write!(f, "{}m", ms / 60_000),
            _ if ms.is_multiple_of(1000) => write!(f, "{}s", ms / 1000),
            _ => write!(f, "{ms}ms"),
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration as text, e.g. \"500ms\", \"10s\", \"5m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A size in bytes: an integer, or text with an optional unit K, M, G or T
/// (powers of 1024, as systemd's `MemoryMax=`): `268435456`, `"256M"`,
/// `"1G"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

/// Parses a [`Size`]'s text.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const FORMS: &str =
        "write bytes, or a whole number with K, M, G or T (powers of 1024), e.g. \"256M\"";
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{}: {FORMS}", shown(s))),
    };
    if num.is_empty() {
        return Err(format!("{}: {FORMS}", shown(s)));
    }
    let too_big = || format!("{}: more than {}", shown(s), Size(MAX_MEMORY));
    let n: u64 = num.parse().map_err(|_| too_big())?;
    let v = n.checked_mul(1u64 << shift).ok_or_else(too_big)?;
    if v > MAX_MEMORY {
        return Err(too_big());
    }
    Ok(v)
}

impl fmt::Display for Size {
    /// In the largest unit that is exact: `256M`, `1536K`, `1000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if v != 0 && v.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", v >> shift);
            }
        }
        write!(f, "{v}")
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: bytes, or text like \"256M\" or \"1G\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                if v > MAX_MEMORY {
                    return Err(E::custom(format!("{v}: more than {}", Size(MAX_MEMORY))));
                }
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v}: a size cannot be negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A CPU bandwidth limit as cgroup v2 `cpu.max`: at most `quota_us` of CPU
/// time per `period_us` (both microseconds). Written `"50000 100000"` or
/// `"50000"` (period 100000, the kernel's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuMax {
    /// Microseconds of CPU time per period, at least 1000.
    pub quota_us: u64,
    /// Period in microseconds, 1000 to 1000000 (the kernel's range).
    pub period_us: u64,
}

impl CpuMax {
    /// The kernel's default period.
    pub const DEFAULT_PERIOD_US: u64 = 100_000;

    /// From a number of CPUs (`0.5` is half a CPU: `50000 100000`).
    pub fn from_cpus(cpus: f64) -> Result<CpuMax, String> {
        if !cpus.is_finite() || !(0.01..=MAX_CPUS).contains(&cpus) {
            return Err(format!("{cpus}: between 0.01 and {MAX_CPUS} CPUs"));
        }
        // In range by the check above: 1000 ..= 102_400_000, no truncation.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let quota_us = (cpus * 100_000.0).round() as u64;
        Ok(CpuMax {
            quota_us,
            period_us: Self::DEFAULT_PERIOD_US,
        })
    }

    /// Whether `self` allows more CPU time per second than `other`
    /// (compared exactly, not in floating point).
    pub fn exceeds(&self, other: &CpuMax) -> bool {
        u128::from(self.quota_us) * u128::from(other.period_us)
            > u128::from(other.quota_us) * u128::from(self.period_us)
    }

    /// The number of CPUs it allows, for messages.
    pub fn cpus(&self) -> f64 {
        // Exact for the ranges allowed (below 2^53).
        let q = u32::try_from(self.quota_us).map_or(f64::MAX, f64::from);
        let p = u32::try_from(self.period_us).map_or(f64::MAX, f64::from);
        q / p
    }
}

/// Parses a [`CpuMax`]'s text.
pub fn parse_cpu_max(s: &str) -> Result<CpuMax, String> {
    const FORMS: &str = "write \"QUOTA PERIOD\" in microseconds as cgroup cpu.max, e.g. \"50000 100000\" (half a CPU)";
    if s.trim() == "max" {
        return Err(format!(
            "{}: omit the key for no engine limit (the budget applies)",
            shown(s)
        ));
    }
    let mut parts = s.split(' ');
    let num = |p: Option<&str>| -> Result<Option<u64>, String> {
        match p {
            None => Ok(None),
            Some(t) => t
                .parse::<u64>()
                .map(Some)
                .map_err(|_| format!("{}: {FORMS}", shown(s))),
        }
    };
    let quota_us = num(parts.next())?.ok_or_else(|| format!("{}: {FORMS}", shown(s)))?;
    let period_us = num(parts.next())?.unwrap_or(CpuMax::DEFAULT_PERIOD_US);
    if parts.next().is_some() {
        return Err(format!("{}: {FORMS}", shown(s)));
    }
    if !(1000..=1_000_000).contains(&period_us) {
        return Err(format!(
            "{}: the period must be 1000-1000000 µs (the kernel's range)",
            shown(s)
        ));
    }
    if quota_us < 1000 {
        return Err(format!(
            "{}: the quota must be at least 1000 µs (the kernel's minimum)",
            shown(s)
        ));
    }
    let m = CpuMax {
        quota_us,
        period_us,
    };
    if m.cpus() > MAX_CPUS {
        return Err(format!("{}: more than {MAX_CPUS} CPUs", shown(s)));
    }
    Ok(m)
}

impl fmt::Display for CpuMax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.quota_us, self.period_us)
    }
}

impl Serialize for CpuMax {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuMax {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CpuMax;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("cpu.max as text, e.g. \"50000 100000\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CpuMax, E> {
                parse_cpu_max(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// The user an engine runs as inside its image: a name from the image's
/// `/etc/passwd`, or `uid` or `uid:gid`. Never root: engines run
/// unprivileged, so uid 0, gid 0 and the name `root` are refused here and a
/// name that resolves to uid 0 is refused by the launcher.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum User {
    /// A user name (`[a-z_][a-z0-9_-]*`, at most [`MAX_USER_NAME`]).
    Name(String),
    /// A numeric uid and optional gid (absent: the uid's primary group in
    /// the image, else the same number), 1 to [`MAX_ID`].
    Id {
        /// User id.
        uid: u32,
        /// Group id.
        gid: Option<u32>,
    },
}

/// Parses a [`User`]'s text.
pub fn parse_user(s: &str) -> Result<User, String> {
    let id = |t: &str, what: &str| -> Result<u32, String> {
        let n: u32 = t
            .parse()
            .map_err(|_| format!("{}: {what} is not a number", shown(s)))?;
        if n == 0 {
            return Err(format!(
                "{}: {what} 0 is root; engines run unprivileged",
                shown(s)
            ));
        }
        if n > MAX_ID {
            return Err(format!("{}: {what} above {MAX_ID}", shown(s)));
        }
        Ok(n)
    };
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        let (u, g) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        return Ok(User::Id {
            uid: id(u, "uid")?,
            gid: g.map(|g| id(g, "gid")).transpose()?,
        });
    }
    let ok = !s.is_empty()
        && s.len() <= MAX_USER_NAME
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
    if !ok {
        return Err(format!(
            "{}: a user name ([a-z_][a-z0-9_-]*, at most {MAX_USER_NAME}), a uid or uid:gid",
            shown(s)
        ));
    }
    if s == "root" {
        return Err("\"root\": engines run unprivileged".into());
    }
    Ok(User::Name(s.to_owned()))
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            User::Name(n) => f.write_str(n),
            User::Id { uid, gid: None } => write!(f, "{uid}"),
            User::Id {
                uid,
                gid: Some(gid),
            } => write!(f, "{uid}:{gid}"),
        }
    }
}

impl Serialize for User {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for User {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = User;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a user name, uid or uid:gid as text")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<User, E> {
                parse_user(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

// ---------------------------------------------------------------------------
// The document.

/// An engine spec. Only `command` is required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The program and its first arguments (argv): an absolute path or a
    /// name looked up in the image's `PATH`. Required, 1 to [`MAX_ARGV`]
    /// entries with `args`, each at most [`MAX_ARG_BYTES`], no NUL.
    pub command: Vec<String>,
    /// More arguments, appended to `command` (default none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables (default none; the image's own `Env` comes
    /// first and these override it). Names: `[A-Za-z_][A-Za-z0-9_.-]*`, at
    /// most [`MAX_ENV_NAME`] bytes, not one of [`RESERVED_ENV`]; values at
    /// most [`MAX_ENV_VALUE`] bytes, no NUL. A name given twice is refused.
    /// Secrets do not belong here (see `secrets`); values are never echoed
    /// in errors.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_keys"
    )]
    pub env: BTreeMap<String, String>,
    /// Working directory: absolute and normalised (no `.`, `..`, `//` or
    /// trailing `/`). Default: the image's `WorkingDir`, else `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// The user inside the image (see [`User`]). Default: the image's
    /// `User`, else 65534:65534 (nobody); never root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    /// cgroup v2 limits (default: none of its own; the tenant budget
    /// applies).
    #[serde(default)]
    pub limits: Limits,
    /// What to do when the engine exits.
    #[serde(default)]
    pub restart: Restart,
    /// Health probes (default none), at most [`MAX_PROBES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
    /// The `sd_notify` socket (default off).
    #[serde(default)]
    pub heartbeat: Heartbeat,
    /// Read-write directories kept on the tenant volume, as paths relative
    /// to the image root (`"var/lib/app"` is mounted at `/var/lib/app`).
    /// Default none: the whole root is read-only. At most
    /// [`MAX_DATA_DIRS`], components of `A-Z a-z 0-9 . _ -` (not `.` or
    /// `..`), none inside another, none under `proc`, `sys`, `dev`,
    /// `run/secrets` or `run/leasehold-notify`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_dirs: Vec<String>,
    /// Secrets from the node's store, by name (the store's rule:
    /// `leasehold_envelope::NAME_RULE`), each a 0400 file
    /// `/run/secrets/NAME` on a private tmpfs. Default none; at most
    /// [`MAX_SECRETS`], no duplicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// The engine's egress sub-boundary: a boundary document (as the
    /// tenant's sub-boundary, no `failsafe` or `routers`) that must lie
    /// inside the tenant's sub-boundary ([`Spec::egress_excess`]). Default
    /// absent: the tenant's sub-boundary applies unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<BoundaryDoc>,
    /// What to do when a probe reaches its threshold or the watchdog
    /// expires (and, for `notify` and `reboot-node`, when restarts give
    /// up). Default `["restart"]`. See [`FailureAction`].
    #[serde(default = "default_on_failure")]
    pub on_failure: Vec<FailureAction>,
    /// How long `stop` waits after SIGTERM before SIGKILL. Default `"10s"`,
    /// at most [`MAX_STOP_GRACE`].
    #[serde(default = "default_stop_grace")]
    pub stop_grace: Dur,
}

fn default_on_failure() -> Vec<FailureAction> {
    vec![FailureAction::Restart]
}

fn default_stop_grace() -> Dur {
    Dur(Duration::from_secs(10))
}

/// cgroup v2 limits of one engine. Every one is optional: absent, the
/// engine inherits the tenant budget (its cgroup file says `max` and the
/// tenant subtree's limit binds). A limit may only narrow the budget
/// ([`crate::budget::check`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPUs as a number (`0.5`: half a CPU; 0.01 to [`MAX_CPUS`]); the same
    /// as `cpu_max` with the default period. Give one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// `cpu.max` as the kernel writes it: `"50000 100000"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<CpuMax>,
    /// `cpu.weight` among the tenant's engines, 1-10000 (kernel default
    /// 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u16>,
    /// `memory.max`: above it the engine is OOM-killed. [`MIN_MEMORY`] to
    /// [`MAX_MEMORY`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<Size>,
    /// `memory.high`: above it the engine is throttled and reclaimed; at
    /// most `memory_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_high: Option<Size>,
    /// `pids.max`: processes and threads, 1 to [`MAX_PIDS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// `io.weight` among the tenant's engines, 1-10000 (kernel default
    /// 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u16>,
}

impl Limits {
    /// The CPU bandwidth limit from `cpus` or `cpu_max` (validated specs
    /// have at most one).
    pub fn cpu(&self) -> Option<CpuMax> {
        self.cpu_max
            .or_else(|| self.cpus.and_then(|c| CpuMax::from_cpus(c).ok()))
    }
}

/// When an exited engine is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never: an exit is final.
    Never,
    /// After an exit with a non-zero code or a signal (OOM kill included),
    /// not after a clean exit 0.
    #[default]
    OnFailure,
    /// After every exit, clean or not (not after `stop`).
    Always,
}

/// Restart policy and backoff (see [`crate::backoff`]): the n-th restart
/// since the last reset waits `min(initial × factorⁿ, max)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    /// When to restart (default `on-failure`).
    #[serde(default)]
    pub policy: RestartPolicy,
    /// Delay before the first restart after an exit. Default `"100ms"`;
    /// 1ms to `max`.
    #[serde(default = "default_initial")]
    pub initial: Dur,
    /// Longest delay. Default `"30s"`; at most [`MAX_BACKOFF`].
    #[serde(default = "default_max")]
    pub max: Dur,
    /// Growth of the delay per restart. Default 2 (doubling); 1 (constant)
    /// to [`MAX_FACTOR`].
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// A run at least this long resets the delay to `initial`. Default
    /// `"60s"`; 1s to [`MAX_DURATION`].
    #[serde(default = "default_reset_after")]
    pub reset_after: Dur,
    /// Stop restarting after too many restarts in a window. Default absent:
    /// keep restarting at most every `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub give_up: Option<GiveUp>,
}

fn default_initial() -> Dur {
    Dur(Duration::from_millis(100))
}
fn default_max() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_factor() -> f64 {
    2.0
}
fn default_reset_after() -> Dur {
    Dur(Duration::from_secs(60))
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            policy: RestartPolicy::default(),
            initial: default_initial(),
            max: default_max(),
            factor: default_factor(),
            reset_after: default_reset_after(),
            give_up: None,
        }
    }
}

/// "Give up after `restarts` restarts within `within`": the exit that would
/// be one restart too many in the window is final (event `gave up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GiveUp {
    /// Restarts allowed in the window, 1 to [`MAX_GIVE_UP_RESTARTS`].
    pub restarts: u32,
    /// The window, 1s to [`MAX_DURATION`].
    pub within: Dur,
}

/// A health probe: exactly one of `exec`, `tcp`, `http`. `threshold`
/// failures in a row (each a non-zero exit, refused connection, non-2xx/3xx
/// status or `timeout`) make the engine failed (`on_failure`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// A command run inside the engine (argv, as `command`); exit 0 is
    /// healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Vec<String>>,
    /// A TCP port on the engine's loopback that must accept a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<u16>,
    /// An HTTP GET on the engine's loopback that must answer 2xx or 3xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    /// Time between probes. Default `"10s"`; [`MIN_INTERVAL`] to
    /// [`MAX_DURATION`].
    #[serde(default = "default_interval")]
    pub interval: Dur,
    /// Time a probe may take. Default `"1s"`; more than 0, less than
    /// `interval`.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Failures in a row that make the engine failed. Default 3; 1 to
    /// [`MAX_THRESHOLD`].
    #[serde(default = "default_threshold")]
    pub threshold: u32,
}

fn default_interval() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_threshold() -> u32 {
    3
}

/// `http = { port = 8080, path = "/healthz" }`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// Port, 1-65535.
    pub port: u16,
    /// Path: starts with `/`, visible ASCII (no spaces), at most
    /// [`MAX_PATH`] bytes. Default `/`.
    #[serde(default = "default_http_path")]
    pub path: String,
}

fn default_http_path() -> String {
    "/".into()
}

/// The `sd_notify`-compatible socket the agent provides (`NOTIFY_SOCKET`):
/// `READY=1` marks the engine started, `WATCHDOG=1` feeds the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Provide the socket and wait for `READY=1` before calling the engine
    /// running (default false: running once exec'd).
    #[serde(default)]
    pub enabled: bool,
    /// Expect `WATCHDOG=1` at least this often (`WATCHDOG_USEC` is set);
    /// a miss makes the engine failed. Default absent (no watchdog);
    /// [`MIN_INTERVAL`] to [`MAX_DURATION`]; needs `enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<Dur>,
    /// With `enabled`: how long after exec the engine has to send
    /// `READY=1`; past it the engine is killed and the attempt counts as a
    /// failed exit for the restart policy. Default `"90s"` (systemd's
    /// `TimeoutStartSec=`); 1s to [`MAX_DURATION`].
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout: Dur,
}

fn default_ready_timeout() -> Dur {
    Dur(Duration::from_secs(90))
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            enabled: false,
            watchdog: None,
            ready_timeout: default_ready_timeout(),
        }
    }
}

/// An action when the engine fails. They run in a fixed order whatever the
/// order written: `notify` first, then one of `reboot-node` (if the
/// landlord's policy allows this tenant, checked when it happens), `reload`,
/// `restart`, the first that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureAction {
    /// An event `failed` on the tenant's event stream and the agent's log.
    Notify,
    /// Restart through the backoff schedule.
    Restart,
    /// Start again from a fresh root filesystem unpacked from the engine's
    /// image (data dirs kept).
    Reload,
    /// Restart the node. Accepted in any spec; whether it happens is the
    /// landlord's policy at the time ([`Spec::requests_node_reboot`]); when
    /// refused the event says so and the other actions run.
    RebootNode,
}

fn over(field: impl Into<String>, n: usize, what: &str, max: usize) -> Result<(), SpecError> {
    if n > max {
        Err(err(field, format!("{n} {what}, at most {max}")))
    } else {
        Ok(())
    }
}

fn dur_range(field: &str, d: Dur, lo: Duration, hi: Duration) -> Result<(), SpecError> {
    if d.0 < lo || d.0 > hi {
        return Err(err(
            field,
            format!("{d}: between {} and {}", Dur(lo), Dur(hi)),
        ));
    }
    Ok(())
}

pub(crate) use leasehold_netpolicy::doc::{from_json as parse_json, from_toml as parse_toml};

impl Spec {
    /// Parses and validates a TOML spec; errors name the field.
    pub fn from_toml(text: &str) -> Result<Spec, SpecError> {
        let spec: Spec = parse_toml(text, MAX_SPEC_BYTES)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses and validates a JSON spec (one object, nothing after it but
    /// white space); errors name the field.
    pub fn from_json(text: &str) -> Result<Spec, SpecError> {
        let spec: Spec = parse_json(text, MAX_SPEC_BYTES)?;
        spec.validate()?;
        Ok(spec)
    }

    /// [`Spec::from_json`] for a spec the agent accepted earlier and
    /// stored: a rule added since for new specs (a data dir `run`, above
    /// the launcher's mount points) does not make the agent's state
    /// unreadable; the shim refuses to start such an engine (fail closed,
    /// said in its status) until the tenant reloads it with a new spec.
    pub fn from_stored_json(text: &str) -> Result<Spec, SpecError> {
        let spec: Spec = parse_json(text, MAX_SPEC_BYTES)?;
        spec.validate_as(true)?;
        Ok(spec)
    }

    /// The full argv: `command` then `args`.
    pub fn argv(&self) -> impl Iterator<Item = &str> {
        self.command.iter().chain(&self.args).map(String::as_str)
    }

    /// Whether `on_failure` asks for a node reboot (which the node
    /// controller grants only if the landlord's policy lets this tenant).
    pub fn requests_node_reboot(&self) -> bool {
        self.on_failure.contains(&FailureAction::RebootNode)
    }

    /// What to do when the engine fails, in order: `notify` first, then
    /// the first that applies of `reboot-node` (only if
    /// `reboot_allowed`: the landlord's policy for this tenant, read when
    /// it happens), `reload`, `restart`. When restarts gave up
    /// (`gave_up`), `reload` and `restart` do not apply.
    pub fn failure_plan(&self, reboot_allowed: bool, gave_up: bool) -> Vec<FailureAction> {
        let has = |a| self.on_failure.contains(&a);
        let mut plan = Vec::new();
        if has(FailureAction::Notify) {
            plan.push(FailureAction::Notify);
        }
        if has(FailureAction::RebootNode) && reboot_allowed {
            plan.push(FailureAction::RebootNode);
        } else if !gave_up {
            if has(FailureAction::Reload) {
                plan.push(FailureAction::Reload);
            } else if has(FailureAction::Restart) {
                plan.push(FailureAction::Restart);
            }
        }
        plan
    }

    /// The egress sub-boundary, validated (`None`: absent).
    pub fn egress_boundary(&self) -> Result<Option<Boundary>, SpecError> {
        self.egress
            .as_ref()
            .map(|doc| {
                doc.validate(false).map_err(|e| {
                    let field = if e.field == "document" {
                        "egress".to_owned()
                    } else {
                        format!("egress.{}", e.field)
                    };
                    err(field, e.reason)
                })
            })
            .transpose()
    }

    /// What the egress sub-boundary allows beyond the tenant's
    /// sub-boundary (empty: it only narrows, or is absent). The node
    /// controller refuses a deploy with a non-empty answer.
    pub fn egress_excess(
        &self,
        tenant: &Boundary,
    ) -> Result<Vec<leasehold_netpolicy::Excess>, SpecError> {
        Ok(self
            .egress_boundary()?
            .map(|b| leasehold_netpolicy::excess(&b, tenant))
            .unwrap_or_default())
    }

    /// Checks every rule the types do not: caps (counts first), names,
    /// paths, ranges and the rules between fields.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_as(false)
    }

    fn validate_as(&self, stored: bool) -> Result<(), SpecError> {
        self.check_caps()?;
        self.check_exec()?;
        if let Some(w) = &self.working_dir {
            check_abs_path("working_dir", w)?;
        }
        self.check_limits()?;
        self.check_restart()?;
        for (i, p) in self.probes.iter().enumerate() {
            check_probe(&format!("probes[{i}]"), p)?;
        }
        if let Some(w) = self.heartbeat.watchdog {
            if !self.heartbeat.enabled {
                return Err(err(
                    "heartbeat.watchdog",
                    "needs heartbeat.enabled = true (the watchdog is fed through the socket)",
                ));
            }
            dur_range("heartbeat.watchdog", w, MIN_INTERVAL, MAX_DURATION)?;
        }
        dur_range(
            "heartbeat.ready_timeout",
            self.heartbeat.ready_timeout,
            Duration::from_secs(1),
            MAX_DURATION,
        )?;
        self.check_data_dirs(stored)?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.secrets.iter().enumerate() {
            let field = format!("secrets[{i}]");
            if !leasehold_envelope::valid_name(s) {
                return Err(err(
                    field,
                    format!("{}: {}", shown(s), leasehold_envelope::NAME_RULE),
                ));
            }
            if !seen.insert(s) {
                return Err(err(field, format!("{} is named twice", shown(s))));
            }
        }
        self.egress_boundary()?;
        if self.on_failure.is_empty() {
            return Err(err(
                "on_failure",
                "empty list; omit the key for the default [\"restart\"], or use [\"notify\"]",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, a) in self.on_failure.iter().enumerate() {
            if !seen.insert(a) {
                return Err(err(format!("on_failure[{i}]"), "given twice"));
            }
        }
        dur_range(
            "stop_grace",
            self.stop_grace,
            Duration::ZERO,
            MAX_STOP_GRACE,
        )
    }

    /// Counts, before anything is looked at one by one.
    fn check_caps(&self) -> Result<(), SpecError> {
        over(
            "args",
            self.command.len().saturating_add(self.args.len()),
            "arguments with command",
            MAX_ARGV,
        )?;
        over("env", self.env.len(), "variables", MAX_ENV)?;
        over("probes", self.probes.len(), "probes", MAX_PROBES)?;
        for (i, p) in self.probes.iter().enumerate() {
            if let Some(argv) = &p.exec {
                over(
                    format!("probes[{i}].exec"),
                    argv.len(),
                    "arguments",
                    MAX_ARGV,
                )?;
            }
        }
        over("data_dirs", self.data_dirs.len(), "dirs", MAX_DATA_DIRS)?;
        over("secrets", self.secrets.len(), "secrets", MAX_SECRETS)?;
        // One of each action at most; duplicates are refused by name below.
        over("on_failure", self.on_failure.len(), "actions", 4)
    }

    fn check_exec(&self) -> Result<(), SpecError> {
        if self.command.is_empty() {
            return Err(err(
                "command",
                "empty; give the program and its arguments, e.g. [\"/usr/bin/app\", \"--serve\"]",
            ));
        }
        check_program("command[0]", &self.command[0])?;
        let mut total = 0usize;
        for (field, list) in [("command", &self.command), ("args", &self.args)] {
            for (i, a) in list.iter().enumerate() {
                check_arg(&format!("{field}[{i}]"), a)?;
                total = total.saturating_add(a.len() + 1);
            }
        }
        for (name, value) in &self.env {
            let field = format!("env.{name}");
            check_env_name(&field, name)?;
            if value.len() > MAX_ENV_VALUE {
                return Err(err(
                    field,
                    format!("a value of {} bytes, at most {MAX_ENV_VALUE}", value.len()),
                ));
            }
            if value.contains('\0') {
                return Err(err(field, "the value contains a NUL byte"));
            }
            total = total.saturating_add(name.len() + value.len() + 2);
        }
        if total > MAX_EXEC_BYTES {
            return Err(err(
                "document",
                format!("command, args and env make {total} bytes, at most {MAX_EXEC_BYTES}"),
            ));
        }
        Ok(())
    }

    fn check_limits(&self) -> Result<(), SpecError> {
        let l = &self.limits;
        if l.cpus.is_some() && l.cpu_max.is_some() {
            return Err(err(
                "limits.cpus",
                "give cpus or cpu_max, not both (they set the same cpu.max)",
            ));
        }
        if let Some(c) = l.cpus {
            CpuMax::from_cpus(c).map_err(|r| err("limits.cpus", r))?;
        }
        for (field, w) in [
            ("limits.cpu_weight", l.cpu_weight),
            ("limits.io_weight", l.io_weight),
        ] {
            if let Some(w) = w {
                if !WEIGHT_RANGE.contains(&w) {
                    return Err(err(field, format!("{w}: between 1 and 10000")));
                }
            }
        }
        for (field, m) in [
            ("limits.memory_max", l.memory_max),
            ("limits.memory_high", l.memory_high),
        ] {
            if let Some(m) = m {
                if m.0 < MIN_MEMORY {
                    return Err(err(
                        field,
                        format!(
                            "{m}: at least {} (an engine needs room to exec)",
                            Size(MIN_MEMORY)
                        ),
                    ));
                }
            }
        }
        if let (Some(high), Some(max)) = (l.memory_high, l.memory_max) {
            if high > max {
                return Err(err(
                    "limits.memory_high",
                    format!("{high} is above memory_max {max}; it would never apply"),
                ));
            }
        }
        if let Some(p) = l.pids_max {
            if !(1..=MAX_PIDS).contains(&p) {
                return Err(err(
                    "limits.pids_max",
                    format!("{p}: between 1 and {MAX_PIDS}"),
                ));
            }
        }
        Ok(())
    }

    fn check_restart(&self) -> Result<(), SpecError> {
        let r = &self.restart;
        dur_range("restart.max", r.max, Duration::from_millis(1), MAX_BACKOFF)?;
        if r.initial.0.is_zero() || r.initial > r.max {
            return Err(err(
                "restart.initial",
                format!("{}: between 1ms and restart.max ({})", r.initial, r.max),
            ));
        }
        if !(r.factor.is_finite() && (1.0..=MAX_FACTOR).contains(&r.factor)) {
            return Err(err(
                "restart.factor",
                format!("{}: between 1 and {MAX_FACTOR}", r.factor),
            ));
        }
        dur_range(
            "restart.reset_after",
            r.reset_after,
            Duration::from_secs(1),
            MAX_DURATION,
        )?;
        if let Some(g) = r.give_up {
            if !(1..=MAX_GIVE_UP_RESTARTS).contains(&g.restarts) {
                return Err(err(
                    "restart.give_up.restarts",
                    format!("{}: between 1 and {MAX_GIVE_UP_RESTARTS}", g.restarts),
                ));
            }
            dur_range(
                "restart.give_up.within",
                g.within,
                Duration::from_secs(1),
                MAX_DURATION,
            )?;
        }
        Ok(())
    }

    fn check_data_dirs(&self, stored: bool) -> Result<(), SpecError> {
        for (i, d) in self.data_dirs.iter().enumerate() {
            let field = format!("data_dirs[{i}]");
            check_rel_path(&field, d)?;
            let first = d.split('/').next().unwrap_or_default();
            // Nor above the launcher's mount points: their directories
            // would be made inside a directory the engine writes (`run`),
            // where a running version could swap them for links.
            let launcher = [&SECRETS_DIR[1..], &crate::launch::NOTIFY_DIR[1..]];
            if ["proc", "sys", "dev"].contains(&first)
                || launcher
                    .iter()
                    .any(|m| is_under(d, m) || (!stored && is_under(m, d)))
            {
                return Err(err(
                    field,
                    format!(
                        "{}: not under proc, sys, dev, run/secrets or run/leasehold-notify, and not run itself (the launcher mounts those)",
                        shown(d)
                    ),
                ));
            }
            for (j, e) in self.data_dirs[..i].iter().enumerate() {
                if e == d {
                    return Err(err(field, format!("{} is also data_dirs[{j}]", shown(d))));
                }
                if is_under(d, e) || is_under(e, d) {
                    return Err(err(
                        field,
                        format!("{} and data_dirs[{j}] {} nest", shown(d), shown(e)),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether `path` is `dir` or below it (both relative, normalised).
fn is_under(path: &str, dir: &str) -> bool {
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn check_arg(field: &str, a: &str) -> Result<(), SpecError> {
    if a.len() > MAX_ARG_BYTES {
        return Err(err(
            field,
            format!("{} bytes, at most {MAX_ARG_BYTES}", a.len()),
        ));
    }
    if a.contains('\0') {
        return Err(err(field, format!("{} contains a NUL byte", shown(a))));
    }
    Ok(())
}

fn check_program(field: &str, p: &str) -> Result<(), SpecError> {
    check_arg(field, p)?;
    if p.is_empty() {
        return Err(err(field, "empty program name"));
    }
    if p.contains('/') {
        check_abs_path(field, p).map_err(|e| {
            err(
                e.field,
                format!(
                    "{} (a program is an absolute path or a name looked up in PATH)",
                    e.reason
                ),
            )
        })?;
    }
    Ok(())
}

fn check_env_name(field: &str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ENV_NAME
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !ok {
        return Err(err(
            field,
            format!(
                "{}: a name is 1-{MAX_ENV_NAME} characters of A-Z a-z 0-9 _ . - starting with a letter or _ (no = or NUL)",
                shown(name)
            ),
        ));
    }
    if RESERVED_ENV.contains(&name) {
        return Err(err(
            field,
            format!("{name} is set by the agent (heartbeat)"),
        ));
    }
    Ok(())
}

/// An absolute, normalised path: `/`, or `/a/b` without `.`, `..`, empty
/// components or a trailing `/`.
fn check_abs_path(field: &str, p: &str) -> Result<(), SpecError> {
    if p.len() > MAX_PATH {
        return Err(err(field, format!("{} bytes, at most {MAX_PATH}", p.len())));
    }
    let Some(rest) = p.strip_prefix('/') else {
        return Err(err(
            field,
            format!("{}: an absolute path is needed", shown(p)),
        ));
    };
    if rest.is_empty() {
        return Ok(());
    }
    check_components(field, p, rest)
}

/// A relative, normalised path of plain components (`a`, `a/b`).
fn check_rel_path(field: &str, p: &str) -> Result<(), SpecError> {
    if p.len() > MAX_PATH {
        return Err(err(field, format!("{} bytes, at most {MAX_PATH}", p.len())));
    }
    if p.is_empty() {
        return Err(err(field, "empty; give a path like \"var/lib/app\""));
    }
    if p.starts_with('/') {
        return Err(err(
            field,
            format!(
                "{}: a path relative to the image root (\"var/lib/app\", not \"/var/lib/app\")",
                shown(p)
            ),
        ));
    }
    check_components(field, p, p)?;
    for c in p.split('/') {
        if !c
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(err(
                field,
                format!("{}: components of A-Z a-z 0-9 . _ - only", shown(p)),
            ));
        }
    }
    Ok(())
}

fn check_components(field: &str, whole: &str, rest: &str) -> Result<(), SpecError> {
    if whole.contains('\0') {
        return Err(err(field, format!("{} contains a NUL byte", shown(whole))));
    }
    for c in rest.split('/') {
        let why = match c {
            "" => "an empty component (\"//\" or a trailing \"/\")",
            "." => "a \".\" component",
            ".." => "a \"..\" component",
            c if c.len() > MAX_COMPONENT => "a component over 255 bytes (the kernel's NAME_MAX)",
            _ => continue,
        };
        return Err(err(
            field,
            format!("{}: {why}; write the path normalised", shown(whole)),
        ));
    }
    Ok(())
}

fn check_probe(at: &str, p: &Probe) -> Result<(), SpecError> {
    let kinds = usize::from(p.exec.is_some())
        + usize::from(p.tcp.is_some())
        + usize::from(p.http.is_some());
    if kinds != 1 {
        return Err(err(
            at,
            format!("give exactly one of exec, tcp, http ({kinds} given)"),
        ));
    }
    if let Some(argv) = &p.exec {
        let field = format!("{at}.exec");
        if argv.is_empty() {
            return Err(err(field, "empty; give the program and its arguments"));
        }
        check_program(&format!("{field}[0]"), &argv[0])?;
        let mut total = 0usize;
        for (i, a) in argv.iter().enumerate() {
            check_arg(&format!("{field}[{i}]"), a)?;
            total = total.saturating_add(a.len() + 1);
        }
        if total > MAX_EXEC_BYTES {
            return Err(err(
                field,
                format!("{total} bytes of arguments, at most {MAX_EXEC_BYTES}"),
            ));
        }
    }
    if p.tcp == Some(0) {
        return Err(err(format!("{at}.tcp"), "port 0; give 1-65535"));
    }
    if let Some(h) = &p.http {
        if h.port == 0 {
            return Err(err(format!("{at}.http.port"), "port 0; give 1-65535"));
        }
        let field = format!("{at}.http.path");
        if h.path.len() > MAX_PATH {
            return Err(err(
                field,
                format!("{} bytes, at most {MAX_PATH}", h.path.len()),
            ));
        }
        if !h.path.starts_with('/') || !h.path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(err(
                field,
                format!(
                    "{}: starts with / and has no spaces or control characters",
                    shown(&h.path)
                ),
            ));
        }
    }
    dur_range(
        &format!("{at}.interval"),
        p.interval,
        MIN_INTERVAL,
        MAX_DURATION,
    )?;
    if p.timeout.0.is_zero() || p.timeout >= p.interval {
        return Err(err(
            format!("{at}.timeout"),
            format!(
                "{}: more than 0 and less than the interval ({})",
                p.timeout, p.interval
            ),
        ));
    }
    if !(1..=MAX_THRESHOLD).contains(&p.threshold) {
        return Err(err(
            format!("{at}.threshold"),
            format!("{}: between 1 and {MAX_THRESHOLD}", p.threshold),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
