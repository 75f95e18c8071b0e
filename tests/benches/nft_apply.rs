//! nftables backend costs at 10 / 1k / 10k / 100k peers, in a private
//! network namespace: full atomic apply of the generated ruleset, and the
//! two ways the text backend can change one peer (full re-apply, or
//! `nft add element`). Run as root: `cargo bench -p leasehold-tests --bench nft_apply`.

use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use leasehold_netpolicy::{nft, BoundaryDoc};

fn peers(n: usize) -> Vec<String> {
    // Every other address, so the set cannot merge them into ranges.
    (0..n)
        .map(|i| {
            let v = 0x0a00_0000u32 + 2 * u32::try_from(i).unwrap();
            format!("{}/32", std::net::Ipv4Addr::from(v))
        })
        .collect()
}

fn boundary(n: usize) -> leasehold_netpolicy::Boundary {
    let list: Vec<String> = peers(n).into_iter().map(|p| format!("\"{p}\"")).collect();
    BoundaryDoc::from_toml(&format!(
        "[[allow]]\nname = \"peers\"\npeers = [{}]\n",
        list.join(",")
    ))
    .unwrap()
    .validate(true)
    .unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    leasehold_tests::require_root();
    let ns = format!("lhbench{}", std::process::id());
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    let prefix = ["ip", "netns", "exec", ns.as_str()];
    let mut out = String::new();
    writeln!(out, "## nftables backend (text, `nft -f -`)\n").unwrap();
    writeln!(out, "`cargo bench -p leasehold-tests --bench nft_apply`\n").unwrap();
    out.push_str(&leasehold_tests::markdown::machine());
    let nftv = Command::new("nft").arg("--version").output().unwrap();
    writeln!(out, "- {}\n", String::from_utf8_lossy(&nftv.stdout).trim()).unwrap();
    writeln!(out, "| peers | full apply (atomic) | one-peer change: full re-apply | one-peer change: `nft add element` |").unwrap();
    writeln!(out, "|---|---|---|---|").unwrap();
    for n in [10usize, 1_000, 10_000, 100_000] {
        let b = boundary(n);
        let script = nft::ruleset(&b, None);
        let mut full = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            nft::apply(&script, &prefix).unwrap();
            full.push(t.elapsed());
        }
        let plus_one = nft::ruleset(&boundary(n + 1), None);
        let t = Instant::now();
        nft::apply(&plus_one, &prefix).unwrap();
        let reapply = t.elapsed();
        nft::apply(&script, &prefix).unwrap();
        let extra = std::net::Ipv4Addr::from(0x0b00_0001u32);
        let t = Instant::now();
        let st = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "nft",
                "add",
                "element",
                "inet",
                nft::TABLE,
                "ll_peers_v4",
            ])
            .arg(format!("{{ {extra} }}"))
            .status()
            .unwrap();
        let add = t.elapsed();
        assert!(st.success());
        writeln!(
            out,
            "| {n} | {} | {} | {} |",
            ms(median(full)),
            ms(reapply),
            ms(add)
        )
        .unwrap();
        eprintln!("{n} peers done");
    }
    writeln!(
        out,
        "\nTargets (issue 5): one-peer change < 10 ms at 100k peers, full apply of 100k < 0.5 s. The text\n\
         backend meets neither at 100k; the next step is netlink batches (or exact hosts in a hash set)."
    )
    .unwrap();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    print!("{out}");
    leasehold_tests::markdown::write_section("nft", &out);
}
