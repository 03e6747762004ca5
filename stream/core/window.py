"""Per-(user, scene) state as a lattice: the last L events, ordered by (ts, event_id), deduplicated by event_id.

join(window, events) = top-L of the union, where two copies of one event_id count once (the preferred one, see
`_preference`). It is associative, commutative and idempotent, so at-least-once
delivery, any arrival order and any micro-batch boundaries give the window that top-L over the deduplicated set of
all events gives: the state is exactly-once even though delivery is not. The state is raw events only; vectors are
derived from it and may be dropped and recomputed at any time.

A window is packed (`Window`): one bytes object of fixed 24-byte rows, then the event ids back to back. A row is
(ts, a 64-bit hash of the event id, item, action, scene, id length), item, action and scene as numbers from
process-wide tables (`ITEMS`, `ACTIONS`, `SCENES`). About 1.6-2.6 KB for a full window of 50 events where tuples of
Event objects took 20 KB (BENCHMARKS.md, "State size"). The ids are kept whole, so the join compares and orders
exactly what the object form did (ties in time by event id, two distinct ids never one event): the hash only makes
row comparisons cheap (`rows`), it never decides identity in the join.
"""
from __future__ import annotations

import struct
from collections import defaultdict
from itertools import accumulate
from operator import itemgetter
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from .events import Event

ROW = struct.Struct("<qqiBBH")   # ts, id hash, item, action, scene, id bytes
ROW_BYTES = ROW.size             # 24
ROW_DTYPE = np.dtype([("ts", "<i8"), ("hash", "<i8"), ("item", "<i4"), ("action", "u1"), ("scene", "u1"),
                      ("id_bytes", "<u2")])
assert ROW_DTYPE.itemsize == ROW_BYTES
_ID_BYTES, _ID_BYTES_AT = struct.Struct("<H"), ROW_DTYPE.fields["id_bytes"][1]   # one row's id length, where it is


PADDED_NAMES = 32   # bytes: names up to this long are gathered as rows of a padded table (`Interner.names_of`)


class Interner:
    """name <-> number, for the life of the process: windows hold numbers, never strings. Only grows (an item
    costs its name and a dict entry once, however many windows hold it: ~100 bytes per distinct item)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        self.raw: list[bytes] = []   # the names in UTF-8 (what the changelog writes)
        # `names_of`'s table of raw[:_tabled]: sizes, where each starts in blob, the bytes
        self._sizes, self._starts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._blob, self._tabled = np.zeros(0, np.uint8), 0
        # and while every name is short, the names as rows of one width, zero-padded: a gather of rows
        self._padded: Optional[np.ndarray] = np.zeros((0, 8), np.uint8)

    def __len__(self) -> int:
        return len(self.names)

    def names_of(self, codes: np.ndarray) -> tuple[np.ndarray, bytes]:
        """The UTF-8 names of `codes` as their sizes and their bytes end to end, gathered as arrays (the changelog
        writes a window's item names so, for about every event)."""
        self._extend_table()
        lens = self._sizes[codes]
        if self._padded is not None:   # rows of the padded table, the padding masked out
            rows = self._padded[codes]
            return lens, rows[np.arange(rows.shape[1])[None, :] < lens[:, None]].tobytes()
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        return lens, self._blob[np.repeat(self._starts[codes] - (ends - lens), lens) + np.arange(total)].tobytes()

    def _extend_table(self) -> None:
        """`names_of`'s arrays take the names added since, in room that doubles: a stream that keeps meeting new
        items costs each name once, not the whole table per batch."""
        have, new = self._tabled, self.raw[self._tabled:]
        if not new:
            return
        sizes = np.fromiter(map(len, new), np.int64, len(new))
        used = int(self._starts[have - 1] + self._sizes[have - 1]) if have else 0
        if have + len(new) > len(self._sizes):
            room = max(2 * len(self._sizes), have + len(new), 64)
            self._sizes, self._starts = (np.concatenate([a[:have], np.zeros(room - have, np.int64)])
                                         for a in (self._sizes, self._starts))
        if used + int(sizes.sum()) > len(self._blob):
            self._blob = np.concatenate([self._blob[:used], np.zeros(max(len(self._blob), used + int(sizes.sum()),
                                                                         1024), np.uint8)])
        self._sizes[have:have + len(new)] = sizes
        self._starts[have:have + len(new)] = used + np.cumsum(sizes) - sizes
        self._blob[used:used + int(sizes.sum())] = np.frombuffer(b"".join(new), np.uint8)
        self._tabled = have + len(new)
        longest = int(sizes.max())
        if self._padded is None or longest > PADDED_NAMES:   # a long name: the byte gather from then on
            self._padded = None
            return
        width = max(self._padded.shape[1], 1 << (longest - 1).bit_length())
        if len(self._padded) < len(self._sizes) or width > self._padded.shape[1]:
            grown = np.zeros((len(self._sizes), width), np.uint8)
            grown[:have, :self._padded.shape[1]] = self._padded[:have]
            self._padded = grown
        self._padded[np.repeat(np.arange(have, have + len(new)), sizes),
                     np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)] = \
            self._blob[used:used + int(sizes.sum())]

    def ids(self, names: Sequence[str]) -> np.ndarray:
        """`id` of each name: the known ones in one pass of the dict."""
        got = list(map(self.index.get, names))
        if None in got:
            got = [self.id(n) if i is None else i for n, i in zip(names, got)]
        return np.array(got, np.int64)

    def id(self, name: str) -> int:
        i = self.index.get(name)
        if i is None:
            i = len(self.names)
            if i >= self.limit:
                raise OverflowError(f"more than {self.limit} distinct names")
            self.raw.append(name.encode("utf-8", "surrogatepass"))
            self.names.append(name)   # the name first: a reader in another thread that sees the number finds it
            self.index[name] = i
        return i


ITEMS, ACTIONS, SCENES = Interner(2**31 - 1), Interner(256), Interner(256)


def id_hash(id_bytes: bytes) -> int:
    """Python's own 64-bit hash of the id (SipHash, keyed per process): a twentieth of a blake2b's cost, run for
    every event. Rows are never written with it (the changelog and the disk hold the ids), so a process's key is
    never compared with another's."""
    return hash(id_bytes)


def _id_bytes(event_id: str) -> bytes:
    return event_id.encode("utf-8", "surrogatepass")   # JSON may carry a lone surrogate; it is kept as it came


def _row(e: Event, eid: bytes) -> bytes:
    return ROW.pack(e.ts, id_hash(eid), ITEMS.id(e.item_id), ACTIONS.id(e.action), SCENES.id(e.scene), len(eid))


class Codebook:
    """Names of the numbers in window rows, for readers that may not import this module (the encoder)."""
    items, actions, scenes = ITEMS, ACTIONS, SCENES


class Window:
    """One (user, scene)'s events, packed (see the module docstring); immutable, compared by content. Iterating
    gives Event objects with an empty user_id (the window does not store its user; `events(user)` fills it in).
    What the encoder reads (model/infer.py): `table()`, `ids()` and `codebook`."""

    __slots__ = ("buf", "n")
    codebook = Codebook

    def __init__(self, buf: bytes = b"", n: int = 0):
        self.buf, self.n = buf, n

    @classmethod
    def of(cls, events: Iterable[Event]) -> "Window":
        """Pack events that are already a window: ascending by (ts, event_id), unique event ids."""
        events = list(events)
        ids = [_id_bytes(e.event_id) for e in events]
        return cls(b"".join(map(_row, events, ids)) + b"".join(ids), len(ids))

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def __eq__(self, other) -> bool:
        return isinstance(other, Window) and self.buf == other.buf

    def __hash__(self) -> int:
        return hash(self.buf)

    def __repr__(self) -> str:
        return f"Window({list(self)!r})"

    @property
    def rows(self) -> bytes:
        """The rows alone (what the encoder reads): equal rows are the same events, up to a 64-bit hash."""
        return self.buf[:self.n * ROW_BYTES]

    def table(self) -> np.ndarray:
        return np.frombuffer(self.buf, ROW_DTYPE, self.n)

    @property
    def last_ts(self) -> int:
        return ROW.unpack_from(self.buf, (self.n - 1) * ROW_BYTES)[0]

    def last_key(self) -> tuple[int, str]:
        """(ts, event_id) of the newest event: the last id ends the buffer."""
        ts, _, _, _, _, size = ROW.unpack_from(self.buf, (self.n - 1) * ROW_BYTES)
        return ts, self.buf[len(self.buf) - size:].decode("utf-8", "surrogatepass")

    def ids(self, start: int = 0) -> list[str]:
        """The event ids, from the `start`th event on (found from the buffer's end: callers mostly want the newest)."""
        sizes = self.table()["id_bytes"][start:].tolist()
        ends = list(accumulate(sizes))
        raw = self.buf[len(self.buf) - ends[-1]:] if ends else b""
        text = raw.decode("utf-8", "surrogatepass")   # one decode; sliced by byte offsets when all ASCII
        if len(text) == len(raw):
            return [text[end - size:end] for end, size in zip(ends, sizes)]
        return [raw[end - size:end].decode("utf-8", "surrogatepass") for end, size in zip(ends, sizes)]

    def item_ids(self) -> list[str]:
        names = ITEMS.names
        return [names[i] for i in self.table()["item"].tolist()]

    def events(self, user: str = "") -> tuple[Event, ...]:
        t = self.table()
        items, actions, scenes = ITEMS.names, ACTIONS.names, SCENES.names
        return tuple(Event(eid, user, items[i], scenes[s], actions[a], ts) for eid, ts, i, a, s in
                     zip(self.ids(), t["ts"].tolist(), t["item"].tolist(), t["action"].tolist(),
                         t["scene"].tolist()))

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events())

    def may_hold(self, event_id: bytes) -> bool:
        """False only if no event of the window has this id (a cheap test; True may be wrong)."""
        return self.buf.find(event_id, self.n * ROW_BYTES) >= 0

    def extended(self, new: list[Event], length: int) -> "Window":
        """This window plus events newer than all of it, cut to the newest `length`."""
        if len(new) >= length:
            return Window.of(new[-length:])
        ids = [_id_bytes(e.event_id) for e in new]
        drop = max(0, self.n + len(new) - length)
        cut = self.n * ROW_BYTES
        skip = sum(_ID_BYTES.unpack_from(self.buf, r * ROW_BYTES + _ID_BYTES_AT)[0] for r in range(drop))
        return Window(b"".join((self.buf[drop * ROW_BYTES:cut], *map(_row, new, ids), self.buf[cut + skip:], *ids)),
                      self.n + len(new) - drop)


EMPTY = Window()
UserState = dict[str, Window]       # scene -> window; only scenes with at least one event


_order = itemgetter(Event._fields.index("ts"), Event._fields.index("event_id"))   # Event.order_key, in C

# Which copy wins when two payloads share an event_id in one window (well-behaved producers never do this): the later
# one, then the larger item_id and action, (ts, item_id, action). A total order on the copies, so the winner is the
# same whatever order and batches the copies arrive in; and since the later copy wins, a copy that lost to an evicted
# one is older than the window too.
_preference = itemgetter(*(Event._fields.index(f) for f in ("ts", "item_id", "action")))


def apply_window(window: Window, events: Iterable[Event], length: int) -> tuple[Window, int]:
    """Join events into a window. Returns the new window and how many new events did not make it into it
    (older than the L newest: a late event behind a full window, or pushed out within the same batch)."""
    fresh: dict[str, Event] = {}
    for e in events:
        best = fresh.get(e.event_id)
        if best is None or _preference(e) > _preference(best):
            fresh[e.event_id] = e
    if not fresh:
        return window, 0
    new = sorted(fresh.values(), key=_order)
    if not window or (_order(new[0]) > window.last_key()
                      and not any(window.may_hold(_id_bytes(i)) for i in fresh)):
        # the common case, events newer than the window: the window's rows are kept as they are
        return window.extended(new, length), max(0, len(new) - length)
    current = {e.event_id: e for e in window.events()}
    for eid, e in list(fresh.items()):
        held = current.get(eid)
        if held is not None and _preference(held) >= _preference(e):
            del fresh[eid]   # the window holds this copy or a preferred one
    if not fresh:
        return window, 0
    merged = sorted((*(e for e in current.values() if e.event_id not in fresh), *fresh.values()), key=_order)
    kept = merged[-length:]
    dropped = sum(1 for e in merged[:-length] if fresh.get(e.event_id) is e) if len(merged) > length else 0
    return Window.of(kept), dropped


def item_delta(old: Optional[Window], new: Window) -> dict[str, int]:
    """How the counts of items in a window changed from `old` to `new` (nonzero entries only): what the owner of
    the windows adds to its popularity counts."""
    delta: dict[int, int] = defaultdict(int)
    kept = _kept_rows(old, new) if old else None
    if kept is not None:   # new = old without its oldest rows, then newer ones: only the ends differ
        added, removed = _items(new, kept, new.n), _items(old, 0, old.n - kept)
    else:
        added, removed = _items(new, 0, new.n), _items(old, 0, old.n) if old else []
    for i in added:
        delta[i] += 1
    for i in removed:
        delta[i] -= 1
    names = ITEMS.names
    return {names[i]: d for i, d in delta.items() if d}


_ITEM_OF_ROW = struct.Struct("<16xi4x")   # a row's item number alone
assert _ITEM_OF_ROW.size == ROW_BYTES and ROW_DTYPE.fields["item"][1] == 16


def _items(w: Window, start: int, stop: int) -> list[int]:
    """The item numbers of rows start..stop-1, read in place (a few rows, mostly: numpy's field access costs more)."""
    return [i for (i,) in _ITEM_OF_ROW.iter_unpack(memoryview(w.buf)[start * ROW_BYTES:stop * ROW_BYTES])]


def _kept_rows(old: Window, new: Window) -> Optional[int]:
    """k, if `new` starts with `old`'s newest k rows (the window kept them and added newer events: the common
    case); None otherwise. Rows are whole events, so matching bytes at a row boundary are the same events."""
    first = new.buf[:ROW_BYTES]
    at = old.rows.find(first) if first else -1
    if at < 0 or at % ROW_BYTES:
        return None
    kept = old.n - at // ROW_BYTES
    if kept > new.n or new.buf[:kept * ROW_BYTES] != old.buf[at:old.n * ROW_BYTES]:
        return None
    return kept


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
        old = state.get(scene, EMPTY)
        new, d = apply_window(old, scene_events, length)
        dropped += d
        if new != old:
            new_state[scene] = new
            changed.add(scene)
    return new_state, changed, dropped

