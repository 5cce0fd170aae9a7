// LayerSignal and DeviceCounter. record/wait_on_stream enqueue a kernel and return; bind and drain may wait on a
// mutex or a condition variable, so they release the GIL. The watcher thread never touches Python.
#include "bindings/bindings.h"
#include "core/agent.h"
#include "signals/layer_signal.h"

namespace kvxfer {

void register_signals(py::module_& m) {
  // SignalOverflowError -> kvxfer.errors.SignalOverflow (kept out of ErrorKind: only bind() raises it).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const SignalOverflowError& e) {
      py::object cls = py::module_::import("kvxfer.errors").attr("SignalOverflow");
      PyErr_SetObject(cls.ptr(), py::str(e.what()).ptr());
    }
  });

  py::class_<WatcherOptions>(m, "WatcherOptions")
      .def(py::init<>())
      .def_readwrite("max_bindings", &WatcherOptions::max_bindings)
      .def_readwrite("spin_us", &WatcherOptions::spin_us)
      .def_readwrite("sleep_us", &WatcherOptions::sleep_us);

  m.def("cuda_status", [] {
    CudaStatus s = cuda_status();
    return py::make_tuple(s.usable, s.device, s.why);
  });

  py::class_<LayerSignal>(m, "LayerSignal")
      // keep_alive: the watcher calls into the agent, so the agent lives at least as long as the signal.
      .def(py::init<Agent&, uint32_t, WatcherOptions, bool>(), py::keep_alive<1, 2>(), py::arg("agent"),
           py::arg("num_layers"), py::arg("options"), py::arg("want_device"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_layers", &LayerSignal::num_layers)
      .def_property_readonly("on_device", &LayerSignal::on_device)
      .def_property_readonly("why_host", &LayerSignal::why_host)
      .def_property_readonly("cuda_device", &LayerSignal::cuda_device)
      .def("record", &LayerSignal::record, py::call_guard<py::gil_scoped_release>())
      .def("host_record", &LayerSignal::host_record)
      .def("slot", &LayerSignal::slot)
      .def("bind",
           [](LayerSignal& s, std::vector<std::shared_ptr<SendState>> sends) {
             for (const auto& send : sends)
               KVXFER_CHECK(send->first_layer + send->num_layers <= s.num_layers(), InvalidArgument,
                            "send " << send->xfer_id << " covers layers [" << send->first_layer << ", "
                                    << send->first_layer + send->num_layers << ") but the LayerSignal has "
                                    << s.num_layers() << "; its last layers would never be posted");
             py::gil_scoped_release nogil;
             return s.watcher().bind(std::move(sends));
           })
      .def("drain", [](LayerSignal& s, double timeout_s) { return s.watcher().drain(timeout_s); },
           py::call_guard<py::gil_scoped_release>())
      .def("resync", [](LayerSignal& s) { return s.watcher().resync(); }, py::call_guard<py::gil_scoped_release>())
      .def("describe_pending", [](LayerSignal& s) { return s.watcher().describe_pending(); })
      .def("errors", [](LayerSignal& s) { return s.watcher().errors(); })
      .def("close", [](LayerSignal& s) { s.watcher().stop(); }, py::call_guard<py::gil_scoped_release>())
      .def("enable_probe", &LayerSignal::enable_probe)
      .def("take_latency_samples", [](LayerSignal& s) { return s.watcher().take_latency_samples(); })
      .def("stats", [](LayerSignal& s) {
        WatcherStats st = s.watcher().stats();
        py::dict d;
        d["forwards_bound"] = st.forwards_bound;
        d["forwards_delivered"] = st.forwards_delivered;
        d["records_delivered"] = st.records_delivered;
        d["layers_posted"] = st.layers_posted;
        d["layers_skipped"] = st.layers_skipped;
        d["errors"] = st.errors;
        d["unbound_forwards"] = st.unbound_forwards;
        d["forwards_skipped"] = st.forwards_skipped;
        d["polls"] = st.polls;
        return d;
      });

  py::class_<DeviceCounter, std::shared_ptr<DeviceCounter>>(m, "DeviceCounter")
      .def(py::init<uint32_t, bool>(), py::arg("num_layers"), py::arg("want_device"))
      .def_property_readonly("num_layers", &DeviceCounter::num_layers)
      .def_property_readonly("on_device", &DeviceCounter::on_device)
      .def_property_readonly("why_host", &DeviceCounter::why_host)
      .def_property_readonly("generation", &DeviceCounter::generation)
      .def_property_readonly("fail_word", &DeviceCounter::fail_word)
      .def_property_readonly("device_errors", &DeviceCounter::device_errors)
      .def_property_readonly("layers_done", &DeviceCounter::layers_done)
      .def("attach", &DeviceCounter::attach)
      .def("word", &DeviceCounter::word)
      .def("sync", &DeviceCounter::sync, py::call_guard<py::gil_scoped_release>())
      .def("wait_on_stream", &DeviceCounter::wait_on_stream, py::call_guard<py::gil_scoped_release>());
}

}  // namespace kvxfer
