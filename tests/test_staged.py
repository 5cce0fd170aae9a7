"""The staged path (source -> bounce slots -> network or CMA) driven with host sources (staging='always'), across
two processes over tcp, libfabric shm and cma. On a GPU the same pipeline copies in with the copy engines
(tests/gpu/test_staged_gpu.py); here the copy-in is memcpy, and everything after it is the real path: slots taken
and returned, gathered writes from the slot with their granule sums, CMA copy-out plus one zero-byte immediate.

Rings are made much smaller than the transfers so every slot is reused many times."""
import numpy as np
import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import TRANSPORTS, assert_layerwise_concurrent, connect
from tests.reference import expected_after, make_pool

SMALL_RING = {"staging": "always", "staging_slot_bytes": 8192, "staging_slots": 3}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["vllm_flash", "mla", "blocks_first"])
def test_staged_bytes_exact_through_a_small_ring(transport, kind, remote):
    agent, peer, layout, dst, _ = connect(transport, remote, kind, seed=31, sender_kwargs=SMALL_RING)
    rng = np.random.default_rng(4)
    n = layout.num_blocks // 2
    src_ids = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    dst_ids = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    expected = expected_after(layout, dst, 31, src_ids, dst_ids, range(layout.num_layers))
    total = layout.num_layers * layout.num_planes * n * layout.chunk_bytes
    assert total >= 4 * 8192 * 3  # the ring turns over several times

    recv = agent.recv(peer, 7, dst_ids)
    remote.call("send", (7, src_ids.tolist(), dst_ids.tolist(), None, "all"))
    recv.wait(timeout_s=30)
    assert remote.call("wait", (7, 30)) == "DONE"
    path, reason, ring = remote.call("path", 7)
    assert path == "staged" and "bounce slots" in reason
    # Host sources fill the slots with memcpy: ordinary memory, no CUDA context, even where a GPU is usable (a GPU
    # source page-locks the ring: tests/gpu/test_cuda_ipc.py).
    assert ring == {"slot_bytes": 8192, "slots": 3, "pinned": False}
    assert recv.layers_done == layout.num_layers
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)  # addressed chunks equal the source, every other byte untouched
    assert agent.stats()["unknown_imms"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_staged_layerwise_arrival_and_concurrent_requests(transport, remote):
    """8 requests share the 3-slot ring, layers marked in random orders: each layer completes exactly when marked
    and carried, counts stay exact per request."""
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed=17, sender_kwargs=SMALL_RING)
    assert_layerwise_concurrent(agent, peer, layout, dst, remote, seed=17, first_id=300)


def test_staging_slot_smaller_than_a_chunk_is_refused_at_send(remote):
    agent, peer, layout, dst, _ = connect("tcp", remote, "contiguous", seed=2, layout_args=(8, 16384),
                                          sender_kwargs={"staging": "always", "staging_slot_bytes": 8192})
    assert layout.chunk_bytes == 16384
    with pytest.raises(Exception) as e:
        remote.call("send", (1, [0], [0], None, "all"))
    assert "InvalidArgument" in str(e.value) and "staging slot" in str(e.value)


def test_staging_options_are_checked():
    with pytest.raises(errors.InvalidArgument, match="staging='sometimes'"):
        kvxfer.Agent("x", transport="tcp", interface="lo", staging="sometimes")
    with pytest.raises(errors.InvalidArgument, match="2 slots"):
        kvxfer.Agent("x", transport="tcp", interface="lo", staging_slots=1)


def test_path_to_names_the_path_and_why(remote):
    """path_to() answers before any send: cma for same-host host pools, staged when asked to stage."""
    agent, peer, layout, dst, _ = connect("cma", remote, "vllm_flash", seed=1)
    path, reason = agent.path_to(peer)
    assert path == "cma" and "CMA probe" in reason
    staged = kvxfer.Agent("stager", transport="cma", interface="lo", staging="always")
    staged.register_pool(make_pool(layout, 5), layout)
    p = staged.add_peer(agent.metadata())
    path, reason = staged.path_to(p)
    assert path == "staged" and "-> cma" in reason and "staging='always'" in reason
    with pytest.raises(errors.InvalidArgument, match="exposes no pool 'nope'"):
        staged.path_to(p, dst_pool="nope")
