"""What to move: model presets give the KV shape per token; a Workload is one benchmark configuration.

A Workload is plain data (JSON-able) so the driver can send it to the peer. Both sides rebuild the same KVLayout,
the same block ids and the same source pattern from it, so the peer verifies the destination bytes without ever
seeing the sender's memory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from kvxfer.errors import InvalidArgument
from kvxfer.layout import KVLayout

# layers, kv heads, head_dim (or MLA latent dim), kind. Public configs of each family.
MODELS = {
    "llama3-8b": dict(num_layers=32, num_kv_heads=8, head_dim=128, kind="vllm_flash"),
    "llama3-70b": dict(num_layers=80, num_kv_heads=8, head_dim=128, kind="vllm_flash"),
    "qwen2-7b": dict(num_layers=28, num_kv_heads=4, head_dim=128, kind="vllm_flash"),
    "qwen2-72b": dict(num_layers=80, num_kv_heads=8, head_dim=128, kind="vllm_flash"),
    "deepseek-v3": dict(num_layers=61, num_kv_heads=1, head_dim=576, kind="mla"),  # latent 512 + rope 64
}
PATTERNS = ("contiguous", "paged", "layerwise")
FILL = 0xA5  # destination bytes before any transfer; untouched chunks must keep it


def kv_bytes_per_token(model: str, dtype_bytes: int = 2) -> int:
    m = MODELS[model]
    planes = 1 if m["kind"] == "mla" else 2
    return m["num_layers"] * planes * m["num_kv_heads"] * m["head_dim"] * dtype_bytes


@dataclass
class Workload:
    pattern: str                 # contiguous | paged | layerwise
    label: str                   # model name or "raw"
    layout: dict                 # KVLayout fields
    src_ids: list = field(default_factory=list)
    dst_ids: list = field(default_factory=list)
    depth: int = 1               # transfers in flight
    rotate: bool = False         # sweep: transfer i uses the (i % depth)-th group of rotate_blocks blocks
    rotate_blocks: int = 1       # sweep: blocks per transfer
    layer_delay_ms: float = 0.0  # layerwise: compute time per layer before it is marked ready
    seed: int = 1
    tp: list = field(default_factory=list)  # [prefill_tp, decode_tp]: prefill rank 0's pool into decode rank 0's

    @property
    def kv_layout(self) -> KVLayout:
        """The model's layout (every KV head)."""
        return KVLayout(**self.layout)

    @property
    def src_layout(self) -> KVLayout:
        """The sender's pool: the model's, or prefill rank 0's heads."""
        return self.kv_layout.for_tp_rank(self.tp[0], 0) if self.tp else self.kv_layout

    @property
    def dst_layout(self) -> KVLayout:
        return self.kv_layout.for_tp_rank(self.tp[1], 0) if self.tp else self.kv_layout

    @property
    def moved_heads(self) -> tuple[int, int]:
        """[first, end) of the model's KV heads a transfer moves (TP ranks: the heads both ranks hold)."""
        s, d = self.src_layout, self.dst_layout
        return max(s.head_begin, d.head_begin), min(s.head_begin + s.num_kv_heads, d.head_begin + d.num_kv_heads)

    @property
    def blocks(self) -> int:
        return self.rotate_blocks if self.rotate else len(self.src_ids)

    @property
    def nbytes(self) -> int:
        """Bytes of one transfer."""
        lay = self.kv_layout
        chunk = lay.chunk_bytes
        if self.tp:
            lo, hi = self.moved_heads
            chunk = chunk // lay.num_kv_heads * (hi - lo)
        return self.blocks * lay.num_layers * lay.num_planes * chunk

    def ids_for(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self.rotate:
            b = np.arange(self.rotate_blocks, dtype=np.int32) + (i % self.depth) * self.rotate_blocks
            return b, b
        return np.asarray(self.src_ids, np.int32), np.asarray(self.dst_ids, np.int32)

    def addressed_ids(self, transfers: int) -> tuple[np.ndarray, np.ndarray]:
        """(src, dst) ids written at least once by `transfers` transfers."""
        if self.rotate:
            b = np.arange(min(transfers, self.depth) * self.rotate_blocks, dtype=np.int32)
            return b, b
        return self.ids_for(0)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Workload":
        try:
            w = cls(**d)
            w.kv_layout  # noqa: B018 - validates the layout fields
        except TypeError as e:
            raise InvalidArgument(f"workload from the driver is malformed: {e}; run the same kvxfer on both sides") from e
        return w


def model_workload(pattern: str, model: str, tokens: int, block_size: int = 16, dtype: str = "bfloat16",
                   layer_delay_ms: float = 1.0, depth: int = 1, seed: int = 1, tp: tuple[int, int] | None = None,
                   head_major: bool = False) -> Workload:
    """tp=(prefill_tp, decode_tp): prefill rank 0's heads into decode rank 0's (the heads both hold move);
    head_major: HND blocks ([heads, block_size, head_dim] inside a block) instead of vLLM's default NHD."""
    if model not in MODELS:
        raise InvalidArgument(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if tokens <= 0 or block_size <= 0:
        raise InvalidArgument(f"--tokens ({tokens}) and --block-size ({block_size}) must be > 0")
    m = MODELS[model]
    blocks = -(-tokens // block_size)
    pool_blocks = 2 * blocks  # room for the ids to be scattered
    if m["kind"] == "mla":
        if tp or head_major:
            raise InvalidArgument(f"{model} keeps an MLA latent (no KV heads): --tp and --head-major do not apply; "
                                  "every TP rank holds the whole latent")
        lay = KVLayout.mla(m["num_layers"], pool_blocks, block_size, m["head_dim"], dtype)
    else:
        lay = KVLayout.vllm_flash(m["num_layers"], pool_blocks, block_size, m["num_kv_heads"], m["head_dim"], dtype,
                                  head_major=head_major)
    label = model + (f" tp{tp[0]}:{tp[1]}" if tp else "") + (" HND" if head_major else "")
    w = _with_ids(pattern, label, lay, blocks, depth, layer_delay_ms, seed)
    if tp:
        w.tp = [int(tp[0]), int(tp[1])]
        w.src_layout, w.dst_layout  # noqa: B018 - refuses TP sizes that do not split the heads
    return w


def raw_workload(pattern: str, block_bytes: int, blocks: int, depth: int = 1, layer_delay_ms: float = 0.0,
                 seed: int = 1) -> Workload:
    if block_bytes <= 0 or blocks <= 0:
        raise InvalidArgument(f"--block-bytes ({block_bytes}) and --blocks ({blocks}) must be > 0")
    lay = KVLayout.contiguous(2 * blocks, block_bytes)
    return _with_ids(pattern, "raw", lay, blocks, depth, layer_delay_ms, seed)


SWEEP_CHUNK = 1 << 20  # a chunk (the unit immediates count) stays below every provider's largest write


def sweep_workload(size: int, depth: int, seed: int = 1) -> Workload:
    """One contiguous message of `size` bytes per transfer, `depth` in flight, each into its own blocks. Messages
    above 1 MiB are whole 1 MiB blocks that the plan merges back into the largest writes the provider takes."""
    chunk = size if size <= SWEEP_CHUNK else SWEEP_CHUNK
    if size % chunk:
        raise InvalidArgument(f"sweep size {size} above 1 MiB must be a multiple of 1 MiB")
    lay = KVLayout.contiguous(depth * (size // chunk), chunk)
    return Workload("contiguous", "sweep", dataclasses.asdict(lay), depth=depth, rotate=True,
                    rotate_blocks=size // chunk, seed=seed)


def _with_ids(pattern, label, lay, blocks, depth, layer_delay_ms, seed) -> Workload:
    if pattern not in PATTERNS:
        raise InvalidArgument(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    if pattern == "contiguous":
        src = dst = np.arange(blocks)
    else:  # random, non-contiguous on both sides
        rng = np.random.default_rng(seed)
        src = rng.choice(lay.num_blocks, blocks, replace=False)
        dst = rng.choice(lay.num_blocks, blocks, replace=False)
    return Workload(pattern, label, dataclasses.asdict(lay), src.tolist(), dst.tolist(), depth=depth,
                    layer_delay_ms=layer_delay_ms if pattern == "layerwise" else 0.0, seed=seed)


# ---- memory ------------------------------------------------------------------------------------------------
def allocate(layout: KVLayout) -> list[np.ndarray]:
    """The arrays kvxfer registers: one per layer, or one for a blocks-first pool."""
    count = layout.num_layers if layout.per_layer else 1
    return [np.empty(layout.tensor_layer_bytes, np.uint8) for _ in range(count)]


def fill_source(arrays: list[np.ndarray], seed: int) -> None:
    """Every 8-byte word holds (array, index, seed): a chunk that lands in the wrong place cannot match."""
    for r, a in enumerate(arrays):
        a.view(np.uint64)[:] = _pattern(r, a.nbytes // 8, seed)


def _pattern(region: int, words: int, seed: int) -> np.ndarray:
    tag = np.uint64(((region + 1) << 40) ^ (seed << 56))
    return np.arange(words, dtype=np.uint64) ^ tag


def chunk_rows(layout: KVLayout, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Per layer: (array index, row indexes of the addressed chunks) with each array viewed as [-1, chunk_bytes].

    Independent of the C++ plan: it only uses the layout's strides, which all presets keep multiples of a chunk."""
    c = layout.chunk_bytes
    out = []
    for layer in range(layout.num_layers):
        region, base = (layer, 0) if layout.per_layer else (0, layer * layout.layer_stride)
        offs = (base + np.arange(layout.num_planes)[:, None] * layout.plane_stride
                + np.asarray(ids, np.int64)[None, :] * layout.block_stride).ravel()
        out.append((region, offs // c))
    return out


def head_rows(layout: KVLayout, chunks: np.ndarray) -> np.ndarray:
    """[n, chunk_bytes] chunks as [n, block_size, heads, row] (token-major order whatever the layout's)."""
    n, bs, h = chunks.shape[0], layout.block_size, layout.num_kv_heads
    if layout.head_major:
        return chunks.reshape(n, h, bs, -1).swapaxes(1, 2)
    return chunks.reshape(n, bs, h, -1)


def verify(workload: Workload, dst: list[np.ndarray], transfers: int) -> tuple[bool, str]:
    """Addressed chunks equal the source pattern's; every other byte still holds FILL."""
    if workload.tp:
        return _verify_tp(workload, dst, transfers)
    lay = workload.kv_layout
    src_ids, dst_ids = workload.addressed_ids(transfers)
    src_rows, dst_rows = chunk_rows(lay, src_ids), chunk_rows(lay, dst_ids)
    touched = [np.zeros(a.nbytes // lay.chunk_bytes, bool) for a in dst]
    src_cache: dict[int, np.ndarray] = {}
    for layer, ((sr, srows), (dr, drows)) in enumerate(zip(src_rows, dst_rows)):
        if sr not in src_cache:
            src_cache = {sr: _pattern(sr, dst[sr].nbytes // 8, workload.seed).view(np.uint8)}
        want = src_cache[sr].reshape(-1, lay.chunk_bytes)[srows]
        got = dst[dr].reshape(-1, lay.chunk_bytes)[drows]
        if not np.array_equal(got, want):
            bad = int(np.argmax((got != want).any(axis=1)))
            return False, f"layer {layer}: chunk {bad} of the request does not hold the source bytes"
        touched[dr][drows] = True
    for r, a in enumerate(dst):
        rows = a.reshape(-1, lay.chunk_bytes)
        if not (rows[~touched[r]] == FILL).all():
            return False, f"array {r}: a chunk that no transfer addressed was modified"
    return True, "ok"


def _verify_tp(workload: Workload, dst: list[np.ndarray], transfers: int) -> tuple[bool, str]:
    """Between TP ranks: the moved heads of the addressed chunks equal the source rank's; the rest of the
    destination rank's pool (its other heads, other chunks) still holds FILL."""
    src_l, dst_l = workload.src_layout, workload.dst_layout
    lo, hi = workload.moved_heads
    src_ids, dst_ids = workload.addressed_ids(transfers)
    src_rows, dst_rows = chunk_rows(src_l, src_ids), chunk_rows(dst_l, dst_ids)
    expected = [np.full(a.nbytes, FILL, np.uint8) for a in dst]
    for (sr, srows), (dr, drows) in zip(src_rows, dst_rows):
        words = src_l.tensor_layer_bytes // 8
        src = _pattern(sr, words, workload.seed).view(np.uint8).reshape(-1, src_l.chunk_bytes)[srows]
        want = expected[dr].reshape(-1, dst_l.chunk_bytes)
        rows = want[drows]
        head_rows(dst_l, rows)[:, :, lo - dst_l.head_begin:hi - dst_l.head_begin] = \
            head_rows(src_l, src)[:, :, lo - src_l.head_begin:hi - src_l.head_begin]
        want[drows] = rows
    for r, (got, want) in enumerate(zip(dst, expected)):
        if not np.array_equal(got, want):
            at = int(np.argmax(got != want))
            return False, (f"array {r}: byte {at} (chunk {at // dst_l.chunk_bytes}) differs from the source rank's "
                           f"heads [{lo}, {hi}) / the untouched fill")
    return True, "ok"
