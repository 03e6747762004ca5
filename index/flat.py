"""Exact inner-product item search with FAISS: one IndexFlatIP per scene plus one over all items.

Scores are <user vector, item vector>, the model's retrieval score, so exact search returns exactly what the model
ranks highest. Seen items are left out by over-fetching and filtering, which stays exact and still returns k items
whenever k exist in scope.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import faiss
import numpy as np

GLOBAL = None  # scene=None searches all items


class ItemIndex:
    def __init__(self, item_ids: list[str], item_scenes: list[str], vectors: np.ndarray):
        self.item_ids = list(item_ids)
        self.item_scenes = list(item_scenes)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.dim = self.vectors.shape[1]
        self.scenes = tuple(dict.fromkeys(self.item_scenes))
        self._ids: dict[Optional[str], np.ndarray] = {}
        self._index: dict[Optional[str], faiss.Index] = {}
        rows_by_scope = {GLOBAL: np.arange(len(self.item_ids))}
        scenes_arr = np.array(self.item_scenes, dtype=object)
        for s in self.scenes:
            rows_by_scope[s] = np.flatnonzero(scenes_arr == s)
        for scope, rows in rows_by_scope.items():
            idx = faiss.IndexFlatIP(self.dim)
            if len(rows):
                idx.add(self.vectors[rows])
            self._index[scope] = idx
            self._ids[scope] = np.array([self.item_ids[r] for r in rows], dtype=object)
        self._scope_of = {i: s for i, s in zip(self.item_ids, self.item_scenes)}

    @classmethod
    def build(cls, item_ids: Sequence[str], item_scenes: Sequence[str], vectors: np.ndarray) -> "ItemIndex":
        if len(item_ids) != len(item_scenes) or len(item_ids) != len(vectors):
            raise ValueError("item_ids, item_scenes and vectors must have the same length")
        return cls(list(item_ids), list(item_scenes), vectors)

    def __len__(self) -> int:
        return len(self.item_ids)

    def _scope(self, scene: Optional[str]) -> Optional[str]:
        if scene is not GLOBAL and scene not in self._index:
            raise ValueError(f"unknown scene {scene!r}; the index holds {list(self.scenes)}")
        return scene

    def search(self, queries: np.ndarray, scene: Optional[str] = None, k: int = 10,
               exclude: Optional[Sequence[Iterable[str]]] = None) -> list[list[tuple[str, float]]]:
        """Top-k (item_id, score) per query, best first; items in that query's `exclude` are left out."""
        if k < 1:
            raise ValueError("k must be >= 1")
        scope = self._scope(scene)
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query dimension {q.shape[1]} != index dimension {self.dim}")
        index, ids = self._index[scope], self._ids[scope]
        excluded = [set(x) for x in exclude] if exclude is not None else [set()] * len(q)
        if len(excluded) != len(q):
            raise ValueError("exclude must have one entry per query")
        in_scope = [sum(1 for i in x if scope is GLOBAL or self._scope_of.get(i) == scope) if x else 0
                    for x in excluded]
        fetch = min(index.ntotal, k + max(in_scope, default=0))
        if fetch == 0:
            return [[] for _ in range(len(q))]
        scores, rows = index.search(q, fetch)
        out = []
        for n in range(len(q)):
            res = []
            for r, sc in zip(rows[n], scores[n]):
                if r < 0:
                    break
                item = ids[r]
                if item in excluded[n]:
                    continue
                res.append((item, float(sc)))
                if len(res) == k:
                    break
            out.append(res)
        return out

    def scores(self, queries: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """Inner products of each query with the given items: [n_queries, n_items]."""
        pos = {i: n for n, i in enumerate(self.item_ids)}
        return np.atleast_2d(queries).astype(np.float32) @ self.vectors[[pos[i] for i in item_ids]].T
