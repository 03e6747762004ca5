"""Reading one partition up to a known offset, outside any consumer group: the gap re-read and the catalog's
re-read for a model swap (`read_range`), and the changelog's recovery to its fence (state.py). A broker can answer
empty fetches for a while (a slow broker, a leader election), so the end is judged by the consumer's position
passing the last offset wanted, never by an empty fetch, and a deadline turns "never" into an error."""
from __future__ import annotations

import time
from typing import Any, AsyncIterator, Mapping, Optional

from aiokafka import AIOKafkaConsumer, TopicPartition

from .config import WorkerConfig
from .kafka_security import NO_SECURITY
from .record import Record
from .undecodable import UndecodableBatch, getmany_past_undecodable

GAP_PAGE = 1000                # records per page of a gap re-read
GAP_DEADLINE_S = 120.0         # a gap not read by then: crash, and let the restart try again


async def read_to(consumer: AIOKafkaConsumer, tp: TopicPartition, first: int, last: int, deadline_s: float,
                  page: Optional[int] = None) -> AsyncIterator[tuple[list, list[UndecodableBatch]]]:
    """(records, undecodable batches) pages of tp from `first` (where the consumer is positioned) to `last`, until
    the consumer's position passes `last`; TimeoutError after `deadline_s` seconds without getting there."""
    positions = {tp: first}
    deadline = time.monotonic() + deadline_s
    while await consumer.position(tp) <= last:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{tp.topic}[{tp.partition}]: reading {first}..{last} did not reach offset {last} "
                               f"within {deadline_s:g} s (at {await consumer.position(tp)})")
        got, bad = await getmany_past_undecodable(consumer, positions, timeout_ms=1000, max_records=page)
        yield [m for m in got.get(tp, ()) if first <= m.offset <= last], [b for b in bad if b.last <= last]


async def read_range(bootstrap: str, topic: str, partition: int, first: int, last: int, page: int = GAP_PAGE,
                     deadline_s: float = GAP_DEADLINE_S, security: Mapping[str, Any] = NO_SECURITY,
                     isolation_level: str = WorkerConfig.isolation_level) -> AsyncIterator[list[Record]]:
    """Records first..last of one partition, in pages of at most `page`; a batch that cannot be decoded comes as
    one record with `broken` set (the caller crashes on the TimeoutError; a restart tries again)."""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level=isolation_level, **security)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, first)
        async for records, bad in read_to(consumer, tp, first, last, deadline_s, page):
            chunk = [Record.from_aiokafka(m) for m in records] + [Record.of_batch(b) for b in bad]
            if chunk:
                yield chunk
    finally:
        await consumer.stop()
