//! The network probes (`tcp`, `http`) and the notify-socket parser, each
//! bounded in time and size (docs/engines.md, "Runtime"). The `exec`
//! probe runs inside the engine through the shim (`launch`).
//!
//! Engines share the node's network namespace today (the launcher does
//! not unshare it), so "the engine's loopback" is `127.0.0.1` as the agent
//! sees it. The agent runs these probes itself, as root: its socket
//! carries a mark (`SO_MARK`, [`Mark`]) that the node guard takes as an
//! engine's, so a probe reaches only an engine's listener, never a
//! service of the node's (docs/netpolicy.md, "The node guard").

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Most bytes of an HTTP answer read to find its status line.
pub const MAX_HTTP_HEAD: usize = 4096;
/// Largest notify datagram accepted (systemd's own limit is larger, but an
/// engine only needs `READY=1` and `WATCHDOG=1`).
pub const MAX_NOTIFY_DATAGRAM: usize = 4096;

/// Why a probe failed; its Display is shown in `status`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProbeError {
    /// No answer within the probe's `timeout`.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Connecting failed (refused, unreachable).
    #[error("connect {addr}: {reason}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// The error.
        reason: String,
    },
    /// Sending the request or reading the answer failed.
    #[error("{0}")]
    Io(String),
    /// The answer is not an HTTP status line.
    #[error("not an HTTP answer: {0:?}")]
    NotHttp(String),
    /// An HTTP status outside 2xx-3xx.
    #[error("HTTP status {0}")]
    Status(u16),
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// The packet mark (`SO_MARK`) a probe's socket carries, or none (an
/// agent without the node guard: not root, no nftables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark(pub Option<u32>);

fn connect(
    port: u16,
    deadline: Instant,
    timeout: Duration,
    mark: Mark,
) -> Result<TcpStream, ProbeError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = loopback(port);
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(ProbeError::Timeout(timeout))?;
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| ProbeError::Io(format!("socket: {e}")))?;
    if let Mark(Some(m)) = mark {
        // Fail closed: unmarked, the probe would be the node's own
        // connection, which the guard lets reach every service.
        sock.set_mark(m)
            .map_err(|e| ProbeError::Io(format!("cannot mark the probe's socket: {e}")))?;
    }
    sock.connect_timeout(&addr.into(), left)
        .map(|()| TcpStream::from(sock))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                ProbeError::Timeout(timeout)
            }
            _ => ProbeError::Connect {
                addr,
                reason: e.to_string(),
            },
        })
}

/// Healthy if `127.0.0.1:port` accepts a connection within `timeout`.
pub fn tcp(port: u16, timeout: Duration, mark: Mark) -> Result<(), ProbeError> {
    connect(port, Instant::now() + timeout, timeout, mark).map(drop)
}

/// `GET path` on `127.0.0.1:port`: healthy on a 2xx or 3xx status. The
/// whole exchange is held to `timeout`; at most [`MAX_HTTP_HEAD`] bytes
/// are read (the body is never read).
pub fn http(port: u16, path: &str, timeout: Duration, mark: Mark) -> Result<u16, ProbeError> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(port, deadline, timeout, mark)?;
    let io_err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            ProbeError::Timeout(timeout)
        }
        _ => ProbeError::Io(e.to_string()),
    };
    let left = |d: Instant| {
        d.checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ProbeError::Timeout(timeout))
    };
    s.set_write_timeout(Some(left(deadline)?)).map_err(io_err)?;
    // HTTP/1.0 with Connection: close: no chunking or keep-alive to handle.
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: leasehold-probe\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(io_err)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < MAX_HTTP_HEAD {
        s.set_read_timeout(Some(left(deadline)?)).map_err(io_err)?;
        let want = buf.len().min(MAX_HTTP_HEAD - head.len());
        match s.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    let status = status_line(&head)?;
    if (200..400).contains(&status) {
        Ok(status)
    } else {
        Err(ProbeError::Status(status))
    }
}

/// The status code of `HTTP/1.x NNN …` at the start of `head`.
pub fn status_line(head: &[u8]) -> Result<u16, ProbeError> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let text = String::from_utf8_lossy(line);
    let shown = || text.trim_end().chars().take(64).collect::<String>();
    let mut parts = text.split_ascii_whitespace();
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/") || code.len() != 3 {
        return Err(ProbeError::NotHttp(shown()));
    }
    code.parse::<u16>()
        .ok()
        .filter(|c| (100..600).contains(c))
        .ok_or_else(|| ProbeError::NotHttp(shown()))
}

/// What a notify datagram says, of what the supervisor understands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NotifyMessage {
    /// `READY=1` was in it.
    pub ready: bool,
    /// `WATCHDOG=1` was in it.
    pub watchdog: bool,
}

/// Parses one `sd_notify` datagram: newline-separated `KEY=VALUE`
/// assignments; `READY=1` and `WATCHDOG=1` count, everything else
/// (`STATUS=`, `MAINPID=`, …) is ignored. `None` for a datagram over
/// [`MAX_NOTIFY_DATAGRAM`] or not UTF-8 (dropped whole, as systemd does
/// with what it cannot parse).
pub fn parse_notify(datagram: &[u8]) -> Option<NotifyMessage> {
    if datagram.len() > MAX_NOTIFY_DATAGRAM {
        return None;
    }
    let text = std::str::from_utf8(datagram).ok()?;
    let mut m = NotifyMessage::default();
    for line in text.split('\n') {
        match line {
            "READY=1" => m.ready = true,
            "WATCHDOG=1" => m.watchdog = true,
            _ => {}
        }
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static [u8], delay: Duration) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 1024];
            let n = s.read(&mut req).unwrap();
            assert!(req[..n].starts_with(b"GET /healthz HTTP/1.0\r\n"));
            std::thread::sleep(delay);
            let _ = s.write_all(answer);
        });
        port
    }

    fn closed_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    #[test]
    fn tcp_probe_accepts_a_listener_and_fails_a_closed_port() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        tcp(port, Duration::from_secs(1), Mark(None)).unwrap();
        let e = tcp(closed_port(), Duration::from_secs(1), Mark(None)).unwrap_err();
        assert!(matches!(e, ProbeError::Connect { .. }), "{e}");
    }

    #[test]
    fn http_probe_reads_only_the_status() {
        let ok = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n", Duration::ZERO);
        assert_eq!(
            http(ok, "/healthz", Duration::from_secs(1), Mark(None)),
            Ok(204)
        );
        let redirect = serve_once(b"HTTP/1.0 302 Found\r\nLocation: /\r\n\r\n", Duration::ZERO);
        assert_eq!(
            http(redirect, "/healthz", Duration::from_secs(1), Mark(None)),
            Ok(302)
        );
        let bad = serve_once(b"HTTP/1.1 503 Busy\r\n\r\n", Duration::ZERO);
        assert_eq!(
            http(bad, "/healthz", Duration::from_secs(1), Mark(None)),
            Err(ProbeError::Status(503))
        );
        let junk = serve_once(b"SSH-2.0-OpenSSH\r\n", Duration::ZERO);
        assert!(matches!(
            http(junk, "/healthz", Duration::from_secs(1), Mark(None)),
            Err(ProbeError::NotHttp(_))
        ));
        let e = http(closed_port(), "/", Duration::from_secs(1), Mark(None)).unwrap_err();
        assert!(matches!(e, ProbeError::Connect { .. }), "{e}");
    }

    #[test]
    fn http_probe_is_held_to_its_timeout() {
        let slow = serve_once(b"HTTP/1.1 200 OK\r\n\r\n", Duration::from_secs(3));
        let t0 = Instant::now();
        let e = http(slow, "/healthz", Duration::from_millis(200), Mark(None)).unwrap_err();
        let took = t0.elapsed();
        assert_eq!(e, ProbeError::Timeout(Duration::from_millis(200)));
        assert!(took < Duration::from_millis(600), "{took:?}");
    }

    #[test]
    fn http_answer_without_a_newline_is_read_to_the_cap_only() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            // An endless line: the probe stops at MAX_HTTP_HEAD.
            let chunk = [b'x'; 1024];
            while s.write_all(&chunk).is_ok() {}
        });
        let e = http(port, "/", Duration::from_secs(2), Mark(None)).unwrap_err();
        assert!(matches!(e, ProbeError::NotHttp(_)), "{e}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_line(b"HTTP/1.1 200 OK\r\n"), Ok(200));
        assert_eq!(status_line(b"HTTP/2 301\n"), Ok(301));
        for bad in [
            &b""[..],
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 999 x",
            b"FTP 200 ok",
        ] {
            assert!(status_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn notify_datagrams() {
        assert_eq!(
            parse_notify(b"READY=1\nSTATUS=serving"),
            Some(NotifyMessage {
                ready: true,
                watchdog: false
            })
        );
        assert_eq!(
            parse_notify(b"WATCHDOG=1\n"),
            Some(NotifyMessage {
                ready: false,
                watchdog: true
            })
        );
        assert_eq!(
            parse_notify(b"READY=0\nWATCHDOG=trigger"),
            Some(NotifyMessage::default())
        );
        assert_eq!(parse_notify(b"READY=1xx"), Some(NotifyMessage::default()));
        assert_eq!(parse_notify(&[0xff, b'R']), None);
        assert_eq!(parse_notify(&vec![b'a'; MAX_NOTIFY_DATAGRAM + 1]), None);
    }
}
