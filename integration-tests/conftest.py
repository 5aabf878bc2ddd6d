"""Fixtures for the end-to-end tests: stub backends and Envoy gateways that stop themselves."""

from __future__ import annotations

import pytest

from harness import ENVOY, RENDER, WASM, Gateway
from stub_backend import StubServer


def pytest_collection_finish(session):
    # A test module that needs no Envoy (the stubs' own tests) says NEEDS_BUILD = False.
    if not any(getattr(getattr(item, "module", None), "NEEDS_BUILD", True) for item in session.items):
        return
    missing = [str(p) for p in (ENVOY, RENDER, WASM) if not p.exists()]
    if missing:
        pytest.exit(f"build first (./build.sh build); missing: {', '.join(missing)}", returncode=2)


@pytest.fixture
def stubs():
    """stubs("a", "b") starts one stub backend per name; all stop after the test. `kind` picks
    another protocol (vendor_stubs.py), with its own options: stubs("c", kind=AnthropicStub, api_key=...)."""
    started: list[StubServer] = []

    def start(*names: str, kind: type[StubServer] = StubServer, **options) -> list[StubServer]:
        servers = [kind(name, **options).start() for name in names]
        started.extend(servers)
        return servers

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gateway(tmp_path):
    """gateway(config, concurrency=2) starts an Envoy with our filter; it stops after the test."""
    running: list[Gateway] = []

    def start(config, concurrency: int = 2, name: str = "gw", **options) -> Gateway:
        gw = Gateway(tmp_path / f"{name}{len(running)}", config, concurrency, **options).start()
        running.append(gw)
        return gw

    yield start
    for gw in running:
        gw.stop()
