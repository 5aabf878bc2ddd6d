"""A small OpenAI-compatible backend for tests and the demo.

It serves every endpoint the gateway routes (matched by path suffix, so any prefix such as
`/v1`, `/api/v1` or `/ollama/v1` works), streams SSE with chosen gaps, fails on demand, and
records every request it received so tests can check what reached it.

Per-request control headers:
  x-stub-delay-ms        wait before answering
  x-stub-status          answer this status with an OpenAI error (code "stub_failure")
  x-stub-chunks          SSE content chunks (default 5)
  x-stub-chunk-delay-ms  wait between SSE chunks
  x-stub-usage           "none" leaves `usage` out; "P,C" reports P prompt and C completion
                         tokens (default: body bytes / 4, and max_tokens or 3)
  x-stub-end-delay-ms    wait between a stream's last event and its end
  x-stub-break-after     cut a stream's connection after this many SSE chunks (a backend dying
                         midway)
  x-stub-end-after       end a stream cleanly after this many SSE chunks, with no finish or
                         [DONE] (a backend that stops answering midway but closes its stream)

Scripted tool use (attributes a test sets): `scripted_call = (name, arguments)` makes a request that
offers a tool of that name call it (arguments a JSON string) until a tool result is in the
conversation; `ignore_tools = True` answers text even when tools are offered (an agent that always
sends its tools, asked something a text answers). `/responses` speaks the Responses API itself (for
an instance that serves it natively): a Response object, or its event stream, with usage.

A stopped stub (`stop()`) refuses new connections and closes the ones it had kept alive, as a
dead process would: to its clients it is a dead backend until `start()`.

CLI: python stub_backend.py --instance NAME[:PORT] [...] prints `STUB <name> <port>` per server
and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import socket
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body: bytes
    received_at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Keep-alive connections from Envoy must not block shutdown.
    block_on_close = False

    def __init__(self, stub: "StubServer", address: tuple[str, int]):
        self.stub = stub
        super().__init__(address, stub.handler)


def _error(message: str, kind: str, code: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


def _multipart_fields(content_type: str, body: bytes) -> dict[str, bytes] | None:
    """The parts of a multipart/form-data body by field name, or None when it is malformed.

    Splits on the delimiter bytes, so a 20 MB file costs a few slices, not a Python loop.
    """
    boundary = None
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        return None
    delimiter = b"--" + boundary.encode()
    pieces = body.split(delimiter)
    if len(pieces) < 3:
        return None
    fields: dict[str, bytes] = {}
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = piece.partition(b"\n\n")
            if not sep:
                return None
        if content.endswith(b"\r\n"):
            content = content[:-2]
        elif content.endswith(b"\n"):
            content = content[:-1]
        name = None
        for line in head.decode("latin-1").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() != "content-disposition":
                continue
            for param in value.split(";")[1:]:
                pname, _, pvalue = param.strip().partition("=")
                if pname.strip().lower() == "name":
                    name = pvalue.strip().strip('"')
        if name is not None:
            fields.setdefault(name, content)
    else:
        return None  # no closing delimiter
    return fields


def token_counts(headers: dict[str, str], body: bytes, completion: int) -> tuple[int, int] | None:
    """(prompt, completion) tokens to report: "P,C" from x-stub-usage, None for "none", else body
    bytes / 4 and `completion`."""
    spec = headers.get("x-stub-usage", "")
    if spec == "none":
        return None
    if spec:
        prompt, completion = (int(x) for x in spec.split(","))
        return prompt, completion
    return len(body) // 4, completion


def _tool_call(request: dict, stub: "StubServer") -> dict | None:
    """With `tools` and no tool result yet: a call of the scripted tool when one is offered, else of
    the first tool, "stub-KEY" for each property (none with `ignore_tools`)."""
    tools = request.get("tools") or []
    messages = request.get("messages") or []
    if stub.ignore_tools or not tools or any(m.get("role") == "tool" for m in messages if isinstance(m, dict)):
        return None
    if scripted := _scripted_call([t.get("function", {}).get("name") for t in tools], stub):
        name, arguments = scripted
        return {"id": "call_stub_0", "type": "function", "function": {"name": name, "arguments": arguments}}
    function = tools[0].get("function", {})
    properties = (function.get("parameters") or {}).get("properties") or {}
    arguments = json.dumps({key: f"stub-{key}" for key in properties})
    return {"id": "call_stub_0", "type": "function", "function": {"name": function.get("name"), "arguments": arguments}}


def _tool_reply(request: dict) -> str | None:
    """After a tool result: "tool said: CONTENT", so a test can check the round trip."""
    results = [m for m in request.get("messages") or [] if isinstance(m, dict) and m.get("role") == "tool"]
    if not results:
        return None
    content = results[-1].get("content")
    return "tool said: " + (content if isinstance(content, str) else json.dumps(content))


def _scripted_call(offered: list, stub: "StubServer") -> tuple[str, str] | None:
    """The stub's scripted (name, arguments) when the request offers a tool of that name."""
    if stub.scripted_call and stub.scripted_call[0] in offered:
        return stub.scripted_call
    return None


# The Responses API (`/responses`), for an instance that serves it itself: the same scripted tool
# use as chat completions, in that API's items and events.

def _responses_input(request: dict) -> list[dict]:
    items = request.get("input")
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _responses_output(request: dict, stub: "StubServer") -> dict:
    """The one output item to answer: a function_call (tools offered, no result yet) or a message."""
    outputs = [i for i in _responses_input(request) if i.get("type") == "function_call_output"]
    tools = [t for t in request.get("tools") or [] if isinstance(t, dict)]
    if tools and not outputs and not stub.ignore_tools:
        scripted = _scripted_call([t.get("name") for t in tools], stub)
        if scripted is None:
            properties = (tools[0].get("parameters") or {}).get("properties") or {}
            scripted = (tools[0].get("name") or tools[0].get("type"), json.dumps({k: f"stub-{k}" for k in properties}))
        return {"id": "fc_stub_0", "type": "function_call", "status": "completed", "call_id": "call_stub_0",
                "name": scripted[0], "arguments": scripted[1]}
    text = f"hello from {stub.name}"
    if outputs:
        output = outputs[-1].get("output")
        text = "tool said: " + (output if isinstance(output, str) else json.dumps(output))
    return {"id": "msg_stub_0", "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _responses_usage(headers: dict[str, str], request: dict, body: bytes) -> dict | None:
    counts = token_counts(headers, body, int(request.get("max_output_tokens") or 3))
    if counts is None:
        return None
    prompt, completion = counts
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion}


def _response_object(request: dict, status: str, output: list[dict], usage: dict | None) -> dict:
    return {"id": "resp_stub_0", "object": "response", "created_at": int(time.time()), "status": status,
            "model": request.get("model"), "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": request.get("tools") or [], "usage": usage, "error": None, "incomplete_details": None}


def _responses_events(request: dict, item: dict, usage: dict | None) -> list[dict]:
    """The Responses stream of one output item, in the order OpenAI sends it (sequence numbers added
    by the writer)."""
    events: list[dict] = [
        {"type": "response.created", "response": _response_object(request, "in_progress", [], None)},
        {"type": "response.in_progress", "response": _response_object(request, "in_progress", [], None)},
        {"type": "response.output_item.added", "output_index": 0, "item": {**item, "status": "in_progress",
         **({"arguments": ""} if item["type"] == "function_call" else {"content": []})}},
    ]
    at = {"item_id": item["id"], "output_index": 0}
    if item["type"] == "function_call":
        args = item["arguments"]
        events += [{"type": "response.function_call_arguments.delta", **at, "delta": part}
                   for part in (args[:len(args) // 2], args[len(args) // 2:])]
        events.append({"type": "response.function_call_arguments.done", **at, "arguments": args})
    else:
        part = item["content"][0]
        text = part["text"]
        at["content_index"] = 0
        events.append({"type": "response.content_part.added", **at, "part": {**part, "text": ""}})
        events += [{"type": "response.output_text.delta", **at, "delta": text[i:i + 8]}
                   for i in range(0, len(text), 8)]
        events += [{"type": "response.output_text.done", **at, "text": text},
                   {"type": "response.content_part.done", **at, "part": part}]
    events += [{"type": "response.output_item.done", "output_index": 0, "item": item},
               {"type": "response.completed", "response": _response_object(request, "completed", [item], usage)}]
    return events


def stream_chunks(headers: dict[str, str]) -> int:
    """How many content pieces a stream carries: x-stub-chunks, default 5."""
    return int(headers.get("x-stub-chunks", "5"))


def _usage(headers: dict[str, str], request: dict, body: bytes) -> dict:
    """The `usage` to report: chosen by x-stub-usage, else derived from the request."""
    counts = token_counts(headers, body, int(request.get("max_tokens") or request.get("max_completion_tokens") or 3))
    if counts is None:
        return {}
    prompt, completion = counts
    return {"usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.stub._lock:
            self.server.stub._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.stub._lock:
            self.server.stub._connections.discard(self.connection)
        super().finish()

    # Every method goes through one place.
    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers, up to the empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        stub = self.server.stub
        received_at = time.monotonic()
        if stub._server is not self.server:
            # Stopped while this request was on its way in: drop it unanswered.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            body = self._read_body()
        except (ValueError, ConnectionError):
            self.close_connection = True
            return
        path, _, query = self.path.partition("?")
        headers = {k.lower(): v for k, v in self.headers.items()}
        stub._record(Received(self.command, path, query, headers, list(self.headers.items()), body, received_at))
        stub._enter()
        try:
            self._answer(stub, path, headers, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            stub._leave()

    def _answer(self, stub: "StubServer", path: str, headers: dict[str, str], body: bytes) -> None:
        delay = stub.delay + float(headers.get("x-stub-delay-ms", "0")) / 1000
        if delay > 0:
            time.sleep(delay)
        status = stub._take_failure() or (int(headers["x-stub-status"]) if "x-stub-status" in headers else None)
        if status:
            self._fail(status)
            return
        self._route(stub, path, headers, body)

    def _fail(self, status: int) -> None:
        """The answer to fail_next() and x-stub-status, in this protocol's error shape."""
        self._json(status, _error("stub failure requested", "stub_error", "stub_failure"))

    def _bad_json(self) -> None:
        """The answer to a body that is not a JSON object, in this protocol's error shape."""
        self._json(400, _error("malformed JSON body", "invalid_request_error", "invalid_json"))

    def _route(self, stub: "StubServer", path: str, headers: dict[str, str], body: bytes) -> None:
        content_type = headers.get("content-type", "")
        if path.endswith("/chat/completions") or path.endswith("/completions"):
            request = self._parse_json(body)
            if request is None:
                return
            chat = path.endswith("/chat/completions")
            usage = _usage(headers, request, body)
            call = _tool_call(request, stub) if chat else None
            reply = _tool_reply(request) if chat else None
            if request.get("stream") is True:
                self._stream(stub, request, chat, headers, usage, call, reply)
            elif chat and call:
                self._json(200, {
                    "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                    "model": request.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                                 "finish_reason": "tool_calls"}],
                    **usage,
                })
            elif chat:
                self._json(200, {
                    "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                    "model": request.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": reply or f"hello from {stub.name}"},
                                 "finish_reason": "stop"}],
                    **usage,
                })
            else:
                self._json(200, {
                    "id": "cmpl-stub", "object": "text_completion", "created": int(time.time()),
                    "model": request.get("model"),
                    "choices": [{"index": 0, "text": f"hello from {stub.name}", "finish_reason": "stop"}],
                    **usage,
                })
        elif path.endswith("/responses") and stub.serves_responses:
            self._respond(stub, headers, body)
        elif path.endswith("/embeddings"):
            request = self._parse_json(body)
            if request is None:
                return
            inputs = request.get("input", "")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            self._json(200, {
                "object": "list", "model": request.get("model"),
                "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))],
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            })
        elif path.endswith("/rerank"):
            request = self._parse_json(body)
            if request is None:
                return
            docs = request.get("documents") or []
            self._json(200, {
                "model": request.get("model"),
                "results": [{"index": i, "relevance_score": 1.0 / (i + 1)} for i in range(len(docs))],
            })
        elif path.endswith("/audio/speech"):
            if self._parse_json(body) is None:
                return
            self._send(200, b"ID3" + bytes(1024), "audio/mpeg")
        elif path.endswith("/audio/transcriptions") or path.endswith("/audio/translations") \
                or path.endswith("/images/edits"):
            fields = _multipart_fields(content_type, body)
            if fields is None:
                self._json(400, _error("malformed multipart body", "invalid_request_error", "invalid_multipart"))
                return
            model = fields["model"].decode("utf-8", "replace") if "model" in fields else None
            answer: dict[str, Any] = {"model": model, "file_bytes": len(fields.get("file", fields.get("image", b"")))}
            if path.endswith("/images/edits"):
                answer.update(created=int(time.time()), data=[{"url": f"http://stub/{stub.name}.png"}])
            else:
                answer["text"] = f"transcribed by {stub.name}"
            self._json(200, answer)
        elif path.endswith("/images/generations"):
            request = self._parse_json(body)
            if request is None:
                return
            self._json(200, {"created": int(time.time()), "model": request.get("model"),
                             "data": [{"url": f"http://stub/{stub.name}.png"}]})
        elif path in ("/", "/health") or path.endswith("/health"):
            self._json(200, {"status": "ok", "instance": stub.name})
        else:
            self._json(404, _error(f"no such endpoint: {path}", "invalid_request_error", "not_found"))

    def _respond(self, stub: "StubServer", headers: dict[str, str], body: bytes) -> None:
        """A Responses API answer, streamed (named SSE events, sequence-numbered) or whole."""
        request = self._parse_json(body)
        if request is None:
            return
        item, usage = _responses_output(request, stub), _responses_usage(headers, request, body)
        if request.get("stream") is not True:
            self._json(200, _response_object(request, "completed", [item], usage))
            return
        events = [b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps({**e, "sequence_number": n}).encode())
                  for n, e in enumerate(_responses_events(request, item, usage))]
        self._write_stream(headers, "text/event-stream", events[:3], events[3:-1], events[-1:])

    def _parse_json(self, body: bytes) -> dict | None:
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            self._bad_json()
            return None
        return value

    def _stream(self, stub: "StubServer", request: dict, chat: bool, headers: dict[str, str], usage: dict,
                call: dict | None = None, reply: str | None = None) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(payload: Any) -> bytes:
            return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"

        def chunk(i: int) -> bytes:
            choice = {"index": 0, "delta": {"content": f"tok{i} "}} if chat else {"index": 0, "text": f"tok{i} "}
            return event({"id": "stub-stream", "object": obj, "created": int(time.time()),
                          "model": request.get("model"), "choices": [choice]})

        def frame(delta: dict, finish: str | None = None) -> bytes:
            return event({"id": "stub-stream", "object": obj, "created": int(time.time()),
                          "model": request.get("model"),
                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        tail = [event({"id": "stub-stream", "object": obj, "created": int(time.time()), "model": request.get("model"),
                       "choices": [], **usage})] if usage else []
        if call:
            # OpenAI's tool-call deltas: id and name first, then the arguments in pieces.
            args = call["function"]["arguments"]
            half = len(args) // 2
            first = {"index": 0, "id": call["id"], "type": "function",
                     "function": {"name": call["function"]["name"], "arguments": ""}}
            pieces = [frame({"role": "assistant", "content": None, "tool_calls": [first]})] + [
                frame({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
                for part in (args[:half], args[half:])]
            self._write_stream(headers, "text/event-stream", [], pieces,
                               [frame({}, "tool_calls")] + tail + [event(b"[DONE]")])
            return
        if reply:
            pieces = [frame({"content": reply[i:i + 8]}) for i in range(0, len(reply), 8)]
            self._write_stream(headers, "text/event-stream", [], pieces,
                               [frame({}, "stop")] + tail + [event(b"[DONE]")])
            return
        self._write_stream(headers, "text/event-stream", [], [chunk(i) for i in range(stream_chunks(headers))],
                           tail + [event(b"[DONE]")])

    def _write_stream(self, headers: dict[str, str], content_type: str, head: list[bytes], pieces: list[bytes],
                      tail: list[bytes]) -> None:
        """A 200 stream, one HTTP chunk per event, flushed, so a client can time the gaps: `head`, then
        `pieces` x-stub-chunk-delay-ms apart (cut after x-stub-break-after of them), then `tail`."""
        gap = float(headers.get("x-stub-chunk-delay-ms", "0")) / 1000
        break_after = int(headers.get("x-stub-break-after", "-1"))
        end_after = int(headers.get("x-stub-end-after", "-1"))
        self.send_response(200)
        self.send_header("content-type", content_type)
        if content_type == "text/event-stream":
            self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("x-stub-instance", self.server.stub.name)
        self.end_headers()

        def write(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        for data in head:
            write(data)
        for i, data in enumerate(pieces):
            if i == break_after:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if i == end_after:
                break
            if i and gap:
                time.sleep(gap)
            write(data)
        for data in tail if end_after < 0 else []:
            write(data)
        # A backend that lingers after its last event: the client has its stream's end first.
        if end_delay := float(headers.get("x-stub-end-delay-ms", "0")) / 1000:
            time.sleep(end_delay)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-stub-instance", self.server.stub.name)
        if status == 429 and self.server.stub.retry_after is not None:
            self.send_header("retry-after", str(self.server.stub.retry_after))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class StubServer:
    """One backend instance on 127.0.0.1; `start()` returns it serving."""

    # The request handler: a subclass serves another protocol (see vendor_stubs.py).
    handler: type[BaseHTTPRequestHandler] = _Handler

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0):
        self.name = name
        self.host = host
        self._requested_port = port
        self.requests: list[Received] = []
        self.delay = 0.0
        self.fail_status: int | None = None
        # Sent as Retry-After with every 429 it answers.
        self.retry_after: int | None = None
        # Scripted tool use (see the module's doc): the (name, arguments) to call, or no tools at all.
        self.scripted_call: tuple[str, str] | None = None
        self.ignore_tools = False
        # Serves OpenAI's Responses API at `…/responses` itself (else that path is a 404, as on
        # a chat-completions-only backend).
        self.serves_responses = False
        self.in_flight = 0
        self.max_in_flight = 0
        self._fail_next: list[int] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "StubServer":
        self._server = _Server(self, (self.host, self._requested_port))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"stub-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._requested_port = server.server_address[1]
        server.shutdown()
        server.server_close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._fail_next.extend([status] * n)

    def _record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)

    def _take_failure(self) -> int | None:
        with self._lock:
            if self._fail_next:
                return self._fail_next.pop(0)
        return self.fail_status

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def main(argv: list[str], doc: str | None = None, protocols: dict[str, type[StubServer]] | None = None) -> int:
    """The CLI; with `protocols`, `--protocol NAME` picks the stub class every instance runs."""
    parser = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instance", action="append", required=True, metavar="NAME[:PORT]")
    parser.add_argument("--host", default="127.0.0.1")
    if protocols:
        parser.add_argument("--protocol", required=True, choices=sorted(protocols))
    args = parser.parse_args(argv)
    make = protocols[args.protocol] if protocols else StubServer
    servers = []
    for spec in args.instance:
        name, _, port = spec.partition(":")
        try:
            servers.append(make(name, args.host, int(port or 0)).start())
        except (OSError, ValueError) as e:
            print(f"stub {spec}: {e}", file=sys.stderr)
            for server in servers:
                server.stop()
            return 1
    for server in servers:
        print(f"STUB {server.name} {server.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    for server in servers:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
