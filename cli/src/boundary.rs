//! `boundary` subcommands shared by both CLIs: arguments, document files,
//! and output of boundary listings and flow verdicts.

use std::path::Path;

use clap::Args;
use leasehold_dbus_api::{BoundaryInfo, FlowVerdict};
use serde_json::{json, Value};

use crate::{exit, read_arg_file, CliError};

/// The flow `boundary explain` asks about.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The other end of the flow (IPv4 or IPv6 address).
    #[arg(long)]
    pub peer: String,
    /// "in" (peer → node) or "out" (node → peer).
    #[arg(long, value_parser = ["in", "out"], default_value = "in")]
    pub direction: String,
    /// Protocol.
    #[arg(long, value_parser = ["tcp", "udp", "icmp"], default_value = "tcp")]
    pub proto: String,
    /// Destination port (ignored for icmp).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
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

fn parsed(s: &Option<String>) -> Value {
    s.as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

/// A listing as JSON (documents embedded as objects).
pub fn info_json(i: &BoundaryInfo) -> Value {
    json!({
        "cluster": parsed(&i.cluster),
        "sub": parsed(&i.sub),
        "effective": parsed(&i.effective),
        "failsafe": i.failsafe,
        "enforced": i.enforced,
        "elements": i.elements,
        "change": i.change,
        "cut": i.cut,
        "warnings": i.warnings,
        "peers_changed": i.peers_changed,
        "last_drift": i.last_drift,
    })
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
        let shown = if peers.len() > 8 {
            format!("{} … ({} peers)", peers[..8].join(", "), peers.len())
        } else {
            peers.join(", ")
        };
        let protos = e
            .get("protocols")
            .map_or("all protocols".to_owned(), Value::to_string);
        out.push_str(&format!("  {name}: {dir} {shown}; {protos}\n"));
    }
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
        if let Some(g) = cluster.get("groups").and_then(Value::as_object) {
            for (name, members) in g {
                let n = members.as_array().map_or(0, Vec::len);
                s.push_str(&format!("  group @{name}: {n} members\n"));
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
        entries_text(&mut s, &parsed(&i.effective));
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
    s
}

/// Prints warnings to stderr (they matter even with --json).
pub fn print_warnings(i: &BoundaryInfo) {
    for w in i.warnings.iter().flatten() {
        eprintln!("warning: {w}");
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
