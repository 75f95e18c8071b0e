//! Long calls (volume init with its device fill, key rotations, release,
//! assignment): a client-side deadline (`--timeout`) and, on a terminal
//! and without `--quiet`, a line on stderr saying the CLI is still waiting.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use leasehold_dbus_api::Error as ApiError;

/// `--timeout` when none is given: long enough for the fill of a large
/// device, short enough that a frozen agent does not hang a script.
pub const DEFAULT_TIMEOUT: &str = "30m";

/// A call that got no answer within `--timeout` (the connection's bound
/// on every call; long calls say more, see [`bounded`]).
pub const NO_ANSWER: &str = "no answer from the agent within --timeout; it may be frozen or the link to the node down, and it may still carry the call out (check with a query, or give a longer --timeout, 0 for none)";

/// Whether `e` is a call that got no answer within `--timeout`: the
/// connection's method timeout, or [`within`]'s (the same error).
pub fn timed_out(e: &ApiError) -> bool {
    matches!(e, ApiError::ZBus(zbus::Error::InputOutput(io))
        if io.kind() == std::io::ErrorKind::TimedOut)
}

/// `call`, held as a whole to the connection's `--timeout` (its method
/// timeout; none: no limit). zbus starts that clock only once a call is
/// written, and does not apply it to the property read that fills a
/// proxy's cache: a write stuck on a dead link (a large upload chunk over
/// SSH) or such a read is bounded here. At the deadline the same error as
/// the connection's (exit 1, [`NO_ANSWER`]).
pub async fn within<T, E, Fut>(conn: &zbus::Connection, call: Fut) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
    E: From<zbus::Error>,
{
    match conn.method_timeout() {
        None => call.await,
        Some(t) => tokio::time::timeout(t, call).await.unwrap_or_else(|_| {
            Err(E::from(zbus::Error::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            ))))
        }),
    }
}

/// `--timeout`: how long to wait for a call (None: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Option<Duration>);

/// Parses `--timeout`: `0` (wait forever), or seconds with an optional
/// `s`, `m` or `h` suffix, at most 24h.
pub fn parse_timeout(s: &str) -> Result<Timeout, String> {
    let (num, mult) = crate::boundary::split_duration(s);
    let mult = u64::from(mult);
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: give a duration, e.g. 90s, 30m, 2h, or 0 for none"))?;
    let secs = n
        .checked_mul(mult)
        .filter(|s| *s <= 24 * 3600)
        .ok_or_else(|| format!("{s:?}: at most 24h (0: no timeout)"))?;
    Ok(Timeout((secs > 0).then(|| Duration::from_secs(secs))))
}

/// Runs one call to the agent with the deadline `timeout` (None: none).
/// While it runs, and only if stderr is a terminal and not `--quiet`, a
/// line on stderr says what the node is doing and for how long (erased when
/// the call ends).
/// At the deadline the CLI stops waiting and says that the node may still
/// be working (the call cannot be taken back once the agent has it);
/// `check` names the command that shows how it ended.
pub async fn bounded<T, Fut>(
    what: &str,
    check: &str,
    timeout: Timeout,
    call: Fut,
) -> Result<T, ApiError>
where
    Fut: Future<Output = Result<T, ApiError>>,
{
    bounded_with(what, check, timeout, call, || std::future::ready(None)).await
}

/// [`bounded`], and on a terminal the line shows the step the node
/// reports (`status`, asked once a second, e.g. the volume's progress).
pub async fn bounded_with<T, Fut, S, SFut>(
    what: &str,
    check: &str,
    timeout: Timeout,
    call: Fut,
    status: S,
) -> Result<T, ApiError>
where
    Fut: Future<Output = Result<T, ApiError>>,
    S: Fn() -> SFut,
    SFut: Future<Output = Option<String>>,
{
    // The progress line is information: not with --quiet.
    let tty = std::io::stderr().is_terminal() && !crate::output::quiet();
    let start = Instant::now();
    let ticker = async {
        if !tty {
            return std::future::pending::<()>().await;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let step = status()
                .await
                .unwrap_or_else(|| "waiting for the node".to_owned());
            let mut e = std::io::stderr().lock();
            // The node's text on one redrawn line: nothing in it may
            // drive the terminal or break the line (review).
            let step = crate::output::one_line(&step);
            let _ = write!(e, "\r\x1b[2K{what}: {step}, {}s", start.elapsed().as_secs());
            let _ = e.flush();
        }
    };
    let deadline = async {
        match timeout.0 {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let r = tokio::select! {
        r = call => Some(r),
        () = deadline => None,
        () = ticker => unreachable!("the ticker never ends"),
    };
    if tty && start.elapsed() >= Duration::from_secs(1) {
        // Erase the progress line.
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[2K");
        let _ = e.flush();
    }
    // The connection's own bound on the call (the same --timeout) may
    // end it first: the same words.
    let r = r.filter(|r| !r.as_ref().is_err_and(timed_out));
    r.unwrap_or_else(|| {
        Err(ApiError::Failed(format!(
            "timed out after {}s waiting for the node to {what} (--timeout); the node may still be doing it: see `{check}`",
            start.elapsed().as_secs()
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse() {
        let t = |s| parse_timeout(s).map(|t| t.0);
        assert_eq!(t("0"), Ok(None));
        assert_eq!(t("90"), Ok(Some(Duration::from_secs(90))));
        assert_eq!(t("30m"), Ok(Some(Duration::from_secs(1800))));
        assert_eq!(t("2h"), Ok(Some(Duration::from_secs(7200))));
        assert!(parse_timeout("25h").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_past_its_deadline_says_the_node_may_still_work() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok::<u8, ApiError>(1)
        };
        let e = bounded(
            "initialize the volume",
            "landlordctl volume status",
            Timeout(Some(Duration::from_millis(50))),
            slow,
        )
        .await
        .unwrap_err();
        let m = e.message();
        assert!(
            m.contains("timed out after 0s waiting for the node to initialize the volume"),
            "{m}"
        );
        assert!(m.contains("landlordctl volume status"), "{m}");
        let fast = async { Ok::<u8, ApiError>(7) };
        assert_eq!(bounded("x", "y", Timeout(None), fast).await.unwrap(), 7);
    }
}
