"""The counting contract, driven deterministically: immediates are injected on the receiver's progress thread in
orders the loopback providers never produce (data before BEGIN, layers reversed, one layer's granules split across
writes), and counts above the announcement fail the transfer instead of completing it."""
import numpy as np
import pytest

import kvxfer
from kvxfer import _C, errors
from tests.reference import PRESETS, make_pool

encode = _C.imm.encode


@pytest.fixture
def receiver():
    layout = PRESETS["vllm_flash"]()  # 4 layers, 2 planes: 3 blocks -> 6 granules per layer
    a = kvxfer.Agent("sender", transport="tcp", interface="lo")
    b = kvxfer.Agent("receiver", transport="tcp", interface="lo")
    a.register_pool(make_pool(layout, 1), layout)
    b.register_pool(make_pool(layout, 2), layout)
    a.add_peer(b.metadata())
    peer_a = b.add_peer(a.metadata())
    b.wait_connected(peer_a)
    yield b, peer_a  # the sender agent stays open: closing it would end the transfers with it (its BYE)
    a.close()


def test_data_before_begin_reversed_and_split(receiver):
    b, peer = receiver
    recv = b.recv(peer, 5, np.array([1, 2, 3]))
    for imm in [encode(9, 3, 4), encode(9, 0, 6), encode(9, 3, 2), encode(9, 1, 5)]:
        b._c._inject_imm(peer._h, imm)
    assert recv.layers_done == 0  # nothing can complete before the slot is bound to the transfer
    b._c._inject_begin(peer._h, 5, 9, 0, 4, 6)  # BEGIN after the data
    recv.wait(layer=0, timeout_s=10)
    recv.wait(layer=3, timeout_s=10)
    assert not recv.layer_done(1) and not recv.layer_done(2)  # 5/6 and 0/6 granules
    assert recv.state == kvxfer.TransferState.PENDING
    b._c._inject_imm(peer._h, encode(9, 1, 1))
    recv.wait(layer=1, timeout_s=10)
    assert not recv.layer_done(2) and recv.layers_done == 3
    b._c._inject_imm(peer._h, encode(9, 2, 3))
    b._c._inject_imm(peer._h, encode(9, 2, 3))
    recv.wait(timeout_s=10)
    assert recv.done and recv.layers_done == 4


def test_more_granules_than_announced_fails(receiver):
    b, peer = receiver
    recv = b.recv(peer, 6, np.array([1, 2, 3]))
    b._c._inject_begin(peer._h, 6, 10, 0, 4, 6)
    b._c._inject_imm(peer._h, encode(10, 0, 7))
    with pytest.raises(errors.TransferFailed, match="more chunks than announced"):
        recv.wait(timeout_s=10)
    assert recv.layers_done == 0


def test_granules_outside_announced_layers_fail(receiver):
    b, peer = receiver
    recv = b.recv(peer, 7, np.array([1, 2, 3]), layers=range(0, 2))
    b._c._inject_imm(peer._h, encode(11, 3, 1))
    b._c._inject_begin(peer._h, 7, 11, 0, 2, 6)
    with pytest.raises(errors.TransferFailed, match="outside the announced range"):
        recv.wait(timeout_s=10)
