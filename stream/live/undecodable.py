"""Record batches a consumer cannot decode: found, named and stepped over, instead of a worker that stops for good.

A Kafka record batch is decoded by the consumer, not the broker: a codec the client lacks, a corrupt CRC, or a
batch whose compressed bytes are garbage make aiokafka's `getmany` raise, with no partition or offset in the
error, at the same offset on every retry and after every restart. And it raises after it has already moved the
position of the partitions it drained in the same call, whose records it then drops (aiokafka 0.14): a caller that
simply retried would skip them.

`getmany_past_undecodable` is `getmany` that never raises for a batch's bytes. When `getmany` fails, every
partition is fetched again from the caller's own position (the offset after the last record it was handed) with one
raw fetch request, and decoded batch by batch with aiokafka's own record parser: the records before the first batch
that fails are returned as usual, the batch itself as an `UndecodableBatch` (its offsets, raw bytes and why), and
every partition is positioned again: past the bad batch, or back where the caller's records end. If no partition
shows a bad batch the failure was something else, and is raised as it was.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Optional

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.errors import ConsumerStoppedError, CorruptRecordException, KafkaError, UnsupportedCodecError, \
    for_code
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords

PROBE_BYTES = 8 << 20   # one raw fetch: at least this, and twice the consumer's max_partition_fetch_bytes


@dataclass(frozen=True)
class UndecodableBatch:
    """One record batch of a partition that could not be decoded: offsets first..last, its bytes as stored."""
    topic: str
    partition: int
    first: int
    last: int
    raw: bytes
    error: str    # what decoding it raised, for humans

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def describe(self) -> str:
        return (f"{self.topic}[{self.partition}] offsets {self.first}..{self.last}: a record batch of "
                f"{len(self.raw)} bytes that cannot be decoded ({self.error})")


def is_batch_error(exc: BaseException) -> bool:
    """Could this have come from decoding a batch's bytes? Kafka's own error responses and a stopped consumer
    cannot; a CRC or codec error, or whatever a decompressor raises, may (the probe then decides)."""
    if isinstance(exc, (CorruptRecordException, UnsupportedCodecError)):
        return True
    return isinstance(exc, Exception) and not isinstance(exc, (KafkaError, ConsumerStoppedError))


async def getmany_past_undecodable(consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int],
                                   **getmany: Any) -> tuple[dict[TopicPartition, list], list[UndecodableBatch]]:
    """consumer.getmany(**getmany), and the undecodable batches met instead of raising. `positions` is the caller's
    own next offset of each partition it reads (after the last record it was handed; a partition missing is read
    from the group's committed offset, else from its beginning: auto_offset_reset=earliest); on a bad batch the
    records before it are returned and the consumer is sought past it, every other partition back to its position.
    `positions` is moved past whatever is returned; the caller sets a partition's entry when it seeks, and drops it
    when the partition is taken away."""
    try:
        got = await consumer.getmany(**getmany)
    except Exception as exc:   # noqa: BLE001 - sorted out below: a bad batch, or raised again
        if not is_batch_error(exc):
            raise
        got, bad = await _past_bad_batch(consumer, positions, exc)
    else:
        bad = []
    for tp, msgs in got.items():
        if msgs:
            positions[tp] = msgs[-1].offset + 1
    for batch in bad:
        positions[batch.tp] = batch.last + 1
    return got, bad


async def _past_bad_batch(consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int], failure: Exception
                          ) -> tuple[dict[TopicPartition, list], list[UndecodableBatch]]:
    fetchable = [tp for tp in consumer.assignment() if tp not in consumer.paused()]
    for tp in fetchable:
        if tp not in positions:   # nothing handed over yet: from the group's committed offset, else the start
            committed = await consumer.committed(tp) if consumer._group_id else None
            positions[tp] = committed if committed is not None else (await consumer.beginning_offsets([tp]))[tp]
    got: dict[TopicPartition, list] = {}
    bad: list[UndecodableBatch] = []
    for tp in sorted(fetchable):
        records, batch = await probe(consumer, tp, positions[tp])
        if batch is not None:
            got[tp] = records
            bad.append(batch)
    if not bad:
        raise failure
    for tp in fetchable:   # the failed call may have moved positions without handing over their records
        consumer.seek(tp, positions[tp])
    for batch in bad:
        consumer.seek(batch.tp, batch.last + 1)
    return got, bad


async def probe(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> tuple[list, Optional[UndecodableBatch]]:
    """Fetch tp from `offset` with the consumer's connection and settings, and decode it the way the consumer does:
    (the records before the first batch that fails, that batch), or (records, None) when all of it decodes. One
    fetch of more than the consumer's own (aiokafka fetches a partition again only once it has handed over all it
    fetched before, so the batch that failed lies within that many bytes of the position)."""
    client = consumer._client   # the consumer's own connections: its brokers, TLS and SASL (aiokafka 0.14)
    isolation = consumer._fetcher._isolation_level
    size = max(PROBE_BYTES, 2 * consumer._fetcher._max_partition_fetch_bytes)
    node = client.cluster.leader_for_partition(tp)
    if node is None or node < 0:
        await client.force_metadata_update()
        node = client.cluster.leader_for_partition(tp)
    request = FetchRequest(100, 1, size, isolation, [(tp.topic, [(tp.partition, offset, size)])])
    response = await client.send(node, request)
    part = _partition_data(response, tp)
    if part is None:
        return [], None
    error_code, aborted, raw = part
    if error_code:
        raise for_code(error_code)(f"probing {tp.topic}[{tp.partition}] at offset {offset}")
    records: list = []
    parsed = PartitionRecords(tp, MemoryRecords(raw), aborted, offset, None, None, True, isolation)
    try:
        for record in parsed:
            records.append(record)
    except Exception as exc:   # noqa: BLE001 - the batch at parsed.next_fetch_offset is the bad one
        return records, _bad_batch(tp, raw, parsed.next_fetch_offset, exc)
    return records, None


def _bad_batch(tp: TopicPartition, raw: bytes, at: int, exc: Exception) -> UndecodableBatch:
    """The batch holding the first offset at or after `at`: where decoding stopped. Every batch starts with its
    base offset (int64) and the length of the rest (int32), whatever its format version."""
    memory, start = MemoryRecords(raw), 0
    while memory.has_next():
        batch = memory.next_batch()
        end = start + 12 + struct.unpack_from(">i", raw, start + 8)[0]
        if batch.next_offset > at:
            return UndecodableBatch(tp.topic, tp.partition, max(at, batch.base_offset), batch.next_offset - 1,
                                    bytes(raw[start:end]), f"{type(exc).__name__}: {str(exc)[:200]}")
        start = end
    raise exc   # not a batch that failed: the parser itself


def _partition_data(response, tp: TopicPartition) -> Optional[tuple[int, list, bytes]]:
    """(error code, aborted transactions, record bytes) of tp in a fetch response, laid out per version as aiokafka's
    fetcher reads it."""
    for topic, partitions in response.topics:
        if topic != tp.topic:
            continue
        for partition, error_code, _highwater, *data in partitions:
            if partition == tp.partition:
                if response.API_VERSION >= 11:
                    aborted = data[2]
                elif response.API_VERSION >= 4:
                    aborted = data[-2]
                else:
                    aborted = None
                return error_code, aborted, data[-1]
    return None

