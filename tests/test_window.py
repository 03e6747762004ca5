"""The state lattice (stream/core/window.py) against docs/design.md "State: a lattice".

Any arrival order, any duplicates, any micro-batch boundaries and any crash-and-redelivery give, per (user, scene),
top-L of the deduplicated set of events, computed here by an independent reference; apply_window is idempotent,
commutative and associative; dropped counts, changed scenes and late events behave as documented.
"""
from __future__ import annotations

import copy
from collections import Counter
from types import MappingProxyType

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scenestream.stream.core.events import Event
from scenestream.stream.core.window import (EMPTY, Window, _kept_rows, apply_user, apply_window,
                                            item_delta)

from .reference import group_by_user

TS0 = 1_700_000_000_000
SCENES = ("video", "article", "shop")
ACTIONS = ("view", "click")


# ----------------------------------------------------------------------------------------------------------------
# Independent reference and strategies
# ----------------------------------------------------------------------------------------------------------------

def reference_top_l(events, length):
    """Group by (user_id, scene), dedupe by event_id, sort by (ts, event_id), keep the last L."""
    groups: dict[tuple[str, str], dict[str, Event]] = {}
    for e in events:
        groups.setdefault((e.user_id, e.scene), {})[e.event_id] = e
    return {key: Window.of(sorted(by_id.values(), key=lambda e: (e.ts, e.event_id))[-length:])
            for key, by_id in groups.items()}


def ids(events):
    return {e.event_id for e in events}


@st.composite
def event_sets(draw, max_size=30, users=3, scenes=SCENES):
    """Distinct events: one content per event_id; small vocabularies and a small ts range so ties happen."""
    numbers = draw(st.lists(st.integers(0, 99), max_size=max_size, unique=True))
    return [Event(f"e{n}", f"u{draw(st.integers(0, users - 1))}", f"i{draw(st.integers(0, 4))}",
                  draw(st.sampled_from(scenes)), draw(st.sampled_from(ACTIONS)), TS0 + draw(st.integers(0, 6)))
            for n in numbers]


one_window_events = event_sets(max_size=14, users=1, scenes=("video",))    # a single (user, scene)


@st.composite
def deliveries_of(draw, events):
    """The events as delivered: each at least once, some several times (exact duplicates), in any order."""
    copies = [e for e in events for _ in range(draw(st.integers(1, 3)))]
    return draw(st.permutations(copies))


def cut(draw, n, max_cuts=10):
    bounds = sorted(set(draw(st.lists(st.integers(0, n), max_size=max_cuts))) | {0, n})
    return list(zip(bounds, bounds[1:]))


def check_window(window, length, user=None, scene=None):
    assert 0 < len(window) <= length
    window = window.events(user or "")
    keys = [e.order_key for e in window]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert len(ids(window)) == len(window)
    if user is not None:
        assert all(e.user_id == user and e.scene == scene for e in window)


def apply_batch(state, batch, length):
    """One micro-batch the way the pipeline applies it: grouped by user, apply_user per user."""
    state = dict(state)
    for user, evs in group_by_user(batch).items():
        old = state.get(user, {})
        new, changed, _ = apply_user(old, evs, length)
        assert changed == {s for s in set(old) | set(new) if old.get(s) != new.get(s)}
        for scene, window in new.items():
            check_window(window, length, user, scene)
        state[user] = new
    return state


def flat(state):
    return {(user, scene): window for user, scenes in state.items() for scene, window in scenes.items()}


# ----------------------------------------------------------------------------------------------------------------
# Exactness: order, duplicates, batch boundaries, restarts
# ----------------------------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(event_sets(), st.integers(1, 4), st.data())
def test_any_order_duplicates_and_batches_give_top_l_of_the_set(events, length, data):
    stream = data.draw(deliveries_of(events))
    state = {}
    for lo, hi in cut(data.draw, len(stream)):
        state = apply_batch(state, stream[lo:hi], length)
    assert flat(state) == reference_top_l(events, length)


@settings(max_examples=300, deadline=None)
@given(event_sets(), st.integers(1, 4), st.integers(1, 4), st.data())
def test_crashes_that_redeliver_a_prefix_change_nothing(events, length, restarts, data):
    """At-least-once: after a crash the state comes back from some durable snapshot and the consumer resumes from a
    committed offset no later than that snapshot, so a prefix of the stream is delivered again."""
    log = data.draw(deliveries_of(events))
    state, pos, snapshots = {}, 0, {0: {}}
    for _ in range(restarts):
        crash_at = data.draw(st.integers(pos, len(log)))
        for lo, hi in cut(data.draw, crash_at - pos, max_cuts=4):
            state = apply_batch(state, log[pos + lo:pos + hi], length)
            snapshots[pos + hi] = copy.deepcopy(state)
        snapshot_at = data.draw(st.sampled_from(sorted(o for o in snapshots if o <= crash_at)))
        state = copy.deepcopy(snapshots[snapshot_at])
        pos = data.draw(st.integers(0, snapshot_at))            # committed offset <= snapshot
        snapshots = {o: s for o, s in snapshots.items() if o <= snapshot_at}
    for lo, hi in cut(data.draw, len(log) - pos):
        state = apply_batch(state, log[pos + lo:pos + hi], length)
    assert flat(state) == reference_top_l(events, length)


@settings(max_examples=200, deadline=None)
@given(event_sets(), st.integers(1, 4), st.data())
def test_whole_stream_redelivered_changes_nothing(events, length, data):
    stream = data.draw(deliveries_of(events))
    state = apply_batch({}, stream, length)
    again = state
    for lo, hi in cut(data.draw, len(stream)):
        again = apply_batch(again, stream[lo:hi], length)
    assert again == state


# ----------------------------------------------------------------------------------------------------------------
# apply_window: a join
# ----------------------------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(one_window_events, one_window_events, st.integers(1, 4))
def test_apply_window_is_top_l_of_the_union(old, batch, length):
    batch = [e for e in batch if e.event_id not in ids(old)] + [e for e in batch if e in old]   # one content per id
    window = reference_top_l(old, length).get(("u0", "video"), EMPTY)
    new, _ = apply_window(window, batch + batch[:2], length)
    assert new == reference_top_l(old + batch, length).get(("u0", "video"), EMPTY)


@settings(max_examples=300, deadline=None)
@given(one_window_events, st.integers(0, 14), st.integers(1, 4), st.booleans(), st.booleans())
def test_item_delta_is_how_the_item_counts_changed(events, split, length, newer, from_empty):
    """Popularity follows item_delta: the old window's item counts plus the delta are the new window's; for events
    newer than the window (the append path that keeps the window's rows) and any other."""
    base, batch = events[:split], events[split:]
    if newer:
        batch = [e._replace(ts=e.ts + 100) for e in batch]
    old, _ = apply_window(EMPTY, base, length)
    new, _ = apply_window(old, batch + batch[:1], length)
    assert new == reference_top_l(base + batch, length).get(("u0", "video"), EMPTY)
    delta = item_delta(None if from_empty else old, new)
    counts = Counter() if from_empty else Counter(old.item_ids())
    counts.update(delta)
    assert 0 not in delta.values() and +counts == Counter(new.item_ids()) and min(counts.values(), default=0) >= 0


def test_an_appended_window_is_recognised_by_the_rows_it_kept():
    """item_delta's fast path: a full window that took one newer event kept all but its oldest row; a window
    that took a late event inside it did not keep a run of rows, so it is counted whole."""
    events = [Event(f"e{k}", "u0", f"i{k % 3}", "video", "click", TS0 + 10 * k) for k in range(6)]
    full, _ = apply_window(EMPTY, events[:5], 5)
    appended, _ = apply_window(full, events[5:], 5)
    late, _ = apply_window(full, [Event("late", "u0", "i9", "video", "click", TS0 + 15)], 5)
    assert _kept_rows(full, appended) == 4 and _kept_rows(full, full) == 5 and _kept_rows(full, late) is None
    assert item_delta(full, appended) == {"i0": -1, "i2": 1}


def test_a_window_is_packed_and_reads_back_event_for_event():
    """The packed form holds what the object form held: ids (any UTF-8, a lone surrogate too), items, actions,
    scenes and times, in order, and says what it holds; its rows fit the layout the encoder reads."""
    evs = [Event("é-1", "u", "item-é", "video", "view", TS0), Event("\ud800x", "u", "i2", "video", "click", TS0 + 1),
           Event("z" * 256, "u", "i" * 128, "video", "like", TS0 + 1)]
    w = Window.of(evs)
    assert w.events("u") == tuple(evs) and tuple(w) == tuple(e._replace(user_id="") for e in evs)
    assert w.ids() == [e.event_id for e in evs] and w.ids(2) == ["z" * 256] and w.item_ids() == [e.item_id for e in evs]
    assert w.ids(1) == [e.event_id for e in evs[1:]] and Window.of(evs[2:]).ids() == ["z" * 256]
    assert len(w) == 3 and w.last_ts == TS0 + 1 and w.last_key() == evs[-1].order_key
    assert list(w.table()["ts"]) == [e.ts for e in evs] and len(w.rows) == 3 * 24
    assert Window.of(evs[:2]) != w and Window.of(evs) == w and not EMPTY and EMPTY == Window.of([])


@settings(max_examples=300, deadline=None)
@given(one_window_events, st.integers(0, 14), st.integers(1, 4), st.randoms(use_true_random=False))
def test_apply_window_is_idempotent(events, split, length, rnd):
    base, batch = events[:split], events[split:]
    window, _ = apply_window(EMPTY, base, length)
    once, _ = apply_window(window, batch, length)
    twice, _ = apply_window(once, batch, length)
    assert twice == once
    assert apply_window(once, once, length) == (once, 0)               # re-applying the window itself is a no-op
    doubled = batch + batch
    rnd.shuffle(doubled)
    assert apply_window(window, doubled, length) == apply_window(window, batch, length)  # duplicates in one batch


@settings(max_examples=300, deadline=None)
@given(one_window_events, st.integers(0, 14), st.integers(0, 14), st.integers(1, 4))
def test_apply_window_is_commutative_and_associative(events, i, j, length):
    i, j = sorted((i, j))
    base, a, b = events[:i], events[i:j], events[j:]
    a = a + b[:1]                                                      # overlapping batches
    w, _ = apply_window(EMPTY, base, length)
    ab, _ = apply_window(apply_window(w, a, length)[0], b, length)
    ba, _ = apply_window(apply_window(w, b, length)[0], a, length)
    together, _ = apply_window(w, a + b, length)
    assert ab == ba == together


@settings(max_examples=300, deadline=None)
@given(one_window_events, one_window_events, st.integers(1, 4))
def test_dropped_counts_the_new_events_that_did_not_make_it(old, batch, length):
    batch = [e for e in batch if e.event_id not in ids(old)] + [e for e in batch if e in old]
    window, _ = apply_window(EMPTY, old, length)
    new, dropped = apply_window(window, batch + batch, length)
    # new = not already in the window (counted once however often it is in the batch); dropped = new, not retained
    assert dropped == len(ids(batch) - ids(window) - ids(new))
    if not batch:
        assert (new, dropped) == (window, 0)


@settings(max_examples=200, deadline=None)
@given(one_window_events, st.integers(1, 4))
def test_events_arriving_one_by_one_in_time_order_are_never_dropped(events, length):
    window, total = EMPTY, 0
    for e in sorted(events, key=lambda e: e.order_key):
        window, dropped = apply_window(window, [e], length)
        total += dropped
        assert window.events("u0")[-1] == e
    assert total == 0


# ----------------------------------------------------------------------------------------------------------------
# Late events
# ----------------------------------------------------------------------------------------------------------------

def _ev(n, ts, user="u", scene="video"):
    return Event(f"e{n:02d}", user, f"i{n}", scene, "click", TS0 + ts)


def test_a_late_event_behind_a_full_window_is_dropped_and_counted():
    L = 5
    full = Window.of(_ev(k, 1000 * k) for k in range(1, L + 1))
    late = _ev(99, 0)
    assert apply_window(full, [late], L) == (full, 1)
    assert apply_window(full, [full.events("u")[0]], L) == (full, 0)               # a duplicate is not late
    state = MappingProxyType({"video": full})
    new, changed, dropped = apply_user(state, [late], L)
    assert (new, changed, dropped) == ({"video": full}, set(), 1)


def test_ties_in_time_are_broken_by_event_id():
    L = 2
    window = Window.of((_ev(10, 5), _ev(20, 5)))
    assert apply_window(window, [_ev(5, 5)], L) == (window, 1)           # same ts, smaller id: behind the window
    assert apply_window(window, [_ev(15, 5)], L) == (Window.of((_ev(15, 5), _ev(20, 5))), 0)
    assert apply_window(window, [_ev(30, 4), _ev(31, 6)], L) == (Window.of((_ev(20, 5), _ev(31, 6))), 1)


def test_a_batch_can_push_its_own_events_out():
    L = 2
    new, dropped = apply_window(EMPTY, [_ev(k, k) for k in range(5)], L)
    assert new == Window.of((_ev(3, 3), _ev(4, 4))) and dropped == 3


def test_a_redelivered_evicted_event_leaves_the_window_unchanged():
    L = 2
    w, _ = apply_window(EMPTY, [_ev(1, 1), _ev(2, 2)], L)
    w, _ = apply_window(w, [_ev(3, 3)], L)                               # e01 evicted
    again, _ = apply_window(w, [_ev(1, 1)], L)
    assert again == w
    assert apply_user({"video": w}, [_ev(1, 1)], L)[:2] == ({"video": w}, set())


@settings(max_examples=300, deadline=None)
@given(one_window_events, st.integers(1, 4), st.integers(-3, 6), st.integers(0, 99))
def test_any_late_event_behind_a_full_window_is_dropped(events, length, ts, n):
    window, _ = apply_window(EMPTY, events, length)
    late = Event(f"e{n}", "u0", "late-item", "video", "like", TS0 + ts)
    if len(window) < length or late.order_key >= window.events()[0].order_key or late.event_id in ids(events):
        return
    assert apply_window(window, [late], length) == (window, 1)
    new, changed, dropped = apply_user({"video": window}, [late], length)
    assert (new, changed, dropped) == ({"video": window}, set(), 1)


# ----------------------------------------------------------------------------------------------------------------
# apply_user: no mutation, exact `changed`
# ----------------------------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(event_sets(max_size=20, users=1), event_sets(max_size=12, users=1), st.integers(1, 3), st.booleans())
def test_apply_user_does_not_mutate_and_reports_exactly_the_changed_scenes(old, batch, length, read_only):
    batch = [e for e in batch if e.event_id not in ids(old)] + [e for e in batch if e in old]
    state = {scene: window for (_, scene), window in reference_top_l(old, length).items()}
    snapshot = copy.deepcopy(state)
    given_state = MappingProxyType(state) if read_only else state
    new, changed, dropped = apply_user(given_state, batch + batch[:3], length)
    assert state == snapshot and new is not state                      # the input is untouched
    assert changed == {s for s in SCENES if new.get(s) != state.get(s)}
    assert changed <= {e.scene for e in batch}
    assert set(new) == set(state) | changed
    for scene in set(state) - changed:
        assert new[scene] == state[scene]
    expected = reference_top_l(old + batch, length)
    assert new == {scene: w for (_, scene), w in expected.items()}
    assert dropped == sum(apply_window(state.get(s, EMPTY), [e for e in batch if e.scene == s], length)[1]
                          for s in SCENES)
    # applying the same events again changes nothing and reports nothing changed
    assert apply_user(new, batch, length)[:2] == (new, set())


def test_apply_user_reports_changed_scenes_and_does_not_mutate_its_input():
    e1 = Event("a", "u", "i", "video", "click", TS0)
    e2 = Event("b", "u", "j", "shop", "click", TS0 + 1)
    state = {"video": Window.of([e1])}
    snapshot = dict(state)
    new, changed, dropped = apply_user(state, [e1, e2], 5)
    assert state == snapshot
    assert changed == {"shop"} and new == {"video": Window.of([e1]), "shop": Window.of([e2])} and dropped == 0
    assert apply_user(new, [e1, e2], 5)[1] == set()
    assert apply_user(new, [], 5) == (new, set(), 0)


def test_group_by_user_keeps_every_event_in_arrival_order():
    evs = [_ev(1, 1, "a"), _ev(2, 0, "b"), _ev(3, 2, "a"), _ev(1, 1, "a")]
    assert group_by_user(evs) == {"a": [evs[0], evs[2], evs[3]], "b": [evs[1]]}


def test_ids_whose_hashes_collide_stay_two_events(monkeypatch):
    """The rule for hash collisions: there is none to need. The join compares and orders whole ids; the 64-bit hash
    in a row only speeds up row comparisons. Here every id hashes alike, and distinct ids still stay distinct
    events, in id order at equal times, and a re-delivery still joins in as the same event."""
    import scenestream.stream.core.window as window_module
    monkeypatch.setattr(window_module, "id_hash", lambda _: 7)
    a, b, c = (Event(n, "u", f"i{n}", "video", "click", TS0) for n in ("a", "b", "c"))
    w, dropped = apply_window(EMPTY, [b, a], 5)
    assert w.events("u") == (a, b) and dropped == 0
    w, _ = apply_window(w, [c, a], 5)
    assert w.events("u") == (a, b, c) and len(set(w.table()["hash"].tolist())) == 1
    assert apply_window(w, [b], 5) == (w, 0)


def test_interner_names_of_follows_names_added_between_calls():
    """names_of's byte table grows with the interner (names of any length and script, added a few or many at a
    time), and gives each code's UTF-8 name, in the codes' order, repeats included."""
    from scenestream.stream.core.window import Interner
    interner, rng = Interner(10**6), np.random.default_rng(0)
    for round_, added in enumerate([1, 3, 70, 0, 500, 2]):
        for k in range(added):
            interner.id(f"{'é物x'[k % 3] * (k % 7)}-{round_}-{k}")
        if not len(interner):
            continue
        codes = rng.integers(0, len(interner), 300)
        sizes, names = interner.names_of(codes)
        assert names == b"".join(interner.raw[c] for c in codes.tolist())
        assert sizes.tolist() == [len(interner.raw[c]) for c in codes.tolist()]
        if round_ == 4:   # names past PADDED_NAMES bytes: gathered byte by byte from then on, the same names
            interner.id("長" * 20)
    assert interner.names_of(np.zeros(0, np.int64))[1] == b""
