"""`import kvxfer` (and kvxfer.adapters, kvxfer.push, the proxy) must not import vllm or torch."""
import subprocess
import sys


def test_kvxfer_and_adapters_import_no_engine():
    code = ("import sys, kvxfer, kvxfer.adapters, kvxfer.push, kvxfer.adapters.vllm_proxy; "
            "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_proxy_request_bodies():
    from kvxfer.adapters.vllm_proxy import transfer_params

    body = {"model": "m", "prompt": "hi", "max_tokens": 9, "stream": True, "stream_options": {"x": 1}}
    d = transfer_params(body, "decode", 77, ("127.0.0.1", 5600))
    assert d["kv_transfer_params"] == {"do_remote_prefill": True, "xfer_id": 77, "remote_host": "127.0.0.1",
                                       "remote_port": 5600}
    assert d["max_tokens"] == 9 and d["stream"] is True
    p = transfer_params(body, "prefill", 77, ("127.0.0.1", 5600))
    assert p["kv_transfer_params"] == {"do_remote_decode": True, "xfer_id": 77}
    assert p["max_tokens"] == 1 and p["stream"] is False and "stream_options" not in p
    assert body["max_tokens"] == 9 and "kv_transfer_params" not in body  # the client's body is not modified
