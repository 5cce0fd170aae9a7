"""kvxfer-compare end to end: every library in real processes on loopback, bytes checked; the request's checks;
libraries that are missing or land bytes wrong are named."""
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

import kvxfer
from kvxfer.bench.compare import cli
from kvxfer.bench.compare.request import Request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS = os.path.join(ROOT, ".venv-peers", "bin", "python")
SMALL = ["--tokens", "64", "--layers", "2", "--iters", "2", "--small-iters", "3", "--timeout", "60", "--quiet"]
ENV = {**os.environ, "FI_TCP_IFACE": "lo", "UCX_NET_DEVICES": "lo"}


def compare(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kvxfer.bench.compare.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, check=False)


def peers_skip_reason(lib: str) -> str:
    if not os.path.exists(PEERS):
        return f"{PEERS} missing: scripts/setup_peers.sh makes it (KVXFER_SKIP_PEERS=1 was set, or it failed)"
    return cli.peer_library_missing(lib, PEERS)


# ---- the request both sides rebuild -----------------------------------------------------------------------------
def test_request_addresses_are_kvxfers_vllm_flash_layout():
    req = Request(num_layers=3, pool_blocks=8, req_blocks=4, block_tokens=2, kv_heads=2, head_dim=8)
    layout = kvxfer.KVLayout.vllm_flash(3, 8, 2, 2, 8, "bfloat16")
    bases = [1 << 20, 2 << 20, 3 << 20]
    src, _ = req.block_ids()
    got = req.chunk_addresses(bases, src).reshape(3, 2, 4)
    for layer in range(3):
        for plane in range(2):
            want = [bases[layer] + plane * layout.plane_stride + int(b) * layout.block_stride for b in src]
            assert got[layer, plane].tolist() == want
    assert req.chunk_index(src).reshape(3, 2, 4)[2, 1].tolist() == [2 * 16 + 8 + int(b) for b in src]


def landed(req: Request, blocks=None) -> list[np.ndarray]:
    """A destination pool as a correct transfer of `blocks` blocks leaves it."""
    src, dst = req.block_ids(blocks)
    pool = req.destination_pool()
    for layer, got in enumerate(pool):
        got.reshape(2, req.pool_blocks, -1)[:, dst] = req.source_layer(layer).reshape(2, req.pool_blocks, -1)[:, src]
    return pool


def test_verify_passes_exact_bytes_and_names_each_kind_of_wrong():
    req = Request(num_layers=2, pool_blocks=16, req_blocks=6, block_tokens=2, kv_heads=2, head_dim=8)
    assert req.verify(landed(req)) == ""
    assert req.verify(landed(req, 2), 2) == ""
    src, dst = req.block_ids()
    pool = landed(req)
    chunks = pool[1].reshape(2, req.pool_blocks, -1)
    chunks[1, [dst[0], dst[1]]] = chunks[1, [dst[1], dst[0]]]  # two V chunks swapped
    assert req.verify(pool).startswith(f"layer 1 V block {dst[0]}: not the bytes of source block {src[0]}")
    pool = landed(req)
    stray = next(b for b in range(req.pool_blocks) if b not in dst)
    pool[0].reshape(2, req.pool_blocks, -1)[0, stray, 3] = 1
    assert req.verify(pool) == "layer 0: bytes written outside the request's destination blocks"
    assert req.verify(pool, everywhere=False) == ""  # a request-only check ignores other blocks, by design
    pool = landed(req)
    req.clear(pool, 2)
    assert "layer 0 K block" in req.verify(pool, 2) and req.verify(pool, 2, everywhere=False) != ""


# ---- whole runs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over", ["tcp", "host"])
def test_kvxfer_is_measured_against_the_same_run_limit(over, tmp_path):
    out = tmp_path / "cmp.json"
    r = compare("--libraries", "kvxfer", "--over", over, "--json", str(out), *SMALL)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["kind"] == "compare" and doc["over"] == over and doc["not_run"] == {}
    (row,) = doc["rows"]
    assert row["library"] == "kvxfer" and row["verified"] and len(row["full_s"]) == 2
    assert row["path"] == ("tcp (tcp)" if over == "tcp" else "auto (cma)")
    assert row["ratio"] == pytest.approx(doc["limit"]["s"] / statistics.median(row["full_s"]))
    nbytes = Request(**doc["request"]).nbytes
    assert row["gbps"] == pytest.approx(nbytes / statistics.median(row["full_s"]) / 1e9)
    assert "kvxfer" in r.stdout and "limit:" in r.stdout


@pytest.mark.parametrize("lib", ["nixl", "mooncake"])
@pytest.mark.parametrize("layer_ms", [None, 1.0])
def test_peer_library_moves_every_byte(lib, layer_ms, tmp_path):
    why = peers_skip_reason(lib)
    if why:
        pytest.skip(why)
    out = tmp_path / "cmp.json"
    layers = [] if layer_ms is None else ["--layer-ms", str(layer_ms)]
    r = compare("--libraries", lib, "--peer-python", PEERS, "--json", str(out), *layers, *SMALL)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["library"] == lib and row["verified"] and row["version"] != "?"
    assert row["gbps"] > 0 and row["small_ms_p50"] > 0


def test_layer_by_layer_counts_from_the_last_layers_compute(tmp_path):
    out = tmp_path / "cmp.json"
    r = compare("--libraries", "kvxfer", "--layer-ms", "20", "--json", str(out), *SMALL)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert doc["layer_ms"] == 20 and doc["limit"]["name"].startswith("one TCP stream of the same bytes at ")
    req = Request(**doc["request"])  # the ideal: only the last layer's bytes move after the compute, at link speed
    assert doc["limit"]["s"] == pytest.approx(req.nbytes / doc["limit"]["gbps"] / 1e9 / req.num_layers)
    # Two layers of 20 ms emulated compute each: a request takes at least that from its start; what it exposes is
    # the rest (its total less the compute), and after the last layer's compute there is at most that much left.
    assert all(c >= 0.040 for c in row["compute_s"])
    for exposed, total, compute, tail in zip(row["full_s"], row["total_s"], row["compute_s"], row["tail_s"]):
        assert exposed == pytest.approx(total - compute) and 0 < tail <= exposed + 1e-6
    assert "exp. ms" in r.stdout and "layer by layer, 20 ms of compute per layer" in r.stdout


def test_a_library_not_installed_is_named_with_the_fix():
    r = compare("--libraries", "kvxfer,nixl", "--peer-python", sys.executable, *SMALL)
    assert r.returncode == 1
    assert f"nixl was asked for and is not importable by {sys.executable} (" in r.stderr
    assert "No module named 'nixl_cu13'" in r.stderr
    assert "pip install nixl-cu12 there, or give --peer-python" in r.stderr
    assert "kvxfer " in r.stdout  # the libraries that could run still ran


def test_all_leaves_out_what_is_not_installed_and_says_so():
    r = compare("--libraries", "all", "--peer-python", sys.executable, *SMALL)
    assert r.returncode == 0, r.stderr
    assert "nixl      not run:" in r.stdout and "mooncake  not run:" in r.stdout


def test_bytes_that_land_wrong_fail_the_library(tmp_path):
    # The raw TCP limit streams the bytes unplaced: checked as if it were a library, it must be caught.
    req = Request(num_layers=2, pool_blocks=8, req_blocks=4, block_tokens=2, kv_heads=2, head_dim=8)
    cmp = cli.Comparison(req, "tcp", 1, 1, 30.0, sys.executable, str(tmp_path), lambda line: None)
    with pytest.raises(cli.CompareError, match=r"limit: request 1 \(4 blocks\) landed wrong: layer 0 K block"):
        cmp.run_pair("limit", sys.executable, "drive_tcp.py", {}, ENV, verify=True)


def test_ideal_layer_by_layer_time_follows_the_slower_of_link_and_compute():
    req = Request(num_layers=4)
    assert cli.ideal_exposed_s(req, link_s=0.004, layer_s=0.010) == pytest.approx(0.001)  # link keeps up: 1 layer
    # link slower than compute (2 ms a layer against 1): all four layers' 8 ms from the first layer's end, less
    # the 3 ms of compute still to come then
    assert cli.ideal_exposed_s(req, link_s=0.008, layer_s=0.001) == pytest.approx(0.005)


@pytest.mark.parametrize("args, cause", [
    (["--libraries", "kvxfer,ucx"], "unknown ['ucx']"),
    (["--iters", "0"], "--iters 0 must be >= 1"),
    (["--over", "carrier-pigeon"], "invalid choice"),
    (["--layer-ms", "-1"], "--layer-ms -1.0 must be between 0 and 1000"),
    (["--option", "nixl=3"], "--option 'nixl=3': give LIB:KEY=VALUE"),
    (["--tokens", "64", "--block-size", "128"], ""),  # one block of 128 tokens: fine
])
def test_arguments(args, cause, capsys):
    if not cause:
        _, req, libs = cli.parse(args)
        assert (req.req_blocks, req.pool_blocks, libs) == (1, 2, ["kvxfer", "nixl", "mooncake"])
        return
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert cause in capsys.readouterr().err
