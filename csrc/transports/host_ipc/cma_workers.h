// Worker threads that run large CMA copies in parallel. One process_vm_writev stream is bound by one core's copy
// bandwidth (5-10 GB/s), well under what the memory system or a GPU's device-to-host copy delivers, and a copy on
// the progress thread also stops it from polling completions. The progress thread submits a layer's copy as a job,
// keeps polling, and posts the layer's signals once job->done(); workers wake it through `on_done`.
#pragma once
#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/errors.h"
#include "transports/host_ipc/cma.h"

namespace kvxfer {

class CmaJob {
 public:
  bool done() const { return remaining_.load(std::memory_order_acquire) == 0; }
  // After done(): throws the first error any part hit (PeerLost, AccessViolation, TransferFailed).
  void rethrow_if_failed() const;
  uint64_t bytes() const { return bytes_; }

 private:
  friend class CmaWorkers;
  void fail(ErrorKind kind, const std::string& why);  // the first failure of any part is the one reported
  pid_t pid_ = 0;
  uint64_t bytes_ = 0;
  std::vector<std::vector<CmaOp>> parts_;
  std::atomic<uint32_t> remaining_{0};
  mutable std::mutex mu_;
  bool failed_ = false;
  ErrorKind kind_ = ErrorKind::TransferFailed;
  std::string error_;
};

class CmaWorkers {
 public:
  // Copies of at least this many bytes go to the workers; smaller ones cost less inline than a thread hand-off.
  static constexpr uint64_t kMinParallelBytes = 1ull << 20;

  CmaWorkers(unsigned threads, std::function<void()> on_done);
  ~CmaWorkers();  // waits for the parts being copied; parts not started fail their job (PeerLost)
  CmaWorkers(const CmaWorkers&) = delete;
  CmaWorkers& operator=(const CmaWorkers&) = delete;

  // Splits `ops` (a single op may be cut in pieces) into up to threads() parts of about equal bytes and queues
  // them. The job keeps its own copy of the op list; the memory both ends address must stay mapped until done().
  std::shared_ptr<CmaJob> submit(pid_t pid, const CmaOp* ops, size_t count);
  unsigned threads() const { return static_cast<unsigned>(threads_.size()); }

 private:
  struct Task {
    std::shared_ptr<CmaJob> job;
    size_t part;
  };
  void run();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stop_ = false;
  std::function<void()> on_done_;
  std::vector<std::thread> threads_;
};

// Worker count from KVXFER_CMA_THREADS (0 or 1: copy on the progress thread); unset: half the CPUs, 1 to 4.
// Throws InvalidArgument naming the variable for anything but an integer in [0, 64].
unsigned cma_threads_from_env();

}  // namespace kvxfer
