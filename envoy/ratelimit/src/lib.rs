//! `jairouter-ratelimit`: the rate-limit service of PROTOCOL.md. Envoy's `ShouldRateLimit`
//! (with descriptor `limit` overrides and per-descriptor `hits_addend`) and our
//! `TokenBudgets/Settle`, token buckets in Redis, over gRPC h2c; `/healthz` and `/metrics`
//! over HTTP/1.1.

pub mod admin;
pub mod config;
pub mod grpc;
pub mod log;
pub mod metrics;
pub mod proto;
pub mod service;
pub mod store;
