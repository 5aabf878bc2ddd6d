"""Checks for our Kubernetes deliverables, with real tools (installed by k8s/tools/install.sh).

- Helm charts render with Helm itself (`helm template`, `helm lint`; the official Helm 4 binary).
- Kustomizations render with `kubectl kustomize`.
- Every rendered object is validated against a schema:
  core Kubernetes kinds against PyPI kubernetes-validate's strict schemas (unknown fields rejected),
  for each Kubernetes version in KUBE_VERSIONS; custom resources against the CRDs' own
  openAPIV3Schema kept as data in k8s/schemas/ (see its README for sources and strictness).
  An apiVersion/kind with no schema is a problem, never a silent pass.
- Compose files load with Docker Compose v2's own loader (`docker-compose config`).

    docs = helm_template("k8s/helm/jairouter", ["my-values.yaml"])
    assert validate(docs) == []
"""

from __future__ import annotations

import atexit
import base64
import binascii
import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "k8s" / "schemas"
INSTALL = "k8s/tools/install.sh"
# Core kinds are checked against each of these Kubernetes versions (oldest and newest we support).
KUBE_VERSIONS = ("1.30", "1.37")
TIMEOUT = 120

PathLike = str | os.PathLike


class ToolError(RuntimeError):
    """A tool is missing or failed; the message carries its output."""


class HelmError(ToolError):
    """`helm template` or `helm lint` failed; `messages` holds Helm's findings."""

    def __init__(self, message: str, messages: Sequence[str] = ()):
        super().__init__(message)
        self.messages = list(messages)


class ComposeError(ToolError):
    """Docker Compose refused the file."""


# ---------------------------------------------------------------------------------------------
# Tools


def tool(name: str) -> str:
    """The path of an installed tool: the project venv's bin/, this Python's bin/, then PATH."""
    for bindir in (ROOT / ".venv" / "bin", Path(sys.prefix) / "bin"):
        candidate = bindir / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise ToolError(f"{name} is not installed: run {INSTALL}")


def _run(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
         cwd: PathLike | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT,
                              env=dict(env) if env is not None else None, cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{argv[0]} took over {TIMEOUT}s: {' '.join(argv)}") from exc


@functools.cache
def _scratch() -> Path:
    """A private directory for this process (Helm's config/cache/data, values files)."""
    path = Path(tempfile.mkdtemp(prefix="k8s-tools-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _helm_env() -> dict[str, str]:
    home = _scratch() / "helm"
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    return env


def parse_yaml_stream(text: str) -> list[dict]:
    """The documents of a YAML stream, empty ones dropped."""
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def load_manifests(path: PathLike) -> list[dict]:
    """The objects in a YAML file, or in every *.yaml/*.yml file of a directory (sorted)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    docs: list[dict] = []
    for file in files:
        docs.extend(parse_yaml_stream(file.read_text()))
    return docs


# ---------------------------------------------------------------------------------------------
# Helm and kustomize


def _helm_value_args(values_files: Iterable[PathLike], values: Mapping[str, Any] | None) -> list[str]:
    args: list[str] = []
    for file in values_files:
        args += ["--values", str(file)]
    if values:
        fd, name = tempfile.mkstemp(suffix=".json", dir=_scratch())
        with os.fdopen(fd, "w") as out:
            json.dump(values, out)  # JSON is YAML: Helm reads it as a values file
        args += ["--values", name]
    return args


def helm_template(chart_dir: PathLike, values_files: Iterable[PathLike] = (), release: str = "jairouter",
                  namespace: str = "jairouter", *, values: Mapping[str, Any] | None = None,
                  api_versions: Iterable[str] = (), kube_version: str | None = None,
                  skip_tests: bool = False) -> list[dict]:
    """The objects `helm template` renders, parsed.

    values (a dict) is applied after values_files, like a last `-f`. api_versions become
    `--api-versions` (what `.Capabilities.APIVersions.Has` sees, e.g. "monitoring.coreos.com/v1");
    kube_version becomes `--kube-version`. Raises HelmError when Helm fails (template errors,
    values.schema.json violations, unparsable output).
    """
    argv = [tool("helm"), "template", release, str(chart_dir), "--namespace", namespace]
    argv += _helm_value_args(values_files, values)
    for api in api_versions:
        argv += ["--api-versions", api]
    if kube_version:
        argv += ["--kube-version", kube_version]
    if skip_tests:
        argv.append("--skip-tests")
    proc = _run(argv, env=_helm_env())
    if proc.returncode != 0:
        raise HelmError(f"helm template {chart_dir} failed:\n{proc.stderr.strip()}",
                        [line for line in proc.stderr.splitlines() if line.strip()])
    try:
        return parse_yaml_stream(proc.stdout)
    except yaml.YAMLError as exc:
        raise HelmError(f"helm template {chart_dir} rendered invalid YAML: {exc}") from exc


def helm_lint(chart_dir: PathLike, values_files: Iterable[PathLike] = (), *,
              values: Mapping[str, Any] | None = None, strict: bool = False,
              namespace: str = "jairouter", kube_version: str | None = None) -> list[str]:
    """Helm's lint findings ("[INFO] ...", "[WARNING] ...", "[ERROR] ..." lines).

    Raises HelmError (with .messages) when the chart fails: any [ERROR], or any [WARNING] with
    strict=True (`helm lint --strict`).
    """
    argv = [tool("helm"), "lint", str(chart_dir), "--namespace", namespace]
    argv += _helm_value_args(values_files, values)
    if strict:
        argv.append("--strict")
    if kube_version:
        argv += ["--kube-version", kube_version]
    proc = _run(argv, env=_helm_env())
    messages = [line.strip() for line in proc.stdout.splitlines() if line.lstrip().startswith("[")]
    if proc.returncode != 0:
        detail = "\n".join(messages + [line for line in proc.stderr.splitlines() if line.strip()])
        raise HelmError(f"helm lint {chart_dir} failed:\n{detail}", messages)
    return messages


def kustomize(directory: PathLike) -> list[dict]:
    """The objects `kubectl kustomize DIR` renders, parsed."""
    proc = _run([tool("kubectl"), "kustomize", str(directory)])
    if proc.returncode != 0:
        raise ToolError(f"kubectl kustomize {directory} failed:\n{proc.stderr.strip()}")
    return parse_yaml_stream(proc.stdout)


# ---------------------------------------------------------------------------------------------
# Docker Compose


def compose_config(path: PathLike, *, project_name: str | None = None,
                   env: Mapping[str, str] | None = None) -> dict:
    """The compose file as Docker Compose v2 loads it (validated, interpolated, normalised).

    env adds variables for interpolation (over os.environ). Raises ComposeError with Compose's
    message when the file does not load (schema violations, bad interpolation, missing files).
    """
    path = Path(path).resolve()
    argv = [tool("docker-compose"), "--file", str(path)]
    if project_name:
        argv += ["--project-name", project_name]
    argv += ["config", "--format", "json"]
    proc = _run(argv, env={**os.environ, **(env or {})}, cwd=path.parent)
    if proc.returncode != 0:
        raise ComposeError(f"docker-compose config {path} failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# Validation


def _split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def _describe(doc: Any, index: int) -> str:
    if not isinstance(doc, dict):
        return f"document {index}"
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name") or meta.get("generateName") or "?"
    namespace = f"{meta['namespace']}/" if isinstance(meta.get("namespace"), str) else ""
    return f"{doc.get('kind', '?')} {namespace}{name} ({doc.get('apiVersion', '?')})"


def _format_error(error: Any) -> str:
    from jsonschema.exceptions import best_match

    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    message = error.message
    if error.context:
        deepest = best_match(error.context)
        inner = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in deepest.absolute_path)
        message = f"{message} — e.g. {inner.lstrip('.') or '(object)'}: {deepest.message}"
    if len(message) > 400:
        message = message[:400] + "…"
    return f"{where or '(object)'}: {message}"


# Formats checked (the others are left alone): IP addresses, base64, and integer widths.
def _format_checker() -> Any:
    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())

    def ip(version: int):
        def check(value: Any) -> bool:
            if not isinstance(value, str):
                return True
            try:
                return ipaddress.ip_address(value).version == version
            except ValueError:
                return False
        return check

    def width(bits: int):
        def check(value: Any) -> bool:
            return not isinstance(value, int) or isinstance(value, bool) or \
                -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)
        return check

    def byte(value: Any) -> bool:
        if not isinstance(value, str):
            return True
        try:
            base64.b64decode(value, validate=True)
            return True
        except (binascii.Error, ValueError):
            return False

    checker.checks("ipv4")(ip(4))
    checker.checks("ipv6")(ip(6))
    checker.checks("int32")(width(32))
    checker.checks("int64")(width(64))
    checker.checks("byte")(byte)
    return checker


# --- core kinds: kubernetes-validate's strict schemas ------------------------------------------


@functools.cache
def _core_dir(kube_version: str) -> Any:
    base = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    directory = base / f"v{kube_version}.0-local-strict"
    if not directory.is_dir():
        known = sorted(p.name for p in base.iterdir() if p.name.endswith("-local-strict"))
        raise ToolError(f"kubernetes-validate has no schemas for Kubernetes {kube_version} (has {known})")
    return directory


@functools.cache
def _core_registry(kube_version: str) -> Any:
    from referencing import Registry, Resource

    definitions = json.loads((_core_dir(kube_version) / "_definitions.json").read_text())
    return Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))


@functools.cache
def _core_validator(kube_version: str, api_version: str, kind: str) -> Any | None:
    """A validator for a core kind in one Kubernetes version, or None when that version lacks it."""
    from jsonschema import Draft202012Validator

    group, version = _split_api_version(api_version)
    # kubernetes-validate's file names: KIND-GROUPPREFIX-VERSION.json (rbac.authorization.k8s.io/v1
    # -> rbac-v1); the x-kubernetes-group-version-kind inside tells the full group apart.
    short = f"{group.split('.')[0]}-{version}" if group else version
    file = _core_dir(kube_version) / f"{kind.lower()}-{short}.json"
    if not file.is_file():
        return None
    schema = json.loads(file.read_text())
    gvks = schema.get("x-kubernetes-group-version-kind") or []
    if not any(g.get("group", "") == group and g.get("version") == version and g.get("kind") == kind
               for g in gvks):
        return None
    return Draft202012Validator(schema, registry=_core_registry(kube_version),
                                format_checker=_format_checker())


@functools.cache
def _object_meta_validator() -> Any:
    """ObjectMeta (strict) of the newest Kubernetes version, for custom resources' metadata."""
    from jsonschema import Draft202012Validator

    version = KUBE_VERSIONS[-1]
    schema = {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/"
                      "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return Draft202012Validator(schema, registry=_core_registry(version))


# --- custom resources: the CRDs' openAPIV3Schema, strict where the API server prunes ---------


# What the API server accepts at the root of any object (and of an embedded resource), listed or
# not; metadata is checked against ObjectMeta separately.
_IMPLICIT_ROOT = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                  "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}


def _strict(node: Any) -> Any:
    """A CRD structural schema made strict, as `kubectl apply`'s strict field validation is: an
    object schema without `additionalProperties` rejects the fields it does not list (the fields
    the API server would prune) unless it says `x-kubernetes-preserve-unknown-fields: true`.
    `nullable: true` admits null. Junctors (allOf/anyOf/oneOf/not) only carry value validations in
    structural schemas: left as they are.
    """
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in ("properties", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _strict(sub) for name, sub in out[key].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    elif isinstance(out.get("items"), list):
        out["items"] = [_strict(sub) for sub in out["items"]]
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if out.get("x-kubernetes-embedded-resource") is True:
        out["properties"] = {**_IMPLICIT_ROOT, **out.get("properties", {})}
    if ((out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out
            and out.get("x-kubernetes-preserve-unknown-fields") is not True):
        out["additionalProperties"] = False  # an object that lists no fields accepts none
    if out.get("x-kubernetes-int-or-string") is True and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") is True:
        if isinstance(out.get("type"), str) and not any(k in out for k in ("allOf", "anyOf", "oneOf", "not")):
            out["type"] = [out["type"], "null"]
            if isinstance(out.get("enum"), list) and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [{"type": "null"}, {k: v for k, v in out.items() if k != "nullable"}]}
    return out


@functools.cache
def crd_kinds() -> dict[tuple[str, str], Path]:
    """(apiVersion, kind) -> schema file, for every CRD schema in k8s/schemas/GROUP/Kind_VERSION.json."""
    kinds: dict[tuple[str, str], Path] = {}
    for file in sorted(SCHEMAS.glob("*/*.json")):
        kind, _, version = file.stem.rpartition("_")
        kinds[(f"{file.parent.name}/{version}", kind)] = file
    return kinds


@functools.cache
def _crd_validator(api_version: str, kind: str) -> Any | None:
    from jsonschema import Draft4Validator  # OpenAPI 3.0 schemas: draft-4 semantics

    file = crd_kinds().get((api_version, kind))
    if file is None:
        return None
    schema = json.loads(file.read_text())
    schema["properties"] = {**schema.get("properties", {}), **_IMPLICIT_ROOT}
    return Draft4Validator(_strict(schema), format_checker=_format_checker())


# --- our own checks: names, labels, duplicates -------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_RBAC_KINDS = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


def _name_problem(kind: str, name: str) -> str | None:
    if kind in _RBAC_KINDS:  # path segment names
        if name in (".", "..") or "/" in name or "%" in name:
            return f"metadata.name {name!r} is not a valid path segment"
        return None
    if kind == "Service":
        ok, what = len(name) <= 63 and _DNS_1035.fullmatch(name), "a DNS-1035 label"
    elif kind == "Namespace":
        ok, what = len(name) <= 63 and _DNS_LABEL.fullmatch(name), "a DNS-1123 label"
    else:
        ok, what = len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name), "a DNS-1123 subdomain"
    return None if ok else f"metadata.name {name!r} is not {what}"


def _label_problems(labels: Any) -> list[str]:
    problems = []
    if not isinstance(labels, dict):
        return problems  # the schema reports the type
    for key, value in labels.items():
        prefix, _, name = str(key).rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))) \
                or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
            problems.append(f"metadata.labels: {key!r} is not a valid label key")
        if isinstance(value, str) and value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
            problems.append(f"metadata.labels.{key}: {value!r} is not a valid label value")
    return problems


def _metadata_problems(doc: dict) -> list[str]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: missing or not an object"]
    problems = []
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        problems.append("metadata.name: missing")
    elif isinstance(name, str) and name:
        problem = _name_problem(str(doc.get("kind")), name)
        if problem:
            problems.append(problem)
    namespace = meta.get("namespace")
    if isinstance(namespace, str) and not (len(namespace) <= 63 and _DNS_LABEL.fullmatch(namespace)):
        problems.append(f"metadata.namespace {namespace!r} is not a DNS-1123 label")
    problems += _label_problems(meta.get("labels"))
    return problems


def validate(docs: Iterable[Any], kube_versions: Sequence[str] = KUBE_VERSIONS) -> list[str]:
    """Problems with the objects, one line each ("Kind ns/name (apiVersion): path: message");
    empty when every object is valid.

    Core kinds: kubernetes-validate's strict schemas for each of kube_versions (a problem that
    shows in only some versions is tagged with them; a kind missing from a version is a problem).
    Custom resources: the CRD schemas in k8s/schemas/, strict (see _strict), metadata against
    Kubernetes' ObjectMeta. Any other apiVersion/kind is a problem. Also: metadata.name present and
    well formed, label keys/values well formed, no two objects with the same kind/namespace/name.
    """
    problems: list[str] = []
    seen: dict[tuple, str] = {}
    for index, doc in enumerate(docs):
        what = _describe(doc, index)
        if not isinstance(doc, dict):
            problems.append(f"{what}: not an object ({type(doc).__name__})")
            continue
        api_version, kind = doc.get("apiVersion"), doc.get("kind")
        if not isinstance(api_version, str) or not api_version or not isinstance(kind, str) or not kind:
            problems.append(f"{what}: apiVersion and kind must be non-empty strings")
            continue
        found: list[str] = []
        crd = _crd_validator(api_version, kind)
        if crd is not None:
            found += [_format_error(e) for e in crd.iter_errors(doc)]
            if isinstance(doc.get("metadata"), dict):
                found += [f"metadata.{_format_error(e)}".replace("metadata.(object)", "metadata")
                          for e in _object_meta_validator().iter_errors(doc["metadata"])]
        else:
            per_version = {v: _core_validator(v, api_version, kind) for v in kube_versions}
            missing = [v for v, validator in per_version.items() if validator is None]
            if len(missing) == len(per_version):
                problems.append(
                    f"{what}: unknown apiVersion/kind: not a Kubernetes {'/'.join(kube_versions)} "
                    f"kind and no CRD schema k8s/schemas/{_split_api_version(api_version)[0] or 'core'}/"
                    f"{kind}_{_split_api_version(api_version)[1]}.json")
                continue
            if missing:
                found.append(f"(object): {api_version} {kind} is not served by Kubernetes {', '.join(missing)}")
            errors: dict[str, list[str]] = {}
            for version, validator in per_version.items():
                if validator is not None:
                    for error in validator.iter_errors(doc):
                        errors.setdefault(_format_error(error), []).append(version)
            present = [v for v in kube_versions if per_version[v] is not None]
            for message, versions in errors.items():
                found.append(message if versions == present else f"{message} [Kubernetes {', '.join(versions)}]")
        found += _metadata_problems(doc)
        problems += [f"{what}: {p}" for p in found]
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        if meta.get("name"):
            key = (_split_api_version(api_version)[0], kind, meta.get("namespace"), meta.get("name"))
            if key in seen:
                problems.append(f"{what}: duplicate of document {seen[key]}")
            else:
                seen[key] = str(index)
    return problems
