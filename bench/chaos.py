"""Chaos: three real workers in one group over 8 partitions of the embedded broker (Tansu) while
--events records are produced at a steady --rate, --malformed of them malformed; at --kills random moments a random
worker is SIGKILLed and started again at once, and at one random moment the broker is frozen for --freeze seconds
(SIGSTOP, then SIGCONT). Any worker that exits by itself (not killed here) is started again too, and its exit
status and last log lines are reported. Once production is over, every worker is ready, the partitions are owned
once each and the consumer lag is 0, a peer client (a plain aiokafka consumer, not the worker's reader) reads:

  - the output topic: every user's newest record is compared with offline replay (`scenestream replay` over the
    valid events: tests/test_worker.py's offline_records): same event count, newest ts and scenes, every vector
    within --tolerance (1e-5);
  - the dead-letter topic: its letters, counted once per source position (topic, partition, offset: a worker killed
    after publishing a batch's letters but before its state was durable publishes them again), against the
    malformed records injected and against those found on the clicks topic (a producer retry during the freeze
    could store one twice);
  - the clicks topic: how many records it holds (duplicates from producer retries show here).

The malformed records are tests/test_worker.py's stream_of (stream/datasets/synthetic.py's malformed_line: truncated JSON,
a missing field, an unknown scene, a wrong type, ts out of range, an empty id, NaN, not UTF-8), each checked here
to be refused by the worker's decoder before it is sent. The rule: a record the decoder refuses goes to the dead
letter topic, one letter per record; a valid event older than its user's full window is counted as late
(scenestream_events_late_dropped) and never dead-lettered (replay drops it the same way), so none is injected as
"malformed".

    python bench/chaos.py --kills 10 --events 100000 --json          # production alone ~200 s at 500/s
    python bench/chaos.py --kills 2 --events 5000 --rate 250 --freeze 10      # a quick try, ~2-3 minutes

--events counts every record sent, malformed included (--events 100000 --malformed 0.1: 90,000 valid events and
10,000 malformed). Kill and freeze moments are drawn (--seed) uniformly over the expected production time. --json
prints one JSON object as the last stdout line (progress goes to stderr).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from harness import checkpoint_or_tiny, lag_of

from tests.conftest import WorkerProcess
from tests.test_failover import owned
from tests.test_worker import lagging, offline_records, read_topic, stream_of

PARTITIONS = 8
WORKERS = 3


def worst_difference(got: dict, want: dict) -> float:
    """Largest absolute difference over every vector of two records of one user (scenes, fused, global)."""
    pairs = [(got["global"], want["global"])]
    for part in ("scenes", "fused"):
        pairs += [(got[part][s], v) for s, v in want[part].items()]
    return max(float(np.max(np.abs(np.subtract(g, w)))) for g, w in pairs)


def compare(got: dict[str, dict], want: dict[str, dict], tolerance: float) -> dict:
    """Users whose newest published record differs from replay: missing, other events/newest ts/scenes, or a vector
    further than `tolerance`."""
    differing, worst = [], 0.0
    for user, w in want.items():
        g = got.get(user)
        if g is None or (g["events"], g["newest_ts"], set(g["scenes"])) != (w["events"], w["newest_ts"],
                                                                           set(w["scenes"])):
            differing.append(user)
            continue
        d = worst_difference(g, w)
        worst = max(worst, d)
        if d > tolerance:
            differing.append(user)
    return {"users_compared": len(want), "users_differing": len(differing), "differing_examples": differing[:5],
            "users_published_not_in_replay": len(set(got) - set(want)), "max_abs_diff": worst}


async def newest_records(bootstrap: str, topic: str, want: dict[str, dict], timeout: float,
                         between) -> dict[str, dict]:
    """Follow the output topic from the start with a plain consumer, keeping each user's newest record (records
    are keyed by user), until every user has replay's event count and newest ts or `timeout` passes; between()
    runs every ~2 s (the harness keeps the workers up meanwhile)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from scenestream.stream.core.output import read_record
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        parts = c.partitions_for_topic(topic)
        while not parts:
            await c._client.force_metadata_update()
            parts = c.partitions_for_topic(topic)
            await asyncio.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        raw: dict[bytes, bytes] = {}
        latest: dict[str, dict] = {}
        fresh: set[bytes] = set()
        deadline, checked = time.monotonic() + timeout, 0.0
        while True:
            got = await c.getmany(timeout_ms=500, max_records=5000)
            for msgs in got.values():
                for m in msgs:
                    raw[m.key] = m.value
                    fresh.add(m.key)
            if got and time.monotonic() - checked < 2.0:
                continue
            for key in fresh:
                rec = read_record(raw[key])
                latest[rec["user_id"]] = rec
            fresh.clear()
            checked = time.monotonic()
            if not lagging(latest, want) or checked > deadline:
                return latest
            await asyncio.to_thread(between)
    finally:
        await c.stop()


class Harness:
    """The workers, kept running: restarts what was killed here and what exited by itself (reported)."""

    def __init__(self, workers: list[WorkerProcess], say):
        self.workers, self.say = workers, say
        self.kills: list[dict] = []
        self.exits: list[dict] = []     # exits not caused by a kill of ours
        self.t0 = time.monotonic()
        self.started = [self.t0] * len(workers)   # when each was last started: a crash loop restarts every 2 s

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def supervise(self) -> None:
        for n, w in enumerate(self.workers):
            code = w.proc.poll()
            if code is not None and time.monotonic() - self.started[n] >= 2.0:
                log = w.log_dir / f"{w.app_id}-{w.starts}.log"
                tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
                self.exits.append({"worker": n, "at_s": self.now(), "exit": code, "log_tail": tail})
                self.say(f"[{self.now():6.1f} s] worker {n} exited by itself ({code}): {tail[-1:]}; restarting")
                w.start()
                self.started[n] = time.monotonic()

    def kill(self, rng: random.Random) -> None:
        n = rng.randrange(len(self.workers))
        w = self.workers[n]
        ready = lag_of(w.api) is not None
        w.kill()
        self.kills.append({"worker": n, "at_s": self.now(), "was_ready": ready})
        self.say(f"[{self.now():6.1f} s] SIGKILL worker {n} ({'ready' if ready else 'not ready'}); restarting")
        w.start()
        self.started[n] = time.monotonic()

    def settled(self) -> tuple[bool, str]:
        """Every worker ready, each partition owned by exactly one, and no consumer lag."""
        owners = [owned(w) for w in self.workers]
        flat = sorted(p for ps in owners for p in ps)
        if flat != list(range(PARTITIONS)) or not all(owners):
            return False, f"partitions {owners}"
        lags = [lag_of(w.api) for w in self.workers]
        if any(x is None for x in lags):
            return False, "a worker is not ready"
        behind = sum(v for lag, _ in lags for v in lag.values())
        return behind == 0, f"lag {behind}"


def freeze(pid: int, seconds: float, at: float, say, done: threading.Event) -> None:
    try:
        os.kill(pid, signal.SIGSTOP)
        say(f"[{at:6.1f} s] broker frozen (SIGSTOP) for {seconds:.0f} s")
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
        say("broker resumed (SIGCONT)")
        done.set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="Records to send, malformed ones included.")
    ap.add_argument("--malformed", type=float, default=0.1, help="Share of the records that are malformed.")
    ap.add_argument("--rate", type=float, default=500.0, help="Records per second (default 500).")
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs of a random worker (each restarted at once).")
    ap.add_argument("--freeze", type=float, default=10.0, help="Seconds the broker is frozen, once (0: never).")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=1e-5)
    ap.add_argument("--settle-timeout", type=float, default=600.0,
                    help="Most seconds, after production, for the workers to settle and the outputs to converge.")
    ap.add_argument("--checkpoint", default=None, help="Default: train bench/tiny_checkpoint.py's (~20 s).")
    ap.add_argument("--workdir", default=None, help="Logs go here (default: a new temp directory).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t_start = time.monotonic()

    from scenestream.stream.local.broker import EmbeddedBroker
    from scenestream.stream.core.config import StreamConfig
    from scenestream.stream.core.events import Rejection, decode
    from scenestream.stream.live.produce import produce_lines
    from scenestream.stream.live.topics import ensure_topic

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    ckpt = checkpoint_or_tiny(args.checkpoint, say)
    n_bad = round(args.events * args.malformed)
    events, lines, bad = stream_of(args.events - n_bad, n_bad, seed=args.seed)
    if len(events) != args.events - n_bad:
        raise SystemExit(f"the synthetic world has only {len(events)} events")
    refused = [decode(raw, StreamConfig()) for raw in bad]
    if not all(isinstance(r, Rejection) for r in refused):
        raise SystemExit("a 'malformed' record is accepted by the decoder")
    injected_reasons = Counter(r.reason for r in refused)
    users = {e.user_id for e in events}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    planned = len(lines) / args.rate
    kill_at = sorted(rng.uniform(0.05, 0.95) * planned for _ in range(args.kills))
    freeze_at = rng.uniform(0.2, 0.8) * planned if args.freeze > 0 else None
    say(f"{len(lines):,} records ({n_bad:,} malformed: {dict(injected_reasons)}) for {len(users):,} users at "
        f"{args.rate:g}/s (~{planned:.0f} s); kills at {[round(t) for t in kill_at]} s"
        + (f", broker freeze at {freeze_at:.0f} s" if freeze_at is not None else "") + f"; logs in {work}")

    report: dict = {"command": "python " + shlex.join(sys.argv), "events": len(lines), "valid_events": len(events),
                    "malformed_injected": n_bad, "malformed_reasons": dict(injected_reasons), "users": len(users),
                    "partitions": PARTITIONS, "workers": WORKERS, "rate": args.rate, "seed": args.seed,
                    "kills_planned": args.kills, "freeze_seconds": args.freeze, "workdir": str(work)}
    with EmbeddedBroker(log_path=str(work / "tansu.log")) as broker:
        app_id = f"chaos{uuid.uuid4().hex[:6]}"
        workers = []
        for n in range(WORKERS):
            (work / f"w{n}").mkdir(exist_ok=True)
            workers.append(WorkerProcess(broker, Path(ckpt), work / f"w{n}", app_id=app_id,
                                         extra=("--partitions", str(PARTITIONS))))
        topics = workers[0].topics
        report["topics"] = topics
        asyncio.run(ensure_topic(broker.bootstrap, topics["clicks"], PARTITIONS, 1, {}))
        h = Harness(workers, say)
        try:
            for w in workers:
                w.start()
            while not h.settled()[0]:
                if time.monotonic() - h.t0 > 180:
                    raise SystemExit(f"the workers never settled before production: {h.settled()[1]}")
                h.supervise()
                time.sleep(0.5)
            say(f"[{h.now():6.1f} s] three workers ready; producing")

            produced: dict = {}

            def produce() -> None:
                try:
                    produced["sent"] = asyncio.run(produce_lines(broker.bootstrap, topics["clicks"], lines,
                                                                 rate=args.rate, progress=False))
                except Exception as exc:   # reported: the broker outage must not stop the producer
                    produced["error"] = f"{type(exc).__name__}: {exc}"
            producer = threading.Thread(target=produce)
            thawed = threading.Event()
            t_prod = time.monotonic()
            producer.start()
            freezer = None
            while producer.is_alive() or kill_at or (freeze_at is not None and freezer is None):
                since = time.monotonic() - t_prod
                if kill_at and since >= kill_at[0]:
                    kill_at.pop(0)
                    h.kill(rng)
                if freeze_at is not None and freezer is None and since >= freeze_at:
                    freezer = threading.Thread(target=freeze, args=(broker.proc.pid, args.freeze, h.now(), say,
                                                                    thawed))
                    freezer.start()
                h.supervise()
                time.sleep(0.1)
            producer.join()
            if freezer is not None:
                freezer.join()
            report["produce_seconds"] = round(time.monotonic() - t_prod, 1)
            report["produced"] = produced
            say(f"[{h.now():6.1f} s] production over in {report['produce_seconds']} s: {produced}")

            t_end = time.monotonic()
            state = "?"
            while time.monotonic() - t_end < args.settle_timeout:
                h.supervise()
                ok, state = h.settled()
                if ok:
                    break
                time.sleep(1.0)
            report["settle_seconds"] = round(time.monotonic() - t_end, 1)
            report["settled"] = state
            say(f"[{h.now():6.1f} s] settled ({state}) {report['settle_seconds']} s after production; replaying")
            t_replay = time.monotonic()
            want = offline_records(ckpt, events)
            report["replay_seconds"] = round(time.monotonic() - t_replay, 1)
            left = max(30.0, args.settle_timeout - (time.monotonic() - t_end))
            got = asyncio.run(newest_records(broker.bootstrap, topics["out"], want, left, h.supervise))
            report["compared_after_s"] = round(time.monotonic() - t_end, 1)   # from the end of production
            report.update(compare(got, want, args.tolerance))

            letters = [json.loads(m.value) for m in asyncio.run(read_topic(broker.bootstrap, topics["dlq"],
                                                                            limit=300))]
            by_position = {(d["topic"], d["partition"], d["offset"]): d["reason"] for d in letters}
            clicks = asyncio.run(read_topic(broker.bootstrap, topics["clicks"], limit=600))
            bad_set = set(bad)
            report.update({"dlq_records": len(letters), "dlq_count": len(by_position),
                           "dlq_reasons": dict(Counter(by_position.values())),
                           "clicks_on_topic": len(clicks),
                           "malformed_on_topic": sum(1 for m in clicks if m.value in bad_set)})
            h.supervise()
        finally:
            for w in workers:
                w.kill()
    report.update({"kills": len(h.kills), "kill_log": h.kills, "worker_restarts": len(h.kills) + len(h.exits),
                   "exited_by_themselves": len(h.exits), "exits": h.exits})
    report["dlq_matches_injected"] = (report["dlq_count"] == n_bad == report["malformed_on_topic"]
                                      and report["dlq_reasons"] == report["malformed_reasons"])
    report["broker_outage_survived"] = bool(args.freeze > 0 and thawed.is_set() and "error" not in produced
                                            and produced.get("sent") == len(lines)
                                            and report["users_differing"] == 0)
    report["run_seconds"] = round(time.monotonic() - t_start, 1)
    say(f"users compared {report['users_compared']:,}, differing {report['users_differing']} "
        f"(max abs diff {report['max_abs_diff']:.2e}); dead letters {report['dlq_count']:,} distinct "
        f"({report['dlq_records']:,} records) for {n_bad:,} injected, {report['malformed_on_topic']:,} on the topic; "
        f"kills {report['kills']}, exits by themselves {report['exited_by_themselves']}; broker outage "
        f"{'survived' if report['broker_outage_survived'] else 'NOT survived'}; {report['run_seconds']} s in all")
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
