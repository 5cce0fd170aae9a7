"""The remote side of the GPU tests: an agent whose source pool lives on cuda:0 (or the host), driven over a pipe
like tests/peer.py. Pools are seeded byte patterns made on the CPU (reference.make_pool) and copied to the GPU, so
the test process can compute the expected destination image without a GPU of its own."""
import os
import traceback

os.environ.setdefault("FI_TCP_IFACE", "lo")


def to_device(arrays, where):
    import torch

    return [torch.from_numpy(a).to(where) for a in arrays] if where != "cpu" else arrays


def serve(conn):
    import kvxfer
    from kvxfer import KVLayout
    from tests.reference import PRESETS, make_pool

    agent, pool, peer, sends = None, None, None, {}
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "init":
                transport, kind, seed, layout_args, where, agent_kwargs = args
                layout = getattr(KVLayout, kind)(*layout_args) if layout_args else PRESETS[kind]()
                agent = kvxfer.Agent("gpu-sender", transport=transport, interface="lo", **agent_kwargs)
                pool = to_device(make_pool(layout, seed), where)
                agent.register_pool(pool, layout)
                result = agent.metadata()
            elif cmd == "add_peer":
                peer = agent.add_peer(args)
                result = peer.path
            elif cmd == "send":
                xfer, src, dst = args
                sends[xfer] = agent.send(peer, xfer, src, dst)
                sends[xfer].all_ready()
                result = (sends[xfer].path, sends[xfer].path_reason)
            elif cmd == "wait":
                xfer, timeout_s = args
                sends[xfer].wait(timeout_s=timeout_s)
                result = sends[xfer].state.name
            elif cmd == "exit":
                conn.send(("ok", None))
                return
            else:
                raise ValueError(cmd)
            conn.send(("ok", result))
        except Exception as e:
            conn.send(("err", type(e).__name__, str(e) + "\n" + traceback.format_exc(limit=3)))


def serve_receiver(conn):
    """A receiver whose pool lives on cuda:0 (or the host), for tests where the destination's allocator matters
    (PYTORCH_CUDA_ALLOC_CONF is read when this process first allocates, so the test sets it before spawning)."""
    import kvxfer
    from kvxfer import KVLayout
    from tests.reference import PRESETS, make_pool

    agent, pool, peer, recvs = None, None, None, {}
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "init":
                transport, kind, seed, layout_args, where, agent_kwargs = args
                layout = getattr(KVLayout, kind)(*layout_args) if layout_args else PRESETS[kind]()
                agent = kvxfer.Agent("gpu-receiver-remote", transport=transport, interface="lo", **agent_kwargs)
                pool = to_device(make_pool(layout, seed + 1000), where)  # guard pattern, as the tests expect
                agent.register_pool(pool, layout)
                result = agent.metadata()
            elif cmd == "add_peer":
                peer = agent.add_peer(args)
                agent.wait_connected(peer, 20)
                result = peer.path
            elif cmd == "recv":
                import numpy as np

                xfer, dst = args
                recvs[xfer] = agent.recv(peer, xfer, np.asarray(dst, np.int32))
                result = None
            elif cmd == "wait":
                xfer, timeout_s = args
                recvs[xfer].wait(timeout_s=timeout_s)
                result = recvs[xfer].state.name
            elif cmd == "read":
                result = [t.cpu().numpy() if hasattr(t, "cpu") else t for t in pool]
            elif cmd == "exit":
                conn.send(("ok", None))
                return
            else:
                raise ValueError(cmd)
            conn.send(("ok", result))
        except Exception as e:
            conn.send(("err", type(e).__name__, str(e) + "\n" + traceback.format_exc(limit=3)))
