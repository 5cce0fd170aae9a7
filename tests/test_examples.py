"""The examples run as users run them, end to end, and verify their own bytes."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_two_process_example(transport):
    env = dict(os.environ, PYTHONPATH=ROOT, FI_TCP_IFACE="lo")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "two_process.py"), "--transport", transport],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "request 42 complete" in out.stdout and "verified" in out.stdout
