"""Inner-product item search with FAISS over all items and per scene, with live catalog updates.

Scores are <user vector, item vector>, the model's retrieval score. Each scope (the whole catalog, and each scene)
has its own faiss index of the kind its IndexSpec and size give it (spec.py). Per-scene indexes rather than one
index searched with an ID filter (faiss IDSelector): a scene can be 1% of the catalog, and filtered HNSW/IVF
search then walks mostly other scenes' items, losing recall and speed; GPU indexes take no selector; and a small
scene simply becomes an exact index. The cost is that each vector is stored twice (once when there is one scene:
that scene's scope is the global one).

Exactly min(k, eligible items in scope) results, for every kind: seen items are left out by fetching
k + (excluded ids in scope) and filtering, which is exact for the exact kind. An ANN index may still come back
short (IVF lists too few with a small nprobe, HNSW -1s or tombstones): the short queries are retried with
WIDEN x the fetch and nprobe/efSearch, then answered by an exact scan of the scope's stored vectors.

Items live in slots (`_Slots`): faiss ids are slot numbers, arrays hold each slot's item, scene and vector, and
`alive` says which slots are current. An upsert writes new slots; the old slot of a replaced or removed item is
removed from flat and IVF indexes (remove_ids) and left as a tombstone in HNSW (which cannot remove), filtered at
search time. Past spec.rebuild_fraction of spent slots every scope is rebuilt from the live catalog, off the
search lock, and swapped in. Slots are never rewritten, so published arrays never change under a reader.

Saving and loading: persist.py. Concurrency: `_lock` is held by each search and by each update batch's changes (faiss releases the GIL while
searching), so a search sees the index before or after a batch, never during; `_write` serializes update batches
(and a rebuild, which searches do not wait for). `item_ids`, `item_scenes`, `vectors`, `scenes` are a snapshot of
the live catalog rebuilt lazily after updates: rows in slot order, so a replaced item moves to the end.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

import faiss
import numpy as np

from .kinds import apply_search_knobs, gpu_replica, new_index, use_gpu, wider
from .spec import GPU_MAX_K, WIDEN, IndexSpec, scope_kind

GLOBAL = None  # scene=None searches all items
_F32 = np.dtype(np.float32)
_finite = math.isfinite


def scene_codes(scenes: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """The scenes in order of first appearance, and each one's number (the slots' scene column)."""
    names = list(dict.fromkeys(scenes))
    return names, {s: c for c, s in enumerate(names)}


@dataclass
class _Scope:
    kind: str                           # the concrete kind built (spec.scope_kind)
    index: faiss.Index                  # CPU index, faiss ids = slots; updates and saves go here
    live: int                           # current items in the scope
    dead: int = 0                       # tombstoned ids still inside `index` (HNSW)
    gpu: Optional[faiss.Index] = None   # search replica on a GPU; None: not made yet or stale


def _validated(item_ids: Sequence[str], item_scenes: Sequence[str], vectors: np.ndarray, dim: Optional[int] = None):
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # faiss needs contiguous float32
    if vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim):
        raise ValueError(f"vectors must be 2-D [n_items, {dim or 'd'}], got shape {vectors.shape}")
    if not (len(item_ids) == len(item_scenes) == len(vectors)):
        raise ValueError(f"item_ids ({len(item_ids)}), item_scenes ({len(item_scenes)}) and vectors "
                         f"({len(vectors)}) must have the same length")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("item_ids must be unique")  # exclusion and scores() look items up by id
    if not np.isfinite(vectors).all():
        raise ValueError("vectors must be finite")  # NaN scores make faiss drop rows
    return list(item_ids), list(item_scenes), vectors


@dataclass
class _Slots:
    """The catalog as one build (or load) holds it; a rebuild swaps in a whole new one under the lock."""
    item: np.ndarray                    # object [capacity]: item id of each slot
    scene: np.ndarray                   # int32 [capacity]: scene code of each slot
    vec: np.ndarray                     # float32 [capacity, d]: vector of each slot (never rewritten)
    alive: np.ndarray                   # bool [capacity]: the slot holds a current item
    n: int                              # slots in use
    scene_names: list[str]              # scene code -> name
    scene_code: dict[str, int]
    where: dict[str, int]               # item id -> its current slot
    scopes: dict                        # None (all items) or scene -> _Scope
    built_size: int                     # items at the last build, for the rebuild rule
    stale: int                          # removed / replaced / (ANN) added slots since that build
    cat: Optional[tuple]                # snapshot (item_ids, item_scenes, vectors, scenes); None: rebuild lazily
    means: dict                         # cold-start vector cache per scope


class ItemIndex:
    """Top-k inner-product search over item vectors, per scene and over all items, under live updates."""

    def __init__(self, dim: int, spec: Optional[IndexSpec] = None):
        # An empty index; ItemIndex.build / ItemIndex.load fill one.
        self.dim = int(dim)
        self.spec = spec = spec or IndexSpec()
        self.rebuilds = 0
        self._gpu = use_gpu(spec.device)
        self._lock = threading.Lock()
        self._write = threading.Lock()
        self._s = self._fresh([], [], np.zeros((0, self.dim), np.float32))

    @classmethod
    def build(cls, item_ids: Sequence[str], item_scenes: Sequence[str], vectors: np.ndarray,
              spec: Optional[IndexSpec] = None) -> "ItemIndex":
        """Index `vectors` [n_items, d]; row i belongs to item_ids[i] in scene item_scenes[i]. Exact by default."""
        ids, scenes, vectors = _validated(item_ids, item_scenes, vectors)
        idx = cls(vectors.shape[1], spec)
        idx._s = idx._fresh(ids, scenes, vectors)
        return idx

    # ---- state ----------------------------------------------------------------------------------------------

    def _fresh(self, ids: list[str], scenes: list[str], vectors: np.ndarray) -> "_Slots":
        """All index state for a catalog, slots 0..n-1 in catalog order (build, rebuild)."""
        n = len(ids)
        names, code = scene_codes(scenes)
        codes = np.fromiter((code[s] for s in scenes), np.int32, n)
        slot_item = np.empty(n, dtype=object)
        slot_item[:] = ids
        scopes = {GLOBAL: self._new_scope(vectors, np.arange(n, dtype=np.int64))}
        for c, s in enumerate(names):
            rows = np.flatnonzero(codes == c)
            scopes[s] = scopes[GLOBAL] if len(names) == 1 else self._new_scope(vectors[rows], rows)
        return _Slots(item=slot_item, scene=codes, vec=vectors, alive=np.ones(n, bool), n=n, scene_names=names,
                      scene_code=code, where=dict(zip(ids, range(n))), scopes=scopes, built_size=n, stale=0,
                      cat=(ids, scenes, vectors, tuple(names)), means={})

    def _new_scope(self, vectors: np.ndarray, slots: np.ndarray) -> _Scope:
        kind = scope_kind(self.spec, len(vectors))
        index = new_index(self.spec, kind, vectors)
        if len(vectors):
            index.add_with_ids(vectors, slots.astype(np.int64))
        return _Scope(kind, index, len(vectors))

    def _aliased(self, scene: Optional[str]) -> bool:
        """A scene whose scope is the global one (the catalog had a single scene at build)."""
        return scene is not GLOBAL and self._s.scopes[scene] is self._s.scopes[GLOBAL]

    def _catalog(self) -> tuple[list[str], list[str], np.ndarray, tuple[str, ...]]:
        """(item_ids, item_scenes, vectors, scenes) of the live catalog; call under _lock."""
        if self._s.cat is None:
            live = np.flatnonzero(self._s.alive[:self._s.n])
            ids = self._s.item[live].tolist()
            scenes = [self._s.scene_names[c] for c in self._s.scene[live].tolist()]
            vecs = self._s.vec[:self._s.n] if len(live) == self._s.n else self._s.vec[live]
            self._s.cat = (ids, scenes, vecs, tuple(dict.fromkeys(scenes)))
        return self._s.cat

    def _scope_mask(self, scene: Optional[str]) -> np.ndarray:
        """Which slots hold the scope's current items: bool [n_slots]."""
        live = self._s.alive[:self._s.n]
        if scene is not GLOBAL:
            live = live & (self._s.scene[:self._s.n] == self._s.scene_code[scene])
        return live

    def _changed(self) -> None:
        """The catalog changed: drop what is derived from it."""
        self._s.cat, self._s.means = None, {}

    @property
    def item_ids(self) -> list[str]:
        with self._lock:
            return self._catalog()[0]

    @property
    def item_scenes(self) -> list[str]:
        with self._lock:
            return self._catalog()[1]

    @property
    def vectors(self) -> np.ndarray:
        with self._lock:
            return self._catalog()[2]

    @property
    def scenes(self) -> tuple[str, ...]:
        """Scenes with at least one item, in order of first appearance in item_scenes."""
        with self._lock:
            return self._catalog()[3]

    @property
    def kinds(self) -> dict[Optional[str], str]:
        """scope (None = all items) -> the faiss kind serving it."""
        with self._lock:
            return {s: scope.kind for s, scope in self._s.scopes.items()}

    def faiss_index(self, scene: Optional[str] = GLOBAL) -> faiss.Index:
        """The CPU faiss index of a scope (ids are internal slots), for benchmarks and inspection; do not modify."""
        return self._s.scopes[scene].index

    def __len__(self) -> int:
        return len(self._s.where)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._s.where

    contains = __contains__

    def scene_of(self, item_id: str) -> Optional[str]:
        """The item's current scene; None when it is not in the catalog (e.g. removed meanwhile)."""
        with self._lock:
            slot = self._s.where.get(item_id)
            return None if slot is None else self._s.scene_names[self._s.scene[slot]]

    # ---- search ---------------------------------------------------------------------------------------------

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = queries
        if not (type(q) is np.ndarray and q.dtype == np.float32 and q.ndim == 2 and q.flags.c_contiguous):
            q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))  # faiss's input
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [n, {self.dim}] or [{self.dim}], got shape {np.shape(queries)}")
        if not np.isfinite(q).all():
            # NaN scores make faiss drop rows (label -1), which would break the "k results" guarantee.
            raise ValueError("queries must be finite")
        return q

    def search(self, queries: np.ndarray, scene: Optional[str] = None, k: int = 10,
               exclude: Optional[Sequence[Iterable[str]]] = None) -> list[list[tuple[str, float]]]:
        """Top-k (item_id, score) per query, best first, from `scene` (None: all items).

        exclude[n] holds item ids to leave out for query n (e.g. already seen); ids outside the scope are ignored.
        Each query gets min(k, non-excluded items in scope) results, whatever the index kind.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = queries
        if not exclude and type(q) is np.ndarray and q.dtype is _F32 and q.ndim == 2 and q.shape[1] == self.dim \
                and q.flags.c_contiguous and len(q):
            # Hot path (bench/index.py holds it to <= 1.2x a bare faiss search): nothing to exclude, a query
            # array faiss takes as it is. Finiteness is checked on the results instead of the queries: a
            # non-finite query makes every score it touches inf/NaN (faiss drops NaN, padding with -1), so a
            # row whose best score is finite and whose last label is real came from a finite query.
            with self._lock:
                scope = self._s.scopes.get(scene)
                if scope is not None and scope.dead == 0 and scope.live and scope.kind != "ivf-pq" and not self._gpu:
                    scores, labels = scope.index.search(q, k if k < scope.live else scope.live)
                    rows = scores.tolist()
                    if -1 not in labels[:, -1].tolist() and all(map(_finite, [r[0] for r in rows])):
                        return [list(zip(i, r)) for i, r in zip(self._s.item[labels].tolist(), rows)]
        q = self._queries(queries)
        excluded = None
        if exclude is not None and len(exclude) > 0:
            if len(exclude) != len(q):
                raise ValueError(f"exclude must have one entry per query ({len(q)}), got {len(exclude)}")
            if any(isinstance(x, str) for x in exclude):
                raise TypeError("each exclude entry must be an iterable of item ids, not a single string")
            excluded = [set(x) for x in exclude]
        with self._lock:
            scope = self._s.scopes.get(scene)
            if scope is None:
                raise ValueError(f"unknown scene {scene!r}; the index holds scenes {list(self._catalog()[3])}")
            in_scope = [0] * len(q) if excluded is None else [self._n_in_scope(x, scene) for x in excluded]
            return self._search(scope, scene, q, k, excluded, in_scope)

    def _search(self, scope: _Scope, scene, q, k, excluded, in_scope) -> list[list[tuple[str, float]]]:
        fetch = min(scope.index.ntotal, k + max(in_scope, default=0))
        if fetch == 0 or len(q) == 0:
            return [[] for _ in range(len(q))]
        scores, labels = self._faiss_search(scope, q, fetch)
        ex = excluded or [()] * len(q)
        out = [self._take(labels[n], scores[n], k, ex[n]) for n in range(len(q))]
        short = [n for n in range(len(q)) if len(out[n]) < min(k, scope.live - in_scope[n])]
        if short:
            params = wider(scope.index, scope.kind)
            fetch = min(scope.index.ntotal, fetch * WIDEN)
            scores, labels = self._faiss_search(scope, q[short], fetch, params)
            for j, n in enumerate(short):
                out[n] = self._take(labels[j], scores[j], k, ex[n])
            short = [n for n in short if len(out[n]) < min(k, scope.live - in_scope[n])]
        if short:  # exact scan; scores every slot rather than copying the scope's vectors out (1M items)
            all_scores = q[short] @ self._s.vec[:self._s.n].T
            all_scores[:, ~self._scope_mask(scene)] = -np.inf
            for j, n in enumerate(short):
                m = min(scope.live, k + in_scope[n])  # the best m items in scope hold every result
                top = np.argpartition(-all_scores[j], m - 1)[:m]
                top = top[np.argsort(-all_scores[j][top], kind="stable")]
                out[n] = self._take(top, all_scores[j][top], k, ex[n])
        return out

    def _faiss_search(self, scope: _Scope, q: np.ndarray, fetch: int, params=None):
        refine = self.spec.pq_refine if scope.kind == "ivf-pq" else 1
        n = fetch if refine == 1 else min(scope.index.ntotal, fetch * refine)
        index = scope.index
        if self._gpu and scope.kind != "hnsw" and n <= GPU_MAX_K and params is None:
            if scope.gpu is None:
                scope.gpu = gpu_replica(scope.index, scope.kind)
            index = scope.gpu
        if refine == 1:
            return index.search(q, fetch, params=params) if params else index.search(q, fetch)
        # IVF-PQ: re-rank pq_refine x the candidates by their stored vectors, so scores are exact
        _, labels = index.search(q, n, params=params)
        valid = labels >= 0
        scores = np.einsum("nfd,nd->nf", self._s.vec[np.where(valid, labels, 0)], q)
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :fetch]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1)

    def _take(self, labels: np.ndarray, scores: np.ndarray, k: int, ex) -> list[tuple[str, float]]:
        """The first k live, non-excluded items of one ranked row."""
        res, alive, item_of = [], self._s.alive, self._s.item
        for slot, s in zip(labels.tolist(), scores.tolist()):
            if slot < 0 or not alive[slot]:  # faiss pads with -1; HNSW keeps tombstones
                continue
            item = item_of[slot]
            if item not in ex:
                res.append((item, s))
                if len(res) == k:
                    break
        return res

    def _n_in_scope(self, ids: set[str], scene: Optional[str]) -> int:
        where = self._s.where
        if scene is GLOBAL:
            return sum(1 for i in ids if i in where)
        code, sc = self._s.scene_code[scene], self._s.scene
        return sum(1 for i in ids if (s := where.get(i)) is not None and sc[s] == code)

    def scores(self, queries: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """Inner products [n_queries, len(item_ids)] of each query with the given items (tests, evaluation)."""
        q = self._queries(queries)
        with self._lock:
            missing = [i for i in item_ids if i not in self._s.where]
            if missing:
                raise ValueError(f"unknown item ids: {missing[:5]}")
            return q @ self._s.vec[[self._s.where[i] for i in item_ids]].T

    def cold_start_vector(self, scene: Optional[str] = None) -> np.ndarray:
        """The vector for a new item the catalog gives none: the mean of its scene's current item vectors, or of
        all items when the scene is new or empty (zeros for an empty catalog). It scores like a typical item of
        the scene until the model is retrained."""
        with self._lock:
            scope = scene if scene in self._s.scopes else GLOBAL
            if scope not in self._s.means:  # cached until the next update: a batch asks once per new item
                mask = self._scope_mask(scope)
                n = max(int(mask.sum()), 1)  # an empty catalog: zeros
                self._s.means[scope] = (mask.astype(np.float32) @ self._s.vec[:self._s.n]) / n
            return self._s.means[scope].copy()

    # ---- live updates ---------------------------------------------------------------------------------------

    def upsert(self, item_ids: Sequence[str], scenes: Sequence[str], vectors: np.ndarray) -> None:
        """Add items, or replace the vector and/or scene of existing ones; one batch, atomic for searches."""
        ids, scenes, vectors = _validated(item_ids, scenes, vectors, self.dim)
        with self._write:
            with self._lock:
                self._remove(ids)
                self._add(ids, scenes, vectors)
            self._maybe_rebuild()

    def remove(self, item_ids: Iterable[str]) -> int:
        """Remove items (unknown ids are ignored); returns how many were removed. Atomic for searches."""
        with self._write:
            with self._lock:
                n = self._remove(list(dict.fromkeys(item_ids)))
            self._maybe_rebuild()
        return n

    def _remove(self, ids: list[str]) -> int:
        slots = np.array([self._s.where.pop(i) for i in ids if i in self._s.where], dtype=np.int64)
        if len(slots) == 0:
            return 0
        self._s.alive[slots] = False
        self._changed()
        self._s.stale += len(slots)
        codes = self._s.scene[slots]
        for c in np.unique(codes).tolist():
            scene, sub = self._s.scene_names[c], slots[codes == c]
            scope = self._s.scopes[scene]
            if not self._aliased(scene):  # an aliased scene is dropped with the global scope below
                self._drop(scope, sub)
            if scope.live == (len(sub) if self._aliased(scene) else 0):
                del self._s.scopes[scene]  # emptied: the scene is gone, as from a fresh build
        self._drop(self._s.scopes[GLOBAL], slots)
        return len(slots)

    def _drop(self, scope: _Scope, slots: np.ndarray) -> None:
        if scope.kind == "hnsw":
            scope.dead += len(slots)  # faiss HNSW cannot remove: a tombstone until the next rebuild
        else:
            scope.index.remove_ids(slots)
        scope.live -= len(slots)
        scope.gpu = None

    def _add(self, ids: list[str], scenes: list[str], vectors: np.ndarray) -> None:
        n, base = len(ids), self._s.n
        if n == 0:
            return
        batch_scenes = list(dict.fromkeys(scenes))
        for s in [s for s in self._s.scopes if s is not GLOBAL and self._aliased(s)]:
            if batch_scenes != [s]:  # another scene arrives: the single scene needs its own index now
                g = self._s.scopes[GLOBAL]
                self._s.scopes[s] = _Scope(g.kind, faiss.clone_index(g.index), g.live, g.dead)
        for s in batch_scenes:
            if s not in self._s.scene_code:
                self._s.scene_code[s] = len(self._s.scene_names)
                self._s.scene_names.append(s)
        self._grow(base + n)
        slots = np.arange(base, base + n, dtype=np.int64)
        codes = np.fromiter((self._s.scene_code[s] for s in scenes), np.int32, n)
        self._s.item[base:base + n] = ids
        self._s.scene[base:base + n] = codes
        self._s.vec[base:base + n] = vectors
        self._s.alive[base:base + n] = True
        self._s.n += n
        self._s.where.update(zip(ids, range(base, base + n)))
        self._changed()
        if self.spec.kind != "exact":
            self._s.stale += n  # scope kinds and IVF centroids were chosen for the catalog as built
        self._extend(self._s.scopes[GLOBAL], vectors, slots)
        for s in batch_scenes:
            rows = np.flatnonzero(codes == self._s.scene_code[s])
            if s not in self._s.scopes:
                self._s.scopes[s] = self._new_scope(vectors[rows], slots[rows])
            elif not self._aliased(s):
                self._extend(self._s.scopes[s], vectors[rows], slots[rows])

    def _extend(self, scope: _Scope, vectors: np.ndarray, slots: np.ndarray) -> None:
        scope.index.add_with_ids(np.ascontiguousarray(vectors), slots)
        scope.live += len(slots)
        scope.gpu = None

    def _grow(self, need: int) -> None:
        """Room for `need` slots; grows by doubling into new arrays, so published ones are never written."""
        cap = len(self._s.alive)
        if need <= cap:
            return
        cap = max(need, 2 * cap, 16)
        n = self._s.n
        for name, shape, dtype in (("item", (cap,), object), ("scene", (cap,), np.int32),
                                   ("vec", (cap, self.dim), np.float32), ("alive", (cap,), bool)):
            new = np.zeros(shape, dtype)
            new[:n] = getattr(self._s, name)[:n]
            setattr(self._s, name, new)

    def _maybe_rebuild(self) -> None:
        """Rebuild every scope from the live catalog once enough of the index is stale; call under _write."""
        if self._s.stale <= self.spec.rebuild_fraction * max(self._s.built_size, self.spec.min_ann_items):
            return
        with self._lock:
            ids, scenes, vectors, _ = self._catalog()
        state = self._fresh(ids, scenes, np.ascontiguousarray(vectors))  # searches go on meanwhile
        with self._lock:
            self._s = state
            self.rebuilds += 1

    def set_search_knobs(self, nprobe: Optional[int] = None, ef_search: Optional[int] = None) -> None:
        """Change search-time knobs on the built index (no rebuild): IVF nprobe, HNSW efSearch."""
        with self._write, self._lock:
            self.spec = replace(self.spec, nprobe=nprobe or self.spec.nprobe,
                                ef_search=ef_search or self.spec.ef_search)
            for scope in {id(s): s for s in self._s.scopes.values()}.values():
                apply_search_knobs(scope.index, scope.kind, self.spec)
                scope.gpu = None
