//! Rate limits: which buckets a request draws from, in what order, and what the client is told.
//!
//! Every configured `rate-limit` block (global, per service, per instance) is compiled into a
//! `Limit`: what it covers, what one bucket counts (`scope`), and its numbers. A request draws
//! from every limit that covers it; all must admit, so the strictest wins. When one refuses, the
//! admissions already taken are given back, so a refused request costs nothing anywhere.
//!
//! Buckets live in shared data under keys created at configure time, so compare-and-swap is
//! exact from the first request. Per-client buckets live in a fixed table of `max-clients`
//! slots: shared data never grows with the number of clients.

pub mod bucket;
pub mod global;
pub mod rls;

use crate::bytes::{hash64, u64_le};
use crate::config::{ApiKeyEntry, RateLimitPolicy, Scope, ServiceConfig, TokenLimitPolicy};
use crate::endpoint::ServiceType;
use crate::shared_keys::LimitKeys;
use crate::store::{transact, SharedStore};
use bucket::{admit_cost, is_idle, refund, settle, Params, Verdict};
use std::cell::RefCell;

/// Tokens an API key's token quota reserves for a completion of unknown length (as a
/// `token-limit` block does by default).
const KEY_COMPLETION_ESTIMATE: u64 = 256;

/// How many neighbouring slots a client may take when its own holds another active client.
const CLIENT_PROBES: u64 = 4;

/// Buckets a VM may owe refunds to at once; past that a refund is paid at once.
const MAX_OWED: usize = 64;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// `rate-limit`: requests.
    Requests,
    /// `token-limit`: model tokens (prompt and completion).
    Tokens,
}

/// What a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Covers {
    All,
    Service(ServiceType),
    /// One instance, by index in its service.
    Instance(ServiceType, usize),
    /// The requests made with one API key (index into `ApiKeys::keys`): its quotas.
    ApiKey(usize),
}

#[derive(Debug)]
pub struct Limit {
    /// Where it is configured, as a client and an operator read it in the 429.
    pub name: String,
    /// Its buckets' shared-data keys; they change with the numbers, so a reload never reads
    /// foreign state.
    keys: LimitKeys,
    pub covers: Covers,
    pub scope: Scope,
    pub params: Params,
    pub max_clients: u64,
    pub unit: Unit,
    /// Token budgets: what to reserve for a completion of unknown length.
    pub completion_estimate: u64,
}

impl Limit {
    fn new(name: String, covers: Covers, scope: Scope, policy: &RateLimitPolicy) -> Limit {
        Limit::build(
            name,
            covers,
            scope,
            Params::of(policy),
            policy.max_clients,
            Unit::Requests,
            0,
        )
    }

    fn tokens(name: String, covers: Covers, policy: &TokenLimitPolicy) -> Limit {
        let params = Params::tokens_per_minute(policy.tokens_per_minute);
        let (scope, clients, estimate) =
            (policy.scope, policy.max_clients, policy.completion_estimate);
        Limit::build(name, covers, scope, params, clients, Unit::Tokens, estimate)
    }

    fn build(
        name: String,
        covers: Covers,
        scope: Scope,
        params: Params,
        max_clients: u64,
        unit: Unit,
        completion_estimate: u64,
    ) -> Limit {
        let fingerprint = hash64(format!("{name}|{scope:?}|{params:?}|{max_clients}").as_bytes());
        Limit {
            name,
            keys: LimitKeys::new(fingerprint),
            covers,
            scope,
            params,
            max_clients,
            unit,
            completion_estimate,
        }
    }

    /// Whether the bucket depends on the chosen instance (drawn after the pick).
    fn after_pick(&self) -> bool {
        matches!(self.covers, Covers::Instance(..)) || self.scope == Scope::Instance
    }

    fn covers(&self, subject: &Subject<'_>) -> bool {
        match self.covers {
            Covers::All => true,
            Covers::Service(kind) => kind == subject.service,
            Covers::Instance(kind, at) => {
                kind == subject.service && subject.instance.is_some_and(|(i, _)| i == at)
            }
            Covers::ApiKey(at) => subject.api_key == Some(at),
        }
    }

    /// The bucket for this request and how to name it; `None` when the request has nothing to
    /// key it by (no client address for a per-client limit).
    fn bucket(&self, subject: &Subject<'_>) -> Option<(BucketKey, String)> {
        let fixed = |label: String| Some((BucketKey::Fixed(self.fixed_key(&label)), label));
        match self.scope {
            Scope::Global => fixed("all".to_string()),
            Scope::Service => fixed(subject.service.key().to_string()),
            Scope::Model => fixed(format!("{}/{}", subject.service.key(), subject.model)),
            Scope::Instance => fixed(subject.instance?.1.to_string()),
            Scope::Client => {
                let client = subject.client?;
                Some((
                    BucketKey::Client(hash64(client.as_bytes()).max(1)),
                    client.to_string(),
                ))
            }
        }
    }

    fn fixed_key(&self, label: &str) -> String {
        self.keys.bucket(label)
    }

    fn client_slot(&self, slot: u64) -> String {
        self.keys.client_slot(slot)
    }
}

enum BucketKey {
    Fixed(String),
    /// A client's fingerprint: it finds its slot in the table.
    Client(u64),
}

/// The request as the limits see it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub service: ServiceType,
    pub model: &'a str,
    pub client: Option<&'a str>,
    /// The chosen instance (index in its service, id), once picked.
    pub instance: Option<(usize, &'a str)>,
    /// The API key the request authenticated with (index into `ApiKeys::keys`).
    pub api_key: Option<usize>,
}

/// One admission taken, to give back if a later limit refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    limit: usize,
    key: String,
    at_ns: u64,
    /// What was taken: 1 request, or the reserved tokens.
    cost: u64,
    /// Whether the draw left at least half the bucket: only then may a refund wait (see
    /// `Refunds`).
    roomy: bool,
}

impl Grant {
    /// The limit it was drawn from (index into `Limits::list`).
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// The admissions a request holds, and the tightest of their verdicts per unit (for the headers).
#[derive(Debug, Default)]
pub struct Admitted {
    pub grants: Vec<Grant>,
    pub tightest: Option<(usize, Verdict)>,
    pub tightest_tokens: Option<(usize, Verdict)>,
}

impl Admitted {
    fn note(&mut self, limit: usize, unit: Unit, verdict: Verdict) {
        let slot = match unit {
            Unit::Requests => &mut self.tightest,
            Unit::Tokens => &mut self.tightest_tokens,
        };
        if slot.is_none_or(|(_, v)| verdict.remaining < v.remaining) {
            *slot = Some((limit, verdict));
        }
    }

    pub fn merge(&mut self, other: Admitted) {
        if let Some((limit, verdict)) = other.tightest {
            self.note(limit, Unit::Requests, verdict);
        }
        if let Some((limit, verdict)) = other.tightest_tokens {
            self.note(limit, Unit::Tokens, verdict);
        }
        self.grants.extend(other.grants);
    }

    /// Whether any token budget was drawn (the response must then be read for its usage).
    pub fn holds_tokens(&self) -> bool {
        self.tightest_tokens.is_some()
    }
}

/// The token refunds this VM owes its budgets. A request that used fewer tokens than it reserved
/// gives the rest back with the next draw from the same bucket on this VM (inside that draw's
/// compare-and-swap) or at the VM's next tick (once a second), whichever comes first: a read and a
/// write less per budget per request. Owing keeps a budget tighter for that moment on the
/// other workers, never looser, so it only waits while its draw left at least half the bucket:
/// near the limit, where another worker's next request could be refused for want of it, the
/// refund is paid at once. A debt (more used than reserved) is charged at once; per-client
/// buckets are refunded at once (their slots change hands).
#[derive(Debug, Default)]
pub struct Refunds {
    owed: Vec<Owed>,
}

#[derive(Debug)]
struct Owed {
    /// The limit (index into `Limits::list`) of the plan the tokens were drawn under.
    limit: usize,
    key: String,
    tokens: u64,
}

impl Refunds {
    /// Adds `tokens` to what is owed to the bucket; false when the table is full.
    fn owe(&mut self, limit: usize, key: &str, tokens: u64) -> bool {
        if let Some(owed) = self.owed.iter_mut().find(|o| o.key == key) {
            owed.tokens = owed.tokens.saturating_add(tokens);
            return true;
        }
        if self.owed.len() >= MAX_OWED {
            return false;
        }
        self.owed.push(Owed {
            limit,
            key: key.to_string(),
            tokens,
        });
        true
    }

    /// What is owed to the bucket, no longer owed.
    fn take(&mut self, key: &str) -> u64 {
        let Some(at) = self.owed.iter().position(|o| o.key == key) else {
            return 0;
        };
        self.owed.swap_remove(at).tokens
    }

    pub fn is_empty(&self) -> bool {
        self.owed.is_empty()
    }
}

/// The limit that refused, the bucket it keyed, and when to come back.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub limit: usize,
    pub label: String,
    pub verdict: Verdict,
}

/// One bucket's level, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// The limit (index into `Limits::list`).
    pub limit: usize,
    pub bucket: String,
    /// Requests (or tokens) it would admit now.
    pub available: u64,
    /// What it admits when full.
    pub capacity: u64,
}

#[derive(Debug, Default)]
pub struct Limits {
    pub list: Vec<Limit>,
    /// Every bucket but per-client ones, known once the limits are: the limit (index into
    /// `list`), the bucket's label and its key.
    fixed: Vec<(usize, String, String)>,
    /// Per limit (same index): its numbers as the rate-limit service is told them, when it is
    /// shared across replicas (`gateway.global-rate-limit`; see `global`).
    shared: Vec<Option<global::Shared>>,
}

/// Which limits to draw from: those that need no instance, or those that do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    BeforePick,
    AfterPick,
}

impl Limits {
    /// Every enabled block, in the order they are drawn: global, service, instance; each with a
    /// per-client twin when `client-ip-enable` is set.
    pub fn compile(
        global: Option<&RateLimitPolicy>,
        global_tokens: Option<&TokenLimitPolicy>,
        services: &[&ServiceConfig],
        api_keys: &[ApiKeyEntry],
    ) -> Limits {
        let mut list = Vec::new();
        // API-key quotas first: a key over its quota is refused before it draws on shared limits.
        for (at, key) in api_keys.iter().enumerate() {
            let quotas = [
                (
                    "rate-limit-per-minute",
                    key.rate_limit_per_minute,
                    60,
                    Unit::Requests,
                ),
                (
                    "daily-request-limit",
                    key.daily_request_limit,
                    86_400,
                    Unit::Requests,
                ),
                ("tokens-per-minute", key.tokens_per_minute, 60, Unit::Tokens),
                (
                    "daily-token-limit",
                    key.daily_token_limit,
                    86_400,
                    Unit::Tokens,
                ),
            ];
            for (field, amount, period, unit) in quotas {
                if amount == 0 {
                    continue;
                }
                let name = format!("jairouter.security.api-key.keys[{}].{field}", key.id);
                let params = Params::per_period(amount, period);
                let estimate = if unit == Unit::Tokens {
                    KEY_COMPLETION_ESTIMATE
                } else {
                    0
                };
                let covers = Covers::ApiKey(at);
                list.push(Limit::build(
                    name,
                    covers,
                    Scope::Global,
                    params,
                    1,
                    unit,
                    estimate,
                ));
            }
        }
        let add_tokens =
            |list: &mut Vec<Limit>, name: String, covers: Covers, policy: &TokenLimitPolicy| {
                if policy.enabled {
                    list.push(Limit::tokens(name, covers, policy));
                }
            };
        if let Some(policy) = global_tokens {
            add_tokens(
                &mut list,
                "model.token-limit".to_string(),
                Covers::All,
                policy,
            );
        }
        for service in services {
            if let Some(policy) = &service.token_limit {
                let name = format!("model.services.{}.token-limit", service.kind.key());
                add_tokens(&mut list, name, Covers::Service(service.kind), policy);
            }
        }
        let mut add = |name: String, covers: Covers, policy: &RateLimitPolicy| {
            if !policy.enabled {
                return;
            }
            if policy.client_ip_enable && policy.scope != Scope::Client {
                list.push(Limit::new(
                    format!("{name} (per client)"),
                    covers,
                    Scope::Client,
                    policy,
                ));
            }
            list.push(Limit::new(name, covers, policy.scope, policy));
        };
        if let Some(policy) = global {
            add("model.rate-limit".to_string(), Covers::All, policy);
        }
        for service in services {
            let path = format!("model.services.{}", service.kind.key());
            if let Some(policy) = &service.rate_limit {
                add(
                    format!("{path}.rate-limit"),
                    Covers::Service(service.kind),
                    policy,
                );
            }
            for (at, instance) in service.instances.iter().enumerate() {
                if let Some(policy) = &instance.rate_limit {
                    let name = format!("{path}.instances[{at}].rate-limit");
                    add(name, Covers::Instance(service.kind, at), policy);
                }
            }
        }
        let fixed = fixed_buckets(&list, services);
        Limits {
            list,
            fixed,
            shared: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Tokens to reserve for a completion of unknown length: the largest estimate among the
    /// token budgets covering the service (0 when none does).
    pub fn completion_estimate(&self, service: ServiceType, api_key: Option<usize>) -> Option<u64> {
        self.list
            .iter()
            .filter(|l| l.unit == Unit::Tokens)
            .filter(|l| match l.covers {
                Covers::All => true,
                Covers::Service(kind) => kind == service,
                Covers::ApiKey(at) => api_key == Some(at),
                Covers::Instance(..) => false,
            })
            .map(|l| l.completion_estimate)
            .max()
    }

    /// Every bucket key with its initial state, to create before traffic (Envoy ignores CAS on
    /// a key that does not exist, so creating them on first use would race).
    pub fn initial_keys(&self) -> Vec<(String, Vec<u8>)> {
        let mut keys = Vec::new();
        for limit in self.list.iter().filter(|l| l.scope == Scope::Client) {
            let slot_state = [&[0u8; 8][..], &limit.params.initial_state()].concat();
            for slot in 0..limit.max_clients {
                keys.push((limit.client_slot(slot), slot_state.clone()));
            }
        }
        for (index, _, key) in &self.fixed {
            if let Some(limit) = self.list.get(*index) {
                keys.push((key.clone(), limit.params.initial_state()));
            }
        }
        keys
    }

    /// What every bucket would admit right now, read without drawing (the status page).
    /// Per-client tables are not walked: they may hold many thousands of slots.
    pub fn levels(&self, store: &dyn SharedStore, now_ns: u64) -> Vec<Level> {
        self.fixed
            .iter()
            .filter_map(|(index, bucket, key)| {
                let limit = self.list.get(*index)?;
                let (_, verdict) =
                    admit_cost(&limit.params, store.get(key).0.as_deref(), now_ns, 1);
                let available = if verdict.admitted {
                    verdict.remaining.saturating_add(1)
                } else {
                    0
                };
                Some(Level {
                    limit: *index,
                    bucket: bucket.clone(),
                    available,
                    capacity: limit.params.limit(),
                })
            })
            .collect()
    }

    /// Draws from every limit of `phase` that covers the request: one request from request
    /// limits, `tokens` from token budgets (paying in the same write what this VM owes the
    /// bucket). On a refusal the admissions taken here are given back.
    pub fn acquire(
        &self,
        store: &dyn SharedStore,
        refunds: &RefCell<Refunds>,
        subject: &Subject<'_>,
        phase: Phase,
        now_ns: u64,
        tokens: u64,
    ) -> Result<Admitted, Refusal> {
        let mut admitted = Admitted::default();
        for (index, limit) in self.list.iter().enumerate() {
            if limit.after_pick() != (phase == Phase::AfterPick) || !limit.covers(subject) {
                continue;
            }
            let Some((key, label)) = limit.bucket(subject) else {
                continue;
            };
            let cost = match limit.unit {
                Unit::Requests => 1,
                Unit::Tokens => tokens,
            };
            let (key, verdict) = match key {
                BucketKey::Fixed(key) => {
                    // Taken out before the write, owed again if the write fails: never paid twice.
                    let owed = match (limit.unit, refunds.try_borrow_mut()) {
                        (Unit::Tokens, Ok(mut refunds)) => refunds.take(&key),
                        _ => 0,
                    };
                    let verdict = transact(store, &key, |state| {
                        if owed == 0 {
                            return admit_cost(&limit.params, state, now_ns, cost);
                        }
                        let repaid = settle(&limit.params, state, now_ns, negative(owed));
                        let (written, verdict) =
                            admit_cost(&limit.params, Some(&repaid), now_ns, cost);
                        (Some(written.unwrap_or(repaid)), verdict)
                    });
                    if owed > 0 && verdict.is_none() {
                        if let Ok(mut refunds) = refunds.try_borrow_mut() {
                            refunds.owe(index, &key, owed);
                        }
                    }
                    (key, verdict)
                }
                BucketKey::Client(fingerprint) => {
                    let key = self.client_key(store, limit, fingerprint, now_ns);
                    let verdict = transact(store, &key, |state| {
                        admit_client(&limit.params, state, fingerprint, now_ns, cost)
                    });
                    (key, verdict)
                }
            };
            // A store that fails must not fail the request: the limit is skipped.
            let Some(verdict) = verdict else {
                log::warn!(
                    "rate limit {}: shared data unavailable, not enforced",
                    limit.name
                );
                continue;
            };
            if !verdict.admitted {
                self.release(store, &admitted.grants);
                return Err(Refusal {
                    limit: index,
                    label,
                    verdict,
                });
            }
            let roomy = verdict.remaining >= limit.params.limit() / 2;
            admitted.note(index, limit.unit, verdict);
            admitted.grants.push(Grant {
                limit: index,
                key,
                at_ns: now_ns,
                cost,
                roomy,
            });
        }
        Ok(admitted)
    }

    /// Gives admissions back (the request was refused by another limit, or never sent).
    pub fn release(&self, store: &dyn SharedStore, grants: &[Grant]) {
        for grant in grants {
            let Some(limit) = self.list.get(grant.limit) else {
                continue;
            };
            let client = limit.scope == Scope::Client;
            let _ = transact(store, &grant.key, |state| {
                let written = if client {
                    let (fingerprint, rest) = split_slot(state);
                    let bucket = refund(&limit.params, rest, grant.at_ns, grant.cost);
                    [&fingerprint.to_le_bytes()[..], &bucket].concat()
                } else {
                    refund(&limit.params, state, grant.at_ns, grant.cost)
                };
                (Some(written), ())
            });
        }
    }

    /// Settles the token budgets a request drew from, now that it really used `used` tokens: a
    /// debt at once, a refund owed (see `Refunds`) where the bucket is not a client's, the draw
    /// left it roomy and `refunds` can take it.
    pub fn settle_tokens(
        &self,
        store: &dyn SharedStore,
        mut refunds: Option<&mut Refunds>,
        grants: &[Grant],
        used: u64,
        now_ns: u64,
    ) {
        for grant in grants {
            let Some(limit) = self
                .list
                .get(grant.limit)
                .filter(|l| l.unit == Unit::Tokens)
            else {
                continue;
            };
            let delta = i64::try_from(used).unwrap_or(i64::MAX)
                - i64::try_from(grant.cost).unwrap_or(i64::MAX);
            if delta == 0 {
                continue;
            }
            let client = limit.scope == Scope::Client;
            if delta < 0 && !client && grant.roomy {
                if let Some(refunds) = refunds.as_deref_mut() {
                    if refunds.owe(grant.limit, &grant.key, delta.unsigned_abs()) {
                        continue;
                    }
                }
            }
            let _ = transact(store, &grant.key, |state| {
                let written = if client {
                    let (fingerprint, rest) = split_slot(state);
                    let bucket = settle(&limit.params, rest, now_ns, delta);
                    [&fingerprint.to_le_bytes()[..], &bucket].concat()
                } else {
                    settle(&limit.params, state, now_ns, delta)
                };
                (Some(written), ())
            });
        }
    }

    /// Pays every refund this VM owes (its tick, or before a reload replaces the plan the
    /// refunds were drawn under). What the store will not take stays owed.
    pub fn pay_refunds(&self, store: &dyn SharedStore, refunds: &mut Refunds, now_ns: u64) {
        refunds.owed.retain(|owed| {
            let Some(limit) = self.list.get(owed.limit) else {
                return false;
            };
            let paid = transact(store, &owed.key, |state| {
                let written = settle(&limit.params, state, now_ns, negative(owed.tokens));
                (Some(written), ())
            });
            paid.is_none()
        });
    }

    /// The slot a client's bucket lives in: its own if it holds one, else the first free or
    /// idle one among its home slot and a few neighbours, else (all busy with other active
    /// clients) its home slot, shared.
    fn client_key(
        &self,
        store: &dyn SharedStore,
        limit: &Limit,
        fingerprint: u64,
        now_ns: u64,
    ) -> String {
        let slots = limit.max_clients.max(1);
        let home = fingerprint % slots;
        let mut free = None;
        for probe in 0..CLIENT_PROBES.min(slots) {
            let key = limit.client_slot((home + probe) % slots);
            let (state, _) = store.get(&key);
            let (owner, rest) = split_slot(state.as_deref());
            if owner == fingerprint {
                return key;
            }
            if free.is_none() && (owner == 0 || is_idle(&limit.params, rest, now_ns)) {
                free = Some(key);
            }
        }
        free.unwrap_or_else(|| limit.client_slot(home))
    }
}

/// Every bucket but per-client ones: the limit (index), the bucket's label and its key.
fn fixed_buckets(list: &[Limit], services: &[&ServiceConfig]) -> Vec<(usize, String, String)> {
    let mut buckets = Vec::new();
    for (index, limit) in list.iter().enumerate() {
        if limit.scope == Scope::Client {
            continue;
        }
        if let Covers::ApiKey(_) = limit.covers {
            let label = "all".to_string();
            buckets.push((index, label.clone(), limit.fixed_key(&label)));
            continue;
        }
        for service in services {
            let covered = match limit.covers {
                Covers::All => true,
                Covers::Service(kind) | Covers::Instance(kind, _) => kind == service.kind,
                Covers::ApiKey(_) => false,
            };
            if !covered {
                continue;
            }
            let labels: Vec<String> = match limit.scope {
                Scope::Global => vec!["all".to_string()],
                Scope::Service => vec![service.kind.key().to_string()],
                Scope::Model => service
                    .models
                    .iter()
                    .map(|m| format!("{}/{m}", service.kind.key()))
                    .collect(),
                Scope::Instance => service
                    .instances
                    .iter()
                    .enumerate()
                    .filter(|(at, _)| match limit.covers {
                        Covers::Instance(_, only) => *at == only,
                        _ => true,
                    })
                    .map(|(_, i)| i.id.clone())
                    .collect(),
                Scope::Client => Vec::new(),
            };
            for label in labels {
                let key = limit.fixed_key(&label);
                buckets.push((index, label, key));
            }
        }
    }
    buckets.sort_by(|a, b| a.2.cmp(&b.2));
    buckets.dedup_by(|a, b| a.2 == b.2);
    buckets
}

/// `-tokens` as a settlement's delta.
fn negative(tokens: u64) -> i64 {
    i64::try_from(tokens).map_or(i64::MIN, |t| -t)
}

/// A client slot: the owner's fingerprint (0: free), then its bucket.
fn split_slot(state: Option<&[u8]>) -> (u64, Option<&[u8]>) {
    let owner = state.and_then(|s| u64_le(s, 0)).unwrap_or(0);
    (owner, state.and_then(|s| s.get(8..)))
}

fn admit_client(
    params: &Params,
    state: Option<&[u8]>,
    fingerprint: u64,
    now_ns: u64,
    cost: u64,
) -> (Option<Vec<u8>>, Verdict) {
    let (owner, rest) = split_slot(state);
    // Taking over a free or idle slot starts a fresh bucket; a busy slot of another client is
    // shared (the table is full of active clients).
    let (owner, rest) = if owner == fingerprint {
        (owner, rest)
    } else if owner == 0 || is_idle(params, rest, now_ns) {
        (fingerprint, None)
    } else {
        (owner, rest)
    };
    let (written, verdict) = admit_cost(params, rest, now_ns, cost);
    let written = written.map(|bucket| [&owner.to_le_bytes()[..], &bucket].concat());
    (written, verdict)
}

/// OpenAI's duration format for `x-ratelimit-reset-*`: "120ms", "7s", "6m0s".
pub fn openai_duration(ns: u64) -> String {
    let ms = ns.div_ceil(1_000_000);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ns.div_ceil(1_000_000_000);
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

/// Whole seconds for `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000).max(1)
}

#[cfg(test)]
mod tests;
