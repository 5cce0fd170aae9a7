"""Worker nodes, each a process that connects to the router over a bootstrap channel (JSON frames).

    prefill   : PrefillWorker; {"cmd": "prefill", "jobs": [...]} -> {"type": "first", "first_tokens"} as soon as
                they exist, then {"type": "kv", per-request exposed_s / errors / bytes} once every send ended
    decode    : DecodeWorker; {"cmd": "admit", "reqs": [...]} -> {"type": "admitted", "reqs": [{"id",
                "dst_blocks" | "error"}]}; {"cmd": "expect", "ids"} opens the recvs just before their prefill
                (both answered on the reader thread, never behind a decode step);
                {"cmd": "first_token", "items": [[id, token], ...]}; {"cmd": "cancel", "id", "sender_done"};
                {"cmd": "sender_done", "ids"}; streams {"type": "token", "id", "token", "finished", "error"}
    colocated : the same DecodeWorker, prompts prefilled in process between decode steps (the baseline);
                {"cmd": "submit", "id", "prompt", "max_tokens"}; streams tokens like decode
Every node reports {"type": "blocks", "free_blocks", "num_blocks"} when its free block count changed.

Every node first sends {"role": ...}. prefill and decode then exchange kvxfer metadata through the router, which
relays the bytes. `python -m kvxfer.engine.node ROLE --connect HOST:PORT [--model small|DIR] [--threads N]`.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time

import torch

from kvxfer.engine.decode import DecodeWorker, SeqState
from kvxfer.errors import KvxferError, PeerLost


class _Link:
    """The node's channel to the router: sends from two threads (the reader admits) go out whole."""

    def __init__(self, ch):
        self.ch, self._lock = ch, threading.Lock()

    def send(self, obj) -> None:
        with self._lock:
            self.ch.send_json(obj)


def _reader(ch, inbox: queue.Queue, handle=None) -> None:
    """Read the router's commands into `inbox`; handle(msg) may answer one on this thread (returns True)."""
    try:
        while True:
            msg = ch.recv_json(timeout_s=24 * 3600)
            if handle is None or not handle(msg):
                inbox.put(msg)
    except KvxferError as e:  # the router went away: end the node
        inbox.put({"cmd": "bye", "reason": str(e)})


class StepTrace:
    """--trace PATH: one JSON line per step (start time, running batch, sequences that joined, commands handled,
    step and loop milliseconds), to see where a TPOT tail comes from. Off: every call is a no-op."""

    def __init__(self, path: str | None):
        self.f = open(path, "w", buffering=1 << 16) if path else None

    def write(self, t0: float, t1: float, t2: float, running: int, joined: int, msgs: int) -> None:
        if self.f is not None:
            self.f.write(json.dumps({"t": round(t0, 6), "batch": running, "joined": joined, "msgs": msgs,
                                     "step_ms": round(1000 * (t1 - t0), 3), "loop_ms": round(1000 * (t2 - t0), 3)})
                         + "\n")

    def handoff(self, seq) -> None:
        """One line per finished sequence that came from a prefill node: when its first token, its KV (the recv's
        DONE stamp), its join and its first decoded token happened, on time.perf_counter()'s clock."""
        if self.f is not None and seq.recv is not None:
            self.f.write(json.dumps({"handoff": seq.seq_id, "first_token_at": seq.first_token_at,
                                     "kv_done_at": seq.recv.finished_at, "joined_at": seq.joined_at,
                                     "decoded_at": seq.decoded_at}) + "\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _serve(link: _Link, worker: DecodeWorker, inbox: queue.Queue, on_msgs, trace: StepTrace | None = None) -> None:
    """The stepping loop shared by decode and colocated nodes: commands, one step, events, block counts."""
    trace = trace or StepTrace(None)
    try:
        _serve_loop(link, worker, inbox, on_msgs, trace)
    finally:
        trace.close()


def _serve_loop(link: _Link, worker: DecodeWorker, inbox: queue.Queue, on_msgs, trace: StepTrace) -> None:
    reported = None
    while True:
        t0 = time.perf_counter()
        msgs = []
        while not inbox.empty():
            msgs.append(inbox.get())
        if any(m.get("cmd") == "bye" for m in msgs):
            return
        events, rest = [], []
        for m in msgs:
            if m.get("cmd") == "cancel":
                if worker.cancel(m["id"], m.get("reason", "cancelled")):
                    events.append((m["id"], None, True))
                if m.get("sender_done"):
                    worker.sender_done(m["id"])
            elif m.get("cmd") == "sender_done":
                for i in m["ids"]:
                    worker.sender_done(i)
            else:
                rest.append(m)
        events += on_msgs(rest)
        stepped = worker.step()  # also frees quarantined blocks whose transfer ended
        events += stepped
        t1 = time.perf_counter()
        for seq_id, token, finished in events:
            seq = worker.seqs.get(seq_id)
            link.send({"type": "token", "id": seq_id, "token": token, "finished": finished,
                       "error": seq.error if seq and token is None else None})
        for seq in worker.pop_finished():
            trace.handoff(seq)
        free = worker.num_free_blocks
        if free != reported:
            link.send({"type": "blocks", "free_blocks": free, "num_blocks": worker.cache.num_blocks})
            reported = free
        if stepped:
            joined = sum(1 for _, tok, _ in stepped if tok is not None) - worker.last_step_batch
            trace.write(t0, t1, time.perf_counter(), worker.last_step_batch, joined, len(msgs))
        if not msgs and not events:
            _idle(worker, inbox)


def _idle(worker: DecodeWorker, inbox: queue.Queue) -> None:
    """Nothing to step: sleep until a command comes, or (GIL released) until a sequence's KV lands."""
    seqs = list(worker.seqs.values())
    if any(s.state is SeqState.RUNNING for s in seqs):
        return
    ready = [s for s in seqs if s.state is SeqState.WAITING and s.tokens and s.recv is not None]
    if ready:  # wakes when any of their recvs ends (failed ones too: the next step() reports them)
        worker.agent.wait_any([s.recv for s in ready], 0.005)
        return
    try:
        inbox.put(inbox.get(timeout=0.05))
    except queue.Empty:
        pass


def connect_replacement(agent, ch, timeout_s: float, who: str):
    """After the router's "new_peer": add the replacement node's kvxfer metadata (the next message) as a peer and
    wait for its handshake. None if the newcomer died in it: this node keeps serving, the router says why."""
    md = ch.recv(timeout_s=120)
    try:
        new = agent.add_peer(md)
        agent.wait_connected(new, max(timeout_s, 30.0))
        return new
    except KvxferError as e:
        print(f"{who} did not connect: {e}", file=sys.stderr, flush=True)
        return None


def run_decode(ch, model, num_blocks: int, block_size: int, transport: str, interface, timeout_s: float,
               trace: str | None = None) -> None:
    import kvxfer

    agent = kvxfer.Agent(f"decode-{os.getpid()}", transport=transport, interface=interface, timeout_s=timeout_s)
    worker = DecodeWorker(model, num_blocks, block_size, agent, timeout_s=timeout_s)
    ch.send_json({"role": "decode"})
    peers = [agent.add_peer(ch.exchange(agent.metadata(), timeout_s=120))]  # [-1]: the current prefill node
    agent.wait_connected(peers[-1], max(timeout_s, 30.0))
    link = _Link(ch)

    def admit(msg) -> bool:  # on the reader thread: admits and recvs never wait for a decode step
        if msg.get("cmd") == "new_peer":  # a replacement prefill node (the router relays its metadata)
            new = connect_replacement(agent, ch, timeout_s, "decode: the replacement prefill node")
            if new is not None:
                peers.append(new)
            return True
        if msg.get("cmd") == "expect":
            for seq_id in msg["ids"]:
                try:
                    worker.expect(seq_id, peers[-1])
                except KvxferError as e:  # the step loop reports it: the seq's recv stays None, so fail it here
                    # A lost prefill process writes nothing more: its blocks are free at once. Otherwise they wait
                    # for the router's word that the sender's transfer ended.
                    inbox.put({"cmd": "cancel", "id": seq_id, "sender_done": isinstance(e, PeerLost),
                               "reason": f"KV transfer from the prefill node cannot start: {type(e).__name__}: {e}"})
            return True
        if msg.get("cmd") != "admit":
            return False
        out = []
        for r in msg["reqs"]:
            try:
                out.append({"id": r["id"], "dst_blocks": worker.admit(r["id"], r["prompt_len"], r["max_tokens"])})
            except KvxferError as e:
                out.append({"id": r["id"], "error": f"{type(e).__name__}: {e}"})
        link.send({"type": "admitted", "reqs": out})
        return True

    def on_msgs(msgs) -> list:
        for m in msgs:
            if m.get("cmd") == "first_token":
                for seq_id, token in m["items"]:
                    worker.set_first_token(seq_id, token)
        return []

    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(ch, inbox, admit), daemon=True).start()
    _serve(link, worker, inbox, on_msgs, StepTrace(trace))


def run_prefill(ch, model, num_blocks: int, block_size: int, transport: str, interface, timeout_s: float,
                layer_delay_s: float = 0.0) -> None:
    from kvxfer.engine import prefill

    ch.send_json({"role": "prefill"})
    prefill.serve(ch, model, num_blocks, block_size, transport, interface, timeout_s, layer_delay_s)


def run_colocated(ch, model, num_blocks: int, block_size: int, timeout_s: float, trace: str | None = None) -> None:
    """The baseline: the same DecodeWorker, its prompts prefilled locally between decode steps (stalling them)."""
    worker = DecodeWorker(model, num_blocks, block_size, timeout_s=timeout_s)
    ch.send_json({"role": "colocated"})

    def on_msgs(msgs) -> list:  # every prompt that arrived since the last step, in one prefill
        return worker.prefill_local([(m["id"], m["prompt"], m["max_tokens"]) for m in msgs if m.get("cmd") == "submit"])

    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(ch, inbox), daemon=True).start()
    _serve(_Link(ch), worker, inbox, on_msgs, StepTrace(trace))


def parse_cpus(spec: str) -> set[int]:
    """'0', '0,2', '1-3' -> CPU ids; each must be one this process may run on."""
    cpus: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SystemExit(f"--cpus {spec!r}: use CPU ids like 0, 0,2 or 1-3") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise SystemExit(f"--cpus {spec!r}: this process may run on CPUs {sorted(allowed)} only")
    return cpus


def main(argv=None) -> int:
    from kvxfer import bootstrap
    from kvxfer.engine.model import PRESETS, LlamaModel, check_device

    ap = argparse.ArgumentParser(prog="python -m kvxfer.engine.node")
    ap.add_argument("role", choices=["prefill", "decode", "colocated"])
    ap.add_argument("--connect", required=True, help="HOST:PORT of the router's node port")
    ap.add_argument("--model", default="small", help=f"size preset ({', '.join(PRESETS)}) or a HF model directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--transport", default="auto")
    ap.add_argument("--iface")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for this node")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:N]: model and KV cache on that GPU (kvxfer then "
                                                    "moves GPU memory: CUDA IPC on one host, else GPU-direct RDMA "
                                                    "or host staging; `python -m kvxfer info` says which)")
    # kvxfer's progress thread stays on these CPUs too: tried on 2026-11-30 with it free to run anywhere, the last
    # layer's KV reached a pinned decode node sooner but the threads took time from the other node's compute, and
    # reference runs got worse (benchmarks/RESULTS.md, "kvxfer-demo on a quiet VM").
    ap.add_argument("--cpus", help="run on these CPUs only (e.g. 1 or 0-3): a node of its own, as on its own GPU; "
                                   "kvxfer's progress thread stays there too")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--layer-delay-ms", type=float, default=0.0,
                    help="prefill: sleep after each layer (emulates a bigger model; tests widen a transfer with it)")
    ap.add_argument("--trace", metavar="PATH", help="decode/colocated: write one JSON line per decode step here "
                                                    "(default: $KVXFER_ENGINE_TRACE_DIR/ROLE.jsonl when that is set)")
    a = ap.parse_args(argv)
    if a.trace is None and os.environ.get("KVXFER_ENGINE_TRACE_DIR"):
        a.trace = os.path.join(os.environ["KVXFER_ENGINE_TRACE_DIR"], f"{a.role}.jsonl")
    if a.cpus:
        os.sched_setaffinity(0, parse_cpus(a.cpus))  # before torch starts its threads: they inherit it
    torch.set_num_threads(a.threads)
    try:
        if a.device.startswith("cuda") and torch.cuda.is_available():
            # This process computes on that GPU: made current, so what follows the current device (kvxfer's layer
            # signal memory, torch's default allocations) lands there and not on cuda:0. set_device needs an
            # index: a bare 'cuda' (torch.device('cuda') has none) is refused there.
            dev = check_device(a.device)
            torch.cuda.set_device(dev)
            a.device = str(dev)
        model = LlamaModel.random(PRESETS[a.model], a.seed, device=a.device) if a.model in PRESETS else \
            LlamaModel.from_pretrained(a.model, device=a.device)
    except KvxferError as e:
        print(f"{a.role} node: {e}", file=sys.stderr, flush=True)
        return 2
    host, port = bootstrap.parse_hostport(a.connect)
    ch = bootstrap.connect(host, port, max(a.timeout, 30.0))
    iface = a.iface or bootstrap.default_interface(host)
    try:
        if a.role == "prefill":
            run_prefill(ch, model, a.num_blocks, a.block_size, a.transport, iface, a.timeout, a.layer_delay_ms / 1000)
        elif a.role == "decode":
            run_decode(ch, model, a.num_blocks, a.block_size, a.transport, iface, a.timeout, a.trace)
        else:
            run_colocated(ch, model, a.num_blocks, a.block_size, a.timeout, a.trace)
    except PeerLost:
        pass  # the router closed the channel: shut down quietly
    except KvxferError as e:  # e.g. turned away: the router already has a live node of this role
        print(f"{a.role} node: could not join the router at {a.connect}: {type(e).__name__}: {e} (a running "
              f"router takes a node only for a role whose node it lost)", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
