#include "transports/fabric/provider.h"

#include <rdma/fi_domain.h>
#include <rdma/fi_errno.h>

#include <algorithm>
#include <cstring>

namespace kvxfer {

const std::vector<ProviderName>& provider_order() {
  static const std::vector<ProviderName> order = {
      {"efa", "efa"}, {"verbs", "verbs;ofi_rxm"}, {"tcp", "tcp;ofi_rxm"}, {"shm", "shm"}};
  return order;
}

namespace {

fi_info* make_hints(const char* prov_name, const std::string& interface, bool want_source, bool want_hmem) {
  fi_info* hints = fi_allocinfo();
  hints->caps = FI_MSG | FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_SEND | FI_RECV | (want_source ? FI_SOURCE : 0) |
                (want_hmem ? FI_HMEM : 0);
  // FI_REMOTE_CQ_DATA is an op flag, not a capability (ENODATA on every provider); cq_data_size is checked below.
  hints->mode = FI_CONTEXT | FI_CONTEXT2 | FI_RX_CQ_DATA;
  hints->ep_attr->type = FI_EP_RDM;
  hints->domain_attr->mr_mode =
      FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | (want_hmem ? FI_MR_HMEM : 0);
  hints->domain_attr->threading = FI_THREAD_DOMAIN;
  hints->domain_attr->data_progress = FI_PROGRESS_MANUAL;
  hints->fabric_attr->prov_name = strdup(prov_name);
  if (!interface.empty() && std::strncmp(prov_name, "shm", 3) != 0) hints->domain_attr->name = strdup(interface.c_str());
  return hints;
}

const ProviderName* find_provider(const std::string& kvxfer_name) {
  for (const auto& p : provider_order())
    if (kvxfer_name == p.kvxfer_name) return &p;
  return nullptr;
}

// The distinct domain names, in list order, of the entries that carry the remote CQ data kvxfer's counters need.
std::vector<std::string> domains_with_cq_data(const fi_info* list) {
  std::vector<std::string> out;
  for (const fi_info* cur = list; cur; cur = cur->next) {
    const std::string domain = cur->domain_attr->name ? cur->domain_attr->name : "";
    if (cur->domain_attr->cq_data_size >= 4 && std::find(out.begin(), out.end(), domain) == out.end())
      out.push_back(domain);
  }
  return out;
}

}  // namespace

fi_info* get_provider_info(const std::string& kvxfer_name, const std::string& interface, std::string* why) {
  const ProviderName* found = find_provider(kvxfer_name);
  if (!found) {
    *why = "unknown provider '" + kvxfer_name + "' (choose efa, verbs, tcp or shm)";
    return nullptr;
  }
  fi_info* info = nullptr;
  int rc = -FI_ENODATA;
  // FI_SOURCE is required: slots in the immediate are scoped per sender, so the receiver must know who wrote.
  // FI_HMEM (GPU-direct RDMA) is asked of the RDMA providers first and dropped when they cannot do it; the agent
  // then stages GPU memory through pinned host buffers and says so.
  const bool rdma = kvxfer_name == "efa" || kvxfer_name == "verbs";
  for (bool hmem : {true, false}) {
    if (hmem && !rdma) continue;
    fi_info* hints = make_hints(found->prov_name, interface, true, hmem);
    rc = fi_getinfo(FI_VERSION(1, 14), nullptr, nullptr, 0, hints, &info);
    fi_freeinfo(hints);
    if (rc == 0) break;
  }
  if (rc != 0) {
    *why = std::string("fi_getinfo found no ") + found->prov_name + " RDM endpoint with FI_RMA and FI_SOURCE" +
           (interface.empty() ? "" : " on interface " + interface) + ": " + fi_strerror(-rc);
    return nullptr;
  }
  // The domain name in the hints is not a filter for every provider: libfabric 1.17's tcp lists every interface
  // whatever it says (eth0 first here), so an agent asked for "lo" opened eth0. The interface is matched here.
  const bool pinned = !interface.empty() && std::strncmp(found->prov_name, "shm", 3) != 0;
  for (fi_info* cur = info; cur; cur = cur->next) {
    const char* domain = cur->domain_attr->name ? cur->domain_attr->name : "";
    if (cur->domain_attr->cq_data_size < 4 || (pinned && interface != domain)) continue;
    fi_info* chosen = fi_dupinfo(cur);
    fi_freeinfo(info);
    return chosen;
  }
  const std::vector<std::string> offered = domains_with_cq_data(info);
  fi_freeinfo(info);
  if (!offered.empty()) {
    std::string names;
    for (const auto& d : offered) names += (names.empty() ? "" : ",") + d;
    *why = std::string(found->prov_name) + " has no domain named '" + interface + "' (it offers: " + names +
           "); pass one of those as interface= (a netdev for tcp, the RDMA device for verbs, <device>-rdm for efa)";
    return nullptr;
  }
  *why = std::string(found->prov_name) + " offers no remote CQ data (cq_data_size < 4), which kvxfer's counters need";
  return nullptr;
}

std::vector<std::string> provider_domains(const std::string& kvxfer_name) {
  const ProviderName* found = find_provider(kvxfer_name);
  if (!found) return {};
  fi_info* hints = make_hints(found->prov_name, "", true, false);
  fi_info* info = nullptr;
  const int rc = fi_getinfo(FI_VERSION(1, 14), nullptr, nullptr, 0, hints, &info);
  fi_freeinfo(hints);
  if (rc != 0) return {};
  std::vector<std::string> out = domains_with_cq_data(info);
  fi_freeinfo(info);
  return out;
}

}  // namespace kvxfer
