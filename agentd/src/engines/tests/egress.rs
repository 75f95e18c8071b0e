//! Engines' egress around the boundary owner (issue 14): the rules stay in
//! force whatever happens to the node's boundary, and the rules of engines
//! recorded as running are in the first table an agent loads.

use super::*;
use crate::boundary::Boundaries;
use leasehold_netpolicy::nft;

const CLUSTER: &str = "action = \"drop\"\n[[allow]]\nname = \"lan\"\npeers = [\"10.77.0.0/24\"]\n";

fn recorded_fixture() -> (Fix, Arc<FakeEgress>) {
    let f = fixture(false);
    let eg = Arc::new(FakeEgress {
        sp: f.sp.clone(),
        calls: Mutex::default(),
        fail: false,
    });
    let mut rt = f.runtime_with_egress(eg.clone());
    rt.deploy("web", "app.tar", &spec(EGRESS_SPEC)).unwrap();
    rt.deploy("plain", "app.tar", &spec("command = [\"/bin/app\"]\n"))
        .unwrap();
    rt.deploy("idle", "app.tar", &spec(EGRESS_SPEC)).unwrap();
    rt.start("web").unwrap();
    rt.start("plain").unwrap();
    until(&rt, "web", |s| s.phase == Phase::Ready);
    until(&rt, "plain", |s| s.phase == Phase::Ready);
    // The agent goes away; the engines run on, recorded in engines.json.
    drop(rt);
    (f, eg)
}

/// What goes into the first table at start: the engines recorded with
/// instances whose cgroup is still there (the node guard for each, and the
/// egress of those that have one); not a stopped one, not one whose cgroup
/// is gone (a node reboot: nothing runs, and nft could not name it).
#[test]
fn recorded_egress_is_every_running_engine_s_guard_and_egress() {
    let (f, _) = recorded_fixture();
    let root = f.tmp.path().join("cgroup");
    let (sub, state) = (f.cfg.subtree.as_str(), f.cfg.state_dir.as_path());
    assert!(
        recorded_egress_dirs(&root, sub, state).is_empty(),
        "no cgroup left: nothing runs"
    );
    for e in ["web", "plain", "idle"] {
        std::fs::create_dir_all(root.join(sub).join(e)).unwrap();
    }
    let got = recorded_egress_dirs(&root, sub, state);
    assert_eq!(
        got.iter()
            .map(|(n, d, _)| (n.as_str(), d.clone()))
            .collect::<Vec<_>>(),
        [
            ("plain", root.join("leasehold/tenant/plain")),
            ("web", root.join("leasehold/tenant/web"))
        ]
    );
    assert!(got[0].2.is_none(), "the node guard alone");
    assert_eq!(
        got[1].2.as_ref().map(|b| b.allow.len()),
        Some(1),
        "the spec's egress boundary"
    );
    // Not on a cgroup2 mount: nft could not name it; left out, logged.
    assert!(recorded_egress(&root, sub, state).is_empty());
    // A damaged state file preloads nothing (the runtime refuses it).
    std::fs::write(state.join(STATE_FILE), "{").unwrap();
    assert!(recorded_egress_dirs(&root, sub, state).is_empty());
}

fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 hierarchy")
}

/// Cgroup directories made by a test, removed (deepest first) at the end.
struct CgDirs(Vec<PathBuf>);

impl Drop for CgDirs {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn sh(args: &[&str]) {
    let o = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// In a network namespace of this thread's own: `lo`, and a veth pair
/// `d0`–`d1` (10.77.0.1/24 on `d0`, the default route) where what is
/// sent goes nowhere (no dummy module on this host).
fn private_net() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&[
        "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    sh(&["ip", "addr", "add", "10.77.0.1/24", "dev", "d0"]);
    sh(&["ip", "link", "set", "d0", "up"]);
    sh(&["ip", "link", "set", "d1", "up"]);
    sh(&["ip", "route", "add", "default", "dev", "d0"]);
}

/// Real packets: one UDP datagram to port 9 of each address, from a
/// process in cgroup `cg` (None: the test's own) in this thread's network
/// namespace: `sent`, or `denied` when the output hook dropped it (the
/// kernel answers the send with EPERM).
fn udp_from(cg: Option<&Path>, addrs: &[&str]) -> Vec<String> {
    let join = cg.map_or(String::new(), |c| {
        format!(
            "open({:?}, 'w').write(str(os.getpid()))\n",
            c.join("cgroup.procs").display().to_string()
        )
    });
    let code = format!(
        r#"
import os, socket
{join}for a in {addrs:?}:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", (a, 9))
        print("sent", flush=True)
    except PermissionError:
        print("denied", flush=True)
"#
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &code])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn table() -> String {
    nft::current(&[]).unwrap().unwrap_or_default()
}

fn egress_of(mount: &Path, web: &Path) -> nft::EngineEgress {
    let b = spec(EGRESS_SPEC.replace("10.1.2.3", "10.77.0.2").as_str())
        .egress_boundary()
        .unwrap()
        .unwrap();
    nft::EngineEgress::new("web", mount, web, b).unwrap()
}

fn set_cluster(b: &Boundaries) {
    b.update(|p| p.set_cluster(leasehold_netpolicy::BoundaryDoc::from_toml(CLUSTER).unwrap()))
        .unwrap();
}

/// T1 (root; a network namespace, nftables, the cgroup2 hierarchy — on
/// this host `/sys/fs/cgroup/unified`): an engine's egress holds, with
/// real packets, through `boundary remove` (the table is replaced by the
/// engines' chains alone, in one transaction), a new boundary, a drift
/// that empties the engine's chain, and with no boundary ever set; the
/// table goes only with the last rules. A leasehold table the agent did
/// not load, with no boundary stored, is not replaced: the install is
/// refused (fails closed).
#[test]
#[ignore = "needs root: a network namespace, nftables and cgroup v2"]
fn real_engine_egress_holds_through_boundary_remove_and_replace() {
    assert!(nix::unistd::geteuid().is_root(), "run as root");
    let mount = cgroup2_mount();
    let base = mount.join(format!("lh-egress-remove-{}", std::process::id()));
    let (web, inst) = (base.join("web"), base.join("web/i1"));
    let _dirs = CgDirs(vec![base.clone(), web.clone(), inst.clone()]);
    std::fs::create_dir_all(&inst).unwrap();
    let r = std::thread::spawn(move || {
        private_net();
        let dir = tempfile::tempdir().unwrap();
        let b = Boundaries::load(dir.path()).unwrap();
        set_cluster(&b);
        let e = egress_of(&mount, &web);
        b.set_engine_egress("web", Some(e.clone())).unwrap();
        let both = ["10.77.0.2", "10.77.0.3"];
        assert_eq!(udp_from(Some(&inst), &both), ["sent", "denied"]);
        assert_eq!(udp_from(None, &both), ["sent", "sent"]);
        assert_eq!(udp_from(None, &["10.88.0.1"]), ["denied"], "the landlord's");

        b.remove().unwrap();
        let t = table();
        assert!(
            t.contains("jump engine0") && !t.contains("chain landlord"),
            "{t}"
        );
        assert_eq!(
            udp_from(Some(&inst), &both),
            ["sent", "denied"],
            "the engine is still held with the boundary lifted"
        );
        assert_eq!(udp_from(None, &["10.88.0.1"]), ["sent"], "the boundary is lifted");
        let st = b.status();
        assert_eq!((st.enforced, st.elements), (Some(false), None));
        assert_eq!(st.change.as_deref(), Some("removed"));
        assert_eq!(b.check_and_restore(), None, "reads back clean");
        sh(&["nft", "flush", "chain", "inet", "leasehold", "engine0"]);
        assert_eq!(udp_from(Some(&inst), &both), ["sent", "sent"]);
        assert!(b.check_and_restore().is_some(), "an emptied engine chain is drift");
        assert_eq!(udp_from(Some(&inst), &both), ["sent", "denied"], "restored");

        set_cluster(&b);
        assert!(table().contains("landlord_out") && table().contains("jump engine0"));
        assert_eq!(udp_from(Some(&inst), &both), ["sent", "denied"]);
        assert_eq!(udp_from(None, &["10.88.0.1"]), ["denied"]);
        assert_eq!(b.status().enforced, Some(true));

        // The last rules gone with no boundary: no table at all.
        b.remove().unwrap();
        b.set_engine_egress("web", None).unwrap();
        assert_eq!(nft::current(&[]).unwrap(), None);
        // No boundary ever: the engine's chains alone.
        b.set_engine_egress("web", Some(e.clone())).unwrap();
        assert_eq!(udp_from(Some(&inst), &both), ["sent", "denied"]);
        b.set_engine_egress("web", None).unwrap();
        assert_eq!(nft::current(&[]).unwrap(), None);

        // Somebody's table, no boundary stored: not the agent's to replace.
        let foreign = "table inet leasehold {\n  chain x {\n    type filter hook output priority 0; policy accept;\n  }\n}\n";
        nft::apply(foreign, &[]).unwrap();
        let err = b.set_engine_egress("web", Some(e)).unwrap_err().to_string();
        assert!(err.starts_with("engine web: its egress cannot be enforced: a leasehold table the agent did not load"), "{err}");
        assert!(table().contains("chain x"));
    })
    .join();
    r.unwrap();
}

/// T1 (root): at start the rules of an engine recorded as running are in
/// the first table the agent loads, in the same transaction as the stored
/// boundary (real packets from its cgroup are held before any engine
/// runtime exists); with no boundary stored, the engines' chains alone —
/// but a table with a boundary the agent has not stored is left alone.
#[test]
#[ignore = "needs root: a network namespace, nftables and cgroup v2"]
fn real_recorded_engine_egress_is_in_the_first_table_at_start() {
    assert!(nix::unistd::geteuid().is_root(), "run as root");
    let (f, _) = recorded_fixture();
    let mount = cgroup2_mount();
    let root = mount.join(format!("lh-egress-start-{}", std::process::id()));
    let web = root.join(&f.cfg.subtree).join("web");
    let inst = web.join("i1");
    let mut dirs = vec![root.clone()];
    let mut d = root.clone();
    for part in f.cfg.subtree.split('/').chain(["web", "i1"]) {
        d = d.join(part);
        dirs.push(d.clone());
    }
    let _dirs = CgDirs(dirs);
    std::fs::create_dir_all(&inst).unwrap();
    let (sub, state) = (f.cfg.subtree.clone(), f.cfg.state_dir.clone());
    let r = std::thread::spawn(move || {
        private_net();
        let both = ["10.77.0.2", "10.77.0.3"];
        // EGRESS_SPEC allows 10.1.2.3 only.
        let bdir = tempfile::tempdir().unwrap();
        {
            // The previous agent stored a boundary (its table is in the
            // kernel; whatever it held is replaced at the next start).
            let b0 = Boundaries::load(bdir.path()).unwrap();
            set_cluster(&b0);
        }
        assert_eq!(udp_from(Some(&inst), &both), ["sent", "sent"]);
        let b = Boundaries::load(bdir.path()).unwrap();
        b.preload_engine_egress(recorded_egress(&root, &sub, &state));
        b.apply_stored().unwrap();
        let t = table();
        assert!(
            t.contains("landlord_out") && t.contains("jump engine0"),
            "{t}"
        );
        assert!(t.contains("leasehold: engine web denied"), "{t}");
        assert_eq!(
            b.status().change.as_deref(),
            Some("full"),
            "one transaction"
        );
        assert_eq!(udp_from(Some(&inst), &both), ["denied", "denied"]);
        assert_eq!(udp_from(None, &both), ["sent", "sent"]);
        assert_eq!(b.check_and_restore(), None);

        // No boundary stored, but a boundary's table in the kernel: left.
        let empty = tempfile::tempdir().unwrap();
        let b2 = Boundaries::load(empty.path()).unwrap();
        let recorded = recorded_egress(&root, &sub, &state);
        b2.preload_engine_egress(recorded.clone());
        b2.apply_stored().unwrap();
        assert!(table().contains("landlord_out"), "not replaced");
        // The preloaded rules were not loaded, so they are not taken as in
        // force: the re-adopted engine's install meets the refusal, and
        // removing it does not replace the foreign table.
        let again = recorded.into_iter().next().unwrap();
        let name = again.name.clone();
        let err = b2.set_engine_egress(&name, Some(again)).unwrap_err();
        assert!(err.to_string().contains("did not load"), "{err}");
        b2.set_engine_egress(&name, None).unwrap();
        assert!(table().contains("landlord_out"), "still not replaced");
        // Nothing in the kernel: the engines' chains alone.
        sh(&["nft", "delete", "table", "inet", "leasehold"]);
        let b3 = Boundaries::load(empty.path()).unwrap();
        b3.preload_engine_egress(recorded_egress(&root, &sub, &state));
        b3.apply_stored().unwrap();
        let t = table();
        assert!(
            t.contains("jump engine0") && !t.contains("chain landlord"),
            "{t}"
        );
        assert_eq!(udp_from(Some(&inst), &both), ["denied", "denied"]);
        assert_eq!(udp_from(None, &["10.88.0.1"]), ["sent"]);
        sh(&["nft", "delete", "table", "inet", "leasehold"]);
    })
    .join();
    r.unwrap();
}
