#include "core/host_range.h"

#include <cinttypes>
#include <cstdio>

#include "core/errors.h"

namespace kvxfer {

void check_host_range(uint64_t addr, uint64_t nbytes, const std::string& what) {
  FILE* maps = std::fopen("/proc/self/maps", "r");
  if (!maps) return;  // not Linux-like: the transport's own registration is the only check
  const uint64_t end = addr + nbytes;
  uint64_t covered = addr;  // every byte below `covered` is known mapped rw
  char line[8192];
  std::string problem;
  while (covered < end && std::fgets(line, sizeof(line), maps)) {
    uint64_t lo = 0, hi = 0;
    char perms[8] = {0};
    if (std::sscanf(line, "%" SCNx64 "-%" SCNx64 " %7s", &lo, &hi, perms) != 3) continue;
    if (hi <= covered || lo > covered) continue;  // maps are sorted; a gap shows up as lo > covered
    if (perms[0] != 'r' || perms[1] != 'w') {
      problem = std::string("is mapped without read+write permission (") + perms + ")";
      break;
    }
    covered = hi;
  }
  std::fclose(maps);
  if (covered >= end) return;
  if (problem.empty()) problem = "is not mapped in this process";
  KVXFER_THROW(RegistrationFailed, what << ": byte at 0x" << std::hex << covered << std::dec << " (offset "
                                        << (covered - addr) << " of " << nbytes << ") " << problem
                                        << "; register memory this process allocated and can write");
}

}  // namespace kvxfer
