//! Incremental update of the validated cluster boundary when peers are
//! added or removed (`AddPeers`/`RemovePeers`), so a one-peer change costs
//! in the peers changed, not in the size of the boundary: re-validating a
//! document of 100k peers takes ≈170 ms.
//!
//! The validated [`Boundary`] keeps, per entry, the set of single hosts and
//! the merged prefixes; a document may name the same address more than
//! once (directly and through a group, or twice in a group). The index
//! counts, per entry, how often each host and prefix is referenced, so a
//! removal only takes an address out of the entry when nothing else still
//! names it.

use std::collections::{BTreeMap, HashMap};

use leasehold_netpolicy::model::{parse_cidr, Entry, Family, Peers};
use leasehold_netpolicy::policy::PeerEdit;
use leasehold_netpolicy::ranges::Ranges;
use leasehold_netpolicy::{Boundary, BoundaryDoc};

#[derive(Debug, Clone, Default)]
struct Counts {
    hosts: HashMap<(Family, u128), u32>,
    nets: BTreeMap<(Family, u128, u128), u32>,
}

/// Reference counts of the cluster document's peers, per entry.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerIndex {
    /// Allow entries first, then failsafe entries.
    counts: Vec<Counts>,
    n_allow: usize,
    /// Group name → (entry slot, how often the entry names the group).
    refs: HashMap<String, BTreeMap<usize, u32>>,
}

impl PeerIndex {
    /// Counts the peers of a valid document.
    pub(crate) fn build(doc: &BoundaryDoc) -> PeerIndex {
        let mut ix = PeerIndex {
            counts: vec![Counts::default(); doc.allow.len() + doc.failsafe.len()],
            n_allow: doc.allow.len(),
            refs: HashMap::new(),
        };
        for (slot, e) in doc.allow.iter().chain(&doc.failsafe).enumerate() {
            for p in &e.peers {
                match p.strip_prefix('@') {
                    Some(g) => {
                        *ix.refs
                            .entry(g.to_owned())
                            .or_default()
                            .entry(slot)
                            .or_default() += 1;
                        for m in doc.groups.get(g).into_iter().flatten() {
                            ix.count(slot, m, 1);
                        }
                    }
                    None => ix.count(slot, p, 1),
                }
            }
        }
        ix
    }

    /// Counts only (no boundary): used while building.
    fn count(&mut self, slot: usize, peer: &str, d: i64) {
        let Ok((f, lo, hi)) = parse_cidr(peer) else {
            return;
        };
        let c = &mut self.counts[slot];
        let n = if lo == hi {
            c.hosts.entry((f, lo)).or_default()
        } else {
            c.nets.entry((f, lo, hi)).or_default()
        };
        *n = u32::try_from(i64::from(*n) + d).unwrap_or(0);
    }

    /// Applies `edit` (already made to `doc`) to `b`, the validated
    /// cluster boundary of the document before the edit. `undo` applies
    /// the inverse (the document already put back).
    pub(crate) fn apply(
        &mut self,
        edit: &PeerEdit,
        doc: &BoundaryDoc,
        b: &mut Boundary,
        undo: bool,
    ) {
        let add = edit.add != undo;
        let sign: i64 = if add { 1 } else { -1 };
        let mut deltas: Vec<(usize, &str, i64)> = Vec::new();
        match edit.target.strip_prefix('@') {
            Some(g) => {
                for (&slot, &r) in self.refs.get(g).into_iter().flatten() {
                    for p in &edit.changed {
                        deltas.push((slot, p, sign * i64::from(r)));
                    }
                }
            }
            None => {
                let Some(slot) = doc.allow.iter().position(|e| e.name == edit.target) else {
                    return;
                };
                for p in &edit.changed {
                    match p.strip_prefix('@') {
                        Some(g) => {
                            let r = self.refs.entry(g.to_owned()).or_default();
                            let n = r.entry(slot).or_default();
                            *n = u32::try_from(i64::from(*n) + sign).unwrap_or(0);
                            if *n == 0 {
                                r.remove(&slot);
                            }
                            for m in doc.groups.get(g).into_iter().flatten() {
                                deltas.push((slot, m, sign));
                            }
                        }
                        None => deltas.push((slot, p, sign)),
                    }
                }
            }
        }
        for (slot, p, d) in deltas {
            let Ok((f, lo, hi)) = parse_cidr(p) else {
                continue;
            };
            let entry = if slot < self.n_allow {
                &mut b.allow[slot]
            } else {
                &mut b.failsafe[slot - self.n_allow]
            };
            let c = &mut self.counts[slot];
            if lo == hi {
                let n = c.hosts.entry((f, lo)).or_default();
                let before = *n;
                *n = u32::try_from(i64::from(*n) + d).unwrap_or(0);
                let after = *n;
                if after == 0 {
                    c.hosts.remove(&(f, lo));
                }
                if before == 0 && after > 0 {
                    entry.hosts.insert((f, lo));
                    let r = family_mut(&mut entry.peers, f);
                    *r = with_interval(r, lo, lo);
                } else if before > 0 && after == 0 {
                    entry.hosts.remove(&(f, lo));
                    if !entry.nets.family(f).contains(lo) {
                        let r = family_mut(&mut entry.peers, f);
                        *r = without_value(r, lo);
                    }
                }
            } else {
                let n = c.nets.entry((f, lo, hi)).or_default();
                let before = *n;
                *n = u32::try_from(i64::from(*n) + d).unwrap_or(0);
                let after = *n;
                if after == 0 {
                    c.nets.remove(&(f, lo, hi));
                }
                if before == 0 && after > 0 {
                    let nets = family_mut(&mut entry.nets, f);
                    *nets = with_interval(nets, lo, hi);
                    let r = family_mut(&mut entry.peers, f);
                    *r = with_interval(r, lo, hi);
                } else if before > 0 && after == 0 {
                    recompute(entry, c, f);
                }
            }
        }
    }
}

/// `r` ∪ [lo, hi] in one linear copy: the intervals stay sorted, so the
/// normalisation's sort is a single pass (a plain union appends and sorts
/// 100k intervals: several ms).
fn with_interval(r: &Ranges, lo: u128, hi: u128) -> Ranges {
    let v = r.intervals();
    let i = v.partition_point(|&(a, _)| a < lo);
    if i > 0 && v[i - 1].0 <= lo && hi <= v[i - 1].1 {
        return r.clone();
    }
    let mut out = Vec::with_capacity(v.len() + 1);
    out.extend_from_slice(&v[..i]);
    out.push((lo, hi));
    out.extend_from_slice(&v[i..]);
    Ranges::from_intervals(out)
}

/// `r` without the value `x` (found by binary search, one linear copy).
fn without_value(r: &Ranges, x: u128) -> Ranges {
    let v = r.intervals();
    let i = v.partition_point(|&(_, b)| b < x);
    match v.get(i) {
        Some(&(a, b)) if a <= x && x <= b => {
            let mut out = Vec::with_capacity(v.len() + 1);
            out.extend_from_slice(&v[..i]);
            if a < x {
                out.push((a, x - 1));
            }
            if x < b {
                out.push((x + 1, b));
            }
            out.extend_from_slice(&v[i + 1..]);
            Ranges::from_intervals(out)
        }
        _ => r.clone(),
    }
}

fn family_mut(p: &mut Peers, f: Family) -> &mut Ranges {
    match f {
        Family::V4 => &mut p.v4,
        Family::V6 => &mut p.v6,
    }
}

/// A prefix went away: the entry's prefixes and peers of that family from
/// the counts (cost in the entry's peers of that family; prefixes change
/// rarely).
fn recompute(entry: &mut Entry, c: &Counts, f: Family) {
    let nets: Vec<(u128, u128)> = c
        .nets
        .keys()
        .filter(|k| k.0 == f)
        .map(|&(_, lo, hi)| (lo, hi))
        .collect();
    *family_mut(&mut entry.nets, f) = Ranges::from_intervals(nets.clone());
    let mut all = nets;
    all.extend(
        entry
            .hosts
            .iter()
            .filter(|h| h.0 == f)
            .map(|&(_, v)| (v, v)),
    );
    *family_mut(&mut entry.peers, f) = Ranges::from_intervals(all);
}

/// Puts the document back as it was before `edit`.
pub(crate) fn undo_doc(doc: &mut BoundaryDoc, edit: &PeerEdit) {
    let list = match edit.target.strip_prefix('@') {
        Some(g) => match doc.groups.get_mut(g) {
            Some(l) => l,
            None => return,
        },
        None => match doc.allow.iter_mut().find(|e| e.name == edit.target) {
            Some(e) => &mut e.peers,
            None => return,
        },
    };
    if edit.add {
        list.truncate(list.len().saturating_sub(edit.changed.len()));
    } else {
        let mut back: Vec<(usize, &String)> =
            edit.positions.iter().copied().zip(&edit.changed).collect();
        back.sort_by_key(|x| x.0);
        for (at, p) in back {
            list.insert(at.min(list.len()), p.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_netpolicy::policy::{parse_doc, Policy};

    const DOC: &str = r#"
[groups]
g = ["10.1.0.1", "10.1.0.2", "10.2.0.0/24"]
admins = ["10.9.0.1"]
[[allow]]
name = "a"
peers = ["@g", "10.1.0.1", "10.3.0.0/16"]
[[allow]]
name = "b"
peers = ["@g", "@g", "fd00::1"]
[[failsafe]]
name = "ssh"
peers = ["@admins", "@g"]
direction = "in"
protocols = [{ proto = "tcp", ports = [22] }]
"#;

    fn check(p: &Policy, b: &Boundary) {
        let full = p.cluster.as_ref().unwrap().validate(true).unwrap();
        assert_eq!(&full, b);
    }

    #[test]
    fn sorted_insert_and_removal_equal_union_and_subtract() {
        let r = Ranges::from_intervals(vec![(1, 3), (7, 7), (10, 20)]);
        for (lo, hi) in [
            (0, 0),
            (4, 4),
            (5, 6),
            (8, 9),
            (2, 2),
            (21, 30),
            (0, 40),
            (11, 12),
        ] {
            assert_eq!(
                with_interval(&r, lo, hi),
                r.union(&Ranges::interval(lo, hi))
            );
        }
        for x in 0..25 {
            assert_eq!(without_value(&r, x), r.subtract(&Ranges::interval(x, x)));
        }
    }

    #[test]
    fn incremental_edits_equal_a_full_validation() {
        let mut p = Policy::new();
        p.set_cluster(parse_doc(DOC, "toml").unwrap()).unwrap();
        let mut b = p.cluster.as_ref().unwrap().validate(true).unwrap();
        let mut ix = PeerIndex::build(p.cluster.as_ref().unwrap());
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let steps: Vec<(&str, Vec<String>, bool)> = vec![
            ("a", s(&["10.1.0.2", "10.5.0.9"]), true),
            ("a", s(&["10.1.0.1"]), false),
            ("@g", s(&["10.1.0.1"]), false),
            ("@g", s(&["10.1.0.7", "fd00::/64", "fd00::1"]), true),
            ("b", s(&["fd00::1"]), false),
            ("@g", s(&["fd00::/64"]), false),
            ("a", s(&["10.3.0.0/16"]), false),
            ("a", s(&["@admins", "10.3.0.5"]), true),
            ("@admins", s(&["10.9.0.2"]), true),
            ("@g", s(&["10.2.0.0/24", "10.1.0.2"]), false),
        ];
        for (t, peers, add) in steps {
            let e = p.edit_peers(t, &peers, add).unwrap();
            ix.apply(&e, p.cluster.as_ref().unwrap(), &mut b, false);
            check(&p, &b);
            // Undo and redo give the same as a full validation too.
            let before = p.clone();
            undo_doc(p.cluster.as_mut().unwrap(), &e);
            ix.apply(&e, p.cluster.as_ref().unwrap(), &mut b, true);
            check(&p, &b);
            let e2 = p.edit_peers(t, &peers, add).unwrap();
            assert_eq!(e, e2);
            ix.apply(&e2, p.cluster.as_ref().unwrap(), &mut b, false);
            assert_eq!(p, before);
            check(&p, &b);
        }
    }
}
