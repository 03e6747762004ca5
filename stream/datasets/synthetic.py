"""A seeded multi-scene clickstream with known latent interests: the embedded default and most tests.

The world: T latent topics. Every item belongs to one scene and one topic, with a Zipf popularity inside its
(scene, topic) group. Every user has one sparse topic preference shared by all scenes (so behaviour in one scene
predicts another: what interest transfer must recover), a preferred mix of scenes, a topic they are "in" that
sticks from one event to the next (so recent events matter), and a preference that drifts once, at a random time,
to a partly new set of topics (so vectors frozen at a cutoff go stale). Timestamps are epoch ms.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import numpy as np

from ..core.config import DEFAULT_ACTIONS, DEFAULT_SCENES
from ..core.events import Event, encode

BASE_TS_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 2000
    seed: int = 0
    scenes: tuple[str, ...] = DEFAULT_SCENES
    items_per_scene: int = 300
    topics: int = 20
    events_per_user: float = 60.0   # mean; per user ~ geometric-ish around it
    days: float = 30.0
    stickiness: float = 0.6         # P(next event stays on the current topic)
    malformed_fraction: float = 0.03


@dataclass
class SyntheticWorld:
    """The latent truth behind the generated events, for tests that check what the model recovers."""
    spec: SyntheticSpec
    item_ids: list[str]
    item_scene: dict[str, str]
    item_topic: dict[str, int]
    user_topics: dict[str, np.ndarray] = field(default_factory=dict)   # final (post-drift) preference


def generate(spec: SyntheticSpec = SyntheticSpec()) -> tuple[list[Event], SyntheticWorld]:
    """Valid events in time order, and the world that produced them."""
    rng = np.random.default_rng(spec.seed)
    n_scenes = len(spec.scenes)
    item_ids, item_scene, item_topic = [], {}, {}
    groups: dict[tuple[int, int], tuple[list[str], np.ndarray]] = {}
    for s, scene in enumerate(spec.scenes):
        topics = rng.integers(0, spec.topics, size=spec.items_per_scene)
        for t in range(spec.topics):
            members = [f"{scene[0]}{s}-{i:05d}" for i in np.flatnonzero(topics == t)]
            if not members:
                continue
            weights = 1.0 / np.arange(1, len(members) + 1) ** 0.9
            groups[(s, t)] = (members, weights / weights.sum())
            for m in members:
                item_ids.append(m)
                item_scene[m] = scene
                item_topic[m] = t
    world = SyntheticWorld(spec, sorted(item_ids), item_scene, item_topic)

    span_ms = spec.days * 86_400_000
    draw = random.Random(spec.seed)  # per-event draws: Python's sampler is ~20x faster than numpy's for scalars
    topic_range, scene_range = range(spec.topics), range(n_scenes)
    cum = {key: np.cumsum(w).tolist() for key, (_, w) in groups.items()}
    action_cum = np.cumsum([0.55, 0.3, 0.1, 0.05]).tolist()
    events: list[Event] = []
    for u in range(spec.users):
        user = f"u{u:06d}"
        pref = rng.dirichlet(np.full(spec.topics, 0.15))
        drifted = 0.3 * pref + 0.7 * rng.dirichlet(np.full(spec.topics, 0.15))
        pref_cum, drifted_cum = np.cumsum(pref).tolist(), np.cumsum(drifted).tolist()
        scene_cum = np.cumsum(rng.dirichlet(np.full(n_scenes, 1.0))).tolist()
        n_events = max(3, int(rng.gamma(2.0, spec.events_per_user / 2.0)))
        start = rng.uniform(0, 0.5 * span_ms)
        gaps = rng.exponential((span_ms - start) / (n_events + 1), size=n_events)
        times = (start + np.cumsum(gaps)).tolist()
        drift_at = int(rng.integers(n_events // 3, max(n_events // 3 + 1, n_events)))
        topic = draw.choices(topic_range, cum_weights=pref_cum)[0]
        seen: set[str] = set()
        for k in range(n_events):
            if k == drift_at or draw.random() > spec.stickiness:
                topic = draw.choices(topic_range, cum_weights=pref_cum if k < drift_at else drifted_cum)[0]
            s = draw.choices(scene_range, cum_weights=scene_cum)[0]
            if (s, topic) not in groups:
                continue
            members = groups[(s, topic)][0]
            for _ in range(4):  # mostly new items, as in real feeds
                item = draw.choices(members, cum_weights=cum[(s, topic)])[0]
                if item not in seen:
                    break
            seen.add(item)
            ts = BASE_TS_MS + int(min(times[k], span_ms))
            action = draw.choices(DEFAULT_ACTIONS, cum_weights=action_cum)[0]
            events.append(Event(f"e{u:06d}-{k:05d}", user, item, spec.scenes[s], action, ts))
        world.user_topics[user] = drifted
    events.sort(key=Event.order_key.fget)
    return events, world


def malformed_line(rng: random.Random, good: Event) -> bytes:
    """One deliberately bad log line, of a kind a real producer emits: every consumer must count and skip it."""
    base = good.to_json()
    kind = rng.randrange(8)
    if kind == 0:
        return json.dumps(base).encode()[: rng.randrange(1, 40)]                # truncated
    if kind == 1:
        base.pop(rng.choice(["user_id", "item_id", "scene", "ts"]))              # missing field
    elif kind == 2:
        base["scene"] = "podcast"                                               # unknown scene
    elif kind == 3:
        base["ts"] = str(base["ts"])                                            # wrong type
    elif kind == 4:
        base["ts"] = base["ts"] // 1_000_000                                    # out of range
    elif kind == 5:
        base["user_id"] = ""                                                     # empty id
    elif kind == 6:
        return json.dumps(base).replace(str(base["ts"]), "NaN").encode()        # NaN
    else:
        return b"\xff\xfe" + json.dumps(base).encode()                           # not UTF-8
    return json.dumps(base).encode()


def log_lines(events: list[Event], fraction: float, seed: int) -> list[bytes]:
    """JSONL lines for the events with about `fraction` malformed lines mixed in (none when fraction is 0)."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    for e in events:
        if fraction > 0 and rng.random() < fraction:
            lines.append(malformed_line(rng, e))
        lines.append(encode(e))
    return lines
