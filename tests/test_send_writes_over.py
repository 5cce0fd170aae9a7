"""Send.writes_over: when a sender may free or reuse its source blocks. True once the send is DONE; for a failed
send only once the receiver has answered its ABORT (counted every write it had posted), or, when the receiver is
lost, once every write and copy the send started completed here. The receiver runs in another process, which the
tests stop (SIGSTOP) to hold its answer back, or kill."""
import os
import signal
import time

import pytest

import kvxfer
from kvxfer import TransferState
from tests.conftest import UCX, RemoteSender, assert_exact_transfer, local_pair, wait_for
from tests.reference import PRESETS, make_pool


@pytest.fixture
def receiver():
    r = RemoteSender()
    yield r
    if r.proc.is_alive():
        os.kill(r.proc.pid, signal.SIGCONT)  # in case a test failed while it was stopped
    r.close()


def all_threads_stopped(pid: int) -> bool:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return all(st in ("T", "t") for st in states)


def sender_to(receiver, transport):
    layout = PRESETS["vllm_flash"]()
    md = receiver.call("init", (transport, "vllm_flash", 7, [], 1, {"name": f"drain-receiver-{transport}"}))
    agent = kvxfer.Agent(f"drain-sender-{transport}", transport=transport, interface="lo", timeout_s=30)
    agent.register_pool(make_pool(layout, 8), layout)
    peer = agent.add_peer(md)
    receiver.call("add_peer", agent.metadata())
    agent.wait_connected(peer, 20)
    return agent, peer


def test_a_done_send_has_its_writes_over():
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, _, _ = local_pair(layout, names=("drain-done-a", "drain-done-b"))
    recv = b.recv(peer_a, 1, [2, 3])
    send = a.send(peer_b, 1, [0, 1], [2, 3])
    assert not send.writes_over  # nothing marked yet, but the send is live
    send.all_ready()
    send.wait(timeout_s=30)
    recv.wait(timeout_s=30)
    assert send.writes_over


@pytest.mark.parametrize("transport", ["tcp", "cma", UCX])
def test_an_aborted_send_waits_for_the_receivers_answer(receiver, transport):
    """Layer 0 landed, then the receiver's process is stopped and the send aborted: the send fails at once, but its
    writes are not over until the receiver, resumed, has counted what was posted and answered (ABORT_ACK)."""
    agent, peer = sender_to(receiver, transport)
    receiver.call("recv", (1, [3, 4]))
    send = agent.send(peer, 1, [0, 1], [3, 4])
    send.layer_ready(0)
    receiver.call("recv_wait", (1, 0, 30))
    os.kill(receiver.proc.pid, signal.SIGSTOP)
    # Every thread of it stopped (a loaded machine delivers the stop late), so none can answer the ABORT.
    wait_for(lambda: all_threads_stopped(receiver.proc.pid), "the receiver's threads stopping", timeout_s=10)
    try:
        send.abort("the prefill failed")
        wait_for(lambda: send.state == TransferState.FAILED, "the aborted send failing", timeout_s=5)
        time.sleep(0.5)  # ample time for an answer, had the receiver been running
        assert not send.writes_over  # the receiver has not answered: its count may still be short
    finally:
        os.kill(receiver.proc.pid, signal.SIGCONT)
    wait_for(lambda: send.writes_over, "writes_over once the resumed receiver answered the ABORT", timeout_s=10)


def test_a_send_to_a_dead_receiver_has_its_writes_over_once_drained_here(receiver):
    agent, peer = sender_to(receiver, "tcp")
    receiver.call("recv", (1, [3, 4]))
    send = agent.send(peer, 1, [0, 1], [3, 4])
    send.layer_ready(0)
    receiver.call("recv_wait", (1, 0, 30))
    receiver.conn.send(("crash", None))
    receiver.proc.join(10)
    with pytest.raises(kvxfer.errors.PeerLost):
        send.wait(timeout_s=10)
    wait_for(lambda: send.writes_over, "writes_over of a send whose receiver died", timeout_s=10)


def test_aborted_sends_writes_over_and_the_pair_carries_on():
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, names=("drain-many-a", "drain-many-b"))
    sends = []
    for x in range(8):
        b.recv(peer_a, x, [x])
        s = a.send(peer_b, x, [x], [x])
        s.layer_ready(0)
        s.abort("test")
        sends.append(s)
    for s in sends:
        wait_for(lambda s=s: s.writes_over, f"writes_over of aborted send {s.xfer_id}", timeout_s=10)
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 100, [9, 10], [11, 12])


@pytest.mark.parametrize("transport", ["tcp", UCX])
def test_a_send_to_a_receiver_on_another_host_that_went_silent_settles_once_released(receiver, transport):
    """The receiver (another host name, so its process cannot be watched) stops before it reads our 128 MiB: the
    heartbeat ends it and our send fails, but the writes we posted sit in a full socket and never complete. They used
    to keep the peer from being released, so writes_over stayed False for good (the prefill side could never free
    its blocks). 5 s after the loss the peer is released anyway: its connection closes, the posted writes complete
    with errors, and writes_over turns True while the receiver is still stopped."""
    from tests.conftest import another_host, connect

    another_host(receiver, "kvxfer-stopped-receiver")
    big = (8, 256, 16, 8, 128, "float16")
    hb = {"peer_timeout_s": 1.0}
    agent, peer, _, _, _ = connect(transport, receiver, "vllm_flash", 5, layout_args=big, timeout_s=120,
                                   receiver_kwargs=hb, sender_kwargs=hb)
    receiver.call("recv", (9, list(range(128, 256))))
    os.kill(receiver.proc.pid, signal.SIGSTOP)
    send = agent.send(peer, 9, list(range(128)), list(range(128, 256)))
    send.all_ready()
    with pytest.raises(kvxfer.errors.PeerLost, match="sent nothing for"):
        send.wait(timeout_s=30)
    wait_for(lambda: send.writes_over, "writes_over of the send to the stopped receiver", 15)
    assert agent.stats()["peers_released"] == 1
    assert all_threads_stopped(receiver.proc.pid)
