//! T0: man pages and completions are generated from the clap definitions;
//! usage errors exit 2 and `seal` works without a TPM or a node.

use std::process::Command;

#[test]
fn cli_generate_man_pages_and_completions() {
    for (bin, exe) in [
        ("landlordctl", env!("CARGO_BIN_EXE_landlordctl")),
        ("tenantctl", env!("CARGO_BIN_EXE_tenantctl")),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new(exe)
            .arg("generate")
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success());
        let man = std::fs::read_to_string(dir.path().join(format!("{bin}.1"))).unwrap();
        assert!(
            man.contains(".TH") && man.contains("Exit status"),
            "{bin} man page"
        );
        for f in [
            format!("{bin}.bash"),
            format!("_{bin}"),
            format!("{bin}.fish"),
        ] {
            assert!(dir.path().join(&f).exists(), "{f} missing");
        }
    }
}

#[test]
fn cli_usage_errors_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_landlordctl"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_tenantctl"))
        .args(["--host", "-oProxyCommand=evil", "info"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cli_seal_needs_no_tpm_and_names_bad_files() {
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    let dir = tempfile::tempdir().unwrap();
    let sk = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let pem = dir.path().join("ut.pem");
    std::fs::write(
        &pem,
        sk.to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, b"hello").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tenantctl"))
        .arg("seal")
        .arg("--to")
        .arg(&pem)
        .arg(&input)
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = std::fs::read(dir.path().join("in.txt.lhev")).unwrap();
    assert_eq!(&env[..4], b"LHEV");
    let out = Command::new(env!("CARGO_BIN_EXE_tenantctl"))
        .arg("seal")
        .arg("--to")
        .arg(dir.path().join("missing.pem"))
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.pem"));
}
