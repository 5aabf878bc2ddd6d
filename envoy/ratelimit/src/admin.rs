//! The admin HTTP/1.1 listener: `GET /healthz` and `GET /metrics`, one request a connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::log;
use crate::metrics::Metrics;
use crate::store::Store;

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Admin {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => {
                    tokio::spawn(connection(sock, admin.clone()));
                }
                Err(e) => {
                    log::warn(format_args!("http accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = crate::grpc::stopped(&mut shutdown) => return,
        }
    }
}

/// The method and path of a request head, once it is complete.
pub fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(head.get(..end)?).ok()?;
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Some((method, path))
}

async fn connection(mut sock: TcpStream, admin: Arc<Admin>) {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
            if head.len() > MAX_HEAD {
                return false;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            }
        }
    };
    if !matches!(tokio::time::timeout(READ_TIMEOUT, read).await, Ok(true)) {
        let _ = respond(&mut sock, "400 Bad Request", "text/plain", "bad request\n").await;
        return;
    }
    let (status, ctype, body) = match request_line(&head) {
        None => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
        Some(("GET", "/healthz")) => match admin.store.ping(admin.store.timeout()).await {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
        },
        Some(("GET", "/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4",
            admin.metrics.render(admin.store.is_up()),
        ),
        Some(("GET", _)) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        Some(_) => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let _ = respond(&mut sock, status, ctype, &body).await;
}

async fn respond(
    sock: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(msg.as_bytes()).await?;
    sock.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_lines() {
        assert_eq!(
            request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            request_line(b"GET /healthz?x=1 HTTP/1.0\r\n\r\n"),
            Some(("GET", "/healthz"))
        );
        assert_eq!(request_line(b"GET /metrics HTTP/1.1\r\n"), None);
        assert_eq!(request_line(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_line(b"GET / HTTP/2 x\r\n\r\n"), None);
    }
}
