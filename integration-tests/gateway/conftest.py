"""Fixtures of the ingress suites (Anthropic Messages, Responses): a gateway in front of one
OpenAI-compatible backend that serves chat completions only, the backend they translate to."""

from __future__ import annotations

import pytest

from harness import instance
from test_api_keys import hash_key

INGRESS_KEY = "sk-gw-ingress-0123456789abcdef"


@pytest.fixture
def vllm(stubs, gateway):
    """One OpenAI-compatible backend serving `qwen`."""
    (backend,) = stubs("vllm")
    gw = gateway({"model": {"retries": 0, "services": {"chat": {"instances": [instance("qwen", backend)]}}}})
    return gw, backend


@pytest.fixture
def guarded_vllm(stubs, gateway):
    """The same behind API keys and a rate limit of one request per second for the model, with the
    one key that may use chat: each of the gateway's own refusals is one request away."""
    (backend,) = stubs("vllm")
    keys = [{"key-id": "team", "key-hash": hash_key(INGRESS_KEY), "permissions": ["chat"]}]
    gw = gateway({
        "model": {"retries": 0,
                  "rate-limit": {"enabled": True, "capacity": 1, "rate": 1, "scope": "model"},
                  "services": {"chat": {"instances": [instance("qwen", backend)]}}},
        "jairouter": {"security": {"api-key": {"enabled": True, "keys": keys}}}})
    return gw, backend, INGRESS_KEY
