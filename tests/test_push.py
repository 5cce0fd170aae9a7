"""kvxfer.push: decode-initiated push registrations carried over a bootstrap channel, then real kvxfer writes."""
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import bootstrap, errors
from kvxfer.push import PushClient, PushServer
from tests.reference import PRESETS, block_view, make_pool


def _wait_for(fn, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"condition not met within {timeout_s}s")


@pytest.fixture
def pair():
    layout = PRESETS["vllm_cpu"]()
    prefill = kvxfer.Agent("push-prefill", transport="tcp", interface="lo", timeout_s=10)
    decode = kvxfer.Agent("push-decode", transport="tcp", interface="lo", timeout_s=10)
    src, dst = make_pool(layout, 1), make_pool(layout, 2)
    prefill.register_pool(src, layout)
    decode.register_pool(dst, layout)  # not connected here: the PushServer/PushClient handshake adds the peers
    server = PushServer(prefill, "127.0.0.1", 0, ttl_s=0.5)
    client = PushClient(decode, *server.address)
    yield layout, prefill, decode, src, dst, server, client
    server.close()


def test_registration_drives_a_byte_exact_write(pair):
    layout, prefill, decode, src, dst, server, client = pair
    before = [x.copy() for x in dst]
    assert server.take(11) is None
    client.register(11, [5, 3, 9], skip_blocks=1)
    reg = _wait_for(lambda: server.take(11))
    assert reg.xfer_id == 11 and reg.skip_blocks == 1 and reg.dst_ids.dtype == np.int32
    assert reg.dst_ids.tolist() == [5, 3, 9]
    assert server.take(11) is None  # taken once
    src_ids = np.array([7, 0, 2, 4], dtype=np.int32)[reg.skip_blocks:]
    recv = decode.recv(client.peer, 11, reg.dst_ids)
    send = prefill.send(reg.peer, 11, src_ids, reg.dst_ids)
    send.all_ready()
    recv.wait(timeout_s=10)
    send.wait(timeout_s=10)
    for layer in range(layout.num_layers):
        got, ref, old = (block_view(layout, p, layer) for p in (dst, src, before))
        np.testing.assert_array_equal(got[:, [5, 3, 9]], ref[:, [0, 2, 4]])
        untouched = np.setdiff1d(np.arange(layout.num_blocks), [5, 3, 9])
        np.testing.assert_array_equal(got[:, untouched], old[:, untouched])


def test_cancel_and_expiry(pair):
    _, _, _, _, _, server, client = pair
    client.cancel(21)
    assert _wait_for(lambda: server.cancelled(21))
    assert not server.cancelled(21)  # reported once
    client.register(22, [1])
    _wait_for(lambda: 22 in server._table)
    time.sleep(0.6)  # ttl_s=0.5
    assert [r.xfer_id for r in server.expired()] == [22]
    assert server.take(22) is None and server.expired() == []


def test_malformed_frames_close_only_that_connection(pair):
    layout, prefill, decode, src, dst, server, client = pair
    rogue = kvxfer.Agent("rogue", transport="tcp", interface="lo")
    rogue.register_pool(make_pool(layout, 3), layout)
    for bad in ({"op": "push", "xfer_id": -1, "dst_ids": [1]}, {"op": "push", "xfer_id": 1, "dst_ids": ["x"]},
                {"op": "push", "xfer_id": 1, "dst_ids": [1], "skip_blocks": -2}, {"op": "drop-table"}, [1, 2]):
        ch = bootstrap.connect(*server.address)
        ch.exchange(rogue.metadata())
        ch.send_json(bad)
        with pytest.raises(errors.PeerLost):
            ch.recv_json(timeout_s=10)  # the server closed this connection
        ch.close()
    client.register(31, [2])  # the well-behaved client is still served
    assert _wait_for(lambda: server.take(31)).dst_ids.tolist() == [2]


def test_client_sees_the_server_go_away():
    layout = PRESETS["vllm_cpu"]()
    decode = kvxfer.Agent("push-decode-2", transport="tcp", interface="lo")
    decode.register_pool(make_pool(layout, 4), layout)
    fake = kvxfer.Agent("fake-prefill", transport="tcp", interface="lo")
    fake.register_pool(make_pool(layout, 5), layout)
    lst = bootstrap.listen("127.0.0.1", 0)
    import threading

    def serve_once():
        ch = lst.accept(timeout_s=10)
        ch.exchange(fake.metadata())
        ch.close()  # the prefill process "dies" right after the handshake

    t = threading.Thread(target=serve_once)
    t.start()
    client = PushClient(decode, *lst.address)
    t.join(10)
    assert _wait_for(lambda: client.lost)
    with pytest.raises(errors.PeerLost):
        for _ in range(100):  # the first sendall after a close may still succeed locally
            client.register(1, [0])
            time.sleep(0.01)
    lst.close()


def test_client_arguments_are_checked():
    decode = kvxfer.Agent("push-decode-3", transport="tcp", interface="lo")
    with pytest.raises(errors.InvalidArgument, match="port"):
        PushClient(decode, "127.0.0.1", 0)
    with pytest.raises(errors.TransferTimeout, match="could not connect"):
        lst = bootstrap.listen("127.0.0.1", 0)
        port = lst.address[1]
        lst.close()
        PushClient(decode, "127.0.0.1", port, timeout_s=0.5)
