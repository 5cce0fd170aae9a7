"""Every KVXFER_* environment variable, in one place. An explicit argument always wins over these."""
import os

ENV_VARS = {
    "KVXFER_TRANSPORT": ("str", "auto", "default Agent transport: auto|shm|cma|tcp|fi_shm|efa|verbs"),
    "KVXFER_PROVIDER": ("str", "", "libfabric provider override for transport=auto (efa|verbs|tcp|shm)"),
    "KVXFER_IFACE": ("str", "", "network interface for IP providers, e.g. 'lo' (empty: any)"),
    "KVXFER_TIMEOUT_S": ("float", "60", "default transfer deadline in seconds"),
}


def get(name: str):
    kind, default, _ = ENV_VARS[name]
    raw = os.environ.get(name, default)
    return float(raw) if kind == "float" else raw
