#include "transports/host_ipc/cma_workers.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace kvxfer {

namespace {

constexpr uint64_t kMinPartBytes = 256 << 10;  // smaller parts cost more in wake-ups than they gain in parallelism

// Cuts ops into `nparts` consecutive runs of about equal bytes, splitting an op that straddles a boundary.
std::vector<std::vector<CmaOp>> split_even(const CmaOp* ops, size_t count, uint64_t total, size_t nparts) {
  std::vector<std::vector<CmaOp>> parts(nparts);
  const uint64_t share = (total + nparts - 1) / nparts;
  size_t p = 0;
  uint64_t in_part = 0;
  for (size_t i = 0; i < count; ++i) {
    CmaOp op = ops[i];
    while (op.nbytes > 0) {
      const uint64_t room = p + 1 == nparts ? op.nbytes : share - in_part;  // the last part takes what is left
      const uint64_t take = std::min<uint64_t>(op.nbytes, room);
      parts[p].push_back({op.src, op.remote_addr, static_cast<size_t>(take)});
      op.src = static_cast<const uint8_t*>(op.src) + take;
      op.remote_addr += take;
      op.nbytes -= take;
      in_part += take;
      if (in_part == share && p + 1 < nparts) {
        ++p;
        in_part = 0;
      }
    }
  }
  while (!parts.empty() && parts.back().empty()) parts.pop_back();
  return parts;
}

}  // namespace

void CmaJob::fail(ErrorKind kind, const std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return;
  failed_ = true;
  kind_ = kind;
  error_ = why;
}

void CmaJob::rethrow_if_failed() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) throw Error(kind_, error_);
}

CmaWorkers::CmaWorkers(unsigned threads, std::function<void()> on_done) : on_done_(std::move(on_done)) {
  for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
}

// Parts not started are dropped, not run: the agent is closing and the memory they would read may be freed next.
CmaWorkers::~CmaWorkers() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    for (Task& t : queue_) {
      t.job->fail(ErrorKind::PeerLost, "the local agent was closed during the copy");
      t.job->remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
    queue_.clear();
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

std::shared_ptr<CmaJob> CmaWorkers::submit(pid_t pid, const CmaOp* ops, size_t count) {
  auto job = std::make_shared<CmaJob>();
  job->pid_ = pid;
  for (size_t i = 0; i < count; ++i) job->bytes_ += ops[i].nbytes;
  const uint64_t by_size = std::max<uint64_t>(1, job->bytes_ / kMinPartBytes);
  const size_t nparts = static_cast<size_t>(std::min<uint64_t>(threads_.size(), by_size));
  job->parts_ = split_even(ops, count, job->bytes_, std::max<size_t>(nparts, 1));
  job->remaining_.store(static_cast<uint32_t>(job->parts_.size()), std::memory_order_release);
  if (job->parts_.empty()) return job;  // nothing to copy: done at once
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t p = 0; p < job->parts_.size(); ++p) queue_.push_back({job, p});
  }
  cv_.notify_all();
  return job;
}

void CmaWorkers::run() {
  for (;;) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    CmaJob& job = *task.job;
    const auto& ops = job.parts_[task.part];
    try {
      CmaCopier(job.pid_).copy(ops.data(), ops.size());
    } catch (const Error& e) {
      job.fail(e.kind(), e.what());
    } catch (const std::exception& e) {
      job.fail(ErrorKind::TransferFailed, e.what());
    }
    if (job.remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1 && on_done_) on_done_();
  }
}

unsigned cma_threads_from_env() {
  const char* v = std::getenv("KVXFER_CMA_THREADS");
  if (!v || !*v) {
    const unsigned cpus = std::max(1u, std::thread::hardware_concurrency());
    return std::clamp(cpus / 2, 1u, 4u);
  }
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  KVXFER_CHECK(end && *end == 0 && n >= 0 && n <= 64, InvalidArgument,
               "KVXFER_CMA_THREADS='" << v << "' is not an integer from 0 to 64 (0 or 1: copy on the progress thread)");
  return static_cast<unsigned>(n);
}

}  // namespace kvxfer
