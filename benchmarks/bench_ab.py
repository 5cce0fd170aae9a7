"""A/B of a KVXFER_* switch that agents read when they are created, with this VM's drift taken out: two sender
agents (one per value) in one process, two receivers in another, the reference request (benchmarks/bench_reference.py,
512 MiB) alternating between the pairs A B B A A B ... over the same two processes and pools.

    .venv/bin/python benchmarks/bench_ab.py KVXFER_IMM coalesced each [--seconds 20] [--layer-ms 10] [--json PATH]

Whole requests: GB/s from send() to the receiver's recv being done. --layer-ms: layer by layer, a layer marked ready
every MS (the forward), and the time from the last mark to the recv being done (the exposed tail). CPU: seconds
the pair's own threads (progress, CMA workers) used per GB moved, sender and receiver side.
Runs over tcp on loopback (FI_TCP_IFACE=lo).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

os.environ.setdefault("FI_TCP_IFACE", "lo")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_reference import ids, layout, make_pool

GB = 512 * (1 << 20) / 1e9


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def agents(role: str, var: str, values: list[str], pool, transport: str):
    """One agent per value of var (set while it is created), each with the pool, and the threads it started."""
    import kvxfer

    made = []
    for v in values:
        os.environ[var] = v
        before = set(thread_cpu())
        a = kvxfer.Agent(f"ab-{role}-{v}", transport=transport, interface="lo", timeout_s=120)
        a.register_pool(pool, layout())
        made.append((a, set(thread_cpu()) - before))
    return made


def cpu_of(threads: set[str], before: dict, after: dict) -> float:
    return sum(after[t] - before[t] for t in threads if t in before and t in after)


def receiver(conn, var, values, transport):
    pairs = agents("r", var, values, make_pool(2), transport)
    conn.send([a.metadata() for a, _ in pairs])
    peers = [a.add_peer(md) for (a, _), md in zip(pairs, conn.recv())]
    for (a, _), p in zip(pairs, peers):
        a.wait_connected(p, 30)
    _, dst_ids = ids(2)
    cpu = [0.0] * len(values)
    while (msg := conn.recv()) is not None:
        xfer, i = msg
        a, threads = pairs[i]
        c0 = thread_cpu()
        recv = a.recv(peers[i], xfer, dst_ids)
        conn.send("armed")
        recv.wait(timeout_s=120)
        cpu[i] += cpu_of(threads, c0, thread_cpu())
        conn.send("done")
    conn.send(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("var", help="the KVXFER_* variable")
    ap.add_argument("a", help="its first value")
    ap.add_argument("b", help="its second value")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to alternate (default: 20)")
    ap.add_argument("--layer-ms", type=float, help="layer by layer, a layer marked ready every MS")
    ap.add_argument("--transport", default="tcp", help="(default: tcp)")
    ap.add_argument("--json", metavar="PATH", help="write every request's time here")
    args = ap.parse_args()
    values = [args.a, args.b]
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(there, args.var, values, args.transport))
    proc.start()
    pairs = agents("s", args.var, values, make_pool(1), args.transport)
    remote = here.recv()
    here.send([a.metadata() for a, _ in pairs])
    peers = [a.add_peer(md) for (a, _), md in zip(pairs, remote)]
    for (a, _), p in zip(pairs, peers):
        a.wait_connected(p, 30)
    src_ids, dst_ids = ids(2)
    times, cpu = [[], []], [0.0, 0.0]
    end, xfer = time.monotonic() + args.seconds, 0
    while time.monotonic() < end or xfer < 6:
        i = (xfer // 2 + xfer) % 2  # A B B A A B ...: each value goes first as often
        a, threads = pairs[i]
        here.send((xfer, i))
        here.recv()
        c0 = thread_cpu()
        t0 = time.perf_counter()
        send = a.send(peers[i], xfer, src_ids, dst_ids)
        if args.layer_ms is None:
            send.all_ready()
        else:
            step = args.layer_ms / 1e3
            for layer in range(layout().num_layers):
                time.sleep(max(0.0, t0 + (layer + 1) * step - time.perf_counter()))
                send.layer_ready(layer)
            t0 = time.perf_counter()
        here.recv()
        dt = time.perf_counter() - t0
        send.wait(timeout_s=60)
        cpu[i] += cpu_of(threads, c0, thread_cpu())
        if xfer >= 2:  # the first request of each pair warms it up
            times[i].append(dt)
        xfer += 1
    here.send(None)
    recv_cpu = here.recv()
    proc.join()
    report = {"var": args.var, "values": values, "layer_ms": args.layer_ms, "seconds": times,
              "send_cpu_s": cpu, "recv_cpu_s": recv_cpu}
    for i, v in enumerate(values):
        t = np.array(times[i])
        n = len(t)
        per_gb = f"CPU s/GB send {cpu[i] / n / GB:.2f} recv {recv_cpu[i] / n / GB:.2f}"
        if args.layer_ms is None:
            gbps = GB / t
            print(f"{args.var}={v}: {n} requests, GB/s median {np.median(gbps):.2f} (p10 {np.percentile(gbps, 10):.2f}, "
                  f"p90 {np.percentile(gbps, 90):.2f}); {per_gb}")
        else:
            print(f"{args.var}={v}: {n} requests, {args.layer_ms} ms a layer, tail after the last layer median "
                  f"{np.median(t) * 1e3:.1f} ms (p90 {np.percentile(t, 90) * 1e3:.1f}, max {t.max() * 1e3:.1f}); {per_gb}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
