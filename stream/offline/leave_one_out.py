"""The leave-one-out protocol by time (docs/design.md, "Metrics"): each user's last event is the test target, the
second last the validation target, everything before them is history. Training, `evaluate`, `export`, the MostPop
baseline and `bench/quality.py` all cut the data here, and rank with the same windows -> vectors path as serving.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from scenestream.model.checkpoint import Checkpoint
from scenestream.model.infer import InterestEncoder
from scenestream.model.metrics import rank_targets, ranking_report
from scenestream.model.model import FIRST_ITEM
from scenestream.model.config import TrainConfig
from scenestream.model.train import train_model
from scenestream.model.vocab import ItemVocab

from ..core.events import Event
from ..core.popularity import Popularity
from ..core.window import apply_user


@dataclass
class LooCase:
    user_id: str
    history: list[Event]   # events before the target, ascending
    target: Event


def timelines(events: Sequence[Event]) -> dict[str, list[Event]]:
    """user -> events ascending by (ts, event_id), deduplicated by event_id."""
    by_user: dict[str, dict[str, Event]] = {}
    for e in events:
        by_user.setdefault(e.user_id, {})[e.event_id] = e
    return {u: sorted(d.values(), key=Event.order_key.fget) for u, d in by_user.items()}


def loo_cases(timelines: dict[str, list[Event]], holdout: int) -> list[LooCase]:
    """holdout=1: target = last event (test); holdout=2: target = second last (validation). Users with too
    short a timeline to have history before the target are left out."""
    return [LooCase(user, tl[:-holdout], tl[-holdout]) for user, tl in timelines.items() if len(tl) > holdout]


def fit(events: Sequence[Event], scenes: Sequence[str], actions: Sequence[str], window: int,
        model_cfg: Optional[dict] = None, cfg: TrainConfig = TrainConfig(), device: str = "cpu",
        progress: bool = True) -> tuple[Checkpoint, dict]:
    """Train under the protocol: every user's last two events are held out (test, validation) and never trained on;
    validation ranks each sampled user's second-last event with the global vector. The vocabulary holds every item,
    held-out ones included, so every target can be ranked."""
    tls = timelines(events)
    vocab = ItemVocab.from_events(e for tl in tls.values() for e in tl)
    train_tls = {u: tl[:-2] for u, tl in tls.items() if len(tl) > 2}
    val_users = sorted(train_tls)
    if cfg.val_users and len(val_users) > cfg.val_users:
        val_users = random.Random(cfg.seed).sample(val_users, cfg.val_users)
    val_cases = loo_cases({u: tls[u][:-1] for u in val_users}, holdout=1)

    def validate(ckpt: Checkpoint) -> dict:
        return evaluate_loo(InterestEncoder(ckpt, device, cache_mb=0), val_cases)

    ckpt, history = train_model(train_tls, vocab, scenes, actions, window, validate, model_cfg=model_cfg, cfg=cfg,
                                device=device, progress=progress)
    history["users"] = len(tls)
    return ckpt, history


def case_vectors(encoder: InterestEncoder, cases: Sequence[LooCase], target: str = "global") -> np.ndarray:
    """Each case's vector from its history: the global fused vector, or the fused / scene-only vector of the
    target's scene (`fused` / `scene`)."""
    states = {c.user_id: apply_user({}, c.history, encoder.window)[0] for c in cases}
    vec = encoder.interests(states)
    row = {u: i for i, u in enumerate(vec.users)}
    S = len(encoder.scenes)
    out = np.zeros((len(cases), vec.fused.shape[-1]), dtype=np.float32)
    for n, c in enumerate(cases):
        r = row[c.user_id]
        if target == "global":
            out[n] = vec.fused[r, S]
        else:
            s = encoder.scene_index[c.target.scene]
            out[n] = vec.fused[r, s] if target == "fused" else vec.h[r, s]
    return out


def _position(vocab: ItemVocab, item_id: str) -> Optional[int]:
    """The item's 0-based position among the catalog's items (None: not in the catalog)."""
    row = vocab.row(item_id)
    return None if row < FIRST_ITEM else row - FIRST_ITEM


def evaluate_loo(encoder: InterestEncoder, cases: Sequence[LooCase], target: str = "global",
                 ks=(10, 20)) -> dict[str, float]:
    """Recall/NDCG@K of each case's target among all items (`global`), or among its scene's items (`fused`, `scene`),
    the user's other history items masked."""
    vocab = encoder.ckpt.vocab
    _, item_scenes, items = encoder.item_vectors()
    targets = [_position(vocab, c.target.item_id) for c in cases]
    masked = [[p for p in (_position(vocab, e.item_id) for e in c.history) if p is not None] for c in cases]
    allowed = None
    if target != "global":
        scene_of = np.array(item_scenes, dtype=object)
        allowed = [scene_of == c.target.scene for c in cases]
    ranks = rank_targets(case_vectors(encoder, cases, target), items, targets, masked, allowed)
    return {"users": len(cases), **ranking_report(ranks, ks)}


def scene_history(case: LooCase) -> int:
    """How many earlier events the user has in the scene of the test event."""
    return sum(1 for e in case.history if e.scene == case.target.scene)


def sparse_scene_cases(cases: Sequence[LooCase], at_most: int, at_least: int = 0) -> list[LooCase]:
    """Test events whose scene the user has between at_least and at_most earlier events in: where interest transfer
    from the user's other scenes has to do the work."""
    return [c for c in cases if at_least <= scene_history(c) <= at_most]


def most_popular_loo(cases: Sequence[LooCase], ks=(10, 20), within_scene: bool = False) -> dict[str, float]:
    """The MostPop baseline under the same protocol: items ranked by how often they occur in all users' histories
    (the one popularity rule, core/popularity.py), history masked, full ranking (or within the test event's
    scene)."""
    popularity = Popularity()
    for c in cases:
        popularity.add(c.history)
    ranked = popularity.ranked()
    position = {item: n for n, (item, _) in enumerate(ranked)}
    score = -np.arange(len(ranked), dtype=np.float64)[:, None]   # one "dimension": better rank, higher score
    scene_of = {}
    for scene, counts in popularity.counts.items():
        for item in counts:
            scene_of.setdefault(item, scene)
    scenes = np.array([scene_of[i] for i, _ in ranked], dtype=object)
    targets = [position.get(c.target.item_id) for c in cases]
    masked = [[position[e.item_id] for e in c.history] for c in cases]
    allowed = [scenes == c.target.scene for c in cases] if within_scene else None
    ranks = rank_targets(np.ones((len(cases), 1)), score, targets, masked, allowed)
    return {"users": len(cases), **ranking_report(ranks, ks)}


def export_loo(encoder: InterestEncoder, cases: Sequence[LooCase], out) -> dict[str, int]:
    """Write what a third party needs to recompute the test metrics without this project's code:
    item_ids.txt + item_vectors.npy (the vectors the index serves), user_ids.txt + user_vectors.npy (each user's
    global fused vector from all events before their test event), test_items.txt (aligned with user_ids.txt) and
    history_items.txt (the items to mask, space-separated, aligned likewise)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids, _, E = encoder.item_vectors()
    (out / "item_ids.txt").write_text("\n".join(ids) + "\n")
    np.save(out / "item_vectors.npy", E.astype(np.float32))
    np.save(out / "user_vectors.npy", case_vectors(encoder, cases, "global").astype(np.float32))
    (out / "user_ids.txt").write_text("".join(c.user_id + "\n" for c in cases))
    (out / "test_items.txt").write_text("".join(c.target.item_id + "\n" for c in cases))
    (out / "history_items.txt").write_text("".join(" ".join(e.item_id for e in c.history) + "\n" for c in cases))
    return {"users": len(cases), "items": len(ids)}
