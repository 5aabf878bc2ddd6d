"""Envoy's edge settings from `gateway:` (issue 15): a global connection limit, the header and idle
timeouts and the header size limit, rendered into the bootstrap and enforced by a real Envoy."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from harness import WASM, Gateway, instance, render

REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n"


def config(stub, **gateway) -> dict:
    return {"model": {"gateway": gateway,
                      "services": {"chat": {"instances": [instance("m", stub)]}}}}


def read_response(sock: socket.socket) -> bytes:
    """One small response on a keep-alive connection (headers and a content-length body); b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def served(sock: socket.socket) -> bool:
    try:
        sock.sendall(REQUEST)
        return read_response(sock).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def connect(gw: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=5)


def test_defaults_are_rendered_and_never_cut_a_slow_model(tmp_path):
    path = tmp_path / "application.yml"
    path.write_text(json.dumps({"model": {"services": {"chat": {"instances": [
        {"name": "m", "base-url": "http://127.0.0.1:9"}]}}}}))
    out = tmp_path / "envoy.json"
    result = render(path, "bootstrap", "--wasm", str(WASM), "--out", str(out), "--metrics-port", "9090")
    assert result.returncode == 0, result.stderr
    bootstrap = json.loads(out.read_text())
    [monitor] = bootstrap["overload_manager"]["resource_monitors"]
    assert monitor["name"] == "envoy.resource_monitors.global_downstream_max_connections"
    assert monitor["typed_config"]["max_active_downstream_connections"] == 50000
    api, status, metrics = bootstrap["static_resources"]["listeners"]
    # Only the API counts: probes, metrics, the status page and the admin stay reachable.
    assert "ignore_global_conn_limit" not in api
    assert status["ignore_global_conn_limit"] and metrics["ignore_global_conn_limit"]
    assert bootstrap["admin"]["ignore_global_conn_limit"]
    hcm = api["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["request_headers_timeout"] == "10s"
    assert hcm["stream_idle_timeout"] == "600s"  # the OpenAI SDK's own 10 minutes
    assert hcm["common_http_protocol_options"] == {"idle_timeout": "3600s"}
    assert hcm["max_request_headers_kb"] == 60
    # An HTTP/2 stream may buffer what an HTTP/1 connection may (max-body-bytes + 2 MiB).
    buffer_limit = api["per_connection_buffer_limit_bytes"]
    assert hcm["http2_protocol_options"] == {"max_concurrent_streams": 100, "initial_stream_window_size": buffer_limit,
                                             "initial_connection_window_size": buffer_limit}
    # The route's whole-exchange timeout is still only `request-timeout` (none by default).
    assert hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["timeout"] == "0s"


def test_connections_past_max_connections_are_refused_while_the_gateway_serves(stubs, gateway):
    [stub] = stubs("a")
    gw = gateway(config(stub, **{"max-connections": 4}), live=False)
    held = [connect(gw) for _ in range(4)]
    try:
        for sock in held:
            assert served(sock)
        # Past the limit Envoy accepts and closes at once: no request is served on it.
        for _ in range(3):
            extra = connect(gw)
            try:
                assert not served(extra)
            finally:
                extra.close()
        overflow = sum(v for k, v in gw.stats("downstream_global_cx_overflow").items()
                       if k.startswith("listener.") and "admin" not in k)
        assert overflow >= 3, gw.stats("downstream_global_cx_overflow")
        # The connections within the limit keep being served, and so does the status page.
        for sock in held:
            assert served(sock)
        assert httpx.get(gw.status_url, timeout=5).status_code == 200
        # Freed slots are usable again.
        held.pop().close()
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            again = connect(gw)
            if served(again):
                held.append(again)
                break
            again.close()
            assert time.monotonic() < deadline, "a freed connection slot never became usable"
            time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()
    assert "panic" not in gw.logs().lower()


def test_slow_headers_get_408_and_oversized_headers_431(stubs, gateway):
    [stub] = stubs("a")
    gw = gateway(config(stub, **{"request-headers-timeout": 500, "max-request-headers-kb": 2}), live=False)
    sock = connect(gw)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")  # and never the end
        started = time.monotonic()
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 5
    finally:
        sock.close()
    r = httpx.get(gw.url + "/v1/models", headers={"x-big": "a" * 4096}, timeout=5)
    assert r.status_code == 431, r.text
    assert httpx.get(gw.url + "/v1/models", timeout=5).status_code == 200


def test_an_http2_client_may_send_a_prompt_whose_model_comes_last(stubs, gateway, tmp_path):
    """The HTTP/2 windows are the stream's buffer: they must hold what the filter reads before the model."""
    if shutil.which("curl") is None:
        pytest.skip("curl (with HTTP/2) is not installed")
    [stub] = stubs("a")
    gw = gateway(config(stub), live=False)
    body = tmp_path / "prompt.json"
    body.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * (3 * 1024 * 1024)}], "model": "m"}))
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                          "-H", "content-type: application/json", "--data-binary", f"@{body}",
                          gw.url + "/v1/chat/completions"], capture_output=True, text=True, timeout=60)
    assert out.stdout == "2 200", (out.stdout, out.stderr, gw.logs()[-2000:])
    assert len(stub.requests[-1].body) == body.stat().st_size
