"""Each held user's newest vectors, as rows of arrays indexed by user slot (core/slots.py): what serving reads, with
no object per user. A micro-batch writes its encoded rows in one scatter per field; a request cuts one row into a
record (core/output.py) when asked.

A row belongs to the user who held the slot when it was written: it carries the slot's version then, and reads as
absent once the slot has changed hands or the user left memory (a revoked partition, an eviction), as the per-user
records this replaces were dropped with their users.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import output


class VectorTable:
    def __init__(self, scenes: Sequence[str], width: int):
        self.scenes = tuple(scenes)
        S, d = len(self.scenes), width
        self.h = np.zeros((0, S, d), np.float32)
        self.has = np.zeros((0, S), bool)
        self.recent = np.zeros((0, d), np.float32)
        self.fused = np.zeros((0, S + 1, d), np.float32)
        self.weights = np.zeros((0, S + 1, S), np.float32)
        self.newest_ts = np.zeros(0, np.int64)
        self.events = np.zeros(0, np.int64)
        self.owner = np.full(0, -1, np.int64)      # the slot's version when the row was written (-1: none)
        self.model = np.zeros(0, np.int32)         # index into `versions`
        self.at = np.zeros(0, np.float64)          # when written (time.time())
        self.versions: list[str] = []

    def _grow(self, need: int) -> None:
        have = len(self.owner)
        if need <= have:
            return
        size = max(need, 2 * have, 256)
        for name in ("h", "has", "recent", "fused", "weights", "newest_ts", "events", "model", "at"):
            old = getattr(self, name)
            new = np.zeros((size, *old.shape[1:]), old.dtype)
            new[:have] = old
            setattr(self, name, new)
        self.owner = np.concatenate([self.owner, np.full(size - have, -1, np.int64)])

    def put(self, slots: np.ndarray, owners: np.ndarray, vec: output.Vectors, rows: np.ndarray, version: str,
            at: float) -> None:
        """Rows `rows` of `vec` become the newest vectors of user slots `slots` (held then by the slots' versions
        `owners`)."""
        if not len(slots):
            return
        self._grow(int(slots.max()) + 1)
        if version not in self.versions:
            self.versions.append(version)
        self.h[slots], self.has[slots], self.recent[slots] = vec.h[rows], vec.has[rows], vec.recent[rows]
        self.fused[slots], self.weights[slots] = vec.fused[rows], vec.weights[rows]
        self.newest_ts[slots], self.events[slots] = vec.newest_ts[rows], vec.events[rows]
        self.owner[slots], self.model[slots], self.at[slots] = owners, self.versions.index(version), at

    def held(self, slot: Optional[int], owner: int) -> bool:
        """Whether the slot's row is its present holder's (`owner`: the slot's version now)."""
        return slot is not None and slot < len(self.owner) and self.owner[slot] == owner

    def version(self, slot: int) -> str:
        return self.versions[self.model[slot]]

    def record(self, user: str, slot: int) -> dict:
        """The slot's row as the published record (its own copies of the vectors)."""
        return output.record(user, self, slot, self.scenes, self.version(slot))
