// One kernel that performs a whole batch of scattered copies (a layer's KV chunks): the copy engines pay a few
// microseconds per copy, which caps a layer of 512 chunks of 32 KiB near 7 GB/s on an H100; one launch for all of
// them runs at device-memory speed. Used by CopyQueue when every source and destination is reachable from the
// device (local device memory, a peer's CUDA IPC mapping, pinned mapped host memory).
#include "cuda/api.cuh"

namespace kvxfer {
namespace cuda {

namespace {

constexpr int kThreads = 256;

__device__ void copy_bytes(unsigned char* dst, const unsigned char* src, uint64_t n, unsigned tid, unsigned nthreads) {
  for (uint64_t i = tid; i < n; i += nthreads) dst[i] = src[i];
}

__global__ void gather_copy_kernel(const CopyDesc* descs, uint32_t n) {
  for (uint32_t d = blockIdx.x; d < n; d += gridDim.x) {
    const CopyDesc c = descs[d];
    auto* dst = reinterpret_cast<unsigned char*>(c.dst);
    const auto* src = reinterpret_cast<const unsigned char*>(c.src);
    if (((c.dst | c.src) & 15) == 0) {
      // 16-byte vectors for the aligned bulk (KV chunks are whole multiples), bytes for a tail.
      const uint64_t vecs = c.nbytes / 16;
      auto* dv = reinterpret_cast<uint4*>(dst);
      const auto* sv = reinterpret_cast<const uint4*>(src);
      uint64_t i = threadIdx.x;
      for (; i + 3 * kThreads < vecs; i += 4 * kThreads) {
        const uint4 a = sv[i], b = sv[i + kThreads], e = sv[i + 2 * kThreads], f = sv[i + 3 * kThreads];
        dv[i] = a;
        dv[i + kThreads] = b;
        dv[i + 2 * kThreads] = e;
        dv[i + 3 * kThreads] = f;
      }
      for (; i < vecs; i += kThreads) dv[i] = sv[i];
      copy_bytes(dst + vecs * 16, src + vecs * 16, c.nbytes - vecs * 16, threadIdx.x, kThreads);
    } else {
      copy_bytes(dst, src, c.nbytes, threadIdx.x, kThreads);
    }
  }
  // Writes into another process's memory (CUDA IPC) or host memory must be visible there once the event that
  // follows this kernel completes; stream order gives that for the device, the fence for the system.
  __threadfence_system();
}

}  // namespace

cudaError_t launch_gather_copy(const CopyDesc* descs, uint32_t n, uint32_t max_blocks, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const uint32_t blocks = n < max_blocks ? n : max_blocks;
  gather_copy_kernel<<<blocks, kThreads, 0, stream>>>(descs, n);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kvxfer
