"""How the embedded broker (Tansu 0.6.0, memory storage) fetches as a partition fills with record batches.

Tansu scans a partition's batches on a fetch, so a fetch near the end of a partition of many small batches costs more
and more, until fetches come back empty within their wait: consumers of that partition stall. A producer that sends
each record in its own request (linger 0, one record per tick) makes one batch per record; batching producers make
few. This measures both, on one embedded broker:

1. `small`: one-record batches (send_and_wait one by one) up to each --steps count: the time to fetch the last 100
   records with each --waits fetch_max_wait_ms, and from offset 0 (a fetch gives up after --give-up seconds). A
   fetch whose scan outlasts its wait comes back empty, so a consumer with a short wait stalls where one with a
   longer wait still reads: the worker's --fetch-wait.
2. `big`: --steps' largest count of records in batches of 100: the last 100 records.

    python bench/broker_batches.py [--steps 5000,8000,12000,20000] [--json]

Why it matters: bench/soak.py's load batches (--linger-ms) and reads latency from the worker's histogram rather than
from `user-interests`; BENCHMARKS.md, "Soak".
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def fetch_last(bootstrap: str, topic: str, offset: int, want: int, give_up: float, wait_ms: int = 10
                     ) -> tuple[float, int]:
    """(seconds, records) to read `want` records from `offset` of partition 0 (stopping after `give_up` s), the
    broker holding an empty fetch up to wait_ms."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    tp = TopicPartition(topic, 0)
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=wait_ms)
    await c.start()
    try:
        c.assign([tp])
        c.seek(tp, offset)
        t0, n = time.perf_counter(), 0
        while n < want and time.perf_counter() - t0 < give_up:
            n += sum(len(v) for v in (await c.getmany(tp, timeout_ms=1000)).values())
        return time.perf_counter() - t0, n
    finally:
        await c.stop()


async def measure(bootstrap: str, steps: list[int], give_up: float, waits: list[int]) -> dict:
    from aiokafka import AIOKafkaProducer
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    out: dict = {"one_record_batches": [], "batches_of_100": None}
    try:
        count = 0
        for target in steps:
            while count < target:
                await producer.send_and_wait("small", b"x" * 200, partition=0)
                count += 1
            row: dict = {"batches": count}
            for wait in waits:
                last_s, last_n = await fetch_last(bootstrap, "small", count - 100, 100, give_up, wait)
                row[f"last_100_ms_wait_{wait}"], row[f"last_100_records_wait_{wait}"] = round(last_s * 1000, 1), last_n
            first_s, first_n = await fetch_last(bootstrap, "small", 0, 100, give_up, waits[0])
            row.update({"from_0_ms": round(first_s * 1000, 1), "from_0_records": first_n})
            out["one_record_batches"].append(row)
            print(out["one_record_batches"][-1], file=sys.stderr, flush=True)
        for _ in range(max(steps) // 100):
            await asyncio.gather(*[await producer.send("big", b"x" * 200, partition=0) for _ in range(100)])
        s, n = await fetch_last(bootstrap, "big", max(steps) - 100, 100, give_up, waits[0])
        out["batches_of_100"] = {"records": max(steps), "batches": max(steps) // 100,
                                 "last_100_ms": round(s * 1000, 1), "last_100_records": n}
    finally:
        await producer.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="5000,8000,12000,20000", help="Batch counts to measure at (ascending).")
    ap.add_argument("--give-up", type=float, default=30.0, help="Seconds a fetch of 100 records may take.")
    ap.add_argument("--waits", default="10,50,100",
                    help="fetch_max_wait_ms values the last 100 records are fetched with (the first also from 0 and "
                         "for the batched partition). 10 was the worker's before; 50 is its --fetch-wait default.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from scenestream.stream.local.broker import EmbeddedBroker
    with EmbeddedBroker() as b:
        out = asyncio.run(measure(b.bootstrap, sorted(int(x) for x in args.steps.split(",")), args.give_up,
                                  [int(x) for x in args.waits.split(",")]))
    if args.json:
        print(json.dumps(out))
    else:
        for row in out["one_record_batches"]:
            print(row)
        print(out["batches_of_100"])


if __name__ == "__main__":
    main()
