//! What an exchange tells when it is over: its access-log summary and its metrics, counted in
//! the VM's `Metrics` (handed to Envoy once a tick, never per request).

use super::{Clock, Exchange, Worker};
use crate::breaker::Outcome;
use crate::config::Protocol;
use crate::config::Strategy;
use crate::endpoint::Endpoint;
use crate::json_text::Object;
use crate::metrics::{BackendCall, Finished, Tokens, UNKNOWN_MODEL};
use crate::route::{Caller, Routed};
use crate::usage::Usage;

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl Exchange {
    /// The access log's `jairouter` object: what the gateway decided, never a credential.
    pub(super) fn log_summary(&self, usage: Option<Usage>) -> String {
        let m = &self.measure;
        // A stand-in's name when a fallback served, with the model asked for beside it.
        let model = m
            .served_model
            .as_deref()
            .or((!m.model.is_empty()).then_some(m.model.as_str()));
        // Members in the order of their names, as the summary has always been written.
        let mut out = String::with_capacity(160);
        let mut summary = Object::new(&mut out);
        // The key's id (never the key), or the token's subject.
        let caller = &self.client.caller;
        if let Caller::Key(_) = caller {
            let id = caller.grants(&self.plan).map(|k| k.id.as_str());
            summary.string("api_key", id);
        }
        if let Some(usage) = usage {
            let completion = usage
                .completion_tokens
                .unwrap_or(usage.estimated_completion);
            summary.number("completion_tokens", Some(completion));
        }
        if let Some(decision) = &m.decision {
            summary.string("decision", Some(decision));
        }
        if m.served_model.is_some() {
            summary.string("fallback_for", m.requested_model.as_deref());
        }
        summary
            .string("instance", self.instance())
            .string("model", model);
        if let Some(usage) = usage {
            summary.number("prompt_tokens", usage.prompt_tokens);
        }
        summary
            .string("service", m.service)
            .number("status", m.status.map(u64::from));
        if let Caller::Token(grants) = caller {
            summary.string("subject", Some(&grants.id));
        }
        summary.end();
        out
    }

    /// `jairouter_rate_limit_events_total`: one per limit that decided on the request.
    pub(super) fn count_limit_event(&self, limit: usize, result: &str) {
        self.count_limit_events(limit, result, 1);
    }

    /// `count` events of limits of the same series as `limit` (its algorithm and scope).
    fn count_limit_events(&self, limit: usize, result: &str, count: u64) {
        let (Some(limit), Ok(mut metrics)) = (
            self.plan.limits.list.get(limit),
            self.worker.metrics.try_borrow_mut(),
        ) else {
            return;
        };
        metrics.add(
            "jairouter_rate_limit_events_total",
            &[
                ("service", self.measure.service.unwrap_or("none")),
                ("algorithm", limit.params.algorithm.name()),
                ("scope", limit.scope.name()),
                ("result", result),
            ],
            count,
        );
    }

    /// The routing decision's metrics: the limits it passed, the instance's in-flight count
    /// (this VM's), the balancer's selection.
    pub(super) fn count_routing(
        &self,
        routed: &Routed,
        instance: &str,
        strategy: Option<Strategy>,
    ) {
        // Limits of one series (an API key's request and token quotas, a model's request limit
        // and budget: token buckets of one scope) counted in one step, not one each.
        let series = |at: usize| {
            let limit = self.plan.limits.list.get(at)?;
            Some((limit.params.algorithm, limit.scope))
        };
        for (n, limit) in routed.limits_passed.iter().enumerate() {
            let same = |other: &usize| series(*other) == series(*limit);
            if routed.limits_passed.iter().take(n).any(same) {
                continue;
            }
            let count = routed.limits_passed.iter().filter(|l| same(l)).count();
            self.count_limit_events(*limit, "allowed", count as u64);
        }
        let Ok(mut metrics) = self.worker.metrics.try_borrow_mut() else {
            return;
        };
        metrics.begin(instance);
        let strategy = strategy.map_or("random", |s| s.metric_label());
        metrics.add(
            "jairouter_loadbalancer_selections_total",
            &[
                ("service", routed.service.key()),
                ("strategy", strategy),
                ("instance", instance),
            ],
            1,
        );
    }

    /// The request's metrics, counted in the VM once Envoy logs the stream: one lookup for
    /// every request family (see `Metrics::finish`).
    pub(super) fn record_metrics(&mut self, clock: &Clock<'_>) {
        let usage = self.final_usage();
        let Ok(mut metrics) = self.worker.metrics.try_borrow_mut() else {
            return;
        };
        let instance = self.instance();
        if let Some(instance) = instance {
            metrics.end(instance);
        }
        let m = &self.measure;
        // When the response's end was timed already, the log (right after it) reuses it.
        let now = match m.ended_ns {
            0 => clock.now(),
            ended => ended,
        };
        let started = if m.started_ns == 0 { now } else { m.started_ns };
        let method = if m.streamed {
            "STREAM"
        } else {
            m.method.as_str()
        };
        let backend = instance.map(|instance| {
            let tokens = usage.map(|usage| Tokens {
                input: usage
                    .prompt_tokens
                    .unwrap_or_else(|| m.request_bytes.div_ceil(4)),
                output: usage
                    .completion_tokens
                    .unwrap_or(usage.estimated_completion),
                input_reported: usage.prompt_tokens.is_some(),
                output_reported: usage.completion_tokens.is_some(),
            });
            // Streams: how long the first token took, and each one after it.
            let first_byte = (m.streamed && m.first_byte_ns > 0 && tokens.is_some())
                .then(|| m.first_byte_ns.saturating_sub(m.routed_ns));
            let completion = tokens.map_or(0, |t| t.output);
            let per_output_token = first_byte.filter(|_| completion > 1).map(|_| {
                let streaming = m.last_byte_ns.saturating_sub(m.first_byte_ns);
                seconds(streaming) / (completion - 1) as f64
            });
            BackendCall {
                instance,
                operation: m.endpoint.map_or("", Endpoint::gen_ai_operation),
                provider: m.protocol.map_or("", Protocol::gen_ai_provider),
                seconds: seconds(now.saturating_sub(m.routed_ns)),
                tokens,
                first_token: first_byte.map(seconds),
                per_output_token,
            }
        });
        metrics.finish(&Finished {
            service: m.service.unwrap_or("none"),
            method,
            model: if m.model.is_empty() {
                UNKNOWN_MODEL
            } else {
                m.model.as_str()
            },
            status: m.status,
            seconds: seconds(now.saturating_sub(started)),
            request_bytes: m.request_bytes,
            response_bytes: m.response_bytes,
            backend,
        });
    }
}

/// `jairouter_circuit_breaker_events_total`: the outcome, and a state change if any.
pub(super) fn count_breaker_events(
    worker: &Worker,
    service: Option<&str>,
    instance: &str,
    outcome: Outcome,
    changed: bool,
) {
    let Ok(mut metrics) = worker.metrics.try_borrow_mut() else {
        return;
    };
    let service = service.unwrap_or("none");
    let event = match outcome {
        Outcome::Success => Some("success"),
        Outcome::Failure => Some("failure"),
        Outcome::Neutral => None,
    };
    let events = event.into_iter().chain(changed.then_some("state_change"));
    for event in events {
        metrics.add(
            "jairouter_circuit_breaker_events_total",
            &[
                ("service", service),
                ("instance", instance),
                ("event", event),
            ],
            1,
        );
    }
}
