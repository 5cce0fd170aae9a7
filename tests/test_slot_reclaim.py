"""Failed transfers hand their slot back once the receiver has counted every write the sender posted for it.

Each (sender, receiver) pair has a window of slots (128 with the default max_peers). A failed send's writes may still be in flight, so its slot
cannot be reused at once (a late write would count towards the next transfer). The sender's ABORT says how many
granules it posted; the receiver answers ABORT_ACK once it counted exactly that many, and only then the slot is
free. Before this, 128 failures exhausted a pair for good. A send made while every slot is taken waits for one.
"""

import time

import numpy as np
import pytest

from kvxfer import errors
from tests.conftest import TRANSPORTS, assert_exact_transfer, local_pair, wait_for
from tests.reference import PRESETS, apply

WINDOW = 128


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_more_failed_transfers_than_slots_then_an_exact_one(transport):
    """3 x 128 sends fail (aborted after some layers were posted, so writes are in flight when the ABORT goes out);
    the pair keeps working and the next transfer's bytes are exact, other blocks untouched."""
    layout = PRESETS["vllm_flash"]()  # 4 layers x 32 blocks
    a, b, peer_b, peer_a, src, dst = local_pair(layout, transport, ("reclaim-sender", "reclaim-receiver"))
    failures = 3 * WINDOW
    recvs = []
    for i in range(failures):
        src_ids = np.array([i % 32, (i + 7) % 32], np.int32)
        dst_ids = np.array([(i * 3) % 32, (i * 3 + 1) % 32], np.int32)
        recv = b.recv(peer_a, i, dst_ids)
        send = a.send(peer_b, i, src_ids, dst_ids)
        for layer in range(i % layout.num_layers):  # 0..3 of the 4 layers posted before the abort
            send.layer_ready(layer)
        send.abort("request cancelled")
        with pytest.raises(Exception, match="request cancelled"):
            send.wait(timeout_s=30)
        with pytest.raises(Exception, match="abandoned transfer"):
            recv.wait(timeout_s=30)
        recvs.append(recv)
    wait_for(lambda: a.stats()["slots_reclaimed"] == failures, f"{failures} slots handed back")
    assert b.stats()["slot_violations"] == 0
    # the receiver knew when each failed transfer's last write had landed: its blocks are safe to reuse
    wait_for(lambda: all(r.writes_over for r in recvs), "every failed recv's writes over")

    recv = assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 10_000, [3, 9, 20], [30, 1, 17])
    assert recv.layers_done == layout.num_layers and recv.writes_over


def test_timed_out_sends_give_their_slots_back():
    """A send that misses its deadline (its layers never marked ready) frees its slot the same way."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("timeout-sender", "timeout-receiver"))
    sends = [a.send(peer_b, i, [1], [2], timeout_s=0.2) for i in range(WINDOW)]  # the whole window
    sends[0].layer_ready(0)
    for s in sends:
        with pytest.raises(Exception, match="missed its deadline"):
            s.wait(timeout_s=30)
    wait_for(lambda: a.stats()["slots_reclaimed"] == WINDOW, "the window handed back")
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 5000, [4], [5])


def test_sends_past_the_window_wait_in_order_then_land_exactly():
    """With every slot in flight, further sends wait (they used to fail at once); each takes the next slot that comes
    back, in call order, and its bytes land exactly. Marked ready while waiting: posted once it has its slot."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("busy-sender", "busy-receiver"),
                                                receiver_kwargs={"max_peers": 1024})  # windows of 4
    window = peer_b.send_window
    assert window == 4
    expected = [x.copy() for x in dst]
    ids = [(i, (i * 5 + 3) % 32) for i in range(window + 3)]
    apply(layout, src, expected, np.array([s for s, _ in ids]), np.array([d for _, d in ids]), range(layout.num_layers))
    recvs = [b.recv(peer_a, i, [d]) for i, (_, d) in enumerate(ids)]
    sends = [a.send(peer_b, i, [s], [d], timeout_s=60) for i, (s, d) in enumerate(ids)]
    assert [s.waiting_for_slot for s in sends] == [False] * window + [True] * 3
    sends[window].all_ready()
    time.sleep(0.2)
    assert all(s.state.name == "PENDING" and s.waiting_for_slot for s in sends[window:])
    assert recvs[window].layers_done == 0  # nothing of a waiting send went out
    sends[0].all_ready()  # one slot comes back: the first waiter takes it and completes, freeing it for the second
    sends[window].wait(timeout_s=30)
    wait_for(lambda: not sends[window + 1].waiting_for_slot, "the second waiter holding the slot the first freed")
    assert sends[window + 2].waiting_for_slot
    for s in sends[1:window] + sends[window + 1:]:
        s.all_ready()
    for r, s in zip(recvs, sends):
        r.wait(timeout_s=30)
        s.wait(timeout_s=30)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    assert a.stats()["sends_waited_for_slot"] == 3 and b.stats()["unknown_imms"] == 0


def test_a_waiting_send_ends_cleanly_however_it_ends():
    """A send waiting for a slot that misses its deadline fails naming the full window; one aborted by its caller or
    cancelled by the receiver fails at once; none of them posted anything (writes_over at once) or later takes a
    slot, and the pair then moves a transfer exactly."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("wait-sender", "wait-receiver"),
                                                receiver_kwargs={"max_peers": 1024})
    holders = [a.send(peer_b, i, [1], [2], timeout_s=60) for i in range(peer_b.send_window)]
    late = a.send(peer_b, 100, [1], [2], timeout_s=0.3)
    aborted = a.send(peer_b, 101, [1], [2], timeout_s=60)
    cancelled = a.send(peer_b, 102, [1], [2], timeout_s=60)
    b.recv(peer_a, 102, [2]).cancel()
    aborted.abort("client went away")
    with pytest.raises(errors.TransferTimeout, match=r"missed its deadline waiting for a transfer slot, nothing of it "
                                                     r"sent: all 4 slots .* stayed taken \(4 transfers in flight"):
        late.wait(timeout_s=30)
    with pytest.raises(errors.TransferFailed, match="client went away"):
        aborted.wait(timeout_s=30)
    with pytest.raises(errors.Cancelled, match="cancelled by the receiver"):
        cancelled.wait(timeout_s=30)
    wait_for(lambda: late.writes_over and aborted.writes_over and cancelled.writes_over, "the waiters' writes over")
    for s in holders:
        s.abort("test over")
    wait_for(lambda: a.stats()["slots_reclaimed"] == len(holders), "the window handed back")
    recv = assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 500, [4, 6], [5, 7])
    assert recv.writes_over and b.stats()["slot_violations"] == 0


def test_a_recv_that_timed_out_learns_when_the_late_transfer_is_over():
    """The receiver gives up first (its deadline); the sender's writes still come. writes_over stays False while
    they may, and turns True once the transfer completed on the wire, so the engine can free the blocks then."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("late-sender", "late-receiver"))
    recv = b.recv(peer_a, 7, [3, 4], timeout_s=0.2)
    send = a.send(peer_b, 7, [1, 2], [3, 4], timeout_s=30)
    with pytest.raises(Exception, match="did not fully arrive by its deadline"):
        recv.wait(timeout_s=30)
    assert not recv.writes_over  # the sender has not even started: its writes may still come
    idle = b.recv(peer_a, 8, [9])
    send.all_ready()
    send.wait(timeout_s=30)
    wait_for(lambda: recv.writes_over, "the timed-out recv's writes over")
    assert not idle.writes_over  # a recv nobody sends to is not over


@pytest.mark.parametrize("posted_layers", [0, 2])
def test_recv_posted_after_the_sender_abandoned_fails_at_once(posted_layers):
    """Push order: the sender starts (and gives up) before the receiver calls recv(). The late recv fails at
    once naming the abandoned transfer, instead of waiting out its 60 s deadline for a BEGIN that never comes,
    and its writes_over turns True (every write the sender posted was counted) so the blocks can be freed."""
    from kvxfer import errors

    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", (f"early-sender{posted_layers}",
                                                                f"late-receiver{posted_layers}"))
    send = a.send(peer_b, 42, [1, 2], [3, 4])
    for layer in range(posted_layers):
        send.layer_ready(layer)
    send.abort("prefill node shutting down")
    with pytest.raises(errors.TransferFailed, match="prefill node shutting down"):
        send.wait(timeout_s=30)
    wait_for(lambda: a.stats()["slots_reclaimed"] == 1, "the receiver acknowledging the ABORT")
    recv = b.recv(peer_a, 42, [3, 4])  # the receiver's default deadline: 60 s
    with pytest.raises(errors.TransferFailed, match="abandoned transfer 42 before this recv was posted"):
        recv.wait(timeout_s=10)  # a recv still waiting would raise TransferTimeout here instead
    wait_for(lambda: recv.writes_over, "the late recv's writes over")
    # the pair still works, and the abandoned id does not haunt a later transfer with another id
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 43, [5], [6])
