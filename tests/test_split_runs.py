"""How a batch of copies is cut over the gather kernels' blocks (csrc/gpu/split_runs.cpp).

The kernels give each descriptor one block; this host half decides the descriptors. It runs on every machine, so
the cut is checked here even where no GPU runs the kernels (tests/gpu covers the copies themselves).
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
