"""Envoy has nothing to say against the bootstraps we render (issue 15).

A deprecated field works today and stops the gateway from starting on the Envoy release that
removes it; the edge settings Envoy asks for (a limit on downstream connections) are the ones an
internet-facing gateway needs. Every shape of bootstrap the repository renders is checked: the
demo (`./build.sh up`), live (`--live-dir`, as the Helm chart and the image run it) and static,
and one with every feature that adds Envoy configuration (jwt_authn, the global rate-limit
service, retries, health checks, TLS to a backend, the probes-and-metrics listener, the
OpenTelemetry tracer over gRPC; over HTTP and TLS in a case of its own). `--mode
validate` reports deprecated fields; some warnings (the connection limit) only come at a real
start, so each is also started, on ephemeral loopback ports, until it is ready.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from harness import ENVOY, ROOT, WASM, instance, render

DEMO = ROOT / "envoy" / "demo" / "application.yml"

# Every feature that puts something of its own into the bootstrap. The backends are dead
# loopback ports: nothing is sent anywhere but 127.0.0.1.
EVERY_FEATURE = """\
model:
  retries: 2
  request-timeout: 600000
  health-check: {interval: 60000, timeout: 1000}
  gateway:
    trusted-hops: 1
    global-rate-limit: {address: "127.0.0.1:9", domain: jairouter}
    jwt:
      issuer: https://idp.example.test
      audiences: [jairouter]
      jwks-file: JWKS
  services:
    chat:
      instances:
        - {name: m, base-url: "http://127.0.0.1:9", weight: 2}
        - {name: m, base-url: "http://127.0.0.1:10", weight: 1}
    embedding:
      instances:
        - {name: e, base-url: "https://127.0.0.1:11/v1"}
jairouter:
  tracing:
    enabled: true
    service-version: "1.0"
    sampling: {ratio: 0.5}
    exporter: {type: otlp, otlp: {endpoint: "http://127.0.0.1:12", headers: {x-scope: test}}}
"""

# The other way to the collector: OTLP/HTTP over TLS.
TRACING_HTTP = """\
model:
  services:
    chat:
      instances:
        - {name: m, base-url: "http://127.0.0.1:9"}
jairouter:
  tracing:
    enabled: true
    exporter: {otlp: {endpoint: "https://127.0.0.1:13", protocol: http/protobuf}}
"""

CASES = {
    "demo-static": (DEMO, False, ()),
    "demo-live": (DEMO, True, ()),
    "every-feature-static": (EVERY_FEATURE, False, ("--metrics-port", "0")),
    "every-feature-live": (EVERY_FEATURE, True, ("--metrics-port", "0")),
    "tracing-http-static": (TRACING_HTTP, False, ()),
    "tracing-http-live": (TRACING_HTTP, True, ()),
}

# What Envoy must never say about our configuration: nothing at warning level or above (a
# deprecated field, the missing connection limit, ...) but our own SIGTERM at the end.
FORBIDDEN = [
    re.compile(r"deprecated", re.IGNORECASE),
    re.compile(r"no configured limit to the number of allowed active downstream connections"),
    re.compile(r"\]\[(warning|error|critical)\]\[(?!.*caught ENVOY_SIGTERM)"),
]


def rendered(tmp_path: Path, case: str) -> Path:
    source, live, flags = CASES[case]
    config = tmp_path / "application.yml"
    if isinstance(source, Path):
        config.write_text(source.read_text())
    else:
        jwks = tmp_path / "jwks.json"
        jwks.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256",
                                              "k": "YW4taHMyNTYtc2VjcmV0LWZvci10ZXN0cy1vbmx5LTMyYg"}]}))
        config.write_text(source.replace("JWKS", str(jwks)))
    out = tmp_path / "envoy.json"
    result = render(config, "bootstrap", "--wasm", str(WASM), "--out", str(out), "--port", "0",
                    "--admin-port", "0", "--status-port", "0", "--listen-address", "127.0.0.1",
                    "--access-log", str(tmp_path / "access.log"), "--ca-file", "/etc/ssl/certs/ca-certificates.crt",
                    *(["--live-dir", str(tmp_path / "live")] if live else []), *flags)
    assert result.returncode == 0, result.stderr
    return out


def complaints(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(p.search(line) for p in FORBIDDEN)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_reports_no_deprecated_field(tmp_path, case):
    bootstrap = rendered(tmp_path, case)
    check = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(bootstrap), "--log-level", "warning",
                            "--use-dynamic-base-id"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert complaints(check.stdout + check.stderr) == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_real_start_warns_about_nothing_we_configure(tmp_path, case):
    bootstrap = rendered(tmp_path, case)
    log = tmp_path / "envoy.log"
    admin_file = tmp_path / "admin-address"
    envoy = subprocess.Popen([str(ENVOY), "-c", str(bootstrap), "--concurrency", "1", "--use-dynamic-base-id",
                              "--admin-address-path", str(admin_file), "--log-level", "warning",
                              "--log-path", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert envoy.poll() is None, f"Envoy exited with {envoy.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"Envoy never became ready:\n{log.read_text()[-3000:]}"
            if admin_file.exists() and admin_file.read_text().strip():
                admin = admin_file.read_text().strip()
                try:
                    if httpx.get(f"http://{admin}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
    finally:
        envoy.terminate()
        envoy.wait(timeout=10)
    assert complaints(log.read_text()) == []


def test_retries_still_keep_a_copy_of_bodies_up_to_1_mib(stubs, gateway):
    """`request_body_buffer_limit` does what the deprecated field did: bodies up to 1 MiB are
    retried on another instance, larger ones go through once (Envoy holds no copy of them)."""
    bad, good = stubs("bad", "good")
    gw = gateway({"model": {"load-balance": {"type": "round-robin"}, "retries": 1,
                            "circuit-breaker": {"enabled": False},
                            "services": {"chat": {"instances": [instance("m", bad), instance("m", good)]}}}})
    bad.fail_status = 500

    def attempts(size: int) -> list[tuple[int, str]]:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * size}]})
        out = []
        # One connection, one worker: its rotation sends exactly every other request to bad.
        with httpx.Client(timeout=30) as client:
            for _ in range(4):
                r = client.post(gw.url + "/v1/chat/completions", content=body,
                                headers={"content-type": "application/json"})
                out.append((r.status_code, r.headers.get("x-envoy-attempt-count", "1")))
        return out

    small = attempts(512 * 1024)
    assert all(status == 200 for status, _ in small), small
    assert ("2" in {count for _, count in small}), small  # some were retried, and succeeded
    large = attempts(2 * 1024 * 1024)
    assert sorted(large) == [(200, "1"), (200, "1"), (500, "1"), (500, "1")], large
