//! Throughput and latency of ShouldRateLimit with 2 descriptors against a local Redis.
//! Not part of the test run: `cargo test --release -p jairouter-ratelimit --test bench -- --ignored --nocapture`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use jairouter_ratelimit::proto::{code, unit};

const RUN: Duration = Duration::from_secs(3);
const MAX_CALLS: usize = 200_000;

async fn caller(c: Client, worker: usize) -> Vec<Duration> {
    let req = request(vec![
        desc(
            "model.services.chat.rate-limit",
            "chat/gpt-4o",
            u32::MAX,
            unit::SECOND,
            None,
        ),
        desc(
            "model.rate-limit (per client)",
            &format!("10.0.0.{worker}"),
            u32::MAX,
            unit::SECOND,
            None,
        ),
    ]);
    let mut lat = Vec::new();
    let end = Instant::now() + RUN;
    while Instant::now() < end && lat.len() < MAX_CALLS {
        let start = Instant::now();
        let r = c.srl(&req).await.expect("call ok");
        lat.push(start.elapsed());
        assert_eq!(r.overall_code, code::OK);
    }
    lat
}

fn report(name: &str, mut lat: Vec<Duration>, took: Duration) {
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    println!(
        "{name}: {} calls in {took:.2?} = {:.0} calls/s, p50 {:?}, p99 {:?}, max {:?}",
        lat.len(),
        lat.len() as f64 / took.as_secs_f64(),
        p(0.50),
        p(0.99),
        lat[lat.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored --nocapture"]
async fn should_rate_limit_latency() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), &[]);

    let c = Client::connect(svc.grpc).await;
    let _ = caller(c.clone(), 0).await; // warm up (scripts loaded, connections made)
    let start = Instant::now();
    let lat = caller(c.clone(), 1).await;
    report("1 connection, 1 call at a time", lat, start.elapsed());

    for (name, conns) in [
        ("8 concurrent on 1 connection", 1),
        ("8 concurrent on 8 connections", 8),
    ] {
        let mut clients = Vec::new();
        for i in 0..conns {
            clients.push(if i == 0 {
                c.clone()
            } else {
                Client::connect(svc.grpc).await
            });
        }
        let start = Instant::now();
        let tasks: Vec<_> = (0..8)
            .map(|w| tokio::spawn(caller(clients[w % conns].clone(), w)))
            .collect();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        report(name, lat, start.elapsed());
    }
}
