"""Which FAISS index kind serves a scope of items, and every knob of it: plain data, so the CLI can show the choices
without loading faiss (kinds.py builds, tunes and moves the indexes).

Every index scores by inner product (METRIC_INNER_PRODUCT), the model's retrieval score, and stores faiss ids that
are the item index's slot numbers (see item_index.py). `IndexSpec` knobs and defaults:

    kind             "exact"  exact (IndexFlatIP) | "ivf-flat" | "ivf-pq" | "hnsw" | "auto". auto: per scope (the
                              whole catalog and each scene), exact up to AUTO_EXACT_UP_TO = 100_000 items, else
                              AUTO_ANN_KIND = "ivf-flat". Chosen from `bench/index.py --items 1000000` (BENCHMARKS.md):
                              at recall@10 >= 0.95 IVF-Flat answered one query 199x faster than exact (nprobe 8) and
                              82x at the default nprobe 32 (recall 0.976), against HNSW's 57x (efSearch 64); it
                              builds 8x faster (34 s vs 260 s for 1M x 64 on 2 cores, which matters for catalog
                              rebuilds), removes items for real instead of tombstoning them, and uses no graph memory.
    nlist            4096     IVF lists; capped at 4*sqrt(n) and at n/39 (faiss wants >= 39 training points a list).
    nprobe           32       IVF lists scanned per query (recall/speed; `ItemIndex.set_search_knobs` changes it). On
                              the 1M synthetic catalog: 8 -> recall@10 0.952, 32 -> 0.976, 128 -> 0.993; 32 keeps
                              a margin above 0.95 for catalogs less clustered than the benchmark's.
    hnsw_m           32       HNSW links per node (graph degree: recall and memory).
    ef_search        128      HNSW candidate list at search (recall/speed; tunable in place). faiss uses >= k.
                              1M synthetic: 64 -> recall@10 0.952, 128 -> 0.968, 256 -> 0.980.
    ef_construction  100      HNSW candidate list while building (graph quality/build time).
    pq_m             16       IVF-PQ sub-quantizers = bytes per code at 8 bits; lowered to a divisor of d.
    pq_nbits         8        bits per sub-quantizer code.
    pq_refine        4        IVF-PQ fetches pq_refine*k candidates and re-ranks them with the stored float vectors,
                              so returned scores are exact inner products; 1 = no re-rank (PQ-approximate scores).
    min_ann_items    1000     a scope smaller than this is exact whatever the kind: ANN gains nothing there and IVF
                              needs points to train on. IVF-PQ scopes also need 39 * 2**pq_nbits items (codebook
                              training) and are exact below that. This is what keeps tiny scenes from failing.
    rebuild_fraction 0.25     live updates rebuild every scope once removed/replaced items (HNSW tombstones, spent
                              slots) plus, for ANN kinds, items added since the last build exceed this fraction of
                              max(items at last build, min_ann_items): tombstones cost recall and fetch size, and IVF
                              centroids / scope kinds were chosen for the catalog as it was.
    device           "cpu"    "cpu" | "auto" (GPU when faiss sees one) | "cuda" (GPU required). On a GPU, flat and
                              IVF scopes search a GPU replica (faiss.index_cpu_to_gpu) of the CPU index, refreshed
                              after updates; HNSW has no GPU version and stays on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Kind = Literal["exact", "ivf-flat", "ivf-pq", "hnsw", "auto"]
KINDS: tuple[str, ...] = ("exact", "ivf-flat", "ivf-pq", "hnsw", "auto")
DEVICES: tuple[str, ...] = ("cpu", "auto", "cuda")
AUTO_EXACT_UP_TO = 100_000
AUTO_ANN_KIND = "ivf-flat"  # from `python bench/index.py --items 1000000`; reasons in the module docstring
GPU_MAX_K = 2048        # faiss GPU k-selection limit; larger fetches search the CPU index
WIDEN = 8               # a retry after too few results multiplies nprobe / efSearch by this


@dataclass(frozen=True)
class IndexSpec:
    kind: Kind = "exact"
    nlist: int = 4096
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 100
    pq_m: int = 16
    pq_nbits: int = 8
    pq_refine: int = 4
    min_ann_items: int = 1000
    rebuild_fraction: float = 0.25
    device: str = "cpu"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; choose one of {list(KINDS)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {list(DEVICES)}")
        for name in ("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction", "pq_m", "pq_nbits", "pq_refine"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rebuild_fraction <= 0:
            raise ValueError(f"rebuild_fraction must be > 0, got {self.rebuild_fraction}")


def scope_kind(spec: IndexSpec, n: int) -> str:
    """The concrete kind a scope of n items gets: auto decided by size, exact when too small to be worth ANN."""
    kind = spec.kind
    if kind == "auto":
        kind = "exact" if n <= AUTO_EXACT_UP_TO else AUTO_ANN_KIND
    if kind != "exact" and n < spec.min_ann_items:
        return "exact"
    if kind == "ivf-pq" and n < 39 * 2 ** spec.pq_nbits:
        return "exact"
    return kind


def nlist_for(spec: IndexSpec, n: int) -> int:
    return max(1, min(spec.nlist, int(4 * math.sqrt(n)), n // 39))


def pq_m_for(spec: IndexSpec, d: int) -> int:
    return max(m for m in range(1, min(spec.pq_m, d) + 1) if d % m == 0)
