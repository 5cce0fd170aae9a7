#include "gpu/kernel_archs.h"

#include <cctype>
#include <sstream>
#include <vector>

namespace kvxfer {
namespace gpu {

namespace {

struct Arch {
  int value = 0;        // 90 for "90a-real"
  char suffix = 0;      // 'a', 'f' or 0
  bool code = true;     // sm_NN machine code
  bool ptx = true;      // compute_NN PTX
  std::string special;  // native / all / all-major, or an entry we cannot read
};

std::vector<Arch> parse(const std::string& archs) {
  std::vector<Arch> out;
  std::string entry;
  std::istringstream in(archs);
  auto flush = [&] {
    if (entry.empty()) return;
    Arch a;
    size_t i = 0;
    while (i < entry.size() && std::isdigit(static_cast<unsigned char>(entry[i]))) a.value = a.value * 10 + (entry[i++] - '0');
    if (i < entry.size() && (entry[i] == 'a' || entry[i] == 'f')) a.suffix = entry[i++];
    const std::string rest = entry.substr(i);
    if (a.value == 0 || (!rest.empty() && rest != "-real" && rest != "-virtual")) {
      a.special = entry;
    } else {
      a.code = rest != "-virtual";
      a.ptx = rest != "-real";
    }
    out.push_back(a);
    entry.clear();
  };
  for (char c : archs) {
    if (c == ';' || c == ',' || std::isspace(static_cast<unsigned char>(c)))
      flush();
    else
      entry += c;
  }
  flush();
  return out;
}

}  // namespace

KernelImage kernel_image_for(int major, int minor, const std::string& archs) {
  const std::vector<Arch> list = parse(archs);
  const int cc = major * 10 + minor;
  for (const Arch& a : list)
    if (!a.special.empty()) return {true, "built for '" + a.special + "' (not checked against this GPU)"};
  const Arch* ptx = nullptr;
  for (const Arch& a : list) {
    const bool same_major = a.value / 10 == major && a.value % 10 <= minor;
    const bool fits = a.suffix == 'a' ? a.value == cc : same_major;
    if (a.code && fits) return {true, "sm_" + std::to_string(a.value) + (a.suffix ? std::string(1, a.suffix) : "") + " code"};
    const bool ptx_fits = a.suffix ? fits : a.value <= cc;
    if (a.ptx && ptx_fits && (!ptx || a.value > ptx->value)) ptx = &a;
  }
  if (ptx) return {true, "compute_" + std::to_string(ptx->value) + " PTX, compiled by the driver when first loaded"};
  std::ostringstream why;
  why << "this build has no kernel code for sm_" << cc << " (built for " << (archs.empty() ? "no GPU" : archs)
      << "): rebuild kvxfer for it (KVXFER_CUDA_ARCHS=\"" << cc << "\" pip install -e ., or CMake's "
         "CMAKE_CUDA_ARCHITECTURES)";
  return {false, why.str()};
}

std::string built_archs() {
#ifdef KVXFER_CUDA_ARCHS
  return KVXFER_CUDA_ARCHS;
#else
  return "";
#endif
}

}  // namespace gpu
}  // namespace kvxfer
