"""Per-(user, scene) state as a lattice: the last L events, ordered by (ts, event_id), deduplicated by event_id.

join(window, events) = top-L of the union, where two copies of one event_id count once (the preferred one, see
`_preference`). It is associative, commutative and idempotent, so at-least-once
delivery, any arrival order and any micro-batch boundaries give the window that top-L over the deduplicated set of
all events gives: the state is exactly-once even though delivery is not. The state is raw events only; vectors are
derived from it and may be dropped and recomputed at any time.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from .events import Event

Window = tuple[Event, ...]          # ascending by Event.order_key, unique event_ids, len <= L
UserState = dict[str, Window]       # scene -> window; only scenes with at least one event


_order = Event.order_key.fget


def _preference(e: Event) -> tuple:
    """Which copy wins when two payloads share an event_id in one window (well-behaved producers never do this):
    the later one, then the larger item_id and action. A total order on the copies, so the winner is the same
    whatever order and batches the copies arrive in; and since the later copy wins, a copy that lost to an
    evicted one is older than the window too."""
    return (e.ts, e.item_id, e.action)


def apply_window(window: Window, events: Iterable[Event], length: int) -> tuple[Window, int]:
    """Join events into a window. Returns the new window and how many new events did not make it into it
    (older than the L newest: a late event behind a full window, or pushed out within the same batch)."""
    current = {e.event_id: e for e in window}
    fresh: dict[str, Event] = {}
    for e in events:
        best = fresh.get(e.event_id) or current.get(e.event_id)
        if best is None or _preference(e) > _preference(best):
            fresh[e.event_id] = e
    if not fresh:
        return window, 0
    new = sorted(fresh.values(), key=_order)
    if (not window or _order(new[0]) > _order(window[-1])) and current.keys().isdisjoint(fresh):
        merged = window + tuple(new)   # the common case, events newer than the window: no sort of the window
        return (merged, 0) if len(merged) <= length else (merged[-length:], max(0, len(new) - length))
    merged = sorted((*(e for e in window if e.event_id not in fresh), *new), key=_order)
    kept = tuple(merged[-length:])
    dropped = sum(1 for e in merged[:-length] if fresh.get(e.event_id) is e) if len(merged) > length else 0
    return kept, dropped


def window_diff(old: Window, new: Window) -> tuple[Sequence[Event], Sequence[Event]]:
    """(events in `new` but not in `old`, events in `old` but not in `new`): what the owner of the windows counts in
    and out of popularity. An event and an equal copy of it count the same, so either may stand for the other.
    Cheap in the common case, a window that lost its oldest events and gained newer ones."""
    if old and new:
        last = old[-1]
        for p in range(len(new) - 1, -1, -1):
            if new[p] is last:
                k = len(old) - (p + 1)                 # events dropped from the front
                if k >= 0 and new[:p + 1] == old[k:]:
                    return new[p + 1:], old[:k]
                break
    before, after = {id(e): e for e in old}, {id(e) for e in new}
    return [e for e in new if id(e) not in before], [e for i, e in before.items() if i not in after]


def apply_user(state: Mapping[str, Window], events: Iterable[Event], length: int
               ) -> tuple[UserState, set[str], int]:
    """Join one user's events into their per-scene windows. Returns (new state, scenes whose window changed,
    events dropped as late). The input mapping is not modified."""
    by_scene: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_scene[e.scene].append(e)
    new_state = dict(state)
    changed: set[str] = set()
    dropped = 0
    for scene, scene_events in by_scene.items():
        old = state.get(scene, ())
        new, d = apply_window(old, scene_events, length)
        dropped += d
        if new != old:
            new_state[scene] = new
            changed.add(scene)
    return new_state, changed, dropped


def group_by_user(events: Iterable[Event]) -> dict[str, list[Event]]:
    groups: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        groups[e.user_id].append(e)
    return groups

