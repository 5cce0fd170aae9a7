// Provider choice and the attributes kvxfer needs: RDM endpoint, FI_RMA writes with >= 4 bytes of remote CQ
// data, FI_MSG for control, FI_SOURCE to attribute immediates to their sender. Every MR mode a provider may ask
// for is offered; what it keeps decides how we register and address memory.
#pragma once
#include <rdma/fabric.h>

#include <string>
#include <vector>

namespace kvxfer {

// Our names for providers, in the order "auto" tries them.
struct ProviderName {
  const char* kvxfer_name;  // "efa", "verbs", "tcp", "shm"
  const char* prov_name;    // libfabric prov_name hint
};
const std::vector<ProviderName>& provider_order();

// Returns an owned fi_info (free with fi_freeinfo) for the named provider or nullptr with the reason in *why.
// interface (e.g. "lo") narrows the domain for IP-based providers; empty means any.
fi_info* get_provider_info(const std::string& kvxfer_name, const std::string& interface, std::string* why);

// The domains (interfaces, NICs) of the named provider that offer what kvxfer needs, in libfabric's order.
std::vector<std::string> provider_domains(const std::string& kvxfer_name);

}  // namespace kvxfer
