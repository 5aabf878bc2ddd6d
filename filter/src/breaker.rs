//! Circuit breakers, one per instance, kept in shared data so every Envoy worker of a process
//! sees the same state. The same value carries the instance's health as the process's health
//! checker last saw it, so admission reads one key for both.
//!
//! closed → open after `failure-threshold` consecutive failures → half-open once `timeout` has
//! passed → closed after `success-threshold` successes, or open again on one failure. Half-open
//! lets at most `success-threshold` trial requests be in flight at once, never a flood.
//! A closed breaker costs a request one shared-data read at admission, and nothing when the
//! request succeeds on a breaker that had no failures.

use crate::bytes::{u32_le, u64_le};
use crate::config::CircuitBreakerPolicy;
use crate::store::{transact, SharedStore};

/// What a breaker needs from the configuration (the most specific `circuit-breaker` block:
/// instance, else service, else global; unset keys come from the enclosing block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    pub failure_threshold: u32,
    pub timeout_ns: u64,
    pub success_threshold: u32,
}

impl BreakerPolicy {
    /// What the breaker of an instance runs on, when its block enables one.
    pub fn compile(block: &CircuitBreakerPolicy) -> Option<BreakerPolicy> {
        block.enabled.then(|| BreakerPolicy {
            failure_threshold: u32::try_from(block.failure_threshold).unwrap_or(u32::MAX),
            timeout_ns: block.timeout_ms.saturating_mul(1_000_000),
            success_threshold: u32::try_from(block.success_threshold).unwrap_or(u32::MAX),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The value of `jairouter_circuit_breaker_state` (the original's: 0 closed, 1 open,
    /// 2 half-open).
    pub fn gauge(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

/// One instance's breaker as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    pub state: State,
    /// Consecutive failures while closed.
    pub failures: u32,
    /// Successes while half-open.
    pub successes: u32,
    /// Trial requests in flight while half-open.
    pub trials: u32,
    /// When it last opened (host clock, ns).
    pub opened_at_ns: u64,
    /// Marked down by the health checker (unknown is healthy).
    pub unhealthy: bool,
    /// Out of rotation until then: it answered 429 with Retry-After (host clock, ns).
    pub cooldown_until_ns: u64,
}

const ENCODED_LEN: usize = 30;

impl Breaker {
    pub const CLOSED: Breaker = Breaker {
        state: State::Closed,
        failures: 0,
        successes: 0,
        trials: 0,
        opened_at_ns: 0,
        unhealthy: false,
        cooldown_until_ns: 0,
    };

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.push(match self.state {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        });
        out.extend(self.failures.to_le_bytes());
        out.extend(self.successes.to_le_bytes());
        out.extend(self.trials.to_le_bytes());
        out.extend(self.opened_at_ns.to_le_bytes());
        out.push(u8::from(self.unhealthy));
        out.extend(self.cooldown_until_ns.to_le_bytes());
        out
    }

    /// A missing or unreadable value is a closed breaker: when in doubt, serve.
    pub fn decode(bytes: Option<&[u8]>) -> Breaker {
        let Some(bytes) = bytes.filter(|b| b.len() == ENCODED_LEN) else {
            return Breaker::CLOSED;
        };
        let u32_at = |at: usize| u32_le(bytes, at).unwrap_or(0);
        let u64_at = |at: usize| u64_le(bytes, at).unwrap_or(0);
        let state = match bytes.first() {
            Some(1) => State::Open,
            Some(2) => State::HalfOpen,
            _ => State::Closed,
        };
        Breaker {
            state,
            failures: u32_at(1),
            successes: u32_at(5),
            trials: u32_at(9),
            opened_at_ns: u64_at(13),
            unhealthy: bytes.get(21) == Some(&1),
            cooldown_until_ns: u64_at(22),
        }
    }

    /// Whether a request may go to the instance now, and the state it leaves (an open breaker
    /// whose timeout passed turns half-open and admits a trial).
    pub fn admit(self, policy: Option<&BreakerPolicy>, now_ns: u64) -> (Breaker, Admission) {
        if self.unhealthy {
            return (self, Admission::Unhealthy);
        }
        if now_ns < self.cooldown_until_ns {
            return (
                self,
                Admission::CoolingDown {
                    until_ns: self.cooldown_until_ns,
                },
            );
        }
        let Some(policy) = policy else {
            return (self, Admission::Closed { clean: true });
        };
        match self.state {
            State::Closed => (
                self,
                Admission::Closed {
                    clean: self.failures == 0,
                },
            ),
            State::Open if now_ns.saturating_sub(self.opened_at_ns) >= policy.timeout_ns => {
                let next = Breaker {
                    state: State::HalfOpen,
                    failures: 0,
                    successes: 0,
                    trials: 1,
                    ..self
                };
                (next, Admission::Trial)
            }
            State::Open => (self, Admission::Refused),
            State::HalfOpen if self.trials < policy.success_threshold => {
                let next = Breaker {
                    trials: self.trials.saturating_add(1),
                    ..self
                };
                (next, Admission::Trial)
            }
            State::HalfOpen => (self, Admission::Refused),
        }
    }

    /// The state after a request admitted as `admission` ended with `outcome`.
    pub fn record(
        self,
        policy: &BreakerPolicy,
        admission: Admission,
        outcome: Outcome,
        now_ns: u64,
    ) -> Breaker {
        let trial = admission == Admission::Trial;
        match (self.state, outcome) {
            (State::Closed, Outcome::Success) => Breaker {
                failures: 0,
                ..self
            },
            (State::Closed, Outcome::Failure) => {
                let failures = self.failures.saturating_add(1);
                if failures >= policy.failure_threshold {
                    Breaker {
                        state: State::Open,
                        failures,
                        successes: 0,
                        trials: 0,
                        opened_at_ns: now_ns,
                        ..self
                    }
                } else {
                    Breaker { failures, ..self }
                }
            }
            (State::HalfOpen, Outcome::Failure) => Breaker {
                state: State::Open,
                successes: 0,
                trials: 0,
                opened_at_ns: now_ns,
                ..self
            },
            (State::HalfOpen, Outcome::Success) if trial => {
                let successes = self.successes.saturating_add(1);
                if successes >= policy.success_threshold {
                    Breaker {
                        unhealthy: self.unhealthy,
                        cooldown_until_ns: self.cooldown_until_ns,
                        ..Breaker::CLOSED
                    }
                } else {
                    Breaker {
                        successes,
                        trials: self.trials.saturating_sub(1),
                        ..self
                    }
                }
            }
            (State::HalfOpen, Outcome::Neutral) if trial => Breaker {
                trials: self.trials.saturating_sub(1),
                ..self
            },
            // A request admitted before the breaker opened (or before it turned half-open)
            // says nothing about the trials; an open breaker waits out its timeout.
            _ => self,
        }
    }
}

/// How a request was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed; `clean` when it had no failures (a success then needs no write).
    Closed { clean: bool },
    /// One of half-open's bounded trial requests.
    Trial,
    /// The breaker is open (or half-open with its trials all out).
    Refused,
    /// The health checker has marked the instance down.
    Unhealthy,
    /// It asked for a pause (429 with Retry-After) that lasts until then.
    CoolingDown { until_ns: u64 },
}

/// How the exchange with the instance ended, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// 5xx, connect failure, reset, timeout, or a response stream broken midway.
    Failure,
    /// The client's doing (4xx, the client went away): neither success nor failure.
    Neutral,
}

/// Admits a request to the instance whose state lives at `key`: its health, and its breaker
/// when it has one.
pub fn admit(
    store: &dyn SharedStore,
    key: &str,
    policy: Option<&BreakerPolicy>,
    now_ns: u64,
) -> Admission {
    let decision = transact(store, key, |value| {
        let before = Breaker::decode(value);
        let (after, admission) = before.admit(policy, now_ns);
        ((after != before).then(|| after.encode()), admission)
    });
    // A host that refuses shared data must not take every instance out of rotation.
    decision.unwrap_or(Admission::Closed { clean: true })
}

/// Whether counting `outcome` for a request admitted as `admission` can change the breaker: a
/// success or a neutral end after a clean admission cannot, so it needs no shared-data access
/// at all (a failure another worker counted meanwhile is reset by the next unclean success).
pub fn record_changes(admission: Admission, outcome: Outcome) -> bool {
    admission != (Admission::Closed { clean: true }) || outcome == Outcome::Failure
}

/// Counts the end of a request admitted as `admission`; returns the state change, if any.
pub fn record(
    store: &dyn SharedStore,
    key: &str,
    policy: &BreakerPolicy,
    admission: Admission,
    outcome: Outcome,
    now_ns: u64,
) -> Option<(State, State)> {
    if !record_changes(admission, outcome) {
        return None;
    }
    transact(store, key, |value| {
        let before = Breaker::decode(value);
        let after = before.record(policy, admission, outcome, now_ns);
        let change = (after.state != before.state).then_some((before.state, after.state));
        ((after != before).then(|| after.encode()), change)
    })
    .flatten()
}

/// The health checker's verdict: marks the instance down or up (one writer per process, the
/// checker; the breaker's fields are left as they are).
pub fn set_unhealthy(store: &dyn SharedStore, key: &str, unhealthy: bool) -> bool {
    transact(store, key, |value| {
        let before = Breaker::decode(value);
        let after = Breaker {
            unhealthy,
            ..before
        };
        ((after != before).then(|| after.encode()), ())
    })
    .is_some()
}

/// Takes the instance out of rotation until `until_ns`: it answered 429 with Retry-After.
pub fn cool_down(store: &dyn SharedStore, key: &str, until_ns: u64) {
    transact(store, key, |value| {
        let before = Breaker::decode(value);
        let after = Breaker {
            cooldown_until_ns: before.cooldown_until_ns.max(until_ns),
            ..before
        };
        ((after != before).then(|| after.encode()), ())
    });
}

/// Whether the instance is marked down.
pub fn is_unhealthy(store: &dyn SharedStore, key: &str) -> bool {
    Breaker::decode(store.get(key).0.as_deref()).unhealthy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const SECOND: u64 = 1_000_000_000;
    const POLICY: BreakerPolicy = BreakerPolicy {
        failure_threshold: 5,
        timeout_ns: SECOND,
        success_threshold: 2,
    };
    const KEY: &str = "jairouter/breaker/a";

    fn state(store: &MemoryStore, key: &str) -> State {
        Breaker::decode(store.get(key).0.as_deref()).state
    }

    fn fail(store: &MemoryStore, now: u64) -> Option<(State, State)> {
        let admission = admit(store, KEY, Some(&POLICY), now);
        assert_ne!(admission, Admission::Refused);
        record(store, KEY, &POLICY, admission, Outcome::Failure, now)
    }

    fn succeed(store: &MemoryStore, now: u64) -> Option<(State, State)> {
        let admission = admit(store, KEY, Some(&POLICY), now);
        assert_ne!(admission, Admission::Refused);
        record(store, KEY, &POLICY, admission, Outcome::Success, now)
    }

    fn open(store: &MemoryStore) {
        for _ in 0..5 {
            fail(store, 0);
        }
        assert_eq!(state(store, KEY), State::Open);
    }

    #[test]
    fn threshold_minus_one_failures_stay_closed_and_the_threshold_opens() {
        let store = MemoryStore::default();
        for _ in 0..4 {
            assert_eq!(fail(&store, 0), None);
        }
        assert_eq!(state(&store, KEY), State::Closed);
        assert_ne!(admit(&store, KEY, Some(&POLICY), 0), Admission::Refused);
        assert_eq!(fail(&store, 0), Some((State::Closed, State::Open)));
        assert_eq!(
            admit(&store, KEY, Some(&POLICY), SECOND / 2),
            Admission::Refused
        );
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let store = MemoryStore::default();
        for _ in 0..4 {
            fail(&store, 0);
        }
        succeed(&store, 0);
        for _ in 0..4 {
            fail(&store, 0);
        }
        assert_eq!(state(&store, KEY), State::Closed);
    }

    #[test]
    fn the_timeout_half_opens_and_successes_close() {
        let store = MemoryStore::default();
        open(&store);
        assert_eq!(
            admit(&store, KEY, Some(&POLICY), SECOND - 1),
            Admission::Refused
        );
        let first = admit(&store, KEY, Some(&POLICY), SECOND);
        assert_eq!(first, Admission::Trial);
        assert_eq!(state(&store, KEY), State::HalfOpen);
        assert_eq!(
            record(&store, KEY, &POLICY, first, Outcome::Success, SECOND),
            None
        );
        assert_eq!(state(&store, KEY), State::HalfOpen);
        assert_eq!(
            succeed(&store, SECOND),
            Some((State::HalfOpen, State::Closed))
        );
        assert_eq!(
            Breaker::decode(store.get(KEY).0.as_deref()),
            Breaker::CLOSED
        );
    }

    #[test]
    fn one_failure_in_half_open_reopens_for_another_timeout() {
        let store = MemoryStore::default();
        open(&store);
        assert_eq!(
            fail(&store, 2 * SECOND),
            Some((State::HalfOpen, State::Open))
        );
        assert_eq!(
            admit(&store, KEY, Some(&POLICY), 2 * SECOND + SECOND / 2),
            Admission::Refused
        );
        assert_eq!(
            admit(&store, KEY, Some(&POLICY), 3 * SECOND),
            Admission::Trial
        );
    }

    #[test]
    fn half_open_admits_a_bounded_number_of_trials() {
        let store = MemoryStore::default();
        open(&store);
        let now = 5 * SECOND;
        let trials: Vec<_> = (0..10)
            .map(|_| admit(&store, KEY, Some(&POLICY), now))
            .collect();
        assert_eq!(trials.iter().filter(|a| **a == Admission::Trial).count(), 2);
        // A trial that ends neither well nor badly frees its place.
        record(
            &store,
            KEY,
            &POLICY,
            Admission::Trial,
            Outcome::Neutral,
            now,
        );
        assert_eq!(admit(&store, KEY, Some(&POLICY), now), Admission::Trial);
        assert_eq!(admit(&store, KEY, Some(&POLICY), now), Admission::Refused);
    }

    #[test]
    fn failures_while_open_keep_it_open_without_extending_it() {
        let store = MemoryStore::default();
        open(&store);
        // Requests admitted before it opened end later, failing.
        let before_open = Admission::Closed { clean: false };
        record(
            &store,
            KEY,
            &POLICY,
            before_open,
            Outcome::Failure,
            SECOND / 2,
        );
        assert_eq!(state(&store, KEY), State::Open);
        assert_eq!(admit(&store, KEY, Some(&POLICY), SECOND), Admission::Trial);
    }

    #[test]
    fn successes_while_closed_keep_it_closed_and_write_nothing() {
        let store = MemoryStore::default();
        for _ in 0..100 {
            assert_eq!(succeed(&store, 0), None);
        }
        assert!(store.is_empty(), "a clean closed breaker is never written");
        assert_eq!(state(&store, KEY), State::Closed);
    }

    #[test]
    fn counts_start_over_after_recovery() {
        let store = MemoryStore::default();
        open(&store);
        succeed(&store, SECOND);
        succeed(&store, SECOND);
        assert_eq!(state(&store, KEY), State::Closed);
        fail(&store, SECOND);
        assert_eq!(Breaker::decode(store.get(KEY).0.as_deref()).failures, 1);
    }

    #[test]
    fn client_errors_never_trip_it() {
        let store = MemoryStore::default();
        for _ in 0..50 {
            let admission = admit(&store, KEY, Some(&POLICY), 0);
            record(&store, KEY, &POLICY, admission, Outcome::Neutral, 0);
        }
        assert_eq!(state(&store, KEY), State::Closed);
    }

    #[test]
    fn unreadable_state_reads_as_closed() {
        for bytes in [&b""[..], b"\x01", &[7u8; 30], &[1u8; 40]] {
            let breaker = Breaker::decode(Some(bytes));
            assert!(breaker.state == State::Closed || bytes.len() == ENCODED_LEN);
        }
        let b = Breaker {
            state: State::HalfOpen,
            failures: 3,
            successes: 1,
            trials: 2,
            opened_at_ns: 1234,
            unhealthy: true,
            cooldown_until_ns: 99,
        };
        assert_eq!(Breaker::decode(Some(&b.encode())), b);
    }

    #[test]
    fn an_unhealthy_instance_is_refused_and_keeps_its_breaker() {
        let store = MemoryStore::default();
        for _ in 0..2 {
            fail(&store, 0);
        }
        assert!(set_unhealthy(&store, KEY, true));
        assert!(is_unhealthy(&store, KEY));
        assert_eq!(admit(&store, KEY, Some(&POLICY), 0), Admission::Unhealthy);
        assert_eq!(admit(&store, KEY, None, 0), Admission::Unhealthy);
        set_unhealthy(&store, KEY, false);
        assert_eq!(
            admit(&store, KEY, None, 0),
            Admission::Closed { clean: true }
        );
        assert_eq!(Breaker::decode(store.get(KEY).0.as_deref()).failures, 2);
    }

    #[test]
    fn a_cooldown_keeps_the_instance_out_until_it_ends() {
        let store = MemoryStore::default();
        cool_down(&store, KEY, 5 * SECOND);
        cool_down(&store, KEY, 2 * SECOND);
        assert_eq!(
            admit(&store, KEY, Some(&POLICY), SECOND),
            Admission::CoolingDown {
                until_ns: 5 * SECOND
            },
            "a shorter pause never cuts a longer one"
        );
        assert_eq!(
            admit(&store, KEY, None, 5 * SECOND),
            Admission::Closed { clean: true }
        );
    }
}
