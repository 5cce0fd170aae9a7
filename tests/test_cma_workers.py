"""Same-host copies of 1 MiB and more run on CMA worker threads (cma_threads >= 2): a layer's copy is cut into
parts of about equal bytes (an op larger than a part is itself cut), several ready layers are queued at once, and
a send that fails while a copy still writes into the receiver sends its ABORT only after that copy landed, so the
receiver never reuses blocks a late byte could still overwrite."""
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import KVLayout, errors
from tests.conftest import assert_exact_transfer, local_pair


def big_layout():
    # 4 layers x 64 blocks of 32 KiB per plane (16 tokens x 8 heads x 128 dims fp16): 4 MiB per layer and plane
    return KVLayout.vllm_flash(4, 64, 16, 8, 128, "float16")


@pytest.mark.parametrize("threads", [2, 3])
def test_large_layers_are_copied_by_the_workers_exactly(threads):
    layout = big_layout()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "cma", (f"cmaw-s{threads}", f"cmaw-r{threads}"),
                                                sender_kwargs={"cma_threads": threads})
    assert a.cma_threads == threads and peer_b.path == "cma"
    rng = np.random.default_rng(threads)
    for i in range(3):
        src_ids = rng.choice(64, 40, replace=False).astype(np.int32)  # 2.5 MiB per layer: on the workers
        dst_ids = rng.choice(64, 40, replace=False).astype(np.int32)
        assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, i, src_ids, dst_ids)
    assert a.stats()["cma_jobs"] == 3 * layout.num_layers


def test_one_write_larger_than_a_part_is_cut_between_threads():
    layout = KVLayout.contiguous(8, 4 << 20)  # consecutive blocks merge into one 12 MiB write
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "cma", ("cmaw-split-s", "cmaw-split-r"),
                                                sender_kwargs={"cma_threads": 3})
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1,
                          np.array([1, 2, 3], np.int32), np.array([4, 5, 6], np.int32))
    assert a.stats()["cma_jobs"] == 1


def test_staged_copy_out_runs_on_the_workers():
    """GPU sources on the same host go source -> bounce slot -> CMA: the copy-out of each 1 MiB slot is a job,
    several slots ahead; a 3-slot ring turns over many times and the bytes stay exact."""
    layout = big_layout()
    ring = {"staging": "always", "staging_slot_bytes": 1 << 20, "staging_slots": 3, "cma_threads": 2}
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "cma", ("cmaw-staged-s", "cmaw-staged-r"),
                                                sender_kwargs=ring)
    rng = np.random.default_rng(8)
    src_ids = rng.choice(64, 48, replace=False).astype(np.int32)
    dst_ids = rng.choice(64, 48, replace=False).astype(np.int32)
    assert a.path_to(peer_b)[0] == "staged"
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1, src_ids, dst_ids)
    assert a.stats()["cma_jobs"] == 4 * 3  # 3 MiB per layer in 1 MiB slots


def test_small_layers_stay_on_the_progress_thread():
    layout = big_layout()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "cma", ("cmaw-small-s", "cmaw-small-r"),
                                                sender_kwargs={"cma_threads": 2})
    # 4 blocks x 2 planes x 32 KiB = 256 KiB per layer: below 1 MiB, a hand-off costs more than it saves
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 1,
                          np.array([0, 9, 8, 63], np.int32), np.array([5, 6, 7, 1], np.int32))
    assert a.stats()["cma_jobs"] == 0


def test_abort_waits_for_copies_still_writing_into_the_receiver():
    """Abort right after marking every layer, while the workers still copy: once the receiver hears the transfer
    is over it overwrites the blocks; a copy that landed later would show in them."""
    layout = big_layout()
    a, b, peer_b, peer_a, src, dst = local_pair(layout, "cma", ("cmaw-abort-s", "cmaw-abort-r"),
                                                sender_kwargs={"cma_threads": 2})
    ids = np.arange(64, dtype=np.int32)  # every block: 4 MiB per layer and plane, 32 MiB in all
    aborted = 0
    for i in range(12):
        recv = b.recv(peer_a, i, ids)
        send = a.send(peer_b, i, ids, ids)
        send.all_ready()
        time.sleep(0.0002 * (i % 6))  # 0-1 ms: lands the abort before, during and (rarely) after the copies
        send.abort("client went away")
        try:
            send.wait(timeout_s=30)  # the copies won the race: the transfer completed, nothing to reclaim
        except errors.TransferFailed as e:
            assert "client went away" in str(e)
            aborted += 1
        deadline = time.monotonic() + 30
        while not recv.writes_over:
            assert time.monotonic() < deadline, "the receiver never learned the aborted transfer's writes are over"
            time.sleep(0.001)
        for layer in dst:
            layer.fill(0xA5)  # the decode worker reuses the blocks for the next request
        time.sleep(0.03)  # longer than a 32 MiB copy takes here
        for layer in dst:
            assert np.all(layer == 0xA5), f"abort {i}: bytes of the aborted transfer landed after it was over"
    assert a.stats()["aborts_deferred"] > 0  # the case under test happened: some ABORTs waited for a copy
    deadline = time.monotonic() + 30
    while a.stats()["slots_reclaimed"] != aborted:  # each ABORT_ACK is on its way back
        assert time.monotonic() < deadline, f"{a.stats()['slots_reclaimed']} of {aborted} slots handed back"
        time.sleep(0.01)
    assert b.stats()["slot_violations"] == 0
    rng = np.random.default_rng(5)
    assert_exact_transfer(a, b, peer_b, peer_a, src, dst, layout, 100, rng.permutation(64).astype(np.int32)[:48],
                          rng.permutation(64).astype(np.int32)[:48])


def test_cma_threads_are_checked(monkeypatch):
    with pytest.raises(errors.InvalidArgument, match="cma_threads=65"):
        kvxfer.Agent("cmaw-bad", transport="cma", interface="lo", cma_threads=65)
    monkeypatch.setenv("KVXFER_CMA_THREADS", "many")
    with pytest.raises(errors.InvalidArgument, match="KVXFER_CMA_THREADS='many' is not an integer"):
        kvxfer.Agent("cmaw-bad", transport="cma", interface="lo")
    monkeypatch.setenv("KVXFER_CMA_THREADS", "1")
    assert kvxfer.Agent("cmaw-one", transport="cma", interface="lo").cma_threads == 0  # 1: the progress thread
    monkeypatch.setenv("KVXFER_CMA_THREADS", "3")
    assert kvxfer.Agent("cmaw-three", transport="cma", interface="lo").cma_threads == 3


@pytest.mark.parametrize("value, says", [("3", "copies of >= 1 MiB on 3 worker threads"),
                                         ("0", "copies on the progress thread"),
                                         ("x", "KVXFER_CMA_THREADS='x' is not an integer")])
def test_info_says_where_cma_copies_run(value, says):
    import os
    import subprocess
    import sys

    env = dict(os.environ, KVXFER_CMA_THREADS=value)
    out = subprocess.run([sys.executable, "-m", "kvxfer", "info"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    cma = [line for line in out.stdout.splitlines() if line.split()[1:2] == ["cma"]]
    assert len(cma) == 1 and says in cma[0], out.stdout
