//! The filter's metrics, under the original's names with labels encoded the way the bootstrap's
//! stats tags take apart (`<name>.<tag>=<value>;`, see envoy-notes), and beside them the
//! OpenTelemetry GenAI semantic conventions' request metrics (`gen_ai.*`).
//!
//! A host call per metric per request would cost about a microsecond each (`./build.sh bench
//! hostcalls`), so the request path only adds to counts in the VM's own memory, and the VM's
//! tick hands the sums to Envoy once a second: a scrape sees them at most a second late.
//! Durations are classic Prometheus histograms made of counters: `_bucket{le=...}` (cumulative,
//! `le` in seconds), `_count`, and `_sum` in whole seconds (the fraction carries over, so
//! averages are right over any window that adds up to many seconds).
//!
//! A finished request is counted once, under one key ([`Metrics::finish`]): its figures for
//! every request family (the original's requests, durations, sizes, backend calls, tokens and
//! stream timings, and the GenAI conventions' four) are kept together and only turned into
//! each family's series when drained. The two families of a duration share the observation
//! (each keeps its own buckets, the sum is the same); a request costs one lookup, however many
//! families it feeds.

use crate::bytes::FastMap;
use crate::json_text::push_decimal;

/// Bucket bounds (seconds) for request and backend durations: LLM calls run from milliseconds
/// (embeddings) to minutes (long generations).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Bucket bounds (seconds) for time to first token and time per output token.
pub const TOKEN_TIME_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The bucket bounds the GenAI semantic conventions advise for each of their histograms.
pub const GEN_AI_DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
pub const GEN_AI_TIME_TO_FIRST_TOKEN_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
pub const GEN_AI_TIME_PER_OUTPUT_TOKEN_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
pub const GEN_AI_TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// The GenAI conventions' metrics, by their names (Envoy's Prometheus output turns the dots
/// into underscores: `gen_ai_client_token_usage_bucket`).
pub const GEN_AI_TOKEN_USAGE: &str = "gen_ai.client.token.usage";
pub const GEN_AI_REQUEST_DURATION: &str = "gen_ai.server.request.duration";
pub const GEN_AI_TIME_TO_FIRST_TOKEN: &str = "gen_ai.server.time_to_first_token";
pub const GEN_AI_TIME_PER_OUTPUT_TOKEN: &str = "gen_ai.server.time_per_output_token";

/// The GenAI conventions' attributes as labels. Written with underscores, as Prometheus needs
/// them and as Envoy would export the dotted names: a dotted tag would also be found by the
/// plain `model` tag's pattern (`.model=` inside `.gen_ai.request.model=`), giving its series
/// a stray `model` label.
pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai_request_model";
pub const GEN_AI_OPERATION_NAME: &str = "gen_ai_operation_name";
pub const GEN_AI_PROVIDER_NAME: &str = "gen_ai_provider_name";
pub const GEN_AI_TOKEN_TYPE: &str = "gen_ai_token_type";
pub const ERROR_TYPE: &str = "error_type";

/// Labels every metric may carry (each has a stats tag in the bootstrap).
pub const TAGS: [&str; 19] = [
    "service",
    "model",
    "instance",
    "status",
    "method",
    "strategy",
    "algorithm",
    "result",
    "event",
    "kind",
    "scope",
    // jairouter_global_rate_limit_calls_total: which call to the rate-limit service, how it went.
    "call",
    "outcome",
    GEN_AI_REQUEST_MODEL,
    GEN_AI_OPERATION_NAME,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_TOKEN_TYPE,
    ERROR_TYPE,
    "le",
];

/// The model label of a request that named no configured model (or none at all): labels take
/// only configured names, so what clients make up cannot grow the series.
pub const UNKNOWN_MODEL: &str = "unknown";

/// The stat name Envoy is given: the metric and its labels, in the order written.
pub fn stat_name(name: &str, labels: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(name.len() + labels.len() * 24);
    write_stat_name(&mut out, name, labels);
    out
}

fn write_stat_name(out: &mut String, name: &str, labels: &[(&str, &str)]) {
    out.push_str(name);
    for (tag, value) in labels {
        out.push('.');
        out.push_str(tag);
        out.push('=');
        // `;` ends a value and `.` would be read as a new tag by nothing but humans; neither
        // appears in what we label with, but a configured name might carry them.
        if value.contains(';') {
            out.extend(value.chars().map(|c| if c == ';' { '_' } else { c }));
        } else {
            out.push_str(value);
        }
        out.push(';');
    }
}

/// What one VM has counted since its last flush.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: FastMap<String, u64>,
    /// Finished requests, by all the labels of the families they feed (see `finish`); turned
    /// into each family's series only when drained, so a request costs one lookup.
    requests: FastMap<String, Requests>,
    /// Requests of this VM now at each instance (by instance id).
    in_flight: FastMap<String, u64>,
    /// Where a key is written before its lookup: a key already counted costs no allocation.
    scratch: String,
}

/// What one request told when it ended.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// The service type's key, `none` when the path named none.
    pub service: &'static str,
    /// `POST`, `GET`..., or `STREAM` for an event stream.
    pub method: &'a str,
    /// A configured model (the one that served, or the one a refused request asked for), else
    /// [`UNKNOWN_MODEL`].
    pub model: &'a str,
    pub status: Option<u32>,
    pub seconds: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The instance it went to, if any.
    pub backend: Option<BackendCall<'a>>,
}

/// A request's exchange with its instance.
#[derive(Debug, Clone, Copy)]
pub struct BackendCall<'a> {
    pub instance: &'a str,
    /// `gen_ai.operation.name`: what the endpoint does (`chat`, `embeddings`...).
    pub operation: &'static str,
    /// `gen_ai.provider.name`: the instance's protocol (`openai`, `anthropic`...).
    pub provider: &'static str,
    /// From sending it to the instance to the end.
    pub seconds: f64,
    /// What the answer used (when it was read for its usage).
    pub tokens: Option<Tokens>,
    /// Streams: from sending to the first bytes, and the rest over the tokens after the first.
    pub first_token: Option<f64>,
    pub per_output_token: Option<f64>,
}

/// A request's tokens: as the answer reported them, else estimated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    /// The answer reported the count (an estimate feeds `jairouter_tokens_total` only: the
    /// GenAI conventions count reported usage, never a guess).
    pub input_reported: bool,
    pub output_reported: bool,
}

/// Observations per bucket since the last drain (not cumulative; the last is +Inf). Empty until
/// the first observation.
#[derive(Debug)]
struct Spread {
    bounds: &'static [f64],
    pending: Vec<u64>,
}

impl Spread {
    fn new(bounds: &'static [f64]) -> Spread {
        Spread {
            bounds,
            pending: Vec::new(),
        }
    }

    fn observe(&mut self, value: f64) {
        if self.pending.is_empty() {
            self.pending = vec![0; self.bounds.len() + 1];
        }
        let at = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        if let Some(slot) = self.pending.get_mut(at) {
            *slot = slot.saturating_add(1);
        }
    }

    /// Adds `_bucket{le}` (every bucket, even one that moved by nothing: a quantile needs them
    /// all), `_count` and `_sum` (given) to `out` when anything was observed; starts afresh.
    fn drain_into(&mut self, out: &mut Drained, name: &str, labels: &[(&str, &str)], sum: u64) {
        let count: u64 = self.pending.iter().sum();
        if count == 0 {
            return;
        }
        let bucket = format!("{name}_bucket");
        let les: Vec<String> = self.bounds.iter().map(|b| b.to_string()).collect();
        let les = les.iter().map(String::as_str).chain(["+Inf"]);
        let mut cumulative = 0u64;
        for (pending, le) in self.pending.iter_mut().zip(les) {
            cumulative = cumulative.saturating_add(*pending);
            *pending = 0;
            let mut with_le = labels.to_vec();
            with_le.push(("le", le));
            out.put(&bucket, &with_le, cumulative);
        }
        out.put(&format!("{name}_count"), labels, count);
        out.put(&format!("{name}_sum"), labels, sum);
    }
}

/// One duration (seconds) of a request, observed into the buckets of the original's family and,
/// when the request belongs to it, of the GenAI conventions' one: the same observation, each
/// family's own bounds, the same sum (whole seconds handed over, the fraction carried).
#[derive(Debug)]
struct Timing {
    ours: Spread,
    gen_ai: Option<Spread>,
    carry: f64,
}

impl Timing {
    fn new(ours: &'static [f64], gen_ai: Option<&'static [f64]>) -> Timing {
        Timing {
            ours: Spread::new(ours),
            gen_ai: gen_ai.map(Spread::new),
            carry: 0.0,
        }
    }

    fn observe(&mut self, seconds: f64) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        self.ours.observe(seconds);
        if let Some(gen_ai) = &mut self.gen_ai {
            gen_ai.observe(seconds);
        }
        self.carry += seconds;
    }

    /// Both families' series: `(name, labels)` of each.
    fn drain_into(
        &mut self,
        out: &mut Drained,
        ours: (&str, &[(&str, &str)]),
        gen_ai: (&str, &[(&str, &str)]),
    ) {
        let whole = self.carry.floor();
        let seconds = if whole >= 1.0 {
            self.carry -= whole;
            whole as u64
        } else {
            0
        };
        self.ours.drain_into(out, ours.0, ours.1, seconds);
        if let Some(spread) = &mut self.gen_ai {
            spread.drain_into(out, gen_ai.0, gen_ai.1, seconds);
        }
    }
}

/// One token type's counts.
#[derive(Debug)]
struct TokenTally {
    /// Reported and estimated (`jairouter_tokens_total`).
    total: u64,
    /// Reported, per request (`gen_ai.client.token.usage`), and their sum.
    usage: Spread,
    reported: u64,
}

impl TokenTally {
    fn new() -> TokenTally {
        TokenTally {
            total: 0,
            usage: Spread::new(&GEN_AI_TOKEN_BUCKETS),
            reported: 0,
        }
    }

    fn add(&mut self, tokens: u64, reported: bool) {
        self.total = self.total.saturating_add(tokens);
        if reported {
            self.usage.observe(tokens as f64);
            self.reported = self.reported.saturating_add(tokens);
        }
    }

    /// Its series: `jairouter_tokens_total` (by model and kind) and the conventions' token
    /// usage (by token type).
    fn drain_into(&mut self, out: &mut Drained, by_kind: &[(&str, &str)], typed: &[(&str, &str)]) {
        out.add(
            "jairouter_tokens_total",
            by_kind,
            std::mem::take(&mut self.total),
        );
        let reported = std::mem::take(&mut self.reported);
        self.usage
            .drain_into(out, GEN_AI_TOKEN_USAGE, typed, reported);
    }
}

/// The GenAI request duration's `error.type`: the status of an error answer, `_OTHER` when there
/// was no answer, none for a success.
fn error_type(status: Option<u32>) -> Option<String> {
    match status {
        None => Some("_OTHER".to_string()),
        Some(s) => (s >= 400).then(|| s.to_string()),
    }
}

/// The finished requests of one label set, since the last drain.
#[derive(Debug)]
struct Requests {
    service: &'static str,
    method: String,
    model: String,
    status: Option<u32>,
    backend: Option<BackendLabels>,
    count: u64,
    request_bytes: u64,
    response_bytes: u64,
    duration: Timing,
    backend_duration: Timing,
    input: TokenTally,
    output: TokenTally,
    first_token: Timing,
    per_output_token: Timing,
}

#[derive(Debug)]
struct BackendLabels {
    instance: String,
    operation: &'static str,
    provider: &'static str,
}

impl Requests {
    fn new(r: &Finished<'_>) -> Requests {
        let routed = r.backend.is_some();
        // The conventions time the tokens of successful answers only.
        let succeeded = routed && r.status.is_some_and(|s| (200..300).contains(&s));
        Requests {
            service: r.service,
            method: r.method.to_string(),
            model: r.model.to_string(),
            status: r.status,
            backend: r.backend.map(|b| BackendLabels {
                instance: b.instance.to_string(),
                operation: b.operation,
                provider: b.provider,
            }),
            count: 0,
            request_bytes: 0,
            response_bytes: 0,
            duration: Timing::new(
                &DURATION_BUCKETS,
                routed.then_some(&GEN_AI_DURATION_BUCKETS),
            ),
            backend_duration: Timing::new(&DURATION_BUCKETS, None),
            input: TokenTally::new(),
            output: TokenTally::new(),
            first_token: Timing::new(
                &TOKEN_TIME_BUCKETS,
                succeeded.then_some(&GEN_AI_TIME_TO_FIRST_TOKEN_BUCKETS),
            ),
            per_output_token: Timing::new(
                &TOKEN_TIME_BUCKETS,
                succeeded.then_some(&GEN_AI_TIME_PER_OUTPUT_TOKEN_BUCKETS),
            ),
        }
    }

    fn add(&mut self, r: &Finished<'_>) {
        self.count = self.count.saturating_add(1);
        self.request_bytes = self.request_bytes.saturating_add(r.request_bytes);
        self.response_bytes = self.response_bytes.saturating_add(r.response_bytes);
        self.duration.observe(r.seconds);
        let Some(backend) = &r.backend else {
            return;
        };
        self.backend_duration.observe(backend.seconds);
        if let Some(tokens) = backend.tokens {
            self.input.add(tokens.input, tokens.input_reported);
            self.output.add(tokens.output, tokens.output_reported);
        }
        if let Some(seconds) = backend.first_token {
            self.first_token.observe(seconds);
        }
        if let Some(seconds) = backend.per_output_token {
            self.per_output_token.observe(seconds);
        }
    }

    /// Every family's series of these requests.
    fn drain_into(&mut self, out: &mut Drained) {
        let status = status_class(self.status);
        let (service, method, model) = (self.service, self.method.as_str(), self.model.as_str());
        let by_request = [("service", service), ("method", method), ("model", model)];
        let count = std::mem::take(&mut self.count);
        let counted = [
            by_request[0],
            by_request[1],
            by_request[2],
            ("status", status),
        ];
        out.add("jairouter_requests_total", &counted, count);
        let by_service = [("service", service)];
        let sizes = [
            ("jairouter_request_size_bytes", &mut self.request_bytes),
            ("jairouter_response_size_bytes", &mut self.response_bytes),
        ];
        for (name, bytes) in sizes {
            out.add(&format!("{name}_sum"), &by_service, std::mem::take(bytes));
            out.add(&format!("{name}_count"), &by_service, count);
        }
        let ours = ("jairouter_request_duration_seconds", &by_request[..]);
        let Some(backend) = &self.backend else {
            self.duration.drain_into(out, ours, ("", &[]));
            return;
        };
        let gen_ai = [
            (GEN_AI_REQUEST_MODEL, model),
            (GEN_AI_OPERATION_NAME, backend.operation),
            (GEN_AI_PROVIDER_NAME, backend.provider),
        ];
        let error = error_type(self.status);
        let mut with_error = gen_ai.to_vec();
        with_error.extend(error.as_deref().map(|e| (ERROR_TYPE, e)));
        self.duration
            .drain_into(out, ours, (GEN_AI_REQUEST_DURATION, &with_error));
        let by_instance = [
            ("service", service),
            ("instance", backend.instance.as_str()),
        ];
        let counted = [by_instance[0], by_instance[1], ("status", status)];
        out.add("jairouter_backend_calls_total", &counted, count);
        let call = ("jairouter_backend_call_duration_seconds", &by_instance[..]);
        self.backend_duration.drain_into(out, call, ("", &[]));
        let by_model = [("service", service), ("model", model)];
        let tallies = [
            ("prompt", "input", &mut self.input),
            ("completion", "output", &mut self.output),
        ];
        for (kind, token_type, tally) in tallies {
            let by_kind = [by_model[0], by_model[1], ("kind", kind)];
            let typed = [
                gen_ai[0],
                gen_ai[1],
                gen_ai[2],
                (GEN_AI_TOKEN_TYPE, token_type),
            ];
            tally.drain_into(out, &by_kind, &typed);
        }
        let timings = [
            (
                &mut self.first_token,
                "jairouter_time_to_first_token_seconds",
                GEN_AI_TIME_TO_FIRST_TOKEN,
            ),
            (
                &mut self.per_output_token,
                "jairouter_time_per_output_token_seconds",
                GEN_AI_TIME_PER_OUTPUT_TOKEN,
            ),
        ];
        for (timing, ours, theirs) in timings {
            timing.drain_into(out, (ours, &by_model), (theirs, &gen_ai));
        }
    }
}

/// The counts a drain hands over, by stat name (several label sets may add to one series).
#[derive(Default)]
struct Drained {
    counts: FastMap<String, u64>,
}

impl Drained {
    /// A count that moved (nothing is written for 0).
    fn add(&mut self, name: &str, labels: &[(&str, &str)], delta: u64) {
        if delta > 0 {
            self.put(name, labels, delta);
        }
    }

    /// A histogram's part, written even when it moved by nothing.
    fn put(&mut self, name: &str, labels: &[(&str, &str)], delta: u64) {
        let slot = self.counts.entry(stat_name(name, labels)).or_insert(0);
        *slot = slot.saturating_add(delta);
    }
}

impl Metrics {
    pub fn add(&mut self, name: &str, labels: &[(&str, &str)], delta: u64) {
        if delta == 0 {
            return;
        }
        self.scratch.clear();
        write_stat_name(&mut self.scratch, name, labels);
        match self.counters.get_mut(self.scratch.as_str()) {
            Some(slot) => *slot = slot.saturating_add(delta),
            None => {
                self.counters.insert(self.scratch.clone(), delta);
            }
        }
    }

    /// A request is over: counted for every request family at once.
    pub fn finish(&mut self, request: &Finished<'_>) {
        let key = &mut self.scratch;
        key.clear();
        let backend = request.backend.as_ref();
        let status = request.status.unwrap_or(0);
        // Written by hand: core::fmt costs more than the lookup in wasm (see push_decimal).
        for (n, part) in [request.service, request.method, request.model]
            .into_iter()
            .enumerate()
        {
            if n > 0 {
                key.push('\u{1f}');
            }
            key.push_str(part);
        }
        key.push('\u{1f}');
        push_decimal(key, u64::from(status));
        for part in [
            backend.map_or("", |b| b.instance),
            backend.map_or("", |b| b.operation),
            backend.map_or("", |b| b.provider),
        ] {
            key.push('\u{1f}');
            key.push_str(part);
        }
        match self.requests.get_mut(key.as_str()) {
            Some(requests) => requests.add(request),
            None => {
                let mut requests = Requests::new(request);
                requests.add(request);
                self.requests.insert(key.clone(), requests);
            }
        }
    }

    /// The counts to hand to Envoy, by stat name; the VM starts counting afresh.
    pub fn drain(&mut self) -> Vec<(String, u64)> {
        let mut out = Drained {
            counts: self.counters.drain().collect(),
        };
        for requests in self.requests.values_mut() {
            requests.drain_into(&mut out);
        }
        out.counts.into_iter().collect()
    }

    /// A request of this VM went to the instance.
    pub fn begin(&mut self, instance: &str) {
        match self.in_flight.get_mut(instance) {
            Some(slot) => *slot = slot.saturating_add(1),
            None => {
                self.in_flight.insert(instance.to_string(), 1);
            }
        }
    }

    /// A request of this VM at the instance is over.
    pub fn end(&mut self, instance: &str) {
        if let Some(slot) = self.in_flight.get_mut(instance) {
            *slot = slot.saturating_sub(1);
        }
    }

    /// This VM's requests in flight, by instance (every instance it ever sent one to).
    pub fn in_flight(&self) -> impl Iterator<Item = (&str, u64)> {
        self.in_flight.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// A status code's class as a label (`2xx`, `4xx`, ...; `0xx` when there was no answer).
pub fn status_class(status: Option<u32>) -> &'static str {
    match status.map(|s| s / 100) {
        Some(1) => "1xx",
        Some(2) => "2xx",
        Some(3) => "3xx",
        Some(4) => "4xx",
        Some(5) => "5xx",
        _ => "0xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn drained(m: &mut Metrics) -> HashMap<String, u64> {
        m.drain().into_iter().collect()
    }

    #[test]
    fn names_carry_their_labels_for_the_stats_tags() {
        assert_eq!(
            stat_name(
                "jairouter_requests_total",
                &[("service", "chat"), ("status", "2xx")]
            ),
            "jairouter_requests_total.service=chat;.status=2xx;"
        );
        assert_eq!(stat_name("m", &[("model", "a;b")]), "m.model=a_b;");
    }

    #[test]
    fn counters_add_up_until_drained() {
        let mut m = Metrics::default();
        m.add("c", &[("service", "chat")], 2);
        m.add("c", &[("service", "chat")], 3);
        m.add("c", &[("service", "embedding")], 0);
        let got = drained(&mut m);
        assert_eq!(got.len(), 1);
        assert_eq!(got["c.service=chat;"], 5);
        assert!(m.drain().is_empty());
    }

    fn refused(model: &str, status: u32) -> Finished<'_> {
        Finished {
            service: "chat",
            method: "POST",
            model,
            status: Some(status),
            seconds: 0.3,
            request_bytes: 40,
            response_bytes: 100,
            backend: None,
        }
    }

    fn served(status: u32, seconds: f64, tokens: Option<Tokens>) -> Finished<'static> {
        Finished {
            service: "chat",
            method: "POST",
            model: "llama",
            status: Some(status),
            seconds,
            request_bytes: 50,
            response_bytes: 200,
            backend: Some(BackendCall {
                instance: "chat-0",
                operation: "chat",
                provider: "openai",
                seconds: seconds - 0.01,
                tokens,
                first_token: None,
                per_output_token: None,
            }),
        }
    }

    fn tokens(input: u64, output: u64, reported: bool) -> Tokens {
        Tokens {
            input,
            output,
            input_reported: reported,
            output_reported: reported,
        }
    }

    const GEN_AI: &str =
        ".gen_ai_request_model=llama;.gen_ai_operation_name=chat;.gen_ai_provider_name=openai;";

    #[test]
    fn histograms_are_cumulative_buckets_count_and_whole_second_sums() {
        let mut m = Metrics::default();
        for seconds in [0.3, 0.8, 7.0] {
            m.finish(&Finished {
                seconds,
                ..refused("llama", 429)
            });
        }
        let got = drained(&mut m);
        let name = "jairouter_request_duration_seconds";
        let labels = ".service=chat;.method=POST;.model=llama;";
        let bucket = |le: &str| got.get(&format!("{name}_bucket{labels}.le={le};")).copied();
        assert_eq!(bucket("0.25"), Some(0));
        assert_eq!(bucket("0.5"), Some(1));
        assert_eq!(bucket("1"), Some(2));
        assert_eq!(bucket("5"), Some(2));
        assert_eq!(bucket("10"), Some(3));
        assert_eq!(bucket("+Inf"), Some(3));
        assert_eq!(got[&format!("{name}_count{labels}")], 3);
        assert_eq!(
            got[&format!("{name}_sum{labels}")],
            8,
            "0.3 + 0.8 + 7.0 = 8.1: 8 whole seconds"
        );
        m.finish(&Finished {
            seconds: 0.95,
            ..refused("llama", 429)
        });
        assert_eq!(
            drained(&mut m)[&format!("{name}_sum{labels}")],
            1,
            "0.1 carried + 0.95"
        );
        m.finish(&Finished {
            seconds: f64::NAN,
            ..refused("llama", 429)
        });
        let got = drained(&mut m);
        assert_eq!(got[&format!("{name}_bucket{labels}.le=0.005;")], 1);
        assert_eq!(
            got[&format!("{name}_sum{labels}")],
            0,
            "a histogram's sum is always there"
        );
        assert!(m.drain().is_empty(), "nothing moved since");
    }

    #[test]
    fn a_request_counts_once_for_each_family_it_feeds() {
        let mut m = Metrics::default();
        m.finish(&refused("unknown", 404));
        m.finish(&refused("unknown", 404));
        m.finish(&refused("llama", 429));
        let got = drained(&mut m);
        let requests = |model: &str, status: &str| {
            got.get(&format!(
                "jairouter_requests_total.service=chat;.method=POST;.model={model};.status={status};"
            ))
            .copied()
        };
        assert_eq!(requests("unknown", "4xx"), Some(2));
        assert_eq!(requests("llama", "4xx"), Some(1));
        // The sizes are by service only: the three label sets add up.
        assert_eq!(got["jairouter_request_size_bytes_sum.service=chat;"], 120);
        assert_eq!(got["jairouter_request_size_bytes_count.service=chat;"], 3);
        assert_eq!(got["jairouter_response_size_bytes_sum.service=chat;"], 300);
        // A request that reached no instance is no GenAI operation and no backend call.
        assert!(
            got.keys()
                .all(|k| !k.starts_with("gen_ai") && !k.starts_with("jairouter_backend")),
            "{got:?}"
        );
    }

    #[test]
    fn a_served_request_feeds_the_genai_series_beside_the_originals() {
        let mut m = Metrics::default();
        m.finish(&served(200, 0.5, Some(tokens(10, 300, true))));
        m.finish(&served(200, 1.7, Some(tokens(10, 300, true))));
        // Counted by the original's metric, never by the conventions' (no estimates there).
        m.finish(&served(200, 0.1, Some(tokens(5, 7, false))));
        let got = drained(&mut m);
        let get = |name: &str| got.get(name).copied();
        assert_eq!(
            get("jairouter_requests_total.service=chat;.method=POST;.model=llama;.status=2xx;"),
            Some(3)
        );
        assert_eq!(
            get("jairouter_backend_calls_total.service=chat;.instance=chat-0;.status=2xx;"),
            Some(3)
        );
        assert_eq!(
            get("jairouter_tokens_total.service=chat;.model=llama;.kind=prompt;"),
            Some(25)
        );
        assert_eq!(
            get("jairouter_tokens_total.service=chat;.model=llama;.kind=completion;"),
            Some(607)
        );
        let usage = |suffix: &str, token_type: &str, le: Option<&str>| {
            let le = le.map(|le| format!(".le={le};")).unwrap_or_default();
            get(&format!(
                "gen_ai.client.token.usage_{suffix}{GEN_AI}.gen_ai_token_type={token_type};{le}"
            ))
        };
        assert_eq!(usage("count", "input", None), Some(2));
        assert_eq!(usage("sum", "input", None), Some(20));
        assert_eq!(usage("sum", "output", None), Some(600));
        assert_eq!(usage("bucket", "input", Some("16")), Some(2));
        assert_eq!(usage("bucket", "input", Some("4")), Some(0));
        assert_eq!(usage("bucket", "output", Some("256")), Some(0));
        assert_eq!(usage("bucket", "output", Some("1024")), Some(2));
        assert_eq!(usage("bucket", "output", Some("67108864")), Some(2));
        assert_eq!(usage("bucket", "output", Some("+Inf")), Some(2));
        // One duration, both families: each its own buckets, the same count and sum.
        let duration =
            |name: &str, labels: &str, suffix: &str| get(&format!("{name}_{suffix}{labels}"));
        let ours = (
            "jairouter_request_duration_seconds",
            ".service=chat;.method=POST;.model=llama;",
        );
        let theirs = ("gen_ai.server.request.duration", GEN_AI);
        for (name, labels) in [ours, theirs] {
            assert_eq!(duration(name, labels, "count"), Some(3), "{name}");
            assert_eq!(duration(name, labels, "sum"), Some(2), "{name}: 2.3 s");
        }
        assert_eq!(duration(ours.0, ours.1, "bucket"), None);
        assert_eq!(
            get(&format!("{}_bucket{}.le=0.64;", theirs.0, theirs.1)),
            Some(2)
        );
        assert_eq!(
            get(&format!("{}_bucket{}.le=0.5;", ours.0, ours.1)),
            Some(2)
        );
        assert_eq!(
            get(&format!("{}_bucket{}.le=0.5;", theirs.0, theirs.1)),
            None
        );
    }

    #[test]
    fn failures_name_their_error_and_only_successful_streams_are_timed_per_token() {
        let mut m = Metrics::default();
        let stream = |status: Option<u32>| {
            let mut r = served(200, 2.0, None);
            r.status = status;
            r.method = "STREAM";
            if let Some(b) = r.backend.as_mut() {
                b.tokens = Some(tokens(3, 11, true));
                b.first_token = Some(0.2);
                b.per_output_token = Some(0.03);
            }
            r
        };
        m.finish(&stream(Some(200)));
        m.finish(&stream(Some(200)));
        m.finish(&stream(Some(503)));
        m.finish(&stream(None));
        let got = drained(&mut m);
        let get = |name: String| got.get(&name).copied();
        let duration = "gen_ai.server.request.duration_count";
        assert_eq!(get(format!("{duration}{GEN_AI}")), Some(2));
        assert_eq!(get(format!("{duration}{GEN_AI}.error_type=503;")), Some(1));
        assert_eq!(
            get(format!("{duration}{GEN_AI}.error_type=_OTHER;")),
            Some(1)
        );
        let by_model = ".service=chat;.model=llama;";
        // The original's count every stream that had a first byte; the conventions' the
        // successful ones.
        for (ours, theirs) in [
            (
                "jairouter_time_to_first_token_seconds",
                "gen_ai.server.time_to_first_token",
            ),
            (
                "jairouter_time_per_output_token_seconds",
                "gen_ai.server.time_per_output_token",
            ),
        ] {
            assert_eq!(get(format!("{ours}_count{by_model}")), Some(4), "{ours}");
            assert_eq!(get(format!("{theirs}_count{GEN_AI}")), Some(2), "{theirs}");
        }
        assert_eq!(
            get(format!(
                "gen_ai.server.time_to_first_token_bucket{GEN_AI}.le=0.25;"
            )),
            Some(2)
        );
        assert_eq!(
            get(format!(
                "gen_ai.server.time_per_output_token_bucket{GEN_AI}.le=0.025;"
            )),
            Some(0)
        );
        assert_eq!(
            get(format!(
                "gen_ai.server.time_per_output_token_bucket{GEN_AI}.le=0.05;"
            )),
            Some(2)
        );
        assert_eq!(
            get(
                "jairouter_requests_total.service=chat;.method=STREAM;.model=llama;.status=0xx;"
                    .to_string()
            ),
            Some(1)
        );
    }

    #[test]
    fn the_genai_bounds_are_the_conventions_advice_in_order() {
        for bounds in [
            &GEN_AI_DURATION_BUCKETS[..],
            &GEN_AI_TIME_TO_FIRST_TOKEN_BUCKETS,
            &GEN_AI_TIME_PER_OUTPUT_TOKEN_BUCKETS,
            &GEN_AI_TOKEN_BUCKETS,
        ] {
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        }
        // Powers of four from 1 to 4^13 tokens; durations doubling from 10 ms.
        assert!(GEN_AI_TOKEN_BUCKETS
            .iter()
            .enumerate()
            .all(|(i, b)| *b == 4f64.powi(i as i32)));
        assert!(GEN_AI_DURATION_BUCKETS
            .iter()
            .enumerate()
            .all(|(i, b)| (*b - 0.01 * 2f64.powi(i as i32)).abs() < 1e-9));
    }

    #[test]
    fn in_flight_counts_rise_and_fall_per_instance() {
        let mut m = Metrics::default();
        m.begin("a");
        m.begin("a");
        m.begin("b");
        m.end("a");
        m.end("c");
        let mut got: Vec<_> = m.in_flight().collect();
        got.sort();
        assert_eq!(got, [("a", 1), ("b", 1)]);
        m.end("b");
        m.end("b");
        assert!(m.in_flight().any(|(i, n)| i == "b" && n == 0));
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(Some(200)), "2xx");
        assert_eq!(status_class(Some(429)), "4xx");
        assert_eq!(status_class(Some(503)), "5xx");
        assert_eq!(status_class(None), "0xx");
        assert_eq!(status_class(Some(99)), "0xx");
    }
}
