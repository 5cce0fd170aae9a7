"""Pools whose blocks hold different numbers of tokens (a prefill engine with 16-token blocks, a decode engine with
32, or the other way round): send/recv with num_tokens move the request's tokens in order, token t from
src_ids[t // Bs] into dst_ids[t // Bd]. Checked token by token against tests/reference.apply_tokens over the whole
destination pool (the rows after the request's last token, and every other block, keep their bytes)."""
import numpy as np
import pytest

import kvxfer
from kvxfer import _C, errors
from tests.conftest import local_pair
from tests.reference import apply, apply_tokens


def flash(block_size, num_blocks=12, head_major=False):
    return kvxfer.KVLayout.vllm_flash(3, num_blocks, block_size, 4, 16, "bfloat16", head_major=head_major)


def pair(transport, src_l, dst_l, tag, timeout_s=30):
    return local_pair(src_l, transport, (f"bs-a-{tag}", f"bs-b-{tag}"), timeout_s=timeout_s, dst_layout=dst_l)


def transfer(transport, src_l, dst_l, src_ids, dst_ids, tokens, tag):
    a, b, pb, pa, src, dst = pair(transport, src_l, dst_l, tag)
    want = [x.copy() for x in dst]
    apply_tokens(src_l, dst_l, src, want, src_ids, dst_ids, tokens, range(src_l.num_layers))
    recv = b.recv(pa, 1, dst_ids, num_tokens=tokens)
    send = a.send(pb, 1, src_ids, dst_ids, num_tokens=tokens)
    send.all_ready()
    recv.wait(timeout_s=30)
    send.wait(timeout_s=30)
    for g, w in zip(dst, want):
        np.testing.assert_array_equal(g, w)
    a.close()
    b.close()
    return send


@pytest.mark.parametrize("transport", ["tcp", "fi_shm", "cma"])
@pytest.mark.parametrize("bs,bd", [(16, 32), (32, 16), (16, 48), (8, 16)])
def test_blocks_of_different_sizes(transport, bs, bd):
    tokens = 40  # a partial last block on both sides
    src_l, dst_l = flash(bs), flash(bd)
    rng = np.random.default_rng(bs * 100 + bd)
    src_ids = rng.permutation(12)[:-(-tokens // bs)].astype(np.int32)
    dst_ids = rng.permutation(12)[:-(-tokens // bd)].astype(np.int32)
    send = transfer(transport, src_l, dst_l, src_ids, dst_ids, tokens, f"{transport}-{bs}-{bd}")
    assert send.nbytes == tokens * 3 * 2 * 4 * 16 * 2  # tokens x layers x K,V x heads x head_dim x bf16
    assert f"blocks of {bs} tokens land in blocks of {bd}" in send.path_reason


@pytest.mark.parametrize("head_major", [False, True], ids=["NHD", "HND"])
def test_different_block_sizes_and_tp_ranks_together(head_major):
    """A TP 1 prefill pool of 16-token blocks into decode rank 1 of TP 2 with 32-token blocks."""
    src_l = flash(16, head_major=head_major)
    dst_l = flash(32, head_major=head_major).for_tp_rank(2, 1)
    transfer("tcp", src_l, dst_l, np.array([7, 2, 9], np.int32), np.array([4, 0], np.int32), 37, f"tp-{head_major}")


def test_mla_latents_of_different_block_sizes():
    src_l = kvxfer.KVLayout.mla(3, 12, 16, 64, "bfloat16")
    dst_l = kvxfer.KVLayout.mla(3, 12, 64, 64, "bfloat16")
    transfer("cma", src_l, dst_l, np.array([3, 1, 8, 0, 5], np.int32), np.array([2, 6], np.int32), 70, "mla")


def test_equal_block_sizes_with_num_tokens_leave_the_tail_alone():
    """20 tokens of two 16-token blocks: the second block's last 12 rows keep their bytes (and move no bytes)."""
    send = transfer("tcp", flash(16), flash(16), np.array([3, 4], np.int32), np.array([9, 1], np.int32), 20, "tail")
    assert send.nbytes == 20 * 3 * 2 * 4 * 16 * 2


def test_contiguous_runs_still_merge_into_one_write():
    # 16-token source blocks 0, 1 into one 32-token destination block: both halves follow on both sides
    src_l, dst_l = flash(16), flash(32)
    spec = lambda lay: lay.spec([0] * 3, [0] * 3)  # noqa: E731
    p = _C.build_plan(spec(src_l), spec(dst_l), np.array([0, 1], np.int32), np.array([0], np.int32), 0, 3, 8 << 20, 32)
    per_layer = len(p["nbytes"]) // 3
    assert per_layer == 2 and set(p["nbytes"]) == {dst_l.chunk_bytes}  # K and V: one write each
    assert set(p["granules"]) == {2 * 16 * 4}  # two runs of 16 tokens x 4 heads: a granule per row


def test_what_is_refused():
    a, b, pb, pa, _, _ = pair("tcp", flash(16), flash(32), "refuse", timeout_s=5)
    with pytest.raises(errors.InvalidArgument, match="blocks hold 16 and 32 tokens: pass num_tokens"):
        a.send(pb, 1, [0, 1], [0])
    with pytest.raises(errors.InvalidArgument, match="blocks hold 16 and 32 tokens: pass num_tokens"):
        b.recv(pa, 1, [0])
    with pytest.raises(errors.InvalidArgument, match="40 tokens fill 3 source blocks of 16 tokens and 2 destination "
                                                     "blocks of 32, but src_ids has 2 and dst_ids 2"):
        a.send(pb, 2, [0, 1], [0, 1], num_tokens=40)
    with pytest.raises(errors.InvalidArgument, match="num_tokens=0 must be a positive token count"):
        a.send(pb, 3, [0], [0], num_tokens=0)
    a.close()
    b.close()


def test_sides_disagreeing_on_num_tokens_fail_instead_of_completing():
    """The sender moves 40 tokens, the receiver expects 48 (both fill 2 blocks of 32): the counts differ, so the
    recv fails naming the mismatch rather than completing with 8 tokens never written."""
    a, b, pb, pa, _, _ = pair("tcp", flash(16), flash(32), "dis", timeout_s=10)
    recv = b.recv(pa, 1, [3, 5], num_tokens=48)
    a.send(pb, 1, [0, 1, 2], [3, 5], num_tokens=40).all_ready()
    with pytest.raises(errors.TransferFailed, match="block count or layer range differs"):
        recv.wait(timeout_s=10)
    a.close()
    b.close()


def test_a_run_of_more_rows_than_one_immediate_counts_is_split():
    """256 tokens x 32 heads = 8,192 rows in one contiguous run: more than an immediate's 4,095 granules, so the
    run leaves as several writes; bytes exact and the count complete."""
    src_l = kvxfer.KVLayout.vllm_flash(2, 4, 256, 32, 4, "uint8")
    dst_l = kvxfer.KVLayout.vllm_flash(2, 4, 512, 32, 4, "uint8")
    send = transfer("tcp", src_l, dst_l, np.array([2, 0], np.int32), np.array([3], np.int32), 300, "rows")
    assert send.num_writes > 2 * 2 * 2  # layers x planes x runs, each of the 256-token runs split in two


def cpu_attn(block_size, num_blocks=12):
    return kvxfer.KVLayout.vllm_cpu(3, num_blocks, block_size, 4, 16, "float32")


def test_cpu_pools_of_different_block_sizes_are_refused():
    """vLLM's CPU backend keeps K transposed per (block, head) ([head_dim][block_size]): a token's K is a column, not
    a row, so 16- and 32-token blocks cannot exchange tokens; refused at handshake and at send, naming why."""
    a, b, pb, _, _, _ = pair("tcp", cpu_attn(16), cpu_attn(32), "cpu-refuse", timeout_s=5)
    with pytest.raises(errors.LayoutMismatch, match="blocks of 16 tokens on the sender and 32 on the receiver, but a "
                                                    "vllm_cpu pool does not store a token's K contiguously"):
        a.check_peer(pb)
    with pytest.raises(errors.LayoutMismatch, match="K transposed per block"):
        a.send(pb, 1, [0, 1, 2], [0, 1], num_tokens=40)
    a.close()
    b.close()


@pytest.mark.parametrize("transport", ["tcp", "cma"])
def test_cpu_pools_move_a_partial_last_block_whole(transport):
    """20 tokens of two 16-token CPU blocks: a row-wise copy of the first 4 tokens would write K's first 8 head_dim
    columns of every token instead; the whole second block moves (its tail is the request's own unused rows)."""
    layout = cpu_attn(16)
    a, b, pb, pa, src, dst = pair(transport, layout, layout, f"cpu-tail-{transport}")
    src_ids, dst_ids = np.array([3, 4], np.int32), np.array([9, 1], np.int32)
    want = [x.copy() for x in dst]
    apply(layout, src, want, src_ids, dst_ids, range(layout.num_layers))
    recv = b.recv(pa, 1, dst_ids, num_tokens=20)
    send = a.send(pb, 1, src_ids, dst_ids, num_tokens=20)
    send.all_ready()
    recv.wait(timeout_s=30)
    for g, w in zip(dst, want):
        np.testing.assert_array_equal(g, w)
    assert send.nbytes == 2 * layout.chunk_bytes * layout.num_layers
    with pytest.raises(errors.InvalidArgument, match="40 tokens fill 3 blocks of 16 tokens, but src_ids has 2"):
        a.send(pb, 2, src_ids, dst_ids, num_tokens=40)
    with pytest.raises(errors.InvalidArgument, match="40 tokens fill 3 blocks of 16 tokens, but dst_ids has 2"):
        b.recv(pa, 2, dst_ids, num_tokens=40)
    a.close()
    b.close()
