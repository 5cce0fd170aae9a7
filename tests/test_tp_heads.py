"""Pools of different tensor-parallel ranks (KVLayout.with_heads / for_tp_rank): a transfer moves the KV heads both
pools hold, and nothing else. Checked byte for byte against the numpy reference (tests/reference.apply_heads) over
the whole destination pool, so a row written into the wrong head, token or block, or a head the receiver holds but
the sender does not, fails."""
import numpy as np
import pytest

import kvxfer
from kvxfer import _C, errors
from tests.reference import apply_heads, make_pool

MODEL_HEADS = 8


def model(head_major=False, kind="vllm_flash", num_blocks=24):
    """A small model's whole-model layout: 4 layers, blocks of 16 tokens, 8 KV heads of 32 dims, bf16."""
    return getattr(kvxfer.KVLayout, kind)(4, num_blocks, 16, MODEL_HEADS, 32, "bfloat16", head_major=head_major)


def agent(name, transport):
    return kvxfer.Agent(name, transport=transport, interface="lo", timeout_s=30)


def connect(a, b):
    pb, pa = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(pb, 20)
    b.wait_connected(pa, 20)
    return pb, pa


def move(sender, receiver, pb, pa, xfer_id, src_ids, dst_ids):
    recv = receiver.recv(pa, xfer_id, dst_ids)
    send = sender.send(pb, xfer_id, src_ids, dst_ids)
    send.all_ready()
    recv.wait(timeout_s=30)
    send.wait(timeout_s=30)
    return send


def assert_pools_equal(got, want):
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


# ---- plans ------------------------------------------------------------------------------------------------------

def plan(src, dst, src_ids, dst_ids):
    spec = lambda l: l.spec([0] * l.num_layers, [0] * l.num_layers)  # noqa: E731
    return _C.build_plan(spec(src), spec(dst), np.asarray(src_ids, np.int32), np.asarray(dst_ids, np.int32), 0,
                         src.num_layers, 8 << 20)


def test_a_rank_takes_one_piece_per_token_of_a_token_major_block():
    whole, half = model(), model().for_tp_rank(2, 1)
    assert (half.head_begin, half.num_kv_heads, half.total_kv_heads) == (4, 4, 8)
    assert half.chunk_bytes * 2 == whole.chunk_bytes
    p = plan(whole, half, [3, 7], [0, 1])
    per_layer = len(p["nbytes"]) // whole.num_layers
    row = 32 * 2
    # 2 blocks x 2 planes x 16 tokens, each 4 heads' rows; the source's are the second half of each token's heads
    assert per_layer == 2 * 2 * 16 and set(p["nbytes"]) == {4 * row}
    assert p["src_offset"][0] == 3 * whole.chunk_bytes + 4 * row and p["dst_offset"][0] == 0


def test_head_major_ranks_move_one_piece_per_chunk():
    whole, half = model(head_major=True), model(head_major=True).for_tp_rank(2, 0)
    p = plan(whole, half, [3, 7], [0, 1])
    assert len(p["nbytes"]) // whole.num_layers == 2 * 2 and set(p["nbytes"]) == {half.chunk_bytes}


def test_equal_ranks_still_move_whole_chunks_and_merge_them():
    rank = model().for_tp_rank(2, 1)
    p = plan(rank, rank, [4, 5, 6], [10, 11, 12])  # consecutive on both sides: one write per plane and layer
    assert len(p["nbytes"]) // rank.num_layers == 2 and set(p["nbytes"]) == {3 * rank.chunk_bytes}


# ---- transfers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["tcp", "fi_shm", "cma"])
@pytest.mark.parametrize("head_major", [False, True], ids=["NHD", "HND"])
def test_tp1_prefill_to_two_tp2_decode_ranks(transport, head_major):
    """One sender holding all 8 heads; decode ranks 0 and 1 each receive their 4 heads of the same blocks."""
    whole = model(head_major)
    ranks = [whole.for_tp_rank(2, r) for r in range(2)]
    tag = f"{transport}-{int(head_major)}"
    p = agent(f"tp1-prefill-{tag}", transport)
    src = make_pool(whole, 1)
    p.register_pool(src, whole)
    rng = np.random.default_rng(5)
    src_ids = rng.permutation(whole.num_blocks)[:9]
    for r, layout in enumerate(ranks):
        d = agent(f"tp2-decode{r}-{tag}", transport)
        dst = make_pool(layout, 10 + r)
        d.register_pool(dst, layout)
        pd, pp = connect(p, d)
        dst_ids = rng.permutation(layout.num_blocks)[:9]
        want = [x.copy() for x in dst]
        apply_heads(whole, layout, src, want, src_ids, dst_ids, range(whole.num_layers))
        send = move(p, d, pd, pp, r + 1, src_ids, dst_ids)
        assert send.nbytes == 9 * 2 * whole.num_layers * layout.chunk_bytes  # half of every chunk
        pieces = "1 piece of 4096 bytes" if head_major else "16 pieces of 256 bytes"
        assert f"KV heads [{4 * r}, {4 * r + 4}) of each chunk move as {pieces}" in send.path_reason, send.path_reason
        # token-major pieces are packed through the bounce ring on a fabric (cma copies them where they go); the
        # head-major 4 KiB pieces (72 KiB a layer) go packed into the decode rank's landing slots over tcp
        packed = not head_major and transport != "cma"
        landed = head_major and transport == "tcp"
        assert (send.path == "staged") == (packed or landed), send.path_reason
        assert ("packed" in send.path_reason) == (packed or landed), send.path_reason
        assert ("landing slots" in send.path_reason) == landed, send.path_reason
        assert_pools_equal(dst, want)
        d.close()
    p.close()


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_two_tp2_prefill_ranks_fill_one_tp1_decode_block(transport):
    """Each prefill rank writes its 4 heads into the same decode blocks (one recv per rank): together they fill
    them; with one rank's transfer only, the other half keeps its old bytes."""
    whole = model()
    d = agent(f"tp1-decode-{transport}", transport)
    dst = make_pool(whole, 20)
    d.register_pool(dst, whole)
    want = [x.copy() for x in dst]
    dst_ids = np.array([5, 0, 17, 9], np.int32)
    for r in range(2):
        layout = whole.for_tp_rank(2, r)
        p = agent(f"tp2-prefill{r}-{transport}", transport)
        src = make_pool(layout, 30 + r)
        p.register_pool(src, layout)
        pd, pp = connect(p, d)
        src_ids = np.array([1, 2, 3, 4], np.int32) * (r + 1)
        apply_heads(layout, whole, src, want, src_ids, dst_ids, range(whole.num_layers))
        move(p, d, pd, pp, 7, src_ids, dst_ids)  # the same id from each peer: ids are per peer
        assert_pools_equal(dst, want)  # after rank 0 only: heads 4..7 untouched
        p.close()
    d.close()


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_token_major_to_head_major_at_equal_tp(transport):
    """Same heads, different order inside a chunk: every row lands transposed."""
    nhd, hnd = model(), model(head_major=True)
    a, b = agent(f"nhd-{transport}", transport), agent(f"hnd-{transport}", transport)
    src, dst = make_pool(nhd, 3), make_pool(hnd, 4)
    a.register_pool(src, nhd)
    b.register_pool(dst, hnd)
    pb, pa = connect(a, b)
    want = [x.copy() for x in dst]
    apply_heads(nhd, hnd, src, want, [2, 4, 6], [1, 3, 5], range(nhd.num_layers))
    move(a, b, pb, pa, 1, [2, 4, 6], [1, 3, 5])
    assert_pools_equal(dst, want)
    a.close()
    b.close()


# ---- what is refused --------------------------------------------------------------------------------------------

def test_ranks_without_a_common_head_are_refused_naming_the_heads():
    r0, r1 = model().for_tp_rank(4, 0), model().for_tp_rank(4, 3)
    with pytest.raises(errors.LayoutMismatch, match=r"heads \[0, 2\).*\[6, 8\).*no head in common"):
        r0.check_compatible(r1)


def test_different_head_counts_without_head_ranges_point_at_with_heads():
    with pytest.raises(errors.LayoutMismatch, match="num_kv_heads is 8 on the sender but 4.*with_heads"):
        model().check_compatible(kvxfer.KVLayout.vllm_flash(4, 24, 16, 4, 32, "bfloat16"))


def test_ranks_of_different_models_are_refused():
    a = model().for_tp_rank(2, 0)
    b = kvxfer.KVLayout.vllm_flash(4, 24, 16, 2, 32, "bfloat16").with_heads(0, 4)
    with pytest.raises(errors.LayoutMismatch, match="total_kv_heads.*8 on the sender but 4"):
        a.check_compatible(b)


def test_head_ranges_are_checked_where_they_are_made():
    with pytest.raises(errors.InvalidArgument, match=r"heads \[6, 10\) are outside the model's 8"):
        kvxfer.KVLayout.vllm_flash(4, 8, 16, 4, 32).with_heads(6, 8)
    with pytest.raises(errors.InvalidArgument, match="MLA"):
        kvxfer.KVLayout.mla(4, 8, 16, 64).with_heads(0, 1)
    with pytest.raises(errors.InvalidArgument, match="do not split evenly"):
        kvxfer.KVLayout.tp_heads(8, 3, 0)
    assert kvxfer.KVLayout.tp_heads(8, 16, 5) == (2, 1)  # more ranks than heads: heads replicated
    spec = model().for_tp_rank(2, 0).spec([0] * 4, [0] * 4)
    spec.head_begin = 6  # [6, 10) of 8: what a peer's metadata could claim
    with pytest.raises(errors.InvalidArgument, match="outside the model's 8"):
        spec.validate([1 << 30])


@pytest.mark.parametrize("kind", ["vllm_flash", "flashinfer", "blocks_first", "vllm_cpu"])
def test_a_rank_layout_describes_its_own_tensors(kind):
    """for_tp_rank scales strides and sizes with the heads: the rank's tensors register, and moving every block of
    the whole model's pool into a rank's pool fills it with exactly that rank's heads."""
    whole = model(kind=kind, num_blocks=6) if kind != "vllm_cpu" else \
        kvxfer.KVLayout.vllm_cpu(4, 6, 16, MODEL_HEADS, 32, "bfloat16")
    rank = whole.for_tp_rank(4, 2)
    assert (rank.head_begin, rank.num_kv_heads) == (4, 2) and rank.total_bytes * 4 == whole.total_bytes
    a, b = agent(f"whole-{kind}", "cma"), agent(f"rank-{kind}", "cma")
    src, dst = make_pool(whole, 8), make_pool(rank, 9)
    a.register_pool(src, whole)
    b.register_pool(dst, rank)
    pb, pa = connect(a, b)
    ids = np.arange(6, dtype=np.int32)
    want = [x.copy() for x in dst]
    apply_heads(whole, rank, src, want, ids, ids, range(4))
    move(a, b, pb, pa, 1, ids, ids)
    assert_pools_equal(dst, want)
    a.close()
    b.close()


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_staged_token_major_slices_go_out_packed(transport):
    """Through the bounce ring a token-major slice is packed: the 16 pieces of a chunk land contiguously in the
    rank's chunk, so they leave as one remote range, and a fabric write carries up to iov_limit such chunks instead
    of iov_limit pieces. Bytes exact; on tcp the posted writes are counted."""
    whole = model()
    rank = whole.for_tp_rank(2, 1)
    a = kvxfer.Agent(f"pack-p-{transport}", transport=transport, interface="lo", timeout_s=30, staging="always")
    b = agent(f"pack-d-{transport}", transport)
    src, dst = make_pool(whole, 1), make_pool(rank, 2)
    a.register_pool(src, whole)
    b.register_pool(dst, rank)
    pb, pa = connect(a, b)
    src_ids, dst_ids = [3, 9, 11, 0, 5, 20, 7, 14, 2], [1, 4, 8, 16, 23, 0, 6, 12, 19]
    want = [x.copy() for x in dst]
    apply_heads(whole, rank, src, want, src_ids, dst_ids, range(whole.num_layers))
    before = a.stats()["writes_posted"]
    send = move(a, b, pb, pa, 1, src_ids, dst_ids)
    assert send.path == "staged" and send.num_writes == 9 * 2 * 4 * 16
    assert_pools_equal(dst, want)
    if transport == "tcp":  # 4 chunks per write, batches within a layer: 4 x ceil(18 / 4) = 20 (unpacked: 288)
        assert a.stats()["writes_posted"] - before == 20
    a.close()
    b.close()


def test_peers_say_which_heads_they_hold_and_mismatches_show_at_handshake():
    whole = model()
    a, b, c = agent("hs-tp1", "tcp"), agent("hs-tp4-r0", "tcp"), agent("hs-tp4-r3", "tcp")
    a.register_pool(make_pool(whole.for_tp_rank(4, 0), 1), whole.for_tp_rank(4, 0))
    b.register_pool(make_pool(whole.for_tp_rank(4, 0), 2), whole.for_tp_rank(4, 0))
    c.register_pool(make_pool(whole.for_tp_rank(4, 3), 3), whole.for_tp_rank(4, 3))
    pb, pc = a.add_peer(b.metadata()), a.add_peer(c.metadata())
    assert list(pc.heads.values()) == [(6, 8, 8)] and list(pb.heads.values()) == [(0, 2, 8)]
    a.check_peer(pb)  # same heads: fine
    with pytest.raises(errors.LayoutMismatch, match=r"\[0, 2\).*\[6, 8\).*no head in common"):
        a.check_peer(pc)
    for x in (a, b, c):
        x.close()
