"""Live ceilings and freshness in one run, against one embedded broker (Tansu) loaded once with synthetic clicks.

What it measures, each with its own consumer group reading the whole `clicks` topic (4 partitions) from the start:

  raw      a plain aiokafka consumer: getmany() and orjson.loads (then json.loads) of every value; the most a
           Python consumer gets out of this broker on this machine. It reads the topic in about a second, so one
           run is noisy: --raw-repeat runs per decoder (interleaved), the median reported
  noop     a Faust agent that does nothing with its events, built with the worker's own settings
           (stream/live/worker.py: faust_settings) and the worker's stream.take_events(batch_max, within=batch_wait);
           run in a child process; the rate is timed inside the agent: first micro-batch to last
  worker   the real worker (python -m scenestream.stream.cli worker ... --device cpu), timed by its own Prometheus
           counter scenestream_events_consumed, polled at /metrics: from the first poll showing > 0 to the poll
           showing every event. Ratios worker/noop and worker/raw are reported.

Every rate leaves out startup, the group join and the first batch (events counted after the first sight of one,
over the time after it). Then, with the same worker still running:

  freshness  a producer (linger_ms=0) sends new events for existing users/items at a steady rate of
             --fresh-fraction x the worker's measured events/s for --fresh-seconds (scheduled by absolute time, a
             small burst every --tick seconds), each with ts = its send time (epoch ms) and a new event_id, keyed
             by user_id; a consumer of `user-interests` (started first, at the end of the topic) takes, for every
             output record, receive time minus the record's newest_ts: p50/p95/p99/max, the count, and p50 per 10 s
             (steady, or growing because the worker falls behind?). After the last send it waits (--drain-max) until
             the worker has counted every event sent, so late outputs are in the figures too.

Tansu (0.6.0) answers ListOffsets(latest) with the last record batch's base offset + 1, so a consumer "at the end"
re-reads that batch's tail: such outputs (newest_ts before the first send) are counted as stale_records, not latency.

    python bench/live.py [--events N] [--checkpoint CKPT] [--fresh-fraction 0.5] [--fresh-seconds 60] [--json]
    python bench/live.py --phases raw,noop --noop-variants all --repeat 3      # Faust's ceiling, other settings
    python bench/live.py --phases noop --noop-variants baseline,uvloop --profile /tmp/prof --profile-blocking

Besides events/s, each measurement reports the measured process's CPU time per event (CPU us/event; for the worker,
all its threads) and the share of the span its main thread sat runnable in the run queue while other processes held
the CPUs (runq). On this 2-core machine, other work on the box lowers the wall rates but not CPU us/event:
compare CPU us/event when runq is not near 0. bench/faust_ceiling.md has the no-op agent's figures and profile.

--json prints one JSON object as the last stdout line (the human summary then goes to stderr). Runs ~3-4 minutes
with the defaults, training the tiny checkpoint included (--checkpoint skips that ~20 s).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Optional

from scenestream.stream.core.output import MAGIC, read_record

PARTITIONS = 4

# Named no-op variants: Faust's public settings (faust.App keywords) over the worker's, plus knobs of this script:
#   uvloop      mode.loop.use("uvloop") before the app exists (what `faust -L uvloop worker` does)
#   quiet_monitor  the `Monitor` setting set to a Monitor whose per-message/per-event hooks do nothing
#   no_sensors  app.sensors.remove(app.monitor) once the app has started: no sensor at all on the per-event path
#   env         environment of the child (NO_CYTHON=1: Faust's pure-Python stream iterator instead of the Cython one)
#   batch_max / batch_wait  take_events' arguments (default: WorkerConfig's batch_max / batch_wait)
#   iterate     "take_events" (the worker's way), "events" (async for ev in stream.events(): no take buffer)
# `--noop-variants all` runs every one against the same topic; `--repeat N` runs the list N times, interleaved.
MB = 1024 * 1024
NOOP_VARIANTS: dict[str, dict] = {
    "baseline": {},
    "uvloop": {"uvloop": True},
    "quiet_monitor": {"quiet_monitor": True},
    "no_sensors": {"no_sensors": True},
    "cython_opt": {"settings": {"cython_optimizations": True}},   # this faust's opt-in repaired Cython fast paths
    "no_cython": {"env": {"NO_CYTHON": "1"}},
    "buffer_64k": {"settings": {"stream_buffer_maxsize": 65536}},
    "poll_500": {"settings": {"broker_max_poll_records": 500}},
    "fetch_16M": {"settings": {"consumer_max_fetch_size": 16 * MB}},
    "processing_timeout_1": {"settings": {"stream_processing_timeout": 1.0}},
    "take_100": {"batch_max": 100},
    "take_10000": {"batch_max": 10000, "batch_wait": 1.0},
    "iter_events": {"iterate": "events"},
    "all_tuned": {"uvloop": True, "no_sensors": True, "batch_max": 10000, "batch_wait": 1.0,
                  "settings": {"stream_buffer_maxsize": 65536, "consumer_max_fetch_size": 16 * MB,
                               "cython_optimizations": True}},
}


# ---- the no-op Faust agent (child process) ------------------------------------------------------------------------

def noop_child(spec: dict) -> None:
    """Run a Faust worker whose agent only counts; write {"events", "seconds", ...} to spec["out"] and exit once it
    has seen spec["expect"] events (with spec["hold"], wait for that file to appear first: a profiler is attached)."""
    if spec.get("uvloop"):
        import mode.loop
        mode.loop.use("uvloop")
    import faust
    from scenestream.stream.local.processes import free_port
    from scenestream.stream.live.worker import WorkerConfig, faust_settings

    cfg = WorkerConfig(broker=spec["broker"], app_id=spec["app_id"], web_port=free_port())
    settings = {**faust_settings(cfg), **spec.get("settings", {})}
    if spec.get("quiet_monitor"):
        # a Monitor (the consumer calls its track_tp_end_offset, web views read it) whose per-message and per-event
        # hooks do nothing
        def nothing(*_args, **_kwargs) -> None:
            return None
        settings["Monitor"] = type("QuietMonitor", (faust.Monitor,), dict.fromkeys(
            ("on_message_in", "on_stream_event_in", "on_stream_event_out", "on_message_out"), nothing))
    app = faust.App(cfg.app_id, **settings)
    clicks = app.topic(cfg.clicks_topic, key_serializer="raw", value_serializer="raw", partitions=cfg.partitions)
    batch_max = spec.get("batch_max") or cfg.batch_max
    batch_wait = spec.get("batch_wait") or cfg.batch_wait
    expect, out, started = spec["expect"], Path(spec["out"]), Path(spec["out"] + ".started")
    hold = Path(spec["hold"]) if spec.get("hold") else None

    if spec.get("no_sensors"):
        async def drop_sensors() -> None:
            app.sensors.remove(app.monitor)   # added when the app starts (App.on_init_dependencies)
        app.task(drop_sensors)

    cpu0 = [0.0, 0.0, 0.0]
    schedstat = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")

    def run_delay() -> float:
        """Seconds the main thread has spent runnable but waiting for a CPU (another process had it)."""
        try:
            return int(schedstat.read_text().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return float("nan")

    def mark_start() -> None:
        cpu0[:] = [time.process_time(), time.thread_time(), run_delay()]
        started.touch()

    async def finish(seen: int, first_n: int, first_at: float, now: float, batches: int) -> None:
        span = now - first_at
        cpu, main_cpu, waited = time.process_time() - cpu0[0], time.thread_time() - cpu0[1], run_delay() - cpu0[2]
        result = json.dumps({"events": seen, "timed_events": seen - first_n, "seconds": span, "batches": batches,
                             "events_per_s": (seen - first_n) / span if span > 0 else None,
                             # CPU seconds over the timed span: the whole process, and its main (event-loop) thread
                             "cpu_share": cpu / span if span > 0 else None,
                             "main_thread_cpu_share": main_cpu / span if span > 0 else None,
                             # ... and the share it was runnable but not running (CPU taken by other processes)
                             "main_thread_runqueue_share": waited / span if span > 0 else None,
                             "process_cpu_us_per_event": cpu / (seen - first_n) * 1e6 if seen > first_n else None})
        while hold is not None and not hold.exists():
            await asyncio.sleep(0.1)
        out.write_text(result)
        os._exit(0)

    async def noop(stream):
        seen, first_at, first_n, batches = 0, None, 0, 0
        if spec.get("iterate") == "events":
            async for _ in stream.events():
                seen += 1
                if first_at is None:
                    first_at, first_n = time.perf_counter(), 1
                    mark_start()
                if seen >= expect:
                    await finish(seen, first_n, first_at, time.perf_counter(), seen)
            return
        async for batch in stream.take_events(batch_max, within=batch_wait):
            now = time.perf_counter()
            seen += len(batch)
            batches += 1
            if first_at is None:
                first_at, first_n = now, len(batch)
                mark_start()
            if seen >= expect:
                await finish(seen, first_n, first_at, now, batches)

    app.agent(clicks, name="noop")(noop)
    faust.Worker(app, loglevel="warning", console_port=0).execute_from_commandline()


def cpu_seconds(pid: Optional[int]) -> Optional[float]:
    """user + system CPU seconds of a process so far (Linux /proc), None when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


def run_noop(url: str, expect: int, name: str, variant: dict, timeout: float, profile: Optional[str],
             profile_seconds: float, broker_pid: Optional[int] = None, nonblocking: bool = True) -> dict:
    """One no-op child; with `profile`, py-spy records it for `profile_seconds` from its first batch on (so startup
    and the group join are left out) into PROFILE/noop-NAME.txt (raw: one line per stack, then its sample count)."""
    from scenestream.stream.local.processes import die_with_parent, stop_process
    out = Path(tempfile.mkdtemp()) / "noop.json"
    started, hold = Path(str(out) + ".started"), Path(str(out) + ".hold")
    spec = {**variant, "broker": url, "app_id": f"bench-noop-{name}-{uuid.uuid4().hex[:8]}", "expect": expect,
            "out": str(out), "hold": str(hold) if profile else ""}
    log = out.with_name("noop.log")
    env = {**os.environ, **variant.get("env", {})}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--noop-child", json.dumps(spec)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            preexec_fn=die_with_parent, start_new_session=True)
    spy = None
    broker_cpu = None   # (CPU s, wall s) of the broker when the first batch was seen
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline and not out.exists():
            if broker_cpu is None and started.exists():
                broker_cpu = (cpu_seconds(broker_pid), time.perf_counter())
            if profile and spy is None and started.exists():
                Path(profile).mkdir(parents=True, exist_ok=True)
                # --idle keeps the samples of threads waiting in the selector (to see how busy the loop is);
                # --nonblocking: py-spy does not pause the process it samples (as it must not, here)
                spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                                        str(proc.pid), *(["--nonblocking"] if nonblocking else []), "--idle",
                                        "--threads", "--rate", "200",
                                        "--duration", str(max(1, int(profile_seconds))), "--format", "raw", "-o",
                                        str(Path(profile) / f"noop-{name}.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if spy is not None and spy.poll() is not None:
                hold.touch()
            time.sleep(0.05)
        if profile and not hold.exists():
            hold.touch()
        while proc.poll() is None and time.monotonic() < deadline and not out.exists():
            time.sleep(0.05)
        if not out.exists():
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            why = "timed out" if proc.poll() is None else f"exit {proc.poll()}"
            return {"variant": name, "error": f"no result ({why}): {tail}"}
        got = json.loads(out.read_text())
        if broker_cpu is not None and broker_cpu[0] is not None and not profile:
            used = cpu_seconds(broker_pid)
            got["broker_cpu_share"] = (used - broker_cpu[0]) / (time.perf_counter() - broker_cpu[1]) \
                if used is not None else None
    finally:
        if spy is not None and spy.poll() is None:
            spy.wait(timeout=30)
        stop_process(proc)
    return {"variant": name, **variant, **got}


# ---- topic loading and the raw consumer ---------------------------------------------------------------------------

async def load_clicks(bootstrap: str, lines: list[bytes]) -> float:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from scenestream.stream.live.produce import produce_lines
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic("clicks", PARTITIONS, 1)])
    await admin.close()
    t0 = time.perf_counter()
    await produce_lines(bootstrap, "clicks", lines, progress=False)
    return time.perf_counter() - t0


async def raw_rate(bootstrap: str, expect: int, decoder: str, timeout: float, max_records: int) -> dict:
    from aiokafka import AIOKafkaConsumer
    if decoder == "orjson":
        import orjson
        loads = orjson.loads
    else:
        loads = json.loads
    c = AIOKafkaConsumer("clicks", bootstrap_servers=bootstrap, group_id=f"bench-raw-{uuid.uuid4().hex[:8]}",
                         auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000,
                         rebalance_timeout_ms=10000)
    await c.start()
    seen, first_at, first_n, last_at, fetches, cpu0 = 0, None, 0, None, 0, 0.0
    deadline = time.monotonic() + timeout
    try:
        while seen < expect and time.monotonic() < deadline:
            got = await c.getmany(timeout_ms=200, max_records=max_records or None)
            n = 0
            for msgs in got.values():
                for m in msgs:
                    loads(m.value)
                n += len(msgs)
            if not n:
                continue
            now = time.perf_counter()
            fetches += 1
            seen += n
            last_at = now
            if first_at is None:
                first_at, first_n, cpu0 = now, n, time.process_time()
        cpu = time.process_time() - cpu0
    finally:
        await c.stop()
    span = (last_at - first_at) if first_at is not None else 0.0
    timed = seen - first_n
    return {"decoder": decoder, "max_records": max_records, "events": seen, "timed_events": timed, "seconds": span,
            "fetches": fetches, "events_per_s": timed / span if span > 0 else None,
            "cpu_share": cpu / span if span > 0 else None,
            "process_cpu_us_per_event": cpu / timed * 1e6 if timed > 0 else None}


# ---- the real worker ---------------------------------------------------------------------------------------------

def scrape(port: int) -> dict[str, float]:
    """The worker's scenestream_* counters from /metrics (counter samples end in _total)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("scenestream_events_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def consumed(port: int) -> Optional[float]:
    try:
        return scrape(port).get("scenestream_events_consumed_total", 0.0)
    except OSError:
        return None


def run_delay(pid: int) -> Optional[float]:
    """Seconds the process's main thread has waited, runnable, for a CPU (Linux schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def worker_rate(port: int, proc: subprocess.Popen, expect: int, poll: float, timeout: float,
                stall: float = 30.0) -> dict:
    """Poll the counter until it shows `expect` events (or stops moving for `stall` s)."""
    deadline = time.monotonic() + timeout
    first: Optional[tuple[float, float]] = None
    cpu_first = cpu_last = wait_first = wait_last = None
    last: tuple[float, float] = (0.0, time.perf_counter())
    moved = time.monotonic()
    while time.monotonic() < deadline and proc.poll() is None:
        n = consumed(port)
        now = time.perf_counter()
        if n is not None and n > 0:
            if first is None:
                first = (n, now)
                cpu_first, wait_first = cpu_seconds(proc.pid), run_delay(proc.pid)
            if n != last[0]:
                last, moved = (n, now), time.monotonic()
                cpu_last, wait_last = cpu_seconds(proc.pid), run_delay(proc.pid)
            if n >= expect or time.monotonic() - moved > stall:
                break
        time.sleep(poll)
    if first is None:
        return {"error": "the worker never counted an event" if proc.poll() is None else
                f"the worker exited with {proc.returncode}"}
    span = last[1] - first[1]
    timed = last[0] - first[0]
    cpu = (cpu_last - cpu_first) if cpu_first is not None and cpu_last is not None else None
    waited = (wait_last - wait_first) if wait_first is not None and wait_last is not None else None
    counters = {}
    try:
        counters = scrape(port)
    except OSError:
        pass
    return {"events": int(last[0]), "expected": expect, "complete": last[0] >= expect,
            "timed_events": int(last[0] - first[0]), "seconds": span,
            "events_per_s": timed / span if span > 0 else None,
            # CPU seconds of the whole worker (all threads: torch may use both cores) over the timed span
            "cpu_share": cpu / span if cpu is not None and span > 0 else None,
            "process_cpu_us_per_event": cpu / timed * 1e6 if cpu is not None and timed > 0 else None,
            "main_thread_runqueue_share": waited / span if waited is not None and span > 0 else None,
            "invalid": int(counters.get("scenestream_events_invalid_total", 0)),
            "late_dropped": int(counters.get("scenestream_events_late_dropped_total", 0))}


# ---- freshness ---------------------------------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100.0 * len(s) + 0.5) - 1))]


def newest_ts(value: bytes, loads) -> int:
    """The record's "newest_ts" (epoch ms). Records are large (every vector), so the field is found by a byte
    search first (a record is compact JSON whose only "newest_ts" key is its own), falling back to a full parse:
    this process shares 2 CPUs with the worker it measures."""
    if value[:4] == MAGIC:   # the binary form: its only int64 after the header's names
        return read_record(value)["newest_ts"]
    at = value.rfind(b'"newest_ts":')
    if at >= 0:
        end = at + 12
        stop = end
        while stop < len(value) and value[stop] in b"0123456789- ":
            stop += 1
        try:
            return int(value[end:stop])
        except ValueError:
            pass
    return loads(value)["newest_ts"]


async def freshness(bootstrap: str, templates: list, rate: float, seconds: float, tick: float,
                    settle: float, counted: Callable[[], Optional[float]], drain_max: float) -> dict:
    """Send at `rate` events/s for `seconds`; then wait (at most `drain_max` s) until the worker has counted every
    event sent (`counted()`: its scenestream_events_consumed), and read the outputs `settle` s more. Latency per
    output record."""
    counted0 = await asyncio.to_thread(counted)
    import orjson
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(["user-interests"])
    finally:
        await admin.close()
    parts = sorted(p["partition"] for t in described for p in t.get("partitions", []))
    if not parts:
        raise RuntimeError("the worker has not created user-interests")
    out = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20)
    await out.start()
    tps = [TopicPartition("user-interests", p) for p in parts]
    out.assign(tps)
    await out.seek_to_end(*tps)
    for tp in tps:
        await out.position(tp)   # resolve "the end" now, before anything is sent

    latencies: list[float] = []
    received_at: list[float] = []   # seconds after the first send, per latency
    stale: list[float] = []   # records about no fresh event (newest_ts before the first send): their age, ms
    t_start_ms = time.time() * 1000
    stop_reading = asyncio.Event()

    async def read():
        while not stop_reading.is_set():
            got = await out.getmany(timeout_ms=50)
            now_ms = time.time() * 1000
            for msgs in got.values():
                for m in msgs:
                    newest = newest_ts(m.value, orjson.loads)
                    if newest >= t_start_ms:
                        latencies.append(now_ms - newest)
                        received_at.append((now_ms - t_start_ms) / 1000)
                    else:
                        stale.append(now_ms - newest)

    reader = asyncio.create_task(read())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    rng = random.Random(7)
    run = uuid.uuid4().hex[:6]
    sent, failed, futures = 0, 0, []
    per_second: list[int] = []
    loop_late = 0.0
    try:
        t0 = time.perf_counter()
        end = t0 + seconds
        next_tick = t0
        second_mark, in_second = t0 + 1.0, 0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            while now >= second_mark:
                per_second.append(in_second)
                in_second, second_mark = 0, second_mark + 1.0
            due = int((now - t0) * rate) - sent
            for _ in range(max(0, due)):
                e = templates[rng.randrange(len(templates))]
                ts = int(time.time() * 1000)
                value = orjson.dumps({"event_id": f"fresh-{run}-{sent}", "user_id": e.user_id, "item_id": e.item_id,
                                      "scene": e.scene, "action": e.action, "ts": ts})
                futures.append(await producer.send("clicks", value, key=e.user_id.encode("utf-8", "surrogatepass")))
                sent += 1
                in_second += 1
            if len(futures) > 2000:
                done = [f for f in futures if f.done()]
                failed += sum(1 for f in done if f.exception() is not None)
                futures = [f for f in futures if not f.done()]
            next_tick += tick
            delay = next_tick - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                loop_late = max(loop_late, -delay)
                next_tick = time.perf_counter()
        elapsed = time.perf_counter() - t0
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed += sum(1 for r in results if isinstance(r, BaseException))
        sent_at = time.perf_counter()
        drained = None
        while time.perf_counter() - sent_at < drain_max:
            now_counted = await asyncio.to_thread(counted)
            if counted0 is not None and now_counted is not None and now_counted - counted0 >= sent - failed:
                drained = time.perf_counter() - sent_at
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(settle)
    finally:
        stop_reading.set()
        await reader
        await producer.stop()
        await out.stop()
    full = per_second[: int(seconds)]
    window = 10.0   # is the latency steady, or growing (the worker falling behind)?
    by_window: dict[int, list[float]] = {}
    for at, lat in zip(received_at, latencies, strict=True):
        by_window.setdefault(int(at // window), []).append(lat)
    windows = [{"from_s": k * window, "records": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99)}
               for k, v in sorted(by_window.items())]
    return {"target_rate": rate, "sent": sent, "failed_sends": failed, "send_seconds": elapsed,
            "achieved_rate": sent / elapsed if elapsed > 0 else None,
            "per_second_min": min(full) if full else None, "per_second_max": max(full) if full else None,
            "per_second_stdev": statistics.pstdev(full) if len(full) > 1 else None,
            "max_tick_lateness_ms": loop_late * 1000,
            # seconds from the last send until the worker had counted every event sent (None: not within drain_max):
            # near 0 when it keeps up; the backlog it built up, in seconds, when it does not
            "drain_seconds": drained,
            "records": len(latencies), "stale_records": len(stale),
            "stale_age_ms": [min(stale), max(stale)] if stale else None,
            "latency_ms": {"p50": pct(latencies, 50), "p95": pct(latencies, 95), "p99": pct(latencies, 99),
                           "max": max(latencies) if latencies else None,
                           "mean": statistics.fmean(latencies) if latencies else None},
            "latency_by_10s": windows}


# ---- the run ----------------------------------------------------------------------------------------------------

def median_of(runs: list[dict], key: str) -> Optional[float]:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def fmt(x: Optional[float], nd: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{nd}f}"


def main() -> None:
    from scenestream.stream.datasets.synthetic import SyntheticSpec, generate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=0,
                    help="Use only the first N synthetic events (default: all of SyntheticSpec(), ~119k).")
    ap.add_argument("--users", type=int, default=SyntheticSpec.users,
                    help=f"Users of the synthetic world (default {SyntheticSpec.users}). More users with fewer events "
                         "each (--events-per-user) make a backlog micro-batch hold ~1 event per user, as a fresh "
                         "one does: see BENCHMARKS.md on why that decides the freshness check.")
    ap.add_argument("--events-per-user", type=float, default=SyntheticSpec.events_per_user,
                    help=f"Mean events per synthetic user (default {SyntheticSpec.events_per_user:g}).")
    ap.add_argument("--checkpoint", default=None, help="Checkpoint the worker serves (default: train a tiny one, "
                                                       "~20 s: bench/tiny_checkpoint.py).")
    ap.add_argument("--phases", default="raw,noop,worker,fresh",
                    help="Comma list of raw, noop, worker, fresh (fresh needs worker), ramp (bench/fresh_ramp.py: "
                         "fresh traffic at rising rates against full windows, each step on a broker of its own). "
                         "Default: raw,noop,worker,fresh.")
    ap.add_argument("--ramp-users", type=int, default=2000, help="Ramp: users with full windows (default 2000).")
    ap.add_argument("--ramp-rates", default="1000,2000,4000,6000,8000,12000,16000",
                    help="Ramp: the steps' rates, events/s (default 1000,2000,4000,6000,8000,12000,16000).")
    ap.add_argument("--ramp-seconds", type=float, default=30.0, help="Ramp: seconds per step (default 30).")
    ap.add_argument("--ramp-history", choices=["clicks", "changelog"], default="clicks",
                    help="Ramp: the users' full windows sent as clicks the worker applies (default), or written as "
                         "its changelog records, which it recovers: one record per window, for --ramp-users beyond "
                         "what the embedded broker holds as clicks (~8 KB of its RAM per event).")
    ap.add_argument("--ramp-broker", choices=["per-step", "one"], default="per-step",
                    help="Ramp: each step on a broker and worker of its own (default), the sides taking turns step "
                         "by step, or every step on one (the embedded broker's fetches slow as its partitions fill "
                         "with small batches, so a step then also measures the steps before it).")
    ap.add_argument("--ramp-partitions", type=int, default=PARTITIONS,
                    help=f"Ramp: partitions of clicks and the worker's topics (default {PARTITIONS}).")
    ap.add_argument("--ramp-worker-args", default="",
                    help="Ramp: extra worker flags, e.g. '--encoder-cache-mb 2048' (default none).")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="Ramp: run it first against DIR's worker (a checkout of another commit), then this one's.")
    ap.add_argument("--noop-variants", default="baseline",
                    help=f"Comma list of no-op Faust variants, or 'all': {', '.join(NOOP_VARIANTS)}.")
    ap.add_argument("--repeat", type=int, default=1,
                    help="Run the no-op variants this many times, interleaved; the median is reported.")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="py-spy record each no-op variant's first run (from its first batch on; raw format, with "
                         "idle samples and thread ids) into DIR/noop-VARIANT.txt.")
    ap.add_argument("--profile-blocking", action="store_true",
                    help="Let py-spy pause the process for each sample (whole stacks; slows it) instead of "
                         "--nonblocking (the default: the process runs at full speed, some stacks come out torn).")
    ap.add_argument("--profile-seconds", type=float, default=5.0, help="Seconds each profile records (default 5).")
    ap.add_argument("--fresh-fraction", type=float, default=0.5,
                    help="Freshness send rate as a fraction of the worker's measured events/s (default 0.5).")
    ap.add_argument("--fresh-rate", type=float, default=0.0,
                    help="Freshness send rate in events/s (overrides --fresh-fraction).")
    ap.add_argument("--fresh-seconds", type=float, default=60.0, help="Seconds of steady sending (default 60).")
    ap.add_argument("--tick", type=float, default=0.01, help="Seconds between send bursts (default 0.01).")
    ap.add_argument("--drain-max", type=float, default=60.0,
                    help="Most seconds to wait, after the last send, for the worker to count every event sent "
                         "(default 60; the outputs of events it has not applied by then are not in the latencies).")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="Seconds to keep reading outputs once the worker has counted every event (default 2).")
    ap.add_argument("--raw-repeat", type=int, default=3,
                    help="Runs of the raw consumer per decoder, interleaved; the median is the yardstick (default 3: "
                         "one read of the topic takes about a second here, and single runs of it spread by +-25%%).")
    ap.add_argument("--raw-max-records", type=int, default=1000,
                    help="getmany(max_records=) of the raw consumer (default 1000: the rate is timed from the first "
                         "getmany to the last, so one call must not return the whole topic; 0 = unlimited).")
    ap.add_argument("--poll", type=float, default=0.1, help="Seconds between /metrics polls (default 0.1).")
    ap.add_argument("--timeout", type=float, default=300.0, help="Most seconds any one measurement may take.")
    ap.add_argument("--worker-log", default=None, help="Write the worker's log here (default: a temp file).")
    ap.add_argument("--json", action="store_true", help="Print one JSON object with every number as the last line.")
    ap.add_argument("--noop-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noop_child:
        noop_child(json.loads(args.noop_child))
        return

    from scenestream.stream.local.broker import EmbeddedBroker
    from scenestream.stream.core.events import encode
    from scenestream.stream.local.processes import free_port, spawn, stop_process
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = phases - {"raw", "noop", "worker", "fresh", "ramp"}
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}")
    if "fresh" in phases and "worker" not in phases:
        ap.error("fresh needs the worker phase")
    variants = list(NOOP_VARIANTS) if args.noop_variants == "all" else \
        [v.strip() for v in args.noop_variants.split(",") if v.strip()]
    for v in variants:
        if v not in NOOP_VARIANTS:
            ap.error(f"unknown no-op variant {v!r}; known: {', '.join(NOOP_VARIANTS)}")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    args.ramp_rates = [int(r) for r in args.ramp_rates.split(",") if r.strip()]
    ckpt = None
    if phases & {"worker", "ramp"}:
        if args.checkpoint:
            ckpt = args.checkpoint
        else:
            say("training a tiny checkpoint (~20 s) ...")
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from tiny_checkpoint import tiny_checkpoint
            ckpt = tiny_checkpoint()

    events, _ = generate(SyntheticSpec(users=args.users, events_per_user=args.events_per_user))
    if args.events:
        events = events[: args.events]
    lines = [encode(e) for e in events]
    n = len(lines)   # generate() yields valid events only: every line counts in scenestream_events_consumed
    report: dict = {"events": n, "users": len({e.user_id for e in events}), "partitions": PARTITIONS,
                    "cpus": os.cpu_count(), "python": sys.version.split()[0]}

    if "ramp" in phases:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from fresh_ramp import ramp, report_lines
        report["ramp"] = ramp(ckpt, args, load_clicks, consumed, worker_rate, say)
        if phases == {"ramp"}:
            say("\n".join(report_lines(report["ramp"])))
            if args.json:
                print(json.dumps(report))
            return
    with EmbeddedBroker() as b:
        report["load_seconds"] = asyncio.run(load_clicks(b.bootstrap, lines))
        say(f"loaded {n:,} events into clicks ({PARTITIONS} partitions) in {report['load_seconds']:.1f} s")
        if "raw" in phases:
            raw_runs: dict[str, list[dict]] = {"orjson": [], "json": []}
            for _ in range(args.raw_repeat):   # interleaved; each run reads the topic in about a second
                for d, rs in raw_runs.items():
                    rs.append(asyncio.run(raw_rate(b.bootstrap, n, d, args.timeout, args.raw_max_records)))
                    say(f"raw aiokafka + {d}.loads: {fmt(rs[-1]['events_per_s'])} events/s")
            report["raw"] = [{"decoder": d, "events_per_s": median_of(rs, "events_per_s"),
                              "process_cpu_us_per_event": median_of(rs, "process_cpu_us_per_event"),
                              "rates": [r.get("events_per_s") for r in rs], "runs": rs}
                             for d, rs in raw_runs.items()]
        if "noop" in phases:
            runs: dict[str, list[dict]] = {name: [] for name in variants}
            for i in range(args.repeat):
                for name in variants:
                    profile = args.profile if i == 0 else None
                    r = run_noop(b.url, n, name, NOOP_VARIANTS[name], args.timeout, profile, args.profile_seconds,
                                 b.proc.pid if b.proc else None, not args.profile_blocking)
                    runs[name].append(r)
                    say(f"no-op Faust agent [{name}]{' (profiled)' if profile else ''}: "
                        f"{fmt(r.get('events_per_s'))} events/s" + (f"  ERROR {r['error']}" if "error" in r else ""))
            report["noop"] = []
            for name, rs in runs.items():
                # a profiled run is slowed by the sampler (it shares the 2 CPUs): left out of the median
                ok = [r for i, r in enumerate(rs) if r.get("events_per_s")
                      and not (args.profile and i == 0 and len(rs) > 1)]
                report["noop"].append({"variant": name, **NOOP_VARIANTS[name],
                                       "events_per_s": median_of(ok, "events_per_s"),
                                       "process_cpu_us_per_event": median_of(ok, "process_cpu_us_per_event"),
                                       "main_thread_runqueue_share": median_of(ok, "main_thread_runqueue_share"),
                                       "rates": [r.get("events_per_s") for r in rs],
                                       "runs": rs})
        if "worker" in phases:
            port = free_port()
            log_path = args.worker_log or str(Path(tempfile.mkdtemp()) / "worker.log")
            cmd = [sys.executable, "-m", "scenestream.stream.cli", "worker", "--broker", b.url, "--checkpoint", ckpt,
                   "--web-port", str(port), "--device", "cpu", "--app-id", f"bench-worker-{uuid.uuid4().hex[:8]}"]
            proc = spawn(cmd, log_path)
            try:
                w = worker_rate(port, proc, n, args.poll, args.timeout)
                w["log"] = log_path
                report["worker"] = w
                say(f"worker: {fmt(w.get('events_per_s'))} events/s"
                    + (f"  ({w['events']:,} of {n:,} counted)" if w.get("events", n) < n else "")
                    + (f"  ERROR {w['error']} (log {log_path})" if "error" in w else ""))
                if "fresh" in phases and proc.poll() is None:
                    rate = args.fresh_rate or (args.fresh_fraction * (w.get("events_per_s") or 0))
                    if rate > 0:
                        say(f"freshness: sending {rate:,.0f} events/s for {args.fresh_seconds:.0f} s ...")
                        before = consumed(port)
                        f = asyncio.run(freshness(b.bootstrap, events, rate, args.fresh_seconds, args.tick,
                                                  args.settle, lambda: consumed(port), args.drain_max))
                        after = consumed(port)
                        f["worker_counted"] = int(after - before) if after is not None and before is not None else None
                        f["fraction_of_max"] = (rate / w["events_per_s"]) if w.get("events_per_s") else None
                        report["fresh"] = f
            finally:
                stop_process(proc)

    raw = {r["decoder"]: r.get("events_per_s") for r in report.get("raw", [])}
    base = next((r for r in report.get("noop", []) if r["variant"] == "baseline"), None)
    wr = report.get("worker", {}).get("events_per_s")
    ratios = {}
    if wr and base and base.get("events_per_s"):
        ratios["worker_over_noop"] = wr / base["events_per_s"]
    # the yardstick is the raw consumer with the stdlib's json.loads; orjson's is reported beside it
    for decoder in ("json", "orjson"):
        suffix = "" if decoder == "json" else "_orjson"
        if wr and raw.get(decoder):
            ratios[f"worker_over_raw{suffix}"] = wr / raw[decoder]
        if base and base.get("events_per_s") and raw.get(decoder):
            ratios[f"noop_over_raw{suffix}"] = base["events_per_s"] / raw[decoder]
    report["ratios"] = ratios

    lines_out = [(f"SceneStream live benchmark: {n:,} events, {report['users']:,} users, {PARTITIONS} partitions, "
                  f"{report['cpus']} CPUs"),
                 ("  (CPU us/event: CPU time of the measured process per event (the worker: all its threads); "
                  "CPU-bound events/s = 1e6 / that, the rate with a whole core and no waiting;"),
                 "   runq: share of the span its main thread waited for a CPU other processes held)",
                 f"  {'':40s} {'events/s':>10} {'wall us/ev':>10} {'CPU us/ev':>10} {'CPU-bound/s':>12} {'runq':>5}"]

    def row(label: str, r: dict, extra: str = "") -> str:
        eps, cpu_us, rq = r.get("events_per_s"), r.get("process_cpu_us_per_event"), r.get("main_thread_runqueue_share")
        if not eps:
            return f"  {label:40s} {'failed':>10}  {r.get('error', '')[:300]}"
        return (f"  {label:40s} {fmt(eps):>10} {1e6 / eps:10.1f} {fmt(cpu_us, 1):>10} "
                f"{fmt(1e6 / cpu_us) if cpu_us else 'n/a':>12} {fmt(rq, 2) if rq is not None else '':>5}{extra}")
    for r in report.get("raw", []):
        lines_out.append(row(f"raw aiokafka getmany + {r['decoder']}.loads", r))
    for r in report.get("noop", []):
        shown = "" if len(r["rates"]) < 2 else "  runs " + ", ".join(fmt(x) for x in r["rates"])
        lines_out.append(row(f"no-op Faust agent [{r['variant']}]", r, shown))
    if "worker" in report:
        lines_out.append(row("worker (scenestream_events_consumed)", report["worker"]))
    for k, v in ratios.items():
        lines_out.append(f"  {k.replace('_', ' ')}: {v:.3f}")
    if "fresh" in report:
        f = report["fresh"]
        lat = f["latency_ms"]
        lines_out.append(f"  freshness: target {fmt(f['target_rate'])}/s, achieved {fmt(f['achieved_rate'], 1)}/s "
                         f"(per second {f['per_second_min']}..{f['per_second_max']}), {f['sent']:,} sent, "
                         f"{f['records']:,} output records; worker done "
                         + (f"{f['drain_seconds']:.1f} s after the last send" if f["drain_seconds"] is not None
                            else f"NOT within {args.drain_max:.0f} s of the last send (counted "
                                 f"{f.get('worker_counted')} of {f['sent']})"))
        lines_out.append(f"    event -> output latency ms: p50 {fmt(lat['p50'])}  p95 {fmt(lat['p95'])}  "
                         f"p99 {fmt(lat['p99'])}  max {fmt(lat['max'])}")
        lines_out.append("    p50 by 10 s of receive time: "
                         + "  ".join(f"{w['from_s']:.0f}s:{fmt(w['p50_ms'])}" for w in f["latency_by_10s"]))
    if "ramp" in report:
        lines_out += report_lines(report["ramp"])
    say("\n".join(lines_out))
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
