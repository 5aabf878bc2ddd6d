//! API keys: the table a request's key is looked up in (salted SHA-256, one hash per distinct
//! salt), whether a key may be used now and from where, and what it permits.

use super::AuthError;
use crate::bytes::FastMap;
use crate::config::{ApiKeyEntry, ApiKeySection, ConfigError};
use crate::endpoint::ServiceType;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;

/// The `jairouter.security.api-key` section, compiled: keys looked up by digest, salt by salt.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    enabled: bool,
    header_name: String,
    keys: Vec<ApiKey>,
    /// One entry per distinct salt, in the order the salts first appear.
    pub(super) salts: Vec<SaltGroup>,
}

/// The keys hashed with one salt: digest → index into `keys`.
#[derive(Debug, Clone)]
pub(super) struct SaltGroup {
    salt: Vec<u8>,
    pub(super) digests: FastMap<[u8; 32], usize>,
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
    pub(super) admin: bool,
    /// Bit `ServiceType::index()` set for each permitted service.
    pub(super) services: u8,
    /// `None`: every model of the permitted services.
    pub(super) models: Option<Vec<String>>,
    /// `None`: any client address.
    pub(super) allowed_addresses: Option<Vec<IpAddr>>,
}

impl Default for ApiKeys {
    /// No section: authentication off.
    fn default() -> Self {
        ApiKeys {
            enabled: false,
            header_name: crate::config::DEFAULT_HEADER_NAME.to_string(),
            keys: Vec::new(),
            salts: Vec::new(),
        }
    }
}

impl ApiKeys {
    /// The lookup table of a section `config` read and validated (ids and keys are distinct).
    pub fn compile(section: &ApiKeySection) -> ApiKeys {
        let mut salts: Vec<SaltGroup> = Vec::new();
        let mut salt_index: HashMap<&[u8], usize> = HashMap::new();
        for (at, entry) in section.keys.iter().enumerate() {
            let group = *salt_index.entry(&entry.salt).or_insert_with(|| {
                salts.push(SaltGroup {
                    salt: entry.salt.clone(),
                    digests: FastMap::default(),
                });
                salts.len() - 1
            });
            if let Some(group) = salts.get_mut(group) {
                group.digests.insert(entry.digest, at);
            }
        }
        ApiKeys {
            enabled: section.enabled,
            header_name: section.header_name.clone(),
            keys: section.keys.iter().map(ApiKey::compile).collect(),
            salts,
        }
    }

    /// Reads and compiles the section at `path` (the renderer's key check and the tests).
    pub fn parse(path: &str, value: &Value) -> Result<ApiKeys, ConfigError> {
        Ok(ApiKeys::compile(&ApiKeySection::parse(path, value)?))
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
                .map(crate::encoding::client_ip)
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
    fn compile(entry: &ApiKeyEntry) -> ApiKey {
        ApiKey {
            id: entry.id.clone(),
            enabled: entry.enabled,
            expires_at: entry.expires_at,
            rate_limit_per_minute: entry.rate_limit_per_minute,
            daily_request_limit: entry.daily_request_limit,
            tokens_per_minute: entry.tokens_per_minute,
            daily_token_limit: entry.daily_token_limit,
            admin: entry.admin,
            services: entry
                .services
                .iter()
                .fold(0, |bits, s| bits | service_bit(*s)),
            models: entry.models.clone(),
            allowed_addresses: entry.allowed_addresses.clone(),
        }
    }

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

/// `Base64(salt):Base64(SHA-256(salt ‖ key))`, the original's `key-hash` format.
pub fn hash_key(salt: &[u8], key: &str) -> String {
    format!(
        "{}:{}",
        crate::encoding::base64_encode(salt),
        crate::encoding::base64_encode(&salted_sha256(salt, key.as_bytes()))
    )
}

pub(super) fn salted_sha256(salt: &[u8], key: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(key);
    hasher.finalize().into()
}

pub(super) fn service_bit(kind: ServiceType) -> u8 {
    1 << kind.index()
}
