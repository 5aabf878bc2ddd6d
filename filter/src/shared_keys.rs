//! Every name the filter gives a value in Envoy's shared data. A live reload keeps the state of
//! whatever keeps its key, so these names are the compatibility contract between versions:
//! changing one resets that state (counters, buckets, breakers) on upgrade.

use crate::bytes::hash64;
use crate::config::BaseUrl;
use crate::endpoint::ServiceType;

/// The routing filter's plugin configuration, verbatim: the health checker and the status page
/// read it, so they follow every reload without a configuration of their own.
pub const CONFIG_KEY: &str = "jairouter/config";
/// Its version (`status::config_version`), written after it: what the health checker polls each
/// tick, so it copies the configuration out of shared data only when it changed.
pub const CONFIG_VERSION_KEY: &str = "jairouter/config-version";

/// The state one instance keeps in shared data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceKeys {
    /// Breaker and health (`breaker::Breaker`).
    pub state: String,
    /// Requests in flight to it (least-connections, least-latency).
    pub in_flight: String,
    /// Its latency estimate (least-latency).
    pub latency: String,
}

impl InstanceKeys {
    /// Shared state (breaker, health, load) follows the instance across reloads while its id and
    /// address stay the same, and starts afresh when either changes: an id given by position
    /// (`chat-1`) may name another backend after an edit.
    pub fn new(kind: ServiceType, id: &str, base_url: &BaseUrl) -> InstanceKeys {
        let address = format!(
            "{}|{}|{}|{}|{}",
            kind.key(),
            base_url.tls,
            base_url.host,
            base_url.port,
            base_url.prefix
        );
        let state = format!("{id}/{:08x}", hash64(address.as_bytes()) & 0xffff_ffff);
        InstanceKeys {
            in_flight: format!("jairouter/inflight/{state}"),
            latency: format!("jairouter/latency/{state}"),
            state: format!("jairouter/instance/{state}"),
        }
    }
}

/// The keys of one rate limit's buckets. A fixed bucket lives in the entry of the subject it
/// counts (`place` and the bucket's label: `model/chat/llama`, `api-key/bench/all`), beside the
/// buckets of the other limits counting that subject, each a record tagged with its limit's
/// fingerprint (see `limit::entry`); per-client slots live under a prefix that changes with the
/// limit's numbers (its `fingerprint`), so a reload never reads a bucket of other numbers as
/// its own. Fixed buckets were `jairouter/rl/<fingerprint>/<label>` before they shared entries:
/// a live upgrade across that change starts them full once and leaves the old keys (a few
/// dozen bytes each) until Envoy restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitKeys {
    entry: String,
    clients: String,
}

impl LimitKeys {
    pub fn new(place: &str, fingerprint: u64) -> LimitKeys {
        LimitKeys {
            entry: format!("jairouter/limits/{place}/"),
            clients: format!("jairouter/rl/{fingerprint:016x}/c/"),
        }
    }

    /// What the keys of its entries start with: the same for every limit counting the same
    /// kind of subject.
    pub fn entry_prefix(&self) -> &str {
        &self.entry
    }

    /// The entry of the subject `label` names (`all`, a service, a model, an instance).
    pub fn bucket(&self, label: &str) -> String {
        self.bucket_of(&[label])
    }

    /// The same, for a label in parts (a model's is `service/model`): one string, no copy of
    /// the label made first.
    pub fn bucket_of(&self, label: &[&str]) -> String {
        let mut key = String::with_capacity(
            self.entry.len() + label.iter().map(|part| part.len()).sum::<usize>(),
        );
        key.push_str(&self.entry);
        label.iter().for_each(|part| key.push_str(part));
        key
    }

    /// One slot of the per-client table.
    pub fn client_slot(&self, slot: u64) -> String {
        format!("{}{slot}", self.clients)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// The names as released: a change here loses state on every live reload of an upgrade.
    #[test]
    fn names_do_not_change() {
        assert_eq!(CONFIG_KEY, "jairouter/config");
        assert_eq!(CONFIG_VERSION_KEY, "jairouter/config-version");
        let url = BaseUrl::parse("u", "http://ollama:11434").unwrap();
        let keys = InstanceKeys::new(ServiceType::Chat, "chat-0", &url);
        let state = keys
            .state
            .strip_prefix("jairouter/instance/chat-0/")
            .unwrap();
        assert_eq!(state.len(), 8);
        assert_eq!(keys.in_flight, format!("jairouter/inflight/chat-0/{state}"));
        assert_eq!(keys.latency, format!("jairouter/latency/chat-0/{state}"));
        let limit = LimitKeys::new("model", 0xab);
        assert_eq!(limit.bucket("chat/m"), "jairouter/limits/model/chat/m");
        assert_eq!(limit.client_slot(3), "jairouter/rl/00000000000000ab/c/3");
    }
}
