//! `jairouter.security.api-key`, the original JAiRouter's API-key section, as written: who may
//! call, with what permissions and quotas. Keys are given only as the original's
//! `Base64(salt):Base64(SHA-256(salt ‖ key))` (what `./build.sh hash-key` prints); plaintext
//! `key-value` entries are refused. `auth` compiles the section into its lookup table.

use super::reader::{error, join, kind, show, ConfigError, Fields};
use crate::encoding::{base64_decode, parse_time};
use crate::endpoint::ServiceType;
use serde_json::Value;
use std::collections::HashMap;
use std::net::IpAddr;

type Result<T> = std::result::Result<T, ConfigError>;

/// The header the original reads the key from, lower-cased as Envoy presents header names.
pub const DEFAULT_HEADER_NAME: &str = "x-api-key";

/// The permission that grants every service and every model.
pub const ADMIN_PERMISSION: &str = "admin";

/// The shortest salt accepted (the original and `hash-key` make 16 bytes).
pub const MIN_SALT_BYTES: usize = 8;

/// The largest quota accepted: beyond any real use, and far from overflowing arithmetic.
pub const MAX_QUOTA: u64 = 1_000_000_000_000;

/// The section; absent, authentication is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeySection {
    /// Whether requests must present a key (`enabled`, default true).
    pub enabled: bool,
    /// The key header, lower-case (`x-api-key` unless `header-name` says otherwise).
    pub header_name: String,
    pub keys: Vec<ApiKeyEntry>,
}

impl Default for ApiKeySection {
    fn default() -> Self {
        ApiKeySection {
            enabled: false,
            header_name: DEFAULT_HEADER_NAME.to_string(),
            keys: Vec::new(),
        }
    }
}

/// One entry of `keys`: its salt and digest, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyEntry {
    /// `key-id`: what logs and metrics show.
    pub id: String,
    pub salt: Vec<u8>,
    /// SHA-256(salt ‖ key).
    pub digest: [u8; 32],
    pub enabled: bool,
    /// Unix seconds.
    pub expires_at: Option<u64>,
    /// Requests per minute (0: no quota).
    pub rate_limit_per_minute: u64,
    /// Requests per day (0: no quota).
    pub daily_request_limit: u64,
    /// Model tokens per minute (0: no quota).
    pub tokens_per_minute: u64,
    /// Model tokens per day (0: no quota).
    pub daily_token_limit: u64,
    /// `admin` among the permissions.
    pub admin: bool,
    /// The services among the permissions.
    pub services: Vec<ServiceType>,
    /// `None`: every model of the permitted services.
    pub models: Option<Vec<String>>,
    /// `None`: any client address.
    pub allowed_addresses: Option<Vec<IpAddr>>,
}

impl ApiKeySection {
    /// Reads the section at `path` (`jairouter.security.api-key`); every refusal names its key.
    pub fn parse(path: &str, value: &Value) -> Result<ApiKeySection> {
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

        let mut keys: Vec<ApiKeyEntry> = Vec::with_capacity(items.len());
        let mut ids: HashMap<String, usize> = HashMap::with_capacity(items.len());
        let mut hashes: HashMap<(Vec<u8>, [u8; 32]), usize> = HashMap::with_capacity(items.len());
        for (at, item) in items.iter().enumerate() {
            let item_path = format!("{keys_path}[{at}]");
            let key = parse_key(&item_path, item)?;
            if let Some(other) = ids.get(&key.id) {
                return Err(error(
                    &join(&item_path, "key-id"),
                    format!("{:?} is also the key-id of keys[{other}]", key.id),
                ));
            }
            if let Some(other) = hashes.get(&(key.salt.clone(), key.digest)) {
                let other_id = keys.get(*other).map(|k| k.id.as_str()).unwrap_or_default();
                return Err(error(
                    &join(&item_path, "key-hash"),
                    format!("the same key as keys[{other}] ({other_id:?}): give each key its own"),
                ));
            }
            ids.insert(key.id.clone(), at);
            hashes.insert((key.salt.clone(), key.digest), at);
            keys.push(key);
        }
        Ok(ApiKeySection {
            enabled,
            header_name,
            keys,
        })
    }
}

/// One entry of `keys`.
fn parse_key(path: &str, value: &Value) -> Result<ApiKeyEntry> {
    let mut f = Fields::new(path, value)?;
    if f.take("key-value").is_some() {
        return Err(error(
            &f.child("key-value"),
            "plaintext keys are not accepted: store `key-hash` instead, made by \
             `./build.sh hash-key` (or the original's ApiKeyHashUtil)",
        ));
    }
    let id = take_key_id(&mut f)?;
    let (salt, digest) = take_key_hash(&mut f)?;
    let enabled = f.boolean("enabled", true)?;
    let (admin, services) = take_permissions(&mut f)?;
    let models = match f.take("models") {
        Some(v) => Some(models(&f.child("models"), v, admin)?),
        None => None,
    };
    let expires_at = match f.string("expires-at")? {
        Some(text) => Some(expiry(&f.child("expires-at"), text)?),
        None => None,
    };
    let allowed_addresses = match f.take("allowed-ip-addresses") {
        Some(v) => allowed_addresses(&f.child("allowed-ip-addresses"), v)?,
        None => None,
    };
    let rate_limit_per_minute = f.integer("rate-limit-per-minute", 0, 0, MAX_QUOTA)?;
    let daily_request_limit = f.integer("daily-request-limit", 0, 0, MAX_QUOTA)?;
    let tokens_per_minute = f.integer("tokens-per-minute", 0, 0, MAX_QUOTA)?;
    let daily_token_limit = f.integer("daily-token-limit", 0, 0, MAX_QUOTA)?;
    for ignored in BOOKKEEPING_FIELDS {
        f.take(ignored);
    }
    f.finish()?;

    Ok(ApiKeyEntry {
        id: id.to_string(),
        salt,
        digest,
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
    })
}

/// The original's bookkeeping of a key: accepted, not used.
const BOOKKEEPING_FIELDS: [&str; 11] = [
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
];

/// `key-id`: the name logs and metrics show.
fn take_key_id<'v>(f: &mut Fields<'v>) -> Result<&'v str> {
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
    Ok(id)
}

/// `key-hash`: the salt and SHA-256(salt ‖ key).
fn take_key_hash(f: &mut Fields<'_>) -> Result<(Vec<u8>, [u8; 32])> {
    let hash_path = f.child("key-hash");
    let hash = f.string("key-hash")?.ok_or_else(|| {
        error(
            &hash_path,
            "is required: Base64(salt):Base64(SHA-256(salt+key)), made by `./build.sh hash-key`",
        )
    })?;
    parse_key_hash(hash).map_err(|why| {
        error(
            &hash_path,
            format!("must be Base64(salt):Base64(SHA-256(salt+key)) ({why})"),
        )
    })
}

/// `permissions`: whether the key is an admin's, and the services it may use.
fn take_permissions(f: &mut Fields<'_>) -> Result<(bool, Vec<ServiceType>)> {
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
    let mut services = Vec::new();
    for (name, name_path) in &permissions {
        if name.eq_ignore_ascii_case(ADMIN_PERMISSION) {
            admin = true;
        } else if let Some(kind) = ServiceType::from_config_key(name) {
            services.push(kind);
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
    Ok((admin, services))
}

/// `models`: the models the key may use (none: every model of its services).
fn models(path: &str, value: &Value, admin: bool) -> Result<Vec<String>> {
    let list = string_list(path, value)?;
    if list.is_empty() {
        return Err(error(
            path,
            "lists no model: leave it out to allow every model",
        ));
    }
    if admin {
        return Err(error(
            path,
            "cannot narrow an admin key (admin allows every model): drop one of them",
        ));
    }
    Ok(list.into_iter().map(|(m, _)| m.to_string()).collect())
}

/// `expires-at`, in Unix seconds.
fn expiry(path: &str, text: &str) -> Result<u64> {
    parse_time(text).ok_or_else(|| {
        error(
            path,
            format!(
                "must be a UTC time like 2027-01-31T00:00:00Z, 2027-01-31 00:00:00 or a date \
                 2027-01-31 (got {text:?})"
            ),
        )
    })
}

/// `allowed-ip-addresses`: the client addresses the key may come from (`None`: any).
fn allowed_addresses(path: &str, value: &Value) -> Result<Option<Vec<IpAddr>>> {
    let mut addresses = Vec::new();
    for (text, item_path) in string_list(path, value)? {
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
    Ok((!addresses.is_empty()).then_some(addresses))
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
