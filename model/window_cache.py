"""What the encoder keeps of each (user, scene) window, so that appending events encodes only the new positions.

Attention is local (model.py): layer l's keys and values at a position depend on the events at most l * span back.
So an entry holds, per layer, the keys and values of the window's last `span` positions, the window's output
vector, and the events those depend on: the window's last `receptive_field` events (the first for its timestamp
only; the rows need one event fewer). A new window that still holds those events, in place and unchanged, is the
cached one plus positions after it; those are encoded against the cached rows and give what a full encode of the new window gives (within float
rounding), because a full window's output never depends on more than its last receptive_field events. Anything
else (a late event among the cached ones, a winning duplicate, more new events than the window keeps) is a miss:
the window is encoded whole and its entry replaced.

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

import torch

from .model import ModelConfig

ENTRY_OVERHEAD_BYTES = 600   # the entry object, its key and the tuple of event references (events are shared)


@dataclass
class _Entry:
    slot: int
    events: tuple      # the window's last `cone` events
    whole: bool        # shorter than the cone and than a full window: events are the (user, scene)'s whole history
    rows: int          # valid rows in the slot, right-aligned


class WindowCache:
    def __init__(self, cfg: ModelConfig, window: int, max_bytes: int, device: torch.device):
        self.span, self.window = cfg.span, window
        self.cone = cfg.receptive_field
        self.extendable = window >= self.cone
        hd = cfg.d_model // cfg.n_heads
        self.entry_bytes = 4 * (cfg.n_layers * 2 * cfg.span * cfg.d_model + cfg.d_model) + ENTRY_OVERHEAD_BYTES
        self.capacity = max(0, max_bytes // self.entry_bytes)
        self.kv = torch.zeros(self.capacity, cfg.n_layers, 2, cfg.n_heads, cfg.span, hd, device=device)
        self.vec = torch.zeros(self.capacity, cfg.d_model, device=device)
        self.entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.free = list(range(self.capacity - 1, -1, -1))
        self.stats = {"hits": 0, "extends": 0, "misses": 0, "evictions": 0}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def bytes_used(self) -> int:
        return len(self.entries) * self.entry_bytes

    def lookup(self, key: Hashable, window: Sequence) -> tuple[Optional[_Entry], int]:
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

    def past(self, entries: Sequence[_Entry]) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries' rows: keys and values [B, n_layers, 2, H, span, hd] and valid [B, span]."""
        slots = torch.tensor([e.slot for e in entries], device=self.kv.device)
        rows = torch.tensor([e.rows for e in entries], device=self.kv.device)
        valid = torch.arange(self.span, device=self.kv.device)[None] >= (self.span - rows)[:, None]
        return self.kv[slots], valid

    def vectors(self, entries: Sequence[_Entry]) -> torch.Tensor:
        return self.vec[torch.tensor([e.slot for e in entries], device=self.vec.device)]

    def store(self, keys: Sequence[Hashable], windows: Sequence[Sequence], kv: torch.Tensor, rows: torch.Tensor,
              vec: torch.Tensor) -> None:
        """Entries for freshly encoded windows: kv [B, n_layers, 2, H, span, hd] right-aligned, rows [B] valid
        counts, vec [B, d]. With fewer slots than windows, only the last ones are kept."""
        if not self.capacity:
            return
        keep = range(max(0, len(keys) - self.capacity), len(keys))
        counts = rows.tolist()
        slots = []
        for i in keep:
            entry = self.entries.pop(keys[i], None)
            if entry is None:
                if not self.free:
                    _, old = self.entries.popitem(last=False)
                    self.free.append(old.slot)
                    self.stats["evictions"] += 1
                slot = self.free.pop()
            else:
                slot = entry.slot
            window = windows[i]
            whole = len(window) < min(self.cone, self.window)   # so events holds all of it
            self.entries[keys[i]] = _Entry(slot, tuple(window[-self.cone:]), whole, counts[i])
            slots.append(slot)
        index = torch.tensor(slots, device=self.kv.device)
        self.kv[index] = kv[keep.start:].to(self.kv.dtype)
        self.vec[index] = vec[keep.start:].to(self.vec.dtype)

    def clear(self) -> None:
        self.entries.clear()
        self.free = list(range(self.capacity - 1, -1, -1))


def _reusable(entry: _Entry, window: Sequence, cone: int, extendable: bool) -> Optional[int]:
    """Where the window's new positions start if the entry's rows are still exactly what a full encode of the
    window would compute for the positions before them; None if they may not be."""
    cached = entry.events
    c = len(cached)
    if entry.whole:                      # the cached events were the whole history: they must still start it
        return c if tuple(window[:c]) == cached else None
    if not extendable:                   # a cut-off window: only the same window again
        return len(window) if tuple(window) == cached else None
    # the cached events must sit, unchanged and together, right before the new positions: all `cone` of them for
    # the cached output (an unchanged window), the newest cone - 1 for the cached rows (the oldest may be evicted)
    last = cached[-1]
    for p in range(len(window), 0, -1):
        if window[p - 1] == last:
            need = c if p == len(window) else min(c, cone - 1)
            return p if p >= need and tuple(window[p - need:p]) == cached[c - need:] else None
        if window[p - 1].order_key < last.order_key:
            return None
    return None
