//! `landlordctl health`: the node's health report (docs/health.md), and
//! the one-line summary `landlordctl status` shows.
//!
//! The report is read as JSON values, not the agent's types: an agent that
//! adds fields or sources still prints.

use leasehold_dbus_api::{Error as ApiError, HealthProxy};
use serde_json::{json, Value};
use zbus::Connection;

use crate::output::emit;
use crate::{exit, CliError};

/// Severities that make `health` (and `status`) exit 1.
const BAD: [&str; 2] = ["critical", "stuck"];

/// The report's sources that are the agent's own checks.
const AGENT_CHECKS: [&str; 4] = ["tpm", "boundary", "volume", "engines"];

/// Asks the agent for a report.
pub async fn fetch(conn: &Connection) -> Result<Value, ApiError> {
    let p = HealthProxy::new(conn).await?;
    let text = p.report().await?;
    serde_json::from_str(&text)
        .map_err(|e| ApiError::Failed(format!("the agent's health report is not JSON: {e}")))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("?")
}

fn faults(r: &Value) -> &[Value] {
    r["faults"].as_array().map_or(&[], Vec::as_slice)
}

/// Critical and stuck faults.
pub fn bad_faults(r: &Value) -> usize {
    faults(r)
        .iter()
        .filter(|f| BAD.contains(&s(f, "severity")))
        .count()
}

/// The report as a table: sources, then faults.
pub fn text(r: &Value) -> String {
    let mut out = format!("{:<9}{:<10}{:>8}  {}\n", "SOURCE", "STATUS", "MS", "READ");
    for src in r["sources"].as_array().into_iter().flatten() {
        let items = src["readings"]["items"].as_array().map(Vec::len);
        let problems = src["problems"].as_array().map_or(0, Vec::len);
        let mut what = match (s(src, "status"), items) {
            ("ok", Some(n)) => check_line(src)
                .unwrap_or_else(|| format!("{n} item{}", if n == 1 { "" } else { "s" })),
            ("disabled", _) => "turned off ([health] in agentd.toml)".into(),
            _ => "-".into(),
        };
        if problems > 0 {
            what.push_str(&format!(", {problems} unreadable"));
        }
        out.push_str(&format!(
            "{:<9}{:<10}{:>8}  {what}\n",
            s(src, "source"),
            s(src, "status"),
            src["elapsed_ms"]
                .as_u64()
                .map_or("-".into(), |m| m.to_string())
        ));
    }
    let f = faults(r);
    if !f.is_empty() {
        out.push_str(&format!(
            "\n{:<10}{:<9}{:<16}{}\n",
            "SEVERITY", "SOURCE", "SUBJECT", "FAULT"
        ));
        for f in f {
            out.push_str(&format!(
                "{:<10}{:<9}{:<16}{}\n",
                s(f, "severity"),
                s(f, "source"),
                s(f, "subject"),
                s(f, "message")
            ));
        }
    }
    if let Some(n) = r["network"].as_object() {
        out.push_str(&network_text(n));
    }
    out.push_str(&format!("\nhealth: {}", summary(r)));
    out
}

/// The agent's own checks (`tpm`, `boundary`, `volume`, `engines`) in
/// words; None for a sensor source (or a check this CLI does not know).
fn check_line(src: &Value) -> Option<String> {
    let c = &src["readings"]["items"][0];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    Some(match s(src, "source") {
        "tpm" if c["answered"] == true => "answers".into(),
        "tpm" => format!("no answer: {}", s(c, "error")),
        "boundary" if c["stored"] != true => "none stored".into(),
        "boundary" => format!(
            "{}, {} elements, {} drifts since start",
            if c["enforced"] == true {
                "enforced"
            } else {
                "NOT enforced"
            },
            n("elements"),
            n("drifts")
        ),
        "volume" => format!(
            "{}{}",
            s(c, "state"),
            if c["mounted"] == true {
                ", mounted"
            } else {
                ""
            }
        ),
        "engines" => format!(
            "{} deployed, {} running, {} crash-looping, {} gave up, {} failing a probe",
            n("deployed"),
            n("running"),
            n("crash_looping"),
            n("gave_up"),
            n("probe_failing")
        ),
        _ => return None,
    })
}

/// The report's `network` (docs/health.md "Network") as tables: links with
/// their addresses, default routes, leases, the last events.
fn network_text(n: &serde_json::Map<String, Value>) -> String {
    let list = |k: &str| {
        n.get(k)
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice)
    };
    let mut out = String::new();
    if let Some(e) = n.get("error").and_then(Value::as_str) {
        out.push_str(&format!("\nnetwork: NOT WATCHED ({e})\n"));
    }
    out.push_str(&format!(
        "\n{:<16}{:<7}{:<8}{:<15}{}\n",
        "LINK", "ADMIN", "CARRIER", "STATE", "ADDRESSES"
    ));
    for l in list("links") {
        let iface = s(l, "iface");
        let addrs: Vec<String> = list("addresses")
            .iter()
            .filter(|a| s(a, "iface") == iface)
            .map(|a| format!("{}/{}", s(a, "address"), a["prefix_len"]))
            .collect();
        let yes = |k: &str| match l[k].as_bool() {
            Some(true) => "up",
            Some(false) => "down",
            None => "?",
        };
        out.push_str(&format!(
            "{iface:<16}{:<7}{:<8}{:<15}{}\n",
            yes("admin_up"),
            yes("carrier"),
            s(l, "operstate"),
            addrs.join(" ")
        ));
    }
    for r in list("default_routes") {
        out.push_str(&format!(
            "default route: via {} dev {} metric {} ({})\n",
            r["gateway"].as_str().unwrap_or("-"),
            r["iface"].as_str().unwrap_or("?"),
            r["metric"],
            s(r, "protocol")
        ));
    }
    for l in list("leases") {
        out.push_str(&format!(
            "DHCP lease: {} on {} from {}, {} s\n",
            s(l, "address"),
            l["iface"].as_str().unwrap_or("?"),
            l["server"].as_str().unwrap_or("?"),
            l["lifetime_s"]
        ));
    }
    let events = list("recent_events");
    if !events.is_empty() {
        out.push_str(&format!(
            "last events ({} since the agent started):\n",
            n.get("events_total").unwrap_or(&Value::Null)
        ));
        for e in events.iter().rev().take(5) {
            out.push_str(&format!(
                "  {} {} {}{}\n",
                e["at_ms"],
                s(e, "kind"),
                s(e, "iface"),
                e["detail"]
                    .as_str()
                    .map_or(String::new(), |d| format!(" {d}"))
            ));
        }
    }
    out
}

/// For `status`: links up of all, addresses and default gateways, in one
/// line; None when the report has no network part.
pub fn network_line(r: &Value) -> Option<String> {
    let n = r["network"].as_object()?;
    if let Some(e) = n.get("error").and_then(Value::as_str) {
        return Some(format!("not watched ({e})"));
    }
    let list = |k: &str| {
        n.get(k)
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice)
    };
    let links = list("links");
    let up = links
        .iter()
        .filter(|l| l["admin_up"] == true && l["carrier"] == true)
        .count();
    let global: Vec<String> = list("addresses")
        .iter()
        .filter(|a| s(a, "scope") == "global")
        .map(|a| format!("{}/{}", s(a, "address"), a["prefix_len"]))
        .collect();
    let gw: Vec<&str> = list("default_routes")
        .iter()
        .filter_map(|r| r["gateway"].as_str())
        .collect();
    Some(format!(
        "{up}/{} links up; addresses {}; default via {}",
        links.len(),
        if global.is_empty() {
            "none".into()
        } else {
            global.join(" ")
        },
        if gw.is_empty() {
            "none".into()
        } else {
            gw.join(" ")
        }
    ))
}

/// One line: the worst severity, the count of faults and the worst one.
pub fn summary(r: &Value) -> String {
    let f = faults(r);
    match f.first() {
        None => "ok".into(),
        Some(w) => format!(
            "{}, {} fault{} (worst: {} {}: {})",
            s(r, "severity"),
            f.len(),
            if f.len() == 1 { "" } else { "s" },
            s(w, "source"),
            s(w, "subject"),
            s(w, "message")
        ),
    }
}

/// `landlordctl health`: exit 1 when a fault is critical or stuck.
pub async fn run(conn: &Connection, json: bool) -> Result<(), CliError> {
    let r = fetch(conn).await?;
    emit(json, r.clone(), || text(&r));
    if bad_faults(&r) > 0 {
        // Printed above; the exit status says it.
        return Err(CliError::new(exit::FAILURE, ""));
    }
    Ok(())
}

/// `status`'s `health` (docs/json.md "StatusHealth"): one shape with or
/// without a report, every field present (null when it has no value), so
/// a script reads `.health.severity` without first asking which shape.
fn part(
    severity: &Value,
    count: Option<usize>,
    worst: Option<&Value>,
    error: Option<&str>,
) -> Value {
    json!({
        "severity": severity,
        "fault_count": count,
        "worst": worst,
        "error": error,
    })
}

/// For `status`: the summary (JSON, text) and the problem, if any.
pub fn status_part(r: &Result<Value, ApiError>) -> (Value, String, Option<String>) {
    match r {
        Ok(r) => {
            // The agent's own checks are not problems twice: `status`
            // reads the TPM, volume, boundary and engines itself and names
            // what is wrong with them.
            let n = faults(r)
                .iter()
                .filter(|f| BAD.contains(&s(f, "severity")))
                .filter(|f| !AGENT_CHECKS.contains(&s(f, "source")))
                .count();
            let problem = (n > 0).then(|| format!("health: {}", summary(r)));
            (
                part(
                    &r["severity"],
                    Some(faults(r).len()),
                    faults(r).first(),
                    None,
                ),
                summary(r),
                problem,
            )
        }
        // A landlord account may be kept from the health action on
        // purpose: said, not a problem.
        Err(ApiError::NotAuthorized(m)) => (
            part(&Value::Null, None, None, Some(m)),
            "not authorized (org.leasehold.landlord.health)".into(),
            None,
        ),
        Err(e) => {
            let m = e.message();
            (
                part(&Value::Null, None, None, Some(&m)),
                format!("UNAVAILABLE ({m})"),
                Some(format!("health report unavailable: {m}")),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Value {
        json!({
            "taken_at": 1,
            "severity": "critical",
            "sources": [
                {"source": "edac", "status": "ok", "deadline_ms": 2000, "elapsed_ms": 3,
                 "readings": {"kind": "edac", "items": [{"mc": "mc0", "corrected": 0, "uncorrected": 2}]},
                 "problems": []},
                {"source": "smart", "status": "disabled", "deadline_ms": 12000, "elapsed_ms": 0,
                 "readings": null, "problems": []},
                {"source": "net", "status": "stuck", "deadline_ms": 2000, "elapsed_ms": 2000,
                 "readings": null, "problems": []}
            ],
            "faults": [
                {"severity": "stuck", "source": "net", "subject": "net", "message": "no answer within 2000 ms"},
                {"severity": "critical", "source": "edac", "subject": "mc0", "message": "2 uncorrected memory errors since boot"},
                {"severity": "warning", "source": "edac", "subject": "mc1", "message": "x"}
            ]
        })
    }

    #[test]
    fn agent_checks_in_words() {
        let r = json!({
            "taken_at": 1, "severity": "warning",
            "sources": [
                {"source": "tpm", "status": "ok", "deadline_ms": 2000, "elapsed_ms": 4,
                 "readings": {"kind": "tpm", "items": [{"answered": true, "error": null}]}, "problems": []},
                {"source": "boundary", "status": "ok", "deadline_ms": 2000, "elapsed_ms": 0,
                 "readings": {"kind": "boundary", "items": [{"stored": true, "enforced": true,
                   "elements": 3, "drifts": 1, "last_drift_age_secs": 5, "unrepaired": null}]}, "problems": []},
                {"source": "volume", "status": "ok", "deadline_ms": 2000, "elapsed_ms": 0,
                 "readings": {"kind": "volume", "items": [{"state": "none", "expected": false,
                   "mounted": false, "error": null}]}, "problems": []},
                {"source": "engines", "status": "ok", "deadline_ms": 2000, "elapsed_ms": 0,
                 "readings": {"kind": "engines", "items": [{"deployed": 2, "running": 1,
                   "crash_looping": 1, "gave_up": 0, "restarts": 4, "probe_failing": 1}]}, "problems": []}
            ],
            "faults": []
        });
        let t = text(&r);
        for want in [
            "tpm      ok               4  answers",
            "boundary ok               0  enforced, 3 elements, 1 drifts since start",
            "volume   ok               0  none",
            "engines  ok               0  2 deployed, 1 running, 1 crash-looping, 0 gave up, 1 failing a probe",
        ] {
            assert!(t.contains(want), "{want}: {t}");
        }
    }

    #[test]
    fn table_and_summary() {
        let t = text(&report());
        assert!(t.contains("edac     ok               3  1 item"), "{t}");
        assert!(t.contains("smart    disabled"), "{t}");
        assert!(
            t.contains("critical  edac     mc0             2 uncorrected"),
            "{t}"
        );
        assert!(
            t.ends_with("health: critical, 3 faults (worst: net net: no answer within 2000 ms)")
        );
        assert_eq!(bad_faults(&report()), 2);
        let ok = json!({"severity": "ok", "sources": [], "faults": []});
        assert_eq!(bad_faults(&ok), 0);
        assert_eq!(summary(&ok), "ok");
    }

    #[test]
    fn status_part_problems() {
        let (v, line, problem) = status_part(&Ok(report()));
        assert!(line.starts_with("critical, 3 faults"));
        assert_eq!(v["fault_count"], 3);
        assert_eq!(v["worst"]["subject"], "net");
        assert!(v["error"].is_null());
        assert!(problem.is_some());
        let warn = json!({"severity": "warning", "faults": [{"severity": "warning", "source": "net", "subject": "eth0", "message": "link down"}]});
        assert_eq!(status_part(&Ok(warn)).2, None, "warnings are not problems");
        let volume = json!({"severity": "critical", "faults": [{"severity": "critical", "source": "volume", "subject": "volume", "message": "the tenant volume is error, not open"}]});
        let (_, line, problem) = status_part(&Ok(volume));
        assert_eq!(problem, None, "status names the volume itself");
        assert!(line.starts_with("critical, 1 fault"), "{line}");
        let (v, line, problem) = status_part(&Err(ApiError::NotAuthorized("no".into())));
        assert!(line.contains("not authorized") && problem.is_none());
        assert_eq!(v["error"], "no");
        assert!(v["severity"].is_null() && v["fault_count"].is_null());
        let (_, _, problem) = status_part(&Err(ApiError::Failed("boom".into())));
        assert_eq!(problem.as_deref(), Some("health report unavailable: boom"));
    }
}
