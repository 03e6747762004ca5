"""Full-ranking leave-one-out evaluation by time (DESIGN.md): rank each user's held-out item among all items,
with the user's other history items masked, using the same windows -> vectors path as serving."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from stream.events import Event
from stream.window import apply_user

from .infer import InterestEncoder
from .metrics import ranking_report
from .model import OOV, PAD


@dataclass
class LooCase:
    user_id: str
    history: list[Event]   # events before the target, ascending
    target: Event


def loo_cases(timelines: dict[str, list[Event]], holdout: int) -> list[LooCase]:
    """holdout=1: target = last event (test); holdout=2: target = second last (validation). Users with too
    short a timeline to have history before the target are left out."""
    cases = []
    for user, tl in timelines.items():
        if len(tl) > holdout:
            cases.append(LooCase(user, tl[:-holdout], tl[-holdout]))
    return cases


def case_vectors(encoder: InterestEncoder, cases: Sequence[LooCase], target: str = "global") -> np.ndarray:
    """Each case's vector from its history: the global fused vector, or the fused / scene-only vector of the
    target's scene (`fused` / `scene`)."""
    states = {}
    for c in cases:
        states[c.user_id], _, _ = apply_user({}, c.history, encoder.window)
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


def rank_cases(encoder: InterestEncoder, cases: Sequence[LooCase], vectors: np.ndarray,
               within_scene: bool = False, chunk: int = 1024) -> np.ndarray:
    """0-based rank of each target among all catalog items (or its scene's items), history items masked."""
    vocab = encoder.ckpt.vocab
    E = encoder.model.item_vectors().detach().double().cpu()   # float64 scores: ranks do not hinge on BLAS order
    item_scene = np.array([""] * 2 + list(vocab.item_scenes), dtype=object)
    ranks = np.full(len(cases), np.inf)
    for lo in range(0, len(cases), chunk):
        part = cases[lo:lo + chunk]
        scores = torch.from_numpy(vectors[lo:lo + chunk]).double() @ E.T            # [n, n_items]
        scores[:, PAD] = float("-inf")
        scores[:, OOV] = float("-inf")
        for n, c in enumerate(part):
            t = vocab.row(c.target.item_id)
            if t == OOV:
                continue
            seen = [r for r in vocab.rows(e.item_id for e in c.history) if r != t and r != OOV]
            row = scores[n]
            if seen:
                row[seen] = float("-inf")
            if within_scene:
                row[torch.from_numpy(item_scene != c.target.scene)] = float("-inf")
            ranks[lo + n] = float((row > row[t]).sum())
    return ranks


@torch.inference_mode()
def evaluate_loo(encoder: InterestEncoder, cases: Sequence[LooCase], target: str = "global",
                 ks=(10, 20)) -> dict[str, float]:
    vectors = case_vectors(encoder, cases, target)
    ranks = rank_cases(encoder, cases, vectors, within_scene=target != "global")
    return {"users": len(cases), **ranking_report(ranks, ks)}


def scene_history(case: LooCase) -> int:
    """How many earlier events the user has in the scene of the test event."""
    return sum(1 for e in case.history if e.scene == case.target.scene)


def sparse_scene_cases(cases: Sequence[LooCase], at_most: int, at_least: int = 0) -> list[LooCase]:
    """Test events whose scene the user has between at_least and at_most earlier events in: where interest transfer
    from the user's other scenes has to do the work."""
    return [c for c in cases if at_least <= scene_history(c) <= at_most]


def most_popular_loo(cases: Sequence[LooCase], ks=(10, 20), within_scene: bool = False) -> dict[str, float]:
    """The MostPop baseline under the same protocol: items scored by how often they occur in all users' events
    before their test events, history masked, full ranking (or within the test event's scene). Equal counts are
    broken by first appearance, so ties do not flatter the baseline."""
    counts: dict[str, int] = {}
    scene_of: dict[str, str] = {}
    for c in cases:
        for e in c.history:
            counts[e.item_id] = counts.get(e.item_id, 0) + 1
            scene_of.setdefault(e.item_id, e.scene)
    ids = list(counts)
    row = {i: r for r, i in enumerate(ids)}
    score = np.array([counts[i] for i in ids], dtype=np.float64) - np.arange(len(ids)) / (len(ids) + 1.0)
    scenes = np.array([scene_of[i] for i in ids], dtype=object)
    ranks = np.full(len(cases), np.inf)
    for n, c in enumerate(cases):
        t = row.get(c.target.item_id)
        if t is None:
            continue
        s = score.copy()
        seen = [row[e.item_id] for e in c.history if row[e.item_id] != t]
        s[seen] = -np.inf
        if within_scene:
            s[scenes != c.target.scene] = -np.inf
        ranks[n] = float((s > s[t]).sum())
    return {"users": len(cases), **ranking_report(ranks, ks)}


def export_loo(encoder: InterestEncoder, cases: Sequence[LooCase], out) -> dict[str, int]:
    """Write what a third party needs to recompute the test metrics without this project's code:
    item_ids.txt + item_vectors.npy (the vectors the index serves), user_ids.txt + user_vectors.npy (each user's
    global fused vector from all events before their test event), test_items.txt (aligned with user_ids.txt) and
    history_items.txt (the items to mask, space-separated, aligned likewise)."""
    from pathlib import Path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids, _, E = encoder.item_vectors()
    (out / "item_ids.txt").write_text("\n".join(ids) + "\n")
    np.save(out / "item_vectors.npy", E.astype(np.float32))
    vectors = case_vectors(encoder, cases, "global")
    np.save(out / "user_vectors.npy", vectors.astype(np.float32))
    (out / "user_ids.txt").write_text("".join(c.user_id + "\n" for c in cases))
    (out / "test_items.txt").write_text("".join(c.target.item_id + "\n" for c in cases))
    (out / "history_items.txt").write_text("".join(" ".join(e.item_id for e in c.history) + "\n" for c in cases))
    return {"users": len(cases), "items": len(ids)}
