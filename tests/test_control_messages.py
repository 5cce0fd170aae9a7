"""Control messages (csrc/core/control.h) as a peer's wire or doorbell ring delivers them. A buggy or hostile peer
can send any 48 bytes under its own epoch: each field is checked on receipt and the message dropped, or handled
within the bounds of that peer's own window. They never crash the agent, never touch another peer's transfers, and
the agent still moves a new peer's bytes exactly afterwards."""
import struct

import numpy as np

import kvxfer
from tests.conftest import assert_exact_transfer, fan_in, local_pair, wait_for
from tests.reference import make_pool

FMT = "<HBBIQQQIIII"  # magic, version, type, link, sender epoch, receiver epoch, xfer id, slot, first_layer,
#                       num_layers, granules_per_layer: 48 bytes
MAGIC, VERSION = 0x4358, 7
BYE = 7


def _field32(rng) -> int:
    special = [0, 1, 2, 31, 32, 127, 128, 255, 4095, 4096, 65535, 2**31, 2**32 - 1]
    return special[int(rng.integers(0, len(special)))] if rng.random() < 0.6 else int(rng.integers(0, 2**32))


def _near(rng, bound: int) -> int:
    """Mostly a value a real message could carry (below bound), else any 32-bit value."""
    return int(rng.integers(0, bound)) if rng.random() < 0.75 else _field32(rng)


def _message(rng, sender_epoch: int, receiver_epoch: int) -> bytes:
    mtype = [t for t in range(13) if t != BYE][int(rng.integers(0, 12))]  # a BYE would end the peer: the rest dropped
    link = 0 if rng.random() < 0.7 else _field32(rng)
    xfer = [0, 1, 7, 2**64 - 1][int(rng.integers(0, 4))] if rng.random() < 0.5 else int(rng.integers(0, 2**63))
    magic = MAGIC if rng.random() < 0.97 else _field32(rng) & 0xFFFF
    version = VERSION if rng.random() < 0.97 else int(rng.integers(0, 256))
    sender = sender_epoch if rng.random() < 0.95 else int(rng.integers(0, 2**63))
    # slot: the 4,096 slots of the agent (the peer's window is the first 128); layers up to 32 (and past)
    msg = struct.pack(FMT, magic, version, mtype, link, sender, receiver_epoch, xfer, _near(rng, 4096), _near(rng, 40),
                      _near(rng, 40), _near(rng, 64))
    if rng.random() < 0.03:
        msg = msg[: int(rng.integers(0, len(msg)))]
    elif rng.random() < 0.03:
        msg += bytes(int(rng.integers(1, 16)))
    return msg


def test_random_control_messages_from_a_peer_never_crash_the_agent():
    layout = kvxfer.KVLayout.contiguous(8, 4096)
    a, b, peer_b, peer_a, src, dst = local_pair(layout, names=("fuzz-tx", "fuzz-rx"))
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, [0, 1], [2, 3])
    live = b.recv(peer_a, 7, [4, 5], timeout_s=60)  # a transfer the messages may hit (they come from its sender)
    rng = np.random.default_rng(25)
    for _ in range(20000):
        b._c._inject_wire_message(_message(rng, a._c.epoch, b._c.epoch))
    b._c._inject_wire_message(struct.pack(FMT, MAGIC, VERSION, BYE, 0, a._c.epoch, b._c.epoch, 0, 0, 0, 0, 0))
    # The BYE is handled after all of them (one command queue): once the peer is lost, every message was handled.
    wait_for(lambda: peer_a.lost, "the BYE after the 20,000 messages handled", 60)
    dropped = b.stats()["dropped_messages"]
    assert 1000 < dropped < 19000, dropped  # many refused by a field check, thousands handled
    assert live.state == kvxfer.TransferState.FAILED  # ended with its peer, whatever the messages did to it first
    # A new peer of the same agent: exact, every other block untouched.
    (c,), (src2,), (peer_b2,), (peer_c,) = fan_in(b, 1, "tcp", layout, name="fuzz-tx2", seed=99)
    assert_exact_transfer(c, b, peer_b2, peer_c, src2, dst, layout, 2, [6, 7], [6, 7])
    for agent in (c, a, b):
        agent.close()


def test_a_late_hello_of_an_older_association_does_not_redirect_a_live_one():
    """A peer numbers its associations with us in increasing order (its HELLO carries the number, and our messages
    to it carry it back). A HELLO of an older association arriving late (the peer ended it and added us again) must
    not replace the live association's number: our RELEASEs would then carry the old number and the peer would
    drop them, leaving its sends to us waiting until their deadline."""
    layout = kvxfer.KVLayout.contiguous(8, 4096)
    a = kvxfer.Agent("hello-tx", transport="tcp", interface="lo", timeout_s=10)
    b = kvxfer.Agent("hello-rx", transport="tcp", interface="lo", timeout_s=10)
    first = kvxfer.Agent("hello-first", transport="tcp", interface="lo")
    a.add_peer(first.metadata())  # a's first association (link 1): the one with b below is link 2
    src, dst = make_pool(layout, 5), make_pool(layout, 6)
    a.register_pool(src, layout)
    b.register_pool(dst, layout)
    peer_b, peer_a = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(peer_b, 20)
    b.wait_connected(peer_a, 20)
    stale = struct.pack(FMT, MAGIC, VERSION, 1, 1, a._c.epoch, b._c.epoch, 0, 0, 0, 128, 0)  # HELLO, link 1
    dropped = b.stats()["dropped_messages"]
    b._c._inject_wire_message(stale)
    wait_for(lambda: b.stats()["dropped_messages"] == dropped + 1, "the stale HELLO dropped", 10)
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, [0, 1], [2, 3])  # the sender saw the RELEASE
    for agent in (a, b, first):
        agent.close()


def test_a_hello_of_a_newer_association_waits_for_our_add_and_leaves_the_live_one_alone():
    """A peer that removed us (or added us again) starts a new association whose HELLO can overtake the BYE that
    ends the old one (it goes on the fabric, the BYE may wait behind its ABORTs or take the doorbell ring). That
    HELLO must not redirect our live association to the new number (our RELEASEs would then carry it and the
    peer's old association would drop them), nor be used up by it: it waits for our add_peer of the new one."""
    layout = kvxfer.KVLayout.contiguous(8, 4096)
    a = kvxfer.Agent("newer-tx", transport="tcp", interface="lo", timeout_s=10)
    b = kvxfer.Agent("newer-rx", transport="tcp", interface="lo", timeout_s=10)
    src, dst = make_pool(layout, 5), make_pool(layout, 6)
    a.register_pool(src, layout)
    b.register_pool(dst, layout)
    peer_b, peer_a = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(peer_b, 20)
    b.wait_connected(peer_a, 20)
    newer = struct.pack(FMT, MAGIC, VERSION, 1, 7, a._c.epoch, b._c.epoch, 0, 0, 0, 128, 0)  # HELLO, link 7 (a: 1)
    dropped = b.stats()["dropped_messages"]
    b._c._inject_wire_message(newer)
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, [0, 1], [2, 3])  # the sender saw the RELEASE
    assert b.stats()["dropped_messages"] == dropped  # kept for our next add of a, not dropped
    for agent in (a, b):
        agent.close()
