//! `boundary` subcommands shared by both CLIs: arguments, document files,
//! and output of boundary listings and flow verdicts.

use std::path::Path;

use clap::Args;
use leasehold_dbus_api::{BoundaryInfo, FlowVerdict};
use serde_json::{json, Value};

use crate::{exit, read_arg_file, CliError};

// The flow `boundary explain` asks about. No doc comment: the arguments of
// its subcommand are deferred, and once built the struct's about would
// replace the variant's (docs/cli.md, "Start-up").
#[allow(missing_docs)]
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The other end of the flow (IPv4 or IPv6 address).
    #[arg(long)]
    pub peer: String,
    /// "in" (peer → node) or "out" (node → peer).
    #[arg(long, value_parser = ["in", "out"], default_value = "in")]
    pub direction: String,
    /// Protocol ("other": any IP protocol but tcp, udp and icmp).
    #[arg(long, value_parser = ["tcp", "udp", "icmp", "other"], default_value = "tcp")]
    pub proto: String,
    /// Destination port (required for tcp and udp; not taken for icmp and other).
    #[arg(long)]
    pub port: Option<u16>,
}

impl ExplainArgs {
    /// The port to ask about; errors name `--port`.
    pub fn port(&self) -> Result<u16, CliError> {
        match (self.proto.as_str(), self.port) {
            ("tcp" | "udp", Some(p)) => Ok(p),
            ("tcp" | "udp", None) => Err(CliError::new(
                exit::USAGE,
                format!(
                    "--port is required for {} (the destination port of the flow)",
                    self.proto
                ),
            )),
            (_, Some(_)) => Err(CliError::new(
                exit::USAGE,
                format!("--port: {} has no ports", self.proto),
            )),
            (_, None) => Ok(0),
        }
    }
}

/// Prints a verdict; denied flows exit 1 (allowed 0), with --json too.
pub fn explain_result(json: bool, v: &FlowVerdict) -> Result<(), CliError> {
    crate::output::emit(json, verdict_json(v), || verdict_text(v));
    if v.allowed == Some(true) {
        Ok(())
    } else {
        Err(CliError::new(exit::FAILURE, ""))
    }
}

/// Splits a duration's `s`, `m` or `h` suffix off: the number's text and
/// seconds per unit (plain numbers are seconds).
pub fn split_duration(s: &str) -> (&str, u32) {
    let t = s.trim();
    match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        _ => (t, 1),
    }
}

/// Parses `60s`, `2m`, `1h` or plain seconds for `--confirm-within`.
pub fn parse_duration(s: &str) -> Result<u32, String> {
    let (num, mult) = split_duration(s);
    let n: u32 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: give seconds, e.g. 60s, 5m or 1h"))?;
    let secs = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))?;
    if !(2..=3600).contains(&secs) {
        return Err(format!("{s:?}: between 2s and 1h"));
    }
    Ok(secs)
}

/// A boundary document: its text and format (from the file extension;
/// otherwise the agent detects JSON by its leading `{`).
pub fn read_document(path: &Path) -> Result<(String, &'static str), CliError> {
    let bytes = read_arg_file("boundary document", path)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        CliError::new(
            exit::INVALID,
            format!("boundary document {}: not UTF-8 text", path.display()),
        )
    })?;
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => "json",
        Some("toml") => "toml",
        _ => "",
    };
    Ok((text, format))
}

/// Names the document file in the agent's refusal of its content. The
/// agent does not know the file; it gives the field path and, for errors in
/// the text, the line and column (`line 3, column 9: allow[0].peers: …`,
/// docs/netpolicy.md). This makes it `FILE:3:9: allow[0].peers: …`, or
/// `FILE: field: …` without a location. `prefix` is what the agent puts
/// before the document's error (`spec: ` for engine specs); a refusal
/// without it is not about the document and is left as it is.
pub fn in_document<'a, E: Into<CliError>>(
    path: &'a Path,
    prefix: &'a str,
) -> impl Fn(E) -> CliError + 'a {
    move |e| {
        let mut e: CliError = e.into();
        if e.dbus_error.as_deref() != Some("org.leasehold.Error.InvalidArgument") {
            return e;
        }
        let Some(msg) = e
            .message
            .strip_prefix("invalid argument: ")
            .and_then(|m| m.strip_prefix(prefix))
        else {
            return e;
        };
        e.message = match split_location(msg) {
            Some((line, column, rest)) => format!(
                "invalid argument: {}:{line}:{column}: {rest}",
                path.display()
            ),
            None => format!("invalid argument: {}: {msg}", path.display()),
        };
        e
    }
}

/// `line L, column C: rest` → (L, C, rest).
fn split_location(msg: &str) -> Option<(usize, usize, &str)> {
    let rest = msg.strip_prefix("line ")?;
    let (line, rest) = rest.split_once(", column ")?;
    let (column, rest) = rest.split_once(": ")?;
    Some((line.parse().ok()?, column.parse().ok()?, rest))
}

fn parsed(s: &Option<String>) -> Value {
    s.as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

/// A listing as JSON (docs/json.md "BoundaryListing"): documents as
/// objects, failsafe entries and narrowing cuts as objects
/// ([`crate::shapes`]), ports in the one shape.
pub fn info_json(i: &BoundaryInfo) -> Result<Value, CliError> {
    use crate::shapes;
    Ok(json!({
        "cluster": shapes::boundary_doc(i.cluster.as_deref())?,
        "sub": shapes::boundary_doc(i.sub.as_deref())?,
        "effective": shapes::effective_doc(i.effective.as_deref())?,
        "failsafe": shapes::failsafe_json(i.failsafe.as_deref())?,
        "enforced": i.enforced,
        "elements": i.elements,
        "change": i.change,
        "cut": shapes::cuts_json(i.cut.as_deref())?,
        "warnings": i.warnings.clone().unwrap_or_default(),
        "peers_changed": i.peers_changed,
        "drift_count": i.drift_count,
        "last_drift": i.last_drift,
        "last_drift_at": i.last_drift_at,
        "drift_unrepaired": i.drift_unrepaired,
        "revert_at": i.revert_at,
    }))
}

/// Prints a listing: warnings on stderr, then the listing (a query's
/// always; after a change, not with `--quiet`).
pub fn emit_info(json: bool, query: bool, i: &BoundaryInfo) -> Result<(), CliError> {
    print_warnings(i);
    let v = if json { info_json(i)? } else { Value::Null };
    if query {
        crate::output::emit(json, v, || info_text(i));
    } else {
        crate::output::emit_done(json, v, || info_text(i));
    }
    Ok(())
}

/// Prints `boundary check`'s reply (the agent's JSON text): warnings on
/// stderr, then what would change, with `--json` in the one shape
/// ([`crate::shapes::check_json`]).
pub fn emit_check(json: bool, reply: &str) -> Result<(), CliError> {
    let v: Value = serde_json::from_str(reply).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot read the agent's check reply: {e}"),
        )
    })?;
    check_warnings(&v);
    let out = if json {
        crate::shapes::check_json(v.clone())?
    } else {
        Value::Null
    };
    crate::output::emit(json, out, || check_text(&v));
    Ok(())
}

/// Protocols of an entry as a person reads them: `tcp 80,443,8000-8080; icmp`.
pub fn protocols_text(v: Option<&Value>) -> String {
    let Some(list) = v.and_then(Value::as_array) else {
        return "all protocols".to_owned();
    };
    list.iter()
        .map(|p| {
            let proto = p.get("proto").and_then(Value::as_str).unwrap_or("?");
            match p.get("ports").and_then(Value::as_array) {
                None => proto.to_owned(),
                Some(ports) => format!(
                    "{proto} {}",
                    ports
                        .iter()
                        .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Peers shown: at most 8, then a count.
fn peers_shown(peers: &[&str]) -> String {
    if peers.len() > 8 {
        format!("{} … ({} peers)", peers[..8].join(", "), peers.len())
    } else {
        peers.join(", ")
    }
}

fn entries_text(out: &mut String, v: &Value) {
    for e in v.as_array().into_iter().flatten() {
        let name = e.get("name").and_then(Value::as_str).unwrap_or("?");
        let dir = e.get("direction").and_then(Value::as_str).unwrap_or("both");
        let peers: Vec<&str> = e
            .get("peers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let protos = protocols_text(e.get("protocols"));
        out.push_str(&format!(
            "  {name}: {dir} {}; {protos}\n",
            peers_shown(&peers)
        ));
    }
}

/// The effective view, merged: entries with the same direction and
/// protocols are shown once, with their peers together and no duplicates
/// (narrowing splits one entry into `name.1`, `name.2`, …).
fn effective_text(out: &mut String, v: &Value) {
    let mut merged: Vec<(String, String, Vec<String>, Vec<String>)> = Vec::new();
    for e in v.as_array().into_iter().flatten() {
        let name = e.get("name").and_then(Value::as_str).unwrap_or("?");
        let base = match name.rsplit_once('.') {
            Some((b, n)) if n.chars().all(|c| c.is_ascii_digit()) => b,
            _ => name,
        };
        let dir = e
            .get("direction")
            .and_then(Value::as_str)
            .unwrap_or("both")
            .to_owned();
        let protos = protocols_text(e.get("protocols"));
        let peers = e
            .get("peers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str);
        let at = match merged.iter().position(|m| m.0 == dir && m.1 == protos) {
            Some(i) => i,
            None => {
                merged.push((dir, protos, Vec::new(), Vec::new()));
                merged.len() - 1
            }
        };
        let m = &mut merged[at];
        if !m.3.iter().any(|n| n == base) {
            m.3.push(base.to_owned());
        }
        for p in peers {
            if !m.2.iter().any(|x| x == p) {
                m.2.push(p.to_owned());
            }
        }
    }
    for (dir, protos, peers, names) in merged {
        let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
        out.push_str(&format!(
            "  {}: {dir} {}; {protos}\n",
            names.join("+"),
            peers_shown(&peers)
        ));
    }
}

/// `dhcp_servers` as written (addresses, or tables with a MAC) for
/// humans: `10.77.0.1, 10.77.0.2 (mac 52:54:00:00:00:02)`; `none` for an
/// empty list, `any (not set)` when absent.
fn dhcp_servers_text(v: &Value) -> String {
    let Some(list) = v.as_array() else {
        return "any (not set)".to_owned();
    };
    if list.is_empty() {
        return "none".to_owned();
    }
    list.iter()
        .map(|d| match d {
            Value::String(a) => a.clone(),
            other => {
                let addr = other.get("addr").and_then(Value::as_str).unwrap_or("?");
                match other.get("mac").and_then(Value::as_str) {
                    Some(m) => format!("{addr} (mac {m})"),
                    None => addr.to_owned(),
                }
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A listing as text.
pub fn info_text(i: &BoundaryInfo) -> String {
    let mut s = String::new();
    let cluster = parsed(&i.cluster);
    if !cluster.is_null() {
        let action = cluster
            .get("action")
            .and_then(Value::as_str)
            .unwrap_or("drop");
        s.push_str(&format!("cluster boundary (denied traffic: {action}):\n"));
        entries_text(&mut s, cluster.get("allow").unwrap_or(&Value::Null));
        if let Some(d) = cluster.get("dhcp_servers").filter(|d| !d.is_null()) {
            s.push_str(&format!(
                "  DHCP replies only from: {}\n",
                dhcp_servers_text(d)
            ));
        }
        if let Some(g) = cluster.get("groups").and_then(Value::as_object) {
            for (name, members) in g {
                let m: Vec<&str> = members
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                s.push_str(&format!(
                    "  group @{name} ({} members): {}\n",
                    m.len(),
                    peers_shown(&m)
                ));
            }
        }
    }
    let sub = parsed(&i.sub);
    if sub.is_null() {
        s.push_str("sub-boundary: none\n");
    } else {
        s.push_str("sub-boundary:\n");
        entries_text(&mut s, sub.get("allow").unwrap_or(&Value::Null));
    }
    if i.cluster.is_none() && i.effective.is_some() {
        s.push_str("effective (what the tenant's traffic may do):\n");
        effective_text(&mut s, &parsed(&i.effective));
    }
    match i.failsafe.as_deref() {
        Some([]) | None => s.push_str("failsafe: none\n"),
        Some(list) => {
            s.push_str("failsafe (no boundary can cut these):\n");
            for l in list {
                s.push_str(&format!("  {l}\n"));
            }
        }
    }
    s.push_str(&format!(
        "enforced: {}{}",
        if i.enforced == Some(true) {
            "yes"
        } else {
            "no"
        },
        i.elements
            .map(|n| format!(" ({n} set elements)"))
            .unwrap_or_default()
    ));
    if let Some(c) = &i.change {
        s.push_str(&format!("; last change: {c}"));
    }
    if let Some(n) = i.peers_changed {
        s.push_str(&format!("\npeers changed: {n}"));
    }
    for c in i.cut.iter().flatten() {
        s.push_str(&format!("\nnarrowed: cut {c}"));
    }
    if let Some(d) = &i.last_drift {
        s.push_str(&format!("\nlast restored drift: {d}"));
    }
    if let Some(at) = i.revert_at {
        s.push_str(&format!(
            "\npending: reverts to the previous boundary at {} unless `landlordctl boundary confirm`",
            unix_time_text(at)
        ));
    }
    s
}

/// Unix seconds as `2026-12-03 12:34:56 UTC (in 58 s)`.
pub fn unix_time_text(at: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = at / 86_400;
    let rem = at % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let when = if at >= now {
        format!("in {} s", at - now)
    } else {
        format!("{} s ago", now - at)
    };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC ({when})",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `boundary check` as text: what would change, without applying.
pub fn check_text(v: &Value) -> String {
    let mut s = String::from("valid; nothing was applied\n");
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect()
    };
    for (key, label) in [
        ("entries", "allow entries"),
        ("failsafe", "failsafe entries"),
        ("groups", "groups"),
    ] {
        let d = &v[key];
        if d.is_null() {
            continue;
        }
        let added = list(&d["added"]);
        let removed = list(&d["removed"]);
        let changed = d["changed"].as_array().cloned().unwrap_or_default();
        if added.is_empty() && removed.is_empty() && changed.is_empty() {
            s.push_str(&format!("{label}: unchanged\n"));
            continue;
        }
        s.push_str(&format!("{label}:\n"));
        for a in added {
            s.push_str(&format!("  + {a}\n"));
        }
        for r in removed {
            s.push_str(&format!("  - {r}\n"));
        }
        for c in changed {
            let name = c["name"].as_str().unwrap_or("?");
            let (pa, pr) = if key == "groups" {
                (list(&c["members_added"]), list(&c["members_removed"]))
            } else {
                (list(&c["peers_added"]), list(&c["peers_removed"]))
            };
            let mut parts = Vec::new();
            if !pa.is_empty() {
                let p: Vec<&str> = pa.iter().map(String::as_str).collect();
                parts.push(format!("+{} peers ({})", pa.len(), peers_shown(&p)));
            }
            if !pr.is_empty() {
                let p: Vec<&str> = pr.iter().map(String::as_str).collect();
                parts.push(format!("-{} peers ({})", pr.len(), peers_shown(&p)));
            }
            // Pairs from the node, never indexed blindly (review: a short
            // array from a hostile node panicked the CLI).
            if let Some([a, b]) = c["direction"].as_array().map(Vec::as_slice) {
                parts.push(format!("direction {a} → {b}"));
            }
            if let Some([a, b]) = c["protocols"].as_array().map(Vec::as_slice) {
                parts.push(format!(
                    "protocols {} → {}",
                    a.as_str().unwrap_or("?"),
                    b.as_str().unwrap_or("?")
                ));
            }
            s.push_str(&format!("  ~ {name}: {}\n", parts.join("; ")));
        }
    }
    // [before, after] pairs; another shape from the bus is not shown
    // (never indexed blindly: a short array must not panic the CLI).
    if let Some([before, after]) = v["action"].as_array().map(Vec::as_slice) {
        s.push_str(&format!("denied traffic: {before} → {after}\n"));
    }
    if let Some([before, after]) = v["dhcp_servers"].as_array().map(Vec::as_slice) {
        s.push_str(&format!(
            "DHCP replies only from: {} → {}\n",
            dhcp_servers_text(before),
            dhcp_servers_text(after)
        ));
    }
    if v["fits"] == Value::Bool(false) {
        // Counted up to 1000 by the agent (more: `wider_count_capped`).
        let count = if v["wider_count_capped"] == Value::Bool(true) {
            "more than 1000".to_owned()
        } else {
            v["wider_count"].to_string()
        };
        s.push_str(&format!(
            "WIDER than the cluster boundary ({count} parts): `tenantctl boundary set` would refuse it; --narrow stores the intersection:\n"
        ));
        for l in list(&v["wider"]) {
            s.push_str(&format!("  {l}\n"));
        }
    }
    for (key, label) in [
        ("newly_denied", "newly denied"),
        ("newly_allowed", "newly allowed"),
    ] {
        if let Some(note) = v[format!("{key}_note")].as_str() {
            s.push_str(&format!("{label}: {note}\n"));
            continue;
        }
        let lines = list(&v[key]);
        let n = v[format!("{key}_count")].as_u64().unwrap_or(0);
        if n == 0 {
            s.push_str(&format!("{label}: nothing\n"));
            continue;
        }
        s.push_str(&format!("{label} ({n}):\n"));
        for l in &lines {
            s.push_str(&format!("  {l}\n"));
        }
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > lines.len() {
            s.push_str(&format!("  … and {} more\n", n - lines.len()));
        }
    }
    if v["denies_everything"] == Value::Bool(true) {
        s.push_str("this document DENIES ALL TRAFFIC (no allow entry, no failsafe): setting it needs --yes\n");
    }
    s.trim_end().to_owned()
}

/// Warnings of a check (stderr).
pub fn check_warnings(v: &Value) {
    for w in v["warnings"].as_array().into_iter().flatten() {
        if let Some(w) = w.as_str() {
            eprintln!("warning: {}", crate::output::terminal_safe(w));
        }
    }
}

/// Prints warnings to stderr (they matter even with --json).
pub fn print_warnings(i: &BoundaryInfo) {
    for w in i.warnings.iter().flatten() {
        eprintln!("warning: {}", crate::output::terminal_safe(w));
    }
}

/// A verdict as JSON.
pub fn verdict_json(v: &FlowVerdict) -> Value {
    json!({
        "allowed": v.allowed,
        "failsafe": v.failsafe,
        "cluster": v.cluster,
        "sub": v.sub,
        "reason": v.reason,
    })
}

/// A verdict as text.
pub fn verdict_text(v: &FlowVerdict) -> String {
    format!(
        "{}: {}",
        if v.allowed == Some(true) {
            "allowed"
        } else {
            "denied"
        },
        v.reason.as_deref().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_reply_of_another_shape_does_not_panic() {
        for v in [
            serde_json::json!({"action": [], "dhcp_servers": ["only one"]}),
            serde_json::json!({"action": ["drop"], "dhcp_servers": []}),
            serde_json::json!({"action": "drop", "dhcp_servers": null}),
        ] {
            let t = check_text(&v);
            assert!(
                !t.contains("denied traffic") && !t.contains("DHCP replies"),
                "{t}"
            );
        }
        let t = check_text(&serde_json::json!({"action": ["drop", "reject"]}));
        assert!(t.contains("denied traffic: \"drop\" → \"reject\""), "{t}");
    }

    #[test]
    fn dhcp_servers_are_shown_for_humans() {
        let v: Value =
            serde_json::json!(["10.77.0.1", { "addr": "10.77.0.2", "mac": "52:54:00:00:00:02" }]);
        assert_eq!(
            dhcp_servers_text(&v),
            "10.77.0.1, 10.77.0.2 (mac 52:54:00:00:00:02)"
        );
        assert_eq!(dhcp_servers_text(&serde_json::json!([])), "none");
        assert_eq!(dhcp_servers_text(&Value::Null), "any (not set)");
    }

    fn refusal(msg: &str) -> CliError {
        CliError {
            dbus_error: Some("org.leasehold.Error.InvalidArgument".into()),
            ..CliError::new(exit::INVALID, format!("invalid argument: {msg}"))
        }
    }

    #[test]
    fn document_refusals_name_the_file_line_and_column() {
        let f = Path::new("/etc/b.toml");
        let e = in_document(f, "")(refusal("line 3, column 9: allow[0].peers: expected `]`"));
        assert_eq!(
            e.message,
            "invalid argument: /etc/b.toml:3:9: allow[0].peers: expected `]`"
        );
        assert_eq!(e.code, exit::INVALID);
        let e = in_document(f, "")(refusal("allow[0].peers[0]: \"x\" is not an IP address"));
        assert_eq!(
            e.message,
            "invalid argument: /etc/b.toml: allow[0].peers[0]: \"x\" is not an IP address"
        );
        let s = Path::new("spec.toml");
        let e = in_document(s, "spec: ")(refusal("spec: line 1, column 1: document: bad"));
        assert_eq!(e.message, "invalid argument: spec.toml:1:1: document: bad");
        // Not about the document: unchanged.
        let e = in_document(s, "spec: ")(refusal("image \"x\": no such file"));
        assert_eq!(e.message, "invalid argument: image \"x\": no such file");
        let other = CliError::new(exit::NOT_FOUND, "not found: x");
        assert_eq!(in_document(s, "")(other).message, "not found: x");
    }
}
