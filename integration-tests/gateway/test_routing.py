"""Model routing through a real Envoy loaded with the built filter (issue 2)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from harness import error_of, instance, json_body, multipart

ENDPOINTS = [
    # (path below /v1/, service, model, JSON body or None for multipart)
    ("chat/completions", "chat", "llama", {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}),
    ("completions", "chat", "llama", {"model": "llama", "prompt": "Once"}),
    ("embeddings", "embedding", "bge", {"input": ["a", "b"], "model": "bge"}),
    ("rerank", "rerank", "rr", {"query": "q", "documents": ["x", "y"], "model": "rr"}),
    ("audio/speech", "tts", "voice", {"model": "voice", "input": "hello", "voice": "alloy"}),
    ("audio/transcriptions", "stt", "whisper", None),
    ("audio/translations", "stt", "whisper", None),
    ("images/generations", "imgGen", "sd", {"prompt": "a cat", "model": "sd"}),
    ("images/edits", "imgEdit", "sd-edit", None),
]


@pytest.fixture
def every_service(stubs, gateway):
    """One stub per service; chat sits behind a base-url path prefix."""
    names = ["chat", "embedding", "rerank", "tts", "stt", "imgGen", "imgEdit"]
    servers = dict(zip(names, stubs(*names)))
    models = {"chat": "llama", "embedding": "bge", "rerank": "rr", "tts": "voice",
              "stt": "whisper", "imgGen": "sd", "imgEdit": "sd-edit"}
    services = {}
    for service, stub in servers.items():
        entry = instance(models[service], stub)
        if service == "chat":
            entry["base-url"] = stub.url + "/ollama"
        services[service] = {"instances": [entry]}
    gw = gateway({"model": {"services": services}})
    return gw, servers


@pytest.mark.parametrize("prefix", ["/v1/", "/api/v1/"])
def test_every_endpoint_reaches_its_instance_with_path_and_body_intact(every_service, prefix):
    gw, servers = every_service
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        for suffix, service, model, body in ENDPOINTS:
            stub = servers[service]
            stub.clear()
            if body is None:
                raw, ctype = multipart([("file", ("a.png" if "images" in suffix else "a.wav", b"\x00\x01RIFF" * 100, "application/octet-stream")),
                                        ("model", model), ("language", "en")])
            else:
                raw, ctype = json_body(body), "application/json"
            r = client.post(prefix + suffix + "?trace=1", content=raw, headers={"content-type": ctype})
            assert r.status_code == 200, (suffix, r.status_code, r.text)
            assert r.headers["x-stub-instance"] == service, suffix
            assert r.headers["x-jairouter-instance"] == f"{service}-0", suffix
            [received] = stub.requests
            expected_path = ("/ollama" if service == "chat" else "") + "/v1/" + suffix
            assert received.path == expected_path, suffix
            assert received.query == "trace=1"
            assert received.body == raw, suffix
            assert "x-jairouter-cluster" not in received.headers


def test_models_are_listed_from_the_configuration(every_service):
    gw, _ = every_service
    r = httpx.get(gw.url + "/v1/models", timeout=5)
    assert r.status_code == 200
    listed = {m["id"] for m in r.json()["data"]}
    assert listed == {"llama", "bge", "rr", "voice", "whisper", "sd", "sd-edit"}
    assert all(m["object"] == "model" for m in r.json()["data"])
    r = httpx.get(gw.url + "/api/v1/models/whisper", timeout=5)
    assert r.status_code == 200 and r.json()["id"] == "whisper"


def test_streaming_chunks_arrive_as_the_backend_sends_them(stubs, gateway):
    [stub] = stubs("chat")
    gw = gateway({"model": {"services": {"chat": {"instances": [instance("llama", stub)]}}}})
    body = {"model": "llama", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    gap = 0.3
    arrivals = []
    with httpx.Client(timeout=10) as client:
        start = time.monotonic()
        with client.stream("POST", gw.url + "/v1/chat/completions", content=json_body(body),
                           headers={"content-type": "application/json", "x-stub-chunks": "4",
                                    "x-stub-chunk-delay-ms": str(int(gap * 1000))}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            data = b""
            for chunk in r.iter_raw():
                arrivals.append(time.monotonic() - start)
                data += chunk
    events = [line for line in data.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert sum(1 for e in events if '"chat.completion.chunk"' in e) >= 4
    # Unbuffered: the first chunk comes well before the last, and the chunks keep their gaps.
    assert len(arrivals) >= 4, arrivals
    assert arrivals[0] < gap, arrivals
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if b - a > gap * 0.5]
    assert len(gaps) >= 3, arrivals


def test_large_body_with_model_first_streams_through(stubs, gateway):
    [stub] = stubs("chat")
    gw = gateway({"model": {"services": {"chat": {"instances": [instance("llama", stub)]}}}})
    filler = "x" * (5 * 1024 * 1024)
    raw = json_body({"model": "llama", "messages": [{"role": "user", "content": filler}]})
    r = httpx.post(gw.url + "/v1/chat/completions", content=raw,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
    assert stub.requests[-1].body == raw


def test_twenty_megabyte_upload_is_not_buffered(stubs, gateway):
    """Over the default 10 MiB scan limit and Envoy's buffer: only streaming can pass it."""
    [stub] = stubs("stt")
    gw = gateway({"model": {"services": {"stt": {"instances": [instance("whisper", stub)]}}}})
    audio = bytes(range(256)) * (20 * 1024 * 1024 // 256)
    raw, ctype = multipart([("model", "whisper"), ("file", ("big.wav", audio, "audio/wav"))])

    def chunks():
        for at in range(0, len(raw), 256 * 1024):
            yield raw[at:at + 256 * 1024]

    r = httpx.post(gw.url + "/v1/audio/transcriptions", content=chunks(),
                   headers={"content-type": ctype}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["file_bytes"] == len(audio)
    assert stub.requests[-1].body == raw


def test_model_last_is_found_within_the_limit(stubs, gateway):
    [stub] = stubs("chat")
    gw = gateway({"model": {"services": {"chat": {"instances": [instance("llama", stub)]}}}})
    raw = json_body({"messages": [{"role": "user", "content": "y" * (2 * 1024 * 1024)}], "model": "llama"})
    r = httpx.post(gw.url + "/v1/chat/completions", content=raw,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text
    assert stub.requests[-1].body == raw


def test_multipart_transcription_routed_by_its_model_field(stubs, gateway):
    a, b = stubs("whisper-a", "whisper-b")
    gw = gateway({"model": {"services": {"stt": {"instances": [instance("whisper-1", a), instance("whisper-2", b)]}}}})
    for model, stub in [("whisper-2", b), ("whisper-1", a)]:
        raw, ctype = multipart([("file", ("speech.wav", b"RIFF" + b"\x00" * 300_000, "audio/wav")), ("model", model)])
        r = httpx.post(gw.url + "/v1/audio/transcriptions", content=raw, headers={"content-type": ctype}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["x-stub-instance"] == stub.name
        assert r.json()["model"] == model


def test_model_header_override(stubs, gateway):
    [stub] = stubs("embed")
    gw = gateway({"model": {"services": {"embedding": {"instances": [instance("bge", stub)]}}}})
    # The header decides; the body is not read (it is not even JSON here).
    r = httpx.post(gw.url + "/v1/embeddings", content=b"opaque", headers={"x-jairouter-model": "bge"}, timeout=5)
    assert r.status_code in (200, 400)  # the stub judges the body; the gateway routed it
    assert r.headers["x-stub-instance"] == "embed"


def test_weights_are_exact_per_worker_and_within_a_rotation_across_workers(stubs, gateway):
    servers = stubs("w1", "w2", "w3")
    gw = gateway({"model": {"load-balance": {"type": "round-robin"}, "services": {"chat": {"instances": [
        instance("llama", s, weight=w) for s, w in zip(servers, [1, 2, 3])]}}}}, concurrency=2)
    body = json_body({"model": "llama", "messages": []})
    post = dict(content=body, headers={"content-type": "application/json"})

    # One connection is one worker: its requests follow that worker's smooth order, so any
    # 6 in a row (one rotation of weights 1:2:3) are exact, from wherever the worker stood.
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        served = [c.post("/v1/chat/completions", **post).headers["x-stub-instance"] for _ in range(60)]
    assert {name: served.count(name) for name in ("w1", "w2", "w3")} == {"w1": 10, "w2": 20, "w3": 30}
    for at in range(0, 60, 6):
        window = served[at:at + 6]
        assert [window.count(n) for n in ("w1", "w2", "w3")] == [1, 2, 3], served

    def send(_):
        with httpx.Client(timeout=10) as c:  # a fresh connection each time spreads over workers
            return c.post(gw.url + "/v1/chat/completions", **post).headers["x-stub-instance"]

    # Across workers each worker's rotation is exact but for the last one it began: an
    # instance is off its share by less than its weight per worker (weighted random would be
    # off by ~9, 12 and 12 here, one standard deviation).
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(send, range(600)))
    for name, weight in (("w1", 1), ("w2", 2), ("w3", 3)):
        assert abs(served.count(name) - 100 * weight) < gw.concurrency * weight, (name, served.count(name))


def test_inactive_and_zero_weight_instances_get_nothing(stubs, gateway):
    on, off, zero = stubs("on", "off", "zero")
    gw = gateway({"model": {"services": {"chat": {"instances": [
        instance("llama", on), instance("llama", off, status="inactive"), instance("llama", zero, weight=0)]}}}})
    with httpx.Client(base_url=gw.url, timeout=5) as c:
        for _ in range(20):
            r = c.post("/v1/chat/completions", content=json_body({"model": "llama"}), headers={"content-type": "application/json"})
            assert r.headers["x-stub-instance"] == "on"
    assert not off.requests and not zero.requests


def test_spoofed_routing_headers_are_ignored(stubs, gateway):
    good, victim = stubs("good", "victim")
    gw = gateway({"model": {"services": {
        "chat": {"instances": [instance("llama", good)]},
        "embedding": {"instances": [instance("secret", victim)]}}}})
    spoof = {"x-jairouter-cluster": "jairouter-embedding-0",
             "x-envoy-original-dst-host": f"127.0.0.1:{victim.port}",
             "content-type": "application/json"}
    with httpx.Client(base_url=gw.url, timeout=5) as c:
        r = c.post("/v1/chat/completions", content=json_body({"model": "llama"}), headers=spoof)
        assert r.headers["x-stub-instance"] == "good"
        for path, body in [("/v1/chat/completions", {"model": "nope"}), ("/v1/unknown", {}),
                           ("/v1/chat/completions", {"messages": []})]:
            r = c.post(path, content=json_body(body), headers=spoof)
            assert r.status_code in (400, 404), (path, r.status_code)
            error_of(r)
        r = c.get("/anything", headers=spoof)
        assert r.status_code == 404
    assert not victim.requests


def test_errors_are_openai_shaped_with_the_right_status(stubs, gateway):
    [stub] = stubs("chat")
    gw = gateway({"model": {
        "gateway": {"max-body-bytes": 65536},
        "services": {"chat": {"instances": [instance("llama", stub), instance("parked", stub, status="inactive")]}}}})
    cases = [
        # Cut short before the model. (Once the model is read, the rest is the backend's to judge.)
        ("/v1/chat/completions", b'{"messages": [1, ', 400, "invalid_json"),
        ("/v1/chat/completions", b"definitely not json", 400, "invalid_json"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "missing_model"),
        ("/v1/chat/completions", b'{"model": 42}', 400, "invalid_json"),
        ("/v1/chat/completions", b'{"model": "gpt-99"}', 404, "model_not_found"),
        ("/v1/embeddings", b'{"model": "llama"}', 404, "service_not_configured"),
        ("/v1/chat/completions", b'{"model": "parked"}', 503, "no_available_instance"),
        ("/v1/chat/completions", json_body({"messages": "z" * 100_000, "model": "llama"}), 413, "request_too_large"),
    ]
    with httpx.Client(base_url=gw.url, timeout=5) as c:
        for path, raw, status, code in cases:
            r = c.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == status, (raw[:40], r.status_code, r.text)
            assert error_of(r)["code"] == code
        r = c.get("/v1/chat/completions")
        assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
        r = c.post("/v2/whatever", content=b"{}")
        assert r.status_code == 404 and error_of(r)["code"] == "unknown_url"
    assert not stub.requests
    # After all that, normal traffic is served.
    r = httpx.post(gw.url + "/v1/chat/completions", content=json_body({"model": "llama"}),
                   headers={"content-type": "application/json"}, timeout=5)
    assert r.status_code == 200


def test_instance_header_can_be_turned_off(stubs, gateway):
    [stub] = stubs("chat")
    gw = gateway({"model": {"gateway": {"instance-header": False},
                            "services": {"chat": {"instances": [instance("llama", stub)]}}}})
    r = httpx.post(gw.url + "/v1/chat/completions", content=json_body({"model": "llama"}), timeout=5)
    assert r.status_code == 200
    assert "x-jairouter-instance" not in r.headers


def test_backend_errors_pass_through_untouched(stubs, gateway):
    [stub] = stubs("chat")
    gw = gateway({"model": {"services": {"chat": {"instances": [instance("llama", stub)]}}}})
    r = httpx.post(gw.url + "/v1/chat/completions", content=json_body({"model": "llama"}),
                   headers={"x-stub-status": "429"}, timeout=5)
    assert r.status_code == 429
    assert error_of(r)["code"] == "stub_failure"
    r = httpx.post(gw.url + "/v1/chat/completions", content=json_body({"model": "llama"}), timeout=5)
    body = r.json()
    assert body["object"] == "chat.completion" and "success" not in body  # no envelope


def wasm_exports(path) -> set[str]:
    """Names in a .wasm module's export section (section id 7)."""
    data = path.read_bytes()

    def leb(pos):
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, pos

    names, pos = set(), 8
    while pos < len(data):
        section, pos = data[pos], pos + 1
        size, pos = leb(pos)
        if section == 7:
            count, p = leb(pos)
            for _ in range(count):
                length, p = leb(p)
                names.add(data[p:p + length].decode())
                p += length + 1  # the kind byte
                _, p = leb(p)    # the index
        pos += size
    return names


def test_abi_version_lets_envoy_reselect_the_route():
    """The filter skips the clear_route_cache call because Envoy re-selects the route itself
    when an ABI 0.2.1 module changes a request header (HOST_CLEARS_ROUTE_CACHE in wasm.rs).
    A newer SDK exporting another ABI must turn that call back on."""
    from harness import WASM
    abi = {name for name in wasm_exports(WASM) if name.startswith("proxy_abi_version_")}
    assert abi == {"proxy_abi_version_0_2_1"}
