"""The filter's metrics through a real Envoy's Prometheus endpoint (issue 7, first part)."""

from __future__ import annotations

import re
import time

import httpx

from harness import instance, json_body

JSON = {"content-type": "application/json"}


def scrape(gw) -> dict[tuple[str, frozenset], float]:
    """Every sample of /stats/prometheus, by name and label set."""
    samples = {}
    text = httpx.get(gw.admin_url + "/stats/prometheus", timeout=10).text
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def mixed_gateway(stubs, gateway, capacity: int):
    """Two instances, one failing (its breaker opens at once), and a model limit that refuses
    once `capacity` requests have passed: traffic through it feeds every series."""
    bad, good = stubs("bad", "good")
    bad.fail_status = 500
    return gateway({"model": {"load-balance": {"type": "round-robin"}, "retries": 0,
                              "circuit-breaker": {"failure-threshold": 1, "timeout": 60000},
                              "rate-limit": {"enabled": True, "capacity": capacity, "rate": 1, "scope": "model"},
                              "services": {"chat": {"instances": [instance("llama", bad), instance("llama", good)]}}}})


def test_requests_durations_sizes_backend_calls_and_selections_are_counted(stubs, gateway):
    a, b = stubs("a", "b")
    gw = gateway({"model": {"load-balance": {"type": "round-robin"}, "services": {
        "chat": {"instances": [instance("llama", a), instance("llama", b)]}}}})
    chat = json_body({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for _ in range(6):
            assert c.post("/v1/chat/completions", content=chat, headers=JSON).status_code == 200
        for _ in range(2):
            assert c.post("/v1/chat/completions", content=json_body({"model": "nope"}), headers=JSON).status_code == 404
        stream = json_body({"model": "llama", "stream": True, "messages": []})
        assert c.post("/v1/chat/completions", content=stream, headers=JSON).status_code == 200
    time.sleep(1.5)  # each worker hands its counts to Envoy once a second
    s = scrape(gw)
    assert value(s, "jairouter_requests_total", service="chat", method="POST", status="2xx") == 6
    assert value(s, "jairouter_requests_total", service="chat", method="STREAM", status="2xx") == 1
    assert value(s, "jairouter_requests_total", service="chat", method="POST", status="4xx") == 2
    # The 404s were for the chat endpoint: they count under its service too.
    assert value(s, "jairouter_request_duration_seconds_count", service="chat", method="POST") == 8
    assert value(s, "jairouter_request_duration_seconds_bucket", service="chat", method="POST", le="+Inf") == 8
    assert value(s, "jairouter_request_duration_seconds_bucket", service="chat", method="POST", le="10") == 8
    unknown = len(json_body({"model": "nope"}))
    assert value(s, "jairouter_request_size_bytes_sum", service="chat") == 6 * len(chat) + len(stream) + 2 * unknown
    assert value(s, "jairouter_request_size_bytes_count", service="chat") == 9
    assert value(s, "jairouter_response_size_bytes_count", service="chat") == 9
    assert value(s, "jairouter_response_size_bytes_sum", service="chat") > 9 * 50
    calls = {i: value(s, "jairouter_backend_calls_total", service="chat", instance=i, status="2xx") for i in ("chat-0", "chat-1")}
    assert calls == {"chat-0": 4, "chat-1": 3}, calls
    assert value(s, "jairouter_backend_call_duration_seconds_count", service="chat", instance="chat-0") == 4
    picks = {i: value(s, "jairouter_loadbalancer_selections_total", service="chat", strategy="round_robin", instance=i)
             for i in ("chat-0", "chat-1")}
    assert picks == {"chat-0": 4, "chat-1": 3}, picks


def test_breaker_events_and_state_and_health_gauges(stubs, gateway):
    bad, good = stubs("bad", "good")
    gw = gateway({"model": {"load-balance": {"type": "round-robin"}, "retries": 0,
                            "circuit-breaker": {"failure-threshold": 2, "timeout": 60000},
                            "services": {"chat": {"instances": [instance("llama", bad), instance("llama", good)]}}}})
    bad.fail_status = 500
    chat = json_body({"model": "llama", "messages": []})
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        codes = [c.post("/v1/chat/completions", content=chat, headers=JSON).status_code for _ in range(10)]
    assert codes.count(500) == 2
    time.sleep(1.5)
    s = scrape(gw)
    events = lambda i, e: value(s, "jairouter_circuit_breaker_events_total", service="chat", instance=i, event=e)
    assert events("chat-0", "failure") == 2 and events("chat-0", "state_change") == 1
    assert events("chat-1", "success") == 8 and events("chat-1", "state_change") is None
    state = lambda name, i: value(s, name, service="chat", model="llama", instance=i)
    assert state("jairouter_circuit_breaker_state", "chat-0") == 1
    assert state("jairouter_circuit_breaker_state", "chat-1") == 0
    assert state("jairouter_backend_health", "chat-0") == 1
    assert value(s, "jairouter_backend_calls_total", service="chat", instance="chat-0", status="5xx") == 2


def test_rate_limit_events_count_each_decision(stubs, gateway):
    (a,) = stubs("a")
    gw = gateway({"model": {"rate-limit": {"enabled": True, "algorithm": "token-bucket", "capacity": 3,
                                           "rate": 1, "scope": "model"},
                            "services": {"chat": {"instances": [instance("llama", a)]}}}})
    chat = json_body({"model": "llama", "messages": []})
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        codes = [c.post("/v1/chat/completions", content=chat, headers=JSON).status_code for _ in range(6)]
    assert codes == [200] * 3 + [429] * 3
    time.sleep(1.5)
    s = scrape(gw)
    event = lambda result: value(s, "jairouter_rate_limit_events_total", service="chat",
                                 algorithm="token-bucket", scope="model", result=result)
    assert (event("allowed"), event("rejected")) == (3, 3)
    assert value(s, "jairouter_requests_total", service="chat", method="POST", status="4xx") == 3


def test_tokens_and_stream_timings_per_model(stubs, gateway):
    (a,) = stubs("a")
    gw = gateway({"model": {"services": {"chat": {"instances": [instance("llama", a)]}}}})
    stream = json_body({"model": "llama", "stream": True, "messages": []})
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for _ in range(2):
            r = c.post("/v1/chat/completions", content=stream,
                       headers={**JSON, "x-stub-usage": "10,5", "x-stub-chunks": "5", "x-stub-chunk-delay-ms": "20"})
            assert r.status_code == 200
        r = c.post("/v1/chat/completions", content=json_body({"model": "llama", "messages": []}),
                   headers={**JSON, "x-stub-usage": "7,3"})
        assert r.status_code == 200
    time.sleep(1.5)
    s = scrape(gw)
    tokens = lambda kind: value(s, "jairouter_tokens_total", service="chat", model="llama", kind=kind)
    assert (tokens("prompt"), tokens("completion")) == (27, 13)
    assert value(s, "jairouter_time_to_first_token_seconds_count", service="chat", model="llama") == 2
    assert value(s, "jairouter_time_per_output_token_seconds_count", service="chat", model="llama") == 2
    # Only streams are timed per token; the JSON answer is not.
    assert value(s, "jairouter_time_per_output_token_seconds_bucket", service="chat", model="llama", le="+Inf") == 2


def test_in_flight_requests_per_instance(stubs, gateway):
    from concurrent.futures import ThreadPoolExecutor
    (slow,) = stubs("slow")
    slow.delay = 2.5
    gw = gateway({"model": {"services": {"chat": {"instances": [instance("llama", slow)]}}}})
    chat = json_body({"model": "llama", "messages": []})

    def in_flight() -> float:
        s = scrape(gw)
        return sum(v for (name, labels), v in s.items()
                   if name == "jairouter_in_flight_requests" and ("instance", "chat-0") in labels)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(lambda: httpx.post(gw.url + "/v1/chat/completions", content=chat,
                                                  headers=JSON, timeout=10)) for _ in range(3)]
        time.sleep(1.4)  # a tick has reported them; they last 2.5 s
        during = in_flight()
        assert all(f.result().status_code == 200 for f in futures)
    time.sleep(1.2)
    assert (during, in_flight()) == (3, 0)


def test_dashboard_and_alerts_query_only_exported_series(stubs, gateway):
    """Every jairouter_* series the Grafana dashboard and the PrometheusRule alerts read is in a
    real Envoy's scrape after mixed traffic (failures, limits, streams)."""
    import json as jsonlib
    from pathlib import Path
    import yaml

    monitoring = Path(__file__).resolve().parents[1] / "k8s" / "monitoring"
    dashboard = jsonlib.loads((monitoring / "grafana-dashboard.json").read_text())
    rules = yaml.safe_load((monitoring / "prometheus-rule.yaml").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    wanted = {name for q in queries for name in re.findall(r"\b(jairouter_[a-z_]+)", q)}
    assert len(wanted) >= 15, wanted

    gw = mixed_gateway(stubs, gateway, capacity=6)
    stream = json_body({"model": "llama", "stream": True, "messages": []})
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for _ in range(10):
            c.post("/v1/chat/completions", content=stream, headers={**JSON, "x-stub-usage": "4,3"})
    time.sleep(1.5)
    exported = {name for name, _ in scrape(gw)}
    missing = sorted(name for name in wanted if name not in exported)
    assert not missing, missing


def test_access_log_explains_each_request(stubs, gateway):
    import json as jsonlib
    (a,) = stubs("a")
    gw = gateway({"model": {"rate-limit": {"enabled": True, "capacity": 2, "rate": 1, "scope": "model"},
                            "services": {"chat": {"instances": [instance("llama", a)]}}}})
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        ok = c.post("/v1/chat/completions", content=json_body({"model": "llama", "messages": []}),
                    headers={**JSON, "x-stub-usage": "11,4"})
        assert ok.status_code == 200
        assert c.post("/v1/chat/completions", content=json_body({"model": "nope"}), headers=JSON).status_code == 404
        codes = [c.post("/v1/chat/completions", content=json_body({"model": "llama"}), headers=JSON).status_code
                 for _ in range(3)]
        assert 429 in codes
    gw.stop()  # flushes the access log
    lines = [jsonlib.loads(line) for line in gw.access_log_path.read_text().splitlines()]
    assert len(lines) == 5
    mine = [jsonlib.loads(line["jairouter"]) for line in lines]
    first = mine[0]
    assert (first["service"], first["model"], first["instance"], first["status"]) == ("chat", "llama", "chat-0", 200)
    assert (first["prompt_tokens"], first["completion_tokens"]) == (11, 4)
    assert lines[0]["status"] == 200 and lines[0]["upstream"].startswith("127.0.0.1:")
    assert mine[1]["status"] == 404 and mine[1]["service"] == "chat" and mine[1]["instance"] is None
    limited = [m for m in mine if m["status"] == 429]
    assert limited and limited[0]["decision"].startswith("rate_limited: model.rate-limit")


def test_dashboard_and_alert_queries_run_on_a_real_prometheus(stubs, gateway, tmp_path):
    """Prometheus (Debian's) scrapes the gateway; promtool accepts the rules; every dashboard
    panel query and every alert expression evaluates, and the ones the traffic feeds return data."""
    import json as jsonlib
    import shutil
    import socket
    import subprocess
    from pathlib import Path
    import yaml

    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert prometheus and promtool, "./build.sh test installs Prometheus"
    monitoring = Path(__file__).resolve().parents[1] / "k8s" / "monitoring"
    rules = yaml.safe_load((monitoring / "prometheus-rule.yaml").read_text())
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules["spec"]))
    check = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    gw = mixed_gateway(stubs, gateway, capacity=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": [{"job_name": "jairouter", "metrics_path": "/stats/prometheus",
                            "static_configs": [{"targets": [gw.admin_url.removeprefix("http://")]}]}]}))
    server = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                               f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        stream = json_body({"model": "llama", "stream": True, "messages": []})
        deadline = time.monotonic() + 8
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            while time.monotonic() < deadline:  # traffic across several scrapes
                c.post("/v1/chat/completions", content=stream, headers={**JSON, "x-stub-usage": "4,3"})
                time.sleep(0.2)

        def query(expr: str) -> list:
            # A window as wide as the whole run: the rates have two scrapes to work with even if
            # Prometheus started late on a loaded machine.
            r = httpx.get(api + "/query", params={"query": expr.replace("$__rate_interval", "30s")}, timeout=10)
            body = r.json()
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        assert query('up{job="jairouter"}')[0]["value"][1] == "1"
        dashboard = jsonlib.loads((monitoring / "grafana-dashboard.json").read_text())
        empty = [p["title"] for p in dashboard["panels"]
                 if not any(query(t["expr"]) for t in p["targets"])]
        assert not empty, f"panels with no data: {empty}"
        alerts = {r["alert"]: r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]}
        firing_now = {name for name, expr in alerts.items() if query(expr)}
        # The breaker of the failing instance is open; cAdvisor series do not exist here.
        assert "JAiRouterCircuitBreakerOpen" in firing_now, firing_now
        assert "JAiRouterDown" not in firing_now
    finally:
        server.terminate()
        server.wait(timeout=10)
