//! Test harness: a private redis-server on a free loopback port, the built service on port 0,
//! and an h2 gRPC client.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use jairouter_ratelimit::grpc::frame;
use jairouter_ratelimit::proto::{self, Message};

pub const SRL: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
pub const SETTLE: &str = "/jairouter.ratelimit.v1.TokenBudgets/Settle";

fn redis_server() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("redis-server"));
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "redis-server not found: these tests need a real Redis. Install it \
         (Debian/Ubuntu: `apt-get install -y redis-server`; the tests start their own \
         instance on a free loopback port and never touch a system one)"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A raw RESP command against Redis on `port`, returning the first reply line.
pub fn redis_cmd(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut msg = format!("*{}\r\n", args.len());
    for a in args {
        msg.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(msg.as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        let child = Command::new(redis_server())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "yes", "--loglevel", "warning"])
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_cmd(port, &["PING"]).ok().as_deref() != Some("+PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis {
            child: Some(child),
            port,
        }
    }

    /// SIGKILL, as an outage would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Service {
    child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl Service {
    pub fn start(redis_url: &str, extra: &[&str]) -> Service {
        let mut child = Command::new(env!("CARGO_BIN_EXE_jairouter-ratelimit"))
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(["--redis-url", redis_url])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the service starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut r = BufReader::new(stdout);
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the service never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the LISTENING line within 10 s");
        let mut grpc = None;
        let mut http = None;
        for word in line.split_whitespace() {
            if let Some(a) = word.strip_prefix("grpc=") {
                grpc = a.parse().ok();
            }
            if let Some(a) = word.strip_prefix("http=") {
                http = a.parse().ok();
            }
        }
        assert!(
            line.starts_with("LISTENING "),
            "unexpected first line {line:?}"
        );
        Service {
            child,
            grpc: grpc.expect("grpc address"),
            http: http.expect("http address"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait up to `within` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gRPC call's outcome.
#[derive(Debug)]
pub struct Reply {
    pub status: u32,
    pub message: String,
    pub body: Option<Vec<u8>>,
}

#[derive(Clone)]
pub struct Client {
    send: h2::client::SendRequest<Bytes>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Client { send }
    }

    /// One unary call with `body` as the whole request body.
    pub async fn raw(&self, path: &str, body: Vec<u8>, timeout: Option<&str>) -> Reply {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = timeout {
            req = req.header("grpc-timeout", t);
        }
        let req = req.body(()).unwrap();
        let mut send = self.send.clone().ready().await.expect("ready");
        let (resp, mut tx) = send.send_request(req, false).expect("send request");
        tx.send_data(Bytes::from(body), true).expect("send body");
        let resp = resp.await.expect("response");
        assert_eq!(resp.status(), 200);
        let mut rx = resp.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = rx.data().await {
            let chunk = chunk.expect("body chunk");
            let _ = rx.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = rx.trailers().await.expect("trailers").unwrap_or_default();
        let status = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("grpc-status trailer");
        let message = trailers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = if data.is_empty() {
            None
        } else {
            assert!(data.len() >= 5, "short frame");
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            assert_eq!(data.len(), 5 + len, "one framed message");
            Some(data[5..].to_vec())
        };
        Reply {
            status,
            message,
            body,
        }
    }

    pub async fn call<Req: Message, Resp: Message>(
        &self,
        path: &str,
        req: &Req,
        timeout: Option<&str>,
    ) -> Result<Resp, Reply> {
        let reply = self.raw(path, frame(&req.encode()), timeout).await;
        if reply.status != 0 {
            return Err(reply);
        }
        Ok(Resp::decode(reply.body.as_deref().unwrap_or_default()).expect("a valid response"))
    }

    pub async fn srl(
        &self,
        req: &proto::RateLimitRequest,
    ) -> Result<proto::RateLimitResponse, Reply> {
        self.call(SRL, req, None).await
    }

    pub async fn settle(&self, req: &proto::SettleRequest) -> Result<proto::SettleResponse, Reply> {
        self.call(SETTLE, req, None).await
    }
}

/// A descriptor as the gateway sends it.
pub fn desc(limit: &str, bucket: &str, n: u32, unit: i32, hits: Option<u64>) -> proto::Descriptor {
    proto::Descriptor {
        entries: vec![
            proto::Entry {
                key: "limit".into(),
                value: limit.into(),
            },
            proto::Entry {
                key: "bucket".into(),
                value: bucket.into(),
            },
        ],
        limit: Some(proto::LimitOverride {
            requests_per_unit: n,
            unit,
        }),
        hits_addend: hits,
    }
}

pub fn request(descriptors: Vec<proto::Descriptor>) -> proto::RateLimitRequest {
    proto::RateLimitRequest {
        domain: "jairouter".into(),
        descriptors,
        hits_addend: 0,
    }
}

/// GET over HTTP/1.1: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("http answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the metric line `name` exactly (name with labels).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}
