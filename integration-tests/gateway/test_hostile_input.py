"""Hostile clients and broken backends through a real Envoy (issue 10).

Every byte the filter reads comes from a client or a backend that may be broken or malicious;
a panic in the wasm VM would take down every request on that worker. A batch of malformed
requests and broken responses goes through the gateway, then it must still serve normal
traffic, its wasm VMs must never have been re-created or reloaded, and its log must show no
panic and no wasm error.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from harness import instance, json_body, multipart

CHAT = "/v1/chat/completions"
STT = "/v1/audio/transcriptions"
MAX_BODY = 64 * 1024


# --- raw HTTP/1.1, so that nothing on the client side tidies the bytes up -------------------

def raw_request(gw, head: bytes, body: bytes = b"", *, pieces: int = 1, gap: float = 0.0,
                timeout: float = 5.0, close_early: bool = False) -> int | None:
    """Sends `head` (request line and headers, without the blank line) and `body`, the body in
    `pieces` writes `gap` seconds apart; returns the status Envoy answered (None: none came)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        sock.sendall(head + b"\r\n\r\n")
        if body:
            size = max(1, -(-len(body) // pieces))
            for at in range(0, len(body), size):
                try:
                    sock.sendall(body[at:at + size])
                except OSError:
                    break  # Envoy answered and closed before the body was all sent
                if gap:
                    time.sleep(gap)
        if close_early:
            return None
        return read_status(sock)


def read_status(sock: socket.socket) -> int | None:
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, OSError):
        pass
    match = re.match(rb"HTTP/1\.1 (\d{3})", data)
    return int(match.group(1)) if match else None


def post(gw, path: str, body: bytes, content_type: bytes = b"application/json",
         extra: bytes = b"", **kw) -> int | None:
    head = (b"POST " + path.encode() + b" HTTP/1.1\r\nhost: gw\r\ncontent-type: " + content_type
            + b"\r\ncontent-length: " + str(len(body)).encode() + extra)
    return raw_request(gw, head, body, **kw)


# --- a backend that answers whatever a test asks for, broken on purpose ----------------------

def _sse(*events: bytes) -> bytes:
    return b"".join(events)


HUGE_LINE = b'data: {"choices":[{"delta":{"content":"' + b"a" * (2 * 1024 * 1024)
BROKEN_RESPONSES: dict[str, tuple[bytes, bytes]] = {
    # name: (content type, body); "close" in the name closes the connection mid-body.
    "garbage-json": (b"application/json", bytes(range(256)) * 256),
    "nested-json": (b"application/json", b'{"usage":' + b"[" * 100_000),
    "absurd-usage": (b"application/json",
                     b'{"usage":{"prompt_tokens":99999999999999999999999999999,'
                     b'"completion_tokens":-5,"total_tokens":1e999}}'),
    "broken-escapes": (b"application/json",
                       b'{"choices":[{"message":{"content":"\\ud800\\uZZ\\u12\xff\xfe\xc3"}}],"usage":{"prompt_tokens":"x"}}'),
    "sse-crlf-comments-no-done": (b"text/event-stream",
                                  b": keep-alive\r\n\r\nevent: x\r\nid: 1\r\nretry: -1\r\n"
                                  + b'data: {"choices":[{"delta":{"content":"hi"}}]}\r\n\r\n'
                                  + b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\r\n\r\n'),
    "sse-huge-line-close": (b"text/event-stream", HUGE_LINE),
    "sse-binary": (b"text/event-stream", b"data: " + bytes(range(256)) * 64 + b"\n\n"),
    "short-body-close": (b"application/json", b'{"usage":{"prompt_tok'),
}


class _HostileHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            headers = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            )
            length = int(headers.get(b"content-length", b"0") or 0)
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            name = headers.get(b"x-hostile", b"garbage-json").decode()
            self.server.seen.append(name)
            if name == "sse-never-ends-a-line":
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    piece = b"data: " + b"x" * 8192
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    time.sleep(0.01)
                return
            ctype, payload = BROKEN_RESPONSES[name]
            if "close" in name:
                # Promises more than it sends, then hangs up.
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\ncontent-length: "
                             + str(len(payload) + 1000).encode() + b"\r\n\r\n" + payload)
                return
            # Chunked, a few bytes per chunk: every split point the filter may see.
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype
                         + b"\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
            step = 7 if len(payload) < 4096 else 65536
            for at in range(0, len(payload), step):
                piece = payload[at:at + step]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass


class HostileBackend(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HostileHandler)
        self.seen: list[str] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


# --- the gateway's health --------------------------------------------------------------------

def vm_stats(gw) -> dict[str, int]:
    """Envoy's wasm counters: VMs created and VM reloads (`failure_policy: FAIL_RELOAD`).

    With the default failure policy a VM that panics is not replaced, and Envoy 1.40 counts
    nothing for it: that worker answers 503 to every later request, and the log says
    `[critical][wasm] wasm log ...: panicked at ...` (checked with a filter built to panic on a
    path). So `assert_no_vm_failure` reads the log too, and `serves_normally` uses a fresh
    connection per request, to meet both workers."""
    stats = gw.stats("wasm")
    return {k: v for k, v in stats.items()
            if k.startswith("wasm.envoy.wasm.runtime.") and k.endswith(".created")
            or ".vm_reload" in k}


def assert_no_vm_failure(gw, before: dict[str, int]) -> None:
    assert gw.process.poll() is None, f"Envoy died:\n{gw.logs()[-5000:]}"
    after = vm_stats(gw)
    assert after == before, f"wasm VM stats moved: {before} -> {after}"
    assert all(v == 0 for k, v in after.items() if ".vm_reload" in k), after
    bad = [line for line in gw.logs().splitlines()
           if re.search(r"panick|\[critical\]|RuntimeError|unreachable|wasm trap|Function: proxy_on_\w+ failed",
                        line)
           or ("[error]" in line and "wasm" in line)]
    assert not bad, "\n".join(bad[:20])


def serves_normally(gw) -> None:
    # A fresh connection per request reaches both workers: a VM that failed on either would
    # answer 503 (Envoy fails closed) and show here.
    for n in range(10):
        with httpx.Client(timeout=10) as c:
            r = c.post(gw.url + CHAT, json={"model": "llama", "messages": [{"role": "user", "content": f"hi {n}"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-stub-instance"] == "good"
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", gw.url + CHAT, json={"model": "llama", "stream": True, "messages": []}) as r:
            assert r.status_code == 200
            text = b"".join(r.iter_bytes())
        assert b"[DONE]" in text
        body, ctype = multipart([("model", "whisper"), ("file", ("a.wav", b"RIFF" * 100, "audio/wav"))])
        r = c.post(gw.url + STT, content=body, headers={"content-type": ctype})
        assert r.status_code == 200, r.text
        assert c.get(gw.url + "/v1/models").status_code == 200


def hostile_gateway(gateway, good, hostile: HostileBackend):
    return gateway({"model": {
        "token-limit": {"tokens-per-minute": 10_000_000, "scope": "model"},
        "retries": 0,
        "gateway": {"max-body-bytes": MAX_BODY},
        "services": {
            "chat": {"load-balance": {"type": "header-hash", "hash-header": "x-session-id", "hash-field": "user"},
                     "instances": [instance("llama", good), {"name": "broken", "base-url": hostile.url}]},
            "stt": {"instances": [instance("whisper", good)]},
        }}})


# --- the batches -----------------------------------------------------------------------------

def malformed_requests(gw) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []

    def expect(name: str, status, allowed=(400,)):
        out.append((name, status))
        assert status in allowed, f"{name}: {status}"

    # JSON bodies.
    for name, body in [
        ("cut", b'{"model":'), ("unquoted", b"{model:\"llama\"}"), ("array", b"[1,2]"),
        ("string", b'"llama"'), ("nan", b'{"temperature":NaN,"model":"llama"}'),
        ("broken-bom", b"\xef\xbb{}"), ("lone-surrogate", b'{"model":"\\ud800"}'),
        ("not-utf8-model", b'{"model":"\xff\xfe"}'), ("model-number", b'{"model":42}'),
        ("model-array", b'{"model":["llama"]}'), ("model-null", b'{"model":null}'),
        ("model-blank", b'{"model":"   "}'), ("control-char", b'{"x":"a\x01b","model":"llama"}'),
        ("bad-escape", b'{"x":"\\q","model":"llama"}'), ("trailing-comma", b'{"x":[1,],"model":"llama"}'),
        ("empty", b""), ("spaces", b"    "), ("nul", b"\x00" * 100),
    ]:
        expect("json " + name, post(gw, CHAT, body))
    expect("no model", post(gw, CHAT, b'{"messages":[{"model":"nested"}]}'))
    expect("deep nesting", post(gw, CHAT, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b',"model":"llama"}'))
    expect("deep objects", post(gw, CHAT, b'{"a":' + b'{"b":' * 5000))
    expect("model 2 KiB", post(gw, CHAT, json_body({"model": "m" * 2048})))
    expect("model 1 MB", post(gw, CHAT, b'{"model":"' + b"m" * 1_000_000 + b'"}'), (400, 413))
    expect("model last past max-body-bytes",
           post(gw, CHAT, json_body({"prompt": "x" * (MAX_BODY * 2), "model": "llama"})), (413,))
    expect("string never closed", post(gw, CHAT, b'{"prompt":"' + b"x" * (MAX_BODY * 2)), (413,))
    expect("duplicate model, first unknown",
           post(gw, CHAT, b'{"model":"nope","model":"llama"}'), (404,))
    expect("huge unicode escapes", post(gw, CHAT, b'{"x":"' + b"\\ud83d\\ude00" * 5000 + b'","model":"llama"}'),
           (200,))
    # A truncated body: content-length promises more; the client gives up.
    expect("truncated", post(gw, CHAT, b'{"model":"lla', close_early=True), (None,))
    head = (b"POST " + CHAT.encode() + b" HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"content-length: 100000")
    expect("truncated, client waits", raw_request(gw, head, b'{"messages":[', timeout=1.5), (None, 408, 400))
    # Chunked, one byte per chunk.
    body = json_body({"messages": [{"role": "user", "content": "é" * 50}], "user": "u\u00e9", "model": "llama"})
    chunked = b"".join(b"%x\r\n%s\r\n" % (1, body[i:i + 1]) for i in range(len(body))) + b"0\r\n\r\n"
    head = b"POST " + CHAT.encode() + b" HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ntransfer-encoding: chunked"
    expect("one byte per chunk", raw_request(gw, head, chunked, pieces=len(body) // 8), (200,))

    # Multipart.
    good_part, ctype = multipart([("model", "whisper"), ("file", ("a.wav", b"\x00" * 1000, "audio/wav"))], "bnd")
    for name, ctype_b, body in [
        ("no boundary param", b"multipart/form-data", good_part),
        ("empty boundary", b"multipart/form-data; boundary=", good_part),
        ("boundary 71 chars", b"multipart/form-data; boundary=" + b"b" * 71, good_part),
        ("boundary never appears", b"multipart/form-data; boundary=zzz", b"x" * (MAX_BODY - 1000)),
        ("part headers 20 KiB", b"multipart/form-data; boundary=bnd",
         b"--bnd\r\nContent-Disposition: form-data; name=model\r\nX: " + b"h" * 20_000 + b"\r\n\r\nwhisper\r\n--bnd--"),
        ("no model part", b"multipart/form-data; boundary=bnd",
         multipart([("file", ("a.wav", b"\x01" * 500, "audio/wav"))], "bnd")[0]),
        ("model part 5 KiB", b"multipart/form-data; boundary=bnd", multipart([("model", "w" * 5000)], "bnd")[0]),
        ("model part not utf-8", b"multipart/form-data; boundary=bnd",
         b"--bnd\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n\xff\xfe\r\n--bnd--\r\n"),
        ("bad delimiter line", b"multipart/form-data; boundary=bnd", b"--bndXYZ\r\n\r\n"),
        ("cut before the model", b"multipart/form-data; boundary=bnd",
         multipart([("file", ("a.wav", b"\x02" * 900, "audio/wav")), ("model", "whisper")], "bnd")[0][:600]),
        ("boundary not utf-8", b"multipart/form-data; boundary=\xff\xfe", good_part),
        ("repeated boundaries", b"multipart/form-data; boundary=bnd",
         b"--bnd\r\n" * 2000 + b"--bnd--\r\n"),
    ]:
        allowed = (400, 413) if name != "model part 5 KiB" else (400,)
        expect("multipart " + name, post(gw, STT, body, ctype_b), allowed)
    # A boundary split across every pair of writes still works.
    body, ctype = multipart([("file", ("a.wav", b"--bn" * 500, "audio/wav")), ("model", "whisper")], "bnd")
    expect("multipart split everywhere", post(gw, STT, body, ctype.encode(), pieces=len(body) // 3), (200,))

    # Header values that are not UTF-8, oversized or repeated.
    model_json = json_body({"model": "llama", "messages": []})
    for name, extra, allowed in [
        ("model header not utf-8", b"\r\nx-jairouter-model: \xff\xfe\xc3(", (200,)),  # read as absent: the body decides
        ("model header 30 KiB", b"\r\nx-jairouter-model: " + b"m" * 30_000, (400, 404)),
        ("model header repeated", b"\r\nx-jairouter-model: nope\r\nx-jairouter-model: llama", (200, 404)),
        ("session header not utf-8", b"\r\nx-session-id: \xff\xff\xff", (200,)),
        ("authorization not utf-8", b"\r\nauthorization: Bearer \xc3\x28", (200,)),
        ("content-type not utf-8", b"", (200, 400)),
        ("many headers", b"".join(b"\r\nx-h%d: %s" % (i, b"v" * 50) for i in range(90)), (200,)),
        ("routing header forged", b"\r\nx-jairouter-cluster: jairouter-broken\r\nx-envoy-original-dst-host: 1.2.3.4:1",
         (200,)),
    ]:
        ctype_b = b"application/json; charset=\xff" if name == "content-type not utf-8" else b"application/json"
        expect(name, post(gw, CHAT, model_json, ctype_b, extra), allowed + (431,))

    # Absurd paths and queries.
    for name, method, path, allowed in [
        ("query 8 KiB", "POST", CHAT + "?" + "a=1&" * 2000, (200,)),
        ("query of nuls", "POST", CHAT + "?x=%00%ff%fe" * 100, (200,)),
        ("path 40 KiB", "POST", "/v1/" + "a/" * 20_000, (404, 414, 431)),
        ("dot segments", "POST", "/v1/../../etc/passwd", (400, 404)),
        ("double slashes", "POST", "//v1//chat//completions", (404,)),
        ("fragment", "POST", CHAT + "#x", (200, 400)),
        ("models id huge", "GET", "/v1/models/" + "%ff" * 5000, (404,)),
        ("models id not utf-8", "GET", "/v1/models/\xff", (400, 404)),
        ("asterisk", "OPTIONS", "*", (400, 404)),
        ("absolute form", "POST", "http://gw" + CHAT, (200, 400, 404)),
        ("wrong method", "DELETE", CHAT, (405,)),
        ("unknown", "POST", "/v9/x?" + "q" * 1000, (404,)),
    ]:
        body = model_json if method == "POST" else b""
        head = (method.encode() + b" " + path.encode("latin-1") + b" HTTP/1.1\r\nhost: gw\r\n"
                b"content-type: application/json\r\ncontent-length: " + str(len(body)).encode())
        expect("path " + name, raw_request(gw, head, body), allowed)
    return out


def slowloris(gw, connections: int = 20, hold: float = 2.0) -> None:
    """Partial bodies held open while normal traffic must still be served."""
    socks = []
    for n in range(connections):
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        ctype = b"application/json" if n % 2 else b"multipart/form-data; boundary=bnd"
        sock.sendall(b"POST " + (CHAT if n % 2 else STT).encode() + b" HTTP/1.1\r\nhost: gw\r\ncontent-type: "
                     + ctype + b"\r\ncontent-length: 1000000\r\n\r\n")
        sock.sendall(b'{"messages":[{"content":"' if n % 2 else b"--bnd\r\nContent-Disposition: form-da")
        socks.append(sock)
    deadline = time.monotonic() + hold
    with httpx.Client(timeout=5) as c:
        while time.monotonic() < deadline:
            for sock in socks:
                try:
                    sock.sendall(b"x")
                except OSError:
                    pass
            r = c.post(gw.url + CHAT, json={"model": "llama", "messages": []})
            assert r.status_code == 200, r.text
            time.sleep(0.1)
    for sock in socks:
        sock.close()


def broken_backends(gw, good, hostile: HostileBackend) -> None:
    # The stub's own failure modes: slow streams, streams cut midway.
    with httpx.Client(timeout=10) as c:
        for headers in [{"x-stub-chunk-delay-ms": "50", "x-stub-chunks": "5"},
                        {"x-stub-break-after": "2", "x-stub-chunks": "6"},
                        {"x-stub-break-after": "0"},
                        {"x-stub-usage": "none", "x-stub-chunks": "50"},
                        {"x-stub-usage": "999999999999,999999999999"}]:
            try:
                with c.stream("POST", gw.url + CHAT, headers=headers,
                              json={"model": "llama", "stream": True, "messages": []}) as r:
                    b"".join(r.iter_bytes())
            except httpx.HTTPError:
                pass  # a cut stream is cut for the client too
        # Our broken backend, one way of breaking at a time; each answer reaches the client
        # (an absurd usage report must not lock the model's token budget).
        statuses = {}
        for name in [*BROKEN_RESPONSES, "sse-never-ends-a-line"]:
            try:
                with c.stream("POST", gw.url + CHAT, headers={"x-hostile": name},
                              json={"model": "broken", "stream": True, "messages": []},
                              timeout=httpx.Timeout(5, read=2)) as r:
                    statuses[name] = r.status_code
                    for _ in r.iter_bytes():
                        pass
            except httpx.HTTPError as e:
                statuses.setdefault(name, type(e).__name__)
    assert set(hostile.seen) >= set(BROKEN_RESPONSES), (hostile.seen, statuses)


def test_hostile_clients_and_broken_backends_never_crash_the_filter(stubs, gateway):
    (good,) = stubs("good")
    hostile = HostileBackend()
    try:
        gw = hostile_gateway(gateway, good, hostile)
        serves_normally(gw)
        before = vm_stats(gw)
        assert any(k.endswith(".created") for k in before), gw.stats("wasm")

        results = malformed_requests(gw)
        assert_no_vm_failure(gw, before)
        serves_normally(gw)

        slowloris(gw)
        broken_backends(gw, good, hostile)
        # The same batch from many clients at once, over both workers.
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: malformed_requests(gw), range(4)))
        assert_no_vm_failure(gw, before)
        serves_normally(gw)
        assert_no_vm_failure(gw, before)
        print(f"\n{len(results)} hostile requests per batch; wasm VM stats unchanged: {before}")
        print(json.dumps(dict(results), indent=None)[:2000])
    finally:
        hostile.shutdown()
        hostile.server_close()


def test_a_vm_that_dies_is_replaced_for_the_next_request(tmp_path):
    """The rendered plugin's failure policy (FAIL_RELOAD): if the VM ever panicked, the next request
    gets a fresh VM, instead of every later request of that worker failing until a restart
    (Envoy's default). Shown with the probe filter, which panics on request."""
    from harness import PROBE_WASM, Gateway

    gw = Gateway(tmp_path, {"model": {"services": {"chat": {"instances": [
        {"name": "m", "base-url": "http://127.0.0.1:9"}]}}}}, concurrency=1, live=False)
    bootstrap = gw.render_bootstrap()
    doc = json.loads(bootstrap.read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    plugin = hcm["http_filters"][0]["typed_config"]["config"]
    assert plugin["failure_policy"] == "FAIL_RELOAD"
    plugin["vm_config"]["code"]["local"]["filename"] = str(PROBE_WASM)
    plugin["configuration"]["value"] = "panic,reply-header"
    bootstrap.write_text(json.dumps(doc))
    gw.start(bootstrap)
    try:
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            # Alive: the probe marks every answer (the default route's 503 here).
            assert "x-probe-0" in client.get("/v1/models").headers
            died = client.get("/v1/models", headers={"x-probe-panic": "1"})
            assert "x-probe-0" not in died.headers and died.status_code >= 500
        deadline = time.monotonic() + 10
        while "x-probe-0" not in httpx.get(f"{gw.url}/v1/models", timeout=10).headers:
            assert time.monotonic() < deadline, gw.logs()[-2000:]
            time.sleep(0.1)
        print(f"VM replaced within {10 - (deadline - time.monotonic()):.2f} s")
        assert "panicked" in gw.logs()
    finally:
        gw.stop()
