"""Ranking metrics, shared by training validation, `evaluate`, replay and the benchmarks.

A rank is 0-based: the number of candidates scored strictly above the target (ties count in the target's favour).
An unrankable target (not in the catalog) has rank = +inf and counts as a miss.
"""
from __future__ import annotations

import numpy as np


def recall_at(ranks: np.ndarray, k: int) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(ranks < k)) if ranks.size else 0.0


def ndcg_at(ranks: np.ndarray, k: int) -> float:
    """One relevant item per query, so IDCG = 1 and NDCG = 1 / log2(rank + 2) inside the top k."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return 0.0
    gains = np.where(ranks < k, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)
    return float(np.mean(gains))


def ranking_report(ranks: np.ndarray, ks=(10, 20)) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at(ranks, k)
    return out
