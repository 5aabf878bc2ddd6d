//! The exchange against `TestHost`: what it does to a request and a response, and how many host
//! calls each request shape costs. The counts are pinned: a change that adds a host call to the
//! request path fails here and must say why (each costs ~1–2 µs under V8).

use super::*;
use crate::breaker::{Breaker, State};
use crate::contract::{
    SPAN_ATTRIBUTES, SPAN_INPUT_TOKENS, SPAN_INSTANCE, SPAN_OUTPUT_TOKENS, SPAN_REQUEST_MODEL,
    SPAN_RESPONSE_MODEL, SPAN_SERVICE,
};
use crate::host::{Call, TestHost};
use crate::store::SharedStore;
use serde_json::{json, Value};
use std::collections::HashMap;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const CHAT: &[u8] = br#"{"model":"llama","messages":[{"role":"user","content":"Hello"}]}"#;

/// The demo's shape: two weighted replicas, round-robin, breakers on (the default), retries 2.
fn plan(extra: Value) -> Rc<Plan> {
    let mut config = json!({"services": {"chat": {"instances": [
        {"name": "llama", "base-url": "http://a:1", "path": "/v1/chat/completions", "weight": 2},
        {"name": "llama", "base-url": "http://b:1", "path": "/v1/chat/completions"}
    ]}}});
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            config.insert(key.clone(), value.clone());
        }
    }
    let bytes = config.to_string().into_bytes();
    let plan = Plan::from_json(&bytes).unwrap_or_else(|e| panic!("{e}"));
    Rc::new(plan)
}

struct Run {
    host: TestHost,
    exchange: Exchange,
    worker: Rc<Worker>,
}

impl Run {
    fn new(plan: Rc<Plan>) -> Run {
        let host = TestHost::default();
        host.now.set(1_000_000_000);
        crate::install::install(&plan, b"{}", &host.store);
        let worker = Rc::new(Worker::new(7));
        let exchange = Exchange::new(plan, Rc::clone(&worker));
        Run {
            host,
            exchange,
            worker,
        }
    }

    /// The next request on the same host (shared data, clock) and VM.
    fn next_request(&mut self) {
        let plan = Rc::clone(&self.exchange.plan);
        self.exchange = Exchange::new(plan, Rc::clone(&self.worker));
        self.host.replies.borrow_mut().clear();
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut all = vec![
            (":method".to_string(), method.to_string()),
            (":path".to_string(), path.to_string()),
            (":authority".to_string(), "gateway".to_string()),
        ];
        all.extend(headers.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        if !body.is_empty() {
            all.push(("content-type".into(), "application/json".into()));
            all.push(("content-length".into(), body.len().to_string()));
        }
        *self.host.request_headers.borrow_mut() = all;
        *self.host.request_body.borrow_mut() = body.to_vec();
    }

    /// Headers then body, as Envoy calls a filter that holds the headers.
    fn send(&mut self) -> Flow {
        let body = self.host.request_body.borrow().len();
        let flow = self.exchange.on_request_headers(&self.host, body == 0);
        if flow == Flow::Pause && body > 0 && self.host.replies.borrow().is_empty() {
            return self.exchange.on_request_body(&self.host, body, true);
        }
        flow
    }

    /// A response from the instance: its head, then each chunk, the last one ending it.
    fn respond(&mut self, status: u32, headers: &[(&str, &str)], chunks: &[&[u8]]) {
        let mut all = vec![(":status".to_string(), status.to_string())];
        all.extend(headers.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        *self.host.response_headers.borrow_mut() = all;
        self.exchange
            .on_response_headers(&self.host, chunks.is_empty());
        for (n, chunk) in chunks.iter().enumerate() {
            *self.host.response_chunk.borrow_mut() = chunk.to_vec();
            self.host.now.set(self.host.now.get() + 1_000_000);
            self.exchange
                .on_response_body(&self.host, chunk.len(), n + 1 == chunks.len());
        }
    }

    fn log(&mut self) {
        self.host.now.set(self.host.now.get() + 1_000_000);
        self.exchange.on_log(&self.host);
    }

    fn calls(&self) -> HashMap<Call, usize> {
        self.host.take_calls().into_iter().collect()
    }

    fn summary(&self) -> Value {
        let text = self.host.property_text(&[LOG_SUMMARY_PROPERTY]);
        let value: Value =
            serde_json::from_str(text.as_deref().unwrap_or_default()).unwrap_or_default();
        // Written by hand, the summary is still what serde_json writes of it (members by name).
        if let Some(text) = &text {
            assert_eq!(&value.to_string(), text);
        }
        value
    }

    fn counters(&self) -> HashMap<String, u64> {
        self.worker
            .metrics
            .borrow_mut()
            .drain()
            .into_iter()
            .collect()
    }

    fn breaker(&self, instance: usize) -> Breaker {
        let plan = &self.exchange.plan;
        let key = plan
            .instances()
            .nth(instance)
            .map(|i| i.state_key.clone())
            .unwrap_or_default();
        Breaker::decode(self.host.store.get(&key).0.as_deref())
    }
}

fn ok_json() -> Vec<u8> {
    br#"{"id":"x","choices":[{"message":{"content":"Hi there"}}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#.to_vec()
}

/// Runs one whole chat request; returns the host calls of each phase and in all.
fn whole_request(run: &mut Run, headers: &[(&str, &str)]) -> (Vec<usize>, usize) {
    run.request("POST", "/v1/chat/completions", headers, CHAT);
    run.host.take_calls();
    let body = run.host.request_body.borrow().len();
    run.exchange.on_request_headers(&run.host, false);
    let head = run.host.total_calls();
    run.host.take_calls();
    if run.host.replies.borrow().is_empty() && matches!(run.exchange.stage, Stage::ReadingBody(_)) {
        run.exchange.on_request_body(&run.host, body, true);
    }
    let body_calls = run.host.total_calls();
    run.host.take_calls();
    let answer = ok_json();
    run.respond(200, &[("content-type", "application/json")], &[&answer]);
    let response = run.host.total_calls();
    run.host.take_calls();
    run.log();
    let log = run.host.total_calls();
    run.host.take_calls();
    let phases = vec![head, body_calls, response, log];
    let total = phases.iter().sum();
    (phases, total)
}

#[test]
fn a_body_routed_round_robin_chat_request_takes_ten_host_calls() {
    let mut run = Run::new(plan(json!({})));
    let (phases, total) = whole_request(&mut run, &[]);
    // Headers: every header in one call. Body: one read, the clock, the instance's state, the
    // routing header (the rotation is the worker's own: no call). Response head: one read, the
    // instance header. Body: the usage read, the log summary. Log: the clock.
    assert_eq!(phases, [1, 4, 4, 1], "per phase");
    assert_eq!(total, 10);
    assert_eq!(
        run.host
            .request_header(crate::contract::ROUTING_HEADER)
            .as_deref(),
        Some("jairouter-chat-0")
    );
    assert_eq!(
        run.host.response_header("x-jairouter-instance").as_deref(),
        Some("chat-0")
    );
}

#[test]
fn the_same_request_pins_each_kind_of_call() {
    let mut run = Run::new(plan(json!({})));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.host.take_calls();
    run.send();
    let answer = ok_json();
    run.respond(200, &[("content-type", "application/json")], &[&answer]);
    run.log();
    let calls = run.calls();
    let expected: HashMap<Call, usize> = [
        (Call::RequestHeaders, 1),
        (Call::RequestBody, 1),
        (Call::Clock, 2),
        (Call::SharedGet, 1),
        (Call::SetRequestHeader, 1),
        (Call::ResponseHeaders, 1),
        (Call::SetResponseHeader, 1),
        (Call::ResponseBody, 1),
        (Call::SetProperty, 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(calls, expected);
}

#[test]
fn without_the_instance_header_and_with_its_breaker_off_it_is_eight() {
    let mut run = Run::new(plan(json!({
        "gateway": {"instance-header": false},
        "circuit-breaker": {"enabled": false}
    })));
    let (_, total) = whole_request(&mut run, &[]);
    assert_eq!(total, 8);
}

/// The demo's shape with `jairouter.tracing` on (the renderer's wrapped form).
fn traced_plan() -> Rc<Plan> {
    traced(json!({"services": {"chat": {"instances": [
        {"name": "llama", "base-url": "http://a:1", "path": "/v1/chat/completions", "weight": 2},
        {"name": "llama", "base-url": "http://b:1", "path": "/v1/chat/completions"}
    ]}}}))
}

fn traced(model: Value) -> Rc<Plan> {
    let config = json!({"model": model, "jairouter": {"tracing": {
        "enabled": true, "exporter": {"otlp": {"endpoint": "http://collector:4317"}}
    }}});
    Rc::new(Plan::from_value(&config).unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn with_tracing_on_the_span_attributes_cost_one_write_each() {
    let mut run = Run::new(traced_plan());
    let (phases, total) = whole_request(&mut run, &[]);
    // The ten of the untraced request, and five writes where the log summary is written:
    // service, model, instance, input and output tokens (no fallback served: no response model).
    assert_eq!(phases, [1, 4, 9, 1], "per phase");
    assert_eq!(total, 15);
    let attribute = |name: &str| run.host.property_text(&[name]);
    assert_eq!(attribute(SPAN_SERVICE).as_deref(), Some("chat"));
    assert_eq!(attribute(SPAN_REQUEST_MODEL).as_deref(), Some("llama"));
    assert_eq!(attribute(SPAN_INSTANCE).as_deref(), Some("chat-0"));
    assert_eq!(attribute(SPAN_INPUT_TOKENS).as_deref(), Some("9"));
    assert_eq!(attribute(SPAN_OUTPUT_TOKENS).as_deref(), Some("3"));
    assert_eq!(attribute(SPAN_RESPONSE_MODEL), None);
    assert_eq!(run.summary()["model"], "llama");
}

#[test]
fn without_tracing_no_span_attribute_is_written() {
    let mut run = Run::new(plan(json!({})));
    whole_request(&mut run, &[]);
    for name in SPAN_ATTRIBUTES {
        assert_eq!(run.host.property_text(&[name]), None, "{name}");
    }
}

#[test]
fn a_traced_refusal_carries_what_was_known() {
    let mut run = Run::new(traced_plan());
    run.request("POST", "/v1/chat/completions", &[], br#"{"model":"nope"}"#);
    run.send();
    run.log();
    assert_eq!(run.host.replies.borrow().first().map(|r| r.0), Some(404));
    assert_eq!(
        run.host.property_text(&[SPAN_SERVICE]).as_deref(),
        Some("chat")
    );
    for name in [SPAN_INSTANCE, SPAN_INPUT_TOKENS, SPAN_OUTPUT_TOKENS] {
        assert_eq!(run.host.property_text(&[name]), None, "{name}");
    }
}

#[test]
fn a_traced_fallback_names_both_models() {
    let mut run = Run::new(traced(json!({
        "fallback": {"models": {"gone": ["llama"]}},
        "services": {"chat": {"instances": [
            {"name": "llama", "base-url": "http://a:1"},
            {"name": "gone", "base-url": "http://g:1", "status": "down"}
        ]}}
    })));
    run.request(
        "POST",
        "/v1/chat/completions",
        &[],
        br#"{"model":"gone","messages":[]}"#,
    );
    assert_eq!(run.send(), Flow::Continue);
    let answer = ok_json();
    run.respond(200, &[("content-type", "application/json")], &[&answer]);
    let attribute = |name: &str| run.host.property_text(&[name]);
    assert_eq!(attribute(SPAN_REQUEST_MODEL).as_deref(), Some("gone"));
    assert_eq!(attribute(SPAN_RESPONSE_MODEL).as_deref(), Some("llama"));
}

#[test]
fn a_header_routed_request_does_not_wait_for_its_body() {
    let mut run = Run::new(plan(json!({})));
    run.request(
        "POST",
        "/v1/chat/completions",
        &[("x-jairouter-model", "llama")],
        CHAT,
    );
    run.host.take_calls();
    assert_eq!(
        run.exchange.on_request_headers(&run.host, false),
        Flow::Continue
    );
    // Headers, clock, instance state, routing header.
    assert_eq!(run.host.total_calls(), 4);
    run.host.take_calls();
    // Envoy still calls the body callback: it costs nothing.
    run.exchange.on_request_body(&run.host, CHAT.len(), true);
    assert_eq!(run.host.total_calls(), 0);
    let answer = ok_json();
    run.respond(200, &[("content-type", "application/json")], &[&answer]);
    run.log();
    // Then the response head's read and the instance header, the usage read and the log
    // summary, the log's clock: 9 in all.
    assert_eq!(run.host.total_calls(), 5);
}

#[test]
fn a_rate_limit_costs_one_read_and_one_write_more() {
    let mut run = Run::new(plan(json!({
        "rate-limit": {"enabled": true, "capacity": 100, "rate": 10, "scope": "service"}
    })));
    let (phases, total) = whole_request(&mut run, &[]);
    // Response: the three x-ratelimit-* headers and the instance header in one call.
    assert_eq!(phases, [1, 6, 4, 1]);
    assert_eq!(total, 12);
    // Its state goes back to the client, beside what the instance sent.
    assert!(run
        .host
        .response_header("x-ratelimit-limit-requests")
        .is_some());
    assert_eq!(
        run.host.response_header("x-jairouter-instance").as_deref(),
        Some("chat-0")
    );
    assert_eq!(
        run.host.response_header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(run.host.response_header(":status").as_deref(), Some("200"));
}

#[test]
fn a_token_budget_reserves_at_admission_and_settles_from_usage() {
    let mut run = Run::new(plan(json!({"token-limit": {"tokens-per-minute": 100000}})));
    let (phases, total) = whole_request(&mut run, &[]);
    // Body: + the budget's read and write. Response: the headers in one call, + the clock at
    // the end of the body (the log reuses that time); the 12 tokens used of those reserved
    // leave a refund owed, paid with the next draw or at the tick: no call here.
    assert_eq!(phases, [1, 6, 5, 0]);
    assert_eq!(total, 12);
    let summary = run.summary();
    assert_eq!(summary["prompt_tokens"], 9);
    assert_eq!(summary["completion_tokens"], 3);
}

#[test]
fn a_models_request_limit_and_token_budget_are_drawn_in_one_read_and_one_write() {
    let mut run = Run::new(plan(json!({
        "rate-limit": {"enabled": true, "capacity": 100, "rate": 10, "scope": "model"},
        "token-limit": {"tokens-per-minute": 100000, "scope": "model"}
    })));
    let (phases, total) = whole_request(&mut run, &[]);
    // Body: the model's entry, holding both buckets, read once and written once (14 when each
    // had its own). Response as with the budget alone.
    assert_eq!(phases, [1, 6, 5, 0]);
    assert_eq!(total, 12);
    for header in [
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
    ] {
        assert!(run.host.response_header(header).is_some(), "{header}");
    }
    // The next request pays the refund owed in the same write.
    run.next_request();
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.host.take_calls();
    run.send();
    let calls = run.calls();
    assert_eq!(
        calls.get(&Call::SharedGet),
        Some(&2),
        "instance state, the entry"
    );
    assert_eq!(calls.get(&Call::SharedSet), Some(&1));
    assert!(run.worker.refunds.borrow().is_empty());
}

#[test]
fn a_large_prompt_after_the_model_is_read_in_two_windows_for_max_tokens() {
    let mut run = Run::new(plan(
        json!({"token-limit": {"tokens-per-minute": 100000000}}),
    ));
    let content = "x".repeat(1024 * 1024);
    let body =
        format!(r#"{{"model":"llama","messages":[{{"role":"user","content":"{content}"}}]}}"#);
    run.request("POST", "/v1/chat/completions", &[], body.as_bytes());
    run.host.take_calls();
    assert_eq!(run.send(), Flow::Continue);
    // The first window finds the model; the 64 KB sought past that window for `max_tokens`
    // come in one more read (not four), and nothing of the prompt beyond them.
    let calls = run.calls();
    assert_eq!(calls.get(&Call::RequestBody), Some(&2));
    assert_eq!(
        run.host.request_body_read.get(),
        BODY_WINDOW + crate::scan::json::FIELD_LOOKAHEAD
    );
}

#[test]
fn a_large_prompt_before_the_model_is_read_in_growing_windows() {
    let mut run = Run::new(plan(json!({})));
    let content = "x".repeat(200 * 1024);
    let body =
        format!(r#"{{"messages":[{{"role":"user","content":"{content}"}}],"model":"llama"}}"#);
    run.request("POST", "/v1/chat/completions", &[], body.as_bytes());
    run.host.take_calls();
    assert_eq!(run.send(), Flow::Continue);
    // 16 + 16 + 32 + 64 + 64 KB, then the last bytes and the model: 6 reads, not 13.
    assert_eq!(run.calls().get(&Call::RequestBody), Some(&6));
    assert_eq!(run.host.request_body_read.get(), body.len());
}

/// What the model's token budget holds, without the refill since it was last written (a time
/// before that write refills nothing), so the levels below are exact.
fn budget_level(run: &Run) -> u64 {
    let levels = run.exchange.plan.limits.levels(&run.host.store, 0);
    levels.first().map_or(0, |l| l.available)
}

#[test]
fn a_refund_owed_is_paid_in_the_next_draws_write_or_at_the_tick() {
    // 100 tokens a second: what the clock adds between the writes here stays below one token.
    let mut run = Run::new(plan(json!({"token-limit": {"tokens-per-minute": 6000}})));
    let full = budget_level(&run);
    let (_, total) = whole_request(&mut run, &[]);
    assert_eq!(total, 12);
    let reserved = CHAT.len().div_ceil(4) as u64 + 256;
    // Settled from usage (12 tokens), the rest owed: the bucket still holds the reservation.
    assert_eq!(budget_level(&run), full - reserved);
    assert!(!run.worker.refunds.borrow().is_empty());
    // The next request draws with the same read and write, and pays the refund in it.
    run.next_request();
    let (phases, _) = whole_request(&mut run, &[]);
    assert_eq!(phases, [1, 6, 5, 0]);
    assert_eq!(budget_level(&run), full - 12 - reserved);
    // At the tick: what the second one owes, one read and one write.
    run.host.take_calls();
    let plan = Rc::clone(&run.exchange.plan);
    plan.limits.pay_refunds(
        &run.host,
        &mut run.worker.refunds.borrow_mut(),
        run.host.now.get(),
    );
    assert_eq!(run.host.total_calls(), 2);
    assert!(run.worker.refunds.borrow().is_empty());
    assert_eq!(budget_level(&run), full - 24);
}

#[test]
fn a_debt_is_charged_at_once() {
    let mut run = Run::new(plan(json!({"token-limit": {"tokens-per-minute": 6000}})));
    let full = budget_level(&run);
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    let usage = br#"{"choices":[],"usage":{"prompt_tokens":400,"completion_tokens":600}}"#;
    run.respond(200, &[("content-type", "application/json")], &[usage]);
    run.log();
    assert!(run.worker.refunds.borrow().is_empty());
    assert_eq!(budget_level(&run), full - 1000);
}

#[test]
fn a_stream_reads_each_chunk_once_and_the_clock_twice() {
    let mut run = Run::new(plan(json!({})));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    run.host.take_calls();
    let chunks: Vec<Vec<u8>> = (0..8)
        .map(|n| {
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"w{n} \"}}}}]}}\n\n")
                .into_bytes()
        })
        .chain([b"data: [DONE]\n\n".to_vec()])
        .collect();
    let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    run.respond(200, &[("content-type", "text/event-stream")], &chunks);
    let calls = run.calls();
    assert_eq!(
        calls.get(&Call::ResponseBody),
        Some(&9),
        "one read per chunk"
    );
    assert_eq!(calls.get(&Call::Clock), Some(&2), "first and last byte");
    // The head's read, the instance header, 9 reads, 2 clocks, the log summary.
    assert_eq!(calls.values().sum::<usize>(), 14);
    run.log();
    assert_eq!(run.host.total_calls(), 0, "the log reuses the stream's end");
    let counters = run.counters();
    let ttft = counters
        .keys()
        .any(|k| k.starts_with("jairouter_time_to_first_token_seconds_count"));
    assert!(ttft, "time to first token observed: {counters:?}");
}

#[test]
fn api_keys_read_the_clock_and_remove_the_credential() {
    let hash = crate::auth::hash_key(b"0123456789abcdef", "sk-test-123456");
    let model = json!({"services": {"chat": {"instances": [
        {"name": "llama", "base-url": "http://a:1", "path": "/v1/chat/completions"}
    ]}}});
    let document = json!({
        "model": model,
        "jairouter": {"security": {"api-key": {"keys": [{"key-id": "team", "key-hash": hash, "permissions": ["chat"]}]}}}
    });
    let plan = Plan::from_value(&document).unwrap_or_else(|e| panic!("{e}"));
    let mut run = Run::new(Rc::new(plan));
    let (phases, _) = whole_request(&mut run, &[("authorization", "Bearer sk-test-123456")]);
    // Headers: one read, the clock (expiry), the credential removed.
    assert_eq!(phases[0], 3);
    assert_eq!(run.host.request_header("authorization"), None);
    assert_eq!(run.summary()["api_key"], "team");
}

#[test]
fn client_routing_headers_are_removed_before_anything_else() {
    let mut run = Run::new(plan(json!({})));
    run.request(
        "GET",
        "/v1/nowhere",
        &[
            ("x-jairouter-cluster", "evil"),
            ("x-envoy-original-dst-host", "10.0.0.1:80"),
        ],
        b"",
    );
    run.send();
    assert_eq!(run.host.request_header("x-jairouter-cluster"), None);
    assert_eq!(run.host.request_header("x-envoy-original-dst-host"), None);
    let replies = run.host.replies.borrow();
    assert_eq!(replies.first().map(|r| r.0), Some(404));
}

#[test]
fn a_local_reply_is_logged_and_counted() {
    let mut run = Run::new(plan(json!({})));
    run.request("POST", "/v1/chat/completions", &[], br#"{"model":"nope"}"#);
    assert_eq!(run.send(), Flow::Pause);
    let reply = run.host.replies.borrow().first().cloned();
    assert_eq!(reply.map(|r| r.0), Some(404));
    run.log();
    assert_eq!(run.summary()["status"], 404);
    assert_eq!(run.summary()["service"], "chat");
    let counters = run.counters();
    assert_eq!(
        counters
            .get("jairouter_requests_total.service=chat;.method=POST;.model=unknown;.status=4xx;"),
        Some(&1),
        "{counters:?}"
    );
}

#[test]
fn the_log_summary_names_what_served_and_what_it_used() {
    let mut run = Run::new(plan(json!({})));
    whole_request(&mut run, &[]);
    let summary = run.summary();
    assert_eq!(summary["service"], "chat");
    assert_eq!(summary["model"], "llama");
    assert_eq!(summary["instance"], "chat-0");
    assert_eq!(summary["status"], 200);
    assert_eq!(summary["prompt_tokens"], 9);
    assert!(summary.get("api_key").is_none());
}

#[test]
fn metrics_count_the_request_its_backend_call_and_its_tokens() {
    let mut run = Run::new(plan(json!({})));
    whole_request(&mut run, &[]);
    let counters = run.counters();
    let get = |name: &str| counters.get(name).copied();
    assert_eq!(
        get("jairouter_requests_total.service=chat;.method=POST;.model=llama;.status=2xx;"),
        Some(1)
    );
    assert_eq!(
        get("jairouter_backend_calls_total.service=chat;.instance=chat-0;.status=2xx;"),
        Some(1)
    );
    assert_eq!(
        get("jairouter_tokens_total.service=chat;.model=llama;.kind=prompt;"),
        Some(9)
    );
    assert_eq!(
        get("jairouter_tokens_total.service=chat;.model=llama;.kind=completion;"),
        Some(3)
    );
    assert_eq!(
        get("jairouter_loadbalancer_selections_total.service=chat;.strategy=round_robin;.instance=chat-0;"),
        Some(1),
        "{counters:?}"
    );
    assert_eq!(
        get("jairouter_circuit_breaker_events_total.service=chat;.instance=chat-0;.event=success;"),
        Some(1)
    );
}

#[test]
fn five_server_errors_open_the_breaker_and_a_client_error_does_not_count() {
    let mut run = Run::new(plan(json!({"circuit-breaker": {"failure-threshold": 5}})));
    let mut failed = 0;
    for round in 0..12 {
        run.next_request();
        run.host.now.set(1_000_000_000 + round);
        run.request("POST", "/v1/chat/completions", &[], CHAT);
        run.send();
        if run.exchange.instance() == Some("chat-0") {
            // A client error first: neither success nor failure.
            let status = if round == 0 { 404 } else { 503 };
            failed += usize::from(status == 503);
            run.respond(status, &[("content-type", "application/json")], &[b"{}"]);
        } else {
            let answer = ok_json();
            run.respond(200, &[("content-type", "application/json")], &[&answer]);
        }
        run.log();
        if run.breaker(0).state == State::Open {
            break;
        }
    }
    assert_eq!(
        run.breaker(0).state,
        State::Open,
        "chat-0 failed 5 times in a row"
    );
    assert_eq!(failed, 5);
    assert_eq!(run.breaker(1).state, State::Closed);
}

#[test]
fn an_answer_after_a_retry_counts_against_the_chosen_instance() {
    let mut run = Run::new(plan(json!({})));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    let answer = ok_json();
    run.respond(
        200,
        &[
            ("content-type", "application/json"),
            ("x-envoy-attempt-count", "2"),
        ],
        &[&answer],
    );
    assert_eq!(run.breaker(0).failures, 1);
}

#[test]
fn a_429_with_retry_after_pauses_its_instance() {
    let mut run = Run::new(plan(json!({})));
    run.host
        .properties
        .borrow_mut()
        .insert("response.code_details".into(), b"via_upstream".to_vec());
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    run.respond(
        429,
        &[("content-type", "application/json"), ("retry-after", "30")],
        &[b"{}"],
    );
    let paused_until = run.breaker(0).cooldown_until_ns;
    assert_eq!(paused_until, 1_000_000_000 + 30_000_000_000);
    // Envoy's own 429 (the global rate limit's) pauses nothing.
    let mut envoys = Run::new(plan(json!({})));
    envoys.request("POST", "/v1/chat/completions", &[], CHAT);
    envoys.send();
    envoys.respond(429, &[("retry-after", "30")], &[b"{}"]);
    assert_eq!(envoys.breaker(0).cooldown_until_ns, 0);
}

#[test]
fn a_stream_broken_midway_is_the_instances_failure_unless_the_client_left() {
    for (details, failures) in [
        ("upstream_reset_after_response_started", 1),
        ("downstream_remote_disconnect", 0),
    ] {
        let mut run = Run::new(plan(json!({})));
        run.host
            .properties
            .borrow_mut()
            .insert("response.code_details".into(), details.as_bytes().to_vec());
        run.request("POST", "/v1/chat/completions", &[], CHAT);
        run.send();
        *run.host.response_headers.borrow_mut() = vec![
            (":status".into(), "200".into()),
            ("content-type".into(), "text/event-stream".into()),
        ];
        run.exchange.on_response_headers(&run.host, false);
        run.log();
        assert_eq!(run.breaker(0).failures, failures, "{details}");
    }
}

#[test]
fn a_fallback_rewrites_the_model_and_the_length() {
    let mut run = Run::new(plan(json!({
        "fallback": {"models": {"gone": ["llama"]}},
        "services": {"chat": {"instances": [
            {"name": "llama", "base-url": "http://a:1"},
            {"name": "gone", "base-url": "http://g:1", "status": "down"}
        ]}}
    })));
    let body = br#"{"model":"gone","messages":[]}"#;
    run.request("POST", "/v1/chat/completions", &[], body);
    assert_eq!(run.send(), Flow::Continue);
    let rewritten = run.host.request_body.borrow().clone();
    assert_eq!(rewritten, br#"{"model":"llama","messages":[]}"#.to_vec());
    assert_eq!(
        run.host.request_header("content-length"),
        Some(rewritten.len().to_string())
    );
    let answer = ok_json();
    run.respond(200, &[("content-type", "application/json")], &[&answer]);
    assert_eq!(
        run.host.response_header("x-jairouter-model").as_deref(),
        Some("llama")
    );
    assert_eq!(run.summary()["fallback_for"], "gone");
}

#[test]
fn rewrite_model_refuses_a_span_outside_the_body() {
    assert!(rewrite_model(b"{}", (5, 9), "m").is_err());
    assert!(rewrite_model(b"{\"model\":\"a\"}", (9, 8), "m").is_err());
    assert_eq!(
        rewrite_model(br#"{"model":"a"}"#, (9, 12), "b\"c").ok(),
        Some(br#"{"model":"b\"c"}"#.to_vec())
    );
}

#[test]
fn least_connections_gives_its_count_back_exactly_once() {
    let mut run = Run::new(plan(json!({"load-balance": {"type": "least-connections"}})));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    let in_flight = |run: &Run| -> Vec<u64> {
        let plan = &run.exchange.plan;
        let count = |i: &crate::plan::Instance| {
            crate::balance::load::in_flight(&run.host.store, &i.in_flight_key)
        };
        plan.instances().map(count).collect()
    };
    assert_eq!(in_flight(&run).iter().sum::<u64>(), 1);
    run.log();
    run.exchange.on_drop(&run.host);
    assert_eq!(
        in_flight(&run),
        [0, 0],
        "given back once, by on_log; the drop adds nothing"
    );
}

#[test]
fn the_benchmarks_demo_shape_is_counted_too() {
    // `./build.sh bench`'s `jairouter`: a request limit, a token budget, and an API key with
    // request and token quotas, on top of the round-robin chat request.
    let hash = crate::auth::hash_key(b"0123456789abcdef", "sk-bench-123456");
    let never = json!({"enabled": true, "capacity": 1_000_000_000u64, "rate": 1_000_000_000u64,
                       "scope": "model"});
    let document = json!({
        "model": {
            "rate-limit": never,
            "token-limit": {"tokens-per-minute": 1_000_000_000_000u64, "scope": "model"},
            "services": {"chat": {"instances": [
                {"name": "llama", "base-url": "http://a:1", "path": "/v1/chat/completions"},
                {"name": "llama", "base-url": "http://b:1", "path": "/v1/chat/completions"}
            ]}}
        },
        "jairouter": {"security": {"api-key": {"keys": [{
            "key-id": "bench", "key-hash": hash, "permissions": ["admin"],
            "rate-limit-per-minute": 1_000_000_000_000u64,
            "tokens-per-minute": 1_000_000_000_000u64
        }]}}}
    });
    let plan = Plan::from_value(&document).unwrap_or_else(|e| panic!("{e}"));
    let mut run = Run::new(Rc::new(plan));
    let (phases, total) = whole_request(&mut run, &[("authorization", "Bearer sk-bench-123456")]);
    // Headers: read, clock, credential removed. Body: read, clock, state, the key's two quotas
    // drawn from one entry and the model's request limit and budget from another (a read and
    // a write each), routing header. Response: head, headers in one call, usage, clock, log
    // summary; the two budgets' refunds are owed (paid with the next draw).
    assert_eq!(phases, [3, 8, 5, 0]);
    assert_eq!(total, 16);
    // Every limit passed is counted, those of one series in one step.
    let counters = run.counters();
    let events = |scope: &str| {
        let name = format!(
            "jairouter_rate_limit_events_total.service=chat;.algorithm=token-bucket;\
             .scope={scope};.result=allowed;"
        );
        counters.get(&name).copied()
    };
    assert_eq!(events("global"), Some(2), "the key's two quotas");
    assert_eq!(
        events("model"),
        Some(2),
        "the model's request limit and budget"
    );
}

// Translated exchanges (adapters) and Anthropic's ingress.

/// One Ollama instance on its native API and one OpenAI instance.
fn adapter_plan() -> Rc<Plan> {
    let config = json!({"services": {"chat": {"instances": [
        {"name": "qwen", "base-url": "http://ollama:11434", "adapter": "ollama"},
        {"name": "gpt", "base-url": "http://vllm:8000"}
    ]}}});
    Rc::new(Plan::from_json(config.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}")))
}

const QWEN: &[u8] =
    br#"{"model":"qwen","max_tokens":7,"messages":[{"role":"user","content":"Hello"}]}"#;
const QWEN_STREAM: &[u8] =
    br#"{"model":"qwen","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;

impl Run {
    /// A response Envoy buffers while the filter holds it: each body callback sees all so far.
    fn respond_buffered(
        &mut self,
        status: u32,
        headers: &[(&str, &str)],
        chunks: &[&[u8]],
    ) -> Flow {
        let mut all = vec![(":status".to_string(), status.to_string())];
        all.extend(headers.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        *self.host.response_headers.borrow_mut() = all;
        let mut flow = self
            .exchange
            .on_response_headers(&self.host, chunks.is_empty());
        let mut buffered = Vec::new();
        for (n, chunk) in chunks.iter().enumerate() {
            buffered.extend_from_slice(chunk);
            *self.host.response_chunk.borrow_mut() = buffered.clone();
            flow =
                self.exchange
                    .on_response_body(&self.host, buffered.len(), n + 1 == chunks.len());
        }
        flow
    }

    /// What the client receives of a streamed answer: every chunk as the filter rewrote it.
    fn respond_streamed(&mut self, headers: &[(&str, &str)], chunks: &[&[u8]]) -> Vec<u8> {
        let mut all = vec![(":status".to_string(), "200".to_string())];
        all.extend(headers.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        *self.host.response_headers.borrow_mut() = all;
        self.exchange.on_response_headers(&self.host, false);
        let mut seen = Vec::new();
        for (n, chunk) in chunks.iter().enumerate() {
            *self.host.response_chunk.borrow_mut() = chunk.to_vec();
            self.exchange
                .on_response_body(&self.host, chunk.len(), n + 1 == chunks.len());
            seen.extend_from_slice(&self.host.response_chunk.borrow());
        }
        seen
    }

    fn response_body_json(&self) -> Value {
        serde_json::from_slice(&self.host.response_chunk.borrow()).unwrap_or_default()
    }
}

#[test]
fn an_ollama_request_is_rewritten_for_api_chat_once_its_body_is_whole() {
    let mut run = Run::new(adapter_plan());
    run.request(
        "POST",
        "/v1/chat/completions",
        &[("accept-encoding", "gzip")],
        QWEN,
    );
    // The model is found in the body's first bytes; the rest is still coming.
    assert_eq!(
        run.exchange.on_request_headers(&run.host, false),
        Flow::Pause
    );
    assert_eq!(
        run.exchange.on_request_body(&run.host, 20, false),
        Flow::Pause
    );
    assert_eq!(
        run.exchange.on_request_body(&run.host, QWEN.len(), true),
        Flow::Continue
    );
    assert_eq!(
        run.host.request_header(":path").as_deref(),
        Some("/api/chat")
    );
    assert_eq!(run.host.request_header("accept-encoding"), None);
    let sent: Value = serde_json::from_slice(&run.host.request_body.borrow()).unwrap();
    assert_eq!(sent["stream"], false);
    assert_eq!(sent["options"]["num_predict"], 7);
    assert_eq!(
        run.host.request_header("content-length"),
        Some(run.host.request_body.borrow().len().to_string())
    );
    // The answer is held whole, then goes out as OpenAI's, with its head rewritten.
    let native = br#"{"model":"qwen","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":"Hi!"},"done":true,"done_reason":"stop","prompt_eval_count":5,"eval_count":2}"#;
    let (a, b) = native.split_at(40);
    let held = run.respond_buffered(
        200,
        &[
            ("content-type", "application/json"),
            ("content-length", "180"),
        ],
        &[a, b],
    );
    assert_eq!(held, Flow::Continue);
    let answer = run.response_body_json();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["content"], "Hi!");
    assert_eq!(answer["usage"]["total_tokens"], 7);
    assert_eq!(
        run.host.response_header("content-length"),
        Some(run.host.response_chunk.borrow().len().to_string())
    );
    assert_eq!(
        run.host.response_header("x-jairouter-instance").as_deref(),
        Some("chat-0")
    );
    run.log();
    assert_eq!(run.summary()["prompt_tokens"], 5);
}

#[test]
fn a_translated_request_costs_its_reads_and_writes_and_no_more() {
    let mut run = Run::new(adapter_plan());
    run.request("POST", "/v1/chat/completions", &[], QWEN);
    run.host.take_calls();
    run.send();
    let native = br#"{"message":{"role":"assistant","content":"Hi!"},"done":true,"done_reason":"stop","prompt_eval_count":5,"eval_count":2}"#;
    run.respond_buffered(200, &[("content-type", "application/json")], &[native]);
    run.log();
    let calls = run.calls();
    // Over the passthrough's: the whole body read and replaced with its length and path; the
    // answer read whole, replaced, its head written in one call.
    assert_eq!(calls.get(&Call::RequestBody), Some(&2));
    assert_eq!(calls.get(&Call::ReplaceRequestBody), Some(&1));
    assert_eq!(calls.get(&Call::ResponseBody), Some(&1));
    assert_eq!(calls.get(&Call::ReplaceResponseBody), Some(&1));
    assert_eq!(calls.get(&Call::ReplaceResponseHeaders), Some(&1));
    assert_eq!(run.host.total_calls(), 0);
    let total: usize = calls.values().sum();
    assert_eq!(total, 15, "{calls:?}");
}

#[test]
fn an_ollama_stream_becomes_openai_chunks_as_it_passes() {
    let mut run = Run::new(adapter_plan());
    // No usage chunk asked: the backend's counts still settle the budgets and the metrics.
    run.request("POST", "/v1/chat/completions", &[], QWEN_STREAM);
    run.send();
    let ndjson = concat!(
        r#"{"message":{"role":"assistant","content":"Hel"},"done":false}"#,
        "\n",
        r#"{"message":{"role":"assistant","content":"lo"},"done":false}"#,
        "\n",
        r#"{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":4,"eval_count":2}"#,
        "\n"
    );
    let pieces: Vec<&[u8]> = ndjson.as_bytes().chunks(17).collect();
    let seen = run.respond_streamed(&[("content-type", "application/x-ndjson")], &pieces);
    let text = String::from_utf8(seen).unwrap();
    assert!(
        text.contains(r#""content":"Hel""#) && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert_eq!(
        run.host.response_header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert!(!text.contains("usage"), "{text}");
    run.log();
    assert_eq!(run.summary()["prompt_tokens"], 4);
    assert_eq!(run.summary()["completion_tokens"], 2);
}

#[test]
fn a_translated_streams_counts_hold_when_the_client_leaves_at_done() {
    // The client reads `[DONE]` and closes before the backend's stream ends: Envoy logs the
    // stream with no end of stream in the response body.
    let mut run = Run::new(adapter_plan());
    run.request("POST", "/v1/chat/completions", &[], QWEN_STREAM);
    run.send();
    *run.host.response_headers.borrow_mut() = vec![
        (":status".to_string(), "200".to_string()),
        (
            "content-type".to_string(),
            "application/x-ndjson".to_string(),
        ),
    ];
    run.exchange.on_response_headers(&run.host, false);
    let ndjson = concat!(
        r#"{"message":{"role":"assistant","content":"Hello"},"done":false}"#,
        "\n",
        r#"{"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":10,"eval_count":5}"#,
        "\n"
    );
    *run.host.response_chunk.borrow_mut() = ndjson.as_bytes().to_vec();
    run.exchange
        .on_response_body(&run.host, ndjson.len(), false);
    assert!(run
        .host
        .response_chunk
        .borrow()
        .ends_with(b"data: [DONE]\n\n"));
    run.log();
    assert_eq!(run.summary()["prompt_tokens"], 10);
    assert_eq!(run.summary()["completion_tokens"], 5);
}

#[test]
fn a_translated_backend_error_keeps_its_status_and_bad_output_is_502_against_the_breaker() {
    let mut run = Run::new(adapter_plan());
    run.request("POST", "/v1/chat/completions", &[], QWEN);
    run.send();
    run.respond_buffered(
        404,
        &[("content-type", "application/json")],
        &[br#"{"error":"model 'qwen' not found"}"#],
    );
    assert_eq!(run.host.response_header(":status").as_deref(), Some("404"));
    assert_eq!(
        run.response_body_json()["error"]["message"],
        "model 'qwen' not found"
    );
    run.log();

    run.next_request();
    run.request("POST", "/v1/chat/completions", &[], QWEN);
    run.send();
    run.respond_buffered(
        200,
        &[("content-type", "text/html")],
        &[b"<html>oops</html>"],
    );
    assert_eq!(run.host.response_header(":status").as_deref(), Some("502"));
    assert_eq!(
        run.response_body_json()["error"]["code"],
        "bad_backend_output"
    );
    run.log();
    assert_eq!(run.breaker(0).failures, 1);
}

#[test]
fn a_body_the_protocol_cannot_carry_is_refused_before_the_instance_sees_it() {
    let mut run = Run::new(adapter_plan());
    run.request(
        "POST",
        "/v1/chat/completions",
        &[],
        br#"{"model":"qwen","messages":"#,
    );
    run.send();
    let replies = run.host.replies.borrow().clone();
    assert_eq!(replies.first().map(|r| r.0), Some(400));
    drop(replies);
    run.log();
    assert_eq!(run.breaker(0).failures, 0);
}

#[test]
fn messages_to_an_openai_backend_are_chat_completions_and_come_back_as_a_message() {
    let mut run = Run::new(adapter_plan());
    let body = br#"{"model":"gpt","max_tokens":64,"system":"Be brief.","messages":[{"role":"user","content":"Hi"}]}"#;
    run.request(
        "POST",
        "/v1/messages",
        &[
            ("x-api-key", "sk-client"),
            ("anthropic-version", "2023-06-01"),
        ],
        body,
    );
    run.send();
    assert_eq!(
        run.host.request_header(":path").as_deref(),
        Some("/v1/chat/completions")
    );
    // The client's credential is not the backend's.
    assert_eq!(run.host.request_header("x-api-key"), None);
    let sent: Value = serde_json::from_slice(&run.host.request_body.borrow()).unwrap();
    assert_eq!(sent["messages"][0]["role"], "system");
    run.respond_buffered(200, &[("content-type", "application/json")], &[&ok_json()]);
    let message = run.response_body_json();
    assert_eq!(message["type"], "message");
    assert_eq!(message["content"][0]["text"], "Hi there");
    assert_eq!(message["usage"]["input_tokens"], 9);
    run.log();
    assert_eq!(run.summary()["completion_tokens"], 3);
}

#[test]
fn the_gateways_own_errors_on_messages_are_anthropic_shaped_and_count_tokens_is_answered_here() {
    let mut run = Run::new(adapter_plan());
    run.request(
        "POST",
        "/v1/messages",
        &[],
        br#"{"model":"nope","max_tokens":5,"messages":[]}"#,
    );
    run.send();
    let (status, _, body) = run.host.replies.borrow().first().cloned().unwrap();
    assert_eq!(status, 404);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "not_found_error");

    run.next_request();
    let count =
        br#"{"model":"gpt","messages":[{"role":"user","content":"How many tokens is this?"}]}"#;
    run.request("POST", "/v1/messages/count_tokens", &[], count);
    run.send();
    let (status, _, body) = run.host.replies.borrow().first().cloned().unwrap();
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["input_tokens"].as_u64().unwrap() > 0, "{body}");
}

// Per-model and GenAI metrics.

#[test]
fn request_metrics_name_only_configured_models() {
    let mut run = Run::new(plan(json!({
        "rate-limit": {"enabled": true, "capacity": 1, "rate": 1, "scope": "model"}
    })));
    whole_request(&mut run, &[]);
    // Refused for its model: counted under it.
    run.next_request();
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    assert_eq!(run.host.replies.borrow().first().map(|r| r.0), Some(429));
    run.log();
    // A model no configuration names, and no model at all: `unknown`.
    for body in [&br#"{"model":"made-up"}"#[..], br#"{"messages":[]}"#] {
        run.next_request();
        run.request("POST", "/v1/chat/completions", &[], body);
        run.send();
        run.log();
    }
    let counters = run.counters();
    let requests = |service: &str, model: &str, status: &str| {
        let name = format!(
            "jairouter_requests_total.service={service};.method=POST;.model={model};.status={status};"
        );
        counters.get(&name).copied()
    };
    assert_eq!(requests("chat", "llama", "2xx"), Some(1));
    assert_eq!(requests("chat", "llama", "4xx"), Some(1));
    assert_eq!(requests("chat", "unknown", "4xx"), Some(1), "{counters:?}");
    // Without a model the service is not known either.
    assert_eq!(requests("none", "unknown", "4xx"), Some(1));
    assert!(counters.keys().all(|k| !k.contains("made-up")));
    let duration = "jairouter_request_duration_seconds_count.service=chat;.method=POST;";
    assert_eq!(counters.get(&format!("{duration}.model=llama;")), Some(&2));
    assert_eq!(
        counters.get(&format!("{duration}.model=unknown;")),
        Some(&1)
    );
    // Only the served request was a GenAI operation.
    let genai = "gen_ai.server.request.duration_count.gen_ai_request_model=llama;\
                 .gen_ai_operation_name=chat;.gen_ai_provider_name=openai;";
    assert_eq!(counters.get(genai), Some(&1), "{counters:?}");
    let counted: u64 = counters
        .iter()
        .filter(|(k, _)| k.starts_with("gen_ai.server.request.duration_count"))
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(counted, 1);
}

#[test]
fn genai_series_carry_the_endpoints_operation_and_the_instances_provider() {
    let mut run = Run::new(adapter_plan());
    // Chat to Ollama's native API (translated), then Anthropic's Messages API to an OpenAI one.
    run.request("POST", "/v1/chat/completions", &[], QWEN);
    run.send();
    let native = br#"{"message":{"role":"assistant","content":"Hi!"},"done":true,"done_reason":"stop","prompt_eval_count":5,"eval_count":2}"#;
    run.respond_buffered(200, &[("content-type", "application/json")], &[native]);
    run.log();
    run.next_request();
    let body = br#"{"model":"gpt","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}"#;
    run.request("POST", "/v1/messages", &[], body);
    run.send();
    run.respond_buffered(200, &[("content-type", "application/json")], &[&ok_json()]);
    run.log();
    let counters = run.counters();
    let usage = |model: &str, provider: &str, token_type: &str| {
        let name = format!(
            "gen_ai.client.token.usage_sum.gen_ai_request_model={model};.gen_ai_operation_name=chat;\
             .gen_ai_provider_name={provider};.gen_ai_token_type={token_type};"
        );
        counters.get(&name).copied()
    };
    assert_eq!(usage("qwen", "ollama", "input"), Some(5), "{counters:?}");
    assert_eq!(usage("qwen", "ollama", "output"), Some(2));
    assert_eq!(usage("gpt", "openai", "input"), Some(9));
    assert_eq!(usage("gpt", "openai", "output"), Some(3));
}

#[test]
fn each_endpoint_has_its_genai_operation_and_each_protocol_its_provider() {
    use crate::config::Protocol;
    let operations: Vec<&str> = [
        Endpoint::ChatCompletions,
        Endpoint::Messages,
        Endpoint::Responses,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ]
    .into_iter()
    .map(Endpoint::gen_ai_operation)
    .collect();
    assert_eq!(
        operations,
        ["chat", "chat", "chat", "text_completion", "embeddings"]
    );
    let providers: Vec<&str> = [
        Protocol::OpenAi,
        Protocol::Anthropic,
        Protocol::Gemini,
        Protocol::Ollama,
    ]
    .into_iter()
    .map(Protocol::gen_ai_provider)
    .collect();
    assert_eq!(providers, ["openai", "anthropic", "gcp.gemini", "ollama"]);
}

/// Limits across replicas: the demo's shape with a service rate limit (and `extra` merged in),
/// shared through the rate-limit service.
fn shared_plan(extra: Value) -> Rc<Plan> {
    let mut config = json!({
        "rate-limit": {"enabled": true, "algorithm": "token-bucket", "capacity": 5, "rate": 5},
        "gateway": {"global-rate-limit": {"address": "127.0.0.1:8081"}}
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            config.insert(key.clone(), value.clone());
        }
    }
    plan(config)
}

fn shared_answer(statuses: &[(bool, u32, u64)]) -> Vec<u8> {
    use crate::limit::rls::{encode_answer, Answer, Status};
    encode_answer(&Answer {
        over_limit: statuses.iter().any(|s| s.0),
        statuses: statuses
            .iter()
            .map(|&(over_limit, remaining, reset_ns)| Status {
                over_limit,
                remaining,
                reset_ns,
            })
            .collect(),
    })
}

/// The service's answer to the call the request is waiting for.
fn answer_check(run: &mut Run, status: u32, message: &[u8]) {
    *run.host.grpc_answer.borrow_mut() = message.to_vec();
    let token = run.host.grpc_calls.borrow().len() as u32;
    run.exchange
        .on_grpc_answer(&run.host, token, status, message.len());
}

#[test]
fn with_limits_across_replicas_the_request_waits_for_the_service_then_goes_on() {
    let mut local = Run::new(plan(
        json!({"rate-limit": {"enabled": true, "algorithm": "token-bucket", "capacity": 5, "rate": 5}}),
    ));
    let (_, local_total) = whole_request(&mut local, &[]);
    let mut run = Run::new(shared_plan(json!({})));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.host.take_calls();
    assert_eq!(run.send(), Flow::Pause, "held for the service");
    assert_eq!(
        run.host.request_header(crate::contract::ROUTING_HEADER),
        None
    );
    let calls = run.host.grpc_calls.borrow().clone();
    assert_eq!(calls.len(), 1);
    let (cluster, service, method, message) = &calls[0];
    assert_eq!(cluster, "jairouter-ratelimit");
    assert_eq!(service, "envoy.service.ratelimit.v3.RateLimitService");
    assert_eq!(method, "ShouldRateLimit");
    let text = String::from_utf8_lossy(message);
    assert!(
        text.contains("jairouter") && text.contains("model.rate-limit") && text.contains("chat")
    );
    answer_check(&mut run, 0, &shared_answer(&[(false, 41, 200_000_000)]));
    assert_eq!(run.host.resumed.get(), 1);
    assert_eq!(
        run.host
            .request_header(crate::contract::ROUTING_HEADER)
            .as_deref(),
        Some("jairouter-chat-0")
    );
    let answer = ok_json();
    run.respond(200, &[("content-type", "application/json")], &[&answer]);
    run.log();
    // The shared bucket's state, not this replica's, tells the client what is left.
    assert_eq!(
        run.host
            .response_header("x-ratelimit-remaining-requests")
            .as_deref(),
        Some("41")
    );
    let calls = run.calls();
    let total: usize = calls.values().sum();
    // The local request's twelve, and the call out, its answer read, the clock of the
    // answer's callback (the routing time), the resume.
    assert_eq!(local_total, 12);
    assert_eq!(calls.get(&Call::DispatchGrpc), Some(&1));
    assert_eq!(calls.get(&Call::GrpcAnswer), Some(&1));
    assert_eq!(calls.get(&Call::ResumeRequest), Some(&1));
    assert_eq!(calls.get(&Call::Clock), Some(&3));
    assert_eq!(total, local_total + 4, "{calls:?}");
    assert_eq!(
        run.counters()
            .get("jairouter_global_rate_limit_calls_total.call=check;.outcome=ok;"),
        Some(&1)
    );
}

#[test]
fn a_refusal_across_replicas_is_the_local_429_and_gives_the_local_admission_back() {
    let mut run = Run::new(shared_plan(json!({})));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    answer_check(&mut run, 0, &shared_answer(&[(true, 0, 2_500_000_000)]));
    let replies = run.host.replies.borrow().clone();
    assert_eq!(replies.len(), 1);
    let (status, headers, body) = &replies[0];
    assert_eq!(*status, 429);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("retry-after").as_deref(), Some("3"));
    assert_eq!(
        header("x-ratelimit-remaining-requests").as_deref(),
        Some("0")
    );
    assert_eq!(
        header("x-jairouter-limit").as_deref(),
        Some("model.rate-limit")
    );
    assert!(body.contains("rate_limit_exceeded"), "{body}");
    assert_eq!(run.host.resumed.get(), 0);
    // This replica's bucket is full again: five more go through locally.
    let levels = run
        .exchange
        .plan
        .limits
        .levels(&run.host.store, 1_000_000_000);
    assert_eq!(levels[0].available, 5, "{levels:?}");
}

/// The token budget's reservation is held apart from the request limits' admissions (with the
/// usage that settles it); a refusal across replicas gives both back.
#[test]
fn a_refusal_across_replicas_gives_the_token_reservation_back_too() {
    let mut run = Run::new(shared_plan(
        json!({"token-limit": {"tokens-per-minute": 100_000, "scope": "model"}}),
    ));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    assert_eq!(run.send(), Flow::Pause, "held for the service");
    let levels = |run: &Run| {
        run.exchange
            .plan
            .limits
            .levels(&run.host.store, 1_000_000_000)
    };
    let held = levels(&run);
    assert!(
        held.iter().all(|l| l.available < l.capacity),
        "both drawn from while the request waits: {held:?}"
    );
    answer_check(&mut run, 0, &shared_answer(&[(true, 0, 2_500_000_000)]));
    assert_eq!(run.host.replies.borrow().len(), 1, "refused");
    let after = levels(&run);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after.iter().all(|l| l.available == l.capacity),
        "both given back: {after:?}"
    );
}

#[test]
fn an_unreachable_service_fails_open_under_the_local_limits_or_closed_when_told() {
    let mut run = Run::new(shared_plan(json!({})));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    answer_check(&mut run, 14, b"");
    assert_eq!(run.host.resumed.get(), 1, "let through");
    assert!(run
        .host
        .request_header(crate::contract::ROUTING_HEADER)
        .is_some());
    assert_eq!(
        run.counters()
            .get("jairouter_global_rate_limit_calls_total.call=check;.outcome=unavailable;"),
        Some(&1)
    );
    // Envoy refusing the call (no such cluster) is the same.
    run.next_request();
    run.host.grpc_refused.set(true);
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    assert_eq!(run.send(), Flow::Continue);
    assert_eq!(
        run.counters()
            .get("jairouter_global_rate_limit_calls_total.call=check;.outcome=unavailable;"),
        Some(&1),
        "counted as the service being unavailable"
    );

    let mut run = Run::new(shared_plan(json!({
        "gateway": {"global-rate-limit": {"address": "127.0.0.1:8081", "failure-mode-deny": true}}
    })));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    answer_check(&mut run, 4, b"");
    let replies = run.host.replies.borrow().clone();
    let (status, headers, body) = &replies[0];
    assert_eq!(*status, 503);
    assert!(body.contains("rate_limit_service_unavailable"), "{body}");
    assert!(headers.iter().any(|(n, v)| n == "retry-after" && v == "1"));
    let levels = run
        .exchange
        .plan
        .limits
        .levels(&run.host.store, 1_000_000_000);
    assert_eq!(levels[0].available, 5, "given back: {levels:?}");
}

#[test]
fn a_malformed_answer_or_one_for_another_call_is_not_believed() {
    let mut run = Run::new(shared_plan(json!({})));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    // Another token: not this request's call.
    run.exchange.on_grpc_answer(&run.host, 99, 0, 0);
    assert_eq!(run.host.resumed.get(), 0);
    answer_check(&mut run, 0, b"\x12\x09");
    assert_eq!(
        run.host.resumed.get(),
        1,
        "unreadable: the failure mode (open)"
    );
}

#[test]
fn shared_token_budgets_reserve_the_estimate_and_settle_what_was_used() {
    let mut run = Run::new(shared_plan(json!({
        "rate-limit": {"enabled": false},
        "token-limit": {"enabled": true, "tokens-per-minute": 6000}
    })));
    let body =
        br#"{"model":"llama","max_tokens":100,"messages":[{"role":"user","content":"Hello"}]}"#;
    run.request("POST", "/v1/chat/completions", &[], body);
    run.send();
    let message = run.host.grpc_calls.borrow()[0].3.clone();
    assert!(String::from_utf8_lossy(&message).contains("model.token-limit"));
    answer_check(&mut run, 0, &shared_answer(&[(false, 5000, 1_000_000_000)]));
    assert_eq!(run.host.resumed.get(), 1);
    let answer = ok_json();
    run.respond(200, &[("content-type", "application/json")], &[&answer]);
    run.log();
    assert_eq!(
        run.host
            .response_header("x-ratelimit-remaining-tokens")
            .as_deref(),
        Some("5000")
    );
    let reserved = (body.len() as u64).div_ceil(4) + 100;
    let settled = run.worker.link.borrow_mut().take(10);
    assert_eq!(settled.len(), 1);
    assert_eq!(settled[0].descriptor.hits, reserved);
    // The answer's usage: 9 + 3 tokens.
    assert_eq!(settled[0].delta, 12 - reserved as i64);
}

#[test]
fn a_client_gone_while_its_request_waited_gives_its_admission_back() {
    let mut run = Run::new(shared_plan(json!({})));
    run.request("POST", "/v1/chat/completions", &[], CHAT);
    run.send();
    run.log();
    let levels = run
        .exchange
        .plan
        .limits
        .levels(&run.host.store, 1_000_000_000);
    assert_eq!(levels[0].available, 5, "{levels:?}");
    // Its answer, should it still come, finds nothing waiting.
    answer_check(&mut run, 0, &shared_answer(&[(false, 1, 0)]));
    assert_eq!(run.host.resumed.get(), 0);
}

#[test]
fn without_global_limits_nothing_is_asked() {
    let mut run = Run::new(plan(json!({
        "rate-limit": {"enabled": true, "algorithm": "token-bucket", "capacity": 5, "rate": 5}
    })));
    whole_request(&mut run, &[]);
    assert!(run.host.grpc_calls.borrow().is_empty());
}

// OpenAI's Responses API: translated to chat completions, or passed to an instance that serves it.

fn responses_plan(extra: Value) -> Rc<Plan> {
    let mut config = json!({"services": {"chat": {"instances": [
        {"name": "gpt", "base-url": "http://vllm:8000"},
        {"name": "gpt-native", "base-url": "http://openai:1", "responses": "native"},
        {"name": "claude-x", "base-url": "http://anthropic:1", "adapter": "claude"}
    ]}}});
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    Rc::new(Plan::from_json(config.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}")))
}

const RESPONSES_NATIVE: &[u8] =
    br#"{"model":"gpt-native","input":"Hello","max_output_tokens":16,"store":true}"#;
const RESPONSE_OBJECT: &[u8] = br#"{"id":"resp_b","object":"response","status":"completed","output":[{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Hi"}]}],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":12}}"#;

/// The error a client got from the gateway: its status and OpenAI error object.
fn openai_reply(run: &Run) -> (u32, Value) {
    let (status, _, body) = run
        .host
        .replies
        .borrow()
        .first()
        .cloned()
        .unwrap_or_default();
    let body: Value = serde_json::from_str(&body).unwrap_or_default();
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body.get("type").is_none(), "not Anthropic's shape: {body}");
    (status, body["error"].clone())
}

#[test]
fn a_responses_request_to_an_instance_that_serves_them_passes_untouched_at_a_chat_requests_cost() {
    let mut run = Run::new(responses_plan(json!({})));
    run.request("POST", "/v1/responses", &[], RESPONSES_NATIVE);
    run.host.take_calls();
    assert_eq!(run.send(), Flow::Continue);
    // To the instance's /v1/responses (beside its chat path, the client's own path: not set).
    assert_eq!(
        run.host.request_header(":path").as_deref(),
        Some("/v1/responses")
    );
    assert_eq!(run.host.request_body.borrow().as_slice(), RESPONSES_NATIVE);
    run.respond(
        200,
        &[("content-type", "application/json")],
        &[RESPONSE_OBJECT],
    );
    assert_eq!(run.host.response_chunk.borrow().as_slice(), RESPONSE_OBJECT);
    run.log();
    let calls = run.calls();
    // The passthrough chat request's calls, each kind the same.
    let expected: HashMap<Call, usize> = [
        (Call::RequestHeaders, 1),
        (Call::RequestBody, 1),
        (Call::Clock, 2),
        (Call::SharedGet, 1),
        (Call::SetRequestHeader, 1),
        (Call::ResponseHeaders, 1),
        (Call::SetResponseHeader, 1),
        (Call::ResponseBody, 1),
        (Call::SetProperty, 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(calls, expected);
    // Counted as a chat in the GenAI series, with the usage read from the Response's own keys.
    let counters = run.counters();
    let input = "gen_ai.client.token.usage_sum.gen_ai_request_model=gpt-native;\
                 .gen_ai_operation_name=chat;.gen_ai_provider_name=openai;.gen_ai_token_type=input;";
    assert_eq!(counters.get(input), Some(&9), "{counters:?}");
    let summary = run.summary();
    assert_eq!(
        (
            summary["prompt_tokens"].as_u64(),
            summary["completion_tokens"].as_u64()
        ),
        (Some(9), Some(3))
    );
}

#[test]
fn a_streamed_passthrough_response_settles_from_its_completed_event() {
    let mut run = Run::new(responses_plan(
        json!({"token-limit": {"tokens-per-minute": 100000}}),
    ));
    let body = br#"{"model":"gpt-native","input":"Hello","stream":true,"max_output_tokens":40}"#;
    run.request("POST", "/v1/responses", &[], body);
    run.send();
    let events: [&[u8]; 3] = [
        b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_b\",\"usage\":null}}\n\n",
        b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"Hi\"}\n\n",
        b"event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"resp_b\",\"usage\":{\"input_tokens\":7,\"output_tokens\":2,\"total_tokens\":9}}}\n\n",
    ];
    let seen = run.respond_streamed(&[("content-type", "text/event-stream")], &events);
    assert_eq!(seen, events.concat(), "passed as it came");
    run.log();
    let summary = run.summary();
    assert_eq!(
        (
            summary["prompt_tokens"].as_u64(),
            summary["completion_tokens"].as_u64()
        ),
        (Some(7), Some(2))
    );
}

#[test]
fn a_responses_request_to_a_chat_instance_reaches_its_translator() {
    let mut run = Run::new(responses_plan(json!({})));
    // A tool type chat completions cannot carry: refused by the translation (501 until it is
    // written, then 400 naming the type), never sent on.
    let body = br#"{"model":"gpt","input":"Hi","tools":[{"type":"web_search"}]}"#;
    run.request("POST", "/v1/responses", &[], body);
    run.host.take_calls();
    run.send();
    let (status, error) = openai_reply(&run);
    assert!(matches!(status, 400 | 501), "{status} {error}");
    let calls = run.calls();
    assert_eq!(calls.get(&Call::ReplaceRequestBody), None);
    // Over a passthrough's request: the body read whole for its translation, and the reply.
    assert_eq!(calls.get(&Call::RequestBody), Some(&2), "{calls:?}");
    assert_eq!(calls.get(&Call::SendReply), Some(&1), "{calls:?}");
    run.log();
    assert_eq!(run.breaker(0).failures, 0);
}

#[test]
fn a_responses_request_to_another_protocol_is_501_naming_what_it_reaches() {
    let mut run = Run::new(responses_plan(json!({})));
    run.request(
        "POST",
        "/v1/responses",
        &[],
        br#"{"model":"claude-x","input":"Hi"}"#,
    );
    run.send();
    let (status, error) = openai_reply(&run);
    assert_eq!(
        (status, error["code"].as_str()),
        (501, Some("not_supported_by_adapter"))
    );
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("chat-completions and Responses backends only")
            && message.contains("claude-x")
            && message.contains("adapter `claude`"),
        "{message}"
    );
    run.log();
    assert_eq!(run.breaker(2).failures, 0);
}

#[test]
fn the_gateways_own_errors_on_responses_are_openai_shaped() {
    let mut run = Run::new(responses_plan(json!({
        "rate-limit": {"enabled": true, "capacity": 1, "rate": 1, "scope": "model"}
    })));
    run.request(
        "POST",
        "/v1/responses",
        &[],
        br#"{"model":"nope","input":"Hi"}"#,
    );
    run.send();
    let (status, error) = openai_reply(&run);
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("model_not_found"))
    );
    for expected in [200, 429] {
        run.next_request();
        run.request("POST", "/v1/responses", &[], RESPONSES_NATIVE);
        run.send();
        if expected == 200 {
            assert!(run.host.replies.borrow().is_empty());
            continue;
        }
        let (status, error) = openai_reply(&run);
        assert_eq!(
            (status, error["type"].as_str()),
            (429, Some("rate_limit_error"))
        );
        let headers = run
            .host
            .replies
            .borrow()
            .first()
            .map(|r| r.1.clone())
            .unwrap_or_default();
        assert!(
            headers.iter().any(|(n, _)| n == "retry-after"),
            "{headers:?}"
        );
    }
}

/// The host calls of one translated request to the OpenAI instance `gpt`, answered with
/// `chunks` (whole JSON, or a chat stream), from its head to its log.
fn translated_calls(
    path: &str,
    body: &[u8],
    streamed: bool,
    chunks: &[&[u8]],
) -> HashMap<Call, usize> {
    let mut run = Run::new(responses_plan(json!({})));
    run.request("POST", path, &[], body);
    run.host.take_calls();
    run.send();
    assert!(
        run.host.replies.borrow().is_empty(),
        "refused: {:?}",
        run.host.replies.borrow()
    );
    if streamed {
        run.respond_streamed(&[("content-type", "text/event-stream")], chunks);
    } else {
        run.respond_buffered(200, &[("content-type", "application/json")], chunks);
    }
    run.log();
    run.calls()
}

fn chat_stream() -> Vec<Vec<u8>> {
    (0..4)
        .map(|n| format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{n} \"}}}}]}}\n\n").into_bytes())
        .chain([
            b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n".to_vec(),
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4,\"total_tokens\":9}}\n\ndata: [DONE]\n\n".to_vec(),
        ])
        .collect()
}

#[test]
fn a_translated_responses_request_costs_what_a_translated_messages_request_does() {
    let answer = ok_json();
    let messages = translated_calls(
        "/v1/messages",
        br#"{"model":"gpt","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}"#,
        false,
        &[&answer],
    );
    let responses = translated_calls(
        "/v1/responses",
        br#"{"model":"gpt","max_output_tokens":64,"input":"Hi"}"#,
        false,
        &[&answer],
    );
    assert_eq!(responses, messages);
    assert_eq!(responses.values().sum::<usize>(), 15, "{responses:?}");
}

#[test]
fn a_translated_responses_stream_costs_what_a_translated_messages_stream_does() {
    let chunks = chat_stream();
    let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    let messages = translated_calls(
        "/v1/messages",
        br#"{"model":"gpt","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
        true,
        &chunks,
    );
    let responses = translated_calls(
        "/v1/responses",
        br#"{"model":"gpt","max_output_tokens":64,"stream":true,"input":"Hi"}"#,
        true,
        &chunks,
    );
    assert_eq!(responses, messages);
    assert_eq!(
        responses.values().sum::<usize>(),
        MESSAGES_STREAM_CALLS,
        "{responses:?}"
    );
}

/// A translated Messages stream of `chat_stream()`'s six chunks, head to log.
const MESSAGES_STREAM_CALLS: usize = 26;

#[test]
fn translated_messages_pin_the_counts_a_responses_request_must_match() {
    let answer = ok_json();
    let whole = translated_calls(
        "/v1/messages",
        br#"{"model":"gpt","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}"#,
        false,
        &[&answer],
    );
    assert_eq!(whole.values().sum::<usize>(), 15, "{whole:?}");
    let chunks = chat_stream();
    let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    let streamed = translated_calls(
        "/v1/messages",
        br#"{"model":"gpt","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#,
        true,
        &chunks,
    );
    assert_eq!(
        streamed.values().sum::<usize>(),
        MESSAGES_STREAM_CALLS,
        "{streamed:?}"
    );
}
