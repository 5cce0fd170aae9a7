// The CUDA runtime as the rest of kvxfer sees it: plain C++ types, no CUDA headers, so core/ and the transports
// stay CUDA-header-free. Implemented in cuda_device.cpp; in a build without CUDA every call that needs a GPU
// throws TransportUnavailable naming what is missing, and available() says why.
//
// Threading: the query functions are safe from any thread. A CopyQueue is used by one thread at a time (the
// agent's progress thread); it sets its device before every call, so the caller's current device is irrelevant.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpu/kernel_archs.h"
#include "gpu/vmm.h"

namespace kvxfer {
namespace gpu {

constexpr size_t kIpcHandleBytes = 64;  // sizeof(cudaIpcMemHandle_t)
using IpcHandle = std::array<uint8_t, kIpcHandleBytes>;

// True when this build has CUDA and a driver with at least one device answers now; *why says what is missing.
bool available(std::string* why = nullptr);
bool built_with_cuda();
int device_count();
// The CUDA driver's entry point `name` from libcuda.so.1 (opened once, on first use: cudart is static and the
// driver may be missing), or nullptr when the library or the symbol is not there.
void* driver_symbol(const char* name);
// Whether this build's kernels (gather copies, layer records, counter waits) run on `device`, and how
// (gpu/kernel_archs.h), from its compute capability (no context made); runs=false with the reason when they do not,
// or when the device cannot be queried.
KernelImage kernel_image(int device);
// PCI bus id ("0000:1b:00.0") of a device, or "" when unknown.
std::string pci_bus_id(int device);
// The local ordinal of the GPU at this PCI bus id, or -1 when this process cannot see it.
int device_by_pci_bus_id(const std::string& pci_bus_id);
// Whether kernels and copies on `device` can reach memory of `peer` directly (the same device, or NVLink / PCIe
// peer-to-peer), which CUDA IPC into a peer's pool on another GPU needs.
bool can_access_peer(int device, int peer);
// Lets kernels and copies on `device` reach memory cudaMalloc'ed on `peer` by its plain address (an allocation of
// this process on another GPU; CUDA IPC mappings get it from cudaIpcMemLazyEnablePeerAccess). Throws
// TransportUnavailable naming both devices when CUDA refuses.
void enable_peer_access(int device, int peer);
// This thread's CUDA calls (the agent's progress thread: event queries, copies, pinned allocations) must not
// invalidate a CUDA graph another thread is capturing in torch's default (global) mode, which prohibits
// "unsafe" calls from every thread not in relaxed mode. No-op without CUDA.
void relax_graph_capture_for_this_thread();

// Reads the GPU copy settings (KVXFER_GPU_COPY, KVXFER_GPU_LAUNCH, KVXFER_GPU_FENCE_KIB) and throws
// InvalidArgument naming a bad one: called when an agent is created, so a typo fails there and not on the progress
// thread at its first GPU copy. Nothing to check in a build without CUDA.
void check_copy_environment();
// Waits for the work queued on a cudaStream_t of `device` (an integer handle, as __cuda_array_interface__ gives it:
// 1 is the legacy default stream, 2 the per-thread one, both the device's). Throws TransportUnavailable naming the
// error.
void synchronize_stream(uint64_t stream, int device);
// Whether writes a NIC makes into `device`'s memory (GPU-direct RDMA) can be seen by the device's own work before
// a flush (cudaDevAttrGPUDirectRDMAWritesOrdering below Owner: they need flush_gpu_direct_writes first).
bool gpu_direct_writes_need_flush(int device);
// Makes the NIC writes into `device` that completed so far visible to its kernels (what NCCL does after a receive
// into GPU memory where the platform does not order them). Errors are ignored: nothing better can be done.
void flush_gpu_direct_writes(int device);

// What registration learned about a device range: the allocation holding it (IPC handles name allocations, so
// the peer maps the allocation and adds offset) and whether it can be shared.
struct DeviceRange {
  int device = -1;
  uint64_t alloc_base = 0;   // start of the cudaMalloc allocation containing the range
  uint64_t alloc_bytes = 0;
  bool ipc_capable = false;  // a legacy cudaIpc handle can be exported (false for cuMem/VMM memory)
  IpcHandle ipc{};           // valid when ipc_capable
  bool vmm_capable = false;  // cuMem/VMM memory exported piece by piece (gpu/vmm.h); alloc_base = first piece
  std::vector<VmmPiece> vmm{};
  std::string not_shareable{};  // neither: why (for the registration error)
};

// Checks that [addr, addr + nbytes) is device memory of `device`, inside one allocation (or, cuMem/VMM memory such
// as PyTorch expandable segments, a run of them), and exports its IPC handle when it can; with export_vmm, VMM
// memory is exported for same-host peers (gpu/vmm.h). Throws RegistrationFailed naming the cause (host pointer,
// wrong device, range crossing allocations) and what to do.
DeviceRange describe_device_range(uint64_t addr, uint64_t nbytes, int device, const std::string& what,
                                  bool export_vmm = false);

// Makes `device` current for a scope and the caller's device current again after it: register_pool, add_peer, send
// and close run on the engine's threads, whose torch work follows the current device (a switch left behind moves
// it to another GPU). With `what`, a device that cannot be made current throws TransportUnavailable naming it;
// without (destructors), failures are ignored.
class CurrentDevice {
 public:
  explicit CurrentDevice(int device, const char* what = nullptr);
  ~CurrentDevice();
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  int previous_ = -1;
  bool had_no_context_ = false;  // the thread had no CUDA context: none is left current (not device 0's) after
};

// A peer's allocation mapped into this process (cudaIpcOpenMemHandle); unmapped when destroyed.
class IpcMapping {
 public:
  IpcMapping(const IpcHandle& handle, int local_device);
  ~IpcMapping();
  IpcMapping(const IpcMapping&) = delete;
  IpcMapping& operator=(const IpcMapping&) = delete;
  uint64_t base() const { return base_; }

 private:
  uint64_t base_ = 0;
  int device_ = -1;
};

// Copies on one device's copy engines, on a stream of our own (never the model's), with completion tickets.
class CopyQueue {
 public:
  explicit CopyQueue(int device);
  ~CopyQueue();
  CopyQueue(const CopyQueue&) = delete;
  CopyQueue& operator=(const CopyQueue&) = delete;
  int device() const { return device_; }
  // Enqueues n copies (any direction: cudaMemcpyDefault, unified addressing). Never waits. When every source and
  // destination is reachable from the device (device_reachable: device memory, a CUDA IPC mapping, pinned mapped
  // host memory) and the copies are small, one gather-copy kernel does them all (copy engines pay microseconds per
  // copy); otherwise one batched copy-engine call (cudaMemcpyBatchAsync), or one cudaMemcpyAsync each. The
  // environment variable KVXFER_GPU_COPY=kernel|copy_engine overrides the choice (auto by default).
  void copy(void* const* dsts, const void* const* srcs, const size_t* nbytes, size_t n, bool device_reachable = false);
  // Several layers whose chunks sit at the same offsets from each layer's bases (a WritePlan's layer_writes), as
  // one gather kernel that reports each layer as it lands. can_copy_layers says whether that launch is available
  // (the gather kernel may run, pinned memory for descriptors and completion words, KVXFER_GPU_LAUNCH is not
  // per_layer); copy_layers returns false when the descriptor ring has no room now (copy those layers with copy()
  // instead). tokens[i] is layer i's: layer_landed(token, ticket) turns true once every copy of the layer landed,
  // where ticket is the record() the caller makes right after copy_layers (it frees the descriptors, and tells a
  // kernel that failed from one still running).
  struct RelCopy {
    uint64_t dst_offset, src_offset, nbytes;  // relative to a layer's bases; the layout of the kernel's descriptor
  };
  struct LayerBases {
    uint64_t src, dst;
  };
  bool can_copy_layers(size_t n, uint64_t average_bytes) const;
  bool copy_layers(const RelCopy* rel, size_t n, const LayerBases* layers, size_t num_layers, uint64_t* tokens);
  bool layer_landed(uint64_t token, uint64_t ticket);
  // Marks everything enqueued so far; done(ticket) turns true once it has all landed.
  uint64_t record();
  bool done(uint64_t ticket);
  // Blocks until the stream is idle (shutdown only).
  void drain();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int device_;
};

// Page-locked host memory (cudaHostAlloc, portable + mapped) for copies by `device`, made with that device current
// (the calling thread keeps its device, or its lack of a context: no context appears on GPU 0 of a rank that uses
// GPU 3); nullptr when device < 0 or no GPU is usable. Under unified addressing its device pointer is its address.
void* alloc_pinned(size_t nbytes, int device);
void free_pinned(void* p, int device);
// Page-locks memory allocated elsewhere (cudaHostRegister, portable + mapped) for copies by `device`. Mapped: its
// address is also its device pointer (cudaDevAttrCanUseHostPointerForRegisteredMem), so kernels may read and write
// it; Pinned: only the copy engines may use it; None: it could not be page-locked (copies still work, slower).
enum class HostPin { None, Pinned, Mapped };
HostPin pin_host(void* p, size_t nbytes, int device);
void unpin_host(void* p, int device);

}  // namespace gpu
}  // namespace kvxfer
