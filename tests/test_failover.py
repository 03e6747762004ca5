"""Failover: three workers in one group over eight partitions; one is SIGKILLed
mid-stream; the survivors take its partitions, every user's final vectors equal offline replay within 1e-5, and the
API answers for the dead worker's users within 30 s of the kill."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest
from aiokafka.partitioner import DefaultPartitioner

from scenestream.model.checkpoint import load_checkpoint
from scenestream.stream.core.events import encode
from scenestream.stream.live.produce import produce_lines
from scenestream.stream.live.topics import ensure_topic
from scenestream.stream.datasets.synthetic import SyntheticSpec, generate

from .conftest import WorkerProcess, run
from .test_api import get, metric_values, recs, wait_ready
from .test_worker import assert_equal_records, offline_records, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PARTITIONS = 8
N_EVENTS = 10_000
RATE = 1000              # events/s: production lasts ~10 s, so the kill lands mid-stream
KILL_AFTER = 600         # the victim has consumed at least this many events when it is killed
API_DEADLINE = 30.0      # seconds from the kill


def partition_of(user: str) -> int:
    """The partition the producer (murmur2, as aiokafka and the API's routing hash) sends a user's events to."""
    return DefaultPartitioner()(user.encode(), list(range(PARTITIONS)), list(range(PARTITIONS)))


def group(broker, checkpoint, tmp_path, n: int) -> list[WorkerProcess]:
    """n workers (not started) of one new app id, and its clicks topic with PARTITIONS partitions."""
    app_id = f"fo{uuid.uuid4().hex[:6]}"
    workers = []
    for k in range(n):
        (tmp_path / f"w{k}").mkdir()
        workers.append(WorkerProcess(broker, checkpoint, tmp_path / f"w{k}", app_id=app_id,
                                     extra=("--partitions", str(PARTITIONS))))
    run(ensure_topic(broker.bootstrap, workers[0].topics["clicks"], PARTITIONS, 1, {}))
    return workers


def owned(w: WorkerProcess) -> list[int]:
    try:
        status, body = get(w.api + "/readyz")
    except OSError:
        return []
    return body["assigned_partitions"] if status == 200 else []   # only counted once recovered and ready


def wait_for_owners(workers: list[WorkerProcess], timeout: float) -> dict[WorkerProcess, list[int]]:
    """Until every worker is ready, owns some partitions, and together they own each partition exactly once."""
    deadline = time.monotonic() + timeout
    while True:
        table = {w: owned(w) for w in workers}
        flat = sorted(p for ps in table.values() for p in ps)
        if all(table.values()) and flat == list(range(PARTITIONS)):
            return table
        assert time.monotonic() < deadline, f"partitions never settled: {table}\n" + \
            "\n".join(w.log_text() for w in workers)
        assert all(w.proc.poll() is None for w in workers), "\n".join(w.log_text() for w in workers)
        time.sleep(0.3)


def answered(w: WorkerProcess, other: WorkerProcess, user: str, d: int, seen: Counter, errors: Counter) -> bool:
    """The user's interests (from one survivor) and recommendations (from the other) answer 200 from the user's own
    vector, not the popular fallback. `seen` counts the HTTP statuses met on the way, `errors` the requests that got
    none (by exception)."""
    try:
        status, body = get(f"{w.api}/users/{user}/interests")
        seen[status] += 1
        if status != 200 or body.get("user_id") != user or len(body.get("global") or ()) != d:
            return False
        status, body = recs(other, user, k=5)
        seen[status] += 1
        return status == 200 and body.get("fallback") is None and len(body["items"]) == 5
    except OSError as exc:
        errors[type(exc).__name__] += 1
        return False


def test_a_killed_worker_s_partitions_move_to_the_survivors_exactly(broker, checkpoint, tmp_path):
    events = generate(SyntheticSpec(users=300, seed=15))[0][:N_EVENTS]
    users = sorted({e.user_id for e in events})
    assert len({partition_of(u) for u in users}) == PARTITIONS
    workers = group(broker, checkpoint, tmp_path, 3)
    try:
        t0 = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            wait_ready(w)
        before = wait_for_owners(workers, timeout=60)
        print(f"three workers own {[before[w] for w in workers]} after {time.monotonic() - t0:.1f} s")
        victim = max(workers, key=lambda w: len(before[w]))
        survivors = [w for w in workers if w is not victim]
        dead_users = [u for u in users if partition_of(u) in before[victim]]
        assert dead_users

        async def produce_and_kill() -> float:
            task = asyncio.create_task(produce_lines(broker.bootstrap, victim.topics["clicks"],
                                                     [encode(e) for e in events], rate=RATE, progress=False))
            while True:
                status, text = await asyncio.to_thread(get, victim.api + "/metrics")
                if metric_values(text.decode()).get("scenestream_events_consumed_total", 0) >= KILL_AFTER:
                    break
                assert not task.done(), "the victim consumed too little before production ended"
                await asyncio.sleep(0.2)
            assert not task.done(), "the kill must land while events are still being produced"
            victim.kill()
            killed_at = time.monotonic()
            assert await task == N_EVENTS
            return killed_at
        killed_at = run(produce_and_kill())
        print(f"victim {before[victim]} killed; production ended {time.monotonic() - killed_at:.1f} s later")

        # (b) every dead user's interests and recommendations answer from a survivor within 30 s of the kill
        d = load_checkpoint(checkpoint).model.cfg.d_model
        pending, seen, errors = {u: n for n, u in enumerate(dead_users)}, Counter(), Counter()
        while pending and time.monotonic() - killed_at < API_DEADLINE:
            for u, n in list(pending.items()):
                if answered(survivors[n % 2], survivors[(n + 1) % 2], u, d, seen, errors):
                    del pending[u]
            if pending:
                time.sleep(0.2)
        api_s = time.monotonic() - killed_at
        assert not pending and api_s <= API_DEADLINE, f"{len(pending)} of the dead worker's {len(dead_users)} users got no answer within " \
                            f"{API_DEADLINE:.0f} s of the kill, e.g. {sorted(pending)[:3]}"
        # on the way: 503 while requests are forwarded to the dead owner (until its session times out, 6 s), 404 or
        # the popular fallback while a new owner has yet to apply the user's events; never a server error
        assert not any(status >= 500 and status != 503 for status in seen), dict(seen)
        assert not errors, f"requests to the survivors that got no answer at all: {dict(errors)}"
        print(f"all {len(dead_users)} users of the dead worker answered {api_s:.1f} s after the kill; "
              f"statuses on the way: {dict(seen)}")
        after = wait_for_owners(survivors, timeout=15)
        assert set(before[victim]) <= set(after[survivors[0]]) | set(after[survivors[1]]), (before, after)

        # (a) every user's newest published record equals offline replay within 1e-5
        want = offline_records(checkpoint, events)
        assert set(want) == set(users)
        print(f"offline replay done {time.monotonic() - killed_at:.1f} s after the kill")
        got = wait_for(victim.broker, victim.topics["out"], want, timeout=120)
        assert_equal_records(got, want)
        # and the new owners serve the same vectors for the dead worker's users
        served = {u: get(f"{survivors[n % 2].api}/users/{u}/interests")[1] for n, u in enumerate(dead_users)}
        assert_equal_records(served, {u: want[u] for u in dead_users})
        assert all(w.proc.poll() is None for w in survivors)
        print(f"converged {time.monotonic() - killed_at:.1f} s after the kill; total {time.monotonic() - t0:.1f} s")
    finally:
        for w in workers:
            w.kill()


def test_recoveries_longer_than_the_rebalance_timeout_do_not_stall_the_group(broker, checkpoint, tmp_path):
    """Before: the assignment callback recovered the partitions inside the rebalance; a member whose recovery took
    longer than the 10 s rebalance timeout was dropped from the group, and its rejoin started the next rebalance,
    in which the other member was recovering: no generation lasted (seen under bench/chaos.py's kills). Here each
    partition's recovery takes 3 s more (tests/faults.py: slow_recovery), so the first worker, given all eight,
    recovers for ~24 s when the second joins."""
    workers = group(broker, checkpoint, tmp_path, 2)
    try:
        workers[0].start(fault="slow_recovery")
        deadline = time.monotonic() + 60
        while "Joined group" not in workers[0].log_text():   # then it recovers all eight partitions
            assert time.monotonic() < deadline and workers[0].proc.poll() is None, workers[0].log_text()
            time.sleep(0.2)
        workers[1].start(fault="slow_recovery")   # joins while the first is recovering
        t0 = time.monotonic()
        table = wait_for_owners(workers, timeout=90)
        print(f"two workers own {[table[w] for w in workers]} {time.monotonic() - t0:.1f} s after the second started")
    finally:
        for w in workers:
            w.kill()
