"""Balancing strategies through a real Envoy with two workers: the state they share (rotation,
in-flight counts, latency estimates) lives in Envoy's shared data, so both workers act as one."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from harness import instance, json_body

CHAT = "/v1/chat/completions"
BODY = json_body({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
JSON = {"content-type": "application/json"}


def chat_config(strategy: dict, servers, weights=None, **gateway) -> dict:
    weights = weights or [1] * len(servers)
    config = {"load-balance": strategy, "services": {"chat": {"instances": [
        instance("llama", s, weight=w) for s, w in zip(servers, weights)]}}}
    if gateway:
        config["gateway"] = gateway
    return {"model": config}


def served_by(client: httpx.Client, url: str, headers: dict | None = None, body: bytes = BODY) -> str:
    r = client.post(url + CHAT, content=body, headers={**JSON, **(headers or {})})
    assert r.status_code == 200, r.text
    return r.headers["x-stub-instance"]


def spread(gw, n: int, threads: int = 8) -> dict[str, int]:
    """n requests from `threads` keep-alive clients (their connections land on both workers)."""
    local = threading.local()

    def send(_):
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=10)
        return served_by(local.client, gw.url)

    with ThreadPoolExecutor(threads) as pool:
        served = list(pool.map(send, range(n)))
    return {name: served.count(name) for name in set(served)}


def test_random_lands_near_the_weights(stubs, gateway):
    servers = stubs("r1", "r2", "r3")
    gw = gateway(chat_config({"type": "random"}, servers, [1, 2, 3]))
    counts = spread(gw, 3000)
    for name, share in [("r1", 1 / 6), ("r2", 2 / 6), ("r3", 3 / 6)]:
        assert abs(counts.get(name, 0) / 3000 - share) <= 0.05, counts


def test_least_connections_avoids_the_slow_instance_and_leaks_no_count(stubs, gateway):
    slow, fast = stubs("slow", "fast")
    slow.delay = 0.4
    gw = gateway(chat_config({"type": "least-connections"}, [slow, fast]))
    counts = spread(gw, 80, threads=6)
    assert counts.get("fast", 0) >= 60, counts

    # Streams aborted midway by their clients must give their counts back too.
    slow.delay = 0
    for _ in range(10):
        with httpx.Client(timeout=10) as c:
            with c.stream("POST", gw.url + CHAT, content=json_body({"model": "llama", "stream": True}),
                          headers={**JSON, "x-stub-chunks": "50", "x-stub-chunk-delay-ms": "100"}) as r:
                next(r.iter_raw())
            # Leaving the block closes the connection mid-stream.
    time.sleep(1.0)
    # With every count back at zero, idle instances tie and share by weight (1:1); a leaked
    # count on either would send every sequential request to the other.
    with httpx.Client(timeout=10) as c:
        served = [served_by(c, gw.url) for _ in range(60)]
    assert served.count("slow") >= 10 and served.count("fast") >= 10, served


def client_for(address: str) -> httpx.Client:
    return httpx.Client(timeout=10, transport=httpx.HTTPTransport(local_address=address))


def owners(gw, clients: list[str], rounds: int = 1) -> dict[str, str]:
    found: dict[str, str] = {}
    for address in clients:
        with client_for(address) as c:
            seen = {served_by(c, gw.url) for _ in range(rounds)}
        assert len(seen) == 1, (address, seen)
        found[address] = seen.pop()
    return found


def test_ip_hash_keeps_clients_and_moves_few_when_an_instance_joins(stubs, gateway):
    servers = stubs("h1", "h2", "h3", "h4")
    three = gateway(chat_config({"type": "ip-hash"}, servers[:3]), name="three")
    # Ten clients, twenty requests each: each stays on its instance.
    sticky = owners(three, [f"127.0.2.{i}" for i in range(1, 11)], rounds=20)
    assert len(set(sticky.values())) >= 2, sticky

    clients = [f"127.0.3.{i}" for i in range(1, 101)]
    before = owners(three, clients)
    three.stop()
    four = gateway(chat_config({"type": "ip-hash"}, servers), name="four")
    after = owners(four, clients)
    moved = [c for c in clients if before[c] != after[c]]
    assert len(moved) <= 35, f"{len(moved)} of 100 clients moved"
    assert all(after[c] == "h4" for c in moved), "clients only move to the new instance"


def test_client_address_honours_trusted_hops_only(stubs, gateway):
    servers = stubs("x1", "x2", "x3")
    forwarded = [f"127.10.0.{i}" for i in range(1, 31)]
    # No trusted proxy: X-Forwarded-For is the client's word and changes nothing.
    direct = gateway(chat_config({"type": "ip-hash"}, servers), name="direct")
    with httpx.Client(timeout=10) as c:
        seen = {served_by(c, direct.url, {"x-forwarded-for": xff}) for xff in forwarded}
    assert len(seen) == 1, seen
    # One trusted proxy in front: the address it appended is the client.
    behind = gateway(chat_config({"type": "ip-hash"}, servers, **{"trusted-hops": 1}), name="behind")
    with httpx.Client(timeout=10) as c:
        first = {xff: served_by(c, behind.url, {"x-forwarded-for": xff}) for xff in forwarded}
        again = {xff: served_by(c, behind.url, {"x-forwarded-for": xff}) for xff in forwarded}
    assert first == again
    assert len(set(first.values())) >= 2, first


def test_header_hash_keeps_each_session_on_one_instance(stubs, gateway):
    servers = stubs("s1", "s2", "s3")
    gw = gateway(chat_config({"type": "header-hash", "hash-header": "x-session-id", "hash-field": "user"}, servers))
    sessions = [f"session-{i}" for i in range(30)]
    with httpx.Client(timeout=10) as c:
        by_header = {s: {served_by(c, gw.url, {"x-session-id": s}) for _ in range(5)} for s in sessions}
        assert all(len(v) == 1 for v in by_header.values()), by_header
        assert len({v.pop() for v in by_header.values()}) >= 2
        # The body's `user` field keys the ring when the header is absent, wherever it sits.
        for s in sessions[:10]:
            ends = {served_by(c, gw.url, body=json_body({"user": s, "model": "llama", "messages": []})),
                    served_by(c, gw.url, body=json_body({"model": "llama", "messages": [], "user": s}))}
            assert len(ends) == 1, (s, ends)


def test_least_latency_sheds_a_slow_instance_and_takes_it_back(stubs, gateway):
    a, b = stubs("a", "b")
    gw = gateway(chat_config({"type": "least-latency", "latency-decay-ms": 500}, [a, b]))
    spread(gw, 20, threads=2)  # both answer fast: estimates settle
    b.delay = 0.3
    slow_phase = spread(gw, 120, threads=4)
    assert slow_phase.get("b", 0) <= 24, slow_phase  # at most 20%

    b.delay = 0
    served = []
    with httpx.Client(timeout=10) as c:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            served.append(served_by(c, gw.url))
            time.sleep(0.02)
    recovered = served[len(served) // 2:]
    assert recovered.count("b") >= len(recovered) * 0.2, (recovered.count("b"), len(recovered))
