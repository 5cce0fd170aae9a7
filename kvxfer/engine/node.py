"""Worker nodes, each a process that connects to the router over a bootstrap channel (JSON frames).

    prefill   : PrefillWorker; {"cmd": "prefill", "jobs": [...]} -> {"ok", "first_tokens", "stats"}
    decode    : DecodeWorker; {"cmd": "admit"} -> {"type": "admitted", "dst_blocks"}; {"cmd": "first_token"};
                {"cmd": "cancel"}; streams {"type": "token", "id", "token", "finished", "error"}
    colocated : prefill and decode in one process with continuous batching (the baseline);
                {"cmd": "submit", "id", "prompt", "max_tokens"}; streams tokens like decode

Every node first sends {"role": ...}. prefill and decode then exchange kvxfer metadata through the router, which
relays the bytes. `python -m kvxfer.engine.node ROLE --connect HOST:PORT [--model small|DIR] [--threads N]`.
"""
from __future__ import annotations

import argparse
import os
import queue
import threading

import torch

from kvxfer.engine.decode import DecodeWorker
from kvxfer.engine.kv_cache import blocks_for
from kvxfer.errors import KvxferError, PeerLost


def _reader(ch, inbox: queue.Queue) -> None:
    try:
        while True:
            inbox.put(ch.recv_json(timeout_s=24 * 3600))
    except KvxferError as e:  # the router went away: end the node
        inbox.put({"cmd": "bye", "reason": str(e)})


def _send_events(ch, worker, events) -> None:
    for seq_id, token, finished in events:
        seq = worker.seqs.get(seq_id)
        ch.send_json({"type": "token", "id": seq_id, "token": token, "finished": finished,
                      "error": seq.error if seq and token is None else None})
    worker.pop_finished()


def run_decode(ch, model, num_blocks: int, block_size: int, transport: str, interface, timeout_s: float) -> None:
    import kvxfer

    agent = kvxfer.Agent(f"decode-{os.getpid()}", transport=transport, interface=interface, timeout_s=timeout_s)
    worker = DecodeWorker(model, num_blocks, block_size, agent, timeout_s=timeout_s)
    ch.send_json({"role": "decode"})
    peer = agent.add_peer(ch.exchange(agent.metadata(), timeout_s=120))
    agent.wait_connected(peer, timeout_s)
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(ch, inbox), daemon=True).start()
    while True:
        while not inbox.empty():
            msg = inbox.get()
            cmd = msg.get("cmd")
            if cmd == "bye":
                return
            if cmd == "admit":
                try:
                    dst = worker.admit(msg["id"], msg["prompt_len"], msg["max_tokens"], peer)
                    ch.send_json({"type": "admitted", "id": msg["id"], "dst_blocks": dst})
                except KvxferError as e:
                    ch.send_json({"type": "admitted", "id": msg["id"], "error": f"{type(e).__name__}: {e}"})
            elif cmd == "first_token":
                worker.set_first_token(msg["id"], msg["token"])
            elif cmd == "cancel":
                worker.cancel(msg["id"], msg.get("reason", "cancelled"))
                _send_events(ch, worker, [(msg["id"], None, True)])
        if worker.seqs:
            _send_events(ch, worker, worker.step())
        else:
            try:
                inbox.put(inbox.get(timeout=0.05))
            except queue.Empty:
                pass


def run_prefill(ch, model, num_blocks: int, block_size: int, transport: str, interface, timeout_s: float) -> None:
    from kvxfer.engine import prefill

    ch.send_json({"role": "prefill"})
    prefill.serve(ch, model, num_blocks, block_size, transport, interface, timeout_s)


def run_colocated(ch, model, num_blocks: int, block_size: int, timeout_s: float, max_batch_tokens: int = 8192) -> None:
    """Continuous batching in one process: new prompts are prefilled between decode steps, stalling them."""
    cache = model.new_cache(num_blocks, block_size)
    ch.send_json({"role": "colocated"})
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(ch, inbox), daemon=True).start()
    seqs: dict[int, dict] = {}
    while True:
        new = []
        while not inbox.empty():
            msg = inbox.get()
            if msg.get("cmd") == "bye":
                return
            if msg.get("cmd") == "submit":
                new.append(msg)
            elif msg.get("cmd") == "cancel" and msg["id"] in seqs:
                cache.allocator.free(seqs.pop(msg["id"])["blocks"])
                ch.send_json({"type": "token", "id": msg["id"], "token": None, "finished": True,
                              "error": msg.get("reason", "cancelled")})
        batch, tokens = [], 0
        for msg in new:
            try:
                blocks = cache.allocator.allocate(blocks_for(len(msg["prompt"]) + msg["max_tokens"], block_size))
            except KvxferError as e:
                ch.send_json({"type": "token", "id": msg["id"], "token": None, "finished": True, "error": str(e)})
                continue
            seqs[msg["id"]] = {"prompt_len": len(msg["prompt"]), "max": msg["max_tokens"], "blocks": blocks, "out": []}
            batch.append(msg)
            tokens += len(msg["prompt"])
        if batch:
            logits = model.prefill([torch.tensor(m["prompt"]) for m in batch],
                                   [torch.tensor(seqs[m["id"]]["blocks"]) for m in batch], cache)
            for m, t in zip(batch, logits.argmax(-1).tolist()):
                _colocated_token(ch, cache, seqs, m["id"], t)
        running = [i for i, s in seqs.items() if s["out"]]
        if running:
            toks = torch.tensor([seqs[i]["out"][-1] for i in running])
            pos = torch.tensor([seqs[i]["prompt_len"] + len(seqs[i]["out"]) - 1 for i in running])
            nxt = model.decode(toks, pos, [torch.tensor(seqs[i]["blocks"]) for i in running], cache).argmax(-1)
            for i, t in zip(running, nxt.tolist()):
                _colocated_token(ch, cache, seqs, i, t)
        elif not batch:
            try:
                inbox.put(inbox.get(timeout=0.05))
            except queue.Empty:
                pass


def _colocated_token(ch, cache, seqs, seq_id, token) -> None:
    s = seqs[seq_id]
    s["out"].append(token)
    done = len(s["out"]) >= s["max"]
    ch.send_json({"type": "token", "id": seq_id, "token": token, "finished": done, "error": None})
    if done:
        cache.allocator.free(s["blocks"])
        del seqs[seq_id]


def main(argv=None) -> int:
    from kvxfer import bootstrap
    from kvxfer.engine.model import PRESETS, LlamaModel

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
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = LlamaModel.random(PRESETS[a.model], a.seed) if a.model in PRESETS else LlamaModel.from_pretrained(a.model)
    host, port = bootstrap.parse_hostport(a.connect)
    ch = bootstrap.connect(host, port, a.timeout)
    iface = a.iface or bootstrap.default_interface(host)
    try:
        if a.role == "prefill":
            run_prefill(ch, model, a.num_blocks, a.block_size, a.transport, iface, a.timeout)
        elif a.role == "decode":
            run_decode(ch, model, a.num_blocks, a.block_size, a.transport, iface, a.timeout)
        else:
            run_colocated(ch, model, a.num_blocks, a.block_size, a.timeout)
    except PeerLost:
        pass  # the router closed the channel: shut down quietly
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
