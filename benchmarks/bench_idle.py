"""What an idle agent costs its machine, and what waking from idle costs a transfer.

    .venv/bin/python benchmarks/bench_idle.py [--transports tcp,cma] [--rounds 3] [--json PATH]

For each transport and each idle policy (KVXFER_IDLE_WAIT unset = block on the CQ's wait fd where the provider has
one; `poll` = the old spin-then-sleep loop):
- neighbour: a CPU-bound Python loop pinned to core 0 runs alone, then beside two connected idle agents pinned to
  the same core; reported as the share of its solo speed it keeps (the limit, 1.0, is measured in the same run).
- wake latency: one 1-block transfer every 20 ms (both agents idle in between), time from all_ready() to the
  receiver's wait() returning; p50/p99 over 200 transfers, next to the same transfers sent back to back.
Each configuration runs in a fresh process (the policy is read when an agent opens its endpoints).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spin(seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10000):
            n += 1
    return n / seconds


def pair(transport: str):
    sys.path.insert(0, ROOT)
    from tests.conftest import local_pair
    from tests.reference import PRESETS

    layout = PRESETS["vllm_flash"]()
    return local_pair(layout, transport, ("idle-sender", "idle-receiver"))


def child_idle(transport: str) -> None:
    """Two connected agents that do nothing until killed."""
    pair(transport)
    print("ready", flush=True)
    time.sleep(3600)


def child_latency(transport: str, n: int = 200, gap_s: float = 0.02) -> None:
    a, b, peer_b, peer_a, _, _ = pair(transport)

    from benchmarks.agent_pair import transfer_seconds

    def one(i: int) -> float:
        return transfer_seconds(a, b, peer_b, peer_a, i, [i % 32], [i % 32], timeout_s=30)

    for i in range(20):
        one(i)
    gapped = []
    for i in range(n):
        time.sleep(gap_s)
        gapped.append(one(1000 + i))
    back_to_back = [one(5000 + i) for i in range(n)]
    print(json.dumps({"gapped": quantiles(gapped), "back_to_back": quantiles(back_to_back),
                      "idle_waits": a.stats()["idle_waits"] + b.stats()["idle_waits"]}))


def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_us": 1e6 * xs[len(xs) // 2], "p99_us": 1e6 * xs[int(len(xs) * 0.99) - 1]}


def neighbour_share(transport: str, env: dict, seconds: float) -> float:
    os.sched_setaffinity(0, {0})
    alone = spin(seconds)
    p = subprocess.Popen(["taskset", "-c", "0", sys.executable, __file__, "--child", "idle", transport], env=env,
                         stdout=subprocess.PIPE, text=True)
    try:
        p.stdout.readline()  # "ready"
        time.sleep(2)        # past the connection's spin
        beside = spin(seconds)
    finally:
        p.kill()
        p.wait()
    return beside / alone


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transports", default="tcp,cma")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each CPU-bound run")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        {"idle": child_idle, "latency": child_latency}[a.child[0]](a.child[1])
        return 0
    results = []
    for transport in a.transports.split(","):
        for policy in ("fd", "poll"):
            env = {**os.environ, "FI_TCP_IFACE": "lo"}
            env.pop("KVXFER_IDLE_WAIT", None)
            if policy == "poll":
                env["KVXFER_IDLE_WAIT"] = "poll"
            shares = [neighbour_share(transport, env, a.seconds) for _ in range(a.rounds)]
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            out = subprocess.run([sys.executable, __file__, "--child", "latency", transport], env=env,
                                 capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                raise SystemExit(f"latency child failed: {out.stderr[-2000:]}")
            lat = json.loads(out.stdout.strip().splitlines()[-1])
            row = {"transport": transport, "idle_wait": policy, "neighbour_share_median": statistics.median(shares),
                   "neighbour_shares": shares, **lat}
            results.append(row)
            print(f"{transport:4} idle={policy:4} neighbour keeps {row['neighbour_share_median']:.2f} of solo speed "
                  f"({', '.join(f'{s:.2f}' for s in shares)}); 1-block transfer after 20 ms idle p50/p99 "
                  f"{lat['gapped']['p50_us']:.0f}/{lat['gapped']['p99_us']:.0f} us, back to back "
                  f"{lat['back_to_back']['p50_us']:.0f}/{lat['back_to_back']['p99_us']:.0f} us; "
                  f"idle waits {lat['idle_waits']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"schema": 1, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
