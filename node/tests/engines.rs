//! T0: the tenant's engines through the controller, on in-memory backends —
//! a destroying change stops every engine before the volume's key is wiped
//! (order read from the fakes' shared log), a failing stop never skips the
//! erase, the receipt names the engines, deploy refuses what the budget or
//! the tenant's sub-boundary does not allow.

use std::time::SystemTime;

use leasehold_engines::budget::Budget;
use leasehold_engines::spec::Spec;
use leasehold_node::fake::Fake;
use leasehold_node::{
    Caller, ChangeReport, Command, EngineCommand, Node, NodeError, Outcome, Request,
};
use leasehold_tpm::{KeyError, Role};

const LANDLORD: Caller = Caller {
    role: Role::Landlord,
    uid: 0,
};
const TENANT: Caller = Caller {
    role: Role::Tenant,
    uid: 1000,
};

fn run(node: &Node, caller: Caller, command: Command) -> Result<Outcome, NodeError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(node.submit(Request {
            caller,
            command,
            received: SystemTime::now(),
        }))
}

fn engine(node: &Node, c: EngineCommand) -> Result<Outcome, NodeError> {
    run(node, TENANT, Command::Engine(c))
}

fn spec(toml: &str) -> Box<Spec> {
    Box::new(Spec::from_toml(toml).expect("spec"))
}

fn deploy(node: &Node, name: &str, s: Box<Spec>) -> Result<Outcome, NodeError> {
    engine(
        node,
        EngineCommand::Deploy {
            name: name.into(),
            image: format!("{name}.oci.tar"),
            spec: s,
        },
    )
}

/// A tenant, a volume, engines `db` and `web` running, `idle` deployed.
fn with_engines() -> (Fake, Node) {
    let f = Fake::new();
    let node = Node::start(f.backends()).expect("start");
    run(
        &node,
        LANDLORD,
        Command::Assign {
            name: "acme".into(),
            console_key: None,
            confirm: false,
        },
    )
    .expect("assign");
    run(
        &node,
        LANDLORD,
        Command::InitVolume {
            device: "/dev/vdb".into(),
            force: false,
            confirm: true,
        },
    )
    .expect("init");
    for name in ["db", "web", "idle"] {
        deploy(&node, name, spec(r#"command = ["/bin/app"]"#)).expect("deploy");
    }
    for name in ["db", "web"] {
        engine(&node, EngineCommand::Start { name: name.into() }).expect("start");
    }
    {
        let mut w = f.world();
        w.volume.as_mut().expect("volume").files = 3;
        w.log.clear();
        w.receipts.clear();
        w.signals.clear();
    }
    (f, node)
}

fn pos(log: &[String], step: &str) -> usize {
    log.iter()
        .position(|s| s == step)
        .unwrap_or_else(|| panic!("{step} not in {log:?}"))
}

fn changed(o: Outcome) -> ChangeReport {
    match o {
        Outcome::Changed(r) => r,
        other => panic!("expected a key change, got {other:?}"),
    }
}

fn receipt_engines(r: &ChangeReport) -> serde_json::Value {
    let body: serde_json::Value =
        serde_json::from_str(&r.receipt.as_ref().expect("a receipt").body).unwrap();
    assert_eq!(body["format"], 2, "an added field, not a new format");
    body["engines"].clone()
}

fn rotate(node: &Node, caller: Caller, role: Role) -> Result<Outcome, NodeError> {
    run(
        node,
        caller,
        Command::Rotate {
            role,
            confirm: true,
        },
    )
}

fn release(node: &Node) -> Result<Outcome, NodeError> {
    run(node, LANDLORD, Command::Release { confirm: true })
}

#[test]
fn a_tenant_rotation_stops_every_engine_before_the_wipe() {
    let (f, node) = with_engines();
    let r = changed(rotate(&node, TENANT, Role::Tenant).expect("rotate"));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let e = r.engines.as_ref().expect("engines in the outcome");
    assert_eq!(e.stopped, ["db", "web"], "only the running ones");
    assert_eq!(
        receipt_engines(&r),
        serde_json::json!({"stopped": ["db", "web"]})
    );
    let w = f.world();
    let log = &w.log;
    assert!(
        pos(log, "engines.stop_all") < pos(log, "volume.begin"),
        "{log:?}"
    );
    assert!(pos(log, "engines.stop_all") < pos(log, "volume.wipe"));
    assert!(pos(log, "volume.wipe") < pos(log, "keys.rotate tenant"));
    assert!(pos(log, "keys.rotate tenant") < pos(log, "keys.sign"));
    // Their images and roots were on the erased volume.
    assert!(pos(log, "keys.sign") < pos(log, "engines.forget_all"));
    assert!(w.engines.is_empty());
    drop(w);
    assert!(node.engines().is_empty());
}

#[test]
fn a_landlord_rotation_and_a_reassignment_stop_them_too() {
    let (f, node) = with_engines();
    let r = changed(rotate(&node, LANDLORD, Role::Landlord).expect("rotate"));
    assert_eq!(r.engines.expect("engines").stopped, ["db", "web"]);
    {
        let log = &f.world().log;
        assert!(pos(log, "engines.stop_all") < pos(log, "volume.wipe"));
    }
    let (f, node) = with_engines();
    let r = changed(
        run(
            &node,
            LANDLORD,
            Command::Assign {
                name: "next".into(),
                console_key: None,
                confirm: true,
            },
        )
        .expect("assign"),
    );
    assert_eq!(r.engines.expect("engines").stopped, ["db", "web"]);
    let log = &f.world().log;
    assert!(pos(log, "engines.stop_all") < pos(log, "keys.assign"));
    assert!(pos(log, "engines.stop_all") < pos(log, "volume.wipe"));
}

#[test]
fn a_rekey_keeps_the_engines_running() {
    let (f, node) = with_engines();
    let r = changed(run(&node, TENANT, Command::Rekey { role: Role::Tenant }).expect("rekey"));
    assert!(r.engines.is_none());
    let w = f.world();
    assert!(
        !w.log.iter().any(|s| s.starts_with("engines.")),
        "{:?}",
        w.log
    );
    assert!(w.engines["web"].running);
    // The volume is not marked: the disk key does not change, and a mark
    // left by an agent killed mid-rekey made the next start tear the
    // volume down under the running engines (review).
    assert!(!w.log.iter().any(|s| s == "volume.begin"), "{:?}", w.log);
    assert_eq!(w.volume.as_ref().map(|v| v.state), Some("ready"));
}

#[test]
fn a_failing_stop_all_still_erases_and_says_so() {
    let (f, node) = with_engines();
    f.fail("engines.stop_all");
    let r = changed(rotate(&node, TENANT, Role::Tenant).expect("the erase was asked"));
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(
        r.warnings[0].contains("could not be stopped before the erase")
            && r.warnings[0].contains("the erase went ahead"),
        "{:?}",
        r.warnings
    );
    let e = receipt_engines(&r);
    assert_eq!(e["stopped"], serde_json::json!([]));
    assert!(
        e["error"].as_str().unwrap().contains("engines.stop_all"),
        "{e}"
    );
    let w = f.world();
    assert!(pos(&w.log, "volume.wipe") < pos(&w.log, "keys.rotate tenant"));
    assert_eq!(w.tenant.as_ref().unwrap().key_generation, 2, "erased");
    assert_eq!(w.unproven_receipts, 0);
    assert_eq!(w.signals.len(), 1);
}

#[test]
fn an_engine_not_shown_stopped_is_named_in_the_receipt() {
    let (f, node) = with_engines();
    f.world().engines.get_mut("web").unwrap().stubborn = true;
    let r = changed(release(&node).expect("release"));
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("engines not shown stopped before the erase: web")),
        "{:?}",
        r.warnings
    );
    assert_eq!(
        receipt_engines(&r),
        serde_json::json!({
            "stopped": ["db"],
            "not_stopped": [{"name": "web", "reason": "processes left in its cgroup after the kill"}],
        })
    );
}

#[test]
fn a_release_stops_every_engine_before_the_key_change_and_the_wipe() {
    let (f, node) = with_engines();
    let r = changed(release(&node).expect("release"));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(
        receipt_engines(&r)["stopped"],
        serde_json::json!(["db", "web"])
    );
    let w = f.world();
    let log = &w.log;
    assert!(pos(log, "engines.stop_all") < pos(log, "volume.begin"));
    assert!(pos(log, "engines.stop_all") < pos(log, "keys.release"));
    assert!(pos(log, "keys.release") < pos(log, "volume.wipe"));
    assert!(w.engines.is_empty());
    assert!(w.tenant.is_none());
}

#[test]
fn a_release_with_a_failing_stop_all_still_erases() {
    let (f, node) = with_engines();
    f.fail("engines.stop_all");
    let r = changed(release(&node).expect("release"));
    assert!(r.receipt.is_some());
    assert!(
        r.warnings[0].contains("the erase went ahead"),
        "{:?}",
        r.warnings
    );
    let w = f.world();
    assert!(w.tenant.is_none());
    assert!(pos(&w.log, "keys.release") < pos(&w.log, "volume.wipe"));
}

#[test]
fn a_rotation_that_fails_before_the_erase_starts_the_engines_again() {
    let (f, node) = with_engines();
    f.fail("volume.wipe");
    let e = rotate(&node, TENANT, Role::Tenant).unwrap_err();
    assert!(matches!(e, NodeError::Backend { .. }), "{e}");
    let w = f.world();
    assert_eq!(w.tenant.as_ref().unwrap().key_generation, 1, "not erased");
    assert!(w.receipts.is_empty());
    let log = &w.log;
    assert!(pos(log, "engines.stop_all") < pos(log, "volume.reopen"));
    assert!(pos(log, "volume.reopen") < pos(log, "engines.start web"));
    assert!(w.engines["db"].running && w.engines["web"].running);
    assert!(!w.engines["idle"].running, "only what it stopped");
}

#[test]
fn deploy_refuses_limits_over_the_budget_naming_the_field() {
    let (f, node) = with_engines();
    f.world().budget = Budget::from_toml("memory_max = \"1G\"\npids_max = 100").unwrap();
    let e = deploy(
        &node,
        "hog",
        spec(
            r#"
            command = ["/bin/hog"]
            limits = { memory_max = "2G", pids_max = 500 }
            "#,
        ),
    )
    .unwrap_err();
    match &e {
        NodeError::Invalid { field, reason } => {
            assert_eq!(*field, "limits.memory_max");
            assert!(
                reason.starts_with("2G is above the tenant budget 1G"),
                "{reason}"
            );
            assert!(
                reason.contains("limits.pids_max: 500 is above the tenant budget 100"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(e
        .to_string()
        .starts_with("limits.memory_max: 2G is above the tenant budget 1G"));
    assert!(!f.world().log.iter().any(|s| s == "engines.deploy hog"));
    // Within the budget: deployed, with what it inherits.
    match deploy(
        &node,
        "small",
        spec(
            r#"
            command = ["/bin/app"]
            limits = { memory_max = "512M" }
            "#,
        ),
    )
    .expect("deploy")
    {
        Outcome::EngineDeployed { status, notes } => {
            assert_eq!(status.name, "small");
            assert_eq!(
                notes,
                ["limits.pids_max: not set, the tenant budget 100 applies"]
            );
        }
        other => panic!("{other:?}"),
    }
    // A reload to a spec over the budget is refused the same way.
    let e = engine(
        &node,
        EngineCommand::Reload {
            name: "small".into(),
            image: None,
            spec: Some(spec(
                r#"
                command = ["/bin/app"]
                limits = { memory_max = "4G" }
                "#,
            )),
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            NodeError::Invalid {
                field: "limits.memory_max",
                ..
            }
        ),
        "{e}"
    );
}

const EGRESS_DB: &str = r#"
command = ["/bin/app"]
[[egress.allow]]
name = "database"
peers = ["10.0.5.0/24"]
direction = "out"
protocols = [{ proto = "tcp", ports = [5432] }]
"#;

const EGRESS_WIDE: &str = r#"
command = ["/bin/app"]
[[egress.allow]]
name = "everything"
peers = ["10.0.0.0/8"]
direction = "out"
protocols = [{ proto = "tcp", ports = [5432] }]
"#;

#[test]
fn deploy_refuses_an_egress_wider_than_the_tenant_sub_boundary() {
    let (f, node) = with_engines();
    let tenant = Spec::from_toml(EGRESS_DB)
        .unwrap()
        .egress_boundary()
        .unwrap()
        .unwrap();
    f.world().egress_limit = Some(tenant);
    deploy(&node, "narrow", spec(EGRESS_DB)).expect("the same is not wider");
    let e = deploy(&node, "wide", spec(EGRESS_WIDE)).unwrap_err();
    match &e {
        NodeError::Invalid { field, reason } => {
            assert_eq!(*field, "egress");
            assert!(reason.contains("can only narrow"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The boundary backend cannot tell: refused (fails closed).
    f.fail("boundary.egress_limit");
    let e = deploy(&node, "unknown", spec(EGRESS_DB)).unwrap_err();
    assert!(matches!(e, NodeError::Backend { .. }), "{e}");
    // No egress section: no boundary check at all.
    f.fail("boundary.egress_limit");
    deploy(&node, "plain", spec(r#"command = ["/bin/app"]"#)).expect("deploy");
}

#[test]
fn engines_are_the_tenants_and_reads_come_from_the_view() {
    let (f, node) = with_engines();
    let e = run(
        &node,
        LANDLORD,
        Command::Engine(EngineCommand::Start { name: "db".into() }),
    )
    .unwrap_err();
    assert!(
        matches!(e, NodeError::Keys(KeyError::NotPermitted { .. })),
        "{e}"
    );
    let e = deploy(&node, "../x", spec(r#"command = ["/bin/app"]"#)).unwrap_err();
    assert!(matches!(e, NodeError::Invalid { field: "name", .. }), "{e}");
    let e = engine(
        &node,
        EngineCommand::Deploy {
            name: "x".into(),
            image: "../../etc/shadow".into(),
            spec: spec(r#"command = ["/bin/app"]"#),
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, NodeError::Invalid { field: "image", .. }),
        "{e}"
    );
    let names: Vec<String> = node.engines().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["db", "idle", "web"]);
    assert!(node.engine("web").unwrap().enabled);
    assert!(matches!(
        node.engine("nope"),
        Err(NodeError::Backend { .. })
    ));
    // A read answers while a destroying change is held half-way.
    let hold = f.hold("engines.stop_all");
    let pending = node
        .enqueue(Request {
            caller: TENANT,
            command: Command::Rotate {
                role: Role::Tenant,
                confirm: true,
            },
            received: SystemTime::now(),
        })
        .expect("queued");
    while node.running().is_none() {
        std::thread::yield_now();
    }
    assert_eq!(node.engines().len(), 3, "read during the change");
    hold.send(()).unwrap();
    let r = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(pending.outcome())
        .expect("rotate");
    assert!(matches!(r, Outcome::Changed(_)));
}

#[test]
fn the_landlord_sets_the_budget_and_deploys_are_checked_against_it() {
    let (f, node) = with_engines();
    let b = Budget::from_toml("memory_max = \"256M\"").unwrap();
    // The tenant cannot set its own budget.
    let e = run(&node, TENANT, Command::SetBudget { budget: b }).unwrap_err();
    assert!(
        matches!(e, NodeError::Keys(KeyError::NotPermitted { .. })),
        "{e:?}"
    );
    assert_eq!(f.world().budget, Budget::default());
    // A budget the types allow but the ranges do not: refused by field.
    let bad = Budget {
        pids_max: Some(0),
        ..Budget::default()
    };
    let e = run(&node, LANDLORD, Command::SetBudget { budget: bad }).unwrap_err();
    assert!(e.to_string().contains("budget.pids_max"), "{e}");
    assert!(!f.world().log.iter().any(|s| s == "engines.set_budget"));
    // The landlord's: recorded by the runtime, engines above it counted
    // (none of the fixture's engines sets a memory limit).
    match run(&node, LANDLORD, Command::SetBudget { budget: b }).expect("set") {
        Outcome::BudgetSet(a) => {
            assert_eq!(a.budget, b);
            assert_eq!(a.engines_above, 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.world().budget, b);
    // And the next deploy is checked against it.
    let e = deploy(
        &node,
        "hog",
        spec("command = [\"/bin/hog\"]\nlimits = { memory_max = \"512M\" }\n"),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("limits.memory_max: 512M is above the tenant budget 256M"),
        "{e}"
    );
    // Lowering below a deployed engine's own limit is accepted and counted.
    deploy(
        &node,
        "mid",
        spec("command = [\"/bin/app\"]\nlimits = { memory_max = \"200M\" }\n"),
    )
    .expect("deploy");
    let lower = Budget::from_toml("memory_max = \"100M\"").unwrap();
    match run(&node, LANDLORD, Command::SetBudget { budget: lower }).expect("set") {
        Outcome::BudgetSet(a) => assert_eq!(a.engines_above, 1),
        other => panic!("{other:?}"),
    }
    let v = node.tenant_usage();
    assert_eq!((v.budget, v.engines), (lower, 4));
}

/// The corrective actions' commands (docs/health.md "Corrective actions"):
/// `StopEngines` stops every engine through the runtime as a rotation
/// does, and `SignRecord` signs the body as given with the node's key.
#[test]
fn corrective_actions_stop_engines_and_sign_records() {
    let (f, node) = with_engines();
    match run(&node, LANDLORD, Command::StopEngines).expect("stop") {
        Outcome::EnginesStopped(r) => {
            assert_eq!(r.error, None);
            assert!(r.stopped.contains(&"db".to_owned()), "{r:?}");
        }
        other => panic!("expected EnginesStopped, got {other:?}"),
    }
    assert!(f.world().log.iter().any(|s| s == "engines.stop_all"));
    let body = r#"{"format":1,"kind":"health-action"}"#;
    match run(&node, LANDLORD, Command::SignRecord { body: body.into() }).expect("sign") {
        Outcome::Signed { signature } => {
            use base64::Engine as _;
            let sig = base64::engine::general_purpose::STANDARD
                .decode(signature)
                .unwrap();
            // The fake key "signs" by reversing the bytes it was given.
            let back: Vec<u8> = sig.into_iter().rev().collect();
            assert_eq!(back, body.as_bytes());
        }
        other => panic!("expected Signed, got {other:?}"),
    }
    f.fail("engines.stop_all");
    match run(&node, LANDLORD, Command::StopEngines).expect("a failed stop is reported") {
        Outcome::EnginesStopped(r) => assert!(r.error.is_some(), "{r:?}"),
        other => panic!("expected EnginesStopped, got {other:?}"),
    }
}

/// A tenant's engine command is sent to the engine runtime and its answer
/// awaited off the controller's thread: while the runtime has not answered
/// (an image being unpacked), a landlord's change goes ahead. Past
/// `MAX_ENGINE_ANSWERS_AWAITED` unanswered, a command is refused `Busy`
/// and never sent; the answers come once the runtime gives them.
#[test]
fn an_engine_command_awaiting_the_runtime_does_not_hold_the_controller() {
    use leasehold_node::MAX_ENGINE_ANSWERS_AWAITED;
    let (f, node) = with_engines();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let gate = f.hold_answers();
    let send = |c: EngineCommand| {
        node.enqueue(Request {
            caller: TENANT,
            command: Command::Engine(c),
            received: SystemTime::now(),
        })
        .expect("queued")
    };
    let mut pending = vec![send(EngineCommand::Stop {
        name: "web".into(),
        grace: None,
    })];
    // The landlord's change is carried out while the stop is unanswered.
    let b = Budget::from_toml("memory_max = \"1G\"").unwrap();
    let landlord = node
        .enqueue(Request {
            caller: LANDLORD,
            command: Command::SetBudget { budget: b },
            received: SystemTime::now(),
        })
        .expect("queued");
    let r = rt
        .block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), landlord.outcome()).await
        })
        .expect("the landlord's change was held behind an unanswered engine command");
    assert!(matches!(r, Ok(Outcome::BudgetSet(_))), "{r:?}");
    assert_eq!(f.world().budget, b);
    // The stop itself was carried out when sent, before the budget.
    let log = f.world().log.clone();
    let stop = log
        .iter()
        .position(|s| s == "engines.stop web")
        .expect("sent");
    let budget = log.iter().position(|s| s.starts_with("engines.set_budget"));
    assert!(budget.is_none_or(|b| b > stop), "{log:?}");

    for _ in 1..MAX_ENGINE_ANSWERS_AWAITED {
        pending.push(send(EngineCommand::Start {
            name: "idle".into(),
        }));
    }
    let busy = rt
        .block_on(send(EngineCommand::Restart { name: "db".into() }).outcome())
        .unwrap_err();
    assert!(matches!(busy, NodeError::Busy(_)), "{busy}");
    assert!(busy.to_string().contains("was not sent"), "{busy}");
    assert!(
        !f.world().log.iter().any(|s| s.contains("engines.restart")),
        "a refused command is not carried out"
    );

    gate.open();
    for p in pending {
        let r = rt.block_on(p.outcome());
        assert!(matches!(r, Ok(Outcome::Engine(_))), "{r:?}");
    }
    assert!(!f.world().engines["web"].running);
    assert!(f.world().engines["idle"].running);
    // Room again.
    assert!(matches!(
        engine(&node, EngineCommand::Restart { name: "db".into() }),
        Ok(Outcome::Engine(_))
    ));
}
