"""KVLayout: a paged KV pool described once, as data. Presets for the layouts engines use.

Each chunk (one block of one K/V plane of one layer) is contiguous; the C++ core addresses it as
layer_offset[layer] + plane * plane_stride + block * block_stride. `tensor_layer_bytes` is the size of one
per-layer tensor (per-layer layouts) or of the whole pool (`blocks_first`).
"""
from __future__ import annotations

from dataclasses import dataclass

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

    # ---- presets -------------------------------------------------------------------------------------------
    @classmethod
    def vllm_flash(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="bfloat16"):
        """vLLM FlashAttention, per layer [2, num_blocks, block_size, kv_heads, head_dim]."""
        chunk = block_size * num_kv_heads * head_dim * _dtype_bytes(dtype)
        return cls("vllm_flash", num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim, _dtype_name(dtype), chunk,
                   num_blocks * chunk, chunk, 2 * num_blocks * chunk, 2 * num_blocks * chunk, True)

    @classmethod
    def flashinfer(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="bfloat16"):
        """FlashInfer, per layer [num_blocks, 2, block_size, kv_heads, head_dim]."""
        chunk = block_size * num_kv_heads * head_dim * _dtype_bytes(dtype)
        return cls("flashinfer", num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim, _dtype_name(dtype), chunk,
                   chunk, 2 * chunk, 2 * num_blocks * chunk, 2 * num_blocks * chunk, True)

    @classmethod
    def mla(cls, num_layers, num_blocks, block_size, latent_dim, dtype="bfloat16"):
        """MLA latent cache, per layer [num_blocks, block_size, latent_dim] (no K/V split)."""
        chunk = block_size * latent_dim * _dtype_bytes(dtype)
        return cls("mla", num_layers, num_blocks, 1, block_size, 0, latent_dim, _dtype_name(dtype), chunk, 0, chunk,
                   num_blocks * chunk, num_blocks * chunk, True)

    @classmethod
    def vllm_cpu(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="bfloat16"):
        """vLLM CPU backend, per layer [num_blocks, kv_heads, block_size, 2 * head_dim] (K and V in one chunk)."""
        chunk = num_kv_heads * block_size * 2 * head_dim * _dtype_bytes(dtype)
        return cls("vllm_cpu", num_layers, num_blocks, 1, block_size, num_kv_heads, head_dim, _dtype_name(dtype), chunk, 0,
                   chunk, num_blocks * chunk, num_blocks * chunk, True)

    @classmethod
    def blocks_first(cls, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype="bfloat16"):
        """One tensor [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]: a block holds every layer."""
        chunk = block_size * num_kv_heads * head_dim * _dtype_bytes(dtype)
        return cls("blocks_first", num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim, _dtype_name(dtype), chunk,
                   chunk, num_layers * 2 * chunk, 2 * chunk, num_blocks * num_layers * 2 * chunk, False)

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
                  "dtype", "chunk_bytes", "plane_stride", "block_stride"):
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
