"""What a deployment configures about its events: scenes, actions, window length and input limits.

One frozen dataclass, so the decoder, the state and the model agree on the same vocabulary of scenes and actions.
Every field has a documented default; the CLI maps flags and SCENESTREAM_* environment variables onto it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

DEFAULT_SCENES = ("video", "article", "shop")
DEFAULT_ACTIONS = ("view", "click", "like", "buy")

# 1990-01-01 .. 2100-01-01 in epoch milliseconds: admits MovieLens-100k (1997) and rejects seconds-for-ms mistakes.
TS_MIN_MS = 631_152_000_000
TS_MAX_MS = 4_102_444_800_000


@dataclass(frozen=True)
class StreamConfig:
    scenes: tuple[str, ...] = DEFAULT_SCENES
    actions: tuple[str, ...] = DEFAULT_ACTIONS
    default_action: str = "click"
    window: int = 50  # L: events kept per (user, scene)
    max_payload_bytes: int = 4096
    max_id_chars: int = 128
    ts_min_ms: int = TS_MIN_MS
    ts_max_ms: int = TS_MAX_MS
    _scene_set: frozenset = field(init=False, repr=False, compare=False)
    _action_set: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.scenes or len(set(self.scenes)) != len(self.scenes):
            raise ValueError(f"scenes must be non-empty and unique, got {self.scenes!r}")
        if self.default_action not in self.actions:
            raise ValueError(f"default action {self.default_action!r} is not one of {self.actions!r}")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        object.__setattr__(self, "_scene_set", frozenset(self.scenes))
        object.__setattr__(self, "_action_set", frozenset(self.actions))

    def with_(self, **changes) -> "StreamConfig":
        return replace(self, **changes)

    @classmethod
    def from_env(cls, **overrides) -> "StreamConfig":
        """Defaults, then SCENESTREAM_SCENES / _ACTIONS / _WINDOW, then explicit overrides (CLI flags)."""
        env: dict = {}
        if os.environ.get("SCENESTREAM_SCENES"):
            env["scenes"] = _csv(os.environ["SCENESTREAM_SCENES"])
        if os.environ.get("SCENESTREAM_ACTIONS"):
            env["actions"] = _csv(os.environ["SCENESTREAM_ACTIONS"])
        if os.environ.get("SCENESTREAM_WINDOW"):
            env["window"] = int(os.environ["SCENESTREAM_WINDOW"])
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())
