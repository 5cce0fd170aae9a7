// Agent: the CUDA IPC and staged paths (progress thread, except ensure_staging / open_ipc_mappings, which run in
// send() on the caller's thread so their errors reach the caller).
//
// CUDA IPC (same host, GPU destination): the layers ready together are enqueued at once on our own stream of
// copy_device, from a GPU source as one gather kernel that marks each layer landed in pinned memory
// (enqueue_ipc_layers), else as one batch and one event per layer; once a layer landed, its granules are signalled
// through the peer's doorbell ring (or zero-byte immediates) exactly as on the CMA path. The copies never wait on
// the network and the model's stream never waits on them.
//
// Staged (source the fabric cannot read, or staging='always'): a layer's writes are cut into batches that fit one
// bounce slot (plan.h staged_run); each batch is copied into a free slot (GPU copy engines, or memcpy for host
// sources) and queued; once its copy has landed the batch is written from the slot over the fabric (one gathered
// write, one immediate with the batch's granules) or, for a same-host host pool, copied out with CMA and signalled
// with one zero-byte immediate. The slot returns when that write completes, so with several slots the copy of
// batch i overlaps the write of batch i-1. Towards a pool the peer reaches through landing slots (landing.h), the
// slot also carries a header naming where each write goes, and the batch is one contiguous write into a free
// landing slot of that peer, which comes back with the peer's LANDED.
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "core/agent.h"
#include "core/imm.h"
#include "core/plan.h"
#include "transports/host_ipc/cma.h"
#include "transports/staged/landing.h"

namespace kvxfer {

namespace {
constexpr size_t kStagedCopyOutsInFlight = 4;  // bounce slots whose CMA copy-out runs on the workers at once
}  // namespace

void Agent::ensure_staging(int device) {
  std::lock_guard<std::mutex> domain(transport_mu_);  // the ring registers with the transport
  std::lock_guard<std::mutex> lock(staging_mu_);
  if (staging_) {
    staging_->pin_for(device);
    return;
  }
  KVXFER_CHECK(options_.staging_slots >= 2 && options_.staging_slot_bytes >= 4096, InvalidArgument,
               "staging needs at least 2 slots of at least 4096 bytes (got " << options_.staging_slots << " x "
                                                                             << options_.staging_slot_bytes << ")");
  // Not populated: a batch into landing slots fills only the first landing slot's worth of each 4 MiB slot, and
  // slots are reused last-in first-out, so a host-pool sender touches a few MiB of the 64, not all of them.
  staging_ = std::make_unique<StagingRing>(*transport_, options_.staging_slot_bytes, options_.staging_slots,
                                           StagingRing::kDefaultKey, /*populate=*/false, device);
}

size_t Agent::staged_pieces(const SendState& send) const {
  if (send.landing) return kLandingMaxEntries;
  return send.staged_to_cma ? CmaCopier::kMaxIov : transport_->capabilities().max_iov;
}

uint64_t Agent::count_staged_ops(const SendState& send) const {
  const WritePlan& plan = send.plan;
  const size_t pieces = staged_pieces(send);
  uint64_t ops = 0;
  uint32_t granules;
  for (uint32_t i = 0, end = plan.writes_per_layer(); i < end; ++ops)
    i += static_cast<uint32_t>(staged_run(plan, i, end, send.batch_bytes, pieces, &granules, !send.landing));
  return ops * plan.num_layers;  // every layer is cut alike
}

gpu::CopyQueue& Agent::copy_queue(int device) {
  KVXFER_ASSERT(device >= 0 && device < 1024);
  if (copy_queues_.size() <= static_cast<size_t>(device)) copy_queues_.resize(device + 1);
  if (!copy_queues_[device]) copy_queues_[device] = std::make_unique<gpu::CopyQueue>(device);
  return *copy_queues_[device];
}

// The peer's pool dst_pool mapped into this process (once per peer and pool), on `device`; returns each region's
// mapped start. Throws (nothing kept) when a handle cannot be opened.
std::vector<uint64_t> Agent::map_ipc_pool(PeerState& peer, uint32_t dst_pool, int device) {
  std::lock_guard<std::mutex> lock(peer.mu);
  auto it = peer.ipc_region_start.find(dst_pool);
  // The mapping grants access to the device it was opened for (cuMemSetAccess, lazy peer access): a copy from
  // another GPU would fault and take the CUDA context down with it. Refused instead (never run: one GPU so far).
  KVXFER_CHECK(it == peer.ipc_region_start.end() || peer.ipc_mapped_on[dst_pool] == device, TransportUnavailable,
               "peer '" << peer.info.name << "' pool " << dst_pool << " is mapped for copies from cuda:"
                        << peer.ipc_mapped_on[dst_pool] << ", not cuda:" << device
                        << "; send to one peer pool from pools on one GPU (or use a fabric transport)");
  if (it == peer.ipc_region_start.end()) {
    // One mapping per distinct allocation (the owner's allocation start identifies it): a pool whose layers
    // share one cudaMalloc segment maps it once, since a process may not open the same allocation twice.
    std::vector<uint64_t> starts;
    std::vector<std::pair<uint64_t, uint64_t>> opened;  // owner's allocation start -> our mapped base
    // Kept by the peer only once every region mapped: a failure unmaps what this call opened, so a retry starts clean.
    std::vector<std::unique_ptr<gpu::IpcMapping>> ipc;
    std::vector<std::unique_ptr<gpu::VmmMapping>> vmm;
    // An agent of this process (a benchmark's or preflight's pair, TP ranks sharing a process): its addresses are
    // ours already, and CUDA refuses to open a handle its own process exported. Known by its epoch among this
    // process's agents, not by pid alone: a container with its own pid namespace may show the same pid.
    const bool same_process = peer.same_host && peer.info.pid == static_cast<uint32_t>(getpid()) &&
                              lives_in_this_process(peer.info.epoch);
    for (const auto& r : peer.info.pools[dst_pool].regions) {
      if (same_process) {
        if (r.device >= 0 && r.device != device) {
          // Its plain addresses on another GPU: kernels and copies on ours reach them only with peer access, and
          // an expandable-segments (VMM) pool only where its owner granted our device access (torch grants its own).
          KVXFER_CHECK(!r.has_vmm, TransportUnavailable,
                       "peer '" << peer.info.name << "' (this process) pool " << dst_pool << " is expandable-segments "
                                << "(cuMem/VMM) memory on cuda:" << r.device << ", which copies from cuda:" << device
                                << " cannot reach; send from a pool on cuda:" << r.device << " (or set "
                                << "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False for the KV pools)");
          gpu::enable_peer_access(device, r.device);
        }
        starts.push_back(r.addr);
        continue;
      }
      if (r.has_vmm) {  // cuMem/VMM memory: its pieces imported and mapped back to back (gpu/vmm.h)
        vmm.push_back(std::make_unique<gpu::VmmMapping>(static_cast<pid_t>(peer.info.pid), r.vmm_pieces, device));
        starts.push_back(vmm.back()->base() + r.ipc_offset);
        continue;
      }
      const uint64_t owner_base = r.addr - r.ipc_offset;
      uint64_t base = 0;
      for (const auto& [ob, b] : opened)
        if (ob == owner_base) base = b;
      if (!base) {
        gpu::IpcHandle h;
        std::memcpy(h.data(), r.ipc_handle.data(), h.size());
        ipc.push_back(std::make_unique<gpu::IpcMapping>(h, device));
        base = ipc.back()->base();
        opened.emplace_back(owner_base, base);
      }
      starts.push_back(base + r.ipc_offset);
    }
    for (auto& m : ipc) peer.ipc_mappings.push_back(std::move(m));
    for (auto& m : vmm) peer.vmm_mappings.push_back(std::move(m));
    it = peer.ipc_region_start.emplace(dst_pool, std::move(starts)).first;
    peer.ipc_mapped_on[dst_pool] = device;
    counters_.ipc_pools_mapped++;
  }
  return it->second;
}

void Agent::open_ipc_mappings(PeerState& peer, SendState& send, uint32_t dst_pool) {
  send.dst_mapped = map_ipc_pool(peer, dst_pool, send.copy_device);
}

// add_peer of a same-host peer: its GPU pools that our pools would reach with CUDA IPC are mapped now, so the first
// request does not pay for cudaIpcOpenMemHandle (milliseconds). Best effort: a pool that cannot be mapped here is
// tried again by its first send, which then fails naming the cause.
void Agent::premap_ipc_pools(PeerState& peer) {
  if (!peer.same_host || !gpu::available()) return;
  size_t local = 0;
  {
    std::lock_guard<std::mutex> lock(pools_mu_);
    local = pools_.size();
  }
  for (uint32_t d = 0; d < peer.info.pools.size(); ++d) {
    if (peer.info.pools[d].regions.empty() || peer.info.pools[d].regions.front().device < 0) continue;
    for (uint32_t s = 0; s < local; ++s) {
      try {
        const PathChoice c = choose_path(peer, s, d);
        if (c.path != SendPath::CudaIpc) continue;
        map_ipc_pool(peer, d, c.copy_device);
        break;  // one mapping per peer pool (map_ipc_pool keys it by pool)
      } catch (const std::exception&) {
        break;
      }
    }
  }
}

// Signals the front layer once its copies landed, after enqueuing every ready layer not enqueued yet.
bool Agent::post_ipc_layer(SendState& send, SendState::Cursor& front, size_t& budget) {
  gpu::CopyQueue& queue = copy_queue(send.copy_device);
  enqueue_ipc_layers(send, queue);
  const bool landed = front.token ? queue.layer_landed(front.token, front.ticket) : queue.done(front.ticket);
  if (!landed) return false;
  return post_signals(send, front, send.plan.writes_per_layer(), budget);
}

// The ready layers not enqueued yet go as one gather kernel that marks each layer as it lands (CopyQueue::
// copy_layers: one launch, no event per layer), so layer L's signal leaves while later layers still copy. Where
// that kernel cannot serve (host source, copy engines, KVXFER_GPU_LAUNCH=per_layer, no ring room) each layer is one
// batch with one event: one event for a whole all_ready() measured slower on an H200 (median 1.47 ms vs 1.01 ms for
// the 512 MiB reference request), as every signal then waited for the last copy.
void Agent::enqueue_ipc_layers(SendState& send, gpu::CopyQueue& queue) {
  std::vector<SendState::Cursor*> todo;
  for (auto& cur : send.ready)
    if (!cur.ticket) todo.push_back(&cur);
  if (todo.empty()) return;
  const WritePlan& plan = send.plan;
  const LocalPool& src = *send.src;
  const uint32_t n = plan.writes_per_layer();
  auto src_base = [&](const LayerBase& b) { return src.regions[b.src_region].addr + b.src_offset; };
  auto dst_base = [&](const LayerBase& b) { return send.dst_mapped[b.dst_region] + b.dst_offset; };
  if (src.on_gpu && queue.can_copy_layers(n, plan.bytes_per_layer / n)) {
    std::vector<gpu::CopyQueue::RelCopy> rel;
    rel.reserve(n);
    for (const Write& w : plan.layer_writes) rel.push_back({w.dst_offset, w.src_offset, w.nbytes});
    std::vector<gpu::CopyQueue::LayerBases> bases;
    for (const auto* c : todo) {
      const LayerBase& b = plan.layers[c->layer_index];
      bases.push_back({src_base(b), dst_base(b)});
    }
    std::vector<uint64_t> tokens(todo.size());
    if (queue.copy_layers(rel.data(), n, bases.data(), bases.size(), tokens.data())) {
      const uint64_t ticket = record_after_launch(queue);
      for (size_t i = 0; i < todo.size(); ++i) {
        todo[i]->token = tokens[i];
        todo[i]->ticket = ticket;
        todo[i]->next = n;
      }
      counters_.gpu_layer_launches++;
      return;
    }
  }
  std::vector<void*> dsts(n);
  std::vector<const void*> srcs(n);
  std::vector<size_t> sizes(n);
  for (auto* cur : todo) {
    const LayerBase& b = plan.layers[cur->layer_index];
    for (uint32_t k = 0; k < n; ++k) {
      const Write& w = plan.layer_writes[k];
      dsts[k] = reinterpret_cast<void*>(dst_base(b) + w.dst_offset);
      srcs[k] = reinterpret_cast<const void*>(src_base(b) + w.src_offset);
      sizes[k] = w.nbytes;
    }
    try {
      queue.copy(dsts.data(), srcs.data(), sizes.data(), n, /*device_reachable=*/src.on_gpu);
    } catch (const Error&) {
      queue.drain();  // a launch before the one that failed may still write into the peer: the send fails after it
      throw;
    }
    cur->ticket = record_after_launch(queue);
    cur->next = n;
  }
}

// The event after copies already enqueued. If it cannot be recorded, the send fails with no ticket to wait for, so
// the copies are waited for here: an ABORT sent meanwhile would let the receiver reuse blocks they still write.
uint64_t Agent::record_after_launch(gpu::CopyQueue& queue) {
  try {
    return queue.record();
  } catch (const Error&) {
    queue.drain();
    throw;
  }
}

// A copy whose queue reports an error writes nothing more (a failed launch never ran; a failed context runs
// nothing): callers retire it instead of letting done()'s throw come back every turn (a failed send's ABORT was
// never deferred; staged batches were posted twice).
Agent::CopyState Agent::copy_state(int device, uint64_t ticket, std::string* why) {
  try {
    return copy_queue(device).done(ticket) ? CopyState::Done : CopyState::Running;
  } catch (const Error& e) {
    if (why) *why = e.what();
    return CopyState::Failed;
  }
}

// Copies batches of the cursor's layer into free bounce slots. Returns true once the whole layer is queued.
bool Agent::post_staged_layer(const std::shared_ptr<SendState>& owner, SendState::Cursor& cur) {
  SendState& send = *owner;
  const LocalPool& src = *send.src;
  const uint32_t begin = send.plan.layer_begin(cur.layer_index), end = send.plan.layer_begin(cur.layer_index + 1);
  const size_t pieces = staged_pieces(send);
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  while (begin + cur.next < end) {
    if (send.staging_held >= staging_share_) return false;  // its share of the ring is in flight: others' turn
    if (send.copy_device < 0) {  // a copy-in this thread makes: within its share of this turn's copies
      if (send.copy_in_turn != turn_) send.copy_in_turn = turn_, send.copied_in = 0;
      if (copy_in_left_ == 0 || send.copied_in >= copy_in_share_) return false;
    }
    const int slot = staging_->acquire();
    if (slot < 0) return false;  // every slot is in flight: advance_staged hands them back
    ++send.staging_held;
    uint32_t granules;
    const uint32_t first = begin + cur.next;
    const size_t n = staged_run(send.plan, first, end, send.batch_bytes, pieces, &granules, !send.landing);
    KVXFER_ASSERT(n > 0);
    uint8_t* at = staging_->slot_ptr(slot);
    if (send.landing) {
      write_landing_batch_header(send, first, n, granules, at);
      at += kLandingDataOffset;
    }
    dsts.clear();
    srcs.clear();
    sizes.clear();
    uint64_t bytes = 0;
    for (size_t k = 0; k < n; ++k) {
      const Write w = send.plan.write(first + k);
      dsts.push_back(at);
      srcs.push_back(reinterpret_cast<const void*>(src.regions[w.src_region].addr + w.src_offset));
      sizes.push_back(w.nbytes);
      at += w.nbytes;
      bytes += w.nbytes;
    }
    uint64_t ticket = 0;
    if (send.copy_device >= 0) {
      gpu::CopyQueue& queue = copy_queue(send.copy_device);
      queue.copy(dsts.data(), srcs.data(), sizes.data(), n, /*device_reachable=*/staging_->device_reachable());
      ticket = queue.record();
    } else {
      for (size_t k = 0; k < n; ++k) std::memcpy(dsts[k], srcs[k], sizes[k]);
      copy_in_left_ -= std::min(copy_in_left_, bytes);
      send.copied_in += bytes;
    }
    staged_.push_back(StagedOp{owner, slot, send.plan.first_layer + cur.layer_index, first, static_cast<uint32_t>(n),
                               granules, ticket, false, bytes, nullptr});
    ++send.ops_posted;
    cur.next += static_cast<uint32_t>(n);
  }
  return true;
}

// The header of a landing batch: where each of its writes goes in the peer's pool. Written by this thread into the
// (pinned) slot while the copy-in fills the data part behind it.
void Agent::write_landing_batch_header(const SendState& send, uint32_t first, size_t n, uint32_t granules,
                                       uint8_t* slot) const {
  LandingEntry entries[kLandingMaxEntries];
  LandingHeader h;
  h.num_entries = static_cast<uint16_t>(n);
  h.xfer_slot = send.slot;
  h.layer = send.plan.write(first).layer;
  h.dst_pool = send.dst_pool;
  h.granules = granules;
  for (size_t k = 0; k < n; ++k) {
    const Write w = send.plan.write(first + k);
    entries[k] = {w.dst_offset, w.dst_region, static_cast<uint32_t>(w.nbytes)};
    h.data_bytes += w.nbytes;
  }
  uint32_t corrupt = corrupt_landing_batches_.load(std::memory_order_relaxed);
  while (corrupt && !corrupt_landing_batches_.compare_exchange_weak(corrupt, corrupt - 1)) {
  }
  if (corrupt) entries[0].dst_offset = uint64_t(1) << 62;  // tests: a sender with a bug
  write_landing_header(slot, h, entries);
}

// Starts the CMA copy-out of batches whose copy-in landed on the workers, a few slots ahead of the ones posted next,
// in the sends' turn order.
void Agent::submit_staged_copy_outs(CmaWorkers& workers, const std::vector<size_t>& order) {
  size_t in_flight = 0;
  for (const StagedOp& op : staged_) in_flight += op.cma && !op.copied_out;
  std::vector<CmaOp> ops;
  std::vector<const SendState*> waiting;  // sends whose next batch has not landed: their later ones have not either
  for (size_t i : order) {
    if (in_flight >= kStagedCopyOutsInFlight) break;
    StagedOp& op = staged_[i];
    SendState& send = *op.send;
    if (op.cma || op.copied_out || std::find(waiting.begin(), waiting.end(), &send) != waiting.end()) continue;
    const CopyState copied_in = op.ticket ? copy_state(send.copy_device, op.ticket) : CopyState::Done;
    if (copied_in == CopyState::Running) {
      waiting.push_back(&send);
      continue;
    }
    if (copied_in == CopyState::Failed) continue;  // never copied out: advance_staged fails it
    if (!send.staged_to_cma || send.state() != TransferState::Pending || send.aborted || send.peer->lost) continue;
    ops.resize(op.num_writes);
    staged_cma_ops(op, ops.data());
    op.cma = workers.submit(static_cast<pid_t>(send.peer->info.pid), ops.data(), ops.size());
    counters_.cma_jobs++;
    ++in_flight;
  }
}

void Agent::staged_cma_ops(const StagedOp& op, CmaOp* ops) const {
  const SendState& send = *op.send;
  const PoolInfo& dst = send.peer->info.pools[send.dst_pool];
  const uint8_t* at = staging_->slot_ptr(op.slot);
  for (uint32_t k = 0; k < op.num_writes; ++k) {
    const Write w = send.plan.write(op.first_write + k);
    ops[k] = {at, dst.regions[w.dst_region].addr + w.dst_offset, w.nbytes};
    at += w.nbytes;
  }
}

// Indices into staged_ in the order sends take turns, fair by bytes: a batch ranks by the bytes of its send's batches
// queued before it, so a send of small batches gets as many bytes out per round as a send of large ones (its batches
// are short because its layers are). Ties keep queue order; a send's own batches keep their order.
std::vector<size_t> Agent::staged_turn_order() const {
  std::vector<const SendState*> sends;
  std::vector<uint64_t> queued;  // [send] bytes of its batches ranked so far
  std::vector<std::pair<uint64_t, size_t>> ranked;  // (bytes ahead in its send, index)
  ranked.reserve(staged_.size());
  for (size_t i = 0; i < staged_.size(); ++i) {
    const SendState* s = staged_[i].send.get();
    const size_t k = std::find(sends.begin(), sends.end(), s) - sends.begin();
    if (k == sends.size()) {
      sends.push_back(s);
      queued.push_back(0);
    }
    ranked.emplace_back(queued[k], i);
    queued[k] += staged_[i].bytes;
  }
  std::stable_sort(ranked.begin(), ranked.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
  std::vector<size_t> order(ranked.size());
  for (size_t i = 0; i < ranked.size(); ++i) order[i] = ranked[i].second;
  return order;
}

void Agent::release_staging(SendState* send, int slot) {
  staging_->release(slot);
  if (send) --send->staging_held;
}

// A staged send may hold an equal share of the bounce ring (at least 2 slots, for the copy/write overlap) while
// other staged sends wait for slots, and the whole ring when it is alone: one large send otherwise keeps every slot,
// and a small send behind it waits for the large one's whole ring of batches.
void Agent::share_staging() {
  size_t wanting = 0;
  for (const auto& s : active_sends_)
    wanting += s->path == SendPath::Staged && (s->staging_held > 0 || !s->ready.empty());
  if (wanting == 0) return;  // (and staging_ is only read once a staged send came through the command queue)
  const size_t slots = staging_->num_slots();
  staging_share_ = static_cast<uint32_t>(std::max<size_t>(2, slots / wanting));
  // Host copy-ins likewise: each send may memcpy an equal part of the turn's bytes (at least one batch: a send
  // stops once it reached its part). Without it the turn's first send took the whole part, and with two sends
  // taking turns every other loop turn, the same one was first on every turn that had room for copies.
  copy_in_left_ = kCopyBytesPerTurn;
  copy_in_share_ = std::max<uint64_t>(1, kCopyBytesPerTurn / wanting);
}

// Writes out queued batches whose copy-in has landed, sends taking turns (staged_turn_order), so a small send's
// batch goes out after one batch of each other send rather than after all of theirs queued before it.
bool Agent::advance_staged(size_t& budget) {
  bool any = false;
  const std::vector<size_t> order = staged_turn_order();
  if (staging_->slot_bytes() >= CmaWorkers::kMinParallelBytes)
    if (CmaWorkers* workers = cma_workers(); workers && staged_.front().send->staged_to_cma)
      submit_staged_copy_outs(*workers, order);
  std::vector<char> gone(staged_.size(), 0);
  std::vector<const SendState*> waiting;  // sends whose next batch cannot go yet: their later batches wait too
  for (size_t i : order) {
    if (budget == 0) break;
    StagedOp& op = staged_[i];
    SendState& send = *op.send;
    if (std::find(waiting.begin(), waiting.end(), &send) != waiting.end()) continue;
    const CopyState copied_in = op.ticket ? copy_state(send.copy_device, op.ticket) : CopyState::Done;
    if (copied_in == CopyState::Failed) {
      // The copy into the slot failed (the device reported an error): the batch is never written, the slot goes
      // back once (a failed copy writes it no more), and the send fails. Throwing here instead came back every
      // turn before the ops were compacted: batches posted twice, slots released twice and shared.
      release_staging(&send, op.slot);
      ++send.ops_completed;
      fail_send(op.send, ErrorKind::TransferFailed, "copying a batch into a bounce slot on cuda:" +
                                                        std::to_string(send.copy_device) + " failed");
      gone[i] = 1;
      any = true;
      continue;
    }
    const bool landed = copied_in == CopyState::Done &&
                        !(op.cma && !op.cma->done());  // else the copy engines or workers still use the slot
    // A copy-out on this thread takes from the turn's copy share (messages and completions come between shares).
    const bool copy_here = send.staged_to_cma && !op.copied_out && !op.cma;
    if (!landed || (copy_here && copy_bytes_left_ == 0)) {
      waiting.push_back(&send);
      continue;
    }
    if (send.state() != TransferState::Pending || send.aborted || send.peer->lost) {
      if (!op.copied_out) release_staging(&send, op.slot);
      ++send.ops_completed;
      gone[i] = 1;
      any = true;
      continue;
    }
    bool posted = false;
    try {
      posted = post_staged_op(op);
    } catch (const Error& e) {
      if (!op.copied_out) release_staging(&send, op.slot);
      ++send.ops_completed;
      fail_send(op.send, e.kind(), e.what());
      gone[i] = 1;
      any = true;
      continue;
    }
    if (copy_here && op.copied_out) copy_bytes_left_ -= std::min(copy_bytes_left_, op.bytes);
    if (!posted) {  // counted where it was refused: eagain (fabric or ring full) or landing_waits
      waiting.push_back(&send);
      continue;
    }
    --budget;
    gone[i] = 1;
    any = true;
  }
  size_t keep = 0;
  for (size_t i = 0; i < staged_.size(); ++i)
    if (!gone[i]) {
      if (keep != i) staged_[keep] = std::move(staged_[i]);
      ++keep;
    }
  staged_.resize(keep);
  return any;
}

// Posts one batch from its slot. Returns false on EAGAIN (retry later; a CMA copy already done is not redone).
bool Agent::post_staged_op(StagedOp& op) {
  SendState& send = *op.send;
  PeerState& peer = *send.peer;
  const PoolInfo& dst = peer.info.pools[send.dst_pool];
  const uint8_t* at = staging_->slot_ptr(op.slot);
  if (send.staged_to_cma) {
    if (!op.copied_out) {
      if (op.cma) {
        op.cma->rethrow_if_failed();  // done: advance_staged waits for it
      } else {
        std::vector<CmaOp> ops(op.num_writes);
        staged_cma_ops(op, ops.data());
        CmaCopier(static_cast<pid_t>(peer.info.pid)).copy(ops.data(), ops.size());
      }
      op.copied_out = true;
      release_staging(&send, op.slot);  // CMA is synchronous: the slot is free as soon as the copy returns
    }
    return post_signal(send, ImmCode::encode(send.slot, op.layer, op.granules));
  }
  // Over the fabric: the batch's gathered writes into the pool, or, towards a landing pool, one write of header +
  // batch into a free landing slot of the peer, whose immediate carries that slot in the layer field and granules
  // 0 (the receiver counts the header's granules once it copied them). No free landing slot: retry later.
  WriteIov iov[16];
  size_t niov = 0;
  uint32_t imm = ImmCode::encode(send.slot, op.layer, op.granules);
  uint32_t landing = 0;
  if (send.landing) {
    if (peer.landing_free.empty()) {
      counters_.landing_waits++;
      return false;
    }
    landing = peer.landing_free.back();
    iov[niov++] = landing_iov(op, landing);
    imm = ImmCode::encode(send.slot, landing, 0);
  } else {
    // Writes whose destinations follow each other go as one range (staged_run counted them as one piece).
    for (uint32_t k = 0; k < op.num_writes; ++k) {
      const Write w = send.plan.write(op.first_write + k);
      const auto& dreg = dst.regions[w.dst_region];
      const uint64_t to = (peer.info.remote_virt_addr ? dreg.addr : 0) + w.dst_offset;
      WriteIov* last = niov ? &iov[niov - 1] : nullptr;
      const uint64_t key = peer.write_key(dreg.rkey);
      if (last && last->rkey == key && last->remote_addr + last->nbytes == to) {
        last->nbytes += w.nbytes;
      } else {
        KVXFER_ASSERT(niov < 16);
        iov[niov++] = {at, w.nbytes, staging_->desc(), to, key};
      }
      at += w.nbytes;
    }
  }
  OpContext* ctx = take_context();
  ctx->send = &send;
  ctx->staging_slot = op.slot;
  if (post_on_rails(peer, iov, niov, imm, ctx) == -EAGAIN) {
    ctx->staging_slot = -1;
    return_context(ctx);
    counters_.eagain++;
    return false;
  }
  if (send.landing) {
    peer.landing_free.pop_back();
    peer.landing_busy[landing] = 1;
  }
  send.granules_posted += op.granules;
  counters_.writes_posted++;
  return true;
}

// The one write of a landing batch: header and data from the bounce slot into the peer's landing slot `index` of
// our window.
WriteIov Agent::landing_iov(const StagedOp& op, uint32_t index) const {
  const SendState& send = *op.send;
  const PeerState& peer = *send.peer;
  uint64_t data = 0;
  for (uint32_t k = 0; k < op.num_writes; ++k) data += send.plan.shape(op.first_write + k).nbytes;
  const uint64_t window = send.slot / peer.tx_window_slots;  // the receiver's window index
  const uint64_t offset = (window * peer.info.landing_slots + index) * peer.info.landing_slot_bytes;
  return {staging_->slot_ptr(op.slot), kLandingDataOffset + data, staging_->desc(),
          (peer.info.remote_virt_addr ? peer.info.landing_addr : 0) + offset, peer.write_key(peer.info.landing_rkey)};
}

}  // namespace kvxfer
