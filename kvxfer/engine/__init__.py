"""A thin disaggregated serving engine on kvxfer (torch required).

    model.py      Llama-architecture decoder (RMSNorm, RoPE, GQA, SwiGLU) over a paged KV cache; random weights
                  from a seed and a size preset, or a local Hugging Face directory (config.json + safetensors)
    kv_cache.py   PagedKVCache in kvxfer's vllm_flash layout, and the BlockAllocator that owns its blocks
    tokenizer.py  byte-level tokenizer (default) or a model directory's tokenizer.json
    prefill.py    PrefillWorker: batched prefill, each layer's KV sent with kvxfer as soon as it is computed
    decode.py     DecodeWorker: continuous batching over arrived (or, colocated, locally computed) KV
    node.py       prefill / decode / colocated node processes
    router.py     the OpenAI-compatible front end (completions incl. streaming, models, health, metrics)
    metrics.py    per-request timings and their summaries; workload.py: Poisson / JSONL workloads
    demo.py       kvxfer-demo: disaggregated vs colocated on one workload (loopback, two netns, or two hosts)
"""
