"""A receiver fed by many peers: what the number of peers costs (Agent(max_peers=...)).

    .venv/bin/python benchmarks/bench_many_peers.py [--transports tcp,cma] [--peers 1,8,32,64,128] [--rounds 10]
                                                    [--json PATH]

For each transport and peer count N, in a fresh process: one receiver (max_peers = the smallest power of two >= N,
at least 32) and N sender agents, all connected. Each round moves the same 128 transfers of 2 blocks x 4 layers
(32 KiB each) into the receiver, spread evenly over the N senders, all in flight at once; the round ends when every
recv is done. The limit is the same work from 1 peer in the same run: the table reports each N's aggregate bytes/s
as a ratio to it. Then, with every peer still connected and idle, 100 back-to-back 1-block transfers from one
sender: p50 next to the 1-peer p50 (does holding idle peers slow the receiver's progress loop?), and the CPU the
process then uses over 2 s with every agent idle (cores busy, and ms of CPU per agent per second).
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
TRANSFERS_PER_ROUND = 128


def child(transport: str, n_peers: int, rounds: int) -> None:
    sys.path.insert(0, ROOT)
    import numpy as np

    import kvxfer
    from benchmarks.agent_pair import transfer_seconds
    from tests.conftest import fan_in
    from tests.reference import make_pool

    layout = kvxfer.KVLayout.vllm_flash(4, 2 * TRANSFERS_PER_ROUND + 8, 16, 2, 32, "float16")
    max_peers = max(32, 1 << (n_peers - 1).bit_length())
    t0 = time.perf_counter()
    receiver = kvxfer.Agent("mp-r", transport=transport, interface="lo", timeout_s=60, max_peers=max_peers)
    receiver.register_pool(make_pool(layout, 1), layout)
    senders, _, to_receiver, at_receiver = fan_in(receiver, n_peers, transport, layout, "mp", 100, 60.0, 60.0)
    connect_s = time.perf_counter() - t0
    nbytes = TRANSFERS_PER_ROUND * 2 * 2 * layout.num_layers * layout.chunk_bytes
    xfer, times = 0, []
    for r in range(rounds + 1):  # round 0 warms up
        recvs, sends = [], []
        for t in range(TRANSFERS_PER_ROUND):
            k = t % n_peers
            ids = np.array([2 * t, 2 * t + 1], np.int32)
            xfer += 1
            recvs.append(receiver.recv(at_receiver[k], xfer, ids))
            sends.append(senders[k].send(to_receiver[k], xfer, ids, ids))
        start = time.perf_counter()
        for s in sends:
            s.all_ready()
        for rv in recvs:
            rv.wait(timeout_s=60)
        if r:
            times.append(time.perf_counter() - start)
        for s in sends:
            s.wait(timeout_s=60)
    lat = sorted(transfer_seconds(senders[0], receiver, to_receiver[0], at_receiver[0], 1_000_000 + i, [i % 8], [i % 8])
                 for i in range(100))
    time.sleep(0.5)  # idle: what N+1 connected agents doing nothing cost this process
    c0, w0 = os.times(), time.perf_counter()
    time.sleep(2.0)
    c1, idle_s = os.times(), time.perf_counter() - w0
    idle_cores = (c1.user - c0.user + c1.system - c0.system) / idle_s
    stats = receiver.stats()
    print(json.dumps({"idle_cores": idle_cores, "idle_ms_per_agent_per_s": 1e3 * idle_cores / (n_peers + 1),"connect_s": connect_s, "round_p50_s": statistics.median(times),
                      "gbps": nbytes / statistics.median(times) / 1e9, "one_block_p50_us": 1e6 * lat[len(lat) // 2],
                      "unknown_imms": stats["unknown_imms"], "max_peers": max_peers}))
    for s in senders:
        s.close()
    receiver.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transports", default="tcp,cma")
    ap.add_argument("--peers", default="1,8,32,64,128")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), int(a.child[2]))
        return 0
    counts = sorted({1, *(int(x) for x in a.peers.split(","))})
    results = []
    env = {**os.environ, "FI_TCP_IFACE": "lo", "UCX_NET_DEVICES": "lo"}
    for transport in a.transports.split(","):
        base = None
        for n in counts:
            print(f"{transport}: {n} peer(s)...", flush=True)
            cmd = [sys.executable, "-X", "faulthandler", __file__, "--child", transport, str(n), str(a.rounds)]
            out = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise SystemExit(f"{transport} with {n} peers failed (exit status {out.returncode}): "
                                 f"{out.stderr[-2000:]} {out.stdout[-500:]}")
            row = {"transport": transport, "peers": n, **json.loads(out.stdout.strip().splitlines()[-1])}
            base = base or row
            row["ratio_to_1_peer"] = row["gbps"] / base["gbps"]
            row["one_block_vs_1_peer"] = row["one_block_p50_us"] / base["one_block_p50_us"]
            results.append(row)
            print(f"  {n:4} peers (max_peers {row['max_peers']}): round p50 {1e3 * row['round_p50_s']:.1f} ms, "
                  f"{row['gbps']:.2f} GB/s = {row['ratio_to_1_peer']:.2f} of 1 peer; 1-block p50 "
                  f"{row['one_block_p50_us']:.0f} us ({row['one_block_vs_1_peer']:.2f}x); connect {row['connect_s']:.1f} s;"
                  f" idle {row['idle_cores']:.2f} cores ({row['idle_ms_per_agent_per_s']:.1f} ms/s per agent);"
                  f" unknown imms {row['unknown_imms']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"schema": 1, "transfers_per_round": TRANSFERS_PER_ROUND, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
