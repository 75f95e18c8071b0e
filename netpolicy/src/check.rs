//! Restrictiveness check, narrowing and explain over the flow space
//! peers × direction × protocol × ports.
//!
//! The check works per cell (direction × protocol × address family): the
//! cluster boundary's entries are merged once into its *coverage*, sorted
//! disjoint peer intervals each labelled with the ports allowed there
//! (`Coverage`, a balanced tree of pairwise merges); a sub-boundary entry's
//! peer intervals are then walked against it (a binary search per interval,
//! then a merge). Cost: O(n log n) in the number of peer intervals (it was
//! the product of the two counts: 81 s at 100k landlord hosts, now ≈50 ms;
//! docs/benchmarks.md "check"). Cells with the same entries and ports share
//! a coverage. The quadratic algorithm stays in the tests as the reference.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{
    all_ports, cidr_blocks, format_cidr, Boundary, Direction, Entry, EntryDoc, Family, PortSpec,
    Proto, ProtoDoc, MAX_NAME,
};
use crate::ranges::Ranges;

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// An [`Excess`] lists at most this many CIDRs in `peers`; `set` has them all.
pub const MAX_LISTED_PEERS: usize = 64;

/// A part of a sub-boundary entry that the cluster boundary does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excess {
    /// The sub-boundary entry.
    pub entry: String,
    /// Direction of the part.
    pub direction: Direction,
    /// Protocol of the part.
    pub proto: Proto,
    /// Peers of the part, as CIDRs: the first [`MAX_LISTED_PEERS`] (the
    /// complement of 100k scattered hosts is millions of CIDRs); `set` is exact.
    pub peers: Vec<String>,
    /// Ports of the part.
    pub ports: Ranges,
    /// Address family of the part.
    pub family: Family,
    /// Peers of the part, exactly (addresses of `family`; shared by the
    /// parts of cells that have the same coverage, e.g. tcp and udp).
    pub set: Arc<Ranges>,
}

impl Excess {
    fn new(
        entry: &str,
        direction: Direction,
        proto: Proto,
        family: Family,
        set: Arc<Ranges>,
        ports: Ranges,
    ) -> Self {
        let peers = cidr_blocks(family, &set)
            .take(MAX_LISTED_PEERS)
            .map(|(net, len)| format_cidr(family, net, len))
            .collect();
        Excess {
            entry: entry.to_owned(),
            direction,
            proto,
            peers,
            ports,
            family,
            set,
        }
    }

    /// Whether `peers` lists the whole part.
    pub fn listed_in_full(&self) -> bool {
        cidr_blocks(self.family, &self.set)
            .nth(self.peers.len())
            .is_none()
    }
}

impl fmt::Display for Excess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.direction {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Both => "in/out",
        };
        let proto = self.proto.name();
        let ports = if !self.proto.has_ports() || self.ports == all_ports() {
            String::new()
        } else {
            format!(" ports {}", self.ports.to_strings().join(","))
        };
        let more = if self.listed_in_full() {
            String::new()
        } else {
            format!(
                " and more ({} address ranges in all)",
                self.set.intervals().len()
            )
        };
        write!(
            f,
            "entry {:?}: {dir} {proto}{ports} with {}{more} is not allowed by the cluster boundary",
            self.entry,
            self.peers.join(" ")
        )
    }
}

/// What a boundary allows in one cell (direction × protocol × family):
/// sorted, disjoint peer intervals, each labelled with the ports allowed
/// there (an index into `ports`); neighbours with equal labels are merged.
struct Coverage {
    segs: Vec<(u128, u128, usize)>,
    ports: Vec<Ranges>,
}

impl Coverage {
    /// The coverage of `rects` (peers, ports): each rectangle is a list of
    /// labelled segments; lists are merged pairwise, in a balanced tree
    /// (O(n log k) for n intervals in k rectangles, sequential memory).
    fn build<'r>(rects: impl Iterator<Item = (&'r Ranges, &'r Ranges)>) -> Self {
        let mut labels = Labels::default();
        let mut lists: Vec<Vec<(u128, u128, usize)>> = rects
            .map(|(peers, p)| {
                let l = labels.intern(p);
                peers
                    .intervals()
                    .iter()
                    .map(|&(lo, hi)| (lo, hi, l))
                    .collect()
            })
            .collect();
        while lists.len() > 1 {
            let mut next = Vec::with_capacity(lists.len().div_ceil(2));
            let mut it = lists.into_iter();
            while let Some(a) = it.next() {
                next.push(match it.next() {
                    Some(b) => merge(&a, &b, &mut labels),
                    None => a,
                });
            }
            lists = next;
        }
        Coverage {
            segs: lists.pop().unwrap_or_default(),
            ports: labels.ports,
        }
    }

    /// Calls `f(lo, hi, label)` for consecutive parts of `peers`, in order:
    /// `label` is the coverage's label where covered, None where not.
    fn walk(&self, peers: &Ranges, mut f: impl FnMut(u128, u128, Option<usize>)) {
        let mut j = 0;
        for &(a, b) in peers.intervals() {
            j += self.segs[j..].partition_point(|s| s.1 < a);
            let mut lo = a;
            loop {
                match self.segs.get(j) {
                    Some(&(c, d, l)) if c <= b => {
                        if c > lo {
                            f(lo, c - 1, None);
                        }
                        f(lo.max(c), d.min(b), Some(l));
                        if d >= b {
                            break;
                        }
                        lo = d + 1;
                        j += 1;
                    }
                    _ => {
                        f(lo, b, None);
                        break;
                    }
                }
            }
        }
    }

    /// Whether the coverage allows `ports` to every address of `peers`;
    /// stops at the first part it does not.
    fn covers(&self, peers: &Ranges, ports: &Ranges) -> bool {
        let mut ok_at = PerLabel::new(self.ports.len(), peers);
        let mut j = 0;
        for &(a, b) in peers.intervals() {
            j += self.segs[j..].partition_point(|s| s.1 < a);
            let mut lo = a;
            loop {
                match self.segs.get(j) {
                    Some(&(c, d, l)) if c <= lo => {
                        if !*ok_at.get_or_insert_with(l, || ports.is_subset(&self.ports[l])) {
                            return false;
                        }
                        if d >= b {
                            break;
                        }
                        // Segments with different labels may touch.
                        lo = d + 1;
                        j += 1;
                    }
                    _ => return ports.is_empty(),
                }
            }
        }
        true
    }
}

/// A value per label of a coverage, computed on first use: a vector when
/// the labels are few (or the walk long), else a map (a cluster with 10k
/// distinct port sets must not cost a 10k vector per sub-boundary entry).
enum PerLabel<T> {
    Dense(Vec<Option<T>>),
    Sparse(HashMap<usize, T>),
}

impl<T: Clone> PerLabel<T> {
    fn new(labels: usize, peers: &Ranges) -> Self {
        if labels <= 64 || labels <= 4 * peers.intervals().len() {
            PerLabel::Dense(vec![None; labels])
        } else {
            PerLabel::Sparse(HashMap::new())
        }
    }

    fn get_or_insert_with(&mut self, l: usize, f: impl FnOnce() -> T) -> &T {
        match self {
            PerLabel::Dense(v) => v[l].get_or_insert_with(f),
            PerLabel::Sparse(m) => m.entry(l).or_insert_with(f),
        }
    }
}

/// The port sets of a coverage, each once, and the unions of pairs.
#[derive(Default)]
struct Labels {
    ports: Vec<Ranges>,
    index: HashMap<Ranges, usize>,
    unions: HashMap<(usize, usize), usize>,
}

impl Labels {
    fn intern(&mut self, r: &Ranges) -> usize {
        if let Some(&l) = self.index.get(r) {
            return l;
        }
        self.ports.push(r.clone());
        self.index.insert(r.clone(), self.ports.len() - 1);
        self.ports.len() - 1
    }

    fn union(&mut self, a: usize, b: usize) -> usize {
        if a == b {
            return a;
        }
        let key = (a.min(b), a.max(b));
        if let Some(&l) = self.unions.get(&key) {
            return l;
        }
        let u = self.ports[a].union(&self.ports[b]);
        let l = self.intern(&u);
        self.unions.insert(key, l);
        l
    }
}

/// Appends a segment, merging it with the last one if they touch and have
/// the same label.
fn push_seg(out: &mut Vec<(u128, u128, usize)>, lo: u128, hi: u128, l: usize) {
    match out.last_mut() {
        Some((_, last_hi, last_l)) if *last_l == l && *last_hi + 1 == lo => *last_hi = hi,
        _ => out.push((lo, hi, l)),
    }
}

/// The union of two coverages: where both cover, the union of the labels.
fn merge(
    a: &[(u128, u128, usize)],
    b: &[(u128, u128, usize)],
    labels: &mut Labels,
) -> Vec<(u128, u128, usize)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    // The parts of a[i] and b[j] not yet written.
    let mut x = a.first().copied();
    let mut y = b.first().copied();
    loop {
        match (x, y) {
            (None, None) => break,
            (Some((lo, hi, l)), None) => {
                push_seg(&mut out, lo, hi, l);
                i += 1;
                x = a.get(i).copied();
            }
            (None, Some((lo, hi, l))) => {
                push_seg(&mut out, lo, hi, l);
                j += 1;
                y = b.get(j).copied();
            }
            (Some((al, ah, la)), Some((bl, bh, lb))) => {
                if ah < bl {
                    push_seg(&mut out, al, ah, la);
                    i += 1;
                    x = a.get(i).copied();
                } else if bh < al {
                    push_seg(&mut out, bl, bh, lb);
                    j += 1;
                    y = b.get(j).copied();
                } else if al < bl {
                    push_seg(&mut out, al, bl - 1, la);
                    x = Some((bl, ah, la));
                } else if bl < al {
                    push_seg(&mut out, bl, al - 1, lb);
                    y = Some((al, bh, lb));
                } else {
                    let hi = ah.min(bh);
                    push_seg(&mut out, al, hi, labels.union(la, lb));
                    if ah == hi {
                        i += 1;
                        x = a.get(i).copied();
                    } else {
                        x = Some((hi + 1, ah, la));
                    }
                    if bh == hi {
                        j += 1;
                        y = b.get(j).copied();
                    } else {
                        y = Some((hi + 1, bh, lb));
                    }
                }
            }
        }
    }
    out
}

/// The entries that allow something in a cell, with the ports they allow
/// there: cells with the same signature have the same coverage.
type Signature<'a> = (Family, Vec<(usize, &'a Ranges)>);

/// The coverages of one boundary, built on first use, once per signature
/// (an entry without `protocols` makes tcp, udp, icmp and other alike).
struct Cells<'a> {
    entries: &'a [Entry],
    cell: HashMap<(Direction, Proto, Family), usize>,
    by_signature: HashMap<Signature<'a>, usize>,
    built: Vec<Coverage>,
}

impl<'a> Cells<'a> {
    fn new(entries: &'a [Entry]) -> Self {
        Cells {
            entries,
            cell: HashMap::new(),
            by_signature: HashMap::new(),
            built: Vec::new(),
        }
    }

    /// The coverage of a cell, as an index into `built`.
    fn index(&mut self, dir: Direction, proto: Proto, fam: Family) -> usize {
        match self.cell.get(&(dir, proto, fam)) {
            Some(&i) => i,
            None => {
                let entries = self.entries;
                let rects: Vec<(usize, &'a Ranges)> = entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.directions.contains(&dir) && !e.peers.family(fam).is_empty())
                    .filter_map(|(i, e)| e.protocols.get(&proto).map(|p| (i, p)))
                    .filter(|(_, p)| !p.is_empty())
                    .collect();
                let built = &mut self.built;
                let i = *self
                    .by_signature
                    .entry((fam, rects))
                    .or_insert_with_key(|(_, rects)| {
                        built.push(Coverage::build(
                            rects
                                .iter()
                                .map(|&(i, p)| (entries[i].peers.family(fam), p)),
                        ));
                        built.len() - 1
                    });
                self.cell.insert((dir, proto, fam), i);
                i
            }
        }
    }
}

/// The parts of `peers` the coverage does not allow all of `ports` to,
/// grouped by the ports missing: (missing ports, peers), in first-seen order.
fn missing_parts(cov: &Coverage, peers: &Ranges, ports: &Ranges) -> Vec<(Ranges, Ranges)> {
    // Per label of the coverage, its group (None: nothing missing); the
    // uncovered parts miss all of `ports`.
    let mut groups: Groups<Ranges, (Ranges, Ranges)> = Groups::new();
    let mut group_at = PerLabel::new(cov.ports.len(), peers);
    let mut uncovered: Option<usize> = None;
    cov.walk(peers, |lo, hi, label| {
        let group = match label {
            None if ports.is_empty() => None,
            None => Some(*uncovered.get_or_insert_with(|| {
                groups.index(ports.clone(), || (ports.clone(), Ranges::empty()))
            })),
            Some(l) => *group_at.get_or_insert_with(l, || {
                let m = ports.subtract(&cov.ports[l]);
                (!m.is_empty()).then(|| groups.index(m.clone(), || (m, Ranges::empty())))
            }),
        };
        if let Some(g) = group {
            groups.items[g].1.push(lo, hi);
        }
    });
    groups.items
}

/// The parts of `peers` the coverage allows some of `ports` to, grouped by
/// those ports: (common ports, peers), in first-seen order.
fn common_parts(cov: &Coverage, peers: &Ranges, ports: &Ranges) -> Vec<(Ranges, Ranges)> {
    let mut groups: Groups<Ranges, (Ranges, Ranges)> = Groups::new();
    let mut group_at = PerLabel::new(cov.ports.len(), peers);
    cov.walk(peers, |lo, hi, label| {
        let Some(l) = label else {
            return;
        };
        let group = *group_at.get_or_insert_with(l, || {
            let q = ports.intersect(&cov.ports[l]);
            (!q.is_empty()).then(|| groups.index(q.clone(), || (q, Ranges::empty())))
        });
        if let Some(g) = group {
            groups.items[g].1.push(lo, hi);
        }
    });
    groups.items
}

/// The parts of `sub`'s entries that `cluster` does not allow (empty: contained).
pub fn excess(sub: &Boundary, cluster: &Boundary) -> Vec<Excess> {
    excess_in(sub, &mut Cells::new(&cluster.allow), usize::MAX)
}

/// The first `limit` parts of [`excess`] (in the same order): enough for a
/// refusal's reason, without computing (and holding) every part of a large
/// sub-boundary.
pub fn excess_upto(sub: &Boundary, cluster: &Boundary, limit: usize) -> Vec<Excess> {
    excess_in(sub, &mut Cells::new(&cluster.allow), limit)
}

/// Ports missing and the peers that miss them.
type Missing = (Ranges, Arc<Ranges>);

fn excess_in(sub: &Boundary, cells: &mut Cells<'_>, limit: usize) -> Vec<Excess> {
    let mut out = Vec::new();
    for e in &sub.allow {
        if out.len() >= limit {
            break;
        }
        // Cells with the same coverage and ports have the same parts.
        let mut done: HashMap<(usize, &Ranges), Vec<Missing>> = HashMap::new();
        for &dir in &e.directions {
            for (&proto, ports) in &e.protocols {
                for fam in FAMILIES {
                    let peers = e.peers.family(fam);
                    if peers.is_empty() {
                        continue;
                    }
                    let i = cells.index(dir, proto, fam);
                    let parts = done.entry((i, ports)).or_insert_with(|| {
                        missing_parts(&cells.built[i], peers, ports)
                            .into_iter()
                            .map(|(m, p)| (m, Arc::new(p)))
                            .collect()
                    });
                    for (m, p) in parts.iter().take(limit.saturating_sub(out.len())) {
                        out.push(Excess::new(&e.name, dir, proto, fam, p.clone(), m.clone()));
                    }
                }
            }
        }
    }
    out
}

/// The intersection of `sub` with `cluster`, as entries of a new sub-boundary
/// document, and what was cut.
pub fn narrow(sub: &Boundary, cluster: &Boundary) -> (Vec<EntryDoc>, Vec<Excess>) {
    let mut cells = Cells::new(&cluster.allow);
    let docs = intersection_in(sub, &mut cells, usize::MAX).unwrap_or_default();
    (docs, excess_in(sub, &mut cells, usize::MAX))
}

/// The intersection of `sub` with `cluster` as entries (the first half of
/// [`narrow`]): per entry of `sub`, one entry per group of peers that get the
/// same protocols and ports, named `name.1`, `name.2`, … (the name shortened
/// so the result stays within 64 characters and unique).
pub fn intersection(sub: &Boundary, cluster: &Boundary) -> Vec<EntryDoc> {
    intersection_in(sub, &mut Cells::new(&cluster.allow), usize::MAX).unwrap_or_default()
}

/// [`intersection`], or None as soon as the entries would take more than
/// `max_bytes` as a document (estimated; the ports of 10k entries × 1000
/// port specs are not written out only to be refused).
pub fn intersection_within(
    sub: &Boundary,
    cluster: &Boundary,
    max_bytes: usize,
) -> Option<Vec<EntryDoc>> {
    intersection_in(sub, &mut Cells::new(&cluster.allow), max_bytes)
}

/// Direction, protocol and ports of a part of an entry.
type Cell = (Direction, Proto, Ranges);

/// What `sub` allows inside `cluster`, as entries: `sub`'s own entries
/// (groups resolved, names kept) when it lies inside, else [`intersection`].
/// One pass when it does not (the check stops at the first excess).
pub fn effective_entries(sub: &Boundary, cluster: &Boundary) -> Vec<EntryDoc> {
    let mut cells = Cells::new(&cluster.allow);
    let inside = sub.allow.iter().all(|e| {
        e.directions.iter().all(|&dir| {
            e.protocols.iter().all(|(&proto, ports)| {
                FAMILIES.into_iter().all(|fam| {
                    let peers = e.peers.family(fam);
                    peers.is_empty() || {
                        let i = cells.index(dir, proto, fam);
                        cells.built[i].covers(peers, ports)
                    }
                })
            })
        })
    });
    if inside {
        entries_as_docs(sub)
    } else {
        intersection_in(sub, &mut cells, usize::MAX).unwrap_or_default()
    }
}

/// A growing list of values with an index by key, in first-seen order.
struct Groups<K, V> {
    index: HashMap<K, usize>,
    items: Vec<V>,
}

impl<K: std::hash::Hash + Eq, V> Groups<K, V> {
    fn new() -> Self {
        Groups {
            index: HashMap::new(),
            items: Vec::new(),
        }
    }

    /// The index of `key`'s value, made by `new` if the key is new.
    fn index(&mut self, key: K, new: impl FnOnce() -> V) -> usize {
        let items = &mut self.items;
        *self.index.entry(key).or_insert_with(|| {
            items.push(new());
            items.len() - 1
        })
    }

    fn get(&mut self, key: K, new: impl FnOnce() -> V) -> &mut V {
        let i = self.index(key, new);
        &mut self.items[i]
    }
}

fn intersection_in(
    sub: &Boundary,
    cells: &mut Cells<'_>,
    max_bytes: usize,
) -> Option<Vec<EntryDoc>> {
    let mut docs = Vec::new();
    let mut bytes = 0usize;
    let mut used: HashSet<String> = HashSet::new();
    for e in &sub.allow {
        // Cells with the same coverage and ports have the same parts: each
        // walk once (first), then only references to its results.
        let mut done: HashMap<(usize, &Ranges), Vec<(Ranges, Ranges)>> = HashMap::new();
        let mut cells_of_e = Vec::new();
        for &dir in &e.directions {
            for (&proto, ports) in &e.protocols {
                for fam in FAMILIES {
                    let peers = e.peers.family(fam);
                    if peers.is_empty() {
                        continue;
                    }
                    let i = cells.index(dir, proto, fam);
                    done.entry((i, ports))
                        .or_insert_with(|| common_parts(&cells.built[i], peers, ports));
                    cells_of_e.push((dir, proto, fam, (i, ports)));
                }
            }
        }
        // (direction, protocol, ports) → peers allowed so, per family.
        let mut parts: Groups<Cell, (Cell, [&Ranges; 2])> = Groups::new();
        for (dir, proto, fam, key) in cells_of_e {
            for (q, p) in &done[&key] {
                let cell = (dir, proto, q.clone());
                let part = parts.get(cell.clone(), || (cell, [&EMPTY, &EMPTY]));
                part.1[usize::from(fam == Family::V6)] = p;
            }
        }
        // Entries: one per set of peers and direction, with every protocol
        // those peers get; the same protocol and ports both ways → "both".
        // (Peers of 100k intervals: a cheap fingerprint, then equality.)
        let mut by_peers: Vec<([&Ranges; 2], Vec<Cell>)> = Vec::new();
        let mut seen: HashMap<u64, Vec<usize>> = HashMap::new();
        for (cell, peers) in parts.items {
            let same = seen.entry(fingerprint(peers)).or_default();
            let equal =
                |o: &[&Ranges; 2]| (0..2).all(|f| std::ptr::eq(o[f], peers[f]) || o[f] == peers[f]);
            match same.iter().find(|&&i| equal(&by_peers[i].0)) {
                Some(&i) => by_peers[i].1.push(cell),
                None => {
                    same.push(by_peers.len());
                    by_peers.push((peers, vec![cell]));
                }
            }
        }
        let mut k = 0;
        for (peers, list) in by_peers {
            let mut out: [(Direction, Vec<(Proto, Ranges)>); 3] = [
                (Direction::Both, Vec::new()),
                (Direction::In, Vec::new()),
                (Direction::Out, Vec::new()),
            ];
            for (dir, proto, q) in &list {
                let twin = list
                    .iter()
                    .any(|(d, p, r)| d != dir && p == proto && r == q);
                match (dir, twin) {
                    (_, true) if *dir == Direction::In => out[0].1.push((*proto, q.clone())),
                    (_, true) => {}
                    (Direction::In, false) => out[1].1.push((*proto, q.clone())),
                    _ => out[2].1.push((*proto, q.clone())),
                }
            }
            let mut cidrs = crate::model::to_cidrs(Family::V4, peers[0]);
            cidrs.extend(crate::model::to_cidrs(Family::V6, peers[1]));
            let peer_bytes: usize = cidrs.iter().map(|c| c.len() + 3).sum();
            for (direction, protos) in out {
                if protos.is_empty() {
                    continue;
                }
                // As TOML, roughly: the entry's keys, its peers, its ports.
                let port_bytes: usize = protos
                    .iter()
                    .map(|(_, q)| 32 + 14 * q.intervals().len())
                    .sum();
                bytes = bytes.saturating_add(100 + peer_bytes + port_bytes);
                if bytes > max_bytes {
                    return None;
                }
                k += 1;
                let name = derive_name(&e.name, &mut k, &mut used);
                docs.push(entry_doc(name, cidrs.clone(), direction, protos));
            }
        }
    }
    Some(docs)
}

fn entry_doc(
    name: String,
    peers: Vec<String>,
    direction: Direction,
    protos: Vec<(Proto, Ranges)>,
) -> EntryDoc {
    let everything =
        protos.len() == Proto::ALL.len() && protos.iter().all(|(_, q)| *q == all_ports());
    EntryDoc {
        name,
        peers,
        direction,
        protocols: (!everything).then(|| {
            protos
                .into_iter()
                .map(|(proto, q)| ProtoDoc {
                    proto,
                    ports: (proto.has_ports() && q != all_ports())
                        .then(|| q.to_strings().into_iter().map(PortSpec::Text).collect()),
                })
                .collect()
        }),
    }
}

/// A boundary's allow entries as documents, groups resolved (peers merged
/// into the fewest CIDRs): what a boundary allows, by itself.
pub fn entries_as_docs(b: &Boundary) -> Vec<EntryDoc> {
    b.allow
        .iter()
        .map(|e| {
            let mut peers = crate::model::to_cidrs(Family::V4, &e.peers.v4);
            peers.extend(crate::model::to_cidrs(Family::V6, &e.peers.v6));
            let direction = match e.directions.as_slice() {
                [d] => *d,
                _ => Direction::Both,
            };
            let protos = e.protocols.iter().map(|(p, q)| (*p, q.clone())).collect();
            entry_doc(e.name.clone(), peers, direction, protos)
        })
        .collect()
}

/// No peers.
static EMPTY: Ranges = Ranges::empty();

/// A fast hash of a set of peers, IPv4 and IPv6 (SipHash over 100k
/// intervals is slow).
fn fingerprint(p: [&Ranges; 2]) -> u64 {
    let mix = |h: u64, x: u128| {
        // Truncation intended: both halves are mixed in.
        #[allow(clippy::cast_possible_truncation)]
        let (a, b) = (x as u64, (x >> 64) as u64);
        (h ^ a ^ b.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    };
    let mut h = 0u64;
    for r in p {
        h = mix(h, r.intervals().len() as u128);
        for &(lo, hi) in r.intervals() {
            h = mix(mix(h, lo), hi);
        }
    }
    h
}

/// `base.k`, with `base` shortened so the name has at most [`MAX_NAME`]
/// characters, and `k` raised until the name is not in `used`.
fn derive_name(base: &str, k: &mut usize, used: &mut HashSet<String>) -> String {
    loop {
        let suffix = format!(".{k}");
        let mut keep = base.len().min(MAX_NAME.saturating_sub(suffix.len()));
        // Validated names are ASCII; stay on a character boundary anyway.
        while !base.is_char_boundary(keep) {
            keep -= 1;
        }
        let name = format!("{}{suffix}", &base[..keep]);
        if used.insert(name.clone()) {
            return name;
        }
        *k += 1;
    }
}

/// One flow as seen from the node.
///
/// The peer's family is the packet's: an IPv4-mapped IPv6 address
/// (`::ffff:10.0.0.1`) is an IPv6 packet's address, which the kernel matches
/// against `ip6` rules only, so it matches IPv6 peers (such as `::/0`), never
/// IPv4 ones. (A socket's mapped address on a dual-stack socket is an IPv4
/// packet; the caller converts it with `Ipv6Addr::to_ipv4_mapped`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// In (peer → node) or Out (node → peer).
    pub direction: Direction,
    /// The other end.
    pub peer: IpAddr,
    /// Protocol.
    pub proto: Proto,
    /// Destination port (ignored for ICMP and other protocols).
    pub port: u16,
}

fn matches(e: &Entry, f: &Flow) -> bool {
    let (fam, addr) = match f.peer {
        IpAddr::V4(a) => (Family::V4, u128::from(u32::from(a))),
        IpAddr::V6(a) => (Family::V6, u128::from(a)),
    };
    e.directions.contains(&f.direction)
        && e.protocols
            .get(&f.proto)
            .is_some_and(|p| !f.proto.has_ports() || p.contains(u128::from(f.port)))
        && e.peers.family(fam).contains(addr)
}

/// The first entry of `entries` that allows `f`.
pub fn first_match<'a>(entries: &'a [Entry], f: &Flow) -> Option<&'a str> {
    entries
        .iter()
        .find(|e| matches(e, f))
        .map(|e| e.name.as_str())
}

/// Whether the cluster's `dhcp_servers` let `f` through whatever the
/// entries say: a reply from a listed server to the client port (udp 68,
/// DHCPv6 546), or a request of the node's client to the server port (udp
/// 67, DHCPv6 547) of a listed server or of the broadcast (multicast)
/// address. Flows carry no source port: the kernel's rules also require
/// the server port as source of a reply (and the client port as source of
/// a request), and check a pinned server's MAC, which a flow cannot show.
pub fn dhcp_admits(cluster: &Boundary, f: &Flow) -> bool {
    let Some(servers) = &cluster.dhcp_servers else {
        return false;
    };
    if f.proto != Proto::Udp {
        return false;
    }
    let (fam, addr, server_port, client_port, all) = match f.peer {
        IpAddr::V4(a) => (
            Family::V4,
            u128::from(u32::from(a)),
            67,
            68,
            u128::from(u32::MAX),
        ),
        IpAddr::V6(a) => (
            Family::V6,
            u128::from(a),
            547,
            546,
            u128::from(std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2)),
        ),
    };
    let listed = || servers.iter().any(|s| s.family == fam && s.addr == addr);
    match f.direction {
        Direction::In => f.port == client_port && listed(),
        Direction::Out => {
            let has_fam = servers.iter().any(|s| s.family == fam);
            f.port == server_port && has_fam && (addr == all || listed())
        }
        Direction::Both => false,
    }
}

/// Whether the kernel lets a new flow `f` through: a failsafe entry allows
/// it, or the cluster's `dhcp_servers` ([`dhcp_admits`]), or the cluster
/// boundary allows it and so does the sub-boundary (if any). No
/// allocation; O(entries × log peers).
pub fn admits(cluster: &Boundary, sub: Option<&Boundary>, f: &Flow) -> bool {
    let any = |entries: &[Entry]| entries.iter().any(|e| matches(e, f));
    any(&cluster.failsafe)
        || dhcp_admits(cluster, f)
        || (any(&cluster.allow) && sub.is_none_or(|s| any(&s.allow)))
}

/// [`admits`] with the boundaries' coverages built once (≈ the cost of one
/// [`excess`]): then one binary search per boundary per flow, whatever the
/// number of entries. For testing many flows (conntrack entries) at once.
pub struct Admitter {
    /// The cluster boundary's `dhcp_servers` only (no entries).
    dhcp: Boundary,
    failsafe: Allows,
    cluster: Allows,
    sub: Option<Allows>,
}

/// A boundary's coverage of every cell.
struct Allows {
    cell: [usize; 16],
    built: Vec<Coverage>,
}

impl Allows {
    fn cell_index(dir: Direction, proto: Proto, fam: Family) -> usize {
        let d = usize::from(dir != Direction::In);
        let p = Proto::ALL.iter().position(|&x| x == proto).unwrap_or(0);
        let f = usize::from(fam == Family::V6);
        (d * 4 + p) * 2 + f
    }

    fn new(entries: &[Entry]) -> Self {
        let mut cells = Cells::new(entries);
        let mut cell = [0; 16];
        for dir in [Direction::In, Direction::Out] {
            for proto in Proto::ALL {
                for fam in FAMILIES {
                    cell[Self::cell_index(dir, proto, fam)] = cells.index(dir, proto, fam);
                }
            }
        }
        Allows {
            cell,
            built: cells.built,
        }
    }

    fn allows(&self, f: &Flow) -> bool {
        if f.direction == Direction::Both {
            return false;
        }
        let (fam, addr) = match f.peer {
            IpAddr::V4(a) => (Family::V4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (Family::V6, u128::from(a)),
        };
        let cov = &self.built[self.cell[Self::cell_index(f.direction, f.proto, fam)]];
        let i = cov.segs.partition_point(|s| s.1 < addr);
        cov.segs.get(i).is_some_and(|&(lo, _, l)| {
            lo <= addr && (!f.proto.has_ports() || cov.ports[l].contains(u128::from(f.port)))
        })
    }
}

impl Admitter {
    /// Builds the coverages of the failsafe entries and both boundaries.
    pub fn new(cluster: &Boundary, sub: Option<&Boundary>) -> Self {
        Admitter {
            dhcp: Boundary {
                dhcp_servers: cluster.dhcp_servers.clone(),
                ..Boundary::default()
            },
            failsafe: Allows::new(&cluster.failsafe),
            cluster: Allows::new(&cluster.allow),
            sub: sub.map(|s| Allows::new(&s.allow)),
        }
    }

    /// Same answer as [`admits`]; no allocation.
    pub fn admits(&self, f: &Flow) -> bool {
        self.failsafe.allows(f)
            || dhcp_admits(&self.dhcp, f)
            || (self.cluster.allows(f) && self.sub.as_ref().is_none_or(|s| s.allows(f)))
    }
}

/// Why a flow is allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The verdict.
    pub allowed: bool,
    /// The failsafe entry that let it through, if any (`dhcp_servers`:
    /// the cluster boundary's DHCP servers, see [`dhcp_admits`]).
    pub failsafe: Option<String>,
    /// The cluster entry that allows it (None: the cluster boundary denies it).
    pub cluster: Option<String>,
    /// None: no sub-boundary; Some(None): the sub-boundary denies it.
    pub sub: Option<Option<String>>,
    /// One line for humans.
    pub reason: String,
}

/// Evaluates a flow against the failsafe, the cluster boundary and the
/// tenant's sub-boundary; a packet must pass both boundaries.
pub fn explain(cluster: &Boundary, sub: Option<&Boundary>, f: &Flow) -> Explanation {
    let failsafe = first_match(&cluster.failsafe, f)
        .map(str::to_owned)
        .or_else(|| dhcp_admits(cluster, f).then(|| "dhcp_servers".to_owned()));
    let c = first_match(&cluster.allow, f).map(str::to_owned);
    let s = sub.map(|b| first_match(&b.allow, f).map(str::to_owned));
    // The kernel's answer: failsafe, or both boundaries (see [`admits`]).
    let allowed = failsafe.is_some() || (c.is_some() && s.as_ref().is_none_or(Option::is_some));
    let reason = if let Some(fs) = &failsafe {
        if first_match(&cluster.failsafe, f).is_none() {
            "allowed as DHCP with the cluster boundary's dhcp_servers".to_owned()
        } else {
            format!("allowed by failsafe entry {fs:?}")
        }
    } else {
        match (&c, &s) {
            (None, _) => "denied: no entry of the cluster boundary allows it".to_owned(),
            (Some(ce), Some(None)) => format!("denied: the cluster boundary allows it ({ce:?}) but no entry of the sub-boundary does"),
            (Some(ce), Some(Some(se))) => format!("allowed by cluster entry {ce:?} and sub-boundary entry {se:?}"),
            (Some(ce), None) => format!("allowed by cluster entry {ce:?} (no sub-boundary)"),
        }
    };
    Explanation {
        allowed,
        failsafe,
        cluster: c,
        sub: s,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BoundaryDoc;
    use proptest::prelude::*;

    fn b(toml: &str) -> Boundary {
        BoundaryDoc::from_toml(toml)
            .unwrap()
            .validate(true)
            .unwrap()
    }

    fn cluster() -> Boundary {
        b(r#"
[groups]
tenant-a = ["10.0.1.0/24", "fd00:a::/64"]
[[allow]]
name = "cluster"
peers = ["@tenant-a"]
[[allow]]
name = "web"
peers = ["0.0.0.0/0", "::/0"]
direction = "in"
protocols = [{ proto = "tcp", ports = [80, 443] }]
[[failsafe]]
name = "ssh"
peers = ["192.0.2.10"]
direction = "in"
protocols = [{ proto = "tcp", ports = [22] }]
"#)
    }

    /// The quadratic algorithm this module replaced (split each sub-boundary
    /// interval at every cluster interval end, then test every piece against
    /// every cluster entry): the reference the sweep must agree with.
    mod reference {
        use super::super::*;
        use crate::model::to_cidrs;

        type Rect<'a> = (&'a Ranges, &'a Ranges, &'a str);

        fn rects(b: &[Entry], dir: Direction, proto: Proto, fam: Family) -> Vec<Rect<'_>> {
            b.iter()
                .filter(|e| e.directions.contains(&dir))
                .filter_map(|e| {
                    e.protocols
                        .get(&proto)
                        .map(|ports| (e.peers.family(fam), ports, e.name.as_str()))
                })
                .filter(|(p, _, _)| !p.is_empty())
                .collect()
        }

        fn elementary(p: &Ranges, cover: &[Rect<'_>]) -> Vec<Ranges> {
            let mut out = Vec::new();
            for &(a, b) in p.intervals() {
                let mut cuts = vec![a];
                for (c, _, _) in cover {
                    for &(lo, hi) in c.intervals() {
                        if lo > a && lo <= b {
                            cuts.push(lo);
                        }
                        if hi < b && hi >= a {
                            cuts.push(hi + 1);
                        }
                    }
                }
                cuts.sort_unstable();
                cuts.dedup();
                for (i, &start) in cuts.iter().enumerate() {
                    let end = cuts.get(i + 1).map_or(b, |n| n - 1);
                    out.push(Ranges::interval(start, end));
                }
            }
            out
        }

        /// (entry, direction, proto, CIDRs, ports) per part.
        pub type Part = (String, Direction, Proto, Vec<String>, Ranges);

        pub fn excess(sub: &Boundary, cluster: &Boundary) -> Vec<Part> {
            let mut out = Vec::new();
            for e in &sub.allow {
                for &dir in &e.directions {
                    for (&proto, ports) in &e.protocols {
                        for fam in FAMILIES {
                            let peers = e.peers.family(fam);
                            if peers.is_empty() {
                                continue;
                            }
                            let cover = rects(&cluster.allow, dir, proto, fam);
                            let mut pieces: Vec<(Ranges, Ranges)> = Vec::new();
                            for seg in elementary(peers, &cover) {
                                let covered = cover
                                    .iter()
                                    .filter(|(c, _, _)| seg.is_subset(c))
                                    .fold(Ranges::empty(), |acc, (_, d, _)| acc.union(d));
                                let missing = ports.subtract(&covered);
                                if missing.is_empty() {
                                    continue;
                                }
                                match pieces.last_mut() {
                                    Some((p, m)) if *m == missing => *p = p.union(&seg),
                                    _ => pieces.push((seg, missing)),
                                }
                            }
                            for (p, m) in pieces {
                                out.push((e.name.clone(), dir, proto, to_cidrs(fam, &p), m));
                            }
                        }
                    }
                }
            }
            out
        }

        pub fn narrow(sub: &Boundary, cluster: &Boundary) -> Vec<EntryDoc> {
            let mut docs = Vec::new();
            let mut k = 0;
            for e in &sub.allow {
                for &dir in &e.directions {
                    for (&proto, ports) in &e.protocols {
                        for fam in FAMILIES {
                            let peers = e.peers.family(fam);
                            for (c, d, _) in rects(&cluster.allow, dir, proto, fam) {
                                let p = peers.intersect(c);
                                let q = ports.intersect(d);
                                if p.is_empty() || q.is_empty() {
                                    continue;
                                }
                                k += 1;
                                docs.push(EntryDoc {
                                    name: format!("r{k}"),
                                    peers: to_cidrs(fam, &p),
                                    direction: dir,
                                    protocols: Some(vec![ProtoDoc {
                                        proto,
                                        ports: proto.has_ports().then(|| {
                                            q.to_strings().into_iter().map(PortSpec::Text).collect()
                                        }),
                                    }]),
                                });
                            }
                        }
                    }
                }
            }
            docs
        }
    }

    /// Excess parts normalised: per (entry, direction, protocol, family,
    /// missing ports), the union of the peers; sorted.
    type Normal = Vec<(
        String,
        Direction,
        Proto,
        Family,
        Vec<(u128, u128)>,
        Vec<(u128, u128)>,
    )>;

    fn normal(parts: Vec<reference::Part>) -> Normal {
        let mut m: HashMap<(String, Direction, Proto, Family, Ranges), Ranges> = HashMap::new();
        for (entry, dir, proto, cidrs, ports) in parts {
            for c in cidrs {
                let (fam, lo, hi) = crate::model::parse_cidr(&c).unwrap();
                let set = m
                    .entry((entry.clone(), dir, proto, fam, ports.clone()))
                    .or_default();
                *set = set.union(&Ranges::interval(lo, hi));
            }
        }
        let mut v: Normal = m
            .into_iter()
            .map(|((e, d, p, f, ports), peers)| {
                (
                    e,
                    d,
                    p,
                    f,
                    ports.intervals().to_vec(),
                    peers.intervals().to_vec(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// The new excess in the reference's form (every CIDR listed).
    fn parts(ex: &[Excess]) -> Vec<reference::Part> {
        ex.iter()
            .map(|x| {
                (
                    x.entry.clone(),
                    x.direction,
                    x.proto,
                    crate::model::to_cidrs(x.family, &x.set),
                    x.ports.clone(),
                )
            })
            .collect()
    }

    fn flow(dir: Direction, peer: &str, proto: Proto, port: u16) -> Flow {
        Flow {
            direction: dir,
            peer: peer.parse().unwrap(),
            proto,
            port,
        }
    }

    #[test]
    fn narrower_sub_boundary_is_contained() {
        let sub = b(r#"
[[allow]]
name = "https-only"
peers = ["0.0.0.0/0"]
direction = "in"
protocols = [{ proto = "tcp", ports = [443] }]
[[allow]]
name = "peers"
peers = ["10.0.1.0/25"]
"#);
        assert_eq!(excess(&sub, &cluster()), vec![]);
    }

    #[test]
    fn wider_entry_is_refused_naming_the_part_that_sticks_out() {
        let sub = b(r#"
[[allow]]
name = "too-wide"
peers = ["10.0.0.0/16"]
direction = "in"
protocols = [{ proto = "tcp", ports = ["80-81"] }]
"#);
        let ex = excess(&sub, &cluster());
        // Port 80 is allowed from anywhere; port 81 only from tenant A's /24.
        assert_eq!(ex.len(), 1, "{ex:?}");
        assert_eq!(ex[0].entry, "too-wide");
        assert_eq!(ex[0].ports, Ranges::interval(81, 81));
        assert!(!ex[0].peers.contains(&"10.0.1.0/24".to_owned()));
        assert!(ex[0].to_string().contains("ports 81"), "{}", ex[0]);
        let (docs, cut) = narrow(&sub, &cluster());
        assert_eq!(cut, ex);
        let narrowed = BoundaryDoc {
            allow: docs,
            ..Default::default()
        }
        .validate(false)
        .unwrap();
        assert!(excess(&narrowed, &cluster()).is_empty());
    }

    #[test]
    fn explain_names_the_deciding_entries() {
        let c = cluster();
        let sub = b("[[allow]]\nname = \"https\"\npeers = [\"::/0\", \"0.0.0.0/0\"]\ndirection = \"in\"\nprotocols = [{ proto = \"tcp\", ports = [443] }]\n");
        let e = explain(
            &c,
            Some(&sub),
            &flow(Direction::In, "203.0.113.5", Proto::Tcp, 443),
        );
        assert!(e.allowed);
        assert_eq!(e.cluster.as_deref(), Some("web"));
        let e = explain(
            &c,
            Some(&sub),
            &flow(Direction::In, "203.0.113.5", Proto::Tcp, 80),
        );
        assert!(
            !e.allowed && e.reason.contains("sub-boundary"),
            "{}",
            e.reason
        );
        let e = explain(
            &c,
            Some(&sub),
            &flow(Direction::In, "192.0.2.10", Proto::Tcp, 22),
        );
        assert!(e.allowed && e.failsafe.as_deref() == Some("ssh"));
        let e = explain(&c, None, &flow(Direction::Out, "fd00:a::5", Proto::Udp, 53));
        assert!(e.allowed && e.cluster.as_deref() == Some("cluster"));
        let e = explain(&c, None, &flow(Direction::Out, "8.8.8.8", Proto::Udp, 53));
        assert!(!e.allowed);
    }

    #[test]
    fn explain_matches_mapped_addresses_and_other_protocols_as_the_kernel() {
        let c = b("[[allow]]\nname = \"v4\"\npeers = [\"10.0.0.0/8\"]\n[[allow]]\nname = \"v6\"\npeers = [\"::ffff:192.0.2.0/120\"]\nprotocols = [{ proto = \"other\" }]\n");
        // An IPv4-mapped peer in a flow is an IPv6 packet: 10.0.0.0/8 does not match it.
        let f = flow(Direction::In, "::ffff:10.0.0.1", Proto::Tcp, 22);
        assert!(!explain(&c, None, &f).allowed && !admits(&c, None, &f));
        let f = flow(Direction::In, "10.0.0.1", Proto::Other, 0);
        assert_eq!(explain(&c, None, &f).cluster.as_deref(), Some("v4"));
        // A mapped peer in a document matches IPv6 packets from that address only.
        let f = flow(Direction::Out, "::ffff:192.0.2.7", Proto::Other, 9);
        assert!(admits(&c, None, &f) && explain(&c, None, &f).cluster.as_deref() == Some("v6"));
        let f = flow(Direction::Out, "192.0.2.7", Proto::Other, 9);
        assert!(!admits(&c, None, &f));
        let f = flow(Direction::Out, "::ffff:192.0.2.7", Proto::Udp, 9);
        assert!(!admits(&c, None, &f));
    }

    #[test]
    fn narrowing_many_hosts_gives_few_entries_with_valid_names() {
        let hosts: Vec<String> = (0..1000u32)
            .map(|i| format!("\"{}\"", std::net::Ipv4Addr::from(0x0a00_0000 + 7 * i)))
            .collect();
        let c = b(&format!(
            "[[allow]]\nname = \"hosts\"\npeers = [{}]\n[[allow]]\nname = \"web\"\npeers = [\"0.0.0.0/0\"]\ndirection = \"in\"\nprotocols = [{{ proto = \"tcp\", ports = [443] }}]\n",
            hosts.join(",")
        ));
        let long = "x".repeat(64);
        let s = b(&format!(
            "[[allow]]\nname = \"{long}\"\npeers = [\"0.0.0.0/0\", \"::/0\"]\n[[allow]]\nname = \"{}\"\npeers = [\"10.0.0.0/8\"]\n",
            &long[..63]
        ));
        let (docs, cut) = narrow(&s, &c);
        // The hosts get everything both ways (one entry); the rest of the
        // IPv4 space gets tcp/443 in (another), per sub-boundary entry.
        assert_eq!(
            docs.len(),
            4,
            "{:?}",
            docs.iter()
                .map(|d| (&d.name, d.peers.len()))
                .collect::<Vec<_>>()
        );
        assert!(docs.iter().all(|d| d.name.len() <= MAX_NAME));
        let n = BoundaryDoc {
            allow: docs,
            ..Default::default()
        }
        .validate(false)
        .unwrap();
        assert!(excess(&n, &c).is_empty());
        assert!(cut
            .iter()
            .any(|x| !x.listed_in_full() && x.peers.len() == MAX_LISTED_PEERS));
        assert!(cut[0].to_string().contains("and more"), "{}", cut[0]);
    }

    #[test]
    fn many_distinct_port_sets_agree_with_the_reference() {
        // 100 entries with distinct ports (plus one overlapping all of
        // them): more labels than the dense per-label cache takes.
        let mut t = String::new();
        for i in 0..100 {
            t.push_str(&format!("[[allow]]\nname = \"e{i}\"\npeers = [\"10.0.{i}.0/24\"]\nprotocols = [{{ proto = \"tcp\", ports = [{i}] }}]\n"));
        }
        t.push_str("[[allow]]\nname = \"wide\"\npeers = [\"10.0.0.0/17\"]\nprotocols = [{ proto = \"tcp\", ports = [1000] }]\n");
        let c = b(&t);
        let s = b("[[allow]]\nname = \"s\"\npeers = [\"10.0.0.0/16\"]\nprotocols = [{ proto = \"tcp\", ports = [\"0-2000\"] }]\n");
        assert_eq!(
            normal(parts(&excess(&s, &c))),
            normal(reference::excess(&s, &c))
        );
        let n = BoundaryDoc {
            allow: intersection(&s, &c),
            ..Default::default()
        }
        .validate(false)
        .unwrap();
        let r = BoundaryDoc {
            allow: reference::narrow(&s, &c),
            ..Default::default()
        }
        .validate(false)
        .unwrap();
        assert_eq!(n.allow.len(), 101, "one entry per port set");
        for h in [0u32, 5, 99, 100, 127, 128, 255] {
            for port in [0, 5, 99, 100, 1000, 2000] {
                let f = flow(Direction::In, &format!("10.0.{h}.9"), Proto::Tcp, port);
                assert_eq!(
                    first_match(&n.allow, &f).is_some(),
                    first_match(&r.allow, &f).is_some(),
                    "{f:?}"
                );
            }
        }
        let inside = b("[[allow]]\nname = \"in\"\npeers = [\"10.0.7.0/24\"]\nprotocols = [{ proto = \"tcp\", ports = [7, 1000] }]\n");
        assert_eq!(effective_entries(&inside, &c), entries_as_docs(&inside));
        assert_ne!(effective_entries(&s, &c), entries_as_docs(&s));
    }

    // Small universe so random boundaries overlap often: 10.0.0.0/28 and
    // fd00::/124, ports 0-15; names up to the 64-character limit. Also the
    // shapes at the edges (review): whole families (/0), the group `@g`
    // (always defined by `arb_text`), ports up to 65535.
    fn arb_peer() -> impl Strategy<Value = String> {
        let small = (any::<bool>(), 0u8..16, 0u8..5).prop_map(|(v6, host, len)| {
            let net = u32::from(host) & !((1u32 << len) - 1);
            if v6 {
                format!("\"fd00::{net:x}/{}\"", 128 - u32::from(len))
            } else {
                format!("\"10.0.0.{net}/{}\"", 32 - u32::from(len))
            }
        });
        prop_oneof![
            10 => small,
            1 => prop::sample::select(vec!["\"0.0.0.0/0\"".to_owned(), "\"::/0\"".to_owned()]),
            1 => Just("\"@g\"".to_owned()),
        ]
    }

    fn arb_entry(i: usize) -> impl Strategy<Value = String> {
        let peer = arb_peer();
        let lo = prop_oneof![3 => 0u16..16, 1 => 65530u16..=65535];
        let proto = (0usize..4, lo, 0u16..6, any::<bool>());
        (
            proptest::collection::vec(peer, 1..3),
            0usize..3,
            proptest::option::of(proptest::collection::vec(proto, 1..3)),
            0usize..4,
        )
            .prop_map(move |(peers, dir, protos, name)| {
                let prefix = [
                    "e".to_owned(),
                    "e.1.".to_owned(),
                    "x".repeat(62),
                    "x".repeat(63),
                ];
                let dirs = ["in", "out", "both"];
                let mut s = format!(
                    "[[allow]]\nname = \"{}{i}\"\npeers = [{}]\ndirection = \"{}\"\n",
                    prefix[name],
                    peers.join(", "),
                    dirs[dir]
                );
                if let Some(list) = protos {
                    let items: Vec<String> = list
                        .into_iter()
                        .map(|(p, lo, w, all)| {
                            let name = Proto::ALL[p].name();
                            if Proto::ALL[p].has_ports() && !all {
                                let hi = lo.saturating_add(w);
                                format!("{{ proto = \"{name}\", ports = [\"{lo}-{hi}\"] }}")
                            } else {
                                format!("{{ proto = \"{name}\" }}")
                            }
                        })
                        .collect();
                    s.push_str(&format!("protocols = [{}]\n", items.join(", ")));
                }
                s
            })
    }

    fn arb_text() -> impl Strategy<Value = String> {
        let group = proptest::collection::vec(
            arb_peer().prop_filter("not itself", |p| p != "\"@g\""),
            1..3,
        )
        .prop_map(|m| format!("[groups]\ng = [{}]\n", m.join(", ")));
        (group, 0usize..5).prop_flat_map(|(group, n)| {
            (0..n)
                .map(arb_entry)
                .collect::<Vec<_>>()
                .prop_map(move |v| format!("{group}{}", v.concat()))
        })
    }

    fn arb_boundary() -> impl Strategy<Value = Boundary> {
        arb_text().prop_map(|t| b(&t))
    }

    /// A `dhcp_servers` line (or none) over the small universe, some
    /// servers pinned to a MAC.
    fn arb_dhcp() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(proptest::collection::btree_map(
            (any::<bool>(), 0u8..20),
            any::<bool>(),
            0..3,
        ))
        .prop_map(|o| {
            o.map(|m| {
                let items: Vec<String> = m
                    .into_iter()
                    .enumerate()
                    .map(|(i, ((v6, h), pin))| {
                        let a = if v6 {
                            format!("fd00::{h:x}")
                        } else {
                            format!("10.0.0.{h}")
                        };
                        if pin {
                            format!("{{ addr = \"{a}\", mac = \"52:54:00:00:00:{i:02x}\" }}")
                        } else {
                            format!("\"{a}\"")
                        }
                    })
                    .collect();
                format!("dhcp_servers = [{}]\n", items.join(", "))
            })
        })
    }

    fn peer_of(fam: usize, h: u8) -> IpAddr {
        match fam {
            0 => format!("10.0.0.{h}"),
            1 => format!("fd00::{h:x}"),
            // IPv4-mapped: an IPv6 packet, never matched by 10.0.0.0/28.
            _ => format!("::ffff:10.0.0.{h}"),
        }
        .parse()
        .unwrap()
    }

    fn arb_flow() -> impl Strategy<Value = Flow> {
        // Ports of the small universe and DHCP's; peers of the universe
        // and the DHCP broadcast and multicast addresses.
        let port = prop_oneof![
            0u16..24,
            prop::sample::select(vec![67u16, 68, 546, 547]),
            65528u16..=65535,
        ];
        let peer = prop_oneof![
            8 => (0usize..3, 0u8..20).prop_map(|(fam, h)| peer_of(fam, h)),
            // Outside the universe: only a whole family (/0) takes them.
            1 => prop::sample::select(vec![
                "192.0.2.7".parse::<IpAddr>().unwrap(),
                "2001:db8::7".parse().unwrap(),
            ]),
            1 => prop::sample::select(vec![
                "255.255.255.255".parse::<IpAddr>().unwrap(),
                "ff02::1:2".parse().unwrap(),
            ]),
        ];
        (0usize..2, peer, 0usize..4, port).prop_map(|(d, peer, p, port)| Flow {
            direction: [Direction::In, Direction::Out][d],
            peer,
            proto: Proto::ALL[p],
            port,
        })
    }

    /// Every flow of the small universe.
    fn all_flows() -> Vec<Flow> {
        let mut v = Vec::new();
        // The universe's hosts, and two outside it (only /0 takes them);
        // its ports, and the top ones (ranges that end at 65535).
        let outside: [IpAddr; 2] = ["192.0.2.7".parse().unwrap(), "2001:db8::7".parse().unwrap()];
        let peers: Vec<IpAddr> = (0..2)
            .flat_map(|fam| (0..18).map(move |h| peer_of(fam, h)))
            .chain(outside)
            .collect();
        for direction in [Direction::In, Direction::Out] {
            for &peer in &peers {
                for proto in Proto::ALL {
                    for port in (0..22).chain(65532..=65535) {
                        v.push(Flow {
                            direction,
                            peer,
                            proto,
                            port,
                        });
                        if !proto.has_ports() {
                            break;
                        }
                    }
                }
            }
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn a_boundary_as_documents_allows_the_same(c in arb_boundary()) {
            let d = BoundaryDoc { allow: entries_as_docs(&c), ..Default::default() }.validate(false).unwrap();
            prop_assert!(excess(&d, &c).is_empty() && excess(&c, &d).is_empty());
            prop_assert_eq!(d.allow.len(), c.allow.len());
        }

        #[test]
        fn effective_entries_are_the_intersection(c in arb_boundary(), s in arb_boundary()) {
            let inside = excess(&s, &c).is_empty();
            let docs = effective_entries(&s, &c);
            prop_assert_eq!(inside, docs == entries_as_docs(&s) && (s.allow.is_empty() || docs.iter().zip(&s.allow).all(|(d, e)| d.name == e.name)));
            let n = BoundaryDoc { allow: docs, ..Default::default() }.validate(false).unwrap();
            for f in all_flows() {
                let want = first_match(&s.allow, &f).is_some() && first_match(&c.allow, &f).is_some();
                prop_assert_eq!(first_match(&n.allow, &f).is_some(), want, "{:?}", f);
            }
        }

        #[test]
        fn sweep_excess_equals_the_reference(c in arb_boundary(), s in arb_boundary()) {
            let ex = excess(&s, &c);
            prop_assert_eq!(normal(parts(&ex)), normal(reference::excess(&s, &c)));
            // One part per (entry, direction, protocol, family, missing ports).
            prop_assert_eq!(normal(parts(&ex)).len(), ex.len());
            for n in 0..4 {
                prop_assert_eq!(&excess_upto(&s, &c, n)[..], &ex[..n.min(ex.len())]);
            }
        }

        #[test]
        fn sweep_narrow_equals_the_reference_flow_by_flow(c in arb_boundary(), s in arb_boundary()) {
            let (docs, cut) = narrow(&s, &c);
            prop_assert_eq!(normal(parts(&cut)), normal(reference::excess(&s, &c)));
            // Every narrowed document validates (derived names included).
            let n = BoundaryDoc { allow: docs, ..Default::default() }.validate(false).unwrap();
            let r = BoundaryDoc { allow: reference::narrow(&s, &c), ..Default::default() }
                .validate(false)
                .unwrap();
            for f in all_flows() {
                prop_assert_eq!(first_match(&n.allow, &f).is_some(), first_match(&r.allow, &f).is_some(), "{:?}", f);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn accepted_sub_boundaries_never_widen(c in arb_text(), cd in arb_dhcp(), s in arb_text(), sd in arb_dhcp(), flows in proptest::collection::vec(arb_flow(), 20)) {
            let c = b(&format!("{}{c}", cd.unwrap_or_default()));
            // A sub-boundary naming DHCP servers (adding or "narrowing"
            // them) is refused, naming the field; the tenant can only send
            // it without.
            if let Some(sd) = &sd {
                let r = BoundaryDoc::from_toml(&format!("{sd}{s}")).unwrap().validate(false);
                prop_assert_eq!(r.unwrap_err().field, "dhcp_servers");
            }
            let s = BoundaryDoc::from_toml(&s).unwrap().validate(false).unwrap();
            prop_assert!(s.dhcp_servers.is_none());
            let ex = excess(&s, &c);
            for f in &flows {
                let sub_allows = first_match(&s.allow, f).is_some();
                let cluster_allows = first_match(&c.allow, f).is_some();
                if ex.is_empty() {
                    // Contained: whatever the sub-boundary allows, the cluster allows.
                    prop_assert!(!sub_allows || cluster_allows, "{f:?}");
                }
                if sub_allows && !cluster_allows {
                    prop_assert!(!ex.is_empty(), "a widening flow {f:?} was not reported");
                }
                // The kernel's answer with the sub-boundary never admits
                // more than without it: DHCP servers come from the cluster
                // boundary only, and a DHCP flow is admitted from a listed
                // server (or to it, or to the broadcast) only.
                let with_sub = admits(&c, Some(&s), f);
                prop_assert!(!with_sub || admits(&c, None, f), "{f:?}");
                prop_assert_eq!(Admitter::new(&c, Some(&s)).admits(f), with_sub);
                if dhcp_admits(&c, f) {
                    let servers = c.dhcp_servers.as_ref().unwrap();
                    let listed = servers.iter().any(|d| d.ip() == f.peer);
                    let bcast = ["255.255.255.255", "ff02::1:2"].iter().any(|a| a.parse::<IpAddr>().unwrap() == f.peer);
                    prop_assert!(f.proto == Proto::Udp && (listed || (f.direction == Direction::Out && bcast)), "{f:?}");
                    prop_assert!([67, 68, 546, 547].contains(&f.port), "{f:?}");
                }
            }
        }

        #[test]
        fn narrowing_is_the_intersection(c in arb_boundary(), s in arb_boundary(), flows in proptest::collection::vec(arb_flow(), 20)) {
            let (docs, _) = narrow(&s, &c);
            let n = BoundaryDoc { allow: docs, ..Default::default() }.validate(false).unwrap();
            prop_assert!(excess(&n, &c).is_empty());
            for f in &flows {
                let want = first_match(&s.allow, f).is_some() && first_match(&c.allow, f).is_some();
                prop_assert_eq!(first_match(&n.allow, f).is_some(), want, "{:?}", f);
            }
        }

        #[test]
        fn explain_agrees_with_evaluating_both(c in arb_boundary(), s in arb_boundary(), fs in arb_boundary(), f in arb_flow(), with_sub in any::<bool>()) {
            let mut c = c;
            c.failsafe = fs.allow.into_iter().take(1).collect();
            let sub = with_sub.then_some(&s);
            let e = explain(&c, sub, &f);
            let want = first_match(&c.failsafe, &f).is_some()
                || (first_match(&c.allow, &f).is_some() && sub.is_none_or(|s| first_match(&s.allow, &f).is_some()));
            prop_assert_eq!(e.allowed, want);
            prop_assert_eq!(admits(&c, sub, &f), want);
            prop_assert_eq!(Admitter::new(&c, sub).admits(&f), want);
        }
    }
}

/// Pathological shapes within the document limits (run in release:
/// `cargo test -p leasehold-netpolicy --release --lib -- --ignored stress`).
#[cfg(test)]
mod stress {
    use super::*;
    use crate::model::BoundaryDoc;
    use std::time::Instant;

    fn doc(entries: Vec<EntryDoc>) -> Boundary {
        BoundaryDoc {
            allow: entries,
            ..Default::default()
        }
        .validate(false)
        .unwrap()
    }

    fn entry(name: String, peers: &[&str], ports: Option<Vec<PortSpec>>) -> EntryDoc {
        EntryDoc {
            name,
            peers: peers.iter().map(|p| (*p).to_owned()).collect(),
            direction: Direction::Both,
            protocols: ports.map(|p| {
                vec![ProtoDoc {
                    proto: Proto::Tcp,
                    ports: Some(p),
                }]
            }),
        }
    }

    fn run(what: &str, s: &Boundary, c: &Boundary) {
        let t = Instant::now();
        let ex = excess(s, c);
        let te = t.elapsed();
        let t = Instant::now();
        let docs = intersection(s, c);
        let ti = t.elapsed();
        let ports: usize = ex.iter().map(|x| x.ports.intervals().len()).sum();
        eprintln!(
            "{what}: excess {te:?} ({} parts, {ports} port intervals), intersection {ti:?} ({} entries)",
            ex.len(),
            docs.len()
        );
    }

    #[test]
    #[ignore]
    fn stress_shapes() {
        let all = ["0.0.0.0/0", "::/0"];
        // A: 10k overlapping cluster entries with distinct ports.
        let c = doc((0..10_000u16)
            .map(|i| entry(format!("c{i}"), &all, Some(vec![PortSpec::Num(i)])))
            .collect());
        let s = doc(vec![entry("s".into(), &all, None)]);
        run("A 10k overlapping cluster entries, distinct ports", &s, &c);
        // B: 1000 port specs in the cluster, 10k tenant entries asking everything.
        let c = doc(vec![entry(
            "c".into(),
            &all,
            Some((0..1000u16).map(|i| PortSpec::Num(2 * i)).collect()),
        )]);
        let s = doc((0..10_000)
            .map(|i| entry(format!("s{i}"), &all, None))
            .collect());
        run("B 1000 cluster ports, 10k tenant entries", &s, &c);
    }
}
