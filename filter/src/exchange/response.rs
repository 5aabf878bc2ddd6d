//! The response callbacks: the answer's head and body as they pass (counted against the
//! instance's breaker, read for their usage, translated back when the instance speaks another
//! protocol), and the end of the exchange (`on_log`, `on_drop`), where whatever routing took and
//! nothing has given back yet is.

use super::translation::{Hold, Translation};
use super::{Clock, Exchange, Flow, Stage};
use crate::breaker::{self, Outcome};
use crate::contract::{INSTANCE_HEADER, MODEL_HEADER};
use crate::headers::HeaderPairs;
use crate::host::Host;
use crate::translate::openai::SSE_DONE;
use crate::usage::UsageScanner;

/// The response head, read in one host call.
pub(super) struct ResponseHead {
    headers: HeaderPairs,
    status: Option<u32>,
    content_type: String,
    attempts: Option<u32>,
}

impl ResponseHead {
    fn read(host: &dyn Host) -> ResponseHead {
        let headers = host.response_headers();
        let number = |name: &str| headers.get(name).and_then(|v| v.trim().parse().ok());
        ResponseHead {
            status: number(":status"),
            content_type: headers.get("content-type").unwrap_or_default().to_string(),
            attempts: number("x-envoy-attempt-count"),
            headers,
        }
    }

    /// Adds `additions` to the response (replacing headers of the same names) and drops
    /// `removals`: one call for one header, else one call for the whole map, when it was read
    /// whole.
    fn add(&self, host: &dyn Host, additions: &[(&str, &str)], removals: &[&str]) {
        match (additions, removals) {
            ([], []) => {}
            ([(name, value)], []) => host.set_response_header(name, value),
            _ if !self.headers.is_complete() => {
                for (name, value) in additions {
                    host.set_response_header(name, value);
                }
                for name in removals {
                    host.remove_response_header(name);
                }
            }
            _ => {
                let replaced = |n: &str| {
                    additions.iter().any(|(a, _)| a.eq_ignore_ascii_case(n))
                        || removals.iter().any(|r| r.eq_ignore_ascii_case(n))
                };
                let kept = self.headers.iter().filter(|(n, _)| !replaced(n));
                let all: Vec<(&str, &str)> = kept.chain(additions.iter().copied()).collect();
                host.replace_response_headers(&all);
            }
        }
    }
}

impl Stage {
    /// Lets go of a held answer, whole now: its head is handed out to go with the rewritten body.
    fn release_held(&mut self) -> Option<ResponseHead> {
        match self.take() {
            Stage::Held(upstream, head) => {
                *self = Stage::Upstream(upstream);
                Some(head)
            }
            other => {
                *self = other;
                None
            }
        }
    }
}

impl Exchange {
    pub fn on_response_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Flow {
        let clock = Clock::new(host);
        let head = ResponseHead::read(host);
        if self.measure.status.is_none() {
            self.measure.status = head.status;
        }
        self.count_response_head(host, &clock, &head, end_of_stream);
        let status = head.status.unwrap_or(0);
        let translation = self
            .stage
            .upstream_mut()
            .and_then(|u| u.translation.as_mut());
        let hold = translation.map_or(Hold::Pass, |t| t.on_head(status, end_of_stream));
        self.measure.streamed = head.content_type.contains("event-stream") || hold == Hold::Stream;
        // Token budgets settle from the usage an OpenAI answer (JSON or SSE) reports, and the
        // token metrics count it: read it from every answer of an instance (a translated one
        // once it is OpenAI's).
        let translated_success = hold != Hold::Pass && (200..300).contains(&status);
        let has_usage =
            head.content_type.contains("json") || self.measure.streamed || translated_success;
        if let Some(upstream) = self.stage.upstream_mut().filter(|_| has_usage) {
            upstream.usage = Some(UsageScanner::new());
        }
        if hold == Hold::Whole {
            // Its head goes out with the rewritten body (status, type and length change).
            match self.stage.take() {
                Stage::Upstream(upstream) => {
                    self.stage = Stage::Held(upstream, head);
                    return Flow::Pause;
                }
                other => self.stage = other,
            }
        }
        let mut additions = self.response_additions();
        let removals: &[&str] = if hold == Hold::Stream {
            additions.push(("content-type", "text/event-stream"));
            additions.push(("cache-control", "no-cache"));
            &["content-length"]
        } else {
            &[]
        };
        head.add(host, &additions, removals);
        Flow::Continue
    }

    /// What the response head tells the instance's latency, breaker and cool-down.
    fn count_response_head(
        &mut self,
        host: &dyn Host,
        clock: &Clock<'_>,
        head: &ResponseHead,
        end_of_stream: bool,
    ) {
        let status = self.measure.status;
        let ticket = self.stage.upstream().and_then(|u| u.breaker.as_ref());
        // Whether Envoy needed more than one attempt (`include_attempt_count_in_response`).
        let retried =
            ticket.is_some_and(|t| t.retries > 0) && head.attempts.is_some_and(|count| count > 1);
        self.measure_latency(host, clock, status.is_none_or(|status| status >= 500));
        // 5xx (Envoy's own for connect failures, resets and timeouts included) counts at once;
        // a 4xx is the client's doing; a success counts only once its body has ended whole.
        // An answer after a retry means the chosen instance failed first (the first attempt is
        // always on it; retries go to its peers).
        if status.is_some_and(|s| s < 500) && retried {
            self.count_breaker(host, clock, Outcome::Failure);
        }
        // The instance asks for a pause: out of rotation for as long as it says (capped).
        if status == Some(429) && !retried && answered_by_upstream(host) {
            let secs = head.headers.get("retry-after").and_then(retry_after_secs);
            let ticket = self.stage.upstream().and_then(|u| u.breaker.as_ref());
            if let (Some(ticket), Some(secs)) = (ticket, secs) {
                let until = clock
                    .now()
                    .saturating_add(secs.saturating_mul(1_000_000_000));
                breaker::cool_down(host, &ticket.key, until);
            }
        }
        match status {
            Some(status) if status >= 500 => self.count_breaker(host, clock, Outcome::Failure),
            Some(status) if status >= 400 => self.count_breaker(host, clock, Outcome::Neutral),
            _ if end_of_stream => self.count_breaker(host, clock, Outcome::Success),
            _ => {}
        }
    }

    /// The rate-limit state the request met, the stand-in model, the instance that served.
    fn response_additions(&self) -> Vec<(&str, &str)> {
        let mut additions = Vec::new();
        let upstream = self.stage.upstream();
        if let Some(upstream) = upstream {
            let limits = upstream.response_headers.iter();
            additions.extend(limits.map(|(name, value)| (*name, value.as_str())));
        }
        if let Some(model) = &self.measure.served_model {
            additions.push((MODEL_HEADER, model.as_str()));
        }
        if let Some(upstream) = upstream.filter(|_| self.plan.spec.gateway.instance_header) {
            additions.push((INSTANCE_HEADER, upstream.instance.as_str()));
        }
        additions
    }

    /// Reads the response for its usage as it passes, without holding it back.
    pub fn on_response_body(
        &mut self,
        host: &dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let clock = Clock::new(host);
        self.measure.response_bytes = self
            .measure
            .response_bytes
            .saturating_add(u64::try_from(body_size).unwrap_or(0));
        // Only a stream's first and last bytes are timed (time to first token, time per token).
        if self.measure.streamed {
            if body_size > 0 && self.measure.first_byte_ns == 0 {
                self.measure.first_byte_ns = clock.now();
            }
            if end_of_stream {
                self.measure.last_byte_ns = clock.now();
            }
        }
        match &mut self.stage {
            Stage::Held(..) if !end_of_stream => return Flow::Pause,
            Stage::Held(..) => self.translate_whole(host, &clock, body_size),
            Stage::Upstream(upstream)
                if upstream
                    .translation
                    .as_ref()
                    .is_some_and(Translation::streams) =>
            {
                self.translate_chunk(host, &clock, body_size, end_of_stream);
            }
            stage => {
                if let Some(scanner) = stage.upstream_mut().and_then(|u| u.usage.as_mut()) {
                    if let Some(bytes) = host.response_body(body_size) {
                        scanner.feed(&bytes);
                    }
                }
            }
        }
        if end_of_stream {
            self.settle_tokens(host, &clock);
            self.count_breaker(host, &clock, Outcome::Success);
            self.write_log_summary(host);
            self.measure.ended_ns = clock.read().unwrap_or(0);
        }
        Flow::Continue
    }

    /// A translated stream's chunk, rewritten in place.
    fn translate_chunk(&mut self, host: &dyn Host, clock: &Clock<'_>, body_size: usize, end: bool) {
        let Some(upstream) = self.stage.upstream_mut() else {
            return;
        };
        let Some(translation) = upstream.translation.as_mut() else {
            return;
        };
        let chunk = match body_size {
            0 => Vec::new(),
            _ => host.response_body(body_size).unwrap_or_default(),
        };
        let usage_before = translation.usage_before();
        let (out, broken) = match translation.chunk(&chunk, end) {
            Ok(out) => (out, false),
            Err(out) => (out, true),
        };
        if out != chunk {
            host.replace_response_body(body_size, &out);
        }
        if let Some(scanner) = upstream.usage.as_mut() {
            scanner.feed(if usage_before { &chunk } else { &out });
            // The backend's own counts, when the client asked no usage chunk to carry them: as
            // soon as the client has its stream's end (`[DONE]`), which can be before the
            // backend's stream ends, since a client that has read it may close at once.
            let ended = end || out.ends_with(SSE_DONE);
            if let Some(usage) = ended.then(|| translation.stream_usage()).flatten() {
                let counts = format!(
                    r#"{{"usage":{{"prompt_tokens":{},"completion_tokens":{}}}}}"#,
                    usage.prompt, usage.completion
                );
                scanner.feed(counts.as_bytes());
            }
        }
        if broken {
            self.count_breaker(host, clock, Outcome::Failure);
        }
    }

    /// A held answer, whole now: rewritten, with its head.
    fn translate_whole(&mut self, host: &dyn Host, clock: &Clock<'_>, body_size: usize) {
        let Some(head) = self.stage.release_held() else {
            return;
        };
        let Some(translation) = self.stage.upstream().and_then(|u| u.translation.as_ref()) else {
            return;
        };
        let body = match body_size {
            0 => Vec::new(),
            _ => host.response_body(body_size).unwrap_or_default(),
        };
        let answer = translation.whole(head.status.unwrap_or(0), &body);
        let usage_before = translation.usage_before();
        host.replace_response_body(body_size, &answer.body);
        let status = answer.status.to_string();
        let length = answer.body.len().to_string();
        let mut additions = self.response_additions();
        additions.extend([
            (":status", status.as_str()),
            ("content-type", "application/json"),
            ("content-length", length.as_str()),
        ]);
        head.add(host, &additions, &[]);
        if let Some(upstream) = self.stage.upstream_mut() {
            if !(200..300).contains(&answer.status) {
                upstream.usage = None;
            } else if let Some(scanner) = upstream.usage.as_mut() {
                scanner.feed(if usage_before { &body } else { &answer.body });
            }
        }
        if answer.malformed {
            self.count_breaker(host, clock, Outcome::Failure);
        }
        self.measure.status = Some(answer.status);
    }

    /// Envoy logs every stream when it ends: completed, failed, or reset by either side.
    pub fn on_log(&mut self, host: &dyn Host) {
        let clock = Clock::new(host);
        self.abandon_check(host, &clock);
        self.write_log_summary(host);
        self.record_metrics(&clock);
        self.end_load(host, &clock);
        self.settle_tokens(host, &clock);
        if self.stage.upstream().is_some_and(|u| u.breaker.is_some()) {
            let outcome = unfinished_outcome(host, self.measure.status.is_some());
            self.count_breaker(host, &clock, outcome);
        }
    }

    /// A backstop for `on_log` when the context goes away: the in-flight count must never leak.
    pub fn on_drop(&mut self, host: &dyn Host) {
        let clock = Clock::new(host);
        self.abandon_check(host, &clock);
        self.end_load(host, &clock);
        self.settle_tokens(host, &clock);
        self.count_breaker(host, &clock, Outcome::Neutral);
    }
}

/// How an exchange the breaker has not counted yet ended, read when Envoy logs the stream: a
/// response that began and did not end whole broke midway, the instance's failure unless the
/// client went away; no response at all means the client left first.
fn unfinished_outcome(host: &dyn Host, response_started: bool) -> Outcome {
    if !response_started {
        return Outcome::Neutral;
    }
    let details = host
        .property(&["response", "code_details"])
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_default();
    if details.starts_with("downstream_") {
        Outcome::Neutral
    } else {
        Outcome::Failure
    }
}

/// Whether the response came from the instance (not a local reply, such as Envoy's global
/// rate limit's 429).
fn answered_by_upstream(host: &dyn Host) -> bool {
    host.property(&["response", "code_details"])
        .is_some_and(|b| b == b"via_upstream")
}

/// A 429's Retry-After in seconds (delta form), at most ten minutes.
fn retry_after_secs(value: &str) -> Option<u64> {
    let secs: u64 = value.trim().parse().ok()?;
    Some(secs.min(600))
}
