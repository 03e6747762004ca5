"""The worker's heap: what has lived long is frozen, in one step, when there is enough of it.

Python's cycle collector walks, in a full collection, every tracked object of the oldest generation. The worker's
long-lived objects are mostly its libraries and model (~300,000 objects) and, with many users, the packed windows of
users not in slots; walking them again and again finds nothing (the state has no reference cycles). Frozen
(gc.freeze: the permanent generation), refcounting still frees them and the collector no longer walks them.

So after a durable batch, at most every `check_every_s`, the heap is frozen if the oldest generation has grown to
`freeze_over` objects since the last freeze: at start, after a big recovery, as packed users pile up. A collection
of what is not frozen yet comes first, so that cycles that are already garbage go rather than being frozen for good
(it walks what is then frozen, ~0.5 µs an object: ~150 ms for the ~300,000 at start). Between freezes Python's
own schedule collects what a batch leaves, which is young and small (a full collection then walks only what is not
frozen: ~0.3 ms measured).

Before the state moved into arrays the heap was frozen after every batch, and the whole of it was unfrozen and
collected every 10 minutes to reclaim cycles frozen while still alive: that collection walked everything (~150 ms
with the libraries alone on the 2-core machine), a pause the soak saw as a minute's p99 of 250-500 ms. Cycles
frozen while alive still leak here, but only those alive at a freeze, which is now rare: a batch leaves none
(tests/test_nothing_lost.py).
"""
from __future__ import annotations

import gc
import time

FREEZE_OVER = 50_000   # objects in the oldest generation, unfrozen, before they are frozen
CHECK_EVERY_S = 5.0    # the count costs ~10 ns an object of that generation


class FrozenHeap:
    def __init__(self, freeze_over: int = FREEZE_OVER, check_every_s: float = CHECK_EVERY_S):
        self.freeze_over, self.check_every_s = freeze_over, check_every_s
        self._checked_at = float("-inf")

    def settle(self) -> None:
        """After a durable batch: freeze the heap if its oldest generation holds `freeze_over` objects."""
        now = time.monotonic()
        if now - self._checked_at < self.check_every_s:
            return
        self._checked_at = now
        if len(gc.get_objects(generation=2)) >= self.freeze_over:
            gc.collect()
            gc.freeze()
