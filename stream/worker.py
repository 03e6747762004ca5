"""The live worker: a thin Faust shell around the same micro-batch step that replay runs.

    clicks --take_events--> decode (bad -> clicks-dlq) --apply_batch--> windows (changelog) --encode--> user-interests

A micro-batch is acked (so its offsets can be committed) only after its changelog writes, dead letters and output
records are acknowledged by the broker: nothing a commit covers can be lost, and whatever is re-delivered after a
crash joins into the windows without effect (the lattice, see state.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import TP as TP_

from index import IndexSpec, ItemIndex
from model.infer import InterestEncoder

from .broker import bootstrap_servers
from .catalog import CatalogFollower
from .config import StreamConfig
from .events import Event, Rejection, decode
from .pipeline import apply_batch, interest_records
from .metrics import WorkerMetrics
from .state import ChangelogStore
from .web import register as register_web

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    broker: str                          # kafka://host:port[,host:port]
    app_id: str = "scenestream"
    clicks_topic: str = "clicks"
    dlq_topic: str = "clicks-dlq"
    output_topic: str = "user-interests"
    changelog_topic: str = ""            # default: <app_id>-state-changelog
    partitions: int = 4                  # used when the worker creates the topics
    batch_max: int = 1000                # events per micro-batch
    batch_wait: float = 0.2              # seconds to wait for a micro-batch to fill
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    recovery: str = "fence"
    canonical_url: str = ""              # how other workers reach this one's API (forwarding); default from host
    catalog_topic: str = "item-catalog"  # live catalog updates (stream/catalog.py), read in full by every worker
    index_kind: str = "auto"             # index/spec.py: exact up to 100k items, else the measured ANN default
    index_path: str = ""                 # load a saved index (`scenestream index build`) instead of building one

    @property
    def url(self) -> str:
        if self.canonical_url:
            return self.canonical_url
        host = socket.gethostname() if self.web_host in ("0.0.0.0", "::", "") else self.web_host
        return f"http://{host}:{self.web_port}"

    @property
    def bootstrap(self) -> str:
        return bootstrap_servers(self.broker)

    @property
    def changelog(self) -> str:
        return self.changelog_topic or f"{self.app_id}-state-changelog"


class InterestService:
    """Everything the agent does with one micro-batch, kept out of Faust so it reads top to bottom."""

    def __init__(self, cfg: WorkerConfig, encoder: InterestEncoder, index: Optional[ItemIndex] = None):
        self.cfg = cfg
        self.encoder = encoder
        self.config = StreamConfig(scenes=encoder.scenes, actions=encoder.ckpt.actions, window=encoder.window)
        self.store = ChangelogStore(cfg.bootstrap, cfg.changelog, encoder.window, cfg.recovery)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")  # keeps the loop responsive
        self.counts = {"events": 0, "invalid": 0, "late_dropped": 0, "batches": 0, "published": 0, "reread": 0}
        self.invalid_by_reason: dict[str, int] = {}
        self.last_batch_at: Optional[float] = None
        self.metrics = WorkerMetrics()
        self.index = index if index is not None else open_index(cfg, encoder)
        loop_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog")
        self.catalog = CatalogFollower(
            cfg.bootstrap, cfg.catalog_topic, self.index, encoder.scenes, self.index.dim,
            count=lambda outcome, n: self.metrics.catalog.labels(outcome).inc(n),
            run_blocking=lambda f, *a: asyncio.get_running_loop().run_in_executor(loop_pool, f, *a))
        self.popularity = {s: Counter() for s in encoder.scenes}   # events seen per item, for the fallback
        self.latest: dict[str, tuple[dict, float]] = {}             # user -> (newest published record, applied at)
        self.assigned: set[int] = set()

    async def handle(self, messages) -> None:
        """messages: one micro-batch of Kafka messages (.topic .partition .offset .key .value)."""
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
            for e in events:
                self.popularity[e.scene][e.item_id] += 1
            producer = self.store.producer
            for rec in records:
                sends.append(await producer.send(self.cfg.output_topic, json.dumps(rec).encode(),
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
        self.last_batch_at = now

    def partition_of(self, user: str) -> Optional[int]:
        for p, users in self.store.partitions.items():
            if user in users:
                return p
        return None

    async def user_record(self, user: str) -> Optional[tuple[dict, Optional[float]]]:
        """The user's current record and when it was applied here (None after a restart until touched again)."""
        hit = self.latest.get(user)
        if hit is not None:
            return hit
        p = self.partition_of(user)
        if p is None:
            return None
        state = {user: self.store.get(p, user)}
        records = await asyncio.get_running_loop().run_in_executor(self.pool, interest_records, self.encoder, state)
        return records[0], None

    def seen(self, user: str, scene: Optional[str]) -> set[str]:
        p = self.partition_of(user)
        state = self.store.get(p, user) if p is not None else None
        if not state:
            return set()
        return {e.item_id for s, w in state.items() if scene in (None, s) for e in w}

    async def recover(self, partitions) -> None:
        await self.store.start()
        for p in sorted(partitions):
            await self.ensure(p)

    async def ensure(self, partition: int) -> None:
        if await self.store.ensure(partition):   # recovered windows seed the popularity fallback
            for state in self.store.partitions[partition].values():
                for w in state.values():
                    for e in w:
                        self.popularity[e.scene][e.item_id] += 1

    @property
    def ready(self) -> bool:
        return (bool(self.assigned) and all(p in self.store.partitions for p in self.assigned)
                and self.catalog.caught_up)

    async def read_range(self, topic: str, partition: int, first: int, last: int) -> list:
        """Messages first..last of one partition, read directly (not through the consumer group)."""
        tp = TopicPartition(topic, partition)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.cfg.bootstrap, enable_auto_commit=False,
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
        self.invalid_by_reason[rejection.reason] = self.invalid_by_reason.get(rejection.reason, 0) + 1
        value = json.dumps({"reason": rejection.reason, "detail": rejection.detail,
                            "topic": m.topic, "partition": m.partition, "offset": m.offset,
                            "raw": (m.value or b"").decode("latin-1")}).encode()
        return await self.store.producer.send(self.cfg.dlq_topic, value, key=m.key)


def open_index(cfg: WorkerConfig, encoder: InterestEncoder) -> ItemIndex:
    """The saved index at cfg.index_path (refused unless built for this model), else one built from the model."""
    if cfg.index_path:
        return ItemIndex.load(cfg.index_path, encoder.version)
    return ItemIndex.build(*encoder.item_vectors(), spec=IndexSpec(kind=cfg.index_kind))


def make_app(cfg: WorkerConfig, encoder: InterestEncoder, index: Optional[ItemIndex] = None
             ) -> tuple[faust.App, InterestService]:
    # Settings found by measurement (BENCHMARKS.md, bench/startup.py): with Faust's default session (60 s) and
    # rebalance (60 s) timeouts the first group join on the embedded broker took ~32 s; with 6 s / 10 s and a 1 s
    # heartbeat it takes ~4.7 s, and a restarted worker does not wait a minute for its dead predecessor's session.
    # topic_disable_leader only saves a topic (it does not change the join time).
    app = faust.App(
        cfg.app_id, broker=cfg.broker, store="memory://", autodiscover=False,
        topic_partitions=cfg.partitions, topic_disable_leader=True,
        consumer_auto_offset_reset="earliest", producer_acks=-1,
        broker_session_timeout=6.0, broker_heartbeat_interval=1.0, broker_rebalance_timeout=10.0,
        broker_commit_interval=1.0, stream_wait_empty=False,
        web_host=cfg.web_host, web_port=cfg.web_port, web_bind=cfg.web_host, canonical_url=cfg.url,
    )
    service = InterestService(cfg, encoder, index)
    clicks = app.topic(cfg.clicks_topic, key_serializer="raw", value_serializer="raw",
                       partitions=cfg.partitions)
    app.topic(cfg.dlq_topic, partitions=cfg.partitions)
    app.topic(cfg.output_topic, partitions=cfg.partitions)

    @app.agent(clicks, name="interests")
    async def interests(stream):
        # take_events (not take): Faust acks these events only when this loop asks for the next batch, i.e. after
        # handle() has made the batch's effects durable. State is not a Faust Table, so no table write happens
        # "outside of stream iteration".
        async for batch in stream.take_events(cfg.batch_max, within=cfg.batch_wait):
            try:
                await service.handle([ev.message for ev in batch])
            except asyncio.CancelledError:
                raise
            except Exception:  # crash-only: nothing of this batch is acked; a restart re-reads it
                log.exception("micro-batch failed; exiting so that a restart recovers from durable state")
                logging.shutdown()
                os._exit(70)

    @app.on_partitions_revoked.connect
    async def on_revoked(app, revoked, **kwargs):
        gone = {tp.partition for tp in revoked if tp.topic == cfg.clicks_topic}
        for p in gone:
            for user in service.store.partitions.get(p, {}):
                service.latest.pop(user, None)
        service.assigned -= gone
        service.store.forget(gone)

    @app.on_partitions_assigned.connect
    async def on_assigned(app, assigned, **kwargs):
        # recover eagerly so /readyz can say "recovered" before the first event arrives (the agent would anyway)
        service.assigned = {tp.partition for tp in assigned if tp.topic == cfg.clicks_topic}
        app.add_future(service.recover(service.assigned))

    register_web(app, service, clicks)

    @app.task
    async def declare_topics():
        for topic in (cfg.changelog, cfg.output_topic, cfg.dlq_topic, cfg.catalog_topic):
            await app.topic(topic, partitions=cfg.partitions).maybe_declare()
        log.info("worker %s consuming %s on %s", cfg.app_id, cfg.clicks_topic, cfg.broker)

    @app.task
    async def follow_catalog():
        try:
            await service.catalog.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # crash-only, as the agent: a restart rebuilds the index from the catalog topic
            log.exception("catalog follower failed; exiting so that a restart rebuilds the index")
            logging.shutdown()
            os._exit(70)

    @app.timer(interval=5.0)
    async def report():
        for p in service.assigned:
            try:
                end = app.consumer.highwater(TP_(cfg.clicks_topic, p))
            except Exception:
                continue
            if end is not None:
                service.metrics.lag.labels(str(p)).set(max(0, end - 1 - service.store.applied.get(p, -1)))
        log.info("events %(events)d invalid %(invalid)d late %(late_dropped)d published %(published)d "
                 "batches %(batches)d re-read %(reread)d", service.counts)

    app.service = service  # for the web views of later issues
    return app, service


def run_worker(cfg: WorkerConfig, encoder: InterestEncoder, loglevel: str = "info",
               index: Optional[ItemIndex] = None) -> int:
    app, service = make_app(cfg, encoder, index)
    worker = faust.Worker(app, loglevel=loglevel, console_port=0)
    worker.execute_from_commandline()
    return 0

