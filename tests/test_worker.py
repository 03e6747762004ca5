"""The live worker against the embedded broker, as real processes: output equals offline replay, dead letters,
crash-and-restart, SIGTERM, startup time, out-of-order and duplicated input."""
from __future__ import annotations

import asyncio
import json
import random
import time

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from scenestream.index import ItemIndex
from scenestream.model.checkpoint import load_checkpoint
from scenestream.model.infer import InterestEncoder
from scenestream.stream.core.events import REASONS, Event, encode
from scenestream.stream.core.output import read_record
from scenestream.stream.offline.logs import LoadedEvents
from scenestream.stream.live.produce import produce_lines
from scenestream.stream.offline.replay import replay
from scenestream.stream.live.changelog import MARKER_KEY
from scenestream.stream.datasets.synthetic import SyntheticSpec, generate, malformed_line

from .conftest import run

pytestmark = pytest.mark.timeout(600)


async def read_topic(bootstrap: str, topic: str, idle: float = 2.0, limit: float = 60.0) -> list:
    """All messages of a topic from the beginning, until `idle` seconds pass with nothing new."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        parts = c.partitions_for_topic(topic)
        for _ in range(50):
            if parts:
                break
            await c._client.force_metadata_update()
            parts = c.partitions_for_topic(topic)
            await asyncio.sleep(0.2)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        out, quiet_since, t0 = [], time.monotonic(), time.monotonic()
        while time.monotonic() - quiet_since < idle and time.monotonic() - t0 < limit:
            got = await c.getmany(timeout_ms=300)
            for msgs in got.values():
                out.extend(msgs)
            if got:
                quiet_since = time.monotonic()
        return out
    finally:
        await c.stop()


def newest_records(msgs) -> dict[str, dict]:
    latest = {}
    for m in sorted(msgs, key=lambda m: (m.partition, m.offset)):
        rec = read_record(m.value)
        latest[rec["user_id"]] = rec
    return latest


def offline_records(checkpoint, events) -> dict[str, dict]:
    """`scenestream replay` over the same valid events: its final records."""
    encoder = InterestEncoder(load_checkpoint(checkpoint), "cpu", cache_mb=0)
    index = ItemIndex.build(*encoder.item_vectors())
    result = replay(LoadedEvents(list(events), encoder.scenes), encoder, index, progress=False,
                    checkpoint_cutoff_ts=0)
    return result.records


def lagging(got: dict, expected: dict) -> list[str]:
    return [u for u, r in expected.items()
            if u not in got or (got[u]["events"], got[u]["newest_ts"]) != (r["events"], r["newest_ts"])]


def wait_for(broker, topic, expected: dict[str, dict], timeout: float = 120.0) -> dict[str, dict]:
    """Poll the output topic until every user's newest record has the expected event count and newest ts."""
    deadline = time.monotonic() + timeout
    got = {}
    while time.monotonic() < deadline:
        got = newest_records(run(read_topic(broker.bootstrap, topic, idle=1.0)))
        if not lagging(got, expected):
            return got
        time.sleep(1.0)
    missing = lagging(got, expected)
    raise AssertionError(f"{len(missing)} of {len(expected)} users never reached the offline state, e.g. "
                         f"{missing[:3]}")


def assert_equal_records(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    worst = 0.0
    for user, w in want.items():
        g = got[user]
        assert (g["events"], g["newest_ts"], set(g["scenes"])) == (w["events"], w["newest_ts"], set(w["scenes"]))
        for s in w["scenes"]:
            worst = max(worst, float(np.abs(np.subtract(g["scenes"][s], w["scenes"][s])).max()))
        for s in w["fused"]:
            worst = max(worst, float(np.abs(np.subtract(g["fused"][s], w["fused"][s])).max()))
        worst = max(worst, float(np.abs(np.subtract(g["global"], w["global"])).max()))
    assert worst <= 1e-5, f"max abs difference {worst}"


def stream_of(n_events: int, n_bad: int, seed: int) -> tuple[list[Event], list[bytes], list[bytes]]:
    """n valid synthetic events (time order) with n_bad malformed lines mixed in."""
    events, _ = generate(SyntheticSpec(users=max(50, n_events // 55), seed=seed))
    events = events[:n_events]
    rng = random.Random(seed)
    bad = [malformed_line(rng, rng.choice(events)) for _ in range(n_bad)]
    lines = [encode(e) for e in events]
    for raw in bad:
        lines.insert(rng.randrange(len(lines) + 1), raw)
    return events, lines, bad


def test_output_equals_replay_and_the_dlq_holds_exactly_the_bad_events(broker, checkpoint, worker_factory):
    events, lines, bad = stream_of(20_000, 500, seed=1)
    w = worker_factory().start()
    run(produce_lines(broker.bootstrap, w.topics["clicks"], lines, progress=False))
    want = offline_records(checkpoint, events)
    got = wait_for(broker, w.topics["out"], want)
    assert_equal_records(got, want)
    dead = run(read_topic(broker.bootstrap, w.topics["dlq"]))
    letters = [json.loads(m.value) for m in dead]
    assert len(letters) == 500
    assert sorted(d["raw"].encode("latin-1") for d in letters) == sorted(bad)
    assert all(d["reason"] in REASONS and d["reason"] != "decoder_error" and d["detail"] for d in letters)
    assert all(d["topic"] == w.topics["clicks"] and d["offset"] >= 0 and d["partition"] >= 0 for d in letters)


def test_out_of_order_and_duplicated_events_give_the_sorted_deduplicated_vectors(broker, checkpoint,
                                                                                 worker_factory):
    events, _, _ = stream_of(3000, 0, seed=2)
    rng = random.Random(2)
    noisy = events + rng.sample(events, 1000)        # duplicated event_ids
    rng.shuffle(noisy)                                # ts out of order
    w = worker_factory(extra=["--output-format", "json"]).start()   # the other tests read the default, binary
    run(produce_lines(broker.bootstrap, w.topics["clicks"], [encode(e) for e in noisy], progress=False))
    want = offline_records(checkpoint, sorted(set(events), key=Event.order_key.fget))
    got = wait_for(broker, w.topics["out"], want)
    assert_equal_records(got, want)
    assert all(isinstance(r["global"], list) for r in got.values())   # read as JSON


@pytest.mark.parametrize("state", ["memory", "rocksdb"])
def test_killed_three_times_the_worker_still_converges_to_replay(broker, checkpoint, worker_factory, tmp_path, state):
    """rocksdb: the state on disk too, with room in memory for 50 of the 200 users, so that users leave memory and
    come back from disk all the time, and each restart recovers from the disk and the changelog's tail."""
    events, lines, _ = stream_of(20_000, 200, seed=3)
    rng = random.Random(3)
    extra = ("--state", "rocksdb", "--state-dir", str(tmp_path / "state"), "--max-users-in-memory", "50") \
        if state == "rocksdb" else ()
    w = worker_factory(extra=extra).start()

    async def produce_and_kill():
        task = asyncio.create_task(produce_lines(broker.bootstrap, w.topics["clicks"], lines, rate=1500,
                                                 progress=False))
        for _ in range(3):
            await asyncio.sleep(rng.uniform(3.0, 6.0))
            w.kill()                                  # SIGKILL at a random moment
            await asyncio.sleep(rng.uniform(0.0, 1.0))
            w.start()
        await task
    run(produce_and_kill())
    want = offline_records(checkpoint, events)
    wait_for(broker, w.topics["out"], want, timeout=180)

    want = restart_from_changelog_then_tail(broker, checkpoint, w, events)
    assert_equal_records(wait_for(broker, w.topics["out"], want, timeout=180), want)


def wait_durable(broker, w, timeout: float = 60.0) -> None:
    """Until the worker's changelog holds, for every clicks partition, an offset marker at its last record: every
    event it was sent is applied and durable."""
    last: dict[int, int] = {}
    for m in run(read_topic(broker.bootstrap, w.topics["clicks"], idle=0.5)):
        last[m.partition] = max(last.get(m.partition, -1), m.offset)
    deadline = time.monotonic() + timeout
    while True:
        markers: dict[int, int] = {}
        for m in run(read_topic(broker.bootstrap, f"{w.app_id}-state-changelog", idle=0.5)):
            if m.key == MARKER_KEY:
                markers[m.partition] = max(markers.get(m.partition, -1), int(m.value))
        if all(markers.get(p, -1) >= offset for p, offset in last.items()):
            return
        assert time.monotonic() < deadline, f"not durable within {timeout:g} s: markers {markers}, ends {last}"
        time.sleep(0.2)


def restart_from_changelog_then_tail(broker, checkpoint, w, events, fault=None) -> dict[str, dict]:
    """Everything is consumed and durable. Kill the worker once more: the next incarnation must rebuild every window
    from the changelog alone (no re-delivery will fill a gap), then apply one new event per user on top. A recovery
    that lost the last changelog update of any partition shows up as a wrong count or vector. Returns what the
    output must converge to."""
    wait_durable(broker, w)
    w.kill()
    w.start(fault=fault)
    last_ts = max(e.ts for e in events)
    users = sorted({e.user_id for e in events})
    tail = [Event(f"tail-{u}", u, events[n % len(events)].item_id, events[n % len(events)].scene, "click",
                  last_ts + 1000 + n) for n, u in enumerate(users)]
    run(produce_lines(broker.bootstrap, w.topics["clicks"], [encode(e) for e in tail], progress=False))
    return offline_records(checkpoint, events + tail)


def test_the_crash_check_catches_a_recovery_that_drops_the_last_update(broker, checkpoint, worker_factory):
    """The check above must be able to fail: with recovery dropping the last user record of each changelog
    partition (the loss once seen here), it does -- and only for the few users whose record was dropped."""
    events, lines, _ = stream_of(3000, 0, seed=5)
    w = worker_factory().start()
    run(produce_lines(broker.bootstrap, w.topics["clicks"], lines, progress=False))
    wait_for(broker, w.topics["out"], offline_records(checkpoint, events))
    want = restart_from_changelog_then_tail(broker, checkpoint, w, events, fault="drop_last_state_record")
    with pytest.raises(AssertionError, match="never reached the offline state"):
        wait_for(broker, w.topics["out"], want, timeout=30)
    got = newest_records(run(read_topic(broker.bootstrap, w.topics["out"], idle=1.0)))
    assert w.proc.poll() is None
    assert all(got[u]["newest_ts"] == want[u]["newest_ts"] for u in want)   # every tail event was processed
    assert 1 <= len(lagging(got, want)) <= 4                                # one dropped record per partition


def test_sigterm_during_load_exits_cleanly_and_a_restart_loses_nothing(broker, checkpoint, worker_factory):
    events, lines, _ = stream_of(10_000, 0, seed=4)
    w = worker_factory().start()

    async def produce_then_stop():
        task = asyncio.create_task(produce_lines(broker.bootstrap, w.topics["clicks"], lines, rate=2000,
                                                 progress=False))
        await asyncio.sleep(8.0)
        code, seconds = w.terminate()
        assert code == 0, w.log_text()
        assert seconds < 10.0
        await task
    run(produce_then_stop())
    w.start()
    want = offline_records(checkpoint, events)
    assert_equal_records(wait_for(broker, w.topics["out"], want), want)


def test_worker_consumes_what_was_produced_before_it_started(broker, checkpoint, worker_factory):
    """An event waiting in clicks is published by a worker started after it (how long that takes is measured by
    bench/startup.py, not here)."""
    w = worker_factory()
    e = Event("startup-1", "startup-user", "v0-00001", "video", "click", 1_767_225_600_000)
    run(produce_lines(broker.bootstrap, w.topics["clicks"], [encode(e)], progress=False))
    t0 = time.monotonic()
    w.start()
    published = []
    while not published and time.monotonic() - t0 < 90:
        published = run(read_topic(broker.bootstrap, w.topics["out"], idle=0.2, limit=1.0))
        time.sleep(0.2)
    assert [read_record(m.value)["user_id"] for m in published] == ["startup-user"], w.log_text()
    print(f"worker start to first published record: {time.monotonic() - t0:.1f} s")


def test_clear_errors_for_an_unreachable_broker_and_a_bad_checkpoint(checkpoint, tmp_path):
    import subprocess
    import sys
    base = [sys.executable, "-m", "scenestream.stream.cli", "worker", "--web-port", "0"]
    proc = subprocess.run(base + ["--broker", "kafka://127.0.0.1:1", "--checkpoint", str(checkpoint)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "unreachable" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(base + ["--broker", "kafka://127.0.0.1:1", "--checkpoint", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "items.json"):
        (broken / name).write_text((checkpoint / name).read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = subprocess.run(base + ["--broker", "kafka://127.0.0.1:1", "--checkpoint", str(broken)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "checkpoint" in proc.stderr and "Traceback" not in proc.stderr
