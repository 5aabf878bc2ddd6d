"""./build.sh bench hostcalls: what each kind of proxy-wasm host call costs inside Envoy.

The probe filter (filter/examples/hostcall_probe.rs) makes only the host calls its configuration
names. Every variant runs the 1 KB chat workload of `./build.sh bench` through one Envoy worker;
a call's price is the proxy CPU per request over the `pause` variant (hold the headers, read the
body, continue: what a body-routing filter must do), divided by the calls made. This is the
profile behind the filter's own cost: its request path is a handful of these calls.
Writes the section of docs/performance.md between <!-- hostcalls:begin --> and <!-- hostcalls:end -->.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import bench
from bench import PROBE_WASM, WORKLOADS, PlainEnvoy, machine, run_wrk, start_backend, write_performance_doc

# (steps, calls per request, what it is)
PROBES = [
    ("pause", 0, "hold headers, read the body, continue (the base of every line below)"),
    ("pause,get:10", 10, "`get_map_value` of a request header"),
    ("pause,map:5", 5, "`get_map_pairs`: every request header at once"),
    ("pause,set:5", 5, "`set_map_value` of a request header"),
    ("pause,remove:5", 5, "`remove_map_value` of an absent request header"),
    ("pause,reply-header:5", 5, "`set_map_value` of a response header"),
    ("pause,route-cache:1", 1, "`clear_route_cache` foreign function"),
    ("pause,shared:5", 5, "shared data: a read and a compare-and-swap write"),
    ("pause,property:5", 5, "`get_property(source.address)`"),
    ("pause,time:10", 10, "`get_current_time`"),
]


class Probe(PlainEnvoy):
    def __init__(self, steps: str):
        self.name = steps or "wasm-noop"
        self.extra_filters = [{"name": "envoy.filters.http.wasm", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {"name": "probe", "root_id": "probe", "allow_on_headers_stop_iteration": True,
                       "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": steps},
                       "vm_config": {"vm_id": "probe", "runtime": "envoy.wasm.runtime.v8",
                                     "code": {"local": {"filename": str(PROBE_WASM)}}}}}}]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--no-pin", action="store_true", help="leave CPUs to the scheduler (default: as ./build.sh bench)")
    args = parser.parse_args()
    if args.no_pin or len(os.sched_getaffinity(0)) < 2:
        bench.PIN = None
    workdir = Path(tempfile.mkdtemp(prefix="jairouter-hostcalls-"))
    backend, backend_port = start_backend()
    variants = [PlainEnvoy(), Probe("")] + [Probe(steps) for steps, _, _ in PROBES]
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    workload = WORKLOADS[0]
    try:
        for v in variants:
            v.start(backend_port, workdir)
        for round_no in range(args.rounds):
            order = variants[round_no % len(variants):] + variants[: round_no % len(variants)]
            for v in order:
                run = run_wrk(v, workload, args.seconds, workdir)
                if run.errors:
                    raise RuntimeError(f"{v.name}: {run.errors} errors")
                cpu[v.name].append(run.cpu_us)
                print(f"  round {round_no + 1} {v.name:<22} {run.cpu_us:6.1f} us/req", flush=True)
    finally:
        for v in variants:
            v.stop()
        os.killpg(backend.pid, signal.SIGTERM)

    med = {name: statistics.median(values) for name, values in cpu.items()}
    base = med["pause"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()} with `./build.sh bench hostcalls` "
        f"({args.rounds} rounds of {args.seconds} s, the 1 KB chat workload, one Envoy worker"
        f"{', Envoy pinned to CPU 0, wrk and the backend to CPU 1' if bench.PIN else ''}; medians). "
        "Proxy CPU per request includes the kernel's share of the loopback traffic, which grows a "
        "little with any added latency, so small differences are within noise (about ±1 µs).",
        "",
        "| Variant | proxy CPU µs/req | µs per call |",
        "|---|---|---|",
        f"| plain Envoy | {med['envoy']:.1f} | – |",
        f"| any wasm filter (does nothing) | {med['wasm-noop']:.1f} | +{med['wasm-noop'] - med['envoy']:.1f} over Envoy |",
    ]
    for steps, calls, what in PROBES:
        if calls == 0:
            lines.append(f"| {what} | {med[steps]:.1f} | +{med[steps] - med['wasm-noop']:.1f} over the no-op filter |")
        else:
            lines.append(f"| {what} | {med[steps]:.1f} | {(med[steps] - base) / calls:.2f} |")
    report = "\n".join(lines)
    print(report)
    if not args.no_docs:
        write_performance_doc(report, "hostcalls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
