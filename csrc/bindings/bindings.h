// Shared by the binding files only. Nothing under core/ or transports/ includes pybind11.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "core/errors.h"

namespace py = pybind11;

namespace kvxfer {
void register_errors(py::module_& m);
void register_layout(py::module_& m);
void register_agent(py::module_& m);
void register_info(py::module_& m);
void register_signals(py::module_& m);
void register_doorbell(py::module_& m);

// A 1-D int32 C-contiguous view of ids (numpy arrays of other int types are converted by the Python layer).
inline const int32_t* ids_ptr(const py::array_t<int32_t, py::array::c_style>& a, const char* what) {
  KVXFER_CHECK(a.ndim() == 1, InvalidArgument, what << " must be a 1-D array of block ids, got " << a.ndim() << "-D");
  return a.data();
}
}  // namespace kvxfer
