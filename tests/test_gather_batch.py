"""How a batch of copies is laid out over the gather kernels' blocks (csrc/gpu/gather_batch.cpp).

The kernels give each descriptor one block; this host half decides the descriptors and how many layers a block
copies between fences. It runs on every machine, so it is checked here even where no GPU runs the kernels
(tests/gpu/test_gather_layers.py covers the copies themselves).
"""
import random

import pytest

from kvxfer import _C

GRAIN = _C._split_grain
KIB, MIB = 1 << 10, 1 << 20


def split(runs, max_blocks):
    return _C._split_for_blocks(runs, max_blocks)


def assert_exact_cover(runs, pieces):
    """Every byte of every run is in exactly one piece, pieces in the runs' order, src and dst offsets in step."""
    it = iter(pieces)
    for dst, src, n in runs:
        at = 0
        while at < n or (n == 0 and at == 0):
            pdst, psrc, pn = next(it)
            assert (pdst - dst, psrc - src) == (at, at), f"piece {pdst:#x} is not at offset {at} of run {dst:#x}"
            assert pn > 0 or n == 0
            at += pn
            if n == 0:
                break
        assert at == n, f"pieces of run {dst:#x} cover {at} of its {n} bytes"
    assert next(it, None) is None, "pieces left over after the last run"


def test_a_kv_request_of_many_small_chunks_is_left_as_it_is():
    rng = random.Random(1)
    # one layer of the reference request: 512 chunks of 32 KiB at random blocks, over an H100's 4 blocks per SM
    runs = [(rng.randrange(1 << 20) * 32 * KIB, rng.randrange(1 << 20) * 32 * KIB, 32 * KIB) for _ in range(512)]
    assert split(runs, 528) == runs


def test_one_long_run_is_cut_into_even_aligned_pieces_one_per_block():
    runs = [(1 << 40, 1 << 36, 512 * MIB)]
    pieces = split(runs, 528)
    assert_exact_cover(runs, pieces)
    size = pieces[0][2]
    share = 512 * MIB / 528
    assert size % GRAIN == 0 and share <= size < share + GRAIN
    assert all(p[2] == size for p in pieces[:-1]) and 0 < pieces[-1][2] <= size
    assert len(pieces) <= 528, "more pieces than blocks: some block copies two while others idle"
    assert all(p[0] % GRAIN == 0 and p[1] % GRAIN == 0 for p in pieces), "a piece lost the run's alignment"


def test_pieces_never_go_below_the_grain():
    runs = [(0, 1 << 32, 4 * MIB), (8 * MIB, (1 << 32) + 8 * MIB, 100 * KIB)]
    pieces = split(runs, 1024)  # an even share would be 4 KiB
    assert_exact_cover(runs, pieces)
    assert [p[2] for p in pieces] == [GRAIN] * 64 + [GRAIN, 100 * KIB - GRAIN]


@pytest.mark.parametrize("max_blocks", [0, 1])
def test_one_block_or_none_means_no_cut(max_blocks):
    runs = [(0, 1 << 32, 3 * MIB + 5), (4 * MIB, (1 << 32) + 4 * MIB, 7)]
    assert split(runs, max_blocks) == runs


def test_empty_and_zero_byte_runs_pass_through():
    assert split([], 528) == []
    runs = [(4096, 8192, 0), (1 << 30, 1 << 31, 256 * MIB)]
    pieces = split(runs, 64)
    assert pieces[0] == (4096, 8192, 0)
    assert_exact_cover(runs, pieces)


def test_random_batches_are_covered_exactly_and_cut_only_past_the_share():
    rng = random.Random(7)
    for _ in range(300):
        max_blocks = rng.choice([1, 2, 7, 132, 528, 1024])
        runs, at = [], 0
        for _ in range(rng.randint(1, 40)):
            n = rng.choice([0, 1, 15, 2 * KIB, 32 * KIB, rng.randrange(1, 64 * MIB)])
            runs.append((at, (1 << 44) + at * 3, n))
            at += n + rng.randrange(0, 4) * 4096
        pieces = split(runs, max_blocks)
        assert_exact_cover(runs, pieces)
        total = sum(r[2] for r in runs)
        limit = max(GRAIN, -(-(total // max_blocks) // GRAIN) * GRAIN)
        assert all(p[2] <= limit for p in pieces), "a piece is larger than the share"
        expected = sum(max(1, -(-r[2] // limit)) for r in runs)  # runs within the share stay whole
        assert len(pieces) == expected


def fence(pieces, max_blocks, fence_bytes, num_layers):
    return _C._layers_per_fence(pieces, max_blocks, fence_bytes, num_layers)


def test_a_block_copying_one_small_chunk_a_layer_fences_once_per_several_layers():
    # the reference layer over an H100 (528 blocks): 512 chunks of 32 KiB, one per block
    layer = [(i * 32 * KIB, i * 32 * KIB, 32 * KIB) for i in range(512)]
    assert fence(layer, 528, 256 * KIB, 32) == 8
    assert fence(layer, 528, 256 * KIB + 1, 32) == 9  # rounded up: at least fence_bytes between fences
    assert fence(layer, 528, 0, 32) == 1  # KVXFER_GPU_FENCE_KIB=0: a fence per layer
    assert fence(layer, 528, 64 * MIB, 32) == 32  # never more than the launch's layers


def test_blocks_with_much_to_copy_fence_after_every_layer():
    layer = split([(0, 1 << 40, 256 * MIB)], 528)  # cut into pieces of about 500 KiB, one per block
    assert fence(layer, 528, 256 * KIB, 32) == 1
    assert fence([(0, 0, 4 * MIB)] * 3, 528, 256 * KIB, 32) == 1  # fewer pieces than blocks: 3 blocks of 4 MiB


def test_one_layer_or_nothing_to_copy_means_one_layer_per_fence():
    assert fence([(0, 0, 2 * KIB)], 528, 256 * KIB, 1) == 1
    assert fence([], 528, 256 * KIB, 32) == 1
    assert fence([(0, 0, 0)] * 4, 528, 256 * KIB, 32) == 32  # zero-byte copies: nothing to drain, one fence


CUDA_BUILT = "CUDA: not built" not in _C.build_info and "CUDA: disabled" not in _C.build_info


@pytest.mark.skipif(not CUDA_BUILT, reason="this build has no CUDA: the GPU copy settings are not read")
@pytest.mark.parametrize("name,value,message", [
    ("KVXFER_GPU_FENCE_KIB", "abc", "KVXFER_GPU_FENCE_KIB='abc' is not a whole number of KiB from 0 to 1048576"),
    ("KVXFER_GPU_FENCE_KIB", "-1", "KVXFER_GPU_FENCE_KIB='-1' is not a whole number"),
    ("KVXFER_GPU_FENCE_KIB", "2000000", "KVXFER_GPU_FENCE_KIB='2000000' is not a whole number"),
    ("KVXFER_GPU_LAUNCH", "sideways", "KVXFER_GPU_LAUNCH='sideways' is not one of batched, per_layer"),
    ("KVXFER_GPU_COPY", "dma", "KVXFER_GPU_COPY='dma' is not one of auto, kernel, copy_engine"),
])
def test_a_bad_gpu_copy_setting_fails_the_agent_at_creation(monkeypatch, name, value, message):
    """Read by the progress thread when it first copies on a GPU: checked when the agent is created instead, so a
    typo fails there naming it, on any machine, and never inside the progress thread."""
    import kvxfer
    from kvxfer import errors

    monkeypatch.setenv(name, value)
    with pytest.raises(errors.InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        kvxfer.Agent("bad-env", transport="tcp", interface="lo")


def test_good_gpu_copy_settings_open_an_agent(monkeypatch):
    import kvxfer

    for name, value in (("KVXFER_GPU_FENCE_KIB", "0"), ("KVXFER_GPU_LAUNCH", "per_layer"), ("KVXFER_GPU_COPY", "kernel")):
        monkeypatch.setenv(name, value)
    agent = kvxfer.Agent("good-env", transport="tcp", interface="lo")
    agent.close()
