//! T0: the controller's workflows on in-memory backends — order, faults at
//! every step, truthful outcomes, the queue, reads during a change, and a
//! property test that concurrent callers end where some serial order ends.

use std::time::{Duration, SystemTime};

use leasehold_node::fake::{Fake, FakeVolume};
use leasehold_node::{
    BoundaryChange, Caller, Command, Node, NodeError, Outcome, Request, QUEUE_DEPTH,
};
use leasehold_tpm::{KeyError, Role};
use proptest::prelude::*;

const LANDLORD: Caller = Caller {
    role: Role::Landlord,
    uid: 0,
};
const TENANT: Caller = Caller {
    role: Role::Tenant,
    uid: 1000,
};

fn req(caller: Caller, command: Command) -> Request {
    Request {
        caller,
        command,
        received: SystemTime::now(),
    }
}

fn run(node: &Node, caller: Caller, command: Command) -> Result<Outcome, NodeError> {
    futures_block(node.submit(req(caller, command)))
}

/// The tenant's confirmed destroying rotation.
fn rotate_tenant(node: &Node) -> Result<Outcome, NodeError> {
    run(
        node,
        TENANT,
        Command::Rotate {
            role: Role::Tenant,
            confirm: true,
        },
    )
}

/// A tiny executor: the controller answers on a oneshot channel.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A node with a tenant, a volume with files and two secrets.
fn assigned() -> (Fake, Node) {
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
    for name in ["a", "b"] {
        run(
            &node,
            TENANT,
            Command::PutSecret {
                name: name.into(),
                envelope: b"payload".to_vec(),
            },
        )
        .expect("put");
    }
    {
        let mut w = f.world();
        w.volume.as_mut().expect("volume").files = 3;
        w.log.clear();
        w.signals.clear();
        w.receipts.clear();
    }
    (f, node)
}

fn pos(log: &[String], step: &str) -> usize {
    log.iter()
        .position(|s| s == step)
        .unwrap_or_else(|| panic!("{step} not in {log:?}"))
}

fn tenant_gen(f: &Fake) -> (u64, u64) {
    let w = f.world();
    let t = w.tenant.as_ref().expect("tenant");
    (t.generation, t.key_generation)
}

fn changed(o: Outcome) -> leasehold_node::ChangeReport {
    match o {
        Outcome::Changed(r) => r,
        other => panic!("expected a key change, got {other:?}"),
    }
}

#[test]
fn rotation_wipes_before_the_tpm_and_replies_before_the_remake() {
    let (f, node) = assigned();
    // The remake waits: the caller's reply must not.
    let remake = f.hold("volume.remake");
    let r = changed(rotate_tenant(&node).expect("rotate"));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let receipt = r.receipt.expect("a receipt");
    let body: serde_json::Value = serde_json::from_str(&receipt.body).unwrap();
    assert_eq!(body["format"], 2);
    assert_eq!(body["change"], "rotate");
    assert_eq!(body["volume"]["id"], "vol");
    assert_eq!(body["volume"]["kernel_key"], "wiped");
    assert!(body["erased_ms"].is_u64(), "{body}");
    {
        let w = f.world();
        let v = w.volume.as_ref().unwrap();
        assert!(v.kernel_key.is_none(), "old key still in the kernel");
        assert_eq!(w.receipts.len(), 1);
        assert_eq!(w.signals.len(), 1);
        let log = &w.log;
        assert!(pos(log, "volume.begin") < pos(log, "volume.wipe"));
        assert!(pos(log, "volume.wipe") < pos(log, "keys.rotate tenant"));
        assert!(pos(log, "keys.rotate tenant") < pos(log, "secrets.purge"));
        assert!(pos(log, "secrets.purge") < pos(log, "keys.sign"));
        assert!(!log.iter().any(|s| s == "volume.remake"), "{log:?}");
    }
    remake.send(()).unwrap();
    // The next command runs after the remake (and the standby keys).
    run(&node, TENANT, Command::Rekey { role: Role::Tenant }).expect("rekey");
    let w = f.world();
    let log = &w.log;
    assert!(pos(log, "keys.sign") < pos(log, "volume.remake"));
    assert!(pos(log, "volume.remake") < pos(log, "keys.prepare_standby"));
    assert!(pos(log, "keys.prepare_standby") < pos(log, "keys.rekey tenant"));
    assert_eq!(log.iter().filter(|s| *s == "secrets.purge").count(), 1);
    assert!(w.secrets.is_empty());
    let v = w.volume.as_ref().unwrap();
    assert_eq!((v.state, v.files), ("ready", 0));
    assert_eq!(v.kernel_key.as_ref(), Some(&v.generations));
    assert_eq!(w.tenant.as_ref().unwrap().key_generation, 2);
    assert_eq!(w.unproven_receipts, 0);
}

/// A first assignment replaces a disk key made from KL alone, which stays:
/// nothing is destroyed, so no receipt claims it (review: the receipt said
/// "disk key made from key generations landlord 1" was destroyed). The
/// volume is still wiped and made again under the new key, and leftovers of
/// the previous tenancy's secret store are removed.
#[test]
fn a_first_assignment_signs_no_receipt_and_still_remakes_the_volume() {
    let (f, node) = assigned();
    let r = changed(run(&node, LANDLORD, Command::Release { confirm: true }).unwrap());
    assert!(r.change.data_destroyed && r.receipt.is_some(), "{r:?}");
    // The release's remake follows its reply: done before the next command.
    run(
        &node,
        LANDLORD,
        Command::Rekey {
            role: Role::Landlord,
        },
    )
    .expect("rekey");
    {
        let mut w = f.world();
        w.log.clear();
        w.receipts.clear();
        w.volume.as_mut().expect("volume").files = 2;
    }
    let r = changed(
        run(
            &node,
            LANDLORD,
            Command::Assign {
                name: "next".into(),
                console_key: None,
                confirm: false,
            },
        )
        .expect("a first assignment needs no confirmation"),
    );
    assert!(!r.change.data_destroyed, "{:?}", r.change);
    assert!(r.receipt.is_none(), "a receipt of nothing destroyed");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    // The reply's after-work (the remake) runs before the next command.
    run(
        &node,
        LANDLORD,
        Command::Rekey {
            role: Role::Landlord,
        },
    )
    .expect("rekey");
    let w = f.world();
    assert!(w.receipts.is_empty(), "stored: {:?}", w.receipts.len());
    assert!(pos(&w.log, "volume.wipe") < pos(&w.log, "volume.remake"));
    assert!(w.log.iter().any(|s| s == "secrets.purge"), "{:?}", w.log);
    assert!(!w.log.iter().any(|s| s == "keys.sign"), "{:?}", w.log);
    let v = w.volume.as_ref().unwrap();
    assert_eq!((v.state, v.files), ("ready", 0));
    let assign = w
        .signals
        .iter()
        .rfind(|s| s.change.kind == leasehold_tpm::ChangeKind::Assign)
        .expect("the assignment's signal");
    assert!(!assign.change.data_destroyed && assign.receipt.is_none());
}

#[test]
fn refusals_touch_nothing() {
    let (f, node) = assigned();
    let e = run(
        &node,
        TENANT,
        Command::Rotate {
            role: Role::Tenant,
            confirm: false,
        },
    )
    .unwrap_err();
    assert!(matches!(e, NodeError::ConfirmationRequired(_)), "{e}");
    let e = run(
        &node,
        TENANT,
        Command::Rotate {
            role: Role::Landlord,
            confirm: true,
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, NodeError::Keys(KeyError::NotPermitted { .. })),
        "{e}"
    );
    let e = run(
        &node,
        TENANT,
        Command::Assign {
            name: "evil".into(),
            console_key: None,
            confirm: true,
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, NodeError::Keys(KeyError::NotPermitted { .. })),
        "{e}"
    );
    let e = run(
        &node,
        LANDLORD,
        Command::Assign {
            name: "x".repeat(100_000),
            console_key: None,
            confirm: true,
        },
    )
    .unwrap_err();
    assert!(e.to_string().len() < 300, "echoed in full");
    let e = run(
        &node,
        LANDLORD,
        Command::Assign {
            name: "next".into(),
            console_key: Some("not a key".into()),
            confirm: true,
        },
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("console_key:"), "{e}");
    let w = f.world();
    assert!(
        !w.log
            .iter()
            // Reads (what a confirmation names) change nothing.
            .any(
                |s| (s.starts_with("volume.") && s != "volume.describe" && s != "volume.failed")
                    || s.starts_with("keys.rotate")
            ),
        "{:?}",
        w.log
    );
    assert_eq!(w.tenant.as_ref().unwrap().name.as_deref(), Some("acme"));
    assert!(w.signals.is_empty());
}

#[test]
fn failed_wipe_signs_nothing_and_keeps_the_old_generation() {
    let (f, node) = assigned();
    f.fail("volume.wipe");
    let e = rotate_tenant(&node).unwrap_err();
    assert!(e.to_string().contains("wiping"), "{e}");
    assert_eq!(tenant_gen(&f), (1, 1));
    let w = f.world();
    assert!(!w.log.iter().any(|s| s.starts_with("keys.rotate")));
    assert!(!w.log.iter().any(|s| s == "keys.sign"));
    assert!(w.receipts.is_empty() && w.signals.is_empty());
    let v = w.volume.as_ref().unwrap();
    assert_eq!(v.state, "ready");
    assert_eq!(v.files, 3, "data kept");
    assert_eq!(v.kernel_key.as_ref(), Some(&v.generations), "reopened");
    assert_eq!(w.secrets.len(), 2);
}

#[test]
fn tpm_failure_before_the_erase_reopens_the_old_volume() {
    let (f, node) = assigned();
    f.fail("keys.rotate.before_erase");
    rotate_tenant(&node).unwrap_err();
    assert_eq!(tenant_gen(&f), (1, 1));
    let w = f.world();
    let v = w.volume.as_ref().unwrap();
    assert_eq!((v.state, v.files), ("ready", 3));
    assert!(v.kernel_key.is_some());
    assert!(w.receipts.is_empty() && w.signals.is_empty());
}

/// A rotation whose TPM change failed part-way — after its commit (the old
/// files' removal, the intent's clearing) or after its erase began (the
/// crate counts it as made once recorded) — is finished at once and done:
/// the caller gets it, with its receipt and a warning, and everything after
/// the change runs (review: it was reported failed, with no receipt and no
/// purge, and a retry rotated again).
#[test]
fn a_rotation_failing_after_its_erase_or_commit_is_finished_and_reported_done() {
    for fault in ["keys.rotate.after_commit", "keys.rotate.after_erase"] {
        let (f, node) = assigned();
        f.fail(fault);
        let r = changed(rotate_tenant(&node).expect("done"));
        assert!(r.change.data_destroyed, "{fault}: {:?}", r.change);
        assert_eq!(r.change.key_generation_before, Some(1));
        assert_eq!(r.change.key_generation_after, Some(2));
        assert!(r.receipt.is_some(), "{fault}: {:?}", r.warnings);
        assert!(
            r.warnings
                .first()
                .is_some_and(|w| w.contains("the rotation is done")),
            "{fault}: {:?}",
            r.warnings
        );
        run(&node, TENANT, Command::Rekey { role: Role::Tenant }).expect("rekey");
        let w = f.world();
        assert_eq!(
            w.tenant.as_ref().unwrap().key_generation,
            2,
            "{fault}: once"
        );
        assert!(w.secrets.is_empty(), "{fault}: purged");
        assert_eq!(w.receipts.len(), 1);
        let v = w.volume.as_ref().unwrap();
        assert_eq!((v.state, v.files), ("ready", 0), "{fault}");
        assert_eq!(v.kernel_key.as_ref(), Some(&v.generations));
        assert_eq!(w.unproven_receipts, 0);
    }
}

#[test]
fn tpm_failure_after_the_erase_leaves_it_closed_and_a_restart_makes_it_new() {
    let (f, node) = assigned();
    f.fail("keys.rotate.after_erase");
    // ... and it cannot be finished now either (the TPM still failing).
    f.fail("keys.finish_interrupted");
    let e = rotate_tenant(&node).unwrap_err().to_string();
    // Told the data is gone, not only which step failed.
    assert!(e.contains("after its old key was erased"), "{e}");
    assert!(e.contains("no receipt"), "{e}");
    {
        let w = f.world();
        let v = w.volume.as_ref().unwrap();
        assert_eq!(v.state, "rekeying");
        assert!(v.kernel_key.is_none(), "the old key must not come back");
        assert!(w.receipts.is_empty());
    }
    // Until then every destroying change is refused before it touches the
    // engines or the volume (review: a landlord rotation finished the
    // tenant's pending one as its own failure's clean-up).
    f.world().log.clear();
    for (who, command) in [
        (
            LANDLORD,
            Command::Rotate {
                role: Role::Landlord,
                confirm: true,
            },
        ),
        (LANDLORD, Command::Release { confirm: true }),
    ] {
        let e = run(&node, who, command).unwrap_err().to_string();
        assert!(e.contains("is unfinished"), "{e}");
    }
    {
        let w = f.world();
        assert!(
            !w.log
                .iter()
                .any(|s| s.starts_with("engines.") || s.starts_with("volume.")),
            "{:?}",
            w.log
        );
        assert_eq!(w.landlord.as_ref().unwrap().key_generation, 1);
    }
    node.stop();
    f.restart();
    let w = f.world();
    assert_eq!(w.tenant.as_ref().unwrap().key_generation, 2);
    let v = w.volume.as_ref().unwrap();
    assert_eq!((v.state, v.files), ("ready", 0), "old or new, never half");
}

#[test]
fn failures_after_the_commit_are_warnings_with_receipt_and_signal() {
    for step in ["secrets.purge", "events.store_receipt"] {
        let (f, node) = assigned();
        f.fail(step);
        let r =
            changed(rotate_tenant(&node).unwrap_or_else(|e| {
                panic!("{step}: the change committed but was reported as {e}")
            }));
        assert_eq!(tenant_gen(&f), (2, 2), "{step}");
        assert!(r.receipt.is_some(), "{step}: the erase happened: receipt");
        if step != "events.store_receipt" {
            assert!(
                r.warnings
                    .iter()
                    .any(|w| w.contains(if step == "secrets.purge" {
                        "secret store"
                    } else {
                        "volume"
                    })),
                "{step}: {:?}",
                r.warnings
            );
        }
        assert_eq!(f.world().signals.len(), 1, "{step}: signalled");
        // The receipt claims the store only as far as its purge went.
        if let Some(body) = r.receipt.as_ref().map(|r| r.body.clone()) {
            let whole = body.contains("\"the tenant's secret store\"");
            assert_eq!(whole, step != "secrets.purge", "{step}: {body}");
            assert_eq!(
                body.contains("its files were not removed"),
                step == "secrets.purge",
                "{step}: {body}"
            );
        }
    }
    // The remake (after the reply) fails: the change and its receipt
    // stand; the volume stays closed, marked, and the next start makes it.
    let (f, node) = assigned();
    f.fail("volume.remake");
    let r = changed(rotate_tenant(&node).unwrap());
    assert!(r.receipt.is_some() && r.warnings.is_empty());
    node.stop();
    {
        let w = f.world();
        let v = w.volume.as_ref().unwrap();
        assert_eq!(v.state, "rekeying");
        assert!(v.kernel_key.is_none());
    }
    f.restart();
    assert_eq!(f.world().volume.as_ref().unwrap().files, 0);
    // Signing fails: still done, warned, signalled, but no receipt.
    let (f, node) = assigned();
    f.fail("keys.sign");
    let r = changed(rotate_tenant(&node).unwrap());
    assert!(r.receipt.is_none());
    assert!(r.warnings.iter().any(|w| w.contains("no erase receipt")));
    assert_eq!(f.world().signals.len(), 1);
}

#[test]
fn release_wipes_then_signs_and_purges_once() {
    let (f, node) = assigned();
    f.world().sub_boundary = true;
    let r = changed(run(&node, LANDLORD, Command::Release { confirm: true }).unwrap());
    assert!(r.receipt.is_some(), "{:?}", r.warnings);
    let w = f.world();
    assert!(w.tenant.is_none());
    assert!(!w.sub_boundary);
    assert_eq!(w.log.iter().filter(|s| *s == "secrets.purge").count(), 1);
    assert!(pos(&w.log, "keys.release") < pos(&w.log, "volume.wipe"));
    assert!(pos(&w.log, "volume.wipe") < pos(&w.log, "keys.sign"));
    assert_eq!(w.unproven_receipts, 0);
    drop(w);
    // Again: already so.
    assert!(matches!(
        run(&node, LANDLORD, Command::Release { confirm: false }).unwrap(),
        Outcome::AlreadyReleased
    ));
}

#[test]
fn assignment_registers_the_console_in_the_same_commit() {
    let f = Fake::new();
    let node = Node::start(f.backends()).unwrap();
    // A real console key is checked before anything changes; the fake TPM
    // registers it with the assignment.
    let pem = test_pem();
    let r = changed(
        run(
            &node,
            LANDLORD,
            Command::Assign {
                name: "acme".into(),
                console_key: Some(pem),
                confirm: false,
            },
        )
        .unwrap(),
    );
    assert!(r.warnings.is_empty());
    let w = f.world();
    assert_eq!(
        w.log
            .iter()
            .filter(|s| s.starts_with("keys.assign"))
            .count(),
        1
    );
    assert!(!w.log.iter().any(|s| s == "keys.register_console"));
    assert!(w.consoles.contains(&(Role::Tenant, "initial".into())));
    drop(w);
    // A failed assignment leaves the volume ready and signals nothing.
    f.fail("keys.assign");
    run(
        &node,
        LANDLORD,
        Command::Assign {
            name: "next".into(),
            console_key: None,
            confirm: true,
        },
    )
    .unwrap_err();
    let w = f.world();
    assert_eq!(w.tenant.as_ref().unwrap().name.as_deref(), Some("acme"));
    assert_eq!(w.signals.len(), 1);
}

fn test_pem() -> String {
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    let mut rng = rand::thread_rng();
    let k = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
    rsa::RsaPublicKey::from(&k)
        .to_public_key_pem(LineEnding::LF)
        .unwrap()
}

#[test]
fn secret_caps_are_enforced_before_anything_is_stored() {
    let (f, node) = assigned();
    let big = vec![0u8; leasehold_node::MAX_ENVELOPE_BYTES + 1];
    let e = run(
        &node,
        TENANT,
        Command::PutSecret {
            name: "big".into(),
            envelope: big,
        },
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("envelope:"), "{e}");
    // An envelope within its bound whose secret is more than an engine can
    // be given (the fake's envelope is its payload).
    let e = run(
        &node,
        TENANT,
        Command::PutSecret {
            name: "wide".into(),
            envelope: vec![0u8; leasehold_node::MAX_SECRET_PAYLOAD + 1],
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().starts_with("envelope:") && e.to_string().contains("an engine can be given"),
        "{e}"
    );
    assert!(!f.world().secrets.contains_key("wide"));
    for i in 0..leasehold_node::MAX_SECRETS - 2 {
        run(
            &node,
            TENANT,
            Command::PutSecret {
                name: format!("s{i}"),
                envelope: b"x".to_vec(),
            },
        )
        .unwrap();
    }
    let e = run(
        &node,
        TENANT,
        Command::PutSecret {
            name: "one-more".into(),
            envelope: b"x".to_vec(),
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("remove one first"), "{e}");
    // Replacing an existing one is fine at the cap.
    run(
        &node,
        TENANT,
        Command::PutSecret {
            name: "a".into(),
            envelope: b"y".to_vec(),
        },
    )
    .unwrap();
    assert_eq!(f.world().secrets.len(), leasehold_node::MAX_SECRETS);
}

/// An assigned node whose tenant rotation is running and held in the key
/// store until `release` is sent: its queue can then be filled.
#[allow(clippy::type_complexity)]
fn a_tenant_rotation_held() -> (
    Fake,
    std::sync::Arc<Node>,
    std::sync::mpsc::Sender<()>,
    tokio::runtime::Runtime,
    tokio::task::JoinHandle<Result<Outcome, NodeError>>,
) {
    let (f, node) = assigned();
    let node = std::sync::Arc::new(node);
    let release = f.hold("keys.rotate tenant");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let n = node.clone();
    let rotation = rt.spawn(async move {
        n.submit(req(
            TENANT,
            Command::Rotate {
                role: Role::Tenant,
                confirm: true,
            },
        ))
        .await
    });
    // Wait until the rotation is running (an event, not a sleep).
    let t = std::time::Instant::now();
    while node.running() != Some("rotate") {
        assert!(t.elapsed() < Duration::from_secs(10), "rotation never ran");
        std::thread::yield_now();
    }
    (f, node, release, rt, rotation)
}

#[test]
fn reads_answer_during_a_change_and_the_queue_is_bounded() {
    let (f, node, release, rt, rotation) = a_tenant_rotation_held();
    // Reads: immediate, the state before the change.
    let t = std::time::Instant::now();
    let snap = node.snapshot();
    assert!(t.elapsed() < Duration::from_millis(50));
    assert_eq!(snap.status.tenant.as_ref().unwrap().key_generation, 1);
    // QUEUE_DEPTH changes wait; the next is Busy at once.
    let queued: Vec<_> = (0..QUEUE_DEPTH)
        .map(|i| {
            node.enqueue(req(
                TENANT,
                Command::RemoveSecret {
                    name: format!("missing{i}"),
                },
            ))
            .expect("room in the queue")
        })
        .collect();
    match node.enqueue(req(
        TENANT,
        Command::RemoveSecret {
            name: "late".into(),
        },
    )) {
        Err(NodeError::Busy(m)) => assert!(m.contains("rotate running"), "{m}"),
        other => panic!("expected Busy, got {other:?}"),
    }
    // The landlord's confirmation of a boundary, then the revert it
    // answers (its deadline came meanwhile): both get in past the full
    // queue and run first, in their order, so the confirmation queued in
    // time is not overtaken by the revert.
    let confirm = node
        .enqueue(req(
            LANDLORD,
            Command::Boundary(BoundaryChange::ConfirmPending),
        ))
        .expect("an urgent change passes a full queue");
    let revert = node
        .enqueue(req(
            LANDLORD,
            Command::Boundary(BoundaryChange::RevertPending { deadline: 1 }),
        ))
        .expect("an urgent change passes a full queue");
    let mark = f.world().log.len();
    release.send(()).unwrap();
    let r = rt.block_on(rotation).unwrap().unwrap();
    assert!(changed(r).receipt.is_some());
    rt.block_on(confirm.outcome()).unwrap();
    rt.block_on(revert.outcome()).unwrap();
    for q in queued {
        // Queued behind the rotation, then run in order: the secrets are gone.
        let e = rt.block_on(q.outcome()).unwrap_err();
        assert!(matches!(e, NodeError::Backend { .. }), "{e}");
    }
    let log = f.world().log[mark..].to_vec();
    let at = |op: &str| log.iter().position(|l| l == op);
    assert!(
        at("boundary.confirm").is_some_and(|c| at("boundary.revert")
            .is_some_and(|r| c < r && at("secrets.remove").is_some_and(|s| r < s))),
        "the confirmation, then the revert, ran before the queued changes: {log:?}"
    );
    // Behind it, the queue is back to its bound.
    assert!(node
        .enqueue(req(TENANT, Command::RemoveSecret { name: "x".into() }))
        .is_ok());
    assert_eq!(
        node.snapshot()
            .status
            .tenant
            .as_ref()
            .unwrap()
            .key_generation,
        2
    );
}

/// The agent's own corrective actions get past a queue the tenant keeps
/// full, and run before it: signing an action's record (without which a
/// reboot is not asked for) and stopping the engines. They were refused
/// `Busy` like any caller's change.
#[test]
fn the_agents_corrective_actions_pass_a_queue_the_tenant_fills() {
    let (f, node, release, rt, rotation) = a_tenant_rotation_held();
    let queued: Vec<_> = (0..QUEUE_DEPTH)
        .map(|i| {
            node.enqueue(req(
                TENANT,
                Command::RemoveSecret {
                    name: format!("flood{i}"),
                },
            ))
            .expect("room in the queue")
        })
        .collect();
    assert!(matches!(
        node.enqueue(req(TENANT, Command::RemoveSecret { name: "x".into() })),
        Err(NodeError::Busy(_))
    ));
    let agent = Caller {
        role: Role::Landlord,
        uid: 0,
    };
    let sign = node
        .enqueue(req(
            agent,
            Command::SignRecord {
                body: "{\"kind\":\"health-action\"}".into(),
            },
        ))
        .expect("the agent's record passes a full queue");
    let stop = node
        .enqueue(req(agent, Command::StopEngines))
        .expect("the agent's stop passes a full queue");
    let mark = f.world().log.len();
    release.send(()).unwrap();
    rt.block_on(rotation).unwrap().unwrap();
    match rt.block_on(sign.outcome()).unwrap() {
        Outcome::Signed { signature } => assert!(!signature.is_empty()),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        rt.block_on(stop.outcome()).unwrap(),
        Outcome::EnginesStopped(_)
    ));
    for q in queued {
        let _ = rt.block_on(q.outcome());
    }
    let log = f.world().log[mark..].to_vec();
    let first_remove = log
        .iter()
        .position(|l| l == "secrets.remove")
        .expect("the queued changes ran");
    let before = &log[..first_remove];
    // The rotation's own receipt is signed after the hold too: the
    // agent's record is the second signature.
    assert_eq!(
        before.iter().filter(|l| *l == "keys.sign").count(),
        2,
        "the record was signed before the tenant's queued changes ran: {log:?}"
    );
    assert!(
        before.iter().any(|l| l == "engines.stop_all"),
        "the engines were stopped before the tenant's queued changes ran: {log:?}"
    );
}

// ---- property: concurrent callers end in a state a serial order reaches ----

#[derive(Debug, Clone)]
enum Op {
    RotateTenant,
    RotateLandlord,
    RekeyTenant,
    Assign(u8),
    Release,
    Put(u8),
    Remove(u8),
    ClearSub,
    Cluster,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::RotateTenant),
        Just(Op::RotateLandlord),
        Just(Op::RekeyTenant),
        (0u8..2).prop_map(Op::Assign),
        Just(Op::Release),
        (0u8..2).prop_map(Op::Put),
        (0u8..2).prop_map(Op::Remove),
        Just(Op::ClearSub),
        Just(Op::Cluster),
    ]
}

fn command(op: &Op) -> (Caller, Command) {
    match op {
        Op::RotateTenant => (
            TENANT,
            Command::Rotate {
                role: Role::Tenant,
                confirm: true,
            },
        ),
        Op::RotateLandlord => (
            LANDLORD,
            Command::Rotate {
                role: Role::Landlord,
                confirm: true,
            },
        ),
        Op::RekeyTenant => (TENANT, Command::Rekey { role: Role::Tenant }),
        Op::Assign(n) => (
            LANDLORD,
            Command::Assign {
                name: format!("t{n}"),
                console_key: None,
                confirm: true,
            },
        ),
        Op::Release => (LANDLORD, Command::Release { confirm: true }),
        Op::Put(n) => (
            TENANT,
            Command::PutSecret {
                name: format!("s{n}"),
                envelope: vec![1; usize::from(*n) + 1],
            },
        ),
        Op::Remove(n) => (
            TENANT,
            Command::RemoveSecret {
                name: format!("s{n}"),
            },
        ),
        Op::ClearSub => (TENANT, Command::Boundary(BoundaryChange::ClearSub)),
        Op::Cluster => (
            LANDLORD,
            Command::Boundary(BoundaryChange::EditPeers {
                target: "cluster".into(),
                peers: vec!["10.0.0.1".into()],
                add: true,
            }),
        ),
    }
}

/// What must match a serial run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    landlord: Option<(u64, u64)>,
    tenant: Option<(u64, u64, Option<String>)>,
    volume: Option<FakeVolume>,
    secrets: Vec<(String, u64)>,
    boundary_changes: u32,
    receipts: usize,
    destroying_signals: usize,
}

fn state(f: &Fake) -> State {
    let w = f.world();
    assert_eq!(
        w.unproven_receipts, 0,
        "a receipt with the old key in the kernel"
    );
    State {
        landlord: w
            .landlord
            .as_ref()
            .map(|l| (l.generation, l.key_generation)),
        tenant: w
            .tenant
            .as_ref()
            .map(|l| (l.generation, l.key_generation, l.name.clone())),
        volume: w.volume.clone(),
        secrets: w.secrets.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        boundary_changes: w.boundary_changes,
        receipts: w.receipts.len(),
        destroying_signals: w.signals.iter().filter(|s| s.change.data_destroyed).count(),
    }
}

fn start_state() -> (Fake, Node) {
    let (f, node) = assigned();
    (f, node)
}

fn serial(order: &[&Op]) -> State {
    let (f, node) = start_state();
    for op in order {
        let (c, cmd) = command(op);
        let _ = run(&node, c, cmd);
    }
    node.stop();
    state(&f)
}

/// Every merge of the callers' sequences that keeps each caller's order.
fn merges<'a>(seqs: &[&'a [Op]], prefix: &mut Vec<&'a Op>, out: &mut Vec<Vec<&'a Op>>) {
    if seqs.iter().all(|s| s.is_empty()) {
        out.push(prefix.clone());
        return;
    }
    for i in 0..seqs.len() {
        if let Some((first, rest)) = seqs[i].split_first() {
            let mut next = seqs.to_vec();
            next[i] = rest;
            prefix.push(first);
            merges(&next, prefix, out);
            prefix.pop();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn concurrent_callers_end_where_a_serial_order_ends(
        callers in proptest::collection::vec(proptest::collection::vec(op_strategy(), 1..3), 2..4)
    ) {
        let (f, node) = start_state();
        let node = std::sync::Arc::new(node);
        let threads: Vec<_> = callers
            .iter()
            .cloned()
            .map(|ops| {
                let node = node.clone();
                std::thread::spawn(move || {
                    for op in &ops {
                        let (c, cmd) = command(op);
                        let _ = run(&node, c, cmd);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("caller thread");
        }
        node.stop();
        let got = state(&f);
        // Every destroying change that proved its erase has exactly one receipt.
        prop_assert!(got.receipts <= got.destroying_signals);
        let seqs: Vec<&[Op]> = callers.iter().map(Vec::as_slice).collect();
        let mut orders = Vec::new();
        merges(&seqs, &mut Vec::new(), &mut orders);
        let reachable = orders.iter().any(|o| serial(o) == got);
        prop_assert!(reachable, "no serial order of {:?} reaches {:?}", callers, got);
    }
}

#[test]
fn a_panicking_backend_ends_the_controller_visibly() {
    let (f, node) = assigned();
    f.world().panic_at = Some("volume.wipe".into());
    let e = rotate_tenant(&node).unwrap_err();
    assert!(matches!(e, NodeError::Stopped), "{e}");
    // The agent waits on this to exit (and be restarted).
    futures_block(node.ended());
    let e = rotate_tenant(&node).unwrap_err();
    assert!(matches!(e, NodeError::Stopped), "{e}");
    // Reads still answer from the last snapshot.
    assert_eq!(
        node.snapshot()
            .status
            .tenant
            .as_ref()
            .unwrap()
            .key_generation,
        1
    );
}

/// An agent killed between the TPM's new tenancy and the cleanup after it:
/// the next start finishes that cleanup (the previous tenancy's secrets,
/// sub-boundary, engine records, receipt record); killed before the TPM
/// change, the next start destroys nothing. Either way the record goes.
#[test]
fn a_change_of_tenancy_cut_short_is_finished_at_the_next_start() {
    for (kill_at, committed) in [("secrets.purge", true), ("keys.assign", false)] {
        let (f, node) = assigned();
        f.world().sub_boundary = true;
        let secrets = f.world().secrets.len();
        assert!(secrets > 0);
        f.world().panic_at = Some(kill_at.into());
        let e = run(
            &node,
            LANDLORD,
            Command::Assign {
                name: "next".into(),
                console_key: None,
                confirm: true,
            },
        )
        .unwrap_err();
        assert!(matches!(e, NodeError::Stopped), "{kill_at}: {e}");
        futures_block(node.ended());
        assert!(
            f.world().tenancy_change.is_some(),
            "{kill_at}: recorded before"
        );
        // The agent restarts.
        f.world().panic_at = None;
        f.restart();
        let node = Node::start(f.backends()).expect("start");
        let w = f.world();
        assert_eq!(w.tenancy_change, None, "{kill_at}: the record goes");
        let tenant = node.snapshot().status.tenant.clone().unwrap();
        if committed {
            assert_eq!(tenant.name.as_deref(), Some("next"), "{kill_at}");
            assert!(w.secrets.is_empty(), "{kill_at}: secrets purged");
            assert!(!w.sub_boundary, "{kill_at}: sub-boundary cleared");
            assert!(w.log.iter().any(|l| l == "engines.forget_all"), "{kill_at}");
            assert_eq!(w.tenancy_recorded, vec![true], "{kill_at}");
        } else {
            assert_eq!(tenant.name.as_deref(), Some("acme"), "{kill_at}");
            assert_eq!(w.secrets.len(), secrets, "{kill_at}: nothing destroyed");
            assert!(w.sub_boundary, "{kill_at}");
            assert!(w.tenancy_recorded.is_empty(), "{kill_at}");
        }
    }
}

#[test]
fn a_destroying_rotation_cut_short_before_its_purge_leaves_no_secret_of_the_old_key() {
    for role in [Role::Tenant, Role::Landlord] {
        let (f, node) = assigned();
        // A restart with nothing cut short keeps every secret.
        node.stop();
        f.restart();
        let node = Node::start(f.backends()).expect("start");
        assert_eq!(f.world().secrets.len(), 2, "{role:?}: a plain restart");
        f.world().panic_at = Some("secrets.purge".into());
        let caller = if role == Role::Tenant {
            TENANT
        } else {
            LANDLORD
        };
        let e = run(
            &node,
            caller,
            Command::Rotate {
                role,
                confirm: true,
            },
        )
        .unwrap_err();
        assert!(matches!(e, NodeError::Stopped), "{role:?}: {e}");
        futures_block(node.ended());
        assert_eq!(f.world().secrets.len(), 2, "{role:?}: left by the kill");
        f.world().panic_at = None;
        f.restart();
        let node = Node::start(f.backends()).expect("start");
        {
            let w = f.world();
            assert!(w.secrets.is_empty(), "{role:?}: {:?}", w.secrets);
            assert!(w.log.iter().any(|l| l == "secrets.purge_stale"), "{role:?}");
        }
        // One stored under the new key stays through the next restart.
        run(
            &node,
            TENANT,
            Command::PutSecret {
                name: "c".into(),
                envelope: b"payload".to_vec(),
            },
        )
        .expect("put");
        node.stop();
        f.restart();
        let _node = Node::start(f.backends()).expect("start");
        let names: Vec<String> = f.world().secrets.keys().cloned().collect();
        assert_eq!(names, ["c"], "{role:?}");
    }
}

#[test]
fn a_change_of_tenancy_that_cannot_be_recorded_changes_nothing() {
    let (f, node) = assigned();
    f.fail("events.begin_tenancy_change");
    let e = run(&node, LANDLORD, Command::Release { confirm: true }).unwrap_err();
    assert!(matches!(e, NodeError::Backend { .. }), "{e}");
    assert!(node.snapshot().status.tenant.is_some(), "still assigned");
    assert!(!f.world().log.iter().any(|l| l.starts_with("volume.begin")));
    // Then it goes through, and leaves no record behind.
    run(&node, LANDLORD, Command::Release { confirm: true }).unwrap();
    assert!(node.snapshot().status.tenant.is_none());
    assert_eq!(f.world().tenancy_change, None);
}

/// The keys report an error after the TPM change committed (a step after
/// the manifest's write failed): the previous tenancy is not started again
/// and what the change leaves to do is done now.
#[test]
fn a_change_of_tenancy_that_fails_after_its_commit_is_finished_not_undone() {
    let (f, node) = assigned();
    f.world().sub_boundary = true;
    // An engine of the previous tenancy, running: stopped for the change,
    // never started again.
    f.world().engines.insert(
        "web".into(),
        leasehold_node::fake::FakeEngine {
            image: "web.tar".into(),
            spec: leasehold_engines::spec::Spec::from_toml(r#"command = ["/bin/app"]"#).unwrap(),
            running: true,
            enabled: true,
            stubborn: false,
        },
    );
    f.fail("keys.assign after commit");
    let e = run(
        &node,
        LANDLORD,
        Command::Assign {
            name: "next".into(),
            console_key: None,
            confirm: true,
        },
    )
    .unwrap_err();
    assert!(matches!(e, NodeError::Keys(_)), "{e}");
    let w = f.world();
    assert!(w.secrets.is_empty(), "the previous tenancy's secrets went");
    assert!(!w.sub_boundary);
    assert_eq!(w.tenancy_change, None);
    // The old disk key's kernel copy goes, as after a change that
    // reported success (the volume is made again after the reply).
    assert!(
        w.log.iter().any(|l| l == "volume.wipe"),
        "wiped: {:?}",
        w.log
    );
    assert!(
        !w.log.iter().any(|l| l == "volume.end"),
        "the volume is not marked ready under the old key: {:?}",
        w.log
    );
    assert!(
        w.log.iter().any(|l| l == "engines.stop_all"),
        "stopped for the change: {:?}",
        w.log
    );
    assert!(
        !w.log.iter().any(|l| l.starts_with("engines.start")),
        "nothing of the previous tenancy started again: {:?}",
        w.log
    );
    assert!(
        w.engines.values().all(|e| !e.running),
        "no engine of the previous tenancy runs: {:?}",
        w.engines
    );
}

/// A record that outlived its change (its removal failed) and keys that
/// changed since (a rekey): the next start destroys nothing.
#[test]
fn a_stale_record_of_a_change_of_tenancy_destroys_nothing() {
    let (f, node) = assigned();
    let fp = node.snapshot().status.tenant.clone().unwrap().fingerprint;
    for (after, destroys) in [(fp.clone(), true), ("tenant-old".to_owned(), false)] {
        let secrets = f.world().secrets.clone();
        assert!(!secrets.is_empty());
        f.world().tenancy_change = Some(leasehold_node::TenancyChange {
            kind: "assign".into(),
            tenant_before: Some("tenant-0".into()),
            committed: true,
            tenant_after: Some(after.clone()),
        });
        let node = Node::start(f.backends()).expect("start");
        let w = f.world();
        assert_eq!(w.tenancy_change, None, "{after}");
        if destroys {
            // The keys are as the change left them: finished.
            assert!(w.secrets.is_empty(), "{after}");
        } else {
            assert_eq!(w.secrets, secrets, "{after}: nothing destroyed");
        }
        drop(w);
        // For the next round: secrets again.
        if destroys {
            f.world().secrets = secrets;
        }
        drop(node);
    }
}
