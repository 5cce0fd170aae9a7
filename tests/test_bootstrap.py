"""kvxfer/bootstrap.py: metadata over TCP between two real processes, and defensive framing."""
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import kvxfer
from kvxfer import bootstrap, errors

SENDER = textwrap.dedent("""
    import sys, numpy as np, kvxfer
    from kvxfer import bootstrap
    layout = kvxfer.KVLayout.contiguous(32, 8192)
    agent = kvxfer.Agent("boot-sender", transport="tcp", interface="lo")
    src = np.arange(layout.total_bytes, dtype=np.uint64).view(np.uint8)[:layout.total_bytes].copy()
    agent.register_pool(src, layout)
    ch = bootstrap.connect("127.0.0.1", int(sys.argv[1]), timeout_s=20)
    peer = agent.add_peer(ch.exchange(agent.metadata()))
    job = ch.recv_json()
    send = agent.send(peer, job["id"], job["src"], job["dst"])
    send.all_ready()
    send.wait(timeout_s=20)
    ch.send_json({"done": job["id"], "bytes": send.nbytes})
""")


def test_metadata_exchange_then_transfer_between_processes():
    layout = kvxfer.KVLayout.contiguous(32, 8192)
    agent = kvxfer.Agent("boot-receiver", transport="tcp", interface="lo", timeout_s=20)
    dst = np.full(layout.total_bytes, 0xEE, np.uint8)
    agent.register_pool(dst, layout)
    lst = bootstrap.listen("127.0.0.1", 0)
    proc = subprocess.Popen([sys.executable, "-c", SENDER, str(lst.address[1])],
                            env={**os.environ, "FI_TCP_IFACE": "lo"})
    try:
        ch = lst.accept(timeout_s=30)
        peer = agent.add_peer(ch.exchange(agent.metadata()))
        recv = agent.recv(peer, 9, [30, 2])
        ch.send_json({"id": 9, "src": [1, 2], "dst": [30, 2]})
        recv.wait(timeout_s=20)
        assert ch.recv_json() == {"done": 9, "bytes": 2 * 8192}
        src = np.arange(layout.total_bytes, dtype=np.uint64).view(np.uint8)[:layout.total_bytes]
        blocks, sblocks = dst.reshape(32, 8192), src.reshape(32, 8192)
        np.testing.assert_array_equal(blocks[30], sblocks[1])
        np.testing.assert_array_equal(blocks[2], sblocks[2])
        assert (np.delete(blocks, [2, 30], axis=0) == 0xEE).all()
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        lst.close()


def _raw_pair():
    lst = bootstrap.listen()
    raw = socket.create_connection(lst.address)
    return lst.accept(timeout_s=5), raw, lst


@pytest.mark.parametrize("frame, cause", [
    (b"HTTP/1.1 200 OK\r\n", "not a kvxfer bootstrap frame"),
    (struct.pack(">4sBBI", b"KVXB", 9, 1, 4) + b"abcd", "version 9"),
    (struct.pack(">4sBBI", b"KVXB", 1, 1, (16 << 20) + 1), "exceeds"),
    (struct.pack(">4sBBI", b"KVXB", 1, 2, 2) + b"{}", "kind 2, expected 1"),
])
def test_bad_frames_are_refused_with_the_cause(frame, cause):
    ch, raw, lst = _raw_pair()
    raw.sendall(frame)
    with pytest.raises(errors.MetadataError, match=cause):
        ch.recv(timeout_s=5)
    raw.close(), ch.close(), lst.close()


def test_truncated_frame_and_silence():
    ch, raw, lst = _raw_pair()
    raw.sendall(struct.pack(">4sBBI", b"KVXB", 1, 1, 100) + b"x" * 10)
    with pytest.raises(errors.TransferTimeout, match="sent 10 of 100 bytes"):
        ch.recv(timeout_s=0.5)
    raw.close()
    with pytest.raises(errors.PeerLost, match="closed the connection"):
        ch.recv(timeout_s=5)
    ch.close(), lst.close()


def test_invalid_json_and_bad_metadata_bytes():
    ch, raw, lst = _raw_pair()
    raw.sendall(struct.pack(">4sBBI", b"KVXB", 1, 2, 5) + b"{nope")
    with pytest.raises(errors.MetadataError, match="invalid JSON"):
        ch.recv_json(timeout_s=5)
    raw.sendall(struct.pack(">4sBBI", b"KVXB", 1, 1, 6) + b"KVXF\x00\x01")
    junk = ch.recv(timeout_s=5)
    with pytest.raises(errors.MetadataError):
        kvxfer.Agent("x", transport="tcp", interface="lo").add_peer(junk)
    raw.close(), ch.close(), lst.close()


def test_connect_and_accept_time_out_with_a_hint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(errors.TransferTimeout, match=f"127.0.0.1:{port} within 0.3s"):
            bootstrap.connect("127.0.0.1", port, timeout_s=0.3)
    lst = bootstrap.listen()
    with pytest.raises(errors.TransferTimeout, match="--connect"):
        lst.accept(timeout_s=0.2)
    lst.close()


def test_exchange_is_symmetric():
    lst = bootstrap.listen()
    got = {}
    t = threading.Thread(target=lambda: got.update(a=bootstrap.connect(*lst.address).exchange(b"from-a")))
    t.start()
    assert lst.accept(timeout_s=5).exchange(b"from-b") == b"from-a"
    t.join(5)
    assert got["a"] == b"from-b"
    lst.close()


@pytest.mark.parametrize("text, want", [("127.0.0.1:5555", ("127.0.0.1", 5555)), ("6000", ("127.0.0.1", 6000)),
                                        ("host", ("host", 0)), (":7", ("127.0.0.1", 7))])
def test_parse_hostport(text, want):
    assert bootstrap.parse_hostport(text) == want


def test_parse_hostport_refuses_garbage():
    with pytest.raises(errors.InvalidArgument, match="not HOST:PORT"):
        bootstrap.parse_hostport("host:99999")
