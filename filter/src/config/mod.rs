//! The router configuration: JAiRouter's `model:` section, validated once and compiled into an
//! immutable structure that every request shares, so the request path only looks things up.

mod policy;
pub(crate) mod reader;

pub use policy::{
    Algorithm, CircuitBreakerPolicy, FallbackPolicy, HealthCheckPolicy, LoadBalance,
    RateLimitPolicy, Scope, Strategy, TokenLimitPolicy, MAX_WINDOW_REQUESTS,
};
pub use reader::ConfigError;

use crate::auth::ApiKeys;
use crate::balance::ring::{hash64, HashRing};
use crate::balance::smooth_sequence;
use crate::breaker::BreakerPolicy;
use crate::endpoint::{Endpoint, ServiceType};
use crate::limit::Limits;
use reader::{error, Fields, Result};
use serde_json::Value;
use std::collections::HashMap;

/// Upper bounds that keep a hostile or mistaken configuration from exhausting the VM.
pub const MAX_INSTANCES: usize = 10_000;
pub const MAX_WEIGHT: u64 = 1_000_000;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
pub const MAX_MODEL_NAME_BYTES: usize = 1024;

/// The header that names the Envoy cluster chosen by the filter; the bootstrap's route reads it
/// (`cluster_header`). A client-supplied value is always removed.
pub const ROUTING_HEADER: &str = "x-jairouter-cluster";
/// A client may name the model in this header instead of the body (required for nothing; it saves
/// the body scan, e.g. for large uploads).
pub const MODEL_HEADER: &str = "x-jairouter-model";
/// Where Envoy's jwt_authn puts a verified token's payload in the request's metadata
/// (`payload_in_metadata`), for the filter to read its claims.
pub const JWT_PAYLOAD_KEY: &str = "jwt_payload";
/// Response header naming the instance that served.
pub const INSTANCE_HEADER: &str = "x-jairouter-instance";

#[derive(Debug)]
pub struct RouterConfig {
    /// Indexed by `ServiceType::index()`; `None` when the service is not configured.
    services: [Option<Service>; 7],
    pub load_balance: LoadBalance,
    pub rate_limit: Option<RateLimitPolicy>,
    pub token_limit: Option<TokenLimitPolicy>,
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    pub fallback: Option<FallbackPolicy>,
    pub gateway: GatewayOptions,
    /// The `GET /v1/models` answer, built once.
    pub models_json: String,
    /// Every enabled rate limit, compiled.
    pub limits: Limits,
    /// Whether anything keys on the client address (hash strategies, per-client limits): the
    /// binding asks Envoy for it only then.
    pub uses_client_address: bool,
    /// `retries`: further attempts on another instance of the model (Envoy's retry policy on
    /// the route; services that differ say so per request).
    pub retries: u64,
    /// `request-timeout` in ms (0: none): the whole exchange, streamed answers included.
    pub request_timeout_ms: u64,
    /// `jairouter.security.api-key`: who may call, and their quotas (off when absent).
    pub api_keys: ApiKeys,
}

/// Retries when none are configured: a failed attempt gets two more, on other instances.
pub const DEFAULT_RETRIES: u64 = 2;

/// Per-client rate-limit tables are preallocated in shared data; this bounds their total size.
pub const MAX_CLIENT_TABLE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// How much of a body may be buffered while looking for the model; past it, 413.
    pub max_body_bytes: u64,
    /// Whether responses carry `x-jairouter-instance`.
    pub instance_header: bool,
    /// How many proxies in front of Envoy append to X-Forwarded-For and are trusted to tell the
    /// client address (Envoy's `xff_num_trusted_hops`); 0 means the peer address is the client.
    pub trusted_hops: u32,
    /// Envoy's global rate limiting through a rate-limit service, for limits across replicas.
    pub global_rate_limit: Option<GlobalRateLimit>,
    /// `gateway.jwt`: Envoy's jwt_authn verifies tokens of an identity provider in front of the
    /// filter, which reads the verified claims for permissions.
    pub jwt: Option<JwtOptions>,
    /// `gateway.max-connections`, the timeouts and header limits Envoy enforces at the edge.
    pub edge: EdgeLimits,
}

/// What Envoy enforces on clients before the filter sees a request (rendered into the
/// bootstrap; the filter does not read them). Times in ms, 0 turning a timeout off. The defaults
/// never cut a slow model: the stream idle timeout matches the OpenAI SDK's own 10 minutes, and
/// only a connection without any request in flight counts as idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeLimits {
    /// Connections open at once over every listener that serves the API (Envoy's
    /// `global_downstream_max_connections`); past it new ones are closed at accept.
    pub max_connections: u64,
    /// From a request's first byte to the end of its headers (slowloris).
    pub request_headers_timeout_ms: u64,
    /// A request or response without a byte in either direction this long is reset.
    pub stream_idle_timeout_ms: u64,
    /// A connection with no request in flight this long is closed.
    pub idle_timeout_ms: u64,
    /// Request headers larger than this get 431.
    pub max_request_headers_kb: u64,
    /// Requests at once on one HTTP/2 connection.
    pub http2_max_concurrent_streams: u64,
}

// A model may think in silence for minutes: a default below 5 minutes would cut it.
const _: () = assert!(EdgeLimits::DEFAULT.stream_idle_timeout_ms >= 300_000);

impl EdgeLimits {
    pub const DEFAULT: EdgeLimits = EdgeLimits {
        max_connections: 50_000,
        request_headers_timeout_ms: 10_000,
        stream_idle_timeout_ms: 600_000,
        idle_timeout_ms: 3_600_000,
        max_request_headers_kb: 60,
        http2_max_concurrent_streams: 100,
    };

    /// Its keys, flat in the `gateway` block.
    fn take(f: &mut Fields<'_>) -> Result<EdgeLimits> {
        let d = EdgeLimits::DEFAULT;
        let timeout = |f: &mut Fields<'_>, key: &str, default: u64| -> Result<u64> {
            let ms = f.integer(key, default, 0, 86_400_000)?;
            // Envoy's timers are ms; a few ms would be a typo for seconds, and cut every request.
            if ms > 0 && ms < 100 {
                return Err(error(
                    &f.child(key),
                    format!("is in ms: {ms} ms would cut every request (0 turns it off)"),
                ));
            }
            Ok(ms)
        };
        Ok(EdgeLimits {
            max_connections: f.integer("max-connections", d.max_connections, 1, 10_000_000)?,
            request_headers_timeout_ms: timeout(
                f,
                "request-headers-timeout",
                d.request_headers_timeout_ms,
            )?,
            stream_idle_timeout_ms: timeout(f, "stream-idle-timeout", d.stream_idle_timeout_ms)?,
            idle_timeout_ms: timeout(f, "idle-timeout", d.idle_timeout_ms)?,
            // Envoy's own bounds for max_request_headers_kb.
            max_request_headers_kb: f.integer(
                "max-request-headers-kb",
                d.max_request_headers_kb,
                1,
                8192,
            )?,
            http2_max_concurrent_streams: f.integer(
                "http2-max-concurrent-streams",
                d.http2_max_concurrent_streams,
                1,
                2_147_483_647,
            )?,
        })
    }
}

/// `gateway.jwt`: who issues the tokens, where their keys are, and which claims grant what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtOptions {
    pub issuer: String,
    /// Accepted `aud` values (any, when empty).
    pub audiences: Vec<String>,
    pub jwks: Jwks,
    /// The claim listing the services (or `admin`) a token may use: a list or a string of
    /// names separated by spaces or commas (an OAuth `scope` works).
    pub permissions_claim: String,
    /// The claim listing the models a token may use (absent: every model of its services).
    pub models_claim: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Jwks {
    /// `jwks-uri`: fetched by Envoy and cached (`cache-seconds`).
    Remote { url: BaseUrl, cache_secs: u64 },
    /// `jwks-file`: a JWKS document on the gateway's disk (a mounted Secret).
    File(String),
}

/// `gateway.global-rate-limit`: the rendered bootstrap adds Envoy's rate-limit filter, and the
/// filter sets the descriptor headers it reads (`x-jairouter-service`, `x-jairouter-model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalRateLimit {
    /// The rate-limit service (gRPC, `host:port`).
    pub service: BaseUrl,
    pub domain: String,
    /// Refuse requests when the service cannot be reached (default: let them through).
    pub failure_mode_deny: bool,
    pub timeout_ms: u64,
}

/// Descriptor headers for Envoy's rate-limit filter (removed before the request goes upstream).
pub const SERVICE_DESCRIPTOR_HEADER: &str = "x-jairouter-service";

#[derive(Debug)]
pub struct Service {
    pub kind: ServiceType,
    pub load_balance: LoadBalance,
    pub rate_limit: Option<RateLimitPolicy>,
    pub token_limit: Option<TokenLimitPolicy>,
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    pub fallback: Option<FallbackPolicy>,
    pub instances: Vec<Instance>,
    pub models: HashMap<String, ModelPool>,
    /// Retries for this service's requests (its own `retries`, else the global; 0 for uploads
    /// unless `retry-uploads`).
    pub retries: u64,
    /// Models that stand in for a model none of whose instances can take a request, in order
    /// (the service's `fallback.models`, else the global one, for models of this service).
    pub fallbacks: HashMap<String, Vec<String>>,
}

/// The instances that serve one model name within a service.
#[derive(Debug)]
pub struct ModelPool {
    pub model: String,
    /// Indices into `Service::instances` of the routable ones (status active, weight > 0).
    pub routable: Vec<usize>,
    /// Smooth weighted round-robin order over `routable` (positions into it).
    pub rotation: Vec<u16>,
    /// Cumulative weights over `routable`, for weighted random.
    pub cumulative: Vec<u64>,
    /// The shared-data key of this pool's round-robin counter.
    pub counter_key: String,
    /// The consistent-hash ring over `routable` (hash strategies only; empty otherwise).
    pub ring: HashRing,
}

#[derive(Debug, Clone)]
pub struct Instance {
    /// `instance-id`, or `<service>-<index>` when none is given; named in `x-jairouter-instance`.
    pub id: String,
    /// The Envoy cluster that reaches this instance.
    pub cluster: String,
    pub name: String,
    pub base_url: BaseUrl,
    pub weight: u64,
    pub active: bool,
    /// Upstream path per endpoint of the service (base-url prefix included).
    pub paths: Vec<(Endpoint, String)>,
    /// Headers sent upstream on every request to this instance (e.g. the backend's credentials).
    pub headers: Vec<(String, String)>,
    pub rate_limit: Option<RateLimitPolicy>,
    /// The `circuit-breaker` block in force here (instance, else service, else global).
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    /// This instance's breaker, when one is enabled for it.
    pub breaker: Option<BreakerPolicy>,
    /// Checked by the process's health checker, when enabled for it.
    pub health_check: Option<HealthCheckPolicy>,
    /// Shared-data key of its state: breaker and health (`breaker::Breaker`).
    pub state_key: String,
    /// Shared-data key of the requests in flight to this instance (least-connections, least-latency).
    pub in_flight_key: String,
    /// Shared-data key of this instance's latency estimate (least-latency).
    pub latency_key: String,
}

impl Instance {
    pub fn upstream_path(&self, endpoint: Endpoint) -> Option<&str> {
        self.paths
            .iter()
            .find(|(e, _)| *e == endpoint)
            .map(|(_, p)| p.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    /// A DNS name or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// The path part of the base URL without a trailing slash ("" for none).
    pub prefix: String,
}

impl BaseUrl {
    pub fn parse(path: &str, text: &str) -> Result<BaseUrl> {
        let bad = |why: &str| error(path, format!("{why} (got {text:?})"));
        let (tls, rest) = if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        if rest.contains(['?', '#', '@', ' ']) {
            return Err(bad("must not carry a query, fragment, user or space"));
        }
        let (authority, prefix) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'));
        if !host_ok {
            return Err(bad("has no valid host"));
        }
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(bad("has an invalid port")),
            },
        };
        Ok(BaseUrl {
            tls,
            host: host.to_ascii_lowercase(),
            port,
            prefix: prefix.trim_end_matches('/').to_string(),
        })
    }

    pub fn host_is_ip(&self) -> bool {
        self.host.parse::<std::net::IpAddr>().is_ok()
    }
}

impl RouterConfig {
    pub fn service(&self, kind: ServiceType) -> Option<&Service> {
        self.services.get(kind.index()).and_then(Option::as_ref)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.iter().flatten()
    }

    /// Every instance of every service, for the renderer's clusters.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.services().flat_map(|s| s.instances.iter())
    }

    /// Every shared-data key this configuration uses (buckets, counters, instance state).
    pub fn shared_keys(&self) -> Vec<String> {
        let services: Vec<&Service> = self.services().collect();
        let mut keys: Vec<String> = self
            .limits
            .initial_keys(&services)
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        for service in &services {
            keys.extend(service.models.values().map(|p| p.counter_key.clone()));
            for i in &service.instances {
                keys.extend([&i.state_key, &i.in_flight_key, &i.latency_key].map(String::clone));
            }
        }
        keys
    }

    /// The keys `previous` used that this configuration does not: shared data has no delete,
    /// so a reload empties them (a per-client table may hold megabytes) instead of keeping
    /// them for good.
    pub fn stale_keys(&self, previous: &RouterConfig) -> Vec<String> {
        let current: std::collections::HashSet<String> = self.shared_keys().into_iter().collect();
        previous
            .shared_keys()
            .into_iter()
            .filter(|k| !current.contains(k))
            .collect()
    }

    /// Parses the filter's plugin configuration: the JSON form of JAiRouter's `model:` section,
    /// or an object holding it under `model` beside the original's `jairouter.security.api-key`.
    pub fn from_json(bytes: &[u8]) -> std::result::Result<RouterConfig, ConfigError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| error("configuration", format!("is not valid JSON: {e}")))?;
        Self::from_value(&value)
    }

    pub fn from_value(value: &Value) -> std::result::Result<RouterConfig, ConfigError> {
        let (model, api_keys) = match value.get("model") {
            Some(inner) if value.get("services").is_none() => {
                let section = value
                    .get("jairouter")
                    .and_then(|j| j.get("security"))
                    .and_then(|s| s.get("api-key").or_else(|| s.get("apiKey")));
                let api_keys = match section {
                    Some(v) => ApiKeys::parse("jairouter.security.api-key", v)?,
                    None => ApiKeys::default(),
                };
                (inner, api_keys)
            }
            _ => (value, ApiKeys::default()),
        };
        parse_model(model, api_keys)
    }
}

fn parse_model(value: &Value, api_keys: ApiKeys) -> Result<RouterConfig> {
    let mut f = Fields::new("model", value)?;
    f.string("adapter")?; // adapters translate request bodies in the original; ours pass them unchanged
    let load_balance = match f.take("load-balance") {
        Some(v) => LoadBalance::parse(&f.child("load-balance"), v, None)?,
        None => LoadBalance::default(),
    };
    let rate_limit = take_policy(&mut f, "rate-limit", RateLimitPolicy::parse)?;
    let token_limit = take_policy(&mut f, "token-limit", TokenLimitPolicy::parse)?;
    // Breakers are on unless turned off (the original's manager builds one for every instance
    // whatever its `enabled` says; ours honours `enabled: false`).
    let circuit_breaker =
        Some(take_breaker(&mut f, None)?.unwrap_or(CircuitBreakerPolicy::DEFAULT));
    let health_check = take_health_check(&mut f, None)?;
    let retries = f.integer("retries", DEFAULT_RETRIES, 0, 10)?;
    let retry_uploads = f.boolean("retry-uploads", false)?;
    let request_timeout_ms = f.integer("request-timeout", 0, 0, 86_400_000)?;
    let fallback = take_policy(&mut f, "fallback", FallbackPolicy::parse)?;
    let gateway = match f.take("gateway") {
        Some(v) => parse_gateway(&f.child("gateway"), v)?,
        None => GatewayOptions {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            instance_header: true,
            trusted_hops: 0,
            global_rate_limit: None,
            jwt: None,
            edge: EdgeLimits::DEFAULT,
        },
    };
    let services_path = f.child("services");
    let services_value = f.take("services");
    f.finish()?;

    let mut services: [Option<Service>; 7] = Default::default();
    let mut total_instances = 0usize;
    let mut clusters: HashMap<String, String> = HashMap::new();
    if let Some(services_value) = services_value {
        let map = services_value.as_object().ok_or_else(|| {
            error(
                &services_path,
                "must be a mapping of service type to service",
            )
        })?;
        for (key, service_value) in map {
            let path = reader::join(&services_path, key);
            let kind = ServiceType::from_config_key(key).ok_or_else(|| {
                error(
                    &path,
                    "unknown service type (expected chat, embedding, rerank, tts, stt, imgGen or imgEdit)",
                )
            })?;
            let slot = services
                .get_mut(kind.index())
                .ok_or_else(|| error(&path, "internal: no slot for service"))?;
            if slot.is_some() {
                return Err(error(&path, "service type given twice (under two aliases)"));
            }
            let service = parse_service(
                &path,
                kind,
                service_value,
                &load_balance,
                Inherited {
                    breaker: circuit_breaker.as_ref(),
                    health_check: health_check.as_ref(),
                    retries,
                    retry_uploads,
                    fallback: fallback.as_ref(),
                },
                &mut clusters,
            )?;
            total_instances = total_instances.saturating_add(service.instances.len());
            if total_instances > MAX_INSTANCES {
                return Err(error(
                    &services_path,
                    format!("more than {MAX_INSTANCES} instances in all"),
                ));
            }
            *slot = Some(service);
        }
    }
    let models_json = models_list_json(services.iter().flatten());
    let configured: Vec<&Service> = services.iter().flatten().collect();
    let limits = Limits::compile(
        rate_limit.as_ref(),
        token_limit.as_ref(),
        &configured,
        api_keys.keys(),
    );
    let mut table_bytes = 0u64;
    for limit in limits.list.iter().filter(|l| l.scope == Scope::Client) {
        let slot = 8 + limit.params.initial_state().len() as u64;
        table_bytes = table_bytes.saturating_add(limit.max_clients.saturating_mul(slot));
        if table_bytes > MAX_CLIENT_TABLE_BYTES {
            return Err(error(
                &format!(
                    "{}.max-clients",
                    limit.name.trim_end_matches(" (per client)")
                ),
                format!(
                    "per-client rate-limit tables would take {table_bytes} bytes of shared data \
                     (at most {MAX_CLIENT_TABLE_BYTES}); lower max-clients or the window"
                ),
            ));
        }
    }
    let uses_client_address = api_keys.uses_client_address()
        || limits.list.iter().any(|l| l.scope == Scope::Client)
        || services.iter().flatten().any(|s| {
            matches!(
                s.load_balance.strategy,
                Strategy::IpHash | Strategy::ConsistentHash
            )
        });
    Ok(RouterConfig {
        api_keys,
        uses_client_address,
        retries,
        request_timeout_ms,
        services,
        load_balance,
        rate_limit,
        token_limit,
        circuit_breaker,
        fallback,
        gateway,
        models_json,
        limits,
    })
}

/// The fallback lists that concern this service's models; each stand-in must be a model of the
/// same service (it gets the same request).
fn fallback_models(
    policy: Option<&FallbackPolicy>,
    models: &HashMap<String, ModelPool>,
    kind: ServiceType,
) -> Result<HashMap<String, Vec<String>>> {
    let mut out = HashMap::new();
    let Some(policy) = policy.filter(|p| p.enabled) else {
        return Ok(out);
    };
    for (model, stand_ins) in &policy.models {
        if !models.contains_key(model) {
            continue;
        }
        if let Some(missing) = stand_ins.iter().find(|m| !models.contains_key(*m)) {
            return Err(error(
                &reader::join(&policy.models_path, model),
                format!("`{missing}` is not a model of the {} service", kind.key()),
            ));
        }
        out.insert(model.clone(), stand_ins.clone());
    }
    Ok(out)
}

/// The policy blocks a service or instance inherits from the one enclosing it.
#[derive(Clone, Copy)]
struct Inherited<'a> {
    breaker: Option<&'a CircuitBreakerPolicy>,
    health_check: Option<&'a HealthCheckPolicy>,
    retries: u64,
    retry_uploads: bool,
    fallback: Option<&'a FallbackPolicy>,
}

fn take_health_check(
    f: &mut Fields<'_>,
    parent: Option<&HealthCheckPolicy>,
) -> Result<Option<HealthCheckPolicy>> {
    let path = f.child("health-check");
    f.take("health-check")
        .map(|v| HealthCheckPolicy::parse(&path, v, parent))
        .transpose()
}

fn take_breaker(
    f: &mut Fields<'_>,
    parent: Option<&CircuitBreakerPolicy>,
) -> Result<Option<CircuitBreakerPolicy>> {
    let path = f.child("circuit-breaker");
    f.take("circuit-breaker")
        .map(|v| CircuitBreakerPolicy::parse(&path, v, parent))
        .transpose()
}

fn take_policy<T>(
    f: &mut Fields<'_>,
    key: &str,
    parse: fn(&str, &Value) -> Result<T>,
) -> Result<Option<T>> {
    let path = f.child(key);
    f.take(key).map(|v| parse(&path, v)).transpose()
}

fn parse_gateway(path: &str, value: &Value) -> Result<GatewayOptions> {
    let mut f = Fields::new(path, value)?;
    let max_body_bytes = f.integer(
        "max-body-bytes",
        DEFAULT_MAX_BODY_BYTES,
        1024,
        256 * 1024 * 1024,
    )?;
    let instance_header = f.boolean("instance-header", true)?;
    let trusted_hops = f.integer("trusted-hops", 0, 0, 16)?;
    let global_rate_limit = match f.take("global-rate-limit") {
        Some(v) => Some(parse_global_rate_limit(&f.child("global-rate-limit"), v)?),
        None => None,
    };
    let jwt = match f.take("jwt") {
        Some(v) => parse_jwt(&f.child("jwt"), v)?,
        None => None,
    };
    let edge = EdgeLimits::take(&mut f)?;
    f.finish()?;
    Ok(GatewayOptions {
        max_body_bytes,
        instance_header,
        trusted_hops: u32::try_from(trusted_hops).unwrap_or(0),
        global_rate_limit,
        jwt,
        edge,
    })
}

fn parse_jwt(path: &str, value: &Value) -> Result<Option<JwtOptions>> {
    let mut f = Fields::new(path, value)?;
    let enabled = f.boolean("enabled", true)?;
    let issuer = f
        .string("issuer")?
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| error(&f.child("issuer"), "is required: the tokens' `iss`"))?
        .to_string();
    let audiences_path = f.child("audiences");
    let audiences = match f.take("audiences") {
        None => Vec::new(),
        Some(Value::String(one)) => vec![one.trim().to_string()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(|s| s.trim().to_string())
                    .ok_or_else(|| error(&audiences_path, "must be a list of strings"))
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(error(
                &audiences_path,
                format!("must be a list of strings (got {})", reader::kind(other)),
            ))
        }
    };
    let cache_secs = f.integer("cache-seconds", 600, 1, 86_400)?;
    let uri_path = f.child("jwks-uri");
    let uri = f.string("jwks-uri")?.map(str::trim);
    let file_path = f.child("jwks-file");
    let file = f.string("jwks-file")?.map(str::trim);
    let jwks = match (uri, file) {
        (Some(uri), None) => Jwks::Remote {
            url: BaseUrl::parse(&uri_path, uri)?,
            cache_secs,
        },
        (None, Some(file)) if file.starts_with('/') => Jwks::File(file.to_string()),
        (None, Some(_)) => return Err(error(&file_path, "must be an absolute path")),
        _ => {
            return Err(error(
                path,
                "needs exactly one of jwks-uri (the identity provider's keys) or jwks-file",
            ))
        }
    };
    let claim = |f: &mut Fields<'_>, key: &str, default: &str| -> Result<String> {
        let name = f.string(key)?.unwrap_or(default).trim().to_string();
        if name.is_empty() || name.contains('.') {
            return Err(error(&f.child(key), "must be a top-level claim name"));
        }
        Ok(name)
    };
    let permissions_claim = claim(&mut f, "permissions-claim", "permissions")?;
    let models_claim = claim(&mut f, "models-claim", "models")?;
    f.finish()?;
    Ok(enabled.then_some(JwtOptions {
        issuer,
        audiences,
        jwks,
        permissions_claim,
        models_claim,
    }))
}

fn parse_global_rate_limit(path: &str, value: &Value) -> Result<GlobalRateLimit> {
    let mut f = Fields::new(path, value)?;
    let address_path = f.child("address");
    let Some(address) = f.string("address")? else {
        return Err(error(
            &address_path,
            "is required: the rate-limit service's host:port",
        ));
    };
    let service = BaseUrl::parse(&address_path, &format!("http://{}", address.trim()))?;
    if !service.prefix.is_empty() {
        return Err(error(
            &address_path,
            format!("must be host:port (got {address:?})"),
        ));
    }
    let domain = f
        .string("domain")?
        .unwrap_or("jairouter")
        .trim()
        .to_string();
    if domain.is_empty() {
        return Err(error(&f.child("domain"), "must not be empty"));
    }
    let failure_mode_deny = f.boolean("failure-mode-deny", false)?;
    let timeout_ms = f.integer("timeout-ms", 20, 1, 10_000)?;
    f.finish()?;
    Ok(GlobalRateLimit {
        service,
        domain,
        failure_mode_deny,
        timeout_ms,
    })
}

fn parse_service(
    path: &str,
    kind: ServiceType,
    value: &Value,
    global_lb: &LoadBalance,
    global: Inherited<'_>,
    clusters: &mut HashMap<String, String>,
) -> Result<Service> {
    let mut f = Fields::new(path, value)?;
    f.string("adapter")?;
    let load_balance = match f.take("load-balance") {
        Some(v) => LoadBalance::parse(&f.child("load-balance"), v, Some(global_lb))?,
        None => global_lb.clone(),
    };
    let rate_limit = take_policy(&mut f, "rate-limit", RateLimitPolicy::parse)?;
    let token_limit = take_policy(&mut f, "token-limit", TokenLimitPolicy::parse)?;
    let circuit_breaker = take_breaker(&mut f, global.breaker)?.or_else(|| global.breaker.cloned());
    let health_check =
        take_health_check(&mut f, global.health_check)?.or_else(|| global.health_check.cloned());
    let retries = match f.integer("retries", global.retries, 0, 10)? {
        _ if kind.takes_uploads() && !global.retry_uploads => 0,
        n => n,
    };
    let fallback = take_policy(&mut f, "fallback", FallbackPolicy::parse)?;
    let instances_path = f.child("instances");
    let list = match f.take("instances") {
        None => Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(other) => {
            return Err(error(
                &instances_path,
                format!("must be a list (got {})", reader::kind(other)),
            ))
        }
    };
    f.finish()?;
    if list.len() > MAX_INSTANCES {
        return Err(error(
            &instances_path,
            format!("more than {MAX_INSTANCES} instances"),
        ));
    }

    let mut instances = Vec::with_capacity(list.len());
    for (index, item) in list.into_iter().enumerate() {
        let ipath = format!("{instances_path}[{index}]");
        let inherited = Inherited {
            breaker: circuit_breaker.as_ref(),
            health_check: health_check.as_ref(),
            ..global
        };
        let instance = parse_instance(&ipath, kind, index, item, inherited)?;
        if let Some(previous) = clusters.insert(instance.cluster.clone(), ipath.clone()) {
            return Err(error(
                &ipath,
                format!(
                    "instance-id {:?} is already used by {previous}",
                    instance.id
                ),
            ));
        }
        instances.push(instance);
    }

    let mut names: Vec<&str> = Vec::new();
    for instance in &instances {
        if !names.contains(&instance.name.as_str()) {
            names.push(&instance.name);
        }
    }
    let mut models = HashMap::with_capacity(names.len());
    for name in names {
        let routable: Vec<usize> = instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.name == name && i.active && i.weight > 0)
            .map(|(at, _)| at)
            .collect();
        let weights: Vec<u64> = routable
            .iter()
            .filter_map(|at| instances.get(*at).map(|i| i.weight))
            .collect();
        let mut cumulative = Vec::with_capacity(weights.len());
        let mut sum = 0u64;
        for w in &weights {
            sum = sum.saturating_add(*w);
            cumulative.push(sum);
        }
        let ring = if load_balance.strategy.hashes() {
            let members: Vec<(&str, u64)> = routable
                .iter()
                .filter_map(|at| instances.get(*at).map(|i| (i.id.as_str(), i.weight)))
                .collect();
            HashRing::build(&members, load_balance.virtual_nodes)
        } else {
            HashRing::default()
        };
        models.insert(
            name.to_string(),
            ModelPool {
                model: name.to_string(),
                rotation: smooth_sequence(&weights),
                cumulative,
                routable,
                counter_key: format!("jairouter/rr/{}/{}", kind.key(), name),
                ring,
            },
        );
    }

    let fallbacks = fallback_models(fallback.as_ref().or(global.fallback), &models, kind)?;
    Ok(Service {
        kind,
        load_balance,
        rate_limit,
        token_limit,
        circuit_breaker,
        fallback,
        instances,
        models,
        retries,
        fallbacks,
    })
}

fn parse_instance(
    path: &str,
    kind: ServiceType,
    index: usize,
    value: &Value,
    service: Inherited<'_>,
) -> Result<Instance> {
    let mut f = Fields::new(path, value)?;
    let name = f
        .string("name")?
        .ok_or_else(|| error(&f.child("name"), "is required: the model name clients send"))?
        .trim()
        .to_string();
    if name.is_empty() || name.len() > MAX_MODEL_NAME_BYTES {
        return Err(error(
            &f.child("name"),
            format!("must be 1 to {MAX_MODEL_NAME_BYTES} bytes"),
        ));
    }
    let base_url_path = f.child("base-url");
    let base_url_text = f
        .string("base-url")?
        .ok_or_else(|| error(&base_url_path, "is required (e.g. http://ollama:11434)"))?;
    let base_url = BaseUrl::parse(&base_url_path, base_url_text.trim())?;
    let instance_path = match f.string("path")? {
        Some(p) if p.starts_with('/') && !p.contains(['?', '#', ' ']) => p.to_string(),
        Some(p) => {
            return Err(error(
                &f.child("path"),
                format!("must start with '/' and carry no query (got {p:?})"),
            ))
        }
        None => format!("/v1/{}", kind.primary_endpoint().suffix()),
    };
    let weight = f.integer("weight", 1, 0, MAX_WEIGHT)?;
    let active = match f.string("status")? {
        None => true,
        Some(s) => s.trim().eq_ignore_ascii_case("active"),
    };
    let id = match f.string("instance-id")? {
        Some(id) if !id.trim().is_empty() => id.trim().to_string(),
        _ => format!("{}-{index}", kind.key()),
    };
    let headers = match f.take("headers") {
        None => Vec::new(),
        Some(v) => parse_headers(&f.child("headers"), v)?,
    };
    let rate_limit = take_policy(&mut f, "rate-limit", RateLimitPolicy::parse_for_instance)?;
    let circuit_breaker =
        take_breaker(&mut f, service.breaker)?.or_else(|| service.breaker.cloned());
    let health_check = take_health_check(&mut f, service.health_check)?
        .or_else(|| service.health_check.cloned())
        .filter(|h| h.enabled);
    // Bookkeeping fields of the original (database ids, adapter names): accepted, not needed.
    f.string("adapter")?;
    f.take("id");
    f.boolean("healthy", true)?;
    f.finish()?;

    let paths = Endpoint::ALL
        .iter()
        .filter(|e| e.service() == kind)
        .map(|e| {
            (
                *e,
                format!("{}{}", base_url.prefix, e.upstream_path(&instance_path)),
            )
        })
        .collect();
    // Shared state (breaker, health, load) follows the instance across reloads while its id and
    // address stay the same, and starts afresh when either changes: an id given by position
    // (`chat-1`) may name another backend after an edit.
    let address = format!(
        "{}|{}|{}|{}|{}",
        kind.key(),
        base_url.tls,
        base_url.host,
        base_url.port,
        base_url.prefix
    );
    let state = format!("{id}/{:08x}", hash64(address.as_bytes()) & 0xffff_ffff);
    Ok(Instance {
        cluster: cluster_name(&id),
        in_flight_key: format!("jairouter/inflight/{state}"),
        latency_key: format!("jairouter/latency/{state}"),
        state_key: format!("jairouter/instance/{state}"),
        breaker: circuit_breaker
            .as_ref()
            .and_then(CircuitBreakerPolicy::breaker),
        health_check,
        id,
        name,
        base_url,
        weight,
        active,
        paths,
        headers,
        rate_limit,
        circuit_breaker,
    })
}

/// Envoy cluster names appear in stats names, where dots and colons would split them.
fn cluster_name(id: &str) -> String {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("jairouter-{safe}")
}

fn parse_headers(path: &str, value: &Value) -> Result<Vec<(String, String)>> {
    let map = value
        .as_object()
        .ok_or_else(|| error(path, "must be a mapping of header name to value"))?;
    let mut headers = Vec::with_capacity(map.len());
    for (name, v) in map {
        let hpath = reader::join(path, name);
        let token_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token_ok {
            return Err(error(&hpath, "is not a valid header name"));
        }
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(error(
                    &hpath,
                    format!("must be a string (got {})", reader::kind(other)),
                ))
            }
        };
        if text.contains(['\r', '\n', '\0']) {
            return Err(error(&hpath, "must not contain line breaks"));
        }
        headers.push((name.to_ascii_lowercase(), text));
    }
    Ok(headers)
}

fn models_list_json<'a>(services: impl Iterator<Item = &'a Service>) -> String {
    models_list_json_where(services, |_, _| true)
}

/// The OpenAI model list of the models `shown(service, model)` lets through.
pub fn models_list_json_where<'a>(
    services: impl Iterator<Item = &'a Service>,
    shown: impl Fn(ServiceType, &str) -> bool,
) -> String {
    let mut seen: Vec<&str> = Vec::new();
    let mut data = Vec::new();
    for service in services {
        for instance in &service.instances {
            if seen.contains(&instance.name.as_str()) || !shown(service.kind, &instance.name) {
                continue;
            }
            seen.push(&instance.name);
            data.push(model_object(&instance.name, service.kind));
        }
    }
    serde_json::json!({"object": "list", "data": data}).to_string()
}

/// One entry of the OpenAI model list (`owned_by` names the gateway, as the original does).
pub fn model_object(name: &str, kind: ServiceType) -> Value {
    serde_json::json!({
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "jairouter",
        "service_type": kind.key(),
    })
}

#[cfg(test)]
mod tests;
