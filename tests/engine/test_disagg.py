"""Prefill in one process, decode in another, KV moved by kvxfer layer by layer: greedy tokens equal a colocated
run's token for token, and the decode side really decodes from the transferred KV."""
import os
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (scripts/setup.sh installs torch==2.13.0)")

import kvxfer  # noqa: E402
from kvxfer import bootstrap  # noqa: E402
from kvxfer.engine.decode import DecodeWorker, SeqState  # noqa: E402
from kvxfer.engine.kv_cache import blocks_for  # noqa: E402
from kvxfer.engine.model import PRESETS, LlamaModel  # noqa: E402
from tests.conftest import wait_for  # noqa: E402

BS, SEED, MAX_TOKENS = 4, 3, 8
PROMPT_LENS = (5, 17, 33, 64)


def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def colocated(model, batch):
    cache = model.new_cache(256, BS)
    tables = [torch.tensor(cache.allocator.allocate(blocks_for(len(p) + MAX_TOKENS, BS))) for p in batch]
    logits = model.prefill([torch.tensor(p) for p in batch], tables, cache)
    out = [[t] for t in logits.argmax(-1).tolist()]
    pos = torch.tensor([len(p) for p in batch])
    for _ in range(MAX_TOKENS - 1):
        nxt = model.decode(torch.tensor([o[-1] for o in out]), pos, tables, cache).argmax(-1).tolist()
        for o, t in zip(out, nxt):
            o.append(t)
        pos = pos + 1
    return out


def start_prefill_node(device: str = "cpu", transport: str = "tcp"):
    """A prefill node process (kvxfer.engine.node) connected to a channel this test plays the router on."""
    lst = bootstrap.listen("127.0.0.1", 0)
    proc = subprocess.Popen([sys.executable, "-m", "kvxfer.engine.node", "prefill", "--connect", f"127.0.0.1:{lst.address[1]}",
                             "--model", "tiny", "--seed", str(SEED), "--transport", transport, "--num-blocks", "256",
                             "--block-size", str(BS), "--timeout", "30", "--device", device],
                            env={**os.environ, "FI_TCP_IFACE": "lo"})
    ch = lst.accept(timeout_s=60)
    assert ch.recv_json(timeout_s=60) == {"role": "prefill"}
    return ch, proc, lst


def stop_prefill_node(ch, proc, lst) -> None:
    try:
        ch.send_json({"cmd": "bye"})
        ch.recv_json(timeout_s=10)
    except kvxfer.KvxferError:
        pass
    proc.kill()
    lst.close()


@pytest.fixture
def prefill_node():
    ch, proc, lst = start_prefill_node()
    yield ch, proc
    stop_prefill_node(ch, proc, lst)


def connect_decode(ch, device: str = "cpu", transport: str = "tcp"):
    model = LlamaModel.random(PRESETS["tiny"], SEED, device=device)
    agent = kvxfer.Agent("decode-test", transport=transport, interface="lo", timeout_s=30)
    worker = DecodeWorker(model, 256, BS, agent)
    peer = agent.add_peer(ch.exchange(agent.metadata()))
    agent.wait_connected(peer, 30)
    assert ch.recv_json(timeout_s=30) == {"type": "blocks", "free_blocks": 256, "num_blocks": 256}
    return model, worker, peer


def prefill_batch(ch, worker, peer, batch):
    jobs = [{"xfer_id": i, "prompt": p, "dst_blocks": worker.admit(i, len(p), MAX_TOKENS, peer)}
            for i, p in enumerate(batch)]
    ch.send_json({"cmd": "prefill", "jobs": jobs})
    first = ch.recv_json(timeout_s=60)
    assert first["type"] == "first" and first["ok"], first
    for i, t in enumerate(first["first_tokens"]):
        worker.set_first_token(i, t)
    kv = ch.recv_json(timeout_s=60)
    assert kv["type"] == "kv" and kv["errors"] == [None] * len(batch), kv
    assert kv["free_blocks"] == kv["num_blocks"] == 256  # the prefill side freed its blocks once the sends ended
    return kv


def run_to_end(worker):
    out = {}
    for _ in range(200):
        for seq_id, token, finished in worker.step():
            assert token is not None, worker.seqs[seq_id].error
            out.setdefault(seq_id, []).append(token)
        if all(s.state is SeqState.FINISHED for s in worker.seqs.values()):
            return [out[i] for i in sorted(out)]
    raise AssertionError("decode did not finish")


def test_disaggregated_tokens_equal_colocated(prefill_node):
    ch, _ = prefill_node
    model, worker, peer = connect_decode(ch)
    batch = prompts()
    stats = prefill_batch(ch, worker, peer, batch)
    got = run_to_end(worker)
    assert got == colocated(model, batch)
    layer_bytes = 2 * BS * model.cfg.num_kv_heads * model.cfg.head_dim * 4  # K and V of one block, fp32
    assert stats["kv_bytes"] == sum(blocks_for(n, BS) for n in PROMPT_LENS) * layer_bytes * model.cfg.num_layers
    assert worker.cache.allocator.num_free == 256  # every block freed on finish
    # host pools over libfabric tcp: chunks under 32 KiB go packed into the decode node's landing slots when a
    # layer of the request moves 32 KiB or more, else written directly (KVXFER_LANDING=needed: always directly)
    chunk = layer_bytes // 2
    assert chunk < 32 << 10
    assert stats["paths"] == ["staged" if blocks_for(n, BS) * layer_bytes >= 32 << 10 else "fabric" for n in PROMPT_LENS]


def test_decode_really_uses_the_transferred_kv(prefill_node):
    """Negative control: zero one request's received KV before decoding; only that request's tokens change."""
    ch, _ = prefill_node
    model, worker, peer = connect_decode(ch)
    batch = prompts()
    prefill_batch(ch, worker, peer, batch)
    victim = worker.seqs[2]
    victim.recv.wait(timeout_s=30)
    for layer in worker.cache.layers:
        layer[:, victim.blocks[: blocks_for(PROMPT_LENS[2], BS)]] = 0
    got, want = run_to_end(worker), colocated(model, batch)
    assert got[2] != want[2]
    assert [g for i, g in enumerate(got) if i != 2] == [w for i, w in enumerate(want) if i != 2]


def test_prefill_node_dying_fails_its_requests_and_frees_blocks(prefill_node):
    ch, proc = prefill_node
    _, worker, peer = connect_decode(ch)
    worker.admit(0, 20, MAX_TOKENS, peer)
    proc.kill()  # dies before it ever writes
    proc.wait(10)
    for _ in range(400):
        events = worker.step()
        if events:
            break
        time.sleep(0.05)
    assert events == [(0, None, True)]
    seq = worker.pop_finished()[0]
    assert seq.state is SeqState.FAILED and "PeerLost" in seq.error, seq.error
    assert worker.cache.allocator.num_free == 256


def test_a_cancelled_sequence_frees_its_blocks_and_fails_alone_in_a_prefill_batch(prefill_node):
    """The decode side cancels one waiting request (its client left): kvxfer's Recv.cancel alone gives its blocks
    back (the prefill node had sent nothing: CANCEL_ACK), with no word from the router. When the prefill node gets
    the request anyway, in a batch with another, only that request fails (Cancelled) and the other decodes exactly
    as colocated."""
    ch, _ = prefill_node
    model, worker, peer = connect_decode(ch)
    batch = prompts()[:2]
    jobs = [{"xfer_id": i, "prompt": p, "dst_blocks": worker.admit(i, len(p), MAX_TOKENS, peer)}
            for i, p in enumerate(batch)]
    assert worker.cancel(0, "client disconnected")
    kept = len(worker.seqs[1].blocks)  # prompt + output blocks of the live sequence
    wait_for(lambda: (worker.step(), worker.cache.allocator.num_free == 256 - kept)[1],
             "the cancelled sequence's blocks freed", timeout_s=10)
    ch.send_json({"cmd": "prefill", "jobs": jobs})
    first = ch.recv_json(timeout_s=60)
    assert first["type"] == "first" and first["ok"], first
    worker.set_first_token(1, first["first_tokens"][1])
    kv = ch.recv_json(timeout_s=60)
    assert kv["errors"][0].startswith("Cancelled: transfer 0 to peer 'decode-test' was cancelled by the receiver")
    assert kv["errors"][1] is None and kv["free_blocks"] == 256
    out = []
    for _ in range(200):
        out += [t for seq_id, t, _ in worker.step() if seq_id == 1]
        if worker.seqs[1].state is SeqState.FINISHED:
            break
    assert out == colocated(model, batch)[1]
