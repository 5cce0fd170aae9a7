"""KVLayout.from_vllm: vLLM backend name + one layer's shape -> the matching preset, or an error naming the fix."""
import pytest

from kvxfer import KVLayout, errors


def test_backends_map_to_presets():
    assert KVLayout.from_vllm("CPU_ATTN", (128, 2, 32, 64), "float32", 2) == KVLayout.vllm_cpu(2, 128, 32, 2, 32, "float32")
    assert (KVLayout.from_vllm("FLASH_ATTN", (2, 100, 16, 8, 128), "bfloat16", 32)
            == KVLayout.vllm_flash(32, 100, 16, 8, 128, "bfloat16"))
    assert (KVLayout.from_vllm("FLASHINFER", (100, 2, 16, 8, 128), "float16", 4)
            == KVLayout.flashinfer(4, 100, 16, 8, 128, "float16"))
    assert KVLayout.from_vllm("TRITON_MLA", (50, 64, 576), "bfloat16", 61) == KVLayout.mla(61, 50, 64, 576, "bfloat16")
    # the CPU chunk is one (block, all heads, K and V): 2 heads * 32 tokens * 64 floats
    assert KVLayout.from_vllm("CPU_ATTN", (128, 2, 32, 64), "torch.float32", 2).chunk_bytes == 2 * 32 * 64 * 4


def test_bad_backend_or_shape_is_named():
    with pytest.raises(errors.InvalidArgument, match="backend 'ROCM_AITER' has no kvxfer layout"):
        KVLayout.from_vllm("ROCM_AITER", (1, 2, 3, 4), "float32", 1)
    with pytest.raises(errors.InvalidArgument, match=r"FLASH_ATTN KV cache layer is \[2, blocks"):
        KVLayout.from_vllm("FLASH_ATTN", (100, 2, 16, 8, 128), "bfloat16", 1)
    with pytest.raises(errors.InvalidArgument, match="is odd"):
        KVLayout.from_vllm("CPU_ATTN", (8, 2, 32, 63), "float32", 1)
    with pytest.raises(errors.InvalidArgument, match="dtype 'int4'"):
        KVLayout.from_vllm("CPU_ATTN", (8, 2, 32, 64), "int4", 1)


def test_dtype_spellings_give_one_layout():
    """vLLM hands the connector torch dtypes while a peer may pass a string: the layouts must compare equal, or the
    core refuses the transfer as a layout mismatch (seen end to end: 'float32 on the sender but torch.float32')."""
    import numpy as np

    want = KVLayout.vllm_cpu(2, 8, 16, 2, 32, "float32")
    assert want.dtype == "float32"
    assert KVLayout.vllm_cpu(2, 8, 16, 2, 32, "torch.float32") == want
    assert KVLayout.vllm_cpu(2, 8, 16, 2, 32, np.float32) == want
    assert KVLayout.vllm_cpu(2, 8, 16, 2, 32, np.dtype("float32")) == want
    torch = pytest.importorskip("torch")
    assert KVLayout.from_vllm("CPU_ATTN", (8, 2, 16, 64), torch.float32, 2) == want
    assert KVLayout.vllm_flash(2, 8, 16, 2, 32, torch.bfloat16).dtype == "bfloat16"
