//! T2: the packaged agent on a real Debian node (QEMU, vTPM, systemd, the
//! real system bus and polkitd, sshd), driven from the host through
//! vagrant/lab. One boot per run. Skip locally with LEASEHOLD_SKIP_VM=1
//! (CI never does). On failure the guest's serial console and agentd
//! journal are printed.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use leasehold_tests::matrix::{Expect, Setup, BOUNDARY_DOC, FAILSAFE_DOC, MATRIX, SUB_DOC};
use leasehold_tests::{console_pem, workspace_root};

const NODE: &str = "1";

struct Vm {
    lab: PathBuf,
    timings: Vec<(String, u64)>,
    t: Instant,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Vm {
    /// Runs a lab verb with a bound (coreutils timeout): no wait without one.
    fn lab(&self, secs: u32, args: &[&str]) -> Out {
        let out = Command::new("timeout")
            .arg(secs.to_string())
            .arg(&self.lab)
            .args(args)
            .output()
            .unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    fn lab_ok(&self, secs: u32, args: &[&str]) -> String {
        let o = self.lab(secs, args);
        assert_eq!(
            o.code, 0,
            "lab {args:?} failed ({}):\n{}\n{}",
            o.code, o.stdout, o.stderr
        );
        o.stdout
    }

    /// A shell command on the node as root.
    #[track_caller]
    fn sh(&self, cmd: &str) -> String {
        self.lab_ok(300, &["ssh", NODE, cmd])
    }

    fn sh_status(&self, cmd: &str) -> Out {
        self.lab(300, &["ssh", NODE, cmd])
    }

    fn step(&mut self, name: &str) {
        let s = self.t.elapsed().as_secs();
        eprintln!("vm: {name} done ({s} s)");
        self.timings.push((name.to_owned(), s));
        self.t = Instant::now();
    }

    fn ssh_env(&self) -> String {
        let cache = std::env::var("LEASEHOLD_LAB_CACHE").unwrap_or_else(|_| {
            let base = std::env::var("XDG_CACHE_HOME")
                .unwrap_or_else(|_| format!("{}/.cache", std::env::var("HOME").unwrap()));
            format!("{base}/leasehold-lab")
        });
        format!(
            "ssh -i {cache}/id_ed25519 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -o ConnectTimeout=10"
        )
    }

    /// tenantctl on the host, over SSH to the node as the guest tenant.
    fn tenantctl(&self, args: &[&str]) -> Out {
        let port = self.lab_ok(30, &["port", NODE]).trim().to_owned();
        let out = Command::new("timeout")
            .arg("120")
            .arg(leasehold_tests::bin("tenantctl"))
            .arg("--host")
            .arg(format!("tt@127.0.0.1:{port}"))
            .args(args)
            .env("LEASEHOLD_SSH", self.ssh_env())
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .output()
            .unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Prints the guest's logs if the test panics.
struct ShowLogsOnFailure(PathBuf);

impl Drop for ShowLogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(o) = Command::new("timeout")
                .arg("60")
                .arg(&self.0)
                .args(["logs", NODE])
                .output()
            {
                eprintln!("{}", String::from_utf8_lossy(&o.stdout));
            }
        }
        let _ = Command::new("timeout")
            .arg("180")
            .arg(&self.0)
            .arg("destroy")
            .output();
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// The guest users of the matrix: root, ll (landlord), tt (tenant), oo (outsider).
const GUEST_USERS: [&str; 4] = ["root", "ll", "tt", "oo"];

fn matrix_script(pem: &str) -> String {
    let mut s = String::from("set -u\ncd /tmp\n");
    s.push_str(&format!("cat > /tmp/console.pem <<'PEM'\n{pem}PEM\nprintf 'correct horse' > /tmp/secret.txt\nchmod 644 /tmp/console.pem /tmp/secret.txt\n"));
    for (name, doc) in [
        ("boundary", BOUNDARY_DOC),
        ("failsafe", FAILSAFE_DOC),
        ("sub", SUB_DOC),
    ] {
        s.push_str(&format!(
            "cat > /tmp/{name}.toml <<'DOC'\n{doc}DOC\nchmod 644 /tmp/{name}.toml\n"
        ));
    }
    s.push_str(
        "as() { u=$1; shift; if [ \"$u\" = root ]; then \"$@\"; else runuser -u \"$u\" -- \"$@\"; fi; }\n\
         boundary() { landlordctl boundary set /tmp/boundary.toml >/dev/null; }\n\
         assigned() { landlordctl --json info | grep -q '\"assigned\":true' || landlordctl --yes assign acme >/dev/null; }\n",
    );
    for c in MATRIX {
        // Allowed power actions would stop the node; reboot and power-off are
        // exercised on their own below, suspend only on the host.
        for (i, user) in GUEST_USERS.iter().enumerate() {
            if c.power.is_some() && c.expect[i] == Expect::Allow {
                continue;
            }
            match c.setup {
                Setup::None => {}
                Setup::Assigned => s.push_str("assigned\n"),
                Setup::SecretExists => s.push_str(
                    "assigned; as tt tenantctl secret put db --from /tmp/secret.txt >/dev/null\n",
                ),
                Setup::Boundary => s.push_str("boundary\n"),
                Setup::AssignedBoundary => s.push_str("assigned; boundary\n"),
            }
            let args: Vec<String> = c
                .args
                .iter()
                .map(|a| match *a {
                    "@PEM" => "/tmp/console.pem".to_owned(),
                    "@SECRET" => "/tmp/secret.txt".to_owned(),
                    "@BOUNDARY" => "/tmp/boundary.toml".to_owned(),
                    "@FAILSAFE" => "/tmp/failsafe.toml".to_owned(),
                    "@SUB" => "/tmp/sub.toml".to_owned(),
                    other => other.to_owned(),
                })
                .collect();
            s.push_str(&format!(
                "as {user} {} {} >/dev/null 2>/tmp/err; echo \"{} {} {user} $? $(grep -c 'not authorized' /tmp/err)\"\n",
                c.program,
                args.join(" "),
                c.interface,
                c.method
            ));
        }
    }
    // The matrix's boundaries allow everything; lift them anyway.
    s.push_str("landlordctl --yes boundary remove >/dev/null 2>&1 || true\n");
    s
}

#[test]
fn vm_lab_end_to_end() {
    if std::env::var("LEASEHOLD_SKIP_VM").as_deref() == Ok("1") {
        eprintln!("vm: skipped (LEASEHOLD_SKIP_VM=1)");
        return;
    }
    leasehold_tests::require_root();
    let lab = workspace_root().join("vagrant/lab");
    let _logs = ShowLogsOnFailure(lab.clone());
    let mut vm = Vm {
        lab,
        timings: Vec::new(),
        t: Instant::now(),
    };

    // Image (cached), a fresh node, the package.
    let build = vm.lab(3600, &["build"]);
    assert_eq!(build.code, 0, "{}", build.stderr);
    eprint!("{}", build.stderr);
    vm.step("image build (or cache hit)");
    vm.lab(300, &["destroy"]);
    vm.lab_ok(600, &["up", NODE]);
    vm.step("boot to SSH");
    let deb = std::fs::read_dir(workspace_root().join("target/debian"))
        .expect("target/debian: run scripts/build-deb first (scripts/test does)")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb in target/debian");
    vm.lab_ok(600, &["install", NODE, deb.to_str().unwrap()]);
    vm.step("install .deb");
    // Lets a developer check the failure path: the guest's logs must be shown.
    if std::env::var("LEASEHOLD_VM_SELFTEST_FAIL").as_deref() == Ok("1") {
        vm.sh("systemctl stop leasehold-agentd");
        assert_eq!(
            vm.sh("systemctl is-active leasehold-agentd || true").trim(),
            "active",
            "self-test failure"
        );
    }

    // The agent runs from its unit on the vTPM, not on swtpm over TCP.
    assert_eq!(
        vm.sh("systemctl is-active leasehold-agentd").trim(),
        "active"
    );
    let fds = vm.sh("ls -l /proc/$(pidof agentd)/fd");
    assert!(
        fds.contains("/dev/tpmrm0"),
        "agentd must hold /dev/tpmrm0: {fds}"
    );
    assert_eq!(
        vm.sh_status("pgrep -x swtpm").code,
        1,
        "no swtpm inside the guest"
    );
    let unit = vm.sh("systemctl show leasehold-agentd -p Type -p BusName -p Delegate");
    assert!(
        unit.contains("Type=dbus")
            && unit.contains("BusName=org.leasehold.Agent1")
            && unit.contains("Delegate=yes"),
        "{unit}"
    );
    assert!(
        vm.sh("getent group leasehold-landlord leasehold-tenant")
            .lines()
            .count()
            == 2
    );

    // Guest users; the tenant may log in over SSH with the lab key.
    vm.sh(
        "id ll >/dev/null 2>&1 || useradd -m -s /bin/bash -G leasehold-landlord ll; \
         id tt >/dev/null 2>&1 || useradd -m -s /bin/bash -G leasehold-tenant tt; \
         id oo >/dev/null 2>&1 || useradd -m -s /bin/bash oo; \
         for u in ll tt oo; do usermod -p '*' $u; done; \
         install -d -o tt -g tt -m 700 /home/tt/.ssh && install -o tt -g tt -m 600 /root/.ssh/authorized_keys /home/tt/.ssh/authorized_keys",
    );
    vm.step("guest users");

    // The authorization matrix over the real system bus and polkitd.
    let script = matrix_script(&console_pem());
    std::fs::write(workspace_root().join("target/vm-matrix.sh"), &script).unwrap();
    let out = vm.sh(&format!(
        "cat > /tmp/matrix.sh <<'SCRIPT'\n{script}SCRIPT\nsh /tmp/matrix.sh"
    ));
    let mut failures = Vec::new();
    let mut checked = 0;
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [iface, method, user, code, denied] = f[..] else {
            continue;
        };
        let case = MATRIX
            .iter()
            .find(|c| c.interface == iface && c.method == method)
            .unwrap();
        let i = GUEST_USERS.iter().position(|u| *u == user).unwrap();
        let ok = match case.expect[i] {
            Expect::Allow => code == case.allowed_code.to_string(),
            Expect::Deny => code == "3" && denied == "1",
        };
        checked += 1;
        if !ok {
            failures.push(line.to_owned());
        }
    }
    let skipped_power = MATRIX.iter().filter(|c| c.power.is_some()).count() * 2;
    assert_eq!(
        checked,
        MATRIX.len() * 4 - skipped_power,
        "matrix output:\n{out}"
    );
    assert!(
        failures.is_empty(),
        "matrix mismatches (iface method user exit denied):\n{}",
        failures.join("\n")
    );
    vm.step("authorization matrix (real system bus)");

    // Fig. 6 hand-over, landlord in the guest, tenant from the host over SSH.
    vm.sh(
        "landlordctl --yes release >/dev/null; runuser -u ll -- landlordctl assign acme >/dev/null",
    );
    let ut_old = json(&vm.sh("runuser -u ll -- landlordctl --json pubkey tenant"));
    let old_pem_path = workspace_root().join("target/vm-ut-old.pem");
    std::fs::write(&old_pem_path, ut_old["pem"].as_str().unwrap()).unwrap();
    let seen = vm.tenantctl(&["--json", "pubkey"]);
    assert_eq!(seen.code, 0, "tenantctl --host: {}", seen.stderr);
    assert_eq!(json(&seen.stdout)["fingerprint"], ut_old["fingerprint"]);
    let info = vm.tenantctl(&["--json", "info"]);
    assert_eq!(json(&info.stdout)["tenant_name"], "acme");
    let rot = vm.tenantctl(&["--json", "--yes", "rotate"]);
    assert_eq!(rot.code, 0, "{}", rot.stderr);
    let ut_new = json(&vm.tenantctl(&["--json", "pubkey"]).stdout);
    assert_ne!(ut_new["fingerprint"], ut_old["fingerprint"]);
    let denied = vm.sh_status("runuser -u ll -- landlordctl pubkey tenant");
    assert_eq!(denied.code, 3, "only the tenant holds the new UT");
    let secret = workspace_root().join("target/vm-secret.txt");
    std::fs::write(&secret, b"tenant secret").unwrap();
    let old = vm.tenantctl(&[
        "secret",
        "put",
        "old",
        "--from",
        secret.to_str().unwrap(),
        "--to",
        old_pem_path.to_str().unwrap(),
    ]);
    assert_eq!(
        old.code, 6,
        "sealed to the old UT must fail: {}",
        old.stderr
    );
    let new = vm.tenantctl(&["secret", "put", "db", "--from", secret.to_str().unwrap()]);
    assert_eq!(new.code, 0, "{}", new.stderr);
    vm.step("fig. 6 hand-over over SSH");

    // Reboot through the landlord's API: keys persist in the vTPM, the agent comes back.
    let before = json(&vm.sh("landlordctl --json info"));
    let boot_id = vm.sh("cat /proc/sys/kernel/random/boot_id");
    let r = vm.sh_status("runuser -u ll -- landlordctl reboot");
    assert!(
        r.code == 0 || r.code == 255,
        "reboot request: {} {}",
        r.code,
        r.stderr
    );
    wait_until(400, 2, "node did not come back after reboot", || {
        let o = vm.lab(30, &["ssh", NODE, "cat /proc/sys/kernel/random/boot_id"]);
        o.code == 0 && o.stdout != boot_id
    });
    vm.sh("timeout 120 sh -c 'until systemctl is-active -q leasehold-agentd; do sleep 1; done'");
    let after = json(&vm.sh("landlordctl --json info"));
    for k in [
        "node_id",
        "landlord_fingerprint",
        "tenant_fingerprint",
        "tenant_name",
    ] {
        assert_eq!(before[k], after[k], "{k} changed across reboot");
    }
    let list = json(&vm.tenantctl(&["--json", "secret", "list"]).stdout);
    assert_eq!(list[0]["name"], "db", "secret survives reboot");
    vm.step("reboot via landlordctl, agent back with the same keys");

    // Power off through the landlord's API stops the VM.
    let r = vm.sh_status("runuser -u ll -- landlordctl poweroff");
    assert!(
        r.code == 0 || r.code == 255,
        "poweroff request: {} {}",
        r.code,
        r.stderr
    );
    wait_until(
        180,
        1,
        "QEMU still running after landlordctl poweroff",
        || vm.lab(30, &["running", NODE]).code != 0,
    );
    vm.step("power off via landlordctl");
    eprintln!("vm: phase timings (s): {:?}", vm.timings);
}

/// Polls `done` every `every` seconds until it holds, failing with `what`
/// after `secs`. Only for conditions with no event to wait on (a guest
/// rebooting or powering off is seen from outside by trying).
fn wait_until(secs: u64, every: u64, what: &str, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed().as_secs() < secs, "{what}");
        std::thread::sleep(std::time::Duration::from_secs(every));
    }
}
