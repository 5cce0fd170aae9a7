"""Same-host signals through shared memory (csrc/transports/host_ipc/doorbell.h).

The rings on their own first (flow control, wrap-around, one ring per window, the sleep/wake handshake, refusing
what is not a doorbell), then agents in two processes: a CMA sender puts every layer's completion and every control
message into the receiver's ring and none on the fabric, exact bytes, exact entry counts; with the doorbell off the
same transfer signals through the fabric; an entry naming another window's slot counts for nobody."""
import os
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import _C, errors
from tests.conftest import connect, local_pair
from tests.reference import PRESETS, apply

IMM = 1  # DoorbellEntry::kImm
CONTROL = 2


def imm(slot, layer, granules):
    return (slot << 20) | (layer << 12) | granules


@pytest.fixture
def ring():
    region = _C._DoorbellRegion()
    link = _C._DoorbellLink(os.getpid(), region.fd, -1)
    link.set_ring(3)
    return region, link


def test_entries_arrive_in_order_and_wrap_around(ring):
    region, link = ring
    n = _C._DoorbellRegion.entries_per_ring
    sent = []
    for round_ in range(3):  # 3 x 700 entries: positions run past the ring's end twice
        for i in range(700):
            value = imm(round_ * 7 % 4096, i % 256, 1 + i % 4095)
            assert link.post_imm(value)
            sent.append(value)
        got = region.drain(3, n)
        assert [(k, v) for k, v, _ in got] == [(IMM, v) for v in sent[-700:]]
    assert region.drain(3, n) == []  # nothing twice


def test_a_full_ring_refuses_until_the_receiver_drains(ring):
    region, link = ring
    n = _C._DoorbellRegion.entries_per_ring
    for i in range(n):
        assert link.post_imm(imm(0, 0, 1 + i % 4095))
    assert not link.post_imm(imm(0, 0, 9))  # would overwrite an entry not read yet
    assert len(region.drain(3, 10)) == 10
    for _ in range(10):
        assert link.post_imm(imm(0, 1, 5))
    assert not link.post_imm(imm(0, 1, 5))
    rest = region.drain(3, 2 * n)
    assert len(rest) == n and rest[-10:] == [(IMM, imm(0, 1, 5), 0)] * 10


def test_rings_are_separate_and_control_messages_keep_their_payload(ring):
    region, link = ring
    assert link.post_control(0xDEADBEEF12345678)
    assert region.drain(2, 8) == [] and region.drain(4, 8) == []
    assert region.drain(3, 8) == [(CONTROL, 0, 0xDEADBEEF12345678)]


def test_a_sleeping_receiver_is_woken_through_its_eventfd():
    region = _C._DoorbellRegion()
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        link = _C._DoorbellLink(os.getpid(), region.fd, wake)
        link.set_ring(0)
        link.post_imm(imm(0, 0, 1))
        assert link.wakes == 0  # nobody sleeps: no syscall
        assert not region.prepare_to_sleep([0])  # an entry is waiting: do not block
        region.drain(0, 8)
        assert region.prepare_to_sleep([0])
        link.post_imm(imm(0, 0, 2))
        assert link.wakes == 1 and os.eventfd_read(wake) == 1
        region.wake_up()
        link.post_imm(imm(0, 0, 3))
        assert link.wakes == 1
        assert [v for _, v, _ in region.drain(0, 8)] == [imm(0, 0, 2), imm(0, 0, 3)]
    finally:
        os.close(wake)


def test_a_link_refuses_what_is_not_a_doorbell(tmp_path):
    f = open(tmp_path / "not-a-doorbell", "wb+")
    f.truncate(1 << 20)
    with pytest.raises(errors.TransportUnavailable, match="not a sealed region"):
        _C._DoorbellLink(os.getpid(), f.fileno(), -1)
    f.close()
    with pytest.raises(errors.TransportUnavailable, match="pidfd_getfd"):
        _C._DoorbellLink(os.getpid(), 1 << 20, -1)  # no such fd in that process
    region = _C._DoorbellRegion()
    with pytest.raises(errors.TransportUnavailable, match="wake fd is not an eventfd"):
        _C._DoorbellLink(os.getpid(), region.fd, region.fd)


ROUNDS = 3


def run_rounds(agent, peer, layout, dst, remote, seed):
    """ROUNDS transfers of 5 blocks over every layer from the remote sender; checks every byte of the pool."""
    from tests.reference import make_pool

    expected = [x.copy() for x in dst]
    src_pool = make_pool(layout, seed)
    rng = np.random.default_rng(seed)
    for xfer in range(ROUNDS):
        src_ids = rng.choice(layout.num_blocks, 5, replace=False).astype(np.int32)
        dst_ids = rng.choice(layout.num_blocks, 5, replace=False).astype(np.int32)
        apply(layout, src_pool, expected, src_ids, dst_ids, range(layout.num_layers))
        recv = agent.recv(peer, xfer, dst_ids)
        remote.call("send", (xfer, src_ids.tolist(), dst_ids.tolist(), None, "all"))
        recv.wait(timeout_s=30)
        assert remote.call("wait", (xfer, 30)) == "DONE"
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)


def test_cma_sender_signals_through_the_receivers_doorbell(remote):
    agent, peer, layout, dst, path = connect("cma", remote, "vllm_flash", 61)
    assert path == "cma" and peer.signals == "doorbell", peer.signals_reason
    time.sleep(0.2)  # the receiver goes to sleep in poll(): the sender's first entry must wake it
    run_rounds(agent, peer, layout, dst, remote, 61)
    mine, theirs = agent.stats(), remote.call("stats", None)[0]
    per_xfer = layout.num_layers + 1  # one signal per layer (< 4095 granules each) and the BEGIN
    assert mine["imms_received"] == 0  # nothing came over the fabric
    assert mine["doorbell_received"] == ROUNDS * per_xfer and theirs["doorbell_sent"] == ROUNDS * per_xfer
    assert mine["doorbell_sent"] == ROUNDS and theirs["doorbell_received"] == ROUNDS  # the RELEASEs
    assert theirs["doorbell_wakes"] >= 1 and mine["idle_waits"] > 0


@pytest.mark.parametrize("where", ["receiver", "sender"])
def test_doorbell_off_on_either_side_signals_through_the_fabric(remote, where, monkeypatch):
    if where == "receiver":
        monkeypatch.setenv("KVXFER_DOORBELL", "0")  # read by this process's agent only
    agent, peer, layout, dst, _ = connect("cma", remote, "vllm_flash", 62,
                                          sender_kwargs={"doorbell": False} if where == "sender" else None)
    run_rounds(agent, peer, layout, dst, remote, 62)
    mine, theirs = agent.stats(), remote.call("stats", None)[0]
    assert mine["imms_received"] == ROUNDS * layout.num_layers
    assert mine["doorbell_received"] == 0 and theirs["doorbell_sent"] == 0
    assert agent.doorbell == (where == "sender")


def test_an_entry_naming_another_windows_slot_counts_for_nobody():
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "cma", ("db-s", "db-r"))
    assert peer_b.signals == "doorbell" and peer_a.signals == "doorbell"
    w = peer_a._h._rx_window  # the ring a writes into at b
    intruder = _C._DoorbellLink(os.getpid(), *b._c._doorbell_fds)
    intruder.set_ring(w)
    foreign_slot = ((w + 1) % b.max_peers) * b.transfers_per_peer
    assert intruder.post_imm(imm(foreign_slot, 0, 7))
    deadline = time.monotonic() + 10
    while b.stats()["doorbell_received"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = b.stats()
    assert stats["doorbell_received"] == 1 and stats["unknown_imms"] == 1


def test_same_host_signals_are_reported():
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, *_ = local_pair(layout, "tcp", ("db-tcp-s", "db-tcp-r"))
    assert peer_b.signals == "fabric" and "transport 'tcp' requested" in peer_b.signals_reason
    c = kvxfer.Agent("db-off", transport="cma", interface="lo", doorbell=False)
    assert not c.doorbell and "disabled" in c.doorbell_reason
    on = kvxfer.Agent("db-on", transport="cma", interface="lo")
    peer = c.add_peer(on.metadata())
    assert peer.signals == "fabric" and "disabled here" in peer.signals_reason


def test_a_bad_doorbell_setting_is_refused(monkeypatch):
    monkeypatch.setenv("KVXFER_DOORBELL", "yes")
    with pytest.raises(errors.InvalidArgument, match="KVXFER_DOORBELL='yes'"):
        kvxfer.Agent("db-bad", transport="cma", interface="lo")


@pytest.mark.parametrize("value,says", [("1", "yes  doorbell  shared-memory rings"), ("0", "no   doorbell  off")])
def test_info_says_how_same_host_peers_signal(value, says):
    import subprocess
    import sys

    env = {**os.environ, "KVXFER_DOORBELL": value}
    out = subprocess.run([sys.executable, "-m", "kvxfer", "info"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert says in out.stdout


@pytest.mark.parametrize("rings", [1, 1024])
def test_a_region_holds_one_ring_per_window_and_no_more(rings):
    """An agent of max_peers=N exposes N rings; a producer reads the count from the region and refuses a ring past
    it (a HELLO naming a window the region does not have falls back to the fabric)."""
    region = _C._DoorbellRegion(rings)
    link = _C._DoorbellLink(os.getpid(), region.fd, -1)
    assert region.rings == link.rings == rings
    with pytest.raises(errors.InvalidArgument, match=rf"ring {rings} does not exist \(the region has {rings}\)"):
        link.set_ring(rings)
    link.set_ring(rings - 1)
    assert link.post_imm(imm(4095, 1, 2))
    assert region.drain(rings - 1, 8) == [(IMM, imm(4095, 1, 2), 0)]
    if rings > 1:
        assert region.drain(0, 8) == []
