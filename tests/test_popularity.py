"""One popular list for all workers: each worker publishes the item counts of the partitions it holds to the shared
popularity topic (key: the partition), and every worker ranks the sum of every partition's latest counts."""
from __future__ import annotations

import asyncio
import random
import time
import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner

from scenestream.model.checkpoint import load_checkpoint
from scenestream.stream.core.events import Event, encode
from scenestream.stream.core.popularity import Popularity, merge_partitions, top_counts
from scenestream.stream.core.window import apply_user
from scenestream.stream.live.produce import produce_lines
from scenestream.stream.live.shared_popularity import POPULARITY_CONFIG, decode_popularity, popularity_value
from scenestream.stream.live.topics import ensure_topic

from .conftest import WorkerProcess, run
from .test_api import get, recs, wait_ready
from .test_nothing_lost import _records, _service, handle
from .test_worker import stream_of

pytestmark = pytest.mark.timeout(600)

SCENES = ("video", "article", "shop")
TS = 1_767_225_600_000
PARTITIONS = 4


def _events(seed: int, n: int) -> list[Event]:
    rng = random.Random(seed)
    return [Event(f"e{seed}-{k}", f"u{rng.randrange(40)}", f"i{int(rng.paretovariate(1.2)) % 30:02d}",
                  rng.choice(SCENES), "click", TS + k) for k in range(n)]


def _counted(events) -> Popularity:
    pop = Popularity()
    pop.add(events)
    return pop


@pytest.mark.parametrize("seed", range(5))
def test_the_sum_of_partitions_ranks_as_all_events_counted_in_one_place(seed):
    """Events split over partitions by user: the merge of the partitions' published counts ranks exactly as one
    Popularity over all of them, in any order of the partitions, through the record's bytes and back."""
    events = _events(seed, 600)
    by_partition: dict[int, list[Event]] = {}
    for e in events:
        by_partition.setdefault(int(e.user_id[1:]) % PARTITIONS, []).append(e)
    parts = [decode_popularity(str(p).encode(), popularity_value(_counted(evs)), SCENES)[1]
             for p, evs in by_partition.items()]
    whole = _counted(events)
    rng = random.Random(seed)
    for _ in range(3):
        rng.shuffle(parts)
        merged = merge_partitions(parts)
        for scene in (*SCENES, None):
            assert merged.ranked(scene) == whole.ranked(scene)
            assert merged.ranked(scene, 5) == whole.ranked(scene, 5)
    assert merge_partitions(p.counts for p in map(_counted, by_partition.values())).ranked() == whole.ranked()
    assert merge_partitions([]).ranked() == [] and not merge_partitions([{"video": []}]).counts


def test_a_record_keeps_each_scenes_top_and_fits_its_byte_limit():
    pop = _counted(Event(f"e{n}", "u", f"item-{n:04d}", "video", "click", TS) for n in range(300))
    pop.add([Event("x", "u", "item-0007", "video", "click", TS)])
    assert top_counts(pop, 2) == {"video": [("item-0007", 2), ("item-0000", 1)]}
    small = popularity_value(pop, depth=300, limit=2000)
    assert len(small) <= 2000
    _, counts = decode_popularity(b"3", small, SCENES)
    assert 0 < len(counts["video"]) < 300 and counts["video"][0] == ("item-0007", 2)


def test_bad_records_are_refused_and_a_null_value_drops_the_entry():
    assert decode_popularity(b"2", None, SCENES) == (2, None)
    assert decode_popularity(b"1", b'{"counts": {"video": [["a", 2], ["b", true], [3, 1]], "radio": [["c", 1]]}}',
                             SCENES) == (1, {"video": [("a", 2)]})
    for key, raw in ((None, b'{"counts": {}}'), (b"-1", b'{"counts": {}}'), (b"x", b"{}"), (b"0", b"nope"),
                     (b"0", b'{"counts": []}'), (b"0", b'{"counts": {"video": [1]}}')):
        assert isinstance(decode_popularity(key, raw, SCENES), str), (key, raw)


def test_a_partition_is_published_when_changed_and_a_new_owner_replaces_its_entry(broker, checkpoint):
    """One service: nothing is sent while nothing changed; a partition recovered again (as by a new owner after a
    rebalance) is sent again, and the follower counts the partition's latest record only, never both."""
    events = [Event(f"s{n}", f"u{n % 5}", f"v0-0000{n % 3}", "video", "click", TS + n) for n in range(20)]
    more = [Event(f"m{n}", "u9", f"v0-0000{3 if n else 0}", "video", "click", TS + 100 + n) for n in range(3)]

    async def scenario():
        service, topics = await _service(broker, checkpoint)
        topic = topics["clicks"] + "-popularity"
        await ensure_topic(broker.bootstrap, topic, 1, 1, POPULARITY_CONFIG)
        shared = service.popularity
        follower = asyncio.create_task(shared.follow(topic))
        try:
            await handle(service, _records(topics["clicks"], events))
            own = shared.own
            summed_once = own is shared.own   # per change, not per request (the fallback ranks per sum)
            sent = [await shared.publish(service.store.producer, topic),
                    await shared.publish(service.store.producer, topic)]
            service.revoke({0})
            await service.assign({0})                  # recovered from the changelog: its owner publishes again
            await handle(service, _records(topics["clicks"], more, first_offset=len(events)))
            sent.append(await shared.publish(service.store.producer, topic))   # the first record and this share a key
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (shared.shared is None or shared.shared.ranked() !=
                                                   shared.own.ranked()):
                await asyncio.sleep(0.2)
            return (sent, shared.popular().ranked("video"), shared.own.ranked("video"),
                    summed_once and shared.own is not own)
        finally:
            follower.cancel()
            await service.stop()
    sent, shared, local, memo = run(scenario())
    assert sent == [1, 0, 1] and memo
    assert shared == local == [("v0-00000", 8), ("v0-00001", 7), ("v0-00002", 6), ("v0-00003", 2)]


# ---- two real workers ---------------------------------------------------------------------------------------------

def _partition(user: str) -> int:
    return DefaultPartitioner()(user.encode(), list(range(PARTITIONS)), list(range(PARTITIONS)))


def _popular(events, window: int, items: set[str], scene, k: int, partitions=range(PARTITIONS)) -> list:
    """The popular list computed offline: the items of every user's windows (of the users in `partitions`),
    ranked by the one rule, catalog items only: what the API's fallback returns, as (item_id, score)."""
    by_user: dict[str, list[Event]] = {}
    for e in events:
        if _partition(e.user_id) in partitions:
            by_user.setdefault(e.user_id, []).append(e)
    pop = _counted(e for evs in by_user.values() for w in apply_user({}, evs, window)[0].values() for e in w)
    return [(i, float(c)) for i, c in pop.ranked(scene, k, keep=lambda i: i in items)]


def _unknown_user(partitions) -> str:
    return next(u for u in (f"nobody-{n}" for n in range(1000)) if _partition(u) in partitions)


def test_two_workers_return_the_same_popular_list_for_an_unknown_user(broker, checkpoint, tmp_path):
    """Two workers own different partitions, each with its own most clicked items; an unknown user gets, from
    either worker's API, whichever worker owns the user, the list computed offline over all events' windows."""
    app_id = f"pop{uuid.uuid4().hex[:6]}"
    a, b = (WorkerProcess(broker, checkpoint, tmp_path, app_id=app_id,
                          extra=("--popularity-interval", "0.5")).start() for _ in range(2))
    try:
        events, lines, _ = stream_of(2000, 0, seed=21)
        ckpt = load_checkpoint(checkpoint)
        items = set(ckpt.vocab.item_ids)
        video = sorted(i for i, s in zip(ckpt.vocab.item_ids, ckpt.vocab.item_scenes) if s == "video")
        # each partition gets an item of its own that its users click most: local counts would rank differently
        last = max(e.ts for e in events)
        for p in range(PARTITIONS):
            users = [u for u in (f"fan{p}-{n}" for n in range(400)) if _partition(u) == p][:60]
            extra = [Event(f"fan-{u}", u, video[10 + p], "video", "click", last + n) for n, u in enumerate(users)]
            events += extra
            lines += [encode(e) for e in extra]
        wait_ready(a)
        wait_ready(b)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            owned = {w: get(w.api + "/readyz")[1]["assigned_partitions"] for w in (a, b)}
            if owned[a] and owned[b] and sorted(owned[a] + owned[b]) == list(range(PARTITIONS)):
                break
            time.sleep(0.5)
        assert owned[a] and owned[b] and not set(owned[a]) & set(owned[b]), owned
        run(produce_lines(broker.bootstrap, a.topics["clicks"], lines, progress=False))
        window = ckpt.window
        unknown = {w: _unknown_user(owned[w]) for w in (a, b)}   # one answered by each worker
        for scene in ("video", None):
            want = _popular(events, window, items, scene, 10)
            local = {w: _popular(events, window, items, scene, 10, owned[w]) for w in (a, b)}
            # the precondition: answers from local counts only would differ, between the workers and from `want`
            assert len(want) == 10 and local[a] != want and local[b] != want, (want, local)
            assert [i for i, _ in local[a]] != [i for i, _ in local[b]], local
            params = {"k": 10, **({"scene": scene} if scene else {})}
            got = {}
            while time.monotonic() < deadline + 30:
                got = {(w.app_id, w.web_port, u): recs(w, u, **params)[1] for w in (a, b) for u in unknown.values()}
                if all([(i["item_id"], i["score"]) for i in r["items"]] == want for r in got.values()):
                    break
                time.sleep(0.5)
            for where, r in got.items():
                assert r["fallback"] == "popular", (where, r)
                assert [(i["item_id"], i["score"]) for i in r["items"]] == want, (where, r["items"], want, local)
    finally:
        a.kill()
        b.kill()
