"""Which GPUs this build's kernels run on (csrc/gpu/kernel_archs.h): CMake's architecture list against a device's
compute capability, checked without a GPU. A GPU that no entry fits must be named with the rebuild that fixes it."""
import re

import pytest

from kvxfer import _C

DEFAULT = "75,80,90"  # what a CUDA 13 build compiles when nothing is asked for


@pytest.mark.parametrize("cc,how", [
    ((7, 5), "sm_75 code"),
    ((8, 0), "sm_80 code"),
    ((8, 6), "sm_80 code"),  # A10, RTX 30xx: same major version, higher minor
    ((8, 9), "sm_80 code"),  # L4, L40
    ((9, 0), "sm_90 code"),
    ((10, 0), "compute_90 PTX"),  # B200: the driver compiles the newest PTX at or below it
    ((12, 0), "compute_90 PTX"),
])
def test_default_architectures_cover_every_gpu_from_turing_on(cc, how):
    runs, text = _C._kernel_image_for(*cc, DEFAULT)
    assert runs and text.startswith(how), text


@pytest.mark.parametrize("cc", [(7, 0), (6, 1)])
def test_a_gpu_below_every_entry_is_named_with_the_rebuild(cc):
    runs, why = _C._kernel_image_for(*cc, DEFAULT)
    code = f"{cc[0]}{cc[1]}"
    assert not runs
    assert f"no kernel code for sm_{code} (built for {DEFAULT})" in why and f'KVXFER_CUDA_ARCHS="{code}"' in why


@pytest.mark.parametrize("archs,cc,runs", [
    ("86", (8, 0), False),          # machine code never runs on a lower minor version
    ("86", (8, 9), True),
    ("80-real", (9, 0), False),     # machine code only: nothing for a newer major version
    ("80", (9, 0), True),           # ... but "80" carries compute_80 PTX too
    ("80-virtual", (8, 6), True),   # PTX only
    ("90a-real", (9, 0), True),     # arch-specific code: that GPU only
    ("90a", (10, 0), False),        # and its PTX is not forward compatible
    ("100f-real", (10, 3), True),   # family-specific: the same major version
    ("100f-real", (12, 0), False),
    ("75;90", (8, 0), True),        # ';' as CMake writes lists; sm_75's PTX
    ("native", (5, 2), True),       # cannot be checked here: taken as running
])
def test_architecture_rules(archs, cc, runs):
    got, how = _C._kernel_image_for(*cc, archs)
    assert got is runs, how


def test_this_build_reports_the_architectures_it_compiled():
    summary = re.search(r"CUDA [0-9.]+ sm_([0-9a-z,\-]+)", _C.build_info)
    if not _C.have_cuda:
        assert _C.cuda_archs == "" and summary is None
        return
    assert summary and _C.cuda_archs == summary.group(1)


def test_info_lists_each_visible_gpu_with_its_kernels():
    from kvxfer import info

    kernels = info._gpu_kernels()
    assert kernels["archs"] == _C.cuda_archs
    if not (_C.have_cuda and _C.gpu_status()[0]):
        assert kernels["devices"] == []
        return
    assert [d for d, _, _ in kernels["devices"]] == [d for d, _ in _C.gpu_devices()]
    torch = pytest.importorskip("torch")
    major, minor = torch.cuda.get_device_capability(0)
    assert kernels["devices"][0][1:] == _C._kernel_image_for(major, minor, _C.cuda_archs)
