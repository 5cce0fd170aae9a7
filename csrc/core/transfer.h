// Send / Recv state shared between the caller's thread (Python, GIL released) and the progress thread.
//
// Lifecycle of both: PENDING -> DONE | FAILED, exactly once; state() and layer_done() are O(1) atomic reads and
// never block. The progress thread is the only writer of counts; fail() may also be called by the caller's thread
// (a refused transfer), so finishing is guarded by a compare-exchange.
#pragma once
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "core/errors.h"
#include "core/plan.h"

namespace kvxfer {

enum class TransferState : int { Pending = 0, Done = 1, Failed = 2 };
using Clock = std::chrono::steady_clock;

// An optional copy of a transfer's layer completions in memory that something outside the process's locks can watch:
// kvxfer.DeviceCounter points it at host-mapped words a GPU spin-waits on. Each layer that completes stores `value`
// into words[layer] (absolute layer index) with release ordering; a failure stores `value` into *fail_word.
// `owner` keeps the memory alive for as long as the transfer may write it.
struct LayerMirror {
  std::shared_ptr<void> owner;
  std::atomic<uint32_t>* words = nullptr;
  std::atomic<uint32_t>* fail_word = nullptr;
  uint32_t value = 0;
};

// Counts the transfers of one agent that ended (DONE or FAILED), so an engine watching many of them can sleep until
// one ends instead of polling each (Agent::wait_ended).
class EndSignal {
 public:
  uint64_t count() const { return count_.load(std::memory_order_acquire); }
  void bump() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      count_.fetch_add(1, std::memory_order_acq_rel);
    }
    cv_.notify_all();
  }
  // True once the count differs from `seen`; false when timeout_s passed first. Call without the GIL.
  bool wait_changed(uint64_t seen, double timeout_s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] { return count() != seen; });
  }

 private:
  std::atomic<uint64_t> count_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

class TransferBase {
 public:
  TransferBase(uint64_t xfer_id, uint32_t first_layer, uint32_t num_layers, double timeout_s);
  virtual ~TransferBase() = default;

  const uint64_t xfer_id;
  const uint32_t first_layer, num_layers;
  const Clock::time_point deadline;

  TransferState state() const { return static_cast<TransferState>(state_.load(std::memory_order_acquire)); }
  bool layer_done(uint32_t layer) const;  // absolute layer index
  uint32_t layers_done() const { return layers_done_.load(std::memory_order_acquire); }
  ErrorKind error_kind() const { return error_kind_; }   // valid once state() == Failed
  // When the transfer ended (DONE or FAILED), in seconds of CLOCK_MONOTONIC (Python's time.perf_counter() and
  // time.monotonic() read the same clock); 0 while pending. Callers measure latency from it without their own
  // thread's scheduling in the number.
  double finished_at() const { return finished_at_.load(std::memory_order_acquire); }
  const std::string& error() const { return error_; }

  // Attaches a mirror (at most once per transfer; caller thread). Layers already done, or an earlier failure, are
  // written to it at once, so attaching after the data arrived is fine.
  void set_mirror(std::shared_ptr<const LayerMirror> mirror);

  // Blocks (call without the GIL) until the transfer (layer < 0) or one layer is done or failed. Returns the
  // state; throws TransferTimeout when timeout_s passes first (the transfer itself goes on).
  TransferState wait(int layer, double timeout_s);

  // The agent's EndSignal, bumped when this transfer ends (set once, before the transfer is shared).
  void set_end_signal(std::shared_ptr<EndSignal> ends) { ends_ = std::move(ends); }

  // Progress-thread side.
  void mark_layer_done(uint32_t layer);
  bool finish();                                             // -> Done; false if already finished
  bool fail(ErrorKind kind, const std::string& message);     // -> Failed; false if already finished

 protected:
  void notify();

  std::atomic<int> state_{0};
  std::atomic<uint32_t> layers_done_{0};
  std::unique_ptr<std::atomic<uint8_t>[]> layer_flags_;  // [num_layers]
  ErrorKind error_kind_ = ErrorKind::Internal;
  std::string error_;
  std::mutex mu_;
  std::condition_variable cv_;
  // Threads in wait() for one layer. A layer's completion wakes waiters only when there are some: a whole-transfer
  // wait() (what recv.wait() does) woken at every layer of a 32-layer request cost a 2-core host a context switch
  // per layer on the path it waits for (kvxfer-compare's 1-block request).
  std::atomic<uint32_t> layer_waiters_{0};
  std::atomic<bool> finishing_{false};
  std::shared_ptr<EndSignal> ends_;
  std::atomic<double> finished_at_{0.0};
  void stamp_finish();
  std::shared_ptr<const LayerMirror> mirror_owner_;           // written once, before mirror_ is published
  std::atomic<const LayerMirror*> mirror_{nullptr};
  std::mutex mirror_mu_;                                       // set_mirror vs set_mirror only
};

struct PeerState;
struct LocalPool;
class CmaJob;

// How a send's bytes reach the peer. Chosen once per send from where both pools live (Agent::choose_path).
//   Fabric  : libfabric writes with immediates (host memory, or GPU memory the provider registered with FI_HMEM)
//   Cma     : same-host host memory, process_vm_writev + zero-byte immediates
//   CudaIpc : same-host GPU destination mapped with CUDA IPC; copy engines, then zero-byte immediates
//   Staged  : source copied into pinned bounce slots, then written from there (over the fabric or CMA)
enum class SendPath : uint8_t { Fabric = 0, Cma = 1, CudaIpc = 2, Staged = 3 };
const char* send_path_name(SendPath p);

// Sender side of one transfer. The plan is immutable after construction; cursors belong to the progress thread.
class SendState : public TransferBase {
 public:
  SendState(uint64_t xfer_id, WritePlan plan, double timeout_s)
      : TransferBase(xfer_id, plan.first_layer, plan.num_layers, timeout_s), plan(std::move(plan)) {}
  const WritePlan plan;
  std::shared_ptr<PeerState> peer;
  uint32_t slot = 0;
  // Every slot of the peer's window was in flight when send() ran: the send waits in PeerState::slot_waiters for
  // one to come back and holds no slot until then (guarded by the peer's mu).
  bool waiting_for_slot = false;
  uint32_t src_pool = 0, dst_pool = 0;
  const LocalPool* src = nullptr;   // stable: pools are never freed while the agent lives
  std::unique_ptr<std::atomic<uint8_t>[]> marked;  // [num_layers] layer_ready() called (caller thread)
  SendPath path = SendPath::Fabric;
  std::string path_reason;           // why this path and what it costs (Send.path_reason)
  bool staged_to_cma = false;        // Staged: the bounce slots are copied out with CMA (same-host host pool)
  bool landing = false;              // Staged: written into the peer's landing slots, which copies into its pool
  uint64_t batch_bytes = 0;          // Staged: data bytes one bounce slot batch may carry
  int copy_device = -1;              // CudaIpc / Staged from GPU: the device whose copy engines move the bytes
  std::vector<uint64_t> dst_mapped;  // CudaIpc: [dst regions] the peer's region start mapped into this process

  // Progress-thread state.
  struct Cursor {
    uint32_t layer_index;
    uint32_t next;
    uint64_t ticket = 0;          // CudaIpc: the event after the layer's copies (shared by a batched launch)
    std::shared_ptr<CmaJob> cma;  // Cma: the layer's copy running on the CMA workers
    uint64_t token = 0;           // CudaIpc, batched launch: the layer's completion token (CopyQueue::copy_layers)
  };
  std::vector<Cursor> ready;        // layers marked and not yet fully posted, in marking order
  uint64_t ops_posted = 0, ops_completed = 0, ops_expected = 0;
  uint64_t granules_posted = 0;  // sum of the immediates' granules posted so far (an ABORT reports it)
  uint64_t bytes_in_flight = 0;  // fabric path: bytes posted and not yet completed here
  // Fabric path on ordered rails: granules of layer `unsignalled_layer` written on each rail since its last
  // immediate. The layer counts as posted, and an ABORT goes out, only once they are all signalled (zero).
  std::array<uint32_t, 16> unsignalled{};
  std::array<uint64_t, 16> unsignalled_bytes{};
  uint32_t unsignalled_layer = 0;
  uint64_t rail_signals = 0, rail_signals_completed = 0;  // those zero-byte writes, within ops_posted / ops_completed
  uint32_t staging_held = 0;     // staged path: bounce slots holding this send's batches (copied in, not written out)
  uint64_t copy_in_turn = 0, copied_in = 0;  // staged from host memory: bytes memcpy'd into slots in that turn
  uint32_t layers_posted = 0;
  bool begin_sent = false, released = false, aborted = false;
  // Nothing this send posted is in flight any more, so its source blocks may be reused: it completed, or it failed
  // and the receiver has counted every write it posted (RELEASE / ABORT_ACK), or the peer is lost and every write
  // and copy it started has completed here.
  std::atomic<bool> writes_over{false};
};

// The message for a recv whose expectation differs from what the sender announced (layers, chunks per layer).
std::string describe_count_mismatch(uint32_t sender_first, uint32_t sender_num, uint32_t sender_granules,
                                    uint32_t recv_first, uint32_t recv_num, uint32_t recv_granules);

// Receiver side of one transfer.
class RecvState : public TransferBase {
 public:
  RecvState(uint64_t xfer_id, uint32_t first_layer, uint32_t num_layers, uint32_t granules_per_layer,
            double timeout_s)
      : TransferBase(xfer_id, first_layer, num_layers, timeout_s), granules_per_layer(granules_per_layer) {}
  const uint32_t granules_per_layer;
  // No write of this transfer can land in its blocks any more: it completed, its sender's process is gone, or it
  // failed and every write the sender posted has since been counted. Until then a failed recv's blocks are not
  // safe to reuse.
  std::atomic<bool> writes_over{false};
};

}  // namespace kvxfer
