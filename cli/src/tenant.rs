//! `tenantctl`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use leasehold_dbus_api::tenant_engines::TenantEnginesProxy;
use leasehold_dbus_api::{EngineInfo, TenantProxy};

use crate::boundary::{
    emit_check, emit_info, explain_result, in_document, read_document, ExplainArgs,
};
use crate::output::{
    change_text, emit, emit_change, emit_done, node_info_json, node_info_text, secret_change_json,
    secrets_json, volume_json, volume_text,
};
use crate::{
    emit_public_key, exit, read_arg_file, read_pem_file, run_main, with_confirmation, CliError,
    GlobalArgs, EXIT_CODES_HELP,
};

/// Command line of `tenantctl`. `C` is the subcommand tree: the whole
/// [`Command`], or [`EngineOnly`] for the hot path ([`parse`]).
#[derive(Debug, Parser)]
#[command(name = "tenantctl", version, about = "Manage a Leasehold node as its tenant", after_help = EXIT_CODES_HELP)]
pub struct Args<C: Subcommand = Command> {
    /// --host, --quiet, --no-pager (shared with landlordctl).
    #[command(flatten)]
    pub global: GlobalArgs,
    /// Print JSON instead of text.
    ///
    /// One value per command (`monitor`: one object per line); failures
    /// as `{"error": {"name", "exit", "message"}}` with the same exit
    /// status. The schema of every command is a stable API: docs/json.md
    /// (installed as /usr/share/doc/leasehold/json.md).
    #[arg(long, global = true)]
    pub json: bool,
    /// Confirm operations that destroy data, without asking.
    #[arg(long, short = 'y', global = true)]
    pub yes: bool,
    /// Stop waiting for the node after this long (e.g. 90s, 30m, 2h; 0: no
    /// limit): a long operation (rotate, rekey), and every other call and the
    /// connection. The node may still finish it: `info`.
    #[arg(long, global = true, value_name = "DURATION", default_value = crate::progress::DEFAULT_TIMEOUT, value_parser = crate::progress::parse_timeout)]
    pub timeout: crate::progress::Timeout,
    /// What to do.
    #[command(subcommand)]
    pub command: C,
}

/// Only the engine subtree of [`Command`], under the same globals: what
/// [`parse`] tries first when the command line names `engine`.
#[derive(Debug, Subcommand)]
pub enum EngineOnly {
    // Keep in step with `Command::Engine`
    // (`the_engine_subtree_is_the_whole_tree_s_engine`).
    /// The tenant's engines (workloads from OCI images).
    #[command(subcommand)]
    Engine(EngineCommand),
}

/// Parses `tenantctl`'s command line (docs/cli.md, "Start-up"). A line
/// that names `engine` is parsed against the engine subtree alone first
/// ([`parse_engine_only`]), and that parse is kept only when it succeeds;
/// it then means what the whole tree makes of the line
/// (`the_engine_subtree_parses_a_line_as_the_whole_tree_does`). Anything
/// else (help, version, an error, another command) is parsed by the whole
/// tree, so every message is the whole tree's.
pub fn parse<I, T>(argv: I) -> Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString>,
{
    let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
    if let Some(a) = parse_engine_only(&argv, crate::leak) {
        return Ok(a);
    }
    crate::parse_kept(&argv, crate::leak)
}

/// `argv` parsed against [`EngineOnly`] when it names `engine` and that
/// parse succeeds; `None` otherwise. `keep` is what becomes of the tree.
pub(crate) fn parse_engine_only(
    argv: &[std::ffi::OsString],
    keep: fn(clap::Command),
) -> Option<Args> {
    if !argv.iter().skip(1).any(|a| a == "engine") {
        return None;
    }
    let a = crate::parse_kept::<Args<EngineOnly>>(argv, keep).ok()?;
    let EngineOnly::Engine(cmd) = a.command;
    Some(Args {
        global: a.global,
        json: a.json,
        yes: a.yes,
        timeout: a.timeout,
        command: Command::Engine(cmd),
    })
}

/// Subcommands.
#[derive(Debug, Subcommand)]
// Each subcommand's arguments are built only when it is used
// (docs/cli.md, "Start-up"); so in every enum below.
#[command(defer = true)]
pub enum Command {
    /// Show the node as the tenant sees it.
    Info,
    /// Print the tenant public key (UT) as PEM.
    Pubkey {
        /// Write the PEM to FILE instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Take ownership: new tenant key pair and KT (destroys tenant data).
    Rotate,
    /// New tenant key pair, KT kept (no data lost).
    Rekey,
    /// Register a tenant console's public key.
    RegisterConsole {
        /// Console name.
        name: String,
        /// Public key PEM file.
        pem: PathBuf,
    },
    /// Seal FILE to a public key, locally, without a TPM or a node.
    Seal {
        /// Recipient public key (PEM), e.g. UT.
        #[arg(long, value_name = "PEM")]
        to: PathBuf,
        /// File to seal.
        file: PathBuf,
        /// Envelope output (default: FILE.lhev).
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The tenant's secret store.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// The tenant's sub-boundary (nftables), inside the landlord's cluster boundary.
    #[command(subcommand)]
    Boundary(BoundaryCommand),
    /// The tenant's encrypted volume.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// The tenant's engines (workloads from OCI images).
    #[command(subcommand)]
    Engine(EngineCommand),
    /// Print the node's TPM-held signing key (verifies erase receipts) as PEM.
    ReceiptKey {
        /// Write the PEM to FILE instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Verify an erase receipt and that the node's key signed it.
    ///
    /// The receipt: --json of rotate, or of `receipts show`. Prints the
    /// signer's fingerprint. Exit status 1: the signature does not match;
    /// 7: the node's key did not sign it.
    VerifyReceipt(crate::receipts::VerifyArgs),
    /// One overview of the node; exit status 1 when something is wrong.
    ///
    /// Problems: TPM failed, volume failed, boundary drift not repaired,
    /// an engine gave up.
    Status,
    /// Print the agent's signals, one line each, until Ctrl-C.
    ///
    /// Changes of tenant keys (with receipts); JSON lines with --json.
    Monitor,
    /// The erase receipts of this tenancy (rotations since the assignment).
    #[command(subcommand)]
    Receipts(crate::receipts::ReceiptsCommand),
    /// The signed records of corrective actions that touched this
    /// tenant's engines (stop, reboot, power off), made by the landlord's
    /// health rules. `actions show ID --out FILE`, then verify-receipt.
    #[command(subcommand)]
    Actions(crate::receipts::ReceiptsCommand),
    /// Challenge the node's TPM: a quote of a fresh nonce, verified here.
    ///
    /// Proves the node id, boot id, key generations and fingerprints, and
    /// the PCRs. The attestation key is pinned on first use (known_nodes);
    /// exit status 7 when it changed, 1 when the quote is refused.
    Attest(crate::attest::AttestArgs),
    /// Write man page and shell completions into DIR.
    #[command(hide = true)]
    Generate {
        /// Output directory.
        dir: PathBuf,
    },
}

/// `tenantctl engine ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum EngineCommand {
    /// Deploy an engine (left stopped) from an image archive: a local file
    /// (uploaded into the inbox first) or one already in the inbox.
    Deploy {
        /// Engine name.
        name: String,
        /// A local archive (a path with a `/`, or an existing local file):
        /// uploaded into the tenant's inbox on the node, then deployed. Else
        /// the file name of an archive already in the inbox
        /// (`<volume>/engines/inbox/`).
        image: String,
        /// The spec (TOML, or JSON), docs/engines.md "Spec".
        #[arg(long, value_name = "FILE")]
        spec: PathBuf,
        /// IMAGE is a local file: upload it (whatever its name).
        #[arg(long, conflicts_with = "from_inbox")]
        upload: bool,
        /// IMAGE is a file name in the inbox: never upload.
        #[arg(long)]
        from_inbox: bool,
    },
    /// Upload a local image archive into the tenant's inbox on the node
    /// (over --host too), without deploying it.
    ///
    /// The archive is sent in chunks of at most 4 MiB with its sha256, and
    /// appears in the inbox only once complete and verified.
    Upload {
        /// The local archive.
        file: PathBuf,
        /// Its name in the inbox (default: the file's name).
        #[arg(long = "as", value_name = "NAME")]
        name: Option<String>,
        /// Send into an upload already begun (its id) instead of beginning one.
        #[arg(long, value_name = "UPLOAD_ID", hide = true)]
        resume: Option<String>,
    },
    /// Abandon an unfinished upload (its partial file is removed).
    UploadAbort {
        /// The upload's id.
        upload_id: String,
    },
    /// Start an engine (and mark it to start after a reboot).
    Start {
        /// Engine name.
        name: String,
    },
    /// Stop an engine (SIGTERM, SIGKILL after its stop_grace).
    Stop {
        /// Engine name.
        name: String,
    },
    /// Stop, then start an engine.
    Restart {
        /// Engine name.
        name: String,
    },
    /// Run a new image and/or spec; the old instance runs until the new one is ready.
    Reload {
        /// Engine name.
        name: String,
        /// A new image archive (default: the current one): a local file,
        /// uploaded first, or a file name in the inbox, as for `deploy`.
        #[arg(long, value_name = "FILE")]
        image: Option<String>,
        /// --image is a local file: upload it.
        #[arg(long, conflicts_with = "from_inbox", requires = "image")]
        upload: bool,
        /// --image is a file name in the inbox: never upload.
        #[arg(long, requires = "image")]
        from_inbox: bool,
        /// A new spec (default: the current one).
        #[arg(long, value_name = "FILE")]
        spec: Option<PathBuf>,
    },
    /// Remove a stopped engine with its root and data dirs.
    Rm {
        /// Engine name.
        name: String,
    },
    /// List the engines.
    Ls,
    /// Show one engine.
    Status {
        /// Engine name.
        name: String,
    },
    /// Show an engine's output (stdout and stderr, as the agent stored
    /// them on the tenant volume), oldest first.
    Logs {
        /// Engine name.
        name: String,
        /// Keep printing new lines as they come (until interrupted).
        #[arg(short, long)]
        follow: bool,
        /// Only lines from this long ago (30s, 10m, 2h, 1d) or since this
        /// RFC 3339 time (2026-12-03T22:00:00Z).
        #[arg(long, value_name = "DURATION|RFC3339")]
        since: Option<String>,
        /// Only the last N lines (1-10000; default: up to 10000).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        tail: Option<u32>,
    },
    /// Show the engines' supervision events (started, exited, restarted,
    /// gave-up, …) the agent keeps, oldest first.
    Events {
        /// Keep printing new events as they come (until interrupted).
        #[arg(short, long)]
        follow: bool,
    },
}

/// How often `-f` asks the agent for more.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One `engine logs --json` line (docs/json.md "EngineLogLine"). Times are
/// integers as everywhere in the JSON: `time` in unix seconds (as
/// `monitor`'s), `time_ms` with the milliseconds the agent stamped.
pub fn log_json(engine: &str, l: &(u64, String, String, bool)) -> serde_json::Value {
    let (t, stream, text, partial) = l;
    serde_json::json!({
        "engine": engine,
        "time": t / 1000,
        "time_ms": t,
        "stream": stream,
        "text": text,
        "partial": partial,
    })
}

/// One `engine events --json` line (docs/json.md "EngineEvent").
pub fn event_json(e: &(u64, u64, String, String, String)) -> serde_json::Value {
    let (seq, t, engine, kind, detail) = e;
    serde_json::json!({
        "seq": seq,
        "time": t / 1000,
        "time_ms": t,
        "engine": engine,
        "kind": kind,
        "detail": detail,
    })
}

fn log_line(engine: &str, json: bool, l: &(u64, String, String, bool)) -> String {
    let (t, stream, text, partial) = l;
    if json {
        log_json(engine, l).to_string()
    } else {
        // `+`: the line goes on in the next one (split at 16 KiB).
        format!(
            "{} {}{} {}",
            crate::timefmt::rfc3339_ms(*t),
            stream,
            if *partial { "+" } else { "" },
            printable(text)
        )
    }
}

/// An engine's text for a terminal: control characters but tab shown
/// escaped (`\r`, `\x1b`, `\u{9b}`), so that output cannot move the
/// cursor, rewrite the lines above, pose as the agent's notes or send the
/// terminal sequences (title, clipboard). `--json` carries it as written.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            '\r' => out.push_str("\\r"),
            c if c.is_control() && (c as u32) < 0x80 => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.into()
}

fn event_line(json: bool, e: &(u64, u64, String, String, String)) -> String {
    let (_, t, engine, kind, detail) = e;
    if json {
        event_json(e).to_string()
    } else {
        format!(
            "{} {engine} {kind} {detail}",
            crate::timefmt::rfc3339_ms(*t)
        )
        .trim_end()
        .to_owned()
    }
}

/// `engine logs`: one call, then with `-f` a call every [`FOLLOW_EVERY`]
/// for what came at or after the last line's time, skipping the lines of
/// that millisecond already printed.
async fn engine_logs(
    p: &TenantEnginesProxy<'_>,
    json: bool,
    name: &str,
    follow: bool,
    since: Option<&str>,
    tail: Option<u32>,
) -> Result<(), CliError> {
    let since = match since {
        Some(s) => crate::timefmt::parse_since(s, now_ms())
            .map_err(|e| CliError::new(exit::INVALID, format!("--since: {e}")))?,
        None => 0,
    };
    let max = tail.unwrap_or(10_000);
    let mut cursor = LogCursor::new(since);
    loop {
        let first = !cursor.started;
        let ask = if first { max } else { 10_000 };
        let lines = p.logs(name, cursor.since(), ask).await?;
        if cursor.gap_before(&lines) {
            eprintln!(
                "tenantctl: some lines were not shown: more than 10000 lines (or 8 MiB) came between two reads, or the log rotated past them"
            );
        }
        for l in cursor.new_lines(&lines) {
            crate::output::print_line(&log_line(name, json, l));
        }
        if !follow {
            return Ok(());
        }
        // A first read cut inside its last millisecond (every line it
        // returned is of that millisecond) left out older lines of it: the
        // next read, from that millisecond, must not take them for new
        // ones (review: a stack trace stored in one millisecond came out
        // twice and out of order).
        if first
            && lines.len() >= usize::try_from(max).unwrap_or(usize::MAX)
            && lines.first().is_some_and(|l| l.0 == cursor.since())
        {
            if let Some(last) = lines.last() {
                let now = p.logs(name, cursor.since(), 10_000).await?;
                cursor.printed_through(&now, last);
            }
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// Where `logs -f` is: the time of the last line printed and how many
/// lines of that millisecond were printed. The next read asks from that
/// millisecond (times are not unique) and skips those lines.
#[derive(Debug)]
struct LogCursor {
    last_ms: u64,
    printed_at_last: usize,
    started: bool,
}

impl LogCursor {
    fn new(since: u64) -> Self {
        LogCursor {
            last_ms: since,
            printed_at_last: 0,
            started: false,
        }
    }

    fn since(&self) -> u64 {
        self.last_ms
    }

    /// After a first read cut inside its last millisecond: the lines of
    /// that millisecond in `lines` up to the last one printed (`last`,
    /// found from the end) count as printed — those the cut left out came
    /// before the tail, and are not to be shown either; those after it
    /// came since (stored after the first read), and are.
    fn printed_through<T: PartialEq>(
        &mut self,
        lines: &[(u64, T, T, bool)],
        last: &(u64, T, T, bool),
    ) {
        let same: Vec<&(u64, T, T, bool)> = lines.iter().filter(|l| l.0 == self.last_ms).collect();
        if let Some(at) = same.iter().rposition(|l| *l == last) {
            self.printed_at_last = self.printed_at_last.max(at + 1);
        }
    }

    /// Whether a read from the cursor skipped lines: it no longer holds
    /// the last printed millisecond (more than a read's bound came since,
    /// or the log rotated past it).
    fn gap_before<T>(&self, lines: &[(u64, T, T, bool)]) -> bool {
        self.started
            && self.printed_at_last > 0
            && lines.first().is_some_and(|l| l.0 > self.last_ms)
    }

    /// The lines of a read not printed yet, in order.
    fn new_lines<'a, T>(&mut self, lines: &'a [(u64, T, T, bool)]) -> Vec<&'a (u64, T, T, bool)> {
        let mut skip = if self.started {
            self.printed_at_last
        } else {
            0
        };
        self.started = true;
        let mut out = Vec::new();
        for l in lines {
            if l.0 == self.last_ms && skip > 0 {
                skip -= 1;
                continue;
            }
            if l.0 == self.last_ms {
                self.printed_at_last += 1;
            } else {
                self.last_ms = l.0;
                self.printed_at_last = 1;
            }
            out.push(l);
        }
        out
    }
}

/// `engine events`: every event kept, then with `-f` those numbered after
/// the last one printed.
async fn engine_events(
    p: &TenantEnginesProxy<'_>,
    json: bool,
    follow: bool,
) -> Result<(), CliError> {
    let mut after = 0u64;
    loop {
        let events = p.events(after, 1000).await?;
        for e in &events {
            after = after.max(e.0);
            crate::output::print_line(&event_line(json, e));
        }
        // A full page: more wait; ask again at once.
        if events.len() == 1000 {
            continue;
        }
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// One engine as JSON (docs/json.md "Engine").
pub fn engine_json(e: &EngineInfo) -> serde_json::Value {
    serde_json::json!({
        "name": e.name,
        "image": e.image,
        "state": e.state,
        "enabled": e.enabled,
        "pid": e.pid,
        "started_at": e.started_at,
        "restarts": e.restarts,
        "last_exit": e.last_exit,
        "notes": e.notes,
        "probes": e.probes.as_ref().map(|ps| ps
            .iter()
            .map(|(probe, failures, result, detail, at)| serde_json::json!({
                "probe": probe,
                "failures": failures,
                "result": (!result.is_empty()).then_some(result),
                "detail": (!result.is_empty()).then_some(detail),
                "at": (*at > 0).then_some(at),
            }))
            .collect::<Vec<_>>()),
        "probes_delayed": e.probes_delayed,
        "confinement": e.landlock.as_ref().map(|l| serde_json::json!({
            "landlock_abi": e.landlock_abi,
            "landlock": l,
            "seccomp": e.seccomp,
        })),
    })
}

fn engine_line(e: &EngineInfo) -> String {
    format!(
        "{}\t{}{}\t{}\tpid {}\trestarts {}\t{}",
        e.name.as_deref().unwrap_or("?"),
        e.state.as_deref().unwrap_or("?"),
        if e.enabled == Some(true) {
            " (enabled)"
        } else {
            ""
        },
        e.image.as_deref().unwrap_or("?"),
        e.pid.map_or("-".to_owned(), |p| p.to_string()),
        e.restarts.unwrap_or(0),
        e.last_exit
            .as_deref()
            .map_or(String::new(), |x| format!("last exit: {x}")),
    )
}

fn engine_text(e: &EngineInfo) -> String {
    let mut lines = vec![
        format!("engine:     {}", e.name.as_deref().unwrap_or("?")),
        format!(
            "state:      {}{}",
            e.state.as_deref().unwrap_or("?"),
            if e.enabled == Some(true) {
                " (enabled)"
            } else {
                ""
            }
        ),
        format!("image:      {}", e.image.as_deref().unwrap_or("?")),
    ];
    if let Some(p) = e.pid {
        lines.push(format!("pid:        {p}"));
    }
    if let Some(t) = e.started_at {
        lines.push(format!("started at: {t} (unix)"));
    }
    lines.push(format!("restarts:   {}", e.restarts.unwrap_or(0)));
    if let Some(x) = &e.last_exit {
        lines.push(format!("last exit:  {x}"));
    }
    for (probe, failures, result, detail, _) in e.probes.iter().flatten() {
        let last = if result.is_empty() {
            "not run yet".to_owned()
        } else {
            format!("{result}: {detail}")
        };
        lines.push(format!(
            "probe:      {probe}: {last} ({failures} failures in a row)"
        ));
    }
    if let Some(l) = &e.landlock {
        lines.push(format!(
            "confined:   {}",
            confinement_text(l, e.landlock_abi, e.seccomp)
        ));
    }
    if let Some(n) = e.probes_delayed.filter(|n| *n > 0) {
        lines.push(format!(
            "probes:     {n} runs waited for the node's probe bound (docs/engines.md)"
        ));
    }
    for n in e.notes.iter().flatten() {
        lines.push(format!("note:       {n}"));
    }
    lines.join("\n")
}

/// `Landlock ABI 2 (partial: no scopes below ABI 6), seccomp`.
fn confinement_text(landlock: &str, abi: Option<u32>, seccomp: Option<bool>) -> String {
    let abi = abi.unwrap_or(0);
    let mut t = if abi == 0 || landlock == "none" {
        "no Landlock (not in this kernel)".to_owned()
    } else if abi < 6 {
        format!("Landlock ABI {abi} ({landlock}: no scopes below ABI 6)")
    } else {
        format!("Landlock ABI {abi} ({landlock})")
    };
    t.push_str(if seccomp == Some(true) {
        ", seccomp"
    } else {
        ", no seccomp"
    });
    t
}

/// A secret's plaintext from `path`: at most the envelope's payload
/// bound (a larger file is refused naming it, read no further: `--from
/// /dev/zero` ran the client out of memory), into a buffer reserved once
/// and wiped when dropped (a growing Vec leaves freed copies behind).
fn read_secret_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<Vec<u8>>, CliError> {
    use std::io::Read;
    let max = leasehold_envelope::MAX_PAYLOAD;
    let err = |e: &dyn std::fmt::Display| {
        CliError::new(exit::INVALID, format!("secret {}: {e}", path.display()))
    };
    let f = std::fs::File::open(path).map_err(|e| err(&e))?;
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(max + 1));
    f.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| err(&e))?;
    if buf.len() > max {
        return Err(err(&format!("larger than {max} bytes (1 MiB)")));
    }
    Ok(buf)
}

fn read_spec(path: &std::path::Path) -> Result<String, CliError> {
    let bytes = read_arg_file("spec", path)?;
    if bytes.len() > leasehold_dbus_api::MAX_SPEC_TEXT {
        return Err(CliError::new(
            exit::INVALID,
            format!("spec {}: larger than 1 MiB", path.display()),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|_| CliError::new(exit::INVALID, format!("spec {}: not UTF-8", path.display())))
}

/// The inbox file name to deploy: IMAGE itself, or the name a local
/// IMAGE was uploaded under (docs/cli.md, "engine deploy").
async fn inbox_image(
    p: &TenantEnginesProxy<'_>,
    image: String,
    upload: bool,
    from_inbox: bool,
) -> Result<String, CliError> {
    if !crate::upload::is_local(&image, upload, from_inbox) {
        return Ok(image);
    }
    let path = PathBuf::from(image);
    let name = crate::upload::inbox_name(&path)?;
    crate::upload::upload(p, &path, &name, None).await
}

async fn engine(
    conn: &zbus::Connection,
    json: bool,
    yes: bool,
    cmd: EngineCommand,
) -> Result<(), CliError> {
    let p = TenantEnginesProxy::new(conn)
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    let info = match cmd {
        EngineCommand::Deploy {
            name,
            image,
            spec,
            upload,
            from_inbox,
        } => {
            let text = read_spec(&spec)?;
            let image = inbox_image(&p, image, upload, from_inbox).await?;
            p.deploy(&name, &image, &text)
                .await
                .map_err(in_document(&spec, "spec: "))?
        }
        EngineCommand::Start { name } => p.start(&name).await?,
        EngineCommand::Stop { name } => p.stop(&name).await?,
        EngineCommand::Restart { name } => p.restart(&name).await?,
        EngineCommand::Reload {
            name,
            image,
            spec,
            upload,
            from_inbox,
        } => {
            let text = match &spec {
                Some(s) => read_spec(s)?,
                None => String::new(),
            };
            let image = match image {
                Some(i) => Some(inbox_image(&p, i, upload, from_inbox).await?),
                None => None,
            };
            let r = p.reload(&name, image.as_deref().unwrap_or(""), &text).await;
            match &spec {
                Some(s) => r.map_err(in_document(s, "spec: "))?,
                None => r?,
            }
        }
        EngineCommand::Rm { name } => {
            with_confirmation(
                yes,
                &format!("remove engine {name} with its root and data dirs"),
                |ok| p.remove(&name, ok),
            )
            .await?;
            emit_done(
                json,
                serde_json::json!({"name": name, "removed": true}),
                || format!("removed engine {name}"),
            );
            return Ok(());
        }
        EngineCommand::Upload { file, name, resume } => {
            let name = match name {
                Some(n) => n,
                None => crate::upload::inbox_name(&file)?,
            };
            let stored = crate::upload::upload(&p, &file, &name, resume.as_deref()).await?;
            emit_done(
                json,
                serde_json::json!({"image": stored, "uploaded": true}),
                || format!("uploaded {} into the inbox as {stored}", file.display()),
            );
            return Ok(());
        }
        EngineCommand::UploadAbort { upload_id } => {
            p.abort_upload(&upload_id).await?;
            emit_done(
                json,
                serde_json::json!({"upload_id": upload_id, "aborted": true}),
                || format!("aborted upload {upload_id}"),
            );
            return Ok(());
        }
        EngineCommand::Ls => {
            let list = p.list().await?;
            emit(
                json,
                serde_json::Value::Array(list.iter().map(engine_json).collect()),
                || list.iter().map(engine_line).collect::<Vec<_>>().join("\n"),
            );
            return Ok(());
        }
        EngineCommand::Status { name } => {
            let info = p.status(&name).await?;
            emit(json, engine_json(&info), || engine_text(&info));
            return Ok(());
        }
        EngineCommand::Logs {
            name,
            follow,
            since,
            tail,
        } => return engine_logs(&p, json, &name, follow, since.as_deref(), tail).await,
        EngineCommand::Events { follow } => return engine_events(&p, json, follow).await,
    };
    emit_done(json, engine_json(&info), || engine_text(&info));
    Ok(())
}

/// `tenantctl volume ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum VolumeCommand {
    /// Show the volume: device, size, use, key generations, open or not.
    /// Exits 1 when the volume is failed (the landlord must act).
    Status,
}

/// `tenantctl boundary ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum BoundaryCommand {
    /// Set the sub-boundary from a TOML or JSON document.
    Set {
        /// Document file (.toml or .json).
        file: PathBuf,
        /// Store the intersection with the cluster boundary instead of
        /// refusing a wider document, and report what was cut.
        #[arg(long)]
        narrow: bool,
    },
    /// Show the sub-boundary, the effective policy and the failsafe.
    Show,
    /// Validate a document and show what setting it would change, and
    /// whether it fits the cluster boundary, without applying it.
    Check {
        /// Document file (.toml or .json).
        file: PathBuf,
    },
    /// Explain whether a flow is allowed and which entries decide.
    Explain(ExplainArgs),
    /// Remove the sub-boundary (the landlord's cluster boundary stays).
    // `remove`, landlordctl's old name of the verb, hidden: either name
    // works in either CLI.
    #[command(alias = "remove")]
    Clear,
}

/// `tenantctl secret ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum SecretCommand {
    /// Seal a file locally to the node's UT and store it on the node.
    Put {
        /// Secret name.
        name: String,
        /// File holding the secret.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Seal to this PEM (pinned UT) instead of asking the node for UT.
        #[arg(long, value_name = "PEM")]
        to: Option<PathBuf>,
        /// First require a fresh valid TPM quote (as `attest`, default PCRs
        /// and pin file) stating that the key sealed to is the node's
        /// current UT; refused: exit 1 (7: attestation key changed), and
        /// nothing is sent.
        #[arg(long)]
        attest: bool,
        /// With --attest: the pinned attestation keys (as `attest --pin-file`).
        #[arg(long, value_name = "FILE", requires = "attest")]
        pin_file: Option<PathBuf>,
    },
    /// List stored secrets (names and sizes).
    List,
    /// Remove a secret.
    Rm {
        /// Secret name.
        name: String,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let args = match parse(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => return crate::usage_exit("tenantctl", e),
    };
    args.global.apply();
    run_main("tenantctl", args.json, run(args))
}

/// Seals a file to a PEM public key (no TPM, no bus).
pub fn seal_file(to: &std::path::Path, file: &std::path::Path) -> Result<Vec<u8>, CliError> {
    let pem = read_pem_file("public key", to)?;
    // Bounded and wiped as `secret put`'s (review: read whole, unwiped).
    let payload = read_secret_file(file)?;
    leasehold_envelope::seal(&pem, &payload)
        .map_err(|e| CliError::new(exit::INVALID, e.to_string()))
}

/// Runs one command.
pub async fn run(args: Args) -> Result<(), CliError> {
    let json = args.json;
    match &args.command {
        Command::Generate { dir } => return crate::generate(<Args>::command(), dir),
        Command::Seal { to, file, out } => {
            let env = seal_file(to, file)?;
            let out = out.clone().unwrap_or_else(|| {
                let mut p = file.clone().into_os_string();
                p.push(".lhev");
                PathBuf::from(p)
            });
            std::fs::write(&out, &env)
                .map_err(|e| CliError::new(exit::FAILURE, format!("{}: {e}", out.display())))?;
            emit_done(
                json,
                serde_json::json!({"envelope": out, "size": env.len()}),
                || {
                    format!(
                        "sealed {} to {} ({} bytes)",
                        file.display(),
                        out.display(),
                        env.len()
                    )
                },
            );
            return Ok(());
        }
        Command::VerifyReceipt(a) => {
            let global = args.global.clone();
            let timeout = args.timeout;
            return crate::receipts::verify(json, a, || async move {
                Ok((global.connect(timeout).await?, false))
            })
            .await;
        }
        Command::RegisterConsole { name, pem } => {
            crate::check_name("console name", name)?;
            // Checked before connecting: a wrong or private key file never
            // gets near the bus (read again, and checked again, below).
            read_pem_file("public key", pem)?;
        }
        Command::Secret(SecretCommand::Put { name, to, .. }) => {
            crate::check_name("secret name", name)?;
            if let Some(to) = to {
                read_pem_file("public key", to)?;
            }
        }
        Command::Secret(SecretCommand::Rm { name }) => {
            crate::check_name("secret name", name)?;
        }
        Command::Engine(
            EngineCommand::Deploy { name, .. }
            | EngineCommand::Start { name }
            | EngineCommand::Stop { name }
            | EngineCommand::Restart { name }
            | EngineCommand::Reload { name, .. }
            | EngineCommand::Rm { name }
            | EngineCommand::Status { name },
        ) => crate::check_name("engine name", name)?,
        Command::Engine(EngineCommand::Logs { name, since, .. }) => {
            crate::check_name("engine name", name)?;
            // Checked before connecting, as every argument is.
            if let Some(s) = since {
                crate::timefmt::parse_since(s, now_ms())
                    .map_err(|e| CliError::new(exit::INVALID, format!("--since: {e}")))?;
            }
        }
        _ => {}
    }
    let conn = args.global.connect(args.timeout).await?;
    let p = TenantProxy::new(&conn)
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    match args.command {
        Command::Engine(cmd) => engine(&conn, json, args.yes, cmd).await?,
        Command::Attest(a) => {
            let target = args.global.host.as_deref().unwrap_or("local");
            let proved =
                crate::attest::attest(&conn, target, crate::attest::Level::Tenant, &a).await?;
            emit(json, crate::attest::proved_json(&proved), || {
                crate::attest::proved_text(&proved)
            });
        }
        Command::Info => {
            let i = p.node_info().await?;
            emit(json, node_info_json(&i), || node_info_text(&i));
        }
        Command::Pubkey { out } => {
            emit_public_key(json, &p.get_public_key().await?, out.as_deref())?;
        }
        Command::Volume(VolumeCommand::Status) => {
            let v = p.volume_status().await?;
            emit(json, volume_json(&v), || volume_text(&v));
            crate::output::volume_exit(&v)?;
        }
        Command::ReceiptKey { out } => {
            emit_public_key(json, &p.get_receipt_key().await?, out.as_deref())?;
        }
        Command::Rotate => {
            let c = with_confirmation(
                args.yes,
                "rotate the tenant keys and make tenant data unreadable",
                |ok| {
                    crate::progress::bounded(
                        "rotate the tenant keys",
                        "tenantctl info",
                        args.timeout,
                        p.rotate_keys(ok),
                    )
                },
            )
            .await?;
            emit_change(json, &c, || change_text(&c));
        }
        Command::Rekey => {
            let c = crate::progress::bounded(
                "re-key the tenant keys",
                "tenantctl info",
                args.timeout,
                p.rekey_keys(),
            )
            .await?;
            emit_change(json, &c, || change_text(&c));
        }
        Command::RegisterConsole { name, pem } => {
            let text = read_pem_file("public key", &pem)?;
            let fp = p.register_console_key(&name, &text).await?;
            emit_done(
                json,
                serde_json::json!({"name": name, "fingerprint": fp}),
                || format!("registered tenant console {name} ({fp})"),
            );
        }
        Command::Secret(SecretCommand::Put {
            name,
            from,
            to,
            attest,
            pin_file,
        }) => {
            let pem = match to {
                Some(path) => read_pem_file("public key", &path)?,
                None => p.get_public_key().await?.pem.unwrap_or_default(),
            };
            if attest {
                // The quote must state the very key sealed to as the
                // node's current UT.
                let fp = leasehold_envelope::RecipientKey::from_pem(&pem)
                    .map_err(|e| CliError::new(exit::INVALID, format!("public key: {e}")))?
                    .fingerprint_hex();
                let a = crate::attest::AttestArgs {
                    expect_key: Some(fp),
                    pin_file,
                    ..Default::default()
                };
                let target = args.global.host.as_deref().unwrap_or("local");
                let proved =
                    crate::attest::attest(&conn, target, crate::attest::Level::Tenant, &a).await?;
                crate::output::note(&format!(
                    "attested: node {} holds UT {} (quote by {})",
                    proved.quote.context.node_id,
                    a.expect_key.as_deref().unwrap_or(""),
                    proved.ak_fingerprint
                ));
            }
            let payload = read_secret_file(&from)?;
            // Sealed here; only the envelope crosses the wire.
            let env = leasehold_envelope::seal(&pem, &payload)
                .map_err(|e| CliError::new(exit::INVALID, e.to_string()))?;
            let info = p.put_secret(&name, &env).await?;
            emit_done(json, secret_change_json(&info, false), || {
                format!("stored secret {name} ({} bytes)", info.size.unwrap_or(0))
            });
        }
        Command::Secret(SecretCommand::List) => {
            let list = p.list_secrets().await?;
            emit(json, secrets_json(&list), || {
                list.iter()
                    .map(|s| {
                        format!(
                            "{}\t{} bytes",
                            s.name.as_deref().unwrap_or("?"),
                            s.size.unwrap_or(0)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Secret(SecretCommand::Rm { name }) => {
            p.remove_secret(&name).await?;
            let gone = leasehold_dbus_api::SecretInfo {
                name: Some(name.clone()),
                ..Default::default()
            };
            emit_done(json, secret_change_json(&gone, true), || {
                format!("removed secret {name}")
            });
        }
        Command::Boundary(cmd) => {
            // Show is a query; the other listings printed below follow a change.
            let query = matches!(cmd, BoundaryCommand::Show);
            let info = match cmd {
                BoundaryCommand::Set { file, narrow } => {
                    let (text, format) = read_document(&file)?;
                    // A sub-boundary without allow entries cuts all of the
                    // tenant's traffic but the landlord's failsafe entries:
                    // asked first (the agent's SetSubBoundary keeps its meaning).
                    if !args.yes {
                        let out = p
                            .check_sub_boundary(&text, format)
                            .await
                            .map_err(in_document(&file, ""))?;
                        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
                        if v["denies_everything"] == serde_json::Value::Bool(true) {
                            crate::ask_typed_yes(
                                "this sub-boundary has no allow entry: it denies all of the node's traffic except the landlord's failsafe entries",
                                "apply it",
                                crate::exit::USAGE,
                            )?;
                        }
                    }
                    p.set_sub_boundary(&text, format, narrow)
                        .await
                        .map_err(in_document(&file, ""))?
                }
                BoundaryCommand::Check { file } => {
                    let (text, format) = read_document(&file)?;
                    let out = p
                        .check_sub_boundary(&text, format)
                        .await
                        .map_err(in_document(&file, ""))?;
                    return emit_check(json, &out);
                }
                BoundaryCommand::Show => p.get_boundary().await?,
                BoundaryCommand::Clear => p.remove_sub_boundary().await?,
                BoundaryCommand::Explain(a) => {
                    let port = a.port()?;
                    let v = p
                        .explain_flow(&a.direction, &a.peer, &a.proto, port)
                        .await?;
                    return explain_result(json, &v);
                }
            };
            emit_info(json, query, &info)?;
        }
        Command::Status => crate::status::tenant_status(&conn, json).await?,
        Command::Monitor => crate::status::tenant_monitor(&conn, json).await?,
        Command::Receipts(cmd) => {
            crate::receipts::run(crate::receipts::Node::Tenant(&conn), json, cmd).await?;
        }
        Command::Actions(cmd) => {
            crate::receipts::run(crate::receipts::Node::TenantActions(&conn), json, cmd).await?;
        }
        Command::Generate { .. } | Command::Seal { .. } | Command::VerifyReceipt(_) => {
            unreachable!("handled above")
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::ffi::OsString;

    #[test]
    fn a_secret_file_is_read_to_its_bound_and_no_further() {
        let tmp = tempfile::tempdir().unwrap();
        let ok = tmp.path().join("ok");
        std::fs::write(&ok, vec![1u8; leasehold_envelope::MAX_PAYLOAD]).unwrap();
        assert_eq!(
            read_secret_file(&ok).unwrap().len(),
            leasehold_envelope::MAX_PAYLOAD
        );
        // An endless file is refused after its first MiB and one byte.
        let e = read_secret_file(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(
            e.to_string().contains("/dev/zero") && e.to_string().contains("larger than"),
            "{e}"
        );
    }

    #[test]
    fn an_engines_confinement_is_shown_with_what_its_kernel_lacks() {
        let e = |abi, landlock: &str| EngineInfo {
            name: Some("web".into()),
            landlock_abi: Some(abi),
            landlock: Some(landlock.into()),
            seccomp: Some(true),
            ..EngineInfo::default()
        };
        let lab = e(2, "partial");
        assert!(
            engine_text(&lab)
                .contains("confined:   Landlock ABI 2 (partial: no scopes below ABI 6), seccomp"),
            "{}",
            engine_text(&lab)
        );
        assert_eq!(
            engine_json(&lab)["confinement"],
            serde_json::json!({"landlock_abi": 2, "landlock": "partial", "seccomp": true})
        );
        assert!(engine_text(&e(6, "full")).contains("confined:   Landlock ABI 6 (full), seccomp"));
        assert!(engine_text(&e(0, "none")).contains("no Landlock (not in this kernel)"));
        // Not running (or an older agent): no line, null in JSON.
        let idle = EngineInfo {
            name: Some("web".into()),
            ..EngineInfo::default()
        };
        assert!(!engine_text(&idle).contains("confined"));
        assert!(engine_json(&idle)["confinement"].is_null());
    }

    fn argv(line: &[&str]) -> Vec<OsString> {
        std::iter::once("tenantctl")
            .chain(line.iter().copied())
            .map(OsString::from)
            .collect()
    }

    /// What the whole tree makes of a line: `None` for an error, help or
    /// version.
    fn whole(argv: &[OsString]) -> Option<Args> {
        crate::parse_kept::<Args>(argv, drop).ok()
    }

    /// What [`parse`] does with a line, by the path it takes.
    fn both(argv: &[OsString]) -> (Option<String>, Option<String>) {
        let lean = parse_engine_only(argv, drop).map(|a| format!("{a:?}"));
        let whole = whole(argv)
            .filter(|a| matches!(a.command, Command::Engine(_)))
            .map(|a| format!("{a:?}"));
        (lean, whole)
    }

    #[test]
    fn the_engine_subtree_parses_a_line_as_the_whole_tree_does() {
        // Taken by the engine subtree, with the whole tree's meaning.
        for line in [
            &["engine", "start", "web"][..],
            &["--json", "engine", "status", "web"],
            &["engine", "status", "web", "--json", "-q"],
            &["-H", "tt@node:2222", "engine", "stop", "web"],
            &["engine", "stop", "--host=node", "web"],
            &["--timeout", "30s", "engine", "restart", "web"],
            &[
                "engine", "logs", "-f", "--since", "5m", "--tail", "10", "web",
            ],
            &["engine", "rm", "web", "--yes"],
            &["engine", "deploy", "web", "img.tar", "--spec", "s.toml"],
            &["engine", "reload", "web", "--image", "x.tar", "--upload"],
            &["engine", "upload", "x.tar", "--as", "y.tar"],
            &["engine", "ls", "--no-pager"],
            &["engine", "events", "-f"],
            &["engine", "start", "--", "engine"],
        ] {
            let (lean, whole) = both(&argv(line));
            assert!(lean.is_some(), "{line:?}: not taken");
            assert_eq!(lean, whole, "{line:?}");
        }
        // Left to the whole tree: its help, version and errors, other
        // commands (whatever their arguments).
        for line in [
            &["engine"][..],
            &["engine", "--help"],
            &["engine", "start", "-h"],
            &["--version", "engine"],
            &["engine", "start"],
            &["engine", "frobnicate"],
            &["engine", "logs", "--tail", "0", "web"],
            &["--timeout", "soon", "engine", "ls"],
            &["help", "engine"],
            &["secret", "put", "engine", "--to", "k.pem"],
            &["boundary", "show", "engine"],
            &["info"],
        ] {
            let a = argv(line);
            assert_eq!(parse_engine_only(&a, drop).map(|_| ()), None, "{line:?}");
        }
        // parse itself: the same outcome either way, errors the whole
        // tree's.
        let a = argv(&["engine", "start", "web"]);
        assert_eq!(
            format!("{:?}", parse(a.clone()).unwrap()),
            format!("{:?}", whole(&a).unwrap())
        );
        let e = parse(argv(&["engine", "start"])).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(
            e.to_string().contains("tenantctl engine start <NAME>"),
            "{e}"
        );
        let e = parse(argv(&["engine", "--help"])).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(e.to_string().contains("deploy"), "{e}");
    }

    #[test]
    fn every_command_tree_is_sound() {
        // clap's own checks of every argument, deferred ones included.
        <Args>::command().debug_assert();
        Args::<EngineOnly>::command().debug_assert();
    }

    #[test]
    fn the_engine_subtree_is_the_whole_tree_s_engine() {
        // The same top-level options and the same `engine` node, and every
        // engine command with the same help, word for word: a setting added
        // to one tree and not the other fails here.
        let mut whole = <Args>::command();
        let mut lean = Args::<EngineOnly>::command();
        whole.build();
        lean.build();
        let top = |c: &clap::Command| {
            c.get_arguments()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(top(&whole), top(&lean));
        let w = whole.find_subcommand_mut("engine").unwrap();
        let l = lean.find_subcommand_mut("engine").unwrap();
        assert_eq!(
            w.render_long_help().to_string(),
            l.render_long_help().to_string()
        );
        let names: Vec<String> = w
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        let lean_names: Vec<String> = l
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .collect();
        assert_eq!(names, lean_names);
        assert!(names.len() > 10, "{names:?}");
        for n in names {
            let wh = w
                .find_subcommand_mut(&n)
                .unwrap()
                .render_long_help()
                .to_string();
            let lh = l
                .find_subcommand_mut(&n)
                .unwrap()
                .render_long_help()
                .to_string();
            assert_eq!(wh, lh, "engine {n}");
        }
    }

    // Pieces of a tenant's engine command lines: the globals in each
    // spelling, the engine subcommands and their options, a few wrong ones.
    const GLOBALS: &[&[&str]] = &[
        &["--json"],
        &["-q"],
        &["--quiet"],
        &["-y"],
        &["--yes"],
        &["-qy"],
        &["-H", "n"],
        &["--host", "tt@n:2222"],
        &["--host=n"],
        &["-Hn"],
        &["-H", "engine"],
        &["--timeout", "30s"],
        &["--timeout=0"],
        &["--no-pager"],
        &["--timeout", "soon"],
        &["--json=true"],
        &["-h"],
        &["--version"],
    ];
    const SUBCOMMANDS: &[&[&str]] = &[
        &["start"],
        &["stop"],
        &["restart"],
        &["status"],
        &["logs"],
        &["events"],
        &["deploy"],
        &["reload"],
        &["rm"],
        &["ls"],
        &["upload"],
        &["upload-abort"],
        &["help"],
        &["frobnicate"],
        &["web"],
        &["info"],
        &["--"],
    ];
    const OPTIONS: &[&[&str]] = &[
        &["x.tar"],
        &["-f"],
        &["--follow"],
        &["-fq"],
        &["--since", "5m"],
        &["--since=2026-12-03T22:00:00Z"],
        &["--tail", "10"],
        &["--tail=0"],
        &["--spec", "s.toml"],
        &["--image", "x.tar"],
        &["--upload"],
        &["--from-inbox"],
        &["--as", "y.tar"],
        &["--resume", "id"],
        &["--"],
        &["engine"],
        &["--help"],
    ];

    /// A command line: mostly `engine`, a subcommand, an engine's name,
    /// options and globals in any order after the subcommand (globals
    /// also before it and between); now and then every piece anywhere.
    fn line() -> impl Strategy<Value = Vec<&'static str>> {
        use prop::collection::vec;
        use prop::sample::select;
        (
            vec(select(GLOBALS), 0..3),
            prop::bool::weighted(0.9),
            vec(select(GLOBALS), 0..2),
            select(SUBCOMMANDS),
            prop::bool::weighted(0.8),
            vec(select(OPTIONS), 0..2),
            vec(select(GLOBALS), 0..2),
            prop::bool::weighted(0.1),
        )
            .prop_flat_map(
                |(before, engine, between, sub, name, options, after, anywhere)| {
                    let mut head: Vec<&'static [&'static str]> = before;
                    if engine {
                        head.push(&["engine"]);
                    }
                    head.extend(between);
                    head.push(sub);
                    let mut tail: Vec<&'static [&'static str]> = options;
                    tail.extend(after);
                    if name {
                        tail.push(&["web"]);
                    }
                    if anywhere {
                        head.extend(tail);
                        (Just(Vec::new()), Just(head).prop_shuffle()).boxed()
                    } else {
                        (Just(head), Just(tail).prop_shuffle()).boxed()
                    }
                },
            )
            .prop_map(|(head, tail)| head.into_iter().chain(tail).flatten().copied().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// The hot path never changes what a line means: the engine
        /// subtree takes exactly the lines the whole tree reads as an
        /// engine command, and reads them the same.
        #[test]
        fn lean_parse_means_what_the_whole_tree_means(words in line()) {
            let (lean, whole) = both(&argv(&words));
            prop_assert_eq!(lean, whole, "{:?}", words);
        }
    }

    fn l(t: u64, text: &str) -> (u64, String, String, bool) {
        (t, "out".into(), text.into(), false)
    }

    fn texts(v: Vec<&(u64, String, String, bool)>) -> Vec<String> {
        v.into_iter().map(|x| x.2.clone()).collect()
    }

    #[test]
    fn follow_prints_each_line_once_though_times_repeat() {
        let mut c = LogCursor::new(0);
        let first = [l(5, "a"), l(7, "b"), l(7, "c")];
        assert_eq!(texts(c.new_lines(&first)), ["a", "b", "c"]);
        // The next read starts at 7 (inclusive): b and c again, then more
        // lines of the same millisecond and later ones.
        assert_eq!(c.since(), 7);
        let next = [l(7, "b"), l(7, "c"), l(7, "d"), l(9, "e")];
        assert_eq!(texts(c.new_lines(&next)), ["d", "e"]);
        let again = [l(9, "e")];
        assert!(c.new_lines(&again).is_empty());
        let more = [l(9, "e"), l(9, "f")];
        assert_eq!(texts(c.new_lines(&more)), ["f"]);
        // Nothing new: nothing printed, the cursor stays.
        assert!(c.new_lines(&[l(9, "e"), l(9, "f")]).is_empty());
        assert_eq!(c.since(), 9);
    }

    /// `-f --tail 2` over a millisecond holding 4 lines: the first read
    /// prints the newest 2; the next read from that millisecond holds all 4,
    /// and none of them is printed again (nor the 2 before the tail).
    #[test]
    fn follow_after_a_cut_first_read_prints_nothing_twice() {
        let mut c = LogCursor::new(0);
        let tail = [l(7, "c"), l(7, "d")];
        assert_eq!(texts(c.new_lines(&tail)), ["c", "d"]);
        // Read again at once: a line of the same millisecond stored since.
        let all = [l(7, "a"), l(7, "b"), l(7, "c"), l(7, "d"), l(7, "d2")];
        c.printed_through(&all, &tail[1]);
        assert!(!c.gap_before(&all));
        let next = [
            l(7, "a"),
            l(7, "b"),
            l(7, "c"),
            l(7, "d"),
            l(7, "d2"),
            l(8, "e"),
        ];
        assert_eq!(texts(c.new_lines(&next)), ["d2", "e"]);
        // A read that no longer holds the last printed millisecond (rotated,
        // or over the read's bound) is a gap, said so.
        assert!(c.gap_before(&[l(9, "g")]));
        assert!(!c.gap_before(&[l(8, "e"), l(9, "g")]));
        // Nothing printed yet: no gap to speak of.
        let fresh = LogCursor::new(0);
        assert!(!fresh.gap_before(&[l(9, "g")]));
    }

    #[test]
    fn the_first_read_prints_everything_from_since() {
        let mut c = LogCursor::new(100);
        assert_eq!(texts(c.new_lines(&[l(100, "x"), l(100, "y")])), ["x", "y"]);
        assert!(c.new_lines(&[l(100, "x"), l(100, "y")]).is_empty());
    }

    #[test]
    fn log_and_event_lines_in_text_and_json() {
        let t = 1_796_336_702_123;
        let mut p = l(t, "hello");
        assert_eq!(
            log_line("web", false, &p),
            "2026-12-03T22:25:02.123Z out hello"
        );
        p.3 = true;
        assert_eq!(
            log_line("web", false, &p),
            "2026-12-03T22:25:02.123Z out+ hello"
        );
        // Control characters escaped in text (a carriage return posing as
        // the agent's note, a cursor move, C1's CSI), kept in JSON.
        let hostile = l(t, "x\r2026 agent 0 line(s)\x1b[1A\u{9b}2K\ttab é");
        assert_eq!(
            log_line("web", false, &hostile),
            "2026-12-03T22:25:02.123Z out x\\r2026 agent 0 line(s)\\x1b[1A\\u{9b}2K\ttab é"
        );
        let j: serde_json::Value = serde_json::from_str(&log_line("web", true, &hostile)).unwrap();
        assert_eq!(j["text"], hostile.2.as_str());
        let j: serde_json::Value = serde_json::from_str(&log_line("web", true, &p)).unwrap();
        assert_eq!(j["engine"], "web");
        assert_eq!(j["time_ms"], t);
        assert_eq!(j["time"], 1_796_336_702, "unix seconds, as monitor's");
        assert_eq!(j["partial"], true);
        let e = (42, t, "web".to_owned(), "stopped".to_owned(), String::new());
        assert_eq!(
            event_line(false, &e),
            "2026-12-03T22:25:02.123Z web stopped"
        );
        let j: serde_json::Value = serde_json::from_str(&event_line(true, &e)).unwrap();
        assert_eq!(j["seq"], 42);
        assert_eq!(j["time"], 1_796_336_702);
        assert_eq!(j["kind"], "stopped");
    }
}
