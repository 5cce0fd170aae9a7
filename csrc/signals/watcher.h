// SignalWatcher: the host half of kvxfer.LayerSignal. A C++ thread reads per-layer record counts that the device
// (a one-thread kernel per record, see csrc/cuda/layer_signal.cu) writes into host-mapped memory, and for each new
// record calls Agent::layer_ready for the sends bound to that forward. No Python runs on this path.
//
// Counting model. slots[L] is the number of times layer L has been recorded since the signal was created (the
// device only ever increments it). Forwards are numbered 0, 1, 2, ... in record order; bind() appends one binding
// per forward to a FIFO, so the k-th bind() belongs to forward k, and forward k's layer L has been recorded exactly
// when slots[L] >= k + 1. The watcher delivers, per layer, every forward in (delivered[L], slots[L]] that has a
// binding; a binding retires when all of its layers were delivered.
//
// Defined edge cases (tests/test_layer_signal.py):
//  - record before bind (late binding): nothing is lost. The count stays in the slot; the records apply the moment
//    the binding for that forward arrives. unbound_forwards() reports how far the device is ahead of bind().
//  - overflow: at most max_bindings forwards may be bound and not yet fully recorded; one more bind() throws
//    SignalOverflow (the device is not recording: the graph is not replaying, or a forward skips a layer).
//  - errors: a bound send that has failed or was aborted, or a layer the caller already marked by hand, makes
//    layer_ready throw; the watcher keeps going, counts it and keeps the first messages (errors()). A layer outside
//    a send's own layer range is skipped on purpose (sends of a layer subset are legal) and counted.
//  - a slot that goes backwards (memory overwritten by someone else) is an error; the watcher stops delivering.
//  - warm-up forwards recorded before any bind() would take the first bindings: resync() passes over them.
//  - close/destruction: stops the thread; bindings not yet delivered are dropped (their sends keep their deadlines).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/transfer.h"

namespace kvxfer {

class Agent;

// Thrown by bind() when max_bindings forwards are bound ahead of the device (kvxfer.errors.SignalOverflow).
class SignalOverflowError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct WatcherOptions {
  uint32_t max_bindings = 64;
  uint32_t spin_us = 50;    // busy-poll this long after the last new record, then sleep between polls
  uint32_t sleep_us = 20;   // sleep between polls once idle (bounds the added latency when the CPU is quiet)
};

struct WatcherStats {
  uint64_t forwards_bound = 0;      // bind() calls
  uint64_t forwards_delivered = 0;  // bindings whose every layer was delivered (retired)
  uint64_t records_delivered = 0;   // (forward, layer) pairs delivered
  uint64_t layers_posted = 0;       // successful layer_ready calls
  uint64_t layers_skipped = 0;      // layer outside a bound send's range
  uint64_t errors = 0;              // layer_ready calls that threw, and slot faults
  uint64_t unbound_forwards = 0;    // forwards the device recorded at least one layer of, with no binding yet
  uint64_t forwards_skipped = 0;    // recorded with no binding and passed over by resync() (warm-up forwards)
  uint64_t polls = 0;
};

class SignalWatcher {
 public:
  // slots: num_layers counters in memory the device writes; must outlive the watcher.
  SignalWatcher(Agent& agent, const std::atomic<uint64_t>* slots, uint32_t num_layers, WatcherOptions options);
  ~SignalWatcher();
  SignalWatcher(const SignalWatcher&) = delete;
  SignalWatcher& operator=(const SignalWatcher&) = delete;

  // Appends the binding for the next forward; returns its forward index. Sends must be of `agent` and their layers
  // within [0, num_layers) (checked by the caller, who knows both). Throws SignalOverflowError when full.
  uint64_t bind(std::vector<std::shared_ptr<SendState>> sends);
  // Blocks until every bound forward was delivered; false on timeout (describe_pending() says what is missing).
  bool drain(double timeout_s);
  // Passes over every forward the device recorded so far without a binding (warm-up runs before capture, eager
  // forwards): the next bind() is for the next forward recorded from now on. Returns how many were passed over.
  // Throws InvalidArgument while forwards are bound and pending, or while a forward is recorded only in part
  // (layers' counts differ: its stream still runs, or a forward skipped layers).
  uint64_t resync();
  std::string describe_pending() const;  // which layers the oldest bound forward still waits for
  WatcherStats stats() const;
  std::vector<std::string> errors() const;
  void stop();

  // Latency probe for benchmarks: when set, delivering layer L subtracts probe[L] (steady-clock ns stored by the
  // writer just before its slot write) from the delivery time and keeps the sample.
  void set_probe(const std::atomic<int64_t>* probe);
  std::vector<int64_t> take_latency_samples();

 private:
  struct Binding {
    std::vector<std::shared_ptr<SendState>> sends;
  };
  void loop();
  bool poll_locked();  // with mu_ held; true when something was delivered
  void deliver_locked(Binding& b, uint64_t forward, uint32_t layer);
  void add_error_locked(const std::string& msg);
  std::string describe_pending_locked() const;

  Agent& agent_;
  const std::atomic<uint64_t>* slots_;
  const uint32_t num_layers_;
  const WatcherOptions options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;        // the watcher waits here while nothing is bound
  std::condition_variable drained_cv_;
  std::deque<Binding> fifo_;          // fifo_[i] is forward base_ + i
  uint64_t base_ = 0;
  std::vector<uint64_t> delivered_;   // [layer] forwards whose layer was delivered (or skipped past)
  std::vector<std::string> errors_;   // first kMaxErrors messages
  bool faulted_ = false;
  WatcherStats stats_;
  const std::atomic<int64_t>* probe_ = nullptr;
  std::vector<int64_t> samples_;

  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace kvxfer
