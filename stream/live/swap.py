"""Model swap without a restart: the worker watches its checkpoint folder and serves a new model once it is there.

Every `--model-poll` seconds the watcher looks at the folder's files (size and modification time, plus the version
that config.json names: a few bytes read). When they changed and name a version other than the one in use, it loads
the checkpoint and builds its item index in a thread of its own (the event loop keeps going: batches and requests),
checks that the model reads the state the worker holds (same scenes, actions and window), applies the catalog to
the new index (stream/live/catalog.py, `switch`) and then replaces the service's `Serving` bundle in one assignment
(stream/live/service.py). What is refused (a folder that does not load, half copied, or a model of other scenes) is
logged once, counted (`scenestream_model_swaps_total{outcome="refused"}`) and the model in use keeps serving; the
folder is tried again when its files change.

The state is raw events, so nothing is migrated: the new encoder starts with empty caches, so a user's next encode
is a full one (exact, design.md), and users are re-encoded when a micro-batch touches them; a request for a user not
touched since recomputes the vectors under the new model without publishing them (service.py, `user_record`).
"""
from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from scenestream.index import IndexSpec, ItemIndex
from scenestream.model.checkpoint import CONFIG, ITEMS, WEIGHTS, load_checkpoint
from scenestream.model.infer import InterestEncoder

from .catalog import CatalogFollower
from .metrics import WorkerMetrics
from .service import MicroBatchService, Serving

log = logging.getLogger(__name__)


def fingerprint(path: str | Path) -> Optional[tuple]:
    """What changes when a deploy replaces the checkpoint folder: each file's size and mtime, and the version its
    config.json names (None while it cannot be read, e.g. in the middle of a copy)."""
    path = Path(path)
    try:
        stats = tuple((name, st.st_size, st.st_mtime_ns) for name in (WEIGHTS, CONFIG, ITEMS)
                      for st in [(path / name).stat()])
        return stats, json.loads((path / CONFIG).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def incompatible(old: InterestEncoder, new: InterestEncoder) -> Optional[str]:
    """Why `new` cannot serve the state `old` built (None: it can). The windows are keyed by scene, hold the
    actions events were validated against, and are L events long: all three must stay."""
    for what, a, b in (("scenes", tuple(old.scenes), tuple(new.scenes)),
                       ("actions", tuple(old.ckpt.actions), tuple(new.ckpt.actions)),
                       ("window", old.window, new.window)):
        if a != b:
            return f"its {what} {b!r} differ from the {what} {a!r} of the state held (such a model needs a restart)"
    return None


def load_model(path: str | Path, like: InterestEncoder, index_kind: str) -> Serving:
    """The checkpoint at `path` on `like`'s device with its cache budget, and an index of its items."""
    encoder = InterestEncoder(load_checkpoint(path, like.device), like.device, batch_size=like.batch_size,
                              cache_mb=like.cache_mb)
    return Serving(encoder, ItemIndex.build(*encoder.item_vectors(), spec=IndexSpec(kind=index_kind)))


class ModelWatcher:
    def __init__(self, path: str | Path, service: MicroBatchService, catalog: CatalogFollower,
                 metrics: WorkerMetrics, load: Callable[[str], Serving]):
        self.path, self.service, self.catalog, self.metrics, self.load = str(path), service, catalog, metrics, load
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        self.seen: Optional[tuple] = None

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.poll()

    async def poll(self) -> Optional[str]:
        """One look at the folder; swaps when it holds a new usable model. Returns the version now served when it
        swapped, else None. Never raises: whatever goes wrong leaves the model in use serving."""
        run = asyncio.get_running_loop().run_in_executor
        found = await run(self.pool, fingerprint, self.path)
        if found is None or found == self.seen:
            return None
        self.seen = found
        current = self.service.model
        if found[1] == current.version:
            return None
        try:
            new = await run(self.pool, self.load, self.path)
            problem = incompatible(current.encoder, new.encoder)
        except Exception as exc:   # noqa: BLE001 - a bad checkpoint must never stop the worker
            problem = f"it does not load: {exc}"
        if problem is None and new.version == current.version:
            return None
        if problem is None:
            try:
                await self.catalog.switch(new.index, lambda: self._use(new))
                return new.version
            except Exception as exc:   # noqa: BLE001 - e.g. the catalog could not be read again: retry later
                problem = f"the catalog could not be applied to its index: {exc!r}"
                self.seen = None
        self.metrics.model_swaps.labels("refused").inc()
        log.error("model swap refused: the checkpoint at %s (version %s) is not served because %s; still serving "
                  "%s", self.path, found[1], problem, self.service.model.version)
        return None

    def _use(self, new: Serving) -> None:
        old = self.service.use(new)
        self.metrics.retire_cache(old.streamer.pools)
        self.metrics.model.info({"version": new.version})
        self.metrics.model_swaps.labels("swapped").inc()
        log.info("model swapped: now serving %s (was %s); windows kept, users re-encoded as they are touched",
                 new.version, old.version)
