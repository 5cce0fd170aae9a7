"""Per-peer keys (libfabric tcp and shm, whose keys kvxfer chooses): every peer writes into us with keys of its own,
derived from the keys we publish and its epoch, and our shared registrations grant no remote access. Closing a
released peer's keys fences it out: whatever it still posts, on its old connection or a new one, is refused (the
provider probe shows the refusal itself; a kvxfer sender that wakes up also stops on its own once it sees its
writes fail or our BYE). So a recv from a peer on another host that went silent (stopped, cut off) or restarted
settles (writes_over) once its keys are closed, instead of never or on an assumption.

A stopped process (SIGSTOP) stands in for the peer that went silent: the kernel keeps its sockets and, once it is
continued, its progress thread goes on from where it was.
"""
import os
import signal

import numpy as np
import pytest

import kvxfer
from kvxfer import _C, errors
from tests.conftest import (
    SILENT_HEARTBEAT,
    SILENT_LAYOUT,
    UCX,
    RemoteError,
    RemoteSender,
    another_host,
    assert_exact_from_remote,
    connect,
    info_line,
    sender_gone_silent,
    wait_for,
)
from tests.reference import apply, block_view, make_pool


@pytest.mark.parametrize("provider", ["tcp@lo", "shm"])
def test_the_provider_applies_a_write_only_under_the_writers_own_open_key(provider):
    """Four 64-byte writes of one writer into 4 KiB of a target: under its own key (lands), the target's shared key
    (refused), its own key after the target closed it (refused), a new writer's key (lands). Exactly the 128 bytes
    of the two that landed changed, and the target was told of exactly those two (their offsets as immediates)."""
    got = _C.probe_peer_fence(provider)
    assert got == {"fences_peers": True, "own_key_landed": True, "shared_key_landed": False,
                   "closed_key_landed": False, "new_key_landed": True, "bytes_written": 128, "immediates": [0, 3072]}


def test_an_agent_on_a_fencing_provider_gives_each_peer_its_own_keys():
    md = _C.decode_metadata(kvxfer.Agent("keys-md", transport="tcp", interface="lo").metadata())
    assert md["peer_keys"] is True


BIG, HEARTBEAT = SILENT_LAYOUT, SILENT_HEARTBEAT  # 128 MiB per transfer; peers silent for 1 s are ended


def _assert_it_fails_and_nothing_lands(resumed, dst, settled):
    """A fenced sender that runs again: its transfer 1 fails there, and our pool stays as it was when it settled."""
    with pytest.raises(RemoteError):
        resumed.call("wait", (1, 30))
    for now, then in zip(dst, settled):
        np.testing.assert_array_equal(now, then)


@pytest.mark.parametrize("transport", ["tcp", "fi_shm", UCX])
def test_a_silent_sender_on_another_host_is_fenced_and_what_it_posts_later_never_lands(transport, remote):
    another_host(remote, "kvxfer-fenced-host")
    with sender_gone_silent(transport, remote, 81) as (agent, peer, layout, dst, recv, before, _):
        assert not peer.same_host
        wait_for(lambda: recv.writes_over, "writes_over of the silent peer's recv once its keys closed", 15)
        assert agent.stats()["peers_fenced"] == 1
        # The precondition of what follows: the sender stopped with most of its writes still to post.
        assert recv.layers_done < layout.num_layers, "the sender finished before it stopped: nothing was fenced"
        settled = [x.copy() for x in dst]
    # Awake, its progress thread posts the rest with its closed keys (or reconnects to): it learns it was dropped,
    # and not one more byte lands.
    _assert_it_fails_and_nothing_lands(remote, dst, settled)
    for layer in range(layout.num_layers):  # blocks the transfer did not address were never touched
        np.testing.assert_array_equal(block_view(layout, dst, layer)[:, :128], block_view(layout, before, layer)[:, :128])
    assert remote.proc.is_alive()


@pytest.mark.parametrize("transport", ["tcp", "fi_shm", UCX])
def test_a_fenced_peer_added_again_writes_with_new_keys_and_its_old_writes_never_land(transport, remote):
    """The same incarnation added again after it was fenced (an engine reconnecting to a peer the heartbeat ended,
    its process never restarted): the new association gets keys of its own. With the old keys opened again, what
    the woken sender still posts for its old transfer would land in blocks already given to new requests."""
    another_host(remote, "kvxfer-readded-host")
    with sender_gone_silent(transport, remote, 85) as (agent, peer, layout, dst, recv, _, its_metadata):
        wait_for(lambda: recv.writes_over, "writes_over of the silent peer's recv once its keys closed", 15)
        assert recv.layers_done < layout.num_layers, "the sender finished before it stopped: nothing was fenced"
        again = agent.add_peer(its_metadata)  # the same metadata: same epoch, a new association
        assert again is not peer and not again.lost
        settled = [x.copy() for x in dst]
    _assert_it_fails_and_nothing_lands(remote, dst, settled)
    # The woken sender adds us again too: the new association moves bytes exactly.
    remote.call("add_peer", agent.metadata())
    agent.wait_connected(again, 20)
    assert_exact_from_remote(agent, again, remote, layout, dst, 85, 2, [0, 1, 2], [128, 129, 130])


def test_a_stopped_old_incarnation_on_another_host_settles_once_fenced():
    """A peer restarts on another host while its old process is stopped: the old one can neither exit (as seen from
    here) nor answer, so its recvs settle when its keys close, not before (earlier the restart alone was taken as
    proof)."""
    old, new = RemoteSender(), RemoteSender()
    try:
        for r in (old, new):
            another_host(r, "kvxfer-restarted-host")
        agent, peer_old, _, dst, _ = connect("tcp", old, "vllm_flash", 82, layout_args=BIG, timeout_s=120)
        recv = agent.recv(peer_old, 1, list(range(128, 256)), timeout_s=120)
        old.call("send_and_stop", (1, list(range(128)), list(range(128, 256))))
        try:
            agent.add_peer(new.call("init", ("tcp", "vllm_flash", 83, list(BIG), 1, {})))
            with pytest.raises(errors.PeerRestarted, match="restarted"):
                recv.wait(timeout_s=5)
            wait_for(lambda: recv.writes_over, "writes_over of the stopped old incarnation's recv", 15)
            assert agent.stats()["peers_fenced"] == 1, "writes_over came before the old incarnation's keys closed"
            settled = [x.copy() for x in dst]
        finally:
            os.kill(old.proc.pid, signal.SIGCONT)
        _assert_it_fails_and_nothing_lands(old, dst, settled)
    finally:
        old.close()
        new.close()


def test_a_killed_sender_on_another_host_is_released_and_its_recvs_settle(remote):
    """kill -9 mid-transfer, on another host: the heartbeat ends it, and its BYE can never go out (rxm answers EAGAIN
    for a dead peer). It used to wait in the outbox for good, so the peer was never released (its connection and
    fds kept, its recvs unsettled); past 5 s the BYE is dropped, the peer released and fenced."""
    another_host(remote, "kvxfer-killed-host")
    agent, peer, _, _, _ = connect("tcp", remote, "vllm_flash", 84, layout_args=BIG, timeout_s=120,
                                          receiver_kwargs=HEARTBEAT, sender_kwargs=HEARTBEAT)
    recv = agent.recv(peer, 1, list(range(128, 256)), timeout_s=120)
    remote.call("send", (1, list(range(128)), list(range(128, 256)), None, None))
    remote.call("mark", (1, 0))
    recv.wait(layer=0, timeout_s=30)
    remote.conn.send(("crash", None))
    remote.proc.join(10)
    with pytest.raises(errors.PeerLost, match="sent nothing for"):
        recv.wait(timeout_s=30)
    wait_for(lambda: recv.writes_over, "writes_over of the killed peer's recv", 15)
    stats = agent.stats()
    assert stats["peers_released"] == 1 and stats["peers_fenced"] == 1


def test_fencing_one_peer_leaves_the_others_writing(remote):
    """Two senders on another host are connected; one is removed and fenced. The other one's keys are its own, so
    it still moves a transfer byte for byte (with one key shared among peers, closing it would have cut both)."""
    another_host(remote, "kvxfer-keys-host")
    agent, peer, layout, dst, _ = connect("tcp", remote, "vllm_flash", 91, layout_args=BIG)
    other = RemoteSender()
    try:
        another_host(other, "kvxfer-keys-host")
        peer_other = agent.add_peer(other.call("init", ("tcp", "vllm_flash", 92, list(BIG), 1, {"name": "other"})))
        other.call("add_peer", agent.metadata())
        agent.wait_connected(peer_other, 20)
        agent.remove_peer(peer_other)
        wait_for(lambda: agent.stats()["peers_fenced"] == 1, "the removed peer fenced", 10)
    finally:
        other.close()
    expected = [x.copy() for x in dst]
    apply(layout, make_pool(layout, 91), expected, [1, 2, 3], [7, 9, 200], range(layout.num_layers))
    recv = agent.recv(peer, 5, [7, 9, 200])
    remote.call("send", (5, [1, 2, 3], [7, 9, 200], None, "all"))
    recv.wait(timeout_s=30)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)


def test_shared_keys_are_refused_by_an_agent_with_own_keys(monkeypatch):
    """KVXFER_PEER_KEYS=shared (one key for all peers, as efa/verbs do) is said in the metadata; an agent giving each
    peer its own keys refuses such a peer at add_peer, naming both sides, instead of timing out on refused writes."""
    own = kvxfer.Agent("keys-own", transport="tcp", interface="lo")
    monkeypatch.setenv("KVXFER_PEER_KEYS", "shared")
    shared = kvxfer.Agent("keys-shared", transport="tcp", interface="lo")
    assert _C.decode_metadata(shared.metadata())["peer_keys"] is False
    with pytest.raises(errors.TransportUnavailable, match="peer 'keys-shared' does not give each peer keys of its own "
                                                          "but this agent does"):
        own.add_peer(shared.metadata())
    shared.close()
    own.close()


def test_a_bad_key_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("KVXFER_PEER_KEYS", "per-peer")
    with pytest.raises(errors.InvalidArgument, match="KVXFER_PEER_KEYS='per-peer' is not one of own, shared"):
        kvxfer.Agent("keys-bad", transport="tcp", interface="lo")


def test_info_says_how_peers_are_keyed():
    for mode, said in (("own", "each peer writes with keys of its own"), ("shared", "one key for all peers")):
        tcp = info_line("tcp", KVXFER_PEER_KEYS=mode)
        assert said in tcp and f"KVXFER_PEER_KEYS={mode}" in tcp, tcp


def _with_epoch(md: bytes, epoch: int) -> bytes:
    """The same agent's metadata under another epoch, resealed (as a peer whose epoch happens to be that)."""
    from tests.test_errors import _reseal

    payload = md[16:]
    old = _C.decode_metadata(md)["epoch"].to_bytes(8, "little")
    assert payload.count(old) == 1
    return _reseal(md, payload.replace(old, epoch.to_bytes(8, "little")))


def test_a_peer_refused_for_a_key_collision_leaves_nothing_behind():
    """Keys derive from published keys, the writer's epoch and the association's link number, so two peers' keys can
    collide (about 1 in 2^64 per pair; forced here by choosing an epoch). The provider refuses the second registration, and add_peer with it:
    the peer must then be gone entirely. It used to stay listed, holding a window and without keys, so adding it
    again returned that broken peer instead of refusing, and a max_peers agent lost the window for good."""
    layout = kvxfer.KVLayout.contiguous(4, 4096)
    a = kvxfer.Agent("collide-rx", transport="tcp", interface="lo", max_peers=2)
    dst = np.zeros(4 * 4096, np.uint8)
    a.register_pool(dst, layout)
    md_a = _C.decode_metadata(a.metadata())
    signal, pool = md_a["signal_rkey"], md_a["pools"][0]["rkeys"][0]
    senders = [kvxfer.Agent(f"collide-tx{i}", transport="tcp", interface="lo") for i in range(3)]
    src = np.arange(4 * 4096, dtype=np.uint32).astype(np.uint8)
    for s in senders:
        s.register_pool(src, layout)
    peer_b = a.add_peer(senders[0].metadata())  # the agent's first association: link 1
    # An epoch under which the second sender's key for our pool equals the first one's for our signal pad, for the
    # link number its adding gets (each add_peer takes the next one, refused or not).
    mult, inv = 0x9E3779B97F4A7C15, pow(0x9E3779B97F4A7C15, -1, 1 << 64)
    salt_b = _C.writer_salt(_C.decode_metadata(senders[0].metadata())["epoch"], 1)
    for link in (2, 3):  # refused each time: nothing of the first refusal stayed listed
        salt = ((pool ^ signal ^ (salt_b * mult % (1 << 64))) * inv) % (1 << 64)
        clash = salt ^ _C.writer_salt(0, link)
        assert _C.peer_key(pool, _C.writer_salt(clash, link)) == _C.peer_key(signal, salt_b)
        with pytest.raises(errors.RegistrationFailed, match="key .* is taken|two peers' keys collided"):
            a.add_peer(_with_epoch(senders[1].metadata(), clash))
    def move(sender, peer_at_a, xfer, src_ids, dst_ids):
        to_a = sender.add_peer(a.metadata())
        sender.wait_connected(to_a, 20)
        a.wait_connected(peer_at_a, 20)
        recv = a.recv(peer_at_a, xfer, dst_ids)
        sender.send(to_a, xfer, src_ids, dst_ids).all_ready()
        recv.wait(timeout_s=20)

    # Its window is free again (max_peers=2): a third sender gets it, and moves bytes exactly.
    move(senders[2], a.add_peer(senders[2].metadata()), 1, [0, 1], [2, 3])
    assert (dst[2 * 4096:] == src[:2 * 4096]).all() and (dst[:2 * 4096] == 0).all()
    # The first sender's keys (its signal pad key is the one the refused peer collided with) still work.
    move(senders[0], peer_b, 2, [2, 3], [0, 1])
    assert (dst[:2 * 4096] == src[2 * 4096:]).all() and (dst[2 * 4096:] == src[:2 * 4096]).all()
    for s in senders:
        s.close()
    a.close()
