"""Prefill worker: runs prompts through the model and pushes each request's KV into the decode worker's blocks,
layer by layer, while the following layers compute.

    worker = PrefillWorker(model, num_blocks, agent=agent)
    first_tokens, stats = worker.run(jobs, decode_peer)     # jobs: PrefillJob(xfer_id, prompt ids, dst block ids)

After layer l of the whole batch is in the local cache, every request's send marks layer l ready (a C++ call that
returns in microseconds); kvxfer posts those writes while layer l+1 computes. Local blocks are freed only once a
send is DONE (the decode side counted every byte), so no write can still read them.

If the batch fails, its unfinished sends are aborted (the decode side's recvs fail at once). Writes posted before
the abort may still be in flight when the blocks are freed: kvxfer has no drain handshake yet (see README).

serve() answers jobs from the router over a bootstrap channel (the node process: kvxfer/engine/node.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from kvxfer.engine.kv_cache import blocks_for
from kvxfer.errors import KvxferError


@dataclass
class PrefillJob:
    xfer_id: int
    prompt: list[int]
    dst_blocks: list[int]  # the decode worker's blocks for this prompt, in token order


class PrefillWorker:
    def __init__(self, model, num_blocks: int, block_size: int = 16, agent=None, timeout_s: float = 30.0):
        self.model, self.agent, self.timeout_s = model, agent, timeout_s
        self.cache = model.new_cache(num_blocks, block_size)
        if agent is not None:
            self.pool = agent.register_pool(self.cache.layers, self.cache.layout(), name="kv")

    def run(self, jobs: list[PrefillJob], peer) -> tuple[list[int], dict]:
        bs = self.cache.block_size
        tables = [self.cache.allocator.allocate(blocks_for(len(j.prompt), bs)) for j in jobs]
        sends = []
        try:
            for job, table in zip(jobs, tables):
                if len(job.dst_blocks) != len(table):
                    raise KvxferError(f"request {job.xfer_id}: {len(job.prompt)} prompt tokens need {len(table)} "
                                      f"blocks, the decode side gave {len(job.dst_blocks)}")
                sends.append(self.agent.send(peer, job.xfer_id, table, job.dst_blocks, timeout_s=self.timeout_s))
            t0 = time.perf_counter()
            logits = self.model.prefill([torch.tensor(j.prompt) for j in jobs], [torch.tensor(t) for t in tables],
                                        self.cache, on_layer=lambda layer: [s.layer_ready(layer) for s in sends])
            t_compute = time.perf_counter() - t0
            for s in sends:
                s.wait(timeout_s=self.timeout_s)
            t_exposed = time.perf_counter() - t0 - t_compute
        finally:
            for s in sends:
                s.abort("the prefill batch failed")  # no-op for sends that completed
            for table in tables:
                self.cache.allocator.free(table)
        stats = {"compute_s": t_compute, "exposed_s": t_exposed, "kv_bytes": sum(s.nbytes for s in sends),
                 "kv_bytes_each": [s.nbytes for s in sends]}
        return logits.argmax(-1).tolist(), stats


def serve(ch, model, num_blocks: int, block_size: int, transport: str, interface: str | None, timeout_s: float):
    """Answer {"cmd": "prefill", "jobs": [...]} with first tokens, until {"cmd": "bye"} or the channel closes."""
    import kvxfer

    agent = kvxfer.Agent(f"prefill-{os.getpid()}", transport=transport, interface=interface, timeout_s=timeout_s)
    worker = PrefillWorker(model, num_blocks, block_size, agent, timeout_s)
    peer = agent.add_peer(ch.exchange(agent.metadata()))
    agent.wait_connected(peer, timeout_s)
    while True:
        msg = ch.recv_json(timeout_s=3600)
        if msg.get("cmd") == "bye":
            ch.send_json({"ok": True})
            return
        jobs = [PrefillJob(j["xfer_id"], j["prompt"], j["dst_blocks"]) for j in msg["jobs"]]
        try:
            first, stats = worker.run(jobs, peer)
            ch.send_json({"ok": True, "first_tokens": first, "stats": stats})
        except KvxferError as e:
            ch.send_json({"ok": False, "error": f"{type(e).__name__}: {e}"})
