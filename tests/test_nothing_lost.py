"""Holes in "nothing lost", each shown on the code before its fix: poison records, a changelog that expires, gaps
read short, outputs lost after durable state, a partition given back during a batch, keys that disagree with the
user, timestamps in the future, conflicting copies of one event, popularity that counts twice, a worker without a
broker. Pure parts are tested alone; the rest against the real embedded broker and real worker processes."""
from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import subprocess
import sys
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from hypothesis import given, settings
from hypothesis import strategies as st

from scenestream.model.checkpoint import load_checkpoint
from scenestream.model.infer import InterestEncoder
from scenestream.stream.live.catalog import decode_update
from scenestream.stream.core.config import StreamConfig
from scenestream.stream.core.events import REASONS, Event, Rejection, check_key, decode, encode
from scenestream.stream.core.window import EMPTY, Window, apply_window
from scenestream.stream.live.produce import produce_lines
from scenestream.stream.live.changelog import encode_state
from scenestream.stream.live.reading import read_range
from scenestream.stream.live.record import Record, dead_letter
from scenestream.stream.live.service import MicroBatchService
from scenestream.stream.live.state import CHANGELOG_CONFIG, ChangelogStore
from scenestream.stream.live.topics import ensure_topic

from .conftest import run
from .faults import FIRED
from .test_api import get, metric_values, wait_ready
from .test_state import write
from .test_worker import assert_equal_records, offline_records, read_topic, stream_of, wait_for

CFG = StreamConfig()
TS = 1_767_225_600_000


# ---- 1. one record must never stop a worker -----------------------------------------------------------------------

def test_a_dead_letter_fits_whatever_the_payload():
    """Before: the whole payload went into the dead letter as JSON text; 175 KB of 0xFF became a 1,050,011-byte
    record, over the producer's 1 MiB limit, and the worker crashed on it forever."""
    raw = b"\xff" * 175_000
    rejection = decode(raw, CFG)
    assert isinstance(rejection, Rejection)
    key, value = dead_letter(Record("clicks", 3, 17, b"k" * 100_000, raw, TS), rejection)
    letter = json.loads(value)
    assert len(value) < 64 * 1024 and len(key) <= 64
    assert letter["raw_size"] == 175_000 and letter["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    assert letter["raw"].encode("latin-1") == raw[:len(letter["raw"])] and letter["raw_truncated"]
    assert (letter["reason"], letter["topic"], letter["partition"], letter["offset"]) == ("oversized", "clicks", 3, 17)
    small = b'{"user_id": 1}'
    key, value = dead_letter(Record("clicks", 0, 1, b"u1", small, TS), decode(small, CFG))
    assert json.loads(value)["raw"].encode("latin-1") == small and key == b"u1"
    assert not json.loads(value)["raw_truncated"]


HOSTILE_CATALOG = [
    b'{"item_id": "x", "scene": "video", "vector": [1e39, 0, 0, 0]}',   # finite in float64, inf in float32
    b'{"item_id": "x", "scene": "video", "vector": [' + b"1" + b"0" * 400 + b', 0, 0, 0]}',   # 10**400
    b'{"item_id": "x", "scene": "video", "vector": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # too deep
    b'{"item_id": "x", "scene": {"a": 1}}', b'{"item_id": ["x"], "scene": "video"}', b"\x00\xff" * 10,
]


@pytest.mark.parametrize("raw", HOSTILE_CATALOG)
def test_a_hostile_catalog_record_is_refused_with_a_reason(raw):
    """Before: these raised out of the catalog follower (OverflowError, RecursionError) or were indexed as inf,
    and every worker, replaying the catalog topic at start, crash-looped."""
    got = decode_update(raw, CFG, 4)
    assert isinstance(got, Rejection) and got.reason != "decoder_error" and got.detail


def test_no_state_record_can_outgrow_the_changelog():
    """Ids are capped in bytes, and the configuration is refused when scenes x window could make a user's state
    record larger than the changelog accepts. Before: 6 scenes x 98 events of long ids passed 1 MiB (as JSON)."""
    worst_id = '"' * CFG.max_id_bytes   # ids and items at the byte limit
    config = StreamConfig(scenes=tuple(f"s{n}" for n in range(6)), window=98)
    state = {s: Window.of(Event(f"{worst_id[:-3]}{k:03d}", "u", worst_id, s, "click", config.ts_max_ms)
                          for k in range(98)) for s in config.scenes}
    assert len(encode_state(state)) <= config.state_record_bound() <= config.max_state_bytes <= 1_000_000
    astral = "😀" * 64   # 64 characters, 256 bytes: within both limits
    assert isinstance(decode(encode(Event(astral, astral, astral, "video", "click", TS)), CFG), Event)
    assert decode(encode(Event("e", "😀" * 65, "i", "video", "click", TS)), CFG).reason == "too_long"
    with pytest.raises(ValueError, match="state record"):
        StreamConfig(scenes=tuple(f"s{n}" for n in range(20)), window=98)


# ---- 2. the changelog never expires -------------------------------------------------------------------------------

async def _topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (resp,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        return {e[0]: e[1] for e in resp.resources[0][4]}
    finally:
        await admin.close()


def test_the_changelog_is_created_compacted_and_an_existing_wrong_one_is_reported(broker):
    """Checked with the admin client's DescribeConfigs, which the embedded Tansu answers with the topic's configs."""
    topic = f"cl-{uuid.uuid4().hex[:8]}"
    assert run(ensure_topic(broker.bootstrap, topic, 4, 1, CHANGELOG_CONFIG)) == []
    got = run(_topic_config(broker.bootstrap, topic))
    assert got["cleanup.policy"] == "compact" and got["retention.ms"] == "-1"
    assert run(ensure_topic(broker.bootstrap, topic, 4, 1, CHANGELOG_CONFIG)) == []     # exists, right: silent

    async def plain(name):
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(name, 2, 1)])
        await admin.close()
    wrong = f"cl-{uuid.uuid4().hex[:8]}"
    run(plain(wrong))
    problems = run(ensure_topic(broker.bootstrap, wrong, 4, 1, CHANGELOG_CONFIG))
    assert any("cleanup.policy" in p for p in problems) and any("partitions" in p for p in problems)


# ---- 3. the gap re-read reads to the end or fails ------------------------------------------------------------------

async def _produce_n(bootstrap, topic, n, start=0):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for k in range(start, start + n):
            await producer.send(topic, f"m{k}".encode(), partition=0)
        await producer.flush()
    finally:
        await producer.stop()


def test_the_gap_is_read_to_its_last_offset_through_empty_fetches_in_pages(broker):
    """Before: the re-read returned at the first empty 2-second fetch (a slow broker, a leader election), the
    marker moved past events never applied. Here the second half of the range arrives 3 s late."""
    topic = f"gap-{uuid.uuid4().hex[:8]}"

    async def scenario():
        await _produce_n(broker.bootstrap, topic, 300)
        pages = []

        async def read():
            async for page in read_range(broker.bootstrap, topic, 0, 0, 599, page=128, deadline_s=60):
                pages.append(page)
        reader = asyncio.create_task(read())
        await asyncio.sleep(3.0)
        await _produce_n(broker.bootstrap, topic, 400, start=300)
        await reader
        return pages
    pages = run(scenario())
    assert [m.offset for p in pages for m in p] == list(range(600))
    assert max(len(p) for p in pages) <= 128


def test_a_gap_that_never_arrives_fails_loudly(broker):
    topic = f"gap-{uuid.uuid4().hex[:8]}"

    async def scenario():
        await _produce_n(broker.bootstrap, topic, 10)
        async for _ in read_range(broker.bootstrap, topic, 0, 0, 99, deadline_s=3):
            pass
    with pytest.raises(TimeoutError, match="offset 99"):
        run(scenario())


# ---- 4 and 5: outputs before state; a partition given back mid-batch ----------------------------------------------

async def handle(service: MicroBatchService, records) -> None:
    """One micro-batch, returning once it is durable."""
    await (await service.submit(records))


def _records(topic, events, partition=0, first_offset=0, key=None):
    return [Record(topic, partition, first_offset + n, key if key is not None else e.user_id.encode(), encode(e),
                   int(time.time() * 1000)) for n, e in enumerate(events)]


def _slow_first_send(service, seconds) -> asyncio.Event:
    """The service's first send to the broker (a batch's outputs) waits `seconds`: the batch stays in flight,
    applied and encoded but nothing of it durable, so a rebalance can land meanwhile. Returns an event set once
    that send has begun."""
    real = service.store.producer.send_batch
    started = asyncio.Event()

    async def send_batch(batch, topic, **kw):
        if not started.is_set():
            started.set()
            await asyncio.sleep(seconds)
        return await real(batch, topic, **kw)
    service.store.producer.send_batch = send_batch
    return started


async def _service(broker, checkpoint, slow=0.0):
    encoder = InterestEncoder(load_checkpoint(checkpoint))
    name = uuid.uuid4().hex[:8]
    topics = {"clicks": f"{name}-clicks", "out": f"{name}-out", "dlq": f"{name}-dlq", "changelog": f"{name}-cl"}
    await ensure_topic(broker.bootstrap, topics["changelog"], 1, 1, CHANGELOG_CONFIG)
    store = ChangelogStore(broker.bootstrap, topics["changelog"], encoder.scenes, encoder.window)
    service = MicroBatchService(encoder, store, topics["out"], topics["dlq"], broker.bootstrap)
    await service.assign({0})
    service.slow_send_started = _slow_first_send(service, slow) if slow else None
    return service, topics


def test_a_partition_given_back_during_a_batch_keeps_the_newer_state(broker, checkpoint):
    """Before: the ownership check asked only whether the partition was assigned, so a partition revoked and given
    back while the batch was in flight got state computed from the old base written over the state recovered
    meanwhile (here, an event another worker applied). The windows are a lattice, so what must not happen now is
    the batch's record (computed from the old base) becoming the one the API serves for the user."""
    mine = Event("mine", "u1", "v0-00001", "video", "click", TS)
    theirs = Event("theirs", "u1", "v0-00002", "video", "click", TS + 1)

    async def scenario():
        service, topics = await _service(broker, checkpoint, slow=2.0)
        batch = asyncio.create_task(handle(service, _records(topics["clicks"], [mine])))
        await service.slow_send_started.wait()        # the batch is sending its outputs now
        service.revoke({0})
        other = ChangelogStore(broker.bootstrap, topics["changelog"], service.encoder.scenes, service.encoder.window)
        await other.start()
        await other.ensure(0)
        await asyncio.gather(*await write(other, 0, {"u1": {"video": Window.of([theirs])}}, applied_offset=0))
        await other.stop()
        await service.assign({0})
        await batch
        state = service.state_of("u1")
        served, _ = await service.user_record("u1")
        await service.stop()
        restarted = ChangelogStore(broker.bootstrap, topics["changelog"], service.encoder.scenes, service.encoder.window)
        await restarted.start()
        await restarted.ensure(0)
        durable = restarted.get(0, "u1")
        await restarted.stop()
        return state, served, durable
    state, served, durable = run(scenario())
    assert theirs in state["video"].events("u1") and theirs in durable["video"].events("u1")
    assert served["newest_ts"] == theirs.ts


def test_a_partition_revoked_while_its_gap_waits_is_left_to_its_new_owner(broker, checkpoint):
    """Before: a batch that starts past the durable marker waits for the batches before it, then re-read the gap of
    a partition revoked meanwhile: KeyError, and the worker exited (seen under bench/chaos.py's kills)."""
    first = [Event(f"a{n}", "u1", "v0-00001", "video", "click", TS + n) for n in range(3)]
    after_gap = [Event("after-gap", "u2", "v0-00002", "video", "click", TS + 10)]

    async def scenario():
        service, topics = await _service(broker, checkpoint, slow=2.0)
        one = await service.submit(_records(topics["clicks"], first))    # in flight for 2 s
        asyncio.ensure_future(service.slow_send_started.wait()).add_done_callback(
            lambda _: service.revoke({0}))                                # a rebalance, meanwhile
        two = await service.submit(_records(topics["clicks"], after_gap, first_offset=10))   # 3..9: a gap
        await asyncio.gather(one, two)
        held = service.assigned, service.state_of("u2")
        await service.stop()
        return held
    assigned, state = run(scenario())
    assert assigned == set() and state is None


def test_pipelined_batches_publish_in_order_and_become_durable_one_after_another(broker, checkpoint):
    """The next micro-batch is applied and encoded while the one before is still in flight. Outputs go in batch
    order, each batch's after the one before has its outputs acknowledged, even while that one's state is still on
    its way; state goes in batch order, each batch's after its own outputs are acknowledged and the batch before is
    durable. The producer is the real one, watched, with the first batch's outputs and state each slow to leave."""
    first = [Event(f"a{n}", f"u{n % 3}", f"v0-0000{n % 4}", "video", "click", TS + n) for n in range(6)]
    second = [Event(f"b{n}", f"u{n % 4}", f"v0-0000{n % 3}", "video", "click", TS + 100 + n) for n in range(6)]

    async def scenario():
        service, topics = await _service(broker, checkpoint)
        await service.store.start()
        sent = []   # [topic, records, sent at, acknowledged at]
        real_send = service.store.producer.send_batch

        async def watched(batch, topic, **kw):
            if topic not in {t for t, *_ in sent}:
                await asyncio.sleep(1.0)   # the first outputs, and the first state, are slow to leave
            entry = [topic, batch.record_count(), time.monotonic(), None]
            sent.append(entry)
            acked = await real_send(batch, topic, **kw)
            acked.add_done_callback(lambda _: entry.__setitem__(3, time.monotonic()))
            return acked
        service.store.producer.send_batch = watched
        records = _records(topics["clicks"], first + second)
        one = await service.submit(records[:6])
        stamps = []
        one.add_done_callback(lambda _: stamps.append(time.monotonic()))   # runs before anything awaiting it
        two = await service.submit(records[6:])
        applied_early = service.store.applied[0]          # both applied in memory, neither durable yet
        durable_early = one.done() or two.done()
        await two
        await service.stop()
        return topics, sent, applied_early, durable_early, stamps[0]
    topics, sent, applied_early, durable_early, one_done = run(scenario())
    assert applied_early == 11 and not durable_early
    # outputs spread over the output topic's partitions: the first 3 records are the first batch's 3 users
    outputs = [e for e in sent if e[0] == topics["out"]]
    states = [e for e in sent if e[0] != topics["out"]]
    cut = next(i for i in range(len(outputs) + 1) if sum(e[1] for e in outputs[:i]) == 3)
    out_one, out_two = outputs[:cut], outputs[cut:]
    assert sum(e[1] for e in out_two) == 4
    assert [e[1] for e in states] == [4, 5]            # each batch's windows and marker, first batch first
    out_one_acked = max(e[3] for e in out_one)
    assert states[0][2] >= out_one_acked               # state after its own outputs
    assert min(e[2] for e in out_two) >= out_one_acked  # outputs in batch order
    assert min(e[2] for e in out_two) < one_done       # ... not behind the first batch's state
    assert states[1][2] >= one_done and states[1][2] >= max(e[3] for e in out_two)


def test_heap_freezes_what_has_piled_up_and_not_young_garbage():
    """stream/live/heap.py: once the oldest generation holds `freeze_over` objects they are frozen (never walked by
    a collection again), at most once per `check_every_s`; a reference cycle that is already garbage is collected
    first, not frozen for good; and below the count nothing is frozen."""
    import weakref

    from scenestream.stream.live.heap import FrozenHeap

    class Node:
        pass

    gc.unfreeze()
    gc.collect()
    try:
        heap = FrozenHeap(freeze_over=len(gc.get_objects(generation=2)) + 20_000, check_every_s=3600)
        heap.settle()
        assert gc.get_freeze_count() == 0                                # not enough piled up
        heap._checked_at = float("-inf")
        kept = [[k] for k in range(30_000)]                              # long-lived objects ...
        gc.collect()                                                     # ... now in the oldest generation
        cycle = Node()
        cycle.me = cycle
        dead = weakref.ref(cycle)
        del cycle                                                        # young garbage, a cycle
        heap.settle()
        frozen = gc.get_freeze_count()
        assert frozen >= 30_000
        assert len(gc.get_objects(generation=2)) < 1_000
        assert dead() is None                                            # collected, not frozen
        more = [[k] for k in range(30_000)]
        gc.collect()
        heap.settle()
        assert gc.get_freeze_count() == frozen                           # checked at most once an interval
        del kept, more
    finally:
        gc.unfreeze()
        gc.collect()


def test_batches_leave_no_cyclic_garbage_behind(broker, checkpoint):
    """The heap is frozen from time to time (stream/live/heap.py: what is frozen is never walked again), which would
    leak any reference cycle alive at that moment once it became garbage; and any cycle costs collections. So a
    batch must not leave cycles: with the collector off, 30 batches after the first (whose lazy imports, numpy.ma's
    for one, leave some once) leave nothing for a full collection to find."""
    async def scenario():
        service, topics = await _service(broker, checkpoint)
        try:
            for b in range(31):
                if b == 1:
                    gc.collect()
                    gc.disable()
                events = [Event(f"g{b}-{k}", f"u{k % 20}", f"v0-0000{k % 4}", "video", "click", TS + 1000 * b + k)
                          for k in range(40)]
                await handle(service, _records(topics["clicks"], events, first_offset=40 * b))
            gc.unfreeze()
            found = gc.collect()
        finally:
            gc.enable()
        await service.stop()
        return found
    assert run(scenario()) == 0


def test_redelivery_and_recovery_do_not_inflate_popularity(broker, checkpoint):
    """Popularity counts the events in the windows a worker holds. Before: every re-delivery and every recovery of
    a partition added its events again."""
    events = [Event(f"p{n}", f"u{n % 3}", f"v0-0000{n % 4}", "video", "click", TS + n) for n in range(12)]

    async def scenario():
        service, topics = await _service(broker, checkpoint)
        records = _records(topics["clicks"], events)
        await handle(service, records)
        first = dict(service.popularity.own.count_of("video"))
        await handle(service, records)                  # re-delivered after a crash
        service.revoke({0})
        await service.assign({0})                      # given back: recovered from the changelog
        await handle(service, records[:5])
        again = dict(service.popularity.own.count_of("video"))
        await service.stop()
        return first, again
    first, again = run(scenario())
    want = {}
    for e in events:
        want[e.item_id] = want.get(e.item_id, 0) + 1
    assert first == want and again == want


# ---- 6, 7: the key is the user; no events from the future ----------------------------------------------------------

def test_the_key_must_be_the_user():
    e = Event("e", "u1", "i", "video", "click", TS)
    assert check_key(b"u1", e) is None
    for key in (None, b"", b"u2", "u1".encode("utf-16")):
        assert check_key(key, e).reason == "key_mismatch"


def test_an_event_from_the_future_is_refused():
    now = int(time.time() * 1000)
    raw = encode(Event("e", "u", "i", "video", "click", now + 2 * 3_600_000))
    assert decode(raw, CFG, not_after_ms=now + 3_600_000).reason == "ts_in_future"
    assert isinstance(decode(raw, CFG), Event)            # offline logs have no arrival time to compare with
    assert isinstance(decode(raw, CFG, not_after_ms=now + 3 * 3_600_000), Event)
    assert {"key_mismatch", "ts_in_future"} <= set(REASONS)


# ---- 8: one copy of an event wins whatever the batches ------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.sampled_from(["view", "click"]),
                          st.integers(0, 8)), min_size=1, max_size=25),
       st.integers(1, 5), st.randoms(use_true_random=False))
def test_conflicting_copies_of_an_event_id_resolve_the_same_in_any_batches(rows, length, rnd):
    """Two payloads with one event_id and different content. Before: across batches the first to arrive won,
    within a batch the preferred one: the window depended on batch boundaries."""
    events = [Event(f"e{n}", "u", f"i{item}", "video", action, TS + ts) for n, item, action, ts in rows]
    best = {}
    for e in events:
        if e.event_id not in best or (e.ts, e.item_id, e.action) > (best[e.event_id].ts, best[e.event_id].item_id,
                                                                   best[e.event_id].action):
            best[e.event_id] = e
    want = Window.of(sorted(best.values(), key=lambda e: e.order_key)[-length:])
    rnd.shuffle(events)
    window, pos = EMPTY, 0
    while pos < len(events):
        size = rnd.randint(1, len(events) - pos)
        window, _ = apply_window(window, events[pos:pos + size], length)
        pos += size
    assert window == want


def test_a_worker_outside_run_needs_a_broker(checkpoint, tmp_path):
    """Before: without --broker the worker quietly started a memory-only embedded broker (the Dockerfile did),
    and a production deployment lost everything at each restart."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "SCENESTREAM_BROKER"}
    proc = subprocess.run([sys.executable, "-m", "scenestream.stream.cli", "worker", "--checkpoint", str(checkpoint),
                           "--web-port", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "--broker" in proc.stderr and "Traceback" not in proc.stderr


# ---- the whole of it on a real worker -----------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_poison_in_the_stream_and_the_catalog_stops_no_worker(broker, checkpoint, worker_factory):
    """A peer's 175 KB non-UTF-8 click, a click keyed by another user, one dated next year, malformed events, and
    three hostile catalog records: the worker stays up (and starts again over the same topics), every valid event
    is applied exactly as offline replay applies it, every rejection is counted with its reason, and the changelog
    the worker created is compacted with infinite retention."""
    events, lines, bad = stream_of(3000, 100, seed=31)
    victim = events[len(events) // 2].user_id
    future = Event("from-the-future", victim, events[0].item_id, events[0].scene, "click",
                   int(time.time() * 1000) + 365 * 86_400_000)
    stolen = Event("wrong-key", victim, events[1].item_id, events[1].scene, "click", events[-1].ts)
    w = worker_factory().start()
    wait_ready(w)

    async def send_poison():
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_request_size=4 << 20)
        await producer.start()
        try:
            await producer.send_and_wait(w.topics["clicks"], b"\xff" * 175_000, key=victim.encode())
            await producer.send_and_wait(w.topics["clicks"], encode(future), key=victim.encode())
            await producer.send_and_wait(w.topics["clicks"], encode(stolen), key=b"somebody-else")
            for raw in HOSTILE_CATALOG[:3]:
                await producer.send_and_wait(w.topics["catalog"], raw, key=b"x")
            await producer.send_and_wait(w.topics["catalog"], json.dumps(
                {"item_id": "fine-item", "scene": "video"}).encode(), key=b"fine-item")
        finally:
            await producer.stop()
    run(send_poison())
    half = len(lines) // 2
    run(produce_lines(broker.bootstrap, w.topics["clicks"], lines[:half], progress=False))
    run(produce_lines(broker.bootstrap, w.topics["clicks"], lines[half:], progress=False))
    want = offline_records(checkpoint, events)
    assert_equal_records(wait_for(broker, w.topics["out"], want), want)
    assert w.proc.poll() is None, w.log_text()
    metrics = metric_values(get(w.api + "/metrics")[1].decode())
    assert metrics["scenestream_events_invalid_total{reason=oversized}"] == 1
    assert metrics["scenestream_events_invalid_total{reason=ts_in_future}"] == 1
    assert metrics["scenestream_events_invalid_total{reason=key_mismatch}"] == 1
    assert sum(v for k, v in metrics.items() if k.startswith("scenestream_events_invalid_total{")) == len(bad) + 3
    assert metrics["scenestream_catalog_records_total{outcome=rejected}"] == 3
    letters = [json.loads(m.value) for m in run(read_topic(broker.bootstrap, w.topics["dlq"]))]
    assert len(letters) == len(bad) + 3 and all(d["reason"] in REASONS for d in letters)
    config = run(_topic_config(broker.bootstrap, f"{w.app_id}-state-changelog"))
    assert config["cleanup.policy"] == "compact" and config["retention.ms"] == "-1"
    # a restart replays the same catalog topic and resumes the same clicks partitions: it comes up and serves
    w.kill()
    w.start()
    wait_ready(w)
    assert get(w.api + "/readyz")[1]["items"] >= 1 and w.proc.poll() is None
    extra = Event("after-restart", victim, events[2].item_id, events[2].scene, "view", events[-1].ts + 5)
    run(produce_lines(broker.bootstrap, w.topics["clicks"], [encode(extra)], progress=False))
    want = offline_records(checkpoint, events + [extra])
    assert_equal_records(wait_for(broker, w.topics["out"], want), want)


@pytest.mark.timeout(600)
def test_outputs_are_durable_before_the_state_that_produced_them(broker, checkpoint, worker_factory):
    """A crash after the changelog acknowledged a batch's state but before its output records were acknowledged.
    Before: the restarted worker found the re-delivered events already in state, changed nothing, and published
    nothing: those users' records were lost. The fault (tests/faults.py) holds output records back forever and
    kills the worker when a state write is acknowledged: a worker that writes state first dies of it, and its
    restart misses the outputs; one that waits for its outputs never writes the state, and is killed here."""
    events, lines, _ = stream_of(600, 0, seed=32)
    w = worker_factory()
    run(produce_lines(broker.bootstrap, w.topics["clicks"], lines, progress=False))   # one micro-batch
    w.start(fault="outputs_lost_in_flight")
    deadline = time.monotonic() + 60
    while FIRED not in w.log_text(tail=None) and w.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert FIRED in w.log_text(tail=None), "the fault never held back an output: it guards nothing"
    try:
        w.proc.wait(10)          # time enough to write the state, for a worker that would
    except subprocess.TimeoutExpired:
        pass
    w.kill()                     # the fault killed it, or the worker is stuck awaiting outputs: kill it either way
    w.start()
    want = offline_records(checkpoint, events)
    assert_equal_records(wait_for(broker, w.topics["out"], want, timeout=90), want)
