"""Push registrations: the decode side tells the prefill side which of its blocks to write (D-initiated push).

    server = PushServer(agent, "127.0.0.1", 5600)        # prefill side, once; serves decode agents in threads
    client = PushClient(agent, "127.0.0.1", 5600)        # decode side, once per prefill server
    client.register(xfer_id, dst_ids, skip_blocks=0)     # decode: after allocating; one frame, never waits
    reg = server.take(xfer_id)                           # prefill engine: O(1) poll, None until it arrived
    agent.send(reg.peer, xfer_id, src_ids[reg.skip_blocks:], reg.dst_ids)

Protocol over one kvxfer.bootstrap channel per (decode agent, prefill server): both sides exchange agent metadata
and add each other as peers; then the client sends JSON frames {"op": "push", "xfer_id", "dst_ids", "skip_blocks"}
(skip_blocks: leading blocks of the request the decode side already holds, e.g. from its prefix cache) or
{"op": "cancel", "xfer_id"}. Nothing is pickled; every frame is validated and a bad one closes that connection.

Threads: the server accepts and reads in daemon threads; take()/expired()/cancelled() are called from the engine's
thread and never block; wait(timeout_s) blocks until the next frame, for an engine that has nothing else to do. A registration waits in the table until taken, cancelled, or older than ttl_s (then
expired() returns it once, so the engine can free what it held for it). The client notices the server closing the
connection (`client.lost`): every recv from that prefill process can then only fail, and engines fail them now
instead of at their deadline.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from kvxfer import bootstrap
from kvxfer.errors import InvalidArgument, KvxferError, MetadataError

log = logging.getLogger("kvxfer.push")
MAX_BLOCKS = 1 << 20  # a registration naming more blocks than this is refused as malformed


@dataclass
class Registration:
    xfer_id: int
    peer: object                 # kvxfer.Peer of the decode agent that registered
    dst_ids: np.ndarray          # int32 [num_blocks]: decode-side block ids, in token order
    skip_blocks: int             # leading blocks of the request that are not sent
    arrived_s: float = field(default_factory=time.monotonic)


def _parse(msg) -> tuple[str, int, np.ndarray | None, int]:
    if not isinstance(msg, dict) or msg.get("op") not in ("push", "cancel"):
        raise MetadataError(f"push frame must be an object with op push|cancel, got {str(msg)[:80]!r}")
    xfer_id = msg.get("xfer_id")
    if not isinstance(xfer_id, int) or isinstance(xfer_id, bool) or not 0 <= xfer_id < 2**64:
        raise MetadataError(f"push frame xfer_id {xfer_id!r} is not an integer in [0, 2**64)")
    if msg["op"] == "cancel":
        return "cancel", xfer_id, None, 0
    dst, skip = msg.get("dst_ids"), msg.get("skip_blocks", 0)
    if (not isinstance(dst, list) or len(dst) > MAX_BLOCKS
            or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 2**31 for b in dst)):
        raise MetadataError(f"push frame for {xfer_id}: dst_ids must be a list of at most {MAX_BLOCKS} block ids")
    if not isinstance(skip, int) or isinstance(skip, bool) or skip < 0:
        raise MetadataError(f"push frame for {xfer_id}: skip_blocks {skip!r} must be an integer >= 0")
    return "push", xfer_id, np.asarray(dst, dtype=np.int32), skip


class PushServer:
    """Prefill side: accepts decode agents on host:port (port 0 picks one: see .address)."""

    def __init__(self, agent, host: str = "127.0.0.1", port: int = 0, *, ttl_s: float = 60.0,
                 handshake_timeout_s: float = 30.0):
        self.agent, self.ttl_s, self._handshake_timeout_s = agent, float(ttl_s), float(handshake_timeout_s)
        self._listener = bootstrap.listen(host, port)
        self.address: tuple[str, int] = self._listener.address
        self._lock = threading.Lock()
        self._news = threading.Condition(self._lock)  # notified on every frame: lets an idle engine wait
        self._table: dict[int, Registration] = {}      # xfer_id -> waiting registration
        self._cancelled: set[int] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="kvxfer-push-accept", daemon=True).start()

    def take(self, xfer_id: int) -> Registration | None:
        with self._lock:
            return self._table.pop(xfer_id, None)

    def wait(self, timeout_s: float) -> None:
        """Block (at most timeout_s) until the next registration or cancel arrives; for engines with nothing else
        to do than wait for one."""
        with self._news:
            self._news.wait(timeout_s)

    def cancelled(self, xfer_id: int) -> bool:
        """True once (and then forgotten) if the decode side cancelled xfer_id before it was taken."""
        with self._lock:
            if xfer_id in self._cancelled:
                self._cancelled.discard(xfer_id)
                return True
            return False

    def expired(self) -> list[Registration]:
        """Registrations older than ttl_s that nobody took; removed from the table."""
        now = time.monotonic()
        with self._lock:
            old = [r for r in self._table.values() if now - r.arrived_s > self.ttl_s]
            for r in old:
                del self._table[r.xfer_id]
        return old

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                ch = self._listener.accept(timeout_s=1.0)
            except KvxferError:
                continue  # accept timeout: look at _closed again
            except OSError:
                return    # listener closed
            threading.Thread(target=self._serve, args=(ch,), name="kvxfer-push-conn", daemon=True).start()

    def _serve(self, ch) -> None:
        try:
            peer = self.agent.add_peer(ch.exchange(self.agent.metadata(), timeout_s=self._handshake_timeout_s))
            while not self._closed:
                op, xfer_id, dst, skip = _parse(ch.recv_json(timeout_s=3600))
                with self._lock:
                    if op == "push":
                        self._table[xfer_id] = Registration(xfer_id, peer, dst, skip)
                    else:
                        self._cancelled.add(xfer_id)
                    self._news.notify_all()
        except KvxferError as e:  # peer gone or a malformed frame: drop this connection, keep serving others
            log.info("kvxfer push connection from %s closed: %s", ch.peer, e)
        finally:
            ch.close()


class PushClient:
    """Decode side: one control connection to a prefill PushServer; adds the prefill agent as a peer."""

    def __init__(self, agent, host: str, port: int, *, timeout_s: float = 10.0):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidArgument(f"prefill push port {port!r} must be an integer in 1-65535")
        self.address = (host, port)
        self._ch = bootstrap.connect(host, port, timeout_s=timeout_s)
        self.peer = agent.add_peer(self._ch.exchange(agent.metadata(), timeout_s=timeout_s))
        self._send_lock = threading.Lock()
        self.lost = False
        threading.Thread(target=self._watch, name="kvxfer-push-watch", daemon=True).start()

    def register(self, xfer_id: int, dst_ids, skip_blocks: int = 0) -> None:
        dst = [int(b) for b in np.asarray(dst_ids, dtype=np.int64).ravel()]
        self._send({"op": "push", "xfer_id": int(xfer_id), "dst_ids": dst, "skip_blocks": int(skip_blocks)})

    def cancel(self, xfer_id: int) -> None:
        self._send({"op": "cancel", "xfer_id": int(xfer_id)})

    def close(self) -> None:
        self._ch.close()

    def _send(self, obj) -> None:
        with self._send_lock:
            self._ch.send_json(obj)  # raises PeerLost if the prefill side is gone

    def _watch(self) -> None:
        """The server never sends after the handshake, so any return from recv means the connection ended."""
        try:
            self._ch.recv_json(timeout_s=1e9)
        except KvxferError:
            pass
        self.lost = True
