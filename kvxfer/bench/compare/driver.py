"""The half of a comparison that runs one library in its own process, as sender or receiver.

Each drive_<library>.py script defines a class with the methods below and calls run(). The process talks to the
comparison (cli.py) in JSON lines over its original stdout and its stdin; fd 1 is pointed at stderr first, so a
library that prints to stdout cannot corrupt the channel. Times are perf_counter_ns (CLOCK_MONOTONIC on Linux, one
clock for every process of the host): a request's time is the receiver's t1 (it knows every byte landed) minus
the sender's t0 (before it started the request). Layer by layer, the time a request adds is t1 minus the start
minus the emulated compute (LayerClock).

    library.address() -> dict          what the other side needs to reach this one (JSON-able)
    library.connect(peer_address)      reach the other side (both sides, before the first request)
    library.arm(rid, blocks)           receiver: be ready for request rid (before the sender starts it)
    library.wait(rid, blocks)          receiver: return once this side knows request rid landed
    library.send(rid, blocks)          sender: move request rid; return once the sender knows it is done
    library.send_layers(rid, blocks, clock) -> ns
                                       sender, layer by layer: for each layer of clock.layers(), that layer's
                                       bytes may move once the iterator yields it (its compute is over); waits
                                       like send(), returns clock.last_ns (the last layer's compute ended)
    library.wait_layers(rid, blocks)   receiver of a layer-by-layer request (default: wait)
    library.close()
    library.about                      optional dict, read after connect: version, path (what it runs over)
    library.counters()                 optional dict of running totals, sent after every request

Run as a script (python drive_<library>.py --role send|recv --request JSON --timeout S), never imported by kvxfer.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import traceback

from request import Request


class Channel:
    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # library chatter on stdout goes to stderr
        sys.stdout = sys.stderr

    def say(self, **msg) -> None:
        self._out.write(json.dumps(msg) + "\n")

    def hear(self) -> dict:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(0)  # the comparison went away
        return json.loads(line)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=("send", "recv"), required=True)
    ap.add_argument("--request", required=True, help="Request as JSON")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--option", action="append", default=[], help="KEY=VALUE for the library")
    ap.add_argument("--no-verify", action="store_true")
    return ap.parse_args(argv)


def version_of(*distributions: str) -> str:
    """The installed version of the first of these distributions found."""
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "?"


class LayerClock:
    """The prefill forward a layer-by-layer request overlaps with: layers() sleeps layer_s (the CPU is idle while a
    GPU computes), then yields the layer whose KV is now written. Whatever the library does with a layer before
    asking for the next one delays the next layer's compute, as it would delay a forward's next kernel launches:
    compute_ns adds up only the sleeps, so (end - start - compute_ns) is all the time the transfer added."""

    def __init__(self, layer_s: float, num_layers: int):
        self.layer_s, self.num_layers, self.last_ns, self.compute_ns = layer_s, num_layers, 0, 0

    def layers(self):
        for layer in range(self.num_layers):
            before = time.perf_counter_ns()
            time.sleep(self.layer_s)
            self.last_ns = time.perf_counter_ns()
            self.compute_ns += self.last_ns - before
            yield layer


def layers_on_a_worker(clock: LayerClock, work, name: str, timeout_s: float) -> int:
    """Runs work(layers) on a thread of its own while the forward (clock) runs here, handing it each layer as its
    compute ends, as engines hand finished layers to a transfer thread; raises what work raised, here; returns
    clock.last_ns."""
    todo, failure = queue.Queue(), []

    def handed():
        while (layer := todo.get()) is not None:
            yield layer

    def run():
        try:
            work(handed())
        except Exception as e:  # noqa: BLE001 -- raised again on the forward's thread below
            failure.append(e)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    for layer in clock.layers():
        todo.put(layer)
    todo.put(None)
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{name} still writing {timeout_s} s after the forward ended")
    if failure:
        raise failure[0]
    return clock.last_ns


def counters(lib) -> dict:
    """The library's own counters after a request (optional: library.counters() -> dict of numbers)."""
    return lib.counters() if hasattr(lib, "counters") else {}


def deadline_passed(start_ns: int, timeout_s: float) -> bool:
    return time.perf_counter_ns() - start_ns > timeout_s * 1e9


def run(make_library) -> None:
    """make_library(role, request, pool, timeout_s, options) -> library object; pool is this side's list of layer
    tensors (numpy uint8), source pattern on the sender, zeros on the receiver."""
    args = parse_args()
    ch = Channel()
    try:
        req = Request.from_json(args.request)
        pool = req.source_pool() if args.role == "send" else req.destination_pool()
        options = dict(o.split("=", 1) for o in args.option)
        lib = make_library(args.role, req, pool, args.timeout, options)
        ch.say(address=lib.address())
        while True:
            msg = ch.hear()
            op = msg["op"]
            if op == "connect":
                lib.connect(msg["peer"])
                ch.say(connected=True, about=getattr(lib, "about", {}))
            elif op == "arm":  # clear / verify: "all" (every destination block of the pool) or "request"
                req.clear(pool, None if msg["clear"] == "all" else msg["blocks"])
                cpu0 = time.process_time()
                lib.arm(msg["rid"], msg["blocks"])
                ch.say(armed=msg["rid"])
                (lib.wait_layers if msg.get("layers") else lib.wait)(msg["rid"], msg["blocks"])
                t1 = time.perf_counter_ns()
                cpu = time.process_time() - cpu0
                bad = "" if args.no_verify else req.verify(pool, msg["blocks"], msg["verify"] == "all")
                ch.say(t1=t1, cpu_s=cpu, bad=bad, counters=counters(lib))
            elif op == "go":  # layer_ms: layer by layer, after each layer's emulated compute; t0 = the last one's
                cpu0 = time.process_time()
                start = time.perf_counter_ns()
                compute = 0
                if msg.get("layer_ms") is None:
                    lib.send(msg["rid"], msg["blocks"])
                    t0 = start
                else:
                    clock = LayerClock(msg["layer_ms"] / 1e3, req.num_layers)
                    t0 = lib.send_layers(msg["rid"], msg["blocks"], clock)
                    compute = clock.compute_ns
                done = time.perf_counter_ns()
                ch.say(t0=t0, start=start, compute=compute, sent=done, cpu_s=time.process_time() - cpu0,
                       counters=counters(lib))
            elif op == "quit":
                lib.close()
                ch.say(bye=True)
                return
            else:
                raise ValueError(f"unknown op {op!r}")
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 -- any failure goes back to the comparison as one line
        traceback.print_exc()
        ch.say(error=f"{type(e).__name__}: {e}")
        sys.exit(1)
