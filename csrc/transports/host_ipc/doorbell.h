// Doorbell: same-host signals through shared memory instead of the fabric.
//
// Peers on one host move their bytes without the network (CMA, CUDA IPC, a staged copy-out), yet each layer's
// completion used to cross the fabric as a zero-byte write with immediate data, and every BEGIN/RELEASE as a fabric
// message: on loopback tcp each is a few syscalls and a provider progress round, on the GPU host tens of
// microseconds of a ~1 ms transfer. Here every agent owns one memfd holding a single-producer single-consumer ring
// per slot window (the window a peer was given in its HELLO, so a ring's producer is exactly one peer): as many
// rings as the agent has windows (max_peers). A same-host
// sender maps its receiver's memfd once at add_peer (pidfd_getfd: the same ptrace permission CMA already needs)
// and appends 64-byte entries - an immediate, or a control message - that the receiver's progress thread drains.
//
// Wake-ups: a receiver that blocks in poll() first raises `sleeping` in the region, then re-checks its rings; a
// producer publishes its entry, then reads `sleeping` and, if set, writes the receiver's eventfd (its wake fd, also
// taken with pidfd_getfd). Both sides put a full fence between their store and their load, so one of them always
// sees the other.
//
// Trust: the region is sealed against resizing (no SIGBUS on either side), entries are copied out before they are
// looked at, a ring's entries count only for the peer that owns that window, and control messages go through the
// same checks as fabric ones. A same-host process with ptrace permission could write our memory anyway (CMA), so
// the doorbell adds no reach it did not already have.
#pragma once
#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/control.h"
#include "core/imm.h"

namespace kvxfer {

struct DoorbellEntry {
  enum Kind : uint32_t { kImm = 1, kControl = 2 };
  std::atomic<uint32_t> seq;  // ring position + 1 (mod 2^32), stored last: the entry is complete once it matches
  uint32_t kind;
  uint32_t imm;
  uint32_t reserved;
  ControlMessage msg;
};
static_assert(sizeof(DoorbellEntry) == 64, "one doorbell entry per cache line");
static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free,
              "shared-memory atomics must be lock-free to work across processes");

// What a receiver takes out of a ring (copied: the producer may reuse the entry once the head moves).
struct DoorbellItem {
  uint32_t kind;
  uint32_t imm;
  ControlMessage msg;
};

namespace doorbell {
constexpr uint32_t kMagic = 0x4244584b;  // "KXDB"
constexpr uint32_t kVersion = 1;
constexpr uint32_t kEntries = 1024;                // per ring: 64 KiB, touched only by peers that use it

struct Header {
  uint32_t magic, version, rings, entries;
  alignas(64) std::atomic<uint32_t> sleeping;  // the owner's progress thread is (about to be) blocked in poll()
};
struct Ring {
  alignas(64) std::atomic<uint64_t> head;  // the consumer's position, published for the producer's flow control
  alignas(64) DoorbellEntry entries[kEntries];
};
constexpr size_t kRingsOffset = (sizeof(Header) + 63) / 64 * 64;
constexpr size_t region_bytes(uint32_t rings) { return kRingsOffset + sizeof(Ring) * rings; }
}  // namespace doorbell

// The receiving side: this agent's region. Everything but the constructor runs on the owner's progress thread.
class DoorbellRegion {
 public:
  // One ring per slot window (1..ImmCode::kMaxPeersLimit); pages are touched only for rings in use.
  explicit DoorbellRegion(uint32_t rings);  // throws TransportUnavailable naming the call that failed
  ~DoorbellRegion();
  DoorbellRegion(const DoorbellRegion&) = delete;
  DoorbellRegion& operator=(const DoorbellRegion&) = delete;

  int fd() const { return fd_; }
  uint32_t rings() const { return static_cast<uint32_t>(heads_.size()); }
  // Empties ring w for a new producer (before the HELLO that hands the window out).
  void reset(uint32_t w);
  // Copies up to max complete entries of ring w into out and consumes them; returns how many.
  size_t drain(uint32_t w, DoorbellItem* out, size_t max);
  // Raises the sleeping flag and returns false if a ring in `mask` already holds an entry (the flag is then down
  // again); the caller may block until woken, then calls wake_up().
  bool prepare_to_sleep(const std::vector<uint32_t>& rings);
  void wake_up();

 private:
  doorbell::Ring& ring(uint32_t w) const;
  bool has_entry(uint32_t w) const;
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  size_t bytes_ = 0;
  std::vector<uint64_t> heads_;  // private copies: a producer cannot move our read position
};

// The sending side: a same-host peer's region mapped into this process. Progress thread only.
class DoorbellLink {
 public:
  // Maps the region `region_fd` of process `pid` and takes its wake eventfd (wake_fd < 0: it never blocks); each
  // wake-up adds one to *wakes. Returns nullptr with *why set when it cannot (old kernel, no ptrace permission,
  // not a doorbell region).
  static std::unique_ptr<DoorbellLink> open(pid_t pid, int region_fd, int wake_fd, std::atomic<uint64_t>* wakes,
                                            std::string* why);
  ~DoorbellLink();
  DoorbellLink(const DoorbellLink&) = delete;
  DoorbellLink& operator=(const DoorbellLink&) = delete;

  // The ring to write to: the window the peer gave us in its HELLO. Entries are posted only after this.
  // false: the region has no ring w (the HELLO does not match the region the peer exposes).
  bool set_ring(uint32_t w) {
    if (w >= rings_) return false;
    ring_.store(static_cast<int>(w), std::memory_order_release);
    return true;
  }
  bool ready() const { return ring_.load(std::memory_order_acquire) >= 0; }
  uint32_t rings() const { return rings_; }
  // false: the ring is full (the receiver has not drained it yet); retry later.
  bool post_imm(uint32_t imm);
  bool post_control(const ControlMessage& msg);

 private:
  DoorbellLink() = default;
  bool post(uint32_t kind, uint32_t imm, const ControlMessage* msg);
  uint8_t* base_ = nullptr;
  size_t bytes_ = 0;
  uint32_t rings_ = 0;
  int wake_fd_ = -1;
  std::atomic<int> ring_{-1};
  uint64_t tail_ = 0;
  std::atomic<uint64_t>* wakes_ = nullptr;
};

}  // namespace kvxfer
