"""GPU path benchmarks against limits measured in the same run (needs an NVIDIA GPU and torch with CUDA).

    python benchmarks/bench_gpu.py [--reps 5] [--json out.json]

  cuda_ipc : the reference request (Llama-3-8B shape: 32 layers, 256 random blocks of 16 tokens x 8 heads x 128
             dims bf16, K and V: 16,384 chunks of 32 KiB = 512 MiB) from a GPU pool in this process into a GPU pool
             of another process on the same GPU, as a ratio of one cudaMemcpy device-to-device of 512 MiB; run
             twice: the batched launch (one gather kernel for the layers ready together, marking each layer landed)
             and KVXFER_GPU_LAUNCH=per_layer (one launch and one event per layer, as measured in November 2026).
  staged   : the same request from a GPU pool into a host pool of the other process (GPU -> pinned bounce slots ->
             cma), as a ratio of one pinned device-to-host copy of 512 MiB; on 16+ cores also with 8 CMA
             copy-out workers (KVXFER_CMA_THREADS=8; the default is half the CPUs, at most 4).
  landing  : the same request GPU pool -> GPU pool with both agents on transport tcp, as between two hosts without
             GPU-direct RDMA (GPU -> pinned bounce slots -> tcp -> the receiver's pinned landing slots -> GPU), as
             a ratio of raw loopback TCP carrying 512 MiB between two threads (the wire this path crosses).

Each rep times send() .. DONE on the sender (DONE means the receiver counted every chunk); the last request's
addressed blocks are compared byte for byte with the source on its first, middle and last layers (the other
blocks are not read back here: tests/gpu checks guards). Also printed: the ratio of the time after the send() call (an engine calls
send() when it schedules the request, before any layer is ready, so the plan build hides behind prefill) and how
same-host completions travel (doorbell rings or fabric), and the gather kernel alone on the same chunks (one
launch per layer, one for all layers, and the batched launch with its per-layer words) against the same limit.
Without a GPU it prints why and exits 1.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback

import numpy as np

from kvxfer.bench.pools import copy_limit_seconds

ARGS = (32, 1024, 16, 8, 128, "bfloat16")  # pools of 1024 blocks; each request moves 256 of them
NUM_IDS = 256


def _receiver(conn, where, transport):
    os.environ.setdefault("FI_TCP_IFACE", "lo")
    import torch

    import kvxfer

    layout = kvxfer.KVLayout.vllm_flash(*ARGS)
    agent = kvxfer.Agent("bench-recv", transport=transport, interface="lo", timeout_s=120)
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


def _tcp_limit_seconds(nbytes):
    """Raw loopback TCP: one sendall of nbytes from a thread into recv_into on another, best of 3."""
    import socket
    import threading

    best = float("inf")
    payload = memoryview(bytearray(nbytes))
    sink = bytearray(4 << 20)
    for _ in range(3):
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()

        def drain(sock):
            got = 0
            while got < nbytes:
                n = sock.recv_into(sink)
                if n == 0:  # the sender closed (sendall failed): stop rather than spin
                    return
                got += n

        t = threading.Thread(target=drain, args=(conn,), daemon=True)
        t.start()
        t0 = time.perf_counter()
        client.sendall(payload)
        t.join()
        best = min(best, time.perf_counter() - t0)
        for sock in (client, conn, server):
            sock.close()
    return best


def _recv_within(conn, proc, timeout_s, what):
    """The receiver's next message, or an error naming why not: a receiver that died (CUDA init, the agent) or hangs
    must not hold the whole benchmark until the step's own timeout."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"the receiver process exited (code {proc.exitcode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from the receiver within {timeout_s:.0f} s while waiting for {what}")
    try:
        return conn.recv()
    except EOFError:  # its end closed: it exited
        proc.join(5)
        raise RuntimeError(f"the receiver process exited (code {proc.exitcode}) while waiting for {what}") from None


@contextlib.contextmanager
def env(**settings):
    """Environment variables for one row, restored after it (a caller's own value included)."""
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_path(name, where, reps, transport="auto"):
    import kvxfer

    layout = kvxfer.KVLayout.vllm_flash(*ARGS)
    nbytes = layout.num_layers * 2 * NUM_IDS * layout.chunk_bytes
    assert nbytes == 512 << 20
    if transport == "tcp":
        limit_s, limit = _tcp_limit_seconds(nbytes), "raw loopback TCP 512 MiB"
    elif where == "cuda":
        limit_s, limit = copy_limit_seconds(nbytes, "cuda", "cuda"), "cudaMemcpy D2D 512 MiB"
    else:
        limit_s, limit = copy_limit_seconds(nbytes, "cuda", "cpu"), "pinned D2H 512 MiB"
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child, where, transport), daemon=True)
    proc.start()
    child.close()  # ours only in the receiver: its death then shows as a closed pipe
    try:
        return _run_path(name, reps, transport, layout, nbytes, limit_s, limit, conn, proc)
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join(10)


def _run_path(name, reps, transport, layout, nbytes, limit_s, limit, conn, proc):
    import torch

    import kvxfer

    agent = kvxfer.Agent("bench-send", transport=transport, interface="lo", timeout_s=120)
    gen = torch.Generator(device="cuda").manual_seed(1)
    src = [torch.randint(0, 255, (layout.tensor_layer_bytes,), dtype=torch.uint8, device="cuda", generator=gen)
           for _ in range(layout.num_layers)]
    agent.register_pool(src, layout)
    peer = agent.add_peer(_recv_within(conn, proc, 120, "its metadata"))
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
        assert _recv_within(conn, proc, 150, f"request {rep}") == "done"
        path = send.path
        if rep:
            times.append(dt)
            opens.append(t_open)
    for layer in sorted({0, layout.num_layers // 2, layout.num_layers - 1}):  # the last request's bytes
        conn.send(("read", layer, dst_ids.tolist()))
        got = _recv_within(conn, proc, 60, f"layer {layer}'s bytes")
        want = src[layer].view(2, layout.num_blocks, -1)[:, torch.as_tensor(src_ids, device="cuda")].cpu().numpy()
        assert np.array_equal(got, want), f"{name}: layer {layer} bytes differ"
    conn.send(("exit",))
    best = min(times)
    diffs = [t - o for t, o in zip(times, opens)]
    goal = GOALS.get(name)
    return {"path": name, "send_path": path, "bytes": nbytes, "best_s": best, "median_s": float(np.median(times)),
            "gbps": nbytes / best / 1e9, "limit_gbps": nbytes / limit_s / 1e9, "ratio": limit_s / best,
            "goal": goal, "goal_met": None if goal is None else limit_s / best >= goal,
            "limit": limit, "verified": True, "path_reason": send.path_reason,
            "copy_mode": os.environ.get("KVXFER_GPU_COPY", "auto"), "send_call_median_s": float(np.median(opens)),
            "launch": os.environ.get("KVXFER_GPU_LAUNCH", "batched") if path == "cuda_ipc" else None,
            "cma_threads": agent.cma_threads, "doorbell": os.environ.get("KVXFER_DOORBELL", "1") != "0",
            "gpu_layer_launches_per_request": agent.stats()["gpu_layer_launches"] / (reps + 1),
            "signals": peer.signals, "data_ratio": limit_s / float(np.median(diffs))}


def kernel_only(reps):
    """The gather kernel alone on the reference request's 16,384 chunks (both pools in this process): one launch
    per layer, as cuda_ipc enqueues them, one launch for all 32 layers, the batched launch with a word per layer,
    and the staged copy-in (the chunks into pinned host memory, a launch per 4 MiB slot). Separates the kernel's
    own speed from the host work and the protocol around it."""
    import torch

    import kvxfer
    from kvxfer import _C

    layout = kvxfer.KVLayout.vllm_flash(*ARGS)
    nbytes = layout.num_layers * 2 * NUM_IDS * layout.chunk_bytes
    limit_s = copy_limit_seconds(nbytes, "cuda", "cuda")
    src = [torch.empty(layout.tensor_layer_bytes, dtype=torch.uint8, device="cuda") for _ in range(layout.num_layers)]
    dst = [torch.empty(layout.tensor_layer_bytes, dtype=torch.uint8, device="cuda") for _ in range(layout.num_layers)]
    rng = np.random.default_rng(0)
    src_ids = rng.choice(layout.num_blocks, NUM_IDS, replace=False)
    dst_ids = rng.choice(layout.num_blocks, NUM_IDS, replace=False)
    d, s_, groups = [], [], [0]
    for layer in range(layout.num_layers):
        for p in range(2):
            d += [dst[layer].data_ptr() + p * layout.plane_stride + int(b) * layout.block_stride for b in dst_ids]
            s_ += [src[layer].data_ptr() + p * layout.plane_stride + int(b) * layout.block_stride for b in src_ids]
        groups.append(len(d))
    d, s_ = np.array(d, np.uint64), np.array(s_, np.uint64)
    sizes = np.full(len(d), layout.chunk_bytes, np.uint64)
    rows = []
    for label, g in (("per layer (32 launches)", groups), ("all layers (1 launch)", [0, len(d)])):
        t = _C.gpu_gather_seconds(torch.cuda.current_device(), d, s_, sizes, np.array(g, np.uint32), reps)
        rows.append({"path": "kernel only", "launches": label, "best_s": t, "gbps": nbytes / t / 1e9,
                     "limit_gbps": nbytes / limit_s / 1e9, "ratio": limit_s / t, "limit": "cudaMemcpy D2D 512 MiB"})
    # cuda_ipc's batched launch (CopyQueue::copy_layers): one layer's chunks relative to each layer's bases, every
    # layer marked landed by the kernel; timed until the host saw the last layer's word.
    per_layer = groups[1]
    rel_d = (d[:per_layer] - np.uint64(dst[0].data_ptr())).astype(np.uint64)
    rel_s = (s_[:per_layer] - np.uint64(src[0].data_ptr())).astype(np.uint64)
    # Blocks fence once per KVXFER_GPU_FENCE_KIB copied (default 256: 8 layers of the reference), and, to compare,
    # after every layer (0, the design before 2026-12-04). Only where copy_layers serves (batched launch, kernel).
    default_fence = os.environ.get("KVXFER_GPU_FENCE_KIB")
    batched = (os.environ.get("KVXFER_GPU_LAUNCH", "batched") == "batched"
               and os.environ.get("KVXFER_GPU_COPY", "auto") != "copy_engine")
    for fence_kib in ([default_fence] if default_fence is not None else [None, "0"]) if batched else []:
        with env(**({"KVXFER_GPU_FENCE_KIB": fence_kib} if fence_kib is not None else {})):
            t = _C.gpu_copy_layers_seconds(torch.cuda.current_device(), rel_d, rel_s, sizes[:per_layer],
                                           np.array([x.data_ptr() for x in src], np.uint64),
                                           np.array([x.data_ptr() for x in dst], np.uint64), reps)
        rows.append({"path": "kernel only", "best_s": t, "fence_kib": fence_kib or "256 (default)",
                     "launches": "all layers (1 launch, a word per layer, "
                     + ("a fence per layer)" if fence_kib == "0" else f"a fence per {fence_kib or 256} KiB)"),
                     "gbps": nbytes / t / 1e9, "limit_gbps": nbytes / limit_s / 1e9, "ratio": limit_s / t,
                     "limit": "cudaMemcpy D2D 512 MiB"})
    # The staged path's copy-in: the same chunks gathered into pinned host memory back to back, one launch per 4 MiB
    # bounce slot (128 chunks) as the staged path cuts them; against a pinned D2H memcpy of the same bytes. Says
    # whether the GPU side or the copy-out can hold the staged path below 0.7.
    del dst
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2h_limit_s = copy_limit_seconds(nbytes, "cuda", "cpu")
    hd = np.uint64(host.data_ptr()) + np.arange(len(s_), dtype=np.uint64) * np.uint64(layout.chunk_bytes)
    slots = list(range(0, len(s_), 128)) + [len(s_)]
    t = _C.gpu_gather_seconds(torch.cuda.current_device(), hd, s_, sizes, np.array(slots, np.uint32), reps)
    rows.append({"path": "kernel only", "launches": "D2H into pinned, 1 launch per 4 MiB slot", "best_s": t,
                 "gbps": nbytes / t / 1e9, "limit_gbps": nbytes / d2h_limit_s / 1e9, "ratio": d2h_limit_s / t,
                 "limit": "pinned D2H 512 MiB"})
    return rows


GOALS = {"cuda_ipc": 0.8, "staged": 0.7}  # issue 3: of same-run cudaMemcpy D2D / pinned D2H


def _run_meta(torch, reps):
    from kvxfer import _C

    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "driver": out(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "kvxfer_build": _C.build_info, "commit": out(["git", "rev-parse", "--short", "HEAD"]), "reps": reps,
            "cpus": os.cpu_count(), "goals": GOALS,
            "env": {k: v for k, v in os.environ.items() if k.startswith("KVXFER_")}}


def _print_row(r):
    if "error" in r:
        print(f"{r['path']:10} FAILED ({r.get('label', '')}): {r['error']}", flush=True)
    elif r["path"] == "kernel only":
        print(f"{r['path']:10} {'':10} {r['gbps']:8.1f} {r['limit_gbps']:11.1f} {r['ratio']:6.2f}  {r['limit']}"
              f"  ({r['launches']}, {r['best_s'] * 1e3:.3f} ms)", flush=True)
    else:
        goal = GOALS.get(r["path"])
        verdict = "" if goal is None else f" [goal {goal}: {'met' if r['ratio'] >= goal else 'not met'}]"
        print(f"{r['path']:10} {r['send_path']:10} {r['gbps']:8.1f} {r['limit_gbps']:11.1f} {r['ratio']:6.2f}  "
              f"{r['limit']}{verdict}  (send() call {r['send_call_median_s'] * 1e3:.2f} ms of "
              f"{r['median_s'] * 1e3:.2f} ms median; after send(): {r['data_ratio']:.2f} of the limit; signals: "
              f"{r['signals']}{'; launch ' + r['launch'] if r['launch'] else ''}"
              f"{'; cma threads ' + str(r['cma_threads']) if r['path'] == 'staged' else ''})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--compare-fabric-signals", action="store_true",
                    help="also run both paths with KVXFER_DOORBELL=0 (completions as zero-byte fabric writes)")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_gpu: torch is not installed", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible (this benchmark needs an NVIDIA GPU)", file=sys.stderr)
        return 1
    doc = {**_run_meta(torch, args.reps), "rows": [], "kernel_only": []}
    print(f"device: {doc['device']}  driver {doc['driver']}  torch {doc['torch']}  {doc['kvxfer_build']}")
    print(f"{'path':10} {'send path':10} {'GB/s':>8} {'limit GB/s':>11} {'ratio':>6}  limit", flush=True)
    failed = 0

    def row(key, label, fn, **settings):
        # Each row printed and saved as it ends, and a failed row recorded: one failure must not cost the others.
        nonlocal failed
        try:
            with env(**settings):
                got = fn()
        except Exception as e:  # noqa: BLE001 - recorded and reported, the other rows still run
            failed += 1
            traceback.print_exc()
            got = [{"path": label, "label": label, "error": f"{type(e).__name__}: {e}", "settings": settings}]
        for r in got if isinstance(got, list) else [got]:
            doc[key].append(r)
            _print_row(r)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)

    row("rows", "cuda_ipc", lambda: run_path("cuda_ipc", "cuda", args.reps))
    if os.environ.get("KVXFER_GPU_LAUNCH", "batched") == "batched":  # and the design measured before it
        row("rows", "cuda_ipc", lambda: run_path("cuda_ipc", "cuda", args.reps), KVXFER_GPU_LAUNCH="per_layer")
    row("rows", "staged", lambda: run_path("staged", "cpu", args.reps))
    if (os.cpu_count() or 1) >= 16 and "KVXFER_CMA_THREADS" not in os.environ:  # the copy-out with more workers
        row("rows", "staged", lambda: run_path("staged", "cpu", args.reps), KVXFER_CMA_THREADS="8")
    row("rows", "landing", lambda: run_path("landing", "cuda", args.reps, transport="tcp"))
    if args.compare_fabric_signals:  # the same paths with same-host completions over the fabric (the old way)
        row("rows", "cuda_ipc", lambda: run_path("cuda_ipc", "cuda", args.reps), KVXFER_DOORBELL="0")
        row("rows", "staged", lambda: run_path("staged", "cpu", args.reps), KVXFER_DOORBELL="0")
    row("kernel_only", "kernel only", lambda: kernel_only(args.reps))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
