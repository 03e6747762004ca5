"""Item popularity, per scene, and the one rule that ranks it.

Ranked by count, ties broken by item id: a rule that depends only on the counts, never on the order events
arrived in, so replay, the API's fallback and the MostPop baseline of the evaluation rank the same counts the same.
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import Callable, Iterable, Optional


class Popularity:
    """count[scene][item_id]; `add` / `remove` keep it equal to whatever multiset of events the owner counts."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def add(self, events: Iterable, sign: int = 1) -> None:
        for e in events:
            self.counts[e.scene][e.item_id] += sign

    def remove(self, events: Iterable) -> None:
        self.add(events, -1)
        for scene in [s for s, c in self.counts.items() if not +c]:
            del self.counts[scene]

    def count_of(self, scene: Optional[str] = None) -> Counter:
        """Counts of one scene, or of all scenes summed (an item clicked in two scenes counts in both)."""
        if scene is not None:
            return self.counts.get(scene, Counter())
        total: Counter = Counter()
        for c in self.counts.values():
            total.update(c)
        return total

    def ranked(self, scene: Optional[str] = None, n: Optional[int] = None,
               keep: Callable[[str], bool] = lambda item: True) -> list[tuple[str, int]]:
        """The n most popular (item_id, count) of `scene` (None: all scenes) that `keep` accepts, best first."""
        pairs = ((item, c) for item, c in self.count_of(scene).items() if c > 0 and keep(item))
        key = lambda ic: (-ic[1], ic[0])  # noqa: E731 - the ranking rule
        return heapq.nsmallest(n, pairs, key=key) if n is not None else sorted(pairs, key=key)
