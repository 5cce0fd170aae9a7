"""Layer-wise arrival: layer L is complete on the receiver only after the sender marked it, and all layers arrive."""
import numpy as np
import pytest

from kvxfer import errors

from tests.conftest import TRANSPORTS, connect
from tests.reference import apply, block_view, make_pool


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_layers_arrive_only_after_marked(transport, remote):
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed=4)
    src_ids = np.array([5, 9, 2, 30], dtype=np.int32)
    dst_ids = np.array([1, 17, 6, 8], dtype=np.int32)
    src_pool = make_pool(layout, 4)
    before = [a.copy() for a in dst]
    recv = agent.recv(peer, 77, dst_ids)
    remote.call("send", (77, src_ids.tolist(), dst_ids.tolist(), None, "none"))
    order = [2, 0, 3, 1]
    for i, layer in enumerate(order):
        remote.call("mark", (77, layer))
        recv.wait(layer=layer, timeout_s=30)
        assert recv.layer_done(layer)
        for later in order[i + 1:]:  # not marked yet: cannot be complete, and its bytes are untouched
            assert not recv.layer_done(later)
            np.testing.assert_array_equal(block_view(layout, dst, later), block_view(layout, before, later))
        got = block_view(layout, dst, layer)[:, dst_ids]
        np.testing.assert_array_equal(got, block_view(layout, src_pool, layer)[:, src_ids])
    recv.wait(timeout_s=30)
    expected = [a.copy() for a in before]
    apply(layout, src_pool, expected, src_ids, dst_ids, range(layout.num_layers))
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_layer_range_subset(transport, remote):
    agent, peer, layout, dst, _ = connect(transport, remote, "flashinfer", seed=6)
    ids = np.array([0, 1, 2], dtype=np.int32)
    before = [a.copy() for a in dst]
    recv = agent.recv(peer, 5, ids, layers=range(1, 3))
    remote.call("send", (5, ids.tolist(), ids.tolist(), [1, 3], "all"))
    recv.wait(timeout_s=30)
    expected = [a.copy() for a in before]
    apply(layout, make_pool(layout, 6), expected, ids, ids, range(1, 3))
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_abort_fails_both_sides_with_the_reason(transport, remote):
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed=4)
    ids = np.array([1, 5, 9], np.int32)
    recv = agent.recv(peer, 77, ids)
    remote.call("send", (77, ids.tolist(), ids.tolist(), None, "none"))
    remote.call("mark", (77, 0))
    recv.wait(layer=0, timeout_s=30)  # layer 0 arrived; the rest never will
    state, why = remote.call("abort", (77, "model failed at layer 1"))
    assert state == "FAILED" and "aborted by the sender: model failed at layer 1" in why
    with pytest.raises(errors.TransferFailed, match="the sender abandoned transfer 77"):
        recv.wait(timeout_s=30)
    assert recv.layers_done == 1


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_a_thread_waiting_for_one_layer_wakes_when_it_lands_while_the_rest_is_pending(transport, remote):
    """A layer's completion wakes only threads waiting for a layer (whole-transfer waits wake at the end): the
    waiter must still be woken by its layer, not by its timeout, while the transfer stays pending."""
    import threading
    import time

    agent, peer, layout, _, _ = connect(transport, remote, "vllm_flash", seed=4)
    ids = np.array([3, 7], np.int32)
    recv = agent.recv(peer, 91, ids)
    remote.call("send", (91, ids.tolist(), ids.tolist(), None, "none"))
    woke = {}

    def wait_layer_2():
        t0 = time.monotonic()
        recv.wait(layer=2, timeout_s=20)
        woke["after_s"] = time.monotonic() - t0

    waiter = threading.Thread(target=wait_layer_2)
    waiter.start()
    time.sleep(0.3)  # the waiter is asleep in wait() by now
    assert "after_s" not in woke
    remote.call("mark", (91, 2))
    waiter.join(10)
    assert not waiter.is_alive() and woke["after_s"] < 10, "the layer's waiter was not woken by its layer"
    assert recv.layer_done(2) and not recv.layer_done(0) and recv.layers_done == 1
    for layer in range(layout.num_layers):
        if layer != 2:
            remote.call("mark", (91, layer))
    recv.wait(timeout_s=30)
