//! What loading a configuration does to the shared data every worker reads: each key the
//! configuration uses exists before traffic races on it, keys the previous configuration used
//! and this one does not are emptied, and the configuration is published for the health
//! checker and the status page.

use crate::balance::load::LatencyEstimate;
use crate::breaker::{self, Breaker};
use crate::plan::Plan;
use crate::shared_keys::{CONFIG_KEY, CONFIG_VERSION_KEY};
use crate::status::config_version;
use crate::store::{ensure_counter, SharedStore};

/// Installs `config` (parsed from `bytes`, the plugin configuration): called by every VM that
/// loads it; only the first to load a new configuration finds work beyond the key checks.
pub fn install(config: &Plan, bytes: &[u8], store: &dyn SharedStore) {
    prepare_shared_keys(config, store);
    let previous = store.get(CONFIG_KEY).0;
    if previous.as_deref() == Some(bytes) {
        return;
    }
    let previous = previous.and_then(|b| Plan::from_json(&b).ok());
    for key in previous.map(|p| config.stale_keys(&p)).unwrap_or_default() {
        let _ = store.set(&key, &[], None);
    }
    let _ = store.set(CONFIG_KEY, bytes, None);
    let _ = store.set(CONFIG_VERSION_KEY, config_version(bytes).as_bytes(), None);
}

/// Creates every shared-data key the configuration uses, before traffic races on it (Envoy
/// ignores CAS on a key that does not exist). Keys that exist keep their state: a reload keeps
/// the buckets, breakers and load of everything it did not change.
fn prepare_shared_keys(config: &Plan, store: &dyn SharedStore) {
    for service in config.services() {
        for instance in &service.instances {
            ensure_counter(store, &instance.in_flight_key);
            if unset(store, &instance.latency_key) {
                let _ = store.set(&instance.latency_key, &LatencyEstimate::INITIAL, None);
            }
        }
    }
    for (key, initial) in config.limits.initial_keys() {
        if unset(store, &key) {
            let _ = store.set(&key, &initial, None);
        }
    }
    config.limits.prune_entries(store);
    for instance in config.instances() {
        if unset(store, &instance.state_key) {
            let _ = store.set(&instance.state_key, &Breaker::CLOSED.encode(), None);
        } else if instance.spec.health_check.is_none()
            && breaker::is_unhealthy(store, &instance.state_key)
        {
            // Checked no more (a reload turned its checks off): not down any more.
            breaker::set_unhealthy(store, &instance.state_key, false);
        }
    }
}

/// A key never written, or emptied by a reload that stopped using it.
fn unset(store: &dyn SharedStore, key: &str) -> bool {
    store.get(key).0.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use serde_json::json;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn config(instances: serde_json::Value) -> (Plan, Vec<u8>) {
        let value = json!({"services": {"chat": {"instances": instances}}});
        let bytes = value.to_string().into_bytes();
        (
            Plan::from_json(&bytes).unwrap_or_else(|e| panic!("{e}")),
            bytes,
        )
    }

    #[test]
    fn every_key_exists_before_traffic_and_the_configuration_is_published() {
        let store = MemoryStore::default();
        let (cfg, bytes) = config(json!([{"name": "m", "base-url": "http://a:1"}]));
        install(&cfg, &bytes, &store);
        let instance = cfg
            .instances()
            .next()
            .unwrap_or_else(|| panic!("an instance"));
        for key in [
            &instance.state_key,
            &instance.in_flight_key,
            &instance.latency_key,
        ] {
            assert!(!unset(&store, key), "{key} not created");
        }
        assert_eq!(store.get(CONFIG_KEY).0.as_deref(), Some(bytes.as_slice()));
        let version = store.get(CONFIG_VERSION_KEY).0.unwrap_or_default();
        assert_eq!(version, config_version(&bytes).into_bytes());
    }

    #[test]
    fn a_reload_keeps_unchanged_state_and_empties_what_is_no_longer_used() {
        let store = MemoryStore::default();
        let (old, old_bytes) = config(json!([
            {"name": "m", "base-url": "http://a:1"},
            {"name": "m", "base-url": "http://b:1"}
        ]));
        install(&old, &old_bytes, &store);
        let kept = old
            .instances()
            .next()
            .map(|i| i.state_key.clone())
            .unwrap_or_default();
        let gone = old
            .instances()
            .nth(1)
            .map(|i| i.state_key.clone())
            .unwrap_or_default();
        breaker::set_unhealthy(&store, &kept, true);
        let (new, new_bytes) = config(json!([
            {"name": "m", "base-url": "http://a:1", "health-check": {"enabled": true}}
        ]));
        install(&new, &new_bytes, &store);
        assert!(
            breaker::is_unhealthy(&store, &kept),
            "state of an unchanged instance kept"
        );
        assert!(unset(&store, &gone), "the removed instance's state emptied");
        assert_eq!(
            store.get(CONFIG_KEY).0.as_deref(),
            Some(new_bytes.as_slice())
        );
    }

    #[test]
    fn an_instance_no_longer_checked_is_not_left_down() {
        let store = MemoryStore::default();
        let (cfg, bytes) = config(json!([{"name": "m", "base-url": "http://a:1"}]));
        install(&cfg, &bytes, &store);
        let key = cfg
            .instances()
            .next()
            .map(|i| i.state_key.clone())
            .unwrap_or_default();
        breaker::set_unhealthy(&store, &key, true);
        let (unchecked, bytes) = config(json!([
            {"name": "m", "base-url": "http://a:1", "health-check": {"enabled": false}}
        ]));
        install(&unchecked, &bytes, &store);
        assert!(!breaker::is_unhealthy(&store, &key));
    }
}
