"""Transfers between pools of different tensor-parallel ranks: the reference request (Llama-3-8B shape: 32 layers,
K and V, 16-token blocks, 8 KV heads of 128 dims, bf16, 256 random of 512 blocks) from a TP 1 prefill pool into
decode rank 0 of TP 2, which takes heads 0-3 of every block: 256 MiB.

    .venv/bin/python benchmarks/bench_tp_heads.py [--transports cma,tcp] [--reps 5] [--json PATH]

Cases, each between two agents in this process:
  equal TP       a TP 2 rank's pool into the same rank's pool: whole 16 KiB chunks (the same bytes, no slicing)
  TP1->TP2 HND   head-major chunks: each rank's heads are contiguous, one 16 KiB piece per chunk
  TP1->TP2 NHD   token-major chunks (vLLM's default): one 1 KiB piece (4 heads of one token) per token, 16 per chunk
                 (over a fabric packed through the sender's bounce ring: path "staged")
Each is reported against limits measured in the same run: a one-thread numpy copy of 256 MiB (memcpy) and, for
tcp, raw loopback TCP of 256 MiB (one sendall between two threads); and against the equal-TP transfer. The
destination's moved blocks are checked against the source's heads after the timed runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("FI_TCP_IFACE", "lo")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kvxfer  # noqa: E402
from kvxfer.bench.limits import loopback_tcp_gbps, memcpy_gbps  # noqa: E402

LAYERS, POOL_BLOCKS, REQ_BLOCKS, HEADS, DIM = 32, 512, 256, 8, 128


def whole(head_major: bool) -> kvxfer.KVLayout:
    return kvxfer.KVLayout.vllm_flash(LAYERS, POOL_BLOCKS, 16, HEADS, DIM, "bfloat16", head_major=head_major)


def pool(layout: kvxfer.KVLayout, seed: int) -> list:
    # A cheap pattern that differs per layer and byte (so misplaced rows show), touched so pages are mapped.
    return [((np.arange(layout.tensor_layer_bytes, dtype=np.uint32) * 7 + seed * 131 + layer) % 251).astype(np.uint8)
            for layer in range(layout.num_layers)]


def rows(layout: kvxfer.KVLayout, chunks: np.ndarray) -> np.ndarray:
    """[..., chunk_bytes] as [..., block_size, heads, row]."""
    lead = chunks.shape[:-1]
    if layout.head_major:
        return chunks.reshape(*lead, layout.num_kv_heads, layout.block_size, -1).swapaxes(-3, -2)
    return chunks.reshape(*lead, layout.block_size, layout.num_kv_heads, -1)


def verify(src_l, dst_l, src, dst, src_ids, dst_ids) -> bool:
    h0 = dst_l.head_begin - src_l.head_begin
    for layer in (0, LAYERS // 2, LAYERS - 1):
        s = src[layer].reshape(2, POOL_BLOCKS, -1)[:, src_ids]
        d = dst[layer].reshape(2, POOL_BLOCKS, -1)[:, dst_ids]
        if not np.array_equal(rows(src_l, s)[..., h0:h0 + dst_l.num_kv_heads, :], rows(dst_l, d)):
            return False
    return True


def same_run_limits(transport: str, nbytes: int) -> dict:
    """The limits of this run, printed: a one-thread memcpy of nbytes, and raw loopback TCP for tcp."""
    limits = {"memcpy": memcpy_gbps(nbytes)}
    if transport == "tcp":
        limits["tcp"] = loopback_tcp_gbps(nbytes)
    print(f"{transport}: limits " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in limits.items()), flush=True)
    return limits


def run_case(transport: str, src_l, dst_l, src, dst, src_ids, dst_ids, reps: int, name: str) -> dict:
    a = kvxfer.Agent(f"tp-{name}-a-{transport}", transport=transport, interface="lo", timeout_s=120)
    b = kvxfer.Agent(f"tp-{name}-b-{transport}", transport=transport, interface="lo", timeout_s=120)
    a.register_pool(src, src_l)
    b.register_pool(dst, dst_l)
    pb, pa = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(pb, 20)
    b.wait_connected(pa, 20)
    times, nbytes, writes = [], 0, 0
    for x in range(reps + 1):  # the first is a warm-up
        recv = b.recv(pa, x + 1, dst_ids)
        send = a.send(pb, x + 1, src_ids, dst_ids)
        t = time.perf_counter()
        send.all_ready()
        recv.wait(timeout_s=120)
        dt = time.perf_counter() - t
        send.wait(timeout_s=120)
        nbytes, writes, path = send.nbytes, send.num_writes, send.path
        if x:
            times.append(dt)
    ok = verify(src_l, dst_l, src, dst, src_ids, dst_ids)
    a.close()
    b.close()
    return {"case": name, "transport": transport, "path": path, "nbytes": nbytes, "writes": writes, "seconds": times,
            "gbps_best": nbytes / min(times) / 1e9, "gbps_median": nbytes / statistics.median(times) / 1e9,
            "verified": ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transports", default="cma,tcp")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(7)
    src_ids = rng.permutation(POOL_BLOCKS)[:REQ_BLOCKS].astype(np.int32)
    dst_ids = rng.permutation(POOL_BLOCKS)[:REQ_BLOCKS].astype(np.int32)
    rank_nhd, rank_hnd = whole(False).for_tp_rank(2, 0), whole(True).for_tp_rank(2, 0)
    dst_nhd, dst_hnd = pool(rank_nhd, 2), pool(rank_hnd, 2)
    cases = [("equal TP", rank_nhd, rank_nhd, pool(rank_nhd, 1), dst_nhd),
             ("TP1->TP2 HND", whole(True), rank_hnd, pool(whole(True), 1), dst_hnd),
             ("TP1->TP2 NHD", whole(False), rank_nhd, pool(whole(False), 1), dst_nhd)]
    out = []
    for transport in args.transports.split(","):
        nbytes = REQ_BLOCKS * 2 * LAYERS * rank_nhd.chunk_bytes
        limits = same_run_limits(transport, nbytes)
        equal = None
        for name, sl, dl, s, d in cases:
            r = run_case(transport, sl, dl, s, d, src_ids, dst_ids, args.reps, name)
            r["limits_gbps"] = limits
            equal = equal or r["gbps_median"]
            lim = limits.get(transport, limits["memcpy"])
            print(f"  {name:13s} {r['path']:7s} {r['writes']:>8,} writes  median {r['gbps_median']:6.2f} GB/s (best "
                  f"{r['gbps_best']:.2f})  {r['gbps_median'] / lim:5.2f} of {'tcp' if transport == 'tcp' else 'memcpy'}"
                  f"  {r['gbps_median'] / equal:5.2f} of equal TP  verified={r['verified']}", flush=True)
            out.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if all(r["verified"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
