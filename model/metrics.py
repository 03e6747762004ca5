"""Full ranking and its metrics, shared by training validation, `evaluate`, replay and the benchmarks.

A rank is 0-based: the number of candidates scored strictly above the target (ties count in the target's favour).
An unrankable target (not in the catalog) has rank = +inf and counts as a miss.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def rank_targets(vectors: np.ndarray, items: np.ndarray, targets: Sequence[Optional[int]],
                 masked: Sequence[Sequence[int]], allowed: Optional[Sequence[np.ndarray]] = None,
                 chunk: int = 1024) -> np.ndarray:
    """0-based rank of item targets[n] among all `items` [m, d] for query vectors[n], scored by inner product in
    float64 (ranks do not hinge on BLAS summation order). masked[n]: item positions left out (the user's other
    history; the target itself is never masked). allowed[n]: optional bool [m] of the candidates (e.g. one
    scene's items). A target of None (not in the catalog) ranks +inf."""
    E = np.asarray(items, dtype=np.float64)
    ranks = np.full(len(targets), np.inf)
    for lo in range(0, len(targets), chunk):
        scores = np.asarray(vectors[lo:lo + chunk], dtype=np.float64) @ E.T        # [n, m]
        for n in range(scores.shape[0]):
            t = targets[lo + n]
            if t is None:
                continue
            row = scores[n]
            hide = [r for r in masked[lo + n] if r != t]
            if hide:
                row[hide] = -np.inf
            if allowed is not None:
                row[~allowed[lo + n]] = -np.inf
            ranks[lo + n] = float((row > row[t]).sum())
    return ranks


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
