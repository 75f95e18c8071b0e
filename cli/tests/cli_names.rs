//! T0: a name the node would refuse is refused before the CLI connects or
//! seals anything, with the node's exit status (6) and rule.

use std::process::Command;

fn run(exe: &str, args: &[&str]) -> std::process::Output {
    Command::new(exe)
        .args(args)
        // Nothing listens here: reaching for the bus would exit 69.
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            "unix:path=/nonexistent/leasehold-bus",
        )
        .output()
        .unwrap()
}

#[test]
fn cli_bad_names_exit_6_without_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s");
    std::fs::write(&file, b"x").unwrap();
    let file = file.to_str().unwrap();
    let tenantctl = env!("CARGO_BIN_EXE_tenantctl");
    let landlordctl = env!("CARGO_BIN_EXE_landlordctl");
    for (exe, args, what) in [
        (
            tenantctl,
            vec!["secret", "put", "../etc", "--from", file],
            "secret name",
        ),
        (tenantctl, vec!["secret", "rm", "a b"], "secret name"),
        (
            tenantctl,
            vec!["register-console", ".x", file],
            "console name",
        ),
        (landlordctl, vec!["assign", "acme/corp"], "tenant name"),
        (
            landlordctl,
            vec!["register-console", &"c".repeat(65), file],
            "console name",
        ),
    ] {
        let out = run(exe, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{args:?}: {err}");
        assert!(
            err.contains(what) && err.contains("1-64 characters"),
            "{args:?}: {err}"
        );
    }
    // A good name gets past the check and fails only at the missing bus.
    let out = run(tenantctl, &["secret", "rm", "db-password"]);
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
