// The doorbell rings on their own, for tests: flow control, wrap-around, ring isolation and wake-ups are checked
// against the real shared-memory code without two agents in the way.
#include "bindings/bindings.h"
#include "transports/host_ipc/doorbell.h"

namespace kvxfer {

namespace {
struct LinkHandle {
  std::unique_ptr<DoorbellLink> link;
  std::atomic<uint64_t> wakes{0};
};
}  // namespace

void register_doorbell(py::module_& m) {
  py::class_<DoorbellRegion>(m, "_DoorbellRegion")
      .def(py::init<uint32_t>(), py::arg("rings") = ImmCode::kDefaultMaxPeers)
      .def_property_readonly("fd", &DoorbellRegion::fd)
      .def_property_readonly("rings", &DoorbellRegion::rings)
      .def_property_readonly_static("entries_per_ring", [](py::object) { return doorbell::kEntries; })
      .def("reset",
           [](DoorbellRegion& r, uint32_t w) {
             KVXFER_CHECK(w < r.rings(), InvalidArgument, "ring " << w << " does not exist");
             r.reset(w);
           })
      .def("drain",
           [](DoorbellRegion& r, uint32_t w, size_t max) {
             KVXFER_CHECK(w < r.rings(), InvalidArgument, "ring " << w << " does not exist");
             std::vector<DoorbellItem> items(max);
             const size_t n = r.drain(w, items.data(), max);
             py::list out;
             for (size_t i = 0; i < n; ++i) out.append(py::make_tuple(items[i].kind, items[i].imm, items[i].msg.xfer_id));
             return out;
           })
      .def("prepare_to_sleep", &DoorbellRegion::prepare_to_sleep)
      .def("wake_up", &DoorbellRegion::wake_up);

  py::class_<LinkHandle>(m, "_DoorbellLink")
      .def(py::init([](uint32_t pid, int region_fd, int wake_fd) {
        auto h = std::make_unique<LinkHandle>();
        std::string why;
        h->link = DoorbellLink::open(static_cast<pid_t>(pid), region_fd, wake_fd, &h->wakes, &why);
        KVXFER_CHECK(h->link, TransportUnavailable, "doorbell link: " << why);
        return h;
      }))
      .def("set_ring",
           [](LinkHandle& h, uint32_t w) {
             KVXFER_CHECK(h.link->set_ring(w), InvalidArgument,
                          "ring " << w << " does not exist (the region has " << h.link->rings() << ")");
           })
      .def("post_imm",
           [](LinkHandle& h, uint32_t imm) {
             KVXFER_CHECK(h.link->ready(), InvalidArgument, "call set_ring() before posting");
             return h.link->post_imm(imm);
           })
      .def("post_control",
           [](LinkHandle& h, uint64_t xfer_id) {
             KVXFER_CHECK(h.link->ready(), InvalidArgument, "call set_ring() before posting");
             ControlMessage m;
             m.xfer_id = xfer_id;
             return h.link->post_control(m);
           })
      .def_property_readonly("rings", [](const LinkHandle& h) { return h.link->rings(); })
      .def_property_readonly("wakes", [](const LinkHandle& h) { return h.wakes.load(); });
}

}  // namespace kvxfer
