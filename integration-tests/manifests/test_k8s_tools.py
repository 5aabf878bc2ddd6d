"""The Kubernetes validation toolchain (k8s_tools, installed by k8s/tools/install.sh) works and can
fail: our manifests validate, a broken object of every family we use is reported, Helm renders and
lints a chart, and Docker Compose loads (and refuses) compose files."""

from __future__ import annotations

import copy
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from k8s_tools import (
    ROOT,
    ComposeError,
    HelmError,
    compose_config,
    crd_kinds,
    helm_lint,
    helm_template,
    kustomize,
    load_manifests,
    tool,
    validate,
)


def test_the_tools_are_the_real_ones():
    helm = subprocess.run([tool("helm"), "version", "--short"], capture_output=True, text=True, check=True)
    assert helm.stdout.startswith("v4."), helm.stdout
    compose = subprocess.run([tool("docker-compose"), "version"], capture_output=True, text=True, check=True)
    assert "Docker Compose version v2." in compose.stdout
    kubectl = subprocess.run([tool("kubectl"), "version", "--client"], capture_output=True, text=True, check=True)
    assert "Kustomize Version" in kubectl.stdout


# --- our manifests --------------------------------------------------------------------------------


def test_ratelimit_kustomization_is_valid():
    docs = kustomize(ROOT / "k8s" / "ratelimit")
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}
    assert validate(docs) == []


# The Prometheus Operator objects (k8s/monitoring/, or kept in the chart's files/ for .Files.Get).
MONITORING = [ROOT / "k8s" / "monitoring", ROOT / "k8s" / "helm" / "jairouter" / "files" / "prometheus-rule.yaml"]


def test_monitoring_manifests_are_valid():
    kinds = set()
    for path in (p for p in MONITORING if p.exists()):
        docs = load_manifests(path)
        kinds |= {d["kind"] for d in docs}
        assert validate(docs) == [], path
    assert "PrometheusRule" in kinds


def test_every_crd_family_has_its_schemas():
    kinds = set(crd_kinds())
    assert kinds >= {
        ("networking.istio.io/v1", "VirtualService"), ("networking.istio.io/v1", "DestinationRule"),
        ("networking.istio.io/v1", "ServiceEntry"), ("networking.istio.io/v1alpha3", "EnvoyFilter"),
        ("extensions.istio.io/v1alpha1", "WasmPlugin"),
        ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"), ("gateway.envoyproxy.io/v1alpha1", "Backend"),
        ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"), ("gateway.networking.k8s.io/v1", "Gateway"),
        ("gateway.networking.k8s.io/v1", "BackendTLSPolicy"), ("gateway.networking.k8s.io/v1alpha3", "BackendTLSPolicy"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("autoscaling.k8s.io/v1", "VerticalPodAutoscaler"),
    }
    readme = (ROOT / "k8s" / "schemas" / "README.md").read_text()
    for _, path in crd_kinds().items():
        assert path.name in readme or path.stem.split("_")[0] in readme, f"{path} has no source in the README"


# --- one valid object of each kind, and how breaking it is reported --------------------------------


def meta(name: str, **extra) -> dict:
    return {"name": name, "namespace": "jairouter", "labels": {"app.kubernetes.io/name": "jairouter"}, **extra}


GATEWAY_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "eg"}

VALID = {
    "core Deployment": {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("jairouter"),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "jairouter"}},
            "template": {
                "metadata": {"labels": {"app": "jairouter"}},
                "spec": {"containers": [{
                    "name": "envoy", "image": "envoyproxy/envoy:v1.40.0",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                    "resources": {"limits": {"memory": "512Mi"}, "requests": {"cpu": "250m"}},
                }]},
            },
        },
    },
    "core HorizontalPodAutoscaler": {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta("jairouter"),
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "jairouter"},
                 "minReplicas": 2, "maxReplicas": 10,
                 "metrics": [{"type": "Resource", "resource": {
                     "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]},
    },
    "Istio VirtualService": {
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": meta("jairouter"),
        "spec": {"hosts": ["jairouter"], "http": [{
            "match": [{"uri": {"prefix": "/v1/"}}],
            "route": [{"destination": {"host": "jairouter", "port": {"number": 8080}}}],
            "timeout": "60s", "retries": {"attempts": 2, "retryOn": "5xx"}}]},
    },
    "Istio DestinationRule": {
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": meta("jairouter"),
        "spec": {"host": "api.openai.com", "trafficPolicy": {
            "connectionPool": {"http": {"http2MaxRequests": 100}},
            "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s"},
            "tls": {"mode": "SIMPLE", "insecureSkipVerify": None}}},  # nullable in the CRD
    },
    "Istio ServiceEntry": {
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": meta("openai"),
        "spec": {"hosts": ["api.openai.com"], "location": "MESH_EXTERNAL", "resolution": "DNS",
                 "ports": [{"number": 443, "name": "https", "protocol": "TLS"}]},
    },
    "Istio EnvoyFilter": {
        "apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter", "metadata": meta("jairouter"),
        "spec": {"workloadSelector": {"labels": {"app": "jairouter"}}, "configPatches": [{
            "applyTo": "HTTP_FILTER",
            "match": {"context": "SIDECAR_INBOUND"},
            "patch": {"operation": "INSERT_BEFORE",  # value is free-form in the CRD: any fields pass
                      "value": {"name": "jairouter", "typed_config": {"@type": "x", "anything": [1]}}}}]},
    },
    "Istio WasmPlugin": {
        "apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": meta("jairouter"),
        "spec": {"selector": {"matchLabels": {"app": "jairouter"}}, "url": "oci://ghcr.io/example/jairouter:1.0",
                 "phase": "AUTHN", "failStrategy": "FAIL_CLOSE", "pluginConfig": {"services": {"chat": {}}}},
    },
    "Envoy Gateway EnvoyExtensionPolicy": {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyExtensionPolicy", "metadata": meta("jairouter"),
        "spec": {"targetRefs": [GATEWAY_REF], "wasm": [{
            "name": "jairouter", "code": {"type": "Image", "image": {"url": "ghcr.io/example/jairouter:1.0"}},
            "config": {"services": {"chat": {}}}, "failOpen": False}]},
    },
    "Envoy Gateway Backend": {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "Backend", "metadata": meta("openai"),
        "spec": {"endpoints": [{"fqdn": {"hostname": "api.openai.com", "port": 443}}]},
    },
    "Envoy Gateway BackendTrafficPolicy": {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "BackendTrafficPolicy", "metadata": meta("jairouter"),
        "spec": {"targetRefs": [GATEWAY_REF], "loadBalancer": {"type": "RoundRobin"},
                 "compression": [{"type": "Gzip", "gzip": {}}],
                 "timeout": {"http": {"requestTimeout": "60s"}}},
    },
    "Gateway API Gateway": {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta("eg"),
        "spec": {"gatewayClassName": "eg", "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}]},
    },
    "Gateway API HTTPRoute": {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta("jairouter"),
        "spec": {"parentRefs": [{"name": "eg"}], "rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
            "backendRefs": [{"name": "jairouter", "port": 8080}]}]},
    },
    "Gateway API BackendTLSPolicy v1": {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "BackendTLSPolicy", "metadata": meta("openai"),
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "openai"}],
                 "validation": {"hostname": "api.openai.com", "wellKnownCACertificates": "System"}},
    },
    "Gateway API BackendTLSPolicy v1alpha3": {
        "apiVersion": "gateway.networking.k8s.io/v1alpha3", "kind": "BackendTLSPolicy", "metadata": meta("openai"),
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "openai"}],
                 "validation": {"hostname": "api.openai.com", "wellKnownCACertificates": "System"}},
    },
    "Prometheus Operator ServiceMonitor": {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta("jairouter"),
        "spec": {"selector": {"matchLabels": {"app": "jairouter"}},
                 "endpoints": [{"port": "admin", "path": "/stats/prometheus", "interval": "30s"}]},
    },
    "Prometheus Operator PrometheusRule": {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": meta("jairouter"),
        "spec": {"groups": [{"name": "jairouter", "rules": [
            {"alert": "JAiRouterDown", "expr": "up == 0", "for": "1m", "labels": {"severity": "critical"}}]}]},
    },
    "VPA VerticalPodAutoscaler": {
        "apiVersion": "autoscaling.k8s.io/v1", "kind": "VerticalPodAutoscaler", "metadata": meta("jairouter"),
        "spec": {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "jairouter"},
                 "updatePolicy": {"updateMode": "Off"},
                 "resourcePolicy": {"containerPolicies": [{"containerName": "envoy", "maxAllowed": {"memory": "1Gi"}}]}},
    },
}


@pytest.mark.parametrize("name", VALID)
def test_a_valid_object_passes(name):
    assert validate([VALID[name]]) == []


def broken(name: str, edit) -> dict:
    doc = copy.deepcopy(VALID[name])
    edit(doc)
    return doc


# (valid object, how to break it, what the report must say)
BROKEN = {
    "core: unknown field": (
        "core Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
        "spec.template.spec.containers[0]: Additional properties are not allowed ('imagePullPolicyy'"),
    "core: wrong type": (
        "core Deployment", lambda d: d["spec"].update(replicas="two"), "spec.replicas: 'two' is not of type"),
    "core: missing required": (
        "core HorizontalPodAutoscaler", lambda d: d["spec"].pop("maxReplicas"), "'maxReplicas' is a required property"),
    "Istio: unknown field": (
        "Istio VirtualService", lambda d: d["spec"]["http"][0].update(retrys={}), "spec.http[0]: Additional properties"),
    "Istio: wrong type": (
        "Istio DestinationRule", lambda d: d["spec"]["trafficPolicy"]["outlierDetection"].update(consecutive5xxErrors="5"),
        "spec.trafficPolicy.outlierDetection.consecutive5xxErrors: '5' is not of type"),
    "Istio: bad enum": (
        "Istio ServiceEntry", lambda d: d["spec"].update(resolution="SOMETIMES"), "spec.resolution: 'SOMETIMES' is not one of"),
    "Istio: EnvoyFilter bad operation": (
        "Istio EnvoyFilter", lambda d: d["spec"]["configPatches"][0]["patch"].update(operation="PREPEND"),
        "spec.configPatches[0].patch.operation"),
    "Istio: WasmPlugin unknown field": (
        "Istio WasmPlugin", lambda d: d["spec"].update(imagePullPolicyy="Always"), "spec: Additional properties are not allowed"),
    "Envoy Gateway: unknown field": (
        "Envoy Gateway EnvoyExtensionPolicy", lambda d: d["spec"]["wasm"][0].update(rootId="x"),
        "spec.wasm[0]: Additional properties are not allowed ('rootId'"),
    "Envoy Gateway: bad enum": (
        "Envoy Gateway BackendTrafficPolicy", lambda d: d["spec"]["loadBalancer"].update(type="Fastest"),
        "spec.loadBalancer.type: 'Fastest' is not one of"),
    "Envoy Gateway: Backend wrong type": (
        "Envoy Gateway Backend", lambda d: d["spec"]["endpoints"][0]["fqdn"].update(port="443"),
        "spec.endpoints[0].fqdn.port: '443' is not of type"),
    "Envoy Gateway: a field in an object that lists none": (
        "Envoy Gateway BackendTrafficPolicy", lambda d: d["spec"].update(compression=[{"type": "Gzip", "gzip": {"level": 9}}]),
        "spec.compression[0].gzip: Additional properties are not allowed ('level'"),
    "Gateway API: out of range": (
        "Gateway API HTTPRoute", lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(port=70000),
        "spec.rules[0].backendRefs[0].port: 70000 is greater than the maximum"),
    "Gateway API: missing required": (
        "Gateway API Gateway", lambda d: d["spec"].pop("gatewayClassName"), "'gatewayClassName' is a required property"),
    "Gateway API: BackendTLSPolicy unknown field": (
        "Gateway API BackendTLSPolicy v1", lambda d: d["spec"]["validation"].update(caCertRefs=[]),
        "spec.validation: Additional properties are not allowed ('caCertRefs'"),
    "Prometheus Operator: unknown field": (
        "Prometheus Operator ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervall="30s"),
        "spec.endpoints[0]: Additional properties are not allowed ('intervall'"),
    "Prometheus Operator: wrong type": (
        "Prometheus Operator PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(labels={"severity": 2}),
        "spec.groups[0].rules[0].labels.severity: 2 is not of type 'string'"),
    "VPA: bad enum": (
        "VPA VerticalPodAutoscaler", lambda d: d["spec"]["updatePolicy"].update(updateMode="Sometimes"),
        "spec.updatePolicy.updateMode: 'Sometimes' is not one of"),
    "custom resource metadata": (
        "Istio VirtualService", lambda d: d["metadata"].update(lables={"a": "b"}),
        "metadata: Additional properties are not allowed ('lables'"),
    "custom resource top level": (
        "Gateway API HTTPRoute", lambda d: d.update(specs={}), "(object): Additional properties are not allowed ('specs'"),
    "null where the CRD does not allow it": (
        "Istio VirtualService", lambda d: d["spec"].update(hosts=None), "spec.hosts: None is not of type 'array'"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_object_is_reported(case):
    name, edit, expected = BROKEN[case]
    problems = validate([broken(name, edit)])
    assert problems, f"{case}: not reported"
    assert any(expected in p for p in problems), problems
    kind = VALID[name]["kind"]
    assert all(p.startswith(f"{kind} jairouter/") for p in problems), problems


def test_unknown_kinds_are_problems_not_passes():
    docs = [
        {"apiVersion": "networking.istio.io/v1", "kind": "EnvoyFilter", "metadata": {"name": "a"}},  # only v1alpha3
        {"apiVersion": "networking.istio.io/v1", "kind": "Ingress", "metadata": {"name": "b"}},  # not k8s' Ingress
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "c"}},
        {"apiVersion": "extensions/v1beta1", "kind": "Ingress", "metadata": {"name": "d"}},  # long removed
        {"apiVersion": "apps/v1", "kind": "deployment", "metadata": {"name": "e"}, "spec": {}},  # kind is case-sensitive
        {"kind": "ConfigMap", "metadata": {"name": "f"}},
        "not an object",
    ]
    problems = validate(docs)
    assert len(problems) == len(docs), problems
    assert sum("unknown apiVersion/kind" in p for p in problems) == 5, problems


def test_a_kind_missing_from_one_kubernetes_version_is_reported():
    # flowcontrol v1beta3 is served by Kubernetes 1.30 and removed in 1.32.
    doc = {"apiVersion": "flowcontrol.apiserver.k8s.io/v1beta3", "kind": "FlowSchema", "metadata": {"name": "x"},
           "spec": {"priorityLevelConfiguration": {"name": "global-default"}}}
    assert validate([doc], kube_versions=("1.30",)) == []
    assert validate([doc], kube_versions=("1.30", "1.37")) == [
        "FlowSchema x (flowcontrol.apiserver.k8s.io/v1beta3): (object): "
        "flowcontrol.apiserver.k8s.io/v1beta3 FlowSchema is not served by Kubernetes 1.37"]


def test_names_labels_and_duplicates():
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "jairouter"},
               "spec": {"ports": [{"port": 80, "targetPort": "http"}]}}
    assert validate([service]) == []
    bad = copy.deepcopy(service)
    bad["metadata"] = {"name": "JAiRouter", "labels": {"helm.sh/chart": "jairouter-0.1.0+g1234"}}
    problems = validate([bad, service, copy.deepcopy(service), {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}])
    assert any("metadata.name 'JAiRouter' is not a DNS-1035 label" in p for p in problems), problems
    assert any("'jairouter-0.1.0+g1234' is not a valid label value" in p for p in problems), problems
    assert any(p.startswith("Service jairouter (v1): duplicate of document 1") for p in problems), problems
    assert any("metadata.name: missing" in p for p in problems), problems


# --- Helm ------------------------------------------------------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


TINY_CHART = {
    "Chart.yaml": """
        apiVersion: v2
        name: tiny
        version: 0.1.0
        appVersion: "1.40.0"
    """,
    "values.yaml": """
        replicas: 2
        image: envoyproxy/envoy
        labels:
          team: gateway
        serviceMonitor:
          enabled: false
          interval: 30s
    """,
    "values.schema.json": json.dumps({
        "$schema": "https://json-schema.org/draft-07/schema#", "type": "object",
        "properties": {"replicas": {"type": "integer", "minimum": 1}},
    }),
    "templates/_helpers.tpl": """
        {{- define "tiny.fullname" -}}
        {{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
        {{- end -}}
        {{- define "tiny.labels" -}}
        app.kubernetes.io/name: {{ .Chart.Name }}
        app.kubernetes.io/instance: {{ .Release.Name }}
        {{- with .Values.labels }}
        {{ toYaml . }}
        {{- end }}
        {{- end -}}
    """,
    "templates/deployment.yaml": """
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: {{ include "tiny.fullname" . }}
          namespace: {{ .Release.Namespace }}
          labels:
            {{- include "tiny.labels" . | nindent 4 }}
        spec:
          replicas: {{ .Values.replicas }}
          selector:
            matchLabels:
              app.kubernetes.io/instance: {{ .Release.Name }}
          template:
            metadata:
              labels:
                {{- include "tiny.labels" . | nindent 8 }}
            spec:
              containers:
                - name: envoy
                  image: "{{ .Values.image }}:v{{ .Chart.AppVersion }}"
                  ports:
                    - {name: admin, containerPort: 9901}
        ---
        apiVersion: v1
        kind: Service
        metadata:
          name: {{ include "tiny.fullname" . }}
          namespace: {{ .Release.Namespace }}
          labels:
            {{- include "tiny.labels" . | nindent 4 }}
        spec:
          selector:
            app.kubernetes.io/instance: {{ .Release.Name }}
          ports:
            - {name: admin, port: 9901, targetPort: admin}
    """,
    "templates/servicemonitor.yaml": """
        {{- if and .Values.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}
        apiVersion: monitoring.coreos.com/v1
        kind: ServiceMonitor
        metadata:
          name: {{ include "tiny.fullname" . }}
          namespace: {{ .Release.Namespace }}
          labels:
            {{- include "tiny.labels" . | nindent 4 }}
        spec:
          selector:
            matchLabels:
              app.kubernetes.io/instance: {{ .Release.Name }}
          endpoints:
            - port: admin
              path: /stats/prometheus
              interval: {{ .Values.serviceMonitor.interval }}
        {{- end }}
    """,
}


@pytest.fixture
def tiny_chart(tmp_path) -> Path:
    return write(tmp_path / "tiny", TINY_CHART)


def test_helm_template_renders_a_chart(tiny_chart):
    docs = helm_template(tiny_chart)
    assert [(d["kind"], d["metadata"]["name"], d["metadata"]["namespace"]) for d in docs] == [
        ("Service", "jairouter-tiny", "jairouter"), ("Deployment", "jairouter-tiny", "jairouter")]
    deployment = docs[1]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["labels"] == {
        "app.kubernetes.io/name": "tiny", "app.kubernetes.io/instance": "jairouter", "team": "gateway"}
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "envoyproxy/envoy:v1.40.0"
    assert validate(docs) == []


def test_helm_template_values_files_values_and_capabilities(tiny_chart, tmp_path):
    values_file = tmp_path / "monitoring.yaml"
    values_file.write_text("serviceMonitor:\n  enabled: true\n  interval: 15s\n")
    # enabled, but the cluster (as told to Helm) has no Prometheus Operator: no ServiceMonitor
    assert "ServiceMonitor" not in {d["kind"] for d in helm_template(tiny_chart, [values_file])}
    docs = helm_template(tiny_chart, [values_file], release="gw", namespace="edge", values={"replicas": 5},
                         api_versions=["monitoring.coreos.com/v1"])
    by_kind = {d["kind"]: d for d in docs}
    assert by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["interval"] == "15s"
    assert by_kind["ServiceMonitor"]["metadata"]["namespace"] == "edge"
    assert by_kind["Deployment"]["metadata"]["name"] == "gw-tiny"
    assert by_kind["Deployment"]["spec"]["replicas"] == 5
    assert validate(docs) == []


def test_helm_template_applies_the_values_schema(tiny_chart):
    with pytest.raises(HelmError, match="replicas"):
        helm_template(tiny_chart, values={"replicas": "two"})


def test_a_rendered_object_that_is_invalid_is_reported(tiny_chart):
    (tiny_chart / "templates" / "deployment.yaml").write_text(
        (tiny_chart / "templates" / "deployment.yaml").read_text()
        .replace("replicas: {{ .Values.replicas }}", "replicas: {{ .Values.replicas | quote }}"))
    problems = validate(helm_template(tiny_chart))
    assert problems == ["Deployment jairouter/jairouter-tiny (apps/v1): spec.replicas: '2' is not of type 'integer', 'null'"]


def test_helm_lint_passes_a_good_chart(tiny_chart):
    messages = helm_lint(tiny_chart)
    assert all(not m.startswith("[ERROR]") for m in messages), messages
    assert "[INFO] Chart.yaml: icon is recommended" in messages
    assert helm_lint(tiny_chart, strict=True) == messages  # an INFO is no warning


def test_helm_lint_warns_and_strict_fails(tiny_chart):
    (tiny_chart / "templates" / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Bad_Name\n")
    messages = helm_lint(tiny_chart)
    assert any(m.startswith("[WARNING] templates/cm.yaml: object name does not conform") for m in messages), messages
    with pytest.raises(HelmError) as failure:
        helm_lint(tiny_chart, strict=True)
    assert any(m.startswith("[WARNING]") for m in failure.value.messages)


def test_helm_lint_reports_a_broken_chart(tiny_chart):
    (tiny_chart / "templates" / "broken.yaml").write_text("metadata:\n  name: {{ .Values.name | nosuchfunction }}\n")
    with pytest.raises(HelmError) as failure:
        helm_lint(tiny_chart)
    assert any(m.startswith("[ERROR]") and "nosuchfunction" in m for m in failure.value.messages), failure.value.messages
    with pytest.raises(HelmError, match="nosuchfunction"):
        helm_template(tiny_chart)


def test_helm_lint_reports_unparsable_yaml(tiny_chart):
    (tiny_chart / "templates" / "broken.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x\n")
    with pytest.raises(HelmError) as failure:
        helm_lint(tiny_chart)
    assert any("unable to parse YAML" in m for m in failure.value.messages), failure.value.messages


# --- Docker Compose --------------------------------------------------------------------------------


def test_the_projects_compose_file_loads():
    config = compose_config(ROOT / "envoy" / "docker-compose.yaml")
    assert set(config["services"]) == {"gateway", "backends"}
    assert {p["target"] for p in config["services"]["gateway"]["ports"]} == {8080, 9090}


def test_the_compose_files_global_limits_profile_adds_the_rate_limit_service_and_redis():
    config = compose_config(ROOT / "envoy" / "docker-compose.yaml", env={"COMPOSE_PROFILES": "global-limits"})
    assert set(config["services"]) == {"gateway", "backends", "ratelimit", "redis"}
    ratelimit = config["services"]["ratelimit"]
    assert ratelimit["environment"]["JAIROUTER_RATELIMIT_GRPC_LISTEN"] == "0.0.0.0:8081"
    assert ratelimit["environment"]["JAIROUTER_RATELIMIT_REDIS_URL"] == "redis://redis:6379/0"
    assert ratelimit["build"]["dockerfile"] == "envoy/ratelimit/Dockerfile"
    assert config["services"]["redis"]["command"] == ["redis-server", "--save", "", "--appendonly", "no"]


def test_compose_interpolates_and_normalises(tmp_path):
    path = write(tmp_path, {"compose.yaml": """
        services:
          web:
            image: "nginx:${TAG:-latest}"
            ports: ["8080:80"]
    """}) / "compose.yaml"
    assert compose_config(path, project_name="t")["services"]["web"]["image"] == "nginx:latest"
    config = compose_config(path, project_name="t", env={"TAG": "1.27"})
    assert config["services"]["web"]["image"] == "nginx:1.27"
    assert config["services"]["web"]["ports"][0]["published"] == "8080"


@pytest.mark.parametrize("text, expected", [
    ("services:\n  web:\n    imagex: nginx\n", "additional properties 'imagex' not allowed"),
    ("services:\n  web:\n    image: nginx\n    ports: 12\n", "services.web.ports must be a array"),
    ("services:\n  web:\n    image: [nginx\n", "yaml"),
    ("services:\n  web:\n    image: nginx\n    depends_on: [db]\n", "depends on undefined service"),
])
def test_compose_refuses_a_broken_file(tmp_path, text, expected):
    path = tmp_path / "compose.yaml"
    path.write_text(text)
    with pytest.raises(ComposeError, match=f"(?i){expected}"):
        compose_config(path, project_name="t")
