"""A thin disaggregated serving engine on kvxfer (torch required).

    model.py      Llama-architecture decoder (RMSNorm, RoPE, GQA, SwiGLU) over a paged KV cache; random weights
                  from a seed and a size preset, or a local Hugging Face directory (config.json + safetensors)
    kv_cache.py   PagedKVCache in kvxfer's vllm_flash layout, and the BlockAllocator that owns its blocks
    tokenizer.py  byte-level tokenizer (default) or a model directory's tokenizer.json

Still to come (issue 5): prefill / decode workers moving KV with kvxfer, the router with an OpenAI API, the
colocated baseline, metrics, the workload generator and the demo.
"""
