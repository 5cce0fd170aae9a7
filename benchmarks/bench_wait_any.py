"""What an engine pays to wait on open transfers: polling each one every millisecond (the vLLM connector's idle step
before 2026-12-01) against Agent.wait_any (sleeps until one of them ends, here at most 10 ms).

    .venv/bin/python benchmarks/bench_wait_any.py [--transport tcp] [--open 16] [--transfers 100] [--json PATH]

Two agents in this process. The waiter holds `--open` recvs that never complete plus the ones a sender thread
completes in order, one every 20 ms (1-block transfers). Reported per mode: the waiting thread's CPU time per second of
waiting, and how long after a recv ended (its finished_at, stamped by kvxfer's progress thread) the waiter noticed
(median, p99). The limit in the same run is the progress thread's own stamp: a waiter that noticed at once.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("FI_TCP_IFACE", "lo")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kvxfer  # noqa: E402
from tests.conftest import local_pair  # noqa: E402
from tests.reference import PRESETS  # noqa: E402


def run(mode: str, transport: str, n_open: int, n_transfers: int, period_s: float = 0.02) -> dict:
    a, b, pb, pa, _, _ = local_pair(PRESETS["vllm_flash"](), transport, (f"wa-s-{mode}", f"wa-r-{mode}"))
    # every recv opened up front: the sender completes the first n_transfers in order, so n_open stay pending
    open_recvs = {x: b.recv(pa, x, [x % 20], timeout_s=120) for x in range(1, n_transfers + n_open + 1)}
    lags: list[float] = []

    def sender():
        for x in range(1, n_transfers + 1):
            time.sleep(period_s)
            a.send(pb, x, [x % 20], [x % 20]).all_ready()

    t = threading.Thread(target=sender)
    cpu0, wall0 = time.thread_time(), time.monotonic()
    t.start()
    while len(lags) < n_transfers:
        if mode == "poll":
            time.sleep(0.001)
        else:
            b.wait_any(list(open_recvs.values()), 0.01)
        now = time.perf_counter()
        for x, r in list(open_recvs.items()):
            if r.state != kvxfer.TransferState.PENDING:
                lags.append((now - r.finished_at) * 1e3)
                del open_recvs[x]
    cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
    t.join()
    a.close()
    b.close()
    lags.sort()
    return {"mode": mode, "cpu_ms_per_s": round(cpu / wall * 1e3, 2), "lag_ms_median": round(statistics.median(lags), 3),
            "lag_ms_p99": round(lags[int(0.99 * (len(lags) - 1))], 3), "transfers": len(lags)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--open", type=int, default=16)
    ap.add_argument("--transfers", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = [run(m, args.transport, args.open, args.transfers) for m in ("poll", "wait_any")]
    for r in rows:
        print(f"{r['mode']:>9}: waiting thread {r['cpu_ms_per_s']:7.2f} ms CPU per s; noticed a finished recv "
              f"{r['lag_ms_median']:.3f} ms (median) / {r['lag_ms_p99']:.3f} ms (p99) after kvxfer stamped it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"transport": args.transport, "open": args.open, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
