"""Helpers the latency benchmarks share: two connected agents in one process, and the time of one transfer from
all_ready() to the receiver's recv being done (the sender's DONE is waited for too, outside the timing)."""
from __future__ import annotations

import time


def reference_pair(transport: str, name: str, **sender_kwargs):
    """Two connected agents (`name`-a sends, `name`-b receives) with pools of the reference request's shape
    (bench_reference.py): (sender, receiver, peer of the receiver, peer of the sender). sender_kwargs go to the
    sender's Agent (staging='always', ...)."""
    import kvxfer
    from benchmarks.bench_reference import layout, make_pool

    L = layout()
    a = kvxfer.Agent(f"{name}-a-{transport}", transport=transport, interface="lo", timeout_s=60, **sender_kwargs)
    b = kvxfer.Agent(f"{name}-b-{transport}", transport=transport, interface="lo", timeout_s=60)
    a.register_pool(make_pool(1), L)
    b.register_pool(make_pool(2), L)
    peer_b, peer_a = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(peer_b, 20)
    b.wait_connected(peer_a, 20)
    return a, b, peer_b, peer_a


def pct(xs, q):
    """The q-quantile (0..1) of xs: the value at index int(q * n) of the sorted values, the last at most."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def transfer_seconds(a, b, peer_b, peer_a, xfer: int, src_ids, dst_ids, timeout_s: float = 60.0) -> float:
    """Transfer xfer from a to b: seconds from all_ready() until b's recv is done."""
    recv = b.recv(peer_a, xfer, dst_ids)
    send = a.send(peer_b, xfer, src_ids, dst_ids)
    t0 = time.perf_counter()
    send.all_ready()
    recv.wait(timeout_s=timeout_s)
    dt = time.perf_counter() - t0
    send.wait(timeout_s=timeout_s)
    return dt
