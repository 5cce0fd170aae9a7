"""GPU path benchmarks against limits measured in the same run (needs an NVIDIA GPU and torch with CUDA).

    python benchmarks/bench_gpu.py [--reps 5] [--json out.json]

  cuda_ipc : the reference request (Llama-3-8B shape: 32 layers, 256 random blocks of 16 tokens x 8 heads x 128
             dims bf16, K and V: 16,384 chunks of 32 KiB = 512 MiB) from a GPU pool in this process into a GPU pool
             of another process on the same GPU, as a ratio of one cudaMemcpy device-to-device of 512 MiB.
  staged   : the same request from a GPU pool into a host pool of the other process (GPU -> pinned bounce slots ->
             cma), as a ratio of one pinned device-to-host copy of 512 MiB.

Each rep times send() .. DONE on the sender (DONE means the receiver counted every chunk); the destination is
verified byte for byte once per path. Without a GPU it prints why and exits 1.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

ARGS = (32, 1024, 16, 8, 128, "bfloat16")  # pools of 1024 blocks; each request moves 256 of them
NUM_IDS = 256


def _receiver(conn, where):
    os.environ.setdefault("FI_TCP_IFACE", "lo")
    import torch

    import kvxfer

    layout = kvxfer.KVLayout.vllm_flash(*ARGS)
    agent = kvxfer.Agent("bench-recv", interface="lo", timeout_s=120)
    pool = [torch.zeros(layout.tensor_layer_bytes, dtype=torch.uint8, device=where) for _ in range(layout.num_layers)]
    agent.register_pool(pool, layout)
    conn.send(agent.metadata())
    peer = agent.add_peer(conn.recv())
    agent.wait_connected(peer, 30)
    while True:
        msg = conn.recv()
        if msg[0] == "recv":
            _, xfer, dst_ids = msg
            agent.recv(peer, xfer, np.asarray(dst_ids, dtype=np.int32)).wait(timeout_s=120)
            conn.send("done")
        elif msg[0] == "read":
            _, layer, dst_ids = msg
            view = pool[layer].view(2, layout.num_blocks, -1)[:, torch.as_tensor(dst_ids, device=pool[layer].device)]
            conn.send(view.cpu().numpy())
        else:
            return


def _limit_seconds(nbytes, src_device, dst_device, pinned):
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=src_device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_device, pin_memory=pinned and dst_device == "cpu")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def run_path(name, where, reps):
    import torch

    import kvxfer

    layout = kvxfer.KVLayout.vllm_flash(*ARGS)
    nbytes = layout.num_layers * 2 * NUM_IDS * layout.chunk_bytes
    assert nbytes == 512 << 20
    limit_s = _limit_seconds(nbytes, "cuda", "cuda" if where == "cuda" else "cpu", pinned=True)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child, where), daemon=True)
    proc.start()
    agent = kvxfer.Agent("bench-send", interface="lo", timeout_s=120)
    gen = torch.Generator(device="cuda").manual_seed(1)
    src = [torch.randint(0, 255, (layout.tensor_layer_bytes,), dtype=torch.uint8, device="cuda", generator=gen)
           for _ in range(layout.num_layers)]
    agent.register_pool(src, layout)
    peer = agent.add_peer(conn.recv())
    conn.send(agent.metadata())
    agent.wait_connected(peer, 30)
    rng = np.random.default_rng(0)
    times, opens, path = [], [], None
    for rep in range(reps + 1):  # rep 0 warms up (IPC mapping, staging ring, copy queue)
        src_ids = rng.choice(layout.num_blocks, NUM_IDS, replace=False).astype(np.int32)
        dst_ids = rng.choice(layout.num_blocks, NUM_IDS, replace=False).astype(np.int32)
        conn.send(("recv", rep, dst_ids.tolist()))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        send = agent.send(peer, rep, src_ids, dst_ids)
        t_open = time.perf_counter() - t0  # send(): the plan of 16,384 chunks, before any byte moves
        send.all_ready()
        send.wait(timeout_s=120)
        dt = time.perf_counter() - t0
        assert conn.recv() == "done"
        path = send.path
        if rep:
            times.append(dt)
            opens.append(t_open)
    for layer in (0, layout.num_layers - 1):  # verify the last request's bytes on two layers
        conn.send(("read", layer, dst_ids.tolist()))
        got = conn.recv()
        want = src[layer].view(2, layout.num_blocks, -1)[:, torch.as_tensor(src_ids, device="cuda")].cpu().numpy()
        assert np.array_equal(got, want), f"{name}: layer {layer} bytes differ"
    conn.send(("exit",))
    proc.join(10)
    best = min(times)
    return {"path": name, "send_path": path, "bytes": nbytes, "best_s": best, "median_s": float(np.median(times)),
            "gbps": nbytes / best / 1e9, "limit_gbps": nbytes / limit_s / 1e9, "ratio": limit_s / best,
            "limit": "cudaMemcpy D2D 512 MiB" if where == "cuda" else "pinned D2H 512 MiB", "verified": True,
            "copy_mode": os.environ.get("KVXFER_GPU_COPY", "auto"), "send_call_median_s": float(np.median(opens))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_gpu: torch is not installed", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible (this benchmark needs an NVIDIA GPU)", file=sys.stderr)
        return 1
    rows = [run_path("cuda_ipc", "cuda", args.reps), run_path("staged", "cpu", args.reps)]
    print(f"device: {torch.cuda.get_device_name(0)}")
    print(f"{'path':10} {'send path':10} {'GB/s':>8} {'limit GB/s':>11} {'ratio':>6}  limit")
    for r in rows:
        print(f"{r['path']:10} {r['send_path']:10} {r['gbps']:8.1f} {r['limit_gbps']:11.1f} {r['ratio']:6.2f}  {r['limit']}"
              f"  (send() call {r['send_call_median_s'] * 1e3:.2f} ms of {r['median_s'] * 1e3:.2f} ms median)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
