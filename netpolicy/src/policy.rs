//! The desired policy as the agent stores it: the landlord's cluster
//! boundary (with its failsafe entries) and the tenant's sub-boundary, as
//! documents (so `show` gives back what was set, groups and all).

use serde::{Deserialize, Serialize};

use crate::check::{excess, narrow, Excess};
use crate::model::{parse_cidr, Boundary, BoundaryDoc, DocError, EntryDoc};
use crate::nft::Ruleset;

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
    DocError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses a document: JSON if it starts with `{`, else TOML; `format` may
/// force "toml" or "json".
pub fn parse_doc(text: &str, format: &str) -> Result<BoundaryDoc, DocError> {
    match format {
        "toml" => BoundaryDoc::from_toml(text),
        "json" => BoundaryDoc::from_json(text),
        "" if text.trim_start().starts_with('{') => BoundaryDoc::from_json(text),
        "" => BoundaryDoc::from_toml(text),
        other => Err(err(
            "format",
            format!("unknown format {other:?} (toml or json)"),
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
    /// What narrowing cut (empty when the document fitted).
    pub cut: Vec<Excess>,
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
        let wide = excess(&sub, &cluster);
        if wide.is_empty() {
            self.sub = Some(doc);
            return Ok(SubOutcome { cut: Vec::new() });
        }
        if !narrow_it {
            let first = &wide[0];
            return Err(err(
                format!("allow.{}", first.entry),
                format!(
                    "wider than the cluster boundary: {}{}",
                    first,
                    if wide.len() > 1 {
                        format!(" (and {} more)", wide.len() - 1)
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        let (entries, cut) = narrow(&sub, &cluster);
        self.sub = Some(BoundaryDoc {
            action: doc.action,
            groups: Default::default(),
            allow: entries,
            failsafe: Vec::new(),
            routers: Vec::new(),
        });
        Ok(SubOutcome { cut })
    }

    /// What the tenant's traffic is allowed, as entries: the sub-boundary
    /// intersected with the cluster boundary (equal to the stored one unless
    /// the cluster boundary was narrowed after it was stored), or the
    /// cluster boundary without a sub-boundary. None without a boundary.
    pub fn effective(&self) -> Result<Option<Vec<EntryDoc>>, DocError> {
        match self.boundaries()? {
            Some((c, Some(s))) => Ok(Some(narrow(&s, &c).0)),
            // Without a sub-boundary the cluster boundary is what applies
            // (narrowing it with itself resolves its groups).
            Some((c, None)) => Ok(Some(narrow(&c, &c).0)),
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
    /// entry or group): the cost is in the peers given, not in the document
    /// (the rest was validated when it was stored). Nothing changes on an
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
                        return Err(err(format!("peers[{i}]"), format!("unknown group {g:?}")));
                    }
                }
                None => {
                    parse_cidr(p).map_err(|r| err(format!("peers[{i}]"), r))?;
                }
            }
        }
        let (list, field): (&mut Vec<String>, String) = match target.strip_prefix('@') {
            Some(g) => (
                doc.groups.get_mut(g).ok_or_else(|| {
                    err("target", format!("no group {g:?} in the cluster boundary"))
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
                            format!("no allow entry {target:?} in the cluster boundary"),
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
                return Err(err(format!("peers[{i}]"), format!("{p:?} is given twice")));
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
                        format!("{p:?} is not a peer of {target:?} (give it as listed)"),
                    ))
                }
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
        } else {
            let gone: std::collections::HashSet<usize> = positions.iter().copied().collect();
            let mut i = 0;
            list.retain(|_| {
                i += 1;
                !gone.contains(&(i - 1))
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
