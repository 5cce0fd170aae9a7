// A libfabric failure names the call, the rc, fi_strerror(-rc) and the provider.
#pragma once
#include <rdma/fabric.h>
#include <rdma/fi_errno.h>

#include "core/errors.h"

#define KVXFER_FI_CALL(kind, call, provider)                                                             \
  do {                                                                                                   \
    int kvxfer_rc_ = static_cast<int>(call);                                                             \
    KVXFER_CHECK(kvxfer_rc_ == 0, kind,                                                                  \
                 #call " failed: rc=" << kvxfer_rc_ << " (" << fi_strerror(-kvxfer_rc_) << ") on provider " \
                                      << (provider));                                                    \
  } while (0)
