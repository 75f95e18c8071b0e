//! Issue 15, point 14: docs/json.md is the schema of both CLIs' `--json`
//! output, and these tests hold the code to it. A shape changed without the
//! document (a field added, renamed, removed or retyped; a command added)
//! fails here.
//!
//! - every (visible) command of both CLIs is in the document's table (T0);
//! - the CLIs' output functions, fed with every field set and with none,
//!   print exactly the documented fields and types (T0);
//! - every command that this host can run prints, against the harness Lab
//!   (real bus, polkitd, agentd on swtpm, the test users), what the
//!   document says; errors print the documented error object (T1).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use clap::CommandFactory;
use leasehold_cli::{boundary, health, output, shapes, tenant, CliError};
use leasehold_dbus_api::{
    BoundaryInfo, BudgetInfo, EngineInfo, FlowVerdict, KeyChange, NodeInfo, PublicKey, SecretInfo,
    VolumeInfo,
};
use leasehold_tests::json_doc::{JsonDoc, Ty};
use leasehold_tests::{bin, console_pem, Lab, Who};
use serde_json::{json, Value};

/// Commands the host harness cannot run to success: their output types are
/// checked by `output_functions_print_the_documented_shapes` (and the VM
/// lab runs them).
const NOT_RUN_HERE: &[(&str, &str)] = &[
    (
        "landlordctl act",
        "a server: its records are checked against this document by act_alertmanager",
    ),
    (
        "landlordctl volume init",
        "needs device-mapper and a block device",
    ),
    (
        "tenantctl actions show",
        "needs a corrective action's record: health_actions checks its document with verify-receipt",
    ),
    ("tenantctl engine deploy", "needs the tenant volume"),
    ("tenantctl engine start", "needs a deployed engine"),
    ("tenantctl engine stop", "needs a deployed engine"),
    ("tenantctl engine restart", "needs a deployed engine"),
    ("tenantctl engine reload", "needs a deployed engine"),
    ("tenantctl engine status", "needs a deployed engine"),
    ("tenantctl engine rm", "needs a deployed engine"),
    ("tenantctl engine logs", "needs a deployed engine"),
    ("tenantctl engine upload", "needs the tenant volume"),
    (
        "tenantctl engine upload-abort",
        "needs an upload in progress (the tenant volume)",
    ),
];

fn leaves(prefix: &str, c: &clap::Command, out: &mut BTreeSet<String>) {
    let subs: Vec<&clap::Command> = c
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .collect();
    if subs.is_empty() {
        out.insert(prefix.to_owned());
    }
    for s in subs {
        leaves(&format!("{prefix} {}", s.get_name()), s, out);
    }
}

#[test]
fn json_doc_lists_every_command_of_both_clis() {
    let doc = JsonDoc::load();
    let mut commands = BTreeSet::new();
    leaves(
        "landlordctl",
        &leasehold_cli::landlord::Args::command(),
        &mut commands,
    );
    leaves(
        "tenantctl",
        &<leasehold_cli::tenant::Args>::command(),
        &mut commands,
    );
    let documented: BTreeSet<String> = doc.commands.keys().cloned().collect();
    assert_eq!(
        commands.difference(&documented).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "commands without a row in docs/json.md's Commands table"
    );
    assert_eq!(
        documented.difference(&commands).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "rows of docs/json.md's Commands table that are no command"
    );
}

#[track_caller]
fn check(doc: &JsonDoc, command: &str, v: &Value) {
    if let Err(e) = doc.check_command(command, v) {
        panic!("{e}");
    }
}

const CLUSTER: &str = r#"{"action":"reject","groups":{"office":["10.1.0.0/16"]},"allow":[{"name":"web","peers":["10.0.0.0/8","@office"],"direction":"in","protocols":[{"proto":"tcp","ports":[80,"443","8000-8080"]},{"proto":"icmp"}]}],"failsafe":[{"name":"ssh","peers":["10.0.0.0/8"],"direction":"in","protocols":[{"proto":"tcp","ports":[22]}]}]}"#;

#[test]
fn output_functions_print_the_documented_shapes() {
    let doc = JsonDoc::load();
    let s = |x: &str| Some(x.to_owned());
    let full = NodeInfo {
        node_id: s("ab"),
        tpm_kind: s("software"),
        landlord_generation: Some(1),
        landlord_fingerprint: s("ff"),
        assigned: Some(true),
        tenant_name: s("acme"),
        tenant_generation: Some(2),
        tenant_key_generation: Some(2),
        tenant_fingerprint: s("ee"),
        consoles: Some(vec!["ops ab12".into()]),
        api_version: Some(1),
        running: s("rotate"),
        tpm_health: s("failed"),
        tpm_error: s("lost"),
        agent_version: s("0.1.0"),
        engine_count: Some(3),
    };
    for i in [full, NodeInfo::default()] {
        check(&doc, "landlordctl info", &output::node_info_json(&i));
    }
    let key = PublicKey {
        role: s("tenant"),
        generation: Some(2),
        pem: s("PEM"),
        fingerprint: s("ee"),
    };
    for k in [key, PublicKey::default()] {
        check(&doc, "tenantctl pubkey", &output::public_key_json(&k));
    }
    let change = KeyChange {
        kind: s("rotate"),
        role: s("tenant"),
        generation_before: Some(1),
        generation_after: Some(2),
        data_destroyed: Some(true),
        fingerprint: s("ee"),
        receipt: s(
            r#"{"format":2,"change":"rotate","key_generations_before":[["landlord",1]],"signer":"aa"}"#,
        ),
        receipt_signature: s("c2ln"),
        warnings: Some(vec!["the volume was failed".into()]),
    };
    let v = output::change_json(&change);
    assert!(v["receipt"].is_object(), "{v}");
    check(&doc, "tenantctl rotate", &v);
    check(
        &doc,
        "landlordctl release",
        &output::change_json(&KeyChange::default()),
    );
    let vol = VolumeInfo {
        state: s("open"),
        device: s("/dev/vdb"),
        size: Some(1),
        used: Some(1),
        total: Some(1),
        mount: s("/m"),
        filesystem: s("ext4"),
        mapping: s("aes"),
        generations: s("landlord 1, tenant 2"),
        created: Some(1),
        made: Some(1),
        made_by: s("initialized"),
        event: s("opened"),
        error: s("e"),
        next: s("n"),
        progress: s("p"),
    };
    for v in [vol, VolumeInfo::default()] {
        check(&doc, "landlordctl volume status", &output::volume_json(&v));
    }
    let budget = BudgetInfo {
        cpu_max: s("200000 100000"),
        cpu_weight: Some(100),
        memory_max: Some(1 << 30),
        pids_max: Some(100),
        io_weight: Some(50),
        written: Some(false),
        write_error: s("no controllers"),
        engines_above: Some(1),
        engines: Some(2),
        engines_running: Some(1),
        cpu_usage_usec: Some(1),
        memory_current: Some(1),
        pids_current: Some(1),
        oom_kills: Some(0),
        io_read_bytes: Some(1),
        io_write_bytes: Some(1),
        io_reads: Some(1),
        io_writes: Some(1),
        usage_error: s("unreadable"),
        throttle_cpu_percent: Some(50),
        throttled_cpu_max: s("100000 100000"),
        throttled_since: Some(1_764_790_000),
    };
    for v in [budget, BudgetInfo::default()] {
        for c in [
            "landlordctl budget set",
            "landlordctl budget clear",
            "landlordctl budget show",
        ] {
            check(&doc, c, &leasehold_cli::budget::budget_json(&v));
        }
    }
    let secret = SecretInfo {
        name: s("db"),
        size: Some(3),
        stored_at: Some(1),
    };
    check(
        &doc,
        "tenantctl secret put",
        &output::secret_change_json(&secret, false),
    );
    check(
        &doc,
        "tenantctl secret rm",
        &output::secret_change_json(&SecretInfo::default(), true),
    );
    check(
        &doc,
        "tenantctl secret list",
        &output::secrets_json(&[secret, SecretInfo::default()]),
    );
    let listing = BoundaryInfo {
        cluster: s(CLUSTER),
        sub: s(r#"{"allow":[{"name":"web","peers":["10.0.0.0/8"]}]}"#),
        effective: s(r#"[{"name":"web.1","peers":["10.0.0.0/8"],"direction":"both"}]"#),
        failsafe: Some(vec!["ssh: in 10.0.0.0/8 tcp 22".into()]),
        enforced: Some(true),
        elements: Some(3),
        change: s("full"),
        cut: Some(vec!["entry \"web\": in tcp ports 9000 with 172.16.0.0/12 is not allowed by the cluster boundary".into()]),
        warnings: Some(vec!["w".into()]),
        peers_changed: Some(1),
        last_drift: s("table missing"),
        drift_count: Some(1),
        last_drift_at: Some(1),
        drift_unrepaired: s("x"),
        revert_at: Some(1),
    };
    for l in [listing, BoundaryInfo::default()] {
        let v = boundary::info_json(&l).unwrap();
        check(&doc, "landlordctl boundary show", &v);
        check(&doc, "tenantctl boundary show", &v);
    }
    let changes = json!({"added": ["a"], "removed": [], "changed": [
        {"name": "web", "peers_added": ["10.0.0.1"], "peers_removed": [], "direction": ["in", "both"],
         "protocols": ["tcp 80", "all protocols"]}]});
    let groups = json!({"added": [], "removed": [], "changed": [
        {"name": "office", "members_added": [], "members_removed": ["10.1.0.0/16"]}]});
    let cluster_check = json!({
        "valid": true, "enforced_before": true, "entries": changes, "failsafe": changes,
        "groups": groups, "denies_everything": false, "warnings": [], "action": ["drop", "reject"],
        "newly_denied": ["entry \"web\": in tcp 80 from 10.0.0.0/8"], "newly_denied_count": 1,
        "newly_allowed": [], "newly_allowed_count": 0,
    });
    check(
        &doc,
        "landlordctl boundary check",
        &shapes::check_json(cluster_check).unwrap(),
    );
    let sub_check = json!({
        "valid": true, "entries": changes, "groups": groups, "denies_everything": false,
        "fits": false, "wider": ["entry \"web\": in/out udp 53 to ::/0 (and 3 more)"], "wider_count": 4, "wider_count_capped": false,
        "newly_denied_note": "not computed", "newly_allowed_note": "not computed",
    });
    check(
        &doc,
        "tenantctl boundary check",
        &shapes::check_json(sub_check).unwrap(),
    );
    for v in [
        FlowVerdict {
            allowed: Some(true),
            failsafe: s("ssh"),
            cluster: s("web"),
            sub: s(""),
            reason: s("r"),
        },
        FlowVerdict::default(),
    ] {
        check(
            &doc,
            "landlordctl boundary explain",
            &boundary::verdict_json(&v),
        );
    }
    let engine = EngineInfo {
        name: s("web"),
        image: s("web.tar"),
        state: s("running"),
        enabled: Some(true),
        pid: Some(7),
        started_at: Some(1),
        restarts: Some(0),
        last_exit: s("exit code 1"),
        notes: Some(vec!["n".into()]),
        probes: Some(vec![
            (
                "http 8080 /".into(),
                1,
                "failed".into(),
                "HTTP status 503".into(),
                9,
            ),
            ("tcp 5432".into(), 0, String::new(), String::new(), 0),
        ]),
        probes_delayed: Some(3),
        landlock_abi: Some(2),
        landlock: Some("partial".into()),
        seccomp: Some(true),
    };
    for cmd in [
        "tenantctl engine deploy",
        "tenantctl engine start",
        "tenantctl engine stop",
        "tenantctl engine restart",
        "tenantctl engine reload",
        "tenantctl engine status",
    ] {
        check(&doc, cmd, &tenant::engine_json(&engine));
        check(&doc, cmd, &tenant::engine_json(&EngineInfo::default()));
    }
    check(
        &doc,
        "tenantctl engine ls",
        &json!([tenant::engine_json(&engine)]),
    );
    // One object per line: every field set (a partial piece, an event
    // with a detail) and the least (an agent note, an empty detail).
    for l in [
        (
            1_796_336_702_123,
            "out".to_owned(),
            "hello".to_owned(),
            true,
        ),
        (0, "agent".to_owned(), String::new(), false),
    ] {
        check(&doc, "tenantctl engine logs", &tenant::log_json("web", &l));
    }
    for e in [
        (
            42,
            1_796_336_702_123,
            "web".to_owned(),
            "exited".to_owned(),
            "instance 3: exit code 1".to_owned(),
        ),
        (1, 0, "web".to_owned(), "stopped".to_owned(), String::new()),
    ] {
        check(&doc, "tenantctl engine events", &tenant::event_json(&e));
    }
    // The health report as the agent serializes it, every kind of reading
    // with every optional value set and unset; `landlordctl health --json`
    // prints it as is.
    let report = serde_json::to_value(health_report()).unwrap();
    check(&doc, "landlordctl health", &report);
    let quiet = json!({"taken_at": 1, "severity": "ok", "sources": [], "faults": [],
                       "network": null});
    check(&doc, "landlordctl health", &quiet);
    // `status`'s summary of it: with a report, with one without faults,
    // and without one (refused, unavailable): one shape.
    let status_health = Ty::Named("StatusHealth".into());
    for r in [
        Ok(report),
        Ok(quiet),
        Err(leasehold_dbus_api::Error::NotAuthorized("no".into())),
        Err(leasehold_dbus_api::Error::Failed("boom".into())),
    ] {
        let (v, _, _) = health::status_part(&r);
        doc.check(&v, &status_health, "status.health").unwrap();
    }

    // attest: with and without a tenant.
    use leasehold_cli::attest::{proved_json, Proved};
    use leasehold_envelope::attest::{AttestContext, LevelKeys, QuoteClock, VerifiedQuote};
    let keys = LevelKeys {
        generation: 2,
        key_generation: 1,
        fingerprint: "ab".repeat(32),
    };
    for tenant in [Some(keys.clone()), None] {
        let p = Proved {
            quote: VerifiedQuote {
                context: AttestContext {
                    node_id: "ab".into(),
                    boot_id: "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into(),
                    landlord: keys.clone(),
                    tenant,
                },
                pcrs: vec![(0, [0; 32]), (7, [7; 32])],
                clock: QuoteClock {
                    clock: 1,
                    reset_count: 2,
                    restart_count: 3,
                    safe: true,
                    firmware_version: 4,
                },
            },
            ak_fingerprint: "cd".repeat(32),
            newly_pinned: true,
            pin_file: "known_nodes".into(),
        };
        check(&doc, "tenantctl attest", &proved_json(&p));
        check(&doc, "landlordctl attest", &proved_json(&p));
    }
    let error = Ty::Named("ErrorReply".into());
    let mut e = CliError::new(6, "invalid argument: x");
    doc.check(&e.json(), &error, "error").unwrap();
    e.dbus_error = s("org.leasehold.Error.InvalidArgument");
    doc.check(&e.json(), &error, "error").unwrap();
}

/// A report with every source's kind of readings, once with every
/// optional value and once without.
fn health_report() -> leasehold_health::Report {
    use leasehold_health::*;
    let src = |source, status, readings| SourceReport {
        source,
        status,
        deadline_ms: 2000,
        elapsed_ms: 3,
        readings,
        problems: vec![Problem {
            subject: "mc1".into(),
            message: "ce_count: not a number".into(),
        }],
    };
    let temp = |full: bool| TempSensor {
        sensor: "hwmon0/temp1".into(),
        chip: full.then(|| "coretemp".into()),
        label: full.then(|| "Package id 0".into()),
        milli_c: 41000,
        max_milli_c: full.then_some(80000),
        crit_milli_c: full.then_some(100_000),
    };
    let disk = |full: bool| DiskHealth {
        disk: "sda".into(),
        state: if full {
            DiskState::Passed
        } else {
            DiskState::Timeout
        },
        critical_warning: full.then_some(0),
        temperature_c: full.then_some(33),
        exit_status: full.then_some(0),
        message: full.then(|| "ok".into()),
    };
    let link = |full: bool| Link {
        iface: "eth0".into(),
        operstate: "up".into(),
        admin_up: full,
        carrier: full.then_some(true),
        carrier_changes: full.then_some(1),
    };
    let zone = |full: bool| ThermalZone {
        zone: "thermal_zone0".into(),
        kind: full.then(|| "acpitz".into()),
        milli_c: 40000,
        trips: if full {
            vec![Trip {
                kind: "critical".into(),
                milli_c: 105_000,
            }]
        } else {
            vec![]
        },
    };
    Report {
        taken_at: 1_764_790_000,
        severity: Severity::Critical,
        sources: vec![
            src(
                Source::Edac,
                SourceStatus::Ok,
                Some(Readings::Edac(vec![EdacMc {
                    mc: "mc0".into(),
                    corrected: 0,
                    uncorrected: 2,
                }])),
            ),
            src(
                Source::Hwmon,
                SourceStatus::Ok,
                Some(Readings::Hwmon(vec![temp(true), temp(false)])),
            ),
            src(
                Source::Thermal,
                SourceStatus::Ok,
                Some(Readings::Thermal(vec![zone(true), zone(false)])),
            ),
            src(
                Source::Block,
                SourceStatus::Ok,
                Some(Readings::Block(vec![
                    BlockIo {
                        disk: "sda".into(),
                        io_errors: Some(0),
                    },
                    BlockIo {
                        disk: "nvme0n1".into(),
                        io_errors: None,
                    },
                ])),
            ),
            src(
                Source::Smart,
                SourceStatus::Ok,
                Some(Readings::Smart(vec![disk(true), disk(false)])),
            ),
            src(
                Source::Net,
                SourceStatus::Ok,
                Some(Readings::Net(vec![link(true), link(false)])),
            ),
            src(Source::Smart, SourceStatus::Stuck, None),
            src(Source::Net, SourceStatus::Disabled, None),
            src(
                Source::Tpm,
                SourceStatus::Ok,
                Some(Readings::Tpm(vec![
                    TpmCheck {
                        answered: true,
                        error: None,
                    },
                    TpmCheck {
                        answered: false,
                        error: Some("connection refused".into()),
                    },
                ])),
            ),
            src(
                Source::Boundary,
                SourceStatus::Ok,
                Some(Readings::Boundary(vec![
                    BoundaryCheck {
                        stored: true,
                        enforced: true,
                        elements: Some(3),
                        drifts: 1,
                        last_drift_age_secs: Some(5),
                        unrepaired: Some("nft: no permission".into()),
                    },
                    BoundaryCheck {
                        stored: false,
                        enforced: false,
                        elements: None,
                        drifts: 0,
                        last_drift_age_secs: None,
                        unrepaired: None,
                    },
                ])),
            ),
            src(
                Source::Volume,
                SourceStatus::Ok,
                Some(Readings::Volume(vec![VolumeCheck {
                    state: "error".into(),
                    expected: true,
                    mounted: false,
                    error: Some("no disk key".into()),
                }])),
            ),
            src(
                Source::Engines,
                SourceStatus::Ok,
                Some(Readings::Engines(vec![EnginesCheck {
                    deployed: 3,
                    running: 1,
                    crash_looping: 1,
                    gave_up: 1,
                    restarts: 7,
                    probe_failing: 1,
                }])),
            ),
            src(Source::Tpm, SourceStatus::Stuck, None),
        ],
        faults: vec![Fault {
            severity: Severity::Critical,
            source: Source::Edac,
            subject: "mc0".into(),
            message: "2 uncorrected memory errors since boot".into(),
        }],
        network: Some(network()),
    }
}

/// The report's network part, every optional value set and unset.
fn network() -> leasehold_health::net::Network {
    use leasehold_health::net::*;
    let link = |full: bool| LinkState {
        iface: "eth0".into(),
        index: 2,
        admin_up: true,
        carrier: full,
        operstate: "up".into(),
        mtu: full.then_some(1500),
        mac: full.then(|| "52:54:00:12:34:56".into()),
    };
    let addr = |full: bool| NetAddress {
        iface: "eth0".into(),
        family: "ipv4".into(),
        address: "192.0.2.7".into(),
        prefix_len: 24,
        scope: "global".into(),
        dynamic: full,
        valid_lft_s: full.then_some(3600),
        preferred_lft_s: full.then_some(3600),
    };
    let route = |full: bool| DefaultRoute {
        family: "ipv4".into(),
        gateway: full.then(|| "192.0.2.1".into()),
        iface: full.then(|| "eth0".into()),
        metric: 1024,
        protocol: "dhcp".into(),
        table: 254,
    };
    let lease = |full: bool| Lease {
        iface: full.then(|| "eth0".into()),
        ifindex: 2,
        address: full.then(|| "192.0.2.7".into()),
        prefix_len: full.then_some(24),
        routers: vec!["192.0.2.1".into()],
        server: full.then(|| "192.0.2.1".into()),
        dns: vec!["192.0.2.1".into()],
        domain: full.then(|| "lab.example".into()),
        lifetime_s: full.then_some(3600),
        t1_s: full.then_some(1800),
        t2_s: full.then_some(3150),
        written_at: full.then_some(1_764_790_000),
    };
    let event = |full: bool| NetEvent {
        at_ms: 1_764_790_000_123,
        kind: NetEventKind::CarrierDown,
        iface: "eth0".into(),
        detail: full.then(|| "192.0.2.7/24".into()),
    };
    Network {
        watching: true,
        error: Some("rtnetlink: no buffer space".into()),
        links: vec![link(true), link(false)],
        addresses: vec![addr(true), addr(false)],
        default_routes: vec![route(true), route(false)],
        leases: vec![lease(true), lease(false)],
        recent_events: vec![event(true), event(false)],
        events_total: 2,
        resyncs: 0,
        dropped: 0,
        problems: vec![leasehold_health::Problem {
            subject: "leases".into(),
            message: "/run/systemd/netif/leases/9: no ADDRESS".into(),
        }],
    }
}

/// Runs `command` (its words after the program, then `args`) with
/// `--json` as `who`, expecting exit status `code`, and checks what it
/// printed against the document.
struct Runner<'a> {
    lab: &'a Lab,
    doc: JsonDoc,
    seen: BTreeSet<String>,
}

impl Runner<'_> {
    #[track_caller]
    fn run(&mut self, who: Who, command: &str, args: &[&str], codes: &[i32]) -> Value {
        let mut words = command.split(' ');
        let program = words.next().unwrap();
        let mut argv: Vec<&str> = vec!["--json"];
        argv.extend(words);
        argv.extend(args);
        let r = self.lab.run(who, program, &argv);
        assert!(codes.contains(&r.code), "{command} {args:?}: {r:?}");
        let v = r.json();
        check(&self.doc, command, &v);
        self.seen.insert(command.to_owned());
        v
    }

    /// A command that prints one object per line (none is fine): each
    /// line is checked.
    #[track_caller]
    fn lines(&mut self, who: Who, command: &str, args: &[&str]) -> Vec<Value> {
        let mut words = command.split(' ');
        let program = words.next().unwrap();
        let mut argv: Vec<&str> = vec!["--json"];
        argv.extend(words);
        argv.extend(args);
        let r = self.lab.run(who, program, &argv);
        assert_eq!(r.code, 0, "{command} {args:?}: {r:?}");
        let values: Vec<Value> = r
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{command}: {l:?}: {e}")))
            .collect();
        for v in &values {
            check(&self.doc, command, v);
        }
        self.seen.insert(command.to_owned());
        values
    }

    #[track_caller]
    fn ok(&mut self, who: Who, command: &str, args: &[&str]) -> Value {
        self.run(who, command, args, &[0])
    }

    /// A failure: the documented error object with the exit status.
    #[track_caller]
    fn error(&self, who: Who, program: &str, args: &[&str], code: i32) -> Value {
        let r = self.lab.run(who, program, args);
        assert_eq!(r.code, code, "{r:?}");
        let v = r.json();
        self.doc
            .check(&v, &Ty::Named("ErrorReply".into()), "error")
            .unwrap();
        assert_eq!(v["error"]["exit"], code, "{v}");
        v
    }

    /// One `monitor` line after `trigger` ran.
    fn monitor(&mut self, who: Who, program: &str, trigger: impl FnOnce(&mut Self)) {
        let mut child = self
            .lab
            .command(who, &bin(program))
            .args(["--json", "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert!(ready.starts_with("monitoring "), "{program}: {ready:?}");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        trigger(self);
        let line = rx.recv_timeout(Duration::from_secs(60));
        let _ = child.kill();
        let _ = child.wait();
        let line = line.unwrap_or_else(|e| panic!("{program} monitor: no line: {e}"));
        let v: Value = serde_json::from_str(&line).unwrap();
        let command = format!("{program} monitor");
        check(&self.doc, &command, &v);
        assert_eq!(v["event"], "KeysChanged", "{v}");
        self.seen.insert(command);
    }
}

const CLUSTER_TOML: &str = r#"action = "reject"
[groups]
office = ["10.1.0.0/16", "192.0.2.7"]
[[allow]]
name = "web"
peers = ["10.0.0.0/8", "@office"]
direction = "in"
protocols = [{ proto = "tcp", ports = [80, "443", "8000-8080"] }, { proto = "icmp" }]
[[allow]]
name = "dns"
peers = ["10.0.0.53"]
direction = "out"
protocols = [{ proto = "udp", ports = [53] }]
[[failsafe]]
name = "ssh"
peers = ["10.0.0.0/8"]
direction = "in"
protocols = [{ proto = "tcp", ports = [22] }]
"#;

/// The sub-boundary: wider than the cluster boundary (172.16/12, port 9000).
const WIDE_SUB_TOML: &str = r#"[[allow]]
name = "web"
peers = ["10.0.0.0/8", "172.16.0.0/12"]
direction = "in"
protocols = [{ proto = "tcp", ports = [80, 9000] }]
"#;

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn every_command_prints_its_documented_json() {
    let lab = Lab::start();
    let mut r = Runner {
        lab: &lab,
        doc: JsonDoc::load(),
        seen: BTreeSet::new(),
    };
    let (l, t) = (Who::Landlord, Who::Tenant);
    let pem = lab.write_file("console.pem", console_pem().as_bytes());
    let pem = pem.to_str().unwrap();
    let cluster = lab.write_file("cluster.toml", CLUSTER_TOML.as_bytes());
    let cluster = cluster.to_str().unwrap();
    // The same with "web" changed: a changed entry with protocols before
    // and after, and flows newly denied.
    let cluster2 = lab.write_file(
        "cluster2.toml",
        CLUSTER_TOML
            .replace(
                r#"protocols = [{ proto = "tcp", ports = [80, "443", "8000-8080"] }, { proto = "icmp" }]"#,
                r#"protocols = [{ proto = "tcp", ports = [443] }]"#,
            )
            .as_bytes(),
    );
    let cluster2 = cluster2.to_str().unwrap();
    let failsafe = lab.write_file(
        "failsafe.toml",
        leasehold_tests::matrix::FAILSAFE_DOC.as_bytes(),
    );
    let failsafe = failsafe.to_str().unwrap();
    let sub = lab.write_file("sub.toml", WIDE_SUB_TOML.as_bytes());
    let sub = sub.to_str().unwrap();
    let payload = lab.write_file("secret.txt", b"s3cret");
    let payload = payload.to_str().unwrap();

    // The landlord, before a tenant.
    let info = r.ok(l, "landlordctl info", &[]);
    assert_eq!(info["landlord_generation"], 1, "{info}");
    r.ok(l, "landlordctl pubkey", &[]);
    r.ok(l, "landlordctl receipt-key", &[]);
    let c = r.ok(l, "landlordctl register-console", &["ops", pem]);
    let info = r.ok(l, "landlordctl info", &[]);
    assert_eq!(info["consoles"], json!([c]), "{info}");
    r.ok(l, "landlordctl boundary check", &[cluster]);
    let b = r.ok(l, "landlordctl boundary set", &[cluster]);
    assert_eq!(
        b["cluster"]["allow"][0]["protocols"][0]["ports"],
        json!([{"from": 80, "to": 80}, {"from": 443, "to": 443}, {"from": 8000, "to": 8080}]),
        "{b}"
    );
    assert_eq!(
        b["failsafe"],
        json!([{"name": "ssh", "peers": ["10.0.0.0/8"], "direction": "in",
                "protocols": [{"proto": "tcp", "ports": [{"from": 22, "to": 22}]}]}]),
        "{b}"
    );
    let chk = r.ok(l, "landlordctl boundary check", &[cluster2]);
    assert_eq!(
        chk["entries"]["changed"][0]["protocols"][1],
        json!([{"proto": "tcp", "ports": [{"from": 443, "to": 443}]}]),
        "{chk}"
    );
    assert!(chk["newly_denied_count"].as_u64().unwrap() > 0, "{chk}");
    assert!(chk["newly_denied"][0]["entry"].is_string(), "{chk}");
    r.ok(l, "landlordctl boundary show", &[]);
    r.ok(l, "landlordctl boundary add-peer", &["web", "192.0.2.99"]);
    r.ok(
        l,
        "landlordctl boundary remove-peer",
        &["web", "192.0.2.99"],
    );
    r.ok(l, "landlordctl boundary failsafe", &[failsafe]);
    let b = r.ok(
        l,
        "landlordctl boundary set",
        &["--confirm-within", "60s", cluster],
    );
    assert!(b["revert_at"].is_u64(), "{b}");
    r.ok(l, "landlordctl boundary confirm", &[]);
    r.run(
        l,
        "landlordctl boundary explain",
        &["--peer", "10.0.0.1", "--port", "80"],
        &[0],
    );
    r.run(
        l,
        "landlordctl boundary explain",
        &["--peer", "203.0.113.1", "--port", "80"],
        &[1],
    );
    r.ok(l, "landlordctl volume status", &[]);
    r.ok(
        l,
        "landlordctl budget set",
        &["--pids-max", "4096", "--memory-max", "1G"],
    );
    let b = r.ok(l, "landlordctl budget show", &[]);
    assert_eq!(b["limits"]["pids_max"], 4096, "{b}");
    r.ok(l, "landlordctl budget clear", &[]);
    // The harness agent reads this host's real /sys: whatever it holds,
    // the report has the documented shape (exit 1 if a fault is critical
    // or stuck), and `status` carries its summary.
    let h = r.run(l, "landlordctl health", &[], &[0, 1]);
    // Six sensors, then the agent's four checks.
    assert_eq!(h["sources"].as_array().unwrap().len(), 10, "{h}");
    let st = r.run(l, "landlordctl status", &[], &[0, 1]);
    assert!(st["health"]["severity"].is_string(), "{st}");
    assert!(st["budget"]["limits"].is_object(), "{st}");
    for power in ["reboot", "poweroff", "suspend"] {
        r.ok(l, &format!("landlordctl {power}"), &[]);
    }

    // A tenant.
    r.error(t, "tenantctl", &["--json", "secret", "list"], 5);
    r.ok(l, "landlordctl assign", &["--yes", "acme"]);
    r.ok(l, "landlordctl rekey", &[]);
    r.monitor(l, "landlordctl", |r| {
        r.ok(Who::Landlord, "landlordctl rekey", &[]);
    });
    let info = r.ok(t, "tenantctl info", &[]);
    assert!(info["landlord_generation"].is_null(), "{info}");
    let ut = r.ok(t, "tenantctl pubkey", &[]);
    let ut_pem = lab.write_file("ut.pem", ut["pem"].as_str().unwrap().as_bytes());
    let ut_pem = ut_pem.to_str().unwrap();
    r.ok(t, "tenantctl receipt-key", &[]);
    r.ok(t, "tenantctl register-console", &["laptop", pem]);
    r.ok(t, "tenantctl seal", &["--to", ut_pem, payload]);
    let pins = lab.path("work").join("pins");
    std::fs::create_dir_all(&pins).unwrap();
    // Both roles' users write their pins there.
    std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(0o777)).unwrap();
    let pins = pins.join("known_nodes");
    let pins = pins.to_str().unwrap();
    let a = r.ok(t, "tenantctl attest", &["--pin-file", pins]);
    assert_eq!(a["newly_pinned"], true, "{a}");
    r.ok(l, "landlordctl attest", &["--pin-file", pins]);
    let put = r.ok(t, "tenantctl secret put", &["db", "--from", payload]);
    let list = r.ok(t, "tenantctl secret list", &[]);
    assert_eq!(list[0]["name"], "db", "{list}");
    let rm = r.ok(t, "tenantctl secret rm", &["db"]);
    assert_eq!(
        put.as_object().unwrap().keys().collect::<Vec<_>>(),
        rm.as_object().unwrap().keys().collect::<Vec<_>>(),
        "secret put and rm print one shape"
    );
    let chk = r.ok(t, "tenantctl boundary check", &[sub]);
    assert_eq!(chk["fits"], false, "{chk}");
    assert!(chk["wider"][0]["peers"].is_array(), "{chk}");
    let b = r.ok(t, "tenantctl boundary set", &["--narrow", sub]);
    assert!(!b["cut"].as_array().unwrap().is_empty(), "{b}");
    assert!(b["cut"][0]["proto"].is_string(), "{b}");
    r.ok(t, "tenantctl boundary show", &[]);
    r.run(
        t,
        "tenantctl boundary explain",
        &["--peer", "10.0.0.1", "--port", "80"],
        &[0, 1],
    );
    r.ok(t, "tenantctl boundary clear", &[]);
    r.ok(t, "tenantctl volume status", &[]);
    r.ok(t, "tenantctl engine ls", &[]);
    // No engine has run: no event, no line (each line would be checked).
    r.lines(t, "tenantctl engine events", &[]);
    r.run(t, "tenantctl status", &[], &[0, 1]);
    r.ok(t, "tenantctl rekey", &[]);

    // Rotations: receipts as objects that verify as printed.
    let mut rotated = None;
    r.monitor(t, "tenantctl", |r| {
        rotated = Some(r.ok(Who::Tenant, "tenantctl rotate", &["--yes"]));
    });
    let change = rotated.unwrap();
    assert!(change["receipt"].is_object(), "{change}");
    let file = lab.write_file("rotate.json", change.to_string().as_bytes());
    let v = r.ok(t, "tenantctl verify-receipt", &[file.to_str().unwrap()]);
    assert_eq!(v["receipt"], change["receipt"]);
    // Pretty-printed, as `jq .` would: still the signed bytes.
    let pretty = lab.write_file(
        "rotate-pretty.json",
        serde_json::to_string_pretty(&change).unwrap().as_bytes(),
    );
    r.ok(t, "tenantctl verify-receipt", &[pretty.to_str().unwrap()]);
    // No corrective action has run: an empty list.
    let acts = r.ok(t, "tenantctl actions list", &[]);
    assert_eq!(acts, json!([]));
    let list = r.ok(t, "tenantctl receipts list", &[]);
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let doc = r.ok(t, "tenantctl receipts show", &[&id]);
    assert!(doc["receipt"].is_object(), "{doc}");
    let change = r.ok(l, "landlordctl rotate", &["--yes"]);
    assert!(change["receipt"].is_object(), "{change}");
    let file = lab.write_file("rotate-l.json", change.to_string().as_bytes());
    r.ok(l, "landlordctl verify-receipt", &[file.to_str().unwrap()]);
    let list = r.ok(l, "landlordctl receipts list", &[]);
    let id = list[0]["id"].as_str().unwrap().to_owned();
    r.ok(l, "landlordctl receipts show", &[&id]);
    // A modified receipt: the error object, exit 1.
    let mut bad = change.clone();
    bad["receipt"]["time"] = json!(1);
    let file = lab.write_file("bad.json", bad.to_string().as_bytes());
    r.error(
        l,
        "landlordctl",
        &["--json", "verify-receipt", file.to_str().unwrap()],
        1,
    );

    // Back to no tenant and no boundary.
    let c = r.ok(l, "landlordctl release", &["--yes"]);
    assert!(c["receipt"].is_object(), "{c}");
    r.ok(l, "landlordctl volume forget", &["--yes"]);
    r.ok(l, "landlordctl boundary clear", &["--yes"]);

    // Errors: polkit, the bus policy, the agent's refusal, usage.
    let e = r.error(t, "landlordctl", &["--json", "info"], 3);
    assert_eq!(e["error"]["name"], "not-authorized", "{e}");
    assert_eq!(
        e["error"]["dbus_error"],
        "org.leasehold.Error.NotAuthorized"
    );
    let e = r.error(Who::Outsider, "landlordctl", &["--json", "info"], 69);
    assert_eq!(
        e["error"]["dbus_error"],
        leasehold_tests::matrix::BUS_DENIED
    );
    let e = r.error(l, "landlordctl", &["--json", "receipts", "show", "nope"], 5);
    assert!(e["error"]["dbus_error"].is_string(), "{e}");
    let e = r.error(t, "tenantctl", &["--json", "bogus"], 2);
    assert_eq!(e["error"]["name"], "usage", "{e}");

    let not_run: BTreeSet<String> = NOT_RUN_HERE.iter().map(|(c, _)| (*c).to_owned()).collect();
    let missing: Vec<&String> = r
        .doc
        .commands
        .keys()
        .filter(|c| !r.seen.contains(*c) && !not_run.contains(*c))
        .collect();
    assert!(missing.is_empty(), "commands not run: {missing:?}");
}
