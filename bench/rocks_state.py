"""The rocksdb state at scale: a real worker with `--state rocksdb` and a memory cap holds many
users within bounded RSS and answers any of them; a restart with its directory intact is ready fast; a worker with
the in-memory state is ready only after replaying the whole changelog. Against one embedded broker.

1. `--users` users x one event in each of 3 scenes (bench/state.py's id shapes) go into `clicks` (8 partitions).
2. Worker A (`--state rocksdb --state-dir D --max-users-in-memory CAP`) applies them all (its
   scenestream_events_consumed counter); its RSS (VmRSS) then, and its peak (VmHWM).
3. `--queries` random users are asked for recommendations through A's API: how many got a vector (not the popular
   fallback), and the latency.
4. A stops (SIGTERM); worker B, same app id and state dir, starts: seconds from spawn to /readyz answering 200.
5. B stops; worker C, same app id, in-memory state (`--state memory`): seconds to ready (it replays the whole
   changelog of its partitions) and its RSS once ready.

    python bench/rocks_state.py [--users 1000000] [--cap 100000] [--queries 1000] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from live import consumed  # noqa: E402
from state import _scenes, user_payloads  # noqa: E402

PARTITIONS = 8


def status_of(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def http(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_ready(port: int, proc, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout and proc.poll() is None:
        if http(f"http://127.0.0.1:{port}/readyz", 1.0)[0] == 200:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise RuntimeError(f"worker not ready within {timeout} s (exit {proc.poll()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--cap", type=int, default=100_000, help="--max-users-in-memory of the rocksdb worker.")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--a-state", choices=["rocksdb", "memory"], default="rocksdb",
                    help="Worker A's state: memory shows what the same stream costs with no disk and no cap.")
    ap.add_argument("--checkpoint", default=None, help="Default: train bench/tiny_checkpoint.py's (~20 s).")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from scenestream.stream.local.broker import EmbeddedBroker
    from scenestream.stream.local.processes import free_port, spawn, stop_process
    from scenestream.stream.live.produce import produce_lines

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.checkpoint:
        ckpt = args.checkpoint
    else:
        say("training a tiny checkpoint ...")
        from tiny_checkpoint import tiny_checkpoint
        ckpt = tiny_checkpoint()
    rng = random.Random(0)
    scenes = _scenes(3)
    lines = [p for u in range(args.users) for p in user_payloads(u, scenes, 1, rng)]
    work = Path(tempfile.mkdtemp(prefix="rocks-bench-"))
    report: dict = {"users": args.users, "events": len(lines), "cap": args.cap, "partitions": PARTITIONS,
                    "cpus": os.cpu_count(), "command": "python " + shlex.join(sys.argv)}
    app = f"rocks-{uuid.uuid4().hex[:6]}"

    def worker(state: str, log: str):
        port = free_port()
        cmd = [sys.executable, "-m", "scenestream.stream.cli", "worker", "--broker", b.url, "--checkpoint", ckpt,
               "--web-port", str(port), "--device", "cpu", "--app-id", app, "--partitions", str(PARTITIONS),
               "--rate-limit", "0", "--model-poll", "0", "--state", state]
        if state == "rocksdb":
            cmd += ["--state-dir", str(work / "state"), "--max-users-in-memory", str(args.cap)]
        return port, spawn(cmd, str(work / log))

    with EmbeddedBroker() as b:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        async def load() -> float:
            admin = AIOKafkaAdminClient(bootstrap_servers=b.bootstrap)
            await admin.start()
            await admin.create_topics([NewTopic("clicks", PARTITIONS, 1)])
            await admin.close()
            t0 = time.perf_counter()
            await produce_lines(b.bootstrap, "clicks", lines, progress=True, total=len(lines))
            return time.perf_counter() - t0
        report["load_seconds"] = round(asyncio.run(load()), 1)
        n = len(lines)
        lines.clear()   # the broker holds them now
        say(f"loaded {n:,} events in {report['load_seconds']} s; worker A ({args.a_state}"
            + (f", cap {args.cap:,}) ..." if args.a_state == "rocksdb" else ") ..."))

        port, proc = worker(args.a_state, "a.log")
        try:
            t0 = time.perf_counter()
            while (consumed(port) or 0) < n:
                if proc.poll() is not None or time.perf_counter() - t0 > args.timeout:
                    raise RuntimeError(f"worker A stopped at {consumed(port)} of {n} events (log {work}/a.log)")
                time.sleep(1.0)
            report["a_apply_seconds"] = round(time.perf_counter() - t0, 1)
            time.sleep(2.0)
            report["a_rss"] = status_of(proc.pid)
            say(f"A applied every event in {report['a_apply_seconds']} s; RSS {report['a_rss']}")
            picks = random.Random(1).sample(range(args.users), min(args.queries, args.users))
            vectors, latencies, codes = 0, [], {}
            for u in picks:
                t = time.perf_counter()
                code, body = http(f"http://127.0.0.1:{port}/users/u{u:06d}/recommendations?k=5", 30.0)
                latencies.append(time.perf_counter() - t)
                codes[code] = codes.get(code, 0) + 1
                vectors += code == 200 and json.loads(body).get("fallback") is None
            latencies.sort()
            report["a_queries"] = {"asked": len(picks), "with_vector": vectors, "status": codes,
                                   "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
                                   "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99) - 1], 1)}
            report["a_rss_after_queries"] = status_of(proc.pid)
            say(f"queries: {report['a_queries']}")
        finally:
            stop_process(proc, timeout=60)

        for key, state, what in (("b", "rocksdb", "rocksdb, directory intact"),
                                 ("c", "memory", "memory, full changelog replay")):
            port, proc = worker(state, f"{key}.log")
            try:
                ready = report[f"{key}_ready_seconds"] = round(wait_ready(port, proc, args.timeout), 2)
                report[f"{key}_rss"] = status_of(proc.pid)
                say(f"{key.upper()} ({what}) ready in {ready} s, RSS {report[f'{key}_rss']}")
            finally:
                stop_process(proc, timeout=60)
    report["workdir"] = str(work)
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
