//! Issue 6 benchmark, one VM run (QEMU lab node with the packaged agent):
//! erase time of the tenant volume for 1 GiB, 64 GiB and 1 TiB sparse
//! devices, and fio (sequential 1 MiB, random 4 KiB, read and write) on the
//! raw disk, a `cryptsetup open --type plain` mapping with its defaults,
//! and Leasehold's mapping with and without dm-crypt's workqueues. Writes
//! the "volume" section of docs/benchmarks.md.
//!
//! Needs root, the lab image and `target/debian/*.deb` (scripts/build-deb).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;

use leasehold_tests::workspace_root;

fn lab(args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("3600")
        .arg(workspace_root().join("vagrant/lab"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lab {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    leasehold_tests::require_root();
    let deb = std::fs::read_dir(workspace_root().join("target/debian"))
        .expect("target/debian: run scripts/build-deb first")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");
    lab(&["build"]);
    lab(&["destroy"]);
    lab(&["up", "1"]);
    lab(&["install", "1", deb.to_str().unwrap()]);
    let script =
        std::fs::read_to_string(workspace_root().join("tests/benches/volume-guest.sh")).unwrap();
    let out = lab(&[
        "ssh",
        "1",
        &format!("cat > /tmp/bench.sh <<'SCRIPT'\n{script}SCRIPT\nsh /tmp/bench.sh"),
    ]);
    let guest = lab(&[
        "ssh",
        "1",
        "uname -r; nproc; grep -m1 'model name' /proc/cpuinfo | cut -d: -f2",
    ]);
    lab(&["destroy"]);

    let mut erase: BTreeMap<String, [Vec<f64>; 3]> = BTreeMap::new();
    let mut fio: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
    let mut mappings: BTreeMap<String, String> = BTreeMap::new();
    let mut flags = String::new();
    let mut lines = out.lines();
    while let Some(l) = lines.next() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.first().copied() {
            Some("erase") if f.len() == 6 => {
                let e = erase.entry(f[1].to_owned()).or_default();
                for (v, x) in e.iter_mut().zip(&f[3..]) {
                    v.push(x.parse().unwrap_or(f64::NAN));
                }
            }
            Some("fio") if f.len() == 3 => {
                let mut json = String::new();
                for l in lines.by_ref() {
                    if l == "end" {
                        break;
                    }
                    json.push_str(l);
                    json.push('\n');
                }
                let v: serde_json::Value = serde_json::from_str(&json)
                    .unwrap_or_else(|e| panic!("fio JSON ({e}): {json}"));
                let job = &v["jobs"][0];
                let side = if f[2].contains("read") {
                    "read"
                } else {
                    "write"
                };
                let bw = job[side]["bw_bytes"].as_f64().unwrap_or(0.0) / 1048576.0;
                let iops = job[side]["iops"].as_f64().unwrap_or(0.0);
                fio.entry((f[1].to_owned(), f[2].to_owned()))
                    .or_default()
                    .push((bw, iops));
            }
            Some("mapping") if f.len() > 2 => {
                mappings.insert(f[1].to_owned(), f[2..].join(" ").replace('_', " "));
            }
            _ if l.ends_with("cpu-flags") => {
                flags = l.trim_end_matches("cpu-flags").trim().to_owned()
            }
            _ => {}
        }
    }

    let mut s = String::new();
    writeln!(s, "## Tenant volume: erase time and I/O (issue 6)\n").unwrap();
    writeln!(
        s,
        "`cargo bench -p leasehold-tests --bench volume` (one VM run, all figures below)\n"
    )
    .unwrap();
    s.push_str(&leasehold_tests::markdown::machine());
    let g: Vec<&str> = guest.lines().collect();
    writeln!(
        s,
        "- guest: QEMU lab node, kernel {}, {} vCPU, CPU {} (CPU flags seen: {}); the host has no usable KVM here (kvm_pvm), so the guest CPU is emulated (TCG): AES runs as emulated instructions\n",
        g.first().unwrap_or(&"?"),
        g.get(1).unwrap_or(&"?"),
        g.get(2).map_or("?", |x| x.trim()),
        if flags.is_empty() { "no aes" } else { &flags }
    )
    .unwrap();
    writeln!(s, "### Erase (destroying tenant rotation), median of 3\n").unwrap();
    writeln!(s, "Sparse file on the node's root disk behind a loop device. \"erased\" is from the request reaching the agent to the old data being unrecoverable: dm-crypt's copy of the key wiped (an `error` table swapped in; unmount and removal follow in the remake), then the TPM secret of the old key generation undefined (`erased_ms` in the signed receipt; polkit check included). \"call\" is `tenantctl rotate` end to end, i.e. to the signed receipt: also the new key pair (pre-generated when the agent has a standby) and the receipt signed. \"remake after the reply\" is the new empty volume (new disk key unsealed, new mapping, mkfs, mount), from the reply until `volume status` says open (polled every 50 ms); the next command waits for it, the caller does not.\n").unwrap();
    writeln!(
        s,
        "| device size | erased | call (to signed receipt) | remake after the reply |"
    )
    .unwrap();
    writeln!(s, "|---|---|---|---|").unwrap();
    for size in ["1G", "64G", "1T"] {
        if let Some([call, remake, erased]) = erase.get(size) {
            writeln!(
                s,
                "| {size} | {:.0} ms | {:.0} ms | {:.0} ms |",
                median(erased.clone()),
                median(call.clone()),
                median(remake.clone())
            )
            .unwrap();
        }
    }
    let rounds = fio.values().map(Vec::len).max().unwrap_or(0);
    writeln!(
        s,
        "\n### fio on the 512 MiB virtio disk (direct I/O, libaio, 10 s each, median of {rounds} interleaved rounds)\n"
    )
    .unwrap();
    for (c, m) in &mappings {
        writeln!(s, "- {c}: {m} (cipher, key size, sector size)").unwrap();
    }
    writeln!(s).unwrap();
    writeln!(s, "| device | seq read 1M (MiB/s) | seq write 1M (MiB/s) | rand read 4k (IOPS) | rand write 4k (IOPS) | rand read vs raw | rand write vs raw |").unwrap();
    writeln!(s, "|---|---|---|---|---|---|---|").unwrap();
    let get = |c: &str, j: &str| {
        let v = fio.get(&(c.to_owned(), j.to_owned()));
        let m = |f: fn(&(f64, f64)) -> f64| v.map_or(0.0, |v| median(v.iter().map(f).collect()));
        (m(|x| x.0), m(|x| x.1))
    };
    for (c, label) in [
        ("raw", "raw disk"),
        ("cryptsetup-plain", "cryptsetup plain, defaults"),
        (
            "cryptsetup-xts",
            "cryptsetup plain, Leasehold's cipher settings",
        ),
        (
            "leasehold-bypass-false",
            "Leasehold (kernel workqueues, default)",
        ),
        (
            "leasehold-bypass-true",
            "Leasehold (no_read/no_write_workqueue)",
        ),
    ] {
        writeln!(
            s,
            "| {label} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            get(c, "seqread").0,
            get(c, "seqwrite").0,
            get(c, "randread").1,
            get(c, "randwrite").1,
            get(c, "randread").1 / get("raw", "randread").1,
            get(c, "randwrite").1 / get("raw", "randwrite").1,
        )
        .unwrap();
    }
    print!("{s}");
    leasehold_tests::markdown::write_section("volume", &s);
}
