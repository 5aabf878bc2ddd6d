//! What to do with a request: answer it here, route it now, or read its body for the model.
//! Plain Rust over the compiled configuration; the proxy-wasm binding only carries bytes in and
//! decisions out.

use crate::auth::{ApiKey, AuthError};
use crate::balance::{pick_instance, PickInput, Rotations};
use crate::breaker::{self, Admission, Outcome};
use crate::config::{Algorithm, Strategy, MAX_MODEL_NAME_BYTES};
use crate::endpoint::{classify, Endpoint, Route, ServiceType};
use crate::limit::bucket::Verdict;
use crate::limit::{
    openai_duration, retry_after_secs, Grant, Phase, Refunds, Refusal, Subject, Unit,
};
use crate::plan::{model_object, models_list_json_where, Instance, Plan};
use crate::reply::{ClientError, LocalReply, DEFAULT_RETRY_AFTER_SECS};
use crate::scan::json::JsonModelScanner;
use crate::scan::multipart::{boundary_from_content_type, MultipartModelScanner};
use crate::scan::ScanOutcome;
use crate::store::SharedStore;
use std::cell::RefCell;

/// Part headers above this are refused (the model part's headers are a few dozen bytes).
const MAX_PART_HEADER_BYTES: usize = 16 * 1024;

/// Instances tried when instance-level limits refuse.
const MAX_INSTANCE_TRIES: usize = 3;

/// The request line and the headers the decision needs.
#[derive(Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub content_type: Option<&'a str>,
    pub model_header: Option<&'a str>,
    /// True when the request has no body.
    pub end_of_stream: bool,
    /// Any other request header, by lower-case name (header-hash reads its configured one).
    pub header: &'a dyn Fn(&str) -> Option<String>,
    /// `content-length`, when the client sent one (a token budget's prompt estimate).
    pub content_length: Option<u64>,
}

/// What besides the model shapes the pick and the limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras<'a> {
    /// header-hash key.
    pub hash_key: Option<&'a str>,
    /// The body's size, for the prompt estimate of token budgets.
    pub body_bytes: Option<u64>,
    /// The request's `max_tokens` (or `max_completion_tokens`).
    pub max_tokens: Option<u64>,
    /// Whether the model came from a JSON body the binding can rewrite: only then may a
    /// fallback model stand in (the backend must be asked for the model it serves).
    pub model_rewritable: bool,
}

/// Body fields a token budget reads for the completion estimate.
const MAX_TOKENS_FIELDS: [&str; 2] = ["max_completion_tokens", "max_tokens"];

/// Tokens a request reserved from token budgets, settled when its usage is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReservation {
    pub reserved: u64,
    /// The prompt part of the reservation: what is charged for the prompt when the response
    /// reports no usage.
    pub prompt_estimate: u64,
    /// The token budgets' admissions (the request's other admissions are `Routed::grants`).
    pub grants: Vec<Grant>,
}

/// Where a request goes: the instance (by index in its service) and the upstream `:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub service: ServiceType,
    pub endpoint: Endpoint,
    pub model: String,
    pub instance: usize,
    pub path: String,
    /// Response headers to add (the rate-limit state the request met).
    pub headers: Vec<(&'static str, String)>,
    /// Token budgets to settle from the response's usage.
    pub tokens: Option<TokenReservation>,
    /// How the instance's circuit breaker let the request through (when it has one): what the
    /// end of the exchange must be counted against.
    pub breaker: Option<Admission>,
    /// The model the client asked for, when `model` is a fallback standing in for it.
    pub fallback_from: Option<String>,
    /// The rate limits that let it through (indices into `Limits::list`; a metrics label).
    pub limits_passed: Vec<usize>,
    /// The admissions it holds but the token budgets' (`TokenReservation::grants`): both are
    /// given back if the limits across replicas refuse it.
    pub grants: Vec<Grant>,
}

pub enum HeadDecision {
    Reply(LocalReply),
    Route(Routed),
    ScanBody(Box<BodyScan>),
}

/// The choices that depend on the host and the caller: shared data, randomness, the clock,
/// the client.
pub struct RouteInputs<'a> {
    pub store: &'a dyn SharedStore,
    /// The token refunds this VM owes (paid with the next draw from their bucket).
    pub refunds: &'a RefCell<Refunds>,
    /// Where this VM's round-robin rotations stand.
    pub rotations: &'a RefCell<Rotations>,
    pub random: u64,
    /// The time in ns, asked only by a decision that needs it (the binding caches it per
    /// callback: a request answered or held without it never reads the clock).
    pub clock: &'a dyn Fn() -> u64,
    /// Envoy's view of the client address, without the port (ip-hash, consistent-hash).
    pub client: Option<&'a str>,
    /// The API key the request authenticated with (`authenticate`), by index: its quotas.
    pub api_key: Option<usize>,
    /// What the caller may use (its API key, or what its verified token grants).
    pub caller: Option<&'a ApiKey>,
}

/// Who calls, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Neither API keys nor tokens are configured.
    Anyone,
    /// A configured API key, by index.
    Key(usize),
    /// A JWT Envoy's jwt_authn verified, with what its claims grant.
    Token(ApiKey),
}

impl Caller {
    pub fn key_index(&self) -> Option<usize> {
        match self {
            Caller::Key(at) => Some(*at),
            _ => None,
        }
    }

    /// What the caller may use (`None`: anything).
    pub fn grants<'a>(&'a self, cfg: &'a Plan) -> Option<&'a ApiKey> {
        match self {
            Caller::Anyone => None,
            Caller::Key(at) => cfg.api_keys.keys().get(*at),
            Caller::Token(grants) => Some(grants),
        }
    }
}

/// The claims of a token Envoy's jwt_authn verified (`gateway.jwt`).
#[derive(Debug, Clone, Default)]
pub struct TokenClaims {
    pub subject: String,
    pub permissions: Vec<String>,
    pub models: Option<Vec<String>>,
}

/// Who calls: a token Envoy verified (`token`, when `gateway.jwt` is set), else the configured
/// API key the request presents (`Authorization: Bearer` or the configured header). Refusals
/// are 401, or 403 for a key used from an address it is not allowed from.
pub fn authenticate(
    cfg: &Plan,
    authorization: Option<&str>,
    api_key_header: Option<&str>,
    client: Option<&str>,
    now_ns: u64,
    token: Option<TokenClaims>,
) -> Result<Caller, LocalReply> {
    if let Some(claims) = token {
        let grants = ApiKey::for_token(&claims.subject, &claims.permissions, claims.models);
        return Ok(Caller::Token(grants));
    }
    let keys = &cfg.api_keys;
    let refuse = |e: AuthError| e.reply().because(e.code());
    if !keys.enabled() {
        return match cfg.gateway.jwt {
            Some(_) => Err(refuse(AuthError::InvalidToken)),
            None => Ok(Caller::Anyone),
        };
    }
    let presented = crate::auth::presented_key(authorization, api_key_header);
    match keys.authenticate(presented, client, now_ns / 1_000_000_000) {
        Ok(key) => Ok(keys.index_of(key).map_or(Caller::Anyone, Caller::Key)),
        Err(e) => Err(refuse(e)),
    }
}

/// Refuses a request its caller may not make (403).
fn permitted(
    host: &RouteInputs<'_>,
    kind: ServiceType,
    model: Option<&str>,
) -> Result<(), LocalReply> {
    let Some(key) = host.caller else {
        return Ok(());
    };
    key.permits(kind, model).map_err(|e| {
        let mut reply = e.reply().because(e.code());
        reply.service = Some(kind);
        reply
    })
}

impl RouteInputs<'_> {
    pub fn now_ns(&self) -> u64 {
        (self.clock)()
    }

    fn pick_input<'k>(&'k self, hash_key: Option<&'k str>) -> PickInput<'k> {
        PickInput {
            random: self.random,
            now_ns: self.now_ns(),
            client: self.client,
            hash_key,
        }
    }
}

pub fn on_request_headers(
    cfg: &Plan,
    head: &RequestHead<'_>,
    host: &RouteInputs<'_>,
) -> HeadDecision {
    let (route, model_id) = classify(head.path);
    let endpoint = match route {
        Route::Model(endpoint) => endpoint,
        Route::ListModels | Route::RetrieveModel => {
            if head.method != "GET" && head.method != "HEAD" {
                return HeadDecision::Reply(method_not_allowed(head, "GET"));
            }
            return HeadDecision::Reply(if route == Route::ListModels {
                list_models(cfg, host.caller)
            } else {
                retrieve_model(cfg, model_id, host.caller)
            });
        }
        Route::Unknown => {
            return HeadDecision::Reply(LocalReply::error(
                ClientError::UnknownUrl,
                &format!(
                    "Unknown request URL: {} {}. This gateway serves the OpenAI API under /v1/ and /api/v1/.",
                    head.method,
                    head.path.split('?').next().unwrap_or_default()
                ),
            ))
        }
    };
    if head.method != "POST" {
        return HeadDecision::Reply(method_not_allowed(head, "POST"));
    }
    if cfg.service(endpoint.service()).is_none() {
        return HeadDecision::Reply(service_missing(cfg, endpoint));
    }
    if let Err(reply) = permitted(host, endpoint.service(), None) {
        return HeadDecision::Reply(reply);
    }
    let query = query_of(head.path);
    let model = head.model_header.map(str::trim).filter(|m| !m.is_empty());
    // header-hash keys the ring by a header, else by a body field (which means reading the body
    // for it, even when the model came in a header).
    let lb = cfg.service(endpoint.service()).map(|s| &s.load_balance);
    let hash_key = match lb {
        Some(lb) if lb.strategy == Strategy::HeaderHash => lb
            .hash_header
            .as_deref()
            .and_then(|name| (head.header)(name))
            .filter(|v| !v.is_empty()),
        _ => None,
    };
    let body_field = match lb {
        Some(lb) if lb.strategy == Strategy::HeaderHash && hash_key.is_none() => {
            lb.hash_field.as_deref()
        }
        _ => None,
    };
    let token_limited = cfg
        .limits
        .completion_estimate(endpoint.service(), host.api_key)
        .is_some();
    if let Some(model) = model {
        if body_field.is_none() || head.end_of_stream {
            let extras = Extras {
                hash_key: hash_key.as_deref(),
                body_bytes: head.content_length,
                max_tokens: None,
                model_rewritable: false,
            };
            return match route_model(cfg, endpoint, model, query, host, &extras) {
                Ok(routed) => HeadDecision::Route(routed),
                Err(reply) => HeadDecision::Reply(reply),
            };
        }
    }
    if head.end_of_stream {
        return HeadDecision::Reply(missing_model());
    }
    let scanner = match head.content_type {
        Some(ct) if is_multipart(ct) => match boundary_from_content_type(ct) {
            Some(boundary) => {
                let scanner = MultipartModelScanner::new(
                    &boundary,
                    MAX_MODEL_NAME_BYTES,
                    MAX_PART_HEADER_BYTES,
                );
                Scanner::Multipart(match body_field {
                    Some(field) => scanner.with_field(field),
                    None => scanner,
                })
            }
            None => {
                return HeadDecision::Reply(LocalReply::error(
                    ClientError::InvalidMultipart,
                    "multipart/form-data request without a valid boundary",
                ))
            }
        },
        _ => {
            let mut scanner = JsonModelScanner::new(MAX_MODEL_NAME_BYTES);
            if let Some(field) = body_field {
                scanner = scanner.with_field(field);
            }
            // A token budget reserves what the request asks for: read `max_tokens` too, which
            // means reading the JSON to its end (within max-body-bytes) when it has none.
            if token_limited && model.is_none() {
                for field in MAX_TOKENS_FIELDS {
                    scanner = scanner.with_field(field);
                }
            }
            Scanner::Json(scanner)
        }
    };
    HeadDecision::ScanBody(Box::new(BodyScan {
        endpoint,
        query: query.to_string(),
        scanner,
        limit: cfg.gateway.max_body_bytes,
        model_from_header: model.map(str::to_string),
        hash_key_from_header: hash_key,
        hash_field: body_field.map(str::to_string),
        content_length: head.content_length,
    }))
}

fn is_multipart(content_type: &str) -> bool {
    content_type
        .trim_start()
        .get(..19)
        .is_some_and(|t| t.eq_ignore_ascii_case("multipart/form-data"))
}

fn query_of(path: &str) -> &str {
    path.split_once('?').map(|(_, q)| q).unwrap_or("")
}

enum Scanner {
    Json(JsonModelScanner),
    Multipart(MultipartModelScanner),
}

/// A request body being read for its model, chunk by chunk.
pub struct BodyScan {
    endpoint: Endpoint,
    query: String,
    scanner: Scanner,
    limit: u64,
    /// The `x-jairouter-model` override, when the body is read only for the hash field.
    model_from_header: Option<String>,
    /// The header-hash key, when the configured header carried it.
    hash_key_from_header: Option<String>,
    /// The body field that keys header-hash, when the header did not.
    hash_field: Option<String>,
    content_length: Option<u64>,
}

pub enum BodyStep {
    /// Keep buffering; call again with the next bytes.
    NeedMore,
    Route(Routed),
    Reply(LocalReply),
}

impl BodyScan {
    /// Where the model's JSON string sits in the body (what a fallback rewrites).
    pub fn model_span(&self) -> Option<(usize, usize)> {
        match &self.scanner {
            Scanner::Json(s) => s.model_span(),
            Scanner::Multipart(_) => None,
        }
    }

    /// How many body bytes may be buffered while looking for the model.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// How much the next read of the body should take: `window` until the model is read, then
    /// the rest of the lookahead for extra fields in one read (no point in smaller ones).
    pub fn next_read(&self, window: usize) -> usize {
        match &self.scanner {
            Scanner::Json(s) => s
                .lookahead_left()
                .filter(|&left| left > 0)
                .unwrap_or(window),
            Scanner::Multipart(_) => window,
        }
    }

    /// Feeds the next bytes; stops being interesting as soon as the outcome is not `NeedMore`.
    pub fn feed(&mut self, chunk: &[u8]) -> ScanOutcome {
        match &mut self.scanner {
            Scanner::Json(s) => s.feed(chunk),
            Scanner::Multipart(s) => s.feed(chunk),
        }
    }

    /// Decides after feeding the bytes available now. `buffered` is the body size Envoy holds,
    /// `end_of_stream` whether that is the whole body.
    pub fn decide(
        &mut self,
        outcome: ScanOutcome,
        buffered: u64,
        end_of_stream: bool,
        cfg: &Plan,
        host: &RouteInputs<'_>,
    ) -> BodyStep {
        let held = match &self.scanner {
            Scanner::Json(s) => s.model().map(str::to_string),
            Scanner::Multipart(_) => None,
        };
        let outcome = match outcome {
            // The model is known and only optional fields were still sought: go without them.
            ScanOutcome::NeedMore if buffered > self.limit && held.is_some() => {
                ScanOutcome::Found(held.unwrap_or_default())
            }
            ScanOutcome::NeedMore if buffered > self.limit => {
                return BodyStep::Reply(too_large(self.limit));
            }
            ScanOutcome::NeedMore if end_of_stream => match &mut self.scanner {
                Scanner::Json(s) => s.finish(),
                Scanner::Multipart(s) => s.finish(),
            },
            other => other,
        };
        let from_body = self.model_from_header.is_none();
        let model = match outcome {
            ScanOutcome::NeedMore => return BodyStep::NeedMore,
            ScanOutcome::Found(model) => self.model_from_header.take().unwrap_or(model),
            ScanOutcome::Absent => match self.model_from_header.take() {
                Some(model) => model,
                None => return BodyStep::Reply(missing_model()),
            },
            ScanOutcome::Invalid(reason) => return BodyStep::Reply(self.invalid(&reason)),
        };
        let hash_field = self.hash_field.as_deref().unwrap_or_default();
        let hash_key = match &self.scanner {
            _ if self.hash_key_from_header.is_some() => self.hash_key_from_header.as_deref(),
            Scanner::Json(s) => s.field(hash_field),
            Scanner::Multipart(s) => s.field(),
        };
        let max_tokens = match &self.scanner {
            Scanner::Json(s) => MAX_TOKENS_FIELDS
                .iter()
                .find_map(|f| s.field(f).and_then(|v| v.parse::<u64>().ok())),
            Scanner::Multipart(_) => None,
        };
        let extras = Extras {
            hash_key,
            body_bytes: self.content_length.or(Some(buffered)),
            max_tokens,
            model_rewritable: from_body && matches!(self.scanner, Scanner::Json(_)),
        };
        match route_model(cfg, self.endpoint, &model, &self.query, host, &extras) {
            Ok(routed) => BodyStep::Route(routed),
            Err(reply) => BodyStep::Reply(reply),
        }
    }

    fn invalid(&self, reason: &str) -> LocalReply {
        let error = match self.scanner {
            Scanner::Json(_) => ClientError::InvalidJson,
            Scanner::Multipart(_) => ClientError::InvalidMultipart,
        };
        LocalReply::error(error, &format!("Invalid request body: {reason}"))
    }
}

/// Finds the model's pool in the endpoint's service and picks an instance.
pub fn route_model(
    cfg: &Plan,
    endpoint: Endpoint,
    model: &str,
    query: &str,
    host: &RouteInputs<'_>,
    extras: &Extras<'_>,
) -> Result<Routed, LocalReply> {
    let kind = endpoint.service();
    let refused = |mut reply: LocalReply| {
        reply.service = Some(kind);
        reply.model = cfg
            .service(kind)
            .and_then(|s| s.models.get_key_value(model))
            .map(|(name, _)| name.clone());
        reply
    };
    permitted(host, kind, Some(model)).map_err(refused)?;
    let reply = match route_to_instance(cfg, endpoint, model, query, host, extras) {
        Ok(routed) => return Ok(routed),
        Err(reply) => refused(reply),
    };
    if reply.limited_by.is_some() {
        return Err(reply);
    }
    // None of the model's instances can take it (or the model is unknown, which finds no
    // fallback list): its fallback models, in order.
    let stand_ins = cfg
        .service(endpoint.service())
        .and_then(|s| s.fallbacks.get(model))
        .filter(|_| extras.model_rewritable);
    for stand_in in stand_ins.into_iter().flatten() {
        if let Ok(mut routed) = route_to_instance(cfg, endpoint, stand_in, query, host, extras) {
            routed.fallback_from = Some(model.to_string());
            return Ok(routed);
        }
    }
    Err(reply)
}

fn route_to_instance(
    cfg: &Plan,
    endpoint: Endpoint,
    model: &str,
    query: &str,
    host: &RouteInputs<'_>,
    extras: &Extras<'_>,
) -> Result<Routed, LocalReply> {
    let kind = endpoint.service();
    let service = cfg
        .service(kind)
        .ok_or_else(|| service_missing(cfg, endpoint))?;
    let pool = service
        .models
        .get(model)
        .ok_or_else(|| unknown_model(cfg, endpoint, model))?;
    let no_instance = || {
        LocalReply::no_instance(
            &format!("The model `{model}` has no active instance right now."),
            DEFAULT_RETRY_AFTER_SECS,
        )
        .because("no active instance")
    };
    let limits = &cfg.limits;
    let mut subject = Subject {
        service: kind,
        model,
        client: host.client,
        instance: None,
        api_key: host.api_key,
    };
    // A token budget reserves the prompt (about 4 bytes a token) and the completion asked for.
    let tokens = match limits.completion_estimate(kind, host.api_key) {
        Some(estimate) => extras
            .body_bytes
            .unwrap_or(0)
            .div_ceil(4)
            .saturating_add(extras.max_tokens.unwrap_or(estimate)),
        None => 0,
    };
    let mut admitted = limits
        .acquire(
            host.store,
            host.refunds,
            &subject,
            Phase::BeforePick,
            host.now_ns(),
            tokens,
        )
        .map_err(|refusal| too_many_requests(cfg, &refusal))?;
    let Some(first) = pick_instance(
        pool,
        host.store,
        host.rotations,
        &host.pick_input(extras.hash_key),
    ) else {
        limits.release(host.store, &admitted.grants);
        return Err(no_instance());
    };
    // Instances whose breaker is open are passed over, whatever the strategy picked; an
    // instance's own limit refusing sends the request on as well (as the original does, up to
    // three tries). Only when every instance refuses is the client limited or told none serve.
    let start = pool.routable.iter().position(|i| *i == first).unwrap_or(0);
    let candidates = pool
        .routable
        .iter()
        .cycle()
        .skip(start)
        .take(pool.routable.len());
    let mut chosen = None;
    let mut refused = None;
    let mut limit_tries = 0;
    // The soonest an open breaker passed over here lets a trial through (an upper bound).
    let mut open_for_ns: Option<u64> = None;
    let mut unhealthy = false;
    // The soonest a backend that answered 429 with Retry-After takes requests again.
    let mut cooling_until: Option<u64> = None;
    for &at in candidates {
        let Some(instance) = service.instances.get(at) else {
            continue;
        };
        // One shared-data read for the instance's health and breaker, when it has either.
        let breaker = (instance.breaker.is_some() || instance.health_check.is_some()).then(|| {
            breaker::admit(
                host.store,
                &instance.state_key,
                instance.breaker.as_ref(),
                host.now_ns(),
            )
        });
        match breaker {
            Some(Admission::Refused) => {
                let timeout = instance.breaker.as_ref().map_or(0, |p| p.timeout_ns);
                open_for_ns = Some(open_for_ns.map_or(timeout, |t| t.min(timeout)));
                continue;
            }
            Some(Admission::Unhealthy) => {
                unhealthy = true;
                continue;
            }
            Some(Admission::CoolingDown { until_ns }) => {
                cooling_until = Some(cooling_until.map_or(until_ns, |t: u64| t.min(until_ns)));
                continue;
            }
            _ => {}
        }
        if limit_tries == MAX_INSTANCE_TRIES {
            release_breaker(host, instance, breaker);
            break;
        }
        limit_tries += 1;
        subject.instance = Some((at, &instance.id));
        match limits.acquire(
            host.store,
            host.refunds,
            &subject,
            Phase::AfterPick,
            host.now_ns(),
            tokens,
        ) {
            Ok(more) => {
                admitted.merge(more);
                chosen = Some((at, instance, breaker));
                break;
            }
            Err(refusal) => {
                release_breaker(host, instance, breaker);
                refused = Some(refusal);
            }
        }
    }
    let Some((at, instance, breaker)) = chosen else {
        limits.release(host.store, &admitted.grants);
        return Err(match (refused, open_for_ns) {
            (Some(refusal), _) => too_many_requests(cfg, &refusal),
            (None, _) if cooling_until.is_some() => backends_limited(
                model,
                cooling_until.unwrap_or(0).saturating_sub(host.now_ns()),
            ),
            (None, Some(open_ns)) => all_breakers_open(model, open_ns),
            (None, None) if unhealthy => none_healthy(model),
            (None, None) => no_instance(),
        });
    };
    let Some(path) = instance.upstream_path(endpoint) else {
        limits.release(host.store, &admitted.grants);
        release_breaker(host, instance, breaker);
        return Err(no_instance());
    };
    let path = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let limits_passed = admitted.grants.iter().map(Grant::limit).collect();
    let holds_tokens = admitted.holds_tokens();
    // Each admission is held once: the budgets' with the reservation that settles them.
    let (token_grants, grants): (Vec<Grant>, Vec<Grant>) = admitted
        .grants
        .into_iter()
        .partition(|g| limits.is_token_grant(g));
    Ok(Routed {
        limits_passed,
        service: kind,
        endpoint,
        model: model.to_string(),
        instance: at,
        path,
        headers: [admitted.tightest, admitted.tightest_tokens]
            .into_iter()
            .flatten()
            .flat_map(|(limit, verdict)| rate_limit_headers(cfg, limit, &verdict))
            .collect(),
        tokens: holds_tokens.then(|| TokenReservation {
            reserved: tokens,
            prompt_estimate: extras.body_bytes.unwrap_or(0).div_ceil(4),
            grants: token_grants,
        }),
        grants,
        breaker,
        fallback_from: None,
    })
}

/// 503 when every instance of the model is behind an open breaker; Retry-After is when the
/// first of them lets a trial request through, at the latest.
fn all_breakers_open(model: &str, open_ns: u64) -> LocalReply {
    let secs = open_ns.div_ceil(1_000_000_000).max(1);
    LocalReply::no_instance(
        &format!(
            "Every instance of the model `{model}` is failing (circuit breakers open); try again later."
        ),
        secs,
    )
    .because("every circuit breaker open")
}

/// 429 when the model's backends asked for a pause (they answered 429 with Retry-After) and
/// nothing else can serve: the client waits as long as they asked.
fn backends_limited(model: &str, wait_ns: u64) -> LocalReply {
    let secs = wait_ns.div_ceil(1_000_000_000).max(1);
    LocalReply::error(
        ClientError::RateLimited,
        &format!("The backends of the model `{model}` are rate limiting; try again in {secs} s."),
    )
    .with_header("retry-after", &secs.to_string())
    .because("every instance pausing after a 429")
}

/// 503 when the health checker has every instance of the model down.
fn none_healthy(model: &str) -> LocalReply {
    LocalReply::no_instance(
        &format!("No instance of the model `{model}` is healthy right now; try again later."),
        DEFAULT_RETRY_AFTER_SECS,
    )
    .because("no healthy instance")
}

/// A breaker admission that will not be used (a half-open trial must free its place).
fn release_breaker(host: &RouteInputs<'_>, instance: &Instance, admission: Option<Admission>) {
    if let (Some(policy), Some(admission)) = (&instance.breaker, admission) {
        breaker::record(
            host.store,
            &instance.state_key,
            policy,
            admission,
            Outcome::Neutral,
            host.now_ns(),
        );
    }
}

/// Gives back what a routed request holds (its limits' admissions, a half-open trial's
/// place), when it is refused after all (by the limits across replicas).
pub fn release_routed(cfg: &Plan, store: &dyn SharedStore, routed: &Routed, now_ns: u64) {
    let token_grants = routed.tokens.iter().flat_map(|t| &t.grants);
    cfg.limits
        .release(store, routed.grants.iter().chain(token_grants));
    let instance = cfg
        .service(routed.service)
        .and_then(|s| s.instances.get(routed.instance));
    if let (Some(instance), Some(admission)) = (instance, routed.breaker) {
        if let Some(policy) = &instance.breaker {
            breaker::record(
                store,
                &instance.state_key,
                policy,
                admission,
                Outcome::Neutral,
                now_ns,
            );
        }
    }
}

/// The OpenAI rate-limit headers for the tightest limit a request met.
pub fn rate_limit_headers(
    cfg: &Plan,
    limit: usize,
    verdict: &Verdict,
) -> Vec<(&'static str, String)> {
    let Some(limit) = cfg.limits.list.get(limit) else {
        return Vec::new();
    };
    let [limit_name, remaining_name, reset_name] = match limit.unit {
        Unit::Requests => [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        Unit::Tokens => [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    };
    vec![
        (limit_name, limit.params.limit().to_string()),
        (remaining_name, verdict.remaining.to_string()),
        (reset_name, openai_duration(verdict.reset_ns)),
    ]
}

/// 429 with an OpenAI `rate_limit_error` naming the limit, and when to come back.
pub fn too_many_requests(cfg: &Plan, refusal: &Refusal) -> LocalReply {
    let Some(limit) = cfg.limits.list.get(refusal.limit) else {
        return LocalReply::error(ClientError::RateLimited, "Rate limit reached.");
    };
    let retry = retry_after_secs(refusal.verdict.retry_after_ns);
    let limited_by = Some(refusal.limit);
    let per = match limit.params.algorithm {
        _ if limit.unit == Unit::Tokens => format!("{} tokens per minute", limit.params.capacity),
        Algorithm::SlidingWindow => format!(
            "{} requests per {} s",
            limit.params.limit(),
            limit.params.window_ns / 1_000_000_000
        ),
        _ => format!(
            "bursts of {} and {} requests per second",
            limit.params.capacity, limit.params.rate
        ),
    };
    let message = format!(
        "Rate limit reached: `{}` ({} {} `{}`) allows {per}. Please retry after {retry} s.",
        limit.name,
        limit.params.algorithm.name(),
        limit.scope.name(),
        refusal.label,
    );
    let mut reply = LocalReply::error(ClientError::RateLimited, &message)
        .with_header("retry-after", &retry.to_string())
        .with_header("x-jairouter-limit", &limit.name);
    reply.limited_by = limited_by;
    for (name, value) in rate_limit_headers(cfg, refusal.limit, &refusal.verdict) {
        reply = reply.with_header(name, &value);
    }
    reply
}

/// The model list, as far as the caller may use it (a key limited to some services or models
/// does not learn the others' names).
fn list_models(cfg: &Plan, caller: Option<&ApiKey>) -> LocalReply {
    match caller.filter(|c| !c.is_admin()) {
        None => LocalReply::json(200, cfg.models_json.clone()),
        Some(caller) => LocalReply::json(
            200,
            models_list_json_where(cfg.services(), |kind, model| {
                caller.permits(kind, Some(model)).is_ok()
            }),
        ),
    }
}

fn retrieve_model(cfg: &Plan, id: &str, caller: Option<&ApiKey>) -> LocalReply {
    let permitted = |kind| caller.is_none_or(|c| c.permits(kind, Some(id)).is_ok());
    for service in cfg.services() {
        if service.models.contains_key(id) && permitted(service.kind) {
            return LocalReply::json(200, model_object(id, service.kind).to_string());
        }
    }
    LocalReply::error(
        ClientError::ModelNotFound,
        &format!("The model `{id}` does not exist."),
    )
}

fn unknown_model(cfg: &Plan, endpoint: Endpoint, model: &str) -> LocalReply {
    let adapter = cfg
        .service(endpoint.service())
        .and_then(|s| s.unsupported.get(model));
    if let Some(adapter) = adapter {
        return LocalReply::error(
            ClientError::NotSupportedByAdapter,
            &format!(
                "The model `{model}` is served through adapter `{adapter}`, which does not support the `{}` service.",
                endpoint.service().key()
            ),
        );
    }
    // Point a client that used the wrong endpoint to the right one.
    let elsewhere = cfg
        .services()
        .find(|s| s.kind != endpoint.service() && s.models.contains_key(model))
        .map(|s| {
            format!(
                " It is a `{}` model: use /v1/{}.",
                s.kind.key(),
                s.kind.primary_endpoint().suffix()
            )
        })
        .unwrap_or_default();
    LocalReply::error(
        ClientError::ModelNotFound,
        &format!(
            "The model `{model}` does not exist for the `{}` service.{elsewhere}",
            endpoint.service().key()
        ),
    )
}

fn service_missing(_cfg: &Plan, endpoint: Endpoint) -> LocalReply {
    LocalReply::error(
        ClientError::ServiceNotConfigured,
        &format!(
            "This gateway has no `{}` service configured, so /v1/{} is not available.",
            endpoint.service().key(),
            endpoint.suffix()
        ),
    )
}

fn missing_model() -> LocalReply {
    LocalReply::error(
        ClientError::MissingModel,
        "You must provide a model parameter.",
    )
}

fn too_large(limit: u64) -> LocalReply {
    LocalReply::error(
ClientError::RequestTooLarge,
        &format!(
            "The model was not found within the first {limit} bytes of the body. Put `model` first, \
             or name it in the x-jairouter-model header."
        ),
    )
}

fn method_not_allowed(head: &RequestHead<'_>, allow: &str) -> LocalReply {
    LocalReply::error(
        ClientError::MethodNotAllowed,
        &format!("{} is not allowed here; use {allow}.", head.method),
    )
    .with_header("allow", allow)
}

#[cfg(test)]
mod tests;
