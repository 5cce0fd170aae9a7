// Build features and runtime probes for `python -m kvxfer info`, plus the same-run CMA limit for benchmarks.
#include <sys/uio.h>

#include <chrono>

#include "bindings/bindings.h"
#include "gpu/cuda_device.h"
#include "gpu/gather_batch.h"
#include "transports/host_ipc/cma.h"
#include "transports/host_ipc/cma_workers.h"
#ifdef KVXFER_HAVE_LIBFABRIC
#include "transports/fabric/fabric_transport.h"
#endif
#ifdef KVXFER_HAVE_UCX
#include "transports/ucx/ucx_transport.h"
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
    for (const auto& p : probes)
      out.append(py::make_tuple(p.name, p.usable, p.detail, p.own_keys, p.coalesced_imms, p.domains));
    return out;
  });
  m.def("probe_peer_fence", [](const std::string& provider) {
    FenceProbe f;
    {
      py::gil_scoped_release nogil;
      f = probe_peer_fence(provider);
    }
    py::dict d;
    d["fences_peers"] = f.fences_peers;
    d["own_key_landed"] = f.own_key_landed;
    d["shared_key_landed"] = f.shared_key_landed;
    d["closed_key_landed"] = f.closed_key_landed;
    d["new_key_landed"] = f.new_key_landed;
    d["bytes_written"] = f.bytes_written;
    d["immediates"] = f.immediates;
    return d;
  }, "Per-peer keys checked against the provider: which of four writes landed (see fence_probe.cpp).");
#else
  m.attr("have_libfabric") = false;
#endif
#ifdef KVXFER_HAVE_UCX
  m.attr("have_ucx") = true;
  m.def("ucx_version", &ucx_version);
  m.def("probe_ucx", [] {
    std::string detail;
    bool ok;
    {
      py::gil_scoped_release nogil;
      ok = probe_ucx(&detail);
    }
    return py::make_tuple(ok, detail);
  });
#else
  m.attr("have_ucx") = false;
#endif
#ifdef KVXFER_HAVE_CUDA
  m.attr("have_cuda") = true;
#else
  m.attr("have_cuda") = false;
#endif

  m.def("cuda_stream_synchronize", [](uint64_t stream, int device) { gpu::synchronize_stream(stream, device); },
        py::arg("stream"), py::arg("device"), py::call_guard<py::gil_scoped_release>());
  m.def("gpu_status", [] {
    std::string why;
    bool ok;
    {
      py::gil_scoped_release nogil;
      ok = gpu::available(&why);
    }
    return py::make_tuple(ok, why);
  });
  m.attr("cuda_archs") = gpu::built_archs();
  m.def("_kernel_image_for", [](int major, int minor, const std::string& archs) {
    const gpu::KernelImage k = gpu::kernel_image_for(major, minor, archs);
    return py::make_tuple(k.runs, k.how);
  }, py::arg("major"), py::arg("minor"), py::arg("archs"));
  m.def("gpu_kernel_images", [] {  // [(device, runs, how)] for every visible GPU
    py::list out;
    const int n = gpu::device_count();
    for (int d = 0; d < n; ++d) {
      const gpu::KernelImage k = gpu::kernel_image(d);
      out.append(py::make_tuple(d, k.runs, k.how));
    }
    return out;
  });
  m.def("gpu_devices", [] {
    py::list out;
    const int n = gpu::device_count();
    for (int d = 0; d < n; ++d) out.append(py::make_tuple(d, gpu::pci_bus_id(d)));
    return out;
  });

  // Tests: the host half of the gather kernels (how a batch is cut over blocks), on machines without a GPU.
  using Runs = std::vector<std::tuple<uint64_t, uint64_t, uint64_t>>;  // (dst, src, nbytes)
  auto to_runs = [](const Runs& runs) {
    std::vector<gpu::CopyRun> out;
    for (const auto& [dst, src, n] : runs) out.push_back({dst, src, n});
    return out;
  };
  m.def("_split_for_blocks", [to_runs](const Runs& runs, uint32_t max_blocks) {
    const std::vector<gpu::CopyRun> in = to_runs(runs);
    std::vector<gpu::CopyRun> out;
    gpu::split_for_blocks(in.data(), in.size(), max_blocks, &out);
    Runs pieces;
    for (const auto& r : out) pieces.emplace_back(r.dst, r.src, r.nbytes);
    return pieces;
  }, py::arg("runs"), py::arg("max_blocks"));
  m.attr("_split_grain") = gpu::kSplitGrain;
  m.def("_layers_per_fence", [to_runs](const Runs& pieces, uint32_t max_blocks, uint64_t fence_bytes,
                                       size_t num_layers) {
    return gpu::layers_per_fence(to_runs(pieces), max_blocks, fence_bytes, num_layers);
  }, py::arg("pieces"), py::arg("max_blocks"), py::arg("fence_bytes"), py::arg("num_layers"));
  m.def("cma_threads_default", [] {
    const unsigned n = cma_threads_from_env();
    return n > 1 ? n : 0u;
  });
  m.def("yama_ptrace_scope", &yama_ptrace_scope);
  m.def("cma_probe", [](int pid, uint64_t addr, uint64_t cookie) {
    std::string why;
    bool ok = cma_probe(pid, addr, cookie, &why);
    return py::make_tuple(ok, why);
  });

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

  // CopyQueue::copy_layers alone, for tests/gpu and benchmarks/bench_gpu.py: the chunks (rel_dst, rel_src, n) of one
  // layer, relative to each layer's bases (src_bases[l], dst_bases[l]), for every layer as one kernel; waits until
  // every layer's token says it landed (not the event), then drains. Returns the wall seconds of the best of `reps`
  // runs after a warm-up (reps 0: one run, no warm-up).
  m.def("gpu_copy_layers_seconds", [](int device, py::array_t<uint64_t, py::array::c_style> rel_dst,
                                      py::array_t<uint64_t, py::array::c_style> rel_src,
                                      py::array_t<uint64_t, py::array::c_style> n,
                                      py::array_t<uint64_t, py::array::c_style> src_bases,
                                      py::array_t<uint64_t, py::array::c_style> dst_bases, int reps) {
    KVXFER_CHECK(rel_dst.size() == rel_src.size() && rel_src.size() == n.size() && n.size() >= 1, InvalidArgument,
                 "rel_dst, rel_src and n must have one entry per chunk of a layer (at least one)");
    KVXFER_CHECK(src_bases.size() == dst_bases.size() && src_bases.size() >= 1, InvalidArgument,
                 "src_bases and dst_bases must have one entry per layer");
    std::vector<gpu::CopyQueue::RelCopy> rel(n.size());
    for (py::ssize_t i = 0; i < n.size(); ++i) rel[i] = {rel_dst.at(i), rel_src.at(i), n.at(i)};
    std::vector<gpu::CopyQueue::LayerBases> bases(src_bases.size());
    for (py::ssize_t i = 0; i < src_bases.size(); ++i) bases[i] = {src_bases.at(i), dst_bases.at(i)};
    py::gil_scoped_release nogil;
    gpu::CopyQueue q(device);
    KVXFER_CHECK(q.can_copy_layers(rel.size(), 0), TransportUnavailable,
                 "copy_layers is unavailable here (KVXFER_GPU_LAUNCH=per_layer, KVXFER_GPU_COPY=copy_engine, no "
                 "pinned memory, or more than one launch's descriptors)");
    std::vector<uint64_t> tokens(bases.size());
    double best = 1e30;
    const int runs = reps > 0 ? reps + 1 : 1;  // a warm-up first when timing
    for (int run = 0; run < runs; ++run) {
      const auto t0 = std::chrono::steady_clock::now();
      KVXFER_CHECK(q.copy_layers(rel.data(), rel.size(), bases.data(), bases.size(), tokens.data()), TransferFailed,
                   "no room for the descriptors");
      const uint64_t ticket = q.record();
      for (size_t l = 0; l < tokens.size(); ++l)
        while (!q.layer_landed(tokens[l], ticket)) {
        }
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      q.drain();
      KVXFER_CHECK(q.done(ticket), TransferFailed, "the gather kernel did not complete");
      if (reps <= 0 || run > 0) best = std::min(best, dt);
    }
    return best;
  });

  // The same-host limit kvxfer's cma path is measured against: one thread, process_vm_writev of the same chunks
  // (src addr, remote addr, nbytes) into `pid`, batched IOV_MAX at a time. Returns seconds.
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
