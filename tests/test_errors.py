"""Bad input gets a typed error naming the cause, and nothing is corrupted."""

import numpy as np
import pytest

import kvxfer
from kvxfer import _C, errors
from tests.conftest import UCX, connect
from tests.reference import make_pool


def local_pair(kind_src="vllm_flash", kind_dst="vllm_flash", transport="tcp"):
    from tests.reference import PRESETS

    a = kvxfer.Agent("a", transport=transport, interface="lo")
    b = kvxfer.Agent("b", transport=transport, interface="lo")
    la, lb = PRESETS[kind_src](), PRESETS[kind_dst]()
    pa, pb = make_pool(la, 1), make_pool(lb, 2)
    a.register_pool(pa, la)
    b.register_pool(pb, lb)
    peer_b = a.add_peer(b.metadata())
    peer_a = b.add_peer(a.metadata())
    return a, b, peer_a, peer_b, pa, pb


def test_block_out_of_range_both_sides():
    a, b, _, peer_b, _, pb = local_pair()
    before = [x.copy() for x in pb]
    with pytest.raises(errors.BlockOutOfRange, match="destination block id 32"):
        a.send(peer_b, 1, [0], [32])
    with pytest.raises(errors.BlockOutOfRange, match="source block id -1"):
        a.send(peer_b, 1, [-1], [0])
    for x, y in zip(pb, before):
        np.testing.assert_array_equal(x, y)


def test_layout_mismatch_names_the_field():
    a, b, _, peer_b, _, _ = local_pair("vllm_flash", "mla")
    with pytest.raises(errors.LayoutMismatch, match="num_layers is 4 on the sender but 3"):
        a.send(peer_b, 1, [0], [0])
    l1 = kvxfer.KVLayout.vllm_flash(4, 8, 16, 2, 32, "float16")
    with pytest.raises(errors.LayoutMismatch, match="head_dim is 32 on the sender but 64"):
        l1.check_compatible(kvxfer.KVLayout.vllm_flash(4, 8, 16, 2, 64, "float16"))
    with pytest.raises(errors.LayoutMismatch, match="dtype"):
        l1.check_compatible(kvxfer.KVLayout.vllm_flash(4, 8, 16, 2, 32, "bfloat16"))


def test_pool_too_small_at_registration():
    a = kvxfer.Agent("a", transport="tcp", interface="lo")
    layout = kvxfer.KVLayout.vllm_flash(2, 8, 16, 2, 32, "float16")
    with pytest.raises(errors.PoolTooSmall, match="needs 32768 bytes but its memory has 100"):
        a.register_pool([np.zeros(100, np.uint8), np.zeros(100, np.uint8)], layout)


def test_duplicate_live_transfer_and_mismatched_counts():
    a, b, peer_a, peer_b, _, _ = local_pair()
    a.send(peer_b, 5, [0, 1], [2, 3])
    with pytest.raises(errors.DuplicateTransfer, match="transfer id 5"):
        a.send(peer_b, 5, [4], [5])
    with pytest.raises(errors.InvalidArgument, match="appears twice"):
        a.send(peer_b, 6, [0, 1], [3, 3])
    b.recv(peer_a, 8, [1])
    with pytest.raises(errors.DuplicateTransfer):
        b.recv(peer_a, 8, [1])


def test_recv_count_mismatch_fails_not_completes():
    a, b, peer_a, peer_b, _, _ = local_pair()
    a.wait_connected(peer_b)
    recv = b.recv(peer_a, 3, [1, 2, 3])           # expects 3 blocks
    a.send(peer_b, 3, [0, 1], [1, 2]).all_ready()  # sender writes 2
    with pytest.raises(errors.TransferFailed, match="block count or layer range differs"):
        recv.wait(timeout_s=10)


def test_unknown_pool_and_wait_timeout():
    a, b, peer_a, peer_b, _, _ = local_pair()
    with pytest.raises(errors.PeerUnknown, match="exposes no pool named 'nope'"):
        a.send(peer_b, 1, [0], [0], dst_pool="nope")
    recv = b.recv(peer_a, 99, [0])
    with pytest.raises(errors.TransferTimeout, match="not complete after 0.2 s"):
        recv.wait(timeout_s=0.2)
    assert recv.state == kvxfer.TransferState.PENDING  # a wait timeout does not fail the transfer


def test_metadata_rejected_when_malformed():
    a = kvxfer.Agent("a", transport="tcp", interface="lo")
    layout = kvxfer.KVLayout.contiguous(4, 64)
    a.register_pool(np.zeros(256, np.uint8), layout)
    md = a.metadata()
    b = kvxfer.Agent("b", transport="tcp", interface="lo")
    with pytest.raises(errors.MetadataError, match="shorter than"):
        b.add_peer(md[:10])
    with pytest.raises(errors.MetadataError, match="length mismatch"):
        b.add_peer(md[:-1])
    with pytest.raises(errors.MetadataError, match="magic"):
        b.add_peer(b"XXXX" + md[4:])
    bad_version = md[:4] + (99).to_bytes(2, "little") + md[6:]
    with pytest.raises(errors.MetadataError, match="version 99"):
        b.add_peer(bad_version)
    flipped = bytearray(md)
    flipped[40] ^= 0xFF
    with pytest.raises(errors.MetadataError, match="checksum"):
        b.add_peer(bytes(flipped))
    rng = np.random.default_rng(0)
    for _ in range(200):  # random garbage with a valid header must never crash or be accepted
        body = rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8).tobytes()
        with pytest.raises(errors.MetadataError):
            b.add_peer(body)


def _reseal(md: bytes, payload: bytes) -> bytes:
    """Header with a valid length and fnv1a32 checksum around a tampered payload, as a hostile peer would send."""
    h = 2166136261
    for byte in payload:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return md[:8] + len(payload).to_bytes(4, "little") + h.to_bytes(4, "little") + payload


def _mutate(payload: bytes, rng) -> tuple[bytes, str]:
    """One corruption a broken or hostile peer could send: bit flips, an extreme value over a field, a truncation or
    inserted bytes. Returns the bytes and what was done (for the failure message)."""
    p = bytearray(payload)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        at = [int(rng.integers(0, len(p))) for _ in range(int(rng.integers(1, 4)))]
        for i in at:
            p[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(p), f"bits flipped at {at}"
    if kind == 1:
        width = int(rng.choice([1, 2, 4, 8]))
        at = int(rng.integers(0, len(p) - width))
        value = int(rng.choice([0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 40, (1 << 64) - 1]))
        p[at:at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        return bytes(p), f"{width} bytes at {at} set to {value:#x}"
    if kind == 2:
        n = int(rng.integers(0, len(p)))
        return bytes(p[:n]), f"truncated to {n} bytes"
    at = int(rng.integers(0, len(p)))
    extra = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    return bytes(p[:at] + extra + p[at:]), f"{len(extra)} bytes inserted at {at}"


def test_metadata_corrupted_under_a_valid_checksum_is_refused_by_name_or_parsed():
    """The checksum catches corruption in transit; a peer that sends corrupt metadata with a valid checksum (a bug,
    or hostile) reaches the parser itself. Every field it reads is bounded: each of 3,000 corruptions of a real
    agent's metadata (several regions, landing slots, per-peer keys) either parses or is refused with MetadataError,
    never another error and never a crash (this process would die)."""
    a = kvxfer.Agent("fuzz-md", transport="tcp", interface="lo")
    layout = kvxfer.KVLayout.vllm_flash(4, 8, 16, 2, 64, "float16")
    a.register_pool([np.zeros(layout.tensor_layer_bytes, np.uint8) for _ in range(4)], layout)
    md = a.metadata()
    payload = md[16:]
    rng = np.random.default_rng(2026)
    refused = 0
    for _ in range(3000):
        bad, what = _mutate(payload, rng)
        try:
            _C.decode_metadata(_reseal(md, bad))
        except errors.MetadataError:
            refused += 1
        except Exception as e:  # noqa: BLE001 - any other type is the failure this test looks for
            pytest.fail(f"metadata with {what} raised {type(e).__name__}: {e}")
    assert refused > 2000  # most corruptions are caught (the rest hit bytes any value of which is valid)
    a.close()


def test_peer_metadata_exposing_less_than_its_layout_is_refused():
    """A peer cannot get us to write beyond what it exposed: metadata whose pool layout needs more bytes than its
    regions hold is refused when parsed, before any write could be planned against it."""
    a = kvxfer.Agent("a", transport="tcp", interface="lo")
    layout = kvxfer.KVLayout.contiguous(4, 4096)
    a.register_pool(np.zeros(4 * 4096, np.uint8), layout)
    md = a.metadata()
    payload = md[16:]
    size = (4 * 4096).to_bytes(8, "little")
    at = payload.rindex(size)  # the region's nbytes field
    shrunk = payload[:at] + (4096).to_bytes(8, "little") + payload[at + 8:]
    b = kvxfer.Agent("b", transport="tcp", interface="lo")
    with pytest.raises(errors.MetadataError, match="pool 'kv' is inconsistent.*needs 16384 bytes"):
        b.add_peer(_reseal(md, shrunk))
    b.add_peer(_reseal(md, payload))  # the untampered payload, resealed the same way, is accepted


def test_bad_ids_arguments():
    a, b, _, peer_b, _, _ = local_pair()
    with pytest.raises(errors.InvalidArgument, match="1-D integer array"):
        a.send(peer_b, 1, np.array([0.5]), [0])
    with pytest.raises(errors.InvalidArgument, match="src_ids has 2 block ids but dst_ids has 1"):
        a.send(peer_b, 1, [0, 1], [0])
    # int64 ids that int32 cannot hold are refused, not wrapped into a valid-looking id (2**32 + 3 -> 3)
    with pytest.raises(errors.InvalidArgument, match="dst_ids holds ids beyond int32"):
        a.send(peer_b, 1, np.array([0], np.int64), np.array([2**32 + 3], np.int64))
    with pytest.raises(errors.InvalidArgument, match="unknown transport"):
        kvxfer.Agent("x", transport="carrier-pigeon")


@pytest.mark.parametrize("transport", ["tcp", "cma", UCX])
def test_sender_killed_mid_transfer_fails_receiver(transport, remote):
    """The sender dies after some layers: the recv fails with a typed error within its timeout, never completes,
    and blocks the transfer did not address stay byte-identical."""
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed=2, timeout_s=5.0)
    ids = np.array([1, 2, 3], dtype=np.int32)
    before = [x.copy() for x in dst]
    recv = agent.recv(peer, 4, ids)
    remote.call("send", (4, ids.tolist(), ids.tolist(), None, "none"))
    remote.call("mark", (4, 0))
    recv.wait(layer=0, timeout_s=10)
    remote.conn.send(("crash", None))
    remote.proc.join(10)
    with pytest.raises((errors.PeerLost, errors.TransferTimeout)):
        recv.wait(timeout_s=20)
    assert recv.state == kvxfer.TransferState.FAILED and recv.layers_done == 1
    untouched = np.ones(layout.num_blocks, bool)
    untouched[ids] = False
    from tests.reference import block_view
    for layer in range(layout.num_layers):
        np.testing.assert_array_equal(block_view(layout, dst, layer)[:, untouched],
                                      block_view(layout, before, layer)[:, untouched])


def test_send_to_dead_receiver_fails(remote):
    """The receiver process is gone: the send fails with PeerLost or TransferTimeout, never hangs."""
    from tests.reference import PRESETS

    layout = PRESETS["vllm_flash"]()
    md = remote.call("init", ("cma", "vllm_flash", 1, [], 1))
    a = kvxfer.Agent("a", transport="cma", interface="lo", timeout_s=3.0)
    a.register_pool(make_pool(layout, 9), layout)
    peer = a.add_peer(md)
    remote.call("add_peer", a.metadata())
    a.wait_connected(peer, 10)
    remote.conn.send(("crash", None))
    remote.proc.join(10)
    with pytest.raises((errors.PeerLost, errors.TransferTimeout)):
        s = a.send(peer, 1, [0, 1], [0, 1])
        s.all_ready()
        s.wait(timeout_s=20)


def test_killed_unreaped_sender_is_lost_long_before_the_deadline(remote):
    """A same-host peer killed and not yet reaped by its parent is a zombie: kill(pid, 0) still succeeds on it, so
    liveness also reads the process state. The recv fails with PeerLost instead of waiting out its 120 s deadline."""
    import os
    import signal as sig

    from tests.conftest import connect

    agent, peer, layout, dst, _ = connect("tcp", remote, "vllm_flash", seed=1, timeout_s=120)
    recv = agent.recv(peer, 5, np.array([0, 1], np.int32))
    remote.call("send", (5, [0, 1], [0, 1], None, "none"))  # nothing marked ready: the transfer cannot finish
    os.kill(remote.proc.pid, sig.SIGKILL)  # the parent (this process) does not reap it until teardown
    with pytest.raises(errors.PeerLost, match="exited"):
        recv.wait(timeout_s=30)


def test_same_host_peers_are_watched_through_a_pidfd_each(remote):
    """Liveness of same-host peers is one poll() over a pidfd per peer every 10 ms (reading /proc/<pid>/stat per
    peer cost a quarter of a core at 256 peers): adding a same-host peer opens one pidfd, of that peer's process."""
    import os

    from tests.conftest import connect

    def pidfds():
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                    with open(f"/proc/self/fdinfo/{fd}") as f:
                        fds[fd] = next(int(x.split()[1]) for x in f if x.startswith("Pid:"))
            except (FileNotFoundError, StopIteration):
                pass
        return fds

    before = pidfds()
    agent, peer, *_ = connect("tcp", remote, "vllm_flash", seed=1, timeout_s=120)
    added = {fd: pid for fd, pid in pidfds().items() if fd not in before}
    assert peer.same_host and list(added.values()).count(remote.proc.pid) == 1
    agent.close()  # the pidfd goes with the agent's peers


def test_transfers_that_end_early_say_how_far_they_got():
    """A recv's timeout names what arrived (BEGIN, and each incomplete layer's granules), and a send cancelled by
    its receiver names how many layers were marked, posted and completed: a log line then tells a sender that never
    marked a layer from a layer that was posted and lost."""
    import re

    from tests.conftest import local_pair as pair
    from tests.reference import PRESETS

    layout = PRESETS["vllm_flash"]()  # 4 layers
    a, b, peer_b, peer_a, _, _ = pair(layout, "tcp", ("far-a", "far-b"))
    ids = [3, 5, 9]  # 3 blocks x K/V = 6 granules per layer
    recv = b.recv(peer_a, 1, ids, timeout_s=1.5)
    send = a.send(peer_b, 1, ids, ids)
    send.layer_ready(0)
    send.layer_ready(1)
    with pytest.raises(errors.TransferTimeout, match=r"2/4 layers complete; BEGIN received; layer 2: 0/6 granules; "
                                                     r"layer 3: 0/6 granules\)"):
        recv.wait(timeout_s=10)
    recv.cancel("gave up")
    with pytest.raises(errors.Cancelled) as e:
        send.wait(timeout_s=10)
    m = re.search(r"\(2/4 layers marked, 2/4 posted, (\d+)/(\d+) writes complete\)", str(e.value))
    assert m and 2 * int(m.group(1)) == int(m.group(2)), str(e.value)
    never = b.recv(peer_a, 2, ids, timeout_s=0.5)
    with pytest.raises(errors.TransferTimeout, match=r"0/4 layers complete; nothing of it arrived: no BEGIN, no data"):
        never.wait(timeout_s=10)


def test_names_peers_would_refuse_are_refused_where_they_are_given():
    """Peers refuse metadata whose text is not printable (above); an agent or pool named with a control character
    is refused when it is created, naming it, not by every peer later."""
    with pytest.raises(errors.InvalidArgument, match="agent name .* must be printable text"):
        kvxfer.Agent("prefill\n0", transport="tcp", interface="lo")
    a = kvxfer.Agent("prefill-\u00e9\u4e00", transport="tcp", interface="lo")  # non-ASCII text is fine
    layout = kvxfer.KVLayout.contiguous(4, 64)
    with pytest.raises(errors.InvalidArgument, match="pool name .* must be printable text"):
        a.register_pool(np.zeros(256, np.uint8), layout, name="kv\x00")
    a.register_pool(np.zeros(256, np.uint8), layout, name="kv")
    assert _C.decode_metadata(a.metadata())["name"] == "prefill-\u00e9\u4e00"
    a.close()
