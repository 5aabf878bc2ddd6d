//! What the filter answers itself: every client error in one catalogue (status, OpenAI `type`
//! and `code`), and the local reply that carries it. The messages are written where the error
//! is found; what a client's SDK keys on (status, type, code) lives only here.

use crate::endpoint::ServiceType;

/// Every error the gateway itself sends a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientError {
    /// Not an OpenAI path.
    UnknownUrl,
    MethodNotAllowed,
    /// A WebSocket handshake on the Responses API: HTTP only (426 makes Codex fall back to it).
    UpgradeRequired,
    /// The endpoint's service type has no configuration.
    ServiceNotConfigured,
    ModelNotFound,
    /// `/v1/responses/{id}`: the gateway stores no Responses.
    ResponseNotStored,
    MissingModel,
    InvalidJson,
    InvalidMultipart,
    /// No model within `gateway.max-body-bytes`.
    RequestTooLarge,
    MissingApiKey,
    InvalidApiKey,
    /// `gateway.jwt` is set and no verified token came with the request.
    InvalidToken,
    ExpiredApiKey,
    AddressNotAllowed,
    ServiceNotPermitted,
    ModelNotPermitted,
    /// A rate limit or token budget of ours, or backends pausing after their own 429s.
    RateLimited,
    /// No instance can take the request (down, breakers open, unhealthy, weight 0).
    NoAvailableInstance,
    /// The limits across replicas could not be checked and `failure-mode-deny` is set.
    RateLimitUnavailable,
    /// The model's adapter cannot serve the endpoint, or cannot express what the request asks.
    NotSupportedByAdapter,
    /// A translated backend answered what its protocol does not allow.
    BadBackendOutput,
}

impl ClientError {
    /// The HTTP status, the OpenAI error `type` and `code`.
    pub fn shape(self) -> (u32, &'static str, &'static str) {
        use ClientError::*;
        const INVALID: &str = "invalid_request_error";
        const AUTH: &str = "authentication_error";
        const PERMISSION: &str = "permission_error";
        match self {
            UnknownUrl => (404, INVALID, "unknown_url"),
            MethodNotAllowed => (405, INVALID, "method_not_allowed"),
            UpgradeRequired => (426, INVALID, "websocket_not_supported"),
            ServiceNotConfigured => (404, INVALID, "service_not_configured"),
            ModelNotFound => (404, INVALID, "model_not_found"),
            ResponseNotStored => (404, INVALID, "response_not_found"),
            MissingModel => (400, INVALID, "missing_model"),
            InvalidJson => (400, INVALID, "invalid_json"),
            InvalidMultipart => (400, INVALID, "invalid_multipart"),
            RequestTooLarge => (413, INVALID, "request_too_large"),
            MissingApiKey => (401, AUTH, "missing_api_key"),
            InvalidApiKey => (401, AUTH, "invalid_api_key"),
            InvalidToken => (401, AUTH, "invalid_token"),
            ExpiredApiKey => (401, AUTH, "expired_api_key"),
            AddressNotAllowed => (403, PERMISSION, "ip_not_allowed"),
            ServiceNotPermitted => (403, PERMISSION, "service_not_permitted"),
            ModelNotPermitted => (403, PERMISSION, "model_not_permitted"),
            RateLimited => (429, "rate_limit_error", "rate_limit_exceeded"),
            NoAvailableInstance => (503, "server_error", "no_available_instance"),
            RateLimitUnavailable => (503, "server_error", "rate_limit_service_unavailable"),
            NotSupportedByAdapter => (501, INVALID, "not_supported_by_adapter"),
            BadBackendOutput => (502, "api_error", "bad_backend_output"),
        }
    }

    pub fn status(self) -> u32 {
        self.shape().0
    }

    pub fn code(self) -> &'static str {
        self.shape().2
    }
}

/// A response the filter sends itself, always an OpenAI-shaped error or a model list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    /// The service the request was for, once known (a metrics label).
    pub service: Option<ServiceType>,
    /// The configured model it asked for, when it named one (a metrics label: never a name the
    /// configuration does not have).
    pub model: Option<String>,
    /// The rate limit that refused it (index into `Limits::list`), for a 429 of ours.
    pub limited_by: Option<usize>,
    /// Why no instance took it, when that is the answer (for the access log).
    pub reason: Option<&'static str>,
}

impl LocalReply {
    pub fn json(status: u32, body: String) -> LocalReply {
        LocalReply {
            status,
            headers: vec![("content-type", "application/json".to_string())],
            body,
            service: None,
            model: None,
            limited_by: None,
            reason: None,
        }
    }

    /// `{"error":{"message","type","param","code"}}`, as the OpenAI API and its SDKs expect.
    pub fn error(error: ClientError, message: &str) -> LocalReply {
        let (status, kind, code) = error.shape();
        let body = serde_json::json!({
            "error": {"message": message, "type": kind, "param": null, "code": code}
        });
        let reply = LocalReply::json(status, body.to_string());
        match status {
            401 => reply.with_header("www-authenticate", "Bearer"),
            _ => reply,
        }
    }

    /// 503 for want of an instance: always with Retry-After, so clients back off instead of
    /// hammering a gateway that has nowhere to send them.
    pub fn no_instance(message: &str, retry_after_secs: u64) -> LocalReply {
        LocalReply::error(ClientError::NoAvailableInstance, message)
            .with_header("retry-after", &retry_after_secs.max(1).to_string())
    }

    /// What the access log says decided the request.
    pub fn because(mut self, reason: &'static str) -> LocalReply {
        self.reason = Some(reason);
        self
    }

    pub fn with_header(mut self, name: &'static str, value: &str) -> LocalReply {
        self.headers.push((name, value.to_string()));
        self
    }
}

/// Seconds a client is told to wait when nothing says better.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 5;

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn an_error_is_openai_shaped_with_its_catalogue_status() {
        let reply = LocalReply::error(ClientError::ModelNotFound, "no such model");
        assert_eq!(reply.status, 404);
        let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap_or_default();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["message"], "no such model");
        assert!(body["error"]["param"].is_null());
    }

    #[test]
    fn authentication_errors_ask_for_a_bearer_token() {
        let reply = LocalReply::error(ClientError::InvalidApiKey, "Invalid API key");
        assert_eq!(reply.status, 401);
        assert!(reply
            .headers
            .iter()
            .any(|(n, v)| *n == "www-authenticate" && v == "Bearer"));
        let forbidden = LocalReply::error(ClientError::ModelNotPermitted, "no");
        assert_eq!(forbidden.status, 403);
        assert!(!forbidden
            .headers
            .iter()
            .any(|(n, _)| *n == "www-authenticate"));
    }

    #[test]
    fn every_want_of_an_instance_says_when_to_come_back() {
        let reply = LocalReply::no_instance("none", 0);
        assert_eq!(reply.status, 503);
        assert!(reply
            .headers
            .iter()
            .any(|(n, v)| *n == "retry-after" && v == "1"));
    }

    #[test]
    fn statuses_are_the_ones_clients_expect() {
        use ClientError::*;
        for (error, status) in [
            (MissingModel, 400),
            (InvalidJson, 400),
            (RequestTooLarge, 413),
            (RateLimited, 429),
            (NoAvailableInstance, 503),
            (MethodNotAllowed, 405),
            (UpgradeRequired, 426),
            (ResponseNotStored, 404),
            (AddressNotAllowed, 403),
            (MissingApiKey, 401),
        ] {
            assert_eq!(error.status(), status, "{error:?}");
        }
    }
}
