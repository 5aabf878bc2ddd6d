//! Callers named by a JSON Web Token that Envoy's jwt_authn verified in front of the filter:
//! what its claims grant, read as Envoy hands them over.

use super::keys::service_bit;
use super::ApiKey;
use crate::config::ADMIN_PERMISSION;
use crate::endpoint::ServiceType;
use crate::headers::HeaderPairs;

impl ApiKey {
    /// The caller a verified JWT names (Envoy's jwt_authn checked it in front of us): its
    /// subject, the permissions and models its claims grant. Names that are no service (an
    /// OAuth scope such as `openid`) grant nothing.
    pub fn for_token(subject: &str, permissions: &[String], models: Option<Vec<String>>) -> ApiKey {
        let mut admin = false;
        let mut services = 0u8;
        for name in permissions {
            if name.eq_ignore_ascii_case(ADMIN_PERMISSION) {
                admin = true;
            } else if let Some(kind) = ServiceType::from_config_key(name) {
                services |= service_bit(kind);
            }
        }
        ApiKey {
            id: subject.to_string(),
            enabled: true,
            expires_at: None,
            rate_limit_per_minute: 0,
            daily_request_limit: 0,
            tokens_per_minute: 0,
            daily_token_limit: 0,
            admin,
            services,
            models: models.filter(|m| !m.is_empty()),
            allowed_addresses: None,
        }
    }
}

/// A JWT claim's value as Envoy hands it out of the verified payload: a string as its UTF-8
/// bytes (split on spaces and commas, as OAuth scopes are), a list in proxy-wasm's pairs layout
/// (a u32 count, a pair of u32 lengths per item, then each item and an empty value, each
/// NUL-terminated). Anything else gives nothing.
pub fn claim_values(bytes: &[u8]) -> Vec<String> {
    if let Some(list) = HeaderPairs::parse_exact(bytes) {
        return list.names().map(str::to_string).collect();
    }
    std::str::from_utf8(bytes)
        .ok()
        .filter(|text| !text.contains(|c: char| c.is_control() && !c.is_whitespace()))
        .map(|text| {
            text.split(|c: char| c.is_whitespace() || c == ',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
