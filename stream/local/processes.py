"""Child processes that never outlive their parent: the embedded broker, and the worker of `scenestream run`.

Each child gets SIGTERM from the kernel when its parent dies however it dies (PR_SET_PDEATHSIG), runs in its own
session (so Ctrl-C reaches the parent, which stops the children in order), and writes to a log file that the parent
closes on its side at once: the child holds its own descriptor.
"""
from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies, however the parent dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(command: Sequence[str], log_path: Optional[str | Path] = None,
          env: Optional[Mapping[str, str]] = None) -> subprocess.Popen:
    """Start a child as described above; its stdout and stderr go to log_path (appended) or nowhere; env: its
    whole environment (default: this process's)."""
    if log_path is None:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, start_new_session=True)
    with open(log_path, "ab") as out:   # the child has its own copy once started
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=die_with_parent, start_new_session=True)


def stop_process(proc: Optional[subprocess.Popen], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; a child that already exited is left as it is."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
