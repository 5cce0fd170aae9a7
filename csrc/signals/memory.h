// Memory for layer signals and device counters: words the GPU writes or polls and a host thread reads or writes.
//
// With CUDA built and a device present: pinned, mapped host memory (cudaHostAlloc(Mapped|Portable)) plus its device
// pointer, and device memory for kernel-private state. Otherwise ordinary page-aligned host memory, so that every
// host-side part (watcher, binding FIFO, counter logic) works and is tested on machines without a GPU.
#pragma once
#include <cstddef>
#include <memory>
#include <string>

namespace kvxfer {

struct CudaStatus {
  bool usable = false;  // built with CUDA, a driver, at least one device, and kernels for the current one
  int device = -1;      // the calling thread's current device when usable
  std::string why;      // when not usable: what is missing, for the error message
};
CudaStatus cuda_status();

// The agent's progress thread calls this once: mapped memory whose last owner goes away there (a DeviceCounter's
// words, held by a recv's mirror) is not freed on that thread, since cudaFreeHost waits for the device, where a
// counter-wait kernel may spin for a layer only that thread can report. It is freed by the next MappedMemory made
// or freed on another thread (or stays to process exit: a few bytes).
void defer_cuda_frees_on_this_thread();

// Zeroed memory shared by host and device. device() is null when the memory is ordinary host memory.
class MappedMemory {
 public:
  // want_device=false, or CUDA not usable: host memory, and why_host() says why it is not mapped.
  explicit MappedMemory(size_t nbytes, bool want_device = true);
  ~MappedMemory();
  MappedMemory(const MappedMemory&) = delete;
  MappedMemory& operator=(const MappedMemory&) = delete;

  void* host() const { return host_; }
  void* device() const { return device_; }
  size_t nbytes() const { return nbytes_; }
  bool mapped() const { return device_ != nullptr; }
  int cuda_device() const { return cuda_device_; }
  const std::string& why_host() const { return why_host_; }

 private:
  void* host_ = nullptr;
  void* device_ = nullptr;
  size_t nbytes_ = 0;
  int cuda_device_ = -1;
  std::string why_host_;
};

// Zeroed device memory on one device (kernel-private counters). Throws TransportUnavailable without CUDA.
class DeviceMemory {
 public:
  DeviceMemory(int device, size_t nbytes);
  ~DeviceMemory();
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  void* get() const { return ptr_; }

 private:
  int device_;
  void* ptr_ = nullptr;
};

}  // namespace kvxfer
