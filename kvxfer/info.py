"""Build features and runtime probes: `python -m kvxfer info` (also the `kvxfer-info` script)."""
from __future__ import annotations

import ctypes
import os
import time

from kvxfer import _C, envs


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
    if not ok:
        return ok, why
    try:
        threads = _C.cma_threads_default()
    except Exception as e:  # a bad KVXFER_CMA_THREADS: agents will refuse it; info reports it
        return ok, f"process_vm_writev works between processes here; but {e}"
    copies = (f"copies of >= 1 MiB on {threads} worker threads" if threads else "copies on the progress thread")
    return ok, f"process_vm_writev works {_ptrace_reach()}; {copies} (KVXFER_CMA_THREADS)"


def _ptrace_reach() -> str:
    """Between which processes CMA, doorbell rings and VMM handles work: the probes above reach a child, which
    Yama's ptrace_scope 1 allows where it refuses siblings (a prefill and a decode worker launched apart)."""
    scope = _C.yama_ptrace_scope()
    if scope <= 0:
        return "between processes of this user here"
    if scope == 1 and envs.get("KVXFER_PTRACER") == "any":
        return ("between processes of this user here (Yama ptrace_scope=1, and KVXFER_PTRACER=any lets them reach "
                "this one: set it for every kvxfer process)")
    if scope == 1:
        return ("from a parent to its children only (Yama ptrace_scope=1): same-host peers launched apart fall back "
                "to the fabric unless each runs with KVXFER_PTRACER=any (which lets processes of this user reach it)")
    return f"only with CAP_SYS_PTRACE (Yama ptrace_scope={scope}): same-host peers fall back to the fabric"


def _doorbell_status() -> tuple[bool, str]:
    """Same-host signals: map a region another process holds (pidfd_getfd, the permission CMA needs)."""
    from kvxfer import envs

    if envs.get("KVXFER_DOORBELL") == "0":
        return False, "off (KVXFER_DOORBELL=0): same-host completions and control messages go over the fabric"
    region = _C._DoorbellRegion()
    pid = os.fork()
    if pid == 0:  # holds the region's fd (inherited) like a peer agent would
        time.sleep(2)
        os._exit(0)
    try:
        _C._DoorbellLink(pid, region.fd, -1)
    except Exception as e:
        return False, f"{e}; same-host peers signal over the fabric"
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    reach = "" if _C.yama_ptrace_scope() <= 0 else f"; mapped {_ptrace_reach()}"
    return True, ("shared-memory rings: same-host peers (cma, cuda_ipc) signal layer completions and control "
                  f"messages without the fabric (KVXFER_DOORBELL){reach}")


def _cuda_status() -> tuple[bool, str]:
    if not _C.have_cuda:
        return False, "this build has no CUDA (nvcc was not found at build time)"
    ok, why = _C.gpu_status()
    if not ok:
        return False, f"built with CUDA, but {why}"
    return True, f"{len(_C.gpu_devices())} GPU(s) usable"


def _gpu_paths(transports: dict) -> dict:
    """Which GPU path each peer placement takes here, and its cost, or why it cannot be used."""
    cuda_ok, cuda_why = _cuda_status()
    fabric = [n for n in ("efa", "verbs", "tcp") if transports.get(n, (False,))[0]]
    paths = {}
    paths["cuda_ipc"] = (cuda_ok, "same host, GPU pool: the peer's allocation mapped once (CUDA IPC); the layers "
                         "ready together copied by one gather kernel that marks each layer landed (KVXFER_GPU_LAUNCH), "
                         "host sources on the copy engines" if cuda_ok else cuda_why)
    gdr = [n for n in fabric if n in ("efa", "verbs")]
    paths["gpu_direct"] = (False, "no efa/verbs provider here; GPU-direct RDMA needs one with FI_HMEM") if not gdr else \
        (cuda_ok, f"{gdr[0]} is asked for FI_HMEM; an agent reports agent.gpu_direct once created")
    paths["dma_buf"] = (False, _dma_buf_reason())
    paths["staged"] = (cuda_ok and bool(fabric or transports.get("cma", (False,))[0]),
                       "GPU -> pinned host bounce slots -> network or cma: one extra device-to-host copy per byte, "
                       "pipelined (16 x 4 MiB slots by default)" if cuda_ok else cuda_why)
    paths["landing"] = (cuda_ok and bool(fabric),
                        "GPU pools another host cannot write directly are reached through landing slots: senders "
                        "write into registered pinned host slots (4 x 256 KiB per peer by default) and the receiver "
                        "copies them host-to-device; one extra copy per byte at the receiving end, pipelined"
                        if cuda_ok and fabric else (cuda_why if not cuda_ok else "no fabric provider here"))
    return paths


def _dma_buf_reason() -> str:
    """dma-buf registration of GPU memory with the fabric needs FI_MR_DMABUF (libfabric 1.20); older builds register
    GPU memory through FI_HMEM_CUDA, which leaves the mechanism to the provider (peer memory or its own dma-buf)."""
    version = _C.fabric_version() if _C.have_libfabric else "none"
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) if _C.have_libfabric else ()
    has_it = len(parts) == 2 and parts >= (1, 20)
    lack = "has FI_MR_DMABUF, but kvxfer does not use it yet" if has_it else "has no FI_MR_DMABUF (libfabric >= 1.20)"
    return (f"not built: this build's libfabric ({version}) {lack}; GPU-direct registration goes through "
            "FI_HMEM_CUDA, the provider choosing peer memory or dma-buf itself")


def _topology() -> dict:
    from kvxfer import topology

    gpus, why = topology.gpus()
    sysfs = envs.get("KVXFER_SYSFS")
    nics = topology.nics(sysfs)
    # NVML numbers GPUs its own way (all of them, PCI order); CUDA ordinals follow CUDA_VISIBLE_DEVICES and its
    # device order: rows are named by CUDA ordinal, matched through the PCI bus id.
    cuda_of = {}
    if _C.have_cuda and _C.gpu_status()[0]:
        cuda_of = {topology._norm_pci(p.lower()): d for d, p in _C.gpu_devices()}
    name = {g.index: (f"cuda:{cuda_of[g.pci]}" if g.pci in cuda_of else f"nvml{g.index} (not visible to CUDA here)")
            for g in gpus}
    rows = []
    for g in gpus:
        near = topology.nearest_nic(g.pci, nics, sysfs)
        links = {name[o.index]: topology.link(g, o) for o in gpus if o.index != g.index}
        rows.append({"gpu": name[g.index], "nvml_index": g.index, "name": g.name, "pci": g.pci, "numa": g.numa_node,
                     "nearest_nic": near.name if near else None, "links": links})
    return {"gpus": rows, "gpus_why": why, "nics": [(n.name, n.kind, n.pci, n.numa_node) for n in nics]}


def _fallback_status(transports: dict) -> str:
    """What transport=auto does for peers on other hosts here, given the RDMA NICs sysfs lists (kvxfer.fallback)."""
    from kvxfer import topology

    nics = topology.rdma_nics(envs.get("KVXFER_SYSFS"))
    rdma = next((n for n in ("efa", "verbs") if transports.get(n, (False,))[0]), None)
    listed = ", ".join(map(str, nics)) or "none"
    if rdma or not nics:
        return f"RDMA NICs: {listed}; peers on other hosts: {rdma or 'tcp'}"
    mode = envs.get("KVXFER_FALLBACK")
    return (f"RDMA NICs: {listed}, but neither efa nor verbs opens: peers on other hosts would go over tcp, so "
            + ("add_peer refuses them (SlowFallback; KVXFER_FALLBACK=allow accepts tcp)" if mode != "allow" else
               "they go over tcp and the agent logs why (KVXFER_FALLBACK=allow)"))


def collect() -> dict:
    transports = {}
    if _C.have_libfabric:
        names = {"tcp": "tcp", "shm": "fi_shm", "efa": "efa", "verbs": "verbs"}
        for name, usable, detail, own_keys, coalesced, domains in _C.probe_providers():
            if usable and "ofi_rxm" in detail:
                detail += f" (rxm bounce buffers of {os.environ.get('FI_OFI_RXM_BUFFER_SIZE', '16384')} B)"
            if usable:
                detail += ("; each peer writes with keys of its own, closed once it is dropped: nothing it still "
                           "posts lands, and its ended recvs settle (KVXFER_PEER_KEYS=own)" if own_keys else
                           "; one key for all peers: a dropped peer on another host leaves its ended recvs unsettled"
                           + (" (KVXFER_PEER_KEYS=shared)" if envs.get("KVXFER_PEER_KEYS") == "shared" else
                              " (the provider chooses keys)"))
            if usable and name != "shm":
                detail += f"; domains (Agent(interface=...)): {', '.join(domains) or 'none listed'}"
            if usable and coalesced:
                detail += ("; writes go without immediates and a zero-byte write after each MiB of a rail's writes "
                           "and after a layer's last counts them (the provider orders writes; KVXFER_IMM=coalesced)")
            elif usable and name == "tcp":
                detail += ("; immediates follow their data in a zero-byte write, so a peer cut off mid-write can be "
                           "released safely (KVXFER_TCP_IMM=split)" if envs.get("KVXFER_TCP_IMM") != "inline" else
                           "; one write with immediate each: releasing a peer cut off mid-write can crash libfabric "
                           "1.17 (KVXFER_TCP_IMM=inline)")
            if usable and not coalesced:
                detail += ("; an immediate on every write (KVXFER_IMM=each)" if envs.get("KVXFER_IMM") == "each" else
                           "; an immediate on every write (the provider does not order writes)")
            if usable and name == "tcp":
                mode = envs.get("KVXFER_LANDING")
                detail += ("; host pools of chunks under 32 KiB offer landing slots and senders pack such chunks "
                           "(layers of 32 KiB and more) into them (KVXFER_LANDING=auto)" if mode == "auto" else
                           f"; small chunks written one by one (KVXFER_LANDING={mode})")
            transports[names[name]] = (usable, detail)
    else:
        for name in ("tcp", "fi_shm", "efa", "verbs"):
            transports[name] = (False, "this build has no libfabric (apt-get install libfabric-dev pkg-config; rebuild)")
    transports["ucx"] = (_C.probe_ucx() if _C.have_ucx else
                         (False, "this build has no UCX (apt-get install libucx-dev pkg-config; rebuild)"))
    cma = _cma_status()
    transports["cma"] = cma if _C.have_libfabric else (False, "needs libfabric for its completion signals")
    gpu_paths = _gpu_paths(transports)
    transports["cuda_ipc"] = gpu_paths["cuda_ipc"]
    return {"version": _C.__version__, "build": _C.build_info, "doorbell": _doorbell_status(),
            "fallback": _fallback_status(transports),
            "libfabric": _C.fabric_version() if _C.have_libfabric else None,
            "ucx": _C.ucx_version() if _C.have_ucx else None, "transports": transports,
            "gpu_paths": gpu_paths, "gpu_kernels": _gpu_kernels(), "topology": _topology()}


def _gpu_kernels() -> dict:
    """Which visible GPUs this build's kernels (gather copies, layer records, counter waits) run on. A GPU without
    them copies on its copy engines only and refuses layer signals, naming the rebuild that fixes it."""
    archs = getattr(_C, "cuda_archs", "")
    if not _C.have_cuda or not _C.gpu_status()[0]:
        return {"archs": archs, "devices": []}
    return {"archs": archs, "devices": [(d, runs, how) for d, runs, how in _C.gpu_kernel_images()]}


def main(argv=None) -> int:
    argv = list(argv or [])
    if argv and argv[0] != "info":
        print("usage: python -m kvxfer info | python -m kvxfer preflight [--help]")
        return 2
    info = collect()
    print(f"kvxfer {info['version']}")
    print(f"build: {info['build']}")
    print("transports (usable now on this machine):")
    for name, (usable, detail) in info["transports"].items():
        print(f"  {'yes' if usable else 'no ':3}  {name:8}  {detail}")
    usable, detail = info["doorbell"]
    print(f"same-host signals:\n  {'yes' if usable else 'no ':3}  doorbell  {detail}")
    print("GPU memory paths (chosen per send from where both pools live; Send.path says which):")
    for name, (usable, detail) in info["gpu_paths"].items():
        print(f"  {'yes' if usable else 'no ':3}  {name:10}  {detail}")
    kernels = info["gpu_kernels"]
    for device, runs, how in kernels["devices"]:
        print(f"  {'yes' if runs else 'no ':3}  kernels    cuda:{device}: {how}"
              + ("" if runs else "; its copies go to the copy engines and layer signals are refused"))
    topo = info["topology"]
    if topo["gpus"]:
        for g in topo["gpus"]:
            links = ", ".join(f"{k} {v}" for k, v in g["links"].items()) or "no other GPU"
            print(f"  {g['gpu']} {g['name']} {g['pci']} numa {g['numa']}: nearest NIC {g['nearest_nic']}; {links}")
    else:
        print(f"  topology: no GPUs listed ({topo['gpus_why'] or 'none found'})")
    print(f"  NICs with a PCI position: {', '.join(n[0] + ' (' + n[1] + ')' for n in topo['nics']) or 'none'}")
    print(f"  {info['fallback']}")
    print("default: transport=auto -> cma for same-host peers (when usable), else the best of efa > verbs > tcp;"
          " GPU pools: cuda_ipc on one host, GPU-direct where the provider has FI_HMEM, else staged (sender) and"
          " landing slots (receiver)")
    return 0
