"""`scenestream run`: the whole system on one machine, for a first look.

Embedded broker (or --broker) -> a model (--checkpoint, else a small one trained on the synthetic data and cached)
-> the worker with its HTTP API -> the synthetic clickstream streamed into `clicks` at --rate. Ctrl-C (or SIGTERM)
stops all of it, the broker included.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from ..live.config import bootstrap_servers
from .broker import EmbeddedBroker
from ..datasets.cache import cache_dir
from ..live.kafka_security import KafkaSecurity
from ..offline.logs import synthetic_lines
from .processes import spawn
from ..live.produce import line_key, produce_lines
from ..datasets.synthetic import SyntheticSpec

log = logging.getLogger(__name__)

DEMO_SPEC = SyntheticSpec()  # the data `generate` writes by default
DEMO_TRAIN_USERS = 1000      # the cached demo model trains on the first 1000 users' events (under 2 minutes here)


def demo_checkpoint(epochs: int = 3) -> Path:
    """A small model trained on the synthetic data, cached so the second run starts at once."""
    from scenestream.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from scenestream.model.config import TrainConfig

    from ..core.config import DEFAULT_ACTIONS
    from ..offline.leave_one_out import fit
    from ..offline.logs import load_events
    out = cache_dir("models", f"synthetic-demo-e{epochs}")
    try:
        load_checkpoint(out)
        log.info("using cached demo model %s", out)
        return out
    except CheckpointError:
        pass
    print(f"training a small demo model (cached in {out}) ...", file=sys.stderr, flush=True)
    loaded = load_events(dataset="synthetic", spec=DEMO_SPEC)
    users = {f"u{u:06d}" for u in range(DEMO_TRAIN_USERS)}
    events = [e for e in loaded.events if e.user_id in users]
    ckpt, history = fit(events, loaded.scenes, DEFAULT_ACTIONS, 50, cfg=TrainConfig(epochs=epochs, val_users=500),
                        progress=True)
    save_checkpoint(out, ckpt.model, ckpt.vocab, ckpt.scenes, ckpt.actions, 50,
                    {"dataset": "synthetic-demo", "cutoff_ts": None, **history})
    return out


def wait_ready(url: str, timeout: float, proc: subprocess.Popen, stopped=lambda: False) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None or stopped():
            return False
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def run_demo(port: int, broker_port: int, rate: float, checkpoint: Optional[str], broker_url: Optional[str],
             log_path: Path, security: KafkaSecurity = KafkaSecurity()) -> int:
    stop = {"now": False}

    def on_signal(_signum, _frame):  # a flag, not an exception: the producer and the event loop wind down cleanly
        if stop["now"]:
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting
        stop["now"] = True
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):   # SIGINT too: it arrives ignored in a background job
        signal.signal(sig, interrupt)             # while training or starting: stop at once

    broker = None
    worker = None
    try:
        if broker_url is None:
            if security.security_protocol != "PLAINTEXT":
                raise RuntimeError("the embedded broker is PLAINTEXT: TLS/SASL settings need --broker")
            broker = EmbeddedBroker(port=broker_port or None).start()
            broker_url = broker.url
        ckpt = Path(checkpoint) if checkpoint else demo_checkpoint()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        worker = spawn([sys.executable, "-m", "scenestream.stream.cli", "worker", "--broker", broker_url,
                        "--checkpoint", str(ckpt), "--web-port", str(port)], log_path,
                       {**os.environ, **security.environ()})   # the passwords too, never in argv
        api = f"http://127.0.0.1:{port}"
        print(f"starting the worker (log: {log_path}) ...", file=sys.stderr, flush=True)
        if not wait_ready(api, 120, worker, lambda: stop["now"]):
            if stop["now"]:
                return 0
            print(f"the worker did not become ready; see {log_path}", file=sys.stderr)
            return 1
        lines = synthetic_lines(DEMO_SPEC)
        user = next(k.decode() for k in map(line_key, lines) if k)
        print(f"""
SceneStream is running.
  API     {api}   (OpenAPI: openapi.yaml)
  broker  {broker_url}   topics: clicks -> user-interests, bad events -> clicks-dlq
  stream  {len(lines)} synthetic events at {rate:g}/s

Try:
  curl '{api}/users/{user}/recommendations?scene=video&k=5'
  curl '{api}/users/{user}/interests'

Ctrl-C stops everything.""", flush=True)
        asyncio.run(produce_lines(bootstrap_servers(broker_url), "clicks", lines, rate=rate, progress=False,
                                  stop=lambda: stop["now"], security=security.client_kwargs()))
        if not stop["now"]:
            print("the synthetic stream is fully produced; the API keeps serving until Ctrl-C", flush=True)
        while worker.poll() is None and not stop["now"]:
            time.sleep(0.2)
        if stop["now"]:
            print("\nstopping ...", file=sys.stderr, flush=True)
            return 0
        return worker.returncode or 0
    except KeyboardInterrupt:
        print("\nstopping ...", file=sys.stderr, flush=True)
        return 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if broker is not None:
            broker.stop()


