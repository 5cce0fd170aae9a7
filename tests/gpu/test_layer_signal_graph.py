"""LayerSignal and DeviceCounter under CUDA Graphs, across two processes on one GPU (written to run as-is on an
H100; skipped with the reason on machines without a GPU, a CUDA build of kvxfer, or torch with CUDA).

Sender process: a fake forward pass (per-layer GPU work, a copy of the layer into the pinned KV pool, then
signal.record(layer)) captured once in a CUDA graph and replayed for request after request; the C++ watcher posts
each layer of the request bound to that replay. Receiver (this process): bytes exact per request, counters exact,
and a decode graph captured once whose DeviceCounter.wait_on_stream(layer) spin-waits on the GPU before copying the
received layer to the device: it is replayed before the sender computes, so without a real wait it would copy stale
bytes.
"""
import multiprocessing as mp
import os
import traceback

import numpy as np
import pytest

os.environ.setdefault("FI_TCP_IFACE", "lo")

torch = pytest.importorskip("torch", reason="the GPU tests need torch")


def _skip_reason():
    import kvxfer

    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    usable, why = kvxfer.signals.cuda_status()
    if not usable:
        return f"kvxfer cannot use the GPU: {why}"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]

LAYERS = 4


def layer_work(x, layer, xp):
    """One 'layer': uint8 -> uint8, identical in torch (on the GPU) and numpy (the receiver's reference)."""
    if xp is np:
        return ((x.astype(np.int32) * (2 * layer + 3) + layer) & 255).astype(np.uint8)
    return ((x.to(torch.int32) * (2 * layer + 3) + layer) & 255).to(torch.uint8)


def request_input(k, nbytes):
    return np.random.default_rng(1000 + k).integers(0, 256, nbytes, dtype=np.uint8)


def expected_layers(k, nbytes):
    h, out = request_input(k, nbytes), []
    for layer in range(LAYERS):
        h = layer_work(h, layer, np)
        out.append(h)
    return out


def gpu_sender(conn):
    """The prefill process: the graph, the signal, the watcher."""
    import kvxfer
    from tests.reference import PRESETS

    agent = peer = sig = graph = x = None
    pool = []
    sends = []
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "init":
                layout = PRESETS["vllm_flash"]()
                agent = kvxfer.Agent("gpu-sender", transport=args, interface="lo", timeout_s=60)
                pool = [torch.zeros(layout.tensor_layer_bytes, dtype=torch.uint8, pin_memory=True)
                        for _ in range(LAYERS)]
                agent.register_pool(pool, layout)
                sig = kvxfer.LayerSignal(agent, LAYERS)
                assert sig.on_device, sig.why_host
                x = torch.zeros(layout.tensor_layer_bytes, dtype=torch.uint8, device="cuda")

                def forward():
                    h = x
                    for layer in range(LAYERS):
                        h = layer_work(h, layer, torch)
                        pool[layer].copy_(h, non_blocking=True)
                        sig.record(layer)  # on the current (capturing) stream

                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    forward()  # warm-up outside the graph: a real forward, so it gets its own (empty) binding
                torch.cuda.current_stream().wait_stream(side)
                sig.bind([])
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    forward()  # captured once; records are kernel nodes
                torch.cuda.synchronize()
                result = agent.metadata()
            elif cmd == "add_peer":
                peer = agent.add_peer(args)
                result = peer.path
            elif cmd == "forward":
                k, xfer, src_ids, dst_ids, bind_late = args
                x.copy_(torch.from_numpy(request_input(k, x.numel())).cuda())
                send = agent.send(peer, xfer, np.array(src_ids, np.int32), np.array(dst_ids, np.int32))
                sends.append(send)
                if not bind_late:
                    sig.bind([send])
                graph.replay()
                if bind_late:
                    torch.cuda.synchronize()  # the records are in the slots before their binding exists
                    assert sig.unbound_forwards == 1, sig.stats()
                    sig.bind([send])
                # The pool is the graph's fixed output: wait for this request's writes before the next replay
                # overwrites it. (The model's stream never waits; this is the test host keeping its source stable.)
                send.wait(timeout_s=60)
                result = None
            elif cmd == "stats":
                sig.drain(timeout_s=60)
                result = (sig.stats(), [sig.slot(layer) for layer in range(LAYERS)], sig.errors)
            elif cmd == "exit":
                conn.send(("ok", None))
                return
            else:
                raise ValueError(cmd)
            conn.send(("ok", result))
        except Exception as e:
            conn.send(("err", type(e).__name__, str(e) + "\n" + traceback.format_exc()))


class GpuSender:
    def __init__(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=gpu_sender, args=(child,), daemon=True)
        self.proc.start()

    def call(self, cmd, args=None, timeout_s=180):
        self.conn.send((cmd, args))
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"GPU sender did not answer {cmd} within {timeout_s}s")
        reply = self.conn.recv()
        if reply[0] == "err":
            raise RuntimeError(f"{reply[1]}: {reply[2]}")
        return reply[1]

    def close(self):
        try:
            self.call("exit", timeout_s=20)
        except Exception:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


@pytest.mark.parametrize("transport", ["cma", "tcp"])
def test_graph_replays_deliver_every_layer_of_each_request(transport):
    import kvxfer
    from tests.reference import PRESETS, block_view, make_pool

    layout = PRESETS["vllm_flash"]()
    nbytes = layout.tensor_layer_bytes
    sender = GpuSender()
    try:
        agent = kvxfer.Agent("gpu-receiver", transport=transport, interface="lo", timeout_s=60)
        seeded = make_pool(layout, 77)
        dst = [torch.from_numpy(a.copy()).pin_memory() for a in seeded]
        agent.register_pool(dst, layout)
        peer = agent.add_peer(sender.call("init", transport))
        sender.call("add_peer", agent.metadata())
        agent.wait_connected(peer, 30)

        # The decode graph: per layer, wait on the device-visible counter, then copy the received layer to the GPU.
        counter = kvxfer.DeviceCounter(LAYERS)
        assert counter.on_device, counter.why_host
        out = torch.zeros((LAYERS, nbytes), dtype=torch.uint8, device="cuda")
        decode = torch.cuda.CUDAGraph()
        with torch.cuda.graph(decode):  # no warm-up: every executed wait counts as one replay's wait
            for layer in range(LAYERS):
                counter.wait_on_stream(layer, timeout_s=60)
                out[layer].copy_(dst[layer], non_blocking=True)
        torch.cuda.synchronize()

        n = 6
        for k in range(n):
            src_ids = np.array([(5 * k) % 32, (5 * k + 3) % 32, (5 * k + 11) % 32], np.int32)
            dst_ids = np.array([3 * k, 3 * k + 1, 3 * k + 2], np.int32)  # fresh blocks: stale bytes would show
            recv = agent.recv(peer, 7000 + k, dst_ids)
            assert counter.attach(recv) == k + 1
            decode.replay()  # spins on the GPU until the sender's layers arrive
            sender.call("forward", (k, 7000 + k, src_ids.tolist(), dst_ids.tolist(), k % 2 == 1))
            recv.wait(timeout_s=60)
            torch.cuda.synchronize()
            assert counter.device_errors == 0 and counter.host_view() == [k + 1] * LAYERS
            want = expected_layers(k, nbytes)
            got = out.cpu().numpy()
            for layer in range(LAYERS):
                host_blocks = block_view(layout, [d.numpy() for d in dst], layer)[:, dst_ids]
                np.testing.assert_array_equal(host_blocks, block_view(layout, want, layer)[:, src_ids])
                # what the decode graph copied after its wait: this request's bytes, not the stale ones
                np.testing.assert_array_equal(block_view(layout, [got[layer]], 0)[:, dst_ids],
                                              block_view(layout, want, layer)[:, src_ids])

        stats, slots, errs = sender.call("stats")
        assert slots == [n + 1] * LAYERS  # the warm-up forward plus n replays, each layer exactly once
        assert stats["forwards_bound"] == n + 1 and stats["forwards_delivered"] == n + 1
        assert stats["layers_posted"] == n * LAYERS and stats["errors"] == 0 and errs == []
    finally:
        sender.close()


def test_wait_released_by_failure_and_timeout_without_hanging():
    """A recv that fails releases the device wait (fail word); a wait with nothing new attached times out. Both count
    in device_errors, neither hangs the stream, and the next wait still targets the next generation."""
    import kvxfer
    from tests.reference import PRESETS, make_pool

    layout = PRESETS["vllm_flash"]()
    a = kvxfer.Agent("gpu-fail-a", transport="tcp", interface="lo")
    b = kvxfer.Agent("gpu-fail-b", transport="tcp", interface="lo")
    a.register_pool(make_pool(layout, 1), layout)
    b.register_pool(make_pool(layout, 2), layout)
    pb, pa = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    b.wait_connected(pa, 20)
    counter = kvxfer.DeviceCounter(LAYERS)
    ids = np.array([1, 2], np.int32)
    recv = b.recv(pa, 1, ids)
    counter.attach(recv)
    counter.wait_on_stream(None, timeout_s=120)  # every layer; released only by the failure below
    send = a.send(pb, 1, ids, ids)
    send.abort("prefill died")
    with pytest.raises(kvxfer.errors.TransferFailed):
        recv.wait(timeout_s=30)
    torch.cuda.synchronize()
    assert counter.device_errors == 1 and counter.failed
    counter.wait_on_stream(0, timeout_s=0.05)  # generation 2 never attached: times out
    torch.cuda.synchronize()
    assert counter.device_errors == 2
    # generations 2 and 3 attached and done: waits 2 and 3 on layer 1 pass without an error
    for xfer in (2, 3):
        r = b.recv(pa, xfer, ids)
        counter.attach(r)
        a.send(pb, xfer, ids, ids).all_ready()
        r.wait(timeout_s=30)
    counter.wait_on_stream(1, timeout_s=30)
    counter.wait_on_stream(1, timeout_s=30)
    torch.cuda.synchronize()
    assert counter.device_errors == 2


def test_warm_up_forwards_then_resync_and_sync_keep_each_replay_on_its_own_request():
    """Engines run a forward or two eagerly before capture (torch wants a warm-up; vLLM warms up every batch size).
    Those record layers with nothing bound, and their decode-side waits take numbers with nothing attached.
    LayerSignal.resync() and DeviceCounter.sync() pass over them, so the first replay goes to the first bound send
    and waits for the first attached recv. The graph also keeps working after the signal object is gone (its
    memory stays for the graph)."""
    import gc

    import kvxfer
    from tests.reference import PRESETS, block_view, make_pool

    layout = PRESETS["vllm_flash"]()
    nbytes = layout.tensor_layer_bytes
    a = kvxfer.Agent("gpu-warm-a", transport="tcp", interface="lo", timeout_s=60)
    b = kvxfer.Agent("gpu-warm-b", transport="tcp", interface="lo", timeout_s=60)
    pool = [torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(LAYERS)]
    dst = [torch.from_numpy(x.copy()).pin_memory() for x in make_pool(layout, 5)]
    a.register_pool(pool, layout)
    b.register_pool(dst, layout)
    pb, pa = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(pb, 30)
    b.wait_connected(pa, 30)
    held = {"sig": kvxfer.LayerSignal(a, LAYERS), "counter": kvxfer.DeviceCounter(LAYERS)}  # dropped at the end
    sig, counter = held["sig"], held["counter"]
    x = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    out = torch.zeros((LAYERS, nbytes), dtype=torch.uint8, device="cuda")

    def forward():
        h = x
        for layer in range(LAYERS):
            h = layer_work(h, layer, torch)
            pool[layer].copy_(h, non_blocking=True)
            held["sig"].record(layer)

    def decode(timeout_s):
        for layer in range(LAYERS):
            held["counter"].wait_on_stream(layer, timeout_s=timeout_s)
            out[layer].copy_(dst[layer], non_blocking=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()  # warm-ups: recorded, nothing bound
            decode(0.01)  # warm-ups: nothing attached, each wait times out and takes a number
    torch.cuda.synchronize()
    assert sig.unbound_forwards == 2 and counter.device_errors == 2 * LAYERS
    assert sig.resync() == 2 and counter.sync() == 0
    fwd_graph, dec_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(fwd_graph):
        forward()
    with torch.cuda.graph(dec_graph):
        decode(60)
    torch.cuda.synchronize()
    # The decode graph's waits spin until this request's layers land, and those come from the forward graph: the
    # two replay on different streams (one stream would queue the forward behind the spinning waits until they
    # time out).
    dec_stream = torch.cuda.Stream()
    for k in range(3):
        src_ids, dst_ids = np.array([k, k + 9], np.int32), np.array([2 * k, 2 * k + 1], np.int32)
        recv = b.recv(pa, 50 + k, dst_ids)
        assert counter.attach(recv) == k + 1
        with torch.cuda.stream(dec_stream):
            dec_graph.replay()  # waits on the GPU for this request's layers
        x.copy_(torch.from_numpy(request_input(k, nbytes)).cuda())
        send = a.send(pb, 50 + k, src_ids, dst_ids)
        sig.bind([send])
        fwd_graph.replay()
        send.wait(timeout_s=60)
        recv.wait(timeout_s=60)
        torch.cuda.synchronize()
        assert counter.device_errors == 2 * LAYERS, "a wait of a replay timed out: the numbering is off"
        want, got = expected_layers(k, nbytes), out.cpu().numpy()
        for layer in range(LAYERS):
            np.testing.assert_array_equal(block_view(layout, [got[layer]], 0)[:, dst_ids],
                                          block_view(layout, want, layer)[:, src_ids])
    assert sig.stats()["forwards_skipped"] == 2 and sig.stats()["forwards_delivered"] == 3
    sig.close()
    del sig, counter
    held.clear()
    gc.collect()
    for _ in range(3):  # the graph outlives the signal: its memory stays, replays still run cleanly
        fwd_graph.replay()
    torch.cuda.synchronize()
    a.close()
    b.close()
