"""What bench/chaos.py and bench/soak.py share: the repository on sys.path (they reuse the test helpers of tests/:
real worker processes, offline replay, a plain aiokafka reader), the checkpoint they serve, and a worker's
consumer lag and memory read the way an operator reads them (/readyz, /metrics, /proc)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tests.test_api import get, metric_values  # noqa: E402


def checkpoint_or_tiny(path: Optional[str], say: Callable[[str], None]) -> str:
    """The checkpoint given, else bench/tiny_checkpoint.py's (trained now, ~20 s)."""
    if path:
        return path
    say("training a tiny checkpoint (~20 s) ...")
    from tiny_checkpoint import tiny_checkpoint
    return tiny_checkpoint()


def lag_of(api: str) -> Optional[tuple[dict[int, float], float]]:
    """({partition: consumer lag}, events consumed) of one worker: the scenestream_consumer_lag gauge of each
    partition its /readyz says it holds (a gauge keeps the last value of a partition given away, so the others are
    left out), and its scenestream_events_consumed counter. None while the worker does not answer or is not ready.
    The worker refreshes the gauge every 5 s."""
    try:
        status, ready = get(api + "/readyz")
        if status != 200:
            return None
        values = metric_values(get(api + "/metrics")[1].decode())
    except (OSError, ValueError):
        return None
    lags = {p: values.get(f"scenestream_consumer_lag{{partition={p}}}", float("nan"))
            for p in ready["assigned_partitions"]}
    return lags, values.get("scenestream_events_consumed_total", 0.0)


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes; {} once it is gone."""
    from rocks_state import status_of
    try:
        return status_of(pid)
    except OSError:
        return {}
