// Loads kvxfer/_ucx.so (ucx_plugin.h) from beside _C on first use.
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>

#include "core/errors.h"
#include "transports/ucx/ucx_plugin.h"
#include "transports/ucx/ucx_transport.h"

namespace kvxfer {
namespace {

struct Plugin {
  decltype(&kvxfer_ucx_open) open = nullptr;
  decltype(&kvxfer_ucx_version) version = nullptr;
  decltype(&kvxfer_ucx_resources) resources = nullptr;
  std::string error;  // why it could not be loaded
};

std::string directory_of_this_module() {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&directory_of_this_module), &info) || !info.dli_fname) return ".";
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

const Plugin& plugin() {
  static Plugin p;
  static std::once_flag once;
  std::call_once(once, [] {
    // UCX installs handlers for SIGSEGV, SIGBUS, SIGILL and SIGFPE when its libucs loads, which would replace the
    // engine's own (Python's faulthandler, a serving stack's crash reporter). Off unless the user asked for them.
    setenv("UCX_ERROR_SIGNALS", "", 0);
    const std::string path = directory_of_this_module() + "/_ucx.so";
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* why = dlerror();
      p.error = "cannot load " + path + ": " + (why ? why : "?") +
                " (reinstall kvxfer with libucx-dev present: apt-get install libucx-dev, then pip install -e .)";
      return;
    }
    p.open = reinterpret_cast<decltype(p.open)>(dlsym(h, "kvxfer_ucx_open"));
    p.version = reinterpret_cast<decltype(p.version)>(dlsym(h, "kvxfer_ucx_version"));
    p.resources = reinterpret_cast<decltype(p.resources)>(dlsym(h, "kvxfer_ucx_resources"));
    if (!p.open || !p.version || !p.resources) {
      p.open = nullptr;
      p.error = path + " lacks the kvxfer_ucx_* entry points: it is from another kvxfer build; rebuild";
    }
  });
  return p;
}

const Plugin& loaded_plugin() {
  const Plugin& p = plugin();
  KVXFER_CHECK(p.open, TransportUnavailable, "transport 'ucx': " << p.error);
  return p;
}

}  // namespace

std::unique_ptr<Transport> make_ucx_transport(const std::string& interface) {
  KvxferUcxError err{};
  Transport* t = loaded_plugin().open(interface.c_str(), &err);
  if (!t) throw Error(static_cast<ErrorKind>(err.kind), err.message);
  return std::unique_ptr<Transport>(t);
}

std::string ucx_version() {
  char out[32] = {0};
  loaded_plugin().version(out, sizeof(out));
  return out;
}

bool probe_ucx(std::string* detail) {
  const Plugin& p = plugin();
  if (!p.open) {
    *detail = p.error;
    return false;
  }
  char out[2048] = {0};
  const bool ok = p.resources(out, sizeof(out)) != 0;
  if (!ok) {
    *detail = out;
    return false;
  }
  const std::string text = out;
  const size_t eol = text.find('\n');
  *detail = "ucx " + ucx_version() + ": " + text.substr(0, eol) +
            " (peers get those that can report a dead peer, UCX's error mode peer; Peer.path_reason names them)";
  const bool own_keys = eol != std::string::npos && text.substr(eol + 1) == "own";
  const char* writes = std::getenv("KVXFER_UCX_WRITES");
  const std::string mode = writes && *writes ? writes : "auto";
  *detail += mode == "put"  ? "; writes: ucp puts everywhere (KVXFER_UCX_WRITES=put)"
             : mode == "am" ? "; writes: kvxfer active messages everywhere (KVXFER_UCX_WRITES=am)"
             : own_keys     ? "; writes: kvxfer active messages everywhere (none of these resources has an RMA lane)"
                            : "; writes: ucp puts over RMA lanes, kvxfer active messages where UCX has none (tcp)";
  *detail += own_keys ? "; each peer writes with keys of its own, closed once it is dropped: nothing it still posts "
                        "lands, and its ended recvs settle (every write a data AM; KVXFER_PEER_KEYS=own)"
                      : "; one key for all peers: a dropped peer on another host leaves its ended recvs unsettled "
                        "(puts possible, a GPU-capable UCX, or KVXFER_PEER_KEYS=shared)";
  if (const char* tls = std::getenv("UCX_TLS")) *detail += std::string(", UCX_TLS=") + tls;
  return true;
}

}  // namespace kvxfer
