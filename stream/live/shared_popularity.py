"""One popular list for every worker: each partition's item counts, published when they change and followed by all.

A worker counts the items in the windows of the partitions it holds, per partition (so a re-delivery or a recovery
never counts an event twice). It publishes each held partition's counts to `<app-id>-popularity` (key: the partition
number) when they changed, and follows that topic from its start: the popular fallback ranks the sum of every
partition's latest counts, the same on every worker once they have read the same records (docs/operations.md, "One
popular list"). Until anything is shared, a worker ranks its own counts.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping, Optional, Sequence, Union

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ..core.config import MAX_RECORD_BYTES
from ..core.popularity import PartitionCounts, Popularity, merge_partitions, top_counts
from .kafka_security import NO_SECURITY
from .topics import COMPACTED

log = logging.getLogger(__name__)

POPULAR_DEPTH = 2000           # items per scene in a partition's popularity record: twice the API's largest k
# The topic keeps each clicks partition's latest counts, compacted with infinite retention like the changelog: a
# partition idle for a week still counts.
POPULARITY_CONFIG = COMPACTED


def popularity_value(popularity: Popularity, depth: int = POPULAR_DEPTH, limit: int = MAX_RECORD_BYTES) -> bytes:
    """A partition's record in the shared popularity topic, {"counts": {scene: [[item_id, count], ...]}}: the
    `depth` most counted items of each scene, fewer when that would pass `limit` bytes."""
    while True:
        raw = orjson.dumps({"counts": top_counts(popularity, depth)})
        if len(raw) <= limit or depth <= 1:
            return raw
        depth //= 2


def decode_popularity(key: Optional[bytes], raw: Optional[bytes], scenes: Sequence[str]
                      ) -> Union[tuple[int, Optional[PartitionCounts]], str]:
    """(partition, counts) of a shared popularity record (counts None for a null value: the entry is dropped), or
    why it is refused. Total: a bad record is skipped, never a reason to stop following."""
    try:
        partition = int(key.decode("ascii")) if key else -1
        if partition < 0:
            return f"bad key {key[:32]!r}" if key else "no key"
        if raw is None:
            return partition, None
        counts = orjson.loads(raw)["counts"]
        return partition, {scene: [(item, c) for item, c in pairs
                                   if isinstance(item, str) and type(c) is int and c > 0]
                           for scene, pairs in counts.items() if scene in scenes}
    except Exception as exc:   # noqa: BLE001 - whatever the bytes
        return f"{type(exc).__name__}: {str(exc)[:100]}"


class SharedPopularity:
    """This worker's counts per held partition, and every partition's latest shared counts."""

    def __init__(self, scenes: Sequence[str], bootstrap: str, security: Mapping[str, Any] = NO_SECURITY):
        self.scenes, self.bootstrap, self.security = tuple(scenes), bootstrap, security
        self.held: dict[int, Popularity] = {}                       # items in the windows held, per partition
        self._own: Optional[Popularity] = None                      # their sum, until one of them changes
        self.unpublished: set[int] = set()                          # partitions whose counts changed since published
        self.shared_counts: dict[int, PartitionCounts] = {}         # partition -> latest counts in the shared topic
        self.shared: Optional[Popularity] = None                    # their sum (None: nothing shared yet)

    # ---- this worker's partitions ----------------------------------------------------------------------------------

    def hold(self, partition: int, counts: Popularity) -> None:
        """A partition recovered here: its counts are ours to publish (a new owner overwrites the old one's entry)."""
        self.held[partition] = counts
        self._own = None
        self.unpublished.add(partition)

    def shift(self, partition: int, scene: str, delta: Mapping[str, int]) -> None:
        """A window of the partition changed by `delta` (item -> change in count)."""
        self.held[partition].shift(scene, delta)
        self._own = None
        self.unpublished.add(partition)

    def release(self, partition: int) -> None:
        """The partition went elsewhere: its shared entry stays until its new owner publishes."""
        self.held.pop(partition, None)
        self._own = None
        self.unpublished.discard(partition)

    @property
    def own(self) -> Popularity:
        """This worker's own counts: the items in the windows of the partitions it holds."""
        if self._own is None:   # summed once per change, not per request: the popular fallback ranks it per sum
            self._own = merge_partitions(p.counts for p in self.held.values())
        return self._own

    def popular(self) -> Popularity:
        """What the popular fallback ranks: every partition's latest shared counts, summed (the same on every
        worker once they have read the same records); this worker's own counts until anything is shared."""
        return self.shared if self.shared is not None else self.own

    # ---- the shared topic -----------------------------------------------------------------------------------------

    async def publish(self, producer: Optional[AIOKafkaProducer], topic: str) -> int:
        """Send the counts of each held partition that changed since it was last published, keyed by the partition
        number; returns how many were sent. A failed send is retried at the next call."""
        due = sorted(p for p in self.unpublished if p in self.held)
        if producer is None or not due:
            return 0
        sends = []
        for p in due:
            self.unpublished.discard(p)
            sends.append((p, await producer.send(topic, popularity_value(self.held[p]), key=str(p).encode())))
        for p, sent in sends:
            try:
                await sent
            except Exception:   # noqa: BLE001 - the counts are in memory; the next call sends them again
                log.warning("popularity of partition %d not published; retrying", p, exc_info=True)
                self.unpublished.add(p)
        return len(sends)

    def take(self, key: Optional[bytes], raw: Optional[bytes]) -> bool:
        """Apply one record of the shared topic (the partition's latest counts replace its earlier ones); whether
        it was valid. The caller re-sums (`merge`) after a batch of them."""
        got = decode_popularity(key, raw, self.scenes)
        if isinstance(got, str):
            log.warning("popularity record refused: %s", got)
            return False
        partition, counts = got
        if counts is None:
            self.shared_counts.pop(partition, None)
        else:
            self.shared_counts[partition] = counts
        return True

    def merge(self) -> None:
        self.shared = merge_partitions(self.shared_counts.values()) if self.shared_counts else None

    async def follow(self, topic: str) -> None:
        """Read the shared topic from its start and keep following it (every worker, outside the group)."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", metadata_max_age_ms=5000, **self.security)
        await consumer.start()
        try:
            while topic not in await consumer.topics():   # the worker creates it at start
                await asyncio.sleep(0.5)
            consumer.subscribe([topic])
            while True:
                fetched = await consumer.getmany(timeout_ms=1000)
                taken = [self.take(m.key, m.value) for tp in sorted(fetched, key=lambda t: t.partition)
                         for m in fetched[tp]]
                if any(taken):
                    self.merge()
        finally:
            await consumer.stop()
