// Which GPUs this build's kernels run on: the CUDA architectures it was compiled for (CMAKE_CUDA_ARCHITECTURES,
// "75;80;90", "90a-real", ...) against a device's compute capability. A GPU none of them fits (a T4 under a build
// for sm_80 and up) would fail every gather copy and layer record at its launch, so kvxfer asks this first: copies
// then go to the copy engines, signals refuse to be created, and `python -m kvxfer info` says which GPU lacks code.
//
// Plain C++ (no CUDA): tests check the rules on machines without a GPU (tests/test_kernel_archs.py).
#pragma once
#include <string>

namespace kvxfer {
namespace gpu {

struct KernelImage {
  bool runs = false;
  std::string how;  // "sm_80 code", "compute_90 PTX, compiled by the driver when first loaded", or why not
};

// archs: CMake's list (';', ',' or space separated). An entry "NN" is machine code (sm_NN) and PTX (compute_NN);
// "NN-real" machine code only, "NN-virtual" PTX only; a suffix 'a' (90a) runs on that exact GPU only, 'f' (100f)
// on its family. Machine code runs on GPUs of the same major version and an equal or higher minor one; PTX is
// compiled by the driver for any GPU at or above it. "native", "all" and "all-major" cannot be checked here: taken
// as running. (Desktop and data-center GPUs; Tegra parts such as Orin do not promise machine code compatibility
// within a major version, and PTX needs a driver at least as new as the toolkit: neither is checked.)
KernelImage kernel_image_for(int major, int minor, const std::string& archs);

// The architectures this build's kernels were compiled for ("" in a build without CUDA).
std::string built_archs();

}  // namespace gpu
}  // namespace kvxfer
