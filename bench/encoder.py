"""Incremental vs full re-encode: the cost of one appended event per user, as the live worker pays it.

For each window length (50: the synthetic preset, span 24; 98: the MovieLens preset, span 48) and batch size B,
B users' full windows are joined into slots and encoded once (filling the cache), then each user gets one more event
and is encoded again, twice:
  incremental  -- through the slot encoder's cache (model/slot_encoder.py): one position per layer against the
                  cached rows, for the scene window and the user's timeline, then the fusion
  full         -- the same slots through a slot encoder with no cache: every window and timeline encoded whole
Both run core/slot_step.py's `encode` (the gather, forward, scatter and fusion, the copy back included), with
untrained weights (speed does not depend on them); the vectors of both are checked equal within 1e-5. Times are the
median of --repeats, per appended event.

    python bench/encoder.py [--device cpu|cuda] [--batches 1 64 1024] [--windows 50 98] [--json]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import numpy as np
import torch

from scenestream.model.checkpoint import Checkpoint
from scenestream.model.config import ModelConfig
from scenestream.model.infer import InterestEncoder
from scenestream.model.model import InterestModel
from scenestream.model.slot_encoder import SlotEncoder
from scenestream.model.vocab import ItemVocab
from scenestream.stream.core.events import Event
from scenestream.stream.core.slot_step import encode
from scenestream.stream.core.slots import SlotWindows

SCENES = ("video", "article", "shop")
ACTIONS = ("view", "click", "like", "buy")


def encoder(window: int, device: str, dtype: torch.dtype) -> InterestEncoder:
    torch.manual_seed(0)
    items = [f"i{n}" for n in range(3000)]
    vocab = ItemVocab(items, [SCENES[n % 3] for n in range(len(items))])
    span = (window - 2) // 2
    cfg = ModelConfig(n_items=len(vocab), n_scenes=3, n_actions=4, span=span, dropout=0.0)
    model = InterestModel(cfg).to(dtype)
    return InterestEncoder(Checkpoint(model.eval(), vocab, SCENES, ACTIONS, window, f"bench-{window}"), device)


def histories(n_users: int, length: int, extra: int, seed: int) -> list[list[Event]]:
    rng = random.Random(seed)
    return [[Event(f"u{u}-{k}", f"u{u}", f"i{rng.randrange(3000)}", "video", rng.choice(ACTIONS),
                   1_700_000_000_000 + 1000 * k + rng.randrange(900)) for k in range(length + extra)]
            for u in range(n_users)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(window: int, batch: int, device: str, repeats: int, dtype: torch.dtype) -> dict:
    """Median seconds per appended event, full and incremental, for `batch` users' windows growing by one event."""
    streams = histories(batch, window, repeats, seed=window + batch)
    enc = encoder(window, device, dtype)
    per_user = 2 * SlotEncoder(enc, 0).scene_pool.entry_bytes()   # a scene window and a timeline, cached
    incremental = SlotEncoder(enc, max(64.0, 1.5 * batch * per_user / 2**20))
    full = SlotEncoder(enc, 0)
    slots = SlotWindows(SCENES, window)
    users = slots.join([e for s in streams for e in s[:window]]).users
    encode(slots, users, incremental)          # fill the cache (a miss per window)
    full_t, inc_t, worst = [], [], 0.0
    for step in range(window, window + repeats):
        users = slots.join([s[step] for s in streams]).users
        _sync(device)
        t0 = time.perf_counter()
        a = encode(slots, users, incremental).fused   # first: it reads (and resets) what was appended
        _sync(device)
        t1 = time.perf_counter()
        b = encode(slots, users, full).fused
        _sync(device)
        t2 = time.perf_counter()
        inc_t.append(t1 - t0)
        full_t.append(t2 - t1)
        worst = max(worst, float(np.abs(a - b).max()))
    stats = incremental.scene_pool.stats
    assert stats["extends"] == batch * repeats, stats
    full_s, inc_s = statistics.median(full_t) / batch, statistics.median(inc_t) / batch
    return {"window": window, "batch": batch, "full_us_per_event": round(full_s * 1e6, 2),
            "incremental_us_per_event": round(inc_s * 1e6, 2), "speedup": round(full_s / inc_s, 2),
            "max_abs_diff": worst, "exact_1e-5": worst <= 1e-5,
            "cache_bytes_per_window": incremental.scene_pool.entry_bytes()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="Model weights' dtype (bfloat16: to see whether it stays within the 1e-5 contract).")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    ap.add_argument("--windows", type=int, nargs="+", default=[50, 98])
    ap.add_argument("--repeats", type=int, default=7, help="Appends per window (the median is reported).")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    ap.add_argument("--json", action="store_true", help="Print the rows as one JSON object on the last line.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = [measure(w, b, args.device, args.repeats, dtype) for w in args.windows for b in args.batches]
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    for r in rows:
        print(f"window {r['window']:3d} batch {r['batch']:5d}: full {r['full_us_per_event']:9.1f} us/event, "
              f"incremental {r['incremental_us_per_event']:8.1f} us/event, {r['speedup']:5.1f}x, "
              f"max diff {r['max_abs_diff']:.1e}, cache {r['cache_bytes_per_window']} B per (user, scene)")
    if args.json:
        print(json.dumps({"device": device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
                          "rows": rows}))


if __name__ == "__main__":
    main()
