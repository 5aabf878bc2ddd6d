//! The plan: the configuration compiled once into the immutable structure every request shares
//! (by `Rc`), so the request path only looks things up. Each mechanism compiles its own part:
//! `balance::Pool` the rotation, ring and weights of a model, `limit::Limits` the rate limits
//! and their buckets, `breaker::BreakerPolicy` an instance's breaker, `auth::ApiKeys` the key
//! table; `shared_keys` names the state they keep. The configuration itself is kept once: each
//! part holds its config value (`spec`) and only what is compiled from it beside it.

use crate::auth::ApiKeys;
use crate::balance::{Member, Pool};
use crate::breaker::BreakerPolicy;
use crate::bytes::FastMap;
use crate::config::reader::error;
use crate::config::{
    Config, ConfigError, InstanceConfig, Scope, ServiceConfig, ServiceSpec, Settings, Strategy,
    MAX_CLIENT_TABLE_BYTES,
};
use crate::endpoint::{Endpoint, ServiceType};
use crate::limit::Limits;
use crate::shared_keys::InstanceKeys;
use serde_json::Value;
use std::collections::{HashMap, HashSet};

/// Each part of the plan is its configuration (`spec`, kept once, as written and validated) and,
/// beside it, only what is compiled from it.
#[derive(Debug)]
pub struct Plan {
    /// What applies to every request as written (`gateway`, `retries`, `request-timeout`,
    /// `jairouter.tracing`).
    pub spec: Settings,
    /// Indexed by `ServiceType::index()`; `None` when the service is not configured.
    services: [Option<Service>; 7],
    /// The `GET /v1/models` answer, built once.
    pub models_json: String,
    /// Every enabled rate limit, compiled.
    pub limits: Limits,
    /// Whether anything keys on the client address (hash strategies, per-client limits): the
    /// binding asks Envoy for it only then.
    pub uses_client_address: bool,
    /// `jairouter.security.api-key`: who may call, and their quotas (off when absent).
    pub api_keys: ApiKeys,
}

#[derive(Debug)]
pub struct Service {
    /// Its settings as configured (kind, load balancing, retries, fallbacks).
    pub spec: ServiceSpec,
    /// Its instances, compiled, in the configured order (the index limits and pools name).
    pub instances: Vec<Instance>,
    /// Each model's pool: the instances that can serve it, and how they take turns.
    pub models: FastMap<String, Pool>,
    /// Models whose instances' adapters cannot serve this service, with the adapter's name.
    pub unsupported: HashMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Instance {
    /// Its configuration as written (id, name, base URL, weight, headers, adapter...).
    pub spec: InstanceConfig,
    /// This instance's breaker, when one is enabled for it.
    pub breaker: Option<BreakerPolicy>,
    /// Shared-data key of its state: breaker and health (`breaker::Breaker`).
    pub state_key: String,
    /// Shared-data key of the requests in flight to this instance (least-connections, least-latency).
    pub in_flight_key: String,
    /// Shared-data key of this instance's latency estimate (least-latency).
    pub latency_key: String,
}

impl Instance {
    fn compile(kind: ServiceType, spec: InstanceConfig) -> Instance {
        let keys = InstanceKeys::new(kind, &spec.id, &spec.base_url);
        Instance {
            breaker: spec
                .circuit_breaker
                .as_ref()
                .and_then(BreakerPolicy::compile),
            state_key: keys.state,
            in_flight_key: keys.in_flight,
            latency_key: keys.latency,
            spec,
        }
    }

    pub fn upstream_path(&self, endpoint: Endpoint) -> Option<&str> {
        self.spec
            .paths
            .iter()
            .find(|(e, _)| *e == endpoint)
            .map(|(_, p)| p.as_str())
    }

    fn member(&self, index: usize) -> Member<'_> {
        Member {
            index,
            id: &self.spec.id,
            weight: self.spec.weight,
            active: self.spec.active,
            in_flight_key: &self.in_flight_key,
            latency_key: &self.latency_key,
        }
    }
}

impl Service {
    fn compile(service: ServiceConfig) -> Service {
        let ServiceConfig {
            spec,
            instances,
            models,
        } = service;
        let kind = spec.kind;
        let instances: Vec<Instance> = instances
            .into_iter()
            .map(|i| Instance::compile(kind, i))
            .collect();
        // One pass groups the instances by model (a model's members keep their order): linear
        // in the instances however many models they serve.
        let mut members: HashMap<&str, Vec<Member<'_>>> = HashMap::with_capacity(models.len());
        // An instance whose adapter cannot serve the service takes none of its requests; a
        // model left with no other instance answers 501 (`unsupported`).
        let mut unsupported = HashMap::new();
        for (index, instance) in instances.iter().enumerate() {
            if !instance.spec.adapter.serves(kind) {
                log::warn!(
                    "instance {} ({}) takes no {} requests: adapter {} does not serve them",
                    instance.spec.id,
                    instance.spec.name,
                    kind.key(),
                    instance.spec.adapter.name
                );
                unsupported.insert(
                    instance.spec.name.clone(),
                    instance.spec.adapter.name.clone(),
                );
                continue;
            }
            members
                .entry(instance.spec.name.as_str())
                .or_default()
                .push(instance.member(index));
        }
        unsupported.retain(|model, _| !members.contains_key(model.as_str()));
        let models = members
            .iter()
            .map(|(model, members)| {
                let pool = Pool::compile(kind, model, &spec.load_balance, members);
                (model.to_string(), pool)
            })
            .collect();
        Service {
            spec,
            instances,
            models,
            unsupported,
        }
    }
}

impl Plan {
    /// Reads the filter's plugin configuration (see `Config::from_json`) and compiles it: the one
    /// entry of the binding and the renderer. Errors name the key path.
    pub fn from_json(bytes: &[u8]) -> Result<Plan, ConfigError> {
        Plan::compile(Config::from_json(bytes)?)
    }

    pub fn from_value(value: &Value) -> Result<Plan, ConfigError> {
        Plan::compile(Config::from_value(value)?)
    }

    pub fn compile(config: Config) -> Result<Plan, ConfigError> {
        let configured: Vec<&ServiceConfig> = config.services().collect();
        let mut limits = Limits::compile(
            config.rate_limit.as_ref(),
            config.token_limit.as_ref(),
            &configured,
            &config.api_keys.keys,
        );
        if config.settings.gateway.global_rate_limit.is_some() {
            limits.share_across_replicas()?;
        }
        check_client_tables(&limits)?;
        let api_keys = ApiKeys::compile(&config.api_keys);
        let uses_client_address = api_keys.uses_client_address()
            || limits.list.iter().any(|l| l.scope == Scope::Client)
            || configured.iter().any(|s| {
                matches!(
                    s.spec.load_balance.strategy,
                    Strategy::IpHash | Strategy::ConsistentHash
                )
            });
        let services = config.services.map(|s| s.map(Service::compile));
        let models_json = models_list_json_where(services.iter().flatten(), |_, _| true);
        Ok(Plan {
            spec: config.settings,
            services,
            models_json,
            limits,
            uses_client_address,
            api_keys,
        })
    }

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

    /// Every shared-data key this plan uses (buckets, counters, instance state).
    pub fn shared_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .limits
            .initial_keys()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        for service in self.services() {
            for i in &service.instances {
                keys.extend([&i.state_key, &i.in_flight_key, &i.latency_key].map(String::clone));
            }
        }
        keys
    }

    /// The keys `previous` used that this plan does not: shared data has no delete, so a reload
    /// empties them (a per-client table may hold megabytes) instead of keeping them for good.
    pub fn stale_keys(&self, previous: &Plan) -> Vec<String> {
        let current: HashSet<String> = self.shared_keys().into_iter().collect();
        previous
            .shared_keys()
            .into_iter()
            .filter(|k| !current.contains(k))
            .collect()
    }
}

/// Per-client tables are preallocated in shared data: refused when they would take more than
/// `MAX_CLIENT_TABLE_BYTES` together, naming the `max-clients` that tips it over.
fn check_client_tables(limits: &Limits) -> Result<(), ConfigError> {
    let mut table_bytes = 0u64;
    for limit in limits.list.iter().filter(|l| l.scope == Scope::Client) {
        let slot = 8 + limit.params.initial_state().len() as u64;
        table_bytes = table_bytes.saturating_add(limit.max_clients.saturating_mul(slot));
        if table_bytes > MAX_CLIENT_TABLE_BYTES {
            return Err(error(
                &format!("{}.max-clients", limit.block),
                format!(
                    "per-client rate-limit tables would take {table_bytes} bytes of shared data \
                     (at most {MAX_CLIENT_TABLE_BYTES}); lower max-clients or the window"
                ),
            ));
        }
    }
    Ok(())
}

/// The OpenAI model list of the models `shown(service, model)` lets through, each once.
pub fn models_list_json_where<'a>(
    services: impl Iterator<Item = &'a Service>,
    shown: impl Fn(ServiceType, &str) -> bool,
) -> String {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut data = Vec::new();
    for service in services {
        for instance in &service.instances {
            if seen.contains(instance.spec.name.as_str())
                || !shown(service.spec.kind, &instance.spec.name)
            {
                continue;
            }
            seen.insert(&instance.spec.name);
            data.push(model_object(&instance.spec.name, service.spec.kind));
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
