"""The mesh deployments: `jairouter-render istio` and `jairouter-render envoy-gateway`.

- The committed examples in k8s/istio and k8s/envoy-gateway are exactly what the renderer renders
  now (each names its command in its first line), so they cannot rot.
- Invariants of the rendered resources: every instance's cluster has a route to its host and port,
  client-supplied routing headers never reach a backend, requests the filter did not route get an
  OpenAI-shaped 503, and the filter configuration inside WasmPlugin / EnvoyFilter /
  EnvoyExtensionPolicy is what `plugin-config` prints.
- The EnvoyFilter's wasm filter, with a local .wasm, in a real Envoy: `--mode validate`, and a
  request routed through the EnvoyFilter's pieces and the VirtualService's routes, assembled the
  way istiod assembles them.

CRD schema validation hooks in through `all_documents()`.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from harness import ENVOY, RENDER, ROOT, WASM

EXAMPLE_DIRS = [ROOT / "k8s" / "istio", ROOT / "k8s" / "envoy-gateway"]
EXAMPLE_CONFIG = ROOT / "k8s" / "istio" / "example-application.yml"
HEADER = "# Rendered by: "
ROUTING_HEADERS = ["x-jairouter-cluster", "x-jairouter-model"]
WASM_URL = "oci://registry.example.com/jairouter-wasm:0.1.0"

# The example's instances: cluster -> (the host the mesh knows, port, Kubernetes Service or None).
EXAMPLE_INSTANCES = {
    "jairouter-ollama": ("ollama.llm.svc.cluster.local", 11434, ("llm", "ollama")),
    "jairouter-ollama-gpu": ("ollama-gpu.models.svc.cluster.local", 11434, ("models", "ollama-gpu")),
    "jairouter-hosted": ("inference.example.com", 443, None),
    "jairouter-ollama-embed": ("ollama.llm.svc.cluster.local", 11434, ("llm", "ollama")),
}


def run_render(*args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run([str(RENDER), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def example_files() -> list[Path]:
    """The rendered examples (YAML files headed by the command that rendered them)."""
    return sorted(p for d in EXAMPLE_DIRS for p in d.glob("*.yaml") if p.read_text().startswith(HEADER))


def all_documents() -> list[tuple[Path, dict]]:
    """Every Kubernetes object of the committed mesh examples, with its file: for schema checks."""
    return [(path, doc) for path in example_files() for doc in documents(path.read_text())]


def rendering_command(path: Path) -> list[str]:
    """The renderer's arguments named in an example's first line."""
    first = path.read_text().splitlines()[0]
    argv = shlex.split(first.removeprefix(HEADER))
    assert argv[0] == "jairouter-render", first
    return argv[1:]


def plugin_config(config: Path, *flags: str) -> dict:
    return json.loads(run_render("plugin-config", str(config), *flags))


def istio_gateway(config: Path = EXAMPLE_CONFIG, *flags: str) -> list[dict]:
    return documents(run_render("istio", str(config), "--wasm-url", WASM_URL, "--namespace", "llm",
                                "--gateway", "istio-system/llm-gateway", "--host", "llm.example.com", *flags))


def envoy_gateway(config: Path = EXAMPLE_CONFIG, *flags: str) -> list[dict]:
    return documents(run_render("envoy-gateway", str(config), "--wasm-url", WASM_URL, "--namespace", "llm",
                                "--gateway", "eg", "--host", "llm.example.com", *flags))


def test_the_committed_examples_are_what_the_renderer_renders_now():
    files = example_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"k8s/istio/gateway.yaml", "k8s/istio/sidecar.yaml", "k8s/istio/gateway-wasmplugin.yaml",
            "k8s/envoy-gateway/gateway.yaml"} <= names
    for path in files:
        rendered = run_render(*rendering_command(path))
        assert rendered == path.read_text(), (
            f"{path.relative_to(ROOT)} is stale: render it again with\n  "
            + path.read_text().splitlines()[0].removeprefix(HEADER)
        )
    assert all_documents()


def test_the_example_has_the_instances_the_checks_expect():
    out = run_render("check", str(EXAMPLE_CONFIG))
    assert f"{len(EXAMPLE_INSTANCES)} instances" in out, out


@pytest.mark.parametrize("mode", ["gateway", "sidecar"])
def test_istio_routes_every_instance_to_its_host_and_port(mode):
    if mode == "gateway":
        docs = istio_gateway()
    else:
        docs = documents(run_render("istio", str(EXAMPLE_CONFIG), "--wasm-url", WASM_URL, "--namespace", "llm",
                                    "--mode", "sidecar", "--selector", "app=chat-ui"))
    [service] = of_kind(docs, "VirtualService")
    routes = service["spec"]["http"]
    for cluster, (host, port, _) in EXAMPLE_INSTANCES.items():
        matching = [r for r in routes if r.get("match") == [{"headers": {"x-jairouter-cluster": {"exact": cluster}}}]]
        assert len(matching) == 1, cluster
        [route] = matching
        assert route["route"] == [{"destination": {"host": host, "port": {"number": port}}}], cluster
    # Every route to a backend removes our headers: whatever a client sent never reaches one.
    forwarding = [r for r in routes if "route" in r]
    assert len(forwarding) == len(EXAMPLE_INSTANCES)
    for route in forwarding:
        assert route["headers"]["request"]["remove"] == ROUTING_HEADERS
        assert "uri" not in route.get("rewrite", {}), "the filter already set :path"
    # The last route takes what the filter did not route: an OpenAI-shaped 503.
    last = routes[-1]
    assert "match" not in last and last["directResponse"]["status"] == 503
    assert json.loads(last["directResponse"]["body"]["string"])["error"]["type"] == "server_error"
    assert last["headers"]["response"]["set"]["content-type"] == "application/json"

    # The outside host has a ServiceEntry and TLS origination; Services need neither.
    [entry] = of_kind(docs, "ServiceEntry")
    assert entry["spec"]["hosts"] == ["inference.example.com"]
    assert entry["spec"]["ports"] == [{"number": 443, "name": "https-443", "protocol": "HTTPS"}]
    rules = {r["spec"]["host"]: r for r in of_kind(docs, "DestinationRule")}
    assert set(rules) == {host for host, _, _ in EXAMPLE_INSTANCES.values()}
    assert rules["inference.example.com"]["spec"]["trafficPolicy"]["tls"]["mode"] == "SIMPLE"
    assert rules["inference.example.com"]["spec"]["trafficPolicy"]["tls"]["sni"] == "inference.example.com"
    for host, rule in rules.items():
        assert rule["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] == 5
        if host != "inference.example.com":
            assert "tls" not in rule["spec"]["trafficPolicy"]
    assert rules["ollama-gpu.models.svc.cluster.local"]["metadata"]["namespace"] == "models"


def test_envoy_gateway_routes_every_instance_to_its_service_or_backend():
    docs = envoy_gateway()
    rules = [rule for route in of_kind(docs, "HTTPRoute") for rule in route["spec"]["rules"]]
    backends = {b["metadata"]["name"]: b for b in of_kind(docs, "Backend")}
    for cluster, (host, port, service) in EXAMPLE_INSTANCES.items():
        matching = [r for r in rules
                    if r.get("matches") == [{"headers": [{"type": "Exact", "name": "x-jairouter-cluster", "value": cluster}]}]]
        assert len(matching) == 1, cluster
        [rule] = matching
        [ref] = rule["backendRefs"]
        if service is not None:
            namespace, name = service
            assert ref["name"] == name and ref["port"] == port and ref.get("namespace", "llm") == namespace
        else:
            assert ref["kind"] == "Backend" and ref["group"] == "gateway.envoyproxy.io"
            assert backends[ref["name"]]["spec"]["endpoints"] == [{"fqdn": {"hostname": host, "port": port}}]
    forwarding = [r for r in rules if "backendRefs" in r]
    assert len(forwarding) == len(EXAMPLE_INSTANCES)
    for rule in forwarding:
        [header_filter] = [f for f in rule["filters"] if f["type"] == "RequestHeaderModifier"]
        assert header_filter["requestHeaderModifier"]["remove"] == ROUTING_HEADERS
        assert rule["timeouts"]["request"] == "10m"
    # What the filter did not route: a rule without match and backend, answering from an
    # HTTPRouteFilter.
    [unrouted] = [r for r in rules if "backendRefs" not in r]
    assert "matches" not in unrouted
    [ref] = [f["extensionRef"] for f in unrouted["filters"]]
    [direct] = [f for f in of_kind(docs, "HTTPRouteFilter") if f["metadata"]["name"] == ref["name"]]
    response = direct["spec"]["directResponse"]
    assert response["statusCode"] == 503 and response["contentType"] == "application/json"
    assert json.loads(response["body"]["inline"])["error"]["code"] == "gateway_unavailable"

    # TLS to the outside https host; the Service in another namespace is granted; health checks.
    [tls] = of_kind(docs, "BackendTLSPolicy")
    assert tls["spec"]["validation"] == {"hostname": "inference.example.com", "wellKnownCACertificates": "System"}
    assert tls["spec"]["targetRefs"][0]["name"] in backends
    [grant] = of_kind(docs, "ReferenceGrant")
    assert grant["metadata"]["namespace"] == "models"
    rule_names = {r["name"] for r in rules}
    policies = of_kind(docs, "BackendTrafficPolicy")
    assert {p["spec"]["targetRefs"][0]["sectionName"] for p in policies} == set(EXAMPLE_INSTANCES) & rule_names
    hosted = next(p for p in policies if p["spec"]["targetRefs"][0]["sectionName"] == "jairouter-hosted")
    assert hosted["spec"]["healthCheck"]["active"]["http"]["path"] == "/serving/v1/models"


def test_the_filter_configuration_in_every_mesh_resource_is_what_plugin_config_prints(tmp_path):
    hash_line = subprocess.run([str(RENDER), "hash-key", "--salt", "MDEyMzQ1Njc4OWFiY2RlZg=="], input="sk-test\n",
                               capture_output=True, text=True, check=True).stdout.strip()
    keys = tmp_path / "keys.yml"
    keys.write_text(yaml.safe_dump({"jairouter": {"security": {"api-key": {
        "keys": [{"key-id": "team", "key-hash": hash_line, "permissions": ["chat"]}]}}}}))
    for flags in ([], ["--api-keys", str(keys)]):
        expected = plugin_config(EXAMPLE_CONFIG, *flags)
        [envoy_filter] = of_kind(istio_gateway(EXAMPLE_CONFIG, *flags), "EnvoyFilter")
        wasm = envoy_filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]
        assert json.loads(wasm["config"]["configuration"]["value"]) == expected
        assert wasm["config"]["allow_on_headers_stop_iteration"] is True
        [plugin] = of_kind(istio_gateway(EXAMPLE_CONFIG, "--install", "wasmplugin", *flags), "WasmPlugin")
        assert plugin["spec"]["pluginConfig"] == expected
        [policy] = of_kind(envoy_gateway(EXAMPLE_CONFIG, *flags), "EnvoyExtensionPolicy")
        assert policy["spec"]["wasm"][0]["config"] == expected
    assert "jairouter" in expected and "model" in expected


def test_refused_configurations_and_flags_fail_with_a_message(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("model:\n  services:\n    chat:\n      instances:\n        - {name: m, base-url: ftp://x}\n")
    cases = [
        ["istio", str(bad), "--wasm-url", WASM_URL, "--gateway", "g"],
        ["istio", str(EXAMPLE_CONFIG), "--gateway", "g"],
        ["istio", str(EXAMPLE_CONFIG), "--wasm-url", WASM_URL],
        ["istio", str(EXAMPLE_CONFIG), "--wasm-url", WASM_URL, "--gateway", "g", "--mode", "edge"],
        ["envoy-gateway", str(EXAMPLE_CONFIG), "--wasm-url", WASM_URL],
        ["envoy-gateway", str(EXAMPLE_CONFIG), "--wasm-url", "file:///x.wasm", "--gateway", "eg"],
    ]
    for args in cases:
        result = subprocess.run([str(RENDER), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, args
        assert result.stderr.startswith("jairouter-render: ") and not result.stdout, args


# ---- The EnvoyFilter's pieces in a real Envoy ----

def local_wasm(typed_config: dict) -> dict:
    """The EnvoyFilter's wasm filter with the built module instead of the agent-fetched one."""
    config = json.loads(json.dumps(typed_config))
    config["config"]["vm_config"]["code"] = {"local": {"filename": str(WASM)}}
    return config


def patches(envoy_filter: dict, apply_to: str) -> list[dict]:
    return [p["patch"]["value"] for p in envoy_filter["spec"]["configPatches"] if p["applyTo"] == apply_to]


def envoy_routes(virtual_service: dict) -> list[dict]:
    """The VirtualService's HTTP routes as istiod writes them into Envoy's route table (the parts
    that matter here: header match, cluster, authority rewrite, header removal, direct response)."""
    routes = []
    for http in virtual_service["spec"]["http"]:
        if "directResponse" in http:
            direct = http["directResponse"]
            routes.append({
                "name": http["name"],
                "match": {"prefix": "/"},
                "direct_response": {"status": direct["status"], "body": {"inline_string": direct["body"]["string"]}},
                "response_headers_to_add": [
                    {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                    for k, v in http["headers"]["response"]["set"].items()
                ],
            })
            continue
        [match] = http["match"]
        destination = http["route"][0]["destination"]
        routes.append({
            "name": http["name"],
            "match": {"prefix": "/", "headers": [
                {"name": name, "string_match": {"exact": value["exact"]}} for name, value in match["headers"].items()
            ]},
            "route": {
                "cluster": f"outbound|{destination['port']['number']}||{destination['host']}",
                "host_rewrite_literal": http["rewrite"]["authority"],
                "timeout": "0s",
            },
            "request_headers_to_remove": http["headers"]["request"]["remove"],
        })
    return routes


def service_entry_clusters(docs: list[dict]) -> list[dict]:
    """A cluster per ServiceEntry port, named as istiod names them, at the entry's endpoints."""
    clusters = []
    for entry in of_kind(docs, "ServiceEntry"):
        assert entry["spec"]["resolution"] == "STATIC"
        for port in entry["spec"]["ports"]:
            name = f"outbound|{port['number']}||{entry['spec']['hosts'][0]}"
            clusters.append({
                "name": name, "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": e["address"], "port_value": port["number"]}}}}
                    for e in entry["spec"]["endpoints"]
                ]}]},
            })
    return clusters


def bootstrap(docs: list[dict], workdir: Path) -> dict:
    """The gateway Envoy istiod would configure: our filter from the EnvoyFilter (ECDS from a file
    instead of ADS), switched on in our virtual host only, the VirtualService's routes, and a
    virtual host of somebody else's on the same listener."""
    [envoy_filter] = of_kind(docs, "EnvoyFilter")
    [service] = of_kind(docs, "VirtualService")
    [extension] = patches(envoy_filter, "EXTENSION_CONFIG")
    [http_filter] = patches(envoy_filter, "HTTP_FILTER")
    [vhost_patch] = patches(envoy_filter, "VIRTUAL_HOST")
    ecds = workdir / "ecds" / "jairouter.json"
    ecds.parent.mkdir(parents=True, exist_ok=True)
    ecds.write_text(json.dumps({"resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": extension["name"],
        "typed_config": local_wasm(extension["typed_config"]),
    }]}))
    http_filter = json.loads(json.dumps(http_filter))
    assert http_filter["config_discovery"]["config_source"].pop("ads") == {}
    http_filter["config_discovery"]["config_source"]["path_config_source"] = {"path": str(ecds)}
    ours = {"name": "jairouter", "domains": service["spec"]["hosts"], "routes": envoy_routes(service), **vhost_patch}
    theirs = {"name": "other", "domains": ["*"],
              "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "other"}}}]}
    return {
        "node": {"id": "test", "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "gateway",
                        "route_config": {"name": "http.80", "virtual_hosts": [ours, theirs]},
                        "http_filters": [http_filter, {
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                        }],
                    },
                }]}],
            }],
            "clusters": service_entry_clusters(docs),
        },
    }


def test_envoy_accepts_the_envoy_filters_wasm_filter(tmp_path):
    [envoy_filter] = of_kind(istio_gateway(), "EnvoyFilter")
    [extension] = patches(envoy_filter, "EXTENSION_CONFIG")
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [{
            "name": "gateway",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "gateway",
                    "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                        {"match": {"prefix": "/"}, "direct_response": {"status": 503}}]}]},
                    "http_filters": [
                        {"name": extension["name"], "typed_config": local_wasm(extension["typed_config"])},
                        {"name": "envoy.filters.http.router",
                         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                    ],
                },
            }]}],
        }]},
    }
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_envoy_filter_and_virtual_service_route_a_request_in_envoy(tmp_path, stubs):
    a, b = stubs("a", "b")
    config = tmp_path / "application.yml"
    config.write_text(yaml.safe_dump({"model": {"services": {"chat": {"instances": [
        {"name": "model-a", "base-url": a.url, "instance-id": "a"},
        {"name": "model-b", "base-url": b.url + "/prefix", "instance-id": "b"},
    ]}}}}))
    docs = documents(run_render("istio", str(config), "--wasm-url", f"file://{WASM}", "--namespace", "llm",
                                "--gateway", "istio-system/gw", "--host", "llm.test"))
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(bootstrap(docs, tmp_path)))
    admin_file = tmp_path / "admin-address"
    log = tmp_path / "envoy.log"
    process = subprocess.Popen(
        [str(ENVOY), "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id",
         "--admin-address-path", str(admin_file), "--log-level", "warning", "--log-path", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        admin = wait_for_admin(process, admin_file, log)
        listeners = httpx.get(f"{admin}/listeners?format=json", timeout=5).json()["listener_statuses"]
        port = listeners[0]["local_address"]["socket_address"]["port_value"]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with httpx.Client(timeout=10) as client:
            # The model in the body: the filter pauses in the headers to read it
            # (allow_on_headers_stop_iteration), names b, and the route table sends it there.
            # A client's own x-jairouter-cluster pointing at a is discarded.
            response = client.post(url, headers={"host": "llm.test", "x-jairouter-cluster": "jairouter-a"},
                                   json={"messages": [{"role": "user", "content": "hi"}], "model": "model-b"})
            assert response.status_code == 200, response.text
            assert response.headers["x-jairouter-instance"] == "b"
            [received] = b.requests
            assert received.path == "/prefix/v1/chat/completions"
            assert received.headers["host"] == "127.0.0.1"
            assert not {h.lower() for h in received.headers} & set(ROUTING_HEADERS)
            assert not a.requests

            response = client.post(url, headers={"host": "llm.test"}, json={"model": "model-a", "messages": []})
            assert response.status_code == 200 and response.headers["x-jairouter-instance"] == "a"
            # The filter answers itself (GET /v1/models, an unknown model) in our virtual host ...
            models = client.get(f"http://127.0.0.1:{port}/v1/models", headers={"host": "llm.test"})
            assert {m["id"] for m in models.json()["data"]} == {"model-a", "model-b"}
            unknown = client.post(url, headers={"host": "llm.test"}, json={"model": "nope"})
            assert unknown.status_code == 404
            # ... and never runs for somebody else's host on the same listener.
            other = client.post(url, headers={"host": "other.test"}, json={"model": "model-a"})
            assert other.status_code == 200 and other.text == "other"
            assert "x-jairouter-instance" not in other.headers
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for_admin(process: subprocess.Popen, admin_file: Path, log: Path) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"Envoy exited with {process.returncode}:\n{log.read_text() if log.exists() else ''}"
        if admin_file.exists() and admin_file.read_text().strip():
            admin = f"http://{admin_file.read_text().strip()}"
            try:
                if httpx.get(f"{admin}/ready", timeout=1).status_code == 200:
                    return admin
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"Envoy did not become ready:\n{log.read_text() if log.exists() else ''}")


def test_every_committed_manifest_validates_against_its_schema():
    """Every Kubernetes object the repository ships outside the chart (the chart has its own
    tests), file by file: the mesh examples are alternatives that share object names."""
    from k8s_tools import kustomize, load_manifests, validate

    files = [p for d in ("istio", "envoy-gateway", "monitoring") for p in sorted((ROOT / "k8s" / d).glob("*.yaml"))]
    files = [p for p in files if p.name != "example-application.yml"]
    assert len(files) >= 5, files
    for path in files:
        docs = load_manifests(path)
        assert docs, path
        assert validate(docs) == [], path
    assert validate(kustomize(ROOT / "k8s" / "ratelimit")) == []
