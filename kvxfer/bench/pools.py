"""Benchmark pools in host memory (numpy) or GPU memory (torch tensors, torch imported only when asked for).

The workloads module fills and checks numpy arrays; a GPU pool is filled by copying those arrays onto the device and
checked by copying it back, so the same byte patterns and the same verification serve every memory.
"""
from __future__ import annotations

import time

import numpy as np

from kvxfer.errors import TransportUnavailable


def is_gpu(where: str) -> bool:
    return where.startswith("cuda")


def require(where: str) -> None:
    """Raises TransportUnavailable naming what is missing when `where` (cpu or cuda:N) cannot hold a pool here."""
    if not is_gpu(where):
        return
    try:
        import torch
    except ImportError:
        raise TransportUnavailable(f"{where} pools need torch with CUDA, and torch is not installed; install it, or "
                                   "use --src-mem cpu --dst-mem cpu") from None
    if not torch.cuda.is_available():
        raise TransportUnavailable(f"{where} pools need a CUDA device, and torch sees none on this machine; use "
                                   "--src-mem cpu --dst-mem cpu here (python -m kvxfer info lists what works)")
    index = int(where.split(":")[1])
    if index >= torch.cuda.device_count():
        raise TransportUnavailable(f"{where} does not exist: torch sees {torch.cuda.device_count()} CUDA devices")


def empty(nbytes: list[int], where: str) -> list:
    """Uninitialised byte arrays of these sizes in host memory or on the device."""
    if not is_gpu(where):
        return [np.empty(n, np.uint8) for n in nbytes]
    import torch

    return [torch.empty(n, dtype=torch.uint8, device=where) for n in nbytes]


def place(host_arrays: list[np.ndarray], where: str) -> list:
    """The pool kvxfer registers: the arrays themselves for cpu, copies of them on the device for cuda:N."""
    if not is_gpu(where):
        return host_arrays
    import torch

    return [torch.from_numpy(a).to(where) for a in host_arrays]


def fill(pool: list, value: int) -> None:
    devices = set()
    for a in pool:
        if isinstance(a, np.ndarray):
            a.fill(value)
        else:
            a.fill_(value)
            if a.is_cuda:
                devices.add(a.device)
    if devices:  # filled on torch's streams; a peer's copies on streams of their own are not ordered after them
        import torch

        for device in devices:  # (synchronize() alone waits for the current device only)
            torch.cuda.synchronize(device)


def to_host(pool: list) -> list[np.ndarray]:
    return [a if isinstance(a, np.ndarray) else a.cpu().numpy() for a in pool]


def addresses(pool: list) -> list[int]:
    return [a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr() for a in pool]


def copy_limit_gbps(nbytes: int, src: str, dst: str, reps: int = 5) -> tuple[float, str]:
    """copy_limit_seconds as bandwidth, with the name the tables print."""
    kind = "D2D" if is_gpu(src) and is_gpu(dst) else ("D2H, pinned" if is_gpu(src) else "H2D, pinned")
    return nbytes / copy_limit_seconds(nbytes, src, dst, reps) / 1e9, f"cudaMemcpy {kind}, same bytes, best of {reps}"


def copy_limit_seconds(nbytes: int, src: str, dst: str, reps: int = 5) -> float:
    """The device's own copy of nbytes in the direction a GPU path moves them (device-to-device, or to/from pinned
    host memory): the best of reps after a warm-up copy. src/dst: cpu, cuda or cuda:N. Small sizes copy k times
    per timing (64 MiB in all, as the CPU limits do) and count a k-th of it: one small copy between two
    synchronizes times the launch and the synchronize, not the copy."""
    import torch

    device = src if is_gpu(src) else dst
    k = max(1, -(-(64 << 20) // nbytes))
    a = torch.empty(nbytes, dtype=torch.uint8, device=src if is_gpu(src) else "cpu", pin_memory=not is_gpu(src))
    b = torch.empty(nbytes, dtype=torch.uint8, device=dst if is_gpu(dst) else "cpu", pin_memory=not is_gpu(dst))
    best = float("inf")
    with torch.cuda.device(device):
        for rep in range(reps + 1):  # the first round warms up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(k):
                b.copy_(a, non_blocking=True)
            torch.cuda.synchronize()
            if rep:
                best = min(best, (time.perf_counter() - t0) / k)
    return best
