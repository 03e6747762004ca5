"""The micro-batch step on slots (core/slots.py), what the live worker and replay both run: join the batch into the
windows, then encode every touched user's windows and merged timeline in one pass per stack and fuse them.

The encoder is passed in (model/slot_encoder.py's SlotEncoder: `vectors(windows, codebook, scene)`, `fuse(h, has,
recent)`, `shared_stack`), so this layer never loads torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .slots import SlotWindows, Windows
from .window import Codebook


class SlotEncoder(Protocol):
    shared_stack: bool
    width: int   # d

    def vectors(self, windows: Windows, book, scene: bool, complete=None) -> np.ndarray: ...

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


def encode(slots: SlotWindows, users: np.ndarray, encoder: SlotEncoder) -> SlotVectors:
    """The users' vectors (user slots: those joins touched since they were last encoded, say), from their windows as
    they are now: cached positions reused as far as the appends since allow (model/slot_encoder.py)."""
    S = len(slots.scenes)
    if not len(users):
        d = encoder.width
        empty = np.zeros((0, S, d), np.float32)
        return SlotVectors(users, empty, np.zeros((0, S), bool), np.zeros((0, d), np.float32),
                           np.zeros((0, S + 1, d), np.float32), np.zeros((0, S + 1, S), np.float32),
                           np.zeros(0, np.int64), np.zeros(0, np.int64))
    scene_windows, rows, scenes = slots.scene_windows(users)
    out = encoder.vectors(scene_windows, Codebook, scene=True,
                          complete=lambda rows: slots.windows(scene_windows.keys[rows]))
    d = encoder.width
    h = np.zeros((len(users), S, d), np.float32)
    has = np.zeros((len(users), S), bool)
    h[rows, scenes], has[rows, scenes] = out, True
    recent = np.zeros((len(users), d), np.float32)
    alone = has.sum(1) == 1
    if encoder.shared_stack and alone.any():   # one window: its output is both h_s and recent
        recent[alone] = h[alone, has[alone].argmax(1)]
    merged = np.flatnonzero(~(encoder.shared_stack & alone))
    if len(merged):
        recent[merged] = encoder.vectors(
            slots.tails(users[merged]), Codebook, scene=False,
            complete=lambda rows: slots.timelines(users[merged][rows], np.full(len(rows), -1, np.int64)))
    fused, weights = encoder.fuse(h, has, recent)
    slots.encoded(users)
    W = slots.win[users]
    held = np.where(W >= 0, slots.n[np.maximum(W, 0)], 0)
    last = np.where(held > 0, slots.ts[np.maximum(W, 0), slots.length - 1], np.iinfo(np.int64).min)
    return SlotVectors(users, h, has, recent, fused, weights, last.max(1), held.sum(1))

