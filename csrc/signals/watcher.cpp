#include "signals/watcher.h"

#include <algorithm>
#include <sstream>

#include "core/agent.h"
#include "core/errors.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVXFER_CPU_RELAX() _mm_pause()
#else
#define KVXFER_CPU_RELAX() std::this_thread::yield()
#endif

namespace kvxfer {
namespace {
constexpr size_t kMaxErrors = 16;
constexpr size_t kMaxSamples = 1 << 20;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}
}  // namespace

SignalWatcher::SignalWatcher(Agent& agent, const std::atomic<uint64_t>* slots, uint32_t num_layers,
                             WatcherOptions options)
    : agent_(agent), slots_(slots), num_layers_(num_layers), options_(options), delivered_(num_layers, 0) {
  KVXFER_CHECK(options.max_bindings >= 1, InvalidArgument, "max_bindings must be at least 1");
  thread_ = std::thread([this] { loop(); });
}

SignalWatcher::~SignalWatcher() { stop(); }

void SignalWatcher::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_.exchange(true)) return;
  }
  cv_.notify_all();
  drained_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

uint64_t SignalWatcher::bind(std::vector<std::shared_ptr<SendState>> sends) {
  uint64_t forward;
  {
    std::lock_guard<std::mutex> lock(mu_);
    KVXFER_CHECK(!stop_, InvalidArgument, "this LayerSignal is closed");
    if (fifo_.size() >= options_.max_bindings) {
      std::ostringstream os;
      os << "LayerSignal overflow: " << fifo_.size() << " forwards (max_bindings) are bound but not fully recorded by "
         << "the device; " << describe_pending_locked()
         << ". Is the graph replaying, and does every forward record every layer once?";
      throw SignalOverflowError(os.str());
    }
    forward = base_ + fifo_.size();
    fifo_.push_back(Binding{std::move(sends)});
    ++stats_.forwards_bound;
  }
  cv_.notify_all();  // wake the watcher: records that arrived before this bind apply now
  return forward;
}

bool SignalWatcher::drain(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  return drained_cv_.wait_until(lock, until, [&] { return fifo_.empty() || stop_ || faulted_; }) && fifo_.empty();
}

uint64_t SignalWatcher::resync() {
  std::lock_guard<std::mutex> lock(mu_);
  KVXFER_CHECK(!stop_, InvalidArgument, "this LayerSignal is closed");
  KVXFER_CHECK(fifo_.empty(), InvalidArgument,
               "LayerSignal.resync() with " << fifo_.size() << " forwards bound and pending (" << describe_pending_locked()
                                            << "); resync before binding, once the warm-up forwards ran (drain() "
                                               "waits for bound ones)");
  // With nothing bound every layer was delivered up to base_ (a forward retires once all its layers moved past).
  const uint64_t top = slots_[0].load(std::memory_order_acquire);
  for (uint32_t l = 1; l < num_layers_; ++l) {
    const uint64_t v = slots_[l].load(std::memory_order_acquire);
    KVXFER_CHECK(v == top, InvalidArgument,
                 "LayerSignal.resync(): layer " << l << " was recorded " << v << " times but layer 0 " << top
                     << " times: a forward is still running (synchronize its stream first, e.g. "
                        "torch.cuda.synchronize()) or a forward does not record every layer once");
  }
  KVXFER_CHECK(top >= base_, InvalidArgument,
               "LayerSignal.resync(): the record counts (" << top << ") are behind the forwards already delivered ("
                                                          << base_ << "): the signal memory was overwritten");
  const uint64_t skipped = top - base_;
  base_ = top;
  std::fill(delivered_.begin(), delivered_.end(), top);
  stats_.forwards_skipped += skipped;
  return skipped;
}

std::string SignalWatcher::describe_pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return describe_pending_locked();
}

std::string SignalWatcher::describe_pending_locked() const {
  std::ostringstream os;
  if (fifo_.empty()) return "nothing pending";
  os << "forward " << base_ << " waits for layers [";
  int shown = 0;
  for (uint32_t l = 0; l < num_layers_; ++l) {
    if (delivered_[l] <= base_) {
      if (shown++ < 16) os << (shown > 1 ? ", " : "") << l;
    }
  }
  if (shown > 16) os << ", ...";
  os << "] (slot counts: ";
  for (uint32_t l = 0; l < std::min<uint32_t>(num_layers_, 8); ++l)
    os << (l ? ", " : "") << slots_[l].load(std::memory_order_acquire);
  os << (num_layers_ > 8 ? ", ..." : "") << "), " << fifo_.size() << " forwards bound and pending";
  return os.str();
}

WatcherStats SignalWatcher::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  WatcherStats s = stats_;
  uint64_t top = 0;
  for (uint32_t l = 0; l < num_layers_; ++l) top = std::max(top, slots_[l].load(std::memory_order_acquire));
  const uint64_t bound = base_ + fifo_.size();
  s.unbound_forwards = top > bound ? top - bound : 0;
  return s;
}

std::vector<std::string> SignalWatcher::errors() const {
  std::lock_guard<std::mutex> lock(mu_);
  return errors_;
}

void SignalWatcher::set_probe(const std::atomic<int64_t>* probe) {
  std::lock_guard<std::mutex> lock(mu_);
  probe_ = probe;
}

std::vector<int64_t> SignalWatcher::take_latency_samples() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> out;
  out.swap(samples_);
  return out;
}

void SignalWatcher::add_error_locked(const std::string& msg) {
  ++stats_.errors;
  if (errors_.size() < kMaxErrors) errors_.push_back(msg);
}

void SignalWatcher::deliver_locked(Binding& b, uint64_t forward, uint32_t layer) {
  for (const auto& send : b.sends) {
    if (layer < send->first_layer || layer >= send->first_layer + send->num_layers) {
      ++stats_.layers_skipped;
      continue;
    }
    try {
      agent_.layer_ready(send, static_cast<int>(layer));
      ++stats_.layers_posted;
    } catch (const std::exception& e) {
      add_error_locked("forward " + std::to_string(forward) + " layer " + std::to_string(layer) + ", transfer " +
                       std::to_string(send->xfer_id) + ": " + e.what());
    }
  }
  ++stats_.records_delivered;
}

bool SignalWatcher::poll_locked() {
  ++stats_.polls;
  bool progress = false;
  const uint64_t limit = base_ + fifo_.size();
  for (uint32_t l = 0; l < num_layers_; ++l) {
    const uint64_t v = slots_[l].load(std::memory_order_acquire);
    if (v < delivered_[l]) {
      faulted_ = true;
      add_error_locked("layer " + std::to_string(l) + " slot went backwards from " + std::to_string(delivered_[l]) +
                       " to " + std::to_string(v) + ": the signal memory was overwritten; delivery stopped");
      drained_cv_.notify_all();
      return false;
    }
    while (delivered_[l] < v && delivered_[l] < limit) {
      Binding& b = fifo_[delivered_[l] - base_];
      deliver_locked(b, delivered_[l], l);
      ++delivered_[l];
      progress = true;
      if (probe_) {
        const int64_t t0 = probe_[l].load(std::memory_order_acquire);
        if (t0 && samples_.size() < kMaxSamples) samples_.push_back(now_ns() - t0);
      }
    }
  }
  if (progress) {
    // A forward retires when every layer has moved past it; forwards retire in order.
    uint64_t low = *std::min_element(delivered_.begin(), delivered_.end());
    while (!fifo_.empty() && low > base_) {
      fifo_.pop_front();
      ++base_;
      ++stats_.forwards_delivered;
    }
    if (fifo_.empty()) drained_cv_.notify_all();
  }
  return progress;
}

void SignalWatcher::loop() {
  auto last_progress = Clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    if (fifo_.empty() || faulted_) {
      // Nothing bound: records that arrive now wait in their slots for the next bind(), which wakes us. No CPU
      // is spent while the engine is idle.
      cv_.wait(lock, [&] { return stop_ || (!fifo_.empty() && !faulted_); });
      last_progress = Clock::now();
      continue;
    }
    if (poll_locked()) {
      last_progress = Clock::now();
      continue;
    }
    lock.unlock();
    if (Clock::now() - last_progress < std::chrono::microseconds(options_.spin_us)) {
      for (int i = 0; i < 64; ++i) KVXFER_CPU_RELAX();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(options_.sleep_us));
    }
    lock.lock();
  }
}

}  // namespace kvxfer
