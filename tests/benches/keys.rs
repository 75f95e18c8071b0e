//! Timings of the key hierarchy on swtpm, written to docs/benchmarks.md.
//! Run: `cargo bench -p leasehold-tests --bench keys` (needs swtpm installed).
//! Set LEASEHOLD_BENCH_OUT to write elsewhere.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use leasehold_tests::markdown::cmd;
use leasehold_tpm::chain::{derive_disk_key, Link};
use leasehold_tpm::envelope;
use leasehold_tpm::swtpm::Swtpm;
use leasehold_tpm::{Confirm, KeyHierarchy, Role, SymmetricKey};

struct Stat {
    name: &'static str,
    n: usize,
    median: Duration,
    p90: Duration,
    max: Duration,
}

fn measure(name: &'static str, n: usize, mut f: impl FnMut()) -> Stat {
    f(); // warm-up
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    Stat {
        name,
        n,
        median: v[n / 2],
        p90: v[(n * 9) / 10],
        max: v[n - 1],
    }
}

fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

fn main() {
    std::env::set_var("TSS2_LOG", "all+none");
    let tmp = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&tmp.path().join("tpm")).expect("start swtpm");
    let (mut h, _) = KeyHierarchy::open(&swtpm.key_config(tmp.path().join("state"))).unwrap();
    h.assign_tenant(Role::Landlord, "acme", Confirm::No)
        .unwrap();
    let env = envelope::seal(&h.public_key(Role::Tenant).unwrap().pem, &[1u8; 4096]).unwrap();
    let pem = h.public_key(Role::Tenant).unwrap().pem;
    let kl = SymmetricKey::from_bytes([1; 32]);
    let kt = SymmetricKey::from_bytes([2; 32]);

    let mut stats = vec![
        measure("key pair creation (RSA-2048 in TPM)", 20, || {
            h.bench_create_key_pair().unwrap()
        }),
        measure("seal 4 KiB envelope (no TPM)", 200, || {
            envelope::seal(&pem, &[1u8; 4096]).unwrap();
        }),
        measure("open 4 KiB envelope (RSA-OAEP in TPM)", 100, || {
            h.open_envelope(Role::Tenant, &env).unwrap();
        }),
        measure("unseal KT", 100, || {
            h.symmetric_key(Role::Tenant).unwrap();
        }),
        measure("disk-key derivation, chain only (no TPM)", 1000, || {
            let links = [
                Link {
                    label: "landlord",
                    key_generation: 1,
                    key: &kl,
                },
                Link {
                    label: "tenant",
                    key_generation: 1,
                    key: &kt,
                },
            ];
            derive_disk_key(b"node", &links).unwrap();
        }),
        measure("disk key (unseal KL + KT, derive)", 100, || {
            h.disk_key().unwrap();
        }),
    ];
    stats.push(measure("routine tenant re-key (full, fsync'd)", 20, || {
        h.rekey(Role::Tenant, Role::Tenant).unwrap();
    }));
    stats.push(measure(
        "destroying tenant rotation (full, fsync'd)",
        20,
        || {
            h.rotate(Role::Tenant, Role::Tenant, Confirm::DestroyData)
                .unwrap();
        },
    ));
    stats.push(measure(
        "destroying landlord rotation (full, fsync'd)",
        20,
        || {
            h.rotate(Role::Landlord, Role::Landlord, Confirm::DestroyData)
                .unwrap();
        },
    ));
    h.shutdown().unwrap();
    swtpm.stop().unwrap();

    let mut out = String::new();
    writeln!(out, "## Key hierarchy on swtpm\n").unwrap();
    writeln!(out, "`cargo bench -p leasehold-tests --bench keys`\n").unwrap();
    out.push_str(&leasehold_tests::markdown::machine());
    writeln!(
        out,
        "- TPM: {} (over TCP on loopback; salted HMAC session with parameter encryption)",
        cmd("swtpm", &["--version"])
    )
    .unwrap();
    writeln!(out, "- build: release profile (`cargo bench`)\n").unwrap();
    writeln!(out, "| operation | n | median | p90 | max |").unwrap();
    writeln!(out, "|---|---|---|---|---|").unwrap();
    for s in &stats {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            s.name,
            s.n,
            fmt(s.median),
            fmt(s.p90),
            fmt(s.max)
        )
        .unwrap();
    }
    writeln!(
        out,
        "\nRSA key generation dominates rotation and varies widely (prime search). A hardware TPM is\n\
         typically slower than swtpm for RSA key generation (seconds are common); re-measure on the target."
    )
    .unwrap();
    print!("{out}");
    leasehold_tests::markdown::write_section("keys", &out);
}
