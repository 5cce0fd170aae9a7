"""Closing an agent tells its peers: their transfers with it fail at once with PeerLost naming the close, not at
their deadlines. The closing agent's process stays alive here, so nothing but its BYE can tell them."""
import time

import pytest

from kvxfer import errors
from tests.conftest import TRANSPORTS, connect


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
    send = agent.send(peer, 3, [1], [2], timeout_s=60)  # the remote never opens the recv: the send waits for it
    t0 = time.monotonic()
    remote.call("close", None)
    with pytest.raises(errors.PeerLost, match="closed its agent"):
        send.all_ready()
        send.wait(timeout_s=30)
    assert time.monotonic() - t0 < 5
    assert remote.proc.is_alive()
