"""Pools of different tensor-parallel ranks (and block sizes) on the GPU paths: a TP 1 sender (another process, GPU pool) into decode
rank 1 of TP 2 (this process), through CUDA IPC into a GPU pool and through the staged path into a host pool, with
token-major (one piece per token) and head-major (one piece per chunk) chunks. The destination is checked byte for
byte against tests/reference.apply_heads over the whole pool: the other rank's heads must not appear anywhere."""
import numpy as np
import pytest

import kvxfer
from tests.gpu.conftest import requires_gpu
from tests.reference import apply_heads, apply_tokens, make_pool

pytestmark = requires_gpu

ARGS = [8, 64, 16, 4, 64, "float16"]  # the model: 4 KV heads of 64 dims; a TP 2 rank holds 2


@pytest.mark.parametrize("dst_where", ["cuda:0", "cpu"])
@pytest.mark.parametrize("head_major", [False, True], ids=["NHD", "HND"])
def test_tp1_gpu_sender_into_a_tp2_rank(gpu_remote, dst_where, head_major):
    import torch

    whole = kvxfer.KVLayout.vllm_flash(*ARGS, head_major=head_major)
    rank = whole.for_tp_rank(2, 1)
    agent = kvxfer.Agent("gpu-tp-receiver", transport="auto", interface="lo", timeout_s=30)
    dst_host = make_pool(rank, 77)
    dst = [torch.from_numpy(a).to(dst_where) for a in dst_host] if dst_where != "cpu" else dst_host
    if dst_where != "cpu":
        torch.cuda.synchronize()  # the copies to the GPU landed before kvxfer's streams (not ordered after) write
    agent.register_pool(dst, rank)
    md = gpu_remote.call("init", ("auto", "vllm_flash", 21, ARGS + [{"head_major": head_major}], "cuda:0", {}))
    peer = agent.add_peer(md)
    gpu_remote.call("add_peer", agent.metadata())
    agent.wait_connected(peer, 20)
    rng = np.random.default_rng(21)
    src_ids = rng.choice(whole.num_blocks, 24, replace=False).astype(np.int32)
    dst_ids = rng.choice(rank.num_blocks, 24, replace=False).astype(np.int32)
    expected = [a.copy() for a in dst_host]
    apply_heads(whole, rank, make_pool(whole, 21), expected, src_ids, dst_ids, range(whole.num_layers))
    recv = agent.recv(peer, 1, dst_ids)
    path, reason = gpu_remote.call("send", (1, src_ids.tolist(), dst_ids.tolist()))
    assert gpu_remote.call("wait", (1, 30)) == "DONE"
    recv.wait(timeout_s=30)
    assert path == ("cuda_ipc" if dst_where != "cpu" else "staged") and "KV heads [2, 4)" in reason, reason
    got = [t.cpu().numpy() if hasattr(t, "cpu") else t for t in dst]
    for g, w in zip(got, expected):
        np.testing.assert_array_equal(g, w)
    agent.close()


@pytest.mark.parametrize("dst_where", ["cuda:0", "cpu"])
def test_16_token_gpu_blocks_into_32_token_blocks_of_a_tp2_rank(gpu_remote, dst_where):
    """Block sizes and TP ranks together: 40 tokens from 16-token blocks (TP 1) into 32-token blocks of rank 0."""
    import torch

    src_l = kvxfer.KVLayout.vllm_flash(*ARGS)
    dst_l = kvxfer.KVLayout.vllm_flash(8, 32, 32, 4, 64, "float16").for_tp_rank(2, 0)
    agent = kvxfer.Agent("gpu-bs-receiver", transport="auto", interface="lo", timeout_s=30)
    dst_host = make_pool(dst_l, 78)
    dst = [torch.from_numpy(a).to(dst_where) for a in dst_host] if dst_where != "cpu" else dst_host
    if dst_where != "cpu":
        torch.cuda.synchronize()  # the copies to the GPU landed before kvxfer's streams (not ordered after) write
    agent.register_pool(dst, dst_l)
    md = gpu_remote.call("init", ("auto", "vllm_flash", 22, list(ARGS), "cuda:0", {}))
    peer = agent.add_peer(md)
    gpu_remote.call("add_peer", agent.metadata())
    agent.wait_connected(peer, 20)
    src_ids, dst_ids = np.array([9, 3, 40], np.int32), np.array([17, 2], np.int32)
    expected = [a.copy() for a in dst_host]
    apply_tokens(src_l, dst_l, make_pool(src_l, 22), expected, src_ids, dst_ids, 40, range(src_l.num_layers))
    recv = agent.recv(peer, 1, dst_ids, num_tokens=40)
    path, reason = gpu_remote.call("send", (1, src_ids.tolist(), dst_ids.tolist(), 40))
    assert gpu_remote.call("wait", (1, 30)) == "DONE"
    recv.wait(timeout_s=30)
    assert "blocks of 16 tokens land in blocks of 32" in reason, reason
    got = [t.cpu().numpy() if hasattr(t, "cpu") else t for t in dst]
    for g, w in zip(got, expected):
        np.testing.assert_array_equal(g, w)
    agent.close()
