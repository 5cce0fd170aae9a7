"""Llama-architecture decoder over a paged KV cache: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Weights use Hugging Face's parameter names, so a local HF directory (config.json + *.safetensors) loads as is and
the tests compare logits and greedy tokens against transformers' own Llama built from the same weights.

    model = LlamaModel.random(PRESETS["small"], seed=0)           # or LlamaModel.from_pretrained(dir)
    model = LlamaModel.random(PRESETS["small"], seed=0, device="cuda")   # weights and KV cache on the GPU
    logits = model.prefill([ids], [block_table], cache, on_layer=lambda layer: send.layer_ready(layer))
    logits = model.decode(tokens, positions, block_tables, cache)  # one token for each running sequence

prefill runs layer-major over its batch and calls on_layer(l) after layer l's K/V of every sequence is in the cache:
the hook the prefill worker uses to let kvxfer send that layer while the next one computes. On a GPU the hook runs
when layer l's kernels are queued, not done: the prefill worker turns it into a stream-ordered signal.

Inputs (token ids, positions, block tables) may be CPU tensors on any device: the model moves them.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvxfer.engine.kv_cache import PagedKVCache
from kvxfer.errors import InvalidArgument, TransportUnavailable


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 320
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position: int = 16384
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2-style checkpoints
    o_bias: bool = False

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        if d.get("model_type") not in (None, "llama", "qwen2", "mistral"):
            raise InvalidArgument(f"model_type {d.get('model_type')!r} is not a Llama-architecture model; "
                                  "use a llama, qwen2 or mistral checkpoint")
        rope = d.get("rope_scaling") or {}
        if rope and rope.get("rope_type", rope.get("type")) not in (None, "default"):
            raise InvalidArgument(f"rope_scaling {rope} is not supported; use a checkpoint with default RoPE")
        heads = d["num_attention_heads"]
        theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        bias = bool(d.get("attention_bias", False))
        qwen = d.get("model_type") == "qwen2"
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-5),
                   rope_theta=float(theta), max_position=d.get("max_position_embeddings", 16384),
                   tie_embeddings=bool(d.get("tie_word_embeddings", False)), qkv_bias=bias or qwen,
                   o_bias=bias and not qwen)


PRESETS = {
    "tiny": ModelConfig(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
    "small": ModelConfig(),  # a 1,000-token prefill takes ~0.25 s on 2 CPU cores (fp32)
    "medium": ModelConfig(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, num_kv_heads=4),
}


def check_device(device: str | torch.device) -> torch.device:
    """A torch device this process can compute on ('cuda' becomes the current GPU's cuda:N); a CUDA device without
    CUDA fails here, naming the fix."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument(f"device {device!r} is not a torch device; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TransportUnavailable(f"device {device!r}: torch sees no CUDA device (torch {torch.__version__}, "
                                       f"CUDA build {torch.version.cuda}); run on a GPU machine or use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgument(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        if dev.index is None:  # the current GPU, named: later tensors and torch.cuda.set_device need its index
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise InvalidArgument(f"device {device!r}: the engine runs on 'cpu' or 'cuda' devices")
    return dev


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.cfg, self.dtype, self.device = cfg, dtype, check_device(device)
        self.w = {k: v.to(device=self.device, dtype=dtype) for k, v in weights.items()}
        self._check_weights()
        half = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
        self._inv_freq = (1.0 / (cfg.rope_theta ** half)).to(self.device)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> "LlamaModel":
        """The same weights on every device: they are drawn on the CPU, then moved."""
        device = check_device(device)
        g = torch.Generator().manual_seed(seed)
        w = {}
        for name, shape in cls.parameter_shapes(cfg).items():
            w[name] = torch.ones(shape) if name.endswith("norm.weight") else \
                torch.zeros(shape) if name.endswith(".bias") else torch.randn(shape, generator=g) * 0.02
        return cls(cfg, w, dtype, device)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "LlamaModel":
        device = check_device(device)
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InvalidArgument("loading a model directory needs safetensors: pip install safetensors") from None
        cfg_path = os.path.join(path, "config.json")
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not os.path.exists(cfg_path) or not files:
            raise InvalidArgument(f"{path} is not a Hugging Face model directory (needs config.json and "
                                  "*.safetensors); nothing is downloaded at run time")
        with open(cfg_path) as f:
            cfg = ModelConfig.from_hf(json.load(f))
        weights = {}
        for fn in files:
            weights.update(load_file(fn))
        if cfg.tie_embeddings:
            weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
        return cls(cfg, weights, dtype, device)

    @staticmethod
    def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple]:
        h, q, kv, ffn = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
            cfg.intermediate_size
        shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
                  "lm_head.weight": (cfg.vocab_size, h)}
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                           p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                           p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                           p + "mlp.down_proj.weight": (h, ffn), p + "input_layernorm.weight": (h,),
                           p + "post_attention_layernorm.weight": (h,)})
            if cfg.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if cfg.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
        return shapes

    def _check_weights(self) -> None:
        for name, shape in self.parameter_shapes(self.cfg).items():
            if name not in self.w:
                raise InvalidArgument(f"weight {name} is missing from the checkpoint")
            if tuple(self.w[name].shape) != shape:
                raise InvalidArgument(f"weight {name} has shape {tuple(self.w[name].shape)}, config needs {shape}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.w)

    def new_cache(self, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        c = self.cfg
        return PagedKVCache(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    # ---- forward --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[torch.Tensor], block_tables: list[torch.Tensor], cache: PagedKVCache,
                on_layer=None, all_logits: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Run whole prompts (positions 0..T-1); write their K/V; return next-token logits [B, vocab]."""
        seqs, block_tables = [s.to(self.device) for s in seqs], [bt.to(self.device) for bt in block_tables]
        xs = [self.w["model.embed_tokens.weight"][s] for s in seqs]
        positions = [torch.arange(len(s), device=self.device) for s in seqs]
        slots = [cache.slots(bt, p) for bt, p in zip(block_tables, positions)]
        ropes = [self._rope(p) for p in positions]
        for layer in range(self.cfg.num_layers):
            for b in range(len(xs)):
                xs[b] = self._prefill_layer(layer, xs[b], ropes[b], slots[b], cache)
            if on_layer is not None:
                on_layer(layer)
        if all_logits:
            return [self._logits(x) for x in xs]
        return torch.stack([self._logits(x[-1:])[0] for x in xs])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, block_tables: list[torch.Tensor],
               cache: PagedKVCache) -> torch.Tensor:
        """One step for B running sequences: token b sits at positions[b]; returns logits [B, vocab]."""
        lengths = [int(p) + 1 for p in positions.tolist()]  # on the host before anything moves: no device sync
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        block_tables = [bt.to(self.device) for bt in block_tables]
        x = self.w["model.embed_tokens.weight"][tokens]
        rope = self._rope(positions)
        new_slots = torch.stack([cache.slots(bt, p.view(1))[0] for bt, p in zip(block_tables, positions)])
        # Each sequence's context is read a whole block at a time (16x fewer indices than per token) and only as
        # far as it goes: no padding to the longest one, whose copies cost more than the attention itself.
        ctx = [(bt[: (n - 1) // cache.block_size + 1][None], n) for bt, n in zip(block_tables, lengths)]
        for layer in range(self.cfg.num_layers):
            x = self._decode_layer(layer, x, rope, new_slots, ctx, cache)
        return self._logits(x)

    # ---- pieces ---------------------------------------------------------------------------------------
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self._inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [T, heads, hd]; cos/sin [T, hd]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return self.w[name] * x32.to(self.dtype)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _qkv(self, layer: int, x: torch.Tensor, rope):
        c, p = self.cfg, f"model.layers.{layer}."
        h = self._norm(x, p + "input_layernorm.weight")
        q = self._linear(h, p + "self_attn.q_proj").view(-1, c.num_heads, c.head_dim)
        k = self._linear(h, p + "self_attn.k_proj").view(-1, c.num_kv_heads, c.head_dim)
        v = self._linear(h, p + "self_attn.v_proj").view(-1, c.num_kv_heads, c.head_dim)
        return self._apply_rope(q, *rope), self._apply_rope(k, *rope), v

    def _finish_layer(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}."
        x = x + self._linear(attn, p + "self_attn.o_proj")
        h = self._norm(x, p + "post_attention_layernorm.weight")
        ffn = F.silu(self._linear(h, p + "mlp.gate_proj")) * self._linear(h, p + "mlp.up_proj")
        return x + self._linear(ffn, p + "mlp.down_proj")

    def _prefill_layer(self, layer, x, rope, slots, cache) -> torch.Tensor:
        c = self.cfg
        q, k, v = self._qkv(layer, x, rope)
        cache.write(layer, slots, k, v)
        rep = c.num_heads // c.num_kv_heads
        attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
                                              v.repeat_interleave(rep, 1).transpose(0, 1), is_causal=True)
        return self._finish_layer(layer, x, attn.transpose(0, 1).reshape(len(x), -1))

    def _decode_layer(self, layer, x, rope, new_slots, ctx, cache) -> torch.Tensor:
        c = self.cfg
        q, k, v = self._qkv(layer, x, rope)  # q [B, heads, hd]
        cache.write(layer, new_slots, k, v)
        # Grouped-query attention without copying K/V per query head: the `rep` query heads that share a KV head
        # (head h reads KV head h // rep) go in as that KV head's rep query rows. One new token per sequence sees
        # its whole context, so no mask.
        rep = c.num_heads // c.num_kv_heads
        qg = q.view(len(x), c.num_kv_heads, rep, c.head_dim)
        out = []
        for b, (blocks, length) in enumerate(ctx):
            kc, vc = cache.gather_blocks(layer, blocks)  # [1, blocks * block_size, kv_heads, hd]
            kc = kc[:, :length].to(self.dtype).transpose(1, 2)  # [1, kv_heads, ctx, hd]
            vc = vc[:, :length].to(self.dtype).transpose(1, 2)
            out.append(F.scaled_dot_product_attention(qg[b: b + 1], kc, vc))  # [1, kv_heads, rep, hd]
        return self._finish_layer(layer, x, torch.cat(out).reshape(len(x), -1))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._norm(x, "model.norm.weight"), self.w["lm_head.weight"]).to(torch.float32)
