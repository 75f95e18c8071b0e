use super::*;
use proptest::prelude::*;

/// The example in docs/engines.md ("Spec").
pub(crate) const EXAMPLE: &str = r#"
command = ["/usr/bin/app", "--serve"]
args = ["--port", "8080"]
working_dir = "/srv/app"
user = "1000:1000"
stop_grace = "20s"
data_dirs = ["var/lib/app", "var/cache/app"]
secrets = ["db-password", "tls.key"]
on_failure = ["notify", "restart"]

[env]
RUST_LOG = "info"
APP_MODE = "production"

[limits]
cpus = 0.5
cpu_weight = 200
memory_max = "512M"
memory_high = "384M"
pids_max = 256
io_weight = 100

[restart]
policy = "on-failure"
initial = "100ms"
max = "30s"
factor = 2
reset_after = "60s"
give_up = { restarts = 10, within = "10m" }

[[probes]]
http = { port = 8080, path = "/healthz" }
interval = "10s"
timeout = "2s"
threshold = 3

[[probes]]
exec = ["/usr/bin/app", "check"]
interval = "1m"
timeout = "5s"

[heartbeat]
enabled = true
watchdog = "30s"

[egress]
[[egress.allow]]
name = "database"
peers = ["10.0.5.0/24"]
direction = "out"
protocols = [{ proto = "tcp", ports = [5432] }]
"#;

fn toml_err(text: &str) -> SpecError {
    Spec::from_toml(text).unwrap_err()
}

fn field(text: &str) -> String {
    toml_err(text).field
}

/// A minimal spec plus `extra` lines (before any table).
fn with(extra: &str) -> String {
    format!("command = [\"/bin/app\"]\n{extra}\n")
}

#[test]
fn the_documented_example_parses_in_toml_and_json_alike() {
    let s = Spec::from_toml(EXAMPLE).unwrap();
    assert_eq!(
        s.argv().collect::<Vec<_>>(),
        ["/usr/bin/app", "--serve", "--port", "8080"]
    );
    assert_eq!(
        s.user,
        Some(User::Id {
            uid: 1000,
            gid: Some(1000)
        })
    );
    assert_eq!(
        s.limits.cpu(),
        Some(CpuMax {
            quota_us: 50_000,
            period_us: 100_000
        })
    );
    assert_eq!(s.limits.memory_max, Some(Size(512 << 20)));
    assert_eq!(
        s.restart.give_up.unwrap().within,
        Dur(Duration::from_secs(600))
    );
    assert_eq!(s.probes[1].threshold, 3, "default");
    assert_eq!(s.heartbeat.watchdog, Some(Dur(Duration::from_secs(30))));
    assert!(s.egress_boundary().unwrap().is_some());
    assert!(!s.requests_node_reboot());
    // The same spec in JSON, and back through serialization in both.
    let json = serde_json::to_string_pretty(&s).unwrap();
    assert_eq!(Spec::from_json(&json).unwrap(), s);
    let toml_again = toml::to_string(&s).unwrap();
    assert_eq!(Spec::from_toml(&toml_again).unwrap(), s);
}

#[test]
fn defaults_are_the_documented_ones() {
    let s = Spec::from_toml("command = [\"app\"]").unwrap();
    assert!(s.args.is_empty() && s.env.is_empty() && s.probes.is_empty());
    assert_eq!(s.working_dir, None);
    assert_eq!(s.user, None);
    assert_eq!(s.limits, Limits::default());
    assert_eq!(s.restart.policy, RestartPolicy::OnFailure);
    assert_eq!(s.restart.initial, Dur(Duration::from_millis(100)));
    assert_eq!(s.restart.max, Dur(Duration::from_secs(30)));
    assert_eq!(s.restart.factor, 2.0);
    assert_eq!(s.restart.reset_after, Dur(Duration::from_secs(60)));
    assert_eq!(s.restart.give_up, None);
    assert_eq!(s.heartbeat, Heartbeat::default());
    assert!(!s.heartbeat.enabled);
    assert_eq!(s.heartbeat.ready_timeout, Dur(Duration::from_secs(90)));
    assert!(s.data_dirs.is_empty() && s.secrets.is_empty() && s.egress.is_none());
    assert_eq!(s.on_failure, [FailureAction::Restart]);
    assert_eq!(s.stop_grace, Dur(Duration::from_secs(10)));
    let p = Spec::from_toml("command = [\"app\"]\n[[probes]]\ntcp = 80\n").unwrap();
    assert_eq!(p.probes[0].interval, Dur(Duration::from_secs(10)));
    assert_eq!(p.probes[0].timeout, Dur(Duration::from_secs(1)));
    let h = Spec::from_toml("command = [\"app\"]\n[[probes]]\nhttp = { port = 80 }\n").unwrap();
    assert_eq!(h.probes[0].http.as_ref().unwrap().path, "/");
}

#[test]
fn every_field_kind_is_refused_with_its_path() {
    let cases: &[(&str, &str)] = &[
        // Document shape.
        ("args = []", "document"),
        ("command = [\"/bin/app\"]\ncolour = \"blue\"", "colour"),
        (&with("[limits]\nmemory = \"1G\""), "limits.memory"),
        // argv.
        ("command = []", "command"),
        ("command = \"/bin/app\"", "command"),
        ("command = [\"bin/app\"]", "command[0]"),
        ("command = [\"\"]", "command[0]"),
        ("command = [\"/bin/../app\"]", "command[0]"),
        (&with("args = [\"ok\", \"a\\u0000b\"]"), "args[1]"),
        (&with("args = [1]"), "args[0]"),
        // env.
        (&with("[env]\n1X = \"v\""), "env.1X"),
        (&with("[env]\n\"A=B\" = \"v\""), "env.A=B"),
        (&with("[env]\n\"\" = \"v\""), "env."),
        (&with("[env]\nNOTIFY_SOCKET = \"/x\""), "env.NOTIFY_SOCKET"),
        (&with("[env]\nA = \"x\\u0000y\""), "env.A"),
        (&with("[env]\nA = 1"), "env.A"),
        // working_dir.
        (&with("working_dir = \"app\""), "working_dir"),
        (&with("working_dir = \"/app/\""), "working_dir"),
        (&with("working_dir = \"/a//b\""), "working_dir"),
        (&with("working_dir = \"/a/./b\""), "working_dir"),
        (&with("working_dir = \"/a/../b\""), "working_dir"),
        // user.
        (&with("user = \"0\""), "user"),
        (&with("user = \"0:0\""), "user"),
        (&with("user = \"1000:0\""), "user"),
        (&with("user = \"root\""), "user"),
        (&with("user = \"Bob\""), "user"),
        (&with("user = \"70000\""), "user"),
        (&with("user = 1000"), "user"),
        // limits.
        (&with("[limits]\ncpus = 0"), "limits.cpus"),
        (&with("[limits]\ncpus = 2000"), "limits.cpus"),
        (
            &with("[limits]\ncpus = 1\ncpu_max = \"50000\""),
            "limits.cpus",
        ),
        (&with("[limits]\ncpu_max = \"max\""), "limits.cpu_max"),
        (
            &with("[limits]\ncpu_max = \"500 100000\""),
            "limits.cpu_max",
        ),
        (&with("[limits]\ncpu_max = \"50000 10\""), "limits.cpu_max"),
        (
            &with("[limits]\ncpu_max = \"50000 100000 1\""),
            "limits.cpu_max",
        ),
        (&with("[limits]\ncpu_max = 50000"), "limits.cpu_max"),
        (&with("[limits]\ncpu_weight = 0"), "limits.cpu_weight"),
        (&with("[limits]\ncpu_weight = 70000"), "limits.cpu_weight"),
        (
            &with("[limits]\nmemory_max = \"256X\""),
            "limits.memory_max",
        ),
        (
            &with("[limits]\nmemory_max = \"512K\""),
            "limits.memory_max",
        ),
        (&with("[limits]\nmemory_max = -1"), "limits.memory_max"),
        (
            &with("[limits]\nmemory_max = \"2000T\""),
            "limits.memory_max",
        ),
        (
            &with("[limits]\nmemory_max = \"1G\"\nmemory_high = \"2G\""),
            "limits.memory_high",
        ),
        (&with("[limits]\npids_max = 0"), "limits.pids_max"),
        (&with("[limits]\npids_max = 99999999"), "limits.pids_max"),
        (&with("[limits]\nio_weight = 10001"), "limits.io_weight"),
        // restart.
        (&with("[restart]\npolicy = \"sometimes\""), "restart.policy"),
        (&with("[restart]\ninitial = \"0ms\""), "restart.initial"),
        (&with("[restart]\ninitial = \"1m\""), "restart.initial"),
        (&with("[restart]\ninitial = \"1.5s\""), "restart.initial"),
        (&with("[restart]\ninitial = \"10\""), "restart.initial"),
        (&with("[restart]\ninitial = 10"), "restart.initial"),
        (&with("[restart]\nmax = \"2h\""), "restart.max"),
        (&with("[restart]\nmax = \"2d\""), "restart.max"),
        (&with("[restart]\nfactor = 0.5"), "restart.factor"),
        (&with("[restart]\nfactor = 17"), "restart.factor"),
        (
            &with("[restart]\nreset_after = \"500ms\""),
            "restart.reset_after",
        ),
        (
            &with("[restart]\ngive_up = { restarts = 0, within = \"1m\" }"),
            "restart.give_up.restarts",
        ),
        (
            &with("[restart]\ngive_up = { restarts = 3, within = \"0s\" }"),
            "restart.give_up.within",
        ),
        (
            &with("[restart]\ngive_up = { restarts = 3 }"),
            "restart.give_up",
        ),
        // probes.
        (&with("[[probes]]\ninterval = \"5s\""), "probes[0]"),
        (
            &with("[[probes]]\ntcp = 80\nexec = [\"/bin/true\"]"),
            "probes[0]",
        ),
        (
            &with("[[probes]]\ntcp = 80\n[[probes]]\ntcp = 81\ninterval = \"50ms\""),
            "probes[1].interval",
        ),
        (
            &with("[[probes]]\ntcp = 80\ninterval = \"1s\"\ntimeout = \"1s\""),
            "probes[0].timeout",
        ),
        (
            &with("[[probes]]\ntcp = 80\ntimeout = \"0ms\""),
            "probes[0].timeout",
        ),
        (&with("[[probes]]\ntcp = 0"), "probes[0].tcp"),
        (&with("[[probes]]\ntcp = 70000"), "probes[0].tcp"),
        (&with("[[probes]]\nexec = []"), "probes[0].exec"),
        (
            &with("[[probes]]\nexec = [\"check\", \"a\\u0000\"]"),
            "probes[0].exec[1]",
        ),
        (
            &with("[[probes]]\nhttp = { port = 0 }"),
            "probes[0].http.port",
        ),
        (
            &with("[[probes]]\nhttp = { port = 80, path = \"healthz\" }"),
            "probes[0].http.path",
        ),
        (
            &with("[[probes]]\nhttp = { port = 80, path = \"/a b\" }"),
            "probes[0].http.path",
        ),
        (
            &with("[[probes]]\nhttp = { port = 80, verb = \"POST\" }"),
            "probes[0].http.verb",
        ),
        (
            &with("[[probes]]\ntcp = 80\nthreshold = 0"),
            "probes[0].threshold",
        ),
        // heartbeat.
        (
            &with("[heartbeat]\nwatchdog = \"10s\""),
            "heartbeat.watchdog",
        ),
        (
            &with("[heartbeat]\nenabled = true\nwatchdog = \"10ms\""),
            "heartbeat.watchdog",
        ),
        (&with("[heartbeat]\nenabled = \"yes\""), "heartbeat.enabled"),
        (
            &with("[heartbeat]\nenabled = true\nready_timeout = \"0s\""),
            "heartbeat.ready_timeout",
        ),
        // data dirs.
        (&with("data_dirs = [\"/var/lib/app\"]"), "data_dirs[0]"),
        (&with("data_dirs = [\"ok\", \"../x\"]"), "data_dirs[1]"),
        (&with("data_dirs = [\"a//b\"]"), "data_dirs[0]"),
        (&with("data_dirs = [\"a/\"]"), "data_dirs[0]"),
        (&with("data_dirs = [\"\"]"), "data_dirs[0]"),
        (&with("data_dirs = [\"a b\"]"), "data_dirs[0]"),
        (&with("data_dirs = [\"proc/x\"]"), "data_dirs[0]"),
        (&with("data_dirs = [\"run/secrets\"]"), "data_dirs[0]"),
        // Above the launcher's mount points (they would be made in it).
        (&with("data_dirs = [\"app\", \"run\"]"), "data_dirs[1]"),
        (
            &with("data_dirs = [\"run/leasehold-notify/x\"]"),
            "data_dirs[0]",
        ),
        (
            &with("data_dirs = [\"var/lib\", \"var/lib/app\"]"),
            "data_dirs[1]",
        ),
        (
            &with("data_dirs = [\"var/lib\", \"var/lib\"]"),
            "data_dirs[1]",
        ),
        // secrets.
        (&with("secrets = [\"ok\", \".hidden\"]"), "secrets[1]"),
        (&with("secrets = [\"a/b\"]"), "secrets[0]"),
        (&with("secrets = [\"db\", \"db\"]"), "secrets[1]"),
        // egress: the boundary document's own paths, under `egress`.
        (
            &with("[egress]\n[[egress.allow]]\nname = \"x\"\npeers = [\"10.0.0.0/33\"]"),
            "egress.allow[0].peers[0]",
        ),
        (
            &with("[egress]\n[[egress.failsafe]]\nname = \"x\"\npeers = [\"::/0\"]"),
            "egress.failsafe",
        ),
        (
            &with("[egress]\n[[egress.allow]]\nname = \"x\"\npeers = [\"::/0\"]\nports = [1]"),
            "egress.allow[0].ports",
        ),
        // on_failure, stop_grace.
        (
            &with("on_failure = [\"notify\", \"explode\"]"),
            "on_failure[1]",
        ),
        (
            &with("on_failure = [\"notify\", \"notify\"]"),
            "on_failure[1]",
        ),
        (&with("on_failure = []"), "on_failure"),
        (&with("stop_grace = \"10m\""), "stop_grace"),
    ];
    for (text, want) in cases {
        let e = toml_err(text);
        assert_eq!(&e.field, want, "{text}\n→ {e}");
        assert!(!e.reason.is_empty());
        // The same document in JSON is refused at the same path.
        let value: toml::Value = toml::from_str(text).unwrap();
        let json = serde_json::to_string(&value).unwrap();
        assert_eq!(&Spec::from_json(&json).unwrap_err().field, want, "{json}");
    }
    // Floats TOML can write and JSON cannot.
    for (text, want) in [
        (with("[limits]\ncpus = nan"), "limits.cpus"),
        (with("[limits]\ncpus = inf"), "limits.cpus"),
        (with("[restart]\nfactor = nan"), "restart.factor"),
        (with("[restart]\nfactor = -inf"), "restart.factor"),
    ] {
        assert_eq!(field(&text), want, "{text}");
    }
}

#[test]
fn reasons_are_clear() {
    let r = |t: &str| toml_err(t).to_string();
    assert_eq!(
        r(&with("[limits]\nmemory_max = \"1G\"\nmemory_high = \"2G\"")),
        "limits.memory_high: 2G is above memory_max 1G; it would never apply"
    );
    assert_eq!(
        r(&with(
            "[[probes]]\ntcp = 80\n[[probes]]\ntcp = 81\ninterval = \"1s\"\ntimeout = \"1s\""
        )),
        "probes[1].timeout: 1s: more than 0 and less than the interval (1s)"
    );
    assert!(r(&with("[restart]\ninitial = \"1.5s\"")).contains("no fractions"));
    assert!(r(&with("[restart]\ninitial = \"10\"")).contains("needs a unit"));
    assert!(r(&with("[restart]\ninitial = 10")).contains("\"500ms\""));
    assert!(r(&with("user = \"0\"")).contains("root; engines run unprivileged"));
    assert!(r(&with("secrets = [\".x\"]")).contains(leasehold_envelope::NAME_RULE));
    assert!(r(&with("[limits]\nmemory_max = \"256X\"")).contains("K, M, G or T"));
    assert!(r("command = [\"bin/app\"]").contains("absolute path or a name looked up in PATH"));
    assert!(r(&with("[env]\nNOTIFY_SOCKET = \"x\"")).contains("set by the agent"));
    assert!(r(&with("data_dirs = [\"a\", \"a/b\"]")).contains("nest"));
    let missing = toml_err("args = []");
    assert!(missing.reason.contains("command"), "{missing}");
}

#[test]
fn env_values_are_never_echoed() {
    let secret = "hunter2-very-secret";
    for text in [
        format!("command = [\"a\"]\n[env]\nNOTIFY_SOCKET = \"{secret}\""),
        format!("command = [\"a\"]\n[env]\nA = \"{secret}\\u0000\""),
        format!(
            "command = [\"a\"]\n[env]\nA = \"{}{secret}\"",
            "x".repeat(MAX_ENV_VALUE)
        ),
    ] {
        let e = toml_err(&text);
        assert!(e.field.starts_with("env."), "{e}");
        assert!(!e.to_string().contains(secret), "{e}");
    }
}

#[test]
fn long_keys_are_cut_in_field_paths() {
    let key = "K".repeat(100_000);
    for text in [
        format!("command = [\"a\"]\n[env]\n{key} = 1"),
        format!("command = [\"a\"]\n[env]\n{key} = \"v\""),
    ] {
        let e = toml_err(&text);
        assert!(
            e.field.starts_with("env.KKK") && e.field.ends_with('…'),
            "{}",
            e.field
        );
        assert!(e.to_string().len() < 600, "{} bytes", e.to_string().len());
    }
    let e = Spec::from_json(&format!(
        "{{\"command\": [\"a\"], \"env\": {{\"{key}\": 1}}}}"
    ))
    .unwrap_err();
    assert_eq!(e.field.len(), MAX_FIELD + '…'.len_utf8());
}

#[test]
fn long_input_is_echoed_truncated() {
    let long = format!("/{}", "x/".repeat(400));
    let e = toml_err(&with(&format!("working_dir = \"{long}\"")));
    assert_eq!(e.field, "working_dir");
    assert!(e.reason.len() < 300, "{}", e.reason.len());
    assert!(e.reason.contains("… (801 bytes)"), "{e}");
}

fn base() -> Spec {
    Spec::from_toml("command = [\"/bin/app\"]").unwrap()
}

fn refusal(s: &Spec) -> SpecError {
    s.validate().unwrap_err()
}

#[test]
fn caps_refuse_just_over_and_accept_at_the_cap() {
    // argv: count with command, bytes per argument.
    let mut s = base();
    s.args = vec!["a".into(); MAX_ARGV - 1];
    assert!(s.validate().is_ok());
    s.args.push("a".into());
    assert_eq!(
        refusal(&s).to_string(),
        format!(
            "args: {} arguments with command, at most {MAX_ARGV}",
            MAX_ARGV + 1
        )
    );
    let mut s = base();
    s.args = vec!["a".repeat(MAX_ARG_BYTES)];
    assert!(s.validate().is_ok());
    s.args[0].push('a');
    assert_eq!(refusal(&s).field, "args[0]");
    // env: count, name and value length.
    let mut s = base();
    s.env = (0..MAX_ENV)
        .map(|i| (format!("V{i}"), "x".into()))
        .collect();
    assert!(s.validate().is_ok());
    s.env.insert("ONE_MORE".into(), "x".into());
    assert_eq!(refusal(&s).field, "env");
    let mut s = base();
    s.env
        .insert("N".repeat(MAX_ENV_NAME), "x".repeat(MAX_ENV_VALUE));
    assert!(s.validate().is_ok());
    s.env.insert("N".repeat(MAX_ENV_NAME + 1), "x".into());
    assert_eq!(
        refusal(&s).field,
        format!("env.{}", "N".repeat(MAX_ENV_NAME + 1))
    );
    let mut s = base();
    s.env.insert("V".into(), "x".repeat(MAX_ENV_VALUE + 1));
    assert_eq!(refusal(&s).field, "env.V");
    // argv and env together.
    let mut s = base();
    s.env = (0..MAX_ENV)
        .map(|i| (format!("V{i:03}"), "x".repeat(MAX_ENV_VALUE)))
        .collect();
    let e = refusal(&s);
    assert_eq!(e.field, "document");
    assert!(
        e.reason.contains(&format!("at most {MAX_EXEC_BYTES}")),
        "{e}"
    );
    // Paths.
    let mut s = base();
    let at_cap = format!("/{}x", "x/".repeat((MAX_PATH - 2) / 2));
    assert_eq!(at_cap.len(), MAX_PATH);
    s.working_dir = Some(at_cap.clone());
    assert!(s.validate().is_ok());
    s.working_dir = Some(format!("{at_cap}x"));
    assert!(refusal(&s).reason.contains("at most 1024"));
    // Components, as the kernel's NAME_MAX.
    s.working_dir = Some(format!("/{}", "x".repeat(MAX_COMPONENT)));
    assert!(s.validate().is_ok());
    s.working_dir = Some(format!("/{}", "x".repeat(MAX_COMPONENT + 1)));
    assert!(refusal(&s).reason.contains("NAME_MAX"));
    let mut s = base();
    let rel_at_cap = format!("{}xx", "x/".repeat((MAX_PATH - 2) / 2));
    assert_eq!(rel_at_cap.len(), MAX_PATH);
    s.data_dirs = vec![rel_at_cap.clone()];
    assert!(s.validate().is_ok());
    s.data_dirs = vec![format!("{rel_at_cap}x")];
    assert_eq!(refusal(&s).field, "data_dirs[0]");
    s.data_dirs = vec![format!("a/{}", "d".repeat(MAX_COMPONENT + 1))];
    assert!(refusal(&s).reason.contains("NAME_MAX"));
    // Probes, and a probe's argv.
    let probe = Probe {
        exec: None,
        tcp: Some(80),
        http: None,
        interval: Dur(Duration::from_secs(10)),
        timeout: Dur(Duration::from_secs(1)),
        threshold: 3,
    };
    let mut s = base();
    s.probes = vec![probe.clone(); MAX_PROBES];
    assert!(s.validate().is_ok());
    s.probes.push(probe.clone());
    assert_eq!(refusal(&s).field, "probes");
    let mut s = base();
    s.probes = vec![Probe {
        exec: Some(vec!["/bin/check".into(); MAX_ARGV + 1]),
        tcp: None,
        ..probe
    }];
    assert_eq!(refusal(&s).field, "probes[0].exec");
    s.probes[0].exec = Some(vec!["x".repeat(MAX_ARG_BYTES); MAX_ARGV]);
    let e = refusal(&s);
    assert_eq!(e.field, "probes[0].exec");
    assert!(
        e.reason.contains(&format!("at most {MAX_EXEC_BYTES}")),
        "{e}"
    );
    // Data dirs, secrets, on_failure.
    let mut s = base();
    s.data_dirs = (0..MAX_DATA_DIRS).map(|i| format!("d{i}")).collect();
    assert!(s.validate().is_ok());
    s.data_dirs.push("more".into());
    assert_eq!(refusal(&s).field, "data_dirs");
    let mut s = base();
    s.secrets = (0..MAX_SECRETS).map(|i| format!("s{i}")).collect();
    assert!(s.validate().is_ok());
    s.secrets.push("more".into());
    assert_eq!(refusal(&s).field, "secrets");
    let mut s = base();
    s.on_failure = vec![FailureAction::Notify; 5];
    assert_eq!(refusal(&s).field, "on_failure");
    // Durations and sizes at their caps.
    assert!(Spec::from_toml(&with("[restart]\nmax = \"1h\"\nreset_after = \"24h\"")).is_ok());
    assert_eq!(
        field(&with("[restart]\nreset_after = \"1441m\"")),
        "restart.reset_after"
    );
    assert!(Spec::from_toml(&with("[limits]\nmemory_max = \"1024T\"")).is_ok());
    assert!(Spec::from_toml(&with("[limits]\nmemory_max = \"1M\"\npids_max = 4194304")).is_ok());
    assert!(Spec::from_toml(&with("[limits]\ncpus = 1024")).is_ok());
    assert!(Spec::from_toml(&with("user = \"65534:65534\"")).is_ok());
    // Document bytes, before parsing.
    let at_cap = format!(
        "{{\"command\": [\"a\"]}}{}",
        " ".repeat(MAX_SPEC_BYTES - 18)
    );
    assert_eq!(at_cap.len(), MAX_SPEC_BYTES);
    assert!(Spec::from_json(&at_cap).is_ok());
    let e = Spec::from_json(&format!("{at_cap} ")).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "document: {} bytes, at most {MAX_SPEC_BYTES}",
            MAX_SPEC_BYTES + 1
        )
    );
    let at_cap = format!("command = [\"a\"]\n#{}", "x".repeat(MAX_SPEC_BYTES - 17));
    assert_eq!(at_cap.len(), MAX_SPEC_BYTES);
    assert!(Spec::from_toml(&at_cap).is_ok());
    assert_eq!(
        Spec::from_toml(&format!("{at_cap}x")).unwrap_err().field,
        "document"
    );
}

#[test]
fn json_paths_trailing_content_and_duplicates() {
    let e = Spec::from_json(
        r#"{"command": ["/a"], "probes": [{"tcp": 1}, {"tcp": 2, "interval": "5"}]}"#,
    )
    .unwrap_err();
    assert_eq!(e.field, "probes[1].interval");
    let e = Spec::from_json(r#"{"command": ["/a"], "limits": {"memory_max": "1Q"}}"#).unwrap_err();
    assert_eq!(e.field, "limits.memory_max");
    assert_eq!(
        Spec::from_json(r#"{"command": ["/a"], "limits": {"memory_max": 268435456}}"#)
            .unwrap()
            .limits
            .memory_max,
        Some(Size(256 << 20))
    );
    for text in [
        r#"{"command": ["/a"]}{}"#,
        r#"{"command": ["/a"]} x"#,
        "{\"command\": [\"/a\"]}\n{}",
    ] {
        assert_eq!(
            Spec::from_json(text).unwrap_err().field,
            "document",
            "{text}"
        );
    }
    assert!(Spec::from_json("{\"command\": [\"/a\"]}\n\t ").is_ok());
    let e = Spec::from_json(r#"{"command": ["/a"], "env": {"A": "1", "A": "2"}}"#).unwrap_err();
    assert!(
        e.field.starts_with("env") && e.reason.contains("duplicate key \"A\""),
        "{e}"
    );
    let e = Spec::from_json(r#"{"command": ["/a"], "command": ["/b"]}"#).unwrap_err();
    assert!(e.reason.contains("duplicate field"), "{e}");
    assert!(Spec::from_toml("command = [\"a\"]\n[env]\nA = \"1\"\nA = \"2\"\n").is_err());
}

#[test]
fn values_parse_and_print_back() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("24h"), Ok(MAX_DURATION));
    for bad in [
        "",
        "ms",
        "5",
        "5 s",
        " 5s",
        "5S",
        "5d",
        "-5s",
        "1.5s",
        "25h",
        "99999999999999999999s",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
    for (d, s) in [
        (0, "0ms"),
        (1500, "1500ms"),
        (90_000, "90s"),
        (120_000, "2m"),
        (7_200_000, "2h"),
    ] {
        assert_eq!(Dur(Duration::from_millis(d)).to_string(), s);
    }
    assert_eq!(parse_size("256M"), Ok(256 << 20));
    assert_eq!(parse_size("1536K"), Ok(1536 << 10));
    assert_eq!(parse_size("1000"), Ok(1000));
    for bad in ["", "M", "1 G", "1g", "1GB", "1.5G", "-1", "1025T"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
    assert_eq!(Size(1536 << 10).to_string(), "1536K");
    assert_eq!(Size(3 << 30).to_string(), "3G");
    assert_eq!(Size(1000).to_string(), "1000");
    assert_eq!(
        parse_cpu_max("50000"),
        Ok(CpuMax {
            quota_us: 50_000,
            period_us: 100_000
        })
    );
    assert_eq!(CpuMax::from_cpus(0.25).unwrap().to_string(), "25000 100000");
    assert!(parse_cpu_max("50000  100000").is_err());
    assert!(parse_cpu_max("200000000 100000").is_err(), "2000 CPUs");
    assert_eq!(parse_user("app"), Ok(User::Name("app".into())));
    assert_eq!(
        parse_user("1000"),
        Ok(User::Id {
            uid: 1000,
            gid: None
        })
    );
    for bad in [
        "",
        "0",
        "root",
        "1000:",
        ":1000",
        "1000:1000:1",
        "a b",
        "-x",
        "65535",
    ] {
        assert!(parse_user(bad).is_err(), "{bad}");
    }
}

#[test]
fn egress_can_only_narrow_the_tenant_sub_boundary() {
    let tenant = BoundaryDoc::from_toml(
        "[[allow]]\nname = \"lan\"\npeers = [\"10.0.0.0/16\"]\ndirection = \"out\"\n",
    )
    .unwrap()
    .validate(false)
    .unwrap();
    let s = Spec::from_toml(EXAMPLE).unwrap();
    assert!(s.egress_excess(&tenant).unwrap().is_empty());
    let wide = Spec::from_toml(&with(
        "[egress]\n[[egress.allow]]\nname = \"all\"\npeers = [\"0.0.0.0/0\"]\ndirection = \"out\"",
    ))
    .unwrap();
    assert!(!wide.egress_excess(&tenant).unwrap().is_empty());
    assert!(
        base().egress_excess(&tenant).unwrap().is_empty(),
        "absent: the tenant's applies"
    );
}

#[test]
fn reboot_node_is_a_request_for_later() {
    use FailureAction::*;
    let s = Spec::from_toml(&with("on_failure = [\"reboot-node\", \"notify\"]")).unwrap();
    assert!(s.requests_node_reboot());
    assert_eq!(s.failure_plan(true, false), [Notify, RebootNode]);
    assert_eq!(s.failure_plan(false, false), [Notify]);
    let s = Spec::from_toml(&with(
        "on_failure = [\"restart\", \"reboot-node\", \"reload\", \"notify\"]",
    ))
    .unwrap();
    assert_eq!(s.failure_plan(true, false), [Notify, RebootNode]);
    assert_eq!(s.failure_plan(false, false), [Notify, Reload]);
    assert_eq!(s.failure_plan(false, true), [Notify]);
    assert_eq!(base().failure_plan(true, false), [Restart]);
    assert_eq!(base().failure_plan(true, true), []);
    assert!(!base().requests_node_reboot());
}

proptest! {
    /// Durations and sizes print in a form that parses back to the same
    /// value (what `status` shows can be pasted into a spec).
    #[test]
    fn values_round_trip(ms in 0u64..=86_400_000, bytes in 0u64..=MAX_MEMORY) {
        let d = Dur(Duration::from_millis(ms));
        prop_assert_eq!(parse_duration(&d.to_string()), Ok(d.0));
        prop_assert_eq!(parse_size(&Size(bytes).to_string()), Ok(bytes));
    }

    /// An accepted data dir stays under the image root wherever it is
    /// joined (no root, no `..`, only normal components, as std reads the
    /// path), and accepted dirs never overlap.
    #[test]
    fn accepted_data_dirs_stay_inside_and_apart(dirs in proptest::collection::vec("[a./b_-]{0,3}(/[a./]{0,3}){0,3}", 1..5)) {
        use std::path::{Component, Path};
        let mut s = base();
        s.data_dirs = dirs;
        if s.validate().is_ok() {
            for d in &s.data_dirs {
                let p = Path::new(d);
                prop_assert!(p.components().all(|c| matches!(c, Component::Normal(_))), "{d}");
                prop_assert_eq!(p.components().count(), d.split('/').count(), "{}", d);
            }
            for (i, a) in s.data_dirs.iter().enumerate() {
                for b in &s.data_dirs[i + 1..] {
                    prop_assert!(!Path::new(a).starts_with(b) && !Path::new(b).starts_with(a), "{a} {b}");
                }
            }
        }
    }

    /// An accepted working dir is already what std normalises it to.
    #[test]
    fn accepted_working_dirs_are_normal(w in "[/a.]{0,8}") {
        use std::path::{Component, Path};
        let mut s = base();
        s.working_dir = Some(w.clone());
        if s.validate().is_ok() {
            let p = Path::new(&w);
            prop_assert!(p.is_absolute());
            prop_assert!(p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))));
            let rebuilt: std::path::PathBuf = p.components().collect();
            prop_assert_eq!(rebuilt.to_str(), Some(w.as_str()));
        }
    }
}

/// The first ```toml block after `heading` in docs/engines.md.
pub(crate) fn doc_block(heading: &str) -> &'static str {
    let doc = include_str!("../../../docs/engines.md");
    let section = &doc[doc.find(heading).expect("heading")..];
    let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let len = section[start..].find("```").expect("closed");
    &section[start..start + len]
}

#[test]
fn the_docs_example_is_the_tested_one() {
    assert_eq!(
        Spec::from_toml(doc_block("## Spec")).unwrap(),
        Spec::from_toml(EXAMPLE).unwrap()
    );
}

#[test]
fn a_stored_spec_with_a_data_dir_run_still_loads() {
    // Accepted before the rule came: the agent's state stays readable
    // (the shim refuses to start it; launch::validate).
    let json = r#"{"command":["/bin/app"],"data_dirs":["run"]}"#;
    assert!(Spec::from_json(json).is_err());
    let s = Spec::from_stored_json(json).unwrap();
    assert_eq!(s.data_dirs, ["run"]);
    // Everything else is checked as for a new spec.
    assert!(
        Spec::from_stored_json(r#"{"command":["/bin/app"],"data_dirs":["run/secrets"]}"#).is_err()
    );
}
