use super::keys::salted_sha256;
use super::*;
use crate::encoding::{base64_decode, base64_encode, parse_time};
use serde_json::json;
use serde_json::Value;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const PATH: &str = "jairouter.security.api-key";
/// Python: salt = b"jairouter-test-salt"; key = "sk-test-0123456789abcdef";
/// base64(salt) + ":" + base64(hashlib.sha256(salt + key.encode()).digest())
const PY_KEY: &str = "sk-test-0123456789abcdef";
const PY_HASH: &str = "amFpcm91dGVyLXRlc3Qtc2FsdA==:tKTAAh4diLiavEy1OqGzxYuwuTGpHDWlwtlCaLhyIug=";
/// Same with salt = bytes(range(16)) and key "sk-other".
const PY_HASH_2: &str = "AAECAwQFBgcICQoLDA0ODw==:sa4gYuhJK4q61rnyE//ZA1qX3uRJHYwKS+96Zq5aMLs=";
const SALT: &[u8] = b"sixteen-byte-slt";
const NOW: u64 = 1_800_000_000; // 2027-01-15

fn keys(list: Value) -> ApiKeys {
    ApiKeys::parse(PATH, &json!({ "keys": list })).unwrap()
}

fn refused(section: Value) -> String {
    ApiKeys::parse(PATH, &section).unwrap_err().to_string()
}

fn refused_key(key: Value) -> String {
    refused(json!({ "keys": [key] }))
}

fn key(id: &str, secret: &str, permissions: Value) -> Value {
    json!({"key-id": id, "key-hash": hash_key(SALT, secret), "permissions": permissions})
}

fn failure(keys: &ApiKeys, presented: Option<&str>, client: Option<&str>) -> (u16, &'static str) {
    let e = keys.authenticate(presented, client, NOW).unwrap_err();
    (e.status(), e.code())
}

#[test]
fn python_hash_authenticates() {
    let k = keys(json!([
        {"key-id": "py", "key-hash": PY_HASH, "permissions": ["chat"]},
        {"key-id": "py2", "key-hash": PY_HASH_2, "permissions": "chat"}
    ]));
    assert_eq!(k.authenticate(Some(PY_KEY), None, NOW).unwrap().id, "py");
    assert_eq!(
        k.authenticate(Some("sk-other"), None, NOW).unwrap().id,
        "py2"
    );
    assert_eq!(hash_key(b"jairouter-test-salt", PY_KEY), PY_HASH);
    assert_eq!(
        failure(&k, Some("sk-test-0123456789abcdeF"), None),
        (401, "invalid_api_key")
    );
}

#[test]
fn defaults() {
    let k = ApiKeys::parse(PATH, &json!({})).unwrap();
    assert!(k.enabled());
    assert_eq!(k.header_name(), "x-api-key");
    assert!(k.keys().is_empty());
    assert_eq!(k.credential_headers(), ["authorization", "x-api-key"]);
    // Enabled with no keys: every request is refused.
    assert_eq!(
        failure(&k, Some("anything"), None),
        (401, "invalid_api_key")
    );
    assert!(!ApiKeys::default().enabled());

    let k = ApiKeys::parse(
        PATH,
        &json!({"enabled": false, "headerName": "X-Gateway-Key",
        "default-expiration-days": 365, "cacheExpirationSeconds": 3600,
        "keys": [key("a", "k", json!(["chat"]))]}),
    )
    .unwrap();
    assert!(!k.enabled());
    assert_eq!(k.header_name(), "x-gateway-key");
    assert_eq!(k.credential_headers(), ["authorization", "x-gateway-key"]);
    let a = &k.keys()[0];
    assert!(a.enabled);
    assert_eq!(
        (
            a.rate_limit_per_minute,
            a.daily_request_limit,
            a.tokens_per_minute,
            a.daily_token_limit
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(a.expires_at, None);
    assert!(!k.uses_client_address());
}

#[test]
fn disabled_section_still_validates_keys() {
    let e = refused(json!({"enabled": false, "keys": [{"key-id": "a", "permissions": ["chat"]}]}));
    assert!(
        e.starts_with("jairouter.security.api-key.keys[0].key-hash: is required"),
        "{e}"
    );
}

#[test]
fn presented_key_bearer_first_then_header() {
    let p = presented_key;
    assert_eq!(p(Some("Bearer sk-1"), Some("sk-2")), Some("sk-1"));
    assert_eq!(p(Some("  bearer \t sk-1  "), None), Some("sk-1"));
    assert_eq!(p(Some("BEARER sk-1"), None), Some("sk-1"));
    assert_eq!(p(Some("Basic dXNlcjpwYXNz"), Some(" sk-2 ")), Some("sk-2"));
    assert_eq!(p(Some("Bearer "), Some("sk-2")), Some("sk-2"));
    assert_eq!(p(Some("Bearer"), None), None);
    assert_eq!(p(None, Some("   ")), None);
    assert_eq!(p(None, None), None);
}

#[test]
fn bearer_and_header_both_authenticate() {
    let k = keys(json!([key("a", "sk-alpha", json!(["chat"]))]));
    for (auth, header) in [(Some("Bearer sk-alpha"), None), (None, Some("sk-alpha"))] {
        let presented = presented_key(auth, header);
        assert_eq!(k.authenticate(presented, None, NOW).unwrap().id, "a");
    }
}

#[test]
fn failures_have_their_status_and_code() {
    let k = keys(json!([
        key("good", "sk-good", json!(["chat"])),
        {"key-id": "off", "key-hash": hash_key(SALT, "sk-off"), "permissions": ["chat"], "enabled": false},
        {"key-id": "old", "key-hash": hash_key(SALT, "sk-old"), "permissions": ["chat"],
         "expires-at": "2027-01-01T00:00:00"},
        {"key-id": "new", "key-hash": hash_key(SALT, "sk-new"), "permissions": ["chat"],
         "expires-at": "2027-01-31"},
        {"key-id": "office", "key-hash": hash_key(SALT, "sk-ip"), "permissions": ["chat"],
         "allowed-ip-addresses": ["10.0.0.7", "::1"]}
    ]));
    assert!(k.uses_client_address());
    assert_eq!(failure(&k, None, None), (401, "missing_api_key"));
    assert_eq!(failure(&k, Some("sk-bad"), None), (401, "invalid_api_key"));
    assert_eq!(failure(&k, Some("sk-off"), None), (401, "invalid_api_key"));
    assert_eq!(failure(&k, Some("sk-old"), None), (401, "expired_api_key"));
    assert_eq!(k.authenticate(Some("sk-new"), None, NOW).unwrap().id, "new");
    assert_eq!(
        failure(&k, Some("sk-ip"), Some("10.0.0.8:5000")),
        (403, "ip_not_allowed")
    );
    assert_eq!(failure(&k, Some("sk-ip"), None), (403, "ip_not_allowed"));
    assert_eq!(
        k.authenticate(Some("sk-ip"), Some("10.0.0.7:5000"), NOW)
            .unwrap()
            .id,
        "office"
    );
    assert_eq!(
        k.authenticate(Some("sk-ip"), Some("10.0.0.7"), NOW)
            .unwrap()
            .id,
        "office"
    );
    assert_eq!(
        k.authenticate(Some("sk-ip"), Some("[::1]:80"), NOW)
            .unwrap()
            .id,
        "office"
    );
    assert_eq!(
        k.authenticate(Some("sk-ip"), Some("[::ffff:10.0.0.7]:80"), NOW)
            .unwrap()
            .id,
        "office"
    );
    assert_eq!(
        k.authenticate(Some("sk-good"), None, NOW).unwrap().id,
        "good"
    );

    let e = k.authenticate(Some("sk-off"), None, NOW).unwrap_err();
    assert_eq!(e.error_type(), "authentication_error");
    assert_eq!(e.message(), "API key 'off' is disabled");
    assert_eq!(e.key_id(), Some("off"));
    let e = k.authenticate(Some("sk-bad"), None, NOW).unwrap_err();
    assert!(!e.message().contains("sk-bad"));
    assert_eq!(e.key_id(), None);
    let reply = e.reply();
    assert_eq!(reply.status, 401);
    assert!(reply
        .headers
        .contains(&("www-authenticate", "Bearer".to_string())));
    let body: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "authentication_error");
    let e = k.authenticate(None, None, NOW).unwrap_err();
    assert!(e.message().contains("x-api-key"), "{}", e.message());
    let e = k
        .authenticate(Some("sk-ip"), Some("10.9.9.9"), NOW)
        .unwrap_err();
    assert_eq!(e.error_type(), "permission_error");
    assert!(!e
        .reply()
        .headers
        .iter()
        .any(|(n, _)| *n == "www-authenticate"));
}

#[test]
fn expiry_boundary() {
    let k = keys(
        json!([{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": "chat",
        "expiresAt": "2027-01-31T00:00:00Z"}]),
    );
    assert!(k.authenticate(Some("k"), None, 1_801_353_600).is_ok());
    assert!(k.authenticate(Some("k"), None, 1_801_353_601).is_err());
}

#[test]
fn permissions_by_service_and_model() {
    let k = keys(json!([
        key("chat-only", "sk-c", json!(["chat"])),
        key("root", "sk-r", json!(["admin"])),
        key("multi", "sk-m", json!("Chat, embeddings")),
        {"key-id": "small", "key-hash": hash_key(SALT, "sk-s"), "permissions": ["chat", "rerank"],
         "models": ["qwen2.5:7b", "bge-reranker"]}
    ]));
    let get = |secret| k.authenticate(Some(secret), None, NOW).unwrap();

    let chat = get("sk-c");
    assert!(chat.permits(ServiceType::Chat, Some("any")).is_ok());
    let e = chat.permits(ServiceType::Embedding, None).unwrap_err();
    assert_eq!(
        (e.status(), e.code(), e.error_type()),
        (403, "service_not_permitted", "permission_error")
    );
    assert_eq!(
        e.message(),
        "API key 'chat-only' may not use the embedding service"
    );
    assert_eq!(chat.services().collect::<Vec<_>>(), vec![ServiceType::Chat]);
    assert!(!chat.is_admin());

    let root = get("sk-r");
    assert!(root.is_admin());
    for s in ServiceType::ALL {
        assert!(root.permits(s, Some("whatever")).is_ok());
    }
    assert_eq!(root.services().count(), ServiceType::ALL.len());
    assert_eq!(root.models(), None);

    let multi = get("sk-m");
    assert!(multi.permits(ServiceType::Chat, None).is_ok());
    assert!(multi.permits(ServiceType::Embedding, None).is_ok());
    assert!(multi.permits(ServiceType::Tts, None).is_err());

    let small = get("sk-s");
    assert!(small.permits(ServiceType::Chat, None).is_ok());
    assert!(small.permits(ServiceType::Chat, Some("qwen2.5:7b")).is_ok());
    assert!(small
        .permits(ServiceType::Rerank, Some("bge-reranker"))
        .is_ok());
    let e = small
        .permits(ServiceType::Chat, Some("gpt-4o"))
        .unwrap_err();
    assert_eq!((e.status(), e.code()), (403, "model_not_permitted"));
    assert_eq!(
        e.message(),
        "API key 'small' may not use the model 'gpt-4o'"
    );
    assert_eq!(
        small
            .permits(ServiceType::Stt, Some("qwen2.5:7b"))
            .unwrap_err()
            .code(),
        "service_not_permitted"
    );
    assert_eq!(small.models().unwrap().len(), 2);
}

#[test]
fn shared_salts_are_hashed_once() {
    let other_salt = b"another-salt-16b";
    let k = keys(json!([
        key("a", "sk-a", json!(["chat"])),
        key("b", "sk-b", json!(["chat"])),
        {"key-id": "c", "key-hash": hash_key(other_salt, "sk-c"), "permissions": ["chat"]}
    ]));
    assert_eq!(k.salts.len(), 2);
    assert_eq!(k.salts[0].digests.len(), 2);
    for (secret, id) in [("sk-a", "a"), ("sk-b", "b"), ("sk-c", "c")] {
        assert_eq!(k.authenticate(Some(secret), None, NOW).unwrap().id, id);
    }
}

#[test]
fn quotas_and_bookkeeping() {
    let k = keys(json!([{
        "keyId": "q", "keyHash": hash_key(SALT, "k"), "permissions": ["chat"],
        "rateLimitPerMinute": 60, "daily-request-limit": "1000",
        "tokens-per-minute": 10000, "daily-token-limit": 1000000,
        "description": "team", "createdAt": "2025-01-01 00:00:00", "created-by": "ops",
        "metadata": {"team": "x"}, "key-prefix": "sk-", "quota-alert-threshold": 0.8,
        "rotation-period-days": 90, "last-rotated-at": null, "usage": {"totalRequests": 3},
        "creatorIpAddress": "1.2.3.4", "expired": false, "allowed-ip-addresses": []
    }]));
    let q = &k.keys()[0];
    assert_eq!(
        (
            q.rate_limit_per_minute,
            q.daily_request_limit,
            q.tokens_per_minute,
            q.daily_token_limit
        ),
        (60, 1000, 10000, 1_000_000)
    );
    assert!(!k.uses_client_address());
}

#[test]
fn parse_errors_name_the_key() {
    let p = "jairouter.security.api-key";
    let cases = [
        (json!({"keys": {}}), format!("{p}.keys: must be a list")),
        (json!({"header-name": "X API Key"}), format!("{p}.header-name: must be an HTTP header name")),
        (json!({"kes": []}), format!("{p}.kes: unknown key")),
        (json!({"keys": [{"key-id": "a", "key-value": "sk-plain", "permissions": ["chat"]}]}),
         format!("{p}.keys[0].key-value: plaintext keys are not accepted")),
        (json!({"keys": [{"key-hash": hash_key(SALT, "k"), "permissions": ["chat"]}]}),
         format!("{p}.keys[0].key-id: is required")),
        (json!({"keys": [{"key-id": "a b", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"]}]}),
         format!("{p}.keys[0].key-id: must be 1 to 64")),
        (json!({"keys": [{"key-id": "a".repeat(65), "key-hash": hash_key(SALT, "k"), "permissions": ["chat"]}]}),
         format!("{p}.keys[0].key-id: must be 1 to 64")),
        (json!({"keys": [key("a", "k", json!(["chat"])), key("b", "k2", json!(["chat"])),
                         {"key-id": "c", "key-hash": "not base64!", "permissions": ["chat"]}]}),
         format!("{p}.keys[2].key-hash: must be Base64(salt):Base64(SHA-256(salt+key))")),
        (json!({"keys": [{"key-id": "a", "key-hash": "c2hvcnQ=:tKTAAh4diLiavEy1OqGzxYuwuTGpHDWlwtlCaLhyIug=", "permissions": ["chat"]}]}),
         format!("{p}.keys[0].key-hash: must be Base64(salt):Base64(SHA-256(salt+key)) (the salt is 5 bytes")),
        (json!({"keys": [{"key-id": "a", "key-hash": "amFpcm91dGVyLXRlc3Qtc2FsdA==:AAAA", "permissions": ["chat"]}]}),
         format!("{p}.keys[0].key-hash: must be Base64(salt):Base64(SHA-256(salt+key)) (the hash is 3 bytes")),
        (json!({"keys": [{"key-id": "a", "key-hash": "amFpcm91dGVyLXRlc3Qtc2FsdA==", "permissions": ["chat"]}]}),
         format!("{p}.keys[0].key-hash: must be Base64")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k")}]}),
         format!("{p}.keys[0].permissions: is required")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": []}]}),
         format!("{p}.keys[0].permissions: is required")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat", "write"]}]}),
         format!("{p}.keys[0].permissions[1]: must be a service")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": "chat,read"}]}),
         format!("{p}.keys[0].permissions: must be a service")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": 3}]}),
         format!("{p}.keys[0].permissions: must be a list of strings")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "models": []}]}),
         format!("{p}.keys[0].models: lists no model")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["admin"], "models": ["m"]}]}),
         format!("{p}.keys[0].models: cannot narrow an admin key")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "expires-at": "2027-02-30"}]}),
         format!("{p}.keys[0].expires-at: must be a UTC time")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "allowed-ip-addresses": ["10.0.0.0/8"]}]}),
         format!("{p}.keys[0].allowed-ip-addresses[0]: must be an IP address")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "tokens-per-minute": -1}]}),
         format!("{p}.keys[0].tokens-per-minute: must be a whole number")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "enabled": "yes"}]}),
         format!("{p}.keys[0].enabled: must be true or false")),
        (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "quota": 1}]}),
         format!("{p}.keys[0].quota: unknown key")),
        (json!({"keys": ["sk-plain"]}), format!("{p}.keys[0]: must be a mapping")),
    ];
    for (section, expected) in cases {
        let e = refused(section);
        assert!(e.starts_with(&expected), "{e}\n  expected: {expected}");
    }
}

#[test]
fn key_value_is_refused_without_showing_it() {
    let e = refused_key(
        json!({"key-id": "a", "key-value": "sk-secret-plain", "permissions": ["chat"]}),
    );
    assert!(e.contains("./build.sh hash-key"), "{e}");
    assert!(!e.contains("sk-secret-plain"), "{e}");
}

#[test]
fn duplicates_are_refused() {
    let e = refused(
        json!({"keys": [key("a", "k1", json!(["chat"])), key("a", "k2", json!(["chat"]))]}),
    );
    assert_eq!(
        e,
        "jairouter.security.api-key.keys[1].key-id: \"a\" is also the key-id of keys[0]"
    );
    let e = refused(
        json!({"keys": [key("a", "k1", json!(["chat"])), key("b", "k1", json!(["chat"]))]}),
    );
    assert!(
        e.starts_with("jairouter.security.api-key.keys[1].key-hash: the same key as keys[0]"),
        "{e}"
    );
}

#[test]
fn base64_round_trips() {
    for (raw, encoded) in [
        (&b""[..], ""),
        (b"f", "Zg=="),
        (b"fo", "Zm8="),
        (b"foo", "Zm9v"),
        (b"foob", "Zm9vYg=="),
        (b"fooba", "Zm9vYmE="),
        (b"foobar", "Zm9vYmFy"),
        (&[0xfb, 0xff, 0xbf], "+/+/"),
    ] {
        assert_eq!(base64_encode(raw), encoded);
        assert_eq!(base64_decode(encoded).unwrap(), raw);
    }
    assert_eq!(base64_decode("Zm9vYg").unwrap(), b"foob");
    assert_eq!(base64_decode("Zm8").unwrap(), b"fo");
    for bad in ["Z", "Zm9vY", "Zg===", "Zg=", "Z=g=", "Zm9v!A==", "Zm-_"] {
        assert_eq!(base64_decode(bad), None, "{bad}");
    }
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
}

#[test]
fn sha256_known_answers() {
    let hex = |d: [u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(
        hex(salted_sha256(b"", b"")),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        hex(salted_sha256(b"a", b"bc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        hex(salted_sha256(
            b"abcdbcdecdefdefgefghfghighijhijk",
            b"ijkljklmklmnlmnomnopnopq"
        )),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
    let million = vec![b'a'; 1_000_000];
    assert_eq!(
        hex(salted_sha256(&million[..1], &million[1..])),
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
    );
}

#[test]
fn times() {
    for (text, unix) in [
        ("1970-01-01", 0),
        ("2027-01-31", 1_801_353_600),
        ("2027-01-31T00:00:00", 1_801_353_600),
        ("2027-01-31T00:00:00Z", 1_801_353_600),
        ("2027-01-31T00:00:00.123Z", 1_801_353_600),
        ("2027-01-31 00:00:00", 1_801_353_600),
        ("2027-01-31T08:00:00+08:00", 1_801_353_600),
        ("2027-01-30T19:00:00-05:00", 1_801_353_600),
        ("2027-01-31T00:00", 1_801_353_600),
        ("2024-02-29T12:34:56", 1_709_210_096),
        ("2000-03-01T00:00:00", 951_868_800),
        ("9999-12-31T23:59:59", 253_402_300_799),
    ] {
        assert_eq!(parse_time(text), Some(unix), "{text}");
    }
    for bad in [
        "",
        "2027",
        "2027-1-31",
        "2027-01-32",
        "2027-02-29",
        "2100-02-29",
        "2027-13-01",
        "2027-00-10",
        "1969-12-31",
        "2027-01-31T24:00:00",
        "2027-01-31T00:60:00",
        "2027-01-31T00:00:60",
        "2027-01-31T00:00:00.",
        "2027-01-31T00:00:00Zx",
        "2027-01-31X00:00:00",
        "2027-01-31T00:00:00+8",
        "1970-01-01T00:00:00+01:00",
    ] {
        assert_eq!(parse_time(bad), None, "{bad}");
    }
    assert_eq!(parse_time("2000-02-29"), Some(951_782_400));
}

/// What Envoy 1.40 handed the filter for claims of a payload jwt_authn verified (bytes
/// observed through a probe filter): a list, and a string.
#[test]
fn claims_as_envoy_hands_them() {
    let list = [
        2, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 99, 104, 97, 116, 0, 0, 101,
        109, 98, 101, 100, 100, 105, 110, 103, 0, 0,
    ];
    assert_eq!(claim_values(&list), ["chat", "embedding"]);
    assert_eq!(
        claim_values(b"chat embedding,admin"),
        ["chat", "embedding", "admin"]
    );
    assert_eq!(claim_values(&list[..list.len() - 1]), Vec::<String>::new());
    assert!(claim_values(&[0xff, 0xfe]).is_empty());
    let caller = ApiKey::for_token("alice", &claim_values(&list), None);
    assert_eq!(caller.id, "alice");
    assert!(caller.permits(ServiceType::Embedding, Some("any")).is_ok());
    assert!(caller.permits(ServiceType::Rerank, None).is_err());
    let scoped = ApiKey::for_token(
        "bob",
        &["openid".into(), "chat".into()],
        Some(vec!["m".into()]),
    );
    assert!(scoped.permits(ServiceType::Chat, Some("m")).is_ok());
    assert!(scoped.permits(ServiceType::Chat, Some("n")).is_err());
}
