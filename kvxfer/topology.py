"""GPU and NIC topology: which NIC (libfabric domain) sits nearest each GPU, and which GPUs share NVLink.

    gpus()                 -> [Gpu(index, name, pci, numa_node, nvlink_peers)]   (pynvml; [] without it)
    nics(sysfs="/sys")     -> [Nic(name, kind, pci, numa_node, pci_path)]       (sysfs: RDMA devices and netdevs)
    nearest_nic(gpu, nics) -> the NIC sharing the longest PCIe path with the GPU (same switch beats same root port
                              beats same NUMA node), or None
    link(a, b)             -> "nvlink" | "pcie" | "unknown" between two GPUs
    domain_for_gpu(pci, provider) -> (interface / domain name for Agent(interface=...), why)  (Agent(gpu=...))
    rdma_nics(sysfs="/sys") -> [RdmaNic(name, driver, rate_gbps, numa_node)]  (hardware RDMA devices only)

Everything here is read-only and import-safe: pynvml is imported lazily and its absence is reported, never raised.
Used by `python -m kvxfer info` and by engines picking a provider domain per GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    pci: str                     # "0000:1b:00.0", lower case
    numa_node: int               # -1 when unknown
    nvlink_peers: tuple = field(default_factory=tuple)  # PCI ids of GPUs reached over active NVLinks


@dataclass(frozen=True)
class Nic:
    name: str                    # "mlx5_0", "rdmap16s27", "eth0"
    kind: str                    # "rdma" (an RDMA device: efa/verbs domain) or "net" (a netdev: tcp domain)
    pci: str
    numa_node: int
    pci_path: tuple              # PCI addresses from the root complex down to the device


def _norm_pci(bus_id: str) -> str:
    """NVML prints 8-digit domains ("00000000:1B:00.0"); sysfs uses 4 ("0000:1b:00.0")."""
    bus_id = bus_id.strip().lower()
    domain, _, rest = bus_id.partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest else bus_id


def _pci_path(device_dir: str) -> tuple:
    real = os.path.realpath(device_dir)
    return tuple(p for p in real.split("/") if p.count(":") == 2 and "." in p)


def _numa_node(device_dir: str) -> int:
    try:
        with open(os.path.join(device_dir, "numa_node")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1


def nics(sysfs: str = "/sys") -> list[Nic]:
    """RDMA devices (/sys/class/infiniband) and PCI network interfaces (/sys/class/net/*/device)."""
    out = []
    for kind, cls in (("rdma", "infiniband"), ("net", "net")):
        base = os.path.join(sysfs, "class", cls)
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for name in names:
            dev = os.path.join(base, name, "device")
            path = _pci_path(dev) if os.path.exists(dev) else ()
            if not path:
                continue  # virtual (lo, bridges, veth): no PCI position to be near anything
            out.append(Nic(name, kind, path[-1], _numa_node(dev), path))
    return out


@dataclass(frozen=True)
class RdmaNic:
    name: str                    # "mlx5_0", "rdmap16s27"
    driver: str                  # "mlx5_core", "efa", ... ("" when sysfs does not say)
    rate_gbps: float             # the fastest active port's rate, 0 when unknown
    numa_node: int

    def __str__(self) -> str:
        what = ", ".join(x for x in (self.driver, f"{self.rate_gbps:g} Gb/s" if self.rate_gbps else "") if x)
        return f"{self.name} ({what})" if what else self.name


def _port_rate_gbps(ports_dir: str) -> float:
    """The fastest port's rate from ports/N/rate ("100 Gb/sec (4X EDR)"); 0 when none says."""
    best = 0.0
    try:
        ports = os.listdir(ports_dir)
    except OSError:
        return best
    for port in ports:
        try:
            with open(os.path.join(ports_dir, port, "rate")) as f:
                best = max(best, float(f.read().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return best


def rdma_nics(sysfs: str = "/sys") -> list[RdmaNic]:
    """RDMA devices on a PCI function (/sys/class/infiniband/X/device): the NICs efa or verbs would drive. Software
    devices (rxe, siw: no PCI position) are left out, since tcp is as fast as they are."""
    out = []
    for nic in nics(sysfs):
        if nic.kind != "rdma":
            continue
        base = os.path.join(sysfs, "class", "infiniband", nic.name)
        driver = os.path.basename(os.path.realpath(os.path.join(base, "device", "driver")))
        has_driver = os.path.exists(os.path.join(base, "device", "driver"))
        out.append(RdmaNic(nic.name, driver if has_driver else "", _port_rate_gbps(os.path.join(base, "ports")),
                           nic.numa_node))
    return out


def pci_path_of(pci: str, sysfs: str = "/sys") -> tuple:
    return _pci_path(os.path.join(sysfs, "bus", "pci", "devices", pci))


def nearest_nic(gpu_pci: str, candidates: list[Nic], sysfs: str = "/sys", kind: str | None = None) -> Nic | None:
    """The NIC whose PCIe path shares the longest prefix with the GPU's; ties go to the same NUMA node, then RDMA
    devices over netdevs. None when there is no candidate."""
    gpu_path = pci_path_of(_norm_pci(gpu_pci), sysfs)
    gpu_numa = _numa_node(os.path.join(sysfs, "bus", "pci", "devices", _norm_pci(gpu_pci)))

    def score(nic: Nic):
        shared = 0
        for a, b in zip(gpu_path, nic.pci_path):
            if a != b:
                break
            shared += 1
        return shared, nic.numa_node == gpu_numa and gpu_numa >= 0, nic.kind == "rdma"

    pool = [n for n in candidates if kind is None or n.kind == kind]
    return max(pool, key=score) if pool else None


def _nvml():
    try:
        import pynvml  # noqa: PLC0415 - optional, imported on use

        pynvml.nvmlInit()
        return pynvml, ""
    except ImportError:
        return None, "pynvml is not installed (pip install nvidia-ml-py)"
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"NVML unavailable: {e}"


def gpus() -> tuple[list[Gpu], str]:
    """(GPUs seen by NVML, "" or why some or all could not be listed). Never raises: NVML errors leave GPUs out."""
    nvml, why = _nvml()
    if nvml is None:
        return [], why
    out, skipped = [], []
    try:
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as e:
        return [], f"NVML could not count GPUs: {e}"
    for i in range(count):
        try:  # a GPU NVML cannot describe (lost, no permission) is left out, not a crash of info or path_to
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(h)
            pci = _norm_pci(_text(nvml.nvmlDeviceGetPciInfo(h).busId))
        except nvml.NVMLError as e:
            skipped.append(f"NVML GPU {i}: {e}")
            continue
        peers = []
        for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if nvml.nvmlDeviceGetNvLinkState(h, link) != nvml.NVML_FEATURE_ENABLED:
                    continue
                peers.append(_norm_pci(_text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId)))
            except nvml.NVMLError_NotSupported:
                break  # no NVLink on this device
            except nvml.NVMLError:
                continue  # this link: inactive or unreadable; later ones may be up
        out.append(Gpu(i, _text(name), pci, _numa_node(f"/sys/bus/pci/devices/{pci}"), tuple(sorted(set(peers)))))
    return out, "; ".join(skipped)


def link(a: Gpu, b: Gpu) -> str:
    """How two GPUs of this host reach each other for CUDA IPC copies."""
    if a.pci == b.pci:
        return "same-gpu"
    if b.pci in a.nvlink_peers or a.pci in b.nvlink_peers:
        return "nvlink"
    nvml, _ = _nvml()
    if nvml is not None:  # NVSwitch systems: the links end at the switch, so ask NVML about the pair itself
        try:
            ha, hb = nvml.nvmlDeviceGetHandleByIndex(a.index), nvml.nvmlDeviceGetHandleByIndex(b.index)
            if nvml.nvmlDeviceGetP2PStatus(ha, hb, nvml.NVML_P2P_CAPS_INDEX_NVLINK) == nvml.NVML_P2P_STATUS_OK:
                return "nvlink"
        except (nvml.NVMLError, AttributeError):
            pass
    return "pcie" if a.pci and b.pci else "unknown"


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


_NIC_KIND = {"tcp": "net", "efa": "rdma", "verbs": "rdma"}


def domain_for_gpu(gpu_pci: str, provider: str, sysfs: str = "/sys") -> tuple[str | None, str]:
    """(the interface / libfabric domain name nearest the GPU for `provider` (tcp, efa or verbs), why). The name
    is what Agent(interface=...) takes: a netdev for tcp, the RDMA device for verbs, "<device>-rdm" for efa. None
    (with the reason) when there is nothing to choose from: the provider then picks its first domain."""
    kind = _NIC_KIND.get(provider)
    if kind is None:
        return None, f"provider {provider} uses no NIC"
    near = nearest_nic(gpu_pci, nics(sysfs), sysfs, kind=kind)
    if near is None:
        what = "RDMA device" if kind == "rdma" else "PCI network interface"
        return None, f"no {what} with a PCI position under {sysfs}; {provider} picks its first domain"
    shared = 0
    for a, b in zip(pci_path_of(_norm_pci(gpu_pci), sysfs), near.pci_path):
        if a != b:
            break
        shared += 1
    how = (f"shares {shared} PCIe bridge level(s) with GPU {_norm_pci(gpu_pci)}" if shared
           else f"no shared PCIe bridge with GPU {_norm_pci(gpu_pci)}; the best of the rest")
    return domain_name(near.name, provider), f"{near.name} ({near.kind}, {near.pci}) {how}"


def domain_name(device: str, provider: str) -> str:
    """The libfabric domain of a NIC for `provider`: efa names its RDM domain "<device>-rdm", the others the
    device (verbs) or netdev (tcp) itself."""
    return device + "-rdm" if provider == "efa" else device


def device_of(domain: str) -> str:
    """The NIC behind a libfabric domain name (domain_name's inverse; efa's datagram domain is "<device>-dgrm")."""
    return domain.removesuffix("-rdm").removesuffix("-dgrm")
