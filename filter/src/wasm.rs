//! The thin proxy-wasm binding: one small context per concern (the router, the process's health
//! checker, the status page), and `WasmHost`, the one implementation of `Host` over proxy-wasm
//! host calls. Every decision lives in plain Rust modules; this file only carries bytes in and
//! decisions out. Host calls go through `hostcalls` directly, whose results are checked: the
//! SDK's trait helpers unwrap them, and a non-UTF-8 header from a client would panic the VM.

use crate::balance::Rng;
use crate::config::TokenSettlement;
use crate::contract::RATE_LIMIT_CLUSTER;
use crate::contract::{HEALTH_ROOT_ID, STATUS_ROOT_ID};
use crate::exchange::GLOBAL_CALLS_METRIC;
use crate::exchange::{Exchange, Flow, Worker};
use crate::headers::HeaderPairs;
use crate::health::HealthRun;
use crate::host::Host;
use crate::install::install;
use crate::limit::global::Transition;
use crate::limit::rls::{self, Settlement};
use crate::metrics::stat_name;
use crate::plan::Plan;
use crate::status::{config_version, instance_gauges, status_page};
use crate::store::{SharedStore, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

/// How often each VM hands its metrics to Envoy and reports its linear memory.
const REPORT_PERIOD: Duration = Duration::from_secs(1);
/// How often a VM sends its token settlements to the rate-limit service.
const SETTLE_PERIOD: Duration = Duration::from_millis(200);
/// Settlements per call at most.
const SETTLE_BATCH: usize = 1024;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    // After the SDK's own hook (set with the log level): say what died and where, once, at
    // critical level, without a hook that can itself panic. Envoy then replaces the VM.
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(
            LogLevel::Critical,
            &format!("jairouter filter panicked, its VM will be replaced: {info}"),
        );
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// The root context, whose concern the plugin's root id decides at configure time.
#[derive(Default)]
struct Root {
    concern: Concern,
    stats: VmStats,
}

#[derive(Default)]
enum Concern {
    #[default]
    Unconfigured,
    Router(Router),
    Health(HealthRun),
    Status,
}

/// The routing filter: the compiled configuration every request shares, and what this VM's
/// requests count between ticks.
struct Router {
    plan: Rc<Plan>,
    /// What the VM keeps across requests (its refunds are paid at each tick).
    worker: Rc<Worker>,
    /// The settlements of the call in flight (put back if it fails).
    settling: Option<(u32, Vec<Settlement>)>,
    /// When the metrics were last handed to Envoy.
    reported_ns: u64,
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token: u32, status: u32, _size: usize) {
        if let Concern::Router(router) = &mut self.concern {
            router.settled(token, status);
        }
    }

    fn on_http_call_response(&mut self, token: u32, _: usize, _: usize, _: usize) {
        if let Concern::Health(run) = &mut self.concern {
            // No headers at all: Envoy gave up (timeout, reset).
            let status =
                hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
                    .ok()
                    .flatten()
                    .and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok());
            run.answered(token, status, &WasmHost);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        // The health checker and the status page read the configuration the routing filter
        // publishes; they need none of their own.
        match plugin_root_id().as_deref() {
            Some(HEALTH_ROOT_ID) => {
                self.concern = Concern::Health(HealthRun::default());
                // Soon, to find the routing filter's configuration as it is published.
                let _ = hostcalls::set_tick_period(Duration::from_millis(100));
                return true;
            }
            Some(STATUS_ROOT_ID) => {
                self.concern = Concern::Status;
                return true;
            }
            _ => {}
        }
        let Ok(Some(bytes)) = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
        else {
            log::error!("no plugin configuration given");
            return false;
        };
        let version = config_version(&bytes);
        match Plan::from_json(&bytes) {
            Ok(plan) => {
                install(&plan, &bytes, &WasmHost);
                // Limits across replicas settle token budgets from the tick: more often.
                let tick = match plan.spec.gateway.global_rate_limit {
                    Some(_) => SETTLE_PERIOD,
                    None => REPORT_PERIOD,
                };
                let _ = hostcalls::set_tick_period(tick);
                log::info!(
                    "configuration {version} loaded ({} instances)",
                    plan.instances().count()
                );
                // A reload keeps the VM's counts, random stream and rotations; the refunds
                // owed are paid under the plan they were drawn under.
                let worker = match &self.concern {
                    Concern::Router(r) => {
                        r.pay_refunds();
                        Rc::clone(&r.worker)
                    }
                    _ => Rc::new(Worker::new(now_ns())),
                };
                let plan = Rc::new(plan);
                self.concern = Concern::Router(Router {
                    plan,
                    worker,
                    settling: None,
                    reported_ns: 0,
                });
                true
            }
            Err(e) => {
                // Refusing makes Envoy keep the last good configuration (or not start).
                log::error!("configuration {version} refused: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        match &mut self.concern {
            Concern::Health(run) => {
                if let Some(tick_ms) = run.follow(&WasmHost) {
                    let _ = hostcalls::set_tick_period(Duration::from_millis(tick_ms));
                }
                for at in run.due(now_ns()) {
                    match run.target(at).map(dispatch_check) {
                        Some(Ok(token)) => run.sent(token, at),
                        Some(Err(status)) => {
                            log::warn!("health check not sent: {status:?}");
                            run.not_sent(at, &WasmHost);
                        }
                        None => {}
                    }
                }
            }
            Concern::Router(router) => {
                router.settle();
                router.pay_refunds();
                let now = now_ns();
                if now.saturating_sub(router.reported_ns)
                    < REPORT_PERIOD.as_nanos() as u64 - 50_000_000
                {
                    return;
                }
                router.reported_ns = now;
                let drained = router
                    .worker
                    .metrics
                    .try_borrow_mut()
                    .map(|mut m| m.drain());
                for (name, delta) in drained.unwrap_or_default() {
                    self.stats.add(&name, delta);
                }
                let in_flight: Vec<(String, u64)> = match router.worker.metrics.try_borrow() {
                    Ok(m) => m.in_flight().map(|(i, n)| (i.to_string(), n)).collect(),
                    Err(_) => Vec::new(),
                };
                let vm = self.stats.vm.clone();
                for (instance, count) in in_flight {
                    let labels = [("instance", instance.as_str()), ("vm", vm.as_str())];
                    self.stats
                        .gauge(stat_name("jairouter_in_flight_requests", &labels), count);
                }
                for (name, value) in instance_gauges(&router.plan, &WasmHost) {
                    self.stats.gauge(name, value);
                }
            }
            Concern::Status | Concern::Unconfigured => {}
        }
        // Each VM reports its own linear memory: a filter whose memory grows with traffic is a
        // filter that will die of it.
        let pages = core::arch::wasm32::memory_size(0) as u64;
        let name = stat_name("jairouter_vm_memory_bytes", &[("vm", &self.stats.vm)]);
        self.stats.gauge(name, pages * 65_536);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        match &self.concern {
            Concern::Router(r) => {
                let exchange = Exchange::new(Rc::clone(&r.plan), Rc::clone(&r.worker));
                Some(Box::new(Request(exchange)))
            }
            Concern::Status => Some(Box::new(StatusPage)),
            Concern::Health(_) | Concern::Unconfigured => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// This VM's stats as Envoy knows them (ids defined on first use) and its `vm` label.
struct VmStats {
    counters: HashMap<String, u32>,
    gauges: HashMap<String, u32>,
    vm: String,
}

impl Default for VmStats {
    fn default() -> VmStats {
        VmStats {
            counters: HashMap::new(),
            gauges: HashMap::new(),
            vm: format!("{:08x}", Rng::new(now_ns()).next_u64() & 0xffff_ffff),
        }
    }
}

impl VmStats {
    fn add(&mut self, name: &str, delta: u64) {
        if let Some(id) = metric_id(&mut self.counters, MetricType::Counter, name) {
            let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
        }
    }

    fn gauge(&mut self, name: String, value: u64) {
        if let Some(id) = metric_id(&mut self.gauges, MetricType::Gauge, &name) {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// Envoy's id for a stat, defined the first time this VM uses it.
fn metric_id(ids: &mut HashMap<String, u32>, kind: MetricType, name: &str) -> Option<u32> {
    if let Some(id) = ids.get(name) {
        return Some(*id);
    }
    let id = hostcalls::define_metric(kind, name).ok()?;
    ids.insert(name.to_string(), id);
    Some(id)
}

impl Router {
    /// Pays the token refunds the VM owes (no host call when it owes none).
    fn pay_refunds(&self) {
        if let Ok(mut refunds) = self.worker.refunds.try_borrow_mut() {
            if !refunds.is_empty() {
                self.plan
                    .limits
                    .pay_refunds(&WasmHost, &mut refunds, now_ns());
            }
        }
    }

    /// Sends the settlements the VM's requests left, one call at a time.
    fn settle(&mut self) {
        let Some(global) = &self.plan.spec.gateway.global_rate_limit else {
            return;
        };
        if self.settling.is_some() {
            return;
        }
        let Ok(mut link) = self.worker.link.try_borrow_mut() else {
            return;
        };
        let dropped = std::mem::take(&mut link.dropped);
        let batch = link.take(SETTLE_BATCH);
        drop(link);
        self.count("settle", "dropped", dropped);
        if batch.is_empty() {
            return;
        }
        let (service, method, message) = match global.token_settlement {
            TokenSettlement::Refunds => (
                rls::SETTLE_SERVICE,
                rls::SETTLE_METHOD,
                rls::encode_settle(&global.domain, &batch),
            ),
            // Overruns only, as hits on the standard call (any service takes them).
            TokenSettlement::ChargesOnly => {
                let charges: Vec<_> = batch
                    .iter()
                    .map(|s| rls::Descriptor {
                        hits: u64::try_from(s.delta).unwrap_or(0),
                        ..s.descriptor.clone()
                    })
                    .collect();
                (
                    rls::RLS_SERVICE,
                    rls::RLS_METHOD,
                    rls::encode_request(&global.domain, &charges),
                )
            }
        };
        let timeout = Duration::from_millis(global.timeout_ms.max(100));
        match hostcalls::dispatch_grpc_call(
            RATE_LIMIT_CLUSTER,
            service,
            method,
            vec![],
            Some(&message),
            timeout,
        ) {
            Ok(token) => self.settling = Some((token, batch)),
            Err(_) => self.put_back(batch),
        }
    }

    fn settled(&mut self, token: u32, status: u32) {
        let Some((sent, batch)) = self.settling.take() else {
            return;
        };
        if sent != token {
            self.settling = Some((sent, batch));
            return;
        }
        if status == 0 {
            self.count("settle", "ok", 1);
            if let Ok(mut link) = self.worker.link.try_borrow_mut() {
                if link.outcome(true) == Some(Transition::Recovered) {
                    log::info!("rate-limit service answers again");
                }
            }
        } else {
            self.count("settle", "unavailable", 1);
            self.put_back(batch);
        }
    }

    fn put_back(&mut self, batch: Vec<Settlement>) {
        if let Ok(mut link) = self.worker.link.try_borrow_mut() {
            link.put_back(batch);
            if link.outcome(false) == Some(Transition::Failed) {
                log::warn!("rate-limit service cannot take token settlements; they wait");
            }
        }
    }

    fn count(&self, call: &str, outcome: &str, n: u64) {
        if let Ok(mut metrics) = self.worker.metrics.try_borrow_mut() {
            metrics.add(
                GLOBAL_CALLS_METRIC,
                &[("call", call), ("outcome", outcome)],
                n,
            );
        }
    }
}

fn dispatch_check(target: &crate::health::Target) -> Result<u32, Status> {
    let mut headers = vec![
        (":method", "GET"),
        (":path", target.path.as_str()),
        (":authority", target.authority.as_str()),
        ("user-agent", "jairouter-health-check"),
    ];
    headers.extend(target.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    let timeout = Duration::from_millis(target.policy.timeout_ms);
    hostcalls::dispatch_http_call(&target.cluster, headers, None, vec![], timeout)
}

/// One routed request: every callback goes to its exchange.
struct Request(Exchange);

impl Context for Request {
    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        self.0.on_grpc_answer(&WasmHost, token, status, size);
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        action(self.0.on_request_headers(&WasmHost, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_request_body(&WasmHost, body_size, end_of_stream))
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        action(self.0.on_response_headers(&WasmHost, end_of_stream))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.0.on_response_body(&WasmHost, body_size, end_of_stream))
    }

    fn on_log(&mut self) {
        self.0.on_log(&WasmHost);
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.0.on_drop(&WasmHost);
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

/// One request to the status page: answered from shared data, never forwarded.
struct StatusPage;

impl Context for StatusPage {}

impl HttpContext for StatusPage {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let path = WasmHost.request_headers();
        let path = path.get(":path").unwrap_or_default();
        let (status, body) = match path.split('?').next() {
            Some("/status") => status_page(&WasmHost, now_ns()),
            _ => (
                404,
                r#"{"error":"not found: the status page is GET /status"}"#.to_string(),
            ),
        };
        let headers = [
            ("content-type", "application/json"),
            ("cache-control", "no-store"),
        ];
        WasmHost.send_reply(status, &headers, body.as_bytes());
        Action::Pause
    }
}

fn plugin_root_id() -> Option<String> {
    let bytes = hostcalls::get_property(vec!["plugin_root_id"]).ok()??;
    String::from_utf8(bytes).ok()
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

/// Every header of a map in one host call. The SDK's own `get_map_bytes` unwraps a non-UTF-8
/// name; `HeaderPairs` skips one instead.
#[allow(unsafe_code)]
fn header_pairs(map: MapType) -> HeaderPairs {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: on `Ok` the host has put `size` bytes at `data`, allocated through the SDK's
    // `proxy_on_memory_allocate` (a `Vec<u8>` of that capacity): ownership passes to us.
    let bytes = unsafe {
        match proxy_get_header_map_pairs(map, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
            _ => return HeaderPairs::default(),
        }
    };
    HeaderPairs::parse(&bytes)
}

/// Envoy, as the logic sees it: each method is one host call.
struct WasmHost;

impl SharedStore for WasmHost {
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

impl Host for WasmHost {
    fn now_ns(&self) -> u64 {
        now_ns()
    }

    fn request_headers(&self) -> HeaderPairs {
        header_pairs(MapType::HttpRequestHeaders)
    }

    fn set_request_header(&self, name: &str, value: &str) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
    }

    fn remove_request_header(&self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
    }

    fn response_headers(&self) -> HeaderPairs {
        header_pairs(MapType::HttpResponseHeaders)
    }

    fn set_response_header(&self, name: &str, value: &str) {
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
    }

    fn remove_response_header(&self, name: &str) {
        let _ = hostcalls::remove_map_value(MapType::HttpResponseHeaders, name);
    }

    fn replace_response_headers(&self, headers: &[(&str, &str)]) {
        let _ = hostcalls::set_map(MapType::HttpResponseHeaders, headers.to_vec());
    }

    fn request_body(&self, start: usize, len: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, start, len)
            .ok()
            .flatten()
    }

    fn replace_request_body(&self, len: usize, body: &[u8]) -> bool {
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, len, body).is_ok()
    }

    fn response_body(&self, len: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, len)
            .ok()
            .flatten()
    }

    fn replace_response_body(&self, len: usize, body: &[u8]) -> bool {
        hostcalls::set_buffer(BufferType::HttpResponseBody, 0, len, body).is_ok()
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn set_property(&self, path: &[&str], value: &[u8]) {
        let _ = hostcalls::set_property(path.to_vec(), Some(value));
    }

    fn dispatch_grpc(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u64,
    ) -> Option<u32> {
        let timeout = Duration::from_millis(timeout_ms);
        hostcalls::dispatch_grpc_call(cluster, service, method, vec![], Some(message), timeout).ok()
    }

    fn grpc_answer(&self, len: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, len)
            .ok()
            .flatten()
    }

    fn resume_request(&self) {
        let _ = hostcalls::resume_http_request();
    }

    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        if let Err(status) = hostcalls::send_http_response(status, headers.to_vec(), Some(body)) {
            log::warn!("could not send a local reply: {status:?}");
        }
    }
}
