"""Exact inner-product item search with FAISS: one IndexFlatIP per scene plus one over all items.

Scores are <user vector, item vector>, the model's retrieval score, so exact search returns exactly what the model
ranks highest. A per-scene index (rather than filtering the global one) keeps scene search exact and cheap when a
scene is a small part of the catalog. Seen items are left out by over-fetching k + (excluded ids in scope) and
filtering: at most that many fetched rows can be excluded, so this stays exact and still returns k items whenever
k exist in scope.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import faiss
import numpy as np

GLOBAL = None  # scene=None searches all items


class ItemIndex:
    """Exact inner-product search over item vectors, per scene and over all items."""

    def __init__(self, item_ids: list[str], item_scenes: list[str], vectors: np.ndarray):
        # Use ItemIndex.build, which validates its inputs.
        self.item_ids = item_ids
        self.item_scenes = item_scenes
        self.vectors = vectors
        self.dim = int(vectors.shape[1])
        self.scenes: tuple[str, ...] = tuple(dict.fromkeys(item_scenes))
        # item_id -> (scene, row in `vectors` / the global index)
        self._where: dict[str, tuple[str, int]] = {i: (s, r) for r, (i, s) in enumerate(zip(item_ids, item_scenes))}
        rows_by_scope: dict[Optional[str], list[int]] = {GLOBAL: list(range(len(item_ids)))}
        for r, s in enumerate(item_scenes):
            rows_by_scope.setdefault(s, []).append(r)
        self._index: dict[Optional[str], faiss.IndexFlatIP] = {}
        self._ids: dict[Optional[str], np.ndarray] = {}  # scope -> faiss row -> item_id
        for scope, rows in rows_by_scope.items():
            idx = faiss.IndexFlatIP(self.dim)
            if rows:
                idx.add(np.ascontiguousarray(vectors[rows]))
            self._index[scope] = idx
            self._ids[scope] = np.array([item_ids[r] for r in rows], dtype=object)

    @classmethod
    def build(cls, item_ids: Sequence[str], item_scenes: Sequence[str], vectors: np.ndarray) -> "ItemIndex":
        """Index `vectors` [n_items, d]; row i belongs to item_ids[i] in scene item_scenes[i]."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # faiss needs contiguous float32
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D [n_items, d], got shape {vectors.shape}")
        if not (len(item_ids) == len(item_scenes) == len(vectors)):
            raise ValueError(f"item_ids ({len(item_ids)}), item_scenes ({len(item_scenes)}) and vectors "
                             f"({len(vectors)}) must have the same length")
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("item_ids must be unique")  # exclusion and scores() look items up by id
        return cls(list(item_ids), list(item_scenes), vectors)

    def __len__(self) -> int:
        return len(self.item_ids)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}] or [{self.dim}], got shape {np.shape(queries)}")
        if not np.isfinite(q).all():
            # NaN scores make faiss drop rows (label -1), which would break the "k results" guarantee.
            raise ValueError("queries must be finite")
        return np.ascontiguousarray(q)

    def search(self, queries: np.ndarray, scene: Optional[str] = None, k: int = 10,
               exclude: Optional[Sequence[Iterable[str]]] = None) -> list[list[tuple[str, float]]]:
        """Top-k (item_id, score) per query, best first, from `scene` (None: all items).

        exclude[n] holds item ids to leave out for query n (e.g. already seen); ids outside the scope are ignored.
        Each query gets min(k, non-excluded items in scope) results. One faiss call per search(), fetching the
        most any query needs; ties keep faiss's (deterministic) order.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if scene is not GLOBAL and scene not in self._index:
            raise ValueError(f"unknown scene {scene!r}; the index holds scenes {list(self.scenes)}")
        q = self._queries(queries)
        if exclude is None or len(exclude) == 0:
            excluded = [frozenset()] * len(q)
        else:
            if len(exclude) != len(q):
                raise ValueError(f"exclude must have one entry per query ({len(q)}), got {len(exclude)}")
            if any(isinstance(x, str) for x in exclude):
                raise TypeError("each exclude entry must be an iterable of item ids, not a single string")
            excluded = [set(x) for x in exclude]
        in_scope = [sum(1 for i in x if i in self._where and (scene is GLOBAL or self._where[i][0] == scene))
                    for x in excluded]
        index, ids = self._index[scene], self._ids[scene]
        fetch = min(index.ntotal, k + max(in_scope, default=0))
        if fetch == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        scores, rows = index.search(q, fetch)
        out = []
        for n in range(len(q)):
            res = []
            for r, s in zip(rows[n], scores[n]):
                if r < 0:  # faiss pads with -1 when fewer than `fetch` rows exist
                    continue
                item = ids[r]
                if item not in excluded[n]:
                    res.append((item, float(s)))
                    if len(res) == k:
                        break
            out.append(res)
        return out

    def scores(self, queries: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """Inner products [n_queries, len(item_ids)] of each query with the given items (tests, evaluation)."""
        missing = [i for i in item_ids if i not in self._where]
        if missing:
            raise ValueError(f"unknown item ids: {missing[:5]}")
        rows = [self._where[i][1] for i in item_ids]
        return self._queries(queries) @ self.vectors[rows].T
