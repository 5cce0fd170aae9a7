"""Layer signals that survive CUDA Graphs (sender) and device-visible layer counters (receiver).

Sender: the model calls ``signal.record(layer)`` after each layer. That enqueues a one-thread kernel on the stream
which bumps the layer's record count in host-mapped memory; it is capturable in a CUDA graph and publishes a new
value on every replay (the count lives in device memory, not in the frozen kernel arguments). A C++ watcher thread
sees the count and calls ``layer_ready`` for the sends bound to that forward. The host binds once per forward::

    signal = kvxfer.LayerSignal(prefill_agent, num_layers=32)
    graph = capture(lambda: [run_layer(l) or signal.record(l) for l in range(32)])    # once
    for batch in batches:
        sends = [prefill_agent.send(peer, rid, src, dst) for rid, src, dst in batch]
        signal.bind(sends)    # forward k's records go to the k-th bind(); before or after replay() both work
        graph.replay()        # no Python per layer; the model's stream never waits on the network

Binding rules (details in csrc/signals/watcher.h): records that arrive before their bind() wait in the counters and
apply when it comes (``unbound_forwards`` says how far the device is ahead); ``bind([])`` consumes a forward that
sends nothing; more than ``max_bindings`` forwards bound ahead of the device raises SignalOverflow; a layer_ready
that fails (send failed or aborted) is counted in ``stats()`` and kept in ``errors``, and delivery goes on.

Receiver: ``DeviceCounter(num_layers)``, reusable across requests. ``counter.attach(recv)`` gives the recv the next
generation; the progress thread stores it into host-mapped per-layer words as layers complete, and
``counter.wait_on_stream(layer)`` enqueues a spin-wait kernel that a decode graph can capture: its k-th execution
waits for the k-th attached recv. A failed recv, or ``timeout_s``, releases the wait and bumps ``device_errors``.

Warm-up forwards (run eagerly before capture, as torch's graph capture wants) record layers and run waits with
nothing bound: ``signal.resync()`` and ``counter.sync()`` after them (and after ``torch.cuda.synchronize()``) pass
over what they recorded and consumed, so the first bind()/attach() go to the first real forward.

Without a GPU (or a CUDA build) the memory is ordinary host memory: bind, the watcher, the counters and
``record_host`` work; ``record`` and ``wait_on_stream`` raise TransportUnavailable naming what is missing.
"""
from __future__ import annotations

import atexit
import sys
import weakref

from kvxfer import _C
from kvxfer.errors import InvalidArgument, TransportUnavailable

_open_signals: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_signals() -> None:
    """Watcher threads stop before the interpreter (and CUDA) tear down: one still polling pinned memory that CUDA
    frees at exit would crash the process on its way out."""
    for signal in list(_open_signals):
        signal.close()


def cuda_status() -> tuple[bool, str]:
    """(usable, why-not): whether signals can use host-mapped device memory on this machine."""
    usable, _device, why = _C.cuda_status()
    return usable, why


def _stream_handle(stream) -> int:
    """A cudaStream_t as an int: None = torch's current stream, a torch.cuda.Stream, or an int handle."""
    if stream is None:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            raise TransportUnavailable("record()/wait_on_stream() without an explicit stream use torch's current CUDA "
                                       "stream, but torch with CUDA is not available; pass stream=<cudaStream_t int>")
        return int(torch.cuda.current_stream().cuda_stream)
    if hasattr(stream, "cuda_stream"):
        return int(stream.cuda_stream)
    if isinstance(stream, int) and stream >= 0:
        return stream
    raise InvalidArgument(f"stream must be None, a torch.cuda.Stream or a cudaStream_t int, got {stream!r}")


class LayerSignal:
    def __init__(self, agent, num_layers: int, *, max_bindings: int = 64, spin_us: int = 50, sleep_us: int = 20,
                 device: bool = True):
        """device=False forces host memory (the host then plays the device with record_host)."""
        if not isinstance(num_layers, int) or num_layers < 1:
            raise InvalidArgument(f"num_layers must be a positive int, got {num_layers!r}")
        if max_bindings < 1 or spin_us < 0 or sleep_us < 1:
            raise InvalidArgument(f"need max_bindings >= 1, spin_us >= 0, sleep_us >= 1; got {max_bindings}, "
                                  f"{spin_us}, {sleep_us}")
        opts = _C.WatcherOptions()
        opts.max_bindings, opts.spin_us, opts.sleep_us = max_bindings, spin_us, sleep_us
        self._agent = agent
        self._c = _C.LayerSignal(agent._c, num_layers, opts, bool(device))
        _open_signals.add(self)

    num_layers = property(lambda self: self._c.num_layers)
    on_device = property(lambda self: self._c.on_device)
    why_host = property(lambda self: self._c.why_host)

    def record(self, layer: int, stream=None) -> None:
        """Enqueue layer's record on `stream` (default: torch's current stream). Capturable; never waits. One
        forward at a time per signal: records of the same layer from two streams running at once (overlapped
        micro-batches) can race on the layer's count; give each concurrent stream a LayerSignal of its own."""
        self._c.record(layer, _stream_handle(stream))

    def bind(self, sends) -> int:
        """Bind the next forward's sends (an iterable of Send; empty = a forward that sends nothing). Returns the
        forward's index. Raises SignalOverflow when max_bindings forwards are already pending."""
        sends = list(sends)
        for s in sends:
            if getattr(s, "_agent", None) is not self._agent:
                raise InvalidArgument(f"{s!r} is not a Send of this signal's agent {self._agent.name!r}")
        return self._c.bind([s._h for s in sends])

    def resync(self) -> int:
        """Pass over the forwards recorded with nothing bound (warm-up runs before capture); the next bind() is for
        the next forward recorded. Returns how many were passed over. Call it with nothing bound and no forward
        running (after torch.cuda.synchronize()); otherwise raises InvalidArgument saying which."""
        return self._c.resync()

    def drain(self, timeout_s: float = 30.0) -> None:
        """Block until every bound forward was delivered. Raises TransferTimeout naming the missing layers."""
        if not self._c.drain(timeout_s):
            from kvxfer.errors import TransferTimeout

            raise TransferTimeout(f"LayerSignal not drained after {timeout_s} s: {self._c.describe_pending()}; "
                                  f"errors: {self.errors or 'none'}")

    @property
    def errors(self) -> list[str]:
        """The first 16 messages of layer_ready calls that failed (and slot faults)."""
        return self._c.errors()

    @property
    def unbound_forwards(self) -> int:
        return self._c.stats()["unbound_forwards"]

    def stats(self) -> dict:
        return self._c.stats()

    def slot(self, layer: int) -> int:
        """Host view of layer's record count."""
        return self._c.slot(layer)

    def close(self) -> None:
        """Stop the watcher. Forwards not yet delivered are dropped; their sends keep their deadlines."""
        self._c.close()

    def record_host(self, layer: int) -> None:
        """What the record kernel does, from the calling thread: for a model that runs on the host (its layer's KV
        is in the cache when this is called), tests and benchmarks. Refused on a device-mapped signal."""
        self._c.host_record(layer)

    _host_record = record_host  # the name tests and benchmarks have used

    def __repr__(self) -> str:
        s = self._c.stats()
        return (f"<LayerSignal layers={self.num_layers} {'device-mapped' if self.on_device else 'host'} "
                f"bound={s['forwards_bound']} delivered={s['forwards_delivered']}>")


class DeviceCounter:
    def __init__(self, num_layers: int, *, device: bool = True):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise InvalidArgument(f"num_layers must be a positive int, got {num_layers!r}")
        self._c = _C.DeviceCounter(num_layers, bool(device))

    num_layers = property(lambda self: self._c.num_layers)
    on_device = property(lambda self: self._c.on_device)
    why_host = property(lambda self: self._c.why_host)
    generation = property(lambda self: self._c.generation)
    device_errors = property(lambda self: self._c.device_errors)
    layers_done = property(lambda self: self._c.layers_done)

    def attach(self, recv) -> int:
        """Mirror `recv`'s layer completions here; returns its generation. The previous recv must have ended."""
        return self._c.attach(recv._h)

    def layer_done(self, layer: int) -> bool:
        g = self._c.generation
        return g > 0 and self._c.word(layer) >= g

    def host_view(self) -> list[int]:
        """The per-layer words as the device reads them (generation numbers)."""
        return [self._c.word(i) for i in range(self.num_layers)]

    @property
    def failed(self) -> bool:
        g = self._c.generation
        return g > 0 and self._c.fail_word >= g

    def wait_on_stream(self, layer: int | None = None, stream=None, *, timeout_s: float = 30.0) -> None:
        """Enqueue a spin-wait on `stream` until `layer` (None: every layer) of the attached recv is done.
        Capturable in a CUDA graph; the k-th execution per layer waits for the k-th attach()."""
        if layer is not None and (not isinstance(layer, int) or layer < 0):
            raise InvalidArgument(f"layer={layer!r}: a layer index (0 to {self.num_layers - 1}), or None for every "
                                  "layer")
        self._c.wait_on_stream(-1 if layer is None else layer, _stream_handle(stream), timeout_s)

    def sync(self) -> int:
        """Make the next wait on each layer wait for the next attach(): waits that ran with no recv attached for
        them (warm-up forwards before capture) took numbers of their own. Call with no wait queued or running
        (after torch.cuda.synchronize()). Returns the current generation. device_errors keeps counting across it:
        each warm-up wait that timed out added one, so compare device_errors against its value after sync() (and
        give warm-up waits a short timeout_s: each waits that long)."""
        return self._c.sync()

    def __repr__(self) -> str:
        return f"<DeviceCounter layers={self.num_layers} generation={self.generation} done={self.layers_done}>"
