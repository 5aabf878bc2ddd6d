"""Issue 8: tokens of an identity provider, verified by Envoy's own jwt_authn in front of the
filter (`gateway.jwt`); the filter reads the verified claims for permissions.

Tokens are HS256, signed here with the standard library, against a JWKS either on disk
(`jwks-file`) or served over HTTP on loopback (`jwks-uri`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from harness import error_of, instance, json_body

SECRET = b"an-hs256-secret-for-tests-only-32b"
ISSUER = "https://idp.example.test"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwks() -> dict:
    return {"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256", "k": b64(SECRET)}]}


def token(secret: bytes = SECRET, **claims) -> str:
    payload = {"iss": ISSUER, "aud": "jairouter", "sub": "alice", "exp": int(time.time()) + 600, **claims}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps(payload).encode())
    signature = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{signature}"


def config(stubs, jwt: dict, **extra) -> tuple[dict, list]:
    chat, embed = stubs("chat", "embed")
    model = {"retries": 0, "gateway": {"jwt": {"issuer": ISSUER, "audiences": ["jairouter"], **jwt}},
             "services": {"chat": {"instances": [instance("m", chat), instance("m2", chat)]},
                          "embedding": {"instances": [instance("e", embed)]}}}
    return {"model": model, **extra}, [chat, embed]


def post(gw, path: str, model: str, token_: str | None = None):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "input": "x"}
    headers = {"content-type": "application/json"}
    if token_:
        headers["authorization"] = f"Bearer {token_}"
    return httpx.post(f"{gw.url}{path}", content=json_body(body), headers=headers, timeout=10)


def test_verified_claims_decide_what_a_token_may_use(stubs, gateway, tmp_path):
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks()))
    cfg, (chat, embed) = config(stubs, {"jwks-file": str(jwks_file)})
    gw = gateway(cfg)
    chat_only = token(permissions=["chat"])
    assert post(gw, "/v1/chat/completions", "m", chat_only).status_code == 200
    r = post(gw, "/v1/embeddings", "e", chat_only)
    assert r.status_code == 403 and error_of(r)["code"] == "service_not_permitted", r.text
    # A scope string works as well as a list; a models claim narrows.
    narrow = token(permissions="openid chat", models=["m"])
    assert post(gw, "/v1/chat/completions", "m", narrow).status_code == 200
    r = post(gw, "/v1/chat/completions", "m2", narrow)
    assert r.status_code == 403 and error_of(r)["code"] == "model_not_permitted"
    assert post(gw, "/v1/embeddings", "e", token(permissions=["admin"])).status_code == 200
    for bad in (None, token(secret=b"x" * 34, permissions=["chat"]),
                token(permissions=["chat"], exp=int(time.time()) - 600), "not.a.jwt"):
        r = post(gw, "/v1/chat/completions", "m", bad)
        assert r.status_code == 401, (bad, r.text)
        assert error_of(r)["code"] == "invalid_token"
    # The token never reaches a backend; the access log names its subject.
    assert all("authorization" not in rq.headers for rq in chat.requests + embed.requests)
    assert '\\"subject\\":\\"alice\\"' in gw.access_log_path.read_text()


class JwksServer:
    def __init__(self):
        document = json.dumps(jwks()).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(document)))
                self.end_headers()
                self.wfile.write(document)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"


def test_keys_from_the_providers_jwks_uri_and_api_keys_beside_tokens(stubs, gateway):
    from test_api_keys import hash_key

    idp = JwksServer()
    try:
        keys = {"jairouter": {"security": {"api-key": {"keys": [
            {"key-id": "batch", "key-hash": hash_key("sk-batch-0000111122223333"), "permissions": ["chat"]}]}}}}
        cfg, _ = config(stubs, {"jwks-uri": idp.url})
        gw = gateway(cfg, api_keys=keys)
        deadline = time.monotonic() + 10
        while post(gw, "/v1/chat/completions", "m", token(permissions=["chat"])).status_code != 200:
            assert time.monotonic() < deadline, "the JWKS was never fetched"
            time.sleep(0.2)
        assert post(gw, "/v1/chat/completions", "m", "sk-batch-0000111122223333").status_code == 200
        r = post(gw, "/v1/chat/completions", "m", None)
        assert r.status_code == 401 and error_of(r)["code"] == "missing_api_key"
    finally:
        idp.server.shutdown()
