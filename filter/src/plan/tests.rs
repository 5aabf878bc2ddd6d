use super::*;
use crate::config::BaseUrl;
use crate::config::EdgeLimits;
use crate::config::MAX_INSTANCES;
use serde_json::json;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn refused(v: Value) -> String {
    Plan::from_value(&v).unwrap_err().to_string()
}

/// The `model:` section of the seed guide's ConfigMap, as the renderer turns it into JSON.
fn seed_model() -> Value {
    json!({
        "load-balance": {"type": "round-robin"},
        "rate-limit": {"enabled": true, "algorithm": "token-bucket", "capacity": 1000, "rate": 100},
        "services": {"chat": {"instances": [
            {"name": "llama3.2:3b", "base-url": "http://ollama-service:11434",
             "path": "/v1/chat/completions", "weight": 1}
        ]}}
    })
}

#[test]
fn seed_configmap_loads() {
    let cfg = Plan::from_value(&seed_model()).unwrap();
    let chat = cfg.service(ServiceType::Chat).unwrap();
    let i = &chat.instances[0];
    assert_eq!(i.spec.id, "chat-0");
    assert_eq!(i.spec.cluster, "jairouter-chat-0");
    assert_eq!(i.spec.base_url.host, "ollama-service");
    assert_eq!(i.spec.base_url.port, 11434);
    assert_eq!(
        i.upstream_path(Endpoint::ChatCompletions),
        Some("/v1/chat/completions")
    );
    assert_eq!(
        i.upstream_path(Endpoint::Completions),
        Some("/v1/completions")
    );
    assert_eq!(chat.models["llama3.2:3b"].routable, vec![0]);
    let read = Config::from_value(&seed_model()).unwrap();
    assert!(read.rate_limit.as_ref().unwrap().enabled);
}

#[test]
fn wrapped_in_model_key_also_loads() {
    let cfg = Plan::from_value(&json!({"model": seed_model()})).unwrap();
    assert!(cfg.service(ServiceType::Chat).is_some());
}

/// The original's own services.yml: camelCase and kebab-case mixed, adapters, instance ids,
/// empty headers, ip-hash with sha256, a cache fallback.
#[test]
fn original_services_yml_loads() {
    let v = json!({
        "adapter": "gpustack",
        "circuit-breaker": {"enabled": true, "failureThreshold": 5, "timeout": 60000, "successThreshold": 2},
        "fallback": {"enabled": true, "strategy": "default"},
        "services": {
            "chat": {
                "load-balance": {"type": "least-connections"},
                "adapter": "gpustack",
                "rate-limit": {"enabled": true, "algorithm": "token-bucket", "capacity": 100, "rate": 10,
                                "scope": "service", "client-ip-enable": true},
                "instances": [{"name": "qwen2.5:1.5b", "instance-id": "c09eb43b-5084-48bb-8fc8-3e5ab2505c31",
                               "base-url": "http://172.16.30.6:12434", "path": "/v1/chat/completions",
                               "adapter": "ollama", "weight": 1, "headers": {}}]
            },
            "rerank": {
                "load-balance": {"type": "ip-hash", "hash-algorithm": "sha256"},
                "fallback": {"enabled": true, "strategy": "cache", "cache-size": 50, "cache-ttl": 600000},
                "instances": []
            },
            "imgGen": {"instances": [{"name": "sd", "baseUrl": "https://img.example.com/api/", "path": "/v1/images/generations",
                        "headers": {"Authorization": "Bearer x"}, "status": "ACTIVE"}]}
        }
    });
    let cfg = Plan::from_value(&v).unwrap();
    let chat = cfg.service(ServiceType::Chat).unwrap();
    assert_eq!(chat.spec.load_balance.strategy, Strategy::LeastConnections);
    assert_eq!(
        chat.instances[0].spec.cluster,
        "jairouter-c09eb43b-5084-48bb-8fc8-3e5ab2505c31"
    );
    assert_eq!(
        cfg.service(ServiceType::Rerank)
            .unwrap()
            .spec
            .load_balance
            .hash_algorithm,
        "sha256"
    );
    let img = &cfg.service(ServiceType::ImgGen).unwrap().instances[0];
    assert!(img.spec.base_url.tls);
    assert_eq!(img.spec.base_url.port, 443);
    assert_eq!(
        img.upstream_path(Endpoint::ImageGenerations),
        Some("/api/v1/images/generations")
    );
    assert_eq!(
        img.spec.headers,
        vec![("authorization".to_string(), "Bearer x".to_string())]
    );
    assert!(img.spec.active);
    let read = Config::from_value(&v).unwrap();
    assert_eq!(read.circuit_breaker.as_ref().unwrap().failure_threshold, 5);
}

#[test]
fn refusals_name_the_key() {
    let mut v = seed_model();
    v["services"]["chat"]["instances"][0]["weight"] = json!(-2);
    assert_eq!(
        refused(v),
        "model.services.chat.instances[0].weight: must be a whole number from 0 to 1000000 (got -2)"
    );

    let mut v = seed_model();
    v["services"]["chat"]["instances"][0]["base-url"] = json!("ollama:11434");
    assert!(refused(v)
        .starts_with("model.services.chat.instances[0].base-url: must start with http://"));

    let mut v = seed_model();
    v["services"]["chat"]["instances"][0]
        .as_object_mut()
        .unwrap()
        .remove("name");
    assert!(refused(v).starts_with("model.services.chat.instances[0].name: is required"));

    let mut v = seed_model();
    v["load-balance"]["type"] = json!("fastest");
    assert!(refused(v).starts_with("model.load-balance.type: unknown strategy \"fastest\""));

    let mut v = seed_model();
    v["services"]["chatt"] = json!({"instances": []});
    assert!(refused(v).starts_with("model.services.chatt: unknown service type"));

    let mut v = seed_model();
    v["rate-limit"]["algorithm"] = json!("magic");
    assert!(refused(v).starts_with("model.rate-limit.algorithm: unknown algorithm"));

    let mut v = seed_model();
    v["services"]["chat"]["instances"][0]["path"] = json!("v1/chat");
    assert!(refused(v).starts_with("model.services.chat.instances[0].path:"));

    assert!(refused(json!({"services": []})).starts_with("model.services: must be a mapping"));
    assert!(refused(json!([1])).starts_with("model: must be a mapping"));
    assert!(Plan::from_json(b"{not json")
        .unwrap_err()
        .to_string()
        .starts_with("configuration: is not valid JSON"));
}

#[test]
fn duplicate_instance_ids_are_refused() {
    let v = json!({"services": {
        "chat": {"instances": [{"name": "a", "base-url": "http://h:1", "instance-id": "x"}]},
        "embedding": {"instances": [{"name": "b", "base-url": "http://h:1", "instance-id": "x"}]}
    }});
    assert!(refused(v).contains("already used by model.services.chat.instances[0]"));
}

#[test]
fn inactive_and_zero_weight_instances_are_not_routable() {
    let v = json!({"services": {"chat": {"instances": [
        {"name": "m", "base-url": "http://a:1", "weight": 0},
        {"name": "m", "base-url": "http://b:1", "status": "inactive"},
        {"name": "m", "base-url": "http://c:1", "weight": 3},
        {"name": "n", "base-url": "http://c:1", "status": "INACTIVE"}
    ]}}});
    let cfg = Plan::from_value(&v).unwrap();
    let chat = cfg.service(ServiceType::Chat).unwrap();
    assert_eq!(chat.models["m"].routable, vec![2]);
    assert!(chat.models["n"].routable.is_empty());
}

#[test]
fn base_urls() {
    let b = BaseUrl::parse("p", "http://[::1]:8000/prefix/").unwrap();
    assert_eq!(
        (b.host.as_str(), b.port, b.prefix.as_str()),
        ("::1", 8000, "/prefix")
    );
    assert!(b.host_is_ip());
    let b = BaseUrl::parse("p", "https://API.example.com").unwrap();
    assert_eq!(
        (b.host.as_str(), b.port, b.tls),
        ("api.example.com", 443, true)
    );
    assert!(!b.host_is_ip());
    for bad in [
        "ftp://x",
        "http://",
        "http://h:0",
        "http://h:99999",
        "http://u@h",
        "http://h?x=1",
        "http://h h",
    ] {
        assert!(BaseUrl::parse("p", bad).is_err(), "{bad}");
    }
}

#[test]
fn gateway_options() {
    let mut v = seed_model();
    v["gateway"] = json!({"max-body-bytes": 2048, "instance-header": false});
    let cfg = Plan::from_value(&v).unwrap();
    assert_eq!(cfg.spec.gateway.max_body_bytes, 2048);
    assert!(!cfg.spec.gateway.instance_header);
    let mut v = seed_model();
    v["gateway"] = json!({"max-body-bytes": 1});
    assert!(refused(v).starts_with("model.gateway.max-body-bytes:"));
}

#[test]
fn edge_limits() {
    let cfg = Plan::from_value(&seed_model()).unwrap();
    assert_eq!(cfg.spec.gateway.edge, EdgeLimits::DEFAULT);
    let mut v = seed_model();
    v["gateway"] = json!({"instance-header": true});
    assert_eq!(
        Plan::from_value(&v).unwrap().spec.gateway.edge,
        EdgeLimits::DEFAULT
    );

    let mut v = seed_model();
    v["gateway"] = json!({
        "max-connections": 5, "requestHeadersTimeout": "2000", "stream-idle-timeout": 0,
        "idle-timeout": 30000, "max-request-headers-kb": 96, "http2-max-concurrent-streams": 10
    });
    let edge = Plan::from_value(&v).unwrap().spec.gateway.edge;
    assert_eq!(
        edge,
        EdgeLimits {
            max_connections: 5,
            request_headers_timeout_ms: 2000,
            stream_idle_timeout_ms: 0,
            idle_timeout_ms: 30000,
            max_request_headers_kb: 96,
            http2_max_concurrent_streams: 10,
        }
    );

    for (gateway, message) in [
        (
            json!({"max-connections": 0}),
            "model.gateway.max-connections: must be a whole number from 1 to 10000000 (got 0)",
        ),
        (
            json!({"max-connections": -1}),
            "model.gateway.max-connections: must be a whole number",
        ),
        (
            json!({"stream-idle-timeout": 30}),
            "model.gateway.stream-idle-timeout: is in ms: 30 ms would cut every request",
        ),
        (
            json!({"request-headers-timeout": "10s"}),
            "model.gateway.request-headers-timeout: must be a whole number from 0 to 86400000",
        ),
        (
            json!({"idle-timeout": 86_400_001u64}),
            "model.gateway.idle-timeout: must be a whole number",
        ),
        (
            json!({"max-request-headers-kb": 8193}),
            "model.gateway.max-request-headers-kb: must be a whole number from 1 to 8192",
        ),
        (
            json!({"http2-max-concurrent-streams": 0}),
            "model.gateway.http2-max-concurrent-streams: must be a whole number from 1",
        ),
        (
            json!({"max-conections": 5}),
            "model.gateway.max-conections: unknown key",
        ),
    ] {
        let mut v = seed_model();
        v["gateway"] = gateway;
        let got = refused(v);
        assert!(got.starts_with(message), "{got}");
    }
}

#[test]
fn models_list_is_openai_shaped() {
    let cfg = Plan::from_value(&seed_model()).unwrap();
    let list: Value = serde_json::from_str(&cfg.models_json).unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], "llama3.2:3b");
    assert_eq!(list["data"][0]["object"], "model");
}

#[test]
fn too_many_instances_are_refused() {
    let many: Vec<Value> = (0..MAX_INSTANCES + 1)
        .map(|i| json!({"name": "m", "base-url": format!("http://h{i}:1")}))
        .collect();
    let v = json!({"services": {"chat": {"instances": many}}});
    assert!(refused(v).contains("more than 10000 instances"));
}

#[test]
fn limits_are_checked_key_by_key() {
    let chat = json!({"instances": [{"name": "m", "base-url": "http://a:1"}]});
    let cases = [
        (
            json!({"token-limit": {}, "services": {"chat": chat}}),
            "model.token-limit.tokens-per-minute: is required",
        ),
        (
            json!({"token-limit": {"tokens-per-minute": 10, "scope": "instance"}, "services": {"chat": chat}}),
            "model.token-limit.scope: unknown scope \"instance\"",
        ),
        (
            json!({"rate-limit": {"algorithm": "leaky"}, "services": {"chat": chat}}),
            "model.rate-limit.algorithm: unknown algorithm",
        ),
        (
            json!({"rate-limit": {"algorithm": "sliding-window", "rate": 5000, "window": 10}, "services": {"chat": chat}}),
            "model.rate-limit.rate: a sliding window holds at most 10000 requests",
        ),
        (
            json!({"services": {"chat": {"rate-limit": {"scope": "planet"}, "instances": []}}}),
            "model.services.chat.rate-limit.scope: unknown scope",
        ),
    ];
    for (config, message) in cases {
        let err = refused(config);
        assert!(err.starts_with(message), "{err}");
    }
}

#[test]
fn breaker_blocks_inherit_from_the_enclosing_block() {
    let cfg = Plan::from_value(&json!({
        "circuit-breaker": {"failureThreshold": 10, "timeout": 5000},
        "services": {
            "chat": {
                "circuit-breaker": {"success-threshold": 3},
                "instances": [
                    {"name": "a", "base-url": "http://a:1", "circuit-breaker": {"failure-threshold": 1}},
                    {"name": "a", "base-url": "http://b:1", "circuit-breaker": {"enabled": false}},
                    {"name": "a", "base-url": "http://c:1"}
                ]
            },
            "embedding": {"instances": [{"name": "e", "base-url": "http://e:1"}]}
        }
    }))
    .unwrap();
    let chat = cfg.service(ServiceType::Chat).unwrap();
    let own = chat.instances[0].breaker.unwrap();
    assert_eq!(
        (own.failure_threshold, own.success_threshold, own.timeout_ns),
        (1, 3, 5_000_000_000)
    );
    assert_eq!(chat.instances[1].breaker, None);
    let inherited = chat.instances[2].breaker.unwrap();
    assert_eq!(
        (inherited.failure_threshold, inherited.success_threshold),
        (10, 3)
    );
    let embedding = cfg.service(ServiceType::Embedding).unwrap().instances[0]
        .breaker
        .unwrap();
    assert_eq!(
        (embedding.failure_threshold, embedding.success_threshold),
        (10, 2)
    );

    let none = Plan::from_value(&json!({"services": {"chat": {"instances": [
        {"name": "a", "base-url": "http://a:1"}]}}}))
    .unwrap();
    let default = none.service(ServiceType::Chat).unwrap().instances[0]
        .breaker
        .unwrap();
    assert_eq!(
        (
            default.failure_threshold,
            default.timeout_ns,
            default.success_threshold
        ),
        (5, 60_000_000_000, 2)
    );
    let off = Plan::from_value(&json!({"circuit-breaker": {"enabled": false},
        "services": {"chat": {"instances": [{"name": "a", "base-url": "http://a:1"}]}}}))
    .unwrap();
    assert_eq!(
        off.service(ServiceType::Chat).unwrap().instances[0].breaker,
        None
    );
    let bad = Plan::from_value(&json!({"services": {"chat": {"instances": [
        {"name": "a", "base-url": "http://a:1", "circuit-breaker": {"timeout": 0}}]}}}))
    .unwrap_err();
    assert!(
        bad.to_string()
            .contains("model.services.chat.instances[0].circuit-breaker.timeout"),
        "{bad}"
    );
}

/// A reload keeps an instance's shared state (breaker, health, load) while its id and address
/// stay; an edit that puts another backend under a positional id starts it afresh.
#[test]
fn instance_state_keys_follow_id_and_address() {
    let two = |first: &str, second: &str| {
        json!({"services": {"chat": {"instances": [
            {"name": "m", "base-url": first},
            {"name": "m", "base-url": second}
        ]}}})
    };
    let keys = |v: Value| -> Vec<String> {
        let cfg = Plan::from_value(&v).unwrap();
        cfg.instances().map(|i| i.state_key.clone()).collect()
    };
    let before = keys(two("http://a:1", "http://b:1"));
    assert_eq!(before, keys(two("http://a:1", "http://b:1")));
    let weight_changed = json!({"services": {"chat": {"instances": [
        {"name": "m", "base-url": "http://a:1", "weight": 5},
        {"name": "m", "base-url": "http://b:1"}
    ]}}});
    assert_eq!(before, keys(weight_changed));
    // `a` removed: `b` is now chat-0, a new key, and never inherits a's breaker.
    let after = keys(json!({"services": {"chat": {"instances": [
        {"name": "m", "base-url": "http://b:1"}
    ]}}}));
    assert!(!before.contains(&after[0]));
    assert!(after[0].starts_with("jairouter/instance/chat-0/"));
}

/// A reload empties the shared data only of what it dropped or changed.
#[test]
fn stale_keys_are_what_a_reload_dropped() {
    let with_limit = |capacity: u64, second: bool| {
        let mut instances = vec![json!({"name": "m", "base-url": "http://a:1"})];
        if second {
            instances.push(json!({"name": "m", "base-url": "http://b:1"}));
        }
        Plan::from_value(&json!({
            "rate-limit": {"enabled": true, "capacity": capacity, "rate": 1, "scope": "client-ip",
                           "max-clients": 4},
            "services": {"chat": {"instances": instances}}
        }))
        .unwrap()
    };
    let before = with_limit(10, true);
    assert!(with_limit(10, true).stale_keys(&before).is_empty());
    let stale = with_limit(20, false).stale_keys(&before);
    // The per-client table of the old numbers (4 slots) and the removed instance's 3 keys.
    assert_eq!(stale.len(), 4 + 3, "{stale:?}");
    assert!(stale
        .iter()
        .any(|k| k.starts_with("jairouter/instance/chat-1/")));
    assert!(!stale
        .iter()
        .any(|k| k.starts_with("jairouter/instance/chat-0/")));
}

#[test]
fn adapters_resolve_from_instance_service_or_global_and_typos_name_their_key() {
    let cfg = Plan::from_value(&json!({
        "adapter": "vllm",
        "adapter-definitions": {"deepseek": {"type": "openai-compatible",
            "auth": {"api-key": "sk-d"}, "additional-headers": {"x-team": "a"}}},
        "services": {
            "chat": {"adapter": "Claude", "instances": [
                {"name": "claude-x", "base-url": "https://api.anthropic.com",
                 "headers": {"x-api-key": "sk-ant"}},
                {"name": "qwen", "base-url": "http://o:11434", "adapter": "ollama"},
                {"name": "qwen-v1", "base-url": "http://o:11434", "adapter": "ollama",
                 "path": "/v1/chat/completions"},
                {"name": "ds", "base-url": "https://api.deepseek.com", "adapter": "deepseek"}
            ]},
            "embedding": {"instances": [{"name": "e", "base-url": "http://e:1"}]}
        }
    }))
    .unwrap();
    let chat = cfg.service(ServiceType::Chat).unwrap();
    let protocol = |i: usize| chat.instances[i].spec.adapter.protocol;
    assert_eq!(protocol(0), crate::config::Protocol::Anthropic);
    assert_eq!(protocol(1), crate::config::Protocol::Ollama);
    // An Ollama at its OpenAI-compatible path keeps the passthrough.
    assert_eq!(protocol(2), crate::config::Protocol::OpenAi);
    // The adapter's headers come first, the instance's own after.
    assert_eq!(
        chat.instances[0].spec.headers,
        vec![
            ("anthropic-version".to_string(), "2023-06-01".to_string()),
            ("x-api-key".to_string(), "sk-ant".to_string())
        ]
    );
    assert!(chat.instances[3]
        .spec
        .headers
        .contains(&("authorization".to_string(), "Bearer sk-d".to_string())));
    let embedding = cfg.service(ServiceType::Embedding).unwrap();
    assert_eq!(embedding.instances[0].spec.adapter.name, "vllm");

    for (v, key) in [
        (json!({"adapter": "olama", "services": {}}), "model.adapter"),
        (
            json!({"services": {"chat": {"adapter": "x", "instances": []}}}),
            "model.services.chat.adapter",
        ),
        (
            json!({"services": {"chat": {"instances": [
                {"name": "a", "base-url": "http://a:1", "adapter": "nope"}]}}}),
            "model.services.chat.instances[0].adapter",
        ),
    ] {
        let why = refused(v);
        assert!(
            why.contains(key) && why.contains("unknown adapter"),
            "{why}"
        );
    }
}

#[test]
fn an_instance_or_its_adapter_declares_it_serves_responses_itself_and_bad_values_name_their_key() {
    let cfg = Plan::from_value(&json!({
        "adapter-definitions": {
            "openai-native": {"capabilities": {"chat": true, "responses": true}},
            "child": {"type": "extend", "parent": "openai-native"},
            "chat-only": {"type": "extend", "parent": "openai-native",
                          "capabilities": {"chat": true}}
        },
        "services": {"chat": {"instances": [
            {"name": "a", "base-url": "http://a:1"},
            {"name": "b", "base-url": "http://b:1", "responses": "native"},
            {"name": "c", "base-url": "http://c:1", "adapter": "openai-native"},
            {"name": "d", "base-url": "http://d:1", "adapter": "child"},
            {"name": "e", "base-url": "http://e:1", "adapter": "chat-only"},
            {"name": "f", "base-url": "http://f:1", "adapter": "openai-native",
             "responses": "Translated"}
        ]}}
    }))
    .unwrap();
    let chat = cfg.service(ServiceType::Chat).unwrap();
    let native: Vec<bool> = chat
        .instances
        .iter()
        .map(|i| i.spec.adapter.serves_responses)
        .collect();
    // Translated unless declared (most self-hosted backends serve chat completions only).
    assert_eq!(native, [false, true, true, true, false, false]);

    let instance = |extra: Value| {
        let mut i = json!({"name": "a", "base-url": "http://a:1"});
        if let (Some(i), Some(extra)) = (i.as_object_mut(), extra.as_object()) {
            i.extend(extra.clone());
        }
        json!({"services": {"chat": {"instances": [i]}}})
    };
    for (v, key, reason) in [
        (
            instance(json!({"responses": "yes"})),
            "model.services.chat.instances[0].responses",
            "must be native",
        ),
        (
            instance(json!({"responses": true})),
            "model.services.chat.instances[0].responses",
            "string",
        ),
        (
            instance(json!({"responses": "native", "adapter": "claude"})),
            "model.services.chat.instances[0].responses",
            "needs an OpenAI-compatible backend",
        ),
        (
            json!({"adapter-definitions": {"o": {"type": "ollama-compatible",
                    "capabilities": {"chat": true, "responses": true}}}, "services": {}}),
            "model.adapter-definitions.o.capabilities.responses",
            "only an openai-compatible backend",
        ),
        (
            json!({"adapter-definitions": {"o": {"capabilities": {"responses": "yes"}}},
                   "services": {}}),
            "model.adapter-definitions.o.capabilities.responses",
            "",
        ),
    ] {
        let why = refused(v);
        assert!(why.contains(key) && why.contains(reason), "{why}");
    }
}

#[test]
fn an_adapter_that_cannot_serve_the_service_leaves_its_model_to_a_501() {
    let cfg = Plan::from_value(&json!({"services": {"embedding": {"instances": [
        {"name": "claude-e", "base-url": "http://a:1", "adapter": "claude"},
        {"name": "mixed", "base-url": "http://a:1", "adapter": "claude"},
        {"name": "mixed", "base-url": "http://b:1"}
    ]}}}))
    .unwrap();
    let embedding = cfg.service(ServiceType::Embedding).unwrap();
    assert!(!embedding.models.contains_key("claude-e"));
    assert_eq!(
        embedding.unsupported.get("claude-e").map(String::as_str),
        Some("claude")
    );
    // A model with a capable instance is served by it alone.
    assert_eq!(embedding.models["mixed"].routable, vec![2]);
    assert!(!embedding.unsupported.contains_key("mixed"));
}
