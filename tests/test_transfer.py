"""Paged writes across two processes, for every transport and layout: bytes land exactly where addressed, every
other byte of the destination pool (guard blocks included) is unchanged, and counters reach exactly N."""
import numpy as np
import pytest

from tests.conftest import TRANSPORTS, UCX, connect
from tests.reference import PRESETS, apply, make_pool


def random_ids(rng, num_blocks, n):
    return rng.choice(num_blocks, n, replace=False).astype(np.int32)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_paged_random_ids_every_layout(transport, kind, remote):
    agent, peer, layout, dst, path = connect(transport, remote, kind, seed=11)
    assert path == transport if transport != "fi_shm" else path == "fi_shm"
    rng = np.random.default_rng(5)
    n = layout.num_blocks // 2
    src_ids, dst_ids = random_ids(rng, layout.num_blocks, n), random_ids(rng, layout.num_blocks, n)
    expected = [a.copy() for a in dst]
    apply(layout, make_pool(layout, 11), expected, src_ids, dst_ids, range(layout.num_layers))

    recv = agent.recv(peer, 42, dst_ids)
    remote.call("send", (42, src_ids.tolist(), dst_ids.tolist(), None, "all"))
    recv.wait(timeout_s=30)
    assert remote.call("wait", (42, 30)) == "DONE"
    assert recv.layers_done == layout.num_layers
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)  # addressed blocks equal the source, all others untouched


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_contiguous_ids_merge_into_few_writes(transport, remote):
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed=3)
    src_ids = np.arange(4, 20, dtype=np.int32)
    dst_ids = np.arange(10, 26, dtype=np.int32)
    expected = [a.copy() for a in dst]
    apply(layout, make_pool(layout, 3), expected, src_ids, dst_ids, range(layout.num_layers))
    nwrites = remote.call("send", (1, src_ids.tolist(), dst_ids.tolist(), None, "all"))
    assert nwrites == layout.num_layers * 2  # one write per (layer, plane): runs contiguous on both sides merge
    agent.recv(peer, 1, dst_ids).wait(timeout_s=30)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_recv_after_data_arrived(transport, remote):
    """The expected count may become known after every write landed."""
    agent, peer, layout, dst, _ = connect(transport, remote, "flashinfer", seed=8)
    ids = np.array([3, 1, 7], dtype=np.int32)
    remote.call("send", (9, ids.tolist(), ids.tolist(), None, "all"))
    assert remote.call("wait", (9, 30)) == "DONE"  # the sender is DONE only after the receiver counted everything
    recv = agent.recv(peer, 9, ids)
    assert recv.done and recv.layers_done == layout.num_layers


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_many_concurrent_requests_counters_exact(transport, remote):
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed=21)
    rng = np.random.default_rng(9)
    perm = rng.permutation(layout.num_blocks).astype(np.int32)
    expected = [a.copy() for a in dst]
    src_pool = make_pool(layout, 21)
    recvs, layer_orders = {}, {}
    for r in range(16):  # 16 requests x 2 blocks, disjoint destinations, layers marked in a random order
        dst_ids = perm[2 * r: 2 * r + 2]
        src_ids = rng.choice(layout.num_blocks, 2, replace=False).astype(np.int32)
        apply(layout, src_pool, expected, src_ids, dst_ids, range(layout.num_layers))
        if r % 2 == 0:
            recvs[r] = agent.recv(peer, 1000 + r, dst_ids)
        remote.call("send", (1000 + r, src_ids.tolist(), dst_ids.tolist(), None, "none"))
        layer_orders[r] = rng.permutation(layout.num_layers)
    for step in range(layout.num_layers):
        for r in range(16):
            remote.call("mark", (1000 + r, int(layer_orders[r][step])))
    for r in range(16):
        assert remote.call("wait", (1000 + r, 30)) == "DONE"
        recv = recvs.get(r) or agent.recv(peer, 1000 + r, perm[2 * r: 2 * r + 2])
        recv.wait(timeout_s=30)
        assert recv.layers_done == layout.num_layers
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    assert agent.stats()["unknown_imms"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["cma", "tcp", UCX])
def test_512mib_request(transport, remote):
    """The reference request: 256 random blocks x 32 layers x K/V of 32 KiB = 512 MiB, verified byte for byte."""
    args = (32, 256, 16, 8, 128, "bfloat16")
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed=13, layout_args=args, timeout_s=120)
    assert layout.num_layers * 2 * 256 * layout.chunk_bytes == 512 << 20
    rng = np.random.default_rng(2)
    src_ids, dst_ids = rng.permutation(256).astype(np.int32), rng.permutation(256).astype(np.int32)
    recv = agent.recv(peer, 512, dst_ids)
    remote.call("send", (512, src_ids.tolist(), dst_ids.tolist(), None, "all"))
    recv.wait(timeout_s=120)
    assert remote.call("wait", (512, 120)) == "DONE"
    src = make_pool(layout, 13)
    for layer in range(layout.num_layers):
        d, s = dst[layer].reshape(2, 256, -1), src[layer].reshape(2, 256, -1)
        np.testing.assert_array_equal(d[:, dst_ids], s[:, src_ids])


def test_finished_at_is_stamped_on_perf_counters_clock_when_the_transfer_ends():
    """Send/Recv.finished_at: None while pending, then a time.perf_counter() reading taken by the progress thread
    when the transfer ended (DONE or FAILED), inside the window in which it ended."""
    import time

    from kvxfer import errors
    from tests.conftest import local_pair

    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("stamp-sender", "stamp-receiver"))
    ids = np.array([1, 2, 3], np.int32)
    recv = b.recv(peer_a, 1, ids)
    send = a.send(peer_b, 1, ids, ids)
    assert send.finished_at is None and recv.finished_at is None
    t0 = time.perf_counter()
    send.all_ready()
    recv.wait(timeout_s=30)
    send.wait(timeout_s=30)
    t1 = time.perf_counter()
    assert t0 <= recv.finished_at <= send.finished_at <= t1  # the sender is DONE once the receiver's RELEASE came
    failed = a.send(peer_b, 2, ids, ids)
    t2 = time.perf_counter()
    failed.abort("stop")
    with pytest.raises(errors.TransferFailed):
        failed.wait(timeout_s=30)
    assert t2 <= failed.finished_at <= time.perf_counter()
