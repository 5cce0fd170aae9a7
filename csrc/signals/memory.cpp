#include "signals/memory.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "core/errors.h"
#include "gpu/cuda_device.h"
#ifdef KVXFER_HAVE_CUDA
#include "cuda/api.cuh"
#endif

namespace kvxfer {

namespace {
thread_local bool g_defer_frees = false;
std::mutex g_deferred_mu;
std::vector<void*>& deferred_frees() {
  static auto* v = new std::vector<void*>();  // never destroyed: frees may come after static destruction
  return *v;
}

#ifdef KVXFER_HAVE_CUDA
void free_deferred() {  // not on a deferring thread
  std::vector<void*> todo;
  {
    std::lock_guard<std::mutex> lock(g_deferred_mu);
    todo.swap(deferred_frees());
  }
  for (void* p : todo) cuda::free_host_mapped(p);
}
#endif
}  // namespace

void defer_cuda_frees_on_this_thread() { g_defer_frees = true; }

CudaStatus cuda_status() {
  CudaStatus s;
#ifdef KVXFER_HAVE_CUDA
  int n = 0;
  cudaError_t err = cuda::device_count(&n);
  if (err != cudaSuccess) {
    s.why = std::string("no usable CUDA driver or device (cudaGetDeviceCount: ") + cuda::error_string(err) + ")";
  } else if (n == 0) {
    s.why = "no CUDA device on this machine (cudaGetDeviceCount returned 0)";
  } else if ((err = cuda::current_device(&s.device)) != cudaSuccess) {
    s.why = std::string("cudaGetDevice failed: ") + cuda::error_string(err);
  } else {
    // The words are for the record and wait kernels: a GPU this build has none for is not usable (engines then mark
    // layers after a stream sync), rather than failing at a first launch inside a captured graph.
    const gpu::KernelImage image = gpu::kernel_image(s.device);
    s.usable = image.runs;
    if (!image.runs) s.why = "cuda:" + std::to_string(s.device) + ": " + image.how;
  }
#else
  s.why = "this kvxfer build has no CUDA (nvcc was not found at build time; rebuild with nvcc on PATH)";
#endif
  return s;
}

MappedMemory::MappedMemory(size_t nbytes, bool want_device) : nbytes_(nbytes) {
  KVXFER_ASSERT(nbytes > 0);
  if (want_device) {
    CudaStatus cs = cuda_status();
    if (cs.usable) {
#ifdef KVXFER_HAVE_CUDA
      if (!g_defer_frees) free_deferred();
      cudaError_t err = cuda::alloc_host_mapped(nbytes, &host_, &device_);
      KVXFER_CHECK(err == cudaSuccess, RegistrationFailed,
                   "cudaHostAlloc(Mapped) of " << nbytes << " bytes failed: " << cuda::error_string(err));
      cuda_device_ = cs.device;
      // Best effort, as in CopyQueue: the record and wait kernels loaded now, not lazily at a first launch that
      // could wait behind a spinning wait kernel (a missing kernel image fails at the launch, naming itself).
      (void)cuda::preload_kernels(cs.device);
      return;
#endif
    }
    why_host_ = cs.why;
  } else {
    why_host_ = "host memory requested";
  }
  const size_t rounded = (nbytes + 4095) / 4096 * 4096;
  host_ = std::aligned_alloc(4096, rounded);
  KVXFER_CHECK(host_ != nullptr, RegistrationFailed, "could not allocate " << rounded << " bytes of host memory");
  std::memset(host_, 0, rounded);
}

MappedMemory::~MappedMemory() {
#ifdef KVXFER_HAVE_CUDA
  if (device_) {
    if (g_defer_frees) {
      std::lock_guard<std::mutex> lock(g_deferred_mu);
      deferred_frees().push_back(host_);
      return;
    }
    free_deferred();
    cuda::free_host_mapped(host_);  // an error at teardown (driver gone) leaves nothing to recover
    return;
  }
#endif
  std::free(host_);
}

DeviceMemory::DeviceMemory(int device, size_t nbytes) : device_(device) {
#ifdef KVXFER_HAVE_CUDA
  cudaError_t err = cuda::alloc_device(device, nbytes, &ptr_);
  KVXFER_CHECK(err == cudaSuccess, TransportUnavailable,
               "cudaMalloc of " << nbytes << " bytes on device " << device << " failed: " << cuda::error_string(err));
#else
  KVXFER_THROW(TransportUnavailable, "device memory needs a CUDA build of kvxfer");
#endif
}

DeviceMemory::~DeviceMemory() {
#ifdef KVXFER_HAVE_CUDA
  if (ptr_) cuda::free_device(device_, ptr_);
#endif
}

}  // namespace kvxfer
