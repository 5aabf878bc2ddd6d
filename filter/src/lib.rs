//! JAiRouter for Envoy: model routing for the OpenAI API as a proxy-wasm filter.
//!
//! Everything but `wasm` is plain Rust with no host calls, so it is tested natively and under
//! wasm32; `wasm` binds it to proxy-wasm contexts.

pub mod auth;
pub mod balance;
pub mod breaker;
pub mod bytes;
pub mod config;
pub mod encoding;
pub mod endpoint;
pub mod headers;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod plan;
pub mod request;
pub mod scan;
pub mod shared_keys;
pub mod status;
pub mod store;
pub mod usage;

#[cfg(all(target_arch = "wasm32", not(test)))]
mod wasm;
