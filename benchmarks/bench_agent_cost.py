"""What opening an agent costs: time and resident memory per agent, with kvxfer's rxm buffer size and libfabric's.

    .venv/bin/python benchmarks/bench_agent_cost.py [--transports tcp,cma,fi_shm,ucx] [--agents 32] [--json PATH]

For each transport, two fresh processes: one with kvxfer's default (FI_OFI_RXM_BUFFER_SIZE unset, so kvxfer sets 1024)
and one with libfabric's own default (16384) set before import. Each opens --agents agents one after another
(every agent's progress thread running, as in a process serving many peers), reports the median and worst time of
one Agent(...) call and the process's RSS growth per agent, then connects them all both ways to one more agent and
reports how long that took. The libfabric default is the baseline measured in the same run; ucx and fi_shm do not use
rxm and show what the setting does not touch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"kvxfer": None, "libfabric": "16384"}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def child(transport: str, n: int) -> dict:
    import kvxfer

    receiver = kvxfer.Agent("cost-receiver", transport=transport, interface="lo",
                            max_peers=max(32, 1 << n.bit_length()))
    base, times, agents = rss_mib(), [], []
    for i in range(n):
        t0 = time.perf_counter()
        agents.append(kvxfer.Agent(f"cost-{i}", transport=transport, interface="lo"))
        times.append(time.perf_counter() - t0)
    grown = rss_mib() - base
    t0 = time.perf_counter()
    pairs = [(a, a.add_peer(receiver.metadata()), receiver.add_peer(a.metadata())) for a in agents]
    for a, to_r, at_r in pairs:
        a.wait_connected(to_r, 60)
        receiver.wait_connected(at_r, 60)
    connect_s = time.perf_counter() - t0
    return {"create_ms_p50": 1e3 * statistics.median(times), "create_ms_max": 1e3 * max(times),
            "rss_mib_per_agent": grown / n, "connect_s": connect_s,
            "rxm_buffer_size": os.environ.get("FI_OFI_RXM_BUFFER_SIZE")}


def run_child(transport: str, n: int, setting: str | None) -> dict:
    env = dict(os.environ, FI_TCP_IFACE="lo", UCX_NET_DEVICES="lo", PYTHONPATH=ROOT)
    env.pop("FI_OFI_RXM_BUFFER_SIZE", None)
    if setting:
        env["FI_OFI_RXM_BUFFER_SIZE"] = setting
    proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--child", transport, "--agents", str(n)],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{transport} child (FI_OFI_RXM_BUFFER_SIZE={setting}) exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default="tcp,cma,fi_shm,ucx")
    ap.add_argument("--agents", type=int, default=32)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", metavar="TRANSPORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.agents)))
        return 0
    rows = []
    for transport in args.transports.split(","):
        for label, setting in SETTINGS.items():
            print(f"[{transport}] {args.agents} agents, rxm buffers {setting or 'kvxfer default'} ...", flush=True)
            rows.append({"transport": transport, "setting": label, "agents": args.agents,
                         **run_child(transport, args.agents, setting)})
    print(f"\n{'transport':10} {'rxm buffers':>12} {'create p50':>11} {'create max':>11} {'RSS/agent':>10} "
          f"{'vs libfabric':>12} {'connect all':>12}")
    for row in rows:
        base = next(r for r in rows if r["transport"] == row["transport"] and r["setting"] == "libfabric")
        buf = row["rxm_buffer_size"] or "-"
        print(f"{row['transport']:10} {buf:>12} {row['create_ms_p50']:9.1f}ms {row['create_ms_max']:9.1f}ms "
              f"{row['rss_mib_per_agent']:7.1f}MiB {row['rss_mib_per_agent'] / base['rss_mib_per_agent']:11.2f}x "
              f"{row['connect_s']:10.2f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
