//! A whole request decision from hostile input: method, path, content type and model header on
//! the first lines, then the body, fed in chunks the way the binding does, against a
//! configuration with every body-reading feature on (header-hash on a body field, a token budget
//! that reads `max_tokens`, rate limits, fallbacks, multipart services).
#![no_main]
use jairouter_filter::limit::Refunds;
use jairouter_filter::plan::Plan;
use jairouter_filter::request::{on_request_headers, BodyStep, HeadDecision, RequestHead};
use jairouter_filter::route::{Caller, RouteInputs};
use jairouter_filter::scan::ScanOutcome;
use jairouter_filter::store::MemoryStore;
use jairouter_fuzz::{chunks, split_line, split_seed};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::sync::OnceLock;

const CONFIG: &str = r#"{
  "rate-limit": {"enabled": true, "algorithm": "token-bucket", "capacity": 1000, "rate": 100,
                 "scope": "model", "client-ip-enable": true, "max-clients": 64},
  "token-limit": {"tokens-per-minute": 100000, "scope": "model"},
  "fallback": {"models": {"llama": ["qwen"]}},
  "gateway": {"max-body-bytes": 4096},
  "services": {
    "chat": {
      "load-balance": {"type": "header-hash", "hash-header": "x-session-id", "hash-field": "user"},
      "instances": [
        {"name": "llama", "base-url": "http://a:1/prefix", "weight": 3},
        {"name": "llama", "base-url": "http://b:1", "weight": 1},
        {"name": "qwen", "base-url": "http://q:1"}
      ]
    },
    "embedding": {"load-balance": {"type": "least-latency"},
                  "instances": [{"name": "bge", "base-url": "http://e:1"}]},
    "stt": {"load-balance": {"type": "round-robin"},
            "instances": [{"name": "whisper", "base-url": "http://w:1"}]},
    "imgEdit": {"load-balance": {"type": "ip-hash"},
                "instances": [{"name": "sd", "base-url": "http://s:1"}]}
  }
}"#;

fn config() -> &'static Plan {
    static CFG: OnceLock<Plan> = OnceLock::new();
    CFG.get_or_init(|| match Plan::from_json(CONFIG.as_bytes()) {
        Ok(cfg) => cfg,
        Err(e) => panic!("the fuzz configuration is refused: {e:?}"),
    })
}

fn text(bytes: &[u8]) -> Option<String> {
    (!bytes.is_empty()).then(|| String::from_utf8_lossy(bytes).into_owned())
}

fuzz_target!(|data: &[u8]| {
    let cfg = config();
    let (seed, rest) = split_seed(data);
    let (method_path, rest) = split_line(rest);
    let (content_type, rest) = split_line(rest);
    let (model_header, rest) = split_line(rest);
    let (session, body) = split_line(rest);
    let method_path = String::from_utf8_lossy(method_path);
    let (method, path) = method_path
        .split_once(' ')
        .unwrap_or(("POST", &method_path));
    let content_type = text(content_type);
    let model_header = text(model_header);
    let session = text(session);
    let header = |name: &str| (name == "x-session-id").then(|| session.clone()).flatten();
    let head = RequestHead {
        method,
        path,
        content_type: content_type.as_deref(),
        model_header: model_header.as_deref(),
        end_of_stream: body.is_empty(),
        header: &header,
        content_length: Some(body.len() as u64),
    };
    let store = MemoryStore::default();
    let refunds = RefCell::new(Refunds::default());
    let rotations = RefCell::default();
    let host = RouteInputs {
        store: &store,
        refunds: &refunds,
        rotations: &rotations,
        random: u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        clock: &move || 1_000_000_000 + u64::from(seed),
        client: Some("10.0.0.1"),
        caller: &Caller::Anyone,
    };
    let mut scan = match on_request_headers(cfg, &head, &host) {
        HeadDecision::ScanBody(scan) => scan,
        HeadDecision::Reply(reply) => {
            assert!((400..600).contains(&reply.status) || reply.status == 200);
            return;
        }
        HeadDecision::Route(_) => return,
    };
    let pieces = chunks(body, seed);
    let mut buffered = 0u64;
    for (at, piece) in pieces.iter().enumerate() {
        buffered += piece.len() as u64;
        let end = at + 1 == pieces.len();
        let outcome = scan.feed(piece);
        match scan.decide(outcome, buffered, end, cfg, &host) {
            BodyStep::NeedMore => assert!(!end, "the body ended and no decision came"),
            BodyStep::Route(routed) => {
                assert!(!routed.model.is_empty());
                if let Some((start, end)) = scan.model_span() {
                    assert!(start < end && end <= body.len());
                }
                return;
            }
            BodyStep::Reply(reply) => {
                assert!((400..600).contains(&reply.status));
                return;
            }
        }
    }
    let _ = ScanOutcome::NeedMore;
});
