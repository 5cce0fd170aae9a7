"""Optional bootstrap: carry agent metadata (and small JSON control messages) over one TCP connection.

Engines carry `agent.metadata()` bytes over their own channel; this helper is for examples, `kvxfer-bench
--listen/--connect` and anyone without one:

    lst = bootstrap.listen("0.0.0.0", 5555)          # decode host
    ch = lst.accept(timeout_s=60); peer_md = ch.exchange(agent.metadata())
    ch = bootstrap.connect("decode-host", 5555)       # prefill host
    peer_md = ch.exchange(agent.metadata())

Frames are `KVXB` | version u8 | kind u8 | length u32 (big endian) | payload, at most 16 MiB. JSON frames are
parsed with json.loads, never unpickled. Every read is bounded by a timeout.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time

from kvxfer.errors import InvalidArgument, MetadataError, PeerLost, TransferTimeout

_MAGIC, _VERSION = b"KVXB", 1
_HEADER = struct.Struct(">4sBBI")
_BYTES, _JSON = 1, 2
MAX_FRAME = 16 << 20


class Channel:
    """One framed TCP connection to a peer process."""

    def __init__(self, sock: socket.socket, peer: str):
        self._sock, self.peer = sock, peer
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, payload: bytes, *, _kind: int = _BYTES) -> None:
        if len(payload) > MAX_FRAME:
            raise InvalidArgument(f"bootstrap frame of {len(payload)} bytes exceeds the {MAX_FRAME}-byte limit")
        try:
            self._sock.sendall(_HEADER.pack(_MAGIC, _VERSION, _kind, len(payload)) + bytes(payload))
        except OSError as e:
            raise PeerLost(f"bootstrap peer {self.peer} closed the connection while we sent ({e})") from e

    def recv(self, timeout_s: float = 30.0, *, _kind: int = _BYTES) -> bytes:
        deadline = time.monotonic() + timeout_s
        magic, version, kind, length = _HEADER.unpack(self._read(_HEADER.size, deadline))
        if magic != _MAGIC:
            raise MetadataError(f"bootstrap peer {self.peer} sent {magic!r}, not a kvxfer bootstrap frame; "
                                "is the other side a kvxfer bootstrap on the same port?")
        if version != _VERSION:
            raise MetadataError(f"bootstrap frame version {version} from {self.peer}; this kvxfer speaks "
                                f"{_VERSION}: run the same kvxfer version on both sides")
        if length > MAX_FRAME:
            raise MetadataError(f"bootstrap frame of {length} bytes from {self.peer} exceeds {MAX_FRAME}")
        if kind != _kind:
            raise MetadataError(f"bootstrap peer {self.peer} sent a frame of kind {kind}, expected {_kind}")
        return self._read(length, deadline)

    def send_json(self, obj) -> None:
        self.send(json.dumps(obj).encode(), _kind=_JSON)

    def recv_json(self, timeout_s: float = 30.0):
        data = self.recv(timeout_s, _kind=_JSON)
        try:
            return json.loads(data)
        except ValueError as e:
            raise MetadataError(f"bootstrap peer {self.peer} sent invalid JSON: {e}") from e

    def exchange(self, metadata: bytes, timeout_s: float = 30.0) -> bytes:
        """Send our metadata, return the peer's. Both sides call it; order does not matter."""
        self.send(metadata)
        return self.recv(timeout_s)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeout(f"bootstrap peer {self.peer} sent {len(buf)} of {n} bytes before the timeout")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(min(n - len(buf), 1 << 20))
            except socket.timeout:
                continue
            except OSError as e:
                raise PeerLost(f"bootstrap peer {self.peer}: {e}") from e
            if not chunk:
                raise PeerLost(f"bootstrap peer {self.peer} closed the connection ({len(buf)} of {n} bytes read)")
            buf += chunk
        return bytes(buf)


class Listener:
    def __init__(self, host: str, port: int):
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.address = self._sock.getsockname()[:2]

    def accept(self, timeout_s: float = 60.0) -> Channel:
        self._sock.settimeout(timeout_s)
        try:
            conn, addr = self._sock.accept()
        except socket.timeout:
            raise TransferTimeout(f"no peer connected to {self.address[0]}:{self.address[1]} within {timeout_s}s; "
                                  "start the other side with --connect HOST:PORT") from None
        conn.settimeout(None)
        return Channel(conn, f"{addr[0]}:{addr[1]}")

    def close(self) -> None:
        self._sock.close()


def listen(host: str = "127.0.0.1", port: int = 0) -> Listener:
    """Listen on host:port (port 0 picks a free one; see .address)."""
    try:
        return Listener(host, port)
    except OSError as e:
        raise InvalidArgument(f"cannot listen on {host}:{port}: {e}; pick another port or host") from e


def connect(host: str, port: int, timeout_s: float = 30.0) -> Channel:
    """Connect, retrying until timeout_s: the listener may start after us."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            sock.settimeout(None)
            return Channel(sock, f"{host}:{port}")
        except (ConnectionRefusedError, socket.timeout, OSError) as e:
            if time.monotonic() >= deadline:
                raise TransferTimeout(f"could not connect to {host}:{port} within {timeout_s}s ({e}); is the other "
                                      "side listening (--listen) and reachable?") from None
            time.sleep(0.1)


def default_interface(host: str) -> str | None:
    """The network interface libfabric's IP providers should use to reach `host`: lo for loopback, else any."""
    return "lo" if host.startswith("127.") or host == "localhost" else None


def loopback_env(environ=None) -> dict:
    """Environment for child processes on this machine: libfabric's tcp provider pinned to lo unless told otherwise
    (left alone it wanders onto the machine's other interfaces)."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("FI_TCP_IFACE", "lo")
    return env


def parse_hostport(text: str, default_host: str = "127.0.0.1", default_port: int = 0) -> tuple[str, int]:
    """'HOST:PORT', 'PORT' or 'HOST' -> (host, port), with a clear error."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = (default_host, text) if text.isdigit() else (text, str(default_port))
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"{text!r} is not HOST:PORT (port must be 0-65535)")
    return host or default_host, int(port)
