"""How fast a receiver gets its blocks back when it gives a transfer up (Recv.cancel), next to what the transfer
would have cost, both measured in the same run.

    .venv/bin/python benchmarks/bench_cancel.py [--transports tcp,cma] [--reps 5] [--small 200] [--json PATH]

Two agents in this process (loopback tcp, or cma), the reference request of bench_reference.py (32 layers x 256
random blocks of the Llama-3-8B shape, 512 MiB):
- before the send: Recv.cancel() of a recv whose sender has not started, until writes_over (CANCEL + CANCEL_ACK),
  next to a 1-block transfer's all_ready() -> recv done (one write, one immediate: the one-way floor);
- mid-transfer: every layer marked ready, the receiver cancels once layer 0 arrived; time from cancel() until
  writes_over (the sender stops, the receiver counts what was in flight), the layers that had arrived by then and
  the share of layers that never landed, next to the whole request's transfer time (the limit: what waiting would cost).
Sender and receiver share this process's cores, so on a small machine the numbers include their contention.
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

from benchmarks.agent_pair import pct, reference_pair, transfer_seconds  # noqa: E402
from benchmarks.bench_reference import ids, layout  # noqa: E402


def until(pred, timeout_s: float = 60.0) -> float:
    t0 = time.perf_counter()
    while not pred():
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError("not reached")
    return time.perf_counter() - t0


def run(transport: str, reps: int, small: int) -> dict:
    a, b, peer_b, peer_a = reference_pair(transport, "cancel-bench")
    src_ids, dst_ids = ids(3)
    xfer = 0
    one_block, before = [], []
    def transfer_s(x: int, n: int) -> float:  # the request's first n blocks
        return transfer_seconds(a, b, peer_b, peer_a, x, src_ids[:n], dst_ids[:n])

    for _ in range(small):
        xfer += 1
        one_block.append(transfer_s(xfer, 1))
        xfer += 1
        recv = b.recv(peer_a, xfer, dst_ids[:1])
        t0 = time.perf_counter()
        recv.cancel("bench")
        until(lambda r=recv: r.writes_over)
        before.append(time.perf_counter() - t0)
    full, mid, landed, unsent = [], [], [], []
    L = layout()
    for _ in range(reps):
        xfer += 1
        full.append(transfer_s(xfer, len(dst_ids)))
        xfer += 1
        recv = b.recv(peer_a, xfer, dst_ids)
        send = a.send(peer_b, xfer, src_ids, dst_ids)
        send.all_ready()
        recv.wait(layer=0, timeout_s=60)
        t0 = time.perf_counter()
        recv.cancel("bench")
        until(lambda r=recv: r.writes_over)
        mid.append(time.perf_counter() - t0)
        landed.append(recv.layers_done)
        until(lambda s=send: s.writes_over)
        unsent.append((L.num_layers - recv.layers_done) / L.num_layers)
    return {
        "transport": transport, "one_block_us": [x * 1e6 for x in one_block], "cancel_before_us": [x * 1e6 for x in before],
        "full_ms": [x * 1e3 for x in full], "cancel_mid_ms": [x * 1e3 for x in mid], "layers_landed": landed,
        "layers_not_landed_share": unsent,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transports", default="tcp,cma")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results = []
    for t in args.transports.split(","):
        r = run(t, args.reps, args.small)
        results.append(r)
        print(f"{t:4s} cancel before the send -> writes_over p50/p99 {pct(r['cancel_before_us'], .5):.0f}/"
              f"{pct(r['cancel_before_us'], .99):.0f} us   (1-block transfer p50/p99 {pct(r['one_block_us'], .5):.0f}/"
              f"{pct(r['one_block_us'], .99):.0f} us)")
        print(f"{t:4s} cancel after layer 0 of 512 MiB -> writes_over median {statistics.median(r['cancel_mid_ms']):.1f} ms "
              f"(min-max {min(r['cancel_mid_ms']):.1f}-{max(r['cancel_mid_ms']):.1f}), layers landed "
              f"{min(r['layers_landed'])}-{max(r['layers_landed'])}/32   (whole request median "
              f"{statistics.median(r['full_ms']):.1f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
