"""How each index kind of spec.py is built, tuned, searched wider and put on a GPU (the faiss side of IndexSpec)."""
from __future__ import annotations

from typing import Optional

import faiss
import numpy as np

from .spec import WIDEN, IndexSpec, nlist_for, pq_m_for


def new_index(spec: IndexSpec, kind: str, vectors: np.ndarray) -> faiss.Index:
    """An empty index of `kind` whose add_with_ids/remove_ids take slot ids, trained on `vectors` where needed."""
    d = vectors.shape[1]
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "exact":
        return faiss.IndexIDMap(faiss.IndexFlatIP(d))
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(d, spec.hnsw_m, ip)
        inner.hnsw.efConstruction = spec.ef_construction
        return apply_search_knobs(faiss.IndexIDMap(inner), kind, spec)
    nlist = nlist_for(spec, len(vectors))
    if kind == "ivf-flat":
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip)
    elif kind == "ivf-pq":
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, pq_m_for(spec, d), spec.pq_nbits, ip)
    else:
        raise ValueError(f"no faiss index for kind {kind!r}")
    ivf.cp.max_points_per_centroid = 64  # k-means on a sample: training time stays bounded at 1M items
    ivf.train(vectors)
    return apply_search_knobs(ivf, kind, spec)


def apply_search_knobs(index: faiss.Index, kind: str, spec: IndexSpec) -> faiss.Index:
    """Apply the spec's search-time knobs (nprobe / efSearch) to a built or loaded index."""
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = spec.ef_search
    elif kind.startswith("ivf"):
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    return index


def wider(index: faiss.Index, kind: str) -> Optional[faiss.SearchParameters]:
    """Search parameters for a retry that scans more of the index (None: a larger k is all that helps)."""
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=faiss.downcast_index(index.index).hnsw.efSearch * WIDEN)
    if kind.startswith("ivf"):
        ivf = faiss.extract_index_ivf(index)
        return faiss.SearchParametersIVF(nprobe=min(ivf.nlist, ivf.nprobe * WIDEN))
    return None


def use_gpu(device: str) -> bool:
    if device == "cuda" and faiss.get_num_gpus() == 0:
        raise RuntimeError("device cuda was asked for but faiss sees no GPU (is faiss-gpu installed?)")
    return device != "cpu" and faiss.get_num_gpus() > 0


_gpu_resources = None


def gpu_replica(index: faiss.Index, kind: str) -> faiss.Index:
    """A GPU copy of a flat or IVF index for searching; the CPU index stays the one that updates and saves."""
    global _gpu_resources
    if kind == "hnsw":
        raise ValueError("HNSW has no GPU index")
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)
