"""./build.sh bench global-limits: what the limits across replicas (`gateway.global-rate-limit`) add.

Every request whose limits are shared is held by the filter while it asks the rate-limit service
(`jairouter-ratelimit`, gRPC, Redis behind it): one round trip per request. This bench prices that
round trip against the same gateway with local limits only, paired in one run:

  local     the gateway (bench.py's `jairouter` without API keys) with a service-scope request
            limit (token-bucket, capacity = rate × 1 s, 1,000,000 a second: never refuses):
            shared-data buckets in the Envoy process only
  global    the same plus `gateway.global-rate-limit` (timeout-ms 20, fail-open) pointing at
            jairouter-ratelimit and a Redis (no persistence) started by the bench
  local-token-budget, global-token-budget
            the same two with a service-scope token budget too (`token-limit`, never refuses), so
            that reservations go in the check and settlements flow (the Settle call, batched by the
            root context); `--no-token-budget` leaves them out

Same Envoy (one worker), same backend (jairouter-bench-backend), same workload (the 1 KB chat
request of `./build.sh bench`) at a fixed, modest concurrency: wrk -t1 -c4 and -c1 (pure added
latency: one request at a time). Each round runs every workload for every variant, the order
reversed every other round, so that drift hits both halves of a pair alike. Figures: req/s and
p50/p99 from wrk (`--latency`), CPU per request of Envoy and of the service and Redis from their
own accounting (/proc/PID/stat); the paired differences global − local are per round, then
median (min–max). After each round of a global variant the gateway's own count of its calls
(`jairouter_global_rate_limit_calls_total` by call and outcome, Envoy's admin /stats) is
read, so that a check that timed out (outcome unavailable: let through under the local limits)
is reported, not hidden in a fast latency.

Pinned as bench.py is (`--no-pin` to turn it off): Envoy on the first CPU, wrk, the backend, the
rate-limit service and Redis on the second. The machine's load average is recorded, never refused.
Writes docs/bench-results/global-limits.{md,json} and the section of docs/performance.md
between <!-- global-limits:begin --> and <!-- global-limits:end --> (`--no-docs` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

import bench
from bench import (OUT, ROOT, JAiRouter, Workload, chat_body, cpu_of_tree, free_port, machine, pinned, run_wrk,
                   start_backend, write_performance_doc)

RATELIMIT = ROOT / "target" / "release" / "jairouter-ratelimit"
CALLS = "jairouter_global_rate_limit_calls_total"
# Large enough never to refuse at these rates, small enough for the protocol (u32 per unit).
REQUESTS_PER_SECOND = 1_000_000
TOKENS_PER_MINUTE = 4_000_000_000
# The filter hands its metrics to Envoy once a second: read the call counts that much later.
FLUSH = 1.3


def workloads(connections: list[int]) -> list[Workload]:
    return [Workload(f"chat 1 KB, c{c}", "/v1/chat/completions", chat_body(1024), c) for c in connections]


class RateLimitService:
    """Redis (no persistence) and jairouter-ratelimit in front of it, both on loopback, pinned
    with the load generator."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.redis: subprocess.Popen | None = None
        self.service: subprocess.Popen | None = None
        self.grpc = self.http = ""

    def start(self) -> None:
        redis_dir = self.workdir / "redis"
        redis_dir.mkdir(exist_ok=True)
        self.redis_port = free_port()
        self.redis = subprocess.Popen(pinned(["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port),
                                              "--save", "", "--appendonly", "no", "--dir", str(redis_dir),
                                              "--logfile", str(redis_dir / "redis.log")], "load"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.redis_port), timeout=1).close()
                break
            except OSError:
                if self.redis.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {redis_dir / 'redis.log'}")
                time.sleep(0.05)
        log = open(self.workdir / "ratelimit.log", "w")
        self.service = subprocess.Popen(pinned([str(RATELIMIT), "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                                                "--redis-url", f"redis://127.0.0.1:{self.redis_port}/0"], "load"),
                                        stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        line = self.service.stdout.readline()
        m = re.match(r"LISTENING grpc=(\S+) http=(\S+)", line)
        if not m:
            raise RuntimeError(f"jairouter-ratelimit did not start ({line!r}); see {self.workdir / 'ratelimit.log'}")
        self.grpc, self.http = m.groups()

    def keys(self) -> int:
        out = subprocess.run(["redis-cli", "-p", str(self.redis_port), "dbsize"], capture_output=True, text=True)
        return int(out.stdout.strip() or 0) if out.returncode == 0 else -1

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the service and of Redis."""
        return cpu_of_tree(self.service.pid), cpu_of_tree(self.redis.pid)

    def stop(self) -> None:
        for proc in (self.service, self.redis):
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


class Gateway(JAiRouter):
    """bench.py's gateway (two instances a service, round-robin, breakers, retries, the access log;
    no API keys) with a service-scope request limit that never refuses, and optionally a token
    budget and the limits across replicas."""
    api_keys = False

    def __init__(self, name: str, service: RateLimitService | None, token_budget: bool, timeout_ms: int):
        self.name, self.service, self.token_budget, self.timeout_ms = name, service, token_budget, timeout_ms

    def configuration(self, backend_port):
        instance = {"name": bench.MODEL, "base-url": f"http://127.0.0.1:{backend_port}"}
        model = {
            "load-balance": {"type": "round-robin"},
            "rate-limit": {"enabled": True, "algorithm": "token-bucket", "capacity": REQUESTS_PER_SECOND,
                           "rate": REQUESTS_PER_SECOND, "scope": "service"},
            "circuit-breaker": {"failure-threshold": 5, "timeout": 60000},
            "services": {"chat": {"instances": [instance, dict(instance)]},
                         "embedding": {"instances": [instance, dict(instance)]}},
        }
        if self.token_budget:
            model["token-limit"] = {"tokens-per-minute": TOKENS_PER_MINUTE, "scope": "service"}
        if self.service:
            model["gateway"] = {"global-rate-limit": {"address": self.service.grpc, "timeout-ms": self.timeout_ms}}
        return {"model": model}

    def calls(self) -> dict[str, int]:
        """The gateway's count of its calls to the rate-limit service, by "call/outcome". Read from
        Envoy's /stats, where the name carries its labels as the filter wrote them
        (`<name>.call=check;.outcome=ok;`), whether or not the bootstrap has stats tags for them."""
        text = httpx.get(self.admin + "/stats", params={"filter": CALLS}, timeout=10).text
        out: dict[str, int] = {}
        for m in re.finditer(rf"{CALLS}((?:\.\w+=[^;]*;)*): (\d+)$", text, re.M):
            labels = dict(re.findall(r"\.(\w+)=([^;]*);", m.group(1)))
            key = f"{labels.get('call', '?')}/{labels.get('outcome', '?')}"
            out[key] = out.get(key, 0) + int(m.group(2))
        return out

    def service_cluster(self) -> dict[str, int]:
        """Envoy's own counts for its cluster of the rate-limit service: connections opened, calls
        made, calls timed out."""
        text = httpx.get(self.admin + "/stats", params={"filter": r"^cluster\.jairouter-ratelimit\.upstream_(cx_total|rq_total|rq_timeout|cx_connect_fail)$"},
                         timeout=10).text
        return {m.group(1): int(m.group(2)) for m in re.finditer(r"\.upstream_(\w+): (\d+)$", text, re.M)}


def cpu_ticks() -> dict[str, tuple[int, int]]:
    """(busy, total) clock ticks of each CPU so far, from /proc/stat (steal counted busy)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if re.fullmatch(r"cpu\d+", name):
            values = [int(x) for x in fields[:8]]
            idle = values[3] + values[4]
            out[name[3:]] = (sum(values) - idle, sum(values))
    return out


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], digits: int = 3, sign: bool = False) -> str:
    if not values:
        return "–"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(med(values))} ({f.format(min(values))} to {f.format(max(values))})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", default="4,1", help="wrk connections, one workload each (default 4,1)")
    parser.add_argument("--timeout-ms", type=int, default=20, help="gateway.global-rate-limit.timeout-ms (default 20)")
    parser.add_argument("--no-token-budget", action="store_true", help="leave out the token-budget pair")
    parser.add_argument("--no-pin", action="store_true",
                        help="leave CPUs to the scheduler (default: Envoy on one CPU; wrk, the backend, the service and Redis on the other)")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    if args.no_pin:
        bench.PIN = None
    elif len(cpus) < 2 or not shutil.which("taskset"):
        print("bench: fewer than 2 CPUs or no taskset here; not pinning", flush=True)
        bench.PIN = None
    else:
        bench.PIN = {"proxy": str(cpus[0]), "load": str(cpus[1])}
    for what, path in (("jairouter-ratelimit", RATELIMIT), ("the filter", bench.WASM), ("the bench backend", bench.BACKEND)):
        if not Path(path).exists():
            raise SystemExit(f"bench: {what} is not built ({path}); run ./build.sh bench global-limits")
    if not shutil.which("redis-server"):
        raise SystemExit("bench: redis-server is missing (./build.sh bench global-limits installs it)")

    load_start = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="jairouter-bench-global-"))
    backend, backend_port = start_backend()
    service = RateLimitService(workdir)
    pairs = [("local", "global", False)]
    if not args.no_token_budget:
        pairs.append(("local-token-budget", "global-token-budget", True))
    variants: list[Gateway] = []
    loads: list[list[float]] = []
    loads_sampled: list[tuple[float, float, float]] = []
    clusters: dict[str, dict[str, int]] = {}
    try:
        service.start()
        for local, global_, tokens in pairs:
            variants.append(Gateway(local, None, tokens, args.timeout_ms))
            variants.append(Gateway(global_, service, tokens, args.timeout_ms))
        for v in variants:
            v.start(backend_port, workdir)
            if v.service:
                # wait_ready's requests went through the service: the check must have been made and
                # answered, else this variant would be measured failing open.
                deadline = time.monotonic() + 5
                while not (calls := v.calls()).get("check/ok") and time.monotonic() < deadline:
                    time.sleep(0.2)  # the filter hands its counts to Envoy once a second
                if not calls.get("check/ok"):
                    raise RuntimeError(f"{v.name}: no check answered by the rate-limit service ({calls})")
        if service.keys() <= 0:
            raise RuntimeError("the rate-limit service's Redis holds no bucket after the checks")
        work = workloads([int(c) for c in args.connections.split(",")])
        results: dict[str, dict[str, list[dict]]] = {w.name: {v.name: [] for v in variants} for w in work}
        print(f"bench: {len(variants)} variants, {args.rounds} round(s) x {args.seconds}s per workload; "
              f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
        for round_no in range(args.rounds):
            loads_sampled.append(os.getloadavg())
            order = variants if round_no % 2 == 0 else variants[::-1]
            for workload in work:
                for v in order:
                    calls_before = v.calls() if v.service else {}
                    service_before, ticks_before = service.cpu(), cpu_ticks()
                    run = run_wrk(v, workload, args.seconds, workdir)
                    service_after, ticks_after = service.cpu(), cpu_ticks()
                    if v.service:
                        time.sleep(FLUSH)
                    calls_after = v.calls() if v.service else {}
                    calls = {k: calls_after.get(k, 0) - calls_before.get(k, 0) for k in calls_after}
                    calls = {k: n for k, n in calls.items() if n}
                    n = max(1, run.requests)
                    # The share of Envoy's CPU that others took meanwhile: its busy time less Envoy's own.
                    others = None
                    if bench.PIN:
                        cpu = bench.PIN["proxy"]
                        busy = ticks_after[cpu][0] - ticks_before[cpu][0]
                        total = max(1, ticks_after[cpu][1] - ticks_before[cpu][1])
                        others = max(0.0, (busy / bench.CLK_TCK - run.cpu_us * n / 1e6) / (total / bench.CLK_TCK))
                    entry = {**run.__dict__, "round": round_no + 1,
                             "service_cpu_us": (service_after[0] - service_before[0]) / n * 1e6,
                             "redis_cpu_us": (service_after[1] - service_before[1]) / n * 1e6,
                             "calls": calls, "loadavg": os.getloadavg()[0], "proxy_cpu_taken_by_others": others}
                    results[workload.name][v.name].append(entry)
                    print(f"  round {round_no + 1} {workload.name:<13} {v.name:<20} {run.rps:>7.0f} req/s "
                          f"p50 {run.p50_ms:.3f} ms p99 {run.p99_ms:.3f} ms envoy {run.cpu_us:5.1f} us/req "
                          f"service {entry['service_cpu_us']:5.1f} redis {entry['redis_cpu_us']:5.1f} us/req "
                          f"errors {run.errors}" + (f" others on Envoy's CPU {others:.0%}" if others is not None else "")
                          + (f" calls {calls}" if v.service else ""), flush=True)
        time.sleep(FLUSH)
        for v in variants:
            if v.service:
                clusters[v.name] = {**v.service_cluster(), "calls": v.calls()}
                print(f"bench: {v.name} calls since start: {v.calls()}; Envoy's cluster of the service: "
                      f"{clusters[v.name]}", flush=True)
    finally:
        for v in variants:
            v.stop()
        service.stop()
        os.killpg(backend.pid, signal.SIGTERM)
    load_end = os.getloadavg()

    report = build_report(results, pairs, args, load_start, load_end, loads_sampled, clusters)
    print(report)
    OUT.mkdir(exist_ok=True)
    (OUT / "global-limits.md").write_text(report + "\n")
    (OUT / "global-limits.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "rounds": args.rounds, "seconds": args.seconds,
        "timeout_ms": args.timeout_ms, "pinned": bench.PIN, "loadavg_start": load_start, "loadavg_end": load_end,
        "loadavg_per_round": loads_sampled, "pairs": pairs, "service_cluster": clusters, "results": results,
    }, indent=1))
    if not args.no_docs:
        write_performance_doc(report, "global-limits")
    return 0


def build_report(results, pairs, args, load_start, load_end, loads_sampled, clusters) -> str:
    pin = bench.PIN
    how = (f"Envoy (one worker) pinned to CPU {pin['proxy']}; wrk, the backend, jairouter-ratelimit and Redis to "
           f"CPU {pin['load']} (`taskset -c`)" if pin else "Envoy with one worker, not pinned to CPUs")
    one_minute = [l[0] for l in loads_sampled] or [load_start[0]]
    taken = [r["proxy_cpu_taken_by_others"] for per in results.values() for runs in per.values() for r in runs
             if r.get("proxy_cpu_taken_by_others") is not None]
    contention = (f" Other processes took {med(taken):.0%} (median; {min(taken):.0%}–{max(taken):.0%}) of Envoy's CPU "
                  "during the runs (its busy time in /proc/stat less Envoy's own)." if taken else "")
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()} with `./build.sh bench global-limits` "
        f"({args.rounds} round{'s' if args.rounds != 1 else ''} of {args.seconds} s per workload and variant, "
        f"the order reversed every other round; the 1 KB chat request, wrk -t1 at the connections shown; {how}; "
        f"`timeout-ms: {args.timeout_ms}`, fail-open). The machine is shared: load average (1 min) {load_start[0]:.2f} "
        f"before the bench started, {min(one_minute):.2f}–{max(one_minute):.2f} over the rounds (the bench's own "
        f"processes included).{contention} Medians over rounds (min–max).",
        "",
        "| Workload | Variant | req/s | p50 ms | p99 ms | Envoy CPU µs/req | service CPU µs/req | Redis CPU µs/req "
        "| checks ok / unavailable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, per in results.items():
        for name, runs in per.items():
            errors = sum(r["errors"] for r in runs)
            flag = f" ({errors} errors)" if errors else ""
            is_global = name.startswith("global")
            ok = sum(r["calls"].get("check/ok", 0) for r in runs)
            unavailable = sum(r["calls"].get("check/unavailable", 0) for r in runs)
            lines.append(
                f"| {workload} | {name}{flag} | {med([r['rps'] for r in runs]):.0f} | "
                f"{spread([r['p50_ms'] for r in runs])} | {spread([r['p99_ms'] for r in runs])} | "
                f"{med([r['cpu_us'] for r in runs]):.1f} | "
                + (f"{med([r['service_cpu_us'] for r in runs]):.1f} | {med([r['redis_cpu_us'] for r in runs]):.1f} | "
                   f"{ok:,} / {unavailable:,} |" if is_global else "– | – | – |"))
    lines += [
        "",
        "Paired by round, global − local (the same workload, the two measured back to back):",
        "",
        "| Workload | Pair | Δ p50 ms | Δ p99 ms | Δ req/s | Δ Envoy CPU µs/req |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for workload, per in results.items():
        for local, global_, _ in pairs:
            a, b = per.get(global_) or [], per.get(local) or []
            d50 = [x["p50_ms"] - y["p50_ms"] for x, y in zip(a, b)]
            d99 = [x["p99_ms"] - y["p99_ms"] for x, y in zip(a, b)]
            drps = [100 * (x["rps"] / y["rps"] - 1) for x, y in zip(a, b)]
            dcpu = [x["cpu_us"] - y["cpu_us"] for x, y in zip(a, b)]
            summary[(workload, global_)] = (d50, d99, drps)
            lines.append(f"| {workload} | {global_} − {local} | {spread(d50, sign=True)} | {spread(d99, sign=True)} | "
                         f"{spread(drps, 1, True).replace(' (', ' % (')} | {spread(dcpu, 1, True)} |")
    # The whole run's counts (read once more after the last flush) when there are, else the rounds' sums.
    calls: dict[str, dict[str, int]] = {}
    for per in results.values():
        for name, runs in per.items():
            for r in runs:
                for k, n in r["calls"].items():
                    calls.setdefault(name, {}).setdefault(k, 0)
                    calls[name][k] += n
    for name, c in clusters.items():
        calls[name] = c.get("calls", calls.get(name, {}))
    unavailable = sum(c.get("check/unavailable", 0) for c in calls.values())
    c1 = next((w for w in results if w.endswith(", c1")), None)
    text = []
    if c1 and (c1, "global") in summary:
        text.append(f"One request at a time ({c1}), the round trip to the rate-limit service and Redis adds "
                    f"{med(summary[(c1, 'global')][0]):.3f} ms at p50 and {med(summary[(c1, 'global')][1]):.3f} ms at p99 "
                    "over the local limits alone (paired medians).")
    text.append("The gateways' count of their calls over the whole run, start-up checks included (`" + CALLS
                + "`, call/outcome; the table's per-round reads can miss the last second's): "
                + "; ".join(f"{name}: " + ", ".join(f"{k} {n:,}" for k, n in sorted(c.items())) for name, c in calls.items())
                + ".")
    if clusters:
        text.append("Envoy's cluster of the service: " + "; ".join(
            f"{name} {c.get('rq_total', 0):,} calls over {c.get('cx_total', 0)} HTTP/2 connection(s), "
            f"{c.get('rq_timeout', 0)} timed out" for name, c in clusters.items()) + ".")
    text.append(f"No check timed out (outcome unavailable: 0) at `timeout-ms: {args.timeout_ms}`." if unavailable == 0 else
                f"**{unavailable:,} checks timed out or failed** (outcome unavailable) at `timeout-ms: {args.timeout_ms}`: "
                "those requests went on under the local limits alone (fail-open), so they do not carry the round trip.")
    lines += ["", " ".join(text)]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
