"""Paged KV cache and its block allocator.

Per layer one tensor [2, num_blocks, block_size, kv_heads, head_dim] — exactly kvxfer's `vllm_flash` layout, so
the tensors register with an Agent as they are and a peer can write whole blocks of a request into them.
Token t of a sequence lives in block block_table[t // block_size] at offset t % block_size.
"""
from __future__ import annotations

import torch

from kvxfer.errors import InvalidArgument
from kvxfer.layout import KVLayout


class OutOfBlocks(InvalidArgument):
    """The cache has fewer free blocks than a request needs; retry once requests finish."""


class BlockAllocator:
    """Free list of block ids. Blocks are owned by one request at a time; free() returns them."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._owned: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks but only {len(self._free)} of {self.num_blocks} are free")
        ids = [self._free.pop() for _ in range(n)]
        self._owned.update(ids)
        return ids

    def free(self, ids) -> None:
        for b in ids:
            if b not in self._owned:
                raise InvalidArgument(f"block {b} is not allocated (double free or foreign id)")
            self._owned.remove(b)
            self._free.append(b)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.layers = [torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                                   device=device) for _ in range(num_layers)]
        if self.layers[0].is_cuda:  # zeroed before a peer may write (kvxfer's writes are not ordered after torch's)
            torch.cuda.synchronize(self.layers[0].device)
        self.allocator = BlockAllocator(num_blocks)

    def layout(self) -> KVLayout:
        return KVLayout.vllm_flash(self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads,
                                   self.head_dim, str(self.dtype).replace("torch.", ""))

    def slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot index (block * block_size + offset) of each position."""
        return block_table[positions // self.block_size] * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kv = self.layers[layer].view(2, -1, self.num_kv_heads, self.head_dim)
        kv[0, slots] = k.to(self.dtype)
        kv[1, slots] = v.to(self.dtype)

    def gather_blocks(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole blocks: blocks [B, n] -> two [B, n * block_size, kv_heads, head_dim]."""
        kv, (b, n) = self.layers[layer], blocks.shape
        shape = (b, n * self.block_size, self.num_kv_heads, self.head_dim)
        return kv[0][blocks].view(shape), kv[1][blocks].view(shape)
