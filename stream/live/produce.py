"""Load an event log into a Kafka topic: the replay-into-Kafka path for staging tests.

Lines are sent as they are, bad ones included (so the worker's dead-letter path sees what production would), keyed
by user_id when the line has one, so a user's events stay in one partition and in order.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from .kafka_security import NO_SECURITY


def line_key(raw: bytes, field: str = "user_id") -> Optional[bytes]:
    try:
        value = json.loads(raw).get(field)
    except (ValueError, AttributeError, RecursionError):
        return None
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) and value else None


async def produce_lines(bootstrap: str, topic: str, lines: Iterable[bytes], rate: float = 0.0,
                        progress: bool = True, total: Optional[int] = None,
                        stop: Callable[[], bool] = lambda: False, key_field: str = "user_id",
                        security: Mapping[str, Any] = NO_SECURITY) -> int:
    """Send every line (until stop() says so), keyed by its `key_field`; rate > 0 paces to about `rate` lines per
    second; security: KafkaSecurity.client_kwargs(). Returns the number sent."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10, max_batch_size=1 << 20,
                                **security)
    sent = 0
    try:   # stopped even when it never started (a refused connection, TLS or SASL)
        await producer.start()
        start = time.perf_counter()
        futures = []
        for raw in tqdm(lines, total=total, desc=f"produce {topic}", unit="ev", disable=not progress,
                        mininterval=0.5):
            if stop():
                break
            futures.append(await producer.send(topic, raw, key=line_key(raw, key_field)))
            sent += 1
            if rate > 0:
                ahead = sent / rate - (time.perf_counter() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if len(futures) >= 5000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        try:
            await asyncio.wait_for(producer.stop(), 10)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
    return sent
