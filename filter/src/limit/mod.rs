//! Rate limits: which buckets a request draws from, in what order, and what the client is told.
//!
//! Every configured `rate-limit` block (global, per service, per instance) is compiled into a
//! `Limit`: what it covers, what one bucket counts (`scope`), and its numbers. A request draws
//! from every limit that covers it; all must admit, so the strictest wins. When one refuses, the
//! admissions already taken are given back, so a refused request costs nothing anywhere.
//!
//! Buckets live in shared data under keys created at configure time, so compare-and-swap is
//! exact from the first request. The buckets of limits that count the same subject share one
//! entry (`entry`): a model's request limit and token budget are drawn with one read and one
//! write. Per-client buckets live in a fixed table of `max-clients` slots: shared data never
//! grows with the number of clients.

pub mod bucket;
pub mod entry;
pub mod global;
pub mod rls;

use crate::bytes::{hash64, u64_le};
use crate::config::{ApiKeyEntry, RateLimitPolicy, Scope, ServiceConfig, TokenLimitPolicy};
use crate::endpoint::ServiceType;
use crate::shared_keys::LimitKeys;
use crate::store::{transact, SharedStore};
use bucket::{admit_cost, is_idle, refund, settle, Params, Verdict};
use std::cell::RefCell;
use std::rc::Rc;

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
    /// The key path of the block it is compiled from (a refusal of its numbers names it).
    pub block: String,
    /// Names its buckets inside their entries; it changes with the numbers, so a reload never
    /// reads foreign state.
    fingerprint: u64,
    /// Its buckets' shared-data keys.
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
    fn new(origin: Origin, covers: Covers, scope: Scope, policy: &RateLimitPolicy) -> Limit {
        Limit::build(
            origin,
            &place(covers, scope),
            covers,
            scope,
            Params::of(policy),
            policy.max_clients,
            Unit::Requests,
            0,
        )
    }

    fn tokens(block: String, covers: Covers, policy: &TokenLimitPolicy) -> Limit {
        let params = Params::tokens_per_minute(policy.tokens_per_minute);
        let (scope, clients, estimate) =
            (policy.scope, policy.max_clients, policy.completion_estimate);
        let place = place(covers, scope);
        Limit::build(
            Origin::block(block),
            &place,
            covers,
            scope,
            params,
            clients,
            Unit::Tokens,
            estimate,
        )
    }

    /// `place`: what kind of subject its buckets count, naming their entries (see `LimitKeys`).
    #[allow(clippy::too_many_arguments)]
    fn build(
        origin: Origin,
        place: &str,
        covers: Covers,
        scope: Scope,
        params: Params,
        max_clients: u64,
        unit: Unit,
        completion_estimate: u64,
    ) -> Limit {
        let Origin { block, name } = origin;
        let fingerprint = hash64(format!("{name}|{scope:?}|{params:?}|{max_clients}").as_bytes());
        Limit {
            name,
            block,
            fingerprint,
            keys: LimitKeys::new(place, fingerprint),
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

    /// The subject this limit counts the request under, in parts (`all`, a service,
    /// `service/model`, an instance, a client); `None` when the request has nothing to key it
    /// by (no client address for a per-client limit).
    fn label_parts<'s>(&self, subject: &Subject<'s>) -> Option<[&'s str; 3]> {
        Some(match self.scope {
            Scope::Global => ["all", "", ""],
            Scope::Service => [subject.service.key(), "", ""],
            Scope::Model => [subject.service.key(), "/", subject.model],
            Scope::Instance => [subject.instance?.1, "", ""],
            Scope::Client => [subject.client?, "", ""],
        })
    }

    /// The subject's label, as a 429 and the limits across replicas name it.
    fn label(&self, subject: &Subject<'_>) -> Option<String> {
        self.label_parts(subject).map(|parts| parts.concat())
    }

    /// The bucket for this request. Per request, an entry's key is its prefix and the label
    /// concatenated at once (`core::fmt` costs more than the copy); a 429 cuts the label from it.
    fn bucket(&self, subject: &Subject<'_>) -> Option<BucketKey> {
        let parts = self.label_parts(subject)?;
        Some(match (self.scope, parts) {
            (Scope::Client, [client, ..]) => {
                BucketKey::Client(hash64(client.as_bytes()).max(1), client.to_string())
            }
            _ => BucketKey::Fixed(Rc::from(self.keys.bucket_of(&parts))),
        })
    }

    /// The subject an entry's key names (its label: `all`, a service, a model, an instance).
    fn label_of<'k>(&self, key: &'k str) -> &'k str {
        key.strip_prefix(self.keys.entry_prefix()).unwrap_or(key)
    }

    fn fixed_key(&self, label: &str) -> String {
        self.keys.bucket(label)
    }

    fn client_slot(&self, slot: u64) -> String {
        self.keys.client_slot(slot)
    }
}

/// Where a limit comes from: its block's key path, and its name (the path, and " (per client)"
/// for the per-client twin of a block with `client-ip-enable`).
struct Origin {
    block: String,
    name: String,
}

impl Origin {
    fn block(block: String) -> Origin {
        Origin {
            name: block.clone(),
            block,
        }
    }

    fn per_client(block: String) -> Origin {
        Origin {
            name: format!("{block} (per client)"),
            block,
        }
    }
}

/// The entry a limit's buckets live in: the kind of subject they count, and whether they are
/// drawn after the pick (then apart from those drawn before, which would cost a second write).
fn place(covers: Covers, scope: Scope) -> String {
    let subject = match scope {
        Scope::Global => "global",
        Scope::Service => "service",
        Scope::Model => "model",
        Scope::Instance => "instance",
        Scope::Client => "client",
    };
    if matches!(covers, Covers::Instance(..)) && scope != Scope::Instance {
        format!("picked/{subject}")
    } else {
        subject.to_string()
    }
}

enum BucketKey {
    /// The entry of the subject (shared with the other limits counting it).
    Fixed(Rc<str>),
    /// A client's fingerprint (it finds its slot in the table), and the client as a 429 names it.
    Client(u64, String),
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
    /// The entry (or client slot) drawn from: shared by the grants of one entry and the refunds
    /// owed to it, so none of them copies it.
    key: Rc<str>,
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
    key: Rc<str>,
    tokens: u64,
}

impl Refunds {
    /// Adds `tokens` to what is owed to the limit's bucket in entry `key`; false when the table
    /// is full.
    fn owe(&mut self, limit: usize, key: &Rc<str>, tokens: u64) -> bool {
        if let Some(owed) = self
            .owed
            .iter_mut()
            .find(|o| o.limit == limit && o.key == *key)
        {
            owed.tokens = owed.tokens.saturating_add(tokens);
            return true;
        }
        if self.owed.len() >= MAX_OWED {
            return false;
        }
        self.owed.push(Owed {
            limit,
            key: Rc::clone(key),
            tokens,
        });
        true
    }

    /// What is owed to the limit's bucket in entry `key`, no longer owed.
    fn take(&mut self, limit: usize, key: &str) -> u64 {
        let Some(at) = self
            .owed
            .iter()
            .position(|o| o.limit == limit && &*o.key == key)
        else {
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
    /// `list`), the bucket's label and its entry's key; sorted by key.
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
    /// Whether `grant` was drawn from a token budget (settled from usage) rather than a limit
    /// on requests.
    pub fn is_token_grant(&self, grant: &Grant) -> bool {
        self.list
            .get(grant.limit)
            .is_some_and(|l| l.unit == Unit::Tokens)
    }

    /// Every enabled block, in the order they are drawn: API-key quotas first (a key over its
    /// quota is refused before it draws on shared limits), token budgets, then request limits.
    pub fn compile(
        global: Option<&RateLimitPolicy>,
        global_tokens: Option<&TokenLimitPolicy>,
        services: &[&ServiceConfig],
        api_keys: &[ApiKeyEntry],
    ) -> Limits {
        let mut list = api_key_quotas(api_keys);
        list.extend(token_budgets(global_tokens, services));
        request_limits(&mut list, global, services);
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
    /// a key that does not exist, so creating them on first use would race): each subject's
    /// entry with a fresh bucket of every limit counting it, and every per-client slot.
    pub fn initial_keys(&self) -> Vec<(String, Vec<u8>)> {
        let mut keys = Vec::new();
        for limit in self.list.iter().filter(|l| l.scope == Scope::Client) {
            let slot_state = [&[0u8; 8][..], &limit.params.initial_state()].concat();
            for slot in 0..limit.max_clients {
                keys.push((limit.client_slot(slot), slot_state.clone()));
            }
        }
        for (key, limits) in self.entries() {
            let fresh: Vec<(u64, Vec<u8>)> = limits
                .iter()
                .map(|l| (l.fingerprint, l.params.initial_state()))
                .collect();
            keys.push((key.to_string(), entry::encode(&[], &fresh)));
        }
        keys
    }

    /// Every entry with the limits whose buckets it holds (`fixed` is sorted by key).
    fn entries(&self) -> Vec<(&str, Vec<&Limit>)> {
        let mut entries: Vec<(&str, Vec<&Limit>)> = Vec::new();
        for (index, _, key) in &self.fixed {
            let Some(limit) = self.list.get(*index) else {
                continue;
            };
            match entries.last_mut() {
                Some((last, limits)) if *last == key.as_str() => limits.push(limit),
                _ => entries.push((key, vec![limit])),
            }
        }
        entries
    }

    /// Drops the records of limits this plan does not have from the entries it keeps (a reload
    /// changed or removed them); every other record keeps its state.
    pub fn prune_entries(&self, store: &dyn SharedStore) {
        for (key, limits) in self.entries() {
            let _ = transact(store, key, |state| {
                let records = entry::parse(state);
                let kept: Vec<(u64, &[u8])> = records
                    .iter()
                    .filter(|(f, _)| limits.iter().any(|l| l.fingerprint == *f))
                    .copied()
                    .collect();
                let written = (kept.len() < records.len()).then(|| entry::encode(&kept, &[]));
                (written, ())
            });
        }
    }

    /// What every bucket would admit right now, read without drawing (the status page).
    /// Per-client tables are not walked: they may hold many thousands of slots.
    pub fn levels(&self, store: &dyn SharedStore, now_ns: u64) -> Vec<Level> {
        self.fixed
            .iter()
            .filter_map(|(index, bucket, key)| {
                let limit = self.list.get(*index)?;
                let state = store.get(key).0;
                let records = entry::parse(state.as_deref());
                let record = entry::find(&records, limit.fingerprint);
                let (_, verdict) = admit_cost(&limit.params, record, now_ns, 1);
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
    /// bucket). The limits counting one subject are drawn together, in one compare-and-swap of
    /// their entry. On a refusal the admissions taken here are given back.
    pub fn acquire(
        &self,
        store: &dyn SharedStore,
        refunds: &RefCell<Refunds>,
        subject: &Subject<'_>,
        phase: Phase,
        now_ns: u64,
        tokens: u64,
    ) -> Result<Admitted, Refusal> {
        let groups = self.groups(subject, phase, tokens);
        let mut admitted = Admitted::default();
        for group in &groups {
            // A store that fails must not fail the request: the limits are skipped.
            let Some((key, outcome)) = self.draw_group(store, refunds, group, now_ns) else {
                for draw in &group.draws {
                    log::warn!(
                        "rate limit {}: shared data unavailable, not enforced",
                        draw.limit.name
                    );
                }
                continue;
            };
            let verdicts = match outcome {
                Ok(verdicts) => verdicts,
                Err((at, verdict)) => {
                    self.release(store, &admitted.grants);
                    return Err(group.refusal(at, verdict));
                }
            };
            for (draw, verdict) in group.draws.iter().zip(verdicts) {
                let roomy = verdict.remaining >= draw.limit.params.limit() / 2;
                admitted.note(draw.index, draw.limit.unit, verdict);
                admitted.grants.push(Grant {
                    limit: draw.index,
                    key: Rc::clone(&key),
                    at_ns: now_ns,
                    cost: draw.cost,
                    roomy,
                });
            }
        }
        Ok(admitted)
    }

    /// The limits of `phase` that cover the request, grouped by the bucket they draw from (the
    /// limits counting one subject share an entry): one request each from request limits,
    /// `tokens` from token budgets.
    fn groups(&self, subject: &Subject<'_>, phase: Phase, tokens: u64) -> Vec<Group<'_>> {
        let mut groups: Vec<Group<'_>> = Vec::new();
        for (index, limit) in self.list.iter().enumerate() {
            if limit.after_pick() != (phase == Phase::AfterPick) || !limit.covers(subject) {
                continue;
            }
            let cost = match limit.unit {
                Unit::Requests => 1,
                Unit::Tokens => tokens,
            };
            let draw = Draw { index, limit, cost };
            // The same entry as an earlier limit's (the same place, so the same label): its
            // key is not made again.
            let entry = (limit.scope != Scope::Client).then(|| limit.keys.entry_prefix());
            if let Some(group) = groups
                .iter_mut()
                .find(|g| entry.is_some() && g.entry == entry)
            {
                group.draws.push(draw);
                continue;
            }
            let Some(key) = limit.bucket(subject) else {
                continue;
            };
            groups.push(Group {
                entry,
                bucket: key,
                draws: vec![draw],
            });
        }
        groups
    }

    /// Draws a group's limits from its bucket in one compare-and-swap: the key drawn from and
    /// the verdicts; `None` when the store failed.
    fn draw_group(
        &self,
        store: &dyn SharedStore,
        refunds: &RefCell<Refunds>,
        group: &Group<'_>,
        now_ns: u64,
    ) -> Option<(Rc<str>, EntryOutcome)> {
        match &group.bucket {
            BucketKey::Fixed(key) => {
                let outcome = draw_entry(store, refunds, key, &group.draws, now_ns)?;
                Some((Rc::clone(key), outcome))
            }
            BucketKey::Client(fingerprint, _) => {
                let draw = group.draws.first()?;
                let limit = draw.limit;
                let key = self.client_key(store, limit, *fingerprint, now_ns);
                let verdict = transact(store, &key, |state| {
                    admit_client(&limit.params, state, *fingerprint, now_ns, draw.cost)
                })?;
                let outcome = if verdict.admitted {
                    Ok(vec![verdict])
                } else {
                    Err((0, verdict))
                };
                Some((Rc::from(key), outcome))
            }
        }
    }

    /// Gives admissions back (the request was refused by another limit, or never sent): one
    /// write per entry.
    pub fn release<'a>(
        &self,
        store: &dyn SharedStore,
        grants: impl IntoIterator<Item = &'a Grant>,
    ) {
        let grants: Vec<(&Grant, i64)> = grants.into_iter().map(|g| (g, 0)).collect();
        self.rewrite(store, &grants, &|limit, state, grant, _| {
            refund(&limit.params, state, grant.at_ns, grant.cost)
        });
    }

    /// Settles the token budgets a request drew from, now that it really used `used` tokens: a
    /// debt at once, a refund owed (see `Refunds`) where the bucket is not a client's, the draw
    /// left it roomy and `refunds` can take it. What is settled at once is one write per entry.
    pub fn settle_tokens(
        &self,
        store: &dyn SharedStore,
        mut refunds: Option<&mut Refunds>,
        grants: &[Grant],
        used: u64,
        now_ns: u64,
    ) {
        let mut now = Vec::new();
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
            if delta < 0 && limit.scope != Scope::Client && grant.roomy {
                if let Some(refunds) = refunds.as_deref_mut() {
                    if refunds.owe(grant.limit, &grant.key, delta.unsigned_abs()) {
                        continue;
                    }
                }
            }
            now.push((grant, delta));
        }
        self.rewrite(store, &now, &|limit, state, _, delta| {
            settle(&limit.params, state, now_ns, delta)
        });
    }

    /// Pays every refund this VM owes (its tick, or before a reload replaces the plan the
    /// refunds were drawn under), one write per entry. What the store will not take stays owed.
    pub fn pay_refunds(&self, store: &dyn SharedStore, refunds: &mut Refunds, now_ns: u64) {
        let owed = std::mem::take(&mut refunds.owed);
        for (at, first) in owed.iter().enumerate() {
            // Each entry once, with everything owed to it.
            if owed.iter().take(at).any(|o| o.key == first.key) {
                continue;
            }
            let to_entry = || owed.iter().filter(|o| o.key == first.key);
            let paid = transact(store, &first.key, |state| {
                let records = entry::parse(state);
                let changed: Vec<(u64, Vec<u8>)> = to_entry()
                    .filter_map(|o| {
                        let limit = self.list.get(o.limit)?;
                        let record = entry::find(&records, limit.fingerprint);
                        let repaid = settle(&limit.params, record, now_ns, negative(o.tokens));
                        Some((limit.fingerprint, repaid))
                    })
                    .collect();
                (Some(entry::encode(&records, &changed)), ())
            });
            if paid.is_none() {
                for o in to_entry().filter(|o| self.list.get(o.limit).is_some()) {
                    refunds.owe(o.limit, &o.key, o.tokens);
                }
            }
        }
    }

    /// Rewrites the buckets of `grants` with `change` (given each grant's delta): one
    /// compare-and-swap per entry, one per client slot.
    fn rewrite(
        &self,
        store: &dyn SharedStore,
        grants: &[(&Grant, i64)],
        change: &BucketChange<'_>,
    ) {
        let mut by_key: Vec<(&str, Vec<(&Grant, i64)>)> = Vec::new();
        for &(grant, delta) in grants {
            match by_key.iter_mut().find(|(k, _)| *k == &*grant.key) {
                Some((_, list)) => list.push((grant, delta)),
                None => by_key.push((&grant.key, vec![(grant, delta)])),
            }
        }
        for (key, list) in by_key {
            let limit_of = |grant: &Grant| self.list.get(grant.limit);
            let _ = transact(store, key, |state| {
                let client = match list.as_slice() {
                    [(grant, delta)] => limit_of(grant)
                        .filter(|l| l.scope == Scope::Client)
                        .map(|l| (l, grant, *delta)),
                    _ => None,
                };
                let written = if let Some((limit, grant, delta)) = client {
                    let (fingerprint, rest) = split_slot(state);
                    let bucket = change(limit, rest, grant, delta);
                    [&fingerprint.to_le_bytes()[..], &bucket].concat()
                } else {
                    let records = entry::parse(state);
                    let changed: Vec<(u64, Vec<u8>)> = list
                        .iter()
                        .filter_map(|(grant, delta)| {
                            let limit = limit_of(grant)?;
                            let record = entry::find(&records, limit.fingerprint);
                            Some((limit.fingerprint, change(limit, record, grant, *delta)))
                        })
                        .collect();
                    entry::encode(&records, &changed)
                };
                (Some(written), ())
            });
        }
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

/// How `Limits::rewrite` changes a bucket: given its limit, its state, the grant and the
/// grant's delta, the state to write.
type BucketChange<'a> = dyn Fn(&Limit, Option<&[u8]>, &Grant, i64) -> Vec<u8> + 'a;

/// One limit a request draws from.
struct Draw<'a> {
    /// Index into `Limits::list`.
    index: usize,
    limit: &'a Limit,
    /// 1 request, or the tokens reserved.
    cost: u64,
}

/// The limits a request draws from one bucket key: an entry (one or more limits counting the
/// same subject) or a client's slot (one limit).
struct Group<'a> {
    /// The entry's place (`LimitKeys::entry_prefix`); `None` for a client's slot.
    entry: Option<&'a str>,
    bucket: BucketKey,
    draws: Vec<Draw<'a>>,
}

impl Group<'_> {
    /// The refusal of the draw at `at`, naming the bucket as a 429 does.
    fn refusal(&self, at: usize, verdict: Verdict) -> Refusal {
        let refused = self.draws.get(at);
        let label = match &self.bucket {
            BucketKey::Client(_, client) => client.as_str(),
            BucketKey::Fixed(key) => refused.map_or(&**key, |d| d.limit.label_of(key)),
        };
        Refusal {
            limit: refused.map_or(0, |d| d.index),
            label: label.to_string(),
            verdict,
        }
    }
}

/// The verdicts of an entry's draws, in order, or the first refusal (which draw, its verdict).
type EntryOutcome = Result<Vec<Verdict>, (usize, Verdict)>;

/// Draws from the buckets of one entry in one compare-and-swap, paying first what this VM owes
/// them: all admit, or nothing but the refunds is written. `None` when the store failed.
fn draw_entry(
    store: &dyn SharedStore,
    refunds: &RefCell<Refunds>,
    key: &Rc<str>,
    draws: &[Draw<'_>],
    now_ns: u64,
) -> Option<EntryOutcome> {
    // Taken out before the write, owed again if the write fails: never paid twice.
    let owed: Vec<u64> = draws
        .iter()
        .map(|d| match (d.limit.unit, refunds.try_borrow_mut()) {
            (Unit::Tokens, Ok(mut refunds)) => refunds.take(d.index, key),
            _ => 0,
        })
        .collect();
    let outcome = transact(store, key, |state| {
        let records = entry::parse(state);
        let mut drawn = Vec::with_capacity(draws.len());
        let mut verdicts = Vec::with_capacity(draws.len());
        for (at, (draw, owing)) in draws.iter().zip(&owed).enumerate() {
            let (params, fingerprint) = (&draw.limit.params, draw.limit.fingerprint);
            let record = entry::find(&records, fingerprint);
            let paid = (*owing > 0).then(|| settle(params, record, now_ns, negative(*owing)));
            let (written, verdict) =
                admit_cost(params, paid.as_deref().or(record), now_ns, draw.cost);
            if !verdict.admitted {
                // Nothing drawn is written; what was owed is paid all the same.
                let repaid: Vec<(u64, Vec<u8>)> = draws
                    .iter()
                    .zip(&owed)
                    .filter(|(_, owing)| **owing > 0)
                    .map(|(d, owing)| {
                        let record = entry::find(&records, d.limit.fingerprint);
                        let paid = settle(&d.limit.params, record, now_ns, negative(*owing));
                        (d.limit.fingerprint, paid)
                    })
                    .collect();
                let written = (!repaid.is_empty()).then(|| entry::encode(&records, &repaid));
                return (written, Err((at, verdict)));
            }
            if let Some(state) = written.or(paid) {
                drawn.push((fingerprint, state));
            }
            verdicts.push(verdict);
        }
        let written = (!drawn.is_empty()).then(|| entry::encode(&records, &drawn));
        (written, Ok(verdicts))
    });
    if outcome.is_none() {
        if let Ok(mut refunds) = refunds.try_borrow_mut() {
            for (draw, owed) in draws.iter().zip(owed).filter(|(_, o)| *o > 0) {
                refunds.owe(draw.index, key, owed);
            }
        }
    }
    outcome
}

/// Each API key's quotas (`rate-limit-per-minute`, `daily-request-limit`, `tokens-per-minute`,
/// `daily-token-limit`; 0 for none), covering the requests made with it.
fn api_key_quotas(api_keys: &[ApiKeyEntry]) -> Vec<Limit> {
    let mut list = Vec::new();
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
            let estimate = match unit {
                Unit::Tokens => KEY_COMPLETION_ESTIMATE,
                Unit::Requests => 0,
            };
            list.push(Limit::build(
                Origin::block(format!(
                    "jairouter.security.api-key.keys[{}].{field}",
                    key.id
                )),
                &format!("api-key/{}", key.id),
                Covers::ApiKey(at),
                Scope::Global,
                Params::per_period(amount, period),
                1,
                unit,
                estimate,
            ));
        }
    }
    list
}

/// The enabled `token-limit` blocks: the global one, then each service's.
fn token_budgets(global: Option<&TokenLimitPolicy>, services: &[&ServiceConfig]) -> Vec<Limit> {
    let of_services = services.iter().filter_map(|service| {
        let policy = service.spec.token_limit.as_ref()?;
        let kind = service.spec.kind;
        let block = format!("model.services.{}.token-limit", kind.key());
        Some((block, Covers::Service(kind), policy))
    });
    global
        .map(|policy| ("model.token-limit".to_string(), Covers::All, policy))
        .into_iter()
        .chain(of_services)
        .filter(|(_, _, policy)| policy.enabled)
        .map(|(block, covers, policy)| Limit::tokens(block, covers, policy))
        .collect()
}

/// The enabled `rate-limit` blocks: global, per service, per instance; each after its
/// per-client twin when `client-ip-enable` asks for one.
fn request_limits(
    list: &mut Vec<Limit>,
    global: Option<&RateLimitPolicy>,
    services: &[&ServiceConfig],
) {
    let mut add = |block: String, covers: Covers, policy: &RateLimitPolicy| {
        if !policy.enabled {
            return;
        }
        if policy.client_ip_enable && policy.scope != Scope::Client {
            let twin = Origin::per_client(block.clone());
            list.push(Limit::new(twin, covers, Scope::Client, policy));
        }
        list.push(Limit::new(
            Origin::block(block),
            covers,
            policy.scope,
            policy,
        ));
    };
    if let Some(policy) = global {
        add("model.rate-limit".to_string(), Covers::All, policy);
    }
    for service in services {
        let kind = service.spec.kind;
        let path = format!("model.services.{}", kind.key());
        if let Some(policy) = &service.spec.rate_limit {
            add(format!("{path}.rate-limit"), Covers::Service(kind), policy);
        }
        for (at, instance) in service.instances.iter().enumerate() {
            if let Some(policy) = &instance.rate_limit {
                let block = format!("{path}.instances[{at}].rate-limit");
                add(block, Covers::Instance(kind, at), policy);
            }
        }
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
                Covers::Service(kind) | Covers::Instance(kind, _) => kind == service.spec.kind,
                Covers::ApiKey(_) => false,
            };
            if !covered {
                continue;
            }
            let labels: Vec<String> = match limit.scope {
                Scope::Global => vec!["all".to_string()],
                Scope::Service => vec![service.spec.kind.key().to_string()],
                Scope::Model => service
                    .models
                    .iter()
                    .map(|m| format!("{}/{m}", service.spec.kind.key()))
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
    // A limit over every service counts the same bucket for each: once. Sorted by key, so the
    // limits sharing an entry are neighbours.
    buckets.sort_by(|a, b| a.2.cmp(&b.2).then(a.0.cmp(&b.0)));
    buckets.dedup_by(|a, b| a.2 == b.2 && a.0 == b.0);
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
