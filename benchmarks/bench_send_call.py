"""What Agent.send() costs the caller for the reference request (32 layers, 256 random blocks, K and V: 16,384
chunks of 32 KiB), with nothing posted yet: the C++ plan build alone, and the whole C++ send() call (plan, path
choice, slot) between two agents of this process.

    .venv/bin/python benchmarks/bench_send_call.py
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/bench_send_call.py   # the same for another build

Prints one line: best of 5 x 50 plan builds, and best of 5 rounds of 100 send() calls (each round's sends are
aborted and their slots reclaimed before the next). An engine calls send() when it schedules a request, so this
is caller time, but on paths whose data phase is short (CUDA IPC) it showed in end-to-end numbers.
"""
from __future__ import annotations

import os
import time

import numpy as np

os.environ.setdefault("FI_TCP_IFACE", "lo")

import kvxfer  # noqa: E402
from kvxfer import _C  # noqa: E402


def main() -> None:
    layout = kvxfer.KVLayout.vllm_flash(num_layers=32, num_blocks=1024, block_size=16, num_kv_heads=8, head_dim=128,
                                        dtype="bfloat16")
    spec = layout.spec(list(range(32)), [0] * 32)
    rng = np.random.default_rng(0)
    src = rng.choice(1024, 256, replace=False).astype(np.int32)
    dst = rng.choice(1024, 256, replace=False).astype(np.int32)
    plan_s = min(_C.time_build_plan(spec, spec, src, dst, 50)[0] for _ in range(5))
    a, b = kvxfer.Agent("send-call-a"), kvxfer.Agent("send-call-b")
    for agent in (a, b):
        agent.register_pool([np.zeros(layout.tensor_layer_bytes, np.uint8) for _ in range(32)], layout)
    peer = a.add_peer(b.metadata())
    b.add_peer(a.metadata())
    a.wait_connected(peer)
    rounds = []
    for rnd in range(5):
        t0 = time.perf_counter()
        sends = [a.send(peer, rnd * 1000 + i, src, dst) for i in range(100)]
        rounds.append((time.perf_counter() - t0) / 100)
        for s in sends:
            s.abort()
        time.sleep(0.5)  # the receiver acknowledges the aborts and the slots come back
    print(f"{os.path.dirname(os.path.dirname(kvxfer.__file__))}: build_plan {plan_s * 1e6:.1f} us; send() "
          f"{min(rounds) * 1e6:.1f} us (best of 5 x 100, Python wrapper included)")


if __name__ == "__main__":
    main()
