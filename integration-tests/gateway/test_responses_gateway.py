"""OpenAI's Responses API wired through a real Envoy (issue 32): routed by model in the chat
service, passed untouched to an instance that serves it itself, refused in OpenAI's shape where
the gateway answers (stored responses, WebSocket handshakes, other protocols, keys, limits).
Raw HTTP: what the SDKs and Codex make of it is test_responses_ingress.py's."""

from __future__ import annotations

import http.client
import time

import httpx
import pytest

from harness import error_of, instance
from test_api_keys import hash_key
from test_metrics import scrape, value

KEY = "sk-gw-responses-0123456789abcdef"
JSON = {"content-type": "application/json"}


@pytest.fixture
def backends(stubs, gateway):
    """`qwen` on a chat-completions-only stub, `gpt` on one that serves Responses itself
    (declared `responses: native`), `sonnet` on an Anthropic instance (never reached)."""
    chat, native = stubs("chat", "native")
    native.serves_responses = True
    gw = gateway({"model": {"retries": 0, "services": {"chat": {"instances": [
        instance("qwen", chat),
        instance("gpt", native, responses="native"),
        instance("sonnet", chat, adapter="claude"),
    ]}}}})
    return gw, chat, native


def post(gw, body: bytes | dict, path: str = "/v1/responses", **headers) -> httpx.Response:
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    return httpx.post(gw.url + path, content=content, headers={**JSON, **headers}, timeout=10)


def test_a_native_instance_gets_the_body_untouched_and_its_answer_comes_back(backends):
    gw, chat, native = backends
    # Odd spacing, a field no translation knows, state the gateway cannot keep: all the
    # backend's to judge, byte for byte.
    body = b'{ "model" : "gpt",\n "input": [{"role":"user","content":"Hi"}], "store": true,' \
           b' "previous_response_id": "resp_earlier", "x_vendor": {"k": [1, 2]} }'
    for path in ("/v1/responses", "/api/v1/responses"):
        native.clear()
        r = post(gw, body, path, **{"x-stub-usage": "11,4"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["object"] == "response" and answer["id"] == "resp_stub_0"
        assert (answer["usage"]["input_tokens"], answer["usage"]["output_tokens"]) == (11, 4)
        assert answer["usage"]["total_tokens"] == 15
        (received,) = native.requests
        assert received.path == "/v1/responses"
        assert received.body == body
        assert r.headers["x-jairouter-instance"] == "chat-1"
    assert not chat.requests


def test_a_native_stream_passes_event_by_event_and_its_usage_is_counted(backends):
    gw, _, native = backends
    with httpx.stream("POST", gw.url + "/v1/responses", timeout=10,
                      headers={**JSON, "x-stub-usage": "13,5"},
                      json={"model": "gpt", "input": "Hi", "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    kinds = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    # The backend's own events, as it sent them (the stub's: OpenAI's sequence for one message).
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert "response.output_text.delta" in kinds
    assert native.requests[-1].json()["stream"] is True
    time.sleep(1.5)  # each worker hands its counts to Envoy once a second
    s = scrape(gw)
    labels = {"gen_ai_request_model": "gpt", "gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai"}
    usage = lambda token_type: value(s, "gen_ai_client_token_usage_sum", **labels, gen_ai_token_type=token_type)
    assert (usage("input"), usage("output")) == (13, 5)


def test_a_chat_instance_gets_the_translation_never_the_responses_body(backends):
    gw, chat, _ = backends
    # A tool type chat completions cannot carry: refused by the translation with a 400 naming
    # the type, before the backend sees anything.
    r = post(gw, {"model": "qwen", "input": "Hi", "tools": [{"type": "web_search"}]})
    assert r.status_code == 400, r.text
    assert "web_search" in error_of(r)["message"]
    assert not chat.requests


def test_another_protocols_instance_is_501_naming_what_responses_reach(backends):
    gw, chat, _ = backends
    r = post(gw, {"model": "sonnet", "input": "Hi"})
    assert r.status_code == 501
    err = error_of(r)
    assert err["code"] == "not_supported_by_adapter"
    assert "chat-completions and Responses backends only" in err["message"]
    assert "adapter `claude`" in err["message"]
    assert not chat.requests


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/responses/resp_123"),
    ("DELETE", "/v1/responses/resp_123"),
    ("GET", "/api/v1/responses/resp_123/input_items?limit=10"),
    ("POST", "/v1/responses/resp_123/cancel"),
])
def test_stored_responses_are_404_the_gateway_keeps_none(backends, method, path):
    gw, chat, native = backends
    r = httpx.request(method, gw.url + path, timeout=10)
    assert r.status_code == 404
    err = error_of(r)
    assert err["code"] == "response_not_found"
    assert "resp_123" in err["message"] and "stores no responses" in err["message"]
    assert not chat.requests and not native.requests


def websocket_handshake(gw, path: str, method: str = "GET") -> tuple[int, bytes]:
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Authorization": "Bearer sk-codex"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_websocket_handshake_is_426_so_codex_falls_back_to_http(backends):
    gw, chat, native = backends
    for path in ("/v1/responses", "/api/v1/responses"):
        status, body = websocket_handshake(gw, path)
        assert status == 426, body
        assert b'"code":"websocket_not_supported"' in body
    # Elsewhere an upgrade is still Envoy's refusal, and a plain GET of the endpoint a 405.
    assert websocket_handshake(gw, "/v1/chat/completions")[0] == 403
    assert httpx.get(gw.url + "/v1/responses", timeout=10).status_code == 405
    assert not chat.requests and not native.requests


def test_keys_models_and_limits_refuse_in_openais_shape(stubs, gateway):
    (native,) = stubs("native")
    native.serves_responses = True
    keys = [{"key-id": "codex", "key-hash": hash_key(KEY), "permissions": ["chat"]}]
    gw = gateway({
        "model": {"retries": 0,
                  "rate-limit": {"enabled": True, "capacity": 1, "rate": 1, "scope": "model"},
                  "services": {"chat": {"instances": [instance("gpt", native, responses="native")]}}},
        "jairouter": {"security": {"api-key": {"enabled": True, "keys": keys}}}})
    ask = {"model": "gpt", "input": "Hi"}
    denied = post(gw, ask, authorization="Bearer sk-wrong")
    assert denied.status_code == 401 and error_of(denied)["type"] == "authentication_error"
    missing = post(gw, {"model": "nope", "input": "Hi"}, authorization=f"Bearer {KEY}")
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"
    assert post(gw, ask, authorization=f"Bearer {KEY}").status_code == 200
    limited = post(gw, ask, authorization=f"Bearer {KEY}")
    assert limited.status_code == 429 and error_of(limited)["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) >= 1
    assert len(native.requests) == 1
