"""kvxfer in a comparison: one Agent per side, the pool registered once with its layout, one send() per request
(the plan of every chunk is built inside it), the receiver told by its recv reaching DONE. Layer by layer: the send
is opened before the forward and each layer marked ready (layer_ready) as its compute ends.

options: transport (default tcp; auto picks cma between two processes of one host)."""
from __future__ import annotations

import base64

import numpy as np
from driver import run


class Kvxfer:
    def __init__(self, role, req, pool, timeout_s, options):
        import kvxfer

        self.req, self.timeout_s, self.transport = req, timeout_s, options.get("transport", "tcp")
        self.agent = kvxfer.Agent(f"compare-{role}", transport=self.transport, interface="lo",
                                  timeout_s=timeout_s)
        layout = kvxfer.KVLayout.vllm_flash(req.num_layers, req.pool_blocks, req.block_tokens, req.kv_heads,
                                            req.head_dim, "bfloat16")
        if (layout.chunk_bytes, layout.block_stride, layout.plane_stride) != (
                req.chunk_bytes, req.chunk_bytes, req.pool_blocks * req.chunk_bytes):
            raise RuntimeError(f"kvxfer's vllm_flash layout {layout} is not the comparison's request layout")
        self.agent.register_pool(pool, layout)
        self.src, self.dst = (ids.astype(np.int32) for ids in req.block_ids())

    def address(self):
        return {"metadata": base64.b64encode(self.agent.metadata()).decode()}

    def connect(self, peer):
        self.peer = self.agent.add_peer(base64.b64decode(peer["metadata"]))
        self.agent.wait_connected(self.peer, self.timeout_s)
        self.about = {"version": kvxfer_version(), "path": f"{self.transport} ({self.peer.path})"}

    def arm(self, rid, blocks):
        self.recv = self.agent.recv(self.peer, rid, self.dst[:blocks])

    def wait(self, rid, blocks):
        self.recv.wait(timeout_s=self.timeout_s)

    def send(self, rid, blocks):
        s = self.agent.send(self.peer, rid, self.src[:blocks], self.dst[:blocks])
        s.all_ready()
        s.wait(timeout_s=self.timeout_s)

    def send_layers(self, rid, blocks, clock):
        s = self.agent.send(self.peer, rid, self.src[:blocks], self.dst[:blocks])  # before the forward starts
        for layer in clock.layers():
            s.layer_ready(layer)
        s.wait(timeout_s=self.timeout_s)
        return clock.last_ns

    def wait_layers(self, rid, blocks):
        self.wait(rid, blocks)

    def counters(self):
        return {k: v for k, v in self.agent.stats().items() if isinstance(v, (int, float))}

    def close(self):
        self.agent.close()


def kvxfer_version() -> str:
    import kvxfer

    return kvxfer.__version__


if __name__ == "__main__":
    run(Kvxfer)
