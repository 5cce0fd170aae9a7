// The boundary between _C and the UCX plugin (kvxfer/_ucx.so). The plugin alone links UCX; _C loads it with dlopen
// the first time an agent asks for transport 'ucx' (or `kvxfer info` probes it), so importing kvxfer never loads
// UCX's libraries, their constructors or their signal handlers into an engine's process.
#pragma once
#include <cstddef>

namespace kvxfer {
class Transport;
}

#define KVXFER_UCX_EXPORT __attribute__((visibility("default")))

extern "C" {
struct KvxferUcxError {
  int kind;  // a kvxfer::ErrorKind
  char message[2048];
};
// A new UcxTransport (delete it through Transport's virtual destructor), or nullptr with *err filled.
kvxfer::Transport* kvxfer_ucx_open(const char* interface, KvxferUcxError* err);
// "1.13.1"
void kvxfer_ucx_version(char* out, size_t len);
// 1 and the UCX resources a context opens here ("tcp/lo, cma/memory"), or 0 and why it could not open one.
int kvxfer_ucx_resources(char* out, size_t len);
}
