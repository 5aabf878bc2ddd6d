//! The read-only status page (`GET /status` on the admin-side listener): which configuration
//! is loaded, and each instance's health, breaker and load, and each rate-limit bucket's level,
//! read from the shared data every worker writes.

use crate::balance::load::{in_flight, latency};
use crate::breaker::{Breaker, State};
use crate::config::BaseUrl;
use crate::limit::Unit;
use crate::metrics::stat_name;
use crate::plan::Plan;
use crate::shared_keys::CONFIG_KEY;
use crate::store::SharedStore;
use serde_json::{json, Value};

/// The configuration's version as the status page and logs name it: a fingerprint of its bytes.
pub fn config_version(bytes: &[u8]) -> String {
    format!("{:016x}", crate::bytes::hash64(bytes))
}

pub fn status_json(config: &Plan, version: &str, store: &dyn SharedStore, now_ns: u64) -> String {
    let services: Vec<Value> = config
        .services()
        .map(|service| {
            let instances: Vec<Value> = service
                .instances
                .iter()
                .map(|instance| {
                    let state = Breaker::decode(store.get(&instance.state_key).0.as_deref());
                    let estimate = latency(store, &instance.latency_key);
                    json!({
                        "id": instance.spec.id,
                        "model": instance.spec.name,
                        "cluster": instance.spec.cluster,
                        "base_url": base_url(&instance.spec.base_url),
                        "weight": instance.spec.weight,
                        "active": instance.spec.active,
                        "healthy": !state.unhealthy,
                        "health_checked": instance.spec.health_check.is_some(),
                        "breaker": match state.state {
                            State::Closed => "closed",
                            State::Open => "open",
                            State::HalfOpen => "half-open",
                        },
                        "breaker_enabled": instance.breaker.is_some(),
                        "consecutive_failures": state.failures,
                        "cooling_down": state.cooldown_until_ns > now_ns,
                        "in_flight": in_flight(store, &instance.in_flight_key),
                        "latency_ms": estimate.estimate_ns / 1_000_000,
                    })
                })
                .collect();
            json!({
                "service": service.spec.kind.key(),
                "load_balance": service.spec.load_balance.strategy.name(),
                "retries": service.spec.retries,
                "instances": instances,
            })
        })
        .collect();
    let limits: Vec<Value> = config
        .limits
        .levels(store, now_ns)
        .into_iter()
        .filter_map(|level| {
            let limit = config.limits.list.get(level.limit)?;
            Some(json!({
                "name": limit.name,
                "scope": limit.scope.name(),
                "unit": match limit.unit {
                    Unit::Requests => "requests",
                    Unit::Tokens => "tokens",
                },
                "bucket": level.bucket,
                "available": level.available,
                "capacity": level.capacity,
            }))
        })
        .collect();
    let per_client: Vec<Value> = config
        .limits
        .list
        .iter()
        .filter(|l| l.scope == crate::config::Scope::Client)
        .map(|l| json!({"name": l.name, "max_clients": l.max_clients}))
        .collect();
    json!({
        "version": version,
        "services": services,
        "rate_limits": limits,
        "per_client_rate_limits": per_client,
    })
    .to_string()
}

fn base_url(url: &BaseUrl) -> String {
    let scheme = if url.tls { "https" } else { "http" };
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    format!("{scheme}://{host}:{}{}", url.port, url.prefix)
}

/// The status page's answer: what the routing filter published, with the shared state now.
pub fn status_page(store: &dyn SharedStore, now_ns: u64) -> (u32, String) {
    let (Some(bytes), _) = store.get(CONFIG_KEY) else {
        return (
            503,
            r#"{"error":"no configuration loaded yet"}"#.to_string(),
        );
    };
    match Plan::from_json(&bytes) {
        Ok(config) => (
            200,
            status_json(&config, &config_version(&bytes), store, now_ns),
        ),
        Err(e) => (503, json!({"error": e.to_string()}).to_string()),
    }
}

/// Each instance's breaker state and health as gauge values (read from shared data, so every
/// VM reports the same), by stat name.
pub fn instance_gauges(config: &Plan, store: &dyn SharedStore) -> Vec<(String, u64)> {
    let mut gauges = Vec::new();
    for service in config.services() {
        for instance in &service.instances {
            let state = Breaker::decode(store.get(&instance.state_key).0.as_deref());
            let labels = [
                ("service", service.spec.kind.key()),
                ("model", instance.spec.name.as_str()),
                ("instance", instance.spec.id.as_str()),
            ];
            gauges.push((
                stat_name("jairouter_circuit_breaker_state", &labels),
                state.state.gauge(),
            ));
            gauges.push((
                stat_name("jairouter_backend_health", &labels),
                u64::from(!state.unhealthy),
            ));
        }
    }
    gauges
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn shows_instances_breakers_and_buckets() {
        let config = Plan::from_value(&json!({
            "rate-limit": {"enabled": true, "algorithm": "token-bucket", "capacity": 10, "rate": 1, "scope": "service"},
            "circuit-breaker": {"failure-threshold": 1, "timeout": 60000},
            "services": {"chat": {"instances": [
                {"name": "m", "base-url": "http://127.0.0.1:9001"},
                {"name": "m", "base-url": "https://[::1]:9002/api/"}
            ]}}
        }))
        .unwrap();
        let store = MemoryStore::default();
        let services: Vec<_> = config.services().collect();
        for (key, initial) in config.limits.initial_keys() {
            store.set(&key, &initial, None).unwrap();
        }
        let second = &services[0].instances[1];
        let now = 5_000_000_000;
        let open = Breaker {
            state: State::Open,
            opened_at_ns: now,
            ..Breaker::CLOSED
        };
        store.set(&second.state_key, &open.encode(), None).unwrap();
        store
            .set(&second.in_flight_key, &3u64.to_le_bytes(), None)
            .unwrap();

        let page: Value = serde_json::from_str(&status_json(&config, "v1", &store, now)).unwrap();
        assert_eq!(page["version"], "v1");
        let instances = &page["services"][0]["instances"];
        assert_eq!(instances[0]["breaker"], "closed");
        assert_eq!(instances[1]["breaker"], "open");
        assert_eq!(instances[1]["in_flight"], 3);
        assert_eq!(instances[1]["base_url"], "https://[::1]:9002/api");
        assert_eq!(page["rate_limits"][0]["bucket"], "chat");
        assert_eq!(page["rate_limits"][0]["available"], 10);
        assert_eq!(page["rate_limits"][0]["capacity"], 10);
    }
}
