//! The desired policy as the agent stores it: the landlord's cluster
//! boundary (with its failsafe entries) and the tenant's sub-boundary, as
//! documents (so `show` gives back what was set, groups and all).

use serde::{Deserialize, Serialize};

use crate::check::{effective_entries, entries_as_docs, excess_upto, intersection_within, Excess};
use crate::doc::{shown, ECHO_LIMIT};
use crate::model::{
    check_doc_size, parse_cidr, Boundary, BoundaryDoc, DocError, EntryDoc, MAX_DOC_BYTES,
};
use crate::nft::Ruleset;

/// Parts of what narrowing cut that are reported (each lists its peers and
/// ports; 10k entries narrowed against 1000 ports would be 160k parts).
pub const MAX_CUT_REPORTED: usize = 1_000;

/// Parts of the excess computed for a refusal's reason (one is named, the
/// rest counted up to this).
const REFUSAL_PARTS: usize = 100;

/// Version of the stored format.
pub const FORMAT: u32 = 1;

/// The stored policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// The landlord's cluster boundary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<BoundaryDoc>,
    /// The tenant's sub-boundary (always inside the cluster boundary when
    /// it was stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<BoundaryDoc>,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> DocError {
    DocError::new(field, reason)
}

/// Parses a document: JSON if it starts with `{`, else TOML; `format` may
/// force "toml" or "json".
pub fn parse_doc(text: &str, format: &str) -> Result<BoundaryDoc, DocError> {
    check_doc_size(text)?;
    match format {
        "toml" => BoundaryDoc::from_toml(text),
        "json" => BoundaryDoc::from_json(text),
        "" if text.trim_start().starts_with('{') => BoundaryDoc::from_json(text),
        "" => BoundaryDoc::from_toml(text),
        other => Err(err(
            "format",
            format!("unknown format {} (toml or json)", shown(other)),
        )),
    }
}

/// What [`Policy::edit_peers`] changed: the peers (as written) added to or
/// removed from `target`, and their positions in its list (after the edit
/// for additions, before it for removals), to undo it exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEdit {
    /// `entry` or `@group`.
    pub target: String,
    /// Added (true) or removed.
    pub add: bool,
    /// The peers that changed (already present or duplicates left out).
    pub changed: Vec<String>,
    /// Their positions in the target's list.
    pub positions: Vec<usize>,
}

/// The outcome of storing a sub-boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubOutcome {
    /// What narrowing cut (empty when the document fitted): the first
    /// [`MAX_CUT_REPORTED`] parts.
    pub cut: Vec<Excess>,
    /// Whether narrowing cut more than `cut` lists.
    pub cut_more: bool,
}

impl Policy {
    /// An empty policy.
    pub fn new() -> Self {
        Policy {
            format: FORMAT,
            ..Default::default()
        }
    }

    /// The validated boundaries, if there is a cluster boundary.
    pub fn boundaries(&self) -> Result<Option<(Boundary, Option<Boundary>)>, DocError> {
        let Some(c) = &self.cluster else {
            return Ok(None);
        };
        let cluster = c.validate(true)?;
        let sub = self.sub.as_ref().map(|s| s.validate(false)).transpose()?;
        Ok(Some((cluster, sub)))
    }

    /// The nftables ruleset, if there is a cluster boundary.
    pub fn ruleset(&self) -> Result<Option<Ruleset>, DocError> {
        Ok(self
            .boundaries()?
            .map(|(c, s)| Ruleset::build(&c, s.as_ref())))
    }

    /// Replaces the cluster boundary (keeping the failsafe entries unless
    /// the document has its own). A stored sub-boundary is kept: the kernel
    /// enforces the intersection anyway, and [`Policy::effective`] shows it.
    pub fn set_cluster(&mut self, mut doc: BoundaryDoc) -> Result<(), DocError> {
        if doc.failsafe.is_empty() {
            if let Some(old) = &self.cluster {
                doc.failsafe.clone_from(&old.failsafe);
            }
        }
        doc.validate(true)?;
        crate::model::check_dhcp_pins(&doc)?;
        self.cluster = Some(doc);
        Ok(())
    }

    /// Replaces the failsafe entries (empty: none).
    pub fn set_failsafe(&mut self, failsafe: Vec<EntryDoc>) -> Result<(), DocError> {
        let Some(c) = &self.cluster else {
            return Err(err(
                "failsafe",
                "set a cluster boundary first (failsafe entries belong to it)",
            ));
        };
        let mut doc = c.clone();
        doc.failsafe = failsafe;
        doc.validate(true)?;
        self.cluster = Some(doc);
        Ok(())
    }

    /// Stores a sub-boundary. A wider document is refused naming what
    /// sticks out, unless `narrow`, which stores the intersection and
    /// reports what it cut.
    pub fn set_sub(&mut self, doc: BoundaryDoc, narrow_it: bool) -> Result<SubOutcome, DocError> {
        let Some((cluster, _)) = self.boundaries()? else {
            return Err(err(
                "document",
                "the node has no cluster boundary yet; the landlord sets it first",
            ));
        };
        let sub = doc.validate(false)?;
        // The reason names the first part; a huge document is not expanded
        // further than needed to say so.
        let wide = excess_upto(&sub, &cluster, REFUSAL_PARTS + 1);
        if wide.is_empty() {
            self.sub = Some(doc);
            return Ok(SubOutcome {
                cut: Vec::new(),
                cut_more: false,
            });
        }
        if !narrow_it {
            let first = &wide[0];
            let more = match wide.len() - 1 {
                0 => String::new(),
                n if n > REFUSAL_PARTS - 1 => format!(" (and over {} more)", REFUSAL_PARTS - 1),
                n => format!(" (and {n} more)"),
            };
            return Err(err(
                format!("allow.{}", first.entry),
                format!("wider than the cluster boundary: {first}{more}"),
            ));
        }
        let entries = intersection_within(&sub, &cluster, MAX_DOC_BYTES).ok_or_else(|| {
            err(
                "document",
                format!("the narrowed document would be over {MAX_DOC_BYTES} bytes"),
            )
        })?;
        let narrowed = BoundaryDoc {
            action: doc.action,
            groups: Default::default(),
            allow: entries,
            failsafe: Vec::new(),
            routers: Vec::new(),
            dhcp_servers: None,
        };
        // The intersection can have more entries than the document (one per
        // group of peers with the same ports): it must fit the limits too,
        // or the stored policy would not load.
        narrowed.validate(false).map_err(|e| DocError {
            reason: format!("the narrowed document: {}", e.reason),
            ..e
        })?;
        // What was cut: the first MAX_CUT_REPORTED parts.
        let mut cut = excess_upto(&sub, &cluster, MAX_CUT_REPORTED + 1);
        let cut_more = cut.len() > MAX_CUT_REPORTED;
        cut.truncate(MAX_CUT_REPORTED);
        self.sub = Some(narrowed);
        Ok(SubOutcome { cut, cut_more })
    }

    /// What the tenant's traffic is allowed, as entries: the sub-boundary
    /// intersected with the cluster boundary (equal to the stored one unless
    /// the cluster boundary was narrowed after it was stored), or the
    /// cluster boundary without a sub-boundary. None without a boundary.
    pub fn effective(&self) -> Result<Option<Vec<EntryDoc>>, DocError> {
        match self.boundaries()? {
            // Inside the cluster boundary (as stored), the sub-boundary is
            // the intersection: its own entries, names kept.
            Some((c, Some(s))) => Ok(Some(effective_entries(&s, &c))),
            // Without a sub-boundary the cluster boundary is what applies
            // (its entries with the groups resolved).
            Some((c, None)) => Ok(Some(entries_as_docs(&c))),
            None => Ok(None),
        }
    }

    /// Adds peers to an allow entry (by name) or to a group (`@name`) of the
    /// cluster boundary. Nothing changes unless every peer is valid.
    pub fn add_peers(&mut self, target: &str, peers: &[String]) -> Result<usize, DocError> {
        self.edit_peers(target, peers, true)
            .map(|e| e.changed.len())
    }

    /// Removes peers (as written) from an allow entry or group.
    pub fn remove_peers(&mut self, target: &str, peers: &[String]) -> Result<usize, DocError> {
        self.edit_peers(target, peers, false)
            .map(|e| e.changed.len())
    }

    /// Adds or removes peers of an allow entry or `@group`, checking only
    /// what the edit can break (the new peers, a missing group, an emptied
    /// entry or group, and for an add the limits: one count over the
    /// document's peer lists); the rest was validated when it was stored. Nothing changes on an
    /// error. Returns what changed (for an incremental update of the
    /// validated boundary, and to undo it).
    pub fn edit_peers(
        &mut self,
        target: &str,
        peers: &[String],
        add: bool,
    ) -> Result<PeerEdit, DocError> {
        let Some(doc) = self.cluster.as_mut() else {
            return Err(err("target", "no cluster boundary is set"));
        };
        if peers.is_empty() {
            return Err(err("peers", "give at least one peer"));
        }
        for (i, p) in peers.iter().enumerate() {
            match p.strip_prefix('@') {
                Some(g) => {
                    if !add || target.starts_with('@') {
                        return Err(err(
                            format!("peers[{i}]"),
                            "groups can only be added to entries",
                        ));
                    }
                    if !doc.groups.contains_key(g) {
                        return Err(err(
                            format!("peers[{i}]"),
                            format!("unknown group {}", shown(g)),
                        ));
                    }
                }
                None => {
                    // parse_cidr's reason quotes the peer whole: past the
                    // echo limit, say the same with the peer shortened.
                    parse_cidr(p).map_err(|r| {
                        let r = if p.chars().count() <= ECHO_LIMIT {
                            r
                        } else {
                            format!("{} is not an IP address or CIDR", shown(p))
                        };
                        err(format!("peers[{i}]"), r)
                    })?;
                }
            }
        }
        // What the document's limits count, before the edit (review: adds
        // went past them, and every later change of the policy — the
        // tenant's sub-boundary, a release's clearing of it — then failed
        // validation, as did the stored policy at the next start).
        // One pass over the document, for an add only (a removal cannot
        // pass a limit).
        let expanded_before = if add { doc.expanded_peers() } else { 0 };
        let group_len = |g: &str| doc.groups.get(g).map_or(0, Vec::len);
        let delta_per_peer: std::collections::HashMap<&str, usize> = peers
            .iter()
            .map(|p| (p.as_str(), p.strip_prefix('@').map_or(1, group_len)))
            .collect();
        let target_refs = target.strip_prefix('@').map_or(0, |g| doc.references(g));
        let (list, field): (&mut Vec<String>, String) = match target.strip_prefix('@') {
            Some(g) => (
                doc.groups.get_mut(g).ok_or_else(|| {
                    err(
                        "target",
                        format!("no group {} in the cluster boundary", shown(g)),
                    )
                })?,
                format!("groups.{g}"),
            ),
            None => {
                let i = doc
                    .allow
                    .iter()
                    .position(|e| e.name == target)
                    .ok_or_else(|| {
                        err(
                            "target",
                            format!("no allow entry {} in the cluster boundary", shown(target)),
                        )
                    })?;
                (&mut doc.allow[i].peers, format!("allow[{i}].peers"))
            }
        };
        let mut seen = std::collections::HashSet::new();
        let mut changed = Vec::new();
        let mut positions = Vec::new();
        for (i, p) in peers.iter().enumerate() {
            if !seen.insert(p.as_str()) {
                if add {
                    continue;
                }
                return Err(err(
                    format!("peers[{i}]"),
                    format!("{} is given twice", shown(p)),
                ));
            }
            let at = list.iter().position(|x| x == p);
            match (add, at) {
                (true, None) => changed.push(p.clone()),
                (true, Some(_)) => {}
                (false, Some(at)) => {
                    changed.push(p.clone());
                    positions.push(at);
                }
                (false, None) => {
                    return Err(err(
                        format!("peers[{i}]"),
                        format!(
                            "{} is not a peer of {} (give it as listed)",
                            shown(p),
                            shown(target)
                        ),
                    ))
                }
            }
        }
        if add && !changed.is_empty() {
            let (max, what) = if target.starts_with('@') {
                (crate::model::MAX_GROUP_MEMBERS, "members")
            } else {
                (crate::model::MAX_PEERS_PER_ENTRY, "peers")
            };
            let n = list.len().saturating_add(changed.len());
            if n > max {
                return Err(err(field, format!("{n} {what}, at most {max}")));
            }
            let added: usize = if target.starts_with('@') {
                changed.len().saturating_mul(target_refs)
            } else {
                changed
                    .iter()
                    .map(|p| delta_per_peer.get(p.as_str()).copied().unwrap_or(1))
                    .fold(0usize, usize::saturating_add)
            };
            let total = expanded_before.saturating_add(added);
            if total > crate::model::MAX_PEERS_TOTAL {
                return Err(err(
                    "document",
                    format!(
                        "{total} peers with groups expanded, at most {}",
                        crate::model::MAX_PEERS_TOTAL
                    ),
                ));
            }
        }
        if !add && changed.len() >= list.len() {
            return Err(err(
                field,
                if target.starts_with('@') {
                    "a group needs at least one member"
                } else {
                    "at least one peer (CIDR, address or @group) is required"
                },
            ));
        }
        if add {
            positions = (list.len()..list.len() + changed.len()).collect();
            list.extend(changed.iter().cloned());
        } else if let [at] = positions[..] {
            // The common case (one peer): a move, no pass over the list.
            list.remove(at);
        } else {
            // One pass with a cursor over the sorted positions (no hashing
            // of 100k indices).
            let mut gone = positions.clone();
            gone.sort_unstable();
            let (mut i, mut next) = (0, gone.iter().peekable());
            list.retain(|_| {
                let keep = next.peek() != Some(&&i);
                if !keep {
                    next.next();
                }
                i += 1;
                keep
            });
        }
        Ok(PeerEdit {
            target: target.to_owned(),
            add,
            changed,
            positions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::excess;

    fn policy() -> Policy {
        let mut p = Policy::new();
        p.set_cluster(
            parse_doc(
                "[groups]\ncluster = [\"10.1.0.0/24\", \"fd01::/64\"]\n[[allow]]\nname = \"cluster\"\npeers = [\"@cluster\"]\n[[allow]]\nname = \"web\"\npeers = [\"0.0.0.0/0\"]\ndirection = \"in\"\nprotocols = [{ proto = \"tcp\", ports = [443] }]\n[[failsafe]]\nname = \"ssh\"\npeers = [\"10.9.0.0/24\"]\ndirection = \"in\"\nprotocols = [{ proto = \"tcp\", ports = [22] }]\n",
                "",
            )
            .unwrap(),
        )
        .unwrap();
        p
    }

    #[test]
    fn wider_sub_boundary_is_refused_or_narrowed() {
        let mut p = policy();
        let wide = parse_doc(
            "{\"allow\": [{\"name\": \"all\", \"peers\": [\"10.1.0.0/16\"]}]}",
            "",
        )
        .unwrap();
        let e = p.set_sub(wide.clone(), false).unwrap_err();
        assert_eq!(e.field, "allow.all");
        assert!(e.reason.contains("10.1.1.0"), "{e}");
        assert!(p.sub.is_none(), "nothing stored on refusal");
        let out = p.set_sub(wide, true).unwrap();
        assert!(!out.cut.is_empty());
        let stored = p.sub.clone().unwrap().validate(false).unwrap();
        let (c, _) = p.boundaries().unwrap().unwrap();
        assert!(excess(&stored, &c).is_empty());
    }

    /// A 1 MiB argument comes back shortened, naming the argument.
    #[test]
    fn long_arguments_are_echoed_truncated() {
        let long = "x".repeat(1 << 20);
        let short = |e: DocError, field: &str| {
            assert_eq!(e.field, field);
            let e = e.to_string();
            assert!(e.len() < 300, "{field}: {} bytes", e.len());
            assert!(e.starts_with(&format!("{field}: ")), "{e}");
            assert!(e.contains(" bytes)"), "{e}");
        };
        short(parse_doc("", &long).unwrap_err(), "format");
        let mut p = policy();
        let before = p.clone();
        let group = format!("@{long}");
        // Not an address, an unknown group, a padded address with a bad
        // prefix length, a huge prefix length.
        let padded = format!("{}10.9.9.9", " ".repeat(1 << 20));
        let prefix = format!("10.0.0.0/{}", "9".repeat(1 << 20));
        for peer in [&long, &group, &format!("{padded}/33"), &prefix] {
            short(
                p.add_peers("cluster", std::slice::from_ref(peer))
                    .unwrap_err(),
                "peers[0]",
            );
        }
        short(
            p.add_peers(&long, &["1.2.3.4".into()]).unwrap_err(),
            "target",
        );
        short(
            p.add_peers(&group, &["1.2.3.4".into()]).unwrap_err(),
            "target",
        );
        assert_eq!(p, before);
        // Parsed (blanks are trimmed) but not a peer of the entry.
        short(
            p.remove_peers("web", std::slice::from_ref(&padded))
                .unwrap_err(),
            "peers[0]",
        );
        assert_eq!(p, before);
    }

    #[test]
    fn peers_are_added_and_removed_all_or_nothing() {
        let mut p = policy();
        assert_eq!(p.add_peers("@cluster", &["10.1.1.5".into()]).unwrap(), 1);
        assert!(p.cluster.as_ref().unwrap().groups["cluster"].contains(&"10.1.1.5".to_owned()));
        let before = p.clone();
        let e = p
            .add_peers("cluster", &["10.2.0.1".into(), "10.2.0.300".into()])
            .unwrap_err();
        assert_eq!(e.field, "peers[1]");
        assert_eq!(p, before);
        let e = p.remove_peers("web", &["1.2.3.4".into()]).unwrap_err();
        assert_eq!(e.field, "peers[0]");
        let e = p.add_peers("nope", &["1.2.3.4".into()]).unwrap_err();
        assert_eq!(e.field, "target");
        // Removing the last peer of an entry is refused by validation.
        let e = p.remove_peers("web", &["0.0.0.0/0".into()]).unwrap_err();
        assert!(e.field.ends_with(".peers"), "{e}");
        assert_eq!(p, before);
        // Several peers removed (given in any order): the rest keep theirs.
        let more: Vec<String> = (1..=6).map(|i| format!("10.3.0.{i}")).collect();
        p.add_peers("cluster", &more).unwrap();
        let gone: Vec<String> = ["10.3.0.5", "10.3.0.2", "10.3.0.6"]
            .map(String::from)
            .to_vec();
        assert_eq!(p.remove_peers("cluster", &gone).unwrap(), 3);
        assert_eq!(
            p.cluster.as_ref().unwrap().allow[0].peers,
            ["@cluster", "10.3.0.1", "10.3.0.3", "10.3.0.4"]
        );
        assert_eq!(p.remove_peers("cluster", &["10.3.0.3".into()]).unwrap(), 1);
        assert_eq!(
            p.cluster.as_ref().unwrap().allow[0].peers,
            ["@cluster", "10.3.0.1", "10.3.0.4"]
        );
    }

    /// Peer edits keep the document within the limits validation checks
    /// (review: adds went past them, and every later change, and the
    /// stored policy at the next start, then failed validation).
    #[test]
    fn peer_adds_stay_within_the_document_limits() {
        use crate::model::{MAX_PEERS_PER_ENTRY, MAX_PEERS_TOTAL};
        let host = |i: usize| format!("\"10.{}.{}.{}\"", i >> 16, (i >> 8) & 255, i & 255);
        let list = |n: usize| (0..n).map(host).collect::<Vec<_>>().join(", ");
        // 2 × 99 999 (two entries name @g) + 1 = 199 999 peers expanded.
        let g = MAX_PEERS_TOTAL / 2 - 1;
        let mut p = Policy::new();
        p.set_cluster(
            parse_doc(
                &format!("[groups]\ng = [{}]\n[[allow]]\nname = \"a\"\npeers = [\"@g\"]\n[[allow]]\nname = \"b\"\npeers = [\"@g\"]\n[[allow]]\nname = \"c\"\npeers = [\"10.200.0.1\"]\n", list(g)),
                "",
            )
            .unwrap(),
        )
        .unwrap();
        let before = p.clone();
        // A member of @g counts twice.
        let e = p.add_peers("@g", &["10.201.0.1".into()]).unwrap_err();
        assert_eq!(e.field, "document", "{e}");
        assert!(e.reason.contains("200001 peers"), "{e}");
        let e = p.add_peers("c", &["@g".into()]).unwrap_err();
        assert_eq!(e.field, "document", "{e}");
        assert_eq!(p, before);
        // One host fits (given twice, it counts once); then no more.
        p.add_peers("c", &["10.202.0.1".into(), "10.202.0.1".into()])
            .unwrap();
        let e = p.add_peers("a", &["10.203.0.1".into()]).unwrap_err();
        assert_eq!(e.field, "document", "{e}");
        p.cluster.as_ref().unwrap().validate(true).unwrap();
        // One entry's own cap.
        let mut p = Policy::new();
        p.set_cluster(
            parse_doc(
                &format!(
                    "[[allow]]\nname = \"c\"\npeers = [{}]\n",
                    list(MAX_PEERS_PER_ENTRY - 1)
                ),
                "",
            )
            .unwrap(),
        )
        .unwrap();
        let e = p
            .add_peers("c", &["10.210.0.1".into(), "10.210.0.2".into()])
            .unwrap_err();
        assert_eq!(e.field, "allow[0].peers", "{e}");
        assert!(e.reason.contains("100001 peers, at most 100000"), "{e}");
        p.add_peers("c", &["10.210.0.1".into()]).unwrap();
        p.cluster.as_ref().unwrap().validate(true).unwrap();
    }

    /// A DHCP server's address listed with and without a MAC is refused
    /// when set (its address-only rule accepted replies from any MAC,
    /// defeating the pin); two pins of one address are allowed; a stored
    /// document that has it still loads (review).
    #[test]
    fn a_dhcp_pin_is_not_undone_by_an_address_only_listing() {
        let doc = |servers: &str| {
            parse_doc(
                &format!("dhcp_servers = [{servers}]\n[[allow]]\nname = \"a\"\npeers = [\"10.0.0.0/8\"]\n"),
                "",
            )
            .unwrap()
        };
        let pin =
            |mac: u8| format!("{{ addr = \"10.0.0.1\", mac = \"52:54:00:00:00:{mac:02x}\" }}");
        for servers in [
            format!("\"10.0.0.1\", {}", pin(1)),
            format!("{}, \"10.0.0.1\"", pin(1)),
        ] {
            let e = Policy::new().set_cluster(doc(&servers)).unwrap_err();
            assert_eq!(e.field, "dhcp_servers[1]", "{servers}: {e}");
            assert!(e.reason.contains("list it pinned only"), "{e}");
            // What a stored document is checked with still takes it.
            doc(&servers).validate(true).unwrap();
        }
        Policy::new()
            .set_cluster(doc(&format!("{}, {}", pin(1), pin(2))))
            .unwrap();
        Policy::new()
            .set_cluster(doc(&format!("\"10.0.0.2\", {}", pin(1))))
            .unwrap();
    }

    #[test]
    fn effective_is_the_cluster_or_the_intersection() {
        let mut p = policy();
        let names = |p: &Policy| -> Vec<String> {
            p.effective()
                .unwrap()
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect()
        };
        assert_eq!(names(&p), ["cluster", "web"]);
        let e = p.effective().unwrap().unwrap();
        assert_eq!(e[0].peers, ["10.1.0.0/24", "fd01::/64"], "groups resolved");
        let sub = parse_doc("[[allow]]\nname = \"all\"\npeers = [\"10.1.0.0/16\"]\n", "").unwrap();
        p.set_sub(sub, true).unwrap();
        assert_eq!(names(&p), ["all.1", "all.2"]);
        // The landlord narrows the cluster boundary: the stored sub-boundary
        // is intersected.
        let mut c = p.cluster.clone().unwrap();
        c.groups
            .insert("cluster".into(), vec!["10.1.0.0/25".into()]);
        p.set_cluster(c).unwrap();
        assert_eq!(names(&p), ["all.1.1", "all.1.2", "all.2.1"]);
        assert!(
            parse_doc(&" ".repeat(crate::model::MAX_DOC_BYTES + 1), "")
                .unwrap_err()
                .field
                == "document"
        );
    }

    #[test]
    fn a_narrowed_document_over_the_limits_is_refused() {
        let mut p = policy();
        // Each entry narrows to two (the cluster's /24, and tcp/443 in from
        // the rest): 2 × MAX_ENTRIES entries.
        let e = |i: usize| EntryDoc {
            name: format!("e{i}"),
            peers: vec!["10.1.0.0/16".into()],
            direction: crate::model::Direction::Both,
            protocols: None,
        };
        let wide = BoundaryDoc {
            allow: (0..crate::model::MAX_ENTRIES).map(e).collect(),
            ..Default::default()
        };
        let before = p.clone();
        let r = p.set_sub(wide.clone(), false).unwrap_err();
        assert!(r.reason.ends_with("(and over 99 more)"), "{r}");
        let r = p.set_sub(wide, true).unwrap_err();
        assert_eq!(r.field, "allow");
        assert!(
            r.reason.starts_with("the narrowed document: 20000 entries"),
            "{r}"
        );
        assert_eq!(p, before);
    }

    #[test]
    fn narrowing_reports_at_most_max_cut_parts_and_refuses_a_huge_result() {
        let mut p = Policy::new();
        let ports: Vec<String> = (0..1000).map(|i| (2 * i).to_string()).collect();
        let cluster = format!(
            "[[allow]]\nname = \"c\"\npeers = [\"0.0.0.0/0\", \"::/0\"]\nprotocols = [{{ proto = \"tcp\", ports = [{}] }}]\n",
            ports.join(",")
        );
        p.set_cluster(parse_doc(&cluster, "").unwrap()).unwrap();
        let sub = |n: usize| BoundaryDoc {
            allow: (0..n)
                .map(|i| EntryDoc {
                    name: format!("s{i}"),
                    peers: vec!["0.0.0.0/0".into(), "::/0".into()],
                    direction: crate::model::Direction::Both,
                    protocols: None,
                })
                .collect(),
            ..Default::default()
        };
        // 300 entries of 1000 ports each fit; 16 parts cut per entry.
        let out = p.set_sub(sub(300), true).unwrap();
        assert_eq!(out.cut.len(), MAX_CUT_REPORTED);
        assert!(out.cut_more);
        // 10k entries of 1000 ports each do not fit in a document.
        let before = p.clone();
        let e = p.set_sub(sub(10_000), true).unwrap_err();
        assert_eq!(e.field, "document");
        assert!(e.reason.contains("narrowed document would be over"), "{e}");
        assert_eq!(p, before);
    }

    #[test]
    fn failsafe_survives_a_new_cluster_document() {
        let mut p = policy();
        p.set_cluster(
            parse_doc("[[allow]]\nname = \"x\"\npeers = [\"10.0.0.1\"]\n", "toml").unwrap(),
        )
        .unwrap();
        assert_eq!(p.cluster.as_ref().unwrap().failsafe.len(), 1);
        assert!(parse_doc("x", "yaml").is_err());
    }
}
