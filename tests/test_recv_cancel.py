"""Recv.cancel: the receiver gives up on a transfer (its request was aborted or preempted). The recv fails at once with
Cancelled naming the reason, the sender is told and posts nothing more (its send fails with Cancelled; a send of the
id it had not started is refused), writes_over turns True exactly when nothing the sender posted can still land, and
the slot comes back for later transfers. The sender runs in another process (tcp, and cma with the doorbell)."""
import numpy as np
import pytest

from kvxfer import TransferState, errors
from tests.conftest import UCX, RemoteError, assert_exact_transfer, cancel_after_layer_0, connect, local_pair, wait_for
from tests.reference import PRESETS, apply, block_view, make_pool

SEED = 5  # the remote sender's pool is make_pool(layout, SEED)


@pytest.mark.parametrize("transport", ["tcp", "cma", UCX])
def test_cancel_before_the_sender_sends_refuses_its_send(remote, transport):
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", SEED)
    before = [x.copy() for x in dst]
    recv = agent.recv(peer, 1, [3, 4])
    recv.cancel("client went away")
    assert recv.state == TransferState.FAILED  # at once, not when the sender answers
    assert isinstance(recv.error, errors.Cancelled) and "client went away" in str(recv.error)
    with pytest.raises(errors.Cancelled, match="cancelled by this receiver: client went away"):
        recv.wait(timeout_s=5)
    # The sender had nothing of transfer 1: its CANCEL_ACK says so, and only then are the blocks free.
    wait_for(lambda: recv.writes_over, "writes_over from the sender's CANCEL_ACK", timeout_s=10)
    with pytest.raises(RemoteError, match="Cancelled: transfer 1 to peer 'test-receiver' was cancelled by the receiver"):
        remote.call("send", (1, [0, 1], [3, 4], None, "all"))
    for got, want in zip(dst, before):
        np.testing.assert_array_equal(got, want)
    # The pair carries on: an exact transfer of another id.
    expected = [x.copy() for x in dst]
    apply(layout, make_pool(layout, SEED), expected, [0, 1], [3, 4], range(layout.num_layers))
    r = agent.recv(peer, 2, [3, 4])
    remote.call("send", (2, [0, 1], [3, 4], None, "all"))
    r.wait(timeout_s=30)
    assert remote.call("wait", (2, 30)) == "DONE"
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("transport", ["tcp", "cma", UCX])
def test_cancel_mid_transfer_stops_the_sender(remote, transport):
    """Layer 0 has landed when the receiver cancels: the sender's send fails with Cancelled (not at its deadline),
    marking more layers is refused, no byte of layers 1.. ever lands, and writes_over turns True once the sender's
    ABORT total was counted."""
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", SEED)
    src_ids, dst_ids = [0, 1], [3, 4]
    expected = [x.copy() for x in dst]
    apply(layout, make_pool(layout, SEED), expected, src_ids, dst_ids, [0])
    recv = cancel_after_layer_0(agent, peer, remote, 1, src_ids, dst_ids)
    assert recv.layers_done == 1 and isinstance(recv.error, errors.Cancelled)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)


def test_cancel_after_a_timeout_stops_a_sender_that_is_still_live(remote):
    """The recv timed out while the sender still holds the transfer open (its model stalled): cancelling keeps the
    timeout as the recv's error, fails the sender's send with Cancelled, and settles writes_over."""
    agent, peer, _, _, _ = connect("tcp", remote, "vllm_flash", SEED)
    recv = agent.recv(peer, 1, [3, 4], timeout_s=0.5)
    remote.call("send", (1, [0, 1], [3, 4], None, None))
    remote.call("mark", (1, 0))
    with pytest.raises(errors.TransferTimeout, match="did not fully arrive by its deadline"):
        recv.wait(timeout_s=10)
    assert not recv.writes_over  # the sender may still write layers 1..
    recv.cancel("gave up")
    assert isinstance(recv.error, errors.TransferTimeout)  # the first failure stays the recv's error
    with pytest.raises(RemoteError, match="Cancelled"):
        remote.call("wait", (1, 10))
    wait_for(lambda: recv.writes_over, "writes_over of a timed-out, then cancelled recv", timeout_s=10)


def test_cancelling_a_completed_recv_changes_nothing():
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, names=("cancel-done-a", "cancel-done-b"))
    recv = assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, [0, 1], [2, 3])
    recv.cancel()
    assert recv.state == TransferState.DONE and recv.error is None and recv.writes_over
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1 + 1, [4], [5])  # no id was poisoned


def test_cancelled_transfers_hand_their_slots_back():
    """More cancellations mid-transfer than the 128 slots a sender has towards one receiver: each slot comes back
    (ABORT counted, ABORT_ACK), so the next transfers still find one, and every cancelled recv's writes end."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, names=("cancel-slots-a", "cancel-slots-b"))
    for x in range(140):
        recv = b.recv(peer_a, x, [1, 2])
        send = a.send(peer_b, x, [3, 4], [1, 2])
        send.layer_ready(0)
        recv.wait(layer=0, timeout_s=30)
        recv.cancel()
        with pytest.raises(errors.Cancelled, match=f"transfer {x} to peer 'cancel-slots-b' was cancelled"):
            send.wait(timeout_s=30)
        wait_for(lambda r=recv: r.writes_over, f"writes_over of cancelled transfer {x}", timeout_s=10)
    assert b.stats()["slot_violations"] == 0
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1000, [0, 5], [6, 7])


def test_a_timed_out_recv_learns_its_writes_ended_when_the_sender_dies(remote):
    """A recv that timed out stays bound to its transfer's slot, waiting for the sender's writes to end; when the
    sender's process dies instead of finishing, writes_over turns True (nothing can be posted any more)."""
    agent, peer, _, _, _ = connect("tcp", remote, "vllm_flash", SEED)
    recv = agent.recv(peer, 1, [3, 4], timeout_s=0.5)
    remote.call("send", (1, [0, 1], [3, 4], None, None))
    remote.call("mark", (1, 0))
    with pytest.raises(errors.TransferTimeout):
        recv.wait(timeout_s=10)
    assert not recv.writes_over
    remote.conn.send(("crash", None))
    remote.proc.join(10)
    wait_for(lambda: recv.writes_over, "writes_over once the sender's process is gone", timeout_s=5)


@pytest.mark.parametrize("transport", ["tcp", "fi_shm", "cma"])
def test_random_cancels_among_live_transfers_keep_every_block_exact(transport):
    """Rounds of 16 concurrent transfers whose layers are marked in random interleaved orders; half of them are
    cancelled at a random point (before the send opens, or after 0..3 layers were marked). Every completed transfer
    is exact; every cancelled one reaches writes_over, and each of its chunks is wholly old or wholly new (no torn
    chunk); the next round reuses the same blocks, which only stays exact if no write lands after writes_over."""
    layout = PRESETS["vllm_flash"]()  # 4 layers, 32 blocks
    a, b, peer_b, peer_a, src, dst = local_pair(layout, transport, (f"cancel-mix-a-{transport}", f"cancel-mix-b-{transport}"))
    rng = np.random.default_rng(17)
    xfer = 0
    for _ in range(4):
        before = [x.copy() for x in dst]
        perm = rng.permutation(layout.num_blocks).astype(np.int32)
        reqs = []
        for r in range(16):
            xfer += 1
            dst_ids, src_ids = perm[2 * r: 2 * r + 2], rng.choice(layout.num_blocks, 2, replace=False).astype(np.int32)
            cancel_at = int(rng.integers(-1, layout.num_layers)) if r % 2 else None  # -1: before the send opens
            recv = b.recv(peer_a, xfer, dst_ids)
            reqs.append({"x": xfer, "src": src_ids, "dst": dst_ids, "recv": recv, "cancel_at": cancel_at, "send": None,
                         "order": rng.permutation(layout.num_layers), "marked": 0})
        for q in reqs:
            if q["cancel_at"] == -1:
                q["recv"].cancel("before the send")
                wait_for(lambda q=q: q["recv"].writes_over, "writes_over of a recv cancelled before its send", 10)
            try:
                q["send"] = a.send(peer_b, q["x"], q["src"], q["dst"])
            except errors.Cancelled:
                assert q["cancel_at"] == -1
        for step in range(layout.num_layers):
            for q in reqs:
                if q["cancel_at"] == step:
                    q["recv"].cancel("mid-transfer")
                if q["send"] is not None and q["send"].state == TransferState.PENDING:
                    try:
                        q["send"].layer_ready(int(q["order"][step]))
                    except errors.KvxferError:  # cancelled just now: the send failed before this mark
                        assert q["cancel_at"] is not None
        for q in reqs:
            if q["cancel_at"] is None:
                q["recv"].wait(timeout_s=30)
                q["send"].wait(timeout_s=30)
            else:
                wait_for(lambda q=q: q["recv"].writes_over, f"writes_over of cancelled transfer {q['x']}", 10)
        expected = [x.copy() for x in before]
        for q in reqs:
            if q["cancel_at"] is None:
                apply(layout, src, expected, q["src"], q["dst"], range(layout.num_layers))
        for layer in range(layout.num_layers):
            got, want = block_view(layout, dst, layer), block_view(layout, expected, layer)
            new = block_view(layout, src, layer)
            for q in reqs:
                for s, d in zip(q["src"], q["dst"]):
                    for plane in range(got.shape[0]):
                        chunk = got[plane, d]
                        if q["cancel_at"] is None:
                            np.testing.assert_array_equal(chunk, want[plane, d])
                        else:
                            assert (np.array_equal(chunk, want[plane, d]) or np.array_equal(chunk, new[plane, s])), \
                                f"transfer {q['x']} layer {layer} block {d}: a torn or foreign chunk"
    assert a.stats()["slot_violations"] == 0 and b.stats()["slot_violations"] == 0
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, xfer + 1, [0, 1], [2, 3])
