//! Corrective actions on health faults (docs/health.md "Corrective
//! actions on the node"): `[[health.action]]` rules matched against each periodic
//! report, a cooldown per rule persisted in the state dir, and a signed
//! record of every action that touched the tenant's workloads.
//!
//! A rule fires when it starts matching (not on every report that still
//! matches), and only if its cooldown since its last firing has passed.
//! The firing is written to disk before the action runs, so a crash or
//! the reboot itself cannot make the agent fire it again on its next
//! start: at most one reboot per cooldown, across restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use leasehold_dbus_api::receipt_json;
use leasehold_health::{Fault, Severity, Source};
use leasehold_node::{Caller, Command, Node, Outcome, Request, StopReport, Throttle, Throttles};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

/// Most rules: each one is matched against every report.
pub const MAX_RULES: usize = 16;
/// Records kept; the oldest goes first.
pub const MAX_RECORDS: usize = 256;
/// Least cooldown of `reboot` and `poweroff`: a flapping sensor must not
/// keep the node in a reboot loop.
pub const MIN_POWER_COOLDOWN_SECS: u64 = 600;
/// Longest a hook may run before it is killed.
pub const MAX_HOOK_TIMEOUT_SECS: u64 = 300;
/// The cooldown key of engines' `on_failure = ["reboot-node"]` (a name
/// no configured rule may take).
pub const ENGINE_REBOOT_RULE: &str = "engines-reboot-node";
/// Least seconds between two reboots an engine asked for.
pub const ENGINE_REBOOT_COOLDOWN_SECS: u64 = 3600;
/// The body format of an action record.
pub const RECORD_FORMAT: u32 = 1;

/// What a rule does.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A journal line at the rule's priority (the landlord's
    /// `FaultsChanged` signal is sent by the collection anyway).
    Notify,
    /// Runs the rule's command (no shell) with the faults in its
    /// environment.
    Hook,
    /// Stops every tenant engine through the node controller.
    StopEngines,
    /// Reboots through logind.
    Reboot,
    /// Powers off through logind.
    Poweroff,
    /// Lowers the tenant subtree's `cpu.max` to `cpu_percent` of the
    /// budget's CPU while the fault lasts (level, not edge: see
    /// [`plan_throttles`]).
    ThrottleEngines,
}

impl Kind {
    /// The name in the configuration and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Notify => "notify",
            Kind::Hook => "hook",
            Kind::StopEngines => "stop-engines",
            Kind::Reboot => "reboot",
            Kind::Poweroff => "poweroff",
            Kind::ThrottleEngines => "throttle-engines",
        }
    }
}

/// The journal priority of a `notify` line.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// 5.
    Notice,
    /// 4.
    #[default]
    Warning,
    /// 3.
    Err,
}

/// One `[[health.action]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name (the cooldown's key, in logs and records).
    pub name: String,
    /// The fault source it matches (none: any).
    #[serde(default)]
    pub source: Option<Source>,
    /// The fault severity it matches, exactly (a sensor that is stuck is
    /// not a sensor that reads critical).
    pub severity: Severity,
    /// What it does.
    pub action: Kind,
    /// `notify`: the journal priority.
    #[serde(default)]
    pub priority: Priority,
    /// `hook`: absolute path of the program, then its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// `hook`: seconds before it is killed.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// `throttle-engines`: percent (1..=100) of the budget's CPU (of the
    /// node's CPUs when the budget sets none) the tenant keeps.
    #[serde(default)]
    pub cpu_percent: Option<u32>,
    /// Least seconds between two firings (persisted across restarts).
    /// Default 300; `reboot` and `poweroff` default to 3600 and take no
    /// less than 600.
    #[serde(default)]
    pub cooldown_secs: Option<u64>,
}

fn default_timeout() -> u64 {
    30
}

impl Rule {
    /// The cooldown that applies.
    pub fn cooldown(&self) -> u64 {
        match (self.cooldown_secs, self.action) {
            (Some(c), _) => c,
            (None, Kind::Reboot | Kind::Poweroff) => 3600,
            (None, _) => 300,
        }
    }

    /// A rule without `source` matches every source but `engines`: the
    /// tenant makes those faults at will (an engine crash-looping), and
    /// must not set off the landlord's actions, nor spend their cooldown
    /// so that a real fault finds the rule already on (review). Engines'
    /// faults are matched by a rule that names `engines`.
    fn matches(&self, f: &Fault) -> bool {
        self.severity == f.severity
            && self
                .source
                .map_or(f.source != Source::Engines, |s| s == f.source)
    }
}

/// Checks the rules; the message names the rule by index and name and the
/// field.
pub fn validate(rules: &[Rule]) -> Result<(), String> {
    if rules.len() > MAX_RULES {
        return Err(format!("{} rules, at most {MAX_RULES}", rules.len()));
    }
    let mut names = BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        let at = |field: &str, why: String| format!("[{i}] ({:?}).{field}: {why}", r.name);
        if r.name.is_empty()
            || r.name.len() > 64
            || !r
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(at("name", "1 to 64 of A-Z a-z 0-9 - _".into()));
        }
        if r.name == ENGINE_REBOOT_RULE {
            return Err(at("name", "reserved for engines' reboot-node".into()));
        }
        if !names.insert(r.name.as_str()) {
            return Err(at("name", "used by an earlier rule".into()));
        }
        if r.severity == Severity::Ok {
            return Err(at("severity", "\"ok\" is no fault".into()));
        }
        match r.action {
            Kind::Hook => {
                let Some(p) = r.command.first() else {
                    return Err(at("command", "a hook needs a command".into()));
                };
                if !Path::new(p).is_absolute() {
                    return Err(at("command", format!("{p} is not an absolute path")));
                }
                if !(1..=MAX_HOOK_TIMEOUT_SECS).contains(&r.timeout_secs) {
                    return Err(at(
                        "timeout_secs",
                        format!("{} is outside 1..={MAX_HOOK_TIMEOUT_SECS}", r.timeout_secs),
                    ));
                }
            }
            _ if !r.command.is_empty() => {
                return Err(at(
                    "command",
                    format!("only for \"hook\", not {:?}", r.action.as_str()),
                ));
            }
            _ => {}
        }
        match (r.action, r.cpu_percent) {
            (Kind::ThrottleEngines, None) => {
                return Err(at(
                    "cpu_percent",
                    "a throttle needs cpu_percent (1..=100)".into(),
                ));
            }
            (Kind::ThrottleEngines, Some(p)) if !(1..=100).contains(&p) => {
                return Err(at("cpu_percent", format!("{p} is outside 1..=100")));
            }
            (Kind::ThrottleEngines, Some(_)) | (_, None) => {}
            (k, Some(_)) => {
                return Err(at(
                    "cpu_percent",
                    format!("only for \"throttle-engines\", not {:?}", k.as_str()),
                ));
            }
        }
        let c = r.cooldown();
        if c > 7 * 86_400 {
            return Err(at("cooldown_secs", format!("{c} is above a week")));
        }
        if matches!(r.action, Kind::Reboot | Kind::Poweroff) && c < MIN_POWER_COOLDOWN_SECS {
            return Err(at(
                "cooldown_secs",
                format!("{c} is below {MIN_POWER_COOLDOWN_SECS} (a flapping sensor must not reboot the node in a loop)"),
            ));
        }
    }
    Ok(())
}

/// Errors of the action state and records.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The cooldown file is not what the agent writes.
    #[error("{path}: not a cooldown record: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The cooldown file: per rule, the unix second it last fired.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LimiterDoc {
    last: BTreeMap<String, u64>,
}

/// The rules' cooldowns, persisted in `<state dir>/actions.json`.
#[derive(Debug)]
pub struct Limiter {
    dir: PathBuf,
    doc: LimiterDoc,
    /// Each rule's time before its last `take`, for `give_back`.
    before: BTreeMap<String, Option<u64>>,
    /// When this process first saw the clock behind a rule's last firing.
    clock_back: BTreeMap<String, Instant>,
    /// Rules this process fired (a held rule fired before it started is
    /// taken as on: `Matcher::next`). Not by wall-clock time, which may be
    /// wrong at boot (review).
    taken_here: BTreeSet<String>,
}

const LIMITER_FILE: &str = "actions.json";

impl Limiter {
    /// Reads the cooldowns (none yet: none fired).
    pub fn load(state_dir: &Path) -> Result<Self, ActionError> {
        let path = state_dir.join(LIMITER_FILE);
        let doc = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ActionError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LimiterDoc::default(),
            Err(source) => return Err(ActionError::Io { path, source }),
        };
        Ok(Self {
            dir: state_dir.to_owned(),
            doc,
            before: BTreeMap::new(),
            clock_back: BTreeMap::new(),
            taken_here: BTreeSet::new(),
        })
    }

    /// A limiter that counts every rule of `rules` (and engines'
    /// reboot-node) as fired at `now`: what
    /// an unreadable cooldown file gives (fail closed: no reboot until a
    /// full cooldown has passed).
    pub fn closed(state_dir: &Path, rules: &[Rule], now: u64) -> Self {
        Self {
            dir: state_dir.to_owned(),
            doc: LimiterDoc {
                last: rules
                    .iter()
                    .map(|r| r.name.clone())
                    .chain([ENGINE_REBOOT_RULE.to_owned()])
                    .map(|n| (n, now))
                    .collect(),
            },
            before: BTreeMap::new(),
            clock_back: BTreeMap::new(),
            taken_here: BTreeSet::new(),
        }
    }

    /// Whether `rule` may fire at `now`; if so, the firing is written
    /// (atomically) before this returns. A write that fails refuses the
    /// firing: an action whose cooldown could not be kept does not run.
    pub fn take(&mut self, rule: &Rule, now: u64) -> Result<bool, ActionError> {
        self.take_at(rule, now, Instant::now())
    }

    /// [`Limiter::take`] with the monotonic clock's `mono` (tests).
    fn take_at(&mut self, rule: &Rule, now: u64, mono: Instant) -> Result<bool, ActionError> {
        if let Some(&last) = self.doc.last.get(&rule.name) {
            if now < last {
                // A clock set back counts as within the cooldown, kept on
                // disk (a node whose clock starts in the past at boot must
                // not take its last reboot as long ago, review). So that one
                // wrong jump forward does not hold the rule until that date,
                // the hold ends once a whole cooldown has passed on this
                // process's monotonic clock since the clock was seen back.
                let seen = *self.clock_back.entry(rule.name.clone()).or_insert(mono);
                if mono.saturating_duration_since(seen) < Duration::from_secs(rule.cooldown()) {
                    return Ok(false);
                }
            } else {
                self.clock_back.remove(&rule.name);
                if now < last.saturating_add(rule.cooldown()) {
                    return Ok(false);
                }
            }
        }
        self.clock_back.remove(&rule.name);
        let before = self.set_last(&rule.name, Some(now))?;
        self.before.insert(rule.name.clone(), before);
        self.taken_here.insert(rule.name.clone());
        Ok(true)
    }

    /// Whether this process fired `rule`.
    pub fn taken_here(&self, rule: &str) -> bool {
        self.taken_here.contains(rule)
    }

    /// Undoes `rule`'s last `take`: its action was not asked for (no
    /// signed record), so its cooldown is not spent (review: a reboot
    /// refused for want of a record waited a whole cooldown).
    pub fn give_back(&mut self, rule: &str) -> Result<(), ActionError> {
        let Some(before) = self.before.remove(rule) else {
            return Ok(());
        };
        // A write that fails leaves it spent, here as on disk (fail closed).
        self.set_last(rule, before).map(|_| ())
    }

    /// Records `rule`'s last firing as `t` (None: never) and writes the
    /// file; a write that fails puts the old value back. Returns it.
    fn set_last(&mut self, rule: &str, t: Option<u64>) -> Result<Option<u64>, ActionError> {
        let old = match t {
            Some(t) => self.doc.last.insert(rule.to_owned(), t),
            None => self.doc.last.remove(rule),
        };
        let bytes = serde_json::to_vec(&self.doc).unwrap_or_default();
        if let Err(source) = crate::fsutil::write_atomic(&self.dir, LIMITER_FILE, &bytes) {
            match old {
                Some(o) => self.doc.last.insert(rule.to_owned(), o),
                None => self.doc.last.remove(rule),
            };
            return Err(ActionError::Io {
                path: self.dir.join(LIMITER_FILE),
                source,
            });
        }
        Ok(old)
    }
}

/// A rule that fires now, with the faults it matched.
#[derive(Debug, Clone)]
pub struct Firing {
    /// The rule.
    pub rule: Rule,
    /// The faults.
    pub faults: Vec<Fault>,
}

/// Which rules match, report after report.
#[derive(Debug)]
pub struct Matcher {
    rules: Vec<Rule>,
    /// Rules that fired and still match.
    active: BTreeSet<String>,
    /// Rules that match but were held by their cooldown: tried again at
    /// each report, so one that still matches fires when the cooldown
    /// ends (review: marked active, it never fired while the fault
    /// lasted, however long).
    waiting: BTreeSet<String>,
}

impl Matcher {
    /// With the configured rules.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self {
            rules,
            active: BTreeSet::new(),
            waiting: BTreeSet::new(),
        }
    }

    /// The rules that start matching with this report, or matched while
    /// their cooldown held them, and whose cooldown has passed (their
    /// firing recorded in `limiter`). A rule that fired and still matches
    /// does not fire again; one that stopped matching may fire on its next
    /// match, cooldown permitting.
    pub fn next(&mut self, faults: &[Fault], limiter: &mut Limiter, now: u64) -> Vec<Firing> {
        let mut out = Vec::new();
        let mut active = BTreeSet::new();
        let mut waiting = BTreeSet::new();
        // Throttles last while their fault does: `plan_throttles`.
        for r in self
            .rules
            .iter()
            .filter(|r| r.action != Kind::ThrottleEngines)
        {
            let hit: Vec<Fault> = faults.iter().filter(|f| r.matches(f)).cloned().collect();
            if hit.is_empty() {
                continue;
            }
            if self.active.contains(&r.name) {
                active.insert(r.name.clone());
                continue;
            }
            match limiter.take(r, now) {
                Ok(true) => {
                    active.insert(r.name.clone());
                    out.push(Firing {
                        rule: r.clone(),
                        faults: hit,
                    });
                }
                // A rule held by a cooldown that a firing before this process
                // began (or an unreadable cooldown file) is taken as on: its fault is most likely the
                // one that fired it (a reboot rule's own reboot), and
                // waiting would fire it again each cooldown while the fault
                // lasts (review).
                Ok(false) if !limiter.taken_here(&r.name) => {
                    active.insert(r.name.clone());
                }
                Ok(false) => {
                    if !self.waiting.contains(&r.name) {
                        info!(
                            event = "health-action-cooldown",
                            rule = %r.name,
                            action = r.action.as_str(),
                            "a corrective action matched within its cooldown; not run (it runs when the cooldown ends if its fault is still there)"
                        );
                    }
                    waiting.insert(r.name.clone());
                }
                Err(e) => error!(
                    event = "health-action-refused",
                    rule = %r.name,
                    error = %e,
                    "a corrective action's cooldown cannot be recorded; not run"
                ),
            }
        }
        self.active = active;
        self.waiting = waiting;
        out
    }

    /// `rule`'s firing did not happen: it may fire at the next report.
    pub fn forget(&mut self, rule: &str) {
        self.active.remove(rule);
    }
}

/// What the `throttle-engines` rules want after one report.
#[derive(Debug, Clone)]
pub struct ThrottlePlan {
    /// Every throttle in force after it.
    pub next: Throttles,
    /// Rules whose throttle begins, with the faults that made it.
    pub begun: Vec<Firing>,
    /// Rules whose throttle ends (their fault cleared), with what it was.
    pub ended: Vec<(String, Throttle)>,
}

/// The throttles after a report. A throttle rule is a level, not an edge:
/// its throttle begins when it matches a fault and none of its own is in
/// force, and lasts while the rule matches. It ends on the first report
/// the rule no longer matches once it has lasted its cooldown
/// (`cooldown_secs`): a sensor hovering at a trip point keeps the tenant
/// throttled instead of lowering and restoring `cpu.max` (and signing two
/// records) on every report, and so there is at most one throttle per
/// rule per cooldown. A clock set back (`now` before its start) ends the
/// hold: the throttle then ends with its fault. A throttle whose rule is
/// no longer configured ends on the first report.
pub fn plan_throttles(
    rules: &[Rule],
    current: &Throttles,
    faults: &[Fault],
    now: u64,
) -> ThrottlePlan {
    let mut next = Throttles::default();
    let mut begun = Vec::new();
    let mut ended = Vec::new();
    for r in rules.iter().filter(|r| r.action == Kind::ThrottleEngines) {
        let Some(pct) = r.cpu_percent.and_then(|p| u8::try_from(p).ok()) else {
            continue;
        };
        let hit: Vec<Fault> = faults.iter().filter(|f| r.matches(f)).cloned().collect();
        match current.0.get(&r.name) {
            Some(t) if !hit.is_empty() => {
                // The configured percent (a restart may have changed it).
                let t = Throttle {
                    cpu_percent: pct,
                    since: t.since,
                };
                next.0.insert(r.name.clone(), t);
            }
            Some(t) => {
                let held = now >= t.since && now < t.since.saturating_add(r.cooldown());
                if held {
                    next.0.insert(r.name.clone(), *t);
                } else {
                    ended.push((r.name.clone(), *t));
                }
            }
            None if !hit.is_empty() => {
                next.0.insert(
                    r.name.clone(),
                    Throttle {
                        cpu_percent: pct,
                        since: now,
                    },
                );
                begun.push(Firing {
                    rule: r.clone(),
                    faults: hit,
                });
            }
            None => {}
        }
    }
    for (name, t) in &current.0 {
        let configured = rules
            .iter()
            .any(|r| r.action == Kind::ThrottleEngines && &r.name == name);
        if !configured {
            ended.push((name.clone(), *t));
        }
    }
    ThrottlePlan { next, begun, ended }
}

/// The body of a record, signed with the node's receipt key. Field order
/// and names are the wire format.
#[derive(Debug, Clone, Serialize)]
pub struct RecordBody {
    /// [`RECORD_FORMAT`].
    pub format: u32,
    /// Always "health-action" (never an erase receipt).
    pub kind: String,
    /// Node id.
    pub node_id: String,
    /// Seconds since the epoch.
    pub time: u64,
    /// The rule's name.
    pub rule: String,
    /// What was done.
    pub action: String,
    /// The tenant's key fingerprint then (None: no tenant): the tenant
    /// whose `ListActionRecords` shows the record.
    pub tenant_key: Option<String>,
    /// The faults that made it.
    pub faults: Vec<Fault>,
    /// `stop-engines`: what stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engines: Option<StopReport>,
    /// `throttle-engines`, `unthrottle-engines`: the rule's percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u8>,
    /// `throttle-engines`, `unthrottle-engines`: the subtree's `cpu.max`
    /// after it ("QUOTA PERIOD", "max PERIOD").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<String>,
    /// Fingerprint of the node signing key.
    pub signer: String,
}

/// The records under `<state dir>/health-actions/`, at most
/// [`MAX_RECORDS`].
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    /// `<state_dir>/health-actions`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("health-actions"),
        }
    }

    /// Keeps a signed record (atomic write, in the receipts' JSON
    /// spelling so `verify-receipt` checks it), then drops the oldest
    /// beyond the bound. Returns its id.
    pub fn store(&self, body: &str, time: u64, signature: &str) -> Result<String, ActionError> {
        let io = |path: PathBuf| move |source| ActionError::Io { path, source };
        std::fs::create_dir_all(&self.dir).map_err(io(self.dir.clone()))?;
        let mut n = 0u32;
        let id = loop {
            let id = format!("{time}-{n}");
            if !self.dir.join(format!("{id}.json")).exists() {
                break id;
            }
            n += 1;
        };
        let mut doc = serde_json::Map::new();
        doc.insert(receipt_json::BODY.into(), body.into());
        doc.insert(receipt_json::SIGNATURE.into(), signature.into());
        let name = format!("{id}.json");
        crate::fsutil::write_atomic(
            &self.dir,
            &name,
            serde_json::Value::Object(doc).to_string().as_bytes(),
        )
        .map_err(io(self.dir.join(&name)))?;
        let ids = self.ids()?;
        for old in ids.iter().take(ids.len().saturating_sub(MAX_RECORDS)) {
            let p = self.dir.join(format!("{old}.json"));
            if let Err(e) = std::fs::remove_file(&p) {
                warn!(path = %p.display(), error = %e, "cannot drop an old action record");
            }
        }
        Ok(id)
    }

    /// Record ids, oldest first.
    pub fn ids(&self) -> Result<Vec<String>, ActionError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(ActionError::Io {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut ids: Vec<(u64, u32, String)> = rd
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter_map(|n| {
                let id = n.strip_suffix(".json")?;
                let (t, k) = id.split_once('-')?;
                Some((t.parse().ok()?, k.parse().ok()?, id.to_owned()))
            })
            .collect();
        ids.sort();
        Ok(ids.into_iter().map(|(_, _, id)| id).collect())
    }

    /// The stored document of `id` (`{"receipt": …, "receipt_signature": …}`).
    pub fn read(&self, id: &str) -> Result<String, ActionError> {
        let path = self.dir.join(format!("{id}.json"));
        std::fs::read_to_string(&path).map_err(|source| ActionError::Io { path, source })
    }

    /// The records made while the tenant with key fingerprint
    /// `tenant_key` was assigned, oldest first. A file that does not read
    /// back as a record is skipped (logged): one bad file must not hide
    /// the others.
    pub fn list_for(&self, tenant_key: &str) -> Result<Vec<StoredRecord>, ActionError> {
        let mut out = Vec::new();
        for id in self.ids()? {
            match self.read(&id).map(|t| parse_stored(&id, &t)) {
                Ok(Some(r)) if r.tenant_key.as_deref() == Some(tenant_key) => out.push(r),
                Ok(Some(_)) => {}
                Ok(None) => warn!(record = %id, "an action record does not read back; skipped"),
                Err(e) => warn!(error = %e, "an action record cannot be read; skipped"),
            }
        }
        Ok(out)
    }
}

/// One stored record, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Id (file name without `.json`).
    pub id: String,
    /// From the body.
    pub time: u64,
    /// From the body.
    pub action: String,
    /// From the body.
    pub signer: String,
    /// From the body.
    pub tenant_key: Option<String>,
    /// The body, exactly as signed.
    pub body: String,
    /// Base64 signature.
    pub signature: String,
}

fn parse_stored(id: &str, text: &str) -> Option<StoredRecord> {
    let doc: serde_json::Value = serde_json::from_str(text).ok()?;
    let body = doc.get(receipt_json::BODY)?.as_str()?.to_owned();
    let signature = doc.get(receipt_json::SIGNATURE)?.as_str()?.to_owned();
    let b: serde_json::Value = serde_json::from_str(&body).ok()?;
    let s = |k: &str| {
        b.get(k)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    Some(StoredRecord {
        id: id.to_owned(),
        time: b.get("time")?.as_u64()?,
        action: s("action")?,
        signer: s("signer")?,
        tenant_key: s("tenant_key"),
        body,
        signature,
    })
}

/// What runs the actions: the node controller (engines, signing), the
/// bus (logind) and the record store.
pub struct Runner {
    /// The controller.
    pub node: Arc<Node>,
    /// The system bus (logind).
    pub conn: zbus::Connection,
    /// Where records go.
    pub records: RecordStore,
}

/// The agent as the caller of its own commands (for the controller's log).
const AGENT: Caller = Caller {
    role: leasehold_tpm::Role::Landlord,
    uid: 0,
};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Runner {
    async fn submit(&self, command: Command) -> Result<Outcome, String> {
        self.node
            .submit(Request {
                caller: AGENT,
                command,
                received: SystemTime::now(),
            })
            .await
            .map_err(|e| e.to_string())
    }

    /// Signs and keeps the record of an action that touched the tenant.
    async fn record(&self, f: &Firing, engines: Option<StopReport>) -> Result<String, String> {
        self.record_as(f, f.rule.action.as_str(), engines, None)
            .await
    }

    /// [`Runner::record`] under another action name, with a throttle's
    /// percent and resulting `cpu.max`.
    async fn record_as(
        &self,
        f: &Firing,
        action: &str,
        engines: Option<StopReport>,
        throttle: Option<(u8, String)>,
    ) -> Result<String, String> {
        let snap = self.node.snapshot();
        let (cpu_percent, cpu_max) = throttle.map_or((None, None), |(p, c)| (Some(p), Some(c)));
        let body = RecordBody {
            format: RECORD_FORMAT,
            kind: "health-action".into(),
            node_id: snap.status.node_id.clone(),
            time: unix_now(),
            rule: f.rule.name.clone(),
            action: action.into(),
            tenant_key: snap.status.tenant.as_ref().map(|t| t.fingerprint.clone()),
            faults: f.faults.clone(),
            engines,
            cpu_percent,
            cpu_max,
            signer: snap.receipt_key.fingerprint.clone(),
        };
        let text = serde_json::to_string(&body).map_err(|e| e.to_string())?;
        let signature = match self
            .submit(Command::SignRecord { body: text.clone() })
            .await?
        {
            Outcome::Signed { signature } => signature,
            other => return Err(format!("unexpected outcome {other:?}")),
        };
        self.records
            .store(&text, body.time, &signature)
            .map_err(|e| e.to_string())
    }

    /// Sets the throttles a plan wants, then signs a record of each that
    /// began or ended. Returns what is in force (unchanged when the
    /// runtime refused: the next report tries again).
    async fn throttle(&self, current: &Throttles, plan: ThrottlePlan) -> Throttles {
        let a = match self
            .submit(Command::ThrottleEngines {
                throttles: plan.next.clone(),
            })
            .await
        {
            Ok(Outcome::Throttled(a)) => a,
            Ok(other) => {
                error!(event = "health-action-failed", action = "throttle-engines", outcome = ?other, "unexpected outcome");
                return current.clone();
            }
            Err(e) => {
                error!(event = "health-action-failed", action = "throttle-engines", error = %e, "the tenant's cpu.max cannot be set; tried again on the next report");
                return current.clone();
            }
        };
        if let Some(e) = &a.error {
            warn!(event = "health-action", action = "throttle-engines", error = %e, "the throttle is recorded but not written on the subtree yet (every engine launch writes it first)");
        }
        for f in &plan.begun {
            let pct = f
                .rule
                .cpu_percent
                .and_then(|p| u8::try_from(p).ok())
                .unwrap_or(100);
            match self
                .record_as(f, "throttle-engines", None, Some((pct, a.cpu_max.clone())))
                .await
            {
                Ok(id) => {
                    warn!(event = "health-action", rule = %f.rule.name, action = "throttle-engines", cpu_max = %a.cpu_max, record = %id, "corrective action: tenant subtree throttled")
                }
                Err(e) => {
                    error!(event = "health-action", rule = %f.rule.name, error = %e, "tenant throttled; its record was not kept")
                }
            }
        }
        for (name, t) in &plan.ended {
            let rule = self_rule(name);
            let f = Firing {
                rule,
                faults: Vec::new(),
            };
            match self
                .record_as(
                    &f,
                    "unthrottle-engines",
                    None,
                    Some((t.cpu_percent, a.cpu_max.clone())),
                )
                .await
            {
                Ok(id) => {
                    info!(event = "health-action", rule = %name, action = "unthrottle-engines", cpu_max = %a.cpu_max, record = %id, "corrective action: the fault cleared, tenant throttle lifted")
                }
                Err(e) => {
                    error!(event = "health-action", rule = %name, error = %e, "tenant throttle lifted; its record was not kept")
                }
            }
        }
        a.throttles
    }

    /// Runs one firing. Errors are logged: the next report goes on.
    /// False: a reboot or power-off was not asked for (no signed record),
    /// so its cooldown is given back.
    pub async fn run(&self, f: Firing) -> bool {
        let r = &f.rule;
        let faults = serde_json::to_string(&f.faults).unwrap_or_else(|_| "[]".into());
        match r.action {
            Kind::Notify => match r.priority {
                Priority::Err => {
                    error!(event = "health-action", rule = %r.name, faults = %faults, "corrective action: notify")
                }
                Priority::Warning => {
                    warn!(event = "health-action", rule = %r.name, faults = %faults, "corrective action: notify")
                }
                Priority::Notice => {
                    info!(event = "health-action", rule = %r.name, faults = %faults, "corrective action: notify")
                }
            },
            // Its own task: a slow hook must not hold the next report.
            Kind::Hook => {
                let r = r.clone();
                tokio::spawn(async move {
                    run_hook(&r, &faults).await;
                });
            }
            Kind::StopEngines => {
                let stopped = match self.submit(Command::StopEngines).await {
                    Ok(Outcome::EnginesStopped(s)) => s,
                    Ok(other) => StopReport {
                        error: Some(format!("unexpected outcome {other:?}")),
                        ..StopReport::default()
                    },
                    Err(e) => StopReport {
                        error: Some(e),
                        ..StopReport::default()
                    },
                };
                match self.record(&f, Some(stopped)).await {
                    Ok(id) => {
                        warn!(event = "health-action", rule = %r.name, action = "stop-engines", record = %id, "corrective action: engines stopped")
                    }
                    Err(e) => {
                        error!(event = "health-action", rule = %r.name, error = %e, "engines stopped; their record was not kept")
                    }
                }
            }
            // Never a firing: `Actions::on_report` plans throttles.
            Kind::ThrottleEngines => {}
            Kind::Reboot | Kind::Poweroff => {
                // The record first: the tenant reads it after the reboot.
                // Without it the reboot does not happen (the tenant would
                // not learn why its workloads stopped).
                let id = match self.record(&f, None).await {
                    Ok(id) => id,
                    Err(e) => {
                        error!(event = "health-action-refused", rule = %r.name, error = %e, "no signed record: the node is not rebooted or powered off");
                        return false;
                    }
                };
                let p = if r.action == Kind::Reboot {
                    crate::power::PowerAction::Reboot
                } else {
                    crate::power::PowerAction::PowerOff
                };
                warn!(event = "health-action", rule = %r.name, action = r.action.as_str(), record = %id, faults = %faults, "corrective action: asking logind");
                // Its cooldown stays spent: the record is signed, and a reply
                // lost while the reboot goes ahead must not fire it again
                // after the boot (review).
                if let Err(e) = crate::power::run(&self.conn, p).await {
                    error!(event = "health-action-failed", rule = %r.name, error = %e, "logind did not take the power action");
                }
            }
        }
        true
    }
}

/// How a hook ended ([`run_hook`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HookEnd {
    /// Not started (its error).
    NotStarted(String),
    /// Exited with this status (`success` or not), within its timeout.
    Exited { success: bool, status: String },
    /// Still running at `timeout_secs`: killed, its process group with it.
    TimedOut,
    /// Its end could not be watched or read (the group was killed).
    Unknown(String),
}

/// What [`run_hook`] did: how the hook ended, and whether processes of its
/// group were left and killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HookRun {
    pub end: HookEnd,
    /// Processes of the hook's group were still there once it had exited:
    /// killed. (At a timeout the group is killed whatever it holds.)
    pub leftovers_killed: bool,
}

/// Runs a rule's hook: its own process group, ended — the group with it —
/// when the hook ends or at `timeout_secs`. Nothing a hook starts in its
/// group outlives it, as a oneshot unit's control group does not: a process
/// left in the background would keep what it inherited (the agent's TPM
/// connection mid-command, on swtpm: every later TPM command would wait;
/// docs/engines.md) and run unwatched. A process that leaves the group
/// (`setsid`, `setpgid`) is not followed (docs/health.md).
async fn run_hook(r: &Rule, faults: &str) -> HookRun {
    let run = hook_run(r, faults).await;
    match &run.end {
        HookEnd::NotStarted(e) => {
            error!(event = "health-action-failed", rule = %r.name, program = %r.command.first().map(String::as_str).unwrap_or(""), error = %e, "the hook did not start");
        }
        HookEnd::Exited { success: true, .. } => {
            info!(event = "health-action", rule = %r.name, action = "hook", "corrective action: hook ran");
        }
        HookEnd::Exited { status, .. } => {
            warn!(event = "health-action-failed", rule = %r.name, status = %status, "the hook failed");
        }
        HookEnd::TimedOut => {
            warn!(event = "health-action-failed", rule = %r.name, timeout_secs = r.timeout_secs, "the hook timed out and was killed, its process group with it");
        }
        HookEnd::Unknown(e) => {
            warn!(event = "health-action-failed", rule = %r.name, error = %e, "the hook's status is unknown; its process group was killed");
        }
    }
    if run.leftovers_killed && !matches!(run.end, HookEnd::TimedOut) {
        warn!(event = "health-action", rule = %r.name, "the hook left processes running in its group: killed");
    }
    run
}

async fn hook_run(r: &Rule, faults: &str) -> HookRun {
    let not_started = |e: String| HookRun {
        end: HookEnd::NotStarted(e),
        leftovers_killed: false,
    };
    let Some((prog, args)) = r.command.split_first() else {
        return not_started("no command".into());
    };
    let child = tokio::process::Command::new(prog)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LEASEHOLD_RULE", &r.name)
        .env("LEASEHOLD_SEVERITY", r.severity.as_str())
        .env("LEASEHOLD_FAULTS", faults)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return not_started(e.to_string()),
    };
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        let _ = child.kill().await;
        return HookRun {
            end: HookEnd::Unknown("no pid".into()),
            leftovers_killed: false,
        };
    };
    // The hook's exit, seen without reaping it (a pidfd is readable once
    // the process has exited): until it is reaped its pid, the group's id,
    // cannot be reused, so the group's kill below reaches only the hook's.
    // A blocking thread: tokio's AsyncFd takes an owned descriptor only
    // through an `unsafe` constructor, and hooks are rare.
    let timeout = Duration::from_secs(r.timeout_secs);
    let ended = tokio::task::spawn_blocking(move || exit_within(pid, timeout))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    // Exited: only the group's others can be running still (the hook is a
    // zombie, which a signal succeeds on: so they are counted first, for
    // the log). Timed out or unwatched: the hook and its group.
    let leftovers_killed = matches!(ended, Ok(true)) && group_has_others(pid);
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let status = child.wait().await;
    let end = match (ended, status) {
        (Ok(false), _) => HookEnd::TimedOut,
        (Err(e), _) => HookEnd::Unknown(format!("its exit could not be watched: {e}")),
        (Ok(true), Ok(st)) => HookEnd::Exited {
            success: st.success(),
            status: st.to_string(),
        },
        (Ok(true), Err(e)) => HookEnd::Unknown(e.to_string()),
    };
    HookRun {
        end,
        leftovers_killed,
    }
}

/// Whether a process other than `leader`, not a zombie, is in process
/// group `leader` (a scan of /proc: for the log only).
fn group_has_others(leader: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p != leader)
        .any(|p| {
            // After the command's closing parenthesis: state, ppid, pgrp.
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|st| {
                    let (_, rest) = st.rsplit_once(')')?;
                    let mut f = rest.split_whitespace();
                    let state = f.next()?;
                    let pgrp: i32 = f.nth(1)?.parse().ok()?;
                    Some(pgrp == leader && state != "Z" && state != "X")
                })
                .unwrap_or(false)
        })
}

/// Whether process `pid` (a child not yet reaped) exits within `timeout`,
/// watched through a pidfd; not reaped.
fn exit_within(pid: i32, timeout: Duration) -> std::io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let pid = rustix::process::Pid::from_raw(pid).ok_or(rustix::io::Errno::SRCH)?;
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ts = Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The rule a record of an ended throttle names (only its name is used).
fn self_rule(name: &str) -> Rule {
    Rule {
        name: name.to_owned(),
        source: None,
        severity: Severity::Warning,
        action: Kind::ThrottleEngines,
        priority: Priority::default(),
        command: Vec::new(),
        timeout_secs: default_timeout(),
        cooldown_secs: None,
        cpu_percent: None,
    }
}

/// The actions of one agent: matcher, limiter, runner, and the throttles
/// in force.
pub struct Actions {
    matcher: Matcher,
    limiter: Limiter,
    runner: Runner,
    rules: Vec<Rule>,
    /// As the engine runtime recorded them (read back at start: an agent
    /// restart neither forgets nor lifts a throttle in force).
    throttles: Throttles,
}

impl Actions {
    /// Loads the cooldowns; an unreadable file counts every rule as just
    /// fired (logged).
    pub fn new(rules: Vec<Rule>, state_dir: &Path, runner: Runner) -> Self {
        let limiter = Limiter::load(state_dir).unwrap_or_else(|e| {
            error!(error = %e, "the corrective actions' cooldowns are unreadable; every rule waits a full cooldown");
            Limiter::closed(state_dir, &rules, unix_now())
        });
        let throttles = runner.node.throttles();
        if let Some(p) = throttles.cpu_percent() {
            warn!(event = "health-action", cpu_percent = p, rules = ?throttles.0.keys().collect::<Vec<_>>(), "a throttle of the tenant is in force since before this start; it lasts until its fault clears");
        }
        Self {
            matcher: Matcher::new(rules.clone()),
            limiter,
            runner,
            rules,
            throttles,
        }
    }

    /// An engine's `on_failure = ["reboot-node"]` (the landlord allowed it):
    /// the same persisted cooldown, record and logind call as a rule's
    /// reboot, under its own key ([`ENGINE_REBOOT_RULE`], one reboot an
    /// hour at most).
    pub async fn engine_reboot(&mut self, engine: &str, why: &str) {
        let rule = engine_reboot_rule();
        match self.limiter.take(&rule, unix_now()) {
            Ok(true) => {
                let faults = vec![Fault {
                    severity: Severity::Critical,
                    source: Source::Engines,
                    subject: engine.to_owned(),
                    message: format!("on_failure reboot-node: {why}"),
                }];
                let name = rule.name.clone();
                if !self.runner.run(Firing { rule, faults }).await {
                    self.give_back(&name);
                }
            }
            Ok(false) => warn!(
                event = "health-action-cooldown",
                engine, "an engine asked for a reboot within the cooldown; not done"
            ),
            Err(e) => {
                error!(event = "health-action-refused", engine, error = %e, "an engine's reboot cannot be recorded; not done")
            }
        }
    }

    /// Runs what this report fires, one after the other.
    pub async fn on_report(&mut self, faults: &[Fault]) {
        let now = unix_now();
        let plan = plan_throttles(&self.rules, &self.throttles, faults, now);
        if plan.next != self.throttles {
            self.throttles = self.runner.throttle(&self.throttles, plan).await;
        }
        for f in self.matcher.next(faults, &mut self.limiter, now) {
            let name = f.rule.name.clone();
            if !self.runner.run(f).await {
                self.matcher.forget(&name);
                self.give_back(&name);
            }
        }
    }

    /// A firing that did not happen: its cooldown is not spent.
    fn give_back(&mut self, rule: &str) {
        if let Err(e) = self.limiter.give_back(rule) {
            error!(event = "health-action-refused", rule, error = %e, "the cooldown of an action that did not run could not be given back; it runs again only after it");
        }
    }
}

/// The rule engines' `reboot-node` runs under.
pub fn engine_reboot_rule() -> Rule {
    Rule {
        name: ENGINE_REBOOT_RULE.into(),
        source: Some(Source::Engines),
        severity: Severity::Critical,
        action: Kind::Reboot,
        priority: Priority::default(),
        command: Vec::new(),
        timeout_secs: default_timeout(),
        cooldown_secs: Some(ENGINE_REBOOT_COOLDOWN_SECS),
        cpu_percent: None,
    }
}

#[cfg(test)]
mod tests;
