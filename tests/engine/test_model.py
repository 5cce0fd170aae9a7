"""kvxfer/engine/model.py against a reference nobody here wrote: transformers' Llama built from the same weights."""
import json

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (scripts/setup.sh installs torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (scripts/setup.sh installs it)")

from kvxfer.engine.kv_cache import BlockAllocator, OutOfBlocks, blocks_for  # noqa: E402
from kvxfer.engine.model import PRESETS, LlamaModel, ModelConfig  # noqa: E402
from kvxfer.errors import InvalidArgument, TransportUnavailable  # noqa: E402

CFG = ModelConfig(vocab_size=300, hidden_size=96, intermediate_size=200, num_layers=3, num_heads=6, num_kv_heads=2,
                  head_dim=32, rope_theta=10000.0)


def hf_model(cfg: ModelConfig, weights):
    hc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                  head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                                  max_position_embeddings=cfg.max_position, tie_word_embeddings=False,
                                  attention_bias=False, mlp_bias=False)
    m = transformers.LlamaForCausalLM(hc)
    missing, unexpected = m.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return m.eval()


@pytest.fixture(scope="module")
def pair():
    ours = LlamaModel.random(CFG, seed=7)
    for name in ours.w:  # non-trivial norms, so a mistake in RMSNorm cannot hide behind weights of one
        if name.endswith("norm.weight"):
            ours.w[name] = 1 + 0.1 * torch.randn(ours.w[name].shape, generator=torch.Generator().manual_seed(1))
    return ours, hf_model(CFG, ours.state_dict())


def scattered_table(n_blocks, seed=0, pool=64):
    return torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:n_blocks]


def test_prefill_logits_match_transformers(pair):
    ours, ref = pair
    ids = torch.randint(0, CFG.vocab_size, (37,), generator=torch.Generator().manual_seed(3))
    cache = ours.new_cache(num_blocks=64, block_size=4)
    (got,) = ours.prefill([ids], [scattered_table(blocks_for(37, 4))], cache, all_logits=True)
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_greedy_decode_over_paged_cache_matches_transformers(pair):
    ours, ref = pair
    prompt = torch.randint(0, CFG.vocab_size, (13,), generator=torch.Generator().manual_seed(5))
    cache = ours.new_cache(num_blocks=64, block_size=4)
    table = scattered_table(blocks_for(13 + 12, 4), seed=2)
    logits = ours.prefill([prompt], [table], cache)
    tokens, ref_ids = [], prompt[None]
    for step in range(12):
        nxt = int(logits[0].argmax())
        with torch.no_grad():
            ref_logits = ref(ref_ids).logits[0, -1]
        torch.testing.assert_close(logits[0], ref_logits, atol=2e-5, rtol=1e-4)
        assert nxt == int(ref_logits.argmax())
        tokens.append(nxt)
        ref_ids = torch.cat([ref_ids, torch.tensor([[nxt]])], dim=1)
        logits = ours.decode(torch.tensor([nxt]), torch.tensor([13 + step]), [table], cache)
    assert len(set(tokens)) > 1  # a model stuck on one token would make equality meaningless


def test_batched_decode_of_mixed_lengths_equals_each_alone(pair):
    ours, _ = pair
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in (5, 19, 11)]

    def run(batch):
        cache = ours.new_cache(num_blocks=64, block_size=4)
        tables = [torch.tensor(cache.allocator.allocate(blocks_for(len(p) + 6, 4))) for p in batch]
        logits = ours.prefill(batch, tables, cache)
        out = [[] for _ in batch]
        pos = torch.tensor([len(p) for p in batch])
        for _ in range(6):
            nxt = logits.argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                out[b].append(t)
            logits = ours.decode(nxt, pos, tables, cache)
            pos = pos + 1
        return out

    together = run(prompts)
    assert together == [run([p])[0] for p in prompts]


def test_from_pretrained_directory(tmp_path, pair):
    ours, ref = pair
    ref.save_pretrained(tmp_path, safe_serialization=True)
    loaded = LlamaModel.from_pretrained(str(tmp_path))
    assert loaded.cfg.num_kv_heads == 2 and loaded.cfg.head_dim == 32
    ids = torch.arange(20) % CFG.vocab_size
    a = loaded.prefill([ids], [torch.arange(5)], loaded.new_cache(8, 4))
    b = ours.prefill([ids], [torch.arange(5)], ours.new_cache(8, 4))
    torch.testing.assert_close(a, b)


def test_bad_model_directories(tmp_path):
    with pytest.raises(InvalidArgument, match="not a Hugging Face model directory"):
        LlamaModel.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="not a Llama-architecture model"):
        LlamaModel.from_pretrained(str(tmp_path))
    w = LlamaModel.random(PRESETS["tiny"]).state_dict()
    del w["model.norm.weight"]
    with pytest.raises(InvalidArgument, match="model.norm.weight is missing"):
        LlamaModel(PRESETS["tiny"], w)


def test_block_allocator():
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert len(set(x)) == 3 and a.num_free == 1
    with pytest.raises(OutOfBlocks, match="need 2 KV blocks but only 1 of 4"):
        a.allocate(2)
    a.free(x)
    with pytest.raises(InvalidArgument, match="not allocated"):
        a.free([x[0]])
    assert a.num_free == 4


def test_cache_registers_with_kvxfer_as_vllm_flash():
    import kvxfer

    cache = LlamaModel.random(PRESETS["tiny"]).new_cache(num_blocks=8, block_size=4)
    layout = cache.layout()
    assert layout.kind == "vllm_flash" and layout.total_bytes == sum(t.numel() * 4 for t in cache.layers)
    kvxfer.Agent("engine", transport="tcp", interface="lo").register_pool(cache.layers, layout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal is for machines without")
def test_cuda_device_without_cuda_is_refused_naming_the_fix():
    with pytest.raises(TransportUnavailable, match=r"device 'cuda'.*no CUDA device.*device='cpu'"):
        LlamaModel.random(PRESETS["tiny"], 0, device="cuda")


def test_bad_devices_are_refused_at_construction():
    with pytest.raises(InvalidArgument, match=r"device 'gpu0' is not a torch device.*'cpu' or 'cuda'"):
        LlamaModel.random(PRESETS["tiny"], 0, device="gpu0")
    with pytest.raises(InvalidArgument, match=r"device 'meta'.*runs on 'cpu' or 'cuda'"):
        LlamaModel.random(PRESETS["tiny"], 0, device="meta")


def test_node_with_an_unusable_device_exits_naming_it():
    """Before it connects anywhere: the port given is closed, and the node must not get as far as trying it."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "kvxfer.engine.node", "decode", "--connect", "127.0.0.1:1",
                        "--model", "tiny", "--device", "gpu0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "decode node: device 'gpu0' is not a torch device" in r.stderr, r.stderr
