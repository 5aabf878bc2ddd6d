"""The vendor stubs on their own (no Envoy): what they answer, what they refuse, how they stream."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from vendor_stubs import AnthropicStub, GeminiStub, OllamaStub

NEEDS_BUILD = False

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture
def start(stubs):
    """start(StubClass, **options): one stub named "v"; it stops after the test."""
    return lambda kind, **options: stubs("v", kind=kind, **options)[0]


@pytest.fixture
def client():
    with httpx.Client(timeout=10) as c:
        yield c


# --- Anthropic ------------------------------------------------------------------------------------

ANTHROPIC_HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}


def ask(max_tokens: int = 64, **extra) -> dict:
    return {"model": "claude-test", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}], **extra}


def sse_events(text: str) -> list[tuple[str, dict]]:
    """Anthropic's SSE as (event name, data) pairs; the name must match the data's type."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        events.append((lines["event"], data))
    return events


def test_anthropic_answers_a_message_and_records_it(start, client):
    stub = start(AnthropicStub)
    r = client.post(f"{stub.url}/v1/messages", headers=ANTHROPIC_HEADERS, json=ask(system="be brief"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == "claude-test"
    assert body["content"] == [{"type": "text", "text": "hello from v"}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert set(body["usage"]) == {"input_tokens", "output_tokens"} and body["usage"]["input_tokens"] > 0
    [received] = stub.requests
    assert received.method == "POST" and received.path == "/v1/messages"
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.json()["system"] == "be brief"


@pytest.mark.parametrize("headers, request_body, status, kind, says", [
    ({"x-api-key": "sk-ant-test"}, ask(), 400, "invalid_request_error", "anthropic-version"),
    ({"anthropic-version": "2023-06-01"}, ask(), 401, "authentication_error", "x-api-key"),
    ({**ANTHROPIC_HEADERS, "x-api-key": "sk-wrong"}, ask(), 401, "authentication_error", "x-api-key"),
    (ANTHROPIC_HEADERS, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, 400,
     "invalid_request_error", "max_tokens: Field required"),
    (ANTHROPIC_HEADERS, {"model": "m", "max_tokens": 9}, 400, "invalid_request_error", "messages: Field required"),
    (ANTHROPIC_HEADERS, ask(messages=[]), 400, "invalid_request_error", "at least one message"),
    (ANTHROPIC_HEADERS, ask(messages=[{"role": "assistant", "content": "hi"}]), 400, "invalid_request_error",
     "first message"),
    (ANTHROPIC_HEADERS, ask(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), 400,
     "invalid_request_error", "alternate"),
    (ANTHROPIC_HEADERS, ask(messages=[{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]), 400,
     "invalid_request_error", "top-level `system`"),
    (ANTHROPIC_HEADERS, ask(n=2), 400, "invalid_request_error", "n: Extra inputs are not permitted"),
    (ANTHROPIC_HEADERS, ask(messages=[{"role": "user", "content": [{"text": "no type"}]}]), 400,
     "invalid_request_error", "content"),
])
def test_anthropic_refuses_what_the_api_refuses(start, client, headers, request_body, status, kind, says):
    stub = start(AnthropicStub)
    r = client.post(f"{stub.url}/v1/messages", headers=headers, json=request_body)
    assert r.status_code == status
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and says in body["error"]["message"]


def test_anthropic_key_is_configurable(start, client):
    stub = start(AnthropicStub, api_key="sk-other")
    assert client.post(f"{stub.url}/v1/messages", headers=ANTHROPIC_HEADERS, json=ask()).status_code == 401
    headers = {**ANTHROPIC_HEADERS, "x-api-key": "sk-other"}
    assert client.post(f"{stub.url}/v1/messages", headers=headers, json=ask()).status_code == 200


def test_anthropic_tool_use_round_trip(start, client):
    stub = start(AnthropicStub)
    tools = [{"name": "get_weather", "description": "weather", "input_schema": WEATHER_SCHEMA}]
    r = client.post(f"{stub.url}/v1/messages", headers=ANTHROPIC_HEADERS, json=ask(tools=tools))
    body = r.json()
    assert body["stop_reason"] == "tool_use"
    [use] = body["content"]
    assert use["type"] == "tool_use" and use["id"].startswith("toolu_01") and use["name"] == "get_weather"
    assert use["input"] == {"city": "stub-city"}

    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": body["content"]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "sunny, 21C"}]}]
    r = client.post(f"{stub.url}/v1/messages", headers=ANTHROPIC_HEADERS, json=ask(tools=tools, messages=messages))
    body = r.json()
    assert body["stop_reason"] == "end_turn"
    assert body["content"] == [{"type": "text", "text": "tool said: sunny, 21C"}]


def test_anthropic_small_max_tokens_stops_on_the_limit(start, client):
    stub = start(AnthropicStub)
    body = client.post(f"{stub.url}/v1/messages", headers=ANTHROPIC_HEADERS, json=ask(max_tokens=2)).json()
    assert body["stop_reason"] == "max_tokens" and body["usage"]["output_tokens"] == 2


def test_anthropic_streams_the_documented_event_sequence(start, client):
    stub = start(AnthropicStub)
    r = client.post(f"{stub.url}/v1/messages", headers={**ANTHROPIC_HEADERS, "x-stub-chunks": "3",
                                                         "x-stub-usage": "11,3"}, json=ask(stream=True))
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    events = sse_events(r.text)
    assert [name for name, _ in events] == ["message_start", "content_block_start", "ping"] + \
        ["content_block_delta"] * 3 + ["content_block_stop", "message_delta", "message_stop"]
    start_message = events[0][1]["message"]
    assert start_message["content"] == [] and start_message["stop_reason"] is None
    assert start_message["usage"]["input_tokens"] == 11
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "tok0 tok1 tok2 "
    assert all(d["delta"]["type"] == "text_delta" for n, d in events if n == "content_block_delta")
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"output_tokens": 3}


def test_anthropic_streams_tool_use_as_input_json_deltas(start, client):
    stub = start(AnthropicStub)
    tools = [{"name": "get_weather", "input_schema": WEATHER_SCHEMA}]
    r = client.post(f"{stub.url}/v1/messages", headers=ANTHROPIC_HEADERS, json=ask(tools=tools, stream=True))
    events = sse_events(r.text)
    block = events[1][1]["content_block"]
    assert block["type"] == "tool_use" and block["name"] == "get_weather" and block["input"] == {}
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert len(deltas) > 1 and all(d["type"] == "input_json_delta" for d in deltas)
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "stub-city"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_anthropic_stream_error_event_midway(start, client):
    stub = start(AnthropicStub)
    r = client.post(f"{stub.url}/v1/messages", headers={**ANTHROPIC_HEADERS, "x-stub-stream-error": "2"},
                    json=ask(stream=True))
    events = sse_events(r.text)
    assert [n for n, _ in events][-3:] == ["content_block_delta", "content_block_delta", "error"]
    assert events[-1][1]["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize("status, kind", [(529, "overloaded_error"), (429, "rate_limit_error"),
                                          (500, "api_error"), (404, "not_found_error")])
def test_anthropic_failures_take_the_error_shape(start, client, status, kind):
    stub = start(AnthropicStub)
    r = client.post(f"{stub.url}/v1/messages", headers={**ANTHROPIC_HEADERS, "x-stub-status": str(status)}, json=ask())
    assert r.status_code == status and r.json()["type"] == "error" and r.json()["error"]["type"] == kind


# --- Gemini ---------------------------------------------------------------------------------------

GEMINI_KEY = {"x-goog-api-key": "gemini-test-key"}


def contents(*texts: str) -> list[dict]:
    roles = ["user", "model"]
    return [{"role": roles[i % 2], "parts": [{"text": t}]} for i, t in enumerate(texts)]


def gemini(stub, method: str, query: str = "", model: str = "gemini-test") -> str:
    return f"{stub.url}/v1beta/models/{model}:{method}{query}"


def test_gemini_generates_content_and_records_it(start, client):
    stub = start(GeminiStub)
    r = client.post(gemini(stub, "generateContent"), headers=GEMINI_KEY, json={
        "contents": contents("hi", "hello", "how are you?"),
        "systemInstruction": {"parts": [{"text": "be brief"}]}, "generationConfig": {"temperature": 0.1}})
    assert r.status_code == 200, r.text
    body = r.json()
    [candidate] = body["candidates"]
    assert candidate["content"] == {"parts": [{"text": "hello from v"}], "role": "model"}
    assert candidate["finishReason"] == "STOP"
    usage = body["usageMetadata"]
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert body["modelVersion"] == "gemini-test" and body["responseId"]
    [received] = stub.requests
    assert received.path == "/v1beta/models/gemini-test:generateContent"
    assert received.headers["x-goog-api-key"] == "gemini-test-key"


def test_gemini_reads_snake_case_and_the_key_parameter(start, client):
    stub = start(GeminiStub)
    r = client.post(gemini(stub, "generateContent", "?key=gemini-test-key"), json={
        "contents": [{"role": "user", "parts": [{"inline_data": {"mime_type": "image/png", "data": PNG}}]}],
        "system_instruction": {"parts": [{"text": "x"}]}, "generation_config": {"max_output_tokens": 100}})
    assert r.status_code == 200, r.text


def test_gemini_refuses_a_missing_or_bad_key_as_the_api_does(start, client):
    stub = start(GeminiStub)
    r = client.post(gemini(stub, "generateContent"), json={"contents": contents("hi")})
    assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
    r = client.post(gemini(stub, "generateContent"), headers={"x-goog-api-key": "wrong"},
                    json={"contents": contents("hi")})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
    assert error["message"] == "API key not valid. Please pass a valid API key."
    assert error["details"][0]["reason"] == "API_KEY_INVALID"


@pytest.mark.parametrize("request_body, says", [
    ({"contents": []}, "contents is not specified"),
    ({}, "contents is not specified"),
    ({"contents": [{"role": "assistant", "parts": [{"text": "a"}]}]}, "valid role"),
    ({"contents": [{"role": "system", "parts": [{"text": "a"}]}]}, "valid role"),
    ({"contents": [{"role": "user", "parts": []}]}, "parts must not be empty"),
    ({"contents": [{"role": "user", "parts": [{"content": "a"}]}]}, 'Unknown name "content"'),
    ({"contents": [{"role": "user", "parts": [{"text": "a", "functionCall": {"name": "f"}}]}]}, "oneof"),
    ({"contents": [{"role": "user", "parts": [{"inlineData": {"mimeType": "image/png", "data": "%%"}}]}]},
     "Base64"),
    ({"contents": contents("hi"), "temperature": 0.5}, 'Unknown name "temperature"'),
    ({"contents": contents("hi"), "messages": []}, 'Unknown name "messages"'),
])
def test_gemini_refuses_what_the_api_refuses(start, client, request_body, says):
    stub = start(GeminiStub)
    r = client.post(gemini(stub, "generateContent"), headers=GEMINI_KEY, json=request_body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT" and says in error["message"]


def test_gemini_function_call_round_trip(start, client):
    stub = start(GeminiStub)
    tools = [{"functionDeclarations": [{"name": "get_weather", "parameters": WEATHER_SCHEMA}]}]
    body = client.post(gemini(stub, "generateContent"), headers=GEMINI_KEY,
                       json={"contents": contents("weather?"), "tools": tools}).json()
    [part] = body["candidates"][0]["content"]["parts"]
    assert part == {"functionCall": {"name": "get_weather", "args": {"city": "stub-city"}}}

    history = contents("weather?") + [{"role": "model", "parts": [part]}, {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"forecast": "sunny"}}}]}]
    body = client.post(gemini(stub, "generateContent"), headers=GEMINI_KEY,
                       json={"contents": history, "tools": tools}).json()
    assert body["candidates"][0]["content"]["parts"] == [{"text": 'tool said: {"forecast": "sunny"}'}]


def test_gemini_small_max_output_tokens_stops_on_the_limit(start, client):
    stub = start(GeminiStub)
    body = client.post(gemini(stub, "generateContent"), headers=GEMINI_KEY, json={
        "contents": contents("hi"), "generationConfig": {"maxOutputTokens": 3}}).json()
    assert body["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert body["usageMetadata"]["candidatesTokenCount"] == 3


def test_gemini_streams_sse_chunks(start, client):
    stub = start(GeminiStub)
    r = client.post(gemini(stub, "streamGenerateContent", "?alt=sse"), headers={**GEMINI_KEY, "x-stub-chunks": "4"},
                    json={"contents": contents("hi")})
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert r.text.endswith("\r\n\r\n")
    events = r.text.split("\r\n\r\n")[:-1]
    assert len(events) == 4 and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events]
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == "tok0 tok1 tok2 tok3 "
    assert all("finishReason" not in c["candidates"][0] for c in chunks[:-1])
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert "candidatesTokenCount" in chunks[-1]["usageMetadata"]
    assert all("candidatesTokenCount" not in c["usageMetadata"] for c in chunks[:-1])
    assert len({c["responseId"] for c in chunks}) == 1


def test_gemini_stream_without_alt_sse_is_one_json_array(start, client):
    stub = start(GeminiStub)
    r = client.post(gemini(stub, "streamGenerateContent"), headers={**GEMINI_KEY, "x-stub-chunks": "3"},
                    json={"contents": contents("hi")})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    chunks = r.json()
    assert isinstance(chunks, list) and len(chunks) == 3
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"


def test_gemini_embeddings(start, client):
    stub = start(GeminiStub)
    one = client.post(gemini(stub, "embedContent", model="text-embedding-004"), headers=GEMINI_KEY,
                      json={"content": {"parts": [{"text": "a"}]}, "outputDimensionality": 4}).json()
    assert len(one["embedding"]["values"]) == 4
    request = {"requests": [{"model": "models/text-embedding-004", "content": {"parts": [{"text": t}]}}
                            for t in ("a", "b", "a")]}
    body = client.post(gemini(stub, "batchEmbedContents", model="text-embedding-004"), headers=GEMINI_KEY,
                       json=request).json()
    a, b, again = (e["values"] for e in body["embeddings"])
    assert a == again != b and all(isinstance(x, float) for x in a)

    request["requests"][1]["model"] = "models/other"
    r = client.post(gemini(stub, "batchEmbedContents", model="text-embedding-004"), headers=GEMINI_KEY, json=request)
    assert r.status_code == 400 and "requests[1].model" in r.json()["error"]["message"]


def test_gemini_failures_take_the_error_shape(start, client):
    stub = start(GeminiStub)
    r = client.post(gemini(stub, "generateContent"), headers={**GEMINI_KEY, "x-stub-status": "429"},
                    json={"contents": contents("hi")})
    assert r.status_code == 429 and r.json()["error"] == {
        "code": 429, "message": "stub failure requested", "status": "RESOURCE_EXHAUSTED"}
    r = client.post(gemini(stub, "countTokens"), headers=GEMINI_KEY, json={})
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"


# --- Ollama ---------------------------------------------------------------------------------------

def chat(stream: bool | None = False, **extra) -> dict:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], **extra}
    return body if stream is None else {**body, "stream": stream}


def test_ollama_chat_answers_and_records(start, client):
    stub = start(OllamaStub)
    r = client.post(f"{stub.url}/api/chat", json=chat(options={"temperature": 0, "num_ctx": 2048}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "llama3.2" and body["created_at"].endswith("Z")
    assert body["message"] == {"role": "assistant", "content": "hello from v"}
    assert body["done"] is True and body["done_reason"] == "stop"
    assert {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
            "eval_duration"} <= body.keys()
    assert stub.requests[-1].json()["stream"] is False


def test_ollama_chat_streams_ndjson(start, client):
    stub = start(OllamaStub)
    r = client.post(f"{stub.url}/api/chat", headers={"x-stub-chunks": "3", "x-stub-usage": "9,3"}, json=chat(True))
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert "".join(line["message"]["content"] for line in lines) == "tok0 tok1 tok2 "
    assert lines[-1]["done_reason"] == "stop" and lines[-1]["prompt_eval_count"] == 9 and lines[-1]["eval_count"] == 3


def test_ollama_requires_an_explicit_stream_unless_told_not_to(start, client):
    strict = start(OllamaStub)
    r = client.post(f"{strict.url}/api/chat", json=chat(None))
    assert r.status_code == 400 and "stream" in r.json()["error"]
    lenient = start(OllamaStub, require_stream=False)
    r = client.post(f"{lenient.url}/api/chat", json=chat(None))
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"


@pytest.mark.parametrize("request_body, says", [
    (chat(options={"max_tokens": 5}), "invalid option provided: max_tokens"),
    (chat(messages=[{"role": "developer", "content": "x"}]), "invalid role"),
    (chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}]}]), "cannot unmarshal"),
    (chat(messages=[{"role": "user", "content": "x", "images": ["not base64!"]}]), "base64"),
    (chat(messages=[{"role": "user", "content": "x", "images": PNG}]), "cannot unmarshal"),
    ({"messages": [], "stream": False}, "model is required"),
])
def test_ollama_refuses_bad_shapes(start, client, request_body, says):
    stub = start(OllamaStub)
    r = client.post(f"{stub.url}/api/chat", json=request_body)
    assert r.status_code == 400 and says in r.json()["error"]


def test_ollama_takes_images_and_tool_round_trip(start, client):
    stub = start(OllamaStub)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]
    messages = [{"role": "user", "content": "weather here?", "images": [PNG]}]
    body = client.post(f"{stub.url}/api/chat", json=chat(messages=messages, tools=tools)).json()
    assert body["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "stub-city"}}}]
    messages += [body["message"], {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    body = client.post(f"{stub.url}/api/chat", json=chat(messages=messages, tools=tools)).json()
    assert body["message"] == {"role": "assistant", "content": "tool said: sunny"}


def test_ollama_small_num_predict_stops_on_length(start, client):
    stub = start(OllamaStub)
    body = client.post(f"{stub.url}/api/chat", json=chat(options={"num_predict": 2})).json()
    assert body["done_reason"] == "length" and body["eval_count"] == 2


def test_ollama_embed_and_refuses_the_openai_paths(start, client):
    stub = start(OllamaStub)
    body = client.post(f"{stub.url}/api/embed", json={"model": "all-minilm", "input": ["a", "b", "a"]}).json()
    assert body["model"] == "all-minilm" and body["prompt_eval_count"] > 0
    a, b, again = body["embeddings"]
    assert a == again != b
    assert len(client.post(f"{stub.url}/api/embed", json={"model": "m", "input": "a"}).json()["embeddings"]) == 1
    r = client.post(f"{stub.url}/v1/chat/completions", json=chat())
    assert r.status_code == 404 and r.text == "404 page not found"


def test_ollama_failures_take_the_error_shape(start, client):
    stub = start(OllamaStub)
    r = client.post(f"{stub.url}/api/chat", headers={"x-stub-status": "503"}, json=chat())
    assert r.status_code == 503 and r.json() == {"error": "stub failure requested"}


# --- All of them ----------------------------------------------------------------------------------

STREAMS = {
    AnthropicStub: ("/v1/messages", ANTHROPIC_HEADERS, ask(stream=True)),
    GeminiStub: ("/v1beta/models/g:streamGenerateContent?alt=sse", GEMINI_KEY, {"contents": contents("hi")}),
    OllamaStub: ("/api/chat", {}, chat(True)),
}


@pytest.mark.parametrize("cls", list(STREAMS), ids=lambda c: c.__name__)
def test_a_stream_is_cut_midway_on_request(start, client, cls):
    stub = start(cls)
    path, headers, request_body = STREAMS[cls]
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(f"{stub.url}{path}", headers={**headers, "x-stub-break-after": "2"}, json=request_body)


@pytest.mark.parametrize("cls", list(STREAMS), ids=lambda c: c.__name__)
def test_fail_next_then_delays(start, client, cls):
    stub = start(cls)
    path, headers, request_body = STREAMS[cls]
    stub.fail_next(1, 503)
    assert client.post(f"{stub.url}{path}", headers=headers, json=request_body).status_code == 503
    began = time.monotonic()
    r = client.post(f"{stub.url}{path}", json=request_body,
                    headers={**headers, "x-stub-delay-ms": "100", "x-stub-chunk-delay-ms": "50", "x-stub-chunks": "3"})
    assert r.status_code == 200 and time.monotonic() - began >= 0.2
    assert len(stub.requests) == 2 and stub.requests[-1].headers["x-stub-delay-ms"] == "100"


def test_cli_serves_a_protocol():
    script = Path(__file__).with_name("vendor_stubs.py")
    proc = subprocess.Popen([sys.executable, str(script), "--protocol", "ollama", "--instance", "cli"],
                            stdout=subprocess.PIPE, text=True)
    try:
        _, name, port = proc.stdout.readline().split()
        assert name == "cli"
        r = httpx.post(f"http://127.0.0.1:{port}/api/chat", json=chat(), timeout=10)
        assert r.json()["message"]["content"] == "hello from cli"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
