"""GPU paths on a machine without a usable GPU: what must still hold here. Registration of GPU memory fails at
registration (not at the first transfer) naming what is missing; pools that mix devices are refused; the cuda_ipc
transport refuses to start without a GPU; `info` reports each GPU path with its reason; the topology helpers read
this machine's real sysfs. The GPU paths themselves run in tests/gpu/ on a machine with an NVIDIA GPU."""
import subprocess
import sys

import numpy as np
import pytest

import kvxfer
from kvxfer import _C, errors, topology

NO_GPU = not _C.gpu_status()[0]
pytestmark = pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU behaviour; this machine has a usable GPU")


def test_gpu_pool_without_a_usable_gpu_fails_at_registration():
    agent = kvxfer.Agent("g", transport="tcp", interface="lo")
    layout = kvxfer.KVLayout.contiguous(16, 4096)
    with pytest.raises(errors.TransportUnavailable) as e:
        agent.register_pool([(0x7F0000000000, 16 * 4096, 0)], layout)  # a raw range said to be on cuda:0
    msg = str(e.value)
    assert "cuda:0" in msg and ("no CUDA" in msg or "no usable CUDA driver" in msg) and "host memory" in msg


def test_pool_mixing_host_and_gpu_regions_is_refused():
    agent = kvxfer.Agent("g", transport="tcp", interface="lo")
    layout = kvxfer.KVLayout.vllm_flash(2, 4, 16, 1, 32, "float16")
    host = np.zeros(layout.tensor_layer_bytes, dtype=np.uint8)
    with pytest.raises(errors.InvalidArgument, match="register one pool per device"):
        agent.register_pool([host, (0x7F0000000000, layout.tensor_layer_bytes, 0)], layout)


def test_cuda_ipc_transport_needs_a_gpu():
    with pytest.raises(errors.TransportUnavailable, match="transport 'cuda_ipc' needs a usable GPU"):
        kvxfer.Agent("g", transport="cuda_ipc", interface="lo")


def test_info_reports_every_gpu_path_with_its_reason():
    out = subprocess.run([sys.executable, "-m", "kvxfer", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for path in ("cuda_ipc", "gpu_direct", "staged", "landing"):
        line = next(l for l in out.stdout.splitlines() if l.split()[1:2] == [path] and l.startswith("  no"))
        assert len(line.split(None, 2)[2]) > 10  # a reason, not a bare "no"
    assert "GPU memory paths" in out.stdout and "topology:" in out.stdout
    dma_buf = next(l for l in out.stdout.splitlines() if l.split()[1:2] == ["dma_buf"])
    assert f"libfabric ({_C.fabric_version()}) has no FI_MR_DMABUF" in dma_buf  # this build's version, named


def test_topology_reads_this_machines_nics_and_picks_the_nearest():
    nics = topology.nics()
    for n in nics:  # every NIC listed has a real PCI position ending at its own address
        assert n.pci_path and n.pci_path[-1] == n.pci and n.kind in ("rdma", "net")
    if not nics:
        pytest.skip("this machine has no PCI network device")
    # A device is nearest to itself: the full PCIe path is shared.
    assert topology.nearest_nic(nics[0].pci, nics) == nics[0]
    assert topology.nearest_nic(nics[0].pci, []) is None
    gpus, why = topology.gpus()
    assert gpus == [] and why  # no GPU here: an empty list and the reason, never an exception


class _CudaArray:
    """An object speaking __cuda_array_interface__ v3 (what cupy and numba expose); kvxfer reads the protocol,
    never imports either library."""

    def __init__(self, strides, read_only=False):
        self.__cuda_array_interface__ = {"shape": (4, 8), "typestr": "<f2", "data": (0x1000, read_only),
                                         "strides": strides, "version": 3}
        self.device = type("Device", (), {"id": 1})()


def test_cuda_array_interface_regions():
    from kvxfer.memory import as_region

    assert as_region(_CudaArray(None)) == as_region(_CudaArray((16, 2)))  # C strides spelled out or omitted
    r = as_region(_CudaArray(None))
    assert (r.addr, r.nbytes, r.device) == (0x1000, 64, 1)
    with pytest.raises(errors.InvalidArgument, match="not C-contiguous"):
        as_region(_CudaArray((2, 8)))  # a transposed view
    with pytest.raises(errors.InvalidArgument, match="CUDA array is read-only; a peer could not write into it"):
        as_region(_CudaArray(None, read_only=True))


def _fake_sysfs(root):
    """A host with two root ports: port 00:01.0 holds eth0 and mlx5_1; port 00:02.0 a PCIe switch (02:00.0) with
    the GPU (03:00.0), eth1 (04:00.0) and mlx5_0 (05:00.0) behind it."""
    import os

    devices = root / "devices" / "pci0000:00"
    port1, switch = devices / "0000:00:01.0", devices / "0000:00:02.0" / "0000:02:00.0"
    places = {("net", "eth0"): port1 / "0000:01:00.0", ("infiniband", "mlx5_1"): port1 / "0000:01:00.1",
              ("net", "eth1"): switch / "0000:04:00.0", ("infiniband", "mlx5_0"): switch / "0000:05:00.0"}
    for (cls, name), dev in places.items():
        dev.mkdir(parents=True)
        (root / "class" / cls / name).mkdir(parents=True)
        os.symlink(dev, root / "class" / cls / name / "device")
    gpu = switch / "0000:03:00.0"
    gpu.mkdir(parents=True)
    (root / "bus" / "pci" / "devices").mkdir(parents=True)
    os.symlink(gpu, root / "bus" / "pci" / "devices" / "0000:03:00.0")
    (root / "class" / "net" / "lo").mkdir()  # virtual: no device link, never a candidate
    return str(root)


@pytest.mark.parametrize("provider,name,device", [("tcp", "eth1", "eth1"), ("verbs", "mlx5_0", "mlx5_0"),
                                                  ("efa", "mlx5_0-rdm", "mlx5_0")])
def test_the_domain_nearest_a_gpu_is_the_one_behind_its_switch(tmp_path, provider, name, device):
    sysfs = _fake_sysfs(tmp_path)
    got, why = topology.domain_for_gpu("00000000:03:00.0", provider, sysfs)  # NVML's 8-digit domain spelling
    assert got == name
    assert why.startswith(device) and "shares 2 PCIe bridge level(s) with GPU 0000:03:00.0" in why


def test_no_candidate_nic_says_so(tmp_path):
    sysfs = _fake_sysfs(tmp_path)
    got, why = topology.domain_for_gpu("0000:03:00.0", "fi_shm", sysfs)
    assert got is None and "uses no NIC" in why
    empty = tmp_path / "empty"
    empty.mkdir()
    got, why = topology.domain_for_gpu("0000:03:00.0", "verbs", str(empty))
    assert got is None and "no RDMA device" in why


def test_agent_gpu_option(monkeypatch):
    # No GPU here: a CUDA ordinal cannot be placed, and the error says what to pass instead.
    with pytest.raises(errors.InvalidArgument, match="gpu=0: no such CUDA device here.*PCI bus id"):
        kvxfer.Agent("gpu-nic-0", transport="tcp", gpu=0)
    torch = pytest.importorskip("torch")
    for cpu in (torch.device("cpu"), torch.zeros(1)):  # not the current GPU in disguise: refused by name
        with pytest.raises(errors.InvalidArgument, match=r"gpu=.*cpu.* is not a CUDA device.*host-only agent"):
            kvxfer.Agent("gpu-nic-cpu", transport="tcp", gpu=cpu)
    # A PCI bus id needs no CUDA. Tests stay on loopback, so the only NIC offered is lo, given a PCI position.
    monkeypatch.setattr(topology, "nics", lambda sysfs="/sys": [topology.Nic("lo", "net", "0000:00:09.0", -1,
                                                                             ("0000:00:09.0",))])
    a = kvxfer.Agent("gpu-nic-pci", transport="tcp", gpu="0000:03:00.0")
    assert a.interface_reason.startswith("nearest the GPU: lo for tcp; lo (net, 0000:00:09.0)")
    monkeypatch.setattr(topology, "nics", lambda sysfs="/sys": [])
    b = kvxfer.Agent("gpu-nic-none", transport="tcp", interface="", gpu="0000:03:00.0")
    assert "no PCI network interface" in b.interface_reason and "tcp picks its first domain" in b.interface_reason
    # An explicit interface wins over the GPU's neighbourhood.
    c = kvxfer.Agent("gpu-nic-lo", transport="tcp", interface="lo", gpu="0000:03:00.0")
    assert c.interface_reason == "given"
    # A nearest netdev the provider does not offer (no address, say) is dropped, not refused, saying so.
    monkeypatch.setattr(topology, "nics", lambda sysfs="/sys": [topology.Nic("nosuch0", "net", "0000:00:09.0", -1,
                                                                             ("0000:00:09.0",))])
    d = kvxfer.Agent("gpu-nic-missing", transport="tcp", gpu="0000:03:00.0")
    assert d.interface_reason.startswith("nosuch0 is nearest the GPU but the provider does not offer it")
    assert d.domain in ("lo", "eth0") and "picks its first domain" in d.interface_reason
