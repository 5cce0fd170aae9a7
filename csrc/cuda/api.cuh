// The only header shared by .cu files and host code: raw pointers and cudaStream_t, nothing else.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace kvxfer {
namespace cuda {

// Enqueues on `stream` a device-side store of `seq` into `slot` (host-mapped memory a watcher thread polls).
// Capturable in a CUDA graph: the kernel node replays with the same slot and seq.
cudaError_t launch_layer_signal(volatile uint64_t* slot, uint64_t seq, cudaStream_t stream);

}  // namespace cuda
}  // namespace kvxfer
