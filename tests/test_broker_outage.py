"""Broker outage: the embedded Tansu broker frozen with SIGSTOP (it stops answering and keeps its data, as
a partitioned or overloaded broker would; Tansu 0.6.0 keeps topics only in memory, so it cannot be restarted), and a
broker that refuses connections at start. A short outage is ridden out (/readyz answers 503 meanwhile, nothing
exits); one past --broker-outage-limit ends the worker with code 69 and one line, and a restart recovers; either
way every user's final vector equals offline replay."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

from scenestream.stream.live import worker as worker_module
from scenestream.stream.local.processes import free_port
from scenestream.stream.live.produce import produce_lines
from scenestream.stream.live.worker import BrokerWatch

from .conftest import ROOT, run
from .test_api import wait_ready
from .test_worker import assert_equal_records, offline_records, stream_of, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_the_watch_counts_the_newest_answer_and_exits_past_the_limit(monkeypatch):
    """Pure: a source with nothing to say (no partitions held) or idle for its own reasons does not make an outage;
    silence from all of them does: not ready past 5 s, exit 69 past the limit, logged once each way."""
    now = [1000.0]
    feeder, catalog = [None], [None]
    watch = BrokerWatch("kafka://b:9092", (lambda: feeder[0], lambda: catalog[0]), limit_s=30, clock=lambda: now[0])
    exits = []
    monkeypatch.setattr(worker_module.os, "_exit", exits.append)
    monkeypatch.setattr(worker_module.logging, "shutdown", lambda: None)
    now[0] += 4.9
    assert watch.problem() is None   # nothing heard yet: counted from the start
    now[0] += 0.2
    assert watch.problem().startswith("unreachable since ")
    catalog[0], feeder[0] = now[0], now[0] - 60   # the feeder's buffer is full; the catalog consumer just fetched
    assert watch.problem() is None
    now[0] += 6
    watch.check()
    assert watch.outage_since == catalog[0] and "(6 s without an answer)" in watch.problem() and not exits
    now[0] += 23.9
    watch.check()
    assert not exits
    now[0] += 0.2
    watch.check()
    assert exits == [69]
    catalog[0] = now[0]
    watch.check()
    assert watch.outage_since is None and watch.problem() is None
    feeder[0] = catalog[0] = None   # a rebalance, consumers closing: the last answer still counts
    now[0] += 4
    assert watch.problem() is None
    watch.stop()   # shutdown: however long it takes, no outage exit
    now[0] += 100
    watch.check()
    assert exits == [69]


def readyz(w) -> tuple[object, dict]:
    """(status, body) of /readyz, with a short timeout: the worker's own web server answers while the broker cannot."""
    try:
        with urllib.request.urlopen(w.api + "/readyz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError as e:
        return type(e).__name__, {}


@contextmanager
def frozen(broker):
    """The broker's process stopped (SIGSTOP) for the block: it answers nothing and keeps every topic."""
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


class Prober(threading.Thread):
    """Polls /readyz every 0.25 s; `seen` holds (monotonic time, status, body)."""

    def __init__(self, w):
        super().__init__(daemon=True)
        self.w, self.seen, self.done = w, [], threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            status, body = readyz(self.w)
            self.seen.append((time.monotonic(), status, body))
            self.done.wait(0.25)

    def between(self, t0: float, t1: float) -> list[tuple[object, dict]]:
        return [(s, b) for t, s, b in self.seen if t0 <= t <= t1]


def test_a_ten_second_freeze_mid_stream_is_ridden_out_with_readyz_503_and_nothing_lost(broker, checkpoint,
                                                                                     worker_factory):
    events, lines, _ = stream_of(4000, 0, seed=16)
    w = worker_factory().start()
    wait_ready(w)
    pid = w.proc.pid
    prober = Prober(w)
    prober.start()

    async def produce_through_a_freeze() -> tuple[float, float, dict]:
        task = asyncio.create_task(produce_lines(broker.bootstrap, w.topics["clicks"], lines, rate=1000,
                                                 progress=False))
        await asyncio.sleep(2.0)
        assert not task.done(), "the freeze must land mid-stream"
        with frozen(broker):
            frozen_at = time.monotonic()
            replay = asyncio.create_task(asyncio.to_thread(offline_records, checkpoint, events))   # meanwhile
            await asyncio.sleep(10.0)
            assert w.proc.poll() is None, w.log_text()
        thawed_at = time.monotonic()
        assert await task == len(lines)
        return frozen_at, thawed_at, await replay
    try:
        frozen_at, thawed_at, want = run(produce_through_a_freeze())
        wait_ready(w, timeout=60)
        ready_again = time.monotonic() - thawed_at
    finally:
        prober.done.set()
        prober.join(5)
    during = prober.between(frozen_at, thawed_at)
    down = [b for s, b in during if s == 503 and b.get("broker", "").startswith("unreachable since")]
    print(f"during the freeze /readyz answered {[s for s, _ in during]}; ready again {ready_again:.1f} s after")
    assert down, f"/readyz never said the broker was unreachable during the freeze: {during}\n{w.log_text()}"
    assert all(s in (200, 503) for s, _ in during), during   # the worker's web server answered throughout
    assert not down[0]["ready"]
    assert any(s == 200 for s, _ in prober.between(0, frozen_at)), "ready before the freeze"
    assert readyz(w)[1]["broker"] == "ok"
    assert_equal_records(wait_for(broker, w.topics["out"], want, timeout=90), want)
    assert w.proc.poll() is None and w.proc.pid == pid and w.starts == 1, w.log_text()   # never exited
    log = w.log_text()
    assert "has not answered for" in log and "answers again after" in log, log
    assert "exiting" not in log, log


def test_an_outage_past_the_limit_exits_69_with_one_line_and_a_restart_loses_nothing(broker, checkpoint,
                                                                                    worker_factory):
    events, lines, _ = stream_of(2500, 0, seed=17)
    w = worker_factory(extra=("--broker-outage-limit", "6")).start()
    wait_ready(w)

    async def produce_through_an_outage() -> tuple[float, dict]:
        task = asyncio.create_task(produce_lines(broker.bootstrap, w.topics["clicks"], lines, rate=1000,
                                                 progress=False))
        await asyncio.sleep(1.5)
        assert not task.done(), "the freeze must land mid-stream"
        with frozen(broker):
            t0 = time.monotonic()
            replay = asyncio.create_task(asyncio.to_thread(offline_records, checkpoint, events))   # meanwhile
            code = await asyncio.to_thread(w.proc.wait, 30)
            exited_after = time.monotonic() - t0
        assert code == 69, w.log_text()
        assert await task == len(lines)
        return exited_after, await replay
    exited_after, want = run(produce_through_an_outage())
    print(f"the worker exited {exited_after:.1f} s into the outage")
    assert 5.0 <= exited_after <= 12.0, exited_after
    log = w.log_text()
    lines_out = [line for line in log.splitlines() if "exiting (code 69)" in line]
    assert len(lines_out) == 1 and broker.url in lines_out[0] and "--broker-outage-limit 6" in lines_out[0], log
    assert "Traceback" not in log, log
    w.start()   # the broker answers again: the restart recovers from the changelog
    assert_equal_records(wait_for(broker, w.topics["out"], want, timeout=90), want)
    assert w.proc.poll() is None, w.log_text()


def test_a_broker_refusing_connections_at_start_is_one_line_and_a_quick_exit(checkpoint):
    url = f"kafka://127.0.0.1:{free_port()}"   # nothing listens there
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "scenestream.stream.cli", "worker", "--broker", url,
                           "--checkpoint", str(checkpoint), "--web-port", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    elapsed = time.monotonic() - t0
    print(f"exit {proc.returncode} after {elapsed:.1f} s: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 1, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "kafka" in line.lower() or "broker" in line.lower()]
    assert len(said) == 1 and url in said[0] and "unreachable" in said[0], proc.stderr
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    assert elapsed < 60, elapsed   # the model loads first; the probe itself fails at once
