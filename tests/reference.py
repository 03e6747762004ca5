"""The packed windows' micro-batch join, user by user (core/window.py's `apply_user`): the specification that the
slots' array join (core/slots.py) is held to, and the plain loop the replay tests compare replay's rounds with."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from scenestream.stream.core.events import Event
from scenestream.stream.core.window import UserState, apply_user


def group_by_user(events: Iterable[Event]) -> dict[str, list[Event]]:
    groups: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        groups[e.user_id].append(e)
    return groups


@dataclass
class BatchOutcome:
    updates: dict[str, UserState]   # users whose windows changed -> their full new state
    late_dropped: int               # new events that did not make it into a window


def apply_batch(lookup: Callable[[str], Optional[UserState]], events: Sequence[Event], length: int) -> BatchOutcome:
    updates: dict[str, UserState] = {}
    dropped = 0
    for user, evs in group_by_user(events).items():
        new, changed, d = apply_user(lookup(user) or {}, evs, length)
        dropped += d
        if changed:
            updates[user] = new
    return BatchOutcome(updates, dropped)
