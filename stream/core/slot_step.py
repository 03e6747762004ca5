"""The micro-batch step on slots (core/slots.py), what the live worker and replay both run: join the batch into the
windows, then encode every touched user's windows and merged timeline in one pass per stack and fuse them.

The encoder is passed in (model/slot_encoder.py's SlotEncoder: `vectors(windows, codebook, scene)`, `fuse(h, has,
recent)`, `shared_stack`), so this layer never loads torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .slots import SlotJoin, SlotWindows, Windows
from .window import Codebook


class SlotEncoder(Protocol):
    shared_stack: bool

    def vectors(self, windows: Windows, book, scene: bool) -> np.ndarray: ...

    def fuse(self, h: np.ndarray, has: np.ndarray, recent: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class SlotVectors:
    """Vectors of the touched users, row-aligned with `users` (user slots); S = the model's scenes."""
    users: np.ndarray     # [U] user slots
    h: np.ndarray         # [U, S, d] per-scene interest (zeros where no history)
    has: np.ndarray       # [U, S] bool
    recent: np.ndarray    # [U, d] the merged timeline's last output
    fused: np.ndarray     # [U, S + 1, d] H_j per scene, then the global vector
    weights: np.ndarray   # [U, S + 1, S] a_ij
    newest_ts: np.ndarray  # [U] ts of the user's newest event
    events: np.ndarray    # [U] events in the user's windows


def encode(slots: SlotWindows, users: np.ndarray, join: SlotJoin, encoder: SlotEncoder) -> SlotVectors:
    """The users' vectors (users: slots, a subset of the join's touched ones or all of them), from their windows as
    they are now: cached positions reused as far as the join's appends allow (model/slot_encoder.py)."""
    S = len(slots.scenes)
    scene_windows, rows, scenes = slots.scene_windows(users, join)
    out = encoder.vectors(scene_windows, Codebook, scene=True)
    d = out.shape[1] if out.ndim == 2 and len(out) else 0
    h = np.zeros((len(users), S, d), np.float32)
    has = np.zeros((len(users), S), bool)
    h[rows, scenes], has[rows, scenes] = out, True
    recent = np.zeros((len(users), d), np.float32)
    alone = has.sum(1) == 1
    if encoder.shared_stack and alone.any():   # one window: its output is both h_s and recent
        recent[alone] = h[alone, has[alone].argmax(1)]
    merged = np.flatnonzero(~(encoder.shared_stack & alone))
    if len(merged):
        grown = _timeline_appended(users[merged], join)
        recent[merged] = encoder.vectors(slots.timelines(users[merged], grown), Codebook, scene=False)
    fused, weights = encoder.fuse(h, has, recent) if len(users) else (np.zeros((0, S + 1, d), np.float32),
                                                                       np.zeros((0, S + 1, S), np.float32))
    W = slots.win[users]
    held = np.where(W >= 0, slots.n[np.maximum(W, 0)], 0)
    last = np.where(held > 0, slots.ts[np.maximum(W, 0), slots.length - 1], np.iinfo(np.int64).min)
    return SlotVectors(users, h, has, recent, fused, weights, last.max(1), held.sum(1))


def _timeline_appended(users: np.ndarray, join: SlotJoin) -> np.ndarray:
    """The join's timeline appends of these users (0 for one it did not touch: unchanged since encoded)."""
    out = np.zeros(len(users), np.int64)
    if len(join.users):
        order = np.argsort(join.users)
        at = np.searchsorted(join.users, users, sorter=order).clip(0, len(order) - 1)
        hit = join.users[order[at]] == users
        out[hit] = join.timeline_appended[order[at[hit]]]
    return out
