//! What to do with a request: answer it here, route it now, or read its body for the model.
//! Plain Rust over the compiled configuration; the proxy-wasm binding only carries bytes in and
//! decisions out.

use crate::auth::{ApiKey, AuthError};
use crate::config::{Strategy, MAX_MODEL_NAME_BYTES};
use crate::endpoint::{classify, Endpoint, Route};
use crate::plan::{model_object, models_list_json_where, Plan};
use crate::reply::{ClientError, LocalReply};
use crate::route::{route_model, service_missing, Caller, RequestFacts, RouteInputs, Routed};
use crate::scan::json::JsonModelScanner;
use crate::scan::multipart::{boundary_from_content_type, MultipartModelScanner};
use crate::scan::ScanOutcome;

/// Part headers above this are refused (the model part's headers are a few dozen bytes).
const MAX_PART_HEADER_BYTES: usize = 16 * 1024;

/// The request line and the headers the decision needs.
#[derive(Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub content_type: Option<&'a str>,
    pub model_header: Option<&'a str>,
    /// True when the request has no body.
    pub end_of_stream: bool,
    /// Any other request header, by lower-case name (header-hash reads its configured one).
    pub header: &'a dyn Fn(&str) -> Option<String>,
    /// `content-length`, when the client sent one (a token budget's prompt estimate).
    pub content_length: Option<u64>,
}

/// Body fields a token budget reads for the completion estimate (`max_output_tokens`: the
/// Responses API's).
const MAX_TOKENS_FIELDS: [&str; 3] = ["max_completion_tokens", "max_tokens", "max_output_tokens"];

pub enum HeadDecision {
    Reply(LocalReply),
    Route(Routed),
    ScanBody(Box<BodyScan>),
}

/// The claims of a token Envoy's jwt_authn verified (`gateway.jwt`).
#[derive(Debug, Clone, Default)]
pub struct TokenClaims {
    pub subject: String,
    pub permissions: Vec<String>,
    pub models: Option<Vec<String>>,
}

/// Who calls: a token Envoy verified (`token`, when `gateway.jwt` is set), else the configured
/// API key the request presents (`Authorization: Bearer` or the configured header). Refusals
/// are 401, or 403 for a key used from an address it is not allowed from.
pub fn authenticate(
    cfg: &Plan,
    authorization: Option<&str>,
    api_key_header: Option<&str>,
    client: Option<&str>,
    now_ns: u64,
    token: Option<TokenClaims>,
) -> Result<Caller, LocalReply> {
    if let Some(claims) = token {
        let grants = ApiKey::for_token(&claims.subject, &claims.permissions, claims.models);
        return Ok(Caller::Token(grants));
    }
    let keys = &cfg.api_keys;
    let refuse = |e: AuthError| e.reply().because(e.code());
    if !keys.enabled() {
        return match cfg.spec.gateway.jwt {
            Some(_) => Err(refuse(AuthError::InvalidToken)),
            None => Ok(Caller::Anyone),
        };
    }
    let presented = crate::auth::presented_key(authorization, api_key_header);
    match keys.authenticate(presented, client, now_ns / 1_000_000_000) {
        Ok(key) => Ok(keys.index_of(key).map_or(Caller::Anyone, Caller::Key)),
        Err(e) => Err(refuse(e)),
    }
}

/// What to do with a request, from its head: answer it here, route it by the model header, or
/// read its body for the model (and the fields the pick and the limits want from it).
pub fn on_request_headers(
    cfg: &Plan,
    head: &RequestHead<'_>,
    host: &RouteInputs<'_>,
) -> HeadDecision {
    let endpoint = match model_endpoint(cfg, head, host.caller) {
        Ok(endpoint) => endpoint,
        Err(reply) => return HeadDecision::Reply(reply),
    };
    let query = query_of(head.path);
    let model = head.model_header.map(str::trim).filter(|m| !m.is_empty());
    let hash = HashKey::of(cfg, endpoint, head);
    if let Some(model) = model {
        if hash.body_field.is_none() || head.end_of_stream {
            let facts = RequestFacts {
                hash_key: hash.from_header.as_deref(),
                body_bytes: head.content_length,
                max_tokens: None,
                model_rewritable: false,
            };
            return match route_model(cfg, endpoint, model, query, host, &facts) {
                Ok(routed) => HeadDecision::Route(routed),
                Err(reply) => HeadDecision::Reply(reply),
            };
        }
    }
    if head.end_of_stream {
        return HeadDecision::Reply(missing_model());
    }
    // A token budget reserves what the request asks for: read `max_tokens` too, which means
    // reading the JSON to its end (within max-body-bytes) when it has none.
    let reads_max_tokens = model.is_none()
        && cfg
            .limits
            .completion_estimate(endpoint.service(), host.caller.key_index())
            .is_some();
    let scanner = match Scanner::for_body(head.content_type, hash.body_field, reads_max_tokens) {
        Ok(scanner) => scanner,
        Err(reply) => return HeadDecision::Reply(reply),
    };
    HeadDecision::ScanBody(Box::new(BodyScan {
        endpoint,
        query: query.to_string(),
        scanner,
        limit: cfg.spec.gateway.max_body_bytes,
        model_from_header: model.map(str::to_string),
        hash_key_from_header: hash.from_header,
        hash_field: hash.body_field.map(str::to_string),
        content_length: head.content_length,
    }))
}

/// The endpoint a request asks a model of, or the answer it gets here: the models endpoints,
/// an unknown URL, a method other than POST, a service not configured or not permitted.
fn model_endpoint(
    cfg: &Plan,
    head: &RequestHead<'_>,
    caller: &Caller,
) -> Result<Endpoint, LocalReply> {
    let (route, model_id) = classify(head.path);
    let endpoint = match route {
        Route::Model(endpoint) => endpoint,
        Route::ListModels | Route::RetrieveModel => {
            return Err(models(cfg, head, route, model_id, caller));
        }
        Route::StoredResponse => return Err(no_stored_response(model_id)),
        Route::Unknown => return Err(unknown_url(head)),
    };
    if head.method != "POST" {
        if endpoint == Endpoint::Responses && asks_websocket(head) {
            return Err(websocket_refused());
        }
        return Err(method_not_allowed(head, "POST"));
    }
    if cfg.service(endpoint.service()).is_none() {
        return Err(service_missing(endpoint));
    }
    caller.permits(cfg, endpoint.service(), None)?;
    Ok(endpoint)
}

/// What keys header-hash for a request: the configured header, else a body field (which means
/// reading the body for it, even when the model came in a header).
#[derive(Default)]
struct HashKey<'c> {
    /// The configured header's value, when the request has it.
    from_header: Option<String>,
    /// The body field to read the key from, when the header did not carry it.
    body_field: Option<&'c str>,
}

impl<'c> HashKey<'c> {
    fn of(cfg: &'c Plan, endpoint: Endpoint, head: &RequestHead<'_>) -> HashKey<'c> {
        let Some(lb) = cfg
            .service(endpoint.service())
            .map(|s| &s.spec.load_balance)
            .filter(|lb| lb.strategy == Strategy::HeaderHash)
        else {
            return HashKey::default();
        };
        let from_header = lb
            .hash_header
            .as_deref()
            .and_then(|name| (head.header)(name))
            .filter(|v| !v.is_empty());
        let body_field = match from_header {
            None => lb.hash_field.as_deref(),
            Some(_) => None,
        };
        HashKey {
            from_header,
            body_field,
        }
    }
}

fn is_multipart(content_type: &str) -> bool {
    content_type
        .trim_start()
        .get(..19)
        .is_some_and(|t| t.eq_ignore_ascii_case("multipart/form-data"))
}

fn query_of(path: &str) -> &str {
    path.split_once('?').map(|(_, q)| q).unwrap_or("")
}

enum Scanner {
    Json(JsonModelScanner),
    Multipart(MultipartModelScanner),
}

impl Scanner {
    /// The scanner for the body's content type: it reads the model, the hash field when one
    /// keys the pick, and `max_tokens` when a token budget wants it (JSON only).
    fn for_body(
        content_type: Option<&str>,
        hash_field: Option<&str>,
        reads_max_tokens: bool,
    ) -> Result<Scanner, LocalReply> {
        let Some(ct) = content_type.filter(|ct| is_multipart(ct)) else {
            let mut scanner = JsonModelScanner::new(MAX_MODEL_NAME_BYTES);
            if let Some(field) = hash_field {
                scanner = scanner.with_field(field);
            }
            if reads_max_tokens {
                for field in MAX_TOKENS_FIELDS {
                    scanner = scanner.with_field(field);
                }
            }
            return Ok(Scanner::Json(scanner));
        };
        let Some(boundary) = boundary_from_content_type(ct) else {
            return Err(LocalReply::error(
                ClientError::InvalidMultipart,
                "multipart/form-data request without a valid boundary",
            ));
        };
        let scanner =
            MultipartModelScanner::new(&boundary, MAX_MODEL_NAME_BYTES, MAX_PART_HEADER_BYTES);
        Ok(Scanner::Multipart(match hash_field {
            Some(field) => scanner.with_field(field),
            None => scanner,
        }))
    }
}

/// A request body being read for its model, chunk by chunk.
pub struct BodyScan {
    endpoint: Endpoint,
    query: String,
    scanner: Scanner,
    limit: u64,
    /// The `x-jairouter-model` override, when the body is read only for the hash field.
    model_from_header: Option<String>,
    /// The header-hash key, when the configured header carried it.
    hash_key_from_header: Option<String>,
    /// The body field that keys header-hash, when the header did not.
    hash_field: Option<String>,
    content_length: Option<u64>,
}

pub enum BodyStep {
    /// Keep buffering; call again with the next bytes.
    NeedMore,
    Route(Routed),
    Reply(LocalReply),
}

impl BodyScan {
    /// Where the model's JSON string sits in the body (what a fallback rewrites).
    pub fn model_span(&self) -> Option<(usize, usize)> {
        match &self.scanner {
            Scanner::Json(s) => s.model_span(),
            Scanner::Multipart(_) => None,
        }
    }

    /// How many body bytes may be buffered while looking for the model.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// How much the next read of the body should take: `window` until the model is read, then
    /// the rest of the lookahead for extra fields in one read (no point in smaller ones).
    pub fn next_read(&self, window: usize) -> usize {
        match &self.scanner {
            Scanner::Json(s) => s
                .lookahead_left()
                .filter(|&left| left > 0)
                .unwrap_or(window),
            Scanner::Multipart(_) => window,
        }
    }

    /// Feeds the next bytes; stops being interesting as soon as the outcome is not `NeedMore`.
    pub fn feed(&mut self, chunk: &[u8]) -> ScanOutcome {
        match &mut self.scanner {
            Scanner::Json(s) => s.feed(chunk),
            Scanner::Multipart(s) => s.feed(chunk),
        }
    }

    /// Decides after feeding the bytes available now. `buffered` is the body size Envoy holds,
    /// `end_of_stream` whether that is the whole body.
    pub fn decide(
        &mut self,
        outcome: ScanOutcome,
        buffered: u64,
        end_of_stream: bool,
        cfg: &Plan,
        host: &RouteInputs<'_>,
    ) -> BodyStep {
        let held = match &self.scanner {
            Scanner::Json(s) => s.model().map(str::to_string),
            Scanner::Multipart(_) => None,
        };
        let outcome = match outcome {
            // The model is known and only optional fields were still sought: go without them.
            ScanOutcome::NeedMore if buffered > self.limit && held.is_some() => {
                ScanOutcome::Found(held.unwrap_or_default())
            }
            ScanOutcome::NeedMore if buffered > self.limit => {
                return BodyStep::Reply(too_large(self.limit));
            }
            ScanOutcome::NeedMore if end_of_stream => match &mut self.scanner {
                Scanner::Json(s) => s.finish(),
                Scanner::Multipart(s) => s.finish(),
            },
            other => other,
        };
        let from_body = self.model_from_header.is_none();
        let model = match outcome {
            ScanOutcome::NeedMore => return BodyStep::NeedMore,
            ScanOutcome::Found(model) => self.model_from_header.take().unwrap_or(model),
            ScanOutcome::Absent => match self.model_from_header.take() {
                Some(model) => model,
                None => return BodyStep::Reply(missing_model()),
            },
            ScanOutcome::Invalid(reason) => return BodyStep::Reply(self.invalid(&reason)),
        };
        let hash_field = self.hash_field.as_deref().unwrap_or_default();
        let hash_key = match &self.scanner {
            _ if self.hash_key_from_header.is_some() => self.hash_key_from_header.as_deref(),
            Scanner::Json(s) => s.field(hash_field),
            Scanner::Multipart(s) => s.field(),
        };
        let max_tokens = match &self.scanner {
            Scanner::Json(s) => MAX_TOKENS_FIELDS
                .iter()
                .find_map(|f| s.field(f).and_then(|v| v.parse::<u64>().ok())),
            Scanner::Multipart(_) => None,
        };
        let facts = RequestFacts {
            hash_key,
            body_bytes: self.content_length.or(Some(buffered)),
            max_tokens,
            model_rewritable: from_body && matches!(self.scanner, Scanner::Json(_)),
        };
        match route_model(cfg, self.endpoint, &model, &self.query, host, &facts) {
            Ok(routed) => BodyStep::Route(routed),
            Err(reply) => BodyStep::Reply(reply),
        }
    }

    fn invalid(&self, reason: &str) -> LocalReply {
        let error = match self.scanner {
            Scanner::Json(_) => ClientError::InvalidJson,
            Scanner::Multipart(_) => ClientError::InvalidMultipart,
        };
        LocalReply::error(error, &format!("Invalid request body: {reason}"))
    }
}

/// The model list, as far as the caller may use it (a key limited to some services or models
/// does not learn the others' names).
/// `GET /v1/models` and `GET /v1/models/{id}` (`HEAD` too), as far as the caller may see.
fn models(
    cfg: &Plan,
    head: &RequestHead<'_>,
    route: Route,
    id: &str,
    caller: &Caller,
) -> LocalReply {
    if head.method != "GET" && head.method != "HEAD" {
        return method_not_allowed(head, "GET");
    }
    let grants = caller.grants(cfg);
    if route == Route::ListModels {
        list_models(cfg, grants)
    } else {
        retrieve_model(cfg, id, grants)
    }
}

fn list_models(cfg: &Plan, caller: Option<&ApiKey>) -> LocalReply {
    match caller.filter(|c| !c.is_admin()) {
        None => LocalReply::json(200, cfg.models_json.clone()),
        Some(caller) => LocalReply::json(
            200,
            models_list_json_where(cfg.services(), |kind, model| {
                caller.permits(kind, Some(model)).is_ok()
            }),
        ),
    }
}

fn retrieve_model(cfg: &Plan, id: &str, caller: Option<&ApiKey>) -> LocalReply {
    let permitted = |kind| caller.is_none_or(|c| c.permits(kind, Some(id)).is_ok());
    for service in cfg.services() {
        if service.models.contains_key(id) && permitted(service.spec.kind) {
            return LocalReply::json(200, model_object(id, service.spec.kind).to_string());
        }
    }
    LocalReply::error(
        ClientError::ModelNotFound,
        &format!("The model `{id}` does not exist."),
    )
}

fn unknown_url(head: &RequestHead<'_>) -> LocalReply {
    LocalReply::error(
        ClientError::UnknownUrl,
        &format!(
            "Unknown request URL: {} {}. This gateway serves the OpenAI API under /v1/ and /api/v1/.",
            head.method,
            head.path.split('?').next().unwrap_or_default()
        ),
    )
}

/// `GET`/`DELETE /v1/responses/{id}`, its `input_items` and `cancel`: the gateway translates
/// Responses statelessly and keeps none, so there is nothing to read, list, delete or cancel.
/// (A passthrough backend may store its own, but the path carries no model to route by.)
fn no_stored_response(id: &str) -> LocalReply {
    LocalReply::error(
        ClientError::ResponseNotStored,
        &format!(
            "No response with id '{id}' found: this gateway stores no responses. Send the \
             conversation's earlier items in `input` instead of referring to a stored response."
        ),
    )
}

/// A WebSocket handshake (`GET` with `upgrade: websocket`; Envoy lets it reach the filter on the
/// Responses paths only, see the renderer's `responses_websocket_route`). Read only on this
/// refusal path, so no other request pays the header read.
fn asks_websocket(head: &RequestHead<'_>) -> bool {
    (head.header)("upgrade").is_some_and(|u| u.trim().eq_ignore_ascii_case("websocket"))
}

/// The Responses API's WebSocket transport is not served: 426 is what makes Codex fall back to
/// HTTP (it gives up on other statuses).
fn websocket_refused() -> LocalReply {
    LocalReply::error(
        ClientError::UpgradeRequired,
        "This gateway serves the Responses API over HTTP only: send POST /v1/responses \
         (streamed with \"stream\": true) instead of a WebSocket.",
    )
}

fn missing_model() -> LocalReply {
    LocalReply::error(
        ClientError::MissingModel,
        "You must provide a model parameter.",
    )
}

fn too_large(limit: u64) -> LocalReply {
    LocalReply::error(
ClientError::RequestTooLarge,
        &format!(
            "The model was not found within the first {limit} bytes of the body. Put `model` first, \
             or name it in the x-jairouter-model header."
        ),
    )
}

fn method_not_allowed(head: &RequestHead<'_>, allow: &str) -> LocalReply {
    LocalReply::error(
        ClientError::MethodNotAllowed,
        &format!("{} is not allowed here; use {allow}.", head.method),
    )
    .with_header("allow", allow)
}

#[cfg(test)]
mod tests;
