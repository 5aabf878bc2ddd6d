//! The built `jairouter-ratelimit` against a real redis-server, over gRPC h2c.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use jairouter_ratelimit::proto::{
    code, unit, Descriptor, RateLimitResponse, SettleRequest, Settlement,
};

fn wait_of(resp: &RateLimitResponse, i: usize) -> Duration {
    resp.statuses[i]
        .duration_until_reset
        .expect("duration_until_reset")
        .as_std()
}

fn near(d: Duration, want: Duration, slack: Duration) -> bool {
    d <= want + slack && d + slack >= want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admits_n_then_over_limit() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), &[]);
    let c = Client::connect(svc.grpc).await;
    let req = request(vec![desc(
        "model.rate-limit",
        "chat/gpt-4o",
        3,
        unit::MINUTE,
        Some(1),
    )]);
    for left in [2, 1, 0] {
        let r = c.srl(&req).await.unwrap();
        assert_eq!(r.overall_code, code::OK);
        let s = &r.statuses[0];
        assert_eq!((s.code, s.limit_remaining), (code::OK, left));
        let limit = s.current_limit.clone().unwrap();
        assert_eq!((limit.requests_per_unit, limit.unit), (3, unit::MINUTE));
        // Until full: (3 - left) tokens at 20 s each.
        let full = Duration::from_secs(20 * u64::from(3 - left));
        assert!(
            near(wait_of(&r, 0), full, Duration::from_secs(1)),
            "{:?}",
            wait_of(&r, 0)
        );
    }
    let r = c.srl(&req).await.unwrap();
    assert_eq!(r.overall_code, code::OVER_LIMIT);
    assert_eq!(
        (r.statuses[0].code, r.statuses[0].limit_remaining),
        (code::OVER_LIMIT, 0)
    );
    // One token comes back every 20 s.
    let retry = wait_of(&r, 0);
    assert!(
        retry <= Duration::from_secs(20) && retry >= Duration::from_secs(19),
        "{retry:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_or_nothing_across_descriptors() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), &[]);
    let c = Client::connect(svc.grpc).await;
    let a = desc("service", "chat", 5, unit::MINUTE, None);
    let b = desc("per-client", "10.0.0.7", 1, unit::MINUTE, None);
    let r = c.srl(&request(vec![a.clone(), b.clone()])).await.unwrap();
    assert_eq!(r.overall_code, code::OK);
    assert_eq!(r.statuses[0].limit_remaining, 4);
    assert_eq!(r.statuses[1].limit_remaining, 0);

    // b is empty: the call is over and a is not drawn.
    let r = c.srl(&request(vec![a.clone(), b.clone()])).await.unwrap();
    assert_eq!(r.overall_code, code::OVER_LIMIT);
    assert_eq!(
        (r.statuses[0].code, r.statuses[0].limit_remaining),
        (code::OK, 4)
    );
    assert_eq!(
        (r.statuses[1].code, r.statuses[1].limit_remaining),
        (code::OVER_LIMIT, 0)
    );
    assert!(
        wait_of(&r, 1) > Duration::from_secs(58),
        "{:?}",
        wait_of(&r, 1)
    );

    let r = c.srl(&request(vec![a])).await.unwrap();
    assert_eq!(r.overall_code, code::OK);
    assert_eq!(
        r.statuses[0].limit_remaining, 3,
        "the refused call took nothing from a"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_addend_per_descriptor_and_request() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), &[]);
    let c = Client::connect(svc.grpc).await;
    let mut req = request(vec![
        desc("tokens", "a", 10, unit::MINUTE, Some(3)),
        desc("tokens", "b", 10, unit::MINUTE, None),
        Descriptor {
            entries: desc("x", "unlimited", 1, unit::SECOND, None).entries,
            limit: None,
            hits_addend: Some(1000),
        },
    ]);
    req.hits_addend = 2;
    let r = c.srl(&req).await.unwrap();
    assert_eq!(r.overall_code, code::OK);
    assert_eq!(
        r.statuses[0].limit_remaining, 7,
        "the descriptor's own hits_addend wins"
    );
    assert_eq!(
        r.statuses[1].limit_remaining, 8,
        "the request's hits_addend otherwise"
    );
    assert_eq!(r.statuses[2].code, code::OK);
    assert_eq!(r.statuses[2].current_limit, None, "no limit: not limited");

    // Both unset: 1. Zero: checks without taking.
    let r = c
        .srl(&request(vec![desc("tokens", "b", 10, unit::MINUTE, None)]))
        .await
        .unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 7);
    let r = c
        .srl(&request(vec![desc(
            "tokens",
            "a",
            10,
            unit::MINUTE,
            Some(0),
        )]))
        .await
        .unwrap();
    assert_eq!(
        (r.overall_code, r.statuses[0].limit_remaining),
        (code::OK, 7)
    );

    // 8 > 7: over; the 8th token is 6 s away (one per 6 s).
    let r = c
        .srl(&request(vec![desc(
            "tokens",
            "a",
            10,
            unit::MINUTE,
            Some(8),
        )]))
        .await
        .unwrap();
    assert_eq!(r.overall_code, code::OVER_LIMIT);
    let retry = wait_of(&r, 0);
    assert!(
        retry <= Duration::from_secs(6) && retry >= Duration::from_secs(5),
        "{retry:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refills_over_time() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), &[]);
    let c = Client::connect(svc.grpc).await;
    let req = request(vec![desc("rps", "all", 2, unit::SECOND, None)]);
    for _ in 0..2 {
        assert_eq!(c.srl(&req).await.unwrap().overall_code, code::OK);
    }
    let r = c.srl(&req).await.unwrap();
    assert_eq!(r.overall_code, code::OVER_LIMIT);
    let retry = wait_of(&r, 0);
    assert!(
        retry <= Duration::from_millis(500) && retry > Duration::ZERO,
        "{retry:?}"
    );
    tokio::time::sleep(retry + Duration::from_millis(30)).await;
    let r = c.srl(&req).await.unwrap();
    assert_eq!(
        r.overall_code,
        code::OK,
        "a token came back after {retry:?}"
    );
    // A full second refills the whole bucket, never more.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = c
        .srl(&request(vec![desc("rps", "all", 2, unit::SECOND, Some(0))]))
        .await
        .unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 2);
    assert_eq!(wait_of(&r, 0), Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_charges_into_debt_then_refunds() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), &[]);
    let c = Client::connect(svc.grpc).await;
    let budget = |hits| {
        desc(
            "api-key.tokens-per-minute",
            "all",
            10,
            unit::MINUTE,
            Some(hits),
        )
    };
    let settle = |delta| SettleRequest {
        domain: "jairouter".into(),
        settlements: vec![Settlement {
            descriptor: budget(0),
            delta,
        }],
    };
    // Reserve 4, then the answer used 16: 12 more → 6 - 12 = -6.
    let r = c.srl(&request(vec![budget(4)])).await.unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 6);
    assert_eq!(c.settle(&settle(12)).await.unwrap().applied, 1);
    let r = c.srl(&request(vec![budget(1)])).await.unwrap();
    assert_eq!(r.overall_code, code::OVER_LIMIT, "in debt");
    // From -6 to 1 token: 7 tokens at 6 s each.
    assert!(
        near(
            wait_of(&r, 0),
            Duration::from_secs(42),
            Duration::from_secs(1)
        ),
        "{:?}",
        wait_of(&r, 0)
    );

    // A refund larger than the debt fills the bucket, never beyond N.
    assert_eq!(c.settle(&settle(-100)).await.unwrap().applied, 1);
    let r = c.srl(&request(vec![budget(10)])).await.unwrap();
    assert_eq!(
        (r.overall_code, r.statuses[0].limit_remaining),
        (code::OK, 0)
    );
    let r = c.srl(&request(vec![budget(1)])).await.unwrap();
    assert_eq!(r.overall_code, code::OVER_LIMIT);

    // A huge charge stops at a debt of N: even 0 hits wait until the debt is paid (one unit).
    assert_eq!(c.settle(&settle(i64::MAX)).await.unwrap().applied, 1);
    let r = c.srl(&request(vec![budget(0)])).await.unwrap();
    assert_eq!(
        (r.overall_code, r.statuses[0].limit_remaining),
        (code::OVER_LIMIT, 0)
    );
    assert!(
        near(
            wait_of(&r, 0),
            Duration::from_secs(60),
            Duration::from_secs(1)
        ),
        "{:?}",
        wait_of(&r, 0)
    );
    // Giving back half the debt halves the wait.
    assert_eq!(c.settle(&settle(-5)).await.unwrap().applied, 1);
    let r = c.srl(&request(vec![budget(0)])).await.unwrap();
    assert!(
        near(
            wait_of(&r, 0),
            Duration::from_secs(30),
            Duration::from_secs(1)
        ),
        "{:?}",
        wait_of(&r, 0)
    );

    // A bucket that does not exist starts full; a settlement without a limit is skipped.
    let fresh = SettleRequest {
        domain: "jairouter".into(),
        settlements: vec![
            Settlement {
                descriptor: desc("tokens", "fresh", 10, unit::MINUTE, None),
                delta: 3,
            },
            Settlement {
                descriptor: Descriptor {
                    limit: None,
                    ..desc("tokens", "fresh", 10, unit::MINUTE, None)
                },
                delta: 3,
            },
        ],
    };
    assert_eq!(c.settle(&fresh).await.unwrap().applied, 1);
    let r = c
        .srl(&request(vec![desc(
            "tokens",
            "fresh",
            10,
            unit::MINUTE,
            Some(0),
        )]))
        .await
        .unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_are_refused() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), &[]);
    let c = Client::connect(svc.grpc).await;

    let r = c
        .raw(
            "/envoy.service.ratelimit.v3.RateLimitService/Nope",
            jairouter_ratelimit::grpc::frame(b""),
            None,
        )
        .await;
    assert_eq!(r.status, 12, "{r:?}");
    let r = c
        .raw(
            SRL,
            jairouter_ratelimit::grpc::frame(&[0x0a, 9, b'x']),
            None,
        )
        .await;
    assert_eq!(r.status, 3, "{r:?}");
    assert!(r.message.contains("malformed"), "{r:?}");
    let r = c.raw(SRL, vec![0, 0, 0], None).await;
    assert_eq!(r.status, 3, "{r:?}");
    let too_many = request(
        (0..65)
            .map(|i| desc("l", &i.to_string(), 5, unit::SECOND, None))
            .collect(),
    );
    let r = c.srl(&too_many).await.unwrap_err();
    assert_eq!(r.status, 3, "{r:?}");
    let r = c
        .srl(&request(vec![desc("l", "b", 5, unit::UNKNOWN, None)]))
        .await
        .unwrap_err();
    assert_eq!(r.status, 3, "{r:?}");
    let ok = c
        .srl(&request(
            (0..64)
                .map(|i| desc("l", &i.to_string(), 5, unit::SECOND, None))
                .collect(),
        ))
        .await;
    assert_eq!(ok.map(|r| r.statuses.len()).ok(), Some(64));

    // An oversized message is refused from its length prefix.
    let mut big = vec![0u8, 0x00, 0x40, 0x00, 0x01];
    big.extend(std::iter::repeat_n(0u8, 1024));
    let r = c.raw(SRL, big, None).await;
    assert_eq!(r.status, 3, "{r:?}");

    let (status, body) = http_get(svc.http, "/metrics").await;
    assert_eq!(status, 200);
    let invalid = metric(
        &body,
        "jairouter_ratelimit_calls_total{method=\"should_rate_limit\",outcome=\"invalid\"}",
    );
    assert_eq!(invalid, Some(5.0), "{body}");
    assert_eq!(http_get(svc.http, "/nope").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_fast_and_recovers() {
    let mut redis = Redis::start();
    let port = redis.port;
    let svc = Service::start(&redis.url(), &[]);
    let c = Client::connect(svc.grpc).await;
    let req = request(vec![desc("rps", "all", 5, unit::MINUTE, None)]);
    assert_eq!(c.srl(&req).await.unwrap().statuses[0].limit_remaining, 4);
    assert_eq!(
        http_get(svc.http, "/healthz").await,
        (200, "ok\n".to_string())
    );

    redis.kill();
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let start = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(2), c.srl(&req))
            .await
            .expect("never a hang");
        slowest = slowest.max(start.elapsed());
        let r = r.unwrap_err();
        assert_eq!(r.status, 14, "{r:?}");
        assert!(!r.message.is_empty());
    }
    eprintln!("slowest UNAVAILABLE with Redis dead: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(150),
        "UNAVAILABLE took {slowest:?}"
    );
    let (status, _) = http_get(svc.http, "/healthz").await;
    assert_eq!(status, 503);
    let (_, metrics) = http_get(svc.http, "/metrics").await;
    assert_eq!(metric(&metrics, "jairouter_ratelimit_redis_up"), Some(0.0));
    assert!(metric(&metrics, "jairouter_ratelimit_redis_errors_total").unwrap() >= 10.0);
    assert_eq!(
        metric(
            &metrics,
            "jairouter_ratelimit_calls_total{method=\"should_rate_limit\",outcome=\"error\"}"
        ),
        Some(10.0)
    );

    // Redis back on the same port: the service reconnects by itself; the bucket starts full
    // and the scripts are loaded again.
    let _redis = Redis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        match c.srl(&req).await {
            Ok(r) => break r,
            Err(e) => {
                assert_eq!(e.status, 14);
                assert!(Instant::now() < deadline, "no recovery within 10 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(r.statuses[0].limit_remaining, 4);
    assert_eq!(http_get(svc.http, "/healthz").await.0, 200);
    let (_, metrics) = http_get(svc.http, "/metrics").await;
    assert_eq!(metric(&metrics, "jairouter_ratelimit_redis_up"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis_and_deadlines() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), &["--redis-timeout-ms", "50"]);
    let c = Client::connect(svc.grpc).await;
    let req = request(vec![desc("rps", "all", 5, unit::MINUTE, None)]);
    assert!(c.srl(&req).await.is_ok());

    // Redis busy for 1 s: the call gives up at the Redis timeout.
    let port = redis.port;
    let sleeper = std::thread::spawn(move || redis_cmd(port, &["DEBUG", "SLEEP", "1"]));
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let r = c.srl(&req).await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(r.status, 14, "{r:?}");
    assert!(took < Duration::from_millis(150), "took {took:?}");

    // A grpc-timeout shorter than the Redis timeout caps the wait.
    let start = Instant::now();
    let r = c
        .call::<_, RateLimitResponse>(SRL, &req, Some("10m"))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(r.status, 4, "{r:?}");
    assert!(took < Duration::from_millis(45), "took {took:?}");
    let _ = sleeper.join();

    // Settle under the same bounds once Redis answers again.
    let s = SettleRequest {
        domain: "jairouter".into(),
        settlements: vec![Settlement {
            descriptor: desc("rps", "all", 5, unit::MINUTE, None),
            delta: -1,
        }],
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match c.settle(&s).await {
            Ok(r) => {
                assert_eq!(r.applied, 1);
                break;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("settle did not recover: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls() {
    let redis = Redis::start();
    let svc = Service::start(&redis.url(), &[]);
    let c = Client::connect(svc.grpc).await;
    let req = request(vec![desc("m", "x", 2, unit::HOUR, None)]);
    for _ in 0..3 {
        let _ = c.srl(&req).await.unwrap();
    }
    let _ = c
        .settle(&SettleRequest {
            domain: "jairouter".into(),
            settlements: vec![],
        })
        .await
        .unwrap();
    let (status, body) = http_get(svc.http, "/metrics").await;
    assert_eq!(status, 200);
    let count = |m: &str, o: &str| {
        metric(
            &body,
            &format!("jairouter_ratelimit_calls_total{{method=\"{m}\",outcome=\"{o}\"}}"),
        )
    };
    assert_eq!(count("should_rate_limit", "ok"), Some(2.0), "{body}");
    assert_eq!(count("should_rate_limit", "over_limit"), Some(1.0));
    assert_eq!(count("settle", "ok"), Some(1.0));
    assert_eq!(count("settle", "error"), Some(0.0));
    assert_eq!(
        metric(
            &body,
            "jairouter_ratelimit_call_duration_seconds_count{method=\"should_rate_limit\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(&body, "jairouter_ratelimit_call_duration_seconds_bucket{method=\"should_rate_limit\",le=\"+Inf\"}"),
        Some(3.0)
    );
    assert_eq!(metric(&body, "jairouter_ratelimit_redis_up"), Some(1.0));
    assert_eq!(
        metric(&body, "jairouter_ratelimit_redis_errors_total"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_without_redis_and_stops_on_sigterm() {
    let port = free_port();
    let mut svc = Service::start(&format!("redis://127.0.0.1:{port}/0"), &[]);
    let c = Client::connect(svc.grpc).await;
    let req = request(vec![desc("rps", "all", 5, unit::MINUTE, None)]);
    let r = c.srl(&req).await.unwrap_err();
    assert_eq!(r.status, 14);
    assert_eq!(http_get(svc.http, "/healthz").await.0, 503);
    // Not limited descriptors never need Redis.
    let free = Descriptor {
        limit: None,
        ..desc("rps", "all", 5, unit::MINUTE, None)
    };
    assert_eq!(
        c.srl(&request(vec![free])).await.unwrap().overall_code,
        code::OK
    );

    let _redis = Redis::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.srl(&req).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no connection within 10 s of Redis starting"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &svc.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = svc
        .wait_exit(Duration::from_secs(5))
        .expect("exits within 5 s of SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_calls_in_flight() {
    let redis = Redis::start();
    let mut svc = Service::start(&redis.url(), &["--redis-timeout-ms", "3000"]);
    let c = Client::connect(svc.grpc).await;
    let req = request(vec![desc("rps", "all", 5, unit::MINUTE, None)]);
    assert!(c.srl(&req).await.is_ok());

    // Redis busy for 0.5 s: a call is in flight when SIGTERM arrives.
    let port = redis.port;
    let sleeper = std::thread::spawn(move || redis_cmd(port, &["DEBUG", "SLEEP", "0.5"]));
    std::thread::sleep(Duration::from_millis(100));
    let in_flight = {
        let c = c.clone();
        let req = req.clone();
        tokio::spawn(async move { c.srl(&req).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &svc.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let r = in_flight
        .await
        .unwrap()
        .expect("the call in flight is answered");
    assert_eq!(r.statuses[0].limit_remaining, 3);
    let status = svc
        .wait_exit(Duration::from_secs(5))
        .expect("exits after the drain");
    assert!(status.success(), "{status:?}");
    let _ = sleeper.join();
}
