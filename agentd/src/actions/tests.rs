//! T0: matching, cooldowns on a fake clock, the persisted limiter, the
//! bounded record store.

use super::*;
use std::fs;

fn fault(sev: Severity, source: Source, subject: &str) -> Fault {
    Fault {
        severity: sev,
        source,
        subject: subject.into(),
        message: "m".into(),
    }
}

fn rules(toml_text: &str) -> Vec<Rule> {
    #[derive(Deserialize)]
    struct Doc {
        action: Vec<Rule>,
    }
    toml::from_str::<Doc>(toml_text).expect("rules").action
}

const REBOOT_ON_HOT: &str = r#"
[[action]]
name = "hot"
source = "thermal"
severity = "critical"
action = "reboot"
cooldown_secs = 900

[[action]]
name = "log-any"
severity = "warning"
action = "notify"
"#;

#[test]
fn matching_is_by_source_and_exact_severity() {
    let r = rules(REBOOT_ON_HOT);
    validate(&r).unwrap();
    assert!(r[0].matches(&fault(Severity::Critical, Source::Thermal, "zone0")));
    assert!(!r[0].matches(&fault(Severity::Stuck, Source::Thermal, "zone0")));
    assert!(!r[0].matches(&fault(Severity::Critical, Source::Smart, "sda")));
    assert!(r[1].matches(&fault(Severity::Warning, Source::Net, "eth0")));
    assert!(!r[1].matches(&fault(Severity::Critical, Source::Net, "eth0")));
    assert_eq!(r[1].cooldown(), 300);
}

#[test]
fn fires_on_the_edge_once_per_cooldown_and_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let hot = [fault(Severity::Critical, Source::Thermal, "zone0")];
    let mut m = Matcher::new(rules(REBOOT_ON_HOT));
    let mut l = Limiter::load(dir.path()).unwrap();
    let t0 = 1_000_000;
    let fired = m.next(&hot, &mut l, t0);
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].rule.name, "hot");
    assert_eq!(fired[0].faults, hot);
    // Still hot: repeated reports fire nothing.
    for i in 1..5 {
        assert!(m.next(&hot, &mut l, t0 + i * 60).is_empty());
    }
    // Flapping within the cooldown: cleared, hot again, nothing.
    assert!(m.next(&[], &mut l, t0 + 400).is_empty());
    assert!(m.next(&hot, &mut l, t0 + 460).is_empty());
    // A restart (the reboot itself) within the cooldown: a new matcher
    // and a limiter read back from disk fire nothing.
    let mut m2 = Matcher::new(rules(REBOOT_ON_HOT));
    let mut l2 = Limiter::load(dir.path()).unwrap();
    assert!(m2.next(&hot, &mut l2, t0 + 600).is_empty());
    // Past the cooldown, on the next edge: fires again.
    assert!(m2.next(&[], &mut l2, t0 + 901).is_empty());
    assert_eq!(m2.next(&hot, &mut l2, t0 + 902).len(), 1);
    // A clock set back counts as within the cooldown.
    let mut m3 = Matcher::new(rules(REBOOT_ON_HOT));
    let mut l3 = Limiter::load(dir.path()).unwrap();
    assert!(m3.next(&hot, &mut l3, t0).is_empty());
}

#[test]
fn an_unreadable_limiter_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("actions.json"), b"{not json").unwrap();
    let e = Limiter::load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("actions.json"), "{e}");
    let r = rules(REBOOT_ON_HOT);
    let mut l = Limiter::closed(dir.path(), &r, 5_000);
    let mut m = Matcher::new(r);
    let hot = [fault(Severity::Critical, Source::Thermal, "zone0")];
    assert!(m.next(&hot, &mut l, 5_100).is_empty());
    assert!(!l.take(&engine_reboot_rule(), 5_100).unwrap());
}

#[test]
fn a_limiter_that_cannot_write_refuses_the_firing() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone");
    let mut l = Limiter::load(&gone).unwrap();
    let r = rules(REBOOT_ON_HOT);
    let e = l.take(&r[0], 10).unwrap_err();
    assert!(e.to_string().contains("actions.json"), "{e}");
    // Nothing remembered: it was not fired.
    assert!(l.doc.last.is_empty());
}

#[test]
fn validation_names_the_rule_and_field() {
    for (text, want) in [
        (
            "[[action]]\nname = \"r\"\nseverity = \"critical\"\naction = \"reboot\"\ncooldown_secs = 60\n",
            "[0] (\"r\").cooldown_secs: 60 is below 600",
        ),
        (
            "[[action]]\nname = \"h\"\nseverity = \"critical\"\naction = \"hook\"\n",
            "[0] (\"h\").command: a hook needs a command",
        ),
        (
            "[[action]]\nname = \"h\"\nseverity = \"critical\"\naction = \"hook\"\ncommand = [\"sh\"]\n",
            "[0] (\"h\").command: sh is not an absolute path",
        ),
        (
            "[[action]]\nname = \"n\"\nseverity = \"ok\"\naction = \"notify\"\n",
            "[0] (\"n\").severity: \"ok\" is no fault",
        ),
        (
            "[[action]]\nname = \"a\"\nseverity = \"stuck\"\naction = \"notify\"\n[[action]]\nname = \"a\"\nseverity = \"critical\"\naction = \"notify\"\n",
            "[1] (\"a\").name: used by an earlier rule",
        ),
        (
            "[[action]]\nname = \"a b\"\nseverity = \"stuck\"\naction = \"notify\"\n",
            "[0] (\"a b\").name:",
        ),
    ] {
        let e = validate(&rules(text)).unwrap_err();
        assert!(e.starts_with(want), "{e} (wanted {want})");
    }
    let many: String = (0..=MAX_RULES)
        .map(|i| {
            format!("[[action]]\nname = \"r{i}\"\nseverity = \"critical\"\naction = \"notify\"\n")
        })
        .collect();
    assert!(validate(&rules(&many)).unwrap_err().contains("at most 16"));
}

#[test]
fn records_are_bounded_and_in_the_receipt_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let s = RecordStore::new(dir.path());
    let first = s.store("{\"a\":1}", 7, "c2ln").unwrap();
    assert_eq!(first, "7-0");
    assert_eq!(s.store("{\"a\":2}", 7, "c2ln").unwrap(), "7-1");
    let doc: serde_json::Value = serde_json::from_str(&s.read("7-0").unwrap()).unwrap();
    assert_eq!(doc[receipt_json::BODY], "{\"a\":1}");
    assert_eq!(doc[receipt_json::SIGNATURE], "c2ln");
    for t in 8..(8 + MAX_RECORDS as u64) {
        s.store("{}", t, "c2ln").unwrap();
    }
    let ids = s.ids().unwrap();
    assert_eq!(ids.len(), MAX_RECORDS);
    assert!(!ids.contains(&first), "the oldest went first");
    assert_eq!(
        ids.last().unwrap(),
        &format!("{}-0", 7 + MAX_RECORDS as u64)
    );
}

#[test]
fn engine_reboots_share_one_persisted_hourly_cooldown() {
    let dir = tempfile::tempdir().unwrap();
    let rule = engine_reboot_rule();
    validate(std::slice::from_ref(&rule)).unwrap_err();
    let mut l = Limiter::load(dir.path()).unwrap();
    assert!(l.take(&rule, 10_000).unwrap());
    assert!(!l.take(&rule, 10_000 + 3_599).unwrap());
    let mut l = Limiter::load(dir.path()).unwrap();
    assert!(!l.take(&rule, 10_000 + 60).unwrap(), "across a restart");
    assert!(l.take(&rule, 10_000 + 3_600).unwrap());
    // No configured rule may take its name (and so its cooldown).
    let e = validate(&rules(
        "[[action]]\nname = \"engines-reboot-node\"\nseverity = \"critical\"\naction = \"notify\"\n",
    ))
    .unwrap_err();
    assert!(e.contains("reserved"), "{e}");
}

const THROTTLE_ON_HOT: &str = r#"
[[action]]
name = "hot-throttle"
source = "thermal"
severity = "warning"
action = "throttle-engines"
cpu_percent = 50

[[action]]
name = "crit-throttle"
source = "thermal"
severity = "critical"
action = "throttle-engines"
cpu_percent = 20
cooldown_secs = 0
"#;

fn names(t: &Throttles) -> Vec<&str> {
    t.0.keys().map(String::as_str).collect()
}

#[test]
fn a_throttle_lasts_while_its_fault_does_and_holds_its_cooldown_through_a_flap() {
    let r = rules(THROTTLE_ON_HOT);
    validate(&r).unwrap();
    let warm = [fault(Severity::Warning, Source::Thermal, "zone0")];
    let t0 = 1_000_000;
    // The fault: the throttle begins, with the faults for its record.
    let p = plan_throttles(&r, &Throttles::default(), &warm, t0);
    assert_eq!(names(&p.next), ["hot-throttle"]);
    assert_eq!(p.next.cpu_percent(), Some(50));
    assert_eq!(p.next.0["hot-throttle"].since, t0);
    assert_eq!(p.begun.len(), 1);
    assert_eq!(p.begun[0].faults, warm);
    assert!(p.ended.is_empty());
    // Still warm: nothing new (level, no second record).
    let p = plan_throttles(&r, &p.next, &warm, t0 + 60);
    assert!(p.begun.is_empty() && p.ended.is_empty());
    let inforce = p.next;
    // A flap within the cooldown (300): cleared, hot again; it holds.
    let p = plan_throttles(&r, &inforce, &[], t0 + 120);
    assert_eq!(p.next, inforce, "held within the cooldown");
    assert!(p.begun.is_empty() && p.ended.is_empty());
    let p = plan_throttles(&r, &p.next, &warm, t0 + 180);
    assert_eq!(p.next, inforce);
    assert!(p.begun.is_empty(), "no second throttle within the cooldown");
    // Cleared past the cooldown: it ends, with what it was.
    let p = plan_throttles(&r, &inforce, &[], t0 + 300);
    assert!(p.next.0.is_empty());
    assert_eq!(p.next.cpu_percent(), None);
    assert_eq!(
        p.ended,
        [("hot-throttle".to_owned(), inforce.0["hot-throttle"])]
    );
    // And begins again on the next fault.
    let p = plan_throttles(&r, &p.next, &warm, t0 + 301);
    assert_eq!(p.begun.len(), 1);
    // A critical fault too: both in force, the lowest percent binds;
    // cooldown 0 ends it on the first clear report.
    let both = [
        warm[0].clone(),
        fault(Severity::Critical, Source::Thermal, "zone1"),
    ];
    let p = plan_throttles(&r, &p.next, &both, t0 + 360);
    assert_eq!(names(&p.next), ["crit-throttle", "hot-throttle"]);
    assert_eq!(p.next.cpu_percent(), Some(20));
    let p = plan_throttles(&r, &p.next, &warm, t0 + 361);
    assert_eq!(names(&p.next), ["hot-throttle"]);
    assert_eq!(p.ended.len(), 1);
    assert_eq!(p.next.cpu_percent(), Some(50));
}

#[test]
fn a_throttle_read_back_after_a_restart_is_neither_forgotten_nor_lifted_early() {
    let r = rules(THROTTLE_ON_HOT);
    let warm = [fault(Severity::Warning, Source::Thermal, "zone0")];
    let t0 = 2_000_000;
    let before = plan_throttles(&r, &Throttles::default(), &warm, t0).next;
    // What a new agent reads back (the runtime's throttle.json).
    let back: Throttles = serde_json::from_str(&serde_json::to_string(&before).unwrap()).unwrap();
    assert_eq!(back, before);
    // The fault persists: in force, no new record.
    let p = plan_throttles(&r, &back, &warm, t0 + 30);
    assert_eq!(p.next, before);
    assert!(p.begun.is_empty() && p.ended.is_empty());
    // It cleared while the agent was down, past the cooldown: lifted.
    let p = plan_throttles(&r, &back, &[], t0 + 900);
    assert!(p.next.0.is_empty());
    assert_eq!(p.ended.len(), 1);
    // A clock set back ends the hold (the throttle ends with its fault).
    let p = plan_throttles(&r, &back, &[], t0 - 3600);
    assert!(p.next.0.is_empty());
    // A throttle whose rule is gone from the configuration is lifted.
    let p = plan_throttles(&rules(REBOOT_ON_HOT), &back, &warm, t0 + 1);
    assert!(p.next.0.is_empty());
    assert_eq!(p.ended[0].0, "hot-throttle");
    // A restart that changed the rule's percent: the new one, same start.
    let changed = rules(&THROTTLE_ON_HOT.replace("cpu_percent = 50", "cpu_percent = 40"));
    let p = plan_throttles(&changed, &back, &warm, t0 + 2);
    assert_eq!(p.next.0["hot-throttle"].cpu_percent, 40);
    assert_eq!(p.next.0["hot-throttle"].since, t0);
    assert!(p.begun.is_empty());
}

#[test]
fn throttle_rules_are_not_edge_firings_and_their_fields_are_checked() {
    let r = rules(THROTTLE_ON_HOT);
    let dir = tempfile::tempdir().unwrap();
    let mut l = Limiter::load(dir.path()).unwrap();
    let mut m = Matcher::new(r);
    let warm = [fault(Severity::Warning, Source::Thermal, "zone0")];
    assert!(m.next(&warm, &mut l, 10).is_empty());
    for (text, want) in [
        (
            "[[action]]\nname = \"t\"\nseverity = \"warning\"\naction = \"throttle-engines\"\n",
            "[0] (\"t\").cpu_percent: a throttle needs cpu_percent (1..=100)",
        ),
        (
            "[[action]]\nname = \"t\"\nseverity = \"warning\"\naction = \"throttle-engines\"\ncpu_percent = 0\n",
            "[0] (\"t\").cpu_percent: 0 is outside 1..=100",
        ),
        (
            "[[action]]\nname = \"t\"\nseverity = \"warning\"\naction = \"throttle-engines\"\ncpu_percent = 101\n",
            "[0] (\"t\").cpu_percent: 101 is outside 1..=100",
        ),
        (
            "[[action]]\nname = \"t\"\nseverity = \"warning\"\naction = \"notify\"\ncpu_percent = 50\n",
            "[0] (\"t\").cpu_percent: only for \"throttle-engines\", not \"notify\"",
        ),
    ] {
        let e = validate(&rules(text)).unwrap_err();
        assert!(e.starts_with(want), "{e} (wanted {want})");
    }
}

/// A rule running `sh -c SCRIPT` as its hook, within `timeout_secs`.
fn hook_rule(script: &str, timeout_secs: u64) -> Rule {
    let mut r = rules(&format!(
        "[[action]]\nname = \"h\"\nseverity = \"critical\"\naction = \"hook\"\ntimeout_secs = {timeout_secs}\ncommand = [\"/bin/sh\", \"-c\", {}]\n",
        toml::Value::String(script.into())
    ));
    validate(&r).unwrap();
    r.remove(0)
}

fn run_hook_now(r: &Rule) -> HookRun {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run_hook(r, "[]"))
}

/// The pid a hook wrote to `file`.
fn pid_in(file: &Path) -> i32 {
    fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// Whether `pid` has ended within a bound (a SIGKILL is delivered
/// asynchronously): its pidfd readable, or no such process.
fn ends(pid: i32) -> bool {
    match exit_within(pid, Duration::from_secs(10)) {
        Ok(ended) => ended,
        Err(e) => e.raw_os_error() == Some(nix::libc::ESRCH),
    }
}

#[test]
fn a_hook_leaves_nothing_running_in_its_group_when_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let bg = dir.path().join("bg");
    let r = hook_rule(
        &format!("sleep 1000 & echo $! > {}; exit 0", bg.display()),
        30,
    );
    let run = run_hook_now(&r);
    assert_eq!(
        run.end,
        HookEnd::Exited {
            success: true,
            status: "exit status: 0".into()
        }
    );
    assert!(run.leftovers_killed, "{run:?}");
    let pid = pid_in(&bg);
    assert!(ends(pid), "the hook's background sleep ({pid}) still runs");

    // Nothing left: nothing reported.
    let r = hook_rule("exit 3", 30);
    let run = run_hook_now(&r);
    assert!(
        matches!(&run.end, HookEnd::Exited { success: false, status } if status.contains('3')),
        "{run:?}"
    );
    assert!(!run.leftovers_killed);
}

#[test]
fn a_hook_past_its_timeout_is_killed_with_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let (bg, fg) = (dir.path().join("bg"), dir.path().join("fg"));
    let r = hook_rule(
        &format!(
            "sleep 1000 & echo $! > {}; echo $$ > {}; exec sleep 1000",
            bg.display(),
            fg.display()
        ),
        1,
    );
    let run = run_hook_now(&r);
    assert_eq!(run.end, HookEnd::TimedOut);
    for (what, f) in [("background", &bg), ("foreground", &fg)] {
        let pid = pid_in(f);
        assert!(ends(pid), "the hook's {what} sleep ({pid}) still runs");
    }
}

#[test]
fn a_hook_that_cannot_start_says_so() {
    let mut r = hook_rule("exit 0", 30);
    r.command = vec!["/nonexistent/leasehold-hook".into()];
    let run = run_hook_now(&r);
    assert!(
        matches!(&run.end, HookEnd::NotStarted(e) if e.contains("No such file")),
        "{run:?}"
    );
    assert!(!run.leftovers_killed);
}

/// Review of the health actions: a rule that matched while its cooldown
/// held it fires when the cooldown ends if its fault is still there (it
/// was marked on and never fired while the fault lasted); a firing that
/// did not happen gives its cooldown back and fires again at the next
/// report; a rule without `source` is not set off by the tenant's engines.
#[test]
fn held_rules_fire_when_their_cooldown_ends_and_failed_firings_give_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let hot = [fault(Severity::Critical, Source::Thermal, "zone0")];
    let t0 = 2_000_000;
    let mut m = Matcher::new(rules(REBOOT_ON_HOT));
    let mut l = Limiter::load(dir.path()).unwrap();
    assert_eq!(m.next(&hot, &mut l, t0).len(), 1);
    // A flap within the cooldown, then the fault stays.
    assert!(m.next(&[], &mut l, t0 + 100).is_empty());
    assert!(m.next(&hot, &mut l, t0 + 200).is_empty());
    assert!(m.next(&hot, &mut l, t0 + 899).is_empty());
    let fired = m.next(&hot, &mut l, t0 + 900);
    assert_eq!(fired.len(), 1, "held past its cooldown");
    // That firing did not happen (no record): given back, fired again at
    // the next report, and on disk too (a restart would fire it).
    m.forget("hot");
    l.give_back("hot").unwrap();
    let mut l2 = Limiter::load(dir.path()).unwrap();
    assert!(l2.take(&rules(REBOOT_ON_HOT)[0], t0 + 901).unwrap());
    assert_eq!(m.next(&hot, &mut l, t0 + 960).len(), 1);
    assert!(m.next(&hot, &mut l, t0 + 1020).is_empty());
    // A restart (the reboot it asked for) with the fault still there: on,
    // not held — no firing each cooldown while it lasts.
    let mut after_boot = Matcher::new(rules(REBOOT_ON_HOT));
    let mut l3 = Limiter::load(dir.path()).unwrap();
    assert!(after_boot.next(&hot, &mut l3, t0 + 1100).is_empty());
    assert!(after_boot.next(&hot, &mut l3, t0 + 9000).is_empty());
    // Given back without a take: nothing to undo.
    l.give_back("log-any").unwrap();
    // No source: every source but the tenant's engines.
    let r = rules(REBOOT_ON_HOT);
    assert!(!r[1].matches(&fault(Severity::Warning, Source::Engines, "web")));
    assert!(r[1].matches(&fault(Severity::Warning, Source::Volume, "vol")));
    let named = rules("[[action]]\nname = \"e\"\nsource = \"engines\"\nseverity = \"warning\"\naction = \"notify\"\n");
    assert!(named[0].matches(&fault(Severity::Warning, Source::Engines, "web")));
}

/// A wrong jump of the clock forward, then back: held one cooldown on the
/// monotonic clock, not until that date; the stored time is kept, so a
/// node whose clock starts in the past at boot does not take its last
/// reboot as long ago (review of an earlier fix, which stored the earlier
/// time and so allowed a second reboot as soon as the clock was right).
#[test]
fn a_clock_that_jumped_forward_and_back_holds_a_rule_one_cooldown() {
    let dir = tempfile::tempdir().unwrap();
    let r = rules(REBOOT_ON_HOT);
    let mut l = Limiter::load(dir.path()).unwrap();
    let t0 = 3_000_000;
    let m0 = std::time::Instant::now();
    let after = |s: u64| m0 + Duration::from_secs(s);
    // Fired while the clock was a year ahead.
    assert!(l.take_at(&r[0], t0 + 365 * 86_400, m0).unwrap());
    // Back to the right time: held one cooldown (900 s) of this process.
    assert!(!l.take_at(&r[0], t0, m0).unwrap());
    assert!(!l.take_at(&r[0], t0 + 899, after(899)).unwrap());
    // Another process (a restart) holds it from when it sees the clock
    // back: the stored time was kept.
    let mut again = Limiter::load(dir.path()).unwrap();
    assert!(!again.take_at(&r[0], t0 + 10, after(10)).unwrap());
    assert!(l.take_at(&r[0], t0 + 900, after(900)).unwrap());
    // A boot with the clock in the past, then set right: no early firing.
    let mut boot = Limiter::load(dir.path()).unwrap();
    assert!(!boot.take_at(&r[0], t0 - 86_400, after(901)).unwrap());
    assert!(!boot.take_at(&r[0], t0 + 960, after(961)).unwrap());
    assert!(boot.take_at(&r[0], t0 + 1800, after(1801)).unwrap());
}
