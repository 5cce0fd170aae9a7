"""Agent(max_peers=N): an agent holds N peers, each with a window of 4096 / N transfers in flight towards it.

The 12-bit slot of every immediate names its sender (rxm-based providers report no source for remote writes), so a
receiver splits its 4096 slots into one window per peer. Fixed windows of 128 capped every agent at 32 peers: a
prefill worker serving a large decode pool, or a decode worker fed by many prefill ranks, met that cap. max_peers
trades the windows' size for their number; a sender takes whatever window the receiver's HELLO names, so agents
created with different settings talk to each other. Bytes are checked against the numpy reference (addressed
chunks equal the source, every other byte untouched) with senders in windows past the old 32.
"""
import numpy as np
import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import assert_exact_transfer, fan_in, local_pair
from tests.reference import PRESETS, apply, make_pool

SMALL = kvxfer.KVLayout.vllm_flash(2, 64, 4, 2, 16, "float16")  # 64 blocks of 256 B per (layer, plane)


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_forty_senders_into_one_receiver_each_land_exactly(transport):
    """40 senders (8 more than the old cap), the same transfer id from each: every transfer lands exactly where
    addressed and counts for its own sender (cma: through doorbell rings 32 and up)."""
    receiver = kvxfer.Agent("many-r", transport=transport, interface="lo", timeout_s=30, max_peers=64)
    assert receiver.max_peers == 64 and receiver.transfers_per_peer == 64
    dst = make_pool(SMALL, 900)
    receiver.register_pool(dst, SMALL)
    expected = [x.copy() for x in dst]
    senders, pools, peers_of_receiver, peers_at_receiver = fan_in(receiver, 40, transport, SMALL, "many")
    assert sorted(p._h._rx_window for p in peers_at_receiver) == list(range(40))
    assert {p.send_window for p in peers_of_receiver} == {64}
    recvs, sends = [], []
    for i, (s, pr, ps) in enumerate(zip(senders, peers_of_receiver, peers_at_receiver)):
        src_ids, dst_ids = [(i * 7) % 64, (i * 7 + 3) % 64], [i, 63 - i // 2] if i % 2 else [i]
        src_ids = src_ids[:len(dst_ids)]
        apply(SMALL, pools[i], expected, np.array(src_ids), np.array(dst_ids), range(SMALL.num_layers))
        recvs.append(receiver.recv(ps, 7, dst_ids))
        sends.append(s.send(pr, 7, src_ids, dst_ids))
        sends[-1].all_ready()
    for r, snd in zip(recvs, sends):
        r.wait(timeout_s=30)
        snd.wait(timeout_s=30)
        assert r.layers_done == SMALL.num_layers
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    stats = receiver.stats()
    assert stats["unknown_imms"] == 0
    if transport == "cma":
        assert stats["doorbell_received"] > 0 and all(p.signals == "doorbell" for p in peers_of_receiver)
    for s in senders:
        s.close()
    receiver.close()


def test_a_peer_past_max_peers_is_refused_naming_the_setting():
    layout = PRESETS["vllm_flash"]()
    b = kvxfer.Agent("cap-r", transport="tcp", interface="lo", timeout_s=30, max_peers=2)
    dst = make_pool(layout, 31)
    b.register_pool(dst, layout)
    agents = [kvxfer.Agent(f"cap-s{i}", transport="tcp", interface="lo", timeout_s=30) for i in range(3)]
    srcs = [make_pool(layout, 40 + i) for i in range(3)]
    for a, src in zip(agents, srcs):
        a.register_pool(src, layout)
    first = [b.add_peer(a.metadata()) for a in agents[:2]]
    with pytest.raises(errors.InvalidArgument, match=r"already has 2 live peers.*max_peers=2.*KVXFER_MAX_PEERS"):
        b.add_peer(agents[2].metadata())
    b.remove_peer(first[0])  # its window is free again
    peer_a = b.add_peer(agents[2].metadata())
    assert peer_a._h._rx_window == first[0]._h._rx_window
    peer_b = agents[2].add_peer(b.metadata())
    b.wait_connected(peer_a, 20)
    agents[2].wait_connected(peer_b, 20)
    assert peer_b.send_window == 2048
    assert_exact_transfer(agents[2], b, peer_b, peer_a, srcs[2], dst, layout, 5, [1, 2, 3], [9, 4, 30])
    for a in agents + [b]:
        a.close()


def test_the_window_is_the_receivers_choice_and_bounds_transfers_in_flight():
    """a (default 32 peers) sends to b (256 peers): 16 transfers in flight, the 17th waits for a slot; b's sends to a
    get a's 128. Every transfer lands exactly, the waiting one once a slot came back."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("win-s", "win-r"), receiver_kwargs={"max_peers": 256})
    assert (a.transfers_per_peer, b.transfers_per_peer) == (128, 16)
    assert (peer_b.send_window, peer_a.send_window) == (16, 128)
    recvs = [b.recv(peer_a, 100 + i, [i]) for i in range(17)]
    sends = [a.send(peer_b, 100 + i, [i], [i]) for i in range(17)]  # none marked ready yet: all hold their slots
    assert [s.waiting_for_slot for s in sends] == [False] * 16 + [True]
    assert a.stats()["sends_waited_for_slot"] == 1
    expected = [x.copy() for x in dst]
    apply(layout, src, expected, np.arange(17), np.arange(17), range(layout.num_layers))
    for s in reversed(sends):  # the waiting one is marked first: its layers go out once it has a slot
        s.all_ready()
    for r, s in zip(recvs, sends):
        r.wait(timeout_s=30)
        s.wait(timeout_s=30)
    assert not sends[-1].waiting_for_slot
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    a.close()
    b.close()


def test_landing_slots_follow_the_receivers_windows():
    """A receiver of max_peers=8 (windows of 512) reached through its landing slots: the sender, in the receiver's
    second window, writes landing slots of window 1, and the bytes land exactly."""
    layout = PRESETS["vllm_flash"]()
    b = kvxfer.Agent("land-r", transport="tcp", interface="lo", timeout_s=30, max_peers=8, landing="always")
    dst = make_pool(layout, 12)
    b.register_pool(dst, layout)
    other = kvxfer.Agent("land-other", transport="tcp", interface="lo")
    b.add_peer(other.metadata())  # takes window 0
    a = kvxfer.Agent("land-s", transport="tcp", interface="lo", timeout_s=30)
    src = make_pool(layout, 11)
    a.register_pool(src, layout)
    peer_a, peer_b = b.add_peer(a.metadata()), a.add_peer(b.metadata())
    b.wait_connected(peer_a, 20)
    a.wait_connected(peer_b, 20)
    assert peer_a._h._rx_window == 1 and peer_b.send_window == 512
    assert a.path_to(peer_b)[0] == "staged"
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 9, [3, 4, 5, 6], [10, 2, 31, 0])
    stats = b.stats()
    assert stats["landings"] > 0 and stats["landing_rejected"] == 0 and stats["unknown_imms"] == 0
    for x in (a, b, other):
        x.close()


@pytest.mark.parametrize("value", [0, 3, 48, 2048])
def test_bad_max_peers_are_refused(value):
    with pytest.raises(errors.InvalidArgument, match=rf"max_peers={value}: use a power of two from 1 to 1024"):
        kvxfer.Agent("bad-cap", transport="tcp", interface="lo", max_peers=value)


def test_max_peers_from_the_environment(monkeypatch):
    monkeypatch.setenv("KVXFER_MAX_PEERS", "24")
    with pytest.raises(errors.InvalidArgument, match=r"KVXFER_MAX_PEERS=24: use a power of two"):
        kvxfer.Agent("env-cap", transport="tcp", interface="lo")
    monkeypatch.setenv("KVXFER_MAX_PEERS", "1024")
    agent = kvxfer.Agent("env-cap", transport="tcp", interface="lo")
    assert (agent.max_peers, agent.transfers_per_peer) == (1024, 4)
    agent.close()
    assert kvxfer.Agent("arg-wins", transport="tcp", interface="lo", max_peers=1).transfers_per_peer == 4096


def test_a_landing_ring_too_large_for_max_peers_is_refused_at_creation():
    """The landing ring (max_peers x landing_slots x landing_slot_bytes) is allocated and registered whole when a pool
    first needs it; a product past 16 GiB is refused when the Agent is made, naming the three factors."""
    with pytest.raises(errors.InvalidArgument, match=r"landing ring of max_peers x landing_slots x landing_slot_bytes "
                                                     r"= 1024 x 64 x 1048576 bytes \(65536 MiB\) is more than the 16 GiB"):
        kvxfer.Agent("ring-big", transport="tcp", interface="lo", max_peers=1024, landing_slots=64,
                     landing_slot_bytes=1 << 20)
    agent = kvxfer.Agent("ring-ok", transport="tcp", interface="lo", max_peers=1024)  # 1024 x 4 x 256 KiB = 1 GiB
    assert agent.landing() is None  # nothing allocated until a pool needs landing
    agent.close()
