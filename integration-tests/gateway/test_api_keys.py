"""Issue 8, part two: API keys.

Keys live in their own file (a Kubernetes Secret) as salted hashes made by the renderer's
`hash-key`; clients send them as `Authorization: Bearer` (the OpenAI SDKs) or `X-API-Key` (the
original). The backend's own credentials come from the instance's `headers` (a placeholder filled
from the environment, as a Secret mounted as env), and the client's key never reaches a backend.
"""

from __future__ import annotations

import os
import subprocess

import httpx
import openai
import pytest

from harness import RENDER, error_of, instance, json_body

CHAT_KEY = "sk-chat-0123456789abcdef"
ADMIN_KEY = "sk-admin-fedcba9876543210"
EMBED_KEY = "sk-embed-1111222233334444"
QUOTA_KEY = "sk-quota-5555666677778888"
EXPIRED_KEY = "sk-expired-99990000aaaabbbb"
DISABLED_KEY = "sk-disabled-ccccddddeeeeffff"
ALL_KEYS = [CHAT_KEY, ADMIN_KEY, EMBED_KEY, QUOTA_KEY, EXPIRED_KEY, DISABLED_KEY]
BACKEND_TOKEN = "backend-secret-token-42"


def hash_key(key: str, salt: str | None = None) -> str:
    args = [str(RENDER), "hash-key", *(["--salt", salt] if salt else [])]
    out = subprocess.run(args, input=key + "\n", capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def api_keys_file() -> dict:
    keys = [
        {"key-id": "chat-team", "key-hash": hash_key(CHAT_KEY), "permissions": ["chat"], "models": ["m"]},
        {"key-id": "ops", "key-hash": hash_key(ADMIN_KEY), "permissions": ["admin"]},
        {"key-id": "search", "key-hash": hash_key(EMBED_KEY), "permissions": "embedding"},
        {"key-id": "metered", "key-hash": hash_key(QUOTA_KEY), "permissions": ["chat"],
         "rate-limit-per-minute": 3},
        {"key-id": "old", "key-hash": hash_key(EXPIRED_KEY), "permissions": ["chat"],
         "expires-at": "2020-01-01T00:00:00"},
        {"key-id": "off", "key-hash": hash_key(DISABLED_KEY), "permissions": ["chat"], "enabled": False},
    ]
    return {"jairouter": {"security": {"api-key": {"enabled": True, "keys": keys}}}}


@pytest.fixture
def secured(stubs, gateway):
    hosted, local, embed = stubs("hosted", "local", "embed")
    config = {"model": {"retries": 0, "services": {
        "chat": {"instances": [
            # A hosted OpenAI-compatible backend: its token comes from a Secret, via the environment.
            instance("m", hosted, headers={"Authorization": "Bearer ${BACKEND_TOKEN}"}),
            instance("m2", local),
        ]},
        "embedding": {"instances": [instance("e", embed)]},
    }}}
    env = dict(os.environ, BACKEND_TOKEN=BACKEND_TOKEN)
    gw = gateway(config, api_keys=api_keys_file(), env=env)
    return gw, hosted, local, embed


def chat(gw, model="m", headers=None, stream=False):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return httpx.post(f"{gw.url}/v1/chat/completions", content=json_body(body),
                      headers={"content-type": "application/json", **(headers or {})}, timeout=10)


def bearer(key):
    return {"authorization": f"Bearer {key}"}


def test_who_may_call_what(secured):
    gw, hosted, local, embed = secured
    cases = [
        (None, 401, "missing_api_key"),
        (bearer("sk-not-a-key-at-all-000"), 401, "invalid_api_key"),
        (bearer(EXPIRED_KEY), 401, "expired_api_key"),
        (bearer(DISABLED_KEY), 401, "invalid_api_key"),
    ]
    for headers, status, code in cases:
        r = chat(gw, headers=headers)
        assert r.status_code == status, (headers, r.text)
        err = error_of(r)
        assert err["code"] == code and err["type"] == "authentication_error", err
        assert r.headers["www-authenticate"] == "Bearer"
    assert chat(gw, headers=bearer(CHAT_KEY)).status_code == 200
    assert chat(gw, headers={"x-api-key": CHAT_KEY}).status_code == 200
    assert chat(gw, headers={"authorization": f"bearer  {CHAT_KEY}"}).status_code == 200
    r = chat(gw, model="m2", headers=bearer(CHAT_KEY))
    assert r.status_code == 403 and error_of(r)["code"] == "model_not_permitted", r.text
    r = httpx.post(f"{gw.url}/v1/embeddings", content=json_body({"model": "e", "input": "x"}),
                   headers={"content-type": "application/json", **bearer(CHAT_KEY)}, timeout=10)
    assert r.status_code == 403 and error_of(r)["code"] == "service_not_permitted", r.text
    assert error_of(r)["type"] == "permission_error"
    r = httpx.post(f"{gw.url}/v1/embeddings", content=json_body({"model": "e", "input": "x"}),
                   headers={"content-type": "application/json", **bearer(EMBED_KEY)}, timeout=10)
    assert r.status_code == 200, r.text
    for model in ("m", "m2"):
        assert chat(gw, model=model, headers=bearer(ADMIN_KEY)).status_code == 200
    # The model list is behind the key too.
    assert httpx.get(f"{gw.url}/v1/models", timeout=5).status_code == 401
    listed = httpx.get(f"{gw.url}/v1/models", headers=bearer(CHAT_KEY), timeout=5)
    assert [m["id"] for m in listed.json()["data"]] == ["m"], "a key sees only the models it may use"
    listed = httpx.get(f"{gw.url}/v1/models", headers=bearer(ADMIN_KEY), timeout=5)
    assert sorted(m["id"] for m in listed.json()["data"]) == ["e", "m", "m2"]
    # Refused requests never reached a backend.
    assert len(hosted.requests) == 3 + 1 and len(local.requests) == 1 and len(embed.requests) == 1


def test_a_key_over_its_quota_gets_429_and_others_are_unaffected(secured):
    gw, *_ = secured
    codes = [chat(gw, headers=bearer(QUOTA_KEY)).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    r = chat(gw, headers=bearer(QUOTA_KEY))
    assert r.status_code == 429, r.text
    assert error_of(r)["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["x-jairouter-limit"] == "jairouter.security.api-key.keys[metered].rate-limit-per-minute"
    assert chat(gw, headers=bearer(CHAT_KEY)).status_code == 200


def test_the_openai_sdk_sees_the_errors_it_knows(secured):
    gw, *_ = secured
    ok = openai.OpenAI(base_url=gw.url + "/v1", api_key=CHAT_KEY, max_retries=0, timeout=10)
    reply = ok.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-wrong-wrong-wrong", max_retries=0,
                      timeout=10).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.PermissionDeniedError):
        ok.chat.completions.create(model="m2", messages=[{"role": "user", "content": "hi"}])
    metered = openai.OpenAI(base_url=gw.url + "/v1", api_key=QUOTA_KEY, max_retries=0, timeout=10)
    for _ in range(3):
        metered.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError):
        metered.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


def test_backends_get_their_own_credentials_never_the_clients(secured):
    gw, hosted, local, _ = secured
    for stream in (False, True):
        for headers in (bearer(CHAT_KEY), {"x-api-key": CHAT_KEY}):
            r = chat(gw, headers=headers, stream=stream)
            assert r.status_code == 200, r.text
        r = chat(gw, model="m2", headers={**bearer(ADMIN_KEY), "x-api-key": ADMIN_KEY}, stream=stream)
        assert r.status_code == 200, r.text
    assert len(hosted.requests) == 4 and len(local.requests) == 2
    for received in hosted.requests:
        assert received.headers.get("authorization") == f"Bearer {BACKEND_TOKEN}"
        assert "x-api-key" not in received.headers
    for received in local.requests:
        assert "authorization" not in received.headers and "x-api-key" not in received.headers
    for received in hosted.requests + local.requests:
        assert not any(k in str(received.header_list) for k in ALL_KEYS)


def test_no_plaintext_key_in_logs_metrics_or_rendered_config(secured):
    gw, *_ = secured
    for key in ALL_KEYS:
        chat(gw, headers=bearer(key))
        chat(gw, headers={"x-api-key": key})
    chat(gw, headers=bearer("sk-not-a-key-at-all-000"))
    places = {
        "access log": gw.access_log_path.read_text(),
        "envoy log": gw.logs(),
        "prometheus": httpx.get(f"{gw.admin_url}/stats/prometheus", timeout=5).text,
        "stats": httpx.get(f"{gw.admin_url}/stats", timeout=5).text,
        "config dump": httpx.get(f"{gw.admin_url}/config_dump", timeout=5).text,
        "status page": httpx.get(gw.status_url, timeout=5).text,
        "bootstrap": (gw.workdir / "envoy.json").read_text(),
        "live files": "".join(p.read_text() for p in gw.live_dir.rglob("*.json")),
        "api keys file": gw.api_keys_path.read_text(),
    }
    for name, text in places.items():
        for key in ALL_KEYS:
            assert key not in text, f"{name} holds a plaintext key"
    # What the operator sees instead: the key's id.
    assert '\\"api_key\\":\\"chat-team\\"' in places["access log"]


def test_validate_checks_the_keys_file_offline(tmp_path):
    """`./build.sh validate FILE --api-keys KEYS`: what a CI job or a Helm hook runs before rollout."""
    from harness import ROOT

    config = tmp_path / "application.yml"
    config.write_text('model:\n  services:\n    chat:\n      instances:\n        - {name: m, base-url: "http://a:1"}\n')
    keys = tmp_path / "keys.yml"
    keys.write_text("jairouter:\n  security:\n    api-key:\n      keys:\n"
                    "        - {key-id: a, key-value: sk-plain-12345, permissions: [chat]}\n")
    out = subprocess.run([str(ROOT / "build.sh"), "validate", str(config), "--api-keys", str(keys)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "jairouter.security.api-key.keys[0].key-value: plaintext keys are not accepted" in out.stderr
    keys.write_text("jairouter:\n  security:\n    api-key:\n      keys:\n"
                    f"        - {{key-id: a, key-hash: '{hash_key('sk-plain-12345')}', permissions: [chat]}}\n")
    out = subprocess.run([str(ROOT / "build.sh"), "validate", str(config), "--api-keys", str(keys)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_a_keys_token_quota_is_settled_from_usage(stubs, gateway):
    [a] = stubs("a")
    key = "sk-tokens-000011112222"
    keys = {"jairouter": {"security": {"api-key": {"keys": [
        {"key-id": "tokens", "key-hash": hash_key(key), "permissions": ["chat"], "tokens-per-minute": 100}]}}}}
    gw = gateway({"model": {"services": {"chat": {"instances": [instance("m", a)]}}}}, api_keys=keys)

    def ask(usage: str):
        body = {"model": "m", "max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(f"{gw.url}/v1/chat/completions", content=json_body(body), timeout=10,
                          headers={"content-type": "application/json", "x-stub-usage": usage, **bearer(key)})

    # Each request reserves about 60 tokens (body / 4 + max_tokens) and is settled to what it used:
    # 10 of its 60, so the next one finds room again, whichever worker its connection lands on
    # (each ask is a new connection; a refund left owed on one worker would refuse the next on
    # the other).
    for _ in range(3):  # 100 - 3 x 10 leaves room for one more reservation
        assert ask("5,5").status_code == 200
    assert ask("40,40").status_code == 200  # this one used 80: the minute's budget is spent
    r = ask("5,5")
    assert r.status_code == 429, r.text
    assert r.headers["x-jairouter-limit"] == "jairouter.security.api-key.keys[tokens].tokens-per-minute"
