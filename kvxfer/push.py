"""Push registrations: the decode side tells the prefill side which of its blocks to write (D-initiated push).

    server = PushServer(agent, "127.0.0.1", 5600)        # prefill side, once per rank; serves decode agents in threads
    client = PushClient(agent, "127.0.0.1", 5600)        # decode side, once per prefill server
    client.register(xfer_id, dst_ids, skip_blocks=0)     # decode: after allocating; one frame, never waits
    regs = server.take(xfer_id)                          # prefill engine: O(1) poll, None until every decode rank's
    for reg in regs:                                     # registration arrived (one, without tensor parallelism)
        agent.send(reg.peer, xfer_id, src_ids[reg.skip_blocks:], reg.dst_ids)

Protocol over one kvxfer.bootstrap channel per (decode agent, prefill server): both sides exchange agent metadata
and add each other as peers; the server then says who it is, {"op": "hello", "version": 2, "tp_size", "tp_rank"}
(its engine's tensor parallelism, so a decode rank knows which prefill ranks to reach); then the client sends JSON
frames {"op": "push", "xfer_id", "dst_ids", "skip_blocks", "num_tokens", "skip_tokens", "tp_size", "tp_rank"} or
{"op": "cancel", "xfer_id"}. skip_blocks: leading blocks of the request the decode side already holds (e.g. from
its prefix cache), skip_tokens the same in tokens; num_tokens: the tokens to write from there (0: every token of
dst_ids' blocks), so engines with different block sizes agree on what moves (send/recv num_tokens); tp_size and
tp_rank: the decode engine's, because with tensor parallelism every decode rank registers with every prefill rank
(each prefill rank then knows every decode rank was heard from, also those it sends nothing: kvxfer.tp.rank_pairs).
Nothing is pickled; every frame is validated and a bad one closes that connection.

Threads: the server accepts and reads in daemon threads; take()/expired()/cancelled() are called from the engine's
thread and never block; wait(timeout_s) blocks until the next frame, for an engine that has nothing else to do. A
registration waits in the table until taken, cancelled, or older than ttl_s (then expired() returns it once, so the
engine can free what it held for it). The client notices the server closing the connection (`client.lost`): every
recv from that prefill process can then only fail, and engines fail them now instead of at their deadline.
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
MAX_TP = 1024         # tensor-parallel sizes above this are refused as malformed
VERSION = 2


@dataclass
class Registration:
    xfer_id: int
    peer: object                 # kvxfer.Peer of the decode agent that registered
    dst_ids: np.ndarray          # int32 [num_blocks]: decode-side block ids, in token order
    skip_blocks: int             # leading blocks of the request (decode-side blocks) that are not sent
    num_tokens: int = 0          # tokens to write into dst_ids (0: all of their tokens)
    skip_tokens: int = 0         # tokens of the request before the first one written
    tp_size: int = 1             # the decode engine's tensor parallelism, and this registration's rank in it
    tp_rank: int = 0
    arrived_s: float = field(default_factory=time.monotonic)


def _is_rank(tp_rank, tp_size) -> bool:
    """tp_rank is a rank of a tensor-parallel size kvxfer accepts (integers, 0 <= rank < size <= MAX_TP)."""
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (tp_rank, tp_size))
    return ints and 0 <= tp_rank < tp_size <= MAX_TP


def _count(msg: dict, key: str, xfer_id: int, default: int = 0, below: int = 2**32) -> int:
    v = msg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < below:
        raise MetadataError(f"push frame for {xfer_id}: {key} {v!r} must be an integer in [0, {below})")
    return v


def _parse(msg) -> tuple[str, int, dict]:
    if not isinstance(msg, dict) or msg.get("op") not in ("push", "cancel"):
        raise MetadataError(f"push frame must be an object with op push|cancel, got {str(msg)[:80]!r}")
    xfer_id = msg.get("xfer_id")
    if not isinstance(xfer_id, int) or isinstance(xfer_id, bool) or not 0 <= xfer_id < 2**64:
        raise MetadataError(f"push frame xfer_id {xfer_id!r} is not an integer in [0, 2**64)")
    if msg["op"] == "cancel":
        return "cancel", xfer_id, {}
    dst = msg.get("dst_ids")
    if (not isinstance(dst, list) or len(dst) > MAX_BLOCKS
            or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 2**31 for b in dst)):
        raise MetadataError(f"push frame for {xfer_id}: dst_ids must be a list of at most {MAX_BLOCKS} block ids")
    fields = {"dst_ids": np.asarray(dst, dtype=np.int32), "skip_blocks": _count(msg, "skip_blocks", xfer_id),
              "num_tokens": _count(msg, "num_tokens", xfer_id), "skip_tokens": _count(msg, "skip_tokens", xfer_id),
              "tp_size": _count(msg, "tp_size", xfer_id, 1, MAX_TP + 1), "tp_rank": _count(msg, "tp_rank", xfer_id)}
    if not _is_rank(fields["tp_rank"], fields["tp_size"]):
        raise MetadataError(f"push frame for {xfer_id}: tp_rank {fields['tp_rank']} is not a rank of tp_size "
                            f"{fields['tp_size']}")
    return "push", xfer_id, fields


class _Group:
    """The registrations of one transfer id, one per decode rank, until every rank of the decode engine sent its."""

    def __init__(self, tp_size: int):
        self.tp_size, self.by_rank = tp_size, {}

    @property
    def arrived_s(self) -> float:  # its oldest registration's: the group's age for ttl_s
        return min(r.arrived_s for r in self.by_rank.values())

    def add(self, reg: Registration) -> None:
        if reg.tp_size != self.tp_size:
            raise MetadataError(f"push frame for {reg.xfer_id}: decode rank {reg.tp_rank} says tp_size "
                                f"{reg.tp_size}, an earlier rank said {self.tp_size}")
        self.by_rank[reg.tp_rank] = reg  # a rank registering again replaces its earlier frame

    @property
    def complete(self) -> bool:
        return len(self.by_rank) == self.tp_size


class PushServer:
    """Prefill side: accepts decode agents on host:port (port 0 picks one: see .address). tp_size/tp_rank: this
    prefill worker's place in its engine's tensor parallelism, told to every client."""

    def __init__(self, agent, host: str = "127.0.0.1", port: int = 0, *, ttl_s: float = 60.0,
                 handshake_timeout_s: float = 30.0, tp_size: int = 1, tp_rank: int = 0):
        if not _is_rank(tp_rank, tp_size):
            raise InvalidArgument(f"tp_rank={tp_rank} must be a rank of tp_size={tp_size} (1..{MAX_TP})")
        self.agent, self.ttl_s, self._handshake_timeout_s = agent, float(ttl_s), float(handshake_timeout_s)
        self.tp_size, self.tp_rank = int(tp_size), int(tp_rank)
        self._listener = bootstrap.listen(host, port)
        self.address: tuple[str, int] = self._listener.address
        self._lock = threading.Lock()
        self._news = threading.Condition(self._lock)  # notified on every frame: lets an idle engine wait
        self._table: dict[int, _Group] = {}            # xfer_id -> registrations so far
        self._cancelled: set[int] = set()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="kvxfer-push-accept", daemon=True).start()

    def take(self, xfer_id: int) -> list[Registration] | None:
        """Every decode rank's registration for xfer_id, by rank, once all arrived (and then forgotten); None
        before."""
        with self._lock:
            group = self._table.get(xfer_id)
            if group is None or not group.complete:
                return None
            del self._table[xfer_id]
            return [group.by_rank[r] for r in range(group.tp_size)]

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
        """Registrations older than ttl_s that nobody took (a group whose first one is that old); removed."""
        now = time.monotonic()
        with self._lock:
            old = [x for x, g in self._table.items() if now - g.arrived_s > self.ttl_s]
            return [reg for x in old for reg in self._table.pop(x).by_rank.values()]

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
            ch.send_json({"op": "hello", "version": VERSION, "tp_size": self.tp_size, "tp_rank": self.tp_rank})
            while not self._closed:
                op, xfer_id, fields = _parse(ch.recv_json(timeout_s=3600))
                with self._lock:
                    if op == "push":
                        reg = Registration(xfer_id, peer, **fields)
                        self._table.setdefault(xfer_id, _Group(reg.tp_size)).add(reg)
                    else:
                        self._cancelled.add(xfer_id)
                        self._table.pop(xfer_id, None)
                    self._news.notify_all()
        except KvxferError as e:  # peer gone or a malformed frame: drop this connection, keep serving others
            log.info("kvxfer push connection from %s closed: %s", ch.peer, e)
        finally:
            ch.close()


def _hello(msg, address) -> tuple[int, int]:
    """(tp_size, tp_rank) from a server's hello frame; refuses anything else, naming the server."""
    if not isinstance(msg, dict) or msg.get("op") != "hello" or msg.get("version") != VERSION:
        raise MetadataError(f"push server {address[0]}:{address[1]} answered {str(msg)[:80]!r}, not a version "
                            f"{VERSION} hello: run the same kvxfer version on prefill and decode")
    size, rank = msg.get("tp_size"), msg.get("tp_rank")
    if not _is_rank(rank, size):
        raise MetadataError(f"push server {address[0]}:{address[1]}: hello names tp_rank {rank!r} of tp_size "
                            f"{size!r}")
    return size, rank


class PushClient:
    """Decode side: one control connection to a prefill PushServer; adds the prefill agent as a peer.
    tp_size/tp_rank: the prefill worker's place in its engine's tensor parallelism (from its hello)."""

    def __init__(self, agent, host: str, port: int, *, timeout_s: float = 10.0):
        if not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidArgument(f"prefill push port {port!r} must be an integer in 1-65535")
        self.address = (host, port)
        self._ch = bootstrap.connect(host, port, timeout_s=timeout_s)
        try:
            self.peer = agent.add_peer(self._ch.exchange(agent.metadata(), timeout_s=timeout_s))
            self.tp_size, self.tp_rank = _hello(self._ch.recv_json(timeout_s=timeout_s), self.address)
        except BaseException:
            self._ch.close()
            raise
        self._send_lock = threading.Lock()
        self.lost = False
        threading.Thread(target=self._watch, name="kvxfer-push-watch", daemon=True).start()

    def register(self, xfer_id: int, dst_ids, skip_blocks: int = 0, *, num_tokens: int = 0, skip_tokens: int = 0,
                 tp_size: int = 1, tp_rank: int = 0) -> None:
        """Asks the prefill worker to write the request into dst_ids. With tensor parallelism every decode rank
        registers (its tp_size/tp_rank) with every prefill rank, also those that send it nothing."""
        dst = [int(b) for b in np.asarray(dst_ids, dtype=np.int64).ravel()]
        self._send({"op": "push", "xfer_id": int(xfer_id), "dst_ids": dst, "skip_blocks": int(skip_blocks),
                    "num_tokens": int(num_tokens), "skip_tokens": int(skip_tokens), "tp_size": int(tp_size),
                    "tp_rank": int(tp_rank)})

    def cancel(self, xfer_id: int) -> None:
        self._send({"op": "cancel", "xfer_id": int(xfer_id)})

    @property
    def usable(self) -> bool:
        """False once the control connection ended (the prefill worker went away) or the kvxfer peer was lost
        while it stayed up (the heartbeat ended a prefill worker that stalled, remove_peer): either way a new
        PushClient to the same address is the way back (the same prefill agent is then added again, a new
        association on both sides)."""
        return not self.lost and not self.peer.lost

    def close(self) -> None:
        self._ch.close()

    def _send(self, obj) -> None:
        with self._send_lock:
            self._ch.send_json(obj)  # raises PeerLost if the prefill side is gone

    def _watch(self) -> None:
        """The server never sends after its hello, so any return from recv means the connection ended."""
        try:
            self._ch.recv_json(timeout_s=1e9)
        except KvxferError:
            pass
        self.lost = True
