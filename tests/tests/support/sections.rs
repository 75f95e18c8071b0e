//! Sections of one expensive run (the VM lab's single boot), reported one
//! by one like libtest reports tests: each runs under `catch_unwind`, so a
//! failed assertion ends its section, not the run. A section whose
//! prerequisite did not pass is skipped with the reason, never counted as
//! passed. Shared by `vm_lab.rs` (a `harness = false` test) and the unit
//! tests in `vm_sections.rs`.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a section's body reports when it returns (a panic is a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ran {
    Done,
    /// The section chose not to run (e.g. switched off by a variable).
    Skipped(String),
}

/// One section: its name, the earlier sections it needs, its body.
pub struct Section<C> {
    pub name: &'static str,
    pub needs: &'static [&'static str],
    pub run: fn(&mut C) -> Ran,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    Failed(String),
    Skipped(String),
}

impl Status {
    fn word(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed(_) => "FAILED",
            Status::Skipped(_) => "skipped",
        }
    }
}

/// The command line of a test binary, as far as a custom harness needs it:
/// cargo passes libtest's flags to every test binary.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Args {
    /// `--ignored` or `--include-ignored`: run what is ignored by default.
    pub ignored: bool,
    pub list: bool,
    pub exact: bool,
    pub filters: Vec<String>,
    pub skip: Vec<String>,
}

impl Args {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Args {
        let mut a = Args::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--ignored" | "--include-ignored" => a.ignored = true,
                "--list" => a.list = true,
                "--exact" => a.exact = true,
                "--skip" => a.skip.extend(it.next()),
                // libtest options that take a value; the value is not a filter.
                "--test-threads" | "--format" | "--color" | "--logfile" | "-Z"
                | "--shuffle-seed" => {
                    it.next();
                }
                s if s.starts_with('-') => {}
                s => a.filters.push(s.to_owned()),
            }
        }
        a
    }

    /// libtest's rule: a name runs if it matches a filter (substring, or
    /// equal with `--exact`; no filter: all) and no `--skip`.
    pub fn selects(&self, name: &str) -> bool {
        let hit = |f: &String| {
            if self.exact {
                name == f
            } else {
                name.contains(f.as_str())
            }
        };
        (self.filters.is_empty() || self.filters.iter().any(hit)) && !self.skip.iter().any(hit)
    }
}

/// Checks the table: unique names, every need names an earlier section.
pub fn check_table<C>(sections: &[Section<C>]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for s in sections {
        for n in s.needs {
            if !seen.contains(n) {
                return Err(format!(
                    "section {:?} needs {n:?}, which is not an earlier section",
                    s.name
                ));
            }
        }
        if !seen.insert(s.name) {
            return Err(format!("section {:?} is listed twice", s.name));
        }
    }
    Ok(())
}

/// The sections to run: those `wanted` picks and, transitively, what they
/// need.
pub fn closure<C>(
    sections: &[Section<C>],
    wanted: impl Fn(&str) -> bool,
) -> BTreeSet<&'static str> {
    let mut run: BTreeSet<&'static str> = sections
        .iter()
        .filter(|s| wanted(s.name))
        .map(|s| s.name)
        .collect();
    // Needs point backwards (check_table), so one reverse pass is enough.
    for s in sections.iter().rev() {
        if run.contains(s.name) {
            run.extend(s.needs.iter().copied());
        }
    }
    run
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic without a message".to_owned()
    }
}

/// Runs `sections` in order on `ctx`, printing `section NAME ... ok`,
/// `... FAILED` or `... skipped (because …)` as each ends. `run` is the
/// set from [`closure`]; `on_fail` is called after a section failed (to
/// print the node's logs while they are fresh).
pub fn run_sections<C>(
    ctx: &mut C,
    sections: &[Section<C>],
    run: &BTreeSet<&'static str>,
    mut on_fail: impl FnMut(&mut C, &str),
) -> Vec<(&'static str, Status)> {
    let mut done: Vec<(&'static str, Status)> = Vec::new();
    for s in sections {
        let unmet = s.needs.iter().find_map(|n| {
            let (_, st) = done.iter().find(|(d, _)| d == n)?;
            match st {
                Status::Ok => None,
                Status::Failed(_) => Some(format!("because {n} failed")),
                Status::Skipped(_) => Some(format!("because {n} was skipped")),
            }
        });
        let status = if !run.contains(s.name) {
            Status::Skipped("not selected by the filter".to_owned())
        } else if let Some(why) = unmet {
            Status::Skipped(why)
        } else {
            match catch_unwind(AssertUnwindSafe(|| (s.run)(ctx))) {
                Ok(Ran::Done) => Status::Ok,
                Ok(Ran::Skipped(why)) => Status::Skipped(why),
                Err(p) => Status::Failed(panic_message(p.as_ref())),
            }
        };
        match &status {
            Status::Skipped(why) => println!("section {} ... skipped ({why})", s.name),
            st => println!("section {} ... {}", s.name, st.word()),
        }
        if matches!(status, Status::Failed(_)) {
            on_fail(ctx, s.name);
        }
        done.push((s.name, status));
    }
    done
}

/// libtest's closing lines; true if nothing failed.
pub fn summary(name: &str, done: &[(&'static str, Status)]) -> bool {
    let count = |w: &str| done.iter().filter(|(_, s)| s.word() == w).count();
    let failed: Vec<&str> = done
        .iter()
        .filter(|(_, s)| matches!(s, Status::Failed(_)))
        .map(|(n, _)| *n)
        .collect();
    if !failed.is_empty() {
        println!("\nfailures:");
        for (n, s) in done {
            if let Status::Failed(m) = s {
                println!("    {n}: {m}");
            }
        }
    }
    println!(
        "\n{name}: {}. {} passed; {} failed; {} skipped\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        count("ok"),
        failed.len(),
        count("skipped"),
    );
    failed.is_empty()
}
