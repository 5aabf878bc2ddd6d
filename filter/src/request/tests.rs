use super::*;
use crate::encoding::client_ip;
use crate::endpoint::ServiceType;
use crate::store::MemoryStore;
use serde_json::{json, Value};
use std::cell::RefCell;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn config() -> Plan {
    Plan::from_value(&json!({"services": {
        "chat": {"instances": [
            {"name": "llama", "base-url": "http://a:1/ollama", "path": "/v1/chat/completions"},
            {"name": "llama", "base-url": "http://b:1", "status": "down"},
            {"name": "off", "base-url": "http://c:1", "weight": 0}
        ]},
        "stt": {"instances": [{"name": "whisper", "base-url": "http://w:1"}]},
        "embedding": {"instances": [{"name": "bge", "base-url": "http://e:1"}]}
    }}))
    .unwrap()
}

fn head<'a>(method: &'a str, path: &'a str) -> RequestHead<'a> {
    RequestHead {
        method,
        path,
        content_type: Some("application/json"),
        model_header: None,
        end_of_stream: false,
        header: &no_header,
        content_length: None,
    }
}

fn no_header(_: &str) -> Option<String> {
    None
}

fn decide(cfg: &Plan, h: &RequestHead<'_>) -> HeadDecision {
    let store = MemoryStore::default();
    on_request_headers(
        cfg,
        h,
        &RouteInputs {
            store: &store,
            refunds: &RefCell::default(),
            rotations: &RefCell::default(),
            random: 7,
            clock: &move || 1,
            client: None,
            caller: &Caller::Anyone,
        },
    )
}

fn reply(d: HeadDecision) -> LocalReply {
    match d {
        HeadDecision::Reply(r) => r,
        _ => panic!("expected a local reply"),
    }
}

fn error_code(r: &LocalReply) -> String {
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert!(v["error"]["message"].is_string());
    assert!(v["error"]["type"].is_string());
    v["error"]["code"].as_str().unwrap().to_string()
}

/// Feeds a whole body the way the binding does, in small windows.
fn scan_body(cfg: &Plan, path: &str, content_type: &str, body: &[u8]) -> BodyStep {
    let store = MemoryStore::default();
    let host = RouteInputs {
        store: &store,
        refunds: &RefCell::default(),
        rotations: &RefCell::default(),
        random: 7,
        clock: &move || 1,
        client: None,
        caller: &Caller::Anyone,
    };
    let h = RequestHead {
        content_type: Some(content_type),
        ..head("POST", path)
    };
    let HeadDecision::ScanBody(mut scan) = on_request_headers(cfg, &h, &host) else {
        panic!("expected a body scan")
    };
    let mut outcome = ScanOutcome::NeedMore;
    for chunk in body.chunks(7) {
        outcome = scan.feed(chunk);
        if outcome != ScanOutcome::NeedMore {
            break;
        }
    }
    scan.decide(outcome, body.len() as u64, true, cfg, &host)
}

#[test]
fn routes_by_body_model_with_prefix_and_query() {
    let cfg = config();
    match scan_body(
        &cfg,
        "/v1/chat/completions?trace=1",
        "application/json",
        br#"{"messages":[],"model":"llama"}"#,
    ) {
        BodyStep::Route(r) => {
            assert_eq!(r.service, ServiceType::Chat);
            assert_eq!(r.instance, 0);
            assert_eq!(r.path, "/ollama/v1/chat/completions?trace=1");
        }
        _ => panic!("not routed"),
    }
    match scan_body(
        &cfg,
        "/api/v1/completions",
        "application/json",
        br#"{"model":"llama","prompt":"x"}"#,
    ) {
        BodyStep::Route(r) => assert_eq!(r.path, "/ollama/v1/completions"),
        _ => panic!("not routed"),
    }
}

#[test]
fn routes_multipart_by_model_field() {
    let cfg = config();
    let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ--\r\n";
    match scan_body(
        &cfg,
        "/v1/audio/translations",
        "multipart/form-data; boundary=XyZ",
        body,
    ) {
        BodyStep::Route(r) => assert_eq!(r.path, "/v1/audio/translations"),
        _ => panic!("not routed"),
    }
}

#[test]
fn model_header_routes_without_the_body() {
    let cfg = config();
    let h = RequestHead {
        model_header: Some("bge"),
        ..head("POST", "/v1/embeddings")
    };
    match decide(&cfg, &h) {
        HeadDecision::Route(r) => assert_eq!(
            (r.service, r.path.as_str()),
            (ServiceType::Embedding, "/v1/embeddings")
        ),
        _ => panic!("not routed"),
    }
}

#[test]
fn errors_have_status_and_openai_shape() {
    let cfg = config();
    let cases: Vec<(BodyStep, u32, &str)> = vec![
        (
            scan_body(
                &cfg,
                "/v1/chat/completions",
                "application/json",
                b"{\"model\": ",
            ),
            400,
            "invalid_json",
        ),
        (
            scan_body(
                &cfg,
                "/v1/chat/completions",
                "application/json",
                b"not json",
            ),
            400,
            "invalid_json",
        ),
        (
            scan_body(
                &cfg,
                "/v1/chat/completions",
                "application/json",
                b"{\"messages\":[]}",
            ),
            400,
            "missing_model",
        ),
        (
            scan_body(
                &cfg,
                "/v1/chat/completions",
                "application/json",
                b"{\"model\":\"gpt-9\"}",
            ),
            404,
            "model_not_found",
        ),
        (
            scan_body(
                &cfg,
                "/v1/chat/completions",
                "application/json",
                b"{\"model\":\"off\"}",
            ),
            503,
            "no_available_instance",
        ),
        (
            scan_body(
                &cfg,
                "/v1/chat/completions",
                "application/json",
                b"{\"model\":\"bge\"}",
            ),
            404,
            "model_not_found",
        ),
    ];
    for (step, status, code) in cases {
        let BodyStep::Reply(r) = step else {
            panic!("expected a reply for {code}")
        };
        assert_eq!((r.status, error_code(&r).as_str()), (status, code));
    }
    let r = reply(decide(&cfg, &head("POST", "/v1/rerank")));
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (404, "service_not_configured")
    );
    let r = reply(decide(&cfg, &head("POST", "/v1/nope")));
    assert_eq!((r.status, error_code(&r).as_str()), (404, "unknown_url"));
    let r = reply(decide(&cfg, &head("GET", "/v1/chat/completions")));
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (405, "method_not_allowed")
    );
    let r = reply(decide(
        &cfg,
        &RequestHead {
            end_of_stream: true,
            ..head("POST", "/v1/chat/completions")
        },
    ));
    assert_eq!((r.status, error_code(&r).as_str()), (400, "missing_model"));
    let r = reply(decide(
        &cfg,
        &RequestHead {
            content_type: Some("multipart/form-data"),
            ..head("POST", "/v1/audio/transcriptions")
        },
    ));
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (400, "invalid_multipart")
    );
}

#[test]
fn wrong_endpoint_hint() {
    let cfg = config();
    let BodyStep::Reply(r) = scan_body(
        &cfg,
        "/v1/chat/completions",
        "application/json",
        b"{\"model\":\"bge\"}",
    ) else {
        panic!()
    };
    assert!(r.body.contains("/v1/embeddings"), "{}", r.body);
}

#[test]
fn body_over_the_limit_is_413() {
    let mut v = json!({"gateway": {"max-body-bytes": 1024}, "services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}});
    let cfg = Plan::from_value(&v).unwrap();
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
    let HeadDecision::ScanBody(mut scan) =
        on_request_headers(&cfg, &head("POST", "/v1/chat/completions"), &host)
    else {
        panic!()
    };
    let big = format!("{{\"messages\":\"{}\",\"model\":\"m\"}}", "x".repeat(2000));
    let outcome = scan.feed(&big.as_bytes()[..1024]);
    assert_eq!(outcome, ScanOutcome::NeedMore);
    let BodyStep::Reply(r) = scan.decide(outcome, 1500, false, &cfg, &host) else {
        panic!()
    };
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (413, "request_too_large")
    );
    v["gateway"]["max-body-bytes"] = json!(4096);
    let cfg = Plan::from_value(&v).unwrap();
    assert!(matches!(
        scan_body(
            &cfg,
            "/v1/chat/completions",
            "application/json",
            big.as_bytes()
        ),
        BodyStep::Route(_)
    ));
}

#[test]
fn models_endpoints() {
    let cfg = config();
    let r = reply(decide(&cfg, &head("GET", "/v1/models")));
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 4);
    assert!(
        ids.contains(&"whisper")
            && ids.contains(&"llama")
            && ids.contains(&"bge")
            && ids.contains(&"off")
    );
    let r = reply(decide(&cfg, &head("GET", "/api/v1/models/whisper")));
    assert_eq!(r.status, 200);
    assert!(r.body.contains("\"id\":\"whisper\""));
    let r = reply(decide(&cfg, &head("GET", "/v1/models/none")));
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (404, "model_not_found")
    );
    let r = reply(decide(&cfg, &head("POST", "/v1/models")));
    assert_eq!(r.status, 405);
}

#[test]
fn client_ip_drops_the_port() {
    assert_eq!(client_ip("10.1.2.3:5678"), "10.1.2.3");
    assert_eq!(client_ip("[::1]:5678"), "::1");
    assert_eq!(client_ip("fe80::1"), "fe80::1");
    assert_eq!(client_ip("10.1.2.3"), "10.1.2.3");
}

#[test]
fn header_hash_takes_its_key_from_the_header_or_the_body_field() {
    let cfg = Plan::from_value(&json!({
        "load-balance": {"type": "header-hash", "hash-header": "x-session-id", "hash-field": "user"},
        "services": {"chat": {"instances": [
            {"name": "m", "base-url": "http://a:1"}, {"name": "m", "base-url": "http://b:1"},
            {"name": "m", "base-url": "http://c:1"}, {"name": "m", "base-url": "http://d:1"}
        ]}}
    }))
    .unwrap();
    let store = MemoryStore::default();
    let route = |session: Option<&'static str>, body: &str, random: u64| -> usize {
        let header = move |name: &str| {
            (name == "x-session-id")
                .then(|| session.map(str::to_string))
                .flatten()
        };
        let h = RequestHead {
            header: &header,
            ..head("POST", "/v1/chat/completions")
        };
        let host = RouteInputs {
            store: &store,
            refunds: &RefCell::default(),
            rotations: &RefCell::default(),
            random,
            clock: &move || 1,
            client: None,
            caller: &Caller::Anyone,
        };
        let HeadDecision::ScanBody(mut scan) = on_request_headers(&cfg, &h, &host) else {
            panic!()
        };
        let outcome = scan.feed(body.as_bytes());
        match scan.decide(outcome, body.len() as u64, true, &cfg, &host) {
            BodyStep::Route(r) => r.instance,
            _ => panic!("not routed"),
        }
    };
    for session in ["s-1", "s-2", "s-3", "s-4", "s-5"] {
        let by_header: Vec<usize> = (0..8)
            .map(|r| route(Some(session), r#"{"model":"m"}"#, r))
            .collect();
        assert!(
            by_header.iter().all(|i| *i == by_header[0]),
            "{by_header:?}"
        );
        let body = format!(r#"{{"model":"m","user":"{session}"}}"#);
        let by_field: Vec<usize> = (0..8).map(|r| route(None, &body, r)).collect();
        assert!(by_field.iter().all(|i| *i == by_field[0]), "{by_field:?}");
        // The same key, from either place, lands on the same instance.
        assert_eq!(by_header[0], by_field[0]);
    }
}

/// API keys: who calls is settled before anything else; what the key may use, once the service
/// and then the model are known.
#[test]
fn api_keys_authenticate_then_authorize() {
    let hash = |key: &str| crate::auth::hash_key(b"saltsaltsalt", key);
    let cfg = Plan::from_value(&json!({
        "model": {"services": {
            "chat": {"instances": [
                {"name": "llama", "base-url": "http://a:1"},
                {"name": "qwen", "base-url": "http://b:1"}
            ]},
            "embedding": {"instances": [{"name": "bge", "base-url": "http://e:1"}]}
        }},
        "jairouter": {"security": {"api-key": {"keys": [
            {"key-id": "team", "key-hash": hash("sk-team-123456"), "permissions": ["chat"],
             "models": ["llama"]}
        ]}}}
    }))
    .unwrap();
    let now = 1_800_000_000_000_000_000;
    let refused = authenticate(&cfg, None, None, None, now, None).unwrap_err();
    assert_eq!(
        (refused.status, error_code(&refused)),
        (401, "missing_api_key".into())
    );
    let refused =
        authenticate(&cfg, Some("Bearer sk-nope-000000"), None, None, now, None).unwrap_err();
    assert_eq!(error_code(&refused), "invalid_api_key");
    assert!(!refused.body.contains("sk-nope"), "the key is never echoed");
    let caller = authenticate(&cfg, None, Some("sk-team-123456"), None, now, None).unwrap();
    assert_eq!(caller, Caller::Key(0));

    let store = MemoryStore::default();
    let host = RouteInputs {
        store: &store,
        refunds: &RefCell::default(),
        rotations: &RefCell::default(),
        random: 1,
        clock: &move || now,
        client: None,
        caller: &caller,
    };
    let embeddings = head("POST", "/v1/embeddings");
    let r = reply(on_request_headers(&cfg, &embeddings, &host));
    assert_eq!(
        (r.status, error_code(&r)),
        (403, "service_not_permitted".into())
    );
    let facts = RequestFacts::default();
    let endpoint = Endpoint::ChatCompletions;
    assert!(route_model(&cfg, endpoint, "llama", "", &host, &facts).is_ok());
    let r = route_model(&cfg, endpoint, "qwen", "", &host, &facts).unwrap_err();
    assert_eq!(
        (r.status, error_code(&r)),
        (403, "model_not_permitted".into())
    );

    // The model list shows what the key may use, and nothing else.
    let list = reply(on_request_headers(&cfg, &head("GET", "/v1/models"), &host));
    let ids: Vec<String> = serde_json::from_str::<Value>(&list.body).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["llama"]);
    let hidden = reply(on_request_headers(
        &cfg,
        &head("GET", "/v1/models/qwen"),
        &host,
    ));
    assert_eq!(hidden.status, 404);

    // A verified token's claims stand in for a key, whatever the Authorization header held.
    let claims = TokenClaims {
        subject: "alice".into(),
        permissions: vec!["embedding".into()],
        models: None,
    };
    let caller = authenticate(&cfg, Some("Bearer x"), None, None, now, Some(claims)).unwrap();
    assert_eq!(caller.grants(&cfg).map(|g| g.id.as_str()), Some("alice"));
    assert!(caller
        .grants(&cfg)
        .unwrap()
        .permits(ServiceType::Chat, None)
        .is_err());

    // Without a key section nobody is asked.
    let anyone = authenticate(&config(), None, None, None, now, None).unwrap();
    assert_eq!(anyone, Caller::Anyone);
}

#[test]
fn a_model_only_an_incapable_adapter_serves_is_501() {
    let cfg = Plan::from_value(
        &serde_json::json!({"services": {"embedding": {"instances": [
            {"name": "claude-e", "base-url": "http://a:1", "adapter": "claude"}
        ]}}}),
    )
    .unwrap();
    let body = br#"{"model":"claude-e","input":"x"}"#;
    let BodyStep::Reply(r) = scan_body(&cfg, "/v1/embeddings", "application/json", body) else {
        panic!("expected a reply")
    };
    assert_eq!(r.status, 501);
    assert_eq!(error_code(&r), "not_supported_by_adapter");
}

#[test]
fn a_responses_request_is_routed_by_its_model_in_the_chat_service() {
    let cfg = config();
    for path in ["/v1/responses", "/api/v1/responses"] {
        match scan_body(
            &cfg,
            path,
            "application/json",
            br#"{"input":"hi","model":"llama"}"#,
        ) {
            BodyStep::Route(r) => {
                assert_eq!(
                    (r.service, r.endpoint),
                    (ServiceType::Chat, Endpoint::Responses)
                );
                // Beside the instance's chat completions path (a passthrough's target).
                assert_eq!(r.path, "/ollama/v1/responses");
            }
            _ => panic!("not routed"),
        }
    }
    let BodyStep::Reply(unknown) = scan_body(
        &cfg,
        "/v1/responses",
        "application/json",
        br#"{"model":"nope","input":"hi"}"#,
    ) else {
        panic!("an unknown model was routed")
    };
    assert_eq!(
        (unknown.status, error_code(&unknown)),
        (404, "model_not_found".into())
    );
}

#[test]
fn stored_responses_are_a_404_saying_the_gateway_keeps_none() {
    let cfg = config();
    for (method, path) in [
        ("GET", "/v1/responses/resp_abc"),
        ("DELETE", "/api/v1/responses/resp_abc"),
        ("GET", "/v1/responses/resp_abc/input_items?limit=5"),
        ("POST", "/v1/responses/resp_abc/cancel"),
    ] {
        let r = reply(decide(&cfg, &head(method, path)));
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(error_code(&r), "response_not_found");
        assert!(
            r.body.contains("resp_abc") && r.body.contains("stores no responses"),
            "{}",
            r.body
        );
    }
    // The endpoint itself takes only POST.
    let r = reply(decide(&cfg, &head("GET", "/v1/responses")));
    assert_eq!(r.status, 405);
}

#[test]
fn a_token_budget_reserves_a_responses_max_output_tokens() {
    let cfg = Plan::from_value(&json!({
        "token-limit": {"tokens-per-minute": 100000, "completion-estimate": 1000},
        "services": {"chat": {"instances": [{"name": "llama", "base-url": "http://a:1"}]}}
    }))
    .unwrap();
    let reserved = |body: &[u8]| match scan_body(&cfg, "/v1/responses", "application/json", body) {
        BodyStep::Route(r) => r.tokens.map(|t| (t.reserved, t.prompt_estimate)),
        _ => panic!("not routed"),
    };
    // The prompt estimate is the whole body's bytes / 4: `instructions` and `input` count.
    let body = br#"{"model":"llama","instructions":"Be brief.","input":[{"role":"user","content":"Hello there"}],"max_output_tokens":50}"#;
    let prompt = (body.len() as u64).div_ceil(4);
    assert_eq!(reserved(body), Some((prompt + 50, prompt)));
    // Without it, the budget's estimate.
    let body = br#"{"model":"llama","input":"Hello"}"#;
    let prompt = (body.len() as u64).div_ceil(4);
    assert_eq!(reserved(body), Some((prompt + 1000, prompt)));
}
