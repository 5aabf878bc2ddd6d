"""Protocol adapters through a real Envoy (issue 17): the official `openai` client, unchanged,
against backends that speak Anthropic Messages, Gemini and native Ollama (vendor_stubs.py, which
refuse what the vendors refuse)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from harness import instance
from vendor_stubs import AnthropicStub, GeminiStub, OllamaStub

HI = [{"role": "user", "content": "Hello"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-client", max_retries=0, timeout=10)


def summaries(gw) -> list[dict]:
    time.sleep(0.3)  # Envoy writes the access log line after the response
    lines = [json.loads(line) for line in gw.access_log_path.read_text().splitlines()]
    return [json.loads(line["jairouter"]) for line in lines if line.get("jairouter")]


@pytest.fixture
def vendors(stubs, gateway):
    """One backend per protocol, each a model of its own, plus an OpenAI-compatible one."""
    (claude,) = stubs("claude", kind=AnthropicStub, api_key="sk-ant-backend")
    (gemini,) = stubs("gemini", kind=GeminiStub, api_key="gemini-backend")
    (ollama,) = stubs("ollama", kind=OllamaStub)
    (vllm,) = stubs("vllm")
    gw = gateway({"model": {"retries": 0, "services": {
        "chat": {"instances": [
            instance("claude-sonnet", claude, adapter="claude", headers={"x-api-key": "sk-ant-backend"}),
            instance("gemini-flash", gemini, adapter="gemini", headers={"x-goog-api-key": "gemini-backend"}),
            instance("qwen", ollama, adapter="ollama"),
            instance("llama", vllm),
        ]},
        "embedding": {"instances": [
            instance("gemini-embed", gemini, adapter="gemini", headers={"x-goog-api-key": "gemini-backend"}),
            instance("nomic", ollama, adapter="ollama"),
            instance("claude-embed", claude, adapter="claude"),
        ]},
    }}})
    return gw, claude, gemini, ollama, vllm


def test_claude_answers_an_openai_chat_request(vendors):
    gw, claude, *_ = vendors
    r = client(gw).chat.completions.create(
        model="claude-sonnet", stop="END", messages=[{"role": "system", "content": "Be brief."}, *HI])
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == "hello from claude"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    received = claude.requests[-1]
    assert received.path == "/v1/messages"
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.headers["x-api-key"] == "sk-ant-backend"
    assert "authorization" not in received.headers
    sent = received.json()
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 4096
    assert sent["stop_sequences"] == ["END"] and sent["messages"] == HI
    # Usage from the translated answer reaches the access log (and the token budgets).
    last = summaries(gw)[-1]
    assert last["prompt_tokens"] == r.usage.prompt_tokens
    assert last["completion_tokens"] == r.usage.completion_tokens


def test_claude_streams_openai_chunks_with_a_final_usage_chunk(vendors):
    gw, claude, *_ = vendors
    stream = client(gw).chat.completions.create(
        model="claude-sonnet", messages=HI, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-stub-chunks": "3", "x-stub-chunk-delay-ms": "50"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert claude.requests[-1].json()["stream"] is True


def test_claude_tool_calls_round_trip(vendors):
    gw, claude, *_ = vendors
    c = client(gw)
    first = c.chat.completions.create(model="claude-sonnet", messages=HI, tools=[WEATHER])
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "stub-city"}
    follow = [*HI, first.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
    second = c.chat.completions.create(model="claude-sonnet", messages=follow, tools=[WEATHER])
    assert second.choices[0].message.content == "tool said: 18C"
    sent = claude.requests[-1].json()
    assert sent["messages"][1]["content"][-1]["type"] == "tool_use"
    assert sent["messages"][2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id, "content": "18C"}
    # A streamed tool call arrives as OpenAI tool-call deltas.
    deltas = [ch.choices[0].delta for ch in c.chat.completions.create(
        model="claude-sonnet", messages=HI, tools=[WEATHER], stream=True) if ch.choices]
    arguments = "".join(tc.function.arguments or "" for d in deltas for tc in d.tool_calls or [])
    assert json.loads(arguments) == {"city": "stub-city"}


def test_gemini_chat_stream_and_embeddings(vendors):
    gw, _, gemini, *_ = vendors
    c = client(gw)
    r = c.chat.completions.create(model="gemini-flash", messages=HI, max_tokens=64, temperature=0.3)
    assert r.choices[0].message.content == "hello from gemini"
    assert r.usage.total_tokens > 0
    received = gemini.requests[-1]
    assert received.path == "/v1beta/models/gemini-flash:generateContent"
    sent = received.json()
    assert sent["generationConfig"]["maxOutputTokens"] == 64
    assert sent["contents"][0]["role"] == "user"
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="gemini-flash", messages=HI, stream=True, extra_headers={"x-stub-chunks": "3"}) if ch.choices)
    assert text == "tok0 tok1 tok2 "
    assert gemini.requests[-1].path.endswith(":streamGenerateContent")
    assert gemini.requests[-1].query == "alt=sse"
    # The SDK asks for base64 vectors by default; it decodes them to floats.
    e = c.embeddings.create(model="gemini-embed", input=["a", "b"])
    assert [len(d.embedding) for d in e.data] == [8, 8]
    assert gemini.requests[-1].path == "/v1beta/models/gemini-embed:batchEmbedContents"
    floats = c.embeddings.create(model="gemini-embed", input="a", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(e.data[0].embedding)


def test_ollama_native_chat_stream_and_embeddings(vendors):
    gw, _, _, ollama, _ = vendors
    c = client(gw)
    r = c.chat.completions.create(model="qwen", messages=HI, max_tokens=32, seed=7)
    assert r.choices[0].message.content == "hello from ollama"
    received = ollama.requests[-1]
    assert received.path == "/api/chat"
    sent = received.json()
    assert sent["stream"] is False and sent["options"] == {"num_predict": 32, "seed": 7}
    stream = c.chat.completions.create(model="qwen", messages=HI, stream=True,
                                       stream_options={"include_usage": True}, extra_headers={"x-stub-chunks": "4"})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "tok0 tok1 tok2 tok3 "
    assert chunks[-1].usage.completion_tokens > 0
    assert ollama.requests[-1].json()["stream"] is True
    e = c.embeddings.create(model="nomic", input="hello")
    assert len(e.data[0].embedding) > 0 and ollama.requests[-1].path == "/api/embed"


def test_an_ollama_at_its_v1_path_keeps_the_passthrough(stubs, gateway):
    (ollama,) = stubs("ollama", kind=OllamaStub)
    gw = gateway({"model": {"retries": 0, "services": {"chat": {"instances": [
        instance("qwen", ollama, adapter="ollama", path="/v1/chat/completions")]}}}})
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "qwen", "messages": HI})
    # The native stub has no /v1: the request went there untranslated.
    assert r.status_code == 404
    assert ollama.requests[-1].path == "/v1/chat/completions"
    assert ollama.requests[-1].json() == {"model": "qwen", "messages": HI}


def test_backend_errors_keep_their_status_as_openai_errors(vendors):
    gw, claude, gemini, ollama, _ = vendors
    c = client(gw)
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model="claude-sonnet", messages=HI, extra_headers={"x-stub-status": "400"})
    assert bad.value.body["type"] == "invalid_request_error" and bad.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="qwen", messages=HI, extra_headers={"x-stub-status": "404"})
    with pytest.raises(openai.InternalServerError) as overloaded:
        c.chat.completions.create(model="gemini-flash", messages=HI, stream=True,
                                  extra_headers={"x-stub-status": "503"})
    assert overloaded.value.status_code == 503
    # An adapter that cannot serve the endpoint: 501, before any backend is asked.
    before = len(claude.requests)
    with pytest.raises(openai.APIStatusError) as unsupported:
        c.embeddings.create(model="claude-embed", input="x")
    assert unsupported.value.status_code == 501
    assert unsupported.value.body["code"] == "not_supported_by_adapter"
    assert len(claude.requests) == before


class _Garbage(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = b"<html>not an API</html>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_malformed_backend_output_is_a_502_never_a_hang(gateway):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        gw = gateway({"model": {"retries": 0, "services": {"chat": {"instances": [
            {"name": "claude-sonnet", "base-url": url, "adapter": "claude"}]}}}})
        with pytest.raises(openai.APIStatusError) as bad:
            client(gw).chat.completions.create(model="claude-sonnet", messages=HI)
        assert bad.value.status_code == 502
        assert bad.value.body["code"] == "bad_backend_output"
    finally:
        server.shutdown()


def test_a_fallback_crosses_adapters(stubs, gateway):
    (claude,) = stubs("claude", kind=AnthropicStub)
    (ollama,) = stubs("ollama", kind=OllamaStub)
    gw = gateway({"model": {"retries": 0, "fallback": {"models": {"claude-sonnet": ["qwen"]}}, "services": {
        "chat": {"instances": [
            instance("claude-sonnet", claude, adapter="claude", status="inactive",
                     headers={"x-api-key": "sk-ant-test"}),
            instance("qwen", ollama, adapter="ollama")]}}}})
    r = client(gw).chat.completions.with_raw_response.create(model="claude-sonnet", messages=HI)
    assert r.headers["x-jairouter-model"] == "qwen"
    assert r.parse().choices[0].message.content == "hello from ollama"
    assert ollama.requests[-1].json()["model"] == "qwen" and claude.requests == []


def test_retries_go_to_a_peer_of_the_same_adapter_with_the_translated_request(stubs, gateway):
    first, second = stubs("c1", "c2", kind=AnthropicStub)
    (vllm,) = stubs("vllm")
    gw = gateway({"model": {"retries": 1, "load-balance": {"type": "round-robin"}, "services": {"chat": {
        "instances": [instance("claude-sonnet", s, adapter="claude", headers={"x-api-key": "sk-ant-test"})
                      for s in (first, second)]
        # Same model, another protocol: never a failover peer of the Anthropic ones.
        + [instance("claude-sonnet", vllm, weight=0)]}}}})
    first.fail_status = 500
    # Round-robin sends one of the two to the failing instance; its retry goes to the peer.
    # One SDK client keeps one connection, on one worker, whose rotation alternates exactly.
    sdk = client(gw)
    for _ in range(2):
        r = sdk.chat.completions.create(model="claude-sonnet", messages=HI)
        assert r.choices[0].message.content == "hello from c2"
    assert (len(first.requests), len(second.requests)) == (1, 2)
    assert vllm.requests == []
    # Every attempt carried the Messages body.
    assert all(q.json()["messages"] == HI for q in first.requests + second.requests)


def test_token_metrics_and_time_to_first_token_count_translated_streams(vendors):
    from test_metrics import scrape, value

    gw, *_ = vendors
    for model in ("claude-sonnet", "gemini-flash", "qwen"):
        list(client(gw).chat.completions.create(
            model=model, messages=HI, stream=True,
            extra_headers={"x-stub-usage": "10,5", "x-stub-chunks": "3", "x-stub-chunk-delay-ms": "20"}))
    time.sleep(1.5)
    s = scrape(gw)
    for model in ("claude-sonnet", "gemini-flash", "qwen"):
        tokens = lambda kind: value(s, "jairouter_tokens_total", service="chat", model=model, kind=kind)
        assert (tokens("prompt"), tokens("completion")) == (10, 5), model
        assert value(s, "jairouter_time_to_first_token_seconds_count", service="chat", model=model) == 1, model


def test_a_translated_streams_counts_hold_when_the_client_leaves_at_done(vendors):
    """The backend lingers after its last event; the SDK closes once it has read `[DONE]`, before
    the backend's stream ends. The counts the backend reported still count (not the estimates).
    (Gemini's streams have no last event of their own: `[DONE]` comes at the backend's end.)"""
    from test_metrics import scrape, value

    gw, *_ = vendors
    for model in ("claude-sonnet", "qwen"):
        started = time.monotonic()
        text = "".join(c.choices[0].delta.content or "" for c in client(gw).chat.completions.create(
            model=model, messages=HI, stream=True,
            extra_headers={"x-stub-usage": "10,5", "x-stub-chunks": "3", "x-stub-end-delay-ms": "1500"})
            if c.choices)
        assert text and time.monotonic() - started < 1.2, "the client had to wait for the backend's end"
    time.sleep(2.5)
    s = scrape(gw)
    for model in ("claude-sonnet", "qwen"):
        tokens = lambda kind: value(s, "jairouter_tokens_total", service="chat", model=model, kind=kind)
        assert (tokens("prompt"), tokens("completion")) == (10, 5), model


def test_adapter_definitions_name_a_protocol_credentials_and_capabilities(stubs, gateway):
    (ollama,) = stubs("ollama", kind=OllamaStub)
    (vllm,) = stubs("vllm")
    gw = gateway({
        "adapter-definitions": {
            "my-ollama": {"type": "ollama-compatible", "capabilities": {"chat": True},
                          "additional-headers": {"x-team": "search"}},
            "deepseek": {"type": "openai-compatible",
                         "auth": {"header-name": "Authorization", "header-prefix": "Bearer ", "api-key": "sk-ds"}},
        },
        "model": {"retries": 0, "services": {
            "chat": {"instances": [instance("qwen", ollama, adapter="my-ollama"),
                                   instance("ds", vllm, adapter="DeepSeek")]},
            "embedding": {"instances": [instance("qwen-embed", ollama, adapter="my-ollama")]}}}})
    c = client(gw)
    assert c.chat.completions.create(model="qwen", messages=HI).choices[0].message.content == "hello from ollama"
    assert ollama.requests[-1].path == "/api/chat" and ollama.requests[-1].headers["x-team"] == "search"
    c.chat.completions.create(model="ds", messages=HI)
    assert vllm.requests[-1].headers["authorization"] == "Bearer sk-ds"
    with pytest.raises(openai.APIStatusError) as lacking:
        c.embeddings.create(model="qwen-embed", input="x")
    assert lacking.value.status_code == 501


def test_a_reload_changes_an_instances_adapter_live(stubs, gateway):
    from test_live_config import wait_for

    (ollama,) = stubs("ollama", kind=OllamaStub)
    config = lambda adapter: {"model": {"retries": 0, "services": {"chat": {"instances": [
        instance("qwen", ollama, adapter=adapter)]}}}}
    gw = gateway(config("normal"))
    gw.watch()
    wait_for(lambda: "applied configuration" in gw.watch_log(), 10, "the watcher started")
    ask = lambda: httpx.post(gw.url + "/v1/chat/completions", json={"model": "qwen", "messages": HI}, timeout=10)
    assert ask().status_code == 404  # OpenAI's path on a native Ollama
    gw.write_config(config("ollama"))
    wait_for(lambda: ask().status_code == 200, 10, "the reload took the adapter")
    assert ollama.requests[-1].path == "/api/chat"
    # A reload naming an unknown adapter is refused; the last good one keeps serving.
    gw.write_config(config("olama"))
    wait_for(lambda: "unknown adapter" in gw.watch_log(), 10, "the refusal")
    assert ask().status_code == 200
