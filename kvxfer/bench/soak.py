"""Soak: sustained traffic with failures mixed in, judged byte for byte. `kvxfer-soak --help`

One receiver (this process) and N sender processes on this host. The receiver hands out requests of 1-32 random
blocks the way a decode engine does: destination blocks come from a free list and go back to it only when the
recv completed (after its bytes were checked) or, for a failed one, once `writes_over` is True. Mixed in, on a
schedule: the receiver cancels some recvs after their first layer, senders abort some sends part way, a sender
process is killed and restarted under the same name, a live sender is removed (remove_peer) and comes back with a
new agent, a live sender is removed and the same agent is added again at once (a new association of the same
incarnation, as an engine reconnecting to a peer it ended; its pool gets new bytes), and a sender is stopped (SIGSTOP) until the receiver's heartbeat ends it as silent, then runs again,
finds the BYE, answers with its totals and comes back. With --elsewhere every sender runs under a host name of its
own (a UTS namespace; needs root), so the receiver cannot watch its process: a stopped one's recvs settle only once
its keys are closed (per-peer keys), it stays stopped until they did and their blocks went to new requests, and
only then runs again. Every chunk's bytes name the sender incarnation, layer, plane and source block they came from,
so a late write of an ended transfer into a block handed to the next request, or a chunk written to the wrong
place, shows up as a mismatch when that block is checked. At the end every sender completes one more request
(no slot leaked) and every block whose content is known is checked again.

What users of a serving stack asked for (sustained load without failures, peers that come and go for days) is
what this measures; it reports counts, rates and the receiver's fds and memory before and after.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

LAYERS, BLOCKS, BLOCK_TOKENS, HEADS, HEAD_DIM = 8, 512, 16, 2, 128  # 8 KiB chunks, 64 MiB per pool
MAX_BLOCKS_PER_REQUEST = 32


def layout():
    import kvxfer

    return kvxfer.KVLayout.vllm_flash(LAYERS, BLOCKS, BLOCK_TOKENS, HEADS, HEAD_DIM, "float16")


_BASE = np.random.default_rng(20261201).integers(0, 2**32, 1 << 16, dtype=np.uint32)  # per-word noise


def pattern(incarnation: int, layer: int, src_ids: np.ndarray, words: int) -> np.ndarray:
    """[2 planes, len(src_ids), words] uint32: what a chunk of this sender incarnation holds. Its key is distinct
    per (incarnation, layer, plane, source block), so misplaced and stale chunks never match."""
    planes = np.arange(2, dtype=np.uint32)[:, None, None]
    src = np.asarray(src_ids, dtype=np.uint32)[None, :, None]
    key = ((np.uint32(incarnation) * np.uint32(LAYERS) + np.uint32(layer)) * np.uint32(2) + planes) * np.uint32(
        BLOCKS) + src
    return key ^ _BASE[None, None, :words]


def chunk_words(lay) -> int:
    return lay.chunk_bytes // 4


def planes_view(pool_layer: np.ndarray, lay) -> np.ndarray:
    return pool_layer.view(np.uint32).reshape(2, lay.num_blocks, chunk_words(lay))


# ---- sender process -----------------------------------------------------------------------------------------
PEER_TIMEOUT_S = 1.0  # with "stop" among the chaos: a stopped sender is ended as silent after this long
CHAOS = ("restart", "remove", "readd", "stop")  # what strikes, in turn (--chaos)


def _new_sender_agent(name, transport, incarnation, peer_timeout_s=None):
    import kvxfer

    lay = layout()
    agent = kvxfer.Agent(name, transport=transport, interface="lo", timeout_s=30, peer_timeout_s=peer_timeout_s)
    pool = [np.empty(lay.tensor_layer_bytes, np.uint8) for _ in range(lay.num_layers)]
    _fill(pool, incarnation)
    agent.register_pool(pool, lay)
    return agent, pool


def _fill(pool, incarnation: int) -> None:
    lay = layout()
    every = np.arange(lay.num_blocks)
    for layer, arr in enumerate(pool):
        planes_view(arr, lay)[:] = pattern(incarnation, layer, every, chunk_words(lay))


def _elsewhere(name: str) -> None:
    """This process gets a host name of its own (UTS namespace): to the receiver it is on another host."""
    import ctypes
    import socket

    if ctypes.CDLL(None, use_errno=True).unshare(0x04000000) != 0:  # CLONE_NEWUTS
        raise OSError(ctypes.get_errno(), "--elsewhere: unshare(CLONE_NEWUTS) needs root")
    socket.sethostname(f"soak-elsewhere-{name}")


def _sender_main(conn, name: str, transport: str, incarnation: int, layer_gap_s: float, peer_timeout_s,
                 elsewhere: bool = False) -> None:
    """Marks each send's layers `layer_gap_s` apart (a prefill's forward pass), aborting where told."""
    import kvxfer

    if elsewhere:
        _elsewhere(name)

    agent, _pool = _new_sender_agent(name, transport, incarnation, peer_timeout_s)  # the pool stays referenced
    conn.send(("md", agent.metadata()))
    peer, active = None, {}  # xfer -> [send, next layer, due time, abort at layer or -1]
    while True:
        now = time.monotonic()
        wait = min((a[2] for a in active.values()), default=now + 0.05) - now
        if conn.poll(max(0.0, wait)):
            cmd, arg = conn.recv()
            if cmd == "peer":
                peer = agent.add_peer(arg)
            elif cmd == "send":
                xfer, src, dst, abort_at = arg
                try:
                    active[xfer] = [agent.send(peer, xfer, src, dst), 0, time.monotonic(), abort_at]
                except kvxfer.KvxferError:  # the receiver ended us (removal): it knows, and judges the recv itself
                    continue
            elif cmd == "readd":  # removed by the receiver, which adds this same agent again: new pool bytes
                lost_by = time.monotonic() + 10
                while peer is not None and not peer.lost and time.monotonic() < lost_by:
                    time.sleep(0.002)  # our ended sends fail once the receiver's BYE is read
                incarnation, active = arg, {}
                _fill(_pool, incarnation)
                conn.send(("md", agent.metadata()))  # then "peer": adding the receiver again, a new association
            elif cmd == "renew":  # removed by the receiver: come back as a new agent (new epoch) under the name
                agent.close()
                incarnation, active, peer = arg, {}, None
                agent, _pool = _new_sender_agent(name, transport, incarnation, peer_timeout_s)  # the pool stays referenced
                conn.send(("md", agent.metadata()))
            elif cmd == "exit":
                agent.close()
                return
        now = time.monotonic()
        for xfer in [x for x, a in active.items() if a[2] <= now]:
            send, layer, _, abort_at = active[xfer]
            try:
                if layer == abort_at:
                    send.abort("soak: the sender gave up on it")
                    del active[xfer]
                    continue
                send.layer_ready(layer)
            except kvxfer.KvxferError:  # failed already (cancelled by the receiver, or the peer ended)
                del active[xfer]
                continue
            if layer + 1 == LAYERS:
                del active[xfer]
            else:
                active[xfer][1:3] = [layer + 1, now + layer_gap_s]


# ---- receiver -----------------------------------------------------------------------------------------------
@dataclass
class Sender:
    index: int
    name: str
    incarnation: int
    proc: mp.Process = None
    conn: object = None
    peer: object = None
    stopped_at: float | None = None  # SIGSTOPped (chaos "stop") since


@dataclass
class Request:
    xfer: int
    sender: Sender
    incarnation: int
    src: list
    dst: list
    recv: object
    fate: str                 # normal, cancel (receiver, after layer 0), abort (sender, part way)
    started: float
    ended: float | None = None


@dataclass
class Tally:
    completed: int = 0
    completed_bytes: int = 0
    failed: dict = field(default_factory=dict)   # error class -> count
    cancelled: int = 0
    aborted: int = 0
    restarts: int = 0
    removals: int = 0
    readds: int = 0          # live senders removed and the same agent added again (a new association)
    stops: int = 0
    unplanned_ends: int = 0  # senders the receiver lost without a chaos event (renewed)
    struck: int = 0          # requests in flight from a sender when it was killed, removed or stopped
    mismatched_blocks: int = 0
    mismatch_examples: list = field(default_factory=list)
    unsettled: int = 0
    settle_s: list = field(default_factory=list)
    latency_s: list = field(default_factory=list)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Soak:
    def __init__(self, transport: str, senders: int, in_flight: int, layer_gap_s: float, chaos_every_s: float,
                 seed: int, progress, chaos: tuple = CHAOS, elsewhere: bool = False):
        import kvxfer

        unknown = [k for k in chaos if k not in CHAOS]
        if unknown:
            raise ValueError(f"--chaos {','.join(unknown)}: not one of {','.join(CHAOS)}")
        if elsewhere and os.geteuid() != 0:
            raise PermissionError("--elsewhere gives each sender a host name of its own (unshare CLONE_NEWUTS), "
                                  "which needs root; run as root or leave it out")
        self.elsewhere = elsewhere

        self.kvxfer, self.transport, self.progress = kvxfer, transport, progress
        self.rng = random.Random(seed)
        self.lay = layout()
        self.words = chunk_words(self.lay)
        self.layer_gap_s, self.chaos_every_s, self.in_flight, self.chaos = layer_gap_s, chaos_every_s, in_flight, chaos
        self.ctx = mp.get_context("spawn")
        self.peer_timeout_s = PEER_TIMEOUT_S if "stop" in chaos else None
        self.agent = kvxfer.Agent("soak-receiver", transport=transport, interface="lo", timeout_s=30,
                                  peer_timeout_s=self.peer_timeout_s)
        # Resident from the start, so the memory reported after the run is what the run added.
        self.dst = [np.full(self.lay.tensor_layer_bytes, 0xA5, np.uint8) for _ in range(self.lay.num_layers)]
        self.agent.register_pool(self.dst, self.lay)
        self.free = list(range(self.lay.num_blocks))
        self.rng.shuffle(self.free)
        self.known = {}            # dst block -> (incarnation, src block) it must hold; absent: unknown
        self.settling: list[Request] = []
        self.live: dict[int, Request] = {}
        self.next_xfer, self.next_incarnation = 1, 1
        self.tally = Tally()
        self.senders = [Sender(i, f"soak-sender-{i}", 0) for i in range(senders)]
        for s in self.senders:
            self._start(s)

    # -- senders
    def _start(self, s: Sender) -> None:
        s.incarnation, self.next_incarnation = self.next_incarnation, self.next_incarnation + 1
        s.conn, child = self.ctx.Pipe()
        s.proc = self.ctx.Process(target=_sender_main, args=(child, s.name, self.transport, s.incarnation,
                                                              self.layer_gap_s, self.peer_timeout_s, self.elsewhere),
                                  daemon=True)
        s.proc.start()
        self._connect(s)

    def _connect(self, s: Sender) -> None:
        if not s.conn.poll(60):
            raise TimeoutError(f"sender {s.name} did not start within 60 s")
        _, md = s.conn.recv()
        s.peer = self.agent.add_peer(md)  # a new incarnation under a live name ends the old one (restart)
        s.conn.send(("peer", self.agent.metadata()))
        self.agent.wait_connected(s.peer, 30)

    def _struck(self, s: Sender) -> None:
        self.tally.struck += sum(r.sender is s for r in self.live.values())

    def _restart(self, s: Sender) -> None:
        self._struck(s)
        os.kill(s.proc.pid, signal.SIGKILL)  # mid-transfer, no goodbye: the worst case of a crash
        s.proc.join(10)
        self._start(s)
        self.tally.restarts += 1

    def _remove_and_renew(self, s: Sender) -> None:
        self._struck(s)
        self.agent.remove_peer(s.peer)  # its process lives on: its answer must settle the ended recvs
        self._renew(s)
        self.tally.removals += 1

    def _remove_and_readd(self, s: Sender) -> None:
        self._struck(s)
        self.agent.remove_peer(s.peer)
        s.incarnation, self.next_incarnation = self.next_incarnation, self.next_incarnation + 1
        s.conn.send(("readd", s.incarnation))
        self._connect(s)  # the same metadata: add_peer starts a new association beside the ended one
        self.tally.readds += 1

    def _stop(self, s: Sender) -> None:
        """SIGSTOP: to the receiver the sender falls silent (a host gone dark); the heartbeat ends it, and once it
        runs again it finds the BYE and answers with its totals. drive() resumes it (_resume_if_ended)."""
        self._struck(s)
        os.kill(s.proc.pid, signal.SIGSTOP)
        s.stopped_at = time.monotonic()
        self.tally.stops += 1

    def _resume_if_ended(self, s: Sender) -> None:
        if s.stopped_at is None and s.peer.lost:  # ended by nobody's plan (heartbeat on a starved machine)
            self.tally.unplanned_ends += 1
            self._renew(s)
            return
        if s.stopped_at is None or not (s.peer.lost or time.monotonic() - s.stopped_at > 10 * PEER_TIMEOUT_S):
            return
        if (self.elsewhere and time.monotonic() - s.stopped_at <= 10 * PEER_TIMEOUT_S
                and any(r.sender is s for r in [*self.live.values(), *self.settling])):
            return  # its recvs settle only once its keys close; their blocks then go to new requests first
        os.kill(s.proc.pid, signal.SIGCONT)
        s.stopped_at = None
        if not s.peer.lost:
            self.agent.remove_peer(s.peer)
        self._renew(s)

    def _renew(self, s: Sender) -> None:
        s.incarnation, self.next_incarnation = self.next_incarnation, self.next_incarnation + 1
        s.conn.send(("renew", s.incarnation))
        self._connect(s)

    # -- requests
    def _issue(self, s: Sender, fate: str | None = None) -> None:
        n = self.rng.randint(1, MAX_BLOCKS_PER_REQUEST)
        if len(self.free) < n:
            return
        dst = [self.free.pop() for _ in range(n)]
        src = self.rng.sample(range(self.lay.num_blocks), n)
        for b in dst:
            self.known.pop(b, None)  # being written: unknown until this request is judged
        roll = self.rng.random()
        fate = fate or ("cancel" if roll < 0.08 else "abort" if roll < 0.16 else "normal")
        xfer, self.next_xfer = self.next_xfer, self.next_xfer + 1
        try:
            recv = self.agent.recv(s.peer, xfer, dst)
        except self.kvxfer.KvxferError:
            self.free.extend(dst)  # its peer just ended: nothing was posted for it
            return
        abort_at = self.rng.randint(1, LAYERS - 1) if fate == "abort" else -1
        s.conn.send(("send", (xfer, src, dst, abort_at)))
        self.live[xfer] = Request(xfer, s, s.incarnation, src, dst, recv, fate, time.monotonic())

    def _wrong_blocks(self, incarnation: int, dst: list, src: list) -> set:
        """The blocks of dst that do not hold, in every layer and plane, what src's blocks of that incarnation hold."""
        bad = set()
        for layer in range(self.lay.num_layers):
            got = planes_view(self.dst[layer], self.lay)[:, dst]
            want = pattern(incarnation, layer, np.array(src), self.words)
            bad.update(dst[i] for i in np.nonzero((got != want).any(axis=(0, 2)))[0])
        return bad

    def _check(self, r: Request) -> None:
        bad = self._wrong_blocks(r.incarnation, r.dst, r.src)
        self._mismatches(sorted(bad), f"request {r.xfer} from {r.sender.name} (incarnation {r.incarnation})")
        for b, s in zip(r.dst, r.src):
            if b not in bad:
                self.known[b] = (r.incarnation, s)

    def _mismatches(self, blocks, what) -> None:
        self.tally.mismatched_blocks += len(blocks)
        if blocks and len(self.tally.mismatch_examples) < 10:
            self.tally.mismatch_examples.append(f"{what}: blocks {blocks[:8]} hold other bytes")

    def _poll(self) -> None:
        now = time.monotonic()
        for xfer, r in list(self.live.items()):
            state = r.recv.state
            if r.fate == "cancel" and state == self.kvxfer.TransferState.PENDING and r.recv.layer_done(0):
                r.recv.cancel("soak: the receiver gave up on it")
                self.tally.cancelled += 1
                r.fate = "cancelled"
                continue
            if state == self.kvxfer.TransferState.DONE:
                self._check(r)
                self.free.extend(r.dst)
                self.tally.completed += 1
                self.tally.completed_bytes += len(r.dst) * 2 * self.lay.chunk_bytes * self.lay.num_layers
                self.tally.latency_s.append((r.recv.finished_at or now) - r.started)
                del self.live[xfer]
            elif state == self.kvxfer.TransferState.FAILED:
                kind = type(r.recv.error).__name__
                self.tally.failed[kind] = self.tally.failed.get(kind, 0) + 1
                self.tally.aborted += r.fate == "abort"
                r.ended = now
                self.settling.append(r)
                del self.live[xfer]
        for r in list(self.settling):
            if r.recv.writes_over:
                self.tally.settle_s.append(now - r.ended)
                self.free.extend(r.dst)
                self.settling.remove(r)

    def run(self, seconds: float) -> dict:
        self.drive(seconds)
        return self.finish()

    def drive(self, seconds: float) -> None:
        """Traffic and chaos for `seconds`; finish() then settles, checks and reports."""
        self.fds0, self.rss0 = _fds(), _rss_mib()
        self.start = start = last_chaos = last_report = time.monotonic()
        chaos = 0
        while time.monotonic() - start < seconds:
            for s in self.senders:
                self._resume_if_ended(s)
                while (s.stopped_at is None and sum(r.sender is s for r in self.live.values()) < self.in_flight
                       and len(self.free) >= 32):
                    self._issue(s)
            now = time.monotonic()
            if self.chaos_every_s > 0 and now - last_chaos >= self.chaos_every_s:
                # Strike while the sender has requests part way through (a few layers in), not between them.
                time.sleep(self.rng.uniform(0, LAYERS * self.layer_gap_s))
                s = self.senders[chaos % len(self.senders)]
                kind = self.chaos[chaos % len(self.chaos)]
                if s.stopped_at is not None:
                    pass  # still stopped: strike again on the next turn
                elif kind == "restart":
                    self._restart(s)
                elif kind == "stop":
                    self._stop(s)
                elif kind == "readd":
                    self._remove_and_readd(s)
                else:
                    self._remove_and_renew(s)
                chaos, last_chaos = chaos + 1, time.monotonic()
            if self.progress and now - last_report >= 5:
                self.progress(f"  {now - start:5.0f} s: {self.tally.completed} done, {sum(self.tally.failed.values())} "
                              f"failed, {len(self.settling)} settling, {self.tally.restarts} restarts, "
                              f"{self.tally.removals} removals, {self.tally.mismatched_blocks} mismatched blocks, "
                              f"{_rss_mib():.0f} MiB resident")
                last_report = now
            self._poll()
            time.sleep(0.001)
        self.elapsed = time.monotonic() - start

    def finish(self) -> dict:
        elapsed, fds0, rss0 = self.elapsed, self.fds0, self.rss0
        deadline = time.monotonic() + 45  # live recvs end by their 30 s deadline at the latest
        while (self.live or self.settling or any(s.stopped_at for s in self.senders)) and time.monotonic() < deadline:
            for s in self.senders:
                self._resume_if_ended(s)
            self._poll()
            time.sleep(0.005)
        self.tally.unsettled = len(self.live) + len(self.settling)
        # One more plain request per sender: a slot or window leaked by the chaos would leave it waiting.
        done_before = self.tally.completed
        for s in self.senders:
            self._issue(s, fate="normal")
        t = time.monotonic() + 30
        while self.live and time.monotonic() < t:
            self._poll()
            time.sleep(0.002)
        final_ok = self.tally.completed - done_before
        # Every block whose content is known must still hold it: a late write after writes_over would show here.
        by_incarnation = {}
        for b, (inc, src) in self.known.items():
            by_incarnation.setdefault(inc, ([], []))
            by_incarnation[inc][0].append(b)
            by_incarnation[inc][1].append(src)
        stale = set()
        for inc, (dst, src) in by_incarnation.items():
            stale |= self._wrong_blocks(inc, dst, src)
        self._mismatches(sorted(stale), "final check")
        fds1, rss1 = _fds(), _rss_mib()
        t = self.tally
        lat = sorted(t.latency_s) or [0.0]
        settle = sorted(t.settle_s) or [0.0]
        return {
            "transport": self.transport, "seconds": round(elapsed, 1), "senders": len(self.senders),
            "completed": t.completed, "completed_gib": round(t.completed_bytes / 2**30, 3),
            "requests_per_s": round(t.completed / elapsed, 1),
            "gib_per_s": round(t.completed_bytes / 2**30 / elapsed, 3),
            "latency_p50_ms": round(1e3 * lat[len(lat) // 2], 2),
            "latency_p99_ms": round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
            "failed": t.failed, "cancelled": t.cancelled, "aborted": t.aborted, "restarts": t.restarts,
            "removals": t.removals, "readds": t.readds, "stops": t.stops, "unplanned_ends": t.unplanned_ends, "requests_struck": t.struck, "settle_p50_ms": round(1e3 * settle[len(settle) // 2], 2),
            "settle_max_ms": round(1e3 * settle[-1], 2), "unsettled": t.unsettled,
            "final_requests_done": final_ok, "mismatched_blocks": t.mismatched_blocks,
            "mismatch_examples": t.mismatch_examples, "blocks_checked_at_end": len(self.known),
            "elsewhere": self.elsewhere, "peers_fenced": self.agent.stats()["peers_fenced"],
            "fds_before": fds0, "fds_after": fds1, "rss_mib_before": round(rss0, 1), "rss_mib_after": round(rss1, 1),
        }

    def close(self) -> None:
        for s in self.senders:
            if s.stopped_at is not None and s.proc.is_alive():
                os.kill(s.proc.pid, signal.SIGCONT)
            try:
                s.conn.send(("exit", None))
            except (BrokenPipeError, OSError):
                pass
        for s in self.senders:
            s.proc.join(10)
            if s.proc.is_alive():
                s.proc.kill()
        self.agent.close()


def run(transport="tcp", seconds=30.0, senders=2, in_flight=6, layer_gap_ms=1.0, chaos_every_s=2.0, seed=1,
        progress=None, chaos=CHAOS, elsewhere=False) -> dict:
    soak = Soak(transport, senders, in_flight, layer_gap_ms / 1e3, chaos_every_s, seed, progress, tuple(chaos),
                elsewhere)
    try:
        return soak.run(seconds)
    finally:
        soak.close()


def main(argv=None) -> int:
    os.environ.setdefault("FI_TCP_IFACE", "lo")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    ap = argparse.ArgumentParser(prog="kvxfer-soak", description=__doc__.split("\n")[0])
    ap.add_argument("--transport", default="tcp", help="tcp, cma, shm, ucx (default: tcp)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to run (default: 30)")
    ap.add_argument("--senders", type=int, default=2, help="sender processes (default: 2)")
    ap.add_argument("--in-flight", type=int, default=6, help="requests in flight per sender (default: 6)")
    ap.add_argument("--layer-gap-ms", type=float, default=1.0, help="sender's time between layers (default: 1)")
    ap.add_argument("--chaos-every", type=float, default=2.0,
                    help="seconds between a sender restart / removal, alternating; 0 = none (default: 2)")
    ap.add_argument("--chaos", default=",".join(CHAOS),
                    help="what strikes, in turn: restart (kill -9 a sender, start it again), remove (remove_peer a "
                         "live sender, it comes back as a new agent), readd (remove_peer a live sender and add the "
                         "same agent again at once: a new association), stop (SIGSTOP a sender until the receiver's "
                         f"heartbeat ends it, peer_timeout_s={PEER_TIMEOUT_S:g}, then it runs again and comes back) "
                         f"(default: {','.join(CHAOS)})")
    ap.add_argument("--elsewhere", action="store_true",
                    help="run each sender under a host name of its own (UTS namespace, needs root): the receiver "
                         "cannot watch its process, so stopped senders settle by per-peer keys alone")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="write the result here too")
    args = ap.parse_args(argv)
    say = lambda line: print(line, file=sys.stderr, flush=True)
    say(f"soak: {args.seconds:.0f} s over {args.transport}, {args.senders} senders, chaos every {args.chaos_every} s")
    result = run(args.transport, args.seconds, args.senders, args.in_flight, args.layer_gap_ms, args.chaos_every,
                 args.seed, say, args.chaos.split(","), args.elsewhere)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    ok = not result["mismatched_blocks"] and not result["unsettled"] and result["final_requests_done"] == args.senders
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
