"""Item vocabulary (item_id -> embedding row, scene) and windows -> model tensors.

Windows are left-padded so every window's newest event sits at the last position, which is the one read out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .model import FIRST_ITEM, OOV, PAD, gap_bucket


@dataclass
class ItemVocab:
    item_ids: list[str]      # row FIRST_ITEM + i of the embedding table
    item_scenes: list[str]   # scene of each item, aligned with item_ids
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        if len(self.item_ids) != len(self.item_scenes):
            raise ValueError("item_ids and item_scenes differ in length")
        self._index = {item: i + FIRST_ITEM for i, item in enumerate(self.item_ids)}
        if len(self._index) != len(self.item_ids):
            raise ValueError("duplicate item ids in vocabulary")

    def __len__(self) -> int:
        """Rows of the embedding table: the items plus PAD and OOV."""
        return len(self.item_ids) + FIRST_ITEM

    def row(self, item_id: str) -> int:
        return self._index.get(item_id, OOV)

    def rows(self, item_ids) -> list[int]:
        get = self._index.get
        return [get(i, OOV) for i in item_ids]

    @classmethod
    def from_events(cls, events) -> "ItemVocab":
        """Items in first-seen order; an item's scene is the scene of its first event."""
        scenes: dict[str, str] = {}
        for e in events:
            scenes.setdefault(e.item_id, e.scene)
        return cls(list(scenes), list(scenes.values()))

    def to_json(self) -> list[list[str]]:
        return [[i, s] for i, s in zip(self.item_ids, self.item_scenes)]

    @classmethod
    def from_json(cls, rows) -> "ItemVocab":
        return cls([r[0] for r in rows], [r[1] for r in rows])


@dataclass
class WindowBatch:
    items: torch.Tensor    # [B, T] long
    actions: torch.Tensor  # [B, T] long
    scenes: torch.Tensor   # [B, T] long
    gaps: torch.Tensor     # [B, T] long
    valid: torch.Tensor    # [B, T] bool

    def to(self, device) -> "WindowBatch":
        return WindowBatch(*(t.to(device, non_blocking=True) for t in
                             (self.items, self.actions, self.scenes, self.gaps, self.valid)))

    def inputs(self):
        return self.items, self.actions, self.scenes, self.gaps, self.valid


def pack(seqs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int], Sequence[int]]], width: int,
         gap_buckets: int, prev_ts: Sequence[int] | None = None) -> WindowBatch:
    """(item rows, action ids, scene ids, ts) per sequence -> left-padded tensors of `width`; the newest `width`
    entries of a longer sequence are kept. Gap bucket 0 marks the first event (no predecessor inside), unless
    prev_ts gives the sequence's predecessor (< 0: none), as when encoding the newest rows of a window."""
    B, T = len(seqs), width
    arrays = np.zeros((4, B, T), dtype=np.int64)
    valid = np.zeros((B, T), dtype=bool)
    for b, seq in enumerate(seqs):
        n = min(len(seq[0]), T)
        if n:
            for a in range(4):
                arrays[a, b, T - n:] = seq[a][-n:]
            valid[b, T - n:] = True
    items, actions, scenes, ts = (torch.from_numpy(a) for a in arrays)
    valid_t = torch.from_numpy(valid)
    has_prev = valid_t & torch.roll(valid_t, 1, dims=1)
    has_prev[:, 0] = False
    prev = torch.roll(ts, 1, dims=1)
    if prev_ts is not None:   # the first valid slot's predecessor lies outside the sequence
        first = T - valid_t.sum(1).clamp(min=1)
        rows = torch.arange(B)
        given = torch.as_tensor(np.asarray(prev_ts, dtype=np.int64))
        has_prev[rows, first] |= (given >= 0) & valid_t[rows, first]
        prev[rows, first] = given
    gaps = torch.where(has_prev, gap_bucket(ts - prev, gap_buckets), torch.zeros_like(ts))
    return WindowBatch(items, actions, scenes, gaps, valid_t)


def tensorize(windows: Sequence[Sequence], vocab: ItemVocab, scene_index: dict[str, int],
              action_index: dict[str, int], gap_buckets: int, length: int | None = None,
              starts: Sequence[int] | None = None) -> WindowBatch:
    """Event windows (each ascending by time) -> left-padded tensors of width `length` (default: longest). With
    `starts`, only each window's events from its start on, their time gaps still measured to the event before."""
    get_row = vocab._index.get
    if starts is not None:
        prev_ts = [w[s - 1].ts if s > 0 else -1 for w, s in zip(windows, starts)]
        windows = [w[s:] for w, s in zip(windows, starts)]
    T = length or max((len(w) for w in windows), default=1)
    seqs = [([get_row(e.item_id, OOV) for e in w], [action_index.get(e.action, 0) for e in w],
             [scene_index[e.scene] for e in w], [e.ts for e in w]) for w in windows]
    return pack(seqs, T, gap_buckets, prev_ts if starts is not None else None)


__all__ = ["ItemVocab", "WindowBatch", "tensorize", "PAD", "OOV", "FIRST_ITEM"]
