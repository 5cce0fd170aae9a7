"""Landing slots (receiver-side staging): the sender writes batches into the receiver's registered host slots and
the receiver copies them into its pool before counting them. This is how a GPU pool on a host without GPU-direct
RDMA is reached from another host; here the receiver asks for it with landing='always' on host pools, so the
whole pipeline runs for real across two processes over tcp, libfabric shm and cma: headers built and parsed,
batches copied out of the slots (memcpy here, host-to-device copies on a GPU), landing slots handed back with
LANDED and reused many times. Rings are made much smaller than the transfers so every slot turns over.

The receiver also parses headers that arrive from the wire: the injected ones below are malformed or point outside
the pool, and must be refused without touching a byte."""
import struct
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import TRANSPORTS, assert_layerwise_concurrent, cancel_after_layer_0, connect, local_pair, wait_for
from tests.reference import PRESETS, apply, expected_after, make_pool

SMALL_RING = {"staging": "always", "staging_slot_bytes": 8192, "staging_slots": 3}
LANDING = {"landing": "always", "landing_slot_bytes": 8192, "landing_slots": 2}

HEADER = struct.Struct("<IHHIIIIQ")  # magic, version, entries, xfer slot, layer, pool, granules, data bytes
ENTRY = struct.Struct("<QII")        # dst offset, dst region, nbytes
MAGIC, VERSION, DATA_OFFSET = 0x444C564B, 1, 1024


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["vllm_flash", "mla", "blocks_first"])
def test_landing_bytes_exact_through_small_rings(transport, kind, remote):
    agent, peer, layout, dst, _ = connect(transport, remote, kind, seed=41, sender_kwargs=SMALL_RING,
                                          receiver_kwargs=LANDING)
    rng = np.random.default_rng(5)
    n = layout.num_blocks // 2
    src_ids = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    dst_ids = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    expected = expected_after(layout, dst, 41, src_ids, dst_ids, range(layout.num_layers))

    recv = agent.recv(peer, 9, dst_ids)
    remote.call("send", (9, src_ids.tolist(), dst_ids.tolist(), None, "all"))
    recv.wait(timeout_s=30)
    assert remote.call("wait", (9, 30)) == "DONE"
    path, reason, _ = remote.call("path", 9)
    assert path == "staged" and "landing slots (2 x 8 KiB)" in reason and "host pool" in reason
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)  # addressed chunks equal the source, every other byte untouched
    sender_stats, _ = remote.call("stats", None)
    stats = agent.stats()
    # one landing batch per staged write, every one copied and counted; the 2 landing slots turned over many times
    assert stats["landings"] == sender_stats["writes_posted"] >= 8
    assert stats["landing_rejected"] == 0 and stats["unknown_imms"] == 0
    assert agent.landing() == {"slot_bytes": 8192, "slots_per_peer": 2, "pinned": agent.staging()["pinned"]}


def test_landing_over_two_rails(remote):
    """Batches spread over two tcp connections land in the same per-peer slots; counts and bytes stay exact."""
    agent, peer, layout, dst, _ = connect("tcp", remote, "vllm_flash", seed=53, rails=2, sender_kwargs=SMALL_RING,
                                          receiver_kwargs=LANDING)
    rng = np.random.default_rng(9)
    src_ids = rng.choice(layout.num_blocks, 16, replace=False).astype(np.int32)
    dst_ids = rng.choice(layout.num_blocks, 16, replace=False).astype(np.int32)
    expected = expected_after(layout, dst, 53, src_ids, dst_ids, range(layout.num_layers))
    recv = agent.recv(peer, 4, dst_ids)
    remote.call("send", (4, src_ids.tolist(), dst_ids.tolist(), None, "all"))
    recv.wait(timeout_s=30)
    assert remote.call("wait", (4, 30)) == "DONE"
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    sender_stats, rails = remote.call("stats", None)
    assert rails == 2 and all(r["writes"] > 0 for r in sender_stats["rails"])  # both rails carried batches
    assert agent.stats()["landings"] == sender_stats["writes_posted"]


@pytest.mark.parametrize("transport", ["tcp", "fi_shm"])
def test_landing_layerwise_arrival_and_concurrent_requests(transport, remote):
    """8 requests share the sender's 3 bounce slots and its 2 landing slots, layers marked in random orders: each
    layer completes exactly when it was marked and copied, counts stay exact per request."""
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed=23, sender_kwargs=SMALL_RING,
                                          receiver_kwargs=LANDING)
    assert_layerwise_concurrent(agent, peer, layout, dst, remote, seed=23, first_id=500)


def test_aborted_landing_transfers_give_their_slots_back():
    """150 sends (more than a pair's 128 slots) abort after 0-3 of 4 layers went out through the landing slots; the
    receiver counts what landed, hands every slot back, and the next transfer is exact."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("landing-abort-sender", "landing-abort-receiver"),
                                                sender_kwargs=SMALL_RING, receiver_kwargs=LANDING)
    failures = 150
    recvs = []
    for i in range(failures):
        dst_ids = np.array([(i * 3) % 32, (i * 3 + 1) % 32], np.int32)
        recv = b.recv(peer_a, i, dst_ids)
        send = a.send(peer_b, i, np.array([i % 32, (i + 7) % 32], np.int32), dst_ids)
        for layer in range(i % layout.num_layers):
            send.layer_ready(layer)
        send.abort("request cancelled")
        with pytest.raises(errors.KvxferError, match="request cancelled"):
            send.wait(timeout_s=30)
        recvs.append(recv)
    wait_for(lambda: a.stats()["slots_reclaimed"] == failures, "every aborted slot handed back")
    wait_for(lambda: all(r.writes_over for r in recvs), "every failed recv's writes over")
    assert b.stats()["slot_violations"] == 0 and b.stats()["landing_rejected"] == 0

    src_ids, dst_ids = np.array([3, 9, 20], np.int32), np.array([30, 1, 17], np.int32)
    expected = [x.copy() for x in dst]
    apply(layout, src, expected, src_ids, dst_ids, range(layout.num_layers))
    recv = b.recv(peer_a, 10_000, dst_ids)
    send = a.send(peer_b, 10_000, src_ids, dst_ids)
    assert "landing slots" in send.path_reason
    send.all_ready()
    recv.wait(timeout_s=30)
    send.wait(timeout_s=30)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)


# ---- headers from the wire ----------------------------------------------------------------------------------


@pytest.fixture
def landing_pair():
    """Receiver b with a contiguous 64 x 4096-byte landing pool and 2 x 16 KiB landing slots per peer, over tcp;
    sender a stays idle (its batches are injected here)."""
    layout = PRESETS["contiguous"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("inject-sender", "inject-receiver"),
                                                receiver_kwargs={**LANDING, "landing_slot_bytes": 16384})
    yield b, peer_a, dst
    del a  # kept alive until the test ends: its peer state is the injected batches' sender


def batch(entries, data, *, slot, layer=0, pool=0, granules=None, magic=MAGIC, version=VERSION, data_bytes=None,
          num_entries=None):
    head = HEADER.pack(magic, version, len(entries) if num_entries is None else num_entries, slot, layer, pool,
                       len(entries) if granules is None else granules,
                       sum(e[2] for e in entries) if data_bytes is None else data_bytes)
    body = b"".join(ENTRY.pack(*e) for e in entries)
    return (head + body).ljust(DATA_OFFSET, b"\0") + data


def test_a_well_formed_injected_batch_lands_exactly_and_counts(landing_pair):
    """The receiver alone: a BEGIN for 2 blocks, then one landing batch carrying both: the bytes land exactly where
    its entries say, the recv completes, and nothing else in the pool changes."""
    b, peer_a, dst = landing_pair
    slot = peer_a._h._rx_window * b.transfers_per_peer
    recv = b.recv(peer_a, 77, np.array([5, 40], np.int32))
    b._c._inject_begin(peer_a._h, 77, slot, 0, 1, 2)
    payload = np.random.default_rng(3).integers(0, 256, 2 * 4096, dtype=np.uint8)
    expected = dst[0].copy()
    expected[5 * 4096:6 * 4096] = payload[:4096]
    expected[40 * 4096:41 * 4096] = payload[4096:]
    b._c._inject_landing(peer_a._h, slot, 1, batch([(5 * 4096, 0, 4096), (40 * 4096, 0, 4096)], payload.tobytes(),
                                                    slot=slot))
    recv.wait(timeout_s=10)
    assert b.stats()["landings"] == 1 and b.stats()["landing_rejected"] == 0
    np.testing.assert_array_equal(dst[0], expected)


BAD = {
    "bad magic": (dict(magic=0x12345678), "magic"),
    "bad version": (dict(version=7), "version"),
    "no entries": (dict(num_entries=0), "0 entries"),
    "too many entries": (dict(num_entries=63), "63 entries"),
    "zero granules": (dict(granules=0), "granules 0"),
    "layer out of range": (dict(layer=256), "layer 256"),
    "data beyond the slot": (dict(data_bytes=16384), "do not fit"),
    "entries disagree with the total": (dict(data_bytes=4000), "sum to 4096"),
    "another transfer slot": (dict(slot_delta=1), "names transfer slot"),
    "pool not exposed": (dict(pool=3), "pool 3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_landing_headers_are_refused_untouched(landing_pair, case):
    b, peer_a, dst = landing_pair
    slot = peer_a._h._rx_window * b.transfers_per_peer
    before = dst[0].copy()
    kwargs, message = BAD[case]
    kwargs = dict(kwargs)
    header_slot = slot + kwargs.pop("slot_delta", 0)
    recv = b.recv(peer_a, 88, np.array([2], np.int32))
    b._c._inject_begin(peer_a._h, 88, slot, 0, 1, 1)
    b._c._inject_landing(peer_a._h, slot, 0, batch([(2 * 4096, 0, 4096)], b"\x55" * 4096, slot=header_slot, **kwargs))
    wait_for(lambda: b.stats()["landing_rejected"] == 1, "the batch refused")
    assert message in b.last_landing_error and "inject-sender" in b.last_landing_error
    with pytest.raises(errors.TransferFailed, match="landing batch .* was refused"):
        recv.wait(timeout_s=10)  # fails at once, naming why, instead of at its deadline
    assert b.stats()["landings"] == 0
    np.testing.assert_array_equal(dst[0], before)


def test_a_refused_batch_ends_the_senders_send_at_once_and_frees_its_slot():
    """A real sender's transfer through landing slots: layer 0 lands, then a malformed batch naming its slot is
    refused: the recv fails naming why, the sender is told (its send fails now, not at its 60 s deadline), the
    slot's total is counted so both writes_over turn True, and the next transfer is exact."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("refused-sender", "refused-receiver"),
                                                sender_kwargs=SMALL_RING, receiver_kwargs=LANDING)
    recv = b.recv(peer_a, 5, np.array([2], np.int32))
    send = a.send(peer_b, 5, np.array([1], np.int32), np.array([2], np.int32))
    send.layer_ready(0)
    recv.wait(layer=0, timeout_s=10)
    b._c._inject_landing(peer_a._h, send._h.slot, 0, batch([(0, 0, 16)], b"\x55" * 16, slot=send._h.slot,
                                                              layer=1, magic=0x12345678))
    with pytest.raises(errors.TransferFailed, match="landing batch .* was refused.*magic"):
        recv.wait(timeout_s=10)
    t0 = time.monotonic()
    with pytest.raises(errors.TransferFailed, match="the receiver refused one of its landing batches"):
        send.wait(timeout_s=10)
    assert time.monotonic() - t0 < 5
    wait_for(lambda: send.writes_over and recv.writes_over, "both ends settled by the sender's total")
    expected = [x.copy() for x in dst]
    apply(layout, src, expected, [1], [2], [0])  # layer 0 of the refused transfer landed before the refusal
    assert_next_transfer_exact(a, b, peer_a, peer_b, layout, src, dst, expected)


def assert_next_transfer_exact(a, b, peer_a, peer_b, layout, src, dst, expected):
    """After a refused transfer: the next one (block 3 -> 4, every layer) lands exactly, and nothing else changes
    from `expected`."""
    apply(layout, src, expected, [3], [4], range(layout.num_layers))
    again = b.recv(peer_a, 6, np.array([4], np.int32))
    a.send(peer_b, 6, np.array([3], np.int32), np.array([4], np.int32)).all_ready()
    again.wait(timeout_s=10)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)


def test_a_real_senders_refused_batch_is_counted_so_its_slot_comes_back():
    """The sender's own layer-1 batch names a place past the pool's end (a sender with a bug): the receiver refuses
    it untouched, both ends fail at once, and the refused batch's granules are counted on the aborted slot, so the
    sender's ABORT total is reached: both writes_over turn True, the slot comes back, and the next transfer is
    exact (before, the slot waited forever for granules nobody would count)."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("buggy-sender", "strict-receiver"),
                                                sender_kwargs=SMALL_RING, receiver_kwargs=LANDING)
    before = [x.copy() for x in dst]
    recv = b.recv(peer_a, 5, np.array([2], np.int32))
    send = a.send(peer_b, 5, np.array([1], np.int32), np.array([2], np.int32))
    send.layer_ready(0)
    recv.wait(layer=0, timeout_s=10)
    a._c._corrupt_next_landing_batches(1)
    send.all_ready()
    with pytest.raises(errors.TransferFailed, match="landing batch .* was refused.*outside region"):
        recv.wait(timeout_s=10)
    with pytest.raises(errors.TransferFailed, match="the receiver refused one of its landing batches"):
        send.wait(timeout_s=10)
    wait_for(lambda: send.writes_over and recv.writes_over, "both ends settled by the sender's total")
    assert a.stats()["slots_reclaimed"] == 1 and b.stats()["slot_violations"] == 0
    assert b.stats()["landing_rejected"] == 1
    for got, was in zip(dst, before):  # only layer 0 of block 2 changed; the rest of block 2 may have landed
        np.testing.assert_array_equal(np.delete(got.reshape(2, layout.num_blocks, -1), 2, axis=1),
                                      np.delete(was.reshape(2, layout.num_blocks, -1), 2, axis=1))
    assert_next_transfer_exact(a, b, peer_a, peer_b, layout, src, dst, [x.copy() for x in dst])


def test_a_lost_peers_late_batch_is_not_copied_in(landing_pair):
    """A batch of a peer already lost (removed here; a same-process peer that closed, or one polled after its keys
    closed) is counted but never copied: its recvs failed, and their writes_over may have freed those blocks."""
    b, peer_a, dst = landing_pair
    slot = peer_a._h._rx_window * b.transfers_per_peer
    before = dst[0].copy()
    recv = b.recv(peer_a, 91, np.array([5], np.int32))
    b._c._inject_begin(peer_a._h, 91, slot, 0, 1, 1)
    b.remove_peer(peer_a)
    with pytest.raises(errors.KvxferError):
        recv.wait(timeout_s=10)
    b._c._inject_landing(peer_a._h, slot, 0, batch([(5 * 4096, 0, 4096)], b"\x66" * 4096, slot=slot))
    b._c._inject_landing(peer_a._h, slot, 1, batch([(6 * 4096, 0, 4096)], b"\x66" * 4096, slot=slot, magic=7))
    wait_for(lambda: b.stats()["landing_rejected"] == 1, "both injected batches handled (the second refused)")
    assert b.stats()["landings"] == 0
    np.testing.assert_array_equal(dst[0], before)


@pytest.mark.parametrize("entry,message", [
    ((63 * 4096 + 1, 0, 4096), "outside region 0"),   # runs past the pool's end
    ((2 ** 63, 0, 4096), "outside region 0"),          # offset + nbytes would wrap
    ((0, 1, 4096), "region 1 of a pool with 1"),       # no such region
])
def test_entries_outside_the_pool_are_refused(landing_pair, entry, message):
    b, peer_a, dst = landing_pair
    slot = peer_a._h._rx_window * b.transfers_per_peer
    before = dst[0].copy()
    b._c._inject_landing(peer_a._h, slot, 0, batch([entry], b"\x77" * 4096, slot=slot))
    wait_for(lambda: b.stats()["landing_rejected"] == 1, "the batch refused")
    assert message in b.last_landing_error
    np.testing.assert_array_equal(dst[0], before)


def test_landing_slot_index_beyond_the_peers_share_is_refused(landing_pair):
    b, peer_a, dst = landing_pair
    slot = peer_a._h._rx_window * b.transfers_per_peer
    b._c._inject_landing(peer_a._h, slot, 2, b"")  # the peer has slots 0 and 1
    wait_for(lambda: b.stats()["landing_rejected"] == 1, "the batch refused")
    assert "landing immediate names slot 2" in b.last_landing_error


def test_random_headers_never_write(landing_pair):
    """200 random slot contents behind a valid magic and version: every one refused, the pool untouched."""
    b, peer_a, dst = landing_pair
    slot = peer_a._h._rx_window * b.transfers_per_peer
    before = dst[0].copy()
    rng = np.random.default_rng(99)
    for i in range(200):
        raw = struct.pack("<IH", MAGIC, VERSION) + rng.integers(0, 256, DATA_OFFSET - 6, dtype=np.uint8).tobytes()
        b._c._inject_landing(peer_a._h, slot, i % 2, raw)
    wait_for(lambda: b.stats()["landing_rejected"] == 200, "every random batch refused")
    assert b.stats()["landings"] == 0
    np.testing.assert_array_equal(dst[0], before)


# ---- options and refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"landing": "sometimes"}, "landing='sometimes'"),
    ({"landing_slots": 0}, "1 to 256 slots"),
    ({"landing_slot_bytes": 4096}, "5120 bytes to 1 GiB"),
])
def test_bad_landing_options_are_refused_by_name(kwargs, message):
    with pytest.raises(errors.InvalidArgument, match=message):
        kvxfer.Agent("bad-landing", transport="tcp", interface="lo", **kwargs)


def test_no_landing_ring_unless_a_pool_needs_or_offers_one():
    a = kvxfer.Agent("plain", transport="tcp", interface="lo")
    layout = kvxfer.KVLayout.contiguous(16, 32 << 10)
    a.register_pool(make_pool(layout, 1), layout)
    assert a.landing() is None  # host pools of 32 KiB chunks are written directly: no ring, no pinned memory
    small = PRESETS["contiguous"]()
    for kwargs in ({"landing": "needed"}, {"max_peers": 128}):  # not asked for; a ring past 64 MiB
        b = kvxfer.Agent("plain-small", transport="tcp", interface="lo", **kwargs)
        b.register_pool(make_pool(small, 1), small)
        assert b.landing() is None, kwargs
    c = kvxfer.Agent("offering", transport="tcp", interface="lo")
    c.register_pool(make_pool(small, 1), small)
    assert c.landing() == {"slot_bytes": 256 << 10, "slots_per_peer": 4, "pinned": c.landing()["pinned"]}


def test_host_pools_of_small_chunks_are_reached_through_landing_slots_over_tcp(remote):
    # The receiver's defaults: its 2 KiB chunks make it offer landing slots; the tcp sender's chunks are as small
    # and a layer of this transfer is 128 KiB, so it packs them (one write per batch instead of one per chunk);
    # a transfer of 4 blocks (16 KiB a layer) goes direct. Bytes exact, every batch counted.
    agent, peer, layout, dst, _ = connect("tcp", remote, "vllm_flash", seed=71)
    assert layout.chunk_bytes == 2048 and layout.num_blocks == 32
    rng = np.random.default_rng(71)
    src_ids = rng.permutation(32).astype(np.int32)
    dst_ids = rng.permutation(32).astype(np.int32)
    expected = expected_after(layout, dst, 71, src_ids, dst_ids, range(layout.num_layers))
    recv = agent.recv(peer, 1, dst_ids)
    remote.call("send", (1, src_ids.tolist(), dst_ids.tolist(), None, "all"))
    recv.wait(timeout_s=30)
    assert remote.call("wait", (1, 30)) == "DONE"
    path, reason, _ = remote.call("path", 1)
    assert path == "staged" and "landing slots (4 x 256 KiB)" in reason and "chunks of 2048 bytes" in reason, reason
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    sender_stats, _ = remote.call("stats", None)
    stats = agent.stats()
    assert stats["landings"] == sender_stats["writes_posted"] < 32 * layout.num_layers * layout.num_planes
    assert stats["landing_rejected"] == 0
    small = agent.recv(peer, 2, dst_ids[:4])
    remote.call("send", (2, src_ids[:4].tolist(), dst_ids[:4].tolist(), None, "all"))
    small.wait(timeout_s=30)
    assert remote.call("path", 2)[0] == "fabric"
    assert agent.stats()["landings"] == stats["landings"]


@pytest.mark.parametrize("transport, receiver, sender_layout, path", [
    ("tcp", {"landing": "needed"}, None, "fabric"),       # the receiver did not offer
    ("tcp", {}, ("vllm_flash", (4, 32, 16, 8, 128, "float16")), "fabric"),  # 32 KiB chunks here
    ("cma", {}, None, "cma"),                             # same host: copied where they go
    ("fi_shm", {}, None, "fabric"),                       # not a tcp fabric
])
def test_who_does_not_take_the_landing_slots(transport, receiver, sender_layout, path, remote):
    kind, args = sender_layout or ("vllm_flash", ())
    agent, peer, layout, dst, _ = connect(transport, remote, kind, seed=72, layout_args=args,
                                          receiver_kwargs=receiver)
    expected = expected_after(layout, dst, 72, [1, 2, 3], [4, 5, 6], range(layout.num_layers))
    recv = agent.recv(peer, 1, [4, 5, 6])
    remote.call("send", (1, [1, 2, 3], [4, 5, 6], None, "all"))
    recv.wait(timeout_s=30)
    got_path, reason, _ = remote.call("path", 1)
    assert got_path == path, reason
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    assert agent.stats()["landings"] == 0


def test_a_chunk_larger_than_a_landing_batch_is_refused_at_send():
    layout = kvxfer.KVLayout.contiguous(16, 6144)
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("big-chunk-sender", "big-chunk-receiver"),
                                                receiver_kwargs={"landing": "always", "landing_slot_bytes": 5120})
    assert peer_b._h.landing_slots == (4, 5120)
    with pytest.raises(errors.InvalidArgument, match="landing_slot_bytes on the peer"):
        a.send(peer_b, 1, np.array([0], np.int32), np.array([0], np.int32))


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_receiver_cancel_through_landing_slots(transport, remote):
    """The receiver cancels after layer 0 went through its landing slots (sender staging, receiver copying batches
    into the pool): the sender's send fails with Cancelled, writes_over turns True once every batch posted before
    landed and was counted, only layer 0's addressed bytes changed, and the next transfer through the same landing
    slots is exact."""
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed=43, sender_kwargs=SMALL_RING,
                                          receiver_kwargs=LANDING)
    src_ids, dst_ids = [0, 1, 2], [5, 6, 7]
    expected = expected_after(layout, dst, 43, src_ids, dst_ids, [0])
    cancel_after_layer_0(agent, peer, remote, 1, src_ids, dst_ids)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    expected = expected_after(layout, dst, 43, [3, 4], [8, 9], range(layout.num_layers))
    r = agent.recv(peer, 2, [8, 9])
    remote.call("send", (2, [3, 4], [8, 9], None, "all"))
    r.wait(timeout_s=30)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    assert agent.stats()["landing_rejected"] == 0
