"""KVLayout.from_vllm: vLLM backend name + one layer's shape -> the matching preset, or an error naming the fix."""
import pytest

from kvxfer import KVLayout, errors


def test_backends_map_to_presets():
    assert KVLayout.from_vllm("CPU_ATTN", (128, 2, 32, 64), "float32", 2) == KVLayout.vllm_cpu(2, 128, 32, 2, 32, "float32")
    assert (KVLayout.from_vllm("FLASH_ATTN", (2, 100, 16, 8, 128), "bfloat16", 32)
            == KVLayout.vllm_flash(32, 100, 16, 8, 128, "bfloat16"))
    assert (KVLayout.from_vllm("FLASHINFER", (100, 2, 16, 8, 128), "float16", 4)
            == KVLayout.flashinfer(4, 100, 16, 8, 128, "float16"))
    assert KVLayout.from_vllm("TRITON_MLA", (50, 64, 576), "bfloat16", 61) == KVLayout.mla(61, 50, 64, 576, "bfloat16")
    # the CPU chunk is one (block, all heads, K and V): 2 heads * 32 tokens * 64 floats
    assert KVLayout.from_vllm("CPU_ATTN", (128, 2, 32, 64), "torch.float32", 2).chunk_bytes == 2 * 32 * 64 * 4


def test_bad_backend_or_shape_is_named():
    with pytest.raises(errors.InvalidArgument, match="backend 'ROCM_AITER' has no kvxfer layout"):
        KVLayout.from_vllm("ROCM_AITER", (1, 2, 3, 4), "float32", 1)
    with pytest.raises(errors.InvalidArgument, match=r"FLASH_ATTN KV cache layer is \[2, blocks"):
        KVLayout.from_vllm("FLASH_ATTN", (100, 2, 16, 8, 128), "bfloat16", 1)
    with pytest.raises(errors.InvalidArgument, match="is odd"):
        KVLayout.from_vllm("CPU_ATTN", (8, 2, 32, 63), "float32", 1)
    with pytest.raises(errors.InvalidArgument, match="dtype 'int4'"):
        KVLayout.from_vllm("CPU_ATTN", (8, 2, 32, 64), "int4", 1)


def test_dtype_spellings_give_one_layout():
    """vLLM hands the connector torch dtypes while a peer may pass a string: the layouts must compare equal, or the
    core refuses the transfer as a layout mismatch (seen end to end: 'float32 on the sender but torch.float32')."""
    import numpy as np

    want = KVLayout.vllm_cpu(2, 8, 16, 2, 32, "float32")
    assert want.dtype == "float32"
    assert KVLayout.vllm_cpu(2, 8, 16, 2, 32, "torch.float32") == want
    assert KVLayout.vllm_cpu(2, 8, 16, 2, 32, np.float32) == want
    assert KVLayout.vllm_cpu(2, 8, 16, 2, 32, np.dtype("float32")) == want
    torch = pytest.importorskip("torch")
    assert KVLayout.from_vllm("CPU_ATTN", (8, 2, 16, 64), torch.float32, 2) == want
    assert KVLayout.vllm_flash(2, 8, 16, 2, 32, torch.bfloat16).dtype == "bfloat16"


# vLLM >= 0.32 (its KVCacheLayout): each layer's cache is a [B, H, N, C] view of one buffer, C a token's K and V of
# one head side by side; the layout names the physical order of logical [L, B, H, N, C].
VLLM_LAYOUTS = {"LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "LHBNC": (0, 2, 1, 3, 4),
                "BLHNC": (1, 0, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4), "BHLNC": (1, 2, 0, 3, 4)}


def vllm_views(name, layers=3, blocks=10, heads=2, tokens=4, row=16, seed=0):
    """(buffer, per-layer views) as vLLM's create_kv_cache_views lays them out for KVCacheLayout `name`: strides
    from the physical order, innermost last. Values distinct enough that a misplaced row shows."""
    torch = pytest.importorskip("torch")
    shape = (layers, blocks, heads, tokens, row)
    strides, step = [0] * 5, 1
    for dim in reversed(VLLM_LAYOUTS[name]):
        strides[dim] = step
        step *= shape[dim]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-2048, 2048, (step,), generator=g).to(torch.float16)
    five = torch.as_strided(raw, shape, strides)
    return raw, [five[layer] for layer in range(layers)]


@pytest.mark.parametrize("name, head_major, blocks_outer", [
    ("LBHNC", True, False), ("LBNHC", False, False), ("BLHNC", True, True), ("BLNHC", False, True)])
def test_vllm_views_of_each_packed_layout_are_described(name, head_major, blocks_outer):
    raw, views = vllm_views(name)
    layout, pool = KVLayout.from_vllm_views(views)
    assert layout == KVLayout.vllm_paged(3, 10, 4, 2, 16, "float16", head_major=head_major, blocks_outer=blocks_outer)
    assert layout.chunk_bytes == 2 * 4 * 16 * 2 and layout.num_planes == 1
    if blocks_outer:
        assert pool == [(raw.data_ptr(), raw.numel() * 2, -1)]  # the whole buffer, once
    else:
        assert pool == [(v.data_ptr(), 10 * layout.chunk_bytes, -1) for v in views]


@pytest.mark.parametrize("name", ["LHBNC", "BHLNC"])
def test_vllm_views_with_heads_outside_blocks_are_refused_naming_layouts_that_work(name):
    _, views = vllm_views(name)
    with pytest.raises(errors.InvalidArgument, match="heads outside blocks .*VLLM_KV_CACHE_LAYOUT to LBHNC"):
        KVLayout.from_vllm_views(views)


def test_vllm_views_that_differ_or_are_padded_are_refused():
    torch = pytest.importorskip("torch")
    _, views = vllm_views("LBHNC")
    with pytest.raises(errors.InvalidArgument, match="layer 1's view .* differs from layer 0's"):
        KVLayout.from_vllm_views([views[0], views[1][:5]])
    padded = torch.zeros(3 * 10 * 200, dtype=torch.float16)  # pages of 200 elements holding 2 x 4 x 16 = 128
    five = torch.as_strided(padded, (3, 10, 2, 4, 16), (2000, 200, 64, 16, 1))
    with pytest.raises(errors.InvalidArgument, match="block stride .200 elements. is neither one block .128."):
        KVLayout.from_vllm_views([five[layer] for layer in range(3)])
    with pytest.raises(errors.InvalidArgument, match="4 axes"):
        KVLayout.from_vllm_views([torch.zeros(2, 10, 4, 2, 8)])


@pytest.mark.parametrize("src_name, dst_name", [("LBHNC", "BLNHC"), ("BLHNC", "LBNHC")])
def test_kv_moves_between_vllm_layouts_exactly(src_name, dst_name):
    """A prefill engine with one KVCacheLayout and a decode engine with another: every addressed block of every
    layer arrives with each (head, token) row where the decode side's view says, and nothing else changes."""
    import numpy as np

    import kvxfer

    _src_raw, src_views = vllm_views(src_name, seed=1)  # (the views keep their buffer alive)
    _dst_raw, dst_views = vllm_views(dst_name, seed=2)
    src_layout, src_pool = KVLayout.from_vllm_views(src_views)
    dst_layout, dst_pool = KVLayout.from_vllm_views(dst_views)
    a = kvxfer.Agent("paged-prefill", transport="tcp", interface="lo", timeout_s=30)
    b = kvxfer.Agent("paged-decode", transport="tcp", interface="lo", timeout_s=30)
    a.register_pool(src_pool, src_layout)
    b.register_pool(dst_pool, dst_layout)
    pb, pa = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(pb, 20)
    b.wait_connected(pa, 20)
    src_ids, dst_ids = np.array([7, 0, 4], np.int32), np.array([2, 9, 5], np.int32)
    before = [v.clone() for v in dst_views]
    recv = b.recv(pa, 1, dst_ids)
    a.send(pb, 1, src_ids, dst_ids).all_ready()
    recv.wait(timeout_s=30)
    others = [i for i in range(10) if i not in set(dst_ids.tolist())]
    for layer in range(3):
        assert (dst_views[layer][dst_ids] == src_views[layer][src_ids]).all()
        assert (dst_views[layer][others] == before[layer][others]).all()
    a.close()
    b.close()
