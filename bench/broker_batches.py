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
3. `steady` (--steady COUNTS): what a consumer of a partition that keeps growing waits, the load of bench/soak.py
   without a worker. A topic of --partitions partitions is filled to each COUNTS batches per partition, then gets
   --rate events/s for --steady-seconds as one batch per partition every --batch-ms, each record stamped as sent; a
   bare aiokafka consumer (fetch_max_wait_ms --steady-wait, the worker's --fetch-wait) takes receive time minus the
   stamp: p50/p99/max per step. The soak adds 4 batches a partition a second: 0, 1,200, 2,400, 3,600 and 4,800
   batches are its minutes 0, 5, 10, 15 and 20, so this is the part of the soak's latency the broker takes before
   a worker sees an event, minute by minute.

    python bench/broker_batches.py [--steps 5000,8000,12000,20000] [--json]
    python bench/broker_batches.py --steps '' --steady 0,1200,2400,3600,4800 --json   # the soak's broker share

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


async def steady(bootstrap: str, counts: list[int], seconds: float, rate: float, batch_ms: int, wait_ms: int,
                 partitions: int) -> list[dict]:
    """Per count of batches per partition: the latency (receive - stamp) of a steady batched load, read by a bare
    consumer from the end of the topic."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("steady", partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_batch_size=1 << 20)
    await producer.start()
    tps = [TopicPartition("steady", p) for p in range(partitions)]
    per_batch = max(1, round(rate * batch_ms / 1000 / partitions))
    value = b"x" * 150   # about a click event's JSON
    have, rows = 0, []
    try:
        for count in counts:
            while have < count:   # one-record batches, a round over the partitions at a time
                await asyncio.gather(*[await producer.send("steady", value, partition=p) for p in range(partitions)])
                have += 1
            consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                        fetch_max_wait_ms=wait_ms)
            await consumer.start()
            lat: list[float] = []
            try:
                consumer.assign(tps)
                await consumer.seek_to_end(*tps)
                for tp in tps:
                    await consumer.position(tp)
                start = time.time()
                start_ms, stop = int(start * 1000), start + seconds

                async def load() -> int:
                    ticks = 0
                    while time.time() < stop:
                        now_ms = int(time.time() * 1000)
                        for p in range(partitions):
                            batch = producer.create_batch()
                            for _ in range(per_batch):
                                batch.append(key=None, value=value, timestamp=now_ms)
                            await producer.send_batch(batch, "steady", partition=p)
                        ticks += 1
                        await asyncio.sleep(max(0.0, start + ticks * batch_ms / 1000 - time.time()))
                    return ticks

                sending = asyncio.ensure_future(load())
                while not sending.done() or time.time() < stop + 2 and len(lat) < sending.result() * per_batch * partitions:
                    got = await consumer.getmany(timeout_ms=100)
                    now_ms = time.time() * 1000
                    lat += [now_ms - m.timestamp for msgs in got.values() for m in msgs if m.timestamp >= start_ms]
                ticks = sending.result()
            finally:
                await consumer.stop()
            have += ticks
            lat.sort()
            q = (lambda f: round(lat[min(len(lat) - 1, int(f * len(lat)))], 1)) if lat else (lambda f: None)
            rows.append({"batches_per_partition": count, "sent": ticks * per_batch * partitions, "received": len(lat),
                         "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": round(lat[-1], 1) if lat else None})
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        await producer.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="5000,8000,12000,20000", help="Batch counts to measure at (ascending).")
    ap.add_argument("--give-up", type=float, default=30.0, help="Seconds a fetch of 100 records may take.")
    ap.add_argument("--waits", default="10,50,100",
                    help="fetch_max_wait_ms values the last 100 records are fetched with (the first also from 0 and "
                         "for the batched partition). 10 was the worker's before; 50 is its --fetch-wait default.")
    ap.add_argument("--steady", default="", help="Batches per partition to measure the steady load at (ascending; "
                    "empty: skip). The soak's minutes 0, 5, 10, 15, 20: 0,1200,2400,3600,4800.")
    ap.add_argument("--steady-seconds", type=float, default=10.0, help="Seconds of load per --steady count.")
    ap.add_argument("--rate", type=float, default=2000.0, help="Events/s of the steady load (the soak's).")
    ap.add_argument("--batch-ms", type=int, default=250, help="A batch per partition this often (the soak's).")
    ap.add_argument("--steady-wait", type=int, default=50, help="The steady consumer's fetch_max_wait_ms (the "
                    "worker's --fetch-wait default).")
    ap.add_argument("--partitions", type=int, default=4, help="Partitions of the steady topic (the soak's clicks).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from scenestream.stream.local.broker import EmbeddedBroker
    steps = sorted(int(x) for x in args.steps.split(",") if x)
    with EmbeddedBroker() as b:
        out = asyncio.run(measure(b.bootstrap, steps, args.give_up, [int(x) for x in args.waits.split(",")])) \
            if steps else {}
    if args.steady:
        with EmbeddedBroker() as b:
            out["steady"] = asyncio.run(steady(b.bootstrap, sorted(int(x) for x in args.steady.split(",")),
                                               args.steady_seconds, args.rate, args.batch_ms, args.steady_wait,
                                               args.partitions))
    if args.json:
        print(json.dumps(out))
    else:
        for row in out.get("one_record_batches", []) + [out.get("batches_of_100")] + out.get("steady", []):
            if row:
                print(row)


if __name__ == "__main__":
    main()
