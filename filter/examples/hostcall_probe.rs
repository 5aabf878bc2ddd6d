//! A proxy-wasm filter that does nothing but the host calls its configuration names, for
//! `./build.sh bench`: with an empty configuration it is the floor under ours (what any wasm
//! filter costs in Envoy); with steps it prices each kind of host call under load
//! (`./build.sh bench hostcalls`). Steps, comma-separated, `name` or `name:count`:
//! `pause` (hold the headers, read the body, continue from the body callback), `get` (a request
//! header by name), `map` (every request header at once), `set` / `remove` (request headers),
//! `reply-header` (a response header), `route-cache` (the `clear_route_cache` foreign
//! function), `time`, `shared` (a shared-data read and compare-and-swap write), `property`
//! (`source.address`), `panic` (panics on a request carrying `x-probe-panic`: what Envoy does
//! with a VM that died, for the gateway's failure policy test), `lookahead:K` (with `pause`:
//! hold the body until K more 16 KB windows than the first are buffered, reading each, as ours
//! does looking past a model for `max_tokens`), `count` (a counter of body callbacks,
//! `probe_request_body_callbacks`, in Envoy's stats). What our filter asks of Envoy, without its
//! logic: `route` (names the first chat instance's cluster in `x-jairouter-cluster`, as ours
//! names the one it picked), `reply-map:N` (the response head read in one call and written back
//! with N more headers in one, as ours adds its `x-ratelimit-*` and instance headers), `summary:N`
//! (an N-byte access-log summary in the `jairouter` filter state at the response's end),
//! `touch:K` (K KiB of the VM's memory written a cache line at a time each request, half with
//! the request, half with the response: a filter's memory footprint without its logic).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[cfg(target_arch = "wasm32")]
mod probe {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
    use std::cell::RefCell;
    use std::rc::Rc;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
            Box::new(Root(Rc::default(), Rc::default()))
        });
    }}

    #[derive(Default)]
    struct Steps {
        pause: bool,
        get: u32,
        map: u32,
        set: u32,
        remove: u32,
        reply_header: u32,
        route_cache: u32,
        time: u32,
        shared: u32,
        property: u32,
        panic: bool,
        lookahead: u32,
        /// The body-callback counter's metric id (`count`).
        callbacks: Option<u32>,
        route: bool,
        reply_map: u32,
        summary: u32,
        touch: u32,
    }

    /// The steps, and the memory `touch` writes.
    struct Root(Rc<Steps>, Rc<RefCell<Vec<u8>>>);
    impl Context for Root {}
    impl RootContext for Root {
        fn on_configure(&mut self, _: usize) -> bool {
            let text = self.get_plugin_configuration().unwrap_or_default();
            let mut steps = Steps::default();
            for step in String::from_utf8_lossy(&text)
                .split(',')
                .filter(|s| !s.is_empty())
            {
                let (name, count) = step.split_once(':').unwrap_or((step, "1"));
                let count: u32 = count.parse().unwrap_or(1);
                match name {
                    "pause" => steps.pause = true,
                    "get" => steps.get = count,
                    "map" => steps.map = count,
                    "set" => steps.set = count,
                    "remove" => steps.remove = count,
                    "reply-header" => steps.reply_header = count,
                    "route-cache" => steps.route_cache = count,
                    "time" => steps.time = count,
                    "shared" => steps.shared = count,
                    "property" => steps.property = count,
                    "panic" => steps.panic = true,
                    "lookahead" => steps.lookahead = count,
                    "route" => steps.route = true,
                    "reply-map" => steps.reply_map = count,
                    "summary" => steps.summary = count,
                    "touch" => steps.touch = count,
                    "count" => {
                        steps.callbacks = hostcalls::define_metric(
                            proxy_wasm::types::MetricType::Counter,
                            "probe_request_body_callbacks",
                        )
                        .ok()
                    }
                    _ => return false,
                }
            }
            if steps.shared > 0 {
                hostcalls::set_shared_data("probe", Some(b"0"), None).unwrap();
            }
            *self.1.borrow_mut() = vec![0; steps.touch as usize * 1024];
            self.0 = Rc::new(steps);
            true
        }
        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Probe {
                steps: Rc::clone(&self.0),
                memory: Rc::clone(&self.1),
                done: false,
                read: 0,
            }))
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Probe {
        steps: Rc<Steps>,
        memory: Rc<RefCell<Vec<u8>>>,
        done: bool,
        /// Body bytes read so far (`lookahead`).
        read: usize,
    }

    const WINDOW: usize = 16 * 1024;

    impl Probe {
        /// Writes one byte in every 64 of one half of the memory (`touch`).
        fn touch(&self, half: usize) {
            let mut memory = self.memory.borrow_mut();
            let size = memory.len() / 2;
            for line in memory[half * size..(half + 1) * size]
                .iter_mut()
                .step_by(64)
            {
                *line = line.wrapping_add(1);
            }
        }

        fn request_calls(&mut self) {
            self.done = true;
            if self.steps.touch > 0 {
                self.touch(0);
            }
            let s = &self.steps;
            let headers = MapType::HttpRequestHeaders;
            for _ in 0..s.get {
                let _ = hostcalls::get_map_value_bytes(headers, ":path");
            }
            for _ in 0..s.map {
                let _ = hostcalls::get_map_bytes(headers);
            }
            for i in 0..s.set {
                let _ = hostcalls::set_map_value(headers, &format!("x-probe-{i}"), Some("value"));
            }
            for i in 0..s.remove {
                let _ = hostcalls::remove_map_value(headers, &format!("x-absent-{i}"));
            }
            for _ in 0..s.route_cache {
                let _ = hostcalls::call_foreign_function("clear_route_cache", None);
            }
            for _ in 0..s.time {
                let _ = hostcalls::get_current_time();
            }
            for _ in 0..s.shared {
                let (value, cas) = hostcalls::get_shared_data("probe").unwrap_or((None, None));
                let _ = hostcalls::set_shared_data("probe", value.as_deref(), cas);
            }
            for _ in 0..s.property {
                let _ = hostcalls::get_property(vec!["source", "address"]);
            }
            if s.route {
                let _ = hostcalls::set_map_value(
                    headers,
                    "x-jairouter-cluster",
                    Some("jairouter-chat-0"),
                );
            }
        }
    }

    impl Context for Probe {}
    impl HttpContext for Probe {
        fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            if self.steps.panic
                && matches!(
                    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "x-probe-panic"),
                    Ok(Some(_))
                )
            {
                panic!("x-probe-panic");
            }
            if self.steps.pause && !end_of_stream {
                return Action::Pause;
            }
            self.request_calls();
            Action::Continue
        }
        fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
            if let Some(id) = self.steps.callbacks {
                let _ = hostcalls::increment_metric(id, 1);
            }
            if !self.done {
                let want = (self.steps.lookahead as usize + 1) * WINDOW;
                while self.read < size.min(want) {
                    let n = (size.min(want) - self.read).min(WINDOW);
                    let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, self.read, n);
                    self.read += n;
                }
                if self.steps.lookahead > 0 && size < want && !end_of_stream {
                    return Action::Pause;
                }
                self.request_calls();
            }
            Action::Continue
        }
        fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
            if self.steps.touch > 0 {
                self.touch(1);
            }
            if self.steps.reply_map > 0 {
                let head = MapType::HttpResponseHeaders;
                let mut pairs = hostcalls::get_map(head).unwrap_or_default();
                for i in 0..self.steps.reply_map {
                    pairs.push((format!("x-probe-{i}"), "999999999999".to_string()));
                }
                let refs: Vec<(&str, &str)> = pairs
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                let _ = hostcalls::set_map(head, refs);
            }
            for i in 0..self.steps.reply_header {
                let _ = hostcalls::set_map_value(
                    MapType::HttpResponseHeaders,
                    &format!("x-probe-{i}"),
                    Some("999999999999"),
                );
            }
            Action::Continue
        }
        fn on_http_response_body(&mut self, _: usize, end_of_stream: bool) -> Action {
            if end_of_stream && self.steps.summary > 0 {
                let summary = format!(
                    "{{\"probe\":\"{}\"}}",
                    "x".repeat(self.steps.summary.saturating_sub(12) as usize)
                );
                let _ = hostcalls::set_property(vec!["jairouter"], Some(summary.as_bytes()));
            }
            Action::Continue
        }
    }
}
