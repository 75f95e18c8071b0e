//! Where the agent's log goes. Run by systemd with stderr connected to the
//! journal (`JOURNAL_STREAM` names stderr's device and inode), it logs over
//! the journal's native protocol: a priority per line (error 3, warn 4,
//! info 5, debug 6) and every tracing field as a journal field (`EVENT=`,
//! `UID=`, `ACTION=` …) that `journalctl -o verbose` shows and
//! `journalctl EVENT=boundary-foreign-commit` selects. Anywhere else it
//! writes plain text to stderr, with colour only on a terminal.

use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Whether `journal_stream` (the value of `JOURNAL_STREAM`, "DEV:INODE")
/// names the file whose device and inode are `dev` and `ino`: only then is
/// stderr the journal (a child that inherited the variable but not the
/// stream must not switch).
pub fn is_journal_stream(journal_stream: Option<&str>, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.and_then(|s| s.split_once(':')) else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    // /proc/self/fd/2 follows to the socket; its metadata is stderr's.
    std::fs::metadata("/proc/self/fd/2")
        .is_ok_and(|m| is_journal_stream(Some(&stream), m.dev(), m.ino()))
}

/// Installs the global subscriber; returns where the log goes (for the
/// first log line).
pub fn init() -> &'static str {
    let filter = || {
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,tss_esapi=warn,zbus=warn"))
    };
    // A missing socket (journald stopped) leaves stderr, which still works.
    if let Some(layer) = stderr_is_journal()
        .then(tracing_journald::layer)
        .and_then(Result::ok)
    {
        // Field names as written (EVENT=, not F_EVENT=): the agent's fields
        // are its own, none starts with '_' (journald's trusted fields,
        // which it would drop anyway).
        let layer = layer
            .with_field_prefix(None)
            .with_syslog_identifier("agentd".to_owned());
        tracing_subscriber::registry()
            .with(filter())
            .with(layer)
            .init();
        return "journal (native protocol)";
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: not in a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    "stderr"
}

#[cfg(test)]
mod tests {
    use super::is_journal_stream;

    #[test]
    fn journal_stream_must_name_stderr_itself() {
        assert!(is_journal_stream(Some("8:123"), 8, 123));
        assert!(!is_journal_stream(Some("8:124"), 8, 123));
        assert!(!is_journal_stream(Some("9:123"), 8, 123));
        for bad in ["", "8", "8:", ":123", "x:y", "8:123:4"] {
            assert!(!is_journal_stream(Some(bad), 8, 123), "{bad:?}");
        }
        assert!(!is_journal_stream(None, 8, 123));
    }
}
