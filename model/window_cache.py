"""What the encoder keeps of each window it encodes (each (user, scene) window, and each user's merged window of all
scenes), so that appending events encodes only the new positions.

Attention is local (model.py): layer l's keys and values at a position depend on the events at most l * span back.
So an entry holds, per layer, the keys and values of the window's last `span` positions, the window's output
vector, and the events those depend on: the window's last `receptive_field` (cone) events, the first for its
timestamp only. When k events are appended, only the newest position's output is read and only the newest `span`
rows of each layer are kept, and both depend on the new window's last cone events alone: so if the cone - k of them
before the new positions are the cached ones, unchanged and in place, the new positions are encoded against the
cached rows and give what a full encode of the new window gives (within float rounding), even when a full window
dropped its k oldest events (rows computed from those are never read again). Anything else (a late event among
those events, a winning duplicate, no cached event left in the window) is a miss: the window is encoded whole and
its entry replaced.

Windows shorter than the receptive field (a checkpoint served with a small --window) cut off what the model would
see, so there an entry is reused only for an unchanged window or one that has never dropped an event.

The cache is derived state: bounded by a byte budget (least recently used entries go first), lost on restart,
never a source of truth. Its storage is preallocated slabs, so the budget is what it holds, and a micro-batch
gathers and scatters its rows in one indexed copy each.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import numpy as np
import torch

from .config import ModelConfig, receptive_field
from .model import Past

ENTRY_OVERHEAD_BYTES = 600   # the entry object, its key and the bytes of the last `cone` rows


@dataclass
class Entry:
    slot: int
    events: bytes = b""  # the window's last `cone` rows (a window is a table of rows, model/infer.py)
    whole: bool = False  # shorter than the cone and than a full window: events are the (user, scene)'s whole history
    rows: int = 0        # valid rows in the slot's ring
    head: int = 0        # ring index the next row goes to


class WindowCache:
    def __init__(self, cfg: ModelConfig, window: int, max_bytes: int, device: torch.device, scene: bool = False):
        """scene: entries of per-scene windows (their stack's layers), else of merged timelines."""
        layers = cfg.layers(scene)
        self.span, self.window, self.n_layers = cfg.span, window, layers
        self.cone = receptive_field(layers, cfg.span)
        self.extendable = window >= self.cone
        hd = cfg.d_model // cfg.n_heads
        self.entry_bytes = 4 * (layers * 2 * cfg.span * cfg.d_model + cfg.d_model) + ENTRY_OVERHEAD_BYTES
        self.capacity = max(0, max_bytes // self.entry_bytes)
        # slot, ring row, layer, key/value, head, head dim: a row is contiguous, so appending writes one block
        self.kv = torch.zeros(self.capacity, cfg.span, layers, 2, cfg.n_heads, hd, device=device)
        self.vec = torch.zeros(self.capacity, cfg.d_model, device=device)
        self.entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self.free = list(range(self.capacity - 1, -1, -1))
        self.stats = {"hits": 0, "extends": 0, "misses": 0, "evictions": 0}

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, key: Hashable, window: Sequence) -> tuple[Optional[Entry], int]:
        """(entry, start): encode the window's positions from `start` on against the entry's rows; start ==
        len(window) means the cached vector is the window's. (None, 0): encode the window whole."""
        entry = self.entries.get(key)
        start = _reusable(entry, window, self.cone, self.extendable) if entry is not None else None
        if start is None:
            self.stats["misses"] += 1
            return None, 0
        self.entries.move_to_end(key)
        self.stats["hits" if start == len(window) else "extends"] += 1
        return entry, start

    def reserve(self, keys: Sequence[Hashable], touched: int) -> list[Optional[Entry]]:
        """Empty entries for windows to be encoded whole; evicts least recently used ones, never any of the
        `touched` most recent (this micro-batch's hits and extensions), so a key may get None: not cached."""
        out: list[Optional[Entry]] = []
        reserved = 0
        for key in keys:
            old = self.entries.pop(key, None)
            if old is not None:
                slot = old.slot
            elif self.free:
                slot = self.free.pop()
            elif len(self.entries) > touched + reserved:   # never one reserved here
                _, evicted = self.entries.popitem(last=False)
                self.stats["evictions"] += 1
                slot = evicted.slot
            else:
                out.append(None)
                continue
            self.entries[key] = entry = Entry(slot)
            out.append(entry)
            reserved += 1
        return out

    def past(self, entries: Sequence[Entry], new_pos: torch.Tensor) -> list[Past]:
        """Each layer's cached keys and values of the entries' windows, ring order, with their positions (the
        newest row at -1)."""
        dev = self.kv.device
        rows = self.kv[torch.tensor([e.slot for e in entries], device=dev)]          # [B, span, L, 2, H, hd]
        head = torch.tensor([e.head for e in entries], device=dev)[:, None]
        count = torch.tensor([e.rows for e in entries], device=dev)[:, None]
        pos = (torch.arange(self.span, device=dev)[None] - head) % self.span - self.span
        valid = pos >= -count
        return [Past(rows[:, :, layer, 0].transpose(1, 2), rows[:, :, layer, 1].transpose(1, 2), valid, pos,
                     new_pos) for layer in range(self.n_layers)]

    def vectors(self, entries: Sequence[Entry]) -> torch.Tensor:
        return self.vec[torch.tensor([e.slot for e in entries], device=self.vec.device)]

    def append(self, entries: Sequence[Optional[Entry]], windows: Sequence[Sequence],
               presents: list[tuple[torch.Tensor, torch.Tensor]], counts: Sequence[int], vec: torch.Tensor) -> None:
        """The windows' newest positions were just encoded: presents are each layer's keys and values [B, H, T, hd]
        with each window's counts[b] new positions at the right. Writes only those rows (at most span of them) into
        the entries' rings, and the output vectors; None entries are skipped."""
        span, T = self.span, presents[0][0].shape[2]
        live = [b for b, e in enumerate(entries) if e is not None]
        if not live:
            return
        slots = np.array([entries[b].slot for b in live])
        heads = np.array([entries[b].head for b in live])
        ks = np.array([counts[b] for b in live])                  # new positions per entry
        w = np.minimum(ks, span)                                   # rows written per entry
        within = np.arange(w.sum()) - np.repeat(np.cumsum(w) - w, w)
        b_idx = np.repeat(np.array(live), w)
        t_idx = T - np.repeat(w, w) + within
        slot_idx = np.repeat(slots, w)
        ring_idx = (np.repeat(heads + ks - w, w) + within) % span
        for b, k in zip(live, ks.tolist()):
            e, window = entries[b], windows[b]
            e.head, e.rows = (e.head + k) % span, min(span, e.rows + k)
            e.events = window[-self.cone:].tobytes()
            e.whole = len(window) < min(self.cone, self.window)
        dev = self.kv.device
        as_t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
        stacked = torch.stack([torch.stack([k, v]) for k, v in presents])          # [L, 2, B, H, T, hd]
        self.kv[as_t(slot_idx), as_t(ring_idx)] = stacked[:, :, as_t(b_idx), :, as_t(t_idx)].to(self.kv.dtype)
        self.vec[as_t(slots)] = vec[as_t(np.array(live))].to(self.vec.dtype)

    def clear(self) -> None:
        self.entries.clear()
        self.free = list(range(self.capacity - 1, -1, -1))


def _reusable(entry: Entry, window: np.ndarray, cone: int, extendable: bool) -> Optional[int]:
    """Where the window's new positions start if the entry's rows are still exactly what a full encode of the
    window would compute for the positions before them that the new ones read; None if they may not be."""
    cached, size = entry.events, window.itemsize
    if not cached:
        return None
    c, n = len(cached) // size, len(window)
    # The common case first, without copying the whole window: unchanged since the entry was written (a user's
    # other scenes when one of them changed), so its last c rows are the cached ones. `_scan` returns n then too:
    # with n == c the window is the cached one; with n > c the entry is an extendable one's last `cone` rows (c ==
    # cone), found right at the end (tests/test_exactness.py holds the two to the same answer).
    if n >= c and (n == c or extendable and not entry.whole) and window[n - c:].tobytes() == cached:
        return n
    return _scan(entry, window, cone, extendable)


def _scan(entry: Entry, window: np.ndarray, cone: int, extendable: bool) -> Optional[int]:
    """`_reusable`'s rule in full: where the cached events sit in the window, if they still may be read."""
    cached, size = entry.events, window.itemsize
    c, n, rows = len(cached) // size, len(window), window.tobytes()
    if entry.whole and rows[:c * size] == cached:   # the whole history, still the start of the window
        return c
    if not extendable:                   # a cut-off window: only the same window again
        return n if rows == cached else None
    # the cached events must sit, unchanged and together, right before the k new positions: the cone - k that the
    # output and the rows still in use depend on (all `cone` for the cached output of an unchanged window).
    # Only the newest position's output is read, and the newest `span` rows of each layer kept: both depend on
    # the window's last `cone` events only, so rows computed from older ones (a full window that dropped its k
    # oldest events for k new ones; a whole history that filled the window) are never read.
    last = cached[-size:]
    last_ts = int(np.frombuffer(last, window.dtype)["ts"][0])
    ts = window["ts"]
    for p in range(n, 0, -1):
        if rows[(p - 1) * size:p * size] == last:
            k = n - p
            need = cone - k
            return p if need <= min(p, c) and rows[(p - need) * size:p * size] == cached[(c - need) * size:] else None
        if ts[p - 1] < last_ts:
            return None
    return None
