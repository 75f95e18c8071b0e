//! `CheckBoundary` / `CheckSubBoundary`: validate a document and compare it
//! with what is stored and enforced, without applying anything. Computed
//! from a snapshot, outside the lock.

use std::collections::{BTreeMap, HashSet};

use leasehold_netpolicy::model::{DhcpServerDoc, EntryDoc};
use leasehold_netpolicy::{excess, Boundary, BoundaryDoc, Excess};
use serde_json::{json, Value};

use super::{Boundaries, BoundaryError};

/// Flow summaries are computed up to this many peer intervals on both
/// sides (the exact check splits intervals pairwise); beyond, the summary
/// says so and the per-entry peer lists carry the change.
const FLOW_SUMMARY_MAX_INTERVALS: usize = 4096;
/// Lines of a flow summary shown; the rest is counted.
const SHOWN: usize = 20;
/// Parts of a sub-boundary that stick out, counted up to this many (and
/// one more, to say "more"): counting every part of a large document the
/// tenant sends cost the agent seconds and hundreds of MB on the change
/// path (review).
const WIDER_COUNTED: usize = 1000;

/// The parts of `sub` that `cluster` does not allow, at most
/// [`WIDER_COUNTED`] + 1 of them, and their count as text.
fn wider_parts(sub: &Boundary, cluster: &Boundary) -> (Vec<Excess>, String) {
    let wide = leasehold_netpolicy::check::excess_upto(sub, cluster, WIDER_COUNTED + 1);
    let n = if wide.len() > WIDER_COUNTED {
        format!("more than {WIDER_COUNTED}")
    } else {
        wide.len().to_string()
    };
    (wide, n)
}
/// CIDRs shown per line; the rest is counted.
const CIDRS: usize = 5;

fn intervals(b: &Boundary) -> usize {
    b.allow
        .iter()
        .map(|e| e.peers.v4.intervals().len() + e.peers.v6.intervals().len())
        .sum()
}

/// `entry "web": in tcp 443 from 10.0.0.0/8 192.0.2.0/24 … (and 12 more)`.
pub(crate) fn flow_line(x: &Excess) -> String {
    let dir = match x.direction {
        leasehold_netpolicy::Direction::In => "in",
        leasehold_netpolicy::Direction::Out => "out",
        leasehold_netpolicy::Direction::Both => "in/out",
    };
    let ports = if !x.proto.has_ports() || x.ports == leasehold_netpolicy::model::all_ports() {
        String::new()
    } else {
        format!(" {}", x.ports.to_strings().join(","))
    };
    format!(
        "entry {:?}: {dir} {}{ports} {} {}",
        x.entry,
        x.proto.name(),
        if dir == "out" { "to" } else { "from" },
        cidrs_shown(&x.peers)
    )
}

/// At most [`CIDRS`] CIDRs, then a count of the rest.
pub(crate) fn cidrs_shown(peers: &[String]) -> String {
    if peers.len() <= CIDRS {
        peers.join(" ")
    } else {
        format!(
            "{} (and {} more)",
            peers[..CIDRS].join(" "),
            peers.len() - CIDRS
        )
    }
}

/// Flows `old` allows that `new` does not, as lines (None: too large).
fn lost_flows(old: &Boundary, new: &Boundary) -> Option<(Vec<String>, usize)> {
    if intervals(old) + intervals(new) > FLOW_SUMMARY_MAX_INTERVALS {
        return None;
    }
    let lost = excess(old, new);
    let n = lost.len();
    Some((lost.iter().take(SHOWN).map(flow_line).collect(), n))
}

fn entries_diff(old: &[EntryDoc], new: &[EntryDoc]) -> Value {
    let o: BTreeMap<&str, &EntryDoc> = old.iter().map(|e| (e.name.as_str(), e)).collect();
    let n: BTreeMap<&str, &EntryDoc> = new.iter().map(|e| (e.name.as_str(), e)).collect();
    let added: Vec<&str> = n.keys().filter(|k| !o.contains_key(*k)).copied().collect();
    let removed: Vec<&str> = o.keys().filter(|k| !n.contains_key(*k)).copied().collect();
    let mut changed = Vec::new();
    for (name, ne) in &n {
        let Some(oe) = o.get(name) else { continue };
        if oe == ne {
            continue;
        }
        let (pa, pr) = list_diff(&oe.peers, &ne.peers);
        let mut c = json!({ "name": name, "peers_added": pa, "peers_removed": pr });
        if oe.direction != ne.direction {
            c["direction"] = json!([oe.direction, ne.direction]);
        }
        if oe.protocols != ne.protocols {
            c["protocols"] = json!([
                crate::boundary::protocols_text(oe.protocols.as_deref()),
                crate::boundary::protocols_text(ne.protocols.as_deref())
            ]);
        }
        changed.push(c);
    }
    json!({ "added": added, "removed": removed, "changed": changed })
}

fn list_diff(old: &[String], new: &[String]) -> (Vec<String>, Vec<String>) {
    let o: HashSet<&str> = old.iter().map(String::as_str).collect();
    let n: HashSet<&str> = new.iter().map(String::as_str).collect();
    (
        new.iter()
            .filter(|p| !o.contains(p.as_str()))
            .cloned()
            .collect(),
        old.iter()
            .filter(|p| !n.contains(p.as_str()))
            .cloned()
            .collect(),
    )
}

fn groups_diff(old: &BoundaryDoc, new: &BoundaryDoc) -> Value {
    let added: Vec<&String> = new
        .groups
        .keys()
        .filter(|k| !old.groups.contains_key(*k))
        .collect();
    let removed: Vec<&String> = old
        .groups
        .keys()
        .filter(|k| !new.groups.contains_key(*k))
        .collect();
    let changed: Vec<Value> = new
        .groups
        .iter()
        .filter_map(|(g, m)| {
            let om = old.groups.get(g)?;
            (om != m).then(|| {
                let (a, r) = list_diff(om, m);
                json!({ "name": g, "members_added": a, "members_removed": r })
            })
        })
        .collect();
    json!({ "added": added, "removed": removed, "changed": changed })
}

fn flows(out: &mut Value, key: &str, r: Option<(Vec<String>, usize)>) {
    match r {
        Some((lines, n)) => {
            out[key] = json!(lines);
            out[format!("{key}_count")] = json!(n);
        }
        None => {
            out[format!("{key}_note")] = json!(
                "not computed: too many peers for a flow summary; see the peers removed per entry"
            )
        }
    }
}

impl Boundaries {
    /// The refusal of a sub-boundary wider than the cluster boundary, as a
    /// person reads it: the first parts that stick out (at most a few
    /// CIDRs each, with a count of the rest) and the `--narrow` remedy.
    pub(crate) fn wider_refusal(&self, doc: &BoundaryDoc) -> Option<leasehold_netpolicy::DocError> {
        let snap = self.snapshot();
        let (cluster, _) = snap.bounds.as_ref()?;
        let sub = doc.validate(false).ok()?;
        let (wide, count) = wider_parts(&sub, cluster);
        let first = wide.first()?;
        let shown: Vec<String> = wide.iter().take(3).map(flow_line).collect();
        let rest = if wide.len() > WIDER_COUNTED {
            "; and more".to_owned()
        } else if wide.len() > 3 {
            format!("; and {} more", wide.len() - 3)
        } else {
            String::new()
        };
        Some(leasehold_netpolicy::DocError::new(
            format!("allow.{}", first.entry),
            format!(
                "wider than the cluster boundary ({count} part{} not allowed by it): {}{rest}; `tenantctl boundary set --narrow` stores the intersection instead and reports what it cut",
                if wide.len() == 1 { "" } else { "s" },
                shown.join("; "),
            ),
        ))
    }

    /// What setting `doc` as the cluster boundary would change (the
    /// failsafe entries carried over as `SetBoundary` does).
    pub fn check_cluster(&self, mut doc: BoundaryDoc) -> Result<String, BoundaryError> {
        let snap = self.snapshot();
        let old_doc = snap.policy.cluster.clone().unwrap_or_default();
        if doc.failsafe.is_empty() {
            doc.failsafe.clone_from(&old_doc.failsafe);
        }
        let new = doc.validate(true)?;
        // As setting it would (review: the dry run said valid).
        leasehold_netpolicy::model::check_dhcp_pins(&doc)?;
        let mut out = json!({
            "valid": true,
            "enforced_before": snap.bounds.is_some(),
            "entries": entries_diff(&old_doc.allow, &doc.allow),
            "failsafe": entries_diff(&old_doc.failsafe, &doc.failsafe),
            "groups": groups_diff(&old_doc, &doc),
            "denies_everything": doc.allow.is_empty() && doc.failsafe.is_empty(),
            "warnings": Self::change_warnings(&new, None),
        });
        if old_doc.action != doc.action {
            out["action"] = json!([old_doc.action, doc.action]);
        }
        if old_doc.dhcp_servers != doc.dhcp_servers {
            // One shape whatever was written: `{ addr, mac }` (mac null).
            let norm = |d: &Option<Vec<DhcpServerDoc>>| {
                d.as_ref().map(|l| {
                    l.iter()
                        .map(|s| match s {
                            DhcpServerDoc::Addr(a) => json!({ "addr": a, "mac": null }),
                            DhcpServerDoc::Pinned { addr, mac } => {
                                json!({ "addr": addr, "mac": mac })
                            }
                        })
                        .collect::<Vec<_>>()
                })
            };
            out["dhcp_servers"] = json!([norm(&old_doc.dhcp_servers), norm(&doc.dhcp_servers)]);
        }
        match snap.bounds.as_ref() {
            Some((old, _)) => {
                flows(&mut out, "newly_denied", lost_flows(old, &new));
                flows(&mut out, "newly_allowed", lost_flows(&new, old));
            }
            None => out["newly_denied_note"] = json!("no boundary is enforced now: everything not allowed by the document becomes denied"),
        }
        Ok(out.to_string())
    }

    /// What setting `doc` as the sub-boundary would change, and whether it
    /// fits inside the cluster boundary (`wider`: what sticks out; refused
    /// unless narrowed).
    pub fn check_sub(&self, doc: BoundaryDoc) -> Result<String, BoundaryError> {
        let snap = self.snapshot();
        let new = doc.validate(false)?;
        let Some((cluster, sub)) = snap.bounds.as_ref() else {
            return Err(BoundaryError::Invalid(leasehold_netpolicy::DocError::new(
                "document",
                "the node has no cluster boundary yet; the landlord sets it first",
            )));
        };
        let old_doc = snap.policy.sub.clone().unwrap_or_default();
        let (wide, _) = wider_parts(&new, cluster);
        let mut out = json!({
            "valid": true,
            "entries": entries_diff(&old_doc.allow, &doc.allow),
            "groups": groups_diff(&old_doc, &doc),
            "denies_everything": doc.allow.is_empty(),
            "fits": wide.is_empty(),
            "wider": wide.iter().take(SHOWN).map(flow_line).collect::<Vec<_>>(),
            "wider_count": wide.len().min(WIDER_COUNTED + 1),
            "wider_count_capped": wide.len() > WIDER_COUNTED,
        });
        // What the tenant's traffic may do now: the sub-boundary, or the
        // cluster boundary without one.
        let old = sub.as_ref().unwrap_or(cluster);
        flows(&mut out, "newly_denied", lost_flows(old, &new));
        flows(&mut out, "newly_allowed", lost_flows(&new, old));
        Ok(out.to_string())
    }
}
