//! Restrictiveness check, narrowing and explain over the flow space
//! peers × direction × protocol × ports.

use std::fmt;
use std::net::IpAddr;

use crate::model::{
    to_cidrs, Boundary, Direction, Entry, EntryDoc, Family, PortSpec, Proto, ProtoDoc,
};
use crate::ranges::Ranges;

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

/// A part of a sub-boundary entry that the cluster boundary does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excess {
    /// The sub-boundary entry.
    pub entry: String,
    /// Direction of the part.
    pub direction: Direction,
    /// Protocol of the part.
    pub proto: Proto,
    /// Peers of the part, as CIDRs.
    pub peers: Vec<String>,
    /// Ports of the part.
    pub ports: Ranges,
}

impl fmt::Display for Excess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.direction {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Both => "in/out",
        };
        let proto = self.proto.name();
        let ports = if !self.proto.has_ports() || self.ports == crate::model::all_ports() {
            String::new()
        } else {
            format!(" ports {}", self.ports.to_strings().join(","))
        };
        write!(
            f,
            "entry {:?}: {dir} {proto}{ports} with {} is not allowed by the cluster boundary",
            self.entry,
            self.peers.join(" ")
        )
    }
}

/// Rectangles (peers × ports) of a boundary for one cell.
fn rects(b: &[Entry], dir: Direction, proto: Proto, fam: Family) -> Vec<(&Ranges, &Ranges, &str)> {
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

/// Splits `p` into pieces on which every rectangle is either fully in or out.
fn elementary(p: &Ranges, cover: &[(&Ranges, &Ranges, &str)]) -> Vec<Ranges> {
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

/// The parts of `sub`'s entries that `cluster` does not allow (empty: contained).
pub fn excess(sub: &Boundary, cluster: &Boundary) -> Vec<Excess> {
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
                        // Merge neighbouring segments that miss the same ports.
                        match pieces.last_mut() {
                            Some((p, m)) if *m == missing => *p = p.union(&seg),
                            _ => pieces.push((seg, missing)),
                        }
                    }
                    for (p, m) in pieces {
                        out.push(Excess {
                            entry: e.name.clone(),
                            direction: dir,
                            proto,
                            peers: to_cidrs(fam, &p),
                            ports: m,
                        });
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
    let mut docs = Vec::new();
    for e in &sub.allow {
        let mut k = 0;
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
                            name: format!("{}.{k}", e.name),
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
    (docs, excess(sub, cluster))
}

/// One flow as seen from the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// In (peer → node) or Out (node → peer).
    pub direction: Direction,
    /// The other end.
    pub peer: IpAddr,
    /// Protocol.
    pub proto: Proto,
    /// Destination port (ignored for ICMP).
    pub port: u16,
}

fn matches(e: &Entry, f: &Flow) -> bool {
    let (fam, addr) = match f.peer {
        IpAddr::V4(a) => (Family::V4, u128::from(u32::from(a))),
        IpAddr::V6(a) => (Family::V6, u128::from(a)),
    };
    e.directions.contains(&f.direction)
        && e.peers.family(fam).contains(addr)
        && e.protocols
            .get(&f.proto)
            .is_some_and(|p| !f.proto.has_ports() || p.contains(u128::from(f.port)))
}

/// The first entry of `entries` that allows `f`.
pub fn first_match<'a>(entries: &'a [Entry], f: &Flow) -> Option<&'a str> {
    entries
        .iter()
        .find(|e| matches(e, f))
        .map(|e| e.name.as_str())
}

/// Why a flow is allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The verdict.
    pub allowed: bool,
    /// The failsafe entry that let it through, if any.
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
    let failsafe = first_match(&cluster.failsafe, f).map(str::to_owned);
    let c = first_match(&cluster.allow, f).map(str::to_owned);
    let s = sub.map(|b| first_match(&b.allow, f).map(str::to_owned));
    let allowed = failsafe.is_some() || (c.is_some() && !matches!(s, Some(None)));
    let reason = if let Some(fs) = &failsafe {
        format!("allowed by failsafe entry {fs:?}")
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

    // Small universe so random boundaries overlap often: 10.0.0.0/28, ports 0-15.
    fn arb_entry(i: usize) -> impl Strategy<Value = String> {
        (0u8..16, 0u8..5, 0usize..3, proptest::option::of((0usize..3, 0u16..16, 0u16..6))).prop_map(
            move |(host, len, dir, proto)| {
                let prefix = 32 - u32::from(len);
                let net = u32::from(host) & !((1u32 << len) - 1);
                let dirs = ["in", "out", "both"];
                let mut s = format!(
                    "[[allow]]\nname = \"e{i}\"\npeers = [\"10.0.0.{net}/{prefix}\"]\ndirection = \"{}\"\n",
                    dirs[dir]
                );
                if let Some((p, lo, w)) = proto {
                    let protos = ["tcp", "udp", "icmp"];
                    if p == 2 {
                        s.push_str("protocols = [{ proto = \"icmp\" }]\n");
                    } else {
                        s.push_str(&format!("protocols = [{{ proto = \"{}\", ports = [\"{lo}-{}\"] }}]\n", protos[p], lo + w));
                    }
                }
                s
            },
        )
    }

    fn arb_boundary() -> impl Strategy<Value = Boundary> {
        (0usize..4).prop_flat_map(|n| {
            (0..n)
                .map(arb_entry)
                .collect::<Vec<_>>()
                .prop_map(|v| b(&v.concat()))
        })
    }

    fn arb_flow() -> impl Strategy<Value = Flow> {
        (0usize..2, 0u8..20, 0usize..4, 0u16..24).prop_map(|(d, h, p, port)| Flow {
            direction: [Direction::In, Direction::Out][d],
            peer: format!("10.0.0.{h}").parse().unwrap(),
            proto: Proto::ALL[p],
            port,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn accepted_sub_boundaries_never_widen(c in arb_boundary(), s in arb_boundary(), flows in proptest::collection::vec(arb_flow(), 20)) {
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
        fn explain_agrees_with_evaluating_both(c in arb_boundary(), s in arb_boundary(), f in arb_flow(), with_sub in any::<bool>()) {
            let sub = with_sub.then_some(&s);
            let e = explain(&c, sub, &f);
            let want = first_match(&c.failsafe, &f).is_some()
                || (first_match(&c.allow, &f).is_some() && sub.is_none_or(|s| first_match(&s.allow, &f).is_some()));
            prop_assert_eq!(e.allowed, want);
        }
    }
}
