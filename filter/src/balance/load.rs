//! What least-connections and least-latency know about each instance, kept in shared data so
//! every Envoy worker sees the same numbers: the requests in flight, and a peak-sensitive,
//! time-decaying average of the time to first byte.

use crate::bytes::u64_le;
use crate::store::{add_saturating, read_u64, update, SharedStore};

/// Requests in flight to an instance: up when a request is sent, down when it ends however it
/// ends (the binding guarantees exactly one `end` per `begin`).
pub fn begin_request(store: &dyn SharedStore, key: &str) {
    let _ = add_saturating(store, key, 1);
}

pub fn end_request(store: &dyn SharedStore, key: &str) {
    let _ = add_saturating(store, key, -1);
}

pub fn in_flight(store: &dyn SharedStore, key: &str) -> u64 {
    read_u64(store, key)
}

/// A latency estimate as stored: the estimate and when it was last updated, both nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencyEstimate {
    pub estimate_ns: u64,
    pub updated_ns: u64,
}

impl LatencyEstimate {
    pub const INITIAL: [u8; 16] = [0; 16];

    fn decode(bytes: Option<&[u8]>) -> LatencyEstimate {
        let bytes = bytes.unwrap_or_default();
        let word = |at: usize| u64_le(bytes, at).unwrap_or(0);
        LatencyEstimate {
            estimate_ns: word(0),
            updated_ns: word(8),
        }
    }

    fn encode(self) -> Vec<u8> {
        [
            self.estimate_ns.to_le_bytes(),
            self.updated_ns.to_le_bytes(),
        ]
        .concat()
    }

    /// The estimate faded by the time since its last update: an instance nobody has tried for
    /// a while looks faster and faster until it gets a request again, which is how a slow
    /// instance that recovered wins its traffic back.
    pub fn decayed(self, now_ns: u64, decay_ns: u64) -> f64 {
        self.estimate_ns as f64 * fade(now_ns.saturating_sub(self.updated_ns), decay_ns)
    }
}

/// e^(-elapsed/decay): how much of an old estimate is left.
fn fade(elapsed_ns: u64, decay_ns: u64) -> f64 {
    (-(elapsed_ns as f64) / (decay_ns.max(1) as f64)).exp()
}

/// Folds one observed latency into the instance's estimate. A sample above the estimate
/// replaces it at once (peak-EWMA: a slowing instance is noticed by its first slow answer);
/// a lower one pulls it down in proportion to the time since the last sample.
pub fn record_latency(
    store: &dyn SharedStore,
    key: &str,
    sample_ns: u64,
    now_ns: u64,
    decay_ns: u64,
) {
    let _ = update(store, key, |bytes| {
        let old = LatencyEstimate::decode(bytes);
        let estimate_ns = if sample_ns >= old.estimate_ns || old.updated_ns == 0 {
            sample_ns
        } else {
            let keep = fade(now_ns.saturating_sub(old.updated_ns), decay_ns);
            (old.estimate_ns as f64 * keep + sample_ns as f64 * (1.0 - keep)) as u64
        };
        LatencyEstimate {
            estimate_ns,
            updated_ns: now_ns.max(1),
        }
        .encode()
    });
}

pub fn latency(store: &dyn SharedStore, key: &str) -> LatencyEstimate {
    LatencyEstimate::decode(store.get(key).0.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MS: u64 = 1_000_000;
    const DECAY: u64 = 1_000 * MS;

    #[test]
    fn in_flight_counts_up_and_down_and_never_below_zero() {
        let store = MemoryStore::default();
        begin_request(&store, "k");
        begin_request(&store, "k");
        assert_eq!(in_flight(&store, "k"), 2);
        end_request(&store, "k");
        end_request(&store, "k");
        end_request(&store, "k");
        assert_eq!(in_flight(&store, "k"), 0);
    }

    #[test]
    fn a_slow_answer_raises_the_estimate_at_once() {
        let store = MemoryStore::default();
        record_latency(&store, "l", 10 * MS, 1_000 * MS, DECAY);
        record_latency(&store, "l", 400 * MS, 1_001 * MS, DECAY);
        assert_eq!(latency(&store, "l").estimate_ns, 400 * MS);
    }

    #[test]
    fn fast_answers_pull_the_estimate_down_over_time() {
        let store = MemoryStore::default();
        record_latency(&store, "l", 400 * MS, 1_000 * MS, DECAY);
        // One fast answer right after barely moves it; after a few decay times it is near the sample.
        record_latency(&store, "l", 10 * MS, 1_010 * MS, DECAY);
        let soon = latency(&store, "l").estimate_ns;
        assert!(soon > 390 * MS, "{soon}");
        record_latency(&store, "l", 10 * MS, 5_000 * MS, DECAY);
        let later = latency(&store, "l").estimate_ns;
        assert!(later < 20 * MS, "{later}");
    }

    #[test]
    fn an_idle_estimate_fades() {
        let e = LatencyEstimate {
            estimate_ns: 400 * MS,
            updated_ns: 1_000 * MS,
        };
        assert!((e.decayed(1_000 * MS, DECAY) - 400e6).abs() < 1.0);
        let faded = e.decayed(4_000 * MS, DECAY);
        assert!(faded < 25e6, "{faded}");
    }
}
