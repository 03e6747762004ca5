"""The exactness contract (docs/design.md): for any multiset of valid events, delivered in any order, with duplicates, in
any micro-batch sizes and across restarts, the streamed vectors equal an offline encode from scratch within 1e-5."""
import random

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scenestream.model.checkpoint import Checkpoint
from scenestream.model.infer import InterestEncoder
from scenestream.model.model import InterestModel, ModelConfig
from scenestream.model.vocab import ItemVocab
from scenestream.stream.core.events import Event
from scenestream.stream.core.batch import apply_batch, interest_records
from scenestream.stream.core.window import apply_user, group_by_user

SCENES = ("video", "article", "shop")
ACTIONS = ("view", "click", "like", "buy")
ITEMS = [f"i{n}" for n in range(12)]
WINDOW = 10  # = n_layers * span + 2 for the model below


def _encoder(cache_size: int) -> InterestEncoder:
    torch.manual_seed(1)
    vocab = ItemVocab(ITEMS[:10], [SCENES[n % 3] for n in range(10)])  # i10, i11 are out of vocabulary
    cfg = ModelConfig(n_items=len(vocab), n_scenes=3, n_actions=4, d_model=32, n_heads=2, n_layers=2, span=4,
                      dropout=0.0)
    model = InterestModel(cfg)
    with torch.no_grad():  # random but not tiny weights, so differences would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return InterestEncoder(Checkpoint(model.eval(), vocab, SCENES, ACTIONS, WINDOW, "test"), cache_size=cache_size)


STREAMED = _encoder(cache_size=1000)
OFFLINE = _encoder(cache_size=0)

event_st = st.builds(
    lambda n, u, i, s, a, t: Event(f"e{n}", f"u{u}", ITEMS[i], SCENES[s], ACTIONS[a], 1_700_000_000_000 + t),
    st.integers(0, 10_000), st.integers(0, 3), st.integers(0, 11), st.integers(0, 2), st.integers(0, 3),
    st.integers(0, 5_000_000))


def offline(events):
    """From scratch: deduplicate, window each user's events at once, encode with no cache."""
    unique = {e.event_id: e for e in events}
    states = {u: apply_user({}, evs, WINDOW)[0] for u, evs in group_by_user(unique.values()).items()}
    return {r["user_id"]: r for r in interest_records(OFFLINE, states)}


def stream(deliveries, batch_sizes):
    state, latest = {}, {}
    pos = 0
    for size in batch_sizes:
        batch = deliveries[pos:pos + size]
        pos += size
        outcome = apply_batch(state.get, batch, WINDOW)
        state.update(outcome.updates)
        for rec in interest_records(STREAMED, outcome.updates):
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
    assert_same(stream(deliveries, sizes), offline(events))


def test_a_window_encodes_the_same_alone_and_in_a_padded_batch():
    rng = random.Random(0)
    windows = []
    for n in range(40):
        evs = [Event(f"w{n}-{k}", "u", ITEMS[rng.randrange(12)], "video", ACTIONS[rng.randrange(4)],
                     1_700_000_000_000 + rng.randrange(10**7)) for k in range(rng.randrange(1, WINDOW + 1))]
        windows.append(tuple(sorted(evs, key=Event.order_key.fget)))
    together = OFFLINE.encode_windows(windows)
    for n, w in enumerate(windows):
        np.testing.assert_allclose(OFFLINE.encode_windows([w])[0], together[n], atol=1e-5, rtol=0)


def test_output_ignores_events_beyond_the_receptive_field():
    """A full window's output depends on its last n_layers*span+2 events only: prepending older events to a
    (longer) window changes nothing. This is what lets the state hold exactly L events."""
    rng = random.Random(1)
    evs = sorted((Event(f"r{k}", "u", ITEMS[rng.randrange(12)], "shop", "click", 1_700_000_000_000 + 1000 * k)
                  for k in range(WINDOW + 5)), key=Event.order_key.fget)
    long_enc = _encoder(cache_size=0)
    long_enc.ckpt.window = WINDOW + 5
    a = OFFLINE.encode_windows([tuple(evs[-WINDOW:])])[0]
    b = long_enc.encode_windows([tuple(evs)])[0]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    c = OFFLINE.encode_windows([tuple(evs[-WINDOW + 3:])])[0]  # fewer than the receptive field: must differ
    assert np.abs(a - c).max() > 1e-4
