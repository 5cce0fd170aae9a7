"""Numpy reference for layouts: views each pool by its logical shape and copies blocks with fancy indexing.
Independent of the C++ offset arithmetic it checks."""
import numpy as np

from kvxfer import KVLayout

PRESETS = {
    "vllm_flash": lambda: KVLayout.vllm_flash(4, 32, 16, 2, 32, "float16"),
    "flashinfer": lambda: KVLayout.flashinfer(4, 32, 16, 2, 32, "float16"),
    "mla": lambda: KVLayout.mla(3, 40, 16, 72, "bfloat16"),
    "vllm_cpu": lambda: KVLayout.vllm_cpu(2, 24, 16, 2, 32, "float32"),
    "blocks_first": lambda: KVLayout.blocks_first(4, 24, 8, 2, 32, "float16"),
    "contiguous": lambda: KVLayout.contiguous(64, 4096),
}


def make_pool(layout: KVLayout, seed: int):
    """Per-layer uint8 arrays (or one array for blocks_first) filled from seed."""
    rng = np.random.default_rng(seed)
    if layout.per_layer:
        return [rng.integers(0, 256, layout.tensor_layer_bytes, dtype=np.uint8) for _ in range(layout.num_layers)]
    return [rng.integers(0, 256, layout.tensor_layer_bytes, dtype=np.uint8)]


def block_view(layout: KVLayout, pool, layer: int) -> np.ndarray:
    """A [num_planes, num_blocks, chunk_bytes] view of one layer (strided views, no copies)."""
    c, nb = layout.chunk_bytes, layout.num_blocks
    if layout.kind in ("vllm_flash",):
        return pool[layer].reshape(2, nb, c)
    if layout.kind == "flashinfer":
        return pool[layer].reshape(nb, 2, c).transpose(1, 0, 2)
    if layout.kind in ("mla", "vllm_cpu", "contiguous"):
        return pool[layer].reshape(1, nb, c)
    if layout.kind == "blocks_first":
        return pool[0].reshape(nb, layout.num_layers, 2, c)[:, layer].transpose(1, 0, 2)
    raise ValueError(layout.kind)


def apply(layout: KVLayout, src_pool, dst_pool, src_ids, dst_ids, layers) -> None:
    for layer in layers:
        block_view(layout, dst_pool, layer)[:, dst_ids] = block_view(layout, src_pool, layer)[:, src_ids]


def expected_after(layout: KVLayout, dst, seed: int, src_ids, dst_ids, layers) -> list:
    """The destination pool `dst` as it must look after moving src_ids -> dst_ids for `layers` from the pool made
    from `seed`: the addressed chunks replaced, every other byte as it was."""
    expected = [a.copy() for a in dst]
    apply(layout, make_pool(layout, seed), expected, src_ids, dst_ids, layers)
    return expected


def head_rows(layout: KVLayout, chunks: np.ndarray) -> np.ndarray:
    """[..., chunk_bytes] chunks as [..., block_size, heads, row] (token-major order, whatever the layout's)."""
    lead, bs, h = chunks.shape[:-1], layout.block_size, max(1, layout.num_kv_heads)  # a latent: one "head"
    if layout.head_major:
        return chunks.reshape(*lead, h, bs, -1).swapaxes(-3, -2)
    return chunks.reshape(*lead, bs, h, -1)


def apply_heads(src_layout: KVLayout, dst_layout: KVLayout, src_pool, dst_pool, src_ids, dst_ids, layers) -> None:
    """What a transfer between pools of different TP ranks must do: the KV heads both pools hold move from src blocks
    into dst blocks; the destination's other heads keep their bytes."""
    h0 = max(src_layout.head_begin, dst_layout.head_begin)
    h1 = min(src_layout.head_begin + src_layout.num_kv_heads, dst_layout.head_begin + dst_layout.num_kv_heads)
    for layer in layers:
        sv, dv = block_view(src_layout, src_pool, layer), block_view(dst_layout, dst_pool, layer)
        got = head_rows(src_layout, sv[:, src_ids])[..., h0 - src_layout.head_begin:h1 - src_layout.head_begin, :]
        cur = dv[:, dst_ids]  # a copy (fancy indexing): set its common heads, then store it back
        head_rows(dst_layout, cur)[..., h0 - dst_layout.head_begin:h1 - dst_layout.head_begin, :] = got
        dv[:, dst_ids] = cur


def apply_tokens(src_layout: KVLayout, dst_layout: KVLayout, src_pool, dst_pool, src_ids, dst_ids, num_tokens: int,
                 layers) -> None:
    """A request's tokens in order: token t of src block src_ids[t // Bs] (row t % Bs) into dst block
    dst_ids[t // Bd] (row t % Bd), the heads both pools hold; every other byte of the destination kept. Token by
    token, independent of the plan's runs."""
    bs, bd = src_layout.block_size, dst_layout.block_size
    sh, dh = src_layout.head_begin, dst_layout.head_begin
    h0 = max(sh, dh)
    h1 = min(sh + max(1, src_layout.num_kv_heads), dh + max(1, dst_layout.num_kv_heads))
    for layer in layers:
        sv, dv = block_view(src_layout, src_pool, layer), block_view(dst_layout, dst_pool, layer)
        for t in range(num_tokens):
            src = head_rows(src_layout, sv[:, src_ids[t // bs]])  # views: [planes, block_size, heads, row]
            dst = head_rows(dst_layout, dv[:, dst_ids[t // bd]])
            dst[:, t % bd, h0 - dh:h1 - dh] = src[:, t % bs, h0 - sh:h1 - sh]
