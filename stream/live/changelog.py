"""The changelog's records: one per changed (user, scene) window, keyed `user \x1f scene`, whose value is the window
(`encode_windows`); plus two internal keys, the recovery fence and the per-partition "applied up to" offset marker. What
reads and writes them is state.py; this is only their format (docs/operations.md, "Topics")."""
from __future__ import annotations

import struct
from itertools import accumulate
from typing import Iterable

import numpy as np
import orjson

from ..core.events import Event
from ..core.window import ACTIONS, EMPTY, ITEMS, ROW, ROW_BYTES, SCENES, UserState, Window, apply_window, id_hash

FENCE_KEY = b"\x00fence"      # written by a recovery, which reads up to its acknowledged offset
MARKER_KEY = b"\x00applied"   # value: the highest source offset the partition's durable state covers, in decimal

_U16 = struct.Struct("<H")
SCENE_SEPARATOR = b"\x1f"   # a control character: never part of a valid id (core/events.py: check_id)


def state_key(user: str, scene: str) -> bytes:
    """The changelog key of one (user, scene) window: a micro-batch rewrites only the windows it changed, and
    compaction keeps each window's newest record."""
    return user.encode() + SCENE_SEPARATOR + scene.encode()


def encode_state(state: UserState) -> bytes:
    """A changelog value of packed windows (core/window.py), in the form `encode_windows` writes."""
    return encode_windows([(scene, t["ts"], t["id_bytes"], w.buf[w.n * ROW_BYTES:], t["item"], t["action"])
                           for scene, w in state.items() for t in (w.table(),)])


def encode_windows(windows: Iterable[tuple]) -> bytes:
    """A changelog value: windows given as (scene, ts, id sizes, ids, item codes, action codes), oldest first, the
    arrays as windows and slots hold them (core/window.py's tables give the codes' names). Binary, version 1:

        u8 1 (a JSON value starts with "{"), u8 the number of windows, then per window:
        u8 size + the scene's name; u16 n; i64[n] ts; u16[n] id sizes + the ids; u16[n] item name sizes + the
        names; u16[n] action name sizes + the names          (integers little-endian, names and ids in UTF-8)

    Names, not this process's numbers, so the log depends on no process's tables; about two thirds of the column
    JSON's bytes and a fifth of its CPU to write. `decode_state` reads it and the JSON forms written before."""
    parts = [b"\x01", b""]
    count = 0
    for scene, ts, sizes, ids, item, action in windows:
        name = scene.encode()
        (item_sizes, item_names), (action_sizes, action_names) = ITEMS.names_of(item), ACTIONS.names_of(action)
        parts += [bytes([len(name)]), name, struct.pack("<H", len(ts)), np.asarray(ts, "<i8").tobytes(),
                  np.asarray(sizes, "<u2").tobytes(), ids, item_sizes.astype("<u2").tobytes(), item_names,
                  action_sizes.astype("<u2").tobytes(), action_names]
        count += 1
    parts[1] = bytes([count])
    return b"".join(parts)


def window_values(slots, windows: np.ndarray) -> list[bytes]:
    """`encode_windows([slots.arrays(w)])` of every window slot in `windows`, byte for byte, with the columns of all of
    them gathered at once: a fresh event rewrites its whole window, so this runs for about every event, and mapping
    codes to names window by window was most of its cost."""
    if not len(windows):
        return []
    L = slots.length
    n = slots.n[windows].astype(np.int64)
    held = np.arange(L)[None, :] >= (L - n)[:, None]   # a window's rows are the last n of its row, oldest first
    rows = np.concatenate([[0], np.cumsum(n)])
    at = rows.tolist()
    ts = memoryview(slots.ts[windows][held].astype("<i8").tobytes())
    sizes = memoryview(slots.idlen[windows][held].astype("<u2").tobytes())
    columns = []
    for codes, interner in ((slots.item[windows][held], ITEMS), (slots.action[windows][held], ACTIONS)):
        lens, names = interner.names_of(codes)
        ends = np.concatenate([[0], np.cumsum(lens)])[rows].tolist()
        columns.append((memoryview(lens.astype("<u2").tobytes()), memoryview(names), ends))
    (item_sizes, item_names, item_at), (action_sizes, action_names, action_at) = columns
    heads = [b"\x01\x01" + bytes([len(name)]) + name for name in (scene.encode() for scene in slots.scenes)]
    out, pack = [], _U16.pack
    for i, (ids, scene) in enumerate(zip(slots.ids[windows].tolist(), slots.scene_of[windows].tolist())):
        a, b = at[i], at[i + 1]
        out.append(b"".join((heads[scene], pack(b - a), ts[8 * a:8 * b], sizes[2 * a:2 * b], ids,
                             item_sizes[2 * a:2 * b], item_names[item_at[i]:item_at[i + 1]],
                             action_sizes[2 * a:2 * b], action_names[action_at[i]:action_at[i + 1]])))
    return out


def decode_state(user: str, raw: bytes, length: int) -> UserState:
    """A changelog value as windows, each the join of its events (so a record that is out of order, has duplicates
    or is longer than the window still reads as a window). Reads the binary form (`encode_windows`) and the JSON
    forms of earlier versions: columns, {scene: {"ts": [...], "ids": "...", "id_bytes": [...], "item": [...],
    "action": [...]}}, and rows, {scene: [[ts, event_id, item_id, action], ...]}."""
    if raw[:1] != b"\x01":
        return {s: apply_window(EMPTY, _events(user, s, value), length)[0]
                for s, value in orjson.loads(raw).items() if value}
    out = {}
    for scene, ts, ids, items, actions in _binary_windows(raw):
        if ts:
            out[scene] = _packed(scene, ts, ids, items, actions, length) or apply_window(EMPTY, [
                Event(i.decode("utf-8", "surrogatepass"), user, item, scene, action, t)
                for t, i, item, action in zip(ts, ids, items, actions)], length)[0]
    return out


def _packed(scene: str, ts: list, ids: list, items: list, actions: list, length: int):
    """The window of rows that already are one (what the worker writes: ascending by (ts, id), ids unique), packed
    as apply_window would pack it, without an Event per row (recovery reads millions); None for any other rows.
    UTF-8 orders ids as their text does, so comparing the bytes is the lattice's order."""
    keys = list(zip(ts, ids))
    if any(a >= b for a, b in zip(keys, keys[1:])) or len(set(ids)) < len(ids):
        return None
    if len(ts) > length:
        ts, ids, items, actions = ts[-length:], ids[-length:], items[-length:], actions[-length:]
    code = SCENES.id(scene)
    rows = b"".join([ROW.pack(t, id_hash(i), ITEMS.id(item), ACTIONS.id(action), code, len(i))
                     for t, i, item, action in zip(ts, ids, items, actions)])
    return Window(rows + b"".join(ids), len(ids))


def _binary_windows(raw: bytes) -> list[tuple[str, list, list, list, list]]:
    """The binary form's windows as (scene, ts, ids as bytes, item names, action names), rows as written."""
    at, out = 2, []
    try:
        for _ in range(raw[1]):
            scene = raw[at + 1:at + 1 + raw[at]].decode()
            at += 1 + raw[at]
            (n,) = _U16.unpack_from(raw, at)
            ts = list(struct.unpack_from(f"<{n}q", raw, at + 2))
            at += 2 + 8 * n
            columns = []
            for _ in range(3):   # ids, items, actions: sizes, then the bytes
                ends = list(accumulate(struct.unpack_from(f"<{n}H", raw, at), initial=at + 2 * n))
                if ends[-1] > len(raw):
                    raise ValueError("a column past the value's end")
                columns.append([raw[a:b] for a, b in zip(ends, ends[1:])])
                at = ends[-1]
            ids, items, actions = columns
            out.append((scene, ts, ids, [i.decode() for i in items], [a.decode() for a in actions]))
    except (IndexError, ValueError, struct.error) as e:
        raise ValueError(f"a binary changelog value that does not parse ({e})") from None
    if at != len(raw):
        raise ValueError(f"a binary changelog value with {len(raw) - at} bytes past its windows")
    return out


def _events(user: str, scene: str, value) -> list[Event]:
    if isinstance(value, list):
        return [Event(eid, user, item, scene, action, ts) for ts, eid, item, action in value]
    ids, sizes = value["ids"].encode("utf-8", "surrogatepass"), value["id_bytes"]
    if sum(sizes) != len(ids) or not len(sizes) == len(value["ts"]) == len(value["item"]) == len(value["action"]):
        raise ValueError(f"a changelog window of {scene!r} whose columns do not line up")
    ends = list(accumulate(sizes))
    return [Event(ids[end - size:end].decode("utf-8", "surrogatepass"), user, item, scene, action, ts)
            for end, size, ts, item, action in zip(ends, sizes, value["ts"], value["item"], value["action"])]
