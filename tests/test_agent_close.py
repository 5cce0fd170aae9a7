"""Closing an agent tells its peers: their transfers with it fail at once with PeerLost naming the close, not at
their deadlines. The closing agent's process stays alive here, so nothing but its BYE can tell them; and a process
"on another host" that exits with its agent still open tells them the same way."""
import os
import subprocess
import sys
import time

import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import TRANSPORTS, UCX, connect
from tests.reference import PRESETS, make_pool

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
    with pytest.raises(errors.PeerLost, match="closed its agent"):
        agent.recv(peer, 2, [6])  # and later ones are refused naming it


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
