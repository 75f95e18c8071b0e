//! T1: image uploads into the tenant's inbox (docs/engines.md, "Uploads")
//! through the real bus, polkitd, agentd and the CLI, over `tenantctl
//! --host` (sshd on loopback). The harness agent has no tenant volume
//! (no dm-crypt here), so an authorized upload ends at the agent's
//! `Unavailable`; the writing itself is tested in agentd (T0, `upload`).

use leasehold_tests::{Lab, Run, Who};

fn assigned(lab: &Lab) {
    lab.run(Who::Landlord, "landlordctl", &["--yes", "assign", "acme"])
        .ok();
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns, sshd)"]
fn upload_over_host_reaches_the_agent_and_is_refused_without_volume() {
    let mut lab = Lab::start();
    assigned(&lab);
    let ssh = lab.start_sshd(&[Who::Tenant]);
    let tenantctl = leasehold_tests::bin("tenantctl");
    // Over 4 MiB: more than one chunk, were there a volume.
    lab.write_file("local.tar", &vec![0x42; 5 << 20]);
    let spec = lab.write_file("spec.toml", b"command = [\"/bin/true\"]\n");
    let remote = |args: &[&str]| -> Run {
        // Run by root (who holds the client key); the SSH login is the
        // tenant's, and that is the D-Bus caller. No local bus: everything
        // goes over SSH.
        let mut c = lab.command(Who::Root, &tenantctl);
        c.env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .env("LEASEHOLD_SSH", &ssh.command);
        let out = c
            .arg("--host")
            .arg(format!("lhtest-tenant@127.0.0.1:{}", ssh.port))
            .args(args)
            .output()
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let spec = spec.to_str().unwrap();

    // A path with a `/`: uploaded first; the agent answers BeginUpload
    // with Unavailable (no tenant volume): exit 69, naming the volume.
    let r = remote(&["engine", "deploy", "web", "./local.tar", "--spec", spec]);
    assert_eq!(r.code, 69, "{r:?}");
    assert!(r.stderr.contains("no tenant volume is mounted"), "{r:?}");
    // The same in --json, with the agent's error name.
    let r = remote(&["--json", "engine", "upload", "./local.tar"]);
    assert_eq!(r.code, 69, "{r:?}");
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        j["error"]["dbus_error"], "org.leasehold.Error.Unavailable",
        "{r:?}"
    );
    // A bare name that is a local file is uploaded too.
    let r = remote(&["engine", "deploy", "web", "local.tar", "--spec", spec]);
    assert_eq!(r.code, 69, "{r:?}");
    assert!(r.stderr.contains("no tenant volume"), "{r:?}");

    // reload --image reads IMAGE the same way.
    let r = remote(&["engine", "reload", "web", "--image", "./local.tar"]);
    assert_eq!(r.code, 69, "{r:?}");
    assert!(r.stderr.contains("no tenant volume is mounted"), "{r:?}");

    // Names are checked by the agent, before the volume: the field named.
    for bad in ["../x.tar", ".hidden", "a/b"] {
        let r = remote(&["engine", "upload", "./local.tar", "--as", bad]);
        assert_eq!(r.code, 6, "{bad}: {r:?}");
        assert!(
            r.stderr.contains("invalid argument: name: "),
            "{bad}: {r:?}"
        );
    }

    // --from-inbox: never uploaded, so Deploy gets the path and refuses
    // it as an inbox file name, naming `image`.
    let r = remote(&[
        "engine",
        "deploy",
        "web",
        "./local.tar",
        "--from-inbox",
        "--spec",
        spec,
    ]);
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("image"), "{r:?}");
    // A bare name that is no local file is an inbox name: Deploy, which
    // without a volume is Unavailable too, but never an upload.
    let r = remote(&["engine", "deploy", "web", "app.tar", "--spec", spec]);
    assert_eq!(r.code, 69, "{r:?}");
    assert!(!r.stderr.contains("upload"), "{r:?}");
    // A full 4 MiB chunk crosses the SSH bridge and the bus to the agent,
    // which answers it (NotFound: `--resume` names no upload begun).
    let t = std::time::Instant::now();
    let r = remote(&["engine", "upload", "./local.tar", "--resume", "0123"]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("no upload \"0123\""), "{r:?}");
    println!(
        "figure: tenantctl --host with one 4 MiB UploadChunk (ssh setup included): {} ms",
        t.elapsed().as_millis()
    );
    // An unknown upload id is NotFound for the tenant.
    let t = std::time::Instant::now();
    let r = remote(&["engine", "upload-abort", "0123"]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("no upload"), "{r:?}");
    println!(
        "figure: the same with no payload (AbortUpload): {} ms",
        t.elapsed().as_millis()
    );

    // No upload left anything behind in the agent's log as an error.
    assert!(!lab.agent_log().contains("image upload failed"));
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn upload_is_the_tenants_only() {
    let lab = Lab::start();
    assigned(&lab);
    let image = lab.write_file("local.tar", b"bytes");
    let path = image.to_str().unwrap();
    // The landlord is refused by polkit at the first call, before the
    // size or the volume are looked at.
    let r = lab.run(Who::Landlord, "tenantctl", &["engine", "upload", path]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("not authorized"), "{r:?}");
    // The local side: a missing file is named, nothing is sent.
    let r = lab.run(
        Who::Tenant,
        "tenantctl",
        &["engine", "deploy", "web", "./missing.tar", "--spec", path],
    );
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("missing.tar"), "{r:?}");
}

/// T1: a spec's `egress` is checked against the tenant's sub-boundary in
/// the real agent (its boundary backend says what the limit is): wider is
/// refused naming `egress`; inside it passes on to the engines (which end
/// at the harness's missing volume). Before any boundary, nothing to widen.
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn engine_egress_is_checked_against_the_tenants_sub_boundary() {
    let lab = Lab::start();
    assigned(&lab);
    let spec = |name: &str, peers: &str| {
        lab.write_file(
            name,
            format!(
                "command = [\"/bin/true\"]\n[egress]\n[[egress.allow]]\nname = \"db\"\npeers = [\"{peers}\"]\n"
            )
            .as_bytes(),
        )
    };
    let inside = spec("inside.toml", "10.1.2.3");
    let wider = spec("wider.toml", "10.2.0.0/16");
    let deploy = |spec: &std::path::Path| {
        lab.run(
            Who::Tenant,
            "tenantctl",
            &[
                "engine",
                "deploy",
                "web",
                "web.tar",
                "--from-inbox",
                "--spec",
                spec.to_str().unwrap(),
            ],
        )
    };
    // No boundary stored: nothing an egress could widen.
    let r = deploy(&wider);
    assert_eq!(r.code, 69, "{r:?}");
    assert!(!r.stderr.contains("egress"), "{r:?}");
    let cluster = lab.write_file(
        "cluster.toml",
        b"[[allow]]\nname = \"net\"\npeers = [\"10.0.0.0/8\"]\n",
    );
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "set", cluster.to_str().unwrap()],
    )
    .ok();
    let sub = lab.write_file(
        "sub.toml",
        b"[[allow]]\nname = \"web\"\npeers = [\"10.1.0.0/16\"]\n",
    );
    lab.run(
        Who::Tenant,
        "tenantctl",
        &["boundary", "set", sub.to_str().unwrap()],
    )
    .ok();
    let r = deploy(&wider);
    assert_eq!(r.code, 6, "{r:?}");
    assert!(
        r.stderr.contains("egress") && r.stderr.contains("can only narrow"),
        "{r:?}"
    );
    let r = deploy(&inside);
    assert_eq!(r.code, 69, "passes the egress check: {r:?}");
    assert!(!r.stderr.contains("egress"), "{r:?}");
}
