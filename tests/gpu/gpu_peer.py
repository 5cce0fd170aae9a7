"""The remote side of the GPU tests: an agent whose pool lives on cuda:0 (or the host), driven over a pipe like
tests/peer.py: a sender (serve) or a receiver (serve_receiver). Pools are seeded byte patterns made on the CPU
(reference.make_pool) and copied to the GPU, so the test process can compute the expected destination image without
a GPU of its own."""
import os
import traceback

os.environ.setdefault("FI_TCP_IFACE", "lo")


def to_device(arrays, where):
    import torch

    if where == "cpu":
        return arrays
    out = [torch.from_numpy(a).to(where) for a in arrays]
    torch.cuda.synchronize()  # landed before kvxfer's own streams (not ordered after torch's) read or write them
    return out


def _run(conn, handle):
    """Answer (cmd, args) from the pipe with handle(cmd, args) until "exit"; errors go back typed."""
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "exit":
                conn.send(("ok", None))
                return
            conn.send(("ok", handle(cmd, args)))
        except Exception as e:
            conn.send(("err", type(e).__name__, str(e) + "\n" + traceback.format_exc(limit=3)))


def _init(state, args, name, pool_seed_offset):
    """"init": an agent with one pool of the named layout, seeded, on `where`; returns its metadata."""
    import kvxfer
    from kvxfer import KVLayout
    from tests.reference import PRESETS, make_pool

    transport, kind, seed, layout_args, where, agent_kwargs = args
    opts = layout_args.pop() if layout_args and isinstance(layout_args[-1], dict) else {}  # head_major, tp
    layout = getattr(KVLayout, kind)(*layout_args, head_major=opts.get("head_major", False)) if layout_args \
        else PRESETS[kind]()
    if "tp" in opts:  # (tp_size, tp_rank): this rank's share of the model's KV heads
        layout = layout.for_tp_rank(*opts["tp"])
    state["agent"] = kvxfer.Agent(name, transport=transport, interface="lo", **agent_kwargs)
    state["pool"] = to_device(make_pool(layout, seed + pool_seed_offset), where)
    state["agent"].register_pool(state["pool"], layout)
    return state["agent"].metadata()


def serve(conn):
    state, sends = {}, {}

    def handle(cmd, args):
        agent = state.get("agent")
        if cmd == "init":
            return _init(state, args, "gpu-sender", 0)
        if cmd == "add_peer":
            state["peer"] = agent.add_peer(args)
            return state["peer"].path
        if cmd == "send":  # (xfer, src ids, dst ids[, num_tokens])
            xfer, src, dst, *tokens = args
            sends[xfer] = agent.send(state["peer"], xfer, src, dst, num_tokens=tokens[0] if tokens else None)
            sends[xfer].all_ready()
            return sends[xfer].path, sends[xfer].path_reason
        if cmd == "send_layers":  # layers marked one at a time in the given order, a pause after each
            import time

            xfer, src, dst, order, pause_s = args
            sends[xfer] = agent.send(state["peer"], xfer, src, dst)
            for layer in order:
                sends[xfer].layer_ready(layer)
                time.sleep(pause_s)
            return sends[xfer].path, sends[xfer].path_reason
        if cmd == "stats":
            return agent.stats()
        if cmd == "wait":
            xfer, timeout_s = args
            sends[xfer].wait(timeout_s=timeout_s)
            return sends[xfer].state.name
        raise ValueError(cmd)

    _run(conn, handle)


def serve_receiver(conn):
    """A receiver whose pool lives on cuda:0 (or the host), for tests where the destination's allocator matters
    (PYTORCH_CUDA_ALLOC_CONF is read when this process first allocates, so the test sets it before spawning)."""
    state, recvs = {}, {}

    def handle(cmd, args):
        import numpy as np

        agent = state.get("agent")
        if cmd == "init":
            return _init(state, args, "gpu-receiver-remote", 1000)  # the guard pattern the tests expect
        if cmd == "add_peer":
            state["peer"] = agent.add_peer(args)
            agent.wait_connected(state["peer"], 20)
            return state["peer"].path
        if cmd == "recv":
            xfer, dst = args
            recvs[xfer] = agent.recv(state["peer"], xfer, np.asarray(dst, np.int32))
            return None
        if cmd == "wait":
            xfer, timeout_s = args
            recvs[xfer].wait(timeout_s=timeout_s)
            return recvs[xfer].state.name
        if cmd == "read":
            return [t.cpu().numpy() if hasattr(t, "cpu") else t for t in state["pool"]]
        raise ValueError(cmd)

    _run(conn, handle)
