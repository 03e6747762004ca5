"""Per-(user, scene) state as a lattice: the last L events, ordered by (ts, event_id), deduplicated by event_id.

join(window, events) = top-L of the union. It is associative, commutative and idempotent, so at-least-once
delivery, any arrival order and any micro-batch boundaries give the window that top-L over the deduplicated set of
all events gives: the state is exactly-once even though delivery is not. The state is raw events only; vectors are
derived from it and may be dropped and recomputed at any time.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

from .events import Event

Window = tuple[Event, ...]          # ascending by Event.order_key, unique event_ids, len <= L
UserState = dict[str, Window]       # scene -> window; only scenes with at least one event


def _preference(e: Event) -> tuple:
    """Which copy wins when two payloads share an event_id (never happens with well-behaved producers)."""
    return (e.ts, e.item_id, e.action, e.scene)


def apply_window(window: Window, events: Iterable[Event], length: int) -> tuple[Window, int]:
    """Join events into a window. Returns the new window and how many new events did not make it into it
    (older than the L newest: a late event behind a full window, or pushed out within the same batch)."""
    present = {e.event_id for e in window}
    fresh: dict[str, Event] = {}
    for e in events:
        if e.event_id in present:
            continue
        seen = fresh.get(e.event_id)
        if seen is None or _preference(e) > _preference(seen):
            fresh[e.event_id] = e
    if not fresh:
        return window, 0
    merged = sorted((*window, *fresh.values()), key=Event.order_key.fget)
    kept = tuple(merged[-length:])
    dropped = sum(1 for e in merged[:-length] if e.event_id in fresh) if len(merged) > length else 0
    return kept, dropped


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

