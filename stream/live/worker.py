"""The live worker: a thin Faust shell around the clicks feeder and the micro-batch service that replay's step also runs.

    clicks --ClicksFeeder (getmany)--> MicroBatchService.handle --> user-interests, clicks-dlq, then the changelog
    item-catalog --CatalogFollower--> the item index          HTTP views (web.py) --> recommend.py
    the counters, every second --> LiveStats (live_stats.py) --> the live page at / (web.py)
    the checkpoint folder --ModelWatcher (swap.py), every --model-poll s--> a new encoder and index, swapped as one
    each held partition's popularity --> <app-id>-popularity --> every worker's popular fallback

The feeder (feeder.py) is the consumer group member; Faust gives the web server, timers, the producer of declared
topics and the lifecycle; the service does the work. This module only wires them together and says what a crash
does (exit, so a restart recovers from durable state: the design is crash-only), and what a broker that stops
answering does (BrokerWatch: /readyz answers 503 while aiokafka retries; past --broker-outage-limit, exit).
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import faust
from faust.app.base import BootStrategy

from scenestream.index import IndexSpec, ItemIndex, load_index
from scenestream.model.infer import InterestEncoder

from .catalog import CATALOG_CONFIG, CatalogFollower
from .live_stats import LiveStats, snapshot
from .metrics import WorkerMetrics
from .feeder import ClicksFeeder
from .rekey import Rekeyer
from .config import HEARTBEAT_INTERVAL_S, REBALANCE_TIMEOUT_S, SESSION_TIMEOUT_S, WorkerConfig, bootstrap_servers, \
    is_loopback
from .kafka_security import NO_SECURITY
from .service import MicroBatchService
from .shared_popularity import POPULARITY_CONFIG
from .state import CHANGELOG_CONFIG, ChangelogStore
from .topics import ensure_topic, partition_count
from .swap import ModelWatcher, load_model
from .web import register as register_web

log = logging.getLogger(__name__)

BROKER_STALE_S = 5.0   # seconds without an answer from the broker before /readyz says so
EXIT_CRASH, EXIT_BROKER_OUTAGE = 70, 69   # sysexits: EX_SOFTWARE, EX_UNAVAILABLE


def open_index(cfg: WorkerConfig, encoder: InterestEncoder) -> ItemIndex:
    """The saved index at cfg.index_path (refused unless built for this model), else one built from the model."""
    if cfg.index_path:
        return load_index(cfg.index_path, encoder.version)
    return ItemIndex.build(*encoder.item_vectors(), spec=IndexSpec(kind=cfg.index_kind))


def faust_settings(cfg: WorkerConfig) -> dict:
    """The worker's faust.App keyword settings (also what bench/live.py's no-op agent runs with). The worker's own
    consumers (the feeder, the re-keying stage) are not Faust's, whose consumer is off (`_Boot`); the group timeouts
    here are theirs (config.py), for an app that does consume through Faust, as bench/live.py's no-op agent."""
    # topic_disable_leader only saves a topic. Faust makes an (empty, with the memory store) `<app id>-data` folder
    # for its tables; it holds nothing of ours, so it goes under the system temp folder rather than into whatever
    # folder the worker was started from
    return dict(
        broker=cfg.broker, broker_credentials=cfg.security.faust_credentials(), store="memory://", autodiscover=False,
        datadir=os.path.join(tempfile.gettempdir(), f"scenestream-faust-{cfg.app_id}"),
        topic_partitions=cfg.partitions, topic_disable_leader=True,
        consumer_auto_offset_reset="earliest", producer_acks=-1,
        broker_session_timeout=SESSION_TIMEOUT_S, broker_heartbeat_interval=HEARTBEAT_INTERVAL_S,
        broker_rebalance_timeout=REBALANCE_TIMEOUT_S, broker_commit_interval=1.0, stream_wait_empty=False,
        web_host=cfg.web_host, web_port=cfg.web_port, web_bind=cfg.web_host, canonical_url=cfg.url,
    )


class _Boot(BootStrategy):
    enable_kafka_consumer = False   # clicks come through the feeder; Faust gives the web server, timers, producer


class _App(faust.App):
    BootStrategy = _Boot


def make_app(cfg: WorkerConfig, encoder: InterestEncoder, index: Optional[ItemIndex] = None
             ) -> tuple[faust.App, MicroBatchService]:
    app = _App(cfg.app_id, **faust_settings(cfg))
    metrics = WorkerMetrics()
    index = index if index is not None else open_index(cfg, encoder)
    security = cfg.security.client_kwargs()
    store = ChangelogStore(cfg.bootstrap, cfg.changelog, encoder.scenes, encoder.window, security,
                           state_dir=cfg.state_dir if cfg.state == "rocksdb" else None,
                           max_users=cfg.max_users_in_memory, idle_s=cfg.idle_user_ttl, compression=cfg.compression)
    service = MicroBatchService(encoder, store, cfg.output_topic, cfg.dlq_topic, cfg.bootstrap, metrics,
                                max_clock_skew_s=cfg.max_clock_skew, index=index, isolation_level=cfg.isolation_level,
                                output_format=cfg.output_format)
    metrics.watch_cache(lambda: service.model.streamer.pools)
    metrics.watch_state(service.store)
    metrics.model.info({"version": encoder.version})
    feeder = ClicksFeeder(service, cfg.bootstrap, cfg.feed_topic, cfg.app_id, cfg.url, cfg.batch_max,
                          cfg.batch_wait, fetch_wait=cfg.fetch_wait, isolation_level=cfg.isolation_level,
                          security=security)
    catalog = CatalogFollower(cfg.bootstrap, cfg.catalog_topic, index, service.config, index.dim,
                              count=lambda outcome, n: metrics.catalog.labels(outcome).inc(n), security=security,
                              isolation_level=cfg.isolation_level)
    # a saved --index belongs to the start model: a swapped-in model's index is built with --index-kind
    watcher = ModelWatcher(cfg.checkpoint, service, catalog, metrics,
                           lambda path: load_model(path, service.model.encoder, cfg.index_kind))

    broker = BrokerWatch(cfg.broker, (feeder.answered_at, catalog.answered_at), cfg.broker_outage_limit)

    @app.task
    async def feed():   # crash-only: a failed batch is neither durable nor committed; a restart redoes it
        await or_crash(feeder.run(), "the clicks feeder", broker)

    rekeyer = None
    if cfg.rekey:
        rekeyer = Rekeyer(cfg.bootstrap, cfg.clicks_topic, cfg.feed_topic, f"{cfg.app_id}-rekey", cfg.dlq_topic,
                          service.config, cfg.batch_max, cfg.isolation_level, cfg.compression, security)

        @app.task
        async def rekey():   # crash-only, as the feeder: what it had not committed is re-keyed again
            await or_crash(rekeyer.run(), "the re-keying stage", broker)

    @app.on_before_shutdown.connect
    async def on_shutdown(app, **kwargs):   # finish the batch in flight, leave the group, then close
        if rekeyer is not None:
            rekeyer.stop()
        broker.stop()
        catalog.stop()
        watcher.stop()
        await feeder.stop()
        await service.stop()

    live = LiveStats(metrics.latency.bounds.tolist())
    register_web(app, service, live, feeder.owner_url, cfg.url, lambda: catalog.caught_up, cfg.api_token,
                 cfg.rate_limit, broker_problem=broker.problem)
    if not cfg.api_token and not is_loopback(cfg.web_host):
        log.warning("the API listens on %s with no token: anyone who reaches the port reads every user's "
                    "interests; set SCENESTREAM_API_TOKEN (docs/operations.md, Security)", cfg.web_host)

    if cfg.checkpoint and cfg.model_poll > 0:
        @app.task
        async def watch_model():   # never crashes: a checkpoint it cannot serve is refused and logged
            await watcher.run(cfg.model_poll)

    log.info("worker %s consuming %s on %s%s", cfg.app_id, cfg.clicks_topic, cfg.broker,
             f", re-keyed into {cfg.feed_topic}" if cfg.rekey else "")

    @app.task
    async def follow_catalog():   # a restart rebuilds the index from the catalog topic
        await or_crash(catalog.run(), "the catalog follower", broker)

    @app.task
    async def follow_popularity():   # every worker sums the same latest counts per partition
        await or_crash(service.popularity.follow(cfg.popularity_topic), "the popularity follower", broker)

    @app.timer(interval=cfg.popularity_interval)
    async def share_popularity():   # each held partition's counts, when they changed
        await service.popularity.publish(service.store.producer, cfg.popularity_topic)

    @app.timer(interval=1.0)
    async def watch_broker():   # logs an outage once, its end once; exits past --broker-outage-limit
        broker.check()

    @app.timer(interval=1.0)
    async def sample():   # the consumer lag, and the live page's sample of the counters (live_stats.py)
        lag = 0
        for p in service.assigned:
            end = feeder.highwater(p)
            if end is not None:
                behind = max(0, end - 1 - service.store.durable.get(p, -1))
                metrics.lag.labels(str(p)).set(behind)
                lag += behind
        live.add(snapshot(metrics, lag, time.time()))

    @app.timer(interval=5.0)
    async def report():
        service.store.trim()   # idle users leave memory even when no batch comes
        log.info("events %(events)d invalid %(invalid)d late %(late_dropped)d published %(published)d "
                 "batches %(batches)d re-read %(reread)d", service.counts)

    return app, service


class BrokerWatch:
    """When the broker last answered this worker, from what its consumers note anyway (aiokafka's time of each fetch
    response per partition, the feeder's durable batches): no requests of its own, nothing per event. `sources`
    give time.time() of their last answer, or None when they have nothing to say (no partitions held); the newest
    counts, so a consumer idle for its own reasons (a full buffer) does not look like an outage.

    Past `stale_s` seconds of silence /readyz answers 503 with the reason and one warning is logged; aiokafka keeps
    retrying, and the first answer makes the worker ready again. Past `limit_s` the worker exits with code 69 and
    one error line: a restart recovers from durable state once the broker is back (crash-only)."""

    def __init__(self, broker: str, sources: Sequence[Callable[[], Optional[float]]], limit_s: float,
                 stale_s: float = BROKER_STALE_S, clock: Callable[[], float] = time.time):
        self.broker, self.sources, self.limit_s, self.stale_s, self.clock = broker, sources, limit_s, stale_s, clock
        self.last = clock()   # the newest answer seen (the start until the first)
        self.outage_since: Optional[float] = None   # while an outage is logged
        self.stopped = False

    def stop(self) -> None:
        """At shutdown: consumers closing are no outage."""
        self.stopped = True

    def last_answer(self) -> float:
        self.last = max([self.last, *(t for t in (source() for source in self.sources) if t is not None)])
        return self.last

    def problem(self) -> Optional[str]:
        """None while the broker answers, else why not (for /readyz)."""
        last = self.last_answer()
        silent = self.clock() - last
        if silent < self.stale_s:
            return None
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last))
        return f"unreachable since {since} ({silent:.0f} s without an answer)"

    def check(self) -> None:
        """Log the start and the end of an outage once each; exit past the limit."""
        if self.stopped:
            return
        last = self.last_answer()
        silent = self.clock() - last
        if silent < self.stale_s:
            if self.outage_since is not None:
                log.info("the Kafka broker %s answers again after %.0f s of silence", self.broker,
                         last - self.outage_since)
                self.outage_since = None
            return
        if self.outage_since is None:
            self.outage_since = last
            log.warning("the Kafka broker %s has not answered for %.0f s; retrying, /readyz answers 503, exit after "
                        "%g s (--broker-outage-limit)", self.broker, silent, self.limit_s)
        if silent >= self.limit_s:
            self.exit(f"the Kafka broker {self.broker} has not answered for {silent:.0f} s "
                      f"(--broker-outage-limit {self.limit_s:g} s)")

    @staticmethod
    def exit(why: str) -> None:
        log.error("%s; exiting (code %d) so that a restart recovers from durable state once it answers", why,
                  EXIT_BROKER_OUTAGE)
        logging.shutdown()
        os._exit(EXIT_BROKER_OUTAGE)


async def or_crash(work, what: str, broker: Optional[BrokerWatch] = None) -> None:
    """Await work; on any failure log it and exit, so that a restart recovers from durable state (crash-only). A
    failure while the broker is silent (an aiokafka request timed out) is the outage, said in one line."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if broker is not None and (problem := broker.problem()) is not None:
            broker.exit(f"{what} failed ({exc!r}): the Kafka broker {broker.broker} is {problem}")
        log.exception("%s failed; exiting so that a restart recovers from durable state", what)
        logging.shutdown()
        os._exit(EXIT_CRASH)


def run_worker(cfg: WorkerConfig, encoder: InterestEncoder, loglevel: str = "info",
               index: Optional[ItemIndex] = None) -> int:
    app, _ = make_app(cfg, encoder, index)
    faust.Worker(app, loglevel=loglevel, console_port=0).execute_from_commandline()
    return 0


async def prepare_topics(cfg: WorkerConfig) -> None:
    """Before the app starts, every topic the worker reads or writes that is missing: the changelog compacted with
    infinite retention, with a partition for every clicks partition (state partition p holds source partition p);
    the catalog and popularity topics compacted; clicks (as producers would find it), its re-keyed copy, the
    outputs and the dead letters with --partitions. An existing topic is never changed: wrong settings are logged
    as warnings; too few changelog partitions stop the worker (its writes would fail on every start)."""
    security = cfg.security.client_kwargs()
    clicks = await partition_count(cfg.bootstrap, cfg.clicks_topic, security)
    if clicks is None:   # created as producers would find it; an existing one is theirs and never changed
        await ensure_topic(cfg.bootstrap, cfg.clicks_topic, cfg.partitions, cfg.replication_factor, {}, security)
        clicks = cfg.partitions
    if cfg.rekey:   # the micro-batches read the re-keyed copy: the changelog follows its partitions
        for problem in await ensure_topic(cfg.bootstrap, cfg.feed_topic, cfg.partitions, cfg.replication_factor, {},
                                          security):
            log.warning("%s", problem)
        clicks = await partition_count(cfg.bootstrap, cfg.feed_topic, security) or cfg.partitions
    for topic, partitions, config in ((cfg.changelog, clicks, CHANGELOG_CONFIG),
                                      (cfg.catalog_topic, cfg.partitions, CATALOG_CONFIG),
                                      (cfg.popularity_topic, 1, POPULARITY_CONFIG),
                                      (cfg.output_topic, cfg.partitions, {}), (cfg.dlq_topic, cfg.partitions, {})):
        for problem in await ensure_topic(cfg.bootstrap, topic, partitions, cfg.replication_factor, config, security):
            log.warning("%s", problem)
    have = await partition_count(cfg.bootstrap, cfg.changelog, security) or 0
    if have < clicks:
        raise RuntimeError(f"the changelog {cfg.changelog} has {have} partitions but {cfg.feed_topic} has {clicks}: "
                           f"add partitions to the changelog (kafka-topics --alter --partitions {clicks})")


def check_reachable(broker: str, security: Mapping[str, Any] = NO_SECURITY, timeout: float = 10.0) -> None:
    """Raise (with aiokafka's reason) unless the broker answers within `timeout` seconds."""
    from aiokafka.admin import AIOKafkaAdminClient

    async def probe():
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(broker), request_timeout_ms=5000, **security)
        await asyncio.wait_for(admin.start(), timeout)
        await admin.close()
    quiet = logging.getLogger("aiokafka")   # its own error line would repeat the reason the caller reports
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        asyncio.run(probe())
    finally:
        quiet.setLevel(level)
