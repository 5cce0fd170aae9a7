"""A peer that comes back under the same name (a new incarnation: new epoch, same host name) replaces the old one:
the old one's transfers end with PeerRestarted naming the restart, the old incarnation is told (BYE) in case it
still runs, writes_over of the ended recvs is claimed only once nothing the old incarnation posted can still land
(its answer's totals counted, or its process gone), and the new incarnation's transfers are exact."""
import numpy as np
import pytest

from kvxfer import errors
from tests.conftest import (
    UCX,
    RemoteError,
    RemoteSender,
    assert_ended_sender_was_told,
    assert_exact_from_remote,
    connect,
    wait_for,
)


@pytest.mark.parametrize("transport", ["tcp", "cma", UCX])  # cma: the BYE goes through the same-host doorbell ring
def test_restart_while_the_old_incarnation_still_runs(transport):
    old, new = RemoteSender(), RemoteSender()  # both agents are named "peer-sender": the second is a restart
    try:
        agent, peer_old, layout, dst, _ = connect(transport, old, "vllm_flash", 5)
        recv = agent.recv(peer_old, 1, [3, 4])
        old.call("send", (1, [0, 1], [3, 4], None, None))
        old.call("mark", (1, 0))
        recv.wait(layer=0, timeout_s=30)
        before = [x.copy() for x in dst]

        peer_new = agent.add_peer(new.call("init", (transport, "vllm_flash", 6, [], 1, {})))
        with pytest.raises(errors.PeerRestarted, match="peer 'peer-sender' restarted \\(new epoch\\)"):
            recv.wait(timeout_s=5)
        assert_ended_sender_was_told(old, 1, dst, before)  # its send fails at once, no later layer lands
        # The old process lives on; it answered the BYE with the total it had posted, which was counted here.
        wait_for(lambda: recv.writes_over, "the old incarnation's recv writes over from its answer")
        assert old.proc.is_alive()
        for got, want in zip(dst, before):
            np.testing.assert_array_equal(got, want)

        # The new incarnation is an ordinary peer: an exact transfer.
        new.call("add_peer", agent.metadata())
        agent.wait_connected(peer_new, 20)
        assert_exact_from_remote(agent, peer_new, new, layout, dst, 6, 2, [2, 0], [5, 6])
    finally:
        old.close()
        new.close()


def test_restart_after_the_old_process_died_settles_writes_over():
    """The usual restart: the old process crashed mid-transfer and a new one registers before this agent noticed;
    its recv ends (PeerRestarted, or PeerLost when the liveness check saw the exit first) and writes_over turns
    True (nothing can write any more)."""
    old, new = RemoteSender(), RemoteSender()
    try:
        agent, peer_old, _, _, _ = connect("tcp", old, "vllm_flash", 7)
        recv = agent.recv(peer_old, 1, [3, 4])
        old.call("send", (1, [0, 1], [3, 4], None, None))
        old.call("mark", (1, 0))
        recv.wait(layer=0, timeout_s=30)
        old.conn.send(("crash", None))
        old.proc.join(10)
        agent.add_peer(new.call("init", ("tcp", "vllm_flash", 8, [], 1, {})))
        with pytest.raises((errors.PeerRestarted, errors.PeerLost)):
            recv.wait(timeout_s=5)
        wait_for(lambda: recv.writes_over, "writes_over of the dead incarnation's recv")
    finally:
        old.close()
        new.close()


def test_restart_of_a_peer_on_another_host_settles_writes_over():
    """The two incarnations run under another host name (UTS namespaces of their own), so this agent cannot watch
    the old process. writes_over turns True without the old process exiting (by the old incarnation's answer to our
    BYE, or once its keys are closed: tests/test_peer_keys.py has it stopped), and the old incarnation is told."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to give the peers a host name of their own (unshare CLONE_NEWUTS)")
    old, new = RemoteSender(), RemoteSender()
    try:
        for r in (old, new):
            assert r.call("hostname", "kvxfer-elsewhere") == "kvxfer-elsewhere"
        agent, peer_old, _, _, path = connect("tcp", old, "vllm_flash", 9)
        assert peer_old.path != "cma"  # not the same host as far as the agent can tell
        recv = agent.recv(peer_old, 1, [3, 4])
        old.call("send", (1, [0, 1], [3, 4], None, None))
        old.call("mark", (1, 0))
        recv.wait(layer=0, timeout_s=30)
        agent.add_peer(new.call("init", ("tcp", "vllm_flash", 10, [], 1, {})))
        with pytest.raises(errors.PeerRestarted, match="restarted"):
            recv.wait(timeout_s=5)
        wait_for(lambda: recv.writes_over, "writes_over of a restarted peer on another host", timeout_s=10)
        assert old.proc.is_alive()
        with pytest.raises(RemoteError, match="PeerLost.*removed this agent"):
            old.call("wait", (1, 10))
    finally:
        old.close()
        new.close()
