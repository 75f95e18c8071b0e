//! T1: the agentd binary in --dev mode (real swtpm child), driven as a user would.

use std::process::Command;

fn agentd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agentd"))
}

fn fingerprint(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("landlord fingerprint:"))
        .expect("fingerprint line")
        .trim()
        .to_owned()
}

#[test]
#[ignore = "needs root: agentd --dev makes a network namespace"]
fn swtpm_agentd_dev_oneshot_initialises_then_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let first = agentd()
        .arg("--dev")
        .arg(dir.path())
        .arg("--oneshot")
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out1 = String::from_utf8(first.stdout).unwrap();
    assert!(out1.contains("software TPM"), "{out1}");
    let err1 = String::from_utf8_lossy(&first.stderr);
    assert!(err1.contains("initialised the key hierarchy"), "{err1}");
    assert!(
        err1.contains("software TPM"),
        "dev mode must say so: {err1}"
    );

    let second = agentd()
        .arg("--dev")
        .arg(dir.path())
        .arg("--oneshot")
        .output()
        .unwrap();
    assert!(second.status.success());
    let out2 = String::from_utf8(second.stdout).unwrap();
    assert_eq!(fingerprint(&out1), fingerprint(&out2));
    assert!(String::from_utf8_lossy(&second.stderr).contains("loaded the key hierarchy"));
    // The software TPM was stopped: swtpm removes its pid file on exit.
    assert!(!dir.path().join("tpm/swtpm.pid").exists());
    // State files are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("state"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn agentd_config_errors_name_the_key_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[tpm]\ntctl = \"x\"\n", "tctl"),
        ("[tpm]\ntcti = \"carrier-pigeon\"\n", "tpm.tcti"),
        ("[tpm]\nseal_pcrs = [99]\n", "tpm.seal_pcrs"),
        ("[state]\ndir = \"rel\"\n", "state.dir"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("agentd.toml");
        std::fs::write(&path, text).unwrap();
        let out = agentd()
            .arg("--config")
            .arg(&path)
            .arg("--oneshot")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{key} not named in: {err}");
    }
    let out = agentd()
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

/// A metrics token file that others may read stops the start before the
/// TPM or the state directory is touched.
#[test]
fn agentd_metrics_token_file_checked_at_start_exit_78() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("metrics.token");
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let state = dir.path().join("state");
    let path = dir.path().join("agentd.toml");
    std::fs::write(
        &path,
        format!(
            "[state]\ndir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\ntoken_file = \"{}\"\n",
            state.display(),
            token.display()
        ),
    )
    .unwrap();
    let out = agentd()
        .arg("--config")
        .arg(&path)
        .arg("--oneshot")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("metrics.token_file") && err.contains("metrics.token"),
        "{err}"
    );
    assert!(!state.exists(), "the state directory was touched");
    assert!(!err.contains("0123456789abcdef"), "the token leaked: {err}");
}

#[test]
fn agentd_unreachable_tpm_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.toml");
    // Port 1 on loopback: nothing listens there.
    std::fs::write(
        &path,
        format!(
            "[tpm]\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n[state]\ndir = \"{}\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let out = agentd()
        .arg("--config")
        .arg(&path)
        .arg("--oneshot")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to the TPM"));
}

/// Runs `agentd --dev DIR --oneshot [extra]`: (exit code, stdout, stderr).
fn oneshot(dir: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let out = agentd()
        .arg("--dev")
        .arg(dir)
        .arg("--oneshot")
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs root: agentd --dev makes a network namespace"]
fn swtpm_agentd_refuses_keys_without_manifest_and_erases_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (code, out, err) = oneshot(dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    let fp = fingerprint(&out);

    // The state directory not there (not mounted yet): refused, nothing made.
    let aside = dir.path().join("state.aside");
    std::fs::rename(&state, &aside).unwrap();
    let (code, _, err) = oneshot(dir.path(), &[]);
    assert_eq!(code, 65, "{err}");
    assert!(
        err.contains(&state.display().to_string()) && err.contains("--init-erase-tpm"),
        "{err}"
    );
    assert!(!state.exists());

    // The erase is refused unless the directory is empty.
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("note"), b"x").unwrap();
    let (code, _, err) = oneshot(dir.path(), &["--init-erase-tpm"]);
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("not empty"), "{err}");
    std::fs::remove_dir_all(&state).unwrap();

    // Back in place: the same keys.
    std::fs::rename(&aside, &state).unwrap();
    let (code, out, err) = oneshot(dir.path(), &["--init-erase-tpm"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(fingerprint(&out), fp);

    // A broken signing key stops the start, naming the file.
    let blob = state.join("signing.pair");
    let good = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &good[..good.len() / 2]).unwrap();
    let (code, _, err) = oneshot(dir.path(), &[]);
    assert_eq!(code, 65, "{err}");
    assert!(err.contains("signing.pair"), "{err}");
    std::fs::write(&blob, &good).unwrap();

    // Asked explicitly, on an empty directory: a new node.
    std::fs::remove_dir_all(&state).unwrap();
    let (code, out, err) = oneshot(dir.path(), &["--init-erase-tpm"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("initialised the key hierarchy"), "{err}");
    assert_ne!(fingerprint(&out), fp);
}
