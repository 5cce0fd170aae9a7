"""KVLayout: a paged KV pool described once, as data. Presets for the layouts engines use.

Each chunk (one block of one K/V plane of one layer) is contiguous; the C++ core addresses it as
layer_offset[layer] + plane * plane_stride + block * block_stride. `tensor_layer_bytes` is the size of one
per-layer tensor (per-layer layouts) or of the whole pool (`blocks_first`).

Tensor parallelism: a rank's pool holds KV heads [head_begin, head_begin + num_kv_heads) of the model's
total_kv_heads (`with_heads`, `for_tp_rank`). Pools of different ranks exchange the heads they have in common: a
decode rank of TP 2 takes its half of every head of a TP 1 prefill block, two TP 2 prefill ranks each write their
half into one TP 1 decode block. Inside a chunk the rows (one head of one token) are token-major ([block_size,
heads, ...], "NHD", vLLM's default) or head-major ([heads, block_size, ...], "HND": `head_major=True`); between
ranks a head-major chunk moves as one contiguous piece, a token-major one as one piece per token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from kvxfer import _C
from kvxfer.errors import InvalidArgument

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1, "int8": 1}


def _dtype_name(dtype) -> str:
    """'float32' for "float32", torch.float32, numpy.float32 or numpy.dtype('float32'): the two sides of a transfer
    compare layouts by this name, so an engine passing its tensors' torch dtype must match a peer passing a string."""
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__module__.startswith("torch"):
        name = str(dtype)
    else:
        import numpy as np

        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    name = name.replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise InvalidArgument(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}")
    return name


def _dtype_bytes(dtype) -> int:
    return DTYPE_BYTES[_dtype_name(dtype)]


@dataclass(frozen=True)
class KVLayout:
    kind: str
    num_layers: int
    num_blocks: int
    num_planes: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    chunk_bytes: int
    plane_stride: int
    block_stride: int
    layer_stride: int        # bytes between layers when all layers share one tensor
    tensor_layer_bytes: int  # bytes of one per-layer tensor (or of the whole pool when per_layer is False)
    per_layer: bool          # True: one tensor per layer (or one stacked [layers, ...] tensor)
    head_begin: int = 0      # the first of the model's KV heads this pool holds (tensor parallelism)
    total_kv_heads: int = 0  # the model's KV heads (0: this pool holds all of them)
    head_major: bool = False  # inside a chunk: [heads, block_size, ...] (HND) instead of [block_size, heads, ...]

    # ---- presets -------------------------------------------------------------------------------------------
    @classmethod
    def vllm_flash(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="bfloat16", *,
                   head_major=False):
        """vLLM FlashAttention, per layer [2, num_blocks, block_size, kv_heads, head_dim] (head_major: [2,
        num_blocks, kv_heads, block_size, head_dim], vLLM's HND)."""
        chunk = block_size * num_kv_heads * head_dim * _dtype_bytes(dtype)
        return cls("vllm_flash", num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim, _dtype_name(dtype), chunk,
                   num_blocks * chunk, chunk, 2 * num_blocks * chunk, 2 * num_blocks * chunk, True,
                   head_major=bool(head_major))

    @classmethod
    def flashinfer(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="bfloat16", *,
                   head_major=False):
        """FlashInfer, per layer [num_blocks, 2, block_size, kv_heads, head_dim] (head_major: [num_blocks, 2,
        kv_heads, block_size, head_dim], FlashInfer's HND)."""
        chunk = block_size * num_kv_heads * head_dim * _dtype_bytes(dtype)
        return cls("flashinfer", num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim, _dtype_name(dtype), chunk,
                   chunk, 2 * chunk, 2 * num_blocks * chunk, 2 * num_blocks * chunk, True, head_major=bool(head_major))

    @classmethod
    def mla(cls, num_layers, num_blocks, block_size, latent_dim, dtype="bfloat16"):
        """MLA latent cache, per layer [num_blocks, block_size, latent_dim] (no K/V split)."""
        chunk = block_size * latent_dim * _dtype_bytes(dtype)
        return cls("mla", num_layers, num_blocks, 1, block_size, 0, latent_dim, _dtype_name(dtype), chunk, 0, chunk,
                   num_blocks * chunk, num_blocks * chunk, True)

    @classmethod
    def vllm_cpu(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="bfloat16"):
        """vLLM CPU backend, per layer [num_blocks, kv_heads, block_size, 2 * head_dim] (K and V in one chunk).
        Inside each (block, head) K is stored transposed ([head_dim][block_size]) and then V: a head's bytes are
        contiguous (TP ranks exchange heads), a token's are not, so pools of different block sizes are refused and
        num_tokens moves a partial last block whole."""
        chunk = num_kv_heads * block_size * 2 * head_dim * _dtype_bytes(dtype)
        return cls("vllm_cpu", num_layers, num_blocks, 1, block_size, num_kv_heads, head_dim, _dtype_name(dtype), chunk, 0,
                   chunk, num_blocks * chunk, num_blocks * chunk, True, head_major=True)

    @classmethod
    def blocks_first(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="bfloat16", *,
                     head_major=False):
        """One tensor [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]: a block holds every layer
        (head_major: [..., 2, kv_heads, block_size, head_dim])."""
        chunk = block_size * num_kv_heads * head_dim * _dtype_bytes(dtype)
        return cls("blocks_first", num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim, _dtype_name(dtype), chunk,
                   chunk, num_layers * 2 * chunk, 2 * chunk, num_blocks * num_layers * 2 * chunk, False,
                   head_major=bool(head_major))

    @classmethod
    def vllm_paged(cls, num_layers, num_blocks, block_size, num_kv_heads, row_elems, dtype="bfloat16", *,
                   head_major=True, blocks_outer=False):
        """vLLM's per-layer [B, H, N, C] KV cache views (vLLM >= 0.32, its KVCacheLayout): C holds one head's K and V
        of one token side by side (row_elems = head_size + head_size_v), one plane. head_major: heads before
        tokens in memory (LBHNC, BLHNC: vLLM's HND), else tokens first (LBNHC, BLNHC: NHD). blocks_outer: blocks
        outermost (BLHNC, BLNHC): one buffer of [blocks, layers, ...], registered whole (from_vllm_views)."""
        chunk = num_kv_heads * block_size * row_elems * _dtype_bytes(dtype)
        if blocks_outer:
            return cls("vllm_paged", num_layers, num_blocks, 1, block_size, num_kv_heads, row_elems,
                       _dtype_name(dtype), chunk, 0, num_layers * chunk, chunk, num_blocks * num_layers * chunk, False,
                       head_major=bool(head_major))
        return cls("vllm_paged", num_layers, num_blocks, 1, block_size, num_kv_heads, row_elems, _dtype_name(dtype),
                   chunk, 0, chunk, num_blocks * chunk, num_blocks * chunk, True, head_major=bool(head_major))

    @classmethod
    def from_vllm_views(cls, views) -> tuple["KVLayout", list]:
        """(layout, pool) for the per-layer KV cache views a vLLM >= 0.32 worker hands its KV connector (one
        [B, H, N, C] tensor per layer, strided views of one buffer in the physical order of vLLM's KVCacheLayout),
        read from their shapes and strides: `agent.register_pool(pool, layout)`. The pool is one (ptr, nbytes,
        device) region per layer, or one for the whole buffer when blocks are outermost; the views' buffer must
        outlive the agent's use of it. Layouts whose heads sit outside blocks (LHBNC, BHLNC) and padded pages are
        refused, naming VLLM_KV_CACHE_LAYOUT values that work. Strides cannot show what a backend does inside a row:
        vLLM's CPU backend stores K transposed per block, so its caches take from_vllm("CPU_ATTN", ...) instead."""
        views = list(views)
        if not views:
            raise InvalidArgument("from_vllm_views needs the per-layer KV cache views (got none)")
        first = views[0]
        shape, strides = tuple(first.shape), tuple(first.stride())
        if len(shape) != 4:
            raise InvalidArgument(f"a vLLM KV cache view is [blocks, heads, tokens, K|V] (4 axes), got shape "
                                  f"{list(shape)}; for a backend's own 5-axis tensor use KVLayout.from_vllm")
        for i, v in enumerate(views):
            if (tuple(v.shape), tuple(v.stride()), v.dtype, v.device) != (shape, strides, first.dtype, first.device):
                raise InvalidArgument(f"layer {i}'s view {list(v.shape)} strides {list(v.stride())} {v.dtype} on "
                                      f"{v.device} differs from layer 0's: kvxfer takes one layout for every layer")
        blocks, heads, tokens, row = shape
        s_block, s_head, s_token, s_row = strides
        refused = ("; set VLLM_KV_CACHE_LAYOUT to LBHNC, LBNHC, BLHNC or BLNHC (blocks of [heads, tokens] or "
                   "[tokens, heads], unpadded)")
        if s_row != 1:
            raise InvalidArgument(f"the views' last axis (K|V of one token) is not contiguous (stride {s_row})"
                                  + refused)
        if (s_head, s_token) == (tokens * row, row):
            head_major = True
        elif (s_token, s_head) == (heads * row, row):
            head_major = False
        else:
            raise InvalidArgument(f"the views' heads and tokens are not packed in a block (strides heads {s_head}, "
                                  f"tokens {s_token} of {row}-element rows): heads outside blocks (LHBNC, BHLNC)"
                                  + refused)
        chunk_elems, num_layers = heads * tokens * row, len(views)
        esize = first.element_size()
        device = first.device.index if first.device.type == "cuda" else -1
        if device is None:
            device = 0
        layout_args = (num_layers, blocks, tokens, heads, row, first.dtype)
        if s_block == chunk_elems:  # layers outermost: each layer's blocks back to back
            layout = cls.vllm_paged(*layout_args, head_major=head_major)
            return layout, [(v.data_ptr(), blocks * chunk_elems * esize, device) for v in views]
        if s_block == num_layers * chunk_elems:  # blocks outermost: layer l's block b at (b * L + l) * chunk
            base = first.data_ptr()
            for i, v in enumerate(views):
                if v.data_ptr() != base + i * chunk_elems * esize:
                    raise InvalidArgument(f"blocks-outermost views: layer {i} starts {v.data_ptr() - base} bytes "
                                          f"after layer 0, not {i * chunk_elems * esize}; pass the views in layer "
                                          "order")
            layout = cls.vllm_paged(*layout_args, head_major=head_major, blocks_outer=True)
            return layout, [(base, blocks * num_layers * chunk_elems * esize, device)]
        raise InvalidArgument(f"the views' block stride ({s_block} elements) is neither one block ({chunk_elems}) "
                              f"nor one block of every layer ({num_layers * chunk_elems}): padded pages or kernel "
                              f"blocks" + refused)

    @classmethod
    def contiguous(cls, num_blocks, block_bytes):
        """Raw bytes: one layer of num_blocks blocks of block_bytes each (plain buffers, benchmarks)."""
        return cls("contiguous", 1, num_blocks, 1, block_bytes, 1, 1, "uint8", block_bytes, 0, block_bytes,
                   num_blocks * block_bytes, num_blocks * block_bytes, True)

    # vLLM attention backend name -> (preset, logical per-layer shape as axis names). GPU backends may keep a
    # permuted physical order (HND); only tensors contiguous in this logical order are described here.
    VLLM_BACKENDS = {
        "CPU_ATTN": ("vllm_cpu", ("blocks", "heads", "block_size", "2*head_dim")),
        "FLASH_ATTN": ("vllm_flash", ("2", "blocks", "block_size", "heads", "head_dim")),
        "FLASHINFER": ("flashinfer", ("blocks", "2", "block_size", "heads", "head_dim")),
        "TRITON_ATTN": ("flashinfer", ("blocks", "2", "block_size", "heads", "head_dim")),
        "TRITON_MLA": ("mla", ("blocks", "block_size", "latent_dim")),
        "FLASHMLA": ("mla", ("blocks", "block_size", "latent_dim")),
    }

    @classmethod
    def from_vllm(cls, backend: str, shape, dtype, num_layers: int) -> "KVLayout":
        """The layout of a vLLM KV cache from its attention backend's name (e.g. "CPU_ATTN", "FLASH_ATTN") and the
        shape of one layer's tensor, as passed to a KV connector's register_kv_caches."""
        if backend not in cls.VLLM_BACKENDS:
            raise InvalidArgument(f"vLLM attention backend {backend!r} has no kvxfer layout yet; supported: "
                                  f"{sorted(cls.VLLM_BACKENDS)}")
        kind, axes = cls.VLLM_BACKENDS[backend]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(axes) or ("2" in axes and shape[axes.index("2")] != 2):
            raise InvalidArgument(f"a {backend} KV cache layer is [{', '.join(axes)}], got shape {list(shape)}; "
                                  "is the backend name right?")
        dim = dict(zip(axes, shape))
        if kind == "mla":
            return cls.mla(num_layers, dim["blocks"], dim["block_size"], dim["latent_dim"], dtype)
        head_dim = dim["head_dim"] if "head_dim" in dim else dim["2*head_dim"] // 2
        if "2*head_dim" in dim and dim["2*head_dim"] % 2:
            raise InvalidArgument(f"a {backend} KV cache layer's last axis holds K and V (2*head_dim); "
                                  f"{dim['2*head_dim']} is odd")
        return getattr(cls, kind)(num_layers, dim["blocks"], dim["block_size"], dim["heads"], head_dim, dtype)

    # ---- tensor parallelism --------------------------------------------------------------------------------
    def with_heads(self, head_begin: int, total_kv_heads: int) -> "KVLayout":
        """This layout as one TP rank's pool: it holds the model's KV heads [head_begin, head_begin +
        num_kv_heads) of total_kv_heads."""
        if self.num_kv_heads == 0:
            raise InvalidArgument(f"a {self.kind} layout has no KV heads to split (MLA latents): every TP rank holds "
                                  "the whole latent, so send it from one rank")
        if not (0 <= head_begin and head_begin + self.num_kv_heads <= total_kv_heads):
            raise InvalidArgument(f"KV heads [{head_begin}, {head_begin + self.num_kv_heads}) are outside the model's "
                                  f"{total_kv_heads} (total_kv_heads)")
        return replace(self, head_begin=int(head_begin), total_kv_heads=int(total_kv_heads))

    @staticmethod
    def tp_heads(total_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
        """(head_begin, num_kv_heads) of TP rank tp_rank of tp_size, as vLLM and SGLang shard KV heads: an equal
        slice each, or, with more ranks than heads, each head replicated on tp_size // total_kv_heads ranks."""
        if not (0 <= tp_rank < tp_size) or total_kv_heads < 1:
            raise InvalidArgument(f"tp_rank={tp_rank} must be in 0..{tp_size - 1} and total_kv_heads >= 1")
        if tp_size <= total_kv_heads:
            if total_kv_heads % tp_size:
                raise InvalidArgument(f"{total_kv_heads} KV heads do not split evenly over {tp_size} TP ranks")
            n = total_kv_heads // tp_size
            return tp_rank * n, n
        if tp_size % total_kv_heads:
            raise InvalidArgument(f"{tp_size} TP ranks do not replicate {total_kv_heads} KV heads evenly")
        return tp_rank // (tp_size // total_kv_heads), 1

    def for_tp_rank(self, tp_size: int, tp_rank: int) -> "KVLayout":
        """This layout (of the whole model: num_kv_heads is the model's) as TP rank tp_rank's pool."""
        if self.num_kv_heads == 0:
            return self.with_heads(0, 0)  # raises: MLA latents are not split
        begin, n = self.tp_heads(self.num_kv_heads, tp_size, tp_rank)
        rows = self.chunk_bytes // self.num_kv_heads
        chunk = rows * n
        per_block = self.block_stride // self.chunk_bytes  # chunks a block stride spans (1, 2 or layers x 2)
        plane = self.plane_stride // self.chunk_bytes if self.plane_stride else 0
        return replace(self, num_kv_heads=n, chunk_bytes=chunk, block_stride=per_block * chunk,
                       plane_stride=plane * chunk, layer_stride=self.layer_stride // self.num_kv_heads * n,
                       tensor_layer_bytes=self.tensor_layer_bytes // self.num_kv_heads * n, head_begin=begin,
                       total_kv_heads=self.num_kv_heads)

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def block_bytes_per_layer(self) -> int:
        return self.chunk_bytes * self.num_planes

    @property
    def total_bytes(self) -> int:
        return self.tensor_layer_bytes * (self.num_layers if self.per_layer else 1)

    def spec(self, layer_regions, layer_offsets) -> "_C.LayoutSpec":
        s = _C.LayoutSpec()
        for f in ("kind", "num_layers", "num_blocks", "num_planes", "block_size", "num_kv_heads", "head_dim",
                  "dtype", "chunk_bytes", "plane_stride", "block_stride", "head_begin", "total_kv_heads",
                  "head_major"):
            setattr(s, f, getattr(self, f))
        s.layer_region = list(layer_regions)
        s.layer_offset = list(layer_offsets)
        return s

    def fingerprint(self) -> int:
        return self.spec([0] * self.num_layers, [0] * self.num_layers).fingerprint()

    def check_compatible(self, other: "KVLayout") -> None:
        """Raise LayoutMismatch naming the first field that differs."""
        _C.check_compatible(self.spec([0] * self.num_layers, [0] * self.num_layers),
                            other.spec([0] * other.num_layers, [0] * other.num_layers))
