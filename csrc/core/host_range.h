// check_host_range: is [addr, addr + nbytes) mapped readable and writable in this process?
//
// Providers like tcp and shm do not pin memory, so fi_mr_reg accepts any pointer and a bad raw range would only
// fail at the first transfer, in the peer. Reading /proc/self/maps once per registration turns that into an
// error at registration time that names the first byte that is not mapped (or not writable).
#pragma once
#include <cstdint>
#include <string>

namespace kvxfer {

// Throws RegistrationFailed naming `what` and the offending address.
void check_host_range(uint64_t addr, uint64_t nbytes, const std::string& what);

}  // namespace kvxfer
