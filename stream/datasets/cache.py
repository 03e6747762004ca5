"""Where SceneStream keeps what it downloads or trains on a user's behalf: $SCENESTREAM_CACHE, by default
~/.cache/scenestream. One layout, used by everything that caches:

    <cache>/datasets/<name>/    MovieLens atomic files (stream/datasets/movielens.py)
    <cache>/models/<name>/      the demo model of `scenestream run`
    <cache>/run/worker.log      the worker log of `scenestream run`
    <cache>/kernels/            the encoder's C kernel, built on first use (model/ring_attention.py)
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SCENESTREAM_CACHE"


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ[CACHE_ENV]).expanduser() if os.environ.get(CACHE_ENV) else \
        Path.home() / ".cache" / "scenestream"
    return root.joinpath(*parts)
