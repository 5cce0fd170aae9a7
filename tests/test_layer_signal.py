"""LayerSignal and DeviceCounter, host side (no GPU): the C++ watcher delivering records to bound sends, the binding
FIFO (late binding, empty forwards, overflow), error paths, and the receiver's device-visible counter.

The device is played by the host: signal._host_record(layer) does what the record kernel does (bump the layer's
count in the signal memory); the real watcher thread then posts real writes between real agents. The two-process
tests run over tcp, libfabric shm and cma.
"""
import re
import threading

import numpy as np
import pytest

import kvxfer
from kvxfer import errors
from tests.conftest import TRANSPORTS, connect, local_pair
from tests.reference import PRESETS, apply, block_view, make_pool

LAYERS = 4  # the vllm_flash preset


@pytest.fixture
def pair():
    """Sender and receiver agents in this process over tcp (the watcher's logic does not depend on the path)."""
    layout = PRESETS["vllm_flash"]()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, names=("sig-sender", "sig-receiver"))
    return a, b, peer_b, peer_a, layout, src, dst


def request(k):
    """Request k's block ids: distinct per request on both sides, so a misrouted forward shows in the bytes."""
    return np.array([k, k + 8], np.int32), np.array([2 * k + 1, 2 * k + 16], np.int32)


def record_forward(sig, layers=range(LAYERS)):
    for layer in layers:
        sig._host_record(layer)


def assert_request_bytes(layout, src, dst, src_ids, dst_ids, layers=range(LAYERS)):
    for layer in layers:
        got = block_view(layout, dst, layer)[:, dst_ids]
        np.testing.assert_array_equal(got, block_view(layout, src, layer)[:, src_ids])


def test_import_and_host_fallback_without_gpu(pair):
    a = pair[0]
    sig = kvxfer.LayerSignal(a, LAYERS)
    usable, why = kvxfer.signals.cuda_status()
    assert sig.on_device == usable
    if not usable:
        assert sig.why_host == why and why  # names what is missing (no CUDA build / driver / device)
        with pytest.raises(errors.TransportUnavailable, match="LayerSignal.record needs a CUDA device: " + re.escape(why[:20])):
            sig.record(0, stream=0)
        c = kvxfer.DeviceCounter(LAYERS)
        with pytest.raises(errors.TransportUnavailable, match="DeviceCounter.wait_on_stream needs a CUDA device"):
            c.wait_on_stream(0, stream=0)
    sig.close()


def test_device_counter_wait_refuses_a_negative_layer():
    """-1 is the C++ side's "every layer": a caller's negative index must not silently become a wait for all."""
    c = kvxfer.DeviceCounter(LAYERS, device=False)
    for bad in (-1, -2):
        with pytest.raises(errors.InvalidArgument, match=rf"layer={bad}: a layer index \(0 to {LAYERS - 1}\), or None"):
            c.wait_on_stream(bad, stream=0)
    with pytest.raises(errors.InvalidArgument, match=f"layer {LAYERS} is outside this DeviceCounter's {LAYERS} layers"):
        c.wait_on_stream(LAYERS, stream=0)


def test_each_forward_goes_to_its_binding_bytes_and_counters_exact(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    before = [x.copy() for x in dst]
    sig = kvxfer.LayerSignal(a, LAYERS, device=False)
    n = 6
    recvs, sends = [], []
    for k in range(n):
        s_ids, d_ids = request(k)
        recvs.append(b.recv(peer_a, 100 + k, d_ids))
        sends.append(a.send(peer_b, 100 + k, s_ids, d_ids))
        assert sig.bind([sends[-1]]) == k
        record_forward(sig)
    for r in recvs:
        r.wait(timeout_s=30)
    sig.drain(timeout_s=30)
    st = sig.stats()
    assert (st["forwards_bound"], st["forwards_delivered"]) == (n, n)
    assert st["records_delivered"] == n * LAYERS and st["layers_posted"] == n * LAYERS
    assert st["errors"] == 0 and st["layers_skipped"] == 0 and st["unbound_forwards"] == 0
    assert [sig.slot(l) for l in range(LAYERS)] == [n] * LAYERS
    expected = [x.copy() for x in before]
    for k in range(n):
        apply(layout, src, expected, *request(k), range(LAYERS))
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)  # every request's blocks, and nothing else changed
    sig.close()


def test_records_before_bind_wait_and_apply_in_order(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    sig = kvxfer.LayerSignal(a, LAYERS, device=False)
    for _ in range(3):
        record_forward(sig)  # three forwards recorded, nothing bound
    assert sig.unbound_forwards == 3
    assert sig.stats()["records_delivered"] == 0
    recvs = []
    for k in range(3):
        s_ids, d_ids = request(k)
        recvs.append(b.recv(peer_a, 200 + k, d_ids))
        sig.bind([a.send(peer_b, 200 + k, s_ids, d_ids)])  # late: applies at once, to forward k
    for r in recvs:
        r.wait(timeout_s=30)
    sig.drain(timeout_s=30)
    assert sig.unbound_forwards == 0 and sig.stats()["forwards_delivered"] == 3
    for k in range(3):
        assert_request_bytes(layout, src, dst, *request(k))
    sig.close()


def test_partial_forward_posts_only_recorded_layers(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    before = [x.copy() for x in dst]
    sig = kvxfer.LayerSignal(a, LAYERS, device=False)
    s_ids, d_ids = request(0)
    recv = b.recv(peer_a, 300, d_ids)
    sig.bind([a.send(peer_b, 300, s_ids, d_ids)])
    sig._host_record(2)
    sig._host_record(0)
    recv.wait(layer=0, timeout_s=30)
    recv.wait(layer=2, timeout_s=30)
    # layers 1 and 3 were never recorded: not posted, bytes untouched, the forward still pending
    assert not recv.layer_done(1) and not recv.layer_done(3)
    for layer in (1, 3):
        np.testing.assert_array_equal(block_view(layout, dst, layer), block_view(layout, before, layer))
    with pytest.raises(errors.TransferTimeout, match=r"forward 0 waits for layers \[1, 3\]"):
        sig.drain(timeout_s=0.2)
    sig._host_record(1)
    sig._host_record(3)
    recv.wait(timeout_s=30)
    sig.drain(timeout_s=30)
    assert_request_bytes(layout, src, dst, s_ids, d_ids)
    sig.close()


def test_empty_binding_consumes_a_forward_and_many_sends_per_forward(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    sig = kvxfer.LayerSignal(a, LAYERS, device=False)
    assert sig.bind([]) == 0  # forward 0 sends nothing
    ids = [request(k) for k in (1, 2, 3)]
    recvs = [b.recv(peer_a, 400 + i, d) for i, (_, d) in enumerate(ids)]
    assert sig.bind([a.send(peer_b, 400 + i, s, d) for i, (s, d) in enumerate(ids)]) == 1
    record_forward(sig)
    assert sig.stats()["forwards_delivered"] <= 1
    assert all(r.layers_done == 0 for r in recvs)  # forward 0's records are not forward 1's
    record_forward(sig)
    for r in recvs:
        r.wait(timeout_s=30)
    sig.drain(timeout_s=30)
    st = sig.stats()
    assert st["forwards_delivered"] == 2 and st["layers_posted"] == 3 * LAYERS and st["records_delivered"] == 2 * LAYERS
    for s, d in ids:
        assert_request_bytes(layout, src, dst, s, d)
    sig.close()


def test_overflow_raises_and_recovers(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    sig = kvxfer.LayerSignal(a, LAYERS, max_bindings=2, device=False)
    sig.bind([])
    sig.bind([])
    with pytest.raises(errors.SignalOverflow, match=r"2 forwards \(max_bindings\) are bound but not fully recorded"):
        sig.bind([])
    assert sig.stats()["forwards_bound"] == 2  # the refused bind left nothing behind
    record_forward(sig)
    record_forward(sig)
    sig.drain(timeout_s=30)
    assert sig.bind([]) == 2  # room again; numbering continues
    sig.close()


def test_failed_send_is_reported_and_the_rest_of_the_forward_still_goes(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    sig = kvxfer.LayerSignal(a, LAYERS, device=False)
    (s0, d0), (s1, d1) = request(0), request(1)
    recv_ok = b.recv(peer_a, 501, d1)
    doomed = a.send(peer_b, 500, s0, d0)
    ok = a.send(peer_b, 501, s1, d1)
    doomed.abort("model failed")
    with pytest.raises(errors.TransferFailed):
        doomed.wait(timeout_s=30)
    sig.bind([doomed, ok])
    record_forward(sig)
    recv_ok.wait(timeout_s=30)
    sig.drain(timeout_s=30)
    st = sig.stats()
    assert st["errors"] == LAYERS and st["layers_posted"] == LAYERS and st["forwards_delivered"] == 1
    assert len(sig.errors) == LAYERS
    assert all("transfer 500" in e and "model failed" in e for e in sig.errors)
    assert_request_bytes(layout, src, dst, s1, d1)
    sig.close()


def test_layer_subset_send_skips_other_layers(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    before = [x.copy() for x in dst]
    sig = kvxfer.LayerSignal(a, LAYERS, device=False)
    s_ids, d_ids = request(2)
    recv = b.recv(peer_a, 600, d_ids, layers=range(1, 3))
    sig.bind([a.send(peer_b, 600, s_ids, d_ids, layers=range(1, 3))])
    record_forward(sig)
    recv.wait(timeout_s=30)
    sig.drain(timeout_s=30)
    st = sig.stats()
    assert st["layers_posted"] == 2 and st["layers_skipped"] == 2 and st["errors"] == 0
    expected = [x.copy() for x in before]
    apply(layout, src, expected, s_ids, d_ids, range(1, 3))
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)
    sig.close()


def test_bad_bindings_and_layers_are_refused(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    sig = kvxfer.LayerSignal(a, 2, device=False)  # fewer layers than the sends cover
    s_ids, d_ids = request(0)
    with pytest.raises(errors.InvalidArgument, match=r"covers layers \[0, 4\) but the LayerSignal has 2"):
        sig.bind([a.send(peer_b, 700, s_ids, d_ids)])
    with pytest.raises(errors.InvalidArgument, match="outside this LayerSignal's 2 layers"):
        sig._host_record(2)
    with pytest.raises(errors.InvalidArgument, match="outside this LayerSignal's 2 layers"):
        sig.record(5, stream=0)
    other = kvxfer.LayerSignal(b, LAYERS, device=False)
    with pytest.raises(errors.InvalidArgument, match="is not a Send of this signal's agent 'sig-receiver'"):
        other.bind([a.send(peer_b, 701, s_ids, d_ids)])
    with pytest.raises(errors.InvalidArgument, match="num_layers"):
        kvxfer.LayerSignal(a, 0)
    with pytest.raises(errors.InvalidArgument, match="1 to 256 layers"):
        kvxfer.LayerSignal(a, 257, device=False)
    sig.close()
    with pytest.raises(errors.InvalidArgument, match="closed"):
        sig.bind([])
    other.close()


def test_layer_marked_by_hand_is_an_error_not_a_crash(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    sig = kvxfer.LayerSignal(a, LAYERS, device=False)
    s_ids, d_ids = request(3)
    recv = b.recv(peer_a, 800, d_ids)
    send = a.send(peer_b, 800, s_ids, d_ids)
    send.layer_ready(1)  # the engine also marked layer 1 itself
    sig.bind([send])
    record_forward(sig)
    recv.wait(timeout_s=30)
    sig.drain(timeout_s=30)
    assert sig.stats()["errors"] == 1 and sig.stats()["layers_posted"] == LAYERS - 1
    assert "layer 1 of transfer 800 is already marked ready" in sig.errors[0]
    sig.close()


def test_device_thread_records_concurrently_with_binds(pair):
    """A thread plays the device (records N forwards as fast as it can) while the main thread binds; every record
    reaches its forward's send exactly once."""
    a, b, peer_b, peer_a, layout, src, dst = pair
    sig = kvxfer.LayerSignal(a, LAYERS, device=False, max_bindings=4)
    n = 24
    ids = [(np.array([k % 32], np.int32), np.array([k], np.int32)) for k in range(n)]  # dst block k per request
    recvs = [b.recv(peer_a, 900 + k, d) for k, (_, d) in enumerate(ids)]
    device = threading.Thread(target=lambda: [record_forward(sig) for _ in range(n)])
    device.start()
    for k, (s, d) in enumerate(ids):
        send = a.send(peer_b, 900 + k, s, d)
        while True:
            try:
                sig.bind([send])
                break
            except errors.SignalOverflow:  # 4 forwards ahead of the device: wait for the oldest, as an engine would
                recvs[k - 4].wait(timeout_s=30)
    device.join()
    for r in recvs:
        r.wait(timeout_s=30)
    sig.drain(timeout_s=30)
    st = sig.stats()
    assert st["forwards_delivered"] == n and st["layers_posted"] == n * LAYERS and st["errors"] == 0
    for s, d in ids:
        assert_request_bytes(layout, src, dst, s, d)
    sig.close()


# ---- DeviceCounter -------------------------------------------------------------------------------------------

def test_device_counter_mirrors_recv_layer_by_layer(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    counter = kvxfer.DeviceCounter(LAYERS, device=False)
    assert counter.host_view() == [0] * LAYERS and counter.layers_done == 0
    for gen, k in enumerate((0, 1, 2), start=1):
        s_ids, d_ids = request(k)
        recv = b.recv(peer_a, 1000 + k, d_ids)
        assert counter.attach(recv) == gen
        send = a.send(peer_b, 1000 + k, s_ids, d_ids)
        for i, layer in enumerate((3, 0, 2, 1)):
            send.layer_ready(layer)
            recv.wait(layer=layer, timeout_s=30)
            view = counter.host_view()
            # the device-visible words equal the recv's own state, layer by layer
            assert [w >= gen for w in view] == [recv.layer_done(l) for l in range(LAYERS)]
            assert view[layer] == gen and counter.layers_done == i + 1 == sum(map(recv.layer_done, range(LAYERS)))
        recv.wait(timeout_s=30)
        assert counter.host_view() == [gen] * LAYERS and not counter.failed


def test_device_counter_attach_rules(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    counter = kvxfer.DeviceCounter(LAYERS, device=False)
    s_ids, d_ids = request(0)
    # attached after all data arrived: the words are written at attach time
    recv = b.recv(peer_a, 1100, d_ids)
    a.send(peer_b, 1100, s_ids, d_ids).all_ready()
    recv.wait(timeout_s=30)
    assert counter.attach(recv) == 1 and counter.host_view() == [1] * LAYERS
    with pytest.raises(errors.InvalidArgument, match="already has a device counter attached"):
        kvxfer.DeviceCounter(LAYERS, device=False).attach(recv)
    # a pending recv blocks the next attach
    s_ids, d_ids = request(1)
    pending = b.recv(peer_a, 1101, d_ids)
    assert counter.attach(pending) == 2
    nxt = b.recv(peer_a, 1102, request(2)[1])
    with pytest.raises(errors.InvalidArgument, match=r"recv 1101 attached to this DeviceCounter is still pending \(0/4"):
        counter.attach(nxt)
    assert counter.generation == 2
    # subset recv: the layers it does not carry are done for its generation at once
    a.send(peer_b, 1101, s_ids, d_ids).all_ready()
    pending.wait(timeout_s=30)
    sub = b.recv(peer_a, 1103, request(3)[1], layers=range(1, 3))
    assert counter.attach(sub) == 3
    assert counter.host_view() == [3, 2, 2, 3]
    big = kvxfer.DeviceCounter(2, device=False)
    with pytest.raises(errors.InvalidArgument, match=r"covers layers \[0, 4\) but this DeviceCounter has 2"):
        big.attach(nxt)


def test_device_counter_failure_sets_fail_word(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    counter = kvxfer.DeviceCounter(LAYERS, device=False)
    s_ids, d_ids = request(0)
    recv = b.recv(peer_a, 1200, d_ids)
    counter.attach(recv)
    send = a.send(peer_b, 1200, s_ids, d_ids)
    send.layer_ready(0)
    recv.wait(layer=0, timeout_s=30)
    send.abort("decode cancelled")
    with pytest.raises(errors.TransferFailed):
        recv.wait(timeout_s=30)
    assert counter.failed and counter._c.fail_word == 1
    assert counter.host_view() == [1, 0, 0, 0]  # a device wait on layer 1 is released by the fail word, not a count


# ---- two processes: the watcher in a sender process, over every host transport ------------------------------

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_processes_signal_driven_forwards(transport, remote):
    """The remote sender runs a LayerSignal whose slots a 'device' thread writes; the real watcher posts each forward's
    layers to that forward's request. Receiver: bytes exact, counters exact, DeviceCounter equals recv state."""
    agent, peer, layout, dst, _ = connect(transport, remote, "vllm_flash", seed=21)
    src = make_pool(layout, 21)
    before = [x.copy() for x in dst]
    n = 8
    reqs = [(np.array([(3 * k) % 32, (3 * k + 7) % 32], np.int32), np.array([2 * k, 2 * k + 1], np.int32))
            for k in range(n)]
    counter = kvxfer.DeviceCounter(LAYERS, device=False)
    remote.call("sig_init", (LAYERS,))
    # bind the first half before the device records, the second half after (late binding)
    for k in range(n // 2):
        remote.call("sig_bind", (5000 + k, reqs[k][0].tolist(), reqs[k][1].tolist()))
    remote.call("sig_device", (n,))  # the device thread records n forwards
    for k in range(n // 2, n):
        remote.call("sig_bind", (5000 + k, reqs[k][0].tolist(), reqs[k][1].tolist()))
    for k in range(n):
        recv = agent.recv(peer, 5000 + k, reqs[k][1])
        assert counter.attach(recv) == k + 1
        recv.wait(timeout_s=60)
        assert recv.layers_done == LAYERS and counter.host_view() == [k + 1] * LAYERS
    stats = remote.call("sig_drain", (60,))
    assert stats["forwards_bound"] == n and stats["forwards_delivered"] == n
    assert stats["layers_posted"] == n * LAYERS and stats["errors"] == 0 and stats["unbound_forwards"] == 0
    expected = [x.copy() for x in before]
    for s, d in reqs:
        apply(layout, src, expected, s, d, range(LAYERS))
    for got, want in zip(dst, expected):
        np.testing.assert_array_equal(got, want)


def test_resync_passes_over_warm_up_forwards_recorded_with_nothing_bound(pair):
    """Warm-up forwards (eager runs before capture) record every layer with nothing bound. Without resync the first
    bind() would take the first warm-up forward (already recorded: its send would go at once, before the real
    forward computed anything). resync() passes over them: the binding goes to the next forward recorded, and its
    bytes land only once that forward records its layers."""
    a, b, peer_b, peer_a, layout, src, dst = pair
    before = [x.copy() for x in dst]
    sig = kvxfer.LayerSignal(a, LAYERS, device=False)
    for _ in range(3):
        record_forward(sig)  # three warm-up forwards
    assert sig.unbound_forwards == 3
    assert sig.resync() == 3
    assert sig.unbound_forwards == 0 and sig.stats()["forwards_skipped"] == 3
    assert sig.resync() == 0  # nothing new recorded since
    s_ids, d_ids = request(1)
    recv = b.recv(peer_a, 310, d_ids)
    sig.bind([a.send(peer_b, 310, s_ids, d_ids)])
    with pytest.raises(errors.TransferTimeout, match=r"forward 3 waits for layers \[0, 1, 2, 3\]"):
        sig.drain(timeout_s=0.3)  # the binding waits for the next forward: nothing was posted yet
    assert recv.layers_done == 0
    for layer in range(LAYERS):
        np.testing.assert_array_equal(block_view(layout, dst, layer), block_view(layout, before, layer))
    record_forward(sig)
    recv.wait(timeout_s=30)
    sig.drain(timeout_s=30)
    assert_request_bytes(layout, src, dst, s_ids, d_ids)
    assert sig.stats()["forwards_delivered"] == 1
    sig.close()


def test_resync_refuses_a_forward_recorded_in_part_or_bound_forwards(pair):
    a, b, peer_b, peer_a, layout, src, dst = pair
    sig = kvxfer.LayerSignal(a, LAYERS, device=False)
    record_forward(sig, layers=[0, 1])  # a forward still running: layers 2 and 3 not recorded yet
    with pytest.raises(errors.InvalidArgument, match="layer 2 was recorded 0 times but layer 0 1 times: a forward is "
                                                     "still running"):
        sig.resync()
    record_forward(sig, layers=[2, 3])
    assert sig.resync() == 1
    s_ids, d_ids = request(2)
    recv = b.recv(peer_a, 320, d_ids)
    sig.bind([a.send(peer_b, 320, s_ids, d_ids)])
    with pytest.raises(errors.InvalidArgument, match="1 forwards bound and pending"):
        sig.resync()
    record_forward(sig)
    recv.wait(timeout_s=30)
    sig.drain(timeout_s=30)
    assert_request_bytes(layout, src, dst, s_ids, d_ids)
    sig.close()
    with pytest.raises(errors.InvalidArgument, match="closed"):
        sig.resync()


def test_host_record_is_refused_on_a_device_mapped_signal(pair):
    """A device-mapped signal counts its records on the device as well: a host record would put the two out of
    step (the next device record would write a smaller count and the watcher would stop). Refused by name."""
    sig = kvxfer.LayerSignal(pair[0], LAYERS)
    if not sig.on_device:
        sig._host_record(0)  # host memory: the host plays the device
        assert sig.slot(0) == 1
    else:
        with pytest.raises(errors.InvalidArgument, match="device-mapped LayerSignal.*device=False"):
            sig._host_record(0)
    sig.close()
