"""Changelog recovery against the real embedded broker: every record of multi-record batches comes back (Tansu
reports a partition's end as the base offset of its last batch + 1; recovery reads to an acknowledged fence)."""
import asyncio
import random
from collections import Counter

import numpy as np
import orjson
import pytest

from scenestream.stream.core.events import Event
from scenestream.stream.core.popularity import Popularity
from scenestream.stream.core.window import ACTIONS, EMPTY, ITEMS, Window, apply_window
from scenestream.stream.live.changelog import decode_state, encode_state, encode_windows
from scenestream.stream.live.state import ChangelogStore, join_states

from .conftest import new_topic, run


SCENES = ("video", "article", "shop")


async def write(store: ChangelogStore, partition: int, updates: dict, applied_offset: int) -> list:
    """What a micro-batch does with the store: its users' states in memory, then every window of them and the
    offset marker sent (the caller awaits the batches)."""
    events = [e for user, state in updates.items() for w in state.values() for e in w.events(user)]
    written = store.cut(partition, store.join(partition, events, applied_offset))
    return [b.future for b in await store.send(partition, written, applied_offset)]


def _state(user: str, n: int) -> dict:
    return {"video": Window.of(Event(f"{user}-{k}", user, f"i{k}", "video", "click", 1_700_000_000_000 + k)
                               for k in range(n))}


async def _write_and_recover(bootstrap: str) -> tuple[int, int, dict]:
    topic = await new_topic(bootstrap, partitions=2)
    writer = ChangelogStore(bootstrap, topic, SCENES, window=50)
    await writer.start()
    await writer.ensure(0)
    for batch in range(5):  # five micro-batches of 40 users each: the producer sends each as one record batch
        updates = {f"u{batch}-{k}": _state(f"u{batch}-{k}", 3) for k in range(40)}
        await asyncio.gather(*await write(writer, 0, updates, applied_offset=batch))
    await writer.stop()
    reader = ChangelogStore(bootstrap, topic, SCENES, window=50)
    await reader.start()
    try:
        state, applied = await reader.recover(0)
    finally:
        await reader.stop()
    return len(state), applied, state


def test_recovery_reads_every_update_of_multi_record_batches(broker):
    """Five micro-batches of 40 users, each sent as one record batch: every user and the last offset marker come
    back, the last record of the last batch included (a reader that stopped at Tansu's reported end would miss
    the rest of that batch)."""
    users, applied, state = run(_write_and_recover(broker.bootstrap))
    assert users == 200 and applied == 4
    assert all(state[f"u{b}-{k}"] == _state(f"u{b}-{k}", 3) for b in range(5) for k in range(40))


def test_state_codec_and_join_are_a_lattice():
    a, b = _state("u", 3), _state("u", 5)
    assert decode_state("u", encode_state(a), 50) == a
    assert encode_state(a)[:1] == b"\x01"   # the binary form
    with pytest.raises(ValueError):
        decode_state("u", encode_state(a)[:-1], 50)
    with pytest.raises(ValueError):
        decode_state("u", encode_state(a) + b"x", 50)
    odd = {"video": Window.of([Event("é\U0001f600", "u", "ï", "video", "click", 1), Event("b", "u", "j", "video", "buy", 2)])}
    assert decode_state("u", encode_state(odd), 50) == odd
    assert join_states(a, b, 50) == join_states(b, a, 50) == b
    assert join_states(b, b, 50) == b
    assert join_states(None, b, 2) == {"video": Window.of(b["video"].events("u")[-2:])}


def test_recovery_joins_per_window_records_with_whole_state_ones(broker):
    """The worker writes one record per changed (user, scene) window; a changelog written keyed by user alone
    (whole states) is read the same, and recovery joins both kinds into each user's state."""
    async def scenario():
        topic = await new_topic(broker.bootstrap)
        store = ChangelogStore(broker.bootstrap, topic, SCENES, window=50)
        await store.start()
        await store.ensure(0)
        video = _state("u", 4)["video"]
        shop = Window.of(Event(f"s{k}", "u", f"i{k}", "shop", "view", 1_700_000_000_000 + k) for k in range(2))
        first = Window.of(video.events("u")[:2])
        await store.producer.send_and_wait(topic, encode_state({"video": first}), key=b"u", partition=0)
        await asyncio.gather(*await write(store, 0, {"u": {"video": video, "shop": shop}}, applied_offset=7))
        await store.stop()
        reader = ChangelogStore(broker.bootstrap, topic, SCENES, window=50)
        await reader.start()
        try:
            got = await reader.recover(0)
        finally:
            await reader.stop()
        return got, {"video": video, "shop": shop}
    (state, applied), want = run(scenario())
    assert applied == 7 and state == {"u": want}


def test_changelog_values_in_the_json_forms_of_earlier_versions_still_read():
    """Changelogs written before the binary form hold JSON: {scene: columns} (ids as one string with their sizes in
    bytes), and before that [ts, event_id, item_id, action] rows. Recovery reads both as the same windows."""
    evs = [Event("é-1", "u", "item-é", "video", "view", 1), Event("e2", "u", "i2", "video", "click", 2)]
    columns = {"video": {"ts": [e.ts for e in evs], "ids": "".join(e.event_id for e in evs),
                         "id_bytes": [len(e.event_id.encode("utf-8", "surrogatepass")) for e in evs],
                         "item": [e.item_id for e in evs], "action": [e.action for e in evs]}}
    assert decode_state("u", orjson.dumps(columns), 50) == {"video": Window.of(evs)}
    a = _state("u", 4)
    rows = orjson.dumps({"video": [[e.ts, e.event_id, e.item_id, e.action] for e in a["video"].events("u")]})
    assert decode_state("u", rows, 50) == a
    assert decode_state("u", rows, 2) == {"video": Window.of(a["video"].events("u")[-2:])}


def test_recovered_users_wait_packed_and_take_slots_when_touched(broker):
    """Without a disk, recovery leaves users packed (a slot has room for a full window: 1M sparse users cost 4x
    the memory as slots); a micro-batch's users take slots, past `hot_users` the least recently used are packed
    again, and every user's windows, the partition's item counts and its user list stay what the lattice says."""
    async def scenario():
        topic = await new_topic(broker.bootstrap)
        writer = ChangelogStore(broker.bootstrap, topic, SCENES, window=50)
        await writer.start()
        await writer.ensure(0)
        first = {f"u{k}": _state(f"u{k}", 1 + k % 4) for k in range(30)}
        await asyncio.gather(*await write(writer, 0, first, applied_offset=3))
        await writer.stop()
        store = ChangelogStore(broker.bootstrap, topic, SCENES, window=50, hot_users=8)
        await store.start()
        try:
            await store.ensure(0)
            recovered = (len(store.slots), store.in_memory(), store.popularity(0).counts)
            want = dict(first)
            for rnd in range(3):   # rounds of 12 users each, some recovered, some new, some packed again
                users = [f"u{(7 * rnd + 3 * k) % 40}" for k in range(12)]
                events = [Event(f"{u}-r{rnd}", u, f"j{rnd}", "shop", "buy", 1_800_000_000_000 + rnd) for u in users]
                for e in events:
                    want[e.user_id] = join_states(want.get(e.user_id), {"shop": Window.of([e])}, 50)
                written = store.cut(0, store.join(0, events, 10 + rnd))
                store.trim()   # users of a batch in flight keep their slots
                pinned = len(store.slots)
                store.settle(0, written, [], 10 + rnd)
                store.trim()
                assert len(store.slots) <= 8 < pinned
        finally:
            await store.stop()
        expect = Popularity()
        for user, state in want.items():
            for w in state.values():
                expect.add(w.events(user))
        return recovered, store, want, expect
    (slots, held, counts), store, want, expect = run(scenario())
    assert slots == 0 and held == 30
    assert counts == Popularity().counts | {"video": Counter(f"i{k}" for u in range(30) for k in range(1 + u % 4))}
    assert sorted(store.users_of(0)) == sorted(want) and store.in_memory() == len(want)
    assert store.popularity(0).counts == expect.counts
    assert all(store.has(0, u) and store.get(0, u) == want[u] for u in want)


def test_binary_values_read_as_the_join_of_their_rows():
    """Rows as the worker writes them (ascending by (ts, id), ids unique) are packed as they are; any others (out
    of order, an id twice, longer than the window) are joined: either way the window apply_window makes of them."""
    rng = random.Random(7)
    direct = 0
    for _ in range(400):
        ids = ["a", "b", "é", "c\U0001f600", "\udc80z", "x1", "x10", "x2"]
        evs = [Event(rng.choice(ids), "u", f"i{rng.randint(0, 5)}", "video", rng.choice(["click", "view"]),
                     rng.randint(0, 3)) for _ in range(rng.randint(1, 9))]
        if rng.random() < 0.5:   # what the worker writes
            evs = sorted({e.event_id: e for e in evs}.values(), key=lambda e: (e.ts, e.event_id))
            direct += 1
        raw_ids = [e.event_id.encode("utf-8", "surrogatepass") for e in evs]
        raw = encode_windows([("video", [e.ts for e in evs], [len(i) for i in raw_ids], b"".join(raw_ids),
                               np.array([ITEMS.id(e.item_id) for e in evs]),
                               np.array([ACTIONS.id(e.action) for e in evs]))])
        length = rng.randint(1, 8)
        assert decode_state("u", raw, length) == {"video": apply_window(EMPTY, evs, length)[0]}
    assert direct > 100
    with pytest.raises(ValueError):
        decode_state("u", raw[:-1], 8)


def test_a_user_whose_events_come_by_two_partitions_keeps_both():
    """A user held packed for partition 0 whose events arrive on partition 1 (producers with different
    partitioners): when partition 0 reads it back, its windows are the join of both, never one replacing the
    other."""
    store = ChangelogStore("127.0.0.1:1", "t", SCENES, window=50)   # no broker: join and get only
    store.held |= {0, 1}
    store.cold[0] = {"u": _state("u", 3)}
    later = Event("late-1", "u", "j", "shop", "buy", 1_800_000_000_000)
    store.join(1, [later], 0)
    assert store.get(0, "u") == join_states(_state("u", 3), {"shop": Window.of([later])}, 50)
