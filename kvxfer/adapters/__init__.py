"""Engine adapters. Each imports its engine only when imported itself (`import kvxfer` imports none of them):
kvxfer.adapters.vllm (KvxferConnector, loaded by vLLM through kv_connector_module_path) and
kvxfer.adapters.vllm_proxy (the disaggregating proxy in front of a prefill and a decode vLLM server)."""
