"""The exactness contract on slots: every micro-batch's vectors from the slot encoder (cached positions gathered, new
ones encoded, rows scattered back: model/slot_encoder.py, through core/slot_step.py) equal a full encode from
scratch of the same windows within 1e-5: with late events, duplicates, ties in time, windows that fill and slide,
a cache with room for two windows (evicting all the time), scene windows on their own stack or the timeline's, a
window shorter than the receptive field, and slots that change hands."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scenestream.model.slot_encoder import MAX_POSITIONS, SlotEncoder, _runs
from scenestream.stream.core.events import Event
from scenestream.stream.core.slot_step import encode
from scenestream.stream.core.slots import SlotWindows

from .test_exactness import ACTIONS, ITEMS, SCENES, WINDOW, _encoder

# the test model served with its windows (the receptive field), and with shorter ones: a cut-off window
ENCODERS = {(stack, window): _encoder(cache_mb=0, scene_layers=layers)
            for stack, layers in (("shared", 0), ("own", 1)) for window in (WINDOW, WINDOW - 3)}
for (_, window), _enc in ENCODERS.items():
    _enc.ckpt.window = window


def slot_encoder(stack: str, entries: int | None, window: int = WINDOW, kernel: bool = True) -> SlotEncoder:
    """The slot encoder over the test model: room for `entries` windows per pool (None: plenty); kernel False: an
    event a window attends in torch, not in model/ring_attention.py's C."""
    enc = SlotEncoder(ENCODERS[stack, window], cache_mb=0 if entries == 0 else 64)
    enc.ring_kernel &= kernel
    if entries:
        for pool in enc.pools:   # as few entries as asked, whatever the budget gave
            pool.capacity = entries
            pool.free = list(range(entries - 1, -1, -1))
            pool.rows, pool.vec = pool.rows[:, :entries].contiguous(), pool.vec[:entries]
            for name in ("key", "version", "last_ts", "last_hash", "rows_then", "ring", "head", "stamp"):
                setattr(pool, name, getattr(pool, name)[:entries])
    return enc


seconds_st = st.one_of(st.integers(0, 40), st.integers(0, 40), st.integers(0, 3), st.integers(-120, -1))
stream_st = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 11), st.integers(0, 2), st.integers(0, 3),
                               seconds_st, st.integers(0, 9)), min_size=20, max_size=70)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_st, st.data(), st.sampled_from(["shared", "own"]), st.sampled_from([None, 2, 0]),
       st.sampled_from([WINDOW, WINDOW - 3]), st.booleans())
def test_slot_vectors_equal_a_full_encode_at_every_step(steps, data, stack, entries, length, kernel):
    offline, streamed = ENCODERS[stack, length], slot_encoder(stack, entries, length, kernel)
    # runs cut to a few positions a forward (the cap for cache misses) encode the same
    streamed.max_positions = data.draw(st.sampled_from([MAX_POSITIONS, 1, 7]), label="max_positions")
    slots = SlotWindows(SCENES, length, capacity=2)
    ts, events = 1_700_000_000_000, []
    for n, (u, i, s, a, dt, dup) in enumerate(steps):
        ts += dt * 1000
        e = Event(f"s{n}", f"u{u}", ITEMS[i], SCENES[s], ACTIONS[a], ts)
        events.append(e)
        if dup == 0 and events:   # now and then a copy of an earlier event, delivered again
            events.append(events[data.draw(st.integers(0, len(events) - 1), label="copy")])
    pos, touched = 0, np.zeros(0, np.int64)
    while pos < len(events):
        size = data.draw(st.integers(1, 8), label="batch")
        batch, pos = events[pos:pos + size], pos + size
        if data.draw(st.integers(0, 9), label="leave") == 0 and slots.slot_of:   # a user leaves, comes back later
            gone = sorted(slots.slot_of)[0]
            touched = np.setdiff1d(touched, [slots.slot_of[gone]])
            held = slots.state(gone)
            slots.drop([gone])
            slots.put(gone, held)
        join = slots.join(batch)
        touched = np.union1d(touched, join.users) if len(join.users) else touched
        if not len(touched) or data.draw(st.integers(0, 3), label="encode later") == 0:
            continue   # joins before one encode (as replay's rounds): what changed since is encoded then
        got = encode(slots, touched, streamed)
        touched = np.zeros(0, np.int64)
        users = [slots.user_names[u] for u in got.users.tolist()]
        want = offline.interests({u: slots.state(u) for u in users})
        assert want.users == users
        np.testing.assert_allclose(got.h[got.has], want.h[want.has], atol=1e-5, rtol=0)
        assert (got.has == want.has).all()
        np.testing.assert_allclose(got.recent, want.recent, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.fused, want.fused, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.weights, want.weights, atol=1e-5, rtol=0)


def test_appends_are_encoded_against_cached_rows():
    """In-order traffic is the common case: every window after its first encode is extended, never re-encoded."""
    streamed = slot_encoder("own", None)
    slots = SlotWindows(SCENES, WINDOW)
    ts = 1_700_000_000_000
    for n in range(40):
        join = slots.join([Event(f"e{n}", f"u{n % 2}", ITEMS[n % 10], SCENES[n % 3], "view", ts + n * 1000)])
        encode(slots, join.users, streamed)
    for pool in streamed.pools:
        assert pool.stats["misses"] <= 2 * len(SCENES) and pool.stats["extends"] > 20, pool.stats


def test_a_timeline_whose_windows_end_at_the_same_time_is_still_extended():
    """Producers with second timestamps tie often: windows of two scenes ending at the same ms. The timeline's newest
    event is then the one whose event id sorts last, and the next event extends the timeline (a tie is no miss)."""
    streamed = slot_encoder("own", None)
    slots = SlotWindows(SCENES, WINDOW)
    ts = 1_700_000_000_000
    for ids in (("b", "a"), ("a", "b")):   # the later id in either scene
        user = f"u-{ids[0]}"
        join = slots.join([Event(f"{ids[0]}{n}", user, ITEMS[n], "video", "view", ts + n) for n in range(3)] +
                          [Event(f"{ids[1]}{n}", user, ITEMS[n], "shop", "view", ts + n) for n in range(3)])
        encode(slots, join.users, streamed)
        before = dict(streamed.timeline_pool.stats)
        join = slots.join([Event(f"next-{user}", user, ITEMS[5], "article", "click", ts + 10)])
        got = encode(slots, join.users, streamed)
        after = streamed.timeline_pool.stats
        assert (after["extends"] - before["extends"], after["misses"] - before["misses"]) == (1, 0)
        want = ENCODERS["own", WINDOW].interests({user: slots.state(user)})
        assert np.abs(got.recent - want.recent).max() <= 1e-5


def test_the_check_sees_a_cache_that_lies():
    """The test above must be able to fail: a pool whose entries claim any version encodes appended rows against
    another window's cached rows."""
    streamed = slot_encoder("own", None)
    slots = SlotWindows(SCENES, WINDOW)
    ts = 1_700_000_000_000
    for n in range(30):
        join = slots.join([Event(f"a{n}", "u0", ITEMS[n % 10], "video", "view", ts + n * 1000),
                           Event(f"b{n}", "u1", ITEMS[(n * 3) % 10], "video", "click", ts + n * 1000)])
        encode(slots, join.users, streamed)
    u0, u1 = slots.win[slots.slot_of["u0"], 0], slots.win[slots.slot_of["u1"], 0]
    pool = streamed.scene_pool
    assert pool.entry_of[u0] >= 0 and pool.entry_of[u1] >= 0
    pool.entry_of[u1] = pool.entry_of[u0]   # u1's key now finds u0's rows
    pool.last_ts[pool.entry_of[u0]] = slots.ts[u1, WINDOW - 1]
    pool.last_hash[pool.entry_of[u0]] = slots.hash[u1, WINDOW - 1]
    pool.version[pool.entry_of[u0]] = slots.wver[u1]
    join = slots.join([Event("last", "u1", ITEMS[1], "video", "click", ts + 99_000)])
    got = encode(slots, join.users, streamed)
    want = ENCODERS["own", WINDOW].interests({"u1": slots.state("u1")})
    assert np.abs(got.h[0, 0] - want.h[0, 0]).max() > 1e-4


def test_a_miss_encodes_only_the_window_that_changed():
    """With no room in the cache (many users, a small --encoder-cache-mb), an event re-encodes its own window and
    the timeline; the user's other scene windows, unchanged since their last encode, read their outputs back."""
    streamed = slot_encoder("own", 0)
    slots = SlotWindows(SCENES, WINDOW)
    ts = 1_700_000_000_000
    join = slots.join([Event(f"e{n}", "u", ITEMS[n], SCENES[n % 3], "view", ts + n) for n in range(9)])
    encode(slots, join.users, streamed)
    before = dict(streamed.scene_pool.stats)
    join = slots.join([Event("next", "u", ITEMS[2], "shop", "click", ts + 100)])
    got = encode(slots, join.users, streamed)
    after = streamed.scene_pool.stats
    assert (after["misses"] - before["misses"], after["unchanged"] - before["unchanged"]) == (1, len(SCENES) - 1)
    want = ENCODERS["own", WINDOW].interests({"u": slots.state("u")})
    np.testing.assert_allclose(got.fused, want.fused, atol=1e-5, rtol=0)


@given(st.lists(st.integers(1, 60), min_size=0, max_size=300), st.integers(1, 64), st.integers(1, 400))
def test_runs_take_every_window_once_within_the_positions_cap(sizes, batch_size, max_positions):
    sizes = np.array(sizes, np.int64)
    order = np.argsort(sizes, kind="stable")
    runs = _runs(order, sizes, batch_size, max_positions=max_positions)
    assert np.array_equal(np.concatenate(runs) if runs else np.zeros(0, np.int64), order)   # each once, in order
    for run in runs:
        assert 0 < len(run) <= batch_size
        assert len(run) == 1 or len(run) * sizes[run].max() <= max_positions
