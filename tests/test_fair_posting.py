"""Fair posting: a send does not make later sends to the same peer wait for all of it. Each progress turn another
send posts first, a send keeps at most 16 MiB per rail posted on the fabric and not completed, and the progress
thread's own CMA copies stop after 8 MiB per turn: a 1-block transfer started right after a 63 MiB one with every
layer ready completes first (before this, on tcp the provider queue held up to 128 MiB of the big one ahead of it,
and on cma the big one was copied whole first). On the staged path the sends share the bounce ring and take turns
by bytes. Latency itself is measured in benchmarks/bench_fairness.py."""
import time

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


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_a_small_staged_transfer_is_not_queued_behind_a_large_one(transport):
    """Both through the sender's bounce ring (16 x 4 MiB): the 1-block transfer, started once the 256 MiB one is under
    way, completes while the large one moves less than 1.5 rings (measured: ~3-6 of its 8 MiB layers on cma, 0 on
    tcp). Before the ring was shared and batches taken in turn, the large one kept every slot and the small one's
    batches queued behind whole rings of it: 20-28 layers on cma, and on tcp often the whole request."""
    layout = kvxfer.KVLayout.vllm_flash(32, 129, 16, 8, 128, "bfloat16")  # 64 KiB per block and layer
    a, b, peer_b, peer_a, src, dst = local_pair(layout, transport, (f"sfair-a-{transport}", f"sfair-b-{transport}"),
                                                sender_kwargs={"staging": "always"})
    expected = [x.copy() for x in dst]
    big_src, big_dst = np.arange(128, dtype=np.int32), np.arange(1, 129, dtype=np.int32)[::-1].copy()
    apply(layout, src, expected, big_src, big_dst, range(layout.num_layers))
    apply(layout, src, expected, [128], [0], range(layout.num_layers))
    big_recv = b.recv(peer_a, 1, big_dst)
    big = a.send(peer_b, 1, big_src, big_dst)
    assert big.path == "staged"
    big.all_ready()
    deadline = time.monotonic() + 60
    while big_recv.layers_done < 2 and time.monotonic() < deadline:  # the ring is full of the large one by now
        time.sleep(0.0005)
    small_recv = b.recv(peer_a, 2, [0])
    small = a.send(peer_b, 2, [128], [0])
    before = big_recv.layers_done
    small.all_ready()
    while not small_recv.done and time.monotonic() < deadline:
        time.sleep(0.0005)
    meanwhile = big_recv.layers_done - before
    small_recv.wait(timeout_s=1)
    assert meanwhile <= 12, f"the 1-block transfer waited while {meanwhile} layers (8 MiB each) of the large one landed"
    big_recv.wait(timeout_s=60)
    big.wait(timeout_s=60)
    small.wait(timeout_s=60)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
