"""Soak: real workers under a steady load of half their measured maximum for --minutes, sampled every
--interval seconds, so an operator sees memory, lag and latency stay flat. Needs matplotlib for the plot:
`pip install -e '.[bench]'` (--no-plot: no plot, no matplotlib).

1. The embedded broker (Tansu) and `--workers` real workers (one group, `clicks` with 4 partitions, outputs to
   `user-interests`), serving --checkpoint (default: bench/tiny_checkpoint.py's). With --history changelog (the
   default), each of --users users r0 .. r{U-1} first gets a full window in every scene, written as the workers'
   changelog records (bench/fresh_ramp.py's seed_changelog) and recovered at start, then one click each, applied
   before the load: the soak starts from the state it would hold after a long run, every user touched, so its RSS
   measures the worker rather than windows filling (with --history none they start empty and fill for hours:
   100,000 users x 3 scenes x 50 events is 15M events, two hours at 2,000/s).
2. The maximum (--max-from): `ramp` (the default) sends live events (ts = send time) at 1,000/s (after a warm-up
   step at 500/s), then 1.25x more each step, --ramp-seconds (15) a step, until the workers no longer keep up (they
   have not counted every event sent within 2 s of the step's last send, or the producer fell short of the rate):
   the maximum is the last rate they kept up with; its events are the synthetic world's (users of their own). That
   is the maximum a soak is about: live traffic comes a few events per user per micro-batch, which costs the worker
   several times what a backlog does (BENCHMARKS.md, "Live path"), so half of a backlog's rate is more than the
   worker sustains live. `backlog`: --probe-events synthetic events loaded into `clicks` before the workers start
   (--history none), timed as bench/live.py times the worker (scenestream_events_consumed, summed over /metrics,
   first poll showing an event to the poll showing them all). --max-rate skips measuring; --rate sets the load.
3. The load: --fraction (0.5) x the maximum events/s (or --rate) for --minutes, users drawn at random (seeded: from
   the U, at random items of a random scene), sent every --batch-ms (250) as one record batch per partition whose
   events (ts) and records (timestamp) are stamped as it is sent. Why batches: the embedded broker (Tansu 0.6.0,
   memory storage) scans a partition's record batches on every fetch, so its fetches slow down and then stall as a
   partition passes ~10,000 batches (measured: the last 100 records of a partition of one-record batches came in
   12 ms at 8,000 batches, 146 ms at 12,000, and not within 30 s at 20,000; 20,000 records in 200 batches: 3 ms),
   and the workers' fetches of `clicks` stall with it: that is the broker, not the worker. At 250 ms a partition
   gains 4,800 batches in 20 minutes. Stamped as sent, an event's latency starts where a producer with linger 0
   would start it: the load's own batching is not the worker's latency. Latency is read from each worker's own
   histogram, scenestream_event_to_publish_seconds (the record's timestamp to its micro-batch being durable), per
   --interval, as the bucket bounds the p50 and p99 fall in; and the p99 of its part before the worker took up the
   micro-batch (scenestream_event_to_batch_seconds: the broker and the fetch), which says whose a creep is.
4. Every --interval (10 s) this script samples, per worker: RSS (VmRSS, /proc), consumer lag (the
   scenestream_consumer_lag gauges of the partitions its /readyz says it holds; the worker refreshes them every
   5 s), events/s (its consumed counter's increase) and the latency histogram; and the broker's RSS.

Reported: RSS growth after warm-up (--warmup, default the first 2 minutes): from the last warm-up sample to the end,
and to the peak after it, in % (the largest over the workers); the largest lag and the lag at the end of sending;
latency p50/p99 over the whole run. A markdown table (one row per minute) goes to stdout; the samples to --samples
(JSON; default in a temp directory); the plot (matplotlib, Agg: RSS, lag, latency, events/s against minutes) to
--plot, default soak.png next to BENCHMARKS.md at the repository root.

    pip install -e '.[bench]'
    python bench/soak.py --minutes 20 --json
    python bench/soak.py --minutes 2 --plot /tmp/soak.png        # a quick try

The in-memory broker keeps every output record (one per event, a few KB each): its RSS, sampled too, grows with
the run; that is the broker's storage, not a worker's leak. --json prints one JSON object as the last stdout line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from harness import ROOT, checkpoint_or_tiny, get, lag_of, memory_of, metric_values

from fresh_ramp import ready_seconds, scene_items, seed_changelog, warmup
from live import PARTITIONS, consumed, freshness, load_clicks

MB = 1024 * 1024


def total_consumed(ports: list[int]) -> Optional[float]:
    counts = [consumed(p) for p in ports]
    return None if any(c is None for c in counts) else sum(counts)


def measure_max(ports: list[int], procs, expect: int, timeout: float) -> dict:
    """Events/s of the workers over a backlog of `expect` events (startup and the first poll's events left out)."""
    first = last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        n = total_consumed(ports)
        now = time.perf_counter()
        if n:
            first = first or (n, now)
            last = (n, now)
            if n >= expect:
                break
        time.sleep(0.1)
    if first is None or last[1] <= first[1]:
        raise SystemExit(f"could not time the workers over the backlog (counted {last and last[0]} of {expect})")
    return {"events": int(last[0]), "seconds": round(last[1] - first[1], 2),
            "events_per_s": (last[0] - first[0]) / (last[1] - first[1])}


def ramp_max(bootstrap: str, events: list, ports: list[int], seconds: float, say, start: float = 1000.0,
             step: float = 1.25, keep_up_s: float = 2.0, top: float = 200_000.0) -> dict:
    """The highest live rate the workers keep up with (module docstring, step 2), after a warm-up step at half the
    first rate (the first batches of a new worker find its encoder cache cold)."""
    asyncio.run(freshness(bootstrap, events, start / 2, seconds, 0.01, 0.5, lambda: total_consumed(ports), 30.0))
    steps, best, rate = [], None, start
    while rate <= top:
        got = asyncio.run(freshness(bootstrap, events, rate, seconds, 0.01, 0.5, lambda: total_consumed(ports), 30.0))
        drain = got["drain_seconds"]
        kept_up = (drain is not None and drain <= keep_up_s and not got["failed_sends"]
                   and (got["achieved_rate"] or 0) >= 0.95 * rate)
        steps.append({"rate": round(rate), "achieved_rate": round(got["achieved_rate"] or 0), "drain_seconds": drain,
                      "p99_ms": got["latency_ms"]["p99"], "kept_up": kept_up})
        say(f"ramp: {rate:,.0f} events/s for {seconds:g} s: "
            + (f"drained {drain:.1f} s after the last send" if drain is not None else "not drained within 30 s")
            + f", p99 {got['latency_ms']['p99'] or 0:,.0f} ms -> {'kept up' if kept_up else 'fell behind'}")
        if not kept_up:
            break
        best, rate = rate, rate * step
    if best is None:
        raise SystemExit(f"the workers did not keep up with {start:,.0f} events/s, the ramp's first step")
    return {"events_per_s": best, "how": "ramp", "steps": steps}


def steady_load(bootstrap: str, draw, rate: float, seconds: float, batch_ms: int) -> dict:
    """Send `rate` events/s for `seconds`: every `batch_ms` (by absolute time) the events due, drawn by `draw(rng)` ->
    (user, item, scene, action), as one record batch per partition (keyed by user, partitioned as a Kafka client
    does), every event and record stamped with the time its batch is sent."""
    import orjson
    from aiokafka import AIOKafkaProducer
    from scenestream.stream.live.record_batches import key_partitions

    async def run() -> dict:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1 << 20)
        await producer.start()
        rng, tag = random.Random(7), uuid.uuid4().hex[:6]
        sent, failed, pending, batches = 0, 0, [], 0
        try:
            t0 = time.perf_counter()
            while (now := time.perf_counter()) < t0 + seconds:
                due = [draw(rng) for _ in range(int((now - t0) * rate) - sent)]
                ts = int(time.time() * 1000)
                keys = [user.encode() for user, _, _, _ in due]
                by_partition: dict[int, list] = {}   # partition -> [batch, events in it]
                for k, (key, part, (user, item, scene, action)) in enumerate(
                        zip(keys, key_partitions(keys, PARTITIONS), due)):
                    value = orjson.dumps({"event_id": f"soak-{tag}-{sent + k}", "user_id": user, "item_id": item,
                                          "scene": scene, "action": action, "ts": ts})
                    held = by_partition.get(part) or by_partition.setdefault(part, [producer.create_batch(), 0])
                    if held[0].append(key=key, value=value, timestamp=ts) is None:   # full: send it, start another
                        pending.append((await producer.send_batch(held[0], "clicks", partition=part), held[1]))
                        batches += 1
                        held[:] = [producer.create_batch(), 0]
                        held[0].append(key=key, value=value, timestamp=ts)
                    held[1] += 1
                for part, (batch, n) in by_partition.items():
                    pending.append((await producer.send_batch(batch, "clicks", partition=part), n))
                    batches += 1
                sent += len(due)
                if len(pending) > 500:
                    failed += sum(n for f, n in pending if f.done() and f.exception() is not None)
                    pending = [(f, n) for f, n in pending if not f.done()]
                tick = batch_ms / 1000
                await asyncio.sleep(max(0.0, t0 + (int((now - t0) / tick) + 1) * tick - time.perf_counter()))
            elapsed = time.perf_counter() - t0
            results = await asyncio.gather(*(f for f, _ in pending), return_exceptions=True)
            failed += sum(n for r, (_, n) in zip(results, pending) if isinstance(r, BaseException))
        finally:
            await producer.stop()
        return {"target_rate": rate, "sent": sent, "failed_sends": failed, "send_seconds": round(elapsed, 1),
                "achieved_rate": round(sent / elapsed, 1), "batch_ms": batch_ms, "record_batches": batches}
    return asyncio.run(run())


HISTOGRAMS = {"latency": "scenestream_event_to_publish_seconds_bucket{le=",   # event -> durable
              "waited": "scenestream_event_to_batch_seconds_bucket{le="}       # its part before the worker


def latency_buckets(api: str) -> dict[str, dict[float, float]]:
    """A worker's latency histograms (HISTOGRAMS): {name: {upper bound in s: cumulative count}}."""
    try:
        values = metric_values(get(api + "/metrics")[1].decode())
    except (OSError, ValueError):
        return {name: {} for name in HISTOGRAMS}
    return {name: {float(k[len(prefix):-1]): v for k, v in values.items() if k.startswith(prefix)}
            for name, prefix in HISTOGRAMS.items()}


def bucket_quantile(before: list[dict], after: list[dict], q: float, interpolate: bool = False) -> Optional[float]:
    """The q-quantile (ms) of the observations between two readings of the workers' histograms (summed over
    workers): the upper bound of the bucket holding it (a bound, what a target is held to), or with `interpolate` an
    estimate, linear within that bucket as Prometheus's histogram_quantile reads one (the bounds 50 / 100 / 250 ms
    alone cannot tell 110 from 240); None without observations."""
    counts: dict[float, float] = {}
    for b, a in zip(before, after):
        for le, n in a.items():
            counts[le] = counts.get(le, 0.0) + n - b.get(le, 0.0)
    bounds = sorted(counts)
    total = counts[bounds[-1]] if bounds else 0
    if total <= 0:
        return None
    lower, below = 0.0, 0.0
    for le in bounds:
        if counts[le] >= q * total:
            if not interpolate:
                return le * 1000
            if math.isinf(le):   # past the last finite bound: that bound is all a histogram says
                return lower * 1000
            return 1000 * (lower + (le - lower) * (q * total - below) / (counts[le] - below))
        lower, below = le, counts[le]
    return None


def sample(t: float, apis: list[str], ports: list[int], pids: list[int], broker_pid: int) -> dict:
    lags = [lag_of(api) for api in apis]
    histograms = [latency_buckets(api) for api in apis]
    return {"t_s": round(t, 1),
            "rss_mb": [round(memory_of(pid).get("VmRSS", 0) / MB, 1) for pid in pids],
            "lag": [None if x is None else sum(x[0].values()) for x in lags],
            "consumed": [consumed(p) for p in ports],
            **{name: [h[name] for h in histograms] for name in HISTOGRAMS},
            "broker_rss_mb": round(memory_of(broker_pid).get("VmRSS", 0) / MB, 1)}


def with_rates(samples: list[dict]) -> None:
    """Events/s summed over the workers between samples, and the latency bucket bounds of that interval (with the
    p99 read within its bucket, an estimate)."""
    prev = None
    for s in samples:
        s["events_per_s"] = s["p50_ms"] = s["p99_ms"] = s["waited_p99_ms"] = s["p99_ms_interpolated"] = None
        if prev is not None:
            dt = s["t_s"] - prev["t_s"]
            s["events_per_s"] = round(sum((c or 0) - (p or 0) for c, p in zip(s["consumed"], prev["consumed"],
                                                                              strict=True)) / dt, 1)
            s["p50_ms"] = bucket_quantile(prev["latency"], s["latency"], 0.5)
            s["p99_ms"] = bucket_quantile(prev["latency"], s["latency"], 0.99)
            s["waited_p99_ms"] = bucket_quantile(prev["waited"], s["waited"], 0.99)
            s["p99_ms_interpolated"] = bucket_quantile(prev["latency"], s["latency"], 0.99, interpolate=True)
        prev = s


def summary(samples: list[dict], warmup_s: float, rate: float) -> dict:
    after = [s for s in samples if s["t_s"] >= warmup_s]
    base = max((s for s in samples if s["t_s"] <= warmup_s), key=lambda s: s["t_s"], default=None)
    out: dict = {"warmup_s": warmup_s}
    if base and after:
        n = len(base["rss_mb"])
        growth = [100 * (after[-1]["rss_mb"][k] - base["rss_mb"][k]) / base["rss_mb"][k] for k in range(n)]
        peak = [100 * (max(s["rss_mb"][k] for s in after) - base["rss_mb"][k]) / base["rss_mb"][k] for k in range(n)]
        out.update({"rss_mb_at_warmup": base["rss_mb"], "rss_mb_at_end": after[-1]["rss_mb"],
                    "rss_growth_after_warmup_pct": round(max(growth), 2),
                    "rss_peak_growth_after_warmup_pct": round(max(peak), 2)})
    lags = [sum(x for x in s["lag"] if x is not None) for s in samples]
    later = [sum(x for x in s["lag"] if x is not None) for s in after]
    half = len(later) // 2
    out.update({"max_lag": max(lags, default=None), "lag_at_end": lags[-1] if lags else None,
                "max_lag_after_warmup": max(later, default=None),
                # bounded: the second half of the samples after warm-up peaks no higher than the first half plus
                # one second of the load
                "lag_bounded": bool(half) and max(later[half:]) <= max(later[:half]) + rate})
    return out


def minute_table(samples: list[dict]) -> str:
    rows = ["| minute | worker RSS MB | broker RSS MB | lag (max) | events/s | p50 ms (bucket bound) "
            "| p99 ms (worst 10 s, bucket bound) | p99 ms (worst 10 s, interpolated) "
            "| p99 before the worker ms (worst 10 s) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_minute: dict[int, list[dict]] = {}
    for s in samples:
        if round(s["t_s"]) > 0:   # a sample taken at 60.02 s closes minute 1
            by_minute.setdefault(int((round(s["t_s"]) - 1) // 60) + 1, []).append(s)

    def fmt(xs: list, how) -> str:
        xs = [x for x in xs if x is not None]
        return f"{how(xs):,.0f}" if xs else "n/a"
    for minute, ss in sorted(by_minute.items()):
        rows.append(f"| {minute} | {' / '.join(f'{x:,.0f}' for x in ss[-1]['rss_mb'])} | "
                    f"{ss[-1]['broker_rss_mb']:,.0f} | {fmt([sum(x or 0 for x in s['lag']) for s in ss], max)} | "
                    f"{fmt([s.get('events_per_s') for s in ss], statistics.fmean)} | "
                    f"{fmt([s['p50_ms'] for s in ss], statistics.median)} | {fmt([s['p99_ms'] for s in ss], max)} | "
                    f"{fmt([s['p99_ms_interpolated'] for s in ss], max)} | "
                    f"{fmt([s['waited_p99_ms'] for s in ss], max)} |")
    return "\n".join(rows)


def plot(samples: list[dict], warmup_s: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    minutes = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    for k in range(len(samples[0]["rss_mb"])):
        axes[0].plot(minutes, [s["rss_mb"][k] for s in samples], marker=".", label=f"worker {k}")
    axes[0].set_ylabel("RSS (MB)")
    axes[0].set_ylim(bottom=0)
    axes[0].legend(loc="lower right")
    axes[1].plot(minutes, [sum(x or 0 for x in s["lag"]) for s in samples], marker=".")
    axes[1].set_ylabel("consumer lag (events)")
    axes[1].set_ylim(bottom=0)
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("waited_p99_ms", "p99 before the worker")):
        axes[2].plot(minutes, [s[key] for s in samples], marker=".", label=label)
    axes[2].set_ylabel("event -> published (ms)")
    axes[2].set_ylim(bottom=0)
    axes[2].legend(loc="upper right")
    axes[3].plot(minutes, [s.get("events_per_s") for s in samples], marker=".")
    axes[3].set_ylabel("events/s")
    axes[3].set_ylim(bottom=0)
    axes[3].set_xlabel("minutes of steady load")
    for ax in axes:
        ax.axvspan(0, warmup_s / 60, color="0.9")
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def recover_and_touch(ports: list[int], procs, users: int, items: dict, window: int, bootstrap: str,
                      say) -> dict:
    """Wait for the workers to recover the seeded windows, then send one click per user and wait until they are all
    applied: before the load, every user has been touched (encoded, and cached as far as the cache holds)."""
    from scenestream.stream.live.produce import produce_lines
    got = ready_seconds(ports[0], procs[0], 1200, len(items) * window)
    if "error" in got:
        raise SystemExit(f"the seeded windows were not recovered: {got['error']}")
    t0 = time.perf_counter()
    while any(lag_of(f"http://127.0.0.1:{p}") is None for p in ports):   # every worker ready
        if any(p.poll() is not None for p in procs) or time.perf_counter() - t0 > 600:
            raise SystemExit("a worker exited, or was not ready in 10 minutes, after the seeded recovery")
        time.sleep(0.5)
    before = total_consumed(ports) or 0
    t1 = time.perf_counter()
    asyncio.run(produce_lines(bootstrap, "clicks", warmup(users, items), progress=False))
    while (total_consumed(ports) or 0) - before < users:
        if any(p.poll() is not None for p in procs) or time.perf_counter() - t1 > 1200:
            raise SystemExit("the workers did not apply one click per user within 20 minutes")
        time.sleep(0.5)
    out = {"recovered_seconds": round(got["ready_seconds"], 1), "touch_seconds": round(time.perf_counter() - t1, 1)}
    say(f"recovered in {out['recovered_seconds']:.0f} s; one click per user applied in {out['touch_seconds']:.0f} s")
    return out


def main() -> None:
    from scenestream.model.checkpoint import load_checkpoint
    from scenestream.stream.datasets.synthetic import SyntheticSpec, generate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=0.0, help="Events/s to send (default: --fraction x the maximum).")
    ap.add_argument("--max-rate", type=float, default=0.0, help="The maximum, events/s (default: measured).")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-from", choices=["ramp", "backlog"], default="ramp",
                    help="How the maximum is measured (docstring, step 2; default ramp).")
    ap.add_argument("--ramp-seconds", type=float, default=15.0, help="Seconds of each ramp step (default 15).")
    ap.add_argument("--probe-events", type=int, default=60_000, help="Backlog the maximum is measured over "
                    "(--max-from backlog).")
    ap.add_argument("--users", type=int, default=SyntheticSpec.users, help="Users of the synthetic world.")
    ap.add_argument("--interval", type=float, default=10.0, help="Seconds between samples (default 10).")
    ap.add_argument("--batch-ms", type=int, default=250,
                    help="The load sends a record batch per partition this often, its events stamped as it is sent "
                         "(default 250; docstring, step 3).")
    ap.add_argument("--history", choices=["changelog", "none"], default="changelog",
                    help="changelog (default): every user's full windows, written as the worker's changelog and "
                         "recovered, then one click per user, before the load; none: windows start empty and fill "
                         "during the soak (its RSS then grows with them).")
    ap.add_argument("--worker-args", default="",
                    help="Extra worker flags, e.g. '--encoder-cache-mb 3200' (default none).")
    ap.add_argument("--warmup", type=float, default=2.0, help="Warm-up minutes, left out of the RSS growth.")
    ap.add_argument("--plot", default=str(ROOT / "soak.png"), help="PNG path (default soak.png at the root).")
    ap.add_argument("--no-plot", dest="draw", action="store_false",
                    help="Draw no plot (matplotlib not needed); everything else is measured and reported.")
    ap.add_argument("--samples", default=None, help="JSON of the samples (default: a temp directory).")
    ap.add_argument("--checkpoint", default=None, help="Default: train bench/tiny_checkpoint.py's (~20 s).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t_start = time.monotonic()
    if args.draw:
        try:   # before the run, not after it
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("the plot needs matplotlib: pip install -e '.[bench]' (or run with --no-plot)")

    from scenestream.stream.local.broker import EmbeddedBroker
    from scenestream.stream.core.events import encode
    from scenestream.stream.local.processes import free_port, spawn, stop_process

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    ckpt = checkpoint_or_tiny(args.checkpoint, say)
    seeded = args.history == "changelog"
    events, _ = generate(SyntheticSpec(users=2000 if seeded else args.users))   # seeded: the items, the ramp's users
    items = scene_items(events)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    samples_path = Path(args.samples) if args.samples else work / "samples.json"
    report: dict = {"command": "python " + shlex.join(sys.argv), "minutes": args.minutes, "workers": args.workers,
                    "partitions": PARTITIONS, "users": args.users, "cpus": os.cpu_count(), "workdir": str(work)}
    with EmbeddedBroker(log_path=str(work / "tansu.log")) as b:
        backlog = args.max_from == "backlog" and not (args.max_rate or args.rate)
        app, ports, procs = f"soak-{uuid.uuid4().hex[:6]}", [], []
        if seeded:   # the topics, and the users' windows as the worker's changelog
            window = load_checkpoint(ckpt).window
            report["history"] = {"users": args.users, "window": window, "seconds": round(asyncio.run(
                seed_changelog(b.bootstrap, app, args.users, items, window, PARTITIONS)), 1)}
            say(f"seeded {args.users:,} users' full windows ({window} events x {len(items)} scenes) as changelog "
                f"records in {report['history']['seconds']:.0f} s")
        else:
            probe = [encode(e) for e in events[: args.probe_events if backlog else 1]]
            asyncio.run(load_clicks(b.bootstrap, probe))   # the topic (4 partitions), with the backlog when measured
        try:
            for k in range(args.workers):
                ports.append(free_port())
                procs.append(spawn([sys.executable, "-m", "scenestream.stream.cli", "worker", "--broker", b.url,
                                    "--checkpoint", ckpt, "--web-port", str(ports[-1]), "--device", "cpu",
                                    "--app-id", app, "--partitions", str(PARTITIONS), "--rate-limit", "0",
                                    *args.worker_args.split()],
                                   str(work / f"worker{k}.log")))
            apis = [f"http://127.0.0.1:{p}" for p in ports]
            if seeded:
                report["history"].update(recover_and_touch(ports, procs, args.users, items, window, b.bootstrap, say))
            if args.rate or args.max_rate:
                report["max_rate"] = {"events_per_s": args.max_rate or None, "given": True}
            elif backlog:
                say(f"timing {len(probe):,} backlog events ...")
                report["max_rate"] = measure_max(ports, procs, len(probe), 600)
            else:
                while total_consumed(ports) is None or any(lag_of(api) is None for api in apis):
                    if any(p.poll() is not None for p in procs):
                        raise SystemExit(f"a worker exited before the ramp (logs in {work})")
                    time.sleep(0.5)
                say("ramping up the live rate to find the maximum ...")
                report["max_rate"] = ramp_max(b.bootstrap, events, ports, args.ramp_seconds, say)
            waited = time.monotonic()
            while True:   # every worker ready and caught up (the gauge lags by up to 5 s), at most 60 s
                lags = [lag_of(api) for api in apis]
                if any(p.poll() is not None for p in procs):
                    raise SystemExit(f"a worker exited before the load (logs in {work})")
                if None not in lags and (sum(v for x in lags for v in x[0].values()) == 0
                                         or time.monotonic() - waited > 60):
                    break
                time.sleep(0.5)
            rate = args.rate or args.fraction * report["max_rate"]["events_per_s"]
            report["rate"] = round(rate, 1)
            say(f"maximum {report['max_rate']['events_per_s'] or 0:,.0f} events/s (0: not measured);"
                f" sending {rate:,.0f}/s for "
                f"{args.minutes:g} min, sampling every {args.interval:g} s")

            result: dict = {}
            if seeded:
                scenes = list(items)

                def draw(rng: random.Random) -> tuple:
                    scene = scenes[rng.randrange(len(scenes))]
                    return f"r{rng.randrange(args.users)}", rng.choice(items[scene]), scene, "click"
            else:
                def draw(rng: random.Random) -> tuple:
                    e = events[rng.randrange(len(events))]
                    return e.user_id, e.item_id, e.scene, e.action

            def load() -> None:
                try:
                    result["load"] = steady_load(b.bootstrap, draw, rate, args.minutes * 60, args.batch_ms)
                except Exception as exc:
                    result["error"] = f"{type(exc).__name__}: {exc}"
            sender = threading.Thread(target=load)
            pids = [p.pid for p in procs]
            t0 = time.monotonic()
            sender.start()
            samples = [sample(0.0, apis, ports, pids, b.proc.pid)]
            k = 1
            while sender.is_alive():
                time.sleep(max(0.0, t0 + k * args.interval - time.monotonic()))
                if time.monotonic() - t0 <= args.minutes * 60 + 1:   # sending, or its last interval
                    samples.append(sample(time.monotonic() - t0, apis, ports, pids, b.proc.pid))
                    say(f"[{samples[-1]['t_s']:6.0f} s] RSS MB {samples[-1]['rss_mb']}  lag {samples[-1]['lag']}  "
                        f"broker RSS MB {samples[-1]['broker_rss_mb']}")
                k += 1
            sender.join()
            sent, drained = result.get("load", {}).get("sent", 0), None
            start_count, t_sent = samples[0]["consumed"], time.monotonic()
            while time.monotonic() - t_sent < 60:   # every event sent counted by the workers
                now = [consumed(p) for p in ports]
                if None not in now and None not in start_count and sum(now) - sum(start_count) >= sent:
                    drained = round(time.monotonic() - t_sent, 1)
                    break
                time.sleep(0.25)
            final = sample(time.monotonic() - t0, apis, ports, pids, b.proc.pid)
            report["exits"] = [{"worker": n, "exit": p.poll()} for n, p in enumerate(procs) if p.poll() is not None]
        finally:
            for p in procs:
                stop_process(p, timeout=30)
    if "error" in result:
        raise SystemExit(f"the load failed: {result['error']} (logs in {work})")
    load = result["load"]
    with_rates(samples)
    report.update(summary(samples, args.warmup * 60, rate))
    lat = {"p50": bucket_quantile(samples[0]["latency"], final["latency"], 0.5),
           "p99": bucket_quantile(samples[0]["latency"], final["latency"], 0.99),
           "p99_before_the_worker": bucket_quantile(samples[0]["waited"], final["waited"], 0.99)}
    report["load"] = {**load, "drain_seconds": drained, "latency_ms_bucket_bound": lat,
                      "latency_ms_interpolated": {f"p{round(100 * q)}": bucket_quantile(
                          samples[0]["latency"], final["latency"], q, interpolate=True) for q in (0.5, 0.99)}}
    samples_path.write_text(json.dumps(samples, indent=1))
    report["samples"] = str(samples_path)
    if args.draw:
        how = "" if args.rate else f" ({args.fraction:g} x max)"
        plot(samples, args.warmup * 60, Path(args.plot), f"soak: {rate:,.0f} events/s{how} for {args.minutes:g} min, "
             f"{args.users:,} users, {args.workers} worker(s) {args.worker_args}".rstrip())
    report["plot"] = str(args.plot) if args.draw else None
    report["run_seconds"] = round(time.monotonic() - t_start, 1)
    report["table"] = minute_table(samples)
    say(report["table"])
    say(f"\nRSS growth after warm-up ({args.warmup:g} min): {report.get('rss_growth_after_warmup_pct', 'n/a')} % "
        f"(peak {report.get('rss_peak_growth_after_warmup_pct', 'n/a')} %); lag max {report['max_lag']}, at the end "
        f"{report['lag_at_end']} ({'bounded' if report['lag_bounded'] else 'NOT bounded'}); latency p50 <= "
        f"{lat['p50'] or 0:,.0f} ms, p99 <= {lat['p99'] or 0:,.0f} ms (histogram bucket bounds); sent "
        f"{load['sent']:,} ({load['failed_sends']} failed), drained "
        + (f"{drained:.1f} s after the last send" if drained is not None else "NOT within 60 s of the last send")
        + f"; worker exits {report['exits'] or 'none'}; plot {report['plot']}; {report['run_seconds']} s in all")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
