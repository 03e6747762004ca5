"""The one micro-batch step that the live worker and offline replay share.

    events --apply_batch--> new windows for the touched users --interest_records--> one record per touched user

`apply_batch` is pure: it reads current windows through a lookup and returns the users' new states, so the caller
decides how to store them (a dict in replay, the changelog-backed store in the worker). `interest_records` encodes
all touched users in one batched forward and builds the record that is published and written to users.jsonl.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import orjson

from .events import Event
from .window import UserState, apply_user, group_by_user


class Encoder(Protocol):
    """What the step needs of the model (scenestream.model.infer.InterestEncoder): passed in, so this layer never
    loads torch."""
    scenes: tuple[str, ...]
    version: str

    def interests(self, states: Mapping[str, UserState]) -> Any: ...


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


def interest_record(user: str, state: UserState, vec: Any, row: int, scenes: Sequence[str],
                    version: str) -> dict:
    """The published per-user record (docs/operations.md, "Output record"): the same from the worker and replay.
    Vectors stay float32 arrays: `record_json` writes them without a Python float per element. They are the
    user's own copies, not views of the batch's arrays: the worker keeps each user's newest record, and one view
    kept a whole micro-batch's arrays alive, for as long as any of its users stayed untouched."""
    targets = list(scenes) + ["global"]
    has = vec.has[row]
    src_idx = [i for i in range(len(scenes)) if has[i]]
    weights = vec.weights[row].tolist()
    h, fused = vec.h[row].copy(), vec.fused[row].copy()
    return {
        "user_id": user,
        "model_version": version,
        "scenes": {scenes[i]: h[i] for i in src_idx},
        "fused": {s: fused[j] for j, s in enumerate(scenes)},
        "global": fused[len(scenes)],
        "recent": vec.recent[row].copy(),
        "weights": {t: {scenes[i]: weights[j][i] for i in src_idx} for j, t in enumerate(targets)},
        "newest_ts": max(w.last_ts for w in state.values() if w),
        "events": sum(len(w) for w in state.values()),
    }


def record_json(record: dict) -> bytes:
    """A record as JSON bytes: float32 vectors as lists of the shortest decimals that read back to the same
    float32 values."""
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)


def interest_records(encoder: Encoder, states: Mapping[str, UserState]) -> list[dict]:
    vec = encoder.interests(states)
    return [interest_record(u, states[u], vec, r, encoder.scenes, encoder.version) for r, u in enumerate(vec.users)]
