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
  offset, says where durable state ends: Faust was seen committing offsets of events it had buffered but not
  processed when stopped by SIGTERM. After recovery the worker re-reads any gap between the marker and the first
  offset Faust delivers; whatever is read twice joins in harmlessly.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Iterable, Mapping, Optional

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from .core.events import Event
from .core.window import EMPTY, UserState, Window, apply_window
from .kafka_security import NO_SECURITY

log = logging.getLogger(__name__)

FENCE_KEY = b"\x00fence"
MARKER_KEY = b"\x00applied"
RECOVERY_DEADLINE_S = 300


# The changelog topic keeps every user's newest record forever: compacted by key, never deleted by age (a user idle
# for a week must not lose their windows, nor an offset marker expire). Created so by `ensure_topic`.
CHANGELOG_CONFIG = {"cleanup.policy": "compact", "retention.ms": "-1"}


SCENE_SEPARATOR = b"\x1f"   # a control character: never part of a valid id (core/events.py: check_id)


def state_key(user: str, scene: str) -> bytes:
    """The changelog key of one (user, scene) window: a micro-batch rewrites only the windows it changed, and
    compaction keeps each window's newest record."""
    return user.encode() + SCENE_SEPARATOR + scene.encode()


def encode_state(state: UserState) -> bytes:
    """A changelog value, {scene: rows} (one window, as the worker writes it; whole states read back the same):
    compact JSON in UTF-8 (no ASCII escapes), whose size StreamConfig.state_record_bound bounds. Ids by name, so
    the log does not depend on any process's tables."""
    return orjson.dumps({s: [[e.ts, e.event_id, e.item_id, e.action] for e in w] for s, w in state.items()})


def decode_state(user: str, raw: bytes, length: int) -> UserState:
    """A changelog value as windows, each the join of its rows (so a record that is out of order, has duplicates
    or is longer than the window still reads as a window)."""
    data = orjson.loads(raw)
    return {s: apply_window(EMPTY, [Event(eid, user, item, s, action, ts) for ts, eid, item, action in rows],
                            length)[0]
            for s, rows in data.items() if rows}


def join_states(a: Optional[UserState], b: UserState, length: int) -> UserState:
    """Lattice join of two states of one user (what recovery does with every changelog record)."""
    merged = dict(a or {})
    for scene, w in b.items():
        have = merged.get(scene)
        merged[scene] = w if not have and len(w) <= length else apply_window(have or EMPTY, w.events(), length)[0]
    return merged


async def ensure_topic(bootstrap: str, topic: str, partitions: int, replication_factor: int,
                       config: dict[str, str], security: Mapping[str, Any] = NO_SECURITY) -> list[str]:
    """Create the topic with these partitions, replication factor and configs. If it exists already, change
    nothing and return what differs, one sentence each, for the operator (checked with DescribeTopics and
    DescribeConfigs, which the embedded Tansu answers too)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security)
    await admin.start()
    try:
        created = await admin.create_topics([NewTopic(topic, partitions, replication_factor, topic_configs=config)])
        code = created.topic_errors[0][1]
        if code == 0:
            log.info("created topic %s: %d partitions, replication factor %d, %s", topic, partitions,
                     replication_factor, config)
            return []
        if code != 36:   # TOPIC_ALREADY_EXISTS
            raise RuntimeError(f"could not create topic {topic}: {created.topic_errors[0]}")
        problems = []
        (meta,) = await admin.describe_topics([topic])
        have = len(meta["partitions"])
        if have < partitions:
            problems.append(f"topic {topic} has {have} partitions, fewer than the {partitions} it needs")
        replicas = min((len(p["replicas"]) for p in meta["partitions"]), default=0)
        if replicas < replication_factor:
            problems.append(f"topic {topic} has replication factor {replicas}, below {replication_factor}")
        (described,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        current = {entry[0]: entry[1] for entry in described.resources[0][4]}
        for name, want in config.items():
            if current.get(name) != want:
                problems.append(f"topic {topic} has {name}={current.get(name, '(broker default)')}, "
                                f"it should be {want}")
        return problems
    finally:
        await admin.close()


async def partition_count(bootstrap: str, topic: str, security: Mapping[str, Any] = NO_SECURITY) -> Optional[int]:
    """Partitions of an existing topic; None when it does not exist (yet)."""
    from aiokafka.admin import AIOKafkaAdminClient
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security)
    await admin.start()
    try:
        (meta,) = await admin.describe_topics([topic])
        return len(meta["partitions"]) if meta["error_code"] == 0 and meta["partitions"] else None
    finally:
        await admin.close()


class ChangelogStore:
    """state[partition][user] -> UserState, recovered lazily per partition before its first event is applied."""

    def __init__(self, bootstrap: str, topic: str, window: int, security: Mapping[str, Any] = NO_SECURITY):
        self.bootstrap, self.topic, self.window, self.security = bootstrap, topic, window, security
        self.partitions: dict[int, dict[str, UserState]] = {}
        self.applied: dict[int, int] = {}   # source partition -> highest source offset applied in memory (-1: none)
        self.durable: dict[int, int] = {}   # source partition -> highest source offset whose marker was sent
        self.producer: Optional[AIOKafkaProducer] = None
        self._locks: dict[int, asyncio.Lock] = {}

    async def start(self) -> None:
        if self.producer is not None:
            return
        # linger 0: a micro-batch queues all its sends before it first yields, so they leave in one request anyway;
        # any linger would only add to every batch's two waits on the broker
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=0,
                                         max_batch_size=1 << 20, **self.security)
        await self.producer.start()

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    def forget(self, partitions: Iterable[int]) -> None:
        """A revoked partition's state may change elsewhere: drop it; it is recovered again if it comes back."""
        for p in partitions:
            self.partitions.pop(p, None)
            self.applied.pop(p, None)
            self.durable.pop(p, None)

    def get(self, partition: int, user: str) -> Optional[UserState]:
        return self.partitions[partition].get(user)

    async def ensure(self, partition: int) -> bool:
        """Recover the partition unless it is in memory; True when this call recovered it."""
        lock = self._locks.setdefault(partition, asyncio.Lock())   # the agent and readiness may both ask
        async with lock:
            if partition in self.partitions:
                return False
            self.partitions[partition], marker = await self.recover(partition)
            self.applied[partition] = self.durable[partition] = marker
            return True

    async def recover(self, partition: int) -> tuple[dict[str, UserState], int]:
        """Join every user record of the partition as it streams in (memory holds the states, never the log)."""
        state: dict[str, UserState] = {}
        applied, n = -1, 0
        async for m in self._read_changelog(partition):
            if m.key == MARKER_KEY:
                applied = max(applied, int(m.value))
            elif m.key and m.key != FENCE_KEY and m.value:
                user = m.key.split(SCENE_SEPARATOR, 1)[0].decode()   # or by user alone (whole states)
                state[user] = join_states(state.get(user), decode_state(user, m.value, self.window), self.window)
                n += 1
        log.info("recovered partition %d of %s: %d records, %d users, applied up to offset %d", partition,
                 self.topic, n, len(state), applied)
        return state, applied

    async def _read_changelog(self, partition: int) -> AsyncIterator:
        """Every record of the changelog partition up to a fence written now, whose offset the broker acknowledged:
        the log's end as the broker itself says on produce, never its reported high watermark."""
        tp = TopicPartition(self.topic, partition)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20,
                                    **self.security)
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            last = (await self.producer.send_and_wait(self.topic, b"", key=FENCE_KEY, partition=partition)).offset
            deadline = time.monotonic() + RECOVERY_DEADLINE_S
            while await consumer.position(tp) <= last:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"recovery of {self.topic}[{partition}] did not reach offset {last} within "
                                       f"{RECOVERY_DEADLINE_S} s")
                for m in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                    if m.offset <= last:
                        yield m
        finally:
            await consumer.stop()

    def put(self, partition: int, updates: dict[str, UserState], applied_offset: int) -> None:
        """Apply updates in memory (the caller checked that it owns the partition): memory may run ahead of the
        changelog, never the other way round; a crash in between loses only what the marker says to redo."""
        self.partitions[partition].update(updates)
        self.applied[partition] = max(applied_offset, self.applied.get(partition, -1))

    async def send(self, partition: int, windows: Iterable[tuple[str, str, Window]], applied_offset: int) -> list:
        """Send the changed (user, scene, window)s, then the offset marker, to the changelog partition; returns
        futures the caller awaits before the batch counts as done."""
        futures = [await self.producer.send(self.topic, encode_state({scene: w}), key=state_key(user, scene),
                                            partition=partition) for user, scene, w in windows]
        if applied_offset > self.durable.get(partition, -1):
            self.durable[partition] = applied_offset
            futures.append(await self.producer.send(self.topic, str(applied_offset).encode(), key=MARKER_KEY,
                                                    partition=partition))
        return futures

    async def write(self, partition: int, updates: dict[str, UserState], applied_offset: int) -> list:
        """put, then send every window of the updated users."""
        self.put(partition, updates, applied_offset)
        return await self.send(partition, [(u, s, w) for u, st in updates.items() for s, w in st.items()],
                               applied_offset)
