//! Active health checks: which instance to check when, and what a run of results means. One
//! checker runs per Envoy process (a singleton service beside the HTTP filter, sharing its VM
//! id); it writes its verdicts into each instance's state in shared data, where every worker's
//! admission reads them (`breaker::admit`). Unknown is healthy.

use crate::breaker;
use crate::config::HealthCheckPolicy;
use crate::plan::Plan;
use crate::shared_keys::{CONFIG_KEY, CONFIG_VERSION_KEY};
use crate::status::config_version;
use crate::store::SharedStore;
use std::collections::HashMap;

/// One instance to check.
#[derive(Debug, Clone)]
pub struct Target {
    /// The Envoy cluster that reaches the instance.
    pub cluster: String,
    /// `Host` for the check: the instance's own name, as requests get it.
    pub authority: String,
    /// The check's path, below the instance's base-url path.
    pub path: String,
    /// The instance's configured headers (its credentials, for a backend that wants them).
    pub headers: Vec<(String, String)>,
    pub state_key: String,
    pub instance_id: String,
    pub policy: HealthCheckPolicy,
}

#[derive(Debug, Clone, Default)]
struct Progress {
    next_due_ns: u64,
    in_flight: bool,
    good: u64,
    bad: u64,
    down: bool,
}

#[derive(Debug, Default)]
pub struct Checker {
    targets: Vec<Target>,
    progress: Vec<Progress>,
}

/// What a check's result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    MarkedDown,
    MarkedUp,
}

impl Checker {
    pub fn new(config: &Plan) -> Checker {
        let targets: Vec<Target> = config
            .instances()
            .filter_map(|instance| {
                let policy = instance.spec.health_check.clone()?;
                Some(Target {
                    cluster: instance.spec.cluster.clone(),
                    authority: instance.spec.base_url.host.clone(),
                    path: format!("{}{}", instance.spec.base_url.prefix, policy.path),
                    headers: instance.spec.headers.clone(),
                    state_key: instance.state_key.clone(),
                    instance_id: instance.spec.id.clone(),
                    policy,
                })
            })
            .collect();
        let progress = vec![Progress::default(); targets.len()];
        Checker { targets, progress }
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// How often the host should wake the checker: often enough for the shortest interval.
    pub fn tick_ms(&self) -> u64 {
        self.targets
            .iter()
            .map(|t| t.policy.interval_ms / 2)
            .min()
            .unwrap_or(1000)
            .clamp(50, 1000)
    }

    /// The targets to check now (each is then in flight until its result comes back).
    pub fn due(&mut self, now_ns: u64) -> Vec<usize> {
        let mut due = Vec::new();
        for (at, (target, progress)) in self.targets.iter().zip(&mut self.progress).enumerate() {
            if !progress.in_flight && now_ns >= progress.next_due_ns {
                progress.in_flight = true;
                progress.next_due_ns = now_ns.saturating_add(target.policy.interval_ms * 1_000_000);
                due.push(at);
            }
        }
        due
    }

    /// Counts a result: the instance's status, or `None` when no answer came (a refused
    /// connection, a timeout). A check that could not even be sent counts as bad too.
    pub fn result(&mut self, at: usize, status: Option<u32>) -> Option<Verdict> {
        let target = self.targets.get(at)?;
        let progress = self.progress.get_mut(at)?;
        progress.in_flight = false;
        let good = status.is_some_and(|s| s < 500);
        if good {
            progress.good = progress.good.saturating_add(1);
            progress.bad = 0;
            if progress.down && progress.good >= target.policy.healthy_threshold {
                progress.down = false;
                return Some(Verdict::MarkedUp);
            }
        } else {
            progress.bad = progress.bad.saturating_add(1);
            progress.good = 0;
            if !progress.down && progress.bad >= target.policy.unhealthy_threshold {
                progress.down = true;
                return Some(Verdict::MarkedDown);
            }
        }
        None
    }
}

/// The process's health checker as it runs: it checks what the routing filter last published
/// (`CONFIG_KEY`), so it follows every reload, and knows which answer belongs to which target.
#[derive(Default)]
pub struct HealthRun {
    checker: Option<Checker>,
    /// The version of the published configuration the checker was built from.
    config_version: Option<Vec<u8>>,
    /// Checks on their way, by the host's call token.
    pending: HashMap<u32, usize>,
}

impl HealthRun {
    /// Rebuilds the checker when the routing filter has published another configuration (one
    /// small read a tick otherwise); returns how often to tick (ms) when it rebuilt.
    pub fn follow(&mut self, store: &dyn SharedStore) -> Option<u64> {
        let (version, _) = store.get(CONFIG_VERSION_KEY);
        if version.is_none() || version == self.config_version {
            return None;
        }
        self.config_version = version;
        let (Some(bytes), _) = store.get(CONFIG_KEY) else {
            return None;
        };
        let config = match Plan::from_json(&bytes) {
            Ok(config) => config,
            Err(e) => {
                log::error!("health checks: published configuration unreadable: {e}");
                return None;
            }
        };
        let checker = Checker::new(&config);
        if self.checker.is_none() {
            // A (re)started checker knows nothing yet, and unknown is healthy. A checker
            // rebuilt by a reload keeps what it knew: unchanged instances keep their state keys.
            for target in checker.targets() {
                breaker::set_unhealthy(store, &target.state_key, false);
            }
        }
        log::info!(
            "health checks: {} instances (configuration {})",
            checker.targets().len(),
            config_version(&bytes)
        );
        let tick_ms = checker.tick_ms();
        self.checker = Some(checker);
        // Answers still on their way belong to the old target list.
        self.pending.clear();
        Some(tick_ms)
    }

    /// The checks due now, by target index (each is in flight until `answered` or `not_sent`).
    pub fn due(&mut self, now_ns: u64) -> Vec<usize> {
        self.checker
            .as_mut()
            .map(|c| c.due(now_ns))
            .unwrap_or_default()
    }

    pub fn target(&self, at: usize) -> Option<&Target> {
        self.checker.as_ref()?.targets().get(at)
    }

    /// The host took the check of target `at` and will answer under `token`.
    pub fn sent(&mut self, token: u32, at: usize) {
        self.pending.insert(token, at);
    }

    /// The answer to the check sent under `token`: its status, or `None` when Envoy gave up
    /// (timeout, reset, no connection).
    pub fn answered(&mut self, token: u32, status: Option<u32>, store: &dyn SharedStore) {
        if let Some(at) = self.pending.remove(&token) {
            self.record(at, status, store);
        }
    }

    /// The host refused to send the check: it counts as failed.
    pub fn not_sent(&mut self, at: usize, store: &dyn SharedStore) {
        self.record(at, None, store);
    }

    /// Counts a check's result and writes a change of verdict where every worker reads it.
    fn record(&mut self, at: usize, status: Option<u32>, store: &dyn SharedStore) {
        let Some(checker) = self.checker.as_mut() else {
            return;
        };
        let verdict = checker.result(at, status);
        let Some(target) = checker.targets().get(at) else {
            return;
        };
        match verdict {
            Some(Verdict::MarkedDown) => {
                log::warn!(
                    "instance {} marked down by health checks (last: {})",
                    target.instance_id,
                    status.map_or("no answer".to_string(), |s| format!("status {s}"))
                );
                breaker::set_unhealthy(store, &target.state_key, true);
            }
            Some(Verdict::MarkedUp) => {
                log::warn!("instance {} healthy again", target.instance_id);
                breaker::set_unhealthy(store, &target.state_key, false);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn checker() -> Checker {
        let cfg = Plan::from_value(&json!({
            "health-check": {"interval": 1000, "unhealthy-threshold": 2, "healthy-threshold": 2},
            "services": {"chat": {"instances": [
                {"name": "a", "base-url": "http://a:1/ollama", "headers": {"authorization": "Bearer k"}},
                {"name": "b", "base-url": "http://b:1", "health-check": {"enabled": false}},
                {"name": "c", "base-url": "http://c:1", "health-check": {"interval": 200, "path": "/health"}}
            ]}}
        }))
        .unwrap();
        Checker::new(&cfg)
    }

    #[test]
    fn targets_are_the_checked_instances_with_their_paths() {
        let c = checker();
        let paths: Vec<_> = c.targets().iter().map(|t| t.path.as_str()).collect();
        assert_eq!(paths, ["/ollama/v1/models", "/health"]);
        assert_eq!(c.targets()[0].authority, "a");
        assert_eq!(c.targets()[0].headers.len(), 1);
        assert_eq!(c.tick_ms(), 100);
    }

    #[test]
    fn checks_fall_due_by_interval_and_never_overlap() {
        let mut c = checker();
        assert_eq!(c.due(0), vec![0, 1]);
        assert_eq!(
            c.due(10_000_000_000),
            Vec::<usize>::new(),
            "both still in flight"
        );
        c.result(1, Some(200));
        assert_eq!(c.due(100_000_000), Vec::<usize>::new());
        assert_eq!(c.due(200_000_000), vec![1]);
        c.result(0, Some(200));
        assert_eq!(c.due(999_999_999), Vec::<usize>::new());
        assert_eq!(c.due(1_000_000_000), vec![0]);
    }

    #[test]
    fn thresholds_take_an_instance_down_and_bring_it_back() {
        let mut c = checker();
        assert_eq!(c.result(0, Some(503)), None);
        assert_eq!(
            c.result(0, Some(200)),
            None,
            "a good check resets the bad run"
        );
        assert_eq!(c.result(0, None), None);
        assert_eq!(c.result(0, Some(500)), Some(Verdict::MarkedDown));
        assert_eq!(c.result(0, None), None, "already down");
        assert_eq!(
            c.result(0, Some(404)),
            None,
            "any answer below 500 is up; one is not enough"
        );
        assert_eq!(c.result(0, Some(200)), Some(Verdict::MarkedUp));
        assert_eq!(c.result(0, Some(200)), None);
        assert_eq!(c.result(9, Some(200)), None);
    }
}
