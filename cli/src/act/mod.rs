//! `landlordctl act`: an Alertmanager webhook receiver that turns alerts
//! into corrective actions on the right node (docs/health.md,
//! "Corrective actions").
//!
//! One sequencer: a webhook's alerts are decided in order under one lock,
//! and the decisions (alert acted on, tokens taken) are in the state file
//! before any action starts. So an action runs at most once per alert,
//! even if `act` crashes half-way (a reboot is better missed, and seen in
//! the records, than done twice).

pub mod decide;
pub mod http;
pub mod inventory;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use leasehold_dbus_api::LandlordProxy;
use serde::Deserialize;
use tokio::sync::{Mutex, Semaphore};
use zeroize::Zeroizing;

use self::decide::{Alert, Decision, State};
use self::inventory::{Action, Inventory};
use crate::{exit, CliError};

// `landlordctl act`. No doc comment: the arguments of its subcommand are
// deferred, and once built the struct's about would replace the variant's
// (docs/cli.md, "Start-up").
#[allow(missing_docs)]
#[derive(Debug, Clone, clap::Args)]
pub struct ActArgs {
    /// Address to serve the webhook on (POST /alerts), e.g. 127.0.0.1:9465.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The inventory: nodes by Prometheus instance, actions by alertname,
    /// rate limits, token and state files (TOML; docs/health.md).
    #[arg(long, value_name = "FILE")]
    pub inventory: PathBuf,
    /// Decide and record as usual, but do not act: each action is printed
    /// as `would …`. The state goes to STATE_FILE.dry-run, so a rehearsal
    /// never marks a real alert as handled.
    #[arg(long)]
    pub dry_run: bool,
}

/// Connections served at once; past it: 503.
const MAX_CONNECTIONS: usize = 16;
/// A reboot or power-off over SSH and D-Bus, connection included.
const NODE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest token file.
const MAX_TOKEN_BYTES: u64 = 4096;
/// Shortest token: a guessable token is no access control.
const MIN_TOKEN_BYTES: usize = 16;

/// A name in records and hooks: node names.
pub(crate) fn valid_word(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// The bearer token Alertmanager sends (`http_config.authorization`).
struct Token(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(redacted)")
    }
}

impl Token {
    /// Reads the token: one word of at least [`MIN_TOKEN_BYTES`], from a
    /// file other users cannot read or write (fail closed otherwise).
    fn read(path: &Path) -> Result<Self, CliError> {
        use std::os::unix::fs::MetadataExt;
        let bad = |reason: String| {
            CliError::new(
                exit::INVALID,
                format!("token_file {}: {reason}", path.display()),
            )
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.mode() & 0o007 != 0 {
            return Err(bad(format!(
                "mode {:o} lets every user read or change it; chmod o-rwx",
                meta.mode() & 0o777
            )));
        }
        if meta.len() > MAX_TOKEN_BYTES {
            return Err(bad(format!("larger than {MAX_TOKEN_BYTES} bytes")));
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| bad(e.to_string()))?);
        let t = std::str::from_utf8(&bytes)
            .map_err(|_| bad("not UTF-8".into()))?
            .trim();
        if t.len() < MIN_TOKEN_BYTES || t.contains(char::is_whitespace) {
            return Err(bad(format!(
                "must be one word of at least {MIN_TOKEN_BYTES} characters"
            )));
        }
        Ok(Token(Zeroizing::new(t.as_bytes().to_vec())))
    }

    fn matches(&self, header: Option<&[u8]>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(v) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        v.len() == self.0.len() && bool::from(v.ct_eq(&self.0))
    }
}

/// The webhook's body (Alertmanager webhook version 4); only what is read.
#[derive(Debug, Deserialize)]
pub struct Payload {
    /// Must be "4".
    pub version: String,
    /// The group's alerts.
    pub alerts: Vec<Alert>,
}

/// Parses a webhook body; the error names the field.
pub fn parse_payload(body: &[u8]) -> Result<Payload, String> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let p: Payload = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        format!("webhook body: {path}: {}", e.into_inner())
    })?;
    if p.version != "4" {
        return Err(format!(
            "webhook body: version: {:?}: expected \"4\" (Alertmanager 0.x webhook)",
            p.version
        ));
    }
    Ok(p)
}

struct Shared {
    inv: Inventory,
    state_path: PathBuf,
    state: Mutex<State>,
    token: Token,
    dry_run: bool,
    json: bool,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One record line on stdout (a JSON object with --json): what was
/// decided about an alert, or what an action did.
fn record(shared: &Shared, alert: &Alert, event: &str, detail: serde_json::Value) {
    let mut v = serde_json::json!({
        "event": event,
        "alertname": alert.label("alertname"),
        "instance": alert.label("instance"),
        "fingerprint": alert.fingerprint,
        "starts_at": alert.starts_at,
        "dry_run": shared.dry_run,
    });
    if let (Some(o), serde_json::Value::Object(d)) = (v.as_object_mut(), detail) {
        o.extend(d);
    }
    // The alert's labels and the node's errors: nothing in them may drive
    // the terminal (review).
    if shared.json {
        println!("{}", crate::output::terminal_safe(&v.to_string()));
    } else {
        let mut line = format!(
            "{event}: {} on {}",
            alert.label("alertname"),
            alert.label("instance")
        );
        if let Some(o) = v.as_object() {
            for (k, val) in o {
                if matches!(
                    k.as_str(),
                    "event" | "alertname" | "instance" | "starts_at" | "dry_run"
                ) {
                    continue;
                }
                let text = val.as_str().map_or_else(|| val.to_string(), str::to_owned);
                line.push_str(&format!(" {k}={text:?}"));
            }
        }
        if shared.dry_run {
            line.push_str(" (dry run)");
        }
        println!("{}", crate::output::one_line(&line));
    }
}

/// Runs `act` until it is stopped (SIGINT/SIGTERM).
pub async fn run(args: &ActArgs, json: bool) -> Result<(), CliError> {
    let inv = inventory::load(&args.inventory)
        .map_err(|e| CliError::new(exit::INVALID, e.to_string()))?;
    let token = Token::read(&inv.token_file)?;
    let state_path = if args.dry_run {
        let mut p = inv.state_file.clone().into_os_string();
        p.push(".dry-run");
        PathBuf::from(p)
    } else {
        inv.state_file.clone()
    };
    let state =
        decide::load(&state_path).map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    // Written once now: an unwritable state file stops act before any
    // alert is taken, not at the first one.
    decide::save(&state_path, &state).map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("--listen {}: {e}", args.listen)))?;
    let shared = Arc::new(Shared {
        inv,
        state_path,
        state: Mutex::new(state),
        token,
        dry_run: args.dry_run,
        json,
    });
    let addr = listener.local_addr().unwrap_or(args.listen);
    let ready = serde_json::json!({
        "event": "listening",
        "listen": addr.to_string(),
        "nodes": shared.inv.nodes.len(),
        "rules": shared.inv.rules.len(),
        "dry_run": shared.dry_run,
    });
    if json {
        println!("{ready}");
    } else {
        println!(
            "listening on {addr}: {} nodes, {} rules{}",
            shared.inv.nodes.len(),
            shared.inv.rules.len(),
            if shared.dry_run { " (dry run)" } else { "" }
        );
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::new(exit::FAILURE, format!("signal handler: {e}")))?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    accept_loop(listener, shared, stop).await;
    Ok(())
}

/// Connections that have not shown the token yet, at most: a newer one
/// ends the oldest.
const PRE_AUTH: usize = 64;
/// After an accept error (out of file descriptors, say): a pause, so the
/// loop does not spin and flood the log.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections reading their request head, before the token is shown:
/// each is counted here, not in the serving slots, which only a client
/// with the token takes. Before, a slot was taken at accept and held for
/// the 10 s the request may take, so any local user's 16 idle connections
/// made every Alertmanager post a 503 (review; agentd's metrics endpoint
/// had the same, fixed the same way).
#[derive(Default)]
struct PreAuth {
    next: u64,
    open: std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>,
}

impl PreAuth {
    /// Counts a new connection in, ending the oldest if [`PRE_AUTH`] are
    /// open; returns its id and what ends it.
    fn admit(&mut self) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        while self.open.len() >= PRE_AUTH {
            if let Some((_, end)) = self.open.pop_front() {
                let _ = end.send(());
            }
        }
        self.next += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.open.push_back((self.next, tx));
        (self.next, rx)
    }

    /// Connection `id` has shown the token, or is done.
    fn done(&mut self, id: u64) {
        self.open.retain(|(i, _)| *i != id);
    }
}

fn lock_pre(p: &std::sync::Mutex<PreAuth>) -> std::sync::MutexGuard<'_, PreAuth> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves the webhook on `listener` until `stop` completes.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let pre = Arc::new(std::sync::Mutex::new(PreAuth::default()));
    tokio::pin!(stop);
    loop {
        let mut stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    eprintln!("landlordctl act: accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        let (id, mut ended) = lock_pre(&pre).admit();
        let (shared, pre, slots) = (shared.clone(), pre.clone(), slots.clone());
        tokio::spawn(async move {
            let head = tokio::select! {
                h = http::read_head(&mut stream, |h| shared.token.matches(h)) => Some(h),
                _ = &mut ended => None,
            };
            lock_pre(&pre).done(id);
            let head = match head {
                None => return,
                Some(Err(r)) => {
                    log_refusal(r.status, &r.reason);
                    http::respond(
                        &mut stream,
                        r.status,
                        &serde_json::json!({"error": r.reason}),
                    )
                    .await;
                    return;
                }
                Some(Ok(h)) => h,
            };
            let Ok(_slot) = slots.try_acquire_owned() else {
                let busy = serde_json::json!({"error": "too many connections"});
                http::respond(&mut stream, 503, &busy).await;
                return;
            };
            serve(&shared, &mut stream, head).await;
        });
    }
}

/// Logs a refused request, at most one line a second: anyone who reaches
/// the port can cause refusals, and must not flood the log.
fn log_refusal(status: u16, reason: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static HELD: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST.swap(now, Ordering::Relaxed) == now {
        HELD.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match HELD.swap(0, Ordering::Relaxed) {
        0 => eprintln!("landlordctl act: refused a request: {status} {reason}"),
        n => eprintln!(
            "landlordctl act: refused a request: {status} {reason} ({n} more refusals not logged)"
        ),
    }
}

async fn serve(shared: &Arc<Shared>, stream: &mut tokio::net::TcpStream, head: http::Head) {
    let req = match http::read_body(stream, head).await {
        Ok(r) => r,
        Err(r) => {
            log_refusal(r.status, &r.reason);
            http::respond(stream, r.status, &serde_json::json!({"error": r.reason})).await;
            return;
        }
    };
    let payload = match parse_payload(&req.body) {
        Ok(p) => p,
        Err(e) => {
            log_refusal(400, &e);
            http::respond(stream, 400, &serde_json::json!({"error": e})).await;
            return;
        }
    };
    match handle(shared, payload).await {
        Ok(summary) => http::respond(stream, 200, &summary).await,
        Err(e) => {
            // The decisions could not be kept: nothing was done, and a 500
            // makes Alertmanager retry.
            eprintln!("landlordctl act: {e}");
            http::respond(stream, 500, &serde_json::json!({"error": e.to_string()})).await;
        }
    }
}

/// Decides about a payload's alerts (recorded, saved), then starts the
/// actions; answers with the decisions.
async fn handle(
    shared: &Arc<Shared>,
    payload: Payload,
) -> Result<serde_json::Value, decide::StateError> {
    let mut todo = Vec::new();
    let mut summary = Vec::new();
    {
        let mut state = shared.state.lock().await;
        let before = state.clone();
        let t = now();
        let decisions: Vec<(Alert, Decision)> = payload
            .alerts
            .into_iter()
            .map(|a| {
                let d = state.decide(&shared.inv, &a, t);
                (a, d)
            })
            .collect();
        if let Err(e) = decide::save(&shared.state_path, &state) {
            *state = before;
            return Err(e);
        }
        for (alert, d) in decisions {
            let mut detail = serde_json::json!({ "decision": d.name() });
            match &d {
                Decision::Act { node, action, .. } => {
                    detail["node"] = node.clone().into();
                    detail["action"] = action.name().into();
                }
                Decision::AlreadyActed { at } => detail["acted_at"] = (*at).into(),
                Decision::RateLimited { node, scope } => {
                    detail["node"] = node.clone().into();
                    detail["limit"] = (*scope).into();
                }
                Decision::UnknownInstance | Decision::Resolved => {}
            }
            record(shared, &alert, "decided", detail.clone());
            summary.push(detail);
            if let Decision::Act { node, host, action } = d {
                todo.push((alert, node, host, action));
            }
        }
    }
    for (alert, node, host, action) in todo {
        let shared = shared.clone();
        tokio::spawn(async move {
            let result = perform(&shared, &alert, &node, host.as_deref(), &action).await;
            let text = match &result {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("error: {e}"),
            };
            record(
                &shared,
                &alert,
                "done",
                serde_json::json!({"node": node, "action": action.name(), "result": text}),
            );
            let mut state = shared.state.lock().await;
            state.finish(&alert.key(), text);
            if let Err(e) = decide::save(&shared.state_path, &state) {
                eprintln!("landlordctl act: {e}");
            }
        });
    }
    Ok(serde_json::json!({ "decisions": summary }))
}

/// Runs one action (or, in a dry run, says what it would do).
async fn perform(
    shared: &Shared,
    alert: &Alert,
    node: &str,
    host: Option<&str>,
    action: &Action,
) -> Result<(), String> {
    let target = host.unwrap_or("the local bus");
    if shared.dry_run {
        let what = match action {
            Action::Notify => "notify".to_owned(),
            Action::Reboot | Action::PowerOff => {
                format!("would {} {node} ({target})", action.name())
            }
            Action::Hook { command, .. } => format!("would run {}", command.join(" ")),
        };
        record(
            shared,
            alert,
            "dry-run",
            serde_json::json!({"node": node, "action": action.name(), "would": what}),
        );
        return Ok(());
    }
    match action {
        Action::Notify => Ok(()),
        Action::Reboot | Action::PowerOff => {
            let call = async {
                let conn = match host {
                    Some(h) => crate::connect_ssh(h).await,
                    None => crate::connect_local().await,
                }
                .map_err(|e| e.message)?;
                let p = LandlordProxy::new(&conn)
                    .await
                    .map_err(|e| format!("{target}: {e}"))?;
                let r = if matches!(action, Action::Reboot) {
                    p.reboot().await
                } else {
                    p.power_off().await
                };
                r.map_err(|e| CliError::from(e).message)
            };
            tokio::time::timeout(NODE_CALL_TIMEOUT, call)
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "{target}: no answer within {} s",
                        NODE_CALL_TIMEOUT.as_secs()
                    ))
                })
        }
        Action::Hook {
            command,
            timeout_secs,
        } => {
            let mut cmd = tokio::process::Command::new(&command[0]);
            cmd.args(&command[1..])
                .env("LEASEHOLD_NODE", node)
                .env("LEASEHOLD_HOST", host.unwrap_or(""))
                .env("LEASEHOLD_ALERTNAME", alert.label("alertname"))
                .env("LEASEHOLD_INSTANCE", alert.label("instance"))
                .env("LEASEHOLD_SEVERITY", alert.label("severity"))
                .env("LEASEHOLD_FINGERPRINT", &alert.fingerprint)
                .env("LEASEHOLD_STARTS_AT", &alert.starts_at)
                .env(
                    "LEASEHOLD_SUMMARY",
                    alert.annotations.get("summary").map_or("", String::as_str),
                )
                .stdin(std::process::Stdio::null())
                // A group of its own: at its timeout a script's children
                // go with it (review: only the hook itself was killed, and
                // the program it started ran on, unwatched).
                .process_group(0)
                .kill_on_drop(true);
            // Our stdout is the records: the hook's output goes to stderr.
            if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
                cmd.stdout(std::process::Stdio::from(fd));
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("hook {}: {e}", command[0]))?;
            match tokio::time::timeout(Duration::from_secs(*timeout_secs), child.wait()).await {
                Ok(Ok(st)) if st.success() => Ok(()),
                Ok(Ok(st)) => Err(format!("hook {} {st}", command[0])),
                Ok(Err(e)) => Err(format!("hook {}: {e}", command[0])),
                Err(_) => {
                    // Not reaped yet: the group's id is still the hook's.
                    if let Some(pid) = child
                        .id()
                        .and_then(|p| i32::try_from(p).ok())
                        .and_then(rustix::process::Pid::from_raw)
                    {
                        let _ =
                            rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                    }
                    let _ = child.kill().await;
                    Err(format!("hook {} killed after {timeout_secs} s", command[0]))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_body_parsed_and_errors_name_the_field() {
        let body = br#"{"version":"4","groupKey":"{}:{}","status":"firing","receiver":"r",
            "alerts":[{"status":"firing","labels":{"alertname":"LeaseholdNodeDown","instance":"n1:9464"},
            "annotations":{"summary":"s"},"startsAt":"2026-12-04T01:00:00Z","endsAt":"0001-01-01T00:00:00Z",
            "generatorURL":"","fingerprint":"0123abcd"}]}"#;
        let p = parse_payload(body).unwrap();
        assert_eq!(p.alerts.len(), 1);
        assert_eq!(p.alerts[0].label("alertname"), "LeaseholdNodeDown");
        assert_eq!(p.alerts[0].key(), "0123abcd@2026-12-04T01:00:00Z");
        let e = parse_payload(br#"{"version":"4","alerts":[{"status":"firing","startsAt":"x"}]}"#)
            .unwrap_err();
        assert!(e.contains("alerts[0]") && e.contains("fingerprint"), "{e}");
        let e = parse_payload(br#"{"version":"3","alerts":[]}"#).unwrap_err();
        assert!(e.contains("version"), "{e}");
        let e = parse_payload(b"not json").unwrap_err();
        assert!(e.starts_with("webhook body"), "{e}");
    }

    #[test]
    fn token_file_fail_closed() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        std::fs::write(&p, "0123456789abcdefXYZ\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let t = Token::read(&p).unwrap();
        assert!(t.matches(Some(b"Bearer 0123456789abcdefXYZ")));
        assert!(!t.matches(Some(b"Bearer 0123456789abcdefXY")));
        assert!(!t.matches(None));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Token::read(&p).unwrap_err().message;
        assert!(e.contains("token_file") && e.contains("mode 644"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, "short").unwrap();
        assert!(Token::read(&p).unwrap_err().message.contains("16"));
    }

    /// Any local user's idle connections — more than the serving slots
    /// and the waiting places together — keep no authorized post out
    /// (review: 16 of them made every Alertmanager post a 503).
    #[tokio::test]
    async fn idle_connections_do_not_keep_alertmanager_out() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn status(addr: std::net::SocketAddr, req: String) -> String {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            let _ = c.read_to_string(&mut out).await;
            out.lines().next().unwrap_or("").to_owned()
        }
        let post = |auth: &str| {
            let body = r#"{"version":"4","alerts":[]}"#;
            format!(
                "POST /alerts HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let d = tempfile::tempdir().unwrap();
        let mut s = shared(false);
        s.state_path = d.path().join("act.json");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(accept_loop(listener, Arc::new(s), async move {
            let _ = stopped.await;
        }));
        let mut idle = Vec::new();
        for _ in 0..PRE_AUTH + MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        for _ in 0..3 {
            assert_eq!(
                status(addr, post("Bearer 0123456789abcdef")).await,
                "HTTP/1.1 200 OK"
            );
        }
        let refused = status(addr, post("Bearer wrong-token-0000")).await;
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
        drop(idle);
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    fn shared(dry_run: bool) -> Shared {
        let inv = inventory::parse("token_file = \"/t\"\nstate_file = \"/s\"").unwrap();
        Shared {
            inv,
            state_path: PathBuf::from("/nonexistent/act.json"),
            state: Mutex::new(State::default()),
            token: Token(Zeroizing::new(b"0123456789abcdef".to_vec())),
            dry_run,
            json: true,
        }
    }

    fn alert() -> Alert {
        parse_payload(
            br#"{"version":"4","alerts":[{"status":"firing","labels":{"alertname":"LeaseholdNodeDown","instance":"n1:9464","severity":"critical"},
            "annotations":{"summary":"n1 is down"},"startsAt":"2026-12-04T01:00:00Z","fingerprint":"ab12"}]}"#,
        )
        .unwrap()
        .alerts
        .remove(0)
    }

    fn hook(script: &str, timeout_secs: u64) -> Action {
        Action::Hook {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout_secs,
        }
    }

    #[tokio::test]
    async fn hook_gets_the_alert_and_its_failures_are_reported() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("env");
        let s = shared(false);
        let a = alert();
        let script = format!(
            "echo \"$LEASEHOLD_NODE|$LEASEHOLD_HOST|$LEASEHOLD_ALERTNAME|$LEASEHOLD_INSTANCE|$LEASEHOLD_SEVERITY|$LEASEHOLD_FINGERPRINT|$LEASEHOLD_STARTS_AT|$LEASEHOLD_SUMMARY\" > {}",
            out.display()
        );
        perform(&s, &a, "n1", Some("landlord@n1"), &hook(&script, 10))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "n1|landlord@n1|LeaseholdNodeDown|n1:9464|critical|ab12|2026-12-04T01:00:00Z|n1 is down\n"
        );
        let e = perform(&s, &a, "n1", None, &hook("exit 3", 10))
            .await
            .unwrap_err();
        assert!(e.contains("exit status: 3"), "{e}");
        let started = std::time::Instant::now();
        let e = perform(&s, &a, "n1", None, &hook("exec sleep 30", 1))
            .await
            .unwrap_err();
        assert!(e.contains("killed after 1 s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // A script that started a program without exec: the program goes
        // with it at the timeout.
        let pidfile = d.path().join("child");
        let e = perform(
            &s,
            &a,
            "n1",
            None,
            &hook(
                &format!("sleep 30 & echo $! > {}; wait", pidfile.display()),
                1,
            ),
        )
        .await
        .unwrap_err();
        assert!(e.contains("killed after 1 s"), "{e}");
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let gone = || {
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).map_or(true, |st| {
                st.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
        };
        let t = std::time::Instant::now();
        while !gone() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the hook's child {pid} runs on"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let e = perform(
            &s,
            &a,
            "n1",
            None,
            &Action::Hook {
                command: vec!["/nonexistent/hook".into()],
                timeout_secs: 1,
            },
        )
        .await
        .unwrap_err();
        assert!(e.starts_with("hook /nonexistent/hook: "), "{e}");
    }

    #[tokio::test]
    async fn dry_run_acts_on_nothing() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("ran");
        let s = shared(true);
        let script = format!("touch {}", out.display());
        perform(&s, &alert(), "n1", None, &hook(&script, 10))
            .await
            .unwrap();
        // A reboot of an unreachable node "succeeds": nothing is called.
        perform(
            &s,
            &alert(),
            "n1",
            Some("nobody@192.0.2.1"),
            &Action::Reboot,
        )
        .await
        .unwrap();
        assert!(!out.exists());
    }
}
