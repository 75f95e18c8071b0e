//! The webhook's HTTP/1.1: one request per connection, parsed with
//! `httparse` like agentd's metrics endpoint (docs/health.md says why no
//! HTTP server crate). Bounded: head, body, time.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head.
pub const MAX_HEAD_BYTES: usize = 8192;
/// Largest body (Alertmanager's `max_alerts` keeps it far below).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Time a client has to send its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request that passed the checks: `POST /alerts`, authorized, with
/// its body.
#[derive(Debug)]
pub struct Request {
    /// The body.
    pub body: Vec<u8>,
}

/// A refusal: status and a one-line reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// Why.
    pub reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// Reads one request; `authorized` judges the `Authorization` header.
pub async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    authorized: impl Fn(Option<&[u8]>) -> bool,
) -> Result<Request, Refusal> {
    let head = read_head(r, authorized).await?;
    read_body(r, head).await
}

/// An authorized request head: what was read past it and the body's length.
#[derive(Debug)]
pub struct Head {
    rest: Vec<u8>,
    content_length: usize,
}

/// Reads and checks a request's head (method, path, token, length), within
/// [`READ_TIMEOUT`]. The webhook does this before the connection takes a
/// serving slot, so only a client with the token can hold one (review).
pub async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    authorized: impl Fn(Option<&[u8]>) -> bool,
) -> Result<Head, Refusal> {
    match tokio::time::timeout(READ_TIMEOUT, head_inner(r, authorized)).await {
        Ok(res) => res,
        Err(_) => Err(refuse(
            408,
            format!("request not received within {} s", READ_TIMEOUT.as_secs()),
        )),
    }
}

/// Reads the body of an authorized head, within [`READ_TIMEOUT`].
pub async fn read_body<R: AsyncRead + Unpin>(r: &mut R, head: Head) -> Result<Request, Refusal> {
    match tokio::time::timeout(READ_TIMEOUT, body_inner(r, head)).await {
        Ok(res) => res,
        Err(_) => Err(refuse(
            408,
            format!("body not received within {} s", READ_TIMEOUT.as_secs()),
        )),
    }
}

async fn head_inner<R: AsyncRead + Unpin>(
    r: &mut R,
    authorized: impl Fn(Option<&[u8]>) -> bool,
) -> Result<Head, Refusal> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let (head_len, content_length) = loop {
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| refuse(400, format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(refuse(400, "connection closed before the request ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if req.method != Some("POST") {
                    return Err(refuse(405, "only POST"));
                }
                if req.path != Some("/alerts") {
                    return Err(refuse(404, "only /alerts"));
                }
                let header = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| h.value)
                };
                if !authorized(header("authorization")) {
                    return Err(refuse(401, "missing or wrong bearer token"));
                }
                if header("transfer-encoding").is_some() {
                    return Err(refuse(
                        411,
                        "chunked bodies are not taken: send Content-Length",
                    ));
                }
                let cl = header("content-length")
                    .ok_or_else(|| refuse(411, "Content-Length required"))?;
                let cl: usize = std::str::from_utf8(cl)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| refuse(400, "Content-Length is not a number"))?;
                if cl > MAX_BODY_BYTES {
                    return Err(refuse(
                        413,
                        format!("body of {cl} bytes is over {MAX_BODY_BYTES}"),
                    ));
                }
                break (len, cl);
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
                return Err(refuse(431, "request head too large"));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(refuse(400, format!("not HTTP: {e}"))),
        }
    };
    let rest = buf.split_off(head_len);
    if rest.len() > content_length {
        return Err(refuse(400, "more bytes than Content-Length"));
    }
    Ok(Head {
        rest,
        content_length,
    })
}

async fn body_inner<R: AsyncRead + Unpin>(r: &mut R, head: Head) -> Result<Request, Refusal> {
    let Head {
        rest: mut body,
        content_length,
    } = head;
    let mut rest = vec![0u8; content_length - body.len()];
    r.read_exact(&mut rest)
        .await
        .map_err(|e| refuse(400, format!("body shorter than Content-Length: {e}")))?;
    body.extend_from_slice(&rest);
    Ok(Request { body })
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Writes a JSON answer and closes the connection.
pub async fn respond<W: AsyncWrite + Unpin>(w: &mut W, status: u16, body: &serde_json::Value) {
    let body = body.to_string();
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        status_text(status),
        body.len() + 1
    );
    if status == 401 {
        out.push_str("WWW-Authenticate: Bearer\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.push('\n');
    let write = async {
        w.write_all(out.as_bytes()).await?;
        w.shutdown().await
    };
    // A client that does not read its answer loses it.
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> Result<Request, Refusal> {
        let mut r = bytes;
        read_request(&mut r, |h| {
            h == Some(b"Bearer right-token-123456".as_slice())
        })
        .await
    }

    fn post(body: &str, auth: &str) -> Vec<u8> {
        format!(
            "POST /alerts HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn bounded_and_authorized() {
        let ok = read(&post("{\"a\":1}", "Bearer right-token-123456"))
            .await
            .unwrap();
        assert_eq!(ok.body, b"{\"a\":1}");
        let status = |r: Result<Request, Refusal>| r.unwrap_err().status;
        assert_eq!(status(read(&post("{}", "Bearer wrong")).await), 401);
        assert_eq!(status(read(b"GET /alerts HTTP/1.1\r\n\r\n").await), 405);
        assert_eq!(status(read(b"POST /other HTTP/1.1\r\n\r\n").await), 404);
        let big = format!(
            "POST /alerts HTTP/1.1\r\nAuthorization: Bearer right-token-123456\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(status(read(big.as_bytes()).await), 413);
        let chunked = "POST /alerts HTTP/1.1\r\nAuthorization: Bearer right-token-123456\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(status(read(chunked.as_bytes()).await), 411);
        let mut huge = b"POST /alerts HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        assert_eq!(status(read(&huge).await), 431);
        assert_eq!(status(read(b"\x00\x01garbage\r\n\r\n").await), 400);
        // Cut short.
        let mut cut = post("{\"alerts\": []}", "Bearer right-token-123456");
        cut.truncate(cut.len() - 3);
        assert_eq!(status(read(&cut).await), 400);
    }
}
