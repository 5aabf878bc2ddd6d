//! The filter's metrics, under the original's names with labels encoded the way the bootstrap's
//! stats tags take apart (`<name>.<tag>=<value>;`, see envoy-notes).
//!
//! A host call per metric per request would cost about a microsecond each (`./build.sh bench
//! hostcalls`), so the request path only adds to counters in the VM's own memory, and the VM's
//! tick hands the sums to Envoy once a second: a scrape sees them at most a second late.
//! Durations are classic Prometheus histograms made of counters: `_bucket{le=...}` (cumulative,
//! `le` in seconds), `_count`, and `_sum` in whole seconds (the fraction carries over, so
//! averages are right over any window that adds up to many seconds).

use std::collections::HashMap;

/// Bucket bounds (seconds) for request and backend durations: LLM calls run from milliseconds
/// (embeddings) to minutes (long generations).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Bucket bounds (seconds) for time to first token and time per output token.
pub const TOKEN_TIME_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Labels every metric may carry (each has a stats tag in the bootstrap).
pub const TAGS: [&str; 12] = [
    "service",
    "model",
    "instance",
    "status",
    "method",
    "strategy",
    "algorithm",
    "result",
    "event",
    "kind",
    "scope",
    "le",
];

/// The stat name Envoy is given: the metric and its labels, in the order written.
pub fn stat_name(name: &str, labels: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(name.len() + labels.len() * 24);
    out.push_str(name);
    for (tag, value) in labels {
        out.push('.');
        out.push_str(tag);
        out.push('=');
        // `;` ends a value and `.` would be read as a new tag by nothing but humans; neither
        // appears in what we label with, but a configured name might carry them.
        out.extend(value.chars().map(|c| if c == ';' { '_' } else { c }));
        out.push(';');
    }
    out
}

/// What one VM has counted since its last flush.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: HashMap<String, u64>,
    /// By metric name and labels (no `le`); turned into `_bucket`, `_count` and `_sum` stats
    /// only when drained, so an observation costs one lookup.
    histograms: HashMap<String, Histogram>,
    /// Requests of this VM now at each instance (by instance id).
    in_flight: HashMap<String, u64>,
}

#[derive(Debug)]
struct Histogram {
    name: &'static str,
    labels: Vec<(&'static str, String)>,
    bounds: &'static [f64],
    /// Observations per bucket since the last drain (not cumulative; the last is +Inf).
    pending: Vec<u64>,
    /// Seconds observed and not yet handed over as whole seconds.
    sum_carry: f64,
}

impl Metrics {
    pub fn add(&mut self, name: &str, labels: &[(&str, &str)], delta: u64) {
        if delta == 0 {
            return;
        }
        let slot = self.counters.entry(stat_name(name, labels)).or_insert(0);
        *slot = slot.saturating_add(delta);
    }

    /// One observation of a histogram (seconds).
    pub fn observe(
        &mut self,
        name: &'static str,
        labels: &[(&'static str, &str)],
        seconds: f64,
        bounds: &'static [f64],
    ) {
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        let histogram = self
            .histograms
            .entry(stat_name(name, labels))
            .or_insert_with(|| Histogram {
                name,
                labels: labels.iter().map(|(t, v)| (*t, v.to_string())).collect(),
                bounds,
                pending: vec![0; bounds.len() + 1],
                sum_carry: 0.0,
            });
        let at = histogram
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(histogram.bounds.len());
        if let Some(slot) = histogram.pending.get_mut(at) {
            *slot = slot.saturating_add(1);
        }
        histogram.sum_carry += seconds;
    }

    /// The counts to hand to Envoy, by stat name; the VM starts counting afresh.
    pub fn drain(&mut self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self.counters.drain().collect();
        for histogram in self.histograms.values_mut() {
            let count: u64 = histogram.pending.iter().sum();
            let labels: Vec<(&str, &str)> = histogram
                .labels
                .iter()
                .map(|(t, v)| (*t, v.as_str()))
                .collect();
            let mut cumulative = 0u64;
            let bounds = histogram.bounds.iter().map(|b| b.to_string());
            for (pending, le) in histogram
                .pending
                .iter_mut()
                .zip(bounds.chain(["+Inf".into()]))
            {
                cumulative = cumulative.saturating_add(*pending);
                *pending = 0;
                // Every bucket, even one that moved by nothing: a quantile needs them all.
                if count > 0 {
                    let mut with_le = labels.clone();
                    with_le.push(("le", &le));
                    out.push((
                        stat_name(&format!("{}_bucket", histogram.name), &with_le),
                        cumulative,
                    ));
                }
            }
            if count > 0 {
                out.push((
                    stat_name(&format!("{}_count", histogram.name), &labels),
                    count,
                ));
            }
            let whole = histogram.sum_carry.floor();
            if whole >= 1.0 {
                histogram.sum_carry -= whole;
                out.push((
                    stat_name(&format!("{}_sum", histogram.name), &labels),
                    whole as u64,
                ));
            }
        }
        out
    }

    /// A request of this VM went to the instance.
    pub fn begin(&mut self, instance: &str) {
        let slot = self.in_flight.entry(instance.to_string()).or_insert(0);
        *slot = slot.saturating_add(1);
    }

    /// A request of this VM at the instance is over.
    pub fn end(&mut self, instance: &str) {
        if let Some(slot) = self.in_flight.get_mut(instance) {
            *slot = slot.saturating_sub(1);
        }
    }

    /// This VM's requests in flight, by instance (every instance it ever sent one to).
    pub fn in_flight(&self) -> impl Iterator<Item = (&str, u64)> {
        self.in_flight.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// A status code's class as a label (`2xx`, `4xx`, ...; `0xx` when there was no answer).
pub fn status_class(status: Option<u32>) -> &'static str {
    match status.map(|s| s / 100) {
        Some(1) => "1xx",
        Some(2) => "2xx",
        Some(3) => "3xx",
        Some(4) => "4xx",
        Some(5) => "5xx",
        _ => "0xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drained(m: &mut Metrics) -> HashMap<String, u64> {
        m.drain().into_iter().collect()
    }

    #[test]
    fn names_carry_their_labels_for_the_stats_tags() {
        assert_eq!(
            stat_name(
                "jairouter_requests_total",
                &[("service", "chat"), ("status", "2xx")]
            ),
            "jairouter_requests_total.service=chat;.status=2xx;"
        );
        assert_eq!(stat_name("m", &[("model", "a;b")]), "m.model=a_b;");
    }

    #[test]
    fn counters_add_up_until_drained() {
        let mut m = Metrics::default();
        m.add("c", &[("service", "chat")], 2);
        m.add("c", &[("service", "chat")], 3);
        m.add("c", &[("service", "embedding")], 0);
        let got = drained(&mut m);
        assert_eq!(got.len(), 1);
        assert_eq!(got["c.service=chat;"], 5);
        assert!(m.drain().is_empty());
    }

    #[test]
    fn histograms_are_cumulative_buckets_count_and_whole_second_sums() {
        let mut m = Metrics::default();
        let labels = [("service", "chat")];
        m.observe("d", &labels, 0.3, &[0.1, 0.5, 1.0]);
        m.observe("d", &labels, 0.8, &[0.1, 0.5, 1.0]);
        m.observe("d", &labels, 7.0, &[0.1, 0.5, 1.0]);
        let got = drained(&mut m);
        let bucket = |le: &str| {
            got.get(&format!("d_bucket.service=chat;.le={le};"))
                .copied()
        };
        assert_eq!(bucket("0.1"), Some(0));
        assert_eq!(bucket("0.5"), Some(1));
        assert_eq!(bucket("1"), Some(2));
        assert_eq!(bucket("+Inf"), Some(3));
        assert_eq!(got["d_count.service=chat;"], 3);
        assert_eq!(
            got["d_sum.service=chat;"], 8,
            "0.3 + 0.8 + 7.0 = 8.1: 8 whole seconds"
        );
        m.observe("d", &labels, 0.95, &[0.1]);
        assert_eq!(
            drained(&mut m)["d_sum.service=chat;"],
            1,
            "0.1 carried + 0.95"
        );
        m.observe("d", &labels, f64::NAN, &[0.1]);
        assert_eq!(drained(&mut m)["d_bucket.service=chat;.le=0.1;"], 1);
    }

    #[test]
    fn in_flight_counts_rise_and_fall_per_instance() {
        let mut m = Metrics::default();
        m.begin("a");
        m.begin("a");
        m.begin("b");
        m.end("a");
        m.end("c");
        let mut got: Vec<_> = m.in_flight().collect();
        got.sort();
        assert_eq!(got, [("a", 1), ("b", 1)]);
        m.end("b");
        m.end("b");
        assert!(m.in_flight().any(|(i, n)| i == "b" && n == 0));
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(Some(200)), "2xx");
        assert_eq!(status_class(Some(429)), "4xx");
        assert_eq!(status_class(Some(503)), "5xx");
        assert_eq!(status_class(None), "0xx");
        assert_eq!(status_class(Some(99)), "0xx");
    }
}
