"""The filter's metrics through a real Envoy's Prometheus endpoint (issue 7, first part)."""

from __future__ import annotations

import re
import time

import httpx

from harness import ROOT, instance, json_body

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
    assert value(s, "jairouter_requests_total", service="chat", method="POST", model="llama", status="2xx") == 6
    assert value(s, "jairouter_requests_total", service="chat", method="STREAM", model="llama", status="2xx") == 1
    # The 404s were for the chat endpoint: they count under its service too, and under no model.
    assert value(s, "jairouter_requests_total", service="chat", method="POST", model="unknown", status="4xx") == 2
    duration = lambda suffix, model, **le: value(s, f"jairouter_request_duration_seconds_{suffix}",
                                                  service="chat", method="POST", model=model, **le)
    assert (duration("count", "llama"), duration("count", "unknown")) == (6, 2)
    assert duration("bucket", "llama", le="+Inf") == 6 and duration("bucket", "unknown", le="+Inf") == 2
    assert duration("bucket", "llama", le="10") == 6
    unknown = len(json_body({"model": "nope"}))
    assert value(s, "jairouter_request_size_bytes_sum", service="chat") == 6 * len(chat) + len(stream) + 2 * unknown
    assert value(s, "jairouter_request_size_bytes_count", service="chat") == 9
    assert value(s, "jairouter_response_size_bytes_count", service="chat") == 9
    assert value(s, "jairouter_response_size_bytes_sum", service="chat") > 9 * 50
    calls = {i: value(s, "jairouter_backend_calls_total", service="chat", instance=i, status="2xx") for i in ("chat-0", "chat-1")}
    # One connection, one worker: its rotation alternates from wherever it stood, 4 and 3.
    assert sorted(calls.values()) == [3, 4], calls
    first = max(calls, key=calls.get)
    assert value(s, "jairouter_backend_call_duration_seconds_count", service="chat", instance=first) == 4
    picks = {i: value(s, "jairouter_loadbalancer_selections_total", service="chat", strategy="round_robin", instance=i)
             for i in ("chat-0", "chat-1")}
    assert picks == calls, picks


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
    # Refused for their model: counted under it.
    assert value(s, "jairouter_requests_total", service="chat", method="POST", model="llama", status="4xx") == 3


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


def test_per_model_and_genai_series_after_a_mixed_load(stubs, gateway):
    """Two chat models (one behind Anthropic's API), an embedding model, 5xx from a backend, an
    unknown model, streams: the per-model request series and the GenAI conventions' series count
    each exactly, with the stubs' reported usage and each endpoint's operation and instance's
    provider."""
    from vendor_stubs import AnthropicStub

    (vllm,) = stubs("vllm")
    (claude,) = stubs("claude", kind=AnthropicStub, api_key="sk-ant-backend")
    gw = gateway({"model": {"retries": 0, "circuit-breaker": {"enabled": False}, "services": {
        "chat": {"instances": [
            instance("llama", vllm),
            instance("claude-sonnet", claude, adapter="claude", headers={"x-api-key": "sk-ant-backend"})]},
        "embedding": {"instances": [instance("embed", vllm)]}}}})
    chat = lambda model, **extra: json_body({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for _ in range(4):
            r = c.post("/v1/chat/completions", content=chat("llama"), headers={**JSON, "x-stub-usage": "7,3"})
            assert r.status_code == 200
        for _ in range(2):
            r = c.post("/v1/chat/completions", content=chat("llama"), headers={**JSON, "x-stub-status": "503"})
            assert r.status_code == 503
        for _ in range(3):
            r = c.post("/v1/chat/completions", content=chat("claude-sonnet", stream=True),
                       headers={**JSON, "x-stub-usage": "10,5", "x-stub-chunks": "3", "x-stub-chunk-delay-ms": "20"})
            assert r.status_code == 200 and "[DONE]" in r.text
        r = c.post("/v1/messages", content=chat("claude-sonnet", max_tokens=16),
                   headers={**JSON, "anthropic-version": "2023-06-01", "x-stub-usage": "6,2"})
        assert r.status_code == 200 and r.json()["type"] == "message"
        for _ in range(2):
            assert c.post("/v1/chat/completions", content=chat("nope"), headers=JSON).status_code == 404
        r = c.post("/v1/embeddings", content=json_body({"model": "embed", "input": ["a", "b"]}), headers=JSON)
        assert r.status_code == 200
    time.sleep(1.5)
    s = scrape(gw)

    requests = lambda service, method, model, status: value(
        s, "jairouter_requests_total", service=service, method=method, model=model, status=status)
    assert requests("chat", "POST", "llama", "2xx") == 4
    assert requests("chat", "POST", "llama", "5xx") == 2
    assert requests("chat", "STREAM", "claude-sonnet", "2xx") == 3
    assert requests("chat", "POST", "claude-sonnet", "2xx") == 1
    assert requests("chat", "POST", "unknown", "4xx") == 2
    assert requests("embedding", "POST", "embed", "2xx") == 1
    counted = sum(v for (name, _), v in s.items() if name == "jairouter_requests_total")
    assert counted == 13, counted
    duration = lambda method, model: value(s, "jairouter_request_duration_seconds_count",
                                           service="chat", method=method, model=model)
    assert [duration("POST", "llama"), duration("STREAM", "claude-sonnet"), duration("POST", "unknown")] == [6, 3, 2]
    assert value(s, "jairouter_request_duration_seconds_bucket", service="chat", method="POST",
                 model="llama", le="+Inf") == 6

    # The GenAI series: Envoy exports gen_ai.server.request.duration as gen_ai_server_request_duration_*
    # and the attributes as gen_ai_* labels; only requests that reached an instance are operations.
    llama = {"gen_ai_request_model": "llama", "gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai"}
    sonnet = {"gen_ai_request_model": "claude-sonnet", "gen_ai_operation_name": "chat",
              "gen_ai_provider_name": "anthropic"}
    embed = {"gen_ai_request_model": "embed", "gen_ai_operation_name": "embeddings", "gen_ai_provider_name": "openai"}
    genai = lambda name, **labels: value(s, name, **labels)
    assert genai("gen_ai_server_request_duration_count", **llama) == 4
    assert genai("gen_ai_server_request_duration_count", **llama, error_type="503") == 2
    assert genai("gen_ai_server_request_duration_bucket", **llama, error_type="503", le="+Inf") == 2
    assert genai("gen_ai_server_request_duration_count", **sonnet) == 4
    assert genai("gen_ai_server_request_duration_count", **embed) == 1
    assert genai("gen_ai_server_request_duration_sum", **embed) is not None
    operations = sum(v for (name, _), v in s.items() if name == "gen_ai_server_request_duration_count")
    assert operations == 11, "the unknown model's 404s are no GenAI operation"

    usage = lambda suffix, labels, token_type: genai(f"gen_ai_client_token_usage_{suffix}", **labels,
                                                     gen_ai_token_type=token_type)
    assert (usage("sum", llama, "input"), usage("sum", llama, "output")) == (4 * 7, 4 * 3)
    assert (usage("count", llama, "input"), usage("count", llama, "output")) == (4, 4)
    assert (usage("sum", sonnet, "input"), usage("sum", sonnet, "output")) == (3 * 10 + 6, 3 * 5 + 2)
    assert usage("count", sonnet, "output") == 4
    assert genai("gen_ai_client_token_usage_bucket", **sonnet, gen_ai_token_type="input", le="16") == 4
    assert genai("gen_ai_client_token_usage_bucket", **sonnet, gen_ai_token_type="output", le="1") == 0
    # The embeddings answer reports its input only.
    assert (usage("sum", embed, "input"), usage("count", embed, "output")) == (2, None)

    for name in ("gen_ai_server_time_to_first_token", "gen_ai_server_time_per_output_token"):
        assert genai(f"{name}_count", **sonnet) == 3, name
        assert genai(f"{name}_bucket", **sonnet, le="+Inf") == 3, name
        assert not [k for k in s if k[0] == f"{name}_count" and ("gen_ai_request_model", "llama") in k[1]]
    assert value(s, "jairouter_time_to_first_token_seconds_count", service="chat", model="claude-sonnet") == 3
    # No series of the GenAI families carries the original's `model` label.
    stray = [k for k in s if k[0].startswith("gen_ai_") and any(label == "model" for label, _ in k[1])]
    assert not stray, stray


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
    """Every jairouter_* and gen_ai_* series the Grafana dashboard and the PrometheusRule alerts
    read is in a real Envoy's scrape after mixed traffic (failures, limits, streams)."""
    import json as jsonlib
    import yaml

    monitoring = ROOT / "k8s" / "monitoring"
    dashboard = jsonlib.loads((monitoring / "grafana-dashboard.json").read_text())
    rules = yaml.safe_load((monitoring / "prometheus-rule.yaml").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    # Label names (`by (...)`, matchers) are not series: gen_ai_request_model is a label.
    labels = {label for q in queries for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", q)
              for label in re.findall(r"\w+", group)}
    labels |= {label for q in queries for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", q)}
    wanted = {name for q in queries for name in re.findall(r"\b((?:jairouter|gen_ai)_[a-z_]+)", q)} - labels
    assert len(wanted) >= 19, wanted
    assert {"gen_ai_client_token_usage_bucket", "gen_ai_server_request_duration_bucket"} <= wanted, wanted

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
    import yaml

    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert prometheus and promtool, "./build.sh test installs Prometheus"
    monitoring = ROOT / "k8s" / "monitoring"
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


def test_the_per_model_error_alert_fires_for_the_failing_model_only(tmp_path):
    """promtool's rule unit test: of four chat models over 20 minutes, the one with 20% 5xx fires
    JAiRouterModelHighErrorRate; one at 3%, one failing half of too few requests to tell, and the
    `unknown` label (requests for no configured model) do not."""
    import shutil
    import subprocess
    import yaml

    promtool = shutil.which("promtool")
    assert promtool, "./build.sh test installs Prometheus"
    monitoring = ROOT / "k8s" / "monitoring"
    rules = yaml.safe_load((monitoring / "prometheus-rule.yaml").read_text())
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules["spec"]))
    series = lambda model, status, per_minute: {
        "series": f'jairouter_requests_total{{service="chat",method="POST",model="{model}",status="{status}"}}',
        "values": f"0+{per_minute}x20"}
    alert = {"alertname": "JAiRouterModelHighErrorRate"}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                series("llama", "2xx", 24), series("llama", "5xx", 6),      # 20%
                series("qwen", "2xx", 29), series("qwen", "5xx", 1),        # 3%
                series("tiny", "2xx", 1), series("tiny", "5xx", 1),         # 50% of 2 a minute
                series("unknown", "4xx", 30), series("unknown", "5xx", 30),
            ],
            "alert_rule_test": [
                {**alert, "eval_time": "3m", "exp_alerts": []},  # not for 5 minutes yet
                {**alert, "eval_time": "15m", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "service": "chat", "model": "llama"},
                    "exp_annotations": {"summary": "More than 10% of requests for model llama (chat) fail with 5xx"},
                }]},
            ],
        }],
    }))
    result = subprocess.run([promtool, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
