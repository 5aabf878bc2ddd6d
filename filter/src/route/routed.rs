//! The result of a route: where the request goes and what it holds (the limits' admissions, a
//! breaker's), and giving those back when it is refused after all.

use super::admit::{rate_limit_headers, Estimate};
use super::Taken;
use crate::breaker::{self, Admission, Outcome};
use crate::endpoint::{Endpoint, ServiceType};
use crate::limit::Grant;
use crate::plan::Plan;
use crate::store::SharedStore;

/// Tokens a request reserved from token budgets, settled when its usage is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenReservation {
    pub reserved: u64,
    /// The prompt part of the reservation: what is charged for the prompt when the response
    /// reports no usage.
    pub prompt_estimate: u64,
    /// The token budgets' admissions (the request's other admissions are `Routed::grants`).
    pub grants: Vec<Grant>,
}

/// Where a request goes: the instance (by index in its service) and the upstream `:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub service: ServiceType,
    pub endpoint: Endpoint,
    pub model: String,
    pub instance: usize,
    pub path: String,
    /// Response headers to add (the rate-limit state the request met).
    pub headers: Vec<(&'static str, String)>,
    /// Token budgets to settle from the response's usage.
    pub tokens: Option<TokenReservation>,
    /// How the instance's circuit breaker let the request through (when it has one): what the
    /// end of the exchange must be counted against.
    pub breaker: Option<Admission>,
    /// The model the client asked for, when `model` is a fallback standing in for it.
    pub fallback_from: Option<String>,
    /// The rate limits that let it through (indices into `Limits::list`; a metrics label).
    pub limits_passed: Vec<usize>,
    /// The admissions it holds but the token budgets' (`TokenReservation::grants`): both are
    /// given back if the limits across replicas refuse it.
    pub grants: Vec<Grant>,
}

impl Routed {
    /// The route to the instance taken, holding its admissions once each: the token budgets'
    /// with the reservation that settles them, the others in `grants`.
    pub(super) fn new(
        cfg: &Plan,
        endpoint: Endpoint,
        model: &str,
        path: String,
        taken: Taken<'_>,
        estimate: Estimate,
    ) -> Routed {
        let admitted = taken.admitted;
        let limits_passed = admitted.grants.iter().map(Grant::limit).collect();
        let holds_tokens = admitted.holds_tokens();
        let (token_grants, grants): (Vec<Grant>, Vec<Grant>) = admitted
            .grants
            .into_iter()
            .partition(|g| cfg.limits.is_token_grant(g));
        Routed {
            limits_passed,
            service: endpoint.service(),
            endpoint,
            model: model.to_string(),
            instance: taken.at,
            path,
            headers: [admitted.tightest, admitted.tightest_tokens]
                .into_iter()
                .flatten()
                .flat_map(|(limit, verdict)| rate_limit_headers(cfg, limit, &verdict))
                .collect(),
            tokens: holds_tokens.then_some(TokenReservation {
                reserved: estimate.tokens,
                prompt_estimate: estimate.prompt,
                grants: token_grants,
            }),
            grants,
            breaker: taken.breaker,
            fallback_from: None,
        }
    }
}

/// Gives back what a routed request holds (its limits' admissions, a half-open trial's
/// place), when it is refused after all (by the limits across replicas).
pub fn release_routed(cfg: &Plan, store: &dyn SharedStore, routed: &Routed, now_ns: u64) {
    let token_grants = routed.tokens.iter().flat_map(|t| &t.grants);
    cfg.limits
        .release(store, routed.grants.iter().chain(token_grants));
    let instance = cfg
        .service(routed.service)
        .and_then(|s| s.instances.get(routed.instance));
    if let (Some(instance), Some(admission)) = (instance, routed.breaker) {
        if let Some(policy) = &instance.breaker {
            breaker::record(
                store,
                &instance.state_key,
                policy,
                admission,
                Outcome::Neutral,
                now_ns,
            );
        }
    }
}
