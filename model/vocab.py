"""Item vocabulary (item_id -> embedding row, scene) and windows -> model tensors.

Windows are left-padded so every window's newest event sits at the last position, which is the one read out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

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


def concat_rows(tables: Sequence[np.ndarray]) -> np.ndarray:
    """np.concatenate for window tables (structured arrays of one dtype), through their bytes: numpy promotes a
    structured dtype's fields on every concatenate (~15 µs a call, several per touched user), bytes cost ~1 µs.
    The result is read-only."""
    if len(tables) == 1:
        return tables[0]
    return np.frombuffer(b"".join([t.tobytes() for t in tables]), tables[0].dtype)


def tensorize(windows: Sequence[np.ndarray], item_rows: Callable, action_ids: Callable, scene_ids: Callable,
              gap_buckets: int, length: int | None = None, starts: Sequence[int] | None = None) -> WindowBatch:
    """Windows as tables (structured arrays with fields ts, item, action and scene, each ascending by time; the
    last three codes that item_rows / action_ids / scene_ids turn into model indices) -> left-padded tensors of
    width `length` (default: longest); a longer window keeps its newest. With `starts`, only each window's rows
    from its start on, their time gaps still measured to the row before."""
    prev_ts = None
    if starts is not None:
        prev_ts = [int(w["ts"][s - 1]) if s > 0 else -1 for w, s in zip(windows, starts)]
        windows = [w[s:] for w, s in zip(windows, starts)]
    T = length or max((len(w) for w in windows), default=1)
    windows = [w[len(w) - T:] if len(w) > T else w for w in windows]
    B = len(windows)
    counts = np.array([len(w) for w in windows], dtype=np.int64)
    arrays = np.zeros((4, B, T), dtype=np.int64)
    valid = np.zeros((B, T), dtype=bool)
    if counts.sum():
        rows = concat_rows(windows)
        b = np.repeat(np.arange(B), counts)
        col = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(T - counts, counts)
        for a, values in enumerate((item_rows(rows["item"]), action_ids(rows["action"]), scene_ids(rows["scene"]),
                                    rows["ts"])):
            arrays[a, b, col] = values
        valid[b, col] = True
    items, actions, scenes, ts = (torch.from_numpy(a) for a in arrays)
    valid_t = torch.from_numpy(valid)
    has_prev = valid_t & torch.roll(valid_t, 1, dims=1)
    has_prev[:, 0] = False
    prev = torch.roll(ts, 1, dims=1)
    if prev_ts is not None:   # the first valid slot's predecessor lies outside the sequence
        first = T - valid_t.sum(1).clamp(min=1)
        rows_b = torch.arange(B)
        given = torch.as_tensor(np.asarray(prev_ts, dtype=np.int64))
        has_prev[rows_b, first] |= (given >= 0) & valid_t[rows_b, first]
        prev[rows_b, first] = given
    gaps = torch.where(has_prev, gap_bucket(ts - prev, gap_buckets), torch.zeros_like(ts))
    return WindowBatch(items, actions, scenes, gaps, valid_t)


class Codes:
    """Numbers of names in a process-wide table (`names`, a list that only grows, read as it grows) -> this
    model's indices (`index`, `default` for names it does not know), as one array lookup."""

    def __init__(self, names: list, index: dict, default: int):
        self.names, self.index, self.default = names, index, default
        self.table = np.zeros(0, dtype=np.int64)

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        if codes.size and int(codes.max()) >= len(self.table):
            new = self.names[len(self.table):len(self.names)]
            self.table = np.concatenate([self.table, np.array([self.index.get(n, self.default) for n in new],
                                                              dtype=np.int64)])
        return self.table[codes]


__all__ = ["ItemVocab", "WindowBatch", "Codes", "concat_rows", "tensorize", "PAD", "OOV", "FIRST_ITEM"]
