#include "bindings/bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvxfer C++ core (see csrc/). Use the kvxfer package, not this module directly.";
  kvxfer::register_errors(m);
  kvxfer::register_layout(m);
  kvxfer::register_agent(m);
  kvxfer::register_info(m);
  kvxfer::register_signals(m);
  kvxfer::register_doorbell(m);
}
