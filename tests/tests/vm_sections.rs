//! T0: the section runner of the VM lab (support/sections.rs) without the
//! VM: failures are caught per section, what needs a failed or skipped
//! section is skipped with the reason, filters pull in prerequisites, and
//! libtest's flags are read as cargo passes them.

#[path = "support/sections.rs"]
mod sections;
use sections::{check_table, closure, run_sections, summary, Args, Ran, Section, Status};

/// What ran, in order.
type Log = Vec<&'static str>;

fn a(l: &mut Log) -> Ran {
    l.push("a");
    Ran::Done
}
fn b_fails(l: &mut Log) -> Ran {
    l.push("b");
    panic!("b broke: {}", 42);
}
fn c(l: &mut Log) -> Ran {
    l.push("c");
    Ran::Done
}
fn d_skips(l: &mut Log) -> Ran {
    l.push("d");
    Ran::Skipped("SWITCHED_OFF=1".to_owned())
}
fn e(l: &mut Log) -> Ran {
    l.push("e");
    Ran::Done
}

const TABLE: &[Section<Log>] = &[
    Section {
        name: "a",
        needs: &[],
        run: a,
    },
    Section {
        name: "b",
        needs: &["a"],
        run: b_fails,
    },
    Section {
        name: "c",
        needs: &["b"],
        run: c,
    },
    Section {
        name: "d",
        needs: &["a"],
        run: d_skips,
    },
    Section {
        name: "e",
        needs: &["a"],
        run: e,
    },
    Section {
        name: "f",
        needs: &["d"],
        run: e,
    },
];

#[test]
fn a_failure_ends_its_section_only_and_skips_what_needs_it() {
    let mut log = Log::new();
    let mut failed = Vec::new();
    let all = closure(TABLE, |_| true);
    let done = run_sections(&mut log, TABLE, &all, |_, name| {
        failed.push(name.to_owned())
    });
    assert_eq!(log, ["a", "b", "d", "e"], "c and f must not run");
    assert_eq!(failed, ["b"]);
    let st: Vec<(&str, Status)> = done.clone();
    assert_eq!(
        st,
        [
            ("a", Status::Ok),
            ("b", Status::Failed("b broke: 42".to_owned())),
            ("c", Status::Skipped("because b failed".to_owned())),
            ("d", Status::Skipped("SWITCHED_OFF=1".to_owned())),
            ("e", Status::Ok),
            ("f", Status::Skipped("because d was skipped".to_owned())),
        ]
    );
    assert!(!summary("t", &done), "a failed section fails the run");
}

#[test]
fn skipped_sections_are_not_a_failure_nor_a_pass() {
    let table = &TABLE[3..5];
    let fixed: Vec<Section<Log>> = table
        .iter()
        .map(|s| Section {
            name: s.name,
            needs: &[],
            run: s.run,
        })
        .collect();
    let mut log = Log::new();
    let all = closure(&fixed, |_| true);
    let done = run_sections(&mut log, &fixed, &all, |_, _| panic!("nothing failed"));
    assert!(matches!(done[0].1, Status::Skipped(_)));
    assert_eq!(done[1].1, Status::Ok);
    assert!(summary("t", &done));
}

#[test]
fn a_filter_runs_the_section_and_what_it_needs() {
    let run = closure(TABLE, |s| s == "c");
    assert_eq!(run.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
    let run = closure(TABLE, |s| s == "f");
    assert_eq!(run.into_iter().collect::<Vec<_>>(), ["a", "d", "f"]);
    let mut log = Log::new();
    let run = closure(TABLE, |s| s == "e");
    let done = run_sections(&mut log, TABLE, &run, |_, _| {});
    assert_eq!(log, ["a", "e"]);
    assert_eq!(
        done[1].1,
        Status::Skipped("not selected by the filter".to_owned())
    );
    assert!(closure(TABLE, |_| false).is_empty());
}

#[test]
fn the_table_is_checked() {
    assert_eq!(check_table(TABLE), Ok(()));
    let forward = [
        Section::<Log> {
            name: "x",
            needs: &["y"],
            run: a,
        },
        Section {
            name: "y",
            needs: &[],
            run: a,
        },
    ];
    assert!(check_table(&forward)
        .unwrap_err()
        .contains("\"x\" needs \"y\", which is not an earlier section"));
    let twice = [
        Section::<Log> {
            name: "x",
            needs: &[],
            run: a,
        },
        Section {
            name: "x",
            needs: &[],
            run: a,
        },
    ];
    assert!(check_table(&twice).unwrap_err().contains("listed twice"));
}

#[test]
fn libtest_flags_as_cargo_passes_them() {
    let args = |v: &[&str]| Args::parse(v.iter().map(|s| s.to_string()));
    let p = args(&[
        "--include-ignored",
        "--nocapture",
        "--test-threads",
        "2",
        "matrix",
        "--skip",
        "boot",
    ]);
    assert!(p.ignored && !p.list);
    assert_eq!(p.filters, ["matrix"], "a flag's value is not a filter");
    assert!(p.selects("vm_lab::matrix"));
    assert!(!p.selects("vm_lab::reboot"));
    let p = args(&["--skip", "boot"]);
    assert!(!p.ignored);
    assert!(p.selects("vm_lab::matrix") && !p.selects("vm_lab::boot"));
    let p = args(&["--exact", "vm_lab::boot"]);
    assert!(p.selects("vm_lab::boot") && !p.selects("vm_lab::boot2"));
    assert!(args(&["--list", "--format", "terse"]).list);
    assert!(args(&["--ignored"]).ignored);
    assert!(args(&[]).selects("anything"));
}
