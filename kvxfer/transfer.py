"""Send and Recv handles.

Send side: Agent.send() -> Send. Send.layer_ready(l) queues layer l's writes and returns in microseconds (never
blocks); Send.all_ready() marks every remaining layer. Send.state is O(1). A send is DONE once every write
completed locally and the receiver confirmed that every chunk arrived.
Recv side: Agent.recv() -> Recv. Recv.layer_done(l) and Recv.state are O(1) and never block; Recv.wait() blocks
(GIL released) with a timeout. DONE means every chunk of every layer arrived, counted exactly from immediates.
"""
from __future__ import annotations

import enum

from kvxfer import errors


class TransferState(enum.IntEnum):
    PENDING = 0
    DONE = 1
    FAILED = 2


def _raise_failure(handle) -> None:
    cls = getattr(errors, handle.error_kind.name, errors.TransferFailed)
    raise cls(handle.error)


class _Transfer:
    def __init__(self, agent, peer, handle):
        self._agent, self.peer, self._h = agent, peer, handle

    @property
    def xfer_id(self) -> int:
        return self._h.xfer_id

    @property
    def state(self) -> TransferState:
        return TransferState(self._h.state)

    @property
    def done(self) -> bool:
        return self._h.state == TransferState.DONE

    @property
    def error(self) -> errors.KvxferError | None:
        if self._h.state != TransferState.FAILED:
            return None
        return getattr(errors, self._h.error_kind.name, errors.TransferFailed)(self._h.error)

    @property
    def layers_done(self) -> int:
        return self._h.layers_done

    @property
    def finished_at(self) -> float | None:
        """When the transfer ended (DONE or FAILED) on time.perf_counter()'s clock, stamped by kvxfer's progress
        thread; None while pending. Latency measured from it leaves out the waiting thread's own scheduling."""
        t = self._h.finished_at
        return t if t > 0 else None

    def layer_done(self, layer: int) -> bool:
        return self._h.layer_done(layer)

    def wait(self, layer: int | None = None, timeout_s: float = 30.0) -> None:
        """Block until done (or `layer` done). Raises the transfer's typed error, or TransferTimeout."""
        state = self._h.wait(-1 if layer is None else layer, timeout_s)
        if state == TransferState.FAILED:
            _raise_failure(self._h)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.xfer_id} {self.state.name} layers {self.layers_done}/{self._h.num_layers}>"


class Send(_Transfer):
    def layer_ready(self, layer: int) -> None:
        """Layer `layer`'s KV is in the source pool: post its writes. For a GPU pool the layer's kernels must have
        finished (synchronize the model's stream first, or use kvxfer.LayerSignal, which fires from the GPU)."""
        self._agent._c.layer_ready(self._h, layer)

    def abort(self, reason: str = "aborted") -> None:
        """Post nothing more; this send and the peer's recv fail with TransferFailed naming `reason`. No-op once the
        send ended. Writes already posted may still be in flight after this returns: `writes_over` says when they
        are not (free or reuse the source blocks then); the transfer's slot is reused only once the receiver has
        counted every one of them, so none can be credited to a later transfer."""
        self._agent._c.abort_send(self._h, reason)

    @property
    def writes_over(self) -> bool:
        """True once nothing this send posted is in flight, so its source blocks may be freed or reused: it is DONE,
        or it failed and the receiver has counted every write it had posted (its ABORT was answered), or the peer is
        lost and every write and copy it started has completed here. Stays False for a failed send whose live
        receiver does not answer."""
        return self._h.writes_over

    def all_ready(self) -> None:
        self._agent._c.layer_ready(self._h, -1)

    @property
    def waiting_for_slot(self) -> bool:
        """True while every transfer slot the peer gave this agent is in flight: the send waits, in call order, for
        one to come back (its deadline runs meanwhile; layers marked ready are posted once it has one)."""
        return self._h.waiting_for_slot

    @property
    def num_writes(self) -> int:
        return self._h.num_writes

    @property
    def nbytes(self) -> int:
        return self._h.nbytes

    @property
    def path(self) -> str:
        """How the bytes travel: "fabric", "cma", "cuda_ipc" or "staged" (see path_reason for why and the cost)."""
        return self._h.path

    @property
    def path_reason(self) -> str:
        return self._h.path_reason


class _Group:
    """Transfers of one request with several peers, seen as one: FAILED as soon as one failed, DONE when all are,
    writes_over when every one's writes are over."""

    kind = "transfer"

    def __init__(self, transfers):
        self._all = list(transfers)
        if not self._all:
            raise errors.InvalidArgument(f"a {type(self).__name__} needs at least one {self.kind}")

    def _each(self, fn, skip_failed: bool = False) -> None:
        first = None
        for t in self._all:
            if skip_failed and t.state == TransferState.FAILED:
                continue
            try:
                fn(t)
            except errors.KvxferError as e:
                first = first or e
        if first and not skip_failed:
            raise first

    @property
    def state(self) -> TransferState:
        states = [t.state for t in self._all]
        if TransferState.FAILED in states:
            return TransferState.FAILED
        return TransferState.DONE if all(x == TransferState.DONE for x in states) else TransferState.PENDING

    @property
    def done(self) -> bool:
        return self.state == TransferState.DONE

    @property
    def error(self) -> errors.KvxferError | None:
        return next((t.error for t in self._all if t.error is not None), None)

    @property
    def writes_over(self) -> bool:
        return all(t.writes_over for t in self._all)

    def wait(self, timeout_s: float = 30.0) -> None:
        """Block until every one is DONE; raises the first failure as soon as one failed (the peer it came from is
        in its message), or TransferTimeout naming those still pending."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            failed = next((t for t in self._all if t.state == TransferState.FAILED), None)
            if failed is not None:
                _raise_failure(failed._h)
            pending = [t for t in self._all if t.state != TransferState.DONE]
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise errors.TransferTimeout(
                    f"{len(pending)} of the {len(self._all)} {self.kind}s of transfer {pending[0].xfer_id} not done "
                    f"within {timeout_s}s (peers {', '.join(repr(t.peer.name) for t in pending)})")
            try:  # sleeps until it changes, or 5 ms: another one may fail meanwhile
                pending[0]._h.wait(-1, min(0.005, max(0.001, deadline - time.monotonic())))
            except errors.TransferTimeout:
                pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state.name} of {len(self._all)} {self.kind}s>"


class SendGroup(_Group):
    """One request's sends to several peers, driven as one: a prefill rank feeding the decode ranks that hold slices
    of its KV heads (kvxfer.tp.rank_pairs). Layers are marked on every send; the group is DONE when every send is
    DONE and FAILED as soon as one failed (the others go on: abort() them, or let them finish); writes_over when
    every send's writes are over."""

    kind = "send"

    @property
    def sends(self) -> list:
        return self._all

    def layer_ready(self, layer: int, *, skip_failed: bool = False) -> None:
        """Marks `layer` on every send, then raises the first send's error if any refused it. skip_failed: mark the
        sends that have not failed and raise nothing (one decode rank gone must not hold back the others; the
        group's state and error still say it failed)."""
        self._each(lambda s: s.layer_ready(layer), skip_failed)

    def all_ready(self, *, skip_failed: bool = False) -> None:
        """Marks every layer not marked yet on every send (skip_failed: as in layer_ready)."""
        self._each(lambda s: s.all_ready(), skip_failed)

    def abort(self, reason: str = "aborted") -> None:
        for s in self.sends:
            s.abort(reason)


class RecvGroup(_Group):
    """One request's recvs from several peers into the same blocks: a decode rank whose KV heads come from several
    prefill ranks (kvxfer.tp.rank_pairs). DONE when every recv is, FAILED as soon as one failed (cancel() the group
    so the other senders stop too), writes_over when no write of any of them can land any more: only then reuse the
    blocks."""

    kind = "recv"

    @property
    def recvs(self) -> list:
        return self._all

    def layer_done(self, layer: int) -> bool:
        return all(r.layer_done(layer) for r in self._all)

    def cancel(self, reason: str = "cancelled") -> None:
        """Recv.cancel on every recv of the group (no-op on those that completed)."""
        for r in self._all:
            r.cancel(reason)

    @property
    def peers_lost(self) -> bool:
        """True when a sender of the group is lost: the group can only fail."""
        return any(r.peer.lost for r in self._all)


class Recv(_Transfer):
    def cancel(self, reason: str = "cancelled") -> None:
        """Give up on this transfer (the request was aborted, preempted or timed out here). A pending recv fails at
        once with errors.Cancelled naming `reason` (waiters wake); the sender is told to post nothing more: its send
        fails with Cancelled, and a send of this id it has not started yet is refused. Writes it posted before may
        still land: reuse the blocks once `writes_over` is True (the sender said nothing more can arrive, or every
        write it had posted was counted here). No-op on a recv that completed; on one that already failed (say it
        timed out) it still stops the sender. Never blocks."""
        self._agent._c.cancel_recv(self.peer._h, self._h, str(reason))

    @property
    def writes_over(self) -> bool:
        """True once no write of this transfer can land in its blocks any more: it completed, the sender's process is
        gone, or it failed (or was cancelled) and the sender has since said it posted nothing or the receiver counted
        every write the sender had posted. A failed recv's blocks are safe to reuse only then. A recv ended by
        remove_peer (either side's) turns True once the live peer's answer (its posted totals) was counted; a peer
        that cannot answer (stopped, cut off) leaves it False while its process may live: writes it had posted could
        still land (same host: True once it exited)."""
        return self._h.writes_over
