"""Configuration: JAiRouter files load as they are; bad ones are refused naming the key (issue 2)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import httpx
import yaml

from harness import ENVOY, FIXTURES, RENDER, ROOT, WASM, Gateway, free_port, json_body, render, wait_until_ready



def test_seed_configmap_loads_unchanged(stubs, gateway, tmp_path):
    [stub] = stubs("ollama")
    text = (FIXTURES / "seed-configmap-application.yml").read_text()
    text = text.replace("http://ollama-service:11434", stub.url)
    gw = gateway(text)
    r = httpx.post(gw.url + "/v1/chat/completions",
                   content=json_body({"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}]}),
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["x-stub-instance"] == "ollama"
    assert stub.requests[-1].path == "/v1/chat/completions"


def test_renderer_uses_server_port_and_validates_with_envoy(tmp_path):
    config = tmp_path / "application.yml"
    config.write_text((FIXTURES / "seed-configmap-application.yml").read_text())
    out = tmp_path / "envoy.json"
    from harness import WASM
    result = render(config, "bootstrap", "--wasm", str(WASM), "--out", str(out))
    assert result.returncode == 0, result.stderr
    bootstrap = json.loads(out.read_text())
    listener = bootstrap["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 8080
    [cluster] = bootstrap["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"  # DNS names work
    check = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(out), "--use-dynamic-base-id"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_bad_configuration_is_refused_naming_the_key(tmp_path):
    config = tmp_path / "application.yml"
    config.write_text("model:\n  services:\n    chat:\n      instances:\n"
                      "        - name: m\n          base-url: http://h:1\n          weigth: 3\n")
    result = render(config, "check")
    assert result.returncode == 1
    assert "model.services.chat.instances[0].weigth: unknown key" in result.stderr
    config.write_text("model:\n  services:\n    chat:\n      instances:\n"
                      "        - name: m\n          base-url: h:1\n")
    result = render(config, "check")
    assert result.returncode == 1
    assert "model.services.chat.instances[0].base-url: must start with http://" in result.stderr
    config.write_text((FIXTURES / "seed-configmap-application.yml").read_text())
    result = render(config, "check")
    assert result.returncode == 0, result.stderr
    assert "valid (1 models, 1 instances)" in result.stdout


def test_envoy_refuses_a_filter_configuration_the_filter_rejects(tmp_path, stubs):
    """The filter's own check runs in Envoy too: a bootstrap carrying a bad plugin config won't start."""
    [stub] = stubs("a")
    gw = Gateway(tmp_path, {"model": {"services": {"chat": {"instances": [{"name": "m", "base-url": stub.url}]}}}}, live=False)
    bootstrap = gw.render_bootstrap()
    doc = json.loads(bootstrap.read_text())
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    wasm["configuration"]["value"] = json.dumps({"services": {"chat": {"instances": [{"name": "m", "base-url": stub.url, "weight": -1}]}}})
    bootstrap.write_text(json.dumps(doc))
    try:
        gw.start(bootstrap)
        raise AssertionError("Envoy started with a configuration the filter refuses")
    except RuntimeError as e:
        assert "model.services.chat.instances[0].weight: must be a whole number" in str(e)
    finally:
        gw.stop()


def test_build_sh_up_serves_the_demo_and_stops_everything(tmp_path):
    port, admin, status = free_port(), free_port(), free_port()
    env = dict(os.environ, PORT=str(port), ADMIN_PORT=str(admin), STATUS_PORT=str(status), CONCURRENCY="1")
    proc = subprocess.Popen([str(ROOT / "build.sh"), "up"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if "Ctrl-C stops" in line:
                break
        assert any(f"http://127.0.0.1:{port}" in line for line in output), "".join(output)
        assert any("curl" in line for line in output)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       content=json_body({"model": "demo-llama", "messages": [{"role": "user", "content": "hi"}]}),
                       headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["x-stub-instance"] in ("demo-a", "demo-b")
        page = httpx.get(f"http://127.0.0.1:{status}/status", timeout=5).json()
        assert [s["service"] for s in page["services"]] == ["chat", "embedding"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)
    # Nothing it started is left behind: the ports are free again.
    for p in (port, admin, status):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0, f"port {p} still served"


def test_global_rate_limit_manifests_render_with_the_shipped_rules():
    """k8s/ratelimit renders offline: jairouter-ratelimit and its Redis, wired to each other, and
    no rules file (the gateway sends each limit with the request)."""
    import shutil

    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (client) is needed to render the kustomization"
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "ratelimit")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs) == [
        "Deployment/jairouter-ratelimit", "Deployment/jairouter-ratelimit-redis",
        "Service/jairouter-ratelimit", "Service/jairouter-ratelimit-redis"]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    [service] = by_name["Deployment", "jairouter-ratelimit"]["spec"]["template"]["spec"]["containers"]
    assert service["image"].startswith("ghcr.io/jairouter/jairouter-ratelimit:")
    args = service["args"]
    assert args[args.index("--grpc-listen") + 1] == "0.0.0.0:8081"
    assert {"name": "JAIROUTER_RATELIMIT_REDIS_URL", "value": "redis://jairouter-ratelimit-redis:6379/0"} in service["env"]
    assert service["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "volumeMounts" not in service  # no rules to mount
    # The address the gateway is pointed at (kustomization.yaml's comment) is the Service's gRPC port.
    ports = {p["name"]: p["port"] for p in by_name["Service", "jairouter-ratelimit"]["spec"]["ports"]}
    assert ports == {"grpc": 8081, "http-metrics": 8080}
    assert 'address: "jairouter-ratelimit:8081"' in (ROOT / "k8s" / "ratelimit" / "kustomization.yaml").read_text()
    [redis] = by_name["Deployment", "jairouter-ratelimit-redis"]["spec"]["template"]["spec"]["containers"]
    assert redis["args"] == ["--save", "", "--appendonly", "no"]
    assert by_name["Service", "jairouter-ratelimit-redis"]["spec"]["ports"][0]["port"] == 6379


def test_probes_and_metrics_port_for_kubernetes(tmp_path, stubs):
    """--metrics-port: /ready for probes (503 once draining), /stats/prometheus for scrapes,
    nothing else of the admin (which could stop the process)."""
    [a] = stubs("a")
    port = free_port()
    gw = Gateway(tmp_path, {"model": {"services": {"chat": {"instances": [{"name": "m", "base-url": a.url}]}}}},
                 render_flags=("--metrics-port", str(port), "--admin-port", str(free_port())))
    with gw:
        metrics = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{metrics}/ready", timeout=5).status_code == 200
        assert "envoy_server_live" in httpx.get(f"{metrics}/stats/prometheus", timeout=5).text
        assert httpx.post(f"{metrics}/quitquitquit", timeout=5).status_code == 404
        assert httpx.get(f"{metrics}/config_dump", timeout=5).status_code == 404
        # The pod's preStop: the gateway leaves the Service's endpoints before it stops.
        assert httpx.post(f"{gw.admin_url}/healthcheck/fail", timeout=5).status_code == 200
        assert httpx.get(f"{metrics}/ready", timeout=5).status_code == 503
        assert gw.process.poll() is None


def test_the_images_entry_point_serves_the_demo(tmp_path, stubs):
    """envoy/docker/jairouter-gateway.sh, what `docker run` and docker-compose start, run natively
    (no Docker engine here) with the compose file's environment pointing at stubs."""
    a, b, e = stubs("demo-a", "demo-b", "demo-embed")
    port, metrics, admin, status = free_port(), free_port(), free_port(), free_port()
    env = dict(os.environ,
               PATH=f"{RENDER.parent}:{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
               JAIROUTER_CONFIG=str(ROOT / "envoy" / "demo" / "application.yml"),
               JAIROUTER_RUN_DIR=str(tmp_path), JAIROUTER_WASM=str(WASM),
               PORT=str(port), METRICS_PORT=str(metrics), ADMIN_PORT=str(admin), STATUS_PORT=str(status),
               CONCURRENCY="1", ENVOY_LOG_LEVEL="error")
    for name, stub in (("A", a), ("B", b), ("EMBED", e)):
        env[f"DEMO_{name}_HOST"], env[f"DEMO_{name}_PORT"] = "127.0.0.1", str(stub.port)
    proc = subprocess.Popen([str(ROOT / "envoy" / "docker" / "jairouter-gateway.sh")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{metrics}/ready", alive=lambda: proc.poll() is None)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                       content=json_body({"model": "demo-llama", "messages": [{"role": "user", "content": "hi"}]}),
                       headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.headers["x-stub-instance"] in ("demo-a", "demo-b"), r.text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
