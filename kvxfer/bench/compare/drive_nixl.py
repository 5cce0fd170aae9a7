"""NIXL in a comparison, used the way vLLM's NIXL push connector (NixlPushConnector) uses it: each layer tensor
registered once as DRAM, one descriptor per (layer, K|V, block) chunk prepared once per side (prep_xfer_dlist), and
per request one make_prepped_xfer of the request's chunk indices as a WRITE carrying a notification; the sender
polls check_xfer_state, the receiver polls get_new_notifs for it. The agent is configured as vLLM configures it for
UCX (num_threads=4; progress thread and descriptor merging on, NIXL's defaults). Layer by layer (vLLM's NIXL
connectors move whole requests; a connector author could do this): one WRITE per layer as its compute ends, issued
from a writer thread as vLLM's push connector issues its WRITEs, each with a notification, the receiver waiting
for all of them.

options: backend (default UCX; UCX's transports follow UCX_TLS / UCX_NET_DEVICES, which the comparison sets),
num_threads (default 4, vLLM's), progress_thread (1 or 0; default 1, NIXL's)."""
from __future__ import annotations

import base64
import importlib
import os
import time

import numpy as np
from driver import deadline_passed, layers_on_a_worker, run, version_of

MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")  # the meta package, then its CUDA 12 / 13 builds


def import_nixl():
    errors = []
    for name in MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError("no NIXL Python API here (" + "; ".join(errors) + ")")


class Nixl:
    def __init__(self, role, req, pool, timeout_s, options):
        nixl = import_nixl()
        self.req, self.role, self.timeout_s = req, role, timeout_s
        self.name = f"compare-{role}"
        self.backend = options.get("backend", "UCX")
        config = nixl.nixl_agent_config(backends=[self.backend], num_threads=int(options.get("num_threads", 4)),
                                        enable_prog_thread=options.get("progress_thread", "1") == "1")
        self.agent = nixl.nixl_agent(self.name, config)
        self.bases = [layer.ctypes.data for layer in pool]
        self.reg = self.agent.register_memory(
            self.agent.get_reg_descs([(b, req.layer_bytes, 0, "") for b in self.bases], "DRAM"))
        src, dst = req.block_ids()
        self.src_index, self.dst_index = (req.chunk_index(ids).astype(np.int32) for ids in (src, dst))
        self.per_block = req.num_layers * 2  # chunks per request block, in chunk_index's (layer, plane, block) order

    def address(self):
        return {"metadata": base64.b64encode(self.agent.get_agent_metadata()).decode(), "bases": self.bases}

    def connect(self, peer):
        self.remote = self.agent.add_remote_agent(base64.b64decode(peer["metadata"]))
        self.about = {"version": version_of("nixl", "nixl-cu12", "nixl-cu13"),
                      "path": f"{self.backend} UCX_TLS={os.environ.get('UCX_TLS', 'default')}"}
        if self.role == "send":
            self.local_side = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._chunks(self.bases), "DRAM")
            self.remote_side = self.agent.prep_xfer_dlist(self.remote, self._chunks(peer["bases"]), "DRAM")
            self.agent.make_connection(self.remote)

    def _chunks(self, bases) -> np.ndarray:
        """Every chunk of a pool as an Nx3 (address, length, device) descriptor array, in chunk_index order."""
        addr = self.req.chunk_addresses(bases, np.arange(self.req.pool_blocks))
        return np.stack([addr, np.full(addr.size, self.req.chunk_bytes, np.uint64),
                         np.zeros(addr.size, np.uint64)], axis=1)

    def _indices(self, index, blocks):
        if blocks == self.req.req_blocks:
            return index
        return index.reshape(self.per_block, self.req.req_blocks)[:, :blocks].ravel()

    def arm(self, rid, blocks):
        pass

    def wait(self, rid, blocks):
        self._await_notifs({str(rid).encode()}, rid)

    def wait_layers(self, rid, blocks):
        self._await_notifs({f"{rid}:{layer}".encode() for layer in range(self.req.num_layers)}, rid)

    def _await_notifs(self, want: set, rid):
        start = time.perf_counter_ns()
        while want:
            for msgs in self.agent.get_new_notifs().values():
                want.difference_update(msgs)
            if want and deadline_passed(start, self.timeout_s):
                raise TimeoutError(f"NIXL notifications of request {rid} missing after {self.timeout_s} s: "
                                   f"{sorted(want)[:4]}")

    def send(self, rid, blocks):
        self._finish([self._post(self._indices(self.src_index, blocks), self._indices(self.dst_index, blocks),
                                 str(rid))], rid)

    def send_layers(self, rid, blocks, clock):
        """As vLLM's push connector does, the WRITEs go out from a writer thread of their own (its "nixl-push-writer"),
        which the forward only hands each finished layer to: one WRITE per layer, each with its own notification
        (transfers are not ordered against each other, so the receiver counts one per layer)."""
        per_layer = 2 * blocks
        src, dst = self._indices(self.src_index, blocks), self._indices(self.dst_index, blocks)

        def writer(layers):
            self._finish([self._post(src[layer * per_layer:(layer + 1) * per_layer],
                                     dst[layer * per_layer:(layer + 1) * per_layer], f"{rid}:{layer}")
                          for layer in layers], rid)

        return layers_on_a_worker(clock, writer, "nixl-push-writer", self.timeout_s)

    def _post(self, src, dst, notif: str):
        h = self.agent.make_prepped_xfer("WRITE", self.local_side, src, self.remote_side, dst, notif.encode())
        if self.agent.transfer(h) == "ERR":
            raise RuntimeError(f"NIXL refused the transfer {notif}")
        return h

    def _finish(self, handles, rid):
        start = time.perf_counter_ns()
        for h in handles:
            while (state := self.agent.check_xfer_state(h)) != "DONE":
                if state == "ERR":
                    raise RuntimeError(f"NIXL transfer of request {rid} failed")
                if deadline_passed(start, self.timeout_s):
                    raise TimeoutError(f"NIXL transfer of request {rid} not done within {self.timeout_s} s")
            self.agent.release_xfer_handle(h)

    def close(self):
        self.agent.deregister_memory(self.reg)


if __name__ == "__main__":
    run(Nixl)
