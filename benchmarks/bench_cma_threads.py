"""Same-host CMA copies on the progress thread vs on CMA worker threads (Agent(cma_threads=N)).

The reference request of bench_reference.py (Llama-3-8B shape, 256 random blocks x 32 layers x K/V = 16,384 chunks of
32 KiB = 512 MiB) goes from this process into a receiver process, once per sender agent per round; each round also
times the limit: one thread's process_vm_writev of the same chunks into the same addresses. The modes take turns
inside every round (the order rotates), so a machine whose memory bandwidth drifts by 2x within a minute still
compares them under the same conditions; the ratio of a mode is its round's limit time over its transfer time,
and the summary is the median over rounds. Destination bytes are verified once per mode at the end.

Usage: python benchmarks/bench_cma_threads.py [--threads 0,2,4] [--rounds 7] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_reference import NUM_LAYERS, POOL_BLOCKS, chunk_addresses, ids, layout, make_pool  # noqa: E402


def receiver_main(conn):
    import kvxfer

    L = layout()
    dst = [np.zeros(L.tensor_layer_bytes, np.uint8) for _ in range(NUM_LAYERS)]
    for a in dst:
        a.fill(0)  # fault the pages in now: neither the limit nor kvxfer pays first-touch costs
    agent = kvxfer.Agent("cmat-receiver", transport="cma", timeout_s=120)
    agent.register_pool(dst, L)
    senders = conn.recv()
    peers = [agent.add_peer(md) for md in senders]
    conn.send((agent.metadata(), [a.ctypes.data for a in dst], os.getpid()))
    _, dst_ids = ids(2)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        if msg == "zero":
            for a in dst:
                a.fill(0)
            conn.send("zeroed")
            continue
        if msg == "verify":  # addressed chunks equal the source (regenerated from its seed), every other chunk zero
            src, (src_ids, _) = make_pool(1), ids(2)
            untouched = np.ones(POOL_BLOCKS, bool)
            untouched[dst_ids] = False
            ok = True
            for layer in range(NUM_LAYERS):
                d = dst[layer].reshape(2, POOL_BLOCKS, L.chunk_bytes)
                s = src[layer].reshape(2, POOL_BLOCKS, L.chunk_bytes)
                ok &= bool(np.array_equal(d[:, dst_ids], s[:, src_ids])) and not d[:, untouched].any()
            conn.send(ok)
            continue
        index, xfer = msg
        recv = agent.recv(peers[index], xfer, dst_ids)
        conn.send("posted")
        recv.wait(timeout_s=120)
        conn.send("arrived")


def main(argv=None):
    import kvxfer
    from kvxfer import _C

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="0,2,4", help="cma_threads of each sender (0: the progress thread copies)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    modes = [int(t) for t in args.threads.split(",")]
    L = layout()
    src = make_pool(1)
    senders = []
    for t in modes:
        a = kvxfer.Agent(f"cmat-sender-{t}", transport="cma", timeout_s=120, cma_threads=t)
        a.register_pool(src, L)
        senders.append(a)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=receiver_main, args=(child,), daemon=True)
    proc.start()
    conn.send([a.metadata() for a in senders])
    md, dst_bases, pid = conn.recv()
    peers = [a.add_peer(md) for a in senders]
    for a, p in zip(senders, peers):
        a.wait_connected(p, 30)
        assert p.path == "cma", f"expected the cma path, got {p.path}: {p.path_reason}"
    src_ids, dst_ids = ids(2)
    src_addr = chunk_addresses(src, src_ids)
    dst_addr = chunk_addresses([type("A", (), {"ctypes": type("C", (), {"data": b})})() for b in dst_bases], dst_ids)
    sizes = np.full(src_addr.size, L.chunk_bytes, dtype=np.uint64)
    nbytes = int(sizes.sum())

    def transfer(i, xfer):
        conn.send((i, xfer))
        assert conn.recv() == "posted"
        t0 = time.perf_counter()
        s = senders[i].send(peers[i], xfer, src_ids, dst_ids)
        s.all_ready()
        s.wait(timeout_s=120)
        elapsed = time.perf_counter() - t0
        assert conn.recv() == "arrived"
        return elapsed

    for i in range(len(modes)):
        transfer(i, 1)  # warm-up: plans, worker threads, the receiver's slot window
    rounds = {t: [] for t in modes}
    xfer = 10
    for r in range(args.rounds):
        limit = _C.cma_copy_seconds(pid, src_addr, dst_addr, sizes)
        order = [(r + k) % len(modes) for k in range(len(modes))]
        for i in order:
            xfer += 1
            rounds[modes[i]].append((limit, transfer(i, xfer)))
        print(f"  round {r + 1}/{args.rounds}: limit {nbytes / limit / 1e9:.2f} GB/s, " +
              ", ".join(f"t={t} {nbytes / rounds[t][-1][1] / 1e9:.2f}" for t in modes), file=sys.stderr, flush=True)
    # Verify each mode once on a zeroed pool (the receiver checks against the source regenerated from its seed).
    verified = {}
    for i, t in enumerate(modes):
        conn.send("zero")
        assert conn.recv() == "zeroed"
        xfer += 1
        transfer(i, xfer)
        conn.send("verify")
        verified[t] = conn.recv()
    conn.send(None)
    proc.join(30)
    summary = []
    print(f"{'cma_threads':>11} {'GB/s p50':>9} {'limit GB/s p50':>15} {'ratio p50':>10} {'ratio min-max':>14}  verified")
    for t in modes:
        ratios = [lim / k for lim, k in rounds[t]]
        row = {"cma_threads": t, "gbps_p50": nbytes / statistics.median(k for _, k in rounds[t]) / 1e9,
               "limit_gbps_p50": nbytes / statistics.median(lim for lim, _ in rounds[t]) / 1e9,
               "ratio_p50": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "verified": verified[t], "rounds": rounds[t]}
        summary.append(row)
        print(f"{t:>11} {row['gbps_p50']:9.2f} {row['limit_gbps_p50']:15.2f} {row['ratio_p50']:10.2f} "
              f"{row['ratio_min']:6.2f}-{row['ratio_max']:<6.2f}  {verified[t]}")
    print("limit: one thread's process_vm_writev of the same 16,384 chunks, timed in the same round")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"schema": 1, "bytes": nbytes, "cpus": os.cpu_count(), "modes": summary}, f, indent=1)
    return 0 if all(verified.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
