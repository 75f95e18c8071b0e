//! T1 (root), issue 5: the backend's paths against the real kernel, in a
//! network namespace of this test's own thread: a staged full apply (sets
//! of a new generation filled over netlink, one transaction switching the
//! chains), element changes over the kept-open netlink socket (one batch
//! of several messages for a large change), leftovers of an interrupted
//! staged apply, and restore after `nft flush ruleset`.

use std::net::Ipv4Addr;
use std::process::Command;

use leasehold_netpolicy::enforce::{Change, Drift, Enforcer};
use leasehold_netpolicy::nft::{self, Ruleset};
use leasehold_netpolicy::BoundaryDoc;
use leasehold_tests::require_root;

fn boundary(hosts: u32, second_entry: bool) -> leasehold_netpolicy::model::Boundary {
    let peers: Vec<String> = (0..hosts)
        .map(|i| format!("\"{}\"", Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    let mut doc = format!(
        "[[allow]]\nname = \"hosts\"\npeers = [{}, \"192.168.0.0/16\", \"fd00::1\"]\n",
        peers.join(", ")
    );
    if second_entry {
        doc.push_str("[[allow]]\nname = \"web\"\npeers = [\"172.16.0.1\"]\ndirection = \"in\"\nprotocols = [{ proto = \"tcp\", ports = [443] }]\n");
    }
    BoundaryDoc::from_toml(&doc)
        .unwrap()
        .validate(true)
        .unwrap()
}

fn nft_out(args: &[&str]) -> String {
    let o = Command::new("nft").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn set_len(name: &str) -> usize {
    let v: serde_json::Value =
        serde_json::from_str(&nft_out(&["-j", "list", "set", "inet", nft::TABLE, name])).unwrap();
    v["nftables"][1]["set"]["elem"]
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn staged_apply_element_changes_and_leftovers() {
    require_root();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();

    let mut e = Enforcer::new(Vec::new()).staged_from(0);
    assert_eq!(
        e.apply(Ruleset::build(&boundary(10, false), None)).unwrap(),
        Change::Full
    );
    let (chains, sets) = nft::objects(&[]).unwrap();
    assert_eq!(
        chains,
        [
            "landlord_in",
            "landlord_out",
            "landlord_fwd_in",
            "landlord_fwd_out"
        ]
    );
    assert_eq!(sets, ["lla0_h4_g1", "lla0_h6_g1", "lla0_n4_g1"]);
    assert_eq!(set_len("lla0_h4_g1"), 10);
    let text = nft_out(&["list", "table", "inet", nft::TABLE]);
    assert!(text.contains("ip saddr @lla0_h4_g1"), "{text}");
    assert!(text.contains("192.168.0.0/16"), "{text}");
    assert_eq!(e.check().unwrap(), None);

    // 5000 hosts more: one batch of three messages, then back.
    assert_eq!(
        e.apply(Ruleset::build(&boundary(5010, false), None))
            .unwrap(),
        Change::Elements
    );
    assert_eq!(set_len("lla0_h4_g1"), 5010);
    assert_eq!(e.check().unwrap(), None);
    for _ in 0..3 {
        assert_eq!(
            e.apply(Ruleset::build(&boundary(11, false), None)).unwrap(),
            Change::Elements
        );
        assert_eq!(
            e.apply(Ruleset::build(&boundary(10, false), None)).unwrap(),
            Change::Elements
        );
    }
    assert_eq!(set_len("lla0_h4_g1"), 10);
    assert_eq!(e.check().unwrap(), None);
    assert_eq!(
        e.apply(Ruleset::build(&boundary(10, false), None)).unwrap(),
        Change::Unchanged
    );

    // A leftover set of an interrupted staged apply: the next full apply
    // takes a later generation and removes it with the old sets.
    nft_out(&[
        "add",
        "set",
        "inet",
        nft::TABLE,
        "lla0_h4_g7",
        "{ type ipv4_addr; }",
    ]);
    assert_eq!(
        e.apply(Ruleset::build(&boundary(10, true), None)).unwrap(),
        Change::Full
    );
    let (_, sets) = nft::objects(&[]).unwrap();
    assert_eq!(
        sets,
        ["lla0_h4_g8", "lla0_h6_g8", "lla0_n4_g8", "lla1_h4_g8"]
    );
    assert_eq!(e.check().unwrap(), None);
    assert_eq!(
        e.apply(Ruleset::build(&boundary(12, true), None)).unwrap(),
        Change::Elements
    );
    assert_eq!(set_len("lla0_h4_g8"), 12);

    // An element removed behind the agent's back is noticed and restored.
    nft_out(&[
        "delete",
        "element",
        "inet",
        nft::TABLE,
        "lla0_h4_g8",
        "{ 10.0.0.3 }",
    ]);
    assert!(matches!(e.check().unwrap(), Some(Drift::Changed(_))));
    e.restore().unwrap();
    assert_eq!(e.check().unwrap(), None);
    assert_eq!(set_len("lla0_h4_g9"), 12);

    // A rule replaced in place (same count), a prefix added to an
    // interval set: both noticed.
    let listing = nft_out(&["-a", "list", "chain", "inet", nft::TABLE, "landlord_in"]);
    let handle = listing
        .lines()
        .find(|l| l.contains("ct state established accept"))
        .and_then(|l| l.rsplit("# handle ").next())
        .unwrap()
        .trim()
        .to_owned();
    nft_out(&[
        "replace",
        "rule",
        "inet",
        nft::TABLE,
        "landlord_in",
        "handle",
        &handle,
        "accept",
    ]);
    assert!(matches!(e.check().unwrap(), Some(Drift::Changed(_))));
    e.restore().unwrap();
    assert_eq!(e.check().unwrap(), None);
    nft_out(&[
        "add",
        "element",
        "inet",
        nft::TABLE,
        "lla0_n4_g10",
        "{ 172.20.0.0/16 }",
    ]);
    assert!(matches!(e.check().unwrap(), Some(Drift::Changed(_))));
    e.restore().unwrap();
    assert_eq!(e.check().unwrap(), None);

    nft_out(&["flush", "ruleset"]);
    assert_eq!(e.check().unwrap(), Some(Drift::Missing));
    e.restore().unwrap();
    assert_eq!(e.check().unwrap(), None);
    assert_eq!(set_len("lla0_h4_g1"), 12);
    e.remove().unwrap();
    assert_eq!(nft::objects(&[]).unwrap(), (Vec::new(), Vec::new()));

    // A hash set staged with 4100 hosts gets a size (16384); growing past
    // it is refused by the kernel and the whole table is applied instead.
    assert_eq!(
        e.apply(Ruleset::build(&boundary(4100, false), None))
            .unwrap(),
        Change::Full
    );
    let (_, sets) = nft::objects(&[]).unwrap();
    let h4 = sets
        .iter()
        .find(|s| s.starts_with("lla0_h4"))
        .unwrap()
        .clone();
    assert!(nft_out(&["list", "set", "inet", nft::TABLE, &h4]).contains("size 16384"));
    assert_eq!(e.check().unwrap(), None);
    assert_eq!(
        e.apply(Ruleset::build(&boundary(8000, false), None))
            .unwrap(),
        Change::Elements
    );
    assert_eq!(
        e.apply(Ruleset::build(&boundary(16500, false), None))
            .unwrap(),
        Change::Full
    );
    let (_, sets) = nft::objects(&[]).unwrap();
    let h4 = sets
        .iter()
        .find(|s| s.starts_with("lla0_h4"))
        .unwrap()
        .clone();
    assert_eq!(set_len(&h4), 16500);
    assert_eq!(e.check().unwrap(), None);
    e.remove().unwrap();
}
