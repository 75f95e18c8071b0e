//! T0: what a tenant does on a laptop works there. `tenantctl` links no
//! libtss2 (it uses `leasehold-envelope`, not `leasehold-tpm`); `seal` and
//! `verify-receipt` need no agent and no bus; output into a pipe the reader
//! closed ends quietly instead of panicking. No root needed.
//!
//! The binaries come from `cargo build --workspace --bins` (scripts/test
//! builds them with `cargo test --no-run`).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use leasehold_tests::bin;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::signature::{SignatureEncoding, Signer};
use rsa::{Oaep, RsaPrivateKey};
use sha2::Sha256;

const CLIS: [&str; 2] = ["tenantctl", "landlordctl"];

/// A command that cannot reach any agent: a bus address that does not exist.
fn offline(name: &str) -> Command {
    let mut c = Command::new(bin(name));
    c.env(
        "DBUS_SYSTEM_BUS_ADDRESS",
        "unix:path=/nonexistent/leasehold-bus",
    )
    .env_remove("LEASEHOLD_SSH");
    c
}

fn fail_msg(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The check that matters for building on a laptop: nothing `leasehold-cli`
/// builds needs tss-esapi (whose build script needs libtss2's pkg-config
/// files). The linker drops unused libraries, so `ldd` alone (below) would
/// not notice a build-time dependency.
#[test]
fn cli_crate_does_not_depend_on_tss_esapi() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "leasehold-cli",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--offline",
            "--locked",
        ])
        .current_dir(leasehold_tests::workspace_root())
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "{}", fail_msg(&out));
    let tree = String::from_utf8_lossy(&out.stdout);
    // The tree is real: the crates the CLI does use are in it.
    for used in ["leasehold-envelope", "leasehold-dbus-api", "rsa", "zbus"] {
        assert!(
            tree.lines().any(|l| l.starts_with(&format!("{used} v"))),
            "{used} missing:\n{tree}"
        );
    }
    let tss: Vec<&str> = tree
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("tss") || l.starts_with("leasehold-tpm "))
        .collect();
    assert!(tss.is_empty(), "leasehold-cli depends on {tss:?}");
}

#[test]
fn cli_binaries_link_no_libtss2() {
    for name in CLIS {
        let path = bin(name);
        let out = Command::new("ldd").arg(&path).output().expect("run ldd");
        let libs = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ldd {}: {}",
            path.display(),
            fail_msg(&out)
        );
        // ldd really listed the dependencies (a static or broken binary
        // would make the check below vacuous).
        assert!(libs.contains("libc.so"), "{name}: {libs}");
        assert!(
            !libs.to_ascii_lowercase().contains("tss2"),
            "{name} links libtss2 (it must build on a laptop without it):\n{libs}"
        );
    }
}

fn write_key(dir: &Path, sk: &RsaPrivateKey) -> std::path::PathBuf {
    let pem = dir.join("key.pem");
    std::fs::write(
        &pem,
        sk.to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    pem
}

#[test]
fn cli_tenantctl_seal_works_offline_and_the_envelope_opens() {
    let dir = tempfile::tempdir().unwrap();
    let sk = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let pem = write_key(dir.path(), &sk);
    let input = dir.path().join("secret.txt");
    std::fs::write(&input, b"db password").unwrap();
    let env_path = dir.path().join("secret.lhev");
    let out = offline("tenantctl")
        .arg("seal")
        .arg("--to")
        .arg(&pem)
        .arg("--out")
        .arg(&env_path)
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", fail_msg(&out));

    // Opened the way the node does (unwrap with the private key, then the
    // crate's decrypt), here in software.
    let env = std::fs::read(&env_path).unwrap();
    let parsed = leasehold_tpm::envelope::ParsedEnvelope::parse(&env).unwrap();
    let ck = sk
        .decrypt(Oaep::new::<Sha256>(), parsed.wrapped_key())
        .unwrap();
    assert_eq!(&parsed.decrypt(&ck).unwrap()[..], b"db password");
}

/// A receipt file as `rotate --json` writes it, signed by `sk`.
fn receipt_json(sk: &RsaPrivateKey, body: &str) -> String {
    let sig = SigningKey::<Sha256>::new(sk.clone()).sign(body.as_bytes());
    serde_json::json!({
        "receipt": body,
        "receipt_signature": base64::engine::general_purpose::STANDARD.encode(sig.to_vec()),
    })
    .to_string()
}

#[test]
fn cli_verify_receipt_works_offline_and_refuses_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let sk = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let pem = write_key(dir.path(), &sk);
    let body = r#"{"kind":"rotate","role":"tenant","generation_before":3,"generation_after":4}"#;
    let good = dir.path().join("good.json");
    std::fs::write(&good, receipt_json(&sk, body)).unwrap();
    // Same signature, one field changed: generation 4 claimed as 5.
    let bad = dir.path().join("bad.json");
    let v: serde_json::Value = serde_json::from_str(&receipt_json(&sk, body)).unwrap();
    let tampered = serde_json::json!({
        "receipt": body.replace("\"generation_after\":4", "\"generation_after\":5"),
        "receipt_signature": v["receipt_signature"],
    });
    std::fs::write(&bad, tampered.to_string()).unwrap();

    for name in CLIS {
        let out = offline(name)
            .args(["--json", "verify-receipt"])
            .arg(&good)
            .arg("--key")
            .arg(&pem)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", fail_msg(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["verified"], true, "{name}");
        assert_eq!(v["receipt"]["generation_after"], 4, "{name}");

        // The receipt as an object (what --json prints now), and tampered.
        let mut doc: serde_json::Value = serde_json::from_str(&receipt_json(&sk, body)).unwrap();
        doc["receipt"] = serde_json::from_str(body).unwrap();
        let obj = dir.path().join("object.json");
        std::fs::write(&obj, doc.to_string()).unwrap();
        let out = offline(name)
            .args(["verify-receipt", "--key"])
            .arg(&pem)
            .arg(&obj)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: object: {}", fail_msg(&out));
        doc["receipt"]["generation_after"] = 5.into();
        std::fs::write(&obj, doc.to_string()).unwrap();
        let out = offline(name)
            .args(["verify-receipt", "--key"])
            .arg(&pem)
            .arg(&obj)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: tampered object: {}",
            fail_msg(&out)
        );

        let out = offline(name)
            .arg("verify-receipt")
            .arg(&bad)
            .arg("--key")
            .arg(&pem)
            .output()
            .unwrap();
        // Exit 1 ("the operation failed", docs/cli.md), nothing on stdout.
        assert_eq!(out.status.code(), Some(1), "{name}: {}", fail_msg(&out));
        assert!(out.stdout.is_empty(), "{name}: {}", fail_msg(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("does NOT verify"),
            "{name}: {}",
            fail_msg(&out)
        );
    }
}

/// A pipe whose reading end is already closed: every write gets EPIPE, no
/// matter how fast the child is.
fn closed_pipe() -> OwnedFd {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    write
}

#[test]
fn cli_output_into_a_closed_pipe_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let sk = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let pem = write_key(dir.path(), &sk);
    let receipt = dir.path().join("r.json");
    std::fs::write(&receipt, receipt_json(&sk, r#"{"kind":"rotate"}"#)).unwrap();

    for name in CLIS {
        for args in [
            vec!["--help"],
            vec![
                "verify-receipt",
                receipt.to_str().unwrap(),
                "--key",
                pem.to_str().unwrap(),
            ],
            vec![
                "--json",
                "verify-receipt",
                receipt.to_str().unwrap(),
                "--key",
                pem.to_str().unwrap(),
            ],
        ] {
            let out = offline(name)
                .args(&args)
                .stdout(Stdio::from(closed_pipe()))
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!stderr.contains("panicked"), "{name} {args:?}: {stderr}");
            assert_eq!(out.status.code(), Some(0), "{name} {args:?}: {stderr}");
            assert!(stderr.is_empty(), "{name} {args:?}: {stderr}");
        }
    }
}

/// `--json` errors are JSON on stdout (`{"error": {"name", "exit",
/// "message"}}`) with the same exit code as in text mode: a usage error, an
/// unreachable agent, a refused argument. Text mode prints nothing on stdout.
#[test]
fn cli_json_errors_are_json_on_stdout_with_the_same_exit_code() {
    for cli in CLIS {
        let cases: [(&[&str], u8, &str); 3] = [
            (&["--json", "no-such-command"], 2, "usage"),
            (&["--json", "info"], 69, "unavailable"),
            (
                &[
                    "--json",
                    "verify-receipt",
                    "--key",
                    "/nonexistent/key.pem",
                    "/nonexistent/r.json",
                ],
                6,
                "invalid-argument",
            ),
        ];
        for (args, code, name) in cases {
            let out = offline(cli).args(args).output().unwrap();
            assert_eq!(
                out.status.code(),
                Some(i32::from(code)),
                "{cli} {args:?}: {}",
                fail_msg(&out)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{cli} {args:?}: not JSON ({e}): {}", fail_msg(&out)));
            assert_eq!(v["error"]["name"], name, "{cli} {args:?}: {v}");
            assert_eq!(v["error"]["exit"], code, "{cli} {args:?}: {v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{v}"
            );
            // Without --json: the same status, nothing on stdout.
            let text: Vec<&str> = args.iter().copied().filter(|a| *a != "--json").collect();
            let out = offline(cli).args(&text).output().unwrap();
            assert_eq!(out.status.code(), Some(i32::from(code)), "{cli} {text:?}");
            assert!(out.stdout.is_empty(), "{cli} {text:?}: {}", fail_msg(&out));
        }
    }
}

/// `--timeout` bounds the connection too: an SSH command that never
/// answers (a dead link that does not close) ends the CLI at the deadline,
/// saying so, instead of hanging a script.
#[test]
fn a_link_that_never_answers_ends_at_the_timeout() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ssh = dir.path().join("silent-ssh");
    // Takes the arguments ssh would, reads nothing, writes nothing.
    // Its stderr is not the CLI's: the test reads that to its end.
    std::fs::write(&ssh, "#!/bin/sh\nexec sleep 30 2>/dev/null\n").unwrap();
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    for cli in CLIS {
        let out = offline(cli)
            .env("LEASEHOLD_SSH", &ssh)
            .args(["--timeout", "1s", "-H", "nobody@node.invalid", "info"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{cli}: {}", fail_msg(&out));
        assert!(
            err.contains("cannot reach the agent on nobody@node.invalid over SSH: no connection within 1s (--timeout)"),
            "{cli}: {}",
            fail_msg(&out)
        );
    }
}
