//! The filter's decision logic alone, natively, per request: what the wasm callbacks cost on top
//! is the difference to `./build.sh bench`. Run: cargo run --release -p jairouter-filter --example request_path
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use jairouter_filter::limit::Refunds;
use jairouter_filter::plan::Plan;
use jairouter_filter::request::{on_request_headers, BodyStep, HeadDecision, RequestHead};
use jairouter_filter::route::{Caller, RouteInputs};
use jairouter_filter::store::MemoryStore;
use jairouter_filter::usage::UsageScanner;
use serde_json::json;
use std::cell::RefCell;
use std::time::Instant;

fn main() {
    let instance = json!({"name": "bench", "base-url": "http://127.0.0.1:9"});
    let never = json!({"enabled": true, "capacity": 1_000_000_000u64, "rate": 1_000_000_000u64, "scope": "model"});
    let configs = [
        (
            "routing only",
            json!({"services": {"chat": {"instances": [instance, instance]}}}),
        ),
        (
            "+ rate limit",
            json!({"rate-limit": never, "services": {"chat": {"instances": [instance, instance]}}}),
        ),
        (
            "+ token limit",
            json!({"rate-limit": never, "token-limit": {"tokens-per-minute": 1_000_000_000_000u64},
                                 "services": {"chat": {"instances": [instance, instance]}}}),
        ),
    ];
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}],"model":"bench"}}"#,
        "x".repeat(950)
    );
    let response = r#"{"id":"x","choices":[{"message":{"content":"Hello from the bench backend."}}],"usage":{"prompt_tokens":10,"completion_tokens":7}}"#;
    for (name, config) in configs {
        let cfg = Plan::from_value(&config).unwrap();
        let store = MemoryStore::default();
        for (key, initial) in cfg.limits.initial_keys() {
            use jairouter_filter::store::SharedStore;
            store.set(&key, &initial, None).unwrap();
        }
        let refunds = RefCell::new(Refunds::default());
        let rotations = RefCell::default();
        let n = 200_000u32;
        let start = Instant::now();
        for i in 0..n {
            let host = RouteInputs {
                store: &store,
                refunds: &refunds,
                rotations: &rotations,
                random: u64::from(i),
                clock: &move || 1_000_000_000 + u64::from(i) * 1000,
                client: None,
                caller: &Caller::Anyone,
            };
            let head = RequestHead {
                method: "POST",
                path: "/v1/chat/completions",
                content_type: Some("application/json"),
                model_header: None,
                end_of_stream: false,
                header: &|_| None,
                content_length: Some(body.len() as u64),
            };
            let HeadDecision::ScanBody(mut scan) = on_request_headers(&cfg, &head, &host) else {
                panic!()
            };
            let outcome = scan.feed(body.as_bytes());
            let BodyStep::Route(routed) =
                scan.decide(outcome, body.len() as u64, true, &cfg, &host)
            else {
                panic!()
            };
            if let Some(tokens) = routed.tokens {
                let mut usage = UsageScanner::new();
                usage.feed(response.as_bytes());
                let used = usage.usage().charge(tokens.prompt_estimate);
                cfg.limits.settle_tokens(
                    &store,
                    Some(&mut refunds.borrow_mut()),
                    &tokens.grants,
                    used,
                    host.now_ns(),
                );
            }
        }
        let per = start.elapsed().as_nanos() as f64 / f64::from(n);
        println!(
            "{name:<14} {per:>8.0} ns per request (native, decision logic and an in-memory store)"
        );
    }
}
