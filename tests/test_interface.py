"""Agent(interface=...): the fabric opens on the named interface, and only there. libfabric 1.17's tcp provider does
not filter by the domain name kvxfer asks for (it lists eth0 first), so before 2026-12-02 interface="lo" opened eth0
unless FI_TCP_IFACE was also set: this runs without it."""
import os
import subprocess
import sys

import pytest

import kvxfer
from kvxfer import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_LISTENERS = """
import json, os, subprocess, kvxfer
agent = kvxfer.Agent("iface", transport="tcp", interface={iface!r})
ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
mine = [line.split()[3] for line in ss.splitlines() if f"pid={{os.getpid()}}," in line]
print(json.dumps({{"domain": agent.domain, "listening": mine}}))
"""


def _open_without_fi_tcp_iface(iface: str) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k != "FI_TCP_IFACE"}
    out = subprocess.run([sys.executable, "-c", _LISTENERS.format(iface=iface)], capture_output=True, text=True,
                         timeout=60, env=dict(env, PYTHONPATH=ROOT), check=True)
    return json.loads(out.stdout)


def test_interface_lo_opens_the_tcp_fabric_on_loopback_only():
    if subprocess.run(["which", "ss"], capture_output=True, check=False).returncode:
        pytest.skip("needs ss (iproute2) to list the agent's listening sockets")
    got = _open_without_fi_tcp_iface("lo")
    assert got["domain"] == "lo"
    assert got["listening"] and all(addr.startswith(("127.0.0.1:", "[::1]:")) for addr in got["listening"]), got


def test_an_interface_the_provider_does_not_offer_is_named_with_the_ones_it_does():
    with pytest.raises(errors.TransportUnavailable, match=r"tcp;ofi_rxm has no domain named 'nosuch0' \(it offers: "
                                                          r"[^)]*\blo\b[^)]*\); pass one of those as interface="):
        kvxfer.Agent(transport="tcp", interface="nosuch0")


def test_the_domain_says_what_the_fabric_opened():
    assert kvxfer.Agent(transport="tcp", interface="lo").domain == "lo"
    assert kvxfer.Agent(transport="fi_shm").domain == "shm"


def test_info_lists_the_domains_an_interface_may_name():
    from tests.conftest import info_line

    env = {k: v for k, v in os.environ.items() if k != "FI_TCP_IFACE"}
    out = subprocess.run([sys.executable, "-m", "kvxfer", "info"], capture_output=True, text=True, timeout=60,
                         env=dict(env, PYTHONPATH=ROOT), check=True).stdout
    line = next(x for x in out.splitlines() if x.split()[1:2] == ["tcp"])
    domains = line.split("domains (Agent(interface=...)): ")[1].split(";")[0].split(", ")
    assert "lo" in domains, line
    # the tcp provider pinned by FI_TCP_IFACE offers only that interface, and info says so
    assert "domains (Agent(interface=...)): lo;" in info_line("tcp", FI_TCP_IFACE="lo")
