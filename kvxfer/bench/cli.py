"""kvxfer-bench: KV-cache transfer bandwidth against limits measured in the same run.

    kvxfer-bench                          this machine: spawns its peer on loopback, best transport, the reference
                                          paged-KV request (Llama-3-8B, 4096 tokens) and a message-size sweep
    kvxfer-bench --listen [HOST:PORT]     two hosts: this side receives (serves the peer role) ...
    kvxfer-bench --connect HOST:PORT      ... and this side sends and drives; both print the results

Exit status: 0 success, 1 a run failed (one line says why), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys

from kvxfer import bootstrap
from kvxfer.bench import pools, report, workloads
from kvxfer.bench.session import Driver, Peer, RunConfig
from kvxfer.errors import InvalidArgument, KvxferError

TRANSPORTS = ("auto", "shm", "cma", "tcp", "fi_shm", "efa", "verbs", "cuda_ipc", "ucx")
DEFAULT_SWEEP = "4K,16K,64K,256K,1M,4M,16M,64M"
DEFAULT_PORT = 5555


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvxfer-bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.index("\n"):])
    ap.add_argument("--transport", default="auto", choices=TRANSPORTS,
                    help="auto: cma for same-host peers, else efa > verbs > tcp; shm: best same-host path for host "
                         "memory (default: auto)")
    ap.add_argument("--rails", type=int, default=1, help="fabric endpoints per agent (default: 1)")
    ap.add_argument("--staging", choices=("auto", "always"), default="auto",
                    help="always: the sender stages every transfer through its bounce slots (measures the staged "
                         "pipeline against the same direct-path limit; default: auto)")
    ap.add_argument("--landing", choices=("auto", "needed", "always"), default="auto",
                    help="always: the receiver takes every transfer through its landing slots and copies them into "
                         "its pool (receiver-side staging, as for a GPU pool without GPU-direct RDMA); the sender "
                         "then stages too: the whole staged-at-both-ends pipeline; auto: also for chunks under "
                         "32 KiB over tcp; needed: only where the fabric cannot write the pool (default: auto)")
    ap.add_argument("--iface", help="network interface for IP providers (default: lo on loopback, else any)")
    ap.add_argument("--pattern", choices=workloads.PATTERNS,
                    help="KV workload pattern (default: paged, plus the message-size sweep)")
    ap.add_argument("--model", default="llama3-8b", choices=sorted(workloads.MODELS), help="(default: llama3-8b)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the request (default: 4096)")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    ap.add_argument("--tp", metavar="P:D", help="prefill and decode tensor parallelism: prefill rank 0's KV heads into "
                    "decode rank 0's (the heads both hold move; e.g. 1:2 moves half of every block)")
    ap.add_argument("--head-major", action="store_true",
                    help="HND blocks ([heads, block_size, head_dim] inside a block) instead of vLLM's default NHD")
    ap.add_argument("--block-bytes", help="explicit block size in bytes (with --blocks), instead of a model")
    ap.add_argument("--blocks", type=int, help="explicit block count (with --block-bytes)")
    ap.add_argument("--sweep", help=f"message sizes for the contiguous sweep, or 'none' (default: {DEFAULT_SWEEP} "
                                    "when --pattern is not given)")
    ap.add_argument("--depth", type=int, help="transfers in flight (default: 4 for the sweep, 1 otherwise)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed transfers first (default: 1)")
    ap.add_argument("--iters", type=int, help="timed transfers per configuration (default: 5; sweep: by size)")
    ap.add_argument("--duration", type=float, help="seconds per configuration instead of --iters")
    ap.add_argument("--layer-delay-ms", type=float, default=1.0, help="layerwise: compute per layer (default: 1.0)")
    ap.add_argument("--src-mem", default="cpu",
                    help="sender memory: cpu or cuda:N (GPU pools need torch with CUDA; default: cpu)")
    ap.add_argument("--dst-mem", default="cpu",
                    help="receiver memory: cpu or cuda:N (on one host, GPU pools are measured against the device's "
                         "own copy in that direction; default: cpu)")
    ap.add_argument("--json", metavar="PATH", help="write records (schema 1, see kvxfer/bench/report.py)")
    ap.add_argument("--csv", metavar="PATH")
    ap.add_argument("--plot", metavar="PATH.png", help="bandwidth vs message size with the limit (matplotlib)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--listen", nargs="?", const=f"0.0.0.0:{DEFAULT_PORT}", metavar="HOST:PORT",
                      help=f"receive side of a two-host run (default 0.0.0.0:{DEFAULT_PORT})")
    mode.add_argument("--connect", metavar="HOST:PORT", help="send side of a two-host run")
    mode.add_argument("--peer-of", help=argparse.SUPPRESS)  # the spawned local peer
    ap.add_argument("--timeout", type=float, default=60.0, help="bound on every wait, seconds (default: 60)")
    ap.add_argument("--no-verify", action="store_true", help="skip checking destination bytes after the run")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for flag, value in (("--src-mem", a.src_mem), ("--dst-mem", a.dst_mem)):
        if not re.fullmatch(r"cpu|cuda:\d+", value):
            ap.error(f"{flag} {value!r}: use cpu or cuda:N")
    for flag, value, low in (("--rails", a.rails, 1), ("--tokens", a.tokens, 1), ("--block-size", a.block_size, 1),
                             ("--warmup", a.warmup, 0), ("--iters", a.iters, 1), ("--depth", a.depth, 1),
                             ("--blocks", a.blocks, 1)):
        if value is not None and value < low:
            ap.error(f"{flag} {value} must be >= {low}")
    if a.rails > 16:
        ap.error(f"--rails {a.rails}: at most 16")
    if (a.block_bytes is None) != (a.blocks is None):
        ap.error("--block-bytes and --blocks go together")
    if a.timeout <= 0 or (a.duration is not None and a.duration <= 0) or a.layer_delay_ms < 0:
        ap.error("--timeout and --duration must be > 0, --layer-delay-ms >= 0")
    if a.iters is not None and a.duration is not None:
        ap.error("give --iters or --duration, not both")
    if a.block_bytes and (a.tp or a.head_major):
        ap.error("--tp and --head-major describe a model's KV heads: use them with --model, not --block-bytes")
    try:
        sizes(a)
        if a.tp and not a.block_bytes:  # the model's heads must split over both TP sizes
            workloads.model_workload("paged", a.model, a.block_size, a.block_size, tp=parse_tp(a.tp),
                                     head_major=a.head_major)
        if a.block_bytes:
            report.parse_size(a.block_bytes)
    except InvalidArgument as e:
        ap.error(str(e))


def sizes(a) -> list[int]:
    text = a.sweep if a.sweep is not None else (DEFAULT_SWEEP if a.pattern is None else "none")
    return [] if text == "none" else [report.parse_size(s) for s in text.split(",") if s]


def parse_tp(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        p, d = (int(x) for x in text.split(":"))
    except ValueError:
        raise InvalidArgument(f"--tp {text!r}: give prefill and decode TP sizes as P:D, e.g. 1:2") from None
    if p < 1 or d < 1:
        raise InvalidArgument(f"--tp {text!r}: TP sizes must be >= 1")
    return p, d


def plan_workloads(a) -> list[workloads.Workload]:
    out = []
    pattern = a.pattern or "paged"
    depth = a.depth or 1
    if not 1 <= depth <= 128:
        raise InvalidArgument(f"--depth {depth}: between 1 and 128 transfers can be in flight to one peer")
    if a.block_bytes:
        out.append(workloads.raw_workload(pattern, report.parse_size(a.block_bytes), a.blocks, depth,
                                          a.layer_delay_ms))
    else:
        out.append(workloads.model_workload(pattern, a.model, a.tokens, a.block_size, layer_delay_ms=a.layer_delay_ms,
                                            depth=depth, tp=parse_tp(a.tp), head_major=a.head_major))
    out += [workloads.sweep_workload(s, a.depth or 4) for s in sizes(a)]
    return out


def iterations_for(a, w: workloads.Workload) -> int:
    if a.iters is not None:
        return a.iters
    if w.label != "sweep":
        return 5
    return max(5, min(500, (128 << 20) // w.nbytes))


def check_runnable(a) -> None:
    """GPU memory this side will hold must be usable here (the peer checks its own when it is another host)."""
    if a.transport == "cuda_ipc" and not (pools.is_gpu(a.src_mem) or pools.is_gpu(a.dst_mem)):
        raise InvalidArgument("--transport cuda_ipc moves GPU pools: add --dst-mem cuda:N (and --src-mem cuda:N for "
                              "GPU to GPU)")
    if a.peer_of or a.listen:
        return  # the receiving side learns its memory from the driver
    pools.require(a.src_mem)
    if not a.connect:
        pools.require(a.dst_mem)


def run_driver(a, ch: bootstrap.Channel, interface: str | None) -> list[dict]:
    cfg = RunConfig(transport=a.transport, rails=a.rails, staging=a.staging, landing=a.landing, interface=interface,
                    warmup=a.warmup, duration_s=a.duration, timeout_s=a.timeout, verify=not a.no_verify,
                    src_mem=a.src_mem, dst_mem=a.dst_mem)
    plan = plan_workloads(a)
    bar = report.Progress(len(plan), enabled=not a.quiet)
    driver = Driver(ch, cfg)
    records = []
    for w in plan:
        cfg.iterations = iterations_for(a, w)
        rec = driver.run(w)
        if a.tokens and w.label in workloads.MODELS:
            rec["tokens"] = a.tokens
        records.append(rec)
        bar.step(f"{w.pattern} {w.label} {report.human_bytes(w.nbytes)}: {rec['gbps']:.2f} GB/s")
        if rec["verified"] is False:
            raise KvxferError(f"destination bytes wrong after {w.pattern} {w.label}: {rec['verify_detail']}")
    driver.finish(records)
    return records


def emit(a, records: list[dict]) -> None:
    print(report.table(records))
    if a.json:
        report.write_json(a.json, records)
    if a.csv:
        report.write_csv(a.csv, records)
    if a.plot:
        report.plot(a.plot, records)


def local(a) -> list[dict]:
    lst = bootstrap.listen("127.0.0.1", 0)
    env = bootstrap.loopback_env()
    cmd = [sys.executable, "-m", "kvxfer.bench.cli", "--peer-of", f"127.0.0.1:{lst.address[1]}",
           "--timeout", str(a.timeout)]
    proc = subprocess.Popen(cmd, env=env)
    try:
        ch = lst.accept(timeout_s=a.timeout)
        return run_driver(a, ch, a.iface or "lo")
    finally:
        lst.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    check_args(ap, a)
    try:
        check_runnable(a)
        if a.peer_of:
            host, port = bootstrap.parse_hostport(a.peer_of)
            Peer(bootstrap.connect(host, port, a.timeout), a.timeout).serve()
            return 0
        if a.listen:
            host, port = bootstrap.parse_hostport(a.listen, "0.0.0.0", DEFAULT_PORT)
            lst = bootstrap.listen(host, port)
            print(f"kvxfer-bench: listening on {lst.address[0]}:{lst.address[1]}; start the other side with "
                  f"kvxfer-bench --connect THIS_HOST:{lst.address[1]}", file=sys.stderr, flush=True)
            ch = lst.accept(timeout_s=a.timeout)
            Peer(ch, a.timeout, report=lambda recs: print(report.table(recs), flush=True)).serve()
            return 0
        if a.connect:
            host, port = bootstrap.parse_hostport(a.connect, "127.0.0.1", DEFAULT_PORT)
            records = run_driver(a, bootstrap.connect(host, port, a.timeout),
                                 a.iface or bootstrap.default_interface(host))
        else:
            records = local(a)
        emit(a, records)
        return 0
    except KvxferError as e:
        print(f"kvxfer-bench: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except (OSError, ConnectionError) as e:
        print(f"kvxfer-bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
