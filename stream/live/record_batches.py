"""A micro-batch's records handed to the producer as one Kafka record batch per partition.

Why: aiokafka's `send` costs 15-30 µs of Python per record (a coroutine, the default partitioner's pure-Python
murmur2, a future per record), and the worker sends two records per touched user (its output record and its
changelog window): as much CPU as encoding the user. Appending to a record batch builder costs ~3 µs, and one
batch per partition is also what the broker stores best (the embedded broker slows down with the number of batches
in a partition: BENCHMARKS.md, "Soak"). Records keep their order within a partition, as with `send`.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from aiokafka import AIOKafkaProducer

from ..core.config import CODECS

_M = np.uint32(0x5BD1E995)
_SEED = 0x9747B28C


def murmur2(keys: Sequence[bytes]) -> np.ndarray:
    """Kafka's murmur2 of each key (what the Java client's and aiokafka's default partitioners hash), as uint32,
    computed over all keys of one length at once."""
    out = np.empty(len(keys), dtype=np.uint32)
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_length.setdefault(len(key), []).append(i)
    with np.errstate(over="ignore"):   # uint32 products wrap, as the hash wants
        for n, rows in by_length.items():
            data = np.frombuffer(b"".join(keys[i] for i in rows), dtype=np.uint8).reshape(len(rows), n)
            h = np.full(len(rows), (_SEED ^ n) & 0xFFFFFFFF, dtype=np.uint32)
            words = np.ascontiguousarray(data[:, :n - n % 4]).view("<u4")
            for j in range(words.shape[1]):
                k = words[:, j] * _M
                k ^= k >> np.uint32(24)
                k *= _M
                h *= _M
                h ^= k
            tail = n - n % 4
            if n % 4 >= 3:
                h ^= data[:, tail + 2].astype(np.uint32) << np.uint32(16)
            if n % 4 >= 2:
                h ^= data[:, tail + 1].astype(np.uint32) << np.uint32(8)
            if n % 4 >= 1:
                h ^= data[:, tail].astype(np.uint32)
                h *= _M
            h ^= h >> np.uint32(13)
            h *= _M
            h ^= h >> np.uint32(15)
            out[rows] = h
    return out


def codec_setting(codec: str) -> Optional[str]:
    """aiokafka's compression_type for one of CODECS."""
    if codec not in CODECS:
        raise ValueError(f"compression {codec!r} is not one of {', '.join(CODECS)}")
    return None if codec == "none" else codec


def key_partitions(keys: Sequence[bytes], partitions: int) -> list[int]:
    """The partition the default partitioner gives each key, among `partitions` numbered from 0."""
    return ((murmur2(keys) & np.uint32(0x7FFFFFFF)) % np.uint32(partitions)).tolist()


@dataclass(eq=False)   # awaitable in asyncio.gather, which hashes what it is given
class SentBatch:
    """One record batch handed to the producer: awaiting it waits for the broker's acknowledgement."""
    future: asyncio.Future
    count: int

    def __await__(self):
        return self.future.__await__()

    def offsets(self) -> range:
        """The offsets its records got (once acknowledged): the batch's first offset, then one after another."""
        base = self.future.result().offset
        return range(base, base + self.count)


class RecordBatches:
    """Records gathered per (topic, partition) into aiokafka batch builders, then sent with `send`: whatever was
    added to one partition goes out in the order added. A builder that fills up (the producer's max_batch_size)
    is followed by another."""

    def __init__(self, producer: AIOKafkaProducer):
        self.producer = producer
        self.open: dict[tuple[str, int], object] = {}
        self.full: list[tuple[str, int, object]] = []   # filled builders, in the order they filled

    def add(self, topic: str, partition: int, key: Optional[bytes], value: bytes, timestamp_ms: Optional[int] = None,
            headers: Optional[list] = None) -> None:
        """timestamp_ms None: now; headers: a list of (name, bytes) pairs."""
        builder = self.open.get((topic, partition))
        if builder is None:
            builder = self.open[(topic, partition)] = self.producer.create_batch()
        if builder.append(key=key, value=value, timestamp=timestamp_ms, headers=headers) is None:
            self.full.append((topic, partition, builder))
            builder = self.open[(topic, partition)] = self.producer.create_batch()
            if builder.append(key=key, value=value, timestamp=timestamp_ms, headers=headers) is None:
                raise ValueError(f"a record of {len(value)} bytes is larger than the producer's max_batch_size")

    async def send(self) -> list[SentBatch]:
        """Hand every batch to the producer, in the order their records were added per partition."""
        sent = []
        for topic, partition, builder in [*self.full, *((t, p, b) for (t, p), b in self.open.items())]:
            count = builder.record_count()
            builder.close()
            sent.append(SentBatch(await self.producer.send_batch(builder, topic, partition=partition), count))
        self.open, self.full = {}, []
        return sent
