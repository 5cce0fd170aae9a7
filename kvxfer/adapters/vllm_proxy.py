"""A minimal disaggregating proxy for two vLLM servers that load kvxfer's connector (kvxfer.adapters.vllm).

    python -m kvxfer.adapters.vllm_proxy --port 8000 --prefill http://127.0.0.1:8100 \\
        --prefill-push 127.0.0.1:5600 --decode http://127.0.0.1:8200

Each POST /v1/completions or /v1/chat/completions gets a fresh 63-bit transfer id and goes to the decode server
first (kv_transfer_params: do_remote_prefill, the prefill server's push address, the id): the decode engine
allocates the prompt's blocks and registers them with the prefill worker. `--decode-lead-s` later the same request
goes to the prefill server with max_tokens=1 (do_remote_decode, the same id), which writes the prompt's KV into those
blocks, layer by layer when the registration arrived before its forward. The decode server's answer (streamed or
not) is relayed to the client. If the prefill server refuses the request, the client gets 502 with its error and the
decode request is dropped (the decode side's load then fails at its transfer timeout).

Standard library only (no extra dependency), one thread per request. GET /health checks both servers;
GET /v1/models is answered by the decode server.
"""
from __future__ import annotations

import argparse
import http.client
import json
import secrets
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvxfer.bootstrap import parse_hostport


class Backend:
    def __init__(self, url: str):
        u = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme != "http" or not u.hostname:
            raise SystemExit(f"kvxfer vllm_proxy: {url!r} is not an http://HOST:PORT url")
        self.url, self.host, self.port = url, u.hostname, u.port or 80

    def open(self, method: str, path: str, body: bytes | None, timeout_s: float) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        return conn


def transfer_params(body: dict, role: str, xfer_id: int, push: tuple[str, int]) -> dict:
    """The request body for one side. Decode: the whole request plus where to get the KV. Prefill: one token only."""
    out = dict(body)
    if role == "decode":
        out["kv_transfer_params"] = {"do_remote_prefill": True, "xfer_id": xfer_id,
                                     "remote_host": push[0], "remote_port": push[1]}
    else:
        out.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True, "xfer_id": xfer_id})
        out.pop("stream_options", None)
        if "max_completion_tokens" in out:
            out["max_completion_tokens"] = 1
    return out


def make_handler(prefill: Backend, decode: Backend, push: tuple[str, int], lead_s: float, timeout_s: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes: simple streaming relay

        def log_message(self, fmt, *args):  # quiet by default; errors are reported in responses
            pass

        def _reply(self, status: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                bad = {}
                for name, b in (("prefill", prefill), ("decode", decode)):
                    try:
                        r = b.open("GET", "/health", None, 5).getresponse()
                        if r.status != 200:
                            bad[name] = f"HTTP {r.status}"
                    except OSError as e:
                        bad[name] = str(e)
                return self._reply(503 if bad else 200, {"ok": not bad, **bad})
            if self.path == "/v1/models":
                return self._relay(decode.open("GET", self.path, None, timeout_s).getresponse())
            self._reply(404, {"error": f"no route GET {self.path}"})

        def do_POST(self):
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                return self._reply(404, {"error": f"no route POST {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
            except ValueError as e:
                return self._reply(400, {"error": f"bad request body: {e}"})
            xfer_id = secrets.randbits(63)
            try:
                d_conn = decode.open("POST", self.path, json.dumps(transfer_params(body, "decode", xfer_id, push))
                                     .encode(), timeout_s)
            except OSError as e:
                return self._reply(502, {"error": f"decode server {decode.url}: {e}"})
            p_result: dict = {}
            p_thread = threading.Thread(target=self._prefill, args=(body, xfer_id, p_result), daemon=True)
            time.sleep(lead_s)  # decode first: its blocks are usually registered before the prefill forward
            p_thread.start()
            p_thread.join()
            if "error" in p_result:
                d_conn.close()
                return self._reply(502, {"error": f"prefill server {prefill.url}: {p_result['error']}"})
            try:
                self._relay(d_conn.getresponse())
            except OSError as e:
                self._reply(502, {"error": f"decode server {decode.url}: {e}"})

        def _prefill(self, body: dict, xfer_id: int, result: dict) -> None:
            try:
                r = prefill.open("POST", self.path, json.dumps(transfer_params(body, "prefill", xfer_id, push))
                                 .encode(), timeout_s).getresponse()
                data = r.read()
                if r.status != 200:
                    result["error"] = f"HTTP {r.status}: {data[:500].decode(errors='replace')}"
            except OSError as e:
                result["error"] = str(e)

        def _relay(self, r: http.client.HTTPResponse) -> None:
            self.send_response(r.status)
            self.send_header("Content-Type", r.getheader("Content-Type", "application/json"))
            self.end_headers()
            while chunk := r.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()

    return Handler


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvxfer.adapters.vllm_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prefill", required=True, help="prefill vLLM server, http://HOST:PORT")
    ap.add_argument("--prefill-push", required=True,
                    help="HOST:PORT the prefill worker's kvxfer push server listens on (its push_port)")
    ap.add_argument("--decode", required=True, help="decode vLLM server, http://HOST:PORT")
    ap.add_argument("--decode-lead-s", type=float, default=0.05,
                    help="how long the decode request leads the prefill request (default 0.05)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout towards the servers")
    a = ap.parse_args(argv)
    push = parse_hostport(a.prefill_push)
    handler = make_handler(Backend(a.prefill), Backend(a.decode), push, a.decode_lead_s, a.timeout_s)
    server = ThreadingHTTPServer((a.host, a.port), handler)
    print(f"kvxfer vllm_proxy: http://{a.host}:{server.server_address[1]} -> prefill {a.prefill} "
          f"(push {push[0]}:{push[1]}), decode {a.decode}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
