//! The thin proxy-wasm layer: reads what the decision logic needs from Envoy and carries its
//! decisions back. Host calls go through `hostcalls` directly, whose results are checked: the SDK's
//! trait helpers unwrap them, and a non-UTF-8 header from a client would panic the VM.

use crate::auth::claim_values;
use crate::balance::load::{begin_request, end_request, record_latency, LatencyEstimate};
use crate::balance::Rng;
use crate::breaker::{self, Admission, Breaker, BreakerPolicy, Outcome};
use crate::config::{
    JwtOptions, Strategy, INSTANCE_HEADER, JWT_PAYLOAD_KEY, MODEL_HEADER, ROUTING_HEADER,
    SERVICE_DESCRIPTOR_HEADER,
};
use crate::headers::HeaderPairs;
use crate::health::{Checker, Verdict};
use crate::metrics::{stat_name, status_class, Metrics, DURATION_BUCKETS, TOKEN_TIME_BUCKETS};
use crate::plan::Plan;
use crate::request::{
    authenticate, client_ip, on_request_headers, BodyStep, Caller, HeadDecision, Host, LocalReply,
    RequestHead, Routed, TokenClaims, TokenReservation,
};
use crate::scan::ScanOutcome;
use crate::shared_keys::{CONFIG_KEY, CONFIG_VERSION_KEY};
use crate::status::{config_version, status_json};
use crate::store::{ensure_counter, SharedStore, StoreError};
use crate::usage::{Usage, UsageScanner};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// Body bytes are copied into the VM in windows of this size, and only until the model is known.
const BODY_WINDOW: usize = 16 * 1024;

/// A failed exchange (5xx, reset, timeout) counts as at least this slow for least-latency.
const FAILURE_LATENCY_NS: u64 = 1_000_000_000;

/// Envoy re-selects the route itself when a module of ABI 0.2.1 (what proxy-wasm 0.2.x
/// exports) changes a request header; newer ABIs must ask with the `clear_route_cache` foreign
/// function, which costs ~2 µs per request on top (`./build.sh bench hostcalls`). Every routing
/// test fails if this is ever wrong, and `test_abi_version_lets_envoy_reselect_the_route` pins
/// the ABI it relies on.
const HOST_CLEARS_ROUTE_CACHE: bool = true;

/// Routing headers a client must never choose: ours, and the one ORIGINAL_DST clusters honour.
const CLIENT_ROUTING_HEADERS: [&str; 2] = [ROUTING_HEADER, "x-envoy-original-dst-host"];

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root {
            config: None,
            rng: Rc::new(RefCell::new(Rng::new(seed()))),
            memory_gauge: None,
            health: None,
            status_page: false,
            metrics: Rc::default(),
            metric_ids: HashMap::new(),
            gauge_ids: HashMap::new(),
            vm: String::new(),
        })
    });
}}

struct Root {
    config: Option<Rc<Plan>>,
    rng: Rc<RefCell<Rng>>,
    /// This VM's linear memory gauge (`jairouter_vm_memory_bytes{vm=...}`), set every tick.
    memory_gauge: Option<u32>,
    /// Set in the process's health checker only.
    health: Option<HealthRun>,
    /// This root serves the status page (the admin-side listener), not traffic.
    status_page: bool,
    /// What this VM's requests counted since the last tick.
    metrics: Rc<RefCell<Metrics>>,
    /// Envoy's ids of the stats this VM has defined, by name.
    metric_ids: HashMap<String, u32>,
    gauge_ids: HashMap<String, u32>,
    /// This VM's `vm` label (empty until first used).
    vm: String,
}

/// How often each VM reports its linear memory.
const MEMORY_REPORT_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The root id of the process's health checker (a singleton WasmService the renderer adds
/// beside the HTTP filter, with the same VM id so they share data).
const HEALTH_ROOT_ID: &str = "jairouter-health";

/// The root id of the status page's filter (on the admin-side listener, same VM id).
const STATUS_ROOT_ID: &str = "jairouter-status";

/// The health checker's run: what it checks, and which answer belongs to which instance. It
/// checks what the routing filter last published (`CONFIG_KEY`), so it follows every reload.
#[derive(Default)]
struct HealthRun {
    checker: Option<Checker>,
    /// The version of the published configuration the checker was built from.
    config_version: Option<Vec<u8>>,
    pending: HashMap<u32, usize>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        _body: usize,
        _trailers: usize,
    ) {
        let Some(run) = self.health.as_mut() else {
            return;
        };
        let Some(at) = run.pending.remove(&token) else {
            return;
        };
        let Some(checker) = run.checker.as_mut() else {
            return;
        };
        // No headers at all: Envoy gave up (timeout, reset).
        let status =
            match hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status") {
                Ok(Some(bytes)) => std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|s| s.parse().ok()),
                _ => None,
            };
        record_check(checker, at, status);
    }
}

/// Envoy's id for a stat, defined the first time this VM uses it.
fn metric_id(ids: &mut HashMap<String, u32>, kind: MetricType, name: String) -> Option<u32> {
    if let Some(id) = ids.get(&name) {
        return Some(*id);
    }
    let id = hostcalls::define_metric(kind, &name).ok()?;
    ids.insert(name, id);
    Some(id)
}

/// Counts a check's result and writes a change of verdict where every worker reads it.
fn record_check(checker: &mut Checker, at: usize, status: Option<u32>) {
    let verdict = checker.result(at, status);
    let Some(target) = checker.targets().get(at) else {
        return;
    };
    match verdict {
        Some(Verdict::MarkedDown) => {
            log::warn!(
                "instance {} marked down by health checks (last: {})",
                target.instance_id,
                status.map_or("no answer".to_string(), |s| format!("status {s}"))
            );
            breaker::set_unhealthy(&HostStore, &target.state_key, true);
        }
        Some(Verdict::MarkedUp) => {
            log::warn!("instance {} healthy again", target.instance_id);
            breaker::set_unhealthy(&HostStore, &target.state_key, false);
        }
        None => {}
    }
}

impl Root {
    /// This VM's label in per-VM gauges: drawn once, at random.
    fn vm_label(&mut self) -> String {
        if self.vm.is_empty() {
            let vm = self
                .rng
                .try_borrow_mut()
                .map(|mut r| r.next_u64())
                .unwrap_or(0)
                & 0xffff_ffff;
            self.vm = format!("{vm:08x}");
        }
        self.vm.clone()
    }

    /// Hands what this VM counted to Envoy: one call per stat that moved, once a tick.
    fn flush_metrics(&mut self) {
        let drained = match self.metrics.try_borrow_mut() {
            Ok(mut metrics) => metrics.drain(),
            Err(_) => return,
        };
        for (name, delta) in drained {
            if let Some(id) = metric_id(&mut self.metric_ids, MetricType::Counter, name) {
                let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
            }
        }
    }

    /// Each instance's breaker state and health as gauges (read from shared data, so every VM
    /// reports the same values), and this VM's requests in flight to it (labelled with the VM:
    /// sum them over `vm`).
    fn report_instance_states(&mut self) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let vm = self.vm_label();
        let in_flight: Vec<(String, u64)> = match self.metrics.try_borrow() {
            Ok(metrics) => metrics
                .in_flight()
                .map(|(i, n)| (i.to_string(), n))
                .collect(),
            Err(_) => Vec::new(),
        };
        for (instance, count) in in_flight {
            let labels = [("instance", instance.as_str()), ("vm", vm.as_str())];
            self.set_gauge("jairouter_in_flight_requests", &labels, count);
        }
        for service in config.services() {
            for instance in &service.instances {
                let state = Breaker::decode(HostStore.get(&instance.state_key).0.as_deref());
                let labels = [
                    ("service", service.kind.key()),
                    ("model", instance.name.as_str()),
                    ("instance", instance.id.as_str()),
                ];
                let health = u64::from(!state.unhealthy);
                self.set_gauge(
                    "jairouter_circuit_breaker_state",
                    &labels,
                    state.state.gauge(),
                );
                self.set_gauge("jairouter_backend_health", &labels, health);
            }
        }
    }

    fn set_gauge(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        let stat = stat_name(name, labels);
        if let Some(id) = metric_id(&mut self.gauge_ids, MetricType::Gauge, stat) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    /// Rebuilds the checker when the routing filter has published another configuration.
    fn follow_published_config(&mut self) {
        let Some(run) = self.health.as_mut() else {
            return;
        };
        let (version, _) = HostStore.get(CONFIG_VERSION_KEY);
        if version.is_none() || version == run.config_version {
            return;
        }
        run.config_version = version;
        let (Some(bytes), _) = HostStore.get(CONFIG_KEY) else {
            return;
        };
        let config = match Plan::from_json(&bytes) {
            Ok(config) => config,
            Err(e) => {
                log::error!("health checks: published configuration unreadable: {e}");
                return;
            }
        };
        let checker = Checker::new(&config);
        if run.checker.is_none() {
            // A (re)started checker knows nothing yet, and unknown is healthy. A checker
            // rebuilt by a reload keeps what it knew: unchanged instances keep their state keys.
            for target in checker.targets() {
                breaker::set_unhealthy(&HostStore, &target.state_key, false);
            }
        }
        log::info!(
            "health checks: {} instances (configuration {})",
            checker.targets().len(),
            config_version(&bytes)
        );
        let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(checker.tick_ms()));
        run.checker = Some(checker);
        // Answers still on their way belong to the old target list.
        run.pending.clear();
    }

    fn run_health_checks(&mut self) {
        let Some(run) = self.health.as_mut() else {
            return;
        };
        let Some(checker) = run.checker.as_mut() else {
            return;
        };
        for at in checker.due(now_ns()) {
            let Some(target) = checker.targets().get(at) else {
                continue;
            };
            let mut headers = vec![
                (":method", "GET"),
                (":path", target.path.as_str()),
                (":authority", target.authority.as_str()),
                ("user-agent", "jairouter-health-check"),
            ];
            headers.extend(target.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
            let timeout = std::time::Duration::from_millis(target.policy.timeout_ms);
            match hostcalls::dispatch_http_call(&target.cluster, headers, None, vec![], timeout) {
                Ok(token) => {
                    run.pending.insert(token, at);
                }
                Err(status) => {
                    log::warn!(
                        "health check of {} not sent: {status:?}",
                        target.instance_id
                    );
                    record_check(checker, at, None);
                }
            }
        }
    }
}

impl RootContext for Root {
    /// Each VM (one per worker, and the main thread's) reports its own linear memory: a filter
    /// whose memory grows with traffic is a filter that will die of it.
    fn on_tick(&mut self) {
        self.follow_published_config();
        self.run_health_checks();
        self.flush_metrics();
        self.report_instance_states();
        if self.memory_gauge.is_none() {
            let name = stat_name("jairouter_vm_memory_bytes", &[("vm", &self.vm_label())]);
            self.memory_gauge = hostcalls::define_metric(MetricType::Gauge, &name).ok();
        }
        if let Some(gauge) = self.memory_gauge {
            let pages = core::arch::wasm32::memory_size(0) as u64;
            let _ = hostcalls::record_metric(gauge, pages * 65_536);
        }
    }

    fn on_configure(&mut self, size: usize) -> bool {
        // The health checker and the status page read the configuration the routing filter
        // publishes; they need none of their own.
        match plugin_root_id().as_deref() {
            Some(HEALTH_ROOT_ID) => {
                self.health = Some(HealthRun::default());
                // Soon, to find the routing filter's configuration as it is published.
                let _ = hostcalls::set_tick_period(std::time::Duration::from_millis(100));
                return true;
            }
            Some(STATUS_ROOT_ID) => {
                self.status_page = true;
                return true;
            }
            _ => {}
        }
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(bytes)) => bytes,
            _ => {
                log::error!("no plugin configuration given");
                return false;
            }
        };
        let version = config_version(&bytes);
        match Plan::from_json(&bytes) {
            Ok(config) => {
                prepare_shared_keys(&config);
                let previous = HostStore.get(CONFIG_KEY).0;
                if previous.as_deref() != Some(bytes.as_slice()) {
                    // The first VM to load a new configuration empties what the last one used
                    // and this one does not, then publishes it.
                    let previous = previous.and_then(|b| Plan::from_json(&b).ok());
                    for key in previous.map(|p| config.stale_keys(&p)).unwrap_or_default() {
                        let _ = HostStore.set(&key, &[], None);
                    }
                    let _ = HostStore.set(CONFIG_KEY, &bytes, None);
                    let _ = HostStore.set(CONFIG_VERSION_KEY, version.as_bytes(), None);
                }
                let _ = hostcalls::set_tick_period(MEMORY_REPORT_PERIOD);
                let instances = config.instances().count();
                log::info!("configuration {version} loaded ({instances} instances)");
                self.config = Some(Rc::new(config));
                true
            }
            Err(e) => {
                // Refusing makes Envoy keep the last good configuration (or not start).
                log::error!("configuration {version} refused: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.status_page {
            return Some(Box::new(StatusPage));
        }
        let config = self.config.clone()?;
        Some(Box::new(Request {
            config,
            rng: Rc::clone(&self.rng),
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
            content_length: None,
            served_model: None,
            requested_model: None,
            client: None,
            caller: Caller::Anyone,
            metrics: Rc::clone(&self.metrics),
            measure: Measure::default(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request to the status page: answered from shared data, never forwarded.
struct StatusPage;

impl Context for StatusPage {}

impl HttpContext for StatusPage {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let path = match hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":path") {
            Ok(Some(bytes)) => bytes,
            _ => Vec::new(),
        };
        let path = path.split(|b| *b == b'?').next().unwrap_or_default();
        let (status, body) = match path {
            b"/status" => status_page(),
            _ => (
                404,
                r#"{"error":"not found: the status page is GET /status"}"#.to_string(),
            ),
        };
        let headers = vec![
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ];
        if let Err(e) = hostcalls::send_http_response(status, headers, Some(body.as_bytes())) {
            log::warn!("could not answer the status page: {e:?}");
        }
        Action::Pause
    }
}

/// The status page's answer: what the routing filter published, with the shared state now.
fn status_page() -> (u32, String) {
    let (Some(bytes), _) = HostStore.get(CONFIG_KEY) else {
        return (
            503,
            r#"{"error":"no configuration loaded yet"}"#.to_string(),
        );
    };
    match Plan::from_json(&bytes) {
        Ok(config) => (
            200,
            status_json(&config, &config_version(&bytes), &HostStore, now_ns()),
        ),
        Err(e) => (503, serde_json::json!({"error": e.to_string()}).to_string()),
    }
}

struct Request {
    config: Rc<Plan>,
    rng: Rc<RefCell<Rng>>,
    scan: Option<Box<crate::request::BodyScan>>,
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
    metrics: Rc<RefCell<Metrics>>,
    /// What the request's metrics are labelled and measured with.
    measure: Measure,
}

/// What the metrics of one request need, gathered as it passes.
#[derive(Default)]
struct Measure {
    started_ns: u64,
    /// When the request was sent to its instance.
    routed_ns: u64,
    method: String,
    service: Option<&'static str>,
    /// The response was an event stream (the original's `STREAM` method).
    streamed: bool,
    request_bytes: u64,
    response_bytes: u64,
    /// The model that served (a label of the token metrics).
    model: String,
    /// When the first and the last response bytes passed.
    first_byte_ns: u64,
    last_byte_ns: u64,
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

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        // One host call for every header: asking by name costs a call apiece.
        let headers = request_headers();
        for name in CLIENT_ROUTING_HEADERS {
            if headers.contains(name) {
                let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
            }
        }
        headers
            .get(":path")
            .unwrap_or_default()
            .clone_into(&mut self.path);
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
        let now = now_ns();
        self.measure.started_ns = now;
        head.method.clone_into(&mut self.measure.method);
        self.measure.request_bytes = head.content_length.unwrap_or(0);
        let random = self.next_random();
        // Asked once: the body phase decides with the same address.
        self.client = self
            .config
            .uses_client_address
            .then(client_address)
            .flatten();
        let keys = &self.config.api_keys;
        let token = self.config.gateway.jwt.as_ref().and_then(verified_claims);
        // Without API keys nothing reads the credential headers: no lookups.
        let credential = |name: &str| keys.enabled().then(|| headers.get(name)).flatten();
        let authenticated = authenticate(
            &self.config,
            credential("authorization"),
            credential(keys.header_name()),
            self.client.as_deref(),
            now,
            token,
        );
        if keys.enabled() || self.config.gateway.jwt.is_some() {
            // The client's credentials are the gateway's business: no backend ever sees them
            // (an instance's own `headers` carry the backend's).
            for name in keys.credential_headers() {
                if headers.contains(name) {
                    let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
                }
            }
        }
        self.caller = match authenticated {
            Ok(caller) => caller,
            Err(reply) => return self.reply(&reply),
        };
        let host = Host {
            store: &HostStore,
            random,
            now_ns: now,
            client: self.client.as_deref().map(client_ip),
            api_key: self.caller.key_index(),
            caller: self.caller.grants(&self.config),
        };
        match on_request_headers(&self.config, &head, &host) {
            HeadDecision::Reply(reply) => self.reply(&reply),
            HeadDecision::Route(routed) => self.apply(&routed),
            HeadDecision::ScanBody(scan) => {
                self.scan = Some(scan);
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let random = self.next_random();
        let Some(scan) = self.scan.as_mut() else {
            return Action::Continue;
        };
        // Read only up to the limit, and only until the model is known: a fast client's first
        // callback may already hold megabytes.
        let readable = body_size.min(usize::try_from(scan.limit()).unwrap_or(usize::MAX));
        let mut outcome = ScanOutcome::NeedMore;
        while self.scanned < readable && outcome == ScanOutcome::NeedMore {
            let want = (readable - self.scanned).min(BODY_WINDOW);
            let chunk = match hostcalls::get_buffer(BufferType::HttpRequestBody, self.scanned, want)
            {
                Ok(Some(bytes)) if !bytes.is_empty() => bytes,
                _ => break,
            };
            self.scanned = self.scanned.saturating_add(chunk.len());
            outcome = scan.feed(&chunk);
        }
        let host = Host {
            store: &HostStore,
            random,
            now_ns: now_ns(),
            client: self.client.as_deref().map(client_ip),
            api_key: self.caller.key_index(),
            caller: self.caller.grants(&self.config),
        };
        let buffered = u64::try_from(body_size).unwrap_or(u64::MAX);
        self.measure.request_bytes = self.measure.request_bytes.max(buffered);
        let step = scan.decide(outcome, buffered, end_of_stream, &self.config, &host);
        match step {
            BodyStep::NeedMore => Action::Pause,
            BodyStep::Reply(reply) => {
                self.scan = None;
                self.reply(&reply)
            }
            BodyStep::Route(routed) => {
                let span = scan.model_span();
                self.scan = None;
                if routed.fallback_from.is_some() {
                    self.requested_model.clone_from(&routed.fallback_from);
                    if let Err(why) = self.ask_for(&routed.model, span, body_size) {
                        log::warn!("fallback to {} not taken: {why}", routed.model);
                        return self.reply(&LocalReply::error(
                            503,
                            "server_error",
                            "no_available_instance",
                            "No instance of the model can take the request right now.",
                        ));
                    }
                }
                self.apply(&routed)
            }
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        if self.status.is_none() {
            self.status = response_status();
        }
        if self.load.is_some() {
            let failed = self.status.is_none_or(|status| status >= 500);
            self.measure_latency(failed);
        }
        // 5xx (Envoy's own for connect failures, resets and timeouts included) counts at once;
        // a 4xx is the client's doing; a success counts only once its body has ended whole.
        // An answer after a retry means the chosen instance failed first (the first attempt is
        // always on it; retries go to its peers).
        if self.breaker.is_some() && self.status.is_some_and(|s| s < 500) && self.retried() {
            self.count_breaker(Outcome::Failure);
        }
        // The instance asks for a pause: out of rotation for as long as it says (capped).
        if self.status == Some(429) && !self.retried() && answered_by_upstream() {
            if let (Some(ticket), Some(secs)) = (&self.breaker, retry_after_secs()) {
                let until = now_ns().saturating_add(secs.saturating_mul(1_000_000_000));
                breaker::cool_down(&HostStore, &ticket.key, until);
            }
        }
        match self.status {
            Some(status) if status >= 500 => self.count_breaker(Outcome::Failure),
            Some(status) if status >= 400 => self.count_breaker(Outcome::Neutral),
            _ if end_of_stream => self.count_breaker(Outcome::Success),
            _ => {}
        }
        for (name, value) in &self.response_headers {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
        }
        // Token budgets settle from the usage an OpenAI answer (JSON or SSE) reports.
        let content_type = response_header("content-type").unwrap_or_default();
        self.measure.streamed = content_type.contains("event-stream");
        // Token budgets settle from the usage an OpenAI answer reports, and the token metrics
        // count it: read it from every answer of an instance.
        if self.served_by.is_some()
            && (content_type.contains("json") || content_type.contains("event-stream"))
        {
            self.usage = Some(UsageScanner::new());
        }
        if let Some(model) = &self.served_model {
            let _ =
                hostcalls::set_map_value(MapType::HttpResponseHeaders, MODEL_HEADER, Some(model));
        }
        if self.config.gateway.instance_header {
            if let Some(id) = &self.served_by {
                let _ = hostcalls::set_map_value(
                    MapType::HttpResponseHeaders,
                    INSTANCE_HEADER,
                    Some(id),
                );
            }
        }
        Action::Continue
    }

    /// Reads the response for its usage as it passes, without holding it back.
    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.measure.response_bytes = self
            .measure
            .response_bytes
            .saturating_add(u64::try_from(body_size).unwrap_or(0));
        if body_size > 0 {
            let now = now_ns();
            if self.measure.first_byte_ns == 0 {
                self.measure.first_byte_ns = now;
            }
            self.measure.last_byte_ns = now;
        }
        if let Some(scanner) = self.usage.as_mut() {
            if let Ok(Some(bytes)) =
                hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
            {
                scanner.feed(&bytes);
            }
        }
        if end_of_stream {
            self.settle_tokens();
            self.count_breaker(Outcome::Success);
            self.write_log_summary();
        }
        Action::Continue
    }

    /// Envoy logs every stream when it ends: completed, failed, or reset by either side.
    fn on_log(&mut self) {
        self.write_log_summary();
        self.record_metrics();
        self.end_load();
        self.settle_tokens();
        if self.breaker.is_some() {
            let outcome = unfinished_outcome(self.status.is_some());
            self.count_breaker(outcome);
        }
    }
}

impl Drop for Request {
    /// A backstop for `on_log`: the in-flight count must never leak.
    fn drop(&mut self) {
        self.end_load();
        self.settle_tokens();
        self.count_breaker(Outcome::Neutral);
    }
}

impl Request {
    /// The first response byte (or the end of a request that never got one) is the latency
    /// sample; a failure counts as slow.
    fn measure_latency(&mut self, failed: bool) {
        let Some(load) = self.load.as_mut() else {
            return;
        };
        if load.measured {
            return;
        }
        load.measured = true;
        if let Some(key) = &load.latency_key {
            let now = now_ns();
            let mut sample = now.saturating_sub(load.started_ns);
            if failed {
                sample = sample.max(FAILURE_LATENCY_NS);
            }
            record_latency(&HostStore, key, sample, now, load.decay_ns);
        }
    }

    /// Charges the token budgets what the request really used (once): the reported usage, or
    /// the prompt estimate and the completion estimated from the text that passed.
    fn settle_tokens(&mut self) {
        let Some(reservation) = self.tokens.take() else {
            return;
        };
        let used = match self.final_usage() {
            Some(usage) => usage.charge(reservation.prompt_estimate),
            None => reservation.prompt_estimate,
        };
        self.config
            .limits
            .settle_tokens(&HostStore, &reservation.grants, used, now_ns());
    }

    /// What the response reported (or its text let estimate), once it is over.
    fn final_usage(&mut self) -> Option<Usage> {
        if let Some(scanner) = self.usage.take() {
            self.measure.usage = Some(scanner.usage());
        }
        self.measure.usage
    }

    /// Answers the client from the filter (and remembers what the metrics need).
    fn reply(&mut self, reply: &LocalReply) -> Action {
        self.status = Some(reply.status);
        if let Some(service) = reply.service {
            self.measure.service = Some(service.key());
        }
        if let Some(limit) = reply.limited_by {
            self.count_limit_event(limit, "rejected");
            let name = self.config.limits.list.get(limit).map(|l| l.name.clone());
            self.measure.decision = Some(format!("rate_limited: {}", name.unwrap_or_default()));
        }
        if let Some(reason) = reply.reason {
            self.measure.decision = Some(reason.to_string());
        }
        self.write_log_summary();
        send(reply)
    }

    /// The filter's part of the access log line (`jairouter` in Envoy's JSON log, through the
    /// `wasm.jairouter` filter state): one host call, once the request's story is known.
    fn write_log_summary(&mut self) {
        if self.measure.logged {
            return;
        }
        self.measure.logged = true;
        let usage = self.final_usage();
        let m = &self.measure;
        let mut summary = serde_json::Map::new();
        let mut put = |key: &str, value: serde_json::Value| {
            summary.insert(key.to_string(), value);
        };
        put("service", m.service.into());
        // A stand-in's name when a fallback served, with the model asked for beside it.
        let model = self
            .served_model
            .as_deref()
            .or((!m.model.is_empty()).then_some(m.model.as_str()));
        put("model", model.into());
        if self.served_model.is_some() {
            put("fallback_for", self.requested_model.as_deref().into());
        }
        put("instance", self.served_by.as_deref().into());
        put("status", self.status.into());
        // The key's id (never the key), or the token's subject.
        match &self.caller {
            Caller::Anyone => {}
            Caller::Key(_) => {
                let id = self.caller.grants(&self.config).map(|k| k.id.as_str());
                put("api_key", id.into());
            }
            Caller::Token(grants) => put("subject", grants.id.as_str().into()),
        }
        if let Some(usage) = usage {
            put("prompt_tokens", usage.prompt_tokens.into());
            let completion = usage
                .completion_tokens
                .unwrap_or(usage.estimated_completion);
            put("completion_tokens", completion.into());
        }
        if let Some(decision) = &m.decision {
            put("decision", decision.as_str().into());
        }
        let summary = serde_json::Value::Object(summary);
        let _ = hostcalls::set_property(vec!["jairouter"], Some(summary.to_string().as_bytes()));
    }

    /// `jairouter_rate_limit_events_total`: one per limit that decided on the request.
    fn count_limit_event(&self, limit: usize, result: &str) {
        let (Some(limit), Ok(mut metrics)) = (
            self.config.limits.list.get(limit),
            self.metrics.try_borrow_mut(),
        ) else {
            return;
        };
        metrics.add(
            "jairouter_rate_limit_events_total",
            &[
                ("service", self.measure.service.unwrap_or("none")),
                ("algorithm", limit.params.algorithm.name()),
                ("scope", limit.scope.name()),
                ("result", result),
            ],
            1,
        );
    }

    /// The request's metrics, counted in the VM once Envoy logs the stream.
    fn record_metrics(&mut self) {
        let usage = self.final_usage();
        let Ok(mut metrics) = self.metrics.try_borrow_mut() else {
            return;
        };
        if let Some(instance) = &self.served_by {
            metrics.end(instance);
        }
        let m = &self.measure;
        let now = now_ns();
        let service = m.service.unwrap_or("none");
        let method = if m.streamed {
            "STREAM"
        } else {
            m.method.as_str()
        };
        let status = status_class(self.status);
        metrics.add(
            "jairouter_requests_total",
            &[("service", service), ("method", method), ("status", status)],
            1,
        );
        metrics.observe(
            "jairouter_request_duration_seconds",
            &[("service", service), ("method", method)],
            seconds(now.saturating_sub(m.started_ns)),
            &DURATION_BUCKETS,
        );
        let by_service = [("service", service)];
        metrics.add(
            "jairouter_request_size_bytes_sum",
            &by_service,
            m.request_bytes,
        );
        metrics.add("jairouter_request_size_bytes_count", &by_service, 1);
        metrics.add(
            "jairouter_response_size_bytes_sum",
            &by_service,
            m.response_bytes,
        );
        metrics.add("jairouter_response_size_bytes_count", &by_service, 1);
        if let Some(instance) = &self.served_by {
            metrics.add(
                "jairouter_backend_calls_total",
                &[
                    ("service", service),
                    ("instance", instance),
                    ("status", status),
                ],
                1,
            );
            metrics.observe(
                "jairouter_backend_call_duration_seconds",
                &[("service", service), ("instance", instance)],
                seconds(now.saturating_sub(m.routed_ns)),
                &DURATION_BUCKETS,
            );
            let by_model = [("service", service), ("model", m.model.as_str())];
            if let Some(usage) = usage {
                let prompt = usage
                    .prompt_tokens
                    .unwrap_or_else(|| m.request_bytes.div_ceil(4));
                let completion = usage
                    .completion_tokens
                    .unwrap_or(usage.estimated_completion);
                for (kind, tokens) in [("prompt", prompt), ("completion", completion)] {
                    metrics.add(
                        "jairouter_tokens_total",
                        &[by_model[0], by_model[1], ("kind", kind)],
                        tokens,
                    );
                }
                // Streams: how long the first token took, and each one after it.
                if m.streamed && m.first_byte_ns > 0 {
                    metrics.observe(
                        "jairouter_time_to_first_token_seconds",
                        &by_model,
                        seconds(m.first_byte_ns.saturating_sub(m.routed_ns)),
                        &TOKEN_TIME_BUCKETS,
                    );
                    if completion > 1 {
                        let streaming = m.last_byte_ns.saturating_sub(m.first_byte_ns);
                        metrics.observe(
                            "jairouter_time_per_output_token_seconds",
                            &by_model,
                            seconds(streaming) / (completion - 1) as f64,
                            &TOKEN_TIME_BUCKETS,
                        );
                    }
                }
            }
        }
    }

    /// Rewrites the body's `model` to the fallback that stands in for it, so the backend is
    /// asked for a model it serves. The whole buffered body is replaced (Envoy's buffer API
    /// replaces all or appends), and content-length follows.
    fn ask_for(
        &mut self,
        model: &str,
        span: Option<(usize, usize)>,
        body_size: usize,
    ) -> Result<(), &'static str> {
        let (start, end) = span.ok_or("the model's place in the body is unknown")?;
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(Some(body)) => body,
            _ => return Err("the body could not be read"),
        };
        let (Some(before), Some(after)) = (body.get(..start), body.get(end..)) else {
            return Err("the model lies outside the buffered body");
        };
        let quoted = serde_json::to_string(model).map_err(|_| "the model cannot be written")?;
        let mut rewritten = Vec::with_capacity(body.len() + quoted.len());
        rewritten.extend_from_slice(before);
        rewritten.extend_from_slice(quoted.as_bytes());
        rewritten.extend_from_slice(after);
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body.len(), &rewritten)
            .map_err(|_| "Envoy refused the rewritten body")?;
        if let Some(length) = self.content_length {
            let new_length = (length + rewritten.len() as u64).saturating_sub(body.len() as u64);
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "content-length",
                Some(&new_length.to_string()),
            );
        }
        self.served_model = Some(model.to_string());
        Ok(())
    }

    /// Whether Envoy needed more than one attempt (`include_attempt_count_in_response`).
    fn retried(&self) -> bool {
        let retries_possible = self
            .breaker
            .as_ref()
            .is_some_and(|ticket| ticket.retries > 0);
        retries_possible
            && response_header("x-envoy-attempt-count")
                .and_then(|count| count.trim().parse::<u32>().ok())
                .is_some_and(|count| count > 1)
    }

    /// Counts the exchange against the instance's breaker, once.
    fn count_breaker(&mut self, outcome: Outcome) {
        if let Some(ticket) = self.breaker.take() {
            let change = breaker::record(
                &HostStore,
                &ticket.key,
                &ticket.policy,
                ticket.admission,
                outcome,
                now_ns(),
            );
            let instance = self.served_by.as_deref().unwrap_or("?");
            let service = self.measure.service.unwrap_or("none");
            if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
                let event = match outcome {
                    Outcome::Success => Some("success"),
                    Outcome::Failure => Some("failure"),
                    Outcome::Neutral => None,
                };
                let events = event.into_iter().chain(change.map(|_| "state_change"));
                for event in events {
                    metrics.add(
                        "jairouter_circuit_breaker_events_total",
                        &[
                            ("service", service),
                            ("instance", instance),
                            ("event", event),
                        ],
                        1,
                    );
                }
            }
            if let Some((from, to)) = change {
                log::warn!("circuit breaker of instance {instance}: {from:?} -> {to:?}");
            }
        }
    }

    /// Gives the in-flight count back, once, however the request ended.
    fn end_load(&mut self) {
        self.measure_latency(true);
        if let Some(load) = self.load.take() {
            end_request(&HostStore, &load.in_flight_key);
        }
    }

    fn next_random(&self) -> u64 {
        self.rng
            .try_borrow_mut()
            .map(|mut rng| rng.next_u64())
            .unwrap_or(0)
    }

    /// Points the request at the chosen instance and lets Envoy re-select the route.
    fn apply(&mut self, routed: &Routed) -> Action {
        let Some(instance) = self
            .config
            .service(routed.service)
            .and_then(|s| s.instances.get(routed.instance))
        else {
            return self.reply(&LocalReply::error(
                503,
                "server_error",
                "no_available_instance",
                "the chosen instance is gone",
            ));
        };
        if routed.path != self.path {
            let _ =
                hostcalls::set_map_value(MapType::HttpRequestHeaders, ":path", Some(&routed.path));
        }
        for (name, value) in &instance.headers {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
        }
        let _ = hostcalls::set_map_value(
            MapType::HttpRequestHeaders,
            ROUTING_HEADER,
            Some(&instance.cluster),
        );
        // Envoy's global rate-limit filter reads these as descriptors (the route removes them
        // before the request goes upstream). Set by us, whatever the client sent.
        if self.config.gateway.global_rate_limit.is_some() {
            let service = routed.service.key();
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                SERVICE_DESCRIPTOR_HEADER,
                Some(service),
            );
            let _ = hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                MODEL_HEADER,
                Some(&routed.model),
            );
        }
        // The route's retry policy carries the global `retries`; a service that differs (or an
        // upload, not retried unless configured) says so here. Envoy strips this header from
        // clients' requests; ours is set after that.
        if let Some(service) = self.config.service(routed.service) {
            if service.retries != self.config.retries {
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    "x-envoy-max-retries",
                    Some(&service.retries.to_string()),
                );
            }
        }
        if !HOST_CLEARS_ROUTE_CACHE {
            if let Err(status) = hostcalls::call_foreign_function("clear_route_cache", None) {
                log::warn!("clear_route_cache failed: {status:?}");
            }
        }
        self.served_by = Some(instance.id.clone());
        self.measure.routed_ns = now_ns();
        self.measure.service = Some(routed.service.key());
        self.measure.model.clone_from(&routed.model);
        for limit in &routed.limits_passed {
            self.count_limit_event(*limit, "allowed");
        }
        if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
            metrics.begin(&instance.id);
        }
        if let Ok(mut metrics) = self.metrics.try_borrow_mut() {
            let strategy = self
                .config
                .service(routed.service)
                .map_or("random", |s| s.load_balance.strategy.metric_label());
            metrics.add(
                "jairouter_loadbalancer_selections_total",
                &[
                    ("service", routed.service.key()),
                    ("strategy", strategy),
                    ("instance", &instance.id),
                ],
                1,
            );
        }
        self.response_headers.clone_from(&routed.headers);
        self.tokens.clone_from(&routed.tokens);
        self.breaker = match (&instance.breaker, routed.breaker) {
            (Some(policy), Some(admission)) => Some(BreakerTicket {
                key: instance.state_key.clone(),
                policy: *policy,
                admission,
                retries: self.config.service(routed.service).map_or(0, |s| s.retries),
            }),
            _ => None,
        };
        let strategy = self.config.service(routed.service).map(|s| &s.load_balance);
        if let Some(lb) = strategy.filter(|lb| {
            matches!(
                lb.strategy,
                Strategy::LeastConnections | Strategy::LeastLatency
            )
        }) {
            begin_request(&HostStore, &instance.in_flight_key);
            self.load = Some(LoadReport {
                in_flight_key: instance.in_flight_key.clone(),
                latency_key: (lb.strategy == Strategy::LeastLatency)
                    .then(|| instance.latency_key.clone()),
                decay_ns: lb.latency_decay_ms.saturating_mul(1_000_000),
                started_ns: now_ns(),
                measured: false,
            });
        }
        Action::Continue
    }
}

/// How an exchange the breaker has not counted yet ended, read when Envoy logs the stream: a
/// response that began and did not end whole broke midway, the instance's failure unless the
/// client went away; no response at all means the client left first.
/// Creates every shared-data key the configuration uses, before traffic races on it (Envoy
/// ignores CAS on a key that does not exist). Keys that exist keep their state: a reload keeps
/// the buckets, breakers and load of everything it did not change.
fn prepare_shared_keys(config: &Plan) {
    for service in config.services() {
        for pool in service.models.values() {
            ensure_counter(&HostStore, &pool.counter_key);
        }
        for instance in &service.instances {
            ensure_counter(&HostStore, &instance.in_flight_key);
            if unset(&instance.latency_key) {
                let _ = HostStore.set(&instance.latency_key, &LatencyEstimate::INITIAL, None);
            }
        }
    }
    for (key, initial) in config.limits.initial_keys() {
        if unset(&key) {
            let _ = HostStore.set(&key, &initial, None);
        }
    }
    for instance in config.instances() {
        if unset(&instance.state_key) {
            let _ = HostStore.set(&instance.state_key, &Breaker::CLOSED.encode(), None);
        } else if instance.health_check.is_none()
            && breaker::is_unhealthy(&HostStore, &instance.state_key)
        {
            // Checked no more (a reload turned its checks off): not down any more.
            breaker::set_unhealthy(&HostStore, &instance.state_key, false);
        }
    }
}

/// The claims of the token Envoy's jwt_authn verified in front of us (it writes the payload
/// into the request's metadata only then; a client cannot forge metadata).
fn verified_claims(jwt: &JwtOptions) -> Option<TokenClaims> {
    let claim = |name: &str| -> Option<Vec<u8>> {
        let path = vec![
            "metadata",
            "filter_metadata",
            "envoy.filters.http.jwt_authn",
            JWT_PAYLOAD_KEY,
            name,
        ];
        hostcalls::get_property(path).ok().flatten()
    };
    // The provider is configured with the issuer: a verified payload always carries it.
    claim("iss")?;
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap_or_default();
    Some(TokenClaims {
        subject: claim("sub").map(text).unwrap_or_default(),
        permissions: claim(&jwt.permissions_claim)
            .map(|b| claim_values(&b))
            .unwrap_or_default(),
        models: claim(&jwt.models_claim).map(|b| claim_values(&b)),
    })
}

/// A key never written, or emptied by a reload that stopped using it.
fn unset(key: &str) -> bool {
    HostStore.get(key).0.is_none_or(|v| v.is_empty())
}

fn unfinished_outcome(response_started: bool) -> Outcome {
    if !response_started {
        return Outcome::Neutral;
    }
    let details = match hostcalls::get_property(vec!["response", "code_details"]) {
        Ok(Some(bytes)) => String::from_utf8(bytes).unwrap_or_default(),
        _ => String::new(),
    };
    if details.starts_with("downstream_") {
        Outcome::Neutral
    } else {
        Outcome::Failure
    }
}

/// Whether the response came from the instance (not a local reply, such as Envoy's global
/// rate limit's 429).
fn answered_by_upstream() -> bool {
    matches!(
        hostcalls::get_property(vec!["response", "code_details"]),
        Ok(Some(bytes)) if bytes == b"via_upstream"
    )
}

/// A 429's Retry-After in seconds (delta form), at most ten minutes.
fn retry_after_secs() -> Option<u64> {
    let value = response_header("retry-after")?;
    let secs: u64 = value.trim().parse().ok()?;
    Some(secs.min(600))
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn plugin_root_id() -> Option<String> {
    match hostcalls::get_property(vec!["plugin_root_id"]) {
        Ok(Some(bytes)) => String::from_utf8(bytes).ok(),
        _ => None,
    }
}

fn client_address() -> Option<String> {
    match hostcalls::get_property(vec!["source", "address"]) {
        Ok(Some(bytes)) => String::from_utf8(bytes).ok(),
        _ => None,
    }
}

fn response_header(name: &str) -> Option<String> {
    match hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name) {
        Ok(Some(bytes)) => String::from_utf8(bytes).ok(),
        _ => None,
    }
}

fn response_status() -> Option<u32> {
    match hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status") {
        Ok(Some(bytes)) => std::str::from_utf8(&bytes).ok()?.parse().ok(),
        _ => None,
    }
}

fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// Every request header in one host call. The SDK's own `get_map_bytes` unwraps a non-UTF-8
/// name; `HeaderPairs` skips one instead.
fn request_headers() -> HeaderPairs {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: on `Ok` the host has put `size` bytes at `data`, allocated through the SDK's
    // `proxy_on_memory_allocate` (a `Vec<u8>` of that capacity): ownership passes to us.
    let bytes = unsafe {
        match proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
            _ => return HeaderPairs::default(),
        }
    };
    HeaderPairs::parse(&bytes)
}

fn send(reply: &LocalReply) -> Action {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    if let Err(status) =
        hostcalls::send_http_response(reply.status, headers, Some(reply.body.as_bytes()))
    {
        log::warn!("could not send a local reply: {status:?}");
    }
    Action::Pause
}

fn seed() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15)
}

/// Envoy's shared data: one key space for every worker of the process (per `vm_id`).
struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Failed),
        }
    }
}
