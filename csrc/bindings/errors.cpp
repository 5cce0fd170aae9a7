// ErrorKind -> kvxfer.errors class, in one table. kvxfer/errors.py defines the classes; we look them up by name so
// the Python module stays the single source of their docstrings and hierarchy.
#include "bindings/bindings.h"

namespace kvxfer {

void register_errors(py::module_& m) {
  py::enum_<ErrorKind>(m, "ErrorKind")
      .value("InvalidArgument", ErrorKind::InvalidArgument)
      .value("BlockOutOfRange", ErrorKind::BlockOutOfRange)
      .value("PoolTooSmall", ErrorKind::PoolTooSmall)
      .value("LayoutMismatch", ErrorKind::LayoutMismatch)
      .value("MetadataError", ErrorKind::MetadataError)
      .value("PeerUnknown", ErrorKind::PeerUnknown)
      .value("PeerLost", ErrorKind::PeerLost)
      .value("PeerRestarted", ErrorKind::PeerRestarted)
      .value("TransferTimeout", ErrorKind::TransferTimeout)
      .value("TransferFailed", ErrorKind::TransferFailed)
      .value("Cancelled", ErrorKind::Cancelled)
      .value("DuplicateTransfer", ErrorKind::DuplicateTransfer)
      .value("RegistrationFailed", ErrorKind::RegistrationFailed)
      .value("AccessViolation", ErrorKind::AccessViolation)
      .value("TransportUnavailable", ErrorKind::TransportUnavailable)
      .value("Internal", ErrorKind::Internal);

  // Raised as kvxfer.errors.<KindName>(message); kvxfer/errors.py must define one class per kind.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::object errors = py::module_::import("kvxfer.errors");
      py::object cls = errors.attr(error_kind_name(e.kind()));
      PyErr_SetObject(cls.ptr(), py::str(e.what()).ptr());
    }
  });
}

}  // namespace kvxfer
