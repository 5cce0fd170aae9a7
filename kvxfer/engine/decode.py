"""Decode worker: continuous batching over sequences whose KV arrived from a prefill worker (disaggregated) or was
computed here (colocated).

    worker = DecodeWorker(model, num_blocks, agent=agent)
    dst = worker.admit(seq_id, prompt_len, max_tokens)         # allocates blocks
    worker.expect(seq_id, peer)                                  # opens the kvxfer recv (or admit(..., peer))
    ... the prefill worker writes the prompt's KV into dst ...
    worker.set_first_token(seq_id, token)                        # the prefill's sampled token
    events = worker.step()                                       # [(seq_id, token | None, finished)]

    events = worker.prefill_local([(seq_id, prompt_ids, max_tokens), ...])   # colocated: KV is already here

Threads: admit() and expect() may run on another thread than step() (the decode node answers them on its channel
reader, so they never wait for a decode step); `lock` guards the block allocator and the sequence table. Everything
else runs on the stepping thread.

A sequence joins the running batch only when its recv is complete (an O(1) poll each step) and its first token is
known. A recv that fails or times out ends that sequence with its error; the others keep running.

Blocks are freed on finish, cancel and failure — but never while the sender might still write into them. A
sequence that ended before its KV fully arrived cancels its recv (Recv.cancel: the sender posts nothing more) and keeps
its blocks in quarantine until one of: the recv completed (the sender counted every chunk: it writes nothing more),
kvxfer says its writes are over (Recv.writes_over: the sender said nothing more can arrive, or every write it had
posted was counted), the sender process is gone (PeerLost), or the router said the
sender's transfer ended (sender_done(), sent once the prefill side reported its send finished or failed).
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

import torch

from kvxfer.engine.kv_cache import blocks_for
from kvxfer.errors import InvalidArgument, KvxferError, PeerLost


class SeqState(enum.Enum):
    WAITING = "waiting"    # blocks allocated; KV or first token not here yet
    RUNNING = "running"    # in the decode batch
    FINISHED = "finished"  # max_tokens or EOS reached
    FAILED = "failed"      # transfer failed, timed out or cancelled; `error` says which


@dataclass
class Sequence:
    seq_id: int
    prompt_len: int
    max_tokens: int
    blocks: list[int]
    recv: object = None  # kvxfer Recv, once expect() opened it
    local: bool = False  # the KV was computed in this process (colocated): no sender
    tokens: list[int] = field(default_factory=list)
    state: SeqState = SeqState.WAITING
    error: str | None = None
    sender_done: bool = False  # the sender's transfer ended: no write into `blocks` can come any more
    # The handoff, on time.perf_counter()'s clock (the decode trace writes them): the prefill's first token known
    # here, the sequence joined the batch, its first decoded token.
    first_token_at: float | None = None
    joined_at: float | None = None
    decoded_at: float | None = None


class DecodeWorker:
    def __init__(self, model, num_blocks: int, block_size: int = 16, agent=None, eos_id: int | None = None,
                 timeout_s: float = 30.0):
        self.model, self.agent, self.eos_id, self.timeout_s = model, agent, eos_id, timeout_s
        self.cache = model.new_cache(num_blocks, block_size)
        if agent is not None:
            agent.register_pool(self.cache.layers, self.cache.layout(), name="kv")
        self.lock = threading.Lock()
        self.seqs: dict[int, Sequence] = {}
        self._quarantine: dict[int, Sequence] = {}  # ended sequences whose blocks a sender may still write
        self.last_step_batch = 0  # sequences the last step() decoded (for traces)

    @property
    def num_free_blocks(self) -> int:
        with self.lock:
            return self.cache.allocator.num_free

    # ---- admission ----------------------------------------------------------------------------------------
    def admit(self, seq_id: int, prompt_len: int, max_tokens: int, peer=None) -> list[int]:
        """Allocate blocks for prompt + output. Returns the prompt's block ids, in token order. With `peer`, also
        opens the recv (else expect() does, once the prefill starts: the recv's deadline then times the transfer,
        not the wait for a prefill slot)."""
        bs = self.cache.block_size
        with self.lock:
            blocks = self.cache.allocator.allocate(blocks_for(prompt_len + max_tokens, bs))
            self.seqs[seq_id] = Sequence(seq_id, prompt_len, max_tokens, blocks)
        if peer is not None:
            try:
                self.expect(seq_id, peer)
            except KvxferError:
                with self.lock:
                    self.cache.allocator.free(self.seqs.pop(seq_id).blocks)
                raise
        return blocks[: blocks_for(prompt_len, bs)]

    def expect(self, seq_id: int, peer) -> None:
        """Open the kvxfer recv of an admitted sequence's prompt KV (before or after the data arrives)."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.state is not SeqState.WAITING or seq.recv is not None:
            raise InvalidArgument(f"sequence {seq_id} is not admitted and waiting for its KV; admit() it first")
        prompt_blocks = seq.blocks[: blocks_for(seq.prompt_len, self.cache.block_size)]
        seq.recv = self.agent.recv(peer, seq_id, prompt_blocks, timeout_s=self.timeout_s)

    def prefill_local(self, items: list[tuple[int, list[int], int]]) -> list[tuple[int, int | None, bool]]:
        """Colocated: allocate, run the prompts through the model into our own cache, and start decoding them.
        A prompt that does not fit ends with its error event; the others run."""
        events, batch = [], []
        bs = self.cache.block_size
        for seq_id, prompt, max_tokens in items:
            with self.lock:
                try:
                    blocks = self.cache.allocator.allocate(blocks_for(len(prompt) + max_tokens, bs))
                except KvxferError as e:
                    events.append((seq_id, None, True))
                    self.seqs[seq_id] = Sequence(seq_id, len(prompt), max_tokens, [], local=True,
                                                 state=SeqState.FAILED, error=str(e))
                    continue
                seq = self.seqs[seq_id] = Sequence(seq_id, len(prompt), max_tokens, blocks, local=True)
            batch.append((seq, prompt))
        if batch:
            logits = self.model.prefill([torch.tensor(p) for _, p in batch],
                                        [torch.tensor(s.blocks) for s, _ in batch], self.cache)
            for (seq, _), token in zip(batch, logits.argmax(-1).tolist()):
                seq.tokens.append(token)
                seq.state = SeqState.RUNNING
                events.append(self._emit(seq, token))
        return events

    def set_first_token(self, seq_id: int, token: int) -> None:
        seq = self.seqs.get(seq_id)
        if seq is not None and not seq.tokens:
            seq.tokens.append(int(token))
            seq.first_token_at = time.perf_counter()

    # ---- ending -------------------------------------------------------------------------------------------
    def cancel(self, seq_id: int, why: str = "cancelled") -> bool:
        """End a live sequence with `why`. Returns False if it had already ended (or never existed)."""
        seq = self.seqs.get(seq_id)
        if seq is None or seq.state not in (SeqState.WAITING, SeqState.RUNNING):
            return False
        self._end(seq, SeqState.FAILED, why)
        return True

    def sender_done(self, seq_id: int) -> None:
        """The sender's transfer for seq_id ended (done, failed or never started): its blocks may be reused."""
        with self.lock:
            seq = self.seqs.get(seq_id) or self._quarantine.get(seq_id)
            if seq is not None:
                seq.sender_done = True
        self._release_quarantine()

    def _end(self, seq: Sequence, state: SeqState, error: str | None = None) -> None:
        seq.state, seq.error = state, error
        if seq.recv is not None and not seq.recv.done:
            seq.recv.cancel(error or state.value)  # the sender stops writing; writes_over then frees the blocks
        with self.lock:
            if self._writes_over(seq):
                self.cache.allocator.free(seq.blocks)
                seq.blocks = []
            else:
                self._quarantine[seq.seq_id] = seq

    @staticmethod
    def _writes_over(seq: Sequence) -> bool:
        r = seq.recv
        return seq.local or seq.sender_done or (r is not None and (r.done or r.writes_over or isinstance(r.error, PeerLost)))

    def _release_quarantine(self) -> None:
        with self.lock:
            for seq_id, seq in list(self._quarantine.items()):
                if self._writes_over(seq):
                    self.cache.allocator.free(seq.blocks)
                    seq.blocks = []
                    del self._quarantine[seq_id]

    # ---- stepping -----------------------------------------------------------------------------------------
    def step(self) -> list[tuple[int, int | None, bool]]:
        """Join arrived sequences, then one decode step for the running batch."""
        self._release_quarantine()
        with self.lock:
            seqs = list(self.seqs.values())
        events = self._join_arrived(seqs)
        running = [s for s in seqs if s.state is SeqState.RUNNING]
        self.last_step_batch = len(running)
        if running:
            tokens = torch.tensor([s.tokens[-1] for s in running])
            positions = torch.tensor([s.prompt_len + len(s.tokens) - 1 for s in running])
            tables = [torch.tensor(s.blocks) for s in running]
            nxt = self.model.decode(tokens, positions, tables, self.cache).argmax(-1).tolist()
            now = time.perf_counter()
            for s, t in zip(running, nxt):
                s.tokens.append(t)
                if s.decoded_at is None:
                    s.decoded_at = now
                events.append(self._emit(s, t))
        return events

    def _join_arrived(self, seqs: list[Sequence]) -> list[tuple[int, int | None, bool]]:
        events = []
        for s in seqs:
            if s.state is not SeqState.WAITING or s.recv is None:
                continue
            err = s.recv.error
            if err is not None:  # checked before the first token: a prefill that died never sends one
                self._end(s, SeqState.FAILED, f"KV transfer from the prefill node failed: {type(err).__name__}: {err}")
                events.append((s.seq_id, None, True))
            elif s.recv.done and s.tokens:
                s.state = SeqState.RUNNING
                s.joined_at = time.perf_counter()
                events.append(self._emit(s, s.tokens[0]))
        return events

    def _emit(self, seq: Sequence, token: int) -> tuple[int, int, bool]:
        done = len(seq.tokens) >= seq.max_tokens or token == self.eos_id
        if done:
            self._end(seq, SeqState.FINISHED)
        return seq.seq_id, token, done

    def pop_finished(self) -> list[Sequence]:
        with self.lock:
            done = [s for s in self.seqs.values() if s.state in (SeqState.FINISHED, SeqState.FAILED)]
            for s in done:
                del self.seqs[s.seq_id]
        return done
