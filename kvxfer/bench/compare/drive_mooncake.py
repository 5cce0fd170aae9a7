"""Mooncake's Transfer Engine in a comparison, used the way SGLang's Mooncake backend uses it: each layer tensor
registered once, per request the chunks' source and destination addresses with runs contiguous on both sides
merged (SGLang's group_concurrent_contiguous), one batch_transfer_sync WRITE of them carrying a TransferNotify; the
receiver polls get_notifies for it. The engine starts with P2P handshakes (no metadata server). SGLang sends a
request as one batch by default, but Mooncake's tcp transport refuses a batch of 4,096 writes or more here (its lane
queue fills: "TCP lane queue-full rejection" in its log, the batch returns -1; 2,048 and 1,024 pass), so batches
are bounded as SGLang's max_transfer_batch_indices does, and run one after another.

options: protocol (default tcp, the transport of the non-CUDA wheel without an RDMA NIC), batch (most writes per
batch_transfer_sync, default 1024)."""
from __future__ import annotations

import time

import numpy as np
from driver import deadline_passed, layers_on_a_worker, run, version_of


class Mooncake:
    def __init__(self, role, req, pool, timeout_s, options):
        from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode

        self.notify, self.write = TransferNotify, TransferOpcode.Write
        self.req, self.role, self.timeout_s = req, role, timeout_s
        self.engine = TransferEngine()
        self.protocol = options.get("protocol", "tcp")
        self.batch = int(options.get("batch", 1024))
        rc = self.engine.initialize("127.0.0.1", "P2PHANDSHAKE", self.protocol, "")
        if rc != 0:
            raise RuntimeError(f"Mooncake TransferEngine.initialize returned {rc}")
        self.bases = [layer.ctypes.data for layer in pool]
        for b in self.bases:
            if self.engine.register_memory(b, req.layer_bytes) != 0:
                raise RuntimeError("Mooncake register_memory failed")
        self.src, self.dst = req.block_ids()

    def address(self):
        return {"endpoint": f"127.0.0.1:{self.engine.get_rpc_port()}", "bases": self.bases}

    def connect(self, peer):
        self.peer = peer
        self.about = {"version": version_of("mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine",
                                            "mooncake-transfer-engine-cuda13"), "path": self.protocol}

    def arm(self, rid, blocks):
        pass

    def wait(self, rid, blocks):
        want, start = str(rid), time.perf_counter_ns()
        while not any(n.msg == want for n in self.engine.get_notifies()):
            if deadline_passed(start, self.timeout_s):
                raise TimeoutError(f"no Mooncake notification for request {rid} within {self.timeout_s} s")

    def wait_layers(self, rid, blocks):
        self.wait(rid, blocks)

    def send(self, rid, blocks):
        src = self.req.chunk_addresses(self.bases, self.src[:blocks])
        dst = self.req.chunk_addresses(self.peer["bases"], self.dst[:blocks])
        self._write(rid, *merge_runs(src, dst, self.req.chunk_bytes), last=True)

    def send_layers(self, rid, blocks, clock):
        """As SGLang's transfer worker threads do: the forward hands each finished layer to a worker thread, which
        writes the layers one after the other; the last layer's batch carries the notification (its batch
        completes after every earlier one, so the receiver hears of the request once all of it landed)."""
        src = self.req.chunk_addresses(self.bases, self.src[:blocks]).reshape(self.req.num_layers, -1)
        dst = self.req.chunk_addresses(self.peer["bases"], self.dst[:blocks]).reshape(self.req.num_layers, -1)

        def worker(layers):
            for layer in layers:
                self._write(rid, *merge_runs(src[layer], dst[layer], self.req.chunk_bytes),
                            last=layer == self.req.num_layers - 1)

        return layers_on_a_worker(clock, worker, "mooncake-transfer-worker", self.timeout_s)

    def _write(self, rid, src, dst, lengths, last: bool):
        for start in range(0, src.size, self.batch):  # one batch after the other; the request's last notifies
            end = min(src.size, start + self.batch)
            note = self.notify(f"compare-{self.role}", str(rid)) if last and end == src.size else None
            rc = self.engine.batch_transfer_sync(self.peer["endpoint"], src[start:end].tolist(),
                                                 dst[start:end].tolist(), lengths[start:end].tolist(), self.write,
                                                 note)
            if rc != 0:
                raise RuntimeError(f"Mooncake batch_transfer_sync of request {rid} (writes {start}-{end - 1} of "
                                   f"{src.size}) returned {rc}")

    def close(self):
        for b in self.bases:
            self.engine.unregister_memory(b)


def merge_runs(src: np.ndarray, dst: np.ndarray, chunk: int):
    """Chunks that follow each other on both sides become one write."""
    step = np.uint64(chunk)
    starts = np.ones(src.size, bool)
    starts[1:] = (src[1:] != src[:-1] + step) | (dst[1:] != dst[:-1] + step)
    first = np.flatnonzero(starts)
    lengths = np.diff(np.append(first, src.size)).astype(np.uint64) * step
    return src[first], dst[first], lengths


if __name__ == "__main__":
    run(Mooncake)
