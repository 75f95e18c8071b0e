//! T0: the shipped alert rules (dist/prometheus/leasehold-rules.yml) are
//! valid for `promtool check rules`, fire as
//! tests/prometheus/leasehold-rules.test.yml says (`promtool test rules`),
//! and use only metrics agentd exports; the shipped Alertmanager route is
//! valid for `amtool check-config`. promtool and amtool come from the
//! Debian packages prometheus and prometheus-alertmanager
//! (scripts/install-deps).

use std::path::Path;
use std::process::Command;

use leasehold_tests::workspace_root;

fn tool(name: &str, package: &str) -> &'static str {
    let path: &'static str = match name {
        "promtool" => "/usr/bin/promtool",
        _ => "/usr/bin/amtool",
    };
    assert!(
        Path::new(path).exists(),
        "{name} is not installed: apt-get install {package} (scripts/install-deps)"
    );
    path
}

#[track_caller]
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check() {
    let out = run_ok(
        Command::new(tool("promtool", "prometheus"))
            .args(["check", "rules"])
            .arg(workspace_root().join("dist/prometheus/leasehold-rules.yml")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_fire_as_their_unit_tests_say() {
    let out = run_ok(
        Command::new(tool("promtool", "prometheus"))
            .args(["test", "rules", "leasehold-rules.test.yml"])
            .current_dir(workspace_root().join("tests/prometheus")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alertmanager_route_passes_amtool_check() {
    let out = run_ok(
        Command::new(tool("amtool", "prometheus-alertmanager"))
            .arg("check-config")
            .arg(workspace_root().join("dist/prometheus/alertmanager.yml")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every `leasehold_*` metric a rule reads is registered in
/// agentd/src/metrics.rs (a renamed metric would leave a rule that never
/// fires, and promtool cannot tell).
#[test]
fn alert_rules_use_only_exported_metrics() {
    let rules =
        std::fs::read_to_string(workspace_root().join("dist/prometheus/leasehold-rules.yml"))
            .unwrap();
    let source = std::fs::read_to_string(workspace_root().join("agentd/src/metrics.rs")).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for line in rules.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(i) = rest.find("leasehold_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            used.insert(name);
        }
    }
    assert!(used.len() >= 8, "{used:?}");
    for name in &used {
        let short = name.trim_start_matches("leasehold_");
        // prometheus-client adds `_total` to counters.
        let registered = short.strip_suffix("_total").unwrap_or(short);
        assert!(
            source.contains(&format!("\"{registered}\"")),
            "{name} is used by a rule but agentd/src/metrics.rs does not register {registered:?}"
        );
    }
}
