"""Reference workload: one 4096-token request of a Llama-3-8B-shaped KV cache (32 layers, K and V planes, 16-token
blocks, 8 KV heads, head_dim 128, bf16): 256 blocks x 32 layers x 2 planes = 16,384 chunks of 32 KiB = 512 MiB, with
random source and destination block ids, between two processes.

Each transport is compared with a limit measured in the same run:
  cma : a single-thread process_vm_writev of the same 16,384 chunks into the same destination addresses;
  tcp : raw loopback TCP, one sendall of 512 MiB between the same two processes.
Also measured: plan build time for the request, and Send.layer_ready latency. Destination bytes are verified after
the timed runs. Usage: python benchmarks/bench_reference.py [--transports cma,tcp] [--reps 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("FI_TCP_IFACE", "lo")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_LAYERS, POOL_BLOCKS, REQ_BLOCKS = 32, 512, 256


def layout():
    import kvxfer

    return kvxfer.KVLayout.vllm_flash(NUM_LAYERS, POOL_BLOCKS, 16, 8, 128, "bfloat16")


def make_pool(seed):
    rng = np.random.default_rng(seed)
    L = layout()
    return [rng.integers(0, 2**63, L.tensor_layer_bytes // 8, dtype=np.int64).view(np.uint8) for _ in range(NUM_LAYERS)]


def ids(seed):
    rng = np.random.default_rng(seed)
    return (rng.choice(POOL_BLOCKS, REQ_BLOCKS, replace=False).astype(np.int32),
            rng.choice(POOL_BLOCKS, REQ_BLOCKS, replace=False).astype(np.int32))


def chunk_addresses(pool, block_ids):
    """[layer][plane][block] addresses of the request's chunks, in plan order."""
    L = layout()
    base = np.array([a.ctypes.data for a in pool], dtype=np.uint64)
    planes = np.arange(2, dtype=np.uint64) * np.uint64(L.plane_stride)
    blocks = block_ids.astype(np.uint64) * np.uint64(L.block_stride)
    return (base[:, None, None] + planes[None, :, None] + blocks[None, None, :]).ravel()


def sender_main(conn, transport, reps):
    import kvxfer
    from kvxfer import _C

    L = layout()
    pool = make_pool(1)
    agent = kvxfer.Agent("bench-sender", transport=transport, interface="lo", timeout_s=120)
    agent.register_pool(pool, L)
    conn.send(agent.metadata())
    peer_md, dst_bases, receiver_pid, tcp_port = conn.recv()
    peer = agent.add_peer(peer_md)
    agent.wait_connected(peer, 30)
    src_ids, dst_ids = ids(2)
    result = {"path": peer.path}
    # Same-run limit.
    if peer.path == "cma":
        src = chunk_addresses(pool, src_ids)
        dst_pool_like = [type("A", (), {"ctypes": type("C", (), {"data": b})})() for b in dst_bases]
        dst = chunk_addresses(dst_pool_like, dst_ids)
        n = np.full(src.size, L.chunk_bytes, dtype=np.uint64)
        result["limit_s"] = [_C.cma_copy_seconds(receiver_pid, src, dst, n) for _ in range(reps)]
        result["limit_name"] = "single-thread process_vm_writev of the same chunks"
    else:
        buf = np.ones(REQ_BLOCKS * NUM_LAYERS * 2 * L.chunk_bytes, np.uint8)
        times = []
        for _ in range(reps):
            s = socket.create_connection(("127.0.0.1", tcp_port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            s.sendall(memoryview(buf))
            s.recv(1)  # the receiver acks after the last byte
            times.append(time.perf_counter() - t0)
            s.close()
        result["limit_s"] = times
        result["limit_name"] = "raw loopback TCP sendall of 512 MiB"
    conn.send("limit-done")
    # kvxfer: time from send() (plan build included) until DONE (receiver confirmed every chunk).
    times = []
    for r in range(reps):
        conn.recv()  # the receiver posted its recv
        t0 = time.perf_counter()
        s = agent.send(peer, 100 + r, src_ids, dst_ids)
        s.all_ready()
        s.wait(timeout_s=120)
        times.append(time.perf_counter() - t0)
        conn.send("sent")
    result["kvxfer_s"] = times
    result["num_writes"] = s.num_writes
    # Plan build (C++ only) and layer_ready latency.
    spec = L.spec(list(range(NUM_LAYERS)), [0] * NUM_LAYERS)
    result["plan_build_s"], result["plan_writes"] = _C.time_build_plan(spec, spec, src_ids, dst_ids, 20)
    small_src, small_dst = src_ids[:16], dst_ids[:16]
    lat = []
    for r in range(20):
        conn.recv()
        s = agent.send(peer, 1000 + r, small_src, small_dst)
        for layer in range(NUM_LAYERS):
            t0 = time.perf_counter_ns()
            s.layer_ready(layer)
            lat.append((time.perf_counter_ns() - t0) / 1000)
        s.wait(timeout_s=60)
        conn.send("sent")
    result["layer_ready_us"] = lat
    conn.send(result)


def run_transport(transport, reps):
    import kvxfer

    L = layout()
    dst = [np.zeros(L.tensor_layer_bytes, np.uint8) for _ in range(NUM_LAYERS)]
    for a in dst:
        a.fill(0)  # fault the pages in now, so neither the limit nor kvxfer pays first-touch costs
    agent = kvxfer.Agent("bench-receiver", transport=transport, interface="lo", timeout_s=120)
    agent.register_pool(dst, L)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=sender_main, args=(child, transport, reps), daemon=True)
    proc.start()
    peer = agent.add_peer(conn.recv())
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    conn.send((agent.metadata(), [a.ctypes.data for a in dst], os.getpid(), lsock.getsockname()[1]))
    if transport != "cma" and transport not in ("auto", "shm"):
        sink = np.empty(REQ_BLOCKS * NUM_LAYERS * 2 * L.chunk_bytes, np.uint8)
        for _ in range(reps):
            c, _ = lsock.accept()
            view, got = memoryview(sink), 0
            while got < sink.nbytes:
                got += c.recv_into(view[got:], sink.nbytes - got)
            c.send(b"k")
            c.close()
    print(f"  [{transport}] limit measured", file=sys.stderr, flush=True)
    assert conn.recv() == "limit-done"
    src_ids, dst_ids = ids(2)
    for r in range(reps):
        recv = agent.recv(peer, 100 + r, dst_ids)
        conn.send("go")
        assert conn.recv() == "sent"
        recv.wait(timeout_s=120)
    print(f"  [{transport}] transfers done, measuring layer_ready", file=sys.stderr, flush=True)
    for r in range(20):
        recv = agent.recv(peer, 1000 + r, dst_ids[:16])
        conn.send("go")
        assert conn.recv() == "sent"
        recv.wait(timeout_s=60)
    result = conn.recv()
    proc.join(30)
    # Verify: every addressed chunk equals the source (regenerated from its seed), all others are still zero.
    src = make_pool(1)
    ok = True
    untouched = np.ones(POOL_BLOCKS, bool)
    untouched[dst_ids] = False
    for layer in range(NUM_LAYERS):
        d = dst[layer].reshape(2, POOL_BLOCKS, L.chunk_bytes)
        s = src[layer].reshape(2, POOL_BLOCKS, L.chunk_bytes)
        ok &= bool(np.array_equal(d[:, dst_ids], s[:, src_ids])) and not d[:, untouched].any()
    result["verified"] = ok
    result["transport"] = transport
    return result


def summarize(r):
    nbytes = REQ_BLOCKS * NUM_LAYERS * 2 * 32768
    k, lim = statistics.median(r["kvxfer_s"]), statistics.median(r["limit_s"])
    lat = sorted(r["layer_ready_us"])
    return {
        "transport": r["transport"], "path": r["path"], "nbytes": nbytes, "writes": r["num_writes"],
        "kvxfer_gbps": nbytes / k / 1e9, "limit_gbps": nbytes / lim / 1e9, "ratio": lim / k,
        "limit": r["limit_name"], "plan_build_ms": r["plan_build_s"] * 1e3,
        "layer_ready_us_p50": lat[len(lat) // 2], "layer_ready_us_p99": lat[int(len(lat) * 0.99)],
        "verified": r["verified"], "kvxfer_s": r["kvxfer_s"], "limit_s": r["limit_s"],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transports", default="cma,tcp")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rails", type=int, default=1,
                    help="fabric endpoints per agent (tcp: >1 means that many TCP connections, while the limit "
                         "stays one socket)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    os.environ["KVXFER_RAILS"] = str(args.rails)  # both agents (the sender is spawned) read it
    rows = []
    for t in args.transports.split(","):
        print(f"running the 512 MiB reference request over {t} ...", file=sys.stderr, flush=True)
        rows.append({**summarize(run_transport(t, args.reps)), "rails": args.rails})
    print(f"{'transport':9} {'path':6} {'GB/s':>7} {'limit GB/s':>10} {'ratio':>6} {'plan ms':>8} "
          f"{'ready p50/p99 us':>17} verified  limit")
    for s in rows:
        print(f"{s['transport']:9} {s['path']:6} {s['kvxfer_gbps']:7.2f} {s['limit_gbps']:10.2f} {s['ratio']:6.2f} "
              f"{s['plan_build_ms']:8.3f} {s['layer_ready_us_p50']:8.1f}/{s['layer_ready_us_p99']:<8.1f} "
              f"{str(s['verified']):8}  {s['limit']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"schema": 1, "records": rows}, f, indent=1)
    return 0 if all(s["verified"] for s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
