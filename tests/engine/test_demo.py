"""kvxfer-demo end to end in reduced size: both deployments serve the same workload and agree token for token."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="torch not installed (scripts/setup.sh installs torch==2.13.0)")

from kvxfer.engine import workload  # noqa: E402


def run_demo(tmp_path, *flags):
    out = tmp_path / "demo.json"
    r = subprocess.run([sys.executable, "-m", "kvxfer.engine.demo", "--requests", "4", "--rate", "4", "--model", "tiny",
                        "--json", str(out), *flags], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "FI_TCP_IFACE": "lo"})
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["tokens_match"] is True and doc["schema"] == 2
    for mode in ("disagg", "colocated"):
        s = doc[mode]
        assert s["completed"] == 4 and s["failed"] == 0
        assert s["ttft_p50"] > 0 and s["tpot_p99"] >= s["tpot_p50"] > 0
        rows = doc["per_request"][mode]  # every request's own numbers agree with the summary built from them
        assert len(rows) == 4 and all(len(row["gaps_ms"]) == row["tokens"] - 1 for row in rows)
        assert max(row["tpot_ms"] for row in rows) >= 1000 * s["tpot_p99"] - 0.01
        for row in rows:
            assert row["tpot_ms"] == pytest.approx(sum(row["gaps_ms"]) / len(row["gaps_ms"]), abs=0.05)
        gaps = sorted(g for row in rows for g in row["gaps_ms"])  # the ITL summary is over every request's gaps
        assert gaps[0] - 0.01 <= 1000 * s["itl_p50"] <= 1000 * s["itl_p99"] <= gaps[-1] + 0.01
    assert doc["disagg"]["kv_bytes"] > 0 and doc["colocated"]["kv_bytes"] == 0
    assert 0 <= doc["disagg"]["kv_exposed_share"] < 1
    assert "greedy outputs identical in both deployments: True" in r.stdout
    assert f"network: {doc['network']['kind']}" in r.stdout
    return doc, r


def tcp_paths(net):
    # small requests written directly, larger ones packed into landing slots (chunks under 32 KiB over tcp)
    return {f"kvxfer tcp, path {p} ({net})" for p in ("fabric", "staged", "fabric+staged")}


def test_demo_reduced_run_on_loopback(tmp_path):
    doc, _ = run_demo(tmp_path, "--net", "loopback")
    assert doc["network"]["kind"] == "loopback" and doc["disagg"]["transport"] in tcp_paths("loopback")


def netns_names():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2")
def test_demo_reduced_run_across_two_network_namespaces(tmp_path):
    """The KV crosses a veth pair between two namespaces; both are gone afterwards."""
    before = netns_names()
    doc, r = run_demo(tmp_path, "--net", "netns")
    assert doc["network"]["kind"] == "netns" and "veth" in doc["network"]["detail"]
    assert doc["disagg"]["transport"] in tcp_paths("netns")
    left = {n.split()[0] for n in netns_names().splitlines() if n} - {n.split()[0] for n in before.splitlines() if n}
    assert not left, f"namespaces left behind: {left}"


def test_demo_refuses_a_role_without_its_router():
    r = subprocess.run([sys.executable, "-m", "kvxfer.engine.demo", "--role", "decode"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--role decode needs --connect" in r.stderr


def test_workload_generator_and_replay(tmp_path):
    items = workload.generate(200, rate=5.0, scale=0.1, seed=1)
    arrivals = [w.arrival_s for w in items]
    assert arrivals == sorted(arrivals) and 30 < arrivals[-1] < 50  # ~200 / 5 per second
    mean_isl = sum(len(w.prompt) for w in items) / len(items)
    assert 300 < mean_isl < 600  # 4500 * 0.1, clipped below at 4
    path = tmp_path / "w.jsonl"
    path.write_text('{"arrival_s": 0.5, "prompt": "b", "max_tokens": 3}\n{"arrival_s": 0.1, "prompt": "a", "max_tokens": 2}\n')
    assert [w.prompt for w in workload.load_jsonl(str(path))] == ["a", "b"]
    path.write_text('{"arrival_s": 0.5}\n')
    with pytest.raises(Exception, match="w.jsonl:1: expected"):
        workload.load_jsonl(str(path))


def test_lognormal_lengths_keep_the_seeds_moments_without_a_pile_at_the_minimum():
    """The default lengths have the seeds' mean and sd (x scale); the clipped normal put ~16% at 2 output tokens."""
    import numpy as np

    items = workload.generate(4000, rate=5.0, scale=0.1, seed=3, max_prompt=10_000, max_output=10_000)
    isl = np.array([len(w.prompt) for w in items])
    osl = np.array([w.max_tokens for w in items])
    assert abs(isl.mean() - 450) < 25 and abs(isl.std() - 350) < 40
    assert abs(osl.mean() - 75) < 5 and abs(osl.std() - 75) < 12
    assert (osl <= 2).mean() < 0.01 and (isl <= 4).mean() < 0.01
    old = workload.generate(4000, rate=5.0, scale=0.1, seed=3, lengths="normal")
    assert np.mean([w.max_tokens == 2 for w in old]) > 0.12  # what the old default did
    with pytest.raises(Exception, match="lengths='uniform'"):
        workload.generate(4, rate=1.0, scale=0.1, lengths="uniform")


def test_node_cpu_pinning():
    """--cpus pins a node to CPUs it may use (named errors otherwise); --pin auto splits the CPUs between the
    disaggregated nodes, disjoint and covering all of them."""
    import os

    from kvxfer.engine.demo import node_cpus
    from kvxfer.engine.node import parse_cpus

    allowed = sorted(os.sched_getaffinity(0))
    assert parse_cpus(str(allowed[0])) == {allowed[0]}
    assert parse_cpus(f"{allowed[0]}-{allowed[-1]}") >= set(allowed)
    with pytest.raises(SystemExit, match="may run on CPUs"):
        parse_cpus(str(max(allowed) + 1000))
    with pytest.raises(SystemExit, match="use CPU ids"):
        parse_cpus("one")
    assert node_cpus("off") is None
    split = node_cpus("auto")
    if len(allowed) < 2:
        assert split is None
    else:
        pre, dec = (set(map(int, split[r].split(","))) for r in ("prefill", "decode"))
        assert pre and dec and not pre & dec and pre | dec == set(allowed)
