"""Router: the OpenAI-compatible front end. It owns no model; it tokenizes, assigns each request to the nodes and
streams the decode side's tokens back.

    POST /v1/completions   {"prompt": str, "max_tokens": int, "stream": bool}  (greedy decoding only)
    GET  /v1/models, /health, /metrics (Prometheus), /stats (per-request timings, JSON)

Disaggregated flow per batch (push model): the decode node allocates blocks and returns their ids ("admit"); the
prefill node runs the batch and writes each request's KV into those blocks layer by layer with kvxfer; its first
tokens stream to the client at once; the decode node joins each request to its running batch when the KV has
arrived. Colocated flow: one node does both. Nodes connect to the router's node port (`--nodes`); with `--spawn`
the router starts them itself on this machine. A node that dies can be replaced while the router runs: a new node
of that role connecting to the node port is given the surviving node's kvxfer metadata (and the survivor the new
node's), and the router is healthy again; until then it answers 503 naming the lost node.
"""
from __future__ import annotations

import argparse
import enum
import itertools
import json
import queue
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvxfer import bootstrap
from kvxfer.engine.metrics import Registry, RequestTiming
from kvxfer.engine.tokenizer import ByteTokenizer
from kvxfer.errors import KvxferError, MetadataError

MAX_BATCH_REQUESTS, MAX_BATCH_TOKENS = 8, 4096


class Phase(enum.Enum):
    ADMITTING = "admitting"  # waiting for the decode node's blocks
    QUEUED = "queued"        # blocks known; waiting for a prefill batch
    PREFILL = "prefill"      # in a prefill batch: its KV is moving
    DECODE = "decode"        # first token streamed; the decode node has it (or, colocated, the one node)


class Request:
    def __init__(self, rid: int, prompt: list[int], max_tokens: int):
        self.id, self.prompt, self.max_tokens = rid, prompt, max_tokens
        self.events: queue.Queue = queue.Queue()  # (token | None, finished, error | None, http_status)
        self.timing = RequestTiming(arrival=time.perf_counter())
        self.phase = Phase.ADMITTING
        self.dst_blocks: list[int] = []
        self.skip_decode_first = False
        self.cancelled = False  # cancelled before its prefill: no batch may take it any more
        self.done = False


def error_status(error: str) -> int:
    """HTTP status for a failed request: 504 when a transfer or a node timed out, else 503 (a node failed)."""
    return 504 if "TransferTimeout" in error or "timed out" in error else 503


class Router:
    def __init__(self, mode: str, model_name: str, timeout_s: float = 30.0):
        self.mode, self.model_name, self.timeout_s = mode, model_name, timeout_s
        self.tokenizer = ByteTokenizer()
        self.requests: dict[int, Request] = {}
        self.finished: list[Request] = []
        self.registry = Registry()
        self.node_blocks: dict[str, dict] = {}  # role -> {"free_blocks", "num_blocks"}, as the node last reported
        self._ids = itertools.count(1)
        self._to_admit: queue.Queue = queue.Queue()
        self._waiting: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._send_locks = {role: threading.Lock() for role in ("prefill", "decode", "colocated")}
        self.healthy, self.unhealthy_reason = False, "nodes not connected yet"
        self._lost: set[str] = set()          # roles whose node is gone and not replaced yet
        self._md: dict[str, bytes] = {}       # each node's kvxfer metadata, for its replacement's peer
        self._prefill_thread: threading.Thread | None = None

    # ---- nodes ----------------------------------------------------------------------------------------
    def attach(self, lst: bootstrap.Listener) -> None:
        want = self._roles()
        self.nodes: dict[str, bootstrap.Channel] = {}
        while set(self.nodes) != want:
            ch = lst.accept(timeout_s=600)
            role = ch.recv_json(timeout_s=max(self.timeout_s, 60.0)).get("role")
            if role not in want or role in self.nodes:
                ch.close()
                continue
            self.nodes[role] = ch
        if self.mode == "disagg":
            md_p = self.nodes["prefill"].recv(timeout_s=120)
            md_d = self.nodes["decode"].recv(timeout_s=120)
            self._md = {"prefill": md_p, "decode": md_d}
            self.nodes["prefill"].send(md_d)
            self.nodes["decode"].send(md_p)
            self.node_blocks["prefill"] = self._recv_prefill("blocks", 120)
            self._start_prefill_loop()
            threading.Thread(target=self._admit_loop, daemon=True).start()
        stream_node = self.nodes["decode" if self.mode == "disagg" else "colocated"]
        threading.Thread(target=self._node_reader, args=(stream_node,), daemon=True).start()
        self.healthy, self.unhealthy_reason = True, ""
        threading.Thread(target=self._accept_replacements, args=(lst,), daemon=True).start()

    def _roles(self) -> set[str]:
        return {"prefill", "decode"} if self.mode == "disagg" else {"colocated"}

    def _start_prefill_loop(self) -> None:
        if self._prefill_thread is None or not self._prefill_thread.is_alive():
            self._prefill_thread = threading.Thread(target=self._prefill_loop, daemon=True)
            self._prefill_thread.start()

    def _accept_replacements(self, lst: bootstrap.Listener) -> None:
        """Nodes connecting after start-up: one for a lost role takes its place; any other is turned away."""
        while True:
            try:
                ch = lst.accept(timeout_s=3600)
            except KvxferError:
                continue  # nobody in an hour: keep listening
            except OSError:
                return  # the listener was closed
            try:
                role = ch.recv_json(timeout_s=max(self.timeout_s, 60.0)).get("role")
                if role not in self._roles() or role not in self._lost:
                    ch.close()  # the node sees its channel closed and exits
                    continue
                self._replace(role, ch)
            except KvxferError as e:  # the newcomer failed its handshake: the role stays lost
                self.unhealthy_reason = f"{self.unhealthy_reason}; a replacement {role} node failed to join ({e})"
                ch.close()

    def _replace(self, role: str, ch: bootstrap.Channel) -> None:
        """The kvxfer handshake of a replacement node with the surviving one, through this router."""
        if self.mode == "disagg":
            md_new, other = ch.recv(timeout_s=120), ("decode" if role == "prefill" else "prefill")
            with self._send_locks[other]:  # the survivor adds the newcomer as its kvxfer peer
                self.nodes[other].send_json({"cmd": "new_peer"})
                self.nodes[other].send(md_new)
            ch.send(self._md[other])
            self._md[role] = md_new
            if role == "prefill":
                msg = ch.recv_json(timeout_s=120)
                if msg.get("type") != "blocks":
                    raise MetadataError(f"replacement prefill node sent {msg.get('type')!r} where 'blocks' was due")
                self.node_blocks["prefill"] = {"free_blocks": msg["free_blocks"], "num_blocks": msg["num_blocks"]}
        with self._send_locks[role]:
            self.nodes[role] = ch
        if role == "prefill":
            self._start_prefill_loop()
        else:
            threading.Thread(target=self._node_reader, args=(ch,), daemon=True).start()
        self._lost.discard(role)
        if not self._lost:
            self.healthy, self.unhealthy_reason = True, ""

    def close(self) -> None:
        for role in getattr(self, "nodes", {}):
            self._send(role, {"cmd": "bye"})

    # ---- requests -------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], max_tokens: int) -> Request:
        req = Request(next(self._ids), prompt, max_tokens)
        with self._lock:
            self.requests[req.id] = req
            self.registry.requests += 1
        if not self.healthy:
            self._fail(req, f"router unhealthy: {self.unhealthy_reason}")
        elif self.mode == "disagg":
            self._to_admit.put(req)
        else:
            req.phase = Phase.DECODE
            self._send("colocated", {"cmd": "submit", "id": req.id, "prompt": prompt, "max_tokens": max_tokens}, req)
        return req

    def cancel(self, req: Request, reason: str) -> None:
        with self._lock:
            if req.done:
                return
            # Never handed to the prefill node (and now never will be): no write can come, so the decode node may
            # free the blocks at once.
            never_sent = req.phase in (Phase.ADMITTING, Phase.QUEUED)
            req.cancelled = req.cancelled or never_sent
        self._send("decode" if self.mode == "disagg" else "colocated",
                   {"cmd": "cancel", "id": req.id, "reason": reason, "sender_done": never_sent}, req)

    def _send(self, role: str, msg: dict, req: Request | None = None) -> bool:
        try:
            with self._send_locks[role]:
                self.nodes[role].send_json(msg)
            return True
        except KvxferError as e:
            self._node_lost(role, e)
            if req is not None:
                self._fail(req, f"{role} node unreachable: {e}")
            return False

    def _node_lost(self, role: str, e: Exception) -> None:
        self._lost.add(role)
        self.healthy, self.unhealthy_reason = False, f"{role} node lost ({e})"
        with self._lock:
            live = [r for r in self.requests.values() if not r.done]
        for r in live:
            self._fail(r, f"{role} node lost: {e}")

    def _fail(self, req: Request, error: str, status: int | None = None) -> None:
        with self._lock:
            if req.done:
                return
            req.timing.error = error
        self._finish(req)
        req.events.put((None, True, error, status or error_status(error)))

    def _finish(self, req: Request) -> None:
        with self._lock:
            if req.done:
                return
            req.done = True
            self.requests.pop(req.id, None)
            self.finished.append(req)
            self.registry.failed += req.timing.error is not None
            if req.timing.ttft is not None:
                self.registry.ttft.append(req.timing.ttft)

    def _token(self, req: Request, token: int, finished: bool) -> None:
        now = time.perf_counter()
        t = req.timing
        if t.first_token is None:
            t.first_token = now
        t.last_token, t.tokens = now, t.tokens + 1
        with self._lock:
            self.registry.tokens += 1
        if finished:
            self._finish(req)
        req.events.put((token, finished, None, 200))

    # ---- the decode (or colocated) node's stream --------------------------------------------------------
    def _node_reader(self, ch: bootstrap.Channel) -> None:
        role = "decode" if self.mode == "disagg" else "colocated"
        try:
            while True:
                msg = ch.recv_json(timeout_s=24 * 3600)
                kind = msg.get("type")
                if kind == "admitted":
                    self._admitted(msg["reqs"])
                elif kind == "blocks":
                    self.node_blocks[role] = {"free_blocks": msg["free_blocks"], "num_blocks": msg["num_blocks"]}
                elif kind == "token":
                    self._node_token(msg)
        except KvxferError as e:
            self._node_lost(role, e)

    def _node_token(self, msg: dict) -> None:
        req = self.requests.get(msg["id"])
        if req is None:
            return
        if msg["token"] is None:
            error = msg.get("error") or "failed"
            if "from the prefill node" in error and "PeerLost" in error:
                # The decode node saw the prefill process gone before this router's channel to it did.
                self._lost.add("prefill")
                self.healthy, self.unhealthy_reason = False, f"prefill node lost ({error})"
            self._fail(req, error)
        elif req.skip_decode_first:
            # The decode node's first event repeats the prefill's token, which was streamed already.
            req.skip_decode_first = False
            if msg["finished"]:
                self._finish(req)
                req.events.put((None, True, None, 200))
        else:
            self._token(req, msg["token"], msg["finished"])

    # ---- disaggregated flow: admit at arrival, prefill in batches ---------------------------------------
    def _admit_loop(self) -> None:
        """Every request is admitted at the decode node as it arrives (one message for all that arrived together),
        so its blocks are known before its prefill batch forms: no round trip stands before the prefill."""
        while True:
            reqs = [self._to_admit.get()]
            while not self._to_admit.empty():
                reqs.append(self._to_admit.get())
            self._send("decode", {"cmd": "admit", "reqs": [{"id": r.id, "prompt_len": len(r.prompt),
                                                           "max_tokens": r.max_tokens} for r in reqs]})

    def _admitted(self, replies: list[dict]) -> None:
        for rep in replies:
            req = self.requests.get(rep["id"])
            if req is None or req.done or req.cancelled:  # nothing will be sent into its blocks
                if "dst_blocks" in rep:
                    self._send("decode", {"cmd": "cancel", "id": rep["id"], "reason": "cancelled",
                                          "sender_done": True})
            elif "error" in rep:
                self._fail(req, f"decode node could not admit the request: {rep['error']}")
            else:
                req.dst_blocks, req.phase = rep["dst_blocks"], Phase.QUEUED
                self._waiting.put(req)

    def _prefill_loop(self) -> None:
        while True:
            batch = [self._waiting.get()]
            tokens = len(batch[0].prompt)
            while len(batch) < MAX_BATCH_REQUESTS and not self._waiting.empty():
                nxt = self._waiting.queue[0]
                if tokens + len(nxt.prompt) > MAX_BATCH_TOKENS:
                    break
                batch.append(self._waiting.get())
                tokens += len(nxt.prompt)
            try:
                self._prefill_batch(batch)
            except KvxferError as e:
                self._node_lost("prefill", e)
                return

    def _recv_prefill(self, kind: str, timeout_s: float) -> dict:
        msg = self.nodes["prefill"].recv_json(timeout_s=timeout_s)
        if msg.get("type") != kind:
            raise MetadataError(f"prefill node sent {msg.get('type')!r} where {kind!r} was due")
        if "free_blocks" in msg:
            self.node_blocks["prefill"] = {"free_blocks": msg["free_blocks"], "num_blocks": msg["num_blocks"]}
        return msg

    def _prefill_batch(self, batch: list[Request]) -> None:
        with self._lock:
            batch = [r for r in batch if not r.done and not r.cancelled]
            for r in batch:
                r.phase = Phase.PREFILL
        if not batch:
            return
        ids = [r.id for r in batch]
        self._send("decode", {"cmd": "expect", "ids": ids})  # opens the recvs; may arrive after the data, that's fine
        self._send("prefill", {"cmd": "prefill", "jobs": [{"xfer_id": r.id, "prompt": r.prompt,
                                                         "dst_blocks": r.dst_blocks} for r in batch]})
        first = self._recv_prefill("first", max(600.0, self.timeout_s))
        if not first["ok"]:
            for req in batch:
                req.timing.kv_error = first["error"]
                self._fail(req, f"prefill failed: {first['error']}", 503)
                self._send("decode", {"cmd": "cancel", "id": req.id, "reason": first["error"], "sender_done": True})
            return
        # The first tokens stream now; the last layers' KV may still be on the wire.
        items = []
        for req, token in zip(batch, first["first_tokens"]):
            req.phase = Phase.DECODE
            if not req.done:
                req.skip_decode_first = True
                self._token(req, token, False)  # decode ends the request, even at max_tokens == 1 (frees blocks)
                items.append([req.id, token])
        self._send("decode", {"cmd": "first_token", "items": items})
        kv = self._recv_prefill("kv", self.timeout_s + 60)
        for req, nbytes, exposed, err, path in zip(batch, kv["kv_bytes_each"], kv["exposed_s"], kv["errors"],
                                                   kv["paths"]):
            req.timing.kv_bytes, req.timing.kv_exposed_s, req.timing.kv_error = nbytes, exposed or 0.0, err
            req.timing.kv_path = path
            with self._lock:
                self.registry.kv_bytes += nbytes
            if err:
                why = f"KV transfer to the decode node failed: {err}"
                self._fail(req, why)
                self._send("decode", {"cmd": "cancel", "id": req.id, "reason": why})
        # Every send of the batch ended: the decode node may reuse blocks it held back for them.
        self._send("decode", {"cmd": "sender_done", "ids": ids})


# ---- HTTP -------------------------------------------------------------------------------------------------
def make_handler(router: Router):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the demo prints its own summary
            pass

        def _json(self, status: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._json(status, {"error": {"message": message, "type": kind}})

        def do_GET(self):
            if self.path == "/health":
                ok = router.healthy
                self._json(200 if ok else 503, {"status": "ok" if ok else router.unhealthy_reason, "mode": router.mode})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": router.model_name, "object": "model",
                                                             "owned_by": "kvxfer"}]})
            elif self.path == "/metrics":
                body = router.registry.prometheus().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/stats":
                with router._lock:
                    done = list(router.finished)
                    live = [{"id": r.id, "phase": r.phase.value} for r in router.requests.values()]
                self._json(200, {"mode": router.mode, "requests": [vars(r.timing) | {"id": r.id} for r in done],
                                 "inflight": live, "nodes": router.node_blocks})
            else:
                self._error(404, f"no route {self.path}; try /v1/completions, /v1/models, /health, /metrics")

        def do_POST(self):
            if self.path != "/v1/completions":
                return self._error(404, f"no route {self.path}; POST /v1/completions")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            except ValueError as e:
                return self._error(400, f"request body is not JSON: {e}")
            prompt, max_tokens = body.get("prompt"), body.get("max_tokens", 16)
            if not isinstance(prompt, str) or not prompt:
                return self._error(400, "'prompt' must be a non-empty string")
            if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
                return self._error(400, "'max_tokens' must be an integer in [1, 4096]")
            if body.get("temperature") not in (None, 0, 0.0):
                return self._error(400, "only greedy decoding is supported: omit temperature or set it to 0")
            ids = router.tokenizer.encode(prompt)
            req = router.submit(ids, max_tokens)
            if body.get("stream"):
                return self._stream(req, ids)
            out = []
            while True:
                token, finished, error, status = req.events.get(timeout=900)
                if error:
                    return self._error(status, error, "server_error")
                if token is not None:
                    out.append(token)
                if finished:
                    break
            self._json(200, self._completion(req, out, len(ids)))

        def _completion(self, req: Request, out: list[int], prompt_tokens: int) -> dict:
            return {"id": f"cmpl-{req.id}", "object": "text_completion", "created": int(time.time()),
                    "model": router.model_name,
                    "choices": [{"index": 0, "text": router.tokenizer.decode(out), "logprobs": None,
                                 "finish_reason": "length"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(out),
                              "total_tokens": prompt_tokens + len(out)},
                    "kvxfer": {"token_ids": out}}

        def _stream(self, req: Request, ids: list[int]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                while True:
                    token, finished, error, _ = req.events.get(timeout=900)
                    if error:
                        self._sse({"error": {"message": error, "type": "server_error"}})
                        break
                    chunk = {"id": f"cmpl-{req.id}", "object": "text_completion", "created": int(time.time()),
                             "model": router.model_name,
                             "choices": [{"index": 0, "text": "" if token is None else router.tokenizer.decode([token]),
                                          "finish_reason": "length" if finished else None,
                                          "token_ids": [] if token is None else [token]}]}
                    self._sse(chunk)
                    if finished:
                        break
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                router.cancel(req, "client disconnected")  # frees its blocks on the nodes

        def _sse(self, obj) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

    return Handler


class HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 resets clients when many streams open at once on a busy machine
    daemon_threads = True


def spawn_nodes(mode: str, node_port: int, args) -> list[subprocess.Popen]:
    env = bootstrap.loopback_env()
    common = ["--connect", f"127.0.0.1:{node_port}", "--model", args.model, "--seed", str(args.seed),
              "--transport", args.transport, "--timeout", str(args.timeout), "--device", args.device]
    if mode == "disagg":  # the same total CPU threads as the colocated node: one each
        roles = [("prefill", args.threads // 2 or 1, ["--layer-delay-ms", str(args.prefill_layer_delay_ms)]),
                 ("decode", args.threads - args.threads // 2 or 1, [])]
    else:
        roles = [("colocated", args.threads, [])]
    procs = [subprocess.Popen([sys.executable, "-m", "kvxfer.engine.node", role, *common, "--threads", str(n), *extra],
                              env=env) for role, n, extra in roles]
    reap(procs)
    return procs


def reap(procs: list[subprocess.Popen]) -> None:
    """Wait for each child in the background: a node that died must not linger as a zombie, since its peer
    tells a dead same-host process from a live one by its pid (a zombie still answers kill(pid, 0))."""
    for p in procs:
        threading.Thread(target=p.wait, daemon=True).start()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvxfer.engine.router")
    ap.add_argument("--mode", choices=["disagg", "colocated"], default="disagg")
    ap.add_argument("--http", default="127.0.0.1:8000", help="HOST:PORT for the OpenAI API (port 0: any)")
    ap.add_argument("--nodes", default="127.0.0.1:0", help="HOST:PORT where nodes connect")
    ap.add_argument("--spawn", action="store_true", help="start the nodes on this machine")
    ap.add_argument("--model", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transport", default="auto")
    ap.add_argument("--threads", type=int, default=2, help="total torch threads across the spawned nodes")
    ap.add_argument("--device", default="cpu", help="spawned nodes: cpu or cuda[:N] (model and KV cache there)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds a KV transfer may take (and node replies)")
    ap.add_argument("--prefill-layer-delay-ms", type=float, default=0.0,
                    help="spawned prefill node sleeps after each layer (emulates a bigger model; used by tests)")
    a = ap.parse_args(argv)
    router = Router(a.mode, f"kvxfer-{a.model}", a.timeout)
    lst = bootstrap.listen(*bootstrap.parse_hostport(a.nodes))
    procs = spawn_nodes(a.mode, lst.address[1], a) if a.spawn else []
    if procs:
        roles = ["prefill", "decode"] if a.mode == "disagg" else ["colocated"]
        print("router: spawned " + " ".join(f"{r}={p.pid}" for r, p in zip(roles, procs)), flush=True)
    print(f"router: nodes on {lst.address[0]}:{lst.address[1]}", flush=True)  # also where replacements connect
    try:
        router.attach(lst)
        server = HTTPServer(bootstrap.parse_hostport(a.http), make_handler(router))
        host, port = server.server_address[:2]
        print(f"router: ready http://{host}:{port} mode={a.mode}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        router.close()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
