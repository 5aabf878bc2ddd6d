"""./build.sh bench: what the filter costs, beside plain Envoy, Envoy doing the same jobs, LiteLLM and Portkey, in one run.

Variants, all in front of the same fast backend (jairouter-bench-backend) on loopback:
  direct    the backend alone (the floor)
  envoy     Envoy routing to it with no wasm filter (the physical limit of a proxy here)
  wasm-noop Envoy with a proxy-wasm filter that does nothing (what any wasm filter costs)
  envoy-same-jobs  our rendered bootstrap (the route's retry policy, the JSON access log, the
            same buffering) with the probe filter in place of ours, holding the headers and
            reading the body (`pause`), then continuing to the same backend: Envoy doing our
            bootstrap's jobs without our filter's logic. Our filter's own cost is the
            difference to it.
  jairouter Envoy with our filter and the day's features on: routing by the body's model,
            round-robin over two instances, request and token limits that never fire,
            circuit breakers, retries, metrics, the access log, an API key (with quotas that
            never fire) on every request
  jairouter-no-keys  the same without API keys
  jairouter-lean  the lean profile: the same with the access log (`--access-log none`) and
            retries (`model.retries: 0`) off
  litellm   LiteLLM's proxy routing the same model to the same backend (production settings:
            one worker, no verbose logging), when it can be installed
  portkey   Portkey's open-source gateway (Node, one process) routing to the same backend as
            an OpenAI custom host, when it can be installed

Pinned by default (`--no-pin` to turn it off): every proxy on CPU 0, wrk and the backend on
CPU 1 (`taskset -c`), so that rounds vary less.

Each workload runs for every variant in turn, round after round, so machine drift hits all
alike. Figures: requests/s and p50/p99 latency from wrk; proxy CPU per request from the proxy
process's own accounting (/proc/PID/stat); peak resident memory (VmHWM). Ratios are to `envoy`
measured in the same round; min/median/max over rounds. Writes the performance table of docs/performance.md,
docs/bench-results/{results.json,chart.svg}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENVOY = ROOT / ".venv" / "bin" / "envoy"
RENDER = ROOT / "target" / "release" / "jairouter-render"
WASM = ROOT / "target" / "wasm32-unknown-unknown" / "release" / "jairouter_filter.wasm"
BACKEND = ROOT / "target" / "release" / "jairouter-bench-backend"
PROBE_WASM = ROOT / "target" / "probe" / "wasm32-unknown-unknown" / "release" / "examples" / "hostcall_probe.wasm"
# The length of our access-log summary on the 1 KB chat request with the demo feature set.
SUMMARY_BYTES = 126
LITELLM = ROOT / ".bench-venv" / "bin" / "litellm"
PORTKEY = ROOT / ".bench-node" / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
OUT = ROOT / "docs" / "bench-results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "bench"
# What the bench backend answers; every variant must pass it on (checked before measuring).
BACKEND_REPLY = "Hello from the bench backend."
# CPUs for `taskset -c`: the proxies on one, the load generator and the backend on the other.
# None when not pinned (`--no-pin`).
PIN: dict[str, str] | None = {"proxy": "0", "load": "1"}


def pinned(command: list[str], role: str) -> list[str]:
    """`command` on the CPU of `role` ("proxy" or "load"), or as it is when not pinning."""
    return ["taskset", "-c", PIN[role], *command] if PIN else command


def start_backend() -> tuple[subprocess.Popen, int]:
    """The bench backend (on the load generator's CPU) and its port."""
    backend = subprocess.Popen(pinned([str(BACKEND)], "load"), stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    return backend, int(backend.stdout.readline().split()[1])

WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local chunks = os.getenv("BENCH_CHUNKS")
if chunks then
  wrk.headers["x-chunks"] = chunks
  wrk.headers["x-chunk-gap-ms"] = "0"
end
local extra = os.getenv("BENCH_HEADERS")
if extra then
  for name, value in string.gmatch(extra, "([^:\\n]+): ([^\\n]*)") do wrk.headers[name] = value end
end
local model = os.getenv("BENCH_MODEL_HEADER")
if model then wrk.headers["x-jairouter-model"] = model end
"""


def chat_body(prompt_bytes: int, model_first: bool = False, stream: bool = False) -> bytes:
    """An OpenAI chat body of about `prompt_bytes`; the SDKs put `messages` before `model`."""
    content = "x" * max(0, prompt_bytes - 80)
    parts = [f'"messages":[{{"role":"user","content":"{content}"}}]', f'"model":"{MODEL}"']
    if model_first:
        parts.reverse()
    if stream:
        parts.append('"stream":true')
    return ("{" + ",".join(parts) + "}").encode()


@dataclass
class Workload:
    name: str
    path: str
    body: bytes
    connections: int = 16
    chunks: int | None = None


WORKLOADS = [
    Workload("chat 1 KB", "/v1/chat/completions", chat_body(1024)),
    Workload("prompt 64 KB", "/v1/chat/completions", chat_body(64 * 1024)),
    Workload("prompt 4 MB, model first", "/v1/chat/completions", chat_body(4 * 1024 * 1024, model_first=True), 4),
    Workload("embeddings", "/v1/embeddings", json.dumps({"model": MODEL, "input": "hello world"}).encode()),
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (LiteLLM's worker runs in a child)."""
    pids = [pid]
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            for child in children.read_text().split():
                pids += process_tree(int(child))
        except FileNotFoundError:
            pass
    return pids


def cpu_of_tree(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid) if Path(f"/proc/{p}").exists())


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_tree(pid: int) -> int:
    return sum(peak_rss(p) for p in process_tree(pid) if Path(f"/proc/{p}").exists())


class Variant:
    name = ""
    pid = 0
    url = ""
    # Request headers the variant needs (LiteLLM's master key, Portkey's provider and host).
    headers: dict[str, str] = {}
    # Answers carry `x-jairouter-instance` (our filter).
    instance_header = False

    def start(self, backend_port: int, workdir: Path) -> None: ...

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    proc: subprocess.Popen | None = None

    def wait_ready(self, probe: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.post(self.url + probe, content=chat_body(200),
                               headers={"content-type": "application/json", **self.headers}, timeout=5)
                if r.status_code == 200:
                    self.check_answers()
                    return
            except httpx.HTTPError:
                pass
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited")
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready")

    def check_answers(self) -> None:
        """Before measuring: a chat, an embeddings and a streamed request through the variant get
        the backend's answers (from our filter, naming an instance of the right service), so that
        no variant is timed answering errors fast."""
        headers = {"content-type": "application/json", **self.headers}
        with httpx.Client(timeout=30) as c:
            chat = c.post(self.url + "/v1/chat/completions", content=chat_body(200), headers=headers)
            embed = c.post(self.url + "/v1/embeddings", content=json.dumps({"model": MODEL, "input": "hi"}).encode(),
                           headers=headers)
            stream = c.post(self.url + "/v1/chat/completions", content=chat_body(200, stream=True),
                            headers={**headers, "x-chunks": "3", "x-chunk-gap-ms": "0"})
        problems = []
        if chat.status_code != 200 or chat.json()["choices"][0]["message"]["content"] != BACKEND_REPLY:
            problems.append(f"chat: {chat.status_code} {chat.text[:200]}")
        if embed.status_code != 200 or not embed.json().get("data", [{}])[0].get("embedding"):
            problems.append(f"embeddings: {embed.status_code} {embed.text[:200]}")
        if stream.status_code != 200 or "tok2" not in stream.text or "[DONE]" not in stream.text:
            problems.append(f"stream: {stream.status_code} {stream.text[:200]}")
        if self.instance_header:
            for what, r, service in (("chat", chat, "chat"), ("embeddings", embed, "embedding"), ("stream", stream, "chat")):
                if r.headers.get("x-jairouter-instance") not in (f"{service}-0", f"{service}-1"):
                    problems.append(f"{what}: x-jairouter-instance {r.headers.get('x-jairouter-instance')!r}")
        if problems:
            raise RuntimeError(f"{self.name} does not answer as the backend: " + "; ".join(problems))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Direct(Variant):
    name = "direct"

    def __init__(self, backend: subprocess.Popen, port: int):
        self.backend, self.port = backend, port

    def start(self, backend_port, workdir):
        self.pid = self.backend.pid
        self.url = f"http://127.0.0.1:{backend_port}"
        self.check_answers()

    def stop(self):
        pass


class PlainEnvoy(Variant):
    name = "envoy"

    # Filters in front of the router (none for plain Envoy).
    extra_filters: list[dict] = []

    def start(self, backend_port, workdir):
        port, admin = free_port(), free_port()
        router = {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
        bootstrap = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [{"name": "plain", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                               "per_connection_buffer_limit_bytes": 12 * 1024 * 1024,
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                   "typed_config": {
                                       "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                       "stat_prefix": "plain", "use_remote_address": True,
                                       "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                                           {"match": {"prefix": "/"}, "route": {"cluster": "backend", "timeout": "0s"}}]}]},
                                       "http_filters": [*self.extra_filters, router]}}]}]}],
                "clusters": [{"name": "backend", "type": "STATIC", "connect_timeout": "5s",
                              "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [
                                  {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend_port}}}}]}]}}]}}
        path = workdir / f"{self.name}.json"
        path.write_text(json.dumps(bootstrap))
        self.launch(path, port, admin, workdir)

    def launch(self, bootstrap: Path, port: int, admin: int, workdir: Path):
        self.admin = f"http://127.0.0.1:{admin}"
        log = open(workdir / f"{self.name}.log", "w")
        self.proc = subprocess.Popen(pinned([str(ENVOY), "-c", str(bootstrap), "--concurrency", "1", "--use-dynamic-base-id",
                                             "--log-level", "warn"], "proxy"),
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{port}"
        self.wait_ready("/v1/chat/completions")


class NoopWasm(PlainEnvoy):
    name = "wasm-noop"
    extra_filters = [{"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": "noop", "root_id": "noop", "vm_config": {
            "vm_id": "noop", "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": str(PROBE_WASM)}}}}}}]


class JAiRouter(PlainEnvoy):
    name = "jairouter"
    api_keys = True
    instance_header = True
    # Renderer flags beyond the addresses (the lean profile turns the access log off).
    render_flags: list[str] = []
    # The filter it runs (`--baseline-wasm` adds the same gateway with an earlier build).
    wasm: Path = WASM

    def configuration(self, backend_port: int) -> dict:
        instance = lambda i: {"name": MODEL, "base-url": f"http://127.0.0.1:{backend_port}"}
        never = {"enabled": True, "capacity": 1_000_000_000, "rate": 1_000_000_000, "scope": "model"}
        config = {"model": {
            "load-balance": {"type": "round-robin"},
            "rate-limit": never,
            "token-limit": {"tokens-per-minute": 1_000_000_000_000, "scope": "model"},
            "circuit-breaker": {"failure-threshold": 5, "timeout": 60000},
            "services": {
                "chat": {"instances": [instance(0), instance(1)]},
                "embedding": {"instances": [instance(0), instance(1)]},
            }}}
        if self.api_keys:
            self.add_api_key(config)
        return config

    def start(self, backend_port, workdir):
        port, admin = free_port(), free_port()
        app = workdir / f"{self.name}.yml"
        app.write_text(yaml.safe_dump(self.configuration(backend_port)))
        path = workdir / f"{self.name}.json"
        subprocess.run([str(RENDER), "bootstrap", str(app), "--wasm", str(self.wasm), "--port", str(port),
                        "--listen-address", "127.0.0.1", "--admin-port", str(admin), "--status-port", "none",
                        *self.render_flags, "--out", str(path)], check=True)
        self.adapt(path)
        self.launch(path, port, admin, workdir)

    def adapt(self, bootstrap: Path) -> None:
        """Changes to the rendered bootstrap before Envoy starts (none: our gateway as users run it)."""

    def add_api_key(self, config: dict, key: str | None = None) -> None:
        """API keys on, as a production gateway runs: one key whose quotas never fire."""
        key = key or "sk-bench-" + os.urandom(16).hex()
        key_hash = subprocess.run([str(RENDER), "hash-key"], input=key, capture_output=True, text=True,
                                  check=True).stdout.strip()
        config["jairouter"] = {"security": {"api-key": {"keys": [{
            "key-id": "bench", "key-hash": key_hash, "permissions": ["admin"],
            "rate-limit-per-minute": 1_000_000_000_000, "tokens-per-minute": 1_000_000_000_000}]}}}
        self.headers = {"authorization": f"Bearer {key}"}

    def vm_memory(self) -> dict[str, int]:
        text = httpx.get(self.admin + "/stats/prometheus", timeout=10).text
        return {m.group(1): int(m.group(2)) for m in re.finditer(r'jairouter_vm_memory_bytes\{vm="([^"]+)"\} (\d+)', text)}


class JAiRouterBaseline(JAiRouter):
    """The same gateway with an earlier build of the filter (`--baseline-wasm`): a change's
    cost measured against what it changed, paired in the same run."""
    name = "jairouter-baseline"

    def __init__(self, wasm: Path):
        super().__init__()
        self.wasm = wasm


class JAiRouterWithoutKeys(JAiRouter):
    """The same without API keys: what authentication and per-key quotas cost, in the same run."""
    name = "jairouter-no-keys"
    api_keys = False


class JAiRouterLean(JAiRouter):
    """The lean profile: the demo feature set with the access log and retries off."""
    name = "jairouter-lean"
    render_flags = ["--access-log", "none"]

    def configuration(self, backend_port):
        config = super().configuration(backend_port)
        config["model"]["retries"] = 0
        return config


class EnvoySameJobs(JAiRouter):
    """Envoy doing our bootstrap's jobs without our filter's logic: the bootstrap rendered for the
    gateway (the route's retry policy and body buffer, the JSON access log, the listener's
    buffer limit, the same clusters), with the probe filter in place of ours holding the headers
    and reading the body (`pause`, as ours does to find the model), then continuing, and the
    route sent straight to the first chat instance's cluster instead of the one our filter names."""
    name = "envoy-same-jobs"
    api_keys = False
    instance_header = False
    probe_steps = "pause"
    # The route straight to the first chat instance's cluster (no header names it).
    fixed_route = True

    def adapt(self, bootstrap):
        config = json.loads(bootstrap.read_text())
        if config.get("bootstrap_extensions"):
            raise RuntimeError("envoy-same-jobs: the rendered bootstrap runs a wasm service; replace it too")
        (listener,) = config["static_resources"]["listeners"]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        (wasm,) = [f["typed_config"]["config"] for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
        wasm.update({"name": "probe", "root_id": "probe",
                     "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                       "value": self.probe_steps}})
        wasm["vm_config"].update({"vm_id": "probe", "code": {"local": {"filename": str(PROBE_WASM)}}})
        if not wasm.get("allow_on_headers_stop_iteration"):
            raise RuntimeError("envoy-same-jobs: the rendered filter no longer sets allow_on_headers_stop_iteration")
        (host,) = hcm["route_config"]["virtual_hosts"]
        routed = host["routes"][0]
        if "retry_policy" not in routed["route"] or not hcm.get("access_log"):
            raise RuntimeError("envoy-same-jobs: the rendered route has no retry policy or no access log")
        if self.fixed_route:
            routed["match"].pop("headers")
            routed["route"].pop("cluster_header")
            routed["route"]["cluster"] = "jairouter-chat-0"
            host["routes"] = [routed]
        bootstrap.write_text(json.dumps(config))


class EnvoySameJobsLookahead(EnvoySameJobs):
    """envoy-same-jobs whose probe also holds the body until 64 KB past the first 16 KB window
    are buffered, reading them 16 KB at a time: the body handling of ours looking past a model
    for `max_tokens`, without the scanning (`./build.sh bench profile` splits a large prompt's
    cost with it)."""
    name = "envoy-same-jobs-lookahead"
    probe_steps = "pause,lookahead:4"


class EnvoyAskedJobs(EnvoySameJobs):
    """envoy-same-jobs whose probe also asks of Envoy what ours does, without our logic: the route
    chosen by `x-jairouter-cluster` as rendered (the route re-selected once the header is set),
    the response head read in one call and written back with our demo shape's 7 headers
    (`x-ratelimit-*` of two limits and `x-jairouter-instance`) in one, and an access-log summary
    of our size in filter state. Not a baseline of the table: `./build.sh bench profile` splits
    the rest of Envoy's cost with it."""
    name = "envoy-asked-jobs"
    probe_steps = f"pause,route,reply-map:7,summary:{SUMMARY_BYTES}"
    fixed_route = False


class EnvoyAskedJobsAdding(EnvoyAskedJobs):
    """envoy-asked-jobs adding the 7 response headers with one call each instead of writing the
    head back whole: which way of adding them costs Envoy less."""
    name = "envoy-asked-jobs-adding"
    probe_steps = f"pause,route,reply-header:7,summary:{SUMMARY_BYTES}"


class EnvoyAskedJobsWithoutHeaders(EnvoyAskedJobs):
    """envoy-asked-jobs without the response headers: what adding them costs at all."""
    name = "envoy-asked-jobs-no-headers"
    probe_steps = f"pause,route,summary:{SUMMARY_BYTES}"


class EnvoyAskedJobsTouching(EnvoyAskedJobs):
    """envoy-asked-jobs whose probe also writes `touch_kib` KiB of its memory each request (a cache
    line at a time): whether a filter's footprint, without its logic, makes Envoy's own work
    dearer (`./build.sh bench profile --variants envoy-asked-jobs,envoy-asked-jobs-touching-256`)."""

    def __init__(self, touch_kib: int = 256):
        super().__init__()
        self.name = f"envoy-asked-jobs-touching-{touch_kib}"
        self.probe_steps = f"{EnvoyAskedJobs.probe_steps},touch:{touch_kib}"


class LiteLLM(Variant):
    name = "litellm"
    key = "sk-bench-" + os.urandom(16).hex()

    def start(self, backend_port, workdir):
        port = free_port()
        config = {
            "model_list": [{"model_name": MODEL, "litellm_params": {
                "model": f"openai/{MODEL}", "api_base": f"http://127.0.0.1:{backend_port}/v1", "api_key": "unused"}}],
            "litellm_settings": {"set_verbose": False, "request_timeout": 600, "drop_params": True},
            # Production: a master key (LiteLLM refuses to start without one), no database here.
            "general_settings": {"master_key": self.key},
        }
        self.headers = {"authorization": f"Bearer {self.key}"}
        path = workdir / "litellm.yaml"
        path.write_text(yaml.safe_dump(config))
        log = open(workdir / "litellm.log", "w")
        env = dict(os.environ, LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False")
        self.proc = subprocess.Popen(pinned([str(LITELLM), "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
                                             "--num_workers", "1"], "proxy"), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{port}"
        self.wait_ready("/v1/chat/completions", timeout=180)


class Portkey(Variant):
    """Portkey's open-source gateway (one Node process), sending OpenAI requests to the backend as
    a custom host, as its docs route to a self-hosted model: no config file, two request headers."""
    name = "portkey"

    def start(self, backend_port, workdir):
        port = free_port()
        self.headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": f"http://127.0.0.1:{backend_port}/v1"}
        log = open(workdir / "portkey.log", "w")
        # Production: no console UI, no development logging.
        env = dict(os.environ, NODE_ENV="production")
        self.proc = subprocess.Popen(pinned(["node", str(PORTKEY), f"--port={port}", "--headless"], "proxy"),
                                     stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pid = self.proc.pid
        self.url = f"http://127.0.0.1:{port}"
        self.wait_ready("/v1/chat/completions", timeout=60)


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    requests: int
    errors: int


def parse_duration_ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


def run_wrk(variant: Variant, workload: Workload, seconds: float, workdir: Path) -> Run:
    body_path = workdir / "body.json"
    body_path.write_bytes(workload.body)
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    env = dict(os.environ, BENCH_BODY=str(body_path))
    if workload.chunks:
        env["BENCH_CHUNKS"] = str(workload.chunks)
    if variant.headers:
        env["BENCH_HEADERS"] = "\n".join(f"{name}: {value}" for name, value in variant.headers.items())
    before = cpu_of_tree(variant.pid)
    out = subprocess.run(pinned(["wrk", "-t1", f"-c{workload.connections}", f"-d{int(seconds)}s", "--latency", "-s", str(script),
                                 variant.url + workload.path], "load"),
                         capture_output=True, text=True, env=env, timeout=seconds + 60)
    cpu = cpu_of_tree(variant.pid) - before
    text = out.stdout
    if not re.search(r"(\d+) requests in", text):
        raise RuntimeError(f"wrk failed against {variant.name}: {out.stdout}\n{out.stderr}")
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        errors += sum(int(x) for x in m.groups())
    p50 = parse_duration_ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))
    p99 = parse_duration_ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    return Run(rps, p50, p99, cpu / max(1, requests) * 1e6, requests, errors)


def stream_timing(url: str, n: int, extra: dict[str, str], chunks: int = 10, gap_ms: int = 20) -> tuple[float, float]:
    """Median time to first byte (ms) and median deviation of the gaps from `gap_ms` (ms)."""
    body = chat_body(512, stream=True)
    ttfb, deviation = [], []
    with httpx.Client(timeout=30) as c:
        for _ in range(n):
            start = time.perf_counter()
            arrivals = []
            with c.stream("POST", url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json", "x-chunks": str(chunks),
                                   "x-chunk-gap-ms": str(gap_ms), **extra}) as r:
                for _chunk in r.iter_raw():
                    arrivals.append(time.perf_counter())
            ttfb.append((arrivals[0] - start) * 1000)
            gaps = [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:])]
            deviation.extend(abs(g - gap_ms) for g in gaps[: chunks - 1] if g > gap_ms / 2)
    return statistics.median(ttfb), statistics.median(deviation) if deviation else 0.0


def spread(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--soak", type=int, default=10_000, help="streamed and large requests for the VM memory check")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--no-portkey", action="store_true")
    parser.add_argument("--no-pin", action="store_true",
                        help="leave CPUs to the scheduler (default: proxies on CPU 0, wrk and the backend on CPU 1)")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/performance.md alone")
    parser.add_argument("--baseline-wasm", type=Path,
                        help="also run the demo gateway with this earlier filter build (paired comparison)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from results.json")
    args = parser.parse_args()
    if args.report_only:
        return report_only(args)

    global PIN
    cpus = sorted(os.sched_getaffinity(0))
    if args.no_pin:
        PIN = None
    elif len(cpus) < 2 or not shutil.which("taskset"):
        print("bench: fewer than 2 CPUs or no taskset here; not pinning", flush=True)
        PIN = None
    else:
        PIN = {"proxy": str(cpus[0]), "load": str(cpus[1])}
    workdir = Path(tempfile.mkdtemp(prefix="jairouter-bench-"))
    backend, backend_port = start_backend()
    variants: list[Variant] = [Direct(backend, backend_port), PlainEnvoy(), NoopWasm(), EnvoySameJobs(), JAiRouter(),
                               JAiRouterWithoutKeys(), JAiRouterLean()]
    if args.baseline_wasm:
        variants.insert(5, JAiRouterBaseline(args.baseline_wasm.resolve()))
    notes = []
    if not args.no_litellm and LITELLM.exists():
        variants.append(LiteLLM())
    elif not args.no_litellm:
        notes.append("LiteLLM could not be installed here; it has no rows.")
    if not args.no_portkey and PORTKEY.exists() and shutil.which("node"):
        variants.append(Portkey())
    elif not args.no_portkey:
        notes.append("Portkey's gateway could not be installed here; it has no rows.")
    peak: dict[str, int] = {}
    try:
        for v in list(variants):
            try:
                v.start(backend_port, workdir)
            except (RuntimeError, httpx.HTTPError, ValueError, KeyError) as e:
                # A peer that does not start or answers wrongly is left out; a variant of ours stops the run.
                if not isinstance(v, (LiteLLM, Portkey)):
                    raise
                v.stop()
                variants.remove(v)
                notes.append(f"{v.name} was left out: {e}")
                print(f"bench: {notes[-1]}", flush=True)
        results: dict[str, dict[str, list[Run]]] = {w.name: {v.name: [] for v in variants} for w in WORKLOADS}
        print(f"bench: {len(variants)} variants, {args.rounds} round(s) x {args.seconds:g}s per workload", flush=True)
        for round_no in range(args.rounds):
            for workload in WORKLOADS:
                order = variants[round_no % len(variants):] + variants[: round_no % len(variants)]
                for v in order:
                    run = run_wrk(v, workload, args.seconds, workdir)
                    results[workload.name][v.name].append(run)
                    print(f"  round {round_no + 1} {workload.name:<26} {v.name:<17} {run.rps:>9.0f} req/s "
                          f"p50 {run.p50_ms:.3f} ms p99 {run.p99_ms:.3f} ms cpu {run.cpu_us:.1f} us/req "
                          f"errors {run.errors}", flush=True)
        streaming = {v.name: stream_timing(v.url, 30, v.headers) for v in variants}
        for v in variants:
            peak[v.name] = peak_rss_tree(v.pid)
        ours = next(v for v in variants if v.name == "jairouter")
        vm_before = ours.vm_memory()
        soak = Workload("soak stream", "/v1/chat/completions", chat_body(512, stream=True), 8, 10)
        big = Workload("soak large", "/v1/chat/completions", chat_body(256 * 1024), 8)
        soak_runs = []
        for w in (soak, big):
            done = 0
            for _ in range(max(10, args.soak // 100)):  # bounded, should it ever stall
                if done >= args.soak:
                    break
                done += run_wrk(ours, w, 2, workdir).requests
            soak_runs.append(done)
        time.sleep(1.5)  # a tick reports each VM's memory
        vm_after = ours.vm_memory()
    finally:
        for v in variants:
            v.stop()
        os.killpg(backend.pid, signal.SIGTERM)

    args.pinned = PIN
    report = build_report(results, streaming, peak, vm_before, vm_after, soak_runs, variants, args, notes)
    print(report)
    OUT.mkdir(exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "results": {w: {v: [r.__dict__ for r in runs] for v, runs in per.items()} for w, per in results.items()},
        "streaming": streaming, "peak_rss": peak, "vm_memory_before": vm_before, "vm_memory_after": vm_after,
        "soak": soak_runs, "seconds": args.seconds, "pinned": args.pinned, "notes": notes,
    }, indent=1))
    (OUT / "chart.svg").write_text(chart(results, [v.name for v in variants]))
    if not args.no_docs:
        write_performance_doc(report)
    return 0


def report_only(args) -> int:
    saved = json.loads((OUT / "results.json").read_text())
    results = {w: {v: [Run(**r) for r in runs] for v, runs in per.items()} for w, per in saved["results"].items()}
    names = list(next(iter(results.values())).keys())
    variants = [type("V", (), {"name": n})() for n in names]
    streaming = {k: tuple(v) for k, v in saved["streaming"].items()}
    args.rounds = len(next(iter(results.values()))["envoy"])
    args.seconds = saved.get("seconds", 5)
    # Results from before pinning was recorded were not pinned.
    args.pinned = saved.get("pinned")
    report = build_report(results, streaming, saved["peak_rss"], saved["vm_memory_before"], saved["vm_memory_after"],
                          saved.get("soak", [0, 0]), variants, args, saved.get("notes", []), saved["date"], saved["machine"])
    if not args.no_docs:
        write_performance_doc(report)
    print(report)
    return 0


def write_performance_doc(report: str, section: str = "bench") -> None:
    """Replaces docs/performance.md's text between <!-- {section}:begin --> and <!-- {section}:end -->."""
    doc = ROOT / "docs" / "performance.md"
    text = doc.read_text()
    start, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    if start in text and end in text:
        text = text[: text.index(start) + len(start)] + "\n" + report + "\n" + text[text.index(end):]
        doc.write_text(text)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} vCPU ({cpu}), {platform.system()} {platform.release()}"


def paired(results, workload: str, variant: str, base: str, how) -> list[float]:
    """`how(run, base_run)` for each round in which both were measured."""
    per = results.get(workload, {})
    return [how(r, b) for r, b in zip(per.get(variant) or [], per.get(base) or [])]


def cpu_over(results, workload, variant, base) -> list[float]:
    return paired(results, workload, variant, base, lambda r, b: r.cpu_us - b.cpu_us)


# Our filter's own cost is its CPU over envoy-same-jobs (the lean profile does fewer jobs than that).
OVER_SAME_JOBS = ("jairouter", "jairouter-no-keys")


def build_report(results, streaming, peak, vm_before, vm_after, soak_runs, variants, args, notes,
                 date: str | None = None, where: str | None = None) -> str:
    names = [v.name for v in variants]
    pin = args.pinned
    how = (f"every proxy pinned to CPU {pin['proxy']}, wrk and the backend to CPU {pin['load']} (`taskset -c`)" if pin
           else "not pinned to CPUs")
    lines = [
        f"Measured {date or time.strftime('%Y-%m-%d')} on {where or machine()} with `./build.sh bench` "
        f"({args.rounds} round{'s' if args.rounds != 1 else ''} of {args.seconds:g} s per workload and variant, wrk with 1 thread; "
        "Envoy with one worker; LiteLLM with one worker; Portkey's gateway in one Node process; "
        f"{how}). Ratios are to plain Envoy in the same round, CPU differences paired by round: "
        "median (min–max). Targets compare each variant's median over rounds.",
        "",
        "| Workload | Variant | req/s | × Envoy req/s | p50 ms | p99 ms | proxy CPU µs/req | CPU over Envoy µs/req "
        "| CPU over envoy-same-jobs µs/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, per in results.items():
        base = per["envoy"]
        for name in names:
            runs = per.get(name)
            if not runs:
                continue
            ratio = [r.rps / b.rps for r, b in zip(runs, base)]
            over = cpu_over(results, workload, name, "envoy")
            own = cpu_over(results, workload, name, "envoy-same-jobs") if name in OVER_SAME_JOBS else []
            errors = sum(r.errors for r in runs)
            flag = f" ({errors} errors)" if errors else ""
            lines.append(
                f"| {workload} | {name}{flag} | {statistics.median([r.rps for r in runs]):.0f} | {spread(ratio)} | "
                f"{statistics.median([r.p50_ms for r in runs]):.3f} | {statistics.median([r.p99_ms for r in runs]):.3f} | "
                f"{statistics.median([r.cpu_us for r in runs]):.1f} | "
                f"{'–' if name in ('envoy', 'direct') else spread(over)} | {spread(own)} |")
    lines += breakdown(results)
    lines += ["", "| Variant | peak resident memory | streaming: time to first byte | streaming: gap deviation |",
              "|---|---|---|---|"]
    for name in names:
        if name not in streaming:
            continue
        ttfb, dev = streaming[name]
        lines.append(f"| {name} | {peak[name] / 2**20:.1f} MiB | {ttfb:.2f} ms | {dev:.2f} ms |")
    growth = {vm: vm_after.get(vm, 0) - vm_before.get(vm, 0) for vm in vm_before}
    lines += ["", f"Filter: {WASM.stat().st_size:,} bytes of wasm. Wasm VM linear memory after "
                  f"{soak_runs[0]:,} streamed responses and {soak_runs[1]:,} 256 KB requests (model last): "
                  + ", ".join(f"{vm_after.get(vm, 0) / 2**20:.2f} MiB (grew {g / 2**20:.2f})" for vm, g in growth.items())
                  + "."]
    for note in notes:
        lines += ["", note]
    lines += ["", "Targets:", ""] + [f"- {t}" for t in targets(results, streaming, vm_before, vm_after)]
    return "\n".join(lines)


def breakdown(results) -> list[str]:
    """Where the 1 KB chat request's proxy CPU goes, step by step, paired by round."""
    small = "chat 1 KB"
    steps = [
        ("plain Envoy", [r.cpu_us for r in results[small].get("envoy") or []]),
        ("any proxy-wasm filter, doing nothing (wasm-noop over envoy)", cpu_over(results, small, "wasm-noop", "envoy")),
        ("Envoy's jobs for our bootstrap: retry policy, access log, holding the headers and reading the body "
         "(envoy-same-jobs over envoy)", cpu_over(results, small, "envoy-same-jobs", "envoy")),
        ("our filter's own cost, demo feature set (jairouter over envoy-same-jobs)",
         cpu_over(results, small, "jairouter", "envoy-same-jobs")),
        ("our filter's own cost without API keys (jairouter-no-keys over envoy-same-jobs)",
         cpu_over(results, small, "jairouter-no-keys", "envoy-same-jobs")),
        ("the lean profile, all in (jairouter-lean over envoy)", cpu_over(results, small, "jairouter-lean", "envoy")),
    ]
    steps = [(what, values) for what, values in steps if values]
    if len(steps) < 2:
        return []
    return ["", "| The 1 KB chat request | proxy CPU µs/req |", "|---|---|"] + [
        f"| {what} | {spread(values)} |" for what, values in steps]


def targets(results, streaming, vm_before, vm_after) -> list[str]:
    """Issue 16's targets, each with its verdict from this run's medians over rounds (the medians of
    each variant, as the targets have always been judged; the tables' spreads pair rounds)."""
    def med(workload, variant, attr):
        runs = results.get(workload, {}).get(variant)
        return statistics.median(getattr(r, attr) for r in runs) if runs else None

    def over(workload, variant, base):
        a, b = med(workload, variant, "cpu_us"), med(workload, base, "cpu_us")
        return None if a is None or b is None else a - b

    def times(workload, variant, base):
        a, b = med(workload, variant, "rps"), med(workload, base, "rps")
        return None if a is None or b is None else a / b

    def ok(passed: bool) -> str:
        return "met" if passed else "**missed**"

    missing = "not measured in this run."
    out = []
    small, large = "chat 1 KB", "prompt 4 MB, model first"
    own, floor = over(small, "jairouter", "envoy-same-jobs"), over(small, "wasm-noop", "envoy")
    text = ("Our filter's own cost (CPU over envoy-same-jobs) on the 1 KB chat request no more than the do-nothing "
            "wasm floor (wasm-noop over envoy) of the same run: ")
    out.append(text + (missing if own is None or floor is None else f"{own:.1f} µs vs {floor:.1f} µs, {ok(own <= floor)}."))
    for variant, least, what in (("jairouter", 0.55, "the demo feature set: API keys, access log, retries on"),
                                 ("jairouter-lean", 0.65, "the lean profile: access log and retries off")):
        share = times(small, variant, "envoy")
        text = f"At least {least:.0%} of plain Envoy's throughput at one worker on the 1 KB chat request for {variant} ({what}): "
        out.append(text + (missing if share is None else f"{share:.0%}, {ok(share >= least)}."))
    over_small, over_large = over(small, "jairouter", "envoy"), over(large, "jairouter", "envoy")
    out.append(f"The 4 MB prompt costs no more over Envoy than the 1 KB one: {over_large:.0f} µs vs {over_small:.0f} µs, "
               f"{ok(over_large <= over_small)}.")
    added = streaming["jairouter"][0] - streaming["envoy"][0]
    out.append(f"Streaming adds under 1 ms to time to first byte over Envoy: {added:.2f} ms, {ok(added < 1)}.")
    growth = max((vm_after.get(vm, 0) - v for vm, v in vm_before.items()), default=0)
    out.append(f"Wasm VM memory within 1 MiB of its start after the soak: grew {growth / 2**20:.2f} MiB, {ok(growth <= 2**20)}.")
    for peer, label, least in (("litellm", "LiteLLM's", 60), ("portkey", "Portkey's gateway's", 15)):
        ratio = times(small, "jairouter", peer)
        text = f"At least {least}x {label} throughput per core on the 1 KB chat request (one worker each): "
        if ratio is None:
            out.append(text + missing)
            continue
        by_cpu = med(small, peer, "cpu_us") / med(small, "jairouter", "cpu_us")
        out.append(text + f"{ratio:.0f}x ({by_cpu:.0f}x in CPU per request), {ok(ratio >= least)}.")
    return out


def chart(results, names) -> str:
    """Requests/s per workload and variant, as grouped bars (log scale), in plain SVG."""
    import math
    colors = {"direct": "#999999", "envoy": "#4c78a8", "wasm-noop": "#9ecae9", "envoy-same-jobs": "#72b7b2",
              "jairouter": "#f58518", "jairouter-no-keys": "#ffbf79", "jairouter-lean": "#e45756",
              "litellm": "#54a24b", "portkey": "#b279a2"}
    width, row, bar = 760, 34 * len(names) + 20, 30
    height = 40 + row * len(results)
    top = max(statistics.median([r.rps for r in runs]) for per in results.values() for runs in per.values() if runs)
    scale = lambda v: 180 + 540 * math.log10(max(v, 1)) / math.log10(top * 1.2)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           '<text x="10" y="20" font-size="14">Requests per second (log scale), median over rounds</text>']
    y = 40
    for workload, per in results.items():
        out.append(f'<text x="10" y="{y + 14}" font-weight="bold">{workload}</text>')
        for i, name in enumerate(names):
            runs = per.get(name)
            if not runs:
                continue
            rps = statistics.median([r.rps for r in runs])
            by = y + 20 + i * 34
            out.append(f'<rect x="180" y="{by}" width="{scale(rps) - 180:.1f}" height="{bar - 6}" fill="{colors.get(name, "#888")}"/>')
            out.append(f'<text x="170" y="{by + 16}" text-anchor="end">{name}</text>')
            out.append(f'<text x="{scale(rps) + 4:.1f}" y="{by + 16}">{rps:,.0f}</text>')
        y += row
    out.append("</svg>")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
