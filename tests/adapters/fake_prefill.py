"""A stand-in prefill process for failure tests: a real kvxfer agent and push server that accept one decode
registration and then send nothing ("before") or only layer 0 ("during") of random KV, and wait to be killed; or
("hold") open the send with no layer ready and report how it ended ("ended STATE ERROR_CLASS").

    python -m tests.adapters.fake_prefill MODE PORT NUM_LAYERS NUM_BLOCKS BLOCK_SIZE KV_HEADS HEAD_DIM
Prints "ready PORT" (PORT 0 binds a free one: no window for another process to take a port chosen beforehand),
then "registered XFER_ID", then "sent" (after layer 0 for "during", all layers for "all").
"""
import sys
import time

import numpy as np

import kvxfer
from kvxfer.push import PushServer


def main(mode, port, *dims):
    layers, blocks, block_size, heads, head_dim = map(int, dims)
    layout = kvxfer.KVLayout.vllm_cpu(layers, blocks, block_size, heads, head_dim, "float32")
    rng = np.random.default_rng(7)
    pool = [rng.standard_normal(layout.tensor_layer_bytes // 4).astype(np.float32) * 4 for _ in range(layers)]
    agent = kvxfer.Agent("fake-prefill", timeout_s=60)
    agent.register_pool(pool, layout)
    server = PushServer(agent, "127.0.0.1", int(port))
    print("ready", server.address[1], flush=True)
    while (regs := next((server.take(x) for x in list(server._table)), None)) is None:
        time.sleep(0.01)
    reg = regs[0]
    print("registered", reg.xfer_id, flush=True)
    src = np.arange(1, 1 + len(reg.dst_ids), dtype=np.int32)
    if mode == "hold":  # the decode side is expected to give the request up: its cancel ends this send
        send = agent.send(reg.peer, reg.xfer_id, src, reg.dst_ids, num_tokens=reg.num_tokens or None)
        print("opened", flush=True)
        try:
            send.wait(timeout_s=120)
        except kvxfer.KvxferError as e:
            print("ended", send.state.name, type(e).__name__, flush=True)
        else:
            print("ended", send.state.name, "-", flush=True)
    if mode in ("during", "all"):
        send = agent.send(reg.peer, reg.xfer_id, src, reg.dst_ids, num_tokens=reg.num_tokens or None)
        if mode == "during":
            send.layer_ready(0)
        else:
            send.all_ready()
            send.wait(timeout_s=30)
        print("sent", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main(*sys.argv[1:])
