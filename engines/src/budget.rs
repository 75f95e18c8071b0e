//! The landlord's tenant budget and the "can only narrow" rule for engine
//! limits, and the cgroup v2 file values each maps to.
//!
//! The budget is written on the tenant's cgroup subtree; each engine is a
//! child cgroup in it. cgroup v2 limits are hierarchical, so the kernel
//! holds every engine, and the SUM of all engines, to the budget whatever
//! an engine's own files say: [`check`] does not add engines up (that is
//! the kernel's job) and is not what keeps the tenant inside its budget.
//! It refuses, with both values, an engine limit that could never apply
//! (`limits.memory_max: 2G is above the tenant budget 1G`) instead of
//! letting it be silently ineffective, as boundaries refuse a sub-boundary
//! that widens.
//!
//! Weights (`cpu.weight`, `io.weight`) are not compared: a weight divides
//! a parent's share among siblings, so an engine's weight only orders the
//! tenant's engines among themselves and cannot take more than the
//! tenant's weight gives the tenant. The budget's weights are written on
//! the tenant's cgroup.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::{
    parse_cpu_max, parse_json, parse_toml, CpuMax, Limits, Size, SpecError, MAX_PIDS, MIN_MEMORY,
    WEIGHT_RANGE,
};

/// The landlord's budget for one tenant's cgroup subtree. Every limit is
/// optional (absent: no limit of the budget's own; the node's capacity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// `cpu.max` of the subtree (`"200000 100000"`: two CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<CpuMax>,
    /// `cpu.weight` of the tenant among tenants, 1-10000 (kernel default
    /// 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u16>,
    /// `memory.max` of the subtree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<Size>,
    /// `pids.max` of the subtree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// `io.weight` of the tenant among tenants, 1-10000 (kernel default
    /// 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u16>,
}

/// Largest budget document (TOML or JSON text), in bytes.
pub const MAX_BUDGET_BYTES: usize = 4096;

/// Why a budget is refused; `field` is a budget field (`memory_max`) or
/// `document`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("budget.{field}: {reason}")]
pub struct BudgetError {
    /// Where.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl From<SpecError> for BudgetError {
    fn from(e: SpecError) -> Self {
        BudgetError {
            field: e.field,
            reason: e.reason,
        }
    }
}

impl Budget {
    /// Parses and validates a TOML budget (at most [`MAX_BUDGET_BYTES`]);
    /// errors name the field.
    pub fn from_toml(text: &str) -> Result<Budget, BudgetError> {
        let b: Budget = parse_toml(text, MAX_BUDGET_BYTES)?;
        b.validate()?;
        Ok(b)
    }

    /// Parses and validates a JSON budget (one object, nothing after it).
    pub fn from_json(text: &str) -> Result<Budget, BudgetError> {
        let b: Budget = parse_json(text, MAX_BUDGET_BYTES)?;
        b.validate()?;
        Ok(b)
    }

    /// Checks the ranges the types do not (the same as an engine's).
    pub fn validate(&self) -> Result<(), BudgetError> {
        let bad = |field: &str, reason: String| {
            Err(BudgetError {
                field: field.into(),
                reason,
            })
        };
        if let Some(c) = self.cpu_max {
            // Built in code rather than parsed: the same rule as the text.
            if let Err(r) = parse_cpu_max(&c.to_string()) {
                return bad("cpu_max", r);
            }
        }
        for (field, w) in [
            ("cpu_weight", self.cpu_weight),
            ("io_weight", self.io_weight),
        ] {
            if let Some(w) = w.filter(|w| !WEIGHT_RANGE.contains(w)) {
                return bad(field, format!("{w}: between 1 and 10000"));
            }
        }
        if let Some(m) = self.memory_max.filter(|m| m.0 < MIN_MEMORY) {
            return bad("memory_max", format!("{m}: at least {}", Size(MIN_MEMORY)));
        }
        if let Some(p) = self.pids_max.filter(|p| !(1..=MAX_PIDS).contains(p)) {
            return bad("pids_max", format!("{p}: between 1 and {MAX_PIDS}"));
        }
        Ok(())
    }
}

/// One engine limit above the budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Over {
    /// The spec field (`limits.memory_max`).
    pub field: &'static str,
    /// The engine's value as written in specs.
    pub engine: String,
    /// The budget's value it exceeds.
    pub budget: String,
}

impl fmt::Display for Over {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} is above the tenant budget {}",
            self.field, self.engine, self.budget
        )
    }
}

/// Every engine limit above the budget (at least one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Excess(pub Vec<Over>);

impl fmt::Display for Excess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, o) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{o}")?;
        }
        Ok(())
    }
}

fn cpus(c: &CpuMax) -> String {
    format!("\"{c}\" ({} CPUs)", c.cpus())
}

/// "Can only narrow": refuses every engine limit above the budget, naming
/// the field and both values. An engine without a limit for a budgeted
/// resource is accepted and inherits the budget (see [`effective`] and
/// [`inherited`]). `limits` are a validated spec's.
/// Compared: CPU bandwidth (`cpus` / `cpu_max` against `cpu_max`, exactly),
/// `memory_max` and `memory_high` against `memory_max`, `pids_max`.
pub fn check(limits: &Limits, budget: &Budget) -> Result<(), Excess> {
    let mut over = Vec::new();
    if let (Some(e), Some(b)) = (limits.cpu(), budget.cpu_max) {
        if e.exceeds(&b) {
            over.push(Over {
                field: if limits.cpus.is_some() {
                    "limits.cpus"
                } else {
                    "limits.cpu_max"
                },
                engine: cpus(&e),
                budget: cpus(&b),
            });
        }
    }
    for (field, e) in [
        ("limits.memory_max", limits.memory_max),
        ("limits.memory_high", limits.memory_high),
    ] {
        if let (Some(e), Some(b)) = (e, budget.memory_max) {
            if e > b {
                over.push(Over {
                    field,
                    engine: e.to_string(),
                    budget: b.to_string(),
                });
            }
        }
    }
    if let (Some(e), Some(b)) = (limits.pids_max, budget.pids_max) {
        if e > b {
            over.push(Over {
                field: "limits.pids_max",
                engine: e.to_string(),
                budget: b.to_string(),
            });
        }
    }
    if over.is_empty() {
        Ok(())
    } else {
        Err(Excess(over))
    }
}

/// The limits that bind an engine: its own where it has one, else the
/// budget's (what `status` shows). Weights are the engine's own (or the
/// kernel default), since they are relative among the tenant's engines.
pub fn effective(limits: &Limits, budget: &Budget) -> Limits {
    Limits {
        cpus: None,
        cpu_max: limits.cpu().or(budget.cpu_max),
        cpu_weight: limits.cpu_weight,
        memory_max: limits.memory_max.or(budget.memory_max),
        memory_high: limits.memory_high,
        pids_max: limits.pids_max.or(budget.pids_max),
        io_weight: limits.io_weight,
    }
}

/// A budgeted resource the engine sets no limit for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inherited {
    /// The spec field left out (`limits.memory_max`).
    pub field: &'static str,
    /// The budget's value that applies.
    pub budget: String,
}

impl fmt::Display for Inherited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: not set, the tenant budget {} applies",
            self.field, self.budget
        )
    }
}

/// The budgeted resources the engine inherits, to say so on deploy and in
/// `status` (`limits.memory_max: not set, the tenant budget 1G applies`).
pub fn inherited(limits: &Limits, budget: &Budget) -> Vec<Inherited> {
    let mut out = Vec::new();
    if let (None, Some(b)) = (limits.cpu(), budget.cpu_max) {
        out.push(Inherited {
            field: "limits.cpu_max",
            budget: cpus(&b),
        });
    }
    if let (None, Some(b)) = (limits.memory_max, budget.memory_max) {
        out.push(Inherited {
            field: "limits.memory_max",
            budget: b.to_string(),
        });
    }
    if let (None, Some(b)) = (limits.pids_max, budget.pids_max) {
        out.push(Inherited {
            field: "limits.pids_max",
            budget: b.to_string(),
        });
    }
    out
}

/// A cgroup v2 interface file this crate writes.
pub type CgroupFile = &'static str;

/// The kernel's default weight.
const DEFAULT_WEIGHT: u16 = 100;

fn files(
    cpu: Option<CpuMax>,
    cpu_weight: Option<u16>,
    memory_max: Option<Size>,
    memory_high: Option<Size>,
    pids_max: Option<u64>,
    io_weight: Option<u16>,
) -> Vec<(CgroupFile, String)> {
    let max = |v: Option<u64>| v.map_or_else(|| "max".to_owned(), |v| v.to_string());
    vec![
        (
            "cpu.max",
            cpu.map_or_else(
                || format!("max {}", CpuMax::DEFAULT_PERIOD_US),
                |c| c.to_string(),
            ),
        ),
        (
            "cpu.weight",
            cpu_weight.unwrap_or(DEFAULT_WEIGHT).to_string(),
        ),
        ("memory.max", max(memory_max.map(|s| s.0))),
        ("memory.high", max(memory_high.map(|s| s.0))),
        ("pids.max", max(pids_max)),
        (
            "io.weight",
            format!("default {}", io_weight.unwrap_or(DEFAULT_WEIGHT)),
        ),
    ]
}

/// What to write in an engine's cgroup: every file, always (a limit the
/// spec dropped must be cleared on reload). A limit the spec does not set
/// is `max` (weights: the kernel default 100), so the tenant subtree's
/// budget is what binds. Pure: the cgroupfs backend writes them.
pub fn engine_files(limits: &Limits) -> Vec<(CgroupFile, String)> {
    files(
        limits.cpu(),
        limits.cpu_weight,
        limits.memory_max,
        limits.memory_high,
        limits.pids_max,
        limits.io_weight,
    )
}

/// What to write in the tenant's cgroup (the subtree root): every file,
/// `max` where the budget sets no limit.
pub fn budget_files(budget: &Budget) -> Vec<(CgroupFile, String)> {
    files(
        budget.cpu_max,
        budget.cpu_weight,
        budget.memory_max,
        None,
        budget.pids_max,
        budget.io_weight,
    )
}

/// Least `cpu.max` quota the kernel takes, µs.
const MIN_QUOTA_US: u64 = 1000;

/// The subtree's `cpu.max` under a corrective throttle (docs/health.md,
/// `throttle-engines`): `cpu_percent` (1..=100) of the budget's `cpu_max`,
/// or of `node_cpus` whole CPUs when the budget sets none, rounded down,
/// at least the kernel's 1000 µs and never above the budget (a budget at
/// the kernel's minimum stays as it is). The budget's period is kept.
pub fn throttled_cpu_max(budget: &Budget, cpu_percent: u8, node_cpus: u32) -> CpuMax {
    let pct = u64::from(cpu_percent.clamp(1, 100));
    let base = budget.cpu_max.unwrap_or(CpuMax {
        quota_us: u64::from(node_cpus.max(1)).saturating_mul(CpuMax::DEFAULT_PERIOD_US),
        period_us: CpuMax::DEFAULT_PERIOD_US,
    });
    let quota_us = (base.quota_us.saturating_mul(pct) / 100)
        .max(MIN_QUOTA_US)
        .min(base.quota_us.max(MIN_QUOTA_US));
    CpuMax {
        quota_us,
        period_us: base.period_us,
    }
}

/// [`budget_files`] with `cpu.max` lowered by a corrective throttle
/// (`Some(percent)`, see [`throttled_cpu_max`]); `None`: the budget's
/// files exactly.
pub fn throttled_budget_files(
    budget: &Budget,
    throttle: Option<u8>,
    node_cpus: u32,
) -> Vec<(CgroupFile, String)> {
    let mut out = budget_files(budget);
    if let Some(pct) = throttle {
        let v = throttled_cpu_max(budget, pct, node_cpus).to_string();
        for (f, value) in &mut out {
            if *f == "cpu.max" {
                *value = v.clone();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mib(n: u64) -> Option<Size> {
        Some(Size(n << 20))
    }

    fn budget() -> Budget {
        Budget {
            cpu_max: Some(CpuMax {
                quota_us: 200_000,
                period_us: 100_000,
            }),
            cpu_weight: Some(50),
            memory_max: mib(1024),
            pids_max: Some(500),
            io_weight: Some(200),
        }
    }

    #[test]
    fn a_throttle_lowers_cpu_max_never_above_the_budget() {
        let b = budget();
        assert_eq!(
            throttled_cpu_max(&b, 50, 8),
            CpuMax {
                quota_us: 100_000,
                period_us: 100_000
            }
        );
        assert_eq!(throttled_cpu_max(&b, 100, 8), b.cpu_max.unwrap());
        // No budget cpu_max: a fraction of the node's CPUs.
        let none = Budget::default();
        assert_eq!(throttled_cpu_max(&none, 25, 4).to_string(), "100000 100000");
        // The kernel's least quota; never above a budget already there.
        assert_eq!(throttled_cpu_max(&none, 1, 0).quota_us, 1000);
        let tiny = Budget {
            cpu_max: Some(CpuMax {
                quota_us: 1000,
                period_us: 1_000_000,
            }),
            ..Budget::default()
        };
        assert_eq!(throttled_cpu_max(&tiny, 10, 64), tiny.cpu_max.unwrap());
        for pct in 1..=100u8 {
            for cpus in [1u32, 3, 128] {
                let t = throttled_cpu_max(&b, pct, cpus);
                assert!(!t.exceeds(&b.cpu_max.unwrap()), "{pct}% {t}");
                assert!(parse_cpu_max(&t.to_string()).is_ok(), "{t}");
            }
        }
        // Only cpu.max changes; None is the budget's files exactly.
        let plain = budget_files(&b);
        assert_eq!(throttled_budget_files(&b, None, 8), plain);
        let t = throttled_budget_files(&b, Some(50), 8);
        for ((f1, v1), (f2, v2)) in plain.iter().zip(&t) {
            assert_eq!(f1, f2);
            if *f1 == "cpu.max" {
                assert_eq!(v2, "100000 100000");
            } else {
                assert_eq!(v1, v2);
            }
        }
    }

    #[test]
    fn limits_above_the_budget_are_refused_with_both_values() {
        let b = budget();
        let l = Limits {
            cpus: Some(2.5),
            memory_max: mib(2048),
            memory_high: mib(1536),
            pids_max: Some(501),
            ..Default::default()
        };
        let e = check(&l, &b).unwrap_err();
        assert_eq!(
            e.0.iter().map(|o| o.field).collect::<Vec<_>>(),
            [
                "limits.cpus",
                "limits.memory_max",
                "limits.memory_high",
                "limits.pids_max"
            ]
        );
        assert_eq!(
            e.0[1].to_string(),
            "limits.memory_max: 2G is above the tenant budget 1G"
        );
        assert_eq!(
            e.0[0].to_string(),
            "limits.cpus: \"250000 100000\" (2.5 CPUs) is above the tenant budget \"200000 100000\" (2 CPUs)"
        );
        assert!(e
            .to_string()
            .contains("; limits.pids_max: 501 is above the tenant budget 500"));
        // cpu_max named as such; a different period compared exactly.
        let l = Limits {
            cpu_max: Some(CpuMax {
                quota_us: 20_001,
                period_us: 10_000,
            }),
            ..Default::default()
        };
        assert_eq!(check(&l, &b).unwrap_err().0[0].field, "limits.cpu_max");
        let l = Limits {
            cpu_max: Some(CpuMax {
                quota_us: 20_000,
                period_us: 10_000,
            }),
            ..Default::default()
        };
        assert!(check(&l, &b).is_ok());
    }

    #[test]
    fn equal_limits_weights_and_no_limits_are_accepted() {
        let b = budget();
        let l = Limits {
            cpus: Some(2.0),
            memory_max: mib(1024),
            memory_high: mib(1024),
            pids_max: Some(500),
            cpu_weight: Some(10_000),
            io_weight: Some(10_000),
            cpu_max: None,
        };
        assert!(check(&l, &b).is_ok(), "weights are not compared");
        assert!(check(&Limits::default(), &b).is_ok());
        // No budget: anything goes (the node's capacity binds).
        assert!(check(&l, &Budget::default()).is_ok());
    }

    #[test]
    fn no_engine_limit_inherits_the_budget() {
        let b = budget();
        let e = effective(&Limits::default(), &b);
        assert_eq!(e.cpu_max, b.cpu_max);
        assert_eq!(e.memory_max, b.memory_max);
        assert_eq!(e.pids_max, b.pids_max);
        let said: Vec<String> = inherited(&Limits::default(), &b)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            said,
            [
                "limits.cpu_max: not set, the tenant budget \"200000 100000\" (2 CPUs) applies",
                "limits.memory_max: not set, the tenant budget 1G applies",
                "limits.pids_max: not set, the tenant budget 500 applies",
            ]
        );
        let own = Limits {
            cpus: Some(1.0),
            memory_max: mib(10),
            pids_max: Some(1),
            ..Default::default()
        };
        assert!(inherited(&own, &b).is_empty());
        assert!(inherited(&Limits::default(), &Budget::default()).is_empty());
        // In the engine's cgroup that is "max": the subtree's limit binds.
        let f = engine_files(&Limits::default());
        assert_eq!(
            f,
            vec![
                ("cpu.max", "max 100000".to_owned()),
                ("cpu.weight", "100".to_owned()),
                ("memory.max", "max".to_owned()),
                ("memory.high", "max".to_owned()),
                ("pids.max", "max".to_owned()),
                ("io.weight", "default 100".to_owned()),
            ]
        );
    }

    #[test]
    fn cgroup_files_hold_the_kernel_formats() {
        let l = Limits {
            cpus: Some(0.5),
            cpu_weight: Some(300),
            memory_max: mib(256),
            memory_high: mib(200),
            pids_max: Some(64),
            io_weight: Some(50),
            cpu_max: None,
        };
        assert_eq!(
            engine_files(&l),
            vec![
                ("cpu.max", "50000 100000".to_owned()),
                ("cpu.weight", "300".to_owned()),
                ("memory.max", "268435456".to_owned()),
                ("memory.high", "209715200".to_owned()),
                ("pids.max", "64".to_owned()),
                ("io.weight", "default 50".to_owned()),
            ]
        );
        let f = budget_files(&budget());
        assert_eq!(f[0], ("cpu.max", "200000 100000".to_owned()));
        assert_eq!(f[1], ("cpu.weight", "50".to_owned()));
        assert_eq!(f[2], ("memory.max", "1073741824".to_owned()));
        assert_eq!(f[3], ("memory.high", "max".to_owned()));
        assert_eq!(f[5], ("io.weight", "default 200".to_owned()));
    }

    #[test]
    fn budgets_validate() {
        assert!(budget().validate().is_ok());
        let b = Budget {
            io_weight: Some(0),
            ..Default::default()
        };
        assert_eq!(
            b.validate().unwrap_err().to_string(),
            "budget.io_weight: 0: between 1 and 10000"
        );
        let b = Budget {
            pids_max: Some(0),
            ..Default::default()
        };
        assert_eq!(b.validate().unwrap_err().field, "pids_max");
        let b = Budget {
            memory_max: Some(Size(4096)),
            ..Default::default()
        };
        assert_eq!(b.validate().unwrap_err().field, "memory_max");
        let b = Budget::from_toml("cpu_max = \"150000 100000\"\nmemory_max = \"8G\"\n").unwrap();
        assert_eq!(b.memory_max, Some(Size(8 << 30)));
        assert_eq!(
            Budget::from_toml("memory = \"8G\"\n").unwrap_err().field,
            "memory"
        );
        assert_eq!(
            Budget::from_json(r#"{"memory_max": "8X"}"#)
                .unwrap_err()
                .field,
            "memory_max"
        );
        assert_eq!(
            Budget::from_toml("pids_max = 0").unwrap_err().field,
            "pids_max"
        );
        assert_eq!(Budget::from_json("{} {}").unwrap_err().field, "document");
        let big = format!("#{}", "x".repeat(MAX_BUDGET_BYTES));
        assert_eq!(Budget::from_toml(&big).unwrap_err().field, "document");
        let b = Budget {
            cpu_max: Some(CpuMax {
                quota_us: 10,
                period_us: 100_000,
            }),
            ..Default::default()
        };
        assert_eq!(b.validate().unwrap_err().field, "cpu_max");
    }

    #[test]
    fn the_docs_example_is_a_budget() {
        let b = Budget::from_toml(crate::spec::tests::doc_block("## Budget")).unwrap();
        assert_eq!(b.memory_max, Some(Size(8 << 30)));
        assert_eq!(b.cpu_max.unwrap().cpus(), 2.0);
    }

    /// CPU time per second (µs) a cpu.max file value allows, `None` for
    /// `max`: the meaning of the file, parsed back.
    fn cpu_per_second(file: &str) -> Option<(u128, u128)> {
        let (q, p) = file.split_once(' ').unwrap();
        (q != "max").then(|| (q.parse().unwrap(), p.parse().unwrap()))
    }

    fn file_u64(file: &str) -> Option<u64> {
        (file != "max").then(|| file.parse().unwrap())
    }

    fn arb_cpu() -> impl Strategy<Value = Option<CpuMax>> {
        proptest::option::of((1000u64..2_000_000, 1000u64..=1_000_000).prop_map(
            |(quota_us, period_us)| CpuMax {
                quota_us,
                period_us,
            },
        ))
    }

    fn arb_size() -> impl Strategy<Value = Option<Size>> {
        proptest::option::of((1u64..4096).prop_map(|m| Size(m << 20)))
    }

    prop_compose! {
        fn arb_limits()(cpu in arb_cpu(), cpus in proptest::option::of(1u32..400), memory_max in arb_size(), memory_high in arb_size(), pids_max in proptest::option::of(1u64..2000), use_cpus in any::<bool>()) -> Limits {
            Limits {
                cpus: if use_cpus { cpus.map(|c| f64::from(c) / 100.0) } else { None },
                cpu_max: if use_cpus { None } else { cpu },
                cpu_weight: None,
                memory_max,
                memory_high,
                pids_max,
                io_weight: None,
            }
        }
    }

    prop_compose! {
        fn arb_budget()(cpu_max in arb_cpu(), memory_max in arb_size(), pids_max in proptest::option::of(1u64..2000)) -> Budget {
            Budget { cpu_max, memory_max, pids_max, ..Default::default() }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// An accepted engine limit never exceeds the budget, judged on the
        /// cgroup files each side writes (what the kernel enforces); and a
        /// limit that does exceed it is always reported, by field.
        #[test]
        fn accepted_engine_limits_never_exceed_the_budget(l in arb_limits(), b in arb_budget()) {
            let res = check(&l, &b);
            let ef = engine_files(&l);
            let bf = budget_files(&b);
            let mut exceeding = Vec::new();
            if let (Some((eq, ep)), Some((bq, bp))) = (cpu_per_second(&ef[0].1), cpu_per_second(&bf[0].1)) {
                // eq/ep > bq/bp, in whole microseconds per period product.
                if eq * bp > bq * ep {
                    exceeding.push(if l.cpus.is_some() { "limits.cpus" } else { "limits.cpu_max" });
                }
            }
            let bmem = file_u64(&bf[2].1);
            for (i, field) in [(2, "limits.memory_max"), (3, "limits.memory_high")] {
                if let (Some(e), Some(bm)) = (file_u64(&ef[i].1), bmem) {
                    if e > bm {
                        exceeding.push(field);
                    }
                }
            }
            if let (Some(e), Some(bp)) = (file_u64(&ef[4].1), file_u64(&bf[4].1)) {
                if e > bp {
                    exceeding.push("limits.pids_max");
                }
            }
            match res {
                Ok(()) => prop_assert!(exceeding.is_empty(), "accepted but over: {exceeding:?}"),
                Err(e) => prop_assert_eq!(e.0.iter().map(|o| o.field).collect::<Vec<_>>(), exceeding),
            }
            // Every budgeted resource the engine leaves out is said to be
            // inherited, and only those.
            let said: Vec<&str> = inherited(&l, &b).iter().map(|i| i.field).collect();
            let mut want = Vec::new();
            if l.cpu().is_none() && b.cpu_max.is_some() { want.push("limits.cpu_max"); }
            if l.memory_max.is_none() && b.memory_max.is_some() { want.push("limits.memory_max"); }
            if l.pids_max.is_none() && b.pids_max.is_some() { want.push("limits.pids_max"); }
            prop_assert_eq!(said, want);
            // What binds is never above the budget once accepted.
            if check(&l, &b).is_ok() {
                let eff = effective(&l, &b);
                if let Some(bm) = b.memory_max { prop_assert!(eff.memory_max.unwrap() <= bm); }
                if let Some(bp) = b.pids_max { prop_assert!(eff.pids_max.unwrap() <= bp); }
                if let Some(bc) = b.cpu_max { prop_assert!(!eff.cpu_max.unwrap().exceeds(&bc)); }
            }
        }
    }
}
