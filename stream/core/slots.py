"""Users as slots: every held (user, scene) window a row of preallocated arrays, and a micro-batch joined into them
with sorts and masks over the batch's rows.

The live worker's per-user Python objects (a window object per scene, dicts of states, a record per user) cost a
fresh event, which brings its user alone to a micro-batch, several times what the join's work is worth. Here, as in
vLLM's persistent batch or SGLang's request-to-token pool, the only per-user object is one `user -> slot` entry;
each (user, scene) pair that has events has a window slot, and a window is row `w` of:

    ts[w, :], hash[w, :], item[w, :], action[w, :], idlen[w, :]   right-aligned: the newest event in column L-1,
    n[w]                                                           the window's n events in columns L-n .. L-1
    ids[w]                                                         its event ids back to back, oldest first

`hash` is the 64-bit hash of the event id that packed windows carry (core/window.py: the same rows, the same
numbers); `ids` keeps the ids whole, so the lattice still orders ties in time by event id and never takes two ids
for one event.

`join` is `apply_batch` (core/batch.py) on slots, with the same result for every input (tests/test_slots.py holds
the two to it). The common case, every event of a window newer than all of it and none a copy of one it holds (live
traffic; a backlog in order), is array work for the whole batch at once: the new rows are appended by one gather
per field, the oldest dropped. A window whose events are not all newer, or that meets a copy of an event (a
re-delivery after a crash, a duplicate), is joined by the packed-window rules themselves (`apply_window`) and written
back: rare, and exact by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Iterable, Optional, Sequence

import numpy as np

from .events import Event
from .window import ACTIONS, EMPTY, ITEMS, ROW_DTYPE, SCENES, UserState, Window, apply_window, id_hash

_EMPTY_I = np.zeros(0, np.int64)
UNKNOWN = np.int64(-0x7EDCBA9876543210)   # the newest event's hash of a timeline never encoded


@dataclass
class SlotJoin:
    """What a micro-batch changed. Windows are window slots; for each changed window, `appended` is how many new
    rows end it, all after rows that were there before (so an encoder's cached positions still hold), or -1 when it
    was rewritten (its cached positions do not)."""
    windows: np.ndarray         # changed window slots
    appended: np.ndarray        # per changed window: new rows at its end, or -1
    users: np.ndarray           # user slots with a changed window, each once, in the order first met
    late_dropped: int           # new events that did not make it into their window
    added: np.ndarray           # window slot of each item that entered a window (one per row) ...
    added_items: np.ndarray     # ... and its item code
    removed: np.ndarray         # window slot of each item that left a window ...
    removed_items: np.ndarray   # ... and its item code


@dataclass
class Windows:
    """Windows as the encoder reads them (model/slot_encoder.py): row b of each array is window b, right-aligned (its
    n[b] events in columns L-n[b] .. L-1, oldest first), item, action and scene as codes of core/window.py's
    tables; keyed by slot, with the slot's version and how many rows were appended since it was last encoded."""
    keys: np.ndarray
    version: np.ndarray
    appended: np.ndarray
    n: np.ndarray
    ts: np.ndarray
    hash: np.ndarray
    item: np.ndarray
    action: np.ndarray
    scene: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


class SlotWindows:
    """The windows of every held user, for the scenes of one model (`scenes`), L events long."""

    def __init__(self, scenes: Sequence[str], length: int, capacity: int = 256):
        self.scenes, self.length = tuple(scenes), length
        self.scene_index = {s: i for i, s in enumerate(self.scenes)}
        self.scene_code = np.array([SCENES.id(s) for s in self.scenes], np.uint8)   # row code of each scene
        self.slot_of: dict[str, int] = {}          # user -> user slot: the one object per user
        self.user_names: list[Optional[str]] = []  # user slot -> user (None: free)
        self._user_free: list[int] = []
        self.win = np.full((0, len(self.scenes)), -1, np.int32)   # user slot, scene -> window slot (-1: none)
        self.ts = np.zeros((0, length), np.int64)
        self.hash = np.zeros((0, length), np.int64)
        self.item = np.zeros((0, length), np.int32)
        self.action = np.zeros((0, length), np.uint8)
        self.idlen = np.zeros((0, length), np.uint16)
        self.n = np.zeros(0, np.int32)
        self.ids = np.empty(0, object)
        self.owner = np.zeros(0, np.int32)         # window slot -> user slot
        self.wver = np.zeros(0, np.int64)          # window slot -> version: new when written other than appended
        self.uver = np.zeros(0, np.int64)          # user slot -> version: new when its slot changes hands or
                                                   # its windows are written other than appended
        self.newest = np.zeros(0, np.int64)        # user slot -> ts of the user's newest event held
        # What changed since a window was last encoded (`encoded` resets it): rows appended at its end, or -1 when it
        # changed otherwise; per user, whether their merged timeline only gained events after its newest then
        # (`shown_ts`, `shown_hash`: that event, the last of the timeline as it was encoded).
        self.pending = np.zeros(0, np.int64)
        self.timeline_ok = np.zeros(0, bool)
        self.shown_ts = np.zeros(0, np.int64)
        self.shown_hash = np.zeros(0, np.int64)
        self.scene_of = np.zeros(0, np.int16)      # window slot -> scene index
        self._win_free: list[int] = []
        self._grow_users(capacity)
        self._grow_windows(capacity)

    # ---- slots ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, user: str) -> bool:
        return user in self.slot_of

    def _grow_users(self, need: int) -> None:
        have = len(self.user_names)
        if need <= have:
            return
        size = max(need, 2 * have, 16)
        self.win = np.concatenate([self.win, np.full((size - have, len(self.scenes)), -1, np.int32)])
        self.uver = np.concatenate([self.uver, np.zeros(size - have, np.int64)])
        self.newest = np.concatenate([self.newest, np.full(size - have, np.iinfo(np.int64).min, np.int64)])
        self.timeline_ok = np.concatenate([self.timeline_ok, np.zeros(size - have, bool)])
        self.shown_ts = np.concatenate([self.shown_ts, np.full(size - have, np.iinfo(np.int64).min, np.int64)])
        self.shown_hash = np.concatenate([self.shown_hash, np.full(size - have, UNKNOWN, np.int64)])
        self.user_names.extend([None] * (size - have))
        self._user_free.extend(range(size - 1, have - 1, -1))

    def _grow_windows(self, need: int) -> None:
        have = len(self.n)
        if need <= have:
            return
        size, L = max(need, 2 * have, 16), self.length
        for name, dtype in (("ts", np.int64), ("hash", np.int64), ("item", np.int32), ("action", np.uint8),
                            ("idlen", np.uint16)):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros((size - have, L), dtype)]))
        self.n = np.concatenate([self.n, np.zeros(size - have, np.int32)])
        self.ids = np.concatenate([self.ids, np.full(size - have, b"", object)])
        self.owner = np.concatenate([self.owner, np.full(size - have, -1, np.int32)])
        self.scene_of = np.concatenate([self.scene_of, np.full(size - have, -1, np.int16)])
        self.wver = np.concatenate([self.wver, np.zeros(size - have, np.int64)])
        self.pending = np.concatenate([self.pending, np.zeros(size - have, np.int64)])
        self._win_free.extend(range(size - 1, have - 1, -1))

    def user_slot(self, user: str) -> int:
        """The user's slot, taken from the free ones the first time."""
        slot = self.slot_of.get(user)
        if slot is None:
            if not self._user_free:
                self._grow_users(len(self.user_names) + 1)
            slot = self.slot_of[user] = self._user_free.pop()
            self.user_names[slot] = user
            self.uver[slot] += 1
            self.newest[slot], self.timeline_ok[slot] = np.iinfo(np.int64).min, False
        return slot

    def _window_slots(self, users: np.ndarray, scenes: np.ndarray) -> np.ndarray:
        """The window slot of each (user slot, scene index) pair, new ones taken for pairs without one."""
        slots = self.win[users, scenes]
        missing = np.flatnonzero(slots < 0)
        if len(missing):
            pairs = np.unique(users[missing].astype(np.int64) * len(self.scenes) + scenes[missing])
            if len(self._win_free) < len(pairs):
                self._grow_windows(len(self.n) + len(pairs))
            taken = np.array([self._win_free.pop() for _ in range(len(pairs))], np.int32)
            u, s = np.divmod(pairs, len(self.scenes))
            self.win[u, s], self.owner[taken], self.scene_of[taken] = taken, u, s
            self.n[taken], self.ids[taken], self.pending[taken] = 0, b"", 0
            self.wver[taken] += 1
            slots = self.win[users, scenes]
        return slots

    def drop(self, users: Iterable[str]) -> None:
        """Forget users (a revoked partition, users leaving memory for disk): their slots are free again."""
        for user in users:
            slot = self.slot_of.pop(user, None)
            if slot is None:
                continue
            windows = self.win[slot][self.win[slot] >= 0]
            self.n[windows], self.ids[windows], self.owner[windows] = 0, b"", -1
            self.wver[windows] += 1
            self.uver[slot] += 1
            self._win_free.extend(windows.tolist())
            self.win[slot] = -1
            self.user_names[slot] = None
            self._user_free.append(slot)

    # ---- windows as packed windows (core/window.py) --------------------------------------------------------------

    def window(self, w: int) -> Window:
        """Window slot w as a packed window: the same rows, the same ids."""
        n = int(self.n[w])
        if not n:
            return EMPTY
        rows = np.zeros(n, ROW_DTYPE)
        cut = slice(self.length - n, self.length)
        rows["ts"], rows["hash"], rows["item"] = self.ts[w, cut], self.hash[w, cut], self.item[w, cut]
        rows["action"], rows["id_bytes"] = self.action[w, cut], self.idlen[w, cut]
        rows["scene"] = self.scene_code[self.scene_of[w]]
        return Window(rows.tobytes() + self.ids[w], n)

    def arrays(self, w: int) -> tuple:
        """Window slot w as (scene, ts, id sizes, ids, item codes, action codes), oldest first: views of the rows,
        what the changelog writes (stream/live/changelog.py: encode_windows)."""
        cut = slice(self.length - int(self.n[w]), self.length)
        return (self.scenes[self.scene_of[w]], self.ts[w, cut], self.idlen[w, cut], self.ids[w], self.item[w, cut],
                self.action[w, cut])

    def user_arrays(self, slot: int) -> list[tuple]:
        """All of a user's windows as `arrays` gives them."""
        return [self.arrays(int(w)) for w in self.win[slot] if w >= 0 and self.n[w]]

    def state(self, user: str) -> Optional[UserState]:
        """The user's windows by scene (None: not held)."""
        slot = self.slot_of.get(user)
        if slot is None:
            return None
        return {self.scenes[s]: self.window(int(w)) for s, w in enumerate(self.win[slot]) if w >= 0 and self.n[w]}

    def item_ids(self, user: str, scene: str) -> list[str]:
        """The items of the user's window of `scene`, oldest first ([] when none)."""
        slot, s = self.slot_of.get(user), self.scene_index.get(scene)
        if slot is None or s is None or self.win[slot, s] < 0:
            return []
        w = self.win[slot, s]
        names = ITEMS.names
        return [names[i] for i in self.item[w, self.length - self.n[w]:].tolist()]

    def put(self, user: str, state: UserState) -> None:
        """Hold the user's windows (recovered, or read back from disk), replacing any held."""
        slot = self.user_slot(user)
        scenes = [self.scene_index[s] for s, w in state.items() if w and s in self.scene_index]
        if not scenes:
            return
        slots = self._window_slots(np.full(len(scenes), slot, np.int32), np.array(scenes, np.int32))
        for w, s in zip(slots.tolist(), scenes):
            self._write(w, state[self.scenes[s]])
        self.uver[slot] += 1
        W = self.win[slot][self.win[slot] >= 0]
        self.newest[slot] = self.ts[W, self.length - 1].max()
        self.timeline_ok[slot] = False

    def _write(self, w: int, window: Window) -> None:
        self.wver[w] += 1
        self.pending[w] = -1
        n, L = len(window), self.length
        t = window.table()[-L:] if n else window.table()
        n = len(t)
        self.n[w] = n
        cut = slice(L - n, L)
        self.ts[w, cut], self.hash[w, cut], self.item[w, cut] = t["ts"], t["hash"], t["item"]
        self.action[w, cut], self.idlen[w, cut] = t["action"], t["id_bytes"]
        ids = window.buf[window.n * ROW_DTYPE.itemsize:]
        self.ids[w] = ids[len(ids) - int(t["id_bytes"].sum()):] if n else b""

    # ---- the micro-batch -----------------------------------------------------------------------------------------

    def join(self, events: Sequence[Event]) -> SlotJoin:
        """Join a micro-batch's valid events into their windows (the lattice: apply_batch's result)."""
        if not events:
            e = _EMPTY_I
            return SlotJoin(e, e, e, 0, e, e, e, e)
        L = self.length
        # the batch as columns (events are named tuples: one transpose), each mapped in one pass
        event_ids, user_ids, item_ids, scene_names, actions, stamps = zip(*events)
        slots = list(map(self.slot_of.get, user_ids))
        if None in slots:   # users met for the first time
            slots = [self.user_slot(u) if s is None else s for u, s in zip(user_ids, slots)]
        users = np.array(slots, np.int32)
        scenes = np.fromiter(map(self.scene_index.__getitem__, scene_names), np.int32, len(events))
        wins = self._window_slots(users, scenes)
        ts = np.array(stamps, np.int64)
        ids = list(map(str.encode, event_ids, repeat("utf-8"), repeat("surrogatepass")))
        hashes = np.fromiter(map(id_hash, ids), np.int64, len(events))

        # the batch in window order, then (ts, event id): ties in time by id, as the lattice orders
        order = np.lexsort((ts, wins))
        ws, tss = wins[order], ts[order]
        same = (ws[1:] == ws[:-1]) & (tss[1:] == tss[:-1])
        if same.any():
            order = _by_id_within_ties(order, same, ids)
            ws, tss = wins[order], ts[order]
        starts = np.flatnonzero(np.r_[True, ws[1:] != ws[:-1]])
        groups, counts = ws[starts], np.diff(np.r_[starts, len(ws)])

        # the common case per window: newer than all it holds, no copy of a held event, no id twice in the batch
        n_old = self.n[groups]
        first = order[starts]
        held_last = self.ts[groups, L - 1]
        newer = (n_old == 0) | (ts[first] > held_last)
        tied = (n_old > 0) & (ts[first] == held_last)
        for g in np.flatnonzero(tied).tolist():   # the newest held event has the first new one's time: by id
            w = int(groups[g])
            newer[g] = ids[first[g]] > self.ids[w][len(self.ids[w]) - int(self.idlen[w, L - 1]):]
        group_of = np.repeat(np.arange(len(groups)), counts)
        hs = hashes[order]
        columns = np.arange(L)[None, :]
        held = (self.hash[ws] == hs[:, None]) & (columns >= L - self.n[ws][:, None])
        copies = np.zeros(len(groups), bool)
        np.logical_or.at(copies, group_of, held.any(1))
        twice = _repeated(group_of, hs)
        common = newer & ~copies & ~twice

        changed, appended, late = [], [], 0
        added, added_items, removed, removed_items = [], [], [], []
        c = np.flatnonzero(common)
        if len(c):
            got = self._append(groups[c], counts[c], starts[c], order, ts, hashes, ids, item_ids, actions)
            changed.append(groups[c])
            appended.append(got["kept"])
            late += int(got["late"])
            added += [got["added"]]
            added_items += [got["added_items"]]
            removed += [got["removed"]]
            removed_items += [got["removed_items"]]
        for g in np.flatnonzero(~common).tolist():
            w = int(groups[g])
            rows = order[starts[g]:starts[g] + counts[g]]
            old = self.window(w)
            new, dropped = apply_window(old, [events[i] for i in rows.tolist()], L)
            late += dropped
            if new == old:
                continue
            before, after = old.table()["item"], new.table()["item"]
            self._write(w, new)
            changed.append(np.array([w], np.int32))
            appended.append(np.array([-1], np.int64))
            plus, minus = _multiset_difference(after, before)
            added += [np.full(len(plus), w, np.int32)]
            added_items += [plus]
            removed += [np.full(len(minus), w, np.int32)]
            removed_items += [minus]
        windows = np.concatenate(changed) if changed else _EMPTY_I.astype(np.int32)
        appended = np.concatenate(appended) if appended else _EMPTY_I
        owners = self.owner[windows]
        _, first_seen = np.unique(owners, return_index=True)
        touched = owners[np.sort(first_seen)]
        self._note(touched, windows, appended)
        return SlotJoin(windows, appended, touched, late, _cat(added, np.int32), _cat(added_items, np.int32),
                        _cat(removed, np.int32), _cat(removed_items, np.int32))

    def _note(self, users: np.ndarray, windows: np.ndarray, appended: np.ndarray) -> None:
        """What a join changed, on top of what earlier joins changed since the last encode: the windows' appended
        rows (-1 once any was rewritten), and whether each user's timeline still only gained events, all after its
        newest event then and no two at one time (the lattice would order those by id). Moves `newest` on."""
        L = self.length
        self.pending[windows] = np.where((appended < 0) | (self.pending[windows] < 0), -1,
                                         self.pending[windows] + appended)
        by_slot = np.argsort(users)
        row = by_slot[np.searchsorted(users, self.owner[windows], sorter=by_slot)]   # each window's user's row
        k = np.maximum(appended, 0)
        within = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        u_of = np.repeat(row, k)
        ts = self.ts[np.repeat(windows, k), L - np.repeat(k, k) + within]
        order = np.lexsort((ts, u_of))
        u_of, ts = u_of[order], ts[order]
        broken = np.zeros(len(users), bool)
        np.logical_or.at(broken, row, appended < 0)
        same = (u_of[1:] == u_of[:-1]) & (ts[1:] == ts[:-1])
        broken[u_of[1:][same]] = True
        earliest = np.full(len(users), np.iinfo(np.int64).max, np.int64)
        np.minimum.at(earliest, u_of, ts)
        prev = self.newest[users]
        self.timeline_ok[users[broken | (earliest <= prev)]] = False
        newest = prev.copy()
        np.maximum.at(newest, row, self.ts[windows, L - 1])
        self.newest[users] = newest

    def encoded(self, users: np.ndarray) -> None:
        """The users' windows and timelines were just encoded: nothing is pending, and their timelines' newest event
        is the one an extension starts after: the newest window's last row, or where several windows end at the same
        time, the one whose event id sorts last (the timeline's order, `timelines`)."""
        L = self.length
        W = self.win[users]
        self.pending[W[W >= 0]] = 0
        Wc = np.maximum(W, 0)
        last = np.where((W >= 0) & (self.n[Wc] > 0), self.ts[Wc, L - 1], np.iinfo(np.int64).min)
        top = last.max(1) if len(users) else np.zeros(0, np.int64)
        at_top = last == top[:, None]
        newest = at_top.argmax(1)
        for u in np.flatnonzero(at_top.sum(1) > 1).tolist():   # a tie in time (rare): by event id
            tied = np.flatnonzero(at_top[u])
            newest[u] = tied[max(range(len(tied)), key=lambda j: self._id_at(int(W[u, tied[j]]), L - 1))]
        self.shown_ts[users] = top
        self.shown_hash[users] = self.hash[Wc, L - 1][np.arange(len(users)), newest] if len(users) else top
        self.timeline_ok[users] = True

    def tails(self, users: np.ndarray) -> "Windows":
        """The users' merged timelines as far as an extension reads them: the rows appended since they were last
        encoded, after the row before them (their newest event then), as the last columns of windows that long;
        appended -1 where the timeline changed otherwise (the encoder then asks for it whole: `timelines`)."""
        L, U = self.length, len(users)
        W = self.win[users]
        Wc = np.maximum(W, 0)
        # [U, S] rows appended per window and still in it: more than it holds were appended (joins with no encode
        # between) only if it is full, and then the timeline gains L and is encoded whole
        k = np.where(W >= 0, np.clip(self.pending[Wc], 0, self.n[Wc]), 0)
        bad = ((W >= 0) & (self.pending[Wc] < 0)).any(1) | ~self.timeline_ok[users]
        wins, counts = Wc.ravel(), k.ravel()
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        w_of, col = np.repeat(wins, counts), L - np.repeat(counts, counts) + within
        u_of = np.repeat(np.repeat(np.arange(U), W.shape[1]), counts)
        order = np.lexsort((self.ts[w_of, col], u_of))
        w_of, col, u_of = w_of[order], col[order], u_of[order]
        grown = np.bincount(u_of, minlength=U)
        appended = np.where(bad, -1, np.minimum(grown, L))
        # the last columns alone, as many as the most rows appended plus the row before (an event each: 2 of L); the
        # encoder reads them as windows of that length (right-aligned), and asks `timelines` for those it encodes whole
        width = min(L, int(appended.max(initial=0)) + 1)
        rank_from_end = np.repeat(grown, grown) - (np.arange(len(u_of)) - np.repeat(np.cumsum(grown) - grown, grown))
        keep = rank_from_end <= width
        u, c, w, cl = u_of[keep], width - rank_from_end[keep], w_of[keep], col[keep]
        out = {name: np.zeros((U, width), dtype) for name, dtype in
               (("ts", np.int64), ("hash", np.int64), ("item", np.int32), ("action", np.uint8), ("scene", np.uint8))}
        out["ts"][u, c], out["hash"][u, c] = self.ts[w, cl], self.hash[w, cl]
        out["item"][u, c], out["action"][u, c] = self.item[w, cl], self.action[w, cl]
        out["scene"][u, c] = self.scene_code[self.scene_of[w]]
        rows = np.flatnonzero((appended >= 0) & (appended < width))
        out["ts"][rows, width - 1 - appended[rows]] = self.shown_ts[users[rows]]
        out["hash"][rows, width - 1 - appended[rows]] = self.shown_hash[users[rows]]
        held = np.where(W >= 0, self.n[Wc], 0).sum(1)
        return Windows(users.astype(np.int64), self.uver[users], appended.astype(np.int64),
                       np.minimum(held, L).astype(np.int64), out["ts"], out["hash"], out["item"], out["action"],
                       out["scene"])

    # ---- what the encoder reads ---------------------------------------------------------------------------------

    def scene_windows(self, users: np.ndarray) -> tuple[Windows, np.ndarray, np.ndarray]:
        """Every window of the users as far as an extension reads it: its last columns, as many as the most rows
        appended to any of them since it was last encoded, plus the row before (an event each, as live traffic
        brings: 2 of L); `windows` gives them whole, for those encoded whole. And the row of `users` and the scene
        index each belongs to."""
        W = self.win[users]
        present = (W >= 0) & (self.n[np.maximum(W, 0)] > 0)
        rows, scenes = np.nonzero(present)
        wins = W[rows, scenes]
        grown = int(self.pending[wins].max()) if len(wins) else 0
        return self.windows(wins, min(self.length, grown + 1)), rows, scenes

    def windows(self, wins: np.ndarray, columns: Optional[int] = None) -> Windows:
        """Window slots with the rows appended since they were last encoded, whole or as their last `columns`
        columns (the encoder reads a narrower Windows as windows of that length: they are right-aligned)."""
        cut = slice(self.length - (columns or self.length), self.length)
        codes = np.broadcast_to(self.scene_code[self.scene_of[wins]][:, None], (len(wins), cut.stop - cut.start))
        return Windows(wins.astype(np.int64), self.wver[wins], self.pending[wins].copy(),
                       self.n[wins].astype(np.int64), self.ts[wins, cut], self.hash[wins, cut], self.item[wins, cut],
                       self.action[wins, cut], codes)

    def timelines(self, users: np.ndarray, appended: np.ndarray) -> Windows:
        """The users' merged timelines: the newest L events over all their windows, ascending by (ts, event id)."""
        L, S = self.length, len(self.scenes)
        if not len(users):
            e = np.zeros((0, L), np.int64)
            return Windows(users.astype(np.int64), self.uver[users], np.asarray(appended, np.int64),
                           np.zeros(0, np.int64), e, e, e, e, e)
        W = self.win[users]
        Wc = np.maximum(W, 0)
        valid = (W >= 0)[:, :, None] & (np.arange(L)[None, None, :] >= L - self.n[Wc][:, :, None])
        flat = lambda a: a[Wc].reshape(len(users), S * L)   # noqa: E731
        ts = np.where(valid.reshape(len(users), S * L), flat(self.ts), np.iinfo(np.int64).min)
        order = np.argsort(ts, axis=1)
        sorted_ts = np.take_along_axis(ts, order, axis=1)
        counts = valid.reshape(len(users), -1).sum(1)
        ties = (sorted_ts[:, 1:] == sorted_ts[:, :-1]) & (sorted_ts[:, 1:] > np.iinfo(np.int64).min)
        if ties.any():   # ties in time: each run of them by event id
            self._ties_by_id(order, sorted_ts, ties, W)
        order = order[:, -L:]
        take = lambda a: np.take_along_axis(a, order, axis=1)   # noqa: E731
        scene = np.broadcast_to(self.scene_code[self.scene_of[Wc]][:, :, None], (len(users), S, L))
        return Windows(users.astype(np.int64), self.uver[users], appended, np.minimum(counts, L).astype(np.int64),
                       take(ts), take(flat(self.hash)), take(flat(self.item)), take(flat(self.action)),
                       take(scene.reshape(len(users), S * L)))

    def _ties_by_id(self, order: np.ndarray, sorted_ts: np.ndarray, ties: np.ndarray, W: np.ndarray) -> None:
        """Put each run of equal times in `order` (per user, the cells j * L + c of their windows W[u, j] by time;
        ties[u, p]: positions p and p + 1 tie) in event id order, then cell order (an id in two windows), in
        place: one sort of the tied cells of all users, not one per user (a log stamped in seconds ties often)."""
        L = self.length
        tied = np.zeros(order.shape, bool)
        tied[:, 1:] |= ties
        tied[:, :-1] |= ties
        u, p = np.nonzero(tied)                     # row-major: by user, then time: each run contiguous
        cells = order[u, p]
        w, c = W[u, cells // L], cells % L
        ends = np.cumsum(self.idlen[w].astype(np.int64), axis=1)   # a row's id ends, counted from column 0
        k = np.arange(len(w))
        first = L - self.n[w].astype(np.int64)      # the window's oldest column: its ids start there
        start = ends[k, c] - self.idlen[w, c] - np.where(first > 0, ends[k, np.maximum(first - 1, 0)], 0)
        ids = [self.ids[a][b:e] for a, b, e in zip(w.tolist(), start.tolist(), (start + self.idlen[w, c]).tolist())]
        keys = list(zip(u.tolist(), sorted_ts[u, p].tolist(), ids, cells.tolist()))
        order[u, p] = cells[sorted(range(len(keys)), key=keys.__getitem__)]

    def _id_at(self, w: int, column: int) -> bytes:
        """The event id of window w's row in `column`."""
        start = int(self.idlen[w, self.length - int(self.n[w]):column].sum())
        return self.ids[w][start:start + int(self.idlen[w, column])]

    def _append(self, groups, counts, starts, order, ts, hashes, ids, item_ids, actions) -> dict:
        """The common case, for all its windows at once: each window's newest L of (its rows, then its new ones).
        Group g's new events are order[starts[g] : starts[g] + counts[g]], ascending."""
        L, G = self.length, len(groups)
        kept = np.minimum(counts, L)                  # new events that stay: at most L
        skip = counts - kept                          # each group's oldest new events, pushed out by its newer ones
        before = np.repeat(np.cumsum(counts) - counts, counts)
        rank = np.arange(int(counts.sum())) - before  # an event's place in its group
        rows = order[np.repeat(starts, counts) + rank]
        keep = rank >= np.repeat(skip, counts)
        rows, col = rows[keep], (rank - np.repeat(skip, counts))[keep]   # kept events, their column in the block
        g_of = np.repeat(np.arange(G), kept)
        n_old = self.n[groups]
        drop = np.maximum(0, n_old + kept - L)        # held rows pushed out, oldest first
        cols = np.arange(L)[None, :]
        gone = (cols >= (L - n_old)[:, None]) & (cols < (L - n_old + drop)[:, None])
        removed_items = self.item[groups][gone]
        skip_bytes = (self.idlen[groups].astype(np.int64) * gone).sum(1)
        picked = rows.tolist()
        new_ids = [ids[i] for i in picked]
        new = {"ts": ts[rows], "hash": hashes[rows],
               "item": ITEMS.ids([item_ids[i] for i in picked]).astype(np.int32),
               "action": ACTIONS.ids([actions[i] for i in picked]).astype(np.uint8),
               "idlen": np.fromiter(map(len, new_ids), np.uint16, len(picked))}
        take = kept[:, None] + cols                   # the new window: columns kept .. kept + L of [held | block]
        kmax = int(kept.max())
        for name, values in new.items():
            held = getattr(self, name)
            block = np.zeros((G, kmax), held.dtype)
            block[g_of, col] = values
            joined = np.concatenate([held[groups], block], axis=1)
            # every window gaining as many (fresh traffic: one each) is a slice, not a gather
            held[groups] = joined[:, kmax:] if kept.min() == kmax else np.take_along_axis(joined, take, axis=1)
        self.n[groups] = np.minimum(L, n_old + kept)
        if kmax > 1:   # each window's new ids as one piece (fresh traffic: one id each, as they are)
            at = np.r_[0, np.cumsum(kept)].tolist()
            new_ids = [b"".join(new_ids[a:b]) for a, b in zip(at[:-1], at[1:])]
        # an object array built as one (a list assigned to it would go through a bytes array, which drops NULs)
        self.ids[groups] = np.fromiter((old[cut:] + new for old, cut, new in
                                        zip(self.ids[groups].tolist(), skip_bytes.tolist(), new_ids)), object, G)
        return {"kept": kept.astype(np.int64), "late": int(skip.sum()), "added": np.repeat(groups, kept),
                "added_items": new["item"], "removed": np.repeat(groups, drop), "removed_items": removed_items}


def _by_id_within_ties(order: np.ndarray, same: np.ndarray, ids: list[bytes]) -> np.ndarray:
    """`order` (by window, then time) with each run of equal (window, time) put in event id order; same[i]: the
    events at order[i] and order[i + 1] share window and time."""
    order = order.copy()
    edges = np.flatnonzero(np.diff(np.r_[0, same.astype(np.int8), 0]))
    for a, e in zip(edges[::2].tolist(), edges[1::2].tolist()):   # a run: order[a .. e], both ends in
        order[a:e + 1] = sorted(order[a:e + 1].tolist(), key=ids.__getitem__)
    return order


def _repeated(group_of: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Per group: whether two of its rows share an id hash (a duplicate, or a collision: both go the exact way)."""
    out = np.zeros(int(group_of.max()) + 1 if len(group_of) else 0, bool)
    pairs = np.lexsort((hashes, group_of))
    g, h = group_of[pairs], hashes[pairs]
    dup = (g[1:] == g[:-1]) & (h[1:] == h[:-1])
    out[g[1:][dup]] = True
    return out


def _multiset_difference(after: np.ndarray, before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(items in `after` not matched in `before`, items in `before` not matched in `after`), with multiplicity."""
    values = np.union1d(after, before)
    a = np.searchsorted(values, after)
    b = np.searchsorted(values, before)
    delta = np.bincount(a, minlength=len(values)) - np.bincount(b, minlength=len(values))
    return (np.repeat(values, np.maximum(delta, 0)).astype(np.int32),
            np.repeat(values, np.maximum(-delta, 0)).astype(np.int32))


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
