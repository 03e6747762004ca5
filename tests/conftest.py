"""Shared fixtures: a real embedded broker, a small trained checkpoint, and real worker processes."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from scenestream.model.checkpoint import save_checkpoint
from scenestream.model.config import preset
from scenestream.model.config import TrainConfig
from scenestream.stream.offline.leave_one_out import fit
from scenestream.stream.local.broker import EmbeddedBroker
from scenestream.stream.local.processes import die_with_parent, free_port
from scenestream.stream.core.config import DEFAULT_ACTIONS
from scenestream.stream.datasets.synthetic import SyntheticSpec, generate

from .faults import boot_command

SMALL = SyntheticSpec(users=400, seed=11)
ROOT = Path(__file__).resolve().parents[1]
# tests poll the API from one address far faster than a client should: no rate limit unless a test sets one
NO_RATE_LIMIT = {"SCENESTREAM_WORKER_RATE_LIMIT": "0"}


@pytest.fixture(scope="session")
def small_world():
    return generate(SMALL)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, small_world):
    """A real (small, briefly trained) model: the worker tests are about plumbing, not quality."""
    events, _ = small_world
    ckpt, history = fit(events, SMALL.scenes, DEFAULT_ACTIONS, 50, cfg=TrainConfig(epochs=1, val_users=200),
                        model_cfg={"scene_layers": preset(None)["scene_layers"]}, progress=False)
    out = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(out, ckpt.model, ckpt.vocab, ckpt.scenes, ckpt.actions, 50, {"cutoff_ts": None})
    return out


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=str(log)) as b:
        yield b


class WorkerProcess:
    """`scenestream worker` as a real OS process, with its own app id and topics."""

    def __init__(self, broker: EmbeddedBroker, checkpoint: Path, log_dir: Path, app_id: str | None = None,
                 extra: tuple[str, ...] = ()):
        self.app_id = app_id or f"t{uuid.uuid4().hex[:8]}"
        self.broker, self.checkpoint, self.log_dir, self.extra = broker, checkpoint, log_dir, extra
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.web_port = free_port()

    @property
    def topics(self) -> dict[str, str]:
        return {"clicks": f"{self.app_id}-clicks", "dlq": f"{self.app_id}-dlq", "out": f"{self.app_id}-out",
                "catalog": f"{self.app_id}-catalog"}

    def start(self, fault: str | None = None) -> "WorkerProcess":
        """Start (again); `fault` names a fault of tests/faults.py to patch into this incarnation."""
        self.starts += 1
        prefix = boot_command(fault) if fault else [sys.executable, "-m", "scenestream.stream.cli"]
        cmd = [*prefix, "worker", "--broker", self.broker.url,
               "--checkpoint", str(self.checkpoint), "--app-id", self.app_id,
               "--clicks-topic", self.topics["clicks"], "--dlq-topic", self.topics["dlq"],
               "--output-topic", self.topics["out"], "--catalog-topic", self.topics["catalog"], "--web-port", str(self.web_port), "--device", "cpu",
               "--batch-wait", "0.1", *self.extra]
        with open(self.log_dir / f"{self.app_id}-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env={**NO_RATE_LIMIT, **os.environ, "PYTHONUNBUFFERED": "1"},
                                         preexec_fn=die_with_parent)   # never outlives the test or bench
        return self

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - t0

    def log_text(self, tail: int | None = 4000) -> str:
        """The end of each incarnation's log (all of it with tail None)."""
        return "\n".join(p.read_text(errors="replace")[-tail if tail else 0:]
                         for p in sorted(self.log_dir.glob(f"{self.app_id}-*")))


@pytest.fixture
def worker_factory(broker, checkpoint, tmp_path):
    made: list[WorkerProcess] = []

    def make(**kw) -> WorkerProcess:
        w = WorkerProcess(broker, checkpoint, tmp_path, **kw)
        made.append(w)
        return w
    yield make
    for w in made:
        w.kill()


def run(coro):
    return asyncio.run(coro)


async def new_topic(bootstrap: str, partitions: int = 1) -> str:
    """A topic of its own for one test (a changelog, say) on the embedded broker."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    topic = f"cl-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, partitions, 1)])
    await admin.close()
    return topic
