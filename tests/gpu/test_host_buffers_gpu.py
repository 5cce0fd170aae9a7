"""The staging and landing rings' page-locked memory on a machine with a GPU (skipped elsewhere with the reason):
made for the GPU whose copies use it, and never in a process that moves only host memory, which must not get a
CUDA context (hundreds of MiB of GPU 0's memory in every such process) just because a GPU is there."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import kvxfer
from tests.conftest import assert_exact_transfer, local_pair
from tests.gpu.conftest import requires_gpu
from tests.reference import apply, make_pool

pytestmark = requires_gpu

ROOT = Path(__file__).resolve().parents[2]

# A fresh process (pytest's own has torch's context): host pools through the sender's bounce slots and the
# receiver's landing slots over tcp, then no device may have an active primary context.
HOST_ONLY = r"""
import ctypes
import numpy as np
import kvxfer
from tests.conftest import assert_exact_transfer, local_pair

layout = kvxfer.KVLayout.contiguous(32, 8192)
a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("host-only-s", "host-only-r"),
                                            sender_kwargs={"staging": "always"}, receiver_kwargs={"landing": "always"})
assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, np.arange(0, 16), np.arange(16, 32))
assert a.staging()["slots"] and not a.staging()["pinned"], a.staging()
assert b.landing() and not b.landing()["pinned"], b.landing()
assert b.stats()["landings"] > 0
a.close(); b.close()
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
n = ctypes.c_int()
assert cuda.cuDeviceGetCount(ctypes.byref(n)) == 0
active = []
for i in range(n.value):
    dev, flags, on = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    assert cuda.cuDeviceGet(ctypes.byref(dev), i) == 0
    assert cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(on)) == 0
    if on.value:
        active.append(i)
print("active primary contexts:", active)
"""


def test_a_process_moving_only_host_memory_creates_no_cuda_context():
    """Host sources fill the bounce slots with memcpy and a host pool drains the landing slots with memcpy: neither
    ring is page-locked, and the process ends with no active primary context on any GPU (the progress thread sets
    its capture mode through the driver: the runtime's call made GPU 0's context, mscclpp PR #757)."""
    out = subprocess.run([sys.executable, "-c", HOST_ONLY], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False, env={**os.environ, "FI_TCP_IFACE": "lo"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "active primary contexts: []" in out.stdout, out.stdout + out.stderr


def test_a_ring_made_for_host_sources_is_page_locked_when_a_gpu_source_needs_it():
    """A host pool's staged send makes the bounce ring in ordinary memory; the agent's first staged send from a GPU
    pool page-locks that ring in place (cudaHostRegister) before its device-to-host copies, and both sends arrive
    exact."""
    import torch

    layout = kvxfer.KVLayout.contiguous(32, 8192)
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "tcp", ("ring-pin-s", "ring-pin-r"),
                                                sender_kwargs={"staging": "always", "staging_slot_bytes": 1 << 16,
                                                               "staging_slots": 3})
    try:
        assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, np.arange(0, 8), np.arange(8, 16))
        assert a.staging()["pinned"] is False
        gpu_host = make_pool(layout, 77)
        gpu_src = [torch.from_numpy(x).to("cuda:0") for x in gpu_host]
        torch.cuda.synchronize()
        a.register_pool(gpu_src, layout, name="gpu")
        expected = [x.copy() for x in dst]
        src_ids, dst_ids = np.arange(16, 32, dtype=np.int32), np.arange(0, 16, dtype=np.int32)
        apply(layout, gpu_host, expected, src_ids, dst_ids, range(layout.num_layers))
        recv = b.recv(peer_a, 2, dst_ids)
        send = a.send(peer_b, 2, src_ids, dst_ids, pool="gpu")
        send.all_ready()
        send.wait(timeout_s=30)
        recv.wait(timeout_s=30)
        assert send.path == "staged"
        assert a.staging()["pinned"] is True
        for got, want in zip(dst, expected):
            np.testing.assert_array_equal(got, want)
    finally:
        a.close()
        b.close()
