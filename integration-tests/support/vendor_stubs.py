"""Backends that speak the vendors' own protocols, for tests: Anthropic Messages, Gemini, Ollama.

Each is a `StubServer` (stub_backend.py) with another request handler, so it starts, stops, fails
on demand (`fail_next`, `fail_status`, `delay`) and records every request in `requests` the same
way. Paths are matched by suffix, so any prefix works. Each refuses, in its vendor's error shape,
the request shapes the vendor refuses (see the class docstrings), so a test can tell a gateway
that translates badly from one that translates well.

Per-request control headers (as stub_backend.py's):
  x-stub-delay-ms        wait before answering
  x-stub-status          answer this status in the vendor's error shape
  x-stub-chunks          content pieces in a stream (default 5)
  x-stub-chunk-delay-ms  wait between the pieces
  x-stub-usage           "P,C": report P prompt and C output tokens (default: body bytes / 4 and the
                         pieces sent); "none": leave the token counts out
  x-stub-end-delay-ms    wait between a stream's last event and its end
  x-stub-break-after     cut a stream's connection after this many pieces
  x-stub-stream-error    (Anthropic) end the stream with an `error` event (overloaded_error) after
                         this many pieces (empty: half of them)

A reply is "hello from NAME" (a stream: tok0 .. tokN-1); with tools and no tool result yet, a call
of the first tool with an argument "stub-KEY" for each property of its schema; after a tool result,
"tool said: CONTENT" (a stream carries it cut in pieces), so a test can check the round trip.

CLI: python vendor_stubs.py --protocol anthropic|gemini|ollama --instance NAME[:PORT] [...]
prints `STUB <name> <port>` per server and serves until SIGTERM or SIGINT (default keys).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import time
import uuid
from typing import Any, Callable
from urllib.parse import parse_qs

from stub_backend import StubServer, _Handler, main as _main, stream_chunks, token_counts

# An output limit (max_tokens, maxOutputTokens, num_predict) below this stops the reply on the limit.
SMALL_LIMIT = 5


def _fake_args(schema: Any) -> dict:
    """Arguments for a tool call: "stub-KEY" for each property of its JSON schema."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    return {key: f"stub-{key}" for key in properties or {}}


def _cut(text: str, n: int) -> list[str]:
    """`text` in n pieces (fewer when it is shorter), in order."""
    size = max(1, -(-len(text) // max(n, 1)))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _pieces(headers: dict[str, str], reply: str | None) -> list[str]:
    """A stream's text pieces: `reply` cut in x-stub-chunks, else tok0 .. tokN-1."""
    n = stream_chunks(headers)
    return _cut(reply, n) if reply is not None else [f"tok{i} " for i in range(n)]


def _vector(text: str, dims: int) -> list[float]:
    """A deterministic embedding of `text`: the same text, the same vector."""
    digest = b""
    while len(digest) < dims:
        digest += hashlib.sha256(digest + text.encode()).digest()
    return [round(b / 127.5 - 1, 6) for b in digest[:dims]]


def _request_id() -> str:
    return uuid.uuid4().hex[:24]


class _VendorHandler(_Handler):
    """A handler whose errors take the vendor's shape; `_route` answers what passed the checks."""

    def _error(self, status: int, message: str) -> None:
        raise NotImplementedError

    def _fail(self, status: int) -> None:
        self._error(status, "stub failure requested")

    def _bad_json(self) -> None:
        self._error(400, "malformed JSON body")

    def _checked(self, body: bytes, check: Callable[[dict], str | None]) -> dict | None:
        """The request, or None once a 400 is sent: not a JSON object, or `check` names a problem."""
        request = self._parse_json(body)
        problem = check(request) if request is not None else None
        if problem:
            self._error(400, problem)
            return None
        return request

    def _query(self) -> dict[str, list[str]]:
        return parse_qs(self.path.partition("?")[2])

    def _texts(self, stub: StubServer, headers: dict[str, str], reply: str | None, limit: Any) -> \
            tuple[str, int, bool]:
        """The whole reply text, the output tokens it counts by default, and whether the limit cut it."""
        small = isinstance(limit, int) and limit < SMALL_LIMIT
        pieces = _pieces(headers, reply)
        return reply if reply is not None else f"hello from {stub.name}", limit if small else len(pieces), small


# --- Anthropic Messages ---------------------------------------------------------------------------

_ANTHROPIC_FIELDS = {"model", "messages", "system", "max_tokens", "metadata", "stop_sequences", "stream",
                     "temperature", "top_k", "top_p", "tools", "tool_choice", "thinking", "service_tier"}
_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                     500: "api_error", 529: "overloaded_error"}


def _blocks(content: Any) -> list[dict]:
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _anthropic_problem(request: dict) -> str | None:
    """What the real API would refuse (a 400 invalid_request_error), checked in its order."""
    for key in request:
        if key not in _ANTHROPIC_FIELDS:
            return f"{key}: Extra inputs are not permitted"
    for key in ("model", "max_tokens", "messages"):
        if key not in request:
            return f"{key}: Field required"
    if not isinstance(request["max_tokens"], int) or request["max_tokens"] < 1:
        return "max_tokens: Input should be a valid integer greater than or equal to 1"
    messages = request["messages"]
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    previous = None
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            return (f'messages.{i}.role: Unexpected role "system". The Messages API accepts a top-level '
                         '`system` parameter, not "system" as an input message role.')
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if i == 0 and role != "user":
            return 'messages: first message must use the "user" role'
        if role == previous:
            return (f'messages: roles must alternate between "user" and "assistant", '
                         f'but found multiple "{role}" roles in a row')
        content = message.get("content")
        if not isinstance(content, (str, list)) or any(not isinstance(b, dict) or "type" not in b
                                                        for b in (content if isinstance(content, list) else [])):
            return f"messages.{i}.content: Input should be a valid string or a list of content blocks"
        previous = role
    return None


class _AnthropicHandler(_VendorHandler):
    def _error(self, status: int, message: str) -> None:
        kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self._json(status, {"type": "error", "error": {"type": kind, "message": message},
                            "request_id": f"req_{_request_id()}"})

    def _route(self, stub: Any, path: str, headers: dict[str, str], body: bytes) -> None:
        if self.command != "POST" or not path.endswith("/v1/messages"):
            self._error(404, "Not Found")
            return
        if "x-api-key" not in headers:
            self._error(401, "x-api-key header is required")
            return
        if headers["x-api-key"] != stub.api_key:
            self._error(401, "invalid x-api-key")
            return
        if "anthropic-version" not in headers:
            self._error(400, "anthropic-version: header is required")
            return
        request = self._checked(body, _anthropic_problem)
        if request is None:
            return

        last = request["messages"][-1]
        results = [b for b in _blocks(last["content"]) if b.get("type") == "tool_result"] \
            if last["role"] == "user" else []
        tools = request.get("tools") or []
        tool = tools[0] if tools and not results and isinstance(tools[0], dict) else None
        reply = None
        if results:
            content = results[0].get("content", "")
            reply = "tool said: " + (content if isinstance(content, str)
                                     else "".join(b.get("text", "") for b in _blocks(content)))
        text, output, small = self._texts(stub, headers, reply, request["max_tokens"])
        counts = token_counts(headers, body, output)
        stop = "tool_use" if tool else "max_tokens" if small else "end_turn"
        if tool:
            block = {"type": "tool_use", "id": f"toolu_01{_request_id()}", "name": tool.get("name"),
                     "input": _fake_args(tool.get("input_schema"))}
        else:
            block = {"type": "text", "text": text}
        message = {"id": f"msg_01{_request_id()}", "type": "message", "role": "assistant",
                   "model": request["model"], "content": [block], "stop_reason": stop, "stop_sequence": None}
        usage = {"usage": {"input_tokens": counts[0], "output_tokens": counts[1]}} if counts else {}
        if request.get("stream") is not True:
            self._json(200, {**message, **usage})
            return

        def event(payload: dict) -> bytes:
            return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()

        if tool:
            deltas = [{"type": "input_json_delta", "partial_json": p}
                      for p in _cut(json.dumps(block["input"]), stream_chunks(headers))]
            block = {**block, "input": {}}
        else:
            deltas = [{"type": "text_delta", "text": p} for p in _pieces(headers, reply)]
            block = {**block, "text": ""}
        start = {**message, "content": [], "stop_reason": None,
                 **({"usage": {"input_tokens": counts[0], "output_tokens": 1}} if counts else {})}
        head = [event({"type": "message_start", "message": start}),
                event({"type": "content_block_start", "index": 0, "content_block": block}),
                event({"type": "ping"})]
        pieces = [event({"type": "content_block_delta", "index": 0, "delta": d}) for d in deltas]
        tail = [event({"type": "content_block_stop", "index": 0}),
                event({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                       **({"usage": {"output_tokens": counts[1]}} if counts else {})}),
                event({"type": "message_stop"})]
        if "x-stub-stream-error" in headers:
            at = int(headers["x-stub-stream-error"] or len(pieces) // 2)
            pieces = pieces[:at] + [event({"type": "error", "error": {"type": "overloaded_error",
                                                                      "message": "Overloaded"}})]
            tail = []
        self._write_stream(headers, "text/event-stream", head, pieces, tail)


class AnthropicStub(StubServer):
    """POST .../v1/messages, as the Anthropic Messages API (non-stream JSON, or SSE with `event:`).

    Refuses like the API: 401 authentication_error without `x-api-key` or when it is not `api_key`;
    400 invalid_request_error without `anthropic-version`, for a top-level field the API does not
    know, without model/max_tokens/messages, for empty messages, a message role "system" (system is
    top-level), roles not alternating user/assistant from user, content neither a string nor blocks.
    Stricter than today's API, which merges consecutive same-role turns.
    Answers stop_reason "tool_use" with a tool_use block when there are tools and the last user
    message has no tool_result, "max_tokens" when max_tokens < 5, else "end_turn".
    """

    handler = _AnthropicHandler

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0, api_key: str = "sk-ant-test"):
        super().__init__(name, host, port)
        self.api_key = api_key


# --- Gemini ---------------------------------------------------------------------------------------

_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                  501: "NOT_IMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
# The fields each method takes, by their JSON (camelCase) name; the API takes snake_case too.
_GEMINI_FIELDS = {
    "generateContent": {"contents", "systemInstruction", "generationConfig", "tools", "toolConfig",
                        "safetySettings", "cachedContent"},
    "embedContent": {"model", "content", "taskType", "title", "outputDimensionality"},
    "batchEmbedContents": {"requests"},
}
_GEMINI_FIELDS["streamGenerateContent"] = _GEMINI_FIELDS["generateContent"]
_PART_DATA = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode",
              "codeExecutionResult"}
_PART_FIELDS = _PART_DATA | {"thought", "thoughtSignature", "videoMetadata"}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def _fields(value: Any) -> dict:
    """An object with its keys in camelCase, as the API reads either spelling."""
    return {_camel(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _unknown(value: dict, known: set[str], where: str) -> str | None:
    for key in value:
        if _camel(key) not in known:
            at = f" at '{where}'" if where else ""
            return f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.'
    return None


def _content_problem(content: Any, where: str) -> str | None:
    content = _fields(content)
    if content.get("role") not in (None, "user", "model"):
        return "Please use a valid role: user, model."
    parts = content.get("parts")
    if not isinstance(parts, list) or not parts:
        return f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty."
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            return f"* GenerateContentRequest.{where}.parts[{j}]: must be an object"
        problem = _unknown(part, _PART_FIELDS, f"{where}.parts[{j}]")
        if problem:
            return problem
        part = _fields(part)
        if len(_PART_DATA & part.keys()) != 1:
            return f"* GenerateContentRequest.{where}.parts[{j}].data: required oneof field 'data' must have one initialized field"
        inline = _fields(part.get("inlineData")) if "inlineData" in part else None
        if inline is not None:
            try:
                base64.b64decode(inline.get("data", ""), validate=True)
            except ValueError:
                return f"Invalid value at '{where}.parts[{j}].inline_data.data' (TYPE_BYTES), Base64 decoding failed"
            if not inline.get("mimeType"):
                return f"* GenerateContentRequest.{where}.parts[{j}].inline_data.mime_type: mime_type is not specified"
    return None


def _gemini_problem(request: dict, method: str, model: str) -> str | None:
    problem = _unknown(request, _GEMINI_FIELDS[method], "")
    if problem or method == "embedContent":
        return problem
    if method == "batchEmbedContents":
        requests = request.get("requests")
        if not isinstance(requests, list) or not requests:
            return "* BatchEmbedContentsRequest.requests: requests is not specified"
        for i, item in enumerate(requests):
            if _fields(item).get("model") != f"models/{model}":
                return (f"* BatchEmbedContentsRequest.requests[{i}].model: the model {_fields(item).get('model')!r} "
                        f"does not match the model in the URL, models/{model}")
        return None
    contents = request.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for i, content in enumerate(contents):
        problem = _content_problem(content, f"contents[{i}]")
        if problem:
            return problem
    system = _fields(request).get("systemInstruction")
    return _content_problem(system, "system_instruction") if system is not None else None


class _GeminiHandler(_VendorHandler):
    def _error(self, status: int, message: str, details: list | None = None) -> None:
        error = {"code": status, "message": message, "status": _GEMINI_STATUS.get(status, "UNKNOWN")}
        self._json(status, {"error": {**error, **({"details": details} if details else {})}})

    def _route(self, stub: Any, path: str, headers: dict[str, str], body: bytes) -> None:
        match = re.search(r"/models/([^/:]+):(\w+)$", path)
        if self.command != "POST" or not match or match[2] not in _GEMINI_FIELDS:
            self._error(404, f"Method not found: {path}")
            return
        model, method = match[1], match[2]
        query = self._query()
        key = headers.get("x-goog-api-key") or (query.get("key") or [None])[0]
        if key is None:
            self._error(403, "Method doesn't allow unregistered callers (callers without established identity). "
                             "Please use API Key or other form of API consumer identity to call this API.")
            return
        if key != stub.api_key:
            self._error(400, "API key not valid. Please pass a valid API key.", [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}])
            return
        request = self._checked(body, lambda r: _gemini_problem(r, method, model))
        if request is None:
            return
        request = _fields(request)
        if method == "embedContent":
            self._json(200, {"embedding": self._embedding(request)})
            return
        if method == "batchEmbedContents":
            self._json(200, {"embeddings": [self._embedding(_fields(r)) for r in request["requests"]]})
            return

        parts = [_fields(p) for p in _fields(request["contents"][-1])["parts"]]
        responses = [_fields(p["functionResponse"]) for p in parts if "functionResponse" in p]
        declarations = [d for tool in request.get("tools") or [] for d in _fields(tool).get("functionDeclarations") or []]
        call = _fields(declarations[0]) if declarations and not responses else None
        reply = "tool said: " + json.dumps(responses[0].get("response")) if responses else None
        limit = _fields(request.get("generationConfig")).get("maxOutputTokens")
        text, output, small = self._texts(stub, headers, reply, limit)
        counts = token_counts(headers, body, output)
        finish = "MAX_TOKENS" if small and not call else "STOP"

        def response(part: dict, last: bool) -> dict:
            candidate = {"content": {"parts": [part], "role": "model"}, "index": 0,
                         **({"finishReason": finish} if last else {})}
            usage = {}
            if counts:
                usage = {"promptTokenCount": counts[0], "totalTokenCount": counts[0]}
                if last:
                    usage = {**usage, "candidatesTokenCount": counts[1], "totalTokenCount": sum(counts)}
            return {"candidates": [candidate], **({"usageMetadata": usage} if usage else {}),
                    "modelVersion": model, "responseId": response_id}

        response_id = _request_id()
        chunks = [{"functionCall": {"name": call.get("name"), "args": _fake_args(
            call.get("parameters") or call.get("parametersJsonSchema"))}}] if call else \
            [{"text": p} for p in _pieces(headers, reply)]
        if method == "generateContent":
            self._json(200, response(chunks[0] if call else {"text": text}, True))
            return
        replies = [json.dumps(response(part, i == len(chunks) - 1)).encode() for i, part in enumerate(chunks)]
        if query.get("alt") == ["sse"]:
            self._write_stream(headers, "text/event-stream", [], [b"data: %s\r\n\r\n" % r for r in replies], [])
        else:  # without alt=sse the API streams one JSON array
            self._write_stream(headers, "application/json", [b"["],
                               [(b",\r\n" if i else b"") + r for i, r in enumerate(replies)], [b"]"])

    def _embedding(self, request: dict) -> dict:
        text = "".join(_fields(p).get("text", "") for p in _fields(request.get("content")).get("parts") or [])
        return {"values": _vector(text, int(request.get("outputDimensionality") or 8))}


class GeminiStub(StubServer):
    """POST .../models/{model}:generateContent, :streamGenerateContent, :embedContent, :batchEmbedContents.

    The key comes in `x-goog-api-key` (or `?key=`): none, 403 PERMISSION_DENIED; not `api_key`, 400
    INVALID_ARGUMENT "API key not valid" (reason API_KEY_INVALID), as the API answers. 400 for a
    field the method does not know (camelCase or snake_case both read), empty `contents`, a role
    other than user/model, a part without exactly one of text/inlineData/fileData/functionCall/
    functionResponse/executableCode/codeExecutionResult, inlineData not base64 or without mimeType;
    batchEmbedContents: a `requests[].model` other than `models/<model in the URL>`.
    streamGenerateContent with `alt=sse` streams `data: {GenerateContentResponse}\\r\\n\\r\\n`; without,
    one JSON array of them, as the API. Every chunk has usageMetadata with the prompt count; the last
    adds finishReason and candidatesTokenCount. finishReason MAX_TOKENS when maxOutputTokens < 5.
    """

    handler = _GeminiHandler

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0, api_key: str = "gemini-test-key"):
        super().__init__(name, host, port)
        self.api_key = api_key


# --- Ollama ---------------------------------------------------------------------------------------

# The Modelfile parameters Ollama's docs list for `options`.
_OLLAMA_OPTIONS = {"num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n",
                   "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty", "mirostat",
                   "mirostat_tau", "mirostat_eta", "penalize_newline", "stop", "numa", "num_ctx", "num_batch",
                   "num_gpu", "main_gpu", "low_vram", "vocab_only", "use_mmap", "use_mlock", "num_thread"}


def _ollama_problem(stub: "OllamaStub", request: dict, chat: bool) -> str | None:
    if not request.get("model"):
        return "model is required"
    options = request.get("options") or {}
    for key in options if isinstance(options, dict) else ["options"]:
        if key not in _OLLAMA_OPTIONS:
            return f"invalid option provided: {key}"
    if not chat:
        return None
    if stub.require_stream and "stream" not in request:
        return "stub: set `stream` explicitly (Ollama streams NDJSON when it is left out)"
    for message in request.get("messages") or []:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            return f"invalid role: {message.get('role') if isinstance(message, dict) else message!r}"
        if not isinstance(message.get("content", ""), str):
            return "json: cannot unmarshal array into Go struct field Message.messages.content of type string"
        images = message.get("images", [])
        if not isinstance(images, list):
            return "json: cannot unmarshal string into Go struct field Message.messages.images of type []api.ImageData"
        for image in images:
            try:
                base64.b64decode(image, validate=True)
            except (TypeError, ValueError):
                return "illegal base64 data in messages.images"
    return None


class _OllamaHandler(_VendorHandler):
    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _route(self, stub: Any, path: str, headers: dict[str, str], body: bytes) -> None:
        chat = path.endswith("/api/chat")
        if self.command != "POST" or not (chat or path.endswith("/api/embed")):
            # Go's answer to an unknown path; /v1/* too, so a test sees the native API was used.
            self._send(404, b"404 page not found", "text/plain; charset=utf-8")
            return
        request = self._checked(body, lambda r: _ollama_problem(stub, r, chat))
        if request is None:
            return
        base = {"model": request["model"], "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())}
        if not chat:
            inputs = request.get("input", [])
            inputs = inputs if isinstance(inputs, list) else [inputs]
            self._json(200, {"model": request["model"], "embeddings": [_vector(str(i), 8) for i in inputs],
                             "total_duration": 1_000_000, "load_duration": 100_000,
                             "prompt_eval_count": sum(len(str(i)) // 4 + 1 for i in inputs)})
            return
        messages = request.get("messages") or []
        if not messages:  # Ollama loads the model and says so
            self._json(200, {**base, "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
            return

        tool_messages = [m for m in messages if m["role"] == "tool"]
        tools = request.get("tools") or []
        function = (tools[0].get("function") or {}) if tools and not tool_messages and isinstance(tools[0], dict) else None
        reply = "tool said: " + tool_messages[-1].get("content", "") if tool_messages else None
        text, output, small = self._texts(stub, headers, reply, (request.get("options") or {}).get("num_predict"))
        counts = token_counts(headers, body, output)
        final = {"done": True, "done_reason": "length" if small and not function else "stop",
                 "total_duration": 2_000_000, "load_duration": 100_000, "prompt_eval_duration": 300_000,
                 "eval_duration": 1_500_000,
                 **({"prompt_eval_count": counts[0], "eval_count": counts[1]} if counts else {})}
        calls = [{"function": {"name": function.get("name"), "arguments": _fake_args(function.get("parameters"))}}] \
            if function else None
        if request.get("stream") is False:
            message = {"role": "assistant", "content": "" if calls else text, **({"tool_calls": calls} if calls else {})}
            self._json(200, {**base, "message": message, **final})
            return

        def line(payload: dict) -> bytes:
            return json.dumps(payload).encode() + b"\n"

        messages_out = [{"role": "assistant", "content": "", "tool_calls": calls}] if calls else \
            [{"role": "assistant", "content": p} for p in _pieces(headers, reply)]
        self._write_stream(headers, "application/x-ndjson", [],
                           [line({**base, "message": m, "done": False}) for m in messages_out],
                           [line({**base, "message": {"role": "assistant", "content": ""}, **final})])


class OllamaStub(StubServer):
    """POST .../api/chat and .../api/embed, as Ollama's native API; anything else (/v1/* too) is 404.

    400 {"error": ...} without `model`, for an `options` key that is not a Modelfile parameter, a role
    other than system/user/assistant/tool, content that is not a string, images not a list of
    base64 strings, and (require_stream, default on: stricter than Ollama, which then streams)
    a chat without an explicit `stream`. A chat streams NDJSON (application/x-ndjson) unless
    `stream` is false; done_reason "length" when options.num_predict < 5; with tools and no tool
    message, message.tool_calls.
    """

    handler = _OllamaHandler

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0, require_stream: bool = True):
        super().__init__(name, host, port)
        self.require_stream = require_stream


PROTOCOLS: dict[str, type[StubServer]] = {"anthropic": AnthropicStub, "gemini": GeminiStub, "ollama": OllamaStub}

if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:], __doc__, PROTOCOLS))
