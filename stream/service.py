"""The micro-batch service: what the live worker does with one batch of Kafka messages, outside Faust.

    messages --decode--> events (bad -> dead letters) --apply_batch--> windows (changelog) --encode--> records

A batch counts as done (so Faust may commit its offsets) only after its changelog writes, dead letters and output
records are acknowledged by the broker: nothing a commit covers can be lost, and whatever is re-delivered after a
crash joins into the windows without effect (the lattice, docs/design.md). The service also keeps what serving
reads: each owned user's newest record and the popularity of items in the windows it holds.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from aiokafka import AIOKafkaConsumer, TopicPartition

from scenestream.model.infer import InterestEncoder

from .core.batch import apply_batch, interest_records
from .core.config import StreamConfig
from .core.events import Event, Rejection, decode
from .core.popularity import Popularity
from .core.window import UserState
from .metrics import WorkerMetrics
from .state import ChangelogStore

log = logging.getLogger(__name__)


class MicroBatchService:
    def __init__(self, encoder: InterestEncoder, store: ChangelogStore, output_topic: str, dlq_topic: str,
                 bootstrap: str, metrics: Optional[WorkerMetrics] = None):
        self.encoder, self.store = encoder, store
        self.output_topic, self.dlq_topic, self.bootstrap = output_topic, dlq_topic, bootstrap
        self.config = StreamConfig(scenes=encoder.scenes, actions=encoder.ckpt.actions, window=encoder.window)
        self.metrics = metrics or WorkerMetrics()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")  # keeps the loop responsive
        self.counts = {"events": 0, "invalid": 0, "late_dropped": 0, "batches": 0, "published": 0, "reread": 0}
        self.popularity = Popularity()                              # events seen per item, for the fallback
        self.latest: dict[str, tuple[dict, float]] = {}             # user -> (newest published record, applied at)
        self.assigned: set[int] = set()

    async def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        await self.store.stop()

    async def handle(self, messages) -> None:
        """messages: one micro-batch of Kafka messages (.topic .partition .offset .key .value .timestamp)."""
        if self.store.producer is None:
            await self.store.start()
        by_partition: dict[int, list] = {}
        for m in messages:
            by_partition.setdefault(m.partition, []).append(m)
        sends, published = [], []
        loop = asyncio.get_running_loop()
        for partition, msgs in sorted(by_partition.items()):
            await self.ensure(partition)
            msgs.sort(key=lambda m: m.offset)
            applied = self.store.applied[partition]
            if msgs[0].offset > applied + 1:   # committed by the group but never durably applied: read it again
                gap = await self.read_range(msgs[0].topic, partition, applied + 1, msgs[0].offset - 1)
                log.info("partition %d: re-reading %d events between the durable marker %d and offset %d",
                         partition, len(gap), applied, msgs[0].offset)
                self.counts["reread"] += len(gap)
                msgs = gap + msgs
            events: list[Event] = []
            rejected: list = []
            for m in msgs:
                got = decode(m.value, self.config)
                if isinstance(got, Rejection):
                    rejected.append((m, got))
                else:
                    events.append(got)
            # A rebalance may revoke the partition at any await above or below; its new owner redoes this work
            # from the changelog marker, so we drop it rather than apply to (or write) state we no longer own.
            if partition not in self.store.partitions:
                log.info("partition %d was revoked during a micro-batch; leaving it to its new owner", partition)
                continue
            outcome = apply_batch(lambda u: self.store.get(partition, u), events, self.encoder.window)
            records = []
            if outcome.updates:
                t0 = time.perf_counter()
                records = await loop.run_in_executor(self.pool, interest_records, self.encoder, outcome.updates)
                self.metrics.encode_seconds.observe(time.perf_counter() - t0)
            if partition not in self.store.partitions:
                log.info("partition %d was revoked during a micro-batch; leaving it to its new owner", partition)
                continue
            sends += await self.store.write(partition, outcome.updates, msgs[-1].offset)
            for m, rejection in rejected:
                sends.append(await self.dead_letter(m, rejection))
            self.counts["late_dropped"] += outcome.late_dropped
            self.counts["events"] += len(events)
            self.metrics.events.inc(len(events))
            self.metrics.late.inc(outcome.late_dropped)
            self.popularity.add(events)
            producer = self.store.producer
            for rec in records:
                sends.append(await producer.send(self.output_topic, json.dumps(rec).encode(),
                                                 key=rec["user_id"].encode()))
            self.counts["published"] += len(records)
            published.extend(records)
        if sends:
            await asyncio.gather(*sends)   # durable before this batch counts as done
        now = time.time()
        for rec in published:
            self.latest[rec["user_id"]] = (rec, now)
        for m in messages:
            if m.timestamp and m.timestamp > 0:
                self.metrics.latency.observe(max(0.0, now - m.timestamp / 1000.0))
        self.metrics.batch_size.observe(len(messages))
        self.counts["batches"] += 1

    def partition_of(self, user: str) -> Optional[int]:
        for p, users in self.store.partitions.items():
            if user in users:
                return p
        return None

    def state_of(self, user: str) -> Optional[UserState]:
        p = self.partition_of(user)
        return self.store.get(p, user) if p is not None else None

    async def user_record(self, user: str) -> Optional[tuple[dict, Optional[float]]]:
        """The user's current record and when it was applied here (None after a restart until touched again)."""
        hit = self.latest.get(user)
        if hit is not None:
            return hit
        state = self.state_of(user)
        if state is None:
            return None
        records = await asyncio.get_running_loop().run_in_executor(self.pool, interest_records, self.encoder,
                                                                   {user: state})
        return records[0], None

    async def recover(self, partitions) -> None:
        await self.store.start()
        for p in sorted(partitions):
            await self.ensure(p)

    async def ensure(self, partition: int) -> None:
        if await self.store.ensure(partition):   # recovered windows seed the popularity fallback
            for state in self.store.partitions[partition].values():
                for w in state.values():
                    self.popularity.add(w)

    def revoke(self, partitions: set[int]) -> None:
        for p in partitions:
            for user in self.store.partitions.get(p, {}):
                self.latest.pop(user, None)
        self.assigned -= partitions
        self.store.forget(partitions)

    @property
    def recovered(self) -> bool:
        return bool(self.assigned) and all(p in self.store.partitions for p in self.assigned)

    async def read_range(self, topic: str, partition: int, first: int, last: int) -> list:
        """Messages first..last of one partition, read directly (not through the consumer group)."""
        tp = TopicPartition(topic, partition)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        out = []
        try:
            consumer.assign([tp])
            consumer.seek(tp, first)
            while not out or out[-1].offset < last:
                got = (await consumer.getmany(tp, timeout_ms=2000)).get(tp, [])
                if not got:
                    break
                out.extend(m for m in got if first <= m.offset <= last)
        finally:
            await consumer.stop()
        return out

    async def dead_letter(self, m, rejection: Rejection):
        self.counts["invalid"] += 1
        self.metrics.invalid.labels(rejection.reason).inc()
        value = json.dumps({"reason": rejection.reason, "detail": rejection.detail,
                            "topic": m.topic, "partition": m.partition, "offset": m.offset,
                            "raw": (m.value or b"").decode("latin-1")}).encode()
        return await self.store.producer.send(self.dlq_topic, value, key=m.key)
