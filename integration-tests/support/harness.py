"""Starts a real Envoy, loaded with the built .wasm, in front of stub backends.

The bootstrap comes from our renderer (the same path `./build.sh up` takes), on ephemeral
loopback ports, with --use-dynamic-base-id so several Envoys can run side by side.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
ENVOY = ROOT / ".venv" / "bin" / "envoy"
WASM = ROOT / "target" / "wasm32-unknown-unknown" / "release" / "jairouter_filter.wasm"
# The probe filter (filter/examples/hostcall_probe.rs), built in a target directory of its own.
PROBE_WASM = ROOT / "target" / "probe" / "wasm32-unknown-unknown" / "release" / "examples" / "hostcall_probe.wasm"
RENDER = ROOT / "target" / "release" / "jairouter-render"
FIXTURES = Path(__file__).parent / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(config_path: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RENDER), *flags[:1], str(config_path), *flags[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


class Gateway:
    """One Envoy process serving the given JAiRouter configuration."""

    def __init__(self, workdir: Path, config: dict | str, concurrency: int = 2, live: bool = True,
                 api_keys: dict | str | None = None, env: dict[str, str] | None = None,
                 render_flags: tuple[str, ...] = ()):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "application.yml"
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        self.config_path.write_text(text)
        self.concurrency = concurrency
        # API keys kept apart, as a Kubernetes Secret mounted beside the ConfigMap.
        self.api_keys_path: Path | None = None
        if api_keys is not None:
            self.api_keys_path = workdir / "api-keys.yml"
            keys_text = api_keys if isinstance(api_keys, str) else yaml.safe_dump(api_keys, sort_keys=False)
            self.api_keys_path.write_text(keys_text)
        self.env = env
        self.render_flags = render_flags
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / "envoy.log"
        self.access_log_path = workdir / "access.log"
        self.port = 0
        self.admin_port = 0
        self.status_port = 0
        # Live: the filter's configuration and the clusters come from watched files (ECDS, CDS),
        # as in `./build.sh up` and the Helm chart; `watch()` follows edits of config_path.
        self.live_dir = workdir / "live" if live else None
        self.watcher: subprocess.Popen | None = None
        self.watch_log_path = workdir / "watch.log"

    def render_bootstrap(self) -> Path:
        out = self.workdir / "envoy.json"
        flags = {"--wasm": str(WASM), "--port": "0", "--admin-port": "0", "--listen-address": "127.0.0.1",
                 "--out": str(out), "--access-log": str(self.access_log_path), "--status-port": "0"}
        if self.live_dir:
            flags["--live-dir"] = str(self.live_dir)
        # A test's render_flags replace these defaults (the renderer refuses a flag given twice).
        extra = list(self._keys_flags()) + list(self.render_flags)
        flags.update(zip(extra[0::2], extra[1::2]))
        result = render(self.config_path, "bootstrap", *[x for pair in flags.items() for x in pair], env=self.env)
        if result.returncode != 0:
            raise RuntimeError(f"renderer refused the configuration: {result.stderr}")
        return out

    def start(self, bootstrap: Path | None = None) -> "Gateway":
        bootstrap = bootstrap or self.render_bootstrap()
        admin_file = self.workdir / "admin-address"
        admin_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                str(ENVOY), "-c", str(bootstrap), "--concurrency", str(self.concurrency),
                "--use-dynamic-base-id", "--admin-address-path", str(admin_file),
                "--log-level", "warning", "--log-path", str(self.log_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Envoy exited with {self.process.returncode}:\n{self.logs()}")
            if admin_file.exists() and admin_file.read_text().strip():
                self.admin_port = int(admin_file.read_text().strip().rsplit(":", 1)[1])
                try:
                    if httpx.get(f"{self.admin_url}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"Envoy did not become ready:\n{self.logs()}")
        listeners = httpx.get(f"{self.admin_url}/listeners?format=json", timeout=5).json()
        for listener in listeners["listener_statuses"]:
            port = int(listener["local_address"]["socket_address"]["port_value"])
            if listener["name"] == "jairouter-status":
                self.status_port = port
            elif listener["name"] == "jairouter" or not self.port:
                self.port = port
        return self

    def watch(self, interval_ms: int = 200, settle_ms: int = 500) -> "Gateway":
        """Starts the renderer's watcher on config_path (a live gateway only)."""
        assert self.live_dir is not None, "watch() needs a live gateway"
        self.watcher = subprocess.Popen(
            [
                str(RENDER), "watch", str(self.config_path), "--wasm", str(WASM),
                "--live-dir", str(self.live_dir), "--interval-ms", str(interval_ms),
                "--settle-ms", str(settle_ms), *self._keys_flags(),
            ],
            env=self.env,
            stdout=self.watch_log_path.open("w"),
            stderr=subprocess.STDOUT,
        )
        return self

    def _keys_flags(self) -> list[str]:
        return ["--api-keys", str(self.api_keys_path)] if self.api_keys_path else []

    def write_config(self, config: dict | str) -> None:
        """Replaces config_path at once (an editor's save, or a ConfigMap's symlink swap)."""
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        temp = self.config_path.with_suffix(".tmp")
        temp.write_text(text)
        temp.replace(self.config_path)

    def watch_log(self) -> str:
        return self.watch_log_path.read_text() if self.watch_log_path.exists() else ""

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}/status"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stats(self, prefix: str = "") -> dict[str, int]:
        text = httpx.get(f"{self.admin_url}/stats?filter={prefix}", timeout=5).text
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.watcher and self.watcher.poll() is None:
            self.watcher.terminate()
            self.watcher.wait(timeout=10)
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_until_ready(url: str, alive=lambda: True, explain=lambda: "", timeout: float = 30) -> None:
    """Polls a readiness URL (Envoy's /ready) until it answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert alive() and time.monotonic() < deadline, f"{url} never became ready\n{explain()}"
        time.sleep(0.1)


def instance(name: str, stub, **extra) -> dict:
    """A config instance entry pointing at a stub server."""
    return {"name": name, "base-url": stub.url, **extra}


def error_of(response: httpx.Response) -> dict:
    """The OpenAI error object of a response, checking its shape on the way."""
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert "code" in err
    return err


def multipart(fields: list[tuple[str, str | tuple[str, bytes, str]]], boundary: str = "jairouterTestBoundary") -> tuple[bytes, str]:
    """A multipart/form-data body as clients send it; file fields are (filename, data, type)."""
    parts = []
    for name, value in fields:
        if isinstance(value, tuple):
            filename, data, ctype = value
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                    f'filename="{filename}"\r\nContent-Type: {ctype}\r\n\r\n').encode()
            parts.append(head + data + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def json_body(obj) -> bytes:
    return json.dumps(obj).encode()
