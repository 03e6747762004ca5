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
import logging
import time
from collections import Counter
from itertools import repeat
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Mapping, Optional, Sequence

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ..core.events import Event
from ..core.popularity import Popularity
from ..core.slots import SlotJoin, SlotWindows
from ..core.window import EMPTY, ITEMS, UserState, apply_window, item_delta
from .changelog import FENCE_KEY, MARKER_KEY, SCENE_SEPARATOR, decode_state, encode_state, encode_windows, state_key, \
    window_values
from .config import WorkerConfig, memory_cap_problem
from .kafka_security import NO_SECURITY
from .reading import read_to
from .record_batches import RecordBatches, SentBatch, codec_setting
from .rocks import DiskPartition
from .topics import COMPACTED

log = logging.getLogger(__name__)

RECOVERY_DEADLINE_S = 300
HOT_USERS = 100_000   # without a disk: users held as slots; the rest wait packed (ChangelogStore)
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


@dataclass
class Written:
    """What a micro-batch writes of a partition's state, cut from the slots when it was joined (the next batch may
    change them before this one is written): the changelog records of its changed windows, and with a disk the
    states of its changed users and the change in item counts."""
    records: list[tuple[bytes, bytes]]
    users: np.ndarray                       # user slots changed (pinned until written to disk)
    states: dict[str, bytes] = field(default_factory=dict)
    deltas: dict[str, Counter] = field(default_factory=dict)


class ChangelogStore:
    """Every held user's windows as slots (core/slots.py: one array row per (user, scene) window, shared by all the
    partitions held), each user tagged with its source partition; a partition is recovered before its first event.

    A slot has room for a full window, so a user with one event costs what one with L per scene does (~1.15 KB a
    window at L = 50): 1M recovered users of a few events each took 6.2 GB and 302 s to recover as slots, 1.53 GB
    and 76 s as packed windows (BENCHMARKS.md, "State"). So without a disk, recovered users wait as packed windows
    (`cold`, per partition: core/window.py's bytes, sized by what they hold) and take a slot when a micro-batch or a
    read first touches them; past `hot_users` slots, the least recently used are packed again (`trim`).

    With `state_dir` (`--state rocksdb`) every partition also lives on local disk (stream/live/rocks.py): recovery
    reads only the changelog's tail, and memory holds at most `max_users` users (least recently used go first, never
    one a micro-batch in flight has changed; 0 = no cap) and none idle for longer than `idle_s` (0 = no limit). A
    user not in memory is read back from disk when touched."""

    def __init__(self, bootstrap: str, topic: str, scenes: Sequence[str], window: int,
                 security: Mapping[str, Any] = NO_SECURITY, state_dir: Optional[str] = None, max_users: int = 0,
                 idle_s: float = 0.0, compression: str = WorkerConfig.compression, hot_users: int = HOT_USERS):
        self.bootstrap, self.topic, self.window, self.security = bootstrap, topic, window, security
        self.compression = codec_setting(compression)   # of every record the worker writes (this producer's)
        self.state_dir, self.max_users, self.idle_s, self.hot_users = state_dir, max_users, idle_s, hot_users
        if problem := memory_cap_problem(bool(state_dir), max_users, idle_s):
            raise ValueError(problem)
        self.slots = SlotWindows(scenes, window)
        self.cold: dict[int, dict[str, UserState]] = {}   # without a disk: partition -> users held packed
        self.part_of = np.zeros(0, np.int32)     # user slot -> source partition
        self.used_at = np.zeros(0, np.float64)   # user slot -> when last used (time.monotonic)
        self.pins = np.zeros(0, np.int32)        # user slot -> batches in flight that changed it (never evicted)
        self.held: set[int] = set()              # partitions recovered here
        self.disk: dict[int, DiskPartition] = {}
        self.stats = {"loads": 0, "evictions": 0}
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

    # ---- users and partitions -------------------------------------------------------------------------------------

    def _tags(self) -> None:
        """The per-user-slot arrays follow the slots as they grow."""
        grow = len(self.slots.user_names) - len(self.part_of)
        if grow > 0:
            self.part_of = np.concatenate([self.part_of, np.full(grow, -1, np.int32)])
            self.used_at = np.concatenate([self.used_at, np.zeros(grow)])
            self.pins = np.concatenate([self.pins, np.zeros(grow, np.int32)])

    def users_of(self, partition: int) -> list[str]:
        """The partition's users in memory."""
        self._tags()
        names = self.slots.user_names
        return [names[u] for u in np.flatnonzero(self.part_of == partition).tolist() if names[u] is not None] + \
            list(self.cold.get(partition, ()))

    def forget(self, partitions: Iterable[int]) -> None:
        """A revoked partition's state may change elsewhere: drop it; it is recovered again if it comes back."""
        for p in partitions:
            self._drop(self.users_of(p))
            self.cold.pop(p, None)
            self.held.discard(p)
            self.applied.pop(p, None)
            self.marked.pop(p, None)
            self.durable.pop(p, None)
            disk = self.disk.pop(p, None)
            if disk is not None:   # kept: a later recovery joins it with the changelog written since
                disk.close()

    def _drop(self, users: list[str]) -> None:
        slots = [self.slots.slot_of[u] for u in users if u in self.slots.slot_of]
        self.part_of[slots], self.pins[slots] = -1, 0
        self.slots.drop(users)

    def _hold(self, partition: int, user: str, state: UserState) -> None:
        self.slots.put(user, state)
        self._tags()
        slot = self.slots.slot_of[user]
        self.part_of[slot], self.used_at[slot] = partition, time.monotonic()

    def get(self, partition: int, user: str) -> Optional[UserState]:
        """The user's windows (read back from disk if they left memory); None if the partition has none."""
        if user in self.slots and self.part_of[self.slots.slot_of[user]] == partition:
            return self.slots.state(user)
        state = self.cold.get(partition, {}).pop(user, None)
        if state is None:
            state = self._on_disk(self.disk.get(partition), user)
            self.stats["loads"] += state is not None
        if state is not None:
            if user in self.slots:   # held for another partition too (its events came by two): both count
                state = join_states(self.slots.state(user), state, self.window)
            self._hold(partition, user, state)
        return state

    def _on_disk(self, disk: Optional[DiskPartition], user: str) -> Optional[UserState]:
        raw = disk.get(user) if disk is not None else None
        return decode_state(user, raw, self.window) if raw is not None else None

    def has(self, partition: int, user: str) -> bool:
        if user in self.slots:
            return self.part_of[self.slots.slot_of[user]] == partition
        if user in self.cold.get(partition, ()):
            return True
        disk = self.disk.get(partition)
        return disk is not None and disk.has(user)

    def in_memory(self) -> int:
        return len(self.slots) + sum(map(len, self.cold.values()))

    def trim(self) -> None:
        """Take users out of their slots, least recently used first over every partition together, while over the
        cap or idle past the TTL; never one pinned by a micro-batch in flight. With a disk they leave memory (their
        windows are on disk); without one, past `hot_users`, they are packed (`cold`). One order over all
        partitions: taking each partition's oldest in turn emptied the first partitions of every user, the newest
        too, while the last one kept users far older (BENCHMARKS.md, "State")."""
        cap = self.max_users if self.state_dir else self.hot_users
        over = max(0, len(self.slots) - cap) if cap else 0
        if not over and not (self.idle_s and self.state_dir):
            return
        self._tags()
        held = np.flatnonzero((self.part_of >= 0) & (self.pins == 0))
        order = held[np.argsort(self.used_at[held], kind="stable")]
        victims = order[:over]
        if self.idle_s and self.state_dir:
            idle = order[self.used_at[order] < time.monotonic() - self.idle_s]
            victims = np.union1d(victims, idle)
        names = [self.slots.user_names[u] for u in victims.tolist()]
        if not self.state_dir:
            for user, p in zip(names, self.part_of[victims].tolist()):
                self.cold.setdefault(p, {})[user] = self.slots.state(user)
        self._drop(names)
        self.stats["evictions"] += len(names)

    def popularity(self, partition: int) -> Popularity:
        """The item counts of every window the partition holds (on disk too)."""
        disk = self.disk.get(partition)
        if disk is not None:
            return disk.popularity()
        self._tags()
        slots, L = self.slots, self.window
        W = slots.win[np.flatnonzero(self.part_of == partition)]
        W = W[W >= 0]
        cols = np.arange(L)[None, :] >= (L - slots.n[W])[:, None]
        scenes = np.broadcast_to(slots.scene_of[W][:, None], cols.shape)[cols]
        counts = Counter(zip(scenes.tolist(), slots.item[W][cols].tolist()))
        for state in self.cold.get(partition, {}).values():
            for scene, w in state.items():
                counts.update(zip(repeat(slots.scene_index[scene]), w.table()["item"].tolist()))
        pop = Popularity()
        for (s, i), c in counts.items():
            pop.counts[slots.scenes[s]][ITEMS.names[i]] = c
        return pop

    async def ensure(self, partition: int) -> bool:
        """Recover the partition unless it is held; True when this call recovered it."""
        lock = self._locks.setdefault(partition, asyncio.Lock())   # the agent and readiness may both ask
        async with lock:
            if partition in self.held:
                return False
            state, marker = await self.recover(partition)
            self.cold[partition] = {u: st for u, st in state.items() if st}   # slots when first touched
            self.held.add(partition)
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

    # ---- a micro-batch ---------------------------------------------------------------------------------------------

    def join(self, partition: int, events: Sequence[Event], applied_offset: int) -> SlotJoin:
        """Join a micro-batch's valid events of one partition into the windows in memory (the caller checked it owns
        the partition; users on disk come back first). Memory may run ahead of the changelog, never the other way
        round: a crash before the batch's `send` loses only what the marker says to redo."""
        if self.disk.get(partition) is not None or self.cold.get(partition):
            for user in {e.user_id for e in events} - self.slots.slot_of.keys():
                self.get(partition, user)
        joined = self.slots.join(events)
        self._tags()
        touched = np.fromiter((self.slots.slot_of[u] for u in {e.user_id for e in events}), np.int64)
        self.part_of[touched], self.used_at[touched] = partition, time.monotonic()
        self.applied[partition] = max(applied_offset, self.applied.get(partition, -1))
        return joined

    def cut(self, partition: int, joined: SlotJoin) -> Written:
        """What the batch writes of what it joined, cut now: the next batch may change the windows before this one's
        state is sent. Its users are pinned in their slots until `settle`."""
        slots, names = self.slots, self.slots.user_names
        keys = [state_key(names[u], slots.scenes[s]) for u, s in
                zip(slots.owner[joined.windows].tolist(), slots.scene_of[joined.windows].tolist())]
        records = list(zip(keys, window_values(slots, joined.windows)))
        written = Written(records, joined.users)
        self.pins[joined.users] += 1
        if self.disk.get(partition) is not None:
            written.states = {names[u]: encode_windows(slots.user_arrays(u)) for u in joined.users.tolist()}
            written.deltas = item_deltas(slots, joined)
        return written

    def settle(self, partition: int, written: Written, offsets: list[int], applied_offset: int) -> None:
        """A micro-batch's changelog records were acknowledged at `offsets`, its marker among them: the partition is
        durable up to `applied_offset`; its states go to disk (if any), with `covered` moved up to them when they
        follow it without a gap, and its users are unpinned."""
        self.durable[partition] = max(applied_offset, self.durable.get(partition, -1))
        self.pins[written.users] = np.maximum(0, self.pins[written.users] - 1)
        disk = self.disk.get(partition)
        if disk is None:
            return
        offsets = sorted(offsets)
        gapless = bool(offsets) and offsets[0] == disk.covered + 1 and offsets[-1] - offsets[0] + 1 == len(offsets)
        disk.write(written.states, written.deltas, offsets[-1] if gapless else None, applied_offset)

    async def send(self, partition: int, written: Written, applied_offset: int) -> list[SentBatch]:
        """Send the changed windows' records, then the offset marker, to the changelog partition, as one record
        batch (more if it outgrows the producer's batch size); the caller awaits them before the batch counts as
        done."""
        batches = RecordBatches(self.producer)
        for key, value in written.records:
            batches.add(self.topic, partition, key, value)
        if applied_offset > self.marked.get(partition, -1):
            self.marked[partition] = applied_offset
            batches.add(self.topic, partition, MARKER_KEY, str(applied_offset).encode())
        return await batches.send()


def item_deltas(slots: SlotWindows, joined: SlotJoin) -> dict[str, Counter]:
    """How a join changed the item counts, per scene: {scene: {item: change}} (nonzero entries only), summed as
    arrays: a fresh event adds an item and drops one, so this runs for about every event."""
    scene = slots.scene_of[np.concatenate([joined.added, joined.removed])].astype(np.int64)
    item = np.concatenate([joined.added_items, joined.removed_items]).astype(np.int64)
    sign = np.r_[np.ones(len(joined.added), np.int64), -np.ones(len(joined.removed), np.int64)]
    width = int(item.max(initial=0)) + 1
    pairs, at = np.unique(scene * width + item, return_inverse=True)
    change = np.bincount(at.ravel(), weights=sign, minlength=len(pairs)).astype(np.int64)
    kept = change != 0
    pairs, change = pairs[kept], change[kept]
    scenes, starts = np.unique(pairs // width, return_index=True)   # pairs ascend: each scene's are one run
    bounds, names = [*starts.tolist(), len(pairs)], ITEMS.names
    return {slots.scenes[s]: Counter(dict(zip(map(names.__getitem__, (pairs[a:b] % width).tolist()),
                                              change[a:b].tolist())))
            for s, a, b in zip(scenes.tolist(), bounds[:-1], bounds[1:])}
