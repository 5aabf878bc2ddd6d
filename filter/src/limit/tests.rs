use super::*;
use crate::plan::Plan;
use crate::store::MemoryStore;
use serde_json::{json, Value};
use std::cell::RefCell;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const T0: u64 = 1_000_000_000_000;

fn config(v: Value) -> Plan {
    Plan::from_value(&v).unwrap()
}

/// A store holding every key the configuration creates at configure time.
fn store_for(cfg: &Plan) -> MemoryStore {
    let store = MemoryStore::default();
    for (key, initial) in cfg.limits.initial_keys() {
        store.set(&key, &initial, None).unwrap();
    }
    store
}

fn subject<'a>(model: &'a str, client: Option<&'a str>) -> Subject<'a> {
    Subject {
        service: ServiceType::Chat,
        model,
        client,
        instance: None,
        api_key: None,
    }
}

#[test]
fn the_strictest_limit_refuses_and_the_others_get_their_admission_back() {
    let cfg = config(json!({
        "rate-limit": {"enabled": true, "capacity": 5, "rate": 1, "scope": "global"},
        "services": {"chat": {
            "rate-limit": {"enabled": true, "capacity": 3, "rate": 1, "scope": "model"},
            "instances": [{"name": "m", "base-url": "http://a:1"}, {"name": "n", "base-url": "http://b:1"}]
        }}
    }));
    let store = store_for(&cfg);
    let limits = &cfg.limits;
    for _ in 0..3 {
        assert!(limits
            .acquire(
                &store,
                &RefCell::default(),
                &subject("m", None),
                Phase::BeforePick,
                T0,
                0
            )
            .is_ok());
    }
    let refusal = limits
        .acquire(
            &store,
            &RefCell::default(),
            &subject("m", None),
            Phase::BeforePick,
            T0,
            0,
        )
        .unwrap_err();
    assert_eq!(
        limits.list[refusal.limit].name,
        "model.services.chat.rate-limit"
    );
    assert_eq!(refusal.label, "chat/m");
    // The refused request took nothing from the global bucket: model n still gets the 2 left.
    assert!(limits
        .acquire(
            &store,
            &RefCell::default(),
            &subject("n", None),
            Phase::BeforePick,
            T0,
            0
        )
        .is_ok());
    let ok = limits
        .acquire(
            &store,
            &RefCell::default(),
            &subject("n", None),
            Phase::BeforePick,
            T0,
            0,
        )
        .unwrap();
    assert_eq!(ok.tightest.unwrap().1.remaining, 0);
    let refusal = limits
        .acquire(
            &store,
            &RefCell::default(),
            &subject("n", None),
            Phase::BeforePick,
            T0,
            0,
        )
        .unwrap_err();
    assert_eq!(limits.list[refusal.limit].name, "model.rate-limit");
    assert!(refusal.verdict.retry_after_ns > 0 && refusal.verdict.retry_after_ns <= 1_000_000_000);
}

#[test]
fn disabled_blocks_compile_to_nothing() {
    let cfg = config(json!({
        "rate-limit": {"enabled": false},
        "services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1",
            "rate-limit": {"enabled": false, "capacity": 1}}]}}
    }));
    assert!(cfg.limits.is_empty());
}

#[test]
fn instance_limits_are_drawn_after_the_pick() {
    let cfg = config(json!({"services": {"chat": {"instances": [
        {"name": "m", "base-url": "http://a:1", "instance-id": "a",
         "rate-limit": {"enabled": true, "capacity": 1, "rate": 1}},
        {"name": "m", "base-url": "http://b:1", "instance-id": "b"}
    ]}}}));
    let store = store_for(&cfg);
    let limits = &cfg.limits;
    assert_eq!(
        limits.list[0].name,
        "model.services.chat.instances[0].rate-limit"
    );
    let mut s = subject("m", None);
    // Before the pick nothing applies.
    assert!(limits
        .acquire(&store, &RefCell::default(), &s, Phase::BeforePick, T0, 0)
        .unwrap()
        .grants
        .is_empty());
    s.instance = Some((0, "a"));
    assert!(limits
        .acquire(&store, &RefCell::default(), &s, Phase::AfterPick, T0, 0)
        .is_ok());
    assert_eq!(
        limits
            .acquire(&store, &RefCell::default(), &s, Phase::AfterPick, T0, 0)
            .unwrap_err()
            .label,
        "a"
    );
    s.instance = Some((1, "b"));
    assert!(limits
        .acquire(&store, &RefCell::default(), &s, Phase::AfterPick, T0, 0)
        .unwrap()
        .grants
        .is_empty());
}

#[test]
fn clients_get_buckets_of_their_own_in_a_fixed_table() {
    let cfg = config(json!({
        "rate-limit": {"enabled": true, "capacity": 2, "rate": 1, "scope": "client-ip", "max-clients": 64},
        "services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}
    }));
    let store = store_for(&cfg);
    let keys_before = store.len();
    assert_eq!(keys_before, 64);
    let limits = &cfg.limits;
    let admitted = |client: &str, t: u64| {
        (0..5)
            .filter(|_| {
                limits
                    .acquire(
                        &store,
                        &RefCell::default(),
                        &subject("m", Some(client)),
                        Phase::BeforePick,
                        t,
                        0,
                    )
                    .is_ok()
            })
            .count()
    };
    assert_eq!(admitted("10.0.0.1", T0), 2);
    assert_eq!(admitted("10.0.0.2", T0), 2);
    // A stream of distinct clients: still 64 keys, and a client seen before keeps its (empty)
    // bucket while it is active.
    for c in 0..5000 {
        let _ = admitted(&format!("172.16.{}.{}", c / 256, c % 256), T0 + 1 + c);
    }
    assert_eq!(store.len(), keys_before);
    // No client address: the per-client limit does not apply.
    assert!(limits
        .acquire(
            &store,
            &RefCell::default(),
            &subject("m", None),
            Phase::BeforePick,
            T0,
            0
        )
        .is_ok());
    // client-ip-enable adds a per-client twin to a service-wide limit.
    let cfg = config(json!({
        "rate-limit": {"enabled": true, "capacity": 100, "rate": 1, "client-ip-enable": true, "max-clients": 8},
        "services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}
    }));
    let names: Vec<&str> = cfg.limits.list.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["model.rate-limit (per client)", "model.rate-limit"]);
}

#[test]
fn oversized_client_tables_are_refused() {
    let err = Plan::from_value(&json!({
        "rate-limit": {"enabled": true, "algorithm": "sliding-window", "rate": 1000, "window": 10,
                       "scope": "client-ip", "max-clients": 100000},
        "services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}
    }))
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("model.rate-limit.max-clients:"), "{err}");
    // A block's per-client twin is refused under the block's key.
    let err = Plan::from_value(&json!({
        "services": {"chat": {
            "rate-limit": {"enabled": true, "algorithm": "sliding-window", "rate": 1000,
                           "window": 10, "client-ip-enable": true, "max-clients": 100000},
            "instances": [{"name": "m", "base-url": "http://a:1"}]}}
    }))
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("model.services.chat.rate-limit.max-clients:"),
        "{err}"
    );
}

#[test]
fn durations_read_like_openai() {
    assert_eq!(openai_duration(0), "0ms");
    assert_eq!(openai_duration(120_000_000), "120ms");
    assert_eq!(openai_duration(6_500_000_000), "7s");
    assert_eq!(openai_duration(360_000_000_000), "6m0s");
    assert_eq!(retry_after_secs(1), 1);
    assert_eq!(retry_after_secs(2_000_000_001), 3);
}

/// API-key quotas: each key draws on its own buckets, per minute and per day, requests and
/// tokens; a key without quotas and a request without a key draw on none of them.
#[test]
fn api_key_quotas_are_per_key() {
    let hash = |key: &str| crate::auth::hash_key(b"0123456789abcdef", key);
    let cfg = config(json!({
        "model": {"services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}},
        "jairouter": {"security": {"api-key": {"keys": [
            {"key-id": "small", "key-hash": hash("sk-small-000000"), "permissions": ["chat"],
             "rate-limit-per-minute": 2, "daily-request-limit": 100, "tokens-per-minute": 1000},
            {"key-id": "daily", "key-hash": hash("sk-daily-000000"), "permissions": ["chat"],
             "daily-request-limit": 1},
            {"key-id": "free", "key-hash": hash("sk-free-0000000"), "permissions": ["chat"]}
        ]}}}
    }));
    assert_eq!(cfg.limits.list.len(), 4);
    assert_eq!(
        cfg.limits.completion_estimate(ServiceType::Chat, Some(0)),
        Some(256)
    );
    assert_eq!(
        cfg.limits.completion_estimate(ServiceType::Chat, Some(2)),
        None
    );
    let store = store_for(&cfg);
    let with_key = |key: Option<usize>| Subject {
        api_key: key,
        ..subject("m", None)
    };
    let draw = |key: Option<usize>, tokens: u64| {
        cfg.limits.acquire(
            &store,
            &RefCell::default(),
            &with_key(key),
            Phase::BeforePick,
            T0,
            tokens,
        )
    };
    assert!(draw(Some(0), 300).is_ok());
    assert!(draw(Some(0), 300).is_ok());
    let refused = draw(Some(0), 300).unwrap_err();
    assert_eq!(
        cfg.limits.list[refused.limit].name,
        "jairouter.security.api-key.keys[small].rate-limit-per-minute"
    );
    assert!(draw(Some(1), 0).is_ok());
    let refused = draw(Some(1), 0).unwrap_err();
    assert!(cfg.limits.list[refused.limit]
        .name
        .ends_with("[daily].daily-request-limit"));
    // A day's quota refills over the day: a minute later, still nothing.
    let later = cfg.limits.acquire(
        &store,
        &RefCell::default(),
        &with_key(Some(1)),
        Phase::BeforePick,
        T0 + 60_000_000_000,
        0,
    );
    assert!(later.is_err());
    for _ in 0..10 {
        assert!(draw(Some(2), 0).is_ok());
        assert!(draw(None, 0).is_ok());
    }
}

/// One token budget of `tpm` for model `m` (scope `scope`), its store and this VM's refunds.
struct Budget {
    cfg: Plan,
    store: MemoryStore,
    refunds: RefCell<Refunds>,
}

impl Budget {
    fn new(tpm: u64, scope: &str) -> Budget {
        let cfg = config(json!({
            "token-limit": {"tokens-per-minute": tpm, "scope": scope},
            "services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}
        }));
        let store = store_for(&cfg);
        Budget {
            cfg,
            store,
            refunds: RefCell::default(),
        }
    }

    fn draw(&self, tokens: u64) -> Result<Admitted, Refusal> {
        let client = subject("m", Some("10.0.0.1"));
        self.cfg.limits.acquire(
            &self.store,
            &self.refunds,
            &client,
            Phase::BeforePick,
            T0,
            tokens,
        )
    }

    fn settle(&self, admitted: &Admitted, used: u64) {
        self.cfg.limits.settle_tokens(
            &self.store,
            Some(&mut self.refunds.borrow_mut()),
            &admitted.grants,
            used,
            T0,
        );
    }

    fn available(&self) -> u64 {
        self.cfg.limits.levels(&self.store, T0)[0].available
    }

    fn owed(&self, admitted: &Admitted) -> u64 {
        self.refunds.borrow_mut().take(0, &admitted.grants[0].key)
    }
}

#[test]
fn a_refund_owed_rides_with_the_next_draw_and_makes_room_for_it() {
    let budget = Budget::new(2000, "model");
    // 900 of 2000 leaves more than half: the refund may wait.
    let first = budget.draw(900).unwrap();
    budget.settle(&first, 100);
    // 800 owed, not yet paid: the bucket holds 1100.
    assert_eq!(budget.owed(&first), 800);
    assert!(budget
        .refunds
        .borrow_mut()
        .owe(0, &first.grants[0].key, 800));
    assert_eq!(budget.available(), 1100);
    // 1500 fits only once the refund is in: it is paid in the same write.
    let second = budget.draw(1500).unwrap();
    assert!(budget.refunds.borrow().is_empty());
    assert_eq!(second.tightest_tokens.unwrap().1.remaining, 400);
    // A debt is charged at once: 400 more than reserved empties the bucket.
    budget.settle(&second, 1900);
    assert!(budget.refunds.borrow().is_empty());
    assert!(budget.draw(1).is_err());
}

#[test]
fn a_refund_is_paid_at_once_when_its_draw_left_less_than_half_the_budget() {
    let budget = Budget::new(1000, "model");
    // 600 of 1000 leaves 400: another worker's next request of 600 must find the 500 unused.
    let first = budget.draw(600).unwrap();
    budget.settle(&first, 100);
    assert!(budget.refunds.borrow().is_empty());
    assert_eq!(budget.available(), 900);
    // Exactly half left is still roomy: that refund waits.
    let second = budget.draw(400).unwrap();
    budget.settle(&second, 100);
    assert_eq!(budget.owed(&second), 300);
}

#[test]
fn a_clients_bucket_and_a_full_table_are_refunded_at_once() {
    let budget = Budget::new(4000, "client");
    let first = budget.draw(900).unwrap();
    budget.settle(&first, 100);
    assert!(budget.refunds.borrow().is_empty());
    assert!(budget.draw(3800).is_ok());
    // A fixed bucket with the table full: paid at once as well.
    let budget = Budget::new(4000, "model");
    for n in 0..MAX_OWED {
        assert!(budget
            .refunds
            .borrow_mut()
            .owe(0, &Rc::from(format!("other{n}")), 1));
    }
    let first = budget.draw(900).unwrap();
    budget.settle(&first, 100);
    assert_eq!(budget.owed(&first), 0);
    assert_eq!(budget.available(), 3900);
}

/// A model's request limit (`capacity` requests) and token budget (`tpm`), as a document.
fn limit_and_budget(capacity: u64, tpm: u64) -> Value {
    json!({
        "rate-limit": {"enabled": true, "capacity": capacity, "rate": 1, "scope": "model"},
        "token-limit": {"tokens-per-minute": tpm, "scope": "model"},
        "services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}
    })
}

/// What each fixed bucket would admit now, by limit name.
fn levels(cfg: &Plan, store: &MemoryStore) -> Vec<(String, u64)> {
    cfg.limits
        .levels(store, T0)
        .iter()
        .map(|l| (cfg.limits.list[l.limit].name.clone(), l.available))
        .collect()
}

fn draw(cfg: &Plan, store: &MemoryStore, tokens: u64) -> Result<Admitted, Refusal> {
    let s = subject("m", None);
    cfg.limits.acquire(
        store,
        &RefCell::default(),
        &s,
        Phase::BeforePick,
        T0,
        tokens,
    )
}

#[test]
fn a_models_request_limit_and_token_budget_are_one_entry_drawn_together() {
    let cfg = config(limit_and_budget(3, 1000));
    let store = store_for(&cfg);
    assert_eq!(store.len(), 1, "one entry holds the model's two buckets");
    let budget = "model.token-limit".to_string();
    let requests = "model.rate-limit".to_string();
    let first = draw(&cfg, &store, 600).unwrap();
    assert_eq!(first.grants.len(), 2);
    assert_eq!(first.grants[0].key, first.grants[1].key);
    assert_eq!(
        levels(&cfg, &store),
        [(budget.clone(), 400), (requests.clone(), 2)]
    );
    // The budget refuses: the request limit's bucket is not drawn either.
    let refusal = draw(&cfg, &store, 600).unwrap_err();
    assert_eq!(cfg.limits.list[refusal.limit].name, budget);
    assert_eq!(
        levels(&cfg, &store),
        [(budget.clone(), 400), (requests.clone(), 2)]
    );
    // The request limit refuses: the budget keeps its tokens.
    draw(&cfg, &store, 10).unwrap();
    draw(&cfg, &store, 10).unwrap();
    let refusal = draw(&cfg, &store, 10).unwrap_err();
    assert_eq!(cfg.limits.list[refusal.limit].name, requests);
    assert_eq!(levels(&cfg, &store), [(budget, 380), (requests, 0)]);
}

#[test]
fn a_reload_that_changes_one_limit_of_an_entry_keeps_the_others_bucket() {
    let store = MemoryStore::default();
    let install = |document: Value| {
        let bytes = document.to_string().into_bytes();
        let cfg = Plan::from_json(&bytes).unwrap();
        crate::install::install(&cfg, &bytes, &store);
        cfg
    };
    let before = install(limit_and_budget(3, 1000));
    draw(&before, &store, 600).unwrap();
    // The budget's numbers change; the request limit's do not.
    let after = install(limit_and_budget(3, 2000));
    assert_eq!(
        levels(&after, &store),
        [
            ("model.token-limit".to_string(), 2000),
            ("model.rate-limit".to_string(), 2)
        ]
    );
    // The old budget's record is gone from the entry; the new budget has none until it is
    // drawn (a missing record is a fresh bucket).
    let key = &after.limits.fixed[0].2;
    let records = |store: &MemoryStore| entry::parse(store.get(key).0.as_deref()).len();
    assert_eq!(records(&store), 1);
    draw(&after, &store, 100).unwrap();
    assert_eq!(records(&store), 2);
    // A worker still on the previous plan draws its old budget's record back in (and from the
    // request limit both plans share); the next install prunes the old record again.
    draw(&before, &store, 1).unwrap();
    assert_eq!(records(&store), 3);
    after.limits.prune_entries(&store);
    assert_eq!(records(&store), 2);
    assert_eq!(
        levels(&after, &store)[0],
        ("model.token-limit".to_string(), 1900)
    );
    // Three requests drawn under either plan, from the one request limit they share.
    assert_eq!(
        levels(&after, &store)[1],
        ("model.rate-limit".to_string(), 0)
    );
}

#[test]
fn a_refused_draw_still_pays_what_was_owed() {
    let budget = Budget::new(2000, "model");
    let first = budget.draw(900).unwrap();
    budget.settle(&first, 100);
    assert_eq!(budget.available(), 1100);
    // 2500 does not fit even with the 800 owed: refused, and the 800 are in all the same.
    assert!(budget.draw(2500).is_err());
    assert!(budget.refunds.borrow().is_empty());
    assert_eq!(budget.available(), 1900);
}
