"""Item index kinds head to head: build time, recall@10 against exact search, and queries/s at batch 1 and 256,
all through the ItemIndex wrapper (global scope), plus the wrapper's overhead over bare faiss on the same index.

    python bench/index.py --items 1000000 --dim 64 [--queries 1000] [--kinds exact hnsw ...] [--json]
    python bench/index.py --vectors item_vectors.npy [--queries-file user_vectors.npy] --json

Synthetic items are unit vectors around n/300 Gaussian centres (noise as large as the centre), with norms in
[0.75, 1.25] (seeded); queries are random items plus noise, or rows of --queries-file. For each kind a few search
settings (nprobe / efSearch, no rebuild) are tried; the one reported is the fastest at batch 1 with recall@10 >=
0.95, else the most accurate.
With --json the last stdout line is {"kinds": {kind: {"recall@10", "qps_batch1", "qps_batch256", ...}},
"wrapper_overhead": x}; x = max over batch 1 and 256 of time(ItemIndex.search) / time(faiss index.search) for
the default ANN kind at its reported setting (each ANN kind's two figures are under kinds[kind]["wrapper_overhead"]).
Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from tqdm import tqdm

import faiss

from scenestream.index import IndexSpec, ItemIndex
from scenestream.index.spec import AUTO_ANN_KIND, KINDS

K = 10
TARGET_RECALL = 0.95
SWEEP = {"ivf-flat": ("nprobe", (8, 32, 128)), "ivf-pq": ("nprobe", (8, 32, 128)),
         "hnsw": ("ef_search", (32, 64, 128, 256)), "auto": ("ef_search", (64, 128)), "exact": (None, (None,))}


def synthetic(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 300), d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), np.float32)
    for lo in range(0, n, 100_000):  # chunks keep the float64 temporaries small at 1M items
        hi = min(n, lo + 100_000)
        x[lo:hi] = centres[rng.integers(len(centres), size=hi - lo)] + rng.normal(0, 1.0 / np.sqrt(d), (hi - lo, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= rng.uniform(0.75, 1.25, (n, 1)).astype(np.float32)
    return x


def perturbed_queries(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    q = x[rng.integers(len(x), size=n)]
    return (q + rng.normal(0, 0.5 / np.sqrt(x.shape[1]), q.shape)).astype(np.float32)


def run_batches(search, q: np.ndarray, batch: int) -> float:
    """Queries per second of `search` over q in batches."""
    t0 = time.perf_counter()
    for lo in range(0, len(q), batch):
        search(q[lo:lo + batch])
    return len(q) / (time.perf_counter() - t0)


def recall(idx: ItemIndex, q: np.ndarray, truth: list[set[str]]) -> float:
    got = [r for lo in range(0, len(q), 256) for r in idx.search(q[lo:lo + 256], k=K)]
    return float(np.mean([len({i for i, _ in r} & t) / len(t) for r, t in zip(got, truth)]))


def overhead(idx: ItemIndex, q: np.ndarray, batch: int, repeats: int = 7) -> float:
    """Time of ItemIndex.search over bare faiss search on the same index and queries: whole passes over the
    queries, alternating which side goes first, best of `repeats` each, so that other load on the machine and
    cache warm-up do not land on one side only."""
    bare = idx.faiss_index()
    sides = (lambda b: idx.search(b, k=K), lambda b: bare.search(b, K))
    best = [np.inf, np.inf]
    for rep in range(repeats):
        for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
            best[side] = min(best[side], 1 / run_batches(sides[side], q, batch))
    return float(best[0] / best[1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000, help="Synthetic catalog size (ignored with --vectors).")
    p.add_argument("--dim", type=int, default=64, help="Synthetic vector width (ignored with --vectors).")
    p.add_argument("--queries", type=int, default=1000, help="Queries (perturbed items) for recall and batch 256.")
    p.add_argument("--batch1-queries", type=int, default=500, help="Queries timed one at a time.")
    p.add_argument("--vectors", help="Item vectors .npy [n, d] instead of synthetic ones.")
    p.add_argument("--queries-file", help="Query vectors .npy [q, d] instead of perturbed items.")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=["exact", "ivf-flat", "ivf-pq", "hnsw"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Print the result as one JSON object on the last line.")
    args = p.parse_args(argv)

    x = np.load(args.vectors).astype(np.float32) if args.vectors else synthetic(args.items, args.dim, args.seed)
    q = np.load(args.queries_file).astype(np.float32) if args.queries_file else \
        perturbed_queries(x, args.queries, args.seed)
    q1 = q[:args.batch1_queries]
    ids, scenes = [f"i{r}" for r in range(len(x))], ["all"] * len(x)
    print(f"{len(x)} items x {x.shape[1]}, {len(q)} queries, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads", file=sys.stderr)

    t0 = time.perf_counter()
    exact = ItemIndex.build(ids, scenes, x)
    exact_build_s = time.perf_counter() - t0
    truth = [{i for i, _ in r} for lo in range(0, len(q), 256) for r in exact.search(q[lo:lo + 256], k=K)]
    kinds: dict[str, dict] = {}
    ann = AUTO_ANN_KIND if AUTO_ANN_KIND in args.kinds else next((k for k in args.kinds if k != "exact"), None)
    bar = tqdm(total=sum(len(SWEEP[k][1]) for k in args.kinds), desc="index bench", file=sys.stderr)
    for kind in args.kinds:
        bar.set_postfix_str(f"building {kind}")
        t0 = time.perf_counter()
        idx = exact if kind == "exact" else ItemIndex.build(ids, scenes, x, IndexSpec(kind=kind))
        build_s = exact_build_s if kind == "exact" else time.perf_counter() - t0
        knob, values = SWEEP[kind]
        tried = []
        for v in values:
            bar.set_postfix_str(f"{kind} {knob}={v}")
            if knob:
                idx.set_search_knobs(**{knob: v})
            tried.append({**({knob: v} if knob else {}), "recall@10": round(recall(idx, q, truth), 4),
                          "qps_batch1": round(run_batches(lambda b: idx.search(b, k=K), q1, 1), 1),
                          "qps_batch256": round(run_batches(lambda b: idx.search(b, k=K), q, 256), 1)})
            bar.update()
        good = [t for t in tried if t["recall@10"] >= TARGET_RECALL]
        best = max(good, key=lambda t: t["qps_batch1"]) if good else max(tried, key=lambda t: t["recall@10"])
        kinds[kind] = {**best, "build_s": round(build_s, 2), "scope_kinds": sorted(set(idx.kinds.values())),
                       "settings": tried}
        if kind != "exact":
            if knob:
                idx.set_search_knobs(**{knob: best[knob]})
            bar.set_postfix_str(f"{kind} wrapper overhead")
            kinds[kind]["wrapper_overhead"] = {"batch1": round(overhead(idx, q1, 1), 3),
                                               "batch256": round(overhead(idx, q, 256), 3)}
        if kind != "exact":
            del idx
    bar.close()
    if "exact" in kinds:
        for r in kinds.values():
            r["speedup_batch1_vs_exact"] = round(r["qps_batch1"] / kinds["exact"]["qps_batch1"], 2)
    wo = kinds[ann]["wrapper_overhead"] if ann else {}
    result = {"kinds": kinds, "wrapper_overhead": max(wo.values()) if wo else None}
    if args.json:
        print(json.dumps(result))
    else:
        for kind, r in kinds.items():
            print(f"{kind:9s} recall@10 {r['recall@10']:.4f}  qps b1 {r['qps_batch1']:9.1f}  b256 "
                  f"{r['qps_batch256']:9.1f}  build {r['build_s']:7.2f}s  {r.get('speedup_batch1_vs_exact', '')}")
        print(f"wrapper overhead {result['wrapper_overhead']} ({wo})")
    return result


if __name__ == "__main__":
    main()
