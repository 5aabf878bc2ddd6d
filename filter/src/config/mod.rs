//! The configuration as users write it: JAiRouter's `model:` section (and the original's
//! `jairouter.security.api-key`), read and validated once, every refusal naming its key path.
//! Data only: `plan` compiles it into what requests run on.

mod adapter;
mod api_keys;
mod policy;
pub(crate) mod reader;
mod tracing;

pub use adapter::{Adapter, AdapterTable, Protocol, ANTHROPIC_VERSION};
pub use api_keys::{
    ApiKeyEntry, ApiKeySection, ADMIN_PERMISSION, DEFAULT_HEADER_NAME, MAX_QUOTA, MIN_SALT_BYTES,
};
pub use policy::{
    Algorithm, CircuitBreakerPolicy, FallbackPolicy, HealthCheckPolicy, LoadBalance,
    RateLimitPolicy, Scope, Strategy, TokenLimitPolicy, MAX_WINDOW_REQUESTS,
};
pub use reader::ConfigError;
pub use tracing::{OtlpExporter, OtlpProtocol, TracingOptions, OTLP_HTTP_PATH};

use crate::endpoint::{Endpoint, ServiceType};
use reader::{error, Fields, Result};
use serde_json::Value;
use std::collections::{HashMap, HashSet};

/// Upper bounds that keep a hostile or mistaken configuration from exhausting the VM.
pub const MAX_INSTANCES: usize = 10_000;
pub const MAX_WEIGHT: u64 = 1_000_000;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
pub const MAX_MODEL_NAME_BYTES: usize = 1024;

/// The whole configuration, as read.
#[derive(Debug, Clone)]
pub struct Config {
    /// Indexed by `ServiceType::index()`; `None` when the service is not configured.
    pub services: [Option<ServiceConfig>; 7],
    /// The global policy blocks, as written: every service and instance has them resolved into
    /// its own (the plan compiles those, and keeps none of these).
    pub load_balance: LoadBalance,
    pub rate_limit: Option<RateLimitPolicy>,
    pub token_limit: Option<TokenLimitPolicy>,
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    pub fallback: Option<FallbackPolicy>,
    /// `jairouter.security.api-key` (off when absent).
    pub api_keys: ApiKeySection,
    pub settings: Settings,
}

/// What applies to every request as written: the plan keeps it as it is.
#[derive(Debug, Clone)]
pub struct Settings {
    pub gateway: GatewayOptions,
    /// `retries`: further attempts on another instance of the model (Envoy's retry policy on
    /// the route; services that differ say so per request).
    pub retries: u64,
    /// `request-timeout` in ms (0: none): the whole exchange, streamed answers included.
    pub request_timeout_ms: u64,
    /// `jairouter.tracing` (off when absent or not enabled): Envoy traces requests (the
    /// renderer's part) and each request's span gets the filter's attributes.
    pub tracing: Option<TracingOptions>,
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

impl Default for GatewayOptions {
    /// No `gateway` block.
    fn default() -> GatewayOptions {
        GatewayOptions {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            instance_header: true,
            trusted_hops: 0,
            global_rate_limit: None,
            jwt: None,
            edge: EdgeLimits::DEFAULT,
        }
    }
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

/// `gateway.global-rate-limit`: the limits drawn before the pick are also asked of one
/// rate-limit service (Envoy's protocol, over gRPC), so they hold across replicas; see
/// `limit::global` and `envoy/ratelimit/PROTOCOL.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalRateLimit {
    /// The rate-limit service (gRPC, `host:port`).
    pub service: BaseUrl,
    pub domain: String,
    /// Refuse requests when the service cannot be reached (default: let them through, under
    /// the local limits alone).
    pub failure_mode_deny: bool,
    pub timeout_ms: u64,
    pub token_settlement: TokenSettlement,
}

/// `gateway.global-rate-limit.token-settlement`: how shared token budgets learn what a
/// response really used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSettlement {
    /// jairouter-ratelimit's `Settle`: overruns charged (into debt), unused estimates given back.
    Refunds,
    /// Any rate-limit service: overruns charged with `ShouldRateLimit`, nothing given back.
    ChargesOnly,
}

/// One service (`model.services.<type>`): its own settings, and its instances.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub spec: ServiceSpec,
    pub instances: Vec<InstanceConfig>,
    /// The model names its instances serve, each once, in the order they first appear.
    pub models: Vec<String>,
}

/// A service's settings (`model.services.<type>` but its instances), with what it inherits from
/// the global blocks resolved.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub kind: ServiceType,
    pub load_balance: LoadBalance,
    pub rate_limit: Option<RateLimitPolicy>,
    pub token_limit: Option<TokenLimitPolicy>,
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    pub fallback: Option<FallbackPolicy>,
    /// Retries for this service's requests (its own `retries`, else the global; 0 for uploads
    /// unless `retry-uploads`).
    pub retries: u64,
    /// Models that stand in for a model none of whose instances can take a request, in order
    /// (the service's `fallback.models`, else the global one, for models of this service).
    pub fallbacks: HashMap<String, Vec<String>>,
}

/// One entry of a service's `instances`, with the policy blocks in force for it.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
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
    /// Headers sent upstream on every request to this instance (e.g. the backend's credentials),
    /// its adapter's first (the instance's own win).
    pub headers: Vec<(String, String)>,
    pub rate_limit: Option<RateLimitPolicy>,
    /// The `circuit-breaker` block in force here (instance, else service, else global).
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    /// Checked by the process's health checker, when enabled for it.
    pub health_check: Option<HealthCheckPolicy>,
    /// What the instance speaks (`adapter`: the instance's, else its service's, else global).
    pub adapter: Adapter,
    /// `path` as the configuration gave it (a native path for a translating adapter).
    pub path_given: Option<String>,
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

impl Config {
    pub fn service(&self, kind: ServiceType) -> Option<&ServiceConfig> {
        self.services.get(kind.index()).and_then(Option::as_ref)
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceConfig> {
        self.services.iter().flatten()
    }

    /// Reads the filter's plugin configuration: the JSON form of JAiRouter's `model:` section,
    /// or an object holding it under `model` beside the original's `jairouter.security.api-key`
    /// and `jairouter.tracing`.
    pub fn from_json(bytes: &[u8]) -> std::result::Result<Config, ConfigError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| error("configuration", format!("is not valid JSON: {e}")))?;
        Self::from_value(&value)
    }

    pub fn from_value(value: &Value) -> std::result::Result<Config, ConfigError> {
        let (model, api_keys, tracing) = match value.get("model") {
            Some(inner) if value.get("services").is_none() => {
                let jairouter = value.get("jairouter");
                let section = jairouter
                    .and_then(|j| j.get("security"))
                    .and_then(|s| s.get("api-key").or_else(|| s.get("apiKey")));
                let api_keys = match section {
                    Some(v) => ApiKeySection::parse("jairouter.security.api-key", v)?,
                    None => ApiKeySection::default(),
                };
                let tracing = match jairouter.and_then(|j| j.get("tracing")) {
                    Some(v) if !v.is_null() => TracingOptions::parse("jairouter.tracing", v)?,
                    _ => None,
                };
                (inner, api_keys, tracing)
            }
            _ => (value, ApiKeySection::default(), None),
        };
        let mut config = parse_model(model, api_keys)?;
        config.settings.tracing = tracing;
        Ok(config)
    }
}

fn parse_model(value: &Value, api_keys: ApiKeySection) -> Result<Config> {
    let mut f = Fields::new("model", value)?;
    let adapters = match f.take("adapter-definitions") {
        Some(v) => AdapterTable::parse(&f.child("adapter-definitions"), v)?,
        None => AdapterTable::default(),
    };
    let adapter = match f.string("adapter")? {
        Some(name) => adapters.resolve(&f.child("adapter"), name)?,
        None => Adapter::normal(),
    };
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
        None => GatewayOptions::default(),
    };
    let services_path = f.child("services");
    let services_value = f.take("services");
    f.finish()?;

    let global = Inherited {
        breaker: circuit_breaker.as_ref(),
        health_check: health_check.as_ref(),
        retries,
        retry_uploads,
        fallback: fallback.as_ref(),
        adapters: &adapters,
        adapter: &adapter,
    };
    let services = match services_value {
        Some(v) => parse_services(&services_path, v, &load_balance, global)?,
        None => Default::default(),
    };
    Ok(Config {
        services,
        load_balance,
        rate_limit,
        token_limit,
        circuit_breaker,
        fallback,
        api_keys,
        settings: Settings {
            gateway,
            retries,
            request_timeout_ms,
            tracing: None,
        },
    })
}

/// `model.services`: each service type once, and at most `MAX_INSTANCES` instances in all, each
/// with a cluster of its own.
fn parse_services(
    services_path: &str,
    value: &Value,
    global_lb: &LoadBalance,
    global: Inherited<'_>,
) -> Result<[Option<ServiceConfig>; 7]> {
    let map = value.as_object().ok_or_else(|| {
        error(
            services_path,
            "must be a mapping of service type to service",
        )
    })?;
    let mut services: [Option<ServiceConfig>; 7] = Default::default();
    let mut total_instances = 0usize;
    let mut clusters: HashMap<String, String> = HashMap::new();
    for (key, service_value) in map {
        let path = reader::join(services_path, key);
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
        let service = parse_service(&path, kind, service_value, global_lb, global, &mut clusters)?;
        total_instances = total_instances.saturating_add(service.instances.len());
        if total_instances > MAX_INSTANCES {
            return Err(error(
                services_path,
                format!("more than {MAX_INSTANCES} instances in all"),
            ));
        }
        *slot = Some(service);
    }
    Ok(services)
}

/// The fallback lists that concern this service's models; each stand-in must be a model of the
/// same service (it gets the same request).
fn fallback_models(
    policy: Option<&FallbackPolicy>,
    models: &HashSet<&str>,
    kind: ServiceType,
) -> Result<HashMap<String, Vec<String>>> {
    let mut out = HashMap::new();
    let Some(policy) = policy.filter(|p| p.enabled) else {
        return Ok(out);
    };
    for (model, stand_ins) in &policy.models {
        if !models.contains(model.as_str()) {
            continue;
        }
        if let Some(missing) = stand_ins.iter().find(|m| !models.contains(m.as_str())) {
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
    adapters: &'a AdapterTable,
    /// The adapter of instances that name none (the service's, else the global one).
    adapter: &'a Adapter,
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
    let settlement_path = f.child("token-settlement");
    let token_settlement = match f.string("token-settlement")?.map(str::trim) {
        None | Some("refunds") => TokenSettlement::Refunds,
        Some("charges-only") => TokenSettlement::ChargesOnly,
        Some(other) => {
            return Err(error(
                &settlement_path,
                format!("unknown {other:?} (expected refunds or charges-only)"),
            ))
        }
    };
    f.finish()?;
    Ok(GlobalRateLimit {
        service,
        domain,
        failure_mode_deny,
        timeout_ms,
        token_settlement,
    })
}

fn parse_service(
    path: &str,
    kind: ServiceType,
    value: &Value,
    global_lb: &LoadBalance,
    global: Inherited<'_>,
    clusters: &mut HashMap<String, String>,
) -> Result<ServiceConfig> {
    let mut f = Fields::new(path, value)?;
    let adapter = match f.string("adapter")? {
        Some(name) => global.adapters.resolve(&f.child("adapter"), name)?,
        None => global.adapter.clone(),
    };
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
    let list = take_instance_list(&mut f, &instances_path)?;
    f.finish()?;
    if list.len() > MAX_INSTANCES {
        return Err(error(
            &instances_path,
            format!("more than {MAX_INSTANCES} instances"),
        ));
    }
    let inherited = Inherited {
        breaker: circuit_breaker.as_ref(),
        health_check: health_check.as_ref(),
        adapter: &adapter,
        ..global
    };
    let instances = parse_instances(&instances_path, kind, &list, inherited, clusters)?;
    let (models, seen) = distinct_models(&instances);
    let fallbacks = fallback_models(fallback.as_ref().or(global.fallback), &seen, kind)?;
    Ok(ServiceConfig {
        spec: ServiceSpec {
            kind,
            load_balance,
            rate_limit,
            token_limit,
            circuit_breaker,
            fallback,
            retries,
            fallbacks,
        },
        instances,
        models,
    })
}

/// A service's `instances`: a list, or none.
fn take_instance_list<'v>(f: &mut Fields<'v>, instances_path: &str) -> Result<Vec<&'v Value>> {
    match f.take("instances") {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.iter().collect()),
        Some(other) => Err(error(
            instances_path,
            format!("must be a list (got {})", reader::kind(other)),
        )),
    }
}

/// Each instance of the list, refusing one whose cluster (its `instance-id`) another has.
fn parse_instances(
    instances_path: &str,
    kind: ServiceType,
    list: &[&Value],
    inherited: Inherited<'_>,
    clusters: &mut HashMap<String, String>,
) -> Result<Vec<InstanceConfig>> {
    let mut instances = Vec::with_capacity(list.len());
    for (index, item) in list.iter().enumerate() {
        let ipath = format!("{instances_path}[{index}]");
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
    Ok(instances)
}

/// The model names the instances serve, each once in the order they first appear, and as a set.
/// Linear in the instances: a configuration of thousands of models loads in milliseconds.
fn distinct_models(instances: &[InstanceConfig]) -> (Vec<String>, HashSet<&str>) {
    let mut models: Vec<String> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::with_capacity(instances.len());
    for instance in instances {
        if seen.insert(&instance.name) {
            models.push(instance.name.clone());
        }
    }
    (models, seen)
}

fn parse_instance(
    path: &str,
    kind: ServiceType,
    index: usize,
    value: &Value,
    service: Inherited<'_>,
) -> Result<InstanceConfig> {
    let mut f = Fields::new(path, value)?;
    let name = take_model_name(&mut f)?;
    let base_url_path = f.child("base-url");
    let base_url_text = f
        .string("base-url")?
        .ok_or_else(|| error(&base_url_path, "is required (e.g. http://ollama:11434)"))?;
    let base_url = BaseUrl::parse(&base_url_path, base_url_text.trim())?;
    let path_given = f.string("path")?.map(str::to_string);
    let instance_path = match path_given.as_deref() {
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
    let adapter = take_instance_adapter(&mut f, service, path_given.as_deref(), &base_url)?;
    // Bookkeeping fields of the original (database ids): accepted, not needed.
    f.take("id");
    f.boolean("healthy", true)?;
    f.finish()?;

    Ok(InstanceConfig {
        cluster: cluster_name(&id),
        paths: upstream_paths(kind, &base_url, &instance_path),
        headers: with_adapter_headers(&adapter, headers),
        health_check,
        id,
        name,
        base_url,
        weight,
        active,
        rate_limit,
        circuit_breaker,
        adapter,
        path_given,
    })
}

/// An instance's `name`: the model name clients send.
fn take_model_name(f: &mut Fields<'_>) -> Result<String> {
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
    Ok(name)
}

/// An instance's `adapter` (else its service's). An Ollama reached at its OpenAI-compatible
/// `/v1` keeps the passthrough.
fn take_instance_adapter(
    f: &mut Fields<'_>,
    service: Inherited<'_>,
    path_given: Option<&str>,
    base_url: &BaseUrl,
) -> Result<Adapter> {
    let mut adapter = match f.string("adapter")? {
        Some(name) => service.adapters.resolve(&f.child("adapter"), name)?,
        None => service.adapter.clone(),
    };
    let openai_path =
        path_given.is_some_and(|p| p.starts_with("/v1/")) || base_url.prefix.ends_with("/v1");
    if adapter.protocol == Protocol::Ollama && openai_path {
        adapter.protocol = Protocol::OpenAi;
    }
    if let Some(responses) = f.string("responses")? {
        adapter.serves_responses = responses_native(&f.child("responses"), responses, &adapter)?;
    }
    Ok(adapter)
}

/// An instance's `responses`: `native` when its backend serves `/v1/responses` itself (OpenAI,
/// vLLM, Ollama's `/v1`), `translated` (the default) when it serves chat completions only.
fn responses_native(path: &str, value: &str, adapter: &Adapter) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "translated" => Ok(false),
        "native" if adapter.protocol == Protocol::OpenAi => Ok(true),
        "native" => Err(error(
            path,
            format!(
                "native needs an OpenAI-compatible backend (this instance's adapter is `{}`)",
                adapter.name
            ),
        )),
        _ => Err(error(
            path,
            format!(
                "must be native (the backend serves /v1/responses itself) or translated (to \
                 chat completions; got {value:?})"
            ),
        )),
    }
}

/// The upstream path of every endpoint of the service (base-url prefix included).
fn upstream_paths(
    kind: ServiceType,
    base_url: &BaseUrl,
    instance_path: &str,
) -> Vec<(Endpoint, String)> {
    Endpoint::ALL
        .iter()
        .filter(|e| e.service() == kind)
        .map(|e| {
            (
                *e,
                format!("{}{}", base_url.prefix, e.upstream_path(instance_path)),
            )
        })
        .collect()
}

/// The adapter's headers the instance does not set itself, then the instance's.
fn with_adapter_headers(adapter: &Adapter, own: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = adapter
        .headers
        .iter()
        .filter(|(name, _)| !own.iter().any(|(n, _)| n == name))
        .cloned()
        .collect();
    headers.extend(own);
    headers
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

/// A string, or a number or boolean YAML wrote unquoted, as text.
fn scalar_text(path: &str, value: &Value) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(error(
            path,
            format!("must be a string (got {})", reader::kind(other)),
        )),
    }
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
        let text = scalar_text(&hpath, v)?;
        if text.contains(['\r', '\n', '\0']) {
            return Err(error(&hpath, "must not contain line breaks"));
        }
        headers.push((name.to_ascii_lowercase(), text));
    }
    Ok(headers)
}
