// Transport 'ucx': the Transport interface over UCX's UCP layer. The implementation (ucx_transport.cpp) is built as
// a plugin, kvxfer/_ucx.so, the only binary that links UCX; these functions load it on first use (ucx_loader.cpp).
//
// UCX picks the wires itself (rc/dc verbs, tcp, shared memory, cma; cuda_ipc/cuda_copy when it was built with
// CUDA), steered by its own UCX_TLS / UCX_NET_DEVICES variables; the agent's `interface` becomes UCX_NET_DEVICES.
#pragma once
#include <memory>
#include <string>

#include "transports/transport.h"

namespace kvxfer {

// interface: UCX_NET_DEVICES for this agent ("lo", "mlx5_0:1"); empty leaves UCX's own choice. Throws
// TransportUnavailable naming what is missing (the plugin, UCX itself, a usable device).
std::unique_ptr<Transport> make_ucx_transport(const std::string& interface);

// "1.13.1", the UCX the plugin linked; throws TransportUnavailable when the plugin cannot be loaded.
std::string ucx_version();
// Whether a UCP context opens here, with the UCX resources it opened, or the reason it did not.
bool probe_ucx(std::string* detail);

}  // namespace kvxfer
