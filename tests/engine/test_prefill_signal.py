"""The prefill worker's GPU way of marking layers, run without a GPU: a LayerSignal in host memory, the test playing
the device with `_host_record` where a GPU would run the record kernel; the real watcher thread marks the layers of
real sends between two agents over tcp, and the worker itself never calls layer_ready. Greedy tokens equal a
colocated run's; a forward that fails half-way still uses up its binding, so the next batch arrives exact."""
import time

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (scripts/setup.sh installs torch==2.13.0)")

import kvxfer  # noqa: E402
from kvxfer.engine.decode import DecodeWorker, SeqState  # noqa: E402
from kvxfer.engine.model import PRESETS, LlamaModel  # noqa: E402
from kvxfer.engine.prefill import PrefillJob, PrefillWorker  # noqa: E402
from tests.engine.test_disagg import BS, MAX_TOKENS, SEED, colocated, prompts, run_to_end  # noqa: E402


@pytest.fixture
def workers():
    model = LlamaModel.random(PRESETS["tiny"], SEED)
    pa = kvxfer.Agent("prefill-signal", transport="tcp", interface="lo", timeout_s=30)
    da = kvxfer.Agent("decode-signal", transport="tcp", interface="lo", timeout_s=30)
    pw = PrefillWorker(model, 256, BS, pa, timeout_s=30)
    dw = DecodeWorker(model, 256, BS, da, timeout_s=30)
    peer_d, peer_p = pa.add_peer(da.metadata()), da.add_peer(pa.metadata())
    pa.wait_connected(peer_d, 20)
    da.wait_connected(peer_p, 20)
    pw.signal = kvxfer.LayerSignal(pa, model.cfg.num_layers, device=False)
    pw._record = pw.signal._host_record  # what a GPU's record kernel does, done by the host at the same point
    yield model, pw, dw, peer_d, peer_p
    pw.signal.close()


def submit(pw, dw, peer_d, peer_p, batch, first_id=0, on_layer=None):
    ids = range(first_id, first_id + len(batch))
    jobs = [PrefillJob(i, p, dw.admit(i, len(p), MAX_TOKENS, peer_p)) for i, p in zip(ids, batch)]
    return pw.compute(jobs, peer_d, on_layer=on_layer)


def test_layers_marked_by_the_signal_watcher_deliver_exact_tokens(workers):
    model, pw, dw, peer_d, peer_p = workers
    batch = prompts()
    b = submit(pw, dw, peer_d, peer_p, batch)
    for i, t in enumerate(b.first_tokens):
        dw.set_first_token(i, t)
    stats = pw.finish(b)
    assert stats["errors"] == [None] * len(batch)
    assert run_to_end(dw) == colocated(model, batch)
    pw.signal.drain(timeout_s=30)
    st = pw.signal.stats()
    layers = model.cfg.num_layers
    assert (st["forwards_bound"], st["forwards_delivered"]) == (1, 1)
    assert st["records_delivered"] == layers and st["layers_posted"] == layers * len(batch) and st["errors"] == 0


def test_a_forward_that_fails_half_way_does_not_shift_the_next_batch(workers):
    model, pw, dw, peer_d, peer_p = workers
    layers = model.cfg.num_layers

    def fail_at_layer_0(layer):
        if layer == 0:
            raise RuntimeError("model failed at layer 0")

    batch = prompts()
    for layer in pw.cache.layers[1:]:
        layer.fill_(7.0)  # what layer 1+ blocks would carry if the uncomputed layers were sent anyway
    with pytest.raises(RuntimeError, match="model failed"):
        submit(pw, dw, peer_d, peer_p, batch[:2], on_layer=fail_at_layer_0)
    doomed = [b for s in dw.seqs.values() for b in s.blocks]
    assert pw.cache.allocator.num_free == 256  # the failed batch's local blocks are back
    pw.signal.drain(timeout_s=30)
    st = pw.signal.stats()
    # Layer 0 was recorded before the failure; the worker recorded the rest so this forward is consumed whole.
    assert (st["forwards_bound"], st["forwards_delivered"], st["records_delivered"]) == (1, 1, layers)
    for _ in range(500):  # the aborted sends fail the decode side's recvs
        dw.step()
        if all(s.state is SeqState.FAILED for s in dw.seqs.values()):
            break
        time.sleep(0.01)
    assert [s.state for s in dw.pop_finished()] == [SeqState.FAILED] * 2
    for layer in dw.cache.layers[1:]:  # the sends were aborted before the watcher marked the uncomputed layers
        assert torch.count_nonzero(layer[:, doomed]) == 0

    b = submit(pw, dw, peer_d, peer_p, batch, first_id=10)
    for i, t in enumerate(b.first_tokens):
        dw.set_first_token(10 + i, t)
    assert pw.finish(b)["errors"] == [None] * len(batch)
    assert run_to_end(dw) == colocated(model, batch)
    pw.signal.drain(timeout_s=30)
    assert pw.signal.stats()["forwards_delivered"] == 2
