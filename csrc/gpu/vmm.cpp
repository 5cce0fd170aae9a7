// cuMem/VMM sharing behind gpu/vmm.h. The driver entry points come from gpu::driver_symbol (libcuda.so.1, opened on
// first use: cudart is linked statically and the driver may be missing).
#include "gpu/vmm.h"

#include "core/errors.h"
#include "gpu/cuda_device.h"

#ifdef KVXFER_HAVE_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#endif

namespace kvxfer {
namespace gpu {

#ifdef KVXFER_HAVE_CUDA

namespace {

struct Driver {
  CUresult (*retain)(CUmemGenericAllocationHandle*, void*) = nullptr;
  CUresult (*properties)(CUmemAllocationProp*, CUmemGenericAllocationHandle) = nullptr;
  CUresult (*export_handle)(void*, CUmemGenericAllocationHandle, CUmemAllocationHandleType, unsigned long long) = nullptr;
  CUresult (*import_handle)(CUmemGenericAllocationHandle*, void*, CUmemAllocationHandleType) = nullptr;
  CUresult (*release)(CUmemGenericAllocationHandle) = nullptr;
  CUresult (*reserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long) = nullptr;
  CUresult (*address_free)(CUdeviceptr, size_t) = nullptr;
  CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long) = nullptr;
  CUresult (*unmap)(CUdeviceptr, size_t) = nullptr;
  CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) = nullptr;
  CUresult (*granularity)(size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags) = nullptr;
  bool ok = false;
};

template <typename F>
void load(F& fn, const char* name, bool& ok) {
  fn = reinterpret_cast<F>(driver_symbol(name));
  ok &= fn != nullptr;
}

const Driver& driver() {
  static Driver d = [] {
    Driver d;
    bool ok = true;
    load(d.retain, "cuMemRetainAllocationHandle", ok);
    load(d.properties, "cuMemGetAllocationPropertiesFromHandle", ok);
    load(d.export_handle, "cuMemExportToShareableHandle", ok);
    load(d.import_handle, "cuMemImportFromShareableHandle", ok);
    load(d.release, "cuMemRelease", ok);
    load(d.reserve, "cuMemAddressReserve", ok);
    load(d.address_free, "cuMemAddressFree", ok);
    load(d.map, "cuMemMap", ok);
    load(d.unmap, "cuMemUnmap", ok);
    load(d.set_access, "cuMemSetAccess", ok);
    load(d.granularity, "cuMemGetAllocationGranularity", ok);
    d.ok = ok;
    return d;
  }();
  return d;
}

const Driver& checked_driver(const char* what) {
  const Driver& d = driver();
  KVXFER_CHECK(d.ok, TransportUnavailable,
               what << ": libcuda.so.1 (the CUDA driver) or its cuMem entry points could not be loaded");
  return d;
}

#define KVXFER_CU_CHECK(call, kind, what)                                                              \
  do {                                                                                                 \
    CUresult kvxfer_cu_ = (call);                                                                      \
    KVXFER_CHECK(kvxfer_cu_ == CUDA_SUCCESS, kind, what << " failed (CUresult " << kvxfer_cu_ << ")"); \
  } while (0)

#if CUDA_VERSION >= 12030
constexpr bool kHaveFabric = true;
#else
constexpr bool kHaveFabric = false;
#endif

// One physical allocation: its handle exported as a fabric handle when the allocation allows one, else as an fd.
VmmPiece export_piece(const Driver& d, CUmemGenericAllocationHandle h, uint64_t start, uint64_t size, std::string* why) {
  CUmemAllocationProp prop{};
  KVXFER_CU_CHECK(d.properties(&prop, h), RegistrationFailed, "cuMemGetAllocationPropertiesFromHandle");
  const uint64_t types = static_cast<uint64_t>(prop.requestedHandleTypes);
  VmmPiece p;
  p.start = start;
  p.size = size;
#if CUDA_VERSION >= 12030
  if (types & CU_MEM_HANDLE_TYPE_FABRIC) {
    CUmemFabricHandle fh{};
    if (d.export_handle(&fh, h, CU_MEM_HANDLE_TYPE_FABRIC, 0) == CUDA_SUCCESS) {
      p.fabric.assign(reinterpret_cast<uint8_t*>(&fh), reinterpret_cast<uint8_t*>(&fh) + sizeof(fh));
      return p;
    }  // fabric export needs the IMEX service: fall back to an fd when the allocation allows one
  }
#endif
  if (types & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) {
    int fd = -1;
    rlimit files{};
    getrlimit(RLIMIT_NOFILE, &files);
    KVXFER_CU_CHECK(d.export_handle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0), RegistrationFailed,
                    "cuMemExportToShareableHandle(POSIX fd) (the agent keeps one fd open per physical allocation "
                    "of the pool, 20 MiB each in PyTorch's expandable segments; this process may open "
                        << files.rlim_cur << ": raise ulimit -n if that is the limit)");
    p.fd = fd;
    return p;
  }
  *why = "a physical allocation of it was created without a shareable handle type (requestedHandleTypes " +
         std::to_string(types) + "; a POSIX file descriptor" + (kHaveFabric ? " or fabric" : "") +
         " handle is needed)";
  return {};
}

// The extent of the physical allocation mapped at `at` (whose handle is h): the run of granules around it that map
// the same handle. cuMemRetainAllocationHandle returns the very handle value used to map an address, while the
// pointer attributes RANGE_START_ADDR / RANGE_SIZE describe the whole reserved VA range (PyTorch's expandable
// segments reserve one range and map many physical allocations into it).
void piece_extent(const Driver& d, uint64_t at, CUmemGenericAllocationHandle h, uint64_t gran, uint64_t* start,
                  uint64_t* end) {
  auto same = [&](uint64_t a) {
    CUmemGenericAllocationHandle other;
    if (d.retain(&other, reinterpret_cast<void*>(a)) != CUDA_SUCCESS) return false;  // unmapped: outside the piece
    d.release(other);
    return other == h;
  };
  uint64_t lo = at - at % gran, hi = lo + gran;
  while (lo >= gran && same(lo - gran)) lo -= gran;
  while (same(hi)) hi += gran;
  *start = lo;
  *end = hi;
}

}  // namespace

// Each exported POSIX piece stays open for the agent's life (a 60 GiB pool of 20 MiB pieces: ~3,000 fds), past the
// 1,024 soft limit many systems start processes with: the soft limit is raised to the hard one, once.
static void allow_open_files_up_to_the_hard_limit() {
  static const bool once = [] {
    rlimit files{};
    if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
      files.rlim_cur = files.rlim_max;
      setrlimit(RLIMIT_NOFILE, &files);
    }
    return true;
  }();
  (void)once;
}

bool export_vmm_range(uint64_t addr, uint64_t nbytes, int device, std::vector<VmmPiece>* pieces, std::string* why) {
  const Driver& d = checked_driver("exporting VMM memory");
  allow_open_files_up_to_the_hard_limit();
  CurrentDevice on(device, "exporting VMM memory");
  std::vector<VmmPiece> out;
  try {
    for (uint64_t at = addr; at < addr + nbytes;) {
      CUmemGenericAllocationHandle h;
      if (d.retain(&h, reinterpret_cast<void*>(at)) != CUDA_SUCCESS) {
        *why = at == addr ? "it is not cuMem/VMM memory either (cuMemRetainAllocationHandle refused it)"
                          : "part of it is not mapped (cuMemRetainAllocationHandle refused an address inside it)";
        close_vmm_export(out);
        return false;
      }
      VmmPiece p;
      try {
        CUmemAllocationProp prop{};
        KVXFER_CU_CHECK(d.properties(&prop, h), RegistrationFailed, "cuMemGetAllocationPropertiesFromHandle");
        size_t gran = 0;
        KVXFER_CU_CHECK(d.granularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), RegistrationFailed,
                        "cuMemGetAllocationGranularity");
        KVXFER_CHECK(gran > 0, RegistrationFailed, "the driver reported a zero allocation granularity");
        uint64_t start = 0, end = 0;
        piece_extent(d, at, h, gran, &start, &end);
        p = export_piece(d, h, start, end - start, why);
      } catch (...) {
        d.release(h);
        throw;
      }
      d.release(h);  // the retain's reference; the owner's own mapping keeps the memory
      if (p.size == 0) {
        close_vmm_export(out);
        return false;
      }
      at = p.start + p.size;
      out.push_back(std::move(p));  // first: its fd is closed with the others if the check below throws
      KVXFER_CHECK(out.size() <= kMaxVmmPieces, RegistrationFailed,
                   "the range spans more than " << kMaxVmmPieces << " physical allocations; register smaller regions");
    }
  } catch (...) {
    close_vmm_export(out);
    throw;
  }
  *pieces = std::move(out);
  return true;
}

void close_vmm_export(const std::vector<VmmPiece>& pieces) {
  for (const auto& p : pieces)
    if (p.fd >= 0) close(p.fd);
}

VmmMapping::VmmMapping(pid_t owner_pid, const std::vector<VmmPiece>& pieces, int local_device) : device_(local_device) {
  const Driver& d = checked_driver("mapping a peer's VMM memory");
  KVXFER_CHECK(!pieces.empty(), TransportUnavailable, "the peer's VMM region has no pieces");
  CurrentDevice on(local_device, "mapping a peer's VMM memory");
  for (const auto& p : pieces) bytes_ += p.size;
  CUdeviceptr va = 0;
  KVXFER_CU_CHECK(d.reserve(&va, bytes_, 0, 0, 0), TransportUnavailable,
                  "cuMemAddressReserve of " << bytes_ << " bytes for the peer's VMM region");
  base_ = va;
  int pidfd = -1;
  uint64_t mapped = 0;
  try {
    for (const auto& p : pieces) {
      CUmemGenericAllocationHandle h;
      if (!p.fabric.empty()) {
#if CUDA_VERSION >= 12030
        CUmemFabricHandle fh;
        KVXFER_CHECK(p.fabric.size() == sizeof(fh), TransportUnavailable, "a fabric handle of the wrong size");
        std::memcpy(&fh, p.fabric.data(), sizeof(fh));
        KVXFER_CU_CHECK(d.import_handle(&h, &fh, CU_MEM_HANDLE_TYPE_FABRIC), TransportUnavailable,
                        "importing the peer's fabric handle (cuMemImportFromShareableHandle)");
#else
        KVXFER_THROW(TransportUnavailable, "the peer shares VMM memory by fabric handle; this build's CUDA (< 12.3) "
                                           "cannot import one");
#endif
      } else {
        if (pidfd < 0) {
          pidfd = static_cast<int>(syscall(SYS_pidfd_open, owner_pid, 0));
          KVXFER_CHECK(pidfd >= 0, TransportUnavailable,
                       "pidfd_open(" << owner_pid << ") failed (" << std::strerror(errno)
                                     << "): the peer's VMM handles are fds in its process");
        }
        const int fd = static_cast<int>(syscall(SYS_pidfd_getfd, pidfd, p.fd, 0));
        KVXFER_CHECK(fd >= 0, TransportUnavailable,
                     "pidfd_getfd of the peer's VMM handle failed (" << std::strerror(errno)
                         << "); it needs the ptrace permission CMA needs (same user, ptrace_scope)");
        const CUresult rc = d.import_handle(&h, reinterpret_cast<void*>(static_cast<uintptr_t>(fd)),
                                            CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
        close(fd);
        KVXFER_CU_CHECK(rc, TransportUnavailable, "importing the peer's VMM fd (cuMemImportFromShareableHandle)");
      }
      const CUresult rc = d.map(va + mapped, p.size, 0, h, 0);
      d.release(h);  // the mapping holds its own reference
      KVXFER_CU_CHECK(rc, TransportUnavailable, "cuMemMap of a peer's VMM piece (" << p.size << " bytes)");
      piece_bytes_.push_back(p.size);
      mapped += p.size;
    }
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = local_device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    KVXFER_CU_CHECK(d.set_access(va, bytes_, &access, 1), TransportUnavailable,
                    "cuMemSetAccess for cuda:" << local_device << " on the peer's VMM region (peer access between "
                                               "the two GPUs must be possible)");
  } catch (...) {
    if (pidfd >= 0) close(pidfd);
    unmap_pieces(mapped);
    d.address_free(va, bytes_);
    base_ = 0;
    throw;
  }
  if (pidfd >= 0) close(pidfd);
}

VmmMapping::~VmmMapping() { release(); }

void VmmMapping::release() {
  if (!base_) return;
  const Driver& d = driver();
  CurrentDevice on(device_);
  unmap_pieces(bytes_);
  d.address_free(base_, bytes_);
  base_ = 0;
}

// Piece by piece: cuMemUnmap may not unmap part of a mapping, and whether one call may span several is not said.
void VmmMapping::unmap_pieces(uint64_t through) {
  const Driver& d = driver();
  uint64_t at = 0;
  for (uint64_t n : piece_bytes_) {
    if (at + n > through) break;
    d.unmap(base_ + at, n);
    at += n;
  }
  piece_bytes_.clear();
}

#else  // no CUDA in this build

bool export_vmm_range(uint64_t, uint64_t, int, std::vector<VmmPiece>*, std::string* why) {
  *why = "this kvxfer build has no CUDA";
  return false;
}
void close_vmm_export(const std::vector<VmmPiece>&) {}
VmmMapping::VmmMapping(pid_t, const std::vector<VmmPiece>&, int) {
  KVXFER_THROW(TransportUnavailable, "this kvxfer build has no CUDA: VMM memory cannot be mapped");
}
VmmMapping::~VmmMapping() = default;
void VmmMapping::release() {}

#endif

}  // namespace gpu
}  // namespace kvxfer
