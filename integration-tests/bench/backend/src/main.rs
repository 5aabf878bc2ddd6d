//! A fast OpenAI-compatible backend for `./build.sh bench`, so the backend is never what a
//! benchmark measures: canned answers for chat completions and embeddings, and SSE streams with
//! a chosen number of chunks and gap between them. Standard library only: one thread per
//! connection, HTTP/1.1 keep-alive, bodies by content-length or chunked (read and dropped).
//!
//! Usage: jairouter-bench-backend [--listen 127.0.0.1:0] [--chunks 10] [--gap-ms 20];
//! prints `LISTEN <port>`. Request headers x-chunks and x-chunk-gap-ms override the stream shape
//! (a proxy that drops unknown headers gets the defaults).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

const CHAT: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the bench backend."},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":7,"total_tokens":17}}"#;
const EMBEDDINGS: &str = r#"{"object":"list","model":"bench","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8]}],"usage":{"prompt_tokens":4,"total_tokens":4}}"#;
const NOT_FOUND: &str =
    r#"{"error":{"message":"not found","type":"invalid_request_error","code":"not_found"}}"#;

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:0".to_string();
    let mut shape = Shape {
        chunks: 10,
        gap_ms: 20,
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().unwrap_or(listen),
            "--chunks" => {
                shape.chunks = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(shape.chunks)
            }
            "--gap-ms" => {
                shape.gap_ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(shape.gap_ms)
            }
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(&listen)?;
    println!("LISTEN {}", listener.local_addr()?.port());
    io::stdout().flush()?;
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            let _ = serve(stream, shape);
        });
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Shape {
    chunks: usize,
    gap_ms: u64,
}

struct Request {
    path: String,
    stream: bool,
    chunks: usize,
    gap_ms: u64,
    close: bool,
}

fn serve(stream: TcpStream, shape: Shape) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let mut writer = stream;
    let mut body = Vec::new();
    while let Some(request) = read_request(&mut reader, &mut body, shape)? {
        respond(&mut writer, &request)?;
        if request.close {
            break;
        }
    }
    Ok(())
}

fn read_request(
    reader: &mut BufReader<TcpStream>,
    body: &mut Vec<u8>,
    shape: Shape,
) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (mut length, mut chunked, mut close) = (0usize, false, false);
    let (mut chunks, mut gap_ms) = (shape.chunks, shape.gap_ms);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().unwrap_or(0),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            "x-chunks" => chunks = value.parse().unwrap_or(chunks),
            "x-chunk-gap-ms" => gap_ms = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    body.clear();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            if size == 0 {
                // Trailers up to the empty line.
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            line.clear();
            reader.read_line(&mut line)?;
        }
    } else if length > 0 {
        body.resize(length, 0);
        reader.read_exact(body)?;
    }
    // A streaming request says so near its start; no need to parse the JSON.
    let head = &body[..body.len().min(4096)];
    let stream = contains(head, b"\"stream\":true") || contains(head, b"\"stream\": true");
    Ok(Some(Request {
        path,
        stream,
        chunks,
        gap_ms,
        close,
    }))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn respond(w: &mut TcpStream, request: &Request) -> io::Result<()> {
    let path = request.path.split('?').next().unwrap_or("");
    if path.ends_with("/chat/completions") && request.stream {
        return stream_chat(w, request);
    }
    let (status, body) = if path.ends_with("/chat/completions") || path.ends_with("/completions") {
        ("200 OK", CHAT)
    } else if path.ends_with("/embeddings") {
        ("200 OK", EMBEDDINGS)
    } else {
        ("404 Not Found", NOT_FOUND)
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    w.write_all(response.as_bytes())
}

fn stream_chat(w: &mut TcpStream, request: &Request) -> io::Result<()> {
    w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")?;
    let mut send = |data: &str| -> io::Result<()> {
        let event = format!("data: {data}\n\n");
        w.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())?;
        w.flush()
    };
    for i in 0..request.chunks {
        if i > 0 && request.gap_ms > 0 {
            thread::sleep(Duration::from_millis(request.gap_ms));
        }
        send(&format!(
            r#"{{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench","choices":[{{"index":0,"delta":{{"content":"tok{i} "}}}}]}}"#
        ))?;
    }
    send(
        r#"{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":10,"total_tokens":20}}"#,
    )?;
    send("[DONE]")?;
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}
