//! The replies of a request no instance takes: the model or its service is not here, or every
//! instance was passed over or refused (the limits' 429 is `admit::too_many_requests`).

use super::skip::PassedOver;
use super::{admit, RouteInputs};
use crate::endpoint::Endpoint;
use crate::limit::Refusal;
use crate::plan::Plan;
use crate::reply::{ClientError, LocalReply, DEFAULT_RETRY_AFTER_SECS};

/// What to tell the client when no candidate took the request: an instance's own limit that
/// refused it, else why the others were passed over (a backend's pause first, then open
/// breakers, then health), else that none is active.
pub(super) fn reply(
    cfg: &Plan,
    model: &str,
    refused: Option<Refusal>,
    passed_over: &PassedOver,
    host: &RouteInputs<'_>,
) -> LocalReply {
    if let Some(refusal) = refused {
        return admit::too_many_requests(cfg, &refusal);
    }
    if let Some(until_ns) = passed_over.cooling_until {
        return backends_limited(model, until_ns.saturating_sub(host.now_ns()));
    }
    if let Some(open_ns) = passed_over.open_for_ns {
        return all_breakers_open(model, open_ns);
    }
    if passed_over.unhealthy {
        return none_healthy(model);
    }
    no_instance(model)
}

/// 503 when the model has no instance to send the request to.
pub(super) fn no_instance(model: &str) -> LocalReply {
    LocalReply::no_instance(
        &format!("The model `{model}` has no active instance right now."),
        DEFAULT_RETRY_AFTER_SECS,
    )
    .because("no active instance")
}

/// 503 when every instance of the model is behind an open breaker; Retry-After is when the
/// first of them lets a trial request through, at the latest.
fn all_breakers_open(model: &str, open_ns: u64) -> LocalReply {
    let secs = open_ns.div_ceil(1_000_000_000).max(1);
    LocalReply::no_instance(
        &format!(
            "Every instance of the model `{model}` is failing (circuit breakers open); try again later."
        ),
        secs,
    )
    .because("every circuit breaker open")
}

/// 429 when the model's backends asked for a pause (they answered 429 with Retry-After) and
/// nothing else can serve: the client waits as long as they asked.
fn backends_limited(model: &str, wait_ns: u64) -> LocalReply {
    let secs = wait_ns.div_ceil(1_000_000_000).max(1);
    LocalReply::error(
        ClientError::RateLimited,
        &format!("The backends of the model `{model}` are rate limiting; try again in {secs} s."),
    )
    .with_header("retry-after", &secs.to_string())
    .because("every instance pausing after a 429")
}

/// 503 when the health checker has every instance of the model down.
fn none_healthy(model: &str) -> LocalReply {
    LocalReply::no_instance(
        &format!("No instance of the model `{model}` is healthy right now; try again later."),
        DEFAULT_RETRY_AFTER_SECS,
    )
    .because("no healthy instance")
}

/// 404 for a model the endpoint's service does not have (501 when only an adapter that cannot
/// serve the service has it; a hint when another service has it).
pub(super) fn unknown_model(cfg: &Plan, endpoint: Endpoint, model: &str) -> LocalReply {
    let adapter = cfg
        .service(endpoint.service())
        .and_then(|s| s.unsupported.get(model));
    if let Some(adapter) = adapter {
        return LocalReply::error(
            ClientError::NotSupportedByAdapter,
            &format!(
                "The model `{model}` is served through adapter `{adapter}`, which does not support the `{}` service.",
                endpoint.service().key()
            ),
        );
    }
    // Point a client that used the wrong endpoint to the right one.
    let elsewhere = cfg
        .services()
        .find(|s| s.spec.kind != endpoint.service() && s.models.contains_key(model))
        .map(|s| {
            format!(
                " It is a `{}` model: use /v1/{}.",
                s.spec.kind.key(),
                s.spec.kind.primary_endpoint().suffix()
            )
        })
        .unwrap_or_default();
    LocalReply::error(
        ClientError::ModelNotFound,
        &format!(
            "The model `{model}` does not exist for the `{}` service.{elsewhere}",
            endpoint.service().key()
        ),
    )
}

/// 404 for an endpoint whose service is not configured.
pub fn service_missing(endpoint: Endpoint) -> LocalReply {
    LocalReply::error(
        ClientError::ServiceNotConfigured,
        &format!(
            "This gateway has no `{}` service configured, so /v1/{} is not available.",
            endpoint.service().key(),
            endpoint.suffix()
        ),
    )
}
