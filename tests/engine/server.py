"""A router with its nodes, started as real processes on loopback for the engine tests (tiny model, tcp)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


class Server:
    def __init__(self, mode, *extra, timeout_s=20):
        self.proc = subprocess.Popen([sys.executable, "-m", "kvxfer.engine.router", "--mode", mode, "--spawn",
                                      "--http", "127.0.0.1:0", "--model", "tiny", "--transport", "tcp",
                                      "--timeout", str(timeout_s), *extra], stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "FI_TCP_IFACE": "lo"})
        self.pids, self.node_addr = {}, None
        for line in self.proc.stdout:
            if line.startswith("router: nodes on"):
                self.node_addr = line.split()[-1]  # where a replacement node connects
            if line.startswith("router: spawned"):
                self.pids = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
            if line.startswith("router: ready"):
                self.url = line.split()[2]
                return
        self.close()
        raise RuntimeError("router exited before it was ready")

    def post(self, body, timeout=120):
        req = urllib.request.Request(self.url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path):
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stats(self):
        return json.loads(self.get("/stats")[1])

    def wait_for(self, cond, what, timeout_s=60):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if cond():
                return
            time.sleep(0.05)
        raise AssertionError(f"{what}: not within {timeout_s}s; /stats: {self.stats()}")

    def blocks_all_free(self, role):
        b = self.stats()["nodes"].get(role)
        return b is not None and b["free_blocks"] == b["num_blocks"]

    def node_alive(self, role):
        try:
            with open(f"/proc/{self.pids[role]}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid in self.pids.values():
            for sig in (signal.SIGCONT, signal.SIGKILL):  # a test may have stopped a node
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
