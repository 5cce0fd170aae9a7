"""Closing an agent tells its peers: their transfers with it fail at once with PeerLost naming the close, not at
their deadlines. The closing agent's process stays alive here, so nothing but its BYE can tell them; and a process
"on another host" that exits with its agent still open tells them the same way."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import (
    TRANSPORTS,
    UCX,
    another_host,
    assert_nothing_lands_after_writes_over,
    connect,
    local_pair,
    three_recvs_from_another_host,
    wait_for,
)
from tests.reference import PRESETS, apply, block_view, make_pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_peer_closing_its_agent_fails_our_recv_at_once(transport, remote):
    agent, peer, _, dst, _ = connect(transport, remote, "vllm_flash", 51)
    recv = agent.recv(peer, 1, [4, 5], timeout_s=60)
    remote.call("send", (1, [1, 2], [4, 5], None, None))  # opened, no layer marked: nothing will arrive
    before = [x.copy() for x in dst]
    t0 = time.monotonic()
    remote.call("close", None)
    with pytest.raises(errors.PeerLost, match="peer 'peer-sender' closed its agent"):
        recv.wait(timeout_s=30)
    assert time.monotonic() - t0 < 5, "learnt from the deadline, not from the close"
    assert remote.proc.is_alive()  # its process did not exit: the BYE told us
    for got, want in zip(dst, before):
        assert (got == want).all()
    # Later ones fail at once naming it: refused by recv() once the BYE is in, or failed by it. The closing peer's
    # ABORT (naming the close) can fail the first recv just before its BYE marks the peer lost (1 run in ~20, fi_shm).
    with pytest.raises(errors.PeerLost, match="closed its agent"):
        agent.recv(peer, 2, [6]).wait(timeout_s=5)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_receiver_closing_its_agent_fails_our_send_at_once(transport, remote):
    agent, peer, *_ = connect(transport, remote, "vllm_flash", 52)
    # Opened, no layer marked: nothing is posted, so no write can hit the closed endpoint before the BYE is read
    # (marking right after the close raced it: "write failed ... Broken pipe" came first in 1 of 3 runs).
    send = agent.send(peer, 3, [1], [2], timeout_s=60)
    t0 = time.monotonic()
    remote.call("close", None)
    with pytest.raises(errors.PeerLost, match="closed its agent"):
        send.wait(timeout_s=30)
    with pytest.raises(errors.PeerLost, match="closed its agent"):
        send.all_ready()  # and marking it now is refused naming the close
    assert time.monotonic() - t0 < 5
    assert remote.proc.is_alive()


CHILD = r"""
import ctypes, socket, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x04000000) != 0:  # CLONE_NEWUTS: a peer "on another host"
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS) needs root")
socket.sethostname("kvxfer-other-host")
import kvxfer
from tests.reference import PRESETS, make_pool
layout = PRESETS["vllm_flash"]()
AGENT = kvxfer.Agent("exiting-child", transport=sys.argv[1], interface="lo")  # a global, never closed by hand
AGENT.register_pool(make_pool(layout, 3), layout)
print(AGENT.metadata().hex(), flush=True)
peer = AGENT.add_peer(bytes.fromhex(sys.stdin.readline()))
AGENT.wait_connected(peer, 20)
print("connected", flush=True)
sys.stdin.readline()
sys.exit(0)
"""


@pytest.mark.parametrize("transport", ["tcp", UCX])
def test_process_on_another_host_exiting_fails_our_recv_at_once(transport):
    # A peer on another host: we cannot watch its process, and a recv has nothing posted that could fail. The
    # exiting interpreter destroys the agent it left open, which says BYE.
    layout = PRESETS["vllm_flash"]()
    agent = kvxfer.Agent("exit-watcher", transport=transport, interface="lo")
    agent.register_pool(make_pool(layout, 4), layout)
    child = subprocess.Popen([sys.executable, "-c", CHILD, transport], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        peer = agent.add_peer(bytes.fromhex(child.stdout.readline()))
        child.stdin.write(agent.metadata().hex() + "\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "connected"
        recv = agent.recv(peer, 1, [2], timeout_s=60)
        t0 = time.monotonic()
        child.stdin.write("exit\n")
        child.stdin.flush()
        assert child.wait(20) == 0
        with pytest.raises(errors.PeerLost, match="peer 'exiting-child' closed its agent"):
            recv.wait(timeout_s=30)
        assert time.monotonic() - t0 < 10
    finally:
        child.kill()
        agent.close()


@pytest.mark.parametrize("transport", ["tcp", UCX])
def test_a_peer_on_another_host_closing_settles_our_recvs_by_its_totals(transport, remote):
    # Its process cannot be watched from here and it stays alive: before the closing agent sent its totals (an ABORT
    # per transfer, then a BYE saying so), these recvs never learnt that their blocks were free.
    _agent, _peer, dst, expected, recvs = three_recvs_from_another_host(transport, remote, "kvxfer-closing-host", 61)
    remote.call("close", None)
    for recv in recvs:
        with pytest.raises(errors.PeerLost, match="peer 'peer-sender' closed its agent"):
            recv.wait(timeout_s=30)
        wait_for(lambda r=recv: r.writes_over, f"writes_over of transfer {recv.xfer_id} from its totals", 5)
    assert remote.proc.is_alive()
    for got, want in zip(dst, expected):  # layer 0 of the first transfer landed; nothing else was written
        np.testing.assert_array_equal(got, want)


def test_writes_in_flight_when_a_peer_closes_land_before_writes_over(remote):
    # 64 MiB over two tcp rails, the sender closed right after marking every layer: the BYE can overtake writes still
    # on the other rail, so writes_over must wait until the receiver counted the total the ABORT named.
    another_host(remote, "kvxfer-closing-host")
    args = (8, 256, 16, 8, 128, "float16")  # 64 KiB per block and layer
    agent, peer, layout, dst, _ = connect("tcp", remote, "vllm_flash", 62, layout_args=args, rails=2)
    before = [x.copy() for x in dst]
    src_ids, dst_ids = list(range(128)), list(range(128, 256))
    recv = agent.recv(peer, 1, dst_ids, timeout_s=60)
    remote.call("send", (1, src_ids, dst_ids, None, "all"))
    remote.call("close", None)
    try:
        recv.wait(timeout_s=30)
    except errors.PeerLost:
        pass
    assert_nothing_lands_after_writes_over(recv, layout, dst, before, slice(0, 128),
                                           "writes_over after the closed sender's writes were counted")


def test_a_closing_peer_with_more_transfers_than_its_window_settles_every_recv(remote):
    # 300 sends into a window of 128 slots: half marked (some done, some posted), the rest opened or waiting for a
    # slot. The closing agent's ABORTs and BYE settle every recv; the done ones keep their exact bytes.
    another_host(remote, "kvxfer-closing-host")
    agent, peer, layout, dst, _ = connect("tcp", remote, "vllm_flash", 63, layout_args=(4, 512, 16, 2, 32, "float16"))
    expected = [x.copy() for x in dst]
    apply(layout, make_pool(layout, 63), expected, list(range(300)), list(range(300)), range(4))
    recvs = [agent.recv(peer, i + 1, [i], timeout_s=120) for i in range(300)]
    for i in range(300):
        remote.call("send", (i + 1, [i], [i], None, "all" if i % 2 else None))
    remote.call("close", None)
    for recv in recvs:
        try:
            recv.wait(timeout_s=30)
        except errors.PeerLost as e:
            assert "closed its agent" in str(e)
    wait_for(lambda: all(r.writes_over for r in recvs), "writes_over of all 300 recvs", 10)
    assert sum(r.done for r in recvs) > 0 and sum(r.state == kvxfer.TransferState.FAILED for r in recvs) > 0
    for r in recvs:
        if r.done:
            for layer in range(4):
                block = r.xfer_id - 1
                np.testing.assert_array_equal(block_view(layout, dst, layer)[:, block],
                                              block_view(layout, expected, layer)[:, block])
    for layer in range(4):  # blocks no transfer addressed keep their bytes
        np.testing.assert_array_equal(block_view(layout, dst, layer)[:, 300:], block_view(layout, expected, layer)[:, 300:])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_agent_closing_ends_its_peers_in_this_process_before_its_endpoints_go(transport):
    """Two agents of one process: when one closes, the other has already ended it as the close returns (not once
    it reads the BYE), so it never posts to the closed endpoint. Over fi_shm that post reached into the closed
    endpoint's unmapped region and crashed the process (SIGSEGV in libfabric, 1 run in ~15 of
    test_same_peer_added_from_many_threads_at_once_is_one_peer under load)."""
    a, b, _, b_peer_a, _, _ = local_pair(PRESETS["vllm_flash"](), transport, ("close-here-a", "close-here-b"))
    recv = b.recv(b_peer_a, 7, [1, 2], timeout_s=60)
    a.close()
    assert b_peer_a.lost  # at once: no wait for the BYE
    with pytest.raises(errors.PeerLost, match="peer 'close-here-a' closed its agent"):
        recv.wait(timeout_s=1)
    with pytest.raises(errors.PeerLost, match="closed its agent"):
        b.send(b_peer_a, 8, [1], [1])
    b.close()
