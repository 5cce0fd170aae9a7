"""Head-of-line blocking: how long a 1-block transfer takes when it starts 10 ms after a 510 MiB one (the reference
request less one block, every layer ready) to the same peer, next to the same 1-block transfer alone in the same run
(the limit: what it costs with nothing ahead of it).

    .venv/bin/python benchmarks/bench_fairness.py [--transports tcp,cma] [--staging always] [--reps 5] [--json PATH]

Two agents in this process (loopback tcp, or cma), the reference request's Llama-3-8B shape and random block ids.
With --staging always both transfers go through the sender's bounce ring (the staged path a GPU pool takes to a
host without GPU-direct RDMA), here from host memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("FI_TCP_IFACE", "lo")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.agent_pair import reference_pair, transfer_seconds  # noqa: E402
from benchmarks.bench_reference import ids  # noqa: E402


def run(transport: str, reps: int, staging: str = "auto") -> dict:
    a, b, peer_b, peer_a = reference_pair(transport, "fair-bench", staging=staging)
    src, dst = ids(3)
    x = 0

    def small_ms() -> float:
        nonlocal x
        x += 1
        return transfer_seconds(a, b, peer_b, peer_a, x, src[-1:], dst[-1:]) * 1e3

    alone, behind, big_ms = [], [], []
    for _ in range(reps):
        alone.append(small_ms())
        x += 1
        big_recv = b.recv(peer_a, x, dst[:-1])
        big = a.send(peer_b, x, src[:-1], dst[:-1])
        t_big = time.perf_counter()
        big.all_ready()
        time.sleep(0.01)
        behind.append(small_ms())
        big_recv.wait(timeout_s=60)
        big_ms.append((time.perf_counter() - t_big) * 1e3)
        big.wait(timeout_s=60)
    return {"transport": transport, "staging": staging, "path": big.path, "alone_ms": alone, "behind_ms": behind,
            "big_ms": big_ms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transports", default="tcp,cma")
    ap.add_argument("--staging", default="auto", choices=["auto", "always"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = []
    for t in args.transports.split(","):
        r = run(t, args.reps, args.staging)
        out.append(r)
        med = statistics.median
        print(f"{t:4s} {r['path']:7s} 1-block transfer alone median {med(r['alone_ms']):.2f} ms; "
              f"started 10 ms after a 510 MiB one: "
              f"median {med(r['behind_ms']):.2f} ms (min-max {min(r['behind_ms']):.1f}-{max(r['behind_ms']):.1f}); "
              f"the 510 MiB one took median {med(r['big_ms']):.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
