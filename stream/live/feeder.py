"""The clicks feeder: micro-batches straight from an aiokafka consumer in the worker's consumer group.

Faust hands a stream its records one at a time: ~65 µs of CPU each on this 2-core machine before any work (four
tasks and eleven loop callbacks per message, hard-coded in its consumer; no setting removes them:
bench/faust_ceiling.md), and its take_events waits out --batch-wait whenever fewer than --batch-max events are
buffered. The feeder asks the consumer for whatever it has fetched (getmany), so a micro-batch closes as soon as
the consumer has nothing more buffered, waiting at most --batch-wait for the first record; and it costs nothing per
record beyond decoding. It submits the next batch while the one before is still becoming durable (at most `depth`
in flight; MicroBatchService.submit keeps them in order). Everything else is as under Faust: the same service, the
same durability order (outputs, then state and offset marker, then the group's committed offset), recovery at
assignment, the Faust app around it for the web server, timers and lifecycle.

Group semantics are Kafka's own: a member of group --app-id, partitions spread round-robin over the members,
offsets committed after each batch is durable. Each member also sends its API URL in its group metadata and the
group leader hands every member the partition -> URL table (`OwnersAssignor`), so any worker can forward an API
request to the owner of the user's partition, as Faust's own assignor did.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Mapping, Optional

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.errors import CommitFailedError, IllegalStateError

from .config import HEARTBEAT_INTERVAL_S, REBALANCE_TIMEOUT_S, SESSION_TIMEOUT_S, WorkerConfig
from .kafka_security import NO_SECURITY
from .record_batches import key_partitions
from .record import Record
from .service import MicroBatchService
from .undecodable import getmany_past_undecodable

log = logging.getLogger(__name__)


class OwnersAssignor(RoundRobinPartitionAssignor):
    """aiokafka's round-robin assignment, plus the partition -> API URL table for every member."""
    name = "scenestream-roundrobin"

    def __init__(self, url: str):
        self.url = url
        self.owners: dict[tuple[str, int], str] = {}

    def metadata(self, topics) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, list(topics), self.url.encode())

    def assign(self, cluster, members) -> dict[str, ConsumerProtocolMemberAssignment]:
        plain = super().assign(cluster, members)
        table = [[topic, p, members[m].user_data.decode()] for m, a in plain.items() for topic, ps in a.assignment
                 for p in ps]
        blob = orjson.dumps(table)
        return {m: ConsumerProtocolMemberAssignment(self.version, a.assignment, blob) for m, a in plain.items()}

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.owners = {(t, p): url for t, p, url in orjson.loads(assignment.user_data or b"[]")}


class _Rebalance(ConsumerRebalanceListener):
    """aiokafka awaits these during a rebalance: revoked partitions are dropped before anyone else may own them;
    assigned ones are paused, recovered in the background and read from right after their durable markers."""

    def __init__(self, feeder: "ClicksFeeder"):
        self.feeder = feeder

    async def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self.feeder.positions.pop(tp, None)
        self.feeder.service.revoke({tp.partition for tp in revoked if tp.topic == self.feeder.topic})

    async def on_partitions_assigned(self, assigned) -> None:
        await self.feeder.on_assigned({tp.partition for tp in assigned if tp.topic == self.feeder.topic})


class ClicksFeeder:
    def __init__(self, service: MicroBatchService, bootstrap: str, topic: str, group: str, url: str,
                 batch_max: int, batch_wait: float, fetch_wait: float = WorkerConfig.fetch_wait, depth: int = 2,
                 isolation_level: str = WorkerConfig.isolation_level, security: Mapping[str, Any] = NO_SECURITY):
        self.service, self.topic, self.group = service, topic, group
        # micro-batches in flight (applied in memory, not yet durable): 2 lets the next batch be read, applied and
        # encoded while the one before waits on the broker; more would only queue batches waiting to send, while the
        # consumer's buffer makes the next batch bigger and cheaper per event
        self.depth = depth
        self.batch_max, self.batch_wait = batch_max, batch_wait
        self.assignor = OwnersAssignor(url)
        # fetch_wait: how long the broker may hold an empty fetch; short, so a record that arrives while the
        # consumer waits is seen soon (Kafka answers a fetch as soon as there is data; the embedded broker looks again
        # a few times within the wait), yet longer than a fetch takes the embedded broker, which answers a fetch
        # that outlasts the wait with nothing: at 10 ms a consumer of a long partition stalled (BENCHMARKS.md, "Soak")
        self._settings = dict(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
            partition_assignment_strategy=(self.assignor,), session_timeout_ms=int(SESSION_TIMEOUT_S * 1000),
            heartbeat_interval_ms=int(HEARTBEAT_INTERVAL_S * 1000), rebalance_timeout_ms=int(REBALANCE_TIMEOUT_S * 1000),
            fetch_max_wait_ms=int(fetch_wait * 1000), max_poll_records=batch_max, isolation_level=isolation_level,
            **security)
        self.consumer: Optional[AIOKafkaConsumer] = None   # made in run(): aiokafka wants the running loop
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._done.set()   # nothing in flight until run() starts
        self._to_commit: dict[TopicPartition, int] = {}
        self._committer: Optional[asyncio.Future] = None
        self._recoveries: set[asyncio.Future] = set()   # partitions being recovered after an assignment
        self.positions: dict[TopicPartition, int] = {}  # next offset to hand over, per partition read
        self.answered = 0.0   # time.time() of the broker's last answer on the feeder's path: assignment, batch acks

    async def on_assigned(self, partitions: set[int]) -> None:
        """Pause the partitions and recover them in the background. aiokafka awaits this callback inside the
        rebalance, and a member that has not rejoined within the rebalance timeout is dropped from the group: a
        recovery longer than that (a big changelog, a loaded machine) made every rebalance end in the next one, each
        starting the recoveries over (seen under bench/chaos.py's kills: 30+ generations, no progress)."""
        self.answered = time.time()   # the group's answer; the partitions' first fetches are yet to come
        self.consumer.pause(*(TopicPartition(self.topic, p) for p in partitions))
        self._recoveries.add(asyncio.ensure_future(self._recover(partitions)))

    async def _recover(self, partitions: set[int]) -> None:
        """Recover the partitions (service.assign; one revoked meanwhile is dropped by its epoch), then read each
        still held from right after its durable marker."""
        await self.service.assign(partitions)
        held = self.consumer.assignment()
        for p in sorted(partitions):
            tp = TopicPartition(self.topic, p)
            if tp in held and p in self.service.store.applied:
                self.positions[tp] = self.service.store.applied[p] + 1
                self.consumer.seek(tp, self.positions[tp])
                self.consumer.resume(tp)

    def _check_recoveries(self) -> None:
        """Raise what a failed background recovery raised (crash-only: a restart recovers again)."""
        for task in [t for t in self._recoveries if t.done()]:
            self._recoveries.discard(task)
            task.result()

    async def run(self) -> None:
        """Consume until stop(): one micro-batch per getmany, submitted to the service while earlier ones are still
        becoming durable (at most `depth` in flight), its offsets committed once it is durable."""
        self._done.clear()
        self.consumer = AIOKafkaConsumer(**self._settings)
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        in_flight: deque[tuple[asyncio.Future, dict[TopicPartition, int]]] = deque()
        try:
            await self.consumer.start()
            while not self._stopping.is_set():
                self._check_recoveries()
                while in_flight and (in_flight[0][0].done() or len(in_flight) >= self.depth):
                    durable, offsets = in_flight.popleft()
                    await durable
                    self._commit_soon(offsets)
                got, bad = await getmany_past_undecodable(self.consumer, self.positions, max_records=self.batch_max,
                                                          timeout_ms=int(self.batch_wait * 1000))
                records = [Record.from_aiokafka(m) for msgs in got.values() for m in msgs]
                for batch in bad:   # a dead letter of its own, and the partition goes on after it
                    log.warning("%s; it goes to the dead-letter topic (reason undecodable_batch) and %s[%d] is read "
                                "on from offset %d", batch.describe(), batch.topic, batch.partition, batch.last + 1)
                    records.append(Record.of_batch(batch))
                if records:
                    read = [tp for tp, msgs in got.items() if msgs]
                    read += [TopicPartition(b.topic, b.partition) for b in bad]
                    offsets = {tp: self.positions[tp] for tp in read}
                    in_flight.append((await self.service.submit(records), offsets))
            while in_flight:
                durable, offsets = in_flight.popleft()
                await durable
                self._commit_soon(offsets)
            if self._committer is not None:
                await self._committer
        finally:
            for task in self._recoveries:
                task.cancel()
            self._done.set()

    def _commit_soon(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit in the background, one request at a time with the newest offsets of every batch durable by then:
        the committed offset is for lag tools and a new owner's first fetch (recovery starts from the marker), so
        it need not hold up the next batch."""
        self.answered = time.time()   # the batch is durable: the broker acknowledged its records
        self._to_commit.update(offsets)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit_pending())

    async def _commit_pending(self) -> None:
        while self._to_commit:
            offsets, self._to_commit = self._to_commit, {}
            try:
                await self._commit(offsets)
            except Exception:   # noqa: BLE001 - the next durable batch commits again; never worth a crash
                log.warning("offsets not committed", exc_info=True)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """The group's committed offsets follow the durable markers (for lag tools and a later owner's first
        fetch; recovery itself starts from the marker). A rebalance may have taken a partition meanwhile: its new
        owner commits from there, so a refused commit is no error."""
        owned = {tp: o for tp, o in offsets.items() if tp in self.consumer.assignment()}
        if not owned:
            return
        try:
            await self.consumer.commit(owned)
        except (CommitFailedError, IllegalStateError) as exc:
            log.info("offsets not committed (a rebalance is under way): %s", exc)

    async def stop(self) -> None:
        """After the batch in flight is durable and committed; leaves the group."""
        self._stopping.set()
        try:
            await asyncio.wait_for(self._done.wait(), timeout=self.batch_wait + 60)
        except asyncio.TimeoutError:
            log.warning("the clicks feeder did not finish its batch within a minute; stopping anyway")
        if self.consumer is not None:
            await self.consumer.stop()

    def answered_at(self) -> Optional[float]:
        """When the broker last answered the feeder (time.time()): a fetch response for a held partition (aiokafka
        notes one per partition, empty or not), an assignment, a durable batch; None while it holds no partition."""
        tps = self.consumer.assignment() if self.consumer else None
        if not tps:
            return None
        return max([self.answered, *(t / 1000 for t in map(self.consumer.last_poll_timestamp, tps) if t)])

    def highwater(self, partition: int) -> Optional[int]:
        return self.consumer.highwater(TopicPartition(self.topic, partition)) if self.consumer else None

    def owner_url(self, key: bytes) -> Optional[str]:
        """The API URL of the worker that owns the key's partition (None: unknown, e.g. during a rebalance)."""
        partitions = self.consumer.partitions_for_topic(self.topic) if self.consumer else None
        if not partitions:
            return None
        p = key_partitions([key], len(partitions))[0]   # as the producers of clicks partition it
        return self.assignor.owners.get((self.topic, p))
