//! The upstream stage: a routed request pointed at its instance, and what routing took for it
//! (an in-flight count, a breaker admission, token budgets) counted or given back exactly once,
//! however the exchange ends. A request for a translating instance first waits for its whole
//! body (`Stage::AwaitingBody`), which is then rewritten for the instance's protocol.

use super::translation::{self, Pending, Translation};
use super::{report, Buffered, Clock, Exchange, Flow, Stage};
use crate::balance::load::{begin_request, end_request, record_latency};
use crate::breaker::{self, Admission, BreakerPolicy, Outcome};
use crate::config::{LoadBalance, Strategy};
use crate::contract::ROUTING_HEADER;
use crate::endpoint::Endpoint;
use crate::host::Host;
use crate::limit::rls::Descriptor;
use crate::plan::Instance;
use crate::reply::{LocalReply, DEFAULT_RETRY_AFTER_SECS};
use crate::route::{Routed, TokenReservation};
use crate::usage::{Usage, UsageScanner};
use std::rc::Rc;

/// A failed exchange (5xx, reset, timeout) counts as at least this slow for least-latency.
const FAILURE_LATENCY_NS: u64 = 1_000_000_000;

/// A request at its instance: what was taken for it, and how its answer is read.
pub(super) struct Upstream {
    /// The instance id (`x-jairouter-instance`, the breaker's log, the metrics).
    pub(super) instance: String,
    /// Headers for the response (the rate-limit state the request met).
    pub(super) response_headers: Vec<(&'static str, String)>,
    /// What least-connections and least-latency must hear about the request when it ends.
    pub(super) load: Option<LoadReport>,
    /// Token budgets drawn at admission, settled once the response tells its usage.
    tokens: Option<TokenReservation>,
    /// The shared token budgets it drew from (limits across replicas), settled with them.
    pub(super) shared_tokens: Vec<(usize, Descriptor)>,
    /// The instance's circuit breaker, until the exchange's outcome is counted.
    pub(super) breaker: Option<BreakerTicket>,
    /// The answer's translation (or the rewrite of its errors), when the instance needs one.
    pub(super) translation: Option<Translation>,
    /// Reads the answer's usage, once its head says it has one.
    pub(super) usage: Option<UsageScanner>,
}

/// A breaker admission to count once the exchange with the instance is over.
pub(super) struct BreakerTicket {
    pub(super) key: String,
    policy: BreakerPolicy,
    admission: Admission,
    /// Retries allowed for the request (an answer may then come from another instance).
    pub(super) retries: u64,
}

/// An in-flight count taken for a request, to give back exactly once, and the start of its
/// latency measurement.
pub(super) struct LoadReport {
    in_flight_key: String,
    /// Set for least-latency: where the time to first byte goes.
    latency_key: Option<String>,
    decay_ns: u64,
    started_ns: u64,
    measured: bool,
}

impl BreakerTicket {
    fn new(instance: &Instance, admission: Option<Admission>, retries: u64) -> Option<Self> {
        Some(BreakerTicket {
            key: instance.state_key.clone(),
            policy: instance.breaker?,
            admission: admission?,
            retries,
        })
    }
}

impl LoadReport {
    /// In-flight counts and latency exist only for the strategies that read them.
    fn begin(
        host: &dyn Host,
        clock: &Clock<'_>,
        instance: &Instance,
        lb: &LoadBalance,
    ) -> Option<Self> {
        if !matches!(
            lb.strategy,
            Strategy::LeastConnections | Strategy::LeastLatency
        ) {
            return None;
        }
        begin_request(host, &instance.in_flight_key);
        Some(LoadReport {
            in_flight_key: instance.in_flight_key.clone(),
            latency_key: (lb.strategy == Strategy::LeastLatency)
                .then(|| instance.latency_key.clone()),
            decay_ns: lb.latency_decay_ms.saturating_mul(1_000_000),
            started_ns: clock.now(),
            measured: false,
        })
    }
}

/// What the request needs translated once its body is whole.
fn pending(instance: &Instance, routed: &Routed) -> Pending {
    Pending {
        protocol: instance.spec.adapter.protocol,
        adapter: instance.spec.adapter.name.clone(),
        endpoint: routed.endpoint,
        model: routed.model.clone(),
        prefix: instance.spec.base_url.prefix.clone(),
        path_given: instance.spec.path_given.clone(),
        chat_path: instance
            .upstream_path(Endpoint::ChatCompletions)
            .unwrap_or("/v1/chat/completions")
            .to_string(),
    }
}

impl Stage {
    /// Ends the wait for a translating instance's whole body: the request is upstream from now
    /// on, and what its translation needs is handed out.
    fn end_wait_for_body(&mut self) -> Option<Pending> {
        match self.take() {
            Stage::AwaitingBody(upstream, pending) => {
                *self = Stage::Upstream(upstream);
                Some(pending)
            }
            other => {
                *self = other;
                None
            }
        }
    }
}

impl Exchange {
    /// The start of the upstream stage: the request pointed at the chosen instance (Envoy
    /// re-selects the route), and what the instance's strategy and breaker count begun. A request
    /// for a translating instance is rewritten once its body is whole.
    pub(super) fn start_upstream(
        &mut self,
        host: &dyn Host,
        clock: &Clock<'_>,
        routed: Routed,
        body: Buffered,
        shared_tokens: Vec<(usize, Descriptor)>,
    ) -> Flow {
        let plan = Rc::clone(&self.plan);
        let chosen = plan
            .service(routed.service)
            .and_then(|s| Some((s, s.instances.get(routed.instance)?)));
        let Some((service, instance)) = chosen else {
            let reply = LocalReply::no_instance("the chosen instance is gone", 1);
            return self.reply(host, clock, &reply);
        };
        let translates = translation::translates(routed.endpoint, &instance.spec.adapter);
        self.point_at(host, instance, &routed.path, translates);
        // The route's retry policy carries the global `retries`; a service that differs (or an
        // upload, not retried unless configured) says so here. Envoy strips this header from
        // clients' requests; ours is set after that.
        if service.spec.retries != plan.spec.retries {
            host.set_request_header("x-envoy-max-retries", &service.spec.retries.to_string());
        }
        // No clear_route_cache: Envoy re-selects the route itself when a module of ABI 0.2.1
        // (what proxy-wasm 0.2.x exports) changes a request header, which saves ~2 µs;
        // `test_abi_version_lets_envoy_reselect_the_route` pins the ABI this relies on.
        self.measure.routed_ns = clock.now();
        self.measure.service = Some(routed.service.key());
        self.measure.endpoint = Some(routed.endpoint);
        self.measure.protocol = Some(instance.spec.adapter.protocol);
        let lb = &service.spec.load_balance;
        self.count_routing(&routed, &instance.spec.id, Some(lb.strategy));
        let pending = translates.then(|| pending(instance, &routed));
        let rewrites_errors = !translates && instance.spec.adapter.rewrites_errors;
        let upstream = Upstream {
            instance: instance.spec.id.clone(),
            response_headers: routed.headers,
            load: LoadReport::begin(host, clock, instance, lb),
            tokens: routed.tokens,
            shared_tokens,
            breaker: BreakerTicket::new(instance, routed.breaker, service.spec.retries),
            translation: rewrites_errors.then(|| Translation::errors_only(routed.endpoint)),
            usage: None,
        };
        self.measure.model = routed.model;
        match pending {
            Some(pending) => {
                self.stage = Stage::AwaitingBody(upstream, pending);
                self.translate_when_whole(host, clock, body)
            }
            None => {
                self.stage = Stage::Upstream(upstream);
                Flow::Continue
            }
        }
    }

    /// Points the request at the instance: its path (a translated request's is set with its
    /// body), its headers, its cluster.
    fn point_at(&self, host: &dyn Host, instance: &Instance, path: &str, translates: bool) {
        if path != self.client.path && !translates {
            host.set_request_header(":path", path);
        }
        for (name, value) in &instance.spec.headers {
            host.set_request_header(name, value);
        }
        if translates {
            let sent = self.client.sent;
            if sent.accept_encoding {
                host.remove_request_header("accept-encoding");
            }
            // The client's own credentials mean nothing to a backend of another protocol.
            for (sent, name) in [
                (sent.authorization, "authorization"),
                (sent.x_api_key, "x-api-key"),
            ] {
                if sent && !instance.spec.headers.iter().any(|(n, _)| n == name) {
                    host.remove_request_header(name);
                }
            }
        }
        host.set_request_header(ROUTING_HEADER, &instance.spec.cluster);
    }

    /// A request routed to a translating instance waits for its whole body, then is rewritten.
    pub(super) fn translate_when_whole(
        &mut self,
        host: &dyn Host,
        clock: &Clock<'_>,
        body: Buffered,
    ) -> Flow {
        if !matches!(self.stage, Stage::AwaitingBody(..)) {
            return Flow::Continue;
        }
        if !body.end_of_stream {
            return Flow::Pause;
        }
        self.translate_request(host, clock, body.size)
    }

    /// Rewrites the whole buffered request for the instance's protocol (body, length, path),
    /// or answers the client when it cannot be said in that protocol.
    fn translate_request(&mut self, host: &dyn Host, clock: &Clock<'_>, body_size: usize) -> Flow {
        let Some(pending) = self.stage.end_wait_for_body() else {
            return Flow::Continue;
        };
        let body = match body_size {
            0 => Vec::new(),
            _ => host.request_body(0, body_size).unwrap_or_default(),
        };
        let created = clock.now() / 1_000_000_000;
        let nonce = self.next_random();
        let translated =
            Translation::request(&pending, &body, created, nonce).and_then(|(t, out)| {
                if host.replace_request_body(body.len(), &out.body) {
                    Ok((t, out))
                } else {
                    Err(LocalReply::no_instance(
                        "Envoy refused the translated request.",
                        DEFAULT_RETRY_AFTER_SECS,
                    ))
                }
            });
        match translated {
            Ok((translation, outbound)) => {
                host.set_request_header("content-length", &outbound.body.len().to_string());
                host.set_request_header(":path", &outbound.path);
                if let Some(upstream) = self.stage.upstream_mut() {
                    upstream.translation = Some(translation);
                }
                Flow::Continue
            }
            Err(reply) => {
                // The instance never saw the request: no breaker outcome, no latency sample
                // (what routing took is given back when it ends, as for any routed request).
                self.count_breaker(host, clock, Outcome::Neutral);
                if let Some(load) = self.stage.upstream_mut().and_then(|u| u.load.as_mut()) {
                    load.measured = true;
                }
                self.reply(host, clock, &reply)
            }
        }
    }

    /// The first response byte (or the end of a request that never got one) is the latency
    /// sample; a failure counts as slow.
    pub(super) fn measure_latency(&mut self, host: &dyn Host, clock: &Clock<'_>, failed: bool) {
        let Some(load) = self.stage.upstream_mut().and_then(|u| u.load.as_mut()) else {
            return;
        };
        if load.measured {
            return;
        }
        load.measured = true;
        if let Some(key) = &load.latency_key {
            let now = clock.now();
            let mut sample = now.saturating_sub(load.started_ns);
            if failed {
                sample = sample.max(FAILURE_LATENCY_NS);
            }
            record_latency(host, key, sample, now, load.decay_ns);
        }
    }

    /// Gives the in-flight count back, once, however the request ended.
    pub(super) fn end_load(&mut self, host: &dyn Host, clock: &Clock<'_>) {
        self.measure_latency(host, clock, true);
        if let Some(load) = self.stage.upstream_mut().and_then(|u| u.load.take()) {
            end_request(host, &load.in_flight_key);
        }
    }

    /// Counts the exchange against the instance's breaker, once.
    pub(super) fn count_breaker(&mut self, host: &dyn Host, clock: &Clock<'_>, outcome: Outcome) {
        let Some(upstream) = self.stage.upstream_mut() else {
            return;
        };
        let Some(ticket) = upstream.breaker.take() else {
            return;
        };
        // A clean success changes nothing in shared data: no clock, no read.
        let change = if breaker::record_changes(ticket.admission, outcome) {
            breaker::record(
                host,
                &ticket.key,
                &ticket.policy,
                ticket.admission,
                outcome,
                clock.now(),
            )
        } else {
            None
        };
        let instance = upstream.instance.as_str();
        let service = self.measure.service;
        report::count_breaker_events(&self.worker, service, instance, outcome, change.is_some());
        if let Some((from, to)) = change {
            log::warn!("circuit breaker of instance {instance}: {from:?} -> {to:?}");
        }
    }

    /// Charges the token budgets what the request really used (once): the reported usage, or
    /// the prompt estimate and the completion estimated from the text that passed.
    pub(super) fn settle_tokens(&mut self, host: &dyn Host, clock: &Clock<'_>) {
        let Some(reservation) = self.stage.upstream_mut().and_then(|u| u.tokens.take()) else {
            return;
        };
        let used = match self.final_usage() {
            Some(usage) => usage.charge(reservation.prompt_estimate),
            None => reservation.prompt_estimate,
        };
        {
            let mut owed = self.worker.refunds.try_borrow_mut().ok();
            self.plan.limits.settle_tokens(
                host,
                owed.as_deref_mut(),
                &reservation.grants,
                used,
                clock.now(),
            );
        }
        self.settle_shared_tokens(used);
    }

    /// What the response reported (or its text let estimate), once it is over.
    pub(super) fn final_usage(&mut self) -> Option<Usage> {
        if let Some(scanner) = self.stage.upstream_mut().and_then(|u| u.usage.take()) {
            self.measure.usage = Some(scanner.usage());
        }
        self.measure.usage
    }
}
