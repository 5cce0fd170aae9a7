"""Output: a terminal table, a progress bar, and files: JSON (schema 1), CSV, PNG plot.

JSON schema 1: {"schema": 1, "kvxfer": version, "created": ISO time, "host": name, "records": [record, ...]}.
Each record has at least: transport, path, provider, rails, pattern, model, nbytes, blocks, depth, iterations,
writes_per_transfer, gbps, msgs_per_s, p50_us, p99_us, limit, limit_gbps, ratio, verified (since 2026-12-02 also
writes_per_s, the fabric writes posted per second, and domain, the NIC or interface the sender's fabric opened);
layerwise records add
layer_delay_ms, compute_ms and exposed_p50_us (transfer time left after the last layer was marked ready); src_mem and
dst_mem say where the pools lived (cpu or cuda:N; absent in files from before GPU pools, meaning cpu).
"""
from __future__ import annotations

import csv
import datetime
import json
import socket
import sys

from kvxfer.errors import InvalidArgument

SCHEMA = 1
REQUIRED = ("transport", "provider", "pattern", "nbytes", "blocks", "gbps", "msgs_per_s", "p50_us", "p99_us",
            "limit_gbps", "ratio", "verified")


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMG" and t else t
    try:
        value = int(float(digits) * mult)
    except ValueError:
        raise InvalidArgument(f"{text!r} is not a size; write e.g. 4096, 64K, 1M or 16MiB") from None
    if value <= 0:
        raise InvalidArgument(f"size {text!r} must be > 0")
    return value


def table(records: list[dict]) -> str:
    mw = max([11] + [len(r["model"]) for r in records])
    pw = max([6] + [len(r["path"]) for r in records])
    head = (f"{'pattern':10} {'model':{mw}} {'path':{pw}} {'size':>9} {'blocks':>6} {'GB/s':>7} {'msgs/s':>9} "
            f"{'writes/s':>9} "
            f"{'p50 us':>9} {'p99 us':>9} {'limit GB/s':>10} {'% limit':>7}  verified")
    lines = [head, "-" * len(head)]
    for r in records:
        extra = f"  exposed p50 {r['exposed_p50_us']:.0f} us of {r['compute_ms']:.0f} ms compute" \
            if "exposed_p50_us" in r else ""
        ratio = f"{100 * r['ratio']:6.0f}%" if r.get("ratio") is not None else "    n/a"
        mem = (r.get("src_mem", "cpu"), r.get("dst_mem", "cpu"))
        if mem != ("cpu", "cpu"):
            extra += f"  {mem[0]} -> {mem[1]}"
        lines.append(f"{r['pattern']:10} {r['model']:{mw}} {r['path']:{pw}} {human_bytes(r['nbytes']):>9} {r['blocks']:>6} "
                     f"{r['gbps']:7.2f} {r['msgs_per_s']:9.0f} {_rate(r.get('writes_per_s'))} "
                     f"{r['p50_us']:9.0f} {r['p99_us']:9.0f} "
                     f"{r['limit_gbps']:10.2f} {ratio}  {_verified(r)}{extra}")
    limits = sorted({r["limit"] for r in records})
    lines.append("limits (measured in this run, between the same processes): " + "; ".join(limits))
    return "\n".join(lines)


def _rate(per_s) -> str:
    """9 wide: 12345, 1.23M; n/a in records from before writes_per_s."""
    if per_s is None:
        return f"{'n/a':>9}"
    return f"{per_s / 1e6:8.2f}M" if per_s >= 1e6 else f"{per_s:9.0f}"


def _verified(r: dict) -> str:
    return {True: "yes", False: "NO", None: "skipped"}[r["verified"]]


def write_json(path: str, records: list[dict]) -> None:
    doc = {"schema": SCHEMA, "kvxfer": _version(), "created": datetime.datetime.now().isoformat(timespec="seconds"),
           "host": socket.gethostname(), "records": records}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def write_csv(path: str, records: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(records)


def plot(path: str, records: list[dict]) -> None:
    """Bandwidth against message size for the sweep records, with the measured limit as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgument("--plot needs matplotlib: pip install matplotlib") from None
    sweep = sorted((r for r in records if r["model"] == "sweep"), key=lambda r: r["nbytes"])
    if not sweep:
        raise InvalidArgument("--plot draws the message-size sweep; this run has none (drop --sweep none)")
    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = [r["nbytes"] for r in sweep]
    ax.plot(sizes, [r["gbps"] for r in sweep], "o-", label=f"kvxfer ({sweep[0]['path']})")
    ax.plot(sizes, [r["limit_gbps"] for r in sweep], "--", color="gray", label=f"limit: {sweep[0]['limit']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [human_bytes(s) for s in sizes], rotation=45)
    ax.set_xlabel("message size")
    ax.set_ylabel("GB/s")
    ax.set_title(f"kvxfer-bench, depth {sweep[0]['depth']}, {socket.gethostname()}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Progress:
    """A one-line bar on stderr for long sweeps (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.tty:
            width = 30
            filled = width * self.done // max(1, self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label:40}")
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(f"[{self.done}/{self.total}] {label}\n")
        sys.stderr.flush()


def _version() -> str:
    from kvxfer import __version__

    return __version__
