"""Windows in, interest vectors out: one batched forward for every window touched in a micro-batch.

The live worker and replay both call `InterestEncoder.interests`; the vectors are a pure function of the windows
(the exactness contract). A window that grew by k events since it was last encoded costs k positions per layer
(window_cache.py); one that did not change costs nothing, so a user touched in one scene does not re-encode the
others. The cache is derived, bounded and may be dropped at any time.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from .checkpoint import Checkpoint
from .model import FIRST_ITEM, OOV
from .config import ENCODER_CACHE_MB
from .vocab import Codes, concat_rows, tensorize
from .window_cache import WindowCache

def resolve_device(name: str = "auto") -> torch.device:
    """auto: CUDA when present, else CPU. Asking for cuda without one is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


@dataclass
class Interests:
    """Vectors for a list of users, row-aligned with `users`. S = number of configured scenes."""
    users: list[str]
    h: np.ndarray        # [U, S, d] per-scene interest (zeros where no history)
    has: np.ndarray      # [U, S] bool
    recent: np.ndarray   # [U, d] the merged window's last output: interest as of the newest event
    fused: np.ndarray    # [U, S + 1, d] H_j per scene, then the global vector
    weights: np.ndarray  # [U, S + 1, S] a_ij (rows as fused)


# A window, as the encoder reads it: any object with `table()` (a structured array, one row per event ascending by
# (ts, event_id), with fields ts, item, action and scene: codes whose names are in the object's `codebook`),
# `ids(start)` (the event ids from the start-th on) and `last_key()` ((ts, event_id) of its newest event):
# scenestream.stream.core.window.Window. Inside the encoder a window is its table; equal row bytes are the same
# event (rows carry a hash of the event id).


def merged_window(state: Mapping[str, object], length: int) -> np.ndarray:
    """The newest `length` events over all of a user's scene windows, ascending by (ts, event_id). Every one of the
    newest `length` events of the user is among the newest `length` of its own scene, so this is the window of all
    scenes' events that a single window of length L would hold: derived from the state, never stored."""
    windows = [w for w in state.values() if w]
    if len(windows) == 1:
        return windows[0].table()[-length:]
    rows = concat_rows([w.table()[-length:] for w in windows])
    ts = rows["ts"]
    order = np.argsort(ts, kind="stable")
    if np.any(np.diff(ts[order]) == 0):   # ties in time, by event id
        ids = [i for w in windows for i in w.ids(max(0, len(w) - length))]
        order = sorted(range(len(rows)), key=lambda k: (int(ts[k]), ids[k]))
    return rows[order][-length:]


def _appended(old, new, length: int) -> Optional[int]:
    """Where the events `new` holds after `old`'s last one start, if `new` is `old` joined with newer events only
    (the common case): `old` followed by them, cut to the newest `length`. None otherwise."""
    table = new.table()
    if not old:
        return 0
    before = old.table()
    size, raw = table.itemsize, table.tobytes()
    last = before[-1:].tobytes()
    for p in range(len(table) - 1, -1, -1):
        if raw[p * size:(p + 1) * size] == last:
            k = len(before) - (p + 1)
            if (k == 0 or k > 0 and len(table) == length) and raw[:(p + 1) * size] == before[k:].tobytes():
                return p + 1
            return None
    return None


class MergedWindows:
    """Each recently touched user's merged window, with the scene windows it was built from, so that a user whose
    windows only gained newer events merges those few instead of sorting all S x L events again (the live worker's
    common case). Exact: with old scene windows w_s and merged M (the newest L of their union), and new windows that
    are the old ones joined with events A all newer than M's last, the newest L of the new union are the newest L of
    M + A (an event pushed out of its scene window has L newer events in it, all in M + A; one that was not in M stays
    out, every event newer than it being in M). Anything else is merged whole. Bounded: least recently used first."""

    def __init__(self, length: int, capacity: int):
        self.length, self.capacity = length, capacity
        self.memo: OrderedDict[str, tuple[dict, np.ndarray, tuple]] = OrderedDict()

    def get(self, user: str, state: Mapping[str, object]) -> np.ndarray:
        got = self._extend(self.memo.get(user), state)
        if got is None:
            merged = merged_window(state, self.length)
            newest = max((w.last_key() for w in state.values() if w), default=None)
            got = merged, newest
        if self.capacity:
            self.memo[user] = (dict(state), *got)
            self.memo.move_to_end(user)
            while len(self.memo) > self.capacity:
                self.memo.popitem(last=False)
        return got[0]

    def _extend(self, memo, state: Mapping[str, object]) -> Optional[tuple[np.ndarray, tuple]]:
        if memo is None:
            return None
        windows, merged, newest = memo
        if not len(merged) or not windows.keys() <= state.keys():
            return None
        grown = []   # (window, where its new events start)
        for scene, window in state.items():
            old = windows.get(scene)
            if window is not old:
                start = _appended(old, window, self.length)
                if start is None:
                    return None
                grown.append((window, start))
        rows = concat_rows([w.table()[start:] for w, start in grown]) if grown else merged[:0]
        if not len(rows):
            return merged, newest
        ts = rows["ts"].tolist()
        order = sorted(range(len(ts)), key=ts.__getitem__)
        if ts[order[0]] < newest[0]:
            return None
        if ts[order[0]] == newest[0] or len(set(ts)) < len(ts):   # ties in time: ordered by event id
            keys = list(zip(ts, [i for w, start in grown for i in w.ids(start)]))
            if min(keys) <= newest:
                return None
            order = sorted(range(len(keys)), key=keys.__getitem__)
            return concat_rows([merged, rows[order]])[-self.length:], keys[order[-1]]
        # no ties: the newest added event ends its window, and no event id is read
        newest = max(w.last_key() for w, start in grown if start < len(w))
        return concat_rows([merged, rows[order]])[-self.length:], newest


class InterestEncoder:
    def __init__(self, ckpt: Checkpoint, device: str | torch.device = "cpu", batch_size: int = 2048,
                 cache_mb: float = ENCODER_CACHE_MB):
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.model = ckpt.model.to(self.device).eval()
        self.scenes = ckpt.scenes
        self.scene_index = {s: i for i, s in enumerate(ckpt.scenes)}
        self.action_index = {a: i for i, a in enumerate(ckpt.actions)}
        self.batch_size, self.cache_mb = batch_size, cache_mb
        cfg, budget = self.model.cfg, int(cache_mb * 2**20)
        if cfg.own_scene_stack:
            # per user up to S scene windows and one merged window: the budget is split in that proportion
            probe = [WindowCache(cfg, ckpt.window, 0, self.device, scene) for scene in (True, False)]
            share = probe[1].entry_bytes / (cfg.n_scenes * probe[0].entry_bytes + probe[1].entry_bytes)
            self.cache = WindowCache(cfg, ckpt.window, budget - int(budget * share), self.device, scene=True)
            self.timeline_cache = WindowCache(cfg, ckpt.window, int(budget * share), self.device)
        else:
            self.cache = self.timeline_cache = WindowCache(cfg, ckpt.window, budget, self.device)
        self.merged = MergedWindows(ckpt.window, self.timeline_cache.capacity)
        self._codes: dict = {}   # codebook -> (items, actions, scenes) codes -> this model's indices
        self._book = None        # the codebook of the windows being encoded

    def codes(self, book) -> tuple[Codes, Codes, Codes]:
        got = self._codes.get(book)
        if got is None:
            got = self._codes[book] = (Codes(book.items.names, self.ckpt.vocab._index, OOV),
                                       Codes(book.actions.names, self.action_index, 0),
                                       Codes(book.scenes.names, self.scene_index, 0))
        return got

    @property
    def version(self) -> str:
        return self.ckpt.version

    @property
    def window(self) -> int:
        return self.ckpt.window

    @property
    def caches(self) -> list[WindowCache]:
        return [self.cache] if self.cache is self.timeline_cache else [self.cache, self.timeline_cache]

    @torch.inference_mode()
    def encode_windows(self, windows: Sequence, scene: bool = False) -> np.ndarray:
        """[N] windows -> [N, d] last-position outputs of a full encode (no cache); scene: per-scene windows (their
        own stack, if the model has one), else merged timelines."""
        if windows:
            self._book = windows[0].codebook
        return self._encode([w.table() for w in windows], scene=scene).float().cpu().numpy()

    def _encode(self, windows: Sequence[Sequence], entries: Sequence | None = None,
                starts: Sequence[int] | None = None, scene: bool = False) -> torch.Tensor:
        """Outputs [N, d] of whole windows, or, with `starts`, of the windows from there on against their cache
        entries' rows. Whatever was encoded is written to `entries` (None ones skipped). Sorted by length and cut
        into chunks (`_chunks`) that pad little: results do not depend on the chunking. scene: per-scene windows
        (their stack and cache), else merged ones."""
        cache = self.cache if scene else self.timeline_cache
        cfg = self.model.cfg
        n = len(windows)
        new = [len(w) - (starts[i] if starts else 0) for i, w in enumerate(windows)]
        out = torch.zeros(n, cfg.d_model, device=self.device)
        order = sorted(range(n), key=new.__getitem__)
        for idx in _chunks(order, new, self.batch_size):
            width = min(new[idx[-1]], self.window)
            batch = tensorize([windows[i] for i in idx], *self.codes(self._book), cfg.gap_buckets, width,
                              [starts[i] for i in idx] if starts else None).to(self.device)
            past = None
            if starts:
                counts = torch.tensor([new[i] for i in idx], device=self.device)
                new_pos = torch.arange(width, device=self.device)[None] - (width - counts)[:, None]
                past = cache.past([entries[i] for i in idx], new_pos)
            h, presents = self.model.encoder.extend(*batch.inputs(), past, last_only=True, scene=scene)
            at = torch.tensor(idx, device=self.device)
            out[at] = h
            if entries is not None:
                cache.append([entries[i] for i in idx], [windows[i] for i in idx], presents,
                             [new[i] for i in idx], h)
        return out

    @torch.inference_mode()
    def _sources(self, states: Sequence[Mapping[str, Sequence]], users: Sequence[str]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(h [U, S, d], has [U, S], recent [U, d]): each scene window's last output, cached under (user, scene),
        and the merged window's, cached under (user, None) (model.py, "Sources"). When scene windows share the
        timeline's blocks, a user seen in one scene has one window, whose output is both."""
        S, d = len(self.scenes), self.model.cfg.d_model
        shared = not self.model.cfg.own_scene_stack
        scene_tasks, merged_tasks = [], []   # (user row, scene index, cache key, window); merged ones: (u, key, w)
        alias = []   # (user row, scene task) whose recent vector is that scene's h_s
        for u, (user, state) in enumerate(zip(users, states)):
            present = [(self.scene_index[scene], w) for scene, w in state.items() if w and scene in self.scene_index]
            for s, w in present:
                self._book = w.codebook
                scene_tasks.append((u, s, (user, self.scenes[s]), w.table()))
            if shared and len(present) == 1:
                alias.append((u, len(scene_tasks) - 1))
            elif present:
                merged_tasks.append((u, (user, None), self.merged.get(user, {self.scenes[s]: w for s, w in present})))
        h = np.zeros((len(users), S, d), dtype=np.float32)
        has = np.zeros((len(users), S), dtype=bool)
        recent = np.zeros((len(users), d), dtype=np.float32)
        out = self._windows([t[2] for t in scene_tasks], [t[3] for t in scene_tasks], scene=True)
        out = out.float().cpu().numpy()
        for n, (u, s, _, _) in enumerate(scene_tasks):
            h[u, s], has[u, s] = out[n], True
        for u, n in alias:
            recent[u] = out[n]
        if merged_tasks:
            rows = [t[0] for t in merged_tasks]
            merged = self._windows([t[1] for t in merged_tasks], [t[2] for t in merged_tasks])
            recent[rows] = merged.float().cpu().numpy()
        return h, has, recent

    def _windows(self, keys: Sequence, windows: Sequence[Sequence], scene: bool = False) -> torch.Tensor:
        """[N, d] last-position outputs of the windows: cached ones read, grown ones extended, the rest encoded
        whole (and cached under their keys)."""
        cache = self.cache if scene else self.timeline_cache
        out = torch.zeros(len(windows), self.model.cfg.d_model, device=self.device)
        hits, grown, whole = [], [], []   # (n, key, window, entry, start)
        for n, (key, window) in enumerate(zip(keys, windows)):
            entry, start = cache.lookup(key, window)
            todo = whole if entry is None else hits if start == len(window) else grown
            todo.append((n, key, window, entry, start))
        if hits:
            out[[t[0] for t in hits]] = cache.vectors([t[3] for t in hits])
        if grown:
            out[[t[0] for t in grown]] = self._encode([t[2] for t in grown], [t[3] for t in grown],
                                                      [t[4] for t in grown], scene)
        if whole:
            entries = cache.reserve([t[1] for t in whole], touched=len(hits) + len(grown))
            out[[t[0] for t in whole]] = self._encode([t[2] for t in whole], entries, scene=scene)
        return out

    @torch.inference_mode()
    def interests(self, states: Mapping[str, Mapping[str, Sequence]]) -> Interests:
        """user -> {scene: window} for users with at least one event -> their vectors."""
        users = list(states)
        h, has, recent = self._sources([states[u] for u in users], users)
        S = len(self.scenes)
        if not users:
            return Interests(users, h, has, recent, np.zeros((0, S + 1, h.shape[-1]), np.float32),
                             np.zeros((0, S + 1, S), np.float32))
        as_t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        H, a = self.model.fusion(as_t(h), as_t(has), as_t(recent))
        return Interests(users, h, has, recent, H.float().cpu().numpy(), a.float().cpu().numpy())

    def item_vectors(self) -> tuple[list[str], list[str], np.ndarray]:
        """The catalog the index serves: item ids, their scenes, and their embedding rows."""
        with torch.no_grad():
            E = self.model.item_vectors()[FIRST_ITEM:].float().cpu().numpy()
        return self.ckpt.vocab.item_ids, self.ckpt.vocab.item_scenes, np.ascontiguousarray(E)


def _chunks(order: Sequence[int], sizes: Sequence[int], batch_size: int, min_rows: int = 32) -> list[list[int]]:
    """`order` (ascending by size) cut into runs encoded together: at most batch_size rows, and a new run where the
    size passes 1.5x the run's smallest once it has min_rows, so that few rows pad far (a batch of 1-event appends
    with a few 4-event ones must not cost 4 positions a row) and small runs do not each pay a forward's fixed cost."""
    runs: list[list[int]] = []
    run: list[int] = []
    for i in order:
        if run and (len(run) >= batch_size or (len(run) >= min_rows and sizes[i] > 1.5 * sizes[run[0]])):
            runs.append(run)
            run = []
        run.append(i)
    if run:
        runs.append(run)
    return runs
