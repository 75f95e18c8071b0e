//! T0: matching, cooldowns on a fake clock, the persisted limiter, the
//! bounded record store.

use super::*;

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
