"""Registration (kvxfer/memory.py, Agent.register_pool): numpy, torch and raw ranges; errors at registration time."""
import ctypes
import mmap

import numpy as np
import pytest

import kvxfer
from kvxfer import errors
from tests.reference import apply, make_pool

LAYOUT = kvxfer.KVLayout.vllm_flash(3, 16, 16, 2, 32, "float16")


def _pair(src_memory, dst_memory, layout=LAYOUT):
    a = kvxfer.Agent("reg-src", transport="tcp", interface="lo", timeout_s=20)
    b = kvxfer.Agent("reg-dst", transport="tcp", interface="lo", timeout_s=20)
    a.register_pool(src_memory, layout)
    b.register_pool(dst_memory, layout)
    peer_b, peer_a = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    return a, b, peer_a, peer_b


def _move(src_memory, dst_memory, src_ids, dst_ids):
    a, b, peer_a, peer_b = _pair(src_memory, dst_memory)
    recv = b.recv(peer_a, 7, dst_ids)
    a.send(peer_b, 7, src_ids, dst_ids).all_ready()
    recv.wait(timeout_s=20)
    a.close(), b.close()


def test_raw_ranges_move_the_bytes_they_name():
    src, dst = make_pool(LAYOUT, 1), make_pool(LAYOUT, 2)
    expect = [x.copy() for x in dst]
    raw = lambda arrays: [(x.ctypes.data, x.nbytes, -1) for x in arrays]  # noqa: E731
    _move(raw(src), raw(dst), [3, 4, 9], [15, 0, 7])
    apply(LAYOUT, src, expect, [3, 4, 9], [15, 0, 7], range(3))
    for got, want in zip(dst, expect):
        np.testing.assert_array_equal(got, want)


def test_one_raw_range_of_numpy_integers_is_one_region():
    """(ptr, nbytes, device) as numpy integers (what arithmetic on .ctypes.data or array sizes gives) is a raw range,
    not a list of three things to register."""
    layout = kvxfer.KVLayout.contiguous(16, 4096)
    buf = np.zeros(16 * 4096, np.uint8)
    a = kvxfer.Agent("reg-np-int", transport="tcp", interface="lo")
    pool = a.register_pool((np.int64(buf.ctypes.data), np.int64(buf.nbytes), np.int32(-1)), layout)
    assert [(r.addr, r.nbytes, r.device) for r in pool._regions] == [(buf.ctypes.data, buf.nbytes, -1)]
    a.close()


def test_torch_cpu_tensors_per_layer_and_stacked():
    torch = pytest.importorskip("torch", reason="torch not installed (scripts/setup.sh installs torch==2.13.0)")
    shape = (2, LAYOUT.num_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    gen = torch.Generator().manual_seed(3)
    src = [torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.float16) for _ in range(3)]
    dst = torch.zeros((3, *shape), dtype=torch.float16)  # one stacked tensor for all layers
    _move(src, dst, [0, 1, 2, 10], [5, 6, 7, 11])
    for layer in range(3):
        torch.testing.assert_close(dst[layer][:, [5, 6, 7, 11]], src[layer][:, [0, 1, 2, 10]], rtol=0, atol=0)
        untouched = [i for i in range(LAYOUT.num_blocks) if i not in (5, 6, 7, 11)]
        assert torch.count_nonzero(dst[layer][:, untouched]) == 0


def test_torch_tensor_refusals_name_the_cause():
    torch = pytest.importorskip("torch", reason="torch not installed (scripts/setup.sh installs torch==2.13.0)")
    a = kvxfer.Agent("reg", transport="tcp", interface="lo")
    shape = (2, LAYOUT.num_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    strided = torch.zeros((shape[0], shape[1], shape[2], shape[4], shape[3]), dtype=torch.float16).transpose(3, 4)
    with pytest.raises(errors.InvalidArgument, match="not contiguous"):
        a.register_pool([strided] * 3, LAYOUT)
    with pytest.raises(errors.InvalidArgument, match="meta cannot be registered"):
        a.register_pool([torch.empty(shape, dtype=torch.float16, device="meta")] * 3, LAYOUT)
    with pytest.raises(errors.PoolTooSmall):
        a.register_pool([torch.zeros(10, dtype=torch.float16)] * 3, LAYOUT)


def test_unmapped_raw_range_fails_at_registration():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    page = mmap.PAGESIZE
    addr = libc.mmap(None, 4 * page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value)
    assert libc.munmap(ctypes.c_void_p(addr + 2 * page), page) == 0  # a hole at page 2
    try:
        a = kvxfer.Agent("reg", transport="tcp", interface="lo")
        layout = kvxfer.KVLayout.contiguous(4, page)
        with pytest.raises(errors.RegistrationFailed, match=f"offset {2 * page} of {4 * page}.* is not mapped"):
            a.register_pool((addr, 4 * page, -1), layout)
        a.register_pool((addr, 2 * page, -1), kvxfer.KVLayout.contiguous(2, page))  # the mapped part is fine
        a.close()
    finally:
        libc.munmap(ctypes.c_void_p(addr), 2 * page)
        libc.munmap(ctypes.c_void_p(addr + 3 * page), page)


def test_read_only_raw_range_fails_at_registration():
    a = kvxfer.Agent("reg", transport="tcp", interface="lo")
    layout = kvxfer.KVLayout.contiguous(2, 4096)
    ro = mmap.mmap(-1, 2 * 4096, prot=mmap.PROT_READ)
    addr = np.frombuffer(ro, np.uint8).ctypes.data
    with pytest.raises(errors.RegistrationFailed, match=r"without read\+write permission \(r--"):
        a.register_pool((addr, 2 * 4096, -1), layout)
    with pytest.raises(errors.InvalidArgument, match="read-only"):
        a.register_pool(np.frombuffer(ro, np.uint8), layout)


def test_raw_range_rejects_null_and_empty():
    a = kvxfer.Agent("reg", transport="tcp", interface="lo")
    with pytest.raises(errors.InvalidArgument, match="non-null pointer and size > 0"):
        a.register_pool((0, 4096, -1), kvxfer.KVLayout.contiguous(1, 4096))
