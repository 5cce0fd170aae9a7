"""Smallest end-to-end kvxfer run: a prefill process writes one request's paged KV into a decode process, layer by
layer, and the decode process waits for each layer. Metadata travels over a multiprocessing pipe here; an engine
uses its own channel. Run: python examples/two_process.py [--transport auto|cma|tcp|fi_shm]"""
import argparse
import multiprocessing as mp
import os
import time

import numpy as np

os.environ.setdefault("FI_TCP_IFACE", "lo")

LAYERS, BLOCKS = 8, 64


def layout():
    import kvxfer

    return kvxfer.KVLayout.vllm_flash(LAYERS, BLOCKS, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")


def prefill(conn, transport):
    import kvxfer

    agent = kvxfer.Agent("prefill-0", transport=transport, interface="lo")
    kv = [np.full(layout().tensor_layer_bytes, layer + 1, np.uint8) for layer in range(LAYERS)]  # layer l holds l+1
    agent.register_pool(kv, layout())
    conn.send(agent.metadata())
    decode = agent.add_peer(conn.recv())
    request_id, dst_ids = conn.recv()  # push model: decode allocated the blocks and sent their ids
    send = agent.send(decode, request_id, np.arange(len(dst_ids)), dst_ids)
    for layer in range(LAYERS):
        time.sleep(0.01)  # stands in for computing this layer
        send.layer_ready(layer)
    send.wait(timeout_s=30)
    print(f"prefill: sent {send.nbytes / 2**20:.1f} MiB in {send.num_writes} writes over {decode.path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", default="auto")
    args = ap.parse_args()
    import kvxfer

    agent = kvxfer.Agent("decode-0", transport=args.transport, interface="lo")
    kv = [np.zeros(layout().tensor_layer_bytes, np.uint8) for _ in range(LAYERS)]
    agent.register_pool(kv, layout())
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=prefill, args=(child, args.transport))
    proc.start()
    peer = agent.add_peer(conn.recv())
    conn.send(agent.metadata())
    dst_ids = np.random.default_rng(0).choice(BLOCKS, 16, replace=False).astype(np.int32)
    recv = agent.recv(peer, 42, dst_ids)
    conn.send((42, dst_ids))
    for layer in range(LAYERS):
        recv.wait(layer=layer, timeout_s=30)
        view = kv[layer].reshape(2, BLOCKS, -1)
        assert (view[:, dst_ids] == layer + 1).all(), f"layer {layer} bytes wrong"
        print(f"decode: layer {layer} arrived ({recv.layers_done}/{LAYERS})")
    recv.wait(timeout_s=30)
    proc.join(30)
    print(f"decode: request 42 complete over {peer.path}; blocks {sorted(dst_ids.tolist())} verified")


if __name__ == "__main__":
    main()
