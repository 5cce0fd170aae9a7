"""Which prefill rank sends which KV heads to which decode rank, when prefill and decode run with different tensor
parallelism: the table every connector otherwise writes by hand (vLLM's NIXL `tp_mapping`, SGLang's
`send_kvcache_slice` and dummy ranks).

Each decode rank gets each of its heads from exactly one prefill rank: with P-TP < D-TP a prefill rank feeds the
decode ranks that hold slices of its heads; with P-TP > D-TP a decode rank receives from every prefill rank that
holds part of its heads. Where the prefill side replicates heads (more ranks than KV heads) and for MLA latents
(every rank holds the whole latent), one of the ranks holding the bytes is chosen per decode rank, spread over them,
so nothing moves twice. The transport moves the heads two rank pools have in common (`KVLayout.for_tp_rank`), which
for every pair listed here is exactly the pair's `heads`.

    pairs = kvxfer.tp.rank_pairs(total_kv_heads=8, prefill_tp=2, decode_tp=4)
    mine = [p for p in pairs if p.prefill_rank == my_rank]   # a prefill rank: one send per pair (kvxfer.SendGroup)
    mine = [p for p in pairs if p.decode_rank == my_rank]    # a decode rank: one recv per pair
"""
from __future__ import annotations

from dataclasses import dataclass

from kvxfer.errors import InvalidArgument
from kvxfer.layout import KVLayout


@dataclass(frozen=True)
class RankPair:
    prefill_rank: int
    decode_rank: int
    heads: tuple[int, int]  # [first, end) of the model's KV heads this pair moves; (0, 0) for an MLA latent


def rank_pairs(total_kv_heads: int, prefill_tp: int, decode_tp: int) -> list[RankPair]:
    """Every (prefill rank, decode rank, heads) that moves KV, ordered by decode rank then head. total_kv_heads=0
    means an MLA latent cache (no heads: every rank holds all of it)."""
    if prefill_tp < 1 or decode_tp < 1:
        raise InvalidArgument(f"prefill_tp={prefill_tp} and decode_tp={decode_tp} must be >= 1")
    if total_kv_heads == 0:
        return [RankPair(d % prefill_tp, d, (0, 0)) for d in range(decode_tp)]
    held = [KVLayout.tp_heads(total_kv_heads, prefill_tp, p) for p in range(prefill_tp)]
    pairs: list[RankPair] = []
    for d in range(decode_tp):
        first, n = KVLayout.tp_heads(total_kv_heads, decode_tp, d)
        for h in range(first, first + n):
            holders = [p for p, (b, k) in enumerate(held) if b <= h < b + k]
            p = holders[d % len(holders)]  # replicated heads: spread the decode ranks over the replicas
            last = pairs[-1] if pairs else None
            if last and last.decode_rank == d and last.prefill_rank == p and last.heads[1] == h:
                pairs[-1] = RankPair(p, d, (last.heads[0], h + 1))
            else:
                pairs.append(RankPair(p, d, (h, h + 1)))
    return pairs
