"""Durable per-user windows: an in-memory map per source partition, backed by a changelog topic.

Why not a Faust Table: (1) Faust forbids table writes from inside `stream.take()`; (2) Faust recovers a table by
reading its changelog up to the broker's reported high watermark, and the embedded Tansu broker reports the high
watermark of a partition as (base offset of the last record batch + 1), so every record after the first one of the
last batch is silently skipped -- the "1 of 2000 updates missing" seen here (docs/design.md, "Durability").

What we do instead:
- One changelog record per changed (user, scene) window, keyed `user \x1f scene`. Windows form a lattice, so
  recovery joins every record it reads into its user's state: order, duplicates and stale records cannot make the
  result wrong, and compaction (keep the newest per key) keeps the join.
- Recovery writes a fence record into the changelog partition and reads until it has seen the fence's offset, as
  the broker acknowledged it on produce. No high watermark is trusted.
- Each micro-batch also writes, per source partition, the highest source offset it applied (an offset marker,
  after the state records, in the same changelog partition). The marker, not the consumer group's committed
  offset, says where durable state ends: a committed offset can be ahead of what was applied (Faust, which fed the
  worker once, was seen committing offsets of events it had buffered but not processed when stopped by SIGTERM).
  After recovery the feeder reads from right after the marker, and a batch that starts past it first re-reads the
  gap; whatever is read twice joins in harmlessly.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter, OrderedDict
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Mapping, Optional

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ..core.popularity import Popularity
from ..core.window import EMPTY, UserState, Window, apply_window, item_delta
from .changelog import FENCE_KEY, MARKER_KEY, SCENE_SEPARATOR, decode_state, encode_state, state_key
from .config import WorkerConfig, memory_cap_problem
from .kafka_security import NO_SECURITY
from .reading import read_to
from .record_batches import RecordBatches, SentBatch, codec_setting
from .rocks import DiskPartition
from .topics import COMPACTED

log = logging.getLogger(__name__)

RECOVERY_DEADLINE_S = 300
CHANGELOG_CONFIG = COMPACTED   # the state: created so by topics.ensure_topic


def count_deltas(pairs: Iterable[tuple[str, Mapping[str, int]]]) -> dict[str, Counter]:
    """(scene, {item: change in count}) pairs summed per scene."""
    out: dict[str, Counter] = {}
    for scene, delta in pairs:
        out.setdefault(scene, Counter()).update(delta)
    return out


def join_states(a: Optional[UserState], b: UserState, length: int) -> UserState:
    """Lattice join of two states of one user (what recovery does with every changelog record)."""
    merged = dict(a or {})
    for scene, w in b.items():
        have = merged.get(scene)
        merged[scene] = w if not have and len(w) <= length else apply_window(have or EMPTY, w.events(), length)[0]
    return merged


class ChangelogStore:
    """state[partition][user] -> UserState, recovered lazily per partition before its first event is applied.

    With `state_dir` (`--state rocksdb`) every partition also lives on local disk (stream/live/rocks.py): recovery reads
    only the changelog's tail, and memory holds at most `max_users` users (least recently used go first, never one
    a micro-batch in flight has changed; 0 = no cap) and none idle for longer than `idle_s` (0 = no limit). A user
    not in memory is read back from disk when touched."""

    def __init__(self, bootstrap: str, topic: str, window: int, security: Mapping[str, Any] = NO_SECURITY,
                 state_dir: Optional[str] = None, max_users: int = 0, idle_s: float = 0.0,
                 compression: str = WorkerConfig.compression):
        self.bootstrap, self.topic, self.window, self.security = bootstrap, topic, window, security
        self.compression = codec_setting(compression)   # of every record the worker writes (this producer's)
        self.state_dir, self.max_users, self.idle_s = state_dir, max_users, idle_s
        if problem := memory_cap_problem(bool(state_dir), max_users, idle_s):
            raise ValueError(problem)
        self.partitions: dict[int, OrderedDict[str, UserState]] = {}   # in memory, least recently used first
        self.touched: dict[int, dict[str, float]] = {}                 # when each user in memory was last used
        self.disk: dict[int, DiskPartition] = {}
        self.pinned: dict[int, Counter] = {}    # users changed by micro-batches not yet on disk (never evicted)
        self.stats = {"loads": 0, "evictions": 0}
        self.on_evict: Callable[[str], None] = lambda user: None
        self.applied: dict[int, int] = {}   # source partition -> highest source offset applied in memory (-1: none)
        self.marked: dict[int, int] = {}    # source partition -> highest source offset whose marker was sent
        self.durable: dict[int, int] = {}   # ... whose marker the broker acknowledged (what the lag metric reads)
        self.producer: Optional[AIOKafkaProducer] = None
        self._locks: dict[int, asyncio.Lock] = {}

    async def start(self) -> None:
        if self.producer is not None:
            return
        # linger 0: a micro-batch queues all its sends before it first yields, so they leave in one request anyway;
        # any linger would only add to every batch's two waits on the broker
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=0,
                                         max_batch_size=1 << 20, compression_type=self.compression, **self.security)
        await self.producer.start()

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    def forget(self, partitions: Iterable[int]) -> None:
        """A revoked partition's state may change elsewhere: drop it; it is recovered again if it comes back."""
        for p in partitions:
            self.partitions.pop(p, None)
            self.touched.pop(p, None)
            self.pinned.pop(p, None)
            self.applied.pop(p, None)
            self.marked.pop(p, None)
            self.durable.pop(p, None)
            disk = self.disk.pop(p, None)
            if disk is not None:   # kept: a later recovery joins it with the changelog written since
                disk.close()

    def get(self, partition: int, user: str) -> Optional[UserState]:
        memory = self.partitions[partition]
        state = memory.get(user)
        if state is None:
            state = self._on_disk(self.disk.get(partition), user)
            if state is None:
                return None
            memory[user] = state
            self.stats["loads"] += 1
        if self.state_dir:
            memory.move_to_end(user)
            self.touched[partition][user] = time.monotonic()
        return state

    def _on_disk(self, disk: Optional[DiskPartition], user: str) -> Optional[UserState]:
        raw = disk.get(user) if disk is not None else None
        return decode_state(user, raw, self.window) if raw is not None else None

    def has(self, partition: int, user: str) -> bool:
        disk = self.disk.get(partition)
        return user in self.partitions.get(partition, ()) or disk is not None and disk.has(user)

    def in_memory(self) -> int:
        return sum(len(m) for m in self.partitions.values())

    def trim(self) -> None:
        """Drop users from memory, least recently used first over every partition together, while over the cap or
        idle past the TTL; never one pinned by a micro-batch in flight. One order over all partitions: taking each
        partition's oldest in turn emptied the first partitions of every user, the newest too, while the last one
        kept users far older (BENCHMARKS.md, "RocksDB state and the memory cap")."""
        if not self.state_dir:
            return
        over = max(0, self.in_memory() - self.max_users) if self.max_users else 0
        if not over and not self.idle_s:
            return
        idle_before = time.monotonic() - self.idle_s
        # each partition's memory is in the order its users were last used, so merging them gives that order overall
        oldest = heapq.merge(*(self._by_use(p) for p in self.partitions))
        victims = []
        for used, p, user in oldest:
            if over <= len(victims) and not (self.idle_s and used < idle_before):
                break
            if user not in self.pinned.get(p, ()):
                victims.append((p, user))
        for p, user in victims:
            del self.partitions[p][user]
            self.touched[p].pop(user, None)
            self.on_evict(user)
        self.stats["evictions"] += len(victims)

    def _by_use(self, partition: int) -> Iterator[tuple[float, int, str]]:
        touched = self.touched[partition]
        return ((touched.get(user, 0.0), partition, user) for user in self.partitions[partition])

    def popularity(self, partition: int) -> Popularity:
        """The item counts of every window the partition holds (on disk too)."""
        disk = self.disk.get(partition)
        if disk is not None:
            return disk.popularity()
        pop = Popularity()
        for state in self.partitions[partition].values():
            for scene, w in state.items():
                pop.shift(scene, item_delta(None, w))
        return pop

    async def ensure(self, partition: int) -> bool:
        """Recover the partition unless it is in memory; True when this call recovered it."""
        lock = self._locks.setdefault(partition, asyncio.Lock())   # the agent and readiness may both ask
        async with lock:
            if partition in self.partitions:
                return False
            state, marker = await self.recover(partition)
            self.partitions[partition] = OrderedDict(state)
            self.touched[partition] = dict.fromkeys(state, time.monotonic())
            self.pinned[partition] = Counter()
            self.applied[partition] = self.marked[partition] = self.durable[partition] = marker
            return True

    async def recover(self, partition: int) -> tuple[dict[str, UserState], int]:
        """Join every user record of the partition as it streams in (memory holds the states, never the log). With
        a disk, only the records past what it covers, joined into it; memory then starts empty."""
        disk = None
        if self.state_dir:
            disk = self.disk[partition] = DiskPartition(self.state_dir, self.topic, partition)
        state: dict[str, UserState] = {}
        deltas: list = []
        applied, n, last = (disk.applied if disk else -1), 0, -1
        async for m in self._read_changelog(partition, disk.covered + 1 if disk else 0):
            last = m.offset
            if m.key == MARKER_KEY:
                applied = max(applied, int(m.value))
            elif m.key and m.key != FENCE_KEY and m.value:
                user = m.key.split(SCENE_SEPARATOR, 1)[0].decode()   # or by user alone (whole states)
                old = state.get(user) or self._on_disk(disk, user) or {}
                new = state[user] = join_states(old, decode_state(user, m.value, self.window), self.window)
                if disk:
                    deltas += [(s, item_delta(old.get(s), w)) for s, w in new.items() if w is not old.get(s)]
                n += 1
        self.stats["records_recovered"] = self.stats.get("records_recovered", 0) + n
        log.info("recovered partition %d of %s: %d records%s, %d users, applied up to offset %d", partition,
                 self.topic, n, f" past offset {disk.covered} on disk" if disk else "", len(state), applied)
        if disk:
            disk.write({u: encode_state(st) for u, st in state.items()}, count_deltas(deltas), covered=last,
                       applied=applied)
            return {}, disk.applied
        return state, applied

    async def _read_changelog(self, partition: int, start: int = 0) -> AsyncIterator:
        """Every record of the changelog partition from `start` up to a fence written now, whose offset the broker
        acknowledged (the last record read): the log's end as the broker itself says on produce, never its reported
        high watermark."""
        tp = TopicPartition(self.topic, partition)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20,
                                    **self.security)
        await consumer.start()
        try:
            consumer.assign([tp])
            if start > 0:
                consumer.seek(tp, start)   # compacted away: the consumer starts at the earliest (auto_offset_reset)
            else:
                await consumer.seek_to_beginning(tp)
            last = (await self.producer.send_and_wait(self.topic, b"", key=FENCE_KEY, partition=partition)).offset
            async for records, bad in read_to(consumer, tp, start, last, RECOVERY_DEADLINE_S):
                if bad:   # the state itself: never stepped over
                    raise RuntimeError(f"recovery of {self.topic}[{partition}]: {bad[0].describe()}")
                for m in records:
                    yield m
        finally:
            await consumer.stop()

    def put(self, partition: int, updates: dict[str, UserState], applied_offset: int) -> None:
        """Apply updates in memory (the caller checked that it owns the partition): memory may run ahead of the
        changelog, never the other way round; a crash in between loses only what the marker says to redo."""
        memory = self.partitions[partition]
        memory.update(updates)
        if self.state_dir:
            now, touched = time.monotonic(), self.touched[partition]
            for user in updates:
                memory.move_to_end(user)
                touched[user] = now
            self.pinned[partition].update(updates.keys())
        self.applied[partition] = max(applied_offset, self.applied.get(partition, -1))

    def settle(self, partition: int, updates: dict[str, UserState], deltas: list, offsets: list[int],
               applied_offset: int) -> None:
        """A micro-batch's changelog records were acknowledged at `offsets`, its marker among them: the partition is
        durable up to `applied_offset`; its states go to disk (if any), with `covered` moved up to them when they
        follow it without a gap, and its users are unpinned."""
        self.durable[partition] = max(applied_offset, self.durable.get(partition, -1))
        disk = self.disk.get(partition)
        if disk is None:
            return
        offsets = sorted(offsets)
        gapless = bool(offsets) and offsets[0] == disk.covered + 1 and offsets[-1] - offsets[0] + 1 == len(offsets)
        disk.write({u: encode_state(st) for u, st in updates.items()}, count_deltas(deltas),
                   offsets[-1] if gapless else None, applied_offset)
        self.pinned[partition].subtract(updates.keys())
        self.pinned[partition] += Counter()   # drop the zeros

    async def send(self, partition: int, windows: Iterable[tuple[str, str, Window]],
                   applied_offset: int) -> list[SentBatch]:
        """Send the changed (user, scene, window)s, then the offset marker, to the changelog partition, as one
        record batch (more if it outgrows the producer's batch size); the caller awaits them before the batch counts
        as done."""
        batches = RecordBatches(self.producer)
        for user, scene, w in windows:
            batches.add(self.topic, partition, state_key(user, scene), encode_state({scene: w}))
        if applied_offset > self.marked.get(partition, -1):
            self.marked[partition] = applied_offset
            batches.add(self.topic, partition, MARKER_KEY, str(applied_offset).encode())
        return await batches.send()
