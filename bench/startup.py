"""Worker startup: seconds from process start to the first published record, against a fresh embedded broker; and
with --first-recommendation, what a new user waits: seconds from `scenestream run` (the README's first command, on an
installed venv, an empty cache) to the first recommendation that is not the popular fallback.

Also runs a bare Faust agent (no model) with Faust's default consumer settings and with SceneStream's, each in its
own process against its own fresh broker, to show which settings the ~30 s first group join came from.

    python bench/startup.py --runs 3 [--single-settings] [--checkpoint CKPT] [--json]
    python bench/startup.py --first-recommendation --runs 3 [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

from scenestream.stream.local.broker import EmbeddedBroker
from scenestream.stream.core.events import Event, encode
from scenestream.stream.local.processes import free_port
from scenestream.stream.live.produce import produce_lines
from tiny_checkpoint import tiny_checkpoint  # bench/ is on sys.path: scripts run as python bench/NAME.py

ROOT = Path(__file__).resolve().parents[1]

BARE_AGENT = textwrap.dedent("""
    import sys, time, faust
    t0 = float(sys.argv[2])
    leader = dict(topic_disable_leader=True)
    timeouts = dict(broker_session_timeout=6.0, broker_heartbeat_interval=1.0, broker_rebalance_timeout=10.0)
    settings = {"defaults": {}, "scenestream": {**leader, **timeouts}, "leader_only": leader,
                "timeouts_only": timeouts}[sys.argv[3]]
    import tempfile
    app = faust.App("bench-" + sys.argv[3], broker=sys.argv[1], store="memory://", web_enabled=False,
                    consumer_auto_offset_reset="earliest", datadir=tempfile.mkdtemp(), **settings)
    topic = app.topic("bench", value_serializer="raw")
    @app.agent(topic)
    async def agent(stream):
        async for batch in stream.take(100, within=0.05):
            import os  # Faust redirects print() to its log: write to fd 1 directly
            os.write(1, f"FIRST {time.time() - t0:.2f}\\n".encode())
            os._exit(0)
    faust.Worker(app, loglevel="warning").execute_from_commandline()
""")


def first_line_seconds(cmd: list[str], marker: str, timeout: float = 120.0) -> float:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    t0 = time.time()
    try:
        for line in proc.stdout:
            if line.startswith(marker):
                return float(line.split()[1])
            if time.time() - t0 > timeout:
                break
        return float("nan")
    finally:
        proc.kill()
        proc.wait()


def bare_faust(variant: str) -> float:
    with EmbeddedBroker() as b:
        asyncio.run(produce_lines(b.bootstrap, "bench", [b"x"], progress=False))
        script = Path(tempfile.mkdtemp()) / "agent.py"
        script.write_text(BARE_AGENT)
        return first_line_seconds([sys.executable, str(script), b.url, str(time.time()), variant], "FIRST")


async def _first_output(bootstrap: str, topic: str, deadline: float) -> bool:
    from aiokafka import AIOKafkaConsumer
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await c.start()
    try:
        while time.time() < deadline:
            if any((await c.getmany(timeout_ms=200)).values()):
                return True
        return False
    finally:
        await c.stop()


def worker_start(checkpoint: str) -> float:
    with EmbeddedBroker() as b:
        e = Event("b-1", "bench-user", "v0-00001", "video", "click", 1_767_225_600_000)
        asyncio.run(produce_lines(b.bootstrap, "clicks", [encode(e)], progress=False))
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "scenestream.stream.cli", "worker", "--broker", b.url, "--checkpoint",
                                 checkpoint, "--web-port", str(free_port()), "--device", "cpu"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ok = asyncio.run(_first_output(b.bootstrap, "user-interests", t0 + 120))
            return time.time() - t0 if ok else float("nan")
        finally:
            proc.kill()
            proc.wait()


def first_recommendation() -> float:
    """`scenestream run` with an empty cache (SCENESTREAM_CACHE) to its banner's example user's first recommendation
    from the model (not the popular fallback); then Ctrl-C, as a user would."""
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "scenestream.stream.cli", "run", "--port", str(free_port()),
                                 "--broker-port", "0", "--log", str(Path(cache) / "worker.log")], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "SCENESTREAM_CACHE": cache})
        try:
            for line in proc.stdout:
                found = re.search(r"curl '([^']+recommendations[^']+)'", line)
                if found:
                    break
            else:
                return float("nan")
            while time.time() - t0 < 300:
                with urllib.request.urlopen(found.group(1), timeout=10) as r:
                    if json.loads(r.read())["fallback"] is None:
                        return time.time() - t0
                time.sleep(0.1)
            return float("nan")
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--checkpoint", default=None, help="Checkpoint for the worker runs (default: train a tiny one).")
    ap.add_argument("--single-settings", action="store_true",
                    help="Also time the bare agent with only topic_disable_leader and with only the timeouts.")
    ap.add_argument("--no-faust-defaults", dest="faust_defaults", action="store_false",
                    help="Leave out the bare agent with Faust's default settings (its first group join waits ~30 s).")
    ap.add_argument("--first-recommendation", action="store_true",
                    help="Only time `scenestream run` to its first recommendation (cold cache), --runs times.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.first_recommendation:
        runs = [round(first_recommendation(), 2) for _ in range(args.runs)]
        result = {"run_to_first_recommendation_s": runs, "median_s": statistics.median(runs)}
        if not args.json:
            print(f"scenestream run -> first recommendation: {runs} s, median {result['median_s']} s")
        print(json.dumps(result))
        return
    ckpt = args.checkpoint or tiny_checkpoint()
    result = {"faust_defaults_s": [bare_faust("defaults") for _ in range(args.runs)] if args.faust_defaults else [],
              "faust_scenestream_settings_s": [bare_faust("scenestream") for _ in range(args.runs)],
              "worker_start_to_first_record_s": [worker_start(ckpt) for _ in range(args.runs)]}
    result = {k: v for k, v in result.items() if v}
    if args.single_settings:
        result["faust_leader_only_s"] = [bare_faust("leader_only") for _ in range(args.runs)]
        result["faust_timeouts_only_s"] = [bare_faust("timeouts_only") for _ in range(args.runs)]
    result = {k: [round(x, 2) for x in v] for k, v in result.items()}
    if not args.json:
        for k, v in result.items():
            print(f"{k:34s} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
