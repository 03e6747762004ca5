"""The changelog's records: one per changed (user, scene) window, keyed `user \x1f scene`, whose value is the window
as columns; plus two internal keys, the recovery fence and the per-partition "applied up to" offset marker. What
reads and writes them is state.py; this is only their format (docs/operations.md, "Topics")."""
from __future__ import annotations

from itertools import accumulate

import orjson

from ..core.events import Event
from ..core.window import EMPTY, UserState, apply_window

FENCE_KEY = b"\x00fence"      # written by a recovery, which reads up to its acknowledged offset
MARKER_KEY = b"\x00applied"   # value: the highest source offset the partition's durable state covers, in decimal

SCENE_SEPARATOR = b"\x1f"   # a control character: never part of a valid id (core/events.py: check_id)


def state_key(user: str, scene: str) -> bytes:
    """The changelog key of one (user, scene) window: a micro-batch rewrites only the windows it changed, and
    compaction keeps each window's newest record."""
    return user.encode() + SCENE_SEPARATOR + scene.encode()


def encode_state(state: UserState) -> bytes:
    """A changelog value, {scene: columns} (one window, as the worker writes it; whole states read back the same):
    compact JSON in UTF-8 (no ASCII escapes), per field one list (`Window.columns`), whose size
    StreamConfig.state_record_bound bounds. Ids by name, so the log does not depend on any process's tables."""
    return orjson.dumps({s: w.columns() for s, w in state.items()})


def decode_state(user: str, raw: bytes, length: int) -> UserState:
    """A changelog value as windows, each the join of its events (so a record that is out of order, has duplicates
    or is longer than the window still reads as a window). Also reads the row form that changelogs written before
    the column form hold: {scene: [[ts, event_id, item_id, action], ...]}."""
    return {s: apply_window(EMPTY, _events(user, s, value), length)[0]
            for s, value in orjson.loads(raw).items() if value}


def _events(user: str, scene: str, value) -> list[Event]:
    if isinstance(value, list):
        return [Event(eid, user, item, scene, action, ts) for ts, eid, item, action in value]
    ids, sizes = value["ids"].encode("utf-8", "surrogatepass"), value["id_bytes"]
    if sum(sizes) != len(ids) or not len(sizes) == len(value["ts"]) == len(value["item"]) == len(value["action"]):
        raise ValueError(f"a changelog window of {scene!r} whose columns do not line up")
    ends = list(accumulate(sizes))
    return [Event(ids[end - size:end].decode("utf-8", "surrogatepass"), user, item, scene, action, ts)
            for end, size, ts, item, action in zip(ends, sizes, value["ts"], value["item"], value["action"])]
