//! Issue 16, first part, on the host harness (T1: real bus, polkitd with the
//! shipped policy, agentd --dev on swtpm, the CLIs as the test users):
//! `landlordctl health` reads the agent's report of a fixture sysfs tree and
//! a fake smartctl named in `[health]`; the tenant is refused by polkit, an
//! outsider by the bus; a critical fault and a hung smartctl make `health`
//! and `status` exit 1.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use leasehold_tests::matrix::{Expect, LANDLORD};
use leasehold_tests::{Lab, LabOptions, Who};
use serde_json::Value;

fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

/// A healthy node: one memory controller, one temperature, one NIC up,
/// one disk whose smartctl passes.
fn fixture(dir: &Path) {
    let sys = dir.join("sys");
    put(&sys, "devices/system/edac/mc/mc0/ce_count", "0\n");
    put(&sys, "devices/system/edac/mc/mc0/ue_count", "0\n");
    put(&sys, "class/hwmon/hwmon0/name", "coretemp\n");
    put(&sys, "class/hwmon/hwmon0/temp1_input", "41000\n");
    put(&sys, "class/hwmon/hwmon0/temp1_crit", "100000\n");
    put(&sys, "class/thermal/thermal_zone0/type", "acpitz\n");
    put(&sys, "class/thermal/thermal_zone0/temp", "40000\n");
    put(&sys, "class/net/eth0/operstate", "up\n");
    put(&sys, "class/net/eth0/flags", "0x1003\n");
    put(&sys, "class/net/eth0/carrier", "1\n");
    put(&sys, "class/net/eth0/carrier_changes", "1\n");
    put(&sys, "block/sda/device/ioerr_cnt", "0x0\n");
    let script = dir.join("smartctl");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             [ -e {d}/hang ] && sleep 1000\n\
             echo '{{\"smartctl\":{{\"exit_status\":0}},\"smart_status\":{{\"passed\":true}},\"temperature\":{{\"current\":33}}}}'\n",
            d = dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
}

fn source<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == name)
        .unwrap_or_else(|| panic!("no {name} in {r}"))
}

#[test]
#[ignore = "needs root: the harness Lab (test users, dbus-daemon, polkitd, agentd on swtpm in a netns)"]
fn health_cli_landlord_reads_the_report_others_are_refused() {
    let fx = tempfile::Builder::new()
        .prefix("lh-health-")
        .tempdir()
        .unwrap();
    fixture(fx.path());
    let config = format!(
        "[health]\nsys_root = \"{}\"\nsmartctl = \"{}\"\nsmart_timeout_ms = 1000\ndeadline_ms = 1000\n",
        fx.path().join("sys").display(),
        fx.path().join("smartctl").display()
    );
    let lab = Lab::start_with_options(LabOptions {
        agent_config: Some(config),
        ..LabOptions::default()
    });

    // Landlord: the whole report, every source read from the fixture.
    let r = lab
        .run(Who::Landlord, "landlordctl", &["health", "--json"])
        .ok()
        .json();
    assert_eq!(r["severity"], "ok", "{r}");
    assert_eq!(r["faults"], serde_json::json!([]), "{r}");
    for s in ["edac", "hwmon", "thermal", "block", "smart", "net"] {
        assert_eq!(source(&r, s)["status"], "ok", "{s}: {r}");
        assert_eq!(
            source(&r, s)["readings"]["items"].as_array().unwrap().len(),
            1,
            "{s}: {r}"
        );
    }
    assert_eq!(
        source(&r, "smart")["readings"]["items"][0]["state"],
        "passed"
    );
    assert_eq!(
        source(&r, "smart")["readings"]["items"][0]["temperature_c"],
        33
    );
    assert_eq!(source(&r, "net")["readings"]["items"][0]["iface"], "eth0");

    // The interface's Version property (root's connection to the lab bus).
    let version = lab.block_on(async {
        let conn = leasehold_tests::connect(&lab.address).await;
        let p = leasehold_dbus_api::HealthProxy::new(&conn).await.unwrap();
        p.version().await.unwrap()
    });
    assert_eq!(version, leasehold_dbus_api::HEALTH_API_VERSION);

    // Tenant (polkit) and outsider (bus policy) are refused, as the
    // matrix's landlord row says; root is the landlord's identity.
    for (i, who) in Who::ALL.into_iter().enumerate() {
        let run = lab.run(who, "landlordctl", &["health", "--json"]);
        assert!(
            LANDLORD[i].matches(0, run.code, &run.stderr),
            "{who:?}: expected {:?}, got {run:?}",
            LANDLORD[i]
        );
    }
    let t = lab.run(Who::Tenant, "landlordctl", &["health"]);
    assert_eq!(t.code, 3, "{t:?}");
    assert!(t.stderr.contains("not authorized"), "{t:?}");
    assert!(!t.stdout.contains("edac"), "nothing leaks: {t:?}");
    assert!(matches!(LANDLORD[3], Expect::BusDenied));

    // Text table and status summary while healthy.
    let text = lab.run(Who::Landlord, "landlordctl", &["health"]).ok();
    assert!(text.stdout.contains("SOURCE"), "{text:?}");
    assert!(text.stdout.trim_end().ends_with("health: ok"), "{text:?}");
    let st = lab.run(Who::Landlord, "landlordctl", &["status"]).ok();
    assert!(st.stdout.contains("health:        ok"), "{st:?}");

    // An uncorrected memory error: critical; health and status exit 1.
    put(
        &fx.path().join("sys"),
        "devices/system/edac/mc/mc0/ue_count",
        "2\n",
    );
    let h = lab.run(Who::Landlord, "landlordctl", &["health", "--json"]);
    assert_eq!(h.code, 1, "{h:?}");
    let r = h.json();
    assert_eq!(r["severity"], "critical", "{r}");
    assert_eq!(r["faults"][0]["subject"], "mc0");
    let st = lab.run(Who::Landlord, "landlordctl", &["--json", "status"]);
    assert_eq!(st.code, 1, "{st:?}");
    let sj = st.json();
    assert_eq!(sj["health"]["severity"], "critical", "{sj}");
    assert!(
        sj["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("uncorrected memory errors")),
        "{sj}"
    );
    put(
        &fx.path().join("sys"),
        "devices/system/edac/mc/mc0/ue_count",
        "0\n",
    );

    // A hung smartctl: the disk is stuck, the call still answers within
    // its deadline (1 s smartctl + 1 s listing), the other sources read.
    fs::write(fx.path().join("hang"), "").unwrap();
    let t0 = Instant::now();
    let h = lab.run(Who::Landlord, "landlordctl", &["health", "--json"]);
    let took = t0.elapsed();
    assert_eq!(h.code, 1, "{h:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let r = h.json();
    assert_eq!(r["severity"], "stuck", "{r}");
    assert_eq!(r["faults"][0]["source"], "smart", "{r}");
    assert_eq!(r["faults"][0]["subject"], "sda", "{r}");
    assert_eq!(source(&r, "edac")["status"], "ok");
    eprintln!("health with a hung smartctl answered in {took:?}");
    // Still hung: the text table says so too (printed for the log).
    let t = lab.run(Who::Landlord, "landlordctl", &["health"]);
    assert_eq!(t.code, 1, "{t:?}");
    assert!(t.stdout.contains("stuck     smart    sda"), "{t:?}");
    eprintln!("{}", t.stdout);
}
