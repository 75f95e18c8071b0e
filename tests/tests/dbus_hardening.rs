//! T1: who may reach the agent and at what cost (issue 12, points 8 and 12),
//! on the private bus with the shipped policy and a real polkitd:
//! signals reach only their roles, a frozen polkitd makes calls fail closed
//! within the bound, the per-user in-flight bound answers `Busy`, and an
//! outsider's flood neither reaches the agent nor disturbs its users.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use leasehold_tests::matrix::{BOUNDARY_DOC, SIGNALS};
use leasehold_tests::{bin, sh, Lab, LabOptions, Who};

const L: &str = "org.leasehold.Landlord1";
const T: &str = "org.leasehold.Tenant1";
/// docs/dbus.md: authorization answers within 5 s (agentd.toml
/// `[dbus] auth_timeout_ms`, default 5000).
const AUTH_TIMEOUT: Duration = Duration::from_millis(5000);
/// docs/dbus.md: calls one user may have in flight.
const MAX_IN_FLIGHT: u64 = 16;

/// A listener (`lh-dbus-probe listen`) running as one user.
struct Listener {
    who: Who,
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    head: Vec<String>,
}

fn listen(lab: &Lab, who: Who) -> Listener {
    let mut cmd = lab.command(who, &bin("lh-dbus-probe"));
    cmd.arg("listen");
    if who != Who::Root {
        cmd.arg("monitor");
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "listener {who:?} ended early: {head:?}"
        );
        // Its match rules are in place: the listener's readiness event.
        if line.trim() == "READY" {
            break;
        }
        head.push(line.trim().to_owned());
    }
    Listener {
        who,
        child,
        out,
        head,
    }
}

impl Listener {
    /// Lines after READY, up to the sentinel (DONE).
    fn finish(mut self) -> (Vec<String>, Vec<String>) {
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "listener {:?}: {st}", self.who);
        let lines: Vec<String> = rest.lines().map(str::to_owned).collect();
        assert_eq!(
            lines.last().map(String::as_str),
            Some("DONE"),
            "listener {:?} saw no sentinel: {lines:?}",
            self.who
        );
        (self.head, lines)
    }
}

/// A network namespace of the test's own, removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("lh-{tag}-{}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn dbus_signals_reach_only_their_roles() {
    signals_reach_only_their_roles(false);
}

/// The same with dbus-broker as the bus (docs/dbus.md recommends it).
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-broker, polkitd, agentd on swtpm in a netns)"]
fn dbus_signals_reach_only_their_roles_on_dbus_broker() {
    signals_reach_only_their_roles(true);
}

fn signals_reach_only_their_roles(dbus_broker: bool) {
    let ns = Netns::new(if dbus_broker { "sigb" } else { "sig" });
    // Health collected every 2 s, so the drift below is in a periodic
    // report (Health1.FaultsChanged) within the test.
    let lab = Lab::start_in_with_options(
        &ns.0,
        LabOptions {
            dbus_broker,
            agent_config: Some("[health]\ninterval_secs = 2\n".into()),
            ..LabOptions::default()
        },
    );
    lab.run(Who::Landlord, "landlordctl", &["assign", "acme"])
        .ok();
    let bdoc = lab.write_file("boundary.toml", BOUNDARY_DOC.as_bytes());
    lab.run(
        Who::Landlord,
        "landlordctl",
        &["boundary", "set", bdoc.to_str().unwrap()],
    )
    .ok();
    let agent = lab.block_on(async {
        let dbus = zbus::fdo::DBusProxy::new(lab.conn()).await.unwrap();
        dbus.get_name_owner(leasehold_dbus_api::BUS_NAME.try_into().unwrap())
            .await
            .unwrap()
            .to_string()
    });
    let listeners: Vec<Listener> = Who::ALL.into_iter().map(|w| listen(&lab, w)).collect();

    // Landlord key change (Landlord1.KeysChanged), tenant key change (both
    // interfaces), a boundary restore (Landlord1.BoundaryRestored).
    lab.run(Who::Landlord, "landlordctl", &["rekey"]).ok();
    lab.run(Who::Tenant, "tenantctl", &["rekey"]).ok();
    // The restore also makes the next periodic report's faults change
    // (Health1.FaultsChanged, a boundary drift warning).
    let (restored, faults) = lab.block_on(async {
        let p = leasehold_dbus_api::LandlordProxy::new(lab.conn())
            .await
            .unwrap();
        let h = leasehold_dbus_api::HealthProxy::new(lab.conn())
            .await
            .unwrap();
        let mut sig = p.receive_boundary_restored().await.unwrap();
        let mut changed = h.receive_faults_changed().await.unwrap();
        sh(&["ip", "netns", "exec", &ns.0, "nft", "flush", "ruleset"]);
        let restored = tokio::time::timeout(Duration::from_secs(60), sig.next())
            .await
            .expect("BoundaryRestored within 60 s")
            .unwrap()
            .args()
            .unwrap()
            .what()
            .to_owned();
        let faults = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let s = changed.next().await.unwrap();
                let faults = s.args().unwrap().faults().to_owned();
                if faults.contains("\"boundary\"") {
                    return faults;
                }
            }
        })
        .await
        .expect("FaultsChanged with the drift within 60 s");
        (restored, faults)
    });
    assert!(restored.contains("missing"), "{restored}");
    assert!(faults.contains("behind the agent's back"), "{faults}");
    // A boundary set with a 2 s revert deadline and not confirmed
    // (Landlord1.BoundaryReverted).
    let reverted = lab.block_on(async {
        let p = leasehold_dbus_api::LandlordProxy::new(lab.conn())
            .await
            .unwrap();
        let mut sig = p.receive_boundary_reverted().await.unwrap();
        lab.run(
            Who::Landlord,
            "landlordctl",
            &[
                "boundary",
                "set",
                bdoc.to_str().unwrap(),
                "--confirm-within",
                "2s",
            ],
        )
        .ok();
        tokio::time::timeout(Duration::from_secs(30), sig.next())
            .await
            .expect("BoundaryReverted within 30 s")
            .unwrap()
            .args()
            .unwrap()
            .what()
            .to_owned()
    });
    assert!(reverted.contains("not confirmed"), "{reverted}");
    // The agent's signals went out before the calls were answered (and the
    // restore was seen above); the bus delivers in order, so the sentinel
    // comes last for every listener.
    lab.block_on(async {
        lab.conn()
            .emit_signal(
                None::<&str>,
                "/net/lhtest",
                "net.lhtest.Sentinel",
                "Done",
                &(),
            )
            .await
            .unwrap();
    });

    let mut failures = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let who = l.who;
        let (head, lines) = l.finish();
        // A plain signal subscription is in place for everyone. Eavesdropping
        // rules are root-only on dbus-daemon 1.14 (AccessDenied) and do not
        // exist on dbus-broker (MatchRuleInvalid, root included: it offers
        // only BecomeMonitor); where a bus accepts them, its receive rules
        // still apply to eavesdroppers.
        if !head.contains(&"MATCH type='signal' OK".to_owned()) {
            failures.push(format!("{who:?}: no signal match rule: {head:?}"));
        }
        for rule in ["eavesdrop='true'", "type='signal',eavesdrop='true'"] {
            let added = head.contains(&format!("MATCH {rule} OK"));
            let refused = head.iter().any(|l| {
                l.starts_with(&format!(
                    "MATCH {rule} ERR org.freedesktop.DBus.Error.AccessDenied"
                ))
            });
            let unknown = head.iter().any(|l| {
                l.starts_with(&format!(
                    "MATCH {rule} ERR org.freedesktop.DBus.Error.MatchRuleInvalid"
                ))
            });
            if !(added || (refused && who != Who::Root) || (unknown && dbus_broker)) {
                failures.push(format!("{who:?}: match rule {rule}: {head:?}"));
            }
            eprintln!(
                "{who:?}: eavesdropping rule {rule}: {}",
                if added {
                    "added"
                } else if unknown {
                    "not known to the bus"
                } else {
                    "refused by the bus"
                }
            );
        }
        if who != Who::Root
            && !head.contains(&"MONITOR ERR org.freedesktop.DBus.Error.AccessDenied".to_owned())
        {
            failures.push(format!("{who:?}: BecomeMonitor not refused: {head:?}"));
        }
        // (interface, member) of everything the agent sent this listener or
        // that claims an agent interface.
        let seen: BTreeSet<(String, String)> = lines
            .iter()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let [_msg, _kind, sender, iface, member] = f[..] else {
                    return None;
                };
                (sender == agent || iface == L || iface == T)
                    .then(|| (iface.to_owned(), member.to_owned()))
            })
            .collect();
        for s in SIGNALS {
            let got = seen.contains(&(s.interface.to_owned(), s.member.to_owned()));
            if got != s.receive[i] {
                failures.push(format!(
                    "{who:?}: {}.{} received {got}, expected {}",
                    s.interface, s.member, s.receive[i]
                ));
            }
        }
        let known: BTreeSet<(String, String)> = SIGNALS
            .iter()
            .map(|s| (s.interface.to_owned(), s.member.to_owned()))
            .collect();
        for extra in seen.difference(&known) {
            failures.push(format!(
                "{who:?}: unexpected message from the agent {extra:?}"
            ));
        }
        if who == Who::Outsider && !seen.is_empty() {
            failures.push(format!("outsider saw the agent's traffic: {seen:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// SIGCONTs polkitd when dropped, so a failed assertion leaves no frozen
/// process behind (the lab's SIGTERM would not end a stopped one).
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        sh(&["kill", "-STOP", &pid.to_string()]);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn dbus_polkit_frozen_fails_closed_within_bound_and_busy_beyond_in_flight() {
    let lab = Lab::start();
    lab.run(Who::Landlord, "landlordctl", &["info"]).ok();
    let frozen = Frozen::new(lab.polkit_pid().expect("polkitd running"));

    let start = Instant::now();
    let r = lab.run(Who::Landlord, "landlordctl", &["info"]);
    let took = start.elapsed();
    eprintln!("frozen polkitd: landlord call refused after {took:?}");
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains("polkit did not answer within 5000 ms")
            && r.stderr.contains("fail closed"),
        "{r:?}"
    );
    // Refused by the deadline (not earlier for another reason), and within
    // the bound plus a margin for the CLI's start and the bus.
    assert!(
        took >= AUTH_TIMEOUT && took < AUTH_TIMEOUT + Duration::from_secs(2),
        "{took:?}"
    );

    // 3 x the in-flight bound at once: the first 16 wait on polkit (and time
    // out), the rest are answered Busy at once.
    let n = 3 * MAX_IN_FLIGHT;
    let r = lab
        .run(Who::Landlord, "lh-dbus-probe", &["burst", &n.to_string()])
        .ok();
    let v = r.json();
    eprintln!("burst of {n} with polkitd frozen: {v}");
    let count = |k: &str| v[k]["count"].as_u64().unwrap_or(0);
    assert_eq!(count("org.leasehold.Error.Busy"), n - MAX_IN_FLIGHT, "{v}");
    assert_eq!(
        count("org.leasehold.Error.NotAuthorized"),
        MAX_IN_FLIGHT,
        "{v}"
    );
    let busy_max = v["org.leasehold.Error.Busy"]["max_ms"].as_f64().unwrap();
    assert!(busy_max < 1000.0, "Busy is immediate: {busy_max} ms");
    assert!(lab.agent_log().contains("too many in flight"));

    // polkitd thawed: calls work again, the agent was never restarted.
    drop(frozen);
    lab.run(Who::Landlord, "landlordctl", &["info"]).ok();
    lab.run(Who::Landlord, "landlordctl", &["assign", "acme"])
        .ok();
    lab.run(Who::Tenant, "tenantctl", &["info"]).ok();
    // The permits of the timed-out calls were released: a full burst passes.
    let r = lab
        .run(
            Who::Landlord,
            "lh-dbus-probe",
            &["burst", &MAX_IN_FLIGHT.to_string()],
        )
        .ok();
    assert_eq!(
        r.json()["ok"]["count"].as_u64(),
        Some(MAX_IN_FLIGHT),
        "{r:?}"
    );
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn dbus_outsider_flood_does_not_reach_the_agent_nor_slow_its_users() {
    outsider_flood(false);
}

/// The same with dbus-broker as the bus (docs/dbus.md recommends it).
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-broker, polkitd, agentd on swtpm in a netns)"]
fn dbus_outsider_flood_on_dbus_broker() {
    outsider_flood(true);
}

fn outsider_flood(dbus_broker: bool) {
    let mut lab = Lab::start_with_options(LabOptions {
        dbus_broker,
        ..LabOptions::default()
    });
    lab.run(Who::Landlord, "landlordctl", &["assign", "acme"])
        .ok();
    let run = leasehold_tests::flood::during_outsider_flood(
        &lab,
        300,
        leasehold_tests::flood::Flood::DEFAULT,
    );
    let tenant = run.tenant.as_ref().unwrap();
    eprintln!(
        "landlord: {}\ntenant: {tenant}\nflood: {}\nagent RSS: {:?} KiB",
        run.landlord, run.flood, run.agent_rss_kib
    );
    for (who, v) in [("landlord", &run.landlord), ("tenant", tenant)] {
        assert_eq!(
            v["errors"].as_array().map(Vec::len),
            Some(0),
            "{who}'s calls failed during the flood: {v}"
        );
        assert_eq!(v["calls"].as_u64(), Some(300), "{v}");
        // A debug build on a shared 2-core host: the bound here catches a
        // blocked agent; the bench records the release figures.
        let p99 = v["p99_ms"].as_f64().unwrap();
        assert!(p99 < 1000.0, "{who} p99 {p99} ms during the flood");
    }
    // Every outsider call was refused by the bus: none reached the agent.
    let results = run.flood["results"].as_object().unwrap();
    let refused = results
        .get("org.freedesktop.DBus.Error.AccessDenied")
        .and_then(|n| n.as_u64())
        .unwrap_or(0);
    let total: u64 = results.values().filter_map(|n| n.as_u64()).sum();
    assert!(refused >= 2000, "{}", run.flood);
    assert_eq!(refused, total, "{}", run.flood);
    assert!(
        !lab.agent_log().contains("lhtest-outsider")
            && !lab
                .agent_log()
                .contains(&format!("uid={}", Who::Outsider.user().unwrap().uid)),
        "the agent saw the outsider"
    );
    let (before, after) = run.agent_rss_kib;
    assert!(
        after < before + 64 * 1024,
        "agent RSS grew from {before} to {after} KiB"
    );
    assert!(lab.agent_alive());
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn dbus_member_flood_is_bounded_per_user() {
    // A member of leasehold-tenant passes the bus policy: its flood reaches
    // the agent, which answers Busy beyond 16 calls in flight; the landlord
    // is not disturbed.
    let mut lab = Lab::start();
    lab.run(Who::Landlord, "landlordctl", &["assign", "acme"])
        .ok();
    let run = leasehold_tests::flood::during_flood(
        &lab,
        Who::Tenant,
        300,
        leasehold_tests::flood::Flood::DEFAULT,
    );
    eprintln!(
        "landlord: {}\nflood: {}\nagent RSS: {:?} KiB",
        run.landlord, run.flood, run.agent_rss_kib
    );
    let v = &run.landlord;
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
    // The agent reads every message of the member's (the 8 MiB ones
    // included) before it can refuse it, so the tail depends on the host
    // (debug build, parallel tests: p99 0.2-1.8 s seen); the median must not
    // move and no call may come near the authorization deadline.
    let p50 = v["p50_ms"].as_f64().unwrap();
    let max = v["max_ms"].as_f64().unwrap();
    assert!(
        p50 < 100.0,
        "landlord p50 {p50} ms during the tenant's flood"
    );
    assert!(
        max < AUTH_TIMEOUT.as_secs_f64() * 1000.0,
        "landlord max {max} ms during the tenant's flood"
    );
    let results = run.flood["results"].as_object().unwrap();
    let n = |k: &str| results.get(k).and_then(|n| n.as_u64()).unwrap_or(0);
    assert!(n("org.leasehold.Error.Busy") > 0, "{}", run.flood);
    // Everything else is an answer of the agent's, never a bus limit.
    for k in results.keys() {
        assert!(
            k.starts_with("org.leasehold.Error.") || k == "ok",
            "unexpected outcome {k}: {}",
            run.flood
        );
    }
    let (before, after) = run.agent_rss_kib;
    assert!(
        after < before + 128 * 1024,
        "agent RSS grew from {before} to {after} KiB"
    );
    assert!(lab.agent_alive());
}

/// What the agent's process subject relies on (agentd/src/auth.rs,
/// `subject_of`): polkitd decides a `unix-process` subject by the uid sent
/// with it, and refuses one whose start time is not the process's (the pid
/// was reused after the agent looked).
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn polkit_process_subject_is_bound_to_its_start_time() {
    use std::collections::HashMap;
    use zbus::Variant as Value;
    let lab = Lab::start();
    let mut sleeper = leasehold_tests::user_command(Who::Landlord, std::path::Path::new("sleep"))
        .arg("60")
        .spawn()
        .unwrap();
    let pid = sleeper.id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Field 22, counted after the command's closing parenthesis.
    let start: u64 = stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let uid = i32::try_from(Who::Landlord.user().unwrap().uid).unwrap();
    let ask = |start: u64| {
        lab.block_on(async {
            let mut details: HashMap<&str, Value<'_>> = HashMap::new();
            details.insert("pid", Value::U32(pid));
            details.insert("start-time", Value::U64(start));
            details.insert("uid", Value::I32(uid));
            let none: HashMap<&str, &str> = HashMap::new();
            lab.conn()
                .call_method(
                    Some("org.freedesktop.PolicyKit1"),
                    "/org/freedesktop/PolicyKit1/Authority",
                    Some("org.freedesktop.PolicyKit1.Authority"),
                    "CheckAuthorization",
                    &(
                        ("unix-process", details),
                        "org.leasehold.landlord.read",
                        none,
                        0u32,
                        "",
                    ),
                )
                .await
                .map(|m| {
                    let (authorized, _, _): (bool, bool, HashMap<String, String>) =
                        m.body().deserialize().unwrap();
                    authorized
                })
        })
    };
    assert!(matches!(ask(start), Ok(true)), "{:?}", ask(start));
    let stale = ask(start + 1);
    assert!(!matches!(stale, Ok(true)), "a stale start time: {stale:?}");
    eprintln!("stale start time: {stale:?}");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// polkit's yes is reused on the same connection for the same action and
/// details for `[dbus] auth_reuse_ms`, and only there: with polkitd frozen a
/// connection it already answered keeps working inside the window, a new
/// connection fails closed at once, and the window's end fails closed too.
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn polkit_answer_reused_per_connection_within_the_window_only() {
    let lab = Lab::start_with_options(leasehold_tests::LabOptions {
        agent_config: Some("[dbus]\nauth_timeout_ms = 1000\nauth_reuse_ms = 3000\n".into()),
        ..Default::default()
    });
    let proxy = lab.block_on(async {
        leasehold_dbus_api::LandlordProxy::new(lab.conn())
            .await
            .unwrap()
    });
    lab.block_on(proxy.node_info()).expect("asked polkit: yes");
    let granted = Instant::now();
    let frozen = Frozen::new(lab.polkit_pid().expect("polkitd running"));
    lab.block_on(proxy.node_info())
        .expect("the same connection, same action: polkit's yes reused");
    // Another connection (a new CLI process) is asked about afresh.
    let r = lab.run(Who::Root, "landlordctl", &["info"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("polkit did not answer"), "{r:?}");
    // Past the window the first connection is asked again: fails closed.
    std::thread::sleep(Duration::from_millis(3100).saturating_sub(granted.elapsed()));
    let e = lab.block_on(proxy.node_info()).unwrap_err().to_string();
    assert!(e.contains("polkit did not answer"), "{e}");
    drop(frozen);
    lab.block_on(proxy.node_info()).expect("polkit back");
}

/// A kept polkit answer does not outlive a policy change: once a rules file
/// says no, the next call on the same connection is refused, long before
/// the reuse window ends. (A landlord member: polkitd always says yes to
/// root, whatever the rules.)
#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn polkit_answer_forgotten_when_the_policy_changes() {
    const WINDOW: Duration = Duration::from_secs(10);
    let lab = Lab::start_with_options(LabOptions {
        agent_config: Some(format!("[dbus]\nauth_reuse_ms = {}\n", WINDOW.as_millis())),
        ..Default::default()
    });
    let mut repl = lab
        .command(Who::Landlord, &bin("lh-dbus-probe"))
        .arg("repl")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = repl.stdin.take().unwrap();
    let mut from = BufReader::new(repl.stdout.take().unwrap());
    let mut ready = String::new();
    from.read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "READY");
    let mut call = || {
        use std::io::Write;
        writeln!(to, "call").unwrap();
        let mut line = String::new();
        from.read_line(&mut line).unwrap();
        line.trim().to_owned()
    };
    assert_eq!(call(), "ok", "asked polkit: yes");
    let granted = Instant::now();
    assert_eq!(call(), "ok", "the same connection: polkit's yes reused");
    // polkitd says Changed once it has reloaded the rules: the event the
    // test waits for (the agent gets the same signal). Subscribed before
    // the file is written, so it is this change's signal.
    let mut changed = lab.block_on(async {
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface("org.freedesktop.PolicyKit1.Authority")
            .member("Changed")
            .build()
            .unwrap();
        zbus::MessageStream::for_match_rule(rule, lab.conn(), None)
            .await
            .unwrap()
    });
    let name = Who::Landlord.user().unwrap().name;
    let rules = lab.path("polkit-rules").join("00-lhtest-deny.rules");
    std::fs::write(
        &rules,
        format!(
            "polkit.addRule(function(action, subject) {{\n\
             if (action.id.indexOf(\"org.leasehold.\") === 0 && subject.user === \"{name}\") return polkit.Result.NO;\n\
             return polkit.Result.NOT_HANDLED;\n}});\n"
        ),
    )
    .unwrap();
    sh(&["chown", "polkitd:root", rules.to_str().unwrap()]);
    lab.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), changed.next())
            .await
            .expect("polkitd did not say Changed after a rules file appeared")
    });
    // The agent forgets its kept answers when it sees the same signal; it
    // may see it a moment after the test: each call below is the check.
    let refused = loop {
        let r = call();
        if r != "ok" {
            break r;
        }
        assert!(
            granted.elapsed() < WINDOW / 2,
            "still answered from the kept yes {:?} after the grant; agent log:\n{}",
            granted.elapsed(),
            lab.agent_log()
        );
    };
    assert!(refused.contains("not authorized"), "{refused}");
    assert!(
        lab.agent_log()
            .contains("polkit policy changed: kept polkit answers forgotten"),
        "{}",
        lab.agent_log()
    );
    // Closing its stdin ends the probe.
    drop(to);
    repl.wait().unwrap();
}
