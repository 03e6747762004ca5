"""`scenestream run`: the whole system on one machine, for a first look.

Embedded broker (or --broker) -> a model (--checkpoint, else the demo model shipped with the package; --train-demo
trains one here instead)
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
DEMO_TRAIN_USERS = 1000      # the demo model trains on the first 1000 users' events (half a minute here)
DEMO_EPOCHS = 3
# the demo model shipped with the package, so a first `run` serves at once: built by the command below from the
# seeded synthetic data (tests/test_run.py checks its vocabulary, scenes and actions against the generator's)
#   python -m scenestream.stream.local.run stream/local/demo_model
DEMO_MODEL = Path(__file__).with_name("demo_model")


def build_demo_model(out: Path, epochs: int = DEMO_EPOCHS) -> Path:
    """Train the demo model on the synthetic data's first DEMO_TRAIN_USERS users and save it to `out`."""
    from scenestream.model.checkpoint import save_checkpoint
    from scenestream.model.config import TrainConfig

    from ..core.config import DEFAULT_ACTIONS
    from ..offline.leave_one_out import fit
    print(f"training a small demo model into {out} ...", file=sys.stderr, flush=True)
    events, scenes = demo_events()
    ckpt, history = fit(events, scenes, DEFAULT_ACTIONS, 50, cfg=TrainConfig(epochs=epochs, val_users=500),
                        progress=True)
    save_checkpoint(out, ckpt.model, ckpt.vocab, ckpt.scenes, ckpt.actions, 50,
                    {"dataset": "synthetic-demo", "cutoff_ts": None, **history})
    return out


def demo_events() -> tuple[list, list[str]]:
    """What the demo model trains on: the default synthetic log's first DEMO_TRAIN_USERS users, and its scenes."""
    from ..offline.logs import load_events
    loaded = load_events(dataset="synthetic", spec=DEMO_SPEC)
    users = {f"u{u:06d}" for u in range(DEMO_TRAIN_USERS)}
    return [e for e in loaded.events if e.user_id in users], list(loaded.scenes)


def demo_checkpoint(train: bool = False) -> Path:
    """The shipped demo model; with `train` (or if the shipped one does not load), one trained here on the same data
    and cached, so only the first such run waits for it."""
    from scenestream.model.checkpoint import CheckpointError, load_checkpoint
    if not train:
        try:
            load_checkpoint(DEMO_MODEL)
            return DEMO_MODEL
        except CheckpointError as exc:
            log.warning("the shipped demo model does not load (%s); training one", exc)
    out = cache_dir("models", f"synthetic-demo-e{DEMO_EPOCHS}")
    try:
        load_checkpoint(out)
        log.info("using cached demo model %s", out)
        return out
    except CheckpointError:
        return build_demo_model(out)


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
             log_path: Path, security: KafkaSecurity = KafkaSecurity(), train_demo: bool = False) -> int:
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
        ckpt = Path(checkpoint) if checkpoint else demo_checkpoint(train_demo)
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




if __name__ == "__main__":   # build the shipped demo model: python -m scenestream.stream.local.run OUT_DIR
    build_demo_model(Path(sys.argv[1]) if len(sys.argv) > 1 else DEMO_MODEL)
