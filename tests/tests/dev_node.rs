//! T1 (root), issue 15 points 1, 2, 3 and 10: the quick start's node
//! (`scripts/dev-agent`, `lh-dev-node`) is drivable and leaves nothing
//! behind; dev mode never touches the host's nftables; one agent per state
//! directory; a lost TPM is reported; SIGHUP is survived and SIGTERM/SIGINT
//! end in a clean TPM shutdown.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use leasehold_tests::{bin, require_root, workspace_root, Lab, LabOptions, Run, Who};

fn nft_tables(netns_of: Option<u32>) -> String {
    let mut c = match netns_of {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.args(["-t", &pid.to_string(), "-n", "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    let o = c.args(["list", "tables"]).output().unwrap();
    assert!(
        o.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn host_has_leasehold_table() -> bool {
    nft_tables(None).contains("table inet leasehold")
}

/// Alive and not a zombie (swtpm is not our child: nothing reaps it here).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn swtpm_pid(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join("tpm/swtpm.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn kill(sig: &str, pid: u32) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

fn set_boundary(lab: &Lab) {
    let doc = "{\"allow\": [{\"name\": \"peers\", \"peers\": [\"10.9.0.1\"]}]}";
    let file = lab.write_file("b.json", doc.as_bytes());
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "set", file.to_str().unwrap()],
    )
    .ok();
}

#[test]
#[ignore = "needs root: agentd --dev in a network namespace, test users"]
fn agentd_dev_never_touches_host_nftables() {
    require_root();
    assert!(
        !host_has_leasehold_table(),
        "the host already has table inet leasehold before this test; remove it (nft delete table inet leasehold)"
    );
    // agentd started in the host's namespace, as a person would start it.
    let mut lab = Lab::start_with_options(LabOptions {
        agent_host_netns: true,
        ..LabOptions::default()
    });
    assert!(
        lab.agent_log().contains("network namespace of its own"),
        "{}",
        lab.agent_log()
    );
    set_boundary(&lab);
    let pid = lab.agent_pid().unwrap();
    // Enforced, in the agent's namespace, not in the host's.
    assert!(nft_tables(Some(pid)).contains("table inet leasehold"));
    assert!(!host_has_leasehold_table());
    // A restart applies the stored boundary before serving: still not here.
    assert!(lab.stop_agent().success());
    lab.start_agent();
    let pid = lab.agent_pid().unwrap();
    assert!(nft_tables(Some(pid)).contains("table inet leasehold"));
    assert!(!host_has_leasehold_table());
    assert!(lab.stop_agent().success());
    // --oneshot applies it too, and goes with its namespace.
    let out = Command::new(bin("agentd"))
        .arg("--dev")
        .arg(lab.agent_dir())
        .arg("--oneshot")
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("boundary:             enforced"),
        "{stdout}"
    );
    assert!(!host_has_leasehold_table());
}

#[test]
#[ignore = "needs root: agentd --dev in a network namespace, test users"]
fn agentd_second_agent_on_the_same_directory_is_refused() {
    require_root();
    let mut lab = Lab::start();
    let first = lab.agent_pid().unwrap();
    let swtpm = swtpm_pid(lab.agent_dir());
    for extra in [&[][..], &["--oneshot"][..]] {
        let out = Command::new(bin("agentd"))
            .arg("--dev")
            .arg(lab.agent_dir())
            .args(extra)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &lab.address)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{extra:?}: {stderr}");
        let want = format!(
            "state directory {} is in use by agentd pid {first}",
            lab.agent_dir().display()
        );
        assert!(stderr.contains(&want), "{extra:?}: {stderr}");
    }
    // The first agent's swtpm was not touched, and the agent still works.
    assert!(alive(swtpm));
    assert_eq!(swtpm_pid(lab.agent_dir()), swtpm);
    let info = lab
        .run(Who::Landlord, "landlordctl", &["--json", "info"])
        .ok()
        .json();
    assert_eq!(info["tpm_health"], "ok", "{info}");
    lab.run(Who::Landlord, "landlordctl", &["assign", "acme"])
        .ok();
    assert!(lab.agent_alive());
    assert!(lab.stop_agent().success());
}

#[test]
#[ignore = "needs root: agentd --dev in a network namespace, test users"]
fn agentd_lost_tpm_is_reported_unhealthy() {
    require_root();
    let lab = Lab::start_with_options(LabOptions {
        agent_config: Some("[tpm]\ncheck_interval_secs = 1\n".into()),
        ..LabOptions::default()
    });
    let info = |who: Who, ctl: &str| lab.run(who, ctl, &["--json", "info"]).ok().json();
    let before = info(Who::Landlord, "landlordctl");
    assert_eq!(before["tpm_health"], "ok", "{before}");
    assert!(before["tpm_error"].is_null(), "{before}");
    kill("-KILL", swtpm_pid(lab.agent_dir()));
    // The agent notices at its next check (1 s here). Polled, bounded: no
    // signal announces a health change.
    let start = Instant::now();
    let after = loop {
        let i = info(Who::Landlord, "landlordctl");
        if i["tpm_health"] == "failed" {
            break i;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "still healthy 30 s after swtpm died: {i}\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        after["tpm_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{after}"
    );
    // Both roles see it, and the text says so.
    assert_eq!(info(Who::Tenant, "tenantctl")["tpm_health"], "failed");
    let text = lab.run(Who::Landlord, "landlordctl", &["info"]).ok();
    assert!(
        text.stdout.contains("TPM health:") && text.stdout.contains("FAILED"),
        "{text:?}"
    );
    assert!(
        lab.agent_log().contains("the TPM does not answer"),
        "{}",
        lab.agent_log()
    );
}

#[test]
#[ignore = "needs root: agentd --dev in a network namespace, test users"]
fn agentd_survives_sighup_and_stops_cleanly_on_sigterm_and_sigint() {
    require_root();
    let mut lab = Lab::start();
    let pid = lab.agent_pid().unwrap();
    let swtpm = swtpm_pid(lab.agent_dir());
    kill("-HUP", pid);
    // Still there and answering after the HUP.
    lab.run(Who::Landlord, "landlordctl", &["info"]).ok();
    assert!(lab.agent_alive());
    assert_eq!(lab.agent_pid(), Some(pid));
    let st = lab.stop_agent();
    assert_eq!(st.code(), Some(0), "{st}\n{}", lab.agent_log());
    let log = lab.agent_log();
    assert!(
        log.contains("SIGHUP") && log.contains("reloads nothing"),
        "{log}"
    );
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("TPM shut down cleanly"), "{log}");
    // swtpm went with it (dev mode stops it after TPM2_Shutdown).
    assert!(!alive(swtpm), "swtpm {swtpm} orphaned");

    lab.start_agent();
    let swtpm = swtpm_pid(lab.agent_dir());
    kill("-INT", lab.agent_pid().unwrap());
    let st = lab.wait_agent();
    assert_eq!(st.code(), Some(0), "{st}\n{}", lab.agent_log());
    let log = lab.agent_log();
    assert!(log.contains("SIGINT"), "{log}");
    assert!(log.contains("TPM shut down cleanly"), "{log}");
    assert!(!alive(swtpm), "swtpm {swtpm} orphaned");
}

/// Pids whose command line or environment mentions `needle`.
fn pids_mentioning(needle: &str) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || !alive(pid) {
            continue;
        }
        for f in ["cmdline", "environ"] {
            if let Ok(b) = std::fs::read(format!("/proc/{pid}/{f}")) {
                if String::from_utf8_lossy(&b).contains(needle) {
                    found.insert(pid);
                }
            }
        }
    }
    found
}

struct DevNode {
    child: std::process::Child,
    stdout: String,
}

fn start_dev_node(dir: &Path, ssh: bool) -> DevNode {
    let mut c = Command::new(bin("lh-dev-node"));
    c.arg("--dir").arg(dir);
    if ssh {
        c.arg("--ssh");
    }
    let mut child = c
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Its readiness event: the line after the banner.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut stdout = String::new();
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "lh-dev-node ended before it was ready: {stdout}");
        if line.trim() == "dev node ready" {
            break;
        }
        stdout.push_str(&line);
    }
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    DevNode { child, stdout }
}

fn dev_shell(dir: &Path, role: &str, command: &str) -> Run {
    let o = Command::new(workspace_root().join("scripts/dev-agent"))
        .args(["shell", role, "-c", command])
        .env("LEASEHOLD_DEV_DIR", dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn env_value(dir: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(dir.join("node.env")).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} not in node.env: {text}"));
    line.trim_matches('\'').to_owned()
}

/// Stops the node as Ctrl-C would (SIGINT) and checks that nothing of it
/// is left: the processes found by `needles`, node.env, the lab directory.
fn stop_dev_node(mut node: DevNode, dir: &Path) {
    let lab_dir = Path::new(&env_value(dir, "LEASEHOLD_DEV_WORK"))
        .parent()
        .unwrap()
        .to_owned();
    let mut procs = pids_mentioning(lab_dir.to_str().unwrap());
    procs.extend(pids_mentioning(dir.to_str().unwrap()));
    let swtpm = swtpm_pid(dir);
    assert!(procs.contains(&swtpm), "swtpm {swtpm} not in {procs:?}");
    // The bus, polkitd, agentd, swtpm at least (sshd too with --ssh).
    assert!(procs.len() >= 4, "{procs:?}");
    kill("-INT", node.child.id());
    let st = node.child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "{st}");
    let left: Vec<u32> = procs.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "left running: {left:?}");
    assert!(!dir.join("node.env").exists());
    assert!(!lab_dir.exists(), "{} left", lab_dir.display());
    assert!(!host_has_leasehold_table());
}

#[test]
#[ignore = "needs root: agentd --dev in a network namespace, test users"]
fn dbus_dev_node_quick_start() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let node = start_dev_node(&dir, true);
    assert!(
        node.stdout.contains("scripts/dev-agent shell tenant"),
        "{}",
        node.stdout
    );

    // The landlord's user, on the node's bus.
    let r = dev_shell(&dir, "landlord", "id -un; landlordctl assign acme");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("lhtest-landlord\n"), "{r:?}");
    let fp = dev_shell(&dir, "landlord", "landlordctl --json info")
        .ok()
        .json()["landlord_fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    // The tenant's user: tenant actions work, landlord ones are refused.
    let r = dev_shell(&dir, "tenant", "tenantctl --json info").ok();
    assert_eq!(r.json()["tenant_name"], "acme");
    assert_ne!(dev_shell(&dir, "tenant", "landlordctl info").code, 0);
    // A console over SSH on loopback.
    let r = dev_shell(&dir, "console", "tenantctl --host \"$NODE\" --json info").ok();
    assert_eq!(r.json()["tenant_name"], "acme");
    stop_dev_node(node, &dir);

    // The keys stay: a second run is the same node.
    assert!(dir.join("state/keys.json").exists());
    let node = start_dev_node(&dir, false);
    let info = dev_shell(&dir, "landlord", "landlordctl --json info")
        .ok()
        .json();
    assert_eq!(info["landlord_fingerprint"], fp.as_str());
    assert_eq!(info["tenant_name"], "acme");
    // Without --ssh there is no console, and it says so.
    let r = dev_shell(&dir, "console", "true");
    assert_eq!(r.code, 69, "{r:?}");
    assert!(r.stderr.contains("--ssh"), "{r:?}");
    stop_dev_node(node, &dir);
    let r = dev_shell(&dir, "landlord", "true");
    assert_eq!(r.code, 69, "{r:?}");
}
