// Agent: the receiver side of landing slots (transports/staged/landing.h). Progress thread, except ensure_landing
// (register_pool, caller thread) and the info getters.
//
// A landing immediate (granules 0) says "transfer slot S's sender put a batch in its landing slot I". We parse the
// slot's header as untrusted bytes, check every entry against the named pool (which must be one we expose for
// landing), copy the data into the pool (a host-to-device copy on our own stream for a GPU pool, memcpy for a host
// pool), and only once the copy has landed count the batch's granules for (S, layer) and hand I back (LANDED). So a
// layer is reported complete only when its bytes are in the pool, exactly as for direct writes. A refused batch
// counts nothing (its transfer then times out or is aborted) and its slot is handed back.
#include <cstring>

#include "core/agent.h"
#include "core/imm.h"
#include "transports/staged/landing.h"

namespace kvxfer {

void Agent::ensure_landing(int device) {  // transport_mu_ and pools_mu_ held (register_pool)
  if (landing_) {
    landing_->pin_for(device);
    return;
  }
  landing_ = std::make_unique<StagingRing>(*transport_, options_.landing_slot_bytes,
                                           static_cast<size_t>(options_.max_peers) * options_.landing_slots,
                                           kLandingRingKey, /*populate=*/false, device);
  info_.landing_addr = reinterpret_cast<uint64_t>(landing_->base());
  info_.landing_rkey = landing_->rkey();
  expose_to_peers(landing_->base(), landing_->slot_bytes() * landing_->num_slots(), info_.landing_rkey);
  info_.landing_slots = options_.landing_slots;
  info_.landing_slot_bytes = options_.landing_slot_bytes;
}

std::vector<uint64_t> Agent::landing_info() const {
  std::lock_guard<std::mutex> lock(pools_mu_);
  if (!landing_) return {0, 0, 0};
  return {landing_->slot_bytes(), options_.landing_slots, landing_->pinned() ? 1u : 0u};
}

std::string Agent::last_landing_error() const {
  std::lock_guard<std::mutex> lock(staging_mu_);
  return last_landing_error_;
}

uint8_t* Agent::landing_slot(uint32_t xfer_slot, uint32_t index) const {
  return landing_->slot_ptr(static_cast<int>((xfer_slot / window_slots_) * options_.landing_slots + index));
}

void Agent::on_landing(const std::shared_ptr<PeerState>& peer, uint32_t imm) {
  const uint32_t slot = ImmCode::slot(imm), index = ImmCode::layer(imm);
  std::string why;
  const LocalPool* pool = nullptr;
  LandingBatch batch;
  bool parsed = false;  // the header's own checks passed (what it names may still be refused)
  const uint8_t* at = nullptr;
  if (!landing_ || index >= options_.landing_slots) {
    why = "landing immediate names slot " + std::to_string(index) + " but this agent has " +
          (landing_ ? std::to_string(options_.landing_slots) + " per peer" : std::string("no landing slots"));
  } else {
    at = landing_slot(slot, index);
    if (parse_landing(at, landing_->slot_bytes(), &batch, &why)) {
      parsed = true;
      std::lock_guard<std::mutex> lock(pools_mu_);
      if (batch.header.xfer_slot != slot)
        why = "landing header names transfer slot " + std::to_string(batch.header.xfer_slot) + ", its immediate " +
              std::to_string(slot);
      else if (batch.header.dst_pool >= pools_.size() ||
               !(pools_[batch.header.dst_pool]->landing || pools_[batch.header.dst_pool]->landing_offered))
        why = "landing header names pool " + std::to_string(batch.header.dst_pool) + ", not one exposed for landing";
      else
        pool = pools_[batch.header.dst_pool].get();
    }
    if (pool) {
      std::vector<uint64_t> sizes;
      for (const auto& r : pool->regions) sizes.push_back(r.nbytes);
      if (!check_landing_bounds(batch, sizes, &why)) pool = nullptr;
    }
  }
  if (!pool) {
    counters_.landing_rejected++;
    {
      std::lock_guard<std::mutex> lock(staging_mu_);
      last_landing_error_ = "from peer '" + peer->info.name + "': " + why;
    }
    if (landing_ && index < options_.landing_slots) queue_control(*peer, ControlType::Landed, 0, index);
    fail_landing_transfer(*peer, slot, why);
    // Only a header that passed its own checks and names this slot is taken at its word.
    if (parsed && batch.header.xfer_slot == slot)
      count_on_aborted_slot(peer, ImmCode::encode(slot, batch.header.layer, batch.header.granules));
    return;
  }
  const LandingHeader& h = batch.header;
  const uint32_t counted = ImmCode::encode(slot, h.layer, h.granules);
  const uint8_t* data = at + kLandingDataOffset;
  void* dsts[kLandingMaxEntries];
  const void* srcs[kLandingMaxEntries];
  size_t sizes[kLandingMaxEntries];
  for (size_t k = 0; k < batch.entries.size(); ++k) {
    const LandingEntry& e = batch.entries[k];
    dsts[k] = reinterpret_cast<void*>(pool->regions[e.dst_region].addr + e.dst_offset);
    srcs[k] = data;
    sizes[k] = e.nbytes;
    data += e.nbytes;
  }
  const size_t n = batch.entries.size();
  if (peer->lost.load(std::memory_order_acquire)) {
    // Its recvs have failed, and their writes_over may already have told the engine those blocks are free (a peer
    // of this process that closed; a batch polled after its keys closed): nothing of a lost peer is copied in.
    // Counted all the same, so the totals its ABORTs and BYE name are still reached.
    count_imm(peer, counted);
    queue_control(*peer, ControlType::Landed, 0, index);
    return;
  }
  if (!pool->on_gpu) {
    for (size_t k = 0; k < n; ++k) std::memcpy(dsts[k], srcs[k], sizes[k]);
    finish_landing(peer, counted, index);
    return;
  }
  gpu::CopyQueue& queue = copy_queue(pool->device);
  queue.copy(dsts, srcs, sizes, n, /*device_reachable=*/landing_->device_reachable());
  pending_landings_.push_back({peer, counted, index, pool->device, queue.record()});
}

// The transfer a refused batch belongs to can never complete: fail its recv now, naming why, rather than at its
// deadline, and tell the sender (CANCEL saying why): its send fails now too, and its ABORT names the total this
// aborted slot counts to before it is reused and the recv's writes_over is settled.
void Agent::fail_landing_transfer(PeerState& peer, uint32_t slot, const std::string& why) {
  uint64_t xfer_id;
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    SlotCounter& s = peer.slots[slot];
    if (!s.begun || s.aborted) return;
    xfer_id = s.xfer_id;
    if (s.recv) {
      s.recv->fail(ErrorKind::TransferFailed, "transfer " + std::to_string(s.xfer_id) +
                                                  ": a landing batch from peer '" + peer.info.name +
                                                  "' was refused: " + why);
      s.watch(s.recv);  // told when the sender's total is counted
    }
    peer.live_recvs.erase(s.xfer_id);
    peer.waiting_recvs.erase(s.xfer_id);
    peer.slot_of_xfer.erase(s.xfer_id);
    s.aborted = true;
    s.recv.reset();
  }
  queue_control(peer, ControlType::Cancel, xfer_id, 0, kCancelRefused);
}

// The sender counted a refused (or failed) batch's granules in what it posted, and its ABORT names that total: the
// slot, aborted by fail_landing_transfer, counts them too (nothing of them was written), or the total is never
// reached and the slot never reused. A slot not begun here has no transfer to charge them to.
void Agent::count_on_aborted_slot(const std::shared_ptr<PeerState>& peer, uint32_t imm) {
  {
    std::lock_guard<std::mutex> lock(peer->mu);
    if (!peer->slots[ImmCode::slot(imm)].aborted) return;
  }
  count_imm(peer, imm);
}

void Agent::finish_landing(const std::shared_ptr<PeerState>& peer, uint32_t imm, uint32_t index) {
  counters_.landings++;
  count_imm(peer, imm);
  queue_control(*peer, ControlType::Landed, 0, index);
}

// Counts the batches whose copy into a GPU pool has landed, in copy order.
bool Agent::advance_landings() {
  bool any = false;
  while (!pending_landings_.empty()) {
    PendingLanding& p = pending_landings_.front();
    std::string failed;
    const CopyState copied = copy_state(p.device, p.ticket, &failed);
    if (copied == CopyState::Failed) {
      // The copy into the GPU pool failed (the device reported an error): its transfer can never complete. Fail
      // it naming why and count the batch on the aborted slot, as for a refused one, so the sender's total is
      // reached; the landing slot goes back (a failed copy reads it no more).
      const PendingLanding gone = p;
      pending_landings_.pop_front();
      queue_control(*gone.peer, ControlType::Landed, 0, gone.index);
      fail_landing_transfer(*gone.peer, ImmCode::slot(gone.imm), "its copy into the GPU pool failed: " + failed);
      count_on_aborted_slot(gone.peer, gone.imm);
      any = true;
      continue;
    }
    if (copied == CopyState::Running) break;
    finish_landing(p.peer, p.imm, p.index);
    pending_landings_.pop_front();
    any = true;
  }
  return any;
}

// Before a lost peer's recvs are told no write can land any more: its batches still copying must land first.
void Agent::drain_landings(const PeerState& peer) {
  for (const auto& p : pending_landings_)
    if (p.peer.get() == &peer) copy_queue(p.device).drain();
}

void Agent::on_landed(PeerState& peer, const ControlMessage& m) {
  if (m.slot >= peer.landing_busy.size() || !peer.landing_busy[m.slot]) {
    counters_.dropped_messages++;  // not a landing slot of ours in flight: a duplicate or a confused peer
    return;
  }
  peer.landing_busy[m.slot] = 0;
  peer.landing_free.push_back(m.slot);
}

}  // namespace kvxfer
