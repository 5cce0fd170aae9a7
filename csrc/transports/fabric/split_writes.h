// SplitWrites: writes with immediate data sent as two writes on rxm over tcp. The data goes as a plain write, then
// a zero-byte write carries the immediate, on the same connection, so the receiver counts it only once the data
// landed; the agent's one completion comes when both completed (the first failure, if any, is its error).
//
// Why: libfabric 1.17's rxm/tcp crashes (SIGSEGV inside fi_av_remove) when it closes a connection that holds a
// write with immediate data half received: what a receiver does when it releases a peer that went silent
// mid-message (stopped, or cut off by a partition). Reproduced in one process: a 64 MiB fi_writedata half
// received, then fi_av_remove with FI_AV_REMOVE_CLEANUP=1 crashes; the same with a plain fi_write does not. A
// zero-byte write is never half received, so a peer's connection can always be closed.
// Threading: progress thread only (the transport's posting and polling).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "transports/transport.h"

namespace kvxfer {

class SplitWrites {
 public:
  struct Pair {
    alignas(16) uint8_t data_ctx[Transport::kContextBytes];
    alignas(16) uint8_t imm_ctx[Transport::kContextBytes];
    void* context = nullptr;  // the agent's
    int remaining = 0;        // halves not completed yet
    std::string error;        // the first half that failed, why
    // The zero-byte write, kept to be posted again while the provider answers EAGAIN (deferred()).
    PeerAddr peer = kUnknownPeer;
    uint32_t rail = 0, imm = 0;
    const void* src = nullptr;
    void* desc = nullptr;
    uint64_t remote_addr = 0, rkey = 0;
  };

  explicit SplitWrites(size_t capacity) : pairs_(capacity) {
    free_.reserve(capacity);
    for (auto& p : pairs_) free_.push_back(&p);
  }

  Pair* take(void* context) {  // nullptr when every pair is in flight (the caller answers EAGAIN)
    if (free_.empty()) return nullptr;
    Pair* p = free_.back();
    free_.pop_back();
    p->context = context;
    p->remaining = 2;
    p->error.clear();
    return p;
  }
  void give_back(Pair* p) { free_.push_back(p); }

  // The pair whose half was posted with this context, or nullptr.
  Pair* owner(const void* ctx) {
    const auto* at = static_cast<const uint8_t*>(ctx);
    const auto* base = reinterpret_cast<const uint8_t*>(pairs_.data());
    if (at < base || at >= base + pairs_.size() * sizeof(Pair)) return nullptr;
    return &pairs_[static_cast<size_t>(at - base) / sizeof(Pair)];
  }

  // One half is over (error empty: it succeeded). True when both are: *context and *error then say what the agent
  // is told, and the pair is free again.
  bool finish(Pair* p, const std::string& error, void** context, std::string* first_error) {
    if (!error.empty() && p->error.empty()) p->error = error;
    if (--p->remaining > 0) return false;
    *context = p->context;
    *first_error = p->error;
    give_back(p);
    return true;
  }

  std::vector<Pair*>& deferred() { return deferred_; }  // zero-byte halves the provider refused for now, in order

 private:
  std::vector<Pair> pairs_;  // sized once: contexts point into it
  std::vector<Pair*> free_;
  std::vector<Pair*> deferred_;
};

}  // namespace kvxfer
