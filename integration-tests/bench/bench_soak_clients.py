"""Soak: a stream of distinct clients against per-client rate limits must leave Envoy's memory flat.

Per-client buckets live in a fixed table of `max-clients` slots in shared data, so memory after
100,000 distinct clients should equal memory after the first few thousand. Clients are told apart
by X-Forwarded-For behind one trusted hop (all traffic stays on loopback). Run by
`./build.sh bench soak-clients`; prints one line per checkpoint and a summary.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

# support/ is on the path (./build.sh bench sets PYTHONPATH, as pytest.ini does for the tests).
from harness import Gateway, instance, json_body
from stub_backend import StubServer


def memory(gw: Gateway) -> int:
    """Envoy's allocated heap, bytes (admin /memory)."""
    return int(httpx.get(gw.admin_url + "/memory", timeout=10).json()["allocated"])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--max-clients", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    stub = StubServer("soak").start()
    workdir = Path(tempfile.mkdtemp(prefix="jairouter-soak-"))
    config = {"model": {
        "gateway": {"trusted-hops": 1},
        "rate-limit": {"enabled": True, "capacity": 5, "rate": 1, "scope": "client-ip",
                       "max-clients": args.max_clients},
        "services": {"chat": {"instances": [instance("llama", stub)]}},
    }}
    gw = Gateway(workdir, config, concurrency=2).start()
    body = json_body({"model": "llama", "messages": []})
    local = threading.local()
    counts = {200: 0, 429: 0}
    lock = threading.Lock()

    def send(n: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=10)
        address = f"127.{1 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"  # distinct loopback strings
        r = local.client.post(gw.url + "/v1/chat/completions", content=body,
                              headers={"content-type": "application/json", "x-forwarded-for": address})
        with lock:
            counts[r.status_code] = counts.get(r.status_code, 0) + 1

    try:
        checkpoints = sorted({min(args.clients, c) for c in (1_000, 10_000, 25_000, 50_000, 75_000, args.clients)})
        baseline = memory(gw)
        print(f"soak-clients: max-clients {args.max_clients}, Envoy allocated at start {baseline} bytes")
        sent = 0
        started = time.monotonic()
        readings = []
        with ThreadPoolExecutor(args.threads) as pool:
            for checkpoint in checkpoints:
                list(pool.map(send, range(sent, checkpoint)))
                sent = checkpoint
                readings.append((checkpoint, memory(gw)))
                print(f"  {checkpoint:>7} distinct clients: allocated {readings[-1][1]} bytes, "
                      f"{sent / (time.monotonic() - started):.0f} req/s, statuses {counts}")
        first, last = readings[0][1], readings[-1][1]
        growth = last - first
        print(f"soak-clients: {args.clients} distinct clients; allocated grew {growth} bytes "
              f"({growth / max(1, args.clients - readings[0][0]):.2f} bytes per client after the first "
              f"{readings[0][0]}); admitted {counts.get(200, 0)}, limited {counts.get(429, 0)}")
        return 0
    finally:
        gw.stop()
        stub.stop()


if __name__ == "__main__":
    sys.exit(main())
