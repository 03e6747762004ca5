"""Re-keying: a clickstream keyed by session, by device or not at all, made into one keyed by user_id.

The worker holds a user's whole state because every event of the user arrives in one partition, which is what a
key of user_id gives. Many real clickstreams are keyed otherwise (or null-keyed, round-robin), and read directly
every event of them is a dead letter (`key_mismatch`). With `scenestream worker --rekey` each worker also runs this
stage, Kafka Streams' `selectKey` / Faust's `group_by`: it reads the source topic in a consumer group of its own,
`<app-id>-rekey`, and writes every record to `<app-id>-clicks-by-user` keyed by its user_id (partitioned as Kafka's
default partitioner does, with the record's own timestamp and headers), which the micro-batch feeder reads instead.

At-least-once is enough: the source offsets are committed once the re-keyed records are acknowledged, so a crash
repeats some of them, and the windows' lattice absorbs the duplicates (an event is deduplicated by event_id). A
record without a readable user_id is forwarded as it came (its key, a partition by source position), so the worker
judges it and dead-letters it with the reason it always gives; a source batch that cannot be decoded goes to the
dead-letter topic from here, since nothing downstream ever sees it.

Why a stage inside the worker rather than a process of its own: it needs what the worker has (the decoder's
rules, a producer, the dead-letter format), costs a few µs an event against the worker's tens, and spread over the
same members as the micro-batches it scales with them, with nothing more to deploy.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping, Optional

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError

from ..core.config import StreamConfig
from ..core.events import Event, Rejection, decode
from .config import HEARTBEAT_INTERVAL_S, REBALANCE_TIMEOUT_S, SESSION_TIMEOUT_S, WorkerConfig
from .kafka_security import NO_SECURITY
from .record import Record, dead_letter
from .record_batches import RecordBatches, codec_setting, key_partitions
from .undecodable import getmany_past_undecodable

log = logging.getLogger(__name__)


def user_key(value: Optional[bytes], config: StreamConfig) -> Optional[bytes]:
    """The user_id (UTF-8) of a record's payload, or None when the decoder refuses it: the same rules as the
    worker's, so a record keyed here is one the worker accepts."""
    got = decode(value, config)
    return got.user_id.encode("utf-8", "surrogatepass") if isinstance(got, Event) else None


class _Forget(ConsumerRebalanceListener):
    """A revoked partition's position is its new owner's: read again from the committed offset if it comes back."""

    def __init__(self, positions: dict):
        self.positions = positions

    async def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self.positions.pop(tp, None)

    async def on_partitions_assigned(self, assigned) -> None:
        pass


class Rekeyer:
    """Source topic in, `target` out keyed by user_id; dead letters of undecodable source batches to `dlq_topic`."""

    def __init__(self, bootstrap: str, source: str, target: str, group: str, dlq_topic: str, config: StreamConfig,
                 batch_max: int = WorkerConfig.batch_max, isolation_level: str = WorkerConfig.isolation_level,
                 compression: str = WorkerConfig.compression,
                 security: Mapping[str, Any] = NO_SECURITY):
        self.source, self.target, self.dlq_topic, self.config = source, target, dlq_topic, config
        self.batch_max = batch_max
        self._producer_settings = dict(bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_batch_size=1 << 20,
                                       compression_type=codec_setting(compression), **security)
        self._settings = dict(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                              auto_offset_reset="earliest", isolation_level=isolation_level,
                              session_timeout_ms=int(SESSION_TIMEOUT_S * 1000),
                              heartbeat_interval_ms=int(HEARTBEAT_INTERVAL_S * 1000),
                              rebalance_timeout_ms=int(REBALANCE_TIMEOUT_S * 1000),
                              fetch_max_wait_ms=50, max_poll_records=batch_max, **security)
        self.counts = {"rekeyed": 0, "forwarded": 0, "undecodable": 0}
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(**self._settings)
        positions: dict = {}
        consumer.subscribe([self.source], listener=_Forget(positions))
        producer = AIOKafkaProducer(**self._producer_settings)   # made here: aiokafka wants the running loop
        await producer.start()
        await consumer.start()
        try:
            partitions = len(await producer.partitions_for(self.target))
            while not self._stopping.is_set():
                got, bad = await getmany_past_undecodable(consumer, positions, timeout_ms=200,
                                                          max_records=self.batch_max)
                out = RecordBatches(producer)
                msgs = [m for tp in sorted(got, key=lambda t: t.partition) for m in got[tp]]
                keys = [user_key(m.value, self.config) for m in msgs]
                hashed = iter(key_partitions([k for k in keys if k is not None], partitions))
                for m, key in zip(msgs, keys):
                    headers = list(m.headers) or None
                    if key is None:   # forwarded as it came: the worker refuses it with its usual reason
                        out.add(self.target, m.partition % partitions, m.key, m.value, m.timestamp, headers)
                    else:
                        out.add(self.target, next(hashed), key, m.value, m.timestamp, headers)
                sends = [b.future for b in await out.send()]
                for batch in bad:
                    log.warning("%s; it goes to the dead-letter topic (reason undecodable_batch) and the re-keying "
                                "stage reads on after it", batch.describe())
                    key, value = dead_letter(Record.of_batch(batch), Rejection("undecodable_batch", batch.describe()))
                    sends.append(await producer.send(self.dlq_topic, value, key=key))
                if not sends:
                    continue
                await asyncio.gather(*sends)
                self.counts["rekeyed"] += sum(k is not None for k in keys)
                self.counts["forwarded"] += sum(k is None for k in keys)
                self.counts["undecodable"] += len(bad)
                done = {tp for tp, ms in got.items() if ms} | {batch.tp for batch in bad}
                try:
                    await consumer.commit({tp: positions[tp] for tp in done})
                except (CommitFailedError, IllegalStateError) as exc:   # a rebalance: the new owner repeats them
                    log.info("re-keyed offsets not committed: %s", exc)
        finally:
            await consumer.stop()
            await producer.stop()
