#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target (corpus/<target>/seed-*) from realistic requests,
answers and configurations. The fuzzers grow the corpus from there; run.sh calls this first.

Each target's input layout (see fuzz_targets/): a first byte that chooses how the body is cut
into chunks (0: byte by byte, 255: at once, else sizes from 1 to 64), then its own fields.
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(sys.argv[1] if len(sys.argv) > 1 else HERE, "corpus")


def write(target, name, data):
    folder = os.path.join(OUT, target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, "seed-" + name), "wb") as f:
        f.write(data)


def chat(model="llama3.2:3b", **extra):
    body = {"model": model, "messages": [{"role": "system", "content": "You are terse."},
                                         {"role": "user", "content": "Say hi \"twice\" \u00e9 \U0001F600"}]}
    body.update(extra)
    return json.dumps(body)


JSON_BODIES = {
    "chat": chat(),
    "chat-stream": chat(stream=True, stream_options={"include_usage": True}, max_tokens=64, user="u-1"),
    "model-last": json.dumps({"messages": [{"role": "user", "content": "x" * 200}], "temperature": 0.7,
                              "top_p": 1e-3, "n": -1, "stop": None, "logprobs": False, "model": "qwen2"}),
    "embeddings": json.dumps({"input": ["a", "b"], "model": "bge-m3", "encoding_format": "float"}),
    "rerank": json.dumps({"model": "bge-reranker", "query": "q", "documents": ["d1", "d2"], "top_n": 1}),
    "speech": json.dumps({"model": "tts-1", "input": "hello", "voice": "alloy"}),
    "images": json.dumps({"prompt": "a cat", "model": "sd-xl", "size": "1024x1024"}),
    "escaped": '{"m\\u006fdel":"ll\\u0061ma \\ud83d\\ude00\\n\\t\\/"}',
    "bom": "\ufeff" + chat(),
    "duplicate": '{"model":"first","model":"second"}',
    "nested-model": '{"a":{"model":"inner"},"b":[{"model":1}],"model":"outer"}',
    "not-a-string": '{"model":42}',
    "null-model": '{"model":null,"messages":[]}',
    "empty": "{}",
    "deep": '{"a":' + "[" * 130 + "]" * 130 + ',"model":"m"}',
    "nan": '{"temperature":NaN,"model":"m"}',
    "numbers": '{"a":[0,-0,1.5e10,-2E-3,123456789012345678901234567890],"model":"m"}',
    "truncated": chat()[:40],
    "ws": ' \n\t{ "model" :\r\n "spaced" } ',
}


def multipart(boundary, parts, eol="\r\n"):
    out = b""
    for name, filename, content in parts:
        out += ("--" + boundary + eol).encode()
        disposition = 'Content-Disposition: form-data; name="%s"' % name
        if filename:
            disposition += '; filename="%s"' % filename
        out += (disposition + eol).encode()
        if filename:
            out += ("Content-Type: audio/wav" + eol).encode()
        out += eol.encode() + content + eol.encode()
    return out + ("--" + boundary + "--" + eol).encode()


AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) + b"\r\n--not-the-boundary\r\n"
MULTIPART = {
    "model-first": ("b0undary", [("model", None, b"whisper-1"), ("file", "a.wav", AUDIO)], "\r\n"),
    "model-last": ("----WebKitFormBoundary7MA4YWxkTrZu0gW",
                   [("file", "a.wav", AUDIO), ("language", None, b"en"), ("model", None, b"whisper-1")], "\r\n"),
    "lf-only": ("x", [("model", None, b"m"), ("user", None, b"u-1")], "\n"),
    "no-model": ("abc", [("file", "a.wav", AUDIO), ("prompt", None, b"hi")], "\r\n"),
    "field-first": ("abc", [("user", None, b"session-9"), ("model", None, b"dall-e-2"),
                            ("image", "i.png", b"\x89PNG\r\n\x1a\n")], "\r\n"),
    "empty-model": ("abc", [("model", None, b"  ")], "\r\n"),
}


def content_type(boundary, quoted=False):
    b = '"%s"' % boundary if quoted else boundary
    return "multipart/form-data; charset=utf-8; boundary=" + b


def header_map(pairs):
    out = struct.pack("<I", len(pairs))
    for name, value in pairs:
        out += struct.pack("<II", len(name), len(value))
    for name, value in pairs:
        out += name + b"\0" + value + b"\0"
    return out


HEADERS = [
    (b":authority", b"gateway:8080"), (b":path", b"/v1/chat/completions?x=1"), (b":method", b"POST"),
    (b":scheme", b"http"), (b"content-type", b"application/json"), (b"x-jairouter-model", b"llama3"),
    (b"authorization", b"Bearer sk-test"), (b"x-forwarded-for", b"1.2.3.4, 5.6.7.8"),
    (b"x-bad", b"\xff\xfe"), (b"x-empty", b""),
]

SSE = "".join("data: %s\n\n" % json.dumps({"choices": [{"delta": {"content": t}}]})
              for t in ["Hel", "lo", " 你好", "\\u754c"])
SSE += 'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}\n\ndata: [DONE]\n\n'
USAGE = {
    "sse": SSE,
    "sse-crlf": SSE.replace("\n", "\r\n"),
    "sse-comments": ": keep-alive\n\nevent: message\nid: 1\nretry: 100\n" + SSE,
    "sse-no-done": SSE.replace("data: [DONE]\n\n", ""),
    "json": json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"message": {"role": "assistant", "content": "hi", "tool_calls": [
            {"function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46,
                  "prompt_tokens_details": {"cached_tokens": 5}}}),
    "responses": json.dumps({"output": [{"content": [{"type": "output_text", "text": "ok"}]}],
                             "usage": {"input_tokens": 3, "output_tokens": 4}}),
    "huge-number": '{"usage":{"prompt_tokens":99999999999999999999999999,"completion_tokens":-1}}',
    "error": '{"error":{"message":"boom","type":"server_error"}}',
}


def config(**model):
    return json.dumps(model)


INSTANCE = {"name": "llama3.2:3b", "base-url": "http://ollama:11434", "path": "/v1/chat/completions",
            "weight": 1, "status": "active", "instance-id": "ollama-1",
            "headers": {"Authorization": "Bearer x"}}
CONFIGS = {
    "minimal": config(services={"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}),
    "full": config(**{
        "load-balance": {"type": "round-robin", "virtual-nodes": 150, "hash-header": "x-session-id",
                         "hash-field": "user", "latency-decay-ms": 10000, "hash-algorithm": "md5"},
        "rate-limit": {"enabled": True, "algorithm": "token-bucket", "capacity": 100, "rate": 10,
                       "scope": "service", "client-ip-enable": False, "window": 1,
                       "warm-up-period": 600, "cold-factor": 3, "max-clients": 10000},
        "token-limit": {"tokens-per-minute": 100000, "scope": "model", "completion-estimate": 256},
        "circuit-breaker": {"enabled": True, "failure-threshold": 5, "timeout": 60000,
                            "success-threshold": 2},
        "health-check": {"interval": 30000, "timeout": 5000, "path": "/v1/models",
                         "unhealthy-threshold": 2, "healthy-threshold": 1},
        "retries": 2, "retry-uploads": False, "request-timeout": 0,
        "fallback": {"enabled": True, "strategy": "default", "models": {"llama3": ["qwen2", "mistral"]}},
        "gateway": {"max-body-bytes": 10485760, "instance-header": True, "trusted-hops": 0,
                    "global-rate-limit": {"address": "ratelimit:8081", "domain": "jairouter",
                                          "failure-mode-deny": False, "timeout-ms": 20}},
        "services": {
            "chat": {"load-balance": {"type": "consistent-hash"},
                     "rate-limit": {"enabled": True, "algorithm": "sliding-window", "rate": 5, "window": 2},
                     "instances": [INSTANCE, dict(INSTANCE, **{"instance-id": "ollama-2", "weight": 1000000,
                                                               "base-url": "https://10.0.0.2:8443/prefix"})]},
            "embedding": {"load-balance": {"type": "least-latency"},
                          "instances": [{"name": "bge", "base-url": "http://[::1]:9000"}]},
            "stt": {"instances": [{"name": "whisper", "base-url": "http://w:1", "rate-limit":
                                   {"enabled": True, "algorithm": "warm-up"}}]},
            "imgEdit": {"load-balance": {"type": "header-hash", "hash-header": "x-s"},
                        "instances": [{"name": "sd", "base-url": "http://s:1", "weight": 0}]},
        }}),
    "api-keys": json.dumps({"model": {"services": {"chat": {"instances": [{"name": "m", "base-url": "http://a:1"}]}}},
                            "jairouter": {"security": {"api-key": {
                                "enabled": True, "header-name": "X-API-Key",
                                "keys": [{"key-id": "k1",
                                          "key-hash": "AAECAwQFBgcICQoLDA0ODw==:sa4gYuhJK4q61rnyE//ZA1qX3uRJHYwKS+96Zq5aMLs=",
                                          "permissions": ["chat"], "expires-at": "2030-01-01T00:00:00Z",
                                          "rate-limit-per-minute": 10, "tokens-per-minute": 1000}]}}}}),
    "absurd": config(services={"chat": {"instances": [
        {"name": "m", "base-url": "http://a:1", "weight": 2 ** 63},
        {"name": "m", "base-url": "http://b:1", "weight": -1}]}},
        **{"rate-limit": {"enabled": True, "capacity": 0, "rate": -5}}),
    "many": config(services={"chat": {"load-balance": {"type": "ip-hash", "virtual-nodes": 10000},
                                      "instances": [{"name": "m%d" % (i % 3), "base-url": "http://h%d:1" % i,
                                                     "weight": i * 1000 + 1} for i in range(40)]}}),
    "empty-instances": config(services={"chat": {"instances": []}}),
}

AUTH = {
    "claim-text": b"\x00chat embedding,admin",
    "claim-list": b"\x00" + header_map([(b"chat", b""), (b"rerank", b"")]),
    "b64": b"\x01AAECAwQFBgcICQoLDA0ODw==",
    "b64-nopad": b"\x01sa4gYuhJK4q61rnyE//ZA1qX3uRJHYwKS+96Zq5aMLs",
    "time": b"\x022027-01-31T12:30:00.123+05:30",
    "date": b"\x022024-02-29",
    "keys": b"\x03" + json.dumps({"enabled": True, "keys": [
        {"key-id": "a", "key-hash": "c2FsdHNhbHRzYWx0:AAAA", "permissions": ["chat", "admin"],
         "models": ["m"], "allowed-addresses": ["10.0.0.0/8"], "daily-request-limit": 5}]}).encode(),
}

PATHS = ["/v1/chat/completions", "/api/v1/embeddings?x=1&y=%00", "/v1/models", "/v1/models/qwen2.5:7b",
         "/v1/models/a/b/../c", "/v1/audio/transcriptions/", "/v2/x#frag", "//v1//chat", "[::1]:8080",
         "10.0.0.1:5678", "speech-to-text", "/" + "a/" * 300, "/v1/chat/completions?" + "q=" * 200]


MESSAGES_REQUESTS = {
    "plain": {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello"}]},
    "claude-code": {
        "model": "claude-sonnet-4-5", "max_tokens": 32000, "stream": True, "metadata": {"user_id": "u-1"},
        "system": [{"type": "text", "text": "You are Claude Code."},
                   {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "Bash", "description": "Run a command", "input_schema": {
            "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "List files"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "ls", "signature": "s"},
                {"type": "text", "text": "Running ls."},
                {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a b"}],
                 "is_error": False},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "text", "text": "And now?", "cache_control": {"type": "ephemeral"}}]}],
        "stop_sequences": ["END"], "temperature": 0.2, "top_k": 5},
    "server-tool": {"max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    "no-max-tokens": {"messages": [{"role": "user", "content": "x"}]},
}
CHAT_ANSWERS = {
    "text": {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
    "tools": {"id": "chatcmpl-2", "choices": [{"index": 0, "message": {"role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}, "finish_reason": "tool_calls"}]},
}


def chunk(delta, finish=None):
    return json.dumps({"id": "chatcmpl-3", "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


CHAT_STREAMS = {
    "text": "".join("data: %s\n\n" % c for c in [
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
        chunk({}, "stop"),
        json.dumps({"id": "chatcmpl-3", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})])
        + "data: [DONE]\n\n",
    "tools": "".join("data: %s\n\n" % c for c in [
        chunk({"content": "Let me see."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "function": {"name": "g", "arguments": "{}"}}]}),
        chunk({}, "tool_calls")]) + "data: [DONE]\n\n",
    "error": "data: %s\n\ndata: %s\n\n" % (chunk({"content": "x"}),
                                           json.dumps({"error": {"message": "overloaded", "code": 503}})),
    "early": "data: %s\n\n" % chunk({"content": "x"}),
}


def sse(*events):
    return "".join("event: %s\ndata: %s\n\n" % (e["type"], json.dumps(e)) for e in events)


CLAUDE_START = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                     "content": [], "usage": {"input_tokens": 25, "output_tokens": 1}}}
CLAUDE_TAIL = [{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
               {"type": "message_stop"}]
# Inputs of claude_translate: a mode byte, then an OpenAI request, a Message or an event stream.
CLAUDE = {
    "request": chat(stream=True, max_tokens=64, user="u-1", stop=["x"], temperature=0.2, tools=[
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False),
    "tool-round-trip": json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "image_url", "image_url": {"url": "https://x/a.png"}}]},
        {"role": "assistant", "content": "ok", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "1"}, {"role": "user", "content": "and?"}]}),
    "message": json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "stop_reason": "tool_use",
                           "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "Hi"},
                                       {"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1]}}],
                           "usage": {"input_tokens": 5, "cache_read_input_tokens": 2, "output_tokens": 3}}),
    "error": json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    "stream-text": sse(CLAUDE_START, {"type": "content_block_start", "index": 0,
                                      "content_block": {"type": "text", "text": ""}}, {"type": "ping"},
                       {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
                       {"type": "content_block_stop", "index": 0}, *CLAUDE_TAIL),
    "stream-tool": sse(CLAUDE_START, {"type": "content_block_start", "index": 0, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"lo"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "c\": 1}"}},
        {"type": "content_block_stop", "index": 0}, *CLAUDE_TAIL),
    "stream-error": sse(CLAUDE_START, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    "stream-early-end": sse(CLAUDE_START, {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": "cut"}}),
}


# The Responses translator's whole cases (its fixtures) seed its target, with the refusals.
RESPONSES_FIXTURES = os.path.join(HERE, "..", "src", "translate", "fixtures", "responses_to_openai")
RESPONSES_REFUSED = {
    "previous-response": {"model": "gpt-5", "input": "and then?", "previous_response_id": "resp_1"},
    "web-search": {"model": "gpt-5", "input": "news?", "tools": [{"type": "web_search"}]},
    "file-image": {"model": "gpt-5", "input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-1"}]}]},
}


def write_responses_seeds():
    for file in sorted(os.listdir(RESPONSES_FIXTURES)):
        if not file.endswith(".in.json"):
            continue
        with open(os.path.join(RESPONSES_FIXTURES, file), "rb") as f:
            body = f.read()
        kind = b"\x00" if file.startswith("request-") else b"\x01"
        write("responses_translate", file[:-len(".in.json")], kind + body)
    for name, body in RESPONSES_REFUSED.items():
        write("responses_translate", "refused-" + name, b"\x00" + json.dumps(body).encode())
    for name, body in CHAT_STREAMS.items():
        for seed in (0, 5, 255):
            write("responses_translate", "stream-%s-%d" % (name, seed), bytes([2, seed]) + body.encode())
    write("responses_translate", "error-message", b"\x03" + USAGE["error"].encode())


def main():
    write_rls_seeds()
    for name, body in JSON_BODIES.items():
        for seed in (0, 7, 255):
            write("json_model", "%s-%d" % (name, seed), bytes([seed]) + body.encode())
    for name, (boundary, parts, eol) in MULTIPART.items():
        body = multipart(boundary, parts, eol)
        for seed in (0, 13, 255):
            for quoted in (False, True):
                ct = content_type(boundary, quoted).encode()
                write("multipart_model", "%s-%d-%d" % (name, seed, quoted),
                      bytes([seed]) + ct + b"\n" + body)
    write("header_pairs", "envoy", header_map(HEADERS))
    write("header_pairs", "lines", b"\n".join(n + b":" + v for n, v in HEADERS))
    write("header_pairs", "lying-count", struct.pack("<I", 0xFFFFFFFF) + header_map(HEADERS)[4:])
    for i, path in enumerate(PATHS):
        write("endpoint_path", str(i), path)
    for name, body in USAGE.items():
        for seed in (0, 3, 255):
            write("usage_stream", "%s-%d" % (name, seed), bytes([seed]) + body.encode())
    for name, text in CONFIGS.items():
        write("router_config", name, text)
    for name, data in AUTH.items():
        write("auth_inputs", name, data)
    for kind in range(8):
        ops = bytes([kind]) + struct.pack("<QQQQQ", 10, 2, 50, 600, 3) + struct.pack("<Q", 10 ** 12)
        for i in range(40):
            ops += bytes([i % 8]) + struct.pack("<Q", 10 ** 8 * (i % 5))
        write("rate_bucket", str(kind), ops)
    for name, body in MESSAGES_REQUESTS.items():
        write("messages_translate", "request-" + name, b"\x00" + json.dumps(body).encode())
        write("messages_translate", "count-" + name, b"\x03" + json.dumps(body).encode())
    for name, body in CHAT_ANSWERS.items():
        write("messages_translate", "answer-" + name, b"\x01" + json.dumps(body).encode())
    for name, body in CHAT_STREAMS.items():
        for seed in (0, 5, 255):
            write("messages_translate", "stream-%s-%d" % (name, seed), bytes([2, seed]) + body.encode())
    write("messages_translate", "error-message", b"\x04" + USAGE["error"].encode())
    write("messages_translate", "error-status", b"\x05\x00\x00\x02\x11Overloaded")
    write_responses_seeds()
    requests = [
        (b"POST /v1/chat/completions?stream=true", b"application/json", b"", b"", chat(user="u-7").encode()),
        (b"POST /api/v1/chat/completions", b"application/json", b"", b"sess-1", chat(max_tokens=5).encode()),
        (b"POST /v1/chat/completions", b"application/json", b"qwen", b"", chat(user="x").encode()),
        (b"POST /v1/embeddings", b"application/json; charset=utf-8", b"", b"",
         JSON_BODIES["embeddings"].encode()),
        (b"POST /v1/audio/transcriptions", content_type("b0undary").encode(), b"", b"",
         multipart(*MULTIPART["model-first"])),
        (b"POST /v1/images/edits", content_type("abc").encode(), b"", b"", multipart(*MULTIPART["field-first"])),
        (b"GET /v1/models/llama", b"", b"", b"", b""),
        (b"POST /v1/chat/completions", b"application/json", b"", b"", JSON_BODIES["deep"].encode()),
        (b"POST /v1/responses", b"application/json", b"", b"",
         json.dumps({"model": "llama", "instructions": "Be brief.", "input": [{"role": "user", "content": "Hi"}],
                     "max_output_tokens": 64, "stream": True}).encode()),
        (b"GET /api/v1/responses/resp_1/input_items?limit=2", b"", b"", b"", b""),
    ]
    for i, (line, ct, model, session, body) in enumerate(requests):
        for seed in (0, 9, 255):
            write("request_decision", "%d-%d" % (i, seed),
                  bytes([seed]) + b"\n".join([line, ct, model, session, body]))
    write_translate_seeds()


GEMINI_SSE = "".join("data: %s\r\n\r\n" % json.dumps(e) for e in [
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}, "index": 0}],
     "usageMetadata": {"trafficType": "ON_DEMAND"}, "responseId": "r-1"},
    {"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Tokyo"}}, "thoughtSignature": "c2ln"}]}}]},
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "lo \u4f60\u597d", "thought": False}]},
                     "finishReason": "STOP"}],
     "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "thoughtsTokenCount": 5}},
])
GEMINI = {
    # function index (see fuzz_targets/gemini_translate.rs), input
    "chat": (0, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                     tool_choice="required", response_format={"type": "json_object"}, max_tokens=9, stop="x",
                     messages=[{"role": "system", "content": "s"},
                               {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                               {"role": "assistant", "content": None, "tool_calls": [
                                   {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                               {"role": "tool", "tool_call_id": "c1", "content": "ok"}])),
    "embed": (1, JSON_BODIES["embeddings"]),
    "answer": (2, json.dumps({"candidates": [{"content": {"role": "model", "parts": [
        {"text": "hi"}, {"functionCall": {"name": "f", "args": {"a": [1]}}}]}, "finishReason": "MAX_TOKENS"}],
        "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 2}, "responseId": "x"})),
    "blocked": (2, json.dumps({"promptFeedback": {"blockReason": "SAFETY"}})),
    "vectors": (3, json.dumps({"embeddings": [{"values": [0.1, -2e-3]}, {"values": []}]})),
    "error": (4, json.dumps({"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}})),
    "stream": (5, GEMINI_SSE),
    "stream-error": (5, GEMINI_SSE.replace('{"candidates": [{"content": {"role": "model", "parts": [{"functionCall"',
                                           '{"error": {"message": "overloaded"}, "x": [{"content": {"role": "model", "parts": [{"functionCall"', 1)),
    "stream-cut": (5, GEMINI_SSE[:len(GEMINI_SSE) // 2]),
}
OLLAMA_NDJSON = "".join(json.dumps(e) + "\n" for e in [
    {"model": "llama3.2", "message": {"role": "assistant", "content": "The"}, "done": False},
    {"message": {"role": "assistant", "content": "", "thinking": "hm",
                 "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}, "done": False},
    {"message": {"role": "assistant", "content": "!"}, "done": True, "done_reason": "length",
     "prompt_eval_count": 26, "eval_count": 282},
])
OLLAMA = {
    "chat": (0, GEMINI["chat"][1]),
    "chat-schema": (0, chat(stream=True, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}})),
    "embed": (1, json.dumps({"input": "x", "dimensions": 8, "encoding_format": "base64"})),
    "answer": (2, json.dumps({"message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {"city": "Tokyo"}}}]}, "done_reason": "stop", "done": True,
        "prompt_eval_count": 169, "eval_count": 18})),
    "vectors": (3, json.dumps({"embeddings": [[0.01, -0.2], [0.3, 0.4]], "prompt_eval_count": 8})),
    "error": (4, json.dumps({"error": "model not found"})),
    "stream": (5, OLLAMA_NDJSON),
    "stream-crlf": (5, OLLAMA_NDJSON.replace("\n", "\r\n")),
    "stream-error": (5, OLLAMA_NDJSON.replace('{"message": {"role": "assistant", "content": "", "thinking"',
                                              '{"error": "boom"}\n{"message": {"role": "assistant", "content": "", "thinking"', 1)),
    "stream-cut": (5, OLLAMA_NDJSON[:-40]),
}


def write_translate_seeds():
    for target, seeds in (("gemini_translate", GEMINI), ("ollama_translate", OLLAMA)):
        for name, (which, body) in seeds.items():
            for seed in (0, 5, 255):
                write(target, "%s-%d" % (name, seed), bytes([which, seed]) + body.encode())

    for name, body in CLAUDE.items():
        for mode in (0, 1, 6, 255):
            write("claude_translate", "%s-%d" % (name, mode), bytes([mode]) + body.encode())


def varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, value):
    """A protobuf field: an int as a varint, bytes length-prefixed."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def write_rls_seeds():
    def status(code, remaining, seconds, nanos=0):
        return field(1, code) + field(2, field(1, 60) + field(2, 2)) + field(3, remaining) + \
            field(4, field(1, seconds) + field(2, nanos))
    answers = {
        "ok": field(1, 1) + field(2, status(1, 59, 1)),
        "over": field(1, 2) + field(2, status(1, 3, 0, 500)) + field(2, status(2, 0, 2, 250000000)),
        "headers": field(1, 2) + field(3, field(1, b"x-a") + field(2, b"1")) + field(2, status(2, 0, 1)),
        "terse": field(1, 2),
        "empty": b"",
    }
    for name, data in answers.items():
        write("rls_answer", name, data)


if __name__ == "__main__":
    main()
