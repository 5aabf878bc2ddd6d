//! Authentication and authorization, as pure logic (no host calls): the original JAiRouter's
//! API keys (`keys`) and the verified claims of a JSON Web Token (`jwt`), and the refusals both
//! answer with.
//!
//! A request's key is hashed once per distinct salt and looked up by digest, so keys that share
//! a salt cost one SHA-256 together. Logs and metrics name a key by its `key-id`, never by the key.

mod jwt;
mod keys;

pub use jwt::claim_values;
pub use keys::{hash_key, ApiKey, ApiKeys};

use crate::endpoint::ServiceType;
use crate::reply::{ClientError, LocalReply};

/// Why a request is refused: authentication (401) or authorization (403) failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No key in `Authorization: Bearer` nor in the configured header.
    MissingKey {
        header_name: String,
    },
    /// The key matches no configured key.
    InvalidKey,
    /// Only JWTs are accepted (no API keys configured) and the request has no valid one.
    InvalidToken,
    DisabledKey {
        key_id: String,
    },
    ExpiredKey {
        key_id: String,
    },
    /// The key has `allowed-ip-addresses` and the client is not one of them.
    AddressNotAllowed {
        key_id: String,
    },
    ServiceNotPermitted {
        key_id: String,
        service: ServiceType,
    },
    ModelNotPermitted {
        key_id: String,
        model: String,
    },
}

impl AuthError {
    /// The catalogue's entry for it (status, OpenAI type and code).
    pub fn error(&self) -> ClientError {
        match self {
            AuthError::MissingKey { .. } => ClientError::MissingApiKey,
            AuthError::InvalidKey | AuthError::DisabledKey { .. } => ClientError::InvalidApiKey,
            AuthError::InvalidToken => ClientError::InvalidToken,
            AuthError::ExpiredKey { .. } => ClientError::ExpiredApiKey,
            AuthError::AddressNotAllowed { .. } => ClientError::AddressNotAllowed,
            AuthError::ServiceNotPermitted { .. } => ClientError::ServiceNotPermitted,
            AuthError::ModelNotPermitted { .. } => ClientError::ModelNotPermitted,
        }
    }

    pub fn status(&self) -> u16 {
        u16::try_from(self.error().status()).unwrap_or(500)
    }

    /// The OpenAI error `code`.
    pub fn code(&self) -> &'static str {
        self.error().code()
    }

    /// The OpenAI error `type`.
    pub fn error_type(&self) -> &'static str {
        self.error().shape().1
    }

    /// The message for the client: names the key by its id, never shows the key.
    pub fn message(&self) -> String {
        match self {
            AuthError::MissingKey { header_name } => format!(
                "No API key provided: send it as `Authorization: Bearer <key>` or in the \
                 {header_name} header"
            ),
            AuthError::InvalidKey => "Invalid API key".to_string(),
            AuthError::InvalidToken => "No valid token: send a JWT from the identity provider as \
                 `Authorization: Bearer <token>`"
                .to_string(),
            AuthError::DisabledKey { key_id } => format!("API key '{key_id}' is disabled"),
            AuthError::ExpiredKey { key_id } => format!("API key '{key_id}' has expired"),
            AuthError::AddressNotAllowed { key_id } => {
                format!("API key '{key_id}' may not be used from this address")
            }
            AuthError::ServiceNotPermitted { key_id, service } => format!(
                "API key '{key_id}' may not use the {} service",
                service.key()
            ),
            AuthError::ModelNotPermitted { key_id, model } => {
                format!("API key '{key_id}' may not use the model '{model}'")
            }
        }
    }

    /// The key the failure is about, once one was recognized (for logs and metrics).
    pub fn key_id(&self) -> Option<&str> {
        match self {
            AuthError::MissingKey { .. } | AuthError::InvalidKey | AuthError::InvalidToken => None,
            AuthError::DisabledKey { key_id }
            | AuthError::ExpiredKey { key_id }
            | AuthError::AddressNotAllowed { key_id }
            | AuthError::ServiceNotPermitted { key_id, .. }
            | AuthError::ModelNotPermitted { key_id, .. } => Some(key_id),
        }
    }

    /// The OpenAI-shaped error reply, with `WWW-Authenticate: Bearer` on a 401.
    pub fn reply(&self) -> LocalReply {
        LocalReply::error(self.error(), &self.message())
    }
}

/// The key a request presents: `Authorization: Bearer <key>` (scheme in any case), else the
/// configured header's value; both trimmed, an empty one counting as absent. The caller
/// passes the values of `authorization` and of `header_name()`.
pub fn presented_key<'a>(
    authorization: Option<&'a str>,
    api_key_header: Option<&'a str>,
) -> Option<&'a str> {
    let bearer = authorization.and_then(|value| {
        let value = value.trim();
        let (scheme, token) = value.split_once(|c: char| c.is_ascii_whitespace())?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    });
    bearer.or_else(|| {
        api_key_header
            .map(str::trim)
            .filter(|value| !value.is_empty())
    })
}

#[cfg(test)]
mod tests;
