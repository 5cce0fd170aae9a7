// Runtime calls for host-mapped and device memory, kept behind the .cu wall so host code needs no CUDA headers
// beyond api.cuh. cudart is linked statically: with no driver every call here returns an error code, never aborts.
#include <atomic>

#include "cuda/api.cuh"
#include "gpu/cuda_device.h"

namespace kvxfer {
namespace cuda {

namespace {
// After gpu::CurrentDevice (which leaves the thread's device, or its lack of a context, as it found it; a plain
// cudaSetDevice(previous) would make GPU 0's context current on a thread that had none): did `device` become
// current? CurrentDevice itself says nothing when it cannot.
cudaError_t now_on(int device) {
  int d = -1;
  const cudaError_t err = cudaGetDevice(&d);
  if (err != cudaSuccess) return err;
  return d == device ? cudaSuccess : cudaErrorInvalidDevice;
}
}  // namespace

cudaError_t device_count(int* count) {
  *count = 0;
  return cudaGetDeviceCount(count);
}

cudaError_t current_device(int* device) { return cudaGetDevice(device); }

cudaError_t alloc_host_mapped(size_t nbytes, void** host, void** device) {
  *host = nullptr;
  *device = nullptr;
  cudaError_t err = cudaHostAlloc(host, nbytes, cudaHostAllocMapped | cudaHostAllocPortable);
  if (err != cudaSuccess) return err;
  err = cudaHostGetDevicePointer(device, *host, 0);
  if (err != cudaSuccess) {
    cudaFreeHost(*host);
    *host = nullptr;
    return err;
  }
  for (size_t i = 0; i < nbytes; ++i) static_cast<volatile unsigned char*>(*host)[i] = 0;
  return cudaSuccess;
}

cudaError_t free_host_mapped(void* host) { return cudaFreeHost(host); }

cudaError_t alloc_device(int device, size_t nbytes, void** ptr) {
  *ptr = nullptr;
  gpu::CurrentDevice on(device);
  cudaError_t err = now_on(device);
  if (err != cudaSuccess) return err;
  err = cudaMalloc(ptr, nbytes);
  // Zeroed on a stream of our own, waited for before return: the legacy default stream would also wait for (and
  // make wait) every blocking stream of the device, such as one where a counter-wait kernel spins for this thread.
  // Its users (LayerSignal.record, DeviceCounter waits) run on streams not ordered after it (non-blocking side
  // streams, graph capture): zeroed before return.
  cudaStream_t zeroing = nullptr;
  if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&zeroing, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaMemsetAsync(*ptr, 0, nbytes, zeroing);
  if (err == cudaSuccess) err = cudaStreamSynchronize(zeroing);
  if (zeroing) cudaStreamDestroy(zeroing);
  if (err != cudaSuccess && *ptr) {
    cudaFree(*ptr);
    *ptr = nullptr;
  }
  return err;
}

cudaError_t upload(int device, void* dst, const void* src, size_t nbytes) {
  gpu::CurrentDevice on(device);
  cudaError_t err = now_on(device);
  if (err != cudaSuccess) return err;
  cudaStream_t s = nullptr;
  err = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, s);
  if (err == cudaSuccess) err = cudaStreamSynchronize(s);
  if (s) cudaStreamDestroy(s);
  return err;
}

cudaError_t free_device(int device, void* ptr) {
  gpu::CurrentDevice on(device);
  const cudaError_t err = now_on(device);
  return err == cudaSuccess ? cudaFree(ptr) : err;
}

const char* error_string(cudaError_t err) { return cudaGetErrorString(err); }

cudaError_t stream_capturing(cudaStream_t stream, bool* capturing) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaError_t err = cudaStreamIsCapturing(stream, &status);
  *capturing = status != cudaStreamCaptureStatusNone;
  return err;
}

cudaError_t stream_device(cudaStream_t stream, int* device) {
#if CUDART_VERSION >= 12080
  if (stream != nullptr && stream != cudaStreamLegacy && stream != cudaStreamPerThread)
    return cudaStreamGetDevice(stream, device);
#endif
  return cudaGetDevice(device);  // older runtimes cannot ask a stream: the launch uses the current device's context
}

cudaError_t preload_kernels(int device) {
  static std::atomic<uint64_t> loaded{0};  // devices done (ordinals past 63 load every time: harmless)
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t{1} << device : 0;
  if (bit && (loaded.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  gpu::CurrentDevice on(device);
  cudaError_t err = now_on(device);
  if (err != cudaSuccess) return err;
  err = preload_layer_signal_kernels();
  if (err == cudaSuccess) err = preload_gather_kernels();
  if (err == cudaSuccess) loaded.fetch_or(bit, std::memory_order_acq_rel);
  return err;
}

}  // namespace cuda
}  // namespace kvxfer
