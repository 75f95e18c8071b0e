//! Keeps the kernel's `inet leasehold` table equal to the desired ruleset:
//! applies changes (element updates when only peers changed, else the whole
//! table, each one atomic transaction), and checks the kernel's copy for
//! changes made behind the agent's back.
//!
//! The check (see [`Enforcer::check`]) lists the table over netlink and
//! compares (a) chains, rules and sets, handles and counter values left
//! out, with what the kernel showed at the first check after the last full
//! apply (those only change on a full apply), and (b) every set's elements
//! with the desired ones, skipped when no nftables transaction was
//! committed since they were last found right. No change waits for a
//! read-back, yet an edited rule, a deleted chain, an added or removed
//! element, or a missing table are all noticed. The agent checks right
//! after each of its own changes (its change notifications trigger a
//! check), so the window in which a rule edit could be taken as the
//! applied shape is that short.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::Value;

use crate::model::{Boundary, Family};
use crate::netlink;
use crate::nft::{self, ApplyError, Ruleset};

/// From this many single hosts on, a full apply is staged (see
/// [`Enforcer::apply`]); below it one `nft -f` is as fast.
const STAGED_MIN_HOSTS: usize = 4096;

/// How an apply changed the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The whole table was replaced.
    Full,
    /// Only set elements were added or removed.
    Elements,
    /// The kernel already had it.
    Unchanged,
}

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// The table is gone (e.g. `nft flush ruleset`).
    Missing,
    /// The table differs; the text says where first.
    Changed(String),
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Missing => write!(f, "table inet {} is missing", nft::TABLE),
            Drift::Changed(w) => write!(f, "table inet {} was changed: {w}", nft::TABLE),
        }
    }
}

struct Applied {
    rules: Ruleset,
    /// Table, chains and rules as the kernel showed them at the first check
    /// after the last full apply, handles stripped (None: not read yet).
    shape: Option<Vec<Value>>,
    /// The same from the netlink listing (the agent's own namespace).
    objects: Option<netlink::Objects>,
    /// The ruleset generation at which the kernel's set elements were
    /// last found equal to `rules` (by a check, or kept so by an element
    /// change of ours that was the only transaction in between).
    verified: Option<u32>,
}

/// Owner of the kernel table.
pub struct Enforcer {
    prefix: Vec<String>,
    applied: Option<Applied>,
    /// Kept open: see [`netlink::Conn`].
    conn: Option<netlink::Conn>,
    staged_min: usize,
    /// Generations committed while this enforcer changed the table:
    /// `(after, upto]` ranges, newest last, at most [`OWN_KEPT`]. A range
    /// may include another process's commit that came in between; such a
    /// range never extends [`Applied::verified`], so the next check reads
    /// the table back and still sees that commit's effect.
    own: VecDeque<(u32, u32)>,
    read_backs: u64,
    /// Deny counts of tables this enforcer replaced or removed (a table
    /// deleted and re-created starts its counters at 0), by class: added
    /// to the kernel's, so the totals only grow while the agent runs.
    retired: BTreeMap<&'static str, DenyCount>,
}

/// Commit ranges of the enforcer kept for [`Enforcer::classify`]; older
/// ones are long past any `nft monitor` line still to be read.
const OWN_KEPT: usize = 64;

/// What a committed generation means for the table (see [`crate::monitor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// It did not touch the table: nothing to check.
    Untouched,
    /// The enforcer's own change.
    Own,
    /// Another process changed the table.
    Foreign,
    /// Not known here (nft runs with a prefix, so generations are not
    /// tracked): check the table.
    Unknown,
}

struct Listing {
    shape: Vec<Value>,
    sets: BTreeMap<String, BTreeSet<String>>,
}

fn strip_handles(v: &mut Value) {
    if let Value::Object(m) = v {
        for (kind, inner) in m.iter_mut() {
            if let Value::Object(o) = inner {
                o.remove("handle");
                // A named counter's values move with every packet it
                // counts (`-s` leaves them in for counter objects).
                if kind == "counter" {
                    o.remove("packets");
                    o.remove("bytes");
                }
            }
        }
    }
}

/// Packets and bytes denied by the rules of one class
/// ([`nft::DENY_CLASSES`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DenyCount {
    /// Packets dropped or rejected.
    pub packets: u64,
    /// Their bytes (layer 3 on).
    pub bytes: u64,
}

/// Most counter objects read from the table (the agent declares
/// [`nft::DENY_CLASSES`]; more are someone else's and not read).
const MAX_COUNTERS: usize = 64;

fn elem_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => {
            if let Some(p) = o.get("prefix") {
                format!(
                    "{}/{}",
                    p.get("addr").and_then(Value::as_str).unwrap_or("?"),
                    p.get("len").and_then(Value::as_u64).unwrap_or(0)
                )
            } else if let Some(Value::Array(r)) = o.get("range") {
                let s: Vec<String> = r.iter().map(elem_string).collect();
                s.join("-")
            } else if let Some(e) = o.get("elem").and_then(|e| e.get("val")) {
                elem_string(e)
            } else {
                v.to_string()
            }
        }
        other => other.to_string(),
    }
}

/// Ranges of an interval set from its listed elements: each range is its
/// first address and, flagged as an end, the address after its last (no
/// end when the range reaches `max`); nft may add an end at 0.
fn intervals(mut v: Vec<netlink::ListedElem>, max: u128) -> Vec<(u128, u128)> {
    v.sort_unstable_by_key(|&(k, end)| (k, !end));
    let mut out = Vec::new();
    let mut open: Option<u128> = None;
    for (k, end) in v {
        match (end, open) {
            (true, Some(lo)) => {
                if k > lo {
                    out.push((lo, k - 1));
                }
                open = None;
            }
            (false, None) => open = Some(k),
            _ => {}
        }
    }
    if let Some(lo) = open {
        out.push((lo, max));
    }
    nft::merge(out)
}

/// Anonymous sets (`{ tcp, udp }` in a rule) are named `__set<N>` by nft;
/// they belong to their rule and cannot change.
fn anonymous(name: &str) -> bool {
    name.starts_with("__set")
}

fn count_drift(listed: &BTreeMap<String, usize>, want: &BTreeMap<String, usize>) -> Option<Drift> {
    if listed == want {
        return None;
    }
    let what = want
        .iter()
        .find(|(c, n)| listed.get(*c) != Some(n))
        .map(|(c, n)| {
            format!(
                "chain {c} has {} rules instead of {n}",
                listed.get(c).map_or("no".to_owned(), |x| x.to_string())
            )
        })
        .unwrap_or_else(|| "unexpected chains".to_owned());
    Some(Drift::Changed(what))
}

impl Enforcer {
    /// An enforcer running nft directly (`prefix` empty) or under a wrapper
    /// such as `ip netns exec NS`.
    pub fn new(prefix: Vec<String>) -> Self {
        Enforcer {
            prefix,
            applied: None,
            conn: None,
            staged_min: STAGED_MIN_HOSTS,
            own: VecDeque::new(),
            read_backs: 0,
            retired: BTreeMap::new(),
        }
    }

    /// The ruleset last applied (None: nothing applied yet).
    pub fn applied_rules(&self) -> Option<&nft::Ruleset> {
        self.applied.as_ref().map(|a| &a.rules)
    }

    /// Sets from how many single hosts on a full apply is staged (tests
    /// use 0 to take that path with small rulesets).
    pub fn staged_from(mut self, hosts: usize) -> Self {
        self.staged_min = hosts;
        self
    }

    fn conn(&mut self) -> Result<&mut netlink::Conn, ApplyError> {
        if self.conn.is_none() {
            self.conn = Some(netlink::Conn::open()?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| ApplyError::Refused("netlink socket".to_owned()))
    }

    /// Names of the table's chains and sets (netlink listings, about a
    /// millisecond; `nft -j list` took 10-20 ms for the two).
    fn names(&mut self) -> Result<(Vec<String>, Vec<String>), ApplyError> {
        let r = self.conn().and_then(|c| c.objects(nft::TABLE));
        match r {
            Ok(o) => Ok((
                o.chains.into_iter().map(|(n, _)| n).collect(),
                o.sets
                    .into_iter()
                    .map(|(n, _)| n)
                    .filter(|n| !anonymous(n))
                    .collect(),
            )),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    /// Sends element changes over the kept-open socket; a failed socket is
    /// dropped so the next change opens a fresh one.
    fn send(&mut self, changes: &[netlink::ElemChange]) -> Result<(), ApplyError> {
        let r = self.conn()?.apply(nft::TABLE, changes);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn prefix(&self) -> Vec<&str> {
        self.prefix.iter().map(String::as_str).collect()
    }

    /// The kernel's ruleset generation now (None: netlink unusable, or nft
    /// runs with a prefix in another namespace).
    fn generation(&mut self) -> Option<u32> {
        if !self.prefix.is_empty() {
            return None;
        }
        self.conn().and_then(netlink::Conn::generation).ok()
    }

    /// Records the generations `(before, after]` as the enforcer's own.
    fn committed(&mut self, before: Option<u32>, after: Option<u32>) {
        if let (Some(b), Some(a)) = (before, after) {
            if a != b {
                if self.own.len() >= OWN_KEPT {
                    self.own.pop_front();
                }
                self.own.push_back((b, a));
            }
        }
    }

    /// What generation `g` (from `nft monitor`) means for the table; an
    /// untouched one extends the verified state (see
    /// [`Enforcer::note_untouched`]).
    pub fn classify(&mut self, g: &crate::monitor::Generation) -> Seen {
        if g.touched.is_none() {
            self.note_untouched(g.gen);
            return Seen::Untouched;
        }
        if !self.prefix.is_empty() {
            return Seen::Unknown;
        }
        // b < gen <= a, in wrapping arithmetic.
        let own = self.own.iter().any(|&(b, a)| {
            let d = g.gen.wrapping_sub(b);
            d >= 1 && d <= a.wrapping_sub(b)
        });
        if own {
            Seen::Own
        } else {
            Seen::Foreign
        }
    }

    /// Generation `gen` was committed without touching the table (another
    /// table, another family): if the sets were verified right just before
    /// it, they still are, and the next check need not read them back.
    pub fn note_untouched(&mut self, gen: u32) {
        if let Some(a) = &mut self.applied {
            if a.verified == Some(gen.wrapping_sub(1)) {
                a.verified = Some(gen);
            }
        }
    }

    /// Set elements of the applied ruleset.
    pub fn elements(&self) -> Option<usize> {
        self.applied.as_ref().map(|a| a.rules.elements())
    }

    /// How many checks read the sets' elements back from the kernel (the
    /// expensive part of a check: ≈0.4 s at 100k hosts).
    pub fn read_backs(&self) -> u64 {
        self.read_backs
    }

    /// Whether this enforcer has applied a ruleset.
    pub fn is_active(&self) -> bool {
        self.applied.is_some()
    }

    fn list(&self) -> Result<Option<Listing>, ApplyError> {
        let Some(text) = nft::current_json(&self.prefix())? else {
            return Ok(None);
        };
        let doc: Value = serde_json::from_str(&text)
            .map_err(|e| ApplyError::Refused(format!("cannot parse nft -j output: {e}")))?;
        let mut shape = Vec::new();
        let mut sets = BTreeMap::new();
        for mut obj in doc
            .get("nftables")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            if obj.get("metainfo").is_some() {
                continue;
            }
            if let Some(set) = obj.get_mut("set").and_then(Value::as_object_mut) {
                let elems = set.remove("elem");
                let name = set
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let elems: BTreeSet<String> = match elems {
                    Some(Value::Array(a)) => a.iter().map(elem_string).collect(),
                    _ => BTreeSet::new(),
                };
                sets.insert(name, elems);
            }
            strip_handles(&mut obj);
            shape.push(obj);
        }
        Ok(Some(Listing { shape, sets }))
    }

    /// Makes the kernel enforce `rules`: element changes only when the
    /// chains and sets are the same as last applied, else the full table.
    ///
    /// Element changes of hash sets go straight to the kernel as one
    /// nfnetlink batch (the socket is in the agent's own namespace, so not
    /// with a prefix), other element changes through `nft -f`. A full apply
    /// of many hosts is staged: the new sets are created under new names
    /// and filled over netlink while the old ruleset stays in force, then
    /// one `nft -f` transaction switches the chains to them and deletes
    /// the old sets (nft's parser takes most of a plain `nft -f` of 100k
    /// elements). Any failure there falls back to the plain full apply,
    /// which replaces the table (old sets and leftovers included).
    pub fn apply(&mut self, rules: Ruleset) -> Result<Change, ApplyError> {
        let Some(a) = &self.applied else {
            self.apply_full(rules)?;
            return Ok(Change::Full);
        };
        let rules = rules.with_suffix(a.rules.suffix());
        if self.prefix.is_empty() {
            if let Some(delta) = rules.element_delta(&a.rules) {
                if delta.is_empty() {
                    return Ok(Change::Unchanged);
                }
                let before = self.generation();
                if let Err(e) = self.send(&delta) {
                    // The kernel's table is not what we think (or netlink
                    // is unusable): the whole table puts it right.
                    tracing::warn!(error = %e, "element change over netlink failed; replacing the whole table");
                    self.apply_full(rules)?;
                    return Ok(Change::Full);
                }
                let after = self.generation();
                self.committed(before, after);
                let kept = matches!(
                    (&self.applied, before, after),
                    (Some(a), Some(b), Some(x)) if a.verified == Some(b) && x == b.wrapping_add(1)
                );
                let c = self.elements_changed(rules);
                if let Some(a) = &mut self.applied {
                    a.verified = if kept { after } else { None };
                }
                return Ok(c);
            }
        }
        match rules.update_script(&a.rules) {
            Some(script) if script.is_empty() => Ok(Change::Unchanged),
            Some(script) => {
                let before = self.generation();
                let r = nft::apply(&script, &self.prefix());
                let after = self.generation();
                self.committed(before, after);
                r?;
                Ok(self.elements_changed(rules))
            }
            None => {
                self.apply_full(rules)?;
                Ok(Change::Full)
            }
        }
    }

    /// A change of single cluster hosts (see [`Ruleset::edit_cluster_hosts`])
    /// on the applied ruleset, sent as one netlink batch. Ok(None): not an
    /// element-only change here (no table applied, a set would appear or
    /// vanish, or the enforcer runs nft with a prefix): build the ruleset
    /// and [`Enforcer::apply`] it. A batch the kernel refuses (a sized set
    /// full, the table changed behind us) is put right by a full apply of
    /// the edited ruleset.
    pub fn edit_cluster_hosts(
        &mut self,
        cluster: &Boundary,
        hosts: &[(Family, u128)],
    ) -> Result<Option<Change>, ApplyError> {
        if !self.prefix.is_empty() {
            return Ok(None);
        }
        let Some(a) = &mut self.applied else {
            return Ok(None);
        };
        let Some(delta) = a.rules.edit_cluster_hosts(cluster, hosts) else {
            return Ok(None);
        };
        if delta.is_empty() {
            return Ok(Some(Change::Unchanged));
        }
        let before = self.generation();
        if let Err(e) = self.send(&delta) {
            tracing::warn!(error = %e, "element change over netlink failed; replacing the whole table");
            let Applied {
                rules,
                shape,
                objects,
                ..
            } = self
                .applied
                .take()
                .ok_or_else(|| ApplyError::Refused("no ruleset".into()))?;
            if let Err(full) = self.apply_full(rules.clone()) {
                // Neither went in. The checks go on against a ruleset (the
                // edited one until the caller, undoing the edit, says which
                // it keeps: `expect`): left empty, `check` found nothing to
                // check and a missing or changed table went unnoticed
                // (review).
                self.applied = Some(Applied {
                    rules,
                    shape,
                    objects,
                    verified: None,
                });
                return Err(full);
            }
            return Ok(Some(Change::Full));
        }
        let after = self.generation();
        self.committed(before, after);
        if let Some(a) = &mut self.applied {
            let kept = matches!((before, after), (Some(b), Some(x)) if a.verified == Some(b) && x == b.wrapping_add(1));
            a.verified = if kept { after } else { None };
        }
        Ok(Some(Change::Elements))
    }

    /// The ruleset the kernel is expected to hold, without applying it:
    /// after a failed edit the caller undid, the rules from before it, so
    /// the drift check compares the kernel with what the policy says (and
    /// a restore puts that back). Nothing applied yet: nothing to expect.
    pub fn expect(&mut self, rules: Ruleset) {
        if let Some(a) = &mut self.applied {
            // The set names the kernel has (a staged table's `_gN`).
            a.rules = rules.with_suffix(a.rules.suffix());
            a.verified = None;
        }
    }

    /// Records `rules` after an element-only change: chains and rules, so
    /// the shape read back after the last full apply, are unchanged.
    fn elements_changed(&mut self, rules: Ruleset) -> Change {
        if let Some(a) = &mut self.applied {
            a.rules = rules;
            a.verified = None;
        }
        Change::Elements
    }

    fn apply_full(&mut self, rules: Ruleset) -> Result<(), ApplyError> {
        let before = self.generation();
        let r = self.apply_full_inner(rules);
        let after = self.generation();
        self.committed(before, after);
        r
    }

    fn apply_full_inner(&mut self, rules: Ruleset) -> Result<(), ApplyError> {
        let rules = if self.prefix.is_empty() && rules.hash_elements() >= self.staged_min {
            let (chains, sets) = self.names()?;
            // A generation no set of the table has (leftovers included).
            let gen = sets
                .iter()
                .filter_map(|n| n.rsplit_once("_g").and_then(|(_, g)| g.parse::<u64>().ok()))
                .max()
                .unwrap_or(0)
                + 1;
            let rules = rules.with_suffix(&format!("_g{gen}"));
            match self.apply_staged(&rules, &chains, &sets) {
                Ok(()) => {
                    self.applied = Some(Applied {
                        rules,
                        shape: None,
                        objects: None,
                        verified: None,
                    });
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "staged apply failed; replacing the whole table");
                    rules
                }
            }
        } else {
            rules
        };
        // The script deletes the table and its counters with it.
        let kept = self.kernel_deny_counts();
        nft::apply(&rules.full_script(), &self.prefix())?;
        self.retire(kept);
        self.applied = Some(Applied {
            rules,
            shape: None,
            objects: None,
            verified: None,
        });
        Ok(())
    }

    fn apply_staged(
        &mut self,
        rules: &Ruleset,
        chains: &[String],
        sets: &[String],
    ) -> Result<(), ApplyError> {
        let t = std::time::Instant::now();
        nft::apply(&rules.stage_script(), &[])?;
        let t1 = t.elapsed();
        let fill = rules.hash_fill();
        let t2 = t.elapsed();
        self.send(&fill)?;
        let t3 = t.elapsed();
        nft::apply(&rules.switch_script(chains, &[]), &[])?;
        let t4 = t.elapsed();
        // The old sets go in a transaction of their own, over the kept-open
        // socket: the kernel frees their elements after the commit, and a
        // process that closes its socket (nft) waits for that. A set left
        // behind is unused and goes with the next full apply.
        let old: Vec<String> = rules.unused(sets);
        if let Err(e) = self.conn().and_then(|c| c.delete_sets(nft::TABLE, &old)) {
            tracing::warn!(error = %e, "cannot delete the previous sets; the next full apply will");
        }
        tracing::debug!(
            stage = ?t1,
            encode = ?t2,
            fill = ?t3,
            switch = ?t4,
            total = ?t.elapsed(),
            "staged apply (times since start)"
        );
        Ok(())
    }

    /// Removes the table (lifts every boundary). Absent is fine.
    pub fn remove(&mut self) -> Result<(), ApplyError> {
        let kept = self.kernel_deny_counts();
        let before = self.generation();
        let r = nft::apply(&nft::remove_script(), &self.prefix());
        let after = self.generation();
        self.committed(before, after);
        r?;
        self.retire(kept);
        self.applied = None;
        Ok(())
    }

    /// Packets and bytes denied per class ([`nft::DENY_CLASSES`], every
    /// one listed) since this enforcer started: the table's named counters
    /// (one netlink dump of the counter objects, no rule or element read;
    /// with a prefix, `nft -j list counters`) plus those of the tables it
    /// replaced. Packets counted between the last read of a table and its
    /// deletion, and a table deleted by someone else (`nft flush ruleset`),
    /// are lost; a restarted agent takes over the values of the table in
    /// the kernel.
    pub fn deny_counters(&mut self) -> Result<Vec<(&'static str, DenyCount)>, ApplyError> {
        let now = self.read_deny_counts()?;
        Ok(nft::DENY_CLASSES
            .iter()
            .map(|c| {
                let r = self.retired.get(c).copied().unwrap_or_default();
                let k = now.get(c).copied().unwrap_or_default();
                (
                    *c,
                    DenyCount {
                        packets: r.packets.saturating_add(k.packets),
                        bytes: r.bytes.saturating_add(k.bytes),
                    },
                )
            })
            .collect())
    }

    fn read_deny_counts(&mut self) -> Result<BTreeMap<&'static str, DenyCount>, ApplyError> {
        let listed = if self.prefix.is_empty() {
            let r = self
                .conn()
                .and_then(|c| c.counters(nft::TABLE, MAX_COUNTERS));
            if r.is_err() {
                self.conn = None;
            }
            r?
        } else {
            nft::counters(&self.prefix(), MAX_COUNTERS)?
        };
        let mut out = BTreeMap::new();
        for (name, packets, bytes) in listed {
            let Some(class) = name
                .strip_prefix(nft::DENY_COUNTER_PREFIX)
                .and_then(|c| nft::DENY_CLASSES.iter().find(|k| **k == c))
            else {
                continue;
            };
            out.insert(*class, DenyCount { packets, bytes });
        }
        Ok(out)
    }

    /// The kernel's deny counts just before the table is deleted (an
    /// unreadable table: none; its counts are lost, not guessed).
    fn kernel_deny_counts(&mut self) -> BTreeMap<&'static str, DenyCount> {
        self.read_deny_counts()
            .inspect_err(|e| tracing::debug!(error = %e, "deny counters not read before the table is replaced"))
            .unwrap_or_default()
    }

    fn retire(&mut self, kept: BTreeMap<&'static str, DenyCount>) {
        for (c, k) in kept {
            let r = self.retired.entry(c).or_default();
            r.packets = r.packets.saturating_add(k.packets);
            r.bytes = r.bytes.saturating_add(k.bytes);
        }
    }

    /// Compares the kernel's table with what was applied. None: equal (or
    /// nothing applied).
    ///
    /// In the agent's own namespace (no prefix) the table is listed over
    /// netlink: chains, rules (counter values left out) and sets, then
    /// each set's elements, compared as numbers (≈20 ms at 100k hosts;
    /// `nft -j list table` needs ≈0.8 s, `-t` does not make it faster).
    /// With a prefix, `nft -j -s list table`.
    pub fn check(&mut self) -> Result<Option<Drift>, ApplyError> {
        if self.applied.is_none() {
            return Ok(None);
        }
        if self.prefix.is_empty() {
            let r = self.check_netlink();
            if r.is_err() {
                self.conn = None;
            }
            return r;
        }
        let Some(l) = self.list()? else {
            return Ok(Some(Drift::Missing));
        };
        let Some(a) = self.applied.as_mut() else {
            return Ok(None);
        };
        // Rule counts per chain are checked even before the shape is known,
        // so a chain emptied right after an apply is not taken as applied.
        let mut listed: BTreeMap<String, usize> = BTreeMap::new();
        for o in &l.shape {
            if let Some(c) = o
                .get("chain")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
            {
                listed.entry(c.to_owned()).or_default();
            }
            if let Some(c) = o
                .get("rule")
                .and_then(|r| r.get("chain"))
                .and_then(Value::as_str)
            {
                *listed.entry(c.to_owned()).or_default() += 1;
            }
        }
        if let Some(d) = count_drift(&listed, &a.rules.rule_counts()) {
            return Ok(Some(d));
        }
        let shape = a.shape.get_or_insert_with(|| l.shape.clone());
        if l.shape != *shape {
            let first = l
                .shape
                .iter()
                .zip(shape.iter())
                .find(|(x, y)| x != y)
                .map(|(x, _)| x.to_string())
                .unwrap_or_else(|| format!("{} objects instead of {}", l.shape.len(), shape.len()));
            return Ok(Some(Drift::Changed(first)));
        }
        for (name, want) in a.rules.set_elements() {
            let have = l.sets.get(name).cloned().unwrap_or_default();
            if have != want {
                let extra = have.difference(&want).count();
                let missing = want.difference(&have).count();
                return Ok(Some(Drift::Changed(format!(
                    "set {name}: {extra} unexpected and {missing} missing elements"
                ))));
            }
        }
        Ok(None)
    }

    fn check_netlink(&mut self) -> Result<Option<Drift>, ApplyError> {
        if self.conn.is_none() {
            self.conn = Some(netlink::Conn::open()?);
        }
        let (Some(conn), Some(a)) = (self.conn.as_mut(), self.applied.as_mut()) else {
            return Ok(None);
        };
        let gen = conn.generation()?;
        if !conn.table_exists(nft::TABLE)? {
            return Ok(Some(Drift::Missing));
        }
        let objs = conn.objects(nft::TABLE)?;
        let mut listed: BTreeMap<String, usize> = BTreeMap::new();
        for (c, _) in &objs.chains {
            listed.entry(c.clone()).or_default();
        }
        for (c, _) in &objs.rules {
            *listed.entry(c.clone()).or_default() += 1;
        }
        if let Some(d) = count_drift(&listed, &a.rules.rule_counts()) {
            return Ok(Some(d));
        }
        let want = a.rules.expected_sets();
        let have_names: BTreeSet<&str> = objs
            .sets
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !anonymous(n))
            .collect();
        let want_names: BTreeSet<&str> = want.iter().map(|w| w.name).collect();
        if have_names != want_names {
            return Ok(Some(Drift::Changed(format!(
                "sets {:?} instead of {:?}",
                have_names.difference(&want_names).collect::<Vec<_>>(),
                want_names.difference(&have_names).collect::<Vec<_>>()
            ))));
        }
        let shape = a.objects.get_or_insert_with(|| objs.clone());
        if objs != *shape {
            let what = if objs.chains != shape.chains {
                "a chain's type, hook, priority or policy"
            } else if objs.rules != shape.rules {
                let i = objs
                    .rules
                    .iter()
                    .zip(&shape.rules)
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Ok(Some(Drift::Changed(format!(
                    "rule {i} of the table (chain {}) changed",
                    objs.rules.get(i).map_or("?", |r| r.0.as_str())
                ))));
            } else {
                "a set's type, flags or size"
            };
            return Ok(Some(Drift::Changed(format!("{what} changed"))));
        }
        // Nothing committed since the elements were last found right: the
        // listing above suffices (a set dump costs ≈0.7 s at 100k hosts:
        // the kernel re-walks the set from the start for every 32 KiB of
        // answer).
        if a.verified == Some(gen) {
            return Ok(None);
        }
        self.read_backs += 1;
        for nft::ExpectedSet {
            name,
            interval,
            max,
            ranges: want,
        } in want
        {
            let Some(have) = conn.set_elements(nft::TABLE, name)? else {
                return Ok(Some(Drift::Changed(format!("set {name} is missing"))));
            };
            let have = if interval {
                intervals(have, max)
            } else {
                let mut v: Vec<(u128, u128)> = have.into_iter().map(|(k, _)| (k, k)).collect();
                v.sort_unstable();
                v
            };
            if have != want {
                let (h, w): (BTreeSet<_>, BTreeSet<_>) =
                    (have.into_iter().collect(), want.into_iter().collect());
                return Ok(Some(Drift::Changed(format!(
                    "set {name}: {} unexpected and {} missing elements",
                    h.difference(&w).count(),
                    w.difference(&h).count()
                ))));
            }
        }
        // Found right from `gen` on, if nothing was committed meanwhile.
        if conn.generation()? == gen {
            a.verified = Some(gen);
        }
        Ok(None)
    }

    /// After [`Enforcer::check`] found a drift: `rules` in full (what the
    /// table should be now, which may differ from the last ruleset: a
    /// cgroup it named may be gone), or the last ruleset when `None`.
    pub fn restore_with(&mut self, rules: Option<Ruleset>) -> Result<(), ApplyError> {
        let Some(rules) = rules else {
            return self.restore();
        };
        let before = self.applied.take();
        if let Err(e) = self.apply_full(rules) {
            self.applied = before;
            return Err(e);
        }
        Ok(())
    }

    /// Re-applies the last ruleset in full (after [`Enforcer::check`]
    /// found a drift).
    pub fn restore(&mut self) -> Result<(), ApplyError> {
        if let Some(a) = self.applied.take() {
            let rules = a.rules.clone();
            if let Err(e) = self.apply_full(rules) {
                self.applied = Some(a);
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_elements_become_merged_ranges() {
        // 10.0.0.0/24 and 10.0.1.0/24 (adjacent: one range), 192.168.0.0/16,
        // the end nft adds at 0, and a range up to the last address (no end).
        let listed = vec![
            (0xc0a9_0000, true),
            (0x0a00_0200, true),
            (0, true),
            (0xc0a8_0000, false),
            (0x0a00_0100, false),
            (0x0a00_0100, true),
            (0x0a00_0000, false),
            (0xf000_0000, false),
        ];
        assert_eq!(
            intervals(listed, u128::from(u32::MAX)),
            vec![
                (0x0a00_0000, 0x0a00_01ff),
                (0xc0a8_0000, 0xc0a8_ffff),
                (0xf000_0000, 0xffff_ffff)
            ]
        );
    }
}
