//! The thin proxy-wasm layer: reads what the decision logic needs from Envoy and carries its
//! decisions back. Host calls go through `hostcalls` directly, whose results are checked: the SDK's
//! trait helpers unwrap them, and a non-UTF-8 header from a client would panic the VM.

use crate::balance::Rng;
use crate::config::{RouterConfig, INSTANCE_HEADER, MODEL_HEADER, ROUTING_HEADER};
use crate::request::{
    on_request_headers, BodyStep, HeadDecision, Host, LocalReply, RequestHead, Routed,
};
use crate::scan::ScanOutcome;
use crate::store::{ensure_counter, SharedStore, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, Status};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// Body bytes are copied into the VM in windows of this size, and only until the model is known.
const BODY_WINDOW: usize = 16 * 1024;

/// Routing headers a client must never choose: ours, and the one ORIGINAL_DST clusters honour.
const CLIENT_ROUTING_HEADERS: [&str; 2] = [ROUTING_HEADER, "x-envoy-original-dst-host"];

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: None, rng: Rc::new(RefCell::new(Rng::new(seed()))) })
    });
}}

struct Root {
    config: Option<Rc<RouterConfig>>,
    rng: Rc<RefCell<Rng>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(bytes)) => bytes,
            _ => {
                log::error!("no plugin configuration given");
                return false;
            }
        };
        match RouterConfig::from_json(&bytes) {
            Ok(config) => {
                for service in config.services() {
                    for pool in service.models.values() {
                        ensure_counter(&HostStore, &pool.counter_key);
                    }
                }
                let instances = config.instances().count();
                log::info!("configuration loaded ({instances} instances)");
                self.config = Some(Rc::new(config));
                true
            }
            Err(e) => {
                // Refusing makes Envoy keep the last good configuration (or not start).
                log::error!("configuration refused: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(Request {
            config,
            rng: Rc::clone(&self.rng),
            scan: None,
            scanned: 0,
            served_by: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    config: Rc<RouterConfig>,
    rng: Rc<RefCell<Rng>>,
    scan: Option<crate::request::BodyScan>,
    /// Body bytes already fed to the scanner.
    scanned: usize,
    /// The instance id for `x-jairouter-instance`.
    served_by: Option<String>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        for name in CLIENT_ROUTING_HEADERS {
            let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
        }
        let method = request_header(":method").unwrap_or_default();
        let path = request_header(":path").unwrap_or_default();
        let content_type = request_header("content-type");
        let model_header = request_header(MODEL_HEADER);
        let head = RequestHead {
            method: &method,
            path: &path,
            content_type: content_type.as_deref(),
            model_header: model_header.as_deref(),
            end_of_stream,
        };
        let random = self.next_random();
        let host = Host {
            store: &HostStore,
            random,
        };
        match on_request_headers(&self.config, &head, &host) {
            HeadDecision::Reply(reply) => send(&reply),
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
        };
        let buffered = u64::try_from(body_size).unwrap_or(u64::MAX);
        let step = scan.decide(outcome, buffered, end_of_stream, &self.config, &host);
        match step {
            BodyStep::NeedMore => Action::Pause,
            BodyStep::Reply(reply) => {
                self.scan = None;
                send(&reply)
            }
            BodyStep::Route(routed) => {
                self.scan = None;
                self.apply(&routed)
            }
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
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
}

impl Request {
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
            return send(&LocalReply::error(
                503,
                "server_error",
                "no_available_instance",
                "the chosen instance is gone",
            ));
        };
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, ":path", Some(&routed.path));
        for (name, value) in &instance.headers {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
        }
        let _ = hostcalls::set_map_value(
            MapType::HttpRequestHeaders,
            ROUTING_HEADER,
            Some(&instance.cluster),
        );
        if let Err(status) = hostcalls::call_foreign_function("clear_route_cache", None) {
            log::warn!("clear_route_cache failed: {status:?}");
        }
        self.served_by = Some(instance.id.clone());
        Action::Continue
    }
}

fn request_header(name: &str) -> Option<String> {
    match hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name) {
        Ok(Some(bytes)) => String::from_utf8(bytes).ok(),
        _ => None,
    }
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
