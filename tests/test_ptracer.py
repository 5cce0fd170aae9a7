"""KVXFER_PTRACER and Yama's ptrace_scope (csrc/transports/host_ipc/cma.cpp, kvxfer/info.py). Under ptrace_scope 1
(Ubuntu's default) a process reaches only its descendants by CMA and pidfd_getfd, so a prefill and a decode worker
launched apart fall back to the fabric; KVXFER_PTRACER=any lets processes of the user reach them. This machine has
no Yama: the scope is stood in for where info reads it; the setting itself is checked by name and by a transfer."""
import pytest

import kvxfer
from kvxfer import _C, errors, info
from tests.conftest import assert_exact_transfer
from tests.reference import make_pool


def test_an_unknown_ptracer_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("KVXFER_PTRACER", "everyone")
    with pytest.raises(errors.InvalidArgument, match="KVXFER_PTRACER=everyone: use off .default. or any"):
        kvxfer.Agent("ptracer-bad", transport="tcp", interface="lo")


def test_agents_that_allow_any_tracer_still_move_exact_bytes(monkeypatch):
    monkeypatch.setenv("KVXFER_PTRACER", "any")
    layout = kvxfer.KVLayout.contiguous(4, 4096)
    a = kvxfer.Agent("ptracer-a", transport="tcp", interface="lo")
    b = kvxfer.Agent("ptracer-b", transport="tcp", interface="lo")
    src, dst = make_pool(layout, 1), make_pool(layout, 2)
    a.register_pool(src, layout)
    b.register_pool(dst, layout)
    pb, pa = a.add_peer(b.metadata()), b.add_peer(a.metadata())
    a.wait_connected(pb, 20)
    b.wait_connected(pa, 20)
    assert_exact_transfer(a, b, pb, pa, src, dst, layout, 1, [0, 3], [1, 2])
    a.close()
    b.close()


@pytest.mark.parametrize("scope, ptracer, says", [
    (-1, "off", "works between processes of this user here"),
    (0, "off", "works between processes of this user here"),
    (1, "off", ("from a parent to its children only (Yama ptrace_scope=1): same-host peers launched apart fall back "
                "to the fabric unless each runs with KVXFER_PTRACER=any")),
    (1, "any", "KVXFER_PTRACER=any lets them reach this one"),
    (2, "off", "only with CAP_SYS_PTRACE (Yama ptrace_scope=2)"),
])
def test_info_says_between_which_processes_cma_works(monkeypatch, scope, ptracer, says):
    """info's CMA probe reaches a child, which ptrace_scope 1 allows where it refuses siblings: the line says so."""
    monkeypatch.setattr(_C, "yama_ptrace_scope", lambda: scope)
    monkeypatch.setenv("KVXFER_PTRACER", ptracer)
    ok, line = info._cma_status()
    assert ok and says in line, line


def test_this_machine_reports_its_real_ptrace_scope():
    scope = _C.yama_ptrace_scope()
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            want = int(f.read())
    except OSError:
        want = -1
    assert scope == want
