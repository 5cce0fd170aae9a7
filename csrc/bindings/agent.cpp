// Agent, Peer, Send, Recv. Every call that can block or spin releases the GIL; status reads are O(1) atomics.
#include <cctype>
#include <chrono>

#include "bindings/bindings.h"
#include "core/agent.h"

namespace kvxfer {
namespace {

struct Ids {
  py::array_t<int32_t, py::array::c_style> arr;
  const int32_t* ptr;
  size_t n;
};
Ids take_ids(py::array_t<int32_t, py::array::c_style> a, const char* what) {
  const int32_t* p = ids_ptr(a, what);
  return {a, p, static_cast<size_t>(a.size())};
}

template <typename T>
void bind_transfer(py::class_<T, std::shared_ptr<T>>& c) {
  c.def_readonly("xfer_id", &T::xfer_id)
      .def_readonly("first_layer", &T::first_layer)
      .def_readonly("num_layers", &T::num_layers)
      .def_property_readonly("state", [](const T& t) { return static_cast<int>(t.state()); })
      .def_property_readonly("layers_done", &T::layers_done)
      .def_property_readonly("error_kind", [](const T& t) { return t.error_kind(); })
      .def_property_readonly("error", [](const T& t) { return t.error(); })
      .def_property_readonly("finished_at", &T::finished_at)
      .def("layer_done", &T::layer_done)
      .def("wait", [](T& t, int layer, double timeout_s) { return static_cast<int>(t.wait(layer, timeout_s)); },
           py::arg("layer"), py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>());
}

std::vector<std::string> pool_gpu_pci_ids(const PeerState& p, size_t pool) {
  std::vector<std::string> ids;  // lower case, like sysfs
  for (const auto& r : p.info.pools[pool].regions)
    if (r.device >= 0 && !r.pci_bus_id.empty()) {
      std::string id = r.pci_bus_id;
      for (auto& ch : id) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      ids.push_back(id);
    }
  return ids;
}

}  // namespace

void register_agent(py::module_& m) {
  py::class_<AgentOptions>(m, "AgentOptions")
      .def(py::init<>())
      .def_readwrite("name", &AgentOptions::name)
      .def_readwrite("transport", &AgentOptions::transport)
      .def_readwrite("interface", &AgentOptions::interface)
      .def_readwrite("default_timeout_s", &AgentOptions::default_timeout_s)
      .def_readwrite("rails", &AgentOptions::rails)
      .def_readwrite("staging", &AgentOptions::staging)
      .def_readwrite("staging_slot_bytes", &AgentOptions::staging_slot_bytes)
      .def_readwrite("staging_slots", &AgentOptions::staging_slots)
      .def_readwrite("cma_threads", &AgentOptions::cma_threads)
      .def_readwrite("doorbell", &AgentOptions::doorbell)
      .def_readwrite("landing", &AgentOptions::landing)
      .def_readwrite("landing_slots", &AgentOptions::landing_slots)
      .def_readwrite("landing_slot_bytes", &AgentOptions::landing_slot_bytes)
      .def_readwrite("max_peers", &AgentOptions::max_peers)
      .def_readwrite("peer_timeout_s", &AgentOptions::peer_timeout_s);

  py::class_<LocalRegion>(m, "LocalRegion")
      .def(py::init<uint64_t, uint64_t, int>(), py::arg("addr"), py::arg("nbytes"), py::arg("device") = -1)
      .def_readonly("addr", &LocalRegion::addr)
      .def_readonly("nbytes", &LocalRegion::nbytes)
      .def_readonly("device", &LocalRegion::device);

  py::class_<PeerState, std::shared_ptr<PeerState>>(m, "PeerState")
      .def_property_readonly("name", [](const PeerState& p) { return p.info.name; })
      .def_property_readonly("epoch", [](const PeerState& p) { return p.info.epoch; })
      .def_property_readonly("pid", [](const PeerState& p) { return p.info.pid; })
      .def_property_readonly("hostname", [](const PeerState& p) { return p.info.hostname; })
      .def_property_readonly("path", [](const PeerState& p) { return p.path; })
      .def_property_readonly("path_reason", [](const PeerState& p) { return p.path_reason; })
      .def_property_readonly("signals", [](const PeerState& p) {
        // From the reason set at add_peer, not the link itself: the progress thread drops a lost peer's link.
        return std::string(p.signals_reason.rfind("doorbell", 0) == 0 ? "doorbell" : "fabric");
      })
      .def_property_readonly("signals_reason", [](const PeerState& p) { return p.signals_reason; })
      .def_property_readonly("_rx_window", [](const PeerState& p) { return p.rx_window; })
      .def_property_readonly("silent_s", [](const PeerState& p) {
        const int64_t at = p.last_heard_ns.load(std::memory_order_relaxed);
        const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
        return at ? (now - at) / 1e9 : 0.0;  // seconds since anything came from the peer (checked every 10 ms)
      })
      .def_property_readonly("heartbeat_ms", [](const PeerState& p) { return p.info.heartbeat_ms; })
      .def_property_readonly("send_window", [](PeerState& p) {
        std::lock_guard<std::mutex> lock(p.mu);
        return p.tx_window_slots;  // transfers we may have in flight towards it (its choice; 0 before its HELLO)
      })
      .def_property_readonly("landing_slots", [](const PeerState& p) {
        return py::make_tuple(p.info.landing_slots, p.info.landing_slot_bytes);  // what it gives each sender
      })
      .def_property_readonly("same_host", [](const PeerState& p) { return p.same_host; })
      .def_property_readonly("rails", [](const PeerState& p) { return p.rails; })
      .def_property_readonly("connected", [](const PeerState& p) { return p.connected.load(); })
      .def_property_readonly("lost", [](const PeerState& p) { return p.lost.load(); })
      .def_property_readonly("fingerprint", [](const PeerState& p) { return p.info.fingerprint(); })
      .def_property_readonly("gpu_pci_ids", [](const PeerState& p) {
        std::vector<std::string> ids;  // PCI bus ids of the GPUs behind the peer's pools (lower case, like sysfs)
        for (size_t i = 0; i < p.info.pools.size(); ++i)
          for (auto& id : pool_gpu_pci_ids(p, i)) ids.push_back(std::move(id));
        return ids;
      })
      .def("pool_gpu_pci_ids", [](const PeerState& p, size_t pool) {
        KVXFER_CHECK(pool < p.info.pools.size(), InvalidArgument, "peer has no pool " << pool);
        return pool_gpu_pci_ids(p, pool);  // the GPUs behind that one pool (a send's destination)
      })
      .def_property_readonly("region_sharing", [](const PeerState& p) {
        std::vector<std::string> out;  // per region of every pool: how a same-host peer can map it
        for (const auto& pool : p.info.pools)
          for (const auto& r : pool.regions)
            out.push_back(r.device < 0 ? "host" : r.has_ipc ? "ipc" : r.has_vmm ? "vmm" : "none");
        return out;
      })
      .def_property_readonly("pools", [](const PeerState& p) {
        py::list out;
        for (const auto& pool : p.info.pools) out.append(py::make_tuple(pool.name, pool.layout));
        return out;
      });

  py::class_<SendState, std::shared_ptr<SendState>> send(m, "SendState");
  bind_transfer(send);
  send.def_property_readonly("num_writes", [](const SendState& s) { return s.plan.num_writes(); })
      .def_property_readonly("nbytes", [](const SendState& s) { return s.plan.total_bytes(); })
      .def_property_readonly("slot", [](const SendState& s) { return s.slot; })
      .def_property_readonly("waiting_for_slot", [](const SendState& s) {
        std::lock_guard<std::mutex> lock(s.peer->mu);
        return s.waiting_for_slot;
      })
      .def_property_readonly("path", [](const SendState& s) { return std::string(send_path_name(s.path)); })
      .def_property_readonly("path_reason", [](const SendState& s) { return s.path_reason; })
      .def_property_readonly("writes_over", [](const SendState& s) { return s.writes_over.load(std::memory_order_acquire); });
  py::class_<RecvState, std::shared_ptr<RecvState>> recv(m, "RecvState");
  bind_transfer(recv);
  recv.def_readonly("granules_per_layer", &RecvState::granules_per_layer);
  recv.def_property_readonly("writes_over", [](const RecvState& r) { return r.writes_over.load(std::memory_order_acquire); });

  py::class_<Agent>(m, "Agent")
      .def(py::init<AgentOptions>(), py::call_guard<py::gil_scoped_release>())
      .def("metadata", [](const Agent& a) {
        auto b = a.metadata();
        return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
      })
      .def("register_pool", &Agent::register_pool, py::call_guard<py::gil_scoped_release>())
      .def("add_peer", [](Agent& a, py::bytes b) {
        std::string s = b;
        py::gil_scoped_release nogil;
        return a.add_peer(reinterpret_cast<const uint8_t*>(s.data()), s.size());
      })
      .def("remove_peer", &Agent::remove_peer, py::arg("peer"), py::arg("drain_s") = 0.0,
           py::call_guard<py::gil_scoped_release>())
      .def("refuse_peer", &Agent::refuse_peer, py::arg("peer"), py::arg("why"),
           py::call_guard<py::gil_scoped_release>())
      .def("wait_connected", &Agent::wait_connected, py::call_guard<py::gil_scoped_release>())
      .def("send",
           [](Agent& a, const std::shared_ptr<PeerState>& peer, uint64_t xfer_id, uint32_t src_pool,
              const std::string& dst_pool, py::array_t<int32_t, py::array::c_style> src_ids,
              py::array_t<int32_t, py::array::c_style> dst_ids, int first_layer, int num_layers, double timeout_s,
              uint32_t num_tokens) {
             Ids s = take_ids(src_ids, "src_ids"), d = take_ids(dst_ids, "dst_ids");
             py::gil_scoped_release nogil;
             return a.send(peer, xfer_id, src_pool, dst_pool, s.ptr, s.n, d.ptr, d.n, num_tokens, first_layer,
                           num_layers, timeout_s);
           },
           py::arg("peer"), py::arg("xfer_id"), py::arg("src_pool"), py::arg("dst_pool"), py::arg("src_ids"),
           py::arg("dst_ids"), py::arg("first_layer"), py::arg("num_layers"), py::arg("timeout_s"),
           py::arg("num_tokens") = 0)
      .def("abort_send", &Agent::abort_send)
      .def("cancel_recv", &Agent::cancel_recv)  // never blocks
      .def("layer_ready", &Agent::layer_ready)  // microseconds, never blocks: keep the GIL (cheaper than dropping it)
      .def("recv",
           [](Agent& a, const std::shared_ptr<PeerState>& peer, uint64_t xfer_id, uint32_t dst_pool,
              py::array_t<int32_t, py::array::c_style> dst_ids, int first_layer, int num_layers, double timeout_s,
              const std::string& src_pool, uint32_t num_tokens) {
             Ids d = take_ids(dst_ids, "dst_ids");
             py::gil_scoped_release nogil;
             return a.recv(peer, xfer_id, dst_pool, d.ptr, d.n, first_layer, num_layers, timeout_s, src_pool,
                           num_tokens);
           },
           py::arg("peer"), py::arg("xfer_id"), py::arg("dst_pool"), py::arg("dst_ids"), py::arg("first_layer"),
           py::arg("num_layers"), py::arg("timeout_s"), py::arg("src_pool") = "", py::arg("num_tokens") = 0)
      .def("choose_path",
           [](const Agent& a, const std::shared_ptr<PeerState>& peer, uint32_t src_pool, uint32_t dst_pool) {
             PathChoice c = a.choose_path(*peer, src_pool, dst_pool);
             return py::make_tuple(std::string(send_path_name(c.path)), c.reason);
           })
      .def("staging_info", &Agent::staging_info)
      .def("landing_info", &Agent::landing_info)
      .def_property_readonly("last_landing_error", &Agent::last_landing_error)
      .def("_inject_landing", [](Agent& a, const std::shared_ptr<PeerState>& peer, uint32_t slot, uint32_t index,
                                 py::bytes b) {
        std::string s = b;
        a.inject_landing(peer, slot, index, std::vector<uint8_t>(s.begin(), s.end()));
      })
      .def("_corrupt_next_landing_batches", &Agent::corrupt_next_landing_batches)
      .def_property_readonly("hmem", [](const Agent& a) { return a.capabilities().hmem; })
      .def("_inject_imm", &Agent::inject_imm)
      .def("_inject_begin", &Agent::inject_begin)
      .def("_inject_wire_message", [](Agent& a, py::bytes b) {
        std::string s = b;
        a.inject_wire_message(std::vector<uint8_t>(s.begin(), s.end()));
      })
      .def_property_readonly("name", [](const Agent& a) { return a.info().name; })
      .def_property_readonly("epoch", [](const Agent& a) { return a.info().epoch; })
      .def_property_readonly("transport", [](const Agent& a) { return a.capabilities().name; })
      .def_property_readonly("provider", [](const Agent& a) { return a.capabilities().provider; })
      .def_property_readonly("domain", [](const Agent& a) { return a.capabilities().domain; })
      .def_property_readonly("max_inflight", [](const Agent& a) { return a.capabilities().max_inflight; })
      .def_property_readonly("rails", [](const Agent& a) { return a.capabilities().num_rails; })
      .def_property_readonly("cma_threads", &Agent::cma_threads)
      .def_property_readonly("max_peers", [](const Agent& a) { return a.options().max_peers; })
      .def_property_readonly("transfers_per_peer", &Agent::window_slots)
      .def_property_readonly("_doorbell_fds", [](const Agent& a) {
        return py::make_tuple(a.info().doorbell_fd, a.info().wake_fd);
      })
      .def_property_readonly("doorbell", [](const Agent& a) {
        return py::make_tuple(a.has_doorbell(), a.doorbell_unavailable());
      })
      .def("ended_count", &Agent::ended_count)
      .def("wait_ended", &Agent::wait_ended, py::arg("seen"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const Agent& a) {
        AgentStats s = a.stats();
        py::dict d;
        d["writes_posted"] = s.writes_posted;
        d["imms_received"] = s.imms_received;
        d["eagain"] = s.eagain;
        d["dropped_messages"] = s.dropped_messages;
        d["unknown_imms"] = s.unknown_imms;
        d["slots_reclaimed"] = s.slots_reclaimed;
        d["sends_waited_for_slot"] = s.sends_waited_for_slot;
        d["peers_released"] = s.peers_released;
        d["peers_fenced"] = s.peers_fenced;
        d["heartbeats_sent"] = s.heartbeats_sent;
        d["peers_silent"] = s.peers_silent;
        d["slot_violations"] = s.slot_violations;
        d["idle_waits"] = s.idle_waits;
        d["cma_jobs"] = s.cma_jobs;
        d["aborts_deferred"] = s.aborts_deferred;
        d["doorbell_sent"] = s.doorbell_sent;
        d["doorbell_received"] = s.doorbell_received;
        d["doorbell_wakes"] = s.doorbell_wakes;
        d["landings"] = s.landings;
        d["landing_rejected"] = s.landing_rejected;
        d["landing_waits"] = s.landing_waits;
        d["imm_writes"] = s.imm_writes;
        d["gpu_layer_launches"] = s.gpu_layer_launches;
        d["ipc_pools_mapped"] = s.ipc_pools_mapped;
        py::list rails;
        for (const auto& r : s.rails) {
          py::dict rd;
          rd["writes"] = r.writes;
          rd["imms"] = r.imms;
          rails.append(rd);
        }
        d["rails"] = rails;
        return d;
      });
}

}  // namespace kvxfer
