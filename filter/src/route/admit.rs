//! The limits a request meets on its route: what a token budget reserves for it, the limits
//! drawn before the pick (global, service, API key) and an instance's own after it, the
//! OpenAI headers of the tightest and the 429 of a refusal.

use super::{RequestFacts, RouteInputs};
use crate::config::Algorithm;
use crate::limit::bucket::Verdict;
use crate::limit::{openai_duration, retry_after_secs, Admitted, Phase, Refusal, Subject, Unit};
use crate::plan::Plan;
use crate::reply::{ClientError, LocalReply};

/// What a token budget reserves for a request (0 when none covers it).
#[derive(Debug, Clone, Copy)]
pub(super) struct Estimate {
    /// The prompt and the completion asked for.
    pub tokens: u64,
    /// The prompt part: what is charged for the prompt when the response reports no usage.
    pub prompt: u64,
}

/// A token budget reserves the prompt (about 4 bytes a token) and the completion asked for
/// (`max_tokens`, else the budget's estimate).
pub(super) fn estimate(cfg: &Plan, subject: &Subject<'_>, facts: &RequestFacts<'_>) -> Estimate {
    let prompt = facts.body_bytes.unwrap_or(0).div_ceil(4);
    let tokens = match cfg
        .limits
        .completion_estimate(subject.service, subject.api_key)
    {
        Some(completion) => prompt.saturating_add(facts.max_tokens.unwrap_or(completion)),
        None => 0,
    };
    Estimate { tokens, prompt }
}

/// The limits that do not depend on the instance; a refusal is the client's 429.
pub(super) fn before_pick(
    cfg: &Plan,
    host: &RouteInputs<'_>,
    subject: &Subject<'_>,
    tokens: u64,
) -> Result<Admitted, LocalReply> {
    acquire(cfg, host, subject, Phase::BeforePick, tokens)
        .map_err(|refusal| too_many_requests(cfg, &refusal))
}

/// The picked instance's own limits (`subject.instance` set); a refusal sends the request on.
pub(super) fn at_instance(
    cfg: &Plan,
    host: &RouteInputs<'_>,
    subject: &Subject<'_>,
    tokens: u64,
) -> Result<Admitted, Refusal> {
    acquire(cfg, host, subject, Phase::AfterPick, tokens)
}

fn acquire(
    cfg: &Plan,
    host: &RouteInputs<'_>,
    subject: &Subject<'_>,
    phase: Phase,
    tokens: u64,
) -> Result<Admitted, Refusal> {
    cfg.limits.acquire(
        host.store,
        host.refunds,
        subject,
        phase,
        host.now_ns(),
        tokens,
    )
}

/// The OpenAI rate-limit headers for the tightest limit a request met.
pub fn rate_limit_headers(
    cfg: &Plan,
    limit: usize,
    verdict: &Verdict,
) -> Vec<(&'static str, String)> {
    let Some(limit) = cfg.limits.list.get(limit) else {
        return Vec::new();
    };
    let [limit_name, remaining_name, reset_name] = match limit.unit {
        Unit::Requests => [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        Unit::Tokens => [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    };
    vec![
        (limit_name, limit.params.limit().to_string()),
        (remaining_name, verdict.remaining.to_string()),
        (reset_name, openai_duration(verdict.reset_ns)),
    ]
}

/// 429 with an OpenAI `rate_limit_error` naming the limit, and when to come back.
pub fn too_many_requests(cfg: &Plan, refusal: &Refusal) -> LocalReply {
    let Some(limit) = cfg.limits.list.get(refusal.limit) else {
        return LocalReply::error(ClientError::RateLimited, "Rate limit reached.");
    };
    let retry = retry_after_secs(refusal.verdict.retry_after_ns);
    let limited_by = Some(refusal.limit);
    let per = match limit.params.algorithm {
        _ if limit.unit == Unit::Tokens => format!("{} tokens per minute", limit.params.capacity),
        Algorithm::SlidingWindow => format!(
            "{} requests per {} s",
            limit.params.limit(),
            limit.params.window_ns / 1_000_000_000
        ),
        _ => format!(
            "bursts of {} and {} requests per second",
            limit.params.capacity, limit.params.rate
        ),
    };
    let message = format!(
        "Rate limit reached: `{}` ({} {} `{}`) allows {per}. Please retry after {retry} s.",
        limit.name,
        limit.params.algorithm.name(),
        limit.scope.name(),
        refusal.label,
    );
    let mut reply = LocalReply::error(ClientError::RateLimited, &message)
        .with_header("retry-after", &retry.to_string())
        .with_header("x-jairouter-limit", &limit.name);
    reply.limited_by = limited_by;
    for (name, value) in rate_limit_headers(cfg, refusal.limit, &refusal.verdict) {
        reply = reply.with_header(name, &value);
    }
    reply
}
