"""Offline replay: an event log through the live worker's micro-batch step, with prequential evaluation.

Events before the time cutoff warm the state up. From the cutoff on, the log is cut into micro-batches as the
worker would cut it at the log's own pace (`micro_batches`), and before each micro-batch is applied, every event in it
asks for its user's top-K in its scene from three recommenders, and scores a hit when its item is there:
  live    -- the vectors as the stream keeps them (what SceneStream serves)
  stale   -- the vectors frozen at the cutoff (a daily batch job's view)
  popular -- the most popular items of the scene so far
Users with no vector yet get the popular list in all three, so the comparison is about the vectors alone.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from scenestream.index import ItemIndex
from scenestream.model.infer import InterestEncoder

from .core.batch import apply_batch, interest_record
from .core.events import Event
from .core.popularity import Popularity
from .core.window import UserState
from .logs import LoadedEvents, time_cutoff

log = logging.getLogger(__name__)

METHODS = ("live", "stale", "popular")


@dataclass
class ReplayResult:
    events: int
    invalid: dict[str, int]
    late_dropped: int
    events_per_s: float          # valid events / seconds spent in the streaming step (apply + encode + records)
    wall_s: float
    cutoff_ts: int
    prequential: dict[str, dict[str, float]]
    records: dict[str, dict] = field(repr=False, default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"events": self.events, "invalid": sum(self.invalid.values()), "invalid_by_reason": self.invalid,
                "late_dropped": self.late_dropped, "events_per_s": round(self.events_per_s, 1),
                "wall_s": round(self.wall_s, 2), "users": len(self.records), "cutoff_ts": self.cutoff_ts,
                "prequential": self.prequential, "warnings": self.warnings}


def _seen(state: Optional[UserState], scene: str) -> set[str]:
    return {e.item_id for e in state.get(scene, ())} if state else set()


def micro_batches(events: Sequence[Event], batch_size: int, wait_ms: int) -> Iterator[Sequence[Event]]:
    """Cut a time-ordered log as the live worker cuts its stream: a batch closes at batch_size events or when the
    next event is wait_ms or more of event time after the batch's first (wait_ms <= 0: by count only).

    Cutting by event time is what makes the prequential comparison mean what it says at the log's own pace: a
    1000-event batch of a slow log spans hours (on ML-1M, 95% of the evaluated events would share a batch with
    an earlier event of the same user and be scored without it), which a worker serving that stream never does.
    """
    lo = 0
    while lo < len(events):
        hi, limit = lo + 1, events[lo].ts + wait_ms
        end = min(len(events), lo + batch_size)
        while hi < end and (wait_ms <= 0 or events[hi].ts < limit):
            hi += 1
        yield events[lo:hi]
        lo = hi


def replay(loaded: LoadedEvents, encoder: InterestEncoder, index: ItemIndex, batch_size: int = 1000,
           eval_cutoff: float = 0.8, k: int = 10, exclude_seen: bool = True, progress: bool = True,
           checkpoint_cutoff_ts: Optional[int] = None, batch_wait_ms: int = 200) -> ReplayResult:
    t_start = time.perf_counter()
    events = loaded.events
    cutoff_ts = time_cutoff(events, eval_cutoff)
    warnings = []
    if checkpoint_cutoff_ts is None or checkpoint_cutoff_ts > cutoff_ts:
        warnings.append("the model was trained on events at or after the evaluation cutoff "
                        f"(train cutoff ts {checkpoint_cutoff_ts}, eval cutoff ts {cutoff_ts}): "
                        "prequential figures are optimistic; train with --cutoff <= --eval-cutoff")
        for w in warnings:
            log.warning(w)
    scenes = encoder.scenes
    state: dict[str, UserState] = {}
    live: dict[str, np.ndarray] = {}
    records: dict[str, dict] = {}
    popularity = Popularity()
    hits = {m: 0 for m in METHODS}
    evaluated = 0
    late = 0
    step_s = 0.0
    stale: Optional[dict[str, np.ndarray]] = None

    before = [e for e in events if e.ts < cutoff_ts]
    after = [e for e in events if e.ts >= cutoff_ts]
    bar = tqdm(total=len(events), desc="replay", unit="ev", disable=not progress, mininterval=0.5)

    def step(batch: Sequence[Event]) -> None:
        nonlocal late, step_s
        t0 = time.perf_counter()
        outcome = apply_batch(state.get, batch, encoder.window)
        state.update(outcome.updates)
        late += outcome.late_dropped
        vec = encoder.interests(outcome.updates)   # what interest_records does, keeping the arrays for queries
        for r, user in enumerate(vec.users):
            records[user] = interest_record(user, outcome.updates[user], vec, r, scenes, encoder.version)
            live[user] = vec.fused[r]
        step_s += time.perf_counter() - t0
        popularity.add(batch)
        bar.update(len(batch))

    for batch in micro_batches(before, batch_size, 0):  # warm-up: the state is the same however it is cut
        step(batch)
    stale = dict(live)  # arrays are replaced, never mutated, so a shallow copy freezes them

    for batch in micro_batches(after, batch_size, batch_wait_ms):
        by_scene: dict[str, list[Event]] = defaultdict(list)
        for e in batch:
            by_scene[e.scene].append(e)
        for scene, evs in by_scene.items():
            j = scenes.index(scene)
            seen = [_seen(state.get(e.user_id), scene) if exclude_seen else set() for e in evs]
            longest = max(len(s) for s in seen)
            popular = [i for i, _ in popularity.ranked(scene, k + longest)]
            pop_top = [[i for i in popular if i not in s][:k] for s in seen]
            for method in METHODS:
                if method == "popular":
                    tops = pop_top
                else:
                    vectors = live if method == "live" else stale
                    rows = [n for n, e in enumerate(evs) if e.user_id in vectors]
                    tops = list(pop_top)
                    if rows:
                        q = np.stack([vectors[evs[n].user_id][j] for n in rows])
                        found = index.search(q, scene=scene, k=k, exclude=[seen[n] for n in rows])
                        for n, res in zip(rows, found):
                            tops[n] = [item for item, _ in res]
                hits[method] += sum(e.item_id in top for e, top in zip(evs, tops))
            evaluated += len(evs)
        step(batch)
    bar.close()

    preq = {m: {f"recall@{k}": (hits[m] / evaluated if evaluated else 0.0), "evaluated": evaluated}
            for m in METHODS}
    return ReplayResult(events=len(events), invalid=dict(loaded.invalid), late_dropped=late,
                        events_per_s=len(events) / step_s if step_s else 0.0,
                        wall_s=time.perf_counter() - t_start, cutoff_ts=cutoff_ts, prequential=preq,
                        records=records, warnings=warnings)
