"""Decode worker: continuous batching over sequences whose KV arrived from a prefill worker.

    worker = DecodeWorker(model, num_blocks, agent=agent)
    dst = worker.admit(seq_id, prompt_len, max_tokens, peer)   # allocates blocks, opens the kvxfer recv
    ... the prefill worker writes the prompt's KV into dst ...
    worker.set_first_token(seq_id, token)                        # the prefill's sampled token
    events = worker.step()                                       # [(seq_id, token, finished)] for this step

A sequence joins the running batch only when its recv is complete (an O(1) poll each step). A recv that fails or
times out ends that sequence with its error and frees its blocks; the others keep running. Blocks are freed on
finish, cancel and failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvxfer.engine.kv_cache import blocks_for
from kvxfer.errors import KvxferError


@dataclass
class Sequence:
    seq_id: int
    prompt_len: int
    max_tokens: int
    blocks: list[int]
    recv: object = None
    tokens: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting -> running -> finished | failed
    error: str | None = None


class DecodeWorker:
    def __init__(self, model, num_blocks: int, block_size: int = 16, agent=None, eos_id: int | None = None,
                 timeout_s: float = 30.0):
        self.model, self.agent, self.eos_id, self.timeout_s = model, agent, eos_id, timeout_s
        self.cache = model.new_cache(num_blocks, block_size)
        if agent is not None:
            agent.register_pool(self.cache.layers, self.cache.layout(), name="kv")
        self.seqs: dict[int, Sequence] = {}
        self._quarantine: list[tuple[object, list[int]]] = []  # (live recv, its blocks): freed when it ends

    def admit(self, seq_id: int, prompt_len: int, max_tokens: int, peer) -> list[int]:
        blocks = self.cache.allocator.allocate(blocks_for(prompt_len + max_tokens, self.cache.block_size))
        prompt_blocks = blocks[: blocks_for(prompt_len, self.cache.block_size)]
        seq = Sequence(seq_id, prompt_len, max_tokens, blocks)
        try:
            seq.recv = self.agent.recv(peer, seq_id, prompt_blocks, timeout_s=self.timeout_s)
        except KvxferError:
            self.cache.allocator.free(blocks)
            raise
        self.seqs[seq_id] = seq
        return prompt_blocks

    def set_first_token(self, seq_id: int, token: int) -> None:
        self.seqs[seq_id].tokens.append(int(token))

    def cancel(self, seq_id: int, why: str = "cancelled") -> None:
        seq = self.seqs.get(seq_id)
        if seq and seq.state in ("waiting", "running"):
            self._end(seq, "failed", why)

    def step(self) -> list[tuple[int, int | None, bool]]:
        self._release_quarantine()
        events = self._admit_arrived()
        running = [s for s in self.seqs.values() if s.state == "running"]
        if running:
            tokens = torch.tensor([s.tokens[-1] for s in running])
            positions = torch.tensor([s.prompt_len + len(s.tokens) - 1 for s in running])
            tables = [torch.tensor(s.blocks) for s in running]
            nxt = self.model.decode(tokens, positions, tables, self.cache).argmax(-1).tolist()
            for s, t in zip(running, nxt):
                s.tokens.append(t)
                done = self._is_done(s)
                if done:
                    self._end(s, "finished")
                events.append((s.seq_id, t, done))
        return events

    def _admit_arrived(self) -> list[tuple[int, int | None, bool]]:
        events = []
        for s in self.seqs.values():
            if s.state != "waiting":
                continue
            err = s.recv.error
            if err is not None:  # checked before the first token: a prefill that died never sends one
                self._end(s, "failed", f"KV transfer failed: {type(err).__name__}: {err}")
                events.append((s.seq_id, None, True))
            elif s.recv.done and s.tokens:
                s.state = "running"
                done = self._is_done(s)
                events.append((s.seq_id, s.tokens[0], done))
                if done:
                    self._end(s, "finished")
        return events

    def _is_done(self, seq: Sequence) -> bool:
        return len(seq.tokens) >= seq.max_tokens or seq.tokens[-1] == self.eos_id

    def _end(self, seq: Sequence, state: str, error: str | None = None) -> None:
        seq.state, seq.error = state, error
        if seq.recv is not None and not seq.recv.done and seq.recv.error is None:
            # Cancelled while its KV may still be arriving: a late write must not land in a block that was handed
            # to another request, so the blocks wait until the transfer ends (done, failed or timed out).
            self._quarantine.append((seq.recv, seq.blocks))
        else:
            self.cache.allocator.free(seq.blocks)
        seq.blocks = []

    def _release_quarantine(self) -> None:
        keep = []
        for recv, blocks in self._quarantine:
            if recv.done or recv.error is not None:
                self.cache.allocator.free(blocks)
            else:
                keep.append((recv, blocks))
        self._quarantine = keep

    def pop_finished(self) -> list[Sequence]:
        done = [s for s in self.seqs.values() if s.state in ("finished", "failed")]
        for s in done:
            del self.seqs[s.seq_id]
        return done
