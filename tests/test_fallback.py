"""kvxfer.fallback: a peer on another host is refused when the transport was left to kvxfer and the NIC would not
carry it (tcp opened, or ucx gave it no RDMA lane) although this host has an RDMA NIC.

This VM has no RDMA device, so the host "has" one through a fake sysfs (KVXFER_SYSFS); the peer is a real agent in
another process, "on another host" through a UTS namespace of its own (tests/peer.py), over libfabric tcp or UCX
on loopback."""
import logging
import os

import numpy as np
import pytest

import kvxfer
from kvxfer import errors, fallback, topology
from tests.conftest import UCX, another_host, assert_exact_from_remote, assert_remote_send_fails_at_once, connect
from tests.reference import PRESETS, make_pool


def _fake_rdma_sysfs(root, software=False):
    """mlx5_0 (mlx5_core, ports at 200 and 100 Gb/s) on a PCI function; with software=True also rxe0 with no PCI
    position (soft RoCE: no faster than tcp)."""
    dev = root / "devices" / "pci0000:00" / "0000:00:01.0" / "0000:01:00.0"
    (dev / "driver_dir").mkdir(parents=True)
    (root / "bus" / "pci" / "drivers" / "mlx5_core").mkdir(parents=True)
    os.symlink(root / "bus" / "pci" / "drivers" / "mlx5_core", dev / "driver")
    (dev / "numa_node").write_text("1\n")
    ib = root / "class" / "infiniband" / "mlx5_0"
    for port, rate in (("1", "200 Gb/sec (2X NDR)"), ("2", "100 Gb/sec (4X EDR)")):
        (ib / "ports" / port).mkdir(parents=True)
        (ib / "ports" / port / "rate").write_text(rate + "\n")
    os.symlink(dev, ib / "device")
    if software:
        (root / "class" / "infiniband" / "rxe0" / "ports" / "1").mkdir(parents=True)
    return str(root)


def test_rdma_nics_reads_driver_and_fastest_port_and_leaves_out_software_devices(tmp_path):
    nics = topology.rdma_nics(_fake_rdma_sysfs(tmp_path, software=True))
    assert nics == [topology.RdmaNic("mlx5_0", "mlx5_core", 200.0, 1)]
    assert str(nics[0]) == "mlx5_0 (mlx5_core, 200 Gb/s)"
    assert topology.rdma_nics(str(tmp_path / "nothing")) == []


def test_a_fabric_is_a_fallback_only_when_kvxfer_chose_tcp_on_a_host_with_rdma_nics(tmp_path):
    nics = topology.rdma_nics(_fake_rdma_sysfs(tmp_path))
    why = fallback.fabric_reason("auto", "tcp;ofi_rxm", nics)
    assert "mlx5_0 (mlx5_core, 200 Gb/s)" in why and "transport=auto opened tcp" in why
    assert "verbs:" in why and "efa:" in why  # what libfabric said about each RDMA provider here
    assert fallback.fabric_reason("tcp", "tcp;ofi_rxm", nics) == ""  # named by the user: their choice
    assert fallback.fabric_reason("auto", "verbs;ofi_rxm", nics) == ""
    assert fallback.fabric_reason("auto", "tcp;ofi_rxm", []) == ""


def test_ucx_lanes_are_a_fallback_only_without_an_rdma_transport(tmp_path):
    nics = topology.rdma_nics(_fake_rdma_sysfs(tmp_path))
    assert "no RDMA lane (ucx lanes: tcp/eth0 (am, keepalive))" in fallback.ucx_reason(
        "ucx lanes: tcp/eth0 (am, keepalive)", nics)
    for lanes in ("ucx lanes: rc_mlx5/mlx5_0:1 (am, rma), tcp/eth0 (keepalive)", "ucx lanes: dc_mlx5/mlx5_0:1 (rma)",
                  "ucx lanes: rc_verbs/mlx5_0:1 (am, rma)", "ucx lanes: ud_verbs/mlx5_0:1 (am)"):
        assert fallback.ucx_reason(lanes, nics) == "", lanes
    assert fallback.ucx_reason("ucx lanes: tcp/eth0 (am)", []) == ""


def test_refuse_is_the_default_and_a_bad_mode_is_named(monkeypatch):
    monkeypatch.delenv("KVXFER_FALLBACK")  # conftest allows it for the rest of the suite
    assert kvxfer.Agent(interface="lo")._fallback_mode == "refuse"
    with pytest.raises(errors.InvalidArgument, match="fallback='sometimes'.*'refuse'.*'allow'"):
        kvxfer.Agent(fallback="sometimes")
    monkeypatch.setenv("KVXFER_FALLBACK", "yes")
    with pytest.raises(errors.InvalidArgument, match="KVXFER_FALLBACK='yes'"):
        kvxfer.Agent()


def _refused(transport, remote, seed):
    another_host(remote, "rdma-elsewhere")
    with pytest.raises(errors.SlowFallback) as info:
        connect(transport, remote, "vllm_flash", seed)
    return str(info.value)


@pytest.mark.parametrize("transport", ["auto", UCX])
def test_a_peer_on_another_host_is_refused_when_tcp_would_carry_it_past_an_rdma_nic(transport, remote, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("KVXFER_SYSFS", _fake_rdma_sysfs(tmp_path))
    monkeypatch.setenv("KVXFER_FALLBACK", "refuse")  # the default (conftest allows it for the other tests)
    message = _refused(transport, remote, seed=71)
    assert "peer peer-sender is on another host and would be reached over TCP" in message
    assert "mlx5_0 (mlx5_core, 200 Gb/s)" in message
    assert "fallback='allow'" in message and "KVXFER_FALLBACK=allow" in message and "transport='tcp'" in message
    assert ("no RDMA lane (ucx lanes: tcp/lo" in message if transport == "ucx" else "verbs:" in message), message
    assert isinstance(kvxfer.errors.SlowFallback("x"), errors.TransportUnavailable)


@pytest.mark.parametrize("order,rails", [("peer_added_us_first", 1), ("peer_adds_us_after", 1),
                                         ("peer_adds_us_after", 2)])
def test_a_refused_peer_is_not_kept_and_its_sends_fail_naming_the_refusal(order, rails, remote, tmp_path,
                                                                          monkeypatch):
    """The refusal drops the peer it added and says BYE ("refused") once the peer's HELLO arrives (on every rail),
    whether the peer had added this agent already or does so after the refusal: its send fails at once, naming why,
    instead of waiting out its handshake; nothing is written here."""
    monkeypatch.setenv("KVXFER_SYSFS", _fake_rdma_sysfs(tmp_path))
    monkeypatch.setenv("KVXFER_FALLBACK", "refuse")
    another_host(remote, "rdma-elsewhere")
    agent = kvxfer.Agent("test-receiver", interface="lo", timeout_s=10, rails=rails)
    layout = PRESETS["vllm_flash"]()
    dst = make_pool(layout, 6)
    before = [x.copy() for x in dst]
    agent.register_pool(dst, layout)
    md = remote.call("init", ("tcp", "vllm_flash", 5, [], rails, {"timeout_s": 30}))
    if order == "peer_added_us_first":
        remote.call("add_peer", agent.metadata())
    with pytest.raises(errors.SlowFallback):
        agent.add_peer(md)
    assert agent._peers == {}
    if order == "peer_adds_us_after":
        remote.call("add_peer", agent.metadata())
    assert_remote_send_fails_at_once(remote, "refused this agent as a peer: it would reach this host over TCP")
    for got, want in zip(dst, before):
        np.testing.assert_array_equal(got, want)
    assert agent.stats()["imms_received"] == 0


def test_fallback_allow_connects_moves_exact_bytes_and_says_why(remote, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KVXFER_SYSFS", _fake_rdma_sysfs(tmp_path))
    monkeypatch.setenv("KVXFER_FALLBACK", "allow")
    another_host(remote, "rdma-elsewhere")
    with caplog.at_level(logging.WARNING, logger="kvxfer.fallback"):
        agent, peer, layout, dst, _ = connect("auto", remote, "vllm_flash", 72)
    assert not peer.same_host and peer.path == "tcp"
    assert "mlx5_0" in agent.fallback_reason and "opened tcp" in agent.fallback_reason
    assert any("reaches peer peer-sender over TCP although this host has RDMA NIC(s) mlx5_0" in r.getMessage()
               for r in caplog.records)
    assert_exact_from_remote(agent, peer, remote, layout, dst, 72, 1, [0, 3, 5], [6, 1, 2])


@pytest.mark.parametrize("case", ["named_tcp", "same_host", "no_rdma_nic"])
def test_no_refusal_where_tcp_is_no_fallback(case, remote, tmp_path, monkeypatch):
    """tcp named by the user, a same-host peer (cma, not the NIC), or a host without RDMA NICs: connects."""
    monkeypatch.setenv("KVXFER_FALLBACK", "refuse")
    if case != "no_rdma_nic":
        monkeypatch.setenv("KVXFER_SYSFS", _fake_rdma_sysfs(tmp_path))
    if case != "same_host":
        another_host(remote, "plain-elsewhere")
    agent, peer, layout, dst, _ = connect("tcp" if case == "named_tcp" else "auto", remote, "vllm_flash", 73)
    assert peer.same_host == (case == "same_host")
    # same host: this agent's fabric is still a fallback for peers elsewhere, but this peer does not use it
    assert bool(agent.fallback_reason) == (case == "same_host")
    assert_exact_from_remote(agent, peer, remote, layout, dst, 73, 1, [1, 2], [4, 0])


@pytest.mark.parametrize("mode", ["refuse", "allow"])
def test_info_lists_the_rdma_nics_and_what_auto_does_with_peers_elsewhere(mode, tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, KVXFER_SYSFS=_fake_rdma_sysfs(tmp_path), KVXFER_FALLBACK=mode)
    out = subprocess.run([sys.executable, "-m", "kvxfer", "info"], capture_output=True, text=True, timeout=60,
                         env=env, check=True).stdout
    line = next(x.strip() for x in out.splitlines() if x.strip().startswith("RDMA NICs:"))
    assert line.startswith("RDMA NICs: mlx5_0 (mlx5_core, 200 Gb/s), but neither efa nor verbs opens"), line
    assert ("add_peer refuses them (SlowFallback" in line) == (mode == "refuse"), line
    assert ("they go over tcp and the agent logs why" in line) == (mode == "allow"), line
    assert "NICs with a PCI position: mlx5_0 (rdma)" in out  # the topology read from the same sysfs
