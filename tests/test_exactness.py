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
from scenestream.model.slot_encoder import SlotEncoder
from scenestream.model.vocab import ItemVocab
from scenestream.stream.core.events import Event
from scenestream.stream.core.output import interest_records, record
from scenestream.stream.core.slot_step import encode
from scenestream.stream.core.slots import SlotWindows
from scenestream.stream.core.window import Window, apply_user

from .reference import group_by_user

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


OFFLINE = _encoder(cache_mb=0)
OWN_OFFLINE = _encoder(cache_mb=0, scene_layers=1)

event_st = st.builds(
    lambda n, u, i, s, a, t: Event(f"e{n}", f"u{u}", ITEMS[i], SCENES[s], ACTIONS[a], 1_700_000_000_000 + t),
    st.integers(0, 10_000), st.integers(0, 3), st.integers(0, 11), st.integers(0, 2), st.integers(0, 3),
    st.integers(0, 5_000_000))


def offline(events, encoder=OFFLINE):
    """From scratch: deduplicate, window each user's events at once, encode with no cache."""
    unique = {e.event_id: e for e in events}
    states = {u: apply_user({}, evs, WINDOW)[0] for u, evs in group_by_user(unique.values()).items()}
    return {r["user_id"]: r for r in interest_records(encoder, states)}


def stream(deliveries, batch_sizes, encoder=OFFLINE):
    """What the worker does: the deliveries joined into slots in micro-batches, each batch's users encoded by the
    slot encoder (cached positions reused) into records; the newest record of each user."""
    slots, streamed, latest = SlotWindows(SCENES, WINDOW), SlotEncoder(encoder, cache_mb=64), {}
    pos = 0
    for size in batch_sizes:
        batch = deliveries[pos:pos + size]
        pos += size
        users = slots.join(batch).users
        vec = encode(slots, users, streamed)
        for r, u in enumerate(vec.users.tolist()):
            user = slots.user_names[u]
            latest[user] = record(user, vec, r, SCENES, encoder.version)
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
        assert_same(stream(deliveries, sizes, OWN_OFFLINE), offline(events, OWN_OFFLINE))
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


def test_the_reuse_rule_at_its_boundary_for_every_append_and_late_event():
    """Exhaustive where the rule that decides what cached rows may be read is tight: a cached window (full, or a
    whole history one or two events short of full), then k newer events, with or without one late event slipped
    in between any two of its events. Whatever the rule decides (extend or encode whole), the vectors equal a full
    encode; and a full window extends for every k that leaves a cached event in it (what is read depends on the
    window's last `cone` events only), a whole history also once it has dropped events."""
    t0 = 1_700_000_000_000
    for length in (WINDOW, WINDOW - 1, WINDOW - 2):
        old = [Event(f"o{n}", "u", ITEMS[n % 12], "video", ACTIONS[n % 4], t0 + 1000 * n) for n in range(length)]
        extended = set()
        for k in range(1, WINDOW + 1):
            for late_at in [None, *range(length + 1)]:
                slots, streamed = SlotWindows(SCENES, WINDOW), SlotEncoder(OFFLINE, cache_mb=64)
                encode(slots, slots.join(old).users, streamed)
                new = [Event(f"n{i}", "u", ITEMS[(3 * i) % 12], "video", "click", t0 + 1000 * (length + i))
                       for i in range(k)]
                if late_at is not None:
                    new.append(Event("late", "u", ITEMS[7], "video", "buy", t0 + 1000 * late_at - 500))
                got = encode(slots, slots.join(new).users, streamed).h[0, 0]
                window = apply_user({"video": Window.of(old)}, new, WINDOW)[0]["video"]
                np.testing.assert_allclose(got, OFFLINE.encode_windows([window])[0], atol=1e-5, rtol=0,
                                           err_msg=f"length={length} k={k} late_at={late_at}")
                if streamed.scene_pool.stats["extends"]:
                    extended.add(k)
        assert extended == set(range(1, WINDOW)), (length, extended)


# mostly in order (1 event in ~20 late), so that merged timelines are often extended, full ones included; many ties
# in time (dt 0), which the merge orders by event id
merged_stream_st = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 11), st.integers(0, 2), st.integers(0, 3),
                                      st.integers(-2, 40) | st.just(0)), min_size=30, max_size=80)


@settings(max_examples=60, deadline=None)
@given(merged_stream_st, st.data())
def test_merged_timelines_equal_the_merge_from_scratch(steps, data):
    """A user's merged timeline from slots (core/slots.py `timelines`) is the newest WINDOW events of all their
    windows, ascending by (ts, event id), row for row: whatever the stream (late events, ties in time with ids
    out of arrival order, any batches)."""
    from scenestream.model.infer import merged_window
    slots = SlotWindows(SCENES, WINDOW)
    ts, events = 1_700_000_000_000, []
    for n, (u, i, s, a, dt) in enumerate(steps):
        ts += dt * 30_000                   # dt < 0: a late event
        # ids not in arrival order: among events of one time, a later one may sort first
        events.append(Event(f"{n * 37 % 101}{'z' * (n % 3)}-{n}", f"u{u}", ITEMS[i], SCENES[s], ACTIONS[a], ts))
    pos = 0
    while pos < len(events):
        size = data.draw(st.integers(1, 6), label="batch")
        users = slots.join(events[pos:pos + size]).users
        pos += size
        got = slots.timelines(users, np.full(len(users), -1, np.int64))
        for r, u in enumerate(users.tolist()):
            want = merged_window(slots.state(slots.user_names[u]), WINDOW)
            n = int(got.n[r])
            assert n == len(want)
            for field in ("ts", "hash", "item", "action", "scene"):
                assert getattr(got, field)[r, WINDOW - n:].tolist() == want[field].tolist(), field


def test_gap_buckets_are_the_log2_seconds_of_the_model_at_every_edge():
    """The time-gap bucket is 1 + floor(log2(1 + seconds)), capped; it is found among integers, for tensors (training,
    full encodes) and numpy arrays (the streaming path) alike, so the two paths cannot differ at an edge."""
    from scenestream.model.model import gap_bucket
    ms = np.array([1000 * (2 ** b - 1) + d for b in range(40) for d in (-1, 0, 1)] + [-5, 0, 10 ** 13], np.int64)
    ms = np.concatenate([ms, np.random.default_rng(0).integers(0, 10 ** 12, 10_000)])
    for buckets in (32, 5):
        seconds = np.maximum(ms, 0) / 1000.0
        want = np.minimum(1 + np.floor(np.log2(1.0 + seconds)).astype(np.int64), buckets - 1)
        np.testing.assert_array_equal(gap_bucket(ms, buckets), want)
        np.testing.assert_array_equal(gap_bucket(torch.from_numpy(ms), buckets).numpy(), want)
