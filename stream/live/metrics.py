"""Prometheus metrics of one worker (served at /metrics)."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)   # process_resident_memory_bytes, process_cpu_seconds_total, open fds
        self.events = Counter("scenestream_events_consumed", "Valid events applied to state", registry=r)
        self.invalid = Counter("scenestream_events_invalid", "Rejected events, by reason", ["reason"], registry=r)
        self.late = Counter("scenestream_events_late_dropped", "Events older than a full window", registry=r)
        self.batch_size = Histogram("scenestream_batch_size", "Events per micro-batch", registry=r,
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000))
        self.encode_seconds = Histogram("scenestream_encode_seconds", "Seconds to encode one micro-batch's users",
                                        registry=r, buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        seconds = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
        self.latency = BatchHistogram("scenestream_event_to_publish_seconds",
                                      "Seconds from an event's Kafka timestamp to its micro-batch being durable "
                                      "(its output record and its state acknowledged)", seconds, registry=r)
        # the part of it before the worker: a creep here is the broker's, the fetch's or the producer's
        self.waited = BatchHistogram("scenestream_event_to_batch_seconds",
                                     "Seconds from an event's Kafka timestamp to the worker taking up its micro-batch "
                                     "(the producer's linger, the broker, the fetch)", seconds, registry=r)
        self.lag = Gauge("scenestream_consumer_lag", "Messages behind the partition end, by partition",
                         ["partition"], registry=r)
        self.catalog = Counter("scenestream_catalog_records", "Item-catalog records, by outcome", ["outcome"],
                               registry=r)
        self.requests = Counter("scenestream_http_requests", "HTTP requests, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.model_swaps = Counter("scenestream_model_swaps", "New checkpoints found by the model poll, by outcome: "
                                   "swapped (now serving), refused (kept the model in use)", ["outcome"], registry=r)
        self.model = Info("scenestream_model", "The model version in use", registry=r)
        self._caches: _CacheCollector | None = None

    def watch_cache(self, caches: Callable[[], Iterable]) -> None:
        """Export the streaming encoder's caches (model/slot_encoder.py's pools), summed, as they are at each scrape;
        `caches()` gives the pools of the model in use (a model swap brings new ones)."""
        self._caches = _CacheCollector(caches)
        self.registry.register(self._caches)

    def watch_state(self, store) -> None:
        """Export the state store's users in memory and its disk loads and evictions (stream/live/state.py)."""
        self.registry.register(_StateCollector(store))

    def retire_cache(self, caches: Iterable) -> None:
        """A swapped-out model's caches: their counts stay in the counters, so the counters never go down."""
        if self._caches is not None:
            for c in caches:
                for stat in _CacheCollector.COUNTED:
                    self._caches.retired[stat] += c.stats[stat]


class BatchHistogram:
    """A Prometheus histogram fed a micro-batch's values at once: one numpy pass per batch instead of one
    `Histogram.observe` per event (~2 µs each with prometheus_client's locks and per-bucket values, ~3% of the
    worker's CPU on a backlog). Exposed like any histogram: cumulative `le` buckets, `_sum` and `_count`."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)   # per bucket; the last one is +Inf
        self.sum = 0.0
        registry.register(self)

    def observe_many(self, values) -> None:
        v = np.asarray(values, dtype=np.float64)
        # a value equal to a bound belongs to that bound's bucket (le), as Histogram.observe counts it
        self.counts += np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=len(self.counts))
        self.sum += float(v.sum())

    def collect(self):
        cumulative = np.cumsum(self.counts).tolist()
        labels = [floatToGoString(b) for b in self.bounds.tolist()] + ["+Inf"]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=list(zip(labels, cumulative)),
                                    sum_value=self.sum)


class _CacheCollector:
    COUNTED = ("hits", "extends", "misses", "evictions")

    def __init__(self, caches: Callable[[], Iterable]) -> None:
        self.caches = caches
        self.retired = dict.fromkeys(self.COUNTED, 0)

    def _sum(self, stat: str) -> int:
        return self.retired[stat] + sum(c.stats[stat] for c in self.caches())

    def collect(self):
        looked = CounterMetricFamily("scenestream_encoder_cache_lookups", "Windows looked up in the encoder's cache, "
                                     "by outcome: hit (unchanged), extend (only new events encoded), miss (encoded "
                                     "whole)", labels=["outcome"])
        for outcome, stat in (("hit", "hits"), ("extend", "extends"), ("miss", "misses")):
            looked.add_metric([outcome], self._sum(stat))
        yield looked
        yield CounterMetricFamily("scenestream_encoder_cache_evictions", "Cached windows dropped for room",
                                  value=self._sum("evictions"))
        yield GaugeMetricFamily("scenestream_encoder_cache_bytes", "Bytes the cache's entries hold (its budget is "
                                "preallocated)", value=sum(len(c) * c.entry_bytes() for c in self.caches()))
        yield GaugeMetricFamily("scenestream_encoder_cache_windows", "Windows cached ((user, scene) windows and timelines)",
                                value=sum(len(c) for c in self.caches()))


class _StateCollector:
    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        yield GaugeMetricFamily("scenestream_state_users_in_memory", "Users whose windows are in memory (with "
                                "--state rocksdb the rest are on disk)", value=self.store.in_memory())
        yield CounterMetricFamily("scenestream_state_disk_loads", "Users read back from disk when touched",
                                  value=self.store.stats["loads"])
        yield CounterMetricFamily("scenestream_state_evictions", "Users dropped from memory (cap or idle TTL); "
                                  "their windows stay on disk", value=self.store.stats["evictions"])
