//! One request from routing to its log line: the chosen instance, its breaker ticket, load
//! report, token reservation and timings. The binding forwards each proxy-wasm callback here
//! with its `Host`; everything the exchange asks of Envoy goes through that interface, so the
//! whole path runs (and its host calls are counted) in unit tests.
//!
//! Cost rules, pinned by the tests: the clock is read at most once per callback and only when
//! something uses it; the response headers are read in one call; a response body is read only
//! when its usage is counted; in-flight and latency state are touched only for the strategies
//! that read them.

mod report;
mod shared_limits;
#[cfg(test)]
mod tests;
mod trace;
mod translation;

use crate::auth::claim_values;
use crate::balance::load::{begin_request, end_request, record_latency};
use crate::balance::{Rng, Rotations};
use crate::breaker::{self, Admission, BreakerPolicy, Outcome};
use crate::config::{Protocol, Strategy};
use crate::contract::{
    INSTANCE_HEADER, JWT_PAYLOAD_KEY, LOG_SUMMARY_PROPERTY, MODEL_HEADER, ORIGINAL_DST_HEADER,
    ROUTING_HEADER,
};
use crate::encoding::client_ip;
use crate::endpoint::{classify, Endpoint, Route};
use crate::headers::HeaderPairs;
use crate::host::Host;
use crate::limit::global::ServiceLink;
use crate::limit::rls::Descriptor;
use crate::limit::Refunds;
use crate::metrics::Metrics;
use crate::plan::Plan;
use crate::reply::{LocalReply, DEFAULT_RETRY_AFTER_SECS};
use crate::request::{
    authenticate, on_request_headers, BodyScan, BodyStep, HeadDecision, RequestHead, TokenClaims,
};
use crate::route::{Caller, RouteInputs, Routed, TokenReservation};
use crate::scan::ScanOutcome;
use crate::translate::messages;
use crate::translate::openai::SSE_DONE;
use crate::usage::{Usage, UsageScanner};
pub use shared_limits::CALLS_METRIC as GLOBAL_CALLS_METRIC;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use translation::{Hold, Pending, Translation};

/// Body bytes are copied into the VM in windows, and only until the model is known: the first
/// of this size, each next as large as all read before it, up to `MAX_BODY_WINDOW` (a model
/// near the start costs one small copy; one at the end of a large prompt, few host calls).
pub const BODY_WINDOW: usize = 16 * 1024;
pub const MAX_BODY_WINDOW: usize = 4 * BODY_WINDOW;

/// A failed exchange (5xx, reset, timeout) counts as at least this slow for least-latency.
const FAILURE_LATENCY_NS: u64 = 1_000_000_000;

/// Routing headers a client must never choose: ours, and the one ORIGINAL_DST clusters honour.
pub const CLIENT_ROUTING_HEADERS: [&str; 2] = [ROUTING_HEADER, ORIGINAL_DST_HEADER];

/// What the binding does after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Hold the request (its body is being read, or the filter answered it).
    Pause,
}

/// The clock as one callback sees it: read once, when first asked.
struct Clock<'h> {
    host: &'h dyn Host,
    now: Cell<Option<u64>>,
}

impl<'h> Clock<'h> {
    fn new(host: &'h dyn Host) -> Clock<'h> {
        Clock {
            host,
            now: Cell::new(None),
        }
    }

    fn now(&self) -> u64 {
        if let Some(now) = self.now.get() {
            return now;
        }
        let now = self.host.now_ns();
        self.now.set(Some(now));
        now
    }

    fn read(&self) -> Option<u64> {
        self.now.get()
    }
}

/// What the metrics and the access log of one request need, gathered as it passes.
#[derive(Default)]
struct Measure {
    /// When the filter first looked at the clock for the request (0: not yet).
    started_ns: u64,
    /// When the request was sent to its instance.
    routed_ns: u64,
    method: String,
    service: Option<&'static str>,
    /// The response was an event stream (the original's `STREAM` method).
    streamed: bool,
    request_bytes: u64,
    response_bytes: u64,
    /// The model that served, or the configured one a refused request asked for (a label of
    /// the request and token metrics: configured names only).
    model: String,
    /// The endpoint and the instance's protocol, once routed (the GenAI metrics' operation and
    /// provider).
    endpoint: Option<Endpoint>,
    protocol: Option<Protocol>,
    /// When the first and the last bytes of a streamed response passed.
    first_byte_ns: u64,
    last_byte_ns: u64,
    /// When the response ended, if the filter read the clock then (the log reuses it).
    ended_ns: u64,
    usage: Option<Usage>,
    /// What decided about the request, for the access log (a limit's name, a fallback...).
    decision: Option<String>,
    /// The access-log summary has been handed to Envoy.
    logged: bool,
}

/// A breaker admission to count once the exchange with the instance is over.
struct BreakerTicket {
    key: String,
    policy: BreakerPolicy,
    admission: Admission,
    /// Retries allowed for the request (an answer may then come from another instance).
    retries: u64,
}

/// An in-flight count taken for a request, to give back exactly once, and the start of its
/// latency measurement.
struct LoadReport {
    in_flight_key: String,
    /// Set for least-latency: where the time to first byte goes.
    latency_key: Option<String>,
    decay_ns: u64,
    started_ns: u64,
    measured: bool,
}

/// The response head, read in one host call.
struct ResponseHead {
    headers: HeaderPairs,
    status: Option<u32>,
    content_type: String,
    attempts: Option<u32>,
}

impl ResponseHead {
    fn read(host: &dyn Host) -> ResponseHead {
        let headers = host.response_headers();
        let number = |name: &str| headers.get(name).and_then(|v| v.trim().parse().ok());
        ResponseHead {
            status: number(":status"),
            content_type: headers.get("content-type").unwrap_or_default().to_string(),
            attempts: number("x-envoy-attempt-count"),
            headers,
        }
    }

    /// Adds `additions` to the response (replacing headers of the same names) and drops
    /// `removals`: one call for one header, else one call for the whole map, when it was read
    /// whole.
    fn add(&self, host: &dyn Host, additions: &[(&str, &str)], removals: &[&str]) {
        match (additions, removals) {
            ([], []) => {}
            ([(name, value)], []) => host.set_response_header(name, value),
            _ if !self.headers.is_complete() => {
                for (name, value) in additions {
                    host.set_response_header(name, value);
                }
                for name in removals {
                    host.remove_response_header(name);
                }
            }
            _ => {
                let replaced = |n: &str| {
                    additions.iter().any(|(a, _)| a.eq_ignore_ascii_case(n))
                        || removals.iter().any(|r| r.eq_ignore_ascii_case(n))
                };
                let kept = self.headers.iter().filter(|(n, _)| !replaced(n));
                let all: Vec<(&str, &str)> = kept.chain(additions.iter().copied()).collect();
                host.replace_response_headers(&all);
            }
        }
    }
}

/// What one VM (one Envoy worker) keeps across its requests: every exchange it runs shares it,
/// and a reload keeps it.
pub struct Worker {
    pub rng: RefCell<Rng>,
    /// The VM's counts between two hand-overs to Envoy.
    pub metrics: RefCell<Metrics>,
    /// What the VM's requests leave for the rate-limit service (limits across replicas).
    pub link: RefCell<ServiceLink>,
    /// The token refunds the VM's requests owe their budgets.
    pub refunds: RefCell<Refunds>,
    /// Where the VM's round-robin rotations stand.
    pub rotations: RefCell<Rotations>,
}

impl Worker {
    pub fn new(seed: u64) -> Worker {
        Worker {
            rng: RefCell::new(Rng::new(seed)),
            metrics: RefCell::default(),
            link: RefCell::default(),
            refunds: RefCell::default(),
            rotations: RefCell::default(),
        }
    }
}

pub struct Exchange {
    plan: Rc<Plan>,
    worker: Rc<Worker>,
    scan: Option<Box<BodyScan>>,
    /// The request's `:path` as the client sent it (rewritten only when the instance needs it).
    path: String,
    /// Body bytes already fed to the scanner.
    scanned: usize,
    /// The instance id for `x-jairouter-instance`.
    served_by: Option<String>,
    /// What least-connections and least-latency must hear about this request when it ends.
    load: Option<LoadReport>,
    /// Headers for the response (the rate-limit state the request met).
    response_headers: Vec<(&'static str, String)>,
    /// Token budgets drawn at admission, settled once the response tells its usage.
    tokens: Option<TokenReservation>,
    usage: Option<UsageScanner>,
    /// The instance's circuit breaker, until the exchange's outcome is counted.
    breaker: Option<BreakerTicket>,
    /// The response's status, once its headers passed.
    status: Option<u32>,
    /// Envoy needed more than one attempt (read from the response head).
    retried: bool,
    /// The request's content-length, if it had one (a fallback's rewrite changes it).
    content_length: Option<u64>,
    /// The model that served, when a fallback stood in for the one asked for.
    served_model: Option<String>,
    /// The model the client asked for, when a fallback served.
    requested_model: Option<String>,
    /// Envoy's client address, when anything keys on it.
    client: Option<String>,
    /// Who the request authenticated as.
    caller: Caller,
    /// Client headers a translating adapter must not forward (its backend would misread them).
    client_sent: ClientSent,
    /// The request came to one of Anthropic's endpoints (its errors are in Anthropic's shape).
    anthropic: bool,
    /// A request routed to a translating instance, until its body is whole.
    pending: Option<Pending>,
    /// The answer's translation, once the request was translated (or its errors need it).
    translation: Option<Translation>,
    /// The head of an answer held whole for its translation.
    held: Option<ResponseHead>,
    /// A routed request waiting for the limits across replicas to admit it.
    check: Option<Box<shared_limits::Check>>,
    /// The shared token budgets it drew from, settled when the response ends.
    shared_tokens: Vec<(usize, Descriptor)>,
    measure: Measure,
}

/// What the client sent that a translated request drops.
#[derive(Default, Clone, Copy)]
struct ClientSent {
    /// Its own credential (not the backend's): kept for OpenAI backends when no API keys are on.
    authorization: bool,
    x_api_key: bool,
    /// A compressed answer could not be translated.
    accept_encoding: bool,
}

impl Exchange {
    pub fn new(plan: Rc<Plan>, worker: Rc<Worker>) -> Exchange {
        Exchange {
            plan,
            worker,
            scan: None,
            path: String::new(),
            scanned: 0,
            served_by: None,
            load: None,
            response_headers: Vec::new(),
            tokens: None,
            usage: None,
            breaker: None,
            status: None,
            retried: false,
            content_length: None,
            served_model: None,
            requested_model: None,
            client: None,
            caller: Caller::Anyone,
            client_sent: ClientSent::default(),
            anthropic: false,
            pending: None,
            translation: None,
            held: None,
            check: None,
            shared_tokens: Vec::new(),
            measure: Measure::default(),
        }
    }

    pub fn on_request_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Flow {
        let clock = Clock::new(host);
        // One host call for every header: asking by name costs a call apiece.
        let headers = host.request_headers();
        for name in CLIENT_ROUTING_HEADERS {
            if headers.contains(name) {
                host.remove_request_header(name);
            }
        }
        headers
            .get(":path")
            .unwrap_or_default()
            .clone_into(&mut self.path);
        self.anthropic = matches!(classify(&self.path).0, Route::Model(e) if e.is_anthropic());
        let lookup = |name: &str| headers.get(name).map(str::to_string);
        let head = RequestHead {
            method: headers.get(":method").unwrap_or_default(),
            path: headers.get(":path").unwrap_or_default(),
            content_type: headers.get("content-type"),
            model_header: headers.get(MODEL_HEADER),
            end_of_stream,
            header: &lookup,
            content_length: headers
                .get("content-length")
                .and_then(|v| v.trim().parse().ok()),
        };
        self.content_length = head.content_length;
        head.method.clone_into(&mut self.measure.method);
        self.measure.request_bytes = head.content_length.unwrap_or(0);
        let random = self.next_random();
        // Asked once: the body phase decides with the same address.
        self.client = if self.plan.uses_client_address {
            host.property(&["source", "address"])
                .and_then(|b| String::from_utf8(b).ok())
        } else {
            None
        };
        let authenticated = self.authenticate(host, &clock, &headers);
        let credentials_removed = self.plan.api_keys.enabled() || self.plan.gateway.jwt.is_some();
        self.client_sent = ClientSent {
            authorization: !credentials_removed && headers.contains("authorization"),
            x_api_key: !credentials_removed && headers.contains("x-api-key"),
            accept_encoding: headers.contains("accept-encoding"),
        };
        self.caller = match authenticated {
            Ok(caller) => caller,
            Err(reply) => return self.reply(host, &clock, &reply),
        };
        let plan = Rc::clone(&self.plan);
        let now = || clock.now();
        let inputs = self.route_inputs(host, random, &now);
        let decision = on_request_headers(&plan, &head, &inputs);
        let flow = match decision {
            HeadDecision::Reply(reply) => self.reply(host, &clock, &reply),
            HeadDecision::Route(routed) => self.route(host, &clock, routed, 0, end_of_stream),
            HeadDecision::ScanBody(scan) => {
                self.scan = Some(scan);
                Flow::Pause
            }
        };
        self.mark_start(&clock);
        flow
    }

    /// What the routing decision may ask of the host and the caller.
    fn route_inputs<'a>(
        &'a self,
        host: &'a dyn Host,
        random: u64,
        clock: &'a dyn Fn() -> u64,
    ) -> RouteInputs<'a> {
        RouteInputs {
            store: host,
            refunds: &self.worker.refunds,
            rotations: &self.worker.rotations,
            random,
            clock,
            client: self.client.as_deref().map(client_ip),
            caller: &self.caller,
        }
    }

    /// Who calls: a verified token's claims, or the API key the request presents. The client's
    /// credentials are the gateway's business: no backend ever sees them (an instance's own
    /// `headers` carry the backend's).
    fn authenticate(
        &self,
        host: &dyn Host,
        clock: &Clock<'_>,
        headers: &HeaderPairs,
    ) -> Result<Caller, LocalReply> {
        let keys = &self.plan.api_keys;
        let token = self
            .plan
            .gateway
            .jwt
            .as_ref()
            .and_then(|jwt| verified_claims(host, &jwt.permissions_claim, &jwt.models_claim));
        // Without API keys nothing reads the credential headers or the clock for them.
        let credential = |name: &str| keys.enabled().then(|| headers.get(name)).flatten();
        let now = if keys.enabled() { clock.now() } else { 0 };
        let authenticated = authenticate(
            &self.plan,
            credential("authorization"),
            credential(keys.header_name()),
            self.client.as_deref(),
            now,
            token,
        );
        if keys.enabled() || self.plan.gateway.jwt.is_some() {
            for name in keys.credential_headers() {
                if headers.contains(name) {
                    host.remove_request_header(name);
                }
            }
        }
        authenticated
    }

    pub fn on_request_body(
        &mut self,
        host: &dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if let Some(check) = self.check.as_mut() {
            // Still waiting for the limits across replicas: Envoy buffers what comes.
            check.body_size = body_size;
            check.end_of_stream = end_of_stream;
            return Flow::Pause;
        }
        let random = self.next_random();
        let Some(mut scan) = self.scan.take() else {
            if self.pending.is_some() {
                let clock = Clock::new(host);
                return self.after_routing(host, &clock, Flow::Continue, body_size, end_of_stream);
            }
            return Flow::Continue;
        };
        let clock = Clock::new(host);
        // Read only up to the limit, and only until the model is known: a fast client's first
        // callback may already hold megabytes.
        let readable = body_size.min(usize::try_from(scan.limit()).unwrap_or(usize::MAX));
        let mut outcome = ScanOutcome::NeedMore;
        while self.scanned < readable && outcome == ScanOutcome::NeedMore {
            let window = self.scanned.clamp(BODY_WINDOW, MAX_BODY_WINDOW);
            let want = (readable - self.scanned).min(scan.next_read(window));
            let chunk = match host.request_body(self.scanned, want) {
                Some(bytes) if !bytes.is_empty() => bytes,
                _ => break,
            };
            self.scanned = self.scanned.saturating_add(chunk.len());
            outcome = scan.feed(&chunk);
        }
        let buffered = u64::try_from(body_size).unwrap_or(u64::MAX);
        self.measure.request_bytes = self.measure.request_bytes.max(buffered);
        let plan = Rc::clone(&self.plan);
        let now = || clock.now();
        let inputs = self.route_inputs(host, random, &now);
        let step = scan.decide(outcome, buffered, end_of_stream, &plan, &inputs);
        let flow = match step {
            BodyStep::NeedMore => {
                self.scan = Some(scan);
                Flow::Pause
            }
            BodyStep::Reply(reply) => self.reply(host, &clock, &reply),
            BodyStep::Route(routed) => {
                if routed.fallback_from.is_some() {
                    self.requested_model.clone_from(&routed.fallback_from);
                    if let Err(why) =
                        self.ask_for(host, &routed.model, scan.model_span(), body_size)
                    {
                        log::warn!("fallback to {} not taken: {why}", routed.model);
                        let reply = LocalReply::no_instance(
                            "No instance of the model can take the request right now.",
                            DEFAULT_RETRY_AFTER_SECS,
                        );
                        return self.reply(host, &clock, &reply);
                    }
                }
                self.route(host, &clock, routed, body_size, end_of_stream)
            }
        };
        self.mark_start(&clock);
        flow
    }

    /// A request routed to a translating instance waits for its whole body, then is rewritten.
    fn after_routing(
        &mut self,
        host: &dyn Host,
        clock: &Clock<'_>,
        flow: Flow,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        if flow != Flow::Continue || self.pending.is_none() {
            return flow;
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        self.translate_request(host, clock, body_size)
    }

    /// Rewrites the whole buffered request for the instance's protocol (body, length, path),
    /// or answers the client when it cannot be said in that protocol.
    fn translate_request(&mut self, host: &dyn Host, clock: &Clock<'_>, body_size: usize) -> Flow {
        let Some(pending) = self.pending.take() else {
            return Flow::Continue;
        };
        let body = match body_size {
            0 => Vec::new(),
            _ => host.request_body(0, body_size).unwrap_or_default(),
        };
        let created = clock.now() / 1_000_000_000;
        let translated = Translation::request(&pending, &body, created).and_then(|(t, out)| {
            if host.replace_request_body(body.len(), &out.body) {
                Ok((t, out))
            } else {
                Err(LocalReply::no_instance(
                    "Envoy refused the translated request.",
                    DEFAULT_RETRY_AFTER_SECS,
                ))
            }
        });
        match translated {
            Ok((translation, outbound)) => {
                host.set_request_header("content-length", &outbound.body.len().to_string());
                host.set_request_header(":path", &outbound.path);
                self.translation = Some(translation);
                Flow::Continue
            }
            Err(reply) => {
                // The instance never saw the request: no breaker outcome, no latency sample.
                self.count_breaker(host, clock, Outcome::Neutral);
                if let Some(load) = self.load.as_mut() {
                    load.measured = true;
                }
                self.reply(host, clock, &reply)
            }
        }
    }

    pub fn on_response_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Flow {
        let clock = Clock::new(host);
        let head = ResponseHead::read(host);
        if self.status.is_none() {
            self.status = head.status;
        }
        // Whether Envoy needed more than one attempt (`include_attempt_count_in_response`).
        self.retried = self.breaker.as_ref().is_some_and(|t| t.retries > 0)
            && head.attempts.is_some_and(|count| count > 1);
        if self.load.is_some() {
            let failed = self.status.is_none_or(|status| status >= 500);
            self.measure_latency(host, &clock, failed);
        }
        // 5xx (Envoy's own for connect failures, resets and timeouts included) counts at once;
        // a 4xx is the client's doing; a success counts only once its body has ended whole.
        // An answer after a retry means the chosen instance failed first (the first attempt is
        // always on it; retries go to its peers).
        if self.breaker.is_some() && self.status.is_some_and(|s| s < 500) && self.retried {
            self.count_breaker(host, &clock, Outcome::Failure);
        }
        // The instance asks for a pause: out of rotation for as long as it says (capped).
        if self.status == Some(429) && !self.retried && answered_by_upstream(host) {
            let secs = head.headers.get("retry-after").and_then(retry_after_secs);
            if let (Some(ticket), Some(secs)) = (&self.breaker, secs) {
                let until = clock
                    .now()
                    .saturating_add(secs.saturating_mul(1_000_000_000));
                breaker::cool_down(host, &ticket.key, until);
            }
        }
        match self.status {
            Some(status) if status >= 500 => self.count_breaker(host, &clock, Outcome::Failure),
            Some(status) if status >= 400 => self.count_breaker(host, &clock, Outcome::Neutral),
            _ if end_of_stream => self.count_breaker(host, &clock, Outcome::Success),
            _ => {}
        }
        let status = head.status.unwrap_or(0);
        let hold = match self.translation.as_mut() {
            Some(translation) => translation.on_head(status, end_of_stream),
            None => Hold::Pass,
        };
        self.measure.streamed = head.content_type.contains("event-stream") || hold == Hold::Stream;
        // Token budgets settle from the usage an OpenAI answer (JSON or SSE) reports, and the
        // token metrics count it: read it from every answer of an instance (a translated one
        // once it is OpenAI's).
        let translated_success = hold != Hold::Pass && (200..300).contains(&status);
        if self.served_by.is_some()
            && (head.content_type.contains("json") || self.measure.streamed || translated_success)
        {
            self.usage = Some(UsageScanner::new());
        }
        if hold == Hold::Whole {
            // Its head goes out with the rewritten body (status, type and length change).
            self.held = Some(head);
            return Flow::Pause;
        }
        let mut additions = self.response_additions();
        let removals: &[&str] = if hold == Hold::Stream {
            additions.push(("content-type", "text/event-stream"));
            additions.push(("cache-control", "no-cache"));
            &["content-length"]
        } else {
            &[]
        };
        head.add(host, &additions, removals);
        Flow::Continue
    }

    /// The rate-limit state the request met, the stand-in model, the instance that served.
    fn response_additions(&self) -> Vec<(&str, &str)> {
        let mut additions: Vec<(&str, &str)> = self
            .response_headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        if let Some(model) = &self.served_model {
            additions.push((MODEL_HEADER, model));
        }
        if let Some(id) = self.served_by.as_deref() {
            if self.plan.gateway.instance_header {
                additions.push((INSTANCE_HEADER, id));
            }
        }
        additions
    }

    /// A translated stream's chunk, rewritten in place.
    fn translate_chunk(&mut self, host: &dyn Host, clock: &Clock<'_>, body_size: usize, end: bool) {
        let Some(translation) = self.translation.as_mut() else {
            return;
        };
        let chunk = match body_size {
            0 => Vec::new(),
            _ => host.response_body(body_size).unwrap_or_default(),
        };
        let usage_before = translation.usage_before();
        let (out, broken) = match translation.chunk(&chunk, end) {
            Ok(out) => (out, false),
            Err(out) => (out, true),
        };
        if out != chunk {
            host.replace_response_body(body_size, &out);
        }
        if let Some(scanner) = self.usage.as_mut() {
            scanner.feed(if usage_before { &chunk } else { &out });
            // The backend's own counts, when the client asked no usage chunk to carry them: as
            // soon as the client has its stream's end (`[DONE]`), which can be before the
            // backend's stream ends, since a client that has read it may close at once.
            let ended = end || out.ends_with(SSE_DONE);
            if let Some(usage) = ended.then(|| translation.stream_usage()).flatten() {
                let counts = format!(
                    r#"{{"usage":{{"prompt_tokens":{},"completion_tokens":{}}}}}"#,
                    usage.prompt, usage.completion
                );
                scanner.feed(counts.as_bytes());
            }
        }
        if broken {
            self.count_breaker(host, clock, Outcome::Failure);
        }
    }

    /// A held answer, whole now: rewritten, with its head.
    fn translate_whole(&mut self, host: &dyn Host, clock: &Clock<'_>, body_size: usize) {
        let (Some(translation), Some(head)) = (self.translation.as_ref(), self.held.take()) else {
            return;
        };
        let body = match body_size {
            0 => Vec::new(),
            _ => host.response_body(body_size).unwrap_or_default(),
        };
        let answer = translation.whole(head.status.unwrap_or(0), &body);
        host.replace_response_body(body_size, &answer.body);
        let status = answer.status.to_string();
        let length = answer.body.len().to_string();
        let mut additions = self.response_additions();
        additions.extend([
            (":status", status.as_str()),
            ("content-type", "application/json"),
            ("content-length", length.as_str()),
        ]);
        head.add(host, &additions, &[]);
        if (200..300).contains(&answer.status) {
            if let Some(scanner) = self.usage.as_mut() {
                let openai = if translation.usage_before() {
                    &body
                } else {
                    &answer.body
                };
                scanner.feed(openai);
            }
        } else {
            self.usage = None;
        }
        if answer.malformed {
            self.count_breaker(host, clock, Outcome::Failure);
        }
        self.status = Some(answer.status);
    }

    /// Reads the response for its usage as it passes, without holding it back.
    pub fn on_response_body(
        &mut self,
        host: &dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let clock = Clock::new(host);
        self.measure.response_bytes = self
            .measure
            .response_bytes
            .saturating_add(u64::try_from(body_size).unwrap_or(0));
        // Only a stream's first and last bytes are timed (time to first token, time per token).
        if self.measure.streamed {
            if body_size > 0 && self.measure.first_byte_ns == 0 {
                self.measure.first_byte_ns = clock.now();
            }
            if end_of_stream {
                self.measure.last_byte_ns = clock.now();
            }
        }
        if self.held.is_some() {
            if !end_of_stream {
                return Flow::Pause;
            }
            self.translate_whole(host, &clock, body_size);
        } else if self.translation.as_ref().is_some_and(Translation::streams) {
            self.translate_chunk(host, &clock, body_size, end_of_stream);
        } else if let Some(scanner) = self.usage.as_mut() {
            if let Some(bytes) = host.response_body(body_size) {
                scanner.feed(&bytes);
            }
        }
        if end_of_stream {
            self.settle_tokens(host, &clock);
            self.count_breaker(host, &clock, Outcome::Success);
            self.write_log_summary(host);
            self.measure.ended_ns = clock.read().unwrap_or(0);
        }
        Flow::Continue
    }

    /// Envoy logs every stream when it ends: completed, failed, or reset by either side.
    pub fn on_log(&mut self, host: &dyn Host) {
        let clock = Clock::new(host);
        self.abandon_check(host, &clock);
        self.write_log_summary(host);
        self.record_metrics(&clock);
        self.end_load(host, &clock);
        self.settle_tokens(host, &clock);
        if self.breaker.is_some() {
            let outcome = unfinished_outcome(host, self.status.is_some());
            self.count_breaker(host, &clock, outcome);
        }
    }

    /// A backstop for `on_log` when the context goes away: the in-flight count must never leak.
    pub fn on_drop(&mut self, host: &dyn Host) {
        let clock = Clock::new(host);
        self.abandon_check(host, &clock);
        self.end_load(host, &clock);
        self.settle_tokens(host, &clock);
        self.count_breaker(host, &clock, Outcome::Neutral);
    }

    /// The request's start is the first time the filter needed the clock for it (a request
    /// held for its body is timed from the body's first callback: the gap is Envoy's own).
    fn mark_start(&mut self, clock: &Clock<'_>) {
        if self.measure.started_ns == 0 {
            if let Some(now) = clock.read() {
                self.measure.started_ns = now;
            }
        }
    }

    /// The first response byte (or the end of a request that never got one) is the latency
    /// sample; a failure counts as slow.
    fn measure_latency(&mut self, host: &dyn Host, clock: &Clock<'_>, failed: bool) {
        let Some(load) = self.load.as_mut() else {
            return;
        };
        if load.measured {
            return;
        }
        load.measured = true;
        if let Some(key) = &load.latency_key {
            let now = clock.now();
            let mut sample = now.saturating_sub(load.started_ns);
            if failed {
                sample = sample.max(FAILURE_LATENCY_NS);
            }
            record_latency(host, key, sample, now, load.decay_ns);
        }
    }

    /// Charges the token budgets what the request really used (once): the reported usage, or
    /// the prompt estimate and the completion estimated from the text that passed.
    fn settle_tokens(&mut self, host: &dyn Host, clock: &Clock<'_>) {
        let Some(reservation) = self.tokens.take() else {
            return;
        };
        let used = match self.final_usage() {
            Some(usage) => usage.charge(reservation.prompt_estimate),
            None => reservation.prompt_estimate,
        };
        {
            let mut owed = self.worker.refunds.try_borrow_mut().ok();
            self.plan.limits.settle_tokens(
                host,
                owed.as_deref_mut(),
                &reservation.grants,
                used,
                clock.now(),
            );
        }
        self.settle_shared_tokens(used);
    }

    /// What the response reported (or its text let estimate), once it is over.
    fn final_usage(&mut self) -> Option<Usage> {
        if let Some(scanner) = self.usage.take() {
            self.measure.usage = Some(scanner.usage());
        }
        self.measure.usage
    }

    /// Answers the client from the filter (and remembers what the metrics need).
    fn reply(&mut self, host: &dyn Host, clock: &Clock<'_>, reply: &LocalReply) -> Flow {
        self.mark_start(clock);
        self.status = Some(reply.status);
        if let Some(service) = reply.service {
            self.measure.service = Some(service.key());
        }
        if let Some(model) = &reply.model {
            self.measure.model.clone_from(model);
        }
        if let Some(limit) = reply.limited_by {
            self.count_limit_event(limit, "rejected");
            let name = self.plan.limits.list.get(limit).map(|l| l.name.clone());
            self.measure.decision = Some(format!("rate_limited: {}", name.unwrap_or_default()));
        }
        if let Some(reason) = reply.reason {
            self.measure.decision = Some(reason.to_string());
        }
        self.write_log_summary(host);
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        // Anthropic's endpoints answer their clients' SDKs in Anthropic's error shape.
        let anthropic_error;
        let body = if self.anthropic && reply.status >= 400 {
            let message = messages::openai_error_message(reply.body.as_bytes()).unwrap_or_default();
            anthropic_error = messages::error_body(reply.status, &message);
            anthropic_error.as_slice()
        } else {
            reply.body.as_bytes()
        };
        host.send_reply(reply.status, &headers, body);
        Flow::Pause
    }

    /// The filter's part of the access log line, once the request's story is known: one host
    /// call (`wasm.jairouter` filter state); with tracing on, the span's attributes too.
    fn write_log_summary(&mut self, host: &dyn Host) {
        if self.measure.logged {
            return;
        }
        self.measure.logged = true;
        let usage = self.final_usage();
        let summary = self.log_summary(usage);
        host.set_property(&[LOG_SUMMARY_PROPERTY], summary.as_bytes());
        if self.plan.tracing.is_some() {
            self.write_span_attributes(host, usage);
        }
    }

    /// Rewrites the body's `model` to the fallback that stands in for it, so the backend is
    /// asked for a model it serves. The whole buffered body is replaced (Envoy's buffer API
    /// replaces all or appends), and content-length follows.
    fn ask_for(
        &mut self,
        host: &dyn Host,
        model: &str,
        span: Option<(usize, usize)>,
        body_size: usize,
    ) -> Result<(), &'static str> {
        let span = span.ok_or("the model's place in the body is unknown")?;
        let body = host
            .request_body(0, body_size)
            .ok_or("the body could not be read")?;
        let rewritten = rewrite_model(&body, span, model)?;
        if !host.replace_request_body(body.len(), &rewritten) {
            return Err("Envoy refused the rewritten body");
        }
        if let Some(length) = self.content_length {
            let new_length = (length + rewritten.len() as u64).saturating_sub(body.len() as u64);
            host.set_request_header("content-length", &new_length.to_string());
        }
        self.served_model = Some(model.to_string());
        Ok(())
    }

    /// Counts the exchange against the instance's breaker, once.
    fn count_breaker(&mut self, host: &dyn Host, clock: &Clock<'_>, outcome: Outcome) {
        let Some(ticket) = self.breaker.take() else {
            return;
        };
        // A clean success changes nothing in shared data: no clock, no read.
        let change = if breaker::record_changes(ticket.admission, outcome) {
            breaker::record(
                host,
                &ticket.key,
                &ticket.policy,
                ticket.admission,
                outcome,
                clock.now(),
            )
        } else {
            None
        };
        let instance = self.served_by.as_deref().unwrap_or("?");
        self.count_breaker_events(instance, outcome, change.is_some());
        if let Some((from, to)) = change {
            log::warn!("circuit breaker of instance {instance}: {from:?} -> {to:?}");
        }
    }

    /// Gives the in-flight count back, once, however the request ended.
    fn end_load(&mut self, host: &dyn Host, clock: &Clock<'_>) {
        self.measure_latency(host, clock, true);
        if let Some(load) = self.load.take() {
            end_request(host, &load.in_flight_key);
        }
    }

    fn next_random(&self) -> u64 {
        self.worker
            .rng
            .try_borrow_mut()
            .map(|mut rng| rng.next_u64())
            .unwrap_or(0)
    }

    /// Points the request at the chosen instance and lets Envoy re-select the route.
    fn apply(&mut self, host: &dyn Host, clock: &Clock<'_>, routed: Routed) -> Flow {
        let plan = Rc::clone(&self.plan);
        let service = plan.service(routed.service);
        let Some(instance) = service.and_then(|s| s.instances.get(routed.instance)) else {
            let reply = LocalReply::no_instance("the chosen instance is gone", 1);
            return self.reply(host, clock, &reply);
        };
        let translates = translation::translates(routed.endpoint, instance.adapter.protocol);
        // A translated request's path is set with its body.
        if routed.path != self.path && !translates {
            host.set_request_header(":path", &routed.path);
        }
        for (name, value) in &instance.headers {
            host.set_request_header(name, value);
        }
        if translates {
            if self.client_sent.accept_encoding {
                host.remove_request_header("accept-encoding");
            }
            // The client's own credentials mean nothing to a backend of another protocol.
            for (sent, name) in [
                (self.client_sent.authorization, "authorization"),
                (self.client_sent.x_api_key, "x-api-key"),
            ] {
                if sent && !instance.headers.iter().any(|(n, _)| n == name) {
                    host.remove_request_header(name);
                }
            }
            self.pending = Some(Pending {
                protocol: instance.adapter.protocol,
                endpoint: routed.endpoint,
                model: routed.model.clone(),
                prefix: instance.base_url.prefix.clone(),
                path_given: instance.path_given.clone(),
                chat_path: instance
                    .upstream_path(Endpoint::ChatCompletions)
                    .unwrap_or("/v1/chat/completions")
                    .to_string(),
            });
        } else if instance.adapter.rewrites_errors {
            self.translation = Some(Translation::errors_only(routed.endpoint));
        }
        host.set_request_header(ROUTING_HEADER, &instance.cluster);
        // The route's retry policy carries the global `retries`; a service that differs (or an
        // upload, not retried unless configured) says so here. Envoy strips this header from
        // clients' requests; ours is set after that.
        let retries = service.map_or(0, |s| s.retries);
        if service.is_some() && retries != plan.retries {
            host.set_request_header("x-envoy-max-retries", &retries.to_string());
        }
        // No clear_route_cache: Envoy re-selects the route itself when a module of ABI 0.2.1
        // (what proxy-wasm 0.2.x exports) changes a request header, which saves ~2 µs;
        // `test_abi_version_lets_envoy_reselect_the_route` pins the ABI this relies on.
        self.served_by = Some(instance.id.clone());
        self.measure.routed_ns = clock.now();
        self.measure.service = Some(routed.service.key());
        self.measure.endpoint = Some(routed.endpoint);
        self.measure.protocol = Some(instance.adapter.protocol);
        let strategy = service.map(|s| &s.load_balance);
        self.count_routing(&routed, &instance.id, strategy.map(|lb| lb.strategy));
        self.measure.model = routed.model;
        self.response_headers = routed.headers;
        self.tokens = routed.tokens;
        self.breaker = match (&instance.breaker, routed.breaker) {
            (Some(policy), Some(admission)) => Some(BreakerTicket {
                key: instance.state_key.clone(),
                policy: *policy,
                admission,
                retries,
            }),
            _ => None,
        };
        // In-flight counts and latency exist only for the strategies that read them.
        if let Some(lb) = strategy.filter(|lb| {
            matches!(
                lb.strategy,
                Strategy::LeastConnections | Strategy::LeastLatency
            )
        }) {
            begin_request(host, &instance.in_flight_key);
            self.load = Some(LoadReport {
                in_flight_key: instance.in_flight_key.clone(),
                latency_key: (lb.strategy == Strategy::LeastLatency)
                    .then(|| instance.latency_key.clone()),
                decay_ns: lb.latency_decay_ms.saturating_mul(1_000_000),
                started_ns: clock.now(),
                measured: false,
            });
        }
        Flow::Continue
    }
}

/// The body with the JSON string at `span` replaced by `model`, quoted.
pub fn rewrite_model(
    body: &[u8],
    (start, end): (usize, usize),
    model: &str,
) -> Result<Vec<u8>, &'static str> {
    let (Some(before), Some(after)) = (body.get(..start), body.get(end..)) else {
        return Err("the model lies outside the buffered body");
    };
    if start > end {
        return Err("the model lies outside the buffered body");
    }
    let quoted = serde_json::to_string(model).map_err(|_| "the model cannot be written")?;
    let mut rewritten = Vec::with_capacity(body.len() + quoted.len());
    rewritten.extend_from_slice(before);
    rewritten.extend_from_slice(quoted.as_bytes());
    rewritten.extend_from_slice(after);
    Ok(rewritten)
}

/// The claims of the token Envoy's jwt_authn verified in front of us (it writes the payload
/// into the request's metadata only then; a client cannot forge metadata).
fn verified_claims(
    host: &dyn Host,
    permissions_claim: &str,
    models_claim: &str,
) -> Option<TokenClaims> {
    let claim = |name: &str| {
        host.property(&[
            "metadata",
            "filter_metadata",
            "envoy.filters.http.jwt_authn",
            JWT_PAYLOAD_KEY,
            name,
        ])
    };
    // The provider is configured with the issuer: a verified payload always carries it.
    claim("iss")?;
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap_or_default();
    Some(TokenClaims {
        subject: claim("sub").map(text).unwrap_or_default(),
        permissions: claim(permissions_claim)
            .map(|b| claim_values(&b))
            .unwrap_or_default(),
        models: claim(models_claim).map(|b| claim_values(&b)),
    })
}

/// How an exchange the breaker has not counted yet ended, read when Envoy logs the stream: a
/// response that began and did not end whole broke midway, the instance's failure unless the
/// client went away; no response at all means the client left first.
fn unfinished_outcome(host: &dyn Host, response_started: bool) -> Outcome {
    if !response_started {
        return Outcome::Neutral;
    }
    let details = host
        .property(&["response", "code_details"])
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default();
    if details.starts_with("downstream_") {
        Outcome::Neutral
    } else {
        Outcome::Failure
    }
}

/// Whether the response came from the instance (not a local reply, such as Envoy's global
/// rate limit's 429).
fn answered_by_upstream(host: &dyn Host) -> bool {
    host.property(&["response", "code_details"])
        .is_some_and(|b| b == b"via_upstream")
}

/// A 429's Retry-After in seconds (delta form), at most ten minutes.
fn retry_after_secs(value: &str) -> Option<u64> {
    let secs: u64 = value.trim().parse().ok()?;
    Some(secs.min(600))
}
