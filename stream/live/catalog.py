"""The live item catalog: `item-catalog` topic records in, index updates out, without a restart.

A record's key is the item id and its value one JSON object:

    {"item_id": "m42", "scene": "video", "vector": [d floats]}   add the item, or replace its vector / scene
    {"item_id": "m42", "scene": "video"}                          add it with the scene's cold-start vector
    {"item_id": "m42", "op": "delete"}                            remove it; it is never recommended again

Every worker reads every partition of the topic from the beginning, outside the consumer group: the catalog is
global, and the topic (compacted by item id, so each item's latest record survives) is its durable state, while the
index is derived from it and rebuilt at each start. Delete is a record of its own rather than a null tombstone:
compaction drops tombstones after delete.retention.ms, and a worker started after that would serve the deleted item
again from the checkpoint's item table, which the catalog only amends. A new item the model never saw gets the mean vector of its scene's items (the index's
`cold_start_vector`): it scores like an average item of the scene, so it is recommendable without swamping
recommendations until a vector from a retrained model arrives.

A model swap (stream/live/swap.py) brings a new index built from the new checkpoint: `switch` applies to it every catalog
record applied so far, read again from the topic (what a restart with that checkpoint would do), and hands it over
while no other record is being applied, so no record reaches only the old index.

`decode_update` and `collapse` are pure; `CatalogFollower` is the thin consumer around them.
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from ..core.config import StreamConfig
from ..core.events import Rejection, _slow_loads, check_id
from .config import WorkerConfig
from .kafka_security import NO_SECURITY
from .topics import COMPACTED
from .reading import read_range
from .undecodable import getmany_past_undecodable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogUpdate:
    item_id: str
    scene: Optional[str] = None             # None only for deletes
    vector: Optional[tuple[float, ...]] = None  # None: cold start (upserts) / unused (deletes)
    delete: bool = False


# Compacted by item id: each item's latest record is all a worker needs (deletes are records, never tombstones).
CATALOG_CONFIG = COMPACTED   # compacted, kept forever
FLOAT32_MAX = float(np.finfo(np.float32).max)


# Refusal reasons: a closed set, so they can label logs and counts (Rejection.reason; detail says more).
CATALOG_REASONS = ("oversized", "not_utf8", "bad_json", "non_finite", "not_object", "missing_field", "wrong_type",
                   "empty_field", "too_long", "bad_chars", "unknown_op", "unknown_scene", "wrong_dim",
                   "undecodable_batch", "decoder_error")


def max_record_bytes(dim: int) -> int:
    """The largest record read for dimension d: 32 bytes per number (a float32 in JSON takes at most ~16) plus 4 KiB
    for the rest. Anything larger is refused unparsed, so a huge vector costs no parse."""
    return 4096 + 32 * dim


def decode_update(raw: Optional[bytes], config: StreamConfig, dim: int) -> Union[CatalogUpdate, Rejection]:
    """A CatalogUpdate, or a Rejection (reason in CATALOG_REASONS, detail for humans). Total: never raises, whatever
    the bytes (every worker replays the whole topic at start, so one record that raised would stop them all,
    forever). Item ids follow the events' id rule (core/events.py `check_id`): an item whose clicks would be refused
    is never indexed; vectors must be d numbers finite as float32, what the index stores."""
    try:
        return _decode_update(raw, config, dim)
    except Exception as exc:  # a bug here must refuse one record, never stop the follower
        return Rejection("decoder_error", f"{type(exc).__name__}: {exc}"[:200])


def _decode_update(raw: Optional[bytes], config: StreamConfig, dim: int) -> Union[CatalogUpdate, Rejection]:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return Rejection("not_object", f"record value is {type(raw).__name__}, not JSON bytes")
    if len(raw) > max_record_bytes(dim):
        return Rejection("oversized", f"{len(raw)} bytes > {max_record_bytes(dim)} for d={dim}")
    obj = _slow_loads(raw)      # the stdlib parser: NaN / Infinity literals refused, big integers exact
    if isinstance(obj, Rejection):
        return obj
    if not isinstance(obj, dict):
        return Rejection("not_object", f"expected a JSON object, got {type(obj).__name__}")
    if "item_id" not in obj:
        return Rejection("missing_field", "missing field 'item_id'")
    item = check_id(obj["item_id"], "item_id", config)
    if isinstance(item, Rejection):
        return item
    op = obj.get("op", "upsert")
    if op == "delete":
        return CatalogUpdate(item, delete=True)
    if op != "upsert":
        return Rejection("unknown_op", f"op {str(op)[:32]!r} is not upsert or delete")
    scene = obj.get("scene")
    if scene is None:
        return Rejection("missing_field", "missing field 'scene'")
    if not isinstance(scene, str):
        return Rejection("wrong_type", f"scene must be a string, got {type(scene).__name__}")
    if scene not in config.scenes:
        return Rejection("unknown_scene", f"scene {scene[:64]!r} is not one of {list(config.scenes)}")
    vector = obj.get("vector")
    if vector is None:
        return CatalogUpdate(item, scene)
    if not isinstance(vector, list):
        return Rejection("wrong_type", f"vector must be a list of numbers, got {type(vector).__name__}")
    if len(vector) != dim:
        return Rejection("wrong_dim", f"vector has {len(vector)} numbers, the model's d is {dim}")
    for x in vector:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return Rejection("wrong_type", f"vector holds a {type(x).__name__}, not a number")
        if not _float32(x):
            return Rejection("non_finite", "vector holds a number that is not finite as float32")
    return CatalogUpdate(item, scene, tuple(float(x) for x in vector))


def _float32(x) -> bool:
    try:
        return math.isfinite(x) and abs(float(x)) <= FLOAT32_MAX
    except OverflowError:   # an int beyond float64 (10**400)
        return False


def collapse(updates: Sequence[CatalogUpdate]) -> tuple[list[CatalogUpdate], list[str]]:
    """The net effect of updates in log order: (upserts, deleted ids), each item at most once, its last record
    winning. Keys route an item to one partition, so log order per item is the order it was written in."""
    last: dict[str, CatalogUpdate] = {}
    for u in updates:
        last.pop(u.item_id, None)   # re-insert so dict order follows the latest record
        last[u.item_id] = u
    upserts = [u for u in last.values() if not u.delete]
    deletes = [u.item_id for u in last.values() if u.delete]
    return upserts, deletes


def apply_updates(index, updates: Sequence[CatalogUpdate]) -> dict[str, int]:
    """Apply one batch to the index: deletes, then upserts (cold-start vectors filled in from the index)."""
    upserts, deletes = collapse(updates)
    present = [i for i in deletes if index.contains(i)]
    if present:
        index.remove(present)
    if upserts:
        vectors = np.stack([np.asarray(u.vector, dtype=np.float32) if u.vector is not None
                            else index.cold_start_vector(u.scene) for u in upserts])
        index.upsert([u.item_id for u in upserts], [u.scene for u in upserts], vectors)
    return {"upserted": len(upserts), "deleted": len(present)}


class CatalogFollower:
    """Follows every partition of the catalog topic from the start and applies each fetched batch to the index.

    `caught_up` turns true once everything that was in the topic at start has been applied (readiness): until then a
    deleted item could still be served. Reaching the end offsets is judged by consumer position, which holds even on
    brokers that report a partition's end as the start of its last record batch: a fetch returns whole batches."""

    def __init__(self, bootstrap: str, topic: str, index, config: StreamConfig, dim: int,
                 count: Callable[[str, int], None] = lambda outcome, n: None,
                 security: Mapping[str, Any] = NO_SECURITY, isolation_level: str = WorkerConfig.isolation_level):
        self.bootstrap, self.topic, self.index, self.security = bootstrap, topic, index, security
        self.isolation_level = isolation_level   # records of aborted transactions are never applied
        self.config, self.dim = config, dim
        self.count = count        # (outcome, n) for metrics: upserted / deleted / rejected
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog")  # big batches stay off the loop
        self.caught_up = False
        self.consumer = None   # while run() runs
        self.counts = {"upserted": 0, "deleted": 0, "rejected": 0}
        self.refused: Counter = Counter()   # rejected records by reason (CATALOG_REASONS, or "index" below)
        self.lock = asyncio.Lock()          # a batch of records is applied, or the index switched, never both
        self.applied: dict[int, int] = {}   # partition -> offset of the last record applied (or refused)

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _reject(self, where: str, reason: str, detail: str) -> None:
        self.counts["rejected"] += 1
        self.refused[reason] += 1
        self.count("rejected", 1)
        log.warning("catalog record %s refused: %s: %s", where, reason, detail)

    async def _apply(self, updates: list[CatalogUpdate], index=None, count: bool = True) -> None:
        """Apply a batch off the event loop (to the index in use, or `index`); should the index refuse it, apply its
        records one by one, so only the record it refuses is lost, never the follower."""
        run = asyncio.get_running_loop().run_in_executor
        index = self.index if index is None else index
        try:
            done = [await run(self.pool, apply_updates, index, updates)]
        except ValueError:
            done = []
            for u in updates:
                try:
                    done.append(await run(self.pool, apply_updates, index, [u]))
                except ValueError as exc:
                    if count:
                        self._reject(f"item {u.item_id[:64]!r}", "index", str(exc))
        for d in done if count else ():
            for k, v in d.items():
                self.counts[k] += v
                self.count(k, v)

    async def switch(self, index, then: Callable[[], None]) -> int:
        """Apply every record applied so far to `index` (read again from the topic, decoded for its dimension) and
        make it the index followed from now on, then call `then()` (no await between: nothing is applied to either
        index in between). Returns the number of records read again."""
        async with self.lock:
            updates, n = [], 0
            for partition, last in sorted(self.applied.items()):
                async for page in read_range(self.bootstrap, self.topic, partition, 0, last, security=self.security,
                                             isolation_level=self.isolation_level):
                    n += len(page)
                    updates += [u for u in (decode_update(r.value, self.config, index.dim) for r in page)
                                if isinstance(u, CatalogUpdate)]
            if updates:
                await self._apply(updates, index, count=False)
            self.index, self.dim = index, index.dim
            then()
        return n

    def answered_at(self) -> Optional[float]:
        """When the broker last answered a fetch of the catalog (time.time()); None before the first."""
        tps = self.consumer.assignment() if self.consumer else ()
        return max((t / 1000 for t in map(self.consumer.last_poll_timestamp, tps) if t), default=None)

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer
        # no group_id: the consumer is assigned every partition of the topic (and new ones), commits nothing
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", metadata_max_age_ms=5000,
                                    isolation_level=self.isolation_level, **self.security)
        self.consumer = consumer
        await consumer.start()
        try:
            while self.topic not in await consumer.topics():   # the worker declares it at start
                await asyncio.sleep(0.5)
            consumer.subscribe([self.topic])
            ends = None
            positions: dict = {}
            while True:
                fetched, bad = await getmany_past_undecodable(consumer, positions, timeout_ms=500, max_records=10_000)
                async with self.lock:
                    for batch in bad:
                        self._reject(f"{batch.topic}[{batch.partition}]@{batch.first}..{batch.last}",
                                     "undecodable_batch", f"{batch.describe()}; read on after it")
                        self.applied[batch.partition] = batch.last
                    updates = []
                    for tp in sorted(fetched, key=lambda t: t.partition):
                        for m in fetched[tp]:
                            u = decode_update(m.value, self.config, self.dim)
                            if isinstance(u, Rejection):
                                self._reject(f"{tp.topic}[{tp.partition}]@{m.offset}", u.reason, u.detail)
                            else:
                                updates.append(u)
                        if fetched[tp]:
                            self.applied[tp.partition] = fetched[tp][-1].offset
                    if updates:
                        await self._apply(updates)
                tps = consumer.assignment()
                if not self.caught_up and tps:
                    if ends is None:
                        ends = await consumer.end_offsets(list(tps))
                        log.info("following catalog topic %s: %d partitions, %d records at start", self.topic,
                                 len(tps), sum(ends.values()))
                    if all([await consumer.position(tp) >= ends.get(tp, 0) for tp in tps]):
                        self.caught_up = True
                        log.info("catalog caught up: %d items in the index", len(self.index))
        finally:
            await consumer.stop()
