"""The live page's charts (web.py `/live/stats`): the worker's own counters sampled about once a second, the last
ten minutes kept, so a page opened now shows the minutes before it.

A sample holds cumulative values (events applied, dead letters by reason, the event->published latency
histogram's bucket counts) and the lag then; the series are the differences between neighbouring samples: events/s,
dead letters per interval, and freshness p50/p99 interpolated within the histogram buckets that filled during the
interval (as Prometheus' histogram_quantile does), None for an interval that published nothing.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .metrics import WorkerMetrics

KEPT = 600   # samples: ten minutes at one a second


@dataclass(frozen=True)
class Sample:
    at: float                      # time.time()
    events: float                  # events applied, since the start
    dead: dict[str, float]         # dead letters by reason, since the start
    latency: np.ndarray            # the latency histogram's count per bucket (the last is +Inf), since the start
    lag: float                     # messages behind the partition ends, all partitions


def quantile(bounds: Sequence[float], counts: Sequence[float], q: float) -> Optional[float]:
    """The q-quantile of values counted into buckets (bucket i holds values in (bounds[i-1], bounds[i]], the last
    one the values past bounds[-1]), linear within a bucket; values past the last bound count as that bound. None
    when nothing was counted."""
    total = float(np.sum(counts))
    if total <= 0:
        return None
    rank, below = q * total, 0.0
    for i, n in enumerate(map(float, counts)):   # plain floats: the series are JSON
        if n > 0 and below + n >= rank:
            if i == len(bounds):
                return float(bounds[-1])
            low = float(bounds[i - 1]) if i else 0.0
            return low + (float(bounds[i]) - low) * (rank - below) / n
        below += n
    return float(bounds[-1])


def snapshot(metrics: WorkerMetrics, lag: float, now: float) -> Sample:
    """What the worker's counters say now."""
    def totals(counter) -> dict[str, float]:
        return {s.labels.get("reason", ""): s.value for family in counter.collect() for s in family.samples
                if s.name.endswith("_total")}
    return Sample(now, sum(totals(metrics.events).values()), totals(metrics.invalid), metrics.latency.counts.copy(),
                  lag)


class LiveStats:
    def __init__(self, bounds: Sequence[float], kept: int = KEPT):
        self.bounds = list(bounds)   # the latency histogram's bucket bounds
        self.samples: deque[Sample] = deque(maxlen=kept)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def series(self) -> dict:
        """One value per interval between neighbouring samples, oldest first (the JSON of /live/stats)."""
        pairs = list(zip(self.samples, list(self.samples)[1:]))
        reasons = sorted({r for s in self.samples for r in s.dead})
        out: dict = {"at": [], "events_per_s": [], "lag": [], "freshness_p50_s": [], "freshness_p99_s": [],
                     "dead_letters": {r: [] for r in reasons}}
        for a, b in pairs:
            filled = b.latency - a.latency
            out["at"].append(round(b.at, 3))
            out["events_per_s"].append(round((b.events - a.events) / max(b.at - a.at, 1e-3), 3))
            out["lag"].append(b.lag)
            for q, key in ((0.5, "freshness_p50_s"), (0.99, "freshness_p99_s")):
                value = quantile(self.bounds, filled, q)
                out[key].append(None if value is None else round(value, 4))
            for r in reasons:
                out["dead_letters"][r].append(b.dead.get(r, 0) - a.dead.get(r, 0))
        last = self.samples[-1] if self.samples else None
        out["totals"] = {"events": last.events if last else 0, "dead_letters": sum(last.dead.values()) if last else 0}
        return out
