"""What per-peer keys cost over tcp: KVXFER_PEER_KEYS=own (the default) against shared, in the same run.

    .venv/bin/python benchmarks/bench_peer_keys.py [--peers 64] [--regions 1,64,256] [--pairs 3] [--json PATH]

With own keys a receiver registers each region it exposes once more for every peer (remote access under that peer's
key), when the peer is added and, for pools registered later, for every peer it has. For each region count, fresh
processes alternate own / shared (--pairs of each); each opens a receiver whose pool has that many regions (one per
layer, 64 blocks of 4 KiB chunks) and --peers sender agents, and reports:
- add_peer: the median and worst time of the receiver's add_peer(metadata) over the peers;
- register_pool: the time to register a second pool of as many regions with all those peers present;
- bandwidth: one sender moving all 64 blocks of every layer into the reversed block ids (so every 4 KiB chunk is a
  piece of its own, gathered up to the provider's iov limit per write; landing slots off) while every other peer
  is added, as the median of 10 transfers; reported as own / shared.
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


def child(mode: str, peers: int, regions: int) -> dict:
    import numpy as np

    import kvxfer

    layout = kvxfer.KVLayout.vllm_flash(regions, 64, 16, 2, 64, "float16")  # 4 KiB chunks, 64 blocks per layer
    pool = [np.zeros(layout.tensor_layer_bytes, np.uint8) for _ in range(regions)]
    receiver = kvxfer.Agent("keys-rx", transport="tcp", interface="lo", max_peers=128, timeout_s=120)
    receiver.register_pool(pool, layout)
    senders = [kvxfer.Agent(f"keys-tx-{i}", transport="tcp", interface="lo") for i in range(peers)]
    src = [np.full(layout.tensor_layer_bytes, 7, np.uint8) for _ in range(regions)]
    senders[0].register_pool(src, layout)
    add_s, handles = [], []
    for s in senders:
        md = s.metadata()
        t0 = time.perf_counter()
        handles.append(receiver.add_peer(md))
        add_s.append(time.perf_counter() - t0)
    second = [np.zeros(layout.tensor_layer_bytes, np.uint8) for _ in range(regions)]
    t0 = time.perf_counter()
    receiver.register_pool(second, layout, name="second")
    register_s = time.perf_counter() - t0
    to_rx = senders[0].add_peer(receiver.metadata())
    senders[0].wait_connected(to_rx, 60)
    receiver.wait_connected(handles[0], 60)
    src_ids, dst_ids = list(range(64)), list(range(63, -1, -1))  # reversed: no two chunks merge into one piece
    times = []
    for i in range(11):
        recv = receiver.recv(handles[0], i, dst_ids)
        t0 = time.perf_counter()
        senders[0].send(to_rx, i, src_ids, dst_ids).all_ready()
        recv.wait(timeout_s=120)
        times.append(time.perf_counter() - t0)
    assert all((p == 7).all() for p in pool), "the destination pool does not hold the source bytes"
    moved = regions * 64 * 2 * layout.chunk_bytes
    for s in senders:
        s.close()
    receiver.close()
    return {"mode": mode, "add_peer_ms_p50": 1e3 * statistics.median(add_s), "add_peer_ms_max": 1e3 * max(add_s),
            "register_pool_ms": 1e3 * register_s, "gbps": moved / statistics.median(times[1:]) / 1e9,
            "bytes": moved}


def run_child(mode: str, peers: int, regions: int) -> dict:
    env = dict(os.environ, FI_TCP_IFACE="lo", PYTHONPATH=ROOT, KVXFER_PEER_KEYS=mode, KVXFER_LANDING="needed")
    proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--child", mode, "--peers", str(peers),
                           "--regions", str(regions)], env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=64)
    ap.add_argument("--regions", default="1,64,256")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.peers, int(args.regions))))
        return
    rows = []
    print(f"{'regions':>7} {'mode':>6} {'add_peer p50':>12} {'max':>8} {'register_pool':>13} {'GB/s':>6}", flush=True)
    for regions in [int(r) for r in args.regions.split(",")]:
        runs = {"own": [], "shared": []}
        for k in range(args.pairs):
            for mode in ("own", "shared") if k % 2 == 0 else ("shared", "own"):
                r = run_child(mode, args.peers, regions)
                runs[mode].append(r)
                print(f"{regions:>7} {mode:>6} {r['add_peer_ms_p50']:>10.2f}ms {r['add_peer_ms_max']:>6.1f}ms "
                      f"{r['register_pool_ms']:>11.1f}ms {r['gbps']:>6.2f}", flush=True)
        med = {m: {k: statistics.median(r[k] for r in v) for k in ("add_peer_ms_p50", "register_pool_ms", "gbps")}
               for m, v in runs.items()}
        summary = {"regions": regions, "peers": args.peers, "own": med["own"], "shared": med["shared"],
                   "bandwidth_own_over_shared": med["own"]["gbps"] / med["shared"]["gbps"], "runs": runs}
        rows.append(summary)
        print(f"  regions {regions}: add_peer {med['own']['add_peer_ms_p50']:.2f} vs "
              f"{med['shared']['add_peer_ms_p50']:.2f} ms, register_pool with {args.peers} peers "
              f"{med['own']['register_pool_ms']:.1f} vs {med['shared']['register_pool_ms']:.1f} ms, "
              f"bandwidth own/shared {summary['bandwidth_own_over_shared']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
