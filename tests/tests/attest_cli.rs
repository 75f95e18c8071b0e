//! Issue 16, challenges (R13), on the host harness (T1: real bus, polkitd
//! with the shipped policy, agentd --dev on swtpm, the CLIs as the test
//! users): `tenantctl attest` and `landlordctl attest` verify a fresh quote
//! offline and pin the node's attestation key; a replayed quote, another
//! node, a changed PCR and a rotated key are each refused;
//! `tenantctl secret put --attest` sends nothing unless the quote names the
//! UT it seals to.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Instant;

use leasehold_dbus_api::AttestProxy;
use leasehold_tests::{Lab, Run, Who};
use leasehold_tpm::attest::{verify_quote, Answer, AttestError, Challenge};

/// A directory every test user may write its pin file into.
fn pin_dir(lab: &Lab, name: &str) -> PathBuf {
    let d = lab.path("work").join(name);
    fs::create_dir_all(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    d
}

fn attest(lab: &Lab, who: Who, pins: &str, extra: &[&str]) -> Run {
    let program = if who == Who::Tenant {
        "tenantctl"
    } else {
        "landlordctl"
    };
    let mut args = vec!["--json", "attest", "--pin-file", pins];
    args.extend_from_slice(extra);
    lab.run(who, program, &args)
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn attest_cli_verifies_pins_and_refuses_replay_other_node_changed_pcr_and_rotated_key() {
    let lab = Lab::start();
    lab.run(Who::Landlord, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
    let dir = pin_dir(&lab, "pins");
    let pins = dir.join("known_nodes");
    let pins = pins.to_str().unwrap();
    let info = lab
        .run(Who::Tenant, "tenantctl", &["--json", "info"])
        .ok()
        .json();

    // First use: verified and pinned; the quote states the node and keys.
    let t = Instant::now();
    let first = attest(&lab, Who::Tenant, pins, &["--pcrs", "0,1,7,16"])
        .ok()
        .json();
    eprintln!(
        "figure: tenantctl attest end to end (first use) {:?}",
        t.elapsed()
    );
    assert_eq!(first["verified"], true);
    assert_eq!(first["newly_pinned"], true);
    assert_eq!(first["node_id"], info["node_id"], "{first} vs {info}");
    let ut = lab
        .run(Who::Tenant, "tenantctl", &["--json", "pubkey"])
        .ok()
        .json();
    assert_eq!(first["tenant"]["fingerprint"], ut["fingerprint"]);
    assert_eq!(
        first["pcrs"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["0", "1", "7", "16"]
    );
    let pinned = fs::read_to_string(pins).unwrap();
    assert!(
        pinned.contains(&format!(
            "local {} {}",
            first["node_id"].as_str().unwrap(),
            first["attestation_key"].as_str().unwrap()
        )),
        "{pinned}"
    );
    // Second use: the pin is found, nothing is added.
    let t = Instant::now();
    let again = attest(&lab, Who::Tenant, pins, &[]).ok().json();
    eprintln!(
        "figure: tenantctl attest end to end (pinned) {:?}",
        t.elapsed()
    );
    assert_eq!(again["newly_pinned"], false);
    assert_eq!(fs::read_to_string(pins).unwrap(), pinned);
    // The landlord gets the same key and node.
    let ll = attest(&lab, Who::Landlord, pins, &[]).ok().json();
    assert_eq!(ll["attestation_key"], first["attestation_key"]);
    // Bounds are refused before the node is asked.
    let r = attest(&lab, Who::Tenant, pins, &["--pcrs", "24"]);
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("--pcrs"), "{r:?}");

    // Replayed: a quote of an earlier nonce, checked by the verifier
    // tenantctl runs, against this run's nonce.
    let (ak, (attest_b, sig, values, ctx)) = lab.block_on(async {
        let p = AttestProxy::new(lab.conn()).await.unwrap();
        (
            p.attestation_key().await.unwrap(),
            p.attest(b"the-earlier-nonce", &[0, 7]).await.unwrap(),
        )
    });
    let answer = Answer {
        attest: &attest_b,
        signature: &sig,
        pcr_values: &values,
        context: &ctx,
    };
    let earlier = Challenge {
        ak_pem: &ak,
        nonce: b"the-earlier-nonce",
        pcrs: &[0, 7],
    };
    assert!(verify_quote(&earlier, &answer).is_ok());
    let fresh = Challenge {
        nonce: b"this-runs-nonce!",
        ..earlier
    };
    assert_eq!(
        verify_quote(&fresh, &answer),
        Err(AttestError::QualifyingData)
    );
    // The agent refuses nonces out of bounds with a named error.
    let short = lab.block_on(async {
        let p = AttestProxy::new(lab.conn()).await.unwrap();
        p.attest(b"short", &[0]).await
    });
    match short {
        Err(leasehold_dbus_api::Error::InvalidArgument(m)) => assert!(m.contains("nonce"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }

    // A changed PCR: PCR 16 as first quoted is expected; another value is
    // what a changed boot chain looks like, and is refused.
    let pcr16 = first["pcrs"]["16"].as_str().unwrap();
    attest(
        &lab,
        Who::Tenant,
        pins,
        &["--pcrs", "16", "--expect-pcr", &format!("16={pcr16}")],
    )
    .ok();
    let changed = format!("16={}", "ab".repeat(32));
    let r = attest(
        &lab,
        Who::Tenant,
        pins,
        &["--pcrs", "16", "--expect-pcr", &changed],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("PCR 16"), "{r:?}");

    // A rotated key: the tenant takes ownership; a quote no longer states
    // the UT it had.
    let old_ut = first["tenant"]["fingerprint"].as_str().unwrap().to_owned();
    attest(&lab, Who::Tenant, pins, &["--expect-key", &old_ut]).ok();
    lab.run(Who::Tenant, "tenantctl", &["--yes", "rotate"]).ok();
    let r = attest(&lab, Who::Tenant, pins, &["--expect-key", &old_ut]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("rotated"), "{r:?}");
    let rotated = attest(&lab, Who::Tenant, pins, &[]).ok().json();
    assert_eq!(
        rotated["tenant"]["generation"].as_u64().unwrap(),
        first["tenant"]["generation"].as_u64().unwrap() + 1
    );
    assert_eq!(rotated["attestation_key"], first["attestation_key"]);

    // secret put --attest: sealed to the node's current UT, attested first.
    let secret = lab.write_file("secret.txt", b"tenant-only");
    let put = |to: Option<&str>| {
        let mut args = vec![
            "secret",
            "put",
            "db",
            "--from",
            secret.to_str().unwrap(),
            "--attest",
            "--pin-file",
            pins,
        ];
        if let Some(to) = to {
            args.extend(["--to", to]);
        }
        lab.run(Who::Tenant, "tenantctl", &args)
    };
    put(None).ok();
    // Sealed to the pre-rotation UT: refused, nothing stored.
    let old_pem = lab.write_file("old-ut.pem", ut["pem"].as_str().unwrap().as_bytes());
    lab.run(Who::Tenant, "tenantctl", &["secret", "rm", "db"])
        .ok();
    let r = put(Some(old_pem.to_str().unwrap()));
    assert_eq!(r.code, 1, "{r:?}");
    let list = lab
        .run(Who::Tenant, "tenantctl", &["--json", "secret", "list"])
        .ok()
        .json();
    assert_eq!(list, serde_json::json!([]), "nothing was sent");

    // Another node at the same target: its AK is not the pinned one.
    let other = Lab::start();
    other
        .run(Who::Landlord, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
    let r = attest(&other, Who::Tenant, pins, &[]);
    assert_eq!(r.code, 7, "{r:?}");
    assert!(r.stderr.contains("HAS CHANGED"), "{r:?}");
    let r = other.run(
        Who::Tenant,
        "tenantctl",
        &[
            "secret",
            "put",
            "db",
            "--from",
            secret.to_str().unwrap(),
            "--attest",
            "--pin-file",
            pins,
        ],
    );
    assert_eq!(r.code, 7, "{r:?}");

    // An outsider never reaches the agent.
    let r = lab.run(Who::Outsider, "tenantctl", &["attest", "--pin-file", pins]);
    assert_eq!(r.code, 69, "{r:?}");
}
