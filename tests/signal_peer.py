"""Extra commands for tests/peer.py's sender process: a LayerSignal and a thread that plays the device."""
import threading

import numpy as np


def handle(cmd, args, agent, peers, state):
    """Returns (handled, result)."""
    import kvxfer

    if cmd == "sig_init":
        (num_layers,) = args
        state["sig"] = kvxfer.LayerSignal(agent, num_layers, device=False)
        return True, state["sig"].on_device
    if cmd == "sig_bind":
        xfer, src, dst = args
        sig = state["sig"]
        send = agent.send(peers[0], xfer, np.array(src, np.int32), np.array(dst, np.int32))
        state.setdefault("sends", []).append(send)
        return True, sig.bind([send])
    if cmd == "sig_device":
        (forwards,) = args
        sig = state["sig"]

        def device():
            for _ in range(forwards):
                for layer in range(sig.num_layers):
                    sig._host_record(layer)

        t = threading.Thread(target=device)
        t.start()
        state["device"] = t
        return True, None
    if cmd == "sig_drain":
        (timeout_s,) = args
        state["device"].join(timeout_s)
        sig = state["sig"]
        sig.drain(timeout_s)
        for s in state["sends"]:
            s.wait(timeout_s=timeout_s)
        return True, sig.stats()
    return False, None
