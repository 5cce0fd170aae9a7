"""One small request, end to end: what a 1-block request of the reference shape costs, and how often the thread
waiting for it is woken.

    .venv/bin/python benchmarks/bench_small_request.py [--transport tcp] [--n 200] [--json PATH]

The request: 1 random block of the reference layout (Llama-3-8B, 32 layers x K,V, 32 KiB chunks: 2 MiB), between
two agents of this process, timed from send() to the receiver's recv.wait() returning, back to back and after 5 ms
of idle (both progress threads asleep). Reported next to the limit measured in the same run: the same 2 MiB over one
raw TCP connection of this process with the same gaps. Also: voluntary context switches of the waiting thread per
request (a whole-transfer wait is woken once, at the end; it was woken at every layer before 2026-12-02).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.agent_pair import pct, reference_pair  # noqa: E402


def switches() -> int:
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        return int(next(line for line in f if line.startswith("voluntary_ctxt")).split()[1])


def kvxfer_run(transport: str, n: int, gap_s: float) -> dict:
    import numpy as np

    a, b, peer_b, peer_a = reference_pair(transport, f"small-{int(gap_s * 1e3)}")
    rng = np.random.default_rng(0)
    times, woken = [], 0
    for i in range(n + 20):
        ids = rng.choice(256, 1, replace=False).astype(np.int32)
        recv = b.recv(peer_a, i, ids)
        time.sleep(gap_s)
        t0 = time.perf_counter()
        send = a.send(peer_b, i, ids, ids)
        send.all_ready()
        before = switches()
        recv.wait(timeout_s=30)
        dt = time.perf_counter() - t0
        if i >= 20:
            times.append(dt)
            woken += switches() - before
        send.wait(timeout_s=30)
    a.close()
    b.close()
    return {"p50_us": pct(times, 0.5) * 1e6, "p90_us": pct(times, 0.9) * 1e6, "wakes_per_request": woken / n}


def raw_tcp_run(n: int, gap_s: float, nbytes: int = 2 << 20) -> dict:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    buf, out, got_all = bytearray(nbytes), bytes(nbytes), threading.Event()
    view = memoryview(buf)

    def receive():
        while True:
            got = 0
            while got < nbytes:
                try:
                    k = server.recv_into(view[got:])
                except OSError:  # closed at the end
                    return
                if not k:
                    return
                got += k
            got_all.set()

    threading.Thread(target=receive, daemon=True).start()
    times = []
    for i in range(n + 20):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        client.sendall(out)
        got_all.wait()
        got_all.clear()
        if i >= 20:
            times.append(time.perf_counter() - t0)
    client.close()
    server.close()
    listener.close()
    return {"p50_us": pct(times, 0.5) * 1e6, "p90_us": pct(times, 0.9) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--n", type=int, default=200, help="timed requests per case (default: 200)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = []
    for gap_ms in (0, 5):
        limit = raw_tcp_run(args.n, gap_ms / 1e3)
        got = kvxfer_run(args.transport, args.n, gap_ms / 1e3)
        row = {"transport": args.transport, "gap_ms": gap_ms, "kvxfer": got, "raw_tcp": limit,
               "p50_over_raw": got["p50_us"] / limit["p50_us"]}
        rows.append(row)
        print(f"{args.transport} after {gap_ms} ms idle: p50/p90 {got['p50_us']:.0f}/{got['p90_us']:.0f} us "
              f"({row['p50_over_raw']:.2f}x one raw TCP stream's {limit['p50_us']:.0f}/{limit['p90_us']:.0f} us), "
              f"waiting thread woken {got['wakes_per_request']:.1f}x per request", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
