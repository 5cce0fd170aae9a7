"""Per-request timings and their summaries: TTFT, TPOT, end-to-end latency, KV bytes and the KV transfer time that
was not hidden behind prefill; goodput = requests per second meeting both the TTFT and the TPOT SLO."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    kv_bytes: int = 0
    kv_exposed_s: float = 0.0  # KV transfer time not hidden behind prefill (0 when the KV was in place first)
    kv_error: str | None = None  # the prefill side's send failed: why
    kv_path: str | None = None  # how kvxfer moved it: fabric, cma, cuda_ipc or staged (Send.path)
    error: str | None = None
    token_times: list = field(default_factory=list)  # arrival of each token (client side; the demo keeps them)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or self.last_token is None:
            return None
        return (self.last_token - self.first_token) / (self.tokens - 1)

    @property
    def gaps(self) -> list[float]:
        """Time between consecutive tokens (needs token_times): where one prefill stalling decode shows."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e(self) -> float | None:
        return None if self.last_token is None else self.last_token - self.arrival


def percentile(values, p: float) -> float | None:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(timings: list[RequestTiming], duration_s: float, ttft_slo_s: float, tpot_slo_s: float) -> dict:
    ok = [t for t in timings if t.error is None and t.e2e is not None]
    out = {"requests": len(timings), "completed": len(ok), "failed": sum(t.error is not None for t in timings)}
    for name in ("ttft", "tpot", "e2e"):
        vals = [getattr(t, name) for t in ok]
        for p in (50, 90, 99):
            out[f"{name}_p{p}"] = percentile(vals, p)
    # Inter-token latency over every gap of every request: per-request TPOT averages ~100s of gaps, so a single
    # prefill-sized stall (the colocated interference) barely moves it but stands out here.
    gaps = [g for t in ok for g in t.gaps]
    for p in (50, 99):
        out[f"itl_p{p}"] = percentile(gaps, p)
    good = [t for t in ok if t.ttft <= ttft_slo_s and (t.tpot is None or t.tpot <= tpot_slo_s)]
    out["goodput"] = len(good) / duration_s if duration_s > 0 else 0.0
    out["kv_bytes"] = sum(t.kv_bytes for t in ok)
    e2e_sum = sum(t.e2e for t in ok)
    out["kv_exposed_share"] = (sum(t.kv_exposed_s for t in ok) / e2e_sum) if e2e_sum > 0 else 0.0
    return out


@dataclass
class Registry:
    """Router-side counters for /metrics (Prometheus text format)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    failed: int = 0
    tokens: int = 0
    kv_bytes: int = 0
    ttft: list = field(default_factory=list)

    def prometheus(self) -> str:
        with self.lock:
            lines = [
                "# TYPE kvxfer_requests_total counter", f"kvxfer_requests_total {self.requests}",
                "# TYPE kvxfer_requests_failed_total counter", f"kvxfer_requests_failed_total {self.failed}",
                "# TYPE kvxfer_generated_tokens_total counter", f"kvxfer_generated_tokens_total {self.tokens}",
                "# TYPE kvxfer_kv_bytes_total counter", f"kvxfer_kv_bytes_total {self.kv_bytes}",
                "# TYPE kvxfer_ttft_seconds summary",
            ]
            for q in (0.5, 0.9, 0.99):
                v = percentile(self.ttft[-10000:], q * 100)
                lines.append(f'kvxfer_ttft_seconds{{quantile="{q}"}} {v if v is not None else "NaN"}')
        return "\n".join(lines) + "\n"
