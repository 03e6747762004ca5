"""Interest transfer: a user's behaviour in other scenes predicts what they will take in a scene they have no history
in. Synthetic users share one topic preference across scenes; we withhold a target scene for some users entirely
(from training too) and rank their target-scene items with the fused H_target built from their other scenes only."""
import numpy as np
import pytest

from scenestream.model.infer import InterestEncoder
from scenestream.model.metrics import ndcg_at, recall_at
from scenestream.model.config import TrainConfig
from scenestream.stream.offline.leave_one_out import fit
from scenestream.stream.core.config import DEFAULT_ACTIONS
from scenestream.stream.datasets.synthetic import SyntheticSpec, generate
from scenestream.stream.core.window import apply_user

TARGET = "shop"


@pytest.fixture(scope="module")
def world():
    spec = SyntheticSpec(users=1200, seed=7)
    events, world = generate(spec)
    per_user: dict[str, list] = {}
    for e in events:
        per_user.setdefault(e.user_id, []).append(e)
    withheld = sorted(u for u, evs in per_user.items()
                      if sum(e.scene == TARGET for e in evs) >= 5 and sum(e.scene != TARGET for e in evs) >= 5)[:300]
    hidden = set(withheld)
    train_events = [e for e in events if not (e.user_id in hidden and e.scene == TARGET)]
    ckpt, _ = fit(train_events, spec.scenes, DEFAULT_ACTIONS, 50,
                          cfg=TrainConfig(epochs=4, patience=2, val_users=500), progress=False)
    return spec, per_user, withheld, train_events, InterestEncoder(ckpt)


def _ranks(scores: np.ndarray, items: list[str], targets: list[str]) -> np.ndarray:
    pos = {item: n for n, item in enumerate(items)}
    return np.array([(scores > scores[pos[t]]).sum() for t in targets], dtype=float)


def test_fused_vector_transfers_interest_to_an_unseen_scene(world):
    spec, per_user, withheld, train_events, encoder = world
    ids, scenes, E = encoder.item_vectors()
    target_items = [i for i, s in zip(ids, scenes) if s == TARGET]
    target_rows = np.array([n for n, s in enumerate(scenes) if s == TARGET])
    counts = {i: 0 for i in target_items}
    for e in train_events:
        if e.scene == TARGET and e.item_id in counts:
            counts[e.item_id] += 1
    popular_scores = np.array([counts[i] for i in target_items], dtype=float)

    states = {u: apply_user({}, [e for e in per_user[u] if e.scene != TARGET], encoder.window)[0] for u in withheld}
    vec = encoder.interests(states)
    j = encoder.scene_index[TARGET]
    assert not vec.has[:, j].any(), "the target scene must really be withheld"

    fused_ranks, pop_ranks = [], []
    for r, user in enumerate(vec.users):
        held_out = [e.item_id for e in per_user[user] if e.scene == TARGET and e.item_id in counts]
        scores = E[target_rows] @ vec.fused[r, j]
        fused_ranks.extend(_ranks(scores, target_items, held_out))
        pop_ranks.extend(_ranks(popular_scores, target_items, held_out))
    fused_ranks, pop_ranks = np.array(fused_ranks), np.array(pop_ranks)
    fused = {"recall@10": recall_at(fused_ranks, 10), "ndcg@10": ndcg_at(fused_ranks, 10)}
    popular = {"recall@10": recall_at(pop_ranks, 10), "ndcg@10": ndcg_at(pop_ranks, 10)}
    print(f"transfer to withheld scene {TARGET!r} over {len(fused_ranks)} items: fused {fused}, popular {popular}")
    assert fused["ndcg@10"] > 1.2 * popular["ndcg@10"]
    assert fused["recall@10"] > 1.2 * popular["recall@10"]
