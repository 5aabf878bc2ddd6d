//! API-key authentication and authorization: the original JAiRouter's `jairouter.security.api-key`
//! section, as pure logic (no host calls).
//!
//! Keys are stored only as the original's `Base64(salt):Base64(SHA-256(salt ‖ key))` (what
//! `./build.sh hash-key` prints); plaintext `key-value` entries are refused. A request's key is
//! hashed once per distinct salt and looked up by digest, so keys that share a salt cost one
//! SHA-256 together. Logs and metrics name a key by its `key-id`, never by the key.

use crate::config::reader::{error, join, kind, show, ConfigError, Fields};
use crate::endpoint::ServiceType;
use crate::headers::HeaderPairs;
use crate::request::LocalReply;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;

/// The header the original reads the key from, lower-cased as Envoy presents header names.
pub const DEFAULT_HEADER_NAME: &str = "x-api-key";

/// The permission that grants every service and every model.
pub const ADMIN_PERMISSION: &str = "admin";

/// The shortest salt accepted (the original and `hash-key` make 16 bytes).
pub const MIN_SALT_BYTES: usize = 8;

/// The largest quota accepted: beyond any real use, and far from overflowing arithmetic.
const MAX_QUOTA: u64 = 1_000_000_000_000;

type Result<T> = std::result::Result<T, ConfigError>;

/// The `jairouter.security.api-key` section.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    enabled: bool,
    header_name: String,
    keys: Vec<ApiKey>,
    /// One entry per distinct salt, in the order the salts first appear.
    salts: Vec<SaltGroup>,
}

/// The keys hashed with one salt: digest → index into `keys`.
#[derive(Debug, Clone)]
struct SaltGroup {
    salt: Vec<u8>,
    digests: HashMap<[u8; 32], usize>,
}

/// One configured key. The key itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// `key-id`: what logs and metrics show.
    pub id: String,
    /// A disabled key authenticates as invalid (401).
    pub enabled: bool,
    /// Unix seconds; the key is refused once the clock is past this.
    pub expires_at: Option<u64>,
    /// Requests per minute (0: no quota).
    pub rate_limit_per_minute: u64,
    /// Requests per day (0: no quota).
    pub daily_request_limit: u64,
    /// Model tokens per minute (0: no quota).
    pub tokens_per_minute: u64,
    /// Model tokens per day (0: no quota).
    pub daily_token_limit: u64,
    admin: bool,
    /// Bit `ServiceType::index()` set for each permitted service.
    services: u8,
    /// `None`: every model of the permitted services.
    models: Option<Vec<String>>,
    /// `None`: any client address.
    allowed_addresses: Option<Vec<IpAddr>>,
}

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

impl Default for ApiKeys {
    /// No section: authentication off.
    fn default() -> Self {
        ApiKeys {
            enabled: false,
            header_name: DEFAULT_HEADER_NAME.to_string(),
            keys: Vec::new(),
            salts: Vec::new(),
        }
    }
}

impl ApiKeys {
    /// Reads the section at `path` (`jairouter.security.api-key`); every refusal names its key.
    pub fn parse(path: &str, value: &Value) -> Result<ApiKeys> {
        let mut f = Fields::new(path, value)?;
        let enabled = f.boolean("enabled", true)?;
        let header_name = match f.string("header-name")? {
            None => DEFAULT_HEADER_NAME.to_string(),
            Some(name) => {
                let name = name.trim();
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    return Err(error(
                        &f.child("header-name"),
                        format!("must be an HTTP header name such as X-API-Key (got {name:?})"),
                    ));
                }
                name.to_ascii_lowercase()
            }
        };
        // The original's key-generation and cache settings: nothing to do here.
        f.take("default-expiration-days");
        f.take("cache-expiration-seconds");
        let keys_path = f.child("keys");
        let items: &[Value] = match f.take("keys") {
            None => &[],
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(error(
                    &keys_path,
                    format!("must be a list (got {})", kind(other)),
                ))
            }
        };
        f.finish()?;

        let mut keys: Vec<ApiKey> = Vec::with_capacity(items.len());
        let mut salts: Vec<SaltGroup> = Vec::new();
        for (at, item) in items.iter().enumerate() {
            let item_path = format!("{keys_path}[{at}]");
            let (key, salt, digest) = parse_key(&item_path, item)?;
            if let Some(other) = keys.iter().position(|k| k.id == key.id) {
                return Err(error(
                    &join(&item_path, "key-id"),
                    format!("{:?} is also the key-id of keys[{other}]", key.id),
                ));
            }
            let group = match salts.iter().position(|g| g.salt == salt) {
                Some(g) => salts.get_mut(g),
                None => {
                    salts.push(SaltGroup {
                        salt,
                        digests: HashMap::new(),
                    });
                    salts.last_mut()
                }
            };
            if let Some(group) = group {
                if let Some(other) = group.digests.insert(digest, at) {
                    let other_id = keys.get(other).map(|k| k.id.as_str()).unwrap_or_default();
                    return Err(error(
                        &join(&item_path, "key-hash"),
                        format!(
                            "the same key as keys[{other}] ({other_id:?}): give each key its own"
                        ),
                    ));
                }
            }
            keys.push(key);
        }
        Ok(ApiKeys {
            enabled,
            header_name,
            keys,
            salts,
        })
    }

    /// Whether requests must present a key (`enabled`, default true).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The configured key header, lower-case (`x-api-key` unless `header-name` says otherwise).
    pub fn header_name(&self) -> &str {
        &self.header_name
    }

    pub fn keys(&self) -> &[ApiKey] {
        &self.keys
    }

    /// The request headers that carry client credentials: remove them before going upstream.
    pub fn credential_headers(&self) -> [&str; 2] {
        ["authorization", &self.header_name]
    }

    /// The index of a key `authenticate` returned (what limits and the binding keep).
    pub fn index_of(&self, key: &ApiKey) -> Option<usize> {
        self.keys.iter().position(|k| std::ptr::eq(k, key))
    }

    /// Whether `authenticate` needs the client address (some enabled key has an allow-list).
    pub fn uses_client_address(&self) -> bool {
        self.keys
            .iter()
            .any(|k| k.enabled && k.allowed_addresses.is_some())
    }

    /// The configured key `presented` is, if it may be used now from `client_address` (an Envoy
    /// address, "10.0.0.1:5678" or "[::1]:5678", or a bare IP).
    pub fn authenticate(
        &self,
        presented: Option<&str>,
        client_address: Option<&str>,
        now_unix_s: u64,
    ) -> std::result::Result<&ApiKey, AuthError> {
        let presented = presented.ok_or_else(|| AuthError::MissingKey {
            header_name: self.header_name.clone(),
        })?;
        let key = self
            .salts
            .iter()
            .find_map(|group| {
                let digest = salted_sha256(&group.salt, presented.as_bytes());
                group.digests.get(&digest).copied()
            })
            .and_then(|at| self.keys.get(at))
            .ok_or(AuthError::InvalidKey)?;
        if !key.enabled {
            return Err(AuthError::DisabledKey {
                key_id: key.id.clone(),
            });
        }
        if key.expires_at.is_some_and(|at| now_unix_s > at) {
            return Err(AuthError::ExpiredKey {
                key_id: key.id.clone(),
            });
        }
        if let Some(allowed) = &key.allowed_addresses {
            let client = client_address
                .map(crate::request::client_ip)
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .map(|ip| ip.to_canonical());
            if !client.is_some_and(|ip| allowed.contains(&ip)) {
                return Err(AuthError::AddressNotAllowed {
                    key_id: key.id.clone(),
                });
            }
        }
        Ok(key)
    }
}

impl ApiKey {
    /// `admin` among the permissions: every service, every model.
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// The services the key may use (all of them for an admin key).
    pub fn services(&self) -> impl Iterator<Item = ServiceType> + '_ {
        ServiceType::ALL
            .into_iter()
            .filter(|s| self.admin || self.services & service_bit(*s) != 0)
    }

    /// The models the key is limited to; `None` when any model of its services is allowed.
    pub fn models(&self) -> Option<&[String]> {
        if self.admin {
            return None;
        }
        self.models.as_deref()
    }

    /// Whether the key may use `model` of service `kind`; `model: None` (not known yet) checks
    /// the service only.
    pub fn permits(
        &self,
        kind: ServiceType,
        model: Option<&str>,
    ) -> std::result::Result<(), AuthError> {
        if self.admin {
            return Ok(());
        }
        if self.services & service_bit(kind) == 0 {
            return Err(AuthError::ServiceNotPermitted {
                key_id: self.id.clone(),
                service: kind,
            });
        }
        if let (Some(model), Some(allowed)) = (model, &self.models) {
            if !allowed.iter().any(|m| m == model) {
                return Err(AuthError::ModelNotPermitted {
                    key_id: self.id.clone(),
                    model: model.to_string(),
                });
            }
        }
        Ok(())
    }
}

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

impl AuthError {
    pub fn status(&self) -> u16 {
        match self {
            AuthError::MissingKey { .. }
            | AuthError::InvalidKey
            | AuthError::InvalidToken
            | AuthError::DisabledKey { .. }
            | AuthError::ExpiredKey { .. } => 401,
            AuthError::AddressNotAllowed { .. }
            | AuthError::ServiceNotPermitted { .. }
            | AuthError::ModelNotPermitted { .. } => 403,
        }
    }

    /// The OpenAI error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingKey { .. } => "missing_api_key",
            AuthError::InvalidKey | AuthError::DisabledKey { .. } => "invalid_api_key",
            AuthError::InvalidToken => "invalid_token",
            AuthError::ExpiredKey { .. } => "expired_api_key",
            AuthError::AddressNotAllowed { .. } => "ip_not_allowed",
            AuthError::ServiceNotPermitted { .. } => "service_not_permitted",
            AuthError::ModelNotPermitted { .. } => "model_not_permitted",
        }
    }

    /// The OpenAI error `type`.
    pub fn error_type(&self) -> &'static str {
        if self.status() == 401 {
            "authentication_error"
        } else {
            "permission_error"
        }
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
        let mut reply = LocalReply::error(
            u32::from(self.status()),
            self.error_type(),
            self.code(),
            &self.message(),
        );
        if self.status() == 401 {
            reply
                .headers
                .push(("www-authenticate", "Bearer".to_string()));
        }
        reply
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

/// `Base64(salt):Base64(SHA-256(salt ‖ key))`, the original's `key-hash` format.
pub fn hash_key(salt: &[u8], key: &str) -> String {
    format!(
        "{}:{}",
        base64_encode(salt),
        base64_encode(&salted_sha256(salt, key.as_bytes()))
    )
}

fn salted_sha256(salt: &[u8], key: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(key);
    hasher.finalize().into()
}

fn service_bit(kind: ServiceType) -> u8 {
    1 << kind.index()
}

/// One entry of `keys`, with its salt and digest.
fn parse_key(path: &str, value: &Value) -> Result<(ApiKey, Vec<u8>, [u8; 32])> {
    let mut f = Fields::new(path, value)?;
    if f.take("key-value").is_some() {
        return Err(error(
            &f.child("key-value"),
            "plaintext keys are not accepted: store `key-hash` instead, made by \
             `./build.sh hash-key` (or the original's ApiKeyHashUtil)",
        ));
    }
    let id_path = f.child("key-id");
    let id = f
        .string("key-id")?
        .ok_or_else(|| error(&id_path, "is required (the name logs and metrics show)"))?;
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(error(
            &id_path,
            format!(
                "must be 1 to 64 of A-Z a-z 0-9 . _ - (got {})",
                show(&Value::from(id))
            ),
        ));
    }
    let hash_path = f.child("key-hash");
    let hash = f.string("key-hash")?.ok_or_else(|| {
        error(
            &hash_path,
            "is required: Base64(salt):Base64(SHA-256(salt+key)), made by `./build.sh hash-key`",
        )
    })?;
    let (salt, digest) = parse_key_hash(hash).map_err(|why| {
        error(
            &hash_path,
            format!("must be Base64(salt):Base64(SHA-256(salt+key)) ({why})"),
        )
    })?;
    let enabled = f.boolean("enabled", true)?;

    let permissions_path = f.child("permissions");
    let permissions = match f.take("permissions") {
        Some(v) => string_list(&permissions_path, v)?,
        None => Vec::new(),
    };
    if permissions.is_empty() {
        return Err(error(
            &permissions_path,
            "is required: the services the key may use (chat, embedding, ...) or admin",
        ));
    }
    let mut admin = false;
    let mut services = 0u8;
    for (name, name_path) in &permissions {
        if name.eq_ignore_ascii_case(ADMIN_PERMISSION) {
            admin = true;
        } else if let Some(kind) = ServiceType::from_config_key(name) {
            services |= service_bit(kind);
        } else {
            let known: Vec<&str> = ServiceType::ALL.iter().map(|s| s.key()).collect();
            return Err(error(
                name_path,
                format!(
                    "must be a service ({}) or {ADMIN_PERMISSION} (got {name:?})",
                    known.join(", ")
                ),
            ));
        }
    }

    let models_path = f.child("models");
    let models = match f.take("models") {
        None => None,
        Some(v) => {
            let list = string_list(&models_path, v)?;
            if list.is_empty() {
                return Err(error(
                    &models_path,
                    "lists no model: leave it out to allow every model",
                ));
            }
            if admin {
                return Err(error(
                    &models_path,
                    "cannot narrow an admin key (admin allows every model): drop one of them",
                ));
            }
            Some(list.into_iter().map(|(m, _)| m.to_string()).collect())
        }
    };

    let expires_path = f.child("expires-at");
    let expires_at = match f.string("expires-at")? {
        None => None,
        Some(text) => Some(parse_time(text).ok_or_else(|| {
            error(
                &expires_path,
                format!(
                    "must be a UTC time like 2027-01-31T00:00:00Z, 2027-01-31 00:00:00 or a date \
                     2027-01-31 (got {text:?})"
                ),
            )
        })?),
    };

    let addresses_path = f.child("allowed-ip-addresses");
    let allowed_addresses = match f.take("allowed-ip-addresses") {
        None => None,
        Some(v) => {
            let mut addresses = Vec::new();
            for (text, item_path) in string_list(&addresses_path, v)? {
                let bare = text
                    .strip_prefix('[')
                    .and_then(|t| t.strip_suffix(']'))
                    .unwrap_or(text);
                let ip: IpAddr = bare.parse().map_err(|_| {
                    error(
                        &item_path,
                        format!("must be an IP address such as 10.0.0.7 or ::1; ranges are not supported (got {text:?})"),
                    )
                })?;
                addresses.push(ip.to_canonical());
            }
            // An empty list means no restriction, as in the original.
            (!addresses.is_empty()).then_some(addresses)
        }
    };

    let rate_limit_per_minute = f.integer("rate-limit-per-minute", 0, 0, MAX_QUOTA)?;
    let daily_request_limit = f.integer("daily-request-limit", 0, 0, MAX_QUOTA)?;
    let tokens_per_minute = f.integer("tokens-per-minute", 0, 0, MAX_QUOTA)?;
    let daily_token_limit = f.integer("daily-token-limit", 0, 0, MAX_QUOTA)?;

    // The original's bookkeeping: accepted, not used.
    for ignored in [
        "description",
        "created-at",
        "created-by",
        "creator-ip-address",
        "metadata",
        "key-prefix",
        "quota-alert-threshold",
        "rotation-period-days",
        "last-rotated-at",
        "usage",
        "expired",
    ] {
        f.take(ignored);
    }
    f.finish()?;

    let key = ApiKey {
        id: id.to_string(),
        enabled,
        expires_at,
        rate_limit_per_minute,
        daily_request_limit,
        tokens_per_minute,
        daily_token_limit,
        admin,
        services,
        models,
        allowed_addresses,
    };
    Ok((key, salt, digest))
}

/// A list of strings, or the original's comma-separated string; items trimmed, each with the
/// path to name in errors.
fn string_list<'a>(path: &str, value: &'a Value) -> Result<Vec<(&'a str, String)>> {
    match value {
        Value::String(text) => Ok(text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| (s, path.to_string()))
            .collect()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(at, item)| {
                let item_path = format!("{path}[{at}]");
                match item.as_str().map(str::trim) {
                    Some(s) if !s.is_empty() => Ok((s, item_path)),
                    _ => Err(error(
                        &item_path,
                        format!("must be a non-empty string (got {})", show(item)),
                    )),
                }
            })
            .collect(),
        other => Err(error(
            path,
            format!("must be a list of strings (got {})", kind(other)),
        )),
    }
}

/// `salt:hash` → (salt, digest), or why not.
fn parse_key_hash(text: &str) -> std::result::Result<(Vec<u8>, [u8; 32]), String> {
    let (salt, hash) = text
        .trim()
        .split_once(':')
        .ok_or("no ':' between the salt and the hash")?;
    let salt = base64_decode(salt).ok_or("the salt is not Base64")?;
    if salt.len() < MIN_SALT_BYTES {
        return Err(format!(
            "the salt is {} bytes, at least {MIN_SALT_BYTES} needed",
            salt.len()
        ));
    }
    let hash = base64_decode(hash).ok_or("the hash is not Base64")?;
    let digest: [u8; 32] = hash
        .as_slice()
        .try_into()
        .map_err(|_| format!("the hash is {} bytes, a SHA-256 is 32", hash.len()))?;
    Ok((salt, digest))
}

/// RFC 7230 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard Base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let triple = byte(0) << 16 | byte(1) << 8 | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                let sextet = (triple >> (18 - 6 * i)) & 63;
                let symbol = BASE64_ALPHABET
                    .get(sextet as usize)
                    .copied()
                    .unwrap_or(b'=');
                out.push(char::from(symbol));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard Base64; padding optional (Java's decoder, which the original uses, accepts both).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let data = text.trim_end_matches('=');
    let padding = text.len() - data.len();
    if padding > 2 || (padding > 0 && !text.len().is_multiple_of(4)) || data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    for chunk in data.as_bytes().chunks(4) {
        let mut acc: u32 = 0;
        for &c in chunk {
            acc = acc << 6 | base64_value(c)?;
        }
        // Left-align a short final group to 24 bits.
        acc <<= 6 * (4 - chunk.len() as u32);
        let bytes = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        out.extend(bytes.iter().take(chunk.len() - 1));
    }
    Some(out)
}

fn base64_value(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// `2027-01-31`, `2027-01-31T00:00:00`, `2027-01-31 00:00:00` (the original's format),
/// optionally with `.fraction` and `Z` or `±HH:MM`, as unix seconds; no zone means UTC and a date
/// alone means the start of that day.
pub fn parse_time(text: &str) -> Option<u64> {
    let mut c = Cursor {
        bytes: text.trim().as_bytes(),
        at: 0,
    };
    let year = c.digits(4)?;
    c.expect(b'-')?;
    let month = c.digits(2)?;
    c.expect(b'-')?;
    let day = c.digits(2)?;
    if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) {
        return None;
    }
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let mut seconds: i64 = 0;
    if let Some(sep) = c.next() {
        if !matches!(sep, b'T' | b't' | b' ') {
            return None;
        }
        let hour = c.digits(2)?;
        c.expect(b':')?;
        let minute = c.digits(2)?;
        let second = if c.eat(b':') { c.digits(2)? } else { 0 };
        if hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        if c.eat(b'.') || c.eat(b',') {
            if !c.peek().is_some_and(|b| b.is_ascii_digit()) {
                return None;
            }
            while c.peek().is_some_and(|b| b.is_ascii_digit()) {
                c.at += 1;
            }
        }
        seconds = hour * 3600 + minute * 60 + second;
        match c.next() {
            None => {}
            Some(b'Z' | b'z') => {}
            Some(sign @ (b'+' | b'-')) => {
                let hours = c.digits(2)?;
                c.eat(b':');
                let minutes = c.digits(2)?;
                if hours > 23 || minutes > 59 {
                    return None;
                }
                let offset = hours * 3600 + minutes * 60;
                // Local = UTC + offset.
                seconds -= if sign == b'+' { offset } else { -offset };
            }
            Some(_) => return None,
        }
    }
    if c.peek().is_some() {
        return None;
    }
    let unix = days_from_civil(year, month, day) * 86_400 + seconds;
    u64::try_from(unix).ok()
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn eat(&mut self, wanted: u8) -> bool {
        let found = self.peek() == Some(wanted);
        if found {
            self.at += 1;
        }
        found
    }

    fn expect(&mut self, wanted: u8) -> Option<()> {
        self.eat(wanted).then_some(())
    }

    /// Exactly `n` decimal digits.
    fn digits(&mut self, n: usize) -> Option<i64> {
        let mut value: i64 = 0;
        for _ in 0..n {
            let b = self.next().filter(u8::is_ascii_digit)?;
            value = value * 10 + i64::from(b - b'0');
        }
        Some(value)
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400; // [0, 399]
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + day - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const PATH: &str = "jairouter.security.api-key";
    /// Python: salt = b"jairouter-test-salt"; key = "sk-test-0123456789abcdef";
    /// base64(salt) + ":" + base64(hashlib.sha256(salt + key.encode()).digest())
    const PY_KEY: &str = "sk-test-0123456789abcdef";
    const PY_HASH: &str =
        "amFpcm91dGVyLXRlc3Qtc2FsdA==:tKTAAh4diLiavEy1OqGzxYuwuTGpHDWlwtlCaLhyIug=";
    /// Same with salt = bytes(range(16)) and key "sk-other".
    const PY_HASH_2: &str = "AAECAwQFBgcICQoLDA0ODw==:sa4gYuhJK4q61rnyE//ZA1qX3uRJHYwKS+96Zq5aMLs=";
    const SALT: &[u8] = b"sixteen-byte-slt";
    const NOW: u64 = 1_800_000_000; // 2027-01-15

    fn keys(list: Value) -> ApiKeys {
        ApiKeys::parse(PATH, &json!({ "keys": list })).unwrap()
    }

    fn refused(section: Value) -> String {
        ApiKeys::parse(PATH, &section).unwrap_err().to_string()
    }

    fn refused_key(key: Value) -> String {
        refused(json!({ "keys": [key] }))
    }

    fn key(id: &str, secret: &str, permissions: Value) -> Value {
        json!({"key-id": id, "key-hash": hash_key(SALT, secret), "permissions": permissions})
    }

    fn failure(
        keys: &ApiKeys,
        presented: Option<&str>,
        client: Option<&str>,
    ) -> (u16, &'static str) {
        let e = keys.authenticate(presented, client, NOW).unwrap_err();
        (e.status(), e.code())
    }

    #[test]
    fn python_hash_authenticates() {
        let k = keys(json!([
            {"key-id": "py", "key-hash": PY_HASH, "permissions": ["chat"]},
            {"key-id": "py2", "key-hash": PY_HASH_2, "permissions": "chat"}
        ]));
        assert_eq!(k.authenticate(Some(PY_KEY), None, NOW).unwrap().id, "py");
        assert_eq!(
            k.authenticate(Some("sk-other"), None, NOW).unwrap().id,
            "py2"
        );
        assert_eq!(hash_key(b"jairouter-test-salt", PY_KEY), PY_HASH);
        assert_eq!(
            failure(&k, Some("sk-test-0123456789abcdeF"), None),
            (401, "invalid_api_key")
        );
    }

    #[test]
    fn defaults() {
        let k = ApiKeys::parse(PATH, &json!({})).unwrap();
        assert!(k.enabled());
        assert_eq!(k.header_name(), "x-api-key");
        assert!(k.keys().is_empty());
        assert_eq!(k.credential_headers(), ["authorization", "x-api-key"]);
        // Enabled with no keys: every request is refused.
        assert_eq!(
            failure(&k, Some("anything"), None),
            (401, "invalid_api_key")
        );
        assert!(!ApiKeys::default().enabled());

        let k = ApiKeys::parse(
            PATH,
            &json!({"enabled": false, "headerName": "X-Gateway-Key",
            "default-expiration-days": 365, "cacheExpirationSeconds": 3600,
            "keys": [key("a", "k", json!(["chat"]))]}),
        )
        .unwrap();
        assert!(!k.enabled());
        assert_eq!(k.header_name(), "x-gateway-key");
        assert_eq!(k.credential_headers(), ["authorization", "x-gateway-key"]);
        let a = &k.keys()[0];
        assert!(a.enabled);
        assert_eq!(
            (
                a.rate_limit_per_minute,
                a.daily_request_limit,
                a.tokens_per_minute,
                a.daily_token_limit
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(a.expires_at, None);
        assert!(!k.uses_client_address());
    }

    #[test]
    fn disabled_section_still_validates_keys() {
        let e =
            refused(json!({"enabled": false, "keys": [{"key-id": "a", "permissions": ["chat"]}]}));
        assert!(
            e.starts_with("jairouter.security.api-key.keys[0].key-hash: is required"),
            "{e}"
        );
    }

    #[test]
    fn presented_key_bearer_first_then_header() {
        let p = presented_key;
        assert_eq!(p(Some("Bearer sk-1"), Some("sk-2")), Some("sk-1"));
        assert_eq!(p(Some("  bearer \t sk-1  "), None), Some("sk-1"));
        assert_eq!(p(Some("BEARER sk-1"), None), Some("sk-1"));
        assert_eq!(p(Some("Basic dXNlcjpwYXNz"), Some(" sk-2 ")), Some("sk-2"));
        assert_eq!(p(Some("Bearer "), Some("sk-2")), Some("sk-2"));
        assert_eq!(p(Some("Bearer"), None), None);
        assert_eq!(p(None, Some("   ")), None);
        assert_eq!(p(None, None), None);
    }

    #[test]
    fn bearer_and_header_both_authenticate() {
        let k = keys(json!([key("a", "sk-alpha", json!(["chat"]))]));
        for (auth, header) in [(Some("Bearer sk-alpha"), None), (None, Some("sk-alpha"))] {
            let presented = presented_key(auth, header);
            assert_eq!(k.authenticate(presented, None, NOW).unwrap().id, "a");
        }
    }

    #[test]
    fn failures_have_their_status_and_code() {
        let k = keys(json!([
            key("good", "sk-good", json!(["chat"])),
            {"key-id": "off", "key-hash": hash_key(SALT, "sk-off"), "permissions": ["chat"], "enabled": false},
            {"key-id": "old", "key-hash": hash_key(SALT, "sk-old"), "permissions": ["chat"],
             "expires-at": "2027-01-01T00:00:00"},
            {"key-id": "new", "key-hash": hash_key(SALT, "sk-new"), "permissions": ["chat"],
             "expires-at": "2027-01-31"},
            {"key-id": "office", "key-hash": hash_key(SALT, "sk-ip"), "permissions": ["chat"],
             "allowed-ip-addresses": ["10.0.0.7", "::1"]}
        ]));
        assert!(k.uses_client_address());
        assert_eq!(failure(&k, None, None), (401, "missing_api_key"));
        assert_eq!(failure(&k, Some("sk-bad"), None), (401, "invalid_api_key"));
        assert_eq!(failure(&k, Some("sk-off"), None), (401, "invalid_api_key"));
        assert_eq!(failure(&k, Some("sk-old"), None), (401, "expired_api_key"));
        assert_eq!(k.authenticate(Some("sk-new"), None, NOW).unwrap().id, "new");
        assert_eq!(
            failure(&k, Some("sk-ip"), Some("10.0.0.8:5000")),
            (403, "ip_not_allowed")
        );
        assert_eq!(failure(&k, Some("sk-ip"), None), (403, "ip_not_allowed"));
        assert_eq!(
            k.authenticate(Some("sk-ip"), Some("10.0.0.7:5000"), NOW)
                .unwrap()
                .id,
            "office"
        );
        assert_eq!(
            k.authenticate(Some("sk-ip"), Some("10.0.0.7"), NOW)
                .unwrap()
                .id,
            "office"
        );
        assert_eq!(
            k.authenticate(Some("sk-ip"), Some("[::1]:80"), NOW)
                .unwrap()
                .id,
            "office"
        );
        assert_eq!(
            k.authenticate(Some("sk-ip"), Some("[::ffff:10.0.0.7]:80"), NOW)
                .unwrap()
                .id,
            "office"
        );
        assert_eq!(
            k.authenticate(Some("sk-good"), None, NOW).unwrap().id,
            "good"
        );

        let e = k.authenticate(Some("sk-off"), None, NOW).unwrap_err();
        assert_eq!(e.error_type(), "authentication_error");
        assert_eq!(e.message(), "API key 'off' is disabled");
        assert_eq!(e.key_id(), Some("off"));
        let e = k.authenticate(Some("sk-bad"), None, NOW).unwrap_err();
        assert!(!e.message().contains("sk-bad"));
        assert_eq!(e.key_id(), None);
        let reply = e.reply();
        assert_eq!(reply.status, 401);
        assert!(reply
            .headers
            .contains(&("www-authenticate", "Bearer".to_string())));
        let body: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert_eq!(body["error"]["type"], "authentication_error");
        let e = k.authenticate(None, None, NOW).unwrap_err();
        assert!(e.message().contains("x-api-key"), "{}", e.message());
        let e = k
            .authenticate(Some("sk-ip"), Some("10.9.9.9"), NOW)
            .unwrap_err();
        assert_eq!(e.error_type(), "permission_error");
        assert!(!e
            .reply()
            .headers
            .iter()
            .any(|(n, _)| *n == "www-authenticate"));
    }

    #[test]
    fn expiry_boundary() {
        let k = keys(
            json!([{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": "chat",
            "expiresAt": "2027-01-31T00:00:00Z"}]),
        );
        assert!(k.authenticate(Some("k"), None, 1_801_353_600).is_ok());
        assert!(k.authenticate(Some("k"), None, 1_801_353_601).is_err());
    }

    #[test]
    fn permissions_by_service_and_model() {
        let k = keys(json!([
            key("chat-only", "sk-c", json!(["chat"])),
            key("root", "sk-r", json!(["admin"])),
            key("multi", "sk-m", json!("Chat, embeddings")),
            {"key-id": "small", "key-hash": hash_key(SALT, "sk-s"), "permissions": ["chat", "rerank"],
             "models": ["qwen2.5:7b", "bge-reranker"]}
        ]));
        let get = |secret| k.authenticate(Some(secret), None, NOW).unwrap();

        let chat = get("sk-c");
        assert!(chat.permits(ServiceType::Chat, Some("any")).is_ok());
        let e = chat.permits(ServiceType::Embedding, None).unwrap_err();
        assert_eq!(
            (e.status(), e.code(), e.error_type()),
            (403, "service_not_permitted", "permission_error")
        );
        assert_eq!(
            e.message(),
            "API key 'chat-only' may not use the embedding service"
        );
        assert_eq!(chat.services().collect::<Vec<_>>(), vec![ServiceType::Chat]);
        assert!(!chat.is_admin());

        let root = get("sk-r");
        assert!(root.is_admin());
        for s in ServiceType::ALL {
            assert!(root.permits(s, Some("whatever")).is_ok());
        }
        assert_eq!(root.services().count(), ServiceType::ALL.len());
        assert_eq!(root.models(), None);

        let multi = get("sk-m");
        assert!(multi.permits(ServiceType::Chat, None).is_ok());
        assert!(multi.permits(ServiceType::Embedding, None).is_ok());
        assert!(multi.permits(ServiceType::Tts, None).is_err());

        let small = get("sk-s");
        assert!(small.permits(ServiceType::Chat, None).is_ok());
        assert!(small.permits(ServiceType::Chat, Some("qwen2.5:7b")).is_ok());
        assert!(small
            .permits(ServiceType::Rerank, Some("bge-reranker"))
            .is_ok());
        let e = small
            .permits(ServiceType::Chat, Some("gpt-4o"))
            .unwrap_err();
        assert_eq!((e.status(), e.code()), (403, "model_not_permitted"));
        assert_eq!(
            e.message(),
            "API key 'small' may not use the model 'gpt-4o'"
        );
        assert_eq!(
            small
                .permits(ServiceType::Stt, Some("qwen2.5:7b"))
                .unwrap_err()
                .code(),
            "service_not_permitted"
        );
        assert_eq!(small.models().unwrap().len(), 2);
    }

    #[test]
    fn shared_salts_are_hashed_once() {
        let other_salt = b"another-salt-16b";
        let k = keys(json!([
            key("a", "sk-a", json!(["chat"])),
            key("b", "sk-b", json!(["chat"])),
            {"key-id": "c", "key-hash": hash_key(other_salt, "sk-c"), "permissions": ["chat"]}
        ]));
        assert_eq!(k.salts.len(), 2);
        assert_eq!(k.salts[0].digests.len(), 2);
        for (secret, id) in [("sk-a", "a"), ("sk-b", "b"), ("sk-c", "c")] {
            assert_eq!(k.authenticate(Some(secret), None, NOW).unwrap().id, id);
        }
    }

    #[test]
    fn quotas_and_bookkeeping() {
        let k = keys(json!([{
            "keyId": "q", "keyHash": hash_key(SALT, "k"), "permissions": ["chat"],
            "rateLimitPerMinute": 60, "daily-request-limit": "1000",
            "tokens-per-minute": 10000, "daily-token-limit": 1000000,
            "description": "team", "createdAt": "2025-01-01 00:00:00", "created-by": "ops",
            "metadata": {"team": "x"}, "key-prefix": "sk-", "quota-alert-threshold": 0.8,
            "rotation-period-days": 90, "last-rotated-at": null, "usage": {"totalRequests": 3},
            "creatorIpAddress": "1.2.3.4", "expired": false, "allowed-ip-addresses": []
        }]));
        let q = &k.keys()[0];
        assert_eq!(
            (
                q.rate_limit_per_minute,
                q.daily_request_limit,
                q.tokens_per_minute,
                q.daily_token_limit
            ),
            (60, 1000, 10000, 1_000_000)
        );
        assert!(!k.uses_client_address());
    }

    #[test]
    fn parse_errors_name_the_key() {
        let p = "jairouter.security.api-key";
        let cases = [
            (json!({"keys": {}}), format!("{p}.keys: must be a list")),
            (json!({"header-name": "X API Key"}), format!("{p}.header-name: must be an HTTP header name")),
            (json!({"kes": []}), format!("{p}.kes: unknown key")),
            (json!({"keys": [{"key-id": "a", "key-value": "sk-plain", "permissions": ["chat"]}]}),
             format!("{p}.keys[0].key-value: plaintext keys are not accepted")),
            (json!({"keys": [{"key-hash": hash_key(SALT, "k"), "permissions": ["chat"]}]}),
             format!("{p}.keys[0].key-id: is required")),
            (json!({"keys": [{"key-id": "a b", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"]}]}),
             format!("{p}.keys[0].key-id: must be 1 to 64")),
            (json!({"keys": [{"key-id": "a".repeat(65), "key-hash": hash_key(SALT, "k"), "permissions": ["chat"]}]}),
             format!("{p}.keys[0].key-id: must be 1 to 64")),
            (json!({"keys": [key("a", "k", json!(["chat"])), key("b", "k2", json!(["chat"])),
                             {"key-id": "c", "key-hash": "not base64!", "permissions": ["chat"]}]}),
             format!("{p}.keys[2].key-hash: must be Base64(salt):Base64(SHA-256(salt+key))")),
            (json!({"keys": [{"key-id": "a", "key-hash": "c2hvcnQ=:tKTAAh4diLiavEy1OqGzxYuwuTGpHDWlwtlCaLhyIug=", "permissions": ["chat"]}]}),
             format!("{p}.keys[0].key-hash: must be Base64(salt):Base64(SHA-256(salt+key)) (the salt is 5 bytes")),
            (json!({"keys": [{"key-id": "a", "key-hash": "amFpcm91dGVyLXRlc3Qtc2FsdA==:AAAA", "permissions": ["chat"]}]}),
             format!("{p}.keys[0].key-hash: must be Base64(salt):Base64(SHA-256(salt+key)) (the hash is 3 bytes")),
            (json!({"keys": [{"key-id": "a", "key-hash": "amFpcm91dGVyLXRlc3Qtc2FsdA==", "permissions": ["chat"]}]}),
             format!("{p}.keys[0].key-hash: must be Base64")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k")}]}),
             format!("{p}.keys[0].permissions: is required")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": []}]}),
             format!("{p}.keys[0].permissions: is required")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat", "write"]}]}),
             format!("{p}.keys[0].permissions[1]: must be a service")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": "chat,read"}]}),
             format!("{p}.keys[0].permissions: must be a service")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": 3}]}),
             format!("{p}.keys[0].permissions: must be a list of strings")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "models": []}]}),
             format!("{p}.keys[0].models: lists no model")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["admin"], "models": ["m"]}]}),
             format!("{p}.keys[0].models: cannot narrow an admin key")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "expires-at": "2027-02-30"}]}),
             format!("{p}.keys[0].expires-at: must be a UTC time")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "allowed-ip-addresses": ["10.0.0.0/8"]}]}),
             format!("{p}.keys[0].allowed-ip-addresses[0]: must be an IP address")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "tokens-per-minute": -1}]}),
             format!("{p}.keys[0].tokens-per-minute: must be a whole number")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "enabled": "yes"}]}),
             format!("{p}.keys[0].enabled: must be true or false")),
            (json!({"keys": [{"key-id": "a", "key-hash": hash_key(SALT, "k"), "permissions": ["chat"], "quota": 1}]}),
             format!("{p}.keys[0].quota: unknown key")),
            (json!({"keys": ["sk-plain"]}), format!("{p}.keys[0]: must be a mapping")),
        ];
        for (section, expected) in cases {
            let e = refused(section);
            assert!(e.starts_with(&expected), "{e}\n  expected: {expected}");
        }
    }

    #[test]
    fn key_value_is_refused_without_showing_it() {
        let e = refused_key(
            json!({"key-id": "a", "key-value": "sk-secret-plain", "permissions": ["chat"]}),
        );
        assert!(e.contains("./build.sh hash-key"), "{e}");
        assert!(!e.contains("sk-secret-plain"), "{e}");
    }

    #[test]
    fn duplicates_are_refused() {
        let e = refused(
            json!({"keys": [key("a", "k1", json!(["chat"])), key("a", "k2", json!(["chat"]))]}),
        );
        assert_eq!(
            e,
            "jairouter.security.api-key.keys[1].key-id: \"a\" is also the key-id of keys[0]"
        );
        let e = refused(
            json!({"keys": [key("a", "k1", json!(["chat"])), key("b", "k1", json!(["chat"]))]}),
        );
        assert!(
            e.starts_with("jairouter.security.api-key.keys[1].key-hash: the same key as keys[0]"),
            "{e}"
        );
    }

    #[test]
    fn base64_round_trips() {
        for (raw, encoded) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff, 0xbf], "+/+/"),
        ] {
            assert_eq!(base64_encode(raw), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), raw);
        }
        assert_eq!(base64_decode("Zm9vYg").unwrap(), b"foob");
        assert_eq!(base64_decode("Zm8").unwrap(), b"fo");
        for bad in ["Z", "Zm9vY", "Zg===", "Zg=", "Z=g=", "Zm9v!A==", "Zm-_"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
    }

    #[test]
    fn sha256_known_answers() {
        let hex = |d: [u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(salted_sha256(b"", b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(salted_sha256(b"a", b"bc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(salted_sha256(
                b"abcdbcdecdefdefgefghfghighijhijk",
                b"ijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        let million = vec![b'a'; 1_000_000];
        assert_eq!(
            hex(salted_sha256(&million[..1], &million[1..])),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn times() {
        for (text, unix) in [
            ("1970-01-01", 0),
            ("2027-01-31", 1_801_353_600),
            ("2027-01-31T00:00:00", 1_801_353_600),
            ("2027-01-31T00:00:00Z", 1_801_353_600),
            ("2027-01-31T00:00:00.123Z", 1_801_353_600),
            ("2027-01-31 00:00:00", 1_801_353_600),
            ("2027-01-31T08:00:00+08:00", 1_801_353_600),
            ("2027-01-30T19:00:00-05:00", 1_801_353_600),
            ("2027-01-31T00:00", 1_801_353_600),
            ("2024-02-29T12:34:56", 1_709_210_096),
            ("2000-03-01T00:00:00", 951_868_800),
            ("9999-12-31T23:59:59", 253_402_300_799),
        ] {
            assert_eq!(parse_time(text), Some(unix), "{text}");
        }
        for bad in [
            "",
            "2027",
            "2027-1-31",
            "2027-01-32",
            "2027-02-29",
            "2100-02-29",
            "2027-13-01",
            "2027-00-10",
            "1969-12-31",
            "2027-01-31T24:00:00",
            "2027-01-31T00:60:00",
            "2027-01-31T00:00:60",
            "2027-01-31T00:00:00.",
            "2027-01-31T00:00:00Zx",
            "2027-01-31X00:00:00",
            "2027-01-31T00:00:00+8",
            "1970-01-01T00:00:00+01:00",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(parse_time("2000-02-29"), Some(951_782_400));
    }

    /// What Envoy 1.40 handed the filter for claims of a payload jwt_authn verified (bytes
    /// observed through a probe filter): a list, and a string.
    #[test]
    fn claims_as_envoy_hands_them() {
        let list = [
            2, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 99, 104, 97, 116, 0, 0,
            101, 109, 98, 101, 100, 100, 105, 110, 103, 0, 0,
        ];
        assert_eq!(claim_values(&list), ["chat", "embedding"]);
        assert_eq!(
            claim_values(b"chat embedding,admin"),
            ["chat", "embedding", "admin"]
        );
        assert_eq!(claim_values(&list[..list.len() - 1]), Vec::<String>::new());
        assert!(claim_values(&[0xff, 0xfe]).is_empty());
        let caller = ApiKey::for_token("alice", &claim_values(&list), None);
        assert_eq!(caller.id, "alice");
        assert!(caller.permits(ServiceType::Embedding, Some("any")).is_ok());
        assert!(caller.permits(ServiceType::Rerank, None).is_err());
        let scoped = ApiKey::for_token(
            "bob",
            &["openid".into(), "chat".into()],
            Some(vec!["m".into()]),
        );
        assert!(scoped.permits(ServiceType::Chat, Some("m")).is_ok());
        assert!(scoped.permits(ServiceType::Chat, Some("n")).is_err());
    }
}
