"""Heartbeats: a connected peer that sends nothing at all for peer_timeout_s is lost, naming the silence.

A host that loses power or its network sends no FIN: over tcp its peers' connections stay open for hours, an idle
peer looked healthy, and only each transfer's own deadline (60 s by default) noticed. Every agent now PINGs its
connected peers every peer_timeout_s / 4 and ends a peer it heard nothing from (message, write or PING) for
peer_timeout_s, telling it why (BYE). A stopped process (SIGSTOP) stands in for the vanished host: its socket stays
open and its kernel keeps accepting our bytes, exactly like a partition.
"""
import os
import signal
import time

import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import (
    RemoteError,
    assert_exact_from_remote,
    assert_exact_transfer,
    connect,
    local_pair,
    sender_gone_silent,
    wait_for,
)
from tests.reference import PRESETS


def test_a_stopped_peer_is_lost_after_peer_timeout_and_told_when_it_wakes(remote):
    agent, peer, layout, dst, _ = connect("tcp", remote, "vllm_flash", 5, timeout_s=120,
                                          receiver_kwargs={"peer_timeout_s": 1.0}, sender_kwargs={"peer_timeout_s": 1.0})
    assert peer.heartbeat_ms == 250  # 1 s / 4 (a peer that PINGs every 7.5 s, the default, would get 30 s)
    recv = agent.recv(peer, 1, [3, 4])
    remote.call("send", (1, [0, 1], [3, 4], None, None))
    remote.call("mark", (1, 0))
    recv.wait(layer=0, timeout_s=30)
    os.kill(remote.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(errors.PeerLost, match=r"peer 'peer-sender' sent nothing for 1(\.\d+)? s \(no heartbeat, "
                                                  r"message or write; peer_timeout_s=1\): its host may be down"):
            recv.wait(timeout_s=30)
        assert time.monotonic() - t0 < 10  # not the recv's 120 s deadline
        assert peer.lost and agent.stats()["peers_silent"] == 1
        assert not recv.writes_over  # its process lives: what it posted could still land
    finally:
        os.kill(remote.proc.pid, signal.SIGCONT)
    # Awake again, the peer finds the BYE that says why, and its send ends instead of writing on.
    with pytest.raises(RemoteError, match="heard nothing from this agent for its peer_timeout_s"):
        remote.call("wait", (1, 30))


def test_idle_peers_keep_each_other_alive():
    layout = PRESETS["vllm_flash"]()
    kwargs = {"peer_timeout_s": 1.0}
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("hb-a", "hb-b"), sender_kwargs=kwargs,
                                                receiver_kwargs=kwargs)
    time.sleep(3)  # three times the timeout with nothing to move: only PINGs keep them in touch
    assert not peer_a.lost and not peer_b.lost
    assert peer_a.silent_s < 1 and peer_b.silent_s < 1
    for agent in (a, b):
        stats = agent.stats()
        assert stats["heartbeats_sent"] >= 6 and stats["peers_silent"] == 0
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, [1, 2], [7, 30])


def test_a_peer_that_never_pings_is_not_judged():
    """An agent with heartbeats off (peer_timeout_s=0) says so in its metadata; its peers cannot tell silence from
    health and keep it."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("hb-off", "hb-on"), sender_kwargs={"peer_timeout_s": 0},
                                                receiver_kwargs={"peer_timeout_s": 1.0})
    assert peer_a.heartbeat_ms == 0 and peer_b.heartbeat_ms == 250
    wait_for(lambda: peer_a.silent_s > 2, "two seconds of silence from the agent that never pings")
    assert not peer_a.lost and a.stats()["heartbeats_sent"] == 0
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 2, [4], [5])


def test_an_agent_that_was_stopped_itself_does_not_blame_its_peers(remote):
    """The remote agent (peer_timeout_s=1) is stopped for 3 s: when it runs again its own late check shows the stall
    was its own, so it starts over instead of ending the peers it could not hear meanwhile."""
    agent, peer, layout, dst, _ = connect("tcp", remote, "vllm_flash", 6, receiver_kwargs={"peer_timeout_s": 0},
                                          sender_kwargs={"peer_timeout_s": 1.0})
    os.kill(remote.proc.pid, signal.SIGSTOP)
    time.sleep(3)
    os.kill(remote.proc.pid, signal.SIGCONT)
    time.sleep(1.5)  # more than its timeout after waking, with our PINGs off: only the stall rule keeps us
    stats, _ = remote.call("stats", None)
    assert stats["peers_silent"] == 0
    assert_exact_from_remote(agent, peer, remote, layout, dst, 6, 3, [0, 2], [9, 1])


@pytest.mark.parametrize("value", [-1, 0.1, 5000])
def test_bad_peer_timeouts_are_refused(value, monkeypatch):
    with pytest.raises(errors.InvalidArgument, match=rf"peer_timeout_s={value}\.?0?: use 0 \(no heartbeat\)"):
        kvxfer.Agent("hb-bad", transport="tcp", interface="lo", peer_timeout_s=value)
    monkeypatch.setenv("KVXFER_PEER_TIMEOUT_S", str(value))
    with pytest.raises(errors.InvalidArgument, match="KVXFER_PEER_TIMEOUT_S="):
        kvxfer.Agent("hb-bad-env", transport="tcp", interface="lo")


@pytest.mark.parametrize("transport", ["tcp", "cma", "ucx"])
def test_a_silent_peer_added_again_while_stopped_settles_its_old_recvs_by_its_answer(transport, remote):
    """The heartbeat ends a stopped sender on this host; the engine adds the same agent again at once (a new
    association) while it is still stopped. Once it runs again it reads the BYE of the ended association and
    answers with its totals: the answer is routed to the ended association (its link), whose recv then settles,
    and the new association moves bytes exactly. (Until 2026-12-02 that add failed: "the key is taken".)"""
    if transport == "ucx":
        from tests.conftest import _have_ucx

        if not _have_ucx():
            pytest.skip("this kvxfer build has no UCX")
    with sender_gone_silent(transport, remote, 86) as (agent, _, layout, dst, recv, _, metadata):
        again = agent.add_peer(metadata)
        assert not again.lost and not recv.writes_over  # its process lives, stopped: writes may still come
    with pytest.raises(RemoteError, match="PeerLost"):
        remote.call("wait", (1, 30))
    # Its process lives on (this host: no keys fence it), so only its answer can settle the recv.
    wait_for(lambda: recv.writes_over, "the ended association's recv settled by the woken sender's answer", 15)
    remote.call("add_peer", agent.metadata())
    agent.wait_connected(again, 20)
    assert_exact_from_remote(agent, again, remote, layout, dst, 86, 2, [0, 1, 2], [128, 129, 130])
