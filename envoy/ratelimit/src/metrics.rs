//! Counters for `/metrics` (Prometheus text format 0.0.4).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    ShouldRateLimit,
    Settle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    OverLimit,
    /// Redis unavailable, timed out or erroring; the deadline reached.
    Error,
    /// The request was refused (malformed, beyond the bounds).
    Invalid,
}

const METHODS: [(Method, &str); 2] = [
    (Method::ShouldRateLimit, "should_rate_limit"),
    (Method::Settle, "settle"),
];
const OUTCOMES: [(Outcome, &str); 4] = [
    (Outcome::Ok, "ok"),
    (Outcome::OverLimit, "over_limit"),
    (Outcome::Error, "error"),
    (Outcome::Invalid, "invalid"),
];
/// Upper bounds of the duration histogram, in seconds.
const BUCKETS: [f64; 8] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1];

#[derive(Default)]
struct PerMethod {
    calls: [AtomicU64; 4],
    /// Non-cumulative counts per bucket; the last slot is above the largest bound.
    buckets: [AtomicU64; 9],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    methods: [PerMethod; 2],
    redis_errors: AtomicU64,
}

fn index<T: PartialEq>(table: &[(T, &str)], v: T) -> usize {
    table.iter().position(|(t, _)| *t == v).unwrap_or(0)
}

impl Metrics {
    pub fn call(&self, method: Method, outcome: Outcome, took: Duration) {
        let Some(m) = self.methods.get(index(&METHODS, method)) else {
            return;
        };
        if let Some(c) = m.calls.get(index(&OUTCOMES, outcome)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let secs = took.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        if let Some(b) = m.buckets.get(slot) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        m.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        m.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn redis_error(&self) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, redis_up: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP jairouter_ratelimit_calls_total gRPC calls by method and outcome."
        );
        let _ = writeln!(out, "# TYPE jairouter_ratelimit_calls_total counter");
        for ((_, method), m) in METHODS.iter().zip(&self.methods) {
            for ((_, outcome), c) in OUTCOMES.iter().zip(&m.calls) {
                let _ = writeln!(
                    out,
                    "jairouter_ratelimit_calls_total{{method=\"{method}\",outcome=\"{outcome}\"}} {}",
                    c.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(out, "# HELP jairouter_ratelimit_call_duration_seconds Time to answer a gRPC call, from its request body.");
        let _ = writeln!(
            out,
            "# TYPE jairouter_ratelimit_call_duration_seconds histogram"
        );
        for ((_, method), m) in METHODS.iter().zip(&self.methods) {
            let mut cumulative = 0;
            for (bound, b) in BUCKETS.iter().zip(&m.buckets) {
                cumulative += b.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "jairouter_ratelimit_call_duration_seconds_bucket{{method=\"{method}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let count = m.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "jairouter_ratelimit_call_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {count}"
            );
            let sum = m.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "jairouter_ratelimit_call_duration_seconds_sum{{method=\"{method}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "jairouter_ratelimit_call_duration_seconds_count{{method=\"{method}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP jairouter_ratelimit_redis_errors_total Redis calls that failed or timed out."
        );
        let _ = writeln!(out, "# TYPE jairouter_ratelimit_redis_errors_total counter");
        let _ = writeln!(
            out,
            "jairouter_ratelimit_redis_errors_total {}",
            self.redis_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP jairouter_ratelimit_redis_up Whether the last Redis call succeeded."
        );
        let _ = writeln!(out, "# TYPE jairouter_ratelimit_redis_up gauge");
        let _ = writeln!(out, "jairouter_ratelimit_redis_up {}", u8::from(redis_up));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.call(
            Method::ShouldRateLimit,
            Outcome::Ok,
            Duration::from_micros(300),
        );
        m.call(
            Method::ShouldRateLimit,
            Outcome::OverLimit,
            Duration::from_millis(2),
        );
        m.call(Method::Settle, Outcome::Error, Duration::from_secs(1));
        m.redis_error();
        let text = m.render(true);
        for line in [
            "jairouter_ratelimit_calls_total{method=\"should_rate_limit\",outcome=\"ok\"} 1",
            "jairouter_ratelimit_calls_total{method=\"should_rate_limit\",outcome=\"over_limit\"} 1",
            "jairouter_ratelimit_calls_total{method=\"settle\",outcome=\"error\"} 1",
            "jairouter_ratelimit_calls_total{method=\"settle\",outcome=\"invalid\"} 0",
            "jairouter_ratelimit_call_duration_seconds_bucket{method=\"should_rate_limit\",le=\"0.0005\"} 1",
            "jairouter_ratelimit_call_duration_seconds_bucket{method=\"should_rate_limit\",le=\"0.001\"} 1",
            "jairouter_ratelimit_call_duration_seconds_bucket{method=\"should_rate_limit\",le=\"0.0025\"} 2",
            "jairouter_ratelimit_call_duration_seconds_bucket{method=\"settle\",le=\"0.1\"} 0",
            "jairouter_ratelimit_call_duration_seconds_bucket{method=\"settle\",le=\"+Inf\"} 1",
            "jairouter_ratelimit_call_duration_seconds_count{method=\"should_rate_limit\"} 2",
            "jairouter_ratelimit_redis_errors_total 1",
            "jairouter_ratelimit_redis_up 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
