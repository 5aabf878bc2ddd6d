//! The limits across replicas, as one request meets them (`gateway.global-rate-limit`; the
//! limits themselves are `limit::global`). Once the local limits admitted the request and an
//! instance was picked, the filter holds it and asks the rate-limit service about the shared
//! buckets it draws from. Admitted, it goes on as any routed request, with the shared buckets'
//! `x-ratelimit-*` state; refused, the client gets the same 429 a local limit gives, and what the
//! request held locally is given back. When the service does not answer within `timeout-ms`,
//! `failure-mode-deny` decides: refuse with 503, or go on under the local limits alone.

use super::{Buffered, Clock, Exchange, Flow, Stage};
use crate::config::TokenSettlement;
use crate::contract::RATE_LIMIT_CLUSTER;
use crate::encoding::client_ip;
use crate::host::Host;
use crate::limit::global::{decide, settlements, Decision, Transition};
use crate::limit::rls::{self, Answer, Descriptor, RLS_METHOD, RLS_SERVICE};
use crate::limit::{Subject, Unit};
use crate::reply::{ClientError, LocalReply};
use crate::route::{rate_limit_headers, release_routed, too_many_requests, Routed};
use std::rc::Rc;

/// Every call to the rate-limit service is counted here, by call and outcome.
pub const CALLS_METRIC: &str = "jairouter_global_rate_limit_calls_total";

/// A routed request waiting for the service's answer.
pub struct Check {
    token: u32,
    routed: Routed,
    sent: Vec<(usize, Descriptor)>,
    /// The request body Envoy buffered meanwhile.
    pub(super) body: Buffered,
}

impl Exchange {
    /// Sends a routed request on: at once, or once the limits across replicas admit it.
    pub(super) fn route(
        &mut self,
        host: &dyn Host,
        clock: &Clock<'_>,
        routed: Routed,
        body: Buffered,
    ) -> Flow {
        let plan = Rc::clone(&self.plan);
        let Some(global) = plan.spec.gateway.global_rate_limit.as_ref() else {
            return self.start_upstream(host, clock, routed, body, Vec::new());
        };
        let subject = Subject {
            service: routed.service,
            model: &routed.model,
            client: self.client.address.as_deref().map(client_ip),
            instance: None,
            api_key: self.client.caller.key_index(),
        };
        let tokens = routed.tokens.as_ref().map_or(0, |t| t.reserved);
        let sent = plan.limits.shared_descriptors(&subject, tokens);
        if sent.is_empty() {
            return self.start_upstream(host, clock, routed, body, Vec::new());
        }
        let message = rls::encode_request(&global.domain, sent.iter().map(|(_, d)| d));
        let dispatched = host.dispatch_grpc(
            RATE_LIMIT_CLUSTER,
            RLS_SERVICE,
            RLS_METHOD,
            &message,
            global.timeout_ms,
        );
        match dispatched {
            Some(token) => {
                self.stage = Stage::AwaitingLimits(Box::new(Check {
                    token,
                    routed,
                    sent,
                    body,
                }));
                Flow::Pause
            }
            None => {
                self.count_call("check", "unavailable");
                self.unchecked(host, clock, routed, body, "could not be called")
            }
        }
    }

    /// The service answered (`status` is gRPC's: 0 OK, 4 deadline exceeded, 14 unavailable).
    pub fn on_grpc_answer(&mut self, host: &dyn Host, token: u32, status: u32, size: usize) {
        // Only the answer to this request's own call.
        if !matches!(&self.stage, Stage::AwaitingLimits(check) if check.token == token) {
            return;
        }
        let Stage::AwaitingLimits(check) = self.stage.take() else {
            return;
        };
        let clock = Clock::new(host);
        let answer = match status {
            0 => host
                .grpc_answer(size)
                .and_then(|bytes| rls::decode_answer(&bytes).ok())
                .ok_or("answered what the filter cannot read"),
            4 => Err("did not answer in time"),
            14 => Err("is unavailable"),
            _ => Err("failed the call"),
        };
        let flow = match answer {
            Ok(answer) => {
                self.note_reached(true, "");
                self.decided(host, &clock, *check, &answer)
            }
            Err(why) => {
                self.count_call("check", "unavailable");
                self.unchecked(host, &clock, check.routed, check.body, why)
            }
        };
        if flow == Flow::Continue {
            host.resume_request();
        }
    }

    /// The service's verdict on the shared buckets. Refused: the local limits' 429, and what the
    /// request held is given back. Admitted: upstream, with the shared buckets' state.
    fn decided(
        &mut self,
        host: &dyn Host,
        clock: &Clock<'_>,
        check: Check,
        answer: &Answer,
    ) -> Flow {
        let plan = Rc::clone(&self.plan);
        let Check {
            mut routed,
            sent,
            body,
            ..
        } = check;
        let (tightest, tightest_tokens) = match decide(&plan.limits, &sent, answer) {
            Decision::Refused(refusal) => {
                self.count_call("check", "over_limit");
                release_routed(&plan, host, &routed, clock.now());
                let mut reply = too_many_requests(&plan, &refusal);
                reply.service = Some(routed.service);
                reply.model = Some(routed.model);
                return self.reply(host, clock, &reply);
            }
            Decision::Admitted {
                tightest,
                tightest_tokens,
            } => (tightest, tightest_tokens),
        };
        self.count_call("check", "ok");
        for (suffix, shared) in [("-requests", tightest), ("-tokens", tightest_tokens)] {
            if let Some((limit, verdict)) = shared {
                routed.headers.retain(|(name, _)| !name.ends_with(suffix));
                routed
                    .headers
                    .extend(rate_limit_headers(&plan, limit, &verdict));
            }
        }
        let shared_tokens = sent
            .into_iter()
            .filter(|(at, _)| {
                plan.limits
                    .list
                    .get(*at)
                    .is_some_and(|l| l.unit == Unit::Tokens)
            })
            .collect();
        self.start_upstream(host, clock, routed, body, shared_tokens)
    }

    /// The request ended (the client went away) while it waited: what it held is given back.
    pub(super) fn abandon_check(&mut self, host: &dyn Host, clock: &Clock<'_>) {
        if !matches!(self.stage, Stage::AwaitingLimits(_)) {
            return;
        }
        if let Stage::AwaitingLimits(check) = self.stage.take() {
            release_routed(&self.plan, host, &check.routed, clock.now());
        }
    }

    /// The service could not be asked: refuse (`failure-mode-deny`) or go on under the local
    /// limits alone.
    fn unchecked(
        &mut self,
        host: &dyn Host,
        clock: &Clock<'_>,
        routed: Routed,
        body: Buffered,
        why: &str,
    ) -> Flow {
        self.note_reached(false, why);
        if !self.fails_closed() {
            return self.start_upstream(host, clock, routed, body, Vec::new());
        }
        release_routed(&self.plan, host, &routed, clock.now());
        let mut reply = LocalReply::error(
            ClientError::RateLimitUnavailable,
            "The gateway's rate limits cannot be checked right now; try again shortly.",
        )
        .with_header("retry-after", "1")
        .because("rate-limit service unavailable");
        reply.service = Some(routed.service);
        reply.model = Some(routed.model);
        self.reply(host, clock, &reply)
    }

    /// `failure-mode-deny`: refuse what the service cannot check.
    fn fails_closed(&self) -> bool {
        self.plan
            .spec
            .gateway
            .global_rate_limit
            .as_ref()
            .is_some_and(|g| g.failure_mode_deny)
    }

    /// Logs the service's outage when it starts and when it ends (not per request).
    fn note_reached(&self, reached: bool, why: &str) {
        let transition = self
            .worker
            .link
            .try_borrow_mut()
            .ok()
            .and_then(|mut link| link.outcome(reached));
        let deny = self.fails_closed();
        match transition {
            Some(Transition::Failed) => log::warn!(
                "rate-limit service {why}: {} until it answers again",
                if deny {
                    "refusing requests (failure-mode-deny)"
                } else {
                    "enforcing the local limits alone"
                }
            ),
            Some(Transition::Recovered) => log::info!("rate-limit service answers again"),
            None => {}
        }
    }

    fn count_call(&self, call: &str, outcome: &str) {
        if let Ok(mut metrics) = self.worker.metrics.try_borrow_mut() {
            metrics.add(CALLS_METRIC, &[("call", call), ("outcome", outcome)], 1);
        }
    }

    /// Hands the shared token budgets' settlements to the VM's root context, which sends them
    /// in batches.
    pub(super) fn settle_shared_tokens(&mut self, used: u64) {
        let Some(upstream) = self.stage.upstream_mut() else {
            return;
        };
        if upstream.shared_tokens.is_empty() {
            return;
        }
        let sent = std::mem::take(&mut upstream.shared_tokens);
        let mut due = settlements(&self.plan.limits, &sent, used);
        let charges_only = self
            .plan
            .spec
            .gateway
            .global_rate_limit
            .as_ref()
            .is_some_and(|g| g.token_settlement == TokenSettlement::ChargesOnly);
        if charges_only {
            due.retain(|s| s.delta > 0);
        }
        if let Ok(mut link) = self.worker.link.try_borrow_mut() {
            link.settle(due);
        }
    }
}
