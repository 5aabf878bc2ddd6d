"""Circuit breakers through a real Envoy with two workers (issue 6)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from harness import error_of, instance, json_body

CHAT = json_body({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
JSON = {"content-type": "application/json"}


def breaker(**keys) -> dict:
    # Long enough that a phase of a test never outlasts it by accident.
    return {"failure-threshold": 3, "timeout": 2000, "success-threshold": 2, **keys}


def post(gw, headers=None, body=CHAT, client: httpx.Client | None = None) -> httpx.Response:
    """A fresh connection each time spreads requests over both workers (a breaker is shared by
    them); one `client`'s requests stay on one worker, whose round-robin alternates exactly."""
    if client is not None:
        return client.post(gw.url + "/v1/chat/completions", content=body, headers={**JSON, **(headers or {})})
    with httpx.Client(timeout=10) as c:
        return c.post(gw.url + "/v1/chat/completions", content=body, headers={**JSON, **(headers or {})})


def chat_gateway(gateway, servers, cb=None, retries=0, **service):
    """Round-robin over the stubs; no retries unless asked, so a test counts every attempt."""
    return gateway({"model": {"load-balance": {"type": "round-robin"}, "retries": retries,
                              **({"circuit-breaker": cb} if cb else {}),
                              "services": {"chat": {"instances": [instance("llama", s) for s in servers], **service}}}})


def test_failures_open_the_breaker_and_it_closes_after_the_timeout(stubs, gateway):
    bad, good = stubs("bad", "good")
    gw = chat_gateway(gateway, [bad, good], breaker())
    bad.fail_status = 500
    statuses = [post(gw).status_code for _ in range(16)]
    # Exactly the threshold reached the failing instance, across both workers; then none.
    assert len(bad.requests) == 3
    assert statuses.count(500) == 3 and statuses.count(200) == 13
    bad.fail_status = None
    bad.clear()
    time.sleep(2.1)
    served = [post(gw).headers["x-stub-instance"] for _ in range(20)]
    # Half-open: two trials succeed, the breaker closes and round-robin shares again.
    assert served.count("bad") >= 8, served


def test_one_failure_in_half_open_reopens_it(stubs, gateway):
    bad, good = stubs("bad", "good")
    gw = chat_gateway(gateway, [bad, good], breaker())
    bad.fail_status = 503
    for _ in range(10):
        post(gw)
    assert len(bad.requests) == 3
    time.sleep(2.1)
    for _ in range(10):
        post(gw)
    assert len(bad.requests) == 4, "one trial, failed, open again"
    for _ in range(10):
        post(gw)
    assert len(bad.requests) == 4


def test_half_open_admits_a_bounded_number_of_trials(stubs, gateway):
    slow, good = stubs("slow", "good")
    gw = chat_gateway(gateway, [slow, good], breaker())
    slow.fail_status = 500
    with httpx.Client(timeout=10) as one_worker:  # alternating exactly: 3 of 6 fail, it opens
        for _ in range(6):
            post(gw, client=one_worker)
    assert len(slow.requests) == 3
    slow.fail_status = None
    slow.clear()
    slow.delay = 2.0  # the trials are still running when every other request has been served
    time.sleep(2.1)
    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda _: post(gw).status_code, range(40)))
    assert codes.count(200) == 40
    assert len(slow.requests) == 2, "success-threshold trials at once, not a flood"


def test_client_errors_never_trip_a_breaker(stubs, gateway):
    picky, other = stubs("picky", "other")
    gw = chat_gateway(gateway, [picky, other], breaker(**{"failure-threshold": 1}))
    picky.fail_status = 400
    with httpx.Client(timeout=10) as one_worker:
        codes = [post(gw, client=one_worker).status_code for _ in range(20)]
    assert codes.count(400) == 10 and len(picky.requests) == 10


def test_a_stream_broken_midway_is_a_failure(stubs, gateway):
    servers = stubs("one", "two")
    gw = chat_gateway(gateway, servers, breaker(**{"failure-threshold": 1, "timeout": 30000}))
    stream = json_body({"model": "llama", "stream": True, "messages": []})
    try:
        post(gw, {"x-stub-break-after": "2"}, stream)
        raise AssertionError("the cut stream should reach the client broken")
    except httpx.HTTPError:
        pass
    for _ in range(6):
        assert post(gw, body=stream).status_code == 200
    counts = sorted(len(s.requests) for s in servers)
    assert counts == [1, 6], "the instance whose stream broke is open; the other took the rest"


def test_a_client_leaving_midstream_is_not_a_failure(stubs, gateway):
    slow, other = stubs("slow", "other")
    gw = chat_gateway(gateway, [slow, other], breaker(**{"failure-threshold": 1}))
    stream = json_body({"model": "llama", "stream": True, "messages": []})
    for _ in range(8):
        with httpx.Client(timeout=10) as c:
            with c.stream("POST", gw.url + "/v1/chat/completions", content=stream,
                          headers={**JSON, "x-stub-chunks": "20", "x-stub-chunk-delay-ms": "50"}) as r:
                next(r.iter_raw())  # the first bytes, then hang up
    time.sleep(1.5)
    # Each worker alternates, so of 8 at least 3 reach each instance (4 give or take one per
    # worker); had a hang-up counted as a failure, that breaker would have let through no more.
    assert len(slow.requests) >= 3 and len(other.requests) >= 3, (len(slow.requests), len(other.requests))


def test_instance_and_service_overrides_are_honoured(stubs, gateway):
    strict, lenient, spare = stubs("strict", "lenient", "spare")
    gw = gateway({"model": {
        "load-balance": {"type": "round-robin"}, "retries": 0,
        "circuit-breaker": {"failure-threshold": 50, "timeout": 60000},
        "services": {"chat": {
            "circuit-breaker": {"failure-threshold": 4},
            "instances": [instance("llama", strict, **{"circuit-breaker": {"failure-threshold": 1}}),
                          instance("llama", lenient), instance("llama", spare)]}}}})
    strict.fail_status = lenient.fail_status = 500
    for _ in range(30):
        post(gw)
    assert len(strict.requests) == 1, "the instance's own threshold"
    assert len(lenient.requests) == 4, "the service's threshold, not the global one"


def test_every_instance_open_gives_503_with_retry_after(stubs, gateway):
    (dead,) = stubs("dead")
    gw = chat_gateway(gateway, [dead], breaker(**{"timeout": 30000}))
    dead.fail_status = 500
    for _ in range(3):
        assert post(gw).status_code == 500
    r = post(gw)
    assert r.status_code == 503
    assert error_of(r)["code"] == "no_available_instance"
    assert 1 <= int(r.headers["retry-after"]) <= 30
    assert len(dead.requests) == 3
    gw.stop()  # the access log says why
    import json as jsonlib
    last = jsonlib.loads(gw.access_log_path.read_text().splitlines()[-1])
    assert jsonlib.loads(last["jairouter"])["decision"] == "every circuit breaker open"


def test_a_breaker_can_be_turned_off_per_instance(stubs, gateway):
    bad, good = stubs("bad", "good")
    gw = gateway({"model": {"load-balance": {"type": "round-robin"}, "circuit-breaker": breaker(), "retries": 0,
                            "services": {"chat": {"instances": [
                                instance("llama", bad, **{"circuit-breaker": {"enabled": False}}),
                                instance("llama", good)]}}}})
    bad.fail_status = 500
    with httpx.Client(timeout=10) as one_worker:
        for _ in range(20):
            post(gw, client=one_worker)
    assert len(bad.requests) == 10


def health(**keys) -> dict:
    return {"interval": 300, "timeout": 200, "unhealthy-threshold": 2, "healthy-threshold": 1, **keys}


def served_by(gw, n: int, client: httpx.Client | None = None) -> list[str]:
    return [post(gw, client=client).headers.get("x-stub-instance", "") for _ in range(n)]


def checks(stub) -> list:
    return [r for r in stub.requests if r.method == "GET"]


def test_health_checks_take_a_dead_instance_out_and_bring_it_back(stubs, gateway):
    a, b = stubs("a", "b")
    gw = gateway({"model": {"load-balance": {"type": "round-robin"}, "health-check": health(), "retries": 0,
                            "services": {"chat": {"instances": [instance("llama", a), instance("llama", b)]}}}})
    time.sleep(0.8)
    # One checker per process (not one per worker): about 0.8 s / 300 ms checks, not twice that.
    got = checks(a)
    assert 2 <= len(got) <= 4, len(got)
    assert got[0].path == "/v1/models" and got[0].headers["user-agent"] == "jairouter-health-check"
    assert sorted(set(served_by(gw, 10))) == ["a", "b"]
    a.stop()
    time.sleep(1.2)
    codes = [post(gw).status_code for _ in range(20)]
    assert codes == [200] * 20, "the dead instance is out of rotation before a request meets it"
    a.start()
    time.sleep(0.8)
    with httpx.Client(timeout=10) as one_worker:  # whose rotation alternates exactly
        assert served_by(gw, 10, one_worker).count("a") == 5, "back in rotation by itself"


def test_a_failing_health_check_marks_down_and_all_down_is_503(stubs, gateway):
    (sick,) = stubs("sick")
    gw = chat_gateway(gateway, [sick], **{"health-check": health(path="/health")})
    sick.fail_status = 503
    time.sleep(1.2)
    sick.fail_status = None
    sick.clear()
    r = post(gw)
    # The next check (within 300 ms) brings it back; this request came before it.
    assert r.status_code in (200, 503)
    if r.status_code == 503:
        assert error_of(r)["code"] == "no_available_instance" and "healthy" in error_of(r)["message"]
        assert r.headers["retry-after"]
    time.sleep(0.8)
    assert post(gw).status_code == 200
    assert all(r.path == "/health" for r in checks(sick))


def test_a_backend_stopped_under_load_is_routed_around_and_returns(stubs, gateway):
    servers = stubs("s1", "s2", "s3")
    gw = chat_gateway(gateway, servers, breaker(**{"failure-threshold": 3, "timeout": 1500}), retries=2,
                      **{"health-check": health(interval=500)})
    victim = servers[1]
    results: list[tuple[float, int, str]] = []

    def client(deadline):
        with httpx.Client(timeout=10) as c:
            while time.monotonic() < deadline:
                try:
                    r = c.post(gw.url + "/v1/chat/completions", content=CHAT, headers=JSON)
                    results.append((time.monotonic(), r.status_code, r.headers.get("x-stub-instance", "")))
                except httpx.HTTPError:
                    results.append((time.monotonic(), 0, ""))

    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, start + 8) for _ in range(4)]
        time.sleep(1.5)
        victim.stop()
        stopped_at = time.monotonic()
        time.sleep(2)
        victim.start()
        restarted_at = time.monotonic()
        for f in futures:
            f.result()
    failed = [r for r in results if r[1] != 200]
    # Requests that met the dead instance were retried on another one.
    print(f"\nstopped 1 of 3 under load: {len(results)} requests, {len(failed)} failed")
    assert not failed, failed
    during = [r for r in results if stopped_at + 0.5 < r[0] < restarted_at]
    assert during and all(r[2] != "s2" for r in during if r[1] == 200)
    after = [r for r in results if r[0] > restarted_at + 2]
    assert any(r[2] == "s2" for r in after), "the instance came back by itself"
    gw.stop()  # flushes Envoy's log
    log = gw.logs()
    assert "circuit breaker of instance chat-1: Closed -> Open" in log
    assert "instance chat-1 marked down by health checks" in log
    assert "instance chat-1 healthy again" in log


def test_a_failed_attempt_is_retried_on_another_instance_and_trips_the_breaker(stubs, gateway):
    bad, good = stubs("bad", "good")
    gw = chat_gateway(gateway, [bad, good], breaker(), retries=2)
    for status in (500, 503, 429):
        bad.fail_status = status
        bad.clear()
        good.clear()
        codes = [post(gw).status_code for _ in range(10)]
        assert codes == [200] * 10, (status, codes)
        assert len(good.requests) == 10
        if status == 500:
            # Failed first attempts count against the chosen instance: its breaker opens.
            assert len(bad.requests) == 3
            time.sleep(2.1)  # half-open again for the next status


def test_a_refused_connection_is_retried(stubs, gateway):
    dead, alive = stubs("dead", "alive")
    gw = chat_gateway(gateway, [dead, alive], retries=1)
    dead.stop()
    assert [post(gw).status_code for _ in range(10)] == [200] * 10
    assert len(alive.requests) == 10


def test_retries_are_bounded_and_per_service(stubs, gateway):
    a, b, c = stubs("a", "b", "c")
    gw = gateway({"model": {"load-balance": {"type": "round-robin"}, "retries": 1, "services": {
        "chat": {"instances": [instance("llama", a), instance("llama", b)]},
        "embedding": {"retries": 0, "instances": [instance("bge", c), instance("bge", c)]}}}})
    a.fail_status = b.fail_status = 503
    r = post(gw)
    assert r.status_code == 503 and r.headers["x-envoy-attempt-count"] == "2"
    assert len(a.requests) + len(b.requests) == 2, "one retry, on the other instance"
    c.fail_status = 500
    with httpx.Client(timeout=10) as client:
        r = client.post(gw.url + "/v1/embeddings", content=json_body({"model": "bge", "input": "x"}), headers=JSON)
    assert r.status_code == 500 and len(c.requests) == 1


def test_uploads_are_retried_only_when_configured(stubs, gateway):
    from harness import multipart
    body, content_type = multipart([("model", "whisper"), ("file", ("a.wav", b"RIFF", "audio/wav"))])
    for retry_uploads, expected in ((False, 500), (True, 200)):
        bad, good = stubs("bad", "good")
        gw = gateway({"model": {"load-balance": {"type": "round-robin"}, "retry-uploads": retry_uploads,
                                "services": {"stt": {"instances": [instance("whisper", bad), instance("whisper", good)]}}}})
        bad.fail_status = 500
        with httpx.Client(timeout=10) as client:
            codes = [client.post(gw.url + "/v1/audio/transcriptions", content=body,
                                 headers={"content-type": content_type}).status_code for _ in range(4)]
        assert expected in codes and (codes.count(200) == 4) == retry_uploads, codes


def test_a_429_with_retry_after_takes_the_instance_out_for_that_long(stubs, gateway):
    limited, other = stubs("limited", "other")
    gw = chat_gateway(gateway, [limited, other])
    limited.fail_status, limited.retry_after = 429, 2
    with httpx.Client(timeout=10) as one_worker:  # one each, whichever comes first
        first = [post(gw, client=one_worker) for _ in range(2)]
    assert sorted(r.status_code for r in first) == [200, 429]
    limited.fail_status = None
    assert served_by(gw, 10) == ["other"] * 10, "out of rotation while it asked for a pause"
    time.sleep(2.1)
    with httpx.Client(timeout=10) as one_worker:
        assert served_by(gw, 10, one_worker).count("limited") == 5, "back when the pause is over"


def test_every_instance_pausing_gives_a_429_with_retry_after(stubs, gateway):
    (only,) = stubs("only")
    gw = chat_gateway(gateway, [only])
    only.fail_status, only.retry_after = 429, 30
    assert post(gw).status_code == 429
    r = post(gw)
    assert r.status_code == 429 and error_of(r)["type"] == "rate_limit_error"
    assert 25 <= int(r.headers["retry-after"]) <= 30
    assert len(only.requests) == 1


def test_a_fallback_model_stands_in_when_no_instance_can_serve(stubs, gateway):
    primary, stand_in = stubs("primary", "stand-in")
    gw = gateway({"model": {"retries": 0, "circuit-breaker": {"failure-threshold": 1, "timeout": 30000},
                            "fallback": {"models": {"llama": ["missing-too", "qwen"]}},
                            "services": {"chat": {"instances": [
                                instance("llama", primary), instance("qwen", stand_in),
                                {"name": "missing-too", "base-url": stand_in.url, "status": "down"}]}}}})
    primary.fail_status = 500
    assert post(gw).status_code == 500  # opens llama's only breaker
    small = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    large = {"messages": [{"role": "user", "content": "x" * 300_000}], "model": "llama", "stream": False}
    for body in (small, large):
        r = post(gw, body=json_body(body))
        assert r.status_code == 200, r.text
        assert r.headers["x-stub-instance"] == "stand-in"
        assert r.headers["x-jairouter-model"] == "qwen"
        received = stand_in.requests[-1]
        assert received.json()["model"] == "qwen"
        assert {k: v for k, v in received.json().items() if k != "model"} == \
            {k: v for k, v in body.items() if k != "model"}
        assert int(received.headers["content-length"]) == len(received.body)
    # Chunked upload, no content-length.
    def chunks():
        data = json_body(large)
        for i in range(0, len(data), 7000):
            yield data[i:i + 7000]
    with httpx.Client(timeout=10) as c:
        r = c.post(gw.url + "/v1/chat/completions", content=chunks(), headers=JSON)
    assert r.status_code == 200 and stand_in.requests[-1].json()["model"] == "qwen"
    # A model named by header is not rewritten: no fallback.
    r = post(gw, {"x-jairouter-model": "llama"})
    assert r.status_code == 503 and error_of(r)["code"] == "no_available_instance"
    # The model the client asked for is served by itself when it can.
    r = post(gw, body=json_body({"model": "qwen", "messages": []}))
    assert r.status_code == 200 and "x-jairouter-model" not in r.headers


def test_fallback_models_must_exist_in_the_service(tmp_path):
    from harness import render
    import yaml
    config = tmp_path / "application.yml"
    config.write_text(yaml.safe_dump({"model": {"fallback": {"models": {"llama": ["ghost"]}},
                                                "services": {"chat": {"instances": [
                                                    {"name": "llama", "base-url": "http://127.0.0.1:9"}]}}}}))
    result = render(config, "check")
    assert result.returncode != 0
    assert "model.fallback.models.llama" in result.stderr and "ghost" in result.stderr


def test_retries_never_follow_a_4xx_or_a_started_stream_and_respect_the_timeout(stubs, gateway):
    picky, other = stubs("picky", "other")
    gw = gateway({"model": {"load-balance": {"type": "round-robin"}, "retries": 2, "request-timeout": 800,
                            "circuit-breaker": {"enabled": False},
                            "services": {"chat": {"instances": [instance("llama", picky), instance("llama", other)]}}}})
    picky.fail_status = 400
    with httpx.Client(timeout=10) as one_worker:
        codes = [post(gw, client=one_worker).status_code for _ in range(10)]
    assert codes.count(400) == 5 and len(picky.requests) == 5 and len(other.requests) == 5
    picky.fail_status = None
    stream = json_body({"model": "llama", "stream": True, "messages": []})
    broken = 0
    for _ in range(4):
        try:
            post(gw, {"x-stub-break-after": "2"}, stream)
        except httpx.HTTPError:
            broken += 1
    assert broken == 4, "a stream cut after its first bytes reaches the client cut, not retried"
    assert len(picky.requests) + len(other.requests) == 14
    picky.delay = other.delay = 2.0
    started = time.monotonic()
    r = post(gw)
    assert r.status_code == 504 and time.monotonic() - started < 1.5, "request-timeout bounds every attempt"
