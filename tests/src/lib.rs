//! Test harness for Leasehold's host integration tests (tier T1): a private
//! system-like dbus-daemon, a real polkitd with the shipped policy and rules,
//! real users, agentd in `--dev` mode (real swtpm), the real CLIs, and sshd
//! on loopback. Everything runs as root (CI does; `scripts/test` says so).

#![allow(missing_docs)]

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;

pub mod engine_bench;
pub mod flood;
pub mod json_doc;
pub mod markdown;
pub mod matrix;
pub mod oci;
pub mod slices;

/// Root of the workspace.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A binary of the workspace, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    // Tests and benches live in target/<profile>/deps; binaries one level up.
    let candidates = [dir.join(name), dir.parent().unwrap().join(name)];
    for c in &candidates {
        if c.exists() {
            return c.clone();
        }
    }
    // Benches build in release; fall back to the debug build if that is all there is.
    let debug = workspace_root().join("target/debug").join(name);
    assert!(
        debug.exists(),
        "binary {name} not found next to {}; build it first: cargo build --workspace --bins (scripts/test builds them)",
        exe.display()
    );
    debug
}

/// T1 tests need root (users, mount namespaces, polkitd, sshd). Such a test
/// carries `#[ignore = "needs root: …"]`, so a normal user's `cargo test`
/// lists it as ignored; scripts/test runs it with `--include-ignored`.
pub fn require_root() {
    let uid = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap();
    assert_eq!(
        uid, "0",
        "this test needs root: run it as root with --include-ignored (scripts/test does), \
         and mark it #[ignore = \"needs root: …\"] so that a normal user's cargo test skips it"
    );
}

/// A test user.
#[derive(Debug, Clone)]
pub struct User {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
}

/// Who runs a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Who {
    Root,
    Landlord,
    Tenant,
    Outsider,
    /// A user in both Leasehold groups (a misconfiguration the agent
    /// refuses); not in [`Who::ALL`], the matrix's columns.
    Both,
}

impl Who {
    pub const ALL: [Who; 4] = [Who::Root, Who::Landlord, Who::Tenant, Who::Outsider];

    pub fn user(self) -> Option<&'static User> {
        let u = users();
        match self {
            Who::Root => None,
            Who::Landlord => Some(&u[0]),
            Who::Tenant => Some(&u[1]),
            Who::Outsider => Some(&u[2]),
            Who::Both => Some(both_user()),
        }
    }
}

fn id_of(flag: &str, name: &str) -> u32 {
    let out = Command::new("id").arg(flag).arg(name).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `args` (program first) and asserts it succeeded.
pub fn sh(args: &[&str]) {
    run_ok(Command::new(args[0]).args(&args[1..]));
}

/// Spawns `cmd` with stdout piped and waits for its first line, which must
/// be `ready` (the child's own readiness event: it prints it once listening).
pub fn spawn_ready(cmd: &mut Command, ready: &str) -> Child {
    let mut c = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), ready, "{cmd:?} did not get ready");
    c
}

/// The groups of the shipped rules and three users: landlord, tenant, outsider.
pub fn users() -> &'static [User; 3] {
    static USERS: OnceLock<[User; 3]> = OnceLock::new();
    USERS.get_or_init(|| {
        for g in ["leasehold-landlord", "leasehold-tenant"] {
            run_ok(Command::new("groupadd").args(["-f", "--system", g]));
        }
        let spec = [
            ("lhtest-landlord", Some("leasehold-landlord")),
            ("lhtest-tenant", Some("leasehold-tenant")),
            ("lhtest-outsider", None),
        ];
        for (name, group) in spec {
            let exists = Command::new("id")
                .arg(name)
                .output()
                .unwrap()
                .status
                .success();
            if !exists {
                let mut c = Command::new("useradd");
                c.args(["--system", "--no-create-home", "--shell", "/bin/sh"]);
                if let Some(g) = group {
                    c.args(["-G", g]);
                }
                run_ok(c.arg(name));
            }
            // "*": no password, but not locked (sshd refuses locked accounts).
            run_ok(Command::new("usermod").args(["-p", "*", name]));
        }
        spec.map(|(name, _)| User {
            name,
            uid: id_of("-u", name),
            gid: id_of("-g", name),
        })
    })
}

/// A test user in both `leasehold-landlord` and `leasehold-tenant`.
pub fn both_user() -> &'static User {
    static USER: OnceLock<User> = OnceLock::new();
    USER.get_or_init(|| {
        users(); // the groups
        let name = "lhtest-both";
        let exists = Command::new("id")
            .arg(name)
            .output()
            .unwrap()
            .status
            .success();
        if !exists {
            run_ok(Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--shell",
                "/bin/sh",
                "-G",
                "leasehold-landlord,leasehold-tenant",
                name,
            ]));
        }
        run_ok(Command::new("usermod").args(["-p", "*", name]));
        User {
            name,
            uid: id_of("-u", name),
            gid: id_of("-g", name),
        }
    })
}

/// A command that runs `program` as `who` with the user's supplementary
/// groups, like a login: dbus-daemon takes a caller's groups from its socket
/// (SO_PEERGROUPS), so a process without them is outside the Leasehold
/// groups of the bus policy. (std's `CommandExt::uid` drops them.)
pub fn user_command(who: Who, program: &Path) -> Command {
    match who.user() {
        None => Command::new(program),
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={}", u.uid))
                .arg(format!("--regid={}", u.gid))
                .args(["--init-groups", "--"])
                .arg(program);
            c
        }
    }
}

/// Result of a CLI run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "command failed: {self:?}");
        self
    }
}

/// Calls recorded by the stand-in logind (power actions must not reach the
/// host's logind; the real one is exercised in the VM lab).
#[derive(Debug, Default, Clone)]
pub struct PowerLog(Arc<Mutex<Vec<String>>>);

impl PowerLog {
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

struct Login1(PowerLog);

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl Login1 {
    fn reboot(&self, _interactive: bool) {
        self.0 .0.lock().unwrap().push("reboot".into());
    }
    fn power_off(&self, _interactive: bool) {
        self.0 .0.lock().unwrap().push("poweroff".into());
    }
    fn suspend(&self, _interactive: bool) {
        self.0 .0.lock().unwrap().push("suspend".into());
    }
}

/// One isolated lab: bus, polkitd, agent (and optionally sshd).
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub address: String,
    pub power: PowerLog,
    rt: tokio::runtime::Runtime,
    conn: zbus::Connection,
    bus: Child,
    polkit: Option<Child>,
    agent: Option<Child>,
    sshd: Option<Child>,
    /// Network namespace agentd runs in (None: a private one per start).
    netns: Option<String>,
    /// agentd's config file (TOML) for the next [`Lab::start_agent`];
    /// None: dev-mode defaults.
    pub agent_config: Option<String>,
    /// Extra environment for the next [`Lab::start_agent`] (e.g. a test's
    /// `NOTIFY_SOCKET` standing in for systemd's).
    pub agent_env: Vec<(String, String)>,
    agentd: Option<PathBuf>,
    /// agentd's `--dev` directory.
    agent_dir: PathBuf,
    /// agentd started in this process's network namespace (it makes its own).
    agent_host_netns: bool,
    /// agentd's stderr on ours instead of agentd.log.
    agent_log_to_stderr: bool,
    /// CPU groups like a systemd node's (None: flat). Last: removed after
    /// the processes in them are gone.
    slices: Option<slices::Slices>,
    /// Ends the lab's watchdog when dropped (last, after the processes).
    _watchdog: std::sync::mpsc::Sender<()>,
}

/// agentd configuration for tests about who may do what, not about the
/// fail-closed bound (dbus_hardening freezes polkitd for that): on a loaded
/// CI machine polkitd or the bus has been seen to stall for over the
/// default 5 s, which denies every call then in flight.
pub const PATIENT_AUTH_CONFIG: &str = "[dbus]\nauth_timeout_ms = 30000\n";

/// How to start a [`Lab`]; the default is [`Lab::start`]'s.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// agentd's `--dev` directory (swtpm state and the agent's state); None:
    /// `agent` in the lab's temporary directory. A directory kept across runs
    /// keeps the node's keys (scripts/dev-agent).
    pub agent_dir: Option<PathBuf>,
    /// agentd's configuration (TOML) for the first start.
    pub agent_config: Option<String>,
    /// Start agentd with no namespace wrapper, in this process's network
    /// namespace: `agentd --dev` then makes a namespace of its own when
    /// that is the host's (what a person running it gets).
    pub agent_host_netns: bool,
    /// agentd's log on this process's stderr instead of `agentd.log`
    /// ([`Lab::agent_log`] is then empty).
    pub agent_log_to_stderr: bool,
    /// Every process in one flat CPU group instead of [`slices`]' systemd
    /// layout (the benchmarks' baseline).
    pub flat_cpu: bool,
    /// dbus-broker (package dbus-broker) as the bus instead of dbus-daemon,
    /// with the same configuration (`tests/support/dbus-broker.sh`).
    pub dbus_broker: bool,
    /// Another agentd binary than the workspace's ([`bin`]), e.g. a build
    /// with the bench stand-ins (tests/benches/engines_host.rs).
    pub agentd: Option<PathBuf>,
    /// More environment for agentd, from its first start.
    pub agent_env: Vec<(String, String)>,
}

/// An sshd on loopback for the lab.
#[derive(Debug, Clone)]
pub struct Ssh {
    pub port: u16,
    /// Value for LEASEHOLD_SSH.
    pub command: String,
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let f = fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// How long a lab process (the agent, polkitd, the bus, sshd) has to exit
/// after SIGTERM. A bound, not a synchronisation: the exit is the event
/// waited for. The agent's orderly stop takes well under a second here; one
/// that takes a minute is a bug to report, not to wait out (a CI run once
/// hung to its limit with no word of which process or why).
pub const STOP_BOUND: Duration = Duration::from_secs(60);

/// How long one CLI run may take before the harness kills it and fails the
/// test, saying which command. The CLIs' own long calls are bounded by
/// their `--timeout` (30 min by default): far more than any test needs.
pub const RUN_BOUND: Duration = Duration::from_secs(300);

/// Sends SIGTERM and waits for the exit, at most `STOP_BOUND`; a process
/// still there is killed. `None`: it had to be killed.
fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
    use wait_timeout::ChildExt;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    match child.wait_timeout(STOP_BOUND) {
        Ok(Some(st)) => Some(st),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

/// How long a test's own D-Bus call may wait for its answer: a stuck agent
/// fails the call (and the test) instead of hanging it.
pub const CALL_BOUND: Duration = Duration::from_secs(60);

/// A connection to the lab's bus (as root) whose method calls are bounded
/// by `CALL_BOUND`.
pub async fn connect(address: &str) -> zbus::Connection {
    zbus::connection::Builder::address(address)
        .method_timeout(CALL_BOUND)
        .build()
        .await
        .unwrap()
}

/// How long one [`Lab`] may live. A bound, not a synchronisation: the
/// longest test with a lab takes under 2 min and the benches under 10. A
/// lab still alive at the bound is a hang somewhere no other bound covers
/// (the test process itself): the watchdog prints the test's name and the
/// end of the agent's log and aborts the test binary, so that CI fails
/// saying where instead of running into its own limit saying nothing.
pub const LAB_BOUND: Duration = Duration::from_secs(30 * 60);

/// Starts the watchdog of a lab started by the current thread (libtest
/// names it after the test); dropping the returned sender ends it.
fn watchdog(agent_log: PathBuf) -> std::sync::mpsc::Sender<()> {
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if rx.recv_timeout(LAB_BOUND) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            let log = fs::read_to_string(&agent_log).unwrap_or_default();
            // Not eprintln!: libtest captures that (in this thread too)
            // and an abort never shows it.
            let _ = writeln!(
                std::io::stderr(),
                "{test}: its lab has lived {LAB_BOUND:?}, a hang; aborting the test binary. agentd's log ends:\n{}",
                tail(&log)
            );
            std::process::abort();
        }
    });
    tx
}

/// One line per thread of `pid`: its name, state and what it waits on in
/// the kernel (from /proc: nothing here can block).
fn threads(what: &str, pid: u32) -> String {
    let mut r = format!("{what} (pid {pid}) threads: name state wchan\n");
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        let _ = writeln!(r, "  (gone)");
        return r;
    };
    for t in tasks.flatten() {
        let d = t.path();
        let read = |f: &str| fs::read_to_string(d.join(f)).unwrap_or_default();
        let name = read("comm");
        // stat: "tid (comm) S ...": the state is the first field after the
        // name's closing parenthesis (a name may hold spaces).
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_owned();
        let _ = writeln!(
            r,
            "  {} {} {} {}",
            t.file_name().to_string_lossy(),
            name.trim(),
            state,
            read("wchan")
        );
    }
    r
}

/// The child processes of `pid` (of each of its threads).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Every thread's stack of `pid`, by gdb in batch mode (bounded: gdb
/// attaching to a process stuck in the kernel can wait too). SIGTERM
/// first, so that gdb detaches: one killed while attached can leave the
/// process stopped.
fn stacks(pid: u32) -> String {
    let out = Command::new("timeout")
        .args(["-k", "5", "55", "gdb", "-nx", "-batch", "-p"])
        .arg(pid.to_string())
        .args(["-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => format!(
            "agentd's stacks (gdb):\n{}",
            String::from_utf8_lossy(&o.stdout)
        ),
        Ok(o) => format!(
            "agentd's stacks: gdb failed ({}): {}\n",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("agentd's stacks: cannot run gdb: {e}\n"),
    }
}

/// The end of a log, for a failure message.
fn tail(log: &str) -> &str {
    let mut start = log.len().saturating_sub(8000);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

/// [`output_bounded`] as a [`Run`]: for tests that make their own command
/// (over SSH, say).
pub fn run_bounded(cmd: &mut Command) -> Run {
    Run::from(output_bounded(cmd, None))
}

/// `cmd.output()`, bounded by `RUN_BOUND`: a command still running then is
/// killed with its whole process group (an `ssh` it started, say) and the
/// test fails naming it, with `on_hang`'s report (made before the kill,
/// while the hang is still there); output a descendant still holds open
/// 10 s after the command ended fails the test too, instead of waiting for
/// it.
fn output_bounded(cmd: &mut Command, on_hang: Option<&dyn Fn() -> String>) -> Output {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use wait_timeout::ChildExt;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let reader = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        rx
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let drained = |rx: &std::sync::mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                panic!("{cmd:?} ended, but something it started still holds its output open")
            })
    };
    let status = match child.wait_timeout(RUN_BOUND).unwrap() {
        Some(st) => st,
        None => {
            let report = on_hang.map(|f| f()).unwrap_or_default();
            if let Ok(pgid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait();
            let err = err
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {RUN_BOUND:?} (killed with its process group); its stderr: {}\n{report}",
                String::from_utf8_lossy(&err)
            );
        }
    };
    Output {
        status,
        stdout: drained(&out),
        stderr: drained(&err),
    }
}

async fn wait_for_name(conn: &zbus::Connection, name: &str, what: &str) {
    let dbus = zbus::fdo::DBusProxy::new(conn).await.unwrap();
    let mut changes = dbus.receive_name_owner_changed().await.unwrap();
    let bus_name = zbus::names::BusName::try_from(name).unwrap();
    if dbus.name_has_owner(bus_name).await.unwrap() {
        return;
    }
    let wait = async {
        while let Some(sig) = changes.next().await {
            let args = sig.args().unwrap();
            if args.name().as_str() == name && args.new_owner().is_some() {
                return;
            }
        }
    };
    // A bound, not a synchronisation: the event above is what we wait for.
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .unwrap_or_else(|_| panic!("{what} did not appear on the bus as {name}"));
}

const BUS_CONF: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path=@SOCKET@</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <!-- Test only: the stand-in logind. -->
  <policy user="root">
    <allow own="org.freedesktop.login1"/>
    <allow send_destination="org.freedesktop.login1"/>
  </policy>
  <include>/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf</include>
  <include>@AGENT_POLICY@</include>
</busconfig>
"#;

/// dbus-daemon with `conf`; returns it and its address.
fn start_dbus_daemon(slices: &Option<slices::Slices>, conf: &Path) -> (Child, String) {
    let mut bus = match slices {
        Some(s) => s.service("dbus.service", "dbus-daemon"),
        None => Command::new("dbus-daemon"),
    };
    let mut bus = bus
        .arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--print-address=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dbus-daemon (package dbus)");
    // The address line is printed once the socket listens: our readiness event.
    let mut line = String::new();
    BufReader::new(bus.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line.trim().to_owned();
    assert!(
        address.starts_with("unix:"),
        "dbus-daemon printed {address:?}"
    );
    (bus, address)
}

/// Where dbus-broker is: `/` when the package is installed, else the
/// directory scripts/install-deps unpacks it into (it does not install it:
/// an installed dbus-broker becomes the system bus at the next boot).
pub fn dbus_broker_root() -> Option<PathBuf> {
    if Path::new("/usr/bin/dbus-broker-launch").exists() {
        return Some("/".into());
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let root = cache.join("leasehold/dbus-broker");
    root.join("usr/bin/dbus-broker-launch")
        .exists()
        .then_some(root)
}

/// dbus-broker listening on `socket` with `conf` (the same configuration
/// as dbus-daemon's; its `<listen>` is ignored).
fn start_dbus_broker(
    slices: &Option<slices::Slices>,
    socket: &Path,
    conf: &Path,
) -> (Child, String) {
    let root = dbus_broker_root().unwrap_or_else(|| {
        panic!("dbus-broker not found, installed or unpacked: run scripts/install-deps")
    });
    let script = workspace_root().join("tests/support/dbus-broker.sh");
    let mut bus = match slices {
        Some(s) => s.service("dbus.service", "unshare"),
        None => Command::new("unshare"),
    };
    let mut bus = bus
        .arg("-m")
        .arg(&script)
        .arg(socket)
        .arg(conf)
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare");
    // The script says READY once the socket listens and is open to all
    // (the broker takes it at the first connection): our readiness event.
    // The rest of its stderr is drained so it never blocks.
    let mut err = BufReader::new(bus.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = err.read_line(&mut line).unwrap();
        assert!(n > 0, "dbus-broker.sh ended before listening");
        if line.trim() == "READY" {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    (bus, format!("unix:path={}", socket.display()))
}

impl Lab {
    /// Starts bus, polkitd (shipped policy and rules) and agentd --dev, the
    /// agent in a network namespace of its own so boundaries set through it
    /// never touch the host's firewall.
    pub fn start() -> Lab {
        Self::start_with(None, LabOptions::default())
    }

    /// A lab started as `opts` says.
    pub fn start_with_options(opts: LabOptions) -> Lab {
        Self::start_with(None, opts)
    }

    /// Like [`Lab::start`], every process in one flat CPU group (the
    /// benchmarks' baseline for [`slices`]).
    pub fn start_flat() -> Lab {
        Self::start_with(
            None,
            LabOptions {
                flat_cpu: true,
                ..LabOptions::default()
            },
        )
    }

    /// Like [`Lab::start`], with agentd in the named network namespace
    /// (which must exist, with `lo` up); it keeps its table across agent
    /// restarts.
    pub fn start_in(netns: &str) -> Lab {
        Self::start_with(Some(netns.to_owned()), LabOptions::default())
    }

    /// [`Lab::start_in`] with `opts`.
    pub fn start_in_with_options(netns: &str, opts: LabOptions) -> Lab {
        Self::start_with(Some(netns.to_owned()), opts)
    }

    fn start_with(netns: Option<String>, opts: LabOptions) -> Lab {
        require_root();
        users();
        let slices = if !opts.flat_cpu {
            slices::Slices::create()
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("lh-lab-")
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        // From here on (the bus's start and the first connection too).
        let watchdog = watchdog(dir.path().join("agentd.log"));
        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        fs::set_permissions(&work, fs::Permissions::from_mode(0o1777)).unwrap();

        let socket = dir.path().join("bus.sock");
        let conf = BUS_CONF
            .replace("@SOCKET@", socket.to_str().unwrap())
            .replace(
                "@AGENT_POLICY@",
                workspace_root()
                    .join("dist/dbus/org.leasehold.Agent1.conf")
                    .to_str()
                    .unwrap(),
            );
        fs::write(dir.path().join("bus.conf"), conf).unwrap();
        let (bus, address) = if opts.dbus_broker {
            start_dbus_broker(&slices, &socket, &dir.path().join("bus.conf"))
        } else {
            start_dbus_daemon(&slices, &dir.path().join("bus.conf"))
        };

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let power = PowerLog::default();
        let conn = rt.block_on(async {
            let conn = connect(&address).await;
            conn.object_server()
                .at("/org/freedesktop/login1", Login1(power.clone()))
                .await
                .unwrap();
            conn.request_name("org.freedesktop.login1").await.unwrap();
            conn
        });
        let agent_dir = opts.agent_dir.unwrap_or_else(|| dir.path().join("agent"));
        let mut lab = Lab {
            dir,
            address,
            power,
            rt,
            conn,
            bus,
            polkit: None,
            agent: None,
            sshd: None,
            netns,
            agent_config: opts.agent_config,
            agent_env: opts.agent_env,
            agentd: opts.agentd,
            agent_dir,
            agent_host_netns: opts.agent_host_netns,
            agent_log_to_stderr: opts.agent_log_to_stderr,
            slices,
            _watchdog: watchdog,
        };
        lab.start_polkit();
        lab.start_agent();
        lab
    }

    /// `program` to be started as `unit` in the lab's system.slice (if it
    /// has slices).
    fn system_command(&self, unit: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.slices {
            Some(s) => s.service(unit, program),
            None => Command::new(program),
        }
    }

    /// How the lab's processes share the CPU (benchmark reports).
    pub fn cpu_layout(&self) -> String {
        self.slices.as_ref().map_or_else(
            || "flat: every process competes thread by thread (no CPU groups)".to_owned(),
            slices::Slices::describe,
        )
    }

    /// Runs a future on the lab's runtime (its connections live there).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// polkitd with only Leasehold's .policy and rules, in a private mount
    /// namespace so the host's polkit directories are untouched.
    pub fn start_polkit(&mut self) {
        let actions = self.path("polkit-actions");
        let rules = self.path("polkit-rules");
        for d in [&actions, &rules] {
            let _ = fs::create_dir(d);
        }
        let root = workspace_root();
        fs::copy(
            root.join("dist/polkit/org.leasehold.policy"),
            actions.join("org.leasehold.policy"),
        )
        .unwrap();
        fs::copy(
            root.join("dist/polkit/50-leasehold.rules"),
            rules.join("50-leasehold.rules"),
        )
        .unwrap();
        // polkitd reads rules as user polkitd; the directory is 0700 like /etc/polkit-1/rules.d.
        run_ok(
            Command::new("chown")
                .args(["-R", "polkitd:root"])
                .arg(&rules),
        );
        fs::set_permissions(&rules, fs::Permissions::from_mode(0o700)).unwrap();
        let script = format!(
            "mount --bind {} /usr/share/polkit-1/actions && mount --bind {} /etc/polkit-1/rules.d && exec /usr/lib/polkit-1/polkitd --no-debug",
            actions.display(),
            rules.display()
        );
        let mut cmd = self.system_command("polkit.service", "unshare");
        let child = spawn_logged(
            cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
                .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address),
            &self.path("polkitd.log"),
        );
        self.polkit = Some(child);
        self.rt.block_on(wait_for_name(
            &self.conn,
            "org.freedesktop.PolicyKit1",
            "polkitd",
        ));
    }

    /// polkitd's pid (the mount-namespace wrappers exec it), to freeze it.
    pub fn polkit_pid(&self) -> Option<u32> {
        self.polkit.as_ref().map(Child::id)
    }

    /// agentd's pid (the namespace wrappers exec it).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// The lab's own connection (root), on the lab's runtime.
    pub fn conn(&self) -> &zbus::Connection {
        &self.conn
    }

    pub fn stop_polkit(&mut self) {
        if let Some(mut c) = self.polkit.take() {
            terminate(&mut c);
        }
    }

    /// Sends SIGTERM to agentd and waits for it to exit (at most
    /// `STOP_BOUND`: then it is killed and the test fails with its log).
    pub fn stop_agent(&mut self) -> std::process::ExitStatus {
        let mut c = self.agent.take().expect("agent running");
        terminate(&mut c).unwrap_or_else(|| {
            self.kill_dev_tpm();
            panic!(
                "agentd did not exit within {STOP_BOUND:?} of SIGTERM (killed); its log ends:\n{}",
                tail(&self.agent_log())
            )
        })
    }

    /// Starts agentd --dev on the lab's state and waits until it owns its name.
    pub fn start_agent(&mut self) {
        let agentd = self.agentd.clone().unwrap_or_else(|| bin("agentd"));
        // Both wrappers exec agentd: the child's pid is agentd's.
        let mut cmd = match &self.netns {
            None if self.agent_host_netns => {
                self.system_command("leasehold-agentd.service", &agentd)
            }
            Some(ns) => {
                let mut c = self.system_command("leasehold-agentd.service", "ip");
                c.args(["netns", "exec", ns]).arg(&agentd);
                c
            }
            None => {
                let mut c = self.system_command("leasehold-agentd.service", "unshare");
                c.args([
                    "--net",
                    "sh",
                    "-c",
                    "ip link set lo up && exec \"$0\" \"$@\"",
                ])
                .arg(&agentd);
                c
            }
        };
        if let Some(toml) = &self.agent_config {
            let file = self.path("agentd.toml");
            fs::write(&file, toml).unwrap();
            cmd.arg("--config").arg(file);
        }
        if !self.agent_host_netns || self.netns.is_some() {
            // The wrappers above made the namespace for it.
            cmd.arg("--dev-keep-netns");
        }
        cmd.arg("--dev")
            .arg(&self.agent_dir)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .env("RUST_LOG", "info")
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        let child = if self.agent_log_to_stderr {
            cmd.stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
        } else {
            spawn_logged(&mut cmd, &self.path("agentd.log"))
        };
        let mut child = child;
        // The name appearing is the event waited for; an agent that exits
        // first (a refused start) ends the wait at once instead of at the
        // bound.
        let exited = self.rt.block_on(async {
            let name = wait_for_name(&self.conn, leasehold_dbus_api::BUS_NAME, "agentd");
            tokio::pin!(name);
            loop {
                tokio::select! {
                    () = &mut name => return None,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {
                        if let Ok(Some(st)) = child.try_wait() {
                            return Some(st);
                        }
                    }
                }
            }
        });
        if let Some(st) = exited {
            panic!(
                "agentd exited ({st}) before it served the bus: {}",
                self.agent_log()
            );
        }
        self.agent = Some(child);
    }

    /// agentd's `--dev` directory (`tpm/` holds swtpm's state and pid file,
    /// `state/` the agent's).
    pub fn agent_dir(&self) -> &Path {
        &self.agent_dir
    }

    /// Kills the development swtpm of an agent that had to be killed (an
    /// agent that stops by itself stops it): only the process the pid
    /// file names, and only if it is this lab's swtpm.
    fn kill_dev_tpm(&self) {
        let Some(pid) = self.swtpm_pid() else {
            return;
        };
        let tpm = self.agent_dir.join("tpm");
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("swtpm") && cmdline.contains(tpm.to_str().unwrap_or("\0")) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }

    /// The development swtpm's pid, from its pid file (`tpm/swtpm.pid` in
    /// the agent's `--dev` directory); None without one.
    pub fn swtpm_pid(&self) -> Option<u32> {
        fs::read_to_string(self.agent_dir.join("tpm").join("swtpm.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    }

    /// Waits for agentd to exit by itself (after a signal the test sent),
    /// at most `STOP_BOUND`: then it is killed and the test fails.
    pub fn wait_agent(&mut self) -> std::process::ExitStatus {
        use wait_timeout::ChildExt;
        let mut c = self.agent.take().expect("agent running");
        if let Some(st) = c.wait_timeout(STOP_BOUND).unwrap() {
            return st;
        }
        let _ = c.kill();
        let _ = c.wait();
        self.kill_dev_tpm();
        panic!(
            "agentd did not exit within {STOP_BOUND:?} (killed); its log ends:\n{}",
            tail(&self.agent_log())
        )
    }

    /// Whether agentd is still running.
    pub fn agent_alive(&mut self) -> bool {
        matches!(self.agent.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Method names of one of the agent's interfaces, from introspection.
    pub fn methods_of(&self, interface: &str) -> Vec<String> {
        let xml = self.introspect();
        let start = xml
            .find(&format!("<interface name=\"{interface}\">"))
            .unwrap_or_else(|| panic!("{interface} not in {xml}"));
        let block = &xml[start..start + xml[start..].find("</interface>").unwrap()];
        block
            .split("<method name=\"")
            .skip(1)
            .map(|m| m[..m.find('"').unwrap()].to_owned())
            .collect()
    }

    /// The `org.leasehold.*` interfaces the agent exports.
    pub fn leasehold_interfaces(&self) -> Vec<String> {
        self.introspect()
            .split("<interface name=\"")
            .skip(1)
            .map(|m| m[..m.find('"').unwrap()].to_owned())
            .filter(|i| i.starts_with("org.leasehold."))
            .collect()
    }

    fn introspect(&self) -> String {
        self.rt.block_on(async {
            let p = zbus::fdo::IntrospectableProxy::builder(&self.conn)
                .destination(leasehold_dbus_api::BUS_NAME)
                .path(leasehold_dbus_api::OBJECT_PATH)
                .build()
                .await
                .unwrap();
            p.introspect().await.unwrap()
        })
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.path("agentd.log")).unwrap_or_default()
    }

    /// Writes a file every test user can read.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path("work").join(name);
        fs::write(&p, bytes).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    /// A command for `who`, on the lab's bus, in the lab's work directory.
    pub fn command(&self, who: Who, program: &Path) -> Command {
        let mut c = match (&self.slices, who.user()) {
            (Some(s), Some(_)) => {
                let mut c = s.user("setpriv");
                c.args(user_command(who, program).get_args());
                c
            }
            (Some(s), None) => s.user(program),
            (None, _) => user_command(who, program),
        };
        c.env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .env_remove("LEASEHOLD_SSH")
            .current_dir(self.path("work"))
            .stdin(Stdio::null());
        c
    }

    /// Runs a workspace binary (landlordctl, tenantctl, lh-dbus-probe) as `who`.
    /// One that hangs fails the test with [`Lab::hang_report`].
    pub fn run(&self, who: Who, program: &str, args: &[&str]) -> Run {
        Run::from(output_bounded(
            self.command(who, &bin(program)).args(args),
            Some(&|| self.hang_report()),
        ))
    }

    /// Where the lab's processes are, for a call that did not come back: each
    /// thread's state and kernel wait channel (agentd, swtpm, polkitd, the
    /// bus and the processes it started), agentd's thread stacks (gdb, when installed), and the end
    /// of agentd's log. Made while the hang is still there; every step is
    /// bounded, none can hang the report.
    pub fn hang_report(&self) -> String {
        let mut r = String::from("--- the lab at the hang ---\n");
        let agent = self.agent_pid();
        let procs = [
            ("agentd", agent),
            ("swtpm", self.swtpm_pid()),
            ("polkitd", self.polkit.as_ref().map(Child::id)),
        ];
        for (what, pid) in procs {
            match pid {
                Some(pid) => r.push_str(&threads(what, pid)),
                None => {
                    let _ = writeln!(r, "{what}: not running");
                }
            }
        }
        // The bus and what it started (dbus-broker runs under a script:
        // the launcher, the broker and its journal sink are its children).
        let mut bus = vec![self.bus.id()];
        let mut i = 0;
        while i < bus.len() && bus.len() < 32 {
            bus.extend(children(bus[i]));
            i += 1;
        }
        for pid in bus {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            r.push_str(&threads(&format!("bus: {}", comm.trim()), pid));
        }
        if let Some(pid) = agent {
            r.push_str(&stacks(pid));
        }
        let _ = write!(r, "agentd's log ends:\n{}", tail(&self.agent_log()));
        r
    }

    /// Starts sshd on a free loopback port with a generated host key; the
    /// given users may log in with the returned key. The system bus socket
    /// the remote side sees (/run/dbus/system_bus_socket) is the lab's bus,
    /// through a private mount namespace.
    pub fn start_sshd(&mut self, allowed: &[Who]) -> Ssh {
        let d = self.path("ssh");
        let auth = d.join("authorized");
        fs::create_dir_all(&auth).unwrap();
        for k in ["host_key", "client_key"] {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", ""])
                    .arg("-f")
                    .arg(d.join(k)),
            );
        }
        let client_pub = fs::read(d.join("client_key.pub")).unwrap();
        for who in allowed {
            let u = who.user().expect("ssh users are test users");
            fs::write(auth.join(u.name), &client_pub).unwrap();
        }
        for p in [&d, &auth] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {pid}\nAuthorizedKeysFile {auth}/%u\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             # The test's key directory lives under /tmp, which StrictModes rejects.\nStrictModes no\n",
            host = d.join("host_key").display(),
            pid = d.join("sshd.pid").display(),
            auth = auth.display(),
        );
        fs::write(d.join("sshd_config"), config).unwrap();
        let socket = self
            .address
            .trim_start_matches("unix:path=")
            .split(',')
            .next()
            .unwrap()
            .to_owned();
        let script = format!(
            "mkdir -p /run/dbus /run/sshd && mount -t tmpfs tmpfs /run/dbus && touch /run/dbus/system_bus_socket \
             && mount --bind {socket} /run/dbus/system_bus_socket && exec /usr/sbin/sshd -D -e -f {}",
            d.join("sshd_config").display()
        );
        // Its sessions are the users' (pam_systemd puts them in user.slice
        // on a node; this sshd runs without PAM).
        let mut cmd = match &self.slices {
            Some(s) => s.user("unshare"),
            None => Command::new("unshare"),
        };
        let mut child = spawn_logged(
            cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]),
            &d.join("sshd.log"),
        );
        // sshd has no readiness notification here: poll the port, bounded.
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "sshd exited ({st}): {}",
                    fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "sshd did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let host_pub = fs::read_to_string(d.join("host_key.pub")).unwrap();
        let known = d.join("known_hosts");
        let mut f = fs::File::create(&known).unwrap();
        writeln!(f, "[127.0.0.1]:{port} {}", host_pub.trim()).unwrap();
        self.sshd = Some(child);
        Ssh {
            port,
            command: format!(
                "ssh -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes -o LogLevel=ERROR",
                d.join("client_key").display(),
                known.display()
            ),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(c) = self.sshd.as_mut() {
            terminate(c);
        }
        // An agent that does not stop on SIGTERM fails the test (unless it
        // already failed), with the end of its log saying where it was.
        let agent_stuck = self.agent.as_mut().is_some_and(|c| terminate(c).is_none());
        if agent_stuck {
            self.kill_dev_tpm();
        }
        if let Some(c) = self.polkit.as_mut() {
            terminate(c);
        }
        terminate(&mut self.bus);
        if agent_stuck && !std::thread::panicking() {
            panic!(
                "agentd did not exit within {STOP_BOUND:?} of SIGTERM (killed); its log ends:\n{}",
                tail(&self.agent_log())
            );
        }
    }
}

/// An RSA public key PEM for console registrations.
pub fn console_pem() -> String {
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    static PEM: OnceLock<String> = OnceLock::new();
    PEM.get_or_init(|| {
        let sk = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        sk.to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    })
    .clone()
}
