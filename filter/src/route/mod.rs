//! Where a request goes, once its model is known: the model's pool, the limits, the instance,
//! the upstream path. Plain Rust over the plan and `SharedStore`, like `request` above it (which
//! reads the model from the request and asks here).
//!
//! `route_model` checks the caller and tries the model's fallbacks; `route_to_instance` does the
//! jobs of one model, each in the file named for it:
//!
//! - `admit.rs`: the limits: the token estimate, the limits before the pick and the instance's
//!   own after it, their headers and their 429.
//! - `pick.rs`: the pick (the service's strategy, `balance::pick_instance`) and the turn through
//!   the rest of the pool from there.
//! - `skip.rs`: passing over an instance its breaker, its health or a backend's pause turns
//!   away, and why (what the reply says when none is left).
//! - `unrouted.rs`: the reply when no instance takes the request.
//! - `routed.rs`: the result (`Routed`) and giving it back when the request is refused after all.
//! - `caller.rs`: who calls, as the route sees them: their quotas and what they may use.
//!
//! A new picker (scoring instances by queue depth, KV cache or prefix affinity) goes in
//! `pick.rs`: it orders the candidates, and the walk after it (skip, instance limits,
//! the replies) stays the same for any picker.

mod admit;
mod caller;
mod pick;
mod routed;
mod skip;
mod unrouted;

pub use admit::{rate_limit_headers, too_many_requests};
pub use caller::Caller;
pub use routed::{release_routed, Routed, TokenReservation};
pub use unrouted::service_missing;

use crate::balance::{PickInput, Pool, Rotations};
use crate::breaker::Admission;
use crate::endpoint::Endpoint;
use crate::limit::{Admitted, Refunds, Subject};
use crate::plan::{Instance, Plan, Service};
use crate::reply::LocalReply;
use crate::store::SharedStore;
use skip::PassedOver;
use std::cell::RefCell;

/// Instances tried when instance-level limits refuse.
const MAX_INSTANCE_TRIES: usize = 3;

/// The choices that depend on the host and the caller: shared data, randomness, the clock,
/// the client.
pub struct RouteInputs<'a> {
    pub store: &'a dyn SharedStore,
    /// The token refunds this VM owes (paid with the next draw from their bucket).
    pub refunds: &'a RefCell<Refunds>,
    /// Where this VM's round-robin rotations stand.
    pub rotations: &'a RefCell<Rotations>,
    pub random: u64,
    /// The time in ns, asked only by a decision that needs it (the binding caches it per
    /// callback: a request answered or held without it never reads the clock).
    pub clock: &'a dyn Fn() -> u64,
    /// Envoy's view of the client address, without the port (ip-hash, consistent-hash).
    pub client: Option<&'a str>,
    /// Who calls (`request::authenticate`): their key's quotas, what they may use.
    pub caller: &'a Caller,
}

impl RouteInputs<'_> {
    pub fn now_ns(&self) -> u64 {
        (self.clock)()
    }

    fn pick_input<'k>(&'k self, hash_key: Option<&'k str>) -> PickInput<'k> {
        PickInput {
            random: self.random,
            now_ns: self.now_ns(),
            client: self.client,
            hash_key,
        }
    }
}

/// What the request says besides its model that shapes the pick and the limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts<'a> {
    /// header-hash key.
    pub hash_key: Option<&'a str>,
    /// The body's size, for the prompt estimate of token budgets.
    pub body_bytes: Option<u64>,
    /// The request's `max_tokens` (or `max_completion_tokens`).
    pub max_tokens: Option<u64>,
    /// Whether the model came from a JSON body the binding can rewrite: only then may a
    /// fallback model stand in (the backend must be asked for the model it serves).
    pub model_rewritable: bool,
}

/// Finds the model's pool in the endpoint's service and picks an instance; when none of the
/// model's instances can take the request, its fallback models in order.
pub fn route_model(
    cfg: &Plan,
    endpoint: Endpoint,
    model: &str,
    query: &str,
    host: &RouteInputs<'_>,
    facts: &RequestFacts<'_>,
) -> Result<Routed, LocalReply> {
    let kind = endpoint.service();
    let refused = |mut reply: LocalReply| {
        reply.service = Some(kind);
        reply.model = cfg
            .service(kind)
            .and_then(|s| s.models.get_key_value(model))
            .map(|(name, _)| name.clone());
        reply
    };
    host.caller
        .permits(cfg, kind, Some(model))
        .map_err(refused)?;
    let reply = match route_to_instance(cfg, endpoint, model, query, host, facts) {
        Ok(routed) => return Ok(routed),
        Err(reply) => refused(reply),
    };
    if reply.limited_by.is_some() {
        return Err(reply);
    }
    // None of the model's instances can take it (or the model is unknown, which finds no
    // fallback list): its fallback models, in order.
    let stand_ins = cfg
        .service(endpoint.service())
        .and_then(|s| s.spec.fallbacks.get(model))
        .filter(|_| facts.model_rewritable);
    for stand_in in stand_ins.into_iter().flatten() {
        if let Ok(mut routed) = route_to_instance(cfg, endpoint, stand_in, query, host, facts) {
            routed.fallback_from = Some(model.to_string());
            return Ok(routed);
        }
    }
    Err(reply)
}

/// One model's route: its pool, the limits before the pick, the pick and the instance that
/// takes the request, the upstream path. What it took is given back when it fails.
fn route_to_instance(
    cfg: &Plan,
    endpoint: Endpoint,
    model: &str,
    query: &str,
    host: &RouteInputs<'_>,
    facts: &RequestFacts<'_>,
) -> Result<Routed, LocalReply> {
    let (service, pool) = pool_of(cfg, endpoint, model)?;
    let subject = Subject {
        service: endpoint.service(),
        model,
        client: host.client,
        instance: None,
        api_key: host.caller.key_index(),
    };
    let estimate = admit::estimate(cfg, &subject, facts);
    let admitted = admit::before_pick(cfg, host, &subject, estimate.tokens)?;
    let candidates = pick::candidates(pool, host, facts.hash_key);
    let taken = take_instance(
        cfg,
        host,
        service,
        candidates,
        subject,
        estimate.tokens,
        admitted,
    )?;
    let Some(path) = upstream_path(taken.instance, endpoint, query) else {
        taken.release(cfg, host);
        return Err(unrouted::no_instance(model));
    };
    Ok(Routed::new(cfg, endpoint, model, path, taken, estimate))
}

/// The service of the endpoint and the model's pool in it.
fn pool_of<'p>(
    cfg: &'p Plan,
    endpoint: Endpoint,
    model: &str,
) -> Result<(&'p Service, &'p Pool), LocalReply> {
    let service = cfg
        .service(endpoint.service())
        .ok_or_else(|| service_missing(endpoint))?;
    let pool = service
        .models
        .get(model)
        .ok_or_else(|| unrouted::unknown_model(cfg, endpoint, model))?;
    Ok((service, pool))
}

/// The instance that takes a request, and every admission the request holds.
struct Taken<'p> {
    at: usize,
    instance: &'p Instance,
    breaker: Option<Admission>,
    admitted: Admitted,
}

impl Taken<'_> {
    /// Gives back the limits' admissions and a half-open trial's place.
    fn release(self, cfg: &Plan, host: &RouteInputs<'_>) {
        cfg.limits.release(host.store, &self.admitted.grants);
        skip::release_breaker(host, self.instance, self.breaker);
    }
}

/// The first candidate that neither its breaker, its health, a backend's pause nor its own
/// limits turn away, whatever the strategy picked. An instance's own limit refusing sends the
/// request on (as the original does, up to three tries); only when every instance refuses is
/// the client limited or told none serve, and what the request holds given back.
fn take_instance<'p>(
    cfg: &Plan,
    host: &RouteInputs<'_>,
    service: &'p Service,
    candidates: impl Iterator<Item = &'p usize>,
    subject: Subject<'_>,
    tokens: u64,
    mut admitted: Admitted,
) -> Result<Taken<'p>, LocalReply> {
    let mut passed_over = PassedOver::default();
    let mut refused = None;
    let mut limit_tries = 0;
    for &at in candidates {
        let Some(instance) = service.instances.get(at) else {
            continue;
        };
        let breaker = skip::admission(host, instance);
        if passed_over.passes_over(instance, breaker) {
            continue;
        }
        if limit_tries == MAX_INSTANCE_TRIES {
            skip::release_breaker(host, instance, breaker);
            break;
        }
        limit_tries += 1;
        let subject = Subject {
            instance: Some((at, &instance.spec.id)),
            ..subject
        };
        match admit::at_instance(cfg, host, &subject, tokens) {
            Ok(more) => {
                admitted.merge(more);
                return Ok(Taken {
                    at,
                    instance,
                    breaker,
                    admitted,
                });
            }
            Err(refusal) => {
                skip::release_breaker(host, instance, breaker);
                refused = Some(refusal);
            }
        }
    }
    cfg.limits.release(host.store, &admitted.grants);
    Err(unrouted::reply(
        cfg,
        subject.model,
        refused,
        &passed_over,
        host,
    ))
}

/// The instance's path for the endpoint, with the client's query.
fn upstream_path(instance: &Instance, endpoint: Endpoint, query: &str) -> Option<String> {
    let path = instance.upstream_path(endpoint)?;
    Some(if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    })
}

#[cfg(test)]
mod tests;
