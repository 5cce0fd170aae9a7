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
    (reg,) = _wait_for(lambda: server.take(11))
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


def test_a_client_whose_peer_was_lost_reconnects_to_the_same_prefill_agent(pair):
    """The decode side lost the prefill agent while the control connection stayed up (its heartbeat ended a prefill
    that stalled; remove_peer here): the client says it is not usable, and a new client to the same server adds
    the same prefill agent again, and the prefill the same decode agent, as new associations that move bytes
    exactly. (Until 2026-12-02 adding the same agent again within ~1 s failed: "the key is taken".)"""
    layout, prefill, decode, src, dst, server, client = pair
    assert client.usable
    decode.remove_peer(client.peer)
    assert not client.usable
    client.close()
    again = PushClient(decode, *server.address)
    assert again.usable and again.peer.epoch == client.peer.epoch  # the same prefill agent
    again.register(31, [6, 8])
    (reg,) = _wait_for(lambda: server.take(31))
    recv = decode.recv(again.peer, 31, reg.dst_ids)
    send = prefill.send(reg.peer, 31, np.array([1, 2], np.int32), reg.dst_ids)
    send.all_ready()
    recv.wait(timeout_s=10)
    for layer in range(layout.num_layers):
        got, ref = block_view(layout, dst, layer), block_view(layout, src, layer)
        np.testing.assert_array_equal(got[:, [6, 8]], ref[:, [1, 2]])
    again.close()


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
                {"op": "push", "xfer_id": 1, "dst_ids": [1], "skip_blocks": -2}, {"op": "drop-table"}, [1, 2],
                {"op": "push", "xfer_id": 1, "dst_ids": [1], "num_tokens": 2**32},
                {"op": "push", "xfer_id": 1, "dst_ids": [1], "tp_size": 2, "tp_rank": 2},
                {"op": "push", "xfer_id": 1, "dst_ids": [1], "tp_size": 0, "tp_rank": 0},
                {"op": "push", "xfer_id": 1, "dst_ids": [1], "tp_size": True}):
        ch = bootstrap.connect(*server.address)
        ch.exchange(rogue.metadata())
        assert ch.recv_json(timeout_s=10) == {"op": "hello", "version": 2, "tp_size": 1, "tp_rank": 0}
        ch.send_json(bad)
        with pytest.raises(errors.PeerLost):
            ch.recv_json(timeout_s=10)  # the server closed this connection
        ch.close()
    client.register(31, [2])  # the well-behaved client is still served
    assert _wait_for(lambda: server.take(31))[0].dst_ids.tolist() == [2]


def _one_shot_server(tag, first_frame, linger_s=0.0):
    """A decode agent and a stand-in prefill that accepts one connection, exchanges metadata, sends `first_frame`,
    waits linger_s and closes. Returns (decode agent, listener, its thread)."""
    import threading

    layout = PRESETS["vllm_cpu"]()
    decode = kvxfer.Agent(f"push-decode-{tag}", transport="tcp", interface="lo")
    decode.register_pool(make_pool(layout, 4), layout)
    fake = kvxfer.Agent(f"fake-prefill-{tag}", transport="tcp", interface="lo")
    fake.register_pool(make_pool(layout, 5), layout)
    lst = bootstrap.listen("127.0.0.1", 0)

    def serve_once():
        ch = lst.accept(timeout_s=10)
        ch.exchange(fake.metadata())
        ch.send_json(first_frame)
        time.sleep(linger_s)
        ch.close()

    t = threading.Thread(target=serve_once)
    t.start()
    return decode, lst, t


def test_client_sees_the_server_go_away():
    # the prefill process "dies" right after the handshake
    decode, lst, t = _one_shot_server("gone", {"op": "hello", "version": 2, "tp_size": 1, "tp_rank": 0})
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


def test_a_server_that_says_no_hello_is_refused_naming_it():
    """A prefill side of another kvxfer version (no hello after the metadata): the client refuses it at connect."""
    decode, lst, t = _one_shot_server("old", {"op": "hi"}, linger_s=1.0)
    with pytest.raises(errors.MetadataError, match=r"answered .\{'op': 'hi'\}., not a version 2 hello: run the same "
                                                   "kvxfer version"):
        PushClient(decode, *lst.address)
    t.join(10)
    lst.close()


def test_tensor_parallel_registrations_are_taken_once_every_decode_rank_sent_its():
    """A prefill rank (1 of 2) served by three decode-rank agents: take() is None until all three registered, then
    gives them by rank, each with its own peer, ids and token counts; a rank registering again replaces its frame;
    a rank naming another tp_size closes its connection and the group waits on."""
    layout = PRESETS["vllm_cpu"]()
    prefill = kvxfer.Agent("push-tp-prefill", transport="tcp", interface="lo", timeout_s=10)
    prefill.register_pool(make_pool(layout, 1), layout)
    server = PushServer(prefill, "127.0.0.1", 0, tp_size=2, tp_rank=1)
    agents = [kvxfer.Agent(f"push-tp-decode-{r}", transport="tcp", interface="lo") for r in range(3)]
    clients = []
    for a in agents:
        a.register_pool(make_pool(layout, 2), layout)
        clients.append(PushClient(a, *server.address))
    assert [(c.tp_size, c.tp_rank) for c in clients] == [(2, 1)] * 3
    clients[2].register(7, [9, 8], tp_size=3, tp_rank=2, num_tokens=40, skip_tokens=16, skip_blocks=1)
    clients[0].register(7, [1, 2], tp_size=3, tp_rank=0, num_tokens=40, skip_tokens=16, skip_blocks=1)
    clients[0].register(7, [3, 4], tp_size=3, tp_rank=0, num_tokens=40, skip_tokens=16, skip_blocks=1)
    time.sleep(0.3)
    assert server.take(7) is None  # rank 1 has not registered
    rogue = kvxfer.Agent("push-tp-rogue", transport="tcp", interface="lo")
    rogue.register_pool(make_pool(layout, 3), layout)
    bad = PushClient(rogue, *server.address)
    bad.register(7, [5], tp_size=2, tp_rank=1)
    assert _wait_for(lambda: bad.lost)
    assert server.take(7) is None
    clients[1].register(7, [6, 0], tp_size=3, tp_rank=1, num_tokens=40, skip_tokens=16, skip_blocks=1)
    regs = _wait_for(lambda: server.take(7))
    assert [r.tp_rank for r in regs] == [0, 1, 2] and {r.tp_size for r in regs} == {3}
    assert [r.dst_ids.tolist() for r in regs] == [[3, 4], [6, 0], [9, 8]]
    assert [r.peer.name for r in regs] == [f"push-tp-decode-{r}" for r in range(3)]
    assert {(r.num_tokens, r.skip_tokens, r.skip_blocks) for r in regs} == {(40, 16, 1)}
    assert server.take(7) is None
    with pytest.raises(errors.InvalidArgument, match="tp_rank=2 must be a rank of tp_size=2"):
        PushServer(prefill, "127.0.0.1", 0, tp_size=2, tp_rank=2)
    server.close()
