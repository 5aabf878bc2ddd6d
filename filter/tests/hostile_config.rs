//! Absurd configurations (issue 10): every one is refused with the key's path, or accepted
//! within the documented bounds; none panics or takes long.
#![cfg(not(target_arch = "wasm32"))]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use jairouter_filter::config::MAX_INSTANCES;
use jairouter_filter::plan::Plan;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn chat(instances: Value) -> Value {
    json!({"services": {"chat": {"instances": instances}}})
}

fn refused(value: Value, path: &str) {
    let bytes = serde_json::to_vec(&value).unwrap();
    match Plan::from_json(&bytes) {
        Ok(_) => panic!("accepted: {value}"),
        Err(e) => {
            let shown = format!("{e:?}");
            assert!(shown.contains(path), "{shown} does not name {path}");
        }
    }
}

#[test]
fn absurd_numbers_are_refused_with_their_path() {
    for weight in [
        json!(9_223_372_036_854_775_808u64),
        json!(-1),
        json!(1.5),
        json!("x"),
    ] {
        refused(
            chat(json!([{"name": "m", "base-url": "http://a:1", "weight": weight}])),
            "weight",
        );
    }
    for (key, value) in [
        ("capacity", json!(0)),
        ("capacity", json!(18_446_744_073_709_551_615u64)),
        ("rate", json!(-5)),
        ("rate", json!(0)),
        ("window", json!(0)),
        ("cold-factor", json!(0)),
        ("max-clients", json!(0)),
        ("warm-up-period", json!(1e300)),
    ] {
        let mut limit = json!({"enabled": true});
        limit[key] = value;
        let mut cfg = chat(json!([{"name": "m", "base-url": "http://a:1"}]));
        cfg["rate-limit"] = limit;
        refused(cfg, key);
    }
    let mut cfg = chat(json!([{"name": "m", "base-url": "http://a:1"}]));
    cfg["token-limit"] = json!({"tokens-per-minute": -1});
    refused(cfg, "tokens-per-minute");
    let mut cfg = chat(json!([{"name": "m", "base-url": "http://a:1"}]));
    cfg["gateway"] = json!({"max-body-bytes": 0});
    refused(cfg, "max-body-bytes");
    let mut cfg = chat(json!([{"name": "m", "base-url": "http://a:1"}]));
    cfg["load-balance"] = json!({"type": "ip-hash", "virtual-nodes": 4_294_967_296u64});
    refused(cfg, "virtual-nodes");
}

#[test]
fn an_empty_instance_list_is_handled() {
    let bytes = serde_json::to_vec(&chat(json!([]))).unwrap();
    // Refused or accepted, but never a panic; accepted means no models to route to.
    if let Ok(cfg) = Plan::from_json(&bytes) {
        assert_eq!(cfg.instances().count(), 0);
    }
    // (`instances:` left empty in YAML is null: no instances, as `[]`.)
    for bad in [
        json!({}),
        json!("x"),
        json!([[]]),
        json!([null]),
        json!([{}]),
    ] {
        let bytes = serde_json::to_vec(&chat(bad)).unwrap();
        assert!(Plan::from_json(&bytes).is_err());
    }
}

/// The most instances allowed, with the heaviest balancing set-up (a hash ring with the most
/// virtual nodes over instances of the top weight), compiles in bounded time; one more is refused.
#[test]
fn ten_thousand_instances_compile_and_ten_thousand_and_one_are_refused() {
    let instances = |n: usize| -> Value {
        Value::Array(
            (0..n)
                .map(|i| {
                    json!({"name": format!("m{}", i % 4), "base-url": format!("http://10.0.{}.{}:80", i / 250, i % 250),
                           "weight": 1_000_000 - i})
                })
                .collect(),
        )
    };
    let mut cfg = chat(instances(MAX_INSTANCES));
    cfg["load-balance"] = json!({"type": "consistent-hash", "virtual-nodes": 10000});
    let bytes = serde_json::to_vec(&cfg).unwrap();
    let start = Instant::now();
    let parsed = Plan::from_json(&bytes).unwrap();
    let took = start.elapsed();
    assert_eq!(parsed.instances().count(), MAX_INSTANCES);
    for service in parsed.services() {
        for pool in service.models.values() {
            assert!(pool.rotation.len() <= 4096);
        }
    }
    // Debug builds are slow; the release filter is ~20x faster.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    println!("10,000 instances compiled in {took:?}");

    let mut cfg = chat(instances(MAX_INSTANCES + 1));
    cfg["load-balance"] = json!({"type": "round-robin"});
    refused(cfg, "services");
}

/// Grouping instances into model pools is one pass (it was a search of every name seen so far
/// per instance, then a scan of every instance per model: about 1 s for 10,000 models).
#[test]
fn ten_thousand_distinct_models_compile_in_one_pass() {
    let instances: Vec<Value> = (0..MAX_INSTANCES)
        .map(|i| {
            json!({"name": format!("model-{i}"), "base-url": format!("http://10.0.{}.{}:80", i / 250, i % 250)})
        })
        .collect();
    let mut cfg = chat(Value::Array(instances));
    cfg["fallback"] = json!({"models": {"model-0": ["model-9999"]}});
    let bytes = serde_json::to_vec(&cfg).unwrap();
    let start = Instant::now();
    let plan = Plan::from_json(&bytes).unwrap();
    let took = start.elapsed();
    println!("10,000 distinct models compiled in {took:?}");
    let chat = plan.services().next().unwrap();
    assert_eq!(chat.models.len(), MAX_INSTANCES);
    for (at, instance) in chat.instances.iter().enumerate() {
        let pool = &chat.models[&instance.spec.name];
        assert_eq!(pool.model, instance.spec.name);
        assert_eq!(pool.routable, [at]);
        assert_eq!(pool.rotation, [0]);
    }
    assert_eq!(chat.spec.fallbacks["model-0"], ["model-9999"]);
    let listed: Value = serde_json::from_str(&plan.models_json).unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), MAX_INSTANCES);
}

#[test]
fn arbitrary_json_documents_are_errors_not_panics() {
    for text in [
        "", "null", "[]", "1", "\"model\"", "{\"model\":null}", "{\"model\":{\"services\":[]}}",
        "{\"services\":{\"nope\":{}}}",
        "{\"services\":{\"chat\":{\"instances\":[{\"name\":\"\",\"base-url\":\"\"}]}}}",
        "{\"services\":{\"chat\":{\"instances\":[{\"name\":\"m\",\"base-url\":\"ftp://x\"}]}}}",
        "{\"services\":{\"chat\":{\"instances\":[{\"name\":\"m\",\"base-url\":\"http://[::1\"}]}}}",
        "{\"services\":{\"chat\":{\"instances\":[{\"name\":\"m\",\"base-url\":\"http://a:99999\"}]}}}",
    ] {
        assert!(Plan::from_json(text.as_bytes()).is_err(), "{text}");
    }
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(Plan::from_json(deep.as_bytes()).is_err());
}
