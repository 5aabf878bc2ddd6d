//! A whole exchange natively, per request, against the counting test host: the decision, the
//! response's bookkeeping, the access-log summary and the metrics. What V8 and the host calls
//! add on top is the difference to `./build.sh bench`.
//! Run: cargo run --release -p jairouter-filter --example exchange_path (DEMO=1: the bench's
//! demo configuration, limits and an API key).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use jairouter_filter::exchange::{Exchange, Worker};
use jairouter_filter::host::TestHost;
use jairouter_filter::plan::Plan;
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counts allocations (the filter's allocator under wasm is part of its cost per request).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let instance = json!({"name": "bench", "base-url": "http://127.0.0.1:9"});
    let mut document =
        json!({"model": {"services": {"chat": {"instances": [instance, instance]}}}});
    // DEMO=1: the bench's `jairouter` (a request limit and a token budget on the model, an API
    // key with request and token quotas), as `the_benchmarks_demo_shape_is_counted_too` counts it.
    let demo = std::env::var("DEMO").is_ok_and(|v| v == "1");
    if demo {
        let never = json!({"enabled": true, "capacity": 1_000_000_000u64,
                           "rate": 1_000_000_000u64, "scope": "model"});
        document["model"]["rate-limit"] = never;
        document["model"]["token-limit"] =
            json!({"tokens-per-minute": 1_000_000_000_000u64, "scope": "model"});
        let hash = jairouter_filter::auth::hash_key(b"0123456789abcdef", "sk-bench-123456");
        document["jairouter"] = json!({"security": {"api-key": {"keys": [{
            "key-id": "bench", "key-hash": hash, "permissions": ["admin"],
            "rate-limit-per-minute": 1_000_000_000_000u64,
            "tokens-per-minute": 1_000_000_000_000u64
        }]}}});
    }
    let plan = Rc::new(Plan::from_value(&document).unwrap());
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
    if demo {
        host.request_headers
            .borrow_mut()
            .push(("authorization".into(), "Bearer sk-bench-123456".into()));
    }
    *host.request_body.borrow_mut() = body.clone().into_bytes();
    let response_head = vec![
        (":status".to_string(), "200".to_string()),
        ("content-type".to_string(), "application/json".to_string()),
    ];
    *host.response_chunk.borrow_mut() = answer.to_vec();
    // Counts, refunds owed between ticks and rotations, as a VM holds them.
    let worker = Rc::new(Worker::new(1));
    let n: u32 = std::env::var("EXCHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let start = Instant::now();
    let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
    for i in 0..n {
        host.now.set(1_000_000_000 + u64::from(i) * 1000);
        *host.response_headers.borrow_mut() = response_head.clone();
        if demo {
            // The credential is removed from each request.
            let mut headers = host.request_headers.borrow_mut();
            if !headers.iter().any(|(k, _)| k == "authorization") {
                headers.push(("authorization".into(), "Bearer sk-bench-123456".into()));
            }
        }
        let mut exchange = Exchange::new(Rc::clone(&plan), Rc::clone(&worker));
        exchange.on_request_headers(&host, false);
        exchange.on_request_body(&host, body.len(), true);
        exchange.on_response_headers(&host, false);
        exchange.on_response_body(&host, answer.len(), true);
        exchange.on_log(&host);
        exchange.on_drop(&host);
        if i % 1000 == 0 {
            worker.metrics.borrow_mut().drain();
            plan.limits
                .pay_refunds(&host, &mut worker.refunds.borrow_mut(), host.now.get());
            host.take_calls();
        }
    }
    let per = start.elapsed() / n;
    assert!(
        host.replies.borrow().is_empty(),
        "every request was served, none refused"
    );
    let allocations = (ALLOCATIONS.load(Ordering::Relaxed) - allocations_before) / u64::from(n);
    println!(
        "whole exchange (round-robin chat, breakers, metrics, log summary): {per:?} and \
         {allocations} allocations per request (test host included)"
    );
}
