//! JAiRouter for Envoy: model routing for the OpenAI API as a proxy-wasm filter.
//!
//! Layers, each importing only those before it: `config` (what users write, validated) →
//! the compiled plan every request shares → `route` (where a request for a model goes), then
//! `request` (what to do with a request) and `exchange` (one request from routing to its log
//! line), reaching Envoy only through `host::Host` → `wasm`, the thin proxy-wasm binding.
//! Everything but `wasm` is plain Rust, tested natively and under wasm32. See ARCHITECTURE.md.
#![deny(unsafe_code)]

pub mod auth;
pub mod balance;
pub mod breaker;
pub mod bytes;
pub mod config;
pub mod contract;
pub mod encoding;
pub mod endpoint;
pub mod exchange;
pub mod headers;
pub mod health;
pub mod host;
pub mod install;
pub mod json_text;
pub mod limit;
pub mod metrics;
pub mod plan;
pub mod reply;
pub mod request;
pub mod route;
pub mod scan;
pub mod shared_keys;
pub mod status;
pub mod store;
pub mod translate;
pub mod usage;

#[cfg(all(target_arch = "wasm32", not(test)))]
mod wasm;
