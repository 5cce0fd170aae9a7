"""Prefill worker: runs prompts through the model and pushes each request's KV into the decode worker's blocks,
layer by layer, while the following layers compute.

    worker = PrefillWorker(model, num_blocks, agent=agent)
    batch = worker.compute(jobs, decode_peer)   # jobs: PrefillJob(xfer_id, prompt ids, dst block ids)
    ... batch.first_tokens exist now: stream them ...
    stats = worker.finish(batch)                # waits for the sends, frees the local blocks

After layer l of the whole batch is in the local cache, every request's send marks layer l ready (a C++ call that
returns in microseconds); kvxfer posts those writes while layer l+1 computes. The first tokens leave as soon as
the compute ends; only then does the worker wait for the sends. Local blocks are freed only once a send ended
(DONE: the decode side counted every byte), so no write can still read them.

If the batch fails, or a send does not end within timeout_s, its unfinished sends are aborted (the decode side's
recvs fail at once), and the local blocks are freed once the decode side has counted every write posted before the
abort (Send.writes_over; at most 5 s later regardless). The decode side holds its blocks until Recv.writes_over
(or the router relays that the send ended).
A request the decode side cancelled (its Recv.cancel) fails alone: its send is refused at opening or fails where it
stands, and the batch's other requests go on.

On a GPU the model's per-layer hook runs when the layer's kernels are queued, not when they ran, so the worker
records each layer on the stream with a kvxfer LayerSignal: its watcher thread marks the layer ready once the GPU
got there, and the host keeps queuing layers (no Python on that path, no stream waiting on the network). A build or
machine where signals cannot use the GPU falls back to waiting for the stream after each layer (`layer_marks` says
which).

serve() answers jobs from the router over a bootstrap channel (the node process: kvxfer/engine/node.py).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from kvxfer.engine.kv_cache import blocks_for
from kvxfer.errors import Cancelled, KvxferError


@dataclass
class PrefillJob:
    xfer_id: int
    prompt: list[int]
    dst_blocks: list[int]  # the decode worker's blocks for this prompt, in token order


class PrefillWorker:
    def __init__(self, model, num_blocks: int, block_size: int = 16, agent=None, timeout_s: float = 30.0,
                 layer_delay_s: float = 0.0):
        self.model, self.agent, self.timeout_s, self.layer_delay_s = model, agent, timeout_s, layer_delay_s
        self.cache = model.new_cache(num_blocks, block_size)
        self.signal, self.layer_marks = None, "host"  # host: the hook runs after the layer computed
        if agent is not None:
            self.pool = agent.register_pool(self.cache.layers, self.cache.layout(), name="kv")
            if model.device.type == "cuda":
                self.signal, self.layer_marks = gpu_layer_signal(agent, model.cfg.num_layers)
        # A layer's record goes on the stream after its kernels (tests without a GPU play the device with
        # LayerSignal._host_record here).
        self._record = lambda layer: self.signal.record(layer, self._stream())

    def _stream(self):
        return torch.cuda.current_stream(self.model.device)

    def run(self, jobs: list[PrefillJob], peer) -> tuple[list[int], dict]:
        """compute() then finish(): first tokens and the transfer stats, once every send ended."""
        batch = self.compute(jobs, peer)
        return batch.first_tokens, self.finish(batch)

    def compute(self, jobs: list[PrefillJob], peer, on_layer=None) -> "Batch":
        """Prefill the batch, marking each layer ready on every send as soon as it is in the cache. Returns when
        the first tokens exist; the sends may still be moving the last layers (finish() waits for them).
        on_layer(l), if given, runs after layer l was marked (tests use it to inject faults at a known point)."""
        bs = self.cache.block_size
        tables = [self.cache.allocator.allocate(blocks_for(len(j.prompt), bs)) for j in jobs]
        sends = []
        try:
            for job, table in zip(jobs, tables):
                if len(job.dst_blocks) != len(table):
                    raise KvxferError(f"request {job.xfer_id}: {len(job.prompt)} prompt tokens need {len(table)} "
                                      f"blocks, the decode side gave {len(job.dst_blocks)}")
                try:
                    sends.append(self.agent.send(peer, job.xfer_id, table, job.dst_blocks, timeout_s=self.timeout_s))
                except Cancelled as e:  # the decode side gave this request up before we got to it: skip it alone
                    sends.append(_RefusedSend(e))

            recorded = 0

            def layer_done(layer: int) -> None:
                nonlocal recorded
                if self.signal is not None:
                    self._record(layer)
                    recorded += 1
                else:
                    if self.layer_marks == "stream sync":
                        self._stream().synchronize()
                    for s in sends:
                        try:
                            s.layer_ready(layer)
                        except KvxferError:
                            pass  # that send failed (its receiver cancelled it, ...): finish() reports it; the
                            # batch's other requests go on
                if on_layer is not None:
                    on_layer(layer)
                if self.layer_delay_s:
                    time.sleep(self.layer_delay_s)

            if self.signal is not None:
                self.signal.bind([s for s in sends if not isinstance(s, _RefusedSend)])  # marked by the records
            t0 = time.perf_counter()
            try:
                logits = self.model.prefill([torch.tensor(j.prompt) for j in jobs],
                                            [torch.tensor(t) for t in tables], self.cache, on_layer=layer_done)
                first_tokens = logits.argmax(-1).tolist()  # on a GPU: waits until the forward ran
            except BaseException:
                if self.signal is not None:
                    # A forward that failed half-way still records every layer once, or the next bind would be off
                    # by one. The sends are aborted first: the watcher's marks then meet failed sends and move no
                    # layer the model never computed.
                    self._abort(sends, "the prefill batch failed")
                    for layer in range(recorded, self.model.cfg.num_layers):
                        self._record(layer)
                raise
            t_end = time.perf_counter()
        except BaseException:
            self._release(sends, tables, "the prefill batch failed")
            raise
        return Batch(jobs, sends, tables, first_tokens, t_end - t0, t_end)

    def finish(self, batch: "Batch") -> dict:
        """Wait for every send to end, then free the local blocks. Per request: KV bytes, and the KV time not hidden
        behind prefill: from the end of the batch's compute (the first token exists) to the send being DONE, as
        kvxfer's progress thread stamped it (Send.finished_at: not when this thread, busy streaming first tokens,
        got round to looking) — an upper bound still, DONE needs the decode side's confirmation to come back. A
        failed send reports its error."""
        exposed, errors = [], []
        deadline = batch.t_end + self.timeout_s
        for s in batch.sends:  # in posting order: later sends are usually done by the time earlier ones are
            try:
                s.wait(timeout_s=max(0.0, deadline - time.perf_counter()))
                exposed.append(max(0.0, (s.finished_at or time.perf_counter()) - batch.t_end))
                errors.append(None)
            except KvxferError as e:
                exposed.append(None)
                errors.append(f"{type(e).__name__}: {e}")
        self._release(batch.sends, batch.tables, "the prefill side gave up waiting for this send")
        return {"compute_s": batch.compute_s, "exposed_s": exposed, "errors": errors,
                "kv_bytes_each": [s.nbytes for s in batch.sends], "kv_bytes": sum(s.nbytes for s in batch.sends),
                "paths": [s.path for s in batch.sends]}

    @staticmethod
    def _abort(sends, reason: str) -> None:
        for s in sends:
            s.abort(reason)  # no-op for sends that ended

    def _release(self, sends, tables, reason: str, drain_s: float = 5.0) -> None:
        """Abort what is still live, then free the local blocks once no write of the sends still reads them
        (Send.writes_over), waiting at most drain_s (a receiver that never answers an abort): a block handed to the
        next batch while a write still reads it would send that batch's KV to the failed request's receiver."""
        self._abort(sends, reason)
        deadline = time.monotonic() + drain_s
        while not all(s.writes_over for s in sends) and time.monotonic() < deadline:
            time.sleep(0.0005)
        for table in tables:
            self.cache.allocator.free(table)


def gpu_layer_signal(agent, num_layers: int):
    """(LayerSignal, "layer signal") where kvxfer's signals can use this GPU; else (None, "stream sync") and why,
    once on stderr: each layer then waits for the stream before it is marked ready."""
    from kvxfer import signals

    usable, why = signals.cuda_status()
    if usable:
        return signals.LayerSignal(agent, num_layers), "layer signal"
    print(f"prefill: kvxfer layer signals cannot use the GPU ({why}); marking each layer ready after a stream "
          "synchronize instead (the host stops queuing work until each layer ran)", file=sys.stderr, flush=True)
    return None, "stream sync"


class _RefusedSend:
    """A request of the batch whose send the decode side refused before it opened (Recv.cancel): computed with the
    others, nothing sent; finish() reports its error."""

    nbytes, path, finished_at, writes_over = 0, "none", None, True

    def __init__(self, error: KvxferError):
        self.error = error

    def layer_ready(self, layer: int) -> None:
        pass

    def abort(self, reason: str = "") -> None:
        pass

    def wait(self, timeout_s: float = 0.0) -> None:
        raise self.error


@dataclass
class Batch:
    jobs: list[PrefillJob]
    sends: list
    tables: list[list[int]]  # local block ids per job
    first_tokens: list[int]
    compute_s: float
    t_end: float  # perf_counter() when the compute ended


def serve(ch, model, num_blocks: int, block_size: int, transport: str, interface: str | None, timeout_s: float,
          layer_delay_s: float = 0.0):
    """Answer {"cmd": "prefill", "jobs": [...]} with {"type": "first", ...} as soon as the first tokens exist, then
    {"type": "kv", ...} once every send ended; until {"cmd": "bye"} or the channel closes."""
    import kvxfer
    from kvxfer.engine.node import connect_replacement

    agent = kvxfer.Agent(f"prefill-{os.getpid()}", transport=transport, interface=interface, timeout_s=timeout_s)
    worker = PrefillWorker(model, num_blocks, block_size, agent, timeout_s, layer_delay_s)
    peer = agent.add_peer(ch.exchange(agent.metadata()))
    agent.wait_connected(peer, max(timeout_s, 30.0))
    blocks = {"free_blocks": num_blocks, "num_blocks": num_blocks}
    ch.send_json({"type": "blocks", **blocks})
    while True:
        msg = ch.recv_json(timeout_s=24 * 3600)
        if msg.get("cmd") == "bye":
            ch.send_json({"ok": True})
            return
        if msg.get("cmd") == "new_peer":  # a replacement decode node: write into its blocks from now on
            new = connect_replacement(agent, ch, timeout_s, "prefill: the replacement decode node")
            peer = new if new is not None else peer
            continue
        jobs = [PrefillJob(j["xfer_id"], j["prompt"], j["dst_blocks"]) for j in msg["jobs"]]
        try:
            batch = worker.compute(jobs, peer)
        except KvxferError as e:
            blocks["free_blocks"] = worker.cache.allocator.num_free
            ch.send_json({"type": "first", "ok": False, "error": f"{type(e).__name__}: {e}", **blocks})
            continue
        blocks["free_blocks"] = worker.cache.allocator.num_free
        ch.send_json({"type": "first", "ok": True, "first_tokens": batch.first_tokens, "compute_s": batch.compute_s,
                      **blocks})
        stats = worker.finish(batch)
        blocks["free_blocks"] = worker.cache.allocator.num_free
        ch.send_json({"type": "kv", **stats, **blocks})
