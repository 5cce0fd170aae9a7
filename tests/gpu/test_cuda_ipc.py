"""GPU paths between two processes on one GPU (run on a machine with an NVIDIA GPU; skipped elsewhere with the
reason): CUDA IPC into a GPU pool, GPU pool to host pool through the staged path, and host pool back into a GPU
pool. Every test checks the destination byte for byte against tests/reference.py, including the untouched guard
blocks, and that the receiver counted exactly every layer."""
import numpy as np
import pytest

import kvxfer
from tests.gpu.conftest import requires_gpu
from tests.reference import apply, make_pool

pytestmark = requires_gpu

# 8 layers x 64 blocks of 16 tokens x 4 heads x 64 dims, fp16: 8 KiB chunks, 8 MiB per pool.
ARGS = (8, 64, 16, 4, 64, "float16")


def setup_pair(remote, transport, src_where, dst_where, seed, sender_kwargs=None, args=ARGS, receiver_kwargs=None):
    import torch

    layout = kvxfer.KVLayout.vllm_flash(*args)
    agent = kvxfer.Agent("gpu-receiver", transport=transport, interface="lo", timeout_s=30, **(receiver_kwargs or {}))
    dst_host = make_pool(layout, seed + 1000)  # guard pattern: bytes nobody addressed must keep it
    dst = [torch.from_numpy(a).to(dst_where) for a in dst_host] if dst_where != "cpu" else dst_host
    if dst_where != "cpu":
        torch.cuda.synchronize()  # the copies to the GPU landed before kvxfer's streams (not ordered after) write
    agent.register_pool(dst, layout)
    md = remote.call("init", (transport, "vllm_flash", seed, list(args), src_where, sender_kwargs or {}))
    peer = agent.add_peer(md)
    remote.call("add_peer", agent.metadata())
    agent.wait_connected(peer, 20)
    return agent, peer, layout, dst, dst_host


def run_and_check(remote, agent, peer, layout, dst, dst_host, seed, xfer):
    rng = np.random.default_rng(seed)
    n = layout.num_blocks // 2
    src_ids = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    dst_ids = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    expected = [a.copy() for a in dst_host]
    apply(layout, make_pool(layout, seed), expected, src_ids, dst_ids, range(layout.num_layers))
    recv = agent.recv(peer, xfer, dst_ids)
    path, reason = remote.call("send", (xfer, src_ids.tolist(), dst_ids.tolist()))
    # The sender first: when it failed, its error says why (the receiver would only see a timeout).
    assert remote.call("wait", (xfer, 30)) == "DONE"
    recv.wait(timeout_s=30)
    assert recv.layers_done == layout.num_layers
    got = [t.cpu().numpy() if hasattr(t, "cpu") else t for t in dst]
    for g, w in zip(got, expected):
        np.testing.assert_array_equal(g, w)
    return path, reason


def send_exact_to_remote(agent, peer, receiver, layout, src_host, seed, xfer, n=24):
    """n random blocks of every layer from `agent`'s pool (whose bytes are src_host) into a serve_receiver peer's
    GPU pool (guard pattern make_pool(seed + 1000)) over CUDA IPC: the whole pool read back equals the reference."""
    rng = np.random.default_rng(seed)
    src_ids = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    dst_ids = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    expected = make_pool(layout, seed + 1000)
    apply(layout, src_host, expected, src_ids, dst_ids, range(layout.num_layers))
    receiver.call("recv", (xfer, dst_ids.tolist()))
    send = agent.send(peer, xfer, src_ids, dst_ids)
    send.all_ready()
    send.wait(timeout_s=30)
    assert receiver.call("wait", (xfer, 30)) == "DONE"
    assert send.path == "cuda_ipc"
    for got, want in zip(receiver.call("read", None), expected):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(params=["kernel", "copy_engine"])
def remote_copy_mode(request, monkeypatch):
    """A sender whose GPU copies run as the gather kernel, or on the copy engines (KVXFER_GPU_COPY)."""
    from tests.conftest import RemoteSender
    from tests.gpu.gpu_peer import serve

    monkeypatch.setenv("KVXFER_GPU_COPY", request.param)  # the spawned sender inherits it
    r = RemoteSender(serve)
    yield r
    r.close()


@requires_gpu
def test_cuda_ipc_gpu_to_gpu_byte_exact(remote_copy_mode):
    agent, peer, layout, dst, dst_host = setup_pair(remote_copy_mode, "auto", "cuda:0", "cuda:0", seed=3)
    path, reason = run_and_check(remote_copy_mode, agent, peer, layout, dst, dst_host, 3, 1)
    assert path == "cuda_ipc" and "CUDA IPC" in reason


@pytest.fixture(params=["batched", "per_layer"])
def remote_launch_mode(request, monkeypatch):
    """A sender whose cuda_ipc layers go as one gather kernel marking each layer landed (batched), or one launch and
    one event per layer (KVXFER_GPU_LAUNCH=per_layer)."""
    from tests.conftest import RemoteSender
    from tests.gpu.gpu_peer import serve

    monkeypatch.setenv("KVXFER_GPU_LAUNCH", request.param)
    r = RemoteSender(serve)
    r.launch_mode = request.param
    yield r
    r.close()


@requires_gpu
def test_cuda_ipc_launch_modes_all_ready_and_layer_by_layer(remote_launch_mode):
    """all_ready() (every layer in one launch when batched), then layers marked one at a time in a shuffled order
    with pauses (a launch per layer, signals in marking order): bytes exact, every layer counted, and the batched
    kernel really carried them (stats)."""
    remote = remote_launch_mode
    agent, peer, layout, dst, dst_host = setup_pair(remote, "auto", "cuda:0", "cuda:0", seed=12)
    path, _ = run_and_check(remote, agent, peer, layout, dst, dst_host, 12, 1)
    assert path == "cuda_ipc"
    launches = remote.call("stats", None)["gpu_layer_launches"]
    assert launches == (1 if remote.launch_mode == "batched" else 0)

    rng = np.random.default_rng(13)
    n = layout.num_blocks // 2
    src_ids = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    dst_ids = rng.choice(layout.num_blocks, n, replace=False).astype(np.int32)
    before = [t.cpu().numpy() for t in dst]
    expected = [a.copy() for a in before]
    apply(layout, make_pool(layout, 12), expected, src_ids, dst_ids, range(layout.num_layers))
    recv = agent.recv(peer, 2, dst_ids)
    order = [int(x) for x in rng.permutation(layout.num_layers)]
    remote.call("send_layers", (2, src_ids.tolist(), dst_ids.tolist(), order, 0.005))
    assert remote.call("wait", (2, 30)) == "DONE"
    recv.wait(timeout_s=30)
    assert recv.layers_done == layout.num_layers
    for g, w in zip((t.cpu().numpy() for t in dst), expected):
        np.testing.assert_array_equal(g, w)
    if remote.launch_mode == "batched":  # 1 + at least one launch per pause-separated layer (some may share one)
        assert remote.call("stats", None)["gpu_layer_launches"] >= 1 + layout.num_layers // 2


@requires_gpu
def test_cuda_ipc_layer_larger_than_one_kernel_launch(gpu_remote):
    """2 layers x 10,000 blocks x K,V = 20,000 chunks of 256 bytes per layer: more descriptors than one gather-copy
    launch takes (16,384), so a layer's batch is split across launches under one completion event."""
    big = (2, 20000, 16, 1, 8, "float16")
    agent, peer, layout, dst, dst_host = setup_pair(gpu_remote, "auto", "cuda:0", "cuda:0", seed=9, args=big)
    assert 2 * (layout.num_blocks // 2) > 16384
    path, _ = run_and_check(gpu_remote, agent, peer, layout, dst, dst_host, 9, 3)
    assert path == "cuda_ipc"


@requires_gpu
def test_gpu_pool_to_host_pool_staged_byte_exact_in_both_copy_modes(remote_copy_mode):
    agent, peer, layout, dst, dst_host = setup_pair(remote_copy_mode, "auto", "cuda:0", "cpu", seed=5)
    path, _ = run_and_check(remote_copy_mode, agent, peer, layout, dst, dst_host, 5, 2)
    assert path == "staged"


@requires_gpu
def test_cuda_ipc_many_requests_reuse_one_mapping(gpu_remote):
    agent, peer, layout, dst, dst_host = setup_pair(gpu_remote, "auto", "cuda:0", "cuda:0", seed=4)
    # The sender mapped our pool when it added us (connect time), not at its first send.
    assert gpu_remote.call("stats", None)["ipc_pools_mapped"] == 1
    for xfer in range(5):  # the same destination pool: every send reuses that one mapping
        run_and_check(gpu_remote, agent, peer, layout, dst, dst_host, 4, 100 + xfer)
        dst_host = [t.cpu().numpy() for t in dst]
    assert gpu_remote.call("stats", None)["ipc_pools_mapped"] == 1


@requires_gpu
def test_gpu_pool_to_host_pool_staged_over_cma(gpu_remote):
    agent, peer, layout, dst, dst_host = setup_pair(gpu_remote, "auto", "cuda:0", "cpu", seed=5,
                                                    sender_kwargs={"staging_slot_bytes": 1 << 16, "staging_slots": 4})
    path, reason = run_and_check(gpu_remote, agent, peer, layout, dst, dst_host, 5, 2)
    assert path == "staged" and "pinned" in reason and "-> cma" in reason


@requires_gpu
def test_gpu_pool_to_host_pool_staged_over_tcp(gpu_remote):
    agent, peer, layout, dst, dst_host = setup_pair(gpu_remote, "tcp", "cuda:0", "cpu", seed=6,
                                                    sender_kwargs={"staging_slot_bytes": 1 << 16, "staging_slots": 4})
    path, reason = run_and_check(gpu_remote, agent, peer, layout, dst, dst_host, 6, 3)
    assert path == "staged" and "tcp" in reason


@requires_gpu
def test_host_pool_back_into_gpu_pool(gpu_remote):
    agent, peer, layout, dst, dst_host = setup_pair(gpu_remote, "auto", "cpu", "cuda:0", seed=7)
    path, _ = run_and_check(gpu_remote, agent, peer, layout, dst, dst_host, 7, 4)
    assert path == "cuda_ipc"  # host source, GPU destination on this host: copy engines write the IPC mapping


@requires_gpu
def test_gpu_pool_across_hosts_without_gpu_direct_lands_through_landing_slots(gpu_remote):
    """tcp cannot write GPU memory, and transport='tcp' rules out CUDA IPC (as between two hosts): the sender writes
    into the receiver's pinned landing slots and the receiver copies them into its GPU pool."""
    agent, peer, layout, dst, dst_host = setup_pair(gpu_remote, "tcp", "cpu", "cuda:0", seed=8,
                                                    receiver_kwargs={"landing_slot_bytes": 1 << 16, "landing_slots": 2})
    path, reason = run_and_check(gpu_remote, agent, peer, layout, dst, dst_host, 8, 5)
    assert path == "staged" and "landing slots (2 x 64 KiB)" in reason and "GPU pool" in reason
    assert agent.landing()["pinned"] and agent.stats()["landings"] > 2 and agent.stats()["landing_rejected"] == 0


@requires_gpu
def test_gpu_to_gpu_across_hosts_staged_at_both_ends_in_both_copy_modes(remote_copy_mode):
    """GPU -> pinned bounce slots -> tcp -> pinned landing slots -> GPU: both copies in the copy mode under test
    (the receiver's process reads the same KVXFER_GPU_COPY), rings small enough to turn over many times."""
    agent, peer, layout, dst, dst_host = setup_pair(
        remote_copy_mode, "tcp", "cuda:0", "cuda:0", seed=10,
        sender_kwargs={"staging_slot_bytes": 1 << 16, "staging_slots": 3},
        receiver_kwargs={"landing_slot_bytes": 1 << 16, "landing_slots": 2})
    for xfer in range(3):
        path, reason = run_and_check(remote_copy_mode, agent, peer, layout, dst, dst_host, 10, 20 + xfer)
        dst_host = [t.cpu().numpy() for t in dst]
    assert path == "staged" and "cuda:0 -> host bounce slots" in reason and "GPU pool" in reason


@requires_gpu
@pytest.mark.parametrize("args", [ARGS, (2, 768, 16, 8, 128, "bfloat16")], ids=["small", "multi-piece"])
def test_expandable_segments_pool_is_reached_through_vmm_handles(monkeypatch, args):
    """A receiver whose KV cache comes from PyTorch's expandable segments (cuMem/VMM memory, no legacy IPC handle)
    exports its physical allocations (POSIX fd or fabric handles); the sender maps them back to back and writes with
    CUDA IPC as usual: bytes exact, guards untouched. small: every layer inside one physical allocation; multi-piece:
    48 MiB layers, each spanning several of the allocator's 20 MiB pieces (the pieces are found by their handles,
    not by the pointer's range attributes, which name the whole reserved range)."""
    from tests.conftest import RemoteSender
    from tests.gpu.gpu_peer import serve_receiver

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # the spawned receiver allocates so
    receiver = RemoteSender(serve_receiver)
    try:
        layout = kvxfer.KVLayout.vllm_flash(*args)
        md = receiver.call("init", ("auto", "vllm_flash", 12, list(args), "cuda:0", {}))
        agent = kvxfer.Agent("vmm-sender", interface="lo", timeout_s=30)
        src = make_pool(layout, 12)
        agent.register_pool(src, layout)
        peer = agent.add_peer(md)
        receiver.call("add_peer", agent.metadata())
        agent.wait_connected(peer, 20)
        assert set(peer._h.region_sharing) == {"vmm"}, peer._h.region_sharing  # not legacy IPC handles
        send_exact_to_remote(agent, peer, receiver, layout, src, seed=12, xfer=7)
    finally:
        receiver.close()


@requires_gpu
@pytest.mark.parametrize("dst_where,path", [("cuda:0", "cuda_ipc"), ("cpu", "staged")])
def test_receiver_cancel_mid_transfer_on_the_gpu_paths(gpu_remote, dst_where, path):
    """Layer 0 landed (a GPU copy into the peer's IPC mapping, or GPU -> pinned slots -> cma) when the receiver
    cancels: the sender's send fails with Cancelled, writes_over turns True once its copies landed and its ABORT
    count was met, and only layer 0's addressed bytes changed (guards intact)."""
    from tests.conftest import RemoteError, wait_for

    agent, peer, layout, dst, dst_host = setup_pair(gpu_remote, "auto", "cuda:0", dst_where, seed=9)
    src_ids, dst_ids = [0, 1, 2], [5, 6, 7]
    expected = [a.copy() for a in dst_host]
    apply(layout, make_pool(layout, 9), expected, src_ids, dst_ids, [0])
    recv = agent.recv(peer, 1, dst_ids)
    got_path, _ = gpu_remote.call("send_layers", (1, src_ids, dst_ids, [0], 0.0))
    assert got_path == path
    recv.wait(layer=0, timeout_s=30)
    recv.cancel("preempted")
    with pytest.raises(RemoteError, match="Cancelled"):
        gpu_remote.call("wait", (1, 10))
    wait_for(lambda: recv.writes_over, "writes_over of the cancelled GPU transfer", timeout_s=10)
    got = [t.cpu().numpy() if hasattr(t, "cpu") else t for t in dst]
    for g, w in zip(got, expected):
        np.testing.assert_array_equal(g, w)


@requires_gpu
def test_cuda_ipc_between_two_agents_of_one_process():
    """A benchmark's or preflight's pair, or TP ranks sharing a process: CUDA refuses to open an IPC handle its own
    process exported, so the sender writes to the peer's addresses as they are (they are valid here)."""
    import torch

    layout = kvxfer.KVLayout.vllm_flash(*ARGS)
    src_host, dst_host = make_pool(layout, 31), make_pool(layout, 1031)
    src = [torch.from_numpy(a).to("cuda:0") for a in src_host]
    dst = [torch.from_numpy(a).to("cuda:0") for a in dst_host]
    torch.cuda.synchronize()
    a = kvxfer.Agent("ipc-one-process-tx", transport="auto", interface="lo", timeout_s=30)
    b = kvxfer.Agent("ipc-one-process-rx", transport="auto", interface="lo", timeout_s=30)
    a.register_pool(src, layout)
    b.register_pool(dst, layout)
    peer_b, peer_a = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(peer_b, 20)
    b.wait_connected(peer_a, 20)
    src_ids, dst_ids = np.array([3, 9, 4], np.int32), np.array([60, 2, 33], np.int32)
    expected = [x.copy() for x in dst_host]
    apply(layout, src_host, expected, src_ids, dst_ids, range(layout.num_layers))
    recv = b.recv(peer_a, 1, dst_ids)
    send = a.send(peer_b, 1, src_ids, dst_ids)
    assert send.path == "cuda_ipc", send.path_reason
    send.all_ready()
    send.wait(timeout_s=30)
    recv.wait(timeout_s=30)
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got.cpu().numpy(), want)
    a.close()
    b.close()


@requires_gpu
def test_cupy_arrays_register_and_send_over_cuda_ipc():
    """A pool of cupy arrays (read through __cuda_array_interface__; kvxfer never imports cupy) registers like torch
    tensors and reaches a GPU pool of another process by CUDA IPC: bytes exact, guards untouched."""
    cp = pytest.importorskip("cupy")
    from tests.conftest import RemoteSender
    from tests.gpu.gpu_peer import serve_receiver

    receiver = RemoteSender(serve_receiver)
    agent = None
    try:
        layout = kvxfer.KVLayout.vllm_flash(*ARGS)
        md = receiver.call("init", ("auto", "vllm_flash", 13, list(ARGS), "cuda:0", {}))
        src_host = make_pool(layout, 13)
        src = [cp.asarray(a) for a in src_host]
        cp.cuda.runtime.deviceSynchronize()  # the uploads landed before kvxfer's stream (not ordered after) reads
        agent = kvxfer.Agent("cupy-sender", interface="lo", timeout_s=30)
        agent.register_pool(src, layout)
        peer = agent.add_peer(md)
        receiver.call("add_peer", agent.metadata())
        agent.wait_connected(peer, 20)
        send_exact_to_remote(agent, peer, receiver, layout, src_host, seed=13, xfer=3)
    finally:
        if agent is not None:
            agent.close()
        receiver.close()
