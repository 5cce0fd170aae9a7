"""Build features and runtime probes: `python -m kvxfer info` (also the `kvxfer-info` script)."""
from __future__ import annotations

import ctypes
import os
import time

from kvxfer import _C


def _cma_status() -> tuple[bool, str]:
    """Same-host direct copy: fork a child and read a cookie from it with process_vm_readv."""
    cookie = ctypes.c_uint64(0x6b7678666572)
    pid = os.fork()
    if pid == 0:
        time.sleep(2)
        os._exit(0)
    try:
        ok, why = _C.cma_probe(pid, ctypes.addressof(cookie), cookie.value)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return ok, ("process_vm_writev works between processes here" if ok else why)


def _cuda_status() -> tuple[bool, str]:
    if not _C.have_cuda:
        return False, "this build has no CUDA (nvcc was not found at build time)"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "built with CUDA, but no NVIDIA driver (libcuda.so.1) on this machine"
    return False, "driver present; GPU memory paths (cuda_ipc, staged, GPU-direct) are not implemented yet"


def collect() -> dict:
    transports = {}
    if _C.have_libfabric:
        names = {"tcp": "tcp", "shm": "fi_shm", "efa": "efa", "verbs": "verbs"}
        for name, usable, detail in _C.probe_providers():
            transports[names[name]] = (usable, detail)
    else:
        for name in ("tcp", "fi_shm", "efa", "verbs"):
            transports[name] = (False, "this build has no libfabric (apt-get install libfabric-dev pkg-config; rebuild)")
    cma = _cma_status()
    transports["cma"] = cma if _C.have_libfabric else (False, "needs libfabric for its completion signals")
    transports["cuda_ipc"] = (False, _cuda_status()[1])
    return {"version": _C.__version__, "build": _C.build_info,
            "libfabric": _C.fabric_version() if _C.have_libfabric else None, "transports": transports}


def main(argv=None) -> int:
    argv = list(argv or [])
    if argv and argv[0] != "info":
        print("usage: python -m kvxfer info")
        return 2
    info = collect()
    print(f"kvxfer {info['version']}")
    print(f"build: {info['build']}")
    print("transports (usable now on this machine):")
    for name, (usable, detail) in info["transports"].items():
        print(f"  {'yes' if usable else 'no ':3}  {name:8}  {detail}")
    print("default: transport=auto -> cma for same-host peers (when usable), else the best of efa > verbs > tcp")
    return 0
