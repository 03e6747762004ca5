"""The micro-batch service: what the live worker does with one batch of Kafka records, outside Faust.

    records --decode, key check--> events (bad -> dead letters) --join--> windows (slots) --encode--> vectors
            --> output records, changelog records, and the users' newest vectors for serving (a table by slot)

Order of durability, per batch: output records and dead letters first, then the new windows and the partition's
"applied up to" offset marker in the changelog, and only then does the feeder commit the batch's offsets
(stream/live/feeder.py). A crash anywhere
leaves either nothing durable (the batch is redone from the marker) or the outputs without the state (the batch is
redone, its outputs published again: at-least-once outputs, exactly-once state); never state that says "done" for
outputs that were lost. Whatever is re-delivered joins into the windows without effect (the lattice,
docs/design.md).

Batches are pipelined (`submit`): the next one is decoded, applied in memory and encoded while the one before
waits on the broker. Outputs go in batch order and states go in batch order: a batch publishes once the batch
before has its outputs acknowledged (that batch's state may still be on its way), and writes its state once its own
outputs are acknowledged and the batch before is durable. So state that says "done" still never comes before its
outputs, or before an earlier batch's state; a crash redoes every batch after the last durable marker, whose
outputs may have gone out already (published again: at-least-once). What this buys: a record reaches its readers
one acknowledgement sooner, not behind the batch before's changelog write. Memory may run ahead of the
changelog, never the other way round. The encode runs on the event loop's thread, not in a thread of its own: the
two shared the interpreter lock, each torch call gave it up and waited up to the 5 ms switch interval to get it
back from the busy loop, and a worker thread gained no parallelism for it (BENCHMARKS.md, "Encoding on the
loop"). So a request waits for a batch's encode (tens of milliseconds live, a few hundred on a backlog).

A partition can be revoked, and given back, at any await. Each assignment gets a new epoch; a batch writes only if
its partition's epoch is still the one it started under, else the new owner (maybe this worker again) redoes it.

The durable marker, not the group's committed offset, says where durable state ends: at assignment the consumer
is positioned right after it (stream/live/feeder.py), and a batch that starts past it first re-reads the gap.

The model in use is one immutable `Serving` bundle (encoder and item index, whose version is the encoder's),
replaced in one assignment by a model swap (stream/live/swap.py). A micro-batch takes the bundle once, when it starts
encoding, and a request once, when it starts, so neither ever mixes two models. Windows are raw events and stay;
a record published under another model is recomputed under the one in use when a request reads it.

The service also keeps what serving reads: each owned user's newest record, and the popularity of the items in the
windows it holds, per partition (so a re-delivery or a recovery never counts an event twice). It publishes each
partition's counts to the shared popularity topic when they changed, and follows that topic: the popular fallback
ranks the sum of every partition's latest counts, the same on every worker (docs/operations.md, "One popular list").
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from scenestream.index import ItemIndex
from scenestream.model.infer import InterestEncoder
from scenestream.model.slot_encoder import SlotEncoder

from ..core.config import StreamConfig
from ..core.events import Event, Rejection, check_key, decode
from ..core.output import encode_records, interest_records
from ..core.slot_step import SlotVectors, encode as encode_slots
from ..core.slots import SlotJoin
from ..core.vector_table import VectorTable
from ..core.window import UserState
from .config import WorkerConfig
from .heap import FrozenHeap
from .metrics import WorkerMetrics
from .reading import read_range
from .record import Record, dead_letter
from .record_batches import RecordBatches, key_partitions
from .shared_popularity import SharedPopularity
from .state import ChangelogStore, Written, item_deltas

log = logging.getLogger(__name__)


def _stamps_s(records: Sequence[Record]) -> np.ndarray:
    """The records' Kafka timestamps in seconds (those that have one): read once a batch, for both latencies."""
    stamps = np.fromiter((r.timestamp_ms for r in records), np.float64, len(records))
    return stamps[stamps > 0] / 1000.0


@dataclass(frozen=True)
class Serving:
    """The model in use: an encoder, its streaming encoder (with its cache of encoded windows) and the item index of
    its vectors (plus the catalog), swapped as one."""
    encoder: InterestEncoder
    index: Optional[ItemIndex] = None
    streamer: Optional[SlotEncoder] = None

    def __post_init__(self):
        if self.streamer is None:
            object.__setattr__(self, "streamer", SlotEncoder(self.encoder, self.encoder.cache_mb))

    @property
    def version(self) -> str:
        return self.encoder.version


@dataclass
class _Part:
    """One partition's share of a micro-batch, between being applied in memory and being made durable."""
    partition: int
    epoch: int
    last_offset: int                              # the offset marker to write
    events: int                                   # valid events
    rejected: list[tuple[Record, Rejection]]      # -> dead letters
    joined: SlotJoin                              # what changed in memory (joined.users: the users' slots)
    written: Written                              # what to write of it (cut when it was joined)


@dataclass
class _Batch:
    """A micro-batch applied in memory and encoded, nothing of it sent yet."""
    records: Sequence[Record]
    parts: list[_Part]
    vectors: Optional[SlotVectors]   # of every touched user (None: none)
    owners: np.ndarray               # their slots' versions when encoded
    names: list[str]                 # their user ids
    version: str                     # of the model that encoded them


class MicroBatchService:
    def __init__(self, encoder: InterestEncoder, store: ChangelogStore, output_topic: str, dlq_topic: str,
                 bootstrap: str, metrics: Optional[WorkerMetrics] = None,
                 max_clock_skew_s: float = WorkerConfig.max_clock_skew,
                 index: Optional[ItemIndex] = None, isolation_level: str = WorkerConfig.isolation_level,
                 output_format: str = WorkerConfig.output_format):
        self.model = Serving(encoder, index)   # replaced whole by a swap (`use`), never changed in place
        self.isolation_level = isolation_level   # of the gap re-read: as the feeder reads clicks
        self.store = store
        self.output_format = output_format
        self.output_topic, self.dlq_topic, self.bootstrap = output_topic, dlq_topic, bootstrap
        self.config = StreamConfig(scenes=encoder.scenes, actions=encoder.ckpt.actions, window=encoder.window)
        self.metrics = metrics or WorkerMetrics()
        self.max_clock_skew_ms = int(max_clock_skew_s * 1000)
        self.counts = {"events": 0, "invalid": 0, "late_dropped": 0, "batches": 0, "published": 0, "reread": 0}
        # the items in the windows held, and every worker's: the store's cluster and settings
        self.popularity = SharedPopularity(self.config.scenes, bootstrap, store.security)
        self.latest = VectorTable(encoder.scenes, encoder.model.cfg.d_model)   # by user slot: newest vectors
        self.assigned: set[int] = set()
        self.epoch: dict[int, int] = {}                             # partition -> assignment number
        self._epochs = 0
        self._tail: Optional[asyncio.Future[None]] = None          # the last batch submitted, until durable
        self._published: Optional[asyncio.Future[None]] = None     # its outputs, until acknowledged
        self.heap = FrozenHeap()

    @property
    def encoder(self) -> InterestEncoder:
        return self.model.encoder

    def use(self, model: Serving) -> Serving:
        """Serve `model` from now on (one assignment: a batch or request that already took the old bundle finishes
        with it); returns the old one. The caller has checked that its scenes, actions and window are ours."""
        old, self.model = self.model, model
        return old

    # ---- ownership ----------------------------------------------------------------------------------------------

    async def assign(self, partitions: set[int]) -> None:
        """The group gave us these partitions: new epochs for the ones that are new, and their state recovered
        (the consumer then reads each from right after its durable marker)."""
        for p in partitions - self.assigned:
            self._epochs += 1
            self.epoch[p] = self._epochs
        self.assigned = set(partitions)
        await self.store.start()
        for p in sorted(partitions):
            if p in self.epoch:
                await self.ensure(p, self.epoch[p])

    def revoke(self, partitions: set[int]) -> None:
        for p in partitions:   # their users leave the slots, and so their rows of `latest`
            self.popularity.release(p)
            self.epoch.pop(p, None)
        self.assigned -= partitions
        self.store.forget(partitions)

    def owns(self, partition: int, epoch: int) -> bool:
        return self.epoch.get(partition) == epoch and partition in self.store.held

    async def ensure(self, partition: int, epoch: int) -> bool:
        """Recover the partition's state unless it is in memory; whether we still own it (under this epoch)."""
        if await self.store.ensure(partition):
            if self.epoch.get(partition) != epoch:   # revoked while recovering: what we read may change elsewhere
                self.store.forget({partition})
                return False
            self.popularity.hold(partition, self.store.popularity(partition))   # follows the windows held
        return self.owns(partition, epoch)

    @property
    def recovered(self) -> bool:
        return bool(self.assigned) and all(p in self.store.held for p in self.assigned)

    async def stop(self) -> None:
        """After the batches in flight (if any) are durable: called once the consumer has stopped."""
        try:
            await self.drain()
        except Exception:   # noqa: BLE001 - the batch's own task has raised it to whoever awaited it
            log.warning("the last micro-batch failed before the worker stopped", exc_info=True)
        await self.store.stop()

    # ---- one micro-batch ----------------------------------------------------------------------------------------

    async def submit(self, records: Sequence[Record]) -> "asyncio.Future[None]":
        """Apply a micro-batch in memory and encode it; returns a future that is done once the batch is durable.
        Batches become durable in the order they were submitted, each after the one before: so the next batch is
        decoded, applied and encoded while this one's sends are in flight; its outputs go once this one's are
        acknowledged, its changelog records and offset marker once this one is durable (module docstring). Every
        partition's part is encoded in one forward and acknowledged in one round per phase (outputs, then state):
        the batch waits on the broker twice, however many partitions it spans."""
        if self.store.producer is None:
            await self.store.start()
        sent = _stamps_s(records)
        self.metrics.waited.observe_many(np.maximum(0.0, time.time() - sent))
        batch = await self._begin(records)
        self._published = asyncio.ensure_future(self._publish(batch, after=self._published))
        self._tail = asyncio.ensure_future(self._complete(self._tail, self._published, batch, sent))
        return self._tail

    async def drain(self) -> None:
        """Wait until every submitted batch is durable (raises what a failed one raised)."""
        if self._tail is not None:
            await self._tail

    async def _begin(self, records: Sequence[Record]) -> "_Batch":
        by_partition: dict[int, list[Record]] = {}
        for r in records:
            by_partition.setdefault(r.partition, []).append(r)
        parts = []
        for partition, recs in sorted(by_partition.items()):
            if partition not in self.epoch:          # delivered before the assignment callback ran
                await self.assign(self.assigned | {partition})
            epoch = self.epoch.get(partition)
            if epoch is None or not await self.ensure(partition, epoch):
                log.info("partition %d was revoked before its batch was applied; leaving it to its new owner",
                         partition)
                continue
            recs.sort(key=lambda r: r.offset)
            if recs[0].offset > self.store.applied[partition] + 1:
                await self.drain()                   # the re-read pages go after the batches before them
                # a rebalance may take the partition during either await: its new owner redoes all of it
                if not (self.owns(partition, epoch) and
                        await self._reread(partition, epoch, recs[0].topic, recs[0].offset)):
                    continue
            if not self.owns(partition, epoch):
                continue
            recs = [r for r in recs if r.offset > self.store.applied[partition]]   # a re-read did these
            if recs:
                parts.append(self._apply(partition, epoch, recs))
        return self._encode(parts, records)

    async def _complete(self, before: "Optional[asyncio.Future[None]]", published: "asyncio.Future[None]",
                        batch: "_Batch", sent: np.ndarray) -> None:
        """sent: the records' timestamps in seconds (_stamps_s)."""
        await published
        if before is not None:
            await before
        await self._write_state(batch)
        self.heap.settle()   # heap.py: what has piled up is frozen
        self.metrics.batch_size.observe(len(batch.records))
        self.counts["batches"] += 1
        self.metrics.latency.observe_many(np.maximum(0.0, time.time() - sent))

    async def _reread(self, partition: int, epoch: int, topic: str, before: int) -> bool:
        """Apply the records between the durable marker and offset `before`: committed by the group (or skipped
        over) but never durably applied. Page by page, each made durable before the next is read."""
        first = self.store.applied[partition] + 1
        log.info("partition %d: re-reading offsets %d..%d past the durable marker", partition, first, before - 1)
        async for page in read_range(self.bootstrap, topic, partition, first, before - 1,
                                     security=self.store.security,   # the store's cluster, its settings
                                     isolation_level=self.isolation_level):
            self.counts["reread"] += len(page)
            if not self.owns(partition, epoch):
                return False
            if not await self._make_durable(self._encode([self._apply(partition, epoch, page)], page)):
                return False
        return True

    def _apply(self, partition: int, epoch: int, recs: Sequence[Record]) -> "_Part":
        """Decode one partition's records and join them into its windows in memory (nothing written yet), with
        popularity following the windows held; the caller has checked that it owns the partition, and nothing here
        awaits."""
        events: list[Event] = []
        rejected: list[tuple[Record, Rejection]] = []
        for r in recs:
            got = decode(r.value, self.config, not_after_ms=self._not_after(r)) if not r.broken else \
                Rejection("undecodable_batch", r.broken)
            if isinstance(got, Event):
                got = check_key(r.key, got) or got
            if isinstance(got, Rejection):
                rejected.append((r, got))
            else:
                events.append(got)
        joined = self.store.join(partition, events, recs[-1].offset)
        written = self.store.cut(partition, joined)
        for scene, delta in item_deltas(self.store.slots, joined).items():
            self.popularity.shift(partition, scene, delta)
        return _Part(partition, epoch, recs[-1].offset, len(events), rejected, joined, written)

    def _encode(self, parts: list["_Part"], records: Sequence[Record]) -> "_Batch":
        """Encode every part's touched users in one forward, with the model in use now: the whole batch is encoded
        by one model. Nothing here awaits (module docstring: why not in a thread)."""
        slots, model = self.store.slots, self.model
        users = np.unique(np.concatenate([p.joined.users for p in parts])) if parts else np.zeros(0, np.int64)
        names = [slots.user_names[u] for u in users.tolist()]
        held = [n is not None for n in names]   # a revoked partition's users left during an await
        users, names = users[held], [n for n in names if n is not None]
        vec = None
        if len(users):
            t0 = time.perf_counter()
            vec = encode_slots(slots, users, model.streamer)
            self.metrics.encode_seconds.observe(time.perf_counter() - t0)
        return _Batch(records, parts, vec, slots.uver[users].copy(), names, model.version)

    async def _make_durable(self, batch: "_Batch") -> list["_Part"]:
        """Publish the batch's records and dead letters and wait for the broker; then, for the parts whose partition
        is still owned under the same epoch, send the windows and offset markers and wait again. Outputs first:
        state that says "done" must never outlive outputs that were lost. Returns the parts whose state was
        written."""
        await self._publish(batch)
        return await self._write_state(batch)

    async def _publish(self, batch: "_Batch", after: "Optional[asyncio.Future[None]]" = None) -> None:
        """The batch's output records and dead letters, sent (once `after`, the batch before's, are acknowledged)
        and acknowledged."""
        if after is not None:
            await after
        producer = self.store.producer
        outputs = RecordBatches(producer)
        if batch.names:
            keys = [name.encode("utf-8", "surrogatepass") for name in batch.names]
            values = encode_records(self.output_format, batch.names, batch.vectors, self.config.scenes,
                                    batch.version)
            partitions = key_partitions(keys, len(await producer.partitions_for(self.output_topic)))
            for key, value, partition in zip(keys, values, partitions):
                outputs.add(self.output_topic, partition, key, value)
        sends = [b.future for b in await outputs.send()]
        for p in batch.parts:
            for r, rejection in p.rejected:
                key, value = dead_letter(r, rejection)
                sends.append(await producer.send(self.dlq_topic, value, key=key))
        await asyncio.gather(*sends)

    async def _write_state(self, batch: "_Batch") -> list["_Part"]:
        """After the batch's outputs are acknowledged: the windows and offset markers of the parts whose partition is
        still owned under the same epoch, sent and acknowledged; then what serving reads. Returns those parts."""
        owned = []
        for p in batch.parts:
            if self.owns(p.partition, p.epoch):
                owned.append(p)
            else:
                log.info("partition %d was revoked during a micro-batch; leaving it to its new owner", p.partition)
        writes = [await self.store.send(p.partition, p.written, p.last_offset) for p in owned]
        await asyncio.gather(*(b.future for sent in writes for b in sent))
        for p, sent in zip(owned, writes):
            if self.owns(p.partition, p.epoch):
                self.store.settle(p.partition, p.written, [o for b in sent for o in b.offsets()], p.last_offset)
        if batch.vectors is not None and owned:
            vec, slots = batch.vectors, self.store.slots
            # the rows of users whose state was written and who still hold their slots
            rows = np.flatnonzero(np.isin(vec.users, np.concatenate([p.joined.users for p in owned])) &
                                  (slots.uver[vec.users] == batch.owners))
            self.latest.put(vec.users[rows], batch.owners[rows], vec, rows, batch.version, time.time())
        self.store.trim()   # after: a user it evicts takes its record along (a record kept past it never left)
        for p in owned:
            for _, rejection in p.rejected:
                self.metrics.invalid.labels(rejection.reason).inc()
            self.counts["invalid"] += len(p.rejected)
            self.counts["late_dropped"] += p.joined.late_dropped
            self.counts["events"] += p.events
            self.counts["published"] += len(p.joined.users)
            self.metrics.events.inc(p.events)
            self.metrics.late.inc(p.joined.late_dropped)
        return owned

    def _not_after(self, record: Record) -> int:
        """The newest event time a record may carry: its broker timestamp (else now) plus the allowed clock skew."""
        base = record.timestamp_ms if record.timestamp_ms > 0 else int(time.time() * 1000)
        return base + self.max_clock_skew_ms

    # ---- what serving reads -------------------------------------------------------------------------------------

    def partition_of(self, user: str) -> Optional[int]:
        for p in sorted(self.store.held):
            if self.store.has(p, user):
                return p
        return None

    def state_of(self, user: str) -> Optional[UserState]:
        p = self.partition_of(user)
        return self.store.get(p, user) if p is not None else None

    async def user_record(self, user: str, model: Optional[Serving] = None
                          ) -> Optional[tuple[dict, Optional[float]]]:
        """The user's current record under `model` (default: the one in use) and when it was applied here (None
        after a restart until touched again). A user not touched since a model swap has a published record of the
        old model: it is recomputed from the windows, never served against the new model's items."""
        model = model or self.model
        slots = self.store.slots
        slot = slots.slot_of.get(user)
        held = slot is not None and self.latest.held(slot, slots.uver[slot])
        if held and self.latest.version(slot) == model.version:
            return self.latest.record(user, slot), float(self.latest.at[slot])
        state = self.state_of(user)
        if state is None:
            return None
        return interest_records(model.encoder, {user: state})[0], float(self.latest.at[slot]) if held else None
