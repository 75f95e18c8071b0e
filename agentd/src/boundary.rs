//! The node's boundaries: the stored policy (`boundary.json` in the state
//! dir), the kernel table (through [`Enforcer`]) and the watcher that puts
//! the table back when someone changes or removes it.
//!
//! Fail closed: the table is applied at start, never removed when the agent
//! stops, and a refused change leaves the previous table in force. Only
//! `RemoveBoundary` (confirmed) lifts it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use leasehold_dbus_api::{BoundaryInfo, FlowVerdict};
use leasehold_netpolicy::conntrack;
use leasehold_netpolicy::enforce::{Change, Enforcer, Seen};
use leasehold_netpolicy::model::{Direction, Proto};
use leasehold_netpolicy::monitor;
use leasehold_netpolicy::nft::{self, ApplyError};
use leasehold_netpolicy::nft::{EngineEgress, Ruleset};
use leasehold_netpolicy::policy::Policy;
use leasehold_netpolicy::{explain, Boundary, DocError, Flow};

use crate::peer_index::PeerIndex;

mod diff;
mod journal;
pub mod revert;
use tracing::{debug, error, info, warn};

use crate::fsutil::write_atomic;

/// State file name.
pub const FILE: &str = "boundary.json";

/// Why a boundary operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BoundaryError {
    /// Bad document or argument; names the field.
    #[error("{0}")]
    Invalid(#[from] DocError),
    /// nftables refused or could not be run; the previous table stays.
    #[error("{0}")]
    Nft(#[from] ApplyError),
    /// Stored policy could not be read or written.
    #[error("boundary state {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The change needs the caller's confirmation; says why.
    #[error("{0}")]
    Unconfirmed(String),
    /// ConfirmBoundary without a pending revert.
    #[error("no boundary change is waiting for confirmation (none was set with a revert deadline, or it was already confirmed or reverted)")]
    NoPending,
    /// An engine's egress rules have no table the agent may load: the
    /// stored boundary does not validate, or a leasehold table the agent
    /// did not make is in the kernel (no boundary stored).
    #[error("engine {engine}: its egress cannot be enforced: {reason}")]
    EngineNoTable {
        /// The engine.
        engine: String,
        /// Why.
        reason: &'static str,
    },
    /// Too many engines with egress rules.
    #[error("engine {0}: {max} engines have egress rules already (the most)", max = nft::ENGINES_MAX)]
    EngineTooMany(String),
    /// The stored policy is unreadable.
    #[error("boundary state {path} is damaged: {reason}")]
    Damaged {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What reads see: the stored policy with its validated boundaries, taken
/// as an `Arc` under the lock and used outside it, so a tenant-sized read
/// (the effective view, explain, a check) never holds the lock a change
/// needs. Changes replace it (or edit it in place when no read holds it).
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    policy: Policy,
    /// `policy.boundaries()`, kept so a change of peers is not a
    /// re-validation of the whole document.
    bounds: Option<(Boundary, Option<Boundary>)>,
    /// Reference counts for incremental peer edits (cluster document).
    index: PeerIndex,
    /// The effective view as JSON, computed at the first read.
    effective: std::sync::OnceLock<Option<String>>,
    /// The running engines' egress rules (not stored: the engine runtime
    /// installs them at each launch, see [`Boundaries::set_engine_egress`]).
    engines: BTreeMap<String, EngineEgress>,
}

impl Snapshot {
    fn new(policy: Policy) -> Result<Self, DocError> {
        let bounds = policy.boundaries()?;
        let index = policy
            .cluster
            .as_ref()
            .map(PeerIndex::build)
            .unwrap_or_default();
        Ok(Snapshot {
            policy,
            bounds,
            index,
            effective: std::sync::OnceLock::new(),
            engines: BTreeMap::new(),
        })
    }

    /// The table to load: the boundaries with the engines' chains; with no
    /// boundary stored, the engines' chains alone (an engine's egress
    /// never lapses with the landlord's boundary); None when there is
    /// nothing to load, or the stored boundary does not validate (the
    /// kernel keeps what it has).
    fn ruleset(&self) -> Option<Ruleset> {
        let options = nft::Options {
            engines: self.live_engines(),
            dhcp_devices: if self.fences_dhcp() {
                dhcp_devices()
            } else {
                Vec::new()
            },
            ..nft::Options::default()
        };
        match (&self.bounds, &self.policy.cluster) {
            (Some((c, s)), _) => Some(Ruleset::build_with(c, s.as_ref(), &options)),
            (None, None) => Ruleset::engines_only(&options),
            (None, Some(_)) => None,
        }
    }

    /// The engines' rules whose cgroup is still there. nft refuses a whole
    /// table naming a missing cgroup, so one gone (the engines' unit
    /// stopped, which removes the tree) would fail every later load — the
    /// landlord's boundary changes and the drift repair included. Nothing
    /// runs in a cgroup that is gone; its rules come back with the
    /// engine's next launch (a new cgroup, so new rules: `cgroup_id`).
    fn live_engines(&self) -> Vec<EngineEgress> {
        self.engines
            .values()
            .filter(|e| {
                let there = Path::new(nft::CGROUP2_BASE).join(&e.cgroup).is_dir();
                if !there {
                    debug!(engine = %e.name, cgroup = %e.cgroup, "cgroup gone: its rules left out of the table");
                }
                there
            })
            .cloned()
            .collect()
    }

    /// Whether the cluster boundary names DHCP servers.
    fn fences_dhcp(&self) -> bool {
        self.bounds
            .as_ref()
            .is_some_and(|(c, _)| c.dhcp_servers.is_some())
    }
}

/// The interfaces of the agent's namespace that get a DHCP ingress chain
/// (every one but `lo`); those that cannot are logged. The input chains
/// still fence DHCP for kernel-socket clients whatever this finds.
fn dhcp_devices() -> Vec<String> {
    match nft::ingress_devices() {
        Ok((devices, left)) => {
            if !left.is_empty() {
                warn!(
                    event = "boundary-dhcp-interfaces-left-out",
                    interfaces = ?left,
                    "these interfaces get no DHCP ingress chain (a name nft cannot be given, or over {}): a rogue DHCP server on them is not kept from packet-socket clients",
                    nft::DHCP_DEVICES_MAX
                );
            }
            devices
        }
        Err(e) => {
            error!(error = %e, "cannot list the interfaces: no DHCP ingress chain");
            Vec::new()
        }
    }
}

struct Inner {
    snap: Arc<Snapshot>,
    /// Peer edits stored since `boundary.json` was last written.
    journal: journal::Journal,
    enforcer: Enforcer,
    last_change: Option<&'static str>,
    last_drift: Option<String>,
    /// Drifts found since start, the time of the last, and why the last
    /// could not be undone (cleared once the table checks out): `status`.
    drift: DriftRecord,
}

#[derive(Debug, Default, Clone)]
struct DriftRecord {
    count: u64,
    last_at: Option<u64>,
    unrepaired: Option<String>,
}

/// The boundaries of this node.
pub struct Boundaries {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// When the agent last changed the kernel table (see [`Boundaries::watch`]).
    changed_at: Mutex<Option<std::time::Instant>>,
    /// The conntrack mirror the cuts use, started at the first cut (None:
    /// could not subscribe to conntrack events; every cut dumps the table).
    tracker: std::sync::OnceLock<Option<Arc<conntrack::Tracker>>>,
}

/// A drift check triggered by a change notification waits until the agent
/// has made no change of its own for this long…
const CHECK_QUIET: Duration = Duration::from_millis(500);
/// …but not longer than this after the notification.
const CHECK_MAX_DELAY: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Boundaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Boundaries")
            .field("dir", &self.dir)
            .finish()
    }
}

fn change_name(c: Change) -> &'static str {
    match c {
        Change::Full => "full",
        Change::Elements => "elements",
        Change::Unchanged => "unchanged",
    }
}

/// Established inbound SSH sessions (peer addresses) of this network
/// namespace, from /proc/net/tcp{,6}: local port 22, state ESTABLISHED.
/// [`ssh_peers`], read at most once per [`SSH_SCAN_TTL`]: the scan costs
/// several ms (the kernel walks its whole connection hash table for each
/// read of /proc/net/tcp{,6}), which a burst of peer removals would pay on
/// every call. A session opened within the last second may go unwarned
/// (the warning is advice; the failsafe entries are the remedy).
fn ssh_peers_recent() -> Vec<IpAddr> {
    static CACHE: Mutex<Option<(std::time::Instant, Vec<IpAddr>)>> = Mutex::new(None);
    let mut c = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    match &*c {
        Some((at, peers)) if at.elapsed() < SSH_SCAN_TTL => peers.clone(),
        _ => {
            let peers = ssh_peers();
            *c = Some((std::time::Instant::now(), peers.clone()));
            peers
        }
    }
}

/// How long a scan of the open SSH sessions is reused.
const SSH_SCAN_TTL: Duration = Duration::from_secs(1);

fn ssh_peers() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != "01" || !f[1].ends_with(":0016") {
                continue;
            }
            let Some((hex, _)) = f[2].split_once(':') else {
                continue;
            };
            // The kernel prints each 32-bit word in host (little-endian) order.
            let words: Vec<u32> = (0..hex.len() / 8)
                .filter_map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
                .map(u32::swap_bytes)
                .collect();
            let ip = match (v6, words.as_slice()) {
                (false, [a]) => IpAddr::from(a.to_be_bytes()),
                (true, [a, b, c, d]) => {
                    let mut bytes = [0u8; 16];
                    for (i, w) in [a, b, c, d].iter().enumerate() {
                        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
                    }
                    let ip6 = std::net::Ipv6Addr::from(bytes);
                    ip6.to_ipv4_mapped().map_or(IpAddr::V6(ip6), IpAddr::V4)
                }
                _ => continue,
            };
            if !ip.is_loopback() {
                out.push(ip);
            }
        }
    }
    out
}

/// A leasehold table holding more than engines' chains is in the kernel
/// (a boundary the agent has not stored, e.g. its state was lost): not the
/// agent's to replace while no boundary is stored. A table of engines'
/// chains only is what an earlier agent left after `boundary remove`, and
/// is taken over. nft failing to list counts as foreign: replacing a table
/// the agent cannot read could lift someone's boundary (fail closed).
fn foreign_table() -> bool {
    let engine_chain = |c: &str| {
        ["engines_out", "engines_sub", "engines_in", "engines_node"].contains(&c)
            || c.strip_prefix("engine")
                .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
    };
    match nft::objects(&[]) {
        Ok((chains, _)) => chains.iter().any(|c| !engine_chain(c)),
        Err(e) => {
            warn!(error = %e, "cannot list the leasehold table's chains: taken as not the agent's");
            true
        }
    }
}

/// Parses the flow arguments of ExplainFlow; errors name the argument.
pub fn parse_flow(direction: &str, peer: &str, proto: &str, port: u16) -> Result<Flow, DocError> {
    let bad = |field: &str, reason: String| DocError::new(field, reason);
    let direction = match direction {
        "in" => Direction::In,
        "out" => Direction::Out,
        d => {
            return Err(bad(
                "direction",
                format!("{}: use in or out", leasehold_node::shown(d)),
            ))
        }
    };
    let peer: IpAddr = peer.parse().map_err(|_| {
        bad(
            "peer",
            format!("{} is not an IP address", leasehold_node::shown(peer)),
        )
    })?;
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        "other" => Proto::Other,
        p => {
            return Err(bad(
                "proto",
                format!("{}: use tcp, udp, icmp or other", leasehold_node::shown(p)),
            ))
        }
    };
    Ok(Flow {
        direction,
        peer,
        proto,
        port,
    })
}

/// Whether the policy admits `f` as a new flow: the one decision the
/// connection cut uses.
/// (No prebuilt `Admitter`: building it costs ≈7 ms at 100k peers, more
/// than deciding the few thousand flows a node usually tracks.)
fn admits(c: &Boundary, s: Option<&Boundary>, f: &Flow) -> bool {
    leasehold_netpolicy::check::admits(c, s, f)
}

/// Cuts the open connections (conntrack entries) the committed policy
/// would not admit as new, so that none keeps passing as established
/// (issue 13). `scope`: the address ranges whose admission the change
/// narrowed (a removal of peers; see [`conntrack::Tracker::cut`]), None:
/// any flow may have lost it. A failure leaves the change committed; it
/// is logged and returned as a warning for the caller.
fn cut_flows(
    tracker: Option<&conntrack::Tracker>,
    c: &Boundary,
    s: Option<&Boundary>,
    scope: Option<&[(IpAddr, IpAddr)]>,
) -> Option<String> {
    let started = Instant::now();
    // Failsafe flows are kept in either orientation (a session picked up
    // mid-stream from the node's reply is oriented node → peer).
    let failsafe = |f: &Flow| leasehold_netpolicy::check::first_match(&c.failsafe, f).is_some();
    let cut = match tracker {
        Some(t) => t.cut(scope, |f| admits(c, s, f), failsafe),
        None => conntrack::cut_with(|f| admits(c, s, f), failsafe),
    };
    match cut {
        Ok(cut) => {
            info!(
                event = "boundary-flows-cut",
                count = cut.cut,
                sockets_reset = cut.reset,
                tracked = cut.seen,
                from_mirror = cut.from_mirror,
                ms = started.elapsed().as_secs_f64() * 1000.0,
                "open connections the boundary does not admit were cut"
            );
            None
        }
        Err(e) => {
            error!(event = "boundary-flows-cut-failed", error = %e, "cannot cut the open connections the boundary does not admit");
            Some(format!(
                "open connections the new boundary does not admit may still pass: {e}"
            ))
        }
    }
}

/// The ranges a cut after removing `peers` looks at (see
/// [`conntrack::scope_of`]); None if one is not an address or CIDR.
fn removed_scope(peers: &[String]) -> Option<Vec<(IpAddr, IpAddr)>> {
    let mut out = Vec::new();
    for p in peers {
        let (f, lo, hi) = leasehold_netpolicy::model::parse_cidr(p).ok()?;
        out.extend(conntrack::scope_of(f, lo, hi));
    }
    Some(out)
}

impl Boundaries {
    /// Loads the stored policy (none stored: empty).
    pub fn load(dir: &Path) -> Result<Self, BoundaryError> {
        let path = dir.join(FILE);
        let mut base = None;
        let mut policy = match std::fs::read(&path) {
            Ok(text) => {
                let p: Policy =
                    serde_json::from_slice(&text).map_err(|e| BoundaryError::Damaged {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                base = Some(text);
                if p.format != leasehold_netpolicy::policy::FORMAT {
                    return Err(BoundaryError::Damaged {
                        path,
                        reason: format!(
                            "format {} (this agent reads {})",
                            p.format,
                            leasehold_netpolicy::policy::FORMAT
                        ),
                    });
                }
                p
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Policy::new(),
            Err(source) => return Err(BoundaryError::Io { path, source }),
        };
        let (journal, replayed) = journal::Journal::load(dir, base.as_deref(), &mut policy)
            .map_err(|reason| BoundaryError::Damaged {
                path: dir.join(journal::JOURNAL),
                reason,
            })?;
        if let Some(note) = &replayed.note {
            warn!(note = %note, "boundary peer journal");
        }
        if replayed.applied > 0 {
            info!(
                records = replayed.applied,
                "peer edits replayed from {}",
                journal::JOURNAL
            );
        }
        // A stored policy that no longer validates is reported by
        // apply_stored (the agent keeps serving, the kernel keeps its table).
        let snap = Snapshot::new(policy.clone()).unwrap_or(Snapshot {
            policy,
            ..Default::default()
        });
        Ok(Boundaries {
            dir: dir.to_owned(),
            changed_at: Mutex::new(None),
            tracker: std::sync::OnceLock::new(),
            inner: Mutex::new(Inner {
                snap: Arc::new(snap),
                journal,
                enforcer: Enforcer::new(Vec::new()),
                last_change: None,
                last_drift: None,
                drift: DriftRecord::default(),
            }),
        })
    }

    /// Cuts what `c`/`s` do not admit (see [`cut_flows`]).
    fn cut_flows(
        &self,
        c: &Boundary,
        s: Option<&Boundary>,
        scope: Option<&[(IpAddr, IpAddr)]>,
    ) -> Option<String> {
        cut_flows(self.tracker(), c, s, scope)
    }

    /// The conntrack mirror, started at the first use.
    fn tracker(&self) -> Option<&conntrack::Tracker> {
        self.tracker
            .get_or_init(|| {
                conntrack::Tracker::start()
                    .inspect_err(|e| warn!(error = %e, "cannot follow conntrack events; every connection cut dumps the whole table"))
                    .ok()
            })
            .as_deref()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the kernel half-done
        // (every change is one transaction): keep going with the data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `p` as the whole document (and drops the peer journal).
    fn save(&self, j: &mut journal::Journal, p: &Policy) -> Result<(), BoundaryError> {
        // Compact: at 100k peers pretty printing is 100k more lines to
        // write on every change, and nobody reads a file that size by eye.
        let bytes = serde_json::to_vec(p).map_err(|e| BoundaryError::Damaged {
            path: self.dir.join(FILE),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir, FILE, &bytes).map_err(|source| BoundaryError::Io {
            path: self.dir.join(FILE),
            source,
        })?;
        j.rewritten(&self.dir, &bytes);
        Ok(())
    }

    /// The current snapshot (reads compute from it without the lock).
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.lock().snap.clone()
    }

    /// Every kernel change of the boundaries goes through here (one place
    /// for what must follow a kernel change).
    fn apply_rules(&self, g: &mut Inner, rules: Ruleset) -> Result<(), BoundaryError> {
        *self.changed_at.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now());
        let c = g.enforcer.apply(rules)?;
        g.last_change = Some(change_name(c));
        Ok(())
    }

    /// Applies the stored policy (at start). Without a stored policy an
    /// existing table is left alone: only RemoveBoundary lifts it.
    pub fn apply_stored(&self) -> Result<(), BoundaryError> {
        let mut g = self.lock();
        // On every way out without the table loaded, the preloaded
        // engines' egress is forgotten: kept, a re-adopted engine's same
        // rules would read as "already in" and never reach nft (or its
        // checks for a foreign table).
        let forget_engines = |g: &mut Inner| Arc::make_mut(&mut g.snap).engines.clear();
        if g.snap.bounds.is_none() && g.snap.policy.cluster.is_some() {
            // Stored but no longer valid: say why.
            if let Err(e) = g.snap.policy.boundaries() {
                forget_engines(&mut g);
                return Err(e.into());
            }
        }
        if g.snap.bounds.is_none() && foreign_table() {
            // Not ours to replace, even with the engines' chains alone.
            warn!("a leasehold table is in the kernel but no boundary is stored; leaving it (landlordctl boundary remove lifts it)");
            forget_engines(&mut g);
            return Ok(());
        }
        let engines = g.snap.engines.len();
        if let Some(rs) = g.snap.ruleset() {
            let n = rs.elements();
            if let Err(e) = self.apply_rules(&mut g, rs) {
                if engines == 0 || g.snap.bounds.is_none() {
                    forget_engines(&mut g);
                    return Err(e);
                }
                // A recorded engine's cgroup that nft cannot resolve
                // must not keep the node's boundary out: the boundary
                // alone, and the engine runtime kills what it cannot
                // hold to its egress when it re-adopts it.
                error!(error = %e, engines, "the boundary with the recorded engines' egress was refused; applying the boundary alone");
                let snap = Arc::make_mut(&mut g.snap);
                snap.engines.clear();
                let Some(rs) = g.snap.ruleset() else {
                    return Err(e);
                };
                self.apply_rules(&mut g, rs)?;
            }
            info!(
                elements = n,
                engines = g.snap.engines.len(),
                "boundary applied"
            );
            if let Some((c, s)) = &g.snap.bounds {
                self.cut_flows(c, s.as_ref(), None);
            }
        }
        Ok(())
    }

    /// At start, before [`Boundaries::apply_stored`]: the egress rules of
    /// the engines recorded as running (their instances may be alive, and
    /// are held by these until the engine runtime re-adopts them), so the
    /// first table the agent loads already holds them (one transaction
    /// with the boundary). Nothing reaches the kernel here. Beyond
    /// [`nft::ENGINES_MAX`] the rest are left out (and logged): the runtime
    /// kills what it cannot hold when it re-adopts it.
    pub fn preload_engine_egress(&self, rules: Vec<EngineEgress>) {
        let mut g = self.lock();
        let snap = Arc::make_mut(&mut g.snap);
        for r in rules {
            if snap.engines.len() >= nft::ENGINES_MAX && !snap.engines.contains_key(&r.name) {
                warn!(engine = %r.name, "too many engines with egress rules; left out of the first table");
                continue;
            }
            snap.engines.insert(r.name.clone(), r);
        }
    }

    /// Changes the policy with `f`, applies it, stores it. Nothing changes
    /// (kernel or disk) unless every step succeeds.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut Policy) -> Result<T, DocError>,
    ) -> Result<(T, Vec<String>), BoundaryError> {
        // The document work (tenant-sized, the biggest cost of a change at
        // 100k peers) runs without the lock, so status reads and the drift
        // check never wait for it. Changes themselves are serialised by the
        // node controller, so the policy cannot move underneath.
        let mut next = self.snapshot().policy.clone();
        let out = f(&mut next)?;
        let mut next = Snapshot::new(next)?;
        next.engines = self.snapshot().engines.clone();
        let mut warnings = next
            .bounds
            .as_ref()
            .map(|(c, s)| Self::change_warnings(c, s.as_ref()))
            .unwrap_or_default();
        let mut rules = next.ruleset();
        let mut g = self.lock();
        if g.snap.engines != next.engines {
            // An engine launched or went meanwhile: its rules stay.
            next.engines = g.snap.engines.clone();
            rules = next.ruleset();
        }
        if let Some(rs) = rules {
            self.apply_rules(&mut g, rs)?;
        }
        if let Err(e) = self.save(&mut g.journal, &next.policy) {
            // Put the kernel back to the stored policy.
            if let Some(old) = g.snap.ruleset() {
                if let Err(e2) = self.apply_rules(&mut g, old) {
                    error!(error = %e2, "cannot restore the previous boundary after a failed save");
                }
            }
            return Err(e);
        }
        let next = Arc::new(next);
        g.snap = Arc::clone(&next);
        // Committed: cut what it does not admit, outside the lock, before
        // the caller is answered.
        drop(g);
        if let Some((c, s)) = &next.bounds {
            warnings.extend(self.cut_flows(c, s.as_ref(), None));
        }
        for w in &warnings {
            warn!(warning = %w, "boundary");
        }
        Ok((out, warnings))
    }

    /// Adds or removes peers: the document and the validated boundary are
    /// edited in place (cost in the peers given), the ruleset is built from
    /// the cached boundary, the kernel gets the element change, the policy
    /// is stored. On any failure the edit is undone (kernel and memory).
    pub fn edit_peers(
        &self,
        target: &str,
        peers: &[String],
        add: bool,
    ) -> Result<(usize, Vec<String>), BoundaryError> {
        let t_call = std::time::Instant::now();
        let mut g = self.lock();
        let t0 = std::time::Instant::now();
        let waited = t0 - t_call;
        let guard = &mut *g;
        // In place unless a read holds the snapshot right now (then a copy).
        let snap = Arc::make_mut(&mut guard.snap);
        let edit = snap.policy.edit_peers(target, peers, add)?;
        if edit.changed.is_empty() {
            guard.last_change = Some(change_name(Change::Unchanged));
            return Ok((0, Vec::new()));
        }
        snap.effective = std::sync::OnceLock::new();
        let undo = |snap: &mut Snapshot| {
            if let Some(doc) = snap.policy.cluster.as_mut() {
                crate::peer_index::undo_doc(doc, &edit);
            }
            if let (Some(doc), Some((c, _))) = (snap.policy.cluster.as_ref(), snap.bounds.as_mut())
            {
                snap.index.apply(&edit, doc, c, true);
            }
        };
        if let (Some(doc), Some((c, _))) = (snap.policy.cluster.as_ref(), snap.bounds.as_mut()) {
            snap.index.apply(&edit, doc, c, false);
        }
        // Adding peers cannot cut an open SSH session; removing some can
        // cut only theirs (and only their flows can have lost admission).
        let t_warn = Instant::now();
        let scope = if add {
            None
        } else {
            removed_scope(&edit.changed)
        };
        let warnings = snap
            .bounds
            .as_ref()
            .map(|(c, s)| {
                let mut w = if add {
                    Vec::new()
                } else {
                    self.removal_ssh_warnings(c, s.as_ref(), scope.as_deref())
                };
                w.extend(Self::failsafe_warnings(c));
                w
            })
            .unwrap_or_default();
        let warn_time = t_warn.elapsed();
        let t_edit = t0.elapsed();
        // Single hosts: the enforcer edits its sets in place and sends the
        // element change (no rebuild of the ruleset, no diff of two
        // 100k-host sets); anything else (a prefix, a group reference, a set
        // that appears or vanishes) builds the ruleset.
        let hosts: Option<Vec<(leasehold_netpolicy::model::Family, u128)>> = edit
            .changed
            .iter()
            .map(|p| match leasehold_netpolicy::model::parse_cidr(p) {
                Ok((f, lo, hi)) if lo == hi => Some((f, lo)),
                _ => None,
            })
            .collect();
        let fast = match (hosts, snap.bounds.as_ref()) {
            (Some(h), Some((c, _))) => {
                *self.changed_at.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(std::time::Instant::now());
                guard.enforcer.edit_cluster_hosts(c, &h)
            }
            _ => Ok(None),
        };
        let t_build = t0.elapsed();
        match fast {
            Ok(Some(c)) => guard.last_change = Some(change_name(c)),
            Ok(None) => {
                if let Some(rs) = snap.ruleset() {
                    if let Err(e) = self.apply_rules(guard, rs) {
                        undo(Arc::make_mut(&mut guard.snap));
                        return Err(e);
                    }
                }
            }
            Err(e) => {
                undo(snap);
                // The enforcer keeps checking against the rules the undone
                // policy gives (review: it had forgotten them).
                if let Some(rs) = snap.ruleset() {
                    guard.enforcer.expect(rs);
                }
                return Err(e.into());
            }
        }
        let t_apply = t0.elapsed();
        let snap = Arc::make_mut(&mut guard.snap);
        // A record of the edit (the same call, replayed at load onto the
        // same document), or now and then the whole document.
        let saved = if guard.journal.appends() {
            let record = journal::Record {
                target: target.to_owned(),
                add,
                peers: peers.to_vec(),
            };
            guard
                .journal
                .append(&self.dir, &record)
                .map_err(|source| BoundaryError::Io {
                    path: self.dir.join(journal::JOURNAL),
                    source,
                })
        } else {
            self.save(&mut guard.journal, &snap.policy)
        };
        let t_save = t0.elapsed();
        // Where a peer change spends its time (the bench reads these).
        let phases = |cut: Duration| {
            info!(
                event = "boundary-peers",
                add,
                changed = edit.changed.len(),
                lock_us = us(waited),
                edit_us = us(t_edit - warn_time),
                warn_us = us(warn_time),
                build_us = us(t_build - t_edit),
                apply_us = us(t_apply - t_build),
                save_us = us(t_save - t_apply),
                cut_us = us(cut),
                "peers changed"
            );
        };
        if let Err(e) = saved {
            phases(Duration::ZERO);
            undo(snap);
            if let Some(old) = snap.ruleset() {
                if let Err(e2) = self.apply_rules(guard, old) {
                    error!(error = %e2, "cannot restore the previous boundary after a failed save");
                }
            }
            return Err(e);
        }
        let committed = Arc::clone(&guard.snap);
        drop(g);
        // Added peers only widen: nothing to cut (and the ≈4 ms table
        // dump stays out of the one-peer path). Removals cut outside the lock.
        let mut warnings = warnings;
        let t_cut = Instant::now();
        if !add {
            if let Some((c, s)) = &committed.bounds {
                warnings.extend(self.cut_flows(c, s.as_ref(), scope.as_deref()));
            }
        }
        phases(t_cut.elapsed());
        for w in &warnings {
            warn!(warning = %w, "boundary");
        }
        Ok((edit.changed.len(), warnings))
    }

    /// Warnings for a new policy: open SSH sessions it cuts, failsafe
    /// entries open to every address.
    fn change_warnings(c: &Boundary, s: Option<&Boundary>) -> Vec<String> {
        let mut w = Self::ssh_warnings(c, s);
        w.extend(Self::failsafe_warnings(c));
        if c.dhcp_servers.as_ref().is_some_and(|d| d.is_empty()) {
            w.push("dhcp_servers is empty: the node accepts DHCP replies from no one (a lease cannot be renewed)".to_owned());
        }
        w
    }

    /// Failsafe entries open to every address of a family.
    fn failsafe_warnings(c: &Boundary) -> Vec<String> {
        let mut w = Vec::new();
        for e in &c.failsafe {
            let all4 = e.peers.v4.intervals() == [(0, u128::from(u32::MAX))];
            let all6 = e.peers.v6.intervals() == [(0, u128::MAX)];
            if all4 || all6 {
                w.push(format!(
                    "failsafe entry {:?} is open to every {} address: no boundary can cut it",
                    e.name,
                    match (all4, all6) {
                        (true, true) => "IPv4 and IPv6",
                        (true, false) => "IPv4",
                        _ => "IPv6",
                    }
                ));
            }
        }
        w
    }

    fn ssh_warnings(c: &Boundary, s: Option<&Boundary>) -> Vec<String> {
        Self::ssh_warnings_of(c, s, ssh_peers_recent())
    }

    /// [`Self::ssh_warnings`] for a removal of the peers in `scope`: only
    /// their sessions can be cut by it, found from the conntrack mirror
    /// (no scan of every TCP socket) when it is synced.
    fn removal_ssh_warnings(
        &self,
        c: &Boundary,
        s: Option<&Boundary>,
        scope: Option<&[(IpAddr, IpAddr)]>,
    ) -> Vec<String> {
        let found = match (scope, self.tracker()) {
            (Some(r), Some(t)) => t.open_at_port(22, r).unwrap_or_else(|e| {
                warn!(error = %e, "cannot look up the open SSH sessions of the removed peers");
                None
            }),
            _ => None,
        };
        Self::ssh_warnings_of(c, s, found.unwrap_or_else(ssh_peers_recent))
    }

    fn ssh_warnings_of(c: &Boundary, s: Option<&Boundary>, peers: Vec<IpAddr>) -> Vec<String> {
        peers
            .into_iter()
            .filter_map(|peer| {
                let f = Flow {
                    direction: Direction::In,
                    peer,
                    proto: Proto::Tcp,
                    port: 22,
                };
                let e = explain(c, s, &f);
                (!e.allowed).then(|| {
                    format!(
                        "this boundary cuts the open SSH session from {peer} (new connections from it to tcp/22 are {}; add a failsafe entry to keep it)",
                        e.reason
                    )
                })
            })
            .collect()
    }

    /// Installs (`Some`) or removes (`None`) the egress rules of engine
    /// `name`, in one transaction with the rest of the table; "already so"
    /// touches nothing. Without a node boundary the table holds the
    /// engines' chains alone. Refused (the engine must not run unconfined)
    /// when the stored boundary does not validate, when a leasehold table
    /// the agent did not load is in the kernel with no boundary stored, and
    /// beyond [`nft::ENGINES_MAX`] engines.
    pub fn set_engine_egress(
        &self,
        name: &str,
        rules: Option<EngineEgress>,
    ) -> Result<(), BoundaryError> {
        let mut g = self.lock();
        if g.snap.engines.get(name) == rules.as_ref() {
            return Ok(());
        }
        let mut next = Snapshot::clone(&g.snap);
        let adding = rules.is_some();
        match rules {
            Some(r) => {
                if !next.engines.contains_key(name) && next.engines.len() >= nft::ENGINES_MAX {
                    return Err(BoundaryError::EngineTooMany(name.to_owned()));
                }
                next.engines.insert(name.to_owned(), r);
            }
            None => {
                next.engines.remove(name);
            }
        }
        let no_table = |reason| BoundaryError::EngineNoTable {
            engine: name.to_owned(),
            reason,
        };
        if adding && next.bounds.is_none() && !g.enforcer.is_active() {
            if next.policy.cluster.is_some() {
                return Err(no_table(
                    "the stored node boundary does not validate (the kernel keeps its table)",
                ));
            }
            if foreign_table() {
                return Err(no_table(
                    "a leasehold table the agent did not load is in the kernel and no boundary is stored (landlordctl boundary remove lifts it)",
                ));
            }
        }
        match next.ruleset() {
            Some(rs) => self.apply_rules(&mut g, rs)?,
            // The last engine's rules went and no boundary is set: the
            // table held only them.
            None if next.bounds.is_none() && next.policy.cluster.is_none() => {
                if g.enforcer.is_active() {
                    g.enforcer.remove()?;
                    g.last_change = Some("removed");
                }
            }
            // The stored boundary does not validate: the kernel keeps its
            // table (nothing of ours to take out of it).
            None if !adding => {}
            None => {
                return Err(no_table(
                    "the stored node boundary does not validate (the kernel keeps its table)",
                ))
            }
        }
        g.snap = Arc::new(next);
        Ok(())
    }

    /// Lifts every boundary: removes the table, then the stored policy.
    /// Engines' egress rules stay: while any engine has them, the table is
    /// replaced by one holding only their chains, in one transaction, so
    /// no engine runs unconfined for a moment.
    pub fn remove(&self) -> Result<(), BoundaryError> {
        let mut g = self.lock();
        let kept = nft::Options {
            engines: g.snap.live_engines(),
            ..nft::Options::default()
        };
        match Ruleset::engines_only(&kept) {
            Some(rs) => {
                self.apply_rules(&mut g, rs)?;
                info!(
                    engines = kept.engines.len(),
                    "boundary lifted; the engines' egress rules stay in force"
                );
            }
            None => g.enforcer.remove()?,
        }
        if let Err(e) = self.save(&mut g.journal, &Policy::new()) {
            // Still stored: its table goes back, so that the kernel, the
            // status and the next start all say the same (not "enforced"
            // over a table without it).
            if let Some(rs) = g.snap.ruleset() {
                if let Err(back) = self.apply_rules(&mut g, rs) {
                    error!(error = %back, "the boundary could not be removed from the state and its table could not be put back: the drift check restores it");
                }
            }
            return Err(e);
        }
        g.last_change = Some("removed");
        // Nothing to revert to a lifted boundary.
        if let Err(e) = self.write_pending(None) {
            warn!(error = %e, "cannot remove the pending boundary revert");
        }
        let mut next = Snapshot::new(Policy::new())?;
        // Still in force (above), and in every table loaded next.
        next.engines = g.snap.engines.clone();
        g.snap = Arc::new(next);
        Ok(())
    }

    /// Drops the tenant's sub-boundary (the node changed hands).
    pub fn clear_sub(&self) -> Result<(), BoundaryError> {
        if self.snapshot().policy.sub.is_none() {
            return Ok(());
        }
        self.update(|p| {
            p.sub = None;
            Ok(())
        })
        .map(|_| ())
    }

    /// A cluster boundary is stored (its table should be in the kernel).
    pub fn has_cluster(&self) -> bool {
        self.snapshot().policy.cluster.is_some()
    }

    /// The enforcement status only (no documents): the reply of a peer
    /// change, which must not cost in the size of the boundary.
    pub fn status(&self) -> BoundaryInfo {
        let g = self.lock();
        let on = g.enforcer.is_active() && g.snap.bounds.is_some();
        BoundaryInfo {
            enforced: Some(on),
            elements: g.enforcer.elements().filter(|_| on).map(|n| n as u64),
            change: g.last_change.map(str::to_owned),
            last_drift: g.last_drift.clone(),
            drift_count: Some(g.drift.count),
            last_drift_at: g.drift.last_at,
            drift_unrepaired: g.drift.unrepaired.clone(),
            ..Default::default()
        }
    }

    /// Packets and bytes the table's deny rules dropped or rejected, by
    /// class (`nft::DENY_CLASSES`, every one), since the agent started:
    /// read from the kernel's named counters now (one netlink dump, no rule
    /// or element read), plus those of tables the agent replaced. None when
    /// the kernel cannot be asked.
    pub fn deny_counters(&self) -> Option<Vec<(&'static str, u64, u64)>> {
        let mut g = self.lock();
        match g.enforcer.deny_counters() {
            Ok(v) => Some(
                v.into_iter()
                    .map(|(c, d)| (c, d.packets, d.bytes))
                    .collect(),
            ),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the deny counters");
                None
            }
        }
    }

    /// What the caller may see: the landlord everything, the tenant its
    /// sub-boundary, the effective policy and the failsafe. Computed from
    /// the snapshot, outside the lock.
    pub fn info(&self, landlord: bool) -> BoundaryInfo {
        let (snap, status) = {
            let g = self.lock();
            // The boundary's table: one holding only engines' chains is
            // not a boundary.
            let on = g.enforcer.is_active() && g.snap.bounds.is_some();
            (
                g.snap.clone(),
                (
                    on,
                    g.enforcer.elements().filter(|_| on).map(|n| n as u64),
                    g.last_change.map(str::to_owned),
                    g.last_drift.clone(),
                    g.drift.clone(),
                ),
            )
        };
        let cluster = snap.policy.cluster.as_ref();
        let failsafe = cluster
            .map(|c| c.failsafe.iter().map(failsafe_line).collect())
            .unwrap_or_default();
        let effective = snap
            .effective
            .get_or_init(|| snap.policy.effective().ok().flatten().map(|e| to_json(&e)))
            .clone();
        BoundaryInfo {
            cluster: if landlord { cluster.map(to_json) } else { None },
            sub: snap.policy.sub.as_ref().map(to_json),
            effective,
            failsafe: Some(failsafe),
            enforced: Some(status.0),
            elements: status.1,
            change: status.2,
            cut: None,
            warnings: None,
            peers_changed: None,
            last_drift: status.3,
            drift_count: Some(status.4.count),
            last_drift_at: status.4.last_at,
            drift_unrepaired: status.4.unrepaired,
            revert_at: if landlord {
                self.pending_deadline()
            } else {
                None
            },
        }
    }

    /// Explains a flow; the tenant does not see cluster entry names.
    pub fn explain(&self, flow: &Flow, landlord: bool) -> Result<FlowVerdict, BoundaryError> {
        let snap = self.snapshot();
        let Some((c, s)) = snap.bounds.as_ref() else {
            if snap.policy.cluster.is_some() {
                snap.policy.boundaries()?;
            }
            return Ok(FlowVerdict {
                allowed: Some(true),
                reason: Some("allowed: no boundary is set on this node".into()),
                ..Default::default()
            });
        };
        let e = explain(c, s.as_ref(), flow);
        let reason = if landlord || e.failsafe.is_some() {
            e.reason.clone()
        } else {
            match (&e.cluster, &e.sub) {
                (None, _) => "denied by the landlord's cluster boundary".to_owned(),
                (Some(_), Some(None)) => {
                    "denied: no entry of the sub-boundary allows it".to_owned()
                }
                (Some(_), Some(Some(se))) => {
                    format!("allowed by sub-boundary entry {se:?} (and the cluster boundary)")
                }
                (Some(_), None) => "allowed by the cluster boundary (no sub-boundary)".to_owned(),
            }
        };
        Ok(FlowVerdict {
            allowed: Some(e.allowed),
            failsafe: e.failsafe,
            cluster: if landlord { e.cluster } else { None },
            sub: e.sub.map(|s| s.unwrap_or_default()),
            reason: Some(reason),
        })
    }

    /// Checks the kernel table; restores it if it was changed. Returns what
    /// was found when something was restored.
    pub fn check_and_restore(&self) -> Option<String> {
        let mut g = self.lock();
        self.follow_interfaces(&mut g);
        match g.enforcer.check() {
            Ok(None) => {
                g.drift.unrepaired = None;
                None
            }
            Ok(Some(drift)) => {
                let what = drift.to_string();
                g.drift.count += 1;
                g.drift.last_at = Some(revert::now_unix());
                warn!(event = "boundary-drift", what = %what, "the boundary was changed behind the agent's back; restoring");
                // The table as it should be now, not the text last loaded:
                // a cgroup that text named may be gone (the engines' unit
                // stopped), and nft would refuse it whole.
                let now = g.snap.ruleset();
                match g.enforcer.restore_with(now) {
                    Ok(()) => {
                        info!(event = "boundary-restored", "boundary restored");
                        // Connections opened while the table was gone.
                        if let Some((c, s)) = &g.snap.bounds {
                            self.cut_flows(c, s.as_ref(), None);
                        }
                        g.last_drift = Some(what.clone());
                        g.drift.unrepaired = None;
                        Some(what)
                    }
                    Err(e) => {
                        error!(error = %e, "cannot restore the boundary");
                        g.drift.unrepaired = Some(format!("{what}; restoring failed: {e}"));
                        None
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot check the boundary");
                None
            }
        }
    }

    /// With `dhcp_servers`, every interface needs its DHCP ingress chain:
    /// when the interfaces differ from those of the applied table (one
    /// appeared or went), the table is applied again with chains for the
    /// current ones (`event=boundary-dhcp-interfaces`).
    fn follow_interfaces(&self, g: &mut Inner) {
        if !g.snap.fences_dhcp() {
            return;
        }
        let Some(had) = g.enforcer.applied_rules().map(Ruleset::dhcp_devices) else {
            return;
        };
        let now = dhcp_devices();
        if now == had {
            return;
        }
        let Some(rs) = g.snap.ruleset() else {
            return;
        };
        match self.apply_rules(g, rs) {
            Ok(()) => info!(
                event = "boundary-dhcp-interfaces",
                interfaces = ?now,
                before = ?had,
                "interfaces changed: DHCP ingress chains follow"
            ),
            Err(e) => {
                error!(error = %e, "cannot apply the DHCP ingress chains for the current interfaces")
            }
        }
    }

    /// Watches for changes behind the agent's back. The kernel's nftables
    /// notifications report every commit with the objects it changed: one that another process
    /// made to the table triggers a check (which reads the table back and
    /// restores it); one that did not touch the table keeps the table's
    /// verified state, so the timer's check need not read the sets back
    /// (a set dump is ≈0.4 s at 100k hosts). A lost event only means a
    /// read-back at the next timer check. Restorations are reported on
    /// `restored`.
    pub fn watch(
        self: &Arc<Self>,
        interval: Duration,
        restored: tokio::sync::mpsc::UnboundedSender<String>,
    ) {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let link_tx = tx.clone();
        match monitor::Listener::open(nft::TABLE) {
            Ok(mut listener) => {
                let me = Arc::clone(self);
                std::thread::spawn(move || loop {
                    let g = match listener.wait() {
                        Ok(monitor::Event::Generation(g)) => g,
                        Ok(monitor::Event::Lost) => {
                            warn!("nftables notifications were lost; the next check reads the table back");
                            continue;
                        }
                        Err(e) => {
                            error!(error = %e, "cannot read nftables notifications; checking the boundary on the timer only");
                            return;
                        }
                    };
                    let seen = me.lock().enforcer.classify(&g);
                    if matches!(seen, Seen::Foreign | Seen::Unknown) {
                        warn!(
                            event = "boundary-foreign-commit",
                            generation = g.gen,
                            pid = g.pid,
                            process = g.comm.as_deref().unwrap_or("?"),
                            change = g.touched.as_deref().unwrap_or(""),
                            "another process changed the boundary table; checking it"
                        );
                        // Full: a check is already due.
                        let _ = tx.try_send(());
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "cannot subscribe to nftables notifications; checking the boundary on the timer only")
            }
        }
        // An interface appearing or going: a check, which gives it its
        // DHCP ingress chain when the cluster names DHCP servers (else
        // the check only reads the table; the timer also catches what an
        // overflowing subscriber queue lost).
        match leasehold_health::net::NetWatch::start() {
            Ok(w) => {
                let links = w.subscribe();
                let tx = link_tx;
                std::thread::spawn(move || {
                    let _keep = w;
                    for s in links.iter() {
                        use leasehold_health::net::NetEventKind as K;
                        if matches!(s.event.kind, K::LinkAdded | K::LinkRemoved) {
                            let _ = tx.try_send(());
                        }
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "cannot watch interfaces: DHCP ingress chains follow them on the timer only")
            }
        }
        let me = Arc::clone(self);
        std::thread::spawn(move || loop {
            match rx.recv_timeout(interval) {
                Ok(()) => {
                    // The check reads the whole table back under the lock
                    // (≈0.9 s at 100k peers): right after each of the
                    // agent's own changes it would hold up the next one.
                    // Wait for a quiet moment, bounded, so a burst of peer
                    // changes passes and drift is still seen within
                    // CHECK_MAX_DELAY.
                    let noticed = std::time::Instant::now();
                    loop {
                        let last = *me.changed_at.lock().unwrap_or_else(|p| p.into_inner());
                        let quiet = last.map_or(CHECK_QUIET, |t| t.elapsed());
                        if quiet >= CHECK_QUIET || noticed.elapsed() >= CHECK_MAX_DELAY {
                            break;
                        }
                        std::thread::sleep(
                            (CHECK_QUIET - quiet).min(CHECK_MAX_DELAY - noticed.elapsed()),
                        );
                    }
                    // Notifications of the changes waited for: one check.
                    while rx.try_recv().is_ok() {}
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(interval),
            }
            if let Some(what) = me.check_and_restore() {
                if restored.send(what).is_err() {
                    return;
                }
            }
        });
    }
}

/// The boundaries as the node controller's backend.
#[derive(Debug, Clone)]
pub struct BoundaryBackend(pub Arc<Boundaries>);

impl leasehold_node::backend::BoundaryStore for BoundaryBackend {
    fn change(
        &mut self,
        c: leasehold_node::BoundaryChange,
    ) -> Result<leasehold_node::BoundaryApplied, leasehold_node::Failure> {
        use leasehold_node::{BoundaryApplied, BoundaryChange as C, Failure, FailureKind};
        let b = &self.0;
        let applied = |w: Vec<String>| BoundaryApplied {
            warnings: w,
            ..Default::default()
        };
        let r = match c {
            C::SetCluster(doc) => b.set_cluster(doc, false, None).map(applied),
            C::SetClusterWith {
                doc,
                confirm,
                revert_after,
            } => b.set_cluster(doc, confirm, revert_after).map(applied),
            C::SetFailsafe(entries) => b.set_failsafe(entries, false).map(applied),
            C::SetFailsafeWith { entries, confirm } => {
                b.set_failsafe(entries, confirm).map(applied)
            }
            C::ConfirmPending => b.confirm_pending().map(|()| BoundaryApplied::default()),
            C::RevertPending { deadline } => b.revert_pending(deadline).map(|w| BoundaryApplied {
                warnings: w.into_iter().collect(),
                ..Default::default()
            }),
            C::EditPeers { target, peers, add } => {
                b.edit_peers(&target, &peers, add)
                    .map(|(n, w)| BoundaryApplied {
                        warnings: w,
                        peers_changed: Some(n),
                        ..Default::default()
                    })
            }
            C::Remove { .. } => b.remove().map(|()| BoundaryApplied::default()),
            C::SetSub { doc, narrow } => {
                let again = (!narrow).then(|| doc.clone());
                b.update(|p| p.set_sub(doc, narrow))
                    .map(|(out, w)| BoundaryApplied {
                        warnings: w,
                        cut: out.cut.iter().map(ToString::to_string).collect(),
                        peers_changed: None,
                    })
                    .map_err(|e| match (e, again) {
                        (BoundaryError::Invalid(de), Some(d))
                            if de.reason.contains("wider than the cluster boundary") =>
                        {
                            BoundaryError::Invalid(b.wider_refusal(&d).unwrap_or(de))
                        }
                        (e, _) => e,
                    })
            }
            C::ClearSub => b.clear_sub().map(|()| BoundaryApplied::default()),
        };
        r.map_err(|e| {
            let kind = match &e {
                BoundaryError::Invalid(_) => FailureKind::Invalid,
                BoundaryError::Unconfirmed(_) => FailureKind::Unconfirmed,
                BoundaryError::NoPending => FailureKind::NotFound,
                BoundaryError::Nft(ApplyError::Spawn(_)) => FailureKind::Unavailable,
                _ => FailureKind::Failed,
            };
            Failure::new(kind, e.to_string())
        })
    }

    /// The tenant's sub-boundary (already inside the cluster boundary),
    /// else the cluster boundary; None when no boundary is stored. A stored
    /// boundary that no longer validates cannot be told: refused (fail
    /// closed), as the engine's rules could not go in either.
    fn engine_egress_limit(
        &mut self,
    ) -> Result<Option<leasehold_netpolicy::Boundary>, leasehold_node::Failure> {
        let snap = self.0.snapshot();
        if snap.bounds.is_none() && snap.policy.cluster.is_some() {
            return Err(leasehold_node::Failure::new(
                leasehold_node::FailureKind::Unavailable,
                "the stored node boundary does not validate, so an engine's egress cannot be checked against it",
            ));
        }
        Ok(snap
            .bounds
            .as_ref()
            .map(|(cluster, sub)| sub.as_ref().unwrap_or(cluster).clone()))
    }
}

/// One failsafe entry as a line: `ssh: in 192.0.2.10 tcp 22`.
fn failsafe_line(e: &leasehold_netpolicy::model::EntryDoc) -> String {
    format!(
        "{}: {} {} {}",
        e.name,
        format!("{:?}", e.direction).to_lowercase(),
        e.peers.join(","),
        protocols_text(e.protocols.as_deref())
    )
}

/// Protocols as a person reads them: `tcp 80,443,8000-8080; icmp`.
pub(crate) fn protocols_text(ps: Option<&[leasehold_netpolicy::model::ProtoDoc]>) -> String {
    use leasehold_netpolicy::model::PortSpec;
    let Some(ps) = ps else {
        return "all protocols".to_owned();
    };
    ps.iter()
        .map(|p| match &p.ports {
            None => p.proto.name().to_owned(),
            Some(ports) => format!(
                "{} {}",
                p.proto.name(),
                ports
                    .iter()
                    .map(|x| match x {
                        PortSpec::Num(n) => n.to_string(),
                        PortSpec::Text(t) => t.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Microseconds, for log fields.
fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removing rules that are not there is "already so": nothing is run
    /// (no nft, no root needed). With rules, and without a boundary, the
    /// table holds the engines' chains alone (T1:
    /// `engines::tests::egress::real_engine_egress_holds_through_boundary_remove_and_replace`).
    #[test]
    fn removing_engine_egress_that_is_not_there_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let b = Boundaries::load(dir.path()).unwrap();
        b.set_engine_egress("web", None).unwrap();
        assert!(b.snapshot().engines.is_empty());
        assert_eq!(b.status().change, None);
    }

    /// T1 (root): the boundary owner with a real table, in a network
    /// namespace unshared by the test's thread, and a real cgroup2 dir: an
    /// engine's rules go in with the table, read back clean, stay through a
    /// boundary change, and come out again.
    /// With `dhcp_servers`, the table has a DHCP ingress chain for each
    /// interface of the namespace; one appearing or going is followed at
    /// the next check, called here by hand (in the agent the watcher's link
    /// events call it; that wiring is not under this test). A veth pair:
    /// this kernel has no dummy module. Without `dhcp_servers` no chain.
    #[test]
    #[ignore = "needs root: a network namespace and nftables"]
    fn dhcp_ingress_chains_follow_the_interfaces() {
        assert!(nix::unistd::geteuid().is_root(), "run as root");
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let ip = |args: &[&str]| {
                let o = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .unwrap();
                assert!(o.status.success(), "ip {args:?}: {o:?}");
            };
            let dir = tempfile::tempdir().unwrap();
            let b = Boundaries::load(dir.path()).unwrap();
            let doc = |dhcp: &str| {
                leasehold_netpolicy::BoundaryDoc::from_toml(&format!(
                    "{dhcp}action = \"drop\"\n[[allow]]\nname = \"lan\"\npeers = [\"10.0.0.0/8\"]\n"
                ))
                .unwrap()
            };
            let table = || nft::current(&[]).unwrap().unwrap_or_default();
            ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d0p"]);
            b.update(|p| p.set_cluster(doc("dhcp_servers = [\"10.0.0.1\"]\n")))
                .unwrap();
            assert!(
                table().contains("hook ingress device \"d0\""),
                "{}",
                table()
            );
            assert!(table().contains("leasehold: not a dhcp server"));
            assert_eq!(b.check_and_restore(), None, "reads back clean");
            // A new interface gets its chain at the next check…
            ip(&["link", "add", "d1", "type", "veth", "peer", "name", "d1p"]);
            assert_eq!(b.check_and_restore(), None);
            let t = table();
            assert!(
                t.contains("device \"d0\"") && t.contains("device \"d1\""),
                "{t}"
            );
            // …one gone loses it, and the table still reads back clean.
            ip(&["link", "del", "d0"]);
            assert_eq!(b.check_and_restore(), None);
            let t = table();
            assert!(
                !t.contains("device \"d0\"") && t.contains("device \"d1\""),
                "{t}"
            );
            assert_eq!(b.check_and_restore(), None);
            // Without dhcp_servers: no chain, no DHCP rule.
            b.update(|p| p.set_cluster(doc(""))).unwrap();
            assert!(!table().contains("dhcp server"), "{}", table());
            assert!(!table().contains("ingress"), "{}", table());
            ip(&["link", "add", "d2", "type", "veth", "peer", "name", "d2p"]);
            assert_eq!(b.check_and_restore(), None);
            assert!(!table().contains("ingress"), "{}", table());
        })
        .join()
        .unwrap();
    }

    /// A cluster document allowing `peers` (TOML array items), dropping
    /// the rest.
    fn lan(peers: &str) -> leasehold_netpolicy::BoundaryDoc {
        leasehold_netpolicy::BoundaryDoc::from_toml(&format!(
            "action = \"drop\"\n[[allow]]\nname = \"lan\"\npeers = [{peers}]\n"
        ))
        .unwrap()
    }

    /// The node guard through the boundary owner: the first engine of a
    /// subtree puts it in the table (with no node boundary: the engines'
    /// chains alone); another engine with the guard alone changes nothing
    /// in the kernel (the same table: the enforcer sends nothing, and the
    /// rules' handles stay); an engine with
    /// egress adds its chain; the guard goes with the last engine of its
    /// subtree, and the table with it when no boundary is set; a removed
    /// engines' tree does not block a boundary change, and a cgroup made
    /// again gets its rules loaded again.
    #[test]
    #[ignore = "needs root: a network namespace, nftables and cgroup v2"]
    fn real_node_guard_goes_in_once_per_subtree() {
        let mount = PathBuf::from(
            std::fs::read_to_string("/proc/self/mounts")
                .unwrap()
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
                })
                .expect("a cgroup2 hierarchy"),
        );
        let base = mount.join(format!("lh-agent-guard-{}", std::process::id()));
        let tenant = base.join("tenant");
        let dirs = ["web", "db", "api"].map(|n| tenant.join(n));
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
        }
        let (ds, m) = (dirs.clone(), mount.clone());
        let r = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let b = Boundaries::load(dir.path()).unwrap();
            let guard = |n: &str, d: &Path| {
                let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
                let mut e = EngineEgress::guard_only(n, &m, d).unwrap();
                e.cgroup_id = ino(d);
                e.subtree_id = ino(d.parent().unwrap());
                e
            };
            // With handles: a table applied again has new ones.
            let listed = || {
                let o = std::process::Command::new("nft")
                    .args(["-a", "list", "table", "inet", "leasehold"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&o.stdout).into_owned()
            };
            b.set_engine_egress("web", Some(guard("web", &ds[0])))
                .unwrap();
            let first = listed();
            assert!(first.contains("jump engines_node"), "{first}");
            assert!(!first.contains("chain landlord"), "{first}");
            assert_eq!(b.check_and_restore(), None, "reads back clean");
            b.set_engine_egress("db", Some(guard("db", &ds[1]))).unwrap();
            assert_eq!(listed(), first, "the same subtree: nothing applied");
            let egress = leasehold_netpolicy::BoundaryDoc::from_toml(
                "action = \"drop\"\n[[allow]]\nname = \"db\"\npeers = [\"10.1.2.3\"]\ndirection = \"out\"\n",
            )
            .unwrap()
            .validate(false)
            .unwrap();
            let api = EngineEgress::new("api", &m, &ds[2], egress).unwrap();
            b.set_engine_egress("api", Some(api)).unwrap();
            assert!(listed().contains("jump engine0"), "{}", listed());
            b.set_engine_egress("api", None).unwrap();
            let back = listed();
            assert!(!back.contains("jump engine0"), "{back}");
            b.set_engine_egress("db", None).unwrap();
            assert_eq!(listed(), back, "web still guards the subtree");
            assert_eq!(b.check_and_restore(), None);
            // The subtree and web made again under the same names (the
            // engines' unit restarted), nothing loaded in between: web's
            // next launch loads the table again (nft resolved the old
            // cgroups; equal text would have been "unchanged").
            let gone = |ds: &[PathBuf; 3]| {
                for d in ds {
                    let _ = std::fs::remove_dir(d);
                }
                std::fs::remove_dir(ds[0].parent().unwrap()).unwrap();
            };
            gone(&ds);
            std::fs::create_dir_all(&ds[0]).unwrap();
            b.set_engine_egress("web", Some(guard("web", &ds[0])))
                .unwrap();
            let again = listed();
            // nft lists a rule's cgroup by its path only while the id it
            // resolved at load is a live cgroup: a raw number here is a
            // rule for the removed one.
            let sub = ds[0]
                .parent()
                .unwrap()
                .strip_prefix(nft::CGROUP2_BASE)
                .unwrap()
                .display()
                .to_string();
            assert!(
                again.contains(&format!("level 2 \"{sub}\" jump engines_sub")),
                "{again}"
            );
            // The tree removed (the engines' unit stopped) after a table
            // naming it was loaded: the drift repair (the table deleted
            // behind the agent's back) and the landlord's next change both
            // load, without the engines' rules (nft refuses a table naming
            // a missing cgroup).
            b.update(|p| p.set_cluster(lan("\"10.0.0.0/8\"")))
                .unwrap();
            assert!(listed().contains("chain engines_node"), "{}", listed());
            gone(&ds);
            let o = std::process::Command::new("nft")
                .args(["delete", "table", "inet", "leasehold"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{o:?}");
            assert!(b.check_and_restore().is_some(), "drift found and repaired");
            let repaired = listed();
            assert!(repaired.contains("chain landlord_in"), "{repaired}");
            assert!(!repaired.contains("chain engines_node"), "{repaired}");
            b.update(|p| p.set_cluster(lan("\"10.0.0.0/8\", \"192.0.2.1\"")))
                .unwrap();
            assert!(!listed().contains("chain engines_node"), "{}", listed());
            assert_eq!(b.check_and_restore(), None);
            // Made again: its rules come back with its next launch.
            std::fs::create_dir_all(&ds[0]).unwrap();
            b.set_engine_egress("web", Some(guard("web", &ds[0])))
                .unwrap();
            assert!(listed().contains("jump engines_node"), "{}", listed());
            b.set_engine_egress("web", None).unwrap();
            assert!(!listed().contains("chain engines_node"), "{}", listed());
        })
        .join();
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        let _ = std::fs::remove_dir(&tenant);
        let _ = std::fs::remove_dir(&base);
        r.unwrap();
    }

    #[test]
    #[ignore = "needs root: a network namespace, nftables and cgroup v2"]
    fn real_engine_egress_goes_in_and_out_with_the_table() {
        assert!(nix::unistd::geteuid().is_root(), "run as root");
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let mount = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .expect("a cgroup2 hierarchy");
        let base = mount.join(format!("lh-agent-egress-{}", std::process::id()));
        let web = base.join("web");
        std::fs::create_dir_all(&web).unwrap();
        let (w, m) = (web.clone(), mount.clone());
        let r = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let b = Boundaries::load(dir.path()).unwrap();
            b.update(|p| p.set_cluster(lan("\"10.0.0.0/8\"")))
                .unwrap();
            let egress = leasehold_netpolicy::BoundaryDoc::from_toml(
                "action = \"drop\"\n[[allow]]\nname = \"db\"\npeers = [\"10.1.2.3\"]\ndirection = \"out\"\n",
            )
            .unwrap()
            .validate(false)
            .unwrap();
            let e = EngineEgress::new("web", &m, &w, egress).unwrap();
            b.set_engine_egress("web", Some(e.clone())).unwrap();
            let table = || nft::current(&[]).unwrap().unwrap_or_default();
            assert!(table().contains("jump engine0"), "{}", table());
            assert!(table().contains("leasehold: engine web denied"));
            assert_eq!(b.check_and_restore(), None, "reads back clean");
            b.update(|p| p.set_cluster(lan("\"10.0.0.0/8\", \"192.0.2.1\"")))
                .unwrap();
            assert!(table().contains("jump engine0"), "kept through a change");
            b.set_engine_egress("web", Some(e)).unwrap();
            b.set_engine_egress("web", None).unwrap();
            // Gone but the engines' deny counters, declared in every table.
            let bare = table()
                .replace("deny_engines_out", "")
                .replace("deny_engines_node", "");
            assert!(!bare.contains("engine"), "{bare}");
            assert!(table().contains("landlord_out"));
            assert_eq!(b.check_and_restore(), None);
        })
        .join();
        let _ = std::fs::remove_dir(&web);
        let _ = std::fs::remove_dir(&base);
        r.unwrap();
    }

    #[test]
    fn flow_arguments_are_checked_by_name() {
        assert!(parse_flow("in", "10.0.0.1", "tcp", 22).is_ok());
        assert_eq!(
            parse_flow("up", "10.0.0.1", "tcp", 22).unwrap_err().field,
            "direction"
        );
        assert_eq!(
            parse_flow("in", "10.0.0.300", "tcp", 22).unwrap_err().field,
            "peer"
        );
        assert_eq!(
            parse_flow("in", "fd00::1", "sctp", 22).unwrap_err().field,
            "proto"
        );
    }

    /// A 1 MiB argument comes back shortened, naming the argument.
    #[test]
    fn long_flow_arguments_are_echoed_truncated() {
        let long = "x".repeat(1 << 20);
        for (field, e) in [
            ("direction", parse_flow(&long, "10.0.0.1", "tcp", 22)),
            ("peer", parse_flow("in", &long, "tcp", 22)),
            ("proto", parse_flow("in", "10.0.0.1", &long, 22)),
        ] {
            let e = e.unwrap_err();
            assert_eq!(e.field, field);
            let e = e.to_string();
            assert!(e.len() < 300, "{field}: {} bytes", e.len());
            assert!(e.starts_with(&format!("{field}: ")), "{e}");
            assert!(e.contains("(1048576 bytes)"), "{e}");
        }
    }

    /// What sticks out of a tenant's sub-boundary is counted up to a bound
    /// (review: `check_sub`, a read the tenant may call, and the refusal of
    /// a wide `SetSub` computed every part of an 8 MiB document).
    #[test]
    fn a_wide_sub_boundary_is_counted_up_to_a_bound() {
        use leasehold_netpolicy::policy::{parse_doc, Policy};
        let dir = tempfile::tempdir().unwrap();
        let mut p = Policy::new();
        p.set_cluster(
            parse_doc(
                "[[allow]]\nname = \"c\"\npeers = [\"10.0.0.0/8\"]\nprotocols = [{ proto = \"tcp\", ports = [443] }]\n",
                "",
            )
            .unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join(FILE), serde_json::to_vec(&p).unwrap()).unwrap();
        let b = Boundaries::load(dir.path()).unwrap();
        let entries = |n: usize| {
            (0..n)
                .map(|i| format!("[[allow]]\nname = \"e{i}\"\npeers = [\"11.0.{}.{}\"]\nprotocols = [{{ proto = \"tcp\", ports = [443] }}]\n", i / 256, i % 256))
                .collect::<String>()
        };
        for (n, count, capped) in [(5, 10, false), (1500, 1001, true)] {
            let doc = parse_doc(&entries(n), "").unwrap();
            let v: serde_json::Value =
                serde_json::from_str(&b.check_sub(doc.clone()).unwrap()).unwrap();
            assert_eq!(v["wider_count"], count, "{n}");
            assert_eq!(v["wider_count_capped"], capped, "{n}");
            let e = b.wider_refusal(&doc).unwrap().to_string();
            assert_eq!(e.contains("more than 1000 parts"), capped, "{e}");
            assert_eq!(e.contains("; and more;"), capped, "{e}");
        }
    }

    #[test]
    fn stored_policy_round_trips_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let b = Boundaries::load(dir.path()).unwrap();
        assert!(b.snapshot().policy.cluster.is_none());
        std::fs::write(dir.path().join(FILE), "{\"format\": 9}").unwrap();
        let e = Boundaries::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("format 9"), "{e}");
    }
}
