//! Library code of `landlordctl` and `tenantctl`: connecting (locally or
//! over SSH), confirmations, output, exit codes.

#![warn(missing_docs)]

pub mod act;
pub mod attest;
pub mod boundary;
pub mod budget;
pub mod health;
pub mod keyfile;
pub mod landlord;
mod manpage;
pub mod output;
pub mod progress;
pub mod receipts;
pub mod shapes;
pub mod status;
pub mod tenant;
mod timefmt;
pub mod upload;

use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use leasehold_dbus_api::Error as ApiError;
use zbus::address::transport::{Transport, Unixexec};
use zbus::{Address, Connection};

/// Exit codes shared by both CLIs (documented in their man pages).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The operation failed.
    pub const FAILURE: u8 = 1;
    /// Command-line usage error (clap).
    pub const USAGE: u8 = 2;
    /// The caller is not authorized (polkit, role).
    pub const NOT_AUTHORIZED: u8 = 3;
    /// A data-destroying operation was not confirmed.
    pub const NOT_CONFIRMED: u8 = 4;
    /// No tenant assigned, or the named object does not exist.
    pub const NOT_FOUND: u8 = 5;
    /// An argument was refused.
    pub const INVALID: u8 = 6;
    /// `verify-receipt`: the receipt was not signed by the node's key;
    /// `attest`: the node's attestation key is not the pinned one.
    pub const NOT_NODE_KEY: u8 = 7;
    /// The agent (or the bus, or SSH) cannot be reached.
    pub const UNAVAILABLE: u8 = 69;
    /// The node is busy (EX_TEMPFAIL): try again.
    pub const BUSY: u8 = 75;

    /// The stable name of an exit code, for `--json` errors.
    pub fn name(code: u8) -> &'static str {
        match code {
            OK => "ok",
            USAGE => "usage",
            NOT_AUTHORIZED => "not-authorized",
            NOT_CONFIRMED => "not-confirmed",
            NOT_FOUND => "not-found",
            INVALID => "invalid-argument",
            NOT_NODE_KEY => "not-node-key",
            UNAVAILABLE => "unavailable",
            BUSY => "busy",
            _ => "failed",
        }
    }
}

/// Text for the man pages' EXIT STATUS section.
pub const EXIT_CODES_HELP: &str = "Exit status:
  0   success
  1   the operation failed, or --timeout expired
  2   usage error; also a boundary change that denies all traffic or removes
      every failsafe entry, without --yes (and no typed yes on a terminal)
  3   not authorized (polkit denied the caller's role)
  4   the operation destroys data and was not confirmed (use --yes)
  5   no tenant assigned, or no such object
  6   invalid argument
  69  the agent, the bus or the SSH connection is unavailable, or the node
      lacks what the operation needs (e.g. device-mapper for volume init)
  75  the node is busy (too many changes queued); try again
`boundary explain`: 0 the flow is allowed, 1 it is denied.
`volume status`: 1 the volume is failed (`next:` says what to do).
`status`: 1 a problem is listed (TPM, volume, boundary drift not repaired,
a critical or stuck health fault).
`health` (landlordctl): 1 a fault is critical or stuck; warnings exit 0.
`act` (landlordctl): 0 after SIGINT or SIGTERM; 6 a bad inventory or token
file; 1 the state file cannot be read or written; 69 --listen cannot be bound.
`verify-receipt`: 1 the signature does not match; 7 the node's key did not sign it.
`attest`, `secret put --attest`: 1 the quote is refused (replayed, altered, a PCR
or key not as expected); 7 the node's attestation key (or node id) is not the
one pinned in known_nodes.
A key change that committed with warnings (printed on stderr) exits 0.";

/// A CLI failure: a message and an exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// Message for stderr.
    pub message: String,
    /// The agent's D-Bus error name, when the agent refused.
    pub dbus_error: Option<String>,
}

impl CliError {
    /// An error with a code.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            dbus_error: None,
        }
    }

    /// The error as `--json` prints it on stdout (docs/cli.md):
    /// `{"error": {"name", "exit", "message"[, "dbus_error"]}}`.
    pub fn json(&self) -> serde_json::Value {
        let mut e = serde_json::json!({
            "name": exit::name(self.code),
            "exit": self.code,
            "message": self.message,
        });
        if let Some(d) = &self.dbus_error {
            e["dbus_error"] = serde_json::Value::String(d.clone());
        }
        serde_json::json!({ "error": e })
    }
}

impl From<ApiError> for CliError {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::NotAuthorized(_) => exit::NOT_AUTHORIZED,
            ApiError::ConfirmationRequired(_) => exit::NOT_CONFIRMED,
            ApiError::NotAssigned(_) | ApiError::NotFound(_) => exit::NOT_FOUND,
            ApiError::InvalidArgument(_) => exit::INVALID,
            ApiError::Unavailable(_) => exit::UNAVAILABLE,
            ApiError::ZBus(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown"
                    || name.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
            {
                return CliError::new(
                    exit::UNAVAILABLE,
                    "the Leasehold agent is not running (org.leasehold.Agent1 has no owner)",
                )
            }
            ApiError::ZBus(zbus::Error::FDO(f))
                if matches!(**f, zbus::fdo::Error::ServiceUnknown(_)) =>
            {
                return CliError::new(
                    exit::UNAVAILABLE,
                    "the Leasehold agent is not running (org.leasehold.Agent1 has no owner)",
                )
            }
            e if progress::timed_out(e) => {
                return CliError::new(exit::FAILURE, progress::NO_ANSWER);
            }
            ApiError::ZBus(_) => exit::UNAVAILABLE,
            ApiError::Busy(_) => exit::BUSY,
            ApiError::Failed(_) => exit::FAILURE,
        };
        let name = match &e {
            ApiError::ZBus(_) => "error",
            ApiError::NotAuthorized(_) => "not authorized",
            ApiError::InvalidArgument(_) => "invalid argument",
            ApiError::ConfirmationRequired(_) => "confirmation required",
            ApiError::Busy(_) => "busy",
            ApiError::NotAssigned(_) => "not assigned",
            ApiError::NotFound(_) => "not found",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Failed(_) => "failed",
        };
        let dbus_error = match &e {
            ApiError::ZBus(zbus::Error::MethodError(n, _, _)) => Some(n.to_string()),
            // The bus's own refusals (AccessDenied by its policy) come as
            // fdo errors: named too (docs/json.md, ErrorBody).
            ApiError::ZBus(zbus::Error::FDO(f)) => Some(zbus::DBusError::name(&**f).to_string()),
            ApiError::ZBus(_) => None,
            other => Some(zbus::DBusError::name(other).to_string()),
        };
        CliError {
            dbus_error,
            ..CliError::new(code, format!("{name}: {}", e.message()))
        }
    }
}

/// Flags both CLIs share, with systemctl's names: where the node is, how
/// much to say, and `--no-pager` (accepted; the CLIs never page).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// Reach the node over SSH ([USER@]HOST[:PORT]), like `systemctl -H`.
    ///
    /// D-Bus runs over `ssh -xT [-p PORT] [USER@]HOST systemd-stdio-bridge`;
    /// the remote needs systemd-stdio-bridge, and LEASEHOLD_SSH replaces
    /// `ssh` (e.g. `ssh -i KEY`).
    #[arg(long, short = 'H', global = true, value_name = "[USER@]HOST[:PORT]")]
    pub host: Option<String>,
    /// Print only errors, warnings and the results of queries.
    ///
    /// A change prints no summary (its exit status says it was done);
    /// `note:` lines and the progress line are left out. Prompts, warnings,
    /// errors and --json output are unchanged.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    /// Accepted, like systemctl's; these CLIs never start a pager.
    #[arg(long, global = true)]
    pub no_pager: bool,
}

impl GlobalArgs {
    /// Applies the output flags to this process ([`output::set_quiet`]).
    pub fn apply(&self) {
        output::set_quiet(self.quiet);
    }

    /// Connects to the node: over SSH with `--host`, else to the local
    /// system bus. `timeout` (`--timeout`) bounds the connection's set-up
    /// and every call made on it: a frozen agent or a dead SSH link ends
    /// the CLI with exit 1 instead of hanging a script.
    pub async fn connect(&self, timeout: progress::Timeout) -> Result<Connection, CliError> {
        match &self.host {
            Some(h) => connect_ssh_bounded(h, timeout).await,
            None => connect_local_bounded(timeout).await,
        }
    }
}

/// Builds `b` with every method call bounded by `timeout` (None: no
/// limit), the set-up too; `fail` words an error.
async fn build_bounded(
    b: zbus::connection::Builder<'_>,
    timeout: progress::Timeout,
    fail: impl Fn(String) -> CliError,
) -> Result<Connection, CliError> {
    let Some(t) = timeout.0 else {
        return b.build().await.map_err(|e| fail(e.to_string()));
    };
    match tokio::time::timeout(t, b.method_timeout(t).build()).await {
        Ok(r) => r.map_err(|e| fail(e.to_string())),
        Err(_) => Err(fail(format!(
            "no connection within {}s (--timeout)",
            t.as_secs()
        ))),
    }
}

/// Connects to the local system bus (honours `DBUS_SYSTEM_BUS_ADDRESS`).
pub async fn connect_local() -> Result<Connection, CliError> {
    connect_local_bounded(progress::Timeout(None)).await
}

async fn connect_local_bounded(timeout: progress::Timeout) -> Result<Connection, CliError> {
    build_bounded(zbus::connection::Builder::system(), timeout, |e| {
        CliError::new(
            exit::UNAVAILABLE,
            format!("cannot connect to the system bus: {e}"),
        )
    })
    .await
}

/// The unixexec transport for `--host`: like `systemctl -H`, D-Bus runs over
/// `ssh -xT [-p PORT] [USER@]HOST systemd-stdio-bridge`. The SSH command can
/// be replaced with `LEASEHOLD_SSH` (split on whitespace), e.g. to add `-i KEY`.
pub fn ssh_transport(host: &str, ssh: Option<&str>) -> Result<Unixexec, CliError> {
    let invalid = |why: &str| CliError::new(exit::USAGE, format!("--host {host:?}: {why}"));
    if host.is_empty()
        || host.starts_with('-')
        || host.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid("expected [USER@]HOST[:PORT]"));
    }
    // user@host:port, but an IPv6 literal must be bracketed to carry a port.
    let (target, port) = match host.rsplit_once(':') {
        Some((t, p)) if !t.contains(':') || t.ends_with(']') => {
            let port: u16 = p
                .parse()
                .map_err(|_| invalid("port is not a number in 1-65535"))?;
            (
                t.trim_start_matches('[').trim_end_matches(']').to_owned(),
                Some(port),
            )
        }
        _ => (
            host.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host)
                .to_owned(),
            None,
        ),
    };
    let target = target.replace("@[", "@").replace(']', "");
    // Checked again once unbracketed: `[-oProxyCommand=…]:22` passed the
    // first check and reached ssh as an option (a local command run).
    if target.is_empty() || target.starts_with('-') {
        return Err(invalid("expected [USER@]HOST[:PORT]"));
    }
    // Each part on its own, from a strict set: the host and user reach
    // `%h`/`%r` in the operator's ssh_config (ProxyCommand, Match exec),
    // where `u@-oProxyCommand=…`, `$(cmd)@h` or `ssh://…` would be run or
    // misread (review: only the start of the whole target was checked).
    let (user, hostname) = match target.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, target.as_str()),
    };
    let ok_host = |h: &str| {
        !h.is_empty()
            && !h.starts_with('-')
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%'))
    };
    // `@` too: directory logins (`alice@corp.example`, as ssh takes them
    // before the last `@`); `$` only last: machine accounts (`host$`), not
    // `$IFS` where ssh_config puts `%r` in a shell command.
    let ok_user = |u: &str| {
        let base = u.strip_suffix('$').unwrap_or(u);
        !base.is_empty()
            && !base.starts_with('-')
            && base
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'))
    };
    if !ok_host(hostname) || !user.is_none_or(ok_user) {
        return Err(invalid(
            "expected [USER@]HOST[:PORT] (user: letters, digits, '.', '-', '_', '@', and '$' last; host: a name or an address)",
        ));
    }
    let mut cmd = ssh.unwrap_or("ssh").split_whitespace().map(OsString::from);
    let program = cmd
        .next()
        .ok_or_else(|| invalid("LEASEHOLD_SSH is empty"))?;
    let mut args: Vec<OsString> = cmd.collect();
    args.push("-xT".into());
    if let Some(p) = port {
        args.push("-p".into());
        args.push(p.to_string().into());
    }
    args.push(target.into());
    args.push("systemd-stdio-bridge".into());
    Ok(Unixexec::new(PathBuf::from(program), None, args))
}

/// Connects to a remote node's system bus over SSH.
pub async fn connect_ssh(host: &str) -> Result<Connection, CliError> {
    connect_ssh_bounded(host, progress::Timeout(None)).await
}

async fn connect_ssh_bounded(
    host: &str,
    timeout: progress::Timeout,
) -> Result<Connection, CliError> {
    let ssh = std::env::var("LEASEHOLD_SSH").ok();
    let transport = ssh_transport(host, ssh.as_deref())?;
    let b = zbus::connection::Builder::address(Address::new(Transport::Unixexec(transport)));
    build_bounded(b, timeout, |e| {
        CliError::new(
            exit::UNAVAILABLE,
            format!("cannot reach the agent on {host} over SSH: {e}"),
        )
    })
    .await
}

/// Runs a call that may need confirmation. Without `--yes`, the call is made
/// unconfirmed first: the agent decides whether it destroys data. If it does,
/// the user is asked on a terminal; without one, the call fails (exit 4).
pub async fn with_confirmation<T, F, Fut>(yes: bool, what: &str, call: F) -> Result<T, CliError>
where
    F: Fn(bool) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    with_confirmation_or(yes, what, exit::NOT_CONFIRMED, call).await
}

/// [`with_confirmation`] with the exit status of a refusal (no terminal, or
/// no typed `yes`): boundary changes that deny everything use 2 (usage:
/// `--yes` is missing), destructive key and volume changes 4.
pub async fn with_confirmation_or<T, F, Fut>(
    yes: bool,
    what: &str,
    refused: u8,
    call: F,
) -> Result<T, CliError>
where
    F: Fn(bool) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    if yes {
        return Ok(call(true).await?);
    }
    match call(false).await {
        Err(ApiError::ConfirmationRequired(msg)) => {
            ask_typed_yes(&msg, what, refused)?;
            Ok(call(true).await?)
        }
        other => Ok(other?),
    }
}

/// Asks for a typed `yes` on a terminal; without one, or without the
/// answer, fails with `refused` naming `--yes`.
pub fn ask_typed_yes(msg: &str, what: &str, refused: u8) -> Result<(), CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::new(
            refused,
            format!("confirmation required: {msg}; re-run with --yes to {what}"),
        ));
    }
    // The node's text on the lines before the question: no line of its
    // own (it could pose as this CLI's), nothing driving the terminal.
    eprint!(
        "{}.\nReally {}? Type 'yes' to continue: ",
        output::one_line(msg),
        output::one_line(what)
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::new(exit::FAILURE, format!("reading the answer: {e}")))?;
    if line.trim() != "yes" {
        return Err(CliError::new(refused, "not confirmed; nothing was changed"));
    }
    Ok(())
}

/// `P` from `argv`, as [`clap::Parser::try_parse_from`], with its command tree
/// handed to `keep` afterwards ([`leak`] or [`drop`]).
pub(crate) fn parse_kept<P: clap::Parser>(
    argv: &[std::ffi::OsString],
    keep: fn(clap::Command),
) -> Result<P, clap::Error> {
    let mut cmd = P::command();
    let r = match cmd.try_get_matches_from_mut(argv) {
        Ok(mut m) => P::from_arg_matches_mut(&mut m).map_err(|e| e.format(&mut cmd)),
        Err(e) => Err(e),
    };
    keep(cmd);
    r
}

/// Leaks a parsed command tree rather than dropping it: freeing it is a
/// quarter of a cold start's instructions, and the process either exits
/// soon or keeps the trees it built (one; two when `tenantctl`'s engine
/// subtree was tried first and refused the line).
pub(crate) fn leak(cmd: clap::Command) {
    std::mem::forget(cmd);
}

/// A command-line parse error (or `--help`/`--version`): printed by clap,
/// or, with `--json` among the arguments, as a `--json` error on stdout.
pub fn usage_exit(prog: &str, e: clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::from(exit::OK);
    }
    if std::env::args_os().skip(1).any(|a| a == "--json") {
        let text = e.render().to_string();
        let first = text
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ")
            .to_owned();
        println!("{}", CliError::new(exit::USAGE, first).json());
        eprintln!("{prog}: {}", text.trim_end());
    } else {
        let _ = e.print();
    }
    ExitCode::from(exit::USAGE)
}

/// Runs an async CLI body on a small runtime and maps the result to an exit
/// code; with `json`, a failure is also printed on stdout as
/// [`CliError::json`] (the message stays on stderr for a person).
pub fn run_main<F: std::future::Future<Output = Result<(), CliError>>>(
    prog: &str,
    json: bool,
    body: F,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{prog}: cannot start: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match rt.block_on(body) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            // An empty message: the status says it all (explain: denied,
            // its verdict already printed).
            if !e.message.is_empty() {
                if json {
                    // Not print_line: a reader gone away must not turn the
                    // error into exit 0 (review); whatever the write does,
                    // the status below is the error's.
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{}", output::terminal_safe(&e.json().to_string()))
                        .and_then(|()| out.flush());
                }
                // One line: the node's text cannot pose as this CLI's.
                let _ = writeln!(
                    std::io::stderr(),
                    "{prog}: {}",
                    output::terminal_safe(&e.message).replace('\n', "\n  ")
                );
            }
            ExitCode::from(e.code)
        }
    }
}

/// Checks a tenant, console or secret name against the node's rule before
/// anything is sealed or sent; the node checks again (same rule, same exit
/// status 6).
pub fn check_name(what: &str, name: &str) -> Result<(), CliError> {
    if leasehold_envelope::valid_name(name) {
        Ok(())
    } else {
        Err(CliError::new(
            exit::INVALID,
            format!(
                "invalid argument: {what} {name:?}: {}",
                leasehold_envelope::NAME_RULE
            ),
        ))
    }
}

/// Reads a file named on the command line, naming it in the error.
pub fn read_arg_file(what: &str, path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path)
        .map_err(|e| CliError::new(exit::INVALID, format!("{what} {}: {e}", path.display())))
}

/// Reads a public key file named on the command line and checks it
/// locally ([`keyfile::read_public_key`]): one RSA SubjectPublicKeyInfo PEM
/// the node accepts, returned re-encoded; anything else (a private key
/// above all) is refused with exit 6, naming the file.
pub fn read_pem_file(what: &str, path: &std::path::Path) -> Result<String, CliError> {
    keyfile::read_public_key(what, path)
}

/// Prints a public key, or writes its PEM to `out` and reports that.
pub fn emit_public_key(
    as_json: bool,
    k: &leasehold_dbus_api::PublicKey,
    out: Option<&std::path::Path>,
) -> Result<(), CliError> {
    let pem = k.pem.clone().unwrap_or_default();
    let v = output::public_key_json(k);
    match out {
        Some(path) => {
            std::fs::write(path, &pem)
                .map_err(|e| CliError::new(exit::FAILURE, format!("{}: {e}", path.display())))?;
            output::emit_done(as_json, v, || {
                format!(
                    "{} key written to {} ({})",
                    k.role.as_deref().unwrap_or("public"),
                    path.display(),
                    k.fingerprint.as_deref().unwrap_or_default()
                )
            });
        }
        None => output::emit(as_json, v, || pem.trim_end().to_owned()),
    }
    Ok(())
}

/// Writes man pages and shell completions for a command into `dir`.
pub fn generate(cmd: clap::Command, dir: &std::path::Path) -> Result<(), CliError> {
    let io = |e: std::io::Error| CliError::new(exit::FAILURE, format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = cmd.get_name().to_owned();
    let man = manpage::render(cmd.clone()).map_err(io)?;
    std::fs::write(dir.join(format!("{name}.1")), man).map_err(io)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), &name, dir).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(t: &Unixexec) -> Vec<String> {
        t.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn ssh_transport_like_systemctl_h() {
        let t = ssh_transport("alice@node1", None).unwrap();
        assert_eq!(t.path(), &PathBuf::from("ssh"));
        assert_eq!(args(&t), ["-xT", "alice@node1", "systemd-stdio-bridge"]);
        let t = ssh_transport("alice@node1:2222", Some("ssh -i /k -o BatchMode=yes")).unwrap();
        assert_eq!(
            args(&t),
            [
                "-i",
                "/k",
                "-o",
                "BatchMode=yes",
                "-xT",
                "-p",
                "2222",
                "alice@node1",
                "systemd-stdio-bridge"
            ]
        );
        let t = ssh_transport("[::1]:22", None).unwrap();
        assert_eq!(args(&t), ["-xT", "-p", "22", "::1", "systemd-stdio-bridge"]);
        let t = ssh_transport("fe80::1", None).unwrap();
        assert_eq!(args(&t), ["-xT", "fe80::1", "systemd-stdio-bridge"]);
        let t2 = ssh_transport("alice@corp.example@node1:22", None).unwrap();
        assert_eq!(
            args(&t2),
            [
                "-xT",
                "-p",
                "22",
                "alice@corp.example@node1",
                "systemd-stdio-bridge"
            ]
        );
        assert!(ssh_transport("fe80::1%eth0", None).is_ok());
        assert!(ssh_transport("host$@node1", None).is_ok());
        assert!(ssh_transport("alice@[fe80::1%eth0]:22", None).is_ok());
        let t = ssh_transport("[::1]", None).unwrap();
        assert_eq!(args(&t), ["-xT", "::1", "systemd-stdio-bridge"]);
    }

    #[test]
    fn ssh_transport_refuses_option_injection() {
        for bad in [
            "-oProxyCommand=x",
            "[-oProxyCommand=x]:22",
            "[-oProxyCommand=x]",
            "[]:22",
            "",
            "a b",
            "host:notaport",
            "host:70000",
            "u@-oProxyCommand=x",
            "u@[-oProxyCommand=x]",
            "ssh://-oProxyCommand=x:22",
            "[ssh://-oX]:22",
            "$(touch x)@h",
            "-u@h",
            "u@h;x",
            "@h",
            "u@",
            "x$IFS-v@h",
            "$@h",
        ] {
            assert!(ssh_transport(bad, None).is_err(), "{bad}");
        }
    }
}
