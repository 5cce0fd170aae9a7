"""Transfers between pools of different block sizes: the reference request (Llama-3-8B shape: 32 layers, K and V,
8 KV heads of 128 dims, bf16; 4096 tokens) from a pool of 16-token blocks into one of 32-token blocks and back,
512 MiB, with send/recv(num_tokens=4096).

    .venv/bin/python benchmarks/bench_block_sizes.py [--transports cma,tcp] [--reps 5] [--json PATH]

Cases, each between two agents in this process, random block ids on both sides:
  16 -> 16 NHD   equal block sizes (whole 32 KiB chunks): the yardstick
  16 -> 32 NHD   a 16-token block lands in half of a 32-token one: one 32 KiB piece (token-major rows are contiguous)
  32 -> 16 NHD   a 32-token block lands in two 16-token blocks
  16 -> 32 HND   head-major: a half block is 8 strided pieces of 4 KiB (one per head)
Reported as a ratio to the equal-block transfer and to the same-run limits of bench_tp_heads.py (a one-thread numpy
copy of 512 MiB; raw loopback TCP). Three layers of every destination are checked token by token.
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
from benchmarks.bench_tp_heads import pool, rows, same_run_limits  # noqa: E402

LAYERS, HEADS, DIM, TOKENS = 32, 8, 128, 4096


def layout(block_size: int, head_major: bool) -> kvxfer.KVLayout:
    blocks = 2 * TOKENS // block_size  # room for random ids
    return kvxfer.KVLayout.vllm_flash(LAYERS, blocks, block_size, HEADS, DIM, "bfloat16", head_major=head_major)


def verify(src_l, dst_l, src, dst, src_ids, dst_ids) -> bool:
    bs, bd = src_l.block_size, dst_l.block_size
    for layer in (0, LAYERS // 2, LAYERS - 1):
        s = rows(src_l, src[layer].reshape(2, src_l.num_blocks, -1)[:, src_ids].reshape(-1, src_l.chunk_bytes))
        d = rows(dst_l, dst[layer].reshape(2, dst_l.num_blocks, -1)[:, dst_ids].reshape(-1, dst_l.chunk_bytes))
        s = s.reshape(2, len(src_ids), bs, HEADS, -1).reshape(2, -1, HEADS, s.shape[-1])[:, :TOKENS]
        d = d.reshape(2, len(dst_ids), bd, HEADS, -1).reshape(2, -1, HEADS, d.shape[-1])[:, :TOKENS]
        if not np.array_equal(s, d):
            return False
    return True


def run_case(transport, bs, bd, head_major, reps, rng) -> dict:
    src_l, dst_l = layout(bs, head_major), layout(bd, head_major)
    src_ids = rng.permutation(src_l.num_blocks)[:TOKENS // bs].astype(np.int32)
    dst_ids = rng.permutation(dst_l.num_blocks)[:TOKENS // bd].astype(np.int32)
    src, dst = pool(src_l, 1), pool(dst_l, 2)
    name = f"{bs}->{bd} {'HND' if head_major else 'NHD'}"
    a = kvxfer.Agent(f"bsz-a-{transport}-{bs}{bd}{int(head_major)}", transport=transport, interface="lo",
                     timeout_s=120)
    b = kvxfer.Agent(f"bsz-b-{transport}-{bs}{bd}{int(head_major)}", transport=transport, interface="lo",
                     timeout_s=120)
    a.register_pool(src, src_l)
    b.register_pool(dst, dst_l)
    pb, pa = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(pb, 20)
    b.wait_connected(pa, 20)
    times = []
    for x in range(reps + 1):  # the first is a warm-up
        recv = b.recv(pa, x + 1, dst_ids, num_tokens=TOKENS)
        send = a.send(pb, x + 1, src_ids, dst_ids, num_tokens=TOKENS)
        t = time.perf_counter()
        send.all_ready()
        recv.wait(timeout_s=120)
        dt = time.perf_counter() - t
        send.wait(timeout_s=120)
        if x:
            times.append(dt)
    r = {"case": name, "transport": transport, "path": send.path, "nbytes": send.nbytes, "writes": send.num_writes,
         "seconds": times, "gbps_median": send.nbytes / statistics.median(times) / 1e9,
         "verified": verify(src_l, dst_l, src, dst, src_ids, dst_ids)}
    a.close()
    b.close()
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transports", default="cma,tcp")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = []
    nbytes = TOKENS * LAYERS * 2 * HEADS * DIM * 2
    for transport in args.transports.split(","):
        limits = same_run_limits(transport, nbytes)
        equal = None
        for bs, bd, hm in ((16, 16, False), (16, 32, False), (32, 16, False), (16, 32, True)):
            r = run_case(transport, bs, bd, hm, args.reps, np.random.default_rng(bs * 100 + bd))
            r["limits_gbps"] = limits
            equal = equal or r["gbps_median"]
            lim_name = "tcp" if transport == "tcp" else "memcpy"
            print(f"  {r['case']:13s} {r['path']:7s} {r['writes']:>8,} writes  median {r['gbps_median']:6.2f} GB/s  "
                  f"{r['gbps_median'] / limits[lim_name]:5.2f} of {lim_name}  {r['gbps_median'] / equal:5.2f} of "
                  f"16->16  verified={r['verified']}", flush=True)
            out.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if all(r["verified"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
