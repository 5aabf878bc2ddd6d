//! Limits across replicas (`gateway.global-rate-limit`): the same limits as the local ones,
//! also asked of one rate-limit service, so that they hold for all replicas together.
//!
//! Every limit drawn before the instance is picked (global, per service, model, client, API
//! key; request limits and token budgets) is sent as one descriptor per bucket, with its
//! numbers as the descriptor's `limit` override: the service needs no rules of its own, and the
//! gateway's configuration stays the one place limits are written. Per-instance limits stay
//! per replica: they are drawn after the pick, and a second round trip per request would cost
//! more than sharing them is worth. The local buckets are still drawn first: they refuse
//! cheaply what one replica alone would refuse, and they are the floor when the service cannot
//! be reached (fail-open).

use super::bucket::Verdict;
use super::rls::Status;
use super::rls::{Answer, Descriptor, RlsUnit, Settlement};
use super::{Limit, Limits, Refusal, Subject, Unit};
use crate::config::reader::error;
use crate::config::{Algorithm, ConfigError};

/// A limit's numbers as the protocol carries them: `per_unit` per `unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shared {
    pub per_unit: u32,
    pub unit: RlsUnit,
}

/// How the protocol says a limit, or why it cannot: the protocol carries one amount per
/// second, minute, hour or day, refilled over that period (a token bucket of that size).
pub fn shared_numbers(limit: &Limit) -> Result<Shared, String> {
    let p = &limit.params;
    let (amount, period_secs) = match p.algorithm {
        Algorithm::WarmUp => {
            return Err(
                "warm-up cannot be shared across replicas (its ramp is per replica); \
                 use token-bucket, or leave gateway.global-rate-limit out"
                    .to_string(),
            )
        }
        // At most rate × window in any window: a bucket of that size refilled over the window.
        Algorithm::SlidingWindow => (p.limit(), p.window_ns / 1_000_000_000),
        // `capacity` at once, refilled `rate` per `period_secs`.
        Algorithm::TokenBucket | Algorithm::LeakyBucket => {
            let unit = RlsUnit::ALL.into_iter().find(|u| {
                u128::from(p.capacity) * u128::from(p.period_secs)
                    == u128::from(p.rate) * u128::from(u.seconds())
            });
            match unit {
                Some(unit) => (p.capacity, unit.seconds()),
                None => {
                    return Err(format!(
                        "capacity {} refilled {} per {} s cannot be said as one amount per \
                         second, minute, hour or day, which is what the rate-limit protocol \
                         carries across replicas; make capacity = rate × 1, 60, 3600 or 86400",
                        p.capacity, p.rate, p.period_secs
                    ))
                }
            }
        }
    };
    let unit = RlsUnit::ALL
        .into_iter()
        .find(|u| u.seconds() == period_secs)
        .ok_or_else(|| {
            format!(
                "a window of {period_secs} s cannot be shared across replicas: the rate-limit \
                 protocol carries one amount per second, minute, hour or day"
            )
        })?;
    let per_unit = u32::try_from(amount)
        .map_err(|_| format!("{amount} is more than the rate-limit protocol carries (2^32 - 1)"))?;
    Ok(Shared { per_unit, unit })
}

impl Limits {
    /// Marks every limit drawn before the pick as shared; a limit the protocol cannot carry is
    /// refused with its key and the reason.
    pub fn share_across_replicas(&mut self) -> Result<(), ConfigError> {
        let mut shared = Vec::with_capacity(self.list.len());
        for limit in &self.list {
            if limit.after_pick() {
                shared.push(None);
                continue;
            }
            let numbers = shared_numbers(limit).map_err(|why| {
                error(
                    &limit.block,
                    format!("with gateway.global-rate-limit: {why}"),
                )
            })?;
            shared.push(Some(numbers));
        }
        self.shared = shared;
        Ok(())
    }

    /// Whether any limit is shared across replicas.
    pub fn any_shared(&self) -> bool {
        self.shared.iter().any(Option::is_some)
    }

    /// The descriptors of the shared buckets a request draws from (limit index, descriptor):
    /// one request from request limits, `tokens` from token budgets.
    pub fn shared_descriptors(
        &self,
        subject: &Subject<'_>,
        tokens: u64,
    ) -> Vec<(usize, Descriptor)> {
        let mut out = Vec::new();
        for (index, limit) in self.list.iter().enumerate() {
            let Some(Some(shared)) = self.shared.get(index) else {
                continue;
            };
            if limit.after_pick() || !limit.covers(subject) {
                continue;
            }
            let Some(label) = limit.label(subject) else {
                continue;
            };
            let hits = match limit.unit {
                Unit::Requests => 1,
                Unit::Tokens => tokens,
            };
            out.push((
                index,
                Descriptor {
                    limit_name: limit.name.clone(),
                    bucket: label,
                    per_unit: shared.per_unit,
                    unit: shared.unit,
                    hits,
                },
            ));
        }
        out
    }
}

/// What the service's answer means for the request.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Admitted; the tightest shared verdict per unit (for the `x-ratelimit-*` headers).
    Admitted {
        tightest: Option<(usize, Verdict)>,
        tightest_tokens: Option<(usize, Verdict)>,
    },
    Refused(Refusal),
}

/// Reads the answer against the descriptors sent (statuses come in the same order).
pub fn decide(limits: &Limits, sent: &[(usize, Descriptor)], answer: &Answer) -> Decision {
    let mut tightest = None;
    let mut tightest_tokens = None;
    for (at, (index, descriptor)) in sent.iter().enumerate() {
        // A service that says only the overall code tells nothing per bucket.
        let Some(status) = answer.statuses.get(at) else {
            continue;
        };
        let verdict = verdict(status);
        if status.over_limit {
            return Decision::Refused(Refusal {
                limit: *index,
                label: descriptor.bucket.clone(),
                verdict,
            });
        }
        let slot = match limits.list.get(*index).map(|l| l.unit) {
            Some(Unit::Tokens) => &mut tightest_tokens,
            _ => &mut tightest,
        };
        if slot.is_none_or(|(_, v): (usize, Verdict)| verdict.remaining < v.remaining) {
            *slot = Some((*index, verdict));
        }
    }
    // OVER_LIMIT overall with no status saying which: the first descriptor's limit refused.
    if answer.over_limit {
        if let Some((index, descriptor)) = sent.first() {
            return Decision::Refused(Refusal {
                limit: *index,
                label: descriptor.bucket.clone(),
                verdict: verdict(&Default::default()),
            });
        }
    }
    Decision::Admitted {
        tightest,
        tightest_tokens,
    }
}

/// The settlements of a request's shared token budgets, now that it used `used` tokens.
pub fn settlements(limits: &Limits, sent: &[(usize, Descriptor)], used: u64) -> Vec<Settlement> {
    sent.iter()
        .filter(|(index, _)| {
            limits
                .list
                .get(*index)
                .is_some_and(|l| l.unit == Unit::Tokens)
        })
        .filter_map(|(_, descriptor)| {
            let delta = i64::try_from(used).unwrap_or(i64::MAX)
                - i64::try_from(descriptor.hits).unwrap_or(i64::MAX);
            (delta != 0).then(|| Settlement {
                descriptor: descriptor.clone(),
                delta,
            })
        })
        .collect()
}

/// A status as the local verdicts say it: remaining, and when to come back (over the limit)
/// or when the bucket is full again (admitted).
fn verdict(status: &Status) -> Verdict {
    Verdict {
        admitted: !status.over_limit,
        remaining: u64::from(status.remaining),
        retry_after_ns: if status.over_limit {
            status.reset_ns
        } else {
            0
        },
        reset_ns: status.reset_ns,
    }
}

/// Settlements a VM holds at most while the service cannot take them (beyond, they are
/// dropped and counted: a budget then errs by what they would have settled).
pub const MAX_PENDING_SETTLEMENTS: usize = 4096;

/// What one VM's requests leave for its root context to tell the rate-limit service (their
/// token settlements, sent in batches), and whether the service is failing: an outage is
/// logged when it starts and when it ends, not once per request.
#[derive(Debug, Default)]
pub struct ServiceLink {
    settlements: Vec<Settlement>,
    failing: bool,
    /// Settlements dropped since the last drain (the queue was full).
    pub dropped: u64,
}

/// A change of the service's state worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Failed,
    Recovered,
}

impl ServiceLink {
    pub fn settle(&mut self, settlements: Vec<Settlement>) {
        let room = MAX_PENDING_SETTLEMENTS.saturating_sub(self.settlements.len());
        if settlements.len() > room {
            self.dropped = self
                .dropped
                .saturating_add((settlements.len() - room) as u64);
        }
        self.settlements.extend(settlements.into_iter().take(room));
    }

    /// Up to `max` settlements to send now, oldest first.
    pub fn take(&mut self, max: usize) -> Vec<Settlement> {
        let n = self.settlements.len().min(max);
        self.settlements.drain(..n).collect()
    }

    /// Puts back settlements a failed call did not deliver (ahead of newer ones).
    pub fn put_back(&mut self, mut settlements: Vec<Settlement>) {
        settlements.append(&mut self.settlements);
        settlements.truncate(MAX_PENDING_SETTLEMENTS);
        self.settlements = settlements;
    }

    pub fn pending(&self) -> usize {
        self.settlements.len()
    }

    /// Notes how a call to the service went; says when that changes its state.
    pub fn outcome(&mut self, reached: bool) -> Option<Transition> {
        let was_failing = std::mem::replace(&mut self.failing, !reached);
        match (was_failing, reached) {
            (false, false) => Some(Transition::Failed),
            (true, true) => Some(Transition::Recovered),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plan;
    use serde_json::{json, Value};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn shared(limits: Value) -> Result<Plan, String> {
        let mut config = json!({
            "services": {"chat": {"instances": [
                {"name": "m", "base-url": "http://a:1", "rate-limit":
                    {"enabled": true, "capacity": 3, "rate": 1}}
            ]}},
            "gateway": {"global-rate-limit": {"address": "rls:8081"}}
        });
        if let (Some(c), Some(l)) = (config.as_object_mut(), limits.as_object()) {
            c.extend(l.clone());
        }
        Plan::from_value(&config).map_err(|e| e.to_string())
    }

    #[test]
    fn each_limit_is_said_as_one_amount_per_unit() {
        let plan = shared(json!({
            "rate-limit": {"enabled": true, "capacity": 600, "rate": 10, "client-ip-enable": true},
            "token-limit": {"enabled": true, "tokens-per-minute": 90000}
        }))
        .unwrap();
        let numbers: Vec<_> = plan.limits.shared.to_vec();
        // The token budget, then the request limit's per-client twin and itself (600 at once,
        // 10 a second: 600 a minute); the instance's own limit stays per replica.
        let minute = |n| {
            Some(Shared {
                per_unit: n,
                unit: RlsUnit::Minute,
            })
        };
        assert_eq!(numbers, vec![minute(90000), minute(600), minute(600), None]);
        let subject = Subject {
            service: crate::endpoint::ServiceType::Chat,
            model: "m",
            client: Some("10.0.0.7"),
            instance: None,
            api_key: None,
        };
        let sent = plan.limits.shared_descriptors(&subject, 250);
        let described: Vec<_> = sent
            .iter()
            .map(|(_, d)| (d.limit_name.as_str(), d.bucket.as_str(), d.hits))
            .collect();
        assert_eq!(
            described,
            vec![
                ("model.token-limit", "chat/m", 250),
                ("model.rate-limit (per client)", "10.0.0.7", 1),
                ("model.rate-limit", "chat", 1),
            ]
        );
    }

    #[test]
    fn a_limit_the_protocol_cannot_carry_is_refused_with_its_key() {
        let err = shared(json!({"rate-limit": {"enabled": true, "capacity": 10, "rate": 3}}))
            .unwrap_err();
        assert!(
            err.contains("model.rate-limit") && err.contains("capacity = rate"),
            "{err}"
        );
        let err = shared(
            json!({"rate-limit": {"enabled": true, "algorithm": "warm-up",
            "capacity": 10, "rate": 10}}),
        )
        .unwrap_err();
        assert!(err.contains("warm-up cannot be shared"), "{err}");
        let err = shared(
            json!({"rate-limit": {"enabled": true, "algorithm": "sliding-window",
            "rate": 2, "window": 7}}),
        )
        .unwrap_err();
        assert!(err.contains("window of 7 s"), "{err}");
        // A one-minute window goes as rate × 60 per minute.
        let plan = shared(
            json!({"rate-limit": {"enabled": true, "algorithm": "sliding-window",
            "rate": 2, "window": 60}}),
        )
        .unwrap();
        assert_eq!(
            plan.limits.shared.first().copied().flatten(),
            Some(Shared {
                per_unit: 120,
                unit: RlsUnit::Minute
            })
        );
        // Without global-rate-limit the same limits are fine locally.
        let mut config = json!({"services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}},
            "rate-limit": {"enabled": true, "capacity": 10, "rate": 3}});
        config["rate-limit"]["algorithm"] = json!("warm-up");
        assert!(Plan::from_value(&config).is_ok());
    }

    #[test]
    fn the_first_status_over_the_limit_refuses_and_the_tightest_admitted_one_is_told() {
        let plan = shared(json!({
            "rate-limit": {"enabled": true, "capacity": 60, "rate": 1},
            "token-limit": {"enabled": true, "tokens-per-minute": 1000}
        }))
        .unwrap();
        let subject = Subject {
            service: crate::endpoint::ServiceType::Chat,
            model: "m",
            client: None,
            instance: None,
            api_key: None,
        };
        let sent = plan.limits.shared_descriptors(&subject, 10);
        assert_eq!(sent.len(), 2);
        let status = |over_limit, remaining| Status {
            over_limit,
            remaining,
            reset_ns: 5_000_000_000,
        };
        let answer = Answer {
            over_limit: false,
            statuses: vec![status(false, 990), status(false, 7)],
        };
        match decide(&plan.limits, &sent, &answer) {
            Decision::Admitted {
                tightest,
                tightest_tokens,
            } => {
                assert_eq!(tightest.map(|(_, v)| v.remaining), Some(7));
                assert_eq!(tightest_tokens.map(|(_, v)| v.remaining), Some(990));
            }
            other => panic!("{other:?}"),
        }
        let answer = Answer {
            over_limit: true,
            statuses: vec![status(false, 990), status(true, 0)],
        };
        match decide(&plan.limits, &sent, &answer) {
            Decision::Refused(refusal) => {
                assert_eq!(plan.limits.list[refusal.limit].name, "model.rate-limit");
                assert_eq!(refusal.verdict.retry_after_ns, 5_000_000_000);
            }
            other => panic!("{other:?}"),
        }
        // OVER_LIMIT without statuses (a terse service): the first descriptor's limit.
        let answer = Answer {
            over_limit: true,
            statuses: vec![],
        };
        assert!(matches!(
            decide(&plan.limits, &sent, &answer),
            Decision::Refused(_)
        ));
        // Settlements: only the token budget's, by what was used beyond the reservation.
        let due = settlements(&plan.limits, &sent, 4);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].delta, -6);
        assert!(settlements(&plan.limits, &sent, 10).is_empty());
    }

    #[test]
    fn the_link_bounds_its_queue_and_tells_each_outage_once() {
        let mut link = ServiceLink::default();
        let one = |delta| Settlement {
            descriptor: Descriptor {
                limit_name: "l".into(),
                bucket: "b".into(),
                per_unit: 1,
                unit: RlsUnit::Second,
                hits: 0,
            },
            delta,
        };
        link.settle((0..MAX_PENDING_SETTLEMENTS as i64 + 5).map(one).collect());
        assert_eq!(link.pending(), MAX_PENDING_SETTLEMENTS);
        assert_eq!(link.dropped, 5);
        let batch = link.take(3);
        assert_eq!(
            batch.iter().map(|s| s.delta).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        link.put_back(batch);
        assert_eq!(link.take(1)[0].delta, 0, "put back ahead of the rest");
        assert_eq!(link.outcome(true), None);
        assert_eq!(link.outcome(false), Some(Transition::Failed));
        assert_eq!(link.outcome(false), None);
        assert_eq!(link.outcome(true), Some(Transition::Recovered));
        assert_eq!(link.outcome(true), None);
    }
}
