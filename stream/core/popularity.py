"""Item popularity, per scene, and the one rule that ranks it.

Ranked by count, ties broken by item id: a rule that depends only on the counts, never on the order events
arrived in, so replay, the API's fallback and the MostPop baseline of the evaluation rank the same counts the same.

Workers share popularity per partition of `clicks` (docs/operations.md, "One popular list"): each publishes its
partitions' counts (`top_counts`), and every worker ranks the sum of the latest counts of every partition
(`merge_partitions`), so the popular fallback does not depend on which worker answers.
"""
from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections import Counter, defaultdict
from typing import Callable, Collection, Iterable, Mapping, Optional, Union

# counts of one partition, {scene: [[item_id, count], ...]} (best first) or {scene: {item_id: count}}
PartitionCounts = Mapping[str, Union[Mapping[str, int], Iterable[tuple[str, int]]]]


def rank_key(pair: tuple[str, int]) -> tuple[int, str]:
    """The ranking rule: (item_id, count) pairs sort best first by this key (count desc, then item id asc)."""
    return (-pair[1], pair[0])


class Popularity:
    """count[scene][item_id]; `add` / `remove` keep it equal to whatever multiset of events the owner counts."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def add(self, events: Iterable) -> None:
        for e in events:
            self.counts[e.scene][e.item_id] += 1

    def remove(self, events: Iterable) -> None:
        """Uncount events (each counted before): an item, or a scene, that reaches zero goes, so a removal costs
        the same however many items are counted."""
        for e in events:
            counts = self.counts[e.scene]
            left = counts[e.item_id] - 1
            if left:
                counts[e.item_id] = left
            else:
                del counts[e.item_id]
                if not counts:
                    del self.counts[e.scene]

    def shift(self, scene: str, delta: Mapping[str, int]) -> None:
        """Add each item's change in count (`window.item_delta`); an item, or a scene, at zero goes."""
        counts = self.counts[scene]
        for item, d in delta.items():
            left = counts[item] + d
            if left:
                counts[item] = left
            else:
                del counts[item]
        if not counts:
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
        return heapq.nsmallest(n, pairs, key=rank_key) if n is not None else sorted(pairs, key=rank_key)


def top_counts(popularity: Popularity, depth: int) -> dict[str, list[tuple[str, int]]]:
    """The `depth` most counted (item_id, count) of each scene, best first: what a worker publishes for one
    partition. Exact for every scene with at most `depth` items counted."""
    return {scene: popularity.ranked(scene, depth) for scene in sorted(popularity.counts)}


def merge_partitions(parts: Iterable[PartitionCounts]) -> Popularity:
    """The sum of partitions' counts, as one Popularity to rank: the order of `parts` changes nothing, and each
    partition must be given once (its latest counts), so nothing is counted twice."""
    merged = Popularity()
    for part in parts:
        for scene, pairs in part.items():
            counts = merged.counts[scene]
            for item, c in (pairs.items() if isinstance(pairs, Mapping) else pairs):
                if c > 0:
                    counts[item] += c
            if not counts:
                del merged.counts[scene]
    return merged


class RunningTop:
    """Counts that only grow, per scene, with each scene's `depth` best items kept in ranking order as they grow:
    the ranking of `Popularity.ranked`, read without re-ranking every count (offline replay asks for it before
    every micro-batch). An increment moves at most one key within a `depth`-long sorted list."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self._top: dict[str, list[tuple[int, str]]] = defaultdict(list)   # rank keys (-count, item), best first

    def add(self, events: Iterable) -> None:
        for e in events:
            self.increment(e.scene, e.item_id)

    def increment(self, scene: str, item: str) -> None:
        counts, top = self.counts[scene], self._top[scene]
        old = counts[item]
        counts[item] = old + 1
        key = (-old - 1, item)
        # invariant: top holds the best min(depth, items counted) keys, sorted
        if old and (at := bisect_left(top, (-old, item))) < len(top) and top[at] == (-old, item):
            del top[at]              # in the top: it moves up, nothing else changes
        elif len(top) >= self.depth and key > top[-1]:
            return                   # still outside the best depth
        insort(top, key)
        if len(top) > self.depth:
            top.pop()

    def ahead(self, scene: str, item: str, depth: int) -> Optional[tuple[str, ...]]:
        """The items ranked ahead of `item` in `scene`, if it is among the best `depth` (None if not): with them,
        whether `item` is among first(scene, k, skip) is decided later, for any skip of at most depth - k items."""
        if depth > self.depth:
            raise ValueError(f"depth {depth} is beyond the kept {self.depth}")
        top = self._top.get(scene, ())
        for at, (_, ranked) in enumerate(top[:depth]):
            if ranked == item:
                return tuple(i for _, i in top[:at])
        return None

    def first(self, scene: str, k: int, skip: Collection[str] = ()) -> list[str]:
        """The k best items of `scene` not in `skip`, best first: the first k of Popularity.ranked(scene) that
        are not in `skip`, from the kept top when it holds them (always when len(skip) + k <= depth)."""
        out: list[str] = []
        if k <= 0:
            return out
        top = self._top.get(scene, ())
        for _, item in top:
            if item not in skip:
                out.append(item)
                if len(out) == k:
                    return out
        if len(top) < self.depth:    # the top holds every counted item
            return out
        ranked = sorted(self.counts[scene].items(), key=rank_key)
        return [i for i, _ in ranked if i not in skip][:k]
