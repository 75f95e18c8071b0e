//! Prometheus metrics for the landlord (docs/health.md, "Metrics").
//!
//! Aggregates only: counts, generations, states. No engine name, secret
//! name, peer, path or message is ever a label value or a value: the
//! snapshot below holds numbers and fixed words, and the sensors' names
//! as the kernel gives them (bounded: [`sensors`]), so nothing else can be
//! encoded. The node's state is read when a scrape arrives (the health
//! report with its own deadlines); D-Bus calls are counted as they end, in
//! the shared dispatch path (`auth::Bounded`).
//!
//! The endpoint answers `GET /metrics` (HTTP/1.1, one request per
//! connection) on a unix socket for local readers (mode 0660, group
//! `leasehold-landlord`, and the peer's uid checked again on accept)
//! and, if configured, on a TCP address where each request must carry a
//! bearer token (a port is open to every local user, the tenant's too).
//! Requests are parsed with `httparse`; the rest is a few writes, so no
//! HTTP server crate.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use leasehold_engines::supervisor::Phase;
use leasehold_health::{Report, Severity, Source};
use leasehold_node::EngineStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::api::Ctx;
use crate::auth::{Outcome, RateLimit};

pub mod sensors;

/// Largest request accepted (request line and headers).
pub const MAX_REQUEST_BYTES: usize = 8192;
/// Time a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long unread input is drained before a connection is closed.
const LINGER: Duration = Duration::from_secs(1);
/// Largest token file read.
const MAX_TOKEN_BYTES: u64 = 4096;
/// Shortest token accepted: a guessable token is no access control.
const MIN_TOKEN_BYTES: usize = 16;
/// Latency buckets (seconds): 1 ms to 30 s; a call waits at most the
/// authorization deadline plus the method's own.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0,
];

/// Engine phases, so every phase has a series (0 when no engine is in it).
const PHASES: [Phase; 8] = [
    Phase::Stopped,
    Phase::Starting,
    Phase::Running,
    Phase::Ready,
    Phase::Stopping,
    Phase::Exited,
    Phase::BackingOff,
    Phase::GaveUp,
];
/// Volume states (`VolumeStatus.state`), one-hot.
pub const VOLUME_STATES: [&str; 5] = ["none", "open", "closed", "error", "unknown"];
const SEVERITIES: [Severity; 3] = [Severity::Warning, Severity::Critical, Severity::Stuck];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    interface: String,
    method: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    interface: String,
    method: String,
}

/// D-Bus calls by interface, method and authorization outcome. Methods
/// are those the interfaces export (an unknown name is answered by zbus
/// and never reaches here), so the label sets are bounded.
#[derive(Debug)]
pub struct DbusMetrics {
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
}

impl Default for DbusMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
        }
    }
}

/// Interfaces only a tenant calls (counted without method names).
const TENANT_ONLY_INTERFACES: [&str; 2] = [
    leasehold_dbus_api::TENANT_INTERFACE,
    leasehold_dbus_api::TENANT_ENGINES_INTERFACE,
];

/// The `method` label of a tenant interface's calls.
pub const ANY_METHOD: &str = "*";

impl DbusMetrics {
    /// One call answered after `took`.
    pub fn observe(&self, interface: &str, method: &str, outcome: Outcome, took: Duration) {
        // The landlord reads these: which tenant methods are called, and
        // how often (secrets put, images deployed), is the tenant's
        // business, so the tenant's interfaces are counted as a whole.
        let method = if TENANT_ONLY_INTERFACES.contains(&interface) {
            ANY_METHOD
        } else {
            method
        };
        self.calls
            .get_or_create(&CallLabels {
                interface: interface.to_owned(),
                method: method.to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                interface: interface.to_owned(),
                method: method.to_owned(),
            })
            .observe(took.as_secs_f64());
    }
}

/// What a scrape reports about the node: numbers and fixed words only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub landlord_generation: u64,
    /// Tenant key-pair and symmetric-key generations; None: not assigned.
    pub tenant_generations: Option<(u64, u64)>,
    pub tpm_ok: bool,
    /// Unix seconds of the last answered periodic TPM check and the
    /// checks' interval; None before the first.
    pub heartbeat: Option<(u64, u64)>,
    pub boundary_enforced: bool,
    pub boundary_elements: Option<u64>,
    pub boundary_drifts: u64,
    pub boundary_drift_unrepaired: bool,
    /// One of [`VOLUME_STATES`].
    pub volume_state: &'static str,
    /// Bytes used and total of the mounted volume.
    pub volume_usage: Option<(u64, u64)>,
    pub engines: BTreeMap<&'static str, u64>,
    pub engine_restarts: u64,
    /// Engines some probe of which failed its last run.
    pub engine_probe_failing: u64,
    /// Probe runs that waited for the node's bound, summed.
    pub engine_probes_delayed: u64,
    /// The tenant subtree: budget and aggregate usage (sums over every
    /// engine; no engine appears on its own).
    pub tenant: Option<TenantMetrics>,
    /// Faults by (source, severity).
    pub faults: BTreeMap<(&'static str, &'static str), u64>,
    /// Health sources by (source, status) in the last report.
    pub sources_stuck: BTreeMap<&'static str, bool>,
    pub health_seconds: f64,
    /// Age of the report the faults come from (0: taken for this scrape).
    pub health_age_seconds: f64,
    /// Links, addresses and routes (counts only); None: not watched.
    pub net: Option<NetCounts>,
    /// The report's sensor readings (bounded).
    pub sensors: sensors::Sensors,
    /// The boundary's deny counters by class: (class, packets, bytes);
    /// None when they could not be read.
    pub deny: Option<Vec<(&'static str, u64, u64)>>,
}

/// The tenant subtree's numbers for one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantMetrics {
    /// `1` when the budget is written on the subtree.
    pub budget_written: bool,
    /// Budget limits (absent: not set).
    pub cpu_max: Option<(u64, u64)>,
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
    /// The subtree's counters; None when they cannot be read.
    pub usage: Option<leasehold_engines::cgroup::Usage>,
    /// Percent of its CPU a corrective throttle leaves it (0: none).
    pub throttle_cpu_percent: u8,
}

impl TenantMetrics {
    /// From the runtime's view; per-device io lines are summed (device
    /// numbers are not labels either).
    pub fn from_view(v: leasehold_node::TenantView) -> Self {
        TenantMetrics {
            budget_written: v.written,
            cpu_max: v.budget.cpu_max.map(|c| (c.quota_us, c.period_us)),
            memory_max: v.budget.memory_max.map(|m| m.0),
            pids_max: v.budget.pids_max,
            usage: v.usage.ok(),
            throttle_cpu_percent: v.throttles.cpu_percent().unwrap_or(0),
        }
    }
}

/// The network part of a scrape: counts, no addresses and no names (an
/// address is landlord data, but as a label it would make a series per
/// lease).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetCounts {
    pub watching: bool,
    /// Links by (admin up, carrier).
    pub links_up: u64,
    pub links_no_carrier: u64,
    pub links_down: u64,
    pub addresses_v4: u64,
    pub addresses_v6: u64,
    pub default_routes: u64,
    pub leases: u64,
    pub events: u64,
}

impl NetCounts {
    /// Counts of the report's network part.
    pub fn of(n: &leasehold_health::net::Network) -> Self {
        let count = |f: &dyn Fn(&&leasehold_health::net::LinkState) -> bool| {
            n.links.iter().filter(f).count() as u64
        };
        Self {
            watching: n.watching,
            links_up: count(&|l| l.admin_up && l.carrier),
            links_no_carrier: count(&|l| l.admin_up && !l.carrier),
            links_down: count(&|l| !l.admin_up),
            addresses_v4: n.addresses.iter().filter(|a| a.family == "ipv4").count() as u64,
            addresses_v6: n.addresses.iter().filter(|a| a.family == "ipv6").count() as u64,
            default_routes: n.default_routes.len() as u64,
            leases: n.leases.len() as u64,
            events: n.events_total,
        }
    }
}

impl Snapshot {
    /// Engine counts by phase and the sum of their restarts; names dropped.
    pub fn count_engines(&mut self, engines: &[EngineStatus]) {
        self.engines = PHASES.iter().map(|p| (p.name(), 0)).collect();
        for e in engines {
            *self.engines.entry(e.phase.name()).or_default() += 1;
            self.engine_restarts += u64::from(e.restarts);
            self.engine_probe_failing += u64::from(crate::health::probe_failing(e));
            self.engine_probes_delayed += e.probes_delayed;
        }
    }

    /// Fault counts by source and severity; subjects and messages dropped.
    pub fn count_faults(&mut self, report: &Report) {
        self.faults.clear();
        for s in Source::ALL.into_iter().chain(Source::CHECKS) {
            for v in SEVERITIES {
                self.faults.insert((s.as_str(), v.as_str()), 0);
            }
        }
        for f in &report.faults {
            *self
                .faults
                .entry((f.source.as_str(), f.severity.as_str()))
                .or_default() += 1;
        }
        self.sources_stuck = report
            .sources
            .iter()
            .map(|s| {
                (
                    s.source.as_str(),
                    s.status == leasehold_health::SourceStatus::Stuck,
                )
            })
            .collect();
        self.net = report.network.as_ref().map(NetCounts::of);
        self.sensors = sensors::Sensors::of(report);
    }
}

fn gauge(v: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    g
}

/// The text format (Prometheus 0.0.4) of `s` and the D-Bus counters.
pub fn encode(s: &Snapshot, dbus: &DbusMetrics) -> String {
    let mut r = Registry::with_prefix("leasehold");
    r.register(
        "landlord_key_generation",
        "Landlord key-pair generation",
        gauge(s.landlord_generation),
    );
    r.register(
        "assigned",
        "1 if the node is assigned to a tenant",
        gauge(u64::from(s.tenant_generations.is_some())),
    );
    if let Some((pair, key)) = s.tenant_generations {
        r.register(
            "tenant_key_generation",
            "Tenant key-pair generation (absent when not assigned)",
            gauge(pair),
        );
        r.register(
            "tenant_symmetric_key_generation",
            "Tenant symmetric key (KT) generation (absent when not assigned)",
            gauge(key),
        );
    }
    r.register(
        "tpm_up",
        "1 if the last TPM check answered",
        gauge(u64::from(s.tpm_ok)),
    );
    if let Some((at, interval)) = s.heartbeat {
        r.register(
            "heartbeat_timestamp_seconds",
            "Unix time of the last periodic TPM check the agent completed (its heartbeat)",
            gauge(at),
        );
        r.register(
            "heartbeat_interval_seconds",
            "Seconds between the agent's periodic TPM checks",
            gauge(interval),
        );
    }
    r.register(
        "boundary_enforced",
        "1 if the boundary's nftables table is in the kernel",
        gauge(u64::from(s.boundary_enforced)),
    );
    if let Some(n) = s.boundary_elements {
        r.register(
            "boundary_elements",
            "Set elements of the enforced boundary",
            gauge(n),
        );
    }
    let drifts: Counter = Counter::default();
    drifts.inc_by(s.boundary_drifts);
    r.register(
        "boundary_drifts",
        "Times the kernel's table was found changed and restored, since the agent started",
        drifts,
    );
    r.register(
        "boundary_drift_unrepaired",
        "1 if the last drift could not be repaired",
        gauge(u64::from(s.boundary_drift_unrepaired)),
    );
    let volume = Family::<[(&'static str, &'static str); 1], Gauge>::default();
    for state in VOLUME_STATES {
        volume
            .get_or_create(&[("state", state)])
            .set(i64::from(state == s.volume_state));
    }
    r.register("volume_state", "The tenant volume's state, one-hot", volume);
    if let Some((used, total)) = s.volume_usage {
        r.register(
            "volume_used_bytes",
            "Bytes used on the tenant volume",
            gauge(used),
        );
        r.register(
            "volume_size_bytes",
            "Size of the tenant volume's filesystem",
            gauge(total),
        );
    }
    let engines = Family::<[(&'static str, &'static str); 1], Gauge>::default();
    for (phase, n) in &s.engines {
        engines
            .get_or_create(&[("state", *phase)])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    r.register("engines", "Engines by supervision state", engines);
    r.register(
        "engine_restarts",
        "Supervisor restarts of the deployed engines since their deploy, summed",
        gauge(s.engine_restarts),
    );
    r.register(
        "engines_probe_failing",
        "Engines some health probe of which failed its last run",
        gauge(s.engine_probe_failing),
    );
    r.register(
        "engine_probes_delayed",
        "Probe runs of the deployed engines that waited for the node's bound on probe work, summed",
        gauge(s.engine_probes_delayed),
    );
    if let Some(t) = &s.tenant {
        encode_tenant(&mut r, t);
    }
    let faults = Family::<[(&'static str, &'static str); 2], Gauge>::default();
    for ((source, severity), n) in &s.faults {
        faults
            .get_or_create(&[("source", *source), ("severity", *severity)])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    r.register(
        "health_faults",
        "Faults in the health report taken for this scrape",
        faults,
    );
    let stuck = Family::<[(&'static str, &'static str); 1], Gauge>::default();
    for (source, is) in &s.sources_stuck {
        stuck
            .get_or_create(&[("source", *source)])
            .set(i64::from(*is));
    }
    r.register(
        "health_source_stuck",
        "1 if the source missed its deadline in this scrape's report",
        stuck,
    );
    let took = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    took.set(s.health_seconds);
    r.register(
        "health_report_seconds",
        "Time the health report the faults come from took",
        took,
    );
    let age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    age.set(s.health_age_seconds);
    r.register(
        "health_report_age_seconds",
        "Age of the health report the faults come from (the agent's periodic one; 0: taken for this scrape)",
        age,
    );
    if let Some(n) = &s.net {
        r.register(
            "net_watching",
            "1 if links and addresses are watched (rtnetlink)",
            gauge(u64::from(n.watching)),
        );
        let links = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        for (state, v) in [
            ("up", n.links_up),
            ("no-carrier", n.links_no_carrier),
            ("down", n.links_down),
        ] {
            links
                .get_or_create(&[("state", state)])
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        r.register(
            "net_links",
            "Network links: up (with carrier), no-carrier (up without), down (administratively)",
            links,
        );
        let addrs = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        for (family, v) in [("ipv4", n.addresses_v4), ("ipv6", n.addresses_v6)] {
            addrs
                .get_or_create(&[("family", family)])
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        r.register("net_addresses", "Addresses of the node", addrs);
        r.register(
            "net_default_routes",
            "Default routes",
            gauge(n.default_routes),
        );
        r.register(
            "net_dhcp_leases",
            "DHCP leases (systemd-networkd)",
            gauge(n.leases),
        );
        let events: Counter = Counter::default();
        events.inc_by(n.events);
        r.register(
            "net_events",
            "Link, address and default-route changes seen since the agent started",
            events,
        );
    }
    r.register(
        "dbus_calls",
        "D-Bus method calls answered, by authorization outcome",
        dbus.calls.clone(),
    );
    r.register(
        "dbus_call_duration_seconds",
        "D-Bus method calls from dispatch to the reply sent",
        dbus.latency.clone(),
    );
    sensors::encode(&mut r, &s.sensors);
    if let Some(d) = &s.deny {
        sensors::encode_deny(&mut r, d);
    }
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &r);
    out
}

/// The tenant subtree's gauges: no labels at all.
fn encode_tenant(r: &mut Registry, t: &TenantMetrics) {
    r.register(
        "tenant_budget_written",
        "1 if the tenant budget is written on the engines' cgroup subtree",
        gauge(u64::from(t.budget_written)),
    );
    r.register(
        "tenant_throttle_cpu_percent",
        "percent of its CPU a corrective throttle leaves the tenant subtree (0: none)",
        gauge(u64::from(t.throttle_cpu_percent)),
    );
    if let Some((quota, period)) = t.cpu_max {
        r.register(
            "tenant_budget_cpu_quota_usec",
            "cpu.max quota of the tenant subtree (per period)",
            gauge(quota),
        );
        r.register(
            "tenant_budget_cpu_period_usec",
            "cpu.max period of the tenant subtree",
            gauge(period),
        );
    }
    if let Some(m) = t.memory_max {
        r.register(
            "tenant_budget_memory_max_bytes",
            "memory.max of the tenant subtree",
            gauge(m),
        );
    }
    if let Some(p) = t.pids_max {
        r.register(
            "tenant_budget_pids_max",
            "pids.max of the tenant subtree",
            gauge(p),
        );
    }
    let Some(u) = &t.usage else {
        return;
    };
    let io = |f: fn(&leasehold_engines::cgroup::IoStat) -> u64| {
        u.io.iter().map(f).fold(0u64, u64::saturating_add)
    };
    for (name, help, v) in [
        (
            "tenant_cpu_usage_usec",
            "CPU time of all the tenant's engines (cpu.stat usage_usec of the subtree)",
            u.cpu_usage_usec,
        ),
        (
            "tenant_memory_bytes",
            "Memory of all the tenant's engines (memory.current of the subtree)",
            u.memory_current,
        ),
        (
            "tenant_pids",
            "Processes and threads of all the tenant's engines (pids.current)",
            u.pids_current,
        ),
        (
            "tenant_oom_kills",
            "OOM kills in the tenant subtree (memory.events oom_kill)",
            u.oom_kills,
        ),
        (
            "tenant_io_read_bytes",
            "Bytes read by the tenant's engines (io.stat, all devices)",
            io(|s| s.rbytes),
        ),
        (
            "tenant_io_write_bytes",
            "Bytes written by the tenant's engines (io.stat, all devices)",
            io(|s| s.wbytes),
        ),
        (
            "tenant_io_reads",
            "Read operations of the tenant's engines (io.stat, all devices)",
            io(|s| s.rios),
        ),
        (
            "tenant_io_writes",
            "Write operations of the tenant's engines (io.stat, all devices)",
            io(|s| s.wios),
        ),
    ] {
        r.register(name, help, gauge(v));
    }
}

/// Reads the node's state for one scrape.
pub async fn collect(ctx: &Ctx) -> Snapshot {
    let mut s = Snapshot::default();
    {
        let snap = ctx.node.snapshot();
        s.landlord_generation = snap.status.landlord.generation;
        s.tenant_generations = snap
            .status
            .tenant
            .as_ref()
            .map(|t| (t.generation, t.key_generation));
    }
    s.tpm_ok = ctx.tpm_health.error().is_none();
    s.heartbeat = ctx.tpm_health.heartbeat();
    let b = ctx.boundaries.clone();
    // The deny counters: one netlink dump of the table's counter objects
    // (well under a millisecond), under the boundary's lock, so never
    // between a table's deletion and the carrying of its counts.
    if let Ok((info, deny)) =
        tokio::task::spawn_blocking(move || (b.status(), b.deny_counters())).await
    {
        s.boundary_enforced = info.enforced.unwrap_or(false);
        s.boundary_elements = info.elements;
        s.boundary_drifts = info.drift_count.unwrap_or(0);
        s.boundary_drift_unrepaired = info.drift_unrepaired.is_some();
        s.deny = deny;
    }
    s.volume_state = "unknown";
    if let Ok(v) = ctx.volume_info().await {
        s.volume_state = VOLUME_STATES
            .into_iter()
            .find(|st| v.state.as_deref() == Some(*st))
            .unwrap_or("unknown");
        s.volume_usage = v.used.zip(v.total);
    }
    s.count_engines(&ctx.node.engines());
    let node = ctx.node.clone();
    // A few cgroup files: off the async workers.
    if let Ok(v) = tokio::task::spawn_blocking(move || node.tenant_usage()).await {
        s.tenant = Some(TenantMetrics::from_view(v));
    }
    let monitor = ctx.health.clone();
    // The agent's periodic report, while it is due: a scrape then costs
    // no sensor read (no smartctl run). Past it (the collection is late or
    // a report is being taken), a report of the scrape's own.
    if let Some(last) = monitor
        .last()
        .filter(|l| l.age <= ctx.health_interval + REPORT_SLACK)
    {
        s.count_faults(&last.report);
        s.health_seconds = last.took.as_secs_f64();
        s.health_age_seconds = last.age.as_secs_f64();
        return s;
    }
    let asked = Instant::now();
    // The report keeps its sources' deadlines (docs/health.md), and
    // shares one in flight with D-Bus callers.
    if let Ok(report) = tokio::task::spawn_blocking(move || monitor.report_asked_at(asked)).await {
        s.count_faults(&report);
    }
    s.health_seconds = asked.elapsed().as_secs_f64();
    s
}

/// A periodic report is late past its interval plus this (a report takes
/// at most 23 s by the configuration's bounds).
const REPORT_SLACK: std::time::Duration = std::time::Duration::from_secs(25);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics.socket {path}: exists and is not a socket; not replaced")]
    NotASocket { path: PathBuf },
    #[error(
        "metrics.socket {path}: its directory {dir} must be a directory owned by root and writable by no one else ({why})"
    )]
    UnsafeDir {
        path: PathBuf,
        dir: PathBuf,
        why: String,
    },
    #[error("metrics.listen {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics.token_file {path}: {reason}")]
    Token { path: PathBuf, reason: String },
}

impl MetricsError {
    /// A configuration the administrator must fix (not a busy port).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            MetricsError::Token { .. }
                | MetricsError::NotASocket { .. }
                | MetricsError::UnsafeDir { .. }
        )
    }
}

/// The bearer token of the TCP listener.
pub struct Token(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(redacted)")
    }
}

impl Token {
    /// Reads the token: one line, at least [`MIN_TOKEN_BYTES`], from a
    /// file no other user may read or write (fail closed otherwise).
    pub fn read(path: &Path) -> Result<Self, MetricsError> {
        let bad = |reason: String| MetricsError::Token {
            path: path.to_owned(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.mode() & 0o007 != 0 {
            return Err(bad(format!(
                "mode {:o} lets every user read or change it; chmod o-rwx",
                meta.mode() & 0o777
            )));
        }
        if meta.len() > MAX_TOKEN_BYTES {
            return Err(bad(format!("larger than {MAX_TOKEN_BYTES} bytes")));
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| bad(e.to_string()))?);
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8".into()))?;
        let t = text.trim();
        if t.len() < MIN_TOKEN_BYTES || t.contains(char::is_whitespace) {
            return Err(bad(format!(
                "must be one word of at least {MIN_TOKEN_BYTES} characters"
            )));
        }
        Ok(Token(Zeroizing::new(t.as_bytes().to_vec())))
    }

    fn matches(&self, header: Option<&[u8]>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(v) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        v.len() == self.0.len() && bool::from(v.ct_eq(&self.0))
    }
}

/// The endpoint's shared state.
pub struct Endpoint {
    ctx: Arc<Ctx>,
    dbus: Arc<DbusMetrics>,
    /// Connections served at once, per listener: idle TCP connections (any
    /// local user can open them) never take the unix socket's slots.
    unix_slots: Arc<Semaphore>,
    tcp_slots: Arc<Semaphore>,
    /// TCP connections that have not shown the token yet (see
    /// [`PreAuth`]).
    pre_auth: Mutex<PreAuth>,
    refused: RateLimit,
}

/// TCP connections at most open before their token is read: a newer one
/// ends the oldest (its request not in yet, or its refusal being sent).
pub const PRE_AUTH: usize = 64;

/// The TCP connections that have not shown the token. Until a connection
/// has, it holds no serving slot: before 2026-12-07 a slot (and its
/// source address's share) was taken at accept, so idle connections of
/// any local user — from 127.0.0.1, which the console's SSH-tunnelled
/// scrape comes from too, or any 127.x address — kept every scrape out,
/// and the console saw the node down (review).
#[derive(Default)]
struct PreAuth {
    next: u64,
    open: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

impl PreAuth {
    /// Counts a new connection in, ending the oldest if [`PRE_AUTH`] are
    /// open; returns its id and what ends it.
    fn admit(&mut self) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        while self.open.len() >= PRE_AUTH {
            if let Some((_, end)) = self.open.pop_front() {
                let _ = end.send(());
            }
        }
        self.next += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.open.push_back((self.next, tx));
        (self.next, rx)
    }

    /// Connection `id` has shown the token, or is done.
    fn done(&mut self, id: u64) {
        self.open.retain(|(i, _)| *i != id);
    }
}

/// The endpoint's configuration with its token read: done at start,
/// before the TPM is touched, so a bad token file stops the agent early.
#[derive(Debug)]
pub struct Setup {
    cfg: crate::config::MetricsSection,
    token: Option<Arc<Token>>,
}

impl Setup {
    /// Reads the token file, if any.
    pub fn new(cfg: &crate::config::MetricsSection) -> Result<Self, MetricsError> {
        let token = match &cfg.token_file {
            Some(p) => Some(Arc::new(Token::read(p)?)),
            None => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            token,
        })
    }
}

/// After an accept error (out of file descriptors, say): a pause, so the
/// loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Starts the configured listeners; returns the socket path to remove at
/// exit. Nothing configured: nothing started.
pub async fn start(
    setup: Setup,
    ctx: Arc<Ctx>,
    dbus: Arc<DbusMetrics>,
) -> Result<Option<PathBuf>, MetricsError> {
    let Setup { cfg, token } = setup;
    let ep = Arc::new(Endpoint {
        ctx,
        dbus,
        unix_slots: Arc::new(Semaphore::new(cfg.max_connections)),
        tcp_slots: Arc::new(Semaphore::new(cfg.max_connections)),
        pre_auth: Mutex::default(),
        refused: RateLimit::new(20, Duration::from_secs(60)),
    });
    if let Some(addr) = cfg.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Listen { addr, source })?;
        tracing::info!(%addr, "metrics on TCP (bearer token required)");
        let ep = ep.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = l.accept().await else {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                };
                ep.clone().serve_tcp(stream, token.clone());
            }
        });
    }
    let Some(path) = cfg.socket.clone() else {
        return Ok(None);
    };
    let l = bind_socket(&path)?;
    tracing::info!(path = %path.display(), "metrics on a unix socket (group {})", crate::auth::LANDLORD_GROUP);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = l.accept().await else {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            };
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            let slots = ep.unix_slots.clone();
            ep.clone().serve_one(stream, uid, slots);
        }
    });
    Ok(Some(path))
}

/// Binds `path` with mode 0660 and group `leasehold-landlord` (0600 and
/// root only when the group does not exist). A stale socket is replaced;
/// any other file is left alone.
fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener, MetricsError> {
    let io = |source| MetricsError::Socket {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => return Err(MetricsError::NotASocket { path: path.into() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        // 0755: the landlord group traverses it to the socket (the agent's
        // umask would make it 0700).
        crate::fsutil::create_dir_all_mode(dir, 0o755).map_err(io)?;
        // The socket's mode and group are set by path after bind: only
        // safe if no one else can replace the path meanwhile (a symlink
        // there would hand another file to the landlord group).
        let m = std::fs::symlink_metadata(dir).map_err(io)?;
        let why = if !m.is_dir() {
            Some("not a directory".to_owned())
        } else if m.uid() != nix::unistd::geteuid().as_raw() {
            Some(format!("owned by uid {}", m.uid()))
        } else if m.mode() & 0o022 != 0 {
            Some(format!("mode {:o}", m.mode() & 0o7777))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(MetricsError::UnsafeDir {
                path: path.to_owned(),
                dir: dir.to_owned(),
                why,
            });
        }
    }
    let l = tokio::net::UnixListener::bind(path).map_err(io)?;
    // Connections made before the mode is set are still checked by uid on
    // accept.
    let group = nix::unistd::Group::from_name(crate::auth::LANDLORD_GROUP)
        .ok()
        .flatten();
    let mode = match &group {
        Some(g) => {
            std::os::unix::fs::lchown(path, Some(0), Some(g.gid.as_raw())).map_err(io)?;
            0o660
        }
        None => {
            tracing::warn!(
                group = crate::auth::LANDLORD_GROUP,
                "no such group: the metrics socket is for root only"
            );
            0o600
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(l)
}

/// Status line and body of a refusal.
type Refusal = (&'static str, &'static str);

impl Endpoint {
    /// 503 at once, nothing read.
    fn busy<S>(&self, mut stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(async move {
            let _ = respond(&mut stream, ("503 Service Unavailable", "busy\n")).await;
        });
    }

    /// A TCP connection: its request read and its token checked while it
    /// is counted in [`PreAuth`] (a newer connection may end it then);
    /// only then a serving slot.
    fn serve_tcp(self: Arc<Self>, mut stream: tokio::net::TcpStream, token: Option<Arc<Token>>) {
        let (id, mut ended) = self
            .pre_auth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit();
        tokio::spawn(async move {
            let shown = tokio::select! {
                r = async {
                    let refusal = match read_request(&mut stream).await {
                        Err(refusal) => refusal,
                        // No token (the configuration forbids it) lets nobody in.
                        Ok(req)
                            if token
                                .as_ref()
                                .is_some_and(|t| t.matches(req.authorization.as_deref())) =>
                        {
                            return Some(req)
                        }
                        Ok(_) => {
                            if let Some(suppressed) = self.refused.allow() {
                                tracing::warn!(
                                    suppressed,
                                    "metrics: refused a TCP request without the token"
                                );
                            }
                            ("401 Unauthorized", "a bearer token is required\n")
                        }
                    };
                    write_answer(&mut stream, Err(refusal)).await;
                    None
                } => r,
                _ = &mut ended => None,
            };
            self.pre_auth
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .done(id);
            let Some(req) = shown else {
                return;
            };
            let Ok(_slot) = self.tcp_slots.clone().try_acquire_owned() else {
                let _ = respond(&mut stream, ("503 Service Unavailable", "busy\n")).await;
                return;
            };
            let answer = self.route(req).await;
            write_answer(&mut stream, answer).await;
        });
    }

    /// A unix socket connection of peer `uid`.
    fn serve_one<S>(self: Arc<Self>, stream: S, uid: Option<u32>, slots: Arc<Semaphore>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(slot) = slots.try_acquire_owned() else {
            self.busy(stream);
            return;
        };
        let mut stream = stream;
        tokio::spawn(async move {
            let _slot = slot;
            let answer = self.answer(&mut stream, uid).await;
            write_answer(&mut stream, answer).await;
        });
    }

    /// A unix socket peer (its uid; None: unknown, refused): checked
    /// before anything is read, then its request.
    async fn answer<S: AsyncRead + Unpin>(
        &self,
        stream: &mut S,
        uid: Option<u32>,
    ) -> Result<String, Refusal> {
        if !self.local_reader(uid).await {
            if let Some(suppressed) = self.refused.allow() {
                tracing::warn!(
                    uid,
                    suppressed,
                    "metrics: refused a local reader outside {}",
                    crate::auth::LANDLORD_GROUP
                );
            }
            return Err((
                "403 Forbidden",
                "only root and leasehold-landlord may read the metrics\n",
            ));
        }
        let req = read_request(stream).await?;
        self.route(req).await
    }

    /// An admitted request: the metrics at `GET /metrics`.
    async fn route(&self, req: Request) -> Result<String, Refusal> {
        if req.method != "GET" {
            return Err(("405 Method Not Allowed", "GET only\n"));
        }
        if req.path.split('?').next() != Some("/metrics") {
            return Err(("404 Not Found", "the metrics are at /metrics\n"));
        }
        let snap = collect(&self.ctx).await;
        Ok(encode(&snap, &self.dbus))
    }

    /// Root, or a user in the landlord's group and not the tenant's (like
    /// the D-Bus authorization).
    async fn local_reader(&self, uid: Option<u32>) -> bool {
        match uid {
            Some(0) => true,
            Some(uid) => matches!(
                tokio::task::spawn_blocking(move || crate::auth::member_of_agent_groups(uid)).await,
                Ok(Ok(crate::auth::Membership {
                    landlord: true,
                    tenant: false
                }))
            ),
            None => false,
        }
    }
}

#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    authorization: Option<Vec<u8>>,
}

/// Writes `answer` (the metrics, or a refusal), then drains what the
/// client still sends, bounded, before the connection closes.
async fn write_answer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    answer: Result<String, Refusal>,
) {
    let (status, body, kind) = match &answer {
        Ok(text) => (
            "200 OK",
            text.as_str(),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        ),
        Err((status, body)) => (*status, *body, "text/plain; charset=utf-8"),
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(body.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
    // Closing with unread input resets the connection, which can
    // discard the answer before the client reads it (an oversize
    // request's 431): read what is left, bounded, first.
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut left = MAX_REQUEST_BYTES * 8;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Reads one request's head: at most [`MAX_REQUEST_BYTES`], within
/// [`READ_TIMEOUT`]. A body is never read (GET has none).
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Request, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|_| ("400 Bad Request", "read error\n"))?;
            if n == 0 {
                return Err(("400 Bad Request", "incomplete request\n"));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(_)) => {
                    return Ok(Request {
                        method: req.method.unwrap_or_default().to_owned(),
                        path: req.path.unwrap_or_default().to_owned(),
                        authorization: req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                            .map(|h| h.value.to_vec()),
                    })
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_BYTES => {}
                Ok(httparse::Status::Partial) => {
                    return Err(("431 Request Header Fields Too Large", "request too large\n"))
                }
                Err(_) => return Err(("400 Bad Request", "not an HTTP/1.1 request\n")),
            }
        }
    })
    .await;
    read.unwrap_or(Err(("408 Request Timeout", "no request in time\n")))
}

/// A refusal written before any request is read (no slot free).
async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    (status, body): Refusal,
) -> std::io::Result<()> {
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(text.as_bytes()))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_health::{Fault, SourceReport, SourceStatus};

    const PRIVATE: [&str; 6] = [
        "billing-engine-7f3a",
        "tenant-image-xyz.tar",
        "db-password-prod",
        "10.99.88.77",
        "wwn-0xsecretdisk",
        "overheated because of billing-engine",
    ];

    fn failed_probe() -> leasehold_node::EngineProbe {
        leasehold_node::EngineProbe {
            probe: format!("http 8080 /{}", PRIVATE[2]),
            failures: 3,
            ok: Some(false),
            detail: Some(PRIVATE[5].into()),
            at: None,
        }
    }

    fn engine(name: &str, phase: Phase, restarts: u32) -> EngineStatus {
        EngineStatus {
            name: name.into(),
            image: PRIVATE[1].into(),
            phase,
            enabled: true,
            pid: Some(4242),
            started_at: None,
            restarts,
            last_exit: None,
            probes: Vec::new(),
            probes_delayed: 0,
            notes: Vec::new(),
            confinement: None,
        }
    }

    /// Two links (one without carrier), an IPv4 and an IPv6 address, a
    /// default route, a lease: addresses and names that must stay out.
    fn network() -> leasehold_health::net::Network {
        use leasehold_health::net::*;
        let link = |iface: &str, carrier| LinkState {
            iface: iface.into(),
            index: 2,
            admin_up: true,
            carrier,
            operstate: "up".into(),
            mtu: None,
            mac: None,
        };
        let addr = |a: &str, family: &str| NetAddress {
            iface: PRIVATE[0].into(),
            family: family.into(),
            address: a.into(),
            prefix_len: 24,
            scope: "global".into(),
            dynamic: true,
            valid_lft_s: None,
            preferred_lft_s: None,
        };
        Network {
            watching: true,
            links: vec![link(PRIVATE[0], true), link("eth1", false)],
            addresses: vec![addr(PRIVATE[3], "ipv4"), addr("fd00::7", "ipv6")],
            default_routes: vec![DefaultRoute {
                family: "ipv4".into(),
                gateway: Some(PRIVATE[3].into()),
                iface: Some(PRIVATE[0].into()),
                metric: 0,
                protocol: "dhcp".into(),
                table: 254,
            }],
            leases: vec![Lease {
                address: Some(PRIVATE[3].into()),
                ..Lease::default()
            }],
            events_total: 7,
            ..Network::default()
        }
    }

    fn fixture() -> (Snapshot, DbusMetrics) {
        let mut s = Snapshot {
            landlord_generation: 3,
            tenant_generations: Some((5, 2)),
            tpm_ok: true,
            heartbeat: Some((1_764_790_000, 30)),
            boundary_enforced: true,
            boundary_elements: Some(12),
            boundary_drifts: 1,
            volume_state: "open",
            volume_usage: Some((10, 100)),
            ..Snapshot::default()
        };
        s.tenant = Some(TenantMetrics {
            budget_written: true,
            cpu_max: Some((200_000, 100_000)),
            memory_max: Some(1 << 30),
            pids_max: None,
            throttle_cpu_percent: 50,
            usage: Some(leasehold_engines::cgroup::Usage {
                cpu_usage_usec: 1_500_000,
                memory_current: 64 << 20,
                oom_kills: 1,
                pids_current: 12,
                io: vec![
                    leasehold_engines::cgroup::IoStat {
                        device: "259:7".into(),
                        rbytes: 100,
                        wbytes: 200,
                        rios: 3,
                        wios: 4,
                    },
                    leasehold_engines::cgroup::IoStat {
                        device: "8:0".into(),
                        rbytes: 1,
                        wbytes: 2,
                        rios: 1,
                        wios: 1,
                    },
                ],
            }),
        });
        s.count_engines(&[
            engine(PRIVATE[0], Phase::Ready, 2),
            engine("db-password-prod-engine", Phase::Ready, 0),
            EngineStatus {
                // A failing probe's text is the tenant's: only the count
                // may reach the metrics.
                probes: vec![failed_probe()],
                probes_delayed: 4,
                ..engine(PRIVATE[0], Phase::Running, 0)
            },
            // Its last probe failed, but it has given up: counted there.
            EngineStatus {
                probes: vec![failed_probe()],
                ..engine("web", Phase::GaveUp, 7)
            },
        ]);
        s.count_faults(&Report {
            taken_at: 1,
            severity: Severity::Critical,
            sources: vec![SourceReport {
                source: Source::Smart,
                status: SourceStatus::Stuck,
                deadline_ms: 10,
                elapsed_ms: 10,
                readings: None,
                problems: vec![],
            }],
            faults: vec![
                Fault {
                    severity: Severity::Critical,
                    source: Source::Smart,
                    subject: PRIVATE[4].into(),
                    message: PRIVATE[5].into(),
                },
                Fault {
                    severity: Severity::Warning,
                    source: Source::Net,
                    subject: PRIVATE[3].into(),
                    message: PRIVATE[2].into(),
                },
                // An agent check's fault (its message could name an engine
                // if a bug let it).
                Fault {
                    severity: Severity::Warning,
                    source: Source::Engines,
                    subject: "engines".into(),
                    message: PRIVATE[0].into(),
                },
            ],
            network: Some(network()),
        });
        s.health_age_seconds = 12.5;
        let d = DbusMetrics::default();
        d.observe(
            "org.leasehold.Landlord1",
            "NodeInfo",
            Outcome::Authorized,
            Duration::from_millis(3),
        );
        d.observe(
            "org.leasehold.TenantEngines1",
            "Deploy",
            Outcome::Denied,
            Duration::from_millis(40),
        );
        (s, d)
    }

    #[test]
    fn aggregates_only_no_private_value_appears() {
        let (s, d) = fixture();
        let text = encode(&s, &d);
        for p in PRIVATE {
            assert!(!text.contains(p), "{p:?} in\n{text}");
        }
        assert!(!text.contains("billing"), "{text}");
        // Device numbers are summed away; an unset limit has no series.
        assert!(!text.contains("259:7") && !text.contains("8:0"), "{text}");
        assert!(!text.contains("tenant_budget_pids_max"), "{text}");
        for line in [
            "leasehold_landlord_key_generation 3",
            "leasehold_assigned 1",
            "leasehold_tenant_key_generation 5",
            "leasehold_tenant_symmetric_key_generation 2",
            "leasehold_boundary_elements 12",
            "leasehold_boundary_drifts_total 1",
            "leasehold_volume_state{state=\"open\"} 1",
            "leasehold_volume_state{state=\"closed\"} 0",
            "leasehold_engines{state=\"ready\"} 2",
            "leasehold_engines{state=\"gave-up\"} 1",
            "leasehold_engines{state=\"stopped\"} 0",
            "leasehold_engine_restarts 9",
            "leasehold_engines_probe_failing 1",
            "leasehold_engine_probes_delayed 4",
            "leasehold_heartbeat_timestamp_seconds 1764790000",
            "leasehold_heartbeat_interval_seconds 30",
            "leasehold_tenant_budget_written 1",
            "leasehold_tenant_throttle_cpu_percent 50",
            "leasehold_tenant_budget_cpu_quota_usec 200000",
            "leasehold_tenant_budget_memory_max_bytes 1073741824",
            "leasehold_tenant_cpu_usage_usec 1500000",
            "leasehold_tenant_memory_bytes 67108864",
            "leasehold_tenant_pids 12",
            "leasehold_tenant_oom_kills 1",
            "leasehold_tenant_io_read_bytes 101",
            "leasehold_tenant_io_write_bytes 202",
            "leasehold_tenant_io_reads 4",
            "leasehold_tenant_io_writes 5",
            "leasehold_health_faults{source=\"smart\",severity=\"critical\"} 1",
            "leasehold_health_faults{source=\"net\",severity=\"warning\"} 1",
            "leasehold_health_faults{source=\"edac\",severity=\"critical\"} 0",
            "leasehold_health_source_stuck{source=\"smart\"} 1",
            "leasehold_health_faults{source=\"engines\",severity=\"warning\"} 1",
            "leasehold_health_faults{source=\"tpm\",severity=\"stuck\"} 0",
            "leasehold_health_faults{source=\"boundary\",severity=\"critical\"} 0",
            "leasehold_health_report_age_seconds 12.5",
            "leasehold_net_watching 1",
            "leasehold_net_links{state=\"up\"} 1",
            "leasehold_net_links{state=\"no-carrier\"} 1",
            "leasehold_net_links{state=\"down\"} 0",
            "leasehold_net_addresses{family=\"ipv4\"} 1",
            "leasehold_net_addresses{family=\"ipv6\"} 1",
            "leasehold_net_default_routes 1",
            "leasehold_net_dhcp_leases 1",
            "leasehold_net_events_total 7",
            "leasehold_dbus_calls_total{interface=\"org.leasehold.Landlord1\",method=\"NodeInfo\",outcome=\"authorized\"} 1",
            "leasehold_dbus_calls_total{interface=\"org.leasehold.TenantEngines1\",method=\"*\",outcome=\"denied\"} 1",
            "leasehold_dbus_call_duration_seconds_bucket{interface=\"org.leasehold.Landlord1\",method=\"NodeInfo\",le=\"0.005\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Every line is a comment or a sample with a leasehold_ name.
        for l in text.lines() {
            assert!(l.starts_with('#') || l.starts_with("leasehold_"), "{l:?}");
        }
    }

    #[test]
    fn unassigned_node_has_no_tenant_generation() {
        let text = encode(&Snapshot::default(), &DbusMetrics::default());
        assert!(text.contains("leasehold_assigned 0"));
        assert!(!text.contains("tenant_key_generation"));
        // No heartbeat before the first TPM check answered: absent, so
        // the stale-heartbeat rule does not fire on a starting agent.
        assert!(!text.contains("heartbeat"));
    }

    fn token_file(text: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        (d, p)
    }

    #[test]
    fn token_file_checked_fail_closed() {
        let (_d, p) = token_file("0123456789abcdef0123\n", 0o640);
        let t = Token::read(&p).unwrap();
        assert!(t.matches(Some(b"Bearer 0123456789abcdef0123")));
        assert!(!t.matches(Some(b"Bearer 0123456789abcdef012")));
        assert!(!t.matches(Some(b"0123456789abcdef0123")));
        assert!(!t.matches(None));
        assert_eq!(format!("{t:?}"), "Token(redacted)");
        for (text, mode, why) in [
            ("0123456789abcdef0123", 0o644, "every user"),
            ("short", 0o600, "at least 16"),
            ("two words here and there", 0o600, "one word"),
        ] {
            let (_d, p) = token_file(text, mode);
            let e = Token::read(&p).unwrap_err().to_string();
            assert!(e.contains("metrics.token_file") && e.contains(why), "{e}");
        }
        let e = Token::read(Path::new("/nonexistent/token")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/token"), "{e}");
    }

    #[tokio::test]
    async fn request_head_is_bounded() {
        let ok = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer abc\r\n\r\n";
        let r = read_request(&mut &ok[..]).await.unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/metrics"));
        assert_eq!(r.authorization.as_deref(), Some(&b"Bearer abc"[..]));
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES + 10));
        let e = read_request(&mut &big[..]).await.unwrap_err();
        assert!(e.0.starts_with("431"), "{e:?}");
        let e = read_request(&mut &b"\x00\x01garbage\r\n\r\n"[..])
            .await
            .unwrap_err();
        assert!(e.0.starts_with("400"), "{e:?}");
        let e = read_request(&mut &b"GET /metr"[..]).await.unwrap_err();
        assert!(e.0.starts_with("400"), "{e:?}");
    }

    #[test]
    fn stale_socket_replaced_other_files_kept() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("file");
        std::fs::write(&f, "keep").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(matches!(
                bind_socket(&f),
                Err(MetricsError::NotASocket { .. })
            ));
            assert_eq!(std::fs::read_to_string(&f).unwrap(), "keep");
            let s = d.path().join("sub/m.sock");
            drop(bind_socket(&s).unwrap());
            // Left behind by a previous agent: replaced.
            let _l = bind_socket(&s).unwrap();
            let mode = std::fs::metadata(&s).unwrap().mode() & 0o777;
            assert!(mode == 0o660 || mode == 0o600, "{mode:o}");
            // A directory others may write into: they could swap the path
            // for a symlink between bind and chmod. Refused, nothing bound.
            let open = d.path().join("open");
            std::fs::create_dir(&open).unwrap();
            std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
            let e = bind_socket(&open.join("m.sock")).unwrap_err();
            assert!(matches!(e, MetricsError::UnsafeDir { .. }), "{e}");
            assert!(e.to_string().contains("mode 1777"), "{e}");
            assert!(e.is_config());
            assert!(!open.join("m.sock").exists());
        });
    }

    /// A new TCP connection past [`PRE_AUTH`] ends the oldest that has
    /// not shown the token; one that has leaves the count.
    #[test]
    fn connections_before_their_token_are_bounded_oldest_first() {
        let mut p = PreAuth::default();
        let mut ends: Vec<(u64, tokio::sync::oneshot::Receiver<()>)> =
            (0..PRE_AUTH).map(|_| p.admit()).collect();
        assert!(ends.iter_mut().all(|(_, e)| e.try_recv().is_err()));
        let (newest, _keep) = p.admit();
        assert_eq!(ends[0].1.try_recv(), Ok(()), "the oldest is ended");
        assert!(ends[1].1.try_recv().is_err(), "the next is not");
        p.done(ends[1].0);
        let _ = p.admit();
        assert!(ends[2].1.try_recv().is_err(), "a place was free");
        assert_eq!(p.open.len(), PRE_AUTH);
        assert!(p.open.iter().any(|(i, _)| *i == newest));
    }
}
