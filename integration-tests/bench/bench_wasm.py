"""./build.sh bench wasm: what V8 runs of the filter for one request, outside Envoy and counted
instead of timed (these machines are too noisy to time a few microseconds).

The filter's .wasm runs under node's V8 (TurboFan, as Envoy's) against a small proxy-wasm host in
JavaScript (wasm_harness.mjs, beside it), request after request of the bench's 1 KB chat
with the bench's demo configuration (round-robin, request and token limits, breakers, an API key
with quotas); --workload names another of the bench's workloads (its path and body, delivered
in one body callback as a fast client's is). Modes:

  (default)  callgrind: instructions a request in V8's compiled code (the filter's wasm, plus the
             harness's JavaScript host, the same for every build), from the difference between a
             short and a long run so start-up and compilation cancel; with --baseline-wasm both
             builds, paired. Deterministic to ~0.5%.
  --perf     perf record with node's --perf-basic-prof on a build that keeps the name section:
             the filter's functions by their share of its wasm time.
  --timing   wall time a request (indicative only), and with --thrash MiB the caches evicted
             between requests as Envoy's own work evicts them.
  --footprint the filter's linear memory one request writes, in 64-byte lines (snapshots
             around single requests; reads are not seen, so a lower bound of its data
             footprint, which makes Envoy's own work dearer: `bench profile`'s touching probe).

Host calls a request are counted by name in every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import bench

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).resolve().with_name("wasm_harness.mjs")
NAMED_TARGET = ROOT / "target" / "wasm-names"
KEY = "sk-bench-wasm-0123456789abcdef"


def plugin_configuration(work: Path) -> Path:
    """The plugin configuration the renderer gives the bench's `jairouter` variant."""
    gateway = bench.JAiRouter()
    gateway.api_keys = False
    config = gateway.configuration(backend_port=9)
    gateway.add_api_key(config, KEY)
    app = work / "app.yml"
    app.write_text(json.dumps(config))
    out = work / "bootstrap.json"
    subprocess.run([str(bench.RENDER), "bootstrap", str(app), "--wasm", str(bench.WASM), "--port", "8080",
                    "--admin-port", "9901", "--status-port", "none", "--out", str(out)], check=True)
    bootstrap = json.loads(out.read_text())
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (wasm,) = [f["typed_config"]["config"] for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    path = work / "plugin.json"
    path.write_text(wasm["configuration"]["value"])
    return path


def harness(wasm: Path, config: Path, body: Path, n: int, *, wrap: list[str] | None = None,
            node_flags: list[str] | None = None, thrash: int = 0, footprint: bool = False) -> dict:
    command = [*(wrap or []), "node", "--no-liftoff", *(node_flags or []), str(HARNESS), str(wasm), str(config),
               str(body), str(n)]
    env = dict(os.environ, API_KEY=KEY, THRASH=str(thrash))
    if footprint:
        env["FOOTPRINT"] = "1"
    # In a scratch directory: node's profiling flags leave files where it runs.
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=tempfile.gettempdir())
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["routed_to"]:
        raise RuntimeError(f"{wasm}: the request was not routed")
    return result


def jit_instructions(wasm: Path, config: Path, body: Path, n: int, work: Path) -> tuple[int, int, dict]:
    """Instructions in JIT code and in all, for a run of n requests, under callgrind."""
    out = work / f"callgrind.{wasm.stem}.{n}"
    result = harness(wasm, config, body, n, wrap=["valgrind", "--tool=callgrind", "--smc-check=all-non-file",
                                                  f"--callgrind-out-file={out}"], node_flags=["--single-threaded"])
    report = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", str(out)],
                            capture_output=True, text=True, check=True).stdout
    jit = total = 0
    for line in report.splitlines():
        m = re.match(r"\s*([\d,]+) .*", line)
        if not m:
            continue
        if "PROGRAM TOTALS" in line:
            total = int(m.group(1).replace(",", ""))
        elif line.rstrip().endswith("[???]"):
            jit += int(m.group(1).replace(",", ""))
    return jit, total, result["host_calls"]


def demangle(symbol: str) -> str:
    """Enough of Rust's legacy mangling to read a profile."""
    if symbol.startswith("_ZN"):
        parts, rest = [], symbol[3:]
        while rest[:1].isdigit():
            size = re.match(r"\d+", rest).group(0)
            rest = rest[len(size):]
            parts.append(rest[:int(size)])
            rest = rest[int(size):]
        if parts and re.fullmatch(r"h[0-9a-f]{16}", parts[-1]):
            parts.pop()
        return "::".join(parts).replace("$LT$", "<").replace("$GT$", ">").replace("$u20$", " ").replace("..", "::")
    return symbol


def profile(config: Path, body: Path, n: int, work: Path) -> None:
    env = dict(os.environ, CARGO_TARGET_DIR=str(NAMED_TARGET), CARGO_PROFILE_RELEASE_STRIP="false")
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "jairouter-filter", "--target",
                    "wasm32-unknown-unknown"], check=True, env=env, cwd=ROOT)
    wasm = NAMED_TARGET / "wasm32-unknown-unknown" / "release" / "jairouter_filter.wasm"
    data = work / "perf.data"
    harness(wasm, config, body, n, wrap=["perf", "record", "-q", "-F", "4000", "-o", str(data)],
            node_flags=["--perf-basic-prof"])
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "sym", "--stdio"],
                            capture_output=True, text=True, check=True).stdout
    shares: dict[str, float] = {}
    everything = 0.0
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[\.\]\s+(.*)", line)
        if not m:
            continue
        share, symbol = float(m.group(1)), m.group(2)
        everything += share
        wasm_function = re.match(r"JS:(.*)-\d+-turbofan$", symbol)
        if not wasm_function or "wasm-to-js" in symbol or "js-to-wasm" in symbol:
            continue
        name = demangle(wasm_function.group(1))
        if re.search(r"dlmalloc|__rust_(alloc|dealloc|realloc)|__rdl_|RawVec|memcpy|memmove|memset|_no_alloc_shim", name):
            name = "(allocation and copying: dlmalloc, memcpy, ...)"
        shares[name] = shares.get(name, 0.0) + share
    in_wasm = sum(shares.values())
    print(f"the filter's wasm: {in_wasm:.1f}% of the run's samples (the rest is node, V8 and the JavaScript host)")
    print("| share of the filter's wasm time | function |\n|---|---|")
    for name, share in sorted(shares.items(), key=lambda kv: -kv[1])[:30]:
        print(f"| {100 * share / in_wasm:.1f}% | `{name[:100]}` |")
    code_footprint(report)


def code_footprint(report: str) -> None:
    """The machine code a request runs through: the sizes (from node's perf map) of the wasm
    functions sampled, the hottest first. Its footprint in the caches is what makes Envoy's own
    work dearer around the filter (`bench profile`'s envoy-asked-jobs-touching-K)."""
    maps = sorted(Path(tempfile.gettempdir()).glob("perf-*.map"), key=lambda p: p.stat().st_mtime)
    if not maps:
        return
    sizes = {}
    for line in maps[-1].read_text().splitlines():
        _, size, name = line.split(" ", 2)
        sizes[name] = int(size, 16)
    sampled = []
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[\.\]\s+(JS:.*-\d+-turbofan)$", line)
        if m and "wasm-to-js" not in m.group(2) and "js-to-wasm" not in m.group(2):
            sampled.append((float(m.group(1)), sizes.get(m.group(2), 0)))
    total = sum(share for share, _ in sampled) or 1
    taken = code = 0.0
    for share, size in sorted(sampled, reverse=True):
        if taken >= 0.9 * total:
            break
        taken += share
        code += size
    print(f"\ncode run a request: {code / 1024:.0f} KiB of machine code in the functions that took 90% of the "
          f"filter's wasm time, {sum(size for _, size in sampled) / 1024:.0f} KiB in all {len(sampled)} sampled "
          f"(of {sum(v for k, v in sizes.items() if k.endswith('-turbofan')) / 1024:.0f} KiB compiled)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-wasm", type=Path, help="an earlier build, counted beside this one")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--perf", action="store_true")
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--thrash", type=int, default=0, help="MiB touched between requests (--timing)")
    parser.add_argument("--footprint", action="store_true")
    parser.add_argument("--workload", default="chat 1 KB", choices=[w.name for w in bench.WORKLOADS],
                        help="one of the bench's workloads (default: chat 1 KB)")
    args = parser.parse_args()
    (workload,) = [w for w in bench.WORKLOADS if w.name == args.workload]
    os.environ["REQUEST_PATH"] = workload.path  # the harness's, for every run below
    work = Path(tempfile.mkdtemp(prefix="bench-wasm-"))
    config = plugin_configuration(work)
    body = work / "body.json"
    body.write_bytes(workload.body)
    builds = [("this build", bench.WASM)] + ([("baseline", args.baseline_wasm)] if args.baseline_wasm else [])
    if args.perf:
        profile(config, body, args.requests * 5, work)
        return 0
    if args.footprint:
        for label, wasm in builds:
            result = harness(wasm, config, body, 1, footprint=True)
            lines = result["footprint_lines"]
            print(f"{label}: one request writes {lines} lines of 64 bytes ({lines * 64 / 1024:.1f} KiB) of "
                  f"{result['memory_bytes'] / 2**20:.2f} MiB of linear memory")
        return 0
    if args.timing:
        for label, wasm in builds:
            result = harness(wasm, config, body, args.requests, thrash=args.thrash)
            print(f"{label}: {result['us_per_request']} µs a request (thrash {args.thrash} MiB), host calls {result['host_calls']}")
        return 0
    short = 1000
    print(f"callgrind, node {subprocess.run(['node', '--version'], capture_output=True, text=True).stdout.strip()}, "
          f"{args.requests} requests beyond a run of {short} (the bench's {workload.name}, demo configuration):")
    print("| build | .wasm bytes | JIT instructions a request | all instructions a request | host calls a request |")
    print("|---|---|---|---|---|")
    for label, wasm in builds:
        jit_short, total_short, _ = jit_instructions(wasm, config, body, short, work)
        jit_long, total_long, calls = jit_instructions(wasm, config, body, short + args.requests, work)
        per = lambda a, b: (b - a) / args.requests
        kinds = ", ".join(f"{name.removeprefix('proxy_')} {n:g}" for name, n in calls.items())
        print(f"| {label} | {wasm.stat().st_size:,} | {per(jit_short, jit_long) / 1000:.1f}k | "
              f"{per(total_short, total_long) / 1000:.1f}k | {sum(calls.values()):g} ({kinds}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
