"""Issue 9: the Helm chart of the standalone gateway.

The chart is rendered by a real Helm (k8s_tools), every object is validated against the
Kubernetes and CRD schemas, and the pod's own commands (the render init container, Envoy, the
config watcher, the preStop hook, the config-check Job) are taken from the rendered objects and
run natively with the built .wasm: the rendered bootstrap serves requests, probes tell draining,
and a ConfigMap update applies live.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from harness import ENVOY, RENDER, ROOT, WASM, free_port, json_body, wait_until_ready
from k8s_tools import helm_lint, helm_template, validate
from otlp_receiver import OtlpReceiver

CHART = ROOT / "k8s" / "helm" / "jairouter"
FULL = CHART / "ci" / "full-values.yaml"
TEAM_KEY = "sk-team-a-0123456789"  # ci/full-values.yaml holds only its salted hash


def kinds(docs: list[dict]) -> list[str]:
    return sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)


def test_default_values_render_and_validate():
    docs = helm_template(CHART)
    assert validate(docs) == []
    assert kinds(docs) == sorted([
        "ConfigMap/jairouter-config", "Deployment/jairouter", "HorizontalPodAutoscaler/jairouter",
        "PodDisruptionBudget/jairouter", "Service/jairouter", "ServiceAccount/jairouter",
        "ConfigMap/jairouter-config-check", "Job/jairouter-config-check",
    ])
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"] + pod["initContainers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The seed's numbers: three replicas at least, 70% CPU, 80% memory.
    [hpa] = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 10


def test_every_feature_renders_and_validates():
    docs = helm_template(CHART, [FULL])
    assert validate(docs) == []
    found = {d["kind"] for d in docs}
    assert found >= {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler", "VerticalPodAutoscaler",
                     "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "ConfigMap",
                     "Secret", "ServiceAccount", "Job"}, found
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    shipped = yaml.safe_load((ROOT / "k8s" / "monitoring" / "prometheus-rule.yaml").read_text())
    assert rule["spec"] == shipped["spec"], "the chart's alerts are the ones tested on Prometheus"
    [hpa] = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    rendered = yaml.safe_dump_all(docs)
    assert TEAM_KEY not in rendered


def test_lint_is_clean():
    for values in ([], [FULL]):
        problems = [m for m in helm_lint(CHART, values) if "[ERROR]" in m or "[WARNING]" in m]
        assert problems == [], problems


class Pod:
    """The rendered pod's containers, run natively: mount paths and ports mapped to a tmp dir
    and free ports, the image's paths to the build's."""

    def __init__(self, docs: list[dict], root: Path, env: dict[str, str]):
        self.root = root
        self.ports = {p: str(free_port()) for p in ("8080", "9090", "9901", "9902")}
        self.mounts = {"/etc/jairouter/config": root / "config", "/etc/jairouter/api-keys": root / "api-keys",
                       "/var/run/jairouter": root / "run", "/usr/local/lib/jairouter/jairouter.wasm": WASM}
        for d in docs:
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "jairouter-config":
                self.write_configmap(d["data"])
            if d["kind"] == "Secret" and d["metadata"]["name"] == "jairouter-api-keys":
                (root / "api-keys").mkdir(parents=True, exist_ok=True)
                (root / "api-keys" / "api-keys.yml").write_text(d["stringData"]["api-keys.yml"])
        (root / "run").mkdir(parents=True, exist_ok=True)
        [deployment] = [d for d in docs if d["kind"] == "Deployment"]
        spec = deployment["spec"]["template"]["spec"]
        self.containers = {c["name"]: c for c in spec["initContainers"] + spec["containers"]}
        self.env = env
        self.processes: list[subprocess.Popen] = []

    def write_configmap(self, data: dict[str, str]) -> None:
        """As the kubelet does: a new timestamped directory, then an atomic swap of ..data."""
        config = self.root / "config"
        config.mkdir(parents=True, exist_ok=True)
        version = config / f"..{time.monotonic_ns()}"
        version.mkdir()
        for name, text in data.items():
            (version / name).write_text(text)
            link = config / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        temp = config / "..data_tmp"
        temp.unlink(missing_ok=True)
        temp.symlink_to(version.name)
        temp.replace(config / "..data")

    def command(self, name: str) -> list[str]:
        c = self.containers[name]
        argv = c["command"] + c.get("args", [])
        tools = {"jairouter-render": str(RENDER), "envoy": str(ENVOY)}
        out = []
        for arg in argv:
            arg = tools.get(arg, arg)
            for inside, outside in self.mounts.items():
                arg = arg.replace(inside, str(outside))
            out.append(self.ports.get(arg, arg))
        if name == "envoy":
            out.append("--use-dynamic-base-id")
        return out

    def run(self, name: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name), env=self.env, capture_output=True, text=True, timeout=60)

    def start(self, name: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.processes.append(subprocess.Popen(self.command(name), env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def url(self, port: str) -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    def stop(self) -> None:
        for p in self.processes:
            p.terminate()
            p.wait(timeout=10)


def chat(url: str, key: str | None) -> httpx.Response:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    body = json_body({"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}]})
    return httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=10)


def test_the_rendered_pod_serves_drains_and_reloads(stubs, tmp_path):
    ollama, hosted, other = stubs("ollama", "hosted", "other")
    full = yaml.safe_load(FULL.read_text())
    application = full["config"]["application.yml"]
    application = application.replace("http://ollama:11434", ollama.url)
    application = application.replace("https://api.openai.example.com", hosted.url)
    values = tmp_path / "values.yaml"
    # The chart's tracing values, to a collector on loopback.
    receiver = OtlpReceiver().start()
    values.write_text(yaml.safe_dump({"config": {"application.yml": application},
                                      "tracing": {"endpoint": f"http://{receiver.grpc_address}"}}))
    docs = helm_template(CHART, [FULL, values])
    # Edits below start from the ConfigMap the chart rendered (with its tracing section).
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "jairouter-config"]
    application = configmap["data"]["application.yml"]
    [secret] = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "jairouter-credentials"]
    env = {**os.environ, **secret["stringData"]}
    pod = Pod(docs, tmp_path / "pod", env)

    # The config-check hook's command accepts it; a broken edit is refused naming the key.
    [job] = [d for d in docs if d["kind"] == "Job"]
    check = job["spec"]["template"]["spec"]["containers"][0]
    pod.containers["check"] = check
    assert pod.run("check").returncode == 0
    pod.write_configmap({"application.yml": application.replace("weight: 2", "weight: -2")})
    refused = pod.run("check")
    assert refused.returncode == 1 and "model.services.chat.instances[0].weight" in refused.stderr
    pod.write_configmap({"application.yml": application})

    result = pod.run("render")
    assert result.returncode == 0, result.stderr
    bootstrap = tmp_path / "pod" / "run" / "envoy.json"
    validated = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(bootstrap), "--use-dynamic-base-id"],
                               capture_output=True, text=True, timeout=60)
    assert validated.returncode == 0, validated.stderr[-2000:]
    pod.start("envoy")
    pod.start("config-watcher")
    try:
        wait_until_ready(f"{pod.url('9090')}/ready",
                         explain=lambda: (tmp_path / "pod" / "envoy.log").read_text()[-3000:])
        assert chat(pod.url("8080"), None).status_code == 401
        r = chat(pod.url("8080"), TEAM_KEY)
        assert r.status_code == 200 and r.headers["x-stub-instance"] == "ollama", r.text
        assert "authorization" not in ollama.requests[-1].headers
        # The backend credential from the Secret reaches the hosted backend.
        body = json_body({"model": "gpt-4o-mini", "messages": []})
        r = httpx.post(f"{pod.url('8080')}/v1/chat/completions", content=body, timeout=10,
                       headers={"content-type": "application/json", "authorization": f"Bearer {TEAM_KEY}"})
        assert r.status_code == 200 and hosted.requests[-1].headers["authorization"] == "Bearer sk-backend-example"
        assert "envoy_server_live" in httpx.get(f"{pod.url('9090')}/stats/prometheus", timeout=5).text
        # The pod's requests are spans at the collector (sampled at the values' 20%: some of many).
        for _ in range(20):
            assert chat(pod.url("8080"), TEAM_KEY).status_code == 200
        spans = receiver.wait_for(lambda s: s.attributes.get("jairouter.service") == "chat", timeout=10)
        assert spans and spans[0].resource["service.name"] == "jairouter", receiver.spans
        # A ConfigMap edit (the kubelet's symlink swap) applies live: the model moves to `other`.
        pod.write_configmap({"application.yml": application.replace(ollama.url, other.url)})
        deadline = time.monotonic() + 10
        while chat(pod.url("8080"), TEAM_KEY).headers.get("x-stub-instance") != "other":
            assert time.monotonic() < deadline, (tmp_path / "pod" / "config-watcher.log").read_text()
            time.sleep(0.2)
        # preStop: readiness fails first, then the listeners drain; requests still succeed meanwhile.
        prestop = pod.containers["envoy"]["lifecycle"]["preStop"]["exec"]["command"][-1]
        prestop = prestop.replace("sleep 15", "sleep 0").replace("9901", pod.ports["9901"])
        subprocess.run(["/bin/sh", "-c", prestop], check=True, timeout=30)
        assert httpx.get(f"{pod.url('9090')}/ready", timeout=5).status_code == 503
        assert chat(pod.url("8080"), TEAM_KEY).status_code == 200
    finally:
        pod.stop()
        receiver.stop()
