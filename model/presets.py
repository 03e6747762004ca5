"""Training defaults per data set. A module of plain data, so `scenestream train --help` can show them without
loading torch.

Picked from measurements on a 2-core CPU (BENCHMARKS.md, "Recommendation quality"). Keys are TrainConfig fields plus
the model's attention span and scene stack; `None` is any other input (e.g. --input LOG).
"""
from __future__ import annotations

from typing import Optional

ENCODER_CACHE_MB = 256   # the incremental encoder's cache (model/window_cache.py): ~4,100 users' 3 scene windows
                         # and merged window at d=64, span 24

PRESETS: dict[Optional[str], dict] = {
    None: {"epochs": 8, "batch_users": 64, "segment": 32, "lr": 2e-3, "span": 24, "scene_layers": 1},
    "synthetic": {"epochs": 8, "batch_users": 64, "segment": 32, "lr": 2e-3, "span": 24, "scene_layers": 1},
    "ml-1m": {"epochs": 8, "batch_users": 32, "segment": 64, "lr": 2e-3, "span": 48, "scene_layers": 1},
    "ml-1m-5core": {"epochs": 8, "batch_users": 32, "segment": 64, "lr": 2e-3, "span": 48, "scene_layers": 1},
    "ml-100k": {"epochs": 10, "batch_users": 32, "segment": 64, "lr": 2e-3, "span": 48, "scene_layers": 1},
}


# How long a run of the defaults took on the 2-core development machine (BENCHMARKS.md, "Recommendation quality";
# training logs a budget for the run at hand after its first steps)
TIME_HERE: dict[Optional[str], str] = {
    "ml-1m": "genre scenes (the default) ~65-70 s an epoch, ~9-10 min for 8; one scene (--scenes single) ~45 s an "
             "epoch, ~6 min; genre NDCG@10 ~0.195, one scene ~0.192",
    "ml-1m-5core": "about as ml-1m (999,611 of its 1,000,209 ratings)",
    "ml-100k": "one scene ~1.5 min; genre scenes ~15-25 s an epoch",
}


def preset(dataset: Optional[str]) -> dict:
    """The training defaults for a named data set (a copy, safe to update)."""
    return dict(PRESETS.get(dataset, PRESETS[None]))


def presets_help() -> str:
    return "\n".join(f"  {name or 'other input'}: " + ", ".join(f"{k} {v}" for k, v in p.items())
                     + (f"\n    here: {TIME_HERE[name]}" if name in TIME_HERE else "")
                     for name, p in PRESETS.items())
