//! A whole exchange natively, per request, against the counting test host: the decision, the
//! response's bookkeeping, the access-log summary and the metrics. What V8 and the host calls
//! add on top is the difference to `./build.sh bench`.
//! Run: cargo run --release -p jairouter-filter --example exchange_path
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use jairouter_filter::balance::Rng;
use jairouter_filter::exchange::Exchange;
use jairouter_filter::host::TestHost;
use jairouter_filter::metrics::Metrics;
use jairouter_filter::plan::Plan;
use serde_json::json;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

fn main() {
    let instance = json!({"name": "bench", "base-url": "http://127.0.0.1:9"});
    let plan = Rc::new(
        Plan::from_value(&json!({"services": {"chat": {"instances": [instance, instance]}}}))
            .unwrap(),
    );
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}],"model":"bench"}}"#,
        "x".repeat(950)
    );
    let answer = br#"{"id":"x","choices":[{"message":{"content":"Hello from the bench backend."}}],"usage":{"prompt_tokens":10,"completion_tokens":7}}"#;
    let host = TestHost::default();
    jairouter_filter::install::install(&plan, b"{}", &host.store);
    *host.request_headers.borrow_mut() = vec![
        (":method".into(), "POST".into()),
        (":path".into(), "/v1/chat/completions".into()),
        ("content-type".into(), "application/json".into()),
        ("content-length".into(), body.len().to_string()),
    ];
    *host.request_body.borrow_mut() = body.clone().into_bytes();
    let response_head = vec![
        (":status".to_string(), "200".to_string()),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    *host.response_chunk.borrow_mut() = answer.to_vec();
    let rng = Rc::new(RefCell::new(Rng::new(1)));
    let metrics: Rc<RefCell<Metrics>> = Rc::default();
    let n = 200_000u32;
    let start = Instant::now();
    for i in 0..n {
        host.now.set(1_000_000_000 + u64::from(i) * 1000);
        *host.response_headers.borrow_mut() = response_head.clone();
        let mut exchange = Exchange::new(
            Rc::clone(&plan),
            Rc::clone(&rng),
            Rc::clone(&metrics),
            Rc::default(),
        );
        exchange.on_request_headers(&host, false);
        exchange.on_request_body(&host, body.len(), true);
        exchange.on_response_headers(&host, false);
        exchange.on_response_body(&host, answer.len(), true);
        exchange.on_log(&host);
        exchange.on_drop(&host);
        if i % 1000 == 0 {
            metrics.borrow_mut().drain();
            host.take_calls();
        }
    }
    let per = start.elapsed() / n;
    println!(
        "whole exchange (round-robin chat, breakers, metrics, log summary): {per:?} per request"
    );
}
