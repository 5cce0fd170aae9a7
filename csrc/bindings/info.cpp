// Build features and runtime probes for `python -m kvxfer info`, plus the same-run CMA limit for benchmarks.
#include <sys/uio.h>

#include <chrono>

#include "bindings/bindings.h"
#include "gpu/cuda_device.h"
#include "transports/host_ipc/cma.h"
#include "transports/host_ipc/cma_workers.h"
#ifdef KVXFER_HAVE_LIBFABRIC
#include "transports/fabric/fabric_transport.h"
#endif

namespace kvxfer {

void register_info(py::module_& m) {
  m.attr("build_info") = KVXFER_BUILD_INFO;
  m.attr("__version__") = KVXFER_VERSION;
#ifdef KVXFER_HAVE_LIBFABRIC
  m.attr("have_libfabric") = true;
  m.def("fabric_version", &fabric_version);
  m.def("probe_providers", [] {
    std::vector<ProviderProbe> probes;
    {
      py::gil_scoped_release nogil;
      probes = probe_fabric_providers();
    }
    py::list out;
    for (const auto& p : probes) out.append(py::make_tuple(p.name, p.usable, p.detail));
    return out;
  });
#else
  m.attr("have_libfabric") = false;
#endif
#ifdef KVXFER_HAVE_CUDA
  m.attr("have_cuda") = true;
#else
  m.attr("have_cuda") = false;
#endif

  m.def("gpu_status", [] {
    std::string why;
    bool ok;
    {
      py::gil_scoped_release nogil;
      ok = gpu::available(&why);
    }
    return py::make_tuple(ok, why);
  });
  m.def("gpu_devices", [] {
    py::list out;
    const int n = gpu::device_count();
    for (int d = 0; d < n; ++d) out.append(py::make_tuple(d, gpu::pci_bus_id(d)));
    return out;
  });

  m.def("cma_threads_default", [] {
    const unsigned n = cma_threads_from_env();
    return n > 1 ? n : 0u;
  });
  m.def("cma_probe", [](int pid, uint64_t addr, uint64_t cookie) {
    std::string why;
    bool ok = cma_probe(pid, addr, cookie, &why);
    return py::make_tuple(ok, why);
  });

  // The same-host limit kvxfer's cma path is measured against: one thread, process_vm_writev of the same chunks
  // (src addr, remote addr, nbytes) into `pid`, batched IOV_MAX at a time. Returns seconds.
  // The gather-copy kernel alone, for benchmarks/bench_gpu.py: n chunks (device addresses reachable from `device`)
  // copied as one launch per group [group_begin[g], group_begin[g + 1]) with an event after each, as the cuda_ipc
  // path enqueues layers, then drained. Returns the wall seconds of the best of `reps` runs (after a warm-up).
  m.def("gpu_gather_seconds", [](int device, py::array_t<uint64_t, py::array::c_style> dst,
                                 py::array_t<uint64_t, py::array::c_style> src, py::array_t<uint64_t, py::array::c_style> n,
                                 py::array_t<uint32_t, py::array::c_style> group_begin, int reps) {
    KVXFER_CHECK(dst.size() == src.size() && src.size() == n.size() && group_begin.size() >= 2, InvalidArgument,
                 "dst, src and n must have one entry per chunk, group_begin at least two bounds");
    std::vector<void*> d(dst.size());
    std::vector<const void*> s(src.size());
    std::vector<size_t> b(n.size());
    for (py::ssize_t i = 0; i < dst.size(); ++i) {
      d[i] = reinterpret_cast<void*>(dst.at(i));
      s[i] = reinterpret_cast<const void*>(src.at(i));
      b[i] = static_cast<size_t>(n.at(i));
    }
    std::vector<uint32_t> groups(group_begin.data(), group_begin.data() + group_begin.size());
    py::gil_scoped_release nogil;
    gpu::CopyQueue q(device);
    double best = 1e30;
    for (int rep = 0; rep <= std::max(1, reps); ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      uint64_t ticket = 0;
      for (size_t g = 0; g + 1 < groups.size(); ++g) {
        const uint32_t lo = groups[g], hi = groups[g + 1];
        KVXFER_CHECK(lo <= hi && hi <= d.size(), InvalidArgument, "group " << g << " is out of range");
        q.copy(d.data() + lo, s.data() + lo, b.data() + lo, hi - lo, /*device_reachable=*/true);
        ticket = q.record();
      }
      q.drain();
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      KVXFER_CHECK(q.done(ticket), TransferFailed, "the gather copies did not complete");
      if (rep) best = std::min(best, dt);
    }
    return best;
  });

  m.def("cma_copy_seconds", [](int pid, py::array_t<uint64_t, py::array::c_style> src,
                               py::array_t<uint64_t, py::array::c_style> dst, py::array_t<uint64_t, py::array::c_style> n) {
    std::vector<CmaOp> ops(src.size());
    for (py::ssize_t i = 0; i < src.size(); ++i)
      ops[i] = {reinterpret_cast<const void*>(src.at(i)), dst.at(i), static_cast<size_t>(n.at(i))};
    py::gil_scoped_release nogil;
    const auto t0 = std::chrono::steady_clock::now();
    CmaCopier(pid).copy(ops.data(), ops.size());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
}

}  // namespace kvxfer
