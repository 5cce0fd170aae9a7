// CUDA runtime calls behind gpu/cuda_device.h. cudart is linked statically, so this file loads with no driver
// installed: the first call returns cudaErrorInsufficientDriver / cudaErrorNoDevice, which we turn into
// TransportUnavailable with the reason. Two driver-API queries that the runtime lacks (the allocation range of a
// pointer, and whether it can take a legacy IPC handle) go through libcuda.so.1 opened on first use.
#include "gpu/cuda_device.h"

#include "core/errors.h"

#ifdef KVXFER_HAVE_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

#include "cuda/api.cuh"
#include "gpu/gather_batch.h"
#endif

namespace kvxfer {
namespace gpu {

#ifdef KVXFER_HAVE_CUDA

namespace {

std::string cuda_error(cudaError_t rc) {
  return std::string(cudaGetErrorName(rc)) + ": " + cudaGetErrorString(rc);
}

#define KVXFER_CUDA_CHECK(call, kind, what)                                                   \
  do {                                                                                        \
    cudaError_t kvxfer_rc_ = (call);                                                          \
    KVXFER_CHECK(kvxfer_rc_ == cudaSuccess, kind, what << " failed (" << cuda_error(kvxfer_rc_) << ")"); \
  } while (0)

using PointerGetAttributeFn = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);

PointerGetAttributeFn driver_pointer_attribute() {
  static PointerGetAttributeFn fn = reinterpret_cast<PointerGetAttributeFn>(driver_symbol("cuPointerGetAttribute"));
  return fn;
}

template <typename T>
T pointer_attribute(CUpointer_attribute attr, uint64_t addr, const std::string& what) {
  PointerGetAttributeFn fn = driver_pointer_attribute();
  KVXFER_CHECK(fn, TransportUnavailable, what << ": libcuda.so.1 (the CUDA driver) could not be loaded");
  T value{};
  CUresult rc = fn(&value, attr, static_cast<CUdeviceptr>(addr));
  KVXFER_CHECK(rc == CUDA_SUCCESS, RegistrationFailed,
               what << ": cuPointerGetAttribute(" << static_cast<int>(attr) << ") failed with CUresult " << rc);
  return value;
}

}  // namespace

void* driver_symbol(const char* name) {
  static void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  return lib ? dlsym(lib, name) : nullptr;
}

bool built_with_cuda() { return true; }

bool available(std::string* why) {
  int n = 0;
  cudaError_t rc = cudaGetDeviceCount(&n);
  if (rc != cudaSuccess || n == 0) {
    if (why) *why = rc != cudaSuccess ? "no usable CUDA driver or device (" + cuda_error(rc) + ")" : "no CUDA device";
    cudaGetLastError();  // clear the sticky-free error so later probes start clean
    return false;
  }
  return true;
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

KernelImage kernel_image(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return {false, "cuda:" + std::to_string(device) + " did not answer for its compute capability"};
  }
  return kernel_image_for(major, minor, built_archs());
}

std::string pci_bus_id(int device) {
  char id[32] = {0};
  if (cudaDeviceGetPCIBusId(id, sizeof(id), device) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return id;
}

int device_by_pci_bus_id(const std::string& id) {
  int device = -1;
  if (id.empty() || cudaDeviceGetByPCIBusId(&device, id.c_str()) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return device;
}

bool can_access_peer(int device, int peer) {
  if (device == peer) return true;
  int ok = 0;
  if (cudaDeviceCanAccessPeer(&ok, device, peer) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return ok != 0;
}

DeviceRange describe_device_range(uint64_t addr, uint64_t nbytes, int device, const std::string& what,
                                  bool export_vmm) {
  std::string why;
  KVXFER_CHECK(available(&why), TransportUnavailable,
               what << " is on cuda:" << device << " but " << why << "; register host memory on this machine");
  KVXFER_CHECK(device < device_count(), InvalidArgument,
               what << ": cuda:" << device << " does not exist (" << device_count() << " visible devices)");
  cudaPointerAttributes attr{};
  KVXFER_CUDA_CHECK(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(addr)), RegistrationFailed,
                    what << ": cudaPointerGetAttributes");
  KVXFER_CHECK(attr.type == cudaMemoryTypeDevice, RegistrationFailed,
               what << " at " << std::hex << addr << std::dec << " is not device memory (cudaMemoryType "
                    << static_cast<int>(attr.type)
                    << "); managed and host memory cannot be registered as a GPU pool: allocate the KV cache with "
                       "cudaMalloc / torch.empty(device='cuda'), or register host memory with device=-1");
  KVXFER_CHECK(attr.device == device, RegistrationFailed,
               what << " belongs to cuda:" << attr.device << ", not cuda:" << device << "; pass the tensor's own device");
  DeviceRange r;
  r.device = device;
  r.alloc_base = pointer_attribute<CUdeviceptr>(CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, addr, what);
  r.alloc_bytes = pointer_attribute<size_t>(CU_POINTER_ATTRIBUTE_RANGE_SIZE, addr, what);
  const bool one_allocation = addr + nbytes <= r.alloc_base + r.alloc_bytes;
  const bool legacy = pointer_attribute<int>(CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, addr, what) != 0;
  r.ipc_capable = one_allocation && legacy;
  if (!legacy) {
    // cuMem/VMM memory: physical allocations mapped back to back (a tensor may span several), no legacy handle.
    std::string why;
    if (export_vmm && export_vmm_range(addr, nbytes, device, &r.vmm, &why)) {
      r.vmm_capable = true;
      r.alloc_base = r.vmm.front().start;
      r.alloc_bytes = r.vmm.back().start + r.vmm.back().size - r.alloc_base;
      return r;
    }
    r.not_shareable = export_vmm ? "it takes no CUDA IPC handle and " + why
                                 : "it takes no CUDA IPC handle (cuMem/VMM memory)";
  }
  KVXFER_CHECK(one_allocation, RegistrationFailed,
               what << ": " << nbytes << " bytes from offset " << addr - r.alloc_base << " run past the end of its "
                    << r.alloc_bytes << "-byte allocation" << (legacy ? "" : " (" + r.not_shareable + ")")
                    << "; register one range per allocation");
  if (r.ipc_capable) {
    cudaIpcMemHandle_t h;
    KVXFER_CUDA_CHECK(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(r.alloc_base)), RegistrationFailed,
                      what << ": cudaIpcGetMemHandle");
    static_assert(sizeof(h) == kIpcHandleBytes, "cudaIpcMemHandle_t size changed");
    std::memcpy(r.ipc.data(), &h, kIpcHandleBytes);
  }
  return r;
}

CurrentDevice::CurrentDevice(int device, const char* what) {
  // A thread with no context current (an engine's fresh control thread) reads device 0 from cudaGetDevice, and
  // making device 0 current again afterwards would create its primary context (memory on GPU 0 in every rank).
  using GetCurrentFn = CUresult (*)(CUcontext*);
  static auto get_current = reinterpret_cast<GetCurrentFn>(driver_symbol("cuCtxGetCurrent"));
  CUcontext ctx = nullptr;
  had_no_context_ = get_current && get_current(&ctx) == CUDA_SUCCESS && ctx == nullptr;
  if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
  const bool ok = cudaSetDevice(device) == cudaSuccess && cudaFree(nullptr) == cudaSuccess;  // (context made)
  if (!ok) cudaGetLastError();
  KVXFER_CHECK(ok || !what, TransportUnavailable, what << ": cuda:" << device << " could not be made current");
}

CurrentDevice::~CurrentDevice() {
  using SetCurrentFn = CUresult (*)(CUcontext);
  static auto set_current = reinterpret_cast<SetCurrentFn>(driver_symbol("cuCtxSetCurrent"));
  if (had_no_context_ && set_current)
    set_current(nullptr);
  else if (previous_ >= 0)
    cudaSetDevice(previous_);
  cudaGetLastError();
}

void enable_peer_access(int device, int peer) {
  if (device == peer) return;
  CurrentDevice on(device, "enabling peer access");
  cudaError_t rc = cudaDeviceEnablePeerAccess(peer, 0);
  if (rc == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();
    return;
  }
  KVXFER_CUDA_CHECK(rc, TransportUnavailable,
                    "cudaDeviceEnablePeerAccess from cuda:" << device << " to cuda:" << peer
                        << " (copies from cuda:" << device << " into a pool of this process on cuda:" << peer
                        << "; without peer-to-peer between them, send from a pool on cuda:" << peer << ")");
}

void synchronize_stream(uint64_t stream, int device) {
  // The default streams (1 legacy, 2 per-thread) are the current device's: the array's device is made current.
  CurrentDevice on(device, "synchronizing the array's stream");
  KVXFER_CUDA_CHECK(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)), TransportUnavailable,
                    "cudaStreamSynchronize of the array's stream 0x" << std::hex << stream << std::dec << " on cuda:"
                                                                     << device);
}

bool gpu_direct_writes_need_flush(int device) {
  int ordering = 0;
  if (cudaDeviceGetAttribute(&ordering, cudaDevAttrGPUDirectRDMAWritesOrdering, device) != cudaSuccess) {
    cudaGetLastError();
    return true;  // not known: flush (costs microseconds per completed layer)
  }
  return ordering < cudaGPUDirectRDMAWritesOrderingOwner;
}

void flush_gpu_direct_writes(int device) {
  CurrentDevice on(device);
  if (cudaDeviceFlushGPUDirectRDMAWrites(cudaFlushGPUDirectRDMAWritesTargetCurrentDevice,
                                         cudaFlushGPUDirectRDMAWritesToOwner) != cudaSuccess)
    cudaGetLastError();
}

void relax_graph_capture_for_this_thread() {
  // Through the driver: the runtime's cudaThreadExchangeStreamCaptureMode makes the current device's primary context
  // (GPU 0's, ~500 MB, on a thread that has none: every agent's progress thread, host-only agents too), while the
  // mode is the driver's per-thread state either way. No driver: nothing captures.
  using InitFn = CUresult (*)(unsigned);
  using ExchangeFn = CUresult (*)(CUstreamCaptureMode*);
  static auto init = reinterpret_cast<InitFn>(driver_symbol("cuInit"));
  static auto exchange = reinterpret_cast<ExchangeFn>(driver_symbol("cuThreadExchangeStreamCaptureMode"));
  if (!init || !exchange || init(0) != CUDA_SUCCESS) return;
  CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
  (void)exchange(&mode);
}

IpcMapping::IpcMapping(const IpcHandle& handle, int local_device) : device_(local_device) {
  CurrentDevice on(local_device, "opening the peer's CUDA IPC handle");
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), kIpcHandleBytes);
  void* p = nullptr;
  KVXFER_CUDA_CHECK(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess), TransportUnavailable,
                    "opening the peer's CUDA IPC handle on cuda:"
                        << local_device
                        << " (the peer's GPU must be visible to this process and peer access possible; "
                           "containers need a shared IPC namespace)");
  base_ = reinterpret_cast<uint64_t>(p);
}

IpcMapping::~IpcMapping() {
  if (!base_) return;
  CurrentDevice on(device_);
  cudaIpcCloseMemHandle(reinterpret_cast<void*>(base_));
  cudaGetLastError();
}

// The gather kernel's descriptors live in a ring of pinned mapped host memory that the kernel reads directly; a
// batch's slice is reused once the ticket recorded after it has completed.
struct DescRing {
  cuda::CopyDesc* base = nullptr;
  size_t capacity = 0, head = 0, tail = 0;      // in-use slices lie in [tail, head), possibly wrapped
  std::deque<std::pair<uint64_t, size_t>> used;  // (ticket that frees it, slice start), oldest first

  // A slice of n descriptors, or nullptr when the ring has no room now.
  cuda::CopyDesc* take(size_t n, uint64_t ticket) {
    size_t at;
    if (used.empty()) {
      head = tail = 0;
    }
    if (head >= tail && capacity - head >= n) {
      at = head;
    } else if (head >= tail && tail > n) {
      at = 0;  // wrap: the end of the ring stays unused this turn
    } else if (head < tail && tail - head > n) {
      at = head;
    } else {
      return nullptr;
    }
    used.emplace_back(ticket, at);
    head = at + n;
    return base + at;
  }
  void release_through(uint64_t completed) {
    while (!used.empty() && used.front().first <= completed) used.pop_front();
    if (!used.empty()) tail = used.front().second;
  }
};

enum class CopyMode { Auto, Kernel, CopyEngine };
enum class LaunchMode { Batched, PerLayer };

// KVXFER_GPU_LAUNCH=per_layer: cuda_ipc layers as one launch and one event each (the design measured on the H100
// and H200 in November 2026), to compare with batched, the default (CopyQueue::copy_layers).
LaunchMode launch_mode_from_env() {
  const char* v = std::getenv("KVXFER_GPU_LAUNCH");
  if (!v || !*v || std::strcmp(v, "batched") == 0) return LaunchMode::Batched;
  if (std::strcmp(v, "per_layer") == 0) return LaunchMode::PerLayer;
  KVXFER_THROW(InvalidArgument, "KVXFER_GPU_LAUNCH='" << v << "' is not one of batched, per_layer");
}

// KVXFER_GPU_FENCE_KIB: in one copy_layers launch, what each block copies before it fences and counts the layers
// it finished (default 256; 0: after every layer, the design before 2026-12-04). The reference request's layer
// gives each block one 32 KiB chunk, and a fence per layer left the memory system idle while every block drained.
uint64_t fence_bytes_from_env() {
  const char* v = std::getenv("KVXFER_GPU_FENCE_KIB");
  if (!v || !*v) return uint64_t(256) << 10;
  char* end = nullptr;
  const unsigned long long kib = std::strtoull(v, &end, 10);
  KVXFER_CHECK(end && *end == '\0' && v[0] != '-' && kib <= (1ull << 20), InvalidArgument,
               "KVXFER_GPU_FENCE_KIB='" << v << "' is not a whole number of KiB from 0 to 1048576");
  return uint64_t(kib) << 10;
}

CopyMode copy_mode_from_env() {
  const char* v = std::getenv("KVXFER_GPU_COPY");
  if (!v || !*v || std::strcmp(v, "auto") == 0) return CopyMode::Auto;
  if (std::strcmp(v, "kernel") == 0) return CopyMode::Kernel;
  if (std::strcmp(v, "copy_engine") == 0) return CopyMode::CopyEngine;
  KVXFER_THROW(InvalidArgument, "KVXFER_GPU_COPY='" << v << "' is not one of auto, kernel, copy_engine");
}

struct CopyQueue::Impl {
  cudaStream_t stream = nullptr;
  std::deque<std::pair<uint64_t, cudaEvent_t>> pending;  // recorded, not yet seen complete, in record order
  std::vector<cudaEvent_t> spare;
  uint64_t next_ticket = 1, completed = 0;
  // cudaMemcpyBatchAsync exists (CUDA 12.8+) and works with this driver (else one cudaMemcpyAsync per copy)
  bool batch_ok = CUDART_VERSION >= 12080;
  CopyMode mode = CopyMode::Auto;
  DescRing ring;
  uint32_t max_blocks = 0;
  LaunchMode launch = LaunchMode::Batched;
  uint64_t fence_bytes = 0;  // copy_layers: what each block copies between two fences (0: a fence per layer)
  volatile uint64_t* done_words = nullptr;  // pinned mapped: layer completion words of copy_layers
  uint32_t* arrivals = nullptr;             // device: the kernel's per-layer block counts, zero between launches
  uint64_t next_stamp = 1;
  // Reused between calls (the progress thread's): descriptors before and after split_for_blocks, and what finds
  // no room in the ring, for the copy engines.
  std::vector<cuda::CopyDesc> scratch;
  std::vector<CopyRun> pieces;
  std::vector<void*> rest_dsts;
  std::vector<const void*> rest_srcs;
  std::vector<size_t> rest_nbytes;
};

namespace {
constexpr size_t kDescRingEntries = size_t(1) << 16;  // 1.5 MiB: several layers of thousands of chunks in flight
constexpr size_t kKernelMaxAverageBytes = size_t(4) << 20;  // larger copies run as well on the copy engines
// A layer's token t is stored in word t % kDoneWords; a word is reused only by a later launch on the same stream,
// which ends after every earlier one, so "word >= t" stays a correct test for t.
constexpr uint64_t kDoneWords = 4096;
static_assert(sizeof(CopyQueue::RelCopy) == sizeof(cuda::CopyDesc), "RelCopy must have the descriptor's layout");

size_t layer_entries(size_t num_layers) {  // descriptor-sized ring entries that hold num_layers LayerCopy
  return (num_layers * sizeof(cuda::LayerCopy) + sizeof(cuda::CopyDesc) - 1) / sizeof(cuda::CopyDesc);
}

// The descriptors' own layout, so batches are cut in place (gather_batch.h).
static_assert(sizeof(CopyRun) == sizeof(cuda::CopyDesc) && offsetof(CopyRun, nbytes) == offsetof(cuda::CopyDesc, nbytes),
              "CopyRun must have the descriptor's layout");
const CopyRun* runs(const cuda::CopyDesc* d) { return reinterpret_cast<const CopyRun*>(d); }
}  // namespace

void check_copy_environment() {
  (void)copy_mode_from_env();
  (void)launch_mode_from_env();
  (void)fence_bytes_from_env();
}

CopyQueue::CopyQueue(int device) : impl_(new Impl), device_(device) {
  impl_->mode = copy_mode_from_env();  // both before anything is created: a bad value throws with nothing to free
  impl_->launch = launch_mode_from_env();
  impl_->fence_bytes = fence_bytes_from_env();
  const KernelImage image = kernel_image(device);
  KVXFER_CHECK(image.runs || impl_->mode != CopyMode::Kernel, TransportUnavailable,
               "KVXFER_GPU_COPY=kernel on cuda:" << device << ": " << image.how);
  if (!image.runs) impl_->mode = CopyMode::CopyEngine;  // copies on the copy engines need no kernel of ours
  KVXFER_CUDA_CHECK(cudaSetDevice(device), TransportUnavailable, "cudaSetDevice(" << device << ")");
  // Non-blocking: never ordered behind the legacy default stream, so the model's stream and ours never wait on
  // each other except through the events the caller asks for.
  KVXFER_CUDA_CHECK(cudaStreamCreateWithFlags(&impl_->stream, cudaStreamNonBlocking), TransportUnavailable,
                    "cudaStreamCreateWithFlags on cuda:" << device);
  // Best effort (a kernel without an image for this GPU fails at its launch, with the launch's error): kernels
  // loaded lazily could stall their first launch behind a counter-wait kernel spinning for that very copy.
  if (image.runs) (void)cuda::preload_kernels(device);
  int sms = 0;
  KVXFER_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), TransportUnavailable,
                    "querying the multiprocessor count of cuda:" << device);
  impl_->max_blocks = static_cast<uint32_t>(std::max(1, sms) * 4);
  if (impl_->mode != CopyMode::CopyEngine) {
    // No pinned memory to spare (nullptr): every batch goes to the copy engines.
    impl_->ring.base = static_cast<cuda::CopyDesc*>(alloc_pinned(kDescRingEntries * sizeof(cuda::CopyDesc), device));
    impl_->ring.capacity = impl_->ring.base ? kDescRingEntries : 0;
    if (impl_->ring.base && impl_->launch == LaunchMode::Batched) {
      // Without either, copy_layers is unavailable and layers go one launch and one event each.
      impl_->done_words = static_cast<volatile uint64_t*>(alloc_pinned(kDoneWords * sizeof(uint64_t), device));
      void* counts = nullptr;
      if (impl_->done_words &&
          cudaMalloc(&counts, cuda::kMaxGatherLayers * sizeof(uint32_t)) == cudaSuccess &&
          // On our own stream, which every launch that reads the counts follows: a plain cudaMemset would run on
          // the legacy default stream and wait for the model's kernels there.
          cudaMemsetAsync(counts, 0, cuda::kMaxGatherLayers * sizeof(uint32_t), impl_->stream) == cudaSuccess) {
        impl_->arrivals = static_cast<uint32_t*>(counts);
        for (uint64_t i = 0; i < kDoneWords; ++i) impl_->done_words[i] = 0;
      } else {
        if (counts) cudaFree(counts);
        cudaGetLastError();
        free_pinned(const_cast<uint64_t*>(impl_->done_words), device);
        impl_->done_words = nullptr;
      }
    }
  }
}

CopyQueue::~CopyQueue() {
  CurrentDevice on(device_);  // (the agent's destructor runs on the engine's thread)
  if (impl_->stream) cudaStreamSynchronize(impl_->stream);
  for (auto& [t, ev] : impl_->pending) cudaEventDestroy(ev);
  for (auto ev : impl_->spare) cudaEventDestroy(ev);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
  free_pinned(impl_->ring.base, device_);
  free_pinned(const_cast<uint64_t*>(impl_->done_words), device_);
  if (impl_->arrivals) cudaFree(impl_->arrivals);
  cudaGetLastError();
}

void CopyQueue::copy(void* const* dsts, const void* const* srcs, const size_t* nbytes, size_t n, bool device_reachable) {
  if (n == 0) return;
  KVXFER_CUDA_CHECK(cudaSetDevice(device_), TransferFailed, "cudaSetDevice(" << device_ << ")");
  if (device_reachable && impl_->mode != CopyMode::CopyEngine && impl_->ring.base) {
    size_t total = 0;
    for (size_t i = 0; i < n; ++i) total += nbytes[i];
    if (impl_->mode == CopyMode::Kernel || total / n <= kKernelMaxAverageBytes) {
      // Launches of at most a quarter of the ring each; a slice is freed by the next ticket recorded (callers
      // record() after every copy()). Whatever finds no room in the ring goes to the copy engines below, on the
      // same stream, so the caller's event still orders after all of it.
      const size_t per_launch = impl_->ring.capacity / 4;
      std::vector<cuda::CopyDesc>& whole = impl_->scratch;
      whole.resize(n);
      for (size_t i = 0; i < n; ++i)
        whole[i] = {reinterpret_cast<uint64_t>(dsts[i]), reinterpret_cast<uint64_t>(srcs[i]), nbytes[i]};
      std::vector<CopyRun>& descs = impl_->pieces;
      split_for_blocks(runs(whole.data()), n, impl_->max_blocks, &descs);
      size_t at = 0;
      while (at < descs.size()) {
        const size_t k = std::min(descs.size() - at, per_launch);
        cuda::CopyDesc* d = impl_->ring.take(k, impl_->next_ticket);
        if (!d) break;
        std::memcpy(static_cast<void*>(d), descs.data() + at, k * sizeof(cuda::CopyDesc));
        KVXFER_CUDA_CHECK(cuda::launch_gather_copy(d, static_cast<uint32_t>(k), impl_->max_blocks, impl_->stream),
                          TransferFailed, "launching the gather-copy kernel for " << k << " copies");
        at += k;
      }
      if (at == descs.size()) return;
      // The rest, pieces as they are, to the copy engines below.
      impl_->rest_dsts.clear();
      impl_->rest_srcs.clear();
      impl_->rest_nbytes.clear();
      for (size_t i = at; i < descs.size(); ++i) {
        impl_->rest_dsts.push_back(reinterpret_cast<void*>(descs[i].dst));
        impl_->rest_srcs.push_back(reinterpret_cast<const void*>(descs[i].src));
        impl_->rest_nbytes.push_back(descs[i].nbytes);
      }
      dsts = impl_->rest_dsts.data();
      srcs = impl_->rest_srcs.data();
      nbytes = impl_->rest_nbytes.data();
      n = impl_->rest_dsts.size();
    }
  }
#if CUDART_VERSION >= 12080
  if (impl_->batch_ok) {
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attr_index = 0;
    constexpr size_t kMaxBatch = 4096;
    for (size_t at = 0; at < n; at += kMaxBatch) {
      const size_t k = std::min(kMaxBatch, n - at);
#if CUDART_VERSION >= 13000
      cudaError_t rc = cudaMemcpyBatchAsync(dsts + at, srcs + at, nbytes + at, k, &attr, &attr_index, 1, impl_->stream);
#elif CUDART_VERSION >= 12080  // 12.8 and 12.9 also report the index of a copy that failed
      size_t failed_at = 0;
      cudaError_t rc = cudaMemcpyBatchAsync(const_cast<void**>(dsts + at), const_cast<void**>(srcs + at),
                                            const_cast<size_t*>(nbytes + at), k, &attr, &attr_index, 1, &failed_at,
                                            impl_->stream);
#endif
      if (rc == cudaSuccess) continue;
      // An older driver than the toolkit: NotSupported, or CallRequiresNewerDriver (minor-version compatibility).
      KVXFER_CHECK(at == 0 && (rc == cudaErrorNotSupported || rc == cudaErrorInvalidValue ||
                               rc == cudaErrorCallRequiresNewerDriver),
                   TransferFailed,
                   "cudaMemcpyBatchAsync of " << k << " copies failed (" << cuda_error(rc) << ")");
      cudaGetLastError();
      impl_->batch_ok = false;  // an older driver: fall back once, for good
      break;
    }
    if (impl_->batch_ok) return;
  }
#endif
  for (size_t i = 0; i < n; ++i)
    KVXFER_CUDA_CHECK(cudaMemcpyAsync(dsts[i], srcs[i], nbytes[i], cudaMemcpyDefault, impl_->stream), TransferFailed,
                      "cudaMemcpyAsync of " << nbytes[i] << " bytes");
}

bool CopyQueue::can_copy_layers(size_t n, uint64_t average_bytes) const {
  return impl_->arrivals && impl_->mode != CopyMode::CopyEngine && n >= 1 &&
         n + layer_entries(cuda::kMaxGatherLayers) <= impl_->ring.capacity / 4 &&
         (impl_->mode == CopyMode::Kernel || average_bytes <= kKernelMaxAverageBytes);
}

bool CopyQueue::copy_layers(const RelCopy* rel, size_t n, const LayerBases* layers, size_t num_layers,
                            uint64_t* tokens) {
  KVXFER_ASSERT(num_layers >= 1 && num_layers <= cuda::kMaxGatherLayers && can_copy_layers(n, 0));
  KVXFER_CUDA_CHECK(cudaSetDevice(device_), TransferFailed, "cudaSetDevice(" << device_ << ")");
  done(UINT64_MAX);  // hand back the descriptors of launches that have ended (never true: nothing waits)
  std::vector<CopyRun>& pieces = impl_->pieces;
  split_for_blocks(reinterpret_cast<const CopyRun*>(rel), n, impl_->max_blocks, &pieces);
  n = pieces.size();
  if (n + layer_entries(num_layers) > impl_->ring.capacity / 4) return false;  // cut too fine: copy() them
  cuda::CopyDesc* d = impl_->ring.take(n + layer_entries(num_layers), impl_->next_ticket);
  if (!d) return false;
  std::memcpy(static_cast<void*>(d), pieces.data(), n * sizeof(cuda::CopyDesc));
  auto* lc = reinterpret_cast<cuda::LayerCopy*>(d + n);
  for (size_t i = 0; i < num_layers; ++i) {
    const uint64_t stamp = impl_->next_stamp++;
    lc[i] = {layers[i].src, layers[i].dst, stamp, stamp % kDoneWords};
    tokens[i] = stamp;
  }
  const uint32_t per_fence = layers_per_fence(pieces, impl_->max_blocks, impl_->fence_bytes, num_layers);
  KVXFER_CUDA_CHECK(cuda::launch_gather_layers(d, static_cast<uint32_t>(n), lc, static_cast<uint32_t>(num_layers),
                                               per_fence, impl_->arrivals, impl_->done_words, impl_->max_blocks,
                                               impl_->stream),
                    TransferFailed,
                    "launching the gather kernel for " << num_layers << " layers of " << n << " copies");
  return true;
}

bool CopyQueue::layer_landed(uint64_t token, uint64_t ticket) {
  auto word = [&] { return __atomic_load_n(&impl_->done_words[token % kDoneWords], __ATOMIC_ACQUIRE); };
  if (word() >= token) return true;
  if (!done(ticket)) return false;  // throws if the kernel failed
  // The kernel ended, so it stored every word of its layers before: a missing one is a bug, not a wait.
  KVXFER_CHECK(word() >= token, TransferFailed,
               "the gather kernel on cuda:" << device_ << " ended without marking layer token " << token << " landed");
  return true;
}

uint64_t CopyQueue::record() {
  // Events belong to the device current when they are created: ours, not whichever the thread used last.
  KVXFER_CUDA_CHECK(cudaSetDevice(device_), TransferFailed, "cudaSetDevice(" << device_ << ")");
  cudaEvent_t ev;
  if (impl_->spare.empty()) {
    KVXFER_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), TransferFailed, "cudaEventCreate");
  } else {
    ev = impl_->spare.back();
    impl_->spare.pop_back();
  }
  const cudaError_t rc = cudaEventRecord(ev, impl_->stream);
  if (rc != cudaSuccess) impl_->spare.push_back(ev);  // not lost with the error
  KVXFER_CUDA_CHECK(rc, TransferFailed, "cudaEventRecord");
  const uint64_t ticket = impl_->next_ticket++;
  impl_->pending.emplace_back(ticket, ev);
  return ticket;
}

bool CopyQueue::done(uint64_t ticket) {
  while (!impl_->pending.empty() && impl_->completed < ticket) {
    auto [t, ev] = impl_->pending.front();
    cudaError_t rc = cudaEventQuery(ev);
    if (rc == cudaErrorNotReady) return false;
    KVXFER_CHECK(rc == cudaSuccess, TransferFailed, "a copy on cuda:" << device_ << " failed (" << cuda_error(rc) << ")");
    impl_->completed = t;
    impl_->spare.push_back(ev);
    impl_->pending.pop_front();
  }
  impl_->ring.release_through(impl_->completed);
  return impl_->completed >= ticket;
}

void CopyQueue::drain() {
  CurrentDevice on(device_);  // (also called from the agent's destructor, on the engine's thread)
  cudaStreamSynchronize(impl_->stream);
}

void* alloc_pinned(size_t nbytes, int device) {
  if (device < 0 || !available()) return nullptr;
  CurrentDevice on(device);
  void* p = nullptr;
  if (cudaHostAlloc(&p, nbytes, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return p;
}

void free_pinned(void* p, int device) {
  if (!p) return;
  CurrentDevice on(device);  // (a thread without a context would otherwise get GPU 0's to free it)
  cudaFreeHost(p);
  cudaGetLastError();
}

HostPin pin_host(void* p, size_t nbytes, int device) {
  if (device < 0 || !available()) return HostPin::None;
  CurrentDevice on(device);
  if (cudaHostRegister(p, nbytes, cudaHostRegisterPortable | cudaHostRegisterMapped) != cudaSuccess) {
    cudaGetLastError();
    return HostPin::None;
  }
  int same_address = 0;
  void* dev = nullptr;
  const bool mapped =
      cudaDeviceGetAttribute(&same_address, cudaDevAttrCanUseHostPointerForRegisteredMem, device) == cudaSuccess &&
      same_address && cudaHostGetDevicePointer(&dev, p, 0) == cudaSuccess && dev == p;
  cudaGetLastError();
  return mapped ? HostPin::Mapped : HostPin::Pinned;
}

void unpin_host(void* p, int device) {
  if (!p) return;
  CurrentDevice on(device);
  cudaHostUnregister(p);
  cudaGetLastError();
}

#else  // no CUDA in this build

namespace {
[[noreturn]] void no_cuda(const std::string& what) {
  KVXFER_THROW(TransportUnavailable, what << ": this kvxfer build has no CUDA (nvcc was not found when it was built); "
                                             "install the CUDA toolkit and run pip install -e . again");
}
}  // namespace

void* driver_symbol(const char*) { return nullptr; }
bool built_with_cuda() { return false; }
bool available(std::string* why) {
  if (why) *why = "this kvxfer build has no CUDA (nvcc was not found at build time)";
  return false;
}
int device_count() { return 0; }
KernelImage kernel_image(int) { return {false, "this kvxfer build has no CUDA"}; }
std::string pci_bus_id(int) { return ""; }
int device_by_pci_bus_id(const std::string&) { return -1; }
bool can_access_peer(int, int) { return false; }
void enable_peer_access(int device, int peer) {
  if (device != peer) no_cuda("peer access between GPUs");
}
void relax_graph_capture_for_this_thread() {}
bool gpu_direct_writes_need_flush(int) { return false; }
void synchronize_stream(uint64_t, int) { no_cuda("synchronizing a CUDA stream"); }
void flush_gpu_direct_writes(int) {}
DeviceRange describe_device_range(uint64_t, uint64_t, int device, const std::string& what, bool) {
  no_cuda(what + " on cuda:" + std::to_string(device));
}
IpcMapping::IpcMapping(const IpcHandle&, int) { no_cuda("CUDA IPC"); }
IpcMapping::~IpcMapping() = default;
struct CopyQueue::Impl {};
CurrentDevice::CurrentDevice(int, const char* what) {
  if (what) no_cuda(what);
}
CurrentDevice::~CurrentDevice() = default;
void check_copy_environment() {}
CopyQueue::CopyQueue(int device) : device_(device) { no_cuda("a GPU copy queue"); }
CopyQueue::~CopyQueue() = default;
void CopyQueue::copy(void* const*, const void* const*, const size_t*, size_t, bool) { no_cuda("a GPU copy"); }
uint64_t CopyQueue::record() { no_cuda("a GPU copy"); }
bool CopyQueue::done(uint64_t) { no_cuda("a GPU copy"); }
bool CopyQueue::can_copy_layers(size_t, uint64_t) const { return false; }
bool CopyQueue::copy_layers(const RelCopy*, size_t, const LayerBases*, size_t, uint64_t*) { no_cuda("a GPU copy"); }
bool CopyQueue::layer_landed(uint64_t, uint64_t) { no_cuda("a GPU copy"); }
void CopyQueue::drain() {}
void* alloc_pinned(size_t, int) { return nullptr; }
void free_pinned(void*, int) {}
HostPin pin_host(void*, size_t, int) { return HostPin::None; }
void unpin_host(void*, int) {}

#endif

}  // namespace gpu
}  // namespace kvxfer
