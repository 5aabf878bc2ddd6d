"""Limits across replicas (`gateway.global-rate-limit`) on the real engine: two Envoy replicas with
the gateway's bootstrap share one jairouter-ratelimit service and one Redis (Debian's
redis-server, started here on a loopback port). Request limits admit exactly their amount across
both replicas, token budgets reserve at admission and settle (refunds included) from usage,
and Redis or the service going away gives the configured failure mode and recovers."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness import ROOT, error_of, free_port, instance, json_body

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
SERVICE_BIN = ROOT / "target" / "release" / "jairouter-ratelimit"


class Redis:
    """Debian's redis-server on a loopback port of its own, no persistence."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> "Redis":
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required (Debian: apt-get install redis-server; "
                        "./build.sh test installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--enable-debug-command", "local"],
            stdout=(self.workdir / "redis.log").open("a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class RateLimitService:
    """Our jairouter-ratelimit (envoy/ratelimit), on ports it picks itself."""

    def __init__(self, workdir: Path, redis: Redis, grpc_port: int = 0):
        self.workdir = workdir
        self.redis = redis
        self.grpc_port = grpc_port
        self.http_port = 0
        self.process: subprocess.Popen | None = None

    def start(self) -> "RateLimitService":
        assert SERVICE_BIN.exists(), f"build first (./build.sh build): {SERVICE_BIN} is missing"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(SERVICE_BIN), "--grpc-listen", f"127.0.0.1:{self.grpc_port}", "--http-listen", "127.0.0.1:0",
             "--redis-url", f"redis://127.0.0.1:{self.redis.port}/0"],
            stdout=subprocess.PIPE, stderr=(self.workdir / "ratelimit.log").open("a"), text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"LISTENING grpc=[\d.]+:(\d+) http=[\d.]+:(\d+)", line)
        assert found, f"jairouter-ratelimit said {line!r}"
        self.grpc_port, self.http_port = int(found.group(1)), int(found.group(2))
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5).text

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def engine(tmp_path):
    """A Redis and the service in front of it, stopped after the test."""
    redis = Redis(tmp_path / "redis").start()
    service = RateLimitService(tmp_path / "rls", redis).start()
    yield service
    service.stop()
    redis.stop()


def config(stub, service, *, shared=True, **model) -> dict:
    block = {"services": {"chat": {"instances": [instance("llama", stub)]}}, **model}
    if shared:
        block.setdefault("gateway", {})["global-rate-limit"] = {
            "address": service.address, "timeout-ms": 200,
            **block.get("gateway", {}).pop("global-rate-limit", {})}
    return {"model": block}


def replicas(gateway, cfg, n: int = 2, name: str = "replica") -> list:
    return [gateway(cfg, name=f"{name}{i}") for i in range(n)]


def split_burst(gws, n: int, payload: bytes, headers: dict | None = None, threads: int = 16) -> list[httpx.Response]:
    """n requests at once, alternating between the replicas."""
    local = threading.local()

    def send(i):
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=10)
        return local.client.post(gws[i % len(gws)].url + CHAT, content=payload, headers={**JSON, **(headers or {})})

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(send, range(n)))


def chat(model: str = "llama", **extra) -> bytes:
    return json_body({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def calls(gw, outcome: str, call: str = "check") -> int:
    stats = gw.stats("jairouter_global_rate_limit_calls_total")
    return sum(v for k, v in stats.items() if f"call={call};" in k and f"outcome={outcome};" in k)


def test_a_burst_split_across_two_replicas_admits_the_limit_once(stubs, gateway, engine):
    [stub] = stubs("a")
    # 60 at once, 1 a second (60 a minute): each replica alone would admit 60 of the 120.
    limit = {"rate-limit": {"enabled": True, "capacity": 60, "rate": 1, "scope": "service"}}
    # Exactness is asked of the service: a check that times out (a loaded machine, the cold
    # burst opening connections) falls back to the failure mode, so give it time to answer.
    gws = replicas(gateway, config(stub, engine, **limit, gateway={"global-rate-limit": {"timeout-ms": 2000}}))
    started = time.monotonic()
    responses = split_burst(gws, 120, chat())
    elapsed = time.monotonic() - started
    codes = [r.status_code for r in responses]
    admitted = codes.count(200)
    assert set(codes) <= {200, 429}, codes
    assert 60 <= admitted <= 60 + int(elapsed) + 1, (admitted, elapsed)
    limited = next(r for r in responses if r.status_code == 429)
    # The same 429 a local limit gives.
    assert error_of(limited)["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-limit-requests"] == "60"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.headers["x-jairouter-limit"] == "model.rate-limit"
    # The admitted ones were told what is left across replicas.
    left = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in responses if r.status_code == 200)
    assert left[0] == 0 and left[-1] >= 58, left
    # Counted by each VM and handed to Envoy once a second.
    deadline = time.monotonic() + 5
    while sum(calls(gw, "ok") + calls(gw, "over_limit") for gw in gws) < 120 and time.monotonic() < deadline:
        time.sleep(0.2)
    prometheus = httpx.get(f"{gws[0].admin_url}/stats/prometheus", timeout=5).text
    assert 'jairouter_global_rate_limit_calls_total{call="check",outcome="ok"}' in prometheus
    assert sum(calls(gw, "ok") for gw in gws) == admitted
    assert sum(calls(gw, "over_limit") for gw in gws) == 120 - admitted
    assert 'outcome="over_limit"' in engine.metrics()

    # The control: the same two replicas without the service admit twice the limit.
    [other] = stubs("b")
    solo = replicas(gateway, config(other, engine, shared=False, **limit), name="solo")
    assert [r.status_code for r in split_burst(solo, 120, chat())].count(200) >= 119


def test_per_model_per_client_and_per_key_limits_hold_across_replicas(stubs, gateway, engine):
    [stub] = stubs("a")
    cfg = config(stub, engine, **{
        "services": {"chat": {"instances": [instance("llama", stub), instance("qwen", stub)],
                              "rate-limit": {"enabled": True, "capacity": 8, "rate": 8, "scope": "model"}}}})
    gws = replicas(gateway, cfg)
    for model in ("llama", "qwen"):
        started = time.monotonic()
        codes = [r.status_code for r in split_burst(gws, 20, chat(model))]
        refill = int(8 * (time.monotonic() - started)) + 1
        assert 8 <= codes.count(200) <= 8 + refill, (model, codes, refill)

    # Per client (every test client here is 127.0.0.1).
    [other, keyed] = stubs("b", "c")
    cfg = config(other, engine, **{"rate-limit": {"enabled": True, "capacity": 10, "rate": 10, "scope": "client-ip"}})
    client_gws = replicas(gateway, cfg, name="client")
    started = time.monotonic()
    codes = [r.status_code for r in split_burst(client_gws, 24, chat())]
    refill = int(10 * (time.monotonic() - started)) + 1
    assert 10 <= codes.count(200) <= 10 + refill, (codes, refill)

    # Per API key: its quota of 6 a minute, whichever replica the key is used on.
    from test_api_keys import hash_key
    keys = {"jairouter": {"security": {"api-key": {"enabled": True, "keys": [
        {"key-id": "team-a", "key-hash": hash_key("sk-team-a-0123456789"), "permissions": ["chat"],
         "rate-limit-per-minute": 6}]}}}}
    cfg = config(keyed, engine)
    gws = [gateway(cfg, name=f"keyed{i}", api_keys=keys) for i in range(2)]
    responses = split_burst(gws, 14, chat(), {"authorization": "Bearer sk-team-a-0123456789"})
    assert [r.status_code for r in responses].count(200) == 6, [r.status_code for r in responses]
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["x-jairouter-limit"] == "jairouter.security.api-key.keys[team-a].rate-limit-per-minute"


def reserved_for(payload: bytes, max_tokens: int) -> int:
    return -(-len(payload) // 4) + max_tokens


def test_fifty_concurrent_requests_against_a_budget_for_ten_admit_ten_and_never_overrun_it(stubs, gateway, engine):
    [stub] = stubs("a")
    payload = chat(max_tokens=200)
    reserve = reserved_for(payload, 200)
    budget = 10 * reserve + reserve // 2
    # A check that times out fails open to the local budget (each replica's own): exactness is
    # asked of the service, so give the first, cold burst (connections opening) time to answer.
    cfg = config(stub, engine, **{"token-limit": {"enabled": True, "tokens-per-minute": budget, "scope": "model"}},
                 gateway={"global-rate-limit": {"timeout-ms": 2000}})
    gws = replicas(gateway, cfg)
    # Each answer really uses what it reserved: the budget holds exactly what was admitted.
    prompt = reserve - 200
    started = time.monotonic()
    responses = split_burst(gws, 50, payload, {"x-stub-usage": f"{prompt},200"}, threads=50)
    elapsed = time.monotonic() - started
    admitted = [r for r in responses if r.status_code == 200]
    # The budget refills budget/60 a second while the burst runs: after ten, half a reservation is
    # left, so a burst longer than ~2.9 s (a loaded CI machine) may rightly admit an eleventh.
    refilled = budget * elapsed / 60
    used = sum(prompt + 200 for _ in admitted)
    print(f"global token burst: {len(admitted)} of 50 admitted in {elapsed:.2f}s; used {used} of "
          f"{budget} + {refilled:.0f} refilled")
    # Every admitted request was admitted by the service, none by a check that failed open (the
    # counts reach Envoy within a second).
    deadline = time.monotonic() + 5
    while sum(calls(gw, "ok") + calls(gw, "unavailable") for gw in gws) < len(admitted) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sum(calls(gw, "unavailable") for gw in gws) == 0
    assert sum(calls(gw, "ok") for gw in gws) == len(admitted)
    assert len(admitted) >= 10, [r.status_code for r in responses]
    assert used <= budget + refilled, [r.status_code for r in responses]
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["x-ratelimit-limit-tokens"] == str(budget)


def test_unused_estimates_are_given_back_across_replicas(stubs, gateway, engine):
    [stub] = stubs("a")
    payload = chat(max_tokens=1000)
    reserve = reserved_for(payload, 1000)
    # Room for two reservations; every answer uses 5 tokens of its ~1000.
    cfg = config(stub, engine, **{"token-limit": {"enabled": True, "tokens-per-minute": 2 * reserve + 10,
                                                   "scope": "model"}})
    gws = replicas(gateway, cfg)
    with httpx.Client(timeout=10) as c:
        for gw in gws:
            assert c.post(gw.url + CHAT, content=payload, headers={**JSON, "x-stub-usage": "3,2"}).status_code == 200
        # The settlements go out within a tick (200 ms); then the budget has room again.
        time.sleep(1.0)
        again = [c.post(gw.url + CHAT, content=payload, headers={**JSON, "x-stub-usage": "3,2"}).status_code
                 for gw in gws]
    assert again == [200, 200]
    deadline = time.monotonic() + 5
    while sum(calls(gw, "ok", call="settle") for gw in gws) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sum(calls(gw, "ok", call="settle") for gw in gws) >= 2
    assert 'method="settle",outcome="ok"' in engine.metrics()


def test_redis_going_away_fails_open_under_local_limits_then_recovers(stubs, gateway, engine):
    [stub] = stubs("a")
    services = {"chat": {"instances": [instance("llama", stub), instance("qwen", stub)],
                         # 60 a minute per model: each replica's own bucket is the floor.
                         "rate-limit": {"enabled": True, "capacity": 60, "rate": 1, "scope": "model"}}}
    gws = replicas(gateway, config(stub, engine, services=services))
    # Fail-closed replicas beside them, on the same engine.
    closed = replicas(gateway, config(stub, engine, services=services, gateway={
        "global-rate-limit": {"failure-mode-deny": True}}), name="closed")
    with httpx.Client(timeout=10) as c:
        assert c.post(gws[0].url + CHAT, content=chat(), headers=JSON).status_code == 200
        engine.redis.stop()
        started = time.monotonic()
        codes = [c.post(gws[i % 2].url + CHAT, content=chat(), headers=JSON).status_code for i in range(160)]
        elapsed = time.monotonic() - started
        # Open: each replica's own bucket (60, 1 a second) is all that holds, and no request hangs.
        assert set(codes) <= {200, 429}, codes
        assert 2 * 60 - 1 <= codes.count(200) <= 2 * 60 + 2 * int(elapsed) + 2, (codes.count(200), elapsed)
        assert elapsed / 160 < 0.25, elapsed
        refused = c.post(closed[0].url + CHAT, content=chat(), headers=JSON)
        assert refused.status_code == 503, refused.text
        assert error_of(refused)["code"] == "rate_limit_service_unavailable"
        assert refused.headers["retry-after"] == "1"
        deadline = time.monotonic() + 5
        while not all(calls(gw, "unavailable") >= 1 for gw in gws) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(calls(gw, "unavailable") >= 1 for gw in gws)
        # Logged when the outage started (once per VM), not per request.
        for gw in gws:
            assert gw.logs().count("rate-limit service is unavailable") <= gw.concurrency, gw.logs()
        assert httpx.get(f"http://127.0.0.1:{engine.http_port}/healthz", timeout=5).status_code == 503

        # Redis back on its port: the same service, no restart, shares the limit again (on the
        # other model, whose local buckets the outage left full).
        engine.redis.start()
        time.sleep(1.0)
        started = time.monotonic()
        recovered = split_burst(gws, 140, chat("qwen"))
        refill = int(time.monotonic() - started) + 1
        codes = [r.status_code for r in recovered]
        assert 60 <= codes.count(200) <= 60 + refill, codes
        assert c.post(closed[0].url + CHAT, content=chat("qwen"), headers=JSON).status_code in (200, 429)
        assert httpx.get(f"http://127.0.0.1:{engine.http_port}/healthz", timeout=5).status_code == 200
    assert any("answers again" in gw.logs() for gw in gws)


def test_the_service_going_away_is_the_same_failure_and_it_comes_back(stubs, gateway, engine):
    [stub] = stubs("a")
    limit = {"rate-limit": {"enabled": True, "capacity": 5, "rate": 5, "scope": "service"}}
    gws = replicas(gateway, config(stub, engine, **limit))
    with httpx.Client(timeout=10) as c:
        engine.stop()
        started = time.monotonic()
        r = c.post(gws[0].url + CHAT, content=chat(), headers=JSON)
        assert r.status_code == 200 and time.monotonic() - started < 1.0
        engine.start()  # the same gRPC port
        time.sleep(0.5)
        codes = [r.status_code for r in split_burst(gws, 20, chat())]
    assert 5 <= codes.count(200) <= 7, codes


def test_a_slow_redis_costs_a_request_no_more_than_the_timeout(stubs, gateway, engine):
    [stub] = stubs("a")
    limit = {"rate-limit": {"enabled": True, "capacity": 100, "rate": 100, "scope": "service"}}
    cfg = config(stub, engine, **limit, gateway={"global-rate-limit": {"timeout-ms": 50}})
    [gw] = replicas(gateway, cfg, n=1)
    with httpx.Client(timeout=10) as c:
        assert c.post(gw.url + CHAT, content=chat(), headers=JSON).status_code == 200
        # Redis stops answering for two seconds (one command that sleeps).
        sleeper = subprocess.Popen([shutil.which("redis-cli") or "redis-cli", "-p", str(engine.redis.port),
                                    "DEBUG", "SLEEP", "2"], stdout=subprocess.DEVNULL)
        time.sleep(0.2)
        timings = []
        for _ in range(5):
            started = time.monotonic()
            r = c.post(gw.url + CHAT, content=chat(), headers=JSON)
            timings.append(time.monotonic() - started)
            assert r.status_code == 200, r.text
        sleeper.wait(timeout=10)
    # Each waited the 50 ms the gateway allows (the stub answers in a few ms), never the 2 s.
    assert max(timings) < 0.5, timings
    deadline = time.monotonic() + 5
    while calls(gw, "unavailable") < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert calls(gw, "unavailable") >= 5
