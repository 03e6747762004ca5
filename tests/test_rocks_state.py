"""The rocksdb state (stream/live/rocks.py through ChangelogStore): a restart with its directory intact reads only the
changelog's tail and gets the same state as a full replay; records written elsewhere meanwhile are joined in; a
memory cap keeps memory bounded and every user readable; a micro-batch's users are never evicted before they are on
disk. Against the real embedded broker."""
import asyncio

import pytest

from scenestream.stream.core.events import Event
from scenestream.stream.live.state import ChangelogStore

from .conftest import new_topic, run

TS = 1_700_000_000_000
SCENES = ("video", "article", "shop")


def _events(user: str, n: int, start: int = 0) -> list[Event]:
    return [Event(f"{user}-{k}", user, f"i{k % 7}", ("video", "shop")[k % 2], "click", TS + k)
            for k in range(start, start + n)]


async def _batch(store: ChangelogStore, users: list[str], start: int, applied: int) -> None:
    """One micro-batch the way the service writes one: join, send, wait for the acks, settle."""
    events = [e for user in dict.fromkeys(users) for e in _events(user, 3, start)]
    written = store.cut(0, store.join(0, events, applied))
    sent = await store.send(0, written, applied)
    await asyncio.gather(*(b.future for b in sent))
    store.settle(0, written, [o for b in sent for o in b.offsets()], applied)
    store.trim()


def _snapshot(store: ChangelogStore, users: list[str]) -> dict:
    return {u: {s: w.buf for s, w in (store.get(0, u) or {}).items()} for u in users}


def test_a_restart_reads_only_the_tail_and_equals_a_full_replay(broker, tmp_path):
    users = [f"u{k}" for k in range(60)]

    async def scenario():
        topic = await new_topic(broker.bootstrap)
        first = ChangelogStore(broker.bootstrap, topic, SCENES, 50, state_dir=str(tmp_path), max_users=10)
        await first.start()
        await first.ensure(0)
        for b in range(4):
            await _batch(first, users[b * 15:(b + 1) * 15] + users[:5], 3 * b, applied=b)
        assert first.in_memory() <= 10 and first.stats["evictions"] > 0
        want = _snapshot(first, users)   # every user readable, most of them back from disk
        await first.stop()
        first.forget({0})
        # meanwhile another writer (a previous owner finishing, say) adds to the changelog
        other = ChangelogStore(broker.bootstrap, topic, SCENES, 50)
        await other.start()
        await other.ensure(0)
        await _batch(other, users[:3], 100, applied=9)
        await other.stop()
        again = ChangelogStore(broker.bootstrap, topic, SCENES, 50, state_dir=str(tmp_path), max_users=10)
        await again.start()
        await again.ensure(0)
        tail = again.stats["records_recovered"]
        got, pop = _snapshot(again, users), again.popularity(0)
        await again.stop()
        replay = ChangelogStore(broker.bootstrap, topic, SCENES, 50)
        await replay.start()
        await replay.ensure(0)
        full = replay.stats["records_recovered"]
        await replay.stop()
        return want, got, tail, full, _snapshot(replay, users), pop, replay.popularity(0), again.applied[0]

    want, got, tail, full, replayed, pop, replay_pop, applied = run(scenario())
    assert got == replayed                         # disk + tail = the whole changelog joined
    assert {u: w for u, w in got.items() if u not in ("u0", "u1", "u2")} == \
        {u: w for u, w in want.items() if u not in ("u0", "u1", "u2")}
    assert got["u0"] != want["u0"]                 # the other writer's events are in
    assert tail == 6 and full > 100                # the other writer's 3 users x 2 scenes, not the whole log
    assert pop.counts == replay_pop.counts and applied == 9


@pytest.mark.parametrize("cap", [1, 4])
def test_users_of_a_batch_in_flight_are_never_evicted(broker, tmp_path, cap):
    """Joined without settle: the batch's users stay in memory whatever the cap (their newest state is not on disk)."""
    async def scenario():
        topic = await new_topic(broker.bootstrap)
        store = ChangelogStore(broker.bootstrap, topic, SCENES, 50, state_dir=str(tmp_path), max_users=cap)
        await store.start()
        await store.ensure(0)
        users = [f"p{k}" for k in range(6)]
        store.cut(0, store.join(0, [e for u in users for e in _events(u, 2)], 0))
        store.trim()
        held = set(store.users_of(0))
        await store.stop()
        return held, users
    held, users = run(scenario())
    assert held == set(users)


def test_a_cap_needs_the_disk():
    with pytest.raises(ValueError, match="rocksdb"):
        ChangelogStore("localhost:1", "t", SCENES, 50, max_users=10)


def test_the_cap_evicts_the_least_recently_used_over_every_partition(tmp_path):
    """One order over all partitions: each partition's oldest in turn emptied the first partitions, their newest
    users too, while the last kept users far older (which pinned their batches' vectors)."""
    store = ChangelogStore("localhost:1", "t", SCENES, 50, state_dir=str(tmp_path), max_users=4)
    store.held = {0, 1, 2}   # recovered, with no disk opened: nothing is pinned, nothing read back
    for k in range(9):   # u0 in partition 0, u1 in 1, u2 in 2, u3 in 0, ...: the newest are u5..u8
        store.join(k % 3, _events(f"u{k}", 1), k)
        store.used_at[store.slots.slot_of[f"u{k}"]] = float(k)   # used in this order, whatever the clock's resolution
    store.pins[store.slots.slot_of["u0"]] += 1   # a batch in flight holds it: kept, the next oldest goes instead
    store.trim()
    assert sorted(u for p in range(3) for u in store.users_of(p)) == ["u0", "u6", "u7", "u8"]
    assert store.stats["evictions"] == 5
