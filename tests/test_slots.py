"""Users as slots (stream/core/slots.py) against the packed windows' join (apply_batch): any stream in any batches,
with duplicates, copies of held events, late events, ties in time and events pushed out within a batch, gives the
same windows, the same late count, the same changed users and the same item counts; slots are reused after users
leave."""
from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from .reference import apply_batch
from scenestream.stream.core.events import Event
from scenestream.stream.core.slots import SlotWindows
from scenestream.stream.core.window import ITEMS, item_delta
from scenestream.stream.live.changelog import decode_state, encode_windows, window_values
from scenestream.stream.live.state import item_deltas

from .test_window import SCENES, TS0, event_sets

ALL_SCENES = (*SCENES, "radio")   # the model's scenes: some never get an event


@st.composite
def streams(draw):
    """A stream with copies (re-deliveries, conflicting duplicates of one event id) cut into micro-batches."""
    events = draw(event_sets(max_size=40, users=4))
    log = list(events)
    for e in draw(st.lists(st.sampled_from(events), max_size=10)) if events else []:
        log.insert(draw(st.integers(0, len(log))), e if draw(st.booleans()) else
                   e._replace(item_id=f"i{draw(st.integers(0, 4))}", ts=e.ts + draw(st.integers(-2, 2))))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(log)), max_size=6))) | {0, len(log)})
    return [log[a:b] for a, b in zip(cuts, cuts[1:])]


def item_counts(slots: SlotWindows) -> Counter:
    return Counter((int(slots.scene_of[w]), ITEMS.names[i]) for w in range(len(slots.n))
                   for i in slots.item[w, slots.length - slots.n[w]:].tolist())


@settings(max_examples=300, deadline=None)
@given(streams(), st.integers(1, 5))
def test_slot_join_is_apply_batch(batches, length):
    slots, store = SlotWindows(ALL_SCENES, length, capacity=2), {}
    counted: Counter = Counter()
    for batch in batches:
        want = apply_batch(store.get, batch, length)
        got = slots.join(batch)
        assert got.late_dropped == want.late_dropped
        assert sorted(slots.user_names[u] for u in got.users.tolist()) == sorted(want.updates)
        per_scene: dict[str, Counter] = {}
        for user, state in want.updates.items():
            before = store.get(user) or {}
            for scene, w in state.items():   # the item counts move as item_delta says
                for item, d in item_delta(before.get(scene), w).items():
                    counted[(slots.scene_index[scene], item)] += d
                    per_scene.setdefault(scene, Counter())[item] += d
        nonzero = {s: Counter({i: d for i, d in c.items() if d}) for s, c in per_scene.items()}
        assert item_deltas(slots, got) == {s: c for s, c in nonzero.items() if c}   # what the popularity is shifted by
        store.update(want.updates)
        for w, k in zip(got.windows.tolist(), got.appended.tolist()):
            if k >= 0:   # appended: the new rows end the window, after rows it held before
                user, scene = slots.user_names[slots.owner[w]], slots.scenes[slots.scene_of[w]]
                assert slots.window(w).events(user)[-k:] == tuple(e for e in store[user][scene].events(user)[-k:])
        for scene_item, d in Counter(zip(slots.scene_of[got.added].tolist(),
                                         [ITEMS.names[i] for i in got.added_items.tolist()])).items():
            counted[scene_item] -= d
        for scene_item, d in Counter(zip(slots.scene_of[got.removed].tolist(),
                                         [ITEMS.names[i] for i in got.removed_items.tolist()])).items():
            counted[scene_item] += d
        assert not +counted and not -counted, counted   # every change in counts accounted for, nothing else
        for user in store:
            assert slots.state(user) == {s: w for s, w in store[user].items() if w}, user
    assert item_counts(slots) == Counter((slots.scene_index[s], i) for state in store.values()
                                         for s, w in state.items() for i in w.item_ids())


def test_fresh_events_take_the_array_path_and_late_ones_the_exact_one():
    slots = SlotWindows(SCENES, 3)
    first = [Event(f"e{k}", "u", f"i{k}", "video", "click", TS0 + k) for k in range(5)]
    got = slots.join(first)
    assert got.appended.tolist() == [3] and got.late_dropped == 2 and slots.n.max() == 3
    got = slots.join([Event("late", "u", "i9", "video", "click", TS0 - 1)])   # behind a full window
    assert len(got.windows) == 0 and got.late_dropped == 1
    got = slots.join([Event("mid", "u", "i9", "video", "click", TS0 + 3)])    # between held events: rewritten
    assert got.appended.tolist() == [-1]
    assert [e.event_id for e in slots.state("u")["video"]] == ["e3", "mid", "e4"]


def test_a_user_who_leaves_frees_their_slots_for_the_next():
    slots = SlotWindows(SCENES, 4, capacity=1)
    slots.join([Event("a", "u1", "i", "video", "click", TS0), Event("b", "u1", "i", "shop", "click", TS0)])
    held = set(slots.win[slots.slot_of["u1"]].tolist()) - {-1}
    slots.drop(["u1"])
    assert "u1" not in slots and slots.state("u1") is None
    slots.join([Event("c", "u2", "j", "video", "click", TS0), Event("d", "u2", "j", "shop", "click", TS0)])
    assert set(slots.win[slots.slot_of["u2"]].tolist()) - {-1} == held   # the same window slots, reused
    assert [e.event_id for w in slots.state("u2").values() for e in w] == ["c", "d"]
    assert np.count_nonzero(slots.n) == 2


def test_a_reused_slots_timeline_orders_ties_by_the_new_users_ids():
    """Window slots keep the rows of their last owner left of their own (only n says where a window starts): the
    merged timeline's order of events at one time (by event id) must read the new owner's ids alone."""
    from scenestream.model.infer import merged_window
    slots = SlotWindows(SCENES, 4, capacity=1)
    slots.join([Event(f"old-long-id-{k}", "u1", "i", scene, "click", TS0 + k) for scene in ("video", "shop")
                for k in range(4)])
    slots.drop(["u1"])
    slots.join([Event("b", "u2", "j", "video", "click", TS0), Event("a", "u2", "j", "shop", "click", TS0),
                Event("c", "u2", "j", "video", "view", TS0 + 1)])
    users = np.array([slots.slot_of["u2"]])
    got = slots.timelines(users, np.full(1, -1, np.int64))
    want = merged_window(slots.state("u2"), 4)
    assert int(got.n[0]) == 3 and got.hash[0, 1:].tolist() == want["hash"].tolist()


@settings(max_examples=150, deadline=None)
@given(streams(), st.integers(1, 5))
def test_changelog_values_of_many_windows_at_once_are_each_windows_own(batches, length):
    """window_values (every changed window of a batch in one pass) writes what encode_windows writes of each window
    alone, and the value reads back as the window."""
    slots = SlotWindows(ALL_SCENES, length, capacity=2)
    for batch in batches:
        joined = slots.join(batch)
        got = window_values(slots, joined.windows)
        assert got == [encode_windows([slots.arrays(w)]) for w in joined.windows.tolist()]
        for w, value in zip(joined.windows.tolist(), got):
            user, scene = slots.user_names[slots.owner[w]], slots.scenes[slots.scene_of[w]]
            assert decode_state(user, value, length)[scene].events(user) == slots.window(w).events(user)


def test_changelog_values_of_windows_with_names_of_any_length_and_script():
    slots = SlotWindows(ALL_SCENES, 4)
    events = [Event(f"é{k}-{'x' * k}", f"ü{k % 3}", f"物品{k % 5}" * (k % 4 + 1), ALL_SCENES[k % 3],
                    ("click", "like")[k % 2], TS0 + k) for k in range(40)]
    for at in range(0, 40, 7):
        joined = slots.join(events[at:at + 7])
        assert window_values(slots, joined.windows) == [encode_windows([slots.arrays(w)])
                                                        for w in joined.windows.tolist()]
    assert window_values(slots, np.zeros(0, np.int64)) == []
