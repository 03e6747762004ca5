"""The exactness contract (docs/design.md): for any multiset of valid events, delivered in any order, with duplicates, in
any micro-batch sizes and across restarts, the streamed vectors equal an offline encode from scratch within 1e-5."""
import random

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scenestream.model.checkpoint import Checkpoint
from scenestream.model.infer import InterestEncoder
from scenestream.model.config import ModelConfig
from scenestream.model.model import InterestModel
from scenestream.model.window_cache import Entry, WindowCache, _reusable, _scan
from scenestream.model.vocab import ItemVocab
from scenestream.stream.core.events import Event
from scenestream.stream.core.batch import apply_batch, interest_records
from scenestream.stream.core.window import ROW_DTYPE, Window, apply_user, group_by_user

SCENES = ("video", "article", "shop")
ACTIONS = ("view", "click", "like", "buy")
ITEMS = [f"i{n}" for n in range(12)]
WINDOW = 10  # = n_layers * span + 2 for the model below


def _encoder(cache_mb: float, scene_layers: int = 0) -> InterestEncoder:
    """scene_layers 1: scene windows go through a stack of their own, shallower than the timeline's (model.py)."""
    torch.manual_seed(1)
    vocab = ItemVocab(ITEMS[:10], [SCENES[n % 3] for n in range(10)])  # i10, i11 are out of vocabulary
    cfg = ModelConfig(n_items=len(vocab), n_scenes=3, n_actions=4, d_model=32, n_heads=2, n_layers=2, span=4,
                      dropout=0.0, scene_layers=scene_layers)
    model = InterestModel(cfg)
    with torch.no_grad():  # random but not tiny weights, so differences would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return InterestEncoder(Checkpoint(model.eval(), vocab, SCENES, ACTIONS, WINDOW, "test"), cache_mb=cache_mb)


STREAMED = _encoder(cache_mb=64)
OFFLINE = _encoder(cache_mb=0)
OWN_STACK = {"streamed": _encoder(cache_mb=64, scene_layers=1), "offline": _encoder(cache_mb=0, scene_layers=1)}

event_st = st.builds(
    lambda n, u, i, s, a, t: Event(f"e{n}", f"u{u}", ITEMS[i], SCENES[s], ACTIONS[a], 1_700_000_000_000 + t),
    st.integers(0, 10_000), st.integers(0, 3), st.integers(0, 11), st.integers(0, 2), st.integers(0, 3),
    st.integers(0, 5_000_000))


def offline(events, encoder=OFFLINE):
    """From scratch: deduplicate, window each user's events at once, encode with no cache."""
    unique = {e.event_id: e for e in events}
    states = {u: apply_user({}, evs, WINDOW)[0] for u, evs in group_by_user(unique.values()).items()}
    return {r["user_id"]: r for r in interest_records(encoder, states)}


def stream(deliveries, batch_sizes, encoder=STREAMED):
    state, latest = {}, {}
    pos = 0
    for size in batch_sizes:
        batch = deliveries[pos:pos + size]
        pos += size
        outcome = apply_batch(state.get, batch, WINDOW)
        state.update(outcome.updates)
        for rec in interest_records(encoder, outcome.updates):
            latest[rec["user_id"]] = rec
    return latest


def assert_same(got, want):
    assert got.keys() == want.keys()
    for user, w in want.items():
        g = got[user]
        assert g["events"] == w["events"] and g["newest_ts"] == w["newest_ts"]
        assert g["scenes"].keys() == w["scenes"].keys()
        for s in w["scenes"]:
            np.testing.assert_allclose(g["scenes"][s], w["scenes"][s], atol=1e-5, rtol=0)
        for s in SCENES:
            np.testing.assert_allclose(g["fused"][s], w["fused"][s], atol=1e-5, rtol=0)
        np.testing.assert_allclose(g["global"], w["global"], atol=1e-5, rtol=0)
        for t in w["weights"]:
            np.testing.assert_allclose([g["weights"][t][s] for s in w["weights"][t]],
                                       list(w["weights"][t].values()), atol=1e-5, rtol=0)


def _unique_by_id(events):
    return list({e.event_id: e for e in events}.values())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event_st, min_size=1, max_size=60).map(_unique_by_id), st.randoms(use_true_random=False),
       st.data())
def test_streamed_vectors_equal_offline_encode(events, rnd: random.Random, data):
    # at-least-once delivery: duplicates, shuffled, plus "restarts" that re-deliver a prefix of what was sent
    deliveries = list(events) + [rnd.choice(events) for _ in range(rnd.randrange(0, len(events) + 1))]
    rnd.shuffle(deliveries)
    for _ in range(data.draw(st.integers(0, 2), label="restarts")):
        cut = rnd.randrange(0, len(deliveries) + 1)
        deliveries = deliveries[:cut] + deliveries[:cut] + deliveries[cut:]
    sizes, left = [], len(deliveries)
    while left > 0:
        sizes.append(data.draw(st.integers(1, max(1, left)), label="batch"))
        left -= sizes[-1]
    if data.draw(st.booleans(), label="own scene stack"):
        assert_same(stream(deliveries, sizes, OWN_STACK["streamed"]), offline(events, OWN_STACK["offline"]))
    else:
        assert_same(stream(deliveries, sizes), offline(events))


def test_a_window_encodes_the_same_alone_and_in_a_padded_batch():
    rng = random.Random(0)
    windows = []
    for n in range(40):
        evs = [Event(f"w{n}-{k}", "u", ITEMS[rng.randrange(12)], "video", ACTIONS[rng.randrange(4)],
                     1_700_000_000_000 + rng.randrange(10**7)) for k in range(rng.randrange(1, WINDOW + 1))]
        windows.append(Window.of(sorted(evs, key=Event.order_key.fget)))
    together = OFFLINE.encode_windows(windows)
    for n, w in enumerate(windows):
        np.testing.assert_allclose(OFFLINE.encode_windows([w])[0], together[n], atol=1e-5, rtol=0)


def test_output_ignores_events_beyond_the_receptive_field():
    """A full window's output depends on its last n_layers*span+2 events only: prepending older events to a
    (longer) window changes nothing. This is what lets the state hold exactly L events."""
    rng = random.Random(1)
    evs = sorted((Event(f"r{k}", "u", ITEMS[rng.randrange(12)], "shop", "click", 1_700_000_000_000 + 1000 * k)
                  for k in range(WINDOW + 5)), key=Event.order_key.fget)
    long_enc = _encoder(cache_mb=0)
    long_enc.ckpt.window = WINDOW + 5
    a = OFFLINE.encode_windows([Window.of(evs[-WINDOW:])])[0]
    b = long_enc.encode_windows([Window.of(evs)])[0]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    c = OFFLINE.encode_windows([Window.of(evs[-WINDOW + 3:])])[0]  # fewer than the receptive field: must differ
    assert np.abs(a - c).max() > 1e-4


def _tiny_cache_encoder(entries: int, scene_layers: int = 0) -> InterestEncoder:
    """The streamed encoder with room for only `entries` cached windows of each kind: evictions all the time."""
    enc = _encoder(cache_mb=0, scene_layers=scene_layers)
    for name, scene in (("timeline_cache", False), ("cache", True)):
        cache = WindowCache(enc.model.cfg, WINDOW, entries * getattr(enc, name).entry_bytes, enc.device, scene)
        assert cache.capacity == entries
        setattr(enc, name, cache)
    enc.merged.capacity = entries
    return enc


ENCODERS = {("shared", "big"): STREAMED, ("shared", "tiny"): _tiny_cache_encoder(2),
            ("own", "big"): OWN_STACK["streamed"], ("own", "tiny"): _tiny_cache_encoder(2, scene_layers=1)}

# mostly in time order, as a live stream is: a late event now and then, a duplicate now and then; two users in two
# scenes, so windows fill up and slide
seconds_st = st.one_of(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40), st.integers(-120, -1))
stream_st = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 11), st.integers(0, 1), st.integers(0, 3),
                               seconds_st), min_size=30, max_size=80)


def _micro_batches(events, data):
    """Join the events into windows in micro-batches of 1-6 events (sizes drawn); each batch's outcome in turn."""
    state, pos = {}, 0
    while pos < len(events):
        size = data.draw(st.integers(1, 6), label="batch")
        outcome = apply_batch(state.get, events[pos:pos + size], WINDOW)
        pos += size
        state.update(outcome.updates)
        yield outcome


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_st, st.data(), st.sampled_from(sorted(ENCODERS)))
def test_incremental_encode_equals_full_encode_at_every_step(steps, data, kind):
    """Every micro-batch's source vectors, from cached rows plus the new positions, equal a full encode of the same
    windows (each scene's and the merged one), with scene windows sharing the timeline's blocks or not; with a
    budget of two windows the caches evict on nearly every step."""
    enc = ENCODERS[kind]
    full = OFFLINE if kind[0] == "shared" else OWN_STACK["offline"]
    for cache in enc.caches:
        cache.clear()
    ts, events = 1_700_000_000_000, []
    for n, (u, i, s, a, dt) in enumerate(steps):
        ts += dt * 1000                     # dt < 0: a late event
        e = Event(f"s{n}", f"u{u}", ITEMS[i], SCENES[s], ACTIONS[a], ts)
        events.append(e)
        if dt == 0 and n % 5 == 0:
            events.append(e)                # a duplicate delivery
    for outcome in _micro_batches(events, data):
        got = enc.interests(outcome.updates)
        for r, user in enumerate(got.users):
            windows = outcome.updates[user]
            for scene, window in windows.items():
                want = full.encode_windows([window], scene=True)[0]
                np.testing.assert_allclose(got.h[r, SCENES.index(scene)], want, atol=1e-5, rtol=0)
            # the merged window (model.py, "Sources"), written out: the newest WINDOW of all the user's events
            merged = sorted((e for w in windows.values() for e in w), key=Event.order_key.fget)[-WINDOW:]
            np.testing.assert_allclose(got.recent[r], full.encode_windows([Window.of(merged)])[0], atol=1e-5, rtol=0)


def test_appending_to_a_window_encodes_only_the_new_positions():
    """An in-order stream extends cached windows instead of re-encoding them: the cache is really used."""
    enc = _encoder(cache_mb=64)
    rng = random.Random(3)
    state = {}
    merged_extends = 0
    for n in range(120):
        e = Event(f"a{n}", f"u{n % 2}", ITEMS[rng.randrange(12)], SCENES[rng.randrange(3)], "view",
                  1_700_000_000_000 + 1000 * n)
        multi = len(state.get(e.user_id, {}).keys() | {e.scene}) > 1
        merged_extends += multi and len(state.get(e.user_id, {})) > 1   # a merged window existed before
        outcome = apply_batch(state.get, [e], WINDOW)
        state.update(outcome.updates)
        got = enc.interests(outcome.updates)
        np.testing.assert_allclose(got.h[0, SCENES.index(e.scene)],
                                   OFFLINE.encode_windows([state[e.user_id][e.scene]])[0], atol=1e-5, rtol=0)
    stats = enc.cache.stats
    # one miss per (user, scene) window and per user's merged window, at their first event; then only extensions
    assert stats["misses"] == 6 + 2 and stats["extends"] == 114 + merged_extends, stats


def test_the_reuse_rule_at_its_boundary_for_every_append_and_late_event():
    """Exhaustive where the rule that decides what cached rows may be read is tight: a cached window (full, or a
    whole history one or two events short of full), then k newer events, with or without one late event slipped
    in between any two of its events. Whatever the rule decides (extend or encode whole), the vectors equal a full
    encode; and a full window extends for every k that leaves a cached event in it (what is read depends on the
    window's last `cone` events only), a whole history also once it has dropped events."""
    enc = _encoder(cache_mb=64)
    t0 = 1_700_000_000_000
    for length in (WINDOW, WINDOW - 1, WINDOW - 2):
        old = Window.of(Event(f"o{n}", "u", ITEMS[n % 12], "video", ACTIONS[n % 4], t0 + 1000 * n) for n in range(length))
        extended = set()
        for k in range(1, WINDOW + 1):
            for late_at in [None, *range(length + 1)]:
                enc.cache.clear()
                enc.interests({"u": {"video": old}})
                new = [Event(f"n{i}", "u", ITEMS[(3 * i) % 12], "video", "click", t0 + 1000 * (length + i))
                       for i in range(k)]
                if late_at is not None:
                    new.append(Event("late", "u", ITEMS[7], "video", "buy", t0 + 1000 * late_at - 500))
                window = apply_user({"video": old}, new, WINDOW)[0]["video"]
                before = enc.cache.stats["extends"]
                got = enc.interests({"u": {"video": window}}).h[0, 0]
                np.testing.assert_allclose(got, OFFLINE.encode_windows([window])[0], atol=1e-5, rtol=0,
                                           err_msg=f"length={length} k={k} late_at={late_at}")
                if enc.cache.stats["extends"] > before:
                    extended.add(k)
        assert extended == set(range(1, WINDOW)), (length, extended)


def _rows(stamps, ids) -> np.ndarray:
    t = np.zeros(len(stamps), ROW_DTYPE)
    t["ts"], t["hash"] = stamps, ids
    return t


@settings(max_examples=400, deadline=None)
@given(st.integers(2, 30), st.integers(1, 40), st.integers(1, 40), st.integers(0, 12), st.integers(-1, 40),
       st.booleans())
def test_the_reuse_rules_shortcut_answers_as_the_full_scan(cone, limit, length, k, late_at, unrelated):
    """`_reusable` tries an unchanged window first, without the full scan: it must answer as `_scan` does for an
    entry written as WindowCache.append writes it (the last `cone` rows, `whole` when shorter than both) and the
    window it then sees: the same one, k newer events appended (cut to the newest `limit`), a late event slipped
    in, or another user's window."""
    length = min(length, limit)
    cached = _rows(np.arange(length) * 10, np.arange(length) + 1)
    entry = Entry(0, cached[-cone:].tobytes(), whole=length < min(cone, limit))
    if unrelated:
        window = _rows(np.arange(length) * 10, np.arange(length) + 1000)
    else:
        stamps = [*cached["ts"], *(length * 10 + 10 * np.arange(k))]
        ids = [*cached["hash"], *(np.arange(k) + 500)]
        if 0 <= late_at < len(stamps):
            stamps.insert(late_at, stamps[late_at] - 5)
            ids.insert(late_at, 999)
        window = _rows(stamps, ids)[-limit:]
    assert _reusable(entry, window, cone, limit >= cone) == _scan(entry, window, cone, limit >= cone)


# mostly in order (1 event in ~20 late), so that merged windows are often extended, full ones included; many ties
# in time (dt 0), which the merge orders by event id
merged_stream_st = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 11), st.integers(0, 2), st.integers(0, 3),
                                      st.integers(-2, 40) | st.just(0)), min_size=30, max_size=80)


@settings(max_examples=60, deadline=None)
@given(merged_stream_st, st.data())
def test_merged_windows_kept_up_to_date_equal_the_merge_from_scratch(steps, data):
    """MergedWindows extends a user's merged window by the events their windows gained; whatever the stream (late
    events, any batches, evictions from its memo), it equals the newest WINDOW of the union built from scratch,
    event for event. (The vectors alone would not show an over-long merged window: events past the receptive field
    change nothing.)"""
    from scenestream.model.infer import MergedWindows, merged_window
    memo = MergedWindows(WINDOW, capacity=data.draw(st.sampled_from([1, 8]), label="capacity"))
    ts, events = 1_700_000_000_000, []
    for n, (u, i, s, a, dt) in enumerate(steps):
        ts += dt * 30_000                   # dt < 0: a late event
        # ids not in arrival order: among events of one time, a later one may sort first
        events.append(Event(f"m{n * 37 % 101:03d}-{n}", f"u{u}", ITEMS[i], SCENES[s], ACTIONS[a], ts))
    for outcome in _micro_batches(events, data):
        for user, windows in outcome.updates.items():
            assert memo.get(user, windows).tobytes() == merged_window(windows, WINDOW).tobytes()


def test_merged_windows_extend_an_in_order_stream():
    """The memo is really used: an in-order stream extends every merged window after a user's first event."""
    from scenestream.model.infer import MergedWindows, merged_window
    memo = MergedWindows(WINDOW, capacity=4)
    state = {}
    for n in range(60):
        e = Event(f"o{n:03d}", f"u{n % 2}", ITEMS[n % 12], SCENES[n % 3], "view", 1_700_000_000_000 + 1000 * n)
        windows = apply_batch(state.get, [e], WINDOW).updates[e.user_id]
        state[e.user_id] = windows
        assert (memo._extend(memo.memo.get(e.user_id), windows) is not None) == (n >= 2)
        assert memo.get(e.user_id, windows).tobytes() == merged_window(windows, WINDOW).tobytes()
