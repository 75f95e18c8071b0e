//! T1 (root): peer edits through the agent are stored as journal records
//! (`boundary.peers.jsonl` next to `boundary.json`) and survive an agent
//! restart, in the document and in the kernel.

use std::path::{Path, PathBuf};
use std::process::Command;

use leasehold_tests::{require_root, Lab, Who};

struct NsGuard(String);

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The file `name` somewhere under `dir`.
fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if p.is_dir() {
            if let Some(f) = find(&p, name) {
                return Some(f);
            }
        }
    }
    None
}

fn peers(lab: &Lab) -> Vec<String> {
    let r = lab
        .run(
            Who::Landlord,
            "landlordctl",
            &["--json", "boundary", "show"],
        )
        .ok();
    let cluster = &r.json()["cluster"];
    let doc: serde_json::Value = match cluster.as_str() {
        Some(text) => serde_json::from_str(text).unwrap(),
        None => cluster.clone(),
    };
    doc["allow"][0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

fn in_kernel(ns: &str, addr: &str) -> bool {
    let sets = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "nft",
            "-j",
            "list",
            "table",
            "inet",
            "leasehold",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&sets.stdout).contains(&format!("\"{addr}\""))
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn peer_edits_survive_an_agent_restart() {
    require_root();
    let ns = format!("lhjr{}", std::process::id());
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    let _guard = NsGuard(ns.clone());
    Command::new("ip")
        .args(["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])
        .status()
        .unwrap();
    let mut lab = Lab::start_in(&ns);
    let doc = "{\"allow\": [{\"name\": \"bulk\", \"peers\": [\"10.9.0.1\", \"10.9.0.2\", \"10.9.0.3\"]}], \
               \"failsafe\": [{\"name\": \"ssh\", \"peers\": [\"192.0.2.10\"], \"direction\": \"in\", \
               \"protocols\": [{\"proto\": \"tcp\", \"ports\": [22]}]}]}";
    let file = lab.write_file("bulk.json", doc.as_bytes());
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "set", file.to_str().unwrap()],
    )
    .ok();
    let state = lab.path("agent");
    assert!(find(&state, "boundary.json").is_some());
    assert!(find(&state, "boundary.peers.jsonl").is_none());
    for (op, peer) in [
        ("add-peer", "10.9.0.4"),
        ("remove-peer", "10.9.0.1"),
        ("add-peer", "10.9.0.5"),
        ("remove-peer", "10.9.0.5"),
    ] {
        lab.run(
            Who::Landlord,
            "landlordctl",
            &["boundary", op, "bulk", peer],
        )
        .ok();
    }
    let want = ["10.9.0.2", "10.9.0.3", "10.9.0.4"];
    assert_eq!(peers(&lab), want);
    let journal = find(&state, "boundary.peers.jsonl").expect("the edits are journal records");
    assert_eq!(
        std::fs::read_to_string(&journal).unwrap().lines().count(),
        5
    );

    // A restart replays the records onto the document.
    assert!(lab.stop_agent().success());
    lab.start_agent();
    assert_eq!(peers(&lab), want);
    assert!(in_kernel(&ns, "10.9.0.4") && !in_kernel(&ns, "10.9.0.1"));
    // Edits go on after the replay; a whole-document change drops the
    // journal.
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "remove-peer", "bulk", "10.9.0.2"],
    )
    .ok();
    assert_eq!(
        std::fs::read_to_string(&journal).unwrap().lines().count(),
        6
    );
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "set", file.to_str().unwrap()],
    )
    .ok();
    assert!(!journal.exists());
    assert!(lab.stop_agent().success());
    lab.start_agent();
    assert_eq!(peers(&lab), ["10.9.0.1", "10.9.0.2", "10.9.0.3"]);
}
