//! The policy blocks of the configuration (`load-balance`, `rate-limit`, `circuit-breaker`,
//! `fallback`), with the original's defaults. They may stand globally, per service and (limits
//! and breakers) per instance.

use super::reader::{error, Fields, Result};
use serde_json::Value;

/// `load-balance.type`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Random,
    RoundRobin,
    LeastConnections,
    IpHash,
    ConsistentHash,
    HeaderHash,
    LeastLatency,
}

impl Strategy {
    pub fn parse(path: &str, name: &str) -> Result<Strategy> {
        Ok(match name.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "random" => Strategy::Random,
            "round-robin" | "roundrobin" => Strategy::RoundRobin,
            "least-connections" | "leastconnections" => Strategy::LeastConnections,
            "ip-hash" | "iphash" => Strategy::IpHash,
            "consistent-hash" | "consistenthash" => Strategy::ConsistentHash,
            "header-hash" | "headerhash" => Strategy::HeaderHash,
            "least-latency" | "leastlatency" => Strategy::LeastLatency,
            _ => {
                return Err(error(
                    path,
                    format!(
                        "unknown strategy {name:?} (expected random, round-robin, least-connections, \
                         ip-hash, consistent-hash, header-hash or least-latency)"
                    ),
                ))
            }
        })
    }

    /// Whether the strategy places requests on a consistent-hash ring.
    pub fn hashes(self) -> bool {
        matches!(
            self,
            Strategy::IpHash | Strategy::ConsistentHash | Strategy::HeaderHash
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastConnections => "least-connections",
            Strategy::IpHash => "ip-hash",
            Strategy::ConsistentHash => "consistent-hash",
            Strategy::HeaderHash => "header-hash",
            Strategy::LeastLatency => "least-latency",
        }
    }

    /// The `strategy` label of `jairouter_loadbalancer_selections_total`, as the original
    /// writes it (so its dashboards keep working).
    pub fn metric_label(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastConnections => "least_connections",
            Strategy::IpHash => "ip_hash",
            Strategy::ConsistentHash => "consistent_hash",
            Strategy::HeaderHash => "header_hash",
            Strategy::LeastLatency => "least_latency",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadBalance {
    pub strategy: Strategy,
    /// Accepted for compatibility; the hash rings use one fast 64-bit hash whatever it says.
    pub hash_algorithm: String,
    /// Ring points of an instance of average weight (ip-hash, consistent-hash, header-hash).
    pub virtual_nodes: u64,
    /// header-hash: the request header whose value keys the ring (lower-case).
    pub hash_header: Option<String>,
    /// header-hash: the top-level body field (JSON or multipart) that keys the ring when the
    /// header is absent.
    pub hash_field: Option<String>,
    /// least-latency: how fast an instance's latency estimate fades, in milliseconds.
    pub latency_decay_ms: u64,
}

/// Hash strategies need their key configured; the names are checked once, here.
fn hash_name(path: &str, name: &str, what: &str) -> Result<String> {
    let name = name.trim();
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid {
        return Err(error(
            path,
            format!("must be a {what} name of letters, digits, '-', '_' or '.' (got {name:?})"),
        ));
    }
    Ok(name.to_string())
}

impl Default for LoadBalance {
    /// Smooth weighted round-robin: the original defaults to random, which spreads worse.
    fn default() -> Self {
        LoadBalance {
            strategy: Strategy::RoundRobin,
            hash_algorithm: "md5".to_string(),
            virtual_nodes: 150,
            hash_header: None,
            hash_field: None,
            latency_decay_ms: 10_000,
        }
    }
}

impl LoadBalance {
    /// A service-level block inherits what it does not say from the global one.
    pub fn parse(path: &str, value: &Value, inherit: Option<&LoadBalance>) -> Result<LoadBalance> {
        let base = inherit.cloned().unwrap_or_default();
        let mut f = Fields::new(path, value)?;
        let strategy = match f.string("type")? {
            Some(name) => Strategy::parse(&f.child("type"), name)?,
            None => base.strategy,
        };
        let hash_algorithm = match f.string("hash-algorithm")? {
            Some(a) => a.trim().to_ascii_lowercase(),
            None => base.hash_algorithm,
        };
        let virtual_nodes = f.integer("virtual-nodes", base.virtual_nodes, 1, 10_000)?;
        let hash_header = match f.string("hash-header")? {
            Some(name) => {
                Some(hash_name(&f.child("hash-header"), name, "header")?.to_ascii_lowercase())
            }
            None => base.hash_header,
        };
        let hash_field = match f.string("hash-field")? {
            Some(name) => Some(hash_name(&f.child("hash-field"), name, "field")?),
            None => base.hash_field,
        };
        let latency_decay_ms =
            f.integer("latency-decay-ms", base.latency_decay_ms, 100, 3_600_000)?;
        if strategy == Strategy::HeaderHash && hash_header.is_none() && hash_field.is_none() {
            return Err(error(
                &f.child("type"),
                "header-hash needs `hash-header` or `hash-field` to say what keys the ring",
            ));
        }
        f.finish()?;
        Ok(LoadBalance {
            strategy,
            hash_algorithm,
            virtual_nodes,
            hash_header,
            hash_field,
            latency_decay_ms,
        })
    }
}

/// `rate-limit.algorithm`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Starts full with `capacity` tokens, refills `rate` per second.
    TokenBucket,
    /// A bucket of `capacity` that leaks `rate` per second (as a meter: the same admissions as a
    /// token bucket, kept for compatibility).
    LeakyBucket,
    /// At most `rate` x `window` requests in any `window` seconds.
    SlidingWindow,
    /// A token bucket whose refill ramps from `rate / cold-factor` to `rate` over
    /// `warm-up-period` seconds from its first request; it starts with `capacity / cold-factor`.
    WarmUp,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::TokenBucket => "token-bucket",
            Algorithm::LeakyBucket => "leaky-bucket",
            Algorithm::SlidingWindow => "sliding-window",
            Algorithm::WarmUp => "warm-up",
        }
    }
}

/// `rate-limit.scope`: what one bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One bucket for every request the block covers.
    Global,
    /// One bucket per service type.
    Service,
    /// One bucket per model.
    Model,
    /// One bucket per instance.
    Instance,
    /// One bucket per client address.
    Client,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Global => "global",
            Scope::Service => "service",
            Scope::Model => "model",
            Scope::Instance => "instance",
            Scope::Client => "client-ip",
        }
    }
}

/// `scope`, with the original's aliases; `instance` only where the block allows it.
fn parse_scope(f: &mut Fields<'_>, default: Scope, instance: bool) -> Result<Scope> {
    let Some(text) = f.string("scope")? else {
        return Ok(default);
    };
    Ok(
        match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "global" | "default" => Scope::Global,
            "service" => Scope::Service,
            "model" => Scope::Model,
            "instance" if instance => Scope::Instance,
            "client-ip" | "client" | "ip" => Scope::Client,
            other => {
                let expected = if instance {
                    "global, service, model, instance or client-ip"
                } else {
                    "global, service, model or client-ip"
                };
                return Err(error(
                    &f.child("scope"),
                    format!("unknown scope {other:?} (expected {expected})"),
                ));
            }
        },
    )
}

/// A sliding window remembers each admission in it; this bounds the memory one window takes.
pub const MAX_WINDOW_REQUESTS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    pub enabled: bool,
    pub algorithm: Algorithm,
    pub capacity: u64,
    /// Requests per second.
    pub rate: u64,
    pub scope: Scope,
    pub key: Option<String>,
    /// Also one bucket per client address, with the same numbers.
    pub client_ip_enable: bool,
    /// sliding-window: the window, seconds.
    pub window_secs: u64,
    /// warm-up: the ramp, seconds.
    pub warm_up_secs: u64,
    /// warm-up: how much slower the cold rate is.
    pub cold_factor: u64,
    /// Per-client buckets tracked at most (a fixed table: shared data never grows with clients).
    pub max_clients: u64,
}

impl RateLimitPolicy {
    /// `default_scope` is `service` for global and service blocks (as the original), `instance`
    /// for an instance's own block.
    pub fn parse_with(path: &str, value: &Value, default_scope: Scope) -> Result<RateLimitPolicy> {
        let mut f = Fields::new(path, value)?;
        let enabled = f.boolean("enabled", false)?;
        let algorithm = match f.string("algorithm")? {
            None => Algorithm::TokenBucket,
            Some(a) => match a.trim().to_ascii_lowercase().replace('_', "-").as_str() {
                "token-bucket" => Algorithm::TokenBucket,
                "leaky-bucket" => Algorithm::LeakyBucket,
                "sliding-window" => Algorithm::SlidingWindow,
                "warm-up" | "warmup" => Algorithm::WarmUp,
                other => {
                    return Err(error(
                        &f.child("algorithm"),
                        format!(
                            "unknown algorithm {other:?} (expected token-bucket, leaky-bucket, \
                             sliding-window or warm-up)"
                        ),
                    ))
                }
            },
        };
        let capacity = f.integer("capacity", 100, 1, 1_000_000_000)?;
        let rate = f.integer("rate", 10, 1, 1_000_000_000)?;
        let scope = parse_scope(&mut f, default_scope, true)?;
        let key = f.string("key")?.map(str::to_string);
        let client_ip_enable = f.boolean("client-ip-enable", false)?;
        let window_secs = f.integer("window", 1, 1, 3600)?;
        let warm_up_secs = f.integer("warm-up-period", 600, 1, 86_400)?;
        let cold_factor = f.integer("cold-factor", 3, 1, 100)?;
        let max_clients = f.integer("max-clients", 10_000, 1, 1_000_000)?;
        if algorithm == Algorithm::SlidingWindow
            && rate.saturating_mul(window_secs) > MAX_WINDOW_REQUESTS
        {
            return Err(error(
                &f.child("rate"),
                format!(
                    "a sliding window holds at most {MAX_WINDOW_REQUESTS} requests (rate x window \
                     is {})",
                    rate.saturating_mul(window_secs)
                ),
            ));
        }
        f.finish()?;
        Ok(RateLimitPolicy {
            enabled,
            algorithm,
            capacity,
            rate,
            scope,
            key,
            client_ip_enable,
            window_secs,
            warm_up_secs,
            cold_factor,
            max_clients,
        })
    }

    pub fn parse(path: &str, value: &Value) -> Result<RateLimitPolicy> {
        RateLimitPolicy::parse_with(path, value, Scope::Service)
    }

    pub fn parse_for_instance(path: &str, value: &Value) -> Result<RateLimitPolicy> {
        RateLimitPolicy::parse_with(path, value, Scope::Instance)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreakerPolicy {
    pub enabled: bool,
    pub failure_threshold: u64,
    /// Milliseconds from open to half-open.
    pub timeout_ms: u64,
    pub success_threshold: u64,
}

impl CircuitBreakerPolicy {
    /// The original's defaults (5 failures, 60 s open, 2 successes).
    pub const DEFAULT: CircuitBreakerPolicy = CircuitBreakerPolicy {
        enabled: true,
        failure_threshold: 5,
        timeout_ms: 60_000,
        success_threshold: 2,
    };

    /// A block written at all is on unless it says `enabled: false`; keys it leaves out come
    /// from the enclosing block (`parent`: the service's for an instance, the global one for a
    /// service), else the original's defaults. The original parses per-service and
    /// per-instance blocks and then ignores them; ours honours them.
    pub fn parse(
        path: &str,
        value: &Value,
        parent: Option<&CircuitBreakerPolicy>,
    ) -> Result<CircuitBreakerPolicy> {
        let base = parent.unwrap_or(&CircuitBreakerPolicy::DEFAULT);
        let mut f = Fields::new(path, value)?;
        let policy = CircuitBreakerPolicy {
            enabled: f.boolean("enabled", true)?,
            failure_threshold: f.integer(
                "failure-threshold",
                base.failure_threshold,
                1,
                1_000_000,
            )?,
            timeout_ms: f.integer("timeout", base.timeout_ms, 1, 86_400_000)?,
            success_threshold: f.integer("success-threshold", base.success_threshold, 1, 1_000)?,
        };
        f.finish()?;
        Ok(policy)
    }
}

/// `health-check` (ours; the original only opens a TCP connection every 30 s): an HTTP GET
/// to each instance from one checker per Envoy process. An instance that answers below 500 is
/// up (any answer shows the server is there, as the original's connect did); 5xx, a refused
/// connection or a timeout count against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckPolicy {
    pub enabled: bool,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Below the instance's base-url path.
    pub path: String,
    /// Consecutive good checks that bring a down instance back.
    pub healthy_threshold: u64,
    /// Consecutive bad checks that take an instance down.
    pub unhealthy_threshold: u64,
}

impl HealthCheckPolicy {
    /// A 30 s interval as the original's; `/v1/models` is answered by Ollama, vLLM and every
    /// OpenAI-compatible server.
    fn defaults() -> HealthCheckPolicy {
        HealthCheckPolicy {
            enabled: true,
            interval_ms: 30_000,
            timeout_ms: 5_000,
            path: "/v1/models".to_string(),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        }
    }

    /// Like `circuit-breaker`: a block is on unless it says otherwise, and keys it leaves out
    /// come from the enclosing block.
    pub fn parse(
        path: &str,
        value: &Value,
        parent: Option<&HealthCheckPolicy>,
    ) -> Result<HealthCheckPolicy> {
        let defaults = HealthCheckPolicy::defaults();
        let base = parent.unwrap_or(&defaults);
        let mut f = Fields::new(path, value)?;
        let timeout_path = f.child("timeout");
        let enabled = f.boolean("enabled", true)?;
        let interval_ms = f.integer("interval", base.interval_ms, 100, 86_400_000)?;
        let timeout_ms = f.integer("timeout", base.timeout_ms.min(interval_ms), 10, 600_000)?;
        let check_path = match f.string("path")? {
            Some(p) if p.starts_with('/') && !p.contains(['#', ' ']) => p.to_string(),
            Some(p) => {
                return Err(error(
                    &f.child("path"),
                    format!("must start with '/' (got {p:?})"),
                ))
            }
            None => base.path.clone(),
        };
        let healthy_threshold = f.integer("healthy-threshold", base.healthy_threshold, 1, 1000)?;
        let unhealthy_threshold =
            f.integer("unhealthy-threshold", base.unhealthy_threshold, 1, 1000)?;
        f.finish()?;
        if timeout_ms > interval_ms {
            return Err(error(
                &timeout_path,
                format!("must not exceed the interval ({interval_ms} ms), got {timeout_ms} ms"),
            ));
        }
        Ok(HealthCheckPolicy {
            enabled,
            interval_ms,
            timeout_ms,
            path: check_path,
            healthy_threshold,
            unhealthy_threshold,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackPolicy {
    pub enabled: bool,
    pub strategy: String,
    pub cache_size: u64,
    pub cache_ttl_ms: u64,
    /// Ours: `models: {<model>: [<fallback>, ...]}`, tried in order when none of the model's
    /// instances can take a request.
    pub models: Vec<(String, Vec<String>)>,
    /// Where `models` was written, for errors found once the services are known.
    pub models_path: String,
}

impl FallbackPolicy {
    pub fn parse(path: &str, value: &Value) -> Result<FallbackPolicy> {
        let mut f = Fields::new(path, value)?;
        let policy = FallbackPolicy {
            // Off only when it says so: a block that lists stand-in models means them.
            enabled: f.boolean("enabled", true)?,
            strategy: f
                .string("strategy")?
                .map(|s| s.trim().to_ascii_lowercase())
                .unwrap_or_else(|| "default".to_string()),
            cache_size: f.integer("cache-size", 100, 0, 1_000_000)?,
            cache_ttl_ms: f.integer("cache-ttl", 300_000, 0, 86_400_000 * 30)?,
            models_path: f.child("models"),
            models: match f.take("models") {
                None => Vec::new(),
                Some(v) => parse_fallback_models(&f.child("models"), v)?,
            },
        };
        f.finish()?;
        Ok(policy)
    }
}

fn parse_fallback_models(path: &str, value: &Value) -> Result<Vec<(String, Vec<String>)>> {
    let map = value
        .as_object()
        .ok_or_else(|| error(path, "must map a model to the models that stand in for it"))?;
    let mut models = Vec::new();
    for (model, list) in map {
        let at = super::reader::join(path, model);
        let names: Vec<String> = match list {
            Value::String(one) => vec![one.trim().to_string()],
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(|s| s.trim().to_string()))
                .collect::<Option<_>>()
                .ok_or_else(|| error(&at, "must be a list of model names"))?,
            _ => return Err(error(&at, "must be a list of model names")),
        };
        if names.iter().any(|n| n.is_empty() || n == model.trim()) {
            return Err(error(&at, "names an empty model or the model itself"));
        }
        models.push((model.trim().to_string(), names));
    }
    Ok(models)
}

/// `token-limit` (ours): a budget of model tokens per minute, reserved at admission from an
/// estimate and settled from the response's `usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLimitPolicy {
    pub enabled: bool,
    pub tokens_per_minute: u64,
    pub scope: Scope,
    /// Tokens reserved for the completion when the request sets no `max_tokens`.
    pub completion_estimate: u64,
    pub max_clients: u64,
}

impl TokenLimitPolicy {
    pub fn parse(path: &str, value: &Value) -> Result<TokenLimitPolicy> {
        let mut f = Fields::new(path, value)?;
        let enabled = f.boolean("enabled", true)?;
        let tokens_per_minute = f.integer("tokens-per-minute", 0, 0, 1_000_000_000_000)?;
        if tokens_per_minute == 0 {
            return Err(error(
                &f.child("tokens-per-minute"),
                "is required: the tokens a minute allows",
            ));
        }
        // A token budget is drawn before an instance is picked: no instance scope.
        let scope = parse_scope(&mut f, Scope::Model, false)?;
        let completion_estimate = f.integer("completion-estimate", 256, 0, 1_000_000)?;
        let max_clients = f.integer("max-clients", 10_000, 1, 1_000_000)?;
        f.finish()?;
        Ok(TokenLimitPolicy {
            enabled,
            tokens_per_minute,
            scope,
            completion_estimate,
            max_clients,
        })
    }
}
