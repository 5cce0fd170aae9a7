"""kvxfer.preflight: a verified loopback request over the fabric, judged against a limit measured in the same run
(libfabric tcp and shm, UCX over lo: real agents in this process)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvxfer import errors, preflight
from tests.conftest import UCX
from tests.test_fallback import _fake_rdma_sysfs


@pytest.mark.parametrize("fabric,limit", [("tcp", "raw TCP over 127.0.0.1"), ("fi_shm", "memcpy"),
                                          pytest.param("ucx", "raw TCP over 127.0.0.1", marks=UCX.marks)])
def test_a_check_moves_verified_bytes_and_reports_the_ratio_to_its_limit(fabric, limit):
    c = preflight.check(fabric, "lo" if fabric != "fi_shm" else "", mib=8)
    # The verdict on speed is not this test's: 8 MiB on a loaded machine once came out at 0.075 of memcpy over
    # fi_shm (CI clean clone, 2026-12-02; 0.22-0.34 alone). Every byte verified is; the judging of a slow path is
    # test_a_path_ten_times_slower_than_its_limit_fails_naming_why's.
    assert c.ok or "10x slower than the limit" in c.why, c.line()
    assert c.nbytes == 8 << 20 and c.transport == fabric and c.limit == limit
    assert c.gbps > 0 and c.limit_gbps > 0 and c.ratio == pytest.approx(c.gbps / c.limit_gbps)
    assert c.ok == (c.ratio >= preflight.SLOW_RATIO) and c.ok == (c.why == "")
    assert c.line().startswith(f"{'ok  ' if c.ok else 'FAIL'} {fabric}") and "8 MiB verified" in c.line()


def test_a_path_ten_times_slower_than_its_limit_fails_naming_why():
    c = preflight.check("tcp", "lo", mib=4, limit_gbps=1e4, limit="a 80 Tb/s NIC")
    assert not c.ok
    assert "of a 80 Tb/s NIC: more than 10x slower than the limit" in c.why
    assert c.line().startswith("FAIL tcp on lo") and c.why in c.line()


def test_rdma_fabrics_get_one_check_per_nic_against_its_port_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("KVXFER_SYSFS", _fake_rdma_sysfs(tmp_path, software=True))
    assert preflight._interfaces("verbs", None) == [("mlx5_0", 25.0, "mlx5_0's port rate")]  # 200 Gb/s
    assert preflight._interfaces("efa", None) == [("mlx5_0-rdm", 25.0, "mlx5_0's port rate")]
    assert preflight._interfaces("verbs", "mlx5_1") == [("mlx5_1", 0.0, "")]  # named: that one
    assert preflight._interfaces("tcp", None) == [("", 0.0, "")]
    monkeypatch.setenv("KVXFER_SYSFS", str(tmp_path / "none"))
    assert preflight._interfaces("verbs", None) == [("", 0.0, "the NIC's port rate, which sysfs does not list")]


def test_the_verification_catches_corrupted_and_misplaced_blocks():
    nb, c = 4, 8
    rng = np.random.default_rng(1)
    src = [rng.integers(0, 256, 2 * nb * c, dtype=np.uint8)]
    src_ids, dst_ids = np.array([2, 0, 3, 1], np.int32), np.array([5, 1, 6, 2], np.int32)

    def delivered():
        dst = [np.full(2 * 2 * nb * c, 0xA5, np.uint8)]
        dst[0].reshape(2, 2 * nb, c)[:, dst_ids] = src[0].reshape(2, nb, c)[:, src_ids]
        return dst

    assert preflight._mismatch(src, delivered(), nb, c, src_ids, dst_ids) == ""
    dst = delivered()
    dst[0].reshape(2, 2 * nb, c)[1, 6, 3] ^= 1
    assert "addressed blocks differ" in preflight._mismatch(src, dst, nb, c, src_ids, dst_ids)
    dst = delivered()
    dst[0].reshape(2, 2 * nb, c)[0, 7, 0] = 0  # a guard block (7 is not addressed)
    assert "outside the addressed blocks changed" in preflight._mismatch(src, dst, nb, c, src_ids, dst_ids)


def test_the_cli_runs_the_default_fabric_and_writes_json(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "kvxfer", "preflight", "--mib", "4", "--json", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=root),
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok   "), out.stdout  # tcp on this machine (no efa/verbs)
    assert "preflight: " in out.stderr and ", 4 MiB ..." in out.stderr  # progress on stderr
    (check,) = json.loads((tmp_path / "p.json").read_text())
    assert check["ok"] and check["nbytes"] == 4 << 20 and check["transport"] in ("tcp", "verbs", "efa")


def test_a_bad_size_is_named():
    with pytest.raises(errors.InvalidArgument, match="mib=0: preflight moves 1 to 4096 MiB"):
        preflight.run(mib=0)


def test_an_agent_checks_its_own_fabric_and_nic():
    import kvxfer

    agent = kvxfer.Agent("preflight-self", transport="tcp", interface="lo", rails=2)
    (c,) = agent.preflight(mib=4)
    assert c.ok and c.transport == "tcp" and c.interface == "lo" and c.rails == 2 and c.nbytes == 4 << 20


def test_an_agents_failed_preflight_raises_naming_the_check(monkeypatch):
    import kvxfer

    real = preflight.check
    monkeypatch.setattr(preflight, "check", lambda *a, **k: real(*a, **k, limit_gbps=1e4, limit="a 80 Tb/s NIC"))
    with pytest.raises(errors.TransportUnavailable, match=r"preflight failed: FAIL tcp on lo .*more than 10x slower"):
        kvxfer.Agent("preflight-slow", transport="tcp", interface="lo").preflight(mib=4)
