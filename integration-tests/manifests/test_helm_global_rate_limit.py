"""Issue 20 in the Helm chart: globalRateLimit deploys jairouter-ratelimit and its Redis (or points
at existing ones) and writes model.gateway.global-rate-limit into the gateway's application.yml.

Rendered by a real Helm, every object validated against the Kubernetes and CRD schemas
(k8s_tools); no pod runs here (the service's image is not built on this machine).
"""

from __future__ import annotations

import pytest
import yaml

from k8s_tools import HelmError, helm_lint, helm_template, validate
from test_helm_chart import CHART, FULL, kinds

NEEDS_BUILD = False  # Helm and the schemas only

RELEASE = "edge"     # fullname: edge-jairouter
GATEWAY = {"app.kubernetes.io/name": "jairouter", "app.kubernetes.io/instance": RELEASE}
RATELIMIT = {"app.kubernetes.io/name": "jairouter-ratelimit", "app.kubernetes.io/instance": RELEASE,
             "app.kubernetes.io/component": "ratelimit"}
REDIS = {"app.kubernetes.io/name": "jairouter-ratelimit-redis", "app.kubernetes.io/instance": RELEASE,
         "app.kubernetes.io/component": "ratelimit-redis"}
ON = {"globalRateLimit": {"enabled": True}}


def render(values: dict | None = None, files=(), **kwargs) -> list[dict]:
    return helm_template(CHART, files, release=RELEASE, values=values, **kwargs)


def find(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def application(docs: list[dict], name: str = "edge-jairouter-config") -> list[dict]:
    """The documents of the application.yml in a ConfigMap, as the renderer reads them."""
    return [d for d in yaml.safe_load_all(find(docs, "ConfigMap", name)["data"]["application.yml"]) if d]


def global_block(docs: list[dict]) -> dict:
    [model] = [d["model"] for d in application(docs) if "model" in d][:1]
    return model["gateway"]["global-rate-limit"]


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_labels(docs: list[dict], name: str) -> dict:
    return find(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]


def test_off_by_default_and_nothing_changes():
    docs = render()
    assert not [d for d in docs if "ratelimit" in d["metadata"]["name"]]
    for doc in application(docs):
        assert "global-rate-limit" not in str(doc)


def test_created_service_and_redis_render_valid_manifests():
    docs = render({**ON, "networkPolicy": {"enabled": True},
                   "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}})
    assert validate(docs) == []
    names = kinds(docs)
    for expected in ("Deployment/edge-jairouter-ratelimit", "Service/edge-jairouter-ratelimit",
                     "Deployment/edge-jairouter-ratelimit-redis", "Service/edge-jairouter-ratelimit-redis",
                     "PodDisruptionBudget/edge-jairouter-ratelimit", "ServiceMonitor/edge-jairouter-ratelimit",
                     "NetworkPolicy/edge-jairouter-ratelimit", "NetworkPolicy/edge-jairouter-ratelimit-redis"):
        assert expected in names, names

    # The gateway's configuration (and the config-check hook's copy) points at the chart's service.
    expected = {"address": "edge-jairouter-ratelimit:8081", "domain": "jairouter", "failure-mode-deny": False,
                "timeout-ms": 20, "token-settlement": "refunds"}
    assert global_block(docs) == expected
    assert global_block([{**find(docs, "ConfigMap", "edge-jairouter-config-check"),
                          "metadata": {"name": "edge-jairouter-config"}}]) == expected
    # The default configuration's own settings are untouched.
    [model] = [d["model"] for d in application(docs) if "model" in d]
    assert model["rate-limit"]["capacity"] == 1000 and "chat" in model["services"]

    deployment = find(docs, "Deployment", "edge-jairouter-ratelimit")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/jairouter/jairouter-ratelimit:0.1.0"
    assert deployment["spec"]["replicas"] == 2
    args = container["args"]
    assert args[args.index("--grpc-listen") + 1] == "0.0.0.0:8081"
    assert args[args.index("--http-listen") + 1] == "0.0.0.0:8080"
    assert args[args.index("--redis-timeout-ms") + 1] == "50" and args[args.index("--key-prefix") + 1] == "jrl"
    assert container["env"] == [{"name": "JAIROUTER_RATELIMIT_REDIS_URL",
                                 "value": "redis://edge-jairouter-ratelimit-redis:6379/0"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    service = find(docs, "Service", "edge-jairouter-ratelimit")
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {("grpc", 8081), ("http-metrics", 8080)}
    assert matches(service["spec"]["selector"], pod_labels(docs, "edge-jairouter-ratelimit"))

    redis = find(docs, "Deployment", "edge-jairouter-ratelimit-redis")
    rpod = redis["spec"]["template"]["spec"]
    [rc] = rpod["containers"]
    assert redis["spec"]["replicas"] == 1 and rc["image"] == "redis:7-alpine"
    assert rc["args"] == ["--save", "", "--appendonly", "no"]
    assert rpod["securityContext"]["runAsNonRoot"] is True and rc["securityContext"]["readOnlyRootFilesystem"] is True
    assert find(docs, "Service", "edge-jairouter-ratelimit-redis")["spec"]["ports"][0]["port"] == 6379

    monitor = find(docs, "ServiceMonitor", "edge-jairouter-ratelimit")
    assert monitor["spec"]["endpoints"][0]["port"] == "http-metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])


def test_the_gateways_selectors_do_not_take_the_new_pods():
    """The gateway's Service, PDB, NetworkPolicy and ServiceMonitor select by its labels: the
    rate-limit and Redis pods must not match them (nor each other's)."""
    docs = render({**ON, "networkPolicy": {"enabled": True}, "monitoring": {"serviceMonitor": {"enabled": True}}})
    gateway_selectors = [find(docs, "Service", "edge-jairouter")["spec"]["selector"],
                         find(docs, "PodDisruptionBudget", "edge-jairouter")["spec"]["selector"]["matchLabels"],
                         find(docs, "NetworkPolicy", "edge-jairouter")["spec"]["podSelector"]["matchLabels"],
                         find(docs, "ServiceMonitor", "edge-jairouter")["spec"]["selector"]["matchLabels"]]
    for name in ("edge-jairouter-ratelimit", "edge-jairouter-ratelimit-redis"):
        for selector in gateway_selectors:
            assert not matches(selector, pod_labels(docs, name)), (name, selector)
    assert not matches(find(docs, "Service", "edge-jairouter-ratelimit")["spec"]["selector"],
                       pod_labels(docs, "edge-jairouter-ratelimit-redis"))


def test_network_policies_let_only_the_gateway_reach_the_service_and_only_the_service_reach_redis():
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    backends = [{"to": [{"podSelector": {"matchLabels": {"app": "ollama"}}}],
                 "ports": [{"port": 11434, "protocol": "TCP"}]}]
    docs = render({**ON, "networkPolicy": {"enabled": True, "egressTo": backends}})
    assert validate(docs) == []

    policy = find(docs, "NetworkPolicy", "edge-jairouter-ratelimit")
    assert policy["spec"]["podSelector"]["matchLabels"] == RATELIMIT
    grpc, metrics = policy["spec"]["ingress"]
    assert grpc["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert grpc["from"] == [{"podSelector": {"matchLabels": GATEWAY}}]
    assert metrics["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    assert metrics["from"] == monitoring  # the chart's networkPolicy.metricsFrom, as for the gateway
    # It reaches DNS and its Redis only.
    dns, redis = policy["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert redis == {"to": [{"podSelector": {"matchLabels": REDIS}}], "ports": [{"port": 6379, "protocol": "TCP"}]}

    redis_policy = find(docs, "NetworkPolicy", "edge-jairouter-ratelimit-redis")
    assert redis_policy["spec"]["podSelector"]["matchLabels"] == REDIS
    assert redis_policy["spec"]["ingress"] == [{"ports": [{"port": "redis", "protocol": "TCP"}],
                                                "from": [{"podSelector": {"matchLabels": RATELIMIT}}]}]
    assert redis_policy["spec"]["egress"] == [] and redis_policy["spec"]["policyTypes"] == ["Ingress", "Egress"]

    # The gateway, restricted to its backends, may still reach the service's gRPC port.
    gateway = find(docs, "NetworkPolicy", "edge-jairouter")
    assert {"to": [{"podSelector": {"matchLabels": RATELIMIT}}], "ports": [{"port": 8081, "protocol": "TCP"}]} \
        in gateway["spec"]["egress"]
    assert all(rule in gateway["spec"]["egress"] for rule in backends)
    # The named ports the policies use exist on the pods.
    for name, port in (("edge-jairouter-ratelimit", "grpc"), ("edge-jairouter-ratelimit", "http-metrics"),
                       ("edge-jairouter-ratelimit-redis", "redis")):
        [container] = find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert port in {p["name"] for p in container["ports"]}


def test_an_existing_service():
    docs = render({"globalRateLimit": {"enabled": True, "service": {"create": False, "address": "rls.limits:8081"},
                                       "tokenSettlement": "charges-only", "domain": "edge", "failureModeDeny": True,
                                       "timeoutMs": 50},
                   "networkPolicy": {"enabled": True}, "monitoring": {"serviceMonitor": {"enabled": True}}})
    assert validate(docs) == []
    assert global_block(docs) == {"address": "rls.limits:8081", "domain": "edge", "failure-mode-deny": True,
                                  "timeout-ms": 50, "token-settlement": "charges-only"}
    # Nothing of the service or its Redis is deployed.
    assert not [d for d in docs if "ratelimit" in d["metadata"]["name"]], kinds(docs)
    with pytest.raises(HelmError, match="globalRateLimit.service.address"):
        render({"globalRateLimit": {"enabled": True, "service": {"create": False}}})


def test_an_existing_redis_by_url_or_secret():
    docs = render({"globalRateLimit": {"enabled": True, "redis": {"create": False, "url": "redis://cache.data:6379/3"}},
                   "networkPolicy": {"enabled": True}})
    assert validate(docs) == []
    assert not [d for d in docs if d["metadata"]["name"].endswith("-redis")], kinds(docs)
    [container] = find(docs, "Deployment", "edge-jairouter-ratelimit")["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [{"name": "JAIROUTER_RATELIMIT_REDIS_URL", "value": "redis://cache.data:6379/3"}]
    # The service may then connect to that Redis wherever it is.
    assert {} in find(docs, "NetworkPolicy", "edge-jairouter-ratelimit")["spec"]["egress"]

    docs = render({"globalRateLimit": {"enabled": True, "redis": {
        "create": False, "existingSecret": "redis-credentials", "existingSecretKey": "url"}}})
    assert validate(docs) == []
    [container] = find(docs, "Deployment", "edge-jairouter-ratelimit")["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [{"name": "JAIROUTER_RATELIMIT_REDIS_URL",
                                 "valueFrom": {"secretKeyRef": {"name": "redis-credentials", "key": "url"}}}]
    with pytest.raises(HelmError, match="globalRateLimit.redis.url"):
        render({"globalRateLimit": {"enabled": True, "redis": {"create": False}}})


def test_the_users_text_is_kept_when_the_model_has_no_gateway_section():
    app = ("server:\n  port: 8080\n---\n# the model\nmodel:   # mine\n    # four spaces\n"
           "    services:\n        chat:\n            instances:\n"
           "                - {name: m, base-url: \"http://x:1\", headers: {X: \"${TOKEN}\"}}\n")
    docs = render({**ON, "config": {"application.yml": app}})
    text = find(docs, "ConfigMap", "edge-jairouter-config")["data"]["application.yml"]
    assert "# the model\nmodel:   # mine\n" in text and "    # four spaces\n" in text
    server, doc = application(docs)
    assert server == {"server": {"port": 8080}}
    assert doc["model"]["gateway"]["global-rate-limit"]["address"] == "edge-jairouter-ratelimit:8081"
    assert doc["model"]["services"]["chat"]["instances"][0]["headers"] == {"X": "${TOKEN}"}


def test_a_gateway_section_of_the_users_is_merged_and_tracing_still_added():
    app = "model:\n  gateway:\n    trusted-hops: 1\n  services:\n    chat:\n      instances:\n" \
          "        - {name: m, base-url: \"http://x:1\"}\n---\njairouter: {security: {api-key: {enabled: false}}}\n"
    docs = render({**ON, "config": {"application.yml": app},
                   "tracing": {"enabled": True, "endpoint": "http://otel:4317"}})
    first, keys, tracing = application(docs)
    assert first["model"]["gateway"]["trusted-hops"] == 1
    assert first["model"]["gateway"]["global-rate-limit"]["domain"] == "jairouter"
    assert first["model"]["services"]["chat"]["instances"] == [{"name": "m", "base-url": "http://x:1"}]
    assert keys == {"jairouter": {"security": {"api-key": {"enabled": False}}}}
    assert tracing["jairouter"]["tracing"]["exporter"]["otlp"]["endpoint"] == "http://otel:4317"


def test_a_global_rate_limit_of_the_users_own_is_refused():
    app = "model:\n  gateway:\n    global-rate-limit: {address: \"rls:8081\"}\n  services: {}\n"
    with pytest.raises(HelmError, match="model.gateway.global-rate-limit of its own"):
        render({**ON, "config": {"application.yml": app}})
    # Without globalRateLimit the user's block is theirs.
    assert global_block(render({"config": {"application.yml": app}})) == {"address": "rls:8081"}
    with pytest.raises(HelmError, match="globalRateLimit.tokenSettlement"):
        render({"globalRateLimit": {"enabled": True, "tokenSettlement": "sometimes"}})


def test_every_feature_with_global_limits_validates_and_lints():
    docs = render(ON, [FULL])
    assert validate(docs) == []
    assert {"Deployment/edge-jairouter-ratelimit", "ServiceMonitor/edge-jairouter-ratelimit",
            "NetworkPolicy/edge-jairouter-ratelimit-redis"} <= set(kinds(docs))
    [secret_ref] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "edge-jairouter-ratelimit"]
    assert secret_ref["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
    for values in (ON, {"globalRateLimit": {"enabled": True, "service": {"create": False, "address": "r:8081"}}}):
        problems = [m for m in helm_lint(CHART, [FULL], values=values) if "[ERROR]" in m or "[WARNING]" in m]
        assert problems == [], problems


def test_a_file_of_just_the_models_content_gets_the_block_at_its_top():
    docs = render({**ON, "config": {"application.yml": "services: {chat: {instances: [{name: m, base-url: \"http://x:1\"}]}}\n"}})
    [doc] = application(docs)
    assert doc["gateway"]["global-rate-limit"]["address"] == "edge-jairouter-ratelimit:8081"
    assert doc["services"]["chat"]["instances"] == [{"name": "m", "base-url": "http://x:1"}]
    with pytest.raises(HelmError, match="no model: section"):
        render({**ON, "config": {"application.yml": "server: {port: 8080}\n"}})
