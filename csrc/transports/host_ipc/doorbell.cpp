#include "transports/host_ipc/doorbell.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>

#include "core/errors.h"

namespace kvxfer {

using doorbell::Header;
using doorbell::Ring;

namespace {

std::string errno_text(const char* call) { return std::string(call) + ": " + std::strerror(errno); }

Header& header_of(uint8_t* base) { return *reinterpret_cast<Header*>(base); }

Ring& ring_of(uint8_t* base, uint32_t w) {
  return reinterpret_cast<Ring*>(base + doorbell::kRingsOffset)[w];
}

// The fd of another process, duplicated into this one. Needs the same ptrace permission as process_vm_writev.
int take_fd(int pidfd, int fd, std::string* why) {
#ifdef SYS_pidfd_getfd
  const int ours = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, fd, 0));
  if (ours < 0) *why = errno_text("pidfd_getfd");
  return ours;
#else
  *why = "this build has no pidfd_getfd (Linux 5.6+)";
  return -1;
#endif
}

bool is_eventfd(int fd) {
  char path[64], target[64] = {0};
  std::snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
  const ssize_t n = readlink(path, target, sizeof(target) - 1);
  return n > 0 && std::strcmp(target, "anon_inode:[eventfd]") == 0;
}

}  // namespace

DoorbellRegion::DoorbellRegion(uint32_t rings) : bytes_(doorbell::region_bytes(rings)), heads_(rings, 0) {
  KVXFER_ASSERT(rings >= 1 && rings <= ImmCode::kMaxPeersLimit);
  fd_ = memfd_create("kvxfer-doorbell", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  KVXFER_CHECK(fd_ >= 0, TransportUnavailable, errno_text("memfd_create") << " (same-host doorbell)");
  // Sealed at its size: a peer holding the fd can neither shrink it (SIGBUS here) nor grow it.
  if (ftruncate(fd_, static_cast<off_t>(bytes_)) != 0 ||
      fcntl(fd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    const std::string why = errno_text("ftruncate/F_ADD_SEALS");
    close(fd_);
    KVXFER_THROW(TransportUnavailable, why << " (same-host doorbell)");
  }
  void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) {
    const std::string why = errno_text("mmap");
    close(fd_);
    KVXFER_THROW(TransportUnavailable, why << " (same-host doorbell)");
  }
  base_ = static_cast<uint8_t*>(p);
  Header& h = *new (base_) Header();  // the memfd starts zeroed: every ring empty, nobody asleep
  h.magic = doorbell::kMagic;
  h.version = doorbell::kVersion;
  h.rings = rings;
  h.entries = doorbell::kEntries;
}

DoorbellRegion::~DoorbellRegion() {
  if (base_) munmap(base_, bytes_);
  if (fd_ >= 0) close(fd_);
}

Ring& DoorbellRegion::ring(uint32_t w) const { return ring_of(base_, w); }

void DoorbellRegion::reset(uint32_t w) {
  Ring& r = ring(w);
  for (auto& e : r.entries) e.seq.store(0, std::memory_order_relaxed);
  heads_[w] = 0;
  r.head.store(0, std::memory_order_release);
}

bool DoorbellRegion::has_entry(uint32_t w) const {
  const uint64_t h = heads_[w];
  return ring(w).entries[h % doorbell::kEntries].seq.load(std::memory_order_acquire) == static_cast<uint32_t>(h + 1);
}

size_t DoorbellRegion::drain(uint32_t w, DoorbellItem* out, size_t max) {
  Ring& r = ring(w);
  uint64_t h = heads_[w];
  size_t n = 0;
  while (n < max) {
    DoorbellEntry& e = r.entries[h % doorbell::kEntries];
    if (e.seq.load(std::memory_order_acquire) != static_cast<uint32_t>(h + 1)) break;
    out[n].kind = e.kind;
    out[n].imm = e.imm;
    std::memcpy(&out[n].msg, &e.msg, sizeof(ControlMessage));
    ++n;
    ++h;
  }
  if (n) {
    heads_[w] = h;
    r.head.store(h, std::memory_order_release);  // after the copies: the producer may now reuse those entries
  }
  return n;
}

bool DoorbellRegion::prepare_to_sleep(const std::vector<uint32_t>& rings) {
  Header& hd = header_of(base_);
  hd.sleeping.store(1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);  // pairs with the producer's fence in DoorbellLink::post
  for (uint32_t w : rings) {
    if (has_entry(w)) {
      hd.sleeping.store(0, std::memory_order_relaxed);
      return false;
    }
  }
  return true;
}

void DoorbellRegion::wake_up() { header_of(base_).sleeping.store(0, std::memory_order_relaxed); }

std::unique_ptr<DoorbellLink> DoorbellLink::open(pid_t pid, int region_fd, int wake_fd, std::atomic<uint64_t>* wakes,
                                                 std::string* why) {
#ifdef SYS_pidfd_open
  const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) {
    *why = errno_text("pidfd_open");
    return nullptr;
  }
  std::unique_ptr<DoorbellLink> link(new DoorbellLink());
  link->wakes_ = wakes;
  const int fd = take_fd(pidfd, region_fd, why);
  bool ok = fd >= 0;
  if (ok) {
    // The size says how many rings the region holds; the header, read once mapped, must agree with it.
    struct stat st;
    const int seals = fcntl(fd, F_GET_SEALS);
    const size_t size = fstat(fd, &st) == 0 ? static_cast<size_t>(st.st_size) : 0;
    const size_t ring_bytes = size > doorbell::kRingsOffset ? size - doorbell::kRingsOffset : 0;
    const size_t rings = ring_bytes / sizeof(Ring);
    if (rings < 1 || rings > ImmCode::kMaxPeersLimit || ring_bytes % sizeof(Ring) != 0 || seals < 0 ||
        !(seals & F_SEAL_SHRINK)) {
      *why = "the peer's doorbell fd is not a sealed region of 1 to " + std::to_string(ImmCode::kMaxPeersLimit) +
             " rings (" + std::to_string(size) + " bytes)";
      ok = false;
    } else {
      void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (p == MAP_FAILED) {
        *why = errno_text("mmap of the peer's doorbell");
        ok = false;
      } else {
        link->base_ = static_cast<uint8_t*>(p);
        link->bytes_ = size;
        const Header& h = header_of(link->base_);
        if (h.magic != doorbell::kMagic || h.version != doorbell::kVersion || h.rings != rings ||
            h.entries != doorbell::kEntries) {
          *why = "the peer's doorbell region has another format (version " + std::to_string(h.version) +
                 "); run the same kvxfer release on both sides";
          ok = false;
        }
        link->rings_ = static_cast<uint32_t>(rings);
      }
    }
    close(fd);
  }
  if (ok && wake_fd >= 0) {
    link->wake_fd_ = take_fd(pidfd, wake_fd, why);
    if (link->wake_fd_ < 0 || !is_eventfd(link->wake_fd_)) {
      if (link->wake_fd_ >= 0) *why = "the peer's wake fd is not an eventfd";
      ok = false;
    }
  }
  close(pidfd);
  if (!ok) return nullptr;  // the destructor unmaps and closes what was taken
  return link;
#else
  (void)pid, (void)region_fd, (void)wake_fd, (void)wakes;
  *why = "this build has no pidfd_open (Linux 5.3+)";
  return nullptr;
#endif
}

DoorbellLink::~DoorbellLink() {
  if (base_) munmap(base_, bytes_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

bool DoorbellLink::post_imm(uint32_t imm) { return post(DoorbellEntry::kImm, imm, nullptr); }

bool DoorbellLink::post_control(const ControlMessage& msg) { return post(DoorbellEntry::kControl, 0, &msg); }

bool DoorbellLink::post(uint32_t kind, uint32_t imm, const ControlMessage* msg) {
  const int w = ring_.load(std::memory_order_acquire);
  KVXFER_ASSERT(w >= 0 && static_cast<uint32_t>(w) < rings_);
  Ring& r = ring_of(base_, static_cast<uint32_t>(w));
  const uint64_t pos = tail_;
  if (pos - r.head.load(std::memory_order_acquire) >= doorbell::kEntries) return false;
  DoorbellEntry& e = r.entries[pos % doorbell::kEntries];
  e.kind = kind;
  e.imm = imm;
  if (msg) std::memcpy(&e.msg, msg, sizeof(ControlMessage));
  e.seq.store(static_cast<uint32_t>(pos + 1), std::memory_order_release);
  tail_ = pos + 1;
  std::atomic_thread_fence(std::memory_order_seq_cst);  // pairs with DoorbellRegion::prepare_to_sleep
  if (wake_fd_ >= 0 && header_of(base_).sleeping.load(std::memory_order_relaxed)) {
    const uint64_t one = 1;
    if (write(wake_fd_, &one, sizeof(one)) == sizeof(one)) wakes_->fetch_add(1, std::memory_order_relaxed);
  }
  return true;
}

}  // namespace kvxfer
