"""The worker's heap, frozen once each micro-batch is durable.

The state is millions of small long-lived objects without reference cycles (events, window tuples, dicts): the
cycle collector re-walked all of them again and again for nothing, ~25% of the worker's CPU (BENCHMARKS.md).
Whatever is alive once a batch is durable goes to the permanent generation: refcounting still frees it, the
collector no longer walks it. What that would leak is cyclic garbage alive at that moment: a batch leaves none
(tests/test_nothing_lost.py), but the rest of the process (web requests, client libraries) may, so every
`full_every_s` the whole heap is collected once, as Python's own schedule would have done far more often.
"""
from __future__ import annotations

import gc
import time

FULL_GC_EVERY_S = 600.0        # a full collection of the frozen heap this often


class FrozenHeap:
    def __init__(self, full_every_s: float = FULL_GC_EVERY_S):
        self.full_every_s = full_every_s
        self._full_at = time.monotonic()

    def settle(self) -> None:
        """After a durable batch: freeze what is alive, after a full collection when one is due."""
        if time.monotonic() - self._full_at > self.full_every_s:
            gc.unfreeze()
            gc.collect()
            self._full_at = time.monotonic()
        gc.freeze()
