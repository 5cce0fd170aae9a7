"""WritePlan expansion checked against a numpy reference: every (layer, plane, block) chunk is written exactly once
to the right place, granules per layer equal blocks x planes, and writes respect the immediate's limits."""
import numpy as np
import pytest

from kvxfer import _C, errors
from tests.reference import PRESETS


def spec(layout):
    if layout.per_layer:
        return layout.spec(list(range(layout.num_layers)), [0] * layout.num_layers)
    return layout.spec([0] * layout.num_layers, [i * layout.layer_stride for i in range(layout.num_layers)])


def expected_chunks(layout, src_ids, dst_ids):
    """Set of (layer, src region, src offset, dst offset) for every chunk, from the layout's shape semantics."""
    out = set()
    for layer in range(layout.num_layers):
        region = layer if layout.per_layer else 0
        base = 0 if layout.per_layer else layer * layout.layer_stride
        for p in range(layout.num_planes):
            for s, d in zip(src_ids, dst_ids):
                out.add((layer, region, base + p * layout.plane_stride + int(s) * layout.block_stride,
                         base + p * layout.plane_stride + int(d) * layout.block_stride))
    return out


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_plan_covers_every_chunk_once(kind):
    layout = PRESETS[kind]()
    rng = np.random.default_rng(1)
    n = layout.num_blocks // 2
    src = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    dst = np.sort(rng.choice(layout.num_blocks, n, replace=False)).astype(np.int32)
    src[: n // 2] = np.sort(src[: n // 2])  # some runs may merge, others not
    s = spec(layout)
    plan = _C.build_plan(s, s, src, dst, 0, layout.num_layers)
    chunks = set()
    c = layout.chunk_bytes
    for i in range(len(plan["nbytes"])):
        assert plan["nbytes"][i] == plan["granules"][i] * c and 1 <= plan["granules"][i] <= _C.imm.MAX_GRANULES
        for k in range(plan["granules"][i]):
            item = (int(plan["layer"][i]), int(plan["src_region"][i]), int(plan["src_offset"][i]) + k * c,
                    int(plan["dst_offset"][i]) + k * c)
            assert item not in chunks
            chunks.add(item)
    assert chunks == expected_chunks(layout, src, dst)
    per_layer = np.bincount(plan["layer"], weights=plan["granules"], minlength=layout.num_layers)
    assert (per_layer == n * layout.num_planes).all() and plan["granules_per_layer"] == n * layout.num_planes


def test_layer_range_between_pools_stored_differently():
    """The plan keeps one layer's writes and each layer's bases: a middle range of layers from a stacked pool (one
    region, a layer stride) into per-layer tensors (a region per layer) must still address every chunk on its own
    side, including runs that merge on both sides."""
    from kvxfer import KVLayout

    layout = KVLayout.vllm_flash(8, 64, 16, 2, 32, "float16")
    src_spec = layout.spec([0] * 8, [i * layout.layer_stride for i in range(8)])
    dst_spec = layout.spec(list(range(8)), [0] * 8)
    rng = np.random.default_rng(7)
    src = np.concatenate([np.arange(10, 20), rng.choice(np.arange(30, 64), 12, replace=False)]).astype(np.int32)
    dst = np.concatenate([np.arange(40, 50), rng.choice(np.arange(0, 40), 12, replace=False)]).astype(np.int32)
    plan = _C.build_plan(src_spec, dst_spec, src, dst, 3, 4)
    c = layout.chunk_bytes
    got = set()
    for i in range(len(plan["nbytes"])):
        for k in range(plan["granules"][i]):
            got.add((int(plan["layer"][i]), int(plan["src_region"][i]), int(plan["src_offset"][i]) + k * c,
                     int(plan["dst_region"][i]), int(plan["dst_offset"][i]) + k * c))
    want = {(layer, 0, layer * layout.layer_stride + p * layout.plane_stride + int(s) * layout.block_stride,
             layer, p * layout.plane_stride + int(d) * layout.block_stride)
            for layer in range(3, 7) for p in range(2) for s, d in zip(src, dst)}
    assert got == want
    assert len(plan["nbytes"]) < len(want)  # the two id runs merged
    assert list(plan["layer_begin"]) == [i * len(plan["nbytes"]) // 4 for i in range(5)]


def test_long_runs_split_at_granule_limit():
    from kvxfer import KVLayout

    layout = KVLayout.contiguous(10000, 64)
    s = spec(layout)
    ids = np.arange(10000, dtype=np.int32)
    plan = _C.build_plan(s, s, ids, ids, 0, 1)
    assert list(plan["granules"]) == [4095, 4095, 1810]


def test_imm_roundtrip_limits():
    assert _C.imm.decode(_C.imm.encode(4095, 255, 4095)) == (4095, 255, 4095)
    assert _C.imm.decode(_C.imm.encode(7, 31, 1)) == (7, 31, 1)


def test_plan_errors():
    layout = PRESETS["vllm_flash"]()
    s = spec(layout)
    with pytest.raises(errors.InvalidArgument, match="layer range"):
        _C.build_plan(s, s, np.array([0], np.int32), np.array([0], np.int32), 3, 5)
    with pytest.raises(errors.BlockOutOfRange):
        _C.build_plan(s, s, np.array([99], np.int32), np.array([0], np.int32), 0, 1)
