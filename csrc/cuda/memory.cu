// Runtime calls for host-mapped and device memory, kept behind the .cu wall so host code needs no CUDA headers
// beyond api.cuh. cudart is linked statically: with no driver every call here returns an error code, never aborts.
#include "cuda/api.cuh"

namespace kvxfer {
namespace cuda {

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
  int prev = 0;
  cudaError_t err = cudaGetDevice(&prev);
  if (err != cudaSuccess) return err;
  if ((err = cudaSetDevice(device)) != cudaSuccess) return err;
  err = cudaMalloc(ptr, nbytes);
  if (err == cudaSuccess) err = cudaMemset(*ptr, 0, nbytes);
  // The memset runs on the legacy default stream, and its users (LayerSignal.record, DeviceCounter waits) on
  // streams that need not be ordered after it (non-blocking side streams, graph capture): zeroed before return.
  if (err == cudaSuccess) err = cudaStreamSynchronize(cudaStreamLegacy);
  if (err != cudaSuccess && *ptr) {
    cudaFree(*ptr);
    *ptr = nullptr;
  }
  cudaSetDevice(prev);
  return err;
}

cudaError_t free_device(int device, void* ptr) {
  int prev = 0;
  cudaError_t err = cudaGetDevice(&prev);
  if (err != cudaSuccess) return err;
  cudaSetDevice(device);
  err = cudaFree(ptr);
  cudaSetDevice(prev);
  return err;
}

const char* error_string(cudaError_t err) { return cudaGetErrorString(err); }

}  // namespace cuda
}  // namespace kvxfer
