//! Test helper: makes raw D-Bus calls to agentd as whichever user runs it and
//! prints `OK ...` or `ERR <error name> <message>`. Also measures latency.
//!
//! lh-dbus-probe <scenario>          one call (see `scenario`)
//! lh-dbus-probe bench <n> <clients> NodeInfo latency, JSON on stdout

use std::time::{Duration, Instant};

use leasehold_dbus_api::{
    LandlordProxy, TenantProxy, BUS_NAME, LANDLORD_INTERFACE, OBJECT_PATH, TENANT_INTERFACE,
};
use zbus::DBusError;

fn report<T: std::fmt::Debug>(r: Result<T, leasehold_dbus_api::Error>) {
    match r {
        Ok(v) => println!("OK {v:?}"),
        Err(leasehold_dbus_api::Error::ZBus(zbus::Error::MethodError(name, msg, _))) => {
            println!("ERR {} {}", name.as_str(), msg.unwrap_or_default())
        }
        Err(leasehold_dbus_api::Error::ZBus(zbus::Error::FDO(e))) => {
            println!("ERR {} {}", e.name(), e.description().unwrap_or_default())
        }
        Err(e) => println!("ERR {} {}", e.name(), e.message()),
    }
}

async fn raw(
    conn: &zbus::Connection,
    iface: &str,
    method: &str,
    body: &(impl serde::Serialize + zbus::DynamicType),
) {
    let r = conn
        .call_method(Some(BUS_NAME), OBJECT_PATH, Some(iface), method, body)
        .await
        .map(|_| ())
        .map_err(leasehold_dbus_api::Error::ZBus);
    report(r);
}

async fn scenario(name: &str) {
    let conn = zbus::Connection::system().await.expect("system bus");
    let l = LandlordProxy::new(&conn).await.unwrap();
    let t = TenantProxy::new(&conn).await.unwrap();
    let envelope_for_ut = || async {
        let pem = t.get_public_key().await.unwrap().pem.unwrap();
        leasehold_tpm::envelope::seal(&pem, b"s3cret").unwrap()
    };
    match name {
        "landlord-info" => report(l.node_info().await),
        "tenant-info" => report(t.node_info().await),
        "tenant-pubkey" => report(t.get_public_key().await),
        "assign-empty-name" => report(l.assign_tenant("", "", true).await),
        "assign-bad-name" => report(l.assign_tenant("../etc", "", true).await),
        "assign-bad-console-key" => {
            report(l.assign_tenant("acme", "-----BEGIN nonsense", true).await)
        }
        "pubkey-unknown-role" => report(l.get_public_key("martian").await),
        "assign-wrong-types" => raw(&conn, LANDLORD_INTERFACE, "AssignTenant", &(42i32,)).await,
        "info-extra-args" => raw(&conn, TENANT_INTERFACE, "NodeInfo", &("surprise",)).await,
        "put-empty-name" => report(t.put_secret("", &envelope_for_ut().await).await),
        "put-garbage" => report(t.put_secret("db", b"not an envelope").await),
        "put-oversized" => report(t.put_secret("db", &vec![0u8; 2 << 20]).await),
        "put-good" => report(t.put_secret("db", &envelope_for_ut().await).await),
        "put-tampered-key" => {
            // A flipped bit in the RSA-OAEP wrapped content key.
            let mut e = envelope_for_ut().await;
            e[100] ^= 0x01;
            report(t.put_secret("db", &e).await)
        }
        "put-tampered-payload" => {
            let mut e = envelope_for_ut().await;
            let n = e.len();
            e[n - 1] ^= 0x01;
            report(t.put_secret("db", &e).await)
        }
        "rm-unknown" => report(t.remove_secret("nope").await),
        other => panic!("unknown scenario {other}"),
    }
}

async fn bench(n: usize, clients: usize) {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let conn = zbus::Connection::system().await.expect("system bus");
            let l = LandlordProxy::new(&conn).await.unwrap();
            l.node_info().await.unwrap(); // warm-up
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                l.node_info().await.unwrap();
                v.push(t.elapsed());
            }
            v
        }));
    }
    let start = Instant::now();
    let mut all: Vec<Duration> = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = start.elapsed();
    all.sort();
    // Nearest-rank percentile over the sorted samples.
    let pct = |per_mille: usize| all[(all.len() - 1) * per_mille / 1000].as_secs_f64() * 1e3;
    println!(
        "{}",
        serde_json::json!({
            "calls": all.len(),
            "clients": clients,
            "p50_ms": pct(500),
            "p99_ms": pct(990),
            "max_ms": pct(1000),
            "throughput_per_s": all.len() as f64 / wall.as_secs_f64(),
        })
    );
}

/// Makes `op` calls back to back for `secs` seconds on one connection;
/// prints JSON: calls, ok, errors by name, receipts seen, latency.
async fn hammer(op: &str, secs: u64) {
    let conn = zbus::Connection::system().await.expect("system bus");
    let l = LandlordProxy::new(&conn).await.unwrap();
    let t = TenantProxy::new(&conn).await.unwrap();
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut ok, mut receipts, mut warnings) = (0u64, 0u64, 0u64);
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    let mut lat = Vec::new();
    let mut n = 0u64;
    while Instant::now() < end {
        n += 1;
        let t0 = Instant::now();
        let r: Result<Option<leasehold_dbus_api::KeyChange>, leasehold_dbus_api::Error> = match op {
            "landlord-rotate" => l.rotate_keys(true).await.map(Some),
            "landlord-rekey" => l.rekey_keys().await.map(Some),
            "tenant-rotate" => t.rotate_keys(true).await.map(Some),
            "tenant-rekey" => t.rekey_keys().await.map(Some),
            "tenant-put" => match t.get_public_key().await {
                Ok(k) => {
                    let env = leasehold_tpm::envelope::seal(&k.pem.unwrap_or_default(), b"v")
                        .expect("seal");
                    t.put_secret(&format!("s{}", n % 4), &env)
                        .await
                        .map(|_| None)
                }
                Err(e) => Err(e),
            },
            "landlord-info" => l.node_info().await.map(|_| None),
            "tenant-info" => t.node_info().await.map(|_| None),
            other => panic!("unknown hammer op {other}"),
        };
        lat.push(t0.elapsed());
        match r {
            Ok(c) => {
                ok += 1;
                if let Some(c) = c {
                    if c.receipt.is_some() {
                        receipts += 1;
                    }
                    if c.warnings.is_some_and(|w| !w.is_empty()) {
                        warnings += 1;
                    }
                }
            }
            Err(e) => *errors.entry(e.name().to_string()).or_default() += 1,
        }
    }
    lat.sort();
    let pct = |per_mille: usize| lat[(lat.len() - 1) * per_mille / 1000].as_secs_f64() * 1e3;
    println!(
        "{}",
        serde_json::json!({
            "op": op, "calls": n, "ok": ok, "receipts": receipts, "warnings": warnings,
            "errors": errors, "p50_ms": pct(500), "p99_ms": pct(990), "max_ms": pct(1000),
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match args.first().map(String::as_str) {
        Some("bench") => {
            let n = args[1].parse().unwrap();
            let c = args[2].parse().unwrap();
            rt.block_on(bench(n, c));
        }
        Some("hammer") => {
            let secs = args[2].parse().unwrap();
            rt.block_on(hammer(&args[1], secs));
        }
        Some(s) => rt.block_on(scenario(s)),
        None => panic!("usage: lh-dbus-probe <scenario> | bench <n> <clients>"),
    }
}
