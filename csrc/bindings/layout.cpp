#include "bindings/bindings.h"
#include "core/imm.h"
#include "core/layout.h"
#include "core/metadata.h"
#include "core/plan.h"
#include "transports/ucx/data_am.h"

namespace kvxfer {

void register_layout(py::module_& m) {
  py::class_<LayoutSpec>(m, "LayoutSpec")
      .def(py::init<>())
      .def_readwrite("kind", &LayoutSpec::kind)
      .def_readwrite("num_layers", &LayoutSpec::num_layers)
      .def_readwrite("num_blocks", &LayoutSpec::num_blocks)
      .def_readwrite("num_planes", &LayoutSpec::num_planes)
      .def_readwrite("block_size", &LayoutSpec::block_size)
      .def_readwrite("num_kv_heads", &LayoutSpec::num_kv_heads)
      .def_readwrite("head_dim", &LayoutSpec::head_dim)
      .def_readwrite("dtype", &LayoutSpec::dtype)
      .def_readwrite("chunk_bytes", &LayoutSpec::chunk_bytes)
      .def_readwrite("plane_stride", &LayoutSpec::plane_stride)
      .def_readwrite("block_stride", &LayoutSpec::block_stride)
      .def_readwrite("head_begin", &LayoutSpec::head_begin)
      .def_readwrite("total_kv_heads", &LayoutSpec::total_kv_heads)
      .def_readwrite("head_major", &LayoutSpec::head_major)
      .def_readwrite("layer_region", &LayoutSpec::layer_region)
      .def_readwrite("layer_offset", &LayoutSpec::layer_offset)
      .def("fingerprint", &LayoutSpec::fingerprint)
      .def("validate", [](const LayoutSpec& l, const std::vector<uint64_t>& sizes) { validate_layout(l, sizes); });

  m.def("check_compatible", &check_compatible, "Raise LayoutMismatch naming the first differing field.");

  // Plan inspection for tests and benchmarks: returns a dict of numpy arrays (one row per write).
  m.def(
      "build_plan",
      [](const LayoutSpec& src, const LayoutSpec& dst, py::array_t<int32_t, py::array::c_style> src_ids,
         py::array_t<int32_t, py::array::c_style> dst_ids, uint32_t first_layer, uint32_t num_layers,
         uint64_t max_write_bytes, uint32_t num_tokens) {
        WritePlan plan;
        {
          const int32_t* s = ids_ptr(src_ids, "src_ids");
          const int32_t* d = ids_ptr(dst_ids, "dst_ids");
          py::gil_scoped_release nogil;
          plan = build_plan(src, dst, s, src_ids.size(), d, dst_ids.size(), num_tokens, first_layer, num_layers,
                            max_write_bytes);
        }
        const size_t n = plan.num_writes();
        py::array_t<uint64_t> so(n), doff(n), nb(n);
        py::array_t<uint32_t> sr(n), dr(n), layer(n), gr(n);
        for (size_t i = 0; i < n; ++i) {
          const Write w = plan.write(static_cast<uint32_t>(i));
          so.mutable_at(i) = w.src_offset;
          doff.mutable_at(i) = w.dst_offset;
          nb.mutable_at(i) = w.nbytes;
          sr.mutable_at(i) = w.src_region;
          dr.mutable_at(i) = w.dst_region;
          layer.mutable_at(i) = w.layer;
          gr.mutable_at(i) = w.granules;
        }
        py::dict out;
        out["src_offset"] = so;
        out["dst_offset"] = doff;
        out["nbytes"] = nb;
        out["src_region"] = sr;
        out["dst_region"] = dr;
        out["layer"] = layer;
        out["granules"] = gr;
        out["granules_per_layer"] = plan.granules_per_layer;
        std::vector<uint64_t> begins;
        for (uint32_t li = 0; li <= plan.num_layers; ++li) begins.push_back(plan.layer_begin(li));
        out["layer_begin"] = begins;
        return out;
      },
      py::arg("src"), py::arg("dst"), py::arg("src_ids"), py::arg("dst_ids"), py::arg("first_layer") = 0,
      py::arg("num_layers") = 0, py::arg("max_write_bytes") = 8ull << 20, py::arg("num_tokens") = 0);

  // Plan building timed in C++ alone (no numpy conversion), for benchmarks: returns (seconds, num_writes).
  m.def("time_build_plan", [](const LayoutSpec& src, const LayoutSpec& dst, py::array_t<int32_t, py::array::c_style> s,
                              py::array_t<int32_t, py::array::c_style> d, int repeats) {
    const int32_t* sp = ids_ptr(s, "src_ids");
    const int32_t* dp = ids_ptr(d, "dst_ids");
    py::gil_scoped_release nogil;
    size_t writes = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < repeats; ++i)
      writes = build_plan(src, dst, sp, dp, s.size(), 0, src.num_layers, 8ull << 20).num_writes();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return std::make_pair(dt / repeats, writes);
  });

  py::module_ imm = m.def_submodule("imm", "The 32-bit immediate encoding (see csrc/core/imm.h).");
  imm.attr("MAX_SLOTS") = ImmCode::kMaxSlots;
  imm.attr("MAX_LAYERS") = ImmCode::kMaxLayers;
  imm.attr("MAX_GRANULES") = ImmCode::kMaxGranules;
  imm.def("encode", &ImmCode::encode);
  imm.def("decode", [](uint32_t v) { return py::make_tuple(ImmCode::slot(v), ImmCode::layer(v), ImmCode::granules(v)); });

  // Metadata parsing exposed for tests (fuzzing the defensive reader) and `kvxfer info`.
  m.def("decode_metadata", [](py::bytes b) {
    std::string s = b;
    AgentInfo a = decode_agent_info(reinterpret_cast<const uint8_t*>(s.data()), s.size());
    py::dict d;
    d["name"] = a.name;
    d["epoch"] = a.epoch;
    d["pid"] = a.pid;
    d["hostname"] = a.hostname;
    d["transport"] = a.transport;
    d["fingerprint"] = a.fingerprint();
    d["peer_keys"] = a.peer_keys;
    py::list pools;
    for (const auto& p : a.pools) {
      py::dict pd;
      pd["name"] = p.name;
      pd["layout"] = p.layout;
      pd["regions"] = p.regions.size();
      py::list keys;
      for (const auto& r : p.regions) keys.append(r.rkey);
      pd["rkeys"] = keys;
      pools.append(pd);
    }
    d["pools"] = pools;
    d["signal_rkey"] = a.signal_rkey;
    d["landing_rkey"] = a.landing_rkey;
    return d;
  });

  m.def("peer_key", &peer_key, py::arg("base"), py::arg("salt"),
        "The key a writer writes with where the owner published base (per-peer keys), salt = writer_salt(...).");
  m.def("writer_salt", &writer_salt, py::arg("writer_epoch"), py::arg("owner_link"),
        "What a writer's keys derive from: its epoch and the owner's link number for that association.");

  // The UCX transport's check of a peer's data AM (transports/ucx/data_am.h), for tests: "" or why it is refused.
  // regions: {key: (base, size)} as this agent exported them.
  m.def("check_ucx_data_am", [](py::bytes header, uint64_t data_len, const std::map<uint64_t, std::pair<uint64_t, uint64_t>>& regions) {
    std::string h = header;
    std::map<uint64_t, ucx_data::Region> r;
    for (const auto& [key, region] : regions) r[key] = {region.first, region.second};
    ucx_data::DataHeader out;
    ucx_data::DataPiece pieces[ucx_data::kMaxPieces];
    return ucx_data::check(
        reinterpret_cast<const uint8_t*>(h.data()), h.size(), data_len,
        [&r](uint64_t key) -> const ucx_data::Region* {
          auto it = r.find(key);
          return it == r.end() ? nullptr : &it->second;
        },
        &out, pieces);
  });
}

}  // namespace kvxfer
