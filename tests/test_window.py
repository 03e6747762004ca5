"""The state lattice: window apply is order-, duplicate- and batch-boundary-independent and equals top-L of the
deduplicated set, computed here by an independent reference."""

from hypothesis import given, settings
from hypothesis import strategies as st

from stream.events import Event
from stream.window import apply_user, apply_window, group_by_user

L = 5

event_st = st.builds(
    lambda n, u, i, s, t: Event(f"e{n}", f"u{u}", f"i{i}", ("video", "shop")[s], "click", 1_700_000_000_000 + t),
    st.integers(0, 500), st.integers(0, 2), st.integers(0, 5), st.integers(0, 1), st.integers(0, 20))
# one content per event_id (ids are unique per event by the schema); exact duplicates come from re-delivery
events_st = st.lists(event_st, min_size=0, max_size=40).map(lambda evs: list({e.event_id: e for e in evs}.values()))


def reference(events, length):
    """Top-L per (user, scene) of the deduplicated set, written without the code under test."""
    unique = {e.event_id: e for e in events}.values()
    out = {}
    for e in unique:
        out.setdefault((e.user_id, e.scene), []).append(e)
    return {k: tuple(sorted(v, key=lambda e: (e.ts, e.event_id))[-length:]) for k, v in out.items()}


def run_stream(deliveries, cuts):
    state = {}
    bounds = [0, *sorted(cuts), len(deliveries)]
    for lo, hi in zip(bounds, bounds[1:]):
        for user, evs in group_by_user(deliveries[lo:hi]).items():
            state[user], _, _ = apply_user(state.get(user, {}), evs, L)
    return {(u, s): w for u, st_ in state.items() for s, w in st_.items()}


@settings(max_examples=300, deadline=None)
@given(events_st, st.randoms(use_true_random=False), st.lists(st.integers(0, 200), max_size=8))
def test_any_order_duplicates_and_batches_give_top_l_of_the_set(events, rnd, cuts):
    deliveries = events + [rnd.choice(events) for _ in range(len(events) // 2)] if events else []
    rnd.shuffle(deliveries)
    cuts = [c % (len(deliveries) + 1) for c in cuts]
    assert run_stream(deliveries, cuts) == reference(events, L)


@settings(max_examples=200, deadline=None)
@given(events_st, st.randoms(use_true_random=False), st.integers(1, 3))
def test_crash_and_redelivery_of_a_prefix_changes_nothing(events, rnd, restarts):
    deliveries = list(events)
    rnd.shuffle(deliveries)
    stream = []
    pos = 0
    for _ in range(restarts):  # each "crash" re-delivers everything since some earlier committed offset
        upto = rnd.randrange(pos, len(deliveries) + 1)
        committed = rnd.randrange(0, upto + 1)
        stream += deliveries[pos:upto] + deliveries[committed:upto]
        pos = upto
    stream += deliveries[pos:]
    assert run_stream(stream, [rnd.randrange(len(stream) + 1) for _ in range(3)]) == reference(events, L)


@settings(max_examples=200, deadline=None)
@given(events_st, events_st)
def test_apply_window_is_idempotent_and_commutative(a, b):
    a = [e for e in a if (e.user_id, e.scene) == ("u0", "video")]
    b = [e for e in b if (e.user_id, e.scene) == ("u0", "video")]
    b = [e for e in b if e.event_id not in {x.event_id for x in a} or e in a]  # same id -> same content
    w1, _ = apply_window(apply_window((), a, L)[0], b, L)
    w2, _ = apply_window(apply_window((), b, L)[0], a, L)
    assert w1 == w2
    assert apply_window(w1, a + b, L)[0] == w1   # (evicted events seen again count as late, not as changes)


@settings(max_examples=200, deadline=None)
@given(events_st, events_st)
def test_dropped_counts_new_events_that_did_not_make_it(old, new):
    old = [e for e in old if (e.user_id, e.scene) == ("u0", "video")]
    new = [e for e in new if (e.user_id, e.scene) == ("u0", "video") and e.event_id not in {x.event_id for x in old}]
    window, _ = apply_window((), old, L)
    after, dropped = apply_window(window, new, L)
    fresh = {e.event_id for e in new} - {e.event_id for e in window}
    assert dropped == len(fresh - {e.event_id for e in after})


def test_a_late_event_behind_a_full_window_is_dropped_and_counted():
    full = tuple(Event(f"e{k}", "u", f"i{k}", "video", "click", 1_700_000_000_000 + 1000 * k) for k in range(1, L + 1))
    late = Event("late", "u", "x", "video", "click", 1_700_000_000_000)
    assert apply_window(full, [late], L) == (full, 1)
    assert apply_window(full, [full[0]], L) == (full, 0)  # a duplicate is not late


def test_apply_user_reports_changed_scenes_and_does_not_mutate_its_input():
    e1 = Event("a", "u", "i", "video", "click", 1_700_000_000_000)
    e2 = Event("b", "u", "j", "shop", "click", 1_700_000_000_001)
    state = {"video": (e1,)}
    snapshot = dict(state)
    new, changed, dropped = apply_user(state, [e1, e2], L)
    assert state == snapshot
    assert changed == {"shop"} and new == {"video": (e1,), "shop": (e2,)} and dropped == 0
    assert apply_user(new, [e1, e2], L)[1] == set()
