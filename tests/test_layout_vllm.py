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
