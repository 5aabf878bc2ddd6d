"""Issue 8, part one: the configuration changes while the gateway serves.

The gateway is live (the filter's configuration and the clusters are files Envoy watches) and
the renderer's watcher follows the operator's application.yml, as `./build.sh up` and the Helm
chart run it. Loads run during every edit and must not see a single failed request.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from harness import error_of, instance, json_body

CHAT = {"content-type": "application/json"}


def chat_config(*instances, **model_extra) -> dict:
    return {"model": {"services": {"chat": {"instances": list(instances)}}, **model_extra}}


def ask(client: httpx.Client, url: str, model: str = "m") -> httpx.Response:
    body = json_body({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return client.post(f"{url}/v1/chat/completions", content=body, headers=CHAT, timeout=10)


class Load:
    """Clients sending chat requests back to back until stopped; every answer is kept."""

    def __init__(self, url: str, clients: int = 4, model: str = "m"):
        self.url, self.model = url, model
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                try:
                    r = ask(client, self.url, self.model)
                    self.statuses.append(r.status_code)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


def wait_for(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def status(gw) -> dict:
    r = httpx.get(gw.status_url, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def test_an_added_instance_takes_traffic_within_5_s_under_load(gateway, stubs):
    a, b = stubs("a", "b")
    gw = gateway(chat_config(instance("m", a)))
    gw.watch()
    wait_for(lambda: "applied configuration" in gw.watch_log(), 10, "the watcher started")
    with Load(gw.url) as load:
        wait_for(lambda: len(load.statuses) >= 50, 10, "load running")
        gw.write_config(chat_config(instance("m", a), instance("m", b)))
        took = wait_for(lambda: len(b.requests) > 0, 5, "the new instance got traffic")
        seen = len(load.statuses)
        wait_for(lambda: len(load.statuses) >= seen + 100, 10, "load after the change")
    print(f"new instance served after {took:.2f} s; {len(load.statuses)} requests, 0 failed")
    assert load.failures == [], load.failures[:5]
    assert len(a.requests) > 0 and len(b.requests) > 0
    assert [i["base_url"] for i in status(gw)["services"][0]["instances"]] == [a.url, b.url]


def test_a_removed_instance_drains_without_failures(gateway, stubs):
    """The first instance goes: the positional id `chat-0` now names the other backend."""
    a, b = stubs("a", "b")
    gw = gateway(chat_config(instance("m", a), instance("m", b)))
    gw.watch()
    wait_for(lambda: "applied configuration" in gw.watch_log(), 10, "the watcher started")
    with Load(gw.url) as load:
        wait_for(lambda: len(load.statuses) >= 50, 10, "load running")
        gw.write_config(chat_config(instance("m", b)))
        wait_for(lambda: gw.watch_log().count("applied configuration") >= 2, 10, "applied")
        time.sleep(1.5)  # the watcher's settle time, then the old cluster is gone
        a.clear()
        seen = len(load.statuses)
        wait_for(lambda: len(load.statuses) >= seen + 100, 10, "load after the change")
    assert load.failures == [], load.failures[:5]
    assert a.requests == [], "the removed instance still got traffic"
    clusters = httpx.get(f"{gw.admin_url}/clusters", timeout=5).text
    assert a.url.rsplit(":", 1)[1] not in clusters.replace(b.url.rsplit(":", 1)[1], "")


def test_an_invalid_edit_is_refused_and_the_last_good_keeps_serving(gateway, stubs):
    [a] = stubs("a")
    gw = gateway(chat_config(instance("m", a)))
    gw.watch()
    wait_for(lambda: "applied configuration" in gw.watch_log(), 10, "the watcher started")
    version = status(gw)["version"]
    with Load(gw.url) as load:
        wait_for(lambda: len(load.statuses) >= 50, 10, "load running")
        gw.write_config(chat_config(instance("m", a, weight=-1)))
        wait_for(lambda: "refused" in gw.watch_log(), 5, "the watcher saw the refusal")
        wait_for(lambda: gw.stats("extension_config_discovery").get(
            "extension_config_discovery.http_filter.jairouter.update_rejected", 0) == 1, 5,
            "Envoy counted the rejection")
        seen = len(load.statuses)
        wait_for(lambda: len(load.statuses) >= seen + 100, 10, "load after the edit")
    assert load.failures == [], load.failures[:5]
    reason = "model.services.chat.instances[0].weight: must be a whole number"
    assert reason in gw.watch_log()
    assert reason in gw.logs(), "Envoy's log names the key"
    assert status(gw)["version"] == version
    # The operator fixes the file: it applies.
    gw.write_config(chat_config(instance("m", a, weight=2)))
    wait_for(lambda: status(gw)["version"] != version, 5, "the fixed file applied")


def test_buckets_and_breakers_of_unchanged_keys_survive_a_reload(gateway, stubs):
    a, b, e = stubs("a", "b", "e")
    limited = {"rate-limit": {"enabled": True, "algorithm": "token-bucket", "capacity": 5, "rate": 1,
                              "scope": "service"}}
    breaker = {"circuit-breaker": {"failure-threshold": 1, "timeout": 600000}, "retries": 0}
    config = chat_config(instance("m", a), instance("broken", b), **breaker)
    config["model"]["services"]["chat"].update(limited)
    gw = gateway(config)
    gw.watch()
    wait_for(lambda: "applied configuration" in gw.watch_log(), 10, "the watcher started")
    with httpx.Client() as client:
        b.fail_next(1, 500)
        assert ask(client, gw.url, "broken").status_code == 500  # opens its breaker
        for _ in range(3):
            assert ask(client, gw.url).status_code == 200
        drawn = time.monotonic()
        before = status(gw)
        # An unrelated change: an embedding service appears.
        config["model"]["services"]["embedding"] = {"instances": [instance("e", e)]}
        gw.write_config(config)
        wait_for(lambda: status(gw)["version"] != before["version"], 5, "reloaded")
        after = status(gw)
        chat = after["services"][0]["instances"]
        assert [i["breaker"] for i in chat] == ["closed", "open"]
        [bucket] = [x for x in after["rate_limits"] if x["bucket"] == "chat"]
        # 4 of 5 drawn, then the refill of one a second since: a bucket reset by the reload
        # would be full (5). A loaded machine may take a second or two to reload.
        refilled = int(time.monotonic() - drawn) + 1
        assert bucket["available"] <= min(1 + refilled, 4), (refilled, after["rate_limits"])
        # What it holds, then refused: the bucket was kept.
        codes = [ask(client, gw.url).status_code for _ in range(bucket["available"] + 2)]
        assert 429 in codes, codes


def test_a_reload_that_changes_a_models_budget_keeps_its_request_limit(gateway, stubs):
    """A model's request limit and token budget share one shared-data entry (one read and one
    write a request for both): a reload that changes only the budget starts the budget afresh
    and keeps the request limit's bucket, through Envoy's shared data."""
    [a] = stubs("a")
    config = chat_config(instance("m", a))
    config["model"]["rate-limit"] = {"enabled": True, "algorithm": "token-bucket", "capacity": 5,
                                     "rate": 1, "scope": "model"}
    config["model"]["token-limit"] = {"tokens-per-minute": 100000, "scope": "model"}
    gw = gateway(config)
    gw.watch()
    wait_for(lambda: "applied configuration" in gw.watch_log(), 10, "the watcher started")

    def levels():
        page = status(gw)
        return page["version"], {x["name"]: x for x in page["rate_limits"]}

    with httpx.Client() as client:
        for _ in range(4):
            assert ask(client, gw.url).status_code == 200
        drawn = time.monotonic()
        version, before = levels()
        assert before["model.token-limit"]["bucket"] == before["model.rate-limit"]["bucket"] == "chat/m"
        assert before["model.token-limit"]["available"] < 100000, before
        config["model"]["token-limit"]["tokens-per-minute"] = 200000
        gw.write_config(config)
        wait_for(lambda: levels()[0] != version, 5, "reloaded")
        _, after = levels()
        # The budget's numbers changed: a fresh budget, full.
        assert after["model.token-limit"]["available"] == 200000, after
        # The request limit did not: 4 of 5 drawn, plus its refill of one a second since (a
        # bucket reset by the reload would be full: 5).
        refilled = int(time.monotonic() - drawn) + 1
        assert after["model.rate-limit"]["available"] <= min(1 + refilled, 4), (refilled, after)
        codes = [ask(client, gw.url).status_code for _ in range(after["model.rate-limit"]["available"] + 2)]
        assert 429 in codes, codes


def test_status_page_is_on_the_admin_side_only(gateway, stubs):
    [a] = stubs("a")
    gw = gateway(chat_config(instance("m", a, **{"instance-id": "alpha"})))
    page = status(gw)
    assert len(page["version"]) == 16
    [inst] = page["services"][0]["instances"]
    assert inst["id"] == "alpha" and inst["healthy"] and inst["breaker"] == "closed"
    assert inst["in_flight"] == 0
    # The public listener never answers it.
    r = httpx.get(f"{gw.url}/status", timeout=5)
    assert r.status_code == 404
    assert "services" not in r.text
    error_of(r)
    # The status listener only answers GET /status.
    assert httpx.get(f"http://127.0.0.1:{gw.status_port}/v1/models", timeout=5).status_code == 404


def test_health_checks_follow_a_reload(gateway, stubs):
    """The process's health checker reads the configuration the filter publishes: an instance
    added by an edit gets checked, with no restart."""
    a, b = stubs("a", "b")
    checks = {"health-check": {"interval": 200, "timeout": 150}}
    gw = gateway(chat_config(instance("m", a), **checks))
    gw.watch()
    wait_for(lambda: any(r.path == "/v1/models" for r in a.requests), 5, "a is checked")
    gw.write_config(chat_config(instance("m", a), instance("m", b), **checks))
    wait_for(lambda: any(r.path == "/v1/models" for r in b.requests), 5, "the added instance is checked")
