"""Offline replay: an event log through the live worker's micro-batch step, with prequential evaluation.

Events before the time cutoff warm the state up. From the cutoff on, the log is cut into micro-batches as the
worker would cut it at the log's own pace (`micro_batches`), and before each micro-batch is applied, every event in it
asks for its user's top-K in its scene from three recommenders, and scores a hit when its item is there:
  live    -- the vectors as the stream keeps them (what SceneStream serves)
  stale   -- the vectors frozen at the cutoff (a daily batch job's view)
  popular -- the most popular items of the scene so far
Users with no vector yet get the popular list in all three, so the comparison is about the vectors alone.

How it runs fast without changing a figure. An event's evaluation reads only its own user's window and vector as
of before its micro-batch, and the scene's counts as of before its micro-batch. So, a stretch of the log at a time:
  1. In log order, each micro-batch is scored on `popular` (counts kept ranked as they grow: `RunningTop`) and
     `stale` (vectors fixed since the cutoff) and then joined into the windows (held as slots: core/slots.py).
  2. The micro-batches are then encoded in rounds (`rounds`): a micro-batch goes in the round after the last one
     that holds any of its users, so the users of a round are disjoint and each user's micro-batches come in
     order. Before a round is encoded, its events query the live vectors: for each of them, exactly its user's
     vectors before its micro-batch. One encoder call per round, not per micro-batch (ML-1M: 4,801 rounds for
     110,948 micro-batches); each user's windows, and so their vectors and records, are the ones the micro-batch
     loop gives, since vectors are a function of the windows alone (to float rounding, which depends on what
     else is in the encoder's batch: records agree to ~1e-6, within the 1e-5 of the exactness contract).
  3. Index queries wait in a queue and run thousands at a time: a query's answer depends only on its vector and
     the items it leaves out, not on the queries searched with it.
tests/test_replay.py holds this to the plain micro-batch loop: hit for hit, and record for record to 1e-5.
"""
from __future__ import annotations

import gc
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from scenestream.index import ItemIndex
from scenestream.model.infer import InterestEncoder

from scenestream.model.slot_encoder import SlotEncoder

from ..core.events import Event
from ..core.popularity import RunningTop
from ..core.slot_step import encode as encode_slots
from ..core.slots import SlotWindows
from ..core.vector_table import VectorTable
from .logs import LoadedEvents, time_cutoff

log = logging.getLogger(__name__)

METHODS = ("live", "stale", "popular")


PLAN_EVENTS = 20_000   # after the cutoff, the log is scored and encoded this many events at a time (bounds memory)
SEARCH_BATCH = 4096    # index queries of one scene per search call


@dataclass
class ReplayResult:
    events: int
    invalid: dict[str, int]
    late_dropped: int
    # Valid events / seconds spent in the streaming step: applying every micro-batch to the windows, encoding the
    # touched users and building their records (not decoding, not the evaluation's index and popularity queries).
    # After the cutoff the encoding is done per round of micro-batches (module docstring), so this is replay
    # throughput, not the latency of one worker micro-batch.
    events_per_s: float
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


def rounds(users_of_batches: Iterable[Iterable[str]]) -> list[list[int]]:
    """Micro-batches, given by their users, grouped into rounds of micro-batch numbers (ascending within a round):
    each micro-batch goes in the round after the latest round that holds one of its users. So no two micro-batches
    of a round share a user, and each user's micro-batches fall in increasing rounds, in log order."""
    latest: dict[str, int] = {}
    out: list[list[int]] = []
    for n, users in enumerate(users_of_batches):
        users = set(users)
        r = 1 + max((latest.get(u, -1) for u in users), default=-1)
        for u in users:
            latest[u] = r
        if r == len(out):
            out.append([])
        out[r].append(n)
    return out


def _stretches(batches: Iterable[Sequence[Event]], n_events: int) -> Iterator[list[Sequence[Event]]]:
    """Consecutive micro-batches, about n_events events at a time (whole micro-batches)."""
    out: list[Sequence[Event]] = []
    size = 0
    for batch in batches:
        out.append(batch)
        size += len(batch)
        if size >= n_events:
            yield out
            out, size = [], 0
    if out:
        yield out


class _Searches:
    """Index queries of one recommender, held until SEARCH_BATCH of one scene wait, then searched in one call; the
    answer to a query depends only on its vector and the items it leaves out. Counts the queries' hits."""

    def __init__(self, index: ItemIndex, k: int) -> None:
        self.index, self.k = index, k
        self.waiting: dict[str, list[tuple[np.ndarray, Iterable[str], str]]] = defaultdict(list)
        self.hits = 0

    def add(self, scene: str, vector: np.ndarray, seen: Iterable[str], item: str) -> None:
        waiting = self.waiting[scene]
        waiting.append((vector, seen, item))
        if len(waiting) >= SEARCH_BATCH:
            self._search(scene)

    def flush(self) -> None:
        for scene in list(self.waiting):
            self._search(scene)

    def _search(self, scene: str) -> None:
        waiting = self.waiting.pop(scene)
        found = self.index.search(np.stack([v for v, _, _ in waiting]), scene=scene, k=self.k,
                                  exclude=[seen for _, seen, _ in waiting])
        self.hits += sum(any(i == item for i, _ in res) for (_, _, item), res in zip(waiting, found))


def replay(loaded: LoadedEvents, encoder: InterestEncoder, index: ItemIndex, batch_size: int = 1000,
           eval_cutoff: float = 0.8, k: int = 10, exclude_seen: bool = True, progress: bool = True,
           checkpoint_cutoff_ts: Optional[int] = None, batch_wait_ms: int = 200) -> ReplayResult:
    t_start = time.perf_counter()
    # The log and the model outlive the replay: frozen, the cyclic collector stops walking them again and again
    # (a tenth of the streaming step on the default synthetic log). Left alone when the caller froze already.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        return _replay(loaded, encoder, index, batch_size, eval_cutoff, k, exclude_seen, progress,
                       checkpoint_cutoff_ts, batch_wait_ms, t_start)
    finally:
        if freeze:
            gc.unfreeze()


def _replay(loaded: LoadedEvents, encoder: InterestEncoder, index: ItemIndex, batch_size: int, eval_cutoff: float,
            k: int, exclude_seen: bool, progress: bool, checkpoint_cutoff_ts: Optional[int], batch_wait_ms: int,
            t_start: float) -> ReplayResult:
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
    position = {s: j for j, s in enumerate(scenes)}
    slots = SlotWindows(scenes, encoder.window)
    streamed = SlotEncoder(encoder, encoder.cache_mb)
    live = VectorTable(scenes, streamed.width)   # every user's newest vectors, by slot (users never leave here)
    # a user's seen items are at most a window, so the best k + window items of a scene hold every popular list
    popularity = RunningTop(k + encoder.window)
    fallback = {m: 0 for m in METHODS}   # hits of the popular list: all of popular; live, stale without a vector
    searches = {m: _Searches(index, k) for m in ("live", "stale")}
    evaluated = 0
    late = 0
    step_s = 0.0

    before = [e for e in events if e.ts < cutoff_ts]
    after = [e for e in events if e.ts >= cutoff_ts]
    bar = tqdm(total=len(events), desc="replay", unit="ev", disable=not progress, mininterval=0.5)

    def apply(batch: Sequence[Event], count: bool = True) -> np.ndarray:
        """The micro-batch joined into the windows (counted in the popularity when `count`); the user slots it
        changed."""
        nonlocal late, step_s
        t0 = time.perf_counter()
        joined = slots.join(batch)
        late += joined.late_dropped
        step_s += time.perf_counter() - t0
        if count:
            popularity.add(batch)
            bar.update(len(batch))
        return joined.users

    def encode(users: np.ndarray) -> None:
        nonlocal step_s
        if not len(users):
            return
        t0 = time.perf_counter()
        vec = encode_slots(slots, users, streamed)   # the live worker's step and table
        live.put(vec.users, slots.uver[vec.users], vec, np.arange(len(vec.users)), encoder.version, 0.0)
        step_s += time.perf_counter() - t0

    for batch in micro_batches(before, batch_size, 0):  # warm-up: the state is the same however it is cut
        encode(apply(batch))
    stale, stale_held = live.fused.copy(), live.owner >= 0   # the vectors at the cutoff, frozen

    for stretch in _stretches(micro_batches(after, batch_size, batch_wait_ms), PLAN_EVENTS):
        # 1. in log order: the popular list each event meets (the counts before its micro-batch), as the items
        #    ranked ahead of its own (it is a hit if fewer than k of those are left once its user's seen ones go)
        ahead = []
        for batch in stretch:
            ahead.append([popularity.ahead(e.scene, e.item_id, k + encoder.window) for e in batch])
            popularity.add(batch)
            bar.update(len(batch))
        # 2. in rounds: each user's micro-batches in order, the users of a round disjoint; a micro-batch is scored
        #    against its user's windows and vectors before it (live, stale, popular), joined, and the round encoded
        for rnd in rounds([{e.user_id for e in batch} for batch in stretch]):
            for n in rnd:   # the round's users are disjoint: each batch meets its users' windows before it
                batch = stretch[n]
                seen_of: dict[tuple[str, str], tuple[set[str], tuple[str, ...]]] = {}
                for e, before in zip(batch, ahead[n]):
                    got = seen_of.get((e.user_id, e.scene))
                    if got is None:
                        seen_set = set(slots.item_ids(e.user_id, e.scene)) if exclude_seen else set()
                        got = seen_of[(e.user_id, e.scene)] = (seen_set, tuple(seen_set))  # the tuple is kept
                    seen_set, seen = got
                    popular_hit = before is not None and e.item_id not in seen_set and \
                        sum(1 for item in before if item not in seen_set) < k
                    fallback["popular"] += popular_hit
                    slot = slots.slot_of.get(e.user_id)
                    j = position[e.scene]
                    if slot is not None and slot < len(stale_held) and stale_held[slot]:
                        searches["stale"].add(e.scene, stale[slot, j], seen, e.item_id)
                    else:
                        fallback["stale"] += popular_hit
                    if live.held(slot, -1 if slot is None else slots.uver[slot]):   # a copy: the row changes
                        searches["live"].add(e.scene, live.fused[slot, j].copy(), seen, e.item_id)
                    else:
                        fallback["live"] += popular_hit
                evaluated += len(batch)
                ahead[n] = None
            # joined as one (disjoint users: the same windows as one by one), then encoded
            encode(apply([e for n in rnd for e in stretch[n]], count=False))
    bar.close()
    for s in searches.values():
        s.flush()

    hits = {m: fallback[m] + (searches[m].hits if m in searches else 0) for m in METHODS}
    preq = {m: {f"recall@{k}": (hits[m] / evaluated if evaluated else 0.0), "evaluated": evaluated}
            for m in METHODS}
    return ReplayResult(events=len(events), invalid=dict(loaded.invalid), late_dropped=late,
                        events_per_s=len(events) / step_s if step_s else 0.0,
                        wall_s=time.perf_counter() - t_start, cutoff_ts=cutoff_ts, prequential=preq,
                        records={user: live.record(user, slot) for user, slot in slots.slot_of.items()
                                 if live.held(slot, slots.uver[slot])},
                        warnings=warnings)
