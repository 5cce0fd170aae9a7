"""The vLLM connector's per-step decisions, against vLLM's own forward contexts (no engine started): which steps
run no forward (V1 and V2 model runners say it differently), when prefill layers must not be marked one by one
(dual-batch overlap), and how GPU cache views become a kvxfer layout (MLA latents, layers sharing another's
KV cache). The GPU views are
stood in for by CPU tensors of the same shapes and strides: the layout reads only those.

Runs in .venv-vllm (scripts/setup_vllm.sh); skips, saying why, where it is missing.
"""
from __future__ import annotations

import subprocess

import pytest

from tests.adapters.test_vllm import VLLM_PY, _skip_reason

if _skip_reason():
    pytest.skip(_skip_reason(), allow_module_level=True)

SCRIPT = r'''
import torch
from vllm.config import VllmConfig
from vllm.forward_context import set_forward_context, get_forward_context
from vllm.v1.worker.ubatch_utils import UBatchSlice

import kvxfer.adapters.vllm as conn
from kvxfer.errors import InvalidArgument

config = VllmConfig()

# V1 runner: start_load_kv inside the step's forward context, no keyword arguments
with set_forward_context({"layers.0.attn": object()}, config):
    assert not conn._no_forward(get_forward_context(), {}), "a V1 step with a forward taken as idle"
with set_forward_context(None, config):
    assert conn._no_forward(get_forward_context(), {}), "a V1 step without a forward not taken as idle"
    # V2 runner: after the forward, outside its context (attn_metadata None), the batch in keyword arguments
    assert not conn._no_forward(get_forward_context(), {"request_ids": ["r1"], "num_tokens": 17}), \
        "a V2 step with a forward taken as idle"
    assert conn._no_forward(get_forward_context(), {}), "a V2 step without a forward not taken as idle"

# dual-batch overlap: layers run once per micro-batch
assert not conn._micro_batched(), "no forward context, yet micro-batched"
with set_forward_context({"layers.0.attn": object()}, config):
    assert not conn._micro_batched()
slices = [UBatchSlice(slice(0, 1), slice(0, 8)), UBatchSlice(slice(1, 2), slice(8, 16))]
with set_forward_context({"layers.0.attn": object()}, config, ubatch_slices=slices):
    assert conn._micro_batched(), "a micro-batched step not seen"

# GPU cache views (vLLM >= 0.32): [blocks, heads, tokens, K|V] per layer, layers outermost
def views(blocks, heads, tokens, row, layers, dtype=torch.bfloat16):
    buf = torch.zeros(layers, blocks, heads, tokens, row, dtype=dtype)
    return [buf[i] for i in range(layers)]

layout, memory = conn._views_layout(views(10, 4, 16, 256, 3), 16, use_mla=False)
assert (layout.kind, layout.num_kv_heads, layout.block_size, layout.head_dim) == ("vllm_paged", 4, 16, 256), layout
assert len(memory) == 3 and memory[0][1] == 10 * 4 * 16 * 256 * 2

# MLA: one "head" holding the latent (576 = 512 + 64), held whole by every TP rank
layout, memory = conn._views_layout(views(10, 1, 16, 576, 3), 16, use_mla=True)
assert (layout.kind, layout.num_kv_heads, layout.head_dim, layout.chunk_bytes) == ("mla", 0, 576, 16 * 576 * 2), layout
assert [m[1] for m in memory] == [10 * 16 * 576 * 2] * 3

try:
    conn._views_layout(views(10, 1, 16, 576, 3), 32, use_mla=True)
    raise SystemExit("views of 16-token blocks accepted for a 32-token scheduler")
except InvalidArgument as e:
    assert "--block-size 16" in str(e), e

buf = torch.zeros(10, 3, 1, 16, 576, dtype=torch.bfloat16)  # blocks outermost (BLHNC)
try:
    conn._views_layout([buf[:, i] for i in range(3)], 16, use_mla=True)
    raise SystemExit("blocks-outermost MLA views accepted")
except InvalidArgument as e:
    assert "blocks outermost" in str(e) and "VLLM_KV_CACHE_LAYOUT" in str(e), e
# cross-layer KV sharing: vLLM hands a sharing layer its target's very tensor
buf = torch.zeros(3, 10, 4, 16, 256, dtype=torch.bfloat16)
caches = {"l0": buf[0], "l1": buf[1], "l2": buf[2], "l3": buf[1], "l4": buf[0]}
owners, index = conn._unique_layers(caches)
assert owners == ["l0", "l1", "l2"] and index == {"l0": 0, "l1": 1, "l2": 2, "l3": 1, "l4": 0}, (owners, index)
assert conn._unique_layers({"a": buf[0], "b": buf[0][:5]}) == (["a", "b"], {"a": 0, "b": 1}), "a view of fewer blocks"
blocks_outer = torch.zeros(10, 2, 4, 16, 256, dtype=torch.bfloat16)  # BLHNC, layer 2 shares layer 0's cache
caches = {"l0": blocks_outer[:, 0], "l1": blocks_outer[:, 1], "l2": blocks_outer[:, 0]}
owners, index = conn._unique_layers(caches)
layout, memory = conn._views_layout([caches[n] for n in owners], 16, use_mla=False)
assert (layout.num_layers, len(memory), index["l2"]) == (2, 1, 0), (layout, memory, index)
print("OK")
'''


def test_worker_hooks_decide_from_vllms_own_forward_contexts():
    out = subprocess.run([str(VLLM_PY), "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-2000:] + out.stderr[-4000:]
