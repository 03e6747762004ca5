"""What a recommendation is, without HTTP: the user's vector ranked against the item index, seen items left out,
the popular fallback for users with no vector, and the explanation (scene weights, the history items that score
highest against the same vector), and the user's recent history. The web views (web.py) only parse requests and
call these.
"""
from __future__ import annotations

import time
from itertools import islice
from typing import Optional
from weakref import WeakKeyDictionary

import numpy as np

from scenestream.index import ItemIndex

from ..core.popularity import Popularity
from ..core.window import UserState

EXPLAINED_HISTORY = 5   # history items shown in an explanation
POPULAR_TOP = 2000      # items per scene ranked once per popularity sum: the API's largest k, and as many excluded
_tops: WeakKeyDictionary = WeakKeyDictionary()   # Popularity -> {scene: its POPULAR_TOP best (item, count)}


def seen_items(state: Optional[UserState], scene: Optional[str]) -> set[str]:
    """Items in the user's windows (of one scene, or of all): what exclude_seen leaves out."""
    if not state:
        return set()
    return {i for s, w in state.items() if scene in (None, s) for i in w.item_ids()}


def popular_items(popularity: Popularity, index: ItemIndex, scene: Optional[str], k: int,
                  exclude: set[str]) -> list[dict]:
    """The k most popular items of the scene (or of all) that are in the catalog now (clicks on a deleted item must
    not bring it back) and not excluded; filled up from the catalog in its own order when too few were clicked.
    Each scene's best POPULAR_TOP are ranked once per `popularity` (the worker gives service.popular(): a sum that is
    replaced, never changed in place, when counts arrive), so a request reads a ranked list instead of every count."""
    def keep(i):
        return i not in exclude and i in index
    top = _tops.setdefault(popularity, {})
    if scene not in top:
        top[scene] = popularity.ranked(scene, POPULAR_TOP)
    ranked = list(islice((p for p in top[scene] if keep(p[0])), k))
    if len(ranked) < k and len(top[scene]) == POPULAR_TOP:   # more of the top excluded than it can spare
        ranked = popularity.ranked(scene, k, keep=keep)
    out = [{"item_id": i, "scene": index.scene_of(i), "score": float(c)} for i, c in ranked]
    if len(out) < k:  # cold start
        have = {o["item_id"] for o in out} | exclude
        for i, s in zip(index.item_ids, index.item_scenes):
            if len(out) >= k:
                break
            if (scene is None or s == scene) and i not in have:
                out.append({"item_id": i, "scene": s, "score": 0.0})
    return out


def recommendation(user: str, scene: Optional[str], k: int, exclude_seen: bool, state: Optional[UserState],
                   found: Optional[tuple[dict, Optional[float]]], index: ItemIndex, popularity: Popularity,
                   model_version: str) -> dict:
    """The response body for a user: `found` is the user's (record, applied_at) or None (no vector: fallback)."""
    exclude = seen_items(state, scene) if exclude_seen else set()
    body = {"user_id": user, "scene": scene, "k": k, "model_version": model_version}
    if found is None:
        return {**body, "items": popular_items(popularity, index, scene, k, exclude), "fallback": "popular",
                "freshness": None, "explanation": None}
    rec, applied_at = found
    vector = np.asarray(rec["fused"][scene] if scene else rec["global"], dtype=np.float32)
    hits = index.search(vector[None], scene=scene, k=k, exclude=[exclude])[0]
    return {
        **body,
        "items": [{"item_id": i, "scene": index.scene_of(i), "score": s} for i, s in hits],
        "fallback": None,
        "freshness": {"newest_ts": rec["newest_ts"],
                      "applied_ms_ago": None if applied_at is None else int((time.time() - applied_at) * 1000)},
        "explanation": {"scene_weights": rec["weights"][scene or "global"],
                        "history": explained_history(vector, state, index)},
    }


def explained_history(vector: np.ndarray, state: Optional[UserState], index: ItemIndex) -> list[dict]:
    """The user's history items that score highest against the vector the recommendation used."""
    known = [e for w in (state or {}).values() for e in w if e.item_id in index]
    try:
        scores = index.scores(vector[None], [e.item_id for e in known])[0] if known else []
    except ValueError:  # a catalog update removed one of them just now: explain without history scores
        known, scores = [], []
    weighed = sorted(zip(map(float, scores), known), key=lambda se: -se[0])[:EXPLAINED_HISTORY]
    return [{"item_id": e.item_id, "scene": e.scene, "ts": e.ts, "score": s} for s, e in weighed]


def recent_history(state: UserState, n: int) -> list[dict]:
    """The user's newest n events over all scenes' windows, newest first."""
    events = sorted((e for w in state.values() for e in w), key=lambda e: (e.ts, e.event_id), reverse=True)[:n]
    return [{"event_id": e.event_id, "item_id": e.item_id, "scene": e.scene, "action": e.action, "ts": e.ts}
            for e in events]
