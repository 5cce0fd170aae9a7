// The device half of LayerSignal.record(layer): a one-thread kernel that publishes a sequence number to
// host-mapped memory after the layer's work on the same stream. The system-scope fence makes the layer's KV
// writes visible before the value is; the host watcher (issue 3, not built yet) posts that layer's writes.
#include "cuda/api.cuh"

namespace kvxfer {
namespace cuda {

__global__ void layer_signal_kernel(volatile uint64_t* slot, uint64_t seq) {
  __threadfence_system();
  *slot = seq;
  __threadfence_system();
}

cudaError_t launch_layer_signal(volatile uint64_t* slot, uint64_t seq, cudaStream_t stream) {
  layer_signal_kernel<<<1, 1, 0, stream>>>(slot, seq);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kvxfer
