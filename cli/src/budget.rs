//! `landlordctl budget`: the tenant's budget (cgroup limits of its
//! subtree) and the aggregate use of it (docs/engines.md "Budget").

use std::path::PathBuf;

use clap::Subcommand;
use leasehold_dbus_api::{BudgetInfo, LandlordProxy};
use serde_json::{json, Map, Value};

use crate::boundary::in_document;
use crate::output::{emit, emit_done};
use crate::{exit, CliError};

/// `landlordctl budget ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum BudgetCommand {
    /// Set the tenant's budget, from a TOML or JSON document or from flags
    /// (not both). Limits not given are lifted (the kernel's `max`).
    ///
    /// Engines whose own limits are above the new budget keep running,
    /// held by the kernel to it (their count is printed).
    Set {
        /// Budget document (.toml or .json): cpu_max, cpu_weight,
        /// memory_max, pids_max, io_weight.
        file: Option<PathBuf>,
        /// CPU bandwidth of all engines together, "QUOTA PERIOD" in µs
        /// (e.g. "200000 100000": two CPUs).
        #[arg(long, value_name = "QUOTA PERIOD", conflicts_with = "file")]
        cpu_max: Option<String>,
        /// The tenant's CPU weight among other cgroups (1-10000).
        #[arg(long, value_name = "WEIGHT", conflicts_with = "file")]
        cpu_weight: Option<u16>,
        /// Memory of all engines together (bytes, or K, M, G, T).
        #[arg(long, value_name = "SIZE", conflicts_with = "file")]
        memory_max: Option<String>,
        /// Processes and threads of all engines together.
        #[arg(long, value_name = "N", conflicts_with = "file")]
        pids_max: Option<u64>,
        /// The tenant's I/O weight among other cgroups (1-10000).
        #[arg(long, value_name = "WEIGHT", conflicts_with = "file")]
        io_weight: Option<u16>,
    },
    /// Lift every limit of the budget.
    Clear,
    /// Show the budget and what the tenant's engines use of it together.
    Show,
}

/// Runs `budget …`.
pub async fn run(p: &LandlordProxy<'_>, cmd: BudgetCommand, json: bool) -> Result<(), CliError> {
    let (info, changed) = match cmd {
        BudgetCommand::Show => (p.get_budget().await?, false),
        BudgetCommand::Clear => (p.set_budget("", "toml").await?, true),
        BudgetCommand::Set {
            file: Some(file), ..
        } => {
            let (text, format) = crate::boundary::read_document(&file)?;
            let i = p
                .set_budget(&text, format)
                .await
                .map_err(in_document(&file, ""))?;
            (i, true)
        }
        BudgetCommand::Set {
            file: None,
            cpu_max,
            cpu_weight,
            memory_max,
            pids_max,
            io_weight,
        } => {
            let mut doc = Map::new();
            if let Some(v) = cpu_max {
                doc.insert("cpu_max".into(), json!(v));
            }
            if let Some(v) = cpu_weight {
                doc.insert("cpu_weight".into(), json!(v));
            }
            if let Some(v) = memory_max {
                doc.insert("memory_max".into(), json!(v));
            }
            if let Some(v) = pids_max {
                doc.insert("pids_max".into(), json!(v));
            }
            if let Some(v) = io_weight {
                doc.insert("io_weight".into(), json!(v));
            }
            if doc.is_empty() {
                return Err(CliError::new(
                    exit::USAGE,
                    "budget set: give a document FILE or at least one limit (--cpu-max, --cpu-weight, --memory-max, --pids-max, --io-weight); `budget clear` lifts them all",
                ));
            }
            let text = Value::Object(doc).to_string();
            (p.set_budget(&text, "json").await?, true)
        }
    };
    if changed {
        // Recorded but not in force yet: said on stderr in both modes, as
        // key changes report what did not work after them.
        if let (Some(false), Some(e)) = (info.written, &info.write_error) {
            eprintln!(
                "warning: the budget is recorded but not written on the engines' cgroup subtree ({}); no engine starts until it can be",
                crate::output::terminal_safe(e)
            );
        }
        emit_done(json, budget_json(&info), || budget_text(&info));
    } else {
        emit(json, budget_json(&info), || budget_text(&info));
    }
    Ok(())
}

/// `Budget` of docs/json.md.
pub fn budget_json(i: &BudgetInfo) -> Value {
    let usage = i.cpu_usage_usec.map(|cpu| {
        json!({
            "cpu_usage_usec": cpu,
            "memory_current": i.memory_current,
            "pids_current": i.pids_current,
            "oom_kills": i.oom_kills,
            "io_read_bytes": i.io_read_bytes,
            "io_write_bytes": i.io_write_bytes,
            "io_reads": i.io_reads,
            "io_writes": i.io_writes,
        })
    });
    json!({
        "limits": {
            "cpu_max": i.cpu_max,
            "cpu_weight": i.cpu_weight,
            "memory_max": i.memory_max,
            "pids_max": i.pids_max,
            "io_weight": i.io_weight,
        },
        "written": i.written,
        "write_error": i.write_error,
        "engines": i.engines,
        "engines_running": i.engines_running,
        "engines_above": i.engines_above,
        "usage": usage,
        "usage_error": i.usage_error,
        "throttle": i.throttle_cpu_percent.map(|p| json!({
            "cpu_percent": p,
            "cpu_max": i.throttled_cpu_max,
            "since": i.throttled_since,
        })),
    })
}

/// Bytes in the largest exact binary unit (`8G`, `1536K`), as budgets are
/// written.
fn size(v: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if v != 0 && v.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", v >> shift);
        }
    }
    format!("{v}")
}

/// Bytes for reading (one decimal, binary units).
fn approx(v: u64) -> String {
    let mut x = v as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if x < 1024.0 {
            return if unit == "B" {
                format!("{v} B")
            } else {
                format!("{x:.1} {unit}")
            };
        }
        x /= 1024.0;
    }
    format!("{x:.1} TiB")
}

fn cpus(cpu_max: &str) -> String {
    let mut it = cpu_max.split_whitespace();
    match (
        it.next().and_then(|q| q.parse::<f64>().ok()),
        it.next().and_then(|p| p.parse::<f64>().ok()),
    ) {
        (Some(q), Some(p)) if p > 0.0 => format!("{} CPUs (\"{cpu_max}\")", q / p),
        _ => format!("\"{cpu_max}\""),
    }
}

/// One line: the limits (`none` when no limit is set).
pub fn limits_text(i: &BudgetInfo) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &i.cpu_max {
        parts.push(format!("cpu {}", cpus(c)));
    }
    if let Some(m) = i.memory_max {
        parts.push(format!("memory {}", size(m)));
    }
    if let Some(p) = i.pids_max {
        parts.push(format!("pids {p}"));
    }
    if let Some(w) = i.cpu_weight {
        parts.push(format!("cpu weight {w}"));
    }
    if let Some(w) = i.io_weight {
        parts.push(format!("io weight {w}"));
    }
    if parts.is_empty() {
        "none (no limit of its own)".into()
    } else {
        parts.join(", ")
    }
}

/// One line: the subtree's use (or why it cannot be read).
pub fn usage_text(i: &BudgetInfo) -> String {
    let Some(cpu) = i.cpu_usage_usec else {
        return format!(
            "unavailable ({})",
            i.usage_error.as_deref().unwrap_or("not reported")
        );
    };
    let of = |v: Option<u64>, max: Option<u64>, f: fn(u64) -> String| match (v, max) {
        (Some(v), Some(m)) => format!("{} of {}", f(v), f(m)),
        (Some(v), None) => f(v),
        (None, _) => "?".into(),
    };
    format!(
        "cpu {:.1} s, memory {}, pids {}, io read {} write {}, OOM kills {}",
        cpu as f64 / 1e6,
        of(i.memory_current, i.memory_max, approx),
        of(i.pids_current, i.pids_max, |v| v.to_string()),
        approx(i.io_read_bytes.unwrap_or(0)),
        approx(i.io_write_bytes.unwrap_or(0)),
        i.oom_kills.unwrap_or(0)
    )
}

/// The human form of `budget set` and `budget show`.
pub fn budget_text(i: &BudgetInfo) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<15}{v}\n"));
    line("budget:", limits_text(i));
    line(
        "written:",
        match (i.written, &i.write_error) {
            (Some(true), _) => "on the tenant's cgroup subtree".into(),
            (_, Some(e)) => format!("NO: {e} (recorded; no engine starts until it can be written)"),
            _ => "?".into(),
        },
    );
    let mut engines = format!(
        "{} deployed, {} running",
        i.engines.map_or_else(|| "?".into(), |n| n.to_string()),
        i.engines_running
            .map_or_else(|| "?".into(), |n| n.to_string())
    );
    if let Some(n) = i.engines_above.filter(|n| *n > 0) {
        engines.push_str(&format!(
            "; {n} with own limits above the budget (held to it by the kernel)"
        ));
    }
    line("engines:", engines);
    line("usage:", usage_text(i));
    if let Some(t) = throttle_text(i) {
        line("throttled:", t);
    }
    s.trim_end().to_owned()
}

/// A corrective throttle in force (`throttle-engines`), for `budget` and
/// `status`; None when there is none.
pub fn throttle_text(i: &BudgetInfo) -> Option<String> {
    let p = i.throttle_cpu_percent?;
    Some(format!(
        "{p}% of the budget's CPU by a corrective action (cpu.max {}) since {} (until the fault clears)",
        i.throttled_cpu_max.as_deref().unwrap_or("?"),
        i.throttled_since.map_or_else(
            || "?".into(),
            |t| crate::timefmt::rfc3339_ms(t.saturating_mul(1000))
        ),
    ))
}
