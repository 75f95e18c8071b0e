//! Cost of the metrics endpoint at a 1 s scrape interval, and the agent's
//! idle memory with health on. Two agents side by side in one run, same
//! configuration (health on with the defaults, real `/sys`, a cluster
//! boundary set, `[metrics] socket`): one is scraped every second, the
//! other not; each one's CPU (utime + stime from `/proc/PID/stat`) over
//! the same window. Run as root, by hand (not by scripts/test):
//! `cargo bench -p leasehold-tests --bench metrics_scrape --profile dev`
//! (LEASEHOLD_BENCH_SECS sets the window, default 60).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use leasehold_tests::matrix::BOUNDARY_DOC;
use leasehold_tests::{Lab, LabOptions, Who};

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is 3rd.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn clock_ticks_per_sec() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

/// One scrape: (bytes of the body, samples).
fn scrape(socket: &Path) -> (usize, usize) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    (
        body.len(),
        body.lines().filter(|l| !l.starts_with('#')).count(),
    )
}

fn start() -> (Lab, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("lh-mbench-")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("m.sock");
    let lab = Lab::start_with_options(LabOptions {
        agent_config: Some(format!("[metrics]\nsocket = \"{}\"\n", socket.display())),
        ..LabOptions::default()
    });
    let doc = lab.write_file("boundary.toml", BOUNDARY_DOC.as_bytes());
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "set", doc.to_str().unwrap()],
    )
    .ok();
    (lab, socket, dir)
}

fn main() {
    let secs: u64 = std::env::var("LEASEHOLD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let (scraped, s_sock, _sdir) = start();
    let (idle, i_sock, _idir) = start();
    let (sp, ip) = (scraped.agent_pid().unwrap(), idle.agent_pid().unwrap());
    // Both have taken their first periodic report and settled.
    let (bytes, samples) = scrape(&s_sock);
    scrape(&i_sock);
    std::thread::sleep(Duration::from_secs(5));
    let rss_before = (rss_kib(sp), rss_kib(ip));
    let (s0, i0) = (cpu_ticks(sp), cpu_ticks(ip));
    let t0 = Instant::now();
    let mut lat = Vec::new();
    for k in 1..=secs {
        let t = Instant::now();
        scrape(&s_sock);
        lat.push(t.elapsed());
        // Pacing, not waiting for an event: one scrape a second.
        let next = t0 + Duration::from_secs(k);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let (s1, i1) = (cpu_ticks(sp), cpu_ticks(ip));
    let rss_after = (rss_kib(sp), rss_kib(ip));
    lat.sort();
    let hz = clock_ticks_per_sec() as f64;
    let ms = |ticks: u64| ticks as f64 * 1000.0 / hz;
    let (sc, ic) = (ms(s1 - s0), ms(i1 - i0));
    let per = (sc - ic) / secs as f64;

    let mut out = String::new();
    writeln!(out, "## Metrics scrape cost and idle memory\n").unwrap();
    writeln!(
        out,
        "`cargo bench -p leasehold-tests --bench metrics_scrape --profile dev`\n"
    )
    .unwrap();
    out.push_str(&leasehold_tests::markdown::machine());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    writeln!(out, "- load average at the end: {}", load.join(" ")).unwrap();
    writeln!(
        out,
        "- stack: two agents side by side on the host harness (agentd --dev on swtpm, not TCG), same \
         configuration: health on with the defaults (real `/sys`, periodic report every 60 s), a cluster \
         boundary set (deny counters read at every scrape), `[metrics] socket`; one scraped once a second \
         over the socket for {secs} s, the other not; CPU = utime + stime from `/proc/PID/stat` over the \
         same window ({wall:.1} s); debug build\n"
    )
    .unwrap();
    writeln!(
        out,
        "| agent | CPU over the window | share of one core | RSS before → after |"
    )
    .unwrap();
    writeln!(out, "|---|---|---|---|").unwrap();
    for (name, c, (b, a)) in [
        ("scraped every 1 s", sc, (rss_before.0, rss_after.0)),
        ("not scraped", ic, (rss_before.1, rss_after.1)),
    ] {
        writeln!(
            out,
            "| {name} | {c:.0} ms | {:.2} % | {:.1} → {:.1} MiB |",
            c / wall / 10.0,
            b as f64 / 1024.0,
            a as f64 / 1024.0
        )
        .unwrap();
    }
    let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
    writeln!(
        out,
        "\nPer scrape: {per:.2} ms of agent CPU (the difference over {secs} scrapes); answer {bytes} bytes, \
         {samples} samples; latency p50 {:.2?}, p99 {:.2?}, max {:.2?} (client side, connect to last byte).",
        pct(50),
        pct(99),
        lat[lat.len() - 1]
    )
    .unwrap();
    print!("{out}");
    leasehold_tests::markdown::write_section("metrics", &out);
}
