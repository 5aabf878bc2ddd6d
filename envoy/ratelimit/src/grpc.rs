//! Unary gRPC over HTTP/2 cleartext (prior knowledge), on `h2` directly.
//!
//! A call is a POST with `content-type: application/grpc` whose body is one length-prefixed
//! message (1 byte compressed flag, 4 bytes big-endian length, the protobuf). The answer is
//! `:status 200`, one length-prefixed message when the call succeeded, and the trailers
//! `grpc-status` and `grpc-message`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::log;

/// The largest message accepted (the length prefix), larger → INVALID_ARGUMENT.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// How long a client may take to send its request body when it sets no grpc-timeout.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection may take to send the HTTP/2 preface.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// gRPC status codes used here.
pub mod status {
    pub const OK: u32 = 0;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
}

/// A call's failure: the grpc-status and grpc-message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: u32,
    pub message: String,
}

impl Status {
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Status::new(status::INVALID_ARGUMENT, message)
    }
}

/// One decoded call, as handed to the service.
pub struct Call {
    /// The `:path`, e.g. `/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.
    pub path: String,
    /// The message (without the 5-byte prefix), or why the body could not be read as one
    /// (the handler answers with that status, and may count it).
    pub message: Result<Bytes, Status>,
    /// When the client gives up (from `grpc-timeout`), if it said.
    pub deadline: Option<Instant>,
}

/// What the server needs from the service.
pub trait Handler: Send + Sync + 'static {
    /// Whether `path` names a method the service has (else UNIMPLEMENTED before the body is read).
    fn knows(&self, path: &str) -> bool;
    /// Serve one call: the response message, or the status to fail with.
    fn call(&self, call: Call) -> impl Future<Output = Result<Vec<u8>, Status>> + Send;
}

/// Prefix a message with the 5-byte gRPC frame header.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// The one message of a unary body: Ok(None) while the body may still be incomplete.
pub fn unframe(body: &[u8]) -> Result<Option<&[u8]>, Status> {
    let Some((header, rest)) = body.split_first_chunk::<5>() else {
        return Ok(None);
    };
    let [flag, l0, l1, l2, l3] = *header;
    if flag != 0 {
        return Err(Status::new(
            status::UNIMPLEMENTED,
            "compressed messages are not supported",
        ));
    }
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if len > MAX_MESSAGE {
        return Err(Status::invalid(format!(
            "message of {len} bytes exceeds the limit of {MAX_MESSAGE}"
        )));
    }
    match rest.len().cmp(&len) {
        std::cmp::Ordering::Less => Ok(None),
        std::cmp::Ordering::Equal => Ok(rest.get(..len)),
        std::cmp::Ordering::Greater => {
            Err(Status::invalid("more than one message in a unary call"))
        }
    }
}

/// The `grpc-timeout` header's value as a duration: up to 8 digits and a unit of H M S m u n.
pub fn parse_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at_checked(v.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Percent-encode a grpc-message (every byte outside printable ASCII, and `%`).
pub fn encode_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for &b in msg.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Resolves once the shutdown flag is true (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Accept connections until `shutdown` turns true, then let every connection finish its
/// in-flight calls (GOAWAY) and return once all have closed.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let for_conns = shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    conns.spawn(connection(sock, peer, handler.clone(), for_conns.clone()));
                }
                Err(e) => {
                    log::warn(format_args!("grpc accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = crate::grpc::stopped(&mut shutdown) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn connection<H: Handler>(
    sock: TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) {
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(1024)
        .max_header_list_size(64 * 1024)
        .handshake::<_, Bytes>(sock);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            log::debug(format_args!("h2 handshake with {peer} failed: {e}"));
            return;
        }
        Err(_) => return,
    };
    let mut closing = *shutdown.borrow();
    if closing {
        conn.graceful_shutdown();
    }
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    tokio::spawn(stream(req, respond, handler.clone()));
                }
                Some(Err(e)) => {
                    log::debug(format_args!("h2 connection with {peer}: {e}"));
                    break;
                }
                None => break,
            },
            _ = crate::grpc::stopped(&mut shutdown), if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
        }
    }
}

async fn stream<H: Handler>(
    req: Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    handler: Arc<H>,
) {
    let result = answer(req, &*handler).await;
    if let Err(e) = send(respond, result) {
        log::debug(format_args!("sending a gRPC response failed: {e}"));
    }
}

async fn answer<H: Handler>(req: Request<h2::RecvStream>, handler: &H) -> Result<Vec<u8>, Status> {
    let (parts, mut body) = req.into_parts();
    if parts.method != http::Method::POST {
        return Err(Status::new(status::UNIMPLEMENTED, "gRPC calls are POSTs"));
    }
    let grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct == "application/grpc" || ct.starts_with("application/grpc+proto"));
    if !grpc {
        return Err(Status::invalid("content-type must be application/grpc"));
    }
    let path = parts.uri.path().to_string();
    if !handler.knows(&path) {
        return Err(Status::new(
            status::UNIMPLEMENTED,
            format!("unknown method {path}"),
        ));
    }
    let deadline = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_timeout)
        .and_then(|t| Instant::now().checked_add(t));
    let read_until = deadline.unwrap_or_else(|| Instant::now() + BODY_TIMEOUT);

    let mut buf = BytesMut::new();
    let read = async {
        while let Some(chunk) = body.data().await {
            let chunk = chunk
                .map_err(|e| Status::new(status::INTERNAL, format!("reading the request: {e}")))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
            // Reject an oversized or doubled message as soon as it shows.
            unframe(&buf)?;
        }
        match unframe(&buf)? {
            Some(_) => Ok(()),
            None => Err(Status::invalid("truncated or missing request message")),
        }
    };
    let message = match tokio::time::timeout_at(read_until.into(), read).await {
        Ok(Ok(())) => Ok(buf.freeze().slice(5..)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Status::new(
            status::DEADLINE_EXCEEDED,
            "request body not received in time",
        )),
    };
    handler
        .call(Call {
            path,
            message,
            deadline,
        })
        .await
}

fn send(
    mut respond: h2::server::SendResponse<Bytes>,
    result: Result<Vec<u8>, Status>,
) -> Result<(), h2::Error> {
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let mut tx = respond.send_response(resp, false)?;
    let (code, message) = match result {
        Ok(msg) => {
            tx.send_data(Bytes::from(frame(&msg)), false)?;
            (status::OK, String::new())
        }
        Err(s) => (s.code, s.message),
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(code));
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&encode_message(&message)) {
            trailers.insert("grpc-message", v);
        }
    }
    tx.send_trailers(trailers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_and_unframe() {
        let framed = frame(b"hello");
        assert_eq!(framed, [0, 0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o']);
        assert_eq!(unframe(&framed), Ok(Some(&b"hello"[..])));
        assert_eq!(unframe(framed.get(..7).unwrap_or_default()), Ok(None));
        assert_eq!(unframe(framed.get(..3).unwrap_or_default()), Ok(None));
        assert_eq!(unframe(&frame(b"")), Ok(Some(&b""[..])));
    }

    #[test]
    fn unframe_rejects() {
        let mut two = frame(b"a");
        two.extend_from_slice(&frame(b"b"));
        assert_eq!(
            unframe(&two).map_err(|s| s.code),
            Err(status::INVALID_ARGUMENT)
        );
        let big = [0, 0x00, 0x40, 0x00, 0x01];
        assert_eq!(
            unframe(&big).map_err(|s| s.code),
            Err(status::INVALID_ARGUMENT)
        );
        let at_limit = [0, 0x00, 0x40, 0x00, 0x00];
        assert_eq!(unframe(&at_limit), Ok(None));
        let compressed = [1, 0, 0, 0, 0];
        assert_eq!(
            unframe(&compressed).map_err(|s| s.code),
            Err(status::UNIMPLEMENTED)
        );
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(
            parse_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_timeout("5n"), Some(Duration::from_nanos(5)));
        assert_eq!(parse_timeout("123456789m"), None);
        assert_eq!(parse_timeout("m"), None);
        assert_eq!(parse_timeout(""), None);
        assert_eq!(parse_timeout("10x"), None);
        assert_eq!(parse_timeout("-1S"), None);
        assert_eq!(parse_timeout("1é"), None);
    }

    #[test]
    fn grpc_message_encoding() {
        assert_eq!(encode_message("redis: timed out"), "redis: timed out");
        assert_eq!(encode_message("100%\n"), "100%25%0A");
        assert_eq!(encode_message("é"), "%C3%A9");
    }
}
