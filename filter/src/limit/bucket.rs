//! The rate-limit algorithms as pure state transitions over the bytes kept in shared data:
//! `admit` reads a bucket's state and the time and says whether one more request fits, and what
//! to write back. The caller writes with compare-and-swap, so concurrent workers never admit
//! more than the bucket holds.

use crate::bytes::u64_le;
use crate::config::{Algorithm, RateLimitPolicy};

/// Tokens are counted in millionths, so slow refill rates lose nothing to rounding. Signed: a
/// token budget settled above its reservation runs into debt that the refill pays back.
const MICRO: i128 = 1_000_000;
const NS_PER_SEC: i128 = 1_000_000_000;

/// A policy's numbers, in the units the algorithms use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub algorithm: Algorithm,
    pub capacity: u64,
    /// Refill per `period_secs`.
    pub rate: u64,
    /// 1 for `rate-limit` (per second); 60 for token budgets (`tokens-per-minute`); a minute or
    /// a day for API-key quotas.
    pub period_secs: u64,
    pub window_ns: u64,
    pub warm_up_ns: u64,
    pub cold_factor: u64,
}

impl Params {
    pub fn of(policy: &RateLimitPolicy) -> Params {
        Params {
            algorithm: policy.algorithm,
            capacity: policy.capacity,
            rate: policy.rate,
            period_secs: 1,
            window_ns: policy.window_secs.saturating_mul(1_000_000_000),
            warm_up_ns: policy.warm_up_secs.saturating_mul(1_000_000_000),
            cold_factor: policy.cold_factor.max(1),
        }
    }

    /// Requests a full bucket (or an empty window) admits at once: the `x-ratelimit-limit-*` value.
    pub fn limit(&self) -> u64 {
        match self.algorithm {
            Algorithm::SlidingWindow => self.window_slots(),
            _ => self.capacity,
        }
    }

    fn window_slots(&self) -> u64 {
        let secs = self.window_ns / 1_000_000_000;
        self.rate.saturating_mul(secs).max(1)
    }

    /// A token budget: a token bucket of `tokens_per_minute`, refilled evenly over the minute.
    pub fn tokens_per_minute(tokens_per_minute: u64) -> Params {
        Params::per_period(tokens_per_minute, 60)
    }

    /// A quota: a bucket of `amount` (requests or tokens), refilled evenly over the period.
    pub fn per_period(amount: u64, period_secs: u64) -> Params {
        Params {
            algorithm: Algorithm::TokenBucket,
            capacity: amount,
            rate: amount,
            period_secs: period_secs.max(1),
            window_ns: period_secs.max(1).saturating_mul(1_000_000_000),
            warm_up_ns: 0,
            cold_factor: 1,
        }
    }

    fn full_micro(&self) -> i128 {
        i128::from(self.capacity) * MICRO
    }

    /// Refill per second, in tokens.
    fn rate_per_sec(&self) -> f64 {
        self.rate as f64 / self.period_secs.max(1) as f64
    }

    /// The state of a bucket nobody has used yet.
    pub fn initial_state(&self) -> Vec<u8> {
        match self.algorithm {
            Algorithm::SlidingWindow => {
                vec![0; 8 + 8 * usize::try_from(self.window_slots()).unwrap_or(0)]
            }
            Algorithm::WarmUp => Bucket {
                micro_tokens: self.full_micro() / i128::from(self.cold_factor),
                last_ns: 0,
                start_ns: 0,
            }
            .encode(),
            Algorithm::TokenBucket | Algorithm::LeakyBucket => Bucket {
                micro_tokens: self.full_micro(),
                last_ns: 0,
                start_ns: 0,
            }
            .encode(),
        }
    }
}

/// What one admission attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    /// Requests that would still be admitted right now, after this one.
    pub remaining: u64,
    /// When denied: how long until one request fits.
    pub retry_after_ns: u64,
    /// How long until the bucket is back to full (the window empty).
    pub reset_ns: u64,
}

/// Admits one request at `now_ns` if it fits. Returns the state to write (none when nothing
/// changed) and the verdict.
pub fn admit(params: &Params, state: Option<&[u8]>, now_ns: u64) -> (Option<Vec<u8>>, Verdict) {
    admit_cost(params, state, now_ns, 1)
}

/// Admits a request that costs `cost` (tokens of a token budget; 1 for a request limit).
// Out of line, as `settle` and `refund`: each has several callers (draws, releases, refunds,
// the status page), and a copy inlined into each made the .wasm ~3 KB larger.
#[inline(never)]
pub fn admit_cost(
    params: &Params,
    state: Option<&[u8]>,
    now_ns: u64,
    cost: u64,
) -> (Option<Vec<u8>>, Verdict) {
    match params.algorithm {
        Algorithm::SlidingWindow => admit_window(params, state, now_ns),
        _ => admit_bucket(params, state, now_ns, cost),
    }
}

/// Corrects a token budget once the real cost is known: `delta` more tokens taken (or fewer,
/// when negative). The bucket may go into debt, at most one bucket's worth (one huge answer
/// pauses the budget for a period, not for days); it never rises above full.
#[inline(never)]
pub fn settle(params: &Params, state: Option<&[u8]>, now_ns: u64, delta: i64) -> Vec<u8> {
    let mut bucket = Bucket::decode(params, state).refilled(params, now_ns);
    bucket.micro_tokens = (bucket.micro_tokens - i128::from(delta) * MICRO)
        .clamp(-params.full_micro(), params.full_micro());
    bucket.encode()
}

/// Gives back one admission made at `admitted_ns` (another limit of the same request refused).
#[inline(never)]
pub fn refund(params: &Params, state: Option<&[u8]>, admitted_ns: u64, cost: u64) -> Vec<u8> {
    match params.algorithm {
        Algorithm::SlidingWindow => {
            let mut window = Window::decode(params, state);
            if let Some(slot) = window.stamps.iter_mut().rev().find(|t| **t == admitted_ns) {
                *slot = 0;
            }
            window.encode()
        }
        _ => {
            let mut bucket = Bucket::decode(params, state);
            bucket.micro_tokens =
                (bucket.micro_tokens + i128::from(cost) * MICRO).min(params.full_micro());
            bucket.encode()
        }
    }
}

/// Whether the bucket is as if unused (full again, or the window empty): a per-client slot in
/// this state may be handed to another client.
pub fn is_idle(params: &Params, state: Option<&[u8]>, now_ns: u64) -> bool {
    match params.algorithm {
        Algorithm::SlidingWindow => {
            let window = Window::decode(params, state);
            window
                .stamps
                .iter()
                .all(|t| window.expired(params, *t, now_ns))
        }
        _ => {
            let bucket = Bucket::decode(params, state).refilled(params, now_ns);
            bucket.micro_tokens >= params.full_micro() || bucket.last_ns == 0
        }
    }
}

/// A token bucket's state (also the leaky bucket's, read as `capacity - level`, and warm-up's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    micro_tokens: i128,
    /// When the tokens were last brought up to date; 0 before the first request.
    last_ns: u64,
    /// warm-up: the first request, where the ramp starts.
    start_ns: u64,
}

impl Bucket {
    fn decode(params: &Params, state: Option<&[u8]>) -> Bucket {
        let word = |at: usize| u64_le(state?, at);
        match (word(0), word(8), word(16)) {
            (Some(tokens), Some(last_ns), Some(start_ns)) => Bucket {
                // Stored as the bits of an i64.
                micro_tokens: i128::from(tokens as i64),
                last_ns,
                start_ns,
            },
            // Missing or foreign state: a fresh bucket.
            _ => Bucket::decode(params, Some(&params.initial_state())),
        }
    }

    fn encode(self) -> Vec<u8> {
        let tokens = self
            .micro_tokens
            .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        [
            tokens.to_le_bytes(),
            self.last_ns.to_le_bytes(),
            self.start_ns.to_le_bytes(),
        ]
        .concat()
    }

    /// The tokens at `now_ns`: refilled since `last_ns`, never above capacity.
    fn refilled(mut self, params: &Params, now_ns: u64) -> Bucket {
        if self.last_ns == 0 {
            // The first request starts the clock (and the warm-up ramp).
            self.last_ns = now_ns;
            self.start_ns = now_ns;
            return self;
        }
        if now_ns <= self.last_ns {
            return self;
        }
        let added = match params.algorithm {
            Algorithm::WarmUp => warm_up_refill(params, self.start_ns, self.last_ns, now_ns),
            _ => {
                i128::from(now_ns - self.last_ns) * i128::from(params.rate) * MICRO
                    / NS_PER_SEC
                    / i128::from(params.period_secs.max(1))
            }
        };
        self.micro_tokens = (self.micro_tokens + added).min(params.full_micro());
        self.last_ns = now_ns;
        self
    }

    /// Nanoseconds until the tokens reach `target` (micro-tokens) at the current refill rate.
    fn time_to(self, params: &Params, target: i128) -> u64 {
        let missing = target.saturating_sub(self.micro_tokens);
        if missing <= 0 {
            return 0;
        }
        let rate = match params.algorithm {
            // During the ramp the rate only grows: the current rate gives an upper bound.
            Algorithm::WarmUp => warm_up_rate(params, self.start_ns, self.last_ns),
            _ => params.rate_per_sec(),
        };
        let secs = (missing as f64 / MICRO as f64) / rate.max(1e-9);
        (secs * 1e9).ceil().min(u64::MAX as f64) as u64
    }
}

/// warm-up's refill rate (tokens per second) at `at_ns`: linear from cold to full over the period.
fn warm_up_rate(params: &Params, start_ns: u64, at_ns: u64) -> f64 {
    let full = params.rate as f64;
    let cold = full / params.cold_factor as f64;
    let progress =
        (at_ns.saturating_sub(start_ns) as f64 / params.warm_up_ns.max(1) as f64).min(1.0);
    cold + (full - cold) * progress
}

/// Tokens (micro) a warm-up bucket gains between `from` and `to`: the integral of its rate.
fn warm_up_refill(params: &Params, start_ns: u64, from_ns: u64, to_ns: u64) -> i128 {
    let ramp_end = start_ns.saturating_add(params.warm_up_ns);
    let mut tokens = 0.0;
    // The ramp part: a trapezoid.
    if from_ns < ramp_end {
        let end = to_ns.min(ramp_end);
        let secs = (end - from_ns) as f64 / 1e9;
        tokens += secs
            * (warm_up_rate(params, start_ns, from_ns) + warm_up_rate(params, start_ns, end))
            / 2.0;
    }
    // After the ramp: the full rate.
    let flat_from = from_ns.max(ramp_end);
    if to_ns > flat_from {
        tokens += (to_ns - flat_from) as f64 / 1e9 * params.rate as f64;
    }
    (tokens * MICRO as f64) as i128
}

fn admit_bucket(
    params: &Params,
    state: Option<&[u8]>,
    now_ns: u64,
    cost: u64,
) -> (Option<Vec<u8>>, Verdict) {
    let mut bucket = Bucket::decode(params, state).refilled(params, now_ns);
    // A cost above the whole budget is admitted from a full bucket, or it could never pass.
    let cost = (i128::from(cost) * MICRO).min(params.full_micro());
    let admitted = bucket.micro_tokens >= cost;
    if admitted {
        bucket.micro_tokens -= cost;
    }
    let verdict = Verdict {
        admitted,
        remaining: u64::try_from(bucket.micro_tokens.max(0) / MICRO).unwrap_or(u64::MAX),
        retry_after_ns: if admitted {
            0
        } else {
            bucket.time_to(params, cost)
        },
        reset_ns: bucket.time_to(params, params.full_micro()),
    };
    // A refused request changes nothing worth a write: the refill is recomputed next time.
    (admitted.then(|| bucket.encode()), verdict)
}

/// A sliding window: the times of the last `rate x window` admissions in a ring; one more fits
/// when the oldest of them has left the window.
struct Window {
    head: usize,
    stamps: Vec<u64>,
}

impl Window {
    fn decode(params: &Params, state: Option<&[u8]>) -> Window {
        let slots = usize::try_from(params.window_slots()).unwrap_or(0);
        let stamps: Vec<u64> = state
            .unwrap_or_default()
            .get(8..)
            .unwrap_or_default()
            .chunks_exact(8)
            .filter_map(|c| u64_le(c, 0))
            .collect();
        if stamps.len() != slots {
            return Window {
                head: 0,
                stamps: vec![0; slots],
            };
        }
        let head = state
            .and_then(|s| u64_le(s, 0))
            .and_then(|h| usize::try_from(h).ok())
            .filter(|h| *h < slots)
            .unwrap_or(0);
        Window { head, stamps }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 * self.stamps.len());
        out.extend_from_slice(&(self.head as u64).to_le_bytes());
        for stamp in &self.stamps {
            out.extend_from_slice(&stamp.to_le_bytes());
        }
        out
    }

    fn expired(&self, params: &Params, stamp: u64, now_ns: u64) -> bool {
        stamp == 0 || stamp.saturating_add(params.window_ns) <= now_ns
    }
}

fn admit_window(params: &Params, state: Option<&[u8]>, now_ns: u64) -> (Option<Vec<u8>>, Verdict) {
    let mut window = Window::decode(params, state);
    let oldest = window.stamps.get(window.head).copied().unwrap_or(0);
    let admitted = window.expired(params, oldest, now_ns);
    if admitted {
        if let Some(slot) = window.stamps.get_mut(window.head) {
            *slot = now_ns.max(1);
        }
        window.head = (window.head + 1) % window.stamps.len().max(1);
    }
    let free = window
        .stamps
        .iter()
        .filter(|t| window.expired(params, **t, now_ns))
        .count();
    let leaves = |t: u64| t.saturating_add(params.window_ns).saturating_sub(now_ns);
    let next_oldest = window.stamps.get(window.head).copied().unwrap_or(0);
    let newest = window.stamps.iter().copied().max().unwrap_or(0);
    let verdict = Verdict {
        admitted,
        remaining: free as u64,
        retry_after_ns: if admitted { 0 } else { leaves(next_oldest) },
        reset_ns: if newest == 0 { 0 } else { leaves(newest) },
    };
    (admitted.then(|| window.encode()), verdict)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_000 * SEC;

    fn params(algorithm: Algorithm, capacity: u64, rate: u64) -> Params {
        Params {
            algorithm,
            capacity,
            rate,
            period_secs: 1,
            window_ns: SEC,
            warm_up_ns: 10 * SEC,
            cold_factor: 3,
        }
    }

    /// Offers one request every `step_ns` from `from` to `to`; counts the admitted ones.
    fn run(p: &Params, state: &mut Vec<u8>, from: u64, to: u64, step_ns: u64) -> u64 {
        let mut admitted = 0;
        let mut t = from;
        while t < to {
            let (written, verdict) = admit(p, Some(state), t);
            if let Some(w) = written {
                *state = w;
            }
            admitted += u64::from(verdict.admitted);
            t += step_ns;
        }
        admitted
    }

    #[test]
    fn token_bucket_admits_its_capacity_then_its_rate() {
        let p = params(Algorithm::TokenBucket, 100, 10);
        let mut state = p.initial_state();
        // A burst at one instant: exactly the capacity.
        assert_eq!(run(&p, &mut state, T0, T0 + 1, 1), 1);
        assert_eq!(run(&p, &mut state, T0 + 1, T0 + 1000, 1), 99);
        let (_, refused) = admit(&p, Some(&state), T0 + 1000);
        assert!(!refused.admitted);
        assert_eq!(refused.remaining, 0);
        // One token every 100 ms: Retry-After says so.
        assert!(refused.retry_after_ns <= SEC / 10 && refused.retry_after_ns > SEC / 10 - 1000);
        assert!((10 * SEC - SEC / 100..=10 * SEC).contains(&refused.reset_ns));
        // Then the rate: 10 per second over 5 s of hammering.
        let steady = run(
            &p,
            &mut state,
            T0 + SEC / 1000,
            T0 + 5 * SEC + SEC / 1000,
            SEC / 1000,
        );
        assert!((49..=51).contains(&steady), "{steady}");
    }

    #[test]
    fn leaky_bucket_meters_like_a_token_bucket() {
        let p = params(Algorithm::LeakyBucket, 5, 2);
        let mut state = p.initial_state();
        assert_eq!(run(&p, &mut state, T0, T0 + 10, 1), 5);
        // 2 per second: tokens at 0.5 s, 1 s, ... 2.5 s.
        assert_eq!(run(&p, &mut state, T0 + 10, T0 + 3 * SEC, SEC / 100), 5);
    }

    #[test]
    fn sliding_window_never_exceeds_its_count_in_any_window() {
        let mut p = params(Algorithm::SlidingWindow, 0, 5);
        p.window_ns = 2 * SEC; // 10 requests in any 2 s
        let mut state = p.initial_state();
        let mut admitted_at = Vec::new();
        let mut t = T0;
        while t < T0 + 10 * SEC {
            let (written, v) = admit(&p, Some(&state), t);
            if let Some(w) = written {
                state = w;
            }
            if v.admitted {
                admitted_at.push(t);
            }
            t += SEC / 50;
        }
        for (i, start) in admitted_at.iter().enumerate() {
            let in_window = admitted_at[i..]
                .iter()
                .take_while(|t| **t < start + 2 * SEC)
                .count();
            assert!(in_window <= 10, "{in_window} in the window from {start}");
        }
        // Bursts of 10 every 2 s: 5 windows in 10 s.
        assert_eq!(admitted_at.len(), 50);
        let (_, refused) = admit(&p, Some(&state), admitted_at[49] + 1);
        assert!(!refused.admitted);
        assert!(refused.retry_after_ns > 0 && refused.retry_after_ns <= 2 * SEC);
    }

    #[test]
    fn warm_up_starts_cold_and_ramps_to_full_rate() {
        let p = params(Algorithm::WarmUp, 30, 30); // cold: 10/s and 10 tokens; full 30/s after 10 s
        let mut state = p.initial_state();
        let step = SEC / 1000;
        let first = run(&p, &mut state, T0, T0 + SEC, step);
        // 10 to start with, and a rate ramping from 10/s: about 21 in the first second.
        assert!((19..=23).contains(&first), "{first}");
        let ramp = run(&p, &mut state, T0 + SEC, T0 + 10 * SEC, step);
        // The integral of the ramp from 12/s to 30/s over 9 s is 189.
        assert!((186..=192).contains(&ramp), "{ramp}");
        let full = run(&p, &mut state, T0 + 10 * SEC, T0 + 15 * SEC, step);
        assert!((149..=151).contains(&full), "{full}");
    }

    #[test]
    fn refunds_give_back_exactly_one() {
        for algorithm in [
            Algorithm::TokenBucket,
            Algorithm::SlidingWindow,
            Algorithm::WarmUp,
        ] {
            let p = params(algorithm, 6, 3);
            let mut state = p.initial_state();
            let (w, v) = admit(&p, Some(&state), T0);
            assert!(v.admitted);
            state = w.unwrap();
            let before = admit(&p, Some(&state), T0).1.remaining;
            state = refund(&p, Some(&state), T0, 1);
            let after = admit(&p, Some(&state), T0).1.remaining;
            assert_eq!(after, before + 1, "{algorithm:?}");
        }
    }

    #[test]
    fn idle_buckets_can_be_reused() {
        let p = params(Algorithm::TokenBucket, 2, 1);
        let mut state = p.initial_state();
        assert!(is_idle(&p, Some(&state), T0));
        state = admit(&p, Some(&state), T0).0.unwrap();
        assert!(!is_idle(&p, Some(&state), T0 + SEC / 2));
        assert!(is_idle(&p, Some(&state), T0 + 2 * SEC));
        let w = params(Algorithm::SlidingWindow, 0, 2);
        let mut state = w.initial_state();
        state = admit(&w, Some(&state), T0).0.unwrap();
        assert!(!is_idle(&w, Some(&state), T0 + SEC / 2));
        assert!(is_idle(&w, Some(&state), T0 + SEC));
    }

    #[test]
    fn foreign_state_is_a_fresh_bucket() {
        let p = params(Algorithm::TokenBucket, 2, 1);
        let (_, v) = admit(&p, Some(b"junk"), T0);
        assert!(v.admitted && v.remaining == 1);
        let w = params(Algorithm::SlidingWindow, 0, 2);
        let (_, v) = admit(&w, Some(b"junk"), T0);
        assert!(v.admitted && v.remaining == 1);
    }

    #[test]
    fn token_budgets_reserve_then_settle_into_debt_or_back() {
        let p = Params::tokens_per_minute(600); // 10 tokens a second
        let mut state = p.initial_state();
        let (w, v) = admit_cost(&p, Some(&state), T0, 250);
        assert!(v.admitted && v.remaining == 350);
        state = w.unwrap();
        let (w, v) = admit_cost(&p, Some(&state), T0, 300);
        assert!(v.admitted && v.remaining == 50);
        state = w.unwrap();
        let (_, refused) = admit_cost(&p, Some(&state), T0, 100);
        assert!(!refused.admitted);
        // 50 missing at 10 a second: 5 s.
        assert_eq!(refused.retry_after_ns, 5 * SEC);
        // The first request really used 400: the budget goes 100 into debt.
        state = settle(&p, Some(&state), T0, 150);
        let (_, v) = admit_cost(&p, Some(&state), T0 + 10 * SEC, 1);
        assert!(!v.admitted, "{v:?}"); // -100 + 100 refilled: nothing yet
        let (_, v) = admit_cost(&p, Some(&state), T0 + 11 * SEC, 1);
        assert!(v.admitted && v.remaining == 9, "{v:?}");
        // Settling below the reservation gives tokens back, never above full.
        state = settle(&p, Some(&state), T0, -10_000);
        assert_eq!(admit_cost(&p, Some(&state), T0, 1).1.remaining, 599);
        // A cost above the whole budget passes from a full bucket.
        assert!(
            admit_cost(&p, Some(&p.initial_state()), T0, 5000)
                .1
                .admitted
        );
    }

    /// A backend reporting a believable but huge usage puts the budget at most one period into
    /// debt: 600 a minute, 9,000,000 used, and a minute later (twice the refill) it admits again.
    #[test]
    fn debt_is_at_most_one_bucket() {
        let p = Params::tokens_per_minute(600);
        let (w, _) = admit_cost(&p, Some(&p.initial_state()), T0, 10);
        let state = settle(&p, w.as_deref(), T0, 9_000_000);
        let (_, v) = admit_cost(&p, Some(&state), T0 + 60 * SEC, 1);
        assert!(!v.admitted, "{v:?}");
        let (_, v) = admit_cost(&p, Some(&state), T0 + 121 * SEC, 1);
        assert!(v.admitted, "{v:?}");
    }
}
