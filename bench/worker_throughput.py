"""Live worker throughput: events per second from the worker's first published record to its last, for a backlog of
synthetic events already in `clicks` (4 partitions), against a fresh embedded broker.

The span is read off the output records' own timestamps (set by the worker's producer when it sends them), so
startup, group join and recovery are left out, and so is the first micro-batch's own work: keep the backlog many
batches long (the default 20,000 events make about 20 of 1,000) and compare versions only at the same size.

    python bench/worker_throughput.py [--events 20000] [--runs 3] [--checkpoint CKPT] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from scenestream.stream.local.broker import EmbeddedBroker
from scenestream.stream.core.events import encode
from scenestream.stream.local.processes import free_port
from scenestream.stream.live.produce import produce_lines
from tiny_checkpoint import tiny_checkpoint  # bench/ is on sys.path: scripts run as python bench/NAME.py
from scenestream.stream.datasets.synthetic import SyntheticSpec, generate

ROOT = Path(__file__).resolve().parents[1]


async def _backlog(bootstrap: str, lines: list[bytes]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic("clicks", 4, 1)])
    await admin.close()
    await produce_lines(bootstrap, "clicks", lines, progress=False)


async def _output_span(bootstrap: str, users: int, timeout: float) -> tuple[int, float]:
    """(records read, seconds from the first output record to the last) once every user has a record and the
    topic has been quiet for 3 s."""
    c = AIOKafkaConsumer("user-interests", bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await c.start()
    seen, first, last, n, quiet = set(), None, None, 0, time.monotonic()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and (len(seen) < users or time.monotonic() - quiet < 3.0):
            got = await c.getmany(timeout_ms=500)
            for msgs in got.values():
                for m in msgs:
                    n += 1
                    seen.add(m.key)
                    first = m.timestamp if first is None else min(first, m.timestamp)
                    last = m.timestamp if last is None else max(last, m.timestamp)
                quiet = time.monotonic()
        return n, ((last - first) / 1000.0) if first is not None else float("nan")
    finally:
        await c.stop()


def one_run(checkpoint: str, lines: list[bytes], users: int) -> dict:
    with EmbeddedBroker() as b:
        asyncio.run(_backlog(b.bootstrap, lines))
        proc = subprocess.Popen([sys.executable, "-m", "scenestream.stream.cli", "worker", "--broker", b.url,
                                 "--checkpoint", checkpoint, "--web-port", str(free_port()), "--device", "cpu"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            records, seconds = asyncio.run(_output_span(b.bootstrap, users, 600))
        finally:
            proc.kill()
            proc.wait()
    return {"events": len(lines), "records": records, "seconds": round(seconds, 2),
            "events_per_s": round(len(lines) / seconds, 1) if seconds > 0 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--checkpoint", default=None, help="Checkpoint to serve (default: train a tiny one).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ckpt = args.checkpoint or tiny_checkpoint()
    events, _ = generate(SyntheticSpec(users=max(50, args.events // 55), seed=1))
    events = events[:args.events]
    lines = [encode(e) for e in events]
    users = len({e.user_id for e in events})
    runs = [one_run(ckpt, lines, users) for _ in range(args.runs)]
    if not args.json:
        for r in runs:
            print(f"{r['events']} events, {r['records']} records in {r['seconds']} s: {r['events_per_s']} events/s")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
