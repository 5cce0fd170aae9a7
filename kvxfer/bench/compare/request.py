"""The request every library in a comparison moves, and how its bytes are checked.

One prompt's paged KV cache in vLLM's FlashAttention layout: per layer one tensor [2 (K, V), pool blocks, block
tokens, KV heads, head dim], so the chunk of (layer, plane, block) sits at (plane * pool_blocks + block) *
chunk_bytes in that layer's tensor. A request moves the chunks of `req_blocks` random source blocks into as many
random destination blocks, every layer and plane. Numpy only: the NIXL and Mooncake drivers import this in
interpreters that must not load kvxfer (their bundled UCX next to kvxfer's would be two UCX in one process).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Request:
    num_layers: int = 32
    pool_blocks: int = 512
    req_blocks: int = 256
    block_tokens: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2
    seed: int = 2

    @property
    def chunk_bytes(self) -> int:
        return self.block_tokens * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def layer_bytes(self) -> int:
        return 2 * self.pool_blocks * self.chunk_bytes

    @property
    def chunks(self) -> int:
        return self.num_layers * 2 * self.req_blocks

    @property
    def nbytes(self) -> int:
        return self.chunks * self.chunk_bytes

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Request:
        return cls(**json.loads(text))

    def check(self) -> None:
        if self.req_blocks > self.pool_blocks or min(asdict(self).values()) < 1:
            raise ValueError(f"{self}: every field must be >= 1 and req_blocks <= pool_blocks")
        if self.chunk_bytes % 8:
            raise ValueError(f"chunk of {self.chunk_bytes} bytes: the byte pattern needs a multiple of 8")

    def block_ids(self, blocks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(source, destination) block ids: random, distinct, the same on both sides for a given seed. A smaller
        request (blocks) takes the first ids of the full one."""
        rng = np.random.default_rng(self.seed)
        src = rng.choice(self.pool_blocks, self.req_blocks, replace=False).astype(np.int64)
        dst = rng.choice(self.pool_blocks, self.req_blocks, replace=False).astype(np.int64)
        n = self.req_blocks if blocks is None else blocks
        return src[:n], dst[:n]

    def chunk_index(self, block_ids: np.ndarray) -> np.ndarray:
        """Index of each moved chunk among the pool's layers x 2 x pool_blocks chunks, in (layer, plane, block)
        order: what a library that describes one descriptor per chunk (NIXL) uses."""
        layer = np.arange(self.num_layers, dtype=np.int64)[:, None, None] * 2 * self.pool_blocks
        plane = np.arange(2, dtype=np.int64)[None, :, None] * self.pool_blocks
        return (layer + plane + block_ids[None, None, :]).ravel()

    def chunk_addresses(self, bases, block_ids: np.ndarray) -> np.ndarray:
        """Addresses of the moved chunks (same order as chunk_index) in a pool whose layer tensors start at
        bases."""
        base = np.asarray(bases, dtype=np.uint64)[:, None, None]
        plane = np.arange(2, dtype=np.uint64)[None, :, None] * np.uint64(self.pool_blocks * self.chunk_bytes)
        block = block_ids.astype(np.uint64)[None, None, :] * np.uint64(self.chunk_bytes)
        return (base + plane + block).ravel()

    # ---- pools -------------------------------------------------------------------------------------------------
    def source_layer(self, layer: int) -> np.ndarray:
        """The sender's layer tensor: every 8-byte word names its layer and position, so a chunk that lands in the
        wrong place (or a stale one) cannot pass for the right one."""
        words = np.arange(self.layer_bytes // 8, dtype=np.uint64) * _MIX
        words ^= np.uint64(layer + 1) << np.uint64(56)
        return words.view(np.uint8)

    def source_pool(self) -> list[np.ndarray]:
        return [self.source_layer(layer) for layer in range(self.num_layers)]

    def destination_pool(self) -> list[np.ndarray]:
        """Zeroed and faulted in now, so no library pays first-touch page faults inside its timed run."""
        pool = [np.empty(self.layer_bytes, np.uint8) for _ in range(self.num_layers)]
        for layer in pool:
            layer.fill(0)
        return pool

    def clear(self, pool: list[np.ndarray], blocks: int | None = None) -> None:
        """Zeroes the destination chunks a request of `blocks` blocks (default: the full one, which covers every
        smaller one) writes, so that each request must land anew."""
        _, dst = self.block_ids(blocks)
        for layer in pool:
            layer.reshape(2, self.pool_blocks, self.chunk_bytes)[:, dst] = 0

    def verify(self, pool: list[np.ndarray], blocks: int | None = None, everywhere: bool = True) -> str:
        """'' if every moved chunk holds its source's bytes and (everywhere) every other chunk of the pool is zero,
        else what is wrong (first layer found)."""
        src, dst = self.block_ids(blocks)
        untouched = np.ones(self.pool_blocks, bool)
        untouched[dst] = False
        for layer, got in enumerate(pool):
            got = got.reshape(2, self.pool_blocks, self.chunk_bytes)
            want = self.source_layer(layer).reshape(2, self.pool_blocks, self.chunk_bytes)[:, src]
            bad = ~(got[:, dst] == want).all(axis=2)
            if bad.any():
                plane, i = (int(x[0]) for x in np.nonzero(bad))
                return (f"layer {layer} {'KV'[plane]} block {int(dst[i])}: not the bytes of source block "
                        f"{int(src[i])} ({int(bad.sum())} chunks of this layer wrong)")
            if everywhere and got[:, untouched].any():
                return f"layer {layer}: bytes written outside the request's destination blocks"
        return ""
