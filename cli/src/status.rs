//! `status` (one overview of the node, non-zero when something is wrong)
//! and `monitor` (the agent's signals, one line each) of both CLIs.
//! docs/cli.md "Status and monitor".

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use leasehold_dbus_api::tenant_engines::TenantEnginesProxy;
use leasehold_dbus_api::{
    BoundaryInfo, BudgetInfo, Error as ApiError, KeyChange, LandlordProxy, NodeInfo, TenantProxy,
    VolumeInfo,
};
use serde_json::{json, Value};
use zbus::Connection;

use crate::boundary::unix_time_text;
use crate::output::{change_json, change_text, emit, print_line};
use crate::{exit, CliError};

/// Exit status of `status` when the overview lists a problem (docs/cli.md).
pub const STATUS_PROBLEM: u8 = exit::FAILURE;

fn unavailable(e: zbus::Error) -> CliError {
    CliError::new(exit::UNAVAILABLE, e.to_string())
}

/// A section the caller's role may lack (no tenant yet): absent, not an error.
fn optional<T>(r: Result<T, ApiError>) -> Result<Option<T>, CliError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(ApiError::NotAssigned(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What `status` gathered.
struct Overview {
    landlord: bool,
    version: Option<u32>,
    info: NodeInfo,
    boundary: BoundaryInfo,
    volume: Option<VolumeInfo>,
    /// The tenant's engines (name, state); the landlord has a count only.
    engines: Option<Vec<(String, String)>>,
    /// The health report (landlord only).
    health: Option<Result<Value, ApiError>>,
    /// The tenant budget and its aggregate use (landlord only; the inner
    /// None: an agent without `GetBudget`).
    budget: Option<Option<BudgetInfo>>,
}

impl Overview {
    /// Everything that makes `status` exit non-zero, one line each.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.info.tpm_health.as_deref() == Some("failed") {
            p.push(format!(
                "TPM failed: {}",
                self.info.tpm_error.as_deref().unwrap_or("no reason given")
            ));
        }
        if let Some(v) = &self.volume {
            if v.state.as_deref() == Some("error") {
                let mut s = format!(
                    "volume failed: {}",
                    v.error.as_deref().unwrap_or("no reason given")
                );
                if let Some(n) = &v.next {
                    s.push_str(&format!(" (next: {n})"));
                }
                p.push(s);
            }
        }
        if let Some(d) = &self.boundary.drift_unrepaired {
            p.push(format!("boundary drift not repaired: {d}"));
        } else if self.boundary_set() && self.boundary.enforced == Some(false) {
            p.push("a boundary is stored but the kernel does not enforce it".into());
        }
        for (name, state) in self.engines.iter().flatten() {
            if state == "gave-up" {
                p.push(format!("engine {name}: gave up restarting"));
            }
        }
        if let Some(Some(b)) = &self.budget {
            // Only a problem while engines depend on it: a node without
            // the engines' cgroup tree and without engines is fine.
            if b.written == Some(false) && b.engines.unwrap_or(0) > 0 {
                p.push(format!(
                    "tenant budget not written on the engines' cgroup subtree: {}",
                    b.write_error.as_deref().unwrap_or("no reason given")
                ));
            }
        }
        if let Some(problem) = self
            .health
            .as_ref()
            .and_then(|h| crate::health::status_part(h).2)
        {
            p.push(problem);
        }
        p
    }

    fn boundary_set(&self) -> bool {
        let b = &self.boundary;
        if self.landlord {
            b.cluster.is_some()
        } else {
            b.effective.is_some() || b.sub.is_some()
        }
    }

    fn json(&self, problems: &[String]) -> Value {
        let i = &self.info;
        let b = &self.boundary;
        let tenant_keys = i.tenant_generation.map(|g| {
            json!({"generation": g, "key_generation": i.tenant_key_generation, "fingerprint": i.tenant_fingerprint})
        });
        let mut v = json!({
            "ok": problems.is_empty(),
            "problems": problems,
            "agent": {"version": i.agent_version, "api_version": i.api_version.or(self.version)},
            "node_id": i.node_id,
            "tpm": {"kind": i.tpm_kind, "health": i.tpm_health, "error": i.tpm_error},
            "keys": {
                "landlord": {"generation": i.landlord_generation, "fingerprint": i.landlord_fingerprint},
                "tenant": tenant_keys,
            },
            "tenant": {"assigned": i.assigned, "name": i.tenant_name},
            "boundary": {
                "set": self.boundary_set(),
                "enforced": b.enforced,
                "elements": b.elements,
                "drift_count": b.drift_count,
                "last_drift": b.last_drift,
                "last_drift_at": b.last_drift_at,
                "drift_unrepaired": b.drift_unrepaired,
                "revert_at": b.revert_at,
            },
            "volume": self.volume.as_ref().map(|v| json!({"state": v.state, "device": v.device, "error": v.error, "next": v.next})),
            "running": i.running,
        });
        v["engines"] = match &self.engines {
            Some(list) => json!({
                "count": list.len(),
                "list": list.iter().map(|(n, s)| json!({"name": n, "state": s})).collect::<Vec<_>>(),
            }),
            None => json!({"count": i.engine_count}),
        };
        if let Some(h) = &self.health {
            v["health"] = crate::health::status_part(h).0;
        }
        if let Some(b) = &self.budget {
            v["budget"] = b.as_ref().map_or(Value::Null, crate::budget::budget_json);
        }
        v
    }

    fn text(&self, problems: &[String]) -> String {
        let i = &self.info;
        let b = &self.boundary;
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<15}{v}\n"));
        line(
            "agent:",
            format!(
                "{}, API {}",
                i.agent_version
                    .as_deref()
                    .map_or_else(|| "version unknown".to_owned(), |v| format!("agentd {v}")),
                i.api_version
                    .or(self.version)
                    .map_or_else(|| "?".to_owned(), |v| v.to_string())
            ),
        );
        if let Some(id) = &i.node_id {
            line("node id:", id.clone());
        }
        line(
            "TPM:",
            format!(
                "{}, {}",
                i.tpm_kind.as_deref().unwrap_or("?"),
                match (&i.tpm_health, &i.tpm_error) {
                    (Some(h), Some(e)) => format!("{} ({e})", h.to_uppercase()),
                    (Some(h), None) => h.clone(),
                    (None, _) => "health unknown".into(),
                }
            ),
        );
        let fp = |f: &Option<String>| f.clone().unwrap_or_else(|| "?".into());
        if i.landlord_generation.is_some() || self.landlord {
            line(
                "landlord keys:",
                format!(
                    "generation {}, {}",
                    i.landlord_generation
                        .map_or_else(|| "?".into(), |g| g.to_string()),
                    fp(&i.landlord_fingerprint)
                ),
            );
        }
        match i.assigned {
            Some(true) => {
                line(
                    "tenant:",
                    i.tenant_name.clone().unwrap_or_else(|| "(unnamed)".into()),
                );
                line(
                    "tenant keys:",
                    format!(
                        "generation {}, key generation {}, {}",
                        i.tenant_generation
                            .map_or_else(|| "?".into(), |g| g.to_string()),
                        i.tenant_key_generation
                            .map_or_else(|| "?".into(), |g| g.to_string()),
                        fp(&i.tenant_fingerprint)
                    ),
                );
            }
            _ => line("tenant:", "not assigned".into()),
        }
        let mut bl = if !self.boundary_set() {
            "none set".to_owned()
        } else if b.enforced == Some(true) {
            format!("enforced, {} elements", b.elements.unwrap_or(0))
        } else {
            "NOT ENFORCED".to_owned()
        };
        match (b.drift_count, b.last_drift_at) {
            (Some(n), Some(at)) if n > 0 => bl.push_str(&format!(
                "; drift {n} time{} since the agent started, last {}{}",
                if n == 1 { "" } else { "s" },
                unix_time_text(at),
                b.last_drift
                    .as_deref()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default()
            )),
            (Some(_), _) => bl.push_str("; no drift since the agent started"),
            _ => {}
        }
        if let Some(at) = b.revert_at {
            bl.push_str(&format!(
                "; reverts {} unless confirmed",
                unix_time_text(at)
            ));
        }
        line("boundary:", bl);
        match &self.volume {
            Some(v) => {
                let st = v.state.as_deref().unwrap_or("?");
                line(
                    "volume:",
                    match (st, &v.device) {
                        ("none", _) => "none".to_owned(),
                        (_, Some(d)) => format!("{st} ({d})"),
                        (_, None) => st.to_owned(),
                    },
                );
            }
            None => line("volume:", "- (no tenant)".into()),
        }
        match &self.engines {
            Some(list) if list.is_empty() => line("engines:", "none".into()),
            Some(list) => line(
                "engines:",
                list.iter()
                    .map(|(n, s)| format!("{n} {s}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            None => line(
                "engines:",
                i.engine_count.map_or_else(|| "?".into(), |n| n.to_string()),
            ),
        }
        if let Some(Some(b)) = &self.budget {
            line("budget:", crate::budget::limits_text(b));
            line("tenant usage:", crate::budget::usage_text(b));
            if let Some(t) = crate::budget::throttle_text(b) {
                line("throttled:", t);
            }
        }
        if let Some(h) = &self.health {
            line("health:", crate::health::status_part(h).1);
            if let Some(n) = h.as_ref().ok().and_then(crate::health::network_line) {
                line("network:", n);
            }
        }
        if let Some(r) = &i.running {
            line("running:", r.clone());
        }
        for p in problems {
            line("PROBLEM:", p.clone());
        }
        line(
            "status:",
            if problems.is_empty() {
                "ok".into()
            } else {
                format!(
                    "{} problem{}",
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                )
            },
        );
        s.trim_end().to_owned()
    }

    fn emit(self, json: bool) -> Result<(), CliError> {
        let problems = self.problems();
        emit(json, self.json(&problems), || self.text(&problems));
        if problems.is_empty() {
            Ok(())
        } else {
            // Printed above; the exit status says it.
            Err(CliError::new(STATUS_PROBLEM, ""))
        }
    }
}

/// `landlordctl status`.
pub async fn landlord_status(conn: &Connection, json: bool) -> Result<(), CliError> {
    let p = LandlordProxy::new(conn).await.map_err(unavailable)?;
    let info = p.node_info().await?;
    Overview {
        landlord: true,
        version: crate::progress::within(conn, p.version()).await.ok(),
        boundary: p.get_boundary().await?,
        volume: Some(p.volume_status().await?),
        engines: None,
        health: Some(crate::health::fetch(conn).await),
        budget: Some(budget(&p).await?),
        info,
    }
    .emit(json)
}

/// The budget, or None from an agent that predates `GetBudget`.
async fn budget(p: &LandlordProxy<'_>) -> Result<Option<BudgetInfo>, CliError> {
    match p.get_budget().await {
        Ok(b) => Ok(Some(b)),
        Err(ApiError::ZBus(zbus::Error::MethodError(name, _, _)))
            if name.as_str() == "org.freedesktop.DBus.Error.UnknownMethod" =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// `tenantctl status`.
pub async fn tenant_status(conn: &Connection, json: bool) -> Result<(), CliError> {
    let p = TenantProxy::new(conn).await.map_err(unavailable)?;
    let e = TenantEnginesProxy::new(conn).await.map_err(unavailable)?;
    let info = p.node_info().await?;
    let engines = optional(e.list().await)?.map(|list| {
        list.into_iter()
            .map(|i| {
                (
                    i.name.unwrap_or_default(),
                    i.state.unwrap_or_else(|| "?".into()),
                )
            })
            .collect()
    });
    Overview {
        landlord: false,
        version: crate::progress::within(conn, p.version()).await.ok(),
        boundary: optional(p.get_boundary().await)?.unwrap_or_default(),
        volume: optional(p.volume_status().await)?,
        engines,
        health: None,
        budget: None,
        info,
    }
    .emit(json)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One event: a JSON line, or a text line with the time.
fn event(json: bool, name: &str, fields: Value, text: String) {
    if json {
        let mut v = json!({"time": now(), "event": name});
        if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
            o.extend(f);
        }
        print_line(&v.to_string());
    } else {
        print_line(&format!(
            "{} {name}: {}",
            unix_time_text(now()),
            text.replace('\n', "; ")
        ));
    }
}

fn key_event(json: bool, c: &KeyChange) {
    event(
        json,
        "KeysChanged",
        json!({"change": change_json(c)}),
        change_text(c),
    );
}

/// A `FaultsChanged`: the worst severity and each fault, one per clause
/// in text (the agent's JSON is passed through in `--json`; a body that
/// is not JSON is shown as it came, never dropped).
fn faults_event(json: bool, severity: &str, faults: &str) {
    let list: Value = serde_json::from_str(faults).unwrap_or_else(|_| Value::String(faults.into()));
    let text = match list.as_array() {
        Some(a) if a.is_empty() => "no faults".to_owned(),
        Some(a) => a
            .iter()
            .map(|f| {
                format!(
                    "{} {} {}: {}",
                    f["severity"].as_str().unwrap_or("?"),
                    f["source"].as_str().unwrap_or("?"),
                    f["subject"].as_str().unwrap_or("?"),
                    f["message"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        None => faults.to_owned(),
    };
    event(
        json,
        "FaultsChanged",
        json!({"severity": severity, "faults": list}),
        format!("health {severity}: {text}"),
    );
}

/// Says on stderr (never stdout, which carries only events) that the
/// subscriptions are in place: a change after this line is printed.
fn ready(what: &str) {
    eprintln!("monitoring {what} (Ctrl-C to stop)");
}

fn ended() -> CliError {
    CliError::new(
        exit::UNAVAILABLE,
        "the connection to the bus was closed; monitoring stopped",
    )
}

/// `landlordctl monitor`: the landlord interface's signals.
pub async fn landlord_monitor(conn: &Connection, json: bool) -> Result<(), CliError> {
    let p = LandlordProxy::new(conn).await.map_err(unavailable)?;
    let mut keys = p.receive_keys_changed().await.map_err(unavailable)?;
    let mut restored = p.receive_boundary_restored().await.map_err(unavailable)?;
    let mut reverted = p.receive_boundary_reverted().await.map_err(unavailable)?;
    let h = leasehold_dbus_api::health::HealthProxy::new(conn)
        .await
        .map_err(unavailable)?;
    let mut faults = h.receive_faults_changed().await.map_err(unavailable)?;
    ready("KeysChanged, BoundaryRestored, BoundaryReverted, FaultsChanged");
    loop {
        tokio::select! {
            s = keys.next() => {
                let s = s.ok_or_else(ended)?;
                if let Ok(a) = s.args() {
                    key_event(json, &a.change);
                }
            }
            s = restored.next() => {
                let s = s.ok_or_else(ended)?;
                if let Ok(a) = s.args() {
                    event(json, "BoundaryRestored", json!({"what": a.what}), format!("the boundary was changed behind the agent's back and restored: {}", a.what));
                }
            }
            s = reverted.next() => {
                let s = s.ok_or_else(ended)?;
                if let Ok(a) = s.args() {
                    event(json, "BoundaryReverted", json!({"what": a.what}), format!("the previous boundary was put back (not confirmed in time): {}", a.what));
                }
            }
            s = faults.next() => {
                let s = s.ok_or_else(ended)?;
                if let Ok(a) = s.args() {
                    faults_event(json, &a.severity, &a.faults);
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `tenantctl monitor`: the tenant interface's signals.
pub async fn tenant_monitor(conn: &Connection, json: bool) -> Result<(), CliError> {
    let p = TenantProxy::new(conn).await.map_err(unavailable)?;
    let mut keys = p.receive_keys_changed().await.map_err(unavailable)?;
    ready("KeysChanged");
    loop {
        tokio::select! {
            s = keys.next() => {
                let s = s.ok_or_else(ended)?;
                if let Ok(a) = s.args() {
                    key_event(json, &a.change);
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
