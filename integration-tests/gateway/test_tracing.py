"""Issue 19: traces through Envoy's own OpenTelemetry tracer, configured by `jairouter.tracing`.

A real Envoy exports over OTLP (gRPC and HTTP/protobuf) to a receiver built on the official
OTLP protobuf definitions (otlp_receiver.py). Each test checks what the receiver got: a span per
request, carrying what the filter knows (service, model, instance, tokens) beside Envoy's own
status; the client's W3C trace context continued to the backend; sampling; and that tracing off
renders no tracer and changes nothing on a request.

The only change to the rendered bootstrap is the tracer's flush interval (Envoy's runtime key,
5 s by default), so a test does not wait for it.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from harness import Gateway, instance, json_body, render
from otlp_receiver import OtlpReceiver

JSON = {"content-type": "application/json"}
FLUSH_MS = 200


@pytest.fixture
def receiver():
    with OtlpReceiver() as r:
        yield r


def tracing(endpoint: str, **extra) -> dict:
    section = {"enabled": True, "service-name": "gateway-test", "exporter": {"type": "otlp", "otlp": {"endpoint": endpoint}}}
    for key, value in extra.items():
        if key == "otlp":
            section["exporter"]["otlp"].update(value)
        else:
            section[key] = value
    return section


def config(stub, tracing_section: dict | None) -> dict:
    out = {"model": {"services": {"chat": {"instances": [instance("llama", stub, **{"instance-id": "llama-a"})]}}}}
    if tracing_section is not None:
        out["jairouter"] = {"tracing": tracing_section}
    return out


@pytest.fixture
def traced(tmp_path):
    """traced(config) starts a gateway whose tracer flushes every FLUSH_MS."""
    running: list[Gateway] = []

    def start(cfg: dict | str, **options) -> Gateway:
        gw = Gateway(tmp_path / f"gw{len(running)}", cfg, **options)
        bootstrap = gw.render_bootstrap()
        rendered = json.loads(bootstrap.read_text())
        rendered["layered_runtime"] = {"layers": [{"name": "test", "static_layer": {
            "tracing.opentelemetry.flush_interval_ms": FLUSH_MS}}]}
        bootstrap.write_text(json.dumps(rendered))
        gw.start(bootstrap)
        running.append(gw)
        return gw

    yield start
    for gw in running:
        gw.stop()


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return trace_id, span_id, f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def hcm(bootstrap: dict) -> dict:
    [listener] = [l for l in bootstrap["static_resources"]["listeners"] if l["name"] == "jairouter"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def backend_trace(stub, index: int = -1) -> tuple[str, str, str]:
    """(trace id, parent span id, flags) of the traceparent a backend request carried."""
    version, trace_id, parent, flags = stub.requests[index].headers["traceparent"].split("-")
    assert version == "00"
    return trace_id, parent, flags


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_chat_request_and_a_stream_are_spans_with_the_gateways_attributes(stubs, traced, receiver, protocol):
    (a,) = stubs("a")
    endpoint = f"http://{receiver.grpc_address if protocol == 'grpc' else receiver.http_address}"
    gw = traced(config(a, tracing(endpoint, otlp={"protocol": protocol}, **{"service-version": "1.2.3"})))
    chat_trace, chat_parent, chat_header = traceparent()
    stream_trace, _, stream_header = traceparent()
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        r = c.post("/v1/chat/completions", content=json_body({"model": "llama", "messages": []}),
                   headers={**JSON, "x-stub-usage": "11,4", "traceparent": chat_header})
        assert r.status_code == 200
        r = c.post("/v1/chat/completions", headers={**JSON, "x-stub-usage": "7,5", "traceparent": stream_header},
                   content=json_body({"model": "llama", "stream": True, "messages": [],
                                      "stream_options": {"include_usage": True}}))
        assert r.status_code == 200 and "[DONE]" in r.text
    spans = receiver.wait_for(lambda s: s.trace_id in (chat_trace, stream_trace), count=2)
    assert len(spans) == 2, receiver.spans
    chat, stream = sorted(spans, key=lambda s: s.trace_id != chat_trace)
    for span, (prompt, completion) in ((chat, ("11", "4")), (stream, ("7", "5"))):
        assert span.transport == protocol.split("/")[0]
        assert span.kind == 2  # SERVER
        assert span.name == "POST /v1/chat/completions"
        assert span.resource["service.name"] == "gateway-test"
        assert span.resource["service.version"] == "1.2.3"
        a_ = span.attributes
        assert (a_["jairouter.service"], a_["gen_ai.request.model"], a_["jairouter.instance"]) == ("chat", "llama", "llama-a")
        assert a_["http.status_code"] == "200"
        assert (a_["gen_ai.usage.input_tokens"], a_["gen_ai.usage.output_tokens"]) == (prompt, completion)
        assert "gen_ai.response.model" not in a_  # no fallback served
        summary = json.loads(a_["jairouter.summary"])
        assert (summary["model"], summary["prompt_tokens"]) == ("llama", int(prompt))
    # The client's trace continues: the span is the child of the client's span, and the backend
    # was called as the child of the gateway's span, in the same trace, sampled.
    assert chat.parent_span_id == chat_parent
    assert backend_trace(a, 0) == (chat_trace, chat.span_id, "01")
    assert backend_trace(a, 1) == (stream_trace, stream.span_id, "01")


def test_a_request_without_a_trace_context_starts_one_the_backend_continues(stubs, traced, receiver):
    (a,) = stubs("a")
    gw = traced(config(a, tracing(f"http://{receiver.grpc_address}")))
    r = httpx.post(gw.url + "/v1/chat/completions", content=json_body({"model": "llama", "messages": []}),
                   headers=JSON, timeout=10)
    assert r.status_code == 200
    trace_id, parent, flags = backend_trace(a)
    [span] = receiver.wait_for(lambda s: s.trace_id == trace_id)
    assert (span.span_id, span.parent_span_id, flags) == (parent, "", "01")


def test_a_refused_request_is_a_span_with_what_was_known(stubs, traced, receiver):
    (a,) = stubs("a")
    gw = traced(config(a, tracing(f"http://{receiver.grpc_address}")))
    trace_id, _, header = traceparent()
    r = httpx.post(gw.url + "/v1/chat/completions", content=json_body({"model": "nope", "messages": []}),
                   headers={**JSON, "traceparent": header}, timeout=10)
    assert r.status_code == 404
    [span] = receiver.wait_for(lambda s: s.trace_id == trace_id)
    assert span.attributes["http.status_code"] == "404"
    assert span.attributes["jairouter.service"] == "chat"
    assert "jairouter.instance" not in span.attributes and "gen_ai.usage.input_tokens" not in span.attributes
    assert json.loads(span.attributes["jairouter.summary"])["status"] == 404
    assert a.requests == []


def test_a_fallback_names_the_model_asked_for_and_the_one_that_answered(stubs, traced, receiver):
    a, gone = stubs("a", "gone")
    cfg = {"model": {"fallback": {"models": {"old": ["llama"]}}, "services": {"chat": {"instances": [
        instance("llama", a), instance("old", gone, status="down")]}}},
        "jairouter": {"tracing": tracing(f"http://{receiver.grpc_address}")}}
    gw = traced(cfg)
    trace_id, _, header = traceparent()
    r = httpx.post(gw.url + "/v1/chat/completions", content=json_body({"model": "old", "messages": []}),
                   headers={**JSON, "traceparent": header}, timeout=10)
    assert r.status_code == 200
    [span] = receiver.wait_for(lambda s: s.trace_id == trace_id)
    assert (span.attributes["gen_ai.request.model"], span.attributes["gen_ai.response.model"]) == ("old", "llama")


def test_sampling_zero_exports_nothing_and_a_client_that_declined_is_not_traced(stubs, traced, receiver):
    (a,) = stubs("a")
    none = traced(config(a, tracing(f"http://{receiver.grpc_address}", sampling={"ratio": 0})))
    every = traced(config(a, tracing(f"http://{receiver.grpc_address}", sampling={"ratio": 1.0})))
    body = json_body({"model": "llama", "messages": []})
    declined = []
    for _ in range(5):
        _, _, sampled = traceparent()
        assert httpx.post(none.url + "/v1/chat/completions", content=body, headers={**JSON, "traceparent": sampled},
                          timeout=10).status_code == 200
        assert httpx.post(none.url + "/v1/chat/completions", content=body, headers=JSON, timeout=10).status_code == 200
        trace_id, _, no = traceparent(sampled=False)
        declined.append(trace_id)
        assert httpx.post(every.url + "/v1/chat/completions", content=body, headers={**JSON, "traceparent": no},
                          timeout=10).status_code == 200
    # The context still reaches the backend, marked not sampled.
    assert {backend_trace(a, i)[2] for i in range(len(a.requests))} == {"00"}
    assert {backend_trace(a, i)[0] for i in range(2, len(a.requests), 3)} == set(declined)
    # A sampled request afterwards is exported: the receiver was listening all along.
    trace_id, _, sampled = traceparent()
    assert httpx.post(every.url + "/v1/chat/completions", content=body, headers={**JSON, "traceparent": sampled},
                      timeout=10).status_code == 200
    assert receiver.wait_for(lambda s: s.trace_id == trace_id)
    time.sleep(3 * FLUSH_MS / 1000)
    assert [s.trace_id for s in receiver.spans] == [trace_id]


def test_tracing_off_renders_no_tracer_and_adds_nothing_to_a_request(stubs, gateway, receiver):
    (a,) = stubs("a")
    # The original's shipped section, turned off: its logging exporter and per-path sampling
    # are not refused, and nothing of it reaches the bootstrap.
    off = {"enabled": False, "service-name": "jairouter", "exporter": {"type": "logging"},
           "sampling": {"ratio": 0.1, "always-sample": ["/api/v1"], "never-sample": ["/health"]}}
    for section in (None, off):
        gw = gateway(config(a, section), live=False)
        bootstrap = json.loads((gw.workdir / "envoy.json").read_text())
        assert "tracing" not in hcm(bootstrap)
        assert "opentelemetry" not in json.dumps(bootstrap)
        assert all(c["name"] != "jairouter-otel-collector" for c in bootstrap["static_resources"]["clusters"])
        a.clear()
        r = httpx.post(gw.url + "/v1/chat/completions", content=json_body({"model": "llama", "messages": []}),
                       headers=JSON, timeout=10)
        assert r.status_code == 200
        [received] = a.requests
        assert "traceparent" not in received.headers and "tracestate" not in received.headers
        gw.stop()
    time.sleep(3 * FLUSH_MS / 1000)
    assert receiver.exports == 0


def test_the_tracing_keys_are_refused_with_their_path(tmp_path):
    cases = {
        "exporter.type: zipkin": ({"enabled": True, "exporter": {"type": "zipkin"}},
                                  "jairouter.tracing.exporter.type"),
        "no endpoint": ({"enabled": True}, "jairouter.tracing.exporter.otlp.endpoint: is required"),
        "a path over gRPC": ({"enabled": True, "exporter": {"otlp": {"endpoint": "http://c:4318/v1/traces"}}},
                             "jairouter.tracing.exporter.otlp.endpoint: OTLP/gRPC takes no path"),
        "ratio above 1": ({"enabled": True, "sampling": {"ratio": 10}}, "jairouter.tracing.sampling.ratio"),
        "per-path sampling": ({"enabled": True, "sampling": {"always-sample": ["/v1"]}},
                              "jairouter.tracing.sampling.always-sample"),
    }
    for name, (section, expected) in cases.items():
        path = tmp_path / "application.yml"
        path.write_text(json.dumps({"model": {"services": {}}, "jairouter": {"tracing": section}}))
        result = render(path, "check")
        assert result.returncode == 1, name
        assert expected in result.stderr, (name, result.stderr)


def test_the_charts_tracing_values_become_the_section_and_never_a_second_one(stubs, traced, receiver):
    from k8s_tools import HelmError, helm_template
    from harness import ROOT

    chart = ROOT / "k8s" / "helm" / "jairouter"
    (a,) = stubs("a")
    application = f'model:\n  services:\n    chat:\n      instances:\n        - {{name: llama, base-url: "{a.url}"}}\n'
    values = {"config": {"application.yml": application},
              "tracing": {"enabled": True, "endpoint": f"http://{receiver.http_address}",
                          "protocol": "http/protobuf", "serviceName": "chart", "samplingRatio": 1.0}}
    docs = helm_template(chart, values=values)
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "jairouter-config"]
    gw = traced(configmap["data"]["application.yml"])
    trace_id, _, header = traceparent()
    r = httpx.post(gw.url + "/v1/chat/completions", content=json_body({"model": "llama", "messages": []}),
                   headers={**JSON, "traceparent": header}, timeout=10)
    assert r.status_code == 200
    [span] = receiver.wait_for(lambda s: s.trace_id == trace_id)
    assert (span.transport, span.resource["service.name"]) == ("http", "chart")
    # A section in config.application.yml as well would be two answers: the release fails.
    values["config"]["application.yml"] = application + "jairouter:\n  tracing: {enabled: true}\n"
    with pytest.raises(HelmError, match="has a jairouter.tracing section of its own"):
        helm_template(chart, values=values)
    values["config"]["application.yml"] = application
    del values["tracing"]["endpoint"]
    with pytest.raises(HelmError, match="tracing.endpoint"):
        helm_template(chart, values=values)
