"""Fair posting: a send does not make later sends to the same peer wait for all of it. Each progress turn another
send posts first, a send keeps at most 16 MiB per rail posted on the fabric and not completed, and the progress
thread's own CMA copies stop after 8 MiB per turn: a 1-block transfer started right after a 63 MiB one with every
layer ready completes first (before this, on tcp the provider queue held up to 128 MiB of the big one ahead of it,
and on cma the big one was copied whole first). Latency itself is measured in benchmarks/bench_fairness.py."""
import numpy as np
import pytest

import kvxfer
from tests.conftest import local_pair
from tests.reference import apply


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_a_small_transfer_is_not_queued_behind_a_large_one(transport):
    layout = kvxfer.KVLayout.vllm_flash(16, 64, 16, 8, 128, "bfloat16")  # 32 KiB chunks, 64 MiB per pool
    a, b, peer_b, peer_a, src, dst = local_pair(layout, transport, (f"fair-a-{transport}", f"fair-b-{transport}"))
    expected = [x.copy() for x in dst]
    big_src, big_dst = np.arange(63, dtype=np.int32), np.arange(1, 64, dtype=np.int32)[::-1].copy()
    apply(layout, src, expected, big_src, big_dst, range(layout.num_layers))
    apply(layout, src, expected, [63], [0], range(layout.num_layers))
    big_recv = b.recv(peer_a, 1, big_dst)
    small_recv = b.recv(peer_a, 2, [0])
    big = a.send(peer_b, 1, big_src, big_dst)
    big.all_ready()
    small = a.send(peer_b, 2, [63], [0])
    small.all_ready()
    small_recv.wait(timeout_s=60)
    assert not big_recv.done, "the 1-block transfer waited for the whole 63 MiB one"
    big_recv.wait(timeout_s=60)
    big.wait(timeout_s=60)
    small.wait(timeout_s=60)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
