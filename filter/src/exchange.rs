//! One request from routing to its log line. The binding forwards each proxy-wasm callback here
//! with its `Host`; everything the exchange asks of Envoy goes through that interface, so the
//! whole path runs (and its host calls are counted) in unit tests.
//!
//! A request passes through stages (`Stage`), each holding what only it needs: its body read
//! until the model is known, a wait for the rate-limit service (`shared_limits`), a wait for the
//! whole body a translating instance needs, then the upstream stage (`upstream`: the chosen
//! instance, its breaker ticket, load report and token reservation), whose answer is read as it
//! passes or held whole for its translation (`response`). What lives across the stages is who
//! the client is and what it sent (`Client`), and what the metrics and the log line will tell
//! (`Measure`).
//!
//! Cost rules, pinned by the tests: the clock is read at most once per callback and only when
//! something uses it; the response headers are read in one call; a response body is read only
//! when its usage is counted; in-flight and latency state are touched only for the strategies
//! that read them.

mod report;
mod response;
mod shared_limits;
#[cfg(test)]
mod tests;
mod trace;
mod translation;
mod upstream;

use crate::auth::claim_values;
use crate::balance::{Rng, Rotations};
use crate::config::Protocol;
use crate::contract::ROUTING_HEADER;
use crate::contract::{JWT_PAYLOAD_KEY, LOG_SUMMARY_PROPERTY, MODEL_HEADER, ORIGINAL_DST_HEADER};
use crate::encoding::client_ip;
use crate::endpoint::{classify, Endpoint, Route};
use crate::headers::HeaderPairs;
use crate::host::Host;
use crate::limit::global::ServiceLink;
use crate::limit::Refunds;
use crate::metrics::Metrics;
use crate::plan::Plan;
use crate::reply::{LocalReply, DEFAULT_RETRY_AFTER_SECS};
use crate::request::{
    authenticate, on_request_headers, BodyScan, BodyStep, HeadDecision, RequestHead, TokenClaims,
};
use crate::route::{Caller, RouteInputs, Routed};
use crate::scan::ScanOutcome;
use crate::translate::messages_to_openai;
use crate::usage::Usage;
use response::ResponseHead;
pub use shared_limits::CALLS_METRIC as GLOBAL_CALLS_METRIC;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use translation::Pending;
use upstream::Upstream;

/// Body bytes are copied into the VM in windows, and only until the model is known: the first
/// of this size, each next as large as all read before it, up to `MAX_BODY_WINDOW` (a model
/// near the start costs one small copy; one at the end of a large prompt, few host calls).
pub const BODY_WINDOW: usize = 16 * 1024;
pub const MAX_BODY_WINDOW: usize = 4 * BODY_WINDOW;

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
    /// The answer's status: the filter's reply, or the response head's (a translated answer's
    /// once it is rewritten).
    status: Option<u32>,
    /// The response was an event stream (the original's `STREAM` method).
    streamed: bool,
    request_bytes: u64,
    response_bytes: u64,
    /// The model that served, or the configured one a refused request asked for (a label of
    /// the request and token metrics: configured names only).
    model: String,
    /// The model that served, when a fallback stood in for the one asked for.
    served_model: Option<String>,
    /// The model the client asked for, when a fallback was to serve.
    requested_model: Option<String>,
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

/// One request, through its stages.
pub struct Exchange {
    plan: Rc<Plan>,
    worker: Rc<Worker>,
    client: Client,
    stage: Stage,
    measure: Measure,
}

/// Who sent the request and what of its head the later stages act on (known once its headers
/// passed).
struct Client {
    /// Who the request authenticated as.
    caller: Caller,
    /// Envoy's client address, when anything keys on it.
    address: Option<String>,
    /// The request's `:path` as the client sent it (rewritten only when the instance needs it).
    path: String,
    /// The request's content-length, if it had one (a fallback's rewrite changes it).
    content_length: Option<u64>,
    /// The request came to one of Anthropic's endpoints (its errors are in Anthropic's shape).
    anthropic: bool,
    /// Client headers a translating adapter must not forward (its backend would misread them).
    sent: ClientSent,
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

/// Where the request stands. Each stage holds what only it needs, so nothing is read in a
/// stage it does not belong to.
enum Stage {
    /// Its head has not passed yet.
    Head,
    /// Its body is read until the model (and what the limits need) is known.
    ReadingBody(Reading),
    /// Routed; waiting for the rate-limit service to admit it (limits across replicas).
    AwaitingLimits(Box<shared_limits::Check>),
    /// Routed to a translating instance; waiting for its whole body, to rewrite it.
    AwaitingBody(Upstream, Pending),
    /// Sent to its instance (or answered by the filter after it was routed): the answer passes.
    Upstream(Upstream),
    /// At its instance, with an answer held whole for its translation: the answer's head.
    Held(Upstream, ResponseHead),
    /// Nothing more to do for it: the filter answered it before it was routed, or it ended
    /// while it waited for the rate-limit service.
    Done,
}

/// A body being read for the model.
struct Reading {
    scan: Box<BodyScan>,
    /// Body bytes already fed to the scanner.
    scanned: usize,
}

/// The request body Envoy holds so far.
#[derive(Clone, Copy)]
struct Buffered {
    size: usize,
    end_of_stream: bool,
}

impl Stage {
    /// Takes the stage out, leaving `Done` until the next is set.
    fn take(&mut self) -> Stage {
        std::mem::replace(self, Stage::Done)
    }

    /// What routing took for the request and how its answer is read, once it is routed.
    fn upstream(&self) -> Option<&Upstream> {
        match self {
            Stage::AwaitingBody(upstream, _) | Stage::Upstream(upstream) => Some(upstream),
            Stage::Held(upstream, _) => Some(upstream),
            _ => None,
        }
    }

    fn upstream_mut(&mut self) -> Option<&mut Upstream> {
        match self {
            Stage::AwaitingBody(upstream, _) | Stage::Upstream(upstream) => Some(upstream),
            Stage::Held(upstream, _) => Some(upstream),
            _ => None,
        }
    }

    /// The body reader, taken out of a request whose body is being read (the request leaves
    /// that stage: its next one is set once the reader has decided).
    fn take_reading(&mut self) -> Option<Reading> {
        if !matches!(self, Stage::ReadingBody(_)) {
            return None;
        }
        match self.take() {
            Stage::ReadingBody(reading) => Some(reading),
            other => {
                *self = other;
                None
            }
        }
    }
}

impl Reading {
    /// Copies the body into the VM in growing windows, only up to the scan's limit and only
    /// until it can decide: a fast client's first callback may already hold megabytes.
    fn read(&mut self, host: &dyn Host, body_size: usize) -> ScanOutcome {
        let readable = body_size.min(usize::try_from(self.scan.limit()).unwrap_or(usize::MAX));
        let mut outcome = ScanOutcome::NeedMore;
        while self.scanned < readable && outcome == ScanOutcome::NeedMore {
            let window = self.scanned.clamp(BODY_WINDOW, MAX_BODY_WINDOW);
            let want = (readable - self.scanned).min(self.scan.next_read(window));
            let chunk = match host.request_body(self.scanned, want) {
                Some(bytes) if !bytes.is_empty() => bytes,
                _ => break,
            };
            self.scanned = self.scanned.saturating_add(chunk.len());
            outcome = self.scan.feed(&chunk);
        }
        outcome
    }
}

impl Default for Client {
    fn default() -> Client {
        Client {
            caller: Caller::Anyone,
            address: None,
            path: String::new(),
            content_length: None,
            anthropic: false,
            sent: ClientSent::default(),
        }
    }
}

impl Exchange {
    pub fn new(plan: Rc<Plan>, worker: Rc<Worker>) -> Exchange {
        Exchange {
            plan,
            worker,
            client: Client::default(),
            stage: Stage::Head,
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
        self.note_head(host, &head, &headers);
        let random = self.next_random();
        self.client.caller = match self.authenticate(host, &clock, &headers) {
            Ok(caller) => caller,
            Err(reply) => return self.reply(host, &clock, &reply),
        };
        let plan = Rc::clone(&self.plan);
        let now = || clock.now();
        let inputs = self.route_inputs(host, random, &now);
        let decision = on_request_headers(&plan, &head, &inputs);
        let flow = match decision {
            HeadDecision::Reply(reply) => self.reply(host, &clock, &reply),
            HeadDecision::Route(routed) => {
                let body = Buffered {
                    size: 0,
                    end_of_stream,
                };
                self.route(host, &clock, routed, body)
            }
            HeadDecision::ScanBody(scan) => {
                self.stage = Stage::ReadingBody(Reading { scan, scanned: 0 });
                Flow::Pause
            }
        };
        self.mark_start(&clock);
        flow
    }

    /// What of the head the later stages act on, and the metrics count.
    fn note_head(&mut self, host: &dyn Host, head: &RequestHead<'_>, headers: &HeaderPairs) {
        let client = &mut self.client;
        head.path.clone_into(&mut client.path);
        client.anthropic = matches!(classify(head.path).0, Route::Model(e) if e.is_anthropic());
        client.content_length = head.content_length;
        head.method.clone_into(&mut self.measure.method);
        self.measure.request_bytes = head.content_length.unwrap_or(0);
        // Asked once: the body phase decides with the same address.
        client.address = if self.plan.uses_client_address {
            host.property(&["source", "address"])
                .and_then(|b| String::from_utf8(b).ok())
        } else {
            None
        };
        let credentials_removed =
            self.plan.api_keys.enabled() || self.plan.spec.gateway.jwt.is_some();
        client.sent = ClientSent {
            authorization: !credentials_removed && headers.contains("authorization"),
            x_api_key: !credentials_removed && headers.contains("x-api-key"),
            accept_encoding: headers.contains("accept-encoding"),
        };
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
            client: self.client.address.as_deref().map(client_ip),
            caller: &self.client.caller,
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
            .spec
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
            self.client.address.as_deref(),
            now,
            token,
        );
        if keys.enabled() || self.plan.spec.gateway.jwt.is_some() {
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
        let body = Buffered {
            size: body_size,
            end_of_stream,
        };
        if let Some(reading) = self.stage.take_reading() {
            return self.read_body(host, reading, body);
        }
        match &mut self.stage {
            // Still waiting for the limits across replicas: Envoy buffers what comes.
            Stage::AwaitingLimits(check) => {
                check.body = body;
                Flow::Pause
            }
            Stage::AwaitingBody(..) => self.translate_when_whole(host, &Clock::new(host), body),
            _ => Flow::Continue,
        }
    }

    /// Reads what came of the body; once the model is known, routes the request or answers it.
    fn read_body(&mut self, host: &dyn Host, mut reading: Reading, body: Buffered) -> Flow {
        let random = self.next_random();
        let clock = Clock::new(host);
        let outcome = reading.read(host, body.size);
        let buffered = u64::try_from(body.size).unwrap_or(u64::MAX);
        self.measure.request_bytes = self.measure.request_bytes.max(buffered);
        let plan = Rc::clone(&self.plan);
        let now = || clock.now();
        let inputs = self.route_inputs(host, random, &now);
        let step = reading
            .scan
            .decide(outcome, buffered, body.end_of_stream, &plan, &inputs);
        let flow = match step {
            BodyStep::NeedMore => {
                self.stage = Stage::ReadingBody(reading);
                Flow::Pause
            }
            BodyStep::Reply(reply) => self.reply(host, &clock, &reply),
            BodyStep::Route(routed) => self.route_read(host, &clock, routed, &reading.scan, body),
        };
        self.mark_start(&clock);
        flow
    }

    /// Routes a request whose body was read; a fallback standing in for the model asked for is
    /// written into the body first.
    fn route_read(
        &mut self,
        host: &dyn Host,
        clock: &Clock<'_>,
        routed: Routed,
        scan: &BodyScan,
        body: Buffered,
    ) -> Flow {
        if routed.fallback_from.is_some() {
            self.measure
                .requested_model
                .clone_from(&routed.fallback_from);
            if let Err(why) = self.ask_for(host, &routed.model, scan.model_span(), body.size) {
                log::warn!("fallback to {} not taken: {why}", routed.model);
                let reply = LocalReply::no_instance(
                    "No instance of the model can take the request right now.",
                    DEFAULT_RETRY_AFTER_SECS,
                );
                return self.reply(host, clock, &reply);
            }
        }
        self.route(host, clock, routed, body)
    }

    /// The instance id, once the request is routed.
    fn instance(&self) -> Option<&str> {
        self.stage.upstream().map(|u| u.instance.as_str())
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

    /// Answers the client from the filter (and remembers what the metrics need).
    fn reply(&mut self, host: &dyn Host, clock: &Clock<'_>, reply: &LocalReply) -> Flow {
        if self.stage.upstream().is_none() {
            self.stage = Stage::Done;
        }
        self.mark_start(clock);
        self.measure.status = Some(reply.status);
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
        let body = if self.client.anthropic && reply.status >= 400 {
            let message =
                messages_to_openai::openai_error_message(reply.body.as_bytes()).unwrap_or_default();
            anthropic_error = messages_to_openai::error_body(reply.status, &message);
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
        if self.plan.spec.tracing.is_some() {
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
        if let Some(length) = self.client.content_length {
            let new_length = (length + rewritten.len() as u64).saturating_sub(body.len() as u64);
            host.set_request_header("content-length", &new_length.to_string());
        }
        self.measure.served_model = Some(model.to_string());
        Ok(())
    }

    fn next_random(&self) -> u64 {
        self.worker
            .rng
            .try_borrow_mut()
            .map(|mut rng| rng.next_u64())
            .unwrap_or(0)
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
