"""Fresh traffic against a worker whose users' windows are already full: the ramp `bench/live.py --phases ramp` runs.

U users each get a full window (the checkpoint's L events) in every scene, loaded into a fresh embedded broker and
applied by the worker first (ordered by user, as a backlog); or, with --ramp-history changelog, written as the
worker's changelog records (one per window) that it recovers at start: the way to 100,000 users on the embedded
broker. Then steady rates (--ramp-rates, events/s) for --ramp-seconds each: a librdkafka producer in its own
process sends events of users drawn at random from the U, at random items of the event's scene, with ts = send time
(epoch ms), keyed by user_id, in bursts every 10 ms scheduled by absolute time; a librdkafka consumer in another
process reads `user-interests` from its end and takes, for every output record, receive time minus the record's
newest_ts. A record belongs to the step whose send span holds its newest_ts. After each step the ramp waits
(--drain-max) until the worker has counted every event sent; a step the worker did not drain in that time ends the
ramp (it has fallen behind: later steps would measure its backlog). Each step runs on a broker and worker of its own,
set up as above (--ramp-broker per-step, the default): the embedded broker's fetches slow as its partitions fill with
the bursts' small batches (BENCHMARKS.md, "The embedded broker"), so on one broker (--ramp-broker one) a step also
measures the batches the steps before it left.

The knee is the highest step with p99 <= 100 ms (and drained). With --against DIR the same ramp runs against DIR's
worker too (a checkout of another commit, imported through a symlinked package as bench/core_path.py does), on
brokers of its own, taking turns with this checkout's step by step, so both knees come from one command.

    python bench/fresh_ramp.py producer SPEC.json      # a child: sends one step, prints a JSON line
    python bench/fresh_ramp.py consumer SPEC.json      # a child: reads outputs until SIGTERM, writes spec["out"]
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

MAGIC = b"SSI\x01"   # stream/core/output.py's binary record; parsed here without numpy, the consumer shares a core
KNEE_P99_MS = 100.0


def newest_ts(value: bytes) -> int:
    """A record's newest_ts, either form, without decoding its vectors."""
    if value[:4] == MAGIC:
        S, at = value[4], 5
        for _ in range(S):
            at += 1 + value[at]
        at += 2            # d
        at += 1 + value[at]   # model_version
        (n,) = struct.unpack_from("<H", value, at)
        return struct.unpack_from("<q", value, at + 2 + n)[0]
    at = value.rfind(b'"newest_ts":')
    if at >= 0:
        end = stop = at + 12
        while stop < len(value) and value[stop] in b"0123456789- ":
            stop += 1
        return int(value[end:stop])
    return json.loads(value)["newest_ts"]


# ---- the children --------------------------------------------------------------------------------------------------

def producer_child(spec: dict) -> None:
    """Send spec["rate"] events/s for spec["seconds"]; print {"sent", "failed", "start_ms", "end_ms"}."""
    import orjson
    from confluent_kafka import Producer
    users, items = spec["users"], spec["items"]   # items: {scene: [item ids]}
    scenes = list(items)
    # murmur2, as aiokafka and the Java clients partition: a user's clicks land where its history (or seeded
    # state) is, not where librdkafka's default CRC32 would put them
    p = Producer({"bootstrap.servers": spec["bootstrap"], "linger.ms": 1, "enable.idempotence": False,
                  "partitioner": "murmur2_random"})
    failed = [0]

    def delivered(err, _msg):
        if err is not None:
            failed[0] += 1

    rng = random.Random(spec["seed"])
    run, rate, seconds, tick = uuid.uuid4().hex[:6], spec["rate"], spec["seconds"], 0.01
    sent = 0
    start_ms = int(time.time() * 1000)
    t0 = time.perf_counter()
    next_tick = t0
    while True:
        now = time.perf_counter()
        if now - t0 >= seconds:
            break
        due = int((now - t0) * rate) - sent
        ts = int(time.time() * 1000)
        for _ in range(max(0, due)):
            user = f"r{rng.randrange(users)}"
            scene = scenes[rng.randrange(len(scenes))]
            pool = items[scene]
            value = orjson.dumps({"event_id": f"ramp-{run}-{sent}", "user_id": user, "item_id": pool[rng.randrange(len(pool))],
                                  "scene": scene, "action": "click", "ts": ts})
            while True:
                try:
                    p.produce("clicks", value, key=user.encode(), on_delivery=delivered)
                    break
                except BufferError:
                    p.poll(0.001)
            sent += 1
        p.poll(0)
        next_tick += tick
        delay = next_tick - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            next_tick = time.perf_counter()
    end_ms = int(time.time() * 1000)
    p.flush(30)
    print(json.dumps({"sent": sent, "failed": failed[0], "start_ms": start_ms, "end_ms": end_ms,
                      "seconds": time.perf_counter() - t0}), flush=True)


def consumer_child(spec: dict) -> None:
    """Read user-interests from its end until SIGTERM; then write [[receive_ms, newest_ts], ...] to spec["out"]."""
    from confluent_kafka import Consumer, TopicPartition, OFFSET_END
    c = Consumer({"bootstrap.servers": spec["bootstrap"], "group.id": f"ramp-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 10, "fetch.min.bytes": 1})
    meta = c.list_topics("user-interests", timeout=10)
    parts = sorted(meta.topics["user-interests"].partitions)
    c.assign([TopicPartition("user-interests", p, OFFSET_END) for p in parts])
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    pairs: list[tuple[int, int]] = []
    c.consume(num_messages=1, timeout=1.0)   # resolves "the end" before the first step
    print("ready", flush=True)
    while not stop[0]:
        # poll hands over one message as soon as librdkafka has it; consume(num_messages, timeout) may hold what it
        # has until the batch fills or the timeout ends, and every message of it would be stamped that late
        m = c.poll(0.05)
        if m is not None and m.error() is None:
            pairs.append((int(time.time() * 1000), newest_ts(m.value())))
    c.close()
    Path(spec["out"]).write_text(json.dumps(pairs))


# ---- the ramp ------------------------------------------------------------------------------------------------------

def history(users: int, items: dict[str, list[str]], window: int, seed: int = 3) -> list[bytes]:
    """Every user's full window in every scene, ordered by user, ts ending an hour ago."""
    import orjson
    rng = random.Random(seed)
    end = int(time.time() * 1000) - 3_600_000
    per_user = window * len(items)
    out = []
    for u in range(users):
        k = 0
        for scene, pool in items.items():
            for _ in range(window):
                out.append(orjson.dumps({"event_id": f"h{u}-{k}", "user_id": f"r{u}", "scene": scene,
                                         "item_id": pool[rng.randrange(len(pool))], "action": "click",
                                         "ts": end - (per_user - k) * 1000}))
                k += 1
    return out


async def seed_changelog(bootstrap: str, app: str, users: int, items: dict[str, list[str]], window: int,
                         partitions: int, seed: int = 3) -> float:
    """The history as the worker's own state instead of clicks: every user's full window in every scene written as
    changelog records (stream/live/changelog.py's form, in the clicks partition of the user) before the worker
    starts, so it recovers them. One record per window, not one per event: 100,000 users x 3 scenes x 50 events as
    clicks would be 15M records, past what the embedded broker holds in RAM. Returns the seconds it took."""
    import numpy as np
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from scenestream.stream.core.window import ACTIONS, ITEMS
    from scenestream.stream.live.changelog import encode_windows, state_key
    from scenestream.stream.live.record_batches import key_partitions
    from scenestream.stream.live.topics import COMPACTED
    t0 = time.perf_counter()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic("clicks", partitions, 1),
                               NewTopic(f"{app}-state-changelog", partitions, 1, topic_configs=COMPACTED)])
    await admin.close()
    rng = np.random.default_rng(seed)
    end = int(time.time() * 1000) - 3_600_000
    codes = {s: np.array([ITEMS.id(i) for i in pool], np.int32) for s, pool in items.items()}
    click = ACTIONS.id("click")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20,
                                compression_type="zstd")
    await producer.start()
    try:
        names = [f"r{u}" for u in range(users)]
        parts = key_partitions([n.encode() for n in names], partitions)
        sends = []
        for u, (name, part) in enumerate(zip(names, parts)):
            for k, (scene, pool) in enumerate(codes.items()):
                ids = [f"h{u}-{k}-{j}".encode() for j in range(window)]
                ts = end - (window - np.arange(window, dtype=np.int64)) * 1000 - k
                value = encode_windows([(scene, ts, [len(i) for i in ids], b"".join(ids),
                                         pool[rng.integers(len(pool), size=window)], np.full(window, click))])
                sends.append(await producer.send(f"{app}-state-changelog", value,
                                                 key=state_key(name, scene), partition=part))
            if len(sends) > 20_000:
                await asyncio.gather(*sends)
                sends = []
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    return time.perf_counter() - t0


def warmup(users: int, items: dict[str, list[str]], seed: int = 4) -> list[bytes]:
    """One click per user, after its seeded history and before the ramp, so that every user has been encoded (and
    cached, as far as the cache holds) before the ramp, as applying the history as clicks does."""
    import orjson
    rng = random.Random(seed)
    ts = int(time.time() * 1000) - 1_800_000
    scenes = list(items)
    return [orjson.dumps({"event_id": f"w{u}", "user_id": f"r{u}", "scene": scenes[u % len(scenes)],
                          "item_id": rng.choice(items[scenes[u % len(scenes)]]), "action": "click", "ts": ts})
            for u in range(users)]


def ready_seconds(port: int, proc, timeout: float, expect_events: int) -> dict:
    """Seconds until the worker's /readyz answers 200 (its state recovered), and a check that it holds the seeded
    windows: user r0's record counts `expect_events` events."""
    import urllib.request
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1.0) as r:
                if r.status == 200:
                    ready = time.perf_counter() - t0
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/users/r0/interests", timeout=30) as q:
                        held = json.loads(q.read())["events"]
                    if held != expect_events:
                        return {"error": f"user r0 holds {held} events, not the {expect_events} seeded"}
                    return {"ready_seconds": ready, "complete": True, "rss_mb": rss_mb(proc.pid)}
        except OSError:
            pass
        time.sleep(0.2)
    return {"error": f"not ready in {timeout:.0f} s" if proc.poll() is None else f"exited with {proc.returncode}"}


def percentile(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100.0 * len(s) + 0.5) - 1))]


def run_child(kind: str, spec: dict, env: dict) -> subprocess.Popen:
    fd, path = tempfile.mkstemp(suffix=".json")   # the item lists outgrow a command line
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), kind, path],
                            stdout=subprocess.PIPE, text=True, env=env)


def scene_items(events) -> dict[str, list[str]]:
    """Each scene's distinct items in the events, sorted: what the ramp's and the soak's users click."""
    items: dict[str, set] = {}
    for e in events:
        items.setdefault(e.scene, set()).add(e.item_id)
    return {scene: sorted(v) for scene, v in sorted(items.items())}


def new_side(name: str, against: Optional[str], ckpt: str, args) -> dict:
    """One side of the ramp (this checkout's worker, or --against's) before its steps; `ramp` drops its "ctx"."""
    from scenestream.model.checkpoint import load_checkpoint
    from scenestream.stream.datasets.synthetic import SyntheticSpec, generate

    window = load_checkpoint(ckpt).window
    items = scene_items(generate(SyntheticSpec())[0])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    worker_env = dict(env)
    if against:
        pkg = Path(tempfile.mkdtemp())
        (pkg / "scenestream").symlink_to(Path(against).resolve())
        worker_env["PYTHONPATH"] = str(pkg)
    return {"side": name, "checkout": against or str(Path(__file__).resolve().parents[1]),
            "users": args.ramp_users, "window": window, "history": args.ramp_history, "broker": args.ramp_broker,
            "history_events": args.ramp_users * len(items) * window, "steps": [],
            "ctx": dict(name=name, ckpt=ckpt, items=items, window=window, env=env, worker_env=worker_env)}


def on_one_broker(side: dict, rates: list[int], args, load: Callable, consumed: Callable, worker_rate: Callable,
                  say: Callable) -> bool:
    """A fresh broker and worker holding the users' full windows, then `rates` step by step; the steps go to
    side["steps"]. False when the side's ramp ends here: an error (side["error"]), or a step not drained."""
    from scenestream.stream.local.broker import EmbeddedBroker
    from scenestream.stream.local.processes import free_port, spawn, stop_process
    from scenestream.stream.live.produce import produce_lines

    name, ckpt, items, window = (side["ctx"][k] for k in ("name", "ckpt", "items", "window"))
    env, worker_env = side["ctx"]["env"], side["ctx"]["worker_env"]
    seeded = args.ramp_history == "changelog"
    lines = [] if seeded else history(args.ramp_users, items, window)
    app = f"ramp-{uuid.uuid4().hex[:8]}"
    steps, spans, pairs = [], [], []
    with EmbeddedBroker() as b:
        if seeded:
            side["load_seconds"] = asyncio.run(seed_changelog(b.bootstrap, app, args.ramp_users, items, window,
                                                              args.ramp_partitions))
        else:
            side["load_seconds"] = asyncio.run(load(b.bootstrap, lines))
        say(f"[{name}] loaded {args.ramp_users:,} users x {len(items)} scenes x {window} history events "
            f"({'as changelog records' if seeded else 'as clicks'}) in {side['load_seconds']:.1f} s")
        port = free_port()
        log_path = str(Path(tempfile.mkdtemp()) / "worker.log")
        cmd = [sys.executable, "-m", "scenestream.stream.cli", "worker", "--broker", b.url, "--checkpoint", ckpt,
               "--web-port", str(port), "--device", "cpu", "--app-id", app, "--partitions",
               str(args.ramp_partitions), *args.ramp_worker_args.split()]
        proc = spawn(cmd, log_path, env=worker_env)
        consumer = None
        try:
            if seeded:
                w = ready_seconds(port, proc, args.timeout, len(items) * window)
                say(f"[{name}] worker recovered the history in {w.get('ready_seconds') or 0:.1f} s, RSS "
                    f"{rss_mb(proc.pid) or 0:,.0f} MB" + (f"  ERROR {w['error']} (log {log_path})" if "error" in w
                                                          else ""))
            else:
                w = worker_rate(port, proc, len(lines), args.poll, args.timeout)
                say(f"[{name}] worker applied the history at {w.get('events_per_s') or 0:,.0f} events/s"
                    + (f"  ERROR {w['error']} (log {log_path})" if "error" in w else ""))
            side["history_worker"] = w
            if seeded and "error" not in w:   # recovery encodes nothing: every user's first touch, as a backlog
                warm = warmup(args.ramp_users, items)
                asyncio.run(produce_lines(b.bootstrap, "clicks", warm, progress=False))
                w = side["warmup_worker"] = worker_rate(port, proc, len(warm), args.poll, args.timeout)
                say(f"[{name}] warm-up, one event per user: {w.get('events_per_s') or 0:,.0f} events/s, RSS "
                    f"{rss_mb(proc.pid) or 0:,.0f} MB" + (f"  ERROR {w['error']}" if "error" in w else ""))
            if "error" in w or not w.get("complete"):
                side["error"] = w.get("error", "history not applied")
                return False
            out = str(Path(tempfile.mkdtemp()) / "pairs.json")
            consumer = run_child("consumer", {"bootstrap": b.bootstrap, "out": out}, env)
            if consumer.stdout.readline().strip() != "ready":
                side["error"] = "the output consumer did not start"
                return False
            time.sleep(2.0)
            for rate in rates:
                before = consumed(port)
                rss0 = rss_mb(proc.pid)
                prod = run_child("producer", {"bootstrap": b.bootstrap, "users": args.ramp_users, "items": items,
                                              "rate": rate, "seconds": args.ramp_seconds,
                                              "seed": 100 + len(side["steps"]) + len(steps)}, env)
                sent = json.loads(prod.communicate()[0].strip().splitlines()[-1])
                t_sent = time.perf_counter()
                drained = None
                while time.perf_counter() - t_sent < args.drain_max:
                    n = consumed(port)
                    if n is not None and before is not None and n - before >= sent["sent"] - sent["failed"]:
                        drained = time.perf_counter() - t_sent
                        break
                    time.sleep(0.1)
                time.sleep(args.settle)
                steps.append({"rate": rate, **sent, "achieved_rate": sent["sent"] / sent["seconds"],
                              "drain_seconds": drained, "worker_rss_mb": rss_mb(proc.pid),
                              "worker_rss_mb_before": rss0})
                spans.append((sent["start_ms"], sent["end_ms"]))
                say(f"[{name}] {rate:,} events/s: sent {sent['sent']:,} in {sent['seconds']:.1f} s, "
                    + (f"drained {drained:.1f} s after" if drained is not None else
                       f"NOT drained within {args.drain_max:.0f} s"))
                if drained is None:
                    break
            consumer.send_signal(signal.SIGTERM)
            consumer.wait(timeout=60)
            pairs = json.loads(Path(out).read_text())
            consumer = None
        finally:
            if consumer is not None:
                consumer.kill()
            stop_process(proc)
            for step, (lo, hi) in zip(steps, spans):
                lat = [r - ts for r, ts in pairs if lo <= ts <= hi]
                step.update(records=len(lat), p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99),
                            max_ms=max(lat) if lat else None)
            side["steps"] += steps
    return all(s["drain_seconds"] is not None for s in steps)


def rss_mb(pid: int) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def ramp(ckpt: str, args, load, consumed, worker_rate, say) -> dict:
    """Both sides, the --against one first. With a broker per step the sides take turns step by step, so each pair
    of steps sees the same machine (a shared one swings 2-3x in a day); a side that fell behind runs no more steps.
    The knee of a side: its highest step with p99 <= 100 ms that drained."""
    sides = ([new_side("against", args.against, ckpt, args)] if args.against else []) + [
        new_side("this", None, ckpt, args)]
    groups = [[r] for r in args.ramp_rates] if args.ramp_broker == "per-step" else [list(args.ramp_rates)]
    going = list(sides)
    for rates in groups:
        going = [s for s in going if on_one_broker(s, rates, args, load, consumed, worker_rate, say)]
    for side in sides:
        del side["ctx"]
        ok = [s["rate"] for s in side["steps"] if s["drain_seconds"] is not None and s["p99_ms"] is not None
              and s["p99_ms"] <= KNEE_P99_MS]
        side["knee"] = max(ok) if ok else None
    return {"users": args.ramp_users, "seconds": args.ramp_seconds, "rates": args.ramp_rates,
            "broker": args.ramp_broker, "knee_p99_ms": KNEE_P99_MS, "sides": sides}


def report_lines(r: dict) -> list[str]:
    out = [f"  fresh ramp: {r['users']:,} users with full windows, {r['seconds']:.0f} s per step; "
           f"knee = highest step with p99 <= {r['knee_p99_ms']:.0f} ms"]
    for s in r["sides"]:
        out.append(f"    [{s['side']}] {s['checkout']}: knee {s.get('knee') or 'none'} events/s"
                   + (f"  ERROR {s['error']}" if "error" in s else ""))
        for st in s["steps"]:
            def f(x):
                return "n/a" if x is None else f"{x:,.0f}"
            out.append(f"      {st['rate']:>6,}/s achieved {st['achieved_rate']:>8,.0f}  p50 {f(st['p50_ms']):>7} ms"
                       f"  p99 {f(st['p99_ms']):>7} ms  max {f(st['max_ms']):>7} ms  records {st['records']:>7,}"
                       f"  drained {f(None if st['drain_seconds'] is None else st['drain_seconds'] * 1000)} ms"
                       f"  worker RSS {f(st['worker_rss_mb'])} MB")
    return out


if __name__ == "__main__":
    kind, spec_path = sys.argv[1], sys.argv[2]
    {"producer": producer_child, "consumer": consumer_child}[kind](json.loads(Path(spec_path).read_text()))
