//! Test helper: makes raw D-Bus calls to agentd as whichever user runs it and
//! prints `OK ...` or `ERR <error name> <message>`. Also measures latency.
//!
//! lh-dbus-probe <scenario>          one call (see `scenario`)
//! lh-dbus-probe bench <n> <clients> [landlord|tenant]
//!                                   NodeInfo latency, JSON on stdout
//! lh-dbus-probe peers <n> <target> one-host AddPeers/RemovePeers latency, JSON
//! lh-dbus-probe burst <n>           n concurrent landlord calls, outcomes as JSON
//! lh-dbus-probe starts <n> <engine> [settle_ms]
//!                                   n engine starts on one connection, each
//!                                   "t0 NS" and waited until it exited (its
//!                                   status first read settle_ms after the
//!                                   call: not while the start is measured)
//! lh-dbus-probe units <n> <scope|service> <marker> <out>
//!                                   systemd's start of the marker from one
//!                                   kept connection (as root), the like of
//!                                   `starts`: per unit "t0 NS" just before
//!                                   StartTransientUnit; the marker prints
//!                                   "first NS" (into `out`: this stdout's
//!                                   file)
//! lh-dbus-probe listen [monitor]    eavesdrop on the bus (and try BecomeMonitor);
//!                                   prints READY, then one line per message,
//!                                   until the sentinel signal (DONE)
//! lh-dbus-probe flood <conns> <per_conn> <big_mib>
//!                                   waves of conns x per_conn concurrent calls
//!                                   and two big messages at a time, until
//!                                   stdin closes; prints READY, then JSON

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

async fn engines(
    conn: &zbus::Connection,
) -> leasehold_dbus_api::tenant_engines::TenantEnginesProxy<'_> {
    leasehold_dbus_api::tenant_engines::TenantEnginesProxy::new(conn)
        .await
        .unwrap()
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
        "engine-logs-zero" => report(engines(&conn).await.logs("web", 0, 0).await),
        "engine-logs-too-many" => report(engines(&conn).await.logs("web", 0, 10_001).await),
        "engine-logs-bad-name" => report(engines(&conn).await.logs("../x", 0, 10).await),
        "engine-events-zero" => report(engines(&conn).await.events(0, 0).await),
        "engine-events-too-many" => report(engines(&conn).await.events(0, 1001).await),
        other => panic!("unknown scenario {other}"),
    }
}

/// Asks polkitd whether this caller may use the landlord's read action.
async fn polkit_self(
    conn: &zbus::Connection,
    by_pid: bool,
) -> Result<(), leasehold_dbus_api::Error> {
    use std::collections::HashMap;
    use zbus::Variant;
    let subject: (&str, HashMap<&str, Variant>) = if by_pid {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Field 22 (start time), counted after the command name.
        let start: u64 = stat
            .rsplit(") ")
            .next()
            .and_then(|s| s.split_whitespace().nth(19)?.parse().ok())
            .unwrap_or(0);
        (
            "unix-process",
            [
                ("pid", Variant::from(std::process::id())),
                ("start-time", Variant::from(start)),
                ("uid", Variant::from(nix::unistd::getuid().as_raw() as i32)),
            ]
            .into(),
        )
    } else {
        let me = conn
            .unique_name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        ("system-bus-name", [("name", Variant::from(me))].into())
    };
    let details: HashMap<&str, &str> = HashMap::new();
    conn.call_method(
        Some("org.freedesktop.PolicyKit1"),
        "/org/freedesktop/PolicyKit1/Authority",
        Some("org.freedesktop.PolicyKit1.Authority"),
        "CheckAuthorization",
        &(subject, "org.leasehold.landlord.read", details, 0u32, ""),
    )
    .await
    .map(|_| ())
    .map_err(leasehold_dbus_api::Error::ZBus)
}

async fn bench(n: usize, clients: usize, target: &'static str) {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let conn = zbus::Connection::system().await.expect("system bus");
            let l = LandlordProxy::new(&conn).await.unwrap();
            let t = TenantProxy::new(&conn).await.unwrap();
            let bus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
            let call = || async {
                match target {
                    "tenant" => t.node_info().await.map(|_| ()),
                    // The bus's own round trip: the floor under every agent call.
                    "bus" => bus
                        .get_id()
                        .await
                        .map(|_| ())
                        .map_err(|e| leasehold_dbus_api::Error::ZBus(e.into())),
                    // polkitd alone, for this connection (the agent's
                    // subject) or for this process (pid, start time, uid).
                    "polkit" => polkit_self(&conn, false).await,
                    "polkit-pid" => polkit_self(&conn, true).await,
                    // The bus and the agent's connection, no polkit.
                    "ping" => conn
                        .call_method(
                            Some(BUS_NAME),
                            OBJECT_PATH,
                            Some("org.freedesktop.DBus.Peer"),
                            "Ping",
                            &(),
                        )
                        .await
                        .map(|_| ())
                        .map_err(leasehold_dbus_api::Error::ZBus),
                    // What one CLI run costs: a connection of its own
                    // (nothing of an earlier call reused), then NodeInfo.
                    "landlord-fresh" => {
                        let c = zbus::Connection::system()
                            .await
                            .map_err(leasehold_dbus_api::Error::ZBus)?;
                        LandlordProxy::new(&c)
                            .await
                            .map_err(leasehold_dbus_api::Error::ZBus)?
                            .node_info()
                            .await
                            .map(|_| ())
                    }
                    _ => l.node_info().await.map(|_| ()),
                }
            };
            call().await.expect("warm-up call");
            let mut v = Vec::with_capacity(n);
            let mut errors = Vec::new();
            for _ in 0..n {
                let start = Instant::now();
                match call().await {
                    Ok(()) => v.push(start.elapsed()),
                    Err(e) => errors.push(format!("{}: {}", e.name(), e.message())),
                }
            }
            (v, errors)
        }));
    }
    let start = Instant::now();
    let mut all: Vec<Duration> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for t in tasks {
        let (v, e) = t.await.unwrap();
        all.extend(v);
        errors.extend(e);
    }
    let wall = start.elapsed();
    all.sort();
    // Nearest-rank percentile over the sorted samples.
    let pct = |per_mille: usize| {
        all.get(all.len().saturating_sub(1) * per_mille / 1000)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    errors.truncate(20);
    println!(
        "{}",
        serde_json::json!({
            "calls": all.len(),
            "clients": clients,
            "p50_ms": pct(500),
            "p99_ms": pct(990),
            "max_ms": pct(1000),
            "throughput_per_s": all.len() as f64 / wall.as_secs_f64(),
            "errors": errors,
        })
    );
}

/// One-peer changes through the agent: `n` times AddPeers then RemovePeers
/// of one host (10.250.x.y) on `target`, each call timed (call → reply;
/// the agent replies after the kernel has the change). JSON on stdout.
async fn peers(n: usize, target: &str) {
    let conn = zbus::Connection::system().await.expect("system bus");
    let l = LandlordProxy::new(&conn).await.unwrap();
    l.node_info().await.expect("warm-up call");
    let (mut add, mut remove) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut errors = Vec::new();
    let mut changes = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..n {
        let host = format!("10.250.{}.{}", (i / 250) % 250, i % 250 + 1);
        for (adding, v) in [(true, &mut add), (false, &mut remove)] {
            let start = Instant::now();
            let r = if adding {
                l.add_peers(target, &[host.as_str()]).await
            } else {
                l.remove_peers(target, &[host.as_str()]).await
            };
            let d = start.elapsed();
            match r {
                Ok(info) => {
                    v.push(d);
                    *changes.entry(info.change.unwrap_or_default()).or_default() += 1;
                }
                Err(e) => errors.push(format!("{}: {}", e.name(), e.message())),
            }
        }
    }
    // Each call's time in call order (µs), to pair with the agent's log.
    let order = |v: &[Duration]| -> Vec<u64> {
        v.iter()
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .collect()
    };
    let (add_us, remove_us) = (order(&add), order(&remove));
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        let pct = |per_mille: usize| {
            v.get(v.len().saturating_sub(1) * per_mille / 1000)
                .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
        };
        serde_json::json!({"calls": v.len(), "min_ms": pct(0), "p50_ms": pct(500), "p99_ms": pct(990), "max_ms": pct(1000)})
    };
    errors.truncate(20);
    println!(
        "{}",
        serde_json::json!({
            "add": stats(&mut add),
            "remove": stats(&mut remove),
            "add_us": add_us,
            "remove_us": remove_us,
            "changes": changes,
            "errors": errors,
        })
    );
}

/// systemd's own start from one kept connection (the engines VM bench, as
/// root), what `systemd-run` does after its own start: `scope` — a child
/// already running waits on its stdin, StartTransientUnit names its pid,
/// and once the job is removed the child execs the marker (as
/// `systemd-run --scope` execs after its job); `service` — the unit's
/// ExecStart is the marker, its output appended to `out`. Per unit "t0 NS"
/// (wall clock just before the call) on stdout; one unit at a time.
async fn units(n: u32, kind: &str, marker: &str, out: &str) {
    use futures_util::StreamExt;
    use std::io::Write;
    use zbus::OwnedObjectPath;
    use zbus::Variant;
    const SD: &str = "org.freedesktop.systemd1";
    const SD_PATH: &str = "/org/freedesktop/systemd1";
    const SD_MGR: &str = "org.freedesktop.systemd1.Manager";
    let conn = zbus::Connection::system().await.expect("system bus");
    conn.call_method(Some(SD), SD_PATH, Some(SD_MGR), "Subscribe", &())
        .await
        .expect("Subscribe");
    conn.call_method(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        Some("org.freedesktop.DBus"),
        "AddMatch",
        &("type='signal',interface='org.freedesktop.systemd1.Manager',member='JobRemoved'",),
    )
    .await
    .expect("AddMatch");
    let mut stream = zbus::MessageStream::from(&conn);
    for i in 0..n {
        let unit = format!("lhb-{kind}-{}-{i}.{kind}", std::process::id());
        let mut props: Vec<(&str, Variant)> = vec![("CollectMode", "inactive-or-failed".into())];
        let mut child = None;
        if kind == "scope" {
            let c = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("read _ && exec {marker} engine"))
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("sh");
            props.push(("PIDs", Variant::from(vec![c.id()])));
            child = Some(c);
        } else {
            let exec = vec![(
                marker.to_owned(),
                vec![marker.to_owned(), "engine".to_owned()],
                false,
            )];
            props.push(("ExecStart", Variant::from(exec)));
            props.push(("StandardOutputFileToAppend", Variant::from(out)));
        }
        let aux: Vec<(&str, Vec<(&str, Variant)>)> = Vec::new();
        let t0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        println!("t0 {t0}");
        let r = conn
            .call_method(
                Some(SD),
                SD_PATH,
                Some(SD_MGR),
                "StartTransientUnit",
                &(unit.as_str(), "fail", props, aux),
            )
            .await;
        let job: OwnedObjectPath = match r.and_then(|m| m.body().deserialize()) {
            Ok(j) => j,
            Err(e) => {
                println!("fail {unit}: {e}");
                continue;
            }
        };
        // The job's end (a service's is its start; a scope's its set-up).
        let t = Instant::now();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .map(|m| m.and_then(Result::ok))
        {
            if m.header()
                .member()
                .is_some_and(|x| x.as_str() == "JobRemoved")
                && m.body()
                    .deserialize::<(u32, OwnedObjectPath, String, String)>()
                    .is_ok_and(|b| b.1 == job)
            {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                println!("fail {unit}: no JobRemoved");
                break;
            }
        }
        if let Some(mut c) = child {
            if let Some(mut w) = c.stdin.take() {
                let _ = w.write_all(b"go\n");
            }
            let _ = c.wait();
        } else {
            // The marker exits at once; let its unit go before the next.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Interfaces of the sentinel signal that ends `listen`.
const SENTINEL_INTERFACE: &str = "net.lhtest.Sentinel";

async fn listen(try_monitor: bool) {
    use futures_util::StreamExt;
    use std::io::Write;
    let conn = zbus::Connection::system().await.expect("system bus");
    let mut stream = zbus::MessageStream::from(&conn);
    // Eavesdrop on everything the bus lets us see.
    for rule in [
        "eavesdrop='true'",
        "type='signal',eavesdrop='true'",
        "type='signal'",
    ] {
        let r = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "AddMatch",
                &(rule,),
            )
            .await;
        match r {
            Ok(_) => println!("MATCH {rule} OK"),
            Err(zbus::Error::MethodError(name, msg, _)) => println!(
                "MATCH {rule} ERR {} {}",
                name.as_str(),
                msg.unwrap_or_default()
            ),
            Err(e) => println!("MATCH {rule} ERR {e}"),
        }
    }
    // A second connection tries to become a monitor; if the bus allowed it,
    // whatever it sees is printed too.
    if try_monitor {
        try_become_monitor().await;
    }
    println!("READY");
    std::io::stdout().flush().unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(Ok(m)) = stream.next().await {
            let hdr = m.header();
            if hdr.interface().map(|i| i.as_str()) == Some(SENTINEL_INTERFACE) {
                return;
            }
            println!("MSG {}", describe(&m));
        }
    })
    .await;
    match ended {
        Ok(()) => println!("DONE"),
        Err(_) => println!("TIMEOUT"),
    }
}

async fn try_become_monitor() {
    use futures_util::StreamExt;
    let monitor = zbus::Connection::system().await.expect("system bus");
    let r = monitor
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus.Monitoring"),
            "BecomeMonitor",
            &(Vec::<&str>::new(), 0u32),
        )
        .await;
    match r {
        Ok(_) => {
            println!("MONITOR OK");
            let mut mstream = zbus::MessageStream::from(&monitor);
            tokio::spawn(async move {
                while let Some(Ok(m)) = mstream.next().await {
                    println!("MON {}", describe(&m));
                }
            });
        }
        Err(zbus::Error::MethodError(name, _, _)) => println!("MONITOR ERR {}", name.as_str()),
        Err(zbus::Error::FDO(e)) => println!("MONITOR ERR {}", e.name()),
        Err(e) => println!("MONITOR ERR {e}"),
    }
}

/// `<type> <sender> <interface> <member>` of a message.
fn describe(m: &zbus::Message) -> String {
    let h = m.header();
    format!(
        "{:?} {} {} {}",
        h.message_type(),
        h.sender().map_or("-".into(), |s| s.to_string()),
        h.interface().map_or("-".into(), |s| s.to_string()),
        h.member().map_or("-".into(), |s| s.to_string()),
    )
}

/// `n` concurrent landlord NodeInfo calls on one connection; per outcome
/// the count and the slowest answer.
async fn burst(n: usize) {
    use std::collections::BTreeMap;
    let conn = zbus::Connection::system().await.expect("system bus");
    let mut calls = Vec::with_capacity(n);
    for _ in 0..n {
        let c = conn.clone();
        calls.push(tokio::spawn(async move {
            let start = Instant::now();
            let r = c
                .call_method(
                    Some(BUS_NAME),
                    OBJECT_PATH,
                    Some(LANDLORD_INTERFACE),
                    "NodeInfo",
                    &(),
                )
                .await;
            let k = match r {
                Ok(_) => "ok".to_owned(),
                Err(zbus::Error::MethodError(name, _, _)) => name.as_str().to_owned(),
                Err(zbus::Error::FDO(e)) => e.name().to_string(),
                Err(e) => format!("other: {e}"),
            };
            (k, start.elapsed())
        }));
    }
    let mut out: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for c in calls {
        let (k, d) = c.await.unwrap();
        let e = out.entry(k).or_insert((0, 0.0));
        e.0 += 1;
        e.1 = e.1.max(d.as_secs_f64() * 1e3);
    }
    let json: serde_json::Map<String, serde_json::Value> = out
        .into_iter()
        .map(|(k, (n, max))| (k, serde_json::json!({"count": n, "max_ms": max})))
        .collect();
    println!("{}", serde_json::Value::Object(json));
}

async fn flood(conns: usize, per_conn: usize, big_mib: usize) {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut cs = Vec::with_capacity(conns);
    for _ in 0..conns {
        cs.push(zbus::Connection::system().await.expect("system bus"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let record = {
        let results = results.clone();
        move |r: zbus::Result<zbus::Message>| {
            let k = match r {
                Ok(_) => "ok".to_owned(),
                Err(zbus::Error::MethodError(name, _, _)) => name.as_str().to_owned(),
                Err(zbus::Error::FDO(e)) => e.name().to_string(),
                Err(e) => format!("other: {e}"),
            };
            *results.lock().unwrap().entry(k).or_insert(0) += 1;
        }
    };
    let call = |c: zbus::Connection, iface: &'static str, method: &'static str| async move {
        c.call_method(Some(BUS_NAME), OBJECT_PATH, Some(iface), method, &())
            .await
    };
    let started = Instant::now();
    // Big messages: two at a time, back to back, on their own connections.
    let mut big = Vec::new();
    for _ in 0..2 {
        let stop = stop.clone();
        let record = record.clone();
        big.push(tokio::spawn(async move {
            let c = zbus::Connection::system().await.expect("system bus");
            let payload = vec![0x5au8; big_mib << 20];
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .call_method(
                        Some(BUS_NAME),
                        OBJECT_PATH,
                        Some(TENANT_INTERFACE),
                        "PutSecret",
                        &("flood", &payload),
                    )
                    .await;
                record(r);
            }
        }));
    }
    let waves_task = {
        let stop = stop.clone();
        let record = record.clone();
        tokio::spawn(async move {
            let mut first = true;
            let mut waves = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut wave = Vec::with_capacity(conns * per_conn);
                for c in &cs {
                    for i in 0..per_conn {
                        let iface = if i % 2 == 0 {
                            LANDLORD_INTERFACE
                        } else {
                            TENANT_INTERFACE
                        };
                        wave.push(tokio::spawn(call(c.clone(), iface, "NodeInfo")));
                    }
                }
                if first {
                    println!("READY");
                    first = false;
                }
                for w in wave {
                    record(w.await.unwrap());
                }
                waves += 1;
            }
            waves
        })
    };
    // Until the test closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let waves = waves_task.await.unwrap();
    for b in big {
        b.await.unwrap();
    }
    let results = results.lock().unwrap().clone();
    println!(
        "{}",
        serde_json::json!({
            "waves": waves,
            "calls_per_wave": conns * per_conn,
            "big_message_mib": big_mib,
            "seconds": started.elapsed().as_secs_f64(),
            "results": results,
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
    // The first message of each error name, so a failure says which step
    // (e.g. which authorization stage timed out).
    let mut first = std::collections::BTreeMap::<String, String>::new();
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
            Err(e) => {
                *errors.entry(e.name().to_string()).or_default() += 1;
                first
                    .entry(e.name().to_string())
                    .or_insert_with(|| e.to_string().chars().take(300).collect());
            }
        }
    }
    lat.sort();
    let pct = |per_mille: usize| lat[(lat.len() - 1) * per_mille / 1000].as_secs_f64() * 1e3;
    println!(
        "{}",
        serde_json::json!({
            "op": op, "calls": n, "ok": ok, "receipts": receipts, "warnings": warnings,
            "errors": errors, "first_errors": first, "p50_ms": pct(500), "p99_ms": pct(990), "max_ms": pct(1000),
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
            let target = match args.get(3).map(String::as_str) {
                Some("tenant") => "tenant",
                Some("bus") => "bus",
                Some("ping") => "ping",
                Some("polkit") => "polkit",
                Some("polkit-pid") => "polkit-pid",
                Some("landlord-fresh") => "landlord-fresh",
                None | Some("landlord") => "landlord",
                Some(t) => panic!(
                    "bench target {t:?}: landlord | tenant | bus | ping | polkit | polkit-pid | landlord-fresh"
                ),
            };
            rt.block_on(bench(n, c, target));
        }
        Some("peers") => rt.block_on(peers(args[1].parse().unwrap(), &args[2])),
        Some("listen") => rt.block_on(listen(args.get(1).map(String::as_str) == Some("monitor"))),
        Some("burst") => rt.block_on(burst(args[1].parse().unwrap())),
        Some("flood") => {
            let conns = args[1].parse().unwrap();
            let per_conn = args[2].parse().unwrap();
            let big_mib = args[3].parse().unwrap();
            rt.block_on(flood(conns, per_conn, big_mib));
        }
        // One connection kept: a NodeInfo call per line read on stdin,
        // answered "ok" or "err MESSAGE" on stdout (tests that need the
        // same connection across a change they make meanwhile).
        Some("repl") => rt.block_on(async {
            use std::io::BufRead;
            let conn = zbus::Connection::system().await.expect("system bus");
            let l = LandlordProxy::new(&conn).await.unwrap();
            println!("READY");
            for line in std::io::stdin().lock().lines() {
                if line.is_err() {
                    break;
                }
                match l.node_info().await {
                    Ok(_) => println!("ok"),
                    Err(e) => println!("err {}", e.to_string().replace('\n', " ")),
                }
            }
        }),
        // Engine start latency from one kept connection (the engines VM
        // bench): per start "t0 NS" (wall clock just before the call), then
        // the call, then the engine's status polled every 50 ms (at most
        // 60 s) until it has exited (its spec: exit at once, never restart).
        Some("starts") => rt.block_on(async {
            let n: u32 = args[1].parse().unwrap();
            let name = &args[2];
            let settle: u64 = args.get(3).map_or(0, |s| s.parse().unwrap());
            let conn = zbus::Connection::system().await.expect("system bus");
            let e = engines(&conn).await;
            for _ in 0..n {
                let t0 = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos();
                if let Err(err) = e.start(name).await {
                    println!("fail {err}");
                    continue;
                }
                println!("t0 {t0}");
                let t = Instant::now();
                tokio::time::sleep(Duration::from_millis(settle)).await;
                loop {
                    let st = e.status(name).await.map(|i| i.state);
                    if st.as_ref().is_ok_and(|s| s.as_deref() == Some("exited")) {
                        break;
                    }
                    if t.elapsed() > Duration::from_secs(60) {
                        println!("fail not exited: {st:?}");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }),
        Some("units") => rt.block_on(units(
            args[1].parse().unwrap(),
            &args[2],
            &args[3],
            &args[4],
        )),
        Some("hammer") => {
            let secs = args[2].parse().unwrap();
            rt.block_on(hammer(&args[1], secs));
        }
        Some(s) => rt.block_on(scenario(s)),
        None => panic!("usage: lh-dbus-probe <scenario> | bench <n> <clients> [tenant|bus|ping|polkit|polkit-pid] | listen | flood <conns> <per_conn> <big_mib>"),
    }
}
