//! Choosing an instance of a model: weighted round-robin over one rotation shared by every
//! Envoy worker, or weighted random.

use crate::config::{ModelPool, Strategy};
use crate::store::{fetch_increment, SharedStore};

/// Rotations longer than this are scaled down; they only need to keep the weights' proportions.
const MAX_ROTATION: u64 = 4096;

/// The smooth weighted round-robin order (nginx's): weights 5:1:1 give a a b a c a a, so a heavy
/// instance's turns are spread out instead of coming in a burst. Entries are positions into
/// `weights`. Weights are reduced by their common divisor, so 100:200:300 rotates over 6 slots.
pub fn smooth_sequence(weights: &[u64]) -> Vec<u16> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut reduced: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
    let mut total: u64 = reduced.iter().sum();
    if total > MAX_ROTATION {
        for w in reduced.iter_mut() {
            *w = (w.saturating_mul(MAX_ROTATION) / total).max(1);
        }
        total = reduced.iter().sum();
    }
    let mut current = vec![0i128; reduced.len()];
    let mut order = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best: Option<usize> = None;
        let mut best_value = i128::MIN;
        for (at, (c, w)) in current.iter_mut().zip(&reduced).enumerate() {
            *c += i128::from(*w);
            if *c > best_value {
                best_value = *c;
                best = Some(at);
            }
        }
        if let Some(at) = best {
            if let Some(c) = current.get_mut(at) {
                *c -= i128::from(total);
            }
            order.push(u16::try_from(at).unwrap_or(u16::MAX));
        }
    }
    order
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Picks one of the pool's routable instances; returns its index in the service's instance list,
/// or `None` when the model has no routable instance. `random` is a fresh random number.
///
/// Strategies other than random fall back to round-robin until they are implemented.
pub fn pick_instance(
    pool: &ModelPool,
    strategy: Strategy,
    store: &dyn SharedStore,
    random: u64,
) -> Option<usize> {
    if pool.routable.is_empty() {
        return None;
    }
    let position = match strategy {
        Strategy::Random => weighted_random(&pool.cumulative, random),
        _ => {
            // A store failure must not fail the request: a random pick keeps the weights.
            match fetch_increment(store, &pool.counter_key) {
                Some(ticket) => rotation_slot(&pool.rotation, ticket),
                None => weighted_random(&pool.cumulative, random),
            }
        }
    };
    pool.routable.get(position?).copied()
}

fn rotation_slot(rotation: &[u16], ticket: u64) -> Option<usize> {
    let len = u64::try_from(rotation.len()).ok().filter(|l| *l > 0)?;
    let at = usize::try_from(ticket % len).ok()?;
    rotation.get(at).map(|p| usize::from(*p))
}

/// Position of the first cumulative weight above `random % total`.
fn weighted_random(cumulative: &[u64], random: u64) -> Option<usize> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let r = random % total;
    Some(cumulative.partition_point(|c| *c <= r))
}

/// A small, fast generator (xorshift64*) for weighted random picks; not for secrets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use crate::store::MemoryStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn pool(weights: &[u64]) -> ModelPool {
        let mut cumulative = Vec::new();
        let mut sum = 0;
        for w in weights {
            sum += w;
            cumulative.push(sum);
        }
        ModelPool {
            model: "m".into(),
            routable: (0..weights.len()).collect(),
            rotation: smooth_sequence(weights),
            cumulative,
            counter_key: "rr".into(),
        }
    }

    #[test]
    fn smooth_order_interleaves() {
        assert_eq!(smooth_sequence(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_sequence(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(smooth_sequence(&[100, 200, 300]).len(), 6);
        assert!(smooth_sequence(&[]).is_empty());
    }

    #[test]
    fn huge_weights_are_scaled_not_exploded() {
        let order = smooth_sequence(&[1_000_000, 1, 500_000]);
        assert!(order.len() as u64 <= MAX_ROTATION + 3);
        assert!(order.contains(&1), "a light instance still gets a turn");
    }

    #[test]
    fn round_robin_respects_weights_exactly() {
        let store = MemoryStore::default();
        let p = pool(&[1, 2, 3]);
        let mut counts = [0; 3];
        for _ in 0..600 {
            counts[pick_instance(&p, Strategy::RoundRobin, &store, 0).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 200, 300]);
    }

    #[test]
    fn weighted_random_is_close() {
        let store = MemoryStore::default();
        let p = pool(&[1, 2, 3]);
        let mut rng = Rng::new(42);
        let mut counts = [0u32; 3];
        for _ in 0..6000 {
            counts[pick_instance(&p, Strategy::Random, &store, rng.next_u64()).unwrap()] += 1;
        }
        for (c, expected) in counts.iter().zip([1000, 2000, 3000]) {
            assert!((*c as i32 - expected).abs() < 250, "{counts:?}");
        }
    }

    #[test]
    fn empty_pool_picks_nothing() {
        let store = MemoryStore::default();
        let p = pool(&[]);
        assert_eq!(pick_instance(&p, Strategy::RoundRobin, &store, 1), None);
        assert_eq!(pick_instance(&p, Strategy::Random, &store, 1), None);
    }
}
