//! The `--json` shapes of boundary data (docs/json.md "Shared types"): the
//! agent's D-Bus replies carry some of it as lines for people (failsafe
//! entries, narrowing cuts, flow summaries, protocol lists) and its
//! documents spell ports two ways (`80`, `"8000-8080"`). The D-Bus types
//! keep their meaning; the CLIs turn them into one set of objects here:
//!
//! - port range `{"from": 80, "to": 80}` (the only port type);
//! - protocol `{"proto": "tcp", "ports": [range] | null}` (null: every
//!   port, or a protocol without ports); a list of them, or null for every
//!   protocol;
//! - entry `{"name", "peers", "direction", "protocols"}`;
//! - flow `{"entry", "direction", "proto", "ports", "peers",
//!   "peers_complete"}` (a part of the flow space: newly denied or allowed,
//!   wider than the cluster boundary, cut by narrowing).
//!
//! A line that does not parse is an error naming it, never a guess: the
//! CLI and the agent then differ in version.

use serde_json::{json, Map, Value};

use crate::{exit, CliError};

fn unreadable(what: &str, line: &str) -> CliError {
    CliError::new(
        exit::FAILURE,
        format!(
            "cannot read the agent's {what} {line:?} (agent and CLI of different versions?); \
             what the call changed stands: see `boundary show`"
        ),
    )
}

/// `80` or `8000-8080` (also as a JSON number) → `{"from", "to"}`.
fn port_range(p: &Value) -> Option<Value> {
    let (a, b) = match p {
        Value::Number(n) => {
            let n = u16::try_from(n.as_u64()?).ok()?;
            (n, n)
        }
        Value::String(t) => match t.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let n = t.trim().parse().ok()?;
                (n, n)
            }
        },
        Value::Object(o) => (
            u16::try_from(o.get("from")?.as_u64()?).ok()?,
            u16::try_from(o.get("to")?.as_u64()?).ok()?,
        ),
        _ => return None,
    };
    Some(json!({"from": a, "to": b}))
}

/// Port text `80,443,8000-8080` → ranges.
fn ports_text(t: &str) -> Option<Value> {
    t.split(',')
        .map(|p| port_range(&Value::String(p.to_owned())))
        .collect::<Option<Vec<_>>>()
        .map(Value::Array)
}

/// A document's protocol list (`[{proto, ports: [80, "443"]}]`, absent:
/// every protocol) in the one shape.
fn protocols_doc(v: Option<&Value>) -> Result<Value, CliError> {
    let Some(list) = v.filter(|v| !v.is_null()) else {
        return Ok(Value::Null);
    };
    let items = list
        .as_array()
        .ok_or_else(|| unreadable("protocol list", &list.to_string()))?;
    items
        .iter()
        .map(|p| {
            let proto = p
                .get("proto")
                .and_then(Value::as_str)
                .ok_or_else(|| unreadable("protocol", &p.to_string()))?;
            let ports = match p.get("ports").filter(|v| !v.is_null()) {
                None => Value::Null,
                Some(ports) => ports
                    .as_array()
                    .and_then(|a| a.iter().map(port_range).collect::<Option<Vec<_>>>())
                    .map(Value::Array)
                    .ok_or_else(|| unreadable("port list", &ports.to_string()))?,
            };
            Ok(json!({"proto": proto, "ports": ports}))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// Protocols as the agent writes them for people: `tcp 80,443; icmp`, or
/// `all protocols`.
pub fn protocols_line(t: &str) -> Result<Value, CliError> {
    if t == "all protocols" {
        return Ok(Value::Null);
    }
    t.split("; ")
        .map(|p| {
            let (proto, ports) = match p.split_once(' ') {
                Some((proto, ports)) => (
                    proto,
                    ports_text(ports).ok_or_else(|| unreadable("protocol list", t))?,
                ),
                None => (p, Value::Null),
            };
            if proto.is_empty() {
                return Err(unreadable("protocol list", t));
            }
            Ok(json!({"proto": proto, "ports": ports}))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// One entry of a document in the one shape (missing direction: both).
fn entry_doc(e: &Value) -> Result<Value, CliError> {
    let name = e.get("name").and_then(Value::as_str);
    let peers = e.get("peers").and_then(Value::as_array);
    let (Some(name), Some(peers)) = (name, peers) else {
        return Err(unreadable("boundary entry", &e.to_string()));
    };
    Ok(json!({
        "name": name,
        "peers": peers,
        "direction": e.get("direction").and_then(Value::as_str).unwrap_or("both"),
        "protocols": protocols_doc(e.get("protocols"))?,
    }))
}

fn entries_doc(v: Option<&Value>) -> Result<Value, CliError> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(entry_doc)
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// A boundary document (cluster or sub) as the agent stores it, with
/// every field present and entries in the one shape.
pub fn boundary_doc(text: Option<&str>) -> Result<Value, CliError> {
    let Some(text) = text else {
        return Ok(Value::Null);
    };
    let d: Value = serde_json::from_str(text).map_err(|_| unreadable("boundary document", text))?;
    Ok(json!({
        "action": d.get("action").and_then(Value::as_str).unwrap_or("drop"),
        "groups": d.get("groups").cloned().unwrap_or_else(|| Value::Object(Map::new())),
        "allow": entries_doc(d.get("allow"))?,
        "failsafe": entries_doc(d.get("failsafe"))?,
        "routers": d.get("routers").cloned().unwrap_or_else(|| json!([])),
        "dhcp_servers": dhcp_servers_doc(d.get("dhcp_servers")),
    }))
}

/// `dhcp_servers` in the one shape: null when absent, else
/// `[{ "addr": …, "mac": … or null }]` whether written as an address or
/// as a table.
fn dhcp_servers_doc(v: Option<&Value>) -> Value {
    match v.and_then(Value::as_array) {
        None => Value::Null,
        Some(list) => Value::Array(
            list.iter()
                .map(|s| match s {
                    Value::String(a) => json!({ "addr": a, "mac": null }),
                    other => json!({
                        "addr": other.get("addr").cloned().unwrap_or(Value::Null),
                        "mac": other.get("mac").cloned().unwrap_or(Value::Null),
                    }),
                })
                .collect(),
        ),
    }
}

/// The effective entries (a JSON list of entries) in the one shape.
pub fn effective_doc(text: Option<&str>) -> Result<Value, CliError> {
    let Some(text) = text else {
        return Ok(Value::Null);
    };
    let d: Value = serde_json::from_str(text).map_err(|_| unreadable("effective entries", text))?;
    entries_doc(Some(&d))
}

/// A failsafe line `ssh: in 192.0.2.10,192.0.2.11 tcp 22` as an entry.
pub fn failsafe_line(line: &str) -> Result<Value, CliError> {
    let bad = || unreadable("failsafe entry", line);
    // Entry names hold no spaces or colons; peers no spaces.
    let (name, rest) = line.split_once(": ").ok_or_else(bad)?;
    let mut words = rest.splitn(3, ' ');
    let (Some(dir), Some(peers), Some(protos)) = (words.next(), words.next(), words.next()) else {
        return Err(bad());
    };
    if !matches!(dir, "in" | "out" | "both") {
        return Err(bad());
    }
    Ok(json!({
        "name": name,
        "peers": peers.split(',').collect::<Vec<_>>(),
        "direction": dir,
        "protocols": protocols_line(protos)?,
    }))
}

fn direction_word(d: &str) -> Option<&'static str> {
    Some(match d {
        "in" => "in",
        "out" => "out",
        "in/out" | "both" => "both",
        _ => return None,
    })
}

/// `entry "web"` → `web` (entry names need no escapes).
fn entry_name(t: &str) -> Option<&str> {
    t.strip_prefix("entry \"")?.strip_suffix('"')
}

/// A flow summary line of `boundary check` (newly denied or allowed,
/// wider): `entry "web": in tcp 443 from 10.0.0.0/8 192.0.2.0/24 (and 12
/// more)` (`in/out`; `to` for out; no ports: every port).
pub fn flow_line(line: &str) -> Result<Value, CliError> {
    let bad = || unreadable("flow summary", line);
    let (entry, rest) = line.split_once(": ").ok_or_else(bad)?;
    let entry = entry_name(entry).ok_or_else(bad)?;
    let mut w = rest.split(' ');
    let dir = w.next().and_then(direction_word).ok_or_else(bad)?;
    let proto = w.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
    let mut next = w.next().ok_or_else(bad)?;
    let ports = if matches!(next, "from" | "to") {
        Value::Null
    } else {
        let p = ports_text(next).ok_or_else(bad)?;
        next = w.next().ok_or_else(bad)?;
        p
    };
    if !matches!(next, "from" | "to") {
        return Err(bad());
    }
    let rest: Vec<&str> = w.collect();
    let (peers, complete) = match rest.iter().position(|x| *x == "(and") {
        Some(i) => (&rest[..i], false),
        None => (&rest[..], true),
    };
    Ok(json!({
        "entry": entry, "direction": dir, "proto": proto, "ports": ports,
        "peers": peers, "peers_complete": complete,
    }))
}

/// A narrowing cut: `entry "web": in tcp ports 80,443 with 10.0.0.0/8 and
/// more (3 address ranges in all) is not allowed by the cluster boundary`.
pub fn cut_line(line: &str) -> Result<Value, CliError> {
    let bad = || unreadable("narrowing cut", line);
    let (entry, rest) = line.split_once(": ").ok_or_else(bad)?;
    let entry = entry_name(entry).ok_or_else(bad)?;
    let rest = rest
        .strip_suffix(" is not allowed by the cluster boundary")
        .ok_or_else(bad)?;
    let (head, peers) = rest.split_once(" with ").ok_or_else(bad)?;
    let mut w = head.split(' ');
    let dir = w.next().and_then(direction_word).ok_or_else(bad)?;
    let proto = w.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
    let ports = match (w.next(), w.next(), w.next()) {
        (None, _, _) => Value::Null,
        (Some("ports"), Some(p), None) => ports_text(p).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let (peers, complete) = match peers.split_once(" and more (") {
        Some((p, _)) => (p, false),
        None => (peers, true),
    };
    Ok(json!({
        "entry": entry, "direction": dir, "proto": proto, "ports": ports,
        "peers": peers.split(' ').filter(|p| !p.is_empty()).collect::<Vec<_>>(),
        "peers_complete": complete,
    }))
}

/// Maps each string of `list` (a JSON array of lines) with `f`.
fn lines_with(
    list: &Value,
    f: impl Fn(&str) -> Result<Value, CliError>,
) -> Result<Value, CliError> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|l| f(l.as_str().unwrap_or_default()))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// `boundary check`'s reply (the agent's JSON, docs/dbus.md CheckBoundary)
/// with its lines as objects: flows of `newly_denied`, `newly_allowed` and
/// `wider`, and a changed entry's `protocols` pair `[before, after]` as
/// protocol lists.
pub fn check_json(mut v: Value) -> Result<Value, CliError> {
    for key in ["newly_denied", "newly_allowed", "wider"] {
        if let Some(list) = v.get(key).cloned() {
            v[key] = lines_with(&list, flow_line)?;
        }
    }
    for key in ["entries", "failsafe"] {
        let Some(changed) = v
            .get_mut(key)
            .and_then(|d| d.get_mut("changed"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for c in changed {
            if let Some(pair) = c.get("protocols").and_then(Value::as_array).cloned() {
                c["protocols"] = Value::Array(
                    pair.iter()
                        .map(|p| protocols_line(p.as_str().unwrap_or_default()))
                        .collect::<Result<Vec<_>, _>>()?,
                );
            }
        }
    }
    Ok(v)
}

/// A listing's failsafe lines and cuts as objects.
pub fn failsafe_json(lines: Option<&[String]>) -> Result<Value, CliError> {
    lines
        .unwrap_or_default()
        .iter()
        .map(|l| failsafe_line(l))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// Narrowing cuts as flow objects.
pub fn cuts_json(lines: Option<&[String]>) -> Result<Value, CliError> {
    lines
        .unwrap_or_default()
        .iter()
        .map(|l| cut_line(l))
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_have_one_shape() {
        let p = protocols_doc(Some(
            &json!([{"proto": "tcp", "ports": [80, "443", "8000-8080"]}, {"proto": "icmp"}]),
        ))
        .unwrap();
        assert_eq!(
            p,
            json!([
                {"proto": "tcp", "ports": [{"from": 80, "to": 80}, {"from": 443, "to": 443}, {"from": 8000, "to": 8080}]},
                {"proto": "icmp", "ports": null}
            ])
        );
        assert_eq!(protocols_line("tcp 80,443,8000-8080; icmp").unwrap(), p);
        assert_eq!(protocols_line("all protocols").unwrap(), Value::Null);
        assert!(protocols_line("tcp 99999").is_err());
        assert!(protocols_doc(Some(&json!([{"proto": "tcp", "ports": ["x"]}]))).is_err());
    }

    #[test]
    fn failsafe_lines_are_entries() {
        assert_eq!(
            failsafe_line("ssh: in 192.0.2.10,2001:db8::/32 tcp 22; udp 53").unwrap(),
            json!({"name": "ssh", "peers": ["192.0.2.10", "2001:db8::/32"], "direction": "in",
                   "protocols": [{"proto": "tcp", "ports": [{"from": 22, "to": 22}]},
                                 {"proto": "udp", "ports": [{"from": 53, "to": 53}]}]})
        );
        assert_eq!(
            failsafe_line("mgmt: both 10.0.0.0/8 all protocols").unwrap()["protocols"],
            Value::Null
        );
        for bad in [
            "ssh in 1.2.3.4 tcp 22",
            "ssh: sideways 1.2.3.4 tcp 22",
            "ssh: in",
        ] {
            assert!(failsafe_line(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flow_lines_are_flows() {
        assert_eq!(
            flow_line(
                "entry \"web\": in tcp 443,8000-8080 from 10.0.0.0/8 192.0.2.0/24 (and 12 more)"
            )
            .unwrap(),
            json!({"entry": "web", "direction": "in", "proto": "tcp",
                   "ports": [{"from": 443, "to": 443}, {"from": 8000, "to": 8080}],
                   "peers": ["10.0.0.0/8", "192.0.2.0/24"], "peers_complete": false})
        );
        let f = flow_line("entry \"all.1\": in/out icmp to ::/0").unwrap();
        assert_eq!(f["direction"], "both");
        assert_eq!(f["ports"], Value::Null);
        assert_eq!(f["peers"], json!(["::/0"]));
        assert_eq!(f["peers_complete"], true);
        assert!(flow_line("web: in tcp 443 from x").is_err());
    }

    #[test]
    fn cut_lines_are_flows() {
        assert_eq!(
            cut_line("entry \"web\": in tcp ports 80,443 with 10.0.0.0/8 10.1.0.0/16 and more (3 address ranges in all) is not allowed by the cluster boundary").unwrap(),
            json!({"entry": "web", "direction": "in", "proto": "tcp",
                   "ports": [{"from": 80, "to": 80}, {"from": 443, "to": 443}],
                   "peers": ["10.0.0.0/8", "10.1.0.0/16"], "peers_complete": false})
        );
        let c = cut_line(
            "entry \"x\": out other with 192.0.2.1/32 is not allowed by the cluster boundary",
        )
        .unwrap();
        assert_eq!(c["ports"], Value::Null);
        assert_eq!(c["peers_complete"], true);
        assert!(cut_line("entry \"x\": out other with 1.2.3.4").is_err());
    }

    #[test]
    fn check_replies_lose_their_lines() {
        let v = check_json(json!({
            "valid": true,
            "entries": {"added": [], "removed": [], "changed": [
                {"name": "web", "peers_added": [], "peers_removed": [], "protocols": ["tcp 80", "all protocols"]}
            ]},
            "newly_denied": ["entry \"web\": out udp to 10.0.0.1/32"],
            "newly_denied_count": 1,
        }))
        .unwrap();
        assert_eq!(
            v["entries"]["changed"][0]["protocols"],
            json!([[{"proto": "tcp", "ports": [{"from": 80, "to": 80}]}], null])
        );
        assert_eq!(v["newly_denied"][0]["proto"], "udp");
    }
}
