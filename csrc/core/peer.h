// PeerState: a remote agent as this agent knows it, with both directions' bookkeeping.
//   sender side  : free slots, the live send per slot, live transfer ids (duplicates refused).
//   receiver side: one SlotCounter per slot the peer uses towards us, transfer id -> slot, recvs waiting for
//                  their BEGIN, and transfers that completed before anyone asked for them.
// Everything mutable is guarded by mu (taken by the caller's thread in send()/recv() and by the progress thread).
#pragma once
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "core/imm.h"
#include "core/metadata.h"
#include "core/peer_key.h"
#include "core/transfer.h"
#include "gpu/cuda_device.h"
#include "transports/host_ipc/doorbell.h"
#include "transports/transport.h"

namespace kvxfer {

struct SlotCounter {
  bool in_use = false;      // a granule or a BEGIN arrived and the slot was not released since
  bool begun = false;       // BEGIN arrived: the fields below are known
  bool aborted = false;     // the transfer failed (sender's ABORT or a protocol violation); wait for its writes
  bool abort_total_known = false;  // the sender's ABORT said how many granules it posted: abort_total
  uint64_t abort_total = 0;
  uint64_t seen = 0;        // granules counted for this slot since it was last reset (also while aborted)
  uint64_t xfer_id = 0;
  uint32_t first_layer = 0, num_layers = 0, granules_per_layer = 0;
  uint32_t layers_complete = 0;
  std::vector<uint32_t> counts;  // [ImmCode::kMaxLayers] granules seen per absolute layer
  std::shared_ptr<RecvState> recv;
  // The recvs bound to this transfer, kept after they failed or were cancelled: told at the end (usually one; a
  // recv re-posted under the same id after a failure is a second).
  std::vector<std::shared_ptr<RecvState>> watchers;

  void watch(const std::shared_ptr<RecvState>& r) {
    if (std::find(watchers.begin(), watchers.end(), r) == watchers.end()) watchers.push_back(r);
  }
  bool watches(const std::shared_ptr<RecvState>& r) const {
    return std::find(watchers.begin(), watchers.end(), r) != watchers.end();
  }

  // Ready for the next transfer the sender binds to this slot. No write of the last one can arrive any more.
  void reset() {
    for (auto& w : watchers) w->writes_over.store(true, std::memory_order_release);
    watchers.clear();
    if (!counts.empty()) std::fill(counts.begin(), counts.end(), 0);
    in_use = begun = aborted = abort_total_known = false;
    abort_total = seen = 0;
    layers_complete = 0;
    recv.reset();
  }
};

// Per-slot state, allocated kChunk slots at a time when first touched. A peer uses the slots of one window each way
// (at most 128 by default), so a peer costs ~16 KiB of slot state instead of ~550 KiB for all kMaxSlots, which
// every peer ever added (removed and restarted ones stay listed, lost) kept for the agent's lifetime.
template <typename T>
class WindowedSlots {
 public:
  static constexpr uint32_t kChunk = 128;
  T& operator[](uint32_t slot) {  // slot < ImmCode::kMaxSlots (messages and immediates are checked on arrival)
    auto& w = chunks_[slot / kChunk];
    if (!w) w = std::make_unique<std::array<T, kChunk>>();
    return (*w)[slot % kChunk];
  }
  template <typename F>
  void for_each(F&& f) {  // the slots of the chunks touched so far (the others hold default state)
    for (auto& w : chunks_)
      if (w)
        for (auto& t : *w) f(t);
  }
  template <typename F>
  void for_each(F&& f) const {
    for (const auto& w : chunks_)
      if (w)
        for (const auto& t : *w) f(t);
  }

 private:
  std::array<std::unique_ptr<std::array<T, kChunk>>, ImmCode::kMaxSlots / kChunk> chunks_{};
};

struct PeerState {
  PeerState() = default;
  PeerState(const PeerState&) = delete;
  PeerState& operator=(const PeerState&) = delete;
  ~PeerState() {
    if (pidfd >= 0) close(pidfd);
  }
  AgentInfo info;
  PeerAddr addr = kUnknownPeer;
  uint32_t rails = 1;             // fabric rails usable towards this peer
  uint32_t next_rail = 0;         // progress thread only: round-robin cursor
  std::string path;               // "cma" or the fabric transport name: how we write to this peer
  bool same_host = false;
  // Same-host peers: a pidfd of the peer's process, readable once it exited (zombie included); -1 where the kernel
  // has no pidfd_open (liveness then falls back to kill() and /proc/<pid>/stat).
  int pidfd = -1;
  std::string path_reason;        // why this path (e.g. why not cma)
  // Same-host peers: their doorbell rings mapped here; signals and control messages to them go there, not over the
  // fabric (null: signals_reason says why).
  std::unique_ptr<DoorbellLink> doorbell;
  std::string signals_reason;
  std::atomic<bool> connected{false};   // HELLO arrived on every common rail
  uint32_t hello_rails = 0;             // bit r: HELLO arrived on rail r (guarded by the agent's peers_mu_)
  std::atomic<bool> lost{false};
  std::string lost_reason;
  Clock::time_point lost_at;     // guarded by mu
  // Progress thread: when the last message to this peer after it was lost (a farewell: ABORT, BYE) was posted.
  // Releasing the peer closes its connection, which may drop a message still on its way (UCX closes by force), so
  // release waits a while after it (release_lost_peer).
  Clock::time_point farewell_posted_at{};
  bool transport_released = false;  // transport_mu_: the transport dropped its connection (release_lost_peer), or
                                    // must not touch it (an agent of this process closing it)
  // The keys this peer writes into us with (Agent::open_peer_keys), one per entry of the agent's remote_windows_,
  // in its order; guarded by the agent's transport_mu_. Closed when the peer is released: then `fenced` (progress
  // thread) says nothing it posted can land any more, where that is the peer's only way in (another host).
  std::vector<MemoryKey> keys;
  bool fenced = false;
  // Progress thread: we ended this peer ourselves (end_peer_now) after an ABORT with its total for each of our sends:
  // its own ABORTs and its answering BYE (the totals of its sends to us) are still read after it is lost, to settle
  // our ended recvs from it. abort_code: what our ABORTs to it say (kAbort*), set while we end it.
  bool farewell = false;
  uint32_t abort_code = 0;
  // Heartbeat (progress thread): `heard` counts what came from the peer (messages, immediates, doorbell entries);
  // each check that finds it moved stamps last_heard (steady-clock ns, read by Peer.silent_s).
  uint64_t heard = 0, heard_seen = 0;
  std::atomic<int64_t> last_heard_ns{0};

  std::mutex mu;
  // sender side: the slots of the window the peer gave us in its HELLO (empty until then)
  bool have_window = false;
  uint32_t tx_window_slots = 0;  // its size (the peer's kMaxSlots / max_peers)
  std::vector<uint32_t> free_slots;
  WindowedSlots<std::shared_ptr<SendState>> send_by_slot;
  std::unordered_map<uint64_t, std::shared_ptr<SendState>> live_sends;
  std::unordered_map<uint32_t, std::shared_ptr<SendState>> quarantined;  // slot -> failed send, until ABORT_ACK
  // Sends made while every slot was taken, in call order: each gets the next slot that comes back.
  std::deque<std::shared_ptr<SendState>> slot_waiters;
  // Ids the peer cancelled (CANCEL) before we sent them: send() refuses them. Bounded like `arrived`.
  std::unordered_set<uint64_t> cancelled_ids;
  std::deque<uint64_t> cancelled_order;
  // receiver side: the window of slots we gave the peer (the agent's window_slots from rx_window * window_slots)
  uint32_t rx_window = 0;
  // This adding of the peer (control.h, "association"): our number for it, sent in our HELLOs, which the peer's
  // messages must carry; and the peer's, from its HELLO, which ours carry. Written before the peer is listed (link)
  // or under peers_mu_ (peer_link, read by the progress thread that writes it).
  uint32_t link = 0;
  uint32_t peer_link = 0;
  // Per-peer keys: the salt our writes to this peer derive their keys from (peer_key.h), known with peer_link
  // (Agent::learn_peer_link); 0: we write with the keys it published, as they are.
  uint64_t write_salt = 0;
  uint64_t write_key(uint64_t published) const { return published && write_salt ? peer_key(published, write_salt) : published; }
  WindowedSlots<SlotCounter> slots;                              // counts allocated lazily too
  std::unordered_map<uint64_t, uint32_t> slot_of_xfer;
  std::unordered_map<uint64_t, std::shared_ptr<RecvState>> waiting_recvs;   // recv() before BEGIN
  std::unordered_map<uint64_t, std::shared_ptr<RecvState>> live_recvs;
  // Recvs ended because this peer was removed (or removed us, or restarted) while its process may live: writes it
  // had posted may still land, so their writes_over waits until the process is seen gone (same host) — never
  // guessed. A restarted peer on another host is taken as gone (its successor is the evidence), settled by the
  // progress thread like the rest, after its batches still copying into a GPU pool have landed.
  std::vector<std::shared_ptr<RecvState>> removed_recvs;
  // Recvs we cancelled (CANCEL sent) that no slot watches yet: their writes_over waits for the sender's CANCEL_ACK,
  // or for a BEGIN / ABORT of theirs that binds them to a slot (which then tells them when it resets).
  std::unordered_map<uint64_t, std::shared_ptr<RecvState>> cancelled_recvs;
  bool settle_removed_now = false;
  struct Arrived { uint32_t first_layer, num_layers, granules_per_layer; };
  std::unordered_map<uint64_t, Arrived> arrived;                 // complete before recv() was called
  std::deque<uint64_t> arrived_order;                            // bounds `arrived` (oldest evicted)
  // Transfers the sender abandoned (ABORT) before anyone called recv() for them -> their slot: a later recv()
  // fails at once instead of waiting out its deadline for a BEGIN that will never come.
  std::unordered_map<uint64_t, uint32_t> abandoned;
  std::deque<uint64_t> abandoned_order;                          // bounds `abandoned` (oldest evicted)
  // CUDA IPC: the peer's GPU pools mapped into this process by the first cuda_ipc send to each (kept while the
  // peer state lives, so a copy in flight never outlives its mapping).
  std::unordered_map<uint32_t, std::vector<uint64_t>> ipc_region_start;   // dst pool -> [regions] mapped start
  std::unordered_map<uint32_t, int> ipc_mapped_on;                        // dst pool -> the device it was mapped for
  std::vector<std::unique_ptr<gpu::IpcMapping>> ipc_mappings;
  std::vector<std::unique_ptr<gpu::VmmMapping>> vmm_mappings;  // the peer's cuMem/VMM regions (gpu/vmm.h)
  // Landing slots the peer gave us (its info.landing_slots of our window): free ones, and which are written and not
  // yet handed back with LANDED. Progress thread only.
  std::vector<uint32_t> landing_free;
  std::vector<uint8_t> landing_busy;


  // Hands `send` a free slot of our window (mu held; free_slots not empty).
  void take_slot(const std::shared_ptr<SendState>& send) {
    send->slot = free_slots.back();
    free_slots.pop_back();
    send_by_slot[send->slot] = send;
  }

  // A slot returns to the free list once (RELEASE or ABORT_ACK for a quarantined slot, whichever comes first).
  bool reclaim(uint32_t slot, uint64_t xfer_id) {
    auto it = quarantined.find(slot);
    if (it == quarantined.end() || it->second->xfer_id != xfer_id) return false;
    it->second->writes_over.store(true, std::memory_order_release);  // the receiver counted every write it posted
    quarantined.erase(it);
    free_slots.push_back(slot);
    return true;
  }

  // Every recv from this peer whose end is not settled yet, once each (mu held): live ones, those waiting for their
  // BEGIN, cancelled ones waiting for the sender's answer, and failed ones a slot still watches.
  std::vector<std::shared_ptr<RecvState>> unsettled_recvs() const {
    std::vector<std::shared_ptr<RecvState>> out;
    auto add = [&](const std::shared_ptr<RecvState>& r) {
      if (std::find(out.begin(), out.end(), r) == out.end()) out.push_back(r);
    };
    for (const auto& [id, r] : live_recvs) add(r);
    for (const auto& [id, r] : waiting_recvs) add(r);
    for (const auto& [id, r] : cancelled_recvs) add(r);
    slots.for_each([&](const SlotCounter& slot) {
      for (const auto& w : slot.watchers) add(w);
    });
    return out;
  }

  // The peer's HELLO named our window [base, base + size), checked with ImmCode::valid_window (mu held).
  void take_window(uint32_t base, uint32_t size) {
    if (have_window) return;
    have_window = true;
    tx_window_slots = size;
    if (doorbell) doorbell->set_ring(base / size);
    free_slots.reserve(size);
    for (uint32_t s = base + size; s-- > base;) free_slots.push_back(s);
  }
};

}  // namespace kvxfer
