"""The remote side of a test: an agent in its own process (a sender, or with "recv" a receiver), driven over a
multiprocessing pipe.

Commands are (name, args) tuples of plain values; replies are ("ok", value) or ("err", class_name, message).
Source pools are regenerated from a seed by reference.make_pool, so the test can compute the expected image.
"""
import os
import signal
import traceback

os.environ.setdefault("FI_TCP_IFACE", "lo")


def serve(conn):
    import kvxfer
    from tests.reference import PRESETS, make_pool
    from kvxfer import KVLayout

    agent = pool = None
    peers, sends, extra = {}, {}, {}
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "init":
                transport, kind, seed, layout_args, rails, *init_rest = args
                agent_kwargs = init_rest[0] if init_rest else {}  # e.g. staging options
                layout = getattr(KVLayout, kind)(*layout_args) if layout_args else PRESETS[kind]()
                agent_kwargs = dict(agent_kwargs)
                name = agent_kwargs.pop("name", "peer-sender")  # distinct names: same-named peers are restarts
                interface = agent_kwargs.pop("interface", "lo")
                agent = kvxfer.Agent(name, transport=transport, interface=interface, rails=rails, **agent_kwargs)
                pool = make_pool(layout, seed)
                agent.register_pool(pool, layout)
                result = agent.metadata()
            elif cmd == "add_peer":
                p = agent.add_peer(args)
                peers[0] = p
                result = p.path
            elif cmd == "send":
                xfer, src, dst, layers, mark = args
                s = agent.send(peers[0], xfer, src, dst, layers=range(*layers) if layers else None)
                sends[xfer] = s
                if mark == "all":
                    s.all_ready()
                result = s.num_writes
            elif cmd == "send_and_stop":  # every layer marked, then this whole process stops (SIGSTOP) mid-transfer
                xfer, src, dst = args
                sends[xfer] = agent.send(peers[0], xfer, src, dst)
                sends[xfer].all_ready()
                conn.send(("ok", None))
                os.kill(os.getpid(), signal.SIGSTOP)  # the caller sends SIGCONT
                continue
            elif cmd == "path":
                result = (sends[args].path, sends[args].path_reason, agent.staging())
            elif cmd == "mark":
                xfer, layer = args
                sends[xfer].layer_ready(layer)
                result = None
            elif cmd == "wait":
                xfer, timeout_s = args
                sends[xfer].wait(timeout_s=timeout_s)
                result = sends[xfer].state.name
            elif cmd == "abort":
                xfer, reason = args
                sends[xfer].abort(reason)
                try:
                    sends[xfer].wait(timeout_s=30)
                except kvxfer.KvxferError:
                    pass
                result = (sends[xfer].state.name, str(sends[xfer].error))
            elif cmd == "recv":  # this peer as the receiver: expect transfer xfer into dst blocks
                xfer, dst = args
                extra[("recv", xfer)] = agent.recv(peers[0], xfer, dst)
                result = None
            elif cmd == "recv_wait":
                xfer, layer, timeout_s = args
                extra[("recv", xfer)].wait(layer=layer, timeout_s=timeout_s)
                result = extra[("recv", xfer)].state.name
            elif cmd == "writes_over":  # of our recv ("recv", xfer) or send ("send", xfer)
                kind, xfer = args
                result = bool((extra[("recv", xfer)] if kind == "recv" else sends[xfer]).writes_over)
            elif cmd == "stats":
                result = (agent.stats(), peers[0].rails)
            elif cmd == "metadata":
                result = agent.metadata()
            elif cmd == "close":  # close the agent, keep the process (peers must learn it from the agent)
                agent.close()
                result = None
            elif cmd == "exit":
                conn.send(("ok", None))
                return
            elif cmd == "crash":
                os._exit(17)
            elif cmd == "netns":  # into a network namespace (before "init"), its tcp on `iface`: a host of its own
                import ctypes

                ns, iface = args
                fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
                try:
                    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                        raise OSError(ctypes.get_errno(), f"setns into {ns}")
                finally:
                    os.close(fd)
                # /sys/class/net still lists the old namespace's devices until sysfs is mounted again from this one
                # (UCX picks its devices there): in a mount namespace of our own, so the host's /sys is untouched.
                libc = ctypes.CDLL(None, use_errno=True)
                if (libc.unshare(0x00020000) != 0  # CLONE_NEWNS
                        or libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0  # MS_REC | MS_PRIVATE
                        or libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None) != 0):
                    raise OSError(ctypes.get_errno(), f"a sysfs of {ns}'s own")
                os.environ["FI_TCP_IFACE"] = iface  # libfabric reads it when the first agent opens
                result = None
            elif cmd == "recv_state":  # of our recv: (state, layers done, writes_over)
                r = extra[("recv", args)]
                result = (r.state.name, r.layers_done, bool(r.writes_over))
            elif cmd == "pool_digest":  # of this agent's pool: what was written into it, in 32 bytes
                import hashlib

                h = hashlib.sha256()
                for arr in pool:
                    h.update(arr.tobytes())
                result = h.hexdigest()
            elif cmd == "blocks_digest":  # of these blocks of every layer of our pool, in 32 bytes
                import hashlib

                from tests.reference import block_view

                h = hashlib.sha256()
                for layer in range(layout.num_layers):
                    h.update(block_view(layout, pool, layer)[:, args].tobytes())
                result = h.hexdigest()
            elif cmd == "hostname":  # a UTS namespace of our own under another name: a peer "on another host"
                import ctypes
                import socket

                if ctypes.CDLL(None, use_errno=True).unshare(0x04000000) != 0:  # CLONE_NEWUTS
                    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS) needs root")
                socket.sethostname(args)
                result = socket.gethostname()
            else:
                from tests import signal_peer  # LayerSignal commands (tests/test_layer_signal.py)

                handled, result = signal_peer.handle(cmd, args, agent, peers, extra)
                if not handled:
                    raise ValueError(cmd)
            conn.send(("ok", result))
        except Exception as e:  # reply with the typed error; the test asserts on it
            conn.send(("err", type(e).__name__, str(e) + "\n" + traceback.format_exc(limit=2)))
