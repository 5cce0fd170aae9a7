"""GPU tests: skipped, with the reason, where torch has no CUDA device or this kvxfer build cannot use one."""
import pytest


def gpu_skip_reason() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (these tests need an NVIDIA GPU)"
    from kvxfer import _C

    if not _C.have_cuda:
        return "this kvxfer build has no CUDA (build it where nvcc is installed)"
    ok, why = _C.gpu_status()
    return "" if ok else f"kvxfer cannot use the GPU: {why}"


requires_gpu = pytest.mark.skipif(bool(gpu_skip_reason()), reason=gpu_skip_reason() or "GPU present")


@pytest.fixture
def gpu_remote():
    from tests.conftest import RemoteSender
    from tests.gpu.gpu_peer import serve

    r = RemoteSender(serve)
    yield r
    r.close()
