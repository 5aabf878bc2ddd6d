//! Choosing an instance of a model. Every strategy works over the model's routable instances
//! (active, weight above zero). The load-aware ones read shared data, so all Envoy workers of a
//! process see one set of in-flight counts and latency estimates; round-robin rotates in each
//! worker (`Rotations`), exact per worker, without a shared counter to move on every request.

pub mod load;
pub mod ring;

use crate::bytes::{hash64, FastMap};
use crate::config::{LoadBalance, Strategy};
use crate::endpoint::ServiceType;
use crate::store::SharedStore;
use load::{in_flight, latency};
use ring::HashRing;
use std::cell::RefCell;

/// The instances that serve one model name within a service, compiled for picking: everything
/// a pick reads is here, so it needs nothing else of the plan.
#[derive(Debug)]
pub struct Pool {
    pub model: String,
    /// Indices into the service's instances of the routable ones (status active, weight > 0).
    pub routable: Vec<usize>,
    /// Smooth weighted round-robin order over `routable` (positions into it).
    pub rotation: Vec<u16>,
    /// Cumulative weights over `routable`, for weighted random.
    pub cumulative: Vec<u64>,
    /// Names this pool's rotation in each worker's `Rotations` (the service and the model, so a
    /// reload that keeps the model keeps the rotation going).
    rotation_id: u64,
    /// The consistent-hash ring over `routable` (hash strategies only; empty otherwise).
    pub ring: HashRing,
    strategy: Strategy,
    latency_decay_ns: u64,
    /// Per routable instance, what least-connections and least-latency read.
    loads: Vec<Load>,
}

#[derive(Debug)]
struct Load {
    weight: u64,
    in_flight_key: String,
    latency_key: String,
}

/// One instance of the model, as the pool is compiled from it.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// Its index in the service's instances.
    pub index: usize,
    pub id: &'a str,
    pub weight: u64,
    pub active: bool,
    pub in_flight_key: &'a str,
    pub latency_key: &'a str,
}

impl Pool {
    /// The pool of `model` over `members` (every instance serving it, in order), balanced by
    /// the service's `load-balance` block.
    pub fn compile(
        kind: ServiceType,
        model: &str,
        load_balance: &LoadBalance,
        members: &[Member<'_>],
    ) -> Pool {
        let routable: Vec<&Member<'_>> = members
            .iter()
            .filter(|m| m.active && m.weight > 0)
            .collect();
        let weights: Vec<u64> = routable.iter().map(|m| m.weight).collect();
        let mut cumulative = Vec::with_capacity(weights.len());
        let mut sum = 0u64;
        for w in &weights {
            sum = sum.saturating_add(*w);
            cumulative.push(sum);
        }
        let ring = if load_balance.strategy.hashes() {
            let points: Vec<(&str, u64)> = routable.iter().map(|m| (m.id, m.weight)).collect();
            HashRing::build(&points, load_balance.virtual_nodes)
        } else {
            HashRing::default()
        };
        Pool {
            model: model.to_string(),
            rotation: smooth_sequence(&weights),
            cumulative,
            rotation_id: hash64(format!("{}/{model}", kind.key()).as_bytes()),
            ring,
            strategy: load_balance.strategy,
            latency_decay_ns: load_balance.latency_decay_ms.saturating_mul(1_000_000),
            loads: routable
                .iter()
                .map(|m| Load {
                    weight: m.weight,
                    in_flight_key: m.in_flight_key.to_string(),
                    latency_key: m.latency_key.to_string(),
                })
                .collect(),
            routable: routable.iter().map(|m| m.index).collect(),
        }
    }
}

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

/// What a pick may depend on besides the configuration and the shared data.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickInput<'a> {
    /// A fresh random number.
    pub random: u64,
    /// The host clock, nanoseconds.
    pub now_ns: u64,
    /// Envoy's view of the client address (no port): ip-hash and consistent-hash key.
    pub client: Option<&'a str>,
    /// header-hash key: the configured header's or body field's value.
    pub hash_key: Option<&'a str>,
}

/// Pools larger than this are sampled (two weighted random candidates, the better one wins)
/// instead of reading every instance's shared state on each request.
const MAX_COMPARED: usize = 8;

/// least-latency treats any estimate below this as this.
const MIN_LATENCY_NS: f64 = 1_000_000.0;

/// Where each round-robin rotation stands in one VM (one Envoy worker), by pool.
///
/// Each worker goes through the smooth order on its own, so the weights are exact per worker:
/// over any run of one worker's requests an instance gets its share to within one rotation.
/// Across workers the shares add up, each off by less than its weight per worker. A shared
/// counter would make them exact across the process too, for a shared-data read and
/// compare-and-swap on every request (Envoy's own round-robin is per worker as well).
#[derive(Debug, Default)]
pub struct Rotations(FastMap<u64, u64>);

impl Rotations {
    /// The next ticket of a rotation. A worker's first ticket is random, so that the workers
    /// of a process do not all start with the same instance.
    fn next_ticket(&mut self, rotation_id: u64, random: u64) -> u64 {
        let next = self.0.entry(rotation_id).or_insert(random);
        let ticket = *next;
        *next = ticket.wrapping_add(1);
        ticket
    }
}

/// Picks one of the pool's routable instances; returns its index in the service's instances,
/// or `None` when the model has no routable instance.
///
/// A hash strategy without its key (no client address, no session header) and a failing shared
/// store fall back to weighted random: the request is served, the weights are kept.
pub fn pick_instance(
    pool: &Pool,
    store: &dyn SharedStore,
    rotations: &RefCell<Rotations>,
    input: &PickInput<'_>,
) -> Option<usize> {
    if pool.routable.is_empty() {
        return None;
    }
    let random = || weighted_random(&pool.cumulative, input.random);
    let position = match pool.strategy {
        Strategy::Random => random(),
        Strategy::RoundRobin => match rotations.try_borrow_mut() {
            Ok(mut rotations) => {
                let ticket = rotations.next_ticket(pool.rotation_id, input.random);
                rotation_slot(&pool.rotation, ticket)
            }
            Err(_) => random(),
        },
        Strategy::IpHash | Strategy::ConsistentHash => input
            .client
            .and_then(|c| pool.ring.lookup(c))
            .or_else(random),
        Strategy::HeaderHash => input
            .hash_key
            .and_then(|k| pool.ring.lookup(k))
            .or_else(random),
        Strategy::LeastConnections | Strategy::LeastLatency => least_cost(pool, store, input),
    };
    pool.routable.get(position?).copied()
}

/// least-connections: in-flight requests per unit of weight. least-latency: the decayed
/// latency estimate times (in-flight + 1) per unit of weight (peak-EWMA's cost). The lowest
/// cost wins; ties (idle instances, untried ones) go by weighted random.
fn least_cost(pool: &Pool, store: &dyn SharedStore, input: &PickInput<'_>) -> Option<usize> {
    let candidates: Vec<usize> = if pool.routable.len() <= MAX_COMPARED {
        (0..pool.routable.len()).collect()
    } else {
        let first = weighted_random(&pool.cumulative, input.random)?;
        let second = weighted_random(&pool.cumulative, input.random.rotate_left(32) ^ 0x5bd1_e995)?;
        vec![first, second]
    };
    let mut best: Vec<usize> = Vec::new();
    let mut best_cost = f64::INFINITY;
    for position in candidates {
        let Some(load) = pool.loads.get(position) else {
            continue;
        };
        let busy = in_flight(store, &load.in_flight_key) as f64;
        let weight = load.weight.max(1) as f64;
        let cost = match pool.strategy {
            Strategy::LeastLatency => {
                // The floor keeps an untried (or long idle) instance from looking free while
                // requests pile onto it before its first answer.
                let estimate = latency(store, &load.latency_key)
                    .decayed(input.now_ns, pool.latency_decay_ns)
                    .max(MIN_LATENCY_NS);
                estimate * (busy + 1.0) / weight
            }
            _ => busy / weight,
        };
        if cost < best_cost {
            best_cost = cost;
            best.clear();
        }
        if cost <= best_cost {
            best.push(position);
        }
    }
    match best.as_slice() {
        [] => None,
        [only] => Some(*only),
        tied => {
            let mut cumulative = Vec::with_capacity(tied.len());
            let mut sum = 0u64;
            for position in tied {
                let weight = pool.loads.get(*position).map_or(0, |l| l.weight);
                sum = sum.saturating_add(weight);
                cumulative.push(sum);
            }
            tied.get(weighted_random(&cumulative, input.random)?)
                .copied()
        }
    }
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
    use super::load::{begin_request, record_latency};
    use super::*;
    use crate::endpoint::ServiceType;
    use crate::plan::Plan;
    use crate::store::MemoryStore;
    use serde_json::{json, Value};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MS: u64 = 1_000_000;

    /// One chat model "m" over instances a, b, c, ... with these weights.
    fn config(load_balance: Value, weights: &[u64]) -> Plan {
        let instances: Vec<Value> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let id = char::from(b'a' + i as u8).to_string();
                json!({"name": "m", "base-url": format!("http://{id}:1"), "weight": w, "instance-id": id})
            })
            .collect();
        Plan::from_value(&json!({
            "load-balance": load_balance,
            "services": {"chat": {"instances": instances}}
        }))
        .unwrap()
    }

    fn pick(cfg: &Plan, store: &MemoryStore, input: PickInput<'_>) -> Option<usize> {
        pick_in(cfg, store, &RefCell::default(), input)
    }

    /// A pick by the worker whose rotations these are.
    fn pick_in(
        cfg: &Plan,
        store: &MemoryStore,
        worker: &RefCell<Rotations>,
        input: PickInput<'_>,
    ) -> Option<usize> {
        let service = cfg.service(ServiceType::Chat).unwrap();
        pick_instance(&service.models["m"], store, worker, &input)
    }

    fn with_random(random: u64) -> PickInput<'static> {
        PickInput {
            random,
            ..PickInput::default()
        }
    }

    fn key(cfg: &Plan, at: usize) -> (String, String) {
        let i = &cfg.service(ServiceType::Chat).unwrap().instances[at];
        (i.in_flight_key.clone(), i.latency_key.clone())
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
        let cfg = config(json!({"type": "round-robin"}), &[1, 2, 3]);
        let store = MemoryStore::default();
        let worker = RefCell::default();
        let mut counts = [0; 3];
        for r in 0..600 {
            counts[pick_in(&cfg, &store, &worker, with_random(r * 7919)).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 200, 300]);
        // In the smooth order, from wherever the worker started.
        let worker = RefCell::default();
        let order: Vec<usize> = (0..14)
            .map(|_| pick_in(&cfg, &store, &worker, with_random(3)).unwrap())
            .collect();
        let cycle = [2, 1, 0, 2, 1, 2];
        let start = cycle.len() - 3;
        let expected: Vec<usize> = cycle.iter().cycle().skip(start).take(14).copied().collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn each_worker_rotates_exactly_and_starts_where_its_random_says() {
        let cfg = config(json!({"type": "round-robin"}), &[1, 2, 3]);
        let store = MemoryStore::default();
        let workers: Vec<RefCell<Rotations>> = (0..2).map(|_| RefCell::default()).collect();
        let mut rng = Rng::new(11);
        let mut per_worker = [[0i64; 3]; 2];
        let mut served = [0i64; 2];
        for _ in 0..601 {
            let w = usize::from(rng.next_u64().is_multiple_of(2));
            let at = pick_in(&cfg, &store, &workers[w], with_random(rng.next_u64())).unwrap();
            per_worker[w][at] += 1;
            served[w] += 1;
        }
        let mut total = [0i64; 3];
        for (w, counts) in per_worker.iter().enumerate() {
            for (at, (count, weight)) in counts.iter().zip([1, 2, 3]).enumerate() {
                // Within one rotation of its share in each worker.
                let share = served[w] * weight;
                assert!((count * 6 - share).abs() < 6 * weight, "{per_worker:?}");
                total[at] += count;
            }
        }
        for (count, weight) in total.iter().zip([1, 2, 3]) {
            assert!(
                (count * 6 - 601 * weight).abs() < 2 * 6 * weight,
                "{total:?}"
            );
        }
        // Two workers whose first randoms differ start at different places of the order.
        let firsts: Vec<usize> = [0, 1]
            .iter()
            .map(|r| pick_in(&cfg, &store, &RefCell::default(), with_random(*r)).unwrap())
            .collect();
        assert_eq!(firsts, [2, 1]);
    }

    #[test]
    fn weighted_random_is_close() {
        let cfg = config(json!({"type": "random"}), &[1, 2, 3]);
        let store = MemoryStore::default();
        let mut rng = Rng::new(42);
        let mut counts = [0i32; 3];
        for _ in 0..6000 {
            counts[pick(&cfg, &store, with_random(rng.next_u64())).unwrap()] += 1;
        }
        for (c, expected) in counts.iter().zip([1000, 2000, 3000]) {
            assert!((c - expected).abs() < 250, "{counts:?}");
        }
    }

    #[test]
    fn a_model_without_routable_instances_picks_nothing() {
        for strategy in [
            "random",
            "round-robin",
            "least-connections",
            "ip-hash",
            "least-latency",
        ] {
            let cfg = config(json!({"type": strategy}), &[0, 0]);
            assert_eq!(
                pick(&cfg, &MemoryStore::default(), with_random(1)),
                None,
                "{strategy}"
            );
        }
    }

    #[test]
    fn least_connections_picks_the_least_busy_per_weight() {
        // The original's case: connection counts 3/1/0 pick the idle one.
        let cfg = config(json!({"type": "least-connections"}), &[1, 1, 1]);
        let store = MemoryStore::default();
        for (at, busy) in [(0, 3), (1, 1)] {
            for _ in 0..busy {
                begin_request(&store, &key(&cfg, at).0);
            }
        }
        for r in 0..20 {
            assert_eq!(pick(&cfg, &store, with_random(r)), Some(2));
        }
        // Per unit of weight: 2 in flight on weight 4 is less busy than 1 on weight 1.
        let cfg = config(json!({"type": "least-connections"}), &[4, 1]);
        let store = MemoryStore::default();
        begin_request(&store, &key(&cfg, 0).0);
        begin_request(&store, &key(&cfg, 0).0);
        begin_request(&store, &key(&cfg, 1).0);
        assert_eq!(pick(&cfg, &store, with_random(3)), Some(0));
    }

    #[test]
    fn idle_instances_share_by_weight() {
        let cfg = config(json!({"type": "least-connections"}), &[1, 3]);
        let store = MemoryStore::default();
        let mut rng = Rng::new(7);
        let heavy = (0..4000)
            .filter(|_| pick(&cfg, &store, with_random(rng.next_u64())) == Some(1))
            .count();
        assert!((2800..=3200).contains(&heavy), "{heavy}");
    }

    #[test]
    fn least_latency_prefers_the_fast_and_retries_the_slow_later() {
        let cfg = config(
            json!({"type": "least-latency", "latency-decay-ms": 1000}),
            &[1, 1],
        );
        let store = MemoryStore::default();
        let decay = 1_000 * MS;
        let now = 10_000 * MS;
        record_latency(&store, &key(&cfg, 0).1, 400 * MS, now, decay);
        record_latency(&store, &key(&cfg, 1).1, 10 * MS, now, decay);
        let at = |t: u64| PickInput {
            random: 5,
            now_ns: t,
            ..PickInput::default()
        };
        assert_eq!(pick(&cfg, &store, at(now)), Some(1));
        // Busy enough, the fast one costs more than the slow one.
        for _ in 0..60 {
            begin_request(&store, &key(&cfg, 1).0);
        }
        assert_eq!(pick(&cfg, &store, at(now)), Some(0));
        // Idle again: while the fast one keeps answering, the slow estimate fades until the slow
        // instance is worth a try.
        let store = MemoryStore::default();
        record_latency(&store, &key(&cfg, 0).1, 400 * MS, now, decay);
        let mut t = now;
        let mut first_retry = None;
        for step in 0..100 {
            t += 100 * MS;
            record_latency(&store, &key(&cfg, 1).1, 10 * MS, t, decay);
            if pick(&cfg, &store, at(t)) == Some(0) {
                first_retry = Some(step);
                break;
            }
        }
        let step = first_retry.expect("the slow instance is retried");
        assert!((20..60).contains(&step), "retried after {step} steps");
    }

    #[test]
    fn an_untried_instance_is_tried_first() {
        let cfg = config(json!({"type": "least-latency"}), &[1, 1]);
        let store = MemoryStore::default();
        record_latency(&store, &key(&cfg, 0).1, 5 * MS, 1_000 * MS, 10_000 * MS);
        let input = PickInput {
            random: 1,
            now_ns: 1_000 * MS,
            ..PickInput::default()
        };
        assert_eq!(pick(&cfg, &store, input), Some(1));
    }

    #[test]
    fn ip_hash_keeps_a_client_on_one_instance() {
        let cfg = config(json!({"type": "ip-hash"}), &[1, 1, 1]);
        let store = MemoryStore::default();
        let mut seen = std::collections::HashSet::new();
        for c in 0..50 {
            let client = format!("10.0.0.{c}");
            let input = |r| PickInput {
                random: r,
                client: Some(&client),
                ..PickInput::default()
            };
            let first = pick(&cfg, &store, input(0));
            for r in 1..10 {
                assert_eq!(pick(&cfg, &store, input(r)), first);
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 3, "clients spread over every instance");
        // No client address: still served.
        assert!(pick(&cfg, &store, with_random(9)).is_some());
    }

    #[test]
    fn header_hash_keeps_a_session_on_one_instance() {
        let cfg = config(
            json!({"type": "header-hash", "hash-header": "X-Session-Id"}),
            &[1, 1, 1],
        );
        let service = cfg.service(ServiceType::Chat).unwrap();
        assert_eq!(
            service.spec.load_balance.hash_header.as_deref(),
            Some("x-session-id")
        );
        let store = MemoryStore::default();
        for s in 0..30 {
            let session = format!("session-{s}");
            let input = |r| PickInput {
                random: r,
                hash_key: Some(&session),
                ..PickInput::default()
            };
            let first = pick(&cfg, &store, input(0));
            assert!((1..10).all(|r| pick(&cfg, &store, input(r)) == first));
        }
    }
}
