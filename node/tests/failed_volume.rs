//! T0, issue 15 points 4-6: a failed or stuck volume (an initialization
//! that never finished, a host without device-mapper) never blocks a key
//! change: the erase happens, the outcome and the receipt say the volume
//! was failed. `ForgetVolume` drops such a record after confirmation and
//! refuses a usable volume. `InitVolume` checks before it asks, and every
//! confirmation names what it destroys (tenant, device, secrets).

use std::time::SystemTime;

use leasehold_node::fake::Fake;
use leasehold_node::{Caller, ChangeReport, Command, Node, NodeError, Outcome, Request};
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

fn changed(o: Outcome) -> ChangeReport {
    match o {
        Outcome::Changed(r) => r,
        other => panic!("expected a key change, got {other:?}"),
    }
}

/// A node assigned to `acme`, with a volume in `state` that the kernel
/// holds no key of (never mapped: no device-mapper, or the init failed).
fn with_failed_volume(state: &'static str) -> (Fake, Node) {
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
    {
        let mut w = f.world();
        let v = w.volume.as_mut().expect("volume");
        v.state = state;
        v.kernel_key = None;
        w.log.clear();
    }
    (f, node)
}

fn receipt_body(r: &ChangeReport) -> serde_json::Value {
    serde_json::from_str(&r.receipt.as_ref().expect("a receipt").body).expect("JSON")
}

#[test]
fn a_failed_volume_does_not_block_either_rotation_and_is_named_in_the_receipt() {
    for (caller, role) in [(TENANT, Role::Tenant), (LANDLORD, Role::Landlord)] {
        let (f, node) = with_failed_volume("initializing");
        let before = f.world().tenant.clone().expect("tenant").key_generation;
        let r = changed(rotate(&node, caller, role).unwrap_or_else(|e| panic!("{role}: {e}")));
        // The erase happened: new generations, a receipt that says the
        // kernel held no key and that the volume was failed.
        let body = receipt_body(&r);
        assert_eq!(body["volume"]["kernel_key"], "not_mapped", "{role}: {body}");
        assert!(
            body["volume"]["failed"]
                .as_str()
                .is_some_and(|s| s.contains("device-mapper")),
            "{role}: {body}"
        );
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("the volume was failed")),
            "{role}: {:?}",
            r.warnings
        );
        node.stop();
        let w = f.world();
        if role == Role::Tenant {
            assert_eq!(w.tenant.as_ref().unwrap().key_generation, before + 1);
        } else {
            assert_eq!(w.landlord.as_ref().unwrap().key_generation, 2);
        }
        // The remake after the reply ran under the new key.
        assert_eq!(w.volume.as_ref().unwrap().state, "ready", "{role}");
    }
}

#[test]
fn a_wipe_that_fails_on_a_failed_volume_still_erases_without_claiming_it() {
    let (f, node) = with_failed_volume("failed");
    f.fail("volume.wipe");
    let r = changed(rotate(&node, TENANT, Role::Tenant).expect("not blocked"));
    assert!(r.change.data_destroyed);
    assert!(r.receipt.is_none(), "the kernel's copy was not shown gone");
    assert!(
        r.warnings.iter().any(|w| w.contains("no erase receipt")),
        "{:?}",
        r.warnings
    );
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("the volume was failed")));
    assert_eq!(f.world().tenant.as_ref().unwrap().key_generation, 2);
    // The remake also fails (still no device-mapper): the next rotation
    // is not blocked either.
    f.fail("volume.remake");
    node.stop();
    f.world().volume.as_mut().unwrap().state = "failed";
    let node = Node::start(f.backends()).expect("start");
    f.fail("volume.wipe");
    changed(rotate(&node, TENANT, Role::Tenant).expect("the second rotation"));
    assert_eq!(f.world().tenant.as_ref().unwrap().key_generation, 3);
}

#[test]
fn a_usable_volume_whose_wipe_fails_still_refuses_the_rotation() {
    let (f, node) = with_failed_volume("ready");
    f.world().volume.as_mut().unwrap().kernel_key = Some(vec![]);
    f.fail("volume.wipe");
    let e = rotate(&node, TENANT, Role::Tenant).unwrap_err();
    assert!(e.to_string().contains("wiping"), "{e}");
    assert_eq!(f.world().tenant.as_ref().unwrap().key_generation, 1);
}

#[test]
fn release_and_assign_go_past_a_failed_volume_with_warnings() {
    let (f, node) = with_failed_volume("initializing");
    let r = changed(run(&node, LANDLORD, Command::Release { confirm: true }).expect("release"));
    assert!(r.receipt.is_some());
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("the volume was failed")));
    assert!(f.world().tenant.is_none());
    node.stop();
    let (f, node) = with_failed_volume("failed");
    let r = changed(
        run(
            &node,
            LANDLORD,
            Command::Assign {
                name: "beta".into(),
                console_key: None,
                confirm: true,
            },
        )
        .expect("assign"),
    );
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("the volume was failed")));
    assert_eq!(
        f.world().tenant.as_ref().unwrap().name.as_deref(),
        Some("beta")
    );
}

#[test]
fn confirmations_name_the_tenant_the_volume_and_the_secrets() {
    let (f, node) = with_failed_volume("ready");
    f.world().volume.as_mut().unwrap().kernel_key = Some(vec![]);
    run(
        &node,
        TENANT,
        Command::PutSecret {
            name: "db".into(),
            envelope: b"x".to_vec(),
        },
    )
    .expect("put");
    let msg = |c: Command| match run(&node, LANDLORD, c) {
        Err(NodeError::ConfirmationRequired(m)) => m,
        other => panic!("{other:?}"),
    };
    for m in [
        msg(Command::Release { confirm: false }),
        msg(Command::Assign {
            name: "beta".into(),
            console_key: None,
            confirm: false,
        }),
        msg(Command::Rotate {
            role: Role::Landlord,
            confirm: false,
        }),
    ] {
        assert!(m.contains("tenant \"acme\""), "{m}");
        assert!(m.contains("/dev/fake"), "{m}");
        assert!(m.contains("1 stored secrets"), "{m}");
    }
    assert!(msg(Command::Assign {
        name: "beta".into(),
        console_key: None,
        confirm: false,
    })
    .contains("\"beta\""));
    // Nothing changed.
    assert_eq!(f.world().tenant.as_ref().unwrap().key_generation, 1);
}

#[test]
fn init_checks_the_device_before_asking() {
    let f = Fake::new();
    let node = Node::start(f.backends()).expect("start");
    let e = run(
        &node,
        LANDLORD,
        Command::InitVolume {
            device: "nonexistent".into(),
            force: false,
            confirm: false,
        },
    )
    .unwrap_err();
    assert!(
        matches!(&e, NodeError::Backend { source, .. } if source.message.contains("no such block device")),
        "refused before the confirmation: {e}"
    );
    match run(
        &node,
        LANDLORD,
        Command::InitVolume {
            device: "/dev/vdb".into(),
            force: false,
            confirm: false,
        },
    ) {
        Err(NodeError::ConfirmationRequired(m)) => {
            assert!(m.contains("erases everything on /dev/vdb (1 GiB)"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    let w = f.world();
    assert!(w.volume.is_none());
    assert!(!w.log.iter().any(|s| s == "volume.init"), "{:?}", w.log);
}

#[test]
fn forget_drops_a_failed_record_after_confirmation_only() {
    let (f, node) = with_failed_volume("ready");
    f.world().volume.as_mut().unwrap().kernel_key = Some(vec![]);
    // A usable volume: refused, naming the field.
    let e = run(&node, LANDLORD, Command::ForgetVolume { confirm: true }).unwrap_err();
    assert!(
        matches!(
            &e,
            NodeError::Invalid {
                field: "volume",
                ..
            }
        ),
        "{e}"
    );
    f.world().volume.as_mut().unwrap().state = "failed";
    // The tenant may not.
    let e = run(&node, TENANT, Command::ForgetVolume { confirm: true }).unwrap_err();
    assert!(
        matches!(e, NodeError::Keys(KeyError::NotPermitted { .. })),
        "{e}"
    );
    // Unconfirmed: asked, naming the device and why it failed.
    match run(&node, LANDLORD, Command::ForgetVolume { confirm: false }) {
        Err(NodeError::ConfirmationRequired(m)) => {
            assert!(
                m.contains("/dev/fake") && m.contains("device-mapper"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(f.world().volume.is_some());
    match run(&node, LANDLORD, Command::ForgetVolume { confirm: true }) {
        Ok(Outcome::VolumeForgotten(Some(d))) => assert_eq!(d, "/dev/fake"),
        other => panic!("{other:?}"),
    }
    assert!(f.world().volume.is_none());
    // Already so: a result, not an error.
    assert!(matches!(
        run(&node, LANDLORD, Command::ForgetVolume { confirm: false }),
        Ok(Outcome::VolumeForgotten(None))
    ));
}
