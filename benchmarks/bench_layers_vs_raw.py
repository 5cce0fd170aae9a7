"""Layer by layer over tcp, kvxfer against raw TCP in the same two processes, requests alternating (k r r k ...).

    .venv/bin/python benchmarks/bench_layers_vs_raw.py [--requests 40] [--layer-ms 10] [--json PATH]

Both move the reference request (benchmarks/bench_reference.py: 32 layers of 16 MiB) while a forward marks a layer
ready every --layer-ms: kvxfer with layer_ready on one send; raw TCP with a writer thread that sendalls each layer's
16 MiB in 128 KiB pieces (kvxfer's write size over tcp) as it is marked, received in place. Printed: each request's
tail (last layer marked -> the receiver has every byte), in order, then medians, p90 and the count over 30 ms.
What it is for: telling this VM's slow phases (both stall) from kvxfer's own stalls (only k stalls).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import socket
import sys
import threading
import time

import numpy as np

os.environ.setdefault("FI_TCP_IFACE", "lo")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_reference import NUM_LAYERS, ids, layout, make_pool

LAYER = 16 << 20  # one layer of the reference request
PIECE = 128 << 10


def receiver(conn) -> None:
    import kvxfer

    agent = kvxfer.Agent("lvr-r", transport="tcp", interface="lo", timeout_s=60)
    agent.register_pool(make_pool(2), layout())
    server = socket.create_server(("127.0.0.1", 0))
    conn.send((agent.metadata(), server.getsockname()[1]))
    peer = agent.add_peer(conn.recv())
    agent.wait_connected(peer, 30)
    sock, _ = server.accept()
    sink = np.zeros(LAYER * NUM_LAYERS, np.uint8)
    sink.fill(0)  # faulted in before the first timing
    view = memoryview(sink)
    _, dst = ids(2)
    while (msg := conn.recv()) is not None:
        kind, xfer = msg
        if kind == "k":
            recv = agent.recv(peer, xfer, dst)
            conn.send("armed")
            recv.wait(timeout_s=60)
        else:
            conn.send("armed")
            got = 0
            while got < len(sink):
                got += sock.recv_into(view[got:], len(sink) - got)
        conn.send(time.perf_counter_ns())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40, help="of each kind (default: 40)")
    ap.add_argument("--layer-ms", type=float, default=10.0, help="the forward's time per layer (default: 10)")
    ap.add_argument("--json", metavar="PATH", help="write every tail here")
    args = ap.parse_args()
    import kvxfer

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(there,))
    proc.start()
    agent = kvxfer.Agent("lvr-s", transport="tcp", interface="lo", timeout_s=60)
    agent.register_pool(make_pool(1), layout())
    metadata, port = here.recv()
    here.send(agent.metadata())
    peer = agent.add_peer(metadata)
    agent.wait_connected(peer, 30)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    source = memoryview(np.ones(LAYER * NUM_LAYERS, np.uint8))
    marked: queue.Queue = queue.Queue()

    def writer() -> None:  # as an engine's sender thread would: each layer as it is marked
        while (layer := marked.get()) is not None:
            for at in range(layer * LAYER, (layer + 1) * LAYER, PIECE):
                sock.sendall(source[at:at + PIECE])

    threading.Thread(target=writer, name="raw-writer", daemon=True).start()
    src, dst = ids(2)
    tails: dict[str, list[float]] = {"k": [], "r": []}
    order = []
    step = args.layer_ms / 1e3
    for xfer in range(2 * args.requests + 4):
        kind = "k" if (xfer // 2 + xfer) % 2 == 0 else "r"
        here.send((kind, xfer))
        here.recv()
        send = agent.send(peer, xfer, src, dst) if kind == "k" else None
        t0 = time.perf_counter()
        for layer in range(NUM_LAYERS):
            time.sleep(max(0.0, t0 + (layer + 1) * step - time.perf_counter()))
            send.layer_ready(layer) if send else marked.put(layer)
        last = time.perf_counter_ns()
        landed = here.recv()
        if send:
            send.wait(timeout_s=60)
        if xfer >= 4:  # two of each warm up
            tail = (landed - last) / 1e6
            tails[kind].append(tail)
            order.append(f"{kind}{tail:.0f}")
    marked.put(None)
    here.send(None)
    proc.join()
    print(" ".join(order))
    for kind, name in (("k", "kvxfer"), ("r", "raw TCP")):
        t = np.array(tails[kind])
        print(f"{name:8} {args.layer_ms:g} ms a layer: tail median {np.median(t):.1f} ms, p90 {np.percentile(t, 90):.1f}, "
              f"max {t.max():.1f}, {int((t > 30).sum())} of {len(t)} over 30 ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layer_ms": args.layer_ms, "tails_ms": tails, "order": order}, f, indent=1)


if __name__ == "__main__":
    main()
