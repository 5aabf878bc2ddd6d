use super::*;
use crate::breaker::{self, Outcome};
use crate::endpoint::ServiceType;
use crate::store::MemoryStore;
use serde_json::{json, Value};
use std::cell::RefCell;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn error_code(r: &LocalReply) -> String {
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert!(v["error"]["message"].is_string());
    assert!(v["error"]["type"].is_string());
    v["error"]["code"].as_str().unwrap().to_string()
}

fn route_with(cfg: &Plan, store: &MemoryStore, now_ns: u64) -> Result<Routed, LocalReply> {
    let host = RouteInputs {
        store,
        refunds: &RefCell::default(),
        rotations: &RefCell::default(),
        random: 0,
        clock: &move || now_ns,
        client: None,
        caller: &Caller::Anyone,
    };
    route_model(
        cfg,
        Endpoint::ChatCompletions,
        "llama",
        "",
        &host,
        &RequestFacts::default(),
    )
}

#[test]
fn open_breakers_are_passed_over_and_all_open_is_503_with_retry_after() {
    let cfg = Plan::from_value(&json!({
        "load-balance": {"type": "round-robin"},
        "circuit-breaker": {"failure-threshold": 1, "timeout": 10_000},
        "services": {"chat": {"instances": [
            {"name": "llama", "base-url": "http://a:1"},
            {"name": "llama", "base-url": "http://b:1"}
        ]}}
    }))
    .unwrap();
    let store = MemoryStore::default();
    let service = cfg.service(ServiceType::Chat).unwrap();
    let open = |at: usize| {
        let instance = &service.instances[at];
        let policy = instance.breaker.unwrap();
        let admission = breaker::admit(&store, &instance.state_key, Some(&policy), 0);
        breaker::record(
            &store,
            &instance.state_key,
            &policy,
            admission,
            Outcome::Failure,
            0,
        );
    };
    open(0);
    for _ in 0..4 {
        let routed = route_with(&cfg, &store, 1).unwrap();
        assert_eq!(routed.instance, 1);
        assert_eq!(routed.breaker, Some(Admission::Closed { clean: true }));
    }
    open(1);
    let refused = route_with(&cfg, &store, 1).unwrap_err();
    assert_eq!(refused.status, 503);
    assert_eq!(error_code(&refused), "no_available_instance");
    assert!(refused
        .headers
        .iter()
        .any(|(name, value)| *name == "retry-after" && value == "10"));
    // After the timeout, one trial goes through.
    let trial = route_with(&cfg, &store, 10_000_000_001).unwrap();
    assert_eq!(trial.breaker, Some(Admission::Trial));
}

#[test]
fn fallback_models_stand_in_in_order_only_when_the_body_can_be_rewritten() {
    let cfg = Plan::from_value(&json!({
        "fallback": {"models": {"llama": ["gone", "qwen", "mistral"]}},
        "services": {"chat": {"instances": [
            {"name": "llama", "base-url": "http://a:1", "status": "down"},
            {"name": "gone", "base-url": "http://g:1", "status": "down"},
            {"name": "qwen", "base-url": "http://q:1"},
            {"name": "mistral", "base-url": "http://m:1"}
        ]}}
    }))
    .unwrap();
    let store = MemoryStore::default();
    let host = RouteInputs {
        store: &store,
        refunds: &RefCell::default(),
        rotations: &RefCell::default(),
        random: 0,
        clock: &move || 1,
        client: None,
        caller: &Caller::Anyone,
    };
    let route = |rewritable: bool| {
        let facts = RequestFacts {
            model_rewritable: rewritable,
            ..RequestFacts::default()
        };
        route_model(&cfg, Endpoint::ChatCompletions, "llama", "", &host, &facts)
    };
    let routed = route(true).unwrap();
    assert_eq!(routed.model, "qwen");
    assert_eq!(routed.fallback_from.as_deref(), Some("llama"));
    assert_eq!(route(false).unwrap_err().status, 503);
    let own = route_model(
        &cfg,
        Endpoint::ChatCompletions,
        "qwen",
        "",
        &host,
        &RequestFacts::default(),
    )
    .unwrap();
    assert_eq!(own.fallback_from, None);
}
