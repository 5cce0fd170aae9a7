#include "core/transfer.h"

#include <time.h>

namespace kvxfer {

TransferBase::TransferBase(uint64_t xfer_id, uint32_t first_layer, uint32_t num_layers, double timeout_s)
    : xfer_id(xfer_id),
      first_layer(first_layer),
      num_layers(num_layers),
      deadline(Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s))),
      layer_flags_(new std::atomic<uint8_t>[num_layers]) {
  for (uint32_t i = 0; i < num_layers; ++i) layer_flags_[i].store(0, std::memory_order_relaxed);
}

bool TransferBase::layer_done(uint32_t layer) const {
  KVXFER_CHECK(layer >= first_layer && layer < first_layer + num_layers, InvalidArgument,
               "layer " << layer << " is not part of transfer " << xfer_id << " (layers " << first_layer << ".."
                        << first_layer + num_layers - 1 << ")");
  return layer_flags_[layer - first_layer].load(std::memory_order_acquire) != 0;
}

void TransferBase::notify() {
  // Taking the lock orders this after a waiter's check of its condition; notifying after releasing it keeps the
  // woken thread from blocking at once on the mutex we still hold.
  { std::lock_guard<std::mutex> lock(mu_); }
  cv_.notify_all();
}

void TransferBase::mark_layer_done(uint32_t layer) {
  const uint32_t i = layer - first_layer;
  // The mirror is written before the flag, so whoever sees the layer done (wait(), layer_done()) also sees the
  // mirror; and again after it, with a seq_cst fence matching set_mirror's, so that a mirror attached in between is
  // not missed by both sides. The same value twice is harmless.
  if (layer_flags_[i].load(std::memory_order_acquire) != 0) return;
  if (const LayerMirror* m = mirror_.load(std::memory_order_acquire))
    m->words[layer].store(m->value, std::memory_order_release);
  if (layer_flags_[i].exchange(1, std::memory_order_acq_rel) == 0) {
    layers_done_.fetch_add(1, std::memory_order_acq_rel);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (const LayerMirror* m = mirror_.load(std::memory_order_acquire))
      m->words[layer].store(m->value, std::memory_order_release);
    // Flag, then (fence above) waiters; wait() counts itself, then (fence) reads the flag: one of us sees the other.
    if (layer_waiters_.load(std::memory_order_seq_cst) != 0) notify();
  }
}

void TransferBase::set_mirror(std::shared_ptr<const LayerMirror> mirror) {
  std::lock_guard<std::mutex> lock(mirror_mu_);
  KVXFER_CHECK(!mirror_owner_, InvalidArgument, "transfer " << xfer_id << " already has a device counter attached");
  mirror_owner_ = std::move(mirror);
  const LayerMirror* m = mirror_owner_.get();
  mirror_.store(m, std::memory_order_release);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  // The progress thread may have marked layers (or failed) before it could see the mirror: write those now. Both
  // sides store the same value, so writing twice is harmless.
  for (uint32_t i = 0; i < num_layers; ++i)
    if (layer_flags_[i].load(std::memory_order_acquire)) m->words[first_layer + i].store(m->value, std::memory_order_release);
  if (state() == TransferState::Failed) m->fail_word->store(m->value, std::memory_order_release);
}

void TransferBase::stamp_finish() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  finished_at_.store(static_cast<double>(ts.tv_sec) + ts.tv_nsec * 1e-9, std::memory_order_release);
}

bool TransferBase::finish() {
  if (finishing_.exchange(true)) return false;
  stamp_finish();
  state_.store(static_cast<int>(TransferState::Done), std::memory_order_release);
  notify();
  if (ends_) ends_->bump();
  return true;
}

bool TransferBase::fail(ErrorKind kind, const std::string& message) {
  if (finishing_.exchange(true)) return false;
  stamp_finish();
  error_kind_ = kind;
  error_ = message;
  // Mirror before and after the state, for the same reasons as in mark_layer_done.
  if (const LayerMirror* m = mirror_.load(std::memory_order_acquire))
    m->fail_word->store(m->value, std::memory_order_release);
  state_.store(static_cast<int>(TransferState::Failed), std::memory_order_release);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (const LayerMirror* m = mirror_.load(std::memory_order_acquire))
    m->fail_word->store(m->value, std::memory_order_release);
  notify();
  if (ends_) ends_->bump();
  return true;
}

TransferState TransferBase::wait(int layer, double timeout_s) {
  if (layer >= 0) layer_done(static_cast<uint32_t>(layer));  // validates the index
  auto ready = [&] {
    if (state() != TransferState::Pending) return true;
    return layer >= 0 && layer_flags_[layer - first_layer].load(std::memory_order_acquire) != 0;
  };
  struct LayerWaiter {  // counted while waiting, so mark_layer_done knows to wake us
    std::atomic<uint32_t>* n;
    explicit LayerWaiter(std::atomic<uint32_t>* count) : n(count) {
      if (n) {
        n->fetch_add(1, std::memory_order_seq_cst);
        std::atomic_thread_fence(std::memory_order_seq_cst);
      }
    }
    ~LayerWaiter() { if (n) n->fetch_sub(1, std::memory_order_seq_cst); }
  } counted(layer >= 0 ? &layer_waiters_ : nullptr);
  std::unique_lock<std::mutex> lock(mu_);
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  if (!cv_.wait_until(lock, until, ready)) {
    KVXFER_THROW(TransferTimeout, "transfer " << xfer_id << (layer >= 0 ? " layer " + std::to_string(layer) : "")
                                              << " not complete after " << timeout_s << " s ("
                                              << layers_done() << "/" << num_layers
                                              << " layers arrived); the peer may be slow, stalled or gone");
  }
  if (layer >= 0 && layer_flags_[layer - first_layer].load(std::memory_order_acquire)) return TransferState::Done;
  return state();
}

std::string describe_count_mismatch(uint32_t sf, uint32_t sn, uint32_t sg, uint32_t rf, uint32_t rn, uint32_t rg) {
  return "the sender writes layers [" + std::to_string(sf) + ", " + std::to_string(sf + sn) + ") with " +
         std::to_string(sg) + " chunks per layer; this recv expects layers [" + std::to_string(rf) + ", " +
         std::to_string(rf + rn) + ") with " + std::to_string(rg) +
         " (block count or layer range differs between send and recv)";
}

const char* send_path_name(SendPath p) {
  switch (p) {
    case SendPath::Fabric: return "fabric";
    case SendPath::Cma: return "cma";
    case SendPath::CudaIpc: return "cuda_ipc";
    case SendPath::Staged: return "staged";
  }
  return "?";
}

}  // namespace kvxfer
