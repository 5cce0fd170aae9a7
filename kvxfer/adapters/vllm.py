"""vLLM KV connector on kvxfer: disaggregated prefill by push (the decode side allocates, the prefill side writes).

Load it with
    --kv-transfer-config '{"kv_connector": "KvxferConnector", "kv_connector_module_path": "kvxfer.adapters.vllm",
                           "kv_role": "kv_both", "kv_connector_extra_config": {"push_port": 5600}}'
(push_port only on prefill instances) and put kvxfer.adapters.vllm_proxy in front of a prefill and a decode server.

Per request (the proxy sets kv_transfer_params; the transfer id is the proxy's, shared by both sides):
  decode  {"do_remote_prefill": true, "xfer_id": X, "remote_host": H, "remote_port": P}
    scheduler: get_num_new_matched_tokens -> (prompt tokens not computed locally, async); update_state_after_alloc
      records the new block ids; build_connector_meta hands them to the worker.
    worker: start_load_kv opens kvxfer recv(X) into those blocks and registers them with the prefill worker's
      kvxfer.push.PushServer at H:P; get_finished reports X's request once the recv is DONE, or FAILED (its blocks
      then come back from get_block_ids_with_load_errors, and vLLM's kv_load_failure_policy applies).
  prefill {"do_remote_decode": true, "xfer_id": X}   (max_tokens=1)
    scheduler: build_connector_meta emits a save (X, the prompt's blocks) in the step that completes the prompt;
      request_finished returns delay_free=True for it; has_pending_push_work keeps the engine stepping until the
      worker reported the send ended.
    worker: if the decode side's registration is there at the step's first save_kv_layer, the send is opened and
      every later save_kv_layer(l) marks layer l ready (writes overlap the remaining layers); otherwise the send is
      opened with all layers ready as soon as the registration arrives (polled in get_finished). The request is
      reported finished_sending (its blocks freed) only when the send is DONE (the decode side counted every byte),
      FAILED, or no registration came within transfer_timeout_s.

Threads: vLLM calls every method from its scheduler or worker thread; kvxfer's progress thread and the push
server's threads never call back into vLLM. Layout arithmetic, plans, counters and failure detection are kvxfer's.
A failed load (the recv failed or timed out, or the push connection closed), or the load of a request vLLM aborted
(its client left), is cancelled (Recv.cancel: the prefill side posts nothing more) and reported to vLLM only once none of its writes can still land (Recv.writes_over), since
vLLM may recompute into those blocks; at most transfer_timeout_s later it is reported regardless, with a warning.
A prefill request is reported sent (vLLM frees its blocks) only once its send's writes are over (Send.writes_over).
Tensor parallelism: prefill and decode engines may run different TP sizes. Every worker registers its pool as its
TP rank's (the model's KV heads it holds); prefill rank r serves pushes on push_port + r and says its rank and
TP size in its hello. A decode rank opens one recv per prefill rank holding some of its heads
(kvxfer.tp.rank_pairs) as a kvxfer.RecvGroup and registers its blocks with every prefill rank; a prefill rank
sends, once every decode rank registered, to the decode ranks that take heads from it (a kvxfer.SendGroup; none
for a replica the pairs do not use), and reports the request sent when those sends are over. Registrations
carry token counts (num_tokens, skip_tokens), so pools of different block sizes agree on what moves where the
layout allows it (vLLM's CPU cache does not: its K is stored transposed per block, so both engines need one
block size there; the refusal names it).
GPU KV caches (vLLM >= 0.32 hands one [blocks, heads, tokens, K|V] view per layer: KVLayout.from_vllm_views): a
prefill layer is marked by a kvxfer.LayerSignal record on the model's stream (save_kv_layer runs when the layer's
kernels are queued; the signal's watcher thread marks the layer once the GPU ran them, and the stream never waits),
or by a stream synchronize where signals cannot use the GPU; a send opened after the forward waits for a CUDA event
recorded after it. A prefill instance asks vLLM for PIECEWISE CUDA graphs (requires_piecewise_for_cudagraph), so
save_kv_layer runs every step. A micro-batched step (dual-batch overlap) marks no layer one by one: its sends wait
for that event too. MLA caches register as a latent every TP rank holds whole. `layer_signal: true` runs the same LayerSignal bookkeeping on a CPU cache
(host-recorded; the tests use it).
Limits: no pipeline parallelism. The GPU path has never run: vLLM's GPU build is not installable on the machines
this was written on (CPU vLLM only), so only its CPU twin (layer_signal: true) is tested.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                              KVConnectorRole)

import kvxfer
from kvxfer.errors import InvalidArgument, KvxferError
from kvxfer.push import PushClient, PushServer

log = logging.getLogger("kvxfer.adapters.vllm")
IDLE_WAIT_S = 0.01  # longest sleep of an empty engine step while transfers are open (see _idle_wait)


@dataclass
class LoadSpec:          # decode: receive X into dst_ids; the first skip_blocks blocks are already computed here
    xfer_id: int
    host: str
    port: int
    dst_ids: list[int]
    skip_blocks: int
    num_tokens: int      # the prompt's tokens after the skipped blocks: what the prefill side writes


@dataclass
class SaveSpec:          # prefill: the prompt's blocks, in token order, to write to whoever registered X
    xfer_id: int
    src_ids: list[int]


@dataclass
class KvxferConnectorMetadata(KVConnectorMetadata):
    loads: dict[str, LoadSpec] = field(default_factory=dict)
    saves: dict[str, SaveSpec] = field(default_factory=dict)


def _log_where_vllm_logs() -> None:
    """kvxfer's messages go where vLLM's go, at vLLM's level (VLLM_LOGGING_LEVEL): vLLM configures only its own
    logger, so without this only our warnings would show (Python's last-resort handler), never the INFO lines an
    operator reads to see which path a pool and its layers took. Left alone if the application set kvxfer's up."""
    ours, theirs = logging.getLogger("kvxfer"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


def _capturing() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _no_forward(forward_context, kwargs: dict) -> bool:
    """Whether the step that calls start_load_kv runs no forward. vLLM's V1 model runner calls it inside the step's
    forward context (attn_metadata None on a step without a forward); its V2 runner (vLLM 0.32's default on GPUs)
    calls it after the forward, outside that context, and passes the step's batch as keyword arguments instead
    (none on a step without a forward)."""
    if getattr(forward_context, "attn_metadata", None) is not None:
        return False
    return not (kwargs.get("request_ids") or kwargs.get("num_tokens"))


def _micro_batched() -> bool:
    """vLLM's dual-batch overlap (--enable-dbo) runs every layer once per micro-batch in one step: the first
    save_kv_layer of a layer comes before the other micro-batches wrote their part of it. The hooks run on the
    micro-batches' threads, inside a forward context of their own (no ubatch_slices), with vLLM's micro-batch
    registry set (dbo_enabled); the step's outer context lists the micro-batches."""
    try:
        from vllm.v1.worker.ubatching import dbo_enabled
    except ImportError:
        dbo_enabled = None
    if dbo_enabled is not None and dbo_enabled():
        return True
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return False
    return is_forward_context_available() and getattr(get_forward_context(), "ubatch_slices", None) is not None


def _unique_layers(kv_caches: dict) -> tuple[list[str], dict[str, int]]:
    """(the layers that own their KV cache, each layer's index among those). vLLM hands a layer that shares
    another's KV cache (kv_sharing_target_layer_name) the target's very tensor: registering it again would send
    the same bytes twice, and a blocks-outermost buffer would not describe it at all."""
    owners: list[str] = []
    index: dict[str, int] = {}
    seen: dict[tuple, int] = {}
    for name, t in kv_caches.items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.device))
        if key not in seen:
            seen[key] = len(owners)
            owners.append(name)
        index[name] = seen[key]
    return owners, index


def _views_layout(views, block_size: int, use_mla: bool):
    """(layout, memory) of vLLM's GPU cache: one [blocks, heads, tokens, K|V] view per layer (vLLM >= 0.32); MLA
    caches come as [blocks, 1, tokens, latent] views whose one "head" every TP rank holds whole."""
    tokens = views[0].shape[2] if views[0].dim() == 4 else None
    if tokens is not None and tokens != block_size:
        # The scheduler's block ids count blocks of block_size tokens; views of split kernel blocks number
        # them otherwise, and a block id would address the wrong tokens.
        raise InvalidArgument(f"vLLM's KV cache views hold {tokens}-token blocks but the engine schedules "
                              f"{block_size}-token blocks (its attention backend splits them): run with "
                              f"--block-size {tokens}")
    layout, memory = kvxfer.KVLayout.from_vllm_views(views)
    if not use_mla:
        return layout, memory
    if layout.num_kv_heads != 1 or not layout.per_layer:
        raise InvalidArgument(f"an MLA model's KV cache views should be [blocks, 1, tokens, latent] with layers "
                              f"outermost; got {list(views[0].shape)} with {layout.num_kv_heads} heads"
                              + ("" if layout.per_layer else " and blocks outermost (unset VLLM_KV_CACHE_LAYOUT)"))
    return kvxfer.KVLayout.mla(layout.num_layers, layout.num_blocks, layout.block_size, layout.head_dim,
                               layout.dtype), memory


def _params(request) -> dict:
    return request.kv_transfer_params if isinstance(request.kv_transfer_params, dict) else {}


def _xfer_id(params: dict, request_id: str) -> int | None:
    x = params.get("xfer_id")
    if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**64:
        return x
    log.warning("kvxfer: request %s has kv_transfer_params without a valid xfer_id (%r); it runs locally",
                request_id, x)
    return None


def _source(params: dict, request_id: str) -> tuple[int, str, int] | None:
    """(xfer_id, host, port) of a decode request's prefill side, or None (logged) when the params are unusable."""
    x, host, port = _xfer_id(params, request_id), params.get("remote_host"), params.get("remote_port")
    if x is None:
        return None
    if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536:
        log.warning("kvxfer: request %s: remote_host/remote_port %r:%r are not a HOST and a port; it runs locally",
                    request_id, host, port)
        return None
    return x, host, port


class KvxferConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        _log_where_vllm_logs()
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        self.block_size = vllm_config.cache_config.block_size
        self.timeout_s = float(extra.get("transfer_timeout_s", 30.0))
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size != 1:
            raise InvalidArgument("kvxfer's vLLM connector supports tensor parallelism but not pipeline parallelism "
                                  f"(got pipeline_parallel_size={parallel.pipeline_parallel_size}); run with "
                                  "--pipeline-parallel-size 1")
        self.tp_size, self.tp_rank = parallel.tensor_parallel_size, 0  # the rank: at register_kv_caches
        self.total_kv_heads = vllm_config.model_config.get_total_num_kv_heads()
        self._use_mla = bool(getattr(vllm_config.model_config, "use_mla", False))
        self._extra = extra
        # scheduler side
        self._loads: dict[str, LoadSpec] = {}             # decode: registered this step, not yet in metadata
        self._producing: dict[str, tuple[int, int, list[int]]] = {}  # prefill: id -> (X, prompt tokens, blocks)
        self._saving: set[str] = set()                    # prefill: save issued, request still running
        self._held: set[str] = set()                      # delay-freed, until the worker reports the id sent
        # worker side
        self.agent: kvxfer.Agent | None = None
        self.server: PushServer | None = None
        self._clients: dict[tuple[str, int], PushClient] = {}
        self._layer_index: dict[str, int] = {}           # vLLM's layer name -> our layer (shared KV: its owner's)
        self._num_layers = 0
        # decode: a load's recvs (one per prefill rank holding its heads), the clients of every prefill rank, ids
        self._recvs: dict[str, tuple[kvxfer.RecvGroup | None, list[PushClient], list[int]]] = {}
        self._load_errors: set[int] = set()
        self._given_up: dict[str, float] = {}             # failed loads cancelled / failed sends, since (monotonic)
        self._aborted_loads: set[str] = set()             # decode: vLLM finished these while their load was live
        self._sends: dict[str, kvxfer.SendGroup | None] = {}  # None: nothing sent (no registration, refused, or
                                                               # no decode rank takes heads from this rank)
        self._waiting: dict[str, tuple[SaveSpec, float, object]] = {}  # prefill: forward run, registration not yet
        #                                                   here (spec, since, CUDA event after the forward or None)
        self._marks = "host"                              # how prefill layers are marked ready (_layer_marks)
        self._signal: kvxfer.LayerSignal | None = None    # prefill: the layer signal, where _marks uses one
        self._recorded: set[int] = set()                  # layers marked in this step's forward
        self._signal_reported = False
        self._layerwise: set[str] = set()                 # sends opened at this step's first save_kv_layer
        self._step_started = False
        self._idle_step = False
        self._finished: set[str] = set()                  # ids vLLM finished; only these may be reported sent

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config) -> bool:
        """A prefill instance (push_port set) marks layers from save_kv_layer, which vLLM does not call when it
        replays a FULL CUDA graph: its attention must run outside graphs. A decode instance loads asynchronously
        (no per-layer hook) and keeps full graphs."""
        return (extra_config or {}).get("push_port") is not None

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        params = _params(request)
        if params.get("do_remote_prefill") and _source(params, request.request_id) is not None:
            n = request.num_prompt_tokens - num_computed_tokens
            if n > 0:
                return n, True
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        params, rid = _params(request), request.request_id
        if params.get("do_remote_decode"):
            x = _xfer_id(params, rid)
            if x is not None:
                self._producing[rid] = (x, request.num_prompt_tokens, [])
        if not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # a preempted request recomputes instead of loading twice
        if num_external_tokens <= 0:
            return
        x, host, port = _source(params, rid)  # checked in get_num_new_matched_tokens
        all_ids = blocks.get_block_ids()[0]
        new_ids = blocks.get_unhashed_block_ids()
        num_blocks = -(-request.num_prompt_tokens // self.block_size)
        skip = len(all_ids) - len(new_ids)
        self._loads[rid] = LoadSpec(x, host, port, list(new_ids)[:num_blocks - skip], skip,
                                    request.num_prompt_tokens - skip * self.block_size)

    def build_connector_meta(self, scheduler_output):
        meta = KvxferConnectorMetadata(loads=self._loads)
        self._loads = {}
        steps = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self._producing:
                self._note_blocks(meta, new.req_id, new.block_ids, new.num_computed_tokens, steps, False)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if rid in self._producing:
                self._note_blocks(meta, rid, cached.new_block_ids[i], cached.num_computed_tokens[i], steps,
                                  rid in cached.resumed_req_ids)
        return meta

    def _note_blocks(self, meta, rid, new_block_ids, num_computed, num_scheduled, resumed: bool):
        x, num_prompt, ids = self._producing[rid]
        if resumed:  # after a preemption vLLM hands the whole block list again
            ids.clear()
        if new_block_ids:
            ids.extend(new_block_ids[0])
        if num_computed + num_scheduled.get(rid, 0) >= num_prompt:  # this step completes the prompt
            meta.saves[rid] = SaveSpec(x, ids[:-(-num_prompt // self.block_size)])
            del self._producing[rid]
            self._saving.add(rid)

    def request_finished(self, request, block_ids):
        rid = request.request_id
        self._producing.pop(rid, None)
        # A request finished while its load is live keeps its blocks without us: vLLM frees them only when the
        # load is reported in finished_recving (Scheduler.finish_requests). Prefill blocks are ours to hold.
        if rid in self._saving:  # the send may still read its blocks
            self._saving.discard(rid)
            self._held.add(rid)
            return True, None
        return False, None

    def update_connector_output(self, connector_output):
        for rid in connector_output.finished_sending or ():
            self._held.discard(rid)

    def has_pending_push_work(self) -> bool:
        return bool(self._held)

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches):
        names, layer_index = _unique_layers(kv_caches)
        if len(names) < len(kv_caches):
            log.info("kvxfer: %d of vLLM's %d attention layers share another layer's KV cache; registering the %d "
                     "that own one", len(kv_caches) - len(names), len(kv_caches), len(names))
        first = kv_caches[names[0]]
        if first.device.type == "cuda":
            layout, memory = _views_layout([kv_caches[n] for n in names], self.block_size, self._use_mla)
        elif first.device.type == "cpu":
            backend = self._extra.get("attn_backend") or "CPU_ATTN"
            layout = kvxfer.KVLayout.from_vllm(backend, first.shape, str(first.dtype), len(names))
            memory = [kv_caches[n] for n in names]
        else:
            raise kvxfer.errors.TransportUnavailable(f"KV cache on {first.device}: kvxfer's vLLM connector takes CPU "
                                                     "or CUDA KV caches")
        layout = self._rank_layout(layout)
        self._layer_index = layer_index  # a layer sharing another's KV cache marks that one
        self._num_layers = len(names)
        self.agent = kvxfer.Agent(f"vllm-{os.getpid()}", transport=self._extra.get("transport"),
                                  interface=self._extra.get("interface"), timeout_s=self.timeout_s,
                                  max_peers=self._extra.get("max_peers"),  # None: KVXFER_MAX_PEERS, else 32
                                  peer_timeout_s=self._extra.get("peer_timeout_s"),  # None: KVXFER_PEER_TIMEOUT_S
                                  fallback=self._extra.get("fallback"))  # None: KVXFER_FALLBACK, else refuse
        self.agent.register_pool(memory, layout)
        if self._extra.get("push_port") is not None:  # TP rank r serves on push_port + r
            self._marks = self._layer_marks(first.device.type == "cuda", self._num_layers)
            self.server = PushServer(self.agent, self._extra.get("push_host", "127.0.0.1"),
                                     int(self._extra["push_port"]) + self.tp_rank, ttl_s=self.timeout_s,
                                     tp_size=self.tp_size, tp_rank=self.tp_rank)
            log.info("kvxfer: %s pool of %d layers x %d blocks on %s (KV heads [%d, %d) of %d, TP rank %d of %d); "
                     "layers marked ready by %s; push server on %s:%d", layout.kind, layout.num_layers,
                     layout.num_blocks, first.device, layout.head_begin, layout.head_begin + layout.num_kv_heads,
                     self.total_kv_heads, self.tp_rank, self.tp_size, self._marks, *self.server.address)

    def _layer_marks(self, on_gpu: bool, num_layers: int) -> str:
        """How a prefill layer is marked ready once its KV is in the cache. GPU: a kvxfer.LayerSignal record on the
        model's stream (save_kv_layer runs when the layer's kernels are queued, not when they ran; the signal's
        watcher thread marks the layer once the GPU got there, and the stream never waits), or, where signals
        cannot use the GPU (or layer_signal is false), a stream synchronize per layer. CPU: the hook runs after the
        layer computed, so it marks directly; layer_signal true routes those marks through a host-recorded
        LayerSignal instead (the GPU path's bookkeeping, run on the CPU)."""
        want = self._extra.get("layer_signal", "auto")
        if want not in (True, False, "auto"):
            raise InvalidArgument(f"kv_connector_extra_config layer_signal must be true, false or \"auto\", got "
                                  f"{want!r}")
        from kvxfer import signals

        if not on_gpu:
            if want is True:
                self._signal = signals.LayerSignal(self.agent, num_layers, device=False)
                return "layer signal (host-recorded)"
            return "host"
        if want is not False:
            usable, why = signals.cuda_status()
            if usable:
                self._signal = signals.LayerSignal(self.agent, num_layers)
                return "layer signal"
            log.warning("kvxfer: layer signals cannot use the GPU (%s); each layer is marked ready after a stream "
                        "synchronize instead (the host stops queuing work until the layer ran)", why)
        return "stream sync"

    def _rank_layout(self, layout):
        """This worker's pool as its TP rank's: which of the model's KV heads it holds, so that prefill and decode
        engines of different tensor parallelism exchange the heads they have in common."""
        if self.tp_size > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.tp_rank = get_tensor_model_parallel_rank()
        if layout.num_kv_heads == 0:  # MLA: every rank holds the whole latent
            self.total_kv_heads = 0
            return layout
        begin, n = kvxfer.KVLayout.tp_heads(self.total_kv_heads, self.tp_size, self.tp_rank)
        if n != layout.num_kv_heads:
            raise InvalidArgument(f"TP rank {self.tp_rank} of {self.tp_size} holds {layout.num_kv_heads} KV heads, "
                                  f"but {self.total_kv_heads} heads split over {self.tp_size} ranks give {n}")
        return layout.with_heads(begin, self.total_kv_heads)

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        # vLLM steps without a forward while it waits on transfers only; get_finished then idles briefly
        self._idle_step = _no_forward(forward_context, kwargs)
        for rid, spec in meta.loads.items():
            self._recvs[rid] = self._start_load(rid, spec)

    def _start_load(self, rid: str, spec: LoadSpec):
        """Opens one recv per prefill rank holding some of this rank's heads (kvxfer.tp.rank_pairs), then
        registers the blocks with every prefill rank (each must hear from every decode rank). Returns the load's
        (RecvGroup or None, clients, dst_ids)."""
        group, clients = None, []
        try:
            clients = self._prefill_ranks(spec.host, spec.port)
            sources = sorted({pr.prefill_rank for pr in kvxfer.tp.rank_pairs(self.total_kv_heads, len(clients),
                                                                              self.tp_size)
                              if pr.decode_rank == self.tp_rank})
            group = kvxfer.RecvGroup(self.agent.recv(clients[p].peer, spec.xfer_id, spec.dst_ids,
                                                     timeout_s=self.timeout_s, num_tokens=spec.num_tokens)
                                     for p in sources)
            for c in clients:
                c.register(spec.xfer_id, spec.dst_ids, spec.skip_blocks, num_tokens=spec.num_tokens,
                           skip_tokens=spec.skip_blocks * self.block_size, tp_size=self.tp_size,
                           tp_rank=self.tp_rank)
        except (KvxferError, TypeError, ValueError) as e:
            log.warning("kvxfer: load of request %s from %s:%s failed to start: %s", rid, spec.host, spec.port, e)
            if group is not None:  # a prefill rank may have its registration: tell them to post nothing
                group.cancel(f"the load failed to start: {e}")
        return group, clients, spec.dst_ids

    def _prefill_ranks(self, host: str, port: int) -> list[PushClient]:
        """A push client per TP rank of the prefill engine at host:port (its rank r serves on port + r; rank 0's
        hello says how many there are)."""
        first = self._client(host, port)
        clients = [first] + [self._client(host, port + r) for r in range(1, first.tp_size)]
        for r, c in enumerate(clients):
            if (c.tp_size, c.tp_rank) != (first.tp_size, r):
                raise InvalidArgument(f"the push server at {host}:{port + r} is TP rank {c.tp_rank} of {c.tp_size}, "
                                      f"expected rank {r} of {first.tp_size}: prefill rank r must serve on "
                                      "push_port + r")
        return clients

    def _client(self, host: str, port) -> PushClient:
        client = self._clients.get((host, port))
        if client is None or not client.usable:
            if client is not None:
                client.close()  # its control connection, if the prefill worker still holds it
            # first contact blocks this step for the handshake (bounded: a dead prefill fails the load fast)
            client = self._clients[(host, port)] = PushClient(self.agent, host, port,
                                                              timeout_s=min(5.0, self.timeout_s))
        return client

    def wait_for_layer_load(self, layer_name):
        pass  # loads are asynchronous: a request is scheduled only after get_finished reported its recv DONE

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        if self.server is None or not self.has_connector_metadata():
            return
        if not self._step_started:  # the step's first layer: open the sends whose registration is already here
            if self._marks == "layer signal" and _capturing():
                return  # a record captured into a graph would fire on every replay, bound to no forward of ours
            self._step_started = True
            if _micro_batched():
                return  # a layer's first hook precedes the other micro-batches' KV: sends wait for the forward
            self._open_layerwise(self._get_connector_metadata())
        if self._layerwise:
            self._mark(self._layer_index[layer_name])

    def _open_layerwise(self, meta) -> None:
        for rid, spec in meta.saves.items():
            regs = self.server.take(spec.xfer_id)
            if regs is not None:
                self._sends[rid] = self._open(rid, spec, regs)
                self._layerwise.add(rid)
        if self._signal is not None and self._layerwise:
            # This forward's records go to these sends. Every forward that binds records each layer exactly once
            # (wait_for_save records the layers no hook did), so the k-th bind always meets the k-th forward.
            self._signal.bind([s for rid in self._layerwise if self._sends[rid] is not None
                               for s in self._sends[rid].sends])
        self._recorded = set()

    def _mark(self, layer: int) -> None:
        """Layer `layer` of this step's forward is in the cache (CPU) or queued after it (GPU)."""
        if layer in self._recorded:  # a layer hooked twice in one step (a layer sharing its KV cache): a second
            return                   # record would count for the next forward, a second layer_ready is refused
        self._recorded.add(layer)
        if self._signal is not None:
            self._record(layer)
            return
        if self._marks == "stream sync":
            import torch

            torch.cuda.current_stream().synchronize()
        for rid in self._layerwise:
            if self._sends[rid] is not None:  # a decode rank gone must not hold back the others' layers
                self._sends[rid].layer_ready(layer, skip_failed=True)

    def _record(self, layer: int) -> None:
        if self._signal.on_device:
            self._signal.record(layer)  # torch's current stream: the one the model runs on
        else:
            self._signal.record_host(layer)

    def wait_for_save(self):
        self._step_started = False
        if self.server is None or not self.has_connector_metadata():
            return
        now = time.monotonic()
        if self._signal is not None and self._layerwise:
            for layer in range(self._num_layers):
                if layer not in self._recorded:
                    self._mark(layer)
        elif self._layerwise and self._marks == "stream sync":
            import torch

            torch.cuda.current_stream().synchronize()
        forward_done = None
        for rid, spec in self._get_connector_metadata().saves.items():
            if rid in self._layerwise:
                if self._signal is None and self._sends[rid] is not None:
                    self._sends[rid].all_ready(skip_failed=True)  # the layers not marked yet
            else:
                if forward_done is None:
                    forward_done = self._forward_done()
                self._waiting[rid] = (spec, now, forward_done)
        self._layerwise.clear()
        self._open_waiting()

    def _forward_done(self):
        """Something to ask whether this step's forward ran: a CUDA event after it on a GPU, None (it has) on CPU."""
        if self._marks in ("host", "layer signal (host-recorded)"):
            return None
        import torch

        event = torch.cuda.Event()
        event.record()
        return event

    def _open(self, rid: str, spec: SaveSpec, regs) -> kvxfer.SendGroup | None:
        """One send per decode rank that takes heads from this prefill rank (kvxfer.tp.rank_pairs over both
        engines' TP sizes); None when there is none, or every one was refused (its loads fail at their timeout)."""
        decode_tp = regs[0].tp_size
        targets = [pr.decode_rank for pr in kvxfer.tp.rank_pairs(self.total_kv_heads, self.tp_size, decode_tp)
                   if pr.prefill_rank == self.tp_rank]
        sends = [s for s in (self._send_to(rid, spec, regs[d]) for d in dict.fromkeys(targets)) if s is not None]
        return kvxfer.SendGroup(sends) if sends else None

    def _send_to(self, rid: str, spec: SaveSpec, reg) -> kvxfer.Send | None:
        src, why = self._source_blocks(spec, reg)
        if src is None:
            log.error("kvxfer: request %s (xfer %d) to decode rank %d: %s; nothing sent (its load fails at its "
                      "timeout)", rid, spec.xfer_id, reg.tp_rank, why)
            return None
        try:
            return self.agent.send(reg.peer, spec.xfer_id, np.asarray(src, np.int32), reg.dst_ids,
                                   timeout_s=self.timeout_s, num_tokens=reg.num_tokens or None)
        except KvxferError as e:
            log.error("kvxfer: request %s (xfer %d): send refused: %s", rid, spec.xfer_id, e)
            return None

    def _source_blocks(self, spec: SaveSpec, reg) -> tuple[list[int] | None, str]:
        """The prompt's blocks holding the tokens the decode side registered for (its skip and count are in
        tokens, so engines of different block sizes agree), or None and why not."""
        if not reg.num_tokens:  # whole blocks after skip_blocks
            src = spec.src_ids[reg.skip_blocks:]
            if len(src) != len(reg.dst_ids):
                return None, (f"the prompt has {len(src)} blocks to send but the decode side registered "
                              f"{len(reg.dst_ids)}")
            return src, ""
        if reg.skip_tokens % self.block_size:
            return None, (f"the decode side holds the first {reg.skip_tokens} tokens already, which ends inside a "
                          f"{self.block_size}-token block here")
        first = reg.skip_tokens // self.block_size
        src = spec.src_ids[first:first - (-reg.num_tokens // self.block_size)]
        if (first + len(src)) * self.block_size < reg.skip_tokens + reg.num_tokens:
            return None, (f"the decode side registered {reg.skip_tokens} + {reg.num_tokens} tokens but the prompt "
                          f"has {len(spec.src_ids)} blocks of {self.block_size} here")
        return src, ""

    def _open_waiting(self):
        now = time.monotonic()
        for rid, (spec, t0, forward_done) in list(self._waiting.items()):
            if forward_done is not None and not forward_done.query():
                continue  # its KV is still being written on the GPU: marking it all ready would send stale bytes
            regs = self.server.take(spec.xfer_id)
            if regs is not None:
                send = self._sends[rid] = self._open(rid, spec, regs)
                if send is not None:
                    send.all_ready(skip_failed=True)
            elif self.server.cancelled(spec.xfer_id) or now - t0 > self.timeout_s:
                log.warning("kvxfer: request %s (xfer %d): no decode registration within %.0f s (or cancelled); "
                            "freeing its blocks", rid, spec.xfer_id, self.timeout_s)
                self._sends[rid] = None
            else:
                continue
            del self._waiting[rid]

    def get_finished(self, finished_req_ids):
        self._finished |= set(finished_req_ids)
        # vLLM finishes a request whose KV is still loading only when it aborts it (the client went away): the
        # prefill side is told to stop (Recv.cancel), and the load is reported once its writes are over.
        self._aborted_loads |= {rid for rid in finished_req_ids if rid in self._recvs}
        sending, recving = set(), set()
        for rid, (recv, clients, dst) in list(self._recvs.items()):
            if rid in self._aborted_loads and recv is not None and recv.state == kvxfer.TransferState.PENDING:
                recv.cancel("vLLM aborted the request")
            state = recv.state if recv is not None else kvxfer.TransferState.FAILED
            if state == kvxfer.TransferState.PENDING and not (recv.peers_lost or any(c.lost for c in clients)):
                continue
            if state != kvxfer.TransferState.DONE:
                if not self._writes_ended(rid, recv):
                    continue  # vLLM may recompute into these blocks: not while the prefill side can still write
                why = (recv.error if recv is not None and state == kvxfer.TransferState.FAILED
                       else "could not start" if recv is None else "the prefill side's push connection closed")
                if rid in self._aborted_loads:
                    log.info("kvxfer: load of aborted request %s stopped (%s)", rid, why)
                else:
                    log.warning("kvxfer: load of request %s failed (%s); %d blocks reported to vLLM", rid, why,
                                len(dst))
                    self._load_errors.update(dst)
            recving.add(rid)
            self._aborted_loads.discard(rid)
            del self._recvs[rid]
        if self.server is not None:
            self._open_waiting()
            self.server.expired()  # registrations for requests this engine never got: nothing to hold
        if self._idle_step and not sending and not recving:
            self._idle_wait()
        if self._signal is not None and not self._signal_reported and self._signal.stats()["forwards_delivered"]:
            self._signal_reported = True  # says once that the path runs (tests read it)
            log.info("kvxfer: the layer signal delivered its first forward (%r)", self._signal)
        for rid, send in list(self._sends.items()):
            if rid in self._finished and (send is None or self._send_over(rid, send)):
                if send is not None and send.state == kvxfer.TransferState.FAILED:
                    log.warning("kvxfer: send of request %s failed: %s", rid, send.error)
                sending.add(rid)
                del self._sends[rid]
        # only prefill sends wait for their id here; forget finished ids that have nothing left to report
        self._finished = {rid for rid in self._finished - sending if rid in self._sends or rid in self._waiting}
        return (sending or None), (recving or None)

    def _idle_wait(self) -> None:
        """A step with nothing to compute while transfers are open: vLLM steps again at once, so sleep here until
        a registration arrives or one of our transfers ends (at most IDLE_WAIT_S: what a new request waits at
        worst). Polling every millisecond cost a TP 2 engine (three processes per step) both cores of a 2-core
        machine, and starved the prefill engine beside it for 20 s."""
        if self._waiting:
            self.server.wait(IDLE_WAIT_S)
            return
        pending = [t for t in (*(g for g, _, _ in self._recvs.values()), *self._sends.values())
                   if t is not None and t.state == kvxfer.TransferState.PENDING]
        if pending:
            self.agent.wait_any(pending, IDLE_WAIT_S)
        elif self._recvs or self._sends:  # ended, waiting on writes_over or on vLLM: nothing to wake us
            time.sleep(0.002)

    def _send_over(self, rid: str, send) -> bool:
        """vLLM frees a request's blocks once it is reported sent: only once the send ended and none of its writes
        still reads them (Send.writes_over: DONE, or a failed send whose receiver counted what it posted), or
        transfer_timeout_s after it failed (a receiver that never answers), with a warning."""
        if send.state == kvxfer.TransferState.PENDING:
            return False
        if send.writes_over:
            self._given_up.pop(rid, None)
            return True
        since = self._given_up.setdefault(rid, time.monotonic())
        if time.monotonic() - since < self.timeout_s:
            return False
        log.warning("kvxfer: request %s: the decode side did not answer the failed send's abort within %.0f s; "
                    "freeing its blocks anyway", rid, self.timeout_s)
        del self._given_up[rid]
        return True

    def _writes_ended(self, rid: str, recv) -> bool:
        """A failed load: cancel its recv once (the prefill side posts nothing more) and say True once none of its
        writes can still land (Recv.writes_over, or the prefill agent is lost), or after transfer_timeout_s more
        with a warning (the old behaviour: vLLM gets the blocks back regardless)."""
        if recv is None or all(r.writes_over or r.peer.lost for r in recv.recvs):
            self._given_up.pop(rid, None)
            return True
        if rid not in self._given_up:
            self._given_up[rid] = time.monotonic()
            recv.cancel("vLLM gave up the load")
            return recv.writes_over
        if time.monotonic() - self._given_up[rid] < self.timeout_s:
            return False
        log.warning("kvxfer: request %s: the prefill side did not confirm within %.0f s that its writes ended; "
                    "handing its blocks back anyway", rid, self.timeout_s)
        del self._given_up[rid]
        return True

    def get_block_ids_with_load_errors(self):
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self):
        if self._signal is not None:
            self._signal.close()
        if self.server is not None:
            self.server.close()
        for client in self._clients.values():
            client.close()
        if getattr(self, "agent", None) is not None:
            self.agent.close()  # peers' transfers with this engine fail now (PeerLost), not at their deadlines
